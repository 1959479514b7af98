"""A multi-node Ray cluster on one machine: `ray start` nodes on loopback.

For trying multi-node behaviour without a cloud (node loss, tasks spread over
nodes, storage that one node cannot see) and for measuring how preprocessing
scales with nodes (benchmarks/scaling.py). Used by tests/test_multinode.py.

Every node runs on 127.0.0.2: Ray rewrites 127.0.0.1 to the host's outward IP
for multi-node clusters but leaves the rest of 127.0.0.0/8 alone. Each cluster
has its own temp dir, and its daemons bind ports of their own choosing (below),
so clusters side by side do not collide. A cluster is stopped by killing exactly
its own processes: `ray stop` would stop every Ray cluster on the machine.

Ports: every daemon that can binds port 0 itself and reports the port it got to
the GCS (Ray's "bind-then-report": docs.ray.io, Ray Core internals, "Port Service
Discovery"). A port picked free here and handed to `ray start`, as this module once
did, can be taken in the seconds before its daemon binds it, by the processes of
the other Ray clusters on the machine, which bind ports all the time. A raylet
that cannot bind its node manager port never registers, and `ray start` gives
up after 30 s: "The current node timed out during startup" (once in CI, beside
the test suite's Ray lane). The one port Ray cannot leave to its server is picked
where no bind to port 0 lands (vidray.cluster.free_port).

    cluster = LoopbackCluster()
    cluster.start_head(num_cpus=1)
    cluster.add_nodes(["a", "b"], num_cpus=1)
    # drivers: RAY_ADDRESS=cluster.address
    cluster.shutdown()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from vidray.cluster import LOOPBACK_IP, free_port
from vidray.compat import started_cluster_address

NODE_IP = LOOPBACK_IP  # see vidray.cluster: Ray rewrites 127.0.0.1, not the rest of 127.0.0.0/8
RAY = str(Path(sys.executable).with_name("ray"))
# Plain loopback clusters: no token auth (another cluster's ~/.ray/auth_token would switch it on).
# No progress bars: on a 2-core box their redraws cost more CPU than the work.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# What `ray start` says when a node's raylet did not register within the fixed 30 s Ray's node start-up waits.
NODE_TIMED_OUT = "The current node timed out during startup"
# Every LoopbackCluster's temp dir starts so (short: Ray's unix socket paths live below it, 108-byte limit).
TEMP_PREFIX = "vrmn"


def proc_table() -> dict[int, tuple[int, list[str]]]:
    """{pid: (parent pid, argv)} of every process, from /proc (argv shows Ray's process titles)."""
    table = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/cmdline", "rb") as f:
                argv = [part.decode(errors="replace") for part in f.read().split(b"\0") if part]
            with open(f"/proc/{entry}/stat") as f:
                parent = int(f.read().rsplit(")", 1)[1].split()[1])
        except (OSError, ValueError, IndexError):
            continue
        table[int(entry)] = (parent, argv)
    return table


def processes_marked(is_marked: Callable[[list[str]], bool]) -> dict[int, tuple[int, list[str]]]:
    """The processes whose command line ``is_marked``, plus everything their raylets started
    (workers, agents), whose command lines need not be."""
    table = proc_table()
    ours = {pid: info for pid, info in table.items() if is_marked(info[1])}
    raylets = {pid for pid, (_, argv) in ours.items() if argv and Path(argv[0]).name == "raylet"}
    ours.update({pid: info for pid, info in table.items() if info[0] in raylets})
    return ours


def loopback_cluster_processes() -> dict[int, tuple[int, list[str]]]:
    """Every LoopbackCluster's processes on this machine, whichever process started it. Not "every process on
    NODE_IP": other clusters on this machine use it too (the test suite's own head, in the lane beside)."""
    prefix = os.path.join(tempfile.gettempdir(), TEMP_PREFIX)
    return processes_marked(lambda argv: prefix in " ".join(argv))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LoopbackCluster:
    """`ray start` nodes on 127.0.0.2 with their own temp dirs and self-bound ports, killed by PID."""

    def __init__(self):
        if not sys.platform.startswith("linux"):
            raise RuntimeError("LoopbackCluster finds its nodes' processes in /proc: Linux only")
        self.temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        self.address: str | None = None  # the head's GCS, known once it is up
        self.client_port: int | None = None
        self.node_dirs: dict[str, str] = {}  # node name -> its `ray start --temp-dir`

    def driver_env(self) -> dict[str, str]:
        """Environment for a driver process of this cluster, as `ray job submit` would set it."""
        return {**os.environ, **RAY_ENV, "RAY_ADDRESS": self.address}

    def _launch(self, name: str, num_cpus: int, temp_dir: str, extra: list[str]) -> subprocess.Popen:
        """Start `ray start` for node ``name``; :meth:`_joined` waits for it. Its node manager, object manager,
        agents and metrics ports are left to the daemons (0: each binds one itself); the dashboard agent's
        HTTP port is the one whose default is a fixed port (52365), which the next cluster's would meet."""
        command = [
            RAY, "start", "--node-ip-address", NODE_IP, "--num-cpus", str(num_cpus), "--temp-dir", temp_dir,
            "--dashboard-agent-listen-port", "0",
            "--object-store-memory", str(150 * 2**20), "--disable-usage-stats", *extra,
        ]  # fmt: skip
        # A file, not a pipe: the node's daemons inherit it and would hold a pipe open.
        with open(Path(self.temp_dir) / f"start-{name}.log", "w") as out:
            # Without RAY_ADDRESS: the caller may be connected to another cluster.
            env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **RAY_ENV}
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.node_dirs[name] = temp_dir
        return process

    def _joined(self, name: str, process: subprocess.Popen, relaunch: Callable[[], subprocess.Popen]) -> None:
        """Wait for node ``name``'s `ray start`; once, start it again (``relaunch``) where it timed out."""
        for attempt in (1, 2):
            try:
                code = process.wait(timeout=180)
            except subprocess.TimeoutExpired:
                process.kill()
                raise
            if code == 0:
                return
            log = (Path(self.temp_dir) / f"start-{name}.log").read_text()
            if attempt == 1 and NODE_TIMED_OUT in log:
                # Ray waits a fixed 30 s for a new raylet to register (no setting changes it): on a 2-core machine
                # at load 13 (the suite's two lanes, another test's cluster starting) the GCS answered its
                # first look only after 49 s. Its daemons are left running: stopped, then the node starts again.
                self._stop_node(name)
                process = relaunch()
                continue
            raise RuntimeError(f"ray start of node {name} failed:\n{log[-3000:]}")

    def _stop_node(self, name: str) -> None:
        """Kill what node ``name``'s failed `ray start` left running: the processes naming its temp dir and its
        raylet's children (the head's temp dir is the cluster's: no node has joined it yet)."""
        node_dir = self.node_dirs[name]
        for _ in range(100):  # as shutdown(): a process one of them started meanwhile is killed on the next round
            alive = processes_marked(lambda argv: any(arg.endswith(node_dir) or f"{node_dir}/" in arg for arg in argv))
            if not alive:
                return
            for pid in alive:
                kill(pid)
            time.sleep(0.05)

    def start_head(self, num_cpus: int, labels: str | None = None) -> None:
        # The Ray Client server's port is the one Ray cannot leave to its server (0 is refused; unset, every
        # cluster's would be 10001), so it is picked quiet. Were it taken before the server binds it, only
        # that server would be hit (nothing here uses Ray Client), and the cluster would work.
        self.client_port = free_port()
        relaunch = lambda: self._launch(  # noqa: E731  (the head's `ray start`, again where it timed out)
            "head",
            num_cpus,
            self.temp_dir,
            [
                # GCS port 0: the GCS binds one itself; `ray start` records the address in the temp dir.
                # No dashboard, so no State API: Ray Train's placement-group cleaner logs
                # that it cannot reach it, which matters only if a Train controller dies. (The process Ray
                # still starts in its place, only where 127.0.0.1:8265 is free, serves no dashboard, only
                # Prometheus metrics on Ray's fixed port 44227. Where another cluster holds either port,
                # Ray logs so and goes on: nothing here needs that process.)
                "--head", "--port", "0", "--include-dashboard", "false", "--dashboard-host", "127.0.0.1",
                "--ray-client-server-port", str(self.client_port),
                *(["--labels", labels] if labels else []),
                # Notice a dead node within 1.5 s rather than the default ~15 s: 3 failed checks 0.5 s apart.
                # A check fails at once when the raylet is gone; a busy one has the default 10 s to answer.
                "--system-config", json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 3}),
            ],
        )  # fmt: skip
        self._joined("head", relaunch(), relaunch)
        self.address = started_cluster_address(self.temp_dir)
        if not self.address:
            raise RuntimeError(f"ray start of the head left no address in {self.temp_dir}/ray_current_cluster")

    def add_nodes(self, names: list[str], num_cpus: int) -> None:
        """Worker nodes of ``num_cpus`` each, joining together as an autoscaler's batch would: their
        `ray start`s run side by side (each waits on its daemons much of the time; 3 nodes on 2 cores:
        4.9 s, against 6.7 s one after another)."""
        # Each node has a temp dir of its own below the head's, as each machine of a real cluster has
        # (and its own log monitor streams it): in one shared session directory, nodes starting side
        # by side would pick the same socket names (Ray numbers them after the files it finds there).
        def launch(name: str) -> subprocess.Popen:
            return self._launch(name, num_cpus, os.path.join(self.temp_dir, name), ["--address", self.address])

        started = [(name, launch(name)) for name in names]
        for name, process in started:
            self._joined(name, process, lambda name=name: launch(name))

    def processes(self) -> dict[int, tuple[int, list[str]]]:
        """This cluster's processes: their command lines name its temp dir, or they are its head's Ray Client
        server (whose command line names the GCS address instead, or while the head starts, its port) or a
        raylet's children."""
        if self.client_port is None:
            return {}
        # The address where it is known: two clusters' client servers can share a port (gRPC's SO_REUSEPORT).
        client_flag = f"--address={self.address}" if self.address else f"--port={self.client_port}"
        return processes_marked(
            lambda argv: self.temp_dir in " ".join(argv) or ("ray.util.client.server" in argv and client_flag in argv)
        )

    def raylets(self) -> dict[int, str]:
        """{raylet pid: node name}, by the temp dir each node's raylet was given."""
        names = {f"--temp_dir={temp_dir}": name for name, temp_dir in self.node_dirs.items()}
        return {
            pid: names[flag]
            for pid, (_, argv) in self.processes().items()
            if argv and Path(argv[0]).name == "raylet"
            for flag in argv
            if flag in names
        }

    def kill_node(self, name: str) -> None:
        """Kill one node as a vanished machine would go: its raylet and everything under it, at once."""
        (raylet,) = [pid for pid, node in self.raylets().items() if node == name]
        table = proc_table()
        doomed, frontier = {raylet}, [raylet]
        while frontier:
            children = [pid for pid, (parent, _) in table.items() if parent in frontier]
            doomed.update(children)
            frontier = children
        for pid in doomed:
            kill(pid)

    def shutdown(self) -> None:
        # Killed processes are gone within a few polls; a process one of them started meanwhile
        # shows up and is killed on the next round. Polled every 0.05 s, for 5 s at most.
        for _ in range(100):
            alive = self.processes()
            if not alive:
                break
            for pid in alive:
                kill(pid)
            time.sleep(0.05)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> "LoopbackCluster":
        return self

    def __exit__(self, *exc) -> None:
        self.shutdown()
