"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`),
or a fresh local one."""

from __future__ import annotations

import os

import ray


def init_ray(**local_kwargs) -> None:
    """Connect once. ``local_kwargs`` only apply when a new local cluster starts."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(**local_kwargs)
