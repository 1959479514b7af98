"""What a training worker iterates: its shard in its device's memory, or its Ray Data shards.

With ``train.cache_dataset`` ``device`` (or ``auto`` when the shard fits
:data:`DEVICE_CACHE_FRACTION` of the device's memory; :func:`should_cache_on_device`)
each worker copies its train shard and its val share once into uint8 tensors on its
device (GPU memory, or its share of the node's memory on CPU) and builds every batch there by
indexing (:class:`DeviceCache`): no Ray Data, no host copy and no host-to-device
transfer after the first epoch. Otherwise it iterates its Ray Data shards through the
host path of vidray/train/batches.py. Both give the same batches in the same order.
The driver's side of the decision (object store or streamed) is vidray/train/placement.py.

Ray is imported where a function talks to it, not by the module: the device path
(:class:`DeviceCache`) runs over any object with Ray Data's ``iter_batches``, so
benchmarks/gpu_check.py measures it on a machine without Ray.
"""

from __future__ import annotations

import functools
import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np
import pyarrow as pa
import torch
import torch.distributed as dist

from vidray.config import StoreName, TrainSettings
from vidray.errors import UserError
from vidray.train.decoding import DeviceJpegDecoder, decode_threads_for, device_decoder_for
from vidray.train.rows import Row, RowFill, arrow_rows, arrow_videos, video_id_column
from vidray.train.batches import (
    BatchBuffers,
    FrameSampler,
    VideoBatchCollate,
    decode_rows_into,
    every_clip_reads,
    prefetch_in_thread,
    rank_val_tables,
    shuffle_buffer_order,
    shuffle_size,
    train_batches,
    train_shuffle_seed,
    val_batches,
    val_rows_of_rank,
    with_frame_index,
)

# auto device caching takes at most this share of a worker's device memory (the model, its
# activations and optimizer state need the rest); on CPU, of its share of the node's memory.
DEVICE_CACHE_FRACTION = 0.25
# Rows (at least) of the pinned staging buffer a worker copies its shard to a GPU through.
_LOAD_ROWS = 64


# ------------------------------------------------------------------ whether the shard fits the device


def device_memory_bytes(device: torch.device, local_world_size: int = 1) -> int:
    """Memory of ``device`` one worker may count on: a GPU's total, or on CPU the node's (its cgroup
    limit when lower) shared by ``local_world_size`` workers (vidray.train.loop.workers_sharing_node)."""
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
            f"{shard_bytes / 2**30:.2f} GiB but its share of {device} memory is {memory / 2**30:.2f} GiB; "
            "use train.cache_dataset=auto (it falls back to the object store or streaming) or more workers"
        )
    return True


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
        for view in arrow_videos(table.column("video"), video_shape, video_id_column(table)):
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
class StoredClips:
    """A compressed store's clips back to back in host memory (the rows :func:`arrow_rows` gives, a
    damaged blob treated as on the host path), each decoded on the CPU when a batch needs it."""

    data: np.ndarray  # uint8: every blob, back to back
    offsets: np.ndarray  # int64 [n + 1]: clip i is data[offsets[i]:offsets[i + 1]]
    video_shape: tuple[int, ...]
    store: StoreName
    video_ids: list[str]  # whom a decoding error names, as on the host path
    decode_threads: int = 1  # threads that decode a batch (vidray.train.batches.decode_rows_into)
    device_decoder: DeviceJpegDecoder | None = None  # decode on the GPU instead (vidray/train/decoding.py)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def nbytes(self) -> int:
        return self.data.nbytes + self.offsets.nbytes

    @classmethod
    def gather(cls, tables: Iterable[pa.Table], video_shape: tuple[int, ...], store: StoreName, fill: bool, decode_threads: int = 1,
               device_decoder: DeviceJpegDecoder | None = None):  # fmt: skip
        """(the clips of ``tables``, their labels int64 [n], rows kept per table), one copy of each blob
        (``fill``: a damaged clip's place taken as :func:`vidray.train.rows.intact_rows` says)."""
        # Each blob appended in place (realloc: a grown buffer is not copied beside the old one, and the slack is
        # an eighth at most). The tables' blobs concatenated as parts, then the parts into one array, held the
        # cache twice at its end, where the auto rule (should_cache_on_device) budgets it once.
        data = bytearray()
        lengths: list[int] = []
        labels: list[int] = []
        sizes: list[int] = []
        video_ids: list[str] = []
        stand_in = RowFill() if fill else None  # one for all the tables: a stream, as the host path reads them
        for table in tables:
            rows = list(arrow_rows(table, video_shape, store, stand_in))
            for row in rows:
                data.extend(row.videos)  # a copy: the table can go
            lengths.extend(len(row.videos) for row in rows)
            labels.extend(row.label for row in rows)
            video_ids.extend(row.video_id for row in rows)
            sizes.append(len(rows))
        offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
        clips = cls(np.frombuffer(data, np.uint8), offsets, tuple(video_shape), store, video_ids, decode_threads, device_decoder)
        return clips, torch.tensor(labels, dtype=torch.int64), sizes

    def decode(self, positions: np.ndarray, frames: np.ndarray | None = None, buffers: BatchBuffers | None = None) -> torch.Tensor:
        """Clips ``positions`` decoded (uint8 [len(positions), *video_shape]; with ``frames`` ``[len(positions), k]``,
        only those stored frames of each): on the GPU by the device decoder, else into a tensor of ``buffers``."""
        blobs = [self.data[self.offsets[p] : self.offsets[p + 1]] for p in positions]
        names = [self.video_ids[p] for p in positions]
        if self.device_decoder is not None:
            return self.device_decoder.decode(blobs, self.video_shape, frames, names)
        out = buffers.get(len(positions))
        rows = [Row(blob, 0, 0, name) for blob, name in zip(blobs, names)]
        decode_rows_into(out.numpy(), rows, self.store, frames, threads=self.decode_threads)
        return out


@dataclass
class DeviceCache:
    """One worker's train shard and val share as uint8 tensors on its device; every batch by indexing.

    Built once per (re)started worker group by :meth:`load` from the same Ray Data
    shard the other paths iterate, in the same stored order, so row ``i`` here is
    the ``i``-th row they see; :meth:`train_batches` runs the shared shuffle buffer
    over row positions. Train batches are gathered into fresh tensors (on CPU, into
    a ring of reused ones: :class:`BatchBuffers`); val batches are views.

    A compressed store (``jpeg``) is held as its compressed bytes in host memory
    (:class:`StoredClips`: 8x or more clips per GiB) and each batch decoded in a background
    thread ahead of the step: on the CPU into host batch tensors (pinned for a GPU) that the
    epoch loop moves to the device, or on the GPU (``train.decode_device``) straight into
    device memory: the same batches, decoded.
    """

    train_videos: torch.Tensor | StoredClips
    train_labels: torch.Tensor
    val_videos: torch.Tensor | StoredClips
    val_labels: torch.Tensor
    val_batch_sizes: list[int]
    load_seconds: float = 0.0
    pin_memory: bool = False  # decoded batches in pinned memory (a compressed store, training on a GPU)
    _buffers: BatchBuffers | None = field(default=None, repr=False)

    @property
    def nbytes(self) -> int:
        parts = (self.train_videos, self.train_labels, self.val_videos, self.val_labels)
        return sum(t.nbytes if isinstance(t, StoredClips) else t.numel() * t.element_size() for t in parts)

    @property
    def rows(self) -> tuple[int, int]:
        """(train, val) videos held."""
        return len(self.train_labels), len(self.val_labels)

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
        store: StoreName = "raw",
        decode_threads: int = 1,
        device_decoder: DeviceJpegDecoder | None = None,
    ) -> "DeviceCache":
        """Copy the shard (about ``train_rows`` videos) and this rank's val batches (``val_rows``) to
        ``device`` (a compressed ``store``: its bytes to host memory)."""
        started = time.perf_counter()
        tables = train_shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=prefetch_batches)
        val_tables = (
            rank_val_tables(val, batch_size=batch_size, rank=rank, world_size=world_size, prefetch_batches=prefetch_batches)
            if val is not None
            else ()  # pretraining: no val split
        )
        if store != "raw":
            decoding = {"decode_threads": decode_threads, "device_decoder": device_decoder}
            train_clips, train_labels, _ = StoredClips.gather(tables, video_shape, store, fill=True, **decoding)
            val_clips, val_labels, val_sizes = StoredClips.gather(val_tables, video_shape, store, fill=False, **decoding)
            val_sizes = [n for n in val_sizes if n]  # as val_batches skips a batch whose every clip was rejected
            seconds = time.perf_counter() - started
            return cls(train_clips, train_labels, val_clips, val_labels, val_sizes, seconds, pin_memory=device.type == "cuda")
        train_videos, train_labels, _ = _copy_tables_to(tables, video_shape, device, train_rows)
        val_videos, val_labels, val_sizes = _copy_tables_to(val_tables, video_shape, device, val_rows)
        return cls(train_videos, train_labels, val_videos, val_labels, val_sizes, time.perf_counter() - started)

    def train_batches(
        self, *, batch_size: int, train: TrainSettings, epoch: int, rank: int, frames: FrameSampler | None = None
    ) -> Iterator[dict]:
        """The same micro-batches, in the same order, as :func:`train_batches` over the shard this was loaded from
        (``frames``: a compressed store decodes only the stored frames each batch's step samples)."""
        rows = len(self.train_labels)
        order = shuffle_buffer_order(range(rows), shuffle_size(train, batch_size), train_shuffle_seed(train, epoch, rank))
        positions = torch.from_numpy(np.fromiter(order, dtype=np.int64, count=rows))
        if isinstance(self.train_videos, StoredClips):
            return self._decoded_batches(
                self.train_videos, self.train_labels, positions, batch_size, train.prefetch_batches, frames=frames
            )
        return self._indexed_batches(positions, batch_size)

    def _indexed_batches(self, positions: torch.Tensor, batch_size: int) -> Iterator[dict]:
        rows = len(positions)
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

    def _decoded_batches(self, clips: StoredClips, labels: torch.Tensor, positions: torch.Tensor, batch_size: int,
                         prefetch: int, sizes: list[int] | None = None,
                         frames: FrameSampler | None = None) -> Iterator[dict]:  # fmt: skip
        """Batches of ``clips[positions]`` (``sizes`` rows each, default ``batch_size`` each, last partial
        one dropped), decoded in a background thread ``prefetch`` batches ahead (``frames``: only the stored
        frames it gives for each batch, called in batch order in that thread)."""
        buffers = None
        if clips.device_decoder is None:
            buffers = BatchBuffers((batch_size, *clips.video_shape), torch.uint8, pin_memory=self.pin_memory, depth=prefetch + 4)
        sizes = sizes if sizes is not None else [batch_size] * (len(positions) // batch_size)
        starts = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)

        def decoded() -> Iterator[dict]:
            for start, size in zip(starts, sizes):
                index = positions[start : start + size]
                sampled = frames(int(size)) if frames is not None else None
                videos = clips.decode(index.numpy(), sampled, buffers)
                yield with_frame_index({"video": videos, "label": labels[index]}, sampled, pin_memory=False)

        return prefetch_in_thread(decoded(), prefetch)

    def val_batches(self, frames: np.ndarray | None = None) -> Iterator[dict]:
        """This rank's val batches, as :func:`val_batches` gives them (``frames``: a compressed store decodes
        only these stored frames of each clip)."""
        if isinstance(self.val_videos, StoredClips):
            positions = torch.arange(len(self.val_labels))
            size = max(self.val_batch_sizes, default=1)
            every = None if frames is None else functools.partial(every_clip_reads, frames)
            return self._decoded_batches(self.val_videos, self.val_labels, positions, size, 2, self.val_batch_sizes, every)
        return self._val_views()

    def _val_views(self) -> Iterator[dict]:
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

    def train_batches(self, epoch: int, frames: FrameSampler | None = None) -> Iterator[dict]:
        """The epoch's micro-batches (``frames``: a compressed store decodes only the stored frames it samples)."""
        if self.cache is not None:
            return self.cache.train_batches(
                batch_size=self.batch_size, train=self.train, epoch=epoch, rank=self.rank, frames=frames
            )
        return train_batches(
            self.train_shard, batch_size=self.batch_size, train=self.train, epoch=epoch, rank=self.rank,
            collate=self.collate, frames=frames,
        )  # fmt: skip

    def val_batches(self, frames: np.ndarray | None = None) -> Iterator[dict]:
        """This rank's val batches (``frames``: a compressed store decodes only these stored frames of a clip)."""
        if self.cache is not None:
            return self.cache.val_batches(frames)
        return val_batches(
            self.val,
            batch_size=self.batch_size,
            rank=self.rank,
            world_size=self.world_size,
            prefetch_batches=self.train.prefetch_batches,
            collate=self.collate,
            frames=frames,
        )


def _on_every_rank(decision: bool) -> bool:
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
    store: StoreName = "raw",
    clip_bytes: int = 0,
) -> WorkerData:
    """This worker's batches: from its device (copied there now) or from Ray Data, per ``train.cache_dataset``.

    ``train_shard`` / ``val`` default to Ray Train's dataset shards of this worker; with
    ``val_videos=0`` there is no val split (pretraining, vidray/pretrain/task.py).
    ``store``: how the shards store the clips (vidray/data/store.py); ``clip_bytes``: a stored
    clip's mean size (0: a raw one's). A compressed store's cache lives in host memory.
    """
    import ray.train  # here, not at the top: benchmarks/gpu_check.py imports this module without Ray

    train_shard = train_shard if train_shard is not None else ray.train.get_dataset_shard("train")
    if val is None and val_videos:
        val = ray.train.get_dataset_shard("val")
    # Batches alive at once on the host: the prefetch queue, the one being built, the loop's
    # look-ahead and the one in the step.
    decode_threads = decode_threads_for(train, device)
    device_decoder = device_decoder_for(train, device, store, decode_threads)
    collate = VideoBatchCollate(
        video_shape, pin_memory=device.type == "cuda", batch_size=batch_size, depth=train.prefetch_batches + 4, store=store,
        decode_threads=decode_threads, device_decoder=device_decoder,
    )  # fmt: skip
    data = WorkerData(train, batch_size, rank, world_size, train_shard, val, collate)
    train_rows = train_videos // world_size
    val_rows = val_rows_of_rank(val_videos, batch_size, rank, world_size)
    shard_bytes = (clip_bytes or int(np.prod(video_shape))) * (train_rows + val_rows)
    cache_device = device if store == "raw" else torch.device("cpu")
    # Every rank takes the same path: the split coordinator of the Ray Data shards starts an epoch
    # only when every shard starts it, so one rank left iterating them would wait for ever.
    if _on_every_rank(should_cache_on_device(train, shard_bytes, cache_device, local_world_size)):
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
            store=store,
            decode_threads=decode_threads,
            device_decoder=device_decoder,
        )
    return data
