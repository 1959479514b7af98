"""The prepared GPU check: what vidray's GPU path does on one H100/H200, in one bounded call, in one JSON.

    bash benchmarks/gpu_check.sh                         # on the GPU machine (wraps this script)
    bash benchmarks/gpu_check.sh --device cpu --quick    # dry run of every section on a CPU

docs/benchmarks.md ("The GPU check") gives the exact device calls. Sections, in the order of their
value, each in its own process with its own timeout inside one overall budget (``--budget``; the
wrapper kills everything a little later). The JSON (``$OUT/gpu_check.json`` when ``OUT`` is set,
else ``benchmarks/results/gpu_check[_quick].json``, or ``--out``) is rewritten whenever a section
ends, and a section's own result file is rewritten whenever one of its measurements ends, so a
section that runs out of time keeps what it measured (status ``timed out``, with its ``result``):

``environment``   device, driver, library versions, what is importable (Ray, PyAV, pydantic...),
                  the wheel install's seconds, the measured bf16 GEMM rate (the practical ceiling).
``vit_b``         the training step alone, ViT-B (vidray's VideoMAE, ``vidray.model.classifier.build_model``:
                  SDPA attention), bf16 autocast, vidray's augmentation, soft-target loss, clipping
                  and fused AdamW, on clips already in device memory, eager, at 16x112² then
                  16x224², batch 32: clips/s, achieved TFLOP/s, MFU, peak memory. torch and
                  transformers only (benchmarks/train_step.py: make_step).
``vit_b_compiled_112``  the same step through ``torch.compile`` (``train.compile``) at 16x112²,
                  with its compile time (the first step).
``device_ingest`` vidray's device cache (``vidray.train.ingest.DeviceCache``, ``cache_dataset: device``)
                  loaded from the Parquet shards of a synthetic dataset in vidray's layout: load
                  seconds and GB/s, then batches/s built on the device, against the host path
                  (``vidray.train.batches.train_batches``: Arrow rows, shuffle buffer, pinned batch, copy).
                  The shards are read with pyarrow here, not Ray Data: no Ray in the process.
``gpu_decode``    nvjpeg: ``torchvision.io.decode_jpeg(device="cuda")`` of 720p and 128² JPEG
                  frames, batched, against the CPU decoder on one thread: frames/s. (NVDEC needs
                  torchcodec, which the image lacks; the section says so.) Then vidray's own jpeg
                  store path (``train.decode_device=cuda``, vidray/train/decoding.py): clips/s of
                  32-clip batches of 32x128² stored clips, 16 sampled frames decoded each, on the
                  GPU against the host decoder on one thread, the start-up agreement check's PSNR
                  and the pixels' difference (issue 18's target: 4,000 clips/s).
``ray_train``     a 2-epoch run of the real loop (``vidray.train.driver.build_trainer(...).fit()``)
                  on the GPU, ViT-B 16x112², ``cache_dataset=auto``: its history with the step
                  telemetry (step time, data-wait share, clips/s, TFLOP/s, MFU) and placement.
                  The one section that needs Ray.
``vit_b_compiled_224``  the compiled step at 16x224², only when the budget has room left.

No module a section imports pulls in Ray or PyAV unless the section needs them (only
``ray_train`` does); tests/test_gpu_check.py runs sections 1-3 with Ray, PyAV, decord,
torchcodec and wandb made unimportable.

``--device cpu --quick`` runs the same sections at toy sizes (tiny model, 4x32² clips) so
every code path runs on a CPU; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import command_line, kill_tree, loadavg, now, write_result  # noqa: E402

CACHE = HERE / ".cache"
# Seconds kept back from the budget for writing the result after the last section.
RESERVE_S = 5
# The section subprocess running now: killed with its tree when this process is told to stop (SIGTERM
# from gpu_check.sh's hard limit), so no Ray cluster outlives the check.
_running: set[int] = set()


def _stop(signum, frame) -> None:
    for pid in list(_running):
        kill_tree(pid)
    raise SystemExit(f"gpu_check: stopped by signal {signum}")


@dataclass(frozen=True)
class Sizes:
    """What a mode measures: the GPU set, or the toy set of the CPU dry run."""

    model: str
    frames: int
    sides: tuple[int, int]  # (the main input side, the large one)
    batch: int
    videos: int  # training videos of the synthetic dataset (device_ingest, ray_train)
    steps: int  # timed training steps
    warmup: int  # steps before timing (the first one compiles, when compiling)
    ingest_epochs: int
    log_every: int
    jpeg_frames: tuple[tuple[int, int, int], ...]  # (count, width, height)


GPU = Sizes(
    model="base", frames=16, sides=(112, 224), batch=32, videos=256, steps=30, warmup=5, ingest_epochs=3,
    log_every=4, jpeg_frames=((128, 1280, 720), (512, 128, 128)),
)  # fmt: skip
QUICK = Sizes(
    model="tiny", frames=4, sides=(32, 48), batch=4, videos=16, steps=3, warmup=1, ingest_epochs=2,
    log_every=2, jpeg_frames=((4, 160, 90), (8, 32, 32)),
)  # fmt: skip


@dataclass(frozen=True)
class Section:
    name: str
    max_s: float  # its own timeout (less when the budget has less left)
    min_s: float  # skipped when the budget has less than this left
    optional: bool = False


# max_s: each section's own limit, from estimates (no GPU run has calibrated them yet). The mandatory
# ones add up to the 400 s budget less RESERVE_S, so none is skipped unless one before it overran
# its limit; the optional one gets what the others leave.
SECTIONS = [
    Section("environment", max_s=30, min_s=10),
    Section("vit_b", max_s=70, min_s=30),
    Section("vit_b_compiled_112", max_s=90, min_s=45),
    Section("device_ingest", max_s=50, min_s=20),
    Section("gpu_decode", max_s=40, min_s=10),
    Section("ray_train", max_s=110, min_s=50),
    Section("vit_b_compiled_224", max_s=120, min_s=50, optional=True),
]


# --------------------------------------------------------------------------- running a section in bounded time


class SectionError(RuntimeError):
    def __init__(self, status: str, tail: str, partial: dict[str, Any] | None):
        super().__init__(status)
        self.status, self.tail, self.partial = status, tail, partial


def run_bounded(argv: list[str], timeout: float) -> tuple[int | None, str, dict[str, list[str]], float]:
    """(return code or None on timeout, the output's tail, its telemetry windows and compile log, seconds)
    of ``python argv`` killed with its whole process tree (a Ray cluster included) when it outlives ``timeout``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        _running.add(proc.pid)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
        finally:
            _running.discard(proc.pid)
        log.seek(0)
        # Ray Train's PlacementGroupCleaner warns every second it cannot reach the State API, which a
        # cluster without a dashboard (the GPU image has none of its packages) never has: not kept.
        kept = [line for line in log.read().splitlines() if "Failed to query Ray Train Controller" not in line]
        # The training loop's telemetry windows (vidray.train.telemetry), kept whole: where a step's time goes.
        windows = [line[line.index("vidray: epoch"):] for line in kept if "vidray: epoch" in line and "data wait" in line]
        # torch.compile's own account when TORCH_LOGS asks for it (graph breaks, recompiles).
        compile_log = [line for line in kept if "torch._dynamo" in line or "Graph break" in line or "ecompil" in line]
        tail = "\n".join(kept)[-3000:]
    return code, tail, {"telemetry_windows": windows, "compile_log": compile_log[:60]}, time.perf_counter() - started


def run_section(args: argparse.Namespace, name: str, timeout: float) -> tuple[dict[str, Any], str]:
    """(result, output tail) of section ``name``'s worker (``gpu_check.py --worker name``) in its own
    process within ``timeout``; a worker that fails or times out raises with what it had measured."""
    argv = [str(Path(__file__).resolve()), "--worker", name, "--device", args.device, "--cpus", str(args.cpus)]
    argv += ["--cache", str(args.cache)] + (["--quick"] if args.quick else [])
    argv += ["--train-epochs", str(args.train_epochs), "--train-videos", str(args.train_videos or 0)]
    argv += ["--train-log-every", str(args.train_log_every or 0)] + (["--train-compile"] if args.train_compile else [])
    with tempfile.TemporaryDirectory(prefix="vidray-gpu-check-") as tmp:
        result_file = os.path.join(tmp, "result.json")
        code, tail, logged, _ = run_bounded([*argv, "--result-file", result_file], timeout)
        partial = json.loads(Path(result_file).read_text()) if os.path.isfile(result_file) else None
    if partial is not None:
        partial.update({key: lines for key, lines in logged.items() if lines})
    if code != 0:
        raise SectionError("timed out" if code is None else f"exit {code}", tail, partial)
    return partial or {}, tail


class Emit:
    """A worker's result so far, rewritten (atomically) after every measurement."""

    def __init__(self, path: str):
        self.path, self.result = path, {}

    def __call__(self, key: str, value: Any) -> None:
        self.result[key] = value
        tmp = self.path + ".tmp"
        with open(tmp, "w") as f:
            json.dump(self.result, f)
        os.replace(tmp, self.path)


# --------------------------------------------------------------------------- section workers (own process each)


def environment_worker(args, sizes: Sizes, emit: Emit) -> None:
    import importlib.metadata
    import importlib.util
    import platform

    import torch

    from train_step import gemm_rate
    from vidray.train.telemetry import device_peak_tflops

    versions = {}  # None: not importable here
    for package in ("torch", "torchvision", "transformers", "numpy", "pyarrow", "triton", "pydantic", "ray", "av",
                    "decord", "torchcodec", "wandb", "typing_extensions"):  # fmt: skip
        try:
            found = importlib.util.find_spec(package) is not None
            versions[package] = importlib.metadata.version(package) if found else None
        except (ImportError, ValueError):
            versions[package] = None
    emit("python", platform.python_version())
    emit("executable", sys.executable)
    emit("versions", versions)
    emit("wheel_install_s", float(os.environ["GPU_CHECK_INSTALL_S"]) if os.environ.get("GPU_CHECK_INSTALL_S") else None)
    emit("cpus", os.cpu_count())
    try:
        with open("/proc/meminfo") as f:
            emit("meminfo", {k: v.strip() for k, v in (line.split(":", 1) for line in f) if k in ("MemTotal", "MemAvailable")})
        shm = os.statvfs("/dev/shm")
        emit("dev_shm_gib", round(shm.f_frsize * shm.f_blocks / 2**30, 1))
    except OSError as err:
        emit("meminfo", f"unavailable: {err}")
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        emit("device", {
            "name": props.name, "memory_gib": round(props.total_memory / 2**30, 1),
            "capability": f"{props.major}.{props.minor}", "multiprocessors": props.multi_processor_count,
            "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(),
            "bf16_peak_tflops": device_peak_tflops(props.name),
        })  # fmt: skip
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm,clocks.sm,temperature.gpu",
                 "--format=csv,noheader"], capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            emit("nvidia_smi", smi.stdout.strip() or smi.stderr.strip())
        except (OSError, subprocess.TimeoutExpired) as err:
            emit("nvidia_smi", f"unavailable: {err}")
    emit("gemm", gemm_rate(args.device, 1 if args.device == "cuda" else os.cpu_count(), 0.3 if args.quick else 3.0))


def _measure_step(args, sizes: Sizes, side: int, compile: bool) -> dict[str, Any]:
    """Clips/s of vidray's training step (augment + forward + backward + clip + AdamW) on clips in device memory."""
    import torch

    from train_step import CLASSES, make_step
    from vidray.data.shards import default_stored
    from vidray.train.telemetry import device_peak_tflops, train_flops_per_clip

    started = time.perf_counter()
    augment_batch, model_step, model, device = make_step(sizes.model, sizes.frames, side, args.device, compile=compile)
    stored_frames, stored_size = default_stored(sizes.frames, side, None, None)
    clips = 4 * sizes.batch
    generator = torch.Generator(device=device).manual_seed(0)
    videos = torch.randint(0, 256, (clips, stored_frames, stored_size, stored_size, 3), dtype=torch.uint8, device=device, generator=generator)
    labels = torch.randint(0, len(CLASSES), (clips,), device=device, generator=generator)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    def step(i: int):
        index = torch.arange(i * sizes.batch, (i + 1) * sizes.batch, device=device) % clips
        return model_step(*augment_batch(videos.index_select(0, index), labels.index_select(0, index)))

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    setup_s = time.perf_counter() - started
    t0 = time.perf_counter()
    first_loss = step(0).item()  # compiles the graphs when compiling
    first_step_s = time.perf_counter() - t0
    for i in range(1, sizes.warmup):
        step(i)
    sync()
    # Steady state: the steps queued back to back as the training loop queues them, one wait at the end.
    t0 = time.perf_counter()
    for i in range(sizes.steps):
        loss = step(sizes.warmup + i)
    last_loss = loss.item()
    wall = time.perf_counter() - t0
    clips_per_s = sizes.steps * sizes.batch / wall
    flops_per_clip = train_flops_per_clip(model.config, sizes.frames, side)
    achieved = flops_per_clip * clips_per_s / 1e12
    peak = device_peak_tflops(torch.cuda.get_device_name(device)) if device.type == "cuda" else None
    return {
        "model": sizes.model, "frames": sizes.frames, "side": side, "batch": sizes.batch, "compiled": compile,
        "stored": [stored_frames, stored_size], "timed_steps": sizes.steps, "warmup_steps": sizes.warmup,
        "setup_s": round(setup_s, 2), "first_step_s": round(first_step_s, 2), "wall_s": round(wall, 4),
        "step_s": round(wall / sizes.steps, 5), "clips_per_s": round(clips_per_s, 3),
        "train_gflops_per_clip": round(flops_per_clip / 1e9, 2), "achieved_tflops": round(achieved, 3),
        "mfu": round(achieved / peak, 4) if peak else None, "bf16_peak_tflops": peak,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 2) if device.type == "cuda" else None,
        "loss_first": round(first_loss, 4), "loss_last": round(last_loss, 4),
        "loss_finite": bool(torch.isfinite(torch.tensor([first_loss, last_loss])).all()),
    }  # fmt: skip


def vit_b_worker(args, sizes: Sizes, emit: Emit) -> None:
    for side in sizes.sides:
        emit(str(side), _measure_step(args, sizes, side, compile=False))


def vit_b_compiled_112_worker(args, sizes: Sizes, emit: Emit) -> None:
    emit(str(sizes.sides[0]), _measure_step(args, sizes, sizes.sides[0], compile=True))


def vit_b_compiled_224_worker(args, sizes: Sizes, emit: Emit) -> None:
    emit(str(sizes.sides[1]), _measure_step(args, sizes, sizes.sides[1], compile=True))


def ensure_dataset(args, sizes: Sizes) -> tuple[Path, float]:
    """(the synthetic dataset at the main side in vidray's layout, seconds spent building it now);
    cached in ``--cache`` (benchmarks/train_step.py: build_dataset)."""
    from train_step import build_dataset
    from vidray.data.shards import default_stored

    side = sizes.sides[0]
    stored_frames, stored_size = default_stored(sizes.frames, side, None, None)
    path = Path(args.cache) / f"train-data-{sizes.videos}x{stored_frames}x{stored_size}"
    started = time.perf_counter()
    build_dataset(path, sizes.videos, max(sizes.batch, 8), stored_frames, stored_size, sizes.frames, side)
    return path, time.perf_counter() - started


class ParquetShard:
    """The one call DeviceCache.load and batches.train_batches make of a Ray Data shard, ``iter_batches``,
    over a split's Parquet shards read with pyarrow in stored order: vidray's device path without Ray.
    ``read_s`` counts the seconds spent reading and decompressing."""

    def __init__(self, dataset: Path, split: str):
        self.paths = sorted((dataset / split).glob("*.parquet"))
        self.read_s = 0.0

    def iter_batches(self, *, batch_size: int | None = None, batch_format: str = "pyarrow", prefetch_batches: int = 0):
        import pyarrow as pa
        import pyarrow.parquet as pq

        assert batch_format == "pyarrow", batch_format
        tables = []
        for path in self.paths:
            started = time.perf_counter()
            table = pq.read_table(path, columns=["video", "label"])
            self.read_s += time.perf_counter() - started
            if batch_size is None:  # whole blocks, as Ray Data hands them over
                yield table
            else:
                tables.append(table)
        if batch_size is not None:
            whole = pa.concat_tables(tables)
            for start in range(0, whole.num_rows, batch_size):
                yield whole.slice(start, batch_size)


def device_ingest_worker(args, sizes: Sizes, emit: Emit) -> None:
    import torch

    from vidray.config import TrainSettings
    from vidray.data.dataset import read_dataset_info
    from vidray.train.batches import VideoBatchCollate, train_batches
    from vidray.train.ingest import DeviceCache

    dataset, build_s = ensure_dataset(args, sizes)
    info = read_dataset_info(str(dataset))
    emit("dataset", {"path": str(dataset), "video_shape": list(info.video_shape), "splits": info.split_counts, "build_s": round(build_s, 1)})
    device = torch.device(args.device)
    torch.zeros(1, device=device)  # the device's context, outside the timings
    train = TrainSettings(cache_dataset="device")
    shard, val = ParquetShard(dataset, "train"), ParquetShard(dataset, "val")
    cache = DeviceCache.load(
        shard, val, video_shape=info.video_shape, batch_size=sizes.batch, rank=0, world_size=1, device=device,
        train_rows=info.split_counts["train"], val_rows=info.split_counts["val"], prefetch_batches=train.prefetch_batches,
    )  # fmt: skip
    read_s = shard.read_s + val.read_s
    emit("load", {
        "bytes": cache.nbytes, "seconds": round(cache.load_seconds, 3), "gb_per_s": round(cache.nbytes / cache.load_seconds / 1e9, 3),
        "parquet_read_s": round(read_s, 3),
        "copy_gb_per_s": round(cache.nbytes / max(cache.load_seconds - read_s, 1e-9) / 1e9, 3),
    })  # fmt: skip

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def rate(batches_of_epoch: Callable[[int], Any]) -> dict[str, Any]:
        """Clips/s of whole epochs of batches landed on the device (each batch touched, as a step would)."""
        clips, started = 0, time.perf_counter()
        for epoch in range(sizes.ingest_epochs):
            for batch in batches_of_epoch(epoch):
                videos = batch["video"].to(device, non_blocking=True)
                videos[:, 0, 0, 0, 0].sum()  # the batch is used on the device
                clips += videos.shape[0]
        sync()
        seconds = time.perf_counter() - started
        return {"epochs": sizes.ingest_epochs, "clips": clips, "seconds": round(seconds, 3), "clips_per_s": round(clips / seconds, 1)}

    emit("device_cache", rate(lambda epoch: cache.train_batches(batch_size=sizes.batch, train=train, epoch=epoch, rank=0)))
    collate = VideoBatchCollate(info.video_shape, pin_memory=device.type == "cuda", batch_size=sizes.batch, depth=train.prefetch_batches + 4)
    host = ParquetShard(dataset, "train")
    emit("host_path", rate(lambda epoch: train_batches(host, batch_size=sizes.batch, train=train, epoch=epoch, rank=0, collate=collate)))
    result = emit.result
    emit("device_over_host", round(result["device_cache"]["clips_per_s"] / result["host_path"]["clips_per_s"], 2))


def gpu_decode_worker(args, sizes: Sizes, emit: Emit) -> None:
    """JPEG frames decoded by nvjpeg (``torchvision.io.decode_jpeg`` on CUDA, one batched call) against
    torchvision's CPU decoder on one thread; inputs are make_inputs.py's textured frames, quality 90."""
    import numpy as np
    import torch

    from make_inputs import VideoSpec, _frames

    try:
        import torchcodec  # noqa: F401

        emit("nvdec", "torchcodec is importable: not measured by this section")
    except ImportError:
        emit("nvdec", "not measured: torchcodec is not installed (NVDEC's way in from Python here)")
    try:
        from torchvision.io import decode_jpeg, encode_jpeg
    except ImportError as err:  # the GPU image has torchvision; the project's venv need not
        emit("nvjpeg", f"not measured: {type(err).__name__}: {err}")
        emit("vidray_jpeg_store", store_decode_rates(args, sizes))
        return
    torch.set_num_threads(1)
    for count, width, height in sizes.jpeg_frames:
        frames = list(_frames(VideoSpec("x", "x", width, height, count / 30, 1)))[:count]
        jpegs = [encode_jpeg(torch.from_numpy(np.ascontiguousarray(f)).permute(2, 0, 1).contiguous(), quality=90) for f in frames]
        entry: dict[str, Any] = {"frames": count, "width": width, "height": height, "jpeg_mb": round(sum(j.numel() for j in jpegs) / 1e6, 2)}
        decode_jpeg(jpegs[:2])
        started = time.perf_counter()
        decoded = decode_jpeg(jpegs)
        cpu_s = time.perf_counter() - started
        entry["cpu_1thread"] = {"seconds": round(cpu_s, 4), "frames_per_s": round(count / cpu_s, 1)}
        if args.device == "cuda":
            try:
                decode_jpeg(jpegs[:8], device="cuda")  # nvjpeg's handles and buffers
                torch.cuda.synchronize()
                runs, started = 3, time.perf_counter()
                for _ in range(runs):
                    on_gpu = decode_jpeg(jpegs, device="cuda")
                torch.cuda.synchronize()
                gpu_s = (time.perf_counter() - started) / runs
                same = max(float((a.cpu().int() - b.int()).abs().float().mean()) for a, b in zip(on_gpu[:4], decoded[:4]))
                entry["nvjpeg"] = {"seconds": round(gpu_s, 4), "frames_per_s": round(count / gpu_s, 1), "mean_abs_diff_vs_cpu": round(same, 3)}
                entry["nvjpeg_over_cpu_1thread"] = round(cpu_s / gpu_s, 2)
            except Exception as err:  # noqa: BLE001 - a decoder that cannot run here is a finding, not a crash
                entry["nvjpeg"] = f"unavailable: {type(err).__name__}: {str(err)[:300]}"
        emit(f"{width}x{height}", entry)
    emit("vidray_jpeg_store", store_decode_rates(args, sizes))


def store_decode_rates(args, sizes: Sizes) -> dict[str, Any]:
    """vidray's own paths for a jpeg-store batch (``train.decode_device``): clips/s of batches of
    ``sizes.batch`` clips of 2 x ``sizes.frames`` stored frames at the stored side, ``sizes.frames``
    sampled frames decoded per clip, by the host decoder on one thread and by the device decoder
    (``vidray.train.decoding``: nvJPEG via torchcodec or torchvision, one call a batch), and
    how far apart their pixels are. Issue 18's target for the device: 4,000 clips/s."""
    import numpy as np
    import torch

    from make_inputs import VideoSpec, _frames
    from vidray.config import TrainSettings
    from vidray.data.shards import default_stored
    from vidray.data.store import encode_clip
    from vidray.train.batches import Row, decode_rows_into
    from vidray.train.decoding import DeviceJpegDecoder, agreement_db, device_decoder_for, jpeg_batch_decoder

    stored_frames, side = default_stored(sizes.frames, sizes.sides[0], None, None)
    source = np.stack(list(_frames(VideoSpec("x", "x", side, side, stored_frames / 30, 1)))[:stored_frames])
    # Distinct clips (each a shifted copy of the textured frames), stored as preprocessing stores them.
    blobs = [encode_clip(np.roll(source, 7 * i, axis=2), "jpeg", 90) for i in range(2 * sizes.batch)]
    shape = (stored_frames, side, side, 3)
    generator = np.random.default_rng(0)
    frames = np.sort([generator.choice(stored_frames, sizes.frames, replace=False) for _ in range(sizes.batch)], axis=1)
    out = {"stored": list(shape), "batch": sizes.batch, "sampled_frames": sizes.frames,
           "kb_per_clip": round(float(np.mean([len(b) for b in blobs])) / 1e3, 1)}  # fmt: skip
    batches = [blobs[i : i + sizes.batch] for i in range(0, len(blobs), sizes.batch)]
    host = torch.empty((sizes.batch, *shape), dtype=torch.uint8)

    def host_batch(batch):
        decode_rows_into(host.numpy(), [Row(b, 0, 0, "x") for b in batch], "jpeg", frames, threads=1)
        return host

    host_batch(batches[0])
    runs, started = 3, time.perf_counter()
    for _ in range(runs):
        for batch in batches:
            host_batch(batch)
    seconds = time.perf_counter() - started
    out["host_1thread_clips_per_s"] = round(runs * len(blobs) / seconds, 1)
    try:
        device = torch.device(args.device)
        if device.type == "cuda":
            decoder = device_decoder_for(TrainSettings(decode_device="cuda"), device, "jpeg")
        else:  # the dry run: the same code through a batched decoder's CPU mode, where one imports
            backend = jpeg_batch_decoder()
            if backend is None:
                out["device"] = "not measured: no batched JPEG decoder imports here (torchcodec >= 0.16 or torchvision)"
                return out
            decoder = DeviceJpegDecoder(device, *backend)
        out["library"] = decoder.library
        out["agreement_db"] = round(agreement_db(decoder), 2)
        decoder.decode(batches[0], shape, frames)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        for _ in range(runs):
            for batch in batches:
                on_device = decoder.decode(batch, shape, frames)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - started
        out["device_clips_per_s"] = round(runs * len(blobs) / seconds, 1)
        picked = torch.arange(sizes.batch)[:, None], torch.from_numpy(frames)
        diff = (on_device.cpu()[picked].int() - host_batch(batches[-1])[picked].int()).abs()
        out["device_vs_host"] = {"mean_abs_diff": round(float(diff.float().mean()), 4), "max_abs_diff": int(diff.max())}
        out["device_over_host_1thread"] = round(out["device_clips_per_s"] / out["host_1thread_clips_per_s"], 2)
    except Exception as err:  # noqa: BLE001 - a decoder that cannot run here is a finding, not a crash
        out["device"] = f"unavailable: {type(err).__name__}: {str(err)[:300]}"
    return out


def ray_train_worker(args, sizes: Sizes, emit: Emit) -> None:
    """A 2-epoch `vidray train` through build_trainer on the synthetic dataset."""
    import ray

    from vidray.model.checkpoint import INFO
    from vidray.cluster import LOOPBACK_IP
    from vidray.config import load_config
    from vidray.train.driver import build_trainer

    sizes = replace(
        sizes, videos=args.train_videos or sizes.videos, log_every=args.train_log_every or sizes.log_every
    )
    dataset, build_s = ensure_dataset(args, sizes)
    from vidray.data.dataset import read_dataset_info

    info = read_dataset_info(str(dataset))
    cpus_per_worker = 1 if args.quick else max(2, args.cpus // 2)
    emit("dataset", {"path": str(dataset), "build_s": round(build_s, 1), "cpus_per_worker": cpus_per_worker})
    started = time.perf_counter()
    ray.init(
        # A cluster of its own, whatever RAY_ADDRESS says, on loopback (vidray.cluster.LOOPBACK_IP).
        address="local",
        _node_ip_address=LOOPBACK_IP,
        num_cpus=args.cpus,
        num_gpus=1 if args.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    emit("ray", {"version": ray.__version__, "init_s": round(time.perf_counter() - started, 1), "resources": ray.cluster_resources()})
    with tempfile.TemporaryDirectory(prefix="vidray-gpu-check-run-") as storage:
        cfg = load_config(
            None,
            [
                f"data.dataset_dir={dataset}", f"data.frames={sizes.frames}", f"data.size={info.size}",
                f"data.stored_frames={info.stored_frames}", f"data.stored_size={info.stored_size}",
                "model.init=scratch", f"model.size={sizes.model}", f"train.epochs={args.train_epochs}",
                f"train.compile={'true' if args.train_compile else 'false'}",
                f"train.batch_size={sizes.batch}", "train.lr=1e-4", "train.warmup_epochs=0.5",
                f"train.use_gpu={'true' if args.device == 'cuda' else 'false'}", "train.num_workers=1",
                f"train.cpus_per_worker={cpus_per_worker}", f"train.log_every_steps={sizes.log_every}",
                "train.cache_dataset=auto", f"run.storage_path={storage}", "run.name=gpu_check",
            ],
        )  # fmt: skip
        started = time.perf_counter()
        result = build_trainer(cfg).fit()
        fit_s = time.perf_counter() - started
        checkpoint = json.loads((Path(result.checkpoint.path) / INFO).read_text())
    ray.shutdown()
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy", "global_step", "train_videos_per_s", "step_s",
            "data_wait_share", "clips_per_s", "achieved_tflops", "mfu", "last_report_wait_s")  # fmt: skip
    emit("fit_s", round(fit_s, 1))
    emit("placement", checkpoint["ingest"])
    emit("history", [{k: h[k] for k in keep if k in h} for h in checkpoint["history"]])


WORKERS: dict[str, Callable[[argparse.Namespace, Sizes, Emit], None]] = {
    "environment": environment_worker,
    "vit_b": vit_b_worker,
    "vit_b_compiled_112": vit_b_compiled_112_worker,
    "device_ingest": device_ingest_worker,
    "gpu_decode": gpu_decode_worker,
    "ray_train": ray_train_worker,
    "vit_b_compiled_224": vit_b_compiled_224_worker,
}
assert set(WORKERS) == {s.name for s in SECTIONS}


# --------------------------------------------------------------------------- summary and main


def summarize(sections: dict[str, Any]) -> dict[str, Any]:
    """The figures the check exists for, pulled out of the sections' results (partial ones included)."""
    summary: dict[str, Any] = {}
    gemm = (sections.get("environment", {}).get("result") or {}).get("gemm", {}).get("tflops")
    for name in ("vit_b", "vit_b_compiled_112", "vit_b_compiled_224"):
        for side, run in (sections.get(name, {}).get("result") or {}).items():
            keys = ("clips_per_s", "step_s", "achieved_tflops", "mfu", "peak_memory_gib", "first_step_s", "loss_finite")
            figures = {k: run.get(k) for k in keys}
            figures["fraction_of_measured_gemm"] = round(run["achieved_tflops"] / gemm, 4) if gemm else None
            summary[f"{name}@{side}"] = figures
    ingest = sections.get("device_ingest", {}).get("result") or {}
    if "device_over_host" in ingest:
        summary["device_ingest"] = {k: ingest[k] for k in ("load", "device_cache", "host_path", "device_over_host")}
    decode = sections.get("gpu_decode", {}).get("result") or {}
    summary["gpu_decode"] = {k: v.get("nvjpeg_over_cpu_1thread") for k, v in decode.items() if isinstance(v, dict)}
    train = sections.get("ray_train", {}).get("result") or {}
    if train.get("history"):
        summary["ray_train"] = {"fit_s": train.get("fit_s"), "placement": train.get("placement"), "last_epoch": train["history"][-1]}
    summary["status"] = {name: section.get("status") for name, section in sections.items()}
    return summary


def default_out(args: argparse.Namespace) -> Path:
    name = "gpu_check_quick.json" if args.quick or args.device == "cpu" else "gpu_check.json"
    return Path(os.environ["OUT"]) / name if os.environ.get("OUT") else HERE / "results" / name


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a dry run of every section")
    parser.add_argument("--budget", type=float, default=400, help="seconds for all sections together")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None, help="default $OUT/gpu_check[_quick].json, else benchmarks/results/")
    parser.add_argument("--only", nargs="+", default=None, choices=list(WORKERS), help="run only these sections")
    # ray_train's run (defaults: the check's); a longer one shows the loop's steady state.
    parser.add_argument("--train-epochs", type=int, default=2)
    parser.add_argument("--train-videos", type=int, default=0, help="training videos of ray_train's dataset (0: the check's)")
    parser.add_argument("--train-log-every", type=int, default=0, help="steps per telemetry window (0: the check's)")
    parser.add_argument("--train-compile", action="store_true", help="ray_train with train.compile=true")
    parser.add_argument("--section-max-s", type=float, default=0, help="every section's own limit (0: its default)")
    parser.add_argument("--worker", default=None, choices=list(WORKERS), help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    sizes = QUICK if args.quick else GPU
    if args.worker:
        WORKERS[args.worker](args, sizes, Emit(args.result_file))
        return {}
    signal.signal(signal.SIGTERM, _stop)
    out = args.out or default_out(args)
    started = time.monotonic()
    deadline = started + args.budget
    payload: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": now(),
        "command": command_line(),
        "params": {
            "device": args.device, "quick": args.quick,
            "train": {"epochs": args.train_epochs, "videos": args.train_videos, "log_every": args.train_log_every,
                      "compile": args.train_compile},
            "budget_s": args.budget, "sizes": sizes.__dict__, "cpus": args.cpus, "section_max_s": args.section_max_s,
        },
        "sections": {},
    }
    for section in SECTIONS:
        if args.only and section.name not in args.only:
            continue
        left = deadline - time.monotonic() - RESERVE_S
        record: dict[str, Any] = {"load_before": loadavg()}
        if left < section.min_s:
            record.update(status="skipped", reason=f"{left:.0f} s of the budget left, needs {section.min_s:.0f}")
        else:
            timeout = min(args.section_max_s or section.max_s, left)
            print(f"[gpu_check] {section.name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
            section_started = time.perf_counter()
            try:
                result, tail = run_section(args, section.name, timeout)
                record.update(status="ok", result=result, output_tail=tail[-800:])
            except SectionError as err:
                record.update(status=err.status, result=err.partial, output_tail=err.tail)
            record["seconds"] = round(time.perf_counter() - section_started, 1)
            record["timeout_s"] = round(timeout, 1)
        record["load_after"] = loadavg()
        payload["sections"][section.name] = record
        payload["summary"] = summarize(payload["sections"])
        payload["elapsed_s"] = round(time.monotonic() - started, 1)
        write_result("gpu_check", payload, out)
        print(f"[gpu_check] {section.name}: {record['status']} {record.get('seconds', '')}", file=sys.stderr, flush=True)
        if record["status"] not in ("ok", "skipped"):
            print(record.get("output_tail", "")[-1500:], file=sys.stderr, flush=True)
    print(json.dumps(payload.get("summary", {}), indent=1))
    return payload


if __name__ == "__main__":
    main()
