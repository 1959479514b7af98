"""VideoMAE masked-autoencoder pretraining: tube masks, the model and its encoder, and real Ray Train runs.

The Ray runs (module-scoped, shared by the tests below them) pretrain a tiny
VideoMAE from scratch on the synthetic clips of tests/test_train.py (a square
crossing a noisy frame), labels unused:

* ``uninterrupted``: 2 DDP workers, 3 epochs, each worker's shard cached in its
  device's memory (``train.cache_dataset=auto`` on CPU);
* ``killed``: the same run streaming the shards, its rank 1 killed once in the
  middle of epoch 1: it must resume at epoch 1 and end exactly where
  ``uninterrupted`` ended (losses, weights): masks, crops and batches continue
  the same random streams.

Then the encoder it leaves (``model_dir``) is fine-tuned by a one-trial ``vidray
tune`` sweep (its trial runs the train loop of ``vidray train``): the trial's
checkpoint has a new head and no decoder, and the exported model keeps the
encoder's geometry.
"""

from __future__ import annotations

import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml
from PIL import Image

from conftest import assert_same_tensors
from test_train import CLASSES, FRAMES, SIZE, config_for, prepare_run, run_side_by_side, write_dataset
from vidray.cli import main as cli_main
from vidray.model.checkpoint import MODEL_DIR, load_training_state, read_checkpoint_info
from vidray.model.classifier import load_trained_model
from vidray.config import ConfigError, ModelSettings, load_config
from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA, read_dataset_info
from vidray.errors import UserError
from vidray.model.masking import masked_positions, tube_mask
from vidray.model.classifier import POS_GRID_KEY, build_model, token_grid
from vidray.model import transforms
from vidray.pretrain import driver as pretrain_driver
from vidray.pretrain.driver import (
    ENCODER_DIR,
    as_pretraining,
    build_pretrainer,
    figure_clips,
    make_pretraining_run_config,
)
from vidray.pretrain.checks import check_pretrain_config
from vidray.pretrain.figures import reconstruct
from vidray.model.pretraining import (
    build_pretraining_model, check_pretraining_model, load_pretraining_model, pretraining_config, save_encoder,
)
from vidray.train.driver import existing_run_state

REPO = Path(__file__).resolve().parents[1]
EPOCHS = 3
TRAIN_VIDEOS = 4 * 48  # test_train's dataset
GLOBAL_BATCH = 16
TINY_DECODER = dict(decoder_depth=1, decoder_width=64, decoder_heads=4)


# ----------------------------------------------------------------- tube masks (no Ray)


def test_tube_mask_hides_the_same_positions_in_every_frame_and_exactly_round_ratio_of_them():
    grid = (4, 6, 6)
    mask = tube_mask(64, grid, 0.9, torch.Generator().manual_seed(0))
    assert mask.shape == (64, 4 * 36) and mask.dtype == torch.bool
    per_frame = mask.reshape(64, 4, 36)
    # One spatial mask per clip, shared by every time step: tubes.
    assert torch.equal(per_frame, per_frame[:, :1].expand_as(per_frame))
    # Exactly round(0.9 x 36) = 32 positions hidden in every clip (4 visible), so 4 x 32 tokens.
    assert masked_positions(36, 0.9) == 32
    assert per_frame[:, 0].sum(dim=1).tolist() == [32] * 64
    assert mask.sum(dim=1).tolist() == [128] * 64
    # A different mask per clip: 64 draws of 4 visible positions out of 36 (58,905 ways) never all agree.
    assert len({tuple(row.tolist()) for row in per_frame[:, 0]}) > 60
    # Every position gets hidden and shown somewhere: no position is favoured.
    assert 0 < per_frame[:, 0].float().mean(dim=0).min() and per_frame[:, 0].float().mean(dim=0).max() < 1


def test_tube_masks_are_reproducible_for_a_seed_and_continue_from_a_saved_state():
    grid = (2, 4, 4)
    a = tube_mask(8, grid, 0.75, torch.Generator().manual_seed(3))
    b = tube_mask(8, grid, 0.75, torch.Generator().manual_seed(3))
    c = tube_mask(8, grid, 0.75, torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.sum(dim=1).tolist() == [2 * 12] * 8  # round(0.75 x 16) = 12 per time step
    # What a checkpoint keeps (the generator state) continues the very same stream.
    generator = torch.Generator().manual_seed(5)
    tube_mask(8, grid, 0.75, generator)
    state = generator.get_state()
    following = tube_mask(8, grid, 0.75, generator)
    resumed = torch.Generator()
    resumed.set_state(state)
    assert torch.equal(tube_mask(8, grid, 0.75, resumed), following)


def test_masked_count_rounds_and_a_mask_hiding_all_or_nothing_is_refused():
    assert masked_positions(16, 0.9) == 14  # 14.4
    assert masked_positions(36, 0.75) == 27
    assert masked_positions(49, 0.9) == 44  # 44.1
    with pytest.raises(ValueError, match="none or all"):
        tube_mask(2, (2, 4, 4), 0.99, torch.Generator())


# ----------------------------------------------------------------- config errors (no Ray)


def demo_config(*overrides: str):
    return load_config(REPO / "configs" / "demo.yaml", list(overrides))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            ["pretrain.mask_ratio=0.99"],
            "pretrain.mask_ratio=0.99 hides all of them (a 32 px clip in 8 px patches has 4 x 4 = 16 patch "
            "positions), leaving no visible token; lower pretrain.mask_ratio to at most 0.938",
        ),
        (
            ["pretrain.mask_ratio=0.01"],
            "pretrain.mask_ratio=0.01 hides none of them (a 32 px clip in 8 px patches has 4 x 4 = 16 patch "
            "positions), leaving nothing to reconstruct; raise pretrain.mask_ratio to at least 0.062",
        ),
        (["data.frames=6"], "data.frames=6 must be a multiple of the model's tubelet_size 4"),
        (["data.size=36"], "data.size=36 must be a multiple of the model's patch_size 8"),
        (
            ["pretrain.batch_size=15", "train.num_workers=2"],
            "pretrain.batch_size=15 is the global batch and must be divisible by "
            "train.num_workers x train.grad_accum_steps = 2",
        ),
    ],
)
def test_a_pretraining_that_cannot_work_is_refused_from_the_config_alone(overrides, message):
    with pytest.raises(UserError) as err:
        check_pretrain_config(demo_config(*overrides))
    assert str(err.value) == message


@pytest.mark.parametrize("refused", ["0.99", "0.01"])
def test_the_mask_ratio_a_refusal_suggests_is_accepted(refused):
    """The suggested bound was refused in its turn: "at least 0.031" hid round(0.031 x 16) = 0 positions."""
    with pytest.raises(UserError) as err:
        check_pretrain_config(demo_config(f"pretrain.mask_ratio={refused}"))
    suggested = str(err.value).rsplit(" ", 1)[-1]
    check_pretrain_config(demo_config(f"pretrain.mask_ratio={suggested}"))


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("pretrain.mask_ratio=1.0", "pretrain.mask_ratio: Input should be less than 1"),
        ("pretrain.splits=[]", "pretrain.splits is empty"),
        ("pretrain.splits=[train, train]", "pretrain.splits lists a split twice"),
        ("pretrain.splits=[holdout]", "pretrain.splits.0: Input should be 'train', 'val' or 'test'"),
        ("pretrain.decoder_width=90", "pretrain.decoder_width (90) must be divisible by pretrain.decoder_heads (4)"),
        ("pretrain.learning_rate=1", "pretrain.learning_rate: unknown key"),
    ],
)
def test_bad_pretrain_values_name_the_key(override, named):
    with pytest.raises(ConfigError) as err:
        demo_config(override)
    assert named in str(err.value) and "\n" not in str(err.value)


def test_continuing_from_a_decoder_of_another_shape_is_refused(tmp_path):
    cfg = demo_config()
    model = build_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    model.save_pretrained(tmp_path)
    continued = cfg.model.model_copy(update={"init": "pretrained", "name_or_path": str(tmp_path), "patch_size": None})
    with pytest.raises(UserError) as err:
        check_pretrain_config(cfg.model_copy(update={"model": continued, "pretrain": cfg.pretrain.model_copy(update={"decoder_depth": 3})}))
    assert str(err.value) == (
        f"model.name_or_path {str(tmp_path)!r} holds a pretraining decoder of another shape: set "
        "pretrain.decoder_depth=1 to continue with it (or point model.name_or_path at an encoder to start a new decoder)"
    )


def test_a_decoder_of_another_mlp_width_is_continued_as_it_is(tmp_path):
    """The decoder's MLP width is not a setting (4 x pretrain.decoder_width for a new one): a checkpoint whose decoder
    has another passed the config check, then failed to load in every worker ("ignore_mismatched_sizes")."""
    cfg = demo_config()
    config = pretraining_config(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    config.decoder_intermediate_size = 2 * cfg.pretrain.decoder_width
    from transformers import VideoMAEForPreTraining

    VideoMAEForPreTraining(config).save_pretrained(tmp_path)
    continued = cfg.model.model_copy(update={"init": "pretrained", "name_or_path": str(tmp_path), "patch_size": None})
    model = build_pretraining_model(continued, cfg.pretrain, cfg.data.frames, cfg.data.size)
    assert model.config.decoder_intermediate_size == 2 * cfg.pretrain.decoder_width


def test_jobs_pretrain_reports_a_config_error_in_one_line_before_ray_starts():
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "pretrain.py"), "--config", "configs/demo.yaml", "pretrain.mask_ratio=0.99"],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vidray pretrain: error: pretrain.mask_ratio=0.99 hides all of them")
    assert proc.stdout == ""


def test_model_dropout_neither_reaches_pretraining_nor_stops_it_resuming(tmp_path):
    """model.dropout is fine-tuning's: it was applied to the pretraining encoder and decoder (VideoMAE pretrains
    without), and a pretraining run started before `model.dropout=0.1` was added for fine-tuning was refused."""
    from vidray.model.checkpoint import save_checkpoint

    cfg = demo_config("train.epochs=3", "pretrain.epochs=3", f"run.storage_path={tmp_path}", "model.dropout=0.1")
    pcfg = as_pretraining(cfg)
    assert pcfg.model.dropout == 0.0 and cfg.model.dropout == 0.1
    config = pretraining_config(pcfg.model, pcfg.pretrain, cfg.data.frames, cfg.data.size)
    assert config.hidden_dropout_prob == config.attention_probs_dropout_prob == 0.0
    run_dir = tmp_path / "demo-pretrain"
    model = build_pretraining_model(pcfg.model, pcfg.pretrain, cfg.data.frames, cfg.data.size)
    started = as_pretraining(demo_config("train.epochs=3", "pretrain.epochs=3", f"run.storage_path={tmp_path}"))
    save_checkpoint(run_dir / "checkpoint_epoch_0000", model, training_state={"epoch": 0},
                    info={"epoch": 0, "config": started.model_dump(mode="json")})  # fmt: skip
    assert existing_run_state(pcfg, str(run_dir)) == "interrupted"


def _pretraining_run_as_started(tmp_path, epoch: int, *, saved_dropout: float) -> tuple[Path, list[str]]:
    """A pretraining run folder as a driver left it (its overrides beside it): a complete checkpoint at ``epoch``
    whose saved config has ``model.dropout`` at ``saved_dropout``, as runs before 23223fe saved it."""
    from vidray.model.checkpoint import save_checkpoint

    overrides = ["pretrain.epochs=3", "pretrain.lr=2e-4", f"run.storage_path={tmp_path}"]
    cfg = as_pretraining(demo_config(*overrides))
    started = cfg.model_dump(mode="json")
    started["model"]["dropout"] = saved_dropout
    run_dir = tmp_path / "demo-pretrain"
    model = build_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    save_checkpoint(run_dir / f"checkpoint_epoch_{epoch:04d}", model, training_state={"epoch": epoch},
                    info={"epoch": epoch, "metrics": {"train_loss": 1.0}, "config": started})  # fmt: skip
    return run_dir, overrides


def test_a_pretraining_run_started_with_model_dropout_is_continued_and_summarised(tmp_path):
    """Pretraining fixes model.dropout at 0.0 since 23223fe: a run started before with `model.dropout: 0.1` (a config
    shared with fine-tuning) was refused ("model.dropout differ"), offering model.dropout=0.1, which `vidray pretrain`
    refuses as an override it ignores: only --restart was left, for a run that could not even be summarised."""
    run_dir, overrides = _pretraining_run_as_started(tmp_path, 0, saved_dropout=0.1)
    pcfg = as_pretraining(demo_config(*overrides, "model.dropout=0.1"))
    assert pcfg.model.dropout == 0.0
    assert pretrain_driver.pretraining_run_state(pcfg, str(run_dir)) == "interrupted"
    finished, _ = _pretraining_run_as_started(tmp_path, 2, saved_dropout=0.1)
    assert pretrain_driver.pretraining_run_state(pcfg, str(finished)) == "finished"


def test_a_changed_pretraining_key_is_refused_naming_only_what_vidray_pretrain_takes(tmp_path):
    """pretrain.lr changed: as_pretraining copies it into train.lr, and the refusal named both, offering train.lr=...,
    which `vidray pretrain` refuses. It names pretrain.lr alone now, and its hint continues the run."""
    from vidray.pretrain.checks import PRETRAINING_SETS
    from vidray.train.runs import refuse_ignored_overrides

    run_dir, overrides = _pretraining_run_as_started(tmp_path, 0, saved_dropout=0.0)
    changed = [*overrides, "pretrain.lr=1e-3", "train.lr=3e-4"]  # train.lr: demo.yaml's for fine-tuning, edited
    with pytest.raises(UserError) as refused:
        pretrain_driver.pretraining_run_state(as_pretraining(demo_config(*changed)), str(run_dir))
    message = str(refused.value)
    assert "(pretrain.lr differ)" in message, message
    hint = message.split("with the override(s) ")[1].split(", or pass")[0]
    assert hint == "pretrain.lr=0.0002", hint
    refuse_ignored_overrides("vidray pretrain", hint.split(" "), PRETRAINING_SETS)  # the command line takes it
    continued = as_pretraining(demo_config(*changed, *hint.split(" ")))
    assert pretrain_driver.pretraining_run_state(continued, str(run_dir)) == "interrupted"
    # The comparison of a training run's (train.lr is what it trains with) still compares every key.
    with pytest.raises(UserError, match=r"\(pretrain.lr, train.lr differ\)"):
        existing_run_state(as_pretraining(demo_config(*changed)), str(run_dir))


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.lr=1e-4", "train.lr=1e-4 has no effect on `vidray pretrain`: pretrain.lr sets it there; pass pretrain.lr=1e-4 instead"),
        ("train.weight_decay=0.1", "train.weight_decay=0.1 has no effect on `vidray pretrain`: pretrain.weight_decay sets it "
                                   "there; pass pretrain.weight_decay=0.1 instead"),
        ("train.mixup_alpha=0.4", "train.mixup_alpha=0.4 has no effect on `vidray pretrain`: drop the override"),
        ("model.dropout=0.1", "model.dropout=0.1 has no effect on `vidray pretrain`: drop the override"),
    ],
)  # fmt: skip
def test_an_override_pretraining_ignores_is_refused(override, message):
    """`vidray pretrain train.lr=1e-4` pretrained at pretrain.lr without a word. Overrides only: demo.yaml sets
    train.lr for `vidray train`, and `vidray pretrain --config configs/demo.yaml` must run as shipped."""
    from vidray.pretrain.checks import PRETRAINING_SETS
    from vidray.train.runs import refuse_ignored_overrides

    with pytest.raises(UserError) as err:
        refuse_ignored_overrides("vidray pretrain", ["pretrain.epochs=2", override], PRETRAINING_SETS)
    assert str(err.value) == message
    # Each of them is ignored indeed: the pretraining run is the same with or without them.
    cfg = demo_config("train.lr=1e-4", "train.weight_decay=0.3", "train.mixup_alpha=0.4", "model.dropout=0.1")
    assert as_pretraining(cfg).model_dump() == as_pretraining(demo_config()).model_dump()
    refuse_ignored_overrides("vidray pretrain", ["pretrain.lr=1e-4", "train.num_workers=2", "data.frames=8"], PRETRAINING_SETS)


# ----------------------------------------------------------------- model and encoder (no Ray)


def test_continuing_pretraining_keeps_every_weight_and_interpolates_both_position_tables(tmp_path):
    cfg = demo_config()
    torch.manual_seed(0)
    first = build_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    first.save_pretrained(tmp_path / "full")
    save_encoder(first, tmp_path / "encoder")
    model_cfg = cfg.model.model_copy(update={"init": "pretrained", "patch_size": None})

    # From a pretraining checkpoint: encoder and decoder continue as they were; from its folder's URI too (a bucket
    # run's `vidray pretrain` writes there and names it; file:// is read as s3:// and gs:// are, copied here first).
    same = build_pretraining_model(model_cfg.model_copy(update={"name_or_path": str(tmp_path / "full")}), cfg.pretrain, 8, 32)
    assert_same_tensors(first.state_dict(), same.state_dict())
    uri = model_cfg.model_copy(update={"name_or_path": f"file://{tmp_path / 'full'}"})
    check_pretraining_model(uri, cfg.pretrain, 8, 32)
    assert_same_tensors(first.state_dict(), build_pretraining_model(uri, cfg.pretrain, 8, 32).state_dict())
    # From an encoder: the encoder's weights, a fresh decoder and a fresh last norm.
    encoder_only = build_pretraining_model(
        model_cfg.model_copy(update={"name_or_path": str(tmp_path / "encoder")}), cfg.pretrain, 8, 32
    )
    reference = first.state_dict()
    for name, tensor in encoder_only.state_dict().items():
        if name.startswith("videomae.") and not name.startswith("videomae.layernorm."):
            assert torch.equal(tensor, reference[name]), name
    assert not torch.equal(encoder_only.decoder.head.weight, first.decoder.head.weight)

    # At another input size, both sinusoid tables are the 2 x 4 x 4 ones resized, not HF's 1-D rebuild.
    larger = build_pretraining_model(model_cfg.model_copy(update={"name_or_path": str(tmp_path / "full")}), cfg.pretrain, 16, 48)
    assert getattr(larger.config, POS_GRID_KEY) == [2, 4, 4] and token_grid(larger.config) == (4, 6, 6)
    larger.save_pretrained(tmp_path / "larger")
    reloaded = load_pretraining_model(tmp_path / "larger")
    assert torch.equal(reloaded.position_embeddings, larger.position_embeddings)
    assert torch.equal(reloaded.videomae.embeddings.position_embeddings, larger.videomae.embeddings.position_embeddings)
    assert reloaded.position_embeddings.shape == (1, 144, cfg.pretrain.decoder_width)


def test_reconstruction_keeps_the_visible_patches_and_greys_out_the_hidden_ones():
    cfg = demo_config()
    videos = torch.randint(0, 256, (2, 16, 36, 36, 3), dtype=torch.uint8)
    pixels = transforms.eval_transform(videos, frames=8, size=32)
    mask = tube_mask(2, (2, 4, 4), 0.75, torch.Generator().manual_seed(0))
    # Token (t, h, w) covers frames 4t .. 4t + 3 (tubelet 4) and the 8 x 8 pixels of patch (h, w).
    hidden = mask.reshape(2, 2, 4, 4).repeat_interleave(4, 1).repeat_interleave(8, 2).repeat_interleave(8, 3).numpy()
    for norm_pix_loss in (True, False):
        pretrain = cfg.pretrain.model_copy(update={"norm_pix_loss": norm_pix_loss})
        clips = reconstruct(build_pretraining_model(cfg.model, pretrain, 8, 32), pixels, mask)
        original = clips["original"]
        assert original.shape == (2, 8, 32, 32, 3)
        # The original is the eval clip (evenly spaced frames, centre crop) back in 0..1.
        np.testing.assert_allclose(original, videos[:, 0::2, 2:34, 2:34].numpy() / 255, atol=1e-5)
        assert (clips["masked"][hidden] == 0.5).all()
        np.testing.assert_array_equal(clips["masked"][~hidden], original[~hidden])
        np.testing.assert_array_equal(clips["reconstruction"][~hidden], original[~hidden])
        # An untrained decoder's guesses are not the hidden pixels.
        assert np.abs(clips["reconstruction"][hidden] - original[hidden]).mean() > 0.05


def _labelled_split(root: Path, labels: list[int], rows_per_shard: int = 16) -> str:
    """A raw-store dataset whose train split holds rows labelled ``labels``, in that order, over several shards."""
    rows = [dict(video=bytes([i % 256]) * (2 * 8 * 8 * 3), label=label, label_name=f"c{label}", video_id=f"v{i}",
                 path=f"/x/v{i}.mp4", source_frames=2, padded=False) for i, label in enumerate(labels)]  # fmt: skip
    (root / "train").mkdir(parents=True)
    shards = []
    for k in range(0, len(rows), rows_per_shard):
        shards.append(f"train/part-{k:05d}.parquet")
        pq.write_table(pa.Table.from_pylist(rows[k : k + rows_per_shard], schema=SHARD_SCHEMA), root / shards[-1])
    classes = [f"c{label}" for label in range(max(labels) + 1)]
    per_class = {name: labels.count(label) for label, name in enumerate(classes)}
    (root / DATASET_INFO).write_text(json.dumps(dict(
        classes=classes, frames=2, size=8, stored_frames=2, stored_size=8, shards=shards,
        splits={"train": {"videos": len(rows), "per_class": per_class}},
    )))  # fmt: skip
    return str(root)


@pytest.mark.parametrize(
    "labels, chosen, read_at_most",
    [
        ([0] * 48, ["v0", "v1", "v2", "v3"], 8),  # one class (an unlabelled corpus): the first batch
        ([0] * 16 + [1] * 16 + [2] * 16, ["v0", "v16", "v32", "v1"], 40),  # fewer classes than clips: until the last
        ([k // 8 for k in range(40)], ["v0", "v8", "v16", "v24"], 32),  # as many classes or more: one per class
    ],
)
def test_figure_clips_stop_reading_once_the_classes_the_split_holds_turned_up(tmp_path, monkeypatch, labels, chosen, read_at_most):
    """The reconstruction figure's clips (every `vidray pretrain`, a finished one too) were read until 4 classes
    turned up: a split of fewer classes was read whole, into Python bytes, for 4 clips. Its classes are
    dataset.json's now, and reading stops once each has a clip and 4 are chosen: the same clips as before."""
    root = _labelled_split(tmp_path, labels)
    read = []
    real = pretrain_driver.read_split_batches

    def counted(*args, **kwargs):
        for batch in real(*args, **kwargs):
            read.append(len(batch["label"]))
            yield batch

    monkeypatch.setattr(pretrain_driver, "read_split_batches", counted)
    assert [row["video_id"] for row in figure_clips(root, read_dataset_info(root), "train")] == chosen
    assert sum(read) <= read_at_most


# ----------------------------------------------------------------- real Ray Train runs


def pretrain_config(dataset_dir: str, storage: Path, name: str, *overrides: str):
    """test_train's run settings (data, seed, failures, prefetch), pretraining a tiny model from scratch."""
    return config_for(
        dataset_dir,
        ModelSettings().name_or_path,  # unused: init=scratch
        storage,
        name,
        "model.init=scratch",
        "model.size=tiny",
        "model.patch_size=8",
        f"pretrain.epochs={EPOCHS}",
        f"pretrain.batch_size={GLOBAL_BATCH}",
        "pretrain.lr=1e-3",
        "pretrain.warmup_epochs=1",
        # Raw pixel targets: test_train's clips are mostly noise around one grey level, which the
        # per-patch normalisation would turn into unpredictable targets (a loss stuck near 1).
        "pretrain.norm_pix_loss=false",
        *[f"pretrain.{key}={value}" for key, value in TINY_DECODER.items()],
        "train.num_workers=2",
        "train.cpus_per_worker=0.5",
        "train.seed=3",
        *overrides,
    )


def prepare_pretrain_run(cfg, tmp: Path, *, kill_at_epoch: int | None = None) -> tuple:
    return prepare_run(
        cfg, tmp, kill_at_epoch=kill_at_epoch, build=build_pretrainer, run_config_of=make_pretraining_run_config
    )


def with_info(outcome: dict) -> dict:
    return {**outcome, "info": read_checkpoint_info(outcome["result"].checkpoint.path)}


@pytest.fixture(scope="module")
def clips_dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("pretrain_clips"), shuffle_time=False)


@pytest.fixture(scope="module")
def pretrain_runs(ray_cluster, clips_dataset, tmp_path_factory) -> dict[str, dict]:
    """Both runs, fitted side by side (tests/test_train.py's :func:`run_side_by_side`). Their 4 workers
    take 0.25 CPU each, so the streamed run's Ray Data reads find a free CPU beside them."""
    tmp = tmp_path_factory.mktemp("pretrain_runs")
    uninterrupted = pretrain_config(clips_dataset, tmp / "runs", "uninterrupted", "train.cpus_per_worker=0.25")
    killed = pretrain_config(
        clips_dataset, tmp / "runs", "killed", "train.cache_dataset=never", "train.cpus_per_worker=0.25"
    )
    outcomes = run_side_by_side(
        {
            "uninterrupted": prepare_pretrain_run(uninterrupted, tmp),
            "killed": prepare_pretrain_run(killed, tmp, kill_at_epoch=1),
        }
    )
    return {name: with_info(outcome) for name, outcome in outcomes.items()}


@pytest.fixture(scope="module")
def uninterrupted(pretrain_runs):
    return pretrain_runs["uninterrupted"]


@pytest.fixture(scope="module")
def killed(pretrain_runs):
    return pretrain_runs["killed"]


def test_pretraining_loss_falls_on_two_ddp_workers(uninterrupted):
    history = uninterrupted["info"]["history"]
    losses = [h["train_loss"] for h in history]
    assert [h["epoch"] for h in history] == list(range(EPOCHS))
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b < a for a, b in zip(losses, losses[1:])), losses
    assert all(h["train_videos"] == TRAIN_VIDEOS for h in history)
    masking = uninterrupted["info"]["masking"]
    # 32 px in 8 px patches: 4 x 4 positions, round(0.9 x 16) = 14 hidden in each of 4 time steps.
    assert masking == {"token_grid": [4, 4, 4], "mask_ratio": 0.9, "hidden_tokens_per_clip": 56}
    assert Path(uninterrupted["result"].path).name == "uninterrupted-pretrain"


def test_killed_worker_resumes_at_the_next_epoch_and_ends_where_the_uninterrupted_run_ends(killed, uninterrupted):
    assert killed["killed"], "the fault hook never fired"
    assert [r["metrics"]["epoch"] for r in killed["reports"]] == list(range(EPOCHS))
    steps = TRAIN_VIDEOS // GLOBAL_BATCH
    assert [r["metrics"]["global_step"] for r in killed["reports"]] == [steps * (e + 1) for e in range(EPOCHS)]
    assert [h["epoch"] for h in killed["info"]["history"]] == list(range(EPOCHS))
    state = load_training_state(killed["result"].checkpoint.path)
    assert state["epoch"] == EPOCHS - 1 and len(state["mask_rng"]) == len(state["rng"]) == 2
    # Same masks, crops, batches and weights as if nothing had happened, from device-cached or streamed data.
    assert (uninterrupted["info"]["ingest"]["placement"], killed["info"]["ingest"]["placement"]) == ("device", "ray_data")
    assert len(uninterrupted["info"]["history"]) == len(killed["info"]["history"]) == EPOCHS
    for a, b in zip(uninterrupted["info"]["history"], killed["info"]["history"]):
        assert (a["train_loss"], a["lr"], a["global_step"]) == (b["train_loss"], b["lr"], b["global_step"])
    model_a = load_pretraining_model(Path(uninterrupted["result"].checkpoint.path) / MODEL_DIR)
    model_b = load_pretraining_model(Path(killed["result"].checkpoint.path) / MODEL_DIR)
    assert_same_tensors(model_a.state_dict(), model_b.state_dict())


@pytest.fixture(scope="module")
def finished(uninterrupted, tmp_path_factory):
    """``vidray pretrain --config C`` run again on the finished run (in this process, on the session's
    cluster): it trains nothing, writes the encoder and figures; its stdout's last line is the summary."""
    config = tmp_path_factory.mktemp("pretrain_cli") / "config.yaml"
    config.write_text(yaml.safe_dump(uninterrupted["cfg"].model_dump(mode="json")))
    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        assert cli_main(["pretrain", "--config", str(config)]) in (0, None)
    return json.loads(stdout.getvalue().strip().splitlines()[-1])


def test_rerunning_a_finished_run_writes_the_encoder_and_the_figures(finished, uninterrupted):
    cfg = uninterrupted["cfg"]
    run_dir = Path(uninterrupted["result"].path)
    assert existing_run_state(as_pretraining(cfg), str(run_dir)) == "finished"
    assert finished["run_dir"] == str(run_dir) and finished["model_dir"] == str(run_dir / ENCODER_DIR)
    assert finished["checkpoint"] == uninterrupted["result"].checkpoint.path
    assert finished["last"]["epoch"] == EPOCHS and finished["last"]["train_loss"] > 0
    assert sorted(Path(p).name for p in finished["figures"]) == ["pretrain_loss.png", "pretrain_reconstruction.png"]
    for path in finished["figures"]:
        assert Path(path).parent == run_dir / "reports" / "figures"  # the pretraining run's own reports
        with Image.open(path) as image:
            assert image.format == "PNG" and min(image.size) > 300
    provenance = json.loads((run_dir / ENCODER_DIR / "vidray_pretrain.json").read_text())
    assert provenance["epochs"] == EPOCHS and provenance["splits"] == ["train"]


def test_the_encoder_loads_into_fine_tuning_exactly(finished, uninterrupted):
    pretrained = load_pretraining_model(Path(finished["checkpoint"]) / MODEL_DIR).state_dict()
    model_cfg = ModelSettings(init="pretrained", name_or_path=finished["model_dir"])
    classifier = build_model(model_cfg, CLASSES, FRAMES, SIZE)
    state = classifier.state_dict()
    backbone = [k for k in pretrained if k.startswith("videomae.") and not k.startswith("videomae.layernorm.")]
    assert len(backbone) == len([k for k in state if k.startswith("videomae.")]) > 20
    for name in backbone:
        assert torch.equal(state[name], pretrained[name]), name
    # A new head on mean-pooled tokens; patch, tubelet, frames and size from the encoder's config.
    assert sorted(k for k in state if not k.startswith("videomae.")) == [
        "classifier.bias", "classifier.weight", "fc_norm.bias", "fc_norm.weight"
    ]  # fmt: skip
    config = classifier.config
    assert (config.patch_size, config.tubelet_size, config.num_frames, config.image_size) == (8, 2, FRAMES, SIZE)
    assert config.use_mean_pooling and token_grid(config) == (4, 4, 4)


def test_vidray_tune_sweeps_from_the_encoder(finished, clips_dataset, tmp_path):
    """A one-trial, one-epoch sweep from the encoder (in this process, on the session's cluster):
    the trial runs `vidray train`'s loop, which fine-tunes it (a new head, no decoder), and the sweep
    writes its table and exports its best model."""
    from vidray.report.results import report_sweep
    from vidray.tune.sweep import run_sweep

    # A sweep prepares its own data (here: demo videos of the clip shape the encoder was pretrained on).
    dataset_dir = tmp_path / "dataset"
    cfg = config_for(
        str(dataset_dir), finished["model_dir"], tmp_path / "runs", "sweep_from_pretrained",
        "data.source=demo", "data.demo.classes=2", "data.demo.videos_per_class=10",
        f"data.videos_dir={tmp_path / 'videos'}", f"data.manifest={tmp_path / 'manifest.parquet'}",
        "train.epochs=1", "tune.mixup_alpha=[0.0]", "tune.lr=[1e-3]", "tune.weight_decay=[0.05]", "tune.asha=false",
    )  # fmt: skip
    summary = report_sweep(run_sweep(cfg))
    assert summary["trials"] == 1 and summary["errored"] == 0, summary
    assert Path(summary["results_md"]).is_file()
    best_checkpoint = json.loads(Path(summary["results_json"]).read_text())["best"]["checkpoint"]
    trained, trained_info = load_trained_model(best_checkpoint)
    assert trained_info["metrics"]["epoch"] == 0 and np.isfinite(trained_info["metrics"]["train_loss"])
    assert not hasattr(trained, "decoder")
    best, info = load_trained_model(summary["best"]["exported_model"])
    classes = read_dataset_info(str(dataset_dir)).classes
    assert len(classes) == 2 and best.config.id2label == dict(enumerate(classes)) and not hasattr(best, "decoder")
    # The encoder's geometry, carried by its config into the sweep's model.
    assert (best.config.patch_size, best.config.tubelet_size, best.config.use_mean_pooling) == (8, 2, True)
    assert info["config"]["model"]["name_or_path"] == finished["model_dir"]
