"""SkipNet (a.k.a. SkipblockNet) from "Bias Loss for Mobile Neural Networks" (ICCV 2021).

Architecture (the paper's, as the authors' release builds it), widths for multiplier ``w``
(``md`` = ``make_divisible(., 8)``):

1. ``stem``: conv 3x3 s2, 3 -> md(16w), BN, h_swish.
2. ``base_block``: inverted residual in = hidden = out = md(16w), k3 s1, h_swish, no SE,
   identity residual (the 1x1 expansion conv is present).
3. 14 inverted-residual blocks in four stages (``stage{1..4}_block{i}``), see
   :data:`STAGE_CONFIGS`; hidden = md(in * t), out = md(c * w).
4. ``skip1`` / ``skip2``: both take the base block's output, adaptive-avg-pool it to the
   spatial size of the stage output they are added to, then 1x1 conv (md(16w) -> hidden)
   BN ReLU, kxk depthwise s1 BN ReLU, 1x1 conv (hidden -> out) BN, no residual.
   skip1: k5, hidden md(16*6)=96, out md(40w), added to stage 1's output (= stage 2's input).
   skip2: k3, hidden md(16*2.3)=40, out md(80w), added to stage 2's output (= stage 3's input).
5. ``head``: 1x1 conv (md(160w) -> last block's hidden) BN h_swish  (the bias-loss features)
   -> global avg pool -> ``classifier_hidden`` Dense(-> H) h_swish -> dropout -> ``classifier``
   Dense(-> classes).  H = 1280 (large) / 1024 (small), md(H * w) when w > 1.

Every convolution pads (k-1)//2 on each side (PyTorch style, not 'SAME').

Torch checkpoint key prefix -> Flax variable path
=================================================

``S`` = 0..3 is the torch stage index, ``i`` the block within the stage.  A torch BN
``weight``/``bias`` goes to ``params/<path>/bn/{scale,bias}``, ``running_mean`` /
``running_var`` to ``batch_stats/<path>/bn/{mean,var}``; ``num_batches_tracked`` is
dropped.  Conv ``weight`` -> ``params/<path>/conv/kernel`` (OIHW -> HWIO, i.e.
``transpose(2, 3, 1, 0)``; depthwise (C,1,k,k) -> (k,k,1,C) with the same transpose);
linear ``weight``/``bias`` -> ``params/<path>/{kernel,bias}`` (weight transposed).

=================================  =========================================
torch key prefix                   Flax path (under params / batch_stats)
=================================  =========================================
``first_layer.0``  (conv)          ``stem/conv``
``first_layer.1``  (BN)            ``stem/bn``
``base_block.conv.0`` (1x1 conv)   ``base_block/expand/conv``
``base_block.conv.1`` (BN)         ``base_block/expand/bn``
``base_block.conv.3`` (dw conv)    ``base_block/depthwise/conv``
``base_block.conv.4`` (BN)         ``base_block/depthwise/bn``
``base_block.conv.7`` (1x1 conv)   ``base_block/project/conv``
``base_block.conv.8`` (BN)         ``base_block/project/bn``
``blocks.S.i.conv.0``              ``stage{S+1}_block{i}/expand/conv``
``blocks.S.i.conv.1``              ``stage{S+1}_block{i}/expand/bn``
``blocks.S.i.conv.3``              ``stage{S+1}_block{i}/depthwise/conv``
``blocks.S.i.conv.4``              ``stage{S+1}_block{i}/depthwise/bn``
``blocks.S.i.conv.6.fc.0`` (SE)    ``stage{S+1}_block{i}/se/fc1``
``blocks.S.i.conv.6.fc.2`` (SE)    ``stage{S+1}_block{i}/se/fc2``
``blocks.S.i.conv.7``              ``stage{S+1}_block{i}/project/conv``
``blocks.S.i.conv.8``              ``stage{S+1}_block{i}/project/bn``
``skip{1,2}.core_block.0``         ``skip{1,2}/expand/conv``
``skip{1,2}.core_block.1``         ``skip{1,2}/expand/bn``
``skip{1,2}.core_block.3``         ``skip{1,2}/depthwise/conv``
``skip{1,2}.core_block.4``         ``skip{1,2}/depthwise/bn``
``skip{1,2}.core_block.6``         ``skip{1,2}/project/conv``
``skip{1,2}.core_block.7``         ``skip{1,2}/project/bn``
``conv.0`` (head 1x1 conv)         ``head/conv``
``conv.1`` (head BN)               ``head/bn``
``classifier.0`` (Linear)          ``classifier_hidden``
``classifier.3`` (Linear)          ``classifier``
=================================  =========================================

:func:`torch_key_to_flax_path` implements this table; :func:`torch_array_to_flax`
applies the layout change.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import linen as nn

from skipnet_jax.models import register_model
from skipnet_jax.models.layers import (
    BN_EPSILON,
    BN_MOMENTUM,
    ConvBN,
    InvertedResidual,
    adaptive_avg_pool,
    dense_kernel_init,
    global_avg_pool,
    hard_swish,
    make_divisible,
)

Array = jax.Array
Dtype = Any

__all__ = [
    "AUX_KEYS",
    "STAGE_CONFIGS",
    "SkipNet",
    "TorchKeyTarget",
    "skipnet_l",
    "skipnet_m",
    "skipnet_s",
    "skipnet_widths",
    "skipnet_xs",
    "torch_array_to_flax",
    "torch_key_to_flax_path",
]

# (kernel, expansion t, out channels before w, SE, h_swish, stride) per IR block.
STAGE_CONFIGS: tuple[tuple[tuple[int, float, int, bool, bool, int], ...], ...] = (
    (  # stage 1: 112 -> 28 at 224 px
        (3, 4, 24, False, False, 2),
        (3, 3, 24, False, False, 1),
        (5, 3, 40, True, False, 2),
        (5, 3, 40, True, False, 1),
        (5, 6, 40, True, True, 1),
    ),
    (  # stage 2: 28 -> 14
        (3, 6, 80, False, True, 2),
        (3, 2.5, 80, False, True, 1),
        (3, 2.3, 80, False, True, 1),
        (3, 2.3, 80, False, True, 1),
    ),
    (  # stage 3: 14 -> 14
        (3, 6, 112, True, True, 1),
        (3, 6, 112, True, True, 1),
    ),
    (  # stage 4: 14 -> 7
        (5, 6, 160, True, True, 2),
        (5, 6, 160, True, True, 1),
        (5, 6, 160, True, True, 1),
    ),
)

# (kernel, expansion of the *unscaled* 16-channel stem, out channels before w)
SKIP1_CONFIG = (5, 6, 40)  # added to stage 1's output
SKIP2_CONFIG = (3, 2.3, 80)  # added to stage 2's output

CLASSIFIER_HIDDEN = {"large": 1280, "small": 1024}

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


def skipnet_widths(mode: str, width_multiplier: float) -> dict[str, Any]:
    """Channel widths of every SkipNet layer for a (mode, width_multiplier)."""
    if mode not in CLASSIFIER_HIDDEN:
        raise ValueError(f"Unknown SkipNet mode {mode!r}; valid choices: {', '.join(sorted(CLASSIFIER_HIDDEN))}")
    w = float(width_multiplier)
    if w <= 0:
        raise ValueError(f"width_multiplier must be positive, got {w}")
    stem = make_divisible(16 * w, 8)
    stages = []
    c_in = stem
    for stage in STAGE_CONFIGS:
        blocks = []
        for k, t, c, se, hs, s in stage:
            hidden = make_divisible(c_in * t, 8)
            out = make_divisible(c * w, 8)
            blocks.append(dict(kernel=k, hidden=hidden, out=out, se=se, hswish=hs, stride=s))
            c_in = out
        stages.append(blocks)
    skips = [
        dict(kernel=k, hidden=make_divisible(16 * t, 8), out=make_divisible(c * w, 8))
        for k, t, c in (SKIP1_CONFIG, SKIP2_CONFIG)
    ]
    h = CLASSIFIER_HIDDEN[mode]
    if w > 1.0:
        h = make_divisible(h * w, 8)
    return dict(
        stem=stem,
        stages=stages,
        skip1=skips[0],
        skip2=skips[1],
        head=stages[-1][-1]["hidden"],
        classifier_hidden=h,
    )


class SkipNet(nn.Module):
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
    ``stage2 + skip2``.

    Dropout (before ``classifier``) uses the ``'dropout'`` RNG and is active only when
    ``train=True``; BatchNorm uses batch statistics and updates ``'batch_stats'``
    (pass ``mutable=['batch_stats']``) when ``train=True``.
    """

    num_classes: int = 1000
    width_multiplier: float = 1.0
    mode: str = "large"
    dropout_rate: float = 0.2
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    depthwise_impl: str = "auto"
    bn_momentum: float = BN_MOMENTUM
    bn_epsilon: float = BN_EPSILON

    # ------------------------------------------------------------------ forward
    @nn.compact
    def __call__(self, images: Array, train: bool = False) -> tuple[Array, dict[str, Array]]:
        if images.ndim != 4:
            raise ValueError(f"SkipNet expects NHWC images, got shape {images.shape}")
        cfg = skipnet_widths(self.mode, self.width_multiplier)
        common = dict(
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            bn_momentum=self.bn_momentum,
            bn_epsilon=self.bn_epsilon,
        )
        ir = dict(depthwise_impl=self.depthwise_impl, **common)
        aux: dict[str, Array] = {}

        x = jnp.asarray(images, self.dtype)
        x = ConvBN(cfg["stem"], 3, 2, act=hard_swish, name="stem", **common)(x, train)
        aux["stem"] = x

        stem_c = cfg["stem"]
        x = InvertedResidual(
            stem_c,
            stem_c,
            kernel_size=3,
            strides=1,
            use_se=False,
            act=hard_swish,
            name="base_block",
            **ir,
        )(x, train)
        base = x
        aux["base"] = base

        def run_stage(x: Array, s: int) -> Array:
            for i, b in enumerate(cfg["stages"][s]):
                x = InvertedResidual(
                    b["hidden"],
                    b["out"],
                    kernel_size=b["kernel"],
                    strides=b["stride"],
                    use_se=b["se"],
                    act=hard_swish if b["hswish"] else nn.relu,
                    name=f"stage{s + 1}_block{i}",
                    **ir,
                )(x, train)
            return x

        def run_skip(target: Array, idx: int) -> Array:
            sc = cfg[f"skip{idx}"]
            pooled = adaptive_avg_pool(base, target.shape[1:3])
            return InvertedResidual(
                sc["hidden"],
                sc["out"],
                kernel_size=sc["kernel"],
                strides=1,
                use_se=False,
                act=nn.relu,
                use_residual=False,
                name=f"skip{idx}",
                **ir,
            )(pooled, train)

        x = run_stage(x, 0)
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

        x = ConvBN(cfg["head"], 1, act=hard_swish, name="head", **common)(x, train)
        aux["features"] = x

        x = global_avg_pool(x)
        aux["embedding"] = x

        dense = dict(kernel_init=dense_kernel_init, bias_init=nn.initializers.zeros, param_dtype=self.param_dtype)
        x = nn.Dense(cfg["classifier_hidden"], dtype=self.dtype, name="classifier_hidden", **dense)(x)
        x = hard_swish(x)
        aux["pre_logits"] = x
        x = nn.Dropout(rate=self.dropout_rate, deterministic=not train)(x)
        # The last layer runs in float32 so logits are float32 for any compute dtype.
        logits = nn.Dense(self.num_classes, dtype=jnp.float32, name="classifier", **dense)(x.astype(jnp.float32))
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


# --------------------------------------------------------------------------- torch keys


class TorchKeyTarget(NamedTuple):
    """Where a torch state_dict entry goes in the Flax variables.

    ``collection``: ``"params"`` or ``"batch_stats"``; ``path``: tuple of names inside
    that collection; ``layout``: ``"conv"`` (OIHW -> HWIO, also used for depthwise
    (C,1,k,k) -> (k,k,1,C)), ``"linear"`` ((out, in) -> (in, out)) or ``"vector"``.
    """

    collection: str
    path: tuple[str, ...]
    layout: str


_IR_SEQ = {  # index in the torch `conv` Sequential of an IR block -> (module, kind)
    "0": ("expand", "conv"),
    "1": ("expand", "bn"),
    "3": ("depthwise", "conv"),
    "4": ("depthwise", "bn"),
    "7": ("project", "conv"),
    "8": ("project", "bn"),
}
_SKIP_SEQ = {  # index in a skip block's `core_block` Sequential
    "0": ("expand", "conv"),
    "1": ("expand", "bn"),
    "3": ("depthwise", "conv"),
    "4": ("depthwise", "bn"),
    "6": ("project", "conv"),
    "7": ("project", "bn"),
}
_BN_LEAF = {
    "weight": ("params", "scale"),
    "bias": ("params", "bias"),
    "running_mean": ("batch_stats", "mean"),
    "running_var": ("batch_stats", "var"),
}


def _layer_target(prefix: tuple[str, ...], kind: str, leaf: str, key: str) -> TorchKeyTarget | None:
    if kind == "conv":
        if leaf != "weight":
            raise KeyError(f"unexpected conv entry {key!r}")
        return TorchKeyTarget("params", (*prefix, "conv", "kernel"), "conv")
    if kind == "bn":
        if leaf == "num_batches_tracked":
            return None
        if leaf not in _BN_LEAF:
            raise KeyError(f"unexpected BatchNorm entry {key!r}")
        col, name = _BN_LEAF[leaf]
        return TorchKeyTarget(col, (*prefix, "bn", name), "vector")
    if kind == "linear":
        if leaf == "weight":
            return TorchKeyTarget("params", (*prefix, "kernel"), "linear")
        if leaf == "bias":
            return TorchKeyTarget("params", (*prefix, "bias"), "vector")
        raise KeyError(f"unexpected Linear entry {key!r}")
    raise AssertionError(kind)


_RE_STEM = re.compile(r"^first_layer\.(\d+)\.(\w+)$")
_RE_BLOCK = re.compile(r"^(?:base_block|blocks\.(\d+)\.(\d+))\.conv\.(\d+)\.(?:fc\.(\d+)\.)?(\w+)$")
_RE_SKIP = re.compile(r"^skip([12])\.core_block\.(\d+)\.(\w+)$")
_RE_HEAD = re.compile(r"^conv\.(\d+)\.(\w+)$")
_RE_CLS = re.compile(r"^classifier\.(\d+)\.(\w+)$")


def torch_key_to_flax_path(key: str) -> TorchKeyTarget | None:
    """Map a key of the released PyTorch SkipNet state_dict to its Flax variable.

    Returns ``None`` for entries that have no Flax counterpart
    (``num_batches_tracked``); raises ``KeyError`` for keys that are not part of the
    release's layout.  See the module docstring for the full table.
    """
    if m := _RE_STEM.match(key):
        idx, leaf = m.groups()
        kind = {"0": "conv", "1": "bn"}.get(idx)
        if kind:
            return _layer_target(("stem",), kind, leaf, key)
    elif m := _RE_BLOCK.match(key):
        stage, block, idx, fc, leaf = m.groups()
        prefix = ("base_block",) if stage is None else (f"stage{int(stage) + 1}_block{int(block)}",)
        if fc is not None:
            if idx == "6" and fc in ("0", "2"):
                return _layer_target((*prefix, "se", "fc1" if fc == "0" else "fc2"), "linear", leaf, key)
        elif idx in _IR_SEQ:
            module, kind = _IR_SEQ[idx]
            return _layer_target((*prefix, module), kind, leaf, key)
    elif m := _RE_SKIP.match(key):
        which, idx, leaf = m.groups()
        if idx in _SKIP_SEQ:
            module, kind = _SKIP_SEQ[idx]
            return _layer_target((f"skip{which}", module), kind, leaf, key)
    elif m := _RE_HEAD.match(key):
        idx, leaf = m.groups()
        kind = {"0": "conv", "1": "bn"}.get(idx)
        if kind:
            return _layer_target(("head",), kind, leaf, key)
    elif m := _RE_CLS.match(key):
        idx, leaf = m.groups()
        name = {"0": "classifier_hidden", "3": "classifier"}.get(idx)
        if name:
            return _layer_target((name,), "linear", leaf, key)
    raise KeyError(f"torch key {key!r} is not part of the SkipNet release layout")


def torch_array_to_flax(array: Any, layout: str) -> np.ndarray:
    """Apply the layout change of :class:`TorchKeyTarget.layout` to a numpy array."""
    a = np.asarray(array)
    if layout == "conv":  # OIHW -> HWIO; depthwise (C, 1, kh, kw) -> (kh, kw, 1, C)
        return np.transpose(a, (2, 3, 1, 0))
    if layout == "linear":  # (out, in) -> (in, out)
        return np.transpose(a)
    if layout == "vector":
        return a
    raise ValueError(f"Unknown layout {layout!r}; valid choices: conv, linear, vector")
