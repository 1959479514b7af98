"""One look for every PNG vidray writes (data reports, sweep results, evaluation, pretraining).

Figures are bare matplotlib ``Figure`` objects on the Agg canvas: nothing
touches pyplot's global state or needs a display, so they can be drawn in any
process (a Ray worker, a test, a headless job). Every figure is made with
:func:`new_figure`, styled with :func:`light_grid` and written with
:func:`save_figure`, so they share layout, grid, resolution and colours.
"""

from __future__ import annotations

from pathlib import Path

from matplotlib.figure import Figure

DPI = 120
GRID_ALPHA = 0.3
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
SEQUENTIAL_CMAP = "Blues"  # matrices of shares (confusion)
TRIAL_CMAP = "viridis"  # a continuous hyper-parameter


def new_figure(width: float, height: float) -> Figure:
    """A blank figure with constrained layout (labels never overlap or get cut)."""
    return Figure(figsize=(width, height), layout="constrained")


def light_grid(ax, axis: str = "both") -> None:
    """A faint grid behind the data."""
    ax.grid(axis=axis, alpha=GRID_ALPHA)
    ax.set_axisbelow(True)


def save_figure(fig: Figure, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=DPI)
    return path
