"""The local Ray cluster a sweep starts when none is running: with the dashboard ASHA's early stops need."""

from __future__ import annotations

from typing import Any

from vidray.cluster import free_port


def local_cluster_kwargs() -> dict[str, Any]:
    """ray.init() arguments for a fresh local cluster that a sweep can rely on.

    ASHA stops a trial by killing its process, which takes its Ray Train
    controller with it; Ray Train's placement-group cleaner then frees the
    trial's workers, and it finds out the controller died through the State
    API, i.e. the dashboard. So the dashboard runs (on loopback), and the
    cluster's processes are told its address: without that they would look for
    "the" Ray instance on the machine and fail, or pick the wrong one, whenever
    another Ray instance runs beside this one.
    """
    port = free_port()  # ray.init refuses to start where it is taken by then: one no bind to port 0 is given
    return dict(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )
