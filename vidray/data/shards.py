"""Which videos go into which Parquet shard, and each shard's id (its content hash).

Videos are grouped per split into shards of about ``videos_per_shard``
typical videos' worth of decode work (:func:`plan_shards`). A shard's id
hashes its videos (path, size, mtime, label, split; that it may not be read,
when so) and the decode parameters (frames, size, decoder and its device, the
store: raw or jpeg and its quality), so:

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
videos holds fewer of them than one of short 360p clips.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from vidray.config import DEFAULT_DECODER, DEFAULT_JPEG_QUALITY, SPLITS, DecodeDevice, DecoderName, StoreName
from vidray.data.index import read_manifest
from vidray.errors import UserError

# One shard is one Parquet file and one Ray task: enough shards to keep every CPU of a
# cluster busy to the end (COIN-12's 1,024 videos: 128), files still ~12 MB at 16x112².
VIDEOS_PER_SHARD = 8
# Part of every shard id: bump when decoding changes so old shards are rebuilt.
DECODE_VERSION = 5  # 2: PyAV decoding (swscale resize) instead of decord; 3: rotation and pixel aspect applied;
# 4: frames at segment starts (transformers' sampling), not centres; 5: the long side rounded down (transformers'
# resize) and swscale with exact rounding and full-resolution chroma (decode/pyav.py: SCALE_FLAGS)
# Expected decode work of a video in pixel-frames (frames x displayed pixels), plus what any
# video costs whatever its length: opening, indexing packets, writing its row (about 2 s of 360p30).
FIXED_WORK = 640 * 360 * 60
# A decode task on a GPU node takes this share of a GPU: NVDEC runs several sessions at once.
GPU_SHARE_PER_DECODE_TASK = 0.25
RECORDS_DIR = "_shards"


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
    # The file is there but this user may not read it (rejected: "not readable (permission denied)").
    # Part of the shard id while True (_id_fields): chmod changes neither size nor mtime.
    unreadable: bool = False


@dataclass(frozen=True)
class DecodeSettings:
    """How every video of a run is decoded and stored; all of it goes into the shard ids (:meth:`id_params`)."""

    stored_frames: int
    stored_size: int
    decoder: DecoderName = DEFAULT_DECODER
    device: DecodeDevice = "cpu"
    store: StoreName = "raw"  # vidray/data/store.py
    jpeg_quality: int = DEFAULT_JPEG_QUALITY  # store=jpeg only

    def id_params(self) -> dict[str, Any]:
        """What a shard id hashes besides its videos. The raw store adds nothing, so the ids of
        datasets made before stores existed stay valid; jpeg adds itself and its quality."""
        params = asdict(self)
        del params["store"], params["jpeg_quality"]
        return params if self.store == "raw" else {**params, "store": self.store, "jpeg_quality": self.jpeg_quality}

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


def load_videos(manifest: Path) -> tuple[list[Video], list[str]]:
    """Manifest rows as :class:`Video` (with size and mtime) and the class list."""
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
        size, mtime_ns, unreadable = file_stamp(str(row.path))
        work = expected_work(row.num_frames, row.width, row.height)
        videos.append(
            Video(str(row.path), str(row.video_id), row.label, int(row.label_index), row.split, size, mtime_ns, work,
                  unreadable)  # fmt: skip
        )
    return videos, classes


def file_stamp(path: str) -> tuple[int, int, bool]:
    """(size, mtime_ns, unreadable) of a video file: what a shard id hashes of it besides its path
    (:func:`_id_fields`), and what `vidray predict --out` keys a reused row by. (-1, -1, False) when it
    cannot be stat'ed (missing, a dangling link): it will be rejected, and its stamp changes once it is back."""
    try:
        stat = os.stat(path)
        size, mtime_ns = stat.st_size, stat.st_mtime_ns
    except OSError:
        size, mtime_ns = -1, -1
    # What the decoder's check reads (vidray.data.video.check_file), so the two agree on who may read it.
    unreadable = size >= 0 and not os.access(path, os.R_OK)
    return size, mtime_ns, unreadable


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


def _id_fields(video: Video) -> dict[str, Any]:
    """What a shard id hashes of one video: all but its planning weight, and ``unreadable`` only when set.

    A video rejected as unreadable gives its shard another id than it has once the user fixes the permission,
    as the reject's reason tells them to: the shard is then decoded again, where its record of the reject
    would otherwise be reused for ever. Readable videos hash as before ``unreadable`` existed, so the
    shards of existing datasets stay valid. The other rejects are fixed by changing the file (its size or
    mtime: a missing file, a dangling link) or the run's parameters (a decoder that cannot read it)."""
    fields = {k: v for k, v in asdict(video).items() if k not in ("work", "unreadable")}
    return {**fields, "unreadable": True} if video.unreadable else fields


def _stable_hash(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def _shard_id(videos: list[Video], params: dict[str, Any]) -> str:
    """``<order key>-<content hash>``.

    Readers list a split's files by name, so the order key (a hash of the first
    video's id) fixes the row order from the videos alone: the same videos give
    the same order wherever they live and whenever they were copied, and so the
    same training run. The content hash (paths, sizes, mtimes, the decode
    parameters ``params``: frames, size, decoder, device and the store)
    decides whether a finished shard can be reused: switching decoders or
    stores decodes again.
    """
    payload = json.dumps(
        {
            "decode_version": DECODE_VERSION,
            **params,
            "videos": [_id_fields(video) for video in videos],
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
    store: StoreName = "raw",
    jpeg_quality: int = DEFAULT_JPEG_QUALITY,
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
    params = DecodeSettings(stored_frames, stored_size, decoder, decoder_device, store, jpeg_quality).id_params()
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
