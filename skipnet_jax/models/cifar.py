"""CIFAR baselines of the bias-loss release: ResNet-18, ShuffleNetV2 0.5x, DenseNet-121.

The release trains these three on CIFAR-100 and computes bias loss
on each model's last convolutional output before global pooling; here that tensor is
``aux["features"]``.  All three take NHWC images of any size >= 32 px (they are built
for 32 px: no stride in the stem, no max-pool), return float32 logits and run in any
compute ``dtype`` with float32 parameters.

Parameter counts (exact, from the architecture; asserted in tests/test_models_extra.py):

========================  ==============  ===============
model                     100 classes     1000 classes
========================  ==============  ===============
``resnet18_cifar``        11,220,132      11,681,832
``shufflenet_v2_x0_5``    448,268         1,370,768
``densenet121_cifar``     7,048,548       7,971,048
========================  ==============  ===============

Shared conventions:

* every conv pads ``(k - 1) // 2`` on each side (PyTorch ``padding=(k-1)//2``); ResNet's
  and DenseNet's convs have no bias (each one feeds a BatchNorm), ShuffleNetV2's have one,
  as in the release;
* BatchNorm (`layers.BatchNorm`): momentum 0.9 (PyTorch 0.1), epsilon 1e-5, batch
  statistics and a ``'batch_stats'`` update in train mode, whose running variance is
  PyTorch's unbiased one;
* initialisation is PyTorch's default, as the release uses it: conv and Dense kernels
  ``U(-1/sqrt(fan_in), 1/sqrt(fan_in))``, Dense and conv biases likewise, BN scale 1 /
  bias 0;
* ``dropout_rate`` (default 0: none of these architectures has dropout) adds dropout
  before the classifier when > 0; it exists so every registered model accepts the
  training loop's ``dropout_rate`` override.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from skipnet_jax.models.layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    DepthwiseConv,
    batch_norm,
    check_images,
    global_avg_pool,
)
from skipnet_jax.models.registry import register_model
from skipnet_jax.models.torch_compat import pair, torch_padding

Array = jax.Array
Dtype = Any

__all__ = [
    "DenseNetCifar",
    "ResNetCifar",
    "ShuffleNetV2Cifar",
    "channel_shuffle",
    "densenet121_cifar",
    "resnet18_cifar",
    "shufflenet_v2_x0_5",
]

# PyTorch's default Conv2d/Linear weight init: kaiming_uniform(a=sqrt(5)) is
# U(-1/sqrt(fan_in), 1/sqrt(fan_in)), i.e. variance 1 / (3 fan_in).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def _torch_default_bias_init(fan_in: int):
    bound = 1.0 / math.sqrt(fan_in)

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


class _Common(nn.Module):
    """Fields and layer factories shared by the three CIFAR models (not registered)."""

    num_classes: int = 100
    dropout_rate: float = 0.0
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    def _conv(self, features: int, kernel: int, strides: int = 1, name: str | None = None):
        return nn.Conv(
            features,
            (kernel, kernel),
            strides=(strides, strides),
            padding=torch_padding(kernel),
            use_bias=False,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_kernel_init,
            name=name,
        )

    def _bn(self, train: bool, name: str | None = None):
        return batch_norm(
            train,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )

    def _classify(self, features: Array, train: bool, aux: dict[str, Array]) -> Array:
        """Global average pool -> dropout -> float32 Dense; fills ``aux["embedding"]``."""
        x = global_avg_pool(features)
        aux["embedding"] = x
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
        fan_in = x.shape[-1]
        return nn.Dense(
            self.num_classes,
            dtype=jnp.float32,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_kernel_init,
            bias_init=_torch_default_bias_init(fan_in),
            name="classifier",
        )(x.astype(jnp.float32))


# --------------------------------------------------------------------------- ResNet


class ResNetCifar(_Common):
    """ResNet with BasicBlocks and a CIFAR stem (He et al. 2016; the release's ResNet-18).

    Stem: 3x3 conv stride 1 (3 -> 64) BN ReLU, no max-pool.  ``layer{1..4}``: BasicBlocks
    (3x3 conv stride s BN ReLU, 3x3 conv BN, + shortcut, ReLU) with widths 64, 128, 256,
    512 and first strides 1, 2, 2, 2; the shortcut is a 1x1 conv stride s + BN when the
    stride or width changes, else the identity.  Head: global average pool -> Dense.

    ``aux``: ``stem``, ``layer1`` .. ``layer4``, ``features`` (= ``layer4``, 4x4x512 at
    32 px, what bias loss uses) and ``embedding`` (N, 512).
    """

    stage_sizes: Sequence[int] = (2, 2, 2, 2)
    widths: Sequence[int] = (64, 128, 256, 512)

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        check_images(images, "ResNetCifar")
        aux: dict[str, Array] = {}
        x = jnp.asarray(images, self.dtype)
        x = self._conv(self.widths[0], 3, name="stem_conv")(x)
        x = nn.relu(self._bn(train, name="stem_bn")(x))
        aux["stem"] = x
        for s, (blocks, width) in enumerate(zip(self.stage_sizes, self.widths)):
            for b in range(blocks):
                strides = 2 if (s > 0 and b == 0) else 1
                x = self._basic_block(x, width, strides, train, f"layer{s + 1}_block{b}")
            aux[f"layer{s + 1}"] = x
        aux["features"] = x
        return self._classify(x, train, aux), aux

    def _basic_block(self, x: Array, width: int, strides: int, train: bool, name: str) -> Array:
        y = self._conv(width, 3, strides, name=f"{name}_conv1")(x)
        y = nn.relu(self._bn(train, name=f"{name}_bn1")(y))
        y = self._conv(width, 3, name=f"{name}_conv2")(y)
        y = self._bn(train, name=f"{name}_bn2")(y)
        if strides != 1 or x.shape[-1] != width:
            x = self._conv(width, 1, strides, name=f"{name}_shortcut_conv")(x)
            x = self._bn(train, name=f"{name}_shortcut_bn")(x)
        return nn.relu(y + x)


# --------------------------------------------------------------------------- ShuffleNetV2


def channel_shuffle(x: Array, groups: int = 2) -> Array:
    """ShuffleNet channel shuffle on NHWC: channel ``g * (C/groups) + j`` -> ``j * groups + g``."""
    *lead, c = x.shape
    if c % groups:
        raise ValueError(f"channels ({c}) not divisible by groups ({groups})")
    x = x.reshape(*lead, groups, c // groups)
    x = jnp.swapaxes(x, -1, -2)
    return x.reshape(*lead, c)


class _BiasedDepthwise(DepthwiseConv):
    """`DepthwiseConv` plus a per-channel ``bias`` (PyTorch's ``Conv2d(..., groups=C)``
    default ``bias=True``), initialised ``U(-1/sqrt(k*k), 1/sqrt(k*k))`` as PyTorch does."""

    @nn.compact
    def __call__(self, x: Array) -> Array:
        y = super().__call__(x)
        kh, kw = pair(self.kernel_size)
        bias = self.param("bias", _torch_default_bias_init(kh * kw), (x.shape[-1],), self.param_dtype)
        return y + bias.astype(y.dtype)


class ShuffleNetV2Cifar(_Common):
    """The release's ShuffleNetV2 (Ma et al. 2018 units, CIFAR stem); defaults are 0.5x.

    Layer for layer the bias-loss release's ``ShuffleNetV2(ratio=0.5)``: 448,268
    parameters at 100 classes.  Every convolution (stem, 1x1, depthwise, conv5) has a
    bias, PyTorch's default ``bias=True`` that the release keeps although each one feeds
    a BatchNorm; the biases are trained (and weight-decayed) parameters like any other.

    * Stem: 3x3 conv **stride 1** (3 -> 24) and BN, with **no ReLU** and **no
      max-pool**, so a 32 px input reaches the stages at 32x32 and conv5 at 4x4.
    * Stages 2-4 have ``stages_repeats`` = (4, 8, 4) units with out widths 48, 96, 192
      (``stages_out_channels[1:4]``); each stage starts with a stride-2 unit.
    * Stride-2 unit (input width ``c``, ``b = out / 2``): left branch 3x3 depthwise
      stride 2 BN, 1x1 conv (c -> b) BN ReLU; right branch 1x1 conv (c -> c) BN ReLU,
      3x3 depthwise stride 2 BN, 1x1 conv (c -> b) BN ReLU; concatenate [left, right];
      channel shuffle (2 groups).  (The right branch's hidden width is the input width
      ``c``, as in the release; torchvision uses ``b``.  At 0.5x, ``c == b`` in every
      stride-2 unit, so both layouts have the same shapes.)
    * Stride-1 unit: split the channels in halves [x1, x2]; a right branch (1x1 conv BN
      ReLU, 3x3 depthwise BN, 1x1 conv BN ReLU, all b wide) runs on x2; concatenate
      [x1, right(x2)]; channel shuffle.
    * conv5: 1x1 conv (192 -> 1024) BN ReLU -> global average pool -> Dense.

    ``aux``: ``stem``, ``stage2`` .. ``stage4``, ``features`` (conv5 output: 4x4x1024 at
    32 px, what bias loss uses) and ``embedding`` (N, 1024).

    The release's factory builds its 1.0x widths (24, 116, 232, 464, 1024) although its
    table says 0.5x; ``stages_out_channels`` builds those (or any even widths).
    `skipnet_jax.models.shufflenet_torch_keys` maps the release's state-dict names to
    these variables.
    """

    stages_repeats: Sequence[int] = (4, 8, 4)
    stages_out_channels: Sequence[int] = (24, 48, 96, 192, 1024)
    depthwise_impl: str = "auto"

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        check_images(images, "ShuffleNetV2Cifar")
        if len(self.stages_out_channels) != len(self.stages_repeats) + 2:
            raise ValueError("stages_out_channels needs len(stages_repeats) + 2 entries")
        aux: dict[str, Array] = {}
        x = jnp.asarray(images, self.dtype)
        x = self._biased_conv(x, self.stages_out_channels[0], 3, name="stem_conv")
        x = self._bn(train, name="stem_bn")(x)  # no ReLU: the release's stem is conv + BN
        aux["stem"] = x
        for s, (repeats, out) in enumerate(zip(self.stages_repeats, self.stages_out_channels[1:-1])):
            for u in range(repeats):
                x = self._unit(x, out, 2 if u == 0 else 1, train, f"stage{s + 2}_unit{u}")
            aux[f"stage{s + 2}"] = x
        x = self._biased_conv(x, self.stages_out_channels[-1], 1, name="conv5_conv")
        x = nn.relu(self._bn(train, name="conv5_bn")(x))
        aux["features"] = x
        return self._classify(x, train, aux), aux

    def _biased_conv(self, x: Array, features: int, kernel: int, name: str) -> Array:
        """Conv (stride 1, PyTorch padding) with PyTorch's default bias and its init."""
        return nn.Conv(
            features,
            (kernel, kernel),
            padding=torch_padding(kernel),
            use_bias=True,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_kernel_init,
            bias_init=_torch_default_bias_init(x.shape[-1] * kernel * kernel),
            name=name,
        )(x)

    def _depthwise(self, x: Array, strides: int, name: str) -> Array:
        return _BiasedDepthwise(
            kernel_size=3,
            strides=strides,
            impl=self.depthwise_impl,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            kernel_init=torch_default_kernel_init,
            name=name,
        )(x)

    def _branch(self, x: Array, hidden: int, width: int, strides: int, train: bool, name: str) -> Array:
        x = self._biased_conv(x, hidden, 1, name=f"{name}_conv1")
        x = nn.relu(self._bn(train, name=f"{name}_bn1")(x))
        x = self._depthwise(x, strides, name=f"{name}_dw")
        x = self._bn(train, name=f"{name}_bn2")(x)
        x = self._biased_conv(x, width, 1, name=f"{name}_conv2")
        return nn.relu(self._bn(train, name=f"{name}_bn3")(x))

    def _unit(self, x: Array, out: int, strides: int, train: bool, name: str) -> Array:
        if out % 2:
            raise ValueError(f"ShuffleNetV2 unit widths must be even, got {out}")
        b = out // 2
        if strides == 1:
            if x.shape[-1] != out:
                raise ValueError(f"stride-1 unit needs in == out, got {x.shape[-1]} != {out}")
            left, right = jnp.split(x, 2, axis=-1)
            right = self._branch(right, b, b, 1, train, f"{name}_right")
        else:
            left = self._depthwise(x, strides, name=f"{name}_left_dw")
            left = self._bn(train, name=f"{name}_left_bn1")(left)
            left = self._biased_conv(left, b, 1, name=f"{name}_left_conv")
            left = nn.relu(self._bn(train, name=f"{name}_left_bn2")(left))
            right = self._branch(x, x.shape[-1], b, strides, train, f"{name}_right")
        return channel_shuffle(jnp.concatenate([left, right], axis=-1), 2)


# --------------------------------------------------------------------------- DenseNet


class DenseNetCifar(_Common):
    """DenseNet-BC (Huang et al. 2017) with a CIFAR stem: the release's DenseNet-121.

    * Stem: 3x3 conv stride 1, 3 -> 2 * growth (64) channels, no BN, no max-pool (each
      dense layer starts with its own BN-ReLU).
    * Dense layer (bottleneck): BN ReLU 1x1 conv (-> 4 * growth) BN ReLU 3x3 conv
      (-> growth); its output is concatenated to its input.
    * Blocks of ``block_sizes`` = (6, 12, 24, 16) layers; between blocks a transition
      BN -> 1x1 conv (-> floor(0.5 * C)) -> 2x2 average pool stride 2.  As in the
      release (and unlike the DenseNet paper / torchvision) the transition has no ReLU.
      Widths: 64 -> 256 | 128 -> 512 | 256 -> 1024 | 512 -> 1024.
    * Final BN ReLU -> global average pool -> Dense.

    ``aux``: ``stem``, ``block1`` .. ``block4`` (dense-block outputs, before the
    transitions / the final BN), ``normed_features`` (final BN-ReLU output),
    ``features`` and ``embedding`` (N, 1024: the pooled ``normed_features``, i.e. the
    classifier's input).

    ``aux["features"]`` (what bias loss uses) is, by default, the last dense block's
    concatenated output **before** the final BN-ReLU -- the tensor the release returns
    and computes the variance on.  ``features_after_norm=True`` uses the BN-ReLU output
    instead.  Both are 4x4x1024 at 32 px.
    """

    growth_rate: int = 32
    block_sizes: Sequence[int] = (6, 12, 24, 16)
    bottleneck_factor: int = 4
    compression: float = 0.5
    features_after_norm: bool = False

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        check_images(images, "DenseNetCifar")
        g = self.growth_rate
        aux: dict[str, Array] = {}
        x = jnp.asarray(images, self.dtype)
        x = self._conv(2 * g, 3, name="stem_conv")(x)
        aux["stem"] = x
        for blk, layers in enumerate(self.block_sizes):
            for i in range(layers):
                name = f"block{blk + 1}_layer{i}"
                y = nn.relu(self._bn(train, name=f"{name}_bn1")(x))
                y = self._conv(self.bottleneck_factor * g, 1, name=f"{name}_conv1")(y)
                y = nn.relu(self._bn(train, name=f"{name}_bn2")(y))
                y = self._conv(g, 3, name=f"{name}_conv2")(y)
                x = jnp.concatenate([x, y], axis=-1)
            aux[f"block{blk + 1}"] = x
            if blk + 1 < len(self.block_sizes):
                name = f"transition{blk + 1}"
                x = self._bn(train, name=f"{name}_bn")(x)
                x = self._conv(int(self.compression * x.shape[-1]), 1, name=f"{name}_conv")(x)
                x = nn.avg_pool(x, (2, 2), strides=(2, 2), padding="VALID")
        normed = nn.relu(self._bn(train, name="final_bn")(x))
        aux["normed_features"] = normed
        aux["features"] = normed if self.features_after_norm else x
        return self._classify(normed, train, aux), aux


# --------------------------------------------------------------------------- registry


@register_model("resnet18_cifar")
def resnet18_cifar(*, num_classes: int = 100) -> ResNetCifar:
    """ResNet-18, CIFAR stem (11,220,132 params at 100 classes)."""
    return ResNetCifar(num_classes=num_classes)


@register_model("shufflenet_v2_x0_5")
def shufflenet_v2_x0_5(*, num_classes: int = 100) -> ShuffleNetV2Cifar:
    """ShuffleNetV2 0.5x, CIFAR stem: the release's model (448,268 params at 100 classes)."""
    return ShuffleNetV2Cifar(num_classes=num_classes)


@register_model("densenet121_cifar")
def densenet121_cifar(*, num_classes: int = 100) -> DenseNetCifar:
    """DenseNet-121 (growth 32), CIFAR stem (7,048,548 params at 100 classes)."""
    return DenseNetCifar(num_classes=num_classes)
