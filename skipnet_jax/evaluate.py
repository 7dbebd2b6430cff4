"""Evaluate a training workdir's latest checkpoint, or a converted checkpoint, on the full eval split.

Command line::

    python -m skipnet_jax.evaluate --workdir DIR [--config CONFIG] [--config.KEY=VALUE ...]

``DIR`` is either

* a training workdir (``DIR/checkpoints/<step>``): the newest readable checkpoint is
  restored with `checkpointing.restore_latest`; the config is ``DIR/config.json`` unless
  ``--config`` names a config file; the EMA weights are used when the run kept them
  (``ema_decay > 0``), exactly as the training loop's evaluation does; or
* a directory written by ``python -m skipnet_jax.convert`` (``DIR/model.json``): the
  model, class count, dataset and eval preprocessing (image size, resize/crop mode,
  mean/std: `predict.preprocessing_record`) come from ``model.json``, everything else
  (data_dir, batch size) from `default_config`; ``--config FILE`` replaces all but the
  model and class count.  A ``model.json`` without ``dataset`` / ``preprocessing`` (as
  earlier versions wrote) takes them from the config too: ``--config.dataset``, default
  ``digits``.

``--config.KEY=VALUE`` overrides apply on top of either (e.g. ``--config.data_dir=...``
or ``--config.eval_batch_size=64``).  A dataset whose class count is not the model's is
an error naming both counts, never a silent mismatch.  The evaluation is
training's: `train.evaluate` over the engine's jitted `steps.eval_step` (top-1, top-5,
cross-entropy and the confusion matrix over every example, the last batch padded and masked).

Writes ``DIR/eval_results.json`` (never ``results.json``) with ``eval_top1``,
``eval_top5``, ``eval_loss``, ``eval_examples``, ``per_class_accuracy``,
``confusion_matrix`` (rows: true class), ``class_names``, ``preprocessing`` and where
the weights came from, and ``DIR/plots/confusion_matrix.png``.  Problems (no checkpoint,
a config that does not fit the checkpoint, a missing dataset) end with one
``error: ...`` line and exit status 2.

`load_model` (used by `predict` and `export` too) returns the model with the weights
that evaluation uses.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import sys
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from skipnet_jax import checkpointing, cli, convert, optim, reporting, train
from skipnet_jax.config_validation import ConfigError, check_num_classes
from skipnet_jax.data import pipeline
from skipnet_jax.default_config import RETIRED_KEYS, get_default_config
from skipnet_jax.engine import build_engine
from skipnet_jax.reporting import CONFIG_FILE, EVAL_RESULTS_FILE

__all__ = [
    "LoadedModel",
    "evaluate_model",
    "evaluate_workdir",
    "is_converted_dir",
    "load_config",
    "load_model",
    "main",
]


@dataclasses.dataclass
class LoadedModel:
    """A model with the weights its evaluation uses.

    ``variables`` is ``{"params", "batch_stats"}``: the EMA weights when the run kept
    them (``use_ema``), else the trained (or converted) ones.
    """

    model: Any
    variables: dict[str, Any]
    config: ml_collections.ConfigDict
    num_classes: int
    kind: str  # "checkpoint" or "converted"
    source: str  # the checkpoint (or converter) directory
    step: int | None
    use_ema: bool
    class_names: tuple[str, ...] | None = None

    def eval_state(self) -> train.TrainState:
        """A `train.TrainState` holding only what `train.eval_step` reads (``use_ema=False``)."""
        return train.TrainState(
            step=jnp.asarray(self.step or 0, jnp.int32),
            params=self.variables["params"],
            batch_stats=self.variables["batch_stats"],
            opt_state={},
            ema_params={},
            ema_batch_stats={},
            loss_state={},
        )

    @functools.cached_property
    def _jitted_logits(self):
        model = self.model

        def logits(variables, images):
            return model.apply(variables, images, train=False)[0]

        return jax.jit(logits)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, num_classes]`` logits of preprocessed ``[N, S, S, 3]`` images (eval mode)."""
        return np.asarray(self._jitted_logits(self.variables, jnp.asarray(images, jnp.float32)))


def is_converted_dir(directory: str) -> bool:
    """True for a directory written by ``python -m skipnet_jax.convert`` (it has model.json)."""
    return os.path.isfile(os.path.join(directory, convert.META_FILE))


def _as_config_value(value: Any) -> Any:
    if isinstance(value, list):  # JSON has no tuples; config sequences are tuples
        return tuple(_as_config_value(v) for v in value)
    return value


def _update_from_json(config: ml_collections.ConfigDict, values: dict, prefix: str = "") -> None:
    for key, value in values.items():
        name = f"{prefix}{key}"
        if key not in config:
            if name in RETIRED_KEYS:  # written by an earlier version; the setting no longer exists
                logging.warning("%s: skipping '%s', which is not a setting: %s", CONFIG_FILE, name, RETIRED_KEYS[name])
                continue
            raise ConfigError(
                f"{CONFIG_FILE} has key '{name}', which this version does not define "
                "(see skipnet_jax/default_config.py); pass --config instead"
            )
        if isinstance(config[key], ml_collections.ConfigDict) and isinstance(value, dict):
            _update_from_json(config[key], value, f"{name}.")
        else:
            try:
                config[key] = _as_config_value(value)
            except TypeError as e:
                raise ConfigError(f"{CONFIG_FILE}: config.{name}={value!r} does not fit the field: {e}") from None


def config_from_json(path: str) -> ml_collections.ConfigDict:
    """The config a training run saved (``WORKDIR/config.json``) on top of the defaults."""
    try:
        with open(path) as f:
            values = json.load(f)
    except FileNotFoundError:
        raise ConfigError(f"{path} is missing; pass --config with the config the run was trained with") from None
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    config = get_default_config()
    _update_from_json(config, values)
    return config


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The default config of `workdir`: its config.json, or for a converted dir the defaults
    with ``model``, ``num_classes``, ``dataset`` and the eval preprocessing from model.json."""
    if is_converted_dir(workdir):
        return _converted_config(workdir)
    return config_from_json(os.path.join(workdir, CONFIG_FILE))


def _converted_config(workdir: str) -> ml_collections.ConfigDict:
    """The defaults with what model.json records about the weights (`convert.save_variables`)."""
    from skipnet_jax import predict

    meta = _read_meta(workdir)
    path = os.path.join(workdir, convert.META_FILE)
    config = get_default_config()
    config.model = meta["model"]
    config.num_classes = int(meta["num_classes"])
    if convert.DATASET_KEY in meta:
        if not isinstance(meta[convert.DATASET_KEY], str) or not meta[convert.DATASET_KEY]:
            raise ConfigError(f"{path}: {convert.DATASET_KEY}={meta[convert.DATASET_KEY]!r} must be a dataset name")
        config.dataset = meta[convert.DATASET_KEY]
    if predict.PREPROCESSING_KEY in meta:
        predict.apply_preprocessing_record(config, meta[predict.PREPROCESSING_KEY], path)
    return config


def _read_meta(directory: str) -> dict:
    path = os.path.join(directory, convert.META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or not {"model", "num_classes"} <= set(meta):
        raise ConfigError(f"{path} must hold 'model' and 'num_classes'")
    return meta


def dataset_class_names(config: ml_collections.ConfigDict) -> tuple[str, ...] | None:
    """Class names of ``config.dataset`` without its data: an image folder's class
    directories, or TFDS's metadata (nothing is downloaded or prepared; ImageNet's WordNet
    IDs need no data).  None when not even their count is known."""
    from skipnet_jax.data import folder

    try:
        if folder.looks_like_path(config.dataset):
            return tuple(pipeline.get_dataset_info(config).class_names)
        import tensorflow_datasets as tfds

        return tuple(tfds.builder(config.dataset, data_dir=config.data_dir).info.features["label"].names)
    except Exception:  # noqa: BLE001 - no names: callers show class indices
        return None


def check_dataset_classes(
    config: ml_collections.ConfigDict, num_classes: int, what: str, flag: str = "--config.dataset"
) -> tuple[str, ...] | None:
    """``config.dataset``'s class names; `ConfigError` when their count is not the model's.

    A model with another class count was trained on another dataset, so its predictions
    would be labelled (and its images normalised) for the wrong one.  `what` names the
    model in the message, `flag` the setting that fixes it.  An unknown count is no error.
    """
    names = dataset_class_names(config)
    if names is not None and len(names) != num_classes:
        raise ConfigError(
            f"{what} has {num_classes} classes but {flag.lstrip('-')}={config.dataset!r} has {len(names)}; "
            f"pass {flag}=<the dataset it was trained on>"
        )
    return names


def load_model(workdir: str, config: ml_collections.ConfigDict | None = None) -> LoadedModel:
    """The model of a training workdir (latest checkpoint) or converted dir, with its eval weights.

    `config` defaults to `load_config(workdir)`.  For a training workdir the dataset's
    metadata is read (it decides the class count and the optimiser-state shapes that
    the checkpoint is restored into).  Raises `ConfigError` with a one-line message.
    """
    workdir = os.path.abspath(workdir)
    if not os.path.isdir(workdir):
        raise ConfigError(f"--workdir {workdir} is not a directory")
    config = (load_config(workdir) if config is None else config).copy_and_resolve_references()
    config.unlock()
    if is_converted_dir(workdir):
        return _load_converted(workdir, config)
    return _load_checkpoint(workdir, config)


def _load_converted(workdir: str, config: ml_collections.ConfigDict) -> LoadedModel:
    meta = _read_meta(workdir)
    if config.model != meta["model"]:
        raise ConfigError(
            f"config.model={config.model!r} but {workdir} holds {meta['model']!r}; "
            f"leave config.model at {meta['model']!r}"
        )
    try:
        variables, meta = convert.load_variables(workdir)
    except convert.ConversionError as e:
        raise ConfigError(str(e)) from None
    num_classes = int(meta["num_classes"])
    if config.num_classes not in (-1, num_classes):
        raise ConfigError(f"config.num_classes={config.num_classes} but {workdir} holds {num_classes} classes")
    config.num_classes = num_classes
    what = f"the model in {workdir}"
    if convert.DATASET_KEY not in meta:
        what += f" (its {convert.META_FILE} names no dataset)"
    class_names = check_dataset_classes(config, num_classes, what)
    variables = {k: jax.tree.map(jnp.asarray, dict(variables.get(k, {}))) for k in ("params", "batch_stats")}
    return LoadedModel(
        model=train.create_model(config, num_classes),
        variables=variables,
        config=config,
        num_classes=num_classes,
        kind="converted",
        source=workdir,
        step=None,
        use_ema=False,
        class_names=class_names,
    )


def _load_checkpoint(workdir: str, config: ml_collections.ConfigDict) -> LoadedModel:
    ckpt_dir = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir) or not any(name.isdigit() for name in os.listdir(ckpt_dir)):
        raise ConfigError(
            f"{workdir} has no checkpoint ({ckpt_dir}/<step>) and no {convert.META_FILE}: "
            "pass a training workdir or a `skipnet_jax.convert` output directory"
        )
    try:
        info = pipeline.get_dataset_info(config)
    except ValueError as e:
        raise ConfigError(str(e).splitlines()[0]) from None
    num_classes = check_num_classes(config, info.num_classes)
    steps_per_epoch, num_train_steps = optim.steps_for(config, info.num_train_examples)
    # The training run's engine: its abstract state has the checkpoint's shapes (optimiser state included).
    engine = build_engine(config, num_classes, steps_per_epoch=steps_per_epoch, num_train_steps=num_train_steps)
    abstract_state = engine.abstract_state()
    manager = checkpointing.create_manager(workdir, keep=config.keep_checkpoints)
    try:
        state = checkpointing.restore_latest(manager, abstract_state, quarantine=False)  # read-only: moves nothing
    except checkpointing.CheckpointMismatchError as e:
        raise ConfigError(str(e)) from None
    finally:
        manager.close()
    if state is None:
        raise ConfigError(f"no readable checkpoint in {ckpt_dir}")
    use_ema = config.ema_decay > 0 and bool(jax.tree.leaves(state.ema_params))
    params, batch_stats = (state.ema_params, state.ema_batch_stats) if use_ema else (state.params, state.batch_stats)
    step = int(state.step)
    return LoadedModel(
        model=engine.model,
        variables={"params": params, "batch_stats": batch_stats},
        config=config,
        num_classes=num_classes,
        kind="checkpoint",
        source=os.path.join(ckpt_dir, str(step)),
        step=step,
        use_ema=use_ema,
        class_names=tuple(info.class_names) if len(info.class_names) == num_classes else None,
    )


def evaluate_model(loaded: LoadedModel) -> dict[str, Any]:
    """`train.evaluate` of `loaded` on ``config.data.eval_split``, plus per-class accuracy."""
    if jax.process_count() > 1:
        raise ConfigError("skipnet_jax.evaluate runs in a single process")
    config = loaded.config
    try:
        info = pipeline.get_dataset_info(config)
    except ValueError as e:  # unknown dataset, data not prepared
        raise ConfigError(str(e).splitlines()[0]) from None
    if info.num_classes != loaded.num_classes:
        raise ConfigError(
            f"the model has {loaded.num_classes} classes but config.dataset={config.dataset!r} has "
            f"{info.num_classes}; choose the dataset it was trained on (--config FILE or --config.dataset=...)"
        )
    # Evaluation never steps the optimiser, so a one-step schedule stands in for the run's; the
    # model is `loaded`'s own (a caller may have built it with settings of its own).
    engine = dataclasses.replace(
        build_engine(config, loaded.num_classes, steps_per_epoch=1, num_train_steps=1), model=loaded.model
    )
    jitted = engine.jitted_eval_step(use_ema=False)  # eval_state() holds the weights to use as its params
    state = jax.device_put(loaded.eval_state(), engine.replicated)
    try:
        metrics, matrix = train.evaluate(jitted, state, config, engine.data_sharding)
    except ValueError as e:  # e.g. a dataset that is not prepared
        raise ConfigError(str(e).splitlines()[0]) from None
    totals = matrix.sum(axis=1)
    per_class = np.where(totals > 0, np.diag(matrix) / np.maximum(totals, 1), np.nan)
    return {
        **metrics,
        "per_class_accuracy": [None if np.isnan(a) else float(a) for a in per_class],
        "confusion_matrix": matrix.tolist(),
    }


def evaluate_workdir(workdir: str, config: ml_collections.ConfigDict | None = None) -> dict[str, Any]:
    """What the CLI does: load, evaluate, write ``eval_results.json`` and the confusion-matrix plot."""
    from skipnet_jax import plots, predict

    start = time.time()
    loaded = load_model(workdir, config)
    config = loaded.config
    results = evaluate_model(loaded)
    class_names = list(loaded.class_names) if loaded.class_names else [str(i) for i in range(loaded.num_classes)]
    results |= {
        "class_names": class_names,
        "model": config.model,
        "dataset": config.dataset,
        "eval_split": config.data.eval_split,
        "image_size": config.image_size,
        "preprocessing": predict.preprocessing_record(config),
        "weights": loaded.kind,
        "source": loaded.source,
        "step": loaded.step,
        "used_ema": loaded.use_ema,
        "wall_seconds": time.time() - start,
    }
    workdir = os.path.abspath(workdir)
    reporting.write_json(os.path.join(workdir, EVAL_RESULTS_FILE), results)
    fig = plots.confusion_matrix_figure(
        np.asarray(results["confusion_matrix"]),
        class_names,
        title=(
            f"{config.model} on {config.dataset}:{config.data.eval_split} "
            f"(top-1 {results['eval_top1']:.4f}, {results['eval_examples']} examples)"
        ),
    )
    plots.save_figure(fig, os.path.join(workdir, plots.PLOTS_SUBDIR, "confusion_matrix.png"))
    return results


# --------------------------------------------------------------------------- command line


def _flag_value(argv: list[str], name: str) -> str | None:
    for i, arg in enumerate(argv):
        if arg == f"--{name}" and i + 1 < len(argv):
            return argv[i + 1]
        if arg.startswith(f"--{name}="):
            return arg.split("=", 1)[1]
    return None


def define_workdir_flags(argv: list[str], workdir_help: str) -> None:
    """Defines ``--workdir`` and ``--config`` (+ ``--config.KEY=VALUE`` overrides).

    ``--config FILE`` loads a config file; without it the overrides apply to
    `load_config(--workdir)` (config.json or the converted dir's model.json), which is
    why the workdir is looked up in `argv` before the flags are parsed.
    """
    from absl import flags
    from ml_collections import config_flags

    flags.DEFINE_string("workdir", None, workdir_help)
    flags.mark_flag_as_required("workdir")
    has_file = any(a == "--config" or a.startswith("--config=") for a in argv[1:])
    workdir = _flag_value(argv[1:], "workdir")
    if has_file or workdir is None:
        config_flags.DEFINE_config_file("config", None, "Config file (default: the workdir's own).", lock_config=True)
        return
    try:
        base = load_config(workdir)
    except ConfigError as e:
        cli.fail(str(e))
    try:  # config_flags applies the --config.KEY=VALUE overrides of argv here already
        config_flags.DEFINE_config_dict(
            "config", base, "The workdir's config; override fields with --config.KEY=VALUE.", lock_config=True
        )
    except (AttributeError, KeyError) as e:
        from skipnet_jax import config_validation

        cli.fail(config_validation.describe_unknown_override(argv) or f"invalid --config override: {e}")
    except (TypeError, ValueError) as e:
        cli.fail(f"invalid --config override: {e}")


def config_from_flags() -> ml_collections.ConfigDict | None:
    """The parsed config, validated; None means "the workdir's own"."""
    from absl import flags

    from skipnet_jax import config_validation, models

    config = flags.FLAGS.config
    if config is None:
        return None
    if is_converted_dir(flags.FLAGS.workdir):
        config = ml_collections.ConfigDict(config)
        config.model = _read_meta(flags.FLAGS.workdir)["model"]  # the weights decide the model
    config_validation.validate_config(config, device_count=jax.device_count(), model_names=models.list_models())
    return config


def quiet_libraries() -> None:
    """Only warnings from other libraries (orbax logs every file operation at INFO)."""
    from absl import logging

    logging.set_verbosity(logging.WARNING)


def main(argv: list[str]) -> None:
    from absl import flags

    if len(argv) > 1:
        cli.fail(f"unexpected arguments {argv[1:]}; settings are passed as --config.KEY=VALUE")
    quiet_libraries()
    try:
        results = evaluate_workdir(flags.FLAGS.workdir, config_from_flags())
    except (ConfigError, OSError) as e:
        cli.fail(str(e))
    print(
        f"{results['model']} ({results['weights']}{', step ' + str(results['step']) if results['step'] is not None else ''}"
        f"{', EMA' if results['used_ema'] else ''}) on {results['dataset']}:{results['eval_split']}"
    )
    print(f"  top-1  {results['eval_top1']:.4f}")
    print(f"  top-5  {results['eval_top5']:.4f}")
    print(f"  loss   {results['eval_loss']:.4f}")
    print(f"  examples {results['eval_examples']}")
    workdir = os.path.abspath(flags.FLAGS.workdir)
    print(
        f"wrote {os.path.join(workdir, EVAL_RESULTS_FILE)} and {os.path.join(workdir, 'plots', 'confusion_matrix.png')}"
    )


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    from absl import app

    define_workdir_flags(sys.argv, "Training workdir (checkpoints/) or `skipnet_jax.convert` output (model.json).")
    app.run(main, flags_parser=cli.parse_absl_flags)
