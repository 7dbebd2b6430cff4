"""Deterministic, resumable, multi-process TFDS input pipeline.

The training loop calls four functions: `get_dataset_info`,
`create_train_iterator`, `create_eval_iterator` and `num_eval_batches`.  They
serve the bundled ``digits`` dataset (see `skipnet_jax.data.digits`) and any
prepared TFDS image-classification dataset (``cifar10``, ``mnist``, ...)
through one code path.

Train stream contract (exact resume and multi-host equivalence rely on it):

* One GLOBAL example stream.  Epoch ``e`` visits the train split in the order
  of a permutation drawn from ``(seed, e)`` alone; stream position
  ``p = e * N + offset`` names the example ``perm_e[offset]``.
* Global batch ``g`` is positions ``[g*B, (g+1)*B)`` (``B = batch_size``).
  Process ``k`` of ``P`` yields rows ``[k*b, (k+1)*b)`` of it (``b = B/P``),
  so concatenating the processes' batches gives the one-process batch.
* Augmentation randomness is a stateless function of ``(seed, e, offset)``,
  never of iterator state.
* ``start_step=s`` starts at global batch ``s``.  The stream is built from
  integer indices and only then mapped to images, so skipped examples are
  never read, decoded or augmented; the skip is O(1).

Examples are read by index, either from an in-memory copy of the decoded
split (``config.data.cache=True``; small datasets) or through TFDS random
access (``as_data_source``; needs an ``array_record``/``parquet`` preparation).
A full per-epoch permutation is a perfect shuffle, so no shuffle buffer is
used and ``config.data.shuffle_buffer`` is accepted but ignored.

Per example: uint8 -> float ``[0, 1]``, grayscale repeated to RGB, bilinear
(antialiased) resize to ``image_size`` x ``image_size``, train-only
augmentation (`preprocess.augment_policy`: pad-and-crop translation; plus a
horizontal flip except for digit datasets), then per-channel normalisation.
ImageNet-style random-resized crops are not implemented (images are resized
to a square).

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
from collections.abc import Callable, Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from skipnet_jax.data import digits as _digits  # noqa: F401 (registers "digits")
from skipnet_jax.data import preprocess

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


def get_dataset_info(config) -> DatasetInfo:
    """Returns class and split facts of ``config.dataset`` (prepares digits)."""
    builder = _builder(config)
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
    builder = _builder(config)
    num = _num_examples(builder, config.data.eval_split)
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
    local_batch = _local_batch_size(
        "batch_size", config.batch_size, process_index, process_count
    )
    builder = _builder(config)
    source = _open_split(builder, config.data.train_split, config.data.cache)
    policy = preprocess.augment_policy(config.dataset, config.data.augment)
    mean, std = _normalization(config)

    def load(element: Example) -> Example:
        image, label = source.lookup(element["index"])
        image = preprocess.resize(preprocess.to_float_rgb(image), config.image_size)
        seed = _augment_seed(config.seed, element["epoch"], element["offset"])
        image = preprocess.augment(image, seed, policy)
        return {"image": preprocess.normalize(image, mean, std), "label": label}

    stream = _train_stream(
        source.num_examples, config.batch_size, start_step, config.seed
    )
    stream = _process_rows(
        stream, config.batch_size, local_batch, process_index, process_count
    )
    return _finish(stream.map(load, **_PARALLEL), local_batch, config)


def create_eval_iterator(
    config, *, process_index: int = 0, process_count: int = 1
) -> Iterator[Batch]:
    """One ordered pass over the eval split, padded to whole global batches.

    Yields `num_eval_batches(config)` batches of ``{"image", "label",
    "mask"}``, ``b = config.eval_batch_size // process_count`` rows each;
    ``mask`` is 1.0 for real examples and 0.0 for padding (zero image,
    label 0), so every example counts exactly once across all processes.
    """
    local_batch = _local_batch_size(
        "eval_batch_size", config.eval_batch_size, process_index, process_count
    )
    builder = _builder(config)
    source = _open_split(builder, config.data.eval_split, config.data.cache)
    mean, std = _normalization(config)
    num = source.num_examples
    total = math.ceil(num / config.eval_batch_size) * config.eval_batch_size

    def load(element: Example) -> Example:
        is_real = element["position"] < num
        image, label = source.lookup(tf.minimum(element["position"], num - 1))
        image = preprocess.resize(preprocess.to_float_rgb(image), config.image_size)
        image = preprocess.normalize(image, mean, std)
        return {
            "image": tf.where(is_real, image, tf.zeros_like(image)),
            "label": tf.where(is_real, label, tf.zeros_like(label)),
            "mask": tf.cast(is_real, tf.float32),
        }

    positions = tf.data.Dataset.range(total).map(lambda p: {"position": p})
    positions = _process_rows(
        positions, config.eval_batch_size, local_batch, process_index, process_count
    )
    return _finish(positions.map(load, **_PARALLEL), local_batch, config)


# --------------------------------------------------------------------------
# Index streams.


def _train_stream(
    num_examples: int, global_batch: int, start_step: int, seed: int
) -> tf.data.Dataset:
    """Index elements ``{epoch, offset, index}`` from position ``start_step*B``.

    Each epoch's permutation depends only on ``(seed, epoch)``; the first
    epoch is sliced at the start offset, so nothing before it is generated.
    """
    start = start_step * global_batch
    first_epoch = start // num_examples
    shuffle_seed = tf.constant([seed, _SHUFFLE_SALT], tf.int64)

    def epoch_elements(epoch: tf.Tensor) -> tf.data.Dataset:
        epoch_seed = tf.random.experimental.stateless_fold_in(shuffle_seed, epoch)
        permutation = tf.random.experimental.stateless_shuffle(
            tf.range(num_examples, dtype=tf.int64), seed=epoch_seed
        )
        begin = tf.maximum(start - epoch * num_examples, 0)
        offsets = tf.range(begin, num_examples, dtype=tf.int64)
        return tf.data.Dataset.from_tensor_slices({
            "epoch": tf.fill(tf.shape(offsets), epoch),
            "offset": offsets,
            "index": permutation[begin:],
        })

    epochs = tf.data.Dataset.range(first_epoch, _INT64_MAX)
    elements = epochs.flat_map(epoch_elements)

    def with_position(element: Example) -> Example:
        position = element["epoch"] * num_examples + element["offset"]
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


def _options(config) -> tf.data.Options:
    """Deterministic ordering and a bounded private thread pool.

    The thread pool is private so the input pipeline does not compete with the
    JAX runtime for every core; ``config.data.num_threads`` (optional)
    overrides the default of half the cores, capped at 16.
    """
    options = tf.data.Options()
    options.deterministic = True
    default_threads = min(16, max(1, (os.cpu_count() or 2) // 2))
    threads = config.data.get("num_threads") or default_threads
    options.threading.private_threadpool_size = threads
    options.threading.max_intra_op_parallelism = 1
    return options


# --------------------------------------------------------------------------
# Dataset access.


@dataclasses.dataclass(frozen=True)
class _Source:
    """Random access to one split inside tf.data.

    Attributes:
      num_examples: split size ``N``.
      lookup: ``index (int64 scalar) -> (uint8 image [h, w, c], int32 label)``.
    """

    num_examples: int
    lookup: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]


def _builder(config) -> tfds.core.DatasetBuilder:
    """Returns the TFDS builder of ``config.dataset``, preparing digits if needed."""
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
    if preprocess.base_name(name) in _AUTO_PREPARE:
        builder.download_and_prepare()  # No network; a no-op once prepared.
    return builder


def _unknown_dataset_message(name: str) -> str:
    known = ["digits", *tfds.list_builders(with_community_datasets=False)]
    close = difflib.get_close_matches(preprocess.base_name(name), known, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown dataset: config.dataset={name!r}.{hint} Choices: 'digits'"
        " (bundled, no download) or a prepared TFDS image-classification"
        " dataset such as 'cifar10', 'cifar100' or 'mnist'."
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
        raise FileNotFoundError(
            f"config.dataset={builder.name!r} has no prepared data at"
            f" {builder.data_dir!r}; prepare it first, e.g. `tfds build"
            f" {builder.name} --data_dir=...` (needs network access)"
        ) from err
    if cardinality < 0:
        raise ValueError(f"cannot determine the size of {builder.name} {split!r}")
    return cardinality


def _open_split(
    builder: tfds.core.DatasetBuilder, split: str, cache: bool
) -> _Source:
    """In-memory source if `cache`, else TFDS random access (`as_data_source`)."""
    expected = _num_examples(builder, split)  # Also: fails early if unprepared.
    if cache:
        source = _in_memory_source(builder, split)
    else:
        source = _random_access_source(builder, split)
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


def _read_split(
    builder: tfds.core.DatasetBuilder, split: str
) -> tuple[np.ndarray, np.ndarray]:
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


def _random_access_source(builder: tfds.core.DatasetBuilder, split: str) -> _Source:
    """Reads and decodes single examples on demand via TFDS random access."""
    if not _has_random_access(builder):
        raise ValueError(
            f"config.data.cache=False reads examples by index, which needs"
            f" {builder.name} prepared as array_record or parquet (it is"
            f" {builder.info.file_format}); set config.data.cache=True or"
            " re-prepare it with file_format='array_record'"
        )
    data = builder.as_data_source(split=split)
    image_shape = builder.info.features["image"].shape

    def fetch(index: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        example = data[int(index)]
        return np.asarray(example["image"], np.uint8), np.int32(example["label"])

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        image, label = tf.numpy_function(
            fetch, [index], [tf.uint8, tf.int32], stateful=False
        )
        return tf.ensure_shape(image, image_shape), tf.ensure_shape(label, [])

    return _Source(num_examples=len(data), lookup=lookup)


# --------------------------------------------------------------------------
# Configuration helpers.


def _local_batch_size(
    field: str, global_batch: int, process_index: int, process_count: int
) -> int:
    """``global_batch // process_count``, validating the process layout."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(
            f"need 0 <= process_index < process_count, got {process_index}"
            f" and {process_count}"
        )
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(
            f"config.{field}={global_batch} must be a positive multiple of"
            f" process_count={process_count}"
        )
    return global_batch // process_count


def _normalization(config) -> tuple[preprocess.Stats, preprocess.Stats]:
    """``(mean, std)`` from the config, each falling back to the dataset default."""
    default_mean, default_std = preprocess.default_normalization(config.dataset)
    mean = tuple(config.data.mean) if config.data.mean is not None else default_mean
    std = tuple(config.data.std) if config.data.std is not None else default_std
    if len(mean) != 3 or len(std) != 3 or min(std) <= 0:
        raise ValueError(
            f"config.data.mean/std must be 3 floats (std > 0), got {mean} / {std}"
        )
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
