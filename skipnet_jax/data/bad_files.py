"""Unreadable image files of an image folder (``config.data.bad_images``).

Nobody validated a user's folder, so any file may fail to decode.  The
pipeline never stops inside tf.data for one: a train example whose file
fails takes the next file of the split, an eval example is masked out, and
each batch carries which files were skipped (``BAD_FILES_KEY``,
``INDEX_KEY``).  The training loop pops that bookkeeping (`pop_bad_files`)
and decides, by the policy, whether to log and go on or to stop.  TFDS
datasets were validated when prepared, so they never go through this.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import tensorflow as tf
from absl import logging

from skipnet_jax.data import folder

Example = dict[str, tf.Tensor]

# config.data.bad_images (`default_config.BAD_IMAGE_POLICIES`): what an unreadable image file
# of an image folder does ("error": `get_dataset_info` refuses empty class dirs, the training
# loop stops at the first bad file).
# "skip": a train example whose file cannot be decoded takes the next file of the
# split (index + 1, ...); more than this many unreadable files in a row is an error.
MAX_CONSECUTIVE_BAD_FILES = 16
# Key of the per-example count of unreadable files skipped (folder sources only);
# the training loop pops it before the batch goes to the device (see `pop_bad_files`).
BAD_FILES_KEY = "bad_files"
INDEX_KEY = "index"  # the example's index in its split (folder sources only)


def check_empty_class_dirs(empty: tuple[str, ...], policy: str) -> None:
    """Refuses train class directories without images under "error"; logs them under "skip"."""
    if empty and policy == "error":
        raise ValueError(
            f"image folder class directory {empty[0]!r} has no"
            f" {'/'.join(folder.IMAGE_EXTENSIONS)} files ({len(empty)} empty in"
            " all; config.data.bad_images='error'; 'skip' keeps the class label and"
            " trains without examples of it)"
        )
    for directory in empty:
        logging.warning("Empty class directory (its label gets no train examples): %s", directory)


def _blank(size: int) -> Example:
    """What an example none of whose tries could be read holds: a zero image, label 0."""
    return {"image": tf.zeros([size, size, 3]), "label": tf.constant(0, tf.int32)}


def first_readable(load: Callable[[tf.Tensor], Example], fallback: Example, max_tries: int) -> Example:
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


def readable_train_example(
    load_index: Callable[[tf.Tensor], Example], index: tf.Tensor, num_examples: int, size: int
) -> Example:
    """The train example at `index`, or, if its file is unreadable, that of the next readable file.

    The replacement keeps the position's augmentation seed (`load_index` holds
    it), so the example is still a pure function of the stream position.
    """
    example = first_readable(
        lambda k: load_index((index + k) % num_examples),
        fallback=_blank(size),
        max_tries=MAX_CONSECUTIVE_BAD_FILES,
    )
    return {**example, INDEX_KEY: index}


def readable_eval_example(
    load_index: Callable[[tf.Tensor], Example], index: tf.Tensor, is_real: tf.Tensor, size: int
) -> tuple[Example, tf.Tensor]:
    """``(example, is_real)``: an unreadable file is masked out (and counted), not replaced."""
    example = first_readable(lambda k: load_index(index), fallback=_blank(size), max_tries=1)
    bad = example.pop(BAD_FILES_KEY)
    example[BAD_FILES_KEY] = tf.where(is_real, bad, 0)
    example[INDEX_KEY] = index
    return example, tf.logical_and(is_real, tf.equal(bad, 0))


def pop_bad_files(batch: dict[str, np.ndarray], config, split: str) -> list[tuple[str, ...]]:
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
