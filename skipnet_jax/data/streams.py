"""Step-indexed streams of example indices: the order in which a split is read.

Everything here works on integer indices before any image is read, so a
resumed run skips what it has seen in O(1) and each process keeps only its
own rows of every global batch (see `skipnet_jax.data.pipeline` for the
stream contract these functions implement).  The order is a pure function of
``(seed, epoch)`` and the augmentation seed of ``(seed, epoch, offset)``,
never of iterator state or of the number of processes.
"""

from __future__ import annotations

import math

import numpy as np
import tensorflow as tf

Element = dict[str, tf.Tensor]

# Salts separating the random streams derived from `config.seed`.
_SHUFFLE_SALT = 0x5348_5546  # "SHUF"
_AUGMENT_SALT = 0x4155_4720  # "AUG "
_INT64_MAX = np.iinfo(np.int64).max


def local_batch_size(field: str, global_batch: int, process_index: int, process_count: int) -> int:
    """``global_batch // process_count``, validating the process layout."""
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"need 0 <= process_index < process_count, got {process_index} and {process_count}")
    if global_batch < 1 or global_batch % process_count:
        raise ValueError(f"config.{field}={global_batch} must be a positive multiple of process_count={process_count}")
    return global_batch // process_count


def train_stream(
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

    def with_position(element: Element) -> Element:
        position = element["epoch"] * epoch_length + element["offset"]
        return {**element, "position": position}

    return elements.map(with_position)


def eval_stream(num_examples: int, global_batch: int) -> tf.data.Dataset:
    """Positions ``0 .. ceil(N / B) * B - 1`` in order: the split, then padding to whole global batches."""
    total = math.ceil(num_examples / global_batch) * global_batch
    return tf.data.Dataset.range(total).map(lambda p: {"position": p})


def process_rows(
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

    def is_mine(element: Element) -> tf.Tensor:
        row = element["position"] % global_batch
        return tf.equal(row // local_batch, row_block)

    return stream.filter(is_mine)


def augment_seed(seed: int, epoch: tf.Tensor, offset: tf.Tensor) -> tf.Tensor:
    """Stateless per-example augmentation seed from ``(seed, epoch, offset)``."""
    base = tf.constant([seed, _AUGMENT_SALT], tf.int64)
    fold_in = tf.random.experimental.stateless_fold_in
    return fold_in(fold_in(base, epoch), offset)
