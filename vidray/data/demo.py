"""A synthetic dataset whose classes can only be told apart through time.

Classes come in pairs that are exact time-reversals of each other
(``square_moving_left`` / ``square_moving_right``, ``circle_growing`` /
``circle_shrinking``, ...): video ``i`` of the second class of a pair is
video ``i`` of the first class played backwards, frame for frame (colours,
size, position, speed, noise, duration, frame rate and frame size are drawn
once for both), and both land in the same split. So within a pair the two
classes hold exactly the same frames, only in opposite orders: a model that
ignores frame order (a single-frame or bag-of-frames classifier) gives a
video and its reversal the same answer and gets exactly one of the two right,
50 % within a pair, and training cannot tell a pair apart by appearance
either. Pairs do differ in appearance (a bar is not a circle), so the chance
level of an order-blind model over all classes is ``1 / pairs``, not
``1 / classes``; only temporal modelling gets to 100 %.

The signal is deliberately strong (large objects, motion over much of the
frame, moderate noise) so a tiny VideoMAE trained from scratch for a few CPU
minutes learns it. Videos vary in duration (1.5-3 s), frame rate (15-30 fps)
and frame size (128x96 or 160x120), so preprocessing sees real variety.

Output: ``ROOT/{train,val,test}/<class>/<class>_<NNN>.mp4``, real H.264 written
through :func:`vidray.data.video.encode_mp4`. Every pair of videos draws from its
own RNG seeded by ``(seed, pair, index)``, the drawing uses only IEEE-exact float
operations, and x264 runs with settings whose output depends on the frames
alone (:data:`vidray.data.video.DETERMINISTIC_X264`), so one seed gives
byte-identical files whatever the thread pool, the load or the x86 machine.

The settings a set was made with are recorded beside its folder (:func:`settings_file`), so that a run asking
for another set (another seed, say) is refused instead of training on this one (vidray/data/prepare.py).
"""

from __future__ import annotations

import json
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from vidray.errors import UserError
from vidray.data.video import encode_mp4, probe

# Pairs are adjacent, so the first ``classes`` names always keep pairs intact.
# Within each pair the first name is the forward rendering of its generator.
DEMO_CLASSES = [
    "square_moving_right",
    "square_moving_left",
    "circle_growing",
    "circle_shrinking",
    "bar_rotating_clockwise",
    "bar_rotating_counterclockwise",
    "dot_moving_down",
    "dot_moving_up",
    "square_fading_in",
    "square_fading_out",
    "two_dots_approaching",
    "two_dots_separating",
]

def reversal_pairs(classes: list[str]) -> list[tuple[int, int]]:
    """Index pairs ``(forward, backward)`` of ``classes`` that are time-reversed demo pairs."""
    index = {name: i for i, name in enumerate(classes)}
    return [
        (index[forward], index[backward])
        for forward, backward in zip(DEMO_CLASSES[0::2], DEMO_CLASSES[1::2])
        if forward in index and backward in index
    ]


FRAME_SIZES = ((128, 96), (160, 120))  # (width, height)
FRAME_RATES = (15, 20, 24, 25, 30)
DURATION_RANGE = (1.5, 3.0)  # seconds: at 15-30 fps, 22-90 frames, plenty for 16 stored ones
SPLIT_FRACTIONS = {"val": 0.2, "test": 0.2}  # the rest is train
# What the name of a demo folder's record of its settings (:func:`settings_file`) ends with.
SETTINGS_SUFFIX = ".vidray-demo.json"
# Bump when what a seed draws changes (the classes' order, the drawing, the frame sizes, rates, durations, splits):
# a folder made before is then another set than the settings now give.
GENERATOR_VERSION = 1


# --- drawing: soft-edged alpha masks on a pixel-centre grid -----------------


def _grid(height: int, width: int) -> tuple[np.ndarray, np.ndarray]:
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    return ys, xs


def _soft(signed_distance: np.ndarray) -> np.ndarray:
    # One pixel of anti-aliasing: H.264 keeps clean edges cheaply.
    return np.clip(0.5 - signed_distance, 0.0, 1.0)


# Distances as sqrt of sums of squares, not np.hypot: sqrt is correctly rounded on every
# platform, libm's hypot need not be, and one ulp can flip a pixel's rounding.
def _disc(ys, xs, cy, cx, radius):
    return _soft(np.sqrt((ys - cy) ** 2 + (xs - cx) ** 2) - radius)


def _square(ys, xs, cy, cx, half):
    return _soft(np.maximum(np.abs(ys - cy), np.abs(xs - cx)) - half)


def _bar(ys, xs, cy, cx, angle, half_length, half_thickness):
    # Distance to a segment through (cy, cx). Angles grow from +x towards +y;
    # image y points down, so growing angles turn clockwise on screen.
    dx, dy = np.cos(angle), np.sin(angle)
    along = np.clip((xs - cx) * dx + (ys - cy) * dy, -half_length, half_length)
    return _soft(np.sqrt((xs - cx - along * dx) ** 2 + (ys - cy - along * dy) ** 2) - half_thickness)


# --- one generator per pair: returns per-frame alpha masks [T, H, W] ----------


def _moving_square(rng, t, ys, xs, height, width):
    half = rng.uniform(0.14, 0.2) * height
    travel = rng.uniform(0.6, 0.9) * (width - 2 * half)
    x0 = rng.uniform(half, width - half - travel)
    cy = rng.uniform(half, height - half)
    return [_square(ys, xs, cy, x0 + travel * ti, half) for ti in t]


def _growing_circle(rng, t, ys, xs, height, width):
    r0 = rng.uniform(0.06, 0.1) * height
    r1 = rng.uniform(0.34, 0.4) * height  # stays inside the frame
    cy = rng.uniform(0.4, 0.6) * height
    cx = rng.uniform(0.35, 0.65) * width
    return [_disc(ys, xs, cy, cx, r0 + (r1 - r0) * ti) for ti in t]


def _rotating_bar(rng, t, ys, xs, height, width):
    half_length = rng.uniform(0.3, 0.4) * height
    half_thickness = rng.uniform(0.05, 0.07) * height
    cy = rng.uniform(0.45, 0.55) * height
    cx = rng.uniform(0.4, 0.6) * width
    start = rng.uniform(0, np.pi)
    # At most half a turn: a bar looks the same after 180 degrees, so more
    # rotation (or big steps between sampled frames) would be ambiguous.
    turn = rng.uniform(0.5, 0.95) * np.pi
    return [_bar(ys, xs, cy, cx, start + turn * ti, half_length, half_thickness) for ti in t]


def _moving_dot(rng, t, ys, xs, height, width):
    radius = rng.uniform(0.1, 0.14) * height
    travel = rng.uniform(0.55, 0.8) * (height - 2 * radius)
    y0 = rng.uniform(radius, height - radius - travel)
    cx = rng.uniform(radius, width - radius)
    return [_disc(ys, xs, y0 + travel * ti, cx, radius) for ti in t]


def _fading_square(rng, t, ys, xs, height, width):
    half = rng.uniform(0.18, 0.26) * height
    cy = rng.uniform(half, height - half)
    cx = rng.uniform(half, width - half)
    shape = _square(ys, xs, cy, cx, half)
    return [shape * ti for ti in t]


def _approaching_dots(rng, t, ys, xs, height, width):
    radius = rng.uniform(0.08, 0.11) * height
    cy = rng.uniform(0.35, 0.65) * height
    cx = rng.uniform(0.45, 0.55) * width
    far = rng.uniform(0.3, 0.36) * width  # centre-to-dot distance at the start; dots stay in frame
    near = rng.uniform(1.3, 1.6) * radius  # dots never merge
    masks = []
    for ti in t:
        offset = far + (near - far) * ti
        masks.append(np.maximum(_disc(ys, xs, cy, cx - offset, radius), _disc(ys, xs, cy, cx + offset, radius)))
    return masks


# (generator, reversed?) per class.
_RENDERERS = {
    "square_moving_right": (_moving_square, False),
    "square_moving_left": (_moving_square, True),
    "circle_growing": (_growing_circle, False),
    "circle_shrinking": (_growing_circle, True),
    "bar_rotating_clockwise": (_rotating_bar, False),
    "bar_rotating_counterclockwise": (_rotating_bar, True),
    "dot_moving_down": (_moving_dot, False),
    "dot_moving_up": (_moving_dot, True),
    "square_fading_in": (_fading_square, False),
    "square_fading_out": (_fading_square, True),
    "two_dots_approaching": (_approaching_dots, False),
    "two_dots_separating": (_approaching_dots, True),
}


def _colours(rng) -> tuple[np.ndarray, np.ndarray]:
    """Background and object colours far apart in RGB, so the object always stands out."""
    while True:
        background, foreground = rng.uniform(0, 255, size=(2, 3))
        if np.linalg.norm(background - foreground) >= 150:
            return background.astype(np.float32), foreground.astype(np.float32)


def _clip_format(rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(width, height, fps, frames) of a clip: the first draws of its RNG."""
    width, height = FRAME_SIZES[rng.integers(len(FRAME_SIZES))]
    fps = int(FRAME_RATES[rng.integers(len(FRAME_RATES))])
    return int(width), int(height), fps, int(round(rng.uniform(*DURATION_RANGE) * fps))


def render_clip(name: str, rng: np.random.Generator) -> tuple[np.ndarray, int]:
    """Frames ``[T, H, W, 3]`` uint8 and the frame rate of one clip of class ``name``.

    The two classes of a pair consume ``rng`` identically, so for equal RNG
    states ``render_clip(partner)`` is exactly ``render_clip(name)[::-1]``.
    """
    generator, reverse = _RENDERERS[name]
    width, height, fps, num_frames = _clip_format(rng)
    background, foreground = _colours(rng)
    noise_sigma = rng.uniform(4.0, 12.0)

    ys, xs = _grid(height, width)
    t = np.linspace(0.0, 1.0, num_frames, dtype=np.float32)
    alpha = np.stack(generator(rng, t, ys, xs, height, width))[..., None]  # [T, H, W, 1]
    frames = background + alpha * (foreground - background)
    # Fresh noise every frame (i.i.d. in time, so reversing it changes nothing).
    frames += rng.standard_normal(frames.shape, dtype=np.float32) * noise_sigma
    frames = np.clip(frames + 0.5, 0, 255).astype(np.uint8)
    if reverse:
        frames = np.ascontiguousarray(frames[::-1])
    return frames, fps


def _split_counts(videos_per_class: int) -> dict[str, int]:
    val = max(1, round(videos_per_class * SPLIT_FRACTIONS["val"]))
    test = max(1, round(videos_per_class * SPLIT_FRACTIONS["test"]))
    return {"train": videos_per_class - val - test, "val": val, "test": test}


class DemoFolderTaken(UserError):
    """``generate_demo_videos``'s output folder was filled by another process while this one wrote its own."""


def generate_demo_videos(out: Path, classes: int = 8, videos_per_class: int = 12, seed: int = 0) -> dict:
    """Write ``classes`` x ``videos_per_class`` clips under ``out`` and return a summary.

    Per class, about 60/20/20 % go to train/val/test (at least one each).
    ``out`` must not exist or be empty; the set is built in a sibling folder
    and renamed into place, so an interrupted run never leaves half a dataset
    that later looks complete; when another process renamed its set into place
    first, :class:`DemoFolderTaken` says so and this one's is deleted.
    """
    out = Path(out)
    if not 2 <= classes <= len(DEMO_CLASSES) or classes % 2:
        raise UserError(
            f"demo classes must be an even number from 2 to {len(DEMO_CLASSES)} "
            f"(classes come in time-reversed pairs), got {classes}"
        )
    if videos_per_class < 3:
        raise UserError(f"demo videos_per_class must be >= 3 (one each for train, val, test), got {videos_per_class}")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"demo output {out} already exists and is not empty: delete it or pass another --out")

    started = time.perf_counter()
    names = DEMO_CLASSES[:classes]
    counts = _split_counts(videos_per_class)
    split_of_index = [split for split, n in counts.items() for _ in range(n)]
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)

    def write_pair(job: tuple[int, int]) -> list[float]:
        pair, index = job
        forward, backward = names[2 * pair], names[2 * pair + 1]
        frames, fps = render_clip(forward, np.random.default_rng([seed, pair, index]))
        split = split_of_index[index]
        for name, clip in ((forward, frames), (backward, frames[::-1])):
            encode_mp4(staging / split / name / f"{name}_{index:03d}.mp4", np.ascontiguousarray(clip), fps=fps)
        return [len(frames) / fps] * 2

    jobs = [(pair, i) for pair in range(classes // 2) for i in range(videos_per_class)]
    try:
        # numpy and x264 release the GIL for the heavy parts; threads keep it simple.
        with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
            durations = [seconds for pair in pool.map(write_pair, jobs) for seconds in pair]
        out.parent.mkdir(parents=True, exist_ok=True)
        try:
            if out.exists():
                out.rmdir()  # empty (checked above); rename needs the name free
            staging.rename(out)
        except OSError:
            if out.is_dir() and any(out.iterdir()):
                # Another process wrote it meanwhile (two sweeps started together on a fresh demo).
                raise DemoFolderTaken(f"demo output {out} was written by another process meanwhile") from None
            raise
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    record_demo_settings(out, demo_settings(classes, videos_per_class, seed))  # this set's, not one written meanwhile

    return {
        "out": str(out),
        "classes": names,
        "num_classes": len(names),
        "videos": len(durations),
        "per_split": {split: n * len(names) for split, n in counts.items()},
        "per_class": {name: videos_per_class for name in names},
        "total_duration_s": round(sum(durations), 2),
        "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
    }


def demo_settings(classes: int, videos_per_class: int, seed: int) -> dict:
    """What decides which videos a demo set holds (:data:`SETTINGS_FILE`): ``data.demo``'s keys and the generator's version."""
    return {"classes": classes, "videos_per_class": videos_per_class, "seed": seed, "generator": GENERATOR_VERSION}


def settings_file(root: Path) -> Path:
    """Where the settings of the demo set in ``root`` are recorded: beside the folder, not in it, where indexing
    would count it among the files that are not videos. Hidden, as the folder's staging copy."""
    return Path(root).parent / f".{Path(root).name}{SETTINGS_SUFFIX}"


def _folder_identity(root: Path) -> list[int]:
    stat = os.stat(root)
    return [stat.st_dev, stat.st_ino]


def recorded_demo_settings(root: Path) -> dict | None:
    """The settings recorded for the demo folder ``root``; None when there are none (made before they were
    recorded), none that read as such, or they were recorded for another folder of that name (one deleted, and
    this one copied in by hand)."""
    try:
        recorded = json.loads(settings_file(root).read_text())
        ours = isinstance(recorded, dict) and recorded.get("folder") == _folder_identity(root)
    except (OSError, ValueError):
        return None
    return recorded if ours else None


def record_demo_settings(root: Path, settings: dict) -> None:
    """Record ``settings`` for the demo folder ``root`` (written whole, with the folder's identity); where this
    user may not write, nothing is recorded (the set is then checked as an unrecorded one on every run)."""
    record, tmp = settings_file(root), settings_file(root).with_name(f"{settings_file(root).name}.{os.getpid()}.tmp")
    try:
        tmp.write_text(json.dumps({**settings, "folder": _folder_identity(root)}))
        os.replace(tmp, record)
    except OSError:
        tmp.unlink(missing_ok=True)


def drawn_with_seed(root: Path, classes: int, videos_per_class: int, seed: int) -> bool:
    """Whether the demo set in ``root`` (of ``classes`` x ``videos_per_class`` videos, made before sets recorded their
    settings) was drawn with ``seed``: each video of the first class has the frame size, rate and length that the
    seed's first draws give it (:func:`_clip_format`). Another seed matches one video's three with a chance of about
    1 in 300, all of a class's (at least 3) with a negligible one. Read from the files' headers: no x264 version
    or machine can change them, as it may change the bytes."""
    name, splits = DEMO_CLASSES[0], _split_counts(videos_per_class)
    split_of_index = [split for split, n in splits.items() for _ in range(n)]
    for index in range(videos_per_class):
        width, height, fps, num_frames = _clip_format(np.random.default_rng([seed, 0, index]))
        try:
            info = probe(Path(root) / split_of_index[index] / name / f"{name}_{index:03d}.mp4")
        except (UserError, OSError):  # not there, or not a video: not the set the seed draws
            return False
        if (info.coded.coded_width, info.coded.coded_height, info.fps, info.num_frames) != (width, height, fps, num_frames):
            return False
    return True
