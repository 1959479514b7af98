"""List videos and their labels into a manifest Parquet file (``vidray index``).

Two sources:

* a folder ``ROOT/{train,val,test}/<Class>/<video>`` (:func:`index_folder`);
* COIN annotations + ``taxonomy_domains.csv`` + a folder of downloaded videos
  (:func:`index_coin`), labelled with COIN's 12 domains.

The manifest has one row per present video (columns in ``MANIFEST_SCHEMA``,
contract in docs/design.md); the class list, in label order, sits in the
Parquet schema metadata under ``vidray.classes``. Every video is probed for
duration, frame rate, frame count and displayed size (rotation and pixel
aspect applied) from container metadata and its first frame; a file that
cannot be probed keeps its row with ``probe_error`` set, and preprocessing
rejects it with the decoder's reason.
"""

from __future__ import annotations

import csv
import json
import os
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from vidray.dataset import SPLITS
from vidray.errors import UserError

# Preference order when one id exists with several extensions.
VIDEO_EXTENSIONS = (
    ".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi", ".mpg", ".mpeg", ".flv",
    ".wmv", ".3gp", ".3g2", ".ts", ".mts", ".m2ts", ".ogv", ".vob", ".asf", ".mxf",
)
_EXTENSION_RANK = {ext: rank for rank, ext in enumerate(VIDEO_EXTENSIONS)}

CLASSES_KEY = b"vidray.classes"
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
COIN_SUBSETS = {"training": "train", "testing": "val", "validation": "val"}
TAXONOMY_COLUMNS = ("domain", "task_id", "task")


def is_video_file(path: Path) -> bool:
    return path.suffix.lower() in _EXTENSION_RANK


# --- probing -----------------------------------------------------------------


def probe_video(path: str | Path) -> dict[str, Any]:
    """Duration, fps, frame count and displayed size from container metadata; never raises.

    One open container: the header gives size, sample aspect ratio, rate and
    duration; the first decoded frame its display matrix (PyAV shows it on
    frames only), so ``width`` x ``height`` is what a player shows: a phone
    clip coded 1280x720 and marked "rotate 90" is 720x1280. Containers without
    a frame count in their header (mkv, webm) get one by demuxing packets,
    which reads the file but decodes nothing more.
    """
    import av

    from vidray.decode.pyav import coded_geometry, first_frame_rotation, open_video
    from vidray.video import Geometry, VideoError, check_file

    try:
        check_file(str(path))
        container, stream = open_video(str(path))
        with container:
            coded = coded_geometry(str(path), stream)
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            fps = float(rate) if rate else None
            if stream.duration is not None and stream.time_base is not None:
                duration = float(stream.duration * stream.time_base)
            elif container.duration is not None:
                duration = container.duration / av.time_base
            else:
                duration = None
            num_frames = stream.frames
            stream.codec_context.thread_count = 1  # one frame: threads would only add start-up
            rotation = first_frame_rotation(container, stream)
            if not num_frames:
                container.seek(0)
                num_frames = sum(1 for packet in container.demux(stream) if packet.size)
        if not num_frames:
            raise ValueError("video stream has no frames")
        if rotation is None:
            raise ValueError("no decodable frames (the first frame does not decode)")
        if duration is None and fps:
            duration = num_frames / fps
        width, height = Geometry(coded.coded_width, coded.coded_height, rotation, coded.sample_aspect_ratio).displayed_size
    except Exception as err:  # any unreadable file becomes a recorded reason, never a crash
        detail = f"{err.code}: {err.reason}" if isinstance(err, VideoError) else f"{type(err).__name__}: {err}"
        reason = detail.replace("\n", " ")
        return {"duration": None, "fps": None, "num_frames": None, "width": None, "height": None, "probe_error": reason}
    return {
        "duration": duration,
        "fps": fps,
        "num_frames": int(num_frames),
        "width": int(width),
        "height": int(height),
        "probe_error": None,
    }


def _probe_rows(rows: list[dict[str, Any]], probe: bool) -> None:
    if not probe:
        for row in rows:
            row.update(dict.fromkeys(_PROBE_FIELDS))
        return
    # Opening a container is mostly I/O wait (and FFmpeg drops the GIL): threads overlap it.
    with ThreadPoolExecutor(max_workers=min(16, 2 * (os.cpu_count() or 1))) as pool:
        for row, info in zip(rows, pool.map(probe_video, [row["path"] for row in rows])):
            row.update(info)


# --- manifest I/O ------------------------------------------------------------


def write_manifest(rows: list[dict[str, Any]], classes: list[str], out: Path) -> Path:
    """Write rows atomically (temporary file + rename) with the class list in the schema metadata."""
    out = Path(out)
    schema = MANIFEST_SCHEMA.with_metadata({CLASSES_KEY: json.dumps(classes).encode()})
    table = pa.Table.from_pylist(rows, schema=schema)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    try:
        pq.write_table(table, tmp)
        tmp.replace(out)
    finally:
        tmp.unlink(missing_ok=True)
    return out


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


def _summary(rows: list[dict[str, Any]], classes: list[str], out: Path) -> dict[str, Any]:
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


def index_folder(root: Path, out: Path, probe: bool = True) -> dict[str, Any]:
    """Index ``ROOT/{train,val,test}/<Class>/<video>``; write the manifest to ``out``.

    Classes are the sorted union of class folder names over all splits (an
    empty class folder still gets a label index). Files that are not videos
    (by extension, case-insensitive), anything nested deeper and anything
    outside the split folders are ignored and counted. ``video_id`` is the
    path below ROOT without extension, unique even when file names repeat.
    """
    root = Path(root)
    if not root.is_dir():
        raise UserError(f"video folder {root} does not exist (expected layout {FOLDER_LAYOUT})")
    split_dirs = {split: root / split for split in SPLITS if (root / split).is_dir()}
    if not split_dirs:
        found = ", ".join(sorted(p.name for p in root.iterdir())[:10]) or "nothing"
        raise UserError(
            f"video folder {root} has no train/, val/ or test/ subfolder (found: {found}); "
            f"expected layout {FOLDER_LAYOUT}"
        )

    ignored = [p for p in root.iterdir() if p.name not in split_dirs]
    class_dirs: list[tuple[str, Path]] = []
    for split, split_dir in split_dirs.items():
        for entry in sorted(split_dir.iterdir()):
            if entry.is_dir():
                class_dirs.append((split, entry))
            else:
                ignored.append(entry)
    classes = sorted({class_dir.name for _, class_dir in class_dirs})

    rows = []
    for split, class_dir in class_dirs:
        for path in sorted(class_dir.iterdir()):
            if not (path.is_file() and is_video_file(path)):
                ignored.append(path)
                continue
            rows.append(
                {
                    "path": os.path.abspath(path),
                    "video_id": path.relative_to(root).with_suffix("").as_posix(),
                    "label": class_dir.name,
                    "label_index": classes.index(class_dir.name),
                    "split": split,
                }
            )
    if not rows:
        raise UserError(
            f"no video files under {root} (looked for {', '.join(VIDEO_EXTENSIONS[:6])}, ... "
            f"in {FOLDER_LAYOUT})"
        )

    _probe_rows(rows, probe)
    write_manifest(rows, classes, out)
    summary = _summary(rows, classes, out)
    summary.update(
        selected=len(rows),
        missing=0,
        ignored=len(ignored),
        ignored_examples=[str(p) for p in ignored[:5]],
    )
    return summary


# --- COIN --------------------------------------------------------------------


def load_coin_annotations(path: Path) -> dict[str, dict[str, Any]]:
    """``{youtube_id: entry}`` from ``{"database": {id: entry}}``, a list of ``{id: entry}``, or ``{id: entry}``."""
    path = Path(path)
    expected = 'expected {"database": {id: entry}} or a list of {id: entry} objects'
    try:
        raw = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UserError(f"COIN annotations {path} not found (pass --annotations path/to/COIN.json)") from None
    except json.JSONDecodeError as err:
        raise UserError(
            f"COIN annotations {path} is not valid JSON ({err.msg} at line {err.lineno} column {err.colno})"
        ) from None
    except (OSError, UnicodeDecodeError) as err:
        raise UserError(f"cannot read COIN annotations {path}: {err}") from None

    if isinstance(raw, dict) and "database" in raw:
        raw = raw["database"]
        if not isinstance(raw, dict):
            raise UserError(f"COIN annotations {path}: \"database\" is not an object ({expected})")
    if isinstance(raw, list):
        if not all(isinstance(item, dict) for item in raw):
            raise UserError(f"COIN annotations {path}: the list holds a non-object item ({expected})")
        merged: dict[str, Any] = {}
        for item in raw:
            merged.update(item)
        raw = merged
    if not isinstance(raw, dict):
        raise UserError(f"COIN annotations {path}: top level is a {type(raw).__name__} ({expected})")
    for video_id, entry in raw.items():
        if not isinstance(entry, dict):
            raise UserError(f"COIN annotations {path}: entry {video_id!r} is not an object ({expected})")
    return raw


def load_coin_taxonomy(path: Path) -> tuple[dict[int, str], dict[str, str], list[str]]:
    """``(domain by task id, domain by task name, classes)`` from ``taxonomy_domains.csv``.

    Class names are domain names with spaces removed (``Drink and Snack`` ->
    ``DrinkandSnack``), sorted, so label indices do not depend on which
    videos happen to be downloaded.
    """
    path = Path(path)
    try:
        with path.open(newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            records = list(reader)
    except FileNotFoundError:
        raise UserError(f"COIN taxonomy {path} not found (pass --taxonomy path/to/taxonomy_domains.csv)") from None
    except (OSError, UnicodeDecodeError, csv.Error) as err:
        raise UserError(f"cannot read COIN taxonomy {path}: {err}") from None
    absent = [c for c in TAXONOMY_COLUMNS if c not in columns]
    if absent:
        raise UserError(
            f"COIN taxonomy {path} lacks column(s) {', '.join(absent)} "
            f"(found: {', '.join(columns) or 'none'}; expected header {','.join(TAXONOMY_COLUMNS)})"
        )
    by_id: dict[int, str] = {}
    by_task: dict[str, str] = {}
    for line, record in enumerate(records, start=2):
        record = {(k or "").strip(): (v or "").strip() for k, v in record.items()}
        domain = "".join(record["domain"].split())
        try:
            task_id = int(record["task_id"])
        except ValueError:
            raise UserError(
                f"COIN taxonomy {path} line {line}: task_id {record['task_id']!r} is not an integer"
            ) from None
        if not domain or not record["task"]:
            raise UserError(f"COIN taxonomy {path} line {line}: empty domain or task")
        by_id[task_id] = domain
        by_task[record["task"]] = domain
    if not by_id:
        raise UserError(f"COIN taxonomy {path} has no rows")
    return by_id, by_task, sorted(set(by_id.values()))


def _coin_domain(entry: dict[str, Any], by_id: dict[int, str], by_task: dict[str, str]) -> tuple[str | None, str]:
    """Domain of an entry by ``recipe_type`` (task id), else by ``class`` (task name); or None and why."""
    recipe, task = entry.get("recipe_type"), entry.get("class")
    from_id = None
    if recipe is not None:
        try:
            from_id = by_id.get(int(recipe))
        except (TypeError, ValueError):
            return None, f"recipe_type {recipe!r} is not an integer task id"
    from_name = by_task.get(task) if isinstance(task, str) else None
    if from_id and from_name and from_id != from_name:
        return None, f"recipe_type {recipe} is in domain {from_id} but class {task!r} is in {from_name}"
    domain = from_id or from_name
    if domain is None:
        return None, f"task (recipe_type={recipe!r}, class={task!r}) is not in the taxonomy"
    return domain, ""


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _scan_video_dir(videos_dir: Path) -> dict[tuple[str, str], Path]:
    """``{(subfolder or "", stem): path}`` for DIR/<id>.<ext> and DIR/<recipe_type>/<id>.<ext>."""
    found: dict[tuple[str, str], Path] = {}

    def add(key: tuple[str, str], path: Path) -> None:
        if key not in found or _EXTENSION_RANK[path.suffix.lower()] < _EXTENSION_RANK[found[key].suffix.lower()]:
            found[key] = path

    for entry in os.scandir(videos_dir):
        if entry.is_dir():
            for inner in os.scandir(entry.path):
                path = Path(inner.path)
                if inner.is_file() and is_video_file(path):
                    add((entry.name, path.stem), path)
        elif entry.is_file() and is_video_file(Path(entry.path)):
            add(("", Path(entry.name).stem), Path(entry.path))
    return found


def index_coin(
    annotations: list[Path],
    taxonomy: Path,
    videos_dir: Path,
    out: Path,
    min_duration: float | None = None,
    max_duration: float | None = None,
    probe: bool = True,
) -> dict[str, Any]:
    """Index COIN videos labelled with their domain (12 classes) into ``out``.

    * Each entry's task is looked up by ``recipe_type`` (task id), falling back
      to its ``class`` (task name); an entry whose task is not in the taxonomy,
      whose subset is unknown or that has no usable duration under a duration
      filter is skipped and counted under ``problems`` (first few in
      ``problem_examples``, all in ``<out>.problems.csv``).
    * ``subset`` training -> ``train``; testing or validation -> ``val``.
    * ``min_duration <= duration <= max_duration`` (inclusive, seconds, from
      the annotation's ``duration`` field, so filtering needs no video).
    * A selected video is present at ``DIR/<recipe_type>/<youtube_id>.<ext>`` or
      ``DIR/<youtube_id>.<ext>``. Absent ones are not an error: they are listed
      in ``<out>.missing.csv`` (youtube_id, class, task, recipe_type, split,
      duration, video_url) so they can be downloaded.
    """
    out = Path(out)
    videos_dir = Path(videos_dir)
    if not annotations:
        raise UserError("no COIN annotation files given (pass --annotations path/to/COIN.json)")
    by_id, by_task, classes = load_coin_taxonomy(taxonomy)
    if not videos_dir.is_dir():
        raise UserError(
            f"COIN videos folder {videos_dir} does not exist "
            "(create it, even empty, to list what to download; layout DIR/<recipe_type>/<id>.mp4 or DIR/<id>.mp4)"
        )
    on_disk = _scan_video_dir(videos_dir)

    entries, problems, selected = 0, [], []
    duplicates = filtered_out = 0
    seen: set[str] = set()
    filtering = min_duration is not None or max_duration is not None
    for annotation_file in annotations:
        for video_id, entry in load_coin_annotations(annotation_file).items():
            entries += 1
            if video_id in seen:
                duplicates += 1
                continue
            seen.add(video_id)
            domain, problem = _coin_domain(entry, by_id, by_task)
            split = COIN_SUBSETS.get(str(entry.get("subset", "")).lower())
            duration = _number(entry.get("duration"))
            if not problem and split is None:
                problem = f"subset {entry.get('subset')!r} is not one of {', '.join(COIN_SUBSETS)}"
            if not problem and filtering and duration is None:
                problem = f"duration {entry.get('duration')!r} is not a number, needed by the duration filter"
            if problem:
                problems.append({"youtube_id": video_id, "file": str(annotation_file), "problem": problem})
                continue
            if (min_duration is not None and duration < min_duration) or (
                max_duration is not None and duration > max_duration
            ):
                filtered_out += 1
                continue
            selected.append((video_id, entry, domain, split, duration))

    rows, missing = [], []
    for video_id, entry, domain, split, duration in selected:
        recipe = entry.get("recipe_type")
        path = on_disk.get((str(recipe), video_id)) or on_disk.get(("", video_id))
        if path is None:
            missing.append(
                {
                    "youtube_id": video_id,
                    "class": domain,
                    "task": entry.get("class"),
                    "recipe_type": recipe,
                    "split": split,
                    "duration": duration,
                    "video_url": entry.get("video_url"),
                }
            )
            continue
        rows.append(
            {
                "path": os.path.abspath(path),
                "video_id": video_id,
                "label": domain,
                "label_index": classes.index(domain),
                "split": split,
            }
        )

    _probe_rows(rows, probe)
    write_manifest(rows, classes, out)
    missing_csv = out.with_suffix(".missing.csv")
    _write_csv(missing_csv, missing, ["youtube_id", "class", "task", "recipe_type", "split", "duration", "video_url"])
    problems_csv = out.with_suffix(".problems.csv")
    if problems:
        _write_csv(problems_csv, problems, ["youtube_id", "file", "problem"])
    else:
        problems_csv.unlink(missing_ok=True)  # a stale list from an earlier run would mislead

    selected_per_class = Counter(domain for _, _, domain, _, _ in selected)
    summary = _summary(rows, classes, out)
    summary.update(
        entries=entries,
        duplicates=duplicates,
        problems=len(problems),
        problem_examples=[f"{p['youtube_id']} ({p['file']}): {p['problem']}" for p in problems[:5]],
        problems_csv=str(problems_csv) if problems else None,
        duration_filter=[min_duration, max_duration],
        filtered_out_by_duration=filtered_out,
        selected=len(selected),
        selected_per_class={name: selected_per_class.get(name, 0) for name in classes},
        missing=len(missing),
        missing_csv=str(missing_csv),
    )
    return summary


def _write_csv(path: Path, records: list[dict[str, Any]], columns: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with tmp.open("w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(records)
    tmp.replace(path)
