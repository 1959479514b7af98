"""Data report figures drawn from a real manifest."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from matplotlib.colors import to_rgb
from matplotlib.image import imread

from vidray.data.demo import generate_demo_videos
from vidray.errors import UserError
from vidray.data.index import index_folder, write_manifest
from vidray.report.data_figures import SPLIT_COLOURS, plot_data_report

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("reports")
    generate_demo_videos(root / "videos", classes=4, videos_per_class=10, seed=0)
    index_folder(root / "videos", root / "manifest.parquet")
    return root / "manifest.parquet"


def colour_share(image: np.ndarray, colour: str) -> float:
    """Fraction of pixels drawn in exactly this colour (within PNG rounding)."""
    return float((np.abs(image[..., :3] - np.array(to_rgb(colour))) < 0.02).all(axis=-1).mean())


def test_data_report_draws_both_figures_with_every_split(manifest, tmp_path):
    paths = plot_data_report(manifest, tmp_path / "figures")
    assert [p.name for p in paths] == ["class_distribution.png", "duration_distribution.png"]
    for path in paths:
        image = imread(path)
        assert image.shape[0] >= 400 and image.shape[1] >= 600
        assert image[..., :3].std() > 0.05  # not a blank canvas
        # Every split is drawn in its own colour (bars or histogram lines).
        for split, colour in SPLIT_COLOURS.items():
            assert colour_share(image, colour) > 0.001, f"{path.name}: no {split} data drawn"
    bars = imread(paths[0])
    shares = [colour_share(bars, SPLIT_COLOURS[s]) for s in ("train", "val", "test")]
    # 6 / 2 / 2 videos per class and split: bar segments in that proportion.
    assert shares[0] / shares[1] == pytest.approx(3, rel=0.2) and shares[1] / shares[2] == pytest.approx(1, rel=0.2)


def test_unprobed_manifest_gets_only_the_class_figure(manifest, tmp_path):
    videos = Path(manifest).parent / "videos"
    unprobed = tmp_path / "unprobed.parquet"
    index_folder(videos, unprobed, probe=False)
    paths = plot_data_report(unprobed, tmp_path / "figures")
    assert [p.name for p in paths] == ["class_distribution.png"]


def test_the_class_figure_of_coins_180_tasks_stays_a_figure_a_person_opens(tmp_path):
    """Under half an inch per class, capped: COIN's 180 tasks drew an 83-inch (10,000 px) wide strip."""
    from vidray.figures import DPI
    from vidray.report.data_figures import CLASSES_MAX_INCHES

    classes = [f"task {i:03d}" for i in range(180)]
    rows = [{"path": f"/v/{c}/{split}.mp4", "video_id": f"{c}/{split}", "label": c, "label_index": i, "split": split}
            for i, c in enumerate(classes) for split in ("train", "val")]  # fmt: skip
    write_manifest(rows, classes, tmp_path / "m.parquet")
    (path,) = plot_data_report(tmp_path / "m.parquet", tmp_path / "figures")
    height, width, _ = imread(path).shape
    assert width <= CLASSES_MAX_INCHES * DPI and height <= 5 * DPI
    assert colour_share(imread(path), SPLIT_COLOURS["val"]) > 0.001  # the bars are drawn


def test_missing_manifest_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match=rf"manifest {tmp_path / 'none.parquet'} not found: run `vidray index"):
        plot_data_report(tmp_path / "none.parquet", tmp_path / "figures")
    assert not (tmp_path / "figures").exists()


def test_cli_report_data(manifest, tmp_path):
    out = tmp_path / "cli_figures"
    result = subprocess.run(
        [sys.executable, "-m", "vidray", "report", "data", "--manifest", str(manifest), "--out", str(out)],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout.strip().splitlines()[-1])["figures"]
    assert sorted(Path(f).name for f in figures) == ["class_distribution.png", "duration_distribution.png"]
    assert all(Path(f).stat().st_size > 10_000 for f in figures)


@pytest.mark.parametrize(
    "classes",
    [["cut", "paste"], ["Removing_snow_from_a_car_windshield_0", "Replacing the battery of a car key with a new one"]],
    ids=["short-names", "long-names"],
)
def test_the_class_figure_of_two_classes_keeps_its_title_whole_and_clear_of_the_legend(tmp_path, monkeypatch, classes):
    """With 2 classes (a 6-inch figure) the axes title ran off the figure's left and under the legend."""
    import warnings

    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.text import Text

    from vidray.figures import DPI

    figures, original = [], Figure.savefig
    monkeypatch.setattr(Figure, "savefig", lambda fig, *a, **kw: (figures.append(fig), original(fig, *a, **kw))[1])
    rows = [{"path": f"/v/{i}/{s}{j}.mp4", "video_id": f"{i}/{s}{j}", "label": c, "label_index": i, "split": s}
            for i, c in enumerate(classes) for s in ("train", "val", "test") for j in range(4)]  # fmt: skip
    write_manifest(rows, classes, tmp_path / "manifest.parquet")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plot_data_report(tmp_path / "manifest.parquet", tmp_path / "figures")
        (fig,) = figures
        FigureCanvasAgg(fig)  # drawn again at the PNG's resolution, to measure where the texts landed
        fig.set_dpi(DPI)
        fig.canvas.draw()
    assert not [w for w in caught if "constrained_layout" in str(w.message)]
    renderer = fig.canvas.get_renderer()
    (title,) = [t for t in fig.findobj(Text) if t.get_text().startswith("Videos per class")]
    assert "manifest.parquet" in title.get_text() and "2 classes" in title.get_text()
    box = title.get_window_extent(renderer)
    assert box.x0 >= 0 and box.y0 >= 0 and box.x1 <= fig.bbox.x1 and box.y1 <= fig.bbox.y1, "the title is cut"
    legends = [*fig.legends, *(ax.get_legend() for ax in fig.axes if ax.get_legend() is not None)]
    assert legends and not any(box.overlaps(legend.get_window_extent(renderer)) for legend in legends)
    for label in fig.axes[0].get_xticklabels():
        tick = label.get_window_extent(renderer)
        assert tick.x0 >= 0 and tick.y0 >= 0, label.get_text()
