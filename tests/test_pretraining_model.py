"""The pretraining model's weights when it starts: no Ray, tiny models saved to disk.

A checkpoint without a decoder (any classifier, a ``vidray pretrain`` encoder) left the bare ``mask_token``
parameter as ``from_pretrained`` allocated it: transformers' ``_init_weights`` covers Linear, Conv and LayerNorm
modules only. Uninitialised memory (1e38 or NaN) gave a NaN first loss, then NaN in every weight.
"""

from __future__ import annotations

import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification, VideoMAEModel

from vidray.config import ModelSettings, PretrainSettings
from vidray.errors import UserError
from vidray.model.pretraining import build_pretraining_model

TINY = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64)
DECODER = PretrainSettings(decoder_depth=1, decoder_width=128, decoder_heads=4)
FRAMES, SIZE = 4, 32


def _save(tmp_path, kind: str) -> str:
    config = VideoMAEConfig(**TINY, num_frames=FRAMES, image_size=SIZE, patch_size=16, num_labels=3)
    model = VideoMAEForVideoClassification(config) if kind == "classifier" else VideoMAEModel(config)
    model.save_pretrained(tmp_path / kind)
    return str(tmp_path / kind)


def _dirty_freed_memory() -> None:
    """Leave NaN in memory the allocator hands out next, as a long-running worker's earlier tensors do."""
    for size in (DECODER.decoder_width, 1 << 12, 1 << 20):
        junk = [torch.full((size,), float("nan")) for _ in range(64)]
        del junk


@pytest.mark.parametrize("kind", ["classifier", "encoder"])
def test_a_checkpoint_without_a_decoder_starts_the_mask_token_as_videomae_does(tmp_path, kind):
    model_cfg = ModelSettings(init="pretrained", name_or_path=_save(tmp_path, kind))
    torch.manual_seed(0)
    for _ in range(5):  # uninitialised memory differs from build to build
        _dirty_freed_memory()
        model = build_pretraining_model(model_cfg, DECODER, FRAMES, SIZE)
        bad = [name for name, param in model.named_parameters() if not torch.isfinite(param).all()]
        assert bad == []
        assert 0.015 < model.mask_token.std().item() < 0.025  # trunc_normal_(std=0.02), VideoMAE's own
        assert model.mask_token.abs().max().item() < 0.1


def test_a_scratch_model_starts_the_mask_token_as_videomae_does():
    """HF's own __init__ leaves it zero; VideoMAE draws it as for a continued run."""
    torch.manual_seed(0)
    model = build_pretraining_model(ModelSettings(init="scratch", size="tiny", patch_size=8), DECODER, FRAMES, SIZE)
    assert 0.015 < model.mask_token.std().item() < 0.025


def test_a_checkpoint_holding_nan_is_refused_naming_the_weight(tmp_path):
    """A NaN encoder (a run that diverged) used to start a run that was NaN from its first step."""
    config = VideoMAEConfig(**TINY, num_frames=FRAMES, image_size=SIZE, patch_size=16)
    encoder = VideoMAEModel(config)
    with torch.no_grad():
        encoder.encoder.layer[0].output.dense.weight[0, 0] = float("nan")
    encoder.save_pretrained(tmp_path / "nan")
    with pytest.raises(UserError) as err:
        build_pretraining_model(ModelSettings(init="pretrained", name_or_path=str(tmp_path / "nan")), DECODER, FRAMES, SIZE)
    assert str(err.value) == (
        f"model.name_or_path {str(tmp_path / 'nan')!r} holds non-finite values in "
        "videomae.encoder.layer.0.output.dense.weight (a run that diverged?); point model.name_or_path at another checkpoint"
    )
