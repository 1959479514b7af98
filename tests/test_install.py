"""vidray as users install it: `pip install .`, then `vidray tune --config X` from a folder that is
not the repository, with every process (driver, Ray workers) importing the installed package."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_installed_vidray_runs_a_sweep_from_any_folder(tmp_path):
    site, source = tmp_path / "site", tmp_path / "source"
    # The dependencies are this environment's; the package itself is built from a copy of what an sdist
    # holds (a build in the checkout would leave build/ there) and installed.
    shutil.copytree(REPO / "vidray", source / "vidray", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPO / name, source / name)
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--target", str(site), str(source)],
        check=True, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    # A fresh local cluster started by the driver: its workers inherit PYTHONPATH, so they import
    # the installed copy too (a `ray start` cluster's workers would import the checkout).
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PYTHONPATH"] = str(site)

    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, *args], cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
        )

    where = run("-c", "import vidray, vidray.config as c; print(vidray.__file__); print(c.DEFAULT_CONFIG)")
    assert where.returncode == 0, where.stderr
    package, default_config = (Path(line) for line in where.stdout.split())
    assert package.is_relative_to(site) and default_config.is_file() and default_config.is_relative_to(site)

    # The user's own config, written from the embedded default: tiny data, one trial, one epoch.
    config = yaml.safe_load(default_config.read_text())
    config["data"].update(
        videos_dir="data/videos", manifest="data/manifest.parquet", dataset_dir="data/dataset",
        frames=4, size=32, stored_frames=8, stored_size=36, demo={"classes": 2, "videos_per_class": 6, "seed": 5},
    )  # fmt: skip
    config["train"].update(epochs=1, batch_size=4, warmup_epochs=0)
    config["tune"].update(mixup_alpha=[0.0])
    config["run"].update(name="installed", storage_path=str(tmp_path / "ray_results"))
    (elsewhere / "mine.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))

    sweep = run(str(site / "bin" / "vidray"), "tune", "--config", "mine.yaml")
    assert sweep.returncode == 0, sweep.stderr[-5000:]
    summary = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["errored"] == 0
    assert Path(summary["results_md"]) == tmp_path / "ray_results" / "installed" / "reports" / "results.md"
    assert Path(summary["results_md"]).is_file()
    assert (elsewhere / "data" / "dataset" / "dataset.json").is_file()  # relative data paths: the user's folder
    assert not (REPO / "data" / "videos").exists()


@pytest.mark.slow
def test_a_local_cluster_that_vidray_starts_stays_on_loopback(tmp_path):
    """`vidray train/tune/...` without RAY_ADDRESS start a cluster of their own (init_ray): its node, GCS and
    raylet are on vidray.cluster.LOOPBACK_IP, not on the host's outward IP that Ray picks for 127.0.0.1."""
    from vidray.cluster import LOOPBACK_IP

    code = (
        "import json, ray\n"
        "from vidray.cluster import init_ray\n"
        "from vidray.tune.local_ray import local_cluster_kwargs\n"
        "init_ray(**local_cluster_kwargs())\n"
        "(node,) = ray.nodes()\n"
        "print(json.dumps({'node': node['NodeManagerAddress'], 'gcs': ray.get_runtime_context().gcs_address}))\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    where = json.loads(proc.stdout.strip().splitlines()[-1])
    assert where["node"] == LOOPBACK_IP and where["gcs"].startswith(f"{LOOPBACK_IP}:"), where
