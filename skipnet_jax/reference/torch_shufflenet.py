"""Independent PyTorch reference of the bias-loss release's CIFAR ShuffleNetV2.

Written from the architecture (Ma et al. 2018, ShuffleNet V2 units) and the module layout
of the authors' release (github.com/lusinlu/bias-loss-skipblocknet, ``bias_loss/models``),
so that ``TorchShuffleNetV2(0.5).state_dict()`` has the release's names and shapes; no
code was taken from the release.  Used to check `skipnet_jax.models.cifar.ShuffleNetV2Cifar`
and its converter (`skipnet_jax.models.shufflenet_torch_keys`).

Layout (positions inside ``nn.Sequential``; every conv has PyTorch's default bias):

* ``pre``: 0 conv3x3 stride 1 (3 -> 24), 1 BN (no ReLU, no max-pool);
* ``stage2`` / ``stage3`` / ``stage4``: a stride-2 unit then 3 / 7 / 3 stride-1 units;
  - stride-2 unit (input ``c``, output ``o``): ``shortcut`` = 0 depthwise3x3/2, 1 BN,
    2 conv1x1 c -> o/2, 3 BN, 4 ReLU; ``residual`` = 0 conv1x1 c -> c, 1 BN, 2 ReLU,
    3 depthwise3x3/2, 4 BN, 5 conv1x1 c -> o/2, 6 BN, 7 ReLU; output
    shuffle(cat[shortcut(x), residual(x)]);
  - stride-1 unit: the first half of the channels passes unchanged, ``residual`` (as above,
    o/2 wide throughout) runs on the second half; output shuffle(cat[first, residual(second)]);
* ``conv5``: 0 conv1x1 -> 1024, 1 BN, 2 ReLU (its output: the features bias loss uses);
* global average pool, ``fc`` Linear.

``forward`` returns ``(logits, features)`` as the release's model does.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

__all__ = ["WIDTHS", "ShuffleUnit", "TorchShuffleNetV2", "count_parameters", "randomize_", "shuffle_channels"]

# ratio -> stage output widths (stage2, stage3, stage4, conv5), the release's table.
WIDTHS: dict[float, tuple[int, int, int, int]] = {
    0.5: (48, 96, 192, 1024),
    1.0: (116, 232, 464, 1024),
    1.5: (176, 352, 704, 1024),
    2.0: (244, 488, 976, 2048),
}
STEM_WIDTH = 24
# Stride-1 units after each stage's stride-2 unit.
EXTRA_UNITS = (3, 7, 3)


def shuffle_channels(x: torch.Tensor, groups: int = 2) -> torch.Tensor:
    """NCHW channel shuffle: channel ``g * (C / groups) + j`` moves to ``j * groups + g``."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def _residual(cin: int, hidden: int, cout: int, stride: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, hidden, 1),
        nn.BatchNorm2d(hidden),
        nn.ReLU(),
        nn.Conv2d(hidden, hidden, 3, stride, 1, groups=hidden),
        nn.BatchNorm2d(hidden),
        nn.Conv2d(hidden, cout, 1),
        nn.BatchNorm2d(cout),
        nn.ReLU(),
    )


class ShuffleUnit(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int):
        super().__init__()
        half = cout // 2
        self.split = stride == 1 and cin == cout
        if self.split:
            self.shortcut = nn.Sequential()
            self.residual = _residual(half, half, half, 1)
        else:
            self.shortcut = nn.Sequential(
                nn.Conv2d(cin, cin, 3, stride, 1, groups=cin),
                nn.BatchNorm2d(cin),
                nn.Conv2d(cin, half, 1),
                nn.BatchNorm2d(half),
                nn.ReLU(),
            )
            self.residual = _residual(cin, cin, half, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.split:
            first, second = x.chunk(2, dim=1)
            y = torch.cat([first, self.residual(second)], dim=1)
        else:
            y = torch.cat([self.shortcut(x), self.residual(x)], dim=1)
        return shuffle_channels(y, 2)


class TorchShuffleNetV2(nn.Module):
    def __init__(self, ratio: float = 0.5, num_classes: int = 100):
        super().__init__()
        *stages, last = WIDTHS[ratio]
        self.pre = nn.Sequential(nn.Conv2d(3, STEM_WIDTH, 3, 1, 1), nn.BatchNorm2d(STEM_WIDTH))
        cin = STEM_WIDTH
        for i, (width, extra) in enumerate(zip(stages, EXTRA_UNITS)):
            units = [ShuffleUnit(cin, width, 2)] + [ShuffleUnit(width, width, 1) for _ in range(extra)]
            setattr(self, f"stage{i + 2}", nn.Sequential(*units))
            cin = width
        self.conv5 = nn.Sequential(nn.Conv2d(cin, last, 1), nn.BatchNorm2d(last), nn.ReLU())
        self.fc = nn.Linear(last, num_classes)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.stage4(self.stage3(self.stage2(self.pre(x))))
        features = self.conv5(x)
        return self.fc(features.mean(dim=(2, 3))), features


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random non-trivial values everywhere a checkpoint has them: conv weights and biases,
    BN affine parameters and **uncalibrated** running statistics (random means and variances
    that no batch produced), Linear weights and biases.  Conv weights are He-scaled so
    activations keep their size through the depth."""
    rng = np.random.default_rng(seed)

    def put(t: torch.Tensor, values: np.ndarray) -> None:
        t.copy_(torch.from_numpy(values.astype(np.float32)))

    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            fan_in = m.weight[0].numel()
            put(m.weight, rng.normal(0.0, np.sqrt(2.0 / fan_in), m.weight.shape))
            put(m.bias, rng.normal(0.0, 0.5, m.bias.shape))
        elif isinstance(m, nn.BatchNorm2d):
            c = m.num_features
            put(m.weight, rng.uniform(0.5, 1.5, c))
            put(m.bias, rng.normal(0.0, 0.2, c))
            put(m.running_mean, rng.normal(0.0, 0.5, c))
            put(m.running_var, rng.uniform(0.5, 2.0, c))
            m.num_batches_tracked.fill_(int(rng.integers(1, 1000)))
        elif isinstance(m, nn.Linear):
            put(m.weight, rng.normal(0.0, 1.0 / np.sqrt(m.in_features), m.weight.shape))
            put(m.bias, rng.normal(0.0, 0.1, m.bias.shape))
    return model
