"""Clip sampling, spatial augmentation, normalisation and MixUp/CutMix, as
batched torch ops on the device that trains.

Input everywhere is the stored uint8 batch ``[B, Ts, S, S, 3]`` (``Ts`` =
``stored_frames``, ``S`` = ``stored_size``, see vidray/data/dataset.py); output is
VideoMAE's ``pixel_values`` layout ``[B, T, 3, size, size]`` float32,
normalised with the ImageNet mean/std VideoMAE was pretrained with.

All randomness comes from caller-owned ``torch.Generator``s so a run is
reproducible and its augmentation state can be checkpointed
(vidray/train/rng.py: AugmentGenerators). The per-clip parameters of
:func:`train_transform` are drawn on the generator's device: with a generator
on the GPU nothing is built on the host and copied over, so a training step
never waits for the host. :func:`mix_batch` draws its few per-batch scalars
from a host generator; they enter the device work as Python numbers, which
needs no copy either. Constant tensors (mean, std) are built once per device.

Each random operation is a draw (:func:`draw_train_view`, :func:`draw_mix`) then its
application to the pixels: a compressed store's batch builder replays a step's draws
ahead on copies of the streams, to decode only the stored frames the step will sample
(vidray/train/loop.py: frame_sampler).

Horizontal flips are off unless asked for (``hflip=True``): mirroring a clip
turns "moves left" into "moves right", so flipping is only label-preserving
for classes that do not depend on left/right (true for COIN's activity
domains, false for the demo set's direction classes).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from vidray.model.transforms import normalize, select_frames

# Random resized crop: fraction of the stored square's area, and aspect-ratio range.
CROP_SCALE = (0.5, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)

def train_frame_indices(batch: int, stored_frames: int, frames: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, frames]`` indices on the generator's device: evenly strided over the stored frames, with a random start per clip.

    The stride is ``stored_frames / frames`` so a clip always spans the whole
    video at a constant speed; the random sub-stride offset is the temporal
    jitter (with the default 2x stored frames: odd or even frames, and rounding in between).
    """
    stride = stored_frames / frames
    device = generator.device
    offset = torch.rand(batch, 1, generator=generator, device=device) * stride
    index = torch.floor(offset + torch.arange(frames, device=device) * stride).long()
    return index.clamp_(max=stored_frames - 1)


def random_crop_boxes(batch: int, generator: torch.Generator) -> torch.Tensor:
    """``[B, 4]`` boxes (centre x, centre y, width, height) as fractions of the square side, on the generator's device.

    Area fraction uniform in CROP_SCALE, log aspect ratio uniform in CROP_RATIO;
    a box that would not fit is shrunk to fit along its long side.
    """
    device = generator.device
    area = torch.empty(batch, device=device).uniform_(*CROP_SCALE, generator=generator)
    log_ratio = torch.empty(batch, device=device).uniform_(
        math.log(CROP_RATIO[0]), math.log(CROP_RATIO[1]), generator=generator
    )
    ratio = torch.exp(log_ratio)
    width = torch.sqrt(area * ratio).clamp(max=1.0)
    height = torch.sqrt(area / ratio).clamp(max=1.0)
    cx = width / 2 + torch.rand(batch, generator=generator, device=device) * (1 - width)
    cy = height / 2 + torch.rand(batch, generator=generator, device=device) * (1 - height)
    return torch.stack([cx, cy, width, height], dim=1)


@dataclass(frozen=True)
class TrainView:
    """Everything random about a batch's training views, drawn before any pixel is touched
    (:func:`draw_train_view`): which stored frames each clip samples, its crop box and flip."""

    index: torch.Tensor  # [B, frames] stored frames (train_frame_indices)
    boxes: torch.Tensor  # [B, 4] (random_crop_boxes)
    flip: torch.Tensor  # [B] bool


def draw_train_view(batch: int, stored_frames: int, frames: int, generator: torch.Generator, hflip: bool = False) -> TrainView:
    """The training views of ``batch`` clips, on the generator's device, in the order they have always been
    drawn: temporal jitter, crop boxes, flips. Drawing them apart from the pixels lets a compressed store
    decode only the sampled frames: the same draws, made ahead on a copy of the stream (vidray/train/loop.py)."""
    index = train_frame_indices(batch, stored_frames, frames, generator)
    boxes = random_crop_boxes(batch, generator)
    if hflip:
        flip = torch.rand(batch, generator=generator, device=generator.device) < 0.5
    else:
        flip = torch.zeros(batch, dtype=torch.bool, device=generator.device)
    return TrainView(index, boxes, flip)


def check_decoded_frames(view: TrainView, decoded: torch.Tensor) -> None:
    """Refuse a batch whose host decoded other stored frames (``decoded`` [B, frames]) than ``view`` samples:
    the frames drawn ahead must be the frames drawn now, or the step would read frames never decoded."""
    if decoded.device.type == "cuda":
        torch._assert_async((view.index == decoded.to(view.index.device)).all())  # no host sync in the step
        return
    if not torch.equal(view.index.to(decoded.device), decoded):
        raise RuntimeError(
            "the stored frames decoded for this batch are not the frames its step samples: the frame sampler "
            "drew from a stream the step does not (every draw of a step must go through vidray.train.loop.draw_step)"
        )


def apply_train_view(videos: torch.Tensor, view: TrainView, *, size: int) -> torch.Tensor:
    """Temporal sampling, random resized crop (the same box for every frame of a clip) and flip of ``view``.

    ``videos`` uint8 ``[B, Ts, S, S, 3]`` -> float ``[B, frames, 3, size, size]``.
    """
    batch, frames = view.index.shape
    drawn_on = view.boxes.device
    clips = select_frames(videos, view.index)

    # One affine grid per clip does crop, resize and flip in a single bilinear resample.
    # affine_grid works in [-1, 1] coordinates: scale = box side, shift = box centre.
    cx, cy, width, height = view.boxes.unbind(1)
    theta = torch.zeros(batch, 2, 3, device=drawn_on)
    theta[:, 0, 0] = torch.where(view.flip, -width, width)
    theta[:, 0, 2] = cx * 2 - 1
    theta[:, 1, 1] = height
    theta[:, 1, 2] = cy * 2 - 1

    x = normalize(clips)  # [B, T, 3, S, S]
    stored = x.shape[-1]
    x = x.reshape(batch, frames * 3, stored, stored)  # frames become channels: one grid per clip
    grid = F.affine_grid(theta.to(x.device), [batch, frames * 3, size, size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    return x.reshape(batch, frames, 3, size, size)


def train_transform(
    videos: torch.Tensor,
    *,
    frames: int,
    size: int,
    generator: torch.Generator,
    hflip: bool = False,
) -> torch.Tensor:
    """Training clip: temporal jitter, random resized crop (same box for every frame), optional flip.

    ``videos`` uint8 ``[B, Ts, S, S, 3]`` on the training device -> float ``[B, frames, 3, size, size]``.
    ``generator``: best on the same device (then nothing is copied to it); any device works.
    """
    view = draw_train_view(videos.shape[0], videos.shape[1], frames, generator, hflip)
    return apply_train_view(videos, view, size=size)


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    off = smoothing / num_classes
    targets = torch.full((labels.shape[0], num_classes), off, device=labels.device)
    return targets.scatter_(1, labels[:, None], 1.0 - smoothing + off)


def _beta(alpha: float, generator: torch.Generator) -> float:
    # torch's Beta sampler takes no generator; seed numpy's from ours instead.
    seed = int(torch.randint(0, 2**62, (1,), generator=generator))
    return float(np.random.default_rng(seed).beta(alpha, alpha))


@dataclass(frozen=True)
class Mix:
    """One batch's MixUp or CutMix (:func:`draw_mix`): the weight of each clip's own pixels, and for
    CutMix the box (y0, y1, x0, x1) pasted from its partner."""

    lam: float
    box: tuple[int, int, int, int] | None = None


def draw_mix(
    generator: torch.Generator, *, height: int, width: int, mixup_alpha: float = 0.0, cutmix_alpha: float = 0.0
) -> Mix | None:
    """What :func:`mix_batch` draws for a batch of ``height`` x ``width`` pixels (None: both alphas 0, nothing drawn)."""
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return None
    if use_mixup and use_cutmix:
        use_cutmix = bool(torch.rand(1, generator=generator) < 0.5)
        use_mixup = not use_cutmix
    if use_mixup:
        return Mix(_beta(mixup_alpha, generator))
    lam = _beta(cutmix_alpha, generator)
    cut_h, cut_w = int(height * math.sqrt(1 - lam)), int(width * math.sqrt(1 - lam))
    cy = int(torch.randint(0, height, (1,), generator=generator))
    cx = int(torch.randint(0, width, (1,), generator=generator))
    y0, y1 = max(cy - cut_h // 2, 0), min(cy + cut_h // 2, height)
    x0, x1 = max(cx - cut_w // 2, 0), min(cx + cut_w // 2, width)
    return Mix(1 - (y1 - y0) * (x1 - x0) / (height * width), (y0, y1, x0, x1))


def apply_mix(
    pixel_values: torch.Tensor, labels: torch.Tensor, mix: Mix | None, *, num_classes: int, label_smoothing: float = 0.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(pixel_values, targets [B, K])`` mixed as ``mix`` says (:func:`mix_batch`)."""
    targets = smooth_one_hot(labels, num_classes, label_smoothing)
    if mix is None:
        return pixel_values, targets
    partner = pixel_values.flip(0)
    if mix.box is None:
        mixed = pixel_values * mix.lam + partner * (1 - mix.lam)
    else:
        y0, y1, x0, x1 = mix.box
        mixed = pixel_values.clone()
        mixed[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
    return mixed, targets * mix.lam + targets.flip(0) * (1 - mix.lam)


def mix_batch(
    pixel_values: torch.Tensor,
    labels: torch.Tensor,
    *,
    num_classes: int,
    generator: torch.Generator,
    mixup_alpha: float = 0.0,
    cutmix_alpha: float = 0.0,
    label_smoothing: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """MixUp or CutMix (one of them per batch, chosen at random when both are on) with soft targets.

    Each clip is mixed with the clip at the mirrored batch position (as timm
    does). CutMix cuts the same spatial box out of every frame (a tube) and
    sets the mixing weight to the box's true area. Returns ``(pixel_values,
    targets [B, K])``; each target row sums to 1. With both alphas 0 the
    pixels are untouched and targets are the (smoothed) one-hot labels.
    """
    height, width = pixel_values.shape[-2:]
    mix = draw_mix(generator, height=height, width=width, mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha)
    return apply_mix(pixel_values, labels, mix, num_classes=num_classes, label_smoothing=label_smoothing)


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Mean over the batch of ``-sum(targets * log_softmax(logits))``."""
    return torch.sum(-targets * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
