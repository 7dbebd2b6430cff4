"""Reusable building blocks for mobile networks (SkipNet, MobileNetV3, ...).

Conventions shared by every module here:

* Tensors are NHWC; convolution kernels are HWIO (depthwise: ``(k, k, 1, C)``).
* ``dtype`` is the *computation* dtype (e.g. ``jnp.bfloat16``); parameters are
  created in ``param_dtype`` (float32 by default).  BatchNorm statistics are always
  reduced in float32.
* Every convolution pads ``(k - 1) // 2`` zeros on *each* side, like PyTorch
  (`torch_compat.torch_padding`).
* Initialisers follow the SkipNet release: conv weights ``N(0, sqrt(2 / (kh*kw*out)))``,
  BatchNorm scale 1 / bias 0, Dense weights ``N(0, 0.01)`` / bias 0.
* BatchNorm: epsilon 1e-5, momentum 0.9 (= PyTorch momentum 0.1).  In train mode
  the module uses batch statistics and updates the mutable ``'batch_stats'``
  collection (the running variance with the unbiased batch variance, as PyTorch);
  in eval mode it uses the running averages.
* Convolutions and train-mode BatchNorm run the implementation
  `cpu_kernels.resolve_impl` picks (``impl="auto"``) or the one a layer is given.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from skipnet_jax.models import cpu_kernels
from skipnet_jax.models.torch_compat import bessel_factor, pair, torch_padding

Array = jax.Array
Dtype = Any
Activation = str | Callable[[Array], Array] | None

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5

__all__ = [
    "BN_EPSILON",
    "BN_MOMENTUM",
    "BatchNorm",
    "Conv",
    "ConvBN",
    "DepthwiseConv",
    "InvertedResidual",
    "SqueezeExcite",
    "batch_norm",
    "check_images",
    "conv_kernel_init",
    "dense_kernel_init",
    "get_activation",
    "global_avg_pool",
    "hard_sigmoid",
    "hard_swish",
    "make_divisible",
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


def check_images(images: Array, model: str) -> None:
    """``ValueError`` naming ``model`` unless ``images`` is a 4-D (NHWC) batch."""
    if images.ndim != 4:
        raise ValueError(f"{model} expects NHWC images, got shape {images.shape}")


def global_avg_pool(x: Array, keepdims: bool = False) -> Array:
    """Mean over H and W of an NHWC tensor (reduced in float32, returned in x.dtype)."""
    return jnp.mean(x, axis=(1, 2), keepdims=keepdims, dtype=jnp.float32).astype(x.dtype)


# --------------------------------------------------------------------------- convolutions


class DepthwiseConv(nn.Module):
    """Depthwise ``k x k`` convolution (one filter per channel), no bias.

    Parameter ``kernel`` has shape ``(kh, kw, 1, C)`` -- Flax HWIO for a grouped conv
    with ``feature_group_count = C`` -- so a PyTorch weight ``(C, 1, kh, kw)`` maps to
    it with ``transpose(2, 3, 1, 0)``.  Padding is ``(k-1)//2`` on each side.

    ``impl``: ``"lax"`` (`cpu_kernels.depthwise_lax`), ``"shift"`` (the same maths as
    ``kh*kw`` shifted multiply-adds, `cpu_kernels.depthwise_shift`; much faster on
    XLA:CPU) or ``"auto"`` (`cpu_kernels.resolve_impl`).
    """

    kernel_size: int | Sequence[int] = 3
    strides: int | Sequence[int] = 1
    impl: str = "auto"
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    kernel_init: Callable = conv_kernel_init

    @nn.compact
    def __call__(self, x: Array) -> Array:
        kh, kw = pair(self.kernel_size)
        c = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, 1, c), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        impl = cpu_kernels.resolve_impl("depthwise", self.impl, (kh, kw))
        fn = cpu_kernels.depthwise_shift if impl == "shift" else cpu_kernels.depthwise_lax
        return fn(x, kernel, pair(self.strides), torch_padding((kh, kw)))


class Conv(nn.Module):
    """Convolution without bias, PyTorch padding ``(k-1)//2`` on each side.

    Same parameter as ``nn.Conv(use_bias=False)``: ``kernel`` of shape ``(kh, kw, in,
    features)``.  ``impl``: ``"lax"`` (`cpu_kernels.conv_lax`), ``"dot"`` (one matrix
    product, `cpu_kernels.conv_dot`; on XLA:CPU its gradients are plain matrix products
    where a convolution's weight gradient becomes a slow whole-image "convolution") or
    ``"auto"`` (`cpu_kernels.resolve_impl`).
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
        kh, kw = pair(self.kernel_size)
        cin = x.shape[-1]
        kernel = self.param("kernel", self.kernel_init, (kh, kw, cin, self.features), self.param_dtype)
        x, kernel = nn.dtypes.promote_dtype(x, kernel, dtype=self.dtype)
        impl = cpu_kernels.resolve_impl("conv", self.impl, (kh, kw))
        fn = cpu_kernels.conv_dot if impl == "dot" else cpu_kernels.conv_lax
        return fn(x, kernel, pair(self.strides), torch_padding((kh, kw)))


# --------------------------------------------------------------------------- batch norm


class BatchNorm(nn.BatchNorm):
    """``nn.BatchNorm`` with PyTorch's running variance and a faster train-mode path for
    NHWC inputs.

    Same fields (plus ``impl``), variables (``scale``/``bias`` params, ``mean``/``var``
    batch_stats) and outputs as ``nn.BatchNorm`` (within float32 round-off).  The running variance is
    PyTorch's (``torch.nn.BatchNorm2d``, the release's framework, whose weights are
    converted and fine-tuned here): the batch is normalised with the biased batch
    variance, but ``var`` is updated with the unbiased one, ``momentum * var + (1 -
    momentum) * batch_var * n / (n - 1)``, ``n`` the number of values per channel (the
    unmasked ones with a mask, over all of ``axis_name`` with one); ``nn.BatchNorm``
    stores the biased one.

    In train mode, when `cpu_kernels.resolve_impl` picks ``"fused"`` for ``impl`` and the
    configuration is the one used throughout this package (`_fused_kernel_applies`), the
    statistics and the gradient come from `cpu_kernels.batch_norm_train`, which XLA:CPU
    runs in about half the memory passes of the autodiff of the generic module; with
    ``"one_pass"`` (the choice off CPU) from `cpu_kernels.batch_norm_train_one_pass`,
    shifted by the running mean, whose statistics the TPU compiler fuses into the
    producing convolution (SkipNet-M's train step on v5e: 40.7 GB moved per chip instead
    of 44.7).
    Everything else (eval mode, initialisation, other settings) is ``nn.BatchNorm``
    itself, with the running variance's update rescaled as above.
    """

    impl: str = "auto"  # train mode: "fused", "one_pass", "flax" or "auto" (`cpu_kernels.resolve_impl`)

    @nn.compact
    def __call__(self, x, use_running_average: bool | None = None, *, mask=None):
        running = nn.merge_param("use_running_average", self.use_running_average, use_running_average)
        if running or self.is_initializing():
            return super().__call__(x, use_running_average, mask=mask)
        impl = cpu_kernels.resolve_impl("batch_norm", self.impl)
        if impl == "flax" or not self._fused_kernel_applies(x, mask):
            return self._generic_train(x, use_running_average, mask)
        c = x.shape[-1]
        ra_mean = self.variable("batch_stats", "mean", lambda s: jnp.zeros(s, jnp.float32), (c,))
        ra_var = self.variable("batch_stats", "var", lambda s: jnp.ones(s, jnp.float32), (c,))
        scale = self.param("scale", self.scale_init, (c,), self.param_dtype)
        bias = self.param("bias", self.bias_init, (c,), self.param_dtype)
        scale32, bias32 = scale.astype(jnp.float32), bias.astype(jnp.float32)
        if impl == "one_pass":  # shifted by the running mean: near the batch mean once trained
            y, mean, var = cpu_kernels.batch_norm_train_one_pass(
                x, scale32, bias32, ra_mean.value.astype(jnp.float32), float(self.epsilon)
            )
        else:
            y, mean, var = cpu_kernels.batch_norm_train(x, scale32, bias32, float(self.epsilon))
        n = x.shape[0] * x.shape[1] * x.shape[2]
        ra_mean.value = self.momentum * ra_mean.value + (1 - self.momentum) * mean
        ra_var.value = self.momentum * ra_var.value + (1 - self.momentum) * var * bessel_factor(n)
        out_dtype = nn.dtypes.canonicalize_dtype(x, scale, bias, dtype=self.dtype)
        return y.astype(out_dtype)

    def _fused_kernel_applies(self, x, mask) -> bool:
        """Whether `cpu_kernels.batch_norm_train` computes this layer: last-axis features of
        a floating NHWC input, scale and bias, two-pass variance, float32 statistics, no
        ``axis_name`` or mask."""
        return (
            x.ndim == 4
            and self.axis in (-1, 3)
            and mask is None
            and self.axis_name is None
            and not self.use_fast_variance
            and self.force_float32_reductions
            and self.use_scale
            and self.use_bias
            and jnp.issubdtype(x.dtype, jnp.floating)
        )

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
        self.put_variable("batch_stats", "var", (kept + (stored - kept) * bessel_factor(n)).astype(stored.dtype))
        return y


def batch_norm(
    train: bool,
    *,
    momentum: float = BN_MOMENTUM,
    epsilon: float = BN_EPSILON,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    name: str | None = None,
) -> BatchNorm:
    """`BatchNorm` as every model here configures it: PyTorch's two-pass variance and
    float32 statistics, batch statistics when ``train``."""
    return BatchNorm(
        use_running_average=not train,
        momentum=momentum,
        epsilon=epsilon,
        dtype=dtype,
        param_dtype=param_dtype,
        use_fast_variance=False,
        force_float32_reductions=True,
        name=name,
    )


# --------------------------------------------------------------------------- blocks


class ConvBN(nn.Module):
    """Conv (no bias, PyTorch padding) -> BatchNorm -> optional activation.

    Submodules: ``conv`` (:class:`Conv` with kernel ``(k, k, in, features)``, or a
    :class:`DepthwiseConv` with kernel ``(k, k, 1, C)`` when ``depthwise=True``) and
    ``bn`` (:class:`BatchNorm`: params ``scale``/``bias``, batch_stats ``mean``/``var``).
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
        x = batch_norm(
            train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
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
            residual = pair(self.strides) == (1, 1) and in_features == self.out_features
        if residual:
            y = y + x
        return y
