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
