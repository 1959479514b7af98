"""The README's step-by-step walk-through, run as written, and the console and tracking of the
`vidray train` (and then a `vidray pretrain`) it runs.

Each command of the section's ```bash blocks runs in bash from a scratch folder that sees the
repository's configs/, with HOME pointing at a temporary folder (so ~/ray_results is the test's)
and RAY_ADDRESS at the session's loopback head (so the commands do not each start a cluster).
The commands themselves are not changed.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECTION = "## The pipeline, step by step"
# Lines Ray prints at INFO (or as progress bars) that the console of a command must not show.
RAY_NOISE = (
    "Checkpoint successfully created", "Reporting training result", "Starting execution", "Execution plan",
    "execution finished", "Progress bars disabled", "PreemptionWatcher", "Running Dataset", "it/s]", "Traceback",
    "Connecting to existing Ray cluster", "Started a local Ray instance",
    "maximum expected startup concurrency",  # the raylet's, whenever its node has run 4x its CPUs in workers
)  # fmt: skip


def readme_commands(readme: str) -> list[str]:
    """The shell commands of the ```bash blocks between SECTION and the next ## heading."""
    section = readme.split(SECTION, 1)[1].split("\n## ", 1)[0]
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", section, flags=re.S):
        for command in re.sub(r"\\\n\s*", " ", block).splitlines():
            if command.strip() and not command.lstrip().startswith("#"):
                commands.append(command.strip())
    return commands


def start_command(command: str, cwd: Path, env: dict) -> subprocess.Popen:
    """``command`` in bash as a user types it, stdout and stderr into one stream, as in a log file (a file,
    not a pipe: a command that runs beside another must not stall on a pipe nobody reads yet)."""
    log = tempfile.TemporaryFile("w+")
    proc = subprocess.Popen(["bash", "-c", command], cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    proc.log = log
    return proc


def finish_command(proc: subprocess.Popen, command: str) -> str:
    """The console of a command from :func:`start_command`, once it has succeeded."""
    try:
        proc.wait(timeout=900)  # a hang guard, not a speed check
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise
    with proc.log as log:
        log.seek(0)
        output = log.read()
    assert proc.returncode == 0, f"README command failed ({proc.returncode}): {command}\n{output[-5000:]}"
    return output


def run_command(command: str, cwd: Path, env: dict) -> str:
    return finish_command(start_command(command, cwd, env), command)


def summary_of(output: str) -> dict:
    """The JSON summary every vidray command prints as its last line (on a line of its own)."""
    return json.loads(output.rstrip().splitlines()[-1])


def assert_clean_console(output: str, command: str, epochs: int) -> None:
    lines = output.rstrip().splitlines()
    epoch_lines = [line for line in lines if line.startswith(f"vidray {command}: epoch ")]
    assert [line.split(" | ")[0] for line in epoch_lines] == [
        f"vidray {command}: epoch {e}/{epochs}" for e in range(1, epochs + 1)
    ], output[-5000:]
    assert len(lines) == len(set(lines)), f"a line printed twice:\n{output[-5000:]}"
    for noise in RAY_NOISE:
        assert noise not in output, f"{noise!r} in the console:\n{output[-5000:]}"


def assert_tracked(folder: Path) -> None:
    """TensorBoard events and an offline Weights & Biases run in a train or pretrain run's folder."""
    assert list((folder / "tensorboard").glob("events.out.tfevents.*")), sorted(p.name for p in folder.iterdir())
    assert list((folder / "wandb").glob("offline-run-*")), sorted(p.name for p in folder.iterdir())


@pytest.fixture(scope="module")
def walkthrough(ray_head, tmp_path_factory):
    """The section's commands, one after another; the pretraining commands (below) start beside them once
    the data they read is there (:data:`PRETRAIN_BESIDE`), and :func:`pretrain_consoles` collects them."""
    work = tmp_path_factory.mktemp("readme")
    (work / "configs").symlink_to(REPO / "configs")
    home = work / "home"
    home.mkdir()
    env = {
        **os.environ,
        "HOME": str(home),
        "RAY_ADDRESS": ray_head["address"],
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",  # the `vidray` command
    }
    env = {k: v for k, v in env.items() if k != "WANDB_MODE"}  # offline must come from the config's default
    commands = readme_commands((REPO / "README.md").read_text())
    outputs, pretraining = {}, {}
    try:
        for command in commands:
            if command.startswith(PRETRAIN_BESIDE) and not pretraining:
                pretraining = {name: start_command(c, work, env) for name, c in PRETRAIN_COMMANDS.items()}
            outputs[command] = run_command(command, work, env)
        pretraining = pretraining or {name: start_command(c, work, env) for name, c in PRETRAIN_COMMANDS.items()}
        yield {"work": work, "home": home, "env": env, "outputs": outputs, "pretraining": pretraining}
    finally:
        stop_commands(pretraining)  # a pretraining command left running when a step failed or nobody collected it


def test_the_step_by_step_section_runs_as_written(walkthrough):
    outputs = walkthrough["outputs"]
    assert [c.split()[1] for c in outputs] == [
        "demo-data", "index", "report", "preprocess", "train", "evaluate", "export", "predict"
    ]  # fmt: skip
    summaries = {command.split()[1]: summary_of(output) for command, output in outputs.items()}
    # Every command has vidray's console: Ray's own lines (preprocess and train run on Ray) stay in its logs.
    for command, output in outputs.items():
        for noise in RAY_NOISE:
            assert noise not in output, f"{noise!r} in the console of {command}:\n{output[-5000:]}"
    train = summaries["train"]
    runs = walkthrough["home"] / "ray_results"
    # The checkpoint the README evaluates is the one the summary names as the last epoch's.
    assert train["checkpoint"] == str(runs / "demo_train" / "checkpoint_epoch_0002")
    assert train["last"]["epoch"] == 3 and train["best_checkpoint"]  # epochs done, as the console counts
    # Step 4 reuses step 3's shards, as the README says: they landed in the walk-through's folder,
    # not in the directory of whichever Ray worker decoded them.
    train_output = next(o for c, o in outputs.items() if c.startswith("vidray train"))
    reused = re.search(r"decoded 0, reused (\d+)/(\d+) shards", train_output)
    assert reused and reused[1] == reused[2], train_output[-3000:]
    shards = list((walkthrough["work"] / "data" / "walkthrough" / "dataset").glob("*/shard-*.parquet"))
    assert len(shards) == int(reused[2]) and {p.parent.name for p in shards} == {"train", "val", "test"}
    # `make demo`'s folder (data/demo, demo.yaml's default paths) is left alone: the walk-through and the demo,
    # run in either order, each found the other's videos there and refused to go on.
    assert not (walkthrough["work"] / "data" / "demo").exists()
    assert summaries["evaluate"]["num_samples"] == 12 and 0 <= summaries["evaluate"]["accuracy"] <= 1
    export_output = next(o for c, o in outputs.items() if c.startswith("vidray export"))
    assert ('vidray export: models/demo (model card: models/demo/README.md); load it with '
            'pipeline("video-classification", model="models/demo")\n') in export_output  # from scratch: no remote code
    evaluate_output = next(o for c, o in outputs.items() if c.startswith("vidray evaluate"))
    assert re.search(r"^vidray evaluate: test split, 12 videos, .+: accuracy \d\.\d{3}, macro-F1 \d\.\d{3}, loss .+"
                     r" -> reports/eval/confusion_matrix\.png, reports/eval/per_class\.md$", evaluate_output, re.M), evaluate_output
    assert len(summaries["predict"]["results"]) == 12


def test_vidray_train_prints_one_line_per_epoch_and_tracks_the_run(walkthrough):
    (command, output), = [(c, o) for c, o in walkthrough["outputs"].items() if c.startswith("vidray train")]
    assert_clean_console(output, "train", epochs=3)
    assert_tracked(walkthrough["home"] / "ray_results" / "demo_train")
    # Then one line on where the best epoch and the learning curves are.
    run = walkthrough["home"] / "ray_results" / "demo_train"
    best = summary_of(output)["best_checkpoint"]
    assert re.search(rf"^vidray train: best val macro-F1 \d\.\d{{4}} at epoch [123] \({re.escape(best)}\); "
                     rf"learning curves: tensorboard --logdir {re.escape(str(run / 'tensorboard'))}$", output, re.M), output[-3000:]


# Pretraining on the walk-through's folder: once as the README's train runs (clean console, tracking),
# once with --verbose. The two runs' folders differ (run.name), and each command's console is its own
# process's, so they run side by side on the session's cluster, and beside the walk-through's last steps
# (PRETRAIN_BESIDE on: evaluate, export and predict use no Ray): on two cores one process's start-up overlaps
# another's (68 s for both fixtures, from 75 s one after the other). Half a CPU per worker, so that one CPU
# stays free for the Ray Data reads that fill each run's cache before it starts.
WALKTHROUGH_DATA = (
    "data.source=folder data.videos_dir=data/walkthrough/videos data.manifest=data/walkthrough/manifest.parquet "
    "data.dataset_dir=data/walkthrough/dataset"
)  # as the README's `vidray train` names them
PRETRAIN_COMMANDS = {
    "tracked": (
        f"vidray pretrain --config configs/demo.yaml {WALKTHROUGH_DATA} pretrain.epochs=2 run.name=demo_train "
        "run.wandb.enabled=true train.cpus_per_worker=0.5"
    ),
    "verbose": (
        f"vidray pretrain --verbose --config configs/demo.yaml {WALKTHROUGH_DATA} pretrain.epochs=1 "
        "run.name=demo_verbose train.cpus_per_worker=0.5"
    ),
}
PRETRAIN_BESIDE = "vidray evaluate"


def stop_commands(started: dict[str, subprocess.Popen]) -> None:
    for proc in started.values():
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def pretrain_consoles(walkthrough) -> dict[str, str]:
    started = walkthrough["pretraining"]
    try:
        return {name: finish_command(proc, PRETRAIN_COMMANDS[name]) for name, proc in started.items()}
    finally:
        stop_commands(started)  # when one failed, the other is not left running


def test_vidray_pretrain_prints_one_line_per_epoch_and_tracks_the_run(walkthrough, pretrain_consoles):
    """Pretraining on the walk-through's folder, with the same console and tracking."""
    output = pretrain_consoles["tracked"]
    assert_clean_console(output, "pretrain", epochs=2)
    run_dir = walkthrough["home"] / "ray_results" / "demo_train-pretrain"
    assert summary_of(output)["model_dir"] == str(run_dir / "encoder")
    # demo.yaml sets scratch sizes, which the encoder's config replaces: with them, the hint's command is refused.
    assert (f"vidray pretrain: encoder in {run_dir / 'encoder'}; fine-tune from it with model.init=pretrained "
            f"model.name_or_path={run_dir / 'encoder'} model.patch_size=null model.tubelet_size=null\n") in output
    assert_tracked(run_dir)


def test_verbose_brings_back_what_the_console_leaves_out(pretrain_consoles):
    """``--verbose`` shows Ray's own lines again (its workers' logs, Ray Train's report and
    checkpoint lines), beside vidray's one line per epoch and its summary."""
    output = pretrain_consoles["verbose"]
    assert "(RayTrainWorker pid=" in output, output[-5000:]  # the workers' output reaches the console
    assert "Checkpoint successfully created" in output, output[-5000:]
    assert [line for line in output.splitlines() if line.startswith("vidray pretrain: epoch 1/1")], output[-5000:]
    assert summary_of(output)["model_dir"].endswith("demo_verbose-pretrain/encoder")
