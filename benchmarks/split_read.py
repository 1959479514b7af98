"""Seconds for the driver to read a dataset's train and val splits into Ray's object store (what a
fine-tuning run does before it trains: vidray/data/dataset.py read_split, then materialize), with
vidray's footer-reader pool (one reader per 10 shards, vidray/compat.py parquet_footer_readers_for)
against Ray Data's default (32 reader actors per read_parquet), taken in turns on one local Ray.

    python benchmarks/split_read.py DATASET_DIR --repeats 5 --cpus 2
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command_line, loadavg, machine_info, median, now, write_result  # noqa: E402

from vidray.compat import PARQUET_FOOTER_READERS_ENV  # noqa: E402
from vidray.data.dataset import read_split  # noqa: E402


def read_splits(dataset_dir: str, ray_default: bool) -> float:
    if ray_default:
        os.environ[PARQUET_FOOTER_READERS_ENV] = "32"  # Ray's own default, set: vidray then leaves it alone
    try:
        start = time.perf_counter()
        for split in ("train", "val"):
            read_split(dataset_dir, split).materialize()
        return time.perf_counter() - start
    finally:
        os.environ.pop(PARQUET_FOOTER_READERS_ENV, None)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dataset_dir")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    os.environ.pop(PARQUET_FOOTER_READERS_ENV, None)

    import ray

    ray.init(num_cpus=args.cpus, include_dashboard=False, log_to_driver=False)
    read_splits(args.dataset_dir, ray_default=False)  # warm-up: workers started, files in the page cache
    runs: dict[str, list[float]] = {"ray_default": [], "vidray": []}
    for repeat in range(args.repeats):
        for method in ("ray_default", "vidray") if repeat % 2 == 0 else ("vidray", "ray_default"):
            runs[method].append(round(read_splits(args.dataset_dir, method == "ray_default"), 3))
            print(method, runs[method][-1], loadavg(), file=sys.stderr, flush=True)
    ray.shutdown()
    medians = {m: median(v) for m, v in runs.items()}
    payload = {"benchmark": "split_read", "when": now(), "command": command_line(), "machine": machine_info(),
               "dataset": args.dataset_dir, "runs": runs, "median_s": medians,
               "speedup": round(medians["ray_default"] / medians["vidray"], 2)}  # fmt: skip
    print(write_result("split_read", payload, args.out))
    print(medians, payload["speedup"])


if __name__ == "__main__":
    main()
