"""A real multi-node Ray cluster on this machine: four `ray start` nodes on loopback.

One end-to-end scenario, in order:

1. the head alone, labelled like the cluster.yaml head: node-local storage is refused;
2. three worker nodes join: node-local storage is refused (4 nodes), the
   shared-filesystem opt-in is accepted;
3. preprocessing runs as Ray Data tasks spread over several nodes;
4. a 2-worker training (the same driver, right after) runs across nodes; once
   the first epoch's checkpoint is registered, one worker node is killed (its
   raylet and all its processes, as when a spot instance disappears); Ray
   Train reschedules both workers on the surviving nodes, resumes from the
   last checkpoint, and finishes with every epoch trained exactly once.

Each driver is a subprocess with RAY_ADDRESS set, like `ray job submit`, so
the session's in-process cluster (conftest `ray_cluster`) is never touched. The
driver of steps 3 and 4 starts while the worker nodes join, so its imports overlap
their start (it waits for all four nodes, as a job on a cluster that is scaling up would).
The cluster is vidray.local_cluster.LoopbackCluster: every node on 127.0.0.2,
every process of the cluster killed by PID at the end, never `ray stop`.

And a short one: a LoopbackCluster starts where ports are taken before its daemons bind them.
"""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import pytest

from vidray.model.checkpoint import read_checkpoint_info
from vidray.data.demo import generate_demo_videos
from vidray.testing.faults import hold_env
from vidray.data.index import index_folder
from vidray.local_cluster import LoopbackCluster, loopback_cluster_processes, proc_table
from vidray.storage import MULTI_NODE_LABEL

pytestmark = [
    pytest.mark.slow,
    pytest.mark.ray,  # a cluster of its own
    pytest.mark.skipif(not sys.platform.startswith("linux"), reason="finds the nodes' processes in /proc"),
]

EPOCHS = 2
REPO = Path(__file__).resolve().parents[1]


def _driver(cluster: LoopbackCluster, code: str, workdir: Path, results: list[str]) -> subprocess.Popen:
    """A Python driver connected to the cluster through RAY_ADDRESS, as under `ray job submit`.

    It writes each stage's result as JSON to ``workdir/<stage>.json`` (argv[1:], in ``results``' order)
    and its output to ``workdir/driver.log``.
    """
    env = cluster.driver_env()
    command = [sys.executable, "-c", textwrap.dedent(code), *(str(workdir / f"{name}.json") for name in results)]
    with open(workdir / "driver.log", "w") as out:
        return subprocess.Popen(command, cwd=workdir, env=env, stdout=out, stderr=subprocess.STDOUT)


def _result(path: Path) -> dict | None:
    """A stage's JSON, once its driver has written it (written whole: a temporary file renamed)."""
    return json.loads(path.read_text()) if path.exists() else None


def _finish(process: subprocess.Popen, timeout: float) -> dict:
    """Wait for a driver; return the JSON of its last stage."""
    result, log = Path(process.args[-1]), Path(process.args[-1]).with_name("driver.log")
    try:
        process.wait(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 0, f"driver failed ({process.returncode}):\n{log.read_text()[-6000:]}"
    return json.loads(result.read_text())


class TaskSampler(threading.Thread):
    """The parents (raylets, i.e. nodes) of processes whose title contains ``needle``, sampled from /proc.

    A Ray worker process is a child of its node's raylet and shows the task it
    runs in its title (``ray::MapBatches(decode_shards)``).
    """

    def __init__(self, needle: str):
        super().__init__(daemon=True)
        self.needle = needle
        self.raylets: set[int] = set()
        self.done = threading.Event()

    def run(self) -> None:
        while not self.done.is_set():
            for parent, argv in proc_table().values():
                if argv and self.needle in argv[0]:
                    self.raylets.add(parent)
            time.sleep(0.1)


DRIVER = """
    import json, os, sys, time
    import ray
    from vidray.cluster import cluster_summary, init_ray, shared_storage_paths
    from vidray.config import load_config
    from vidray.errors import UserError
    from vidray.data.preprocess import preprocess
    from vidray.train.driver import build_trainer, make_run_config, summarize_run

    def write(path, result):
        with open(path + ".tmp", "w") as f:
            json.dump(result, f, default=str)
        os.replace(path + ".tmp", path)

    manifest, dataset_dir, nodes = {manifest!r}, {dataset_dir!r}, {nodes!r}
    init_ray(verbose=True)  # the workers' output reaches this driver, as under `vidray train --verbose`
    while len([node for node in ray.nodes() if node["Alive"]]) < nodes:
        time.sleep(0.1)

    # 3. Preprocessing.
    try:
        shared_storage_paths(load_config(None, ["data.dataset_dir=" + dataset_dir]))
        refused = None
    except UserError as err:
        refused = str(err)
    shared = load_config(None, ["data.dataset_dir=" + dataset_dir, "run.shared_filesystem=true"])
    _, dataset_dir = shared_storage_paths(shared)
    summary = preprocess(manifest, dataset_dir, frames=4, size=32, stored_frames=8, stored_size=40, videos_per_shard=2,
                         shared_filesystem=True)
    write(sys.argv[1], {{"refused": refused, "cluster": cluster_summary(), "summary": summary}})

    # 4. Training.
    cfg = load_config(None, {overrides!r})
    storage_path, dataset_dir = shared_storage_paths(cfg)
    run_config = make_run_config(cfg, worker_runtime_env={{"env_vars": {hold!r}}})
    result = build_trainer(cfg, dataset_dir=dataset_dir, run_config=run_config).fit()
    write(sys.argv[2], {{"summary": summarize_run(result.path), "error": repr(result.error), "cluster": cluster_summary()}})
"""


@pytest.fixture
def cluster():
    cluster = LoopbackCluster()
    try:
        yield cluster
    finally:
        cluster.shutdown()
        assert not cluster.processes(), "a process of the test cluster survived"


def test_preprocess_and_train_across_nodes_and_survive_losing_one(cluster, tmp_path):
    videos, manifest = tmp_path / "videos", tmp_path / "manifest.parquet"
    generate_demo_videos(videos, classes=2, videos_per_class=10, seed=0)
    index_folder(videos, manifest)
    dataset_dir, storage = tmp_path / "dataset", tmp_path / "runs"

    # 1. The head alone, labelled as cluster.yaml labels it: it will autoscale.
    cluster.start_head(num_cpus=1, labels=f"{MULTI_NODE_LABEL}=true")
    # The entry points refuse node-local storage before any work, because the head says it will
    # autoscale: one line, exit 2, nothing written. The drivers run side by side. jobs/preprocess.py
    # (`vidray prepare`) decoded onto each node's own disk, dataset.json on the head listing every shard.
    refusals = {
        job: subprocess.Popen(
            [sys.executable, str(REPO / "jobs" / f"{job}.py"), "run.storage_path=runs", f"data.videos_dir={videos}",
             f"data.manifest={manifest}", f"data.dataset_dir={tmp_path / 'not-made'}",
             "data.demo.classes=2", "data.demo.videos_per_class=10"],  # the set in videos: prepare would decode it
            cwd=tmp_path, env=cluster.driver_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )  # fmt: skip
        for job in ("train", "tune", "preprocess")
    }
    for job, proc in refusals.items():
        _, stderr = proc.communicate(timeout=180)
        assert proc.returncode == 2, stderr[-3000:]
        (line,) = stderr.strip().splitlines()[-1:]
        refused = f"vidray {job}: error: run.storage_path: 'runs'" if job != "preprocess" else (
            f"vidray prepare: error: data.dataset_dir: '{tmp_path / 'not-made'}'")  # fmt: skip
        assert line.startswith(f"{refused} is a node-local path"), stderr[-3000:]
        assert f"labelled {MULTI_NODE_LABEL}=true" in line, line
        assert not (tmp_path / "runs").exists() and not (tmp_path / "not-made").exists()

    # 3.-4. The driver of preprocessing and training: it starts now and waits for the nodes of step 2.
    overrides = [
        "model.init=scratch", "model.size=tiny",
        "data.frames=4", "data.size=32", "data.stored_frames=8", "data.stored_size=40",
        f"data.dataset_dir={dataset_dir}",
        f"train.epochs={EPOCHS}", "train.batch_size=4", "train.num_workers=2", "train.cpus_per_worker=1",
        "train.max_failures=2", "train.prefetch_batches=1", "train.shuffle_buffer=4",
        f"run.storage_path={storage}", "run.name=multinode", "run.shared_filesystem=true",
    ]  # fmt: skip
    driver_log = tmp_path / "driver.log"
    run_dir = storage / "multinode"
    # The workers hold after epoch 0 until the node is gone: however fast the epochs, the kill lands mid-run.
    release = tmp_path / "release-hold"
    code = DRIVER.format(manifest=str(manifest), dataset_dir=str(dataset_dir), nodes=4, overrides=overrides,
                         hold=hold_env(0, str(release)))  # fmt: skip
    sampler = TaskSampler("decode_shards")
    sampler.start()
    driver = _driver(cluster, code, tmp_path, ["preprocess", "train"])
    try:
        # 2. Three 1-CPU worker nodes join: one more than the two training workers need
        # after a node is lost, so the survivors also leave a CPU for Ray Data.
        cluster.add_nodes(["a", "b", "c"], num_cpus=1)

        # 3. Preprocessing: one Ray Data decode task per 2-video shard, spread over the nodes.
        try:
            _wait_for(lambda: _result(tmp_path / "preprocess.json"), driver, driver_log, "preprocessing")
        finally:
            sampler.done.set()
            sampler.join()
        pre = _result(tmp_path / "preprocess.json")
        assert pre["cluster"]["nodes"] == 4 and pre["cluster"]["CPU"] == 4
        assert "has 4 nodes" in pre["refused"] and "run.shared_filesystem=true" in pre["refused"]
        assert pre["summary"]["processed"] == 20 and pre["summary"]["rejected"] == 0
        node_raylets = cluster.raylets()
        # The scaling benchmark's smoke test finds LoopbackClusters so, beside the other lane's own cluster.
        assert set(node_raylets) <= set(loopback_cluster_processes())
        decode_nodes = {node_raylets[r] for r in sampler.raylets if r in node_raylets}
        assert len(decode_nodes) >= 2, f"decode tasks ran on {decode_nodes} only"

        # 4. Training across nodes; kill a node that hosts a training worker after epoch 0's checkpoint.
        # Kill only once the controller has registered epoch 0's checkpoint (its
        # snapshot lists it): a checkpoint directory that exists in storage but
        # was not registered yet is not restored, and epoch 0 would be re-run.
        _wait_for(lambda: "checkpoint_epoch_0000" in _registered_checkpoints(run_dir), driver, driver_log, "epoch 0's checkpoint")
        saved_epoch0 = read_checkpoint_info(run_dir / "checkpoint_epoch_0000")
        first = _train_workers(cluster)
        assert len(first) == 2 and len(set(first.values())) == 2, f"training workers on {first}"
        victim = sorted(set(first.values()) - {"head"})[0]
        epochs_before_kill = len(list(run_dir.glob("checkpoint_epoch_*")))
        cluster.kill_node(victim)
        # Ray Train notices the lost workers and starts a new group of two on the surviving nodes.
        _wait_for(lambda: len(set(_train_workers(cluster)) - set(first)) == 2, driver, driver_log, "restarted workers", poll=0.5)
        second = {pid: node for pid, node in _train_workers(cluster).items() if pid not in first}
        release.touch()  # nothing holds in the new group (it starts at epoch 1); this frees a straggler
    except BaseException:
        driver.kill()
        raise
    result = _finish(driver, 300)

    assert epochs_before_kill < EPOCHS, "the node died after training had finished"
    # The workers' output reaches this driver: vidray's epoch lines, not Ray Train's metric dumps.
    log = driver_log.read_text()
    assert "epoch 0 done" in log and "Reporting training result" not in log, log[-4000:]
    assert victim not in set(second.values()) and len(second) == 2
    assert result["cluster"]["nodes"] == 3 and result["cluster"]["CPU"] == 3
    assert result["error"] == "None"
    final = read_checkpoint_info(result["summary"]["checkpoint"])
    assert final["epoch"] == EPOCHS - 1
    # Every epoch trained exactly once: resumed from the last checkpoint, nothing
    # redone or skipped, the optimizer step count continuous. Epoch 0's record,
    # wall-clock throughput included, is the one saved before the kill: a rerun
    # of epoch 0 could not reproduce it.
    assert [m["epoch"] for m in final["history"]] == list(range(EPOCHS))
    assert final["history"][0] == saved_epoch0["history"][0]
    # 12 training videos / 2 workers / micro-batch 2 = 3 steps per epoch.
    assert [m["global_step"] for m in final["history"]] == [3 * (epoch + 1) for epoch in range(EPOCHS)]


def test_a_cluster_starts_where_its_ports_are_taken_before_it_binds_them(cluster, monkeypatch):
    """Its daemons bind ports of their own choosing (vidray.local_cluster): ports picked free and handed to
    `ray start`, as before, were taken meanwhile by the processes of the Ray clusters beside it, once in CI,
    and a raylet that could not bind its node manager port never registered ("The current node timed out
    during startup"). The one port still picked, Ray Client's, is taken here before its server binds it; and
    Ray's fixed defaults, which a second cluster on the machine would hold, are held too (the dashboard's 8265,
    Ray Client's 10001, the dashboard agent's 52365), on both loopback addresses the cluster uses."""
    import vidray.local_cluster

    held, ports = [], []
    for port in (0, 8265, 10001, 52365):
        try:
            for host in (vidray.local_cluster.NODE_IP, "127.0.0.1"):
                listener = socket.socket()
                held.append(listener)
                listener.bind((host, port))
                listener.listen()
                port = listener.getsockname()[1]
        except OSError:  # another program holds it already: just as taken
            pass
        ports.append(port)
    taken_client_port = ports[0]
    monkeypatch.setattr(vidray.local_cluster, "free_port", lambda: taken_client_port)
    try:
        cluster.start_head(num_cpus=1)
        cluster.add_nodes(["a"], num_cpus=1)
        probe = "import ray; ray.init(); print(sum(node['Alive'] for node in ray.nodes()), ray.get_runtime_context().gcs_address)"
        out = subprocess.run([sys.executable, "-c", probe], env=cluster.driver_env(), capture_output=True, text=True, timeout=180)
    finally:
        for listener in held:
            listener.close()
    assert cluster.client_port == taken_client_port
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split()[-2:] == ["2", cluster.address]
    assert cluster.address.startswith("127.0.0.2:")
    assert sorted(cluster.raylets().values()) == ["a", "head"]


def _registered_checkpoints(run_dir: Path) -> list[str]:
    """Checkpoints Ray Train's controller has registered (its checkpoint_manager_snapshot.json)."""
    try:
        snapshot = json.loads((run_dir / "checkpoint_manager_snapshot.json").read_text())
    except (OSError, ValueError):  # not written yet / being replaced
        return []
    return [entry["checkpoint_dir_name"] for entry in snapshot["checkpoint_results"]]


def _train_workers(cluster: LoopbackCluster) -> dict[int, str]:
    """{pid: node name} of Ray Train's worker actors (process title ray::RayTrainWorker...)."""
    raylets = cluster.raylets()
    return {
        pid: raylets.get(parent, "?")
        for pid, (parent, argv) in cluster.processes().items()
        if argv and argv[0].startswith("ray::RayTrainWorker")
    }


def _wait_for(condition, driver: subprocess.Popen, log: Path, what: str, timeout: float = 240, poll: float = 0.2) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert driver.poll() is None, f"the driver ended while waiting for {what}:\n{log.read_text()[-6000:]}"
        assert time.monotonic() < deadline, f"no {what} within {timeout} s:\n{log.read_text()[-6000:]}"
        time.sleep(poll)
