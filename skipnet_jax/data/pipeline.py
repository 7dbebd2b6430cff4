"""Deterministic, resumable, multi-process TFDS input pipeline.

The training loop calls four functions: `get_dataset_info`,
`create_train_iterator`, `create_eval_iterator` and `num_eval_batches`.  They
serve the bundled ``digits`` dataset (see `skipnet_jax.data.digits`) and any
prepared TFDS image-classification dataset (``cifar10``, ``mnist``, ...)
through one code path.

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

Examples are read by index, either from an in-memory copy of the decoded
split (``config.data.cache=True``; small fixed-shape datasets), through TFDS
random access (``as_data_source``; needs an ``array_record``/``parquet``
preparation; "inception" datasets are read still encoded), or from an image
folder's file list.  Variable-size datasets and folders are never cached.
A full per-epoch permutation is a perfect shuffle, so no shuffle buffer is
used.

Every public function reads the config's fields directly; a config that
lacks some (built by hand, not from the schema) gets them from
`default_config.with_defaults`, and the ``config.data`` fields are validated
by `config_validation.validate_data_config`.

Datasets: the bundled ``digits``; any TFDS image-classification dataset
(``cifar10``, ``mnist``, ...); ``imagenet2012`` (prepared by TFDS from the
official tars in ``config.data.manual_dir``, see `_builder`); and a user's
image folder (``config.dataset`` is a directory path, see `folder`), whose
files are listed once and then read and decoded lazily, like any other
example, inside the same index stream.

Two per-example preprocessings (``config.data.preprocessing``; "auto" picks
"inception" for image folders, ImageNet and any dataset whose images are
variable-size or larger than ``_SMALL_IMAGE_SIDE`` px, else "simple"):

* "simple" (small images): uint8 -> float ``[0, 1]``, grayscale repeated to
  RGB, bilinear (antialiased) resize to ``image_size`` x ``image_size``,
  train-only augmentation (`preprocess.augment_policy`: pad-and-crop
  translation; plus a horizontal flip except for digit datasets).
* "inception" (`inception`): train = random-resized crop decoded straight
  from the JPEG, horizontal flip; eval = shorter side resized to
  ``ceil(image_size / 0.875)``, central crop.

Then optional RandAugment on train (`randaugment`;
``config.data.randaugment_num_layers > 0``) and per-channel normalisation
(ImageNet statistics for ImageNet, image folders and unknown "inception"
datasets).

Exactness holds for a fixed TensorFlow version: the stateless shuffle and
random ops are only guaranteed stable within one (tensorflow is pinned).

Eval: the whole split in order, the last global batch padded with
``mask == 0`` rows, ``ceil(N / eval_batch_size)`` batches on every process.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import os
import sys
from collections.abc import Callable, Iterator

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from skipnet_jax import config_validation, default_config
from skipnet_jax.data import digits as _digits  # noqa: F401 (registers "digits")
from skipnet_jax.data import folder, inception, preprocess, randaugment

Batch = dict[str, np.ndarray]
Example = dict[str, tf.Tensor]

# Datasets that need no download and are prepared on first use.
_AUTO_PREPARE = frozenset({"digits"})
# Salts separating the random streams derived from `config.seed`.
_SHUFFLE_SALT = 0x5348_5546  # "SHUF"
_AUGMENT_SALT = 0x4155_4720  # "AUG "
_INT64_MAX = np.iinfo(np.int64).max
_LOAD_CHUNK = 1024  # Examples per batch when reading a split into memory.
_PARALLEL = dict(num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
# TFDS datasets prepared from manually downloaded files -> the files TFDS reads
# from the manual dir (all imagenet2012 variants read the official tars).
_MANUAL_FILES = {
    "imagenet2012": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
    "imagenet2012_subset": ("ILSVRC2012_img_train.tar", "ILSVRC2012_img_val.tar"),
}
# "auto" preprocessing: images at most this many px a side use "simple".
_SMALL_IMAGE_SIDE = 64
# config.data.preprocessing: the choices `_open_source` and `eval_preprocessing` implement.
PREPROCESSINGS = ("auto", "simple", "inception")
# config.data.bad_images: what an unreadable image file of an image folder does ("error":
# `get_dataset_info` refuses empty class dirs, the training loop stops at the first bad file).
BAD_IMAGE_POLICIES = ("skip", "error")
# "skip": a train example whose file cannot be decoded takes the next file of the
# split (index + 1, ...); more than this many unreadable files in a row is an error.
MAX_CONSECUTIVE_BAD_FILES = 16
# Key of the per-example count of unreadable files skipped (folder sources only);
# the training loop pops it before the batch goes to the device (see `pop_bad_files`).
BAD_FILES_KEY = "bad_files"
INDEX_KEY = "index"  # the example's index in its split (folder sources only)
IMAGENET_MEAN, IMAGENET_STD = preprocess.default_normalization("imagenet2012")


class DataNotFoundError(FileNotFoundError, ValueError):
    """The dataset's files are missing (a ValueError too: the CLI reports it as a config error)."""


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
    """Returns class and split facts of ``config.dataset`` (prepares it if it can).

    Also validates the ``config.data`` fields, and that ``data.drop_remainder``
    leaves at least one whole train batch.  In a multi-process run only
    process 0 prepares an auto-prepared dataset (``digits``); the others wait
    for it at a barrier, so all processes must call this (the training loop
    does, first thing).
    """
    config = _complete(config)
    info = _dataset_info(config)
    if config.data.drop_remainder and info.num_train_examples < config.batch_size:
        raise config_validation.ConfigError(
            f"config.data.drop_remainder=True drops every train batch: split {info.train_split!r} has "
            f"{info.num_train_examples} examples, fewer than batch_size={config.batch_size}; set a smaller "
            "batch_size or data.drop_remainder=False"
        )
    return info


def _dataset_info(config) -> DatasetInfo:
    if _is_folder(config):
        train = folder.load_split(config.dataset, config.data.train_split)
        evals = folder.load_split(config.dataset, config.data.eval_split)
        class_names = folder.class_names(config.dataset)
        empty = train.empty_class_dirs
        if empty and config.data.bad_images == "error":
            raise ValueError(
                f"image folder class directory {empty[0]!r} has no"
                f" {'/'.join(folder.IMAGE_EXTENSIONS)} files ({len(empty)} empty in"
                " all; config.data.bad_images='error'; 'skip' keeps the class label and"
                " trains without examples of it)"
            )
        for directory in empty:
            logging.warning("Empty class directory (its label gets no train examples): %s", directory)
        return DatasetInfo(
            name=config.dataset,
            num_classes=len(class_names),
            num_train_examples=len(train.paths),
            num_eval_examples=len(evals.paths),
            class_names=class_names,
            train_split=config.data.train_split,
            eval_split=config.data.eval_split,
            empty_class_dirs=empty,
        )
    builder = _prepared_builder(config)
    label = builder.info.features["label"]
    return DatasetInfo(
        name=config.dataset,
        num_classes=label.num_classes,
        num_train_examples=_num_examples(builder, config.data.train_split),
        num_eval_examples=_num_examples(builder, config.data.eval_split),
        class_names=tuple(label.names),
        train_split=config.data.train_split,
        eval_split=config.data.eval_split,
    )


def num_eval_batches(config) -> int:
    """``ceil(N_eval / eval_batch_size)``: the same on every process."""
    config = _complete(config)
    if _is_folder(config):
        num = len(folder.load_split(config.dataset, config.data.eval_split).paths)
    else:
        num = _num_examples(_builder(config), config.data.eval_split)
    return math.ceil(num / config.eval_batch_size)


def create_train_iterator(
    config, *, start_step: int = 0, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """Infinite train iterator of this process, starting at global batch `start_step`.

    Yields ``{"image": float32 [b, S, S, 3], "label": int32 [b]}`` with
    ``b = config.batch_size // process_count`` and ``S = config.image_size``.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be >= 0, got {start_step}")
    config = _complete(config)
    local_batch = _local_batch_size("batch_size", config.batch_size, process_index, process_count)
    source = _open_source(config, config.data.train_split)
    augment = config.data.augment
    policy = preprocess.augment_policy(_flip_name(config), augment)
    num_layers = config.data.randaugment_num_layers if augment else 0
    magnitude = config.data.randaugment_magnitude
    mean, std = _normalization(config, source.preprocessing)
    size = config.image_size

    def load_index(index: tf.Tensor, seed: tf.Tensor) -> Example:
        image, label = source.lookup(index)
        crop_seed, flip_seed, randaugment_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=3))
        if source.preprocessing == "inception":
            if augment:
                image = inception.train_image(image, crop_seed, size)
                if policy.flip:
                    image = tf.image.stateless_random_flip_left_right(image, flip_seed)
            else:
                image = inception.eval_image(image, size)
        else:
            image = preprocess.resize(preprocess.to_float_rgb(image), size)
            image = preprocess.augment(image, seed, policy)
        image = randaugment.randaugment(image, randaugment_seed, num_layers, magnitude)
        return {"image": preprocess.normalize(image, mean, std), "label": label}

    def load(element: Example) -> Example:
        seed = _augment_seed(config.seed, element["epoch"], element["offset"])
        if not source.may_fail:
            return load_index(element["index"], seed)
        # An unreadable file is replaced by the next readable one of the split
        # (same augmentation seed): still a pure function of the position.
        example = _first_readable(
            lambda k: load_index((element["index"] + k) % source.num_examples, seed),
            fallback={"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32)},
            max_tries=MAX_CONSECUTIVE_BAD_FILES,
        )
        return {**example, INDEX_KEY: element["index"]}

    stream = _train_stream(
        source.num_examples, config.batch_size, start_step, config.seed, drop_remainder=config.data.drop_remainder
    )
    stream = _process_rows(stream, config.batch_size, local_batch, process_index, process_count)
    return _finish(stream.map(load, **_PARALLEL), local_batch, config)


def create_eval_iterator(config, *, process_index: int = 0, process_count: int = 1) -> Iterator[Batch]:
    """One ordered pass over the eval split, padded to whole global batches.

    Yields `num_eval_batches(config)` batches of ``{"image", "label",
    "mask"}``, ``b = config.eval_batch_size // process_count`` rows each;
    ``mask`` is 1.0 for real examples and 0.0 for padding (zero image,
    label 0), so every example counts exactly once across all processes.
    """
    config = _complete(config)
    local_batch = _local_batch_size("eval_batch_size", config.eval_batch_size, process_index, process_count)
    source = _open_source(config, config.data.eval_split)
    mean, std = _normalization(config, source.preprocessing)
    num = source.num_examples
    total = math.ceil(num / config.eval_batch_size) * config.eval_batch_size

    def load_index(index: tf.Tensor) -> Example:
        image, label = source.lookup(index)
        if source.preprocessing == "inception":
            image = inception.eval_image(image, config.image_size)
        else:
            image = preprocess.resize(preprocess.to_float_rgb(image), config.image_size)
        return {"image": preprocess.normalize(image, mean, std), "label": label}

    def load(element: Example) -> Example:
        is_real = element["position"] < num
        index = tf.minimum(element["position"], num - 1)
        if source.may_fail:  # an unreadable file is masked out (and counted), not replaced
            size = config.image_size
            example = _first_readable(
                lambda k: load_index(index),
                fallback={"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32)},
                max_tries=1,
            )
            bad = example.pop(BAD_FILES_KEY)
            example[BAD_FILES_KEY] = tf.where(is_real, bad, 0)
            example[INDEX_KEY] = index
            is_real = tf.logical_and(is_real, tf.equal(bad, 0))
        else:
            example = load_index(index)
        image, label = example["image"], example["label"]
        return {
            **example,
            "image": tf.where(is_real, image, tf.zeros_like(image)),
            "label": tf.where(is_real, label, tf.zeros_like(label)),
            "mask": tf.cast(is_real, tf.float32),
        }

    positions = tf.data.Dataset.range(total).map(lambda p: {"position": p})
    positions = _process_rows(positions, config.eval_batch_size, local_batch, process_index, process_count)
    return _finish(positions.map(load, **_PARALLEL), local_batch, config)


# --------------------------------------------------------------------------
# Unreadable files (image folders).


def _first_readable(load: Callable[[tf.Tensor], Example], fallback: Example, max_tries: int) -> Example:
    """``load(k)`` for the first ``k`` in ``0 .. max_tries-1`` that raises no error.

    Returns its example plus ``BAD_FILES_KEY``: ``k`` (the number of failed
    tries before it), or `fallback` with ``BAD_FILES_KEY = max_tries`` when
    every try failed.  Errors (undecodable, truncated or empty files) are
    caught by tf.data's ``ignore_errors`` on a tiny per-example dataset, the
    only way to recover from a failing op inside a tf.data graph.
    """
    tries = tf.data.Dataset.range(max_tries).map(lambda k: {**load(k), BAD_FILES_KEY: tf.cast(k, tf.int32)})
    last = tf.data.Dataset.from_tensors({**fallback, BAD_FILES_KEY: tf.constant(max_tries, tf.int32)})
    return tries.ignore_errors().concatenate(last).take(1).get_single_element()


def pop_bad_files(batch: Batch, config, split: str) -> list[tuple[str, ...]]:
    """Removes the unreadable-file bookkeeping from `batch`; returns those files' paths.

    One tuple per example that skipped files: a train example that took ``n``
    tries skipped the files at indices ``index .. index+n-1`` (mod N) of the
    split (``n == MAX_CONSECUTIVE_BAD_FILES``: all tries failed), an eval
    example at most its own.  Returns ``[]`` for sources that cannot fail
    (TFDS datasets).
    """
    counts, indices = batch.pop(BAD_FILES_KEY, None), batch.pop(INDEX_KEY, None)
    if counts is None:
        return []
    paths = folder.load_split(config.dataset, split).paths
    return [
        tuple(paths[(int(index) + k) % len(paths)] for k in range(int(count)))
        for index, count in zip(indices, counts)
        if count
    ]


# --------------------------------------------------------------------------
# Index streams.


def _train_stream(
    num_examples: int, global_batch: int, start_step: int, seed: int, *, drop_remainder: bool = False
) -> tf.data.Dataset:
    """Index elements ``{epoch, offset, index, position}`` from position ``start_step*B``.

    Each epoch's permutation depends only on ``(seed, epoch)``; the first
    epoch is sliced at the start offset, so nothing before it is generated.
    An epoch is the permutation's first ``epoch_length`` entries: all
    ``num_examples``, or with `drop_remainder` the whole global batches only.
    """
    epoch_length = (num_examples // global_batch) * global_batch if drop_remainder else num_examples
    if epoch_length < 1:
        raise ValueError(f"no whole batch of {global_batch} in {num_examples} train examples (drop_remainder)")
    start = start_step * global_batch
    first_epoch = start // epoch_length
    shuffle_seed = tf.constant([seed, _SHUFFLE_SALT], tf.int64)

    def epoch_elements(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.random.experimental.stateless_fold_in(shuffle_seed, epoch)
        permutation = tf.random.experimental.stateless_shuffle(tf.range(num_examples, dtype=tf.int64), seed=epoch_seed)
        begin = tf.maximum(start - epoch * epoch_length, 0)
        offsets = tf.range(begin, epoch_length, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices(
            {
                "epoch": tf.fill(tf.shape(offsets), epoch),
                "offset": offsets,
                "index": permutation[begin:epoch_length],
            }
        )

    epochs = tf.data.Dataset.range(first_epoch, _INT64_MAX)
    elements = epochs.flat_map(epoch_elements)

    def with_position(element: Example) -> Example:
        position = element["epoch"] * epoch_length + element["offset"]
        return {**element, "position": position}

    return elements.map(with_position)


def _process_rows(
    stream: tf.data.Dataset,
    global_batch: int,
    local_batch: int,
    process_index: int,
    process_count: int,
) -> tf.data.Dataset:
    """Keeps rows ``[k*b, (k+1)*b)`` of every global batch for process ``k``.

    Filters integer positions only (before any image is read), so each
    process reads just its own examples.
    """
    if process_count == 1:
        return stream
    row_block = process_index

    def is_mine(element: Example) -> tf.Tensor:
        row = element["position"] % global_batch
        return tf.equal(row // local_batch, row_block)

    return stream.filter(is_mine)


def _augment_seed(seed: int, epoch: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """Stateless per-example augmentation seed from ``(seed, epoch, offset)``."""
    base = tf.constant([seed, _AUGMENT_SALT], tf.int64)
    fold_in = tf.random.experimental.stateless_fold_in
    return fold_in(fold_in(base, epoch), offset)


def _finish(ds: tf.data.Dataset, local_batch: int, config) -> Iterator[Batch]:
    """Batches, prefetches and applies the determinism/threading options.

    ``config.data.prefetch`` batches are prefetched: 0 disables it, a negative
    value lets tf.data autotune.
    """
    ds = ds.batch(local_batch, drop_remainder=True)
    if config.data.prefetch:
        prefetch = config.data.prefetch
        ds = ds.prefetch(tf.data.AUTOTUNE if prefetch < 0 else prefetch)
    return ds.with_options(_options(config)).as_numpy_iterator()


def automatic_num_threads() -> int:
    """Half the CPUs this process may run on, at least 1 and at most 16."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 2)
    return min(16, max(1, cpus // 2))


def _options(config) -> tf.data.Options:
    """Deterministic ordering and a bounded private thread pool.

    The thread pool is private so the input pipeline does not compete with the
    JAX runtime for every core: ``config.data.num_threads`` threads, or with 0
    half the CPUs this process may run on, at most 16.  The CPU affinity, not
    the machine's core count, is what several processes on one host (SLURM
    tasks with ``--cpus-per-task``, ``taskset``) each get.
    """
    options = tf.data.Options()
    options.deterministic = True
    options.threading.private_threadpool_size = config.data.num_threads or automatic_num_threads()
    options.threading.max_intra_op_parallelism = 1
    return options


# --------------------------------------------------------------------------
# Dataset access.


@dataclasses.dataclass(frozen=True)
class _Source:
    """Random access to one split inside tf.data.

    Attributes:
      num_examples: split size ``N``.
      lookup: ``index (int64 scalar) -> (image, int32 label)``; the image is
        ``uint8 [h, w, c]`` or, for encoded sources, a scalar ``tf.string``
        holding the file's bytes (decoded by `inception`).
      preprocessing: "simple" or "inception" (resolved from "auto").
      may_fail: decoding may raise (files of an image folder, which nobody
        validated); such examples are loaded through `_first_readable`.
    """

    num_examples: int
    lookup: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    preprocessing: str = "simple"
    may_fail: bool = False


def _complete(config):
    """`config` with the schema's value for every field it lacks; ``config.data`` validated."""
    config = default_config.with_defaults(config)
    config_validation.validate_data_config(config)
    return config


def _is_folder(config) -> bool:
    return folder.looks_like_path(config.dataset)


def _flip_name(config) -> str:
    """Name used for the no-flip dataset list (folders are natural images)."""
    return "image_folder" if _is_folder(config) else config.dataset


def _open_source(config, split: str) -> _Source:
    """The split of ``config.dataset`` as a `_Source` (folder or TFDS)."""
    mode = config.data.preprocessing
    if _is_folder(config):
        return _folder_source(config.dataset, split, "inception" if mode == "auto" else mode)
    builder = _builder(config)
    image_shape = builder.info.features["image"].shape
    if mode == "auto":
        mode = _auto_preprocessing(config.dataset, image_shape)
    # Variable-size images cannot be stacked into one in-memory array.
    cache = config.data.cache and None not in image_shape
    if config.data.cache and not cache:
        logging.info("%s has variable-size images: reading lazily (cache ignored)", builder.name)
    source = _open_split(builder, split, cache, encoded=mode == "inception" and not cache)
    return dataclasses.replace(source, preprocessing=mode)


def _auto_preprocessing(dataset: str, image_shape) -> str:
    large = None in image_shape or max(image_shape[:2]) > _SMALL_IMAGE_SIDE
    is_imagenet = preprocess.base_name(dataset) in _MANUAL_FILES
    return "inception" if large or is_imagenet else "simple"


def eval_preprocessing(config) -> tuple[str, preprocess.Stats, preprocess.Stats]:
    """``(mode, mean, std)`` with which the eval split of ``config.dataset`` is prepared.

    For code that preprocesses single images the way evaluation does (predict,
    export checks).  Reads dataset metadata only: the data need not be prepared.
    """
    config = _complete(config)
    mode = config.data.preprocessing
    if mode == "auto":
        if _is_folder(config):
            mode = "inception"
        else:
            _configure_tensorflow()
            try:
                builder = tfds.builder(config.dataset, data_dir=config.data_dir)
            except tfds.core.registered.DatasetNotFoundError as err:
                raise ValueError(_unknown_dataset_message(config.dataset)) from err
            mode = _auto_preprocessing(config.dataset, builder.info.features["image"].shape)
    mean, std = _normalization(config, mode)
    return mode, mean, std


def _folder_source(name: str, split: str, mode: str) -> _Source:
    """Reads files lazily by index from the split's sorted file list."""
    listing = folder.load_split(name, split)
    paths = tf.constant(listing.paths)
    labels = tf.constant(listing.labels, tf.int32)

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded = tf.io.read_file(tf.gather(paths, index))
        if mode == "simple":
            return inception.decode_rgb(encoded), tf.gather(labels, index)
        return encoded, tf.gather(labels, index)

    return _Source(len(listing.paths), lookup, preprocessing=mode, may_fail=True)


def _process_layout() -> tuple[int, int]:
    """``(process_count, process_index)`` of a JAX run; (1, 0) if JAX is not in use."""
    jax = sys.modules.get("jax")
    if jax is None:
        return 1, 0
    return jax.process_count(), jax.process_index()


def _prepared_builder(config) -> tfds.core.DatasetBuilder:
    """`_builder`; with several processes, process 0 prepares and the rest wait."""
    count, index = _process_layout()
    if count == 1 or preprocess.base_name(config.dataset) not in _AUTO_PREPARE:
        return _builder(config)
    if index == 0:
        _builder(config)
    from jax.experimental import multihost_utils

    multihost_utils.sync_global_devices(f"skipnet_jax prepared {config.dataset}")
    return _builder(config)


def _builder(config) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder of ``config.dataset``, preparing it if needed.

    ``digits`` is prepared on first use (no download).  ``imagenet2012`` is
    prepared, once and in ``array_record`` format (for random access), from
    the official tars in ``config.data.manual_dir`` (default
    ``<data_dir>/downloads/manual``, TFDS's own default) when they are there,
    else `DataNotFoundError` names the directory and the files.  Preparing
    ImageNet takes hours on one machine; in a multi-process run it must have
    been done before (`tfds build`, see launch/README.md).
    """
    _configure_tensorflow()
    name = config.dataset
    try:
        builder = tfds.builder(name, data_dir=config.data_dir)
    except tfds.core.registered.DatasetNotFoundError:
        raise ValueError(_unknown_dataset_message(name)) from None
    features = builder.info.features
    if not {"image", "label"} <= set(features.keys()):
        raise ValueError(
            f"config.dataset={name!r} is not an image-classification dataset: it"
            f" needs 'image' and 'label' features, has {sorted(features.keys())}"
        )
    base = preprocess.base_name(name)
    if base in _AUTO_PREPARE:
        builder.download_and_prepare()  # No network; a no-op once prepared.
    elif base in _MANUAL_FILES and not builder.is_prepared():
        builder = _prepare_from_manual_dir(config, builder, _MANUAL_FILES[base])
    return builder


def _prepare_from_manual_dir(
    config, builder: tfds.core.DatasetBuilder, files: tuple[str, ...]
) -> tfds.core.DatasetBuilder:
    manual_dir = config.data.manual_dir or os.fspath(builder.data_dir_root / "downloads" / "manual")
    missing = [f for f in files if not tf.io.gfile.exists(os.path.join(manual_dir, f))]
    if missing:
        raise DataNotFoundError(
            f"config.dataset={config.dataset!r} is not prepared in"
            f" {os.fspath(builder.data_dir_root)!r} and TFDS found no manual"
            f" download in {manual_dir!r}: expected {' and '.join(files)} there"
            f" (missing: {', '.join(missing)}; get them from"
            " https://image-net.org/download-images and set"
            " config.data.manual_dir, or prepare with `tfds build`)"
        )
    if _process_layout()[0] > 1:
        raise DataNotFoundError(
            f"config.dataset={config.dataset!r} is not prepared in"
            f" {os.fspath(builder.data_dir_root)!r}; prepare it once, before a"
            " multi-process run: `tfds build imagenet2012 --file_format=array_record"
            f" --data_dir=... --manual_dir={manual_dir}`"
        )
    logging.info("Preparing %s from %s (once; takes long for the full dataset)", config.dataset, manual_dir)
    tfds.builder(config.dataset, data_dir=config.data_dir, file_format="array_record").download_and_prepare(
        download_config=tfds.download.DownloadConfig(manual_dir=manual_dir)
    )
    return tfds.builder(config.dataset, data_dir=config.data_dir)


def _unknown_dataset_message(name: str) -> str:
    known = ["digits", *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(preprocess.base_name(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown dataset: config.dataset={name!r}.{hint} Choices: 'digits'"
        " (bundled, no download), a prepared TFDS image-classification"
        " dataset such as 'cifar10', 'cifar100', 'mnist' or 'imagenet2012',"
        " or an image-folder path (root/train/<class>/*.jpg, root/val/...)."
    )


def _num_examples(builder: tfds.core.DatasetBuilder, split: str) -> int:
    """Split size from the dataset metadata (or the reader where it has none)."""
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
        raise DataNotFoundError(
            f"config.dataset={builder.name!r} has no prepared data at"
            f" {builder.data_dir!r}; prepare it first, e.g. `tfds build"
            f" {builder.name} --data_dir=...` (needs network access)"
        ) from err
    if cardinality < 0:
        raise ValueError(f"cannot determine the size of {builder.name} {split!r}")
    return cardinality


def _open_split(builder: tfds.core.DatasetBuilder, split: str, cache: bool, encoded: bool = False) -> _Source:
    """In-memory source if `cache`, else TFDS random access (`as_data_source`).

    `encoded` (random access only): the image is returned as its stored
    (encoded) bytes, for `inception` to decode, e.g. only the crop of a JPEG.
    """
    expected = _num_examples(builder, split)  # Also: fails early if unprepared.
    if cache:
        source = _in_memory_source(builder, split)
    else:
        source = _random_access_source(builder, split, encoded)
    if source.num_examples != expected:
        raise RuntimeError(
            f"{builder.name} split {split!r}: read {source.num_examples} examples,"
            f" metadata says {expected}; the prepared data looks incomplete"
        )
    return source


def _has_random_access(builder: tfds.core.DatasetBuilder) -> bool:
    return builder.info.file_format in tfds.core.FileFormat.with_random_access()


def _in_memory_source(builder: tfds.core.DatasetBuilder, split: str) -> _Source:
    """Decodes the whole split once and gathers examples from memory."""
    images, labels = _read_split(builder, split)
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(images_t, index), tf.gather(labels_t, index)

    return _Source(num_examples=len(labels), lookup=lookup)


def _read_split(builder: tfds.core.DatasetBuilder, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Returns ``(uint8 images [N, h, w, c], int32 labels [N])`` in split order."""
    image_shape = builder.info.features["image"].shape
    if None in image_shape:
        raise ValueError(
            f"{builder.name} images have no fixed shape {image_shape}, so they"
            " cannot be cached as one array; set config.data.cache=False"
        )
    if _has_random_access(builder):
        data = builder.as_data_source(split=split)
        examples = [data[i] for i in range(len(data))]
        images = np.stack([ex["image"] for ex in examples])
        labels = np.array([ex["label"] for ex in examples])
    else:
        ds = builder.as_dataset(split=split, shuffle_files=False)
        ds = ds.map(lambda ex: (ex["image"], ex["label"])).batch(_LOAD_CHUNK)
        chunks = list(ds.as_numpy_iterator())
        images = np.concatenate([chunk for chunk, _ in chunks])
        labels = np.concatenate([chunk for _, chunk in chunks])
    return images.astype(np.uint8), labels.astype(np.int32)


def _random_access_source(builder: tfds.core.DatasetBuilder, split: str, encoded: bool = False) -> _Source:
    """Reads (and unless `encoded`, decodes) single examples on demand via TFDS random access."""
    if not _has_random_access(builder):
        raise ValueError(
            f"config.data.cache=False reads examples by index, which needs"
            f" {builder.name} prepared as array_record or parquet (it is"
            f" {builder.info.file_format}); set config.data.cache=True or"
            " re-prepare it with file_format='array_record'"
        )
    decoders = {"image": tfds.decode.SkipDecoding()} if encoded else None
    data = builder.as_data_source(split=split, decoders=decoders)
    image_shape = [] if encoded else builder.info.features["image"].shape

    def fetch(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        example = data[int(index)]
        if encoded:
            image = np.asarray(example["image"], dtype=object)
        else:
            image = np.asarray(example["image"], np.uint8)
        return image, np.int32(example["label"])

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(fetch, [index], [tf.string if encoded else tf.uint8, tf.int32], stateful=False)
        return tf.ensure_shape(image, image_shape), tf.ensure_shape(label, [])

    return _Source(num_examples=len(data), lookup=lookup)


# --------------------------------------------------------------------------
# Configuration helpers.


def _local_batch_size(field: str, global_batch: int, process_index: int, process_count: int) -> int:
    """``global_batch // process_count``, validating the process layout."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"config.{field}={global_batch} must be a positive multiple of process_count={process_count}")
    return global_batch // process_count


def _normalization(config, preprocessing: str = "simple") -> tuple[preprocess.Stats, preprocess.Stats]:
    """``(mean, std)`` from the config, each falling back to the dataset default.

    The default is ImageNet's for image folders and for "inception"-style
    datasets without statistics of their own.
    """
    default_mean, default_std = preprocess.default_normalization(config.dataset)
    known = preprocess.base_name(config.dataset) in preprocess.known_normalizations()
    if _is_folder(config) or (preprocessing == "inception" and not known):
        default_mean, default_std = IMAGENET_MEAN, IMAGENET_STD
    mean = tuple(config.data.mean) if config.data.mean is not None else default_mean
    std = tuple(config.data.std) if config.data.std is not None else default_std
    return mean, std


@functools.cache
def _configure_tensorflow() -> None:
    """Keeps TensorFlow off accelerators: JAX owns them; tf.data runs on CPU.

    Must run before TensorFlow initialises its devices; later it can only
    warn (tensorflow-cpu has no GPU support, so that case is harmless).
    """
    for device_type in ("GPU", "TPU"):
        try:
            tf.config.set_visible_devices([], device_type)
        except (RuntimeError, ValueError) as err:
            logging.warning("Cannot hide %s devices from TF: %s", device_type, err)
