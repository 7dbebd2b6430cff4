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

from typing import NamedTuple

import jax
from flax import linen as nn

from skipnet_jax.models.layers import InvertedResidual, check_images
from skipnet_jax.models.mobile_base import CLASSIFIER_HIDDEN, HS, RE, MobileBase
from skipnet_jax.models.registry import register_model

Array = jax.Array

__all__ = [
    "MOBILENET_V3_CONFIGS",
    "MobileNetV3",
    "MobileNetV3BlockSpec",
    "mobilenet_v3_large",
    "mobilenet_v3_small",
]

# torchvision's MobileNetV3 BatchNorm: eps 1e-3, PyTorch momentum 0.01.
MBV3_BN_EPSILON = 1e-3
MBV3_BN_MOMENTUM = 0.99


class MobileNetV3BlockSpec(NamedTuple):
    """One row of the MobileNetV3 paper's tables: ``(k, exp size, #out, SE, NL, s)``.

    ``expanded`` is the hidden width itself (not a ratio, unlike SkipNet's table); the
    input width of a block is the previous block's output (the stem's 16 for the first).
    """

    kernel: int
    expanded: int
    out: int
    use_se: bool
    activation: str  # the "NL" column: RE (ReLU) or HS (h_swish)
    stride: int


_B = MobileNetV3BlockSpec

MOBILENET_V3_CONFIGS: dict[str, tuple[MobileNetV3BlockSpec, ...]] = {
    "large": (
        _B(3, 16, 16, False, RE, 1),
        _B(3, 64, 24, False, RE, 2),
        _B(3, 72, 24, False, RE, 1),
        _B(5, 72, 40, True, RE, 2),
        _B(5, 120, 40, True, RE, 1),
        _B(5, 120, 40, True, RE, 1),
        _B(3, 240, 80, False, HS, 2),
        _B(3, 200, 80, False, HS, 1),
        _B(3, 184, 80, False, HS, 1),
        _B(3, 184, 80, False, HS, 1),
        _B(3, 480, 112, True, HS, 1),
        _B(3, 672, 112, True, HS, 1),
        _B(5, 672, 160, True, HS, 2),
        _B(5, 960, 160, True, HS, 1),
        _B(5, 960, 160, True, HS, 1),
    ),
    "small": (
        _B(3, 16, 16, True, RE, 2),
        _B(3, 72, 24, False, RE, 2),
        _B(3, 88, 24, False, RE, 1),
        _B(5, 96, 40, True, HS, 2),
        _B(5, 240, 40, True, HS, 1),
        _B(5, 240, 40, True, HS, 1),
        _B(5, 120, 48, True, HS, 1),
        _B(5, 144, 48, True, HS, 1),
        _B(5, 288, 96, True, HS, 2),
        _B(5, 576, 96, True, HS, 1),
        _B(5, 576, 96, True, HS, 1),
    ),
}
STEM_WIDTH = 16


class MobileNetV3(MobileBase):
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

    Fields: `MobileBase`, with torchvision's BatchNorm settings as defaults.
    """

    bn_momentum: float = MBV3_BN_MOMENTUM
    bn_epsilon: float = MBV3_BN_EPSILON

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        check_images(images, "MobileNetV3")
        if self.mode not in MOBILENET_V3_CONFIGS:
            raise ValueError(
                f"Unknown MobileNetV3 mode {self.mode!r}; valid choices: {', '.join(sorted(MOBILENET_V3_CONFIGS))}"
            )
        aux: dict[str, Array] = {}
        x = self._stem(images, STEM_WIDTH, train, aux)
        for i, b in enumerate(MOBILENET_V3_CONFIGS[self.mode]):
            x = InvertedResidual(
                b.expanded,
                b.out,
                kernel_size=b.kernel,
                strides=b.stride,
                use_se=b.use_se,
                act=b.activation,
                use_expand=b.expanded != x.shape[-1],
                depthwise_impl=self.depthwise_impl,
                name=f"block{i}",
                **self._layer_kwargs(),
            )(x, train)
        aux["blocks"] = x
        logits = self._head(x, 6 * x.shape[-1], CLASSIFIER_HIDDEN[self.mode], train, aux)
        return logits, aux


@register_model("mobilenet_v3_large")
def mobilenet_v3_large(*, num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Large 1.0 (5,483,032 params at 1000 classes, as torchvision)."""
    return MobileNetV3(num_classes=num_classes, mode="large")


@register_model("mobilenet_v3_small")
def mobilenet_v3_small(*, num_classes: int = 1000) -> MobileNetV3:
    """MobileNetV3-Small 1.0 (2,542,856 params at 1000 classes, as torchvision)."""
    return MobileNetV3(num_classes=num_classes, mode="small")
