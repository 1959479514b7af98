"""Training throughput: vidray's Ray Train data path against a plain PyTorch loop over tensors in memory.

Both methods run the same step on the same model and batch: vidray's
``augment.train_transform`` (temporal jitter, random resized crop) and
``augment.mix_batch``, VideoMAE forward (``vidray.model.classifier.build_model``,
``vidray.model.classifier.autocast``: bf16 on CUDA), soft-target cross-entropy, backward,
gradient clipping and AdamW (``vidray.train.optim.build_optimizer``). Methods, each
in a fresh Python process:

``plain_<t>thr``   the step in a loop over batches gathered from one uint8 tensor
                   holding the whole dataset in memory (random permutation per
                   epoch), ``torch.set_num_threads(t)``. No I/O: the compute ceiling.
``raytrain``       a ``TorchTrainer`` worker (``cpus_per_worker`` CPUs, so
                   OMP/torch threads = that many) reading the preprocessed Parquet
                   shards through the path ``vidray/train/loop.py`` uses:
                   ``read_split`` -> ``randomize_block_order`` -> dataset shard ->
                   ``vidray.train.ingest.open_worker_data(...).train_batches(epoch)``
                   (rows in stored order, vidray's seeded shuffle buffer, one copy
                   per video into the batch) -> ``.to(device)``, a new epoch
                   iterator every epoch as in training.
``ingest``         the same worker with the step replaced by nothing: the clips/s
                   the data path alone delivers to one worker (what a GPU would need).
``*_cached``       ``raytrain`` / ``ingest`` with the split read once into Ray's object
                   store (``vidray.train.placement.materialize_in_order``;
                   ``train.cache_dataset: always``); the plain names stream the
                   Parquet shards every epoch (``cache_dataset: never``).
``*_device``       the cached split copied once into the worker's device memory
                   (``cache_dataset: device``, what ``auto`` picks when the shard
                   fits): batches by a seeded permutation on the device. The copy
                   happens before the first step; it is reported as ``device_load_s``.

Stores (``--stores``): the same synthetic clips as raw uint8 or in the ``jpeg`` store
(vidray/data/store.py), each measured with every method. From ``jpeg`` the batch builder
decodes only the stored frames each step samples, drawn ahead exactly as the training loop
draws them (``vidray.train.loop.frame_sampler``); ``jpeg_all_frames`` is the same dataset
decoded whole (every stored frame of a clip), side by side; ``jpeg_2threads`` is the same
dataset decoded on two threads per batch (``train.decode_threads=2``; give the worker the CPUs
with ``--cpus-per-worker 2``). Per store: ``bytes_per_clip``
and ``decode`` (this process decoding the split's sampled frames, clips per CPU second:
per core); per run, besides clips/s over the run and within an epoch,
``clips_per_process_cpu_s``: clips over the CPU seconds of the worker's process (its
batch thread included) in the timed window.

How steady state is measured: the worker times every step itself (its own
loop, calling the vidray functions above, so the timing needs nothing from
``train.py``). The first ``--warmup`` steps (worker start-up, model build, the
pipeline's first read, allocator warm-up) are dropped; ``clips_per_s`` is
``timed steps x batch / wall seconds from the start of the first timed step
to the end of the last``, which includes the data pipeline's restart at every
epoch boundary inside the timed window. Each step is split into ``data``
(inside ``next(iterator)`` + host-to-device copy), ``augment`` and ``model``
(forward, backward, clip, optimizer; CUDA synchronised before the clock
stops); ``data_wait_share`` = data / wall. The ``within_epoch_*`` numbers
leave out each epoch's first step (whose data wait is the pipeline restart,
reported as ``epoch_start_wait_s``): the rate of an epoch long enough for the
restart not to matter (COIN: ~1000 steps an epoch).

FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` over one
forward + backward (attention forced to the math SDPA kernel so it is counted
on every device: FLOPs are a property of the model, not of the kernel), and are
checked against the analytic ViT count. Achieved FLOP/s is reported against
the device's measured GEMM rate (fp32 on CPU, bf16 on CUDA) and, on known GPUs,
against the datasheet dense bf16 peak (MFU).

    python benchmarks/train_step.py --models tiny small                       # CPU set
    python benchmarks/train_step.py --device cuda --models base --sizes 112 224 --batch 32
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from vidray.train.telemetry import device_peak_tflops, vit_forward_flops  # noqa: E402

from benchlib import (  # noqa: E402
    ProcessTreeCPU,
    command_line,
    loadavg,
    machine_info,
    median,
    now,
    per_repeat_ratio,
    run_json_subprocess,
    write_result,
)

CACHE = Path(__file__).resolve().parent / ".cache"
CLASSES = [f"class{i}" for i in range(12)]  # COIN's 12 domains
# <method>_cached: the splits read once into the object store (train.cache_dataset), as
# vidray/train/loop.py does when they fit; without the suffix: streamed from Parquet every epoch.
# <method>_device: each worker's shard copied once into its device's memory (train.cache_dataset: device).
RAY_METHODS = ("raytrain", "ingest", "raytrain_cached", "ingest_cached", "raytrain_device", "ingest_device")
INGEST_METHODS = ("ingest", "ingest_cached", "ingest_device")
# --stores: the jpeg store decoding every stored frame of a clip (no frame sampler), side by side with "jpeg".
ALL_FRAMES = "jpeg_all_frames"
# --stores: the jpeg store decoded on two threads per batch (train.decode_threads=2), side by side with "jpeg".
TWO_THREADS = "jpeg_2threads"
# The train.cache_dataset a Ray method's worker runs with, by its suffix.
PLACEMENTS = {"": "never", "_cached": "always", "_device": "device"}


def placement_of(method: str) -> str:
    return next(PLACEMENTS[suffix] for suffix in ("_cached", "_device", "") if method.endswith(suffix))


# --------------------------------------------------------------------------- data


def build_dataset(
    out: Path, videos: int, val_videos: int, stored_frames: int, stored_size: int, frames: int, size: int, store: str = "raw"
):
    """A preprocessed dataset in vidray's layout, written by vidray's own shard writer in ``store``
    (vidray/data/store.py, at the default JPEG quality).

    Frames are textured, panning, grainy content (benchmarks/make_inputs.py)
    rather than noise, so zstd and JPEG compress them like real frames.
    """
    import numpy as np

    from make_inputs import VideoSpec, _frames
    from vidray.config import DEFAULT_JPEG_QUALITY
    from vidray.data.dataset import DATASET_INFO
    from vidray.data.shard_files import outcome_row, write_shard
    from vidray.data.shards import VIDEOS_PER_SHARD, Video, plan_shards
    from vidray.data.store import encode_clip

    if (out / DATASET_INFO).is_file():
        return out
    rows = [("train", i) for i in range(videos)] + [("val", i) for i in range(val_videos)]
    video_of = {}
    for split, i in rows:
        label = i % len(CLASSES)
        path = f"synthetic/{split}/{CLASSES[label]}/v{i:04d}.mp4"
        video_of[path] = Video(path, f"{split}-{i}", CLASSES[label], label, split, 0, 0)
    shards = plan_shards(list(video_of.values()), stored_frames, stored_size, VIDEOS_PER_SHARD, store=store)
    seed = 0
    stored_bytes = {"train": 0, "val": 0, "test": 0}
    for shard in shards:
        outcomes = []
        for video in shard.videos:
            seed += 1
            spec = VideoSpec("x", video.label, stored_size, stored_size, stored_frames / 30, seed)
            clip = np.stack(list(_frames(spec)))[:stored_frames]
            blob = encode_clip(clip, store, DEFAULT_JPEG_QUALITY)
            stored_bytes[video.split] += len(blob)
            outcomes.append((outcome_row(video, source_frames=stored_frames, padded=False), blob))
        write_shard(str(out), shard, outcomes, store=store)
    info = {
        "classes": CLASSES,
        "frames": frames,
        "size": size,
        "stored_frames": stored_frames,
        "stored_size": stored_size,
        "splits": {
            split: {"videos": sum(1 for s, _ in rows if s == split)} for split in ("train", "val", "test")
        },
        "store": store,
        "stored_bytes": stored_bytes,
        "synthetic": "benchmarks/train_step.py",
    }
    (out / DATASET_INFO).write_text(json.dumps(info, indent=1))
    return out


def decode_rate(dataset: Path, frames: int, sampled: bool = True, passes: int = 2) -> dict[str, Any]:
    """Decode clips/s per core of the dataset's train clips: the stored frames a step samples (every
    ``stored / frames``-th: the jitter's offset 0; not ``sampled``: every stored frame), into one reused
    clip as the batch builder decodes them (vidray/train/batches.py), over this thread's CPU time;
    ``passes`` over the split."""
    import numpy as np
    import pyarrow.parquet as pq

    from vidray.data.dataset import read_dataset_info
    from vidray.data.store import decode_frames_into
    from vidray.model.transforms import eval_stored_frames

    info = read_dataset_info(str(dataset))
    blobs = pq.read_table(os.path.join(dataset, "train"), columns=["video"]).column("video").to_pylist()
    sampled = eval_stored_frames(info.stored_frames, frames) if sampled else np.arange(info.stored_frames)
    out = np.empty(info.video_shape, np.uint8)
    started = time.thread_time()
    for _ in range(passes):
        for blob in blobs:
            decode_frames_into(blob, info.store, out, sampled, in_place=True)
    cpu = time.thread_time() - started
    return {"decode_clips_per_cpu_s": round(passes * len(blobs) / cpu, 1), "decoded_frames_per_clip": len(sampled)}


# --------------------------------------------------------------------------- the step (shared)


def make_step(model_size: str, frames: int, size: int, device_name: str, compile: bool = False, generators=None):
    """(augment(videos_uint8, labels), step(pixels, targets) -> loss, model, device); everything from
    vidray, set up the way a training worker sets it up (vidray/train/loop.py): weights and position table
    on the device, augmentation generators on the device (``generators``, else new ones; seeded here),
    TF32, fused AdamW on CUDA, optionally compiled."""
    import torch

    from vidray.train import augment
    from vidray.config import ModelSettings, TrainSettings
    from vidray.model.classifier import autocast, build_model, compile_model, to_device, use_tf32
    from vidray.train.optim import build_optimizer
    from vidray.train.rng import AugmentGenerators, seed_everything

    device = torch.device(device_name)
    use_tf32(device)
    torch.manual_seed(0)
    model = to_device(build_model(ModelSettings(init="scratch", size=model_size), CLASSES, frames, size), device)
    model.train()
    forward = compile_model(model) if compile else model
    train_cfg = TrainSettings()
    optimizer = build_optimizer(model, train_cfg, device)
    generators = generators or AugmentGenerators.for_device(device)
    seed_everything(0, generators.host, generators.device)

    def augment_batch(videos, labels):
        pixels = augment.train_transform(
            videos, frames=frames, size=size, generator=generators.device, hflip=train_cfg.hflip
        )
        return augment.mix_batch(
            pixels,
            labels,
            num_classes=len(CLASSES),
            generator=generators.host,
            mixup_alpha=train_cfg.mixup_alpha,
            cutmix_alpha=train_cfg.cutmix_alpha,
            label_smoothing=train_cfg.label_smoothing,
        )

    def model_step(pixels, targets):
        with autocast(device):
            logits = forward(pixel_values=pixels).logits
        loss = augment.soft_target_cross_entropy(logits, targets)
        loss.backward()
        if train_cfg.max_grad_norm is not None:
            torch.nn.utils.clip_grad_norm_(model.parameters(), train_cfg.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss

    return augment_batch, model_step, model, device


def _sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


class StepTimer:
    """Per-step (data, augment, model) seconds, and the wall clock of the timed window."""

    def __init__(self, warmup: int, device):
        self.warmup, self.device = warmup, device
        self.steps: list[tuple[float, float, float, bool]] = []  # data, augment, model, first of its epoch
        self.window_start: float | None = None
        self.window_end = 0.0
        self.cpu_start = self.cpu_end = 0.0  # this process's CPU seconds (all its threads) at the window's ends

    def run(self, batches, augment_batch, model_step, total_steps: int) -> bool:
        """Consume ``batches`` (one epoch of (videos, labels) on the host) until total_steps; True when done."""
        iterator = iter(batches)
        first_of_epoch = True
        while len(self.steps) < total_steps:
            t0 = time.perf_counter()
            if len(self.steps) == self.warmup and self.window_start is None:
                self.window_start, self.cpu_start = t0, time.process_time()
            try:
                videos, labels = next(iterator)
            except StopIteration:
                return False
            videos, labels = videos.to(self.device, non_blocking=True), labels.to(self.device, non_blocking=True)
            _sync(self.device)
            t1 = time.perf_counter()
            pixels, targets = augment_batch(videos, labels)
            _sync(self.device)
            t2 = time.perf_counter()
            model_step(pixels, targets).item()  # .item() waits for the device
            t3 = time.perf_counter()
            self.steps.append((t1 - t0, t2 - t1, t3 - t2, first_of_epoch))
            self.window_end, self.cpu_end = t3, time.process_time()
            first_of_epoch = False
        return True

    def summary(self, batch: int) -> dict[str, Any]:
        timed = self.steps[self.warmup :]
        if not timed or self.window_start is None:
            raise RuntimeError(f"no timed steps: {len(self.steps)} steps with warmup {self.warmup}")
        wall = self.window_end - self.window_start
        data, aug, model = (sum(s[i] for s in timed) for i in range(3))
        # Inside an epoch: every step but an epoch's first, whose data wait is the pipeline (re)start.
        inner = [s for s in timed if not s[3]]
        starts = [s[0] for s in timed if s[3]]
        inner_wall = sum(s[0] + s[1] + s[2] for s in inner)
        return {
            "timed_steps": len(timed),
            "warmup_steps": self.warmup,
            "wall_s": round(wall, 4),
            "clips_per_s": round(len(timed) * batch / wall, 4),
            # Per core: the clips over the CPU seconds this process (the worker: its batch thread included) spent.
            "clips_per_process_cpu_s": round(len(timed) * batch / max(self.cpu_end - self.cpu_start, 1e-9), 4),
            "step_s": round(wall / len(timed), 5),
            "data_s_per_step": round(data / len(timed), 5),
            "augment_s_per_step": round(aug / len(timed), 5),
            "model_s_per_step": round(model / len(timed), 5),
            "data_wait_share": round(data / wall, 4),
            "within_epoch_clips_per_s": round(len(inner) * batch / inner_wall, 4) if inner else None,
            "within_epoch_data_wait_share": round(sum(s[0] for s in inner) / inner_wall, 4) if inner else None,
            "epoch_starts_timed": len(starts),
            "epoch_start_wait_s": round(sum(starts) / len(starts), 4) if starts else None,
            "first_step_s": round(sum(self.steps[0][:3]), 4),
        }


# --------------------------------------------------------------------------- method: plain loop


def run_plain(args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import pyarrow.parquet as pq
    import torch

    from vidray.data.dataset import read_dataset_info, videos_from_bytes

    torch.set_num_threads(args.threads)
    info = read_dataset_info(args.dataset)
    table = pq.read_table(os.path.join(args.dataset, "train"), columns=["video", "label"])
    all_videos = torch.from_numpy(videos_from_bytes(table.column("video").to_pylist(), info.video_shape, info.store).copy())
    all_labels = torch.from_numpy(np.asarray(table.column("label").to_pylist(), dtype=np.int64))
    augment_batch, model_step, _, device = make_step(args.model, args.frames, args.size, args.device)
    if device.type == "cuda":
        all_videos, all_labels = all_videos.to(device), all_labels.to(device)  # in device memory: no copies at all
    shuffle = torch.Generator().manual_seed(1)
    timer = StepTimer(args.warmup, device)
    total = args.warmup + args.steps
    while len(timer.steps) < total:  # epochs
        order = torch.randperm(len(all_labels), generator=shuffle)
        batches = (
            (all_videos[order[i : i + args.batch].to(all_videos.device)], all_labels[order[i : i + args.batch].to(all_labels.device)])
            for i in range(0, len(order) - args.batch + 1, args.batch)
        )
        timer.run(batches, augment_batch, model_step, total)
    return {"torch_threads": torch.get_num_threads(), **timer.summary(args.batch)}


# --------------------------------------------------------------------------- method: Ray Train


def raytrain_worker_loop(config: dict[str, Any]) -> None:
    """Runs in the Ray Train worker: vidray's ingest path, timed step by step."""
    import ray.train
    import torch

    from vidray.config import TrainSettings, VidrayConfig
    from vidray.data.dataset import ClipShape
    from vidray.train.decoding import decode_threads_for
    from vidray.train.finetune import FineTuning
    from vidray.train.ingest import open_worker_data
    from vidray.train.loop import WorkerSetup, frame_sampler
    from vidray.train.rng import AugmentGenerators, seed_everything

    args = argparse.Namespace(**config["args"])
    train_cfg = TrainSettings(cache_dataset=placement_of(args.worker), decode_threads=args.decode_threads)
    device = ray.train.torch.get_device()
    generators = AugmentGenerators.for_device(device)
    seed_everything(0, generators.host, generators.device)
    if config["ingest_only"]:
        # The data path alone: how many clips/s it can hand a model that costs nothing.
        def augment_batch(videos, labels):
            return videos, labels

        def model_step(pixels, targets):
            return pixels.flatten()[:1].float().sum()
    else:
        augment_batch, model_step, _, device = make_step(args.model, args.frames, args.size, str(device), args.compile, generators)
    # A compressed store decodes only the frames each step samples, drawn ahead as the training loop draws
    # them (vidray.train.loop.frame_sampler; the ingest-only run draws them too, and uses nothing else).
    stored_frames, stored_size = config["video_shape"][:2]
    shape = ClipShape(CLASSES, args.frames, args.size, stored_frames, stored_size, store=config["store"])
    task = FineTuning(WorkerSetup(VidrayConfig(train=train_cfg), shape, device))
    # vidray's own data path, as the training worker opens it.
    data = open_worker_data(
        train_cfg,
        tuple(config["video_shape"]),
        batch_size=args.batch,
        train_videos=config["train_videos"],
        val_videos=config["val_videos"],
        device=device,
        rank=0,
        world_size=1,
        store=config["store"],
        clip_bytes=config["clip_bytes"],
    )
    if data.placement != ("device" if args.worker.endswith("_device") else "ray_data"):
        raise RuntimeError(f"{args.worker} ran on the {data.placement} path")
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    timer = StepTimer(args.warmup, device)
    total = args.warmup + args.steps
    epoch = 0
    while len(timer.steps) < total:
        sampler = frame_sampler(task, generators, shape, train_cfg) if shape.store != "raw" and not args.all_frames else None
        batches = data.train_batches(epoch, sampler)
        timer.run(((b["video"], b["label"]) for b in batches), augment_batch, model_step, total)
        epoch += 1
    # Train V2 keeps only metrics that come with a checkpoint; the driver is on this node, so a file will do.
    result = {
        "torch_threads": torch.get_num_threads(),
        "decode_threads": decode_threads_for(train_cfg, device),
        "epochs": epoch,
        "placement": data.placement,
        "device_load_s": round(data.cache.load_seconds, 3) if data.cache else None,
        "peak_memory_gib": round(torch.cuda.max_memory_allocated(device) / 2**30, 3) if device.type == "cuda" else None,
        **timer.summary(args.batch),
    }
    with open(config["result_file"], "w") as f:
        json.dump(result, f)


def run_raytrain(args: argparse.Namespace) -> dict[str, Any]:
    import ray
    import ray.train
    from ray.train.torch import TorchTrainer

    from vidray.cluster import LOOPBACK_IP
    from vidray.config import TrainSettings
    from vidray.data.dataset import read_dataset_info
    from vidray.train.placement import build_datasets, data_config

    tracker = ProcessTreeCPU().start()
    started = time.perf_counter()
    ray.init(
        _node_ip_address=LOOPBACK_IP,  # loopback only (vidray.cluster.LOOPBACK_IP)
        num_cpus=args.cpus,
        num_gpus=1 if args.device == "cuda" else 0,
        include_dashboard=False,
        object_store_memory=1_000_000_000,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    info = read_dataset_info(args.dataset)
    # What the driver of `vidray train` builds for this placement (the object store when cached).
    cache_started = time.perf_counter()
    datasets = build_datasets(args.dataset, TrainSettings(cache_dataset=placement_of(args.worker)), info)
    cache_s = round(time.perf_counter() - cache_started, 2) if args.worker.endswith(("_cached", "_device")) else None
    with tempfile.TemporaryDirectory(prefix="vidray-bench-train-") as storage:
        trainer = TorchTrainer(
            raytrain_worker_loop,
            train_loop_config={
                "args": vars(args),
                "video_shape": list(info.video_shape),
                "result_file": os.path.join(storage, "result.json"),
                "ingest_only": args.worker in INGEST_METHODS,
                "train_videos": info.split_counts["train"],
                "val_videos": info.split_counts["val"],
                "store": info.store,
                "clip_bytes": info.clip_bytes,
            },
            scaling_config=ray.train.ScalingConfig(
                num_workers=1, use_gpu=args.device == "cuda", resources_per_worker={"CPU": args.cpus_per_worker}
            ),
            datasets=datasets,
            dataset_config=data_config(),
            run_config=ray.train.RunConfig(name="bench", storage_path=storage),
        )
        trainer.fit()
        with open(os.path.join(storage, "result.json")) as f:
            measured = json.load(f)
    total_s = time.perf_counter() - started
    tracker.stop()
    ray.shutdown()
    return {
        "cpus": args.cpus,
        "cpus_per_worker": args.cpus_per_worker,
        "process_wall_s": round(total_s, 2),
        "cache_s": cache_s,  # reading the split into the object store, once per run
        # Whole run, start-up included: where the CPU went, and how many Ray worker processes were started.
        "process_cpu_s": tracker.totals(),
        "ray_worker_processes": sum(1 for e in tracker.seen.values() if e["ray_worker"]),
        "store": info.store,
        "bytes_per_clip": info.clip_bytes,
        **measured,
    }


# --------------------------------------------------------------------------- FLOPs and the device's limit


def analytic_flops(model, frames: int, size: int, batch: int) -> dict[str, float]:
    """ViT forward FLOPs of a batch (vidray.train.telemetry.vit_forward_flops: what the training telemetry's MFU uses)."""
    per_clip = vit_forward_flops(model.config, frames, size)
    return {"tokens": per_clip["tokens"], "forward": batch * per_clip["forward"]}


def count_flops(model_size: str, frames: int, size: int, batch: int) -> dict[str, Any]:
    """Forward and forward+backward FLOPs of a batch, counted by FlopCounterMode on the CPU.

    Counted on one clip and scaled: every op is linear in the batch, and a
    base-model batch at 224² would take minutes to run on a CPU.
    """
    import torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    from vidray.config import ModelSettings
    from vidray.model.classifier import build_model

    torch.manual_seed(0)
    model = build_model(ModelSettings(init="scratch", size=model_size), CLASSES, frames, size)
    pixels = torch.randn(1, frames, 3, size, size)
    with sdpa_kernel(SDPBackend.MATH):
        with FlopCounterMode(display=False) as forward_counter:
            logits = model(pixel_values=pixels).logits
        with FlopCounterMode(display=False) as backward_counter:
            logits.float().logsumexp(-1).mean().backward()
    forward, backward = batch * forward_counter.get_total_flops(), batch * backward_counter.get_total_flops()
    analytic = analytic_flops(model, frames, size, batch)
    return {
        "batch": batch,
        "tokens_per_clip": analytic["tokens"],
        "parameters": sum(p.numel() for p in model.parameters()),
        "forward_flops": forward,
        "backward_flops": backward,
        "train_flops_per_step": forward + backward,
        "train_flops_per_clip": (forward + backward) / batch,
        "analytic_forward_flops": analytic["forward"],
        "counted_over_analytic_forward": round(forward / analytic["forward"], 4),
    }


def gemm_rate(device_name: str, threads: int, seconds: float = 2.0) -> dict[str, Any]:
    """Measured dense matmul FLOP/s with the training dtype (fp32 on CPU, bf16 on CUDA): a practical ceiling."""
    import torch

    previous_threads = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        return _gemm_rate(device_name, seconds)
    finally:
        torch.set_num_threads(previous_threads)


def _gemm_rate(device_name: str, seconds: float) -> dict[str, Any]:
    import torch

    device = torch.device(device_name)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    runs, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        a @ b
        runs += 1
    _sync(device)
    elapsed = time.perf_counter() - started
    return {"dtype": str(dtype).removeprefix("torch."), "n": n, "threads": torch.get_num_threads(), "tflops": round(2 * n**3 * runs / elapsed / 1e12, 4)}


# --------------------------------------------------------------------------- orchestration


def _worker_main(args: argparse.Namespace) -> None:
    if args.worker == "plain":
        result = run_plain(args)
    elif args.worker in RAY_METHODS:
        result = run_raytrain(args)
    else:
        raise ValueError(args.worker)
    print(json.dumps(result))


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["tiny", "small"], choices=["tiny", "small", "base"])
    parser.add_argument("--sizes", nargs="+", type=int, default=[112], help="model input sides (16 frames each)")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--batch", type=int, default=8, help="clips per step (one worker)")
    parser.add_argument("--steps", type=int, default=16, help="timed steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="steps dropped before timing")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--videos", type=int, default=64, help="training videos in the benchmark dataset")
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--cpus", type=int, default=os.cpu_count(), help="CPUs of the Ray cluster")
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="Ray Train worker CPUs (default: vidray's train.cpus_per_worker)")
    parser.add_argument("--methods", nargs="+", default=None, help="default: plain_1thr, plain_<cpus>thr, raytrain[_cached|_device], ingest[_cached|_device]")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/train_step_<models>.json)")
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--gemm-seconds", type=float, default=2.0, help="how long to time the matmul ceiling")
    parser.add_argument("--compile", action="store_true", help="torch.compile the model (train.compile)")
    parser.add_argument("--stores", nargs="+", default=["raw"], choices=["raw", "jpeg", ALL_FRAMES, TWO_THREADS],
                        help="stored formats of the dataset (data.store), each measured with every method; "
                             f"{ALL_FRAMES}: the jpeg store decoding every stored frame of a clip, as before the "
                             f"batch builder decoded only the sampled ones; {TWO_THREADS}: the jpeg store decoded "
                             "on two threads per batch (train.decode_threads=2)")  # fmt: skip
    parser.add_argument("--all-frames", type=int, default=0, help=argparse.SUPPRESS)
    parser.add_argument("--decode-threads", type=int, default=None, help=argparse.SUPPRESS)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--model", default="tiny", help=argparse.SUPPRESS)
    parser.add_argument("--size", type=int, default=112, help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.cpus_per_worker is None:
        from vidray.config import TrainSettings

        args.cpus_per_worker = TrainSettings().cpus_per_worker
    if args.worker:
        _worker_main(args)
        return {}

    from vidray.data.shards import default_stored

    machine = machine_info()
    if args.device == "cuda" and not machine["cuda"]:
        raise SystemExit("--device cuda but torch sees no GPU")
    if args.methods:
        methods = args.methods
    elif args.device == "cuda":  # CPU threads barely matter to a GPU step
        methods = ["plain_1thr", "raytrain", "raytrain_cached", "raytrain_device", "ingest", "ingest_cached", "ingest_device"]
    else:
        methods = ["plain_1thr", f"plain_{args.cpus}thr", "raytrain", "raytrain_cached", "raytrain_device",
                   "ingest", "ingest_cached", "ingest_device"]  # fmt: skip

    def sub(worker: str, **extra: Any) -> dict[str, Any]:
        argv_ = [__file__, "--worker", worker, "--device", args.device, "--frames", str(args.frames)]
        argv_ += ["--batch", str(args.batch), "--steps", str(args.steps), "--warmup", str(args.warmup)]
        argv_ += ["--cpus", str(args.cpus), "--cpus-per-worker", str(args.cpus_per_worker)]
        for key, value in extra.items():
            argv_ += [f"--{key}", str(value)]
        if args.compile:
            argv_ += ["--compile"]
        return run_json_subprocess(argv_, timeout=args.timeout)

    # In this process: the GEMM rate per thread count this machine's runs use, then FLOPs per config.
    if args.device == "cpu":
        gemm = {str(t): gemm_rate("cpu", t, args.gemm_seconds) for t in sorted({1, args.cpus})}
    else:
        gemm = {"device": gemm_rate(args.device, 1, args.gemm_seconds)}
    peak = device_peak_tflops(machine["cuda"])
    configs, runs = [], []
    for size, store in [(size, store) for size in args.sizes for store in args.stores]:
        stored_frames, stored_size = default_stored(args.frames, size, None, None)
        data_store = "jpeg" if store in (ALL_FRAMES, TWO_THREADS) else store
        suffix = "" if data_store == "raw" else f"-{data_store}"
        dataset = args.cache / f"train-data-{args.videos}x{stored_frames}x{stored_size}{suffix}"
        build_dataset(dataset, args.videos, max(args.batch, 8), stored_frames, stored_size, args.frames, size, data_store)
        for model in args.models:
            flops = count_flops(model, args.frames, size, args.batch)
            decode = decode_rate(dataset, args.frames, sampled=store != ALL_FRAMES) if model == args.models[0] else configs[-1]["decode"]
            configs.append({"model": model, "size": size, "store": store, "stored": [stored_frames, stored_size],
                            "flops": flops, "decode": decode})  # fmt: skip
            for repeat in range(args.repeats):
                shift = repeat % len(methods)
                for method in methods[shift:] + methods[:shift]:
                    if method in INGEST_METHODS and model != args.models[0]:
                        continue  # the data path does not depend on the model: once per input size
                    load_before = loadavg()
                    common = {"model": model, "size": size, "dataset": dataset, "all-frames": int(store == ALL_FRAMES)}
                    if store == TWO_THREADS:
                        common["decode-threads"] = 2
                    if method.startswith("plain_"):
                        threads = int(method.removeprefix("plain_").removesuffix("thr"))
                        result = sub("plain", threads=threads, **common)
                    elif method in RAY_METHODS:
                        result = sub(method, **common)
                    else:
                        raise SystemExit(f"unknown method {method}")
                    # The ingest run trains nothing: no FLOPs to credit it with.
                    achieved = None if method in INGEST_METHODS else flops["train_flops_per_clip"] * result["clips_per_s"] / 1e12
                    run = {
                        "model": model,
                        "size": size,
                        "method": method,
                        "repeat": repeat,
                        "load_before": load_before,
                        "load_after": loadavg(),
                        **result,
                        "store": store,  # the dataset's is jpeg for ALL_FRAMES and TWO_THREADS too
                        "achieved_tflops": None if achieved is None else round(achieved, 5),
                    }
                    rate = (gemm.get(str(result["torch_threads"])) or gemm.get("device") or {}).get("tflops")
                    run["fraction_of_gemm_rate"] = round(achieved / rate, 4) if rate and achieved else None
                    run["mfu"] = round(achieved / peak, 4) if peak and achieved else None
                    runs.append(run)
                    print(
                        f"[train_step] {model}@{size} {store} repeat {repeat} {method:12s} {run['clips_per_s']:8.3f} clips/s "
                        f"data wait {run['data_wait_share']:.3f}  load {load_before}",
                        file=sys.stderr,
                        flush=True,
                    )

    summary: dict[str, Any] = {}
    for config in configs:
        key = f"{config['model']}@{config['size']}" + ("" if config["store"] == "raw" else f"/{config['store']}")
        mine = [r for r in runs if (r["model"], r["size"], r["store"]) == (config["model"], config["size"], config["store"])]
        entry = {}
        for method in methods:
            rows = [r for r in mine if r["method"] == method]
            entry[method] = {
                k: median([r.get(k) for r in rows])
                for k in ("clips_per_s", "clips_per_process_cpu_s", "step_s", "data_wait_share", "data_s_per_step", "augment_s_per_step",
                          "model_s_per_step", "within_epoch_clips_per_s", "within_epoch_data_wait_share",
                          "epoch_start_wait_s", "achieved_tflops", "fraction_of_gemm_rate", "mfu")
            }  # fmt: skip
            entry[method]["torch_threads"] = rows[0]["torch_threads"] if rows else None
            for field in ("device_load_s", "cache_s", "peak_memory_gib", "bytes_per_clip"):
                entry[method][field] = median([r.get(field) for r in rows])
        ratios = {}
        for ray_method in ("raytrain", "raytrain_cached", "raytrain_device"):
            for method in methods:
                if method in RAY_METHODS or ray_method not in methods:
                    continue
                ratios[f"{ray_method}_over_{method}"] = per_repeat_ratio(mine, "method", ray_method, method, "clips_per_s")
        # The data paths side by side: each against the object-store path, over a run and within an epoch.
        for method in methods:
            if method in INGEST_METHODS and method != "ingest_cached" and "ingest_cached" in methods:
                for field in ("clips_per_s", "within_epoch_clips_per_s"):
                    ratios[f"{method}_over_ingest_cached_{field}"] = per_repeat_ratio(mine, "method", method, "ingest_cached", field)
        summary[key] = {"methods": entry, "ratios": ratios, "train_gflops_per_clip": round(config["flops"]["train_flops_per_clip"] / 1e9, 3),
                        "decode": config["decode"]}  # fmt: skip
    # Each compressed store against raw, and decoding the sampled frames against all, method by method, within each repeat.
    store_ratios: dict[str, Any] = {}
    for run in runs:
        run["method_store"] = f"{run['method']}/{run['store']}"
    pairs = [(s, "raw") for s in args.stores if s != "raw" and "raw" in args.stores]
    pairs += [("jpeg", ALL_FRAMES)] if {"jpeg", ALL_FRAMES} <= set(args.stores) else []
    pairs += [(TWO_THREADS, "jpeg")] if {"jpeg", TWO_THREADS} <= set(args.stores) else []
    for store, base in pairs:
        for size in args.sizes:
            same_size = [r for r in runs if r["size"] == size and r["model"] == args.models[0]]
            store_ratios[f"{store}_over_{base}@{size}"] = {
                f"{method}_{field}": per_repeat_ratio(same_size, "method_store", f"{method}/{store}", f"{method}/{base}", field)
                for method in methods
                for field in ("clips_per_s", "within_epoch_clips_per_s", "clips_per_process_cpu_s")
            }

    result = {
        "benchmark": "train_step",
        "date": now(),
        "command": command_line(),
        "machine": machine,
        "params": {
            "device": args.device,
            "models": args.models,
            "sizes": args.sizes,
            "frames": args.frames,
            "batch": args.batch,
            "steps": args.steps,
            "warmup": args.warmup,
            "repeats": args.repeats,
            "videos": args.videos,
            "cpus": args.cpus,
            "cpus_per_worker": args.cpus_per_worker,
            "methods": methods,
            "compile": args.compile,
            "stores": args.stores,
        },
        "gemm": gemm,
        "bf16_peak_tflops": peak,
        "configs": configs,
        "summary": summary,
        "store_ratios": store_ratios,
        "runs": runs,
    }
    write_result(f"train_step_{'_'.join(args.models)}", result, args.out)
    print(json.dumps({**summary, **store_ratios}, indent=1))
    return result


if __name__ == "__main__":
    main()
