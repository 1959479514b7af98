"""One training pass over a rank's shard, for any task's loss: :func:`run_epoch`.

On a GPU the step never waits for the host: batches come from the device cache
or from pinned memory (vidray/train/ingest.py), augmentation parameters are drawn on
the device, constants and the position table live there, the loss is summed
there and read once per epoch and at telemetry log points, AdamW is fused, and
fp32 matmuls use TF32. ``train.compile`` adds torch.compile.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator

import torch

from vidray.config import TrainSettings
from vidray.train.rng import AugmentGenerators
from vidray.train.telemetry import StepTelemetry

Batch = dict[str, torch.Tensor]


@dataclass
class StepParts:
    """What a training step needs besides its batch."""

    model: torch.nn.Module  # the bare model: gradient clipping, checkpoints
    ddp_model: torch.nn.Module  # its DDP wrapper (the model itself on one worker): no_sync
    forward: torch.nn.Module  # what runs forward and backward: ddp_model, compiled when train.compile
    optimizer: torch.optim.Optimizer
    scheduler: Any
    generators: AugmentGenerators


def run_epoch(
    parts: StepParts,
    batches: Iterable[Batch],
    loss_of: Callable[[Batch], torch.Tensor],
    *,
    train: TrainSettings,
    device: torch.device,
    micro_batches: int,
    epoch: int,
    global_step: int,
    telemetry: StepTelemetry | None = None,
    after_step: Callable[[], None] | None = None,
) -> tuple[float, int, int, int]:
    """One pass over this rank's shard, ``loss_of(batch)`` (the batch on the device) the loss of a
    micro-batch (vidray.train.loop.step_loss: the task's). ``after_step`` runs after every
    optimizer step (the tests' fault hook). Returns (summed loss, batches, videos, global step).

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
            if after_step is not None:
                after_step()
        fetched = time.perf_counter()
    return float(loss_sum.item()), num_batches, num_videos, global_step  # CPU-GPU sync point: once per epoch


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
