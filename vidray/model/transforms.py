"""What the model sees: a stored uint8 clip turned into VideoMAE's ``pixel_values``, as evaluation,
prediction and the export do it (evenly spaced frames, exact crops, ImageNet normalisation), and
the averaging of a video's views. Deterministic; training's random augmentation
(vidray/train/augment.py) builds on the same frame selection and normalisation.

Input is the stored uint8 batch ``[B, Ts, S, S, 3]`` (vidray/data/dataset.py); output is
``[B, T, 3, size, size]`` float32.
"""

from __future__ import annotations

import torch


# The statistics VideoMAE's image processor normalises with (ImageNet).
MEAN = (0.485, 0.456, 0.406)
STD = (0.229, 0.224, 0.225)


def eval_frame_indices(stored_frames: int, frames: int, clips: int = 1, device=None) -> torch.Tensor:
    """``[clips, frames]`` indices: ``clips`` evenly spaced strided clips, the first at stored frame 0.

    With stored frames at segment starts (vidray/data/clip.py) one clip is the first frame of each of
    ``frames`` equal segments of the video: what transformers' video processor samples.
    """
    stride = stored_frames / frames
    offsets = torch.arange(clips, dtype=torch.float64, device=device) * stride / clips
    index = torch.floor(offsets[:, None] + torch.arange(frames, dtype=torch.float64, device=device) * stride).long()
    return index.clamp_(max=stored_frames - 1)


def eval_stored_frames(stored_frames: int, frames: int, clips: int = 1):
    """The stored frames any of :func:`eval_frame_indices`' clips reads, sorted (numpy int64): all a
    compressed store decodes for evaluation."""
    return eval_frame_indices(stored_frames, frames, clips).unique().numpy()


def select_frames(videos: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """videos ``[B, Ts, S, S, 3]``, index ``[B, T]`` -> ``[B, T, S, S, 3]``."""
    batch = torch.arange(videos.shape[0], device=videos.device)[:, None]
    return videos[batch, index.to(videos.device)]


_CONSTANTS: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}


def _mean_std(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """MEAN and STD in 0..255 as float32 tensors on ``device``, built there once (not copied in every call)."""
    if device not in _CONSTANTS:
        _CONSTANTS[device] = (torch.tensor(MEAN) * 255).to(device), (torch.tensor(STD) * 255).to(device)
    return _CONSTANTS[device]


def normalize(frames: torch.Tensor) -> torch.Tensor:
    """uint8 or float ``[B, T, S, S, 3]`` in 0..255 -> float ``[B, T, 3, S, S]`` normalised."""
    mean, std = _mean_std(frames.device)
    frames = (frames.float() - mean) / std
    return frames.permute(0, 1, 4, 2, 3).contiguous()


def crop_offsets(stored: int, size: int, crops: int = 1) -> list[tuple[int, int]]:
    """(top, left) of each spatial crop of a stored square: 1 crop, the exact centre; 3 crops, left, centre
    and right at mid-height (the 3-crop test of VideoMAE and SlowFast, landscape video)."""
    middle = (stored - size) // 2
    if crops == 1:
        return [(middle, middle)]
    if crops == 3:
        return [(middle, 0), (middle, middle), (middle, stored - size)]
    raise ValueError(f"crops must be 1 or 3, got {crops}")


def eval_transform(videos: torch.Tensor, *, frames: int, size: int, clips: int = 1, crops: int = 1) -> torch.Tensor:
    """Evaluation views: evenly spaced frames and exact crops (see :func:`crop_offsets`), no resampling.

    uint8 ``[B, Ts, S, S, 3]`` -> float ``[B * crops * clips, frames, 3, size, size]``,
    view-minor (rows ``b * V .. b * V + V - 1``, ``V = crops * clips``, belong to video ``b``,
    crop-major within it); average their logits with :func:`average_clip_logits`.
    """
    batch, stored_frames, stored = videos.shape[:3]
    index = eval_frame_indices(stored_frames, frames, clips, device=videos.device)  # [clips, T]
    views = [videos[:, :, top : top + size, left : left + size][:, index] for top, left in crop_offsets(stored, size, crops)]
    crop = views[0] if crops == 1 else torch.stack(views, dim=1)  # [B, (crops,) clips, T, size, size, 3]
    return normalize(crop.reshape(batch * crops * clips, frames, size, size, 3))


def shuffle_frames(pixel_values: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """``[N, T, ...]`` with each clip's T frames in its own random order (drawn from ``generator``, on the CPU)."""
    count, frames = pixel_values.shape[:2]
    order = torch.argsort(torch.rand(count, frames, generator=generator), dim=1).to(pixel_values.device)
    return pixel_values[torch.arange(count, device=pixel_values.device)[:, None], order]


def average_clip_logits(logits: torch.Tensor, clips: int) -> torch.Tensor:
    """``[B * clips, K]`` -> ``[B, K]``: the mean over each video's ``clips`` views."""
    return logits.reshape(-1, clips, logits.shape[-1]).mean(dim=1)
