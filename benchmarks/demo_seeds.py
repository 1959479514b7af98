"""The main job's embedded demo, end to end, for several data seeds: does it prove learning every time?

For each ``data.demo.seed`` this runs exactly what `make demo` runs (`python
jobs/tune.py` on the embedded demo config), from nothing: fresh videos,
manifest, dataset and sweep in a scratch folder. It records the wall time
(generation and preprocessing included), every trial's last validation
accuracy, and the best model's held-out test accuracy with frames in order
and shuffled (the frame-order control, and its value within the
time-reversed pairs, where chance is 0.5).

    python benchmarks/demo_seeds.py                       # seeds 0 1 2, the demo as shipped
    python benchmarks/demo_seeds.py --seeds 0 --overrides train.epochs=30   # a design variant

Writes benchmarks/results/demo_seeds.json (or --out) and prints a markdown table.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

from benchlib import command_line, loadavg, machine_info, now, write_result

REPO = Path(__file__).resolve().parents[1]


def run_seed(seed: int, scratch: Path, overrides: list[str], timeout: float) -> dict:
    root = scratch / f"seed{seed}"
    shutil.rmtree(root, ignore_errors=True)
    args = [
        f"data.demo.seed={seed}",
        f"data.videos_dir={root / 'videos'}",
        f"data.manifest={root / 'manifest.parquet'}",
        f"data.dataset_dir={root / 'dataset'}",
        f"run.storage_path={root / 'runs'}",
        f"run.name=demo-seed{seed}",
        *overrides,
    ]
    load_before = loadavg()
    started = time.monotonic()
    proc = subprocess.run(
        [sys.executable, str(REPO / "jobs" / "tune.py"), *args],
        cwd=REPO, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    seconds = time.monotonic() - started
    (root / "console.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    if proc.returncode != 0:
        raise RuntimeError(f"seed {seed}: jobs/tune.py exited {proc.returncode}:\n{proc.stderr[-4000:]}")
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    results = json.loads(Path(summary["results_json"]).read_text())
    best = results["best"]
    control = best["frame_order_control"]
    return {
        "seed": seed,
        "seconds": round(seconds, 1),
        "loadavg_before": load_before,
        "loadavg_after": loadavg(),
        "trials": [
            {"type": t["label"], "status": t["status"], "epochs_done": t["epochs_done"],
             "val_accuracy": t["last"].get("val_accuracy"), "best_val_macro_f1": t["best_value"]}
            for t in results["trials"]
        ],  # fmt: skip
        "best": best["type"],
        "test_accuracy": best["held_out_metrics"]["accuracy"],
        "test_macro_f1": best["held_out_metrics"]["macro_f1"],
        "shuffled_test_accuracy": control["shuffled_accuracy"],
        "pair_accuracy": control.get("in_order_pair_accuracy"),
        "shuffled_pair_accuracy": control.get("shuffled_pair_accuracy"),
        "results_md": summary["results_md"],
        "console_lines": len(proc.stdout.splitlines()) + len(proc.stderr.splitlines()),
    }


def markdown(rows: list[dict]) -> str:
    lines = [
        "| seed | wall time | trials (last val acc) | best | test acc | test acc, frames shuffled "
        "| within-pair acc | within-pair, shuffled (chance 0.5) |",
        "|---:|---:|---|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        trials = "; ".join(f"{t['type'].split(',')[0]} {t['val_accuracy']:.2f}" for t in r["trials"])
        lines.append(
            f"| {r['seed']} | {r['seconds'] / 60:.1f} min | {trials} | {r['best'].split(',')[0]} | {r['test_accuracy']:.3f} "
            f"| {r['shuffled_test_accuracy']:.3f} | {r['pair_accuracy']:.3f} | {r['shuffled_pair_accuracy']:.3f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--overrides", nargs="*", default=[], help="extra dotted overrides for every seed")
    parser.add_argument("--scratch", type=Path, default=REPO / "benchmarks" / ".cache" / "demo_seeds")
    parser.add_argument("--timeout", type=float, default=1800)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    machine = machine_info()
    rows = []
    for seed in args.seeds:
        rows.append(run_seed(seed, args.scratch, args.overrides, args.timeout))
        print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    table = markdown(rows)
    write_result(
        "demo_seeds",
        {"command": command_line(), "date": now(), "machine": machine, "overrides": args.overrides, "runs": rows,
         "markdown": table},
        args.out,
    )  # fmt: skip
    print(table)


if __name__ == "__main__":
    main()
