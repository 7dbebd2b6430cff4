"""The eval confusion matrix: counting it, and its heat map."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from matplotlib.figure import Figure

from skipnet_jax.plots.common import new_figure


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
    fig = new_figure(side + 1.2, side)
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
