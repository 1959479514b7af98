"""Decoding one shard's videos, in the Ray task that owns the shard (no Ray needed here).

Each video becomes a clip or a rejection with its reason (:func:`decode_or_reject`):
a file that fails to decode never stops the run. Every manifest row is
decoded, including rows with a ``probe_error``: the decoder's verdict (a
typed :class:`vidray.data.clip.VideoError`) is the reason recorded. The clips
go into the shard's Parquet file (:func:`vidray.data.shard_files.write_shard`),
stored as ``data.store`` says (vidray/data/store.py).
"""

from __future__ import annotations

import os
import time
from typing import Any

from vidray.data.clip import VideoError
from vidray.data.shard_files import OUTCOME_COLUMNS, outcome_row, write_shard
from vidray.data.shards import DecodeSettings, Shard, Video
from vidray.data.store import encode_clip
from vidray.data.video import read_clip, require_decoder

# Test-only fault injection: a real worker death on chosen videos (vidray/data/preprocess.py's docstring).
CRASH_ON_ENV = "VIDRAY_TEST_CRASH_ON"
WORKER_CRASH_REASON = "decoder crashed the worker"


def decode_or_reject(path: str, settings: DecodeSettings, crash_on: str | None = None, num_threads: int = 1):
    """(clip, "", "") or (None, error category, reason) for one video file. Never raises for a bad file.

    Shared by preprocessing and corpus prediction (vidray/infer/batch_predict.py), which reject alike.
    """
    import av.logging  # here, not at the top (0.15 s): the drivers import this module and may decode nothing

    # FFmpeg's per-packet complaints about a broken file would flood the driver's
    # log from every worker; the reason that matters is recorded in the rejects.
    av.logging.set_level(None)
    if crash_on and crash_on in path:
        os._exit(1)  # test-only: see CRASH_ON_ENV
    try:
        # One decoder thread by default: Ray already runs one task per core (0: the library's choice).
        clip = read_clip(path, settings.stored_frames, settings.stored_size, decoder=settings.decoder,
                         device=settings.device, num_threads=num_threads)  # fmt: skip
    except VideoError as err:
        return None, err.code, err.reason
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the run; its reason is recorded
        return None, "decode_error", f"unexpected decoder error: {type(err).__name__}: {err}"[:300]
    return clip, "", ""


def _decode_video(video: Video, settings: DecodeSettings, crash_on: str | None) -> tuple[dict, bytes | None]:
    """(outcome row, the stored clip (data.store) or None). Never raises for a bad file."""
    clip, error, reason = decode_or_reject(video.path, settings, crash_on)
    if clip is None:
        return outcome_row(video, "rejected", error, reason), None
    blob = encode_clip(clip.frames, settings.store, settings.jpeg_quality)
    return outcome_row(video, source_frames=clip.source_frames, padded=clip.padded), blob


def decode_checked(video: Video, settings: DecodeSettings, crash_on: str | None) -> tuple[dict, bytes | None]:
    """One video in a task of its own (crash isolation): the node must have the decoder, as for a shard."""
    require_decoder(settings.decoder, settings.device)
    return _decode_video(video, settings, crash_on)


def decode_shard(out: str, shard: Shard, settings: DecodeSettings, crash_on: str | None) -> list[dict]:
    """Decode and write one shard; return one outcome row per video."""
    # A node without the decoder's package is a set-up problem, not a bad video: fail the run
    # (vidray/data/ray_decode.py turns the lost task into one line).
    require_decoder(settings.decoder, settings.device)
    started_at, started = time.time(), time.perf_counter()
    outcomes = [_decode_video(v, settings, crash_on) for v in shard.videos]
    return write_shard(out, shard, outcomes, decode_seconds=time.perf_counter() - started, store=settings.store,
                       started_at=started_at)  # fmt: skip


def decode_shards(batch: dict[str, Any], out: str, settings: DecodeSettings, crash_on: str | None):
    """Ray Data UDF: each row of ``batch`` is one shard (as JSON); decode and write it, return
    one outcome row per video."""
    rows: list[dict] = []
    for text in batch["shard"]:
        rows.extend(decode_shard(out, Shard.from_json(str(text)), settings, crash_on))
    return {column: [row[column] for row in rows] for column in OUTCOME_COLUMNS}
