"""Where the preprocessed splits live during a run: what the driver decides before it starts the workers.

``train.cache_dataset`` says:

* **streamed** (``never``): Ray Data re-reads the Parquet shards every epoch;
* **object store** (``always``; :func:`should_cache_dataset`): the driver reads the
  splits once into Ray's object store, Ray Data iterates the cached blocks every epoch;
* **device** (``device``; :func:`vidray.train.ingest.should_cache_on_device`): on top of
  the object store when the splits fit it, each worker copies its shard once into one
  uint8 tensor on its device (GPU memory, or its share of the node's on CPU) and builds every
  batch there by indexing (:class:`vidray.train.ingest.DeviceCache`);
* ``auto``: device when the worker's shard fits ``DEVICE_CACHE_FRACTION`` of its
  device's memory (decided by each worker, vidray/train/ingest.py), else the object
  store when the splits fit :data:`CACHE_OBJECT_STORE_FRACTION` of it, else streamed.

Ray Train splits the train set evenly over the workers (DDP needs equal step counts)
and gives every worker the whole val set (:func:`data_config`). With ``preserve_order``
the split is deterministic (blocks go, in order, to the shard with the fewest rows so
far), so a worker sees the same rows in the same order every epoch, cached or
streamed: every placement gives the same batches (vidray/train/batches.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import ray
import ray.train
from ray.data import DataContext, ExecutionOptions

from vidray.cluster import DATA_CPUS
from vidray.config import TrainSettings
from vidray.data.dataset import DatasetInfo, read_split, read_splits_in_order

# auto caching takes at most this share of the cluster's object store.
CACHE_OBJECT_STORE_FRACTION = 0.25


def should_cache_dataset(train: TrainSettings, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> bool:
    """Whether to read the splits once into Ray's object store (``train.cache_dataset``).

    Streaming re-runs the Parquet read every epoch: seconds of Ray Data start-up per
    epoch and split, whatever the dataset's size, which dominates small runs (the
    demo, short sweeps) and costs nothing to avoid when the data fits in memory.
    ``device`` and ``auto`` use the object store when the splits fit it: then the
    workers' one copy to their devices needs no Ray Data read task (and no CPU for it).
    """
    if train.cache_dataset in ("always", "never"):
        return train.cache_dataset == "always"
    if not ray.is_initialized():
        return False
    stored_bytes = info.clip_bytes * sum(info.split_counts.get(s, 0) for s in splits)
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    return stored_bytes <= CACHE_OBJECT_STORE_FRACTION * object_store


def ingest_cpus(train: TrainSettings, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> int:
    """CPUs Ray Data needs beside a run's workers while it trains: none once the splits are cached."""
    return 0 if should_cache_dataset(train, info, splits) else DATA_CPUS


def materialize_in_order(ds):
    # Same row order as streaming with preserve_order, so a run is reproducible either way.
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


@dataclass(frozen=True)
class CachedSplits:
    """The train and val splits read once into Ray's object store, the train split's shards in the order of
    ``seed`` (:func:`vidray.data.dataset.read_splits_in_order`)."""

    train: Any  # ray.data.MaterializedDataset
    val: Any
    seed: int


def cache_splits(dataset_dir: str, seed: int) -> CachedSplits:
    """The train and val splits read once into Ray's object store, train in the shard order of ``seed``, the
    order a run of that seed streams them in.

    A sweep reads them once, in its driver, and its concurrent trials share that one copy instead of each
    reading its own (vidray/tune/sweep.py); a trial with a seed of its own reorders the blocks
    (:func:`build_datasets`).
    """
    return CachedSplits(materialize_in_order(read_splits_in_order(dataset_dir, ["train"], seed)),
                        materialize_in_order(read_split(dataset_dir, "val")), seed)  # fmt: skip


def build_datasets(
    dataset_dir: str, train: TrainSettings, info: DatasetInfo, cached_splits: CachedSplits | None = None,
    stream: bool = False,
) -> dict[str, Any]:
    """The train and val Ray Datasets of a run, cached in the object store when ``train.cache_dataset`` says so.

    ``cached_splits``: the splits :func:`cache_splits` already read (a sweep's, shared by its trials),
    used instead of reading them again. ``stream``: streamed whatever ``train.cache_dataset`` says (a
    sweep decided so for its trials; their workers still decide on their device caches).

    The train split comes in the fixed shard order of ``train.seed``: shards written class by class still mix;
    the per-epoch shuffle buffer (batches.shuffle_buffer_order) does the rest. Cached or streamed, the same rows
    in the same order, but for a sweep's trial with a seed other than the sweep's (a repeat of a grid point),
    whose cached blocks are put in that seed's order by Ray's ``randomize_block_order`` (references moved,
    no data copied; the trials of one sweep all stream or all read the cache).
    """
    if cached_splits is None and not stream and should_cache_dataset(train, info):
        cached_splits = cache_splits(dataset_dir, train.seed)
    if cached_splits is None:
        return {"train": read_splits_in_order(dataset_dir, ["train"], train.seed), "val": read_split(dataset_dir, "val")}
    cached_train = cached_splits.train
    if cached_splits.seed != train.seed:
        cached_train = materialize_in_order(cached_train.randomize_block_order(seed=train.seed))
    return {"train": cached_train, "val": cached_splits.val}


def data_config() -> ray.train.DataConfig:
    """Train split evenly over the workers, val given whole to each (see :func:`vidray.train.batches.val_batches`), both in order.

    Ray Train's split of a dataset is ``streaming_split(equal=True)``, which
    trims rows to make the shards equal: right for training, but it would leave
    up to ``num_workers - 1`` val videos out of every evaluation.
    """
    # DataSettings.default_ingest_options() plus preserve_order, without the deprecated exclude_resources.
    current = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=True, verbose_progress=current.verbose_progress
    )
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)
