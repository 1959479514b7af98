"""How long every rank waits in each epoch's ``ray.train.report`` while rank 0's checkpoint is written.

A real ``vidray train`` (vidray.train.driver.build_trainer(...).fit()) on a local Ray
cluster, 2 DDP workers, a scratch ViT-B (86 M parameters: model + AdamW state
~1 GB a checkpoint) on toy clips so the epochs themselves are short. Methods,
each in a fresh process, interleaved over repeats:

``inline``      ``train.checkpoint_in_background=false``: rank 0 writes model/ and the
                training state into a temp dir, Ray uploads it to ``run.storage_path``,
                and only then does the report (a barrier) let every rank go on.
``background``  ``train.checkpoint_in_background=true`` (the default): rank 0 copies the
                state to host memory and hands Ray a function that writes and uploads it
                on Ray's checkpoint-upload thread while training goes on.

The figure is each epoch's ``last_report_wait_s`` (the slowest rank's time inside
the previous epoch's report, which the training loop records), so epochs 1..N-1.

    python benchmarks/checkpoint_wait.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import command_line, loadavg, machine_info, median, now, per_repeat_ratio, run_json_subprocess, write_result  # noqa: E402

CACHE = Path(__file__).resolve().parent / ".cache"
METHODS = {"inline": "false", "background": "true"}


def run_method(args: argparse.Namespace) -> dict[str, Any]:
    import ray

    from vidray.model.checkpoint import INFO
    from vidray.cluster import LOOPBACK_IP
    from vidray.config import load_config
    from vidray.train.driver import build_trainer

    ray.init(
        _node_ip_address=LOOPBACK_IP,  # loopback only (vidray.cluster.LOOPBACK_IP)
        num_cpus=args.cpus,
        include_dashboard=False,
        object_store_memory=500_000_000,
        log_to_driver=False,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    with tempfile.TemporaryDirectory(prefix="vidray-bench-ckpt-") as storage:
        cfg = load_config(
            None,
            [
                f"data.dataset_dir={args.dataset}", "data.frames=4", "data.size=32", "data.stored_frames=8",
                "data.stored_size=37", "model.init=scratch", f"model.size={args.model}",
                f"train.epochs={args.epochs}", "train.batch_size=4", f"train.num_workers={args.workers}",
                f"train.cpus_per_worker={args.cpus / args.workers:g}", "train.log_every_steps=0",
                f"train.checkpoint_in_background={METHODS[args.worker]}", f"run.storage_path={storage}", "run.name=bench",
            ],
        )  # fmt: skip
        started = time.perf_counter()
        result = build_trainer(cfg).fit()
        fit_s = time.perf_counter() - started
        checkpoint = Path(result.checkpoint.path)
        history = json.loads((checkpoint / INFO).read_text())["history"]
        size = sum(f.stat().st_size for f in checkpoint.rglob("*") if f.is_file())
    ray.shutdown()
    waits = [h["last_report_wait_s"] for h in history if "last_report_wait_s" in h]
    return {
        "fit_s": round(fit_s, 2),
        "checkpoint_mb": round(size / 1e6, 1),
        "report_wait_s": [round(w, 3) for w in waits],
        "median_report_wait_s": median(waits),
        "epoch_train_s": [round(h["step_s"] * h["global_step"] / (h["epoch"] + 1), 3) for h in history],
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--model", default="base", choices=["tiny", "small", "base"])
    parser.add_argument("--cpus", type=int, default=min(os.cpu_count() or 2, 2))
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None)
    parser.add_argument("--timeout", type=float, default=900)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--dataset", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(run_method(args)))
        return {}

    import train_step

    dataset = args.cache / "ckpt-data-16x8x37"
    train_step.build_dataset(dataset, 16, 8, 8, 37, 4, 32)
    runs = []
    methods = list(METHODS)
    for repeat in range(args.repeats):
        for method in methods[repeat % 2 :] + methods[: repeat % 2]:
            load_before = loadavg()
            argv_ = [__file__, "--worker", method, "--dataset", str(dataset), "--epochs", str(args.epochs),
                     "--workers", str(args.workers), "--model", args.model, "--cpus", str(args.cpus)]  # fmt: skip
            result = run_json_subprocess(argv_, timeout=args.timeout)
            runs.append({"method": method, "repeat": repeat, "load_before": load_before, "load_after": loadavg(), **result})
            print(f"[checkpoint_wait] repeat {repeat} {method:10s} waits {result['report_wait_s']} s, "
                  f"checkpoint {result['checkpoint_mb']} MB, load {load_before}", file=sys.stderr, flush=True)  # fmt: skip
    summary = {
        method: {
            "median_report_wait_s": median([w for r in runs if r["method"] == method for w in r["report_wait_s"]]),
            "fit_s": median([r["fit_s"] for r in runs if r["method"] == method]),
            "checkpoint_mb": median([r["checkpoint_mb"] for r in runs if r["method"] == method]),
        }
        for method in methods
    }
    summary["inline_over_background_wait"] = per_repeat_ratio(runs, "method", "inline", "background", "median_report_wait_s")
    result = {
        "benchmark": "checkpoint_wait",
        "date": now(),
        "command": command_line(),
        "machine": machine_info(),
        "params": {"repeats": args.repeats, "epochs": args.epochs, "workers": args.workers, "model": args.model, "cpus": args.cpus},
        "summary": summary,
        "runs": runs,
    }
    write_result("checkpoint_wait", result, args.out)
    print(json.dumps(summary, indent=1))
    return result


if __name__ == "__main__":
    main()
