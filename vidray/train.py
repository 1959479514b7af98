"""Distributed VideoMAE fine-tuning on Ray Train.

The driver (:func:`build_trainer`, :func:`run_training`) checks the config
against the dataset, then hands :func:`train_loop_per_worker` to a
``TorchTrainer``. Each worker streams its shard of the preprocessed Parquet
videos from Ray Data, augments on its device, trains a DDP-wrapped VideoMAE and,
once per epoch, evaluates its part of the validation set; predictions are
gathered so the reported metrics cover the whole validation set. Rank 0 writes
the checkpoint (layout: vidray/checkpoint.py) and every rank reports.

Resuming: a restarted worker group (``FailureConfig.max_failures``) or a rerun
with the same ``run.name`` and ``run.storage_path`` gets the latest checkpoint
from ``ray.train.get_checkpoint()`` and continues at the next epoch with the
model, optimizer, schedule and every rank's RNG state restored, so an
interrupted single-worker CPU run reproduces the uninterrupted one exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math
import os
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any, Iterable, Iterator

import numpy as np
import ray
import ray.train
import torch
import torch.distributed as dist
import torch.nn.functional as F
from ray.data.collate_fn import NumpyBatchCollateFn
from ray.train.torch import TorchTrainer
from transformers import get_cosine_schedule_with_warmup
from transformers.utils import logging as hf_logging

from vidray import augment
from vidray.checkpoint import MODEL_DIR, load_training_state, read_checkpoint_info, save_checkpoint
from vidray.cluster import DATA_CPUS
from vidray.config import TrainConfig, VidrayConfig
from vidray.dataset import DatasetInfo, read_dataset_info, read_split, videos_from_bytes
from vidray.errors import UserError
from vidray.metrics import confusion_matrix, metrics_from_confusion
from vidray.model import autocast, build_model, check_model_config, load_model
from vidray.storage import is_uri

# What every epoch reports (plus ``val_f1/<class>`` per class, ``lr``,
# ``global_step``, ``val_videos`` and ``train_videos_per_s``).
METRIC_KEYS = (
    "epoch",
    "train_loss",
    "val_loss",
    "val_accuracy",
    "val_macro_f1",
    "val_micro_f1",
    "val_macro_precision",
    "val_macro_recall",
    "val_micro_precision",
    "val_micro_recall",
)
SCORE_METRIC = "val_macro_f1"
CHECKPOINTS_TO_KEEP = 2

# Test-only fault injection: the last rank exits hard in this epoch (after its
# first optimizer step), once: the marker file records that it already did.
KILL_AT_EPOCH_ENV = "VIDRAY_TEST_KILL_AT_EPOCH"
KILL_MARKER_ENV = "VIDRAY_TEST_KILL_MARKER"


@dataclass(frozen=True)
class ClipShape:
    """What is stored per video and what the model eats."""

    classes: list[str]
    frames: int
    size: int
    stored_frames: int
    stored_size: int

    @property
    def stored_video_shape(self) -> tuple[int, int, int, int]:
        return (self.stored_frames, self.stored_size, self.stored_size, 3)

    def as_dict(self) -> dict[str, Any]:
        return {
            "classes": self.classes,
            "frames": self.frames,
            "size": self.size,
            "stored_frames": self.stored_frames,
            "stored_size": self.stored_size,
        }


# --------------------------------------------------------------------- driver


def micro_batch_size(train: TrainConfig) -> int:
    """Per-worker batch of one forward/backward: the global batch over workers and accumulation steps."""
    parts = train.num_workers * train.grad_accum_steps
    if train.batch_size % parts:
        raise UserError(
            f"train.batch_size={train.batch_size} is the global batch and must be divisible by "
            f"train.num_workers x train.grad_accum_steps = {parts}"
        )
    return train.batch_size // parts


def check_dataset(cfg: VidrayConfig, info: DatasetInfo, dataset_dir: str) -> ClipShape:
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
    for split in ("train", "val"):
        if info.split_counts.get(split, 0) == 0:
            raise UserError(f"split {split!r} of {dataset_dir} holds no videos; training needs train and val videos")
    per_worker = info.split_counts["train"] // cfg.train.num_workers
    if per_worker < micro_batch_size(cfg.train):
        raise UserError(
            f"{dataset_dir} has {info.split_counts['train']} training videos: fewer than one batch of "
            f"{micro_batch_size(cfg.train)} per worker; lower train.batch_size or train.num_workers"
        )
    return ClipShape(list(info.classes), cfg.data.frames, cfg.data.size, info.stored_frames, info.stored_size)


class _FullValDataConfig(ray.train.DataConfig):
    """Train split evenly (DDP needs equal step counts); val split unevenly so no video is dropped.

    Ray Train's default ``streaming_split(equal=True)`` trims rows to make the
    shards equal, which would leave up to ``num_workers - 1`` validation videos
    out of every evaluation. Both datasets keep a fixed row order, so a run is
    reproducible.
    """

    def __init__(self):
        options = ray.train.DataConfig.default_ingest_options()
        options.preserve_order = True
        super().__init__(execution_options=options)
        self._options = options

    def configure(self, datasets, world_size, worker_handles, worker_node_ids, **kwargs):
        # Ray Train calls this once per dataset name.
        others = {name: ds for name, ds in datasets.items() if name != "val"}
        output = super().configure(others, world_size, worker_handles, worker_node_ids, **kwargs)
        if "val" in datasets:
            val = datasets["val"].copy(datasets["val"])
            if val.name is None:
                val.set_name("val")
            val.context.execution_options = copy.deepcopy(self._options)
            splits = val.streaming_split(world_size, equal=False, locality_hints=worker_node_ids)
            for shard, split in zip(output, splits):
                shard["val"] = split
        return output


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
    dataset_dir = str(dataset_dir or cfg.data.dataset_dir)
    if not is_uri(dataset_dir):
        dataset_dir = os.path.abspath(dataset_dir)  # workers may run elsewhere than the driver's cwd
    info = read_dataset_info(dataset_dir)
    shape = check_dataset(cfg, info, dataset_dir)
    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)
    datasets = {
        # Fixed, seeded block order: shards written class by class still mix; the
        # per-epoch local shuffle buffer does the rest.
        "train": read_split(dataset_dir, "train").randomize_block_order(seed=cfg.train.seed),
        "val": read_split(dataset_dir, "val"),
    }
    if should_cache_dataset(cfg.train, info):
        datasets = {name: materialize_in_order(ds) for name, ds in datasets.items()}
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config={"cfg": cfg, "shape": shape, "train_videos": info.split_counts["train"]},
        scaling_config=ray.train.ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker={"CPU": cfg.train.cpus_per_worker},
        ),
        run_config=run_config or make_run_config(cfg),
        datasets=datasets,
        dataset_config=_FullValDataConfig(),
    )


# auto caching takes at most this share of the cluster's object store.
CACHE_OBJECT_STORE_FRACTION = 0.25


def should_cache_dataset(train: TrainConfig, info: DatasetInfo) -> bool:
    """Whether to read the splits once into Ray's object store (``train.cache_dataset``).

    Streaming re-runs the Parquet read every epoch: seconds of Ray Data start-up per
    epoch and split, whatever the dataset's size, which dominates small runs (the
    demo, short sweeps) and costs nothing to avoid when the data fits in memory.
    """
    if train.cache_dataset != "auto":
        return train.cache_dataset == "always"
    if not ray.is_initialized():
        return False
    stored_bytes = int(np.prod(info.video_shape)) * sum(info.split_counts.get(s, 0) for s in ("train", "val"))
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    return stored_bytes <= CACHE_OBJECT_STORE_FRACTION * object_store


def ingest_cpus(train: TrainConfig, info: DatasetInfo) -> int:
    """CPUs Ray Data needs beside a run's workers while it trains: none once the splits are cached."""
    return 0 if should_cache_dataset(train, info) else DATA_CPUS


def materialize_in_order(ds):
    # Same row order as streaming with preserve_order, so a run is reproducible either way.
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def make_run_config(cfg: VidrayConfig, **overrides: Any) -> ray.train.RunConfig:
    """RunConfig from ``cfg.run``/``cfg.train``: name, absolute storage path, failures, checkpoints kept."""
    storage = cfg.run.storage_path if is_uri(cfg.run.storage_path) else os.path.abspath(cfg.run.storage_path)
    kwargs = dict(
        name=cfg.run.name,
        storage_path=storage,
        failure_config=ray.train.FailureConfig(max_failures=cfg.train.max_failures),
        checkpoint_config=ray.train.CheckpointConfig(
            num_to_keep=CHECKPOINTS_TO_KEEP, checkpoint_score_attribute=SCORE_METRIC, checkpoint_score_order="max"
        ),
    )
    kwargs.update(overrides)
    return ray.train.RunConfig(**kwargs)


def run_training(cfg: VidrayConfig) -> dict[str, Any]:
    """Prepare the data, train, and summarise: run dir, best and last metrics, checkpoint paths.

    Ray Train keeps the run under ``run.storage_path/run.name``: running again
    with the same name continues from its latest checkpoint (a finished run
    just returns its result). Use a new ``run.name`` to start over.
    """
    from vidray.cluster import check_run_resources, cluster_capacity, init_ray
    from vidray.prepare import prepare_dataset

    init_ray()
    dataset_dir = prepare_dataset(cfg)
    check_run_resources(cfg.train, cluster_capacity(), ingest_cpus(cfg.train, read_dataset_info(dataset_dir)))
    trainer = build_trainer(cfg, dataset_dir=dataset_dir)
    result = trainer.fit()
    return summarize_result(result)


def summarize_result(result: ray.train.Result) -> dict[str, Any]:
    best = result.get_best_checkpoint(SCORE_METRIC, "max") if result.best_checkpoints else None
    best_metrics = next((m for c, m in result.best_checkpoints or [] if best and c.path == best.path), None)
    return {
        "run_dir": result.path,
        "checkpoint": result.checkpoint.path if result.checkpoint else None,
        "best_checkpoint": best.path if best else None,
        "last": _scalars(result.metrics or {}),
        "best": _scalars(best_metrics or {}),
    }


def _scalars(metrics: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float, str))}


# --------------------------------------------------------------------- worker


class VideoBatchCollate(NumpyBatchCollateFn):
    """Parquet rows (raw video bytes, label) -> ``{"video": uint8 [B, Ts, S, S, 3], "label": int64 [B]}``."""

    def __init__(self, video_shape: tuple[int, ...]):
        self.video_shape = video_shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # frombuffer gives a read-only view; one copy makes it a tensor torch may own.
        videos = videos_from_bytes(batch["video"], self.video_shape).copy()
        return {"video": torch.from_numpy(videos), "label": torch.from_numpy(batch["label"].astype(np.int64))}


def _seed(*parts: int) -> int:
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def _rng_state(generator: torch.Generator) -> dict[str, Any]:
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": generator.get_state(),
    }


def _set_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["augment"])


def _seed_everything(seed: int, generator: torch.Generator) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator.manual_seed(_seed(seed, 1))


def parameter_groups(model: torch.nn.Module, weight_decay: float, layer_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: no decay for biases and norms; lr scaled by ``layer_decay ** depth_from_top``.

    Depth: embeddings 0, encoder layer i -> i + 1, everything after the encoder
    (final norm, fc_norm, classifier) num_layers + 1. VideoMAE's position table
    is a fixed sinusoid, not a parameter, so it is never decayed or trained.
    """
    num_layers = model.config.num_hidden_layers
    groups: dict[tuple[int, bool], dict[str, Any]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if name.startswith("videomae.embeddings."):
            depth = 0
        elif name.startswith("videomae.encoder.layer."):
            depth = int(name.split(".")[3]) + 1
        else:
            depth = num_layers + 1
        decay = param.ndim > 1 and "position_embeddings" not in name
        group = groups.setdefault(
            (depth, decay),
            {"params": [], "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (num_layers + 1 - depth)},
        )
        group["params"].append(param)
    return [groups[key] for key in sorted(groups)]


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.AdamW:
    groups = parameter_groups(model, train.weight_decay, train.layer_decay)
    for group in groups:
        group["lr"] = train.lr * group["lr_scale"]
    return torch.optim.AdamW(groups, lr=train.lr, betas=(0.9, 0.999))


def steps_per_epoch(train_videos: int, train: TrainConfig) -> tuple[int, int]:
    """(micro-batches, optimizer steps) per epoch on each worker: even split, last partial batch dropped."""
    micro_batches = (train_videos // train.num_workers) // micro_batch_size(train)
    return micro_batches, math.ceil(micro_batches / train.grad_accum_steps)


def _with_last(items: Iterable[Any]) -> Iterator[tuple[Any, bool]]:
    """Yield (item, is_last) with one item of lookahead."""
    iterator = iter(items)
    try:
        previous = next(iterator)
    except StopIteration:
        return
    for item in iterator:
        yield previous, False
        previous = item
    yield previous, True


def _maybe_die_for_test(epoch: int) -> None:
    """Test-only fault injection (see KILL_AT_EPOCH_ENV): the last rank exits hard, once per marker file."""
    kill_epoch, marker = os.environ.get(KILL_AT_EPOCH_ENV), os.environ.get(KILL_MARKER_ENV)
    if kill_epoch is None or marker is None or int(kill_epoch) != epoch:
        return
    context = ray.train.get_context()
    if context.get_world_rank() != context.get_world_size() - 1:
        return
    try:
        with open(marker, "x") as f:
            f.write(f"killed rank {context.get_world_rank()} in epoch {epoch}\n")
    except FileExistsError:
        return
    os._exit(1)


def _gather(obj: Any) -> list[Any]:
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def epoch_metrics(
    epoch: int, classes: list[str], confusion: np.ndarray, val_loss: float, train_loss: float
) -> dict[str, Any]:
    """The flat metric dict reported each epoch (see METRIC_KEYS) from the whole-val-set confusion matrix."""
    m = metrics_from_confusion(confusion, classes)
    metrics = {
        "epoch": epoch,
        "train_loss": train_loss,
        "val_loss": val_loss,
        "val_accuracy": m["accuracy"],
        "val_macro_precision": m["macro_precision"],
        "val_macro_recall": m["macro_recall"],
        "val_macro_f1": m["macro_f1"],
        "val_micro_precision": m["micro_precision"],
        "val_micro_recall": m["micro_recall"],
        "val_micro_f1": m["micro_f1"],
        "val_videos": m["num_samples"],
    }
    for name, per_class in m["per_class"].items():
        metrics[f"val_f1/{name}"] = per_class["f1"]
    return metrics


def train_loop_per_worker(config: dict[str, Any]) -> None:
    cfg: VidrayConfig = config["cfg"]
    shape: ClipShape = config["shape"]
    train = cfg.train
    context = ray.train.get_context()
    rank, world_size = context.get_world_rank(), context.get_world_size()
    device = ray.train.torch.get_device()
    hf_logging.disable_progress_bar()  # a "Loading/Writing weights" bar per epoch only clutters worker logs

    start_epoch, global_step, history, state = 0, 0, [], None
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            # from_pretrained, not load_state_dict: HF may store some weights under other names
            # (VideoMAE's q_bias/v_bias), and the position table is rebuilt from config.json.
            model = load_model(os.path.join(directory, MODEL_DIR))
            state = load_training_state(directory)
            history = read_checkpoint_info(directory).get("history", [])
        if cfg.model.gradient_checkpointing:
            model.activation_checkpointing_enable()
        start_epoch, global_step = state["epoch"] + 1, state["global_step"]
    else:
        # Same initial weights on every rank (DDP would broadcast rank 0's anyway).
        torch.manual_seed(train.seed)
        model = build_model(cfg.model, shape.classes, shape.frames, shape.size)
    # Every rank draws its own dropout and augmentation streams (restored below when resuming).
    generator = torch.Generator()
    _seed_everything(_seed(train.seed, rank), generator)

    ddp_model = ray.train.torch.prepare_model(model)
    micro_batches, steps = steps_per_epoch(config["train_videos"], train)
    optimizer = build_optimizer(model, train)
    scheduler = get_cosine_schedule_with_warmup(
        optimizer, num_warmup_steps=round(train.warmup_epochs * steps), num_training_steps=train.epochs * steps
    )
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        if len(state["rng"]) == world_size:
            _set_rng_state(state["rng"][rank], generator)
        else:  # resumed with another worker count: fresh streams, still seeded
            _seed_everything(_seed(train.seed, rank, start_epoch), generator)

    collate = VideoBatchCollate(shape.stored_video_shape)
    micro_batch = micro_batch_size(train)
    shuffle_buffer = max(train.shuffle_buffer, micro_batch) if train.shuffle_buffer else None
    train_shard = ray.train.get_dataset_shard("train")
    val_shard = ray.train.get_dataset_shard("val")

    for epoch in range(start_epoch, train.epochs):
        started = time.perf_counter()
        batches = train_shard.iter_torch_batches(
            batch_size=micro_batch,
            prefetch_batches=train.prefetch_batches,
            local_shuffle_buffer_size=shuffle_buffer,
            local_shuffle_seed=_seed(train.seed, epoch, rank),  # a function of the epoch: resumable
            collate_fn=collate,
            drop_last=True,
        )
        loss_sum, num_batches, num_videos, global_step = train_one_epoch(
            ddp_model, model, batches, optimizer, scheduler, generator,
            shape=shape, train=train, device=device, micro_batches=micro_batches,
            epoch=epoch, global_step=global_step,
        )
        train_seconds = time.perf_counter() - started
        y_true, y_pred, val_loss_sum = evaluate_shard(model, val_shard, shape, micro_batch, train, device, collate)

        # One collective per epoch: per-rank sums, the rank's confusion matrix and its RNG state.
        gathered = _gather(
            {
                "loss_sum": loss_sum,
                "batches": num_batches,
                "videos": num_videos,
                "confusion": confusion_matrix(y_true, y_pred, len(shape.classes)),
                "val_loss_sum": val_loss_sum,
                "rng": _rng_state(generator),
            }
        )
        confusion = sum(g["confusion"] for g in gathered)  # the whole validation set
        metrics = epoch_metrics(
            epoch,
            shape.classes,
            confusion,
            val_loss=sum(g["val_loss_sum"] for g in gathered) / max(int(confusion.sum()), 1),
            train_loss=sum(g["loss_sum"] for g in gathered) / max(sum(g["batches"] for g in gathered), 1),
        )
        metrics.update(
            lr=scheduler.get_last_lr()[-1],
            global_step=global_step,
            train_videos_per_s=sum(g["videos"] for g in gathered) / max(train_seconds, 1e-9),
        )
        history.append(metrics)
        report_epoch(
            metrics,
            model=model if rank == 0 else None,
            training_state={
                "epoch": epoch,
                "global_step": global_step,
                "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(),
                "rng": [g["rng"] for g in gathered],
            },
            info={
                "epoch": epoch,
                "metrics": {**metrics, "val_confusion": confusion.tolist()},
                "history": history,
                "data": shape.as_dict(),
                "config": cfg.model_dump(mode="json"),
            },
        )


def train_one_epoch(
    ddp_model: torch.nn.Module,
    model: torch.nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    scheduler,
    generator: torch.Generator,
    *,
    shape: ClipShape,
    train: TrainConfig,
    device: torch.device,
    micro_batches: int,
    epoch: int,
    global_step: int,
) -> tuple[float, int, int, int]:
    """One pass over this rank's shard. Returns (summed loss, batches, videos, global step)."""
    ddp_model.train()
    distributed = isinstance(ddp_model, torch.nn.parallel.DistributedDataParallel)
    accum = train.grad_accum_steps
    loss_sum, num_batches, num_videos = 0.0, 0, 0
    for index, (batch, is_last) in enumerate(_with_last(batches)):
        ends_group = is_last or (index + 1) % accum == 0
        # The last group of an epoch may be short: average over the micro-batches it really has.
        group_size = min(accum, max(micro_batches - (index - index % accum), 1))
        videos, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        pixels = augment.train_transform(
            videos, frames=shape.frames, size=shape.size, generator=generator, hflip=train.hflip
        )
        pixels, targets = augment.mix_batch(
            pixels,
            labels,
            num_classes=len(shape.classes),
            generator=generator,
            mixup_alpha=train.mixup_alpha,
            cutmix_alpha=train.cutmix_alpha,
            label_smoothing=train.label_smoothing,
        )
        # DDP all-reduces gradients only on the micro-batch that ends an accumulation group.
        sync = ddp_model.no_sync() if distributed and not ends_group else contextlib.nullcontext()
        with sync:
            with autocast(device):
                logits = ddp_model(pixel_values=pixels).logits
            loss = augment.soft_target_cross_entropy(logits, targets)
            (loss / group_size).backward()
        loss_sum += loss.item()
        num_batches += 1
        num_videos += labels.shape[0]
        if ends_group:
            if train.max_grad_norm is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            global_step += 1
            _maybe_die_for_test(epoch)
    return loss_sum, num_batches, num_videos, global_step


@torch.no_grad()
def evaluate_shard(
    model: torch.nn.Module, val_shard, shape: ClipShape, batch_size: int, train: TrainConfig, device, collate
) -> tuple[list[int], list[int], float]:
    """(labels, predictions, summed cross-entropy) on this rank's part of the validation set.

    Runs the bare model, not the DDP wrapper: no collectives, so ranks may
    hold different numbers of validation videos.
    """
    model.eval()
    y_true: list[int] = []
    y_pred: list[int] = []
    loss_sum = 0.0
    for batch in val_shard.iter_torch_batches(
        batch_size=batch_size, prefetch_batches=train.prefetch_batches, collate_fn=collate
    ):
        videos, labels = batch["video"].to(device, non_blocking=True), batch["label"].to(device, non_blocking=True)
        pixels = augment.eval_transform(videos, frames=shape.frames, size=shape.size, clips=train.eval_clips)
        with autocast(device):
            logits = model(pixel_values=pixels).logits
        logits = augment.average_clip_logits(logits.float(), train.eval_clips)
        loss_sum += F.cross_entropy(logits, labels, reduction="sum").item()
        y_true += labels.tolist()
        y_pred += logits.argmax(-1).tolist()
    return y_true, y_pred, loss_sum


def report_epoch(metrics: dict[str, Any], *, model, training_state: dict[str, Any], info: dict[str, Any]) -> None:
    """Every rank reports (it is a barrier); rank 0, the one given ``model``, attaches the checkpoint."""
    with tempfile.TemporaryDirectory(prefix="vidray-ckpt-") as directory:
        checkpoint = None
        if model is not None:
            save_checkpoint(directory, model, training_state=training_state, info=info)
            checkpoint = ray.train.Checkpoint.from_directory(directory)
        ray.train.report(
            metrics, checkpoint=checkpoint, checkpoint_dir_name=f"checkpoint_epoch_{metrics['epoch']:04d}"
        )
