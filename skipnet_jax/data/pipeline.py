"""Deterministic, resumable, multi-process input pipeline: the public API.

The training loop calls `get_dataset_info`, `create_train_iterator`,
`create_eval_iterator` and `num_eval_batches` (after
`preparation.prepare_dataset`, the only function that writes data).  They serve
the bundled ``digits`` dataset (see `skipnet_jax.data.digits`), any prepared
TFDS image-classification dataset (``cifar10``, ``mnist``, ``imagenet2012``,
...) and a user's image folder (``config.dataset`` is a directory path, see
`folder`) through one code path: an index stream (`streams`), mapped to
examples read by index (`sources`) and transformed (`transforms`).

Train stream contract (exact resume and multi-host equivalence rely on it):

* One GLOBAL example stream.  Epoch ``e`` visits the train split in the order
  of a permutation drawn from ``(seed, e)`` alone; stream position
  ``p = e * L + offset`` names the example ``perm_e[offset]``, where the epoch
  length ``L`` is ``N`` (every example; batches run on across epoch
  boundaries) or, with ``config.data.drop_remainder``, ``floor(N/B) * B``
  (whole batches only; the last ``N mod B`` examples of each permutation are
  skipped, like PyTorch's ``drop_last``).
* Global batch ``g`` is positions ``[g*B, (g+1)*B)`` (``B = batch_size``).
  Process ``k`` of ``P`` yields rows ``[k*b, (k+1)*b)`` of it (``b = B/P``),
  so concatenating the processes' batches gives the one-process batch.
* Augmentation randomness is a stateless function of ``(seed, e, offset)``,
  never of iterator state.
* ``start_step=s`` starts at global batch ``s``.  The stream is built from
  integer indices and only then mapped to images, so skipped examples are
  never read, decoded or augmented; the skip is O(1).

A full per-epoch permutation is a perfect shuffle, so no shuffle buffer is
used.  Exactness holds for a fixed TensorFlow version: the stateless shuffle
and random ops are only guaranteed stable within one (tensorflow is pinned).

Eval: the whole split in order, the last global batch padded with
``mask == 0`` rows, ``ceil(N / eval_batch_size)`` batches on every process.

The process layout is an argument (``process_index``, ``process_count``) of
every function that depends on it, never looked up here.  Every public
function starts with `datasets.complete`: a config that lacks some fields (built
by hand, not from the schema) gets them from `default_config.with_defaults`, the
``config.data`` fields are validated by `config_validation.validate_data_config`,
and the result is frozen; given such a completed config again (a command passes the
one it completed on), it is used as it is.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from collections.abc import Iterator

import numpy as np
import tensorflow as tf

from skipnet_jax import config_validation
from skipnet_jax.data import bad_files, datasets, folder, preprocess, sources, streams, tf_setup, transforms
from skipnet_jax.data.bad_files import MAX_CONSECUTIVE_BAD_FILES, pop_bad_files
from skipnet_jax.data.datasets import DataNotFoundError
from skipnet_jax.data.tf_setup import automatic_num_threads
from skipnet_jax.data.transforms import IMAGENET_MEAN, IMAGENET_STD, PREPROCESSINGS
from skipnet_jax.default_config import BAD_IMAGE_POLICIES

__all__ = [
    "BAD_IMAGE_POLICIES",
    "IMAGENET_MEAN",
    "IMAGENET_STD",
    "MAX_CONSECUTIVE_BAD_FILES",
    "PREPROCESSINGS",
    "DataNotFoundError",
    "DatasetInfo",
    "automatic_num_threads",
    "create_eval_iterator",
    "create_train_iterator",
    "eval_preprocessing",
    "get_dataset_info",
    "num_eval_batches",
    "pop_bad_files",
]

Batch = dict[str, np.ndarray]
Example = dict[str, tf.Tensor]


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
    """Static facts about the configured dataset that the model/loop need."""

    name: str
    num_classes: int
    num_train_examples: int
    num_eval_examples: int
    class_names: tuple[str, ...]
    train_split: str
    eval_split: str
    empty_class_dirs: tuple[str, ...] = ()  # image folders: train class dirs with no images


def get_dataset_info(config) -> DatasetInfo:
    """Returns class and split facts of ``config.dataset``, reading only what is prepared.

    Also validates the ``config.data`` fields, and that ``data.drop_remainder``
    leaves at least one whole train batch.  A TFDS dataset that is not prepared
    in ``config.data_dir`` is a `DataNotFoundError` (one line: the dataset, the
    data_dir and how to prepare it); nothing is written.
    """
    config = datasets.complete(config)
    info = _dataset_info(config)
    if config.data.drop_remainder and info.num_train_examples < config.batch_size:
        raise config_validation.ConfigError(
            f"config.data.drop_remainder=True drops every train batch: split {info.train_split!r} has "
            f"{info.num_train_examples} examples, fewer than batch_size={config.batch_size}; set a smaller "
            "batch_size or data.drop_remainder=False"
        )
    return info


def _dataset_info(config) -> DatasetInfo:
    if datasets.is_folder(config):
        train = folder.load_split(config.dataset, config.data.train_split)
        evals = folder.load_split(config.dataset, config.data.eval_split)
        class_names = folder.class_names(config.dataset)
        bad_files.check_empty_class_dirs(train.empty_class_dirs, config.data.bad_images)
        return DatasetInfo(
            name=config.dataset,
            num_classes=len(class_names),
            num_train_examples=len(train.paths),
            num_eval_examples=len(evals.paths),
            class_names=class_names,
            train_split=config.data.train_split,
            eval_split=config.data.eval_split,
            empty_class_dirs=train.empty_class_dirs,
        )
    builder = datasets.tfds_builder(config)
    label = builder.info.features["label"]
    return DatasetInfo(
        name=config.dataset,
        num_classes=label.num_classes,
        num_train_examples=datasets.num_examples(builder, config.data.train_split),
        num_eval_examples=datasets.num_examples(builder, config.data.eval_split),
        class_names=tuple(label.names),
        train_split=config.data.train_split,
        eval_split=config.data.eval_split,
    )


def num_eval_batches(config) -> int:
    """``ceil(N_eval / eval_batch_size)``: the same on every process."""
    config = datasets.complete(config)
    return math.ceil(sources.split_size(config, config.data.eval_split) / config.eval_batch_size)


def eval_preprocessing(config) -> tuple[str, preprocess.Stats, preprocess.Stats]:
    """``(mode, mean, std)`` with which the eval split of ``config.dataset`` is prepared.

    For code that preprocesses single images the way evaluation does (predict,
    export checks; `transforms.eval_image`).  Reads dataset metadata only: the
    data need not be prepared.
    """
    config = datasets.complete(config)
    image_shape = None
    if config.data.preprocessing == "auto" and not datasets.is_folder(config):
        image_shape = datasets.tfds_builder(config).info.features["image"].shape
    mode = transforms.resolve_preprocessing(config, image_shape)
    mean, std = transforms.normalization(config, mode)
    return mode, mean, std


def create_train_iterator(
    config, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Infinite train iterator of this process, starting at global batch `start_step`.

    Yields ``{"image": float32 [b, S, S, 3], "label": int32 [b]}`` with
    ``b = config.batch_size // process_count`` and ``S = config.image_size``.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    config = datasets.complete(config)
    local_batch = streams.local_batch_size("batch_size", config.batch_size, process_index, process_count)
    source = sources.open_source(config, config.data.train_split)
    mean, std = transforms.normalization(config, source.preprocessing)
    to_tensor = functools.partial(
        transforms.train_image,
        mode=source.preprocessing,
        size=config.image_size,
        mean=mean,
        std=std,
        augment=transforms.augmentation(config),
    )

    def load_index(index: tf.Tensor, seed: tf.Tensor) -> Example:
        image, label = source.lookup(index)
        return {"image": to_tensor(image, seed), "label": label}

    def load(element: Example) -> Example:
        seed = streams.augment_seed(config.seed, element["epoch"], element["offset"])
        if not source.may_fail:
            return load_index(element["index"], seed)
        return bad_files.readable_train_example(
            lambda index: load_index(index, seed), element["index"], source.num_examples, config.image_size
        )

    stream = streams.train_stream(
        source.num_examples, config.batch_size, start_step, config.seed, drop_remainder=config.data.drop_remainder
    )
    stream = streams.process_rows(stream, config.batch_size, local_batch, process_index, process_count)
    return _finish(stream.map(load, **tf_setup.PARALLEL), local_batch, config)


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """One ordered pass over the eval split, padded to whole global batches.

    Yields `num_eval_batches(config)` batches of ``{"image", "label",
    "mask"}``, ``b = config.eval_batch_size // process_count`` rows each;
    ``mask`` is 1.0 for real examples and 0.0 for padding (zero image,
    label 0), so every example counts exactly once across all processes.
    """
    config = datasets.complete(config)
    local_batch = streams.local_batch_size("eval_batch_size", config.eval_batch_size, process_index, process_count)
    source = sources.open_source(config, config.data.eval_split)
    mean, std = transforms.normalization(config, source.preprocessing)
    num = source.num_examples

    def load_index(index: tf.Tensor) -> Example:
        image, label = source.lookup(index)
        return {
            "image": transforms.eval_image(image, source.preprocessing, config.image_size, mean, std),
            "label": label,
        }

    def load(element: Example) -> Example:
        is_real = element["position"] < num
        index = tf.minimum(element["position"], num - 1)
        if source.may_fail:
            example, is_real = bad_files.readable_eval_example(load_index, index, is_real, config.image_size)
        else:
            example = load_index(index)
        image, label = example["image"], example["label"]
        return {
            **example,
            "image": tf.where(is_real, image, tf.zeros_like(image)),
            "label": tf.where(is_real, label, tf.zeros_like(label)),
            "mask": tf.cast(is_real, tf.float32),
        }

    positions = streams.eval_stream(num, config.eval_batch_size)
    positions = streams.process_rows(positions, config.eval_batch_size, local_batch, process_index, process_count)
    return _finish(positions.map(load, **tf_setup.PARALLEL), local_batch, config)


def _finish(ds: tf.data.Dataset, local_batch: int, config) -> Iterator[Batch]:
    """Batches, prefetches and applies the determinism/threading options.

    ``config.data.prefetch`` batches are prefetched: 0 disables it, a negative
    value lets tf.data autotune.
    """
    ds = ds.batch(local_batch, drop_remainder=True)
    if config.data.prefetch:
        prefetch = config.data.prefetch
        ds = ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)
    return ds.with_options(tf_setup.options(config)).as_numpy_iterator()
