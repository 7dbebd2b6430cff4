"""What ``config.dataset`` names, and what of it is already in ``config.data_dir``.

A dataset is either an image folder (a path; see `folder`) or a TFDS
image-classification builder.  Of the TFDS ones, two kinds can be prepared
without network access (by `preparation.prepare_dataset`): the bundled
``digits`` and the ImageNet variants, which TFDS builds from the official tars
in a manual dir.  Everything here only reads: looking a dataset up never
prepares or writes anything, so read-only tools (evaluate, predict, export)
can use it on a data_dir they must not change.
"""

from __future__ import annotations

import difflib
import os
import weakref

import ml_collections
import tensorflow_datasets as tfds

from skipnet_jax import config_validation, default_config
from skipnet_jax.data import digits as _digits  # noqa: F401 (registers "digits")
from skipnet_jax.data import folder, preprocess, tf_setup

# Datasets that need no download: prepared on the first training run.
AUTO_PREPARE = frozenset({"digits"})
# TFDS datasets prepared from manually downloaded files -> the files TFDS reads
# from the manual dir (all imagenet2012 variants read the official tars).
MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}


class DataNotFoundError(FileNotFoundError, ValueError):
    """The dataset's files are missing (a ValueError too: the CLI reports it as a config error)."""


# The configs `complete` returned (frozen): given one of them again, it returns it as it is.
_COMPLETED: weakref.WeakSet = weakref.WeakSet()


def complete(config) -> ml_collections.FrozenConfigDict:
    """`config` with the schema's value for every field it lacks and ``config.data`` validated,
    frozen.  Every public function of the data package starts with it; a command completes its
    config once and passes the result on (``train`` as ``_Run.data_config``, ``evaluate`` /
    ``predict`` / ``export`` as `inference.LoadedModel.data_config`), which is then used as it
    is: completed and validated once per command."""
    if isinstance(config, ml_collections.FrozenConfigDict) and config in _COMPLETED:
        return config
    completed = ml_collections.FrozenConfigDict(default_config.with_defaults(config))
    config_validation.validate_data_config(completed)
    _COMPLETED.add(completed)
    return completed


def is_folder(config) -> bool:
    return folder.looks_like_path(config.dataset)


def is_imagenet(dataset: str) -> bool:
    """An ImageNet variant (natural images of ImageNet's classes and statistics)."""
    return preprocess.base_name(dataset) in MANUAL_FILES


def tfds_builder(config) -> tfds.core.DatasetBuilder:
    """The TFDS builder of ``config.dataset`` in ``config.data_dir``, prepared or not.

    Raises ValueError (one line) for an unknown name or a dataset that is not
    image classification.
    """
    tf_setup.configure_tensorflow()
    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(unknown_dataset_message(name)) from None
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
        raise ValueError(
            f"config.dataset={name!r} is not an image-classification dataset: it"
            f" needs 'image' and 'label' features, has {sorted(features.keys())}"
        )
    return builder


def unknown_dataset_message(name: str) -> str:
    known = ["digits", *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(preprocess.base_name(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown dataset: config.dataset={name!r}.{hint} Choices: 'digits'"
        " (bundled, no download), a prepared TFDS image-classification"
        " dataset such as 'cifar10', 'cifar100', 'mnist' or 'imagenet2012',"
        " or an image-folder path (root/train/<class>/*.jpg, root/val/...)."
    )


def not_prepared_message(builder: tfds.core.DatasetBuilder) -> str:
    """One line: the dataset is not in its data_dir, and how to put it there."""
    name = builder.name
    if name in AUTO_PREPARE or name in MANUAL_FILES:
        root = os.fspath(builder.data_dir_root)
        source = "no download" if name in AUTO_PREPARE else f"from {' and '.join(MANUAL_FILES[name])} in manual_dir"
        return (
            f"config.dataset={name!r} is not prepared in data_dir {root!r}; prepare it ({source}) with"
            f" `python -m skipnet_jax.data.prepare --config=CONFIG --config.data_dir={root}`,"
            " or run training once, which prepares it"
        )
    return (
        f"config.dataset={name!r} has no prepared data at"
        f" {builder.data_dir!r}; prepare it first, e.g. `tfds build"
        f" {name} --data_dir=...` (needs network access)"
    )


def num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Split size from the dataset metadata (or the reader where it has none).

    Raises `DataNotFoundError` (`not_prepared_message`) when the dataset is
    not prepared; reads nothing but metadata and creates nothing.
    """
    try:
        return builder.info.splits[split].num_examples
    except KeyError:
        pass
    # No recorded split metadata: either the dataset is not prepared, or the
    # metadata is not available (e.g. `tfds.testing.mock_data`), in which case
    # the TFDS reader still knows its cardinality.
    try:
        cardinality = int(builder.as_dataset(split=split).cardinality())
    except AssertionError as err:  # TFDS's "could not find data in ...".
        raise DataNotFoundError(not_prepared_message(builder)) from err
    if cardinality < 0:
        raise ValueError(f"cannot determine the size of {builder.name} {split!r}")
    return cardinality
