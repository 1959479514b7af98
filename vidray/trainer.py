"""The driver side of a training run: check, build the ``TorchTrainer``, run it once, summarise.

:func:`run_training` is ``vidray train``. It connects to Ray, refuses storage
that the cluster's nodes cannot share, prepares the dataset, checks the config
against it, and hands :func:`vidray.train.train_loop_per_worker` to a
``TorchTrainer`` (:func:`build_trainer`). Ray Tune builds the same trainer per
trial (vidray/tune.py).

A run lives under ``run.storage_path/run.name``. Running the same command again:

* finished run (its last epoch is checkpointed): prints its summary, trains nothing;
* interrupted run: continues from its latest checkpoint (Ray Train restores it);
* ``restart=True`` (``--restart``) or a new ``run.name``: starts over.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import pyarrow.fs as pafs
import ray.train
from ray.train.torch import TorchTrainer

from vidray.checkpoint import INFO, check_training_state
from vidray.config import KEYS_FREE_ON_RESUME, TrainConfig, VidrayConfig, config_differences
from vidray.dataset import ClipShape, DatasetInfo, read_dataset_info
from vidray.errors import UserError
from vidray.ingest import build_datasets, data_config, ingest_cpus
from vidray.metrics import SCORE_METRIC
from vidray.model import check_model_config
from vidray.optim import micro_batch_size
from vidray.storage import join_uri, open_filesystem, resolve_path

CHECKPOINTS_TO_KEEP = 2
CHECKPOINT_PREFIX = "checkpoint_epoch_"


def check_dataset(cfg: VidrayConfig, info: DatasetInfo, dataset_dir: str) -> ClipShape:
    shape = check_stored_clips(cfg, info, dataset_dir)
    for split in ("train", "val"):
        if info.split_counts.get(split, 0) == 0:
            raise UserError(f"split {split!r} of {dataset_dir} holds no videos; training needs train and val videos")
    per_worker = info.split_counts["train"] // cfg.train.num_workers
    if per_worker < micro_batch_size(cfg.train):
        raise UserError(
            f"{dataset_dir} has {info.split_counts['train']} training videos: fewer than one batch of "
            f"{micro_batch_size(cfg.train)} per worker; lower train.batch_size or train.num_workers"
        )
    return shape


def check_stored_clips(cfg: VidrayConfig, info: DatasetInfo, dataset_dir: str) -> ClipShape:
    """The clips the model eats (data.frames x data.size²) must fit in what the dataset stores: their ClipShape."""
    if cfg.data.frames > info.stored_frames:
        raise UserError(
            f"data.frames={cfg.data.frames} exceeds the {info.stored_frames} frames stored per video in "
            f"{dataset_dir}; lower data.frames or preprocess again with more stored frames"
        )
    if cfg.data.size > info.stored_size:
        raise UserError(
            f"data.size={cfg.data.size} exceeds the stored size {info.stored_size} of {dataset_dir}; "
            "lower data.size or preprocess again at a larger size"
        )
    return ClipShape(
        list(info.classes), cfg.data.frames, cfg.data.size, info.stored_frames, info.stored_size,
        decoder=info.raw.get("decoder") or "pyav",
    )


def make_run_config(cfg: VidrayConfig, **overrides: Any) -> ray.train.RunConfig:
    """RunConfig from ``cfg.run``/``cfg.train``: name, absolute storage path, failures, checkpoints kept."""
    kwargs = dict(
        name=cfg.run.name,
        storage_path=resolve_path(cfg.run.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_TO_KEEP, checkpoint_score_attribute=SCORE_METRIC, checkpoint_score_order="max"
        ),
    )
    kwargs.update(overrides)
    return ray.train.RunConfig(**kwargs)


def scaling_config(train: TrainConfig) -> ray.train.ScalingConfig:
    return ray.train.ScalingConfig(
        num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}
    )


def build_trainer(
    cfg: VidrayConfig,
    *,
    run_config: ray.train.RunConfig | None = None,
    dataset_dir: str | None = None,
) -> TorchTrainer:
    """A ready-to-``fit()`` TorchTrainer for ``cfg`` on ``dataset_dir`` (default ``cfg.data.dataset_dir``).

    ``run_config`` defaults to :func:`make_run_config`; pass your own (Ray Tune
    does) to change where results go or to add callbacks.
    """
    from vidray.train import train_loop_per_worker

    dataset_dir = resolve_path(dataset_dir or cfg.data.dataset_dir)  # workers run elsewhere than the driver's cwd
    info = read_dataset_info(dataset_dir)
    shape = check_dataset(cfg, info, dataset_dir)
    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "shape": shape,
            "train_videos": info.split_counts["train"],
            "val_videos": info.split_counts["val"],
        },
        scaling_config=scaling_config(cfg.train),
        run_config=run_config or make_run_config(cfg),
        datasets=build_datasets(dataset_dir, cfg.train, info),
        dataset_config=data_config(),
    )


# ------------------------------------------------------------------ a run on storage


def _checkpoints(run_dir: str) -> list[tuple[int, str]]:
    """(epoch, path) of every checkpoint under ``run_dir``, oldest first."""
    fs, root = open_filesystem(run_dir)
    entries = fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))
    found = []
    for entry in entries:
        name = entry.base_name
        if entry.type == pafs.FileType.Directory and name.startswith(CHECKPOINT_PREFIX):
            suffix = name.removeprefix(CHECKPOINT_PREFIX)
            if suffix.isdigit():
                found.append((int(suffix), join_uri(run_dir, name)))
    return sorted(found)


def _read_info(checkpoint: str) -> dict[str, Any] | None:
    fs, path = open_filesystem(join_uri(checkpoint, INFO))
    try:
        with fs.open_input_stream(path) as f:
            return json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None  # a checkpoint still being written, or damaged: not one to summarise


def summarize_run(run_dir: str) -> dict[str, Any]:
    """Run dir, best and last metrics and their checkpoints, read from what the run left on storage."""
    infos = [(path, info) for _, path in _checkpoints(run_dir) if (info := _read_info(path)) is not None]
    if not infos:
        return {"run_dir": run_dir, "checkpoint": None, "best_checkpoint": None, "last": {}, "best": {}}
    last_path, last = infos[-1]
    best_path, best = max(infos, key=lambda item: (item[1]["metrics"].get(SCORE_METRIC, float("-inf")), item[1]["epoch"]))
    return {
        "run_dir": run_dir,
        "checkpoint": last_path,
        "best_checkpoint": best_path,
        "last": _scalars(last["metrics"]),
        "best": _scalars(best["metrics"]),
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


def existing_run_state(cfg: VidrayConfig, run_dir: str) -> str:
    """``new``, ``interrupted`` or ``finished``: what ``run_dir`` holds for ``cfg``.

    Refuses, naming the keys, a run that was started with a config that trains
    something else (resuming it would mix two runs), and a latest checkpoint
    vidray will not read.
    """
    checkpoints = _checkpoints(run_dir)
    if not checkpoints:
        return "new"
    epoch, latest = checkpoints[-1]
    info = _read_info(latest)
    if info is not None and "config" in info:
        changed = [
            key
            for key in config_differences(info["config"], cfg.model_dump(mode="json"))
            if not key.startswith(KEYS_FREE_ON_RESUME)
        ]
        if changed:
            raise UserError(
                f"{run_dir} holds a run started with another config ({', '.join(changed[:6])} differ): "
                "pass --restart to start it over, or set run.name to a new name"
            )
    if epoch >= cfg.train.epochs - 1:
        return "finished"
    if "://" not in latest:  # a remote one is checked by the worker that downloads it
        check_training_state(latest)
    return "interrupted"


def delete_run(run_dir: str) -> None:
    fs, path = open_filesystem(run_dir)
    if fs.get_file_info(path).type != pafs.FileType.NotFound:
        fs.delete_dir(path)


def on_shared_storage(cfg: VidrayConfig) -> VidrayConfig:
    """``cfg`` with run.storage_path and data.dataset_dir as every node must get them (after init_ray())."""
    from vidray.cluster import shared_storage_paths

    storage_path, dataset_dir = shared_storage_paths(cfg)
    return cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"storage_path": storage_path}),
            "data": cfg.data.model_copy(update={"dataset_dir": dataset_dir}),
        }
    )


def run_training(cfg: VidrayConfig, restart: bool = False) -> dict[str, Any]:
    """Prepare the data, train (or continue, or just report a finished run), and summarise.

    Returns run dir, best and last metrics and checkpoint paths.
    """
    from vidray.cluster import check_run_resources, cluster_capacity, init_ray
    from vidray.prepare import prepare_dataset

    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)
    init_ray()
    cfg = on_shared_storage(cfg)
    storage_path, dataset_dir = cfg.run.storage_path, cfg.data.dataset_dir
    run_dir = join_uri(storage_path, cfg.run.name)
    if restart:
        delete_run(run_dir)
    state = existing_run_state(cfg, run_dir)
    if state == "finished":
        print(f"vidray train: {run_dir} is finished ({cfg.train.epochs} epochs); nothing to train "
              "(--restart or a new run.name starts over)", file=sys.stderr, flush=True)
        return summarize_run(run_dir)
    if state == "interrupted":
        print(f"vidray train: continuing {run_dir} from its latest checkpoint", file=sys.stderr, flush=True)

    prepare_dataset(cfg)
    check_run_resources(cfg.train, cluster_capacity(), ingest_cpus(cfg.train, read_dataset_info(dataset_dir)))
    build_trainer(cfg, dataset_dir=dataset_dir).fit()
    return summarize_run(run_dir)
