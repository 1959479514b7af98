"""Decode a manifest's videos into the sharded Parquet dataset, on Ray Data.

Output (``DIR`` may be a local path or an s3:// / gs:// URI)::

    DIR/{train,val,test}/shard-<id>.parquet   processed videos (vidray.dataset.SHARD_SCHEMA)
    DIR/_shards/shard-<id>.json               per-video outcomes of a finished shard, its node and decode time
    DIR/rejects.parquet, DIR/rejects.csv      every rejected video and why
    DIR/dataset.json                          written last: present == complete and consistent

Videos are grouped per split into shards of about ``videos_per_shard``. A
shard's id hashes its videos (path, size, mtime, label, split) and the decode
parameters, so:

* **resume** - a shard whose ``_shards`` record exists is finished and skipped;
  a killed run, re-run, decodes only the shards it had not finished;
* **no mixing** - shards of another manifest or other parameters have other
  ids and are deleted when a run starts (with the old ``dataset.json``), so a
  dataset directory always holds exactly one manifest + parameters.

Shard boundaries are cut where a video id's hash says so (content-defined, not
every N videos), so adding or removing a video changes only the shard it falls
in (rarely a neighbour too): after downloading more videos, a re-run decodes
little more than the new ones.

Fault isolation: one Ray Data task decodes one shard. A file that fails to
decode is rejected with its reason and never stops the run. A decoder that
kills its worker process (segfault) loses only its shard's task; such shards
are re-run one video per Ray task, the video whose task dies is rejected with
"decoder crashed the worker", and the others are written as usual. (Like any
reject, it stays rejected on resume; delete its ``_shards`` record to retry.)

Every manifest row is decoded, including rows with a ``probe_error``: the
decoder's verdict (a typed :class:`vidray.video.VideoError`) is the reason
recorded. Invariant, checked before ``dataset.json`` is written:
processed + rejected == discovered.

Test-only fault injection: when the environment of the process calling
:func:`preprocess` has ``VIDRAY_TEST_CRASH_ON=<substring>``, the decode task
calls ``os._exit(1)`` (a real worker death, like a segfault) on every video
whose path contains that substring.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.dataset import DATASET_INFO, SHARD_SCHEMA, SPLITS
from vidray.errors import UserError
from vidray.storage import join_uri, open_filesystem

# One shard is one Parquet file and one Ray task: enough shards to keep every CPU of a
# cluster busy to the end (COIN-12's 1,024 videos: 128), files still ~12 MB at 16x112².
VIDEOS_PER_SHARD = 8
# Part of every shard id: bump when decoding changes so old shards are rebuilt.
DECODE_VERSION = 2  # 2: PyAV decoding (swscale resize) instead of decord
ROW_GROUP_BYTES = 32 * 2**20
RECORDS_DIR = "_shards"
CRASH_ON_ENV = "VIDRAY_TEST_CRASH_ON"
WORKER_CRASH_REASON = "decoder crashed the worker"

REJECTS_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("video_id", pa.string()),
        ("split", pa.string()),
        ("label", pa.string()),
        ("error", pa.string()),  # stable category, e.g. not_a_video, corrupt, worker_crash
        ("reason", pa.string()),
    ]
)


@dataclass(frozen=True)
class Video:
    path: str
    video_id: str
    label: str
    label_index: int
    split: str
    size: int  # bytes, -1 when the file cannot be stat'ed (it will be rejected)
    mtime_ns: int


@dataclass(frozen=True)
class Shard:
    id: str
    split: str
    videos: tuple[Video, ...]

    def to_json(self) -> str:
        return json.dumps({"id": self.id, "split": self.split, "videos": [asdict(v) for v in self.videos]})

    @staticmethod
    def from_json(text: str) -> Shard:
        raw = json.loads(text)
        return Shard(raw["id"], raw["split"], tuple(Video(**v) for v in raw["videos"]))

    @property
    def parquet_name(self) -> str:
        return f"{self.split}/shard-{self.id}.parquet"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/shard-{self.id}.json"


# --- planning ----------------------------------------------------------------


def load_videos(manifest: Path) -> tuple[list[Video], list[str]]:
    """Manifest rows as :class:`Video` (with size and mtime) and the class list."""
    from vidray.index import read_manifest

    frame, classes = read_manifest(manifest)
    if frame.empty:
        raise UserError(f"manifest {manifest} lists no videos: index a folder that holds some")
    bad_split = sorted(set(frame["split"]) - set(SPLITS))
    if bad_split:
        raise UserError(f"manifest {manifest}: split {bad_split[0]!r} is not one of {', '.join(SPLITS)}")
    duplicated = frame["path"][frame["path"].duplicated()]
    if len(duplicated):
        raise UserError(
            f"manifest {manifest} lists {duplicated.iloc[0]} more than once; each video belongs to one split"
        )

    videos = []
    for row in frame.itertuples(index=False):
        if classes[int(row.label_index)] != row.label:
            raise UserError(
                f"manifest {manifest}: {row.path} has label {row.label!r} but label_index {row.label_index} "
                f"is {classes[int(row.label_index)]!r}; re-run `vidray index`"
            )
        try:
            stat = os.stat(row.path)
            size, mtime_ns = stat.st_size, stat.st_mtime_ns
        except OSError:
            size, mtime_ns = -1, -1
        videos.append(
            Video(str(row.path), str(row.video_id), row.label, int(row.label_index), row.split, size, mtime_ns)
        )
    return videos, classes


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_id(videos: list[Video], stored_frames: int, stored_size: int) -> str:
    """``<order key>-<content hash>``.

    Readers list a split's files by name, so the order key (a hash of the first
    video's id) fixes the row order from the videos alone: the same videos give
    the same order wherever they live and whenever they were copied, and so the
    same training run. The content hash (paths, sizes, mtimes, parameters)
    decides whether a finished shard can be reused.
    """
    payload = json.dumps(
        {
            "decode_version": DECODE_VERSION,
            "stored_frames": stored_frames,
            "stored_size": stored_size,
            "videos": [asdict(v) for v in videos],
        },
        sort_keys=True,
    )
    return f"{_stable_hash(videos[0].video_id)[:8]}-{_stable_hash(payload)[:20]}"


def _ends_shard(video: Video, videos_per_shard: int) -> bool:
    # The id, not the path: boundaries must not depend on where the videos are stored.
    return int(_stable_hash(video.video_id)[:8], 16) % videos_per_shard == 0


def plan_shards(videos: list[Video], stored_frames: int, stored_size: int, videos_per_shard: int) -> list[Shard]:
    """Shards of one split each, ``videos_per_shard`` long on average.

    Within a split, videos are ordered by id and a shard ends after a video
    whose id hash is 0 mod ``videos_per_shard`` (but holds at least a quarter
    and at most twice that many), so boundaries move only where videos change.
    """
    shards = []
    for split in SPLITS:
        current: list[Video] = []
        group = sorted((v for v in videos if v.split == split), key=lambda v: (v.video_id, v.path))
        for index, video in enumerate(group):
            current.append(video)
            last = index == len(group) - 1
            if (
                last
                or len(current) >= 2 * videos_per_shard
                or (len(current) >= videos_per_shard // 4 and _ends_shard(video, videos_per_shard))
            ):
                shards.append(Shard(_shard_id(current, stored_frames, stored_size), split, tuple(current)))
                current = []
    return shards


# --- decoding and writing one shard (runs in Ray workers) -----------------------


def _outcome(video: Video, status: str = "processed", error: str = "", reason: str = "", **decoded) -> dict:
    row = {
        "path": video.path,
        "video_id": video.video_id,
        "split": video.split,
        "label": video.label,
        "label_index": video.label_index,
        "status": status,
        "error": error,
        "reason": reason,
        "source_frames": -1,
        "padded": False,
    }
    return {**row, **decoded}


def _decode_video(
    video: Video, stored_frames: int, stored_size: int, crash_on: str | None
) -> tuple[dict, bytes | None]:
    """(outcome row, frame bytes or None). Never raises for a bad file."""
    import av.logging

    from vidray.video import VideoError, read_clip

    # FFmpeg's per-packet complaints about a broken file would flood the driver's
    # log from every worker; the reason that matters is recorded in the rejects.
    av.logging.set_level(None)
    if crash_on and crash_on in video.path:
        os._exit(1)  # test-only: see CRASH_ON_ENV in the module docstring
    try:
        # One decoder thread: Ray already runs one task per core.
        clip = read_clip(video.path, stored_frames, stored_size, num_threads=1)
    except VideoError as err:
        return _outcome(video, "rejected", err.code, err.reason), None
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the run; its reason is recorded
        reason = f"unexpected decoder error: {type(err).__name__}: {err}"[:300]
        return _outcome(video, "rejected", "decode_error", reason), None
    return _outcome(video, source_frames=clip.source_frames, padded=clip.padded), clip.frames.tobytes()


def _write_atomically(fs: pafs.FileSystem, path: str, write) -> None:
    # Readers skip dot-files, so a half-written temporary never looks like data.
    directory, name = path.rsplit("/", 1)
    tmp = f"{directory}/.{name}.{uuid.uuid4().hex[:8]}.tmp"
    fs.create_dir(directory, recursive=True)
    try:
        write(tmp)
        fs.move(tmp, path)
    except BaseException:
        try:
            fs.delete_file(tmp)
        except OSError:
            pass
        raise


def write_shard(
    out: str, shard: Shard, outcomes: list[tuple[dict, bytes | None]], decode_seconds: float | None = None
) -> list[dict]:
    """Write the shard's Parquet file (processed videos only; none if all were
    rejected), then its record. Returns the outcome rows, tagged with the shard id."""
    fs, root = open_filesystem(out)
    processed = [(row, frames) for row, frames in outcomes if frames is not None]
    if processed:
        table = pa.Table.from_pydict(
            {
                "video": [frames for _, frames in processed],
                "label": [row["label_index"] for row, _ in processed],
                "label_name": [row["label"] for row, _ in processed],
                "video_id": [row["video_id"] for row, _ in processed],
                "path": [row["path"] for row, _ in processed],
                "source_frames": [row["source_frames"] for row, _ in processed],
                "padded": [row["padded"] for row, _ in processed],
            },
            schema=SHARD_SCHEMA,
        )
        rows_per_group = max(1, ROW_GROUP_BYTES // len(processed[0][1]))

        def write_parquet(tmp: str) -> None:
            pq.write_table(
                table,
                tmp,
                filesystem=fs,
                row_group_size=rows_per_group,
                compression="zstd",
                use_dictionary=False,
                # Min/max statistics of megabyte-sized video blobs would bloat the footer.
                write_statistics=[name for name in SHARD_SCHEMA.names if name != "video"],
            )

        _write_atomically(fs, join_uri(root, shard.parquet_name), write_parquet)

    rows = [{**row, "shard": shard.id} for row, _ in outcomes]
    record = {
        "shard": shard.id,
        "split": shard.split,
        "file": shard.parquet_name if processed else None,
        # Where and how fast it was decoded: how the work spread over a cluster's nodes.
        "node_id": _ray_node_id(),
        "decode_seconds": None if decode_seconds is None else round(decode_seconds, 3),
        "videos": rows,
    }

    def write_record(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())

    _write_atomically(fs, join_uri(root, shard.record_name), write_record)
    return rows


def _ray_node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


OUTCOME_COLUMNS = (
    "shard", "path", "video_id", "split", "label", "label_index",
    "status", "error", "reason", "source_frames", "padded",
)  # fmt: skip


def decode_shards(batch: dict[str, Any], out: str, stored_frames: int, stored_size: int, crash_on: str | None):
    """Ray Data UDF: each row of ``batch`` is one shard (as JSON); decode and
    write it, return one outcome row per video."""
    rows: list[dict] = []
    for text in batch["shard"]:
        shard = Shard.from_json(str(text))
        started = time.perf_counter()
        outcomes = [_decode_video(v, stored_frames, stored_size, crash_on) for v in shard.videos]
        rows.extend(write_shard(out, shard, outcomes, decode_seconds=time.perf_counter() - started))
    return {column: [row[column] for row in rows] for column in OUTCOME_COLUMNS}


# --- the run -----------------------------------------------------------------


def _run_shards(shards: list[Shard], out: str, stored_frames: int, stored_size: int, crash_on: str | None):
    """{shard id: outcome rows} for the shards whose task finished."""
    import ray.data
    from ray.util.annotations import RayDeprecationWarning

    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    with warnings.catch_warnings():
        # Ray 2.60 deprecates **ray_remote_args but has no named max_retries yet.
        warnings.simplefilter("ignore", RayDeprecationWarning)
        ds = ds.map_batches(
            decode_shards,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"out": out, "stored_frames": stored_frames, "stored_size": stored_size, "crash_on": crash_on},
            num_cpus=1,
            # Ray Data retries tasks forever by default, and a decoder that
            # segfaults on a file does so every time. One retry covers a lost
            # node; after that _isolate_crashes takes the shard over.
            max_retries=1,
        )
    ds.context.max_errored_blocks = -1  # a failed shard is recovered below, never fatal
    results: dict[str, list[dict]] = {}
    for row in ds.take_all():
        results.setdefault(row["shard"], []).append({c: _plain(row[c]) for c in OUTCOME_COLUMNS})
    return results


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _isolate_crashes(shards: list[Shard], out: str, stored_frames: int, stored_size: int, crash_on: str | None):
    """Re-run lost shards one video per task; a task whose worker dies marks its video."""
    import ray

    decode_one = ray.remote(num_cpus=1, max_retries=0)(_decode_video)
    results = {}
    for shard in shards:  # one shard at a time bounds the driver's memory to one shard
        refs = [decode_one.remote(v, stored_frames, stored_size, crash_on) for v in shard.videos]
        outcomes = []
        for video, ref in zip(shard.videos, refs):
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayError as err:
                reason = f"{WORKER_CRASH_REASON} ({type(err).__name__})"
                outcomes.append((_outcome(video, "rejected", "worker_crash", reason), None))
        results[shard.id] = write_shard(out, shard, outcomes)
    return results


def _list(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)) if i.is_file]


def _clear_stale(fs: pafs.FileSystem, root: str, shards: list[Shard]) -> dict[str, list[dict]]:
    """Delete what does not belong to this plan (old dataset.json first, then
    foreign shards and leftover temporaries); return the records of finished shards."""
    try:
        fs.delete_file(join_uri(root, DATASET_INFO))
    except FileNotFoundError:
        pass
    wanted = {s.id: s for s in shards}
    present_parquet = set()
    for split in SPLITS:
        for info in _list(fs, join_uri(root, split)):
            name = info.base_name
            shard_id = name.removeprefix("shard-").removesuffix(".parquet")
            ours = name.startswith("shard-") and name.endswith(".parquet")
            if ours and shard_id in wanted and wanted[shard_id].split == split:
                present_parquet.add(f"{split}/{name}")
            elif ours or (name.startswith(".shard-") and name.endswith(".tmp")):
                fs.delete_file(info.path)

    finished = {}
    for info in _list(fs, join_uri(root, RECORDS_DIR)):
        shard_id = info.base_name.removeprefix("shard-").removesuffix(".json")
        if info.base_name.startswith(".") or shard_id not in wanted:
            fs.delete_file(info.path)
            continue
        try:
            with fs.open_input_stream(info.path) as f:
                record = json.loads(f.read())
        except (OSError, ValueError):
            fs.delete_file(info.path)  # unreadable: decode the shard again
            continue
        # A record without its Parquet file (deleted by hand) means: decode again.
        if record["file"] is None or record["file"] in present_parquet:
            finished[shard_id] = record["videos"]
    return finished


def _check_writable(fs: pafs.FileSystem, root: str, out: str) -> None:
    probe = join_uri(root, f".vidray-write-test-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise UserError(f"cannot write the dataset to {out} ({err}); pass --out a writable directory") from None


def _write_rejects(fs: pafs.FileSystem, root: str, rejected: list[dict]) -> None:
    table = pa.Table.from_pylist([{c: r[c] for c in REJECTS_SCHEMA.names} for r in rejected], schema=REJECTS_SCHEMA)
    _write_atomically(fs, join_uri(root, "rejects.parquet"), lambda tmp: pq.write_table(table, tmp, filesystem=fs))

    def write_csv(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            pacsv.write_csv(table, f)

    _write_atomically(fs, join_uri(root, "rejects.csv"), write_csv)


def default_stored(frames: int, size: int, stored_frames: int | None, stored_size: int | None) -> tuple[int, int]:
    """Stored frames default to 2x frames, stored size to 8/7 x size (112 -> 128)."""
    stored_frames = 2 * frames if stored_frames is None else stored_frames
    stored_size = round(size * 8 / 7) if stored_size is None else stored_size
    if frames < 1 or size < 1:
        raise UserError(f"frames ({frames}) and size ({size}) must be positive")
    if stored_frames < frames:
        raise UserError(f"stored_frames ({stored_frames}) must be >= frames ({frames})")
    if stored_size < size:
        raise UserError(f"stored_size ({stored_size}) must be >= size ({size})")
    return stored_frames, stored_size


def preprocess(
    manifest: Path,
    out: str,
    frames: int = 16,
    size: int = 112,
    stored_frames: int | None = None,
    stored_size: int | None = None,
    videos_per_shard: int = VIDEOS_PER_SHARD,
) -> dict[str, Any]:
    """Decode every video of ``manifest`` into the dataset directory ``out``.

    Returns the summary written to ``out/dataset.json`` (with ``dataset_dir``
    added). Besides the dataset's counts it holds this run's
    ``decoded_this_run``, ``shards_reused`` and ``shards_written``:
    re-running with the same manifest and parameters decodes nothing.
    """
    from vidray.cluster import init_ray

    started = time.monotonic()
    manifest = Path(manifest)
    stored_frames, stored_size = default_stored(frames, size, stored_frames, stored_size)
    if videos_per_shard < 1:
        raise UserError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    videos, classes = load_videos(manifest)
    fs, root = open_filesystem(out)
    _check_writable(fs, root, out)

    shards = plan_shards(videos, stored_frames, stored_size, videos_per_shard)
    outcomes = _clear_stale(fs, root, shards)
    todo = [s for s in shards if s.id not in outcomes]
    reused = len(outcomes)
    if todo:
        init_ray()
        crash_on = os.environ.get(CRASH_ON_ENV) or None
        finished = _run_shards(todo, out, stored_frames, stored_size, crash_on)
        crashed = [s for s in todo if s.id not in finished]
        if crashed:
            print(
                f"vidray preprocess: {len(crashed)} shard task(s) died; re-running their videos one per task",
                file=sys.stderr,
                flush=True,
            )
            finished.update(_isolate_crashes(crashed, out, stored_frames, stored_size, crash_on))
        outcomes.update(finished)

    summary = {
        "classes": classes,
        "frames": frames,
        "size": size,
        "stored_frames": stored_frames,
        "stored_size": stored_size,
        "manifest": str(manifest.resolve()),
        "manifest_sha256": hashlib.sha256(manifest.read_bytes()).hexdigest(),
        **_count(shards, outcomes, classes, discovered=len(videos)),
        "seconds": round(time.monotonic() - started, 2),
        "decoded_this_run": sum(len(s.videos) for s in todo),
        "shards_reused": reused,
        "shards_written": len(todo),
    }
    rejected = [row for s in shards for row in outcomes[s.id] if row["status"] == "rejected"]
    _write_rejects(fs, root, rejected)
    _write_atomically(
        fs,
        join_uri(root, DATASET_INFO),
        lambda tmp: _write_text(fs, tmp, json.dumps(summary, indent=2)),
    )
    print(
        f"vidray preprocess: {summary['discovered']} videos -> {summary['processed']} processed "
        f"({summary['padded']} padded), {summary['rejected']} rejected"
        + (f" (see {join_uri(out, 'rejects.csv')})" if rejected else "")
        + f"; decoded {summary['decoded_this_run']}, reused {reused}/{len(shards)} shards; "
        f"{summary['seconds']} s -> {out}",
        file=sys.stderr,
        flush=True,
    )
    return {"dataset_dir": str(out), **summary}


def _write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def _count(shards: list[Shard], outcomes: dict[str, list[dict]], classes: list[str], discovered: int) -> dict:
    rows = [row for s in shards for row in outcomes[s.id]]
    processed = [r for r in rows if r["status"] == "processed"]
    rejected = [r for r in rows if r["status"] == "rejected"]
    if len(processed) + len(rejected) != discovered or len(rows) != discovered:
        raise RuntimeError(
            f"internal error: {len(processed)} processed + {len(rejected)} rejected != {discovered} discovered"
        )
    splits = {}
    for split in SPLITS:
        per_class = Counter(r["label"] for r in processed if r["split"] == split)
        splits[split] = {"videos": sum(per_class.values()), "per_class": {c: per_class.get(c, 0) for c in classes}}
    return {
        "splits": splits,
        "discovered": discovered,
        "processed": len(processed),
        "rejected": len(rejected),
        "padded": sum(1 for r in processed if r["padded"]),
        "rejected_by_error": dict(Counter(r["error"] for r in rejected)),
        "shards": [s.parquet_name for s in shards if any(r["status"] == "processed" for r in outcomes[s.id])],
    }
