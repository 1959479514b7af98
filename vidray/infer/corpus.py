"""A corpus to predict, on disk: which videos it holds, the chunks it is cut into, their decoding
(Ray Data tasks of :mod:`vidray.infer.batch_predict`), and the parts and files the run leaves.

Everything here runs without torch: Ray's decode workers import this module (its functions are
their tasks), and a worker that imports torch for nothing pays seconds and memory per process.
The model side is vidray/infer/batch_predict.py.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.data.listing import RENAME_TO_UTF8, as_text, is_hidden, is_text_name, is_video_file, videos_under
from vidray.data.clip import MissingVideoError
from vidray.data.decode_shard import decode_or_reject
from vidray.data.shard_files import NOT_FOUND_REASONS, WORKER_CRASH
from vidray.data.shards import DECODE_VERSION, DecodeSettings, file_stamp
from vidray.data.video import require_decoder
from vidray.errors import UserError
from vidray.model.checkpoint import INFO, model_folder
from vidray.storage import (
    DownloadError, is_uri, is_web_url, join_uri, listed_object_uri, local_file, local_part, open_filesystem, resolve_path,
    write_atomically,
)  # fmt: skip

# A chunk is one part file: at most this many videos, and small enough that the videos a run predicts give
# at least MIN_CHUNKS of them (a 64-video corpus in 4 chunks of 16 left CPUs idle). A decode task takes
# one or more consecutive chunks (group_chunks): with tiny chunks, Ray Data's per-task cost
# (its scheduler notices a finished task up to 0.1 s late) would idle the decoders a third of the time.
VIDEOS_PER_CHUNK = 16
MIN_CHUNKS = 32
# Decode tasks per cluster CPU, at least, when chunks are grouped: enough that a CPU whose
# worker starts late, or draws the slow videos, still gets its share.
DECODE_TASKS_PER_CPU = 4
PARTS_DIR = "_parts"
# What a run assembles from its parts (:func:`assemble`), beside PARTS_DIR.
OUTPUTS = ("predictions.parquet", "rejects.csv")
# predictions.parquet's metadata: the settings id (:func:`settings_id`) of the parts it was assembled from, and the model
# folder they were predicted with, so a reader can tell which model and settings labelled the corpus.
SETTINGS_ID_KEY, MODEL_KEY = b"vidray_settings_id", b"vidray_model"
# Part of every settings id (part-<settings id>-<chunk id>.parquet): bump when the rows or the part
# layout change so old parts are rebuilt. 2: parts keyed by settings, chunks planned over the videos no part holds;
# 3: each row keyed by its file's stamp too (a replaced or fixed file is predicted again: :func:`is_reusable`).
PARTS_VERSION = 3
# Rejections that say nothing of the file, tried again on every rerun whatever its stamp: a download that the
# server or the network failed (an HTTP 503, a dropped connection, a bucket's access denied).
RETRIED_EVERY_RUN = ("download_failed",)

TOP_K_TYPE = pa.list_(pa.struct([("label", pa.string()), ("score", pa.float64())]))
REJECTS_SCHEMA = pa.schema([("path", pa.string()), ("error", pa.string()), ("reason", pa.string())])


def predictions_schema(embeddings: bool) -> pa.Schema:
    fields = [
        ("path", pa.string()),
        ("label", pa.string()),  # null for a rejected video
        ("score", pa.float64()),
        ("top_k", TOP_K_TYPE),
        ("error", pa.string()),  # null, or "<category>: <reason>" as in rejects.csv
    ]
    return pa.schema(fields + ([("embedding", pa.list_(pa.float32()))] if embeddings else []))


def part_schema(embeddings: bool) -> pa.Schema:
    """A part's rows: predictions.parquet's, plus the ``stamp`` (:func:`stamp`) of the file each was made from."""
    return predictions_schema(embeddings).append(pa.field("stamp", pa.string()))


def _manifest_paths(fs: pafs.FileSystem, key: str, name: str) -> list[str]:
    try:
        table = pq.read_table(key, filesystem=fs, columns=["path"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise UserError(f"{name} is not a manifest Parquet file with a `path` column ({err}); "
                        "write one with `vidray index`") from None  # fmt: skip
    # Its local paths as the command line's (and preprocessing's: vidray.data.video.read_clip) are read: relative to
    # the working folder, `~` expanded. Kept relative, a video both listed in a folder and named here was two rows.
    return [resolve_path(p) for p in table.column("path").to_pylist() if p]


def _shown_below(root: str, path: str) -> bool:
    """Whether nothing on ``path`` below ``root`` is hidden (:func:`vidray.data.listing.is_hidden`)."""
    return not any(is_hidden(part) for part in path[len(root):].split("/"))


def discover(inputs: list[str]) -> list[str]:
    """Every video of ``inputs``, each once, in input order (a folder's videos sorted by path)."""
    found: list[str] = []
    for name in inputs:
        name = str(name)
        if is_web_url(name):  # a video on a web server: fetched by the task that decodes it
            found.append(name)
            continue
        fs, key = open_filesystem(name)
        info = fs.get_file_info(key)
        scheme = name.split("://", 1)[0] if is_uri(name) else "file"
        if info.type == pafs.FileType.Directory:
            if scheme == "file":  # pyarrow's listing leaves out a link whose target is gone: see vidray.data.listing.is_listed_video
                videos = videos_under(key)
            else:
                entries = fs.get_file_info(pafs.FileSelector(key, recursive=True))
                videos = sorted(e.path for e in entries if e.type == pafs.FileType.File and is_video_file(Path(e.path))
                                and _shown_below(key, e.path))  # fmt: skip
            if not videos:
                raise UserError(f"{name} is a folder without video files (looked for .mp4, .mov, .mkv, .webm, ...)")
            # Object stores list bucket/key: the rows keep the scheme, and what opening the folder took (its
            # endpoint, keys); local folders give local paths.
            found += [v if scheme == "file" else listed_object_uri(name, v) for v in videos]
        elif info.type == pafs.FileType.File and key.endswith(".parquet"):
            found += _manifest_paths(fs, key, name)
        else:  # a video file, or a missing one: the decoder rejects it with its reason, one row
            found.append(name if is_uri(name) else resolve_path(name))  # `~` too: no shell expands a quoted one
    return list(dict.fromkeys(found))


@dataclass(frozen=True)
class Chunk:
    """A part file: to write (the videos it will hold) or written (those of its videos still in the corpus)."""

    id: str  # <settings id>-<hash of the paths it was written with>
    paths: tuple[str, ...]
    stamps: tuple[str, ...] = ()  # a chunk to write: each path's stamp (:func:`stamp`) when it was planned

    @property
    def part_name(self) -> str:
        return f"{PARTS_DIR}/part-{self.id}.parquet"


def model_fingerprint(model_dir: Path) -> str:
    """What identifies a model: the name and contents of each file that prediction reads of it (its model folder's
    weights and config, and vidray.json), read in blocks. Not their mtimes: a copy of the same model (`cp -r`, a
    container fetching it again) changed the settings id, and every part of the corpus was deleted and predicted again.
    Not a checkpoint's training state (training_state.json and .safetensors, optimizer moments twice the weights' size),
    which no prediction reads: hashing it cost seconds per run on a large model, with every part reused."""
    model_dir = Path(model_dir)
    digest = hashlib.sha256()
    for path in model_files(model_dir):
        digest.update(json.dumps([str(path.relative_to(model_dir)), path.stat().st_size]).encode())
        with open(path, "rb") as f:
            while block := f.read(8 * 2**20):
                digest.update(block)
    return digest.hexdigest()[:16]


def model_files(model_dir: Path) -> list[Path]:
    """The files of ``model_dir`` that prediction reads (:func:`model_fingerprint`), sorted."""
    weights = (p for p in model_folder(model_dir).rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors"))
    return sorted({*weights, model_dir / INFO})  # an export's vidray.json is in its model folder, a checkpoint's beside it


def settings_id(settings: dict[str, Any]) -> str:
    """What every part of one model and settings (model files, views, top-k, embeddings) starts its name with:
    a re-run finds the parts it may reuse by name, whatever chunks the corpus was cut into when they were written."""
    # DECODE_VERSION: a vidray whose decoding changed (as preprocessing's shard ids count it) predicts again,
    # rather than keep the rows of frames it no longer reads, and files it once refused.
    key = json.dumps({"settings": settings, "version": PARTS_VERSION, "decode_version": DECODE_VERSION}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:12]


def plan_chunks(paths: list[str], settings: dict[str, Any], videos_per_chunk: int = VIDEOS_PER_CHUNK,
                stamps: dict[str, str] | None = None) -> list[Chunk]:  # fmt: skip
    """``paths`` (the videos no part holds yet: :func:`held_parts`) cut into chunks of ``videos_per_chunk``,
    each with its videos' ``stamps`` (:func:`stamp`; none given: "")."""
    prefix = settings_id(settings)
    chunks = []
    for start in range(0, len(paths), videos_per_chunk):
        members = tuple(paths[start : start + videos_per_chunk])
        digest = hashlib.sha256(json.dumps(members).encode()).hexdigest()[:20]
        chunks.append(Chunk(f"{prefix}-{digest}", members, tuple((stamps or {}).get(path, "") for path in members)))
    return chunks


def group_chunks(chunks: list[Chunk], cpus: float) -> list[list[Chunk]]:
    """Consecutive chunks in groups, one decode task each: up to VIDEOS_PER_CHUNK videos per task
    while that leaves at least DECODE_TASKS_PER_CPU tasks per CPU (never splits a chunk)."""
    videos = sum(len(c.paths) for c in chunks)
    per_task = min(VIDEOS_PER_CHUNK, -(-videos // max(1, int(DECODE_TASKS_PER_CPU * cpus))))
    groups: list[list[Chunk]] = []
    for chunk in chunks:
        if groups and sum(len(c.paths) for c in groups[-1]) + len(chunk.paths) <= per_task:
            groups[-1].append(chunk)
        else:
            groups.append([chunk])
    return groups


def stamp(path: str) -> str:
    """What a part keys a video's row by besides its path, as preprocessing keys a shard's videos: a local
    file's size, mtime and whether this user may read it (:func:`vidray.data.shards.file_stamp`). "" for
    an s3:// / gs:// object or a URL, keyed by its path alone: asking the store would cost a request per
    video on every rerun."""
    local = local_part(path)
    if local is None:
        return ""
    size, mtime_ns, unreadable = file_stamp(local)
    return f"{size}:{mtime_ns}" + (":unreadable" if unreadable else "")


def _says_unreadable(recorded: str) -> bool:
    """Whether a stamp says its file could not be read when it was taken: not there (file_stamp's -1, -1: a missing
    file, a dangling link) or not readable by this user. "" (an object, no stamp) says nothing."""
    return recorded.startswith("-1:") or recorded.endswith(":unreadable")


def _unexplained_missing(path: str, error: str, now: str) -> bool:
    """Whether ``error`` says ``path`` was missing where nothing says why it would stay so: an s3:// / gs:// object
    (no stamp; not a URL, whose 404 is its server's answer), or a file not found that its stamp ``now`` saw there."""
    category, _, reason = error.partition(": ")
    if category != MissingVideoError.code or is_web_url(path):
        return False
    return not now or (reason.startswith(NOT_FOUND_REASONS) and not _says_unreadable(now))


def is_reusable(path: str, error: str | None, recorded: str | None, now: str, retry_crashed: bool) -> bool:
    """Whether a part's row (its ``error``, null when predicted, and the ``recorded`` stamp) stands for a video
    whose stamp is ``now``. Not, as preprocessing decodes such a video again (vidray/data/shards.py, ``_id_fields``;
    shard_files.find_stale): for a file changed since (replaced; a copy then under way, now finished; a share
    unmounted then, mounted now; a permission fixed); for a rejection that says nothing of the file
    (:data:`RETRIED_EVERY_RUN`); for a video found missing that nothing says stays so (:func:`_unexplained_missing`):
    an s3:// / gs:// object, as nothing here says when it comes (an upload then under way), or a file the driver saw
    but its worker did not find (a node without the mount, an NFS error), whose stamp would not change; with
    ``retry_crashed``, for a video that killed its worker (kept otherwise, as preprocessing keeps it, so that a rerun
    finds the same rows)."""
    if recorded != now:
        return False
    category = (error or "").partition(": ")[0]
    if category in RETRIED_EVERY_RUN or _unexplained_missing(path, error or "", now):
        return False
    return not (retry_crashed and category == WORKER_CRASH)


def held_parts(fs: pafs.FileSystem, root: str, settings: dict[str, Any], stamps: dict[str, str],
               retry_crashed: bool = False) -> list[Chunk]:  # fmt: skip
    """The parts already written with ``settings``, each as the chunk of its videos that are still in the corpus
    (``stamps``: each video's :func:`stamp`) and whose rows stand (:func:`is_reusable`): those videos are reused,
    never predicted again, however the corpus grew since (a new video shifts every position, and the chunk size
    follows the corpus size, so chunks planned again would not match the parts). A row that does not stand stays
    in its part, left out of the chunk (and so of predictions.parquet), and its video is predicted again.

    Deleted: parts of other settings, and with them the :data:`OUTPUTS` assembled from them (a run killed before its
    own were written left another model's predictions, unmarked), parts none of whose rows stands any more, a dead
    run's temporaries.
    A video held by two parts is taken from the newer: its row in the older did not stand when the newer was
    written (a --retry-crashed run predicts a crashed video into a part of its own, beside the crash's row,
    which stands again on a later run without the flag)."""
    prefix = f"part-{settings_id(settings)}-"
    corpus = {as_text(path): path for path in stamps}  # parts name videos as their rows do
    entries = fs.get_file_info(pafs.FileSelector(join_uri(root, PARTS_DIR), allow_not_found=True))
    files = [entry for entry in entries if entry.type == pafs.FileType.File]
    ours = {entry.base_name for entry in files if entry.base_name.startswith(prefix) and entry.base_name.endswith(".parquet")}
    stale = [entry for entry in files if entry.base_name not in ours]  # other settings' parts, a dead run's temporaries
    if any(entry.base_name.startswith("part-") for entry in stale):
        for name in OUTPUTS:  # before the parts: deleted after them, a kill between would leave these
            _delete_if_there(fs, join_uri(root, name))
    for entry in stale:
        fs.delete_file(entry.path)
    held, taken = [], set()
    parts = [_read_part(fs, entry) for entry in files if entry.base_name in ours]
    for _, name, entry, table in sorted(parts, key=lambda part: part[:2], reverse=True):  # the newest first
        rows = zip(*(table.column(column).to_pylist() for column in ("path", "error", "stamp")))
        members = [path for path, error, recorded in rows if path in corpus and path not in taken
                   and is_reusable(path, error, recorded, stamps[corpus[path]], retry_crashed)]  # fmt: skip
        if members:
            taken.update(members)
            held.append(Chunk(name[len("part-") : -len(".parquet")], tuple(corpus[row] for row in members)))
        else:
            fs.delete_file(entry.path)  # none of its rows stands
    return held


def _delete_if_there(fs: pafs.FileSystem, path: str) -> None:
    try:
        fs.delete_file(path)
    except FileNotFoundError:
        pass


# A part's write time, in its Parquet metadata: which of two parts holding a video is the newer must survive a copy of
# the output (`cp -r`, `aws s3 sync`), which gives its files the copy's times, in the order it wrote them.
WRITTEN_NS = b"vidray_written_ns"


def _read_part(fs: pafs.FileSystem, entry: pafs.FileInfo) -> tuple[int, str, pafs.FileInfo, pa.Table]:
    """(when it was written, its name, ``entry``, its path, error and stamp columns) of the part ``entry``, read once:
    the write time is in its metadata, which reading the columns brings (a read of the footer before them doubled a
    resume's requests to a bucket); the file's own time for a part written without it."""
    table = pq.read_table(entry.path, filesystem=fs, columns=["path", "error", "stamp"])
    written = (table.schema.metadata or {}).get(WRITTEN_NS)
    return int(written) if written is not None else entry.mtime_ns or 0, entry.base_name, entry, table


def in_discovery_order(chunks: list[Chunk], paths: list[str]) -> list[Chunk]:
    """``chunks`` by the position of their first video in ``paths``. A fresh run's rows come out in discovery
    order; after the corpus grew, a reused part's rows stay together (predictions.parquet is streamed one
    part at a time), and a new video comes where its chunk's first video does."""
    position = {path: i for i, path in enumerate(paths)}
    return sorted(chunks, key=lambda chunk: min(position[path] for path in chunk.paths))


# A video whose file name is not UTF-8 (vidray.data.listing.is_text_name) is rejected, not predicted: its row
# could only name it escaped (as_text), which no longer opens the file or matches a listing of the folder.
NAME_NOT_UTF8 = (
    "name_not_utf8",
    f"its path is not UTF-8 text, so the predictions cannot name it as it is: rename the file (or its folder) to "
    f"UTF-8 (e.g. `{RENAME_TO_UTF8} <folder>`) and run again; the other videos' parts are reused",
)


def fetch_or_reject(path: str, settings: DecodeSettings, crash_on: str | None = None, num_threads: int = 1):
    """:func:`decode_or_reject` for a local file or a URL's video (downloaded first): (clip, "", "") or (None, category,
    reason), never raising for a bad file. Both prediction modes (vidray/infer/predict.py too) reject alike."""
    try:
        with local_file(path) as local:
            return decode_or_reject(local, settings, crash_on, num_threads)
    except DownloadError as err:  # an http(s):// video the server does not give
        return None, "missing" if err.missing else "download_failed", str(err)


def decode_one(path: str, settings: DecodeSettings, crash_on: str | None) -> tuple[bytes, str, str]:
    """(frame bytes, "", "") or (b"", category, reason). Rows name ``path`` as :func:`as_text` shows it."""
    if not is_text_name(path):
        return b"", *NAME_NOT_UTF8
    clip, error, reason = fetch_or_reject(path, settings, crash_on)
    return (clip.frames.tobytes(), "", "") if clip is not None else (b"", error, reason)


def decode_one_checked(path: str, settings: DecodeSettings, crash_on: str | None) -> tuple[bytes, str, str]:
    """:func:`decode_one` in a task of its own (crash isolation): the node must have the decoder, as for a chunk."""
    require_decoder(settings.decoder, settings.device)
    return decode_one(path, settings, crash_on)


DECODED_SCHEMA = pa.schema([("chunk", pa.string()), ("path", pa.string()), ("frames", pa.binary()), ("error", pa.string())])


def decode_chunks(batch: pa.Table, settings: DecodeSettings, crash_on: str | None) -> Iterator[pa.Table]:
    """Each row of ``batch`` is one group of chunks (``chunks``: JSON ``[[id, paths], ...]``,
    see :func:`group_chunks`); yields one table per chunk, one row per video. As a Ray Data task
    (two-stage pipeline) a chunk's rows travel on while the task decodes the next; the fused
    stage's actors (vidray/infer/batch_predict.py) predict each chunk as it comes. Arrow in and out: frame bytes stay binary
    (numpy's fixed-width bytes would drop trailing zero bytes)."""
    # A node without the decoder's package is a set-up problem, not a bad video: each of its videos was a
    # decode_error row, reused on every rerun. The task fails instead, and with it the run
    # (batch_predict._isolate_crashes says it in one line), as preprocessing does (vidray/data/decode_shard.py).
    require_decoder(settings.decoder, settings.device)
    for group in batch.column("chunks").to_pylist():
        for chunk_id, paths in json.loads(group):
            columns: dict[str, list] = {"chunk": [], "path": [], "frames": [], "error": []}
            for path in paths:
                frames, error, reason = decode_one(path, settings, crash_on)
                columns["chunk"].append(chunk_id)
                columns["path"].append(as_text(path))
                columns["frames"].append(frames)
                columns["error"].append(f"{error}: {reason}" if error else "")
            yield pa.Table.from_pydict(columns, schema=DECODED_SCHEMA)


def write_part(fs, root: str, chunk: Chunk, rows: list[dict], embeddings: bool) -> None:
    """One chunk's rows, in its paths' order, each with its file's stamp, as one Parquet file written atomically."""
    by_path = {row["path"]: row for row in rows}
    records = []
    for path, recorded in zip(map(as_text, chunk.paths), chunk.stamps or [""] * len(chunk.paths)):
        row = by_path[path]
        record = {"path": path, "label": None, "score": None, "top_k": None, "error": row["error"] or None,
                  "stamp": recorded}  # fmt: skip
        if not row["error"]:
            record.update(label=row["label"], score=float(row["score"]), top_k=json.loads(row["top_k"]))
        if embeddings:
            record["embedding"] = np.frombuffer(row["embedding"], np.float32).tolist() if not row["error"] else None
        records.append(record)
    table = pa.Table.from_pylist(records, schema=part_schema(embeddings).with_metadata({WRITTEN_NS: str(time.time_ns())}))
    write_atomically(fs, join_uri(root, chunk.part_name), lambda tmp: pq.write_table(table, tmp, filesystem=fs))


def assemble(fs, root: str, chunks: list[Chunk], embeddings: bool, settings: dict[str, Any], model: str) -> dict[str, Any]:
    """predictions.parquet from the parts in ``chunks``' order (streamed: one part in memory at a time), each
    part's rows of ``chunk.paths`` only (a reused part may hold rows that no longer stand), and rejects.csv.
    predictions.parquet's metadata names the parts' ``settings`` (their id) and the ``model`` folder.
    Returns the counts: predicted, rejected, ``rejected_by`` (per category of rejects.csv) and ``labels``,
    the videos per top-1 label (what the corpus was labelled as, at a glance), each most first."""
    schema = predictions_schema(embeddings).with_metadata({SETTINGS_ID_KEY: settings_id(settings), MODEL_KEY: model})
    labels: Counter[str] = Counter()  # of the predicted videos
    rejects: list[dict] = []

    def write_predictions(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema, filesystem=fs) as writer:
            for chunk in chunks:
                table = pq.read_table(join_uri(root, chunk.part_name), filesystem=fs, schema=schema)  # stamps left out
                if table.num_rows != len(chunk.paths):  # a reused part with rows that no longer stand (held_parts)
                    table = table.filter(pc.is_in(table.column("path"), pa.array([as_text(p) for p in chunk.paths])))
                writer.write_table(table)
                columns = (table.column(name).to_pylist() for name in ("path", "error", "label"))
                for path, error, label in zip(*columns):
                    if error is None:
                        labels[label] += 1
                    else:
                        category, _, reason = error.partition(": ")
                        rejects.append({"path": path, "error": category, "reason": reason})

    write_atomically(fs, join_uri(root, "predictions.parquet"), write_predictions)

    def write_rejects(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            pacsv.write_csv(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), f)

    write_atomically(fs, join_uri(root, "rejects.csv"), write_rejects)
    return {
        "predicted": labels.total(),
        "rejected": len(rejects),
        "rejected_by": _most_first(Counter(row["error"] for row in rejects)),  # rejects.csv's categories
        "labels": _most_first(labels),
    }


def _most_first(counts: Counter[str]) -> dict[str, int]:
    return dict(sorted(counts.items(), key=lambda item: (-item[1], item[0])))
