"""COIN (Tang et al., CVPR 2019) as a vidray source: its annotation JSON and
task taxonomy parsed into classes, and its downloaded videos indexed into the
manifest (vidray/data/index.py's format).

Classes: COIN's 12 domains (``labels="domain"``, vidray's default since its
first COIN runs) or its 180 tasks (``labels="task"``, the granularity every
published COIN result uses; config key ``data.coin_labels``).

COIN is licensed CC BY-NC 4.0: research use only. vidray downloads nothing:
videos that are selected but not on disk are listed in ``<manifest>.missing.csv``.
"""

from __future__ import annotations

import csv
import json
import os
import time
from collections import Counter
from pathlib import Path
from typing import Any, Literal

from vidray.errors import UserError
from vidray.data.index import CLOCK_TICK_S, manifest_summary, probe_rows, unchanged_probes, write_manifest
from vidray.data.listing import EXTENSION_RANK, entries_of, is_video_file, refuse_names_not_utf8

COIN_SUBSETS = {"training": "train", "testing": "val", "validation": "val"}
TAXONOMY_COLUMNS = ("domain", "task_id", "task")
CoinLabels = Literal["domain", "task"]


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


def load_coin_taxonomy(path: Path, labels: CoinLabels = "domain") -> tuple[dict[int, str], dict[str, str], list[str]]:
    """``(class by task id, class by task name, classes)`` from ``taxonomy_domains.csv``.

    ``labels="domain"``: class names are domain names with spaces removed
    (``Drink and Snack`` -> ``DrinkandSnack``); ``"task"``: the task names as
    the taxonomy spells them (``RemoveBlackheadsWithGlue``). Sorted either way,
    so label indices do not depend on which videos happen to be downloaded.
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
        label = domain if labels == "domain" else record["task"]
        by_id[task_id] = label
        by_task[record["task"]] = label
    if not by_id:
        raise UserError(f"COIN taxonomy {path} has no rows")
    return by_id, by_task, sorted(set(by_id.values()))


def _coin_label(
    entry: dict[str, Any], by_id: dict[int, str], by_task: dict[str, str], labels: CoinLabels = "domain"
) -> tuple[str | None, str]:
    """Class of an entry by ``recipe_type`` (task id), else by ``class`` (task name); or None and why."""
    recipe, task = entry.get("recipe_type"), entry.get("class")
    from_id = None
    if recipe is not None:
        task_id = _task_id(recipe)
        if task_id is None:
            return None, f"recipe_type {recipe!r} is not an integer task id"
        from_id = by_id.get(task_id)
    from_name = by_task.get(task) if isinstance(task, str) else None
    if from_id and from_name and from_id != from_name:
        where = "is in domain" if labels == "domain" else "is task"
        return None, f"recipe_type {recipe} {where} {from_id} but class {task!r} {where} {from_name}"
    domain = from_id or from_name
    if domain is None:
        return None, f"task (recipe_type={recipe!r}, class={task!r}) is not in the taxonomy"
    return domain, ""


def _task_id(recipe: Any) -> int | None:
    """``recipe_type`` as an int: 12, "12", and 12.0 (a JSON file rewritten by a float-minded tool) are task 12,
    whose videos are in folder ``12``; None for what is not a whole number."""
    if isinstance(recipe, bool):
        return None
    if isinstance(recipe, int):
        return recipe
    number = _number(recipe)
    return int(number) if number is not None and number.is_integer() else None


def _task_folder(recipe: Any) -> str:
    task_id = _task_id(recipe)
    return str(task_id) if task_id is not None else str(recipe)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value is not None else None
    except (TypeError, ValueError):
        return None


def _scan_video_dir(videos_dir: Path, recipe_folders: set[str]) -> dict[tuple[str, str], Path]:
    """``{(subfolder or "", stem): path}`` for DIR/<id>.<ext> and DIR/<recipe_type>/<id>.<ext>, the subfolders
    read being those named in ``recipe_folders``, the recipe types looked up.

    A folder it must read and may not (no read or search permission, an I/O error) is refused in one line naming
    it and the fix (:func:`entries_of`), as the folder source refuses one, not with a traceback. The other
    folders are not read, as none of their videos would be looked up: lost+found at a mount's root (its owner's
    alone), a drive's .Trash-0.
    """
    found: dict[tuple[str, str], Path] = {}

    def add(key: tuple[str, str], path: Path) -> None:
        if key not in found or EXTENSION_RANK[path.suffix.lower()] < EXTENSION_RANK[found[key].suffix.lower()]:
            found[key] = path

    for entry in entries_of(videos_dir):
        if entry.name in recipe_folders and entry.is_dir():
            for inner in entries_of(entry):
                if inner.is_file() and is_video_file(inner):
                    add((entry.name, inner.stem), inner)
        elif entry.is_file() and is_video_file(entry):
            add(("", entry.stem), entry)
    return found


def index_coin(
    annotations: list[Path],
    taxonomy: Path,
    videos_dir: Path,
    out: Path,
    min_duration: float | None = None,
    max_duration: float | None = None,
    probe: bool = True,
    labels: CoinLabels = "domain",
) -> dict[str, Any]:
    """Index COIN videos labelled with their domain (12 classes) or task (180, ``labels="task"``) into ``out``.

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
    by_id, by_task, classes = load_coin_taxonomy(taxonomy, labels)
    if not videos_dir.is_dir():
        raise UserError(
            f"COIN videos folder {videos_dir} does not exist "
            "(create it, even empty, to list what to download; layout DIR/<recipe_type>/<id>.mp4 or DIR/<id>.mp4)"
        )

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
            domain, problem = _coin_label(entry, by_id, by_task, labels)
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

    # The manifest's mtime is when its listing began, as index_folder's is: the next index reuses the probe of a
    # video that has not changed since (unchanged_probes). The pause: a video changed after it was probed must carry
    # a later time, and the clock that stamps files ticks every few ms (CLOCK_TICK_S).
    listed_at = time.time_ns()
    time.sleep(CLOCK_TICK_S)
    on_disk = _scan_video_dir(videos_dir, {_task_folder(entry.get("recipe_type")) for _, entry, *_ in selected})
    rows, missing = [], []
    for video_id, entry, domain, split, duration in selected:
        recipe = entry.get("recipe_type")
        path = on_disk.get((_task_folder(recipe), video_id)) or on_disk.get(("", video_id))
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

    refuse_names_not_utf8(videos_dir, [Path(row["path"]) for row in rows])
    probe_rows(rows, probe, unchanged_probes(out) if probe else None)
    write_manifest(rows, classes, out, source="coin", root=videos_dir)
    os.utime(out, ns=(listed_at, listed_at))
    missing_csv = out.with_suffix(".missing.csv")
    _write_csv(missing_csv, missing, ["youtube_id", "class", "task", "recipe_type", "split", "duration", "video_url"])
    problems_csv = out.with_suffix(".problems.csv")
    if problems:
        _write_csv(problems_csv, problems, ["youtube_id", "file", "problem"])
    else:
        problems_csv.unlink(missing_ok=True)  # a stale list from an earlier run would mislead

    selected_per_class = Counter(domain for _, _, domain, _, _ in selected)
    summary = manifest_summary(rows, classes, out)
    summary.update(
        entries=entries,
        duplicates=duplicates,
        problems=len(problems),
        problem_examples=[f"{p['youtube_id']} ({p['file']}): {p['problem']}" for p in problems[:5]],
        problems_csv=str(problems_csv) if problems else None,
        duration_filter=[min_duration, max_duration],
        filtered_out_by_duration=filtered_out,
        selected=len(selected),
        labels=labels,
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
