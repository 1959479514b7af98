"""Generate the benchmark's input videos: H.264 mp4 files shaped like COIN's YouTube downloads.

COIN videos are YouTube downloads: H.264, 640x360 or 1280x720, 30 fps, tens of
seconds to minutes, with a keyframe every ~250 frames (x264's default keyint,
what YouTube-era encoders emit). The GOP length matters more than anything else
here: decoding frame ``i`` means decoding from the keyframe before it, so
sampling 32 frames spread over a video costs about as much as decoding the
whole video whenever the samples are closer together than a GOP.

Content: a textured scene (multi-scale noise) panned by a drifting camera, a
few textured objects moving across it, film grain, and a scene cut every
~8 s. That gives x264 real motion, residuals and scene-cut keyframes to code,
so bitrates and decode cost land near real footage (flat synthetic frames
decode several times faster than camera footage and would flatter every
decoder).

Encoding uses libx264 ``preset=ultrafast`` (2 cores must generate minutes of
720p in reasonable time) but with CABAC and B-frames switched back on, since
YouTube's H.264 has both and they set the decoder's per-frame cost.

Videos are cached under ``benchmarks/.cache`` and re-made only when missing.

    python benchmarks/make_inputs.py --preset full     # 10 videos, 10-60 s, 360p and 720p
    python benchmarks/make_inputs.py --preset mixed    # 12 videos, 6-60 s, 360p-720p, portrait, rotated
    python benchmarks/make_inputs.py --preset quick    # 4 short videos

The ``mixed`` preset is what users' own folders look like: durations from 6 to
60 s (so per-video work differs 40-fold), 360p to 720p, 4:3 and 16:9, portrait
files, and phone-style clips coded landscape with a display matrix saying
"rotate 90/180/270" (``rotation``; players and vidray show them upright).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import asdict, dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np

CACHE = Path(__file__).resolve().parent / ".cache"
FPS = 30
KEYINT = 250
# YouTube-like H.264: CABAC, 3 B-frames, 250-frame GOP; ultrafast for everything else.
X264_PARAMS = f"keyint={KEYINT}:min-keyint=25:cabac=1:bframes=3:b-adapt=0:ref=2:scenecut=40"
CRF = 23
SCENE_SECONDS = 8.0
GRAIN = 6  # film grain amplitude, in 8-bit levels


@dataclass(frozen=True)
class VideoSpec:
    name: str
    label: str
    width: int
    height: int
    seconds: float
    seed: int
    rotation: int = 0  # display-matrix rotation, degrees counter-clockwise (phone footage)

    @property
    def frames(self) -> int:
        return int(round(self.seconds * FPS))


def presets() -> dict[str, list[VideoSpec]]:
    def spec(i: int, width: int, height: int, seconds: float) -> VideoSpec:
        return VideoSpec(f"v{i:02d}_{height}p_{int(seconds)}s", f"class{i % 2}", width, height, seconds, seed=i)

    full = [
        spec(0, 640, 360, 10),
        spec(1, 1280, 720, 15),
        spec(2, 640, 360, 20),
        spec(3, 1280, 720, 30),
        spec(4, 640, 360, 45),
        spec(5, 1280, 720, 60),
        spec(6, 640, 360, 60),
        spec(7, 1280, 720, 10),
        spec(8, 640, 360, 30),
        spec(9, 1280, 720, 20),
    ]
    def phone(i: int, width: int, height: int, seconds: float, rotation: int = 0) -> VideoSpec:
        shape = f"{height}p" if width >= height else f"{width}x{height}"
        name = f"m{i:02d}_{shape}_{int(seconds)}s" + (f"_rot{rotation}" if rotation else "")
        return VideoSpec(name, f"class{i % 2}", width, height, seconds, seed=200 + i, rotation=rotation)

    mixed = [
        phone(0, 640, 360, 6),
        phone(1, 1280, 720, 8),
        phone(2, 360, 640, 12),  # portrait, coded that way
        phone(3, 1280, 720, 20, rotation=90),  # phone held upright: shown 720x1280
        phone(4, 640, 360, 30),
        phone(5, 854, 480, 45),
        phone(6, 720, 1280, 15),
        phone(7, 1280, 720, 60),
        phone(8, 640, 360, 60),
        phone(9, 960, 540, 25, rotation=270),
        phone(10, 640, 480, 10),
        phone(11, 1280, 720, 36, rotation=180),
    ]
    quick = [spec(0, 640, 360, 6), spec(1, 1280, 720, 6), spec(2, 640, 360, 10), spec(3, 1280, 720, 4)]
    # For the test suite: tiny, still H.264 with CABAC and B-frames.
    smoke = [VideoSpec(f"s{i}", f"class{i % 2}", 160, 96, 2.0 + i, seed=100 + i) for i in range(3)]
    return {"full": full, "mixed": mixed, "quick": quick, "smoke": smoke}


def _noise_texture(rng: np.random.Generator, height: int, width: int) -> np.ndarray:
    """Multi-scale value noise, uint8 RGB [H, W, 3]: smooth blobs plus fine detail, like a natural image."""
    import torch
    import torch.nn.functional as F

    image = torch.zeros(1, 3, height, width)
    for cells, weight in ((4, 1.0), (16, 0.5), (64, 0.25), (256, 0.12)):
        coarse = torch.from_numpy(rng.standard_normal((1, 3, max(2, cells * height // width), cells))).float()
        image += weight * F.interpolate(coarse, size=(height, width), mode="bicubic", align_corners=False)
    image = image[0].permute(1, 2, 0).numpy()
    image = (image - image.mean()) / (image.std() + 1e-6)
    # Kept inside [GRAIN, 255 - GRAIN] so adding grain needs no clipping (uint8 adds, no int16 round trip).
    return np.clip(128 + 45 * image, GRAIN, 255 - GRAIN).astype(np.uint8)


def _frames(spec: VideoSpec):
    """Yield the video's frames one at a time (a 60 s 720p video is 5 GB of raw RGB)."""
    rng = np.random.default_rng(spec.seed)
    height, width = spec.height, spec.width
    pad = max(height, width) // 4
    grain = [rng.integers(0, 2 * GRAIN + 1, size=(height, width, 3), dtype=np.uint8) for _ in range(7)]
    scene_frames = int(SCENE_SECONDS * FPS)
    for t in range(spec.frames):
        if t % scene_frames == 0:  # scene cut: new background, new objects, new camera path
            scene = _noise_texture(rng, height + 2 * pad, width + 2 * pad)
            objects = []
            for _ in range(3):
                side = int(rng.integers(height // 8, height // 3))
                objects.append(
                    {
                        "tex": _noise_texture(rng, side, side),
                        "pos": rng.uniform([0, 0], [height - side, width - side]),
                        "vel": rng.uniform(-4, 4, size=2) * height / 360,
                        "side": side,
                    }
                )
            pan_phase = rng.uniform(0, 2 * math.pi, size=2)
        local = t % scene_frames
        dy = int(pad + pad * 0.9 * math.sin(pan_phase[0] + local / 97))
        dx = int(pad + pad * 0.9 * math.sin(pan_phase[1] + local / 131))
        frame = scene[dy : dy + height, dx : dx + width].copy()
        for obj in objects:
            obj["pos"] += obj["vel"]
            for axis, limit in ((0, height), (1, width)):
                if not 0 <= obj["pos"][axis] <= limit - obj["side"]:
                    obj["vel"][axis] *= -1
                    obj["pos"][axis] = np.clip(obj["pos"][axis], 0, limit - obj["side"])
            y, x, s = int(obj["pos"][0]), int(obj["pos"][1]), obj["side"]
            frame[y : y + s, x : x + s] = obj["tex"]
        frame += grain[t % len(grain)]
        frame -= GRAIN
        yield frame


def encode(spec: VideoSpec, path: Path) -> None:
    import av

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    with av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(FPS))
        stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
        stream.options = {"preset": "ultrafast", "crf": str(CRF), "x264-params": X264_PARAMS}
        if spec.rotation:
            stream.set_display_rotation(spec.rotation)
        for frame in _frames(spec):
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    tmp.replace(path)


def video_path(root: Path, spec: VideoSpec) -> Path:
    # ROOT/train/<Class>/<name>.mp4: the layout `vidray index folder` reads.
    return root / "train" / spec.label / f"{spec.name}.mp4"


def make_inputs(preset: str, cache: Path = CACHE) -> tuple[Path, list[dict]]:
    """Encode the preset's videos (cached); returns (videos root, one description per video)."""
    import av

    root = cache / f"videos-{preset}"
    described = []
    for spec in presets()[preset]:
        path = video_path(root, spec)
        if not path.is_file():
            started = time.perf_counter()
            encode(spec, path)
            print(f"encoded {path.name} in {time.perf_counter() - started:.1f} s", flush=True)
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            start, rate = stream.start_time or 0, stream.average_rate * stream.time_base
            keyframes = sorted(
                int(round(float((packet.pts - start) * rate)))
                for packet in container.demux(stream)
                if packet.is_keyframe and packet.pts is not None
            )
        described.append(
            {
                **asdict(spec),
                "path": str(path),
                "frames": stream.frames,
                "keyframes": keyframes,  # display indices
                "bytes": path.stat().st_size,
                "mbit_per_s": round(path.stat().st_size * 8 / spec.seconds / 1e6, 2),
            }
        )
    return root, described


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", choices=sorted(presets()), default="full")
    parser.add_argument("--cache", type=Path, default=CACHE)
    args = parser.parse_args()
    root, described = make_inputs(args.preset, args.cache)
    print(json.dumps({"root": str(root), "videos": described}, indent=1))


if __name__ == "__main__":
    main()
