"""The files of a dataset directory: written atomically, checked, cleared of what a run does not own.

Layout (``DIR`` may be a local path or an s3:// / gs:// URI)::

    DIR/{train,val,test}/shard-<id>.parquet   processed videos (vidray.data.dataset.SHARD_SCHEMA)
    DIR/_shards/shard-<id>.json               per-video outcomes of a finished shard, its node and decode time
    DIR/rejects.parquet, DIR/rejects.csv      every rejected video and why
    DIR/dataset.json                          written last: present == complete and consistent

Every file goes in under a dot-name first and is renamed into place
(:func:`vidray.storage.write_atomically`), so a killed writer never leaves half a file that
looks like data. :func:`clear_stale` deletes what does not belong to a run's
plan (vidray/data/shards.py explains the ids), once :func:`find_stale` has found
it and the records of the shards already finished. A run that finds nothing to
change changes nothing (:func:`is_written`).
"""

from __future__ import annotations

import json
import sys
import time
import uuid
from pathlib import Path

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.config import StoreName
from vidray.config import SPLITS
from vidray.data.clip import MissingVideoError
from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA
from vidray.data.shards import RECORDS_DIR, Shard, Video
from vidray.errors import UserError
from vidray.storage import join_uri, load_json, open_filesystem, write_atomically

# The error of a video whose decoder killed its worker (a crash in a decoding library, an OOM kill, a lost
# node): the one rejection that need not recur, so --retry-crashed tries it again (find_stale).
WORKER_CRASH = "worker_crash"


def crash_hint(crashed: int) -> str:
    """What a run's closing line adds when ``crashed`` videos killed their decoder's worker (preprocessing's, and
    `vidray predict --out`'s, which keep them rejected on a rerun too)."""
    return f"; {crashed} killed their decoder's worker: --retry-crashed tries those again" if crashed else ""


ROW_GROUP_BYTES = 32 * 2**20

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


# An outcome row (:func:`outcome_row`) tagged with its shard, as write_shard returns it.
OUTCOME_COLUMNS = (
    "shard", "path", "video_id", "split", "label", "label_index",
    "status", "error", "reason", "source_frames", "padded", "stored_bytes",
)  # fmt: skip


def outcome_row(video: Video, status: str = "processed", error: str = "", reason: str = "", **decoded) -> dict:
    """One video's line in its shard record (and, when rejected, in rejects.parquet)."""
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


def write_shard(
    out: str,
    shard: Shard,
    outcomes: list[tuple[dict, bytes | None]],
    decode_seconds: float | None = None,
    store: StoreName = "raw",
    started_at: float | None = None,
) -> list[dict]:
    """Write the shard's Parquet file (processed videos only; none if all were
    rejected), then its record. Returns the outcome rows, tagged with the shard id.

    ``store``: how the ``video`` blobs are stored (vidray/data/store.py); a compressed
    store's blobs are written without Parquet's zstd, which would only cost time on JPEGs.
    ``started_at``: when the task started on the shard (``time.time()``), for the record's timeline."""
    write_started = time.perf_counter()
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
                compression={name: "none" if name == "video" and store != "raw" else "zstd" for name in SHARD_SCHEMA.names},
                use_dictionary=False,
                # Min/max statistics of megabyte-sized video blobs would bloat the footer.
                write_statistics=[name for name in SHARD_SCHEMA.names if name != "video"],
            )

        write_atomically(fs, join_uri(root, shard.parquet_name), write_parquet)

    # stored_bytes: what the clip takes in the shard (its store's size), 0 when rejected.
    rows = [{**row, "shard": shard.id, "stored_bytes": len(frames) if frames is not None else 0} for row, frames in outcomes]
    record = {
        "shard": shard.id,
        "split": shard.split,
        "file": shard.parquet_name if processed else None,
        # Where and how fast it was decoded: how the work spread over a cluster's nodes.
        "node_id": _ray_node_id(),
        "decode_seconds": None if decode_seconds is None else round(decode_seconds, 3),
        # The task's span in wall-clock time and its Parquet write: where a run's time went
        # between tasks (benchmarks/preprocess.py reads them).
        "write_seconds": round(time.perf_counter() - write_started, 3),
        "started_at": started_at,
        "finished_at": time.time(),
        "videos": rows,
    }

    def write_record(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            f.write(json.dumps(record, indent=1).encode())

    write_atomically(fs, join_uri(root, shard.record_name), write_record)
    return rows


def _ray_node_id() -> str | None:
    # A process Ray runs in has imported it; one that never did (a benchmark writing shards itself,
    # on a machine without Ray) is on no node.
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def _list(fs: pafs.FileSystem, directory: str) -> list[pafs.FileInfo]:
    return [i for i in fs.get_file_info(pafs.FileSelector(directory, allow_not_found=True)) if i.is_file]


def find_stale(
    fs: pafs.FileSystem, root: str, shards: list[Shard], retry_crashed: bool = False
) -> tuple[dict[str, list[dict]], list[str]]:
    """(the records of this plan's finished shards, the files that do not belong to it: foreign shards and
    records, unreadable records, leftover temporaries). It only reads: :func:`clear_stale` deletes.
    ``retry_crashed``: a shard with a video that killed its worker (``worker_crash``) is not finished. Nor is one
    whose record says a video was not found where the plan's stamp of it says it is there (:func:`_missing_there`)."""
    wanted = {s.id: s for s in shards}
    stale, present_parquet = [], set()
    for split in SPLITS:
        for info in _list(fs, join_uri(root, split)):
            name = info.base_name
            shard_id = name.removeprefix("shard-").removesuffix(".parquet")
            ours = name.startswith("shard-") and name.endswith(".parquet")
            if ours and shard_id in wanted and wanted[shard_id].split == split:
                present_parquet.add(f"{split}/{name}")
            elif ours or (name.startswith(".shard-") and name.endswith(".tmp")):
                stale.append(info.path)

    finished, unseen = {}, 0
    for info in _list(fs, join_uri(root, RECORDS_DIR)):
        shard_id = info.base_name.removeprefix("shard-").removesuffix(".json")
        if info.base_name.startswith(".") or shard_id not in wanted:
            stale.append(info.path)
            continue
        record = load_json(fs, info.path)
        if record is None:
            stale.append(info.path)  # unreadable: decode the shard again
            continue
        # A record without its Parquet file (deleted by hand) means: decode again.
        crashed = retry_crashed and any(row.get("error") == WORKER_CRASH for row in record["videos"])
        unseen += (missing_there := _missing_there(wanted[shard_id], record["videos"]))
        if crashed or missing_there:
            # Decoded again: its files go first, or a retry that processes none of its videos (no Parquet
            # written) would leave the old one beside a record that says the shard has none.
            stale += [info.path, *([join_uri(root, record["file"])] if record["file"] in present_parquet else [])]
            continue
        if record["file"] is None or record["file"] in present_parquet:
            finished[shard_id] = record["videos"]
    if unseen:  # decoded again on every run while it lasts: say why, or it looks like a dataset that never settles
        print(f"vidray preprocess: decoding {unseen} shard(s) again: their tasks did not find a video this machine sees "
              "(a node without the videos' mount?)", file=sys.stderr, flush=True)  # fmt: skip
    return finished, stale


# The `missing` reasons (vidray.data.video.check_file) that say no file was there, which the driver's stamp of one
# that was contradicts: its task did not see what the driver did. The others ("not a regular file": a folder, a
# FIFO; "not readable") say what the stamped file is, and stand until its stamp changes: retried, they were rejected
# again on every run. (vidray/infer/corpus.py decides the same for `vidray predict --out`'s parts.)
NOT_FOUND_REASONS = ("file not found", "dangling symlink")


def _missing_there(shard: Shard, rows: list[dict]) -> bool:
    """Whether a video of ``shard`` was rejected as not found by its decode task while the driver, planning
    ``shard``, found it (its stamp's size >= 0): a node without the videos' mount (a folder on the head's disk only),
    an NFS hiccup. The shard's id does not change, since the driver still sees the file, so its record would be
    reused for ever; decoded again, it is read wherever its task runs this time. (`vidray predict --out` does the
    same: vidray/infer/corpus.py, _unexplained_missing.) A video the driver does not find either (size -1) stays
    rejected: its stamp, and with it the shard's id, changes once it is back."""
    seen = {video.path for video in shard.videos if video.size >= 0}
    return any(
        row.get("error") == MissingVideoError.code and str(row.get("reason")).startswith(NOT_FOUND_REASONS)
        and row.get("path") in seen
        for row in rows
    )  # fmt: skip


def clear_stale(fs: pafs.FileSystem, root: str, stale: list[str]) -> None:
    """Delete dataset.json first (until a run writes it again, the directory is not a dataset), then ``stale``."""
    for path in [join_uri(root, DATASET_INFO), *stale]:
        try:
            fs.delete_file(path)
        except FileNotFoundError:
            pass


# dataset.json's fields that describe the run that wrote it, not the dataset.
RUN_FIELDS = ("seconds", "decoded_this_run", "shards_reused", "shards_written")


def is_written(fs: pafs.FileSystem, root: str, info: dict) -> bool:
    """Whether dataset.json and the rejects are in place and dataset.json says what ``info`` says of the
    dataset (:data:`RUN_FIELDS` aside). A rerun that changes nothing then rewrites nothing: a second run
    on the same dataset (a `vidray pretrain` beside a `vidray train`, each preparing it first) never finds
    dataset.json gone, as it did while every run deleted and rewrote it."""
    written = load_json(fs, join_uri(root, DATASET_INFO))
    if not isinstance(written, dict):
        return False
    rejects = fs.get_file_info([join_uri(root, "rejects.parquet"), join_uri(root, "rejects.csv")])
    if any(r.type != pafs.FileType.File for r in rejects):
        return False

    def dataset_part(fields: dict) -> dict:
        return json.loads(json.dumps({k: v for k, v in fields.items() if k not in RUN_FIELDS}))

    return dataset_part(written) == dataset_part(info)


def check_writable(fs: pafs.FileSystem, root: str, out: str) -> None:
    probe = join_uri(root, f".vidray-write-test-{uuid.uuid4().hex[:8]}")
    try:
        fs.create_dir(root, recursive=True)
        with fs.open_output_stream(probe) as f:
            f.write(b"ok")
        fs.delete_file(probe)
    except OSError as err:
        raise UserError(f"cannot write the dataset to {out} ({err}); pass --out a writable directory") from None


def write_rejects(fs: pafs.FileSystem, root: str, rejected: list[dict]) -> None:
    table = pa.Table.from_pylist([{c: r[c] for c in REJECTS_SCHEMA.names} for r in rejected], schema=REJECTS_SCHEMA)
    write_atomically(fs, join_uri(root, "rejects.parquet"), lambda tmp: pq.write_table(table, tmp, filesystem=fs))

    def write_csv(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            pacsv.write_csv(table, f)

    write_atomically(fs, join_uri(root, "rejects.csv"), write_csv)


def write_text(fs: pafs.FileSystem, path: str, text: str) -> None:
    with fs.open_output_stream(path) as f:
        f.write(text.encode())


def inside_job_copy(path: str) -> bool:
    """Whether ``path`` (a relative one: from the working directory) lies in the working-directory copy that a
    `ray job submit --working-dir` job runs in. Ray unpacks that copy under .../runtime_resources/working_dir_files/
    and deletes it, with whatever was written inside it, relative path or absolute. (Here, not in vidray/cluster.py,
    which imports Ray: preprocessing warns with it before deciding whether it needs Ray, and train imports data.)"""
    cwd = Path.cwd()  # the real path (os.getcwd): compared with the resolved ``path``
    if "runtime_resources" not in cwd.parts or "://" in str(path):
        return False
    return Path(path).expanduser().resolve().is_relative_to(cwd)
