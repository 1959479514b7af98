"""Preprocessing throughput against node count, on a multi-node Ray cluster on this machine.

Each layout is a fresh ``vidray.local_cluster.LoopbackCluster`` (``ray start``
nodes on loopback, the way tests/test_multinode.py runs them); a driver process
connected through RAY_ADDRESS, as under ``ray job submit``, runs
``vidray.data.preprocess.preprocess`` twice into fresh directories: *cold* (Ray Data
starts its workers on every node) and *warm* (workers up). Layouts:

``<n>node_<c>cpu``  n nodes of c CPUs each (the head is one of them).

The default set, ``1node_1cpu 2node_1cpu 1node_2cpu``, separates two questions
on a 2-core machine: how throughput grows when a node is added
(2node_1cpu / 1node_1cpu), and what spreading the same CPUs over two nodes
costs compared with one node holding both (2node_1cpu / 1node_2cpu). Every
shard's record says which node decoded it and how long its decode took, so the
result also shows how the work spread. Layouts run interleaved, order rotated
per repeat; ratios are per repeat, then medianed.

    python benchmarks/scaling.py --preset full --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from benchlib import (  # noqa: E402
    command_line, input_totals, loadavg, machine_info, median, now, parse_layout, per_repeat_ratio, start_layout,
    write_result,
)  # fmt: skip
from make_inputs import CACHE, make_inputs  # noqa: E402

DEFAULT_LAYOUTS = ("1node_1cpu", "2node_1cpu", "1node_2cpu")


def run_driver(args: argparse.Namespace) -> None:
    """Inside the cluster: preprocess cold, then warm; print one JSON line."""
    from vidray.cluster import cluster_summary, init_ray
    from vidray.data.preprocess import preprocess
    from vidray.data.shards import RECORDS_DIR

    init_ray()
    phases = {}
    with tempfile.TemporaryDirectory(prefix="vidray-scaling-") as tmp:
        for phase in ("cold", "warm"):
            out = os.path.join(tmp, phase)
            started = time.perf_counter()
            # Every LoopbackCluster node runs on this machine, so a local folder is shared by all of them.
            summary = preprocess(Path(args.manifest), out, frames=args.frames, size=args.size,
                                 videos_per_shard=args.videos_per_shard, shared_filesystem=True)  # fmt: skip
            wall = time.perf_counter() - started
            records = [json.loads(p.read_text()) for p in Path(out, RECORDS_DIR).glob("*.json")]
            per_node = Counter(r["node_id"] for r in records)
            decode_s = Counter()
            for r in records:
                decode_s[r["node_id"]] += r["decode_seconds"] or 0.0
            phases[phase] = {
                "wall_s": round(wall, 3),
                "videos": summary["discovered"],
                "processed": summary["processed"],
                "rejected": summary["rejected"],
                "shards": len(records),
                # Shards and decode seconds per node, busiest first (node ids are per run).
                "shards_per_node": sorted(per_node.values(), reverse=True),
                "decode_s_per_node": sorted((round(v, 2) for v in decode_s.values()), reverse=True),
            }
    print(json.dumps({"cluster": cluster_summary(), **phases["warm"], "phases": phases}))


def run_layout(layout: str, args: argparse.Namespace, manifest: str) -> dict[str, Any]:
    from vidray.local_cluster import LoopbackCluster

    nodes, _ = parse_layout(layout)
    with LoopbackCluster() as cluster:
        cluster_start_s = start_layout(cluster, layout)
        command = [
            sys.executable, os.path.abspath(__file__), "--driver", "--manifest", manifest,
            "--frames", str(args.frames), "--size", str(args.size), "--videos-per-shard", str(args.videos_per_shard),
        ]  # fmt: skip
        env = {**cluster.driver_env(), "PYTHONUNBUFFERED": "1"}
        proc = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"{layout}: driver failed ({proc.returncode}):\n{proc.stderr[-3000:]}")
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    if result["cluster"]["nodes"] != nodes:
        raise RuntimeError(f"{layout}: the driver saw {result['cluster']['nodes']} nodes, expected {nodes}")
    return {"cluster_start_s": round(cluster_start_s, 2), **result}


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preset", default="full", help="input set of make_inputs.py: full, quick or smoke")
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--layouts", nargs="+", default=list(DEFAULT_LAYOUTS), help="<n>node_<c>cpu ...")
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=112)
    # One video per shard: enough Ray tasks for every node even with the 10-video preset.
    parser.add_argument("--videos-per-shard", type=int, default=1)
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/scaling.json)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per driver")
    parser.add_argument("--driver", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--manifest", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.driver:
        run_driver(args)
        return {}

    from vidray.data.index import index_folder

    machine = machine_info()
    root, inputs = make_inputs(args.preset, args.cache)
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="vidray-scaling-manifest-") as tmp:
        manifest = os.path.join(tmp, "manifest.parquet")
        index_folder(root, Path(manifest))
        for repeat in range(args.repeats):
            shift = repeat % len(args.layouts)
            for layout in args.layouts[shift:] + args.layouts[:shift]:
                load_before = loadavg()
                run = {"layout": layout, "repeat": repeat, "load_before": load_before}
                run.update(run_layout(layout, args, manifest))
                run["load_after"] = loadavg()
                run["videos_per_s"] = round(run["processed"] / run["wall_s"], 4)
                cold = run["phases"]["cold"]
                run["cold_videos_per_s"] = round(cold["processed"] / cold["wall_s"], 4)
                runs.append(run)
                print(
                    f"[scaling] repeat {repeat} {layout:12s} warm {run['videos_per_s']:7.3f} videos/s  "
                    f"cold {run['cold_videos_per_s']:7.3f}  shards/node {run['shards_per_node']}  load {load_before}",
                    file=sys.stderr,
                    flush=True,
                )

    summary = {}
    for layout in args.layouts:
        mine = [r for r in runs if r["layout"] == layout]
        summary[layout] = {
            key: median([r[key] for r in mine]) for key in ("videos_per_s", "cold_videos_per_s", "cluster_start_s")
        }
        summary[layout]["shards_per_node"] = [r["shards_per_node"] for r in mine]

    ratios = {}
    for layout in args.layouts:
        for other in args.layouts:
            if layout != other:
                ratios[f"{layout}_over_{other}"] = per_repeat_ratio(runs, "layout", layout, other, "videos_per_s")
    result = {
        "benchmark": "scaling",
        "date": now(),
        "command": command_line(),
        "machine": machine,
        "params": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k not in ("driver", "manifest")},
        "inputs": input_totals(inputs),
        "summary": summary,
        "ratios": ratios,
        "runs": runs,
    }
    write_result("scaling", result, args.out)
    print(json.dumps({"summary": summary, "ratios": ratios}, indent=1))
    return result


if __name__ == "__main__":
    main()
