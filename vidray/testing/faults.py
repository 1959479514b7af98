"""Test-only fault injection for training runs: kill a worker for real, once; or hold the run.

When a worker's environment sets both kill variables, the last rank calls
``os._exit(1)`` after its first optimizer step of epoch ``VIDRAY_TEST_KILL_AT_EPOCH``,
the way a lost node or an OOM kill ends a process (no exception, no cleanup).
The marker file records that it happened, so the restarted worker group runs on.

With both hold variables, every rank waits after reporting epoch
``VIDRAY_TEST_HOLD_AFTER_EPOCH`` until the file ``VIDRAY_TEST_HOLD_RELEASE`` exists
(at most :data:`HOLD_MAX_S`): a test that kills a whole node or a sweep's driver then
knows the run is mid-way, however fast its epochs are. ``VIDRAY_TEST_HOLD_RUN`` limits
the hold to the Ray Train runs whose name ends with it (one trial of a sweep). A release
file that says :data:`HOLD_EXIT` ends the held process instead (``os._exit``), as Ray ends
the workers of a dead driver: without it they would sit out the hold, or train on past it.

Tests pass the variables (:func:`hold_env`) in the job's runtime_env, as `ray job submit
--runtime-env-json` does (``RAY_JOB_CONFIG_JSON_ENV_VAR`` for a driver they start).
"""

from __future__ import annotations

import os
import time

KILL_AT_EPOCH_ENV = "VIDRAY_TEST_KILL_AT_EPOCH"
KILL_MARKER_ENV = "VIDRAY_TEST_KILL_MARKER"
HOLD_AFTER_EPOCH_ENV = "VIDRAY_TEST_HOLD_AFTER_EPOCH"
HOLD_RELEASE_ENV = "VIDRAY_TEST_HOLD_RELEASE"
HOLD_RUN_ENV = "VIDRAY_TEST_HOLD_RUN"
HOLD_MAX_S = 300
HOLD_EXIT = "exit"


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


def hold_env(epoch: int, release: str, run_suffix: str | None = None) -> dict[str, str]:
    """The worker environment that makes :func:`maybe_hold_for_test` wait after ``epoch`` until ``release``
    exists, in every run or only in those whose name ends with ``run_suffix``."""
    env = {HOLD_AFTER_EPOCH_ENV: str(epoch), HOLD_RELEASE_ENV: str(release)}
    return {**env, HOLD_RUN_ENV: run_suffix} if run_suffix else env


def maybe_hold_for_test(epoch: int, run_name: str = "") -> None:
    hold_epoch, release = os.environ.get(HOLD_AFTER_EPOCH_ENV), os.environ.get(HOLD_RELEASE_ENV)
    if hold_epoch is None or release is None or int(hold_epoch) != epoch:
        return
    if not run_name.endswith(os.environ.get(HOLD_RUN_ENV, "")):
        return
    deadline = time.monotonic() + HOLD_MAX_S
    while not os.path.exists(release) and time.monotonic() < deadline:
        time.sleep(0.2)
    try:
        with open(release) as f:
            if f.read().strip() == HOLD_EXIT:
                os._exit(1)
    except OSError:
        pass  # not released (the hold timed out): go on


def end_held_processes(release: str) -> None:
    """Release a hold by ending the held processes (:data:`HOLD_EXIT`), written whole before it appears."""
    staged = f"{release}.staged"
    with open(staged, "w") as f:
        f.write(HOLD_EXIT)
    os.replace(staged, release)

