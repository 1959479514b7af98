"""Decode + resize throughput: vidray's Ray Data preprocessing against the loops users would write.

Every method produces the same thing from the same videos: ``stored_frames``
frames per video at the starts of equal segments of the whole video, short
side resized to ``stored_size``, centre-cropped square (vidray's sampling; see
docs/design.md). Methods, each in a fresh Python process:

``decord_1thread``      sequential loop, decord ``VideoReader(num_threads=1)`` resizing
                        inside the decoder, ``get_batch`` of the sampled indices
                        (seeks to the keyframe before a sample, decodes forward).
                        One core doing only the decode work: the decoder's own rate,
                        the per-CPU ceiling for any pipeline built on it.
``decord_threads``      the same with decord's default threading (``num_threads=0``),
                        what a user who does not tune it gets.
``torchcodec_1thread``  the usual torchcodec loop (Hugging Face's video loader):
                        ``VideoDecoder(path, num_ffmpeg_threads=1, transforms=[Resize])``,
                        ``get_frames_at`` the sampled indices, crop.
``pyav_seek``           PyAV, the usual snippet: for each sampled frame ``container.seek``
                        to its timestamp, decode forward to it, ``to_ndarray`` resized.
``pyav_sequential``     PyAV decoding the whole video in order, keeping the sampled frames.
``pyav_lean``           PyAV doing the least decode work this sampling allows: seek
                        only across keyframes, and skip decoding non-reference frames
                        that are not samples (``skip_frame=NONREF``). One thread. Not
                        what users write: the floor under every method here.
``pyav_lean_x2``        two ``pyav_lean`` processes side by side, each decoding every
                        video: what this machine's CPUs give two independent decoders
                        (shared caches, memory bandwidth, clock), the ceiling for any
                        parallel pipeline's speed-up over one CPU.
``read_clip``           vidray's own decode in a plain process, no Ray: per video
                        ``decode_or_reject`` (``read_clip``, one decoder thread) and the
                        raw store's ``encode_clip``, what a decode task does minus Ray and
                        the Parquet write; ``read_clip_jpeg`` with the jpeg store's encode;
                        ``read_clip_x2`` two such processes side by side (issue 18's ceiling);
                        ``read_clip_x2_ray`` the same two loops as two Ray tasks side by side on
                        a fresh 2-CPU cluster (after one untimed call that starts the workers):
                        what running inside a Ray worker costs the decoder, with no shards,
                        Parquet or dispatcher.
``vidray_<k>cpu[_vps<n>]`` ``vidray.data.preprocess.preprocess`` into a fresh directory on a
                        fresh local Ray cluster of ``k`` CPUs (``ray.init(num_cpus=k)``),
                        writing the Parquet shards. Timed twice in the same cluster:
                        ``cold`` (first call: includes starting Ray workers) and ``warm``
                        (second call into another fresh directory: workers already up).
                        ``ray.init`` itself is timed separately and excluded.
                        ``_vps<n>``: ``videos_per_shard=n`` (a shard is one Ray task,
                        so shards bound the parallelism), else vidray's default.
                        ``_decord`` / ``_torchcodec``: ``data.decoder`` (default pyav);
                        ``_torchcodec_cuda``: torchcodec on the GPU (a GPU machine only).
                        ``_jpeg``: ``data.store=jpeg``. Each call's task timeline (before
                        the first task, decode and Parquet-write task-seconds, how busy
                        the CPUs were) comes from the shard records. ``_tasks``:
                        ``data.dispatch=ray_tasks``, the same tasks handed out by plain Ray
                        instead of Ray Data: what Ray Data itself costs.

Measured per run: wall seconds of the decode work, CPU seconds (user + system,
all threads): for the loops ``time.process_time()`` of the process; for vidray
the whole process tree from /proc (the driver, Ray's GCS/raylet, every Ray
worker), also split into workers and the rest. Output frames/s counts the frames
written (videos x stored_frames); decode frames/s the fewest frames any decoder
must decode to produce them (from the keyframe before each sample forward;
nearly the whole video when samples are closer together than a GOP).

The machine may be shared: every run records the 1-minute load average before
and after, methods run interleaved (order rotated per repeat), and the summary
takes medians over repeats; ratios are computed within a repeat, then medianed.

    python benchmarks/preprocess.py --preset full --repeats 3
    python benchmarks/preprocess.py --preset mixed --copies 6 --repeats 2 --methods read_clip read_clip_x2 \
        read_clip_jpeg vidray_1cpu vidray_2cpu vidray_2cpu_jpeg     # issue 18: vidray vs its own decode
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    ProcessTreeCPU,
    command_line,
    cpu_delta,
    input_totals,
    loadavg,
    machine_info,
    median,
    now,
    per_repeat_ratio,
    run_json_subprocess,
    write_result,
)
from make_inputs import CACHE, make_inputs  # noqa: E402

BASELINES = (
    "decord_1thread", "decord_threads", "torchcodec_1thread", "pyav_seek", "pyav_sequential", "pyav_lean",
    "read_clip", "read_clip_jpeg",
)  # fmt: skip
# Methods that run a baseline in several processes at once: {method: (baseline, processes)}.
SIDE_BY_SIDE = {"pyav_lean_x2": ("pyav_lean", 2), "read_clip_x2": ("read_clip", 2)}
# read_clip_x2's loops as as many Ray tasks, in one process's cluster (run_loop_in_ray_tasks).
READ_CLIP_IN_RAY_TASKS, RAY_TASKS = "read_clip_x2_ray", 2


# --------------------------------------------------------------------------- the loops users write


def _videos(manifest: str) -> list[dict[str, Any]]:
    from vidray.data.index import read_manifest

    frame, _ = read_manifest(manifest)
    return frame.sort_values("path").to_dict("records")


def decord_clip(path: str, width: int, height: int, stored_frames: int, stored_size: int, threads: int) -> np.ndarray:
    import decord

    from vidray.data.clip import centre_crop, resized_size, segment_indices

    out_w, out_h = resized_size(width, height, stored_size)
    reader = decord.VideoReader(path, width=out_w, height=out_h, num_threads=threads)
    indices = segment_indices(len(reader), stored_frames)
    return centre_crop(reader.get_batch(indices.tolist()).asnumpy(), stored_size)


def torchcodec_clip(path: str, width: int, height: int, stored_frames: int, stored_size: int) -> np.ndarray:
    from torchcodec.decoders import VideoDecoder
    from torchcodec.transforms import Resize

    from vidray.data.clip import centre_crop, resized_size, segment_indices

    out_w, out_h = resized_size(width, height, stored_size)
    decoder = VideoDecoder(path, num_ffmpeg_threads=1, dimension_order="NHWC", transforms=[Resize((out_h, out_w))])
    indices = segment_indices(len(decoder), stored_frames)
    return centre_crop(decoder.get_frames_at(indices.tolist()).data.numpy(), stored_size)


def _frame_index(frame, stream) -> int:
    # Display index from the timestamp; robust to B-frame reordering.
    start = stream.start_time or 0
    return int(round(float((frame.pts - start) * stream.time_base * stream.average_rate)))


def pyav_seek_clip(path: str, width: int, height: int, stored_frames: int, stored_size: int) -> tuple[np.ndarray, int]:
    """(clip, frames decoded). Seeks to every sampled frame, as most PyAV snippets do."""
    import av

    from vidray.data.clip import centre_crop, resized_size, segment_indices
    from vidray.data.decode.pyav import to_rgb

    out_w, out_h = resized_size(width, height, stored_size)
    with av.open(path) as container:
        stream = container.streams.video[0]
        indices = segment_indices(stream.frames, stored_frames)
        start = stream.start_time or 0
        decoded, cache, clip = 0, {}, []
        for index in indices.tolist():
            if index not in cache:
                target_pts = start + int(round(index / (stream.average_rate * stream.time_base)))
                container.seek(target_pts, stream=stream, backward=True)
                for frame in container.decode(stream):
                    decoded += 1
                    if _frame_index(frame, stream) >= index:
                        cache[index] = to_rgb(frame, out_w, out_h)
                        break
            clip.append(cache[index])
    return centre_crop(np.stack(clip), stored_size), decoded


def pyav_sequential_clip(
    path: str, width: int, height: int, stored_frames: int, stored_size: int
) -> tuple[np.ndarray, int]:
    """(clip, frames decoded). Decodes every frame in order up to the last sample, keeps the sampled ones."""
    import av

    from vidray.data.clip import centre_crop, resized_size, segment_indices
    from vidray.data.decode.pyav import to_rgb

    out_w, out_h = resized_size(width, height, stored_size)
    with av.open(path) as container:
        stream = container.streams.video[0]
        indices = segment_indices(stream.frames, stored_frames)
        wanted, kept, decoded = set(indices.tolist()), {}, 0
        for frame in container.decode(stream):
            decoded += 1
            index = _frame_index(frame, stream)
            if index in wanted:
                kept[index] = to_rgb(frame, out_w, out_h)
            if index >= indices[-1]:
                break
    return centre_crop(np.stack([kept[i] for i in indices.tolist()]), stored_size), decoded


def pyav_lean_clip(path: str, width: int, height: int, stored_frames: int, stored_size: int) -> tuple[np.ndarray, int]:
    """(clip, frames decoded). The least decode work this sampling allows with FFmpeg, one thread:

    * index the packets once (demux only, as decord does on open) to know every
      frame's display index and where the keyframes are;
    * seek only when a keyframe lies between the decoder's position and the next
      sample, otherwise keep decoding forward;
    * have the decoder skip non-reference frames that are not samples
      (``skip_frame=NONREF``, set per packet): nothing depends on them, so they
      need not be decoded at all. With B-frames that is a large share of a GOP.
    """
    import av

    from vidray.data.clip import centre_crop, resized_size, segment_indices
    from vidray.data.decode.pyav import to_rgb

    out_w, out_h = resized_size(width, height, stored_size)
    with av.open(path) as container:
        stream = container.streams.video[0]
        codec = stream.codec_context
        codec.thread_count = 1
        index = [(p.pts, p.is_keyframe) for p in container.demux(stream) if p.pts is not None]
        display = {pts: i for i, pts in enumerate(sorted(pts for pts, _ in index))}
        keyframes = sorted(display[pts] for pts, key in index if key)
        samples = segment_indices(len(display), stored_frames).tolist()
        wanted, kept, decoded, position = set(samples), {}, 0, -1
        pts_of = {i: pts for pts, i in display.items()}
        packets = None
        for target in sorted(wanted):
            if target in kept:
                continue
            keyframe = max([k for k in keyframes if k <= target], default=0)
            if packets is None or keyframe > position:
                container.seek(pts_of[keyframe], stream=stream, backward=True)
                packets, position = container.demux(stream), keyframe - 1
            for packet in packets:
                if packet.pts is not None:
                    codec.skip_frame = "DEFAULT" if display.get(packet.pts) in wanted else "NONREF"
                for frame in codec.decode(packet if packet.size else None):
                    decoded += 1
                    frame_index = display[frame.pts]
                    position = max(position, frame_index)
                    if frame_index in wanted and frame_index not in kept:
                        kept[frame_index] = to_rgb(frame, out_w, out_h)
                if target in kept:
                    break
    return centre_crop(np.stack([kept[i] for i in samples]), stored_size), decoded


def frames_to_decode(num_frames: int, keyframes: list[int], stored_frames: int) -> int:
    """Fewest frames a decoder must decode to produce the samples: from the keyframe
    before each sample up to it, each frame once (B-frame reordering ignored)."""
    from vidray.data.clip import segment_indices

    needed, decoded_up_to = 0, -1
    keyframes = sorted(set(keyframes) | {0})
    for index in segment_indices(num_frames, stored_frames).tolist():
        if index <= decoded_up_to:
            continue
        keyframe = max(k for k in keyframes if k <= index)
        needed += index - max(keyframe, decoded_up_to + 1) + 1
        decoded_up_to = index
    return needed


def vidray_clip(path: str, stored_frames: int, stored_size: int, store: str) -> tuple[np.ndarray, int]:
    """(clip, stored bytes): what one video costs a vidray decode task, without Ray or Parquet:
    ``decode_or_reject`` (read_clip, one decoder thread) and the store's encode."""
    from vidray.config import DEFAULT_JPEG_QUALITY
    from vidray.data.decode_shard import decode_or_reject
    from vidray.data.shards import DecodeSettings
    from vidray.data.store import encode_clip

    clip, _, reason = decode_or_reject(path, DecodeSettings(stored_frames, stored_size))
    if clip is None:
        raise RuntimeError(f"{path}: {reason}")
    return clip.frames, len(encode_clip(clip.frames, store, DEFAULT_JPEG_QUALITY))


def run_loop(method: str, manifest: str, stored_frames: int, stored_size: int) -> dict[str, Any]:
    videos = _videos(manifest)
    digest = hashlib.sha256()
    clips, decoded, stored_bytes = 0, 0, 0
    started_at = time.time()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    for video in videos:
        args = (video["path"], int(video["width"]), int(video["height"]), stored_frames, stored_size)
        if method == "decord_1thread":
            clip = decord_clip(*args, threads=1)
        elif method == "decord_threads":
            clip = decord_clip(*args, threads=0)
        elif method == "torchcodec_1thread":
            clip = torchcodec_clip(*args)
        elif method == "pyav_seek":
            clip, count = pyav_seek_clip(*args)
            decoded += count
        elif method == "pyav_sequential":
            clip, count = pyav_sequential_clip(*args)
            decoded += count
        elif method == "pyav_lean":
            clip, count = pyav_lean_clip(*args)
            decoded += count
        elif method in ("read_clip", "read_clip_jpeg"):
            clip, size = vidray_clip(video["path"], stored_frames, stored_size, "jpeg" if method.endswith("_jpeg") else "raw")
            stored_bytes += size
        else:
            raise ValueError(method)
        assert clip.shape == (stored_frames, stored_size, stored_size, 3), clip.shape
        digest.update(clip.tobytes())
        clips += 1
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return {
        "videos": len(videos),
        "clips": clips,
        "wall_s": round(wall, 3),
        "cpu_s": {"total": round(cpu, 3)},
        "frames_decoded": decoded or None,
        "stored_bytes": stored_bytes or None,
        "frames_sha256": digest.hexdigest(),
        # Wall-clock span, to combine processes that ran side by side (SIDE_BY_SIDE).
        "started_at": started_at,
        "ended_at": started_at + wall,
    }


def side_by_side(results: list[dict[str, Any]]) -> dict[str, Any]:
    """Loops that ran at once (:func:`run_loop` results) as one run: their clips over the span from
    the first start to the last end."""
    span = max(r["ended_at"] for r in results) - min(r["started_at"] for r in results)
    return {
        "videos": results[0]["videos"],
        "clips": sum(r["clips"] for r in results),
        "processes": len(results),
        "wall_s": round(span, 3),
        "cpu_s": {"total": round(sum(r["cpu_s"]["total"] for r in results), 3)},
        "frames_decoded": sum(r["frames_decoded"] or 0 for r in results) or None,
        "frames_sha256": results[0]["frames_sha256"],
        "per_process_wall_s": [r["wall_s"] for r in results],
    }


def run_side_by_side(worker_args: list[str], processes: int, timeout: float, cores: int | None) -> dict[str, Any]:
    """Run the same baseline worker in ``processes`` processes at once."""
    from concurrent.futures import ThreadPoolExecutor

    def one(_) -> dict[str, Any]:
        return run_json_subprocess(worker_args, timeout=timeout, cores=cores)

    with ThreadPoolExecutor(processes) as pool:
        return side_by_side(list(pool.map(one, range(processes))))


def run_loop_in_ray_tasks(tasks: int, manifest: str, stored_frames: int, stored_size: int) -> dict[str, Any]:
    """``read_clip``'s loop as ``tasks`` Ray tasks at once (``num_cpus=1`` each) on a fresh
    ``tasks``-CPU cluster. One untimed call first starts the workers and warms their imports."""
    import ray

    ray.init(
        _node_ip_address="127.0.0.2", num_cpus=tasks, include_dashboard=False, object_store_memory=500 * 2**20,
        log_to_driver=False, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )  # fmt: skip
    try:
        loop = ray.remote(num_cpus=1)(run_loop)
        ray.get([loop.remote("read_clip", manifest, stored_frames, stored_size) for _ in range(tasks)])
        return side_by_side(ray.get([loop.remote("read_clip", manifest, stored_frames, stored_size) for _ in range(tasks)]))
    finally:
        ray.shutdown()


# --------------------------------------------------------------------------- vidray on Ray Data


def _dataset_digest(dataset_dir: str) -> tuple[int, str]:
    """(rows, sha256 of the frames in path order) of the train split written by preprocess."""
    import pyarrow.parquet as pq

    table = pq.read_table(os.path.join(dataset_dir, "train"), columns=["path", "video"]).sort_by("path")
    digest = hashlib.sha256()
    for blob in table.column("video").to_pylist():
        digest.update(blob)
    return table.num_rows, digest.hexdigest()


def task_timeline(dataset_dir: str, called_at: float, returned_at: float, cpus: int) -> dict[str, Any] | None:
    """Where a preprocess call's wall time went, from its shard records (vidray/data/shard_files.py):
    before the first task started, inside tasks (decode, Parquet write), after the last one ended,
    and how busy the ``cpus`` CPUs were with tasks in between."""
    records = [json.loads(p.read_text()) for p in Path(dataset_dir, "_shards").glob("shard-*.json")]
    if not all("started_at" in r for r in records):
        return None  # a vidray from before the records had timestamps (--before)
    starts, ends = [r["started_at"] for r in records], [r["finished_at"] for r in records]
    busy = sum(end - start for start, end in zip(starts, ends))
    decode = sum(r["decode_seconds"] for r in records)
    write = sum(r["write_seconds"] for r in records)
    span = max(ends) - min(starts)
    return {
        "tasks": len(records),
        "before_first_task_s": round(min(starts) - called_at, 3),
        "tasks_span_s": round(span, 3),
        "after_last_task_s": round(returned_at - max(ends), 3),
        "task_s": round(busy, 3),
        "decode_s": round(decode, 3),
        "parquet_write_s": round(write, 3),
        # Inside a task, neither decoding nor writing: the record, the outcome rows.
        "task_other_s": round(busy - decode - write, 3),
        # Share of cpus x span that tasks ran: the rest is Ray Data handing out tasks, and the tail.
        "cpu_busy_share": round(busy / (cpus * span), 3) if span > 0 else None,
    }


def run_vidray(
    cpus: int,
    manifest: str,
    frames: int,
    size: int,
    stored_frames: int,
    stored_size: int,
    videos_per_shard: int | None,
    decoder: str = "pyav",
    store: str = "raw",
    dispatch: str = "ray_data",
) -> dict[str, Any]:
    import ray

    from vidray.data.preprocess import preprocess


    tracker = ProcessTreeCPU().start()
    started = time.perf_counter()
    ray.init(
        # Loopback only, as vidray.cluster.LOOPBACK_IP (a literal: --before runs a vidray that predates it).
        _node_ip_address="127.0.0.2",
        num_cpus=cpus,
        include_dashboard=False,
        object_store_memory=500 * 2**20,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    ray_init_s = time.perf_counter() - started
    kwargs = dict(frames=frames, size=size, stored_frames=stored_frames, stored_size=stored_size)
    if decoder != "pyav":  # (a vidray from before data.decoder, run with --before, takes no such argument)
        name, _, device = decoder.partition("_")
        kwargs.update(decoder=name, decoder_device=device or "cpu")
    if videos_per_shard:  # else preprocess's own default (vidray.data.shards.VIDEOS_PER_SHARD)
        kwargs["videos_per_shard"] = videos_per_shard
    if store != "raw":
        kwargs["store"] = store
    if dispatch != "ray_data":  # (a vidray from before data.dispatch takes no such argument)
        kwargs["dispatch"] = dispatch
    phases = {}
    with tempfile.TemporaryDirectory(prefix="vidray-bench-") as tmp:
        for phase in ("cold", "warm"):
            out = os.path.join(tmp, phase)
            tracker.poll()
            cpu_before, wall0, called_at = tracker.totals(), time.perf_counter(), time.time()
            summary = preprocess(Path(manifest), out, **kwargs)
            wall = time.perf_counter() - wall0
            tracker.poll()
            rows, sha = _dataset_digest(out)
            phases[phase] = {
                "wall_s": round(wall, 3),
                "timeline": task_timeline(out, called_at, called_at + wall, cpus),
                "cpu_s": cpu_delta(tracker.totals(), cpu_before),
                "videos": summary["discovered"],
                "clips": rows,
                "processed": summary["processed"],
                "rejected": summary["rejected"],
                "shards": len(summary["shards"]),
                "frames_sha256": sha,
            }
    tracker.stop()
    ray.shutdown()
    import vidray

    return {
        "vidray_source": os.path.dirname(vidray.__file__),
        "ray_init_s": round(ray_init_s, 3),
        "videos_per_shard": kwargs.get("videos_per_shard"),  # None: preprocess's own default
        **phases["warm"],
        "phases": phases,
    }


# --------------------------------------------------------------------------- orchestration


class VidrayMethod(NamedTuple):
    cpus: int
    videos_per_shard: int | None  # None: preprocess's own default
    decoder: str  # pyav, decord, torchcodec; torchcodec_cuda: torchcodec on the GPU
    store: str  # data.store
    dispatch: str = "ray_data"  # data.dispatch; the method's suffix ``_tasks`` is ray_tasks


def parse_vidray_method(method: str) -> VidrayMethod:
    """``vidray_2cpu`` -> (2, None, "pyav", "raw", "ray_data");
    ``vidray_2cpu_vps4_decord_jpeg_tasks`` -> (2, 4, "decord", "jpeg", "ray_tasks")."""
    parts = method.removeprefix("vidray_").split("_")
    cpus, shard, decoder, store, dispatch = int(parts[0].removesuffix("cpu")), None, "pyav", "raw", "ray_data"
    for part in parts[1:]:
        if part.startswith("vps"):
            shard = int(part.removeprefix("vps"))
        elif part == "cuda":
            decoder += "_cuda"
        elif part == "jpeg":
            store = part
        elif part == "tasks":
            dispatch = "ray_tasks"
        else:
            decoder = part
    return VidrayMethod(cpus, shard, decoder, store, dispatch)


def parse_method_suffix(method: str) -> str:
    """The single-CPU counterpart of a vidray method: ``vidray_2cpu_vps4_decord`` -> ``vidray_1cpu_vps4_decord``."""
    _, shard, decoder, store, dispatch = parse_vidray_method(method)
    return (
        "vidray_1cpu" + (f"_vps{shard}" if shard else "") + (f"_{decoder}" if decoder != "pyav" else "")
        + (f"_{store}" if store != "raw" else "") + ("_tasks" if dispatch == "ray_tasks" else "")
    )  # fmt: skip


def _worker_main(args: argparse.Namespace) -> None:
    if args.worker in BASELINES:
        result = run_loop(args.worker, args.manifest, args.stored_frames, args.stored_size)
    elif args.worker == READ_CLIP_IN_RAY_TASKS:
        result = run_loop_in_ray_tasks(RAY_TASKS, args.manifest, args.stored_frames, args.stored_size)
    else:
        method = parse_vidray_method(args.worker)
        result = run_vidray(
            method.cpus,
            args.manifest,
            args.frames,
            args.size,
            args.stored_frames,
            args.stored_size,
            method.videos_per_shard or args.videos_per_shard,
            method.decoder,
            method.store,
            method.dispatch,
        )
    print(json.dumps(result))


def link_copies(root: Path, out: Path, copies: int) -> Path:
    """``out`` holding every video under ``root`` ``copies`` times (symbolic links ``<name>_c<k>``)."""
    for video in sorted(root.rglob("*.mp4")):
        target = out / video.parent.relative_to(root)
        target.mkdir(parents=True, exist_ok=True)
        for copy in range(copies):
            (target / f"{video.stem}_c{copy}{video.suffix}").symlink_to(video.resolve())
    return out


def _rates(run: dict[str, Any], stored_frames: int, must_decode: int) -> dict[str, Any]:
    wall = run["wall_s"]
    return {
        "videos_per_s": round(run["clips"] / wall, 4),
        "output_frames_per_s": round(run["clips"] * stored_frames / wall, 2),
        # Decode work done per second, counting only the frames any decoder must decode.
        "decode_frames_per_s": round(must_decode * run["clips"] / run["videos"] / wall, 1),
        "cpu_s_per_video": round(run["cpu_s"]["total"] / run["clips"], 4),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", help="input set of make_inputs.py: full, quick or smoke")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the parallel vidray run")
    parser.add_argument("--methods", nargs="+", default=None, help="default: all baselines and vidray_1cpu, vidray_<cpus>cpu")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    parser.add_argument("--videos-per-shard", type=int, default=None, help="vidray's default when unset")
    parser.add_argument(
        "--copies", type=int, default=1,
        help="index every input video this many times (symbolic links), for a run long enough to weigh fixed costs",
    )  # fmt: skip
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/preprocess.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per method run")
    parser.add_argument(
        "--before",
        default=None,
        help="a directory holding another vidray package (e.g. `git archive <commit> vidray`): "
        "every vidray method also runs against it, as <method>@before, interleaved with the current one",
    )
    parser.add_argument(
        "--pin",
        action="store_true",
        help="run each method on as many cores as it has CPUs (taskset): 1 for the loops and vidray_1cpu, "
        "2 for pyav_lean_x2 and vidray_2cpu; without it a 1-CPU Ray run borrows the other cores for Ray's own processes",
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stored-frames", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--stored-size", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    from vidray.data.shards import VIDEOS_PER_SHARD, default_stored

    stored_frames, stored_size = default_stored(args.frames, args.size, args.stored_frames, args.stored_size)
    args.stored_frames, args.stored_size = stored_frames, stored_size
    if args.worker:
        _worker_main(args)
        return {}

    from vidray.data.index import index_folder

    machine = machine_info()
    root, inputs = make_inputs(args.preset, args.cache)
    inputs = inputs * args.copies
    source_frames = sum(v["frames"] for v in inputs)
    must_decode = sum(frames_to_decode(v["frames"], v["keyframes"], stored_frames) for v in inputs)
    methods = args.methods or [*BASELINES, "vidray_1cpu", f"vidray_{args.cpus}cpu"]
    if args.before:
        methods += [f"{m}@before" for m in methods if m.startswith("vidray_")]
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vidray-bench-manifest-") as tmp:
        manifest = os.path.join(tmp, "manifest.parquet")
        if args.copies > 1:
            root = link_copies(root, Path(tmp, "videos"), args.copies)
        index_folder(root, Path(manifest))
        for repeat in range(args.repeats):
            shift = repeat % len(methods)
            for method in methods[shift:] + methods[:shift]:
                load_before = loadavg()
                baseline, processes = SIDE_BY_SIDE.get(method, (method.removesuffix("@before"), 1))
                worker_args = [
                    os.path.abspath(__file__), "--worker", baseline, "--manifest", manifest,
                    "--frames", str(args.frames), "--size", str(args.size),
                    "--stored-frames", str(stored_frames), "--stored-size", str(stored_size),
                ]  # fmt: skip
                if args.videos_per_shard:
                    worker_args += ["--videos-per-shard", str(args.videos_per_shard)]
                before = args.before if method.endswith("@before") else None
                cores = None
                if args.pin and baseline.startswith("vidray_"):
                    cores = parse_vidray_method(baseline)[0]
                elif args.pin:
                    cores = RAY_TASKS if baseline == READ_CLIP_IN_RAY_TASKS else processes
                if processes > 1:
                    result = run_side_by_side(worker_args, processes, args.timeout, cores)
                else:
                    result = run_json_subprocess(worker_args, timeout=args.timeout, pythonpath=before, cores=cores)
                run = {"method": method, "repeat": repeat, "load_before": load_before, "load_after": loadavg(), **result}
                run.update(_rates(run, stored_frames, must_decode))
                if "phases" in run:
                    cold = run["phases"]["cold"]
                    run["cold_videos_per_s"] = round(cold["clips"] / cold["wall_s"], 4)
                runs.append(run)
                print(
                    f"[preprocess] repeat {repeat} {method:16s} {run['videos_per_s']:8.3f} videos/s "
                    f"{run['cpu_s_per_video']:7.3f} CPU-s/video  load {load_before}",
                    file=sys.stderr,
                    flush=True,
                )

    summary = {}
    for method in methods:
        mine = [r for r in runs if r["method"] == method]
        summary[method] = {
            key: median([r[key] for r in mine])
            for key in ("videos_per_s", "output_frames_per_s", "decode_frames_per_s", "cpu_s_per_video", "wall_s")
        }
        if mine and "phases" in mine[0]:
            summary[method]["cold_videos_per_s"] = median([r["cold_videos_per_s"] for r in mine])
            summary[method]["ray_init_s"] = median([r["ray_init_s"] for r in mine])
            summary[method]["worker_cpu_s_per_video"] = median(
                [r["cpu_s"]["ray_workers"] / r["clips"] for r in mine]
            )
            for phase in ("cold", "warm"):
                timelines = [r["phases"][phase]["timeline"] for r in mine if r["phases"][phase]["timeline"]]
                if timelines:
                    summary[method][f"{phase}_timeline"] = {k: median([t[k] for t in timelines]) for k in timelines[0]}

    def ratio(numerator: str, denominator: str, key: str = "videos_per_s", scale: float = 1.0):
        return per_repeat_ratio(runs, "method", numerator, denominator, key, scale)

    # Ratios are taken within a repeat (runs side by side under the same load), then medianed.
    ratios = {}
    for reference in ("decord_1thread", "pyav_lean"):
        if reference not in methods:
            continue
        for method in methods:
            if method == reference:
                continue
            ratios[f"{method}_over_{reference}"] = ratio(method, reference)
            if method.startswith("vidray_"):
                cpus = parse_vidray_method(method.removesuffix("@before"))[0]
                # Share of the one-process decoder's rate that each CPU of the pipeline delivers.
                ratios[f"{method}_per_cpu_over_{reference}"] = ratio(method, reference, scale=1 / cpus)
                # CPU-seconds per video the reference spends for each one the pipeline spends.
                ratios[f"{reference}_cpu_over_{method}_cpu"] = ratio(reference, method, key="cpu_s_per_video")
    for method in methods:
        if method.startswith("vidray_1cpu") or not method.startswith("vidray_"):
            continue
        single = parse_method_suffix(method.removesuffix("@before")) + ("@before" if method.endswith("@before") else "")
        if single in methods:
            ratios[f"{method}_over_{single}"] = ratio(method, single)
        # Against the machine's own ceiling: as many plain decoder processes side by side as CPUs.
        cpus = parse_vidray_method(method.removesuffix("@before"))[0]
        for side_by_side, (_, processes) in SIDE_BY_SIDE.items():
            if processes == cpus and side_by_side in methods:
                ratios[f"{method}_over_{side_by_side}"] = ratio(method, side_by_side)
    # Issue 18's targets: vidray on k CPUs against k plain read_clip processes side by side (the
    # same decode work, no Ray, no Parquet), and its 1 -> k CPU speed-up against theirs (the
    # machine's ceiling). Both for the first call in a fresh cluster (cold) and the second (warm).
    for method in methods:
        cpus = parse_vidray_method(method)[0] if method.startswith("vidray_") and "@" not in method else 0
        plain = {2: "read_clip_x2"}.get(cpus)
        if plain not in methods or "read_clip" not in methods:
            continue
        single = parse_method_suffix(method)
        for phase, key in (("warm", "videos_per_s"), ("cold", "cold_videos_per_s")):
            over_plain, speedup_over_ceiling = [], []
            for repeat in range(max(r["repeat"] for r in runs) + 1):
                rate = {r["method"]: r.get(key, r["videos_per_s"]) for r in runs if r["repeat"] == repeat}
                if {method, plain, "read_clip"} <= set(rate):
                    over_plain.append(rate[method] / rate[plain])
                    if single in rate:
                        speedup_over_ceiling.append(rate[method] / rate[single] / (rate[plain] / rate["read_clip"]))
            ratios[f"{method}_{phase}_over_{plain}"] = median(over_plain)
            ratios[f"{method}_{phase}_speedup_over_ceiling"] = median(speedup_over_ceiling)
    if {"read_clip", "read_clip_x2"} <= set(methods):
        ratios["ceiling_read_clip_x2_over_read_clip"] = ratio("read_clip_x2", "read_clip")
    if {READ_CLIP_IN_RAY_TASKS, "read_clip_x2"} <= set(methods):  # a Ray worker against a plain process
        ratios[f"{READ_CLIP_IN_RAY_TASKS}_over_read_clip_x2"] = ratio(READ_CLIP_IN_RAY_TASKS, "read_clip_x2")
        ratios[f"{READ_CLIP_IN_RAY_TASKS}_cpu_over_read_clip_x2_cpu"] = ratio(
            READ_CLIP_IN_RAY_TASKS, "read_clip_x2", key="cpu_s_per_video"
        )
    # What the jpeg store's encode costs against raw, in the same run.
    for method in methods:
        raw = method.replace("_jpeg", "")
        if method.endswith("_jpeg") and raw in methods:
            ratios[f"{method}_over_{raw}"] = ratio(method, raw)
            ratios[f"{method}_cpu_over_{raw}_cpu"] = ratio(method, raw, key="cpu_s_per_video")
    for method in methods:
        if f"{method}@before" in methods:
            ratios[f"{method}_over_before"] = ratio(method, f"{method}@before")
            ratios[f"{method}_before_cpu_over_after_cpu"] = ratio(
                f"{method}@before", method, key="cpu_s_per_video"
            )

    digests = {r["method"]: r["frames_sha256"] for r in runs if r["repeat"] == 0}
    result = {
        "benchmark": "preprocess",
        "date": now(),
        "command": command_line(),
        "machine": machine,
        "params": {
            "preset": args.preset,
            "copies": args.copies,
            "repeats": args.repeats,
            "cpus": args.cpus,
            "frames": args.frames,
            "size": args.size,
            "stored_frames": stored_frames,
            "stored_size": stored_size,
            "videos_per_shard": args.videos_per_shard or VIDEOS_PER_SHARD,
            "methods": methods,
            "before": args.before,
            "pinned": args.pin,
        },
        "inputs": {
            **input_totals(inputs),
            "source_frames": source_frames,
            # Lower bound on frames decoded to get the samples (seek to the keyframe before, decode forward).
            "frames_to_decode": must_decode,
            "files": inputs,
        },
        "summary": summary,
        "ratios": ratios,
        # Methods that decode with decord the same way must produce identical bytes.
        "frames_sha256": digests,
        "runs": runs,
    }
    write_result("preprocess", result, args.out)
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    return result


if __name__ == "__main__":
    main()
