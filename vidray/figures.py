"""One look for every PNG vidray writes (data reports, sweep results, evaluation, pretraining).

Figures are bare matplotlib ``Figure`` objects on the Agg canvas: nothing
touches pyplot's global state or needs a display, so they can be drawn in any
process (a Ray worker, a test, a headless job). Every figure is made with
:func:`new_figure`, styled with :func:`light_grid` and written with
:func:`save_figure`, so they share layout, grid, resolution and colours.
"""

from __future__ import annotations

import functools
import re
from pathlib import Path

import numpy as np
from matplotlib import colormaps
from matplotlib.backends.backend_agg import RendererAgg
from matplotlib.figure import Figure
from matplotlib.font_manager import FontProperties

DPI = 120
GRID_ALPHA = 0.3
SPLIT_COLOURS = {"train": "#4C72B0", "val": "#DD8452", "test": "#55A868"}
SEQUENTIAL_CMAP = "Blues"  # matrices of shares (confusion)
TRIAL_CMAP = "viridis"  # a continuous hyper-parameter
MANY_TRIALS_CMAP = "turbo"  # one colour per trial beyond tab20's 20
LABEL_CHARS = 30  # a tick label's line (fit_label): COIN's longest task name, ReplaceRefrigeratorWaterFilter


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


@functools.cache
def _measuring_renderer() -> RendererAgg:
    return RendererAgg(1, 1, 72)  # one pixel per point


def text_inches(text: str, size: float) -> tuple[float, float]:
    """Width and height in inches of ``text`` (lines split at newlines) set at ``size`` points in the default font."""
    lines = str(text).split("\n")
    prop = FontProperties(size=size)
    width = max(_measuring_renderer().get_text_width_height_descent(line, prop, ismath=False)[0] for line in lines)
    return width / 72, len(lines) * size * 1.2 / 72


def wrap_to_width(text: str, width: float, size: float) -> str:
    """``text`` broken at spaces into lines no wider than ``width`` inches at ``size`` points (a title that fits),
    a parenthesis kept on one line where it fits."""
    lines: list[str] = []
    for paragraph in str(text).split("\n"):
        line = ""
        for group in re.split(r" (?![^(]*\))", paragraph):
            words = [group] if text_inches(group, size)[0] <= width else group.split(" ")
            for word in words:
                while len(word) > 1 and text_inches(word, size)[0] > width:  # wider than a line alone: cut it
                    fits = [n for n in range(1, len(word)) if text_inches(word[:n], size)[0] <= width]
                    cut = fits[-1] if fits else 1
                    lines += [line, word[:cut]] if line else [word[:cut]]
                    line, word = "", word[cut:]
                candidate = f"{line} {word}" if line else word
                if line and text_inches(candidate, size)[0] > width:
                    lines.append(line)
                    candidate = word
                line = candidate
        lines.append(line)
    return "\n".join(lines)


def shorten_middle(text: str, chars: int) -> str:
    """``text`` cut to ``chars`` characters by an ellipsis in its middle: both ends (names differ there) stay."""
    if len(text) <= chars:
        return text
    front = chars // 2
    return text[:front] + "\u2026" + text[len(text) - (chars - 1 - front) :]


def fit_label(name: str, chars: int, lines: int = 1) -> str:
    """A class name as a tick label: at most ``lines`` lines of ``chars`` characters, broken after ``_``, ``-``,
    ``/`` or a space where it can be (mid-word where a piece is longer than a line), and shortened in its
    middle where it still does not fit."""
    if len(name) <= chars:
        return name
    out = [""]
    for piece in re.findall(r"[^_\-/ ]+[_\-/ ]*|[_\-/ ]+", name):
        if out[-1] and len(out[-1]) + len(piece) > chars and len(piece) <= chars:  # a new line for it
            out.append("")
        while len(out[-1]) + len(piece) > chars:
            room = chars - len(out[-1])
            out[-1] += piece[:room]
            piece = piece[room:]
            out.append("")
        out[-1] += piece
    out = [line for line in out if line]
    if len(out) > lines:
        out = out[: lines - 1] + [shorten_middle("".join(out[lines - 1 :]), chars)]
    return "\n".join(line.rstrip() or line for line in out)


def tick_label_lines(spacing: float, size: float) -> int:
    """How many lines (1 to 3, for :func:`fit_label`) a tick label rotated 45° at ``size`` points may take where its
    neighbour's is ``spacing`` inches away: a rotated line takes about 1.8x its size across."""
    return int(np.clip(72 * spacing // (1.8 * size), 1, 3))


def distinct_colours(n: int) -> list:
    """``n`` pairwise different colours in order: tab10, then tab20, then evenly along MANY_TRIALS_CMAP (its
    table interpolated, so they stay different for any ``n``; neighbours in the order get neighbouring hues)."""
    if n <= 10:
        return [f"C{i}" for i in range(n)]
    if n <= 20:  # tab20's dark hues, then its light ones: neighbours keep different hues
        colours = colormaps["tab20"].colors
        return list(colours[0::2] + colours[1::2])[:n]
    cmap = colormaps[MANY_TRIALS_CMAP]
    anchors = cmap(np.arange(cmap.N))[int(0.03 * cmap.N) : int(0.97 * cmap.N), :3]  # its own table: no repeats
    at = np.linspace(0.0, 1.0, n)
    grid = np.linspace(0.0, 1.0, len(anchors))
    rgb = np.stack([np.interp(at, grid, anchors[:, c]) for c in range(3)], axis=1)
    return [tuple(float(c) for c in colour) for colour in rgb]
