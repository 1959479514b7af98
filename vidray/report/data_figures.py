"""Data-report figures (PNG) of a manifest, in vidray's figure style (vidray/figures.py)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from vidray.config import SPLITS
from vidray.figures import (
    LABEL_CHARS, SPLIT_COLOURS, fit_label, light_grid, new_figure, save_figure, tick_label_lines, wrap_to_width,
)  # fmt: skip
from vidray.data.index import read_manifest


def plot_data_report(manifest: Path, out_dir: Path) -> list[Path]:
    """Class distribution (stacked by split) and duration histogram (per split) of a manifest.

    Writes ``class_distribution.png`` and, when the manifest was probed,
    ``duration_distribution.png`` into ``out_dir``; returns the paths written.
    """
    frame, classes = read_manifest(manifest)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title_source = Path(manifest).name
    splits = [s for s in SPLITS if (frame["split"] == s).any()]
    paths = [_class_distribution(frame, classes, splits, title_source, out_dir / "class_distribution.png")]
    durations = frame["duration"].dropna()
    if len(durations):
        paths.append(_duration_distribution(frame, splits, title_source, out_dir / "duration_distribution.png"))
    return paths


CLASSES_MAX_INCHES = 40.0  # 4,800 px at vidray.figures.DPI: 180 classes still get 15 pt each


def _class_distribution(frame, classes: list[str], splits: list[str], source: str, path: Path) -> Path:
    counts = frame.groupby(["label", "split"]).size()
    # Under half an inch per class, up to CLASSES_MAX_INCHES: COIN's 180 tasks were an 83-inch (10,000 px) strip.
    width = min(max(6.0, 0.45 * len(classes) + 2.5), CLASSES_MAX_INCHES)
    fig = new_figure(width, 5.0)
    ax = fig.add_subplot()
    x = np.arange(len(classes))
    bottom = np.zeros(len(classes))
    for split in splits:
        heights = np.array([counts.get((name, split), 0) for name in classes], dtype=float)
        ax.bar(x, heights, bottom=bottom, color=SPLIT_COLOURS[split], label=f"{split} ({int(heights.sum())})")
        bottom += heights
    for xi, total in zip(x, bottom):
        ax.annotate(
            f"{int(total)}", (xi, total), xytext=(0, 2), textcoords="offset points", ha="center", va="bottom", size=8
        )
    lines = tick_label_lines((width - 2.5) / len(classes), 9)  # as many as a bar's width holds
    names = [fit_label(name, LABEL_CHARS, lines) for name in classes]
    ax.set_xticks(x, names, rotation=45, ha="right", rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.6, len(classes) - 0.4)
    ax.set_ylim(0, max(1.0, bottom.max()) * 1.1)
    ax.set_xlabel("class")
    ax.set_ylabel("videos")
    # Over the whole figure and wrapped to it: an axes title of a narrow figure ran under the legend and off its left.
    title = f"Videos per class and split: {source} ({len(frame)} videos, {len(classes)} classes)"
    fig.suptitle(wrap_to_width(title, width - 0.3, 12), fontsize=12)
    # Beside the axes, from their top (below the title; a figure legend sat at the figure's top): never over a bar.
    ax.legend(title="split (videos)", loc="upper left", bbox_to_anchor=(1.0, 1.0), borderaxespad=0.6)
    light_grid(ax, axis="y")
    return save_figure(fig, path)


def _duration_distribution(frame, splits: list[str], source: str, path: Path) -> Path:
    durations = frame["duration"].dropna()
    bins = np.histogram_bin_edges(durations, bins=min(40, max(5, int(np.sqrt(len(durations))))))
    if bins[0] == bins[-1]:  # all videos equally long
        bins = np.array([bins[0] - 0.5, bins[0] + 0.5])
    fig = new_figure(8.0, 4.5)
    ax = fig.add_subplot()
    for split in splits:
        values = frame.loc[frame["split"] == split, "duration"].dropna()
        if len(values):
            label = f"{split} (n={len(values)}, median {np.median(values):.1f} s)"
            ax.hist(values, bins=bins, histtype="step", linewidth=2, color=SPLIT_COLOURS[split], label=label)
    ax.set_xlabel("duration (s)")
    ax.set_ylabel("videos")
    unprobed = int(frame["duration"].isna().sum())
    note = f", {unprobed} without duration" if unprobed else ""
    ax.set_title(f"Video durations per split: {source}{note}")
    ax.legend()
    light_grid(ax)
    return save_figure(fig, path)
