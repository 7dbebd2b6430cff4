"""SkipNet (a.k.a. SkipblockNet) from "Bias Loss for Mobile Neural Networks" (ICCV 2021).

Architecture (the paper's, as the authors' release builds it), widths for multiplier ``w``
(``md`` = ``make_divisible(., 8)``):

1. ``stem``: conv 3x3 s2, 3 -> md(16w), BN, h_swish.
2. ``base_block``: inverted residual in = hidden = out = md(16w), k3 s1, h_swish, no SE,
   identity residual (the 1x1 expansion conv is present).
3. 14 inverted-residual blocks in four stages (``stage{1..4}_block{i}``), see
   :data:`STAGE_CONFIGS`; hidden = md(in * t), out = md(c * w).
4. ``skip1`` / ``skip2`` (:data:`SKIP_CONFIGS`): both take the base block's output,
   adaptive-avg-pool it to the spatial size of the stage output they are added to, then
   1x1 conv (md(16w) -> hidden) BN ReLU, kxk depthwise s1 BN ReLU, 1x1 conv (hidden ->
   out) BN, no residual.  hidden = md(16 * t) (the unscaled stem width), out = md(c * w).
   skip1 is added to stage 1's output (= stage 2's input), skip2 to stage 2's output.
5. ``head``: 1x1 conv (md(160w) -> last block's hidden) BN h_swish  (the bias-loss features)
   -> global avg pool -> ``classifier_hidden`` Dense(-> H) h_swish -> dropout -> ``classifier``
   Dense(-> classes).  H = 1280 (large) / 1024 (small), md(H * w) when w > 1.

Every convolution pads (k-1)//2 on each side (PyTorch style, not 'SAME').  The names of
the release's PyTorch state_dict entries for these layers are in
`skipnet_jax.models.skipnet_torch_keys`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
from flax import linen as nn

from skipnet_jax.models.layers import InvertedResidual, check_images, make_divisible
from skipnet_jax.models.mobile_base import CLASSIFIER_HIDDEN, HS, RE, MobileBase
from skipnet_jax.models.registry import register_model
from skipnet_jax.models.torch_compat import adaptive_avg_pool

Array = jax.Array

__all__ = [
    "AUX_KEYS",
    "BASE_CONFIG",
    "SKIP_CONFIGS",
    "STAGE_CONFIGS",
    "SkipNet",
    "SkipNetBlockSpec",
    "block_name",
    "skipnet_l",
    "skipnet_m",
    "skipnet_s",
    "skipnet_widths",
    "skipnet_xs",
]


class SkipNetBlockSpec(NamedTuple):
    """One row of the paper's block table: ``(k, t, out, SE, NL, s)``.

    ``expansion`` is the ratio ``t`` (hidden = md(in * t)) and ``out`` the output width
    before the width multiplier.
    """

    kernel: int
    expansion: float
    out: int
    use_se: bool
    activation: str  # the "NL" column: RE (ReLU) or HS (h_swish)
    stride: int


STEM_WIDTH = 16  # before the width multiplier
_B = SkipNetBlockSpec

# The base block: in = hidden = out = the stem width, with its identity residual.
BASE_CONFIG = _B(3, 1, 16, False, HS, 1)

# The 14 inverted-residual blocks, stage by stage.
STAGE_CONFIGS: tuple[tuple[SkipNetBlockSpec, ...], ...] = (
    (  # stage 1: 112 -> 28 at 224 px
        _B(3, 4, 24, False, RE, 2),
        _B(3, 3, 24, False, RE, 1),
        _B(5, 3, 40, True, RE, 2),
        _B(5, 3, 40, True, RE, 1),
        _B(5, 6, 40, True, HS, 1),
    ),
    (  # stage 2: 28 -> 14
        _B(3, 6, 80, False, HS, 2),
        _B(3, 2.5, 80, False, HS, 1),
        _B(3, 2.3, 80, False, HS, 1),
        _B(3, 2.3, 80, False, HS, 1),
    ),
    (  # stage 3: 14 -> 14
        _B(3, 6, 112, True, HS, 1),
        _B(3, 6, 112, True, HS, 1),
    ),
    (  # stage 4: 14 -> 7
        _B(5, 6, 160, True, HS, 2),
        _B(5, 6, 160, True, HS, 1),
        _B(5, 6, 160, True, HS, 1),
    ),
)

# skip1 (added to stage 1's output) and skip2 (added to stage 2's output).  Their
# expansion applies to the *unscaled* stem width, STEM_WIDTH.
SKIP_CONFIGS: tuple[SkipNetBlockSpec, SkipNetBlockSpec] = (
    _B(5, 6, 40, False, RE, 1),
    _B(3, 2.3, 80, False, RE, 1),
)

AUX_KEYS = (
    "stem",
    "base",
    "skip1",
    "skip2",
    "stage1",
    "stage2",
    "stage3",
    "stage4",
    "features",
    "embedding",
    "pre_logits",
)


def block_name(stage: int, index: int) -> str:
    """Flax name of block ``index`` of stage ``stage`` (both 0-based) of `STAGE_CONFIGS`."""
    return f"stage{stage + 1}_block{index}"


def _block_widths(spec: SkipNetBlockSpec, in_width: int, w: float) -> dict[str, Any]:
    """``spec`` with its hidden width md(in_width * t) and output width md(out * w)."""
    return dict(
        kernel=spec.kernel,
        hidden=make_divisible(in_width * spec.expansion, 8),
        out=make_divisible(spec.out * w, 8),
        use_se=spec.use_se,
        activation=spec.activation,
        stride=spec.stride,
    )


def skipnet_widths(mode: str, width_multiplier: float) -> dict[str, Any]:
    """Every SkipNet layer's widths for a (mode, width_multiplier): ``stem``, ``base``,
    ``stages``, ``skip1``, ``skip2`` (blocks: `_block_widths`), ``head`` and
    ``classifier_hidden``."""
    if mode not in CLASSIFIER_HIDDEN:
        raise ValueError(f"Unknown SkipNet mode {mode!r}; valid choices: {', '.join(sorted(CLASSIFIER_HIDDEN))}")
    w = float(width_multiplier)
    if w <= 0:
        raise ValueError(f"width_multiplier must be positive, got {w}")
    stem = make_divisible(STEM_WIDTH * w, 8)
    stages = []
    c_in = stem
    for stage in STAGE_CONFIGS:
        blocks = []
        for spec in stage:
            blocks.append(_block_widths(spec, c_in, w))
            c_in = blocks[-1]["out"]
        stages.append(blocks)
    skip1, skip2 = (_block_widths(spec, STEM_WIDTH, w) for spec in SKIP_CONFIGS)
    h = CLASSIFIER_HIDDEN[mode]
    if w > 1.0:
        h = make_divisible(h * w, 8)
    return dict(
        stem=stem,
        base=_block_widths(BASE_CONFIG, stem, w),
        stages=stages,
        skip1=skip1,
        skip2=skip2,
        head=stages[-1][-1]["hidden"],
        classifier_hidden=h,
    )


class SkipNet(MobileBase):
    """SkipNet classifier (the architecture above) for NHWC images of any size >= 32 px.

    ``__call__(images, train=False) -> (logits, aux)``.  ``logits`` is float32
    ``(N, num_classes)`` whatever ``dtype`` is.  ``aux`` holds (in ``dtype``):

    ==============  ==========================================================  ==============
    key             tensor                                                      at 224 px (M)
    ==============  ==========================================================  ==============
    ``stem``        stem conv + BN + h_swish output                             112x112x16
    ``base``        base block output (input of stage 1 and of both skips)      112x112x16
    ``skip1``       skip1 output (pool -> 1x1 -> dw5x5 -> 1x1 BN)               28x28x40
    ``skip2``       skip2 output                                                14x14x80
    ``stage1``      output of stage 1's last block, *before* adding skip1       28x28x40
    ``stage2``      output of stage 2's last block, *before* adding skip2       14x14x80
    ``stage3``      output of stage 3's last block                              14x14x112
    ``stage4``      output of stage 4's last block                              7x7x160
    ``features``    head 1x1 conv + BN + h_swish, before pooling (bias loss)    7x7x960
    ``embedding``   global average of ``features``                              (N, 960)
    ``pre_logits``  ``classifier_hidden`` Dense + h_swish (before dropout)      (N, 1280)
    ==============  ==========================================================  ==============

    The input of stage 2 is ``stage1 + skip1`` and the input of stage 3 is
    ``stage2 + skip2``.  Fields other than ``width_multiplier``: `MobileBase`.
    """

    width_multiplier: float = 1.0

    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        check_images(images, "SkipNet")
        cfg = skipnet_widths(self.mode, self.width_multiplier)
        ir = dict(depthwise_impl=self.depthwise_impl, **self._layer_kwargs())
        aux: dict[str, Array] = {}

        def block(x: Array, b: dict[str, Any], name: str, **kwargs: Any) -> Array:
            return InvertedResidual(
                b["hidden"],
                b["out"],
                kernel_size=b["kernel"],
                strides=b["stride"],
                use_se=b["use_se"],
                act=b["activation"],
                name=name,
                **kwargs,
                **ir,
            )(x, train)

        x = self._stem(images, cfg["stem"], train, aux)
        base = block(x, cfg["base"], "base_block")
        aux["base"] = base

        def run_stage(x: Array, s: int) -> Array:
            for i, b in enumerate(cfg["stages"][s]):
                x = block(x, b, block_name(s, i))
            return x

        def run_skip(target: Array, idx: int) -> Array:
            pooled = adaptive_avg_pool(base, target.shape[1:3])
            return block(pooled, cfg[f"skip{idx}"], f"skip{idx}", use_residual=False)

        x = run_stage(base, 0)
        aux["stage1"] = x
        skip1 = run_skip(x, 1)
        aux["skip1"] = skip1
        x = x + skip1

        x = run_stage(x, 1)
        aux["stage2"] = x
        skip2 = run_skip(x, 2)
        aux["skip2"] = skip2
        x = x + skip2

        x = run_stage(x, 2)
        aux["stage3"] = x
        x = run_stage(x, 3)
        aux["stage4"] = x

        logits = self._head(x, cfg["head"], cfg["classifier_hidden"], train, aux)
        return logits, aux


# --------------------------------------------------------------------------- variants


@register_model("skipnet_xs")
def skipnet_xs(*, num_classes: int = 1000) -> SkipNet:
    """SkipNet-XS: small, w = 0.5 (2,332,584 params at 1000 classes)."""
    return SkipNet(num_classes=num_classes, mode="small", width_multiplier=0.5)


@register_model("skipnet_s")
def skipnet_s(*, num_classes: int = 1000) -> SkipNet:
    """SkipNet-S: small, w = 0.75 (3,587,416 params at 1000 classes)."""
    return SkipNet(num_classes=num_classes, mode="small", width_multiplier=0.75)


@register_model("skipnet_m")
def skipnet_m(*, num_classes: int = 1000) -> SkipNet:
    """SkipNet-M: large, w = 1.0 (5,532,352 params at 1000 classes)."""
    return SkipNet(num_classes=num_classes, mode="large", width_multiplier=1.0)


@register_model("skipnet_l")
def skipnet_l(*, num_classes: int = 1000) -> SkipNet:
    """SkipNet-L: large, w = 1.15 (7,127,384 params at 1000 classes)."""
    return SkipNet(num_classes=num_classes, mode="large", width_multiplier=1.15)
