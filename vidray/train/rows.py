"""The rows of a stored split's Arrow batches, as a worker reads them: one view per video into the buffers
Ray Data hands over (no copy, no per-row Python bytes), and for a compressed store only the clips whose
blob passes its check, a damaged one's place taken by a neighbour in training (:func:`intact_rows`); and the
clips so rejected, on their way to the driver's console (:func:`take_rejected` to :func:`rejected_clips_line`).

Nothing here imports Ray or torch: vidray/train/batches.py batches these rows, vidray/train/ingest.py
copies them to a device.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from typing import Any, Iterable, Iterator, Mapping

import numpy as np
import pyarrow as pa

from vidray.config import StoreName
from vidray.data.store import DECODE_SHARD_AGAIN, StoredClipError, check_blob, clip_name, wrong_size_error
from vidray.errors import warn_once


def _binary_chunks(column: pa.ChunkedArray | pa.Array) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """(offsets, data) of each non-empty chunk of a binary column: value ``i`` is
    ``data[offsets[i]:offsets[i + 1]]``, read straight out of the Arrow buffers (no copy)."""
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    for chunk in chunks:
        if len(chunk) == 0:
            continue
        if chunk.null_count:
            raise ValueError(f"{chunk.null_count} null video blobs in a batch")
        offset_type = np.int64 if pa.types.is_large_binary(chunk.type) else np.int32
        _, offsets_buffer, data_buffer = chunk.buffers()
        offsets = np.frombuffer(offsets_buffer, dtype=offset_type)[chunk.offset : chunk.offset + len(chunk) + 1]
        yield offsets, np.frombuffer(data_buffer, dtype=np.uint8)


def arrow_videos(
    column: pa.ChunkedArray | pa.Array, video_shape: tuple[int, ...], video_ids: pa.ChunkedArray | pa.Array | None = None
) -> list[np.ndarray]:
    """Zero-copy uint8 views ``[n, *video_shape]``, one per Arrow chunk, of a binary ``video`` column.

    A binary array stores its values back to back in one buffer; with every value
    of the same length that buffer *is* the stacked videos, so nothing is copied.
    A blob of another length stops the worker with :func:`vidray.data.store.wrong_size_error`, one line naming
    the video (its ``video_ids`` row, the table's column; else its row) and the fix, as a compressed
    clip that does not decode does.
    """
    expected = int(np.prod(video_shape))
    views = []
    start = 0
    for offsets, data in _binary_chunks(column):
        lengths = np.diff(offsets)
        wrong = np.flatnonzero(lengths != expected)
        if len(wrong):
            row = start + int(wrong[0])
            ids = video_ids.to_pylist() if video_ids is not None else None
            raise wrong_size_error(clip_name(ids, row), int(lengths[wrong[0]]), video_shape)
        views.append(data[offsets[0] : offsets[-1]].reshape(len(offsets) - 1, *video_shape))
        start += len(lengths)
    return views


def video_id_column(table: pa.Table) -> pa.ChunkedArray | None:
    """The ``video_id`` column of an Arrow batch, whom an error about a row names; None where it was not read."""
    return table.column("video_id") if "video_id" in table.column_names else None


@dataclass(frozen=True)
class Row:
    """One video of an Arrow batch: a view into the batch's buffer (no copy) and its label."""

    videos: np.ndarray  # raw store: the chunk's [n, *video_shape] view; else this row's stored blob (1-D)
    index: int  # raw store: the row in ``videos``; else 0
    label: int
    video_id: str = ""  # compressed stores: whom a decoding error names


@dataclass
class RowFill:
    """Training's stand-in for a damaged clip, carried across the Arrow batches of one stream (:func:`intact_rows`)."""

    previous: Row | None = None  # the last intact row
    owed: int = 0  # damaged rows before the first intact one, each filled by it


def arrow_rows(table: pa.Table, video_shape: tuple[int, ...], store: StoreName = "raw", fill: RowFill | None = None) -> Iterator[Row]:
    """The rows of an Arrow batch in order; for a compressed ``store``, those whose blob passes
    its check (:func:`intact_rows`; ``fill``, one per stream: a damaged one's place taken by a neighbour)."""
    labels = table.column("label").to_numpy()
    if store != "raw":
        yield from intact_rows(table, video_shape, store, labels, fill)
        return
    start = 0
    for view in arrow_videos(table.column("video"), video_shape, video_id_column(table)):
        for i in range(len(view)):
            yield Row(view, i, int(labels[start + i]))
        start += len(view)


def intact_rows(
    table: pa.Table, video_shape: tuple[int, ...], store: StoreName, labels: np.ndarray, fill: RowFill | None
) -> Iterator[Row]:
    """Rows of a compressed store, each a view of its blob. A damaged blob (its checksum, its
    frame table: :func:`vidray.data.store.check_blob`, microseconds, no decoding) is rejected
    with one warning naming the video (the worker's log; the epoch's report names it on the driver's console:
    :func:`take_rejected`), and the rest goes on.

    ``fill`` (training): the previous intact row of the stream, in this Arrow batch or an earlier one (the
    next one, before the first), takes the rejected one's place, so every worker still has the rows, and so the
    batches, of the others: a worker one batch short would leave the others waiting in DDP's all-reduce (a
    batch whose every clip was damaged lost its rows when the stand-in came from the batch alone). Without
    ``fill`` (validation, where ranks need not agree) it is left out. Every path (host batches, the device
    cache) decides alike, so they give the same batches.
    """
    column = video_id_column(table)
    ids = column.to_pylist() if column is not None else None
    row = 0
    for offsets, data in _binary_chunks(table.column("video")):
        for i in range(len(offsets) - 1):
            blob = data[offsets[i] : offsets[i + 1]]
            video_id = clip_name(ids, row)
            row += 1
            try:
                check_blob(blob, store, video_shape)
            except StoredClipError as err:
                _rejected_here(video_id)
                instead = (
                    "the previous intact clip of this worker's stream takes its place "
                    "(the next one when none came before)"
                    if fill
                    else "evaluation goes on without it"
                )
                warn_once(
                    f"stored clip of video {video_id} rejected: {err}; {instead} ({DECODE_SHARD_AGAIN})",
                    key=f"rejected clip {video_id}",
                )
                if fill and fill.previous is not None:
                    yield fill.previous
                elif fill:
                    fill.owed += 1
                continue
            intact = Row(blob, 0, int(labels[row - 1]), video_id)
            for _ in range(fill.owed + 1 if fill else 1):
                yield intact
            if fill:
                fill.previous, fill.owed = intact, 0


# ------------------------------------------------------------------ rejected clips, to the driver's console
# A worker's warnings reach the console only with --verbose, so the ids travel with the epoch's metrics: each worker
# keeps those it rejected (the host path rejects a clip again every epoch, the device cache once, when it loads),
# the loop gathers them with the epoch's sums, and an epoch reports those no earlier epoch of the run did
# (:func:`newly_rejected`): once per video, the same epoch on every path and through a resume.

# The metric, in every epoch's: a JSON list of video ids (a string: Tune's TensorBoard logger warns about a list of names).
REJECTED_CLIPS = "rejected_clips"
_rejected: set[str] = set()
_rejected_lock = threading.Lock()  # intact_rows runs in the batch prefetch threads too


def _rejected_here(video_id: str) -> None:
    with _rejected_lock:
        _rejected.add(video_id)


def take_rejected() -> list[str]:
    """The video ids whose stored clip this process rejected since the last call, sorted (the worker loop's, per epoch)."""
    with _rejected_lock:
        taken = sorted(_rejected)
        _rejected.clear()
    return taken


def rejected_ids(metrics: Mapping[str, Any]) -> list[str]:
    """The video ids an epoch's ``metrics`` report as newly rejected (none: [])."""
    return json.loads(metrics.get(REJECTED_CLIPS, "[]"))


def newly_rejected(rejected: Iterable[Iterable[str]], history: Iterable[Mapping[str, Any]]) -> dict[str, str]:
    """What an epoch adds to its metrics for the ids every rank ``rejected``: those no epoch of ``history`` (the
    run's before it) reported, under :data:`REJECTED_CLIPS`; "[]" when there are none. Every epoch has the key:
    Tune's CSV logger appends a continued trial's rows under the header its first result wrote, so a key only
    some epochs had would shift the columns of the rows after a restore."""
    reported = {video_id for metrics in history for video_id in rejected_ids(metrics)}
    new = sorted({video_id for ids in rejected for video_id in ids} - reported)
    return {REJECTED_CLIPS: json.dumps(new, ensure_ascii=False)}


# The ids a console line names at most: a store damaged throughout says how many, and --verbose names each.
NAMED_AT_MOST = 10


def rejected_clips_line(command: str, video_ids: list[str]) -> str:
    """The driver's console line for clips newly rejected: which videos, what took their place, the fix."""
    if len(video_ids) == 1:
        clips = f"the stored clip of video {video_ids[0]} is"
    else:
        named = ", ".join(video_ids[:NAMED_AT_MOST])
        more = f" and {len(video_ids) - NAMED_AT_MOST} more" if len(video_ids) > NAMED_AT_MOST else ""
        clips = f"the stored clips of {len(video_ids)} videos ({named}{more}) are"
    return (
        f"{command}: warning: {clips} damaged and rejected (--verbose shows why): in training the previous intact "
        f"clip of the worker's stream stands in for each, in validation it is left out; {DECODE_SHARD_AGAIN}"
    )
