"""Figures (skipnet_jax.plots): pure figure functions and the workdir -> plots/*.png command.

Uses synthetic TensorBoard events and arrays only (no training), so it runs in seconds.
"""

import json
import os

import numpy as np
import pytest

from skipnet_jax import plots, reporting

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _axis_texts(fig):
    return [(ax.get_xlabel(), ax.get_ylabel(), ax.get_title()) for ax in fig.axes]


def _legend_labels(ax):
    legend = ax.get_legend()
    return [t.get_text() for t in legend.get_texts()] if legend else []


def _assert_png(path, min_bytes=15_000):
    with open(path, "rb") as f:
        data = f.read()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > min_bytes, (path, len(data))
    width, height = int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
    assert width >= 400 and height >= 300, (path, width, height)


def _write_events(tensorboard_dir, *, resumed=False):
    from flax.metrics import tensorboard

    writer = tensorboard.SummaryWriter(tensorboard_dir)
    steps = range(10, 110, 10)
    for s in steps:
        writer.scalar("train/loss", 2.0 * np.exp(-s / 40), s)
        writer.scalar("train/cross_entropy", 2.2 * np.exp(-s / 40), s)
        writer.scalar("train/accuracy", 1 - np.exp(-s / 30), s)
        writer.scalar("train/learning_rate", 1e-3 * (1 - s / 100), s)
        writer.scalar("train/bias_weight_mean", 0.85, s)
        writer.scalar("train/bias_weight_min", 0.7, s)
    for s in (50, 100):
        writer.scalar("eval/loss", 1.0 / s, s)
        writer.scalar("eval/top1", 0.5 + s / 250, s)
        writer.scalar("eval/top5", 0.9, s)
    writer.close()
    if resumed:  # a second event file re-logging step 100, as a resumed run does
        first = set(os.listdir(tensorboard_dir))
        writer = tensorboard.SummaryWriter(tensorboard_dir)
        writer.scalar("eval/top1", 0.99, 100)
        writer.close()
        # Names end in a per-process counter, and ".10." sorts before ".9.": give the
        # later file a name that sorts first, so only the events' wall time can order them.
        (later,) = set(os.listdir(tensorboard_dir)) - first
        os.rename(os.path.join(tensorboard_dir, later), os.path.join(tensorboard_dir, "events.out.tfevents.0.v2"))


def test_read_scalars_and_training_curves(tmp_path):
    tb = str(tmp_path / "tensorboard")
    _write_events(tb, resumed=True)
    scalars = plots.read_scalars(tb)
    steps, values = scalars["train/loss"]
    np.testing.assert_array_equal(steps, np.arange(10, 110, 10))
    np.testing.assert_allclose(values, 2.0 * np.exp(-steps / 40), rtol=1e-6)
    np.testing.assert_array_equal(scalars["eval/top1"][0], [50, 100])
    assert scalars["eval/top1"][1][-1] == pytest.approx(0.99)  # the later write wins
    assert plots.read_scalars(str(tmp_path / "absent")) == {}

    fig = plots.training_curves(scalars)
    assert len(fig.axes) == 4
    for xlabel, ylabel, title in _axis_texts(fig):
        assert xlabel == "step" and ylabel and title
    loss_ax, acc_ax = fig.axes[:2]
    assert {"train loss (objective)", "eval cross-entropy"} <= set(_legend_labels(loss_ax))
    assert {"train top-1", "eval top-1", "eval top-5"} <= set(_legend_labels(acc_ax))
    assert acc_ax.get_ylim() == pytest.approx((0.0, 1.02))
    assert any("z(0)" in t for t in _legend_labels(fig.axes[3]))

    ce_only = {k: v for k, v in scalars.items() if "bias" not in k}
    assert len(plots.training_curves(ce_only).axes) == 3  # no bias panel for a cross-entropy run


def test_variance_histograms():
    rng = np.random.default_rng(0)
    v0, v1 = rng.uniform(size=64), rng.uniform(size=64) ** 2
    snapshots = {100: {"normalized_variance": v1}, 0: {"normalized_variance": v0, "weights": np.exp(0.3 * v0) - 0.3}}
    fig = plots.variance_histograms(snapshots)
    ax_v, ax_w = fig.axes
    assert "variance" in ax_v.get_xlabel() and ax_v.get_ylabel() == "density"
    assert "z(v)" in ax_w.get_xlabel()
    assert _legend_labels(ax_v) == ["step 0 (n=64)", "step 100 (n=64)"]  # sorted by step
    assert ax_v.get_xlim() == pytest.approx((0.0, 1.0))
    lo, hi = ax_w.get_xlim()
    assert lo < 0.7 and hi > np.exp(0.3) - 0.3  # both bounds of z are visible
    # "global" normalisation can exceed 1: the range grows to hold every value.
    fig = plots.variance_histograms({5: {"normalized_variance": np.array([0.0, 0.5, 1.7])}})
    assert fig.axes[0].get_xlim()[1] == pytest.approx(1.7)
    with pytest.raises(ValueError, match="normalized_variance"):
        plots.variance_histograms({1: {"weights": np.ones(3)}})
    with pytest.raises(ValueError):
        plots.variance_histograms({})


def test_loss_vs_probability_matches_the_formula():
    fig = plots.loss_vs_probability(alpha=0.3, beta=0.3)
    (ax,) = fig.axes
    assert ax.get_xlabel() == "predicted probability of the true class p" and ax.get_ylabel() == "loss"
    labels = _legend_labels(ax)
    assert labels[0].startswith("cross-entropy") and len(labels) == 6
    assert [label.split("v = ")[1].split(" ")[0] for label in labels[1:]] == ["0", "0.25", "0.5", "0.75", "1"]
    ce_line, *bias_lines = ax.get_lines()
    p, ce = ce_line.get_data()
    np.testing.assert_allclose(ce, -np.log(p))
    for v, line in zip((0, 0.25, 0.5, 0.75, 1), bias_lines):
        np.testing.assert_allclose(line.get_ydata(), (np.exp(0.3 * v) - 0.3) * -np.log(p))


def test_confusion_matrix():
    labels = np.array([0, 0, 1, 2, 2, 2, 1])
    preds = np.array([0, 1, 1, 2, 0, 2, 1])
    mask = np.array([1, 1, 1, 1, 1, 1, 0])
    m = plots.confusion_matrix(labels, preds, 3, mask=mask)
    np.testing.assert_array_equal(m, [[1, 1, 0], [0, 1, 0], [1, 0, 2]])
    with pytest.raises(ValueError, match="labels"):
        plots.confusion_matrix(np.array([3]), np.array([0]), 3)

    fig = plots.confusion_matrix_figure(m, ["cat", "dog", "bird"])
    ax = fig.axes[0]
    assert (ax.get_xlabel(), ax.get_ylabel()) == ("predicted class", "true class")
    assert [t.get_text() for t in ax.get_xticklabels()] == ["cat", "dog", "bird"]
    assert [t.get_text() for t in ax.get_yticklabels()] == ["cat", "dog", "bird"]
    assert "top-1 0.6667" in ax.get_title()
    with pytest.raises(ValueError, match="class names"):
        plots.confusion_matrix_figure(m, ["a", "b"])


def test_save_all_and_cli(tmp_path):
    workdir = str(tmp_path)
    _write_events(os.path.join(workdir, "tensorboard"))
    with open(os.path.join(workdir, "config.json"), "w") as f:
        json.dump({"bias_loss": {"alpha": 0.5, "beta": 0.4}}, f)
    # Only curves and the loss figure can be made yet.
    written = plots.save_all(workdir)
    assert set(written) == {"training_curves", "bias_vs_cross_entropy"}

    rng = np.random.default_rng(1)
    plots.save_snapshots(
        os.path.join(workdir, plots.SNAPSHOTS_FILE),
        {0: {"normalized_variance": rng.uniform(size=32)}, 50: {"normalized_variance": rng.uniform(size=32)}},
    )
    assert sorted(plots.load_snapshots(os.path.join(workdir, plots.SNAPSHOTS_FILE))) == [0, 50]
    matrix = np.diag([5] * 10) + np.eye(10, k=1, dtype=int)
    with open(os.path.join(workdir, reporting.EVAL_RESULTS_FILE), "w") as f:
        json.dump({"confusion_matrix": matrix.tolist(), "class_names": [f"digit {i}" for i in range(10)]}, f)

    assert plots.main(["--workdir", workdir]) == 0
    names = sorted(os.listdir(os.path.join(workdir, "plots")))
    assert names == [
        "bias_vs_cross_entropy.png",
        "confusion_matrix.png",
        "training_curves.png",
        "variance_histograms.png",
    ]
    for name in names:
        _assert_png(os.path.join(workdir, "plots", name))
    assert plots.main(["--workdir", str(tmp_path / "missing")]) == 2
