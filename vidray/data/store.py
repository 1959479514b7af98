"""How a clip's frames are stored in a shard's ``video`` blob (``data.store``), and read back.

* ``raw`` - the uint8 frames, C-order ``[stored_frames, S, S, 3]``: exact, 1.57 MB per
  32x128² clip. Training reads it without a copy (vidray/train/batches.py).
* ``jpeg`` - each frame a baseline JPEG (written by libjpeg-turbo through Pillow, 4:2:0 chroma)
  at ``data.jpeg_quality``, in one container per clip::

      b"VJPG" | frames: uint32 | crc32 of the JPEG bytes: uint32 | frames + 1 offsets: uint32 | JPEG bytes

  all little-endian; frame ``i`` is ``jpegs[offsets[i]:offsets[i + 1]]``, so a reader can
  decode only the frames it samples. 8-13x smaller than raw at quality 90-75 (35-33 dB on
  real footage); measured in docs/benchmarks.md ("Stored format").

The checksum lets every reader reject a damaged blob (:func:`check_blob`) in microseconds,
before decoding and identically on every path, so the host and device paths drop the same
rows. Frames decode with simplejpeg, libjpeg-turbo straight into the batch's memory with the GIL
released for the whole decode: on real clips it gives Pillow's pixels bit for bit, 1.5x faster on
one thread and 2x with two threads decoding (Pillow holds the GIL for part of each frame: its
second thread added 16 %; docs/benchmarks.md, "simplejpeg reads the store").
"""

from __future__ import annotations

import io
import struct
import zlib
from typing import Any, Sequence

import numpy as np
import simplejpeg
from PIL import Image

from vidray.config import StoreName
from vidray.data.shards import RECORDS_DIR

JPEG_MAGIC = b"VJPG"
_HEADER = struct.Struct("<4sII")  # magic, frames, crc32


class StoredClipError(ValueError):
    """A stored clip that cannot be read back: its reason, one line."""


# How a damaged clip is stored again: a rerun of the preparation reuses every shard whose record and Parquet file
# are there without reading them (vidray/data/shard_files.py: find_stale), so the record must go first.
DECODE_SHARD_AGAIN = (
    f"to decode its shard again, delete that shard's record (the file under the dataset's {RECORDS_DIR}/ that lists "
    "the video) and prepare the data again"
)


def clip_error(video_id: str, reason) -> StoredClipError:
    """The one line a training worker stops with when a stored clip passed its checksum yet does not
    decode (made that way): which video, why, and the fix. Every decoding path says it alike."""
    return StoredClipError(f"stored clip of video {video_id}: {reason}; {DECODE_SHARD_AGAIN}")


def clip_name(video_ids: Sequence[Any] | None, row: int) -> str:
    """How the errors above name the clip in ``row`` of a batch: its video's id, else (a batch read without the
    ``video_id`` column) its row. ``video_ids``: the batch's ids, in any indexable form (a list, a numpy array)."""
    return str(video_ids[row]) if video_ids is not None else f"row {row} of a batch"


def wrong_size_error(video_id: str, size: int, video_shape: tuple[int, ...]) -> StoredClipError:
    """:func:`clip_error` for a raw clip of ``size`` bytes that is not ``video_shape``'s: every reader of raw
    clips (training's rows and numpy batches, evaluation) stops on it in this one line."""
    expected = int(np.prod(video_shape))
    return clip_error(video_id, f"video blob of {size} bytes does not match shape {tuple(video_shape)} ({expected} bytes)")


def encode_clip(frames: np.ndarray, store: StoreName, quality: int) -> bytes:
    """The ``video`` blob of uint8 ``frames`` ``[T, S, S, 3]`` in ``store``."""
    if store == "raw":
        return frames.tobytes()
    jpegs = []
    for frame in frames:
        buffer = io.BytesIO()
        Image.fromarray(frame).save(buffer, format="JPEG", quality=quality)
        jpegs.append(buffer.getvalue())
    offsets = np.concatenate([[0], np.cumsum([len(j) for j in jpegs])]).astype("<u4")
    payload = b"".join(jpegs)
    return _HEADER.pack(JPEG_MAGIC, len(jpegs), zlib.crc32(payload)) + offsets.tobytes() + payload


def _jpeg_offsets(blob, frames: int | None) -> tuple[np.ndarray, int]:
    """(offsets of the frames' JPEGs, where the JPEG bytes start) of a container, checked
    (and that it holds ``frames`` frames, unless None)."""
    if len(blob) < _HEADER.size:
        raise StoredClipError(f"jpeg clip of {len(blob)} bytes is shorter than its header")
    magic, count, _ = _HEADER.unpack_from(blob)
    if magic != JPEG_MAGIC:
        raise StoredClipError(f"not a vidray jpeg clip (starts with {bytes(magic)!r})")
    if frames is not None and count != frames:
        raise StoredClipError(f"jpeg clip holds {count} frames, the dataset stores {frames}")
    start = _HEADER.size + 4 * (count + 1)
    offsets = np.frombuffer(blob, "<u4", count + 1, _HEADER.size) if len(blob) >= start else np.zeros(0, "<u4")
    if len(offsets) != count + 1 or offsets[0] != 0 or (np.diff(offsets.astype(np.int64)) <= 0).any() or start + int(offsets[-1]) != len(blob):
        raise StoredClipError(f"jpeg clip's frame offsets do not match its {len(blob)} bytes (truncated or damaged)")
    return offsets, start


def jpeg_frame_spans(blob, frames: int) -> tuple[np.ndarray, np.ndarray]:
    """(start, end) byte positions of each of the ``frames`` stored frames' JPEGs in a jpeg clip's blob,
    whose frame table is checked as :func:`check_blob` checks it."""
    offsets, start = _jpeg_offsets(blob, frames)
    offsets = offsets.astype(np.int64) + start
    return offsets[:-1], offsets[1:]


def check_blob(blob, store: StoreName, video_shape: tuple[int, ...]) -> None:
    """Raise :class:`StoredClipError` when ``blob`` is not an intact clip of ``video_shape`` in ``store``."""
    if store == "raw":
        expected = int(np.prod(video_shape))
        if len(blob) != expected:
            raise StoredClipError(f"raw clip of {len(blob)} bytes, the dataset stores {expected} ({video_shape})")
        return
    offsets, start = _jpeg_offsets(blob, video_shape[0])
    crc = _HEADER.unpack_from(blob)[2]
    if zlib.crc32(memoryview(blob)[start:]) != crc:
        raise StoredClipError("jpeg clip fails its checksum (damaged bytes)")
    # The checksum covers the JPEGs, not the frame table before them: an entry moved and still in order passed,
    # and its frame then failed to decode in the middle of training. Each frame must start with a JPEG's
    # start-of-image marker and end with its end-of-image one.
    data = np.frombuffer(blob, np.uint8)
    starts, ends = start + offsets[:-1].astype(np.int64), start + offsets[1:].astype(np.int64)
    if (ends - starts < 4).any() or (data[starts] != 0xFF).any() or (data[starts + 1] != 0xD8).any() \
            or (data[ends - 2] != 0xFF).any() or (data[ends - 1] != 0xD9).any():
        raise StoredClipError("jpeg clip's frame table does not point at its frames' JPEGs (damaged)")


def decode_frames_into(blob, store: StoreName, out: np.ndarray, frames=None, *, in_place: bool = False) -> None:
    """Decode stored frames ``frames`` (default: all) of ``blob`` into uint8 ``out``: ``[len(frames), S, S, 3]``,
    or with ``in_place`` the whole clip's ``[stored_frames, S, S, 3]``, stored frame ``f`` into ``out[f]``
    (the others are left as they were: what a training step that samples ``frames`` reads).

    Assumes :func:`check_blob` passed; a frame the JPEG decoder still refuses raises :class:`StoredClipError`.
    """
    if store == "raw":
        video = np.frombuffer(blob, np.uint8).reshape(-1, *out.shape[1:])
        if frames is None:
            out[...] = video
        elif in_place:
            out[frames] = video[frames]
        else:
            out[...] = video[frames]
        return
    offsets, start = _jpeg_offsets(blob, out.shape[0] if frames is None or in_place else None)
    view = memoryview(blob)
    frame_shape = out.shape[1:]
    for i, f in enumerate(range(out.shape[0]) if frames is None else frames):
        f = int(f)
        jpeg = view[start + int(offsets[f]) : start + int(offsets[f + 1])]
        target = out[f if in_place else i]
        try:
            height, width, _, _ = simplejpeg.decode_jpeg_header(jpeg)
            if (height, width, 3) != frame_shape:  # written at another size: it would not fill the frame
                raise ValueError(f"{width}x{height} pixels, the dataset stores {frame_shape[1]}x{frame_shape[0]}")
            if target.flags.c_contiguous:
                simplejpeg.decode_jpeg(jpeg, "RGB", buffer=target)
            else:  # a strided view: decode, then copy in
                target[...] = simplejpeg.decode_jpeg(jpeg, "RGB")
        except ValueError as err:  # simplejpeg's error for a broken JPEG stream
            raise StoredClipError(f"frame {f} does not decode: {err}") from None
