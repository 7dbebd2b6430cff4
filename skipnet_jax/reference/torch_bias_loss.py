"""Independent PyTorch reference of the bias loss, written as the authors' release behaves.

Written from the paper's definition (Abrahamyan et al., ICCV 2021, arXiv 2107.11170) and
the behaviour of the authors' release (github.com/lusinlu/bias-loss-skipblocknet); no code
was copied.

    L = (1/N) * sum_i z(s_i) * CE(logits_i, y_i),      z(s) = exp(alpha * s) - beta

* ``v_i``: unbiased variance (divide by C*H*W - 1) of all C*H*W values of sample i's feature
  map (the last conv output before global pooling), computed on ``features.detach()``: no
  gradient flows through the weights, only through the cross-entropy.
* ``s_i``: v scaled with min-max normalisation:

  - ``"local"``:  s = (v - min_batch(v)) / (max_batch(v) - min_batch(v))
  - ``"global"`` (the release's default):
    s = (v - running_min) / (max_batch(v) - min_batch(v)), where ``running_min`` is the minimum
    variance over every batch seen so far (numerator) while the denominator is the current
    batch's range.  In this mode s can exceed 1 (and then z > exp(alpha) - beta) whenever an
    earlier batch had a smaller minimum than the current one.

Running minimum (global mode), initialisation and update order
-------------------------------------------------------------
The release's global mode is described as "a running minimum over every batch seen so far",
which does not spell out whether the current batch is folded in before or after it is used.
This is ambiguous.  The reference implements the reading "the running minimum includes the
current batch":

    running_min  <- +inf                                   (at construction / ``reset()``)
    per call:     running_min <- min(running_min, min_i v_i)   (update FIRST)
                  s_i = (v_i - running_min) / (max_i v_i - min_i v_i)   (then normalise)

so on the first batch global == local, and s_i >= 0 always.  The other reading (normalise
with the minimum of the *previous* batches, then update) is available with
``update_before_scaling=False``; with no previous batch it falls back to the current batch's
minimum (otherwise the very first loss would be -inf).  The running minimum is updated on every
call, in train and eval mode alike (the release keeps no train/eval distinction for it); call
``reset()`` to start over.  It is kept as a plain tensor attribute (not in ``state_dict``).

Release behaviour kept on purpose (NaN / inf)
--------------------------------------------
No epsilon is added to the denominator.  When all variances in the batch are equal,
max - min = 0 and:

* ``"local"``: s = 0/0 = NaN, so the loss is NaN.
* ``"global"``: the numerator is 0 if the running minimum equals that common value (first
  batch, for instance) -> NaN; if an earlier batch had a smaller minimum, s = +inf, z = +inf and
  the loss is +inf (or NaN where a CE term is exactly 0).

The project's own loss must not do this; this module reproduces the release so that the
difference is visible and testable.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from skipnet_jax.losses import DEFAULT_ALPHA, DEFAULT_BETA

__all__ = ["TorchBiasLoss", "feature_variance", "z_weight"]


def feature_variance(features: torch.Tensor) -> torch.Tensor:
    """Per-sample unbiased variance over all non-batch dims of ``features.detach()``; shape (N,)."""
    flat = features.detach().reshape(features.shape[0], -1)
    return flat.var(dim=1, unbiased=True)


def z_weight(scaled: torch.Tensor, alpha: float = DEFAULT_ALPHA, beta: float = DEFAULT_BETA) -> torch.Tensor:
    """z(s) = exp(alpha * s) - beta  (0.7 at s = 0, exp(0.3) - 0.3 = 1.0499 at s = 1 by default)."""
    return torch.exp(alpha * scaled) - beta


class TorchBiasLoss(nn.Module):
    """Bias loss as in the release (alpha = beta = 0.3, 'global' normalisation by default).

    ``forward(features, logits, targets)`` -> scalar loss, where ``features`` is the last conv
    output before pooling (N, C, H, W) (any shape with batch first works), ``logits`` (N, K) and
    ``targets`` (N,) integer class indices.

    After each call, ``last_variance``, ``last_scaled`` and ``last_weights`` hold v, s and z(s)
    of that batch (detached), for inspection in tests.
    """

    def __init__(
        self,
        alpha: float = DEFAULT_ALPHA,
        beta: float = DEFAULT_BETA,
        normalisation_mode: str = "global",
        update_before_scaling: bool = True,
    ):
        super().__init__()
        if normalisation_mode not in ("global", "local"):
            raise ValueError(f"normalisation_mode must be 'global' or 'local', got {normalisation_mode!r}")
        self.alpha = float(alpha)
        self.beta = float(beta)
        self.normalisation_mode = normalisation_mode
        self.update_before_scaling = bool(update_before_scaling)
        self.running_min: torch.Tensor | None = None  # None == +inf (nothing seen yet)
        self.last_variance: torch.Tensor | None = None
        self.last_scaled: torch.Tensor | None = None
        self.last_weights: torch.Tensor | None = None

    def reset(self) -> None:
        """Forget the running minimum (back to +inf)."""
        self.running_min = None

    def scale(self, variance: torch.Tensor) -> torch.Tensor:
        """Min-max scale v (updates the running minimum in global mode)."""
        v_min = variance.min()
        v_max = variance.max()
        denom = v_max - v_min  # no epsilon: release behaviour (NaN / inf when all v are equal)
        if self.normalisation_mode == "local":
            return (variance - v_min) / denom

        previous = self.running_min
        updated = v_min if previous is None else torch.minimum(previous.to(v_min), v_min)
        if self.update_before_scaling:
            ref_min = updated
        else:
            ref_min = v_min if previous is None else previous.to(v_min)
        self.running_min = updated.detach().clone()
        return (variance - ref_min) / denom

    def forward(self, features: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        variance = feature_variance(features)
        scaled = self.scale(variance)
        weights = z_weight(scaled, self.alpha, self.beta).to(logits.dtype)
        ce = F.cross_entropy(logits, targets, reduction="none")
        self.last_variance = variance
        self.last_scaled = scaled.detach()
        self.last_weights = weights.detach()
        return (weights * ce).mean()

    def extra_repr(self) -> str:
        return (
            f"alpha={self.alpha}, beta={self.beta}, normalisation_mode={self.normalisation_mode!r}, "
            f"update_before_scaling={self.update_before_scaling}"
        )
