"""The life of a run on storage, one set of rules for ``vidray train``, ``vidray pretrain`` and ``vidray tune``.

A run (or sweep) lives in ``<run.storage_path>/<name>``. Running the same command again:

* new: nothing there yet; vidray creates the folder with its marker (:data:`RUN_MARKER`);
* interrupted: continues (train and pretrain from their latest checkpoint, a sweep through Tune's restore);
* finished: only summarised or reported, nothing trained;
* a config that trains something else than the one the run started with is refused, naming the keys
  (keys in :data:`vidray.config.KEYS_FREE_ON_RESUME` may differ, and those the kind of run derives or fixes);
* ``--restart`` deletes the folder first, but only a folder strictly under ``run.storage_path`` that
  vidray itself wrote (:func:`delete_run`): anything else is refused with what it holds; a run on a bucket
  also loses its local folder on this machine (TensorBoard, wandb/, reports: :func:`clear_local_mirror`);
* a run that another live driver is training is refused, ``--restart`` included (vidray/folder_lock.py).

What a train or pretrain driver prints and logs of each epoch: vidray/train/follow.py.
"""

from __future__ import annotations

import contextlib
import json
import os
import posixpath
import shutil
import sys
from typing import Any, Callable, Literal

import pyarrow.fs as pafs

from vidray.model.checkpoint import INFO, check_training_state, complete_checkpoint_info
from vidray.config import KEYS_FREE_ON_RESUME, VidrayConfig, config_differences
from vidray.errors import UserError
from vidray.train.metrics import SCORE_METRIC
from vidray.folder_lock import LOCK_FILE, FolderLock, refuse_if_held
from vidray.storage import is_uri, join_uri, local_mirror, local_part, open_filesystem, read_json, write_json

RunKind = Literal["train", "pretrain", "sweep"]
# What the CLI says after "interrupted" when Ctrl-C or SIGTERM stops a train or pretrain run (cluster.interrupted_by_signal).
CONTINUES = "the same command continues it from its last finished epoch"
RunState = Literal["new", "interrupted", "finished"]

# Written by vidray into every run or sweep folder it creates: {"written_by": "vidray", "kind": ..., "name": ...}.
RUN_MARKER = "vidray_run.json"
# The config a sweep was started with (older vidray sweeps hold only this file of vidray's own).
SWEEP_CONFIG_FILE = "vidray_sweep.json"
CHECKPOINT_PREFIX = "checkpoint_epoch_"


# ------------------------------------------------------------------ files on storage


def _entries(folder: str) -> list[pafs.FileInfo]:
    fs, path = open_filesystem(folder)
    return fs.get_file_info(pafs.FileSelector(path, allow_not_found=True))


def _exists(uri: str) -> bool:
    fs, path = open_filesystem(uri)
    return fs.get_file_info(path).type != pafs.FileType.NotFound


# ------------------------------------------------------------------ where a run lives


def _inner_path(uri: str) -> tuple[str, str]:
    """(filesystem identity, normalised path inside it): what two locations are compared by."""
    fs, path = open_filesystem(uri)
    scheme = uri.split("://", 1)[0] if is_uri(uri) else "file"
    if scheme == "file" or isinstance(fs, pafs.LocalFileSystem):
        return "local", os.path.realpath(path)
    return f"{scheme}:{fs.type_name}", posixpath.normpath("/" + path.lstrip("/"))


def strictly_under(folder: str, parent: str) -> bool:
    (fs_a, a), (fs_b, b) = _inner_path(folder), _inner_path(parent)
    return fs_a == fs_b and a != b and a.startswith(b.rstrip("/") + "/")


def run_folder(storage_path: str, name: str) -> str:
    """``<storage_path>/<name>``, refused unless it is a folder strictly under ``storage_path``."""
    folder = join_uri(storage_path, name)
    if not name or "/" in name or "\\" in name or name in (".", "..") or not strictly_under(folder, storage_path):
        raise UserError(
            f"run.name={name!r} does not name a folder inside run.storage_path {storage_path}; "
            "use a plain name such as run.name=my_run"
        )
    return folder


# ------------------------------------------------------------------ vidray's marker


def read_marker(folder: str) -> dict[str, Any] | None:
    marker = read_json(join_uri(folder, RUN_MARKER))
    return marker if isinstance(marker, dict) else None


def update_marker(folder: str, **fields: Any) -> None:
    """Write ``fields`` into ``folder``'s marker, keeping what else it holds (creating both if needed)."""
    write_json(join_uri(folder, RUN_MARKER), {**(read_marker(folder) or {}), **fields})


def mark_run(folder: str, kind: RunKind, name: str, **state: Any) -> None:
    """Create ``folder`` (if needed) with vidray's marker: what a later ``--restart`` may delete.
    ``state``: what else the command records there (a sweep: ``finished=True`` once every trial is), beside
    what the marker holds already (the data the run trains on: :func:`keep_to_its_data`)."""
    update_marker(folder, written_by="vidray", kind=kind, name=name, **state)


def written_by_vidray(folder: str) -> bool:
    """Whether ``folder`` holds vidray's marker, or (runs of older vidray versions) its sweep config
    or a checkpoint with vidray's ``vidray.json``."""
    entries = _entries(folder)
    names = {entry.base_name for entry in entries}
    if RUN_MARKER in names or SWEEP_CONFIG_FILE in names:
        return True
    return any(
        entry.type == pafs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX)
        and _exists(join_uri(folder, entry.base_name, INFO))
        for entry in entries
    )  # fmt: skip


def _contents(folder: str) -> str:
    names = sorted(entry.base_name for entry in _entries(folder))
    return (", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")) or "nothing"


def delete_run(storage_path: str, folder: str, command: str = "vidray") -> None:
    """``--restart``: delete what ``folder`` holds if it is strictly under ``storage_path`` and vidray wrote it.

    Anything else is refused, naming the folder and what it holds: the default storage path is
    ``~/ray_results``, where a user's other Ray experiments live too. The deleting is done holding the run's lock
    (:class:`FolderLock`, as ``command``): two `--restart`s of one run at the same moment both found it free, and
    one deleted what the other had started to train; now the second is refused.
    """
    if not strictly_under(folder, storage_path):
        raise UserError(f"--restart: {folder} is not a folder inside run.storage_path {storage_path}; nothing deleted")
    if not _exists(folder):
        return
    if not written_by_vidray(folder):
        raise UserError(
            f"--restart: {folder} was not written by vidray (no {RUN_MARKER}; it holds {_contents(folder)}); "
            "nothing deleted: choose another run.name, or delete it yourself if it is yours to delete"
        )
    fs, _ = open_filesystem(folder)
    with FolderLock(folder, command):
        for entry in _entries(folder):
            if entry.base_name == LOCK_FILE:
                continue  # this driver's: released (deleted) as the block ends
            if entry.type == pafs.FileType.Directory:
                fs.delete_dir(entry.path)
            else:
                fs.delete_file(entry.path)
    if (local := local_part(folder)) is not None:
        with contextlib.suppress(OSError):  # only if still empty: another driver may have taken it since
            os.rmdir(local)


def clear_local_mirror(folder: str) -> None:
    """``--restart`` of the run at ``folder`` on a bucket: delete its local files on this machine too (its own
    folder, :func:`vidray.storage.local_mirror`: TensorBoard events, wandb/, reports), or the restarted run's
    TensorBoard curves would be drawn beside the deleted run's for the same epochs. Nothing else is touched."""
    mirror = local_mirror(folder)
    try:
        if mirror.is_dir():
            shutil.rmtree(mirror)
    except OSError as err:
        raise UserError(f"--restart: {folder} is deleted but its local files in {mirror} are not ({err}); "
                        "delete that folder yourself, or its TensorBoard curves mix with the new run's") from None


# ------------------------------------------------------------------ checkpoints of a train or pretrain run


def checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of every checkpoint folder under ``run_dir``, oldest first, complete or not
    (:func:`read_info` tells which are)."""
    found = []
    for entry in _entries(run_dir):
        suffix = entry.base_name.removeprefix(CHECKPOINT_PREFIX)
        if entry.type == pafs.FileType.Directory and entry.base_name.startswith(CHECKPOINT_PREFIX) and suffix.isdigit():
            found.append((int(suffix), join_uri(run_dir, entry.base_name)))
    return sorted(found)


def read_info(checkpoint: str) -> dict[str, Any] | None:
    """A complete checkpoint's ``vidray.json``; None for a folder that Ray is still copying, or whose copy
    a Ctrl-C, killed worker or full disk cut short (:func:`vidray.model.checkpoint.complete_checkpoint_info`).

    Ray registers a checkpoint only once its copy is done and continues a run from the last one it
    registered, rewriting a partial folder after it; vidray reads a run the same way."""
    return complete_checkpoint_info(checkpoint)


def latest_checkpoint(found: list[tuple[int, str]]) -> tuple[int, str, dict[str, Any]] | None:
    """(epoch, path, vidray.json) of the newest complete checkpoint among ``found`` (:func:`checkpoints`),
    or None when none is complete. Usually the newest folder; older ones are read only when it is partial."""
    for epoch, path in reversed(found):
        if (info := read_info(path)) is not None:
            return epoch, path, info
    return None


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def _epochs_done(metrics: dict[str, Any]) -> dict[str, Any]:
    """A checkpoint's metrics for people: ``epoch`` counts the epochs done (1 after the first), as the console's
    "epoch 1/2" and a sweep's summary do. Checkpoints and their history keep the 0-based index their folders carry."""
    scalars = _scalars(metrics)
    if "epoch" in scalars:
        scalars["epoch"] = int(scalars["epoch"]) + 1
    return scalars


def summarize_run(run_dir: str) -> dict[str, Any]:
    """Run dir, best and last metrics (``epoch``: epochs done, counted from 1) and their checkpoints, read from
    what the run left on storage."""
    infos = [(path, info) for _, path in checkpoints(run_dir) if (info := read_info(path)) is not None]
    if not infos:
        return {"run_dir": run_dir, "checkpoint": None, "best_checkpoint": None, "last": {}, "best": {}}
    last_path, last = infos[-1]
    best_path, best = max(infos, key=lambda item: (item[1]["metrics"].get(SCORE_METRIC, float("-inf")), item[1]["epoch"]))
    return {
        "run_dir": run_dir,
        "checkpoint": last_path,
        "best_checkpoint": best_path,
        "last": _epochs_done(last["metrics"]),
        "best": _epochs_done(best["metrics"]),
    }


def _with_defaults(saved: dict[str, Any], defaults: dict[str, Any]) -> dict[str, Any]:
    """``saved`` with every key it lacks taken from ``defaults``, at every depth."""
    out = dict(saved)
    for key, default in defaults.items():
        if key not in out:
            out[key] = default
        elif isinstance(out[key], dict) and isinstance(default, dict):
            out[key] = _with_defaults(out[key], default)
    return out


# The train.* keys a sweep's trials take from tune.* (vidray/tune/space.py), each beside the key that sets it: a
# sweep never reads them, so it neither compares them when continued nor takes them on its command line.
SWEEP_SETS = {"train.mixup_alpha": "tune.mixup_alpha", "train.lr": "tune.lr", "train.weight_decay": "tune.weight_decay"}


def refuse_changed_config(
    saved: dict[str, Any], cfg: VidrayConfig, folder: str, what: str, saved_in: str = "", not_compared: tuple[str, ...] = ()
) -> None:
    """A UserError naming the keys when ``cfg`` would train something else than ``saved`` did.

    A key ``saved`` lacks was added to vidray after that run started: the run had its default's
    behaviour, so it differs only where ``cfg`` sets another value (an upgrade alone refuses no run).
    A sweep (``what``) does not compare the keys its trials set (:data:`SWEEP_SETS`): demo.yaml's train.lr,
    `vidray train`'s, edited refused every demo sweep started before, for a value none of its trials used.
    ``not_compared``: more keys (or sections) the caller's kind of run derives or fixes, so that the hint names only
    keys its command takes (a pretraining run's: vidray.pretrain.checks.NOT_COMPARED_ON_RESUME).
    """
    saved = _with_defaults(saved, VidrayConfig().model_dump(mode="json"))
    free = KEYS_FREE_ON_RESUME + not_compared + (tuple(SWEEP_SETS) if what == "sweep" else ())
    changed = [key for key in config_differences(saved, cfg.model_dump(mode="json")) if not key.startswith(free)]
    if changed:
        where = f"; it is saved in {saved_in} there" if saved_in else ""
        # How to continue it instead: a config file changed by an upgrade (coin12.yaml's shuffle buffer) refused every
        # run started with the earlier one, and the message offered only to start over or elsewhere.
        as_started = " ".join(_as_override(key, saved) for key in changed) if len(changed) <= 6 else ""
        raise UserError(
            f"{folder} holds a {what} started with another config ({', '.join(changed[:6])} differ{where}): "
            + (f"continue it as it started with the override(s) {as_started}, or " if as_started else "")
            + "pass --restart to start it over, or set run.name to a new name"
        )


def refuse_ignored_overrides(command: str, overrides: list[str], set_by: dict[str, str | None]) -> None:
    """A one-line UserError for a command-line override of a key ``command`` never reads: ``set_by`` maps each such
    key to the one that sets it there (a sweep's trials take train.lr from tune.lr), or to None where nothing does.

    Overrides only, whatever their value: a config file serves every command (demo.yaml's train.lr is `vidray
    train`'s, and `vidray tune` and `vidray pretrain` read the same file), an override is asked of this command.
    `vidray tune train.lr=1e-4` trained every trial at tune.lr, without a word, and its saved config showed 1e-4."""
    for text in overrides:
        key, _, value = text.partition("=")
        if key.strip() not in set_by:
            continue
        owner = set_by[key.strip()]
        instead = f"{owner} sets it there; pass {owner}={value} instead" if owner else "drop the override"
        raise UserError(f"{text} has no effect on `{command}`: {instead}")


def _as_override(key: str, saved: dict[str, Any]) -> str:
    """``key=value``, ``key`` dotted, ``value`` as ``saved`` holds it, written as the command line takes it (YAML)."""
    value: Any = saved
    for part in key.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    text = value if isinstance(value, str) and value and all(c not in value for c in " :#'\"{}[],") else json.dumps(value)
    return f"{key}={text}"


def existing_run_state(cfg: VidrayConfig, run_dir: str, not_compared: tuple[str, ...] = ()) -> RunState:
    """``new``, ``interrupted`` or ``finished``: what a train or pretrain ``run_dir`` holds for ``cfg``.

    Reads the latest complete checkpoint: a partial folder after it is ignored, and a run with partial
    folders only is interrupted (Ray starts it again from scratch). Refuses, naming the keys, a run
    started with a config that trains something else (resuming it would mix two runs), and a latest
    complete checkpoint vidray will not read. ``not_compared``: keys this kind of run derives or fixes
    (:func:`refuse_changed_config`; `vidray train` compares every key).
    """
    found = checkpoints(run_dir)
    if not found:
        return "new"
    latest_complete = latest_checkpoint(found)
    if latest_complete is None:
        return "interrupted"
    epoch, latest, info = latest_complete
    if "config" in info:
        refuse_changed_config(info["config"], cfg, run_dir, "run", not_compared=not_compared)
    if epoch >= cfg.train.epochs - 1:
        return "finished"
    if not is_uri(latest):  # a remote one is checked by the worker that downloads it
        check_training_state(latest)
    return "interrupted"


# What each kind of run is called where a command meets another kind's folder.
KIND_NAMES: dict[str, str] = {"train": "training run", "pretrain": "pretraining run", "sweep": "sweep"}


def folder_kind(folder: str) -> str | None:
    """The kind of run vidray wrote in ``folder``: its marker's, "sweep" for an older sweep (its config
    file only), None where neither says (an older train or pretrain run, or no run)."""
    if (kind := (read_marker(folder) or {}).get("kind")) is not None:
        return kind
    return "sweep" if _exists(join_uri(folder, SWEEP_CONFIG_FILE)) else None


def refuse_other_kind(folder: str, kind: RunKind, command: str) -> None:
    """A UserError when ``folder`` holds another kind of run than ``command`` trains: `vidray train` and
    `vidray tune` of one run.name (the demo config's, for one) would write one folder, the training run's
    checkpoints among the sweep's trials, and a --restart of either deleted the other."""
    other = folder_kind(folder)
    if other is not None and other != kind:
        raise UserError(
            f"{folder} holds a {KIND_NAMES.get(other, other)}, not a {KIND_NAMES[kind]} as `vidray {command}` writes: "
            "set run.name to a new name (--restart does not delete another kind of run)"
        )


def open_run(
    command: str, kind: RunKind, storage_path: str, name: str, *, restart: bool, state_of: Callable[[str], RunState],
    finished_note: str, can_train: Callable[[], None] = lambda: None,
) -> tuple[str, RunState]:
    """(folder, state) of the run ``command`` is about to train, continue or report.

    ``--restart`` deletes the folder first (:func:`delete_run`; on a bucket its local folder too:
    :func:`clear_local_mirror`); a folder vidray did not write is refused; ``state_of(folder)`` says what
    is there (and refuses a changed config); the console is told what happens; a run that will train gets
    vidray's marker before Ray writes into its folder. A run that a live driver trains is refused first
    (vidray/folder_lock.py): the caller trains inside ``FolderLock(folder, ...)``.

    ``can_train()`` refuses a run that cannot train here (the cluster's resources): before ``--restart`` deletes
    anything (`vidray train --restart train.use_gpu=true` on a CPU cluster deleted the run, then was refused), and
    before a run that will train is announced or marked; not for a finished run, which is only summarised.
    """
    folder = run_folder(storage_path, name)
    refuse_if_held(f"vidray {command}", folder)  # before --restart deletes anything
    refuse_other_kind(folder, kind, command)
    if restart:
        can_train()
        delete_run(storage_path, folder, f"vidray {command}")
        if local_part(folder) is None:  # a local (or file://) run's files are inside its folder, deleted already
            clear_local_mirror(folder)
    elif _entries(folder) and not written_by_vidray(folder):
        # Neither read as a run nor adopted: a marker would let a later --restart delete someone else's files.
        raise UserError(
            f"{folder} exists and was not written by vidray (it holds {_contents(folder)}): set run.name to a new name"
        )
    state = state_of(folder)
    if state == "finished":
        print(f"vidray {command}: {folder} is finished{finished_note} (--restart or a new run.name starts over)",
              file=sys.stderr, flush=True)  # fmt: skip
        return folder, state
    if not restart:
        can_train()
    if state == "interrupted":
        what = "the interrupted sweep " if kind == "sweep" else ""
        where = "" if kind == "sweep" else " from its latest checkpoint"
        print(f"vidray {command}: continuing {what}{folder}{where}", file=sys.stderr, flush=True)
    if read_marker(folder) is None:
        mark_run(folder, kind, name)
    return folder, state


# The marker's record of the data a run trains on (vidray.data.dataset.DatasetInfo.identity).
TRAINED_ON = "trained_on"


def _data_changes(before: dict[str, Any], now: dict[str, Any]) -> str:
    changes = [f"classes {how}: {', '.join(names)}" for how, names in (
        ("added", [c for c in now["classes"] if c not in before["classes"]]),
        ("removed", [c for c in before["classes"] if c not in now["classes"]]),
    ) if names]  # fmt: skip
    changes += [f"{split} videos {before['videos'].get(split)} -> {count}" for split, count in now["videos"].items()
                if before["videos"].get(split) != count]  # fmt: skip
    return "; ".join(changes) or "as many videos, not the same ones"


def keep_to_its_data(folder: str, what: str, state: RunState, data: dict[str, Any]) -> None:
    """Refuse to continue the interrupted run in ``folder`` on other data than it started on (its epochs so far
    trained on that data; with a class added its checkpoint does not even load); record ``data`` otherwise.

    Called once the data is prepared: preparing re-indexes a folder that changed since the run started."""
    before = (read_marker(folder) or {}).get(TRAINED_ON)
    if state == "interrupted" and before is not None and before != data:
        raise UserError(
            f"{folder} holds a {what} started on other data ({_data_changes(before, data)}): continue it on the data "
            "it started with, or pass --restart to start it over on this data, or set run.name to a new name"
        )
    if before != data:
        update_marker(folder, **{TRAINED_ON: data})


def warn_if_finished_on_other_data(folder: str, what: str, data: dict[str, Any], command: str) -> None:
    """One line on stderr when the finished run in ``folder`` was trained on other data than ``data``: its report
    evaluates its best model on the data as it is now, beside validation metrics of the data it trained on."""
    before = (read_marker(folder) or {}).get(TRAINED_ON)
    if before is not None and before != data:
        print(f"{command}: {folder} is a {what} finished on other data than this ({_data_changes(before, data)}): the "
              "report below evaluates its best model on the data as it is now; --restart trains it again on this data",
              file=sys.stderr, flush=True)  # fmt: skip
