"""The run lifecycle shared by train, pretrain and tune (vidray/train/runs.py): plain run names, a
restart that deletes only folders vidray wrote, strictly under run.storage_path, on a local path and
on a pyarrow filesystem URI, and one driver per run (vidray/folder_lock.py). No Ray: these are
decided before any Ray work starts."""

from __future__ import annotations

import contextlib
import io
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import start_lock_holders

from vidray.cli import main as cli_main
from vidray.config import ConfigError, load_config
from vidray.errors import UserError
from vidray import folder_lock
from vidray.folder_lock import LOCK_FILE, STALE_AFTER_S, FolderLock, is_live, read_holder
from vidray.train import runs
from vidray.train.runs import RUN_MARKER, SWEEP_CONFIG_FILE, delete_run, mark_run, open_run, read_marker, run_folder

REPO = Path(__file__).resolve().parents[1]
DEMO = REPO / "configs" / "demo.yaml"


@pytest.mark.parametrize("name", ["", ".", "..", "/", "a/b", "../elsewhere", "a\\b"])
def test_run_name_must_be_a_plain_folder_name(name):
    with pytest.raises(ConfigError) as err:
        load_config(DEMO, [f"run.name={json.dumps(name)}"])
    message = str(err.value)
    assert "run.name:" in message and "is not a plain folder name" in message and "\n" not in message


@pytest.mark.parametrize("command", ["train", "pretrain", "tune"])
def test_restart_with_a_path_as_run_name_deletes_nothing(tmp_path, command):
    """The reported case: `vidray train --restart run.storage_path=STORE run.name=.` deleted STORE's other folders."""
    store = tmp_path / "store"
    (store / "someone_elses_sweep").mkdir(parents=True)
    (store / "someone_elses_sweep" / "results.md").write_text("not vidray's")
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        code = cli_main([command, "--config", str(DEMO), "--restart", f"run.storage_path={store}", "run.name=."])
    assert code == 2
    lines = stderr.getvalue().strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"vidray {command}: error: invalid config") and "run.name" in lines[0]
    assert (store / "someone_elses_sweep" / "results.md").read_text() == "not vidray's"


def _as_uri(local: Path, uri: bool) -> str:
    # file:// goes through pyarrow.fs.FileSystem.from_uri, the code path of s3:// and gs:// storage.
    return f"file://{local}" if uri else str(local)


@pytest.fixture(params=["local", "uri"])
def store(request, tmp_path) -> tuple[Path, str]:
    """(local folder, run.storage_path as the test passes it: a plain path or a file:// URI)."""
    root = tmp_path / "store"
    root.mkdir()
    (root / "neighbour").mkdir()
    (root / "neighbour" / "keep.txt").write_text("a neighbour")
    return root, _as_uri(root, request.param == "uri")


def test_run_folder_is_strictly_under_the_storage_path(store):
    local, storage = store
    assert run_folder(storage, "demo").rstrip("/").endswith("/demo")
    for name in (".", "..", "", "a/b", "/"):
        with pytest.raises(UserError, match=r"does not name a folder inside run.storage_path"):
            run_folder(storage, name)


def test_restart_deletes_a_folder_vidray_marked_and_nothing_beside_it(store):
    local, storage = store
    folder = run_folder(storage, "mine")
    mark_run(folder, "train", "mine")
    (local / "mine" / "checkpoint_epoch_0000").mkdir()
    assert read_marker(folder) == {"written_by": "vidray", "kind": "train", "name": "mine"}
    delete_run(storage, folder)
    assert not (local / "mine").exists()
    assert (local / "neighbour" / "keep.txt").read_text() == "a neighbour"
    delete_run(storage, folder)  # nothing there: nothing to do


@pytest.mark.parametrize("layout", ["sweep", "run"])
def test_restart_recognises_folders_of_older_vidray_versions(store, layout):
    """Before the marker: a sweep held vidray_sweep.json, a run checkpoints with vidray.json."""
    local, storage = store
    old = local / "old"
    if layout == "sweep":
        (old / "train_runs").mkdir(parents=True)
        (old / SWEEP_CONFIG_FILE).write_text("{}")
    else:
        (old / "checkpoint_epoch_0003").mkdir(parents=True)
        (old / "checkpoint_epoch_0003" / "vidray.json").write_text("{}")
    delete_run(storage, run_folder(storage, "old"))
    assert not old.exists() and (local / "neighbour").is_dir()


def test_restart_refuses_a_folder_vidray_did_not_write(store):
    local, storage = store
    # Another Ray experiment in ~/ray_results: Ray Train checkpoints, but no vidray.json in them.
    (local / "theirs" / "checkpoint_epoch_0000").mkdir(parents=True)
    (local / "theirs" / "results.md").write_text("theirs")
    folder = run_folder(storage, "theirs")
    with pytest.raises(UserError) as err:
        delete_run(storage, folder)
    message = str(err.value)
    assert folder in message and "checkpoint_epoch_0000, results.md" in message and "nothing deleted" in message
    assert "\n" not in message
    assert (local / "theirs" / "results.md").read_text() == "theirs"


def test_restart_refuses_the_storage_path_itself_and_what_is_above_it(store):
    local, storage = store
    (local / RUN_MARKER).write_text("{}")  # even marked: storage_path is never a run's folder
    for target in (storage, str(local.parent), _as_uri(local.parent, "://" in storage)):
        with pytest.raises(UserError, match=r"is not a folder inside run.storage_path .*nothing deleted"):
            delete_run(storage, target)
    assert (local / "neighbour" / "keep.txt").is_file()


def test_open_run_marks_a_new_run_and_restart_refuses_a_foreign_one(store, capsys):
    local, storage = store
    folder, state = open_run("train", "train", storage, "fresh", restart=False, state_of=lambda _: "new", finished_note="")
    assert state == "new" and read_marker(folder)["kind"] == "train"
    # --restart of a marked run: deleted, then marked again as the new run.
    (local / "fresh" / "leftover").write_text("x")
    folder, state = open_run("train", "train", storage, "fresh", restart=True, state_of=lambda _: "new", finished_note="")
    assert sorted(p.name for p in (local / "fresh").iterdir()) == [RUN_MARKER]
    for restart in (True, False):  # neither deleted nor read as a run nor adopted (marked, a --restart could delete it)
        with pytest.raises(UserError, match=r"not written by vidray .*it holds keep.txt"):
            open_run("tune", "sweep", storage, "neighbour", restart=restart, state_of=pytest.fail, finished_note="")
    assert sorted(p.name for p in (local / "neighbour").iterdir()) == ["keep.txt"]
    folder, state = open_run(
        "tune", "sweep", storage, "swept", restart=False, state_of=lambda _: "finished", finished_note="; its results follow"
    )
    assert state == "finished"
    assert capsys.readouterr().err.strip() == (
        f"vidray tune: {folder} is finished; its results follow (--restart or a new run.name starts over)"
    )


def test_a_command_refuses_another_kind_of_run_of_its_name_and_restart_deletes_nothing(store):
    """`vidray train` and `vidray tune` of one run.name (the demo config's) wrote one folder: the training
    run's checkpoints went among the sweep's trials, and `vidray train --restart` deleted the whole sweep."""
    local, storage = store
    sweep, _ = open_run("tune", "sweep", storage, "demo", restart=False, state_of=lambda _: "new", finished_note="")
    (local / "demo" / "train_runs").mkdir()
    for command, kind, what in (("train", "train", "training run"), ("pretrain", "pretrain", "pretraining run")):
        for restart in (False, True):
            with pytest.raises(UserError) as refused:
                open_run(command, kind, storage, "demo", restart=restart, state_of=pytest.fail, finished_note="")
            assert str(refused.value) == (
                f"{sweep} holds a sweep, not a {what} as `vidray {command}` writes: "
                "set run.name to a new name (--restart does not delete another kind of run)"
            )
    assert (local / "demo" / "train_runs").is_dir() and read_marker(sweep)["kind"] == "sweep"
    # The other way round, and a sweep of an older vidray (its config file only, no marker).
    run, _ = open_run("train", "train", storage, "run", restart=False, state_of=lambda _: "new", finished_note="")
    (local / "run" / "checkpoint_epoch_0000").mkdir()
    with pytest.raises(UserError, match="holds a training run, not a sweep as `vidray tune` writes"):
        open_run("tune", "sweep", storage, "run", restart=True, state_of=pytest.fail, finished_note="")
    assert (local / "run" / "checkpoint_epoch_0000").is_dir()
    (local / "old").mkdir()
    (local / "old" / SWEEP_CONFIG_FILE).write_text("{}")
    with pytest.raises(UserError, match="holds a sweep, not a training run"):
        open_run("train", "train", storage, "old", restart=True, state_of=pytest.fail, finished_note="")
    assert sorted(p.name for p in (local / "old").iterdir()) == [SWEEP_CONFIG_FILE]
    # Its own kind continues, and --restart starts it over.
    assert open_run("tune", "sweep", storage, "demo", restart=False, state_of=lambda _: "interrupted", finished_note="")[1] == "interrupted"
    open_run("tune", "sweep", storage, "old", restart=True, state_of=lambda _: "new", finished_note="")
    assert sorted(p.name for p in (local / "old").iterdir()) == [RUN_MARKER]


# ------------------------------------------------------------------ one driver per run (vidray/folder_lock.py)

def test_a_run_a_live_driver_trains_is_refused_and_restart_deletes_nothing(store, tmp_path):
    local, storage = store
    folder, _ = open_run("train", "train", storage, "busy", restart=False, state_of=lambda _: "new", finished_note="")
    (local / "busy" / "checkpoint_epoch_0000").mkdir()
    (driver,) = start_lock_holders(folder, tmp_path / "go")
    try:
        assert driver.stdout.readline().strip() == "held"
        for command, restart in (("train", False), ("train", True), ("tune", True)):
            with pytest.raises(UserError) as refused:
                open_run(command, "train", storage, "busy", restart=restart, state_of=pytest.fail, finished_note="")
            message = str(refused.value)
            assert f"{folder} is in use: `vidray train` (pid {driver.pid} on host {socket.gethostname()}, since " in message
            assert message.endswith(f"(if that driver is gone, delete {folder}/{LOCK_FILE})") and "\n" not in message
        assert (local / "busy" / "checkpoint_epoch_0000").is_dir()  # --restart deleted nothing
        with pytest.raises(UserError, match="is in use"), FolderLock(folder, "vidray pretrain"):
            pytest.fail("took a lock a live driver holds")
    finally:
        driver.kill()
        driver.wait()
    # SIGKILL left its lock behind; its process is gone, so the next driver continues the run...
    assert (local / "busy" / LOCK_FILE).is_file()
    folder, state = open_run("train", "train", storage, "busy", restart=False, state_of=lambda _: "interrupted", finished_note="")
    with FolderLock(folder, "vidray train"):
        assert read_holder(folder)["pid"] == os.getpid()
    assert not (local / "busy" / LOCK_FILE).exists()  # and lets go of it when it ends
    # ...or, with --restart, deletes it.
    (local / "busy" / LOCK_FILE).write_text(json.dumps({"host": socket.gethostname(), "pid": driver.pid, "heartbeat": 0}))
    open_run("train", "train", storage, "busy", restart=True, state_of=lambda _: "new", finished_note="")
    assert sorted(p.name for p in (local / "busy").iterdir()) == [RUN_MARKER]


def test_of_two_restarts_at_once_the_second_deletes_nothing_the_first_trains(store, tmp_path, monkeypatch):
    """Two `--restart`s of one run at the same moment both found it free before either held it: the second then
    deleted what the first had begun (its lock and marker included), and both trained. The deleting is done
    holding the lock: here the other driver takes it just after this one looked, and this one is refused."""
    local, storage = store
    folder, _ = open_run("train", "train", storage, "twice", restart=False, state_of=lambda _: "new", finished_note="")
    (local / "twice" / "checkpoint_epoch_0000").mkdir()
    holders = []

    def another_driver_arrives(*args):
        # Between this driver's look at the lock and its deleting: the other one takes the run.
        holders.extend(start_lock_holders(folder, tmp_path / "go"))
        assert holders[0].stdout.readline().strip() == "held"
        return runs.refuse_other_kind.__wrapped__(*args)

    another_driver_arrives.__wrapped__ = runs.refuse_other_kind
    monkeypatch.setattr(runs, "refuse_other_kind", another_driver_arrives)
    try:
        with pytest.raises(UserError, match=rf"{folder} is in use: `vidray train` ") as refused:
            open_run("train", "train", storage, "twice", restart=True, state_of=pytest.fail, finished_note="")
        assert f"(pid {holders[0].pid} on host" in str(refused.value)
        assert (local / "twice" / "checkpoint_epoch_0000").is_dir() and (local / "twice" / RUN_MARKER).is_file()
        assert read_holder(folder)["pid"] == holders[0].pid  # its lock untouched
    finally:
        for holder in holders:
            holder.kill()
            holder.wait()


def _first_lines(drivers: list) -> list[str]:
    """What each lock holder said first ("held", or "refused: ..."), sorted; then they are stopped."""
    try:
        return sorted(driver.stdout.readline().strip() for driver in drivers)
    finally:
        for driver in drivers:
            driver.kill()
            driver.wait()


def test_of_drivers_starting_together_one_trains(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    first_lines = _first_lines(start_lock_holders(str(folder), tmp_path / "go", count=4))
    assert first_lines[0] == "held" and all(line.startswith("refused: ") and "is in use" in line for line in first_lines[1:])


def test_of_drivers_taking_over_one_stale_lock_together_one_trains(tmp_path):
    """A driver killed with SIGKILL left its lock; drivers that found it stale at the same moment each replaced
    it and read their own file back, so more than one went on (without the flock of vidray.folder_lock). On a
    local disk the race is a matter of microseconds; here each read of the lock file takes 0.2 s, as on a slow
    network disk, so that the drivers' checks overlap (3 of 4 held, before the flock)."""
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = {"host": socket.gethostname(), "pid": int(dead.stdout), "heartbeat": 0, "since": 0, "token": "dead driver"}
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK_FILE).write_text(json.dumps(stale))
    first_lines = _first_lines(start_lock_holders(str(folder), tmp_path / "go", count=4, read_s=0.2))
    assert first_lines.count("held") == 1, first_lines
    assert all(line.startswith("refused: ") and "is in use" in line for line in first_lines[1:]), first_lines


def test_a_lock_is_live_while_its_process_runs_or_its_heartbeat_is_fresh():
    here, now = socket.gethostname(), time.time()
    parent = os.getppid()  # a live process that is not this one
    with open(f"/proc/{parent}/stat") as f:
        parent_start = f.read().rsplit(")", 1)[1].split()[19]
    assert is_live({"host": here, "pid": parent, "process_start": parent_start, "heartbeat": 0})
    # Its pid, now another process's: a driver that died and whose pid was reused holds nothing.
    assert not is_live({"host": here, "pid": parent, "process_start": "1", "heartbeat": now})
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    assert not is_live({"host": here, "pid": int(dead.stdout), "heartbeat": now})
    # A driver that has exited but that its parent has not reaped yet (a zombie) holds nothing either.
    exited = subprocess.Popen([sys.executable, "-c", "pass"])
    while Path(f"/proc/{exited.pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z":
        time.sleep(0.01)
    assert not is_live({"host": here, "pid": exited.pid, "heartbeat": now})
    exited.wait()
    # On another host only the heartbeat can tell.
    assert is_live({"host": "elsewhere", "pid": 1, "heartbeat": now - STALE_AFTER_S / 2}, now=now)
    assert not is_live({"host": "elsewhere", "pid": 1, "heartbeat": now - STALE_AFTER_S - 1}, now=now)
    for damaged in ({}, {"host": here}, {"host": here, "pid": "x", "heartbeat": now}):
        assert not is_live(damaged)


def test_the_driver_beats_while_it_holds_and_leaves_another_drivers_lock(tmp_path, monkeypatch):
    monkeypatch.setattr(folder_lock, "HEARTBEAT_S", 0.05)
    folder = str(tmp_path)
    with FolderLock(folder, "vidray tune") as lock:
        first = read_holder(folder)
        time.sleep(0.5)
        assert read_holder(folder)["heartbeat"] > first["heartbeat"] and read_holder(folder)["token"] == first["token"]
        assert sorted(p.name for p in tmp_path.iterdir()) == [LOCK_FILE]  # no temporary left beside it
        # Taken over (this driver was thought gone): it neither beats into nor deletes the new holder's file.
        other = {**first, "token": "another driver", "heartbeat": time.time()}
        (tmp_path / LOCK_FILE).write_text(json.dumps(other))
        time.sleep(0.3)
    assert lock.holder["token"] != "another driver" and read_holder(folder) == other


def test_a_heartbeat_that_fails_to_write_is_said_once_and_the_driver_beats_on(tmp_path, monkeypatch, capsys):
    """One failed write of the heartbeat (an S3 PUT, NFS ESTALE, a full disk) ended the thread that writes it while
    the driver trained on: STALE_AFTER_S later another driver took the run over as stale, or --restart deleted it.
    A real write fails here: a folder stands where the lock's temporary file is written."""
    monkeypatch.setattr(folder_lock, "HEARTBEAT_S", 0.05)
    folder = str(tmp_path)
    with FolderLock(folder, "vidray tune") as lock:
        in_the_way = Path(f"{tmp_path / LOCK_FILE}.{lock.holder['token'][:8]}.tmp")
        in_the_way.mkdir()
        errors, deadline = "", time.monotonic() + 60
        while "could not renew" not in errors and lock._beating.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
            errors += capsys.readouterr().err
        assert lock._beating.is_alive(), "the heartbeat ended at its first failed write"
        failed = read_holder(folder)["heartbeat"]
        time.sleep(0.3)  # more beats fail meanwhile: said once, not once a beat
        in_the_way.rmdir()
        while read_holder(folder)["heartbeat"] == failed and time.monotonic() < deadline:
            time.sleep(0.05)
        assert read_holder(folder)["heartbeat"] > failed and read_holder(folder)["token"] == lock.holder["token"]
        errors += capsys.readouterr().err
    (line,) = errors.splitlines()
    assert line.startswith(f"vidray tune: could not renew the heartbeat in {tmp_path / LOCK_FILE} ([Errno 21] ")
    assert line.endswith("check the storage (a lock not renewed for 120 s is another driver's to take over)")


def test_storage_that_stops_answering_does_not_end_a_run_or_its_console(tmp_path, capsys):
    """A read the storage refuses (a 503, NFS ESTALE: read_json raises where it read "no file") ended the epoch
    follower's thread, and at the run's end made the lock's release fail the finished run. A real read error here: a
    folder stands where the file is (IsADirectoryError)."""
    from vidray.config import VidrayConfig
    from vidray.train.follow import EpochFollower

    run_dir = tmp_path / "run"
    (run_dir / "checkpoint_epoch_0000" / "vidray.json").mkdir(parents=True)  # a checkpoint whose info cannot be read
    follower = EpochFollower(str(run_dir), VidrayConfig(), command="vidray train", name="r", line=lambda m, n: "", every_s=3600)
    follower.poll()  # this look sees nothing; the next one tries again
    with FolderLock(str(tmp_path), "vidray train"):
        (tmp_path / LOCK_FILE).unlink()
        (tmp_path / LOCK_FILE).mkdir()
    (line,) = capsys.readouterr().err.splitlines()
    assert line.startswith(f"vidray train: could not release the lock {tmp_path / LOCK_FILE} (") and line.endswith(
        f"it is free to take once {STALE_AFTER_S:g} s old")


def test_a_sweep_of_a_run_a_live_driver_trains_is_refused_before_its_data_is_prepared(tmp_path, monkeypatch, capsys):
    """A second `vidray tune` of a run that a live driver trains (with data.stored_size changed, say) prepared its data
    first, deleting and decoding again the shards the first one was streaming, and only then was refused as in use.
    Refused before the data is touched now, and before Ray starts (the lock is one file to read)."""
    from vidray.tune import sweep

    # A tripwire, not a stand-in: no Ray may start here (before the fix, the refusal came after it).
    monkeypatch.setattr(sweep, "init_ray", lambda **_: pytest.fail("Ray started before the run's lock was checked"))
    monkeypatch.setenv("HOME", str(tmp_path))  # run.storage_path under ~, as configs/demo.yaml has it
    runs, data = tmp_path / "runs", tmp_path / "data"
    folder = runs / "demo"
    folder.mkdir(parents=True)
    overrides = ["run.storage_path=~/runs", "run.name=demo", "data.stored_size=48", f"data.videos_dir={data / 'videos'}",
                 f"data.manifest={data / 'm.parquet'}", f"data.dataset_dir={data / 'dataset'}"]  # fmt: skip
    (driver,) = start_lock_holders(str(folder), tmp_path / "go", command="vidray tune")
    try:
        assert driver.stdout.readline().strip() == "held"
        code = cli_main(["tune", "--config", str(DEMO), *overrides])
    finally:
        driver.kill()
        driver.wait()
    (line,) = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert code == 2 and line.startswith(f"vidray tune: error: {folder} is in use: `vidray tune` (pid {driver.pid} ")
    assert not data.exists()  # no videos generated, no manifest, no shards
    assert sorted(p.name for p in folder.iterdir()) == [LOCK_FILE]
