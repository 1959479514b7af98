"""Time to a streamed train split's first batch, and to its last, by how its order is made (what a run that does
not cache its data does every epoch), taken in turns on one local Ray whose object store is smaller than the split:

* ``randomize_block_order``: the read, then Ray's ``randomize_block_order(seed)`` (vidray before 4eb4581). Ray
  plans it as an all-to-all operator: it takes every block of the split before it passes one on, so the whole
  split goes through the object store (spilled to disk past its size) before the first batch;
* ``seeded_shards``: the shards read in a seeded order (``vidray.data.dataset.read_splits_in_order``, today's),
  a plain streaming read.

Both must give every row once. The split: synthetic raw clips written as `vidray preprocess` writes shards.

    python benchmarks/stream_order.py --shards 128 --rows 8 --clip-mib 1.5 --object-store-mib 256 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import command_line, machine_info, median, now, write_result  # noqa: E402

METHODS = ("randomize_block_order", "seeded_shards")


def write_split(root: Path, shards: int, rows: int, clip_bytes: int) -> None:
    """``shards`` Parquet shards of ``rows`` raw clips each in ``root``/train (and one small val shard)."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    from vidray.data.dataset import DATASET_INFO, SHARD_SCHEMA

    rng = np.random.default_rng(0)
    names, side = [], int((clip_bytes / 3 / 16) ** 0.5)
    for split, count in (("train", shards), ("val", 1)):
        (root / split).mkdir(parents=True)
        for k in range(count):
            table = pa.Table.from_pylist([
                dict(video=rng.integers(0, 255, 16 * side * side * 3, np.uint8).tobytes(), label=i % 2, label_name=f"c{i % 2}",
                     video_id=f"{split}{k}-{i}", path=f"/x/{split}{k}-{i}.mp4", source_frames=16, padded=False)
                for i in range(rows)
            ], schema=SHARD_SCHEMA)  # fmt: skip
            pq.write_table(table, root / split / f"shard-{k:04d}.parquet")
            names.append(f"{split}/shard-{k:04d}.parquet")
    info = dict(classes=["c0", "c1"], frames=16, size=side, stored_frames=16, stored_size=side, shards=names,
                splits={"train": {"videos": shards * rows}, "val": {"videos": rows}})  # fmt: skip
    (root / DATASET_INFO).write_text(json.dumps(info))


def stream(dataset_dir: str, method: str, seed: int) -> dict:
    from vidray.data.dataset import read_split, read_splits_in_order

    start = time.perf_counter()
    if method == "randomize_block_order":
        ds = read_split(dataset_dir, "train").randomize_block_order(seed=seed)
    else:
        ds = read_splits_in_order(dataset_dir, ["train"], seed)
    first, rows = None, 0
    for batch in ds.iter_batches(batch_size=8, batch_format="pyarrow"):
        first = first or time.perf_counter() - start
        rows += batch.num_rows
    wall = time.perf_counter() - start
    # Ray Data's own account of the run: what its blocks overflowed the object store with (spilled to disk).
    spilled = re.search(r"Spilled to disk: ([0-9.]+) ?MB", ds.stats())
    return {"first_batch_s": round(first, 3), "all_s": round(wall, 3), "rows": rows,
            "spilled_mib": float(spilled.group(1)) if spilled else None}  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shards", type=int, default=128)
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--clip-mib", type=float, default=1.5)
    parser.add_argument("--object-store-mib", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()

    import ray
    import ray.data

    with tempfile.TemporaryDirectory(prefix="vidray-stream-order-") as tmp:
        write_split(Path(tmp), args.shards, args.rows, int(args.clip_mib * 2**20))
        split_mib = sum(p.stat().st_size for p in Path(tmp, "train").iterdir()) / 2**20
        ray.init(num_cpus=args.cpus, object_store_memory=args.object_store_mib * 2**20, include_dashboard=False,
                 log_to_driver=False)  # fmt: skip
        ray.data.DataContext.get_current().execution_options.preserve_order = True  # as a run streams
        ray.data.DataContext.get_current().enable_progress_bars = False
        for method in METHODS:  # untimed: Ray's workers start, the files are in the page cache for both
            stream(tmp, method, seed=3)
        runs = {method: [] for method in METHODS}
        for repeat in range(args.repeats):
            for method in METHODS if repeat % 2 == 0 else METHODS[::-1]:  # in turns: drift falls on both
                runs[method].append(stream(tmp, method, seed=3))
                print(method, runs[method][-1], flush=True)
        ray.shutdown()
    expected = args.shards * args.rows
    assert all(run["rows"] == expected for method in METHODS for run in runs[method]), runs
    summary = {method: {key: median([run[key] for run in runs[method]]) for key in ("first_batch_s", "all_s", "spilled_mib")}
               for method in METHODS}  # fmt: skip
    ratios = {key: round(summary["randomize_block_order"][key] / summary["seeded_shards"][key], 2) for key in ("first_batch_s", "all_s")}
    result = {"command": command_line(), "when": now(), "machine": machine_info(), "split_mib": round(split_mib, 1), "object_store_mib": args.object_store_mib, "runs": runs,
              "median": summary, "randomize_over_seeded": ratios}  # fmt: skip
    print(json.dumps({"split_mib": result["split_mib"], "median": summary, "randomize_over_seeded": ratios}, indent=1))
    write_result("stream_order", result, args.out)


if __name__ == "__main__":
    main()
