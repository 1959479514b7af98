"""How the preprocessed dataset reaches the training workers: Ray Data -> (device memory) -> torch batches.

Where the decoded splits live during a run is ``train.cache_dataset``:

* **streamed** (``never``): Ray Data re-reads the Parquet shards every epoch;
* **object store** (``always``; :func:`should_cache_dataset`): the driver reads the
  splits once into Ray's object store, Ray Data iterates the cached blocks every epoch;
* **device** (``device``; :func:`should_cache_on_device`): on top of the object
  store when the splits fit it, each worker copies its shard once into one uint8
  tensor on its device (GPU memory, or its own memory on CPU) and builds every
  batch there by indexing (:class:`DeviceCache`): no Ray Data, no host copy and
  no host-to-device transfer after the first epoch;
* ``auto``: device when the worker's shard fits :data:`DEVICE_CACHE_FRACTION` of
  its device's memory, else the object store when the splits fit
  :data:`CACHE_OBJECT_STORE_FRACTION` of it, else streamed.

Every path gives the same batches in the same order, bit for bit, so a run's
result does not depend on where its data lived:

* Ray Train splits the train set evenly over the workers (DDP needs equal step
  counts) and gives every worker the whole val set (:func:`data_config`). With
  ``preserve_order`` the split is deterministic (blocks go, in order, to the
  shard with the fewest rows so far), so a worker sees the same rows in the same
  order every epoch, cached or streamed. Each rank evaluates every
  ``world_size``-th val batch (:func:`val_batches`): every val video exactly once,
  however unevenly they divide.
* vidray owns the training shuffle: every path iterates its rows in that stored
  order and passes them through one seeded shuffle buffer
  (:func:`shuffle_buffer_order`, seed ``(train.seed, epoch, rank)``). Its output order
  depends only on the number of rows, the buffer size and the seed, so the device
  path runs the same buffer over row positions and indexes its tensor with the result.
  (Ray Data's own local shuffle buffer is not used: its order is an
  implementation detail of Ray that no other code can reproduce.)
* Host copies: a row's bytes are read straight out of the Arrow buffers Ray Data
  hands over (no per-row Python bytes objects) and copied once, into the batch
  tensor, which is in pinned memory when the device is a GPU
  (:class:`VideoBatchCollate`), so the host-to-device copy is asynchronous.

Clip sampling and augmentation then run on the device (vidray/train/augment.py).

Ray is imported where a function talks to it, not by the module: the device path
(:class:`DeviceCache`, :func:`train_batches`) runs over any object with Ray Data's
``iter_batches``, so benchmarks/gpu_check.py measures it on a machine without Ray.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator, Sequence, TypeVar

import numpy as np
import pyarrow as pa
import torch

from vidray.config import TrainSettings
from vidray.data.dataset import DatasetInfo, read_split
from vidray.errors import UserError
from vidray.train.rng import derive_seed

T = TypeVar("T")

# auto caching takes at most this share of the cluster's object store.
CACHE_OBJECT_STORE_FRACTION = 0.25
# auto device caching takes at most this share of a worker's device memory (the model, its
# activations and optimizer state need the rest); on CPU, of the node's memory per local worker.
DEVICE_CACHE_FRACTION = 0.25
# Random draws of the shuffle buffer are taken from numpy this many at a time.
_SHUFFLE_DRAWS = 1024
# Rows (at least) of the pinned staging buffer a worker copies its shard to a GPU through.
_LOAD_ROWS = 64


# ------------------------------------------------------------------ where the splits live


def should_cache_dataset(train: TrainSettings, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> bool:
    """Whether to read the splits once into Ray's object store (``train.cache_dataset``).

    Streaming re-runs the Parquet read every epoch: seconds of Ray Data start-up per
    epoch and split, whatever the dataset's size, which dominates small runs (the
    demo, short sweeps) and costs nothing to avoid when the data fits in memory.
    ``device`` and ``auto`` use the object store when the splits fit it: then the
    workers' one copy to their devices needs no Ray Data read task (and no CPU for it).
    """
    import ray

    if train.cache_dataset in ("always", "never"):
        return train.cache_dataset == "always"
    if not ray.is_initialized():
        return False
    stored_bytes = int(np.prod(info.video_shape)) * sum(info.split_counts.get(s, 0) for s in splits)
    object_store = ray.cluster_resources().get("object_store_memory", 0)
    return stored_bytes <= CACHE_OBJECT_STORE_FRACTION * object_store


def ingest_cpus(train: TrainSettings, info: DatasetInfo, splits: Sequence[str] = ("train", "val")) -> int:
    """CPUs Ray Data needs beside a run's workers while it trains: none once the splits are cached."""
    from vidray.cluster import DATA_CPUS

    return 0 if should_cache_dataset(train, info, splits) else DATA_CPUS


def materialize_in_order(ds):
    # Same row order as streaming with preserve_order, so a run is reproducible either way.
    ds.context.execution_options.preserve_order = True
    return ds.materialize()


def build_datasets(dataset_dir: str, train: TrainSettings, info: DatasetInfo) -> dict[str, Any]:
    """The train and val Ray Datasets of a run, cached in the object store when ``train.cache_dataset`` says so."""
    datasets = {
        # Fixed, seeded block order: shards written class by class still mix; the
        # per-epoch shuffle buffer (shuffle_buffer_order) does the rest.
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
    import ray.train
    from ray.data import DataContext, ExecutionOptions

    # DataSettings.default_ingest_options() plus preserve_order, without the deprecated exclude_resources.
    current = DataContext.get_current().execution_options
    options = ExecutionOptions(
        resource_limits=current.resource_limits, preserve_order=True, verbose_progress=current.verbose_progress
    )
    return ray.train.DataConfig(datasets_to_split=["train"], execution_options=options)


def val_rows_of_rank(val_videos: int, batch_size: int, rank: int, world_size: int) -> int:
    """How many val videos rank ``rank`` evaluates: those of batches ``rank``, ``rank + world_size``, ..."""
    batches = -(-val_videos // batch_size)
    mine = range(rank, batches, world_size)
    return sum(min(batch_size, val_videos - b * batch_size) for b in mine)


def device_memory_bytes(device: torch.device, local_world_size: int = 1) -> int:
    """Memory of ``device`` one worker may count on: a GPU's total, or on CPU the node's (its cgroup
    limit when lower) shared by the workers on the node."""
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).total_memory
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    try:
        with open("/sys/fs/cgroup/memory.max") as f:
            limit = f.read().strip()
        if limit.isdigit():
            total = min(total, int(limit))
    except OSError:
        pass
    return total // max(local_world_size, 1)


def should_cache_on_device(
    train: TrainSettings, shard_bytes: int, device: torch.device, local_world_size: int = 1
) -> bool:
    """Whether this worker keeps its shard in its device's memory (``train.cache_dataset``: device, or auto when it fits)."""
    if train.cache_dataset not in ("auto", "device"):
        return False
    memory = device_memory_bytes(device, local_world_size)
    if train.cache_dataset == "auto":
        return shard_bytes <= DEVICE_CACHE_FRACTION * memory
    if shard_bytes > memory:
        raise UserError(
            f"train.cache_dataset=device: this worker's shard of the train and val splits takes "
            f"{shard_bytes / 2**30:.2f} GiB but {device} has {memory / 2**30:.2f} GiB; "
            "use train.cache_dataset=auto (it falls back to the object store or streaming) or more workers"
        )
    return True


# ------------------------------------------------------------------ the shuffle every path shares


def shuffle_buffer_order(items: Iterable[T], buffer_size: int, seed: int) -> Iterator[T]:
    """``items`` through a seeded shuffle buffer of ``buffer_size`` (0 or 1: in their order).

    The buffer fills with the first ``buffer_size`` items; then each further item
    takes the place of a uniformly drawn one, which is emitted; at the end the
    remaining buffer is emitted in a random order. Which position is emitted when
    depends only on the count of items so far, ``buffer_size`` and ``seed``, never
    on the items themselves: the same call over ``range(n)`` gives the order in
    which it emits any other ``n`` items.
    """
    if buffer_size <= 1:
        yield from items
        return
    rng = np.random.Generator(np.random.PCG64(seed))
    buffer: list[T] = []
    draws: list[int] = []
    for item in items:
        if len(buffer) < buffer_size:
            buffer.append(item)
            continue
        if not draws:
            draws = rng.integers(0, buffer_size, _SHUFFLE_DRAWS).tolist()[::-1]
        slot = draws.pop()
        yield buffer[slot]
        buffer[slot] = item
    for slot in rng.permutation(len(buffer)).tolist():
        yield buffer[slot]


def shuffle_size(train: TrainSettings, batch_size: int) -> int:
    """Rows of the shuffle buffer: ``train.shuffle_buffer``, at least one batch (0 stays 0: no shuffle)."""
    return max(train.shuffle_buffer, batch_size) if train.shuffle_buffer else 0


def train_shuffle_seed(train: TrainSettings, epoch: int, rank: int) -> int:
    return derive_seed(train.seed, epoch, rank)  # a function of the epoch: resumable


# ------------------------------------------------------------------ rows and batches on the host


def arrow_videos(column: pa.ChunkedArray | pa.Array, video_shape: tuple[int, ...]) -> list[np.ndarray]:
    """Zero-copy uint8 views ``[n, *video_shape]``, one per Arrow chunk, of a binary ``video`` column.

    A binary array stores its values back to back in one buffer; with every value
    of the same length that buffer *is* the stacked videos, so nothing is copied.
    """
    expected = int(np.prod(video_shape))
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    views = []
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{chunk.null_count} null video blobs in a batch")
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        lengths = np.diff(offsets)
        if (lengths != expected).any():
            bad = int(lengths[lengths != expected][0])
            raise ValueError(f"video blob of {bad} bytes does not match shape {video_shape} ({expected} bytes)")
        data = np.frombuffer(data_buffer, dtype=np.uint8)
        views.append(data[offsets[0] : offsets[-1]].reshape(len(chunk), *video_shape))
    return views


@dataclass(frozen=True)
class Row:
    """One video of an Arrow batch: a view into the batch's buffer (no copy) and its label."""

    videos: np.ndarray  # the chunk's [n, *video_shape] view
    index: int
    label: int


def arrow_rows(table: pa.Table, video_shape: tuple[int, ...]) -> Iterator[Row]:
    labels = table.column("label").to_numpy()
    start = 0
    for view in arrow_videos(table.column("video"), video_shape):
        for i in range(len(view)):
            yield Row(view, i, int(labels[start + i]))
        start += len(view)


class BatchBuffers:
    """Host batch tensors to copy rows into: pinned for a GPU (the copy to it is then
    asynchronous), or on CPU a small ring of reused tensors.

    Why a ring on CPU: a fresh 50 MB batch is fresh pages from the kernel, and faulting them
    in costs several times the copy itself (measured: 900 vs 8,700 clips/s for a batch of 32
    stored 32x128² clips). A slot is reused only when nothing but the ring still holds its
    tensor (its Python reference count), so a consumer that keeps a batch keeps it intact;
    a *view* of a batch kept past ``depth`` more batches is not detected and would change.
    Pinned tensors come from torch's caching host allocator, which does not hand a block
    out again before the copies recorded on it have finished.
    """

    def __init__(self, shape: tuple[int, ...], dtype: torch.dtype, *, pin_memory: bool, depth: int = 4):
        self.shape, self.dtype, self.pin_memory, self.depth = tuple(shape), dtype, pin_memory, depth
        self._ring: list[torch.Tensor] = []
        self._next = 0

    def get(self, rows: int) -> torch.Tensor:
        shape = (rows, *self.shape[1:])
        if self.pin_memory:
            return torch.empty(shape, dtype=self.dtype, pin_memory=True)
        if rows != self.shape[0]:  # the odd last batch of a split: not worth a slot
            return torch.empty(shape, dtype=self.dtype)
        slot = self._next
        self._next = (slot + 1) % self.depth
        if slot == len(self._ring):
            self._ring.append(torch.empty(shape, dtype=self.dtype))
        elif sys.getrefcount(self._ring[slot]) > 2:  # the list and getrefcount's argument: anyone else?
            self._ring[slot] = torch.empty(shape, dtype=self.dtype)
        return self._ring[slot]


class VideoBatchCollate:
    """Rows -> ``{"video": uint8 [B, Ts, S, S, 3], "label": int64 [B]}`` with one host copy per video.

    ``pin_memory``: build batches in pinned memory (for a GPU); ``depth``: batches that
    may be alive at once on CPU (see :class:`BatchBuffers`).
    """

    def __init__(self, video_shape: tuple[int, ...], *, pin_memory: bool = False, batch_size: int = 0, depth: int = 4):
        self.video_shape = tuple(video_shape)
        self.pin_memory = pin_memory
        self._buffers = BatchBuffers((batch_size, *self.video_shape), torch.uint8, pin_memory=pin_memory, depth=depth)

    def stack(self, rows: list[Row]) -> dict[str, torch.Tensor]:
        """Copy each row's video straight from its Arrow buffer into the batch tensor."""
        videos = self._buffers.get(len(rows))
        out = videos.numpy()
        for i, row in enumerate(rows):
            out[i] = row.videos[row.index]
        labels = torch.tensor([row.label for row in rows], dtype=torch.int64)
        return {"video": videos, "label": labels.pin_memory() if self.pin_memory else labels}

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A numpy batch of raw-bytes rows (the call Ray Data makes of a numpy ``collate_fn``)."""
        items = list(batch["video"])
        expected = int(np.prod(self.video_shape))
        videos = self._buffers.get(len(items))
        out = videos.numpy().reshape(len(items), -1)
        for i, item in enumerate(items):
            if len(item) != expected:
                raise ValueError(f"video blob of {len(item)} bytes does not match shape {self.video_shape} ({expected} bytes)")
            out[i] = np.frombuffer(item, dtype=np.uint8)
        return {"video": videos, "label": torch.from_numpy(batch["label"].astype(np.int64))}


def _in_batches(rows: Iterable[Row], batch_size: int, drop_last: bool) -> Iterator[list[Row]]:
    batch: list[Row] = []
    for row in rows:
        batch.append(row)
        if len(batch) == batch_size:
            yield batch
            batch = []
    if batch and not drop_last:
        yield batch


class _Raised:
    def __init__(self, error: BaseException):
        self.error = error


def prefetch_in_thread(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items``, produced up to ``depth`` ahead by a background thread (0: in the caller's thread).

    The shuffle and the row copies then overlap the training step (numpy's copy and
    Ray's block fetches release the GIL). Stops the thread when the consumer stops early.
    """
    if depth <= 0:
        yield from items
        return
    handoff: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()
    end = object()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                handoff.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
        except BaseException as error:  # handed to the consumer, raised there
            put(_Raised(error))
            return
        put(end)

    worker = threading.Thread(target=produce, name="vidray-batches", daemon=True)
    worker.start()
    try:
        while True:
            item = handoff.get()
            if item is end:
                return
            if isinstance(item, _Raised):
                raise item.error
            yield item
    finally:
        stop.set()
        worker.join(timeout=5)


def train_batches(
    shard, *, batch_size: int, train: TrainSettings, epoch: int, rank: int, collate: VideoBatchCollate
) -> Iterator[dict]:
    """This rank's training micro-batches of one epoch from its Ray Data shard: rows in stored order,
    through the seeded shuffle buffer (:func:`shuffle_buffer_order`), last partial batch dropped."""
    # Whole blocks (batch_size=None): nothing re-batched, nothing concatenated; the rows are re-batched below.
    tables = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=train.prefetch_batches)
    rows = (row for table in tables for row in arrow_rows(table, collate.video_shape))
    shuffled = shuffle_buffer_order(rows, shuffle_size(train, batch_size), train_shuffle_seed(train, epoch, rank))
    batches = (collate.stack(rows) for rows in _in_batches(shuffled, batch_size, drop_last=True))
    return prefetch_in_thread(batches, train.prefetch_batches)


def _rank_val_tables(val, *, batch_size: int, rank: int, world_size: int, prefetch_batches: int) -> Iterator[pa.Table]:
    """Arrow batches ``rank``, ``rank + world_size``, ... of the whole, ordered val set."""
    tables = val.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    for index, table in enumerate(tables):
        if index % world_size == rank:
            yield table


def val_batches(val, *, batch_size: int, rank: int, world_size: int, prefetch_batches: int, collate) -> Iterator[dict]:
    """Batches ``rank``, ``rank + world_size``, ... of the whole, ordered val set: every video on exactly one rank.

    Batches of the other ranks are skipped before collation, so they cost a
    transfer but no copy and no forward pass.
    """
    tables = _rank_val_tables(val, batch_size=batch_size, rank=rank, world_size=world_size, prefetch_batches=prefetch_batches)
    for table in tables:
        yield collate.stack(list(arrow_rows(table, collate.video_shape)))


# ------------------------------------------------------------------ the device path


def _copy_tables_to(tables: Iterable[pa.Table], video_shape: tuple[int, ...], device: torch.device, capacity: int):
    """(videos uint8 [n, *video_shape], labels int64 [n], rows per table) on ``device``, one copy per
    video (host staging in pinned memory for a GPU); ``capacity`` is the expected ``n``."""
    videos = torch.empty((capacity, *video_shape), dtype=torch.uint8, device=device)
    labels: list[np.ndarray] = []
    sizes: list[int] = []
    staging = None
    filled = 0
    for table in tables:
        for view in arrow_videos(table.column("video"), video_shape):
            n = len(view)
            if filled + n > videos.shape[0]:  # more rows than expected: grow (not the usual path)
                grown = torch.empty((max(2 * videos.shape[0], filled + n), *video_shape), dtype=torch.uint8, device=device)
                grown[:filled] = videos[:filled]
                videos = grown
            if device.type == "cpu":
                videos[filled : filled + n].numpy()[...] = view
            else:
                if staging is None or staging.shape[0] < n:
                    staging = torch.empty((max(n, _LOAD_ROWS), *video_shape), dtype=torch.uint8, pin_memory=True)
                staging[:n].numpy()[...] = view
                videos[filled : filled + n].copy_(staging[:n], non_blocking=True)
                torch.cuda.current_stream(device).synchronize()  # before the staging buffer is refilled
            filled += n
        labels.append(table.column("label").to_numpy().astype(np.int64))
        sizes.append(table.num_rows)
    label_tensor = torch.from_numpy(np.concatenate(labels) if labels else np.zeros(0, np.int64)).to(device)
    return videos[:filled], label_tensor, sizes


@dataclass
class DeviceCache:
    """One worker's train shard and val share as uint8 tensors on its device; every batch by indexing.

    Built once per (re)started worker group by :meth:`load` from the same Ray Data
    shard the other paths iterate, in the same stored order, so row ``i`` here is
    the ``i``-th row they see; :meth:`train_batches` runs the shared shuffle buffer
    over row positions. Train batches are gathered into fresh tensors (on CPU, into
    a ring of reused ones: :class:`BatchBuffers`); val batches are views.
    """

    train_videos: torch.Tensor
    train_labels: torch.Tensor
    val_videos: torch.Tensor
    val_labels: torch.Tensor
    val_batch_sizes: list[int]
    load_seconds: float = 0.0
    _buffers: BatchBuffers | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.train_videos, self.train_labels, self.val_videos, self.val_labels))

    @classmethod
    def load(
        cls,
        train_shard,
        val,
        *,
        video_shape: tuple[int, ...],
        batch_size: int,
        rank: int,
        world_size: int,
        device: torch.device,
        train_rows: int,
        val_rows: int,
        prefetch_batches: int = 2,
    ) -> "DeviceCache":
        """Copy the shard (about ``train_rows`` videos) and this rank's val batches (``val_rows``) to ``device``."""
        started = time.perf_counter()
        tables = train_shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
        train_videos, train_labels, _ = _copy_tables_to(tables, video_shape, device, train_rows)
        val_tables = (
            _rank_val_tables(val, batch_size=batch_size, rank=rank, world_size=world_size, prefetch_batches=prefetch_batches)
            if val is not None
            else ()  # pretraining: no val split
        )
        val_videos, val_labels, val_sizes = _copy_tables_to(val_tables, video_shape, device, val_rows)
        return cls(train_videos, train_labels, val_videos, val_labels, val_sizes, time.perf_counter() - started)

    def train_batches(self, *, batch_size: int, train: TrainSettings, epoch: int, rank: int) -> Iterator[dict]:
        """The same micro-batches, in the same order, as :func:`train_batches` over the shard this was loaded from."""
        rows = self.train_videos.shape[0]
        order = shuffle_buffer_order(range(rows), shuffle_size(train, batch_size), train_shuffle_seed(train, epoch, rank))
        positions = torch.from_numpy(np.fromiter(order, dtype=np.int64, count=rows))
        device = self.train_videos.device
        if device.type == "cuda":
            positions = positions.pin_memory().to(device, non_blocking=True)  # one transfer an epoch
        elif self._buffers is None or self._buffers.shape[0] != batch_size:
            self._buffers = BatchBuffers((batch_size, *self.train_videos.shape[1:]), torch.uint8, pin_memory=False)
        for start in range(0, rows - batch_size + 1, batch_size):
            index = positions[start : start + batch_size]
            if device.type == "cuda":
                videos = self.train_videos.index_select(0, index)
            else:
                videos = torch.index_select(self.train_videos, 0, index, out=self._buffers.get(batch_size))
            yield {"video": videos, "label": self.train_labels.index_select(0, index)}

    def val_batches(self) -> Iterator[dict]:
        """This rank's val batches, as :func:`val_batches` gives them."""
        start = 0
        for size in self.val_batch_sizes:
            yield {"video": self.val_videos[start : start + size], "label": self.val_labels[start : start + size]}
            start += size


# ------------------------------------------------------------------ what the training loop iterates


@dataclass
class WorkerData:
    """A worker's view of the splits: its device cache when it has one, else its Ray Data shards."""

    train: TrainSettings
    batch_size: int
    rank: int
    world_size: int
    train_shard: Any
    val: Any
    collate: VideoBatchCollate
    cache: DeviceCache | None = None

    @property
    def placement(self) -> str:
        return "device" if self.cache is not None else "ray_data"

    def train_batches(self, epoch: int) -> Iterator[dict]:
        if self.cache is not None:
            return self.cache.train_batches(batch_size=self.batch_size, train=self.train, epoch=epoch, rank=self.rank)
        return train_batches(
            self.train_shard, batch_size=self.batch_size, train=self.train, epoch=epoch, rank=self.rank, collate=self.collate
        )

    def val_batches(self) -> Iterator[dict]:
        if self.cache is not None:
            return self.cache.val_batches()
        return val_batches(
            self.val,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            prefetch_batches=self.train.prefetch_batches,
            collate=self.collate,
        )


def _on_every_rank(decision: bool) -> bool:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return decision
    votes: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(votes, decision)
    return all(votes)


def open_worker_data(
    train: TrainSettings,
    video_shape: tuple[int, ...],
    *,
    batch_size: int,
    train_videos: int,
    val_videos: int,
    device: torch.device,
    rank: int,
    world_size: int,
    local_world_size: int = 1,
    train_shard=None,
    val=None,
) -> WorkerData:
    """This worker's batches: from its device (copied there now) or from Ray Data, per ``train.cache_dataset``.

    ``train_shard`` / ``val`` default to Ray Train's dataset shards of this worker; with
    ``val_videos=0`` there is no val split (pretraining, vidray/pretrain/task.py).
    """
    import ray.train

    train_shard = train_shard if train_shard is not None else ray.train.get_dataset_shard("train")
    if val is None and val_videos:
        val = ray.train.get_dataset_shard("val")
    # Batches alive at once on the host: the prefetch queue, the one being built, the loop's
    # look-ahead and the one in the step.
    collate = VideoBatchCollate(
        video_shape, pin_memory=device.type == "cuda", batch_size=batch_size, depth=train.prefetch_batches + 4
    )
    data = WorkerData(train, batch_size, rank, world_size, train_shard, val, collate)
    train_rows = train_videos // world_size
    val_rows = val_rows_of_rank(val_videos, batch_size, rank, world_size)
    shard_bytes = int(np.prod(video_shape)) * (train_rows + val_rows)
    # Every rank takes the same path: the split coordinator of the Ray Data shards starts an epoch
    # only when every shard starts it, so one rank left iterating them would wait for ever.
    if _on_every_rank(should_cache_on_device(train, shard_bytes, device, local_world_size)):
        data.cache = DeviceCache.load(
            train_shard,
            val,
            video_shape=tuple(video_shape),
            batch_size=batch_size,
            rank=rank,
            world_size=world_size,
            device=device,
            train_rows=train_rows,
            val_rows=val_rows,
            prefetch_batches=train.prefetch_batches,
        )
    return data
