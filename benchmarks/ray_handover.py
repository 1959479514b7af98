"""How late each dispatcher hands a freed CPU the next task: Ray Data against plain Ray tasks.

Issue 18, item 6: vidray's preprocessing on Ray Data ran below plain decoder processes side by
side. This isolates the dispatch itself from decoding: tasks that only sleep (no CPU), 2 CPUs, the
shape of preprocessing's map (``from_items`` of one row per task, ``map_batches(batch_size=1,
num_cpus=1)``, rows iterated) against the same tasks submitted as plain Ray tasks (what
``data.dispatch=ray_tasks`` does). Each task records its worker process and its start and end;
per worker, the gap between one task's end and the next one's start is the hand-over. Also: the
first task's start after the call (cold: the first call in a fresh cluster; then warm calls).

    python benchmarks/ray_handover.py --tasks 12 --seconds 1.5 --repeats 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import command_line, machine_info, now, write_result  # noqa: E402


def sleeping_task(seconds: float) -> dict:
    started = time.time()
    time.sleep(seconds)
    return {"start": started, "end": time.time(), "pid": os.getpid()}


def timeline(records: list[dict], called_at: float) -> dict:
    by_worker: dict[int, list[dict]] = {}
    for record in sorted(records, key=lambda r: r["start"]):
        by_worker.setdefault(int(record["pid"]), []).append(record)
    gaps = [b["start"] - a["end"] for spans in by_worker.values() for a, b in zip(spans, spans[1:])]
    return {
        "call_s": round(max(r["end"] for r in records) - called_at, 3),
        "first_start_s": round(min(r["start"] for r in records) - called_at, 3),
        "workers": len(by_worker),
        "handover_median_s": round(statistics.median(gaps), 4) if gaps else None,
        "handover_max_s": round(max(gaps), 4) if gaps else None,
    }


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--seconds", type=float, default=1.5, help="each task sleeps this long")
    parser.add_argument("--cpus", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3, help="calls per dispatcher; the first is cold")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args(argv)

    import ray

    results = {}
    for dispatch in ("ray_data", "ray_tasks"):  # each in a fresh cluster: its first call is cold
        ray.init(_node_ip_address="127.0.0.2", num_cpus=args.cpus, include_dashboard=False, log_to_driver=False,
                 object_store_memory=300 * 2**20, runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})  # fmt: skip
        calls = []
        for _ in range(args.repeats):
            called_at = time.time()
            if dispatch == "ray_data":
                import ray.data

                ray.data.DataContext.get_current().enable_progress_bars = False
                ds = ray.data.from_items([{"i": i} for i in range(args.tasks)], override_num_blocks=args.tasks)
                ds = ds.map_batches(
                    lambda batch: {k: [v] for k, v in sleeping_task(args.seconds).items()},
                    batch_size=1, batch_format="numpy", num_cpus=1,
                )  # fmt: skip
                records = [{k: float(v) for k, v in row.items()} for row in ds.iter_rows()]
            else:
                task = ray.remote(num_cpus=1)(sleeping_task)
                records = ray.get([task.remote(args.seconds) for _ in range(args.tasks)])
            calls.append(timeline(records, called_at))
        ray.shutdown()
        ideal = args.tasks * args.seconds / args.cpus
        results[dispatch] = {"cold": calls[0], "warm": calls[1:], "ideal_call_s": ideal}
        print(f"[ray_handover] {dispatch}: {json.dumps(results[dispatch])}", file=sys.stderr, flush=True)
    result = {"benchmark": "ray_handover", "date": now(), "command": command_line(), "machine": machine_info(),
              "params": vars(args) | {"out": str(args.out)}, "results": results}  # fmt: skip
    write_result("ray_handover", result, args.out)
    return result


if __name__ == "__main__":
    main()
