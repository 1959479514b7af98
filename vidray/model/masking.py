"""Tube masks for VideoMAE pretraining.

VideoMAE ("Masked Autoencoders are Data-Efficient Learners for Self-Supervised
Video Pre-Training") hides the same spatial patch positions at every time step
of a clip: a masked position is a tube through the whole clip. Neighbouring
frames are nearly identical, so a mask that changed from frame to frame would
let the model copy a hidden patch from the frame next to it; with tubes it has
to infer what is hidden from what moves elsewhere.

A clip's tokens are ordered (t, h, w), t slowest, as VideoMAE's patch
embedding flattens them. Every clip gets its own mask of exactly
``masked_positions(h * w, mask_ratio)`` spatial positions, repeated over its
``t`` time steps, so every clip has the same number of visible tokens, which
VideoMAE needs to batch them. The positions are drawn on the device that
trains, from the caller's generator: its state is part of every checkpoint
(vidray/pretrain/task.py), so a resumed run draws the masks the interrupted one would have.
"""

from __future__ import annotations

import torch


def masked_positions(spatial_tokens: int, mask_ratio: float) -> int:
    """Spatial positions masked per clip: ``round(mask_ratio * spatial_tokens)``."""
    return int(round(mask_ratio * spatial_tokens))


def tube_mask(
    batch: int, grid: tuple[int, int, int], mask_ratio: float, generator: torch.Generator
) -> torch.Tensor:
    """bool ``[batch, t * h * w]`` (True = hidden) on the generator's device: one tube mask per clip.

    ``grid`` is the (t, h, w) token grid of a clip (:func:`vidray.model.classifier.token_grid`).
    """
    time_steps, height, width = grid
    spatial = height * width
    hidden = masked_positions(spatial, mask_ratio)
    if not 0 < hidden < spatial:
        raise ValueError(f"mask_ratio {mask_ratio} hides {hidden} of {spatial} positions: none or all")
    # A random permutation per clip (argsort of uniform noise, as VideoMAE and MAE do); its first
    # ``hidden`` positions are masked.
    noise = torch.rand(batch, spatial, generator=generator, device=generator.device)
    order = noise.argsort(dim=1)
    spatial_mask = torch.zeros(batch, spatial, dtype=torch.bool, device=generator.device)
    spatial_mask.scatter_(1, order[:, :hidden], True)
    return spatial_mask[:, None, :].expand(batch, time_steps, spatial).reshape(batch, time_steps * spatial)
