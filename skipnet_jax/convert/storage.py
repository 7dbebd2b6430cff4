"""A converted checkpoint directory: ``DIR/variables/`` (orbax) and ``DIR/model.json``.

``model.json`` is written last, so a directory with it holds a complete checkpoint; it
names the model, its class count and, when known, the dataset the weights were trained on
and that dataset's eval preprocessing, so that ``predict``, ``evaluate`` and ``export``
prepare images the same way without being told.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Mapping
from typing import Any

from skipnet_jax import cli, reporting
from skipnet_jax.convert.variables import (
    ConversionError,
    abstract_variables,
    array_shape,
    count_values,
    flatten,
    format_shape,
)

__all__ = [
    "DATASET_KEY",
    "META_FILE",
    "RELEASE_DATASET",
    "RELEASE_IMAGE_SIZE",
    "data_config",
    "data_record",
    "load_variables",
    "save_variables",
]

VARIABLES_SUBDIR = "variables"
META_FILE = "model.json"
# Key of model.json naming the dataset the weights were trained on (`data_config`).
DATASET_KEY = "dataset"
# What the release's weights were trained on: ImageNet at 224 px.
RELEASE_DATASET = "imagenet2012"
RELEASE_IMAGE_SIZE = 224
FORMAT = "orbax.checkpoint.StandardCheckpointer"


def data_config(dataset: str = RELEASE_DATASET, image_size: int = RELEASE_IMAGE_SIZE):
    """The default config with `dataset` and `image_size`: what `save_variables` records for
    weights trained on them (the dataset's own eval preprocessing at that size)."""
    from skipnet_jax.default_config import get_default_config

    config = get_default_config()
    config.dataset = dataset
    config.image_size = image_size
    return config


def data_record(data_config) -> dict[str, Any]:
    """``{"dataset", "preprocessing"}`` of model.json for `data_config`."""
    from skipnet_jax import model_data
    from skipnet_jax.config_validation import ConfigError

    try:
        return {
            DATASET_KEY: data_config.dataset,
            model_data.PREPROCESSING_KEY: model_data.preprocessing_record(data_config),
        }
    except ConfigError as e:
        raise ConversionError(str(e)) from None


def save_variables(
    variables: Mapping[str, Any],
    output_dir: str | os.PathLike,
    *,
    model_name: str,
    num_classes: int,
    source: str | None = None,
    overwrite: bool = False,
    data_config=None,
) -> str:
    """Write ``variables`` to ``output_dir`` (orbax ``StandardCheckpointer``) plus ``model.json``.

    ``data_config`` (a config, e.g. `data_config` or the training run's) names the dataset
    the weights were trained on and their image size and preprocessing settings; its
    dataset and eval preprocessing are recorded in ``model.json``, from where `evaluate`,
    `predict` and `export` take them.  None records neither (they then come from the
    config those are given, default ``digits``).

    Refuses (``ConversionError``) when ``output_dir`` exists and is not empty, unless
    ``overwrite``; then only this function's own entries (``variables/``,
    ``model.json``) are replaced.  Returns the absolute output directory.
    """
    import orbax.checkpoint as ocp

    record = data_record(data_config) if data_config is not None else {}
    out = os.path.abspath(os.fspath(output_dir))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConversionError(f"output {out} exists and is not a directory")
    if os.path.isdir(out) and os.listdir(out) and not overwrite:
        raise ConversionError(f"output directory {out} is not empty; pass --overwrite to replace it")
    tree = {
        "params": dict(variables.get("params", {})),
        "batch_stats": dict(variables.get("batch_stats", {})),
    }
    meta_path = os.path.join(out, META_FILE)
    ckpt_path = os.path.join(out, VARIABLES_SUBDIR)
    try:
        os.makedirs(out, exist_ok=True)
        if os.path.exists(meta_path):
            os.remove(meta_path)
        if os.path.isdir(ckpt_path):
            shutil.rmtree(ckpt_path)
        checkpointer = ocp.StandardCheckpointer()
        try:
            checkpointer.save(ckpt_path, tree)
            checkpointer.wait_until_finished()
        finally:
            checkpointer.close()
        meta = {
            "model": model_name,
            "num_classes": int(num_classes),
            **record,
            "source": source,
            "num_params": count_values(tree["params"]),
            "num_batch_stats": count_values(tree["batch_stats"]),
            "format": FORMAT,
        }
        with reporting.atomic_write(meta_path) as f:  # written last: its presence marks a complete checkpoint
            json.dump(meta, f, indent=2)
            f.write("\n")
    except OSError as e:
        raise ConversionError(f"cannot write {out}: {e.strerror or e}") from None
    return out


def load_variables(output_dir: str | os.PathLike) -> tuple[dict[str, Any], dict[str, Any]]:
    """Read a directory written by :func:`save_variables`: ``(variables, meta)``.

    ``variables`` is ``{"params": ..., "batch_stats": ...}`` of host (numpy) arrays, as
    orbax restores them for a target without shardings (place or shard them as the caller
    needs, e.g. ``jax.device_put``); they are restored into
    the structure, shapes and dtypes of ``meta["model"]`` with ``meta["num_classes"]``
    (so a checkpoint that does not fit the registered model fails here, with one line).
    ``meta`` is the content of ``model.json``.
    """
    import orbax.checkpoint as ocp

    out = os.path.abspath(os.fspath(output_dir))
    meta_path = os.path.join(out, META_FILE)
    try:
        with open(meta_path) as f:
            meta = json.load(f)
    except FileNotFoundError:
        raise ConversionError(f"{out} is not a converted checkpoint: {META_FILE} is missing") from None
    except (OSError, ValueError) as e:
        raise ConversionError(f"cannot read {meta_path}: {cli.first_line(e)}") from None
    if not isinstance(meta, dict) or not {"model", "num_classes"} <= set(meta):
        raise ConversionError(f"{meta_path} must hold 'model' and 'num_classes'")
    try:
        abstract = abstract_variables(meta["model"], int(meta["num_classes"]))
    except ValueError as e:
        raise ConversionError(f"{meta_path}: {cli.first_line(e)}") from None
    abstract = {k: abstract.get(k, {}) for k in ("params", "batch_stats")}
    checkpointer = ocp.StandardCheckpointer()
    try:
        restored = checkpointer.restore(os.path.join(out, VARIABLES_SUBDIR), abstract)
    except Exception as e:  # noqa: BLE001 - orbax raises many types; report one line
        raise ConversionError(
            f"cannot restore {os.path.join(out, VARIABLES_SUBDIR)} as {meta['model']} "
            f"({meta['num_classes']} classes): {cli.first_line(e) or type(e).__name__}"
        ) from None
    finally:
        checkpointer.close()
    variables = {k: dict(v) for k, v in dict(restored).items()}
    want, got = flatten(abstract), flatten(variables)
    wrong = [
        f"{'/'.join(p)} {format_shape(array_shape(got[p]))} != expected {format_shape(tuple(w.shape))}"
        for p, w in want.items()
        if p in got and array_shape(got[p]) != tuple(w.shape)
    ]
    wrong += [f"{'/'.join(p)} missing" for p in want if p not in got]
    if wrong:
        raise ConversionError(
            f"cannot restore {os.path.join(out, VARIABLES_SUBDIR)} as {meta['model']} "
            f"({meta['num_classes']} classes): " + ", ".join(wrong)
        )
    return variables, meta
