"""Connecting to Ray: the cluster in RAY_ADDRESS (as under `ray job submit`),
or a fresh local one; and the storage paths every node of it must reach."""

from __future__ import annotations

import os

import ray

from vidray.config import VidrayConfig
from vidray.storage import check_storage_for_cluster


def init_ray(**local_kwargs) -> None:
    """Connect once. ``local_kwargs`` only apply when a new local cluster starts."""
    if ray.is_initialized():
        return
    if os.environ.get("RAY_ADDRESS"):
        ray.init(address=os.environ["RAY_ADDRESS"], log_to_driver=True)
    else:
        ray.init(**local_kwargs)


def shared_storage_paths(cfg: VidrayConfig) -> tuple[str, str]:
    """(run.storage_path, data.dataset_dir) as Ray should get them, after init_ray().

    Local paths come back absolute; on a multi-node cluster a node-local path
    is refused with a UserError naming the key (see check_storage_for_cluster).
    """
    shared = cfg.run.shared_filesystem
    storage_path = check_storage_for_cluster(cfg.run.storage_path, "run.storage_path", shared_filesystem=shared)
    dataset_dir = check_storage_for_cluster(cfg.data.dataset_dir, "data.dataset_dir", shared_filesystem=shared)
    return storage_path, dataset_dir


def cluster_summary() -> dict:
    """Alive nodes and their total resources, for run summaries and benchmarks."""
    nodes = [node for node in ray.nodes() if node["Alive"]]
    totals: dict[str, float] = {}
    for node in nodes:
        for name in ("CPU", "GPU", "memory", "object_store_memory"):
            totals[name] = totals.get(name, 0.0) + node["Resources"].get(name, 0.0)
    return {"nodes": len(nodes), **totals}
