"""How the preprocessed dataset reaches the training workers (Ray Data -> torch).

* The driver reads the train and val splits as Ray Datasets (:func:`build_datasets`)
  and, when they fit (``train.cache_dataset``, :func:`should_cache_dataset`),
  materialises them in Ray's object store once for the whole run.
* Ray Train splits the train set evenly over the workers (DDP needs equal step
  counts) and gives every worker the whole val set (:func:`data_config`);
  each rank then evaluates every ``world_size``-th batch of it
  (:func:`val_batches`), so all val videos are evaluated exactly once, however
  unevenly they divide. Both datasets keep a fixed row order: a run is reproducible.
* On the worker, :class:`VideoBatchCollate` turns rows of raw video bytes into
  uint8 tensors; clip sampling and augmentation then run on the device (vidray/augment.py).
"""

from __future__ import annotations

from typing import Any, Iterator, Sequence

import numpy as np
import ray
import ray.train
import torch
from ray.data.collate_fn import NumpyBatchCollateFn

from vidray.cluster import DATA_CPUS
from vidray.config import TrainConfig
from vidray.dataset import DatasetInfo, read_split, videos_from_bytes
from vidray.rng import derive_seed

# auto caching takes at most this share of the cluster's object store.
CACHE_OBJECT_STORE_FRACTION = 0.25


def should_cache_dataset(train: TrainConfig, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> bool:
    """Whether to read the splits once into Ray's object store (``train.cache_dataset``).

    Streaming re-runs the Parquet read every epoch: seconds of Ray Data start-up per
    epoch and split, whatever the dataset's size, which dominates small runs (the
    demo, short sweeps) and costs nothing to avoid when the data fits in memory.
    """
    if train.cache_dataset != "auto":
        return train.cache_dataset == "always"
    if not ray.is_initialized():
        return False
    stored_bytes = int(np.prod(info.video_shape)) * sum(info.split_counts.get(s, 0) for s in splits)
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    return stored_bytes <= CACHE_OBJECT_STORE_FRACTION * object_store


def ingest_cpus(train: TrainConfig, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> int:
    """CPUs Ray Data needs beside a run's workers while it trains: none once the splits are cached."""
    return 0 if should_cache_dataset(train, info, splits) else DATA_CPUS


def materialize_in_order(ds):
    # Same row order as streaming with preserve_order, so a run is reproducible either way.
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def build_datasets(dataset_dir: str, train: TrainConfig, info: DatasetInfo) -> dict[str, Any]:
    """The train and val Ray Datasets of a run, cached in the object store when ``train.cache_dataset`` says so."""
    datasets = {
        # Fixed, seeded block order: shards written class by class still mix; the
        # per-epoch local shuffle buffer does the rest.
        "train": read_split(dataset_dir, "train").randomize_block_order(seed=train.seed),
        "val": read_split(dataset_dir, "val"),
    }
    if should_cache_dataset(train, info):
        datasets = {name: materialize_in_order(ds) for name, ds in datasets.items()}
    return datasets


def data_config() -> ray.train.DataConfig:
    """Train split evenly over the workers, val given whole to each (see :func:`val_batches`), both in order.

    Ray Train's split of a dataset is ``streaming_split(equal=True)``, which
    trims rows to make the shards equal: right for training, but it would leave
    up to ``num_workers - 1`` val videos out of every evaluation.
    """
    options = ray.train.DataConfig.default_ingest_options()
    options.preserve_order = True
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


class VideoBatchCollate(NumpyBatchCollateFn):
    """Parquet rows (raw video bytes, label) -> ``{"video": uint8 [B, Ts, S, S, 3], "label": int64 [B]}``."""

    def __init__(self, video_shape: tuple[int, ...]):
        self.video_shape = video_shape

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        # frombuffer gives a read-only view; one copy makes it a tensor torch may own.
        videos = videos_from_bytes(batch["video"], self.video_shape).copy()
        return {"video": torch.from_numpy(videos), "label": torch.from_numpy(batch["label"].astype(np.int64))}


def train_batches(shard, *, batch_size: int, train: TrainConfig, epoch: int, rank: int, collate) -> Iterator[dict]:
    """This rank's training micro-batches of one epoch, locally shuffled with a seed of (seed, epoch, rank)."""
    shuffle_buffer = max(train.shuffle_buffer, batch_size) if train.shuffle_buffer else None
    return shard.iter_torch_batches(
        batch_size=batch_size,
        prefetch_batches=train.prefetch_batches,
        local_shuffle_buffer_size=shuffle_buffer,
        local_shuffle_seed=derive_seed(train.seed, epoch, rank),  # a function of the epoch: resumable
        collate_fn=collate,
        drop_last=True,
    )


def val_batches(val, *, batch_size: int, rank: int, world_size: int, prefetch_batches: int, collate) -> Iterator[dict]:
    """Batches ``rank``, ``rank + world_size``, ... of the whole, ordered val set: every video on exactly one rank.

    Batches of the other ranks are skipped before collation, so they cost a
    transfer but no copy and no forward pass.
    """
    batches = val.iter_batches(batch_size=batch_size, batch_format="numpy", prefetch_batches=prefetch_batches)
    for index, batch in enumerate(batches):
        if index % world_size == rank:
            yield collate(batch)
