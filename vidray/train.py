"""The training loop that runs on every Ray Train worker.

:func:`train_loop_per_worker` is what ``TorchTrainer`` runs (built by
vidray/trainer.py). Per epoch, each rank trains a DDP-wrapped VideoMAE on its
shard of the train split (clip sampling, crops and MixUp on the device:
vidray/augment.py), evaluates its share of the val split, and joins one
collective that sums the val confusion matrices, so the reported metrics
cover the whole val set. Rank 0 writes the checkpoint (vidray/checkpoint.py);
every rank reports.

Resuming: a restarted worker group (``train.max_failures``) or a rerun with
the same ``run.name`` gets the latest checkpoint from ``ray.train.get_checkpoint()``
and continues at the next epoch with model, optimizer, schedule and every
rank's RNG state restored, so an interrupted single-worker CPU run reproduces
the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
import time
from typing import Any, Iterable, Iterator

import numpy as np
import ray.train
import ray.train.torch
import torch
import torch.distributed as dist
import torch.nn.functional as F
from transformers.utils import logging as hf_logging

from vidray import augment
from vidray.checkpoint import MODEL_DIR, load_training_state, read_checkpoint_info, save_checkpoint
from vidray.config import TrainConfig, VidrayConfig
from vidray.dataset import ClipShape
from vidray.faults import maybe_die_for_test
from vidray.inference import clip_logits
from vidray.ingest import VideoBatchCollate, train_batches, val_batches
from vidray.metrics import confusion_matrix, epoch_metrics
from vidray.model import autocast, build_model, load_model
from vidray.optim import build_optimizer, build_scheduler, micro_batch_size, steps_per_epoch
from vidray.rng import capture_rng_state, derive_seed, restore_rng_state, seed_everything


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: VidrayConfig = config["cfg"]
    shape: ClipShape = config["shape"]
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    hf_logging.disable_progress_bar()  # a "Loading/Writing weights" bar per epoch only clutters worker logs

    model, state, history = start_or_resume(cfg, shape)
    # Every rank draws its own dropout and augmentation streams (restored below when resuming).
    generator = torch.Generator()
    seed_everything(derive_seed(train.seed, rank), generator)
    ddp_model = ray.train.torch.prepare_model(model)
    micro_batches, steps = steps_per_epoch(config["train_videos"], train)
    optimizer = build_optimizer(model, train, device)
    scheduler = build_scheduler(optimizer, train, steps)
    start_epoch, global_step = 0, 0
    if state is not None:
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world_size:
            restore_rng_state(state["rng"][rank], generator)
        else:  # resumed with another worker count: fresh streams, still seeded
            seed_everything(derive_seed(train.seed, rank, start_epoch), generator)

    collate = VideoBatchCollate(shape.stored_video_shape)
    batch_size = micro_batch_size(train)
    train_shard = ray.train.get_dataset_shard("train")
    val = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        batches = train_batches(train_shard, batch_size=batch_size, train=train, epoch=epoch, rank=rank, collate=collate)
        loss_sum, num_batches, num_videos, global_step = train_one_epoch(
            ddp_model, model, batches, optimizer, scheduler, generator,
            shape=shape, train=train, device=device, micro_batches=micro_batches,
            epoch=epoch, global_step=global_step,
        )  # fmt: skip
        train_seconds = time.perf_counter() - started
        val_confusion, val_loss_sum = evaluate(
            model, val_batches(val, batch_size=batch_size, rank=rank, world_size=world_size,
                               prefetch_batches=train.prefetch_batches, collate=collate),
            shape=shape, clips=train.eval_clips, device=device,
        )  # fmt: skip

        # One collective per epoch: per-rank sums, the rank's confusion matrix and its RNG state.
        gathered = _gather(
            {
                "loss_sum": loss_sum,
                "batches": num_batches,
                "videos": num_videos,
                "confusion": val_confusion,
                "val_loss_sum": val_loss_sum,
                "rng": capture_rng_state(generator),
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
        )
        history.append(metrics)
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
                "config": cfg.model_dump(mode="json"),
            },
        )


def start_or_resume(cfg: VidrayConfig, shape: ClipShape) -> tuple[torch.nn.Module, dict[str, Any] | None, list]:
    """(model, training state or None, metric history): from the run's latest checkpoint if it has one."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(cfg.train.seed)
        return build_model(cfg.model, shape.classes, shape.frames, shape.size), None, []
    with checkpoint.as_directory() as directory:
        # from_pretrained, not load_state_dict: HF may store some weights under other names
        # (VideoMAE's q_bias/v_bias), and the position table is rebuilt from config.json.
        model = load_model(os.path.join(directory, MODEL_DIR))
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
    ddp_model: torch.nn.Module,
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    generator: torch.Generator,
    *,
    shape: ClipShape,
    train: TrainConfig,
    device: torch.device,
    micro_batches: int,
    epoch: int,
    global_step: int,
) -> tuple[float, int, int, int]:
    """One pass over this rank's shard. Returns (summed loss, batches, videos, global step)."""
    ddp_model.train()
    distributed = isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
    context = ray.train.get_context()
    accum = train.grad_accum_steps
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)  # summed on the device: no host sync per step
    num_batches = num_videos = 0
    for index, (batch, is_last) in enumerate(_with_last(batches)):
        ends_group = is_last or (index + 1) % accum == 0
        # The last group of an epoch may be short: average over the micro-batches it really has.
        group_size = min(accum, max(micro_batches - (index - index % accum), 1))
        videos, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        pixels = augment.train_transform(
            videos, frames=shape.frames, size=shape.size, generator=generator, hflip=train.hflip
        )
        pixels, targets = augment.mix_batch(
            pixels,
            labels,
            num_classes=len(shape.classes),
            generator=generator,
            mixup_alpha=train.mixup_alpha,
            cutmix_alpha=train.cutmix_alpha,
            label_smoothing=train.label_smoothing,
        )
        # DDP all-reduces gradients only on the micro-batch that ends an accumulation group.
        sync = ddp_model.no_sync() if distributed and not ends_group else contextlib.nullcontext()
        with sync:
            with autocast(device):
                logits = ddp_model(pixel_values=pixels).logits
            loss = augment.soft_target_cross_entropy(logits, targets)
            (loss / group_size).backward()
        loss_sum += loss.detach()
        num_batches += 1
        num_videos += labels.shape[0]
        if ends_group:
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            maybe_die_for_test(epoch, context.get_world_rank(), context.get_world_size())
    return float(loss_sum.item()), num_batches, num_videos, global_step  # CPU-GPU sync point: once per epoch


def evaluate(
    model: torch.nn.Module, batches: Iterable[dict[str, torch.Tensor]], *, shape: ClipShape, clips: int, device
) -> tuple[np.ndarray, float]:
    """(confusion matrix, summed cross-entropy) of ``batches``.

    Runs the bare model, not the DDP wrapper: no collectives, so ranks may
    evaluate different numbers of videos.
    """
    model.eval()
    y_true, y_pred = [], []
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    for batch in batches:
        videos, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        logits = clip_logits(model, videos, frames=shape.frames, size=shape.size, clips=clips)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum")
        y_true.append(labels)
        y_pred.append(logits.argmax(-1))
    if not y_true:
        return confusion_matrix([], [], len(shape.classes)), 0.0
    y_true_host, y_pred_host = torch.cat(y_true).cpu(), torch.cat(y_pred).cpu()  # one sync for the split
    return confusion_matrix(y_true_host.numpy(), y_pred_host.numpy(), len(shape.classes)), float(loss_sum.item())


def report_epoch(metrics: dict[str, Any], *, model, training_state: dict[str, Any], info: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0, the one given ``model``, attaches the checkpoint."""
    with tempfile.TemporaryDirectory(prefix="vidray-ckpt-") as directory:
        checkpoint = None
        if model is not None:
            save_checkpoint(directory, model, training_state=training_state, info=info)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:04d}"
        )
