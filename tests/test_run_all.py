"""tests/run_all.sh, the two lanes of `make test`, with a stand-in for the venv's Python that records
what it was asked to run: the Ray lane starts at once, the lane beside it runs its set-up command
first (the Makefile's `make pipeline-env`), then the tests without Ray, then those with Ray clusters of
their own; a failed set-up fails `make test` in a line that names it, both lanes find the pipeline venv
wherever `PIPELINE_VENV` puts it, and stopping `make test` stops the set-up, and lets a pytest of the
lane beside tear its clusters down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

RUN_ALL = Path(__file__).resolve().with_name("run_all.sh")
REPO = RUN_ALL.parents[1]


def _stand_in_python(tmp_path: Path) -> tuple[Path, Path, Path]:
    """(python, its call log, the set-up's marker): each call logs its arguments and whether the marker
    existed when it started (and, in ``env.txt``, the pipeline venv's Python it was pointed at)."""
    calls, marker = tmp_path / "calls.txt", tmp_path / "set-up-done"
    python = tmp_path / "python"
    python.write_text(
        "#!/usr/bin/env bash\n"
        f'if [ -e "{marker}" ]; then built=yes; else built=no; fi\n'
        f'echo "$* | set-up done: $built" >> "{calls}"\n'
        f'echo "$* | ${{VIDRAY_PIPELINE_PYTHON:-unset}}" >> "{tmp_path / "env.txt"}"\n'
        # STAND_IN_FAILS: the call whose arguments hold it fails (as pytest does when a test fails).
        'if [ -n "${STAND_IN_FAILS:-}" ] && [[ "$*" == *"$STAND_IN_FAILS"* ]]; then exit 1; fi\n'
    )
    python.chmod(0o755)
    return python, calls, marker


def test_the_lane_beside_runs_its_set_up_first_and_both_lanes_run(tmp_path):
    python, calls, marker = _stand_in_python(tmp_path)
    done = subprocess.run(
        # The set-up ends only once the Ray lane has started: were the lanes run one after the other,
        # this would wait for ever (until the timeout).
        ["bash", str(RUN_ALL), str(python), "bash", "-c", f"until [ -e '{calls}' ]; do sleep 0.05; done; touch '{marker}'"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    assert "make test: both lanes passed" in done.stdout
    lines = calls.read_text().splitlines()
    # The Ray lane did not wait for the set-up (84 s of pip in a fresh clone); the lane beside ran after it.
    assert lines[0] == "-m pytest -q -m ray and not own_cluster --durations=15 | set-up done: no", lines
    # Beside it, the tests without Ray, then those with clusters of their own, one after the other.
    assert lines[1:] == [
        "-m pytest -q -m not ray -p no:cacheprovider --durations=5 | set-up done: yes",
        "-m pytest -q -m own_cluster -p no:cacheprovider --durations=5 | set-up done: yes",
    ], lines


def test_a_failed_set_up_fails_make_test_naming_it_and_runs_no_test_beside(tmp_path):
    python, calls, _ = _stand_in_python(tmp_path)
    done = subprocess.run(
        ["bash", str(RUN_ALL), str(python), "bash", "-c", "echo 'pipeline-env: needs 7 GB free' >&2; exit 3"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert done.returncode == 1
    assert "`bash -c echo 'pipeline-env: needs 7 GB free' >&2; exit 3` failed" in done.stderr
    assert "make test: FAILED (Ray lane exit 0, other lane exit 1)" in done.stderr
    assert "pipeline-env: needs 7 GB free" in done.stdout  # the set-up's own words, in the lane's log
    assert calls.read_text().splitlines() == ["-m pytest -q -m ray and not own_cluster --durations=15 | set-up done: no"]


def test_a_failure_without_ray_still_runs_the_own_cluster_tests_and_fails_make_test(tmp_path):
    python, calls, _ = _stand_in_python(tmp_path)
    env = {**os.environ, "STAND_IN_FAILS": "-m not ray"}
    done = subprocess.run(["bash", str(RUN_ALL), str(python)], capture_output=True, text=True, timeout=60, env=env)
    assert done.returncode == 1
    assert "make test: FAILED (Ray lane exit 0, other lane exit 1)" in done.stderr
    assert any(line.startswith("-m pytest -q -m own_cluster ") for line in calls.read_text().splitlines())


def test_the_lanes_marker_expressions_split_tests_by_the_cluster_they_use():
    """tests/conftest.py marks a `ray` test that uses neither session fixture `own_cluster`: collected from a
    module of each kind (test_install's sweep starts its own cluster; test_compat has one test on the
    session's head and the rest without Ray), each test lands in exactly one of run_all.sh's three lanes."""
    def collected(expression: str) -> set[str]:
        done = subprocess.run(
            [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-m", expression,
             "tests/test_install.py", "tests/test_compat.py"],
            cwd=REPO, capture_output=True, text=True, timeout=300,
        )  # fmt: skip
        assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
        return {line for line in done.stdout.splitlines() if "::" in line}

    everything = collected("slow or not slow")
    own, session, without = collected("own_cluster"), collected("ray and not own_cluster"), collected("not ray")
    assert own == {"tests/test_install.py::test_installed_vidray_runs_a_sweep_from_any_folder"}
    assert session == {"tests/test_compat.py::test_a_command_joins_the_cluster_ray_start_left_running"}
    assert own | session | without == everything and len(own) + len(session) + len(without) == len(everything)


def test_a_terminated_pytest_tears_its_fixtures_down(tmp_path):
    """What stopping `make test` sends the lane beside is SIGTERM (its pytest ignores Ctrl-C: bash starts a
    script's background commands so); tests/conftest.py turns it into Ctrl-C, so the lane's fixtures end what
    they started (a test's own Ray cluster, whose daemons would otherwise outlive it), and stops the session
    after that test even where the test caught the interrupt (vidray.cli.main, run in-process, does)."""
    started, torn_down, next_ran = tmp_path / "started", tmp_path / "torn-down", tmp_path / "next-ran"
    (tmp_path / "test_held.py").write_text(
        "import pathlib, time\n"
        "import pytest\n"
        "@pytest.fixture(scope='module')\n"
        "def resource():\n"
        "    yield\n"
        f"    pathlib.Path({str(torn_down)!r}).touch()\n"
        "def test_held(resource):\n"
        f"    pathlib.Path({str(started)!r}).touch()\n"
        "    try:\n"
        "        time.sleep(120)\n"
        "    except KeyboardInterrupt:  # as vidray.cli.main does: exit status 130, no traceback\n"
        "        pass\n"
        "def test_next(resource):\n"
        f"    pathlib.Path({str(next_ran)!r}).touch()\n"
    )
    # The suite's conftest as a plugin, as it loads for the suite's own tests.
    held = subprocess.Popen(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "conftest", str(tmp_path / "test_held.py")],
        cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(REPO / "tests")},
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 120
        while not started.exists():
            assert held.poll() is None and time.monotonic() < deadline, held.communicate()[0][-3000:]
            time.sleep(0.05)
        held.send_signal(signal.SIGTERM)
        output, _ = held.communicate(timeout=60)
    finally:
        held.kill()
    assert torn_down.exists(), output[-3000:]
    assert not next_ran.exists(), output[-3000:]  # the interrupt was caught, yet the session stopped


def test_without_a_set_up_command_the_lanes_run_as_before(tmp_path):
    python, calls, _ = _stand_in_python(tmp_path)
    done = subprocess.run(["bash", str(RUN_ALL), str(python)], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert sorted(line.split(" | ")[0] for line in calls.read_text().splitlines()) == [
        "-m pytest -q -m not ray -p no:cacheprovider --durations=5",
        "-m pytest -q -m own_cluster -p no:cacheprovider --durations=5",
        "-m pytest -q -m ray and not own_cluster --durations=15",
    ]


def test_make_test_points_both_lanes_at_the_pipeline_venv_wherever_it_is(tmp_path):
    """`make test PIPELINE_VENV=X` (what the Makefile's disk-space message advises) builds X and the tests
    look for X's Python, not .venv-pipeline's. Run through make itself, with the stand-in as the main venv's
    Python (its set-up then only touches stamps under tmp_path) and X already built (its stamp is newest)."""
    python, _, _ = _stand_in_python(tmp_path)
    (tmp_path / "venv").mkdir()
    elsewhere = tmp_path / "bigger-disk" / "pipeline"
    (elsewhere / "bin").mkdir(parents=True)
    (elsewhere / "bin" / "python").symlink_to(python)
    (elsewhere / ".vidray-pipeline-installed").touch()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MAKE", "VIDRAY_PIPELINE_PYTHON"))}
    done = subprocess.run(
        ["make", "--no-print-directory", "-C", str(REPO), "test",
         f"PY={python}", f"VENV={tmp_path / 'venv'}", f"PIPELINE_VENV={elsewhere}"],
        capture_output=True, text=True, timeout=120, env=env,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    lanes = [line for line in (tmp_path / "env.txt").read_text().splitlines() if line.startswith("-m pytest")]
    assert sorted(lanes) == [
        f"-m pytest -q -m not ray -p no:cacheprovider --durations=5 | {elsewhere}/bin/python",
        f"-m pytest -q -m own_cluster -p no:cacheprovider --durations=5 | {elsewhere}/bin/python",
        f"-m pytest -q -m ray and not own_cluster --durations=15 | {elsewhere}/bin/python",
    ]


def test_stopping_make_test_stops_the_lane_beside_and_its_set_up(tmp_path):
    """A CI timeout or a kill ends `make test`; the lane beside, still in its set-up, ends with it (by
    process id: the lane and its children), not left building a venv for nobody."""
    python, _, _ = _stand_in_python(tmp_path)
    pid_file = tmp_path / "set-up.pid"
    script = subprocess.Popen(
        ["bash", str(RUN_ALL), str(python), "bash", "-c", f"echo $$ > '{pid_file}'; exec sleep 300"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        while not (pid_file.is_file() and pid_file.read_text().strip()) and time.monotonic() < deadline:
            time.sleep(0.05)
        set_up = int(pid_file.read_text())
        assert _alive(set_up)
        script.terminate()
        script.wait(timeout=30)
        deadline = time.monotonic() + 10
        while _alive(set_up) and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not _alive(set_up), "the set-up outlived make test"
    finally:
        script.kill()


def _alive(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, ended but not yet reaped by its parent, does not)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:  # no such process (any more)
        return False
    return state != "Z"
