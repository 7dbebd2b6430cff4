"""Loading a model with the weights its evaluation uses, from a training workdir or a
`skipnet_jax.convert` output directory.

`load_model` is what evaluate, predict and export start from: for a workdir, the newest
readable checkpoint (restored read-only: nothing is moved), the EMA weights when the run
kept them, the config from ``config.json`` unless one is given; for a converted
directory, the model, class count, dataset and eval preprocessing recorded in
``model.json``.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging

from skipnet_jax import checkpointing, convert, model_data, optim, steps
from skipnet_jax.config_validation import ConfigError, check_num_classes
from skipnet_jax.data import datasets, pipeline
from skipnet_jax.default_config import RETIRED_KEYS, get_default_config
from skipnet_jax.engine import EvalEngine, build_engine, build_eval_engine
from skipnet_jax.model_data import check_dataset_classes, dataset_class_names
from skipnet_jax.reporting import CONFIG_FILE

__all__ = [
    "LoadedModel",
    "check_dataset_classes",
    "check_model_dir",
    "config_from_json",
    "dataset_class_names",
    "is_converted_dir",
    "load_config",
    "load_model",
    "read_meta",
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
    # `config` completed for the data package (`datasets.complete`), once; from `config` if not given.
    data_config: Any = None

    def __post_init__(self):
        if self.data_config is None:
            self.data_config = datasets.complete(self.config)

    def eval_state(self) -> steps.TrainState:
        """A `steps.TrainState` holding only what `steps.eval_step` reads (``use_ema=False``)."""
        return steps.TrainState(
            step=jnp.asarray(self.step or 0, jnp.int32),
            params=self.variables["params"],
            batch_stats=self.variables["batch_stats"],
            opt_state={},
            ema_params={},
            ema_batch_stats={},
            loss_state={},
        )

    @functools.cached_property
    def engine(self) -> EvalEngine:
        return build_eval_engine(self.model)

    def logits(self, images: np.ndarray) -> np.ndarray:
        """float32 ``[N, num_classes]`` logits of preprocessed ``[N, S, S, 3]`` images (eval mode)."""
        return np.asarray(self.engine.jitted_logits()(self.variables, jnp.asarray(images, jnp.float32)))


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


def check_model_dir(workdir: str) -> None:
    """`ConfigError` unless `workdir` is a directory holding a model: a training run's
    config.json or checkpoints, or a converted directory's model.json."""
    if not os.path.isdir(workdir):
        what = "does not exist" if not os.path.exists(workdir) else "is a file"
        raise ConfigError(f"--workdir {workdir} is not a directory (it {what})")
    markers = (CONFIG_FILE, checkpointing.CHECKPOINTS_SUBDIR, convert.META_FILE)
    if not any(os.path.exists(os.path.join(workdir, name)) for name in markers):
        raise ConfigError(
            f"--workdir {workdir} holds no model: no {CONFIG_FILE} or {checkpointing.CHECKPOINTS_SUBDIR}/ "
            f"(a training workdir) and no {convert.META_FILE} (a `skipnet_jax.convert` output directory)"
        )


def load_config(workdir: str) -> ml_collections.ConfigDict:
    """The default config of `workdir`: its config.json, or for a converted dir the defaults
    with ``model``, ``num_classes``, ``dataset`` and the eval preprocessing from model.json."""
    check_model_dir(workdir)
    if is_converted_dir(workdir):
        return _converted_config(workdir)
    return config_from_json(os.path.join(workdir, CONFIG_FILE))


def _converted_config(workdir: str) -> ml_collections.ConfigDict:
    """The defaults with what model.json records about the weights (`convert.save_variables`)."""
    meta = read_meta(workdir)
    path = os.path.join(workdir, convert.META_FILE)
    config = get_default_config()
    config.model = meta["model"]
    config.num_classes = int(meta["num_classes"])
    if convert.DATASET_KEY in meta:
        if not isinstance(meta[convert.DATASET_KEY], str) or not meta[convert.DATASET_KEY]:
            raise ConfigError(f"{path}: {convert.DATASET_KEY}={meta[convert.DATASET_KEY]!r} must be a dataset name")
        config.dataset = meta[convert.DATASET_KEY]
    if model_data.PREPROCESSING_KEY in meta:
        model_data.apply_preprocessing_record(config, meta[model_data.PREPROCESSING_KEY], path)
    return config


def read_meta(directory: str) -> dict:
    path = os.path.join(directory, convert.META_FILE)
    try:
        with open(path) as f:
            meta = json.load(f)
    except (OSError, ValueError) as e:
        raise ConfigError(f"cannot read {path}: {str(e).splitlines()[0]}") from None
    if not isinstance(meta, dict) or not {"model", "num_classes"} <= set(meta):
        raise ConfigError(f"{path} must hold 'model' and 'num_classes'")
    return meta


def load_model(workdir: str, config: ml_collections.ConfigDict | None = None) -> LoadedModel:
    """The model of a training workdir (latest checkpoint) or converted dir, with its eval weights.

    `config` defaults to `load_config(workdir)`.  For a training workdir the dataset's
    metadata is read (it decides the class count and the optimiser-state shapes that
    the checkpoint is restored into).  Raises `ConfigError` with a one-line message.
    """
    workdir = os.path.abspath(workdir)
    check_model_dir(workdir)
    config = (load_config(workdir) if config is None else config).copy_and_resolve_references()
    config.unlock()
    if is_converted_dir(workdir):
        return _load_converted(workdir, config)
    return _load_checkpoint(workdir, config)


def _load_converted(workdir: str, config: ml_collections.ConfigDict) -> LoadedModel:
    meta = read_meta(workdir)
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
    data_config = datasets.complete(config)
    what = f"the model in {workdir}"
    if convert.DATASET_KEY not in meta:
        what += f" (its {convert.META_FILE} names no dataset)"
    class_names = check_dataset_classes(data_config, num_classes, what)
    variables = {k: jax.tree.map(jnp.asarray, dict(variables.get(k, {}))) for k in ("params", "batch_stats")}
    return LoadedModel(
        model=steps.create_model(config, num_classes),
        variables=variables,
        config=config,
        num_classes=num_classes,
        kind="converted",
        source=workdir,
        step=None,
        use_ema=False,
        class_names=class_names,
        data_config=data_config,
    )


def _load_checkpoint(workdir: str, config: ml_collections.ConfigDict) -> LoadedModel:
    ckpt_dir = checkpointing.checkpoint_dir(workdir)
    if not os.path.isdir(ckpt_dir) or not any(name.isdigit() for name in os.listdir(ckpt_dir)):
        raise ConfigError(
            f"{workdir} has no checkpoint ({ckpt_dir}/<step>) and no {convert.META_FILE}: "
            "pass a training workdir or a `skipnet_jax.convert` output directory"
        )
    try:
        data_config = datasets.complete(config)
        info = pipeline.get_dataset_info(data_config)
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
        data_config=data_config,
    )
