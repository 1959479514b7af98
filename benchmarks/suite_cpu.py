"""Where a command's CPU time goes, by process kind: run it while sampling /proc.

    python benchmarks/suite_cpu.py -- .venv/bin/python -m pytest -q tests/test_train.py

Every 0.25 s each process's user+system ticks are read; a process is counted from the first sample
that sees it to the last (a process shorter than one interval can be missed, and each loses at most
its last interval). Ray worker processes are grouped by the name Ray gives them once they run
something (``ray::RayTrainWorker``, ``ray::IDLE``, ...). Linux only. Prints one table and, with
``--json``, writes the per-kind numbers. docs/benchmarks.md section 8 has a run of the whole suite.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from collections import defaultdict

HZ = os.sysconf("SC_CLK_TCK")


def _read(pid: str) -> tuple[str, int, str] | None:
    """(name, user+system ticks, start time) of ``pid``, or None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            stat = f.read()
    except OSError:
        return None
    name = stat.split("(", 1)[1].rsplit(")", 1)[0]
    fields = stat.rsplit(")", 1)[1].split()
    return name, int(fields[11]) + int(fields[12]), fields[19]


def _command(pid: str) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def kind_of(name: str, command: str) -> str:
    if name.startswith("ray::"):
        return name
    if "default_worker.py" in command:
        return "ray worker, never named"
    for marker, kind in (
        ("pytest", "pytest"), ("jobs/", "driver: jobs/*.py"), ("-m vidray", "vidray CLI"), ("bin/vidray", "vidray CLI"),
        ("dashboard", "Ray dashboard"), ("log_monitor", "Ray log monitor"), ("runtime_env", "Ray runtime-env agent"),
        ("benchmarks/", "benchmark script"),
    ):  # fmt: skip
        if marker in command:
            return kind
    if name in ("raylet", "gcs_server"):
        return name
    return "python, other" if name.startswith("python") else name


def sample(stop: threading.Event, seen: dict, interval: float = 0.25) -> None:
    me = str(os.getpid())
    while not stop.is_set():
        for pid in os.listdir("/proc"):
            if not pid.isdigit() or pid == me:
                continue
            read = _read(pid)
            if read is None:
                continue
            name, ticks, started = read
            entry = seen.get((pid, started))
            if entry is None:
                seen[(pid, started)] = {"first": ticks, "last": ticks, "name": name, "command": _command(pid)[:300]}
            else:
                entry["last"] = ticks
                if not entry["name"].startswith("ray::") or entry["name"] == "ray::IDLE":
                    entry["name"] = name  # a pooled worker is renamed when it takes a task or actor
        stop.wait(interval)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", help="write the per-kind numbers here")
    parser.add_argument("command", nargs=argparse.REMAINDER, help="the command, after --")
    args = parser.parse_args()
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        parser.error("give the command to measure after --")
    seen: dict = {}
    stop = threading.Event()
    sampler = threading.Thread(target=sample, args=(stop, seen), daemon=True)
    before = {(pid, read[2]) for pid in os.listdir("/proc") if pid.isdigit() and (read := _read(pid))}
    sampler.start()
    start = time.monotonic()
    code = subprocess.call(command)
    wall = time.monotonic() - start
    stop.set()
    sampler.join()

    kinds: dict[str, list] = defaultdict(lambda: [0, 0.0])
    for process, entry in seen.items():
        # Processes that were running before the command: only what they spent during it (a pid the
        # kernel reused meanwhile is another process: keyed by pid and start time).
        spent = (entry["last"] - entry["first"]) if process in before else entry["last"]
        kind = kinds[kind_of(entry["name"], entry["command"])]
        kind[0] += 1
        kind[1] += spent / HZ
    total = sum(cpu for _, cpu in kinds.values())
    print(f"\n{total:.0f} CPU-s in {wall:.0f} s of wall ({total / wall:.2f} cores busy on average); exit {code}")
    print(f"{'CPU-s':>8} {'share':>6} {'procs':>6} {'CPU-s/proc':>10}  kind")
    for name, (count, cpu) in sorted(kinds.items(), key=lambda item: -item[1][1]):
        if cpu >= 0.5:
            print(f"{cpu:8.1f} {cpu / total:6.1%} {count:6d} {cpu / count:10.2f}  {name}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"wall_s": wall, "cpu_s": total, "kinds": {k: {"processes": n, "cpu_s": c} for k, (n, c) in kinds.items()}}, f, indent=1)
    return code


if __name__ == "__main__":
    sys.exit(main())
