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
  collection; in eval mode it uses the running averages.
"""

from __future__ import annotations

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
    "make_divisible",
    "hard_sigmoid",
    "hard_swish",
    "get_activation",
    "conv_kernel_init",
    "dense_kernel_init",
    "torch_padding",
    "DepthwiseConv",
    "ConvBN",
    "SqueezeExcite",
    "InvertedResidual",
    "adaptive_avg_pool",
    "global_avg_pool",
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
        raise ValueError(
            f"Unknown activation {act!r}; valid choices: {', '.join(sorted(_ACTIVATIONS))}"
        ) from None


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
        shape = x.shape[:axis] + (n_out, n_in // n_out) + x.shape[axis + 1 :]
        return jnp.mean(x.reshape(shape), axis=axis + 1)
    # General case (bins of unequal size, possibly overlapping): a constant matmul.
    m = jnp.asarray(_adaptive_pool_matrix(n_in, n_out))
    y = jnp.tensordot(
        x.astype(jnp.float32), m, axes=((axis,), (1,)), precision=jax.lax.Precision.HIGHEST
    )
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


def _depthwise_shift(x: Array, kernel: Array, strides: tuple[int, int], padding) -> Array:
    """Depthwise conv as ``kh*kw`` shifted (strided) multiply-adds over a padded input."""
    n, h, w, c = x.shape
    kh, kw = kernel.shape[:2]
    sh, sw = strides
    (pt, pb), (pl, pr) = padding
    xp = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
    ho = (h + pt + pb - kh) // sh + 1
    wo = (w + pl + pr - kw) // sw + 1
    k = kernel.reshape(kh, kw, c)
    out = None
    for i in range(kh):
        for j in range(kw):
            tap = jax.lax.slice(
                xp,
                (0, i, j, 0),
                (n, i + (ho - 1) * sh + 1, j + (wo - 1) * sw + 1, c),
                (1, sh, sw, 1),
            )
            term = tap * k[i, j]
            out = term if out is None else out + term
    return out


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
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        if self.depthwise:
            if self.features is not None and self.features != x.shape[-1]:
                raise ValueError(
                    f"depthwise ConvBN keeps the channel count: features={self.features}, "
                    f"input channels={x.shape[-1]}"
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
            x = nn.Conv(
                features=self.features,
                kernel_size=_pair(self.kernel_size),
                strides=_pair(self.strides),
                padding=torch_padding(self.kernel_size),
                use_bias=False,
                dtype=self.dtype,
                param_dtype=self.param_dtype,
                kernel_init=conv_kernel_init,
                name="conv",
            )(x)
        x = nn.BatchNorm(
            use_running_average=not train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
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
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: Array, train: bool = False) -> Array:
        in_features = x.shape[-1]
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
            bn_axis_name=self.bn_axis_name,
        )
        x = jnp.asarray(x, self.dtype)
        y = x
        if self.use_expand:
            y = ConvBN(self.hidden_features, 1, act=self.act, name="expand", **common)(y, train)
        elif self.hidden_features != in_features:
            raise ValueError(
                f"use_expand=False needs hidden_features == in channels "
                f"({self.hidden_features} != {in_features})"
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
