"""What a checkpoint holds and how it is read back: JSON + safetensors, never a pickle.

Real components: a VideoMAE, AdamW after real steps, Hugging Face's cosine
schedule, every RNG a worker draws from, the files on disk.
"""

from __future__ import annotations

import json
import os
import pickle
import random
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import VideoMAEConfig, VideoMAEForVideoClassification

from vidray.model.checkpoint import (
    INFO,
    LEGACY_TRAINING_STATE,
    TRAINING_STATE,
    TRAINING_TENSORS,
    load_training_state,
    save_checkpoint,
)
from vidray.model.classifier import load_trained_model
from vidray.config import TrainSettings, load_config
from vidray.data.dataset import ClipShape
from vidray.errors import UserError
from vidray.train.optim import build_optimizer, build_lr_schedule
from vidray.train.rng import capture_rng_state, restore_rng_state, seed_everything
from vidray.train.driver import existing_run_state

CLASSES = ["a", "b", "c"]
SHAPE = ClipShape(CLASSES, frames=4, size=32, stored_frames=8, stored_size=36)
REPO = Path(__file__).resolve().parents[1]


def tiny_model() -> VideoMAEForVideoClassification:
    torch.manual_seed(0)
    config = VideoMAEConfig(
        hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64, patch_size=8,
        num_frames=4, image_size=32, num_labels=3, id2label=dict(enumerate(CLASSES)),
        label2id={c: i for i, c in enumerate(CLASSES)},
    )  # fmt: skip
    return VideoMAEForVideoClassification(config)


def trained_state(model, steps: int = 3):
    """A real optimizer, schedule and RNG state after ``steps`` updates."""
    train = TrainSettings(lr=1e-3, epochs=2, warmup_epochs=0.5)
    optimizer = build_optimizer(model, train, torch.device("cpu"))
    scheduler = build_lr_schedule(optimizer, train, steps=4)
    for _ in range(steps):
        loss = model(pixel_values=torch.randn(2, 4, 3, 32, 32), labels=torch.tensor([0, 2])).loss
        loss.backward()
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
    generator = torch.Generator()
    seed_everything(11, generator)
    torch.rand(3, generator=generator)
    return optimizer, scheduler, generator


def test_training_state_round_trips_exactly_through_json_and_safetensors(tmp_path):
    model = tiny_model()
    optimizer, scheduler, generator = trained_state(model)
    rng = capture_rng_state(generator)
    state = {"epoch": 1, "global_step": 3, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
             "rng": [rng, rng]}  # fmt: skip
    save_checkpoint(tmp_path, model, training_state=state, info={"epoch": 1, "data": SHAPE.as_dict()})
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["model", INFO, TRAINING_STATE, TRAINING_TENSORS])
    json.loads((tmp_path / TRAINING_STATE).read_text())  # plain JSON

    loaded = load_training_state(tmp_path)
    assert (loaded["epoch"], loaded["global_step"], len(loaded["rng"])) == (1, 3, 2)
    # A fresh optimizer and schedule take the state and continue exactly where the saved ones are.
    fresh_model = tiny_model()
    fresh_optimizer, fresh_scheduler, _ = trained_state(fresh_model, steps=0)
    fresh_optimizer.load_state_dict(loaded["optimizer"])
    fresh_scheduler.load_state_dict(loaded["scheduler"])
    for key, value in optimizer.state_dict()["state"].items():
        for name, tensor in value.items():
            assert torch.equal(fresh_optimizer.state_dict()["state"][key][name], tensor), (key, name)
    assert fresh_optimizer.state_dict()["param_groups"] == optimizer.state_dict()["param_groups"]
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()
    scheduler.step(), fresh_scheduler.step()
    assert fresh_scheduler.get_last_lr() == scheduler.get_last_lr()

    # Every random stream continues where it was captured.
    expected = (torch.rand(4), np.random.rand(4), random.random(), torch.rand(4, generator=generator))
    other = torch.Generator()
    seed_everything(99, other)
    restore_rng_state(loaded["rng"][1], other)
    again = (torch.rand(4), np.random.rand(4), random.random(), torch.rand(4, generator=other))
    assert torch.equal(again[0], expected[0]) and np.array_equal(again[1], expected[1])
    assert again[2] == expected[2] and torch.equal(again[3], expected[3])


class _Exploit:
    """What an attacker with write access to run.storage_path would plant: code that runs when unpickled."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_legacy_checkpoint(directory: Path, marker: Path) -> None:
    save_checkpoint(directory, tiny_model(), training_state={"epoch": 0}, info={"epoch": 0, "data": SHAPE.as_dict()})
    for name in (TRAINING_STATE, TRAINING_TENSORS):
        (directory / name).unlink()
    _as_written_before_file_sizes(directory)  # vidray 0.1 listed no files
    (directory / LEGACY_TRAINING_STATE).write_bytes(pickle.dumps({"epoch": 0, "rng": _Exploit(str(marker))}))


def test_a_pickled_training_state_is_refused_not_run(tmp_path):
    checkpoint, marker = tmp_path / "checkpoint_epoch_0000", tmp_path / "pwned"
    _plant_legacy_checkpoint(checkpoint, marker)
    # Proof that the file is live: unpickling it really runs the planted command.
    pickle.loads((checkpoint / LEGACY_TRAINING_STATE).read_bytes())
    assert marker.exists()
    marker.unlink()

    with pytest.raises(UserError) as err:
        load_training_state(checkpoint)
    message = str(err.value)
    assert "\n" not in message and LEGACY_TRAINING_STATE in message and "never loaded" in message
    assert "new run.name (or --restart)" in message
    assert not marker.exists()
    # The model itself stays usable: evaluation and export read safetensors only.
    model, info = load_trained_model(checkpoint)
    assert info["epoch"] == 0 and model.config.id2label == dict(enumerate(CLASSES))
    assert not marker.exists()


def test_a_planted_pickle_next_to_a_real_state_is_never_opened(tmp_path):
    checkpoint, marker = tmp_path / "checkpoint_epoch_0000", tmp_path / "pwned"
    save_checkpoint(checkpoint, tiny_model(), training_state={"epoch": 0, "global_step": 1},
                    info={"epoch": 0, "data": SHAPE.as_dict()})  # fmt: skip
    (checkpoint / LEGACY_TRAINING_STATE).write_bytes(pickle.dumps(_Exploit(str(marker))))
    assert load_training_state(checkpoint) == {"epoch": 0, "global_step": 1}
    assert not marker.exists()


def test_resuming_a_run_whose_latest_checkpoint_is_pickled_fails_in_one_line(ray_head, tmp_path):
    run_dir, marker = tmp_path / "runs" / "old", tmp_path / "pwned"
    _plant_legacy_checkpoint(run_dir / "checkpoint_epoch_0000", marker)
    cfg = load_config(None, ["train.epochs=3", f"run.storage_path={tmp_path / 'runs'}", "run.name=old"])
    with pytest.raises(UserError, match=r"training_state.pt.*never loaded.*--restart"):
        existing_run_state(cfg, str(run_dir))
    assert not marker.exists()
    # Through the command line, before Ray starts any worker: one line, exit 2. The driver connects to
    # the session's cluster (as under `ray job submit`) rather than starting one of its own.
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "train.py"), "train.epochs=3", f"run.storage_path={tmp_path / 'runs'}",
         "run.name=old", "model.init=scratch", "model.size=tiny"],
        capture_output=True, text=True, cwd=tmp_path, env={**os.environ, "RAY_ADDRESS": ray_head["address"]},
        timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines()[-1].startswith(f"vidray train: error: {run_dir / 'checkpoint_epoch_0000'} holds")
    assert not marker.exists()


def test_an_interrupted_run_is_not_continued_on_other_data(ray_cluster, tmp_path):
    """A class folder added since the run started (or videos added, moved or re-encoded): its epochs so far
    trained on the data as it was, and with a class more its checkpoint does not even load (the workers died on
    a tensor-size mismatch). Refused in one line once the data is prepared, before any worker starts."""
    from vidray.data.dataset import read_dataset_info
    from vidray.data.prepare import prepare_dataset
    from vidray.data.video import encode_mp4
    from vidray.train.driver import FINETUNE_SPLITS, run_training
    from vidray.train.runs import keep_to_its_data, mark_run

    def videos(label: str) -> None:
        rng = np.random.default_rng(len(label))
        for split, count in (("train", 4), ("val", 2), ("test", 1)):
            for i in range(count):
                encode_mp4(tmp_path / "videos" / split / label / f"{i}.mp4", rng.integers(0, 255, (8, 36, 36, 3), np.uint8), fps=8)

    for label in ("left", "right"):
        videos(label)
    overrides = [
        "data.source=folder", f"data.videos_dir={tmp_path / 'videos'}", f"data.manifest={tmp_path / 'm.parquet'}",
        f"data.dataset_dir={tmp_path / 'dataset'}", "data.frames=4", "data.size=32", "data.stored_frames=8",
        "data.stored_size=36", "train.epochs=3", "train.batch_size=4", f"run.storage_path={tmp_path / 'runs'}", "run.name=r",
        "model.init=scratch", "model.size=tiny",
    ]  # fmt: skip
    cfg = load_config(None, overrides)
    # The run as its driver left it after epoch 0: the data it started on recorded, one checkpoint.
    prepare_dataset(cfg)
    started_on = read_dataset_info(cfg.data.dataset_dir).identity(FINETUNE_SPLITS)
    run_dir = tmp_path / "runs" / "r"
    mark_run(str(run_dir), "train", "r")
    keep_to_its_data(str(run_dir), "run", "new", started_on)
    save_checkpoint(run_dir / "checkpoint_epoch_0000", tiny_model(), training_state={"epoch": 0},
                    info={"epoch": 0, "data": SHAPE.as_dict(), "config": cfg.model_dump(mode="json")})  # fmt: skip

    # A run the cluster cannot place is refused before --restart deletes this one (it was deleted, then refused).
    with pytest.raises(UserError, match=r"^train.cpus_per_worker=1000 but the largest node of the Ray cluster has"):
        run_training(load_config(None, [*overrides, "train.cpus_per_worker=1000"]), restart=True)
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_epoch_0000", "vidray_run.json"]

    videos("up")
    with pytest.raises(UserError) as refused:
        run_training(cfg)
    assert str(refused.value) == (
        f"{run_dir} holds a run started on other data (classes added: up; train videos 8 -> 12; val videos 4 -> 6): "
        "continue it on the data it started with, or pass --restart to start it over on this data, or set run.name "
        "to a new name"
    )
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoint_epoch_0000", "vidray_run.json"]  # nothing trained
    # As it was, it is the same data again (the same shards, reused): the run would continue.
    for split in ("train", "val", "test"):
        shutil.rmtree(tmp_path / "videos" / split / "up")
    prepare_dataset(cfg)
    assert read_dataset_info(cfg.data.dataset_dir).identity(FINETUNE_SPLITS) == started_on
    keep_to_its_data(str(run_dir), "run", "interrupted", started_on)


def test_a_run_started_with_another_config_is_not_continued(tmp_path):
    run_dir = tmp_path / "runs" / "r"
    cfg = load_config(None, ["train.epochs=3", f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])
    save_checkpoint(run_dir / "checkpoint_epoch_0000", tiny_model(), training_state={"epoch": 0},
                    info={"epoch": 0, "data": SHAPE.as_dict(), "config": cfg.model_dump(mode="json")})  # fmt: skip
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    where = [f"run.storage_path={tmp_path / 'runs'}", "run.name=r"]
    changed = ["train.epochs=3", "train.lr=1e-3", *where]
    with pytest.raises(UserError, match=r"started with another config \(train.lr differ\): continue it as it started "
                       r"with the override\(s\) train.lr=5e-05, or pass --restart"):  # fmt: skip
        existing_run_state(load_config(None, changed), str(run_dir))
    # The overrides it names continue it: a config file an upgrade changed (coin12.yaml's shuffle buffer) refused
    # every run started with the earlier one, offering only to start over or elsewhere.
    assert existing_run_state(load_config(None, [*changed, "train.lr=5e-05"]), str(run_dir)) == "interrupted"
    moved = ["train.epochs=3", "train.shuffle_buffer=1024", "data.dataset_dir=/data/my videos", *where]
    with pytest.raises(UserError) as refused:
        existing_run_state(load_config(None, moved), str(run_dir))
    hint = str(refused.value).split("with the override(s) ")[1].split(", or pass")[0]
    assert hint == f"data.dataset_dir={cfg.data.dataset_dir} train.shuffle_buffer=64", hint
    assert existing_run_state(load_config(None, [*moved, *hint.split(" ")]), str(run_dir)) == "interrupted"
    # A run an older vidray started, whose saved config lacks a key added since (data.val_fraction): it
    # continues while the key keeps its default, and is refused when it is set otherwise.
    older = cfg.model_dump(mode="json")
    del older["data"]["val_fraction"]
    save_checkpoint(run_dir / "checkpoint_epoch_0000", tiny_model(), training_state={"epoch": 0},
                    info={"epoch": 0, "data": SHAPE.as_dict(), "config": older})  # fmt: skip
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    moved = load_config(None, ["train.epochs=3", "data.val_fraction=0.3", f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])
    with pytest.raises(UserError, match=r"started with another config \(data.val_fraction differ\)"):
        existing_run_state(moved, str(run_dir))
    # Where results go, how many failures to absorb and the views of a sweep's held-out test (its report's, not
    # its training's: a finished sweep reports again with them) may change between runs.
    relaxed = load_config(None, ["train.epochs=3", "train.max_failures=2", "run.wandb.enabled=true", "tune.test_clips=2",
                                 "tune.test_crops=3", f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])  # fmt: skip
    assert existing_run_state(relaxed, str(run_dir)) == "interrupted"
    save_checkpoint(run_dir / "checkpoint_epoch_0002", tiny_model(), training_state={"epoch": 2},
                    info={"epoch": 2, "data": SHAPE.as_dict(), "config": cfg.model_dump(mode="json")})  # fmt: skip
    assert existing_run_state(cfg, str(run_dir)) == "finished"
    assert existing_run_state(cfg, str(tmp_path / "runs" / "never")) == "new"


def test_a_run_that_cannot_train_here_is_refused_before_restart_deletes_it(tmp_path):
    """`vidray train --restart train.use_gpu=true` on a CPU cluster deleted the run, prepared the data, and only then
    was refused. open_run's can_train (the drivers' resource check) comes before the delete, and before a new run is
    marked or an interrupted one announced; a finished run, only summarised, is not checked."""
    from vidray.train.runs import RUN_MARKER, mark_run, open_run

    def cannot_train():
        raise UserError("train.use_gpu=true but the Ray cluster has no GPUs")

    storage, (run_dir, cfg) = str(tmp_path / "runs"), _run(tmp_path, epochs=2)
    mark_run(str(run_dir), "train", "r")
    first = _run_checkpoint(run_dir, 0, cfg)

    def opened(restart: bool, can_train=cannot_train, name: str = "r"):
        return open_run("train", "train", storage, name, restart=restart, finished_note="", can_train=can_train,
                        state_of=lambda folder: existing_run_state(cfg, folder))  # fmt: skip

    for restart in (True, False):
        with pytest.raises(UserError, match="no GPUs"):
            opened(restart)
        assert first.is_dir() and (run_dir / RUN_MARKER).is_file()
    with pytest.raises(UserError, match="no GPUs"):
        opened(False, name="new")
    assert not (tmp_path / "runs" / "new").exists()  # not marked either
    _run_checkpoint(run_dir, 1, cfg)
    assert opened(False) == (str(run_dir), "finished")  # summarised wherever it is asked
    assert opened(True, can_train=lambda: None) == (str(run_dir), "new") and not first.exists()


# ------------------------------------------------------------------ partial copies of a checkpoint
# Ray Train copies a reported checkpoint straight into RUN/checkpoint_epoch_NNNN and registers it after the copy:
# a Ctrl-C, killed worker or full disk during the copy leaves a partial folder, which Ray ignores when the run
# continues (and rewrites). vidray reads the run the same way.


def _run_checkpoint(run_dir: Path, epoch: int, cfg) -> Path:
    history = [{"epoch": e, "val_macro_f1": 0.1 * (e + 1)} for e in range(epoch + 1)]
    return save_checkpoint(run_dir / f"checkpoint_epoch_{epoch:04d}", tiny_model(), training_state={"epoch": epoch},
                           info={"epoch": epoch, "metrics": history[-1], "history": history, "data": SHAPE.as_dict(),
                                 "config": cfg.model_dump(mode="json")})  # fmt: skip


def _cut_short(checkpoint: Path) -> None:
    """A copy stopped after model/: the training state and vidray.json never arrived."""
    for name in (TRAINING_STATE, TRAINING_TENSORS, INFO):
        (checkpoint / name).unlink()


def _as_written_before_file_sizes(checkpoint: Path) -> None:
    info = json.loads((checkpoint / INFO).read_text())
    info.pop("file_sizes", None)
    (checkpoint / INFO).write_text(json.dumps(info))


def _run(tmp_path: Path, epochs: int):
    return tmp_path / "runs" / "r", load_config(None, [f"train.epochs={epochs}", f"run.storage_path={tmp_path / 'runs'}", "run.name=r"])


def test_a_partial_copy_before_the_last_epoch_is_ignored_and_the_run_continues(tmp_path):
    from vidray.train.follow import EpochFollower

    run_dir, cfg = _run(tmp_path, epochs=3)
    first = _run_checkpoint(run_dir, 0, cfg)
    _cut_short(_run_checkpoint(run_dir, 1, cfg))
    # Not "not a resumable vidray checkpoint (start over ...)": the same command continues from epoch 0.
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    # The driver's follower knows epoch 0 is done, and prints nothing for the partial epoch 1.
    assert EpochFollower(str(run_dir), cfg, command="vidray train", name="r", line=lambda m, n: "").done == {0}
    # A run stopped during its first copy has no complete checkpoint: it starts again, it is not refused.
    shutil.rmtree(first)
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"


def test_an_epoch_no_killed_driver_showed_is_printed_and_logged_once_by_the_runs_next_driver(tmp_path, capsys):
    """The driver follows a run by looking at its checkpoints every second. SIGKILLed before its first look,
    between two looks, or after the last epoch's checkpoint, it never printed or logged an epoch; the run's next
    driver does, once (`vidray train` again on a finished run: catch_up), and shows nothing twice."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from vidray.train.follow import FOLLOWED, TENSORBOARD_DIR, EpochFollower
    from vidray.train.runs import mark_run, read_marker, update_marker

    run_dir, cfg = _run(tmp_path, epochs=3)
    mark_run(str(run_dir), "train", "r")

    def follower() -> EpochFollower:
        # every_s: its thread never looks; the looks are the test's, and a killed driver makes none after its last
        return EpochFollower(str(run_dir), cfg, command="vidray train", name="r", line=lambda m, n: f"epoch {m['epoch'] + 1}/{n}", every_s=3600)

    def killed(after_checkpoint_of: int, *, looked: bool) -> None:
        driver = follower().__enter__()
        if looked:
            driver.poll()
        _run_checkpoint(run_dir, after_checkpoint_of, cfg)
        driver.tensorboard.close()  # ... and no look, no __exit__

    killed(after_checkpoint_of=0, looked=False)
    assert capsys.readouterr().out == ""
    killed(after_checkpoint_of=1, looked=True)  # its look shows epoch 1, which the first driver never did
    assert capsys.readouterr().out.splitlines() == ["epoch 1/3"]
    killed(after_checkpoint_of=2, looked=True)  # the last epoch: the run is finished, and its end never shown
    assert capsys.readouterr().out.splitlines() == ["epoch 2/3"]

    events = run_dir / TENSORBOARD_DIR
    follower().catch_up()
    assert capsys.readouterr().out.splitlines() == ["epoch 3/3"]
    files = sorted(events.iterdir())
    follower().catch_up()  # all shown: nothing printed, not even a TensorBoard file of its own
    assert capsys.readouterr().out == "" and sorted(events.iterdir()) == files
    steps = EventAccumulator(str(events)).Reload().Scalars("val_macro_f1")
    assert sorted(event.step for event in steps) == [1, 2, 3]  # each epoch once, across the drivers' files
    assert read_marker(str(run_dir))[FOLLOWED] == [0, 1, 2]

    # A run that older vidray started keeps no record: the epochs it has are taken as shown, as they were then.
    update_marker(str(run_dir), **{FOLLOWED: None})
    assert follower().done == {0, 1, 2}
    assert not list(run_dir.glob(".*.tmp"))  # the marker, rewritten each epoch, is written whole (no temporaries left)


def test_every_driver_of_a_run_logs_into_the_runs_one_wandb_run(tmp_path):
    """A run continued by a second driver (after Ctrl-C, or a killed driver) was split over two Weights & Biases
    runs, each driver starting one of its own: epochs 1-2 in one, the rest in another. The run's marker keeps
    the id of its W&B run, which every later driver continues (offline here: the run's id names its folder)."""
    from vidray.train.follow import WANDB_RUN_ID, EpochFollower, tracking_dir
    from vidray.train.runs import mark_run, read_marker

    run_dir, _ = _run(tmp_path, epochs=3)
    cfg = load_config(None, ["train.epochs=3", f"run.storage_path={tmp_path / 'runs'}", "run.name=r",
                             "run.wandb.enabled=true", "run.wandb.mode=offline"])  # fmt: skip
    mark_run(str(run_dir), "train", "r")
    for epoch in (0, 1):  # two drivers, each seeing one epoch
        _run_checkpoint(run_dir, epoch, cfg)
        with EpochFollower(str(run_dir), cfg, command="vidray train", name="r", line=lambda m, n: "", every_s=3600):
            pass
    run_id = read_marker(str(run_dir))[WANDB_RUN_ID]
    folders = list((tracking_dir(str(run_dir)) / "wandb").glob("offline-run-*"))
    assert folders and {folder.name.rsplit("-", 1)[1] for folder in folders} == {run_id}


def test_a_partial_copy_of_the_last_epoch_leaves_the_run_unfinished(tmp_path):
    from vidray.train.runs import summarize_run

    run_dir, cfg = _run(tmp_path, epochs=2)
    first = _run_checkpoint(run_dir, 0, cfg)
    _cut_short(_run_checkpoint(run_dir, 1, cfg))
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"  # its last epoch is still to train
    summary = summarize_run(str(run_dir))
    # The summary counts epochs done, as the console's "epoch 1/2" and a sweep's summary do (`best.epoch: 0` read as
    # "no epoch finished"); the checkpoint keeps its 0-based index, as its folder's name.
    assert (summary["checkpoint"], summary["last"], summary["best"]) == (str(first), {"epoch": 1, "val_macro_f1": 0.1},
                                                                         {"epoch": 1, "val_macro_f1": 0.1})  # fmt: skip
    assert json.loads((first / INFO).read_text())["metrics"]["epoch"] == 0


def test_a_checkpoint_with_a_file_cut_short_is_not_complete(tmp_path):
    """Every name is there, the model's weights are not all: a copy ordered differently, or a full disk."""
    from vidray.train.runs import summarize_run

    run_dir, cfg = _run(tmp_path, epochs=2)
    first = _run_checkpoint(run_dir, 0, cfg)
    weights = _run_checkpoint(run_dir, 1, cfg) / "model" / "model.safetensors"
    whole = weights.read_bytes()
    weights.write_bytes(whole[: len(whole) // 2])
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    assert summarize_run(str(run_dir))["checkpoint"] == str(first)
    # Read through pyarrow's filesystems, as a bucket is.
    assert existing_run_state(cfg, f"file://{run_dir}") == "interrupted"
    assert summarize_run(f"file://{run_dir}")["checkpoint"] == f"file://{first}"
    weights.write_bytes(whole)  # the copy finished after all
    assert existing_run_state(cfg, str(run_dir)) == "finished"


def test_a_checkpoint_written_before_file_sizes_is_still_read(tmp_path):
    """A vidray.json without file_sizes: complete when it parses and the training state is there."""
    from vidray.train.runs import summarize_run

    run_dir, cfg = _run(tmp_path, epochs=3)
    first, second = _run_checkpoint(run_dir, 0, cfg), _run_checkpoint(run_dir, 1, cfg)
    for checkpoint in (first, second):
        _as_written_before_file_sizes(checkpoint)
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    assert summarize_run(str(run_dir))["checkpoint"] == str(second)
    assert load_training_state(second) == {"epoch": 1}
    # A partial copy of one: vidray.json arrived, the training state did not.
    for name in (TRAINING_STATE, TRAINING_TENSORS):
        (second / name).unlink()
    assert existing_run_state(cfg, str(run_dir)) == "interrupted"
    assert summarize_run(str(run_dir))["checkpoint"] == str(first)


def test_a_cpu_run_on_a_gpu_node_leaves_cuda_alone(monkeypatch):
    """A CPU run (train.use_gpu=false) on a GPU node saved and restored CUDA's random streams because CUDA was there,
    and its checkpoint snapshot waited on CUDA because CUDA was started: each worker held a context on GPU 0. Here
    CUDA 'is there' and any use of it fails the test."""
    from vidray.model.checkpoint import host_snapshot
    from vidray.train.rng import AugmentGenerators

    def touched(*args, **kwargs):
        raise AssertionError("a CPU run used CUDA")

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_initialized", lambda: True)
    for name in ("get_rng_state_all", "set_rng_state_all", "synchronize"):
        monkeypatch.setattr(torch.cuda, name, touched)
    generators = AugmentGenerators.for_device(torch.device("cpu"))
    state = capture_rng_state(generators.host, generators.device)
    assert state["cuda"] is None
    restore_rng_state(state, generators.host, generators.device)
    weights = {"w": torch.arange(3.0), "nested": [torch.ones(2)]}
    snapshot = host_snapshot(weights)
    weights["w"].add_(1)
    assert snapshot["w"].tolist() == [0.0, 1.0, 2.0] and snapshot["nested"][0].tolist() == [1.0, 1.0]
