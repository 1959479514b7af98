"""The sweep's metric-vs-MixUp figure: a full y-range and an interval per point (issue 23, item 3)."""

from __future__ import annotations

import matplotlib.image
import pytest

from vidray.report.sweep_figures import plot_metric_vs_mixup, wilson_interval
from vidray.report.trials import TrialSummary


def test_wilson_interval():
    # 196 of 200 right (the demo's 0.98): about +-0.02, and never beyond [0, 1].
    low, high = wilson_interval(0.98, 200)
    assert low == pytest.approx(0.9497, abs=1e-3) and high == pytest.approx(0.9922, abs=1e-3)
    assert wilson_interval(1.0, 200)[1] == 1.0 and wilson_interval(0.0, 200)[0] == 0.0
    assert wilson_interval(1.0, 200)[0] == pytest.approx(0.9812, abs=1e-3)


def test_figure_has_full_range_and_intervals(tmp_path, monkeypatch):
    trials = [
        TrialSummary(trial_id=f"t{a}", label="", params={"mixup_alpha": a, "lr": 1e-3, "weight_decay": 0.05},
                     epochs_done=4, epochs=4, status="completed", last={}, best_value=value, best_epoch=4,
                     best_checkpoint="c", trial_dir="d", best_videos=200)
        for a, value in ((0.0, 1.0), (0.4, 0.98))
    ]  # fmt: skip
    from matplotlib.figure import Figure

    seen = {}
    original = Figure.savefig

    def keep(fig, *args, **kwargs):
        ax = fig.axes[0]
        seen.update(ylim=ax.get_ylim(), title=ax.get_title(), bars=len(ax.containers))
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)  # read the axes as drawn, then write the real PNG
    path = plot_metric_vs_mixup(trials, "val_macro_f1", tmp_path / "metric_vs_mixup.png")
    assert matplotlib.image.imread(path).shape[0] > 100
    assert seen["ylim"][0] == 0.0 and seen["ylim"][1] >= 1.0
    assert "Wilson 95 % interval over the 200 validation videos" in seen["title"] and seen["bars"] >= 1


# Figures read back as drawn: the function writes its PNG (Figure.savefig, kept as it is), and the test draws
# the same Figure again at the PNG's resolution to measure where its texts and axes landed.


def _saved_figures(monkeypatch) -> list:
    from matplotlib.figure import Figure

    figures, original = [], Figure.savefig

    def keep(fig, *args, **kwargs):
        figures.append(fig)
        return original(fig, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", keep)
    return figures


def _drawn(fig):
    """The renderer of ``fig`` drawn at the PNG's resolution, with the layout the PNG got."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from vidray.figures import DPI

    FigureCanvasAgg(fig)
    fig.set_dpi(DPI)
    fig.canvas.draw()
    return fig.canvas.get_renderer()


def _inside(box, fig) -> bool:
    return box.x0 >= -1 and box.y0 >= -1 and box.x1 <= fig.bbox.x1 + 1 and box.y1 <= fig.bbox.y1 + 1


def _layout_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "constrained_layout" in str(w.message)]


def _sweep(n: int, statuses: list[str], same_setting: bool = False) -> list[TrialSummary]:
    """``n`` trials as vidray.report.results hands them over (sorted by α, lr, wd), with per-epoch history."""
    import numpy as np

    from vidray.train.metrics import EPOCHS_DONE

    rng, trials = np.random.default_rng(0), []
    for i in range(n):
        alpha, lr, wd = (0.0, 0.2, 0.4, 0.8)[i % 4], float(10 ** rng.uniform(-4.4, -3.4)), float(rng.uniform(0.01, 0.1))
        if same_setting:
            lr, wd = 1e-4, 0.05
        status = statuses[i % len(statuses)]
        done = 6 if status == "completed" else 3
        history = [{EPOCHS_DONE: e, "train_loss": 2.0 - 0.2 * e, "val_loss": 2.1 - 0.2 * e, "val_macro_f1": 0.1 * e}
                   for e in range(1, done + 1)]  # fmt: skip
        trials.append(TrialSummary(
            trial_id=f"t{i}", label=f"MixUp α={alpha}, lr={lr:.1e}, wd={wd:.2f}, seed={i}",
            params={"mixup_alpha": alpha, "lr": lr, "weight_decay": wd}, epochs_done=done, epochs=6, status=status,
            last={}, best_value=round(float(rng.uniform(0.3, 0.95)), 3), best_epoch=done, best_checkpoint="c",
            trial_dir="d", history=history, best_videos=300,
        ))  # fmt: skip
    return sorted(trials, key=lambda t: (t.params["mixup_alpha"], t.params["lr"], t.params["weight_decay"]))


def _rings(ax) -> set[tuple[float, float]]:
    """Centres of the hollow markers (a scatter drawn with facecolors='none') on ``ax``."""
    from matplotlib.collections import PathCollection

    return {
        (round(float(x), 6), round(float(y), 6))
        for c in ax.collections if isinstance(c, PathCollection) and len(c.get_facecolors()) == 0
        for x, y in c.get_offsets()
    }  # fmt: skip


def _legend_texts(fig) -> list[str]:
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    return [text.get_text() for legend in legends for text in legend.get_texts()]


def test_many_settings_ring_the_trials_asha_stopped_and_say_so(tmp_path, monkeypatch):
    """COIN-12's sweep (lr and wd drawn: 12 settings) took the scatter branch, which drew no rings and no legend:
    stopped trials looked finished. Errored trials are not 'stopped early'."""
    figures = _saved_figures(monkeypatch)
    trials = _sweep(12, ["completed", "stopped early", "stopped early", "error: RuntimeError"])
    plot_metric_vs_mixup(trials, "val_macro_f1", tmp_path / "metric_vs_mixup.png")
    ax = figures[0].axes[0]
    stopped = {(t.params["mixup_alpha"], t.best_value) for t in trials if t.status == "stopped early"}
    assert len(stopped) == 6 and _rings(ax) == stopped
    assert any("stopped early" in text for text in _legend_texts(figures[0]))
    assert any("errored" in text for text in _legend_texts(figures[0]))


def test_a_few_settings_ring_only_stopped_trials_not_errored_ones(tmp_path, monkeypatch):
    figures = _saved_figures(monkeypatch)
    trials = _sweep(4, ["completed", "stopped early", "error: RuntimeError", "completed"], same_setting=True)
    plot_metric_vs_mixup(trials, "val_macro_f1", tmp_path / "metric_vs_mixup.png")
    ax = figures[0].axes[0]
    assert _rings(ax) == {(t.params["mixup_alpha"], t.best_value) for t in trials if t.status == "stopped early"}
    assert {"stopped early (ASHA)", "errored"} <= set(_legend_texts(figures[0]))


@pytest.mark.parametrize("n", [12, 120])
def test_every_learning_curve_has_its_own_colour_and_the_legend_fits(tmp_path, monkeypatch, n):
    """Colours cycled C0-C9 (two trials shared one beyond 10); at 66+ trials the legend outgrew the figure
    (constrained layout gave up) and at 120 it covered the panels."""
    import warnings

    from matplotlib.colors import to_rgba

    from vidray.report.sweep_figures import plot_learning_curves

    figures = _saved_figures(monkeypatch)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        path = plot_learning_curves(_sweep(n, ["completed", "stopped early"]), tmp_path / "learning_curves.png")
        renderer = _drawn(figures[0])
    assert not _layout_warnings(caught)
    assert matplotlib.image.imread(path).shape[0] > 500
    fig = figures[0]
    for ax in fig.axes:
        colours = [to_rgba(line.get_color()) for line in ax.get_lines() if not line.get_label().startswith("_")]
        assert len(colours) == n and len(set(colours)) == n
    (legend,) = fig.legends
    box = legend.get_window_extent(renderer)
    assert len(legend.get_texts()) == n and _inside(box, fig)
    for ax in fig.axes:
        assert not box.overlaps(ax.get_window_extent(renderer)), "the legend covers a panel"
        assert ax.get_window_extent(renderer).height > 2.5 * fig.dpi  # panels stay readable


COIN_LIKE = [f"ReplaceRefrigeratorFilter{i:03d}" for i in range(180)]  # COIN's longest task name has 30 characters


@pytest.mark.parametrize(
    ("classes", "min_inches"),
    [
        (["Removing_snow_from_a_car_windshield_0", "Replacing_the_battery_of_a_car_key_01",
          "Assembling_an_office_chair_at_home_02"], 2.9),
        (["A" * 45 + "_" + "b" * 44, "Cleaning " * 9 + "x"], 2.9),
        (COIN_LIKE, 20.0),
    ],
    ids=["3-classes-37-chars", "2-classes-90-chars", "180-classes"],
)  # fmt: skip
def test_the_confusion_matrix_keeps_its_size_and_title_with_long_names(tmp_path, monkeypatch, classes, min_inches):
    """Three 37-character names shrank the matrix to 0.7 inch and cut the title; two of 90 characters made
    constrained layout give up. The matrix keeps its size, names and title stay in the figure, all within
    CONFUSION_MAX_INCHES at COIN's 180 tasks."""
    import warnings

    import numpy as np
    from matplotlib.text import Text

    from vidray.infer.evaluate import CONFUSION_MAX_INCHES, plot_confusion

    figures = _saved_figures(monkeypatch)
    k = len(classes)
    confusion = np.random.default_rng(0).integers(0, 3, (k, k)) + 20 * np.eye(k, dtype=int)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_confusion(confusion, classes, tmp_path / "confusion.png", title="val: checkpoint_000014")
        renderer = _drawn(figures[0])
    assert not _layout_warnings(caught)
    fig = figures[0]
    ax = fig.axes[0]
    matrix = ax.get_window_extent(renderer)
    assert min(matrix.width, matrix.height) >= min_inches * fig.dpi
    width, height = fig.get_size_inches()
    assert width <= CONFUSION_MAX_INCHES + 1 and height <= CONFUSION_MAX_INCHES
    (title,) = [t for t in fig.findobj(Text) if "accuracy" in t.get_text()]
    assert "val: checkpoint_000014" in title.get_text() and _inside(title.get_window_extent(renderer), fig)
    assert not title.get_window_extent(renderer).overlaps(matrix)
    for label in [*ax.get_xticklabels(), *ax.get_yticklabels()]:
        assert label.get_text() and _inside(label.get_window_extent(renderer), fig), label.get_text()


def test_a_repeated_grid_draws_a_line_per_seed_not_one_zig_zag(tmp_path, monkeypatch):
    """A pure grid repeated (tune.num_samples > 1) gives each repeat a seed of its own, the same for every α
    (vidray/tune/space.py): its trials were joined into one line by (lr, wd), going up and down at each α. The
    seeds come as trial summaries hold them, floats, and are labelled as whole numbers."""
    figures = _saved_figures(monkeypatch)
    trials = [
        TrialSummary(trial_id=f"t{a}-{seed}", label="", params={"mixup_alpha": a, "lr": 1e-4, "weight_decay": 0.05, "seed": seed},
                     epochs_done=4, epochs=4, status="completed", last={}, best_value=value, best_epoch=4,
                     best_checkpoint="c", trial_dir="d", best_videos=200)
        for (a, seed), value in {(0.0, 11.0): 0.9, (0.0, 22.0): 0.7, (0.4, 11.0): 0.85, (0.4, 22.0): 0.75}.items()
    ]  # fmt: skip
    plot_metric_vs_mixup(trials, "val_macro_f1", tmp_path / "metric_vs_mixup.png")
    lines = [line for line in figures[0].axes[0].lines if line.get_marker() == "o"]
    assert sorted(len(line.get_xdata()) for line in lines) == [2, 2]
    assert {"lr=1e-4, wd=0.05, seed=11", "lr=1e-4, wd=0.05, seed=22"} <= set(_legend_texts(figures[0]))
