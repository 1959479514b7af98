"""The on-disk contract between preprocessing and training.

``DIR/dataset.json`` describes the dataset; ``DIR/{train,val,test}/*.parquet``
hold one row per video:

=================  ==========  ================================================
column             type        meaning
=================  ==========  ================================================
``video``          binary      the frames, as ``dataset.json["store"]`` says
                               (vidray/data/store.py): ``raw`` (or absent):
                               uint8 RGB, C-order ``[stored_frames,
                               stored_size, stored_size, 3]``; ``jpeg``: a
                               JPEG per frame in a small container
``label``          int64       class index into ``dataset.json["classes"]``
``label_name``     string      class name
``video_id``       string      stable id (file stem / YouTube id)
``path``           string      source file
``source_frames``  int64       frames in the source video
``padded``         bool        source had fewer frames than stored; frames
                               repeated evenly (segment sampling)
=================  ==========  ================================================

Frames are stored as raw bytes rather than a Ray tensor extension so any
Parquet reader (pandas, DuckDB, plain pyarrow) can open the shards.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any, Iterator, Sequence

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from vidray.compat import parquet_footer_readers_for
from vidray.data.store import StoredClipError, check_blob, clip_error, clip_name, decode_frames_into, wrong_size_error
from vidray.errors import UserError
from vidray.storage import join_uri, open_filesystem

DATASET_INFO = "dataset.json"
# What read_split_batches reads by default: the clip, its label and where it came from.
SPLIT_BATCH_COLUMNS = ("video", "label", "video_id", "path")

SHARD_SCHEMA = pa.schema(
    [
        ("video", pa.binary()),
        ("label", pa.int64()),
        ("label_name", pa.string()),
        ("video_id", pa.string()),
        ("path", pa.string()),
        ("source_frames", pa.int64()),
        ("padded", pa.bool_()),
    ]
)


@dataclass(frozen=True)
class ClipShape:
    """What is stored per video and what the model eats: the data keys of every checkpoint and export."""

    classes: list[str]
    frames: int  # frames per clip the model eats
    size: int  # model input side
    stored_frames: int
    stored_size: int
    # The decoder the stored frames were made with (dataset.json): prediction decodes new videos the same way.
    decoder: str = "pyav"
    # How the shards store them (dataset.json, vidray/data/store.py): what the training workers decode.
    store: str = "raw"
    # Mean bytes of a stored clip (DatasetInfo.clip_bytes; 0: a raw clip's): whether a worker's shard
    # fits its memory. Not a data key of checkpoints (as_dict).
    clip_bytes: int = 0

    KEYS = ("classes", "frames", "size", "stored_frames", "stored_size")  # required; decoder is optional

    @property
    def stored_video_shape(self) -> tuple[int, int, int, int]:
        return (self.stored_frames, self.stored_size, self.stored_size, 3)

    def as_dict(self) -> dict[str, Any]:
        # The store only when not raw: the data keys of checkpoints made before stores existed stay what they were.
        store = {"store": self.store} if self.store != "raw" else {}
        return {**{key: getattr(self, key) for key in (*self.KEYS, "decoder")}, **store}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ClipShape":
        return cls(
            classes=list(data["classes"]),
            frames=int(data["frames"]),
            size=int(data["size"]),
            stored_frames=int(data["stored_frames"]),
            stored_size=int(data["stored_size"]),
            decoder=str(data.get("decoder") or "pyav"),
            store=str(data.get("store") or "raw"),
        )


@dataclass(frozen=True)
class DatasetInfo:
    classes: list[str]
    frames: int  # frames per clip the model eats
    size: int  # model input side
    stored_frames: int
    stored_size: int
    split_counts: dict[str, int]
    raw: dict[str, Any]
    store: str = "raw"  # how the shards store the clips (vidray/data/store.py)

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        return (self.stored_frames, self.stored_size, self.stored_size, 3)

    def classes_in(self, split: str) -> int:
        """How many classes ``split`` holds videos of (dataset.json's per-class counts; all of them where it has none)."""
        per_class = self.raw.get("splits", {}).get(split, {}).get("per_class")
        return sum(1 for videos in per_class.values() if videos) if per_class else self.num_classes

    def identity(self, splits: Sequence[str]) -> dict[str, Any]:
        """What a run trained on ``splits`` of this dataset depends on: its classes, its videos per split and a
        hash of those splits' shard names (each names its videos, their files and the decode settings:
        vidray/data/shards.py), so a video added, removed, moved to another class or re-encoded changes it."""
        shards = sorted(name for name in self.raw.get("shards", []) if name.split("/", 1)[0] in splits)
        return {
            "classes": list(self.classes),
            "videos": {split: self.split_counts.get(split, 0) for split in splits},
            "shards": hashlib.sha256(json.dumps(shards).encode()).hexdigest()[:16],
        }

    @property
    def clip_bytes(self) -> int:
        """Mean bytes of a stored clip (dataset.json's stored_bytes; a raw clip's size when it has none)."""
        raw = int(np.prod(self.video_shape))
        stored = self.raw.get("stored_bytes") or {}
        videos = sum(self.split_counts.values())
        total = sum(int(stored.get(split) or raw * count) for split, count in self.split_counts.items())
        return max(1, -(-total // videos)) if videos else raw


def read_dataset_info(dataset_dir: str) -> DatasetInfo:
    fs, root = open_filesystem(dataset_dir)
    info_path = join_uri(root, DATASET_INFO)
    try:
        with fs.open_input_stream(info_path) as f:
            raw = json.loads(f.read())
    except (FileNotFoundError, NotADirectoryError):  # no folder, or a file where the folder should be
        raise UserError(
            f"no {DATASET_INFO} in {dataset_dir}: run `vidray preprocess --manifest M --out {dataset_dir}` first"
        ) from None
    return DatasetInfo(
        classes=list(raw["classes"]),
        frames=int(raw["frames"]),
        size=int(raw["size"]),
        stored_frames=int(raw["stored_frames"]),
        stored_size=int(raw["stored_size"]),
        split_counts={s: int(v["videos"]) for s, v in raw.get("splits", {}).items()},
        raw=raw,
        store=str(raw.get("store") or "raw"),
    )


def split_uri(dataset_dir: str, split: str) -> str:
    return join_uri(dataset_dir, split)


def read_split(dataset_dir: str, split: str):
    """A Ray Dataset over one split's shards (videos still as stored bytes), in the order Ray lists them."""
    import ray.data  # here: Ray costs seconds to import, and the rest of this module is read without it

    info = read_dataset_info(dataset_dir)
    _refuse_empty(dataset_dir, info, (split,))
    # Not Ray's 32 footer-reader processes for a few dozen shards, started and killed on every read.
    _, shards = split_shards(dataset_dir, info, split)
    with parquet_footer_readers_for(len(shards)):
        return ray.data.read_parquet(split_uri(dataset_dir, split)).select_columns(SPLIT_COLUMNS)


def read_splits_in_order(dataset_dir: str, splits: Sequence[str], order_seed: int):
    """A Ray Dataset over the shards of ``splits`` together, read in the order of ``order_seed``: with
    ``preserve_order`` their rows come in it, so shards written class by class (and splits) mix.

    Ray's ``randomize_block_order`` would give an order too, but it waits for every block of the dataset before
    it passes one on: streamed, the whole split went through the object store (spilled to disk when larger)
    every epoch, and the first batch waited for all of it. An order of the shards costs nothing to stream."""
    import ray.data

    info = read_dataset_info(dataset_dir)
    _refuse_empty(dataset_dir, info, splits)
    fs, shards = None, []
    for split in splits:
        fs, in_split = split_shards(dataset_dir, info, split)
        shards += in_split
    in_order = [shards[i] for i in np.random.default_rng(order_seed).permutation(len(shards))]
    with parquet_footer_readers_for(len(shards)):
        return ray.data.read_parquet(in_order, filesystem=fs).select_columns(SPLIT_COLUMNS)


# A clip that cannot be read (vidray/train/rows.py: a compressed one rejected, a raw one of the wrong size) is named
# by its id, which says whose shard to decode again (a few bytes a row beside its frames).
SPLIT_COLUMNS = ["video", "label", "video_id"]


def _refuse_empty(dataset_dir: str, info: DatasetInfo, splits: Sequence[str]) -> None:
    for split in splits:
        if info.split_counts.get(split, 0) == 0:
            raise UserError(
                f"split {split!r} of {dataset_dir} holds no videos "
                f"(available: {', '.join(s for s, n in info.split_counts.items() if n) or 'none'})"
            )


def split_shards(dataset_dir: str, info: DatasetInfo, split: str) -> tuple[pafs.FileSystem, list[str]]:
    """(the dataset's filesystem, the split's shard paths in it): in the order dataset.json lists them
    ("split/shard-<id>.parquet", written by preprocess), or, for a dataset.json that lists none (written
    by hand or by an older vidray), every Parquet file of the split folder, sorted. The filesystem is
    opened once (for a bucket, opening it can mean a request to find its region)."""
    fs, root = open_filesystem(dataset_dir)
    listed = info.raw.get("shards")
    if listed is not None:
        return fs, [join_uri(root, name) for name in listed if name.startswith(f"{split}/")]
    entries = fs.get_file_info(pafs.FileSelector(join_uri(root, split), allow_not_found=True))
    return fs, sorted(e.path for e in entries if e.type == pafs.FileType.File and e.path.endswith(".parquet"))


def read_split_batches(
    dataset_dir: str, info: DatasetInfo, split: str, batch_size: int, columns: Sequence[str] = SPLIT_BATCH_COLUMNS
) -> Iterator[dict[str, list]]:
    """Record batches (as Python lists) of one split's shards, in the order dataset.json lists them.

    Plain pyarrow in this process, no Ray: what ``vidray evaluate`` and the pretraining figures read.
    """
    fs, shards = split_shards(dataset_dir, info, split)
    if not shards:
        raise UserError(f"split {split!r} of {dataset_dir} holds no Parquet shards; re-run `vidray preprocess`")
    for shard in shards:
        try:
            f = fs.open_input_file(shard)
        except FileNotFoundError:
            raise UserError(f"{shard} is listed in {dataset_dir}/dataset.json but missing; re-run `vidray preprocess`") from None
        with f:
            for batch in pq.ParquetFile(f).iter_batches(batch_size=batch_size, columns=list(columns)):
                yield batch.to_pydict()


def videos_from_bytes(column: Any, shape: tuple[int, ...], store: str = "raw", video_ids: Sequence[str] | None = None) -> np.ndarray:
    """Stack a column of stored videos into one uint8 array ``[B, *shape]`` with one copy (decoded,
    for a compressed ``store``). A clip that cannot be read raises :class:`vidray.data.store.StoredClipError`
    in the one line training's readers stop with: its video (from ``video_ids``, else its row), why, the fix."""
    items = list(column)
    if store != "raw":
        videos = np.empty((len(items), *shape), np.uint8)
        for row, (video, item) in enumerate(zip(videos, items)):
            try:
                # The checksum first, as training's readers check it (vidray.train.rows.intact_rows): a damaged byte
                # in a frame's data mostly decodes, to wrong pixels that evaluation then scored.
                check_blob(item, store, shape)
                decode_frames_into(item, store, video)
            except StoredClipError as err:  # as training's decoders name it (vidray.train.batches.decode_rows_into)
                raise clip_error(clip_name(video_ids, row), err) from None
        return videos
    expected = int(np.prod(shape))
    for row, item in enumerate(items):
        if len(item) != expected:
            raise wrong_size_error(clip_name(video_ids, row), len(item), shape)
    return np.frombuffer(b"".join(items), dtype=np.uint8).reshape(len(items), *shape)
