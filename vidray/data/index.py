"""List videos and their labels into a manifest Parquet file (``vidray index``).

Two sources:

* a folder ``ROOT/{train,val,test}/<Class>/<video>`` (:func:`index_folder`, here);
* COIN annotations + ``taxonomy_domains.csv`` + a folder of downloaded videos,
  labelled with COIN's 12 domains or 180 tasks (:func:`vidray.data.coin.index_coin`).

Both write the same manifest through :func:`write_manifest`.

The manifest has one row per present video (columns in ``MANIFEST_SCHEMA``,
contract in docs/design.md); the class list, in label order, sits in the
Parquet schema metadata under ``vidray.classes``, with the source and folder indexed
(``vidray.source``, ``vidray.root``: :func:`indexed_from`). Every video is probed for
duration, frame rate, frame count and displayed size (rotation and pixel
aspect applied) from container metadata and its first frame; a file that
cannot be probed keeps its row with ``probe_error`` set, and preprocessing
rejects it with the decoder's reason.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vidray.config import SPLITS
from vidray.data.clip import VideoError
from vidray.data.listing import VIDEO_EXTENSIONS, entries_of, is_hidden, refuse_names_not_utf8, videos_under
from vidray.data.video import probe, require_decoder
from vidray.errors import UserError

CLASSES_KEY = b"vidray.classes"
# The share of each class's train videos a folder without val/ lent to val (hold_out_val); absent: none.
VAL_FRACTION_KEY = b"vidray.val_fraction"
# What was indexed: the source ("folder", "coin") and its video folder, resolved (indexed_from); absent in
# manifests written before they were recorded.
SOURCE_KEY, ROOT_KEY = b"vidray.source", b"vidray.root"
MANIFEST_SCHEMA = pa.schema(
    [
        ("path", pa.string()),  # absolute
        ("video_id", pa.string()),
        ("label", pa.string()),
        ("label_index", pa.int64()),
        ("split", pa.string()),
        ("duration", pa.float64()),  # seconds
        ("fps", pa.float64()),
        ("num_frames", pa.int64()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("probe_error", pa.string()),
    ]
)
_PROBE_FIELDS = ("duration", "fps", "num_frames", "width", "height", "probe_error")

FOLDER_LAYOUT = "ROOT/{train,val,test}/<Class>/<video>"
# Longer than one tick of the clock that stamps files' times (1/HZ on Linux: 4 ms at HZ=250, 10 ms at HZ=100).
CLOCK_TICK_S = 0.02


# --- probing -----------------------------------------------------------------


def probe_video(path: str | Path) -> dict[str, Any]:
    """Duration, fps, frame count and displayed size from container metadata; never raises.

    One open container (:func:`vidray.data.video.probe`): the header gives
    size, sample aspect ratio, rate and duration; the first decoded frame its
    display matrix, so ``width`` x ``height`` is what a player shows: a phone
    clip coded 1280x720 and marked "rotate 90" is 720x1280. Containers without
    a frame count in their header (mkv, webm) get one by demuxing packets,
    which reads the file but decodes nothing more.
    """
    try:
        info = probe(path)
        if not info.num_frames:
            raise ValueError("video stream has no frames")
        if info.rotation is None:
            raise ValueError("no decodable frames (the first frame does not decode)")
        duration = info.duration
        if duration is None and info.fps:
            duration = info.num_frames / info.fps
        width, height = replace(info.coded, rotation=info.rotation).displayed_size
    except Exception as err:  # any unreadable file becomes a recorded reason, never a crash
        detail = f"{err.code}: {err.reason}" if isinstance(err, VideoError) else f"{type(err).__name__}: {err}"
        reason = detail.replace("\n", " ")
        return {"duration": None, "fps": None, "num_frames": None, "width": None, "height": None, "probe_error": reason}
    return {
        "duration": duration,
        "fps": info.fps,
        "num_frames": int(info.num_frames),
        "width": int(width),
        "height": int(height),
        "probe_error": None,
    }


def probe_rows(rows: list[dict[str, Any]], probe: bool, known: dict[str, dict[str, Any]] | None = None) -> None:
    """Set each row's probe fields: none without ``probe``; else ``known``'s for its path (:func:`unchanged_probes`),
    or what :func:`probe_video` finds."""
    if not probe:
        for row in rows:
            row.update(dict.fromkeys(_PROBE_FIELDS))
        return
    known = known or {}
    for row in rows:
        row.update(known.get(row["path"], {}))
    unknown = [row for row in rows if row["path"] not in known]
    require_decoder("pyav")  # probing reads headers with PyAV: without it, one line here, not a reason per video
    # Opening a container is mostly I/O wait (and FFmpeg drops the GIL): threads overlap it.
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        for row, info in zip(unknown, pool.map(probe_video, [row["path"] for row in unknown])):
            row.update(info)


def changed_ns(stat: os.stat_result) -> int:
    """When a file or folder last changed: whether a manifest is stale (vidray/data/prepare.py), whether a video's
    probe can be reused (:func:`unchanged_probes`)."""
    # A folder changes when entries are added, removed or renamed in it; a file when it is rewritten. The
    # mtime says so, but tar, cp -a, rsync -a and unzip set it back to the one packed, for files and
    # folders alike: videos copied in that way into an indexed class folder looked older than the manifest,
    # which was kept without them. The ctime is set to now by any change, that one included, and no
    # program can set it back. The mtime too: on FAT and exFAT (cameras' cards) Linux shows the creation
    # time as ctime, which a rewrite leaves as it is.
    return max(stat.st_mtime_ns, stat.st_ctime_ns)


def unchanged_probes(manifest: Path) -> dict[str, dict[str, Any]]:
    """``{path: probe fields}`` of an earlier ``manifest``'s rows whose video has not changed (:func:`changed_ns`)
    since that manifest's listing began (its mtime, as index_folder and index_coin set it): what probing it again
    would find. COIN is indexed again on every start (vidray/data/prepare.py), and probing ~11,800 videos took
    minutes. Rows never probed (``probe=False``) or whose probe failed (a file still being copied, storage that
    was away) are left out, to be probed again; none without a readable manifest."""
    try:
        with open(manifest, "rb") as f:  # one file: the mtime is that of the rows read
            listed_at = os.fstat(f.fileno()).st_mtime_ns
            table = pq.read_table(f, columns=["path", *_PROBE_FIELDS])
    except (pa.ArrowException, OSError):
        return {}
    known = {}
    for row in table.to_pylist():
        if row["num_frames"] is None or row["probe_error"] is not None:
            continue
        try:
            changed = changed_ns(os.stat(row["path"]))
        except OSError:
            continue  # gone, or a dangling link: probing says why
        if changed <= listed_at:
            known[row.pop("path")] = row
    return known


# --- manifest I/O ------------------------------------------------------------


def write_manifest(
    rows: list[dict[str, Any]],
    classes: list[str],
    out: Path,
    val_fraction: float = 0.0,
    source: str | None = None,
    root: Path | None = None,
) -> Path:
    """Write rows atomically (temporary file + rename) with the class list in the schema metadata,
    ``val_fraction`` when the rows' val split was held out of train (:func:`hold_out_val`), and the
    ``source`` ("folder", "coin") and video folder ``root`` they were indexed from (:func:`indexed_from`)."""
    out = Path(out)
    metadata = {CLASSES_KEY: json.dumps(classes).encode()}
    if val_fraction:
        metadata[VAL_FRACTION_KEY] = repr(float(val_fraction)).encode()
    if source is not None and root is not None:
        # Bytes as the file system has them: a name that is not UTF-8 is kept as it is.
        metadata.update({SOURCE_KEY: source.encode(), ROOT_KEY: os.fsencode(Path(root).resolve())})
    schema = MANIFEST_SCHEMA.with_metadata(metadata)
    table = pa.Table.from_pylist(rows, schema=schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


def held_out_fraction(path: str | Path) -> float:
    """The ``val_fraction`` a manifest's val split was held out of train with; 0.0 when it was not."""
    raw = (pq.read_schema(path).metadata or {}).get(VAL_FRACTION_KEY)
    return float(raw) if raw else 0.0


def indexed_from(path: str | Path) -> tuple[str, Path] | None:
    """``(source, resolved video folder)`` a manifest was indexed from ("folder" or "coin"); None for one
    written before vidray recorded them. A manifest path is shared (the demo and the folder source default to
    one), so what it indexed, not only when, says whether it can be reused (vidray/data/prepare.py)."""
    metadata = pq.read_schema(path).metadata or {}
    if ROOT_KEY not in metadata:
        return None
    return metadata.get(SOURCE_KEY, b"").decode(), Path(os.fsdecode(metadata[ROOT_KEY]))


def read_manifest(path: str | Path):
    """``(pandas.DataFrame, classes)`` of a manifest written by ``vidray index``.

    Integer columns with nulls (unprobed videos) come back as float64, as usual in pandas.
    """
    path = Path(path)
    fix = f"run `vidray index folder ROOT --out {path}` or `vidray index coin ... --out {path}`"
    if not path.is_file():
        raise UserError(f"manifest {path} not found: {fix}")
    try:
        table = pq.read_table(path)
    except (pa.ArrowException, OSError) as err:
        raise UserError(f"manifest {path} is not a readable Parquet file ({err}): {fix}") from None
    raw_classes = (table.schema.metadata or {}).get(CLASSES_KEY)
    if raw_classes is None:
        raise UserError(f"manifest {path} has no {CLASSES_KEY.decode()} metadata (not written by vidray index): {fix}")
    try:
        classes = json.loads(raw_classes)
    except json.JSONDecodeError:
        classes = None
    if not isinstance(classes, list) or not all(isinstance(c, str) for c in classes) or not classes:
        raise UserError(f"manifest {path}: {CLASSES_KEY.decode()} metadata is not a JSON list of class names: {fix}")
    absent = [name for name in MANIFEST_SCHEMA.names if name not in table.column_names]
    if absent:
        raise UserError(f"manifest {path} lacks column(s) {', '.join(absent)}: {fix}")
    frame = table.to_pandas()
    bad = frame[(frame["label_index"] < 0) | (frame["label_index"] >= len(classes))]
    if len(bad):
        index = int(bad["label_index"].iloc[0])
        raise UserError(f"manifest {path}: label_index {index} is outside the {len(classes)} classes: {fix}")
    return frame, classes


def manifest_summary(rows: list[dict[str, Any]], classes: list[str], out: Path) -> dict[str, Any]:
    per_class = Counter(row["label"] for row in rows)
    per_split = Counter(row["split"] for row in rows)
    probe_errors = [row for row in rows if row.get("probe_error")]
    return {
        "manifest": str(out),
        "classes": classes,
        "present": len(rows),
        "per_class": {name: per_class.get(name, 0) for name in classes},
        "per_split": {split: per_split.get(split, 0) for split in SPLITS},
        "probe_errors": len(probe_errors),
        "probe_error_examples": [f"{row['path']}: {row['probe_error']}" for row in probe_errors[:5]],
    }


# --- folder ------------------------------------------------------------------


def hold_out_val(rows: list[dict[str, Any]], fraction: float) -> int:
    """Move ``fraction`` of each class's train rows to val, for a folder without val/ (as Hugging Face's
    examples split one off when a dataset has none); returns how many moved.

    Per class, the videos whose ``video_id`` hashes lowest, at least one and never the last: chosen by
    hash, not by a draw, so the split is the same on every machine and run, and a video added to a class
    moves at most one other between train and val (so most preprocessed shards are reused).
    """
    by_class: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        if row["split"] == "train":
            by_class[row["label"]].append(row)
    moved = 0
    for members in by_class.values():
        if len(members) < 2:
            continue
        count = min(len(members) - 1, max(1, round(fraction * len(members))))
        for row in sorted(members, key=lambda r: hashlib.sha256(r["video_id"].encode()).hexdigest())[:count]:
            row["split"] = "val"
            moved += 1
    return moved


def class_name(folder: Path) -> str:
    """The label a class folder stands for: its name in Unicode's composed form (NFC). macOS writes names
    decomposed ("e" + a combining accent), Linux and Windows mostly composed: a class whose train/ folder came
    from a Mac and whose val/ folder did not would otherwise be two labels that print alike."""
    return unicodedata.normalize("NFC", folder.name)


# A split's folder under ROOT, named as Hugging Face `datasets` names splits (its SPLIT_KEYWORDS), in any case:
# a dataset laid out train/validation/test for the Hub indexes as it is, not with its validation/ ignored.
SPLIT_FOLDER_NAMES = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation"),
}


def split_folders(root: Path) -> dict[str, Path]:
    """``{split: folder}`` for the splits ``root`` has a folder for (:data:`SPLIT_FOLDER_NAMES`), in SPLITS order.
    Two folders for one split (``val/`` and ``validation/``; ``Train/`` and ``train/``) are refused."""
    root = Path(root)
    if not root.is_dir():
        return {}
    found: dict[str, list[Path]] = defaultdict(list)
    for entry in entries_of(root):
        for split, names in SPLIT_FOLDER_NAMES.items():
            if entry.name.lower() in names and entry.is_dir():
                found[split].append(entry)
    for split, folders in found.items():
        if len(folders) > 1:
            names = ", ".join(f"{folder.name}/" for folder in folders)
            raise UserError(f"video folder {root} has {len(folders)} folders for its {split} split ({names}): "
                            "move their videos into one and remove the others")  # fmt: skip
    return {split: found[split][0] for split in SPLITS if split in found}


def lent_to_val(root: Path, val_fraction: float) -> float:
    """The share of train videos :func:`index_folder` lends to val: ``val_fraction`` when ``root`` has no
    val/ (or validation/, dev/, ...) folder of its own, else none."""
    return 0.0 if "val" in split_folders(root) else val_fraction


def video_ids(relative: list[Path]) -> list[str]:
    """Each video's id from its path below ROOT: the path without its extension, or with it where that id would
    be another video's too (train/cat/a.mp4 beside train/cat/a.MOV: a clip and its export). The ids of the
    others stay as they were, and with them their shards and their train/val split (both keyed by the id).

    In Unicode's composed form (NFC), as class names are (:func:`class_name`): a folder copied from a Mac (names
    decomposed) and the same folder unzipped elsewhere gave other ids, so another val hold-out (keyed by the id)."""
    ids = [unicodedata.normalize("NFC", path.with_suffix("").as_posix()) for path in relative]
    while True:
        count = Counter(ids)
        clashing = [i for i, video_id in enumerate(ids) if count[video_id] > 1]
        if not clashing:
            return ids
        # Each round moves every clashing id on one step: with its extension, then (two names that differ only
        # in their Unicode form, as Linux allows) the path as it is. Paths are unique, so the rounds end.
        for i in clashing:
            composed = unicodedata.normalize("NFC", relative[i].as_posix())
            ids[i] = composed if ids[i] != composed else relative[i].as_posix()


def index_folder(root: Path, out: Path, probe: bool = True, val_fraction: float = 0.0) -> dict[str, Any]:
    """Index ``ROOT/{train,val,test}/<Class>/<video>``; write the manifest to ``out``. A split's folder may carry
    any name Hugging Face ``datasets`` gives it (validation/, dev/, Train/, ...: :data:`SPLIT_FOLDER_NAMES`).

    A folder without val/ lends ``val_fraction`` of each class's train videos to val (:func:`hold_out_val`;
    ``data.val_fraction``); the summary's ``val_held_out_of_train`` says how many.

    Classes are the sorted union of class folder names over all splits, composed alike (:func:`class_name`;
    an empty class folder still gets a label index). Files that are not videos
    (by extension, case-insensitive), hidden files and folders and anything outside the split folders are
    ignored and counted; a class folder's subfolders are read, and a dangling link named like a video is indexed,
    so that preprocessing rejects it with its reason (vidray/data/listing.py: ``videos_under``). Names that are
    not UTF-8 are refused (``refuse_names_not_utf8``). ``video_id`` is the path below ROOT without extension,
    unique even when file names repeat, or with it where two differ in it alone (:func:`video_ids`).
    """
    root = Path(root)
    if not 0 <= val_fraction < 1:
        raise UserError(f"val_fraction={val_fraction} is not a share of the train videos: give one in [0, 1)")
    if not root.is_dir():
        raise UserError(f"video folder {root} does not exist (expected layout {FOLDER_LAYOUT})")
    # The manifest gets the mtime of when the listing began, not of when it is written after minutes of probing: a
    # video copied in meanwhile was not listed but was older than the file, so never indexed (the staleness check,
    # vidray.data.prepare.manifest_is_stale, compares the manifest's mtime with the folder's changes). The mtime,
    # not a metadata key: manifests already written keep working, and the check stays one stat. The pause: files
    # are stamped by a clock that ticks every few ms (Linux's coarse clock), so one changed just after
    # ``listed_at`` may carry a time before it; the listing starts a tick later, so such a file is listed.
    listed_at = time.time_ns()
    time.sleep(CLOCK_TICK_S)
    split_dirs = split_folders(root)
    if not split_dirs:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise UserError(
            f"video folder {root} has no train/, val/ or test/ subfolder (nor training/, validation/, dev/, "
            f"testing/, ...; found: {found}); expected layout {FOLDER_LAYOUT}"
        )

    ignored = [p for p in root.iterdir() if p not in split_dirs.values()]
    class_dirs: list[tuple[str, Path]] = []
    for split, split_dir in split_dirs.items():
        for entry in entries_of(split_dir):
            if entry.is_dir() and not is_hidden(entry.name):
                class_dirs.append((split, entry))
            elif entry.is_symlink() and not entry.exists() and not is_hidden(entry.name) and not (
                Path(entry.name).suffix and Path(os.readlink(entry)).suffix  # notes.txt -> /mnt/share/notes.txt: a file's
            ):
                # A class folder linked from storage that is not mounted: left out, it took its class with it, and
                # every later class's label index moved down one. The manifest must not be written without it.
                raise UserError(f"{entry} links to {os.readlink(entry)}, which is not there (storage not mounted?): "
                                "mount it, or remove the link to leave that class out")
            else:
                ignored.append(entry)
    classes = sorted({class_name(class_dir) for _, class_dir in class_dirs})

    found: list[tuple[str, str, Path]] = []  # (split, label, video)
    for split, class_dir in class_dirs:
        found += [(split, class_name(class_dir), Path(path)) for path in videos_under(class_dir, ignored)]
    ids = video_ids([path.relative_to(root) for _, _, path in found])
    rows = [
        {
            "path": os.path.abspath(path),
            "video_id": video_id,
            "label": label,
            "label_index": classes.index(label),
            "split": split,
        }
        for (split, label, path), video_id in zip(found, ids)
    ]
    refuse_names_not_utf8(root, [class_dir for _, class_dir in class_dirs] + [Path(row["path"]) for row in rows])
    if not rows:
        raise UserError(
            f"no video files under {root} (looked for {', '.join(VIDEO_EXTENSIONS[:6])}, ... "
            f"in {FOLDER_LAYOUT})"
        )

    held_out = lent_to_val(root, val_fraction)
    moved = hold_out_val(rows, held_out) if held_out else 0
    probe_rows(rows, probe)
    write_manifest(rows, classes, out, val_fraction=held_out, source="folder", root=root)
    os.utime(out, ns=(listed_at, listed_at))
    summary = manifest_summary(rows, classes, out)
    summary.update(
        selected=len(rows),
        missing=0,
        ignored=len(ignored),
        ignored_examples=[str(p) for p in ignored[:5]],
        val_held_out_of_train=moved,
    )
    return summary
