"""Fine-tuning a VideoMAE classifier: the task :func:`vidray.train.loop.run_worker` runs for ``vidray train``.

Per epoch each rank trains the DDP-wrapped classifier on its shard of the train
split (clip sampling and crops from the loop's train transform, then MixUp /
CutMix and label smoothing: vidray/train/augment.py), evaluates its share of
the val split (:func:`evaluate`), and the loop's one collective brings every
rank's val confusion matrix, so the reported metrics
(:func:`vidray.train.metrics.epoch_metrics`) cover the whole val set.
The driver that starts it: vidray/train/driver.py.
"""

from __future__ import annotations

from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, ClassVar, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from vidray.data.dataset import ClipShape
from vidray.model.classifier import autocast, build_model, compile_model, load_model
from vidray.model.inference import clip_logits
from vidray.model.transforms import eval_stored_frames
from vidray.train import augment
from vidray.train.epoch import Batch, StepParts
from vidray.train.ingest import WorkerData
from vidray.train.loop import EpochSums, RandomStream, WorkerSetup, run_worker
from vidray.train.metrics import confusion_matrix, epoch_metrics
from vidray.train.optim import FINETUNE_BETAS, micro_batch_size
from vidray.train.telemetry import StepTelemetry, train_flops_per_clip


def finetune_loop_per_worker(config: dict[str, Any]) -> None:
    """What ``TorchTrainer`` runs on every worker of a fine-tuning run (vidray/train/driver.py)."""
    run_worker(config, FineTuning)


@dataclass
class FineTuning:
    """The classification task of the worker loop (:class:`vidray.train.loop.Task`)."""

    log_prefix: ClassVar[str] = "vidray"
    betas: ClassVar[tuple[float, float]] = FINETUNE_BETAS
    streams: ClassVar[Mapping[str, RandomStream]] = MappingProxyType({})  # augmentation's are all it draws

    setup: WorkerSetup
    eval_model: torch.nn.Module | None = None  # the bare model, compiled when train.compile: made at the first validation

    def new_model(self) -> torch.nn.Module:
        cfg, shape = self.setup.cfg, self.setup.shape
        return build_model(cfg.model, shape.classes, shape.frames, shape.size)

    def load_model(self, model_dir: str) -> torch.nn.Module:
        return load_model(model_dir)

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return train_flops_per_clip(model.config, self.setup.shape.frames, self.setup.shape.size)

    def draw(self, generator: torch.Generator, clips: int) -> augment.Mix | None:
        train, size = self.setup.cfg.train, self.setup.shape.size
        return augment.draw_mix(generator, height=size, width=size, mixup_alpha=train.mixup_alpha, cutmix_alpha=train.cutmix_alpha)

    def loss(self, parts: StepParts, pixels: torch.Tensor, batch: Batch, drawn: augment.Mix | None) -> torch.Tensor:
        pixels, targets = augment.apply_mix(
            pixels,
            batch["label"],
            drawn,
            num_classes=len(self.setup.shape.classes),
            label_smoothing=self.setup.cfg.train.label_smoothing,
        )
        with autocast(self.setup.device):
            logits = parts.forward(pixel_values=pixels).logits
        return augment.soft_target_cross_entropy(logits, targets)

    def validate(self, parts: StepParts, data: WorkerData) -> dict[str, Any]:
        train = self.setup.cfg.train
        if self.eval_model is None:
            self.eval_model = compile_model(parts.model) if train.compile else parts.model
        shape = self.setup.shape
        # A compressed store decodes only the stored frames the eval views read.
        frames = eval_stored_frames(shape.stored_frames, shape.frames, train.eval_clips) if shape.store != "raw" else None
        confusion, loss_sum = evaluate(
            self.eval_model, data.val_batches(frames), shape=shape, clips=train.eval_clips, device=self.setup.device,
            pad_to=micro_batch_size(train) if train.compile else None,
        )  # fmt: skip
        return {"confusion": confusion, "val_loss_sum": loss_sum}

    def epoch_metrics(self, epoch: int, gathered: list[dict[str, Any]], sums: EpochSums) -> dict[str, Any]:
        confusion = whole_confusion(gathered)
        metrics = epoch_metrics(
            epoch,
            self.setup.shape.classes,
            confusion,
            val_loss=sum(g["val_loss_sum"] for g in gathered) / max(int(confusion.sum()), 1),
            train_loss=sums.train_loss,
        )
        metrics.update(
            lr=sums.lr, global_step=sums.global_step, train_videos_per_s=sums.videos_per_s, **sums.telemetry
        )
        return metrics

    def log_line(self, epoch: int, metrics: dict[str, Any], sums: EpochSums) -> str:
        head = StepTelemetry.line(f"epoch {epoch} done", metrics["train_loss"], sums.telemetry)
        return f"{head} | val loss {metrics['val_loss']:.4f} | val macro-F1 {metrics['val_macro_f1']:.4f}"

    def checkpoint_info(self, metrics: dict[str, Any], gathered: list[dict[str, Any]]) -> dict[str, Any]:
        return {"metrics": {**metrics, "val_confusion": whole_confusion(gathered).tolist()}}


def whole_confusion(gathered: list[dict[str, Any]]) -> np.ndarray:
    """The confusion matrix of the whole val set: every rank's summed."""
    return sum(g["confusion"] for g in gathered)


def evaluate(
    model: torch.nn.Module,
    batches: Iterable[Batch],
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
