"""MobileNetV3-Large / -Small (Howard et al., "Searching for MobileNetV3", ICCV 2019).

The layer layout follows torchvision's ``mobilenet_v3_large`` / ``mobilenet_v3_small``
(width 1.0) so that parameter counts agree exactly at 1000 classes:

=======================  ==============
model                    parameters
=======================  ==============
``mobilenet_v3_large``   5,483,032
``mobilenet_v3_small``   2,542,856
=======================  ==============

Layout (NHWC, every conv pads ``(k - 1) // 2`` on each side like PyTorch):

* stem: 3x3 conv stride 2, 3 -> 16, BN, h_swish;
* inverted-residual blocks (table below): optional 1x1 expansion conv BN act -- *absent*
  when the expanded width equals the input width (the first block of both models) --,
  kxk depthwise conv BN act, optional squeeze-excite on the expanded tensor
  (squeeze width ``make_divisible(hidden / 4, 8)``, ReLU then hard-sigmoid, both FCs with
  bias), 1x1 projection conv BN; identity residual when stride 1 and in == out;
* head: 1x1 conv -> 6 x the last block's output width (960 / 576) BN h_swish (these are
  ``aux["features"]``, what bias loss uses) -> global average pool -> Dense(1280 / 1024)
  h_swish -> dropout (0.2) -> Dense(num_classes).

BatchNorm uses torchvision's MobileNetV3 settings: epsilon 1e-3 and PyTorch momentum
0.01 (= Flax momentum 0.99); both are module fields (``bn_epsilon``, ``bn_momentum``).
Initialisation: conv kernels ``N(0, sqrt(2 / (k*k*out)))`` (He, fan-out), BN 1 / 0,
Dense ``N(0, 0.01)`` with zero bias (the squeeze-excite FCs included).
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
from flax import linen as nn

from skipnet_jax.models import register_model
from skipnet_jax.models.layers import (
    ConvBN,
    InvertedResidual,
    dense_kernel_init,
    global_avg_pool,
    hard_swish,
)

Array = jax.Array
Dtype = Any

__all__ = [
    "MOBILENET_V3_CONFIGS",
    "MobileNetV3",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]

# torchvision's MobileNetV3 BatchNorm: eps 1e-3, PyTorch momentum 0.01.
MBV3_BN_EPSILON = 1e-3
MBV3_BN_MOMENTUM = 0.99

# Per block: (kernel, expanded width, out width, SE, h_swish, stride).  The input width
# of a block is the previous block's output (16, the stem width, for the first one).
MOBILENET_V3_CONFIGS: dict[str, tuple[tuple[int, int, int, bool, bool, int], ...]] = {
    "large": (
        (3, 16, 16, False, False, 1),
        (3, 64, 24, False, False, 2),
        (3, 72, 24, False, False, 1),
        (5, 72, 40, True, False, 2),
        (5, 120, 40, True, False, 1),
        (5, 120, 40, True, False, 1),
        (3, 240, 80, False, True, 2),
        (3, 200, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 184, 80, False, True, 1),
        (3, 480, 112, True, True, 1),
        (3, 672, 112, True, True, 1),
        (5, 672, 160, True, True, 2),
        (5, 960, 160, True, True, 1),
        (5, 960, 160, True, True, 1),
    ),
    "small": (
        (3, 16, 16, True, False, 2),
        (3, 72, 24, False, False, 2),
        (3, 88, 24, False, False, 1),
        (5, 96, 40, True, True, 2),
        (5, 240, 40, True, True, 1),
        (5, 240, 40, True, True, 1),
        (5, 120, 48, True, True, 1),
        (5, 144, 48, True, True, 1),
        (5, 288, 96, True, True, 2),
        (5, 576, 96, True, True, 1),
        (5, 576, 96, True, True, 1),
    ),
}
STEM_WIDTH = 16
CLASSIFIER_HIDDEN = {"large": 1280, "small": 1024}


class MobileNetV3(nn.Module):
    """MobileNetV3 classifier for NHWC images of any size >= 32 px.

    ``__call__(images, train=False) -> (logits, aux)``; ``logits`` float32
    ``(N, num_classes)``.  ``aux`` (in ``dtype``):

    ==============  =============================================  =====================
    key             tensor                                         at 224 px (large)
    ==============  =============================================  =====================
    ``stem``        stem conv + BN + h_swish                       112x112x16
    ``blocks``      output of the last inverted-residual block     7x7x160
    ``features``    head 1x1 conv + BN + h_swish (bias loss)       7x7x960
    ``embedding``   global average of ``features``                 (N, 960)
    ``pre_logits``  classifier-hidden Dense + h_swish              (N, 1280)
    ==============  =============================================  =====================

    Dropout (before ``classifier``) uses the ``'dropout'`` RNG and is active only in
    train mode, where BatchNorm also uses batch statistics and updates the mutable
    ``'batch_stats'`` collection.
    """

    num_classes: int = 1000
    mode: str = "large"
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_impl: str = "auto"
    bn_momentum: float = MBV3_BN_MOMENTUM
    bn_epsilon: float = MBV3_BN_EPSILON

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        if images.ndim != 4:
            raise ValueError(f"MobileNetV3 expects NHWC images, got shape {images.shape}")
        if self.mode not in MOBILENET_V3_CONFIGS:
            raise ValueError(
                f"Unknown MobileNetV3 mode {self.mode!r}; valid choices: {', '.join(sorted(MOBILENET_V3_CONFIGS))}"
            )
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        aux: dict[str, Array] = {}

        x = jnp.asarray(images, self.dtype)
        x = ConvBN(STEM_WIDTH, 3, 2, act=hard_swish, name="stem", **common)(x, train)
        aux["stem"] = x

        for i, (k, hidden, out, se, hs, s) in enumerate(MOBILENET_V3_CONFIGS[self.mode]):
            x = InvertedResidual(
                hidden,
                out,
                kernel_size=k,
                strides=s,
                use_se=se,
                act=hard_swish if hs else nn.relu,
                use_expand=hidden != x.shape[-1],
                depthwise_impl=self.depthwise_impl,
                name=f"block{i}",
                **common,
            )(x, train)
        aux["blocks"] = x

        x = ConvBN(6 * x.shape[-1], 1, act=hard_swish, name="head", **common)(x, train)
        aux["features"] = x

        x = global_avg_pool(x)
        aux["embedding"] = x

        dense = dict(kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros, param_dtype=self.param_dtype)
        x = nn.Dense(CLASSIFIER_HIDDEN[self.mode], dtype=self.dtype, name="classifier_hidden", **dense)(x)
        x = hard_swish(x)
        aux["pre_logits"] = x
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
        # The last layer runs in float32 so logits are float32 for any compute dtype.
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier", **dense)(x.astype(jnp.float32))
        return logits, aux


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(*, num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large 1.0 (5,483,032 params at 1000 classes, as torchvision)."""
    return MobileNetV3(num_classes=num_classes, mode="large")


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(*, num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Small 1.0 (2,542,856 params at 1000 classes, as torchvision)."""
    return MobileNetV3(num_classes=num_classes, mode="small")
