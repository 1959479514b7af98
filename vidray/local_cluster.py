"""A multi-node Ray cluster on one machine: `ray start` nodes on loopback.

For trying multi-node behaviour without a cloud (node loss, tasks spread over
nodes, storage that one node cannot see) and for measuring how preprocessing
scales with nodes (benchmarks/scaling.py). Used by tests/test_multinode.py.

Every node runs on 127.0.0.2: Ray rewrites 127.0.0.1 to the host's outward IP
for multi-node clusters but leaves the rest of 127.0.0.0/8 alone, so nothing
listens beyond loopback. Each cluster has its own ports and temp dir, and is
stopped by killing exactly its own processes: `ray stop` would stop every Ray
cluster on the machine.

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
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from vidray.cluster import LOOPBACK_IP

NODE_IP = LOOPBACK_IP  # see vidray.cluster: Ray rewrites 127.0.0.1, not the rest of 127.0.0.0/8
RAY = str(Path(sys.executable).with_name("ray"))
# Plain loopback clusters: no token auth (another cluster's ~/.ray/auth_token would switch it on).
# No progress bars: on a 2-core box their redraws cost more CPU than the work.
RAY_ENV = {"RAY_AUTH_MODE": "disabled", "RAY_USAGE_STATS_ENABLED": "0", "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
# Every LoopbackCluster's temp dir starts so (short: Ray's unix socket paths live below it, 108-byte limit).
TEMP_PREFIX = "vrmn"


def free_ports(n: int) -> list[int]:
    sockets = []
    for _ in range(n):
        s = socket.socket()
        s.bind((NODE_IP, 0))
        sockets.append(s)
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


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


def processes_marked(marks: tuple[str, ...]) -> dict[int, tuple[int, list[str]]]:
    """The processes whose command line holds one of ``marks``, plus everything their raylets started
    (workers, agents), whose command lines need not."""
    table = proc_table()
    ours = {pid: info for pid, info in table.items() if any(m in " ".join(info[1]) for m in marks)}
    raylets = {pid for pid, (_, argv) in ours.items() if argv and Path(argv[0]).name == "raylet"}
    ours.update({pid: info for pid, info in table.items() if info[0] in raylets})
    return ours


def loopback_cluster_processes() -> dict[int, tuple[int, list[str]]]:
    """Every LoopbackCluster's processes on this machine, whichever process started it. Not "every process on
    NODE_IP": other clusters on this machine use it too (the test suite's own head, in the lane beside)."""
    return processes_marked((os.path.join(tempfile.gettempdir(), TEMP_PREFIX),))


def kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


class LoopbackCluster:
    """`ray start` nodes on 127.0.0.2 with their own ports and temp dir, killed by PID."""

    def __init__(self):
        if not sys.platform.startswith("linux"):
            raise RuntimeError("LoopbackCluster finds its nodes' processes in /proc: Linux only")
        self.temp_dir = tempfile.mkdtemp(prefix=TEMP_PREFIX)
        self.gcs_port: int | None = None
        self.node_manager_ports: dict[str, int] = {}

    @property
    def address(self) -> str:
        return f"{NODE_IP}:{self.gcs_port}"

    def driver_env(self) -> dict[str, str]:
        """Environment for a driver process of this cluster, as `ray job submit` would set it."""
        return {**os.environ, **RAY_ENV, "RAY_ADDRESS": self.address}

    def _launch(self, name: str, num_cpus: int, extra: list[str], ports: list[int]) -> subprocess.Popen:
        """Start `ray start` for node ``name`` on its 6 ``ports``; :meth:`_joined` waits for it."""
        node_manager, object_manager, agent, agent_grpc, runtime_env, metrics = ports
        command = [
            RAY, "start", "--node-ip-address", NODE_IP, "--num-cpus", str(num_cpus),
            "--node-manager-port", str(node_manager), "--object-manager-port", str(object_manager),
            "--dashboard-agent-listen-port", str(agent), "--dashboard-agent-grpc-port", str(agent_grpc),
            "--runtime-env-agent-port", str(runtime_env), "--metrics-export-port", str(metrics),
            "--object-store-memory", str(150 * 2**20), "--disable-usage-stats", *extra,
        ]  # fmt: skip
        # A file, not a pipe: the node's daemons inherit it and would hold a pipe open.
        with open(Path(self.temp_dir) / f"start-{name}.log", "w") as out:
            # Without RAY_ADDRESS: the caller may be connected to another cluster.
            env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}, **RAY_ENV}
            process = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=env)
        self.node_manager_ports[name] = node_manager
        return process

    def _joined(self, name: str, process: subprocess.Popen) -> None:
        try:
            code = process.wait(timeout=180)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        if code != 0:
            log = Path(self.temp_dir) / f"start-{name}.log"
            raise RuntimeError(f"ray start of node {name} failed:\n{log.read_text()[-3000:]}")

    def start_head(self, num_cpus: int, labels: str | None = None) -> None:
        self.gcs_port, client, dashboard, *ports = free_ports(3 + 6)
        head = self._launch(
            "head",
            num_cpus,
            [
                # No dashboard, so no State API: Ray Train's placement-group cleaner logs
                # that it cannot reach it, which matters only if a Train controller dies.
                "--head", "--port", str(self.gcs_port), "--include-dashboard", "false",
                "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
                "--ray-client-server-port", str(client), "--temp-dir", self.temp_dir,
                *(["--labels", labels] if labels else []),
                # Notice a dead node within 1.5 s rather than the default ~15 s: 3 failed checks 0.5 s apart.
                # A check fails at once when the raylet is gone; a busy one has the default 10 s to answer.
                "--system-config", json.dumps({"health_check_period_ms": 500, "health_check_failure_threshold": 3}),
            ],
            ports,
        )  # fmt: skip
        self._joined("head", head)

    def add_nodes(self, names: list[str], num_cpus: int) -> None:
        """Worker nodes of ``num_cpus`` each, joining together as an autoscaler's batch would: their
        `ray start`s run side by side (each waits on its daemons much of the time; 3 nodes on 2 cores:
        4.9 s, against 6.7 s one after another)."""
        # Every node's ports in one draw: a port drawn for one node is not yet bound when the next draws.
        ports = free_ports(6 * len(names))
        # Each node has a temp dir of its own below the head's, as each machine of a real cluster has
        # (and its own log monitor streams it): in one shared session directory, nodes starting side
        # by side would pick the same socket names (Ray numbers them after the files it finds there).
        started = [
            (name, self._launch(name, num_cpus, ["--address", self.address, "--temp-dir", os.path.join(self.temp_dir, name)],
                                ports[6 * i : 6 * i + 6]))
            for i, name in enumerate(names)
        ]  # fmt: skip
        for name, process in started:
            self._joined(name, process)

    def processes(self) -> dict[int, tuple[int, list[str]]]:
        """This cluster's processes: their command lines name its GCS address or temp dir."""
        if self.gcs_port is None:
            return {}
        return processes_marked((self.address, f"gcs_server_port={self.gcs_port}", self.temp_dir))

    def raylets(self) -> dict[int, str]:
        """{raylet pid: node name}."""
        names = {f"--node_manager_port={port}": name for name, port in self.node_manager_ports.items()}
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
