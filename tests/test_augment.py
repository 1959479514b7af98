"""On-device clip sampling, crops, flips, normalisation and MixUp/CutMix."""

from __future__ import annotations

import pytest
import torch

from vidray.model import transforms
from vidray.train import augment


def _videos(batch=3, stored_frames=16, stored=40, seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (batch, stored_frames, stored, stored, 3), dtype=torch.uint8, generator=g)


def _indexed_videos(batch=2, stored_frames=16, stored=40) -> torch.Tensor:
    """Frame t of every video is filled with the value 10 * t, so sampled indices can be read back."""
    frames = (torch.arange(stored_frames, dtype=torch.uint8) * 10).view(1, -1, 1, 1, 1)
    return frames.expand(batch, stored_frames, stored, stored, 3).contiguous()


def _denormalize(x: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(transforms.MEAN).view(1, 1, 3, 1, 1) * 255
    std = torch.tensor(transforms.STD).view(1, 1, 3, 1, 1) * 255
    return x * std + mean


def test_train_transform_shape_dtype_and_seeded_determinism():
    videos = _videos()
    a = augment.train_transform(videos, frames=8, size=32, generator=torch.Generator().manual_seed(1), hflip=True)
    b = augment.train_transform(videos, frames=8, size=32, generator=torch.Generator().manual_seed(1), hflip=True)
    c = augment.train_transform(videos, frames=8, size=32, generator=torch.Generator().manual_seed(2), hflip=True)
    assert a.shape == (3, 8, 3, 32, 32) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_train_frames_are_evenly_strided_and_jittered_in_time():
    g = torch.Generator().manual_seed(0)
    index = augment.train_frame_indices(batch=500, stored_frames=16, frames=8, generator=g)
    assert index.min() >= 0 and index.max() <= 15
    steps = index.diff(dim=1)
    assert torch.all(steps == 2)  # constant speed: stride 16 / 8
    assert set(index[:, 0].tolist()) == {0, 1}  # both phases occur
    # Fractional strides (stored 16 -> 6 frames) still cover the whole video in order.
    index = augment.train_frame_indices(batch=500, stored_frames=16, frames=6, generator=g)
    assert torch.all(index.diff(dim=1) > 0) and index.max() == 15 and index.min() == 0

    clip = augment.train_transform(_indexed_videos(), frames=8, size=32, generator=g)
    values = _denormalize(clip)[:, :, 0].mean(dim=(-1, -2))  # per frame value = 10 * stored index
    torch.testing.assert_close(values.diff(dim=1), torch.full((2, 7), 20.0), atol=1e-3, rtol=0)


def test_eval_transform_is_deterministic_centre_crop_of_even_frames():
    videos = _videos(batch=2, stored=40)
    a = transforms.eval_transform(videos, frames=8, size=32)
    assert torch.equal(a, transforms.eval_transform(videos, frames=8, size=32))
    assert a.shape == (2, 8, 3, 32, 32)
    # Exactly the centre 32x32 of stored frames 0, 2, ..., 14: no resampling.
    expected = videos[:, 0::2, 4:36, 4:36].permute(0, 1, 4, 2, 3).float()
    torch.testing.assert_close(_denormalize(a), expected, atol=1e-3, rtol=0)
    assert transforms.eval_frame_indices(16, 8).tolist() == [[0, 2, 4, 6, 8, 10, 12, 14]]


def test_eval_multi_clip_layout_and_logit_averaging():
    videos = _indexed_videos(batch=2)
    clips = transforms.eval_transform(videos, frames=4, size=32, clips=2)
    assert clips.shape == (4, 4, 3, 32, 32)
    first_frame = _denormalize(clips)[:, 0, 0].mean(dim=(-1, -2)) / 10
    # video 0: clips 0 and 1, then video 1: clips 0 and 1 (stride 4, offsets 0 and 2)
    torch.testing.assert_close(first_frame, torch.tensor([0.0, 2.0, 0.0, 2.0]), atol=1e-3, rtol=0)
    logits = torch.tensor([[1.0, 0.0], [3.0, 2.0], [0.0, 0.0], [0.0, 4.0]])
    assert transforms.average_clip_logits(logits, 2).tolist() == [[2.0, 1.0], [0.0, 2.0]]


def test_normalisation_uses_imagenet_statistics():
    grey = torch.full((1, 1, 4, 4, 3), 128, dtype=torch.uint8)
    out = transforms.normalize(grey)
    assert out.shape == (1, 1, 3, 4, 4)
    for c in range(3):
        expected = (128 / 255 - transforms.MEAN[c]) / transforms.STD[c]
        assert out[0, 0, c].allclose(torch.tensor(expected))


def test_flip_is_off_by_default_and_mirrors_when_on():
    # A left-to-right ramp: flipping reverses its direction.
    ramp = torch.arange(40, dtype=torch.uint8).mul(6).view(1, 1, 1, 40, 1)
    videos = ramp.expand(64, 8, 40, 40, 3).contiguous()

    def slope(x):
        row = x[:, 0, 0, 16]  # [B, W]
        return (row[:, -1] - row[:, 0]).sign()

    no_flip = augment.train_transform(videos, frames=4, size=32, generator=torch.Generator().manual_seed(0))
    assert torch.all(slope(no_flip) > 0)
    flipped = augment.train_transform(videos, frames=4, size=32, generator=torch.Generator().manual_seed(0), hflip=True)
    signs = slope(flipped)
    assert (signs < 0).any() and (signs > 0).any()


def test_random_resized_crop_boxes_fit_and_span_the_scale_range():
    boxes = augment.random_crop_boxes(2000, torch.Generator().manual_seed(0))
    cx, cy, w, h = boxes.unbind(1)
    assert torch.all(cx - w / 2 >= -1e-6) and torch.all(cx + w / 2 <= 1 + 1e-6)
    assert torch.all(cy - h / 2 >= -1e-6) and torch.all(cy + h / 2 <= 1 + 1e-6)
    area = w * h
    assert area.min() < 0.55 and area.max() > 0.9 and area.max() <= 1.0 + 1e-6
    # Full-frame "crop" (identity box) reproduces the resize of the whole frame: a constant stays constant.
    flat = torch.full((1, 4, 40, 40, 3), 77, dtype=torch.uint8)
    out = _denormalize(augment.train_transform(flat, frames=4, size=32, generator=torch.Generator()))
    torch.testing.assert_close(out, torch.full_like(out, 77.0), atol=1e-3, rtol=0)


@pytest.mark.parametrize("mixup,cutmix", [(0.8, 0.0), (0.0, 1.0), (0.8, 1.0)])
def test_mix_targets_are_distributions_and_match_the_pixels(mixup, cutmix):
    g = torch.Generator().manual_seed(0)
    pixels = torch.stack([torch.full((4, 3, 16, 16), float(i)) for i in range(4)])  # clip i is all i
    labels = torch.tensor([0, 1, 2, 3])
    for _ in range(10):
        mixed, targets = augment.mix_batch(
            pixels, labels, num_classes=5, generator=g, mixup_alpha=mixup, cutmix_alpha=cutmix, label_smoothing=0.1
        )
        assert mixed.shape == pixels.shape and targets.shape == (4, 5)
        torch.testing.assert_close(targets.sum(1), torch.ones(4))
        # Weight of the own label = the share of the own pixels (plus smoothing mass 0.1 / 5).
        own_share = 1 - (mixed[0] - 0).abs().mean() / 3  # clip 0 mixed with clip 3
        assert targets[0, 0].item() == pytest.approx(own_share.item() * 0.9 + 0.02, abs=1e-5)
        assert targets[0, 4].item() == pytest.approx(0.02)


def test_mix_is_seeded_and_off_when_alphas_are_zero():
    pixels, labels = torch.randn(4, 2, 3, 8, 8), torch.tensor([0, 1, 1, 0])
    out1 = augment.mix_batch(pixels, labels, num_classes=2, generator=torch.Generator().manual_seed(3), mixup_alpha=0.4)
    out2 = augment.mix_batch(pixels, labels, num_classes=2, generator=torch.Generator().manual_seed(3), mixup_alpha=0.4)
    assert torch.equal(out1[0], out2[0]) and torch.equal(out1[1], out2[1])
    same, targets = augment.mix_batch(pixels, labels, num_classes=2, generator=torch.Generator(), label_smoothing=0.2)
    assert same is pixels
    torch.testing.assert_close(targets, torch.tensor([[0.9, 0.1], [0.1, 0.9], [0.1, 0.9], [0.9, 0.1]]))


def test_soft_target_cross_entropy_matches_torch_with_label_smoothing():
    logits = torch.randn(6, 4, generator=torch.Generator().manual_seed(0))
    labels = torch.tensor([0, 1, 2, 3, 0, 1])
    targets = augment.smooth_one_hot(labels, 4, 0.1)
    expected = torch.nn.functional.cross_entropy(logits, labels, label_smoothing=0.1)
    torch.testing.assert_close(augment.soft_target_cross_entropy(logits, targets), expected)
