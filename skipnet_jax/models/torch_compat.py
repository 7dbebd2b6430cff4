"""PyTorch semantics the models reproduce where Flax's differ.

The release was written in PyTorch and its weights are converted to these models, so
padding, adaptive pooling and BatchNorm's running variance must be PyTorch's to give its
logits ('SAME' padding alone moves the release's logits by ~1).
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

Array = jax.Array

__all__ = ["adaptive_avg_pool", "bessel_factor", "pair", "torch_padding"]


def pair(v: int | Sequence[int]) -> tuple[int, int]:
    """An int or a pair as ``(h, w)`` (PyTorch's ``_pair`` for kernel sizes and strides)."""
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


def torch_padding(kernel_size: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style symmetric padding ``(k - 1) // 2`` on each side of H and W.

    Flax/TF ``'SAME'`` pads ``(0, 1)`` for stride 2 on even sizes instead.
    """
    kh, kw = pair(kernel_size)
    return (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)


def _adaptive_pool_matrix(n_in: int, n_out: int) -> np.ndarray:
    """(n_out, n_in) averaging matrix with PyTorch AdaptiveAvgPool bins."""
    m = np.zeros((n_out, n_in), dtype=np.float32)
    for i in range(n_out):
        start = (i * n_in) // n_out
        end = -((-(i + 1) * n_in) // n_out)  # ceil((i + 1) * n_in / n_out)
        m[i, start:end] = 1.0 / (end - start)
    return m


def _adaptive_pool_axis(x: Array, axis: int, n_out: int) -> Array:
    n_in = x.shape[axis]
    if n_in == n_out:
        return x
    if n_in % n_out == 0:  # fast path: equal, non-overlapping bins
        shape = (*x.shape[:axis], n_out, n_in // n_out, *x.shape[axis + 1 :])
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    # General case (bins of unequal size, possibly overlapping): a constant matmul.
    m = jnp.asarray(_adaptive_pool_matrix(n_in, n_out))
    y = jnp.tensordot(x.astype(jnp.float32), m, axes=((axis,), (1,)), precision=jax.lax.Precision.HIGHEST)
    return jnp.moveaxis(y, -1, axis).astype(x.dtype)


def adaptive_avg_pool(x: Array, out_hw: int | Sequence[int]) -> Array:
    """PyTorch ``AdaptiveAvgPool2d`` on an NHWC tensor.

    Output cell ``i`` averages input rows ``floor(i*H/h) .. ceil((i+1)*H/h) - 1``
    (likewise for columns).  When the sizes divide this is a plain
    ``(H/h) x (W/w)`` average pool: one reshape-mean over both window axes, summed in
    float32 and rounded to ``x``'s dtype once (on TPU the sum reads ``x`` as it is, where a
    mean per axis made a float32 copy of it first); otherwise an exact averaging matrix is
    applied per axis.  Works for any sizes, including ``h > H``.
    """
    h, w = pair(out_hw)
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects NHWC input, got shape {x.shape}")
    if h < 1 or w < 1:
        raise ValueError(f"output size must be positive, got {(h, w)}")
    n, hi, wi, c = x.shape
    if hi % h == 0 and wi % w == 0:  # both axes at once: one float32 sum, one rounding
        windows = x.reshape(n, h, hi // h, w, wi // w, c)
        return jnp.mean(windows, axis=(2, 4), dtype=jnp.float32).astype(x.dtype)
    x = _adaptive_pool_axis(x, 1, h)
    return _adaptive_pool_axis(x, 2, w)


def bessel_factor(n):
    """``n / (n - 1)``, PyTorch's correction of BatchNorm's running variance; 1 for ``n <= 1``
    (no unbiased estimate exists; PyTorch refuses a train-mode batch of one value per
    channel).  ``n``: a Python number or an array of per-channel counts."""
    if isinstance(n, (int, float)):
        return n / (n - 1) if n > 1 else 1.0
    return jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)
