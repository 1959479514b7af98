"""``vidray predict --out OUT INPUT...``: predict a whole corpus on Ray Data.

Inputs: video files, folders (every video below them, recursively, by the
extensions ``vidray index`` knows) and manifest Parquet files (their ``path``
column), as local paths, ``file://`` or s3:// / gs:// URIs. The pipeline
streams, so memory stays flat whatever the corpus size:

* **decode**: Ray Data *tasks* (one CPU each, spread over the nodes) decode one
  chunk of videos each, with the decoder and rejection reasons of preprocessing
  (:func:`vidray.data.decode_shard.decode_or_reject`). A bad file becomes a row with its
  reason, never an error of the run.
* **predict**: an *actor pool* (one GPU per actor on GPU nodes) holds the model
  once per actor and runs batches through :class:`vidray.infer.predict.Classifier`, the
  same step as the one-by-one mode, so both give the same top-1 and scores.
* **write**: the driver collects each chunk's rows and writes them as one Parquet
  part, atomically (temporary name, then rename), under ``OUT/_parts``.

Writes ``OUT/predictions.parquet`` (one row per discovered video: ``path``,
``label``, ``score``, ``top_k``, ``error``; ``embedding`` with ``--embeddings``)
and ``OUT/rejects.csv``, assembled from the parts at the end.

**Resume.** A chunk's id hashes its paths and everything that shapes its rows
(model files, views, top-k, embeddings). A part on disk is a finished chunk: a
re-run after a kill predicts only the chunks without one, and parts of other
settings are deleted first. A video belongs to exactly one chunk, and a chunk's
rows are written once, so no video is predicted twice in the output, and no
video whose part was written is predicted again.

**Crashes.** A decoder that kills its worker (segfault) loses its chunk's task;
such chunks are re-run one video per Ray task, the video whose task dies is
rejected ("worker_crash"), and the others are predicted in the driver. Invariant,
checked before anything is assembled: predicted + rejected == discovered.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.errors import UserError
from vidray.data.index import is_video_file
from vidray.data.decode_shard import CRASH_ON_ENV, WORKER_CRASH_REASON, decode_or_reject
from vidray.data.shard_files import write_atomically
from vidray.data.shards import DecodeSettings
from vidray.storage import is_uri, join_uri, local_file, open_filesystem

# A chunk is one decode task and one part file: at most this many videos, and small enough that a
# corpus gives at least MIN_CHUNKS tasks (a 64-video corpus in 4 tasks of 16 left CPUs idle).
VIDEOS_PER_CHUNK = 16
MIN_CHUNKS = 32
PARTS_DIR = "_parts"
PROGRESS_EVERY_S = 10.0
# Test-only: the driver SIGKILLs itself after writing this many parts (a real, uncatchable kill).
KILL_AFTER_PARTS_ENV = "VIDRAY_TEST_KILL_AFTER_PARTS"
# Part of every chunk id: bump when the rows change so old parts are rebuilt.
PARTS_VERSION = 1

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


# --- discovery ----------------------------------------------------------------


def _manifest_paths(fs: pafs.FileSystem, key: str, name: str) -> list[str]:
    try:
        table = pq.read_table(key, filesystem=fs, columns=["path"])
    except (pa.ArrowException, OSError, KeyError) as err:
        raise UserError(f"{name} is not a manifest Parquet file with a `path` column ({err}); "
                        "write one with `vidray index`") from None  # fmt: skip
    return [p for p in table.column("path").to_pylist() if p]


def discover(inputs: list[str]) -> list[str]:
    """Every video of ``inputs``, each once, in input order (a folder's videos sorted by path)."""
    found: list[str] = []
    for name in inputs:
        name = str(name)
        fs, key = open_filesystem(name)
        info = fs.get_file_info(key)
        scheme = name.split("://", 1)[0] if is_uri(name) else "file"
        if info.type == pafs.FileType.Directory:
            entries = fs.get_file_info(pafs.FileSelector(key, recursive=True))
            videos = sorted(e.path for e in entries if e.type == pafs.FileType.File and is_video_file(Path(e.path)))
            if not videos:
                raise UserError(f"{name} is a folder without video files (looked for .mp4, .mov, .mkv, .webm, ...)")
            # Object stores list bucket/key: the rows keep the scheme; local folders give local paths.
            found += [v if scheme == "file" else f"{scheme}://{v}" for v in videos]
        elif info.type == pafs.FileType.File and key.endswith(".parquet"):
            found += _manifest_paths(fs, key, name)
        else:  # a video file, or a missing one: the decoder rejects it with its reason, one row
            found.append(name if is_uri(name) else os.path.abspath(name))
    return list(dict.fromkeys(found))


# --- plan and resume ------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    id: str
    paths: tuple[str, ...]

    @property
    def part_name(self) -> str:
        return f"{PARTS_DIR}/part-{self.id}.parquet"


def model_fingerprint(model_dir: Path) -> str:
    """What identifies a model's files cheaply: name, size and mtime of each (weights, config, vidray.json)."""
    files = sorted(p for p in Path(model_dir).rglob("*") if p.is_file() and p.suffix in (".json", ".safetensors"))
    stats = [(str(p.relative_to(model_dir)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]
    return hashlib.sha256(json.dumps(stats).encode()).hexdigest()[:16]


def plan_chunks(paths: list[str], settings: dict[str, Any], videos_per_chunk: int = VIDEOS_PER_CHUNK) -> list[Chunk]:
    chunks = []
    for start in range(0, len(paths), videos_per_chunk):
        members = tuple(paths[start : start + videos_per_chunk])
        key = json.dumps({"paths": members, "settings": settings, "version": PARTS_VERSION}, sort_keys=True)
        chunks.append(Chunk(hashlib.sha256(key.encode()).hexdigest()[:20], members))
    return chunks


def _finished_parts(fs: pafs.FileSystem, root: str, chunks: list[Chunk]) -> set[str]:
    """Ids of the chunks whose part exists; parts of other corpora or settings are deleted."""
    entries = fs.get_file_info(pafs.FileSelector(join_uri(root, PARTS_DIR), allow_not_found=True))
    planned = {c.id for c in chunks}
    finished = set()
    for entry in entries:
        name = entry.base_name
        if name.startswith("part-") and name.endswith(".parquet") and name[5:-8] in planned:
            finished.add(name[5:-8])
        elif entry.type == pafs.FileType.File:
            fs.delete_file(entry.path)  # stale part or a dead run's temporary
    return finished


# --- the Ray Data stages (run in Ray workers) ------------------------------------


def _decode_one(path: str, settings: DecodeSettings, crash_on: str | None) -> tuple[bytes, str, str]:
    """(frame bytes, "", "") or (b"", category, reason)."""
    with local_file(path) as local:
        clip, error, reason = decode_or_reject(local, settings, crash_on)
    return (clip.frames.tobytes(), "", "") if clip is not None else (b"", error, reason)


DECODED_SCHEMA = pa.schema([("chunk", pa.string()), ("path", pa.string()), ("frames", pa.binary()), ("error", pa.string())])
PREDICTED_SCHEMA = pa.schema([
    ("chunk", pa.string()), ("path", pa.string()), ("error", pa.string()), ("label", pa.string()),
    ("score", pa.float64()), ("top_k", pa.string()), ("embedding", pa.binary()),
])  # fmt: skip


def decode_chunks(batch: pa.Table, settings: DecodeSettings, crash_on: str | None) -> pa.Table:
    """Ray Data task: each row of ``batch`` is one chunk; one output row per video. Arrow in and out:
    frame bytes stay binary (numpy's fixed-width bytes would drop trailing zero bytes)."""
    columns: dict[str, list] = {"chunk": [], "path": [], "frames": [], "error": []}
    for chunk_id, paths in zip(batch.column("chunk").to_pylist(), batch.column("paths").to_pylist()):
        for path in json.loads(paths):
            frames, error, reason = _decode_one(path, settings, crash_on)
            columns["chunk"].append(chunk_id)
            columns["path"].append(path)
            columns["frames"].append(frames)
            columns["error"].append(f"{error}: {reason}" if error else "")
    return pa.Table.from_pydict(columns, schema=DECODED_SCHEMA)


def _predicted_columns(classifier, paths, frames, errors, chunks, embeddings: bool) -> dict[str, list]:
    """Prediction rows for decoded videos (``frames`` bytes) and rejection rows for the others."""
    ok = [i for i, error in enumerate(errors) if not error]
    rows = {}
    if ok:
        clips = np.stack([np.frombuffer(frames[i], np.uint8).reshape(classifier.clip_shape) for i in ok])
        rows = dict(zip(ok, classifier.predict(clips, features=embeddings)))
    columns: dict[str, list] = {"chunk": list(chunks), "path": list(paths), "error": list(errors),
                                "label": [], "score": [], "top_k": [], "embedding": []}  # fmt: skip
    for i in range(len(paths)):
        row = rows.get(i)
        columns["label"].append(row["label"] if row else "")
        columns["score"].append(row["score"] if row else float("nan"))
        columns["top_k"].append(json.dumps(row["top_k"]) if row else "")
        columns["embedding"].append(row["embedding"].tobytes() if row and embeddings else b"")
    return columns


class BatchPredictor:
    """Ray Data actor: the model loaded once, batches of decoded videos in, prediction rows out."""

    def __init__(self, model_dir: str, top_k: int, clips: int, crops: int, embeddings: bool):
        from vidray.infer.predict import Classifier

        self.classifier = Classifier(Path(model_dir), top_k=top_k, clips=clips, crops=crops)
        self.embeddings = embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in DECODED_SCHEMA.names}
        predicted = _predicted_columns(self.classifier, columns["path"], columns["frames"], columns["error"],
                                       columns["chunk"], self.embeddings)  # fmt: skip
        return pa.Table.from_pydict(predicted, schema=PREDICTED_SCHEMA)


# --- the driver -------------------------------------------------------------------


def _write_part(fs, root: str, chunk: Chunk, rows: list[dict], embeddings: bool) -> None:
    """One chunk's rows, in its paths' order, as one Parquet file written atomically."""
    by_path = {row["path"]: row for row in rows}
    records = []
    for path in chunk.paths:
        row = by_path[path]
        record = {"path": path, "label": None, "score": None, "top_k": None, "error": row["error"] or None}
        if not row["error"]:
            record.update(label=row["label"], score=float(row["score"]), top_k=json.loads(row["top_k"]))
        if embeddings:
            record["embedding"] = np.frombuffer(row["embedding"], np.float32).tolist() if not row["error"] else None
        records.append(record)
    table = pa.Table.from_pylist(records, schema=predictions_schema(embeddings))
    write_atomically(fs, join_uri(root, chunk.part_name), lambda tmp: pq.write_table(table, tmp, filesystem=fs))


class _Progress:
    def __init__(self, total: int, done: int):
        self.total, self.done, self.this_run = total, done, 0
        self.started = self.reported = time.monotonic()

    def add(self, videos: int) -> None:
        self.done += videos
        self.this_run += videos
        now = time.monotonic()
        if now - self.reported >= PROGRESS_EVERY_S or self.done == self.total:
            self.reported = now
            rate = self.this_run / max(now - self.started, 1e-9)
            print(f"vidray predict: {self.done}/{self.total} videos, {rate:.1f} videos/s", file=sys.stderr, flush=True)


def _run_chunks(todo: list[Chunk], fs, root: str, args: dict[str, Any], progress: _Progress) -> set[str]:
    """Decode and predict ``todo`` on Ray Data; write each chunk's part as soon as its rows are in.
    Returns the ids of the chunks written."""
    import ray
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one line every PROGRESS_EVERY_S instead (the bars cost the driver CPU)
    gpus = int(ray.cluster_resources().get("GPU", 0))
    actors = args["actors"] or max(1, gpus)
    ds = ray.data.from_items([{"chunk": c.id, "paths": json.dumps(c.paths)} for c in todo],
                             override_num_blocks=len(todo))  # fmt: skip
    with warnings.catch_warnings():
        # As in preprocessing: Ray 2.60 has no named parameter for task retries.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": args["settings"], "crash_on": args["crash_on"]},
            compute=ray.data.TaskPoolStrategy(), num_cpus=1, max_retries=1, scheduling_strategy="SPREAD",
        )  # fmt: skip
    ds = ds.map_batches(
        BatchPredictor,
        batch_size=args["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=actors),
        fn_constructor_kwargs={k: args[k] for k in ("model_dir", "top_k", "clips", "crops", "embeddings")},
        # On GPU nodes an actor holds a GPU (and a CPU to feed it). On CPU-only clusters it reserves
        # args["actor_cpus"] (default none): the decode tasks then take every CPU and the model
        # shares them; reserving a whole CPU for it would leave a 1-CPU node no CPU to decode with.
        **({"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": args["actor_cpus"]}),
    )
    ds.context.max_errored_blocks = -1  # a lost chunk is recovered one video per task, never fatal
    by_id = {c.id: c for c in todo}
    pending: dict[str, list[dict]] = {}
    written: set[str] = set()
    kill_after = int(os.environ.get(KILL_AFTER_PARTS_ENV, 0))
    for row in ds.iter_rows():
        chunk = by_id[str(row["chunk"])]
        rows = pending.setdefault(chunk.id, [])
        rows.append(dict(row))
        if len(rows) == len(chunk.paths):
            _write_part(fs, root, chunk, pending.pop(chunk.id), args["embeddings"])
            written.add(chunk.id)
            progress.add(len(chunk.paths))
            if kill_after and len(written) >= kill_after:
                os.kill(os.getpid(), 9)  # test-only: see KILL_AFTER_PARTS_ENV
    return written


def _isolate_crashes(lost: list[Chunk], fs, root: str, args: dict[str, Any], progress: _Progress) -> None:
    """Chunks whose task died: decode them one video per task (a task that dies rejects its video),
    predict the rest in the driver, write their parts."""
    import ray

    from vidray.infer.predict import Classifier

    decode = ray.remote(max_retries=0, **args["settings"].task_options())(_decode_one)
    classifier = Classifier(Path(args["model_dir"]), top_k=args["top_k"], clips=args["clips"], crops=args["crops"])
    for chunk in lost:  # one chunk at a time bounds the driver's memory to one chunk
        refs = [decode.remote(path, args["settings"], args["crash_on"]) for path in chunk.paths]
        frames, errors = [], []
        for ref in refs:
            try:
                data, error, reason = ray.get(ref)
            except ray.exceptions.RayError as err:
                data, error, reason = b"", "worker_crash", f"{WORKER_CRASH_REASON} ({type(err).__name__})"
            frames.append(data)
            errors.append(f"{error}: {reason}" if error else "")
        columns = _predicted_columns(classifier, list(chunk.paths), frames, errors, [chunk.id] * len(frames),
                                     args["embeddings"])  # fmt: skip
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        _write_part(fs, root, chunk, rows, args["embeddings"])
        progress.add(len(chunk.paths))


def _assemble(fs, root: str, chunks: list[Chunk], embeddings: bool) -> dict[str, int]:
    """predictions.parquet from the parts in discovery order (streamed: one part in memory at a time),
    and rejects.csv. Returns the counts."""
    schema = predictions_schema(embeddings)
    counts = {"predicted": 0, "rejected": 0}
    rejects: list[dict] = []

    def write_predictions(tmp: str) -> None:
        with pq.ParquetWriter(tmp, schema, filesystem=fs) as writer:
            for chunk in chunks:
                table = pq.read_table(join_uri(root, chunk.part_name), filesystem=fs, schema=schema)
                writer.write_table(table)
                for path, error in zip(table.column("path").to_pylist(), table.column("error").to_pylist()):
                    if error is None:
                        counts["predicted"] += 1
                    else:
                        category, _, reason = error.partition(": ")
                        rejects.append({"path": path, "error": category, "reason": reason})
                        counts["rejected"] += 1

    write_atomically(fs, join_uri(root, "predictions.parquet"), write_predictions)

    def write_rejects(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            pacsv.write_csv(pa.Table.from_pylist(rejects, schema=REJECTS_SCHEMA), f)

    write_atomically(fs, join_uri(root, "rejects.csv"), write_rejects)
    return counts


def predict_corpus(
    model_dir: Path,
    inputs: list[str],
    out: str,
    top_k: int = 3,
    clips: int | None = None,
    crops: int = 1,
    embeddings: bool = False,
    batch_size: int = 8,
    actors: int | None = None,
    actor_cpus: float = 0.0,
    videos_per_chunk: int | None = None,
) -> dict[str, Any]:
    """Predict every video of ``inputs`` into ``out``; returns the run's summary (see the module docstring).

    ``clips`` (default: the model's ``train.eval_clips``) x ``crops`` are the views averaged; ``actors`` caps the model actor pool
    (default: one per GPU, or one on a CPU-only cluster); ``actor_cpus``: the CPUs an actor
    reserves on a CPU-only cluster.
    """
    from vidray.model.checkpoint import clip_shape_of, eval_clips_of, read_checkpoint_info
    from vidray.cluster import init_ray
    from vidray.model.inference import Views  # torch: here, not at import, so decode workers never load it

    started = time.monotonic()
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    if batch_size < 1 or (videos_per_chunk is not None and videos_per_chunk < 1):
        raise UserError(f"--batch-size and --videos-per-chunk must be >= 1, got {batch_size} and {videos_per_chunk}")
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} does not exist (pass a directory written by `vidray export` or a checkpoint)")
    info = read_checkpoint_info(model_dir)
    shape = clip_shape_of(info)
    views = Views(eval_clips_of(info) if clips is None else clips, crops)
    paths = discover(inputs)
    if not paths:
        raise UserError(f"no videos in {' '.join(map(str, inputs))}")
    settings = {"model": model_fingerprint(model_dir), "clips": views.clips, "crops": views.crops,
                "top_k": top_k, "embeddings": embeddings}  # fmt: skip
    # A function of the corpus alone (not of the cluster), so a resumed run plans the same chunks.
    videos_per_chunk = videos_per_chunk or max(1, min(VIDEOS_PER_CHUNK, -(-len(paths) // MIN_CHUNKS)))
    chunks = plan_chunks(paths, settings, videos_per_chunk)
    fs, root = open_filesystem(out)
    try:
        fs.create_dir(join_uri(root, PARTS_DIR), recursive=True)
    except OSError as err:
        raise UserError(f"cannot write predictions to {out} ({err}); pass --out a writable directory") from None
    finished = _finished_parts(fs, root, chunks)
    todo = [c for c in chunks if c.id not in finished]
    reused = sum(len(c.paths) for c in chunks if c.id in finished)
    progress = _Progress(len(paths), reused)
    if todo:
        init_ray(include_dashboard=False)  # a local cluster for this command alone: no dashboard to start
        args = {
            "model_dir": str(model_dir), "top_k": top_k, "clips": views.clips, "crops": views.crops,
            "embeddings": embeddings, "batch_size": batch_size, "actors": actors, "actor_cpus": actor_cpus,
            "settings": DecodeSettings(shape.stored_frames, shape.stored_size, shape.decoder),
            "crash_on": os.environ.get(CRASH_ON_ENV) or None,
        }  # fmt: skip
        written = _run_chunks(todo, fs, root, args, progress)
        lost = [c for c in todo if c.id not in written]
        if lost:
            print(f"vidray predict: {len(lost)} chunk task(s) died; re-running their videos one per task",
                  file=sys.stderr, flush=True)  # fmt: skip
            _isolate_crashes(lost, fs, root, args, progress)
    counts = _assemble(fs, root, chunks, embeddings)
    if counts["predicted"] + counts["rejected"] != len(paths):  # a bug, never bad input
        raise RuntimeError(f"predicted {counts['predicted']} + rejected {counts['rejected']} != discovered {len(paths)}")
    seconds = time.monotonic() - started
    return {
        "discovered": len(paths),
        **counts,
        "predicted_this_run": len(paths) - reused,
        "reused": reused,
        "seconds": round(seconds, 3),
        "videos_per_s": round((len(paths) - reused) / max(seconds, 1e-9), 3),
        "predictions": join_uri(out, "predictions.parquet"),
        "rejects": join_uri(out, "rejects.csv"),
        "protocol": views.describe(),
        "embeddings": embeddings,
    }
