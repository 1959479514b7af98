"""The sweep's figures: the metric against MixUp α (with Wilson intervals) and every trial's learning curves."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
from matplotlib.lines import Line2D

from vidray.figures import TRIAL_CMAP, distinct_colours, light_grid, new_figure, save_figure, text_inches
from vidray.report.trials import TrialSummary
from vidray.train.metrics import EPOCHS_DONE
from vidray.tune.space import short_number


def wilson_interval(proportion: float, n: int, z: float = 1.96) -> tuple[float, float]:
    """The Wilson score interval (95 % for z = 1.96) of a proportion measured on ``n`` trials.

    Exact for accuracy; for F1-type metrics over ``n`` videos, a binomial yardstick of the
    same size (their sampling noise is of that order), which is what the sweep figure needs:
    whether a gap between trials is larger than what ``n`` videos can resolve.
    """
    centre = (proportion + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(proportion * (1 - proportion) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def _interval_bars(trials: list[TrialSummary]) -> np.ndarray | None:
    """``[2, len(trials)]`` distances below/above each best value to its Wilson 95 % bounds (None: no counts)."""
    bounds = []
    for t in trials:
        if not t.best_videos or not 0.0 <= t.best_value <= 1.0:
            return None
        low, high = wilson_interval(t.best_value, t.best_videos)
        bounds.append((t.best_value - low, high - t.best_value))
    return np.array(bounds).T


def _mark_unfinished(ax, x, y, trials: list[TrialSummary], colour) -> set[str]:
    """A hollow ring around each trial ASHA stopped early, a cross on each that errored (it stopped, but not
    because ASHA ranked it low); returns which of the two were drawn."""
    drawn = set()
    ring, cross = dict(s=110, facecolors="none", edgecolors=colour), dict(s=70, marker="x", c="black")
    markers = {"stopped early": ring, "error": cross}
    for kind, marker in markers.items():
        points = [(xi, yi) for xi, yi, t in zip(x, y, trials) if t.status.startswith(kind)]
        if points:
            ax.scatter(*zip(*points), linewidths=1.5, zorder=3, **marker)
            drawn.add(kind)
    return drawn


def _status_handles(drawn: set[str]) -> list[Line2D]:
    """Legend entries for what :func:`_mark_unfinished` drew."""
    handles = []
    if "stopped early" in drawn:
        ring = dict(marker="o", ms=10, mfc="none", mec="0.3", mew=1.5)
        handles.append(Line2D([], [], ls="none", label="stopped early (ASHA)", **ring))
    if "error" in drawn:
        handles.append(Line2D([], [], ls="none", marker="x", ms=8, color="black", mew=1.5, label="errored"))
    return handles


def plot_metric_vs_mixup(trials: list[TrialSummary], metric: str, path: Path) -> Path:
    """tune.metric at each trial's best epoch against MixUp α, one line per (lr, wd[, seed]) setting.

    The y-axis spans the metric's whole range (0-1 for accuracy and F1: a 0.02 gap on a
    0.98-1.00 axis looks like a collapse), and each point carries a Wilson 95 % interval over
    the videos it was measured on, so a gap can be read against what that many videos resolve.
    """
    fig = new_figure(7.0, 4.5)
    ax = fig.add_subplot()
    # One line per setting that every α trained (build_param_space gives each α the same draws, and the same seed to
    # each repeat of a grid): the seed too, or a grid's repeats were joined into one zig-zag line.
    groups: dict[tuple[float, float, int | None], list[TrialSummary]] = {}
    for t in trials:
        if t.best_value is not None:
            groups.setdefault((t.params["lr"], t.params["weight_decay"], t.params.get("seed")), []).append(t)
    scored = [t for group in groups.values() for t in group]
    bounded = bool(scored) and "loss" not in metric and all(0.0 <= t.best_value <= 1.0 for t in scored)
    with_intervals = bounded and _interval_bars(scored) is not None
    drawn: set[str] = set()
    if len(groups) <= 10:
        spread = 0.012 * (max((t.params["mixup_alpha"] for t in scored), default=1.0) or 1.0)
        for index, ((lr, wd, seed), members) in enumerate(sorted(groups.items(), key=lambda item: (item[0][:2], item[0][2] or 0))):
            members = sorted(members, key=lambda t: t.params["mixup_alpha"])
            # Settings side by side at each α (a small horizontal offset), so their intervals do not hide each other.
            x = [t.params["mixup_alpha"] + (index - (len(groups) - 1) / 2) * spread for t in members]
            y = [t.best_value for t in members]
            label = f"lr={short_number(lr)}, wd={short_number(wd)}" + (f", seed={int(seed)}" if seed is not None else "")  # stored as a float
            line = ax.plot(x, y, marker="o", label=label)[0]
            if with_intervals:
                ax.errorbar(x, y, yerr=_interval_bars(members), fmt="none", ecolor=line.get_color(), capsize=3, alpha=0.8)
            drawn |= _mark_unfinished(ax, x, y, members, line.get_color())
        handles = ax.get_legend_handles_labels()[0] + _status_handles(drawn)
        ax.legend(handles=handles, fontsize=8, loc="lower right")
    else:  # lr drawn from a range: every trial is its own setting, so colour by lr instead
        x, y = [t.params["mixup_alpha"] for t in scored], [t.best_value for t in scored]
        if with_intervals:
            ax.errorbar(x, y, yerr=_interval_bars(scored), fmt="none", ecolor="0.6", capsize=2, zorder=1)
        points = ax.scatter(x, y, c=np.log10([t.params["lr"] for t in scored]), cmap=TRIAL_CMAP, zorder=2)
        fig.colorbar(points, ax=ax, label="log10(lr)")
        drawn = _mark_unfinished(ax, x, y, scored, "black")
        if drawn:  # below the axes: a scatter of many trials has no free corner
            fig.legend(handles=_status_handles(drawn), loc="outside lower center", ncol=2, fontsize=8)
    alphas = sorted({t.params["mixup_alpha"] for t in trials})
    ax.set_xticks(alphas, [short_number(a) for a in alphas])
    ax.set_xlabel("MixUp α (0 = no MixUp)")
    if bounded:
        ax.set_ylim(0.0, 1.02)  # a point at 1.0 stays whole
    ax.set_ylabel(f"{metric} (best epoch)" + (", full range 0-1" if bounded else ""))
    title = f"{metric} vs MixUp α ({len(trials)} trials)"
    if with_intervals:
        counts = sorted({t.best_videos for t in scored})
        videos = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
        title += f"\nbars: Wilson 95 % interval over the {videos} validation videos"
    ax.set_title(title, fontsize=10)
    light_grid(ax)
    return save_figure(fig, path)


LEGEND_PT = 8


def plot_learning_curves(trials: list[TrialSummary], path: Path) -> Path:
    """Train loss, val loss and val macro-F1 against epoch for every trial.

    Every trial has its own colour (vidray.figures.distinct_colours; the report sorts trials by α, lr and wd,
    so neighbouring colours are neighbouring settings), and the legend below the panels takes as many
    columns as the width holds and as many rows as the trials need: the figure grows with them.
    """
    panels = [("train_loss", "train loss"), ("val_loss", "val loss"), ("val_macro_f1", "val macro-F1")]
    width = 15.0
    label_width = max((text_inches(t.label, LEGEND_PT)[0] for t in trials), default=1.0)
    columns = max(1, min(len(trials), int((width - 0.5) // (label_width + 0.6))))  # + handle and gap
    rows = math.ceil(len(trials) / columns)
    fig = new_figure(width, 4.6 + rows * 1.35 * LEGEND_PT / 72)
    axes = fig.subplots(1, len(panels))
    for t, colour in zip(trials, distinct_colours(len(trials))):
        epochs = [row[EPOCHS_DONE] for row in t.history]
        for ax, (key, _) in zip(axes, panels):
            values = [row.get(key, np.nan) for row in t.history]
            ax.plot(epochs, values, marker="o", markersize=3, color=colour, label=t.label)
            if t.status == "stopped early" and epochs:
                ax.plot(epochs[-1], values[-1], marker="x", markersize=9, color=colour)
    max_epoch = max((t.epochs for t in trials), default=1)
    for ax, (_, title) in zip(axes, panels):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_xlim(0.5, max_epoch + 0.5)
        light_grid(ax)
    handles, labels = axes[0].get_legend_handles_labels()
    if labels:
        fig.legend(handles, labels, loc="outside lower center", ncol=columns, fontsize=LEGEND_PT)
    fig.suptitle("Learning curves (x: stopped early by ASHA)")
    return save_figure(fig, path)
