"""Checks a config before anything is built or written.

Every problem is reported as one `ConfigError` whose message names the key,
the offending value and what would be valid, so the CLI can print one line and
exit non-zero before it touches the workdir.

The valid choices of a field come from the code that implements them (the
optimiser and schedule tables in optim.py, the bias-loss modes in losses.py,
the preprocessings, bad-image policies and RandAugment scale in data/), so
each list exists once.
"""

from __future__ import annotations

import json
import math
import numbers
import os
import re
from collections.abc import Callable, Iterable
from typing import Any

import ml_collections
import numpy as np

from skipnet_jax import default_config, losses, optim

OPTIMIZERS = tuple(optim.OPTIMIZERS)
SCHEDULES = tuple(optim.SCHEDULES)
WEIGHT_DECAY_MASKS = tuple(optim.WEIGHT_DECAY_MASKS)
BIAS_LOSS_MODES = losses.BIAS_LOSS_MODES
LOSSES = ("bias", "ce")
DTYPES = ("float32", "bfloat16")
MIN_IMAGE_SIZE = 32
# Bias-loss weights exp(alpha * v) - beta, v in [0, 1], must be positive and finite in float32.
FLOAT32_MAX = float(np.finfo(np.float32).max)
MAX_BIAS_LOSS_ALPHA = math.log(FLOAT32_MAX)  # exp(alpha) overflows float32 beyond it (88.72)


class ConfigError(ValueError):
    """A config value that cannot work; the message is one self-contained line."""


def _is_int(value: Any) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def _flat_items(config: ml_collections.ConfigDict, prefix: str = "") -> Iterable[tuple[str, Any]]:
    for key, value in config.items():
        name = f"{prefix}{key}"
        if isinstance(value, ml_collections.ConfigDict):
            yield from _flat_items(value, f"{name}.")
        else:
            yield name, value


def _get(config: ml_collections.ConfigDict, dotted: str) -> Any:
    value = config
    for part in dotted.split("."):
        value = value[part]
    return value


def _retired(name: str, source: str) -> str:
    return f"config key '{name}'{source} is not a setting: {default_config.RETIRED_KEYS[name]}"


def _check_known_keys(config: ml_collections.ConfigDict) -> None:
    known = dict(_flat_items(default_config.get_default_config()))
    for name, _ in _flat_items(config):
        if name in default_config.RETIRED_KEYS:
            raise ConfigError(_retired(name, ""))
        if name not in known:
            close = [k for k in known if k.split(".")[-1] == name.split(".")[-1]]
            hint = f"; did you mean {close[0]}?" if close else ""
            raise ConfigError(f"config key '{name}' is unknown{hint} (see skipnet_jax/default_config.py)")


def describe_unknown_override(argv: Iterable[str]) -> str | None:
    """The message for the first `--config.KEY=VALUE` argument whose KEY no config defines."""
    known = {name for name, _ in _flat_items(default_config.get_default_config())}
    prefixes = {name.rsplit(".", 1)[0] for name in known if "." in name}
    for arg in argv:
        if arg.startswith("--config."):
            key = arg[len("--config.") :].split("=", 1)[0]
            if key in default_config.RETIRED_KEYS:
                return _retired(key, f" (from {arg})")
            if key not in known and key not in prefixes:
                return f"config key '{key}' (from {arg}) is unknown; see skipnet_jax/default_config.py"
    return None


def _choice(config, key: str, choices: Iterable[str]) -> None:
    value = _get(config, key)
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(f"config.{key}={value!r} is not valid; valid choices: {', '.join(choices)}")


def _check(config, key: str, predicate: Callable[[Any], bool], requirement: str) -> None:
    value = _get(config, key)
    try:
        ok = predicate(value)
    except TypeError:
        ok = False
    if not ok:
        raise ConfigError(f"config.{key}={value!r} is not valid; it must be {requirement}")


def validate_config(config: ml_collections.ConfigDict, *, device_count: int, model_names: Iterable[str]) -> None:
    """Raises ConfigError for the first invalid field; returns None when all are valid."""
    _check_known_keys(config)
    _choice(config, "model", model_names)
    _choice(config, "optimizer", OPTIMIZERS)
    _choice(config, "schedule", SCHEDULES)
    _choice(config, "loss", LOSSES)
    _choice(config, "dtype", DTYPES)
    _choice(config, "bias_loss.mode", BIAS_LOSS_MODES)
    _choice(config, "weight_decay_mask", WEIGHT_DECAY_MASKS)
    _check(config, "dataset", lambda v: isinstance(v, str) and v.strip() != "", "a non-empty dataset name")
    _check(config, "data_dir", lambda v: v is None or (isinstance(v, str) and v != ""), "None or a directory path")

    positive_int = lambda v: _is_int(v) and v > 0  # noqa: E731
    _check(config, "image_size", lambda v: _is_int(v) and v >= MIN_IMAGE_SIZE, f"an integer >= {MIN_IMAGE_SIZE}")
    _check(
        config, "num_classes", lambda v: _is_int(v) and (v == -1 or v > 1), "-1 (from the dataset) or an integer >= 2"
    )
    for key in ("batch_size", "eval_batch_size"):
        _check(config, key, positive_int, "a positive integer")
        _check(
            config,
            key,
            lambda v: v % device_count == 0,
            f"divisible by the number of devices ({device_count}), the batch is split evenly across them",
        )
    _check(config, "num_train_steps", _is_int, "an integer (<= 0 to derive it from num_epochs)")
    if config.num_train_steps <= 0:
        _check(config, "num_epochs", lambda v: _is_number(v) and v > 0, "> 0 when num_train_steps <= 0")
    if config.num_train_steps <= 0 and config.warmup_epochs > 0:
        _check(
            config, "warmup_epochs", lambda v: v < config.num_epochs, f"shorter than num_epochs ({config.num_epochs})"
        )
    _check(config, "seed", lambda v: _is_int(v) and 0 <= v < 2**31, "an integer in [0, 2**31)")

    _check(config, "learning_rate", lambda v: _is_number(v) and v > 0, "a positive number")
    for key in ("momentum", "rmsprop_decay", "adam_b1", "adam_b2", "ema_decay", "dropout_rate", "label_smoothing"):
        _check(config, key, lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)")
    for key in ("rmsprop_eps", "adam_eps"):
        _check(config, key, lambda v: _is_number(v) and v > 0, "a positive number")
    for key in ("weight_decay", "grad_clip_norm", "warmup_epochs", "lr_end_factor"):
        _check(config, key, lambda v: _is_number(v) and v >= 0, "a number >= 0")
    _check(config, "lr_decay_rate", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    _check(config, "lr_decay_epochs", lambda v: _is_number(v) and v > 0, "a positive number")
    _check(config, "lr_step_factor", lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]")
    _check(
        config,
        "lr_step_epochs",
        lambda v: all(_is_number(e) and e > 0 for e in v) and list(v) == sorted(v),
        "an increasing sequence of positive epochs",
    )
    if config.schedule == "step":
        _check(
            config,
            "lr_step_epochs",
            lambda v: len(v) > 0,
            'non-empty with schedule="step" (the epochs at which to decay)',
        )
        _check(
            config,
            "lr_step_epochs",
            lambda v: v[0] > config.warmup_epochs,
            f"after warmup_epochs ({config.warmup_epochs}); a decay inside the warm-up would land at its end",
        )
    _check(config, "nesterov", lambda v: isinstance(v, bool), "True or False")

    _check_bias_loss(config)

    for key in ("log_every_steps", "checkpoint_every_steps", "keep_checkpoints"):
        _check(config, key, positive_int, "a positive integer")
    _check(config, "eval_every_steps", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: only at the end)")
    _check(config, "skip_nonfinite_steps", lambda v: isinstance(v, bool), "True or False")
    _check(
        config,
        "max_abs_weight",
        lambda v: _is_number(v) and math.isfinite(v) and v >= 0,
        "a finite number >= 0 (0: no bound)",
    )
    _check(
        config,
        "init_from",
        lambda v: v is None or (isinstance(v, str) and os.path.isdir(v)),
        "None or an existing directory written by skipnet_jax.convert",
    )
    validate_data_config(config)


def _check_bias_loss(config: ml_collections.ConfigDict) -> None:
    """alpha and beta such that every weight z(v) = exp(alpha*v) - beta, v in [0, 1], is positive
    and finite in float32: with alpha > 0, z runs from 1 - beta (v = 0) to exp(alpha) - beta
    (v = 1), so alpha < ln(float32 max) and exp(alpha) - float32 max < beta < 1."""
    _check(
        config,
        "bias_loss.alpha",
        lambda v: _is_number(v) and 0 < v < MAX_BIAS_LOSS_ALPHA,
        f"a number in (0, {MAX_BIAS_LOSS_ALPHA:.4g}) so every weight exp(alpha*v) - beta, v in [0, 1], "
        "is finite in float32 (alpha = 0 weights all samples alike: use loss='ce')",
    )
    lowest = math.exp(config.bias_loss.alpha) - FLOAT32_MAX
    _check(
        config,
        "bias_loss.beta",
        lambda v: _is_number(v) and lowest < v < 1,
        f"a number in ({lowest:.4g}, 1) so every weight exp(alpha*v) - beta, v in [0, 1], is positive "
        f"and finite in float32 (alpha={config.bias_loss.alpha})",
    )


def validate_data_config(config: ml_collections.ConfigDict) -> None:
    """Raises ConfigError for the first invalid ``config.data`` field (the input pipeline runs
    this too, for callers that skip `validate_config`)."""
    _choice(config, "data.preprocessing", default_config.PREPROCESSINGS)
    _choice(config, "data.bad_images", default_config.BAD_IMAGE_POLICIES)
    _check(
        config,
        "data.randaugment_num_layers",
        lambda v: _is_int(v) and v >= 0,
        "an integer >= 0 (0 disables RandAugment)",
    )
    _check(
        config,
        "data.randaugment_magnitude",
        lambda v: _is_number(v) and 0 <= v <= default_config.RANDAUGMENT_MAX_LEVEL,
        f"a number in [0, {default_config.RANDAUGMENT_MAX_LEVEL:g}]",
    )
    _check(
        config,
        "data.manual_dir",
        lambda v: v is None or (isinstance(v, str) and v != ""),
        "None or a directory path",
    )
    _check(config, "data.prefetch", lambda v: _is_int(v) and v >= 0, "an integer >= 0")
    _check(config, "data.num_threads", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0: automatic)")
    for key in ("data.augment", "data.cache", "data.drop_remainder"):
        _check(config, key, lambda v: isinstance(v, bool), "True or False")
    for key in ("data.mean", "data.std"):
        _check(
            config,
            key,
            lambda v: v is None or (len(v) == 3 and all(_is_number(x) for x in v)),
            "None or three numbers (one per RGB channel)",
        )
    if config.data.std is not None:
        _check(config, "data.std", lambda v: all(x > 0 for x in v), "three positive numbers")


def check_num_classes(config: ml_collections.ConfigDict, dataset_num_classes: int) -> int:
    """The number of classes to build the model with, or ConfigError on a mismatch."""
    if config.num_classes == -1:
        return dataset_num_classes
    if config.num_classes != dataset_num_classes:
        raise ConfigError(
            f"config.num_classes={config.num_classes} does not match dataset {config.dataset!r}, which has "
            f"{dataset_num_classes} classes; set it to {dataset_num_classes} or -1"
        )
    return config.num_classes


def check_batch_fits(config, num_train_examples: int, dataset_name: str) -> None:
    """Refuses a global ``batch_size`` larger than the train split: one batch would hold every
    example more than once (and the out-of-memory error it meets says nothing of why)."""
    if config.batch_size > num_train_examples:
        raise ConfigError(
            f"config.batch_size={config.batch_size} is larger than the train split "
            f"({dataset_name} '{config.data.train_split}': {num_train_examples} examples); "
            f"set --config.batch_size to at most {num_train_examples}"
        )


def check_workdir_writable(workdir: str) -> None:
    """Fails early, and without creating or changing any file, if workdir cannot be used."""
    if re.match(r"[A-Za-z][A-Za-z0-9+.-]*://", workdir):
        # os.makedirs would silently make a local directory named "gs:".
        raise ConfigError(
            f"--workdir={workdir!r} is a URL; only local or mounted directories are supported "
            "(mount a bucket with gcsfuse, as launch/tpu_pod.sh does, and pass the mount path)"
        )
    path = os.path.abspath(workdir)
    probe = path
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise ConfigError(f"--workdir={workdir!r} is not usable: {probe!r} exists and is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"--workdir={workdir!r} is not writable ({probe!r} denies write access)")


def config_differences(saved: dict, wanted: dict) -> list[str]:
    """Every key whose value differs between two config dicts (as read from config.json),
    as ``key: saved vs wanted``, in key order (`config_changes`)."""
    return [f"{key}: {a!r} vs {b!r}" for key, (a, b) in config_changes(saved, wanted).items()]


def config_changes(saved: dict, wanted: dict) -> dict[str, tuple[Any, Any]]:
    """``{dotted key: (saved value, wanted value)}`` for every key whose value differs between
    two config dicts (as read from config.json), in key order.  A schema field missing from
    either side counts as its schema default (a config.json written before the field existed),
    and `default_config.RETIRED_KEYS` are not compared."""
    return dict(_differences(_with_schema_defaults(saved), _with_schema_defaults(wanted), ""))


def _with_schema_defaults(values: dict) -> dict:
    filled = default_config.with_defaults(ml_collections.ConfigDict(values))
    return json.loads(filled.to_json_best_effort())  # tuples as lists, as in config.json


def _differences(saved: dict, wanted: dict, prefix: str) -> list[tuple[str, tuple[Any, Any]]]:
    found = []
    for key in sorted(set(saved) | set(wanted)):
        if f"{prefix}{key}" in default_config.RETIRED_KEYS:
            continue
        a, b = saved.get(key), wanted.get(key)
        if isinstance(a, dict) and isinstance(b, dict):
            found += _differences(a, b, f"{prefix}{key}.")
        elif a != b:
            found.append((f"{prefix}{key}", (a, b)))
    return found
