"""The figure files of a workdir (``WORKDIR/plots/*.png``, the bias snapshots) and the CLI.

`save_all` decides which figures a workdir has data for; the figures themselves are drawn
by :mod:`~skipnet_jax.plots.curves`, :mod:`~skipnet_jax.plots.bias_loss` and
:mod:`~skipnet_jax.plots.confusion`.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Mapping, Sequence

import numpy as np
from matplotlib.figure import Figure

from skipnet_jax.plots.bias_loss import loss_vs_probability, variance_histograms
from skipnet_jax.plots.common import DEFAULT_ALPHA, DEFAULT_BETA, DPI
from skipnet_jax.plots.confusion import confusion_matrix_figure
from skipnet_jax.plots.curves import read_scalars, training_curves
from skipnet_jax.reporting import CONFIG_FILE, EVAL_RESULTS_FILE, TENSORBOARD_SUBDIR, atomic_write

# What ``python -m skipnet_jax.plots --help`` says the command does.
DESCRIPTION = "Figures of a training run: curves, bias-loss statistics, the loss itself, confusion matrix."

PLOTS_SUBDIR = "plots"
SNAPSHOTS_FILE = "bias_snapshots.npz"


def save_snapshots(path: str, snapshots: Mapping[int, Mapping[str, np.ndarray]]) -> None:
    """Writes `variance_histograms` input to an ``.npz`` (keys ``"<step>/<name>"``), atomically."""
    arrays = {
        f"{int(step)}/{name}": np.asarray(value) for step, snap in snapshots.items() for name, value in snap.items()
    }
    with atomic_write(path, "wb") as f:
        np.savez_compressed(f, **arrays)


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
    fig.savefig(path, format="png", dpi=DPI)
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


def _define_flags(fv) -> None:
    from absl import flags

    flags.DEFINE_string("workdir", None, "training (or evaluation) workdir", flag_values=fv)
    flags.mark_flag_as_required("workdir", flag_values=fv)


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m skipnet_jax.plots --workdir DIR``: writes every figure the workdir has data for."""
    from skipnet_jax import cli

    args = cli.parse_command_flags(_define_flags, argv, "python -m skipnet_jax.plots", DESCRIPTION)
    if not os.path.isdir(args.workdir):
        print(f"error: --workdir {args.workdir} is not a directory", file=sys.stderr)
        return 2
    written = save_all(args.workdir)
    for name, path in written.items():
        print(f"{name}: {path}")
    return 0
