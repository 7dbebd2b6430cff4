"""Random access to one split by example index, inside tf.data.

A `Source` maps an int64 index to ``(image, label)``.  Examples are read
either from an in-memory copy of the decoded split (``config.data.cache=True``;
small fixed-shape datasets), through TFDS random access (``as_data_source``;
needs an ``array_record``/``parquet`` preparation; "inception" datasets are
read still encoded), or from an image folder's file list, read and decoded
lazily.  Variable-size datasets and folders are never cached.  Opening a
source only reads: an unprepared dataset is a `datasets.DataNotFoundError`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds
from absl import logging

from skipnet_jax.data import datasets, folder, inception, transforms

_LOAD_CHUNK = 1024  # Examples per batch when reading a split into memory.


@dataclasses.dataclass(frozen=True)
class Source:
    """Random access to one split inside tf.data.

    Attributes:
      num_examples: split size ``N``.
      lookup: ``index (int64 scalar) -> (image, int32 label)``; the image is
        ``uint8 [h, w, c]`` or, for encoded sources, a scalar ``tf.string``
        holding the file's bytes (decoded by `inception`).
      preprocessing: "simple" or "inception" (resolved from "auto").
      may_fail: decoding may raise (files of an image folder, which nobody
        validated); such examples are loaded through `bad_files`.
    """

    num_examples: int
    lookup: Callable[[tf.Tensor], tuple[tf.Tensor, tf.Tensor]]
    preprocessing: str = "simple"
    may_fail: bool = False


def split_size(config, split: str) -> int:
    """Number of examples of `split` of ``config.dataset`` (metadata or file list only)."""
    if datasets.is_folder(config):
        return len(folder.load_split(config.dataset, split).paths)
    return datasets.num_examples(datasets.tfds_builder(config), split)


def open_source(config, split: str) -> Source:
    """The split of ``config.dataset`` as a `Source` (folder or TFDS)."""
    if datasets.is_folder(config):
        return _folder_source(config.dataset, split, transforms.resolve_preprocessing(config, None))
    builder = datasets.tfds_builder(config)
    image_shape = builder.info.features["image"].shape
    mode = transforms.resolve_preprocessing(config, image_shape)
    # Variable-size images cannot be stacked into one in-memory array.
    cache = config.data.cache and None not in image_shape
    if config.data.cache and not cache:
        logging.info("%s has variable-size images: reading lazily (cache ignored)", builder.name)
    source = _open_split(builder, split, cache, encoded=mode == "inception" and not cache)
    return dataclasses.replace(source, preprocessing=mode)


def _folder_source(name: str, split: str, mode: str) -> Source:
    """Reads files lazily by index from the split's sorted file list."""
    listing = folder.load_split(name, split)
    paths = tf.constant(listing.paths)
    labels = tf.constant(listing.labels, tf.int32)

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        encoded = tf.io.read_file(tf.gather(paths, index))
        if mode == "simple":
            return inception.decode_rgb(encoded), tf.gather(labels, index)
        return encoded, tf.gather(labels, index)

    return Source(len(listing.paths), lookup, preprocessing=mode, may_fail=True)


def _open_split(builder: tfds.core.DatasetBuilder, split: str, cache: bool, encoded: bool = False) -> Source:
    """In-memory source if `cache`, else TFDS random access (`as_data_source`).

    `encoded` (random access only): the image is returned as its stored
    (encoded) bytes, for `inception` to decode, e.g. only the crop of a JPEG.
    """
    expected = datasets.num_examples(builder, split)  # Also: fails early if unprepared.
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


def _in_memory_source(builder: tfds.core.DatasetBuilder, split: str) -> Source:
    """Decodes the whole split once and gathers examples from memory."""
    images, labels = _read_split(builder, split)
    images_t = tf.constant(images)
    labels_t = tf.constant(labels)

    def lookup(index: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
        return tf.gather(images_t, index), tf.gather(labels_t, index)

    return Source(num_examples=len(labels), lookup=lookup)


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


def _random_access_source(builder: tfds.core.DatasetBuilder, split: str, encoded: bool = False) -> Source:
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

    return Source(num_examples=len(data), lookup=lookup)
