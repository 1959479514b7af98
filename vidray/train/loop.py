"""The one worker loop of the training stage: what every Ray Train worker runs, for any task.

A *task* is what one kind of training brings (:class:`Task`): fine-tuning a classifier (vidray/train/finetune.py)
or masked-autoencoder pretraining (vidray/pretrain/task.py). :func:`run_worker` owns everything else, once:

* the worker's context (rank, world size, device) and its quiet logs;
* start or resume (:func:`start_or_resume`): from the run's latest checkpoint, model, optimizer, schedule and
  every rank's random streams (augmentation and any the task adds, e.g. the mask stream), so an interrupted
  single-worker CPU run reproduces the uninterrupted one exactly;
* DDP, AdamW and the schedule (vidray/train/optim.py), torch.compile when ``train.compile``;
* the data (vidray/train/ingest.py: each worker's shard on its device, in the object store, or streamed); from a
  compressed store, each epoch's batches decode only the frames the steps will sample (:func:`frame_sampler`,
  which replays :func:`draw_step` ahead on copies of the augmentation streams);
* per epoch: the step loop (:func:`vidray.train.epoch.run_epoch`: accumulation, clipping, telemetry, no host sync
  per step on CUDA), the task's validation, one collective that gathers every rank's sums and states (and the
  stored clips it rejected, which the epoch's metrics name once each: vidray/train/rows.py), the task's metrics,
  rank 0's log line, and the report with rank 0's checkpoint (vidray/train/epoch_report.py, in the background
  when ``train.checkpoint_in_background``).

Test-only fault hooks (vidray/testing/faults.py) are imported only when a test
set one of their ``VIDRAY_TEST_*`` variables in the workers' environment.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import time
from dataclasses import dataclass
from types import ModuleType
from typing import Any, Callable, Mapping, Protocol

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
from transformers.utils import logging as hf_logging

from vidray.cluster import NodeShape
from vidray.compat import quiet_ray_train_report_log
from vidray.config import TrainSettings, VidrayConfig
from vidray.data.dataset import ClipShape
from vidray.model.checkpoint import MODEL_DIR, load_training_state, read_checkpoint_info
from vidray.model.classifier import compile_model, to_device, use_tf32
from vidray.train import augment
from vidray.train.epoch import Batch, StepParts, run_epoch
from vidray.train.epoch_report import report_epoch
from vidray.train.batches import FrameSampler
from vidray.train.ingest import WorkerData, open_worker_data
from vidray.train.optim import build_lr_schedule, build_optimizer, micro_batch_size, steps_per_epoch
from vidray.train.rng import AugmentGenerators, capture_rng_state, derive_seed, restore_rng_state, seed_everything
from vidray.train.rows import newly_rejected, take_rejected
from vidray.train.telemetry import StepTelemetry

logger = logging.getLogger(__name__)

# Every variable of vidray/testing/faults.py starts with this (tests/test_train.py checks).
TEST_ENV_PREFIX = "VIDRAY_TEST_"
TEST_FAULTS_MODULE = "vidray.testing.faults"


@dataclass(frozen=True)
class WorkerSetup:
    """What a task is made for: the run's config and clips, and this worker's training device."""

    cfg: VidrayConfig
    shape: ClipShape
    device: torch.device


@dataclass
class RandomStream:
    """A random stream a task draws from besides augmentation's: seeded per rank with
    ``derive_seed(rank seed, stream)``, its state saved per rank in every checkpoint."""

    generator: torch.Generator
    stream: int  # seed_everything() derives streams 1 and 2 for augmentation


@dataclass
class EpochSums:
    """What the loop measured in one epoch, over all ranks."""

    train_loss: float  # mean over every rank's micro-batches
    videos: int
    seconds: float  # the training pass, validation excluded
    lr: float
    global_step: int
    telemetry: dict[str, Any]  # rank 0's step telemetry of the epoch

    @property
    def videos_per_s(self) -> float:
        return self.videos / max(self.seconds, 1e-9)


class Task(Protocol):
    """What one kind of training brings to :func:`run_worker`. One instance per worker and run,
    made by ``make_task(WorkerSetup)``."""

    log_prefix: str  # starts the worker's log lines: "vidray", "vidray pretrain"
    betas: tuple[float, float]  # AdamW's
    streams: Mapping[str, RandomStream]  # checkpoint key -> stream; empty when augmentation's are all

    def new_model(self) -> torch.nn.Module:
        """A model to train from the start (on the host; the loop seeded torch the same on every rank)."""

    def load_model(self, model_dir: str) -> torch.nn.Module:
        """The model of a checkpoint's ``model/``."""

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        """Model FLOPs of one training clip, forward and backward (step telemetry)."""

    def draw(self, generator: torch.Generator, clips: int) -> Any:
        """Whatever the task's step draws from the host augmentation stream for a micro-batch of ``clips``
        (fine-tuning: its MixUp/CutMix), handed to :meth:`loss`. Every draw of a step goes through
        :func:`draw_step`: a compressed store's frame sampler replays it ahead on copies of the streams."""

    def loss(self, parts: StepParts, pixels: torch.Tensor, batch: Batch, drawn: Any) -> torch.Tensor:
        """The loss of a micro-batch: ``pixels`` are its clips after the shared train transform
        (temporal jitter, random resized crops, flips), ``batch`` the micro-batch on the device,
        ``drawn`` what :meth:`draw` drew for it."""

    def validate(self, parts: StepParts, data: WorkerData) -> dict[str, Any]:
        """This rank's share of the epoch's validation: values gathered from every rank."""

    def epoch_metrics(self, epoch: int, gathered: list[dict[str, Any]], sums: EpochSums) -> dict[str, Any]:
        """The flat dict the epoch reports (and its checkpoint's history keeps)."""

    def log_line(self, epoch: int, metrics: dict[str, Any], sums: EpochSums) -> str:
        """Rank 0's line for the epoch in the worker's log."""

    def checkpoint_info(self, metrics: dict[str, Any], gathered: list[dict[str, Any]]) -> dict[str, Any]:
        """Entries the checkpoint's vidray.json gets besides the loop's (a key the loop writes replaces its value)."""


def run_worker(config: dict[str, Any], make_task: Callable[[WorkerSetup], Task]) -> None:
    """The whole life of one worker in one run (what each task's ``*_loop_per_worker`` calls).

    ``config``: the TorchTrainer's ``train_loop_config``: ``cfg``, ``shape``, ``train_videos``
    and, when the run validates, ``val_videos``.
    """
    cfg: VidrayConfig = config["cfg"]
    shape: ClipShape = config["shape"]
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    quiet_worker_logs()
    use_tf32(device)
    faults = load_test_faults()
    task = make_task(WorkerSetup(cfg, shape, device))

    model, state, history = start_or_resume(cfg, task)
    # Every rank draws its own dropout and augmentation streams (restored below when resuming).
    generators = AugmentGenerators.for_device(device)
    seed_streams(derive_seed(train.seed, rank), generators, task.streams)
    to_device(model, device)  # weights and position table, once
    ddp_model = ray.train.torch.prepare_model(model)
    micro_batches, steps = steps_per_epoch(config["train_videos"], train)
    optimizer = build_optimizer(model, train, device, betas=task.betas)
    scheduler = build_lr_schedule(optimizer, train, steps)
    start_epoch, global_step = 0, 0
    if state is not None:
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world_size:
            restore_rng_state(state["rng"][rank], generators.host, generators.device)
            for name, stream in task.streams.items():
                stream.generator.set_state(state[name][rank])
        else:  # resumed with another worker count: fresh streams, still seeded
            seed_streams(derive_seed(train.seed, rank, start_epoch), generators, task.streams)

    val_videos = config.get("val_videos", 0)
    data = open_worker_data(
        train,
        shape.stored_video_shape,
        batch_size=micro_batch_size(train),
        train_videos=config["train_videos"],
        val_videos=val_videos,
        device=device,
        rank=rank,
        world_size=world_size,
        local_world_size=(
            workers_sharing_node(train, context.get_local_world_size()) if config.get("node_shared")
            else context.get_local_world_size()
        ),
        store=shape.store,
        clip_bytes=shape.clip_bytes,
    )
    if rank == 0 and data.cache is not None:
        cache = data.cache
        held, val_held = cache.rows
        videos = f"{held} train + {val_held} val videos" if val_videos else f"{held} videos"
        logger.info(
            "%s: every worker holds its shard on its %s (%s on rank 0, %.2f GiB, copied in %.1f s)",
            task.log_prefix, device.type, videos, cache.nbytes / 2**30, cache.load_seconds,
        )  # fmt: skip
    parts = StepParts(
        model, ddp_model, compile_model(ddp_model) if train.compile else ddp_model, optimizer, scheduler, generators
    )
    loss_of = step_loss(task, parts, shape, train)
    telemetry = StepTelemetry(
        flops_per_clip=task.flops_per_clip(model),
        world_size=world_size,
        device=device,
        log_every=train.log_every_steps,
        console=rank == 0,
        printer=logger.info,
    )
    report_wait_s = None  # how long this rank waited in the previous epoch's report

    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        # A compressed store decodes only the frames each step samples: drawn ahead, from the streams as they are now.
        sampler = frame_sampler(task, generators, shape, train) if shape.store != "raw" else None
        loss_sum, num_batches, num_videos, global_step = run_epoch(
            parts, data.train_batches(epoch, sampler), loss_of, train=train, device=device, micro_batches=micro_batches,
            epoch=epoch, global_step=global_step, telemetry=telemetry,
            after_step=functools.partial(faults.maybe_die_for_test, epoch, rank, world_size) if faults else None,
        )  # fmt: skip
        seconds = time.perf_counter() - started
        step_figures = telemetry.end_epoch()
        validated = task.validate(parts, data)

        # One collective per epoch: per-rank sums, validation, random states, timings and rejected stored clips.
        gathered = gather(
            {
                "loss_sum": loss_sum,
                "batches": num_batches,
                "videos": num_videos,
                "rng": capture_rng_state(generators.host, generators.device),
                **{name: stream.generator.get_state() for name, stream in task.streams.items()},
                "telemetry": step_figures,
                "report_wait_s": report_wait_s,
                "rejected": take_rejected(),  # this epoch's (the device cache's: at its load), vidray/train/rows.py
                **validated,
            }
        )
        sums = EpochSums(
            train_loss=sum(g["loss_sum"] for g in gathered) / max(sum(g["batches"] for g in gathered), 1),
            videos=sum(g["videos"] for g in gathered),
            seconds=seconds,
            lr=scheduler.get_last_lr()[-1],
            global_step=global_step,
            telemetry=gathered[0]["telemetry"],
        )
        metrics = task.epoch_metrics(epoch, gathered, sums)
        waits = [g["report_wait_s"] for g in gathered if g["report_wait_s"] is not None]
        if waits:  # the slowest rank's wait in the previous epoch's report (checkpoint included)
            metrics["last_report_wait_s"] = max(waits)
        metrics.update(newly_rejected((g["rejected"] for g in gathered), history))  # to the driver's console, once each
        history.append(metrics)
        if rank == 0:
            # To the worker's log (the console shows it with --verbose). Not print: Ray Train V2 tees a
            # worker's print into its logger, so each line reached the console twice.
            logger.info("%s", task.log_line(epoch, metrics, sums))
        reported = time.perf_counter()
        report_epoch(
            metrics,
            model=model if rank == 0 else None,
            training_state={
                "epoch": epoch,
                "global_step": global_step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": [g["rng"] for g in gathered],
                **{name: [g[name] for g in gathered] for name in task.streams},
            },
            info={
                "epoch": epoch,
                "metrics": metrics,
                "history": history,
                "data": shape.as_dict(),
                "ingest": {"placement": data.placement, "load_s": data.cache.load_seconds if data.cache else None},
                **task.checkpoint_info(metrics, gathered),
                "config": cfg.model_dump(mode="json"),
            },
            background=train.checkpoint_in_background,
        )
        report_wait_s = time.perf_counter() - reported
        if faults:
            faults.maybe_hold_for_test(epoch, context.get_experiment_name())


def workers_sharing_node(train: TrainSettings, local_world_size: int) -> int:
    """How many workers of a sweep's trials may each keep a cache in this node's memory at once: this trial's on
    the node, or as many as the node can host (:meth:`NodeShape.workers`), whichever is more. Trials side by side
    each see only their own workers: counted alone, each would take a quarter of the node. (A `vidray train` run
    counts its own workers: it alone would get a sixteenth of a 16-CPU node for one worker.)"""
    node_id = ray.get_runtime_context().get_node_id()
    resources = next((node["Resources"] for node in ray.nodes() if node["NodeID"] == node_id), {})
    return max(local_world_size, NodeShape.of(resources).workers(train))


def start_or_resume(cfg: VidrayConfig, task: Task) -> tuple[torch.nn.Module, dict[str, Any] | None, list]:
    """(model, training state or None, metric history): from the run's latest checkpoint if it has one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(cfg.train.seed)
        return task.new_model(), None, []
    with checkpoint.as_directory() as directory:
        # from_pretrained, not load_state_dict: HF may store some weights under other names
        # (VideoMAE's q_bias/v_bias), and the position table is rebuilt from config.json.
        model = task.load_model(os.path.join(directory, MODEL_DIR))
        state = load_training_state(directory)
        history = read_checkpoint_info(directory).get("history", [])
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, state, history


def seed_streams(seed: int, generators: AugmentGenerators, streams: Mapping[str, RandomStream]) -> None:
    """Seed torch, numpy, Python, augmentation and the task's own streams of one rank from ``seed``."""
    seed_everything(seed, generators.host, generators.device)
    for stream in streams.values():
        stream.generator.manual_seed(derive_seed(seed, stream.stream))


@dataclass(frozen=True)
class StepDraws:
    """Everything random a training step draws from the augmentation streams."""

    view: augment.TrainView  # from the device stream
    task: Any  # from the host stream (Task.draw)


def draw_step(task: Task, generators: AugmentGenerators, shape: ClipShape, train: TrainSettings, clips: int) -> StepDraws:
    """The draws of one micro-batch's step, in their order: the train views, then the task's."""
    view = augment.draw_train_view(clips, shape.stored_frames, shape.frames, generators.device, train.hflip)
    return StepDraws(view, task.draw(generators.host, clips))


def frame_sampler(task: Task, generators: AugmentGenerators, shape: ClipShape, train: TrainSettings) -> FrameSampler:
    """The stored frames each coming micro-batch's step will sample, for the batch builder of a compressed
    store to decode only those (vidray/train/batches.py).

    They are the draws of :func:`draw_step`, made ahead, batch after batch, on copies of the streams as
    they are now (the start of an epoch): the steps then draw the same numbers from the real streams,
    which the copies never touch, so checkpoints and resumes are those of a raw store. The step checks
    it samples the frames the batch holds (:func:`vidray.train.augment.check_decoded_frames`).
    """
    ahead = generators.copy()
    # On a GPU the copy draws there: on a stream of its own, so it does not queue behind the training step.
    side = torch.cuda.Stream(ahead.device.device) if ahead.device.device.type == "cuda" else None

    def frames(clips: int) -> np.ndarray:
        with torch.cuda.stream(side) if side is not None else contextlib.nullcontext():
            return draw_step(task, ahead, shape, train, clips).view.index.cpu().numpy()

    return frames


def step_loss(task: Task, parts: StepParts, shape: ClipShape, train: TrainSettings) -> Callable[[Batch], torch.Tensor]:
    """The loss :func:`run_epoch` takes: every task's clips go through the same train transform first."""

    def loss_of(batch: Batch) -> torch.Tensor:
        drawn = draw_step(task, parts.generators, shape, train, batch["video"].shape[0])
        if "frame_index" in batch:  # only these stored frames were decoded
            augment.check_decoded_frames(drawn.view, batch["frame_index"])
        pixels = augment.apply_train_view(batch["video"], drawn.view, size=shape.size)
        return task.loss(parts, pixels, batch, drawn.task)

    return loss_of


def gather(obj: Any) -> list[Any]:
    """``obj`` of every rank, in rank order (``[obj]`` on one worker)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def quiet_worker_logs() -> None:
    """Keep a worker's log to what a person reads: vidray's epoch and telemetry lines.

    HF's "Loading/Writing weights" bars would print every epoch, and Ray Train V2 logs every
    report with its whole metrics dict at INFO from every rank ("Reporting training result
    ..."), under a logger named after its source file; the metrics are in the run's results
    and the dashboard anyway. If Ray moves that file, its lines simply come back.
    """
    hf_logging.disable_progress_bar()
    quiet_ray_train_report_log()


def load_test_faults() -> ModuleType | None:
    """vidray/testing/faults.py when a test asked this worker for a fault, else None.

    Imported by name and only then: production workers never load test code.
    """
    if not any(name.startswith(TEST_ENV_PREFIX) for name in os.environ):
        return None
    return importlib.import_module(TEST_FAULTS_MODULE)
