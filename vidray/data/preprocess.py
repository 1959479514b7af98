"""Decode a manifest's videos into the sharded Parquet dataset, on Ray Data.

Output (``DIR`` may be a local path or an s3:// / gs:// URI)::

    DIR/{train,val,test}/shard-<id>.parquet   processed videos (vidray.data.dataset.SHARD_SCHEMA)
    DIR/_shards/shard-<id>.json               per-video outcomes of a finished shard, its node and decode time
    DIR/rejects.parquet, DIR/rejects.csv      every rejected video and why
    DIR/dataset.json                          written last: present == complete and consistent

Videos are grouped per split into shards of about ``videos_per_shard``
typical videos' worth of decode work (:func:`plan_shards`). A shard's id
hashes its videos (path, size, mtime, label, split) and the decode parameters
(frames, size, decoder and its device), so:

* **resume** - a shard whose ``_shards`` record exists is finished and skipped;
  a killed run, re-run, decodes only the shards it had not finished;
* **no mixing** - shards of another manifest or other parameters have other
  ids and are deleted when a run starts (with the old ``dataset.json``), so a
  dataset directory always holds exactly one manifest + parameters.

Shard boundaries are cut where a video id's hash says so (content-defined, not
every N videos), so adding or removing a video changes only the shard it falls
in (rarely a neighbour too): after downloading more videos, a re-run decodes
little more than the new ones. The hash is weighed by each video's expected
work (frames x displayed pixels, from the index), so a shard of long 720p
videos holds fewer of them than one of short 360p clips, and shards are
started biggest first: the run does not end with one CPU decoding a heavy
shard while the others idle.

Fault isolation: one Ray Data task decodes one shard. A file that fails to
decode is rejected with its reason and never stops the run. A decoder that
kills its worker process (segfault) loses only its shard's task; such shards
are re-run one video per Ray task, the video whose task dies is rejected with
"decoder crashed the worker", and the others are written as usual. (Like any
reject, it stays rejected on resume; delete its ``_shards`` record to retry.)

Every manifest row is decoded, including rows with a ``probe_error``: the
decoder's verdict (a typed :class:`vidray.data.video.VideoError`) is the reason
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
import math
import os
import sys
import time
import uuid
import warnings
from collections import Counter
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA, SPLITS
from vidray.errors import UserError
from vidray.storage import join_uri, open_filesystem
from vidray.data.video import DecodeDevice, DecoderName, DecoderUnavailableError

# One shard is one Parquet file and one Ray task: enough shards to keep every CPU of a
# cluster busy to the end (COIN-12's 1,024 videos: 128), files still ~12 MB at 16x112².
VIDEOS_PER_SHARD = 8
# Part of every shard id: bump when decoding changes so old shards are rebuilt.
DECODE_VERSION = 3  # 2: PyAV decoding (swscale resize) instead of decord; 3: rotation and pixel aspect applied
DEFAULT_DECODER: DecoderName = "pyav"  # least CPU per video of the three (docs/benchmarks.md)
# Expected decode work of a video in pixel-frames (frames x displayed pixels), plus what any
# video costs whatever its length: opening, indexing packets, writing its row (about 2 s of 360p30).
FIXED_WORK = 640 * 360 * 60
# A decode task on a GPU node takes this share of a GPU: NVDEC runs several sessions at once.
GPU_SHARE_PER_DECODE_TASK = 0.25
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
    # Expected decode work (pixel-frames, see FIXED_WORK); 0 when the index has no probe of it.
    # For planning only: not part of the shard id.
    work: float = 0.0


@dataclass(frozen=True)
class DecodeSettings:
    """How every video of a run is decoded; all of it goes into the shard ids."""

    stored_frames: int
    stored_size: int
    decoder: DecoderName = DEFAULT_DECODER
    device: DecodeDevice = "cpu"

    def task_options(self) -> dict[str, Any]:
        """Ray options of one decode task: a CPU (and a share of a GPU when decoding on CUDA),
        spread over the nodes. Ray's default keeps a driver's tasks on its own node while that
        node has room, which left a 1-CPU worker node idle (measured: all 12 shards on the head)."""
        gpu = {"num_gpus": GPU_SHARE_PER_DECODE_TASK} if self.device == "cuda" else {}
        return {"num_cpus": 1, **gpu, "scheduling_strategy": "SPREAD"}


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
    def work(self) -> float:
        return sum(v.work for v in self.videos)

    @property
    def parquet_name(self) -> str:
        return f"{self.split}/shard-{self.id}.parquet"

    @property
    def record_name(self) -> str:
        return f"{RECORDS_DIR}/shard-{self.id}.json"


# --- planning ----------------------------------------------------------------


def load_videos(manifest: Path) -> tuple[list[Video], list[str]]:
    """Manifest rows as :class:`Video` (with size and mtime) and the class list."""
    from vidray.data.index import read_manifest

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
        work = expected_work(row.num_frames, row.width, row.height)
        videos.append(
            Video(str(row.path), str(row.video_id), row.label, int(row.label_index), row.split, size, mtime_ns, work)
        )
    return videos, classes


def expected_work(num_frames, width, height) -> float:
    """Pixel-frames to decode (plus :data:`FIXED_WORK`) from the index's probe; 0 when unprobed.

    Decoding the samples costs about the whole video on real footage (samples
    are closer together than keyframes, docs/benchmarks.md), so work grows with
    frames x pixels.
    """
    values = [num_frames, width, height]
    if any(v is None or v != v or v <= 0 for v in values):  # None, NaN (pandas' missing int) or 0
        return 0.0
    return float(num_frames) * float(width) * float(height) + FIXED_WORK


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_id(videos: list[Video], params: dict[str, Any]) -> str:
    """``<order key>-<content hash>``.

    Readers list a split's files by name, so the order key (a hash of the first
    video's id) fixes the row order from the videos alone: the same videos give
    the same order wherever they live and whenever they were copied, and so the
    same training run. The content hash (paths, sizes, mtimes, the decode
    parameters ``params``: frames, size, decoder and device) decides whether a
    finished shard can be reused: switching decoders decodes again.
    """
    payload = json.dumps(
        {
            "decode_version": DECODE_VERSION,
            **params,
            "videos": [{k: v for k, v in asdict(video).items() if k != "work"} for video in videos],
        },
        sort_keys=True,
    )
    return f"{_stable_hash(videos[0].video_id)[:8]}-{_stable_hash(payload)[:20]}"


def _ends_shard(video: Video, share: float) -> bool:
    """Whether a shard ends after ``video``: with probability ``share`` (its work over the target),
    decided by its id's hash. The id, not the path: boundaries must not depend on where videos live."""
    return int(_stable_hash(video.video_id)[:8], 16) / 2**32 < share


def _target_work(videos: list[Video], videos_per_shard: int) -> float:
    """``videos_per_shard`` typical videos' work: the split's median, rounded to a power of two so
    that adding or removing a few videos does not move the target (and with it every boundary)."""
    known = sorted(v.work for v in videos if v.work > 0)
    typical = known[len(known) // 2] if known else 1.0
    return videos_per_shard * 2.0 ** round(math.log2(typical))


def plan_shards(
    videos: list[Video],
    stored_frames: int,
    stored_size: int,
    videos_per_shard: int,
    decoder: DecoderName = DEFAULT_DECODER,
    decoder_device: DecodeDevice = "cpu",
) -> list[Shard]:
    """Shards of one split each, about ``videos_per_shard`` typical videos' work each.

    Within a split, videos are ordered by id. Once a shard holds half the
    target work, it ends after a video with a probability of that video's
    work over half the target, decided by the video id's hash, so boundaries
    move only where videos change; a shard never exceeds twice the target
    unless one video alone does. Unprobed videos count as typical ones; with
    no probe at all this is about ``videos_per_shard`` videos a shard.
    ``videos_per_shard=1`` is one video per shard.
    """
    params = asdict(DecodeSettings(stored_frames, stored_size, decoder, decoder_device))
    shards = []
    for split in SPLITS:
        group = sorted((v for v in videos if v.split == split), key=lambda v: (v.video_id, v.path))
        if not group:
            continue
        target = _target_work(group, videos_per_shard)
        typical = target / videos_per_shard
        group = [v if v.work > 0 else replace(v, work=typical) for v in group]
        current: list[Video] = []
        work = 0.0

        def close() -> None:
            nonlocal current, work
            shards.append(Shard(_shard_id(current, params), split, tuple(current)))
            current, work = [], 0.0

        for index, video in enumerate(group):
            if current and work >= target / 2 and work + video.work > 2 * target:
                close()  # this video would overflow the shard: it starts the next one
            current.append(video)
            work += video.work
            last = index == len(group) - 1
            if videos_per_shard == 1:  # as fine as it gets: a video per task, whatever its work
                close()
                continue
            # Past half the target, each video ends the shard with a chance of its work over half
            # the target: shards land between 1/2 and 2x the target, ~1x on average.
            if last or work >= 2 * target or (work >= target / 2 and _ends_shard(video, 2 * video.work / target)):
                close()
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


def decode_or_reject(path: str, settings: DecodeSettings, crash_on: str | None = None):
    """(clip, "", "") or (None, error category, reason) for one video file. Never raises for a bad file.

    Shared by preprocessing and corpus prediction (vidray/infer/batch_predict.py), which reject alike.
    """
    import av.logging

    from vidray.data.video import VideoError, read_clip

    # FFmpeg's per-packet complaints about a broken file would flood the driver's
    # log from every worker; the reason that matters is recorded in the rejects.
    av.logging.set_level(None)
    if crash_on and crash_on in path:
        os._exit(1)  # test-only: see CRASH_ON_ENV in the module docstring
    try:
        # One decoder thread: Ray already runs one task per core.
        clip = read_clip(path, settings.stored_frames, settings.stored_size, decoder=settings.decoder,
                         device=settings.device, num_threads=1)  # fmt: skip
    except VideoError as err:
        return None, err.code, err.reason
    except Exception as err:  # noqa: BLE001 - one odd file must not stop the run; its reason is recorded
        return None, "decode_error", f"unexpected decoder error: {type(err).__name__}: {err}"[:300]
    return clip, "", ""


def _decode_video(video: Video, settings: DecodeSettings, crash_on: str | None) -> tuple[dict, bytes | None]:
    """(outcome row, frame bytes or None). Never raises for a bad file."""
    clip, error, reason = decode_or_reject(video.path, settings, crash_on)
    if clip is None:
        return _outcome(video, "rejected", error, reason), None
    return _outcome(video, source_frames=clip.source_frames, padded=clip.padded), clip.frames.tobytes()


def write_atomically(fs: pafs.FileSystem, path: str, write) -> None:
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

        write_atomically(fs, join_uri(root, shard.parquet_name), write_parquet)

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

    write_atomically(fs, join_uri(root, shard.record_name), write_record)
    return rows


def _ray_node_id() -> str | None:
    # A process Ray runs in has imported it; one that never did (a benchmark writing shards itself,
    # on a machine without Ray) is on no node.
    ray = sys.modules.get("ray")
    return ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None


def decode_shard(out: str, shard: Shard, settings: DecodeSettings, crash_on: str | None) -> list[dict]:
    """Decode and write one shard; return one outcome row per video."""
    from vidray.data.video import require_decoder

    # A node without the decoder's package is a set-up problem, not a bad video: fail the run (below).
    require_decoder(settings.decoder, settings.device)
    started = time.perf_counter()
    outcomes = [_decode_video(v, settings, crash_on) for v in shard.videos]
    return write_shard(out, shard, outcomes, decode_seconds=time.perf_counter() - started)


OUTCOME_COLUMNS = (
    "shard", "path", "video_id", "split", "label", "label_index",
    "status", "error", "reason", "source_frames", "padded",
)  # fmt: skip


def decode_shards(batch: dict[str, Any], out: str, settings: DecodeSettings, crash_on: str | None):
    """Ray Data UDF: each row of ``batch`` is one shard (as JSON); decode and write it, return
    one outcome row per video."""
    rows: list[dict] = []
    for text in batch["shard"]:
        rows.extend(decode_shard(out, Shard.from_json(str(text)), settings, crash_on))
    return {column: [row[column] for row in rows] for column in OUTCOME_COLUMNS}


# --- the run -----------------------------------------------------------------

PROGRESS_EVERY_S = 15.0


def _run_shards(shards: list[Shard], out: str, settings: DecodeSettings, crash_on: str | None):
    """{shard id: outcome rows} for the shards whose task finished: one Ray Data task per shard.

    The shards go in biggest first (``shards``' order): the run does not end
    with one CPU decoding a heavy shard while the others idle. Ray Data spreads
    the tasks over the nodes. Its progress bars and per-operator stats cost
    the driver more CPU than anything else it does here, so they are off; one
    line every :data:`PROGRESS_EVERY_S` says how far it got.
    """
    import ray.data

    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    gpu = {"num_gpus": GPU_SHARE_PER_DECODE_TASK} if settings.device == "cuda" else {}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for task retries; the remote-args route it deprecates
        # still works until Ray 2.64 (tests/test_preprocess.py's crash tests fail if it stops).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_shards,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"out": out, "settings": settings, "crash_on": crash_on},
            num_cpus=1,
            # Ray Data retries tasks forever by default, and a decoder that segfaults on a
            # file does so every time. One retry covers a lost node; after that
            # _isolate_crashes takes the shard over, video by video.
            max_retries=1,
            **gpu,
        )
    ds.context.max_errored_blocks = -1  # a failed shard is recovered below, never fatal
    results: dict[str, list[dict]] = {}
    started = reported = time.monotonic()
    for row in ds.iter_rows():
        results.setdefault(row["shard"], []).append({c: _plain(row[c]) for c in OUTCOME_COLUMNS})
        if time.monotonic() - reported >= PROGRESS_EVERY_S:
            reported = time.monotonic()
            done = sum(1 for rows in results.values() if rows)
            print(f"vidray preprocess: {done}/{len(shards)} shards decoded in {reported - started:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip
    return results


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def _decode_checked(video: Video, settings: DecodeSettings, crash_on: str | None) -> tuple[dict, bytes | None]:
    from vidray.data.video import require_decoder

    require_decoder(settings.decoder, settings.device)
    return _decode_video(video, settings, crash_on)


def _isolate_crashes(shards: list[Shard], out: str, settings: DecodeSettings, crash_on: str | None):
    """Re-run lost shards one video per task; a task whose worker dies marks its video.

    A shard is also lost when its node lacks the decoder: that fails the run here, in one line.
    """
    import ray

    decode_one = ray.remote(max_retries=0, **settings.task_options())(_decode_checked)
    results = {}
    for shard in shards:  # one shard at a time bounds the driver's memory to one shard
        refs = [decode_one.remote(v, settings, crash_on) for v in shard.videos]
        outcomes = []
        for video, ref in zip(shard.videos, refs):
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                if isinstance(getattr(err, "cause", None), DecoderUnavailableError):
                    raise DecoderUnavailableError(f"{err.cause} (on a Ray worker node)") from None
                reason = f"{WORKER_CRASH_REASON} ({type(err).__name__})"
                outcomes.append((_outcome(video, "rejected", "worker_crash", reason), None))
            except ray.exceptions.RayError as err:
                reason = f"{WORKER_CRASH_REASON} ({type(err).__name__})"
                outcomes.append((_outcome(video, "rejected", "worker_crash", reason), None))
        results[shard.id] = write_shard(out, shard, outcomes)
    return results


def _check_cuda_workers(settings: DecodeSettings) -> None:
    """Fail the run once, with a one-line reason, when GPU decode tasks cannot run or cannot decode
    (no GPU in the cluster; no CUDA build of torch/torchcodec on the GPU node), instead of
    waiting forever or rejecting every video one by one."""
    import ray

    from vidray.data.video import require_cuda_decoding, require_decoder

    if not ray.cluster_resources().get("GPU"):
        raise UserError(
            "data.decoder_device=cuda but the Ray cluster has no GPU; use data.decoder_device=cpu "
            "(on an autoscaling cluster, start a GPU node first)"
        )

    def check() -> None:
        # On a GPU node: the packages load, CUDA is there, and one real clip decodes on it
        # (NVDEC with the resize), so a node that cannot does not reject every video one by one.
        import tempfile

        import numpy as np

        from vidray.data.video import VideoError, encode_mp4, read_clip

        require_decoder(settings.decoder, settings.device)
        require_cuda_decoding()
        with tempfile.TemporaryDirectory() as tmp:
            frames = np.random.default_rng(0).integers(0, 255, (8, 96, 128, 3), dtype=np.uint8)
            path = encode_mp4(f"{tmp}/check.mp4", frames)
            try:
                read_clip(path, settings.stored_frames, settings.stored_size, settings.decoder, settings.device)
            except VideoError as err:
                raise UserError(f"data.decoder_device=cuda: a test clip does not decode on this GPU ({err.reason})")

    try:
        ray.get(ray.remote(max_retries=0, **settings.task_options())(check).remote())
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        raise UserError(str(cause) if isinstance(cause, UserError) else str(err).splitlines()[0]) from None


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
    write_atomically(fs, join_uri(root, "rejects.parquet"), lambda tmp: pq.write_table(table, tmp, filesystem=fs))

    def write_csv(tmp: str) -> None:
        with fs.open_output_stream(tmp) as f:
            pacsv.write_csv(table, f)

    write_atomically(fs, join_uri(root, "rejects.csv"), write_csv)


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
    decoder: DecoderName = DEFAULT_DECODER,
    decoder_device: DecodeDevice = "cpu",
) -> dict[str, Any]:
    """Decode every video of ``manifest`` into the dataset directory ``out``.

    ``decoder`` (``pyav``, ``decord``, ``torchcodec``) and ``decoder_device``
    (``cpu``; ``cuda``: torchcodec on NVDEC, each task taking a share of a GPU)
    say how. Returns the summary written to ``out/dataset.json`` (with
    ``dataset_dir`` added). Besides the dataset's counts and the decoder it
    holds this run's ``decoded_this_run``, ``shards_reused`` and
    ``shards_written``: re-running with the same manifest and parameters decodes nothing.
    """
    from vidray.cluster import init_ray
    from vidray.data.video import require_decoder

    started = time.monotonic()
    manifest = Path(manifest)
    stored_frames, stored_size = default_stored(frames, size, stored_frames, stored_size)
    if videos_per_shard < 1:
        raise UserError(f"videos_per_shard must be >= 1, got {videos_per_shard}")
    require_decoder(decoder, decoder_device)  # a missing package fails here, not once per video
    settings = DecodeSettings(stored_frames, stored_size, decoder, decoder_device)
    videos, classes = load_videos(manifest)
    fs, root = open_filesystem(out)
    _check_writable(fs, root, out)

    shards = plan_shards(videos, stored_frames, stored_size, videos_per_shard, decoder, decoder_device)
    outcomes = _clear_stale(fs, root, shards)
    # Biggest first: the last tasks to start are the shortest, so no CPU waits long for one at the end.
    todo = sorted((s for s in shards if s.id not in outcomes), key=lambda s: (-s.work, s.id))
    reused = len(outcomes)
    if todo:
        init_ray()
        if decoder_device == "cuda":
            _check_cuda_workers(settings)
        crash_on = os.environ.get(CRASH_ON_ENV) or None
        finished = _run_shards(todo, out, settings, crash_on)
        crashed = [s for s in todo if s.id not in finished]
        if crashed:
            print(
                f"vidray preprocess: {len(crashed)} shard task(s) died; re-running their videos one per task",
                file=sys.stderr,
                flush=True,
            )
            finished.update(_isolate_crashes(crashed, out, settings, crash_on))
        outcomes.update(finished)

    summary = {
        "classes": classes,
        "frames": frames,
        "size": size,
        "stored_frames": stored_frames,
        "stored_size": stored_size,
        "decoder": decoder,
        "decoder_device": decoder_device,
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
    write_atomically(
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
