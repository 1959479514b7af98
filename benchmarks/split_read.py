"""Seconds and CPU-seconds for the driver to read a dataset's train and val splits into Ray's object store
(what a fine-tuning run does before it trains: vidray/data/dataset.py read_split, then materialize), by
how Ray Data's Parquet footer readers are sized (vidray/compat.py parquet_footer_readers_for), taken in
turns on one local Ray:

* ``ray_default``: Ray's own, 32 reader actors per read_parquet, 10 footers per call;
* ``per_10_shards``: vidray's earlier sizing, one reader per 10 shards, 10 footers per call;
* ``vidray``: today's, one reader per 4,096 shards, 128 footers per call.

Every method must give the same blocks (rows per block, in order): the sizing changes who reads the
footers, not what is read. CPU is every process of this driver's Ray (benchlib.ProcessTreeCPU).

    python benchmarks/split_read.py DATASET_DIR --repeats 5 --cpus 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import ProcessTreeCPU, command_line, cpu_delta, loadavg, machine_info, median, now, write_result  # noqa: E402

from vidray.compat import PARQUET_FOOTER_BATCH_ENV, PARQUET_FOOTER_READERS_ENV  # noqa: E402
from vidray.data.dataset import read_dataset_info, read_split, split_shards  # noqa: E402

METHODS = ("ray_default", "per_10_shards", "vidray")


def pool_env(method: str, shards: int) -> dict[str, str]:
    """The environment that sizes one read's pool as ``method`` does (set, vidray's shim leaves it be)."""
    if method == "ray_default":
        return {PARQUET_FOOTER_READERS_ENV: "32", PARQUET_FOOTER_BATCH_ENV: "10"}
    if method == "per_10_shards":
        return {PARQUET_FOOTER_READERS_ENV: str(min(32, -(-shards // 10))), PARQUET_FOOTER_BATCH_ENV: "10"}
    return {}


def read_splits(dataset_dir: str, method: str, tracker: ProcessTreeCPU) -> dict:
    info = read_dataset_info(dataset_dir)
    blocks, wall, cpu = {}, 0.0, {}
    for split in ("train", "val"):
        env = pool_env(method, len(split_shards(dataset_dir, info, split)[1]))
        os.environ.update(env)
        try:
            tracker.poll()
            before = tracker.totals()
            start = time.perf_counter()
            dataset = read_split(dataset_dir, split).materialize()
            wall += time.perf_counter() - start
            tracker.poll()
            cpu = {k: round(cpu.get(k, 0.0) + v, 3) for k, v in cpu_delta(tracker.totals(), before).items()}
        finally:
            for name in env:
                os.environ.pop(name, None)
        blocks[split] = [meta.num_rows for bundle in dataset.iter_internal_ref_bundles() for meta in bundle.metadata]
    return {"wall_s": round(wall, 3), "cpu_s": cpu, "blocks": blocks}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    for name in (PARQUET_FOOTER_READERS_ENV, PARQUET_FOOTER_BATCH_ENV):
        os.environ.pop(name, None)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    tracker = ProcessTreeCPU(interval=0.1).start()
    reference = read_splits(args.dataset_dir, "vidray", tracker)["blocks"]  # warm-up: files in the page cache
    runs: dict[str, list[dict]] = {method: [] for method in METHODS}
    for repeat in range(args.repeats):
        order = METHODS[repeat % len(METHODS) :] + METHODS[: repeat % len(METHODS)]
        for method in order:
            run = read_splits(args.dataset_dir, method, tracker)
            if run.pop("blocks") != reference:
                raise SystemExit(f"{method}: other blocks than the reference read")
            runs[method].append(run)
            print(method, run["wall_s"], run["cpu_s"]["total"], loadavg(), file=sys.stderr, flush=True)
    tracker.stop()
    ray.shutdown()
    medians = {
        method: {"wall_s": median([r["wall_s"] for r in rs]), "cpu_s": median([r["cpu_s"]["total"] for r in rs])}
        for method, rs in runs.items()
    }
    payload = {
        "benchmark": "split_read", "when": now(), "command": command_line(), "machine": machine_info(),
        "dataset": args.dataset_dir, "blocks": {split: len(rows) for split, rows in reference.items()},
        "runs": runs, "median": medians,
        "ratios": {
            f"{method}_over_vidray": {k: round(medians[method][k] / medians["vidray"][k], 2) for k in ("wall_s", "cpu_s")}
            for method in METHODS[:-1]
        },
    }  # fmt: skip
    print(write_result("split_read", payload, args.out))
    print(medians, payload["ratios"])


if __name__ == "__main__":
    main()
