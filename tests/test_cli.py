"""The `vidray` command's own surface: what `--help` shows for every subcommand, and a cluster it cannot reach."""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from vidray.cli import build_parser
from vidray.cluster import LOOPBACK_IP, free_port

REPO = Path(__file__).resolve().parents[1]


def commands(parser: argparse.ArgumentParser, name: str = "vidray"):
    """(``vidray index folder``, its parser) for the command and every subcommand under it."""
    yield name, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub_name, sub_parser in action.choices.items():
                yield from commands(sub_parser, f"{name} {sub_name}")


def test_every_option_and_command_has_a_help_line():
    """`vidray X --help` says what every option is for: none is listed bare."""
    bare = []
    for name, parser in commands(build_parser()):
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                bare += [f"{name} {choice.dest}" for choice in action._choices_actions if not choice.help]
            elif action.help is None:
                bare.append(f"{name} {'/'.join(action.option_strings) or action.dest}")
    assert not bare, f"options and commands without help: {bare}"


def test_a_cluster_that_cannot_be_reached_is_one_line_naming_where_its_address_came_from(tmp_path):
    """RAY_ADDRESS with no cluster there, or the record of a `ray start` head that has died without `ray stop`:
    ray.init's ConnectionError ended `vidray train` in a traceback, and Ray's hint to run `ray stop` is an INFO
    line the console does not show. No cluster starts here; each driver gives up on connecting after Ray's
    own GCS wait (30 s, which no setting shortens without Ray aborting the process), so the two run at once."""
    address = f"{LOOPBACK_IP}:{free_port()}"  # nothing listens there (127.0.0.1 Ray would swap for the host's address)
    (tmp_path / "ray").mkdir()
    (tmp_path / "ray" / "ray_current_cluster").write_text(address)  # where `ray start` records its head (RAY_TMPDIR)
    env = {**os.environ, "RAY_NUM_REDIS_GET_RETRIES": "1", "RAY_TMPDIR": str(tmp_path)}
    env.pop("RAY_ADDRESS", None)
    command = [sys.executable, "-m", "vidray", "train", "--config", str(REPO / "configs" / "demo.yaml")]
    cases = {
        "RAY_ADDRESS": ({"RAY_ADDRESS": address}, "start that cluster, or unset RAY_ADDRESS for a local cluster of vidray's own"),
        "the cluster `ray start` left on this machine, which is gone": (
            {}, "run `ray stop` to forget it (vidray then starts a local cluster of its own), or `ray start --head` again"),
    }  # fmt: skip
    drivers = {where: subprocess.Popen(command, env={**env, **extra}, cwd=tmp_path, stdout=subprocess.PIPE,
                                       stderr=subprocess.PIPE, text=True) for where, (extra, _) in cases.items()}  # fmt: skip
    try:
        for where, (_, fix) in cases.items():
            stdout, stderr = drivers[where].communicate(timeout=300)
            assert (drivers[where].returncode, stdout) == (2, ""), stderr[-3000:]
            assert stderr.strip().splitlines()[-1] == f"vidray train: error: cannot reach the Ray cluster at {address} ({where}): {fix}"
            assert "Traceback" not in stderr, stderr[-3000:]
    finally:
        for driver in drivers.values():
            if driver.poll() is None:
                driver.kill()
                driver.communicate()


def test_ray_address_of_a_dashboard_is_one_line_saying_what_to_set(tmp_path):
    """RAY_ADDRESS=http://127.0.0.1:8265, the Jobs API's address that Ray's job docs have users export: ray.init
    raised ValueError (ray/client_builder.py) and every local vidray command ended in a traceback. Nothing listens
    at the address (Ray refuses the scheme before connecting anyway), and no cluster starts."""
    address = f"http://127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address}
    command = [sys.executable, "-m", "vidray", "prepare", "--config", str(REPO / "configs" / "demo.yaml")]
    proc = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, ""), proc.stderr[-3000:]
    assert proc.stderr.strip().splitlines() == [
        f"vidray prepare: error: RAY_ADDRESS={address} is a Ray dashboard's address (its Jobs API), which `ray job "
        "submit` uses; vidray connects to the cluster itself: unset RAY_ADDRESS (vidray then joins the cluster `ray "
        "start` left on this machine, or starts its own), or set it to the head's HOST:6379"
    ]
    assert list(tmp_path.iterdir()) == []  # refused before the data is prepared
