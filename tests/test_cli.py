"""The `vidray` command's own surface: what `--help` shows for every subcommand, where overrides may go, the
settings `vidray preprocess` takes from its flags, and a cluster it cannot reach."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from vidray.cli import build_parser, main
from vidray.cluster import LOOPBACK_IP, free_port
from vidray.config import load_config
from vidray.errors import UserError

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


@pytest.mark.parametrize("command", ["train", "pretrain", "tune", "prepare"])
def test_overrides_may_come_before_between_and_after_options(command, capsys):
    """`vidray tune --config my.yaml tune.num_samples=4 --restart run.name=x` ended in `unrecognized arguments:
    run.name=x` under the top-level usage. Every override reaches the config, in the order given (the last of a
    key wins): the config refuses train.lr=-1, which came after an option, and not train.epochs=0, which a later
    override replaced. Nothing runs: the config fails before Ray or torch is imported."""
    config = str(REPO / "configs" / "demo.yaml")
    options = ["--verbose"] if command == "prepare" else ["--restart", "--verbose"]
    argv = [command, "train.epochs=0", options[0], "--config", config, "train.epochs=1", *options[1:], "train.lr=-1"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"vidray {command}: error: invalid config {config}: train.lr: "), err
    assert "train.epochs" not in err[0]
    # An unknown option is still refused, under the command's own usage.
    with pytest.raises(SystemExit) as exit_:
        main([command, "train.lr=1e-4", "--restrat", "train.epochs=2"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_.value.code == 2 and err[0].startswith(f"usage: vidray {command} ")
    assert err[-1] == f"vidray {command}: error: unrecognized arguments: --restrat"


@pytest.mark.parametrize(("command", "override", "instead"), [
    ("tune", "train.lr=1e-4", "tune.lr sets it there; pass tune.lr=1e-4 instead"),
    ("pretrain", "train.epochs=3", "pretrain.epochs sets it there; pass pretrain.epochs=3 instead"),
    ("pretrain", "model.dropout=0.1", "drop the override"),
])  # fmt: skip
def test_an_override_the_command_ignores_is_refused_before_anything_runs(command, override, instead, capsys):
    """`vidray tune train.lr=1e-4` (the help's own example was train.lr=1e-4) trained every trial at tune.lr without a
    word, and its saved config showed 1e-4; `vidray pretrain train.epochs=3` ran pretrain.epochs. One line now."""
    assert main([command, "--config", str(REPO / "configs" / "demo.yaml"), override]) == 2
    assert capsys.readouterr().err.strip().splitlines() == [
        f"vidray {command}: error: {override} has no effect on `vidray {command}`: {instead}"]
    assert "ray" not in sys.modules or not sys.modules["ray"].is_initialized()


def test_preprocess_stores_what_a_training_config_of_the_same_frames_and_size_plans():
    """`vidray preprocess --frames 8` stored 16 frames at 8/7 x size, while `vidray train data.frames=8` plans the
    data.* defaults (32 frames of 128 px): training on that dataset planned other shard ids and decoded it all
    again. The flags are now a DataSettings, so a flag left out takes its data.* default, and the checks are the
    config's, the bad ones named by flag in one line."""
    from vidray.cli import PREPROCESS_KEYS, preprocess_settings

    def settings(*flags: str):
        return preprocess_settings(build_parser().parse_args(["preprocess", "--manifest", "m.parquet", "--out", "D", *flags]))

    for flags in ([], ["--frames", "8"], ["--frames", "8", "--size", "64"], ["--size", "120", "--stored-size", "140"], ["--size", "224"],
                  ["--store", "jpeg", "--jpeg-quality", "75", "--videos-per-shard", "3", "--dispatch", "ray_tasks"]):
        overrides = [f"data.{flag[2:].replace('-', '_')}={value}" for flag, value in zip(flags[::2], flags[1::2])]
        data, config = settings(*flags), load_config(None, overrides).data
        assert {key: getattr(data, key) for key in PREPROCESS_KEYS} == {key: getattr(config, key) for key in PREPROCESS_KEYS}
    assert (settings("--frames", "8").stored_frames, settings("--size", "64").stored_size) == (32, 128)
    for flags, message in (
        (["--frames", "40", "--stored-frames", "36"], "--stored-frames (36) must be >= --frames (40)"),
        (["--size", "8"], "--size=8: Input should be greater than or equal to 16"),
        (["--decoder-device", "cuda"], "--decoder-device=cuda needs --decoder=torchcodec, not pyav"),
    ):  # fmt: skip
        with pytest.raises(UserError, match="^" + re.escape(message) + "$"):
            settings(*flags)


@pytest.mark.parametrize("shard", ["0", "-1"])
def test_zero_videos_per_shard_is_refused_like_a_negative_count(shard, tmp_path, capsys):
    """`vidray preprocess --videos-per-shard 0` became 8 (0 read as "not given"); it is refused in one line now,
    before the manifest is read."""
    manifest = tmp_path / "manifest.parquet"  # never read: the flag is refused first
    assert main(["preprocess", "--manifest", str(manifest), "--out", str(tmp_path / "ds"), "--videos-per-shard", shard]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"vidray preprocess: error: --videos-per-shard={shard}: Input should be greater than or equal to 1"]
    assert not (tmp_path / "ds").exists()


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
