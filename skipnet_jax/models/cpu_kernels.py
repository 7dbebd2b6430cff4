"""Formulations of convolution and train-mode BatchNorm tuned for XLA:CPU, and the one
place (`resolve_impl`) that decides which implementation a layer uses.

XLA:CPU runs ``lax.conv_general_dilated(feature_group_count=C)`` about 10x slower than
the same depthwise maths written as shifted multiply-adds, turns a 1x1 convolution's
weight gradient into a slow whole-image "convolution", and reads BatchNorm's input in
more memory passes under autodiff than the closed form needs.  Each kernel here computes
exactly what its plain counterpart computes (values and gradients are tested against
``lax`` and ``flax.linen.BatchNorm``); the layers in `skipnet_jax.models.layers` only ask
`resolve_impl` which one to call.

`batch_norm_train_one_pass` is the exception, for accelerators: both statistics in one
pass over the input, which the TPU compiler fuses into the convolution that produces it.

Kernels take NHWC inputs, HWIO kernels and explicit ``((top, bottom), (left, right))``
padding.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp

Array = jax.Array

__all__ = [
    "IMPLS",
    "batch_norm_train",
    "batch_norm_train_one_pass",
    "conv_dot",
    "conv_lax",
    "current_platform",
    "depthwise_lax",
    "depthwise_shift",
    "resolve_impl",
    "target_platform",
]

# Implementations of each operation, besides "auto" (`resolve_impl`).
IMPLS: dict[str, tuple[str, ...]] = {
    "conv": ("lax", "dot"),
    "depthwise": ("lax", "shift"),
    "batch_norm": ("flax", "fused", "one_pass"),
}


# The platform ("cpu", "tpu", "gpu", ...) of the devices a step is being traced for, when
# `target_platform` is active; otherwise "auto" follows `jax.default_backend()`.
_TARGET_PLATFORM: contextvars.ContextVar[str | None] = contextvars.ContextVar("target_platform", default=None)


@contextlib.contextmanager
def target_platform(platform: str) -> Iterator[None]:
    """Makes ``"auto"`` resolve for `platform` while tracing in this context.

    The host that traces a step is not always the one that runs it: a TPU program can be
    compiled on a CPU machine (`skipnet_jax.plan`), and a CPU mesh can be used on a GPU
    host.  `skipnet_jax.engine` traces every step inside this context with the platform of
    its mesh's devices, so the kernels follow the devices the program is compiled for.
    """
    token = _TARGET_PLATFORM.set(platform)
    try:
        yield
    finally:
        _TARGET_PLATFORM.reset(token)


def current_platform() -> str:
    """The platform "auto" resolves for: `target_platform`'s, else `jax.default_backend()`."""
    return _TARGET_PLATFORM.get() or jax.default_backend()


def resolve_impl(op: str, impl: str = "auto", kernel_size: Sequence[int] = (1, 1)) -> str:
    """The implementation of ``op`` (a key of `IMPLS`) that a layer asking for ``impl`` runs.

    ``"auto"`` resolves to:

    * ``"conv"``: ``"dot"`` (`conv_dot`) for 1x1 convolutions on CPU, else ``"lax"``.  An
      im2col ``"dot"`` for SkipNet's 3x3 RGB stem measured the same as ``"lax"`` in the
      train step, so ``k x k`` convolutions stay convolutions.
    * ``"depthwise"``: ``"shift"`` (`depthwise_shift`) on CPU, else ``"lax"``.
    * ``"batch_norm"``: ``"fused"`` (`batch_norm_train`) on CPU, ``"one_pass"``
      (`batch_norm_train_one_pass`) elsewhere: both are the same maths as Flax's in fewer
      memory passes; the layer still runs Flax's for the configurations the kernels do not
      cover (`layers.BatchNorm`).

    "On CPU" means `current_platform()`: the platform of the mesh the step is traced for
    (`target_platform`), or the default backend outside one.

    Any other ``impl`` must be one of ``IMPLS[op]`` and is returned as is.
    """
    choices = IMPLS[op]
    if impl != "auto":
        if impl not in choices:
            raise ValueError(f"Unknown {op} impl {impl!r}; valid choices: auto, {', '.join(choices)}")
        return impl
    on_cpu = current_platform() == "cpu"
    if op == "conv":
        return "dot" if on_cpu and tuple(kernel_size) == (1, 1) else "lax"
    if op == "depthwise":
        return "shift" if on_cpu else "lax"
    return "fused" if on_cpu else "one_pass"


# --------------------------------------------------------------------------- depthwise


def depthwise_lax(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """Depthwise conv as XLA's grouped convolution (``feature_group_count = C``)."""
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
def depthwise_shift(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
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


depthwise_shift.defvjp(_depthwise_shift_fwd, _depthwise_shift_bwd)


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
def batch_norm_train(x: Array, scale: Array, bias: Array, epsilon: float) -> tuple[Array, Array, Array]:
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


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def batch_norm_train_one_pass(
    x: Array, scale: Array, bias: Array, shift: Array, epsilon: float
) -> tuple[Array, Array, Array]:
    """`batch_norm_train` with both statistics from ONE pass over ``x``: the sums of
    ``d = x - shift`` and of ``d * d`` per channel, then ``mean = shift + mean(d)`` and
    ``var = mean(d * d) - mean(d)^2``.

    The same formula as `batch_norm_train`'s, whose shift is the batch mean itself (found
    by a first pass); any per-channel ``shift`` gives the same values up to float32
    round-off, which grows with ``((mean - shift) / std)^2``: a shift near the batch mean
    (the layer passes its running mean) keeps it at `batch_norm_train`'s level.  A
    non-finite shift counts as 0 (the plain one-pass sums).  On TPU the two sums fuse into
    the producing convolution's output pass, so the statistics cost no read of ``x`` of
    their own (`batch_norm_train`'s second pass reads it again).  ``shift`` gets a zero
    gradient: the statistics do not depend on it.
    """
    return _batch_norm_train_one_pass_fwd(x, scale, bias, shift, epsilon)[0]


def _batch_norm_train_one_pass_fwd(x, scale, bias, shift, epsilon):
    x32 = x.astype(jnp.float32)
    count = x32.shape[0] * x32.shape[1] * x32.shape[2]
    shift = jnp.where(jnp.isfinite(shift), shift, 0.0).astype(jnp.float32)
    d = x32 - shift
    mean_d = jnp.sum(d, axis=(0, 1, 2)) / count
    var = jnp.maximum(jnp.sum(d * d, axis=(0, 1, 2)) / count - jnp.square(mean_d), 0.0)
    mean = shift + mean_d
    rstd = jax.lax.rsqrt(var + epsilon)
    y = (x32 - mean) * (rstd * scale) + bias
    return (y, mean, var), (x, mean, rstd, scale, shift)


def _batch_norm_train_one_pass_bwd(epsilon, res, cts):
    x, mean, rstd, scale, shift = res
    dx, dscale, dbias = _batch_norm_train_bwd(epsilon, (x, mean, rstd, scale), cts)
    return dx, dscale, dbias, jnp.zeros_like(shift)


batch_norm_train_one_pass.defvjp(_batch_norm_train_one_pass_fwd, _batch_norm_train_one_pass_bwd)


# --------------------------------------------------------------------------- convolutions


def conv_lax(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """Convolution as XLA's ``conv_general_dilated``."""
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=strides, padding=padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


def conv_dot(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
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
