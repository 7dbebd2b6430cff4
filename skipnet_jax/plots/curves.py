"""Training curves: the TensorBoard scalars of a run (loss, accuracy, learning rate, bias weights)."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping

import numpy as np
from matplotlib.figure import Figure

from skipnet_jax.plots.common import DEFAULT_ALPHA, DEFAULT_BETA, new_figure


def read_scalars(tensorboard_dir: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Every scalar in the event files under `tensorboard_dir`: ``tag -> (steps, values)``.

    Reads both TF2 summaries (scalars stored as tensors, as `flax.metrics.tensorboard`
    writes them) and TF1 ``simple_value``s.  Files are read in name order (their names
    start with a timestamp) and a later value for the same (tag, step) replaces an
    earlier one, so a resumed run that logs a step again shows it once.  Steps are
    sorted.  An absent or empty directory gives ``{}``.
    """
    from tensorboard.backend.event_processing import event_file_loader
    from tensorboard.util import tensor_util

    files = sorted(glob.glob(os.path.join(tensorboard_dir, "**", "*tfevents*"), recursive=True))
    by_tag: dict[str, dict[int, tuple[float, float]]] = {}  # step -> (wall time, value)
    for path in files:
        for event in event_file_loader.EventFileLoader(path).Load():
            if not event.HasField("summary"):
                continue
            for value in event.summary.value:
                kind = value.WhichOneof("value")
                if kind == "simple_value":
                    number = float(value.simple_value)
                elif kind == "tensor":
                    array = tensor_util.make_ndarray(value.tensor)
                    if array.size != 1 or not np.issubdtype(array.dtype, np.number):
                        continue  # images, histograms, text
                    number = float(array.reshape(()))
                else:
                    continue
                points = by_tag.setdefault(value.tag, {})
                step = int(event.step)
                if step not in points or event.wall_time >= points[step][0]:
                    points[step] = (event.wall_time, number)
    out = {}
    for tag, points in by_tag.items():
        steps = np.array(sorted(points), np.int64)
        out[tag] = (steps, np.array([points[s][1] for s in steps], np.float64))
    return out


def _plot_series(ax, scalars, tag: str, label: str, **style) -> bool:
    if tag not in scalars:
        return False
    steps, values = scalars[tag]
    if len(steps) <= 3:  # eval points are few: show them as markers
        style = {"marker": "o", **style}
    ax.plot(steps, values, label=label, **style)
    return True


def training_curves(
    scalars: Mapping[str, tuple[np.ndarray, np.ndarray]],
    *,
    alpha: float = DEFAULT_ALPHA,
    beta: float = DEFAULT_BETA,
    title: str | None = None,
) -> Figure:
    """Train/eval curves from `read_scalars` output.

    Panels: loss (train loss, train cross-entropy, eval loss), accuracy (train, eval
    top-1/top-5), learning rate, and, for bias-loss runs, the mean/min bias weight with
    the bounds z(0) = 1 - beta and z(1) = exp(alpha) - beta.  Missing tags are left out;
    a panel with no data says so.
    """
    has_bias = any(t in scalars for t in ("train/bias_weight_mean", "train/bias_weight_min"))
    n = 4 if has_bias else 3
    fig = new_figure(4.2 * n, 3.8)
    axes = fig.subplots(1, n)

    ax = axes[0]
    plotted = [
        _plot_series(ax, scalars, "train/loss", "train loss (objective)"),
        _plot_series(ax, scalars, "train/cross_entropy", "train cross-entropy", linestyle="--"),
        _plot_series(ax, scalars, "eval/loss", "eval cross-entropy", marker="o", color="black"),
    ]
    ax.set(title="Loss", xlabel="step", ylabel="loss")
    if any(plotted):
        values = np.concatenate(
            [scalars[t][1] for t in ("train/loss", "train/cross_entropy", "eval/loss") if t in scalars]
        )
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() > 0 and finite.max() / finite.min() > 30:
            ax.set_yscale("log")
        else:
            ax.set_ylim(bottom=0)

    ax = axes[1]
    plotted += [
        _plot_series(ax, scalars, "train/accuracy", "train top-1"),
        _plot_series(ax, scalars, "eval/top1", "eval top-1", marker="o", color="black"),
        _plot_series(ax, scalars, "eval/top5", "eval top-5", marker="s", color="gray", linestyle=":"),
    ]
    ax.set(title="Accuracy", xlabel="step", ylabel="accuracy", ylim=(0.0, 1.02))

    ax = axes[2]
    _plot_series(ax, scalars, "train/learning_rate", "learning rate", color="tab:purple")
    ax.set(title="Learning rate", xlabel="step", ylabel="learning rate")
    ax.set_ylim(bottom=0)
    ax.ticklabel_format(axis="y", style="sci", scilimits=(-3, 3))

    if has_bias:
        ax = axes[3]
        _plot_series(ax, scalars, "train/bias_weight_mean", "mean z(v)")
        _plot_series(ax, scalars, "train/bias_weight_min", "min z(v)", linestyle="--")
        ax.axhline(1.0 - beta, color="gray", linewidth=0.8, linestyle=":", label=f"z(0) = {1 - beta:.2f}")
        ax.axhline(
            np.exp(alpha) - beta,
            color="gray",
            linewidth=0.8,
            linestyle="-.",
            label=f"z(1) = {np.exp(alpha) - beta:.2f}",
        )
        ax.set(title="Bias-loss weights", xlabel="step", ylabel="z(v)")

    for ax in axes:
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        else:
            ax.text(0.5, 0.5, "no data", transform=ax.transAxes, ha="center", va="center", color="gray")
    if title:
        fig.suptitle(title)
    return fig
