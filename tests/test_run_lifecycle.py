"""The run lifecycle shared by train, pretrain and tune (vidray/train/runs.py): plain run names, and a
restart that deletes only folders vidray wrote, strictly under run.storage_path, on a local path and
on a pyarrow filesystem URI. No Ray: these are decided before any Ray work starts."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from vidray.cli import main as cli_main
from vidray.config import ConfigError, load_config
from vidray.errors import UserError
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
        "tune", "sweep", storage, "fresh", restart=False, state_of=lambda _: "finished", finished_note="; its results follow"
    )
    assert state == "finished"
    assert capsys.readouterr().err.strip() == (
        f"vidray tune: {folder} is finished; its results follow (--restart or a new run.name starts over)"
    )
