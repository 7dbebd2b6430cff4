"""Bias-loss figures: histograms of the per-sample variance and its weights, and the loss against p."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from skipnet_jax.plots.common import DEFAULT_ALPHA, DEFAULT_BETA, bias_weight, new_figure, step_colors

PAPER_VARIANCES = (0.0, 0.25, 0.5, 0.75, 1.0)


def variance_histograms(
    snapshots: Mapping[int, Mapping[str, np.ndarray]],
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    bins: int = 30,
    title: str | None = None,
) -> Figure:
    """Histograms of the normalised per-sample variance v and of the weights z(v).

    `snapshots` maps a training step to arrays collected at that step:
    ``"normalized_variance"`` (required; the `bias_loss` aux entry) and ``"weights"``
    (optional: computed as z(v) = exp(alpha v) - beta when absent).  Each step is one
    outlined histogram (density) on shared bins; the weight panel also draws z over the
    range of v and marks the bounds z(0) and z(1).  "global" normalisation can give
    v > 1, so the bins cover max(1, largest v).
    """
    if not snapshots:
        raise ValueError("variance_histograms needs at least one snapshot")
    steps = sorted(snapshots)
    variances, weights = {}, {}
    for step in steps:
        snap = snapshots[step]
        if "normalized_variance" not in snap:
            raise ValueError(f"snapshot at step {step} has no 'normalized_variance' (keys: {sorted(snap)})")
        v = np.asarray(snap["normalized_variance"], np.float64).reshape(-1)
        variances[step] = v
        w = snap.get("weights")
        weights[step] = bias_weight(v, alpha, beta) if w is None else np.asarray(w, np.float64).reshape(-1)

    all_v = np.concatenate(list(variances.values()))
    all_w = np.concatenate(list(weights.values()))
    v_max = max(1.0, float(np.nanmax(all_v)) if all_v.size else 1.0)
    v_min = min(0.0, float(np.nanmin(all_v)) if all_v.size else 0.0)
    v_bins = np.linspace(v_min, v_max, bins + 1)
    w_lo = min(1.0 - beta, float(np.nanmin(all_w)) if all_w.size else 1.0 - beta)
    w_hi = max(float(bias_weight(v_max, alpha, beta)), float(np.nanmax(all_w)) if all_w.size else 1.0)
    pad = 0.02 * (w_hi - w_lo)
    w_bins = np.linspace(w_lo - pad, w_hi + pad, bins + 1)

    fig = new_figure(11.0, 4.0)
    ax_v, ax_w = fig.subplots(1, 2)
    cmap = step_colors(len(steps))
    for color, step in zip(cmap, steps):
        n = variances[step].size
        ax_v.hist(
            variances[step],
            bins=v_bins,
            density=True,
            histtype="step",
            linewidth=1.6,
            color=color,
            label=f"step {step} (n={n})",
        )
        ax_w.hist(
            weights[step], bins=w_bins, density=True, histtype="step", linewidth=1.6, color=color, label=f"step {step}"
        )
    ax_v.set(
        title="Normalised per-sample variance v",
        xlabel="v (min-max normalised variance)",
        ylabel="density",
        xlim=(v_bins[0], v_bins[-1]),
    )
    ax_w.set(
        title="Bias weights z(v) = exp(\u03b1v) \u2212 \u03b2",
        xlabel="z(v)",
        ylabel="density",
        xlim=(w_bins[0], w_bins[-1]),
    )
    ax_w.axvline(1.0 - beta, color="gray", linestyle=":", linewidth=0.9, label=f"z(0) = {1 - beta:.3f}")
    ax_w.axvline(
        np.exp(alpha) - beta, color="gray", linestyle="-.", linewidth=0.9, label=f"z(1) = {np.exp(alpha) - beta:.3f}"
    )
    for ax in (ax_v, ax_w):
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(title or f"Bias loss statistics (\u03b1 = {alpha:g}, \u03b2 = {beta:g})")
    return fig


def loss_vs_probability(
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    variances: Sequence[float] = PAPER_VARIANCES,
    title: str | None = None,
) -> Figure:
    """Bias loss and cross-entropy against the predicted probability p of the true class.

    CE = -log p; bias loss = z(v) * (-log p) for each normalised variance v (the paper's
    illustration: low-variance samples are down-weighted to 1 - beta of their CE, the
    most diverse up-weighted to exp(alpha) - beta of it).
    """
    p = np.linspace(0.005, 1.0, 400)
    ce = -np.log(p)
    fig = new_figure(6.4, 4.6)
    ax = fig.subplots()
    ax.plot(p, ce, color="black", linewidth=2.2, label="cross-entropy  \u2212log p")
    colors = step_colors(len(variances))
    for color, v in zip(colors, variances):
        z = float(bias_weight(v, alpha, beta))
        ax.plot(p, z * ce, color=color, linestyle="--", linewidth=1.6, label=f"bias loss, v = {v:g} (z = {z:.3f})")
    ax.set(xlabel="predicted probability of the true class p", ylabel="loss", xlim=(0.0, 1.0), ylim=(0.0, 5.0))
    ax.set_title(title or f"Bias loss vs cross-entropy (\u03b1 = {alpha:g}, \u03b2 = {beta:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig
