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

Every figure function is pure: it takes arrays and returns a `matplotlib.figure.Figure`
(created without pyplot, drawn by the Agg canvas), so it works the same in a script, a
test or a notebook and never opens a window.  One module per kind of figure
(:mod:`~skipnet_jax.plots.curves`, :mod:`~skipnet_jax.plots.bias_loss`,
:mod:`~skipnet_jax.plots.confusion`); :mod:`~skipnet_jax.plots.files` writes them.  This
package is the import path of training, evaluation and `skipnet_jax.compare`.
"""

from skipnet_jax.plots.bias_loss import loss_vs_probability, variance_histograms
from skipnet_jax.plots.confusion import confusion_matrix, confusion_matrix_figure
from skipnet_jax.plots.curves import read_scalars, training_curves
from skipnet_jax.plots.files import (
    PLOTS_SUBDIR,
    SNAPSHOTS_FILE,
    load_snapshots,
    main,
    plot_path,
    save_all,
    save_figure,
    save_snapshots,
)

__all__ = [
    "PLOTS_SUBDIR",
    "SNAPSHOTS_FILE",
    "confusion_matrix",
    "confusion_matrix_figure",
    "load_snapshots",
    "loss_vs_probability",
    "main",
    "plot_path",
    "read_scalars",
    "save_all",
    "save_figure",
    "save_snapshots",
    "training_curves",
    "variance_histograms",
]
