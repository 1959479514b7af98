"""The one inference step: stored uint8 clips in, clip-averaged logits out.

Epoch evaluation (vidray/train.py), ``vidray evaluate`` and ``vidray predict``
all call :func:`clip_logits`, so a video gets the same logits in all three:
``eval_clips`` evenly spaced clips of ``frames`` frames, an exact centre crop
to ``size`` (vidray.augment.eval_transform), bf16 autocast on CUDA, logits
averaged over a video's clips in float32.
"""

from __future__ import annotations

import torch

from vidray import augment
from vidray.model import autocast


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def clip_logits(
    model: torch.nn.Module,
    videos: torch.Tensor,
    *,
    frames: int,
    size: int,
    clips: int = 1,
    shuffle: torch.Generator | None = None,
) -> torch.Tensor:
    """uint8 ``[B, stored_frames, S, S, 3]`` (on the model's device) -> float32 logits ``[B, K]``.

    ``shuffle``: put each clip's frames in a random order drawn from this
    generator (the frame-order control: what is left once time is gone).
    """
    pixels = augment.eval_transform(videos, frames=frames, size=size, clips=clips)
    if shuffle is not None:
        pixels = augment.shuffle_frames(pixels, shuffle)
    with autocast(videos.device):
        logits = model(pixel_values=pixels).logits
    return augment.average_clip_logits(logits.float(), clips)
