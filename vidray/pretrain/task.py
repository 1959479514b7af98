"""Masked-autoencoder pretraining: the task :func:`vidray.train.loop.run_worker` runs for ``vidray pretrain``.

Self-supervised: each clip, after the loop's train transform (temporal jitter,
random resized crops, flips; no MixUp), is seen with ``pretrain.mask_ratio`` of
its patch positions hidden in every frame (tube masks, vidray/model/masking.py),
and ``VideoMAEForPreTraining`` learns to reconstruct the hidden pixels. Labels
are never read and nothing is validated. AdamW uses VideoMAE's betas (0.9, 0.95);
the masks come from their own random stream, saved per rank in every checkpoint
with the others, so a resumed run draws the masks, crops and batches the
interrupted one would have. The checkpoint holds the whole model (encoder and
decoder) and the masking it trained with. The driver: vidray/pretrain/driver.py.
"""

from __future__ import annotations

from typing import Any

import torch

from vidray.model.classifier import autocast, token_grid
from vidray.model.masking import masked_positions, tube_mask
from vidray.model.pretraining import build_pretraining_model, load_pretraining_model
from vidray.train.epoch import Batch, StepParts
from vidray.train.ingest import WorkerData
from vidray.train.loop import EpochSums, RandomStream, WorkerSetup, run_worker
from vidray.train.telemetry import transformer_layer_flops

# AdamW betas of VideoMAE's (and MAE's) pretraining: a shorter second-moment memory than fine-tuning's 0.999.
MAE_BETAS = (0.9, 0.95)
# seed_everything() seeds the augmentation generators with derive_seed(seed, 1) and (seed, 2); the masks use 3.
MASK_STREAM = 3


def pretrain_loop_per_worker(config: dict[str, Any]) -> None:
    """What ``TorchTrainer`` runs on every worker of a pretraining run (vidray/pretrain/driver.py).
    ``config["cfg"]`` is :func:`vidray.pretrain.driver.as_pretraining`'s: its ``train`` holds pretrain's
    optimisation settings."""
    run_worker(config, Pretraining)


class Pretraining:
    """The masked-reconstruction task of the worker loop (:class:`vidray.train.loop.Task`)."""

    log_prefix = "vidray pretrain"
    betas = MAE_BETAS

    def __init__(self, setup: WorkerSetup) -> None:
        self.setup = setup
        self.pretrain = setup.cfg.pretrain
        # Masks from their own stream, on the device that trains.
        self.streams = {"mask_rng": RandomStream(torch.Generator(device=setup.device), MASK_STREAM)}
        self.grid: tuple[int, int, int] = (0, 0, 0)  # the model's token grid (time, height, width), once it has one

    def new_model(self) -> torch.nn.Module:
        cfg, shape = self.setup.cfg, self.setup.shape
        return self._adopt(build_pretraining_model(cfg.model, cfg.pretrain, shape.frames, shape.size))

    def load_model(self, model_dir: str) -> torch.nn.Module:
        return self._adopt(load_pretraining_model(model_dir))

    def _adopt(self, model: torch.nn.Module) -> torch.nn.Module:
        self.grid = token_grid(model.config)
        # The decoder's sinusoid table is a plain attribute, which Module.to() leaves behind: on the
        # device, HF's per-forward copy stays there (the loop's to_device moves the rest).
        model.position_embeddings = model.position_embeddings.to(self.setup.device)
        return model

    def flops_per_clip(self, model: torch.nn.Module) -> float:
        return pretraining_flops_per_clip(model.config, self.pretrain.mask_ratio)

    def draw(self, generator: torch.Generator, clips: int) -> None:
        return None  # the masks come from their own stream, drawn in the step

    def loss(self, parts: StepParts, pixels: torch.Tensor, batch: Batch, drawn: None) -> torch.Tensor:
        """The reconstruction loss. Unlike fine-tuning's step, not free of host syncs on CUDA:
        VideoMAEForPreTraining selects visible and hidden tokens by boolean indexing."""
        mask = tube_mask(pixels.shape[0], self.grid, self.pretrain.mask_ratio, self.streams["mask_rng"].generator)
        with autocast(self.setup.device):
            return parts.forward(pixel_values=pixels, bool_masked_pos=mask).loss

    def validate(self, parts: StepParts, data: WorkerData) -> dict[str, Any]:
        return {}  # no labels, no val split: the loss is the measure

    def epoch_metrics(self, epoch: int, gathered: list[dict[str, Any]], sums: EpochSums) -> dict[str, Any]:
        return {
            "epoch": epoch,
            "train_loss": sums.train_loss,
            "lr": sums.lr,
            "global_step": sums.global_step,
            "train_videos": sums.videos,
            "train_videos_per_s": sums.videos_per_s,
            "epoch_seconds": sums.seconds,
            **sums.telemetry,
        }

    def log_line(self, epoch: int, metrics: dict[str, Any], sums: EpochSums) -> str:
        return (
            f"vidray pretrain: epoch {epoch + 1}/{self.setup.cfg.train.epochs}  loss {metrics['train_loss']:.4f}  "
            f"{metrics['train_videos_per_s']:.1f} clips/s  lr {metrics['lr']:.2e}"
        )

    def checkpoint_info(self, metrics: dict[str, Any], gathered: list[dict[str, Any]]) -> dict[str, Any]:
        time_steps, height, width = self.grid
        ratio = self.pretrain.mask_ratio
        hidden = time_steps * masked_positions(height * width, ratio)
        return {"masking": {"token_grid": list(self.grid), "mask_ratio": ratio, "hidden_tokens_per_clip": hidden}}


def pretraining_flops_per_clip(config, mask_ratio: float) -> float:
    """Model FLOPs of one pretraining clip (forward + backward = 3 x forward, as the fine-tuning telemetry):
    patch embedding of every token, the encoder on the visible ones, the decoder on all, its head on the hidden."""
    time_steps, height, width = token_grid(config)
    tokens = time_steps * height * width
    hidden = time_steps * masked_positions(height * width, mask_ratio)
    patch_pixels = 3 * config.tubelet_size * config.patch_size**2
    d, dd = config.hidden_size, config.decoder_hidden_size
    forward = (
        2 * tokens * patch_pixels * d
        + config.num_hidden_layers * transformer_layer_flops(tokens - hidden, d, config.intermediate_size)
        + 2 * (tokens - hidden) * d * dd  # encoder_to_decoder
        + config.decoder_num_hidden_layers * transformer_layer_flops(tokens, dd, config.decoder_intermediate_size)
        + 2 * hidden * dd * patch_pixels
    )
    return 3.0 * forward
