"""Independent PyTorch reference of SkipNet (a.k.a. SkipblockNet).

Written from the architecture the paper describes (Abrahamyan et al., ICCV 2021, arXiv
2107.11170) and the layout of the authors' released checkpoint
(github.com/lusinlu/bias-loss-skipblocknet); no code was taken from the authors' release or
any other project.

The module tree is laid out so that ``TorchSkipNet("large", 1.0).state_dict()`` has exactly the
354 names and shapes of the released SkipNet-M checkpoint
(``skipnet_m_torch_state_dict.json``); a released state_dict can therefore be loaded with
``model.load_state_dict(sd)`` and used as ground truth for the Flax port.

Layout (positions inside ``nn.Sequential``):

* ``first_layer``: 0 conv3x3/s2, 1 BN, 2 h_swish
* ``base_block.conv`` and ``blocks.{S}.{i}.conv`` (inverted residual):
  0 conv1x1, 1 BN, 2 act, 3 depthwise kxk, 4 BN, 5 act, 6 SE (``.fc.0``/``.fc.2``) or Identity,
  7 conv1x1, 8 BN
* ``skip{1,2}.core_block``: 0 conv1x1, 1 BN, 2 ReLU, 3 depthwise kxk, 4 BN, 5 ReLU, 6 conv1x1, 7 BN
  (the adaptive average pooling runs functionally in ``forward``, so it takes no position)
* ``conv``: 0 conv1x1, 1 BN, 2 h_swish  (its output = the features used by bias loss)
* ``classifier``: 0 Linear, 1 h_swish, 2 Dropout, 3 Linear

Choices that differ from the release (as the facts require): the skip blocks pool the base
block output to the *actual* spatial size of the stage they feed (any input resolution), and
their input width is the true stem width (so every width multiplier builds).  At 224 px and
w = 1 this is identical to the release.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

__all__ = [
    "IR_STAGES",
    "VARIANTS",
    "HSigmoid",
    "HSwish",
    "InvertedResidual",
    "SkipBlock",
    "SqueezeExcite",
    "TorchSkipNet",
    "count_parameters",
    "make_divisible",
    "randomize_",
]

BN_EPS = 1e-5
BN_MOMENTUM = 0.1  # PyTorch convention (= Flax momentum 0.9)

# (kernel, expansion t, out channels (unscaled), use SE, use h_swish, stride), per stage.
IR_STAGES: tuple[tuple[tuple[int, float, int, bool, bool, int], ...], ...] = (
    (
        (3, 4, 24, False, False, 2),
        (3, 3, 24, False, False, 1),
        (5, 3, 40, True, False, 2),
        (5, 3, 40, True, False, 1),
        (5, 6, 40, True, True, 1),
    ),
    (
        (3, 6, 80, False, True, 2),
        (3, 2.5, 80, False, True, 1),
        (3, 2.3, 80, False, True, 1),
        (3, 2.3, 80, False, True, 1),
    ),
    (
        (3, 6, 112, True, True, 1),
        (3, 6, 112, True, True, 1),
    ),
    (
        (5, 6, 160, True, True, 2),
        (5, 6, 160, True, True, 1),
        (5, 6, 160, True, True, 1),
    ),
)

# name -> (mode, width multiplier)
VARIANTS = {
    "xs": ("small", 0.5),
    "s": ("small", 0.75),
    "m": ("large", 1.0),
    "l": ("large", 1.15),
}

_STEM_CHANNELS = 16
_SKIP1 = dict(t=6, kernel=5, out=40)  # added to stage 1's output (input of stage 2)
_SKIP2 = dict(t=2.3, kernel=3, out=80)  # added to stage 2's output (input of stage 3)
_HEAD_HIDDEN = {"large": 1280, "small": 1024}


def make_divisible(v: float, divisor: int = 8, min_value: int | None = None) -> int:
    """Round ``v`` to the nearest multiple of ``divisor`` (>= min_value, never below 0.9 v)."""
    if min_value is None:
        min_value = divisor
    new_v = max(min_value, int(v + divisor / 2) // divisor * divisor)
    if new_v < 0.9 * v:
        new_v += divisor
    return new_v


class HSigmoid(nn.Module):
    """h_sigmoid(x) = relu6(x + 3) / 6."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu6(x + 3.0) / 6.0


class HSwish(nn.Module):
    """h_swish(x) = x * h_sigmoid(x)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (F.relu6(x + 3.0) / 6.0)


def _bn(channels: int) -> nn.BatchNorm2d:
    return nn.BatchNorm2d(channels, eps=BN_EPS, momentum=BN_MOMENTUM)


def _conv(in_ch: int, out_ch: int, kernel: int, stride: int = 1, groups: int = 1) -> nn.Conv2d:
    # Symmetric (k - 1) // 2 zero padding on every side, for every stride (PyTorch style).
    return nn.Conv2d(in_ch, out_ch, kernel, stride=stride, padding=(kernel - 1) // 2, groups=groups, bias=False)


class SqueezeExcite(nn.Module):
    """Global avg pool -> FC(c -> make_divisible(c/4)) + bias -> ReLU -> FC(-> c) + bias -> h_sigmoid -> scale."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        squeezed = make_divisible(channels / reduction, 8)
        self.fc = nn.Sequential(
            nn.Linear(channels, squeezed),
            nn.ReLU(inplace=True),
            nn.Linear(squeezed, channels),
            HSigmoid(),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c = x.shape[:2]
        s = x.mean(dim=(2, 3))
        s = self.fc(s).view(n, c, 1, 1)
        return x * s


class InvertedResidual(nn.Module):
    """1x1 expand, BN, act, kxk depthwise, BN, act, [SE], 1x1 project, BN; identity residual if s=1 and in=out.

    The 1x1 expansion conv is always present (also for expansion 1, e.g. the base block).
    """

    def __init__(
        self,
        in_ch: int,
        hidden: int,
        out_ch: int,
        kernel: int,
        stride: int,
        use_se: bool,
        use_hs: bool,
    ):
        super().__init__()
        self.use_residual = stride == 1 and in_ch == out_ch

        def act() -> nn.Module:
            return HSwish() if use_hs else nn.ReLU(inplace=True)

        self.conv = nn.Sequential(
            _conv(in_ch, hidden, 1),  # 0
            _bn(hidden),  # 1
            act(),  # 2
            _conv(hidden, hidden, kernel, stride=stride, groups=hidden),  # 3
            _bn(hidden),  # 4
            act(),  # 5
            SqueezeExcite(hidden) if use_se else nn.Identity(),  # 6 (after the depthwise act)
            _conv(hidden, out_ch, 1),  # 7
            _bn(out_ch),  # 8
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.conv(x)
        return x + y if self.use_residual else y


class SkipBlock(nn.Module):
    """Adaptive avg pool (to ``out_size``) -> 1x1 conv BN ReLU -> kxk depthwise BN ReLU -> 1x1 conv BN. No residual."""

    def __init__(self, in_ch: int, hidden: int, out_ch: int, kernel: int):
        super().__init__()
        self.core_block = nn.Sequential(
            _conv(in_ch, hidden, 1),  # 0
            _bn(hidden),  # 1
            nn.ReLU(inplace=True),  # 2
            _conv(hidden, hidden, kernel, stride=1, groups=hidden),  # 3
            _bn(hidden),  # 4
            nn.ReLU(inplace=True),  # 5
            _conv(hidden, out_ch, 1),  # 6
            _bn(out_ch),  # 7
        )

    def forward(self, x: torch.Tensor, out_size: Sequence[int]) -> torch.Tensor:
        x = F.adaptive_avg_pool2d(x, (int(out_size[0]), int(out_size[1])))
        return self.core_block(x)


class TorchSkipNet(nn.Module):
    """SkipNet in PyTorch; ``state_dict()`` names match the released checkpoint.

    Args:
      mode: "large" (classifier hidden 1280) or "small" (1024).  Nothing else depends on it.
      width_multiplier: w; scales the stem, every IR output and the skip outputs
        (make_divisible(c * w, 8)).  The classifier hidden is scaled only when w > 1.
      num_classes: size of the last linear layer.
      dropout_rate: dropout between the first classifier layer (+ h_swish) and the last.

    ``forward(x)`` returns logits (N, num_classes) for NCHW input;
    ``forward_with_features(x)`` returns (logits, features) with features the head conv output
    after BN and h_swish, before global pooling (NCHW, e.g. (N, 960, 7, 7) for M at 224 px).
    """

    def __init__(
        self,
        mode: str = "large",
        width_multiplier: float = 1.0,
        num_classes: int = 1000,
        dropout_rate: float = 0.2,
    ):
        super().__init__()
        if mode not in _HEAD_HIDDEN:
            raise ValueError(f"mode must be 'large' or 'small', got {mode!r}")
        w = float(width_multiplier)
        self.mode = mode
        self.width_multiplier = w
        self.num_classes = num_classes

        stem = make_divisible(_STEM_CHANNELS * w, 8)
        self.first_layer = nn.Sequential(_conv(3, stem, 3, stride=2), _bn(stem), HSwish())
        self.base_block = InvertedResidual(
            stem, make_divisible(stem * 1, 8), stem, kernel=3, stride=1, use_se=False, use_hs=True
        )

        in_ch = stem
        hidden = stem
        stages = []
        self.stage_out_channels = []
        for stage_cfg in IR_STAGES:
            layers = []
            for k, t, c, se, hs, s in stage_cfg:
                out_ch = make_divisible(c * w, 8)
                hidden = make_divisible(in_ch * t, 8)
                layers.append(InvertedResidual(in_ch, hidden, out_ch, k, s, se, hs))
                in_ch = out_ch
            stages.append(nn.Sequential(*layers))
            self.stage_out_channels.append(in_ch)
        self.blocks = nn.ModuleList(stages)

        # Skip blocks: input = true stem width, hidden from the unscaled 16 (fixed 96 / 40).
        self.skip1 = SkipBlock(
            stem,
            make_divisible(_STEM_CHANNELS * _SKIP1["t"], 8),
            make_divisible(_SKIP1["out"] * w, 8),
            _SKIP1["kernel"],
        )
        self.skip2 = SkipBlock(
            stem,
            make_divisible(_STEM_CHANNELS * _SKIP2["t"], 8),
            make_divisible(_SKIP2["out"] * w, 8),
            _SKIP2["kernel"],
        )

        head = hidden  # hidden width of the last IR block (960 at w = 1)
        self.feature_channels = head
        self.conv = nn.Sequential(_conv(in_ch, head, 1), _bn(head), HSwish())

        cls_hidden = _HEAD_HIDDEN[mode]
        if w > 1.0:
            cls_hidden = make_divisible(cls_hidden * w, 8)
        self.classifier = nn.Sequential(
            nn.Linear(head, cls_hidden),  # 0
            HSwish(),  # 1
            nn.Dropout(dropout_rate),  # 2
            nn.Linear(cls_hidden, num_classes),  # 3
        )
        self._init_weights()

    def _init_weights(self) -> None:
        """Release init: conv N(0, sqrt(2/(k*k*out))), BN 1/0, linear N(0, 0.01) with bias 0."""
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                n = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / n))
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0.0, 0.01)
                nn.init.zeros_(m.bias)

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.first_layer(x)
        base = self.base_block(x)
        x = self.blocks[0](base)
        x = x + self.skip1(base, x.shape[-2:])  # input of stage 2
        x = self.blocks[1](x)
        x = x + self.skip2(base, x.shape[-2:])  # input of stage 3
        x = self.blocks[2](x)
        x = self.blocks[3](x)
        features = self.conv(x)
        pooled = features.mean(dim=(2, 3))
        logits = self.classifier(pooled)
        return logits, features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_features(x)[0]


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters (BN running stats excluded)."""
    return sum(p.numel() for p in model.parameters())


def _smooth_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Random images with low-frequency structure (upsampled 7x7 noise) plus a little pixel noise."""
    low = torch.randn(n, 3, 7, 7, generator=generator)
    x = F.interpolate(low, size=(size, size), mode="bilinear", align_corners=False)
    return x + 0.3 * torch.randn(n, 3, size, size, generator=generator)


def _calibration_images(n: int, size: int, generator: torch.Generator) -> torch.Tensor:
    """Half smooth random images, half white N(0, 1) noise (at least one of each)."""
    n_smooth = max(1, n // 2)
    n_white = max(1, n - n_smooth)
    smooth = _smooth_images(n_smooth, size, generator)
    white = torch.randn(n_white, 3, size, size, generator=generator)
    return torch.cat([smooth, white], dim=0)


@torch.no_grad()
def randomize_(
    model: nn.Module,
    seed: int = 0,
    calibration_size: int = 224,
    calibration_batch: int = 8,
    last_linear_gain: float = 4.0,
) -> nn.Module:
    """Fill every parameter and every BN running_mean / running_var with random values, in place.

    Goal: every layer matters in eval mode while activations stay O(1), so that logits of two
    implementations loaded with the same state_dict are a sensitive check of every layer.

    1. Conv / linear weights N(0, 1/fan_in), linear biases N(0, 0.1) (convs have no bias),
       BN gamma U(0.5, 1.5), BN beta N(0, 0.1).
    2. BN running statistics are *calibrated then perturbed*: one eval-mode forward pass on
       ``calibration_batch`` random images of ``calibration_size`` px (half smooth images, i.e.
       upsampled 7x7 noise plus a little pixel noise, half white N(0, 1) noise; drawn from the
       same seeded generator) runs with a forward pre-hook on every BatchNorm that measures the
       per-channel mean m and variance s2 of the BN's actual input (upstream BNs already
       randomised, since hooks fire in execution order) and sets
       ``running_mean = m + 0.2 * sqrt(s2) * N(0, 1)`` and
       ``running_var = s2 * U(0.5, 1.5) + 1e-3`` (always positive).
       So each BN output is roughly gamma * N(0, 1) + beta: no decay or blow-up with depth, and
       the output depends clearly on the input.
    3. The last linear layer's weights get ``last_linear_gain`` (default 4) times the scale so
       the logits are O(1) (std ~0.5-0.9 for all variants at 224 px on smooth or white-noise
       input).  For small inputs (e.g. 32 px) pass ``calibration_size=32``.
    ``num_batches_tracked`` is left alone.  Deterministic given ``seed`` (own ``torch.Generator``;
    the global RNG is untouched).  The model is left in eval mode.  Returns ``model``.
    """
    g = torch.Generator().manual_seed(int(seed))

    def normal_(t: torch.Tensor, std: float) -> None:
        t.copy_(torch.randn(t.shape, generator=g, dtype=torch.float64).to(t.dtype) * std)

    def uniform_(t: torch.Tensor, lo: float, hi: float) -> None:
        t.copy_((lo + (hi - lo) * torch.rand(t.shape, generator=g, dtype=torch.float64)).to(t.dtype))

    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    last_linear = linears[-1] if linears else None
    bns = []
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            normal_(m.weight, math.sqrt(1.0 / m.weight[0].numel()))
            if m.bias is not None:
                normal_(m.bias, 0.1)
        elif isinstance(m, nn.Linear):
            scale = last_linear_gain if m is last_linear else 1.0
            normal_(m.weight, scale * math.sqrt(1.0 / m.in_features))
            normal_(m.bias, 0.1)
        elif isinstance(m, nn.modules.batchnorm._BatchNorm):
            uniform_(m.weight, 0.5, 1.5)
            normal_(m.bias, 0.1)
            m.running_mean.zero_()
            m.running_var.fill_(1.0)
            bns.append(m)

    if not bns:
        return model.eval()

    def pre_hook(bn: nn.Module, inputs):
        x = inputs[0].detach().to(torch.float64)
        dims = [d for d in range(x.dim()) if d != 1]
        mean = x.mean(dim=dims)
        var = x.var(dim=dims, unbiased=False)
        noise = torch.randn(mean.shape, generator=g, dtype=torch.float64)
        factor = 0.5 + torch.rand(var.shape, generator=g, dtype=torch.float64)
        bn.running_mean.copy_((mean + 0.2 * var.sqrt() * noise).to(bn.running_mean.dtype))
        bn.running_var.copy_((var * factor + 1e-3).to(bn.running_var.dtype))
        return None

    model.eval()
    param = next(model.parameters())
    x = _calibration_images(calibration_batch, calibration_size, g).to(param.dtype)
    handles = [bn.register_forward_pre_hook(pre_hook) for bn in bns]
    try:
        model(x)
    finally:
        for h in handles:
            h.remove()
    return model
