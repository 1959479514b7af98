"""Real Ray Train runs on CPU: a tiny VideoMAE on synthetic clips whose classes only differ in time.

Three runs are shared by the tests of this module (module-scoped fixtures; fitted side by side
by :func:`train_runs`):

* ``ordered``: 2 DDP workers on the in-order clips, data placement ``auto``
  (which keeps each worker's shard in its memory: the device path); rank 1 is
  killed once in the middle of epoch 2 and the run must resume from the epoch-1 checkpoint.
* ``shuffled``: 1 worker on the same clips with every video's frames shuffled
  in time (the frame-order control), fed by Ray Data from the object store
  (``train.cache_dataset=always``). Its shards hold the raw frames that the
  ``jpeg`` store of those clips decodes to.
* ``shuffled_killed``: the same clips from the ``jpeg`` store (data.store,
  vidray/data/store.py) on the device path (``train.cache_dataset=device``, the
  compressed clips in the worker's memory) with its only worker killed once in
  the middle of epoch 1: it must reproduce ``shuffled`` exactly, so the device
  path gives the Ray Data path's batches and augmentation stream, training from
  the jpeg store is training on its decoded frames, and a run resumes bit-exactly.

The classes are two time-reversal pairs (a square moving right / left, and
down / up): within a pair the set of frames has the same distribution, so only
frame order separates them, while the pairs differ in appearance (horizontal
vs vertical travel). A model that cannot see order is at 50 % within a pair.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import ray
import ray.cloudpickle
import ray.train
import torch

from conftest import assert_same_tensors
from vidray.model import transforms
from vidray.model.checkpoint import INFO, MODEL_DIR, TRAINING_STATE, TRAINING_TENSORS, load_training_state
from vidray.model.classifier import load_trained_model
from vidray.config import TrainSettings, load_config
from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA, read_dataset_info, videos_from_bytes
from vidray.data.store import encode_clip
from vidray.errors import UserError
from vidray.storage import remove_orphaned_scratch
from vidray.testing.faults import kill_env
from vidray.train.placement import should_cache_dataset
from vidray.train.metrics import EPOCH_METRICS
from vidray.train.telemetry import EPOCH_TELEMETRY
from vidray.model.classifier import POS_GRID_KEY
from vidray.train.optim import parameter_groups
from vidray.train.driver import build_trainer, make_run_config, summarize_run

REPO = Path(__file__).resolve().parents[1]
CLASSES = ["moving_right", "moving_left", "moving_down", "moving_up"]
PAIRS = [(0, 1), (2, 3)]
STORED_FRAMES, STORED_SIZE, FRAMES, SIZE = 16, 40, 8, 32
TRAIN_PER_CLASS, VAL_PER_CLASS = 48, 12
VAL_VIDEOS = 4 * VAL_PER_CLASS - 1  # odd: two workers cannot split it evenly
EPOCHS = 4

# The callback below runs in the Ray Train controller process; ship it by value.
ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])


# ----------------------------------------------------------------- data


def render_clip(label: int, rng: np.random.Generator) -> np.ndarray:
    """uint8 [T, S, S, 3]: a bright square crossing a noisy dark frame.

    The forward member of each pair is drawn, then transposed (vertical pair)
    and/or played backwards (second member), so both members of a pair share
    one distribution of frames.
    """
    side = STORED_SIZE // 4
    x = np.linspace(rng.uniform(0, 0.15 * STORED_SIZE), rng.uniform(0.6 * STORED_SIZE, STORED_SIZE - side), STORED_FRAMES)
    y = int(round(rng.uniform(0, STORED_SIZE - side)))
    video = rng.normal(40, 15, size=(STORED_FRAMES, STORED_SIZE, STORED_SIZE, 3))
    color = rng.uniform(150, 255, size=3)
    for t in range(STORED_FRAMES):
        x0 = int(round(x[t]))
        video[t, y : y + side, x0 : x0 + side] = color
    video = np.clip(video, 0, 255).astype(np.uint8)
    if label >= 2:
        video = video.transpose(0, 2, 1, 3)
    if label % 2:
        video = video[::-1]
    return np.ascontiguousarray(video)


def write_dataset(root: Path, *, shuffle_time: bool, seed: int = 0, rows_per_shard: int = 16) -> str:
    """Shards + dataset.json exactly as vidray/data/dataset.py specifies them."""
    counts = {}
    for split, per_class in (("train", TRAIN_PER_CLASS), ("val", VAL_PER_CLASS)):
        rng = np.random.default_rng([seed, len(split)])
        rows = []
        for i in range(per_class):
            for label, name in enumerate(CLASSES):
                video = render_clip(label, rng)
                if shuffle_time:
                    video = video[rng.permutation(STORED_FRAMES)]
                rows.append(
                    dict(
                        video=video.tobytes(),
                        label=label,
                        label_name=name,
                        video_id=f"{name}_{i:03d}",
                        path=f"/synthetic/{split}/{name}_{i:03d}.mp4",
                        source_frames=STORED_FRAMES,
                        padded=False,
                    )
                )
        if split == "val":
            rows = rows[:-1]
        rows = [rows[j] for j in np.random.default_rng([seed, 1]).permutation(len(rows))]
        (root / split).mkdir(parents=True)
        for k in range(0, len(rows), rows_per_shard):
            table = pa.Table.from_pylist(rows[k : k + rows_per_shard], schema=SHARD_SCHEMA)
            pq.write_table(table, root / split / f"part-{k // rows_per_shard:05d}.parquet")
        counts[split] = {"videos": len(rows)}
    info = dict(
        classes=CLASSES, frames=FRAMES, size=SIZE, stored_frames=STORED_FRAMES, stored_size=STORED_SIZE, splits=counts
    )
    (root / DATASET_INFO).write_text(json.dumps(info))
    return str(root)


def write_store_twin(source: str, root: Path, store: str) -> str:
    """The rows of the raw dataset ``source`` in the ``jpeg`` store (quality 90), or (``raw-decoded``)
    as raw frames of what that jpeg store decodes to: two datasets that must train alike."""
    info = json.loads((Path(source) / DATASET_INFO).read_text())
    shape = (info["stored_frames"], info["stored_size"], info["stored_size"], 3)
    for split in info["splits"]:
        (root / split).mkdir(parents=True)
        for shard in sorted((Path(source) / split).glob("*.parquet")):
            table = pq.read_table(shard)
            blobs = []
            for blob in table.column("video").to_pylist():
                jpeg = encode_clip(np.frombuffer(blob, np.uint8).reshape(shape), "jpeg", 90)
                blobs.append(jpeg if store == "jpeg" else videos_from_bytes([jpeg], shape, "jpeg")[0].tobytes())
            pq.write_table(table.set_column(0, "video", pa.array(blobs, pa.binary())), root / split / shard.name)
    (root / DATASET_INFO).write_text(json.dumps({**info, "store": "jpeg" if store == "jpeg" else "raw"}))
    return str(root)


@pytest.fixture(scope="module")
def start_checkpoint(tmp_path_factory) -> str:
    """The "pretrained" model the runs start from: a tiny random VideoMAE saved like a hub checkpoint.

    Saved at 64² so training at 32² also exercises the position-table
    interpolation (8 x 8 -> 4 x 4 patches) inside real workers and checkpoints.
    Patch 8 keeps a 4 x 4 grid at 32², enough to see where the square is.
    """
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=512,
        patch_size=8,
        num_frames=8,
        image_size=64,
        num_labels=2,
    )
    directory = tmp_path_factory.mktemp("start_checkpoint")
    VideoMAEForVideoClassification(config).save_pretrained(directory)
    return str(directory)


@pytest.fixture(scope="module")
def ordered_dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("ordered"), shuffle_time=False)


@pytest.fixture(scope="module")
def shuffled_dataset(tmp_path_factory) -> str:
    return write_dataset(tmp_path_factory.mktemp("shuffled"), shuffle_time=True)


@pytest.fixture(scope="module")
def shuffled_stores(shuffled_dataset, tmp_path_factory) -> dict[str, str]:
    """``shuffled_dataset`` in the jpeg store, and as raw frames of what that store decodes to."""
    return {store: write_store_twin(shuffled_dataset, tmp_path_factory.mktemp(store), store) for store in ("jpeg", "raw-decoded")}


# ----------------------------------------------------------------- runs


class RecordReports(ray.train.UserCallback):
    """Appends what every ``ray.train.report`` delivered to the controller to a JSON-lines file."""

    def __init__(self, path: str):
        self.path = path

    def after_report(self, run_context, metrics, checkpoint):
        with open(self.path, "a") as f:
            f.write(json.dumps({"metrics": metrics[0], "checkpoint": checkpoint.path if checkpoint else None}) + "\n")


def config_for(dataset_dir: str, start_checkpoint: str, storage: Path, name: str, *overrides: str):
    return load_config(
        None,
        [
            f"data.dataset_dir={dataset_dir}",
            f"data.frames={FRAMES}",
            f"data.size={SIZE}",
            f"data.stored_frames={STORED_FRAMES}",
            f"data.stored_size={STORED_SIZE}",
            "model.init=pretrained",
            f"model.name_or_path={start_checkpoint}",
            f"train.epochs={EPOCHS}",
            "train.batch_size=8",
            "train.lr=1e-3",
            "train.warmup_epochs=0.5",
            "train.weight_decay=0.05",
            # One failure is ours (the fault hook); the spare retries absorb infrastructure hiccups
            # (a busy 2-core box) that a resumable run must survive anyway.
            "train.max_failures=3",
            "train.prefetch_batches=1",
            "train.seed=7",
            f"run.storage_path={storage}",
            f"run.name={name}",
            *overrides,
        ],
    )


def prepare_run(cfg, tmp: Path, *, kill_at_epoch: int | None = None, build=build_trainer, run_config_of=make_run_config):
    """A run ready to ``fit()`` through ``build`` (tests/test_pretrain.py passes the pretraining pair),
    with a RunSettings that also records every report: (trainer, what :func:`finish_run` needs)."""
    reports = tmp / f"{cfg.run.name}-reports.jsonl"
    marker = tmp / f"{cfg.run.name}-killed"
    env = kill_env(kill_at_epoch, str(marker)) if kill_at_epoch is not None else {}
    run_config = run_config_of(
        cfg, callbacks=[RecordReports(str(reports))], worker_runtime_env={"env_vars": env}
    )
    return build(cfg, run_config=run_config), {"reports": reports, "marker": marker, "cfg": cfg}


def finish_run(result, paths: dict) -> dict:
    return {
        "result": result,
        "summary": summarize_run(result.path),
        "reports": [json.loads(line) for line in paths["reports"].read_text().splitlines()],
        "killed": paths["marker"].is_file(),
        "cfg": paths["cfg"],
    }


def run_side_by_side(prepared: dict[str, tuple]) -> dict[str, dict]:
    """Fit the prepared runs at once, each from a thread of its own, on the session's cluster.

    Every trainer is built (its splits read into the object store) before any fit starts, so no
    run's Ray Data read waits for CPUs the others' workers hold. On two cores one run's start-up,
    polls and checkpoint writes overlap the others' steps; each run's own numbers do not depend
    on its neighbours (one thread per worker, its own seeds, storage and reports).
    """
    with ThreadPoolExecutor(len(prepared)) as pool:
        fits = {name: pool.submit(trainer.fit) for name, (trainer, _) in prepared.items()}
        return {name: finish_run(fits[name].result(), prepared[name][1]) for name in prepared}


@pytest.fixture(scope="module")
def train_runs(ray_cluster, ordered_dataset, shuffled_stores, start_checkpoint, tmp_path_factory) -> dict[str, dict]:
    """The module's three runs, fitted side by side: their placement groups together take the
    cluster's 2 CPUs (2 x 0.5 + 0.5 + 0.5)."""
    tmp = tmp_path_factory.mktemp("train_runs")
    ordered = config_for(
        ordered_dataset, start_checkpoint, tmp / "runs", "ordered", "train.num_workers=2", "train.cpus_per_worker=0.5"
    )
    # The shuffled pair also mixes (MixUp, CutMix, flips), so the bit-exact resume below covers the jpeg
    # store's frame sampler replaying those draws ahead of the step. The frame-order control does not
    # care: with its frames shuffled a model is blind to the direction however it trains.
    mixing = ("train.mixup_alpha=0.4", "train.cutmix_alpha=1.0", "train.hflip=true")
    # Written in line (checkpoint_in_background=false), as shuffled_killed's are not: the same checkpoints either way.
    shuffled = config_for(
        shuffled_stores["raw-decoded"], start_checkpoint, tmp / "runs", "shuffled", "train.cpus_per_worker=0.5",
        "train.cache_dataset=always", "train.checkpoint_in_background=false", *mixing,
    )  # fmt: skip
    # Compressed clips from the worker's own memory while `shuffled` iterates Ray Data over their decoded
    # frames: the two must still agree bit for bit.
    shuffled_killed = config_for(
        shuffled_stores["jpeg"], start_checkpoint, tmp / "runs", "shuffled_killed", "train.cpus_per_worker=0.5",
        "train.cache_dataset=device", *mixing,
    )  # fmt: skip
    return run_side_by_side(
        {
            "ordered": prepare_run(ordered, tmp, kill_at_epoch=2),
            "shuffled": prepare_run(shuffled, tmp),
            "shuffled_killed": prepare_run(shuffled_killed, tmp, kill_at_epoch=1),
        }
    )


@pytest.fixture(scope="module")
def ordered(train_runs):
    return train_runs["ordered"]


@pytest.fixture(scope="module")
def shuffled(train_runs):
    return train_runs["shuffled"]


@pytest.fixture(scope="module")
def shuffled_killed(train_runs):
    return train_runs["shuffled_killed"]


def _history(outcome: dict) -> list[dict]:
    return _last_info(outcome)["history"]


def _last_info(outcome: dict) -> dict:
    return json.loads((Path(outcome["result"].checkpoint.path) / INFO).read_text())


def _val_split(dataset_dir: str) -> tuple[torch.Tensor, np.ndarray]:
    table = pq.read_table(Path(dataset_dir) / "val")
    shape = (STORED_FRAMES, STORED_SIZE, STORED_SIZE, 3)
    videos = torch.from_numpy(videos_from_bytes(table["video"].to_pylist(), shape).copy())
    return videos, np.array(table["label"].to_pylist())


@torch.no_grad()
def _predict(model, videos: torch.Tensor) -> np.ndarray:
    model.eval()
    logits = model(pixel_values=transforms.eval_transform(videos, frames=FRAMES, size=SIZE)).logits
    return logits.argmax(-1).numpy()


def _pair_accuracy(confusion: list[list[int]]) -> float:
    """Among val videos predicted inside their own pair: how often the direction is right."""
    right = sum(confusion[a][a] + confusion[b][b] for a, b in PAIRS)
    within = sum(confusion[a][a] + confusion[a][b] + confusion[b][a] + confusion[b][b] for a, b in PAIRS)
    return right / within


# ----------------------------------------------------------------- tests


def test_two_workers_learn_temporal_classes_and_report_full_val_metrics(ordered):
    history = _history(ordered)
    last = history[-1]
    assert history[0]["train_loss"] > 1.2  # ~ln 4 at the start
    assert last["train_loss"] < 0.5 * history[0]["train_loss"]
    assert last["val_accuracy"] >= 0.85, [h["val_accuracy"] for h in history]
    for metrics in history:
        assert set(EPOCH_METRICS) <= set(metrics)
        assert {f"val_f1/{c}" for c in CLASSES} <= set(metrics)
        # All 47 val videos, split unevenly over the two workers, are in every evaluation.
        assert metrics["val_videos"] == VAL_VIDEOS
        assert metrics["val_micro_f1"] == pytest.approx(metrics["val_accuracy"])
    confusion = np.array(_last_info(ordered)["metrics"]["val_confusion"])
    assert confusion.sum() == VAL_VIDEOS
    assert confusion.sum(axis=1).tolist() == [VAL_PER_CLASS] * 3 + [VAL_PER_CLASS - 1]
    assert np.trace(confusion) / VAL_VIDEOS == pytest.approx(last["val_accuracy"])
    summary = ordered["summary"]
    assert summary["last"]["epoch"] == EPOCHS  # epochs done, as the console counts them
    # The best epoch's checkpoint is always among those kept.
    assert summary["best"]["val_macro_f1"] == max(h["val_macro_f1"] for h in history)
    assert summary["checkpoint"] == ordered["result"].checkpoint.path


def test_auto_placement_keeps_the_shards_in_worker_memory_and_reports_step_telemetry(ordered, shuffled):
    # On CPU the "device" is the worker's memory; the test's tiny shards fit a quarter of it.
    assert ordered["cfg"].train.cache_dataset == "auto"
    assert _last_info(ordered)["ingest"]["placement"] == "device"
    for outcome in (ordered, shuffled):
        for report in outcome["reports"]:
            metrics = report["metrics"]
            assert set(EPOCH_TELEMETRY) <= set(metrics), sorted(metrics)
            assert 0 <= metrics["data_wait_share"] <= 1 and metrics["step_s"] > 0 and metrics["clips_per_s"] > 0
            assert "mfu" not in metrics  # no peak to compare a CPU with
    # Every epoch after the first of a (re)started worker group says how long the ranks waited in the
    # previous report (the checkpoint write included).
    waits = [r["metrics"].get("last_report_wait_s") for r in shuffled["reports"]]
    assert waits[0] is None and all(w is not None and w >= 0 for w in waits[1:])


def test_killed_worker_resumes_without_repeating_or_skipping_an_epoch(ordered):
    assert ordered["killed"], "the fault hook never fired"
    reported = [r["metrics"]["epoch"] for r in ordered["reports"]]
    assert reported == list(range(EPOCHS))
    assert [h["epoch"] for h in _history(ordered)] == list(range(EPOCHS))
    # One optimizer step per global batch of 8: 192 videos -> 24 per epoch, however often a worker died.
    assert [r["metrics"]["global_step"] for r in ordered["reports"]] == [24 * (e + 1) for e in range(EPOCHS)]
    state = load_training_state(ordered["result"].checkpoint.path)
    assert state["epoch"] == EPOCHS - 1 and state["global_step"] == 24 * EPOCHS
    assert len(state["rng"]) == 2  # one RNG state per rank
    assert Path(ordered["result"].checkpoint.path).name == f"checkpoint_epoch_{EPOCHS - 1:04d}"


def test_checkpoint_layout_reload_and_val_predictions_match_the_report(ordered):
    directory = Path(ordered["result"].checkpoint.path)
    assert (directory / MODEL_DIR / "config.json").is_file()
    assert (directory / MODEL_DIR / "model.safetensors").is_file()
    assert (directory / TRAINING_STATE).is_file() and (directory / TRAINING_TENSORS).is_file()
    # Only the best (by val_macro_f1) and the latest checkpoints are kept.
    kept = sorted(p.name for p in directory.parent.glob("checkpoint_epoch_*"))
    assert len(kept) <= 2 and directory.name in kept

    model, info = load_trained_model(directory)
    assert info["data"] == {
        "classes": CLASSES, "frames": FRAMES, "size": SIZE, "stored_frames": STORED_FRAMES, "stored_size": STORED_SIZE,
        "decoder": "pyav",  # what made the shards (dataset.json), for prediction
    }
    assert info["config"]["train"]["epochs"] == EPOCHS
    assert getattr(model.config, POS_GRID_KEY) == [4, 8, 8]  # 64² start checkpoint, trained at 32²
    assert model.config.id2label == dict(enumerate(CLASSES))

    # Re-evaluate the val shards here, outside Ray: the same predictions the workers reported.
    videos, labels = _val_split(ordered["cfg"].data.dataset_dir)
    predictions = _predict(model, videos)
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    assert confusion.tolist() == info["metrics"]["val_confusion"]


def test_frame_shuffle_control_falls_to_chance_within_direction_pairs(ordered, shuffled, shuffled_dataset):
    ordered_confusion = _last_info(ordered)["metrics"]["val_confusion"]
    shuffled_confusion = _last_info(shuffled)["metrics"]["val_confusion"]
    # In order, the direction is read off nearly always. Trained and evaluated on shuffled frames it
    # is a coin flip: with ~47 decisions a coin reaches 0.75 with probability < 0.1 %, so not flaky.
    assert _pair_accuracy(ordered_confusion) >= 0.85
    assert _pair_accuracy(shuffled_confusion) < 0.75
    assert _history(shuffled)[-1]["val_accuracy"] < _history(ordered)[-1]["val_accuracy"] - 0.25

    # The same trained model, shown the same validation videos with their frames shuffled, loses the
    # direction too: what it learned is frame order, not a per-frame cue.
    model, _ = load_trained_model(ordered["result"].checkpoint.path)
    videos, labels = _val_split(shuffled_dataset)
    predictions = _predict(model, videos)
    confusion = np.zeros((4, 4), dtype=int)
    np.add.at(confusion, (labels, predictions), 1)
    assert _pair_accuracy(confusion.tolist()) < 0.75


def test_interrupted_run_reproduces_the_uninterrupted_run_exactly(shuffled, shuffled_killed):
    """Also: batches from Ray Data over the object store (shuffled) or from the worker's device (shuffled_killed)
    are the same run, and a run resumed on the device path continues it bit for bit. And (issue 18) training
    from the jpeg store (shuffled_killed) is training on a raw dataset of its decoded frames (shuffled)."""
    assert shuffled_killed["killed"] and not shuffled["killed"]
    assert should_cache_dataset(shuffled["cfg"].train, read_dataset_info(shuffled["cfg"].data.dataset_dir))
    assert _last_info(shuffled)["ingest"]["placement"] == "ray_data"
    assert _last_info(shuffled_killed)["ingest"]["placement"] == "device"
    # The checkpoints record the compressed store (for prediction), and nothing for a raw one.
    assert _last_info(shuffled_killed)["data"]["store"] == "jpeg" and "store" not in _last_info(shuffled)["data"]
    # Both mixed: MixUp, CutMix and flips drawn ahead by the jpeg store's frame sampler, through the kill.
    for run in (shuffled, shuffled_killed):
        train = _last_info(run)["config"]["train"]
        assert (train["mixup_alpha"], train["cutmix_alpha"], train["hflip"]) == (0.4, 1.0, True)
    a, b = _history(shuffled), _history(shuffled_killed)
    assert [h["epoch"] for h in b] == list(range(EPOCHS))
    for key in ("train_loss", "val_loss", "val_accuracy", "val_macro_f1", "global_step", "lr"):
        assert [h[key] for h in a] == [h[key] for h in b], key
    model_a, _ = load_trained_model(shuffled["result"].checkpoint.path)
    model_b, _ = load_trained_model(shuffled_killed["result"].checkpoint.path)
    assert_same_tensors(model_a.state_dict(), model_b.state_dict())
    # Whatever checkpoint folder the killed worker was staging, the resumed run's reports removed it.
    assert remove_orphaned_scratch() == []


def test_auto_caching_takes_what_fits_in_a_quarter_of_the_object_store(ray_cluster, shuffled_dataset):
    info = read_dataset_info(shuffled_dataset)
    auto = TrainSettings(cache_dataset="auto")
    assert should_cache_dataset(auto, info)
    object_store = ray_cluster.cluster_resources()["object_store_memory"]
    video_bytes = int(np.prod(info.video_shape))
    too_big = {"train": int(object_store / 4 / video_bytes) + 1, "val": 0}
    assert not should_cache_dataset(auto, dataclasses.replace(info, split_counts=too_big))
    assert should_cache_dataset(TrainSettings(cache_dataset="always"), dataclasses.replace(info, split_counts=too_big))
    assert not should_cache_dataset(TrainSettings(cache_dataset="never"), info)


# ----------------------------------------------------------------- no Ray needed


def test_parameter_groups_decay_and_layer_scales():
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    model = VideoMAEForVideoClassification(
        VideoMAEConfig(hidden_size=32, num_hidden_layers=3, num_attention_heads=2, intermediate_size=64, num_labels=4)
    )
    groups = parameter_groups(model, weight_decay=0.05, layer_decay=0.5)
    by_param = {id(p): g for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert len(by_param) == len(named)
    assert by_param[id(named["classifier.weight"])]["weight_decay"] == 0.05
    assert by_param[id(named["classifier.bias"])]["weight_decay"] == 0.0
    assert by_param[id(named["videomae.encoder.layer.0.layernorm_before.weight"])]["weight_decay"] == 0.0
    assert by_param[id(named["classifier.weight"])]["lr_scale"] == 1.0
    assert by_param[id(named["videomae.encoder.layer.2.attention.attention.query.weight"])]["lr_scale"] == 0.5
    assert by_param[id(named["videomae.encoder.layer.0.output.dense.weight"])]["lr_scale"] == 0.125
    assert by_param[id(named["videomae.embeddings.patch_embeddings.projection.weight"])]["lr_scale"] == 0.0625


def test_bad_settings_fail_before_any_worker_starts(ordered_dataset, start_checkpoint, tmp_path):
    def cfg(*overrides):
        return config_for(ordered_dataset, start_checkpoint, tmp_path, "bad", *overrides)

    with pytest.raises(UserError, match=r"train.batch_size=8 is the global batch and must be divisible by .* = 3"):
        build_trainer(cfg("train.num_workers=3"))
    with pytest.raises(UserError, match=r"data.frames=32 exceeds the 16 frames stored per video in .*ordered"):
        build_trainer(cfg("data.frames=32", "data.stored_frames=32"))
    with pytest.raises(UserError, match=r"data.size=48 exceeds the stored size 40"):
        build_trainer(cfg("data.size=48", "data.stored_size=48"))
    with pytest.raises(UserError, match=r"data.size=28 must be a multiple of the model's patch_size 8"):
        build_trainer(cfg("data.size=28"))
    with pytest.raises(UserError, match=r"fewer than one batch of 256 per worker"):
        build_trainer(cfg("train.batch_size=256"))
    with pytest.raises(UserError, match=r"no dataset.json in .*missing.*vidray preprocess"):
        build_trainer(cfg(), dataset_dir=str(tmp_path / "missing"))


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["train.grad_accum_steps=3"], "train.batch_size=16 is the global batch and must be divisible by "
                                       "train.num_workers x train.grad_accum_steps = 3"),
        (["data.store=jpeg", "train.decode_device=cuda"], "train.decode_device=cuda needs a GPU worker: set "
                                                          "train.use_gpu=true, or train.decode_device=auto"),
    ],
    ids=["micro-batch", "decode-device"],
)  # fmt: skip
def test_a_config_that_cannot_train_is_refused_before_ray_starts(tmp_path, overrides, message):
    """`vidray train train.grad_accum_steps=3` on the demo started Ray, deleted the run it was asked to --restart,
    prepared the whole dataset and only then was refused; train.decode_device=cuda on CPU workers got as far as
    every worker. Now before Ray starts (this lane fails a test that starts it): the run is still there."""
    from vidray.pretrain.driver import run_pretraining
    from vidray.train.driver import run_training
    from vidray.train.runs import RUN_MARKER, mark_run

    cfg = load_config(REPO / "configs" / "demo.yaml", [
        f"run.storage_path={tmp_path / 'runs'}", "run.name=r", "data.source=folder", f"data.videos_dir={tmp_path / 'none'}",
        f"data.manifest={tmp_path / 'm.parquet'}", f"data.dataset_dir={tmp_path / 'dataset'}", *overrides,
    ])  # fmt: skip
    for run, folder in ((run_training, "r"), (run_pretraining, "r-pretrain")):
        if run is run_pretraining and "train.grad_accum_steps=3" in overrides:
            message = message.replace("train.batch_size=16", "pretrain.batch_size=16")
        mark_run(str(tmp_path / "runs" / folder), "pretrain" if "pretrain" in folder else "train", folder)
        with pytest.raises(UserError) as refused:
            run(cfg, restart=True)
        assert str(refused.value) == message
        assert (tmp_path / "runs" / folder / RUN_MARKER).is_file()


def test_jobs_train_reports_config_errors_in_one_line(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "--config", str(tmp_path / "nope.yaml")],
        capture_output=True,
        text=True,
        cwd=REPO,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        f"vidray train: error: config file not found: {tmp_path / 'nope.yaml'} "
        "(pass --config with a YAML file, e.g. configs/coin12.yaml)"
    ]


def _tiny_classifier() -> "torch.nn.Module":
    from transformers import VideoMAEConfig, VideoMAEForVideoClassification

    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8,
        num_frames=FRAMES, image_size=SIZE, num_labels=len(CLASSES), attn_implementation="sdpa",
    )  # fmt: skip
    return VideoMAEForVideoClassification(config)


def _clip_batches(count: int, size: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    batches = []
    for _ in range(count):
        labels = rng.integers(0, len(CLASSES), size)
        videos = np.stack([render_clip(int(label), rng) for label in labels])
        batches.append({"video": torch.from_numpy(videos), "label": torch.from_numpy(labels)})
    return batches


def test_compiled_and_eager_steps_agree_and_a_padded_last_eval_batch_changes_nothing():
    """train.compile: the worker loop's own step (run_epoch with the fine-tuning task's loss) and evaluate,
    eager and through torch.compile."""
    from vidray.config import VidrayConfig
    from vidray.data.dataset import ClipShape
    from vidray.model.classifier import compile_model
    from vidray.train.epoch import StepParts, run_epoch
    from vidray.train.finetune import FineTuning, evaluate
    from vidray.train.loop import WorkerSetup, step_loss
    from vidray.train.optim import build_optimizer, build_lr_schedule
    from vidray.train.rng import AugmentGenerators, seed_everything
    from vidray.train.telemetry import StepTelemetry

    cpu = torch.device("cpu")
    shape = ClipShape(CLASSES, FRAMES, SIZE, STORED_FRAMES, STORED_SIZE)
    train = TrainSettings(batch_size=4, lr=1e-3, mixup_alpha=0.4, log_every_steps=1, epochs=1)
    batches = _clip_batches(3, 4, seed=0)
    val = _clip_batches(2, 4, seed=1)
    val[-1] = {k: v[:3] for k, v in val[-1].items()}  # an odd last batch, as a split's usually is

    def run_steps(compiled: bool):
        model = _tiny_classifier()
        optimizer = build_optimizer(model, train, cpu)
        generators = AugmentGenerators.for_device(cpu)
        seed_everything(5, generators.host, generators.device)
        parts = StepParts(
            model, model, compile_model(model) if compiled else model, optimizer,
            build_lr_schedule(optimizer, train, len(batches)), generators,
        )  # fmt: skip
        lines: list[str] = []
        telemetry = StepTelemetry(flops_per_clip=1e9, world_size=1, device=cpu, log_every=1, console=True, printer=lines.append)
        losses = []
        loss_of = step_loss(FineTuning(WorkerSetup(VidrayConfig(train=train), shape, cpu)), parts, shape, train)
        for step, batch in enumerate(batches):
            loss_sum, count, videos, _ = run_epoch(
                parts, [batch], loss_of, train=train, device=cpu, micro_batches=1, epoch=step,
                global_step=step, telemetry=telemetry,
            )  # fmt: skip
            losses.append(loss_sum / count)
            assert set(telemetry.end_epoch()) == {"step_s", "data_wait_share", "clips_per_s", "achieved_tflops"}
        eval_model = compile_model(model) if compiled else model
        confusion, val_loss = evaluate(eval_model, val, shape=shape, clips=2, device=cpu, pad_to=4 if compiled else None)
        return losses, confusion, val_loss, lines

    eager, compiled = run_steps(False), run_steps(True)
    assert eager[0][0] != eager[0][-1]  # the steps really trained
    np.testing.assert_allclose(compiled[0], eager[0], rtol=1e-4, atol=1e-6)
    assert compiled[1].tolist() == eager[1].tolist() and compiled[1].sum() == 7
    assert compiled[2] == pytest.approx(eager[2], rel=1e-4)
    # One console line per optimizer step (log_every_steps=1), with the window's loss and rates.
    assert len(compiled[3]) == 3 and compiled[3][0].startswith("vidray: epoch 0 step 1 | loss ")
    assert all("s/step" in line and "data wait" in line and "clips/s" in line and "TFLOP/s" in line for line in compiled[3])


def test_a_run_that_is_all_warm_up_is_said_so(capsys):
    """demo.yaml warms pretraining up for 5 epochs; `vidray pretrain pretrain.epochs=2` (as the README's test runs it)
    changed one key only, and the learning rate climbed through every step of the run, never reaching pretrain.lr
    or decaying, without a word. The schedule is the user's to set: the driver says so, once, before the run."""
    from vidray.train.optim import build_lr_schedule, warn_if_warmup_fills_the_run

    train = TrainSettings(epochs=2, warmup_epochs=5, lr=1e-3)
    optimizer = torch.optim.AdamW(torch.nn.Linear(2, 2).parameters(), lr=train.lr)
    schedule = build_lr_schedule(optimizer, train, steps=10)
    lrs = []
    for _ in range(train.epochs * 10):
        optimizer.step()
        schedule.step()
        lrs.append(schedule.get_last_lr()[0])
    assert lrs == sorted(lrs) and lrs[-1] < train.lr / 2  # all warm-up: the peak is never reached
    warn_if_warmup_fills_the_run("vidray pretrain", "pretrain", 2, 5.0)
    assert capsys.readouterr().err == (
        "vidray pretrain: warning: pretrain.warmup_epochs=5 is not shorter than pretrain.epochs=2, so the learning rate "
        "warms up for the whole run, never reaching pretrain.lr or decaying: set pretrain.warmup_epochs below 2\n"
    )
    for epochs, warmup in ((3, 2.0), (2, 0.0), (40, 2.5)):
        warn_if_warmup_fills_the_run("vidray train", "train", epochs, warmup)
    assert capsys.readouterr().err == ""


def test_step_telemetry_reports_mfu_against_the_device_peak():
    from vidray.train.telemetry import StepTelemetry, device_peak_tflops, train_flops_per_clip

    assert device_peak_tflops("NVIDIA H200") == 989.0 and device_peak_tflops("NVIDIA H100 PCIe") == 756.0
    telemetry = StepTelemetry(flops_per_clip=2e12, world_size=4, device=torch.device("cpu"))
    telemetry.peak_tflops = 989.0  # what a CUDA device named H200 gets
    telemetry.start_epoch(0)
    telemetry.waited(0.0)
    telemetry.stepped(1, clips=8, read_loss=lambda: 0.0)
    figures = telemetry.end_epoch()
    assert figures["mfu"] == pytest.approx(figures["achieved_tflops"] / 989.0)
    assert figures["clips_per_s"] == pytest.approx(4 * 8 / (8 * 2e12 / figures["achieved_tflops"] / 1e12))
    assert "MFU" in StepTelemetry.line("x", None, figures)
    # ViT-B at 16 x 112²: the 219 GFLOP per training clip docs/benchmarks.md counts with FlopCounterMode.
    from vidray.config import ModelSettings
    from vidray.model.classifier import scratch_config

    config = scratch_config(ModelSettings(init="scratch", size="base"), num_frames=16, image_size=112, num_labels=12)
    assert train_flops_per_clip(config, 16, 112) / 1e9 == pytest.approx(219.5, abs=0.1)


def test_host_snapshot_is_what_a_background_checkpoint_writes(tmp_path):
    from transformers import VideoMAEForVideoClassification

    from vidray.model.checkpoint import host_snapshot, save_checkpoint

    model = _tiny_classifier()
    state = {"step": torch.tensor(3.0), "moments": [torch.ones(2)], "rng": (np.arange(3), 7)}
    snapshot = host_snapshot({"model": model.state_dict(), "training_state": state})
    with torch.no_grad():  # training goes on while the snapshot is written
        for parameter in model.parameters():
            parameter.add_(1.0)
    state["moments"][0].add_(1.0)
    assert snapshot["training_state"]["moments"][0].tolist() == [1.0, 1.0]
    data = {"classes": CLASSES, "frames": FRAMES, "size": SIZE, "stored_frames": STORED_FRAMES, "stored_size": STORED_SIZE}
    save_checkpoint(
        tmp_path, model, training_state=snapshot["training_state"], info={"data": data}, model_state=snapshot["model"]
    )  # fmt: skip
    written = VideoMAEForVideoClassification.from_pretrained(tmp_path / MODEL_DIR).state_dict()
    for name, value in snapshot["model"].items():
        assert torch.equal(written[name], value), name
        assert not torch.equal(written[name], model.state_dict()[name]), name
    restored = load_training_state(tmp_path)
    assert restored["step"].item() == 3.0 and restored["rng"][1] == 7


def test_the_worker_loop_loads_test_faults_only_when_a_test_asks(monkeypatch):
    """Production imports never load vidray.testing: the loop imports the fault hooks by name, and only
    when one of their VIDRAY_TEST_* variables is in the worker's environment."""
    from vidray.testing import faults
    from vidray.train.loop import TEST_ENV_PREFIX, TEST_FAULTS_MODULE, load_test_faults

    assert faults.__name__ == TEST_FAULTS_MODULE
    variables = [value for name, value in vars(faults).items() if name.endswith("_ENV")]
    assert len(variables) == 5 and all(variable.startswith(TEST_ENV_PREFIX) for variable in variables)
    production = (
        "import sys, vidray.cli, vidray.train.driver, vidray.pretrain.driver, vidray.tune.sweep\n"
        "from vidray.train.loop import load_test_faults\n"
        "assert load_test_faults() is None\n"
        "loaded = [name for name in sys.modules if name.startswith('vidray.testing')]\n"
        "assert not loaded, loaded\n"
    )
    env = {name: value for name, value in os.environ.items() if not name.startswith(TEST_ENV_PREFIX)}
    subprocess.run([sys.executable, "-c", production], env=env, check=True, cwd=REPO)
    for name in [name for name in os.environ if name.startswith(TEST_ENV_PREFIX)]:
        monkeypatch.delenv(name)
    assert load_test_faults() is None
    monkeypatch.setenv(faults.HOLD_RUN_ENV, "-never")
    assert load_test_faults() is faults
