"""vidray as users install it: `pip install .`, then `vidray tune --config X` from a folder that is
not the repository, with every process (driver, Ray workers) importing the installed package, on a
local cluster that the sweep starts on loopback."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.slow
@pytest.mark.ray  # a local cluster that the sweep starts
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

    # Without RAY_ADDRESS the sweep starts a cluster of its own (init_ray): the processes that serve it,
    # children of the driver, are read while it runs (see _LocalClusterSampler).
    vidray = str(site / "bin" / "vidray")
    with _LocalClusterSampler(driver=vidray) as cluster:
        sweep = run(vidray, "tune", "--config", "mine.yaml")
    assert sweep.returncode == 0, sweep.stderr[-5000:]
    summary = json.loads(sweep.stdout.strip().splitlines()[-1])
    assert summary["trials"] == 1 and summary["errored"] == 0
    assert Path(summary["results_md"]) == tmp_path / "ray_results" / "installed" / "reports" / "results.md"
    assert Path(summary["results_md"]).is_file()
    assert (elsewhere / "data" / "dataset" / "dataset.json").is_file()  # relative data paths: the user's folder
    assert not (REPO / "data" / "videos").exists()

    # The local cluster that vidray started stayed on loopback: its node, GCS and raylet are on
    # vidray.cluster.LOOPBACK_IP, not on the host's outward IP that Ray picks for 127.0.0.1. The raylet's
    # --node_ip_address is the node's address (ray.nodes()' NodeManagerAddress), its --gcs-address the
    # GCS's (the driver's gcs_address: the GCS picks its port), and the GCS server binds --node-ip-address.
    from vidray.cluster import LOOPBACK_IP

    (gcs,) = cluster.found["gcs_server"]
    (raylet,) = cluster.found["raylet"]
    assert _flag(gcs, "--node-ip-address") == LOOPBACK_IP, gcs
    assert _flag(raylet, "--node_ip_address") == LOOPBACK_IP, raylet
    assert _flag(raylet, "--gcs-address").startswith(f"{LOOPBACK_IP}:"), raylet


def _flag(argv: list[str], name: str) -> str | None:
    """The value of ``name=value`` in a command line."""
    return next((arg.split("=", 1)[1] for arg in argv if arg.startswith(name + "=")), None)


class _LocalClusterSampler(threading.Thread):
    """The command lines of the GCS servers and raylets that a driver started by this process starts, read
    from /proc while they run: ``found`` = {"gcs_server": [argv, ...], "raylet": [argv, ...]}, one per process.

    ``ray.init()`` starts them as the driver's own children. The driver is this process's child whose
    command line holds ``driver`` (the session's `ray start` head, also a child, is not it).
    """

    def __init__(self, driver: str):
        super().__init__(daemon=True)
        self.driver = driver
        self.found: dict[str, list[list[str]]] = {"gcs_server": [], "raylet": []}
        self._seen: set[int] = set()
        self._done = threading.Event()

    def run(self) -> None:
        from vidray.local_cluster import proc_table

        while not self._done.wait(0.5):
            table = proc_table()
            drivers = {pid for pid, (parent, argv) in table.items() if parent == os.getpid() and self.driver in argv}
            for pid, (parent, argv) in table.items():
                name = Path(argv[0]).name if argv else ""
                if parent in drivers and name in self.found and pid not in self._seen:
                    self._seen.add(pid)
                    self.found[name].append(argv)

    def __enter__(self) -> "_LocalClusterSampler":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self.join()
