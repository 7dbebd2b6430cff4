"""What every figure of :mod:`skipnet_jax.plots` shares: the canvas, the bias weight, the colours.

Figures are created without pyplot and drawn by the Agg canvas, so they work the same in
a script, a test or a notebook and never open a window.
"""

from __future__ import annotations

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from skipnet_jax import losses

DEFAULT_ALPHA, DEFAULT_BETA = losses.DEFAULT_ALPHA, losses.DEFAULT_BETA
DPI = 110


def new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)  # Agg, whatever pyplot's backend is
    return fig


def bias_weight(v: np.ndarray, alpha: float, beta: float) -> np.ndarray:
    """z(v) = exp(alpha * v) - beta (numpy twin of `losses.bias_weight`)."""
    return np.exp(alpha * np.asarray(v, np.float64)) - beta


def step_colors(n: int) -> list:
    """`n` colours along viridis, for series ordered in time (steps) or by a parameter."""
    import matplotlib

    cmap = matplotlib.colormaps["viridis"]
    return [cmap(x) for x in (np.linspace(0.0, 0.85, n) if n > 1 else [0.0])]
