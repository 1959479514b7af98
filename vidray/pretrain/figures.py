"""What a pretraining run draws (PNG, bare matplotlib ``Figure`` objects on Agg, as vidray/report/data_figures.py).

* ``pretrain_reconstruction.png``: a few clips the encoder was not pretrained on,
  each as three rows over a few of its frames: the masked input the encoder
  sees (hidden tubes grey), the reconstruction (the decoder's prediction in the
  hidden tubes, the visible patches pasted back, as in MAE's figures), the original.
* ``pretrain_loss.png``: the reconstruction loss per epoch.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from matplotlib.figure import Figure

from vidray.model import transforms

HIDDEN_GREY = 0.5
FRAMES_SHOWN = 4


def _patchify(frames: torch.Tensor, tubelet: int, patch: int) -> torch.Tensor:
    """``[B, T, C, H, W]`` -> ``[B, tokens, tubelet * patch * patch, C]``, tokens in (t, h, w) order, as VideoMAE."""
    batch, time, channels, height, width = frames.shape
    grid = frames.view(batch, time // tubelet, tubelet, channels, height // patch, patch, width // patch, patch)
    grid = grid.permute(0, 1, 4, 6, 2, 5, 7, 3)  # [B, T', H', W', tubelet, patch, patch, C]
    return grid.reshape(batch, -1, tubelet * patch * patch, channels)


def _unpatchify(patches: torch.Tensor, time: int, size: int, tubelet: int, patch: int) -> torch.Tensor:
    """Inverse of :func:`_patchify`, to ``[B, T, H, W, C]`` (channels last, for imshow)."""
    batch, channels = patches.shape[0], patches.shape[-1]
    side = size // patch
    grid = patches.view(batch, time // tubelet, side, side, tubelet, patch, patch, channels)
    return grid.permute(0, 1, 4, 2, 5, 3, 6, 7).reshape(batch, time, size, size, channels)


@torch.no_grad()
def reconstruct(model, pixel_values: torch.Tensor, mask: torch.Tensor) -> dict[str, np.ndarray]:
    """``masked``, ``reconstruction`` and ``original`` clips, float ``[B, T, S, S, 3]`` in 0..1.

    ``pixel_values``: normalised ``[B, T, 3, S, S]`` (vidray.train.augment); ``mask``: the tube mask.
    With ``norm_pix_loss`` the decoder predicts each hidden patch normalised by its own
    mean and std; they are undone with the true patch's statistics (MAE's visualisation).
    """
    model.eval()
    config = model.config
    tubelet, patch = config.tubelet_size, config.patch_size
    batch, time, _, size, _ = pixel_values.shape
    prediction = model(pixel_values=pixel_values, bool_masked_pos=mask).logits.float()
    mean = torch.tensor(transforms.MEAN)[None, None, :, None, None]
    std = torch.tensor(transforms.STD)[None, None, :, None, None]
    original = _patchify(pixel_values.float().cpu() * std + mean, tubelet, patch)  # 0..1
    predicted = prediction.cpu().reshape(batch, -1, tubelet * patch * patch, original.shape[-1])
    mask = mask.cpu()
    if config.norm_pix_loss:
        hidden = original[mask].reshape(predicted.shape)
        centre = hidden.mean(dim=-2, keepdim=True)
        spread = hidden.var(dim=-2, unbiased=True, keepdim=True).sqrt() + 1e-6
        predicted = predicted * spread + centre
    reconstruction = original.clone()
    reconstruction[mask] = predicted.reshape(-1, *predicted.shape[2:])
    masked = original.clone()
    masked[mask] = HIDDEN_GREY
    clips = {"masked": masked, "reconstruction": reconstruction, "original": original}
    return {
        name: _unpatchify(value, time, size, tubelet, patch).clamp(0, 1).numpy() for name, value in clips.items()
    }


def plot_reconstructions(clips: dict[str, np.ndarray], video_ids: list[str], title: str, path: Path) -> Path:
    """Three rows per clip (masked, reconstruction, original) over :data:`FRAMES_SHOWN` evenly spaced frames."""
    rows = ("masked", "reconstruction", "original")
    count, time = clips["original"].shape[:2]
    shown = np.unique(np.linspace(0, time - 1, min(FRAMES_SHOWN, time)).round().astype(int))
    fig = Figure(figsize=(1.5 * len(shown) + 1.6, 1.5 * len(rows) * count + 0.8), layout="constrained")
    axes = fig.subplots(len(rows) * count, len(shown), squeeze=False)
    for clip in range(count):
        for r, name in enumerate(rows):
            for c, frame in enumerate(shown):
                ax = axes[clip * len(rows) + r, c]
                ax.imshow(clips[name][clip, frame], interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if clip == 0 and r == 0:
                    ax.set_title(f"frame {frame + 1}/{time}", fontsize=9)
                if c == 0:
                    label = f"{video_ids[clip].rsplit('/', 1)[-1]}\n{name}" if r == 0 else name
                    ax.set_ylabel(label, fontsize=8)
    fig.suptitle(title, fontsize=10)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def plot_loss_curve(history: list[dict[str, Any]], title: str, path: Path) -> Path:
    epochs = [h["epoch"] + 1 for h in history]
    fig = Figure(figsize=(7.0, 4.0), layout="constrained")
    ax = fig.add_subplot()
    ax.plot(epochs, [h["train_loss"] for h in history], marker="o" if len(epochs) <= 30 else None, color="#4C72B0")
    ax.set_xlabel("epoch")
    ax.set_ylabel("reconstruction loss (MSE of the hidden patches)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.set_axisbelow(True)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path
