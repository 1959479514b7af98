"""The driver side of a training run: check, build the ``TorchTrainer``, run it once, summarise.

:func:`run_training` is ``vidray train``. It checks what the config alone decides
(before Ray starts), connects to Ray, refuses storage that the cluster's nodes cannot
share and a run they cannot place (before ``--restart`` deletes anything), prepares the
dataset, checks the config against it, and hands
:func:`vidray.train.finetune.finetune_loop_per_worker` (the worker loop, vidray/train/loop.py,
with the fine-tuning task) to a ``TorchTrainer`` (:func:`build_trainer`). Ray Tune builds the
same trainer per trial (vidray/tune/sweep.py).

A run lives under ``run.storage_path/run.name``. Running the same command again:

* finished run (its last epoch is checkpointed): prints its summary, trains nothing;
* interrupted run: continues from its latest checkpoint (Ray Train restores it);
* ``restart=True`` (``--restart``) or a new ``run.name``: starts over.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import ray.train
import torch
from ray.train.torch import TorchTrainer

from vidray.cluster import DATA_CPUS, check_run_resources, cluster_capacity, init_ray, interrupted_by_signal, shared_storage_paths
from vidray.config import StoreName, TrainSettings, VidrayConfig
from vidray.data.dataset import ClipShape, DatasetInfo, read_dataset_info
from vidray.data.prepare import prepare_dataset
from vidray.data.shard_files import inside_job_copy
from vidray.errors import UserError
from vidray.train.decoding import device_decoder_for
from vidray.train.finetune import finetune_loop_per_worker
from vidray.train.placement import CachedSplits, build_datasets, data_config, ingest_cpus
from vidray.train.metrics import SCORE_METRIC
from vidray.model.classifier import check_model_config
from vidray.train.optim import micro_batch_size, warn_if_warmup_fills_the_run
from vidray.folder_lock import FolderLock
from vidray.train.follow import EpochFollower
from vidray.train.runs import CONTINUES, existing_run_state, keep_to_its_data, open_run, summarize_run
from vidray.storage import resolve_path

CHECKPOINTS_TO_KEEP = 2


# The splits fine-tuning reads: it trains on train and picks its best epoch on val.
FINETUNE_SPLITS = ("train", "val")


def check_decode_device(train: TrainSettings, store: StoreName) -> None:
    """``train.decode_device=cuda`` on CPU workers (of a compressed store) refused from the config, by the workers'
    own check: on a CPU device it decides without a decoder. A GPU worker's library is checked on the GPU."""
    if not train.use_gpu:
        device_decoder_for(train, torch.device("cpu"), store)


def check_training_config(cfg: VidrayConfig) -> None:
    """What a fine-tuning config must satisfy on its own: checked before Ray starts (`vidray train
    train.grad_accum_steps=3` of a batch of 16 started Ray, prepared the data and deleted a --restart's run first)."""
    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)
    micro_batch_size(cfg.train)
    check_decode_device(cfg.train, cfg.data.store)


def check_resources_before_the_data(train: TrainSettings) -> None:
    """:func:`check_run_resources` of what holds whether or not the data will be cached (known once it is prepared)."""
    check_run_resources(train, cluster_capacity(), data_cpus=DATA_CPUS if train.cache_dataset == "never" else 0)


def check_dataset(cfg: VidrayConfig, info: DatasetInfo, dataset_dir: str) -> ClipShape:
    shape = check_stored_clips(cfg, info, dataset_dir)
    for split in FINETUNE_SPLITS:
        if info.split_counts.get(split, 0) == 0:
            raise UserError(
                f"split {split!r} of {dataset_dir} holds no videos; training needs train and val videos "
                "(a folder without val/: data.val_fraction > 0 holds part of train out as val)"
            )
    per_worker = info.split_counts["train"] // cfg.train.num_workers
    if per_worker < micro_batch_size(cfg.train):
        raise UserError(
            f"{dataset_dir} has {info.split_counts['train']} training videos: fewer than one batch of "
            f"{micro_batch_size(cfg.train)} per worker; lower train.batch_size or train.num_workers"
        )
    return shape


def warn_of_untrainable_classes(info: DatasetInfo, command: str) -> None:
    """One console line naming the classes with no processed train video (all their videos in val/test, or all
    rejected): the model cannot learn them, yet they count in val_macro_f1. Often a class folder named
    differently in train/ than in val/ (``Bird`` and ``bird`` are two classes). Nothing when every class has
    train videos, or the dataset records no per-class counts."""
    per_split = {split: counts.get("per_class", {}) for split, counts in info.raw.get("splits", {}).items()}
    train = per_split.get("train")
    absent = [name for name in info.classes if not train.get(name)] if train else []
    if not absent:
        return
    elsewhere = {name: {split: counts[name] for split, counts in per_split.items() if counts.get(name)} for name in absent}
    shown = "; ".join(f"{name} ({', '.join(f'{s} {n}' for s, n in counts.items()) or 'no videos'})" for name, counts in elsewhere.items())
    print(f"{command}: warning: {len(absent)} of {len(info.classes)} classes have no training videos, so the model "
          f"cannot learn them and they lower val_macro_f1: {shown}. A class folder named differently in train/ "
          "than in val/ or test/ makes two classes", file=sys.stderr, flush=True)  # fmt: skip


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
        store=info.store,
        clip_bytes=info.clip_bytes,
    )


def make_run_config(
    cfg: VidrayConfig, *, score: str = SCORE_METRIC, score_order: str = "max", **overrides: Any
) -> ray.train.RunConfig:
    """RunSettings from ``cfg.run``/``cfg.train``: name, absolute storage path, failures, checkpoints kept
    (the best :data:`CHECKPOINTS_TO_KEEP` by ``score``, and the latest)."""
    kwargs = dict(
        name=cfg.run.name,
        storage_path=resolve_path(cfg.run.storage_path),
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_TO_KEEP, checkpoint_score_attribute=score, checkpoint_score_order=score_order
        ),
    )
    kwargs.update(overrides)
    return ray.train.RunConfig(**kwargs)


def scaling_config(train: TrainSettings) -> ray.train.ScalingConfig:
    return ray.train.ScalingConfig(
        num_workers=train.num_workers, use_gpu=train.use_gpu, resources_per_worker={"CPU": train.cpus_per_worker}
    )


def build_trainer(
    cfg: VidrayConfig,
    *,
    run_config: ray.train.RunConfig | None = None,
    dataset_dir: str | None = None,
    cached_splits: CachedSplits | None = None,
    trial: bool = False,
) -> TorchTrainer:
    """A ready-to-``fit()`` TorchTrainer for ``cfg`` on ``dataset_dir`` (default ``cfg.data.dataset_dir``).

    ``run_config`` defaults to :func:`make_run_config`; pass your own (Ray Tune
    does) to change where results go or to add callbacks. ``cached_splits``: the
    splits already in the object store (:func:`vidray.train.placement.cache_splits`;
    a sweep's trials share them), for a run that caches them. ``trial``: a sweep's trial, whose sweep
    decided for it: cached (``cached_splits``) or streamed, whatever ``train.cache_dataset`` would choose
    alone; and its workers count their node's memory as shared with the trials beside them
    (:func:`vidray.train.loop.workers_sharing_node`).
    """
    dataset_dir = resolve_path(dataset_dir or cfg.data.dataset_dir)  # workers run elsewhere than the driver's cwd
    info = read_dataset_info(dataset_dir)
    shape = check_dataset(cfg, info, dataset_dir)
    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)
    return TorchTrainer(
        finetune_loop_per_worker,
        train_loop_config={
            "cfg": cfg,
            "shape": shape,
            "train_videos": info.split_counts["train"],
            "val_videos": info.split_counts["val"],
            "node_shared": trial,
        },
        scaling_config=scaling_config(cfg.train),
        run_config=run_config or make_run_config(cfg),
        datasets=build_datasets(dataset_dir, cfg.train, info, cached_splits, stream=trial and cached_splits is None),
        dataset_config=data_config(),
    )


def warn_if_inside_a_job_copy(cfg: VidrayConfig, command: str) -> None:
    """Under `ray job submit --working-dir`, an output path in the job's working-directory copy (a relative one, or
    an absolute one inside it) is lost when Ray deletes the copy: say so once."""
    outputs = [("run.storage_path", cfg.run.storage_path)]
    if command != "vidray train":  # a training run writes no reports
        outputs.append(("run.reports_dir", cfg.run.reports_dir))
    inside = [(key, str(value)) for key, value in outputs if value is not None and inside_job_copy(str(value))]
    if inside:
        one, relative = len(inside) == 1, not any(Path(value).expanduser().is_absolute() for _, value in inside)
        verb = "points" if one else "point"
        verb = (("is relative, so it " if one else "are relative, so they ") + verb) if relative else verb
        print(f"{command}: warning: {' and '.join(key for key, _ in inside)} {verb} into this job's working-directory "
              f"copy ({Path.cwd()}), which Ray deletes; use {'an absolute path' if relative else 'a path outside it'} "
              "(the default is ~/ray_results)", file=sys.stderr, flush=True)  # fmt: skip


def on_shared_storage(cfg: VidrayConfig, command: str) -> VidrayConfig:
    """``cfg`` with its paths as every worker must get them (after init_ray()): run.storage_path and
    data.dataset_dir as every node must, and a local model.name_or_path absolute (Ray Train's workers run in
    folders of their own, where a relative one was taken for a hub id). Warns, as ``command``, of an output
    path that a `ray job submit` would lose."""
    warn_if_inside_a_job_copy(cfg, command)
    storage_path, dataset_dir = shared_storage_paths(cfg)
    model = cfg.model
    if Path(model.name_or_path).exists():
        model = model.model_copy(update={"name_or_path": str(Path(model.name_or_path).resolve())})
    return cfg.model_copy(
        update={
            "run": cfg.run.model_copy(update={"storage_path": storage_path}),
            "data": cfg.data.model_copy(update={"dataset_dir": dataset_dir}),
            "model": model,
        }
    )


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """The console's line for one fine-tuning epoch (:class:`vidray.train.follow.EpochFollower`)."""
    speed = metrics.get("train_videos_per_s")
    return (
        f"vidray train: epoch {int(metrics['epoch']) + 1}/{epochs} | train loss {metrics['train_loss']:.4f} | "
        f"val loss {metrics['val_loss']:.4f} | val acc {metrics['val_accuracy']:.3f} | "
        f"val macro-F1 {metrics['val_macro_f1']:.4f}" + (f" | {speed:.1f} clips/s" if speed else "")
    )


def run_training(cfg: VidrayConfig, restart: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Prepare the data, train (or continue, or just report a finished run), and summarise.

    Returns run dir, best and last metrics and checkpoint paths (``checkpoint``: the last epoch's,
    ``best_checkpoint``: the best ``val_macro_f1``'s), the paths ``vidray evaluate`` takes.
    """
    check_training_config(cfg)
    warn_if_warmup_fills_the_run("vidray train", "train", cfg.train.epochs, cfg.train.warmup_epochs)
    init_ray(verbose=verbose)
    cfg = on_shared_storage(cfg, "vidray train")
    dataset_dir = cfg.data.dataset_dir
    run_dir, state = open_run(
        "train", "train", cfg.run.storage_path, cfg.run.name, restart=restart,
        state_of=lambda folder: existing_run_state(cfg, folder), finished_note=f" ({cfg.train.epochs} epochs); nothing to train",
        can_train=lambda: check_resources_before_the_data(cfg.train),
    )  # fmt: skip
    if state == "finished":
        EpochFollower(run_dir, cfg, command="vidray train", name=cfg.run.name, line=epoch_line).catch_up()
        return summarize_run(run_dir)

    with FolderLock(run_dir, "vidray train"):
        prepare_dataset(cfg, verbose=verbose)
        info = read_dataset_info(dataset_dir)
        keep_to_its_data(run_dir, "run", state, info.identity(FINETUNE_SPLITS))
        warn_of_untrainable_classes(info, "vidray train")
        check_run_resources(cfg.train, cluster_capacity(), ingest_cpus(cfg.train, info))
        trainer = build_trainer(cfg, dataset_dir=dataset_dir)
        follower = EpochFollower(run_dir, cfg, command="vidray train", name=cfg.run.name, line=epoch_line)
        with follower, interrupted_by_signal(CONTINUES):
            trainer.fit()
    return summarize_run(run_dir)
