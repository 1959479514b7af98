"""VideoMAE masked-autoencoder pretraining on Ray Train: ``vidray pretrain``.

Self-supervised: the model sees each clip with ``pretrain.mask_ratio`` of its
patch positions hidden in every frame (tube masks, vidray/model/masking.py) and
learns to reconstruct the hidden pixels. Labels are never read, so the
encoder can learn from every video of the dataset's ``pretrain.splits``; its
``model_dir`` is then fine-tuned like any checkpoint::

    vidray pretrain --config C                 # last stdout line: {"model_dir": ..., ...}
    vidray train --config C model.init=pretrained model.name_or_path=<model_dir>

This module is the driver side: check, build the ``TorchTrainer``, run it,
write the encoder and figures. On the workers runs the training stage's one
worker loop (vidray/train/loop.py) with the pretraining task
(vidray/pretrain/task.py): the same ingest (vidray/train/ingest.py: each
worker's shard in its device's memory, or the splits in the object store, or
streamed, per ``train.cache_dataset``; the same seeded shuffle per epoch), the
same temporal jitter and random resized crops drawn on the device (no MixUp),
DDP, AdamW with VideoMAE's betas (0.9, 0.95) and a cosine schedule after a
warm-up, the same step telemetry, one checkpoint per epoch in JSON +
safetensors (vidray/model/checkpoint.py), written in the background when
``train.checkpoint_in_background``. A checkpoint holds the whole
``VideoMAEForPreTraining`` (encoder and decoder) and every rank's random
streams, the mask generator's included, so a resumed run draws the masks,
crops and batches the interrupted one would have.

Run layout, beside fine-tuning runs (``<run.name>-pretrain``, so a ``vidray
train`` of the same config never lands on it)::

    <run.storage_path>/<run.name>-pretrain/
      checkpoint_epoch_NNNN/    model/ (VideoMAEForPreTraining), training_state.*, vidray.json
      encoder/                  save_pretrained VideoMAEModel: the summary's model_dir
      reports/figures/          pretrain_reconstruction.png, pretrain_loss.png (or under run.reports_dir when set)

Rerunning the same command: a finished run is summarised (encoder and figures
written again), an interrupted one continues from its latest checkpoint,
``--restart`` or a new ``run.name`` starts over (vidray/train/runs.py: the rules of every command).
How the run executes (workers, GPUs, failures, ingest, seed, gradient
accumulation and clipping, flips) comes from ``train``; what it optimises from
``pretrain`` (:func:`as_pretraining`).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pyarrow.fs as pafs
import ray.train
import torch
from ray.train.torch import TorchTrainer

from vidray.cluster import check_run_resources, cluster_capacity, init_ray, interrupted_by_signal
from vidray.config import ModelSettings, TrainSettings, TuneSettings, VidrayConfig
from vidray.data.dataset import ClipShape, DatasetInfo, read_dataset_info, read_split_batches, read_splits_in_order, videos_from_bytes
from vidray.data.prepare import prepare_dataset
from vidray.data.store import StoredClipError, check_blob
from vidray.errors import UserError
from vidray.model.checkpoint import MODEL_DIR, read_checkpoint_info
from vidray.model.classifier import token_grid
from vidray.model.masking import tube_mask
from vidray.model.pretraining import load_pretraining_model, save_encoder
from vidray.pretrain.checks import FIXED_FOR_PRETRAINING, FROM_PRETRAIN, NOT_COMPARED_ON_RESUME, check_pretrain_config
from vidray.pretrain.figures import plot_loss_curve, plot_reconstructions, reconstruct
from vidray.pretrain.task import pretrain_loop_per_worker
from vidray.train.optim import warn_if_warmup_fills_the_run
from vidray.storage import is_uri, join_uri, open_filesystem, resolve_path, scratch
from vidray.model import transforms
from vidray.train.driver import (
    CHECKPOINTS_TO_KEEP, check_decode_device, check_resources_before_the_data, check_stored_clips, make_run_config,
    on_shared_storage, scaling_config,
)
from vidray.train.placement import data_config, ingest_cpus, materialize_in_order, should_cache_dataset
from vidray.folder_lock import FolderLock
from vidray.train.follow import EpochFollower
from vidray.train.runs import CONTINUES, RunState, existing_run_state, keep_to_its_data, open_run, summarize_run

RUN_SUFFIX = "-pretrain"
ENCODER_DIR = "encoder"
RECONSTRUCTION_FIGURE = "pretrain_reconstruction.png"
LOSS_FIGURE = "pretrain_loss.png"
FIGURE_CLIPS = 4


# ------------------------------------------------------------------ configuration


def as_pretraining(cfg: VidrayConfig) -> VidrayConfig:
    """The config a pretraining run executes and is identified by.

    ``train`` becomes the TrainSettings the shared helpers (batch split, optimizer,
    schedule, ingest, failures) read: ``pretrain``'s epochs, batch, lr, weight
    decay and warm-up (:data:`FROM_PRETRAIN`), with ``train``'s execution settings;
    what pretraining does not use (:data:`FIXED_FOR_PRETRAINING`: MixUp, label smoothing,
    layer decay, model.dropout; and the sweep) is left at fixed values, so changing
    fine-tuning or sweep settings neither changes a pretraining run nor stops it from resuming.
    """
    p = cfg.pretrain
    sections = {"train": cfg.train.model_dump(), "model": cfg.model.model_dump()}
    sections["train"].update({key: getattr(p, key) for key in FROM_PRETRAIN})
    for key, value in FIXED_FOR_PRETRAINING.items():
        section, name = key.split(".")
        sections[section][name] = value
    return cfg.model_copy(
        update={
            "train": TrainSettings.model_validate(sections["train"]),
            "model": ModelSettings.model_validate(sections["model"]),
            "tune": TuneSettings(),
        }
    )


def pretraining_run_state(pcfg: VidrayConfig, run_dir: str) -> RunState:
    """What the pretraining ``run_dir`` holds for ``pcfg`` (:func:`as_pretraining`'s): its saved config compared on
    what a user sets, not on what pretraining derives or fixes (:data:`NOT_COMPARED_ON_RESUME`)."""
    return existing_run_state(pcfg, run_dir, not_compared=NOT_COMPARED_ON_RESUME)


def run_name(cfg: VidrayConfig) -> str:
    return cfg.run.name + RUN_SUFFIX


def reports_dir(cfg: VidrayConfig) -> Path:
    """``run.reports_dir``, or by default the pretraining run's own: ``<storage_path>/<run.name>-pretrain/reports``."""
    return cfg.run.model_copy(update={"name": run_name(cfg)}).reports_path()


def pretrain_videos(cfg: VidrayConfig, info: DatasetInfo) -> int:
    return sum(info.split_counts.get(split, 0) for split in cfg.pretrain.splits)


def check_pretrain_dataset(cfg: VidrayConfig, info: DatasetInfo, dataset_dir: str) -> ClipShape:
    shape = check_stored_clips(cfg, info, dataset_dir)
    for split in cfg.pretrain.splits:
        if info.split_counts.get(split, 0) == 0:
            raise UserError(
                f"pretrain.splits lists {split!r} but that split of {dataset_dir} holds no videos; "
                "remove it from pretrain.splits"
            )
    videos = pretrain_videos(cfg, info)
    batch = cfg.pretrain.batch_size // (cfg.train.num_workers * cfg.train.grad_accum_steps)
    if videos // cfg.train.num_workers < batch:
        raise UserError(
            f"{dataset_dir} has {videos} videos in pretrain.splits {cfg.pretrain.splits}: fewer than one batch "
            f"of {batch} per worker; lower pretrain.batch_size or train.num_workers, or add splits"
        )
    return shape


# ------------------------------------------------------------------ the driver


def build_pretraining_datasets(dataset_dir: str, cfg: VidrayConfig, info: DatasetInfo) -> dict[str, Any]:
    """The videos of ``pretrain.splits`` as one dataset named ``train`` (what Ray Train splits over the workers)."""
    videos = read_splits_in_order(dataset_dir, cfg.pretrain.splits, cfg.train.seed)
    if should_cache_dataset(cfg.train, info, cfg.pretrain.splits):
        videos = materialize_in_order(videos)
    return {"train": videos}


def make_pretraining_run_config(cfg: VidrayConfig, **overrides: Any) -> ray.train.RunConfig:
    """Ray's RunSettings of a pretraining run: named ``<run.name>-pretrain``, the latest checkpoints kept."""
    kwargs = {"name": run_name(cfg), "checkpoint_config": ray.train.CheckpointConfig(num_to_keep=CHECKPOINTS_TO_KEEP)}
    return make_run_config(as_pretraining(cfg), **{**kwargs, **overrides})


def build_pretrainer(
    cfg: VidrayConfig, *, run_config: ray.train.RunConfig | None = None, dataset_dir: str | None = None
) -> TorchTrainer:
    """A ready-to-``fit()`` TorchTrainer pretraining on ``dataset_dir`` (default ``cfg.data.dataset_dir``)."""
    pcfg = as_pretraining(cfg)
    check_pretrain_config(pcfg)
    dataset_dir = resolve_path(dataset_dir or cfg.data.dataset_dir)
    info = read_dataset_info(dataset_dir)
    shape = check_pretrain_dataset(pcfg, info, dataset_dir)
    return TorchTrainer(
        pretrain_loop_per_worker,
        train_loop_config={"cfg": pcfg, "shape": shape, "train_videos": pretrain_videos(pcfg, info)},
        scaling_config=scaling_config(pcfg.train),
        run_config=run_config or make_pretraining_run_config(cfg),
        datasets=build_pretraining_datasets(dataset_dir, pcfg, info),
        dataset_config=data_config(),
    )


def epoch_line(metrics: dict[str, Any], epochs: int) -> str:
    """The console's line for one pretraining epoch (:class:`vidray.train.follow.EpochFollower`)."""
    return (
        f"vidray pretrain: epoch {int(metrics['epoch']) + 1}/{epochs} | loss {metrics['train_loss']:.4f} | "
        f"{metrics['train_videos_per_s']:.1f} clips/s | lr {metrics['lr']:.2e}"
    )


def run_pretraining(cfg: VidrayConfig, restart: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Prepare the data, pretrain (or continue, or just summarise a finished run), write the encoder and figures.

    Returns run dir, last checkpoint and metrics, ``model_dir`` (the encoder) and the figures.
    """
    check_pretrain_config(cfg)
    check_decode_device(cfg.train, cfg.data.store)
    warn_if_warmup_fills_the_run("vidray pretrain", "pretrain", cfg.pretrain.epochs, cfg.pretrain.warmup_epochs)
    init_ray(verbose=verbose)
    cfg = on_shared_storage(cfg, "vidray pretrain")
    dataset_dir = cfg.data.dataset_dir
    pcfg = as_pretraining(cfg)
    run_dir, state = open_run(
        "pretrain", "pretrain", cfg.run.storage_path, run_name(cfg), restart=restart,
        state_of=lambda folder: pretraining_run_state(pcfg, folder),
        finished_note=f" ({pcfg.train.epochs} epochs); nothing to train",
        can_train=lambda: check_resources_before_the_data(pcfg.train),
    )  # fmt: skip
    if state != "finished":
        with FolderLock(run_dir, "vidray pretrain"):
            prepare_dataset(cfg, verbose=verbose)
            info = read_dataset_info(dataset_dir)
            keep_to_its_data(run_dir, "pretraining run", state, info.identity(pcfg.pretrain.splits))
            check_run_resources(pcfg.train, cluster_capacity(), ingest_cpus(pcfg.train, info, pcfg.pretrain.splits))
            trainer = build_pretrainer(cfg, dataset_dir=dataset_dir)
            follower = EpochFollower(run_dir, pcfg, command="vidray pretrain", name=run_name(cfg), line=epoch_line)
            with follower, interrupted_by_signal(CONTINUES):
                trainer.fit()
    else:
        EpochFollower(run_dir, pcfg, command="vidray pretrain", name=run_name(cfg), line=epoch_line).catch_up()
    return finish_run(pcfg, run_dir, dataset_dir)


def finish_run(cfg: VidrayConfig, run_dir: str, dataset_dir: str) -> dict[str, Any]:
    """Encoder and figures from the run's latest checkpoint; the summary ``vidray pretrain`` prints."""
    summary = summarize_run(run_dir)
    if summary["checkpoint"] is None:
        raise UserError(f"{run_dir} holds no readable checkpoint; start over with --restart or a new run.name")
    with ray.train.Checkpoint(summary["checkpoint"]).as_directory() as directory:
        model = load_pretraining_model(Path(directory) / MODEL_DIR)
        info = read_checkpoint_info(directory)
    model_dir = join_uri(run_dir, ENCODER_DIR)
    provenance = {
        "pretrained_by": "vidray pretrain",
        "checkpoint": summary["checkpoint"],
        "epochs": info["epoch"] + 1,
        "splits": cfg.pretrain.splits,
        "masking": info.get("masking"),
        "train_loss": info["metrics"]["train_loss"],
    }
    publish_encoder(model, model_dir, provenance)
    figures = write_figures(model, cfg, dataset_dir, info["history"])
    return {
        "run_dir": run_dir,
        "checkpoint": summary["checkpoint"],
        "model_dir": model_dir,
        "last": summary["last"],
        "figures": [str(path) for path in figures],
    }


def publish_encoder(model, destination: str, provenance: dict[str, Any]) -> str:
    """:func:`vidray.model.pretraining.save_encoder` into ``destination``, a local path or a URI."""
    if not is_uri(destination):
        save_encoder(model, destination, provenance)
        return destination
    with scratch("encoder") as local:
        save_encoder(model, local, provenance)
        fs, path = open_filesystem(destination)
        pafs.copy_files(local, path, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)
    return destination


def figure_split(cfg: VidrayConfig, info: DatasetInfo) -> tuple[str, bool]:
    """(split, held out?) whose clips the reconstruction figure shows: one pretraining never saw, if any."""
    for split in ("val", "test", "train"):
        if split not in cfg.pretrain.splits and info.split_counts.get(split, 0):
            return split, True
    return cfg.pretrain.splits[0], False


def figure_clips(dataset_dir: str, info: DatasetInfo, split: str, count: int = FIGURE_CLIPS) -> list[dict[str, Any]]:
    """Up to ``count`` rows of ``split``, one per class where it has that many: the split is read
    in order (shards are often written class by class) until enough classes turned up. A damaged clip
    (:func:`vidray.data.store.check_blob`) is passed over, as training passed over it (and reported it)."""
    # Enough once every class the split holds has a clip (``count`` at most) and other clips fill ``count``: waiting
    # for ``count`` classes on a split with fewer (an unlabelled corpus has one) read all of it, on every pretrain.
    classes = min(count, info.classes_in(split))
    chosen: dict[int, dict[str, Any]] = {}
    spare: list[dict[str, Any]] = []
    for batch in read_split_batches(dataset_dir, info, split, batch_size=8):
        for row in (dict(zip(batch, values)) for values in zip(*batch.values())):
            if not _intact(row["video"], info):
                continue
            if row["label"] not in chosen:
                chosen[row["label"]] = row
            elif len(spare) < count:
                spare.append(row)
        if len(chosen) >= classes and len(chosen) + len(spare) >= count:
            break
    return (list(chosen.values()) + spare)[:count]


def _intact(blob: bytes, info: DatasetInfo) -> bool:
    try:
        check_blob(blob, info.store, info.video_shape)
    except StoredClipError:
        return False
    return True


def write_figures(model, cfg: VidrayConfig, dataset_dir: str, history: list[dict[str, Any]]) -> list[Path]:
    figures = reports_dir(cfg) / "figures"
    info = read_dataset_info(dataset_dir)
    split, held_out = figure_split(cfg, info)
    rows = figure_clips(dataset_dir, info, split)
    video_ids = [row["video_id"] for row in rows]
    videos = torch.from_numpy(videos_from_bytes([row["video"] for row in rows], info.video_shape, info.store, video_ids).copy())
    pixels = transforms.eval_transform(videos, frames=cfg.data.frames, size=cfg.data.size)
    grid = token_grid(model.config)
    mask = tube_mask(len(videos), grid, cfg.pretrain.mask_ratio, torch.Generator().manual_seed(cfg.train.seed))
    clips = reconstruct(model, pixels, mask)
    seen = "held out from pretraining" if held_out else "pretrained on: pretrain.splits covers every split"
    title = (
        f"{cfg.run.name}{RUN_SUFFIX}, epoch {history[-1]['epoch'] + 1}: {split} clips ({seen})\n"
        f"{cfg.pretrain.mask_ratio:.0%} of the {grid[1]}x{grid[2]} patch positions hidden in every frame"
    )
    loss_title = (
        f"{cfg.run.name}{RUN_SUFFIX}: mask ratio {cfg.pretrain.mask_ratio:g}, "
        f"{'per-patch normalised' if cfg.pretrain.norm_pix_loss else 'raw'} pixel targets, splits {cfg.pretrain.splits}"
    )
    return [
        plot_reconstructions(clips, video_ids, title, figures / RECONSTRUCTION_FIGURE),
        plot_loss_curve(history, loss_title, figures / LOSS_FIGURE),
    ]

