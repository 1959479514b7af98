"""The training loop that runs on every Ray Train worker.

:func:`train_loop_per_worker` is what ``TorchTrainer`` runs (built by
vidray/train/driver.py). Per epoch, each rank trains a DDP-wrapped VideoMAE on its
shard of the train split (clip sampling, crops and MixUp on the device:
vidray/train/augment.py), evaluates its share of the val split, and joins one
collective that sums the val confusion matrices, so the reported metrics
cover the whole val set. Rank 0 writes the checkpoint (vidray/model/checkpoint.py);
every rank reports.

On a GPU the step never waits for the host: batches come from the device cache
or from pinned memory (vidray/train/ingest.py), augmentation parameters are drawn on
the device, constants and the position table live there, the loss is summed
there and read once per epoch and at telemetry log points, AdamW is fused, and
fp32 matmuls use TF32. ``train.compile`` adds torch.compile.

Resuming: a restarted worker group (``train.max_failures``) or a rerun with
the same ``run.name`` gets the latest checkpoint from ``ray.train.get_checkpoint()``
and continues at the next epoch with model, optimizer, schedule and every
rank's RNG state restored, so an interrupted single-worker CPU run reproduces
the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import tempfile
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import numpy as np
import ray
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from vidray.train import augment
from vidray.model.checkpoint import MODEL_DIR, host_snapshot, load_training_state, read_checkpoint_info, save_checkpoint
from vidray.compat import background_checkpoints_supported, quiet_ray_train_report_log
from vidray.config import TrainSettings, VidrayConfig
from vidray.data.dataset import ClipShape
from vidray.testing.faults import maybe_die_for_test, maybe_hold_for_test
from vidray.model.inference import clip_logits
from vidray.train.ingest import open_worker_data
from vidray.train.metrics import confusion_matrix, epoch_metrics
from vidray.model.classifier import autocast, build_model, compile_model, load_model, to_device, use_tf32
from vidray.train.optim import build_optimizer, build_lr_schedule, micro_batch_size, steps_per_epoch
from vidray.train.rng import AugmentGenerators, capture_rng_state, derive_seed, restore_rng_state, seed_everything
from vidray.train.telemetry import StepTelemetry, train_flops_per_clip

logger = logging.getLogger(__name__)


@dataclass
class StepParts:
    """What a training step needs besides its batch."""

    model: torch.nn.Module  # the bare model: gradient clipping, checkpoints
    ddp_model: torch.nn.Module  # its DDP wrapper (the model itself on one worker): no_sync
    forward: torch.nn.Module  # what runs forward and backward: ddp_model, compiled when train.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generators: AugmentGenerators


def quiet_worker_logs() -> None:
    """Keep a worker's log to what a person reads: vidray's epoch and telemetry lines.

    HF's "Loading/Writing weights" bars would print every epoch, and Ray Train V2 logs every
    report with its whole metrics dict at INFO from every rank ("Reporting training result
    ..."), under a logger named after its source file; the metrics are in the run's results
    and the dashboard anyway. If Ray moves that file, its lines simply come back.
    """
    hf_logging.disable_progress_bar()
    quiet_ray_train_report_log()


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: VidrayConfig = config["cfg"]
    shape: ClipShape = config["shape"]
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    quiet_worker_logs()
    use_tf32(device)

    model, state, history = start_or_resume(cfg, shape)
    # Every rank draws its own dropout and augmentation streams (restored below when resuming).
    generators = AugmentGenerators.for_device(device)
    seed_everything(derive_seed(train.seed, rank), generators.host, generators.device)
    to_device(model, device)  # weights and position table, once
    ddp_model = ray.train.torch.prepare_model(model)
    micro_batches, steps = steps_per_epoch(config["train_videos"], train)
    optimizer = build_optimizer(model, train, device)
    scheduler = build_lr_schedule(optimizer, train, steps)
    start_epoch, global_step = 0, 0
    if state is not None:
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world_size:
            restore_rng_state(state["rng"][rank], generators.host, generators.device)
        else:  # resumed with another worker count: fresh streams, still seeded
            seed_everything(derive_seed(train.seed, rank, start_epoch), generators.host, generators.device)

    batch_size = micro_batch_size(train)
    data = open_worker_data(
        train,
        shape.stored_video_shape,
        batch_size=batch_size,
        train_videos=config["train_videos"],
        val_videos=config.get("val_videos", 0),
        device=device,
        rank=rank,
        world_size=world_size,
        local_world_size=context.get_local_world_size(),
    )
    if rank == 0 and data.cache is not None:
        logger.info(
            "vidray: every worker holds its shard on its %s (%d train + %d val videos on rank 0, %.2f GiB, copied in %.1f s)",
            device.type, data.cache.train_videos.shape[0], data.cache.val_videos.shape[0],
            data.cache.nbytes / 2**30, data.cache.load_seconds,
        )  # fmt: skip
    parts = StepParts(
        model, ddp_model, compile_model(ddp_model) if train.compile else ddp_model, optimizer, scheduler, generators
    )
    eval_model = compile_model(model) if train.compile else model
    telemetry = StepTelemetry(
        flops_per_clip=train_flops_per_clip(model.config, shape.frames, shape.size),
        world_size=world_size,
        device=device,
        log_every=train.log_every_steps,
        console=rank == 0,
        printer=logger.info,
    )
    report_wait_s = None  # how long this rank waited in the previous epoch's report

    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        loss_sum, num_batches, num_videos, global_step = train_one_epoch(
            parts, data.train_batches(epoch), shape=shape, train=train, device=device,
            micro_batches=micro_batches, epoch=epoch, global_step=global_step,
            telemetry=telemetry, rank=rank, world_size=world_size,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        step_figures = telemetry.end_epoch()
        val_confusion, val_loss_sum = evaluate(
            eval_model, data.val_batches(), shape=shape, clips=train.eval_clips, device=device,
            pad_to=batch_size if train.compile else None,
        )  # fmt: skip

        # One collective per epoch: per-rank sums, the rank's confusion matrix, its RNG state and timings.
        gathered = _gather(
            {
                "loss_sum": loss_sum,
                "batches": num_batches,
                "videos": num_videos,
                "confusion": val_confusion,
                "val_loss_sum": val_loss_sum,
                "rng": capture_rng_state(generators.host, generators.device),
                "telemetry": step_figures,
                "report_wait_s": report_wait_s,
            }
        )
        confusion = sum(g["confusion"] for g in gathered)  # the whole validation set
        metrics = epoch_metrics(
            epoch,
            shape.classes,
            confusion,
            val_loss=sum(g["val_loss_sum"] for g in gathered) / max(int(confusion.sum()), 1),
            train_loss=sum(g["loss_sum"] for g in gathered) / max(sum(g["batches"] for g in gathered), 1),
        )
        metrics.update(
            lr=scheduler.get_last_lr()[-1],
            global_step=global_step,
            train_videos_per_s=sum(g["videos"] for g in gathered) / max(train_seconds, 1e-9),
            **gathered[0]["telemetry"],  # rank 0's step telemetry of the epoch
        )
        waits = [g["report_wait_s"] for g in gathered if g["report_wait_s"] is not None]
        if waits:  # the slowest rank's wait in the previous epoch's report (checkpoint included)
            metrics["last_report_wait_s"] = max(waits)
        history.append(metrics)
        if rank == 0:
            # To the worker's log (the console shows it with --verbose). Not print: Ray Train V2 tees a
            # worker's print into its logger, so each line reached the console twice.
            logger.info(
                "%s | val loss %.4f | val macro-F1 %.4f",
                StepTelemetry.line(f"epoch {epoch} done", metrics["train_loss"], step_figures),
                metrics["val_loss"], metrics["val_macro_f1"],
            )  # fmt: skip
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
            },
            info={
                "epoch": epoch,
                "metrics": {**metrics, "val_confusion": confusion.tolist()},
                "history": history,
                "data": shape.as_dict(),
                "ingest": {"placement": data.placement, "load_s": data.cache.load_seconds if data.cache else None},
                "config": cfg.model_dump(mode="json"),
            },
            background=train.checkpoint_in_background,
        )
        report_wait_s = time.perf_counter() - reported
        maybe_hold_for_test(epoch, context.get_experiment_name())


def start_or_resume(
    cfg: VidrayConfig,
    shape: ClipShape,
    *,
    build: Callable[[], torch.nn.Module] | None = None,
    load: Callable[[str], torch.nn.Module] = load_model,
) -> tuple[torch.nn.Module, dict[str, Any] | None, list]:
    """(model, training state or None, metric history): from the run's latest checkpoint if it has one.

    ``build`` makes a new model (default: the classifier of ``cfg.model``), ``load`` reads a
    checkpoint's ``model/``; vidray/pretrain/run.py passes the pretraining model's pair.
    """
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(cfg.train.seed)
        if build is None:
            return build_model(cfg.model, shape.classes, shape.frames, shape.size), None, []
        return build(), None, []
    with checkpoint.as_directory() as directory:
        # from_pretrained, not load_state_dict: HF may store some weights under other names
        # (VideoMAE's q_bias/v_bias), and the position table is rebuilt from config.json.
        model = load(os.path.join(directory, MODEL_DIR))
        state = load_training_state(directory)
        history = read_checkpoint_info(directory).get("history", [])
    if cfg.model.gradient_checkpointing:
        model.activation_checkpointing_enable()
    return model, state, history


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def train_one_epoch(
    parts: StepParts,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    shape: ClipShape,
    train: TrainSettings,
    device: torch.device,
    micro_batches: int,
    epoch: int,
    global_step: int,
    telemetry: StepTelemetry | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int, int, int]:
    """One fine-tuning pass over this rank's shard (:func:`run_epoch` with the classification loss).
    Returns (summed loss, batches, videos, global step)."""

    def classification_loss(batch: dict[str, torch.Tensor]) -> torch.Tensor:
        pixels = augment.train_transform(
            batch["video"], frames=shape.frames, size=shape.size, generator=parts.generators.device, hflip=train.hflip
        )
        pixels, targets = augment.mix_batch(
            pixels,
            batch["label"],
            num_classes=len(shape.classes),
            generator=parts.generators.host,
            mixup_alpha=train.mixup_alpha,
            cutmix_alpha=train.cutmix_alpha,
            label_smoothing=train.label_smoothing,
        )
        with autocast(device):
            logits = parts.forward(pixel_values=pixels).logits
        return augment.soft_target_cross_entropy(logits, targets)

    return run_epoch(
        parts, batches, classification_loss, train=train, device=device, micro_batches=micro_batches,
        epoch=epoch, global_step=global_step, telemetry=telemetry, rank=rank, world_size=world_size,
    )  # fmt: skip


def run_epoch(
    parts: StepParts,
    batches: Iterable[dict[str, torch.Tensor]],
    loss_of: Callable[[dict[str, torch.Tensor]], torch.Tensor],
    *,
    train: TrainSettings,
    device: torch.device,
    micro_batches: int,
    epoch: int,
    global_step: int,
    telemetry: StepTelemetry | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> tuple[float, int, int, int]:
    """One pass over this rank's shard, ``loss_of(batch)`` (the batch on the device) the loss of a
    micro-batch: fine-tuning's (:func:`train_one_epoch`) or pretraining's (vidray/pretrain/run.py).
    Returns (summed loss, batches, videos, global step).

    Gradient accumulation (DDP syncs only on a group's last micro-batch), clipping, one
    scheduler step per optimizer step. The loss is summed on the device and read back
    once, at the end (and at telemetry log points): no host-device synchronisation per step.
    """
    parts.forward.train()
    distributed = isinstance(parts.ddp_model, torch.nn.parallel.DistributedDataParallel)
    accum = train.grad_accum_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    num_batches = num_videos = group_videos = 0
    last_read = {"sum": 0.0, "batches": 0}

    def read_loss() -> float:
        """Mean loss of the micro-batches since the last read (a device read: telemetry log points only)."""
        total = float(loss_sum.item())
        mean = (total - last_read["sum"]) / max(num_batches - last_read["batches"], 1)
        last_read.update(sum=total, batches=num_batches)
        return mean

    if telemetry is not None:
        telemetry.start_epoch(epoch)
    fetched = time.perf_counter()
    for index, (batch, is_last) in enumerate(_with_last(batches)):
        ends_group = is_last or (index + 1) % accum == 0
        # The last group of an epoch may be short: average over the micro-batches it really has.
        group_size = min(accum, max(micro_batches - (index - index % accum), 1))
        batch = {key: value.to(device, non_blocking=True) for key, value in batch.items()}
        if telemetry is not None:
            telemetry.waited(time.perf_counter() - fetched)
        # DDP all-reduces gradients only on the micro-batch that ends an accumulation group.
        sync = parts.ddp_model.no_sync() if distributed and not ends_group else contextlib.nullcontext()
        with sync:
            loss = loss_of(batch)
            (loss / group_size).backward()
        loss_sum += loss.detach()
        clips = batch["video"].shape[0]
        num_batches += 1
        num_videos += clips
        group_videos += clips
        if ends_group:
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(parts.model.parameters(), train.max_grad_norm)
            parts.optimizer.step()
            parts.scheduler.step()
            parts.optimizer.zero_grad(set_to_none=True)
            global_step += 1
            if telemetry is not None:
                telemetry.stepped(global_step, group_videos, read_loss)
            group_videos = 0
            maybe_die_for_test(epoch, rank, world_size)
        fetched = time.perf_counter()
    return float(loss_sum.item()), num_batches, num_videos, global_step  # CPU-GPU sync point: once per epoch


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    *,
    shape: ClipShape,
    clips: int,
    device,
    pad_to: int | None = None,
) -> tuple[np.ndarray, float]:
    """(confusion matrix, summed cross-entropy) of ``batches``.

    Runs the bare model, not the DDP wrapper: no collectives, so ranks may
    evaluate different numbers of videos. ``pad_to``: pad a smaller batch (the
    split's last) with blank videos to this size and drop their logits, so a
    compiled model sees one shape (the model has no batch statistics: padding
    changes no other video's logits).
    """
    model.eval()
    y_true, y_pred = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        videos, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        count = videos.shape[0]
        if pad_to is not None and count < pad_to:
            videos = torch.cat([videos, videos.new_zeros((pad_to - count, *videos.shape[1:]))])
        logits = clip_logits(model, videos, frames=shape.frames, size=shape.size, clips=clips)[:count]
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        y_true.append(labels)
        y_pred.append(logits.argmax(-1))
    if not y_true:
        return confusion_matrix([], [], len(shape.classes)), 0.0
    y_true_host, y_pred_host = torch.cat(y_true).cpu(), torch.cat(y_pred).cpu()  # one sync for the split
    return confusion_matrix(y_true_host.numpy(), y_pred_host.numpy(), len(shape.classes)), float(loss_sum.item())


_previous_write = threading.Event()
_previous_write.set()
# How long a snapshot waits for the previous epoch's write (which bounds host memory to two snapshots).
PENDING_WRITE_WAIT_S = 300


def report_epoch(
    metrics: dict[str, Any], *, model, training_state: dict[str, Any], info: dict[str, Any], background: bool = False
) -> None:
    """Every rank reports (it is a barrier); rank 0, the one given ``model``, attaches the checkpoint.

    ``background``: rank 0 only copies model and training state to host memory
    here (:func:`vidray.model.checkpoint.host_snapshot`) and hands Ray a function that
    writes and uploads them; Ray runs it on its checkpoint-upload thread while
    training goes on, and registers the checkpoint (the one a restart resumes
    from) only when it has returned. At most one such write is pending: the
    next snapshot waits for it. Otherwise the files are written and uploaded
    before the report returns, as every rank waits.
    """
    name = f"checkpoint_epoch_{metrics['epoch']:04d}"
    if background and not background_checkpoints_supported():
        _warn_once(f"ray {ray.__version__} is not one vidray checked background checkpoints with; writing them in line")
        background = False
    if not background:
        with tempfile.TemporaryDirectory(prefix="vidray-ckpt-") as directory:
            checkpoint = None
            if model is not None:
                save_checkpoint(directory, model, training_state=training_state, info=info)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        return

    from ray.train import CheckpointUploadMode

    if model is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        return
    if not _previous_write.wait(timeout=PENDING_WRITE_WAIT_S):
        _warn_once(f"the previous epoch's checkpoint is still being written after {PENDING_WRITE_WAIT_S} s; not waiting for it")
    snapshot = host_snapshot({"model": model.state_dict(), "training_state": training_state})
    info = json.loads(json.dumps(info, default=str))  # the history list grows while this is written
    storage = ray.train.get_context().get_storage()
    written = threading.Event()

    def write_and_upload(checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str) -> ray.train.Checkpoint:
        try:
            save_checkpoint(
                checkpoint.path, model, training_state=snapshot["training_state"], info=info, model_state=snapshot["model"]
            )
            return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        finally:
            written.set()

    _set_previous_write(written)
    # Ray deletes this directory once the upload has returned (delete_local_checkpoint_after_upload).
    directory = tempfile.mkdtemp(prefix="vidray-ckpt-")
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        checkpoint_upload_fn=write_and_upload,
    )


def _set_previous_write(event: threading.Event) -> None:
    global _previous_write
    _previous_write = event


_warned: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _warned:
        _warned.add(message)
        warnings.warn(message, RuntimeWarning, stacklevel=3)
