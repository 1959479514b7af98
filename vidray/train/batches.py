"""A worker's batches on the host: Arrow rows -> the seeded shuffle -> batch tensors, one copy per video.

Every placement of the splits (vidray/train/placement.py) gives the same batches in
the same order, bit for bit, so a run's result does not depend on where its data lived:

* vidray owns the training shuffle: every path iterates its rows in their stored
  order and passes them through one seeded shuffle buffer
  (:func:`shuffle_buffer_order`, seed ``(train.seed, epoch, rank)``). Its output order
  depends only on the number of rows, the buffer size and the seed, so the device
  path (vidray/train/ingest.py) runs the same buffer over row positions and indexes
  its tensor with the result. (Ray Data's own local shuffle buffer is not used: its
  order is an implementation detail of Ray that no other code can reproduce.)
* Each rank evaluates every ``world_size``-th val batch (:func:`val_batches`): every
  val video exactly once, however unevenly they divide.
* Host copies: a row's bytes are read straight out of the Arrow buffers Ray Data
  hands over (no per-row Python bytes objects) and copied once, into the batch
  tensor, which is in pinned memory when the device is a GPU
  (:class:`VideoBatchCollate`), so the host-to-device copy is asynchronous.

Clip sampling and augmentation then run on the device (vidray/train/augment.py).
Nothing here imports Ray: the shards are any object with Ray Data's ``iter_batches``,
so benchmarks/gpu_check.py measures this path on a machine without Ray.
"""

from __future__ import annotations

import functools
import queue
import sys
import threading
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import pyarrow as pa
import torch

from vidray.config import StoreName, TrainSettings
from vidray.data.store import StoredClipError, clip_error, clip_name, decode_frames_into, wrong_size_error
from vidray.train.decoding import DeviceJpegDecoder
from vidray.train.rng import derive_seed
from vidray.train.rows import Row, RowFill, arrow_rows

T = TypeVar("T")

# Random draws of the shuffle buffer are taken from numpy this many at a time.
_SHUFFLE_DRAWS = 1024

# The stored frames each clip of the next training batch of ``n`` clips samples, ``[n, frames]``: called once
# per batch, in order, by whoever builds the batches (vidray/train/loop.py: frame_sampler draws them ahead).
FrameSampler = Callable[[int], np.ndarray]


def every_clip_reads(frames: np.ndarray, clips: int) -> np.ndarray:
    """``frames``, the stored frames every clip of a batch reads (evaluation), as a FrameSampler gives them:
    ``[clips, len(frames)]`` (a broadcast view, no copy)."""
    return np.broadcast_to(frames, (clips, len(frames)))


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


@functools.cache
def decode_pool(threads: int) -> ThreadPoolExecutor:
    """This process's ``threads`` decode threads (one pool per count, kept for the worker's life)."""
    return ThreadPoolExecutor(threads, thread_name_prefix="vidray-decode")


def decode_rows_into(
    out: np.ndarray, rows: list[Row], store: StoreName, frames: np.ndarray | None = None, *, threads: int = 1
) -> None:
    """Each row's clip into ``out[i]``: a copy (raw) or decoded (a compressed store); with ``frames``
    (``[len(rows), k]``, a compressed store), only row ``i``'s stored frames ``frames[i]``, in their places.
    A compressed store's clips decode on ``threads`` threads, a clip each: every clip has its own slot, so
    the batch is the same for any count."""
    if store == "raw":
        for i, row in enumerate(rows):
            out[i] = row.videos[row.index]
        return
    if threads <= 1 or len(rows) <= 1:
        for i, row in enumerate(rows):
            _decode_row(out, i, row, store, frames)
        return
    futures = [decode_pool(threads).submit(_decode_row, out, i, row, store, frames) for i, row in enumerate(rows)]
    wait(futures)  # every clip done before a failure is raised: none left writing into a reused batch
    for future in futures:
        future.result()  # the first damaged row in the batch's order, as one thread would name it


def _decode_row(out: np.ndarray, i: int, row: Row, store: StoreName, frames: np.ndarray | None) -> None:
    try:
        if frames is None:
            decode_frames_into(row.videos, store, out[i])
        else:
            decode_frames_into(row.videos, store, out[i], frames[i], in_place=True)
    except StoredClipError as err:  # passed its checksum yet does not decode: made that way
        raise clip_error(row.video_id, err) from None


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
    """Rows -> ``{"video": uint8 [B, Ts, S, S, 3], "label": int64 [B]}`` with one host copy per video
    (for a compressed ``store``: decoded straight into the batch tensor, in the thread that builds it;
    given the frames a step samples, only those, and the batch says which: ``"frame_index"`` ``[B, k]``).

    ``pin_memory``: build batches in pinned memory (for a GPU); ``depth``: batches that
    may be alive at once on CPU (see :class:`BatchBuffers`); ``decode_threads``: threads that
    decode a compressed store's batch (:func:`decode_rows_into`); ``device_decoder``: decode it on
    the GPU instead, the batch's video then built in device memory (vidray/train/decoding.py).
    """

    def __init__(
        self,
        video_shape: tuple[int, ...],
        *,
        pin_memory: bool = False,
        batch_size: int = 0,
        depth: int = 4,
        store: StoreName = "raw",
        decode_threads: int = 1,
        device_decoder: DeviceJpegDecoder | None = None,
    ):
        self.video_shape = tuple(video_shape)
        self.pin_memory = pin_memory
        self.store = store
        self.decode_threads = decode_threads
        self.device_decoder = device_decoder if store != "raw" else None
        self._buffers = BatchBuffers((batch_size, *self.video_shape), torch.uint8, pin_memory=pin_memory, depth=depth)

    def stack(self, rows: list[Row], frames: np.ndarray | None = None) -> dict[str, torch.Tensor]:
        """Copy (or decode) each row's video straight from its Arrow buffer into the batch tensor
        (a compressed store given ``frames`` ``[len(rows), k]``: only those stored frames)."""
        frames = frames if self.store != "raw" else None  # a raw copy is one memcpy a clip: nothing to save
        if self.device_decoder is not None:
            videos = self.device_decoder.decode([row.videos for row in rows], self.video_shape, frames,
                                                [row.video_id for row in rows])  # fmt: skip
        else:
            videos = self._buffers.get(len(rows))
            decode_rows_into(videos.numpy(), rows, self.store, frames, threads=self.decode_threads)
        labels = torch.tensor([row.label for row in rows], dtype=torch.int64)
        return with_frame_index({"video": videos, "label": labels}, frames, self.pin_memory)

    def __call__(self, batch: dict[str, np.ndarray]) -> dict[str, torch.Tensor]:
        """A numpy batch of raw-bytes rows (the call Ray Data makes of a numpy ``collate_fn``)."""
        items = list(batch["video"])
        expected = int(np.prod(self.video_shape))
        if self.store != "raw":
            # Nothing in vidray collates a compressed store this way: its rows go through arrow_rows, which
            # checks each blob first (a damaged clip is named and replaced or left out, never decoded blind).
            raise ValueError(f"a numpy batch collates only the raw store, not {self.store!r}: use train_batches / val_batches")
        videos = self._buffers.get(len(items))
        out = videos.numpy().reshape(len(items), -1)
        for i, item in enumerate(items):
            if len(item) != expected:
                raise wrong_size_error(clip_name(batch.get("video_id"), i), len(item), self.video_shape)
            out[i] = np.frombuffer(item, dtype=np.uint8)
        return {"video": videos, "label": torch.from_numpy(batch["label"].astype(np.int64))}


def with_frame_index(batch: dict[str, torch.Tensor], frames: np.ndarray | None, pin_memory: bool) -> dict[str, torch.Tensor]:
    """``batch`` with, when only ``frames`` of each clip were decoded, ``"frame_index"``: which (int64
    ``[B, k]``; the step checks it samples those: vidray.train.augment.check_decoded_frames); pinned with its labels."""
    if frames is not None:
        batch["frame_index"] = torch.from_numpy(np.array(frames, dtype=np.int64))  # a copy: frames may be a broadcast view
    return {key: value.pin_memory() if pin_memory and key != "video" else value for key, value in batch.items()}


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
    shard, *, batch_size: int, train: TrainSettings, epoch: int, rank: int, collate: VideoBatchCollate,
    frames: FrameSampler | None = None,
) -> Iterator[dict]:  # fmt: skip
    """This rank's training micro-batches of one epoch from its Ray Data shard: rows in stored order,
    through the seeded shuffle buffer (:func:`shuffle_buffer_order`), last partial batch dropped.
    ``frames``: a compressed store decodes only the stored frames it says each batch's step samples."""
    # Whole blocks (batch_size=None): nothing re-batched, nothing concatenated; the rows are re-batched below.
    tables = shard.iter_batches(batch_size=None, batch_format="pyarrow", prefetch_batches=train.prefetch_batches)
    fill = RowFill()
    rows = (row for table in tables for row in arrow_rows(table, collate.video_shape, collate.store, fill))
    shuffled = shuffle_buffer_order(rows, shuffle_size(train, batch_size), train_shuffle_seed(train, epoch, rank))
    batches = (
        collate.stack(rows, frames(len(rows)) if frames is not None else None)
        for rows in _in_batches(shuffled, batch_size, drop_last=True)
    )
    return prefetch_in_thread(batches, train.prefetch_batches)


def rank_val_tables(val, *, batch_size: int, rank: int, world_size: int, prefetch_batches: int) -> Iterator[pa.Table]:
    """Arrow batches ``rank``, ``rank + world_size``, ... of the whole, ordered val set."""
    tables = val.iter_batches(batch_size=batch_size, batch_format="pyarrow", prefetch_batches=prefetch_batches)
    for index, table in enumerate(tables):
        if index % world_size == rank:
            yield table


def val_batches(
    val, *, batch_size: int, rank: int, world_size: int, prefetch_batches: int, collate, frames: np.ndarray | None = None
) -> Iterator[dict]:
    """Batches ``rank``, ``rank + world_size``, ... of the whole, ordered val set: every video on exactly one rank.

    Batches of the other ranks are skipped before collation, so they cost a
    transfer but no copy and no forward pass. ``frames``: the stored frames evaluation reads
    (the same for every clip): a compressed store decodes only those.
    """
    tables = rank_val_tables(val, batch_size=batch_size, rank=rank, world_size=world_size, prefetch_batches=prefetch_batches)
    for table in tables:
        rows = list(arrow_rows(table, collate.video_shape, collate.store))
        if rows:  # a batch whose every clip was rejected: nothing to evaluate
            yield collate.stack(rows, None if frames is None else every_clip_reads(frames, len(rows)))


def val_rows_of_rank(val_videos: int, batch_size: int, rank: int, world_size: int) -> int:
    """How many val videos rank ``rank`` evaluates: those of batches ``rank``, ``rank + world_size``, ..."""
    batches = -(-val_videos // batch_size)
    mine = range(rank, batches, world_size)
    return sum(min(batch_size, val_videos - b * batch_size) for b in mine)
