"""Test-only fault injection for training runs: kill a worker for real, once.

When a worker's environment sets both variables, the last rank calls
``os._exit(1)`` after its first optimizer step of epoch ``VIDRAY_TEST_KILL_AT_EPOCH``,
the way a lost node or an OOM kill ends a process (no exception, no cleanup).
The marker file records that it happened, so the restarted worker group runs on.
Tests pass the variables through ``RunConfig(worker_runtime_env=...)``.
"""

from __future__ import annotations

import os

KILL_AT_EPOCH_ENV = "VIDRAY_TEST_KILL_AT_EPOCH"
KILL_MARKER_ENV = "VIDRAY_TEST_KILL_MARKER"


def kill_env(epoch: int, marker: str) -> dict[str, str]:
    """The worker environment that makes :func:`maybe_die_for_test` fire once in ``epoch``."""
    return {KILL_AT_EPOCH_ENV: str(epoch), KILL_MARKER_ENV: str(marker)}


def maybe_die_for_test(epoch: int, rank: int, world_size: int) -> None:
    kill_epoch, marker = os.environ.get(KILL_AT_EPOCH_ENV), os.environ.get(KILL_MARKER_ENV)
    if kill_epoch is None or marker is None or int(kill_epoch) != epoch or rank != world_size - 1:
        return
    try:
        with open(marker, "x") as f:
            f.write(f"killed rank {rank} in epoch {epoch}\n")
    except FileExistsError:
        return
    os._exit(1)
