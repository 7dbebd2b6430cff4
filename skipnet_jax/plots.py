"""Figures of a training run: curves, bias-loss statistics, the loss itself, confusion matrix.

Command line::

    python -m skipnet_jax.plots --workdir DIR

regenerates what the workdir has data for into ``DIR/plots/*.png``:

* ``training_curves.png``: from the TensorBoard event files in ``DIR/tensorboard``
  (loss, accuracy, learning rate, bias weights; train and eval);
* ``bias_vs_cross_entropy.png``: always (it depends only on alpha/beta, read from
  ``DIR/config.json`` when present);
* ``variance_histograms.png``: from ``DIR/bias_snapshots.npz`` (see `save_snapshots`);
* ``confusion_matrix.png``: from ``DIR/eval_results.json`` as written by
  ``python -m skipnet_jax.evaluate``.

Every ``*_figure``-style function here is pure: it takes arrays and returns a
`matplotlib.figure.Figure` (created without pyplot, drawn by the Agg canvas), so
it works the same in a script, a test or a notebook and never opens a window.
"""

from __future__ import annotations

import glob
import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipnet_jax.default_config import get_default_config
from skipnet_jax.reporting import CONFIG_FILE, EVAL_RESULTS_FILE, TENSORBOARD_SUBDIR

PLOTS_SUBDIR = "plots"
SNAPSHOTS_FILE = "bias_snapshots.npz"
DEFAULT_ALPHA = get_default_config().bias_loss.alpha
DEFAULT_BETA = get_default_config().bias_loss.beta
PAPER_VARIANCES = (0.0, 0.25, 0.5, 0.75, 1.0)
_DPI = 110

__all__ = [
    "confusion_matrix",
    "confusion_matrix_figure",
    "load_snapshots",
    "loss_vs_probability",
    "main",
    "read_scalars",
    "save_all",
    "save_figure",
    "save_snapshots",
    "training_curves",
    "variance_histograms",
]


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=_DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is
    return fig


def _bias_weight(v: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """z(v) = exp(alpha * v) - beta (numpy twin of `losses.bias_weight`)."""
    return np.exp(alpha * np.asarray(v, np.float64)) - beta


# --------------------------------------------------------------------------- TensorBoard


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
    by_tag: dict[str, dict[int, float]] = {}
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
                by_tag.setdefault(value.tag, {})[int(event.step)] = number
    out = {}
    for tag, points in by_tag.items():
        steps = np.array(sorted(points), np.int64)
        out[tag] = (steps, np.array([points[s] for s in steps], np.float64))
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
    fig = _new_figure(4.2 * n, 3.8)
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


# --------------------------------------------------------------------------- bias loss


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
        weights[step] = _bias_weight(v, alpha, beta) if w is None else np.asarray(w, np.float64).reshape(-1)

    all_v = np.concatenate(list(variances.values()))
    all_w = np.concatenate(list(weights.values()))
    v_max = max(1.0, float(np.nanmax(all_v)) if all_v.size else 1.0)
    v_min = min(0.0, float(np.nanmin(all_v)) if all_v.size else 0.0)
    v_bins = np.linspace(v_min, v_max, bins + 1)
    w_lo = min(1.0 - beta, float(np.nanmin(all_w)) if all_w.size else 1.0 - beta)
    w_hi = max(float(_bias_weight(v_max, alpha, beta)), float(np.nanmax(all_w)) if all_w.size else 1.0)
    pad = 0.02 * (w_hi - w_lo)
    w_bins = np.linspace(w_lo - pad, w_hi + pad, bins + 1)

    fig = _new_figure(11.0, 4.0)
    ax_v, ax_w = fig.subplots(1, 2)
    cmap = _step_colors(len(steps))
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


def _step_colors(n: int) -> list:
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.0, 0.85, n) if n > 1 else [0.0])]


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
    fig = _new_figure(6.4, 4.6)
    ax = fig.subplots()
    ax.plot(p, ce, color="black", linewidth=2.2, label="cross-entropy  \u2212log p")
    colors = _step_colors(len(variances))
    for color, v in zip(colors, variances):
        z = float(_bias_weight(v, alpha, beta))
        ax.plot(p, z * ce, color=color, linestyle="--", linewidth=1.6, label=f"bias loss, v = {v:g} (z = {z:.3f})")
    ax.set(xlabel="predicted probability of the true class p", ylabel="loss", xlim=(0.0, 1.0), ylim=(0.0, 5.0))
    ax.set_title(title or f"Bias loss vs cross-entropy (\u03b1 = {alpha:g}, \u03b2 = {beta:g})")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return fig


# --------------------------------------------------------------------------- confusion matrix


def confusion_matrix(
    labels: np.ndarray, predictions: np.ndarray, num_classes: int, mask: np.ndarray | None = None
) -> np.ndarray:
    """``int64 [num_classes, num_classes]``: row = true class, column = predicted class.

    Rows with ``mask == 0`` (padding of the last eval batch) are not counted.
    """
    labels = np.asarray(labels).reshape(-1).astype(np.int64)
    predictions = np.asarray(predictions).reshape(-1).astype(np.int64)
    if labels.shape != predictions.shape:
        raise ValueError(f"labels {labels.shape} and predictions {predictions.shape} differ in shape")
    if mask is not None:
        keep = np.asarray(mask).reshape(-1) > 0
        labels, predictions = labels[keep], predictions[keep]
    for name, x in (("labels", labels), ("predictions", predictions)):
        if x.size and (x.min() < 0 or x.max() >= num_classes):
            raise ValueError(f"{name} must be in [0, {num_classes}), got range [{x.min()}, {x.max()}]")
    matrix = np.zeros((num_classes, num_classes), np.int64)
    np.add.at(matrix, (labels, predictions), 1)
    return matrix


_MAX_ANNOTATED_CLASSES = 20
_MAX_TICK_LABELS = 40


def confusion_matrix_figure(
    matrix: np.ndarray,
    class_names: Sequence[str] | None = None,
    *,
    normalize: bool = True,
    title: str | None = None,
) -> Figure:
    """Heat map of a confusion matrix (rows: true class, columns: predicted).

    `normalize` colours each row by its fraction (recall per class), and with up to
    20 classes every cell is annotated with its count.  Class names label the axes
    (up to 40 classes; beyond that only indices are shown).
    """
    matrix = np.asarray(matrix)
    if matrix.ndim != 2 or matrix.shape[0] != matrix.shape[1]:
        raise ValueError(f"confusion matrix must be square, got shape {matrix.shape}")
    k = matrix.shape[0]
    if class_names is not None and len(class_names) != k:
        raise ValueError(f"{len(class_names)} class names for a {k}x{k} confusion matrix")
    names = [str(c) for c in class_names] if class_names is not None else [str(i) for i in range(k)]
    totals = matrix.sum(axis=1, keepdims=True)
    shown = np.divide(matrix, np.maximum(totals, 1)) if normalize else matrix
    side = float(np.clip(0.35 * k + 2.5, 4.5, 14.0))
    fig = _new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(
        shown, cmap="Blues", vmin=0.0, vmax=1.0 if normalize else max(1, int(matrix.max())), interpolation="nearest"
    )
    fig.colorbar(image, ax=ax, shrink=0.8, label="fraction of the true class" if normalize else "count")
    if k <= _MAX_TICK_LABELS:
        ax.set_xticks(range(k), labels=names, rotation=90 if max(map(len, names)) > 3 else 0)
        ax.set_yticks(range(k), labels=names)
    if k <= _MAX_ANNOTATED_CLASSES:
        for i in range(k):
            for j in range(k):
                if matrix[i, j]:
                    dark = (shown[i, j] / (1.0 if normalize else max(1, matrix.max()))) > 0.5
                    ax.text(
                        j,
                        i,
                        str(int(matrix[i, j])),
                        ha="center",
                        va="center",
                        fontsize="small",
                        color="white" if dark else "black",
                    )
    ax.set(xlabel="predicted class", ylabel="true class")
    total = int(matrix.sum())
    accuracy = float(np.trace(matrix)) / total if total else float("nan")
    ax.set_title(title or f"Confusion matrix ({total} examples, top-1 {accuracy:.4f})")
    return fig


# --------------------------------------------------------------------------- files


def save_snapshots(path: str, snapshots: Mapping[int, Mapping[str, np.ndarray]]) -> None:
    """Writes `variance_histograms` input to an ``.npz`` (keys ``"<step>/<name>"``), atomically."""
    arrays = {
        f"{int(step)}/{name}": np.asarray(value) for step, snap in snapshots.items() for name, value in snap.items()
    }
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **arrays)
    os.replace(tmp, path)


def load_snapshots(path: str) -> dict[int, dict[str, np.ndarray]]:
    """Reads a file written by `save_snapshots`."""
    out: dict[int, dict[str, np.ndarray]] = {}
    with np.load(path) as data:
        for key in data.files:
            step, name = key.split("/", 1)
            out.setdefault(int(step), {})[name] = data[key]
    return dict(sorted(out.items()))


def save_figure(fig: Figure, path: str) -> str:
    """Saves `fig` as PNG (parent directories created) and returns the path."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, format="png", dpi=_DPI)
    return path


def _loss_params(workdir: str) -> tuple[float, float]:
    """The run's bias-loss alpha and beta (the schema's where its config.json lacks or garbles them)."""
    try:
        with open(os.path.join(workdir, CONFIG_FILE)) as f:
            bias = json.load(f)["bias_loss"]
        return float(bias["alpha"]), float(bias["beta"])
    except (OSError, ValueError, KeyError, TypeError):
        return DEFAULT_ALPHA, DEFAULT_BETA


def plot_path(workdir: str, name: str) -> str:
    """Where figure `name` of `workdir` is written: ``WORKDIR/plots/<name>.png``."""
    return os.path.join(workdir, PLOTS_SUBDIR, f"{name}.png")


def save_all(
    workdir: str,
    *,
    snapshots: Mapping[int, Mapping[str, np.ndarray]] | None = None,
    confusion: np.ndarray | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, str]:
    """Writes every figure the workdir (or the arguments) has data for to ``WORKDIR/plots/``.

    `snapshots` defaults to ``WORKDIR/bias_snapshots.npz`` and `confusion` /
    `class_names` to the ``confusion_matrix`` / ``class_names`` entries of
    ``WORKDIR/eval_results.json``, when those files exist.  Returns
    ``{figure name: png path}`` of what was written.
    """
    alpha, beta = _loss_params(workdir)
    written: dict[str, str] = {}

    def write(name: str, fig: Figure) -> None:
        written[name] = save_figure(fig, plot_path(workdir, name))

    scalars = read_scalars(os.path.join(workdir, TENSORBOARD_SUBDIR))
    if scalars:
        write(
            "training_curves",
            training_curves(scalars, alpha=alpha, beta=beta, title=os.path.basename(os.path.abspath(workdir))),
        )
    write("bias_vs_cross_entropy", loss_vs_probability(alpha=alpha, beta=beta))

    if snapshots is None and os.path.exists(os.path.join(workdir, SNAPSHOTS_FILE)):
        snapshots = load_snapshots(os.path.join(workdir, SNAPSHOTS_FILE))
    if snapshots:
        write("variance_histograms", variance_histograms(snapshots, alpha=alpha, beta=beta))

    if confusion is None and os.path.exists(os.path.join(workdir, EVAL_RESULTS_FILE)):
        with open(os.path.join(workdir, EVAL_RESULTS_FILE)) as f:
            results = json.load(f)
        if "confusion_matrix" in results:
            confusion = np.asarray(results["confusion_matrix"], np.int64)
            class_names = class_names if class_names is not None else results.get("class_names")
    if confusion is not None:
        write("confusion_matrix", confusion_matrix_figure(confusion, class_names))
    return written


def main(argv: Sequence[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(prog="python -m skipnet_jax.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="training (or evaluation) workdir")
    args = parser.parse_args(argv)
    if not os.path.isdir(args.workdir):
        print(f"error: --workdir {args.workdir} is not a directory", file=sys.stderr)
        return 2
    written = save_all(args.workdir)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0


if __name__ == "__main__":
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.exit(main())
