"""The synthetic demo set: real H.264 files, deterministic, classes defined only by time."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest

from vidray.data.demo import (
    DEMO_CLASSES, DURATION_RANGE, FRAME_RATES, FRAME_SIZES, GENERATOR_VERSION, generate_demo_videos,
    recorded_demo_settings, render_clip, settings_file,
)  # fmt: skip
from vidray.errors import UserError

REPO = Path(__file__).resolve().parents[1]
PAIRS = list(zip(DEMO_CLASSES[0::2], DEMO_CLASSES[1::2]))


def decode(path) -> tuple[np.ndarray, float]:
    with av.open(str(path)) as container:
        fps = float(container.streams.video[0].average_rate)
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)]), fps


def digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def demo_all(tmp_path_factory):
    """All 12 classes, 3 videos each (one per split)."""
    root = tmp_path_factory.mktemp("demo") / "videos"
    return root, generate_demo_videos(root, classes=12, videos_per_class=3, seed=0)


def test_layout_summary_and_decodable_h264(demo_all):
    root, summary = demo_all
    assert summary["classes"] == DEMO_CLASSES
    assert summary["videos"] == 36
    assert summary["per_split"] == {"train": 12, "val": 12, "test": 12}
    files = sorted(root.rglob("*"))
    videos = [f for f in files if f.is_file()]
    assert len(videos) == 36 and all(f.suffix == ".mp4" for f in videos)  # nothing else, no .part leftovers
    # Beside the folder, the settings it was made with (vidray.data.prepare checks a run's against them).
    assert recorded_demo_settings(root) == {
        "classes": 12, "videos_per_class": 3, "seed": 0, "generator": GENERATOR_VERSION,
        "folder": [root.stat().st_dev, root.stat().st_ino]}  # fmt: skip
    assert sorted(p.name for p in root.parent.iterdir()) == [settings_file(root).name, "videos"]
    for split in ("train", "val", "test"):
        assert sorted(p.name for p in (root / split).iterdir()) == sorted(DEMO_CLASSES)
        for name in DEMO_CLASSES:
            assert len(list((root / split / name).glob("*.mp4"))) == 1
    assert not list(root.parent.glob(".videos.partial-*"))

    total = 0.0
    for path in videos:
        with av.open(str(path)) as container:
            assert container.streams.video[0].codec_context.name == "h264"
        frames, fps = decode(path)
        height, width = frames.shape[1:3]
        assert (width, height) in FRAME_SIZES
        assert fps in FRAME_RATES
        assert DURATION_RANGE[0] - 0.1 <= len(frames) / fps <= DURATION_RANGE[1] + 0.1
        total += len(frames) / fps
    assert summary["total_duration_s"] == pytest.approx(total, abs=0.05)


def digests(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): digest(p) for p in sorted(root.rglob("*.mp4"))}


GENERATE_IN_SUBPROCESS = """
import sys
from pathlib import Path
from vidray.data.demo import generate_demo_videos
generate_demo_videos(Path(sys.argv[1]), classes=4, videos_per_class=6, seed=0)
"""


def test_same_seed_gives_byte_identical_files_even_when_generated_concurrently(demo_all, tmp_path):
    """Three generations of one set at once, two sharing this process (each with its own thread
    pool) and one in a fresh interpreter, under the load they put on each other: every file's bytes
    agree. x264's macroblock-tree made 1 in 3 files differ here before (vidray.data.video.DETERMINISTIC_X264)."""
    import threading

    roots = [tmp_path / f"run{i}" for i in range(3)]
    child = subprocess.Popen([sys.executable, "-c", GENERATE_IN_SUBPROCESS, str(roots[2])], cwd=REPO)
    threads = [
        threading.Thread(target=generate_demo_videos, args=(root,), kwargs=dict(classes=4, videos_per_class=6, seed=0))
        for root in roots[:2]
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert child.wait(timeout=600) == 0
    runs = [digests(root) for root in roots]
    assert len(runs[0]) == 24
    for other in runs[1:]:
        differing = sorted(name for name in runs[0] if other.get(name) != runs[0][name])
        assert not differing, f"{len(differing)} of 24 files differ between concurrent runs: {differing[:3]}"

    # Each video's RNG depends on (seed, class, index) only: the 12-class set, made earlier and
    # alone, holds the same files for the first 4 classes' first 3 videos (train 0, val 1, test 2 of 3).
    for path in sorted(demo_all[0].rglob("*.mp4")):
        name = path.parent.name
        if name in DEMO_CLASSES[:4] and path.name.endswith("_000.mp4"):
            assert digest(path) == digest(roots[0] / "train" / name / path.name)


def test_encoded_bytes_do_not_depend_on_the_cpu_features_x264_uses():
    """The same clip encoded with x264 capped at each SIMD level up to what this CPU has (AVX-512
    on the dev machines) gives identical bytes, so files made on another x86 machine match."""
    import io
    from fractions import Fraction

    from vidray.data.video import DETERMINISTIC_X264

    frames, fps = render_clip(DEMO_CLASSES[0], np.random.default_rng([0, 0, 0]))

    def encode(cpu: str | None) -> bytes:
        buf = io.BytesIO()
        params = DETERMINISTIC_X264["x264-params"] + (f":asm={cpu}" if cpu else "")
        with av.open(buf, mode="w", format="mp4") as container:
            stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
            stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
            stream.options = {"crf": "23", "preset": "veryfast", **DETERMINISTIC_X264, "x264-params": params}
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    container.mux(packet)
            for packet in stream.encode():
                container.mux(packet)
        return buf.getvalue()

    reference = encode(None)
    for cpu in ("SSE4.2", "AVX", "AVX2"):
        assert encode(cpu) == reference, f"x264 capped at {cpu} encodes differently"
    assert len({encode(None) for _ in range(4)}) == 1  # and again in this process: no history effect


def test_other_seed_gives_other_videos(demo_all, tmp_path):
    root, _ = demo_all
    other = tmp_path / "other"
    generate_demo_videos(other, classes=2, videos_per_class=3, seed=1)
    for path in sorted(other.rglob("*.mp4")):
        original = root / path.relative_to(other)
        assert digest(path) != digest(original)
        a, _ = decode(path)
        b, _ = decode(original)
        assert a.shape != b.shape or np.abs(a.astype(int) - b.astype(int)).mean() > 5


@pytest.mark.parametrize("forward, backward", PAIRS)
def test_partner_class_is_the_exact_time_reversal(forward, backward):
    for seed in range(3):
        frames, fps = render_clip(forward, np.random.default_rng(seed))
        reversed_frames, reversed_fps = render_clip(backward, np.random.default_rng(seed))
        assert fps == reversed_fps
        assert np.array_equal(reversed_frames, frames[::-1])
        assert not np.array_equal(frames, frames[::-1])  # the clip really changes over time


def distance_from_background(frames: np.ndarray) -> np.ndarray:
    # Background covers most pixels of a clip; object colours are >= 150 away from it.
    background = np.median(frames.reshape(-1, 3), axis=0)
    return np.linalg.norm(frames.astype(np.float32) - background, axis=-1)


def object_masks(frames: np.ndarray) -> np.ndarray:
    return distance_from_background(frames) > 75


def centroid(frames, axis):
    masks = object_masks(frames)
    coords = np.indices(masks.shape[1:])[axis]
    return np.array([coords[m].mean() for m in masks]) / masks.shape[1 + axis]  # fraction of the frame


def area(frames):
    masks = object_masks(frames)
    return masks.mean(axis=(1, 2))  # fraction of the frame


def bar_angle(frames):
    # Orientation from second moments, with y pointing down: a growing angle turns clockwise on screen.
    angles = []
    for m in object_masks(frames):
        ys, xs = np.nonzero(m)
        xs, ys = xs - xs.mean(), ys - ys.mean()
        angles.append(0.5 * np.arctan2(2 * (xs * ys).mean(), (xs**2).mean() - (ys**2).mean()))
    return np.unwrap(np.array(angles) * 2) / 2  # radians


def dot_spread(frames):
    masks = object_masks(frames)
    xs = np.indices(masks.shape[1:])[1]
    return np.array([xs[m].std() for m in masks]) / masks.shape[2]  # fraction of the width


def contrast(frames):
    return distance_from_background(frames).mean(axis=(1, 2)) / 150


# What each forward class does, measured on decoded pixels, and the least change
# (last third minus first third of the clip) its slowest, smallest draw still shows.
# Its partner class must change the other way.
FORWARD_TREND = {
    "square_moving_right": (lambda f: centroid(f, 1), 0.2),  # x grows
    "circle_growing": (area, 0.05),
    "bar_rotating_clockwise": (bar_angle, 0.6),
    "dot_moving_down": (lambda f: centroid(f, 0), 0.15),  # y grows
    "square_fading_in": (contrast, 0.03),
    "two_dots_approaching": (lambda f: -dot_spread(f), 0.07),
}


def change(values: np.ndarray) -> float:
    third = max(1, len(values) // 3)
    return float(values[-third:].mean() - values[:third].mean())


@pytest.mark.parametrize("forward, backward", PAIRS)
def test_decoded_videos_change_as_named_and_reversal_swaps_the_class(demo_all, forward, backward):
    root, _ = demo_all
    trend, least = FORWARD_TREND[forward]
    for split in ("train", "val", "test"):
        forward_frames, _ = decode(next((root / split / forward).glob("*.mp4")))
        backward_frames, _ = decode(next((root / split / backward).glob("*.mp4")))
        assert change(trend(forward_frames)) > least, f"{forward} ({split}) does not do what its name says"
        assert change(trend(backward_frames)) < -least, f"{backward} ({split}) does not do what its name says"
        # Played backwards, a forward clip shows what its partner class shows.
        assert change(trend(forward_frames[::-1])) < -least


def test_bad_arguments_and_existing_output_are_refused(tmp_path):
    with pytest.raises(UserError, match="even number"):
        generate_demo_videos(tmp_path / "odd", classes=3)
    with pytest.raises(UserError, match="even number"):
        generate_demo_videos(tmp_path / "many", classes=14)
    with pytest.raises(UserError, match="videos_per_class"):
        generate_demo_videos(tmp_path / "few", classes=2, videos_per_class=2)
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    with pytest.raises(UserError, match=f"{taken}.*not empty"):
        generate_demo_videos(taken, classes=2, videos_per_class=3)
    assert (taken / "keep.txt").read_text() == "mine"
    # An existing empty folder is fine.
    empty = tmp_path / "empty"
    empty.mkdir()
    assert generate_demo_videos(empty, classes=2, videos_per_class=3)["videos"] == 6


def test_cli_demo_data_prints_json_summary_last(tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "vidray", "demo-data", "--out", str(out), "--classes", "2", "--videos-per-class", "3"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    assert summary["videos"] == 6 and summary["classes"] == DEMO_CLASSES[:2]
    assert len(list(out.rglob("*.mp4"))) == 6

    again = subprocess.run(
        [sys.executable, "-m", "vidray", "demo-data", "--out", str(out), "--classes", "2"],
        capture_output=True, text=True, cwd=REPO, check=False,
    )
    assert again.returncode == 2 and str(out) in again.stderr and "not empty" in again.stderr
