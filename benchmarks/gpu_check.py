"""The prepared GPU check: what vidray's GPU path does on one H100/H200, in under 8 minutes, in one JSON.

    bash benchmarks/gpu_check.sh                         # on the GPU machine (wraps this script)
    bash benchmarks/gpu_check.sh --device cpu --quick    # dry run of every section on a CPU

Sections, in order, each in its own process with its own timeout inside one overall
budget (``--budget``, default 450 s; gpu_check.sh kills everything at 470 s). The
JSON (``benchmarks/results/gpu_check.json``, or ``--out``) is rewritten after every
section, so a check that runs out of time still leaves what it measured, and a
section that fails or times out is recorded as such with the end of its output:

``environment``   device, driver, library versions, the bf16 peak MFU is taken against.
``inputs``        the synthetic datasets (vidray's shard layout, 32x128² and 32x256² stored
                  clips; benchmarks/train_step.py: build_dataset), cached in benchmarks/.cache.
``vit_b_112``     benchmarks/train_step.py, ViT-B 16x112², batch 32: the full training step on
                  the device path (``raytrain_device``) and streamed (``raytrain``): clips/s,
                  achieved TFLOP/s, MFU, data-wait share, peak memory; and the data path alone
                  (``ingest_device``, ``ingest``).
``vit_b_224``     the same at 16x224² (``raytrain_device``).
``ray_train``     a 2-epoch run of the real loop (vidray.trainer.build_trainer(...).fit()) on the
                  GPU, ViT-B 16x112², cache_dataset=auto: its history with the step telemetry
                  (step time, data-wait share, clips/s, TFLOP/s, MFU), the data placement and the
                  ranks' wait in each epoch's report (the checkpoint).
``gpu_decode``    preprocessing's decode (vidray.video.read_clip) of generated 720p/360p H.264 with
                  torchcodec on CUDA (NVDEC) against torchcodec and PyAV on one CPU thread: videos/s.
``vit_b_112_compiled``  ``raytrain_device`` with ``--compile`` (train.compile), only when the
                  budget has room left for it.

``--device cpu --quick`` runs the same sections at toy sizes (tiny model, 4x32² clips) so
every code path runs on a CPU in a few minutes; its figures mean nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from benchlib import command_line, kill_tree, loadavg, machine_info, now, write_result  # noqa: E402

CACHE = HERE / ".cache"
# Seconds kept back from the budget for writing the result after the last section.
RESERVE_S = 10
# The section subprocess running now: killed with its tree when this process is told to stop (SIGTERM
# from gpu_check.sh's hard limit), so no Ray cluster outlives the check.
_running: set[int] = set()


def _stop(signum, frame) -> None:
    for pid in list(_running):
        kill_tree(pid)
    raise SystemExit(f"gpu_check: stopped by signal {signum}")


@dataclass(frozen=True)
class Sizes:
    """What a mode measures: the GPU set, or the toy set of the CPU dry run."""

    model: str
    frames: int
    sizes: tuple[int, int]  # (the main size, the large one)
    batch: int
    videos: int  # training videos at the main size
    large_videos: int
    steps: int
    warmup: int
    log_every: int


GPU = Sizes(model="base", frames=16, sizes=(112, 224), batch=32, videos=256, large_videos=64, steps=30, warmup=5, log_every=4)
QUICK = Sizes(model="tiny", frames=4, sizes=(32, 48), batch=4, videos=16, large_videos=8, steps=3, warmup=1, log_every=2)


@dataclass(frozen=True)
class Section:
    name: str
    run: Callable[[argparse.Namespace, Sizes, float], dict[str, Any]]
    max_s: float  # its own timeout (less when the budget has less left)
    min_s: float  # skipped when the budget has less than this left
    optional: bool = False


# --------------------------------------------------------------------------- running things in bounded time


def run_bounded(argv: list[str], timeout: float) -> tuple[int | None, str, float]:
    """(return code or None on timeout, the output's tail, seconds) of ``python argv`` killed with its
    whole process tree (a Ray cluster included) when it outlives ``timeout``."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    started = time.perf_counter()
    with tempfile.TemporaryFile(mode="w+") as log:
        proc = subprocess.Popen([sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, env=env)
        _running.add(proc.pid)
        try:
            code: int | None = proc.wait(timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            kill_tree(proc.pid)
            proc.wait()
            code = None
        finally:
            _running.discard(proc.pid)
        log.seek(0)
        tail = log.read()[-4000:]
    return code, tail, time.perf_counter() - started


def _train_step(args, sizes: Sizes, timeout: float, size: int, videos: int, methods: list[str], *extra: str) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="vidray-gpu-check-") as tmp:
        out = Path(tmp) / "train_step.json"
        argv = [
            str(HERE / "train_step.py"), "--device", args.device, "--models", sizes.model, "--sizes", str(size),
            "--frames", str(sizes.frames), "--batch", str(sizes.batch), "--steps", str(sizes.steps),
            "--warmup", str(sizes.warmup), "--repeats", "1", "--videos", str(videos), "--cpus", str(args.cpus),
            "--cpus-per-worker", str(args.cpus_per_worker), "--methods", *methods, "--cache", str(args.cache),
            # Its per-method timeout never fires first: this section's own kills the whole tree.
            "--gemm-seconds", "1", "--timeout", str(timeout + 60), "--out", str(out), *extra,
        ]  # fmt: skip
        code, tail, _ = run_bounded(argv, timeout)
        if code != 0:
            raise SectionError("timed out" if code is None else f"exit {code}", tail)
        measured = json.loads(out.read_text())
    key = f"{sizes.model}@{size}"
    entry = measured["summary"][key]
    return {
        "command": measured["command"],
        "train_gflops_per_clip": entry["train_gflops_per_clip"],
        "methods": entry["methods"],
        "ratios": entry["ratios"],
        "gemm": measured["gemm"],
        "bf16_peak_tflops": measured["bf16_peak_tflops"],
        "runs": measured["runs"],
    }


class SectionError(RuntimeError):
    def __init__(self, status: str, tail: str):
        super().__init__(status)
        self.status, self.tail = status, tail


# --------------------------------------------------------------------------- sections


def section_environment(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    import torch

    from vidray.telemetry import device_peak_tflops

    info: dict[str, Any] = {"machine": machine_info()}
    if args.device == "cuda":
        props = torch.cuda.get_device_properties(0)
        info.update(
            device=props.name,
            memory_gib=round(props.total_memory / 2**30, 1),
            capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            bf16_peak_tflops=device_peak_tflops(props.name),
        )
        try:
            smi = subprocess.run(
                ["nvidia-smi", "--query-gpu=name,driver_version,power.limit,clocks.max.sm", "--format=csv,noheader"],
                capture_output=True, text=True, timeout=20,
            )  # fmt: skip
            info["nvidia_smi"] = smi.stdout.strip()
        except (OSError, subprocess.TimeoutExpired) as err:
            info["nvidia_smi"] = f"unavailable: {err}"
    return info


def section_inputs(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    code = (
        "import sys, json, time; sys.path.insert(0, {here!r}); import train_step; from pathlib import Path; "
        "from vidray.preprocess import default_stored; out = {{}}\n"
        "for size, videos in {plan!r}:\n"
        "    sf, ss = default_stored({frames}, size, None, None); t = time.perf_counter()\n"
        "    path = Path({cache!r}) / f'train-data-{{videos}}x{{sf}}x{{ss}}'\n"
        "    train_step.build_dataset(path, videos, max({batch}, 8), sf, ss, {frames}, size)\n"
        "    out[str(size)] = {{'path': str(path), 'stored': [sf, ss], 'videos': videos, 'seconds': round(time.perf_counter() - t, 1)}}\n"
        "Path({result!r}).write_text(json.dumps(out))"
    ).format(
        here=str(HERE),
        plan=[(sizes.sizes[0], sizes.videos), (sizes.sizes[1], sizes.large_videos)],
        frames=sizes.frames,
        cache=str(args.cache),
        batch=sizes.batch,
        result="{result}",
    )
    return _run_for_result(lambda result: ["-c", code.replace("{result}", result)], timeout)


def _run_for_result(argv_for: Callable[[str], list[str]], timeout: float) -> dict[str, Any]:
    """Run ``python argv_for(result_file)`` within ``timeout``; it writes its JSON result to that file."""
    with tempfile.TemporaryDirectory(prefix="vidray-gpu-check-") as tmp:
        result = os.path.join(tmp, "result.json")
        code, tail, _ = run_bounded(argv_for(result), timeout)
        if code != 0 or not os.path.isfile(result):
            raise SectionError("timed out" if code is None else f"exit {code}", tail)
        with open(result) as f:
            return json.load(f)


def section_vit_b_112(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    methods = ["raytrain_device", "raytrain", "ingest_device", "ingest"]
    return _train_step(args, sizes, timeout, sizes.sizes[0], sizes.videos, methods)


def section_vit_b_224(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    return _train_step(args, sizes, timeout, sizes.sizes[1], sizes.large_videos, ["raytrain_device"])


def section_vit_b_112_compiled(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    return _train_step(args, sizes, timeout, sizes.sizes[0], sizes.videos, ["raytrain_device"], "--compile")


def section_ray_train(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    argv = [str(Path(__file__).resolve()), "--ray-train-worker", "--device", args.device, "--cpus", str(args.cpus)]
    argv += ["--cache", str(args.cache)] + (["--quick"] if args.quick else [])
    return _run_for_result(lambda result: [*argv, "--result-file", result], timeout)


def section_gpu_decode(args, sizes: Sizes, timeout: float) -> dict[str, Any]:
    argv = [str(Path(__file__).resolve()), "--gpu-decode-worker", "--device", args.device, "--cache", str(args.cache)]
    return _run_for_result(lambda result: [*argv, *(["--quick"] if args.quick else []), "--result-file", result], timeout)


def gpu_decode_worker(args) -> dict[str, Any]:
    """In its own process: vidray's preprocessing decode (``read_clip``, 16 frames at 128 px from
    each video) of the same H.264 files with torchcodec on the GPU (NVDEC) and on the CPU, and
    with PyAV (the default) on one CPU thread: videos/s of each, one decode at a time.

    The inputs are generated (two 720p and two 360p, 5 s at 30 fps; toy sizes with ``--quick``)
    and cached. torchcodec on CUDA needs its CUDA build next to a CUDA torch (``pip install
    torchcodec==0.17.0``, not constraints.txt's CPU pin) and FFmpeg's shared libraries; when
    it cannot run, the section says why and still measures the CPU decoders.
    """
    import numpy as np

    from vidray.video import encode_mp4, read_clip

    plan = [(64, 36, 30)] * 2 if args.quick else [(1280, 720, 150)] * 2 + [(640, 360, 150)] * 2
    folder = Path(args.cache) / ("gpu-decode-quick" if args.quick else "gpu-decode")
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    rng = np.random.default_rng(0)
    for index, (width, height, frames) in enumerate(plan):
        path = folder / f"clip{index}_{width}x{height}.mp4"
        if not path.exists():
            base = rng.integers(0, 255, (height // 8, width // 8, 3), dtype=np.uint8).repeat(8, 0).repeat(8, 1)
            clip = np.stack([np.roll(base, 4 * t, axis=1) for t in range(frames)])  # moving texture
            encode_mp4(path, clip)
        paths.append(path)

    def timed(decoder: str, device: str) -> dict[str, Any]:
        try:
            read_clip(paths[0], 16, 128, decoder=decoder, device=device, num_threads=1)  # warm-up: load, init
            started = time.perf_counter()
            for path in paths:
                read_clip(path, 16, 128, decoder=decoder, device=device, num_threads=1)
            seconds = time.perf_counter() - started
        except Exception as err:  # noqa: BLE001 - a backend that cannot run here is a finding, not a crash
            return {"status": f"unavailable: {type(err).__name__}: {str(err)[:300]}"}
        return {"status": "ok", "videos": len(paths), "seconds": round(seconds, 3), "videos_per_s": round(len(paths) / seconds, 2)}

    gpu = args.device == "cuda"
    result = {
        "inputs": [f"{w}x{h}, {f} frames" for w, h, f in plan],
        "pyav_cpu_1thread": timed("pyav", "cpu"),
        "torchcodec_cpu_1thread": timed("torchcodec", "cpu"),
        "torchcodec_cuda": timed("torchcodec", "cuda") if gpu else {"status": "not run: --device cpu"},
    }
    if gpu and result["torchcodec_cuda"]["status"] == "ok" and result["pyav_cpu_1thread"]["status"] == "ok":
        import torch

        result["peak_memory_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 3)
        result["cuda_over_pyav_1thread"] = round(
            result["torchcodec_cuda"]["videos_per_s"] / result["pyav_cpu_1thread"]["videos_per_s"], 2
        )
    return result


def ray_train_worker(args) -> dict[str, Any]:
    """In its own process: a 2-epoch `vidray train` through build_trainer on the synthetic dataset."""
    import ray

    from vidray.checkpoint import INFO
    from vidray.config import load_config
    from vidray.preprocess import default_stored
    from vidray.trainer import build_trainer

    sizes = QUICK if args.quick else GPU
    size = sizes.sizes[0]
    stored_frames, stored_size = default_stored(sizes.frames, size, None, None)
    dataset = Path(args.cache) / f"train-data-{sizes.videos}x{stored_frames}x{stored_size}"
    cpus_per_worker = 1 if args.quick else max(2, args.cpus // 2)
    ray.init(
        num_cpus=args.cpus,
        num_gpus=1 if args.device == "cuda" else 0,
        include_dashboard=False,
        log_to_driver=True,
        runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
    )
    with tempfile.TemporaryDirectory(prefix="vidray-gpu-check-run-") as storage:
        cfg = load_config(
            None,
            [
                f"data.dataset_dir={dataset}", f"data.frames={sizes.frames}", f"data.size={size}",
                f"data.stored_frames={stored_frames}", f"data.stored_size={stored_size}",
                "model.init=scratch", f"model.size={sizes.model}", "train.epochs=2",
                f"train.batch_size={sizes.batch}", "train.lr=1e-4", "train.warmup_epochs=0.5",
                f"train.use_gpu={'true' if args.device == 'cuda' else 'false'}", "train.num_workers=1",
                f"train.cpus_per_worker={cpus_per_worker}", f"train.log_every_steps={sizes.log_every}",
                "train.cache_dataset=auto", f"run.storage_path={storage}", "run.name=gpu_check",
            ],
        )  # fmt: skip
        started = time.perf_counter()
        result = build_trainer(cfg).fit()
        seconds = time.perf_counter() - started
        info = json.loads((Path(result.checkpoint.path) / INFO).read_text())
    ray.shutdown()
    keep = ("epoch", "train_loss", "val_loss", "val_accuracy", "global_step", "train_videos_per_s", "step_s",
            "data_wait_share", "clips_per_s", "achieved_tflops", "mfu", "last_report_wait_s")  # fmt: skip
    return {
        "fit_s": round(seconds, 1),
        "placement": info["ingest"],
        "history": [{k: h[k] for k in keep if k in h} for h in info["history"]],
        "dataset": str(dataset),
        "cpus_per_worker": cpus_per_worker,
    }


# max_s: each section's own limit, set from estimates (no GPU run has calibrated them yet): the mandatory
# ones add up to the budget less RESERVE_S, so none is skipped unless one before it overran its estimate.
SECTIONS = [
    Section("environment", section_environment, max_s=30, min_s=5),
    Section("inputs", section_inputs, max_s=80, min_s=20),
    Section("vit_b_112", section_vit_b_112, max_s=130, min_s=60),
    Section("vit_b_224", section_vit_b_224, max_s=70, min_s=40),
    Section("ray_train", section_ray_train, max_s=90, min_s=50),
    Section("gpu_decode", section_gpu_decode, max_s=40, min_s=15),
    Section("vit_b_112_compiled", section_vit_b_112_compiled, max_s=120, min_s=90, optional=True),
]


# --------------------------------------------------------------------------- summary and main


def summarize(sections: dict[str, Any]) -> dict[str, Any]:
    """The figures the check exists for, pulled out of the sections' results."""
    summary: dict[str, Any] = {}
    keys = ("clips_per_s", "within_epoch_clips_per_s", "achieved_tflops", "mfu", "data_wait_share",
            "within_epoch_data_wait_share", "peak_memory_gib", "device_load_s", "step_s")  # fmt: skip
    for name in ("vit_b_112", "vit_b_224", "vit_b_112_compiled"):
        section = sections.get(name, {})
        if section.get("status") != "ok":
            continue
        summary[name] = {
            method: {k: figures.get(k) for k in keys} for method, figures in section["result"]["methods"].items()
        }
    train = sections.get("ray_train", {})
    if train.get("status") == "ok":
        summary["ray_train"] = {"placement": train["result"]["placement"], "last_epoch": train["result"]["history"][-1]}
    return summary


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="toy sizes: a dry run of every section")
    parser.add_argument("--budget", type=float, default=450, help="seconds for all sections together")
    parser.add_argument("--cpus", type=int, default=os.cpu_count())
    parser.add_argument("--cpus-per-worker", type=float, default=None, help="Ray Train worker CPUs (default: half the CPUs)")
    parser.add_argument("--cache", type=Path, default=CACHE)
    parser.add_argument("--out", type=Path, default=None, help="default benchmarks/results/gpu_check[_quick].json")
    parser.add_argument("--only", nargs="+", default=None, help="run only these sections")
    parser.add_argument("--ray-train-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--gpu-decode-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--result-file", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.ray_train_worker or args.gpu_decode_worker:
        worker = ray_train_worker if args.ray_train_worker else gpu_decode_worker
        Path(args.result_file).write_text(json.dumps(worker(args)))
        return {}
    if args.cpus_per_worker is None:
        args.cpus_per_worker = 1 if args.quick else max(2, args.cpus // 2)
    if args.device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise SystemExit("gpu_check: torch sees no GPU (a dry run on a CPU: --device cpu --quick)")
    signal.signal(signal.SIGTERM, _stop)
    sizes = QUICK if args.quick else GPU
    name = "gpu_check_quick" if args.quick or args.device == "cpu" else "gpu_check"
    started = time.monotonic()
    deadline = started + args.budget
    payload: dict[str, Any] = {
        "benchmark": "gpu_check",
        "date": now(),
        "command": command_line(),
        "params": {"device": args.device, "quick": args.quick, "budget_s": args.budget, "sizes": sizes.__dict__,
                   "cpus": args.cpus, "cpus_per_worker": args.cpus_per_worker},  # fmt: skip
        "sections": {},
    }
    for section in SECTIONS:
        if args.only and section.name not in args.only:
            continue
        left = deadline - time.monotonic() - RESERVE_S
        record: dict[str, Any] = {"load_before": loadavg()}
        if left < section.min_s:
            record.update(status="skipped", reason=f"{left:.0f} s of the budget left, needs {section.min_s:.0f}")
        else:
            timeout = min(section.max_s, left)
            print(f"[gpu_check] {section.name} (up to {timeout:.0f} s)", file=sys.stderr, flush=True)
            section_started = time.perf_counter()
            try:
                record.update(status="ok", result=section.run(args, sizes, timeout))
            except SectionError as err:
                record.update(status=err.status, output_tail=err.tail)
            except Exception as err:  # a check that half-works still reports the other sections
                record.update(status="failed", error=f"{type(err).__name__}: {err}")
            record["seconds"] = round(time.perf_counter() - section_started, 1)
            record["timeout_s"] = round(timeout, 1)
        record["load_after"] = loadavg()
        payload["sections"][section.name] = record
        payload["summary"] = summarize(payload["sections"])
        payload["elapsed_s"] = round(time.monotonic() - started, 1)
        write_result(name, payload, args.out)
        print(f"[gpu_check] {section.name}: {record['status']} {record.get('seconds', '')}", file=sys.stderr, flush=True)
    print(json.dumps(payload["summary"], indent=1))
    return payload


if __name__ == "__main__":
    main()
