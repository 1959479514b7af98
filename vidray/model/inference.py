"""The one inference step: stored uint8 clips in, view-averaged logits out.

Epoch evaluation (vidray/train/finetune.py), ``vidray evaluate``, the sweep's held-out
test and both ``vidray predict`` modes all call :func:`clip_outputs` (or its
logits-only form :func:`clip_logits`), so a video gets the same logits in all
of them. A video is seen through :class:`Views`: ``clips`` evenly spaced
temporal clips of ``frames`` frames times ``crops`` spatial crops of ``size``
pixels (1: the exact centre; 3: left, centre, right), bf16 autocast on CUDA,
logits averaged over a video's views in float32.

The default, 1 crop and the checkpoint's ``train.eval_clips`` clips, is the
view training validated with, so evaluation reproduces the ``val_*`` numbers.
Published VideoMAE / K400 / COIN numbers use several clips x 3 crops; there
the crops are taken from the whole short-side-resized frame, here from the
stored square (``stored_size``, 8/7 of ``size`` by default), so the three
crops overlap more than in the papers.
"""

from __future__ import annotations

import torch

from vidray.model import transforms
from vidray.model.classifier import autocast
from vidray.model.views import Views


def inference_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@torch.no_grad()
def clip_outputs(
    model: torch.nn.Module,
    videos: torch.Tensor,
    *,
    frames: int,
    size: int,
    views: Views = Views(),
    shuffle: torch.Generator | None = None,
    features: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 ``[B, stored_frames, S, S, 3]`` (on the model's device) -> (float32 logits ``[B, K]``,
    float32 pooled encoder features ``[B, H]`` or None), each averaged over the video's views.

    The features are what the classification head reads (VideoMAE: the layer-normed mean
    of the last hidden states), so they carry whatever the fine-tuning taught the encoder.
    ``shuffle``: put each clip's frames in a random order drawn from this generator (the
    frame-order control: what is left once time is gone).
    """
    pixels = transforms.eval_transform(videos, frames=frames, size=size, clips=views.clips, crops=views.crops)
    if shuffle is not None:
        pixels = transforms.shuffle_frames(pixels, shuffle)
    pooled: list[torch.Tensor] = []
    hook = None
    if features:
        hook = model.classifier.register_forward_hook(lambda _m, args, _out: pooled.append(args[0]))
    try:
        with autocast(videos.device):
            logits = model(pixel_values=pixels).logits
    finally:
        if hook is not None:
            hook.remove()
    averaged = transforms.average_clip_logits(logits.float(), views.count)
    return averaged, (transforms.average_clip_logits(pooled[0].float(), views.count) if features else None)


def clip_logits(
    model: torch.nn.Module,
    videos: torch.Tensor,
    *,
    frames: int,
    size: int,
    clips: int = 1,
    crops: int = 1,
    shuffle: torch.Generator | None = None,
) -> torch.Tensor:
    """:func:`clip_outputs`' logits for ``clips`` x ``crops`` views."""
    logits, _ = clip_outputs(model, videos, frames=frames, size=size, views=Views(clips, crops), shuffle=shuffle)
    return logits
