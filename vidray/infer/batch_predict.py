"""``vidray predict --out OUT INPUT...``: predict a whole corpus on Ray Data.

Inputs: video files, folders (every video below them, recursively, by the
extensions ``vidray index`` knows) and manifest Parquet files (their ``path``
column), as local paths, ``file://`` or s3:// / gs:// URIs. The pipeline
streams, so memory stays flat whatever the corpus size:

* **decode**: Ray Data *tasks* (one CPU each, or two to a CPU on long runs; spread over
  the nodes) decode one or more consecutive chunks of videos each
  (:func:`vidray.infer.corpus.group_chunks`), with the decoder and rejection reasons of preprocessing
  (:func:`vidray.data.decode_shard.decode_or_reject`). A bad file becomes a row with its
  reason, never an error of the run; a node without the decoder's package stops the run in one
  line, as in preprocessing, and writes no rows for its videos.
* **predict**: an *actor pool* (one GPU per actor on GPU nodes) holds the model
  once per actor and runs batches through :class:`vidray.infer.predict.Classifier`, the
  same step as the one-by-one mode, so both give the same top-1 and scores. ``--model`` is a
  folder on the driver's disk: an actor on a node without it loads the copy of its files that the
  driver put in the object store (:func:`shipped_model`).
* **fused** (CPU-only clusters, by default): one actor per CPU decodes its chunks and predicts
  them itself, with the same decoder and the same :class:`~vidray.infer.predict.Classifier`: no
  decode worker processes beside the model, no frames through the object store, and an actor's
  next chunk is queued while it works (no hand-over gap between tasks). On GPU nodes the two
  stages above stay apart, so the GPU actors never wait on decoding (``stages``).
* **write**: the driver collects each chunk's rows and writes them as one Parquet
  part, atomically (temporary name, then rename), under ``OUT/_parts``.

Writes ``OUT/predictions.parquet`` (one row per discovered video: ``path``,
``label``, ``score``, ``top_k``, ``error``; ``embedding`` with ``--embeddings``)
and ``OUT/rejects.csv``, assembled from the parts at the end.

**Resume.** A part's name starts with a hash of everything that shapes its rows
(model files, views, top-k, embeddings: :func:`vidray.infer.corpus.settings_id`), and
each row records its file's size and mtime (:func:`vidray.infer.corpus.stamp`), as
preprocessing keys a video. A re-run with the same settings reuses every such row that
still stands (:func:`vidray.infer.corpus.is_reusable`: its video still in the corpus, its
file unchanged, not a failed download, not a worker crash under ``retry_crashed``), and
cuts only the other videos into new chunks: after a kill, the chunks not written; after
videos were added, the new ones alone; a video replaced, or rejected while it was still
being copied in, again. Parts of other settings, and parts none of whose rows stands, are
deleted first. A video is held by one part at most, and a chunk's rows are written
once, so no video is predicted twice in the output, and no video whose row stands is
predicted again.

**Crashes.** A decoder that kills its worker (segfault) loses its task; the
task's chunks without a part are re-run one video per Ray task, the video whose task dies is
rejected ("worker_crash"; kept on a re-run, as preprocessing keeps it, unless ``retry_crashed``),
and the others are predicted in the driver. Invariant,
checked before anything is assembled: predicted + rejected == discovered.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any, Iterator

import numpy as np
import pyarrow as pa
import ray
import ray.data

from vidray.cluster import init_ray
from vidray.config import DecoderName
from vidray.data.decode_shard import CRASH_ON_ENV, WORKER_CRASH_REASON
from vidray.data.listing import as_text
from vidray.data.shard_files import WORKER_CRASH
from vidray.data.shards import DecodeSettings
from vidray.data.video import DecoderUnavailableError, chosen_decoder
from vidray.errors import UserError
from vidray.folder_lock import FolderLock
from vidray.infer.corpus import (
    DECODED_SCHEMA, MIN_CHUNKS, PARTS_DIR, VIDEOS_PER_CHUNK, Chunk, assemble, decode_chunks, decode_one_checked,
    discover, group_chunks, held_parts, in_discovery_order, model_files, model_fingerprint, plan_chunks, stamp, write_part,
)  # fmt: skip
from vidray.model.checkpoint import clip_shape_of, eval_clips_of, read_checkpoint_info, refuse_pretraining_checkpoint
from vidray.model.views import Views
from vidray.storage import join_uri, open_filesystem

PROGRESS_EVERY_S = 10.0
DECODE_TASKS_PER_CPU_TO_DOUBLE = 8
# How a run is laid out: decode and model fused in one actor per CPU, or decode tasks feeding model actors.
STAGES = ("auto", "fused", "two")
# Test-only: the driver SIGKILLs itself after writing this many parts (a real, uncatchable kill).
KILL_AFTER_PARTS_ENV = "VIDRAY_TEST_KILL_AFTER_PARTS"
# What the model actors hand back: one row per video of a chunk.
PREDICTED_SCHEMA = pa.schema([
    ("chunk", pa.string()), ("path", pa.string()), ("error", pa.string()), ("label", pa.string()),
    ("score", pa.float64()), ("top_k", pa.string()), ("embedding", pa.binary()),
])  # fmt: skip


def _predicted_columns(classifier, paths, frames, errors, chunks, embeddings: bool,
                       batch_size: int | None = None) -> dict[str, list]:  # fmt: skip
    """Prediction rows for decoded videos (``frames`` bytes), ``batch_size`` of them a forward pass (None: all, a batch
    its caller sized), and rejection rows for the others."""
    ok = [i for i, error in enumerate(errors) if not error]
    rows, size = {}, batch_size or max(1, len(ok))
    for start in range(0, len(ok), size):
        batch = ok[start : start + size]
        clips = np.stack([np.frombuffer(frames[i], np.uint8).reshape(classifier.clip_shape) for i in batch])
        rows.update(zip(batch, classifier.predict(clips, features=embeddings)))
    columns: dict[str, list] = {"chunk": list(chunks), "path": list(paths), "error": list(errors),
                                "label": [], "score": [], "top_k": [], "embedding": []}  # fmt: skip
    for i in range(len(paths)):
        row = rows.get(i)
        columns["label"].append(row["label"] if row else "")
        columns["score"].append(row["score"] if row else float("nan"))
        columns["top_k"].append(json.dumps(row["top_k"]) if row else "")
        columns["embedding"].append(row["embedding"].tobytes() if row and embeddings else b"")
    return columns


def _actor_device():
    """Where an actor's model runs: on its GPU only when Ray gave it one. Ray leaves CUDA_VISIBLE_DEVICES alone for
    a worker given none, so on a GPU node each CPU actor of the fused stage put a model of its own on GPU 0."""
    import torch

    return torch.device("cuda" if ray.is_initialized() and ray.get_gpu_ids() else "cpu")


def shipped_model(model_dir: Path) -> dict[str, np.ndarray]:
    """The files prediction reads of ``model_dir`` (those its fingerprint hashes), by path relative to it: what
    the driver puts in Ray's object store for a model actor on a node without ``model_dir`` (:func:`_loaded`)."""
    return {path.relative_to(model_dir).as_posix(): np.fromfile(path, np.uint8) for path in model_files(model_dir)}


def _loaded(model_dir: str, shipped, load):
    """``load(folder)`` of ``model_dir``, or, where this node has no such folder (a model on the head's disk, an actor
    on a GPU worker node: it failed with "does not exist"), of a temporary copy of the ``shipped`` files
    (:func:`shipped_model`, or its object ref), deleted once loaded. Not the copy where the folder is there: it
    costs each actor a write of the weights (~350 MB for ViT-B)."""
    if shipped is None or Path(model_dir).is_dir():
        return load(Path(model_dir))
    files = ray.get(shipped) if isinstance(shipped, ray.ObjectRef) else shipped
    with tempfile.TemporaryDirectory(prefix="vidray-model-") as folder:
        for name, data in files.items():
            (Path(folder) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(folder) / name).write_bytes(memoryview(data))  # from the object store's memory, no copy
        return load(Path(folder))


class BatchPredictor:
    """Ray Data actor: the model loaded once, batches of decoded videos in, prediction rows out."""

    def __init__(self, model_dir: str, top_k: int, clips: int, crops: int, embeddings: bool, shipped=None):
        # Imported here, in the actor: the driver plans and writes without torch (seconds saved per run).
        from vidray.infer.predict import Classifier

        self.classifier = _loaded(model_dir, shipped, lambda folder: Classifier(
            folder, top_k=top_k, clips=clips, crops=crops, device=_actor_device()))  # fmt: skip
        self.embeddings = embeddings

    def __call__(self, batch: pa.Table) -> pa.Table:
        columns = {name: batch.column(name).to_pylist() for name in DECODED_SCHEMA.names}
        predicted = _predicted_columns(self.classifier, columns["path"], columns["frames"], columns["error"],
                                       columns["chunk"], self.embeddings)  # fmt: skip
        return pa.Table.from_pydict(predicted, schema=PREDICTED_SCHEMA)


class DecodingPredictor(BatchPredictor):
    """Ray Data actor of the fused stage: groups of chunks in, each chunk decoded here
    (:func:`decode_chunks`) and predicted in batches of ``batch_size``, one table per chunk out."""

    def __init__(self, settings: DecodeSettings, crash_on: str | None, batch_size: int, **model: Any):
        super().__init__(**model)
        self.settings, self.crash_on, self.batch_size = settings, crash_on, batch_size

    def __call__(self, batch: pa.Table) -> Iterator[pa.Table]:  # type: ignore[override]
        predict = super().__call__
        for decoded in decode_chunks(batch, self.settings, self.crash_on):
            starts = range(0, decoded.num_rows, self.batch_size)
            yield pa.concat_tables([predict(decoded.slice(start, self.batch_size)) for start in starts])


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
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False  # one line every PROGRESS_EVERY_S instead (the bars cost the driver CPU)
    resources = ray.cluster_resources()
    gpus = int(resources.get("GPU", 0))
    cpus = resources.get("CPU", 1)
    groups = group_chunks(todo, cpus)
    ds = ray.data.from_items([{"chunks": json.dumps([[c.id, c.paths] for c in group])} for group in groups],
                             override_num_blocks=len(groups))  # fmt: skip
    model = {k: args[k] for k in ("model_dir", "top_k", "clips", "crops", "embeddings", "shipped")}
    if resolve_stages(args["stages"], gpus) == "fused":
        # One actor per CPU, each with its own model (small next to a decode's work). A decoder
        # that kills its actor fails that task once more at most; the chunks it leaves without a
        # part are isolated afterwards, as a lost decode task's are.
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")  # see _two_stages
            ds = ds.map_batches(
                DecodingPredictor, batch_size=1, batch_format="pyarrow",
                compute=ray.data.ActorPoolStrategy(size=min(len(groups), args["actors"] or max(1, int(cpus)))),
                fn_constructor_kwargs={"settings": args["settings"], "crash_on": args["crash_on"],
                                       "batch_size": args["batch_size"], **model},
                num_cpus=1, max_task_retries=1,
            )  # fmt: skip
    else:
        ds = _two_stages(ds, len(groups), cpus, gpus, args, model)
    ds.context.max_errored_blocks = -1  # a lost chunk is recovered one video per task, never fatal
    by_id = {c.id: c for c in todo}
    pending: dict[str, dict[str, dict]] = {}  # chunk id -> path -> row
    written: set[str] = set()
    kill_after = int(os.environ.get(KILL_AFTER_PARTS_ENV, 0))
    for row in ds.iter_rows():
        chunk = by_id[str(row["chunk"])]
        if chunk.id in written:  # should a retried decode task yield a chunk again, it is written once
            continue
        rows = pending.setdefault(chunk.id, {})
        rows[str(row["path"])] = dict(row)
        if len(rows) == len(chunk.paths):
            write_part(fs, root, chunk, list(pending.pop(chunk.id).values()), args["embeddings"])
            written.add(chunk.id)
            progress.add(len(chunk.paths))
            if kill_after and len(written) >= kill_after:
                os.kill(os.getpid(), 9)  # test-only: see KILL_AFTER_PARTS_ENV
    return written


def resolve_stages(stages: str, gpus: int) -> str:
    """``auto``: fused on CPU-only clusters, two stages where there are GPUs."""
    if stages not in STAGES:
        raise UserError(f"--stages must be one of {', '.join(STAGES)}, got {stages!r}")
    return stages if stages != "auto" else ("two" if gpus else "fused")


def _two_stages(ds, tasks: int, cpus: float, gpus: int, args: dict[str, Any], model: dict[str, Any]):
    """Decode tasks feeding a model actor pool (one GPU per actor on GPU nodes)."""
    # Ray Data hands a CPU its next decode task ~0.15 s after the last one ends (its scheduler polls
    # every 0.1 s). Two decode tasks per CPU hide that hand-over, at the price of a second worker
    # start per CPU (~1 CPU-s: Python, Ray, PyAV): worth it from about 8 tasks per CPU.
    decode_cpus = 0.5 if tasks >= DECODE_TASKS_PER_CPU_TO_DOUBLE * cpus else 1
    with warnings.catch_warnings():
        # As in preprocessing: Ray 2.60 has no named parameter for task retries.
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_chunks, batch_size=1, batch_format="pyarrow", fn_kwargs={"settings": args["settings"], "crash_on": args["crash_on"]},
            compute=ray.data.TaskPoolStrategy(), num_cpus=decode_cpus, max_retries=1, scheduling_strategy="SPREAD",
        )  # fmt: skip
    return ds.map_batches(
        BatchPredictor,
        batch_size=args["batch_size"],
        batch_format="pyarrow",
        compute=ray.data.ActorPoolStrategy(min_size=1, max_size=args["actors"] or max(1, gpus)),
        fn_constructor_kwargs=model,
        # On GPU nodes an actor holds a GPU (and a CPU to feed it). On CPU-only clusters it reserves
        # args["actor_cpus"] (default none): the decode tasks then take every CPU and the model
        # shares them; reserving a whole CPU for it would leave a 1-CPU node no CPU to decode with.
        **({"num_gpus": 1, "num_cpus": 1} if gpus else {"num_cpus": args["actor_cpus"]}),
    )


def _isolate_crashes(lost: list[Chunk], fs, root: str, args: dict[str, Any], progress: _Progress) -> None:
    """Chunks whose task died: decode them one video per task (a task that dies rejects its video),
    predict the rest in the driver, write their parts."""
    from vidray.infer.predict import Classifier  # see BatchPredictor

    decode = ray.remote(max_retries=0, **args["settings"].task_options())(decode_one_checked)
    classifier = Classifier(Path(args["model_dir"]), top_k=args["top_k"], clips=args["clips"], crops=args["crops"])
    for chunk in lost:  # one chunk at a time bounds the driver's memory to one chunk
        refs = [decode.remote(path, args["settings"], args["crash_on"]) for path in chunk.paths]
        frames, errors = [], []
        for ref in refs:
            try:
                data, error, reason = ray.get(ref)
            except ray.exceptions.RayTaskError as err:
                if isinstance(getattr(err, "cause", None), DecoderUnavailableError):  # a node problem, as preprocessing
                    raise DecoderUnavailableError(f"{err.cause} (on a Ray worker node)") from None  # says it
                data, error, reason = b"", WORKER_CRASH, f"{WORKER_CRASH_REASON} ({type(err).__name__})"
            except ray.exceptions.RayError as err:
                data, error, reason = b"", WORKER_CRASH, f"{WORKER_CRASH_REASON} ({type(err).__name__})"
            frames.append(data)
            errors.append(f"{error}: {reason}" if error else "")
        # --batch-size videos a pass, as the fused stage: a whole chunk's views at once (--videos-per-chunk 128 x 5 clips
        # x 3 crops: 1,920) ran the driver out of memory, on every rerun.
        columns = _predicted_columns(classifier, [as_text(p) for p in chunk.paths], frames, errors, [chunk.id] * len(frames),
                                     args["embeddings"], args["batch_size"])  # fmt: skip
        rows = [dict(zip(columns, values)) for values in zip(*columns.values())]
        write_part(fs, root, chunk, rows, args["embeddings"])
        progress.add(len(chunk.paths))


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
    stages: str = "auto",
    decoder: DecoderName | None = None,
    verbose: bool = False,
    retry_crashed: bool = False,
) -> dict[str, Any]:
    """Predict every video of ``inputs`` into ``out``; returns the run's summary (see the module docstring).

    ``clips`` (default: the model's ``train.eval_clips``) x ``crops`` are the views averaged. ``stages``:
    ``fused`` (one actor per CPU decodes and predicts), ``two`` (decode tasks feeding model actors)
    or ``auto`` (fused on CPU-only clusters, two where there are GPUs). ``decoder`` (default: the one the
    model's training data was decoded with) reads the videos. ``actors`` caps the model actor
    pool (default: one per GPU; fused: one per CPU; two stages on CPUs: one); ``actor_cpus``: the CPUs
    a model actor of the two-stage layout reserves on a CPU-only cluster. ``verbose``: Ray's own lines on
    the console (vidray.cluster.console_settings). ``retry_crashed`` (``--retry-crashed``): predict again the
    videos that killed their decoder's worker last time; without it their rejections are reused.
    """
    started = time.monotonic()
    if top_k < 1:
        raise UserError(f"--top-k must be >= 1, got {top_k}")
    for option, value, least in (("--batch-size", batch_size, 1), ("--videos-per-chunk", videos_per_chunk, 1),
                                 ("--actors", actors, 1), ("--actor-cpus", actor_cpus, 0)):  # fmt: skip
        if value is not None and value < least:  # before Ray starts (a pool of -1 actors failed inside Ray Data)
            raise UserError(f"{option} must be >= {least}, got {value}")
    resolve_stages(stages, 0)  # a bad value fails before anything starts
    model_dir = Path(model_dir).resolve()
    if not model_dir.is_dir():
        raise UserError(f"--model {model_dir} does not exist (pass a directory written by `vidray export` or a checkpoint)")
    info = read_checkpoint_info(model_dir)
    # Here, not only where the model actors load it: held_parts would first delete an earlier run's output.
    refuse_pretraining_checkpoint(model_dir)
    shape = clip_shape_of(info)
    decoder = chosen_decoder(decoder, shape.decoder)
    views = Views(eval_clips_of(info) if clips is None else clips, crops)
    paths = discover(inputs)
    if not paths:
        raise UserError(f"no videos in {' '.join(map(str, inputs))}")
    settings = {"model": model_fingerprint(model_dir), "clips": views.clips, "crops": views.crops,
                "top_k": top_k, "embeddings": embeddings}  # fmt: skip
    if decoder != shape.decoder:  # the model's own decoder is in its fingerprint: parts written before stay valid
        settings["decoder"] = decoder
    fs, root = open_filesystem(out)
    try:
        fs.create_dir(join_uri(root, PARTS_DIR), recursive=True)
    except OSError as err:
        raise UserError(f"cannot write predictions to {out} ({err}); pass --out a writable directory") from None
    # One driver per output folder: a second one would predict the same chunks, or delete this one's
    # parts as another settings' (vidray/folder_lock.py).
    with FolderLock(out, "vidray predict", instead="pass --out another folder"):
        stamps = {path: stamp(path) for path in paths}  # before any decoding: a file changed meanwhile is redone
        held = held_parts(fs, root, settings, stamps, retry_crashed)
        reused = sum(len(c.paths) for c in held)
        held_paths = {path for chunk in held for path in chunk.paths}
        rest = [path for path in paths if path not in held_paths]
        # Sized by the videos to predict, not the corpus: a few new videos are cut as finely as a small corpus.
        per_chunk = videos_per_chunk or max(1, min(VIDEOS_PER_CHUNK, -(-len(rest) // MIN_CHUNKS)))
        todo = plan_chunks(rest, settings, per_chunk, stamps)
        progress = _Progress(len(paths), reused)
        if todo:
            init_ray(verbose=verbose, include_dashboard=False)  # a local cluster for this command alone: no dashboard to start
            args = {
                "model_dir": str(model_dir), "top_k": top_k, "clips": views.clips, "crops": views.crops,
                "embeddings": embeddings, "batch_size": batch_size, "actors": actors, "actor_cpus": actor_cpus, "stages": stages,
                "settings": DecodeSettings(shape.stored_frames, shape.stored_size, decoder),
                "crash_on": os.environ.get(CRASH_ON_ENV) or None,
                # For a model actor on a node without model_dir: one copy in the object store, fetched once per node.
                "shipped": ray.put(shipped_model(model_dir)),
            }  # fmt: skip
            written = _run_chunks(todo, fs, root, args, progress)
            lost = [c for c in todo if c.id not in written]
            if lost:
                print(f"vidray predict: {len(lost)} chunk task(s) died; re-running their videos one per task",
                      file=sys.stderr, flush=True)  # fmt: skip
                _isolate_crashes(lost, fs, root, args, progress)
        counts = assemble(fs, root, in_discovery_order(held + todo, paths), embeddings, settings, str(model_dir))
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
        "decoder": decoder,
        "embeddings": embeddings,
    }
