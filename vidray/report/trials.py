"""A sweep's trials as the report sees them: one :class:`TrialSummary` each, from Tune's results
of this run or, for a sweep that had finished, from the JSON files Tune left in the experiment folder."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import pyarrow.fs as pafs

from vidray.config import VidrayConfig
from vidray.storage import is_uri, join_uri, open_filesystem, read_json
from vidray.train.metrics import EPOCHS_DONE, TUNABLE_METRICS
from vidray.train.runs import checkpoints, latest_checkpoint
from vidray.tune.space import trial_label
from vidray.tune.sweep import TRAIN_RUNS_DIR

# The metrics of a trial's last epoch the results table shows, by column.
LAST_EPOCH_METRICS = {
    "Training Loss": "train_loss",
    "Test Loss": "val_loss",
    "Precision": "val_micro_precision",
    "Recall": "val_micro_recall",
    "F1": "val_micro_f1",
    "Macro-F1": "val_macro_f1",
    "Accuracy": "val_accuracy",
}
# The metrics a trial's history keeps per epoch: every metric tune.metric may name, not only the table's (a sweep
# ranked by val_macro_recall found no value in any trial, so it had no best model).
HISTORY_METRICS = tuple(dict.fromkeys([*LAST_EPOCH_METRICS.values(), *TUNABLE_METRICS, "val_videos"]))


@dataclass
class TrialSummary:
    trial_id: str
    label: str  # the "Type" column
    params: dict[str, float]
    epochs_done: int
    epochs: int
    status: str  # "completed", "stopped early" (ASHA) or "error: ..."
    last: dict[str, float]  # metrics of the last epoch
    best_value: float | None  # tune.metric at its best epoch
    best_epoch: int | None  # epochs done at that point (1-based)
    best_checkpoint: str | None
    trial_dir: str
    history: list[dict[str, float]] = field(default_factory=list)  # one dict per epoch
    best_videos: int | None = None  # videos the best epoch's metric was measured on


def _finite(value) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(value)


def _history(result) -> list[dict[str, float]]:
    """Per-epoch metrics of one trial, deduplicated by epoch (a resumed trial may repeat one)."""
    frame = result.metrics_dataframe
    if frame is None or EPOCHS_DONE not in frame:
        return []
    frame = frame.dropna(subset=[EPOCHS_DONE]).drop_duplicates(subset=[EPOCHS_DONE], keep="last")
    wanted = dict.fromkeys([EPOCHS_DONE, *HISTORY_METRICS, "checkpoint_path"])
    columns = [c for c in wanted if c in frame]
    rows = frame.sort_values(EPOCHS_DONE)[columns].to_dict("records")
    return [{k: (int(v) if k == EPOCHS_DONE else v) for k, v in row.items()} for row in rows]


@dataclass
class StoredTrial:
    """A finished trial as Tune left it on storage, read from its params.json and result.json only
    (what :func:`summarize_trial` reads of a Tune ``Result``; no pickle is loaded)."""

    config: dict[str, Any]
    metrics: dict[str, Any]
    metrics_dataframe: pd.DataFrame | None
    path: str
    error: None = None  # a sweep is marked finished only when no trial errored


def read_finished_trials(experiment_path: str) -> list[StoredTrial]:
    """Every trial folder of a finished sweep (the ones holding Tune's params.json)."""
    fs, root = open_filesystem(experiment_path)
    trials = []
    for entry in fs.get_file_info(pafs.FileSelector(root)):
        trial_dir = join_uri(experiment_path, entry.base_name)
        params = read_json(join_uri(trial_dir, "params.json")) if entry.type == pafs.FileType.Directory else None
        if not isinstance(params, dict):
            continue
        _, result_path = open_filesystem(join_uri(trial_dir, "result.json"))
        try:
            with fs.open_input_stream(result_path) as f:
                rows = [json.loads(line) for line in f.read().decode().splitlines() if line.strip()]
        except FileNotFoundError:
            rows = []
        frame = pd.json_normalize(rows, sep="/") if rows else None
        trials.append(StoredTrial(config=params, metrics=rows[-1] if rows else {}, metrics_dataframe=frame, path=trial_dir))
    return trials


def checkpoint_uri(path: str | None, storage_path: str) -> str | None:
    """A checkpoint path as Tune recorded it, made a URI again where the sweep's storage is one: Ray records the
    path inside the checkpoint's filesystem, which drops the scheme of object storage ("bucket/runs/..." for
    s3://bucket/runs/...). Read as a local path, it never existed, and a sweep on a bucket had no best model."""
    if not path or is_uri(path) or not is_uri(storage_path):
        return path
    scheme, rest = storage_path.split("://", 1)
    rest, mark, query = rest.partition("?")  # an S3-compatible store's ?endpoint_override=...: kept, pyarrow needs it
    host = rest.split("/", 1)[0]  # s3/gs: the bucket, which the path starts with; file: none; hdfs: the namenode
    uri = f"{scheme}://{path}" if path.startswith(f"{host}/") else f"{scheme}://{host}{path}"
    return uri + mark + query


def _train_run_dir(result, storage_path: str) -> str | None:
    """The trial's Ray Train run, ``<experiment>/train_runs/<trial_id>`` (vidray/tune/sweep.py's layout), beside
    its Tune trial folder; None without a trial id (Tune recorded no result of it)."""
    trial_id = result.metrics.get("trial_id")
    if not trial_id:
        return None
    trial_dir, mark, query = checkpoint_uri(str(result.path), storage_path).partition("?")  # a live Result's path has no scheme
    experiment = trial_dir.rstrip("/").rsplit("/", 1)[0] + mark + query
    return join_uri(experiment, TRAIN_RUNS_DIR, str(trial_id))


def _with_checkpointed_epochs(history: list[dict[str, Any]], result, storage_path: str) -> list[dict[str, Any]]:
    """``history`` with the epochs Tune never got, from the history in the trial's latest checkpoint's vidray.json.

    A sweep stopped (Ctrl-C, SIGTERM, a dead driver) after Ray Train wrote an epoch's checkpoint and before Tune
    took that epoch's report lost the epoch's row; the rerun resumed from that checkpoint, so nothing reported it
    again. After the last epoch, a trial that had trained every epoch read "stopped early", its last metrics and
    best one epoch old, and that epoch's checkpoint never its best. (`vidray train` catches up the same way,
    vidray/train/follow.py.) Tune's rows are kept where they exist."""
    run_dir = _train_run_dir(result, storage_path)
    found = checkpoints(run_dir) if run_dir else []
    latest = latest_checkpoint(found)
    if latest is None:
        return history
    folders = dict(found)  # 0-based epoch -> its checkpoint folder (Ray keeps only some)
    reported = {row[EPOCHS_DONE] for row in history}
    missing = []
    for metrics in latest[2].get("history", []):
        epoch = int(metrics["epoch"])  # 0-based, as checkpoint_epoch_NNNN counts
        if epoch + 1 in reported:
            continue
        row = {EPOCHS_DONE: epoch + 1, **{k: metrics[k] for k in HISTORY_METRICS if k in metrics}}
        if epoch in folders:
            row["checkpoint_path"] = folders[epoch]
        missing.append(row)
    return sorted([*history, *missing], key=lambda row: row[EPOCHS_DONE])


def _checkpoint_exists(path: str | None) -> bool:
    if not path:
        return False
    fs, inner = open_filesystem(path)
    return fs.get_file_info(inner).type == pafs.FileType.Directory

def summarize_trial(result, cfg: VidrayConfig) -> TrialSummary:
    params = {k: result.config[k] for k in ("mixup_alpha", "lr", "weight_decay", "seed") if k in result.config}
    history = _with_checkpointed_epochs(_history(result), result, cfg.run.storage_path)
    metric, sign = cfg.tune.metric, (1 if cfg.tune.mode == "max" else -1)
    epochs_done = history[-1][EPOCHS_DONE] if history else 0
    if result.error is not None:
        status = f"error: {type(result.error).__name__}"
    elif epochs_done < cfg.train.epochs:
        status = "stopped early"
    else:
        status = "completed"
    ranked = sorted(
        (row for row in history if metric in row and not math.isnan(row[metric])),
        key=lambda row: (-sign * row[metric], -row[EPOCHS_DONE]),
    )
    # The best epoch whose checkpoint is still on disk (a trial keeps its best ones by tune.metric and its latest),
    # so that the value, epoch and checkpoint reported are one epoch's; else the best epoch, with no checkpoint.
    located = ((row, checkpoint_uri(row.get("checkpoint_path"), cfg.run.storage_path)) for row in ranked)
    kept, checkpoint = next(((row, uri) for row, uri in located if _checkpoint_exists(uri)), (None, None))
    best = kept or (ranked[0] if ranked else None)
    return TrialSummary(
        trial_id=str(result.metrics.get("trial_id") or Path(result.path).name),
        label=trial_label(params),
        params={k: float(v) for k, v in params.items()},
        epochs_done=epochs_done,
        epochs=cfg.train.epochs,
        status=status,
        last={k: float(history[-1][k]) for k in LAST_EPOCH_METRICS.values() if history and k in history[-1]},
        best_value=float(best[metric]) if best else None,
        best_videos=int(best["val_videos"]) if best and _finite(best.get("val_videos")) else None,
        best_epoch=best[EPOCHS_DONE] if best else None,
        best_checkpoint=checkpoint,
        trial_dir=str(result.path),
        history=history,
    )


def pick_best(trials: list[TrialSummary], mode: str) -> TrialSummary | None:
    scored = [t for t in trials if t.best_value is not None and t.best_checkpoint]
    if not scored:
        return None
    return (max if mode == "max" else min)(scored, key=lambda t: t.best_value)
