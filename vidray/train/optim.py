"""Optimizer, learning-rate schedule and step arithmetic of a training run.

AdamW with the usual fine-tuning groups (no weight decay on biases and norms,
optional layer-wise lr decay), and Hugging Face's schedules by name
(``train.scheduler``: cosine, linear or constant, each after
``train.warmup_epochs`` of linear warm-up), stepped once per optimizer step.
"""

from __future__ import annotations

import math
import sys
from typing import Any

import torch

from vidray.config import TrainSettings
from vidray.errors import UserError

# train.scheduler -> transformers.get_scheduler's name (all of them warm up linearly first).
SCHEDULER_NAMES = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}


def micro_batch_size(train: TrainSettings) -> int:
    """Per-worker batch of one forward/backward: the global batch over workers and accumulation steps."""
    parts = train.num_workers * train.grad_accum_steps
    if train.batch_size % parts:
        raise UserError(
            f"train.batch_size={train.batch_size} is the global batch and must be divisible by "
            f"train.num_workers x train.grad_accum_steps = {parts}"
        )
    return train.batch_size // parts


def steps_per_epoch(train_videos: int, train: TrainSettings) -> tuple[int, int]:
    """(micro-batches, optimizer steps) per epoch on each worker: even split, last partial batch dropped."""
    micro_batches = (train_videos // train.num_workers) // micro_batch_size(train)
    return micro_batches, math.ceil(micro_batches / train.grad_accum_steps)


def parameter_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases and norms; lr scaled by ``layer_decay ** depth_from_top``.

    Depth: embeddings 0, encoder layer i -> i + 1, everything after the encoder
    (final norm, fc_norm, classifier) num_layers + 1. VideoMAE's position table
    is a fixed sinusoid, not a parameter, so it is never decayed or trained.
    """
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("videomae.embeddings."):
            depth = 0
        elif name.startswith("videomae.encoder.layer."):
            depth = int(name.split(".")[3]) + 1
        else:
            depth = num_layers + 1
        # mask_token: the pretraining decoder's learned placeholder (vidray/model/pretraining.py), never decayed in VideoMAE.
        decay = param.ndim > 1 and "position_embeddings" not in name and name != "mask_token"
        group = groups.setdefault(
            (depth, decay),
            {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (num_layers + 1 - depth)},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


# AdamW's betas when fine-tuning (pretraining's are vidray/pretrain/task.py's MAE_BETAS).
FINETUNE_BETAS = (0.9, 0.999)


def build_optimizer(
    model: torch.nn.Module, train: TrainSettings, device: torch.device, betas: tuple[float, float] = FINETUNE_BETAS
) -> torch.optim.AdamW:
    """AdamW over :func:`parameter_groups`; ``betas`` (0.9, 0.95) for masked-autoencoder pretraining, as VideoMAE."""
    groups = parameter_groups(model, train.weight_decay, train.layer_decay)
    for group in groups:
        group["lr"] = train.lr * group["lr_scale"]
    # Fused AdamW: one kernel for all parameters on CUDA (no per-tensor launches); the CPU has none worth it.
    return torch.optim.AdamW(groups, lr=train.lr, betas=betas, fused=device.type == "cuda")


def warn_if_warmup_fills_the_run(command: str, section: str, epochs: int, warmup_epochs: float) -> None:
    """Say so when a run is all warm-up: its learning rate would climb for every step, never reaching the peak or
    decaying. Easily done: demo.yaml's pretrain.warmup_epochs is 5, and `pretrain.epochs=2` changes one key only."""
    if warmup_epochs and warmup_epochs >= epochs:
        print(f"{command}: warning: {section}.warmup_epochs={warmup_epochs:g} is not shorter than {section}.epochs={epochs}, "
              f"so the learning rate warms up for the whole run, never reaching {section}.lr or decaying: set "
              f"{section}.warmup_epochs below {epochs}", file=sys.stderr, flush=True)


def build_lr_schedule(optimizer: torch.optim.Optimizer, train: TrainSettings, steps: int):
    """``train.scheduler`` over ``train.epochs * steps`` optimizer steps, after ``train.warmup_epochs`` of warm-up."""
    from transformers import get_scheduler

    return get_scheduler(
        SCHEDULER_NAMES[train.scheduler],
        optimizer,
        num_warmup_steps=round(train.warmup_epochs * steps),
        num_training_steps=train.epochs * steps,
    )
