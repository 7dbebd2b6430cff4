"""The bundled digits as training's tf.data "simple" preprocessing serves them, in NumPy.

The accelerator check's ``digits`` part trains on machines without TensorFlow, so it
cannot use :mod:`skipnet_jax.data.pipeline`; :class:`DigitsInput` recomputes the same
batches with NumPy (see its docstring for the one difference: the random draws).
"""

from __future__ import annotations

import ast
import functools
import math
import os
from typing import Any

import numpy as np

_SHUFFLE_SALT = 0x5348_5546  # "SHUF": the per-epoch permutations
_AUGMENT_SALT = 0x4155_4720  # "AUG ": the per-step crop offsets


@functools.cache
def preprocess_constants() -> dict[str, Any]:
    """``DIGITS_MEAN``, ``DIGITS_STD`` and ``PAD_FRACTION`` of :mod:`skipnet_jax.data.preprocess`.

    Read from its source with ``ast`` rather than imported: that module imports TensorFlow,
    which the machines this check is for do not have, and a copy of the numbers here could
    drift from the ones training uses.
    """
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "data", "preprocess.py")
    with open(path) as f:
        tree = ast.parse(f.read(), path)
    wanted = {"DIGITS_MEAN", "DIGITS_STD", "PAD_FRACTION"}
    found: dict[str, Any] = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and len(node.targets) == 1:
            target, value = node.targets[0], node.value
        elif isinstance(node, ast.AnnAssign) and node.value is not None:
            target, value = node.target, node.value
        else:
            continue
        if isinstance(target, ast.Name) and target.id in wanted:
            found[target.id] = ast.literal_eval(value)
    missing = wanted - set(found)
    if missing:
        raise RuntimeError(f"{path} no longer defines {', '.join(sorted(missing))} as literals")
    return found


def bilinear_resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """``[out, in]`` weights of ``tf.image.resize(..., "bilinear", antialias=True)`` along one axis.

    That op is TF's ``scale_and_translate`` with a triangle kernel: output pixel ``i``
    samples the input at ``(i + 0.5) * in / out`` (half-pixel centres), the kernel is
    widened by ``in / out`` when downsampling (the antialiasing), and weights that fall
    outside the image are dropped and the rest renormalised.  Resizing an ``[n, in, in]``
    batch is then ``W @ x @ W.T``.
    """
    scale = out_size / in_size
    width = max(1.0, 1.0 / scale)
    centres = (np.arange(out_size) + 0.5) / scale
    weights = np.maximum(0.0, 1.0 - np.abs(centres[:, None] - (np.arange(in_size) + 0.5)[None, :]) / width)
    return weights / weights.sum(axis=1, keepdims=True)


class DigitsInput:
    """The bundled digits as the tf.data pipeline's "simple" preprocessing serves them, in NumPy.

    Same as ``skipnet_jax.data.pipeline`` for ``dataset="digits"``: the same 1,437 / 360
    examples (:mod:`skipnet_jax.data.digits_arrays`), uint8 -> ``[0, 1]``, bilinear
    antialiased resize 8 -> ``image_size`` (:func:`bilinear_resize_matrix`), grayscale
    repeated to RGB, train-only random translation (zero-pad ``PAD_FRACTION`` of the side,
    random crop back; no flip: a mirrored digit is another glyph), normalisation with the
    digits mean/std; a train stream of per-epoch permutations that runs across epoch
    boundaries (global batch ``g`` = stream positions ``[g*B, (g+1)*B)``); eval in order,
    the last batch padded with ``mask == 0`` rows.

    Differs in the random draws only: the permutations and crop offsets come from NumPy's
    generator seeded with ``(seed, salt, epoch or step)``, not from TensorFlow's stateless
    RNG, so the batches have the same distribution but not the same examples or offsets
    as a ``main --config configs/digits.py`` run (NumPy cannot reproduce TF's Philox
    streams).  The order of the eval examples (TFDS's key-hash order) does not matter.
    """

    def __init__(self, image_size: int, batch_size: int, eval_batch_size: int, seed: int):
        from skipnet_jax.data import digits_arrays

        constants = preprocess_constants()
        images, labels = digits_arrays.load_raw()
        split = digits_arrays.split_indices(labels)
        matrix = bilinear_resize_matrix(images.shape[1], image_size)
        pixels = images[..., 0].astype(np.float64) / 255.0
        resized = np.einsum("oi,nij,pj->nop", matrix, pixels, matrix).astype(np.float32)
        # One channel suffices until the very end: the three are identical (gray repeated).
        self.mean = np.float32(constants["DIGITS_MEAN"][0])
        self.std = np.float32(constants["DIGITS_STD"][0])
        if len(set(constants["DIGITS_MEAN"])) != 1 or len(set(constants["DIGITS_STD"])) != 1:
            raise RuntimeError("digits normalisation is no longer the same for the three channels")
        self.pad = max(1, round(constants["PAD_FRACTION"] * image_size))
        self.train_images, self.train_labels = resized[split["train"]], labels[split["train"]].astype(np.int32)
        self.test_images, self.test_labels = resized[split["test"]], labels[split["test"]].astype(np.int32)
        self.image_size = image_size
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.seed = seed
        self._permutations: dict[int, np.ndarray] = {}

    @property
    def num_train(self) -> int:
        return len(self.train_labels)

    def _indices(self, positions: np.ndarray) -> np.ndarray:
        """Stream positions -> example indices: position ``e*N + o`` is ``perm_e[o]``."""
        epochs, offsets = np.divmod(positions, self.num_train)
        self._permutations = {e: p for e, p in self._permutations.items() if e >= epochs.min()}
        indices = np.empty_like(positions)
        for epoch in np.unique(epochs):
            if epoch not in self._permutations:
                rng = np.random.default_rng([self.seed, _SHUFFLE_SALT, int(epoch)])
                self._permutations[epoch] = rng.permutation(self.num_train)
            here = epochs == epoch
            indices[here] = self._permutations[epoch][offsets[here]]
        return indices

    def _rgb_normalized(self, gray: np.ndarray) -> np.ndarray:
        normalized = (gray - self.mean) / self.std
        return np.ascontiguousarray(np.broadcast_to(normalized[..., None], (*gray.shape, 3)))

    def train_batch(self, step: int) -> dict[str, np.ndarray]:
        """Global batch `step` of the train stream, augmented."""
        positions = step * self.batch_size + np.arange(self.batch_size)
        indices = self._indices(positions)
        size, pad = self.image_size, self.pad
        padded = np.pad(self.train_images[indices], ((0, 0), (pad, pad), (pad, pad)))
        offsets = np.random.default_rng([self.seed, _AUGMENT_SALT, step]).integers(0, 2 * pad + 1, (len(indices), 2))
        rows = offsets[:, 0, None] + np.arange(size)
        cols = offsets[:, 1, None] + np.arange(size)
        cropped = padded[np.arange(len(indices))[:, None, None], rows[:, :, None], cols[:, None, :]]
        return {"image": self._rgb_normalized(cropped), "label": self.train_labels[indices]}

    def eval_batches(self):
        """The whole test split in order, padded to whole batches with ``mask == 0`` rows."""
        n, b = len(self.test_labels), self.eval_batch_size
        for start in range(0, math.ceil(n / b) * b, b):
            real = min(b, n - start)
            image = np.zeros((b, self.image_size, self.image_size, 3), np.float32)
            label = np.zeros((b,), np.int32)
            image[:real] = self._rgb_normalized(self.test_images[start : start + real])
            label[:real] = self.test_labels[start : start + real]
            mask = (np.arange(b) < real).astype(np.float32)
            yield {"image": image, "label": label, "mask": mask}
