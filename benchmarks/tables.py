"""Print the markdown tables of docs/benchmarks.md from result files.

    python benchmarks/tables.py benchmarks/results/preprocess.json benchmarks/results/train_step_tiny.json
"""

from __future__ import annotations

import json
import statistics
import sys
from pathlib import Path


def _fmt(value, digits: int = 3) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}g}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


def _loads(result: dict) -> str:
    loads = [r["load_before"] for r in result["runs"]] + [r["load_after"] for r in result["runs"]]
    return f"{min(loads):.1f}-{max(loads):.1f}"


def preprocess_table(result: dict) -> str:
    summary, ratios = result["summary"], result["ratios"]
    reference = "decord_1thread" if "decord_1thread" in summary else None
    lines = [
        "| method | videos/s | output frames/s | decode frames/s | CPU-s / video | vs decord_1thread |",
        "|---|---|---|---|---|---|",
    ]
    for method, row in summary.items():
        ratio = "1" if method == reference else _fmt(ratios.get(f"{method}_over_{reference}"))
        lines.append(
            f"| `{method}` | {_fmt(row['videos_per_s'])} | {_fmt(row['output_frames_per_s'])} | "
            f"{_fmt(row['decode_frames_per_s'])} | {_fmt(row['cpu_s_per_video'])} | {ratio} |"
        )
    inputs = result["inputs"]
    lines.append("")
    lines.append(
        f"{inputs['videos']} videos, {inputs['seconds']:.0f} s, {inputs['source_frames']} frames "
        f"({inputs['frames_to_decode']} must be decoded for the samples), {inputs['megabytes']} MB; "
        f"{result['params']['stored_frames']} x {result['params']['stored_size']}² stored per video; "
        f"median of {result['params']['repeats']} repeats; 1-min load average during the runs {_loads(result)}."
    )
    return "\n".join(lines)


def vidray_phases_table(result: dict) -> str:
    lines = [
        "| method | ray.init s | cold videos/s | warm videos/s | warm CPU-s / video: workers / driver / Ray system |",
        "|---|---|---|---|---|",
    ]
    for method, row in result["summary"].items():
        if "cold_videos_per_s" not in row:
            continue
        runs = [r for r in result["runs"] if r["method"] == method]
        split = " / ".join(
            _fmt(statistics.median(r["cpu_s"][k] / r["clips"] for r in runs), 2)
            for k in ("ray_workers", "driver", "ray_system")
        )
        lines.append(
            f"| `{method}` | {_fmt(row['ray_init_s'])} | {_fmt(row['cold_videos_per_s'])} | "
            f"{_fmt(row['videos_per_s'])} | {split} |"
        )
    return "\n".join(lines)


def train_table(result: dict) -> str:
    lines = [
        "| model @ size | method | torch threads | clips/s | within-epoch clips/s | data wait | within-epoch data wait "
        "| epoch restart s | augment s/step | model s/step | achieved GFLOP/s | of GEMM rate |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for key, entry in result["summary"].items():
        for method, row in entry["methods"].items():
            if row["clips_per_s"] is None:
                continue
            gflops = None if row["achieved_tflops"] is None else row["achieved_tflops"] * 1000
            lines.append(
                f"| {key} | `{method}` | {_fmt(row['torch_threads'])} | {_fmt(row['clips_per_s'])} | "
                f"{_fmt(row['within_epoch_clips_per_s'])} | {_fmt(row['data_wait_share'], 2)} | "
                f"{_fmt(row['within_epoch_data_wait_share'], 2)} | {_fmt(row['epoch_start_wait_s'])} | "
                f"{_fmt(row['augment_s_per_step'])} | {_fmt(row['model_s_per_step'])} | {_fmt(gflops)} | "
                f"{_fmt(row['fraction_of_gemm_rate'], 2)} |"
            )
    params = result["params"]
    gemm = ", ".join(f"{k} thread(s) {v['tflops'] * 1000:.0f} GFLOP/s" for k, v in result["gemm"].items())
    lines.append("")
    lines.append(
        f"Batch {params['batch']}, {params['frames']} frames, {params['steps']} timed steps after {params['warmup']} "
        f"warm-up, {params['videos']} training videos ({params['videos'] // params['batch']} steps an epoch), "
        f"median of {params['repeats']} repeats; fp32 GEMM ceiling: {gemm}; "
        f"1-min load average during the runs {_loads(result)}."
    )
    return "\n".join(lines)


def scaling_table(result: dict) -> str:
    lines = [
        "| layout | nodes x CPUs | cluster start s | cold videos/s | warm videos/s | shards per node (warm, per repeat) |",
        "|---|---|---|---|---|---|",
    ]
    for layout, row in result["summary"].items():
        nodes, _, cpus = layout.partition("node_")
        spread = "; ".join("/".join(str(n) for n in per_node) for per_node in row["shards_per_node"])
        lines.append(
            f"| `{layout}` | {nodes} x {cpus.removesuffix('cpu')} | {_fmt(row['cluster_start_s'])} | "
            f"{_fmt(row['cold_videos_per_s'])} | {_fmt(row['videos_per_s'])} | {spread} |"
        )
    ratios = ", ".join(f"{k.replace('_over_', ' / ')} = {_fmt(v)}" for k, v in result["ratios"].items())
    inputs = result["inputs"]
    lines.append("")
    lines.append(
        f"{inputs['videos']} videos ({inputs['seconds']} s, {inputs['megabytes']} MB), "
        f"{result['params']['videos_per_shard']} video(s) per shard, median of {result['params']['repeats']} repeats; "
        f"ratios (per repeat, then median): {ratios}; 1-min load average during the runs {_loads(result)}."
    )
    return "\n".join(lines)


def main() -> None:
    for path in sys.argv[1:]:
        result = json.loads(Path(path).read_text())
        print(f"### {path}\n")
        if result["benchmark"] == "preprocess":
            print(preprocess_table(result) + "\n")
            print(vidray_phases_table(result) + "\n")
        elif result["benchmark"] == "scaling":
            print(scaling_table(result) + "\n")
        else:
            print(train_table(result) + "\n")


if __name__ == "__main__":
    main()
