"""What a saved model needs of the data it was trained on: its eval preprocessing record and
the check that a dataset has the model's class count.

The record (``model.json``'s ``"preprocessing"``, `preprocessing_record`) says how an image
becomes the model's input (`transforms.eval_image`: mode, image size, resize and crop, mean,
std); `apply_preprocessing_record` puts it back into a config.  A fact of a saved model, not
of one command: convert writes it, inference reads it, predict, evaluate and export print it,
all from here.  At import time this module needs only `config_validation.ConfigError`;
the data package (TensorFlow) is imported inside the functions that use it.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from skipnet_jax.config_validation import ConfigError
from skipnet_jax.default_config import PREPROCESSINGS

__all__ = [
    "PREPROCESSING_KEY",
    "apply_preprocessing_record",
    "check_dataset_classes",
    "dataset_class_names",
    "describe_preprocessing",
    "eval_preprocessing",
    "preprocessing_record",
]

# Key of model.json (`convert.save_variables`) that holds `preprocessing_record`.
PREPROCESSING_KEY = "preprocessing"


def eval_preprocessing(config) -> tuple[str, tuple[float, ...], tuple[float, ...]]:
    """``(mode, mean, std)`` of ``config.dataset``'s eval pipeline (`pipeline.eval_preprocessing`)."""
    from skipnet_jax.data import pipeline

    try:
        return pipeline.eval_preprocessing(config)
    except ValueError as e:  # unknown dataset names, bad data settings
        raise ConfigError(str(e).splitlines()[0]) from None


def _record(mode: str, image_size: int, mean: Sequence[float], std: Sequence[float]) -> dict[str, Any]:
    """The record of `preprocessing_record`: the fields `preprocess_image` reads (mode, image
    size, mean, std) plus the resize and crop they imply, spelled out for other tools."""
    from skipnet_jax.data import inception

    record: dict[str, Any] = {"mode": mode, "image_size": int(image_size)}
    if mode == "inception":
        record["resize_shorter_side"] = inception.eval_resize_size(int(image_size))
        record["crop"] = "center"
    else:
        record["crop"] = "center_square"  # then resized to image_size
    return record | {"mean": [float(m) for m in mean], "std": [float(s) for s in std]}


def preprocessing_record(config) -> dict[str, Any]:
    """JSON-ready eval preprocessing of `config`'s model, as model.json records it.

    For the ImageNet eval preprocessing at 224 px: ``{"mode": "inception", "image_size":
    224, "resize_shorter_side": 256, "crop": "center", "mean": [...], "std": [...]}``
    (mean/std of pixels in [0, 1], per RGB channel).
    """
    mode, mean, std = eval_preprocessing(config)
    return _record(mode, config.image_size, mean, std)


def describe_preprocessing(record: Mapping[str, Any]) -> str:
    """One line for people: ``shorter side 256, centre crop 224, mean (...), std (...)``."""
    size = record["image_size"]
    if record["mode"] == "inception":
        steps = f"shorter side {record['resize_shorter_side']}, centre crop {size}"
    else:
        steps = f"centre square, resize to {size}"
    numbers = ", ".join(f"{v:g}" for v in record["mean"]), ", ".join(f"{v:g}" for v in record["std"])
    return f"{steps}, mean ({numbers[0]}), std ({numbers[1]})"


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _checked_record(record: Any, where: str) -> dict[str, Any]:
    """`record` if it is one `_record` writes, else `ConfigError` naming the key in `where`."""

    if not isinstance(record, Mapping):
        raise ConfigError(f"{where}: '{PREPROCESSING_KEY}' must be an object, got {record!r}")
    modes = [mode for mode in PREPROCESSINGS if mode != "auto"]  # a record names the one used
    checks = {
        "mode": (lambda v: v in modes, f"one of {', '.join(modes)}"),
        "image_size": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "a positive integer"),
        "mean": (lambda v: isinstance(v, list) and len(v) == 3 and all(map(_is_number, v)), "a list of 3 numbers"),
        "std": (
            lambda v: isinstance(v, list) and len(v) == 3 and all(_is_number(x) and x > 0 for x in v),
            "a list of 3 numbers > 0",
        ),
    }
    for key, (ok, what) in checks.items():
        if key not in record or not ok(record[key]):
            raise ConfigError(f"{where}: {PREPROCESSING_KEY}.{key}={record.get(key)!r} is not valid; it must be {what}")
    implied = _record(record["mode"], record["image_size"], record["mean"], record["std"])
    for key, value in record.items():
        if key not in implied:
            raise ConfigError(f"{where}: unknown key {PREPROCESSING_KEY}.{key}; valid keys: {', '.join(implied)}")
        if value != implied[key]:  # the derived fields must say what preprocess_image does
            raise ConfigError(
                f"{where}: {PREPROCESSING_KEY}.{key}={value!r} does not fit mode {record['mode']!r} at "
                f"image_size {record['image_size']}, which uses {implied[key]!r}"
            )
    return implied


def apply_preprocessing_record(config, record: Any, where: str) -> None:
    """Sets ``config.image_size`` and ``config.data.preprocessing / mean / std`` from a record
    of `preprocessing_record`, so that the eval pipeline and `preprocess_image` prepare
    images as the model was trained for.  `where` (the file) names a bad record's error."""
    record = _checked_record(record, where)
    config.image_size = record["image_size"]
    config.data.preprocessing = record["mode"]
    config.data.mean = tuple(record["mean"])
    config.data.std = tuple(record["std"])


def dataset_class_names(config) -> tuple[str, ...] | None:
    """Class names of ``config.dataset`` without its data: an image folder's class
    directories, or TFDS's metadata (nothing is downloaded or prepared; ImageNet's WordNet
    IDs need no data).  None when not even their count is known."""
    from skipnet_jax.data import folder, pipeline

    try:
        if folder.looks_like_path(config.dataset):
            return tuple(pipeline.get_dataset_info(config).class_names)
        import tensorflow_datasets as tfds

        return tuple(tfds.builder(config.dataset, data_dir=config.data_dir).info.features["label"].names)
    except Exception:  # noqa: BLE001 - no names: callers show class indices
        return None


def check_dataset_classes(
    config, num_classes: int, what: str, flag: str = "--config.dataset"
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
