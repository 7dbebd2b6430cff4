"""Reusable building blocks for mobile networks (SkipNet, MobileNetV3, ...).

Conventions shared by every module here:

* Tensors are NHWC; convolution kernels are HWIO (depthwise: ``(k, k, 1, C)``).
* ``dtype`` is the *computation* dtype (e.g. ``jnp.bfloat16``); parameters are
  created in ``param_dtype`` (float32 by default).  BatchNorm statistics are always
  reduced in float32.
* Every convolution pads ``(k - 1) // 2`` zeros on *each* side, like PyTorch's
  ``padding=(k-1)//2`` (this is **not** Flax/TF ``'SAME'``, which pads ``(0, 1)`` for
  stride 2 on even sizes).
* Initialisers follow the SkipNet release: conv weights ``N(0, sqrt(2 / (kh*kw*out)))``,
  BatchNorm scale 1 / bias 0, Dense weights ``N(0, 0.01)`` / bias 0.
* BatchNorm: epsilon 1e-5, momentum 0.9 (= PyTorch momentum 0.1).  In train mode
  the module uses batch statistics and updates the mutable ``'batch_stats'``
  collection (the running variance with the unbiased batch variance, as PyTorch);
  in eval mode it uses the running averages.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

Array = jax.Array
Dtype = Any
Activation = str | Callable[[Array], Array] | None

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

__all__ = [
    "ConvBN",
    "DepthwiseConv",
    "InvertedResidual",
    "SqueezeExcite",
    "adaptive_avg_pool",
    "conv_kernel_init",
    "dense_kernel_init",
    "get_activation",
    "global_avg_pool",
    "hard_sigmoid",
    "hard_swish",
    "make_divisible",
    "torch_padding",
]


# --------------------------------------------------------------------------- helpers


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (the MobileNet rule).

    The result is at least ``min_value`` (default: ``divisor``) and never below
    90% of ``v`` (one more ``divisor`` is added when rounding down went too far).
    """
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return int(new_v)


def hard_sigmoid(x: Array) -> Array:
    """``relu6(x + 3) / 6`` (PyTorch ``Hardsigmoid`` / the release's ``h_sigmoid``)."""
    return jnp.clip(x + 3.0, 0.0, 6.0) / 6.0


def hard_swish(x: Array) -> Array:
    """``x * relu6(x + 3) / 6`` (PyTorch ``Hardswish`` / the release's ``h_swish``)."""
    return x * hard_sigmoid(x)


_ACTIVATIONS: dict[str, Callable[[Array], Array]] = {
    "relu": nn.relu,
    "relu6": nn.relu6,
    "hard_swish": hard_swish,
    "hswish": hard_swish,
    "hard_sigmoid": hard_sigmoid,
    "hsigmoid": hard_sigmoid,
    "identity": lambda x: x,
}


def get_activation(act: Activation) -> Callable[[Array], Array] | None:
    """Resolve an activation given by name (``"relu"``, ``"hard_swish"``, ...), callable or None."""
    if act is None or callable(act):
        return act
    try:
        return _ACTIVATIONS[act]
    except KeyError:
        raise ValueError(f"Unknown activation {act!r}; valid choices: {', '.join(sorted(_ACTIVATIONS))}") from None


def conv_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """``N(0, sqrt(2 / (kh * kw * out_channels)))`` for an HWIO kernel (release init).

    For a depthwise kernel ``(k, k, 1, C)`` the out-channel count is ``C``, as in the
    PyTorch release where the depthwise conv has ``out_channels = C``.
    """
    kh, kw, _, out = shape
    std = math.sqrt(2.0 / (kh * kw * out))
    return std * jax.random.normal(key, shape, dtype)


def dense_kernel_init(key: Array, shape: Sequence[int], dtype: Dtype = jnp.float32) -> Array:
    """``N(0, 0.01)`` (release init for linear layers)."""
    return 0.01 * jax.random.normal(key, shape, dtype)


def _pair(v: int | Sequence[int]) -> tuple[int, int]:
    if isinstance(v, int):
        return (v, v)
    v = tuple(int(i) for i in v)
    if len(v) != 2:
        raise ValueError(f"expected an int or a pair, got {v!r}")
    return v  # type: ignore[return-value]


def torch_padding(kernel_size: int | Sequence[int]) -> tuple[tuple[int, int], tuple[int, int]]:
    """PyTorch-style symmetric padding ``(k - 1) // 2`` on each side of H and W."""
    kh, kw = _pair(kernel_size)
    return (((kh - 1) // 2,) * 2, ((kw - 1) // 2,) * 2)


# --------------------------------------------------------------------------- pooling


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
    ``(H/h) x (W/w)`` average pool (computed with a reshape-mean); otherwise an exact
    averaging matrix is applied.  Works for any sizes, including ``h > H``.
    """
    h, w = _pair(out_hw)
    if x.ndim != 4:
        raise ValueError(f"adaptive_avg_pool expects NHWC input, got shape {x.shape}")
    if h < 1 or w < 1:
        raise ValueError(f"output size must be positive, got {(h, w)}")
    x = _adaptive_pool_axis(x, 1, h)
    return _adaptive_pool_axis(x, 2, w)


def global_avg_pool(x: Array, keepdims: bool = False) -> Array:
    """Mean over H and W of an NHWC tensor (reduced in float32, returned in x.dtype)."""
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims, dtype=jnp.float32).astype(x.dtype)


# --------------------------------------------------------------------------- modules


def _depthwise_lax(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    return jax.lax.conv_general_dilated(
        x,
        kernel,
        window_strides=strides,
        padding=padding,
        dimension_numbers=("NHWC", "HWIO", "NHWC"),
        feature_group_count=x.shape[-1],
    )


def _depthwise_shift_forward(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """Depthwise conv as ``kh*kw`` shifted (strided) multiply-adds over a padded input."""
    (pt, pb), (pl, pr) = padding
    return _shifted_sum(jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0))), kernel, strides)


def _shifted_sum(xp: Array, kernel: Array, strides: tuple[int, int]) -> Array:
    """``sum_ij xp[:, i + sh*h, j + sw*w, :] * kernel[i, j]`` ("valid" depthwise correlation)."""
    _, hp, wp, c = xp.shape
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    ho, wo = (hp - kh) // sh + 1, (wp - kw) // sw + 1
    k = kernel.reshape(kh, kw, c)
    out = None
    for i in range(kh):
        for j in range(kw):
            term = _tap(xp, i, j, ho, wo, sh, sw) * k[i, j]
            out = term if out is None else out + term
    return out


def _tap(xp: Array, i: int, j: int, ho: int, wo: int, sh: int, sw: int) -> Array:
    """``xp[:, i + sh*h, j + sw*w, :]`` for ``h < ho``, ``w < wo``."""
    n, _, _, c = xp.shape
    return jax.lax.slice(xp, (0, i, j, 0), (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c), (1, sh, sw, 1))


def _depthwise_kernel_grad(xp: Array, ct: Array, kh: int, kw: int, strides: tuple[int, int]) -> Array:
    """``dk[i, j, 0, c] = sum_{n,h,w} xp[n, i + sh*h, j + sw*w, c] * ct[n, h, w, c]`` in float32.

    ONE variadic reduce over the width axis computes all ``kh*kw`` tap products in a
    single fused pass (XLA:CPU would otherwise materialise every shifted tap for a
    library reduction: ``kh*kw`` activation-sized copies; one reduce per kernel row
    measured 3% slower in the train step); the width-long accumulations keep float32 sums
    accurate, and the small ``(kh*kw, N, Ho, C)`` partial sums are added up after.
    """
    sh, sw = strides
    _, ho, wo, c = ct.shape
    ct32 = ct.astype(jnp.float32)
    prods = tuple(_tap(xp, i, j, ho, wo, sh, sw).astype(jnp.float32) * ct32 for i in range(kh) for j in range(kw))
    zero = jnp.zeros((), jnp.float32)
    partial = jax.lax.reduce(prods, (zero,) * len(prods), lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))
    return jnp.stack(partial).sum(axis=(1, 2)).reshape(kh, kw, 1, c)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def _depthwise_shift(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """`_depthwise_shift_forward` with a hand-written VJP.

    Plain autodiff of the shifted multiply-adds keeps every shifted copy of the input
    as a residual (``kh*kw`` activation-sized buffers per layer) and scatters the input
    gradient back with one pad per tap.  Here only ``x`` and the kernel are kept, and:

    * ``dx`` is itself a stride-1 shifted multiply-add: the cotangent, dilated by the
      stride (zeros between its rows/columns) and zero-padded, correlated with the
      flipped kernel -- one fused loop;
    * ``dkernel[i, j, c] = sum_{n,h,w} tap_ij(x)[n,h,w,c] * ct[n,h,w,c]``.
    """
    return _depthwise_shift_forward(x, kernel, strides, padding)


def _depthwise_shift_fwd(x, kernel, strides, padding):
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    # The padded input is the residual: the forward pass materialises it anyway.
    return _shifted_sum(xp, kernel, strides), (xp, kernel)


def _depthwise_shift_bwd(strides, padding, res, ct):
    xp, kernel = res
    # Without the barrier XLA merges the taps below with the forward pass's identical ones
    # and then materialises all kh*kw of them (they feed two computations); with it each
    # side fuses its taps into its own loop.
    xp = jax.lax.optimization_barrier(xp)
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    _n, hp, wp, _c = xp.shape
    h, w = hp - pt - pb, wp - pl - pr
    _, ho, wo, _ = ct.shape
    ct = ct.astype(xp.dtype)

    dkernel = _depthwise_kernel_grad(xp, ct, kh, kw, strides).astype(kernel.dtype)

    # dx[y] = sum_i ctd[y + pt - i] k[i], ctd = ct dilated by the stride; written as a
    # stride-1 correlation of the (dilated, padded) cotangent with the flipped kernel.
    dil_h, dil_w = (ho - 1) * sh + 1, (wo - 1) * sw + 1
    lo_h, lo_w = kh - 1 - pt, kw - 1 - pl
    ctp = jax.lax.pad(
        ct,
        jnp.zeros((), ct.dtype),
        ((0, 0, 0), (lo_h, h + kh - 1 - lo_h - dil_h, sh - 1), (lo_w, w + kw - 1 - lo_w - dil_w, sw - 1), (0, 0, 0)),
    )
    dx = _shifted_sum(ctp, kernel[::-1, ::-1].astype(xp.dtype), (1, 1))
    return dx, dkernel


_depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution (one filter per channel), no bias.

    Parameter ``kernel`` has shape ``(kh, kw, 1, C)`` -- Flax HWIO for a grouped conv
    with ``feature_group_count = C`` -- so a PyTorch weight ``(C, 1, kh, kw)`` maps to
    it with ``transpose(2, 3, 1, 0)``.  Padding is ``(k-1)//2`` on each side.

    ``impl``:
      * ``"lax"``: ``lax.conv_general_dilated(feature_group_count=C)``.
      * ``"shift"``: the same maths as ``kh*kw`` shifted multiply-adds over the padded
        input (strided slices for stride > 1); much faster on XLA:CPU.
      * ``"auto"``: ``"shift"`` when ``jax.default_backend() == "cpu"``, else ``"lax"``.
    """

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = _pair(self.kernel_size)
        strides = _pair(self.strides)
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        padding = torch_padding((kh, kw))
        impl = self.impl
        if impl == "auto":
            impl = "shift" if jax.default_backend() == "cpu" else "lax"
        if impl == "lax":
            return _depthwise_lax(x, kernel, strides, padding)
        if impl == "shift":
            return _depthwise_shift(x, kernel, strides, padding)
        raise ValueError(f"Unknown depthwise impl {self.impl!r}; valid choices: auto, lax, shift")


# --------------------------------------------------------------------------- batch norm


def _sum_all_but_last(*xs: Array) -> tuple[Array, ...]:
    """Per-channel sums of NHWC float32 arrays in one pass: a variadic reduce over W, then
    the small (N, H, C) partial sums.

    One reduce with several operands is emitted by XLA:CPU as a single loop that fuses the
    elementwise producers of its operands (a single-operand sum goes to a library kernel
    that needs its input materialised first); width-long accumulations keep float32 sums
    as accurate as a pairwise reduction.
    """
    zero = jnp.zeros((), jnp.float32)
    parts = jax.lax.reduce(xs, (zero,) * len(xs), lambda a, b: tuple(u + v for u, v in zip(a, b)), (2,))
    return tuple(jnp.sum(p, axis=(0, 1)) for p in parts)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def _batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
    """Train-mode batch norm of NHWC ``x`` over N, H, W: ``(y, mean, var)``, y in float32.

    Two-pass statistics as ``nn.BatchNorm(use_fast_variance=False)``: ``mean``, then
    ``var = mean((x - mean)^2)`` (minus the square of ``mean(x - mean)``, the round-off
    correction of the corrected two-pass algorithm, about 1e-14 of it).  The VJP is the
    closed form: two per-channel sums of the incoming gradient and one elementwise pass.
    """
    return _batch_norm_train_fwd(x, scale, bias, epsilon)[0]


def _batch_norm_stats(x32: Array) -> tuple[Array, Array]:
    count = x32.shape[0] * x32.shape[1] * x32.shape[2]
    mean = jnp.mean(x32, axis=(0, 1, 2))
    d = x32 - mean
    sum_sq, sum_d = _sum_all_but_last(d * d, d)
    var = jnp.maximum(sum_sq / count - jnp.square(sum_d / count), 0.0)
    return mean, var


def _batch_norm_train_fwd(x, scale, bias, epsilon):
    x32 = x.astype(jnp.float32)
    mean, var = _batch_norm_stats(x32)
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale)


def _bn_grad_sums(g: Array, x: Array, mean: Array, rstd: Array) -> tuple[Array, Array]:
    """``(sum g, sum g * xhat)`` per channel, ``xhat = (x - mean) * rstd``.

    Library sums over materialised operands (a fused one-pass reduce, as in the forward
    pass, would recompute the producer of ``g`` -- after a depthwise conv, its whole input
    gradient -- inside the pass and again in the elementwise one).  The second sum is
    ``rstd * (sum g*x - mean * sum g)``: a product of two materialised arrays, which the
    library reduction fuses, instead of materialising ``g * xhat``.
    """
    g_bias = jnp.sum(g, axis=(0, 1, 2))
    g_x = jnp.sum(g * x.astype(jnp.float32), axis=(0, 1, 2))
    return g_bias, rstd * (g_x - mean * g_bias)


def _batch_norm_train_bwd(epsilon, res, cts):
    x, mean, rstd, scale = res
    g, g_mean, g_var = (c.astype(jnp.float32) for c in cts)
    count = x.shape[0] * x.shape[1] * x.shape[2]
    d = x.astype(jnp.float32) - mean
    xhat = d * rstd
    g_bias, g_scale = _bn_grad_sums(g, x, mean, rstd)
    dx = (scale * rstd / count) * (count * g - g_bias - xhat * g_scale)
    dx = dx + (g_mean + 2.0 * g_var * d) / count  # the statistics' own cotangents (0 in training)
    return dx.astype(x.dtype), g_scale.astype(scale.dtype), g_bias.astype(scale.dtype)


_batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


def _bessel_factor(n):
    """``n / (n - 1)``, PyTorch's correction of the running variance; 1 for ``n <= 1``
    (no unbiased estimate exists; PyTorch refuses a train-mode batch of one value per
    channel).  ``n``: a Python number or an array of per-channel counts."""
    if isinstance(n, (int, float)):
        return n / (n - 1) if n > 1 else 1.0
    return jnp.where(n > 1, n / jnp.maximum(n - 1, 1), 1.0)


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` with PyTorch's running variance and a faster train-mode path for
    NHWC inputs.

    Same fields, variables (``scale``/``bias`` params, ``mean``/``var`` batch_stats) and
    outputs as ``nn.BatchNorm`` (within float32 round-off).  The running variance is
    PyTorch's (``torch.nn.BatchNorm2d``, the release's framework, whose weights are
    converted and fine-tuned here): the batch is normalised with the biased batch
    variance, but ``var`` is updated with the unbiased one, ``momentum * var + (1 -
    momentum) * batch_var * n / (n - 1)``, ``n`` the number of values per channel (the
    unmasked ones with a mask, over all of ``axis_name`` with one); ``nn.BatchNorm``
    stores the biased one.

    In train mode, for the configuration used throughout this package (last-axis
    features, scale and bias, two-pass variance, float32 statistics, no ``axis_name`` or
    mask) the statistics and the gradient come from `_batch_norm_train`, which XLA:CPU
    runs in about half the memory passes of the autodiff of the generic module.
    Everything else (eval mode, initialisation, other settings) is ``nn.BatchNorm``
    itself, with the running variance's update rescaled as above.
    """

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        fast = (
            not running
            and not self.is_initializing()
            and x.ndim == 4
            and self.axis in (-1, 3)
            and mask is None
            and self.axis_name is None
            and not self.use_fast_variance
            and self.force_float32_reductions
            and self.use_scale
            and self.use_bias
            and jnp.issubdtype(x.dtype, jnp.floating)
        )
        if not fast:
            if running or self.is_initializing():
                return super().__call__(x, use_running_average, mask=mask)
            return self._generic_train(x, use_running_average, mask)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        y, mean, var = _batch_norm_train(x, scale.astype(jnp.float32), bias.astype(jnp.float32), float(self.epsilon))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * _bessel_factor(n)
        out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        return y.astype(out_dtype)

    def _generic_train(self, x, use_running_average, mask):
        """``nn.BatchNorm`` in train mode, its running variance update made unbiased.

        ``nn.BatchNorm`` stores ``momentum * old + (1 - momentum) * batch_var``; its
        batch term, the stored value minus ``momentum * old``, is rescaled by
        ``n / (n - 1)``.  The subtraction's error is the stored value's own float32
        round-off, so the result is as accurate as a direct update.
        """
        old = self.get_variable("batch_stats", "var")
        y = super().__call__(x, use_running_average, mask=mask)
        stored = self.get_variable("batch_stats", "var")
        if old is None:  # created by the call above, with nn.BatchNorm's initial ones
            old = jnp.ones_like(stored)
        axes = self.axis if isinstance(self.axis, tuple) else (self.axis,)
        feature_axes = {a % x.ndim for a in axes}
        reduction_axes = tuple(a for a in range(x.ndim) if a not in feature_axes)
        if mask is None:
            n = math.prod(x.shape[a] for a in reduction_axes)
        else:
            n = jnp.sum(jnp.broadcast_to(jnp.asarray(mask, bool), x.shape), axis=reduction_axes, dtype=jnp.float32)
        if self.axis_name is not None:
            n = jax.lax.psum(n, self.axis_name, axis_index_groups=self.axis_index_groups)
        kept = self.momentum * old
        self.put_variable("batch_stats", "var", (kept + (stored - kept) * _bessel_factor(n)).astype(stored.dtype))
        return y


# --------------------------------------------------------------------------- convolutions


def _conv_lax(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def _conv_dot(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """Convolution as one matrix product: ``(N*Ho*Wo, kh*kw*in) @ (kh*kw*in, out)``.

    A 1x1 convolution needs no copy (only a strided slice for stride > 1); a ``k x k``
    one multiplies the ``kh*kw`` shifted taps concatenated along channels (im2col),
    ordered ``(i, j, in)`` like the HWIO kernel's rows.
    """
    n, h, w, cin = x.shape
    kh, kw, _, cout = kernel.shape
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    if (kh, kw) == (1, 1):
        patches = (
            jax.lax.slice(x, (0, pt, pl, 0), (n, pt + (ho - 1) * sh + 1, pl + (wo - 1) * sw + 1, cin), (1, sh, sw, 1))
            if (sh, sw, pt, pl) != (1, 1, 0, 0)
            else x
        )
    else:
        xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        patches = jnp.concatenate([_tap(xp, i, j, ho, wo, sh, sw) for i in range(kh) for j in range(kw)], axis=-1)
    # 2-D operands: the transposed products of the gradients are then plain 2-D dots, with
    # no multi-axis contraction for XLA to canonicalise with an activation-sized transpose.
    flat = patches.reshape(n * ho * wo, kh * kw * cin)
    return jnp.dot(flat, kernel.reshape(kh * kw * cin, cout)).reshape(n, ho, wo, cout)


CONV_IMPLS = ("auto", "lax", "dot")


def resolve_conv_impl(impl: str, kernel_size: tuple[int, int]) -> str:
    """``"auto"`` -> ``"dot"`` for 1x1 convolutions on CPU, else ``"lax"``.

    (An im2col ``"dot"`` for SkipNet's 3x3 RGB stem measured the same as ``"lax"`` in the
    train step, so ``k x k`` convolutions stay convolutions.)
    """
    if impl not in CONV_IMPLS:
        raise ValueError(f"Unknown conv impl {impl!r}; valid choices: {', '.join(CONV_IMPLS)}")
    if impl != "auto":
        return impl
    return "dot" if jax.default_backend() == "cpu" and tuple(kernel_size) == (1, 1) else "lax"


class Conv(nn.Module):
    """Convolution without bias, PyTorch padding ``(k-1)//2`` on each side.

    Same parameter as ``nn.Conv(use_bias=False)``: ``kernel`` of shape ``(kh, kw, in,
    features)``.  ``impl``: ``"lax"`` (``lax.conv_general_dilated``), ``"dot"`` (one
    ``dot_general``, see `_conv_dot`; on XLA:CPU its gradients are plain matrix products
    where a convolution's weight gradient becomes a slow whole-image "convolution") or
    ``"auto"`` (`resolve_conv_impl`).
    """

    features: int
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = _pair(self.kernel_size)
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        impl = resolve_conv_impl(self.impl, (kh, kw))
        fn = _conv_dot if impl == "dot" else _conv_lax
        return fn(x, kernel, _pair(self.strides), torch_padding((kh, kw)))


class ConvBN(nn.Module):
    """Conv (no bias, PyTorch padding) -> BatchNorm -> optional activation.

    Submodules: ``conv`` (``nn.Conv`` with kernel ``(k, k, in, features)``, or a
    :class:`DepthwiseConv` with kernel ``(k, k, 1, C)`` when ``depthwise=True``) and
    ``bn`` (``nn.BatchNorm``: params ``scale``/``bias``, batch_stats ``mean``/``var``).
    """

    features: int | None = None  # None (or == in channels) required when depthwise
    kernel_size: int | Sequence[int] = 1
    strides: int | Sequence[int] = 1
    act: Activation = None
    depthwise: bool = False
    depthwise_impl: str = "auto"
    conv_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.depthwise:
            if self.features is not None and self.features != x.shape[-1]:
                raise ValueError(
                    f"depthwise ConvBN keeps the channel count: features={self.features}, input channels={x.shape[-1]}"
                )
            x = DepthwiseConv(
                kernel_size=self.kernel_size,
                strides=self.strides,
                impl=self.depthwise_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        else:
            if self.features is None:
                raise ValueError("ConvBN needs `features` unless depthwise=True")
            x = Conv(
                features=self.features,
                kernel_size=self.kernel_size,
                strides=self.strides,
                impl=self.conv_impl,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                name="conv",
            )(x)
        x = BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            use_fast_variance=False,  # two-pass variance, like PyTorch
            force_float32_reductions=True,
            name="bn",
        )(x)
        act = get_activation(self.act)
        if act is not None:
            x = act(x)
        return x


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation: global avg pool -> Dense(C -> make_divisible(C/4, 8)) + bias
    -> ReLU -> Dense(-> C) + bias -> hard_sigmoid -> multiply the input.

    Submodules ``fc1`` and ``fc2`` (``nn.Dense``: ``kernel`` (in, out), ``bias``).
    """

    reduction: float = 4
    divisor: int = 8
    gate: Activation = "hard_sigmoid"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: Array) -> Array:
        c = x.shape[-1]
        squeeze = make_divisible(c / self.reduction, self.divisor)
        dense = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=dense_kernel_init,
            bias_init=nn.initializers.zeros,
        )
        s = global_avg_pool(x)  # (N, C)
        s = nn.Dense(squeeze, name="fc1", **dense)(s)
        s = nn.relu(s)
        s = nn.Dense(c, name="fc2", **dense)(s)
        s = get_activation(self.gate)(s)
        return x * s[:, None, None, :].astype(x.dtype)


class InvertedResidual(nn.Module):
    """MobileNetV2/V3 inverted residual block.

    ``expand`` 1x1 conv (in -> hidden) BN act, ``depthwise`` kxk conv (stride s) BN act,
    optional ``se`` on the hidden tensor (after the depthwise activation), ``project``
    1x1 conv (hidden -> out) BN (no activation); identity residual when
    ``strides == 1`` and ``in == out`` (override with ``use_residual``).

    ``use_expand=True`` keeps the 1x1 expansion conv even when hidden == in (as
    SkipNet does); MobileNetV3 (torchvision) drops it when the expansion ratio is 1,
    which corresponds to ``use_expand=False`` (then hidden must equal in).
    """

    hidden_features: int
    out_features: int
    kernel_size: int = 3
    strides: int = 1
    use_se: bool = False
    act: Activation = "relu"
    use_expand: bool = True
    use_residual: bool | None = None  # None: strides == 1 and in == out
    depthwise_impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        in_features = x.shape[-1]
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        x = jnp.asarray(x, self.dtype)
        y = x
        if self.use_expand:
            y = ConvBN(self.hidden_features, 1, act=self.act, name="expand", **common)(y, train)
        elif self.hidden_features != in_features:
            raise ValueError(
                f"use_expand=False needs hidden_features == in channels ({self.hidden_features} != {in_features})"
            )
        y = ConvBN(
            None,
            self.kernel_size,
            self.strides,
            act=self.act,
            depthwise=True,
            depthwise_impl=self.depthwise_impl,
            name="depthwise",
            **common,
        )(y, train)
        if self.use_se:
            y = SqueezeExcite(dtype=self.dtype, param_dtype=self.param_dtype, name="se")(y)
        y = ConvBN(self.out_features, 1, act=None, name="project", **common)(y, train)
        residual = self.use_residual
        if residual is None:
            residual = _pair(self.strides) == (1, 1) and in_features == self.out_features
        if residual:
            y = y + x
        return y
