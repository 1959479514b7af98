"""VideoMAE build/load and position-table interpolation, on tiny real models saved to disk."""

from __future__ import annotations

import logging
import os

import pytest
import torch
import torch.nn.functional as F
from transformers import VideoMAEConfig, VideoMAEForVideoClassification
from transformers.models.videomae.modeling_videomae import get_sinusoid_encoding_table

from vidray.model.checkpoint import save_checkpoint

from vidray.model.classifier import load_trained_model
from vidray.data.dataset import ClipShape
from vidray.compat import POSITION_TABLE_VERIFIED_TRANSFORMERS
from vidray.config import ModelSettings
from vidray.errors import UserError
from vidray.model.classifier import (
    POS_GRID_KEY,
    SCRATCH_SIZES,
    build_model,
    load_model,
    to_device,
    token_grid,
    use_tf32,
)

CLASSES = ["Jump", "Run", "Swim"]
TINY = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64)


@pytest.fixture(scope="module")
def pretrained_dir(tmp_path_factory) -> str:
    """A "pretrained" VideoMAE at the usual 16 x 224² with a 5-way head, saved like a hub checkpoint."""
    torch.manual_seed(0)
    config = VideoMAEConfig(**TINY, num_frames=16, image_size=224, num_labels=5)
    directory = tmp_path_factory.mktemp("pretrained")
    VideoMAEForVideoClassification(config).save_pretrained(directory)
    return str(directory)


def _pretrained_cfg(path: str, **kwargs) -> ModelSettings:
    return ModelSettings(name_or_path=path, init="pretrained", **kwargs)


def _positions_seen_in_forward(model: VideoMAEForVideoClassification, frames: int, size: int) -> torch.Tensor:
    """What forward() adds to the patch embeddings: with a zeroed patch projection, that is all that is left."""
    embeddings = model.videomae.embeddings
    with torch.no_grad():
        embeddings.patch_embeddings.projection.weight.zero_()
        embeddings.patch_embeddings.projection.bias.zero_()
        return embeddings(torch.randn(1, frames, 3, size, size), None)


def test_pretrained_loads_backbone_and_only_reinitialises_the_head(pretrained_dir, caplog):
    reference = VideoMAEForVideoClassification.from_pretrained(pretrained_dir)
    with caplog.at_level(logging.INFO, logger="vidray.model.classifier"):
        model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=16, size=112)
    # What HF reported as not loaded: exactly the 5-way head that became a 3-way one.
    assert "new head weights classifier.bias, classifier.weight" in caplog.text
    assert model.config.num_labels == 3
    assert model.config.id2label == {0: "Jump", 1: "Run", 2: "Swim"}
    assert model.config.label2id == {"Jump": 0, "Run": 1, "Swim": 2}
    assert model.config.image_size == 112 and model.config.num_frames == 16
    assert model.config._attn_implementation == "sdpa"
    reference_state = reference.state_dict()
    for name, tensor in model.state_dict().items():
        if name.startswith("classifier."):
            assert tensor.shape != reference_state[name].shape
        else:
            assert torch.equal(tensor, reference_state[name]), name


def test_a_half_precision_checkpoint_trains_in_float32(tmp_path, pretrained_dir):
    """transformers 5 loads a checkpoint in the dtype its config.json names: a bf16 one gave bf16 weights, so AdamW
    kept bf16 moments and rounded most fine-tuning updates away. Training builds (fine-tuning and pretraining) get
    float32 weights whatever the file's, as transformers 4 gave."""
    from transformers import VideoMAEForPreTraining

    from vidray.config import PretrainSettings
    from vidray.model.pretraining import build_pretraining_model

    half = tmp_path / "bf16"
    VideoMAEForVideoClassification.from_pretrained(pretrained_dir).to(torch.bfloat16).save_pretrained(half)
    assert VideoMAEForVideoClassification.from_pretrained(half).dtype == torch.bfloat16  # what "auto" reads
    model = build_model(_pretrained_cfg(str(half)), CLASSES, frames=16, size=224)
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    half_mae = tmp_path / "bf16_mae"
    VideoMAEForPreTraining(VideoMAEConfig(**TINY, num_frames=16, image_size=224)).to(torch.bfloat16).save_pretrained(half_mae)
    mae = build_pretraining_model(_pretrained_cfg(str(half_mae)), PretrainSettings(), frames=16, size=224)
    assert {p.dtype for p in mae.parameters()} == {torch.float32}


def test_head_is_reset_even_when_sizes_match_but_classes_differ(pretrained_dir):
    five = ["A", "B", "C", "D", "E"]
    reference = VideoMAEForVideoClassification.from_pretrained(pretrained_dir)
    model = build_model(_pretrained_cfg(pretrained_dir), five, frames=16, size=224)
    assert not torch.equal(model.classifier.weight, reference.classifier.weight)
    assert torch.all(model.classifier.bias == 0)


def test_head_is_kept_for_the_same_classes(tmp_path, pretrained_dir):
    first = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=16, size=224)
    first.save_pretrained(tmp_path)
    again = build_model(_pretrained_cfg(str(tmp_path)), CLASSES, frames=16, size=224)
    assert torch.equal(again.classifier.weight, first.classifier.weight)


def test_interpolated_position_table_is_the_trilinear_resize_of_the_pretrained_grid(pretrained_dir):
    model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=16, size=112)
    assert token_grid(model.config) == (8, 7, 7)
    assert getattr(model.config, POS_GRID_KEY) == [8, 14, 14]

    # Expected, computed independently: HF's own 224² table laid out as (T, H, W, D), resized.
    d = TINY["hidden_size"]
    reference = get_sinusoid_encoding_table(8 * 14 * 14, d).reshape(8, 14, 14, d)
    expected = F.interpolate(
        reference.permute(3, 0, 1, 2)[None], size=(8, 7, 7), mode="trilinear", align_corners=False
    )[0].permute(1, 2, 3, 0)  # [8, 7, 7, D]

    seen = _positions_seen_in_forward(model, frames=16, size=112).reshape(8, 7, 7, d)
    torch.testing.assert_close(seen, expected, rtol=0, atol=1e-6)
    # Halving the spatial grid: token (t, h, w) sits between pretrained tokens (t, 2h, 2w) and (t, 2h+1, 2w+1).
    t, h, w = 3, 2, 5
    corners = reference[t, 2 * h : 2 * h + 2, 2 * w : 2 * w + 2].reshape(4, d).mean(0)
    torch.testing.assert_close(seen[t, h, w], corners, rtol=0, atol=1e-6)
    # And it is not what HF would have used: the 1-D table over 392 tokens.
    assert not torch.allclose(seen.reshape(-1, d), get_sinusoid_encoding_table(392, d)[0], atol=1e-2)


def test_native_resolution_keeps_hf_table_bitwise(pretrained_dir):
    model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=16, size=224)
    hf_table = get_sinusoid_encoding_table(8 * 14 * 14, TINY["hidden_size"])
    assert torch.equal(model.videomae.embeddings.position_embeddings, hf_table)
    assert getattr(model.config, POS_GRID_KEY, None) is None


def test_interpolation_can_be_switched_off(pretrained_dir):
    model = build_model(_pretrained_cfg(pretrained_dir, interpolate_pos_embed=False), CLASSES, frames=16, size=112)
    assert torch.equal(model.videomae.embeddings.position_embeddings, get_sinusoid_encoding_table(392, TINY["hidden_size"]))


def test_fewer_frames_interpolate_in_time_too(pretrained_dir):
    model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=8, size=112)
    seen = _positions_seen_in_forward(model, frames=8, size=112)
    d = TINY["hidden_size"]
    reference = get_sinusoid_encoding_table(8 * 14 * 14, d).reshape(1, 8, 14, 14, d).permute(0, 4, 1, 2, 3)
    expected = F.interpolate(reference, size=(4, 7, 7), mode="trilinear", align_corners=False)
    torch.testing.assert_close(seen, expected.permute(0, 2, 3, 4, 1).reshape(1, -1, d), rtol=0, atol=1e-6)


def test_saved_model_reloads_with_the_same_table_and_outputs(tmp_path, pretrained_dir):
    model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, frames=16, size=112).eval()
    shape = ClipShape(CLASSES, frames=16, size=112, stored_frames=32, stored_size=128)
    save_checkpoint(tmp_path, model, training_state={"epoch": 0}, info={"epoch": 0, "data": shape.as_dict()})
    loaded, _ = load_trained_model(tmp_path)
    loaded.eval()
    assert torch.equal(loaded.videomae.embeddings.position_embeddings, model.videomae.embeddings.position_embeddings)
    x = torch.randn(2, 16, 3, 112, 112)
    with torch.no_grad():
        torch.testing.assert_close(loaded(pixel_values=x).logits, model(pixel_values=x).logits)
    # Fine-tuning a fine-tuned model again interpolates from the original 224² grid, not from 112².
    again = build_model(_pretrained_cfg(str(tmp_path / "model")), CLASSES, frames=16, size=112)
    assert torch.equal(again.videomae.embeddings.position_embeddings, model.videomae.embeddings.position_embeddings)
    # ...and with interpolation off, at its own grid, it keeps the table it was trained with: nothing is resized
    # anew (before, HF's 1-D table replaced it: positions the model never saw). At another grid, off is HF's.
    kept = build_model(_pretrained_cfg(str(tmp_path / "model"), interpolate_pos_embed=False), CLASSES, frames=16, size=112)
    assert torch.equal(kept.videomae.embeddings.position_embeddings, model.videomae.embeddings.position_embeddings)
    assert getattr(kept.config, POS_GRID_KEY) == [8, 14, 14]
    other = build_model(_pretrained_cfg(str(tmp_path / "model"), interpolate_pos_embed=False), CLASSES, frames=8, size=112)
    assert torch.equal(other.videomae.embeddings.position_embeddings, get_sinusoid_encoding_table(4 * 7 * 7, TINY["hidden_size"]))
    assert getattr(other.config, POS_GRID_KEY, None) is None
    assert load_model(str(tmp_path / "model")).config.id2label == model.config.id2label


def test_scratch_sizes_and_gradient_checkpointing():
    model = build_model(ModelSettings(init="scratch", size="tiny", gradient_checkpointing=True), CLASSES, 8, 32)
    assert model.config.hidden_size == 128 and model.config.num_hidden_layers == 2
    assert model.is_activation_checkpointing
    model.train()
    out = model(pixel_values=torch.randn(2, 8, 3, 32, 32)).logits
    assert out.shape == (2, 3)
    out.sum().backward()
    assert model.classifier.weight.grad is not None
    assert SCRATCH_SIZES["small"]["hidden_size"] == 384 and SCRATCH_SIZES["small"]["num_hidden_layers"] == 12
    assert VideoMAEConfig(**SCRATCH_SIZES["base"]).to_dict()["hidden_size"] == VideoMAEConfig().hidden_size


def test_scratch_patch_size_sets_the_token_grid():
    model = build_model(ModelSettings(init="scratch", size="tiny", patch_size=8), CLASSES, 8, 48)
    assert model.config.patch_size == 8 and token_grid(model.config) == (4, 6, 6)
    assert model(pixel_values=torch.randn(1, 8, 3, 48, 48)).logits.shape == (1, 3)
    with pytest.raises(UserError, match=r"data.size=44 must be a multiple of the model's patch_size 8"):
        build_model(ModelSettings(init="scratch", size="tiny", patch_size=8), CLASSES, 8, 44)


def test_bad_sources_and_shapes_fail_with_one_line_errors(tmp_path, pretrained_dir):
    missing = tmp_path / "no-such-model"
    with pytest.raises(UserError, match=r"model.name_or_path: cannot load .*no-such-model.*model.init=scratch"):
        build_model(_pretrained_cfg(str(missing)), CLASSES, 16, 112)
    # A hub id goes down the same path; offline (HF_HUB_OFFLINE=1 in tests) and uncached it fails the same way.
    with pytest.raises(UserError, match=r"model.name_or_path: cannot load a VideoMAE config from 'MCG-NJU/not-cached'"):
        build_model(_pretrained_cfg("MCG-NJU/not-cached"), CLASSES, 16, 112)
    with pytest.raises(UserError, match=r"data.size=100 must be a multiple of the model's patch_size 16"):
        build_model(_pretrained_cfg(pretrained_dir), CLASSES, 16, 100)
    with pytest.raises(UserError, match=r"data.frames=7 must be a multiple of the model's tubelet_size 2"):
        build_model(ModelSettings(init="scratch", size="tiny"), CLASSES, 7, 32)


def test_a_checkpoint_of_another_architecture_is_refused(tmp_path):
    # Same config family, different patch size: every projection weight mismatches.
    VideoMAEForVideoClassification(VideoMAEConfig(**TINY, patch_size=8, num_labels=3)).save_pretrained(tmp_path / "a")
    config = VideoMAEConfig.from_pretrained(tmp_path / "a")
    config.patch_size = 16
    config.save_pretrained(tmp_path / "a")
    with pytest.raises(UserError, match=r"does not fit a VideoMAE backbone .*patch_embeddings"):
        build_model(_pretrained_cfg(str(tmp_path / "a")), CLASSES, 16, 112)


def test_a_checkpoint_of_another_model_type_is_refused_by_the_drivers_check(tmp_path):
    """VideoMAEConfig reads a TimeSformer's config.json with a logged warning: the driver's check passed and
    the refusal came from the workers, after Ray, the data and the workers had started, as a traceback."""
    from transformers import TimesformerConfig, TimesformerForVideoClassification
    from vidray.model.classifier import check_model_config

    TimesformerForVideoClassification(TimesformerConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                                                        intermediate_size=64, image_size=32, num_frames=4)).save_pretrained(tmp_path / "tsf")  # fmt: skip
    with pytest.raises(UserError) as refused:
        check_model_config(_pretrained_cfg(str(tmp_path / "tsf")), 4, 32)
    assert str(refused.value) == (
        f"model.name_or_path: {str(tmp_path / 'tsf')!r} holds a 'timesformer' model, not VideoMAE; point it at a "
        "VideoMAE checkpoint (e.g. MCG-NJU/videomae-base-finetuned-kinetics) or set model.init=scratch"
    )


def test_a_checkpoint_on_a_bucket_is_read_through_its_uri(tmp_path, pretrained_dir):
    """`vidray pretrain` on a bucket writes its encoder there and says to fine-tune from its URI, which
    from_pretrained cannot read (local folders and hub ids only): the folder is copied here first, then
    deleted. file:// is read as s3:// and gs:// are, through pyarrow's filesystem."""
    import glob
    import tempfile

    from vidray.model.classifier import check_model_config

    uri = f"file://{pretrained_dir}"
    check_model_config(_pretrained_cfg(uri), 16, 112)
    torch.manual_seed(1)
    from_uri = build_model(_pretrained_cfg(uri), CLASSES, 16, 112).state_dict()
    torch.manual_seed(1)
    from_folder = build_model(_pretrained_cfg(pretrained_dir), CLASSES, 16, 112).state_dict()
    assert from_uri.keys() == from_folder.keys() and all(torch.equal(from_uri[k], from_folder[k]) for k in from_uri)
    assert not glob.glob(os.path.join(tempfile.gettempdir(), f"vidray-fetch-*-{os.getpid()}-*"))  # the copies are gone
    with pytest.raises(UserError, match=rf"^model.name_or_path: cannot load a VideoMAE config from 'file://{tmp_path}/gone' "):
        check_model_config(_pretrained_cfg(f"file://{tmp_path}/gone"), 16, 112)


def test_fine_tuning_a_pretraining_checkpoint_classifies_from_the_mean_of_its_tokens(tmp_path):
    """MCG-NJU/videomae-base and a `vidray pretrain` checkpoint's model/ are VideoMAEForPreTraining with
    use_mean_pooling=false: built as HF builds a classifier from them, the head read the first token, one patch of
    the first tubelet (VideoMAE has no CLS token). VideoMAE's recipe pools the mean, through a new fc_norm."""
    from transformers import VideoMAEForPreTraining

    torch.manual_seed(0)
    pretraining = VideoMAEForPreTraining(VideoMAEConfig(**TINY, num_frames=4, image_size=32, patch_size=16, use_mean_pooling=False))
    pretraining.save_pretrained(tmp_path / "pretraining")
    model = build_model(_pretrained_cfg(str(tmp_path / "pretraining")), CLASSES, frames=4, size=32).eval()
    assert model.config.use_mean_pooling and model.fc_norm is not None and model.videomae.layernorm is None
    for name, weight in pretraining.videomae.encoder.state_dict().items():  # the encoder itself is the pretrained one
        assert torch.equal(model.videomae.encoder.state_dict()[name], weight), name
    clip = torch.randn(2, 4, 3, 32, 32)
    with torch.no_grad():
        tokens = model.videomae(clip).last_hidden_state
        assert torch.allclose(model(clip).logits, model.classifier(model.fc_norm(tokens.mean(1))), atol=1e-6)


def test_to_device_moves_the_position_table_hf_reads_in_every_forward(pretrained_dir):
    """The HF internal :func:`vidray.model.classifier.to_device` relies on, checked against the installed transformers."""
    import transformers

    assert transformers.__version__.startswith(POSITION_TABLE_VERIFIED_TRANSFORMERS), (
        f"transformers {transformers.__version__}: re-check to_device against VideoMAEEmbeddings, then list it in vidray/compat.py"
    )
    model = build_model(_pretrained_cfg(pretrained_dir), CLASSES, 16, 112)  # an interpolated table
    embeddings = model.videomae.embeddings
    # Still a plain attribute, so Module.to() alone would leave it on the CPU ...
    assert isinstance(embeddings.position_embeddings, torch.Tensor)
    assert "position_embeddings" not in dict(embeddings.named_buffers()) | dict(embeddings.named_parameters())
    # ... and still what forward() adds.
    table = embeddings.position_embeddings.clone()
    assert torch.allclose(_positions_seen_in_forward(model, 16, 112), table, atol=1e-6)
    embeddings.position_embeddings = torch.zeros_like(table)
    assert torch.count_nonzero(_positions_seen_in_forward(model, 16, 112)) == 0
    embeddings.position_embeddings = table
    # to_device moves weights and table together (the meta device stands in for a GPU here).
    to_device(model, torch.device("meta"))
    assert embeddings.position_embeddings.device.type == "meta"
    assert all(p.device.type == "meta" for p in model.parameters())


def test_tf32_is_only_touched_on_cuda():
    before = torch.get_float32_matmul_precision()
    use_tf32(torch.device("cpu"))
    assert torch.get_float32_matmul_precision() == before
