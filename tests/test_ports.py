"""vidray.cluster.free_port: the port for a local cluster's Ray server that cannot bind port 0 itself
(LoopbackCluster's Ray Client server, the dashboard of a sweep's local cluster). No Ray here."""

from __future__ import annotations

import socket
import sys
from pathlib import Path

import pytest

from vidray import cluster

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the kernel's port range in /proc")


def ephemeral_start() -> int:
    return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])


def test_a_picked_port_is_quiet_free_on_both_loopback_addresses_and_else_the_kernels(monkeypatch):
    """Picked below the kernel's ephemeral range, where no other program's bind to port 0 can take it before
    its server binds it; where every quiet port is held, the kernel picks one."""
    quiet = cluster.quiet_ports()
    assert quiet == range(cluster.QUIET_PORTS_START, max(ephemeral_start(), cluster.QUIET_PORTS_START))
    port = cluster.free_port()
    assert port in quiet if quiet else port >= ephemeral_start()
    for host in ("127.0.0.1", cluster.LOOPBACK_IP):
        with socket.socket() as s:
            s.bind((host, port))

    # A quiet port held on either loopback address is passed over.
    with socket.socket() as held:
        held.bind(("127.0.0.1", port))
        held.listen()
        monkeypatch.setattr(cluster, "quiet_ports", lambda: range(port, port + 1))
        fallback = cluster.free_port()
    assert fallback != port and fallback >= ephemeral_start()

    # Nor is one already picked for the same start (not bound yet, so nothing else tells).
    monkeypatch.setattr(cluster, "quiet_ports", lambda: range(port, port + 2))
    assert {cluster.free_port(besides={port}) for _ in range(20)} == {port + 1} or not bindable(port + 1)


def bindable(port: int) -> bool:
    try:
        for host in ("127.0.0.1", cluster.LOOPBACK_IP):
            with socket.socket() as s:
                s.bind((host, port))
    except OSError:
        return False
    return True


def test_a_sweeps_local_cluster_gets_a_quiet_dashboard_port():
    from vidray.tune.local_ray import local_cluster_kwargs

    kwargs = local_cluster_kwargs()
    quiet = cluster.quiet_ports()
    assert kwargs["dashboard_port"] in quiet if quiet else kwargs["dashboard_port"] >= ephemeral_start()
    assert kwargs["runtime_env"]["env_vars"]["RAY_API_SERVER_ADDRESS"] == f"http://127.0.0.1:{kwargs['dashboard_port']}"
