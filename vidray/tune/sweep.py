"""The main job: a Ray Tune sweep over MixUp α, learning rate and weight decay.

Each Tune trial runs :func:`train_trial`, a light *driver* function that builds
one Ray Train ``TorchTrainer`` (:func:`vidray.train.driver.build_trainer`) with the
trial's hyper-parameters and waits on ``fit()``. The trainer's workers do the
work; ``TuneReportCallback`` forwards each epoch's metrics (and checkpoint path)
from Ray Train to Tune, where ASHA compares trials on ``tune.metric`` at every
epoch and stops the weak ones early. This is the Train-V2 pattern (the old
``Tuner(trainer)`` is deprecated).

Before any trial starts, :func:`run_sweep` refuses with a one-line
:class:`~vidray.errors.UserError` what could only fail later: an empty grid,
an unknown metric, a trial the cluster can never place, a missing dataset or a
bad batch size. The dataset is prepared once, here in the driver; trials only
read it.

Layout under ``run.storage_path``::

    <run.name>/                      the Tune experiment (Tuner.restore reads it to continue)
      vidray_run.json                vidray's marker ("finished" once every trial is), vidray/train/runs.py
      vidray_sweep.json              the config the sweep was started with
      <trial dir>/                   Tune's progress.csv, result.json, TensorBoard events, wandb/
      train_runs/<trial_id>/         that trial's Ray Train run: checkpoint_epoch_NNNN/ ...
      reports/                       results table, figures, best model (default run.reports_dir)

Running the same command again is safe (vidray/train/runs.py): a finished sweep only
prints its results, read from vidray's and Tune's JSON files; an interrupted one is restored (finished trials are kept as they
are, an interrupted trial restarts its Ray Train run under the same name, so
Train continues from that run's latest checkpoint instead of epoch 0).
``--restart`` or a new ``run.name`` starts over.
"""

from __future__ import annotations

import socket
import sys
import time
from pathlib import Path
from typing import Any

import ray
import ray.data
import ray.train
import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from vidray.compat import train_to_tune_report_queues
from vidray.config import SearchRange, TrainSettings, TuneSettings, VidrayConfig
from vidray.errors import UserError
from vidray.train.metrics import EPOCHS_DONE, TUNABLE_METRICS
from vidray.train.runs import (
    SWEEP_CONFIG_FILE,
    RunState,
    console_settings,
    mark_run,
    open_run,
    read_json,
    read_marker,
    refuse_changed_config,
    wandb_key_error,
    wandb_mode,
    write_json,
)
from vidray.storage import join_uri

# The sweep's hyper-parameters: Tune samples them, each trial copies them into cfg.train
# (and ``seed`` when a pure grid is repeated, see build_param_space).
SWEPT = ("mixup_alpha", "lr", "weight_decay")

# A trial's own process only waits on Ray Train: it needs memory, not a CPU.
# Even a fraction of a CPU would hurt: Ray Data's read tasks ask for a whole
# CPU, so on a 2-CPU machine a 1-CPU worker plus 0.01 for the trial would leave
# 0.99, and the workers would wait forever for data. (Tune refuses an empty request.)
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}

TRAIN_RUNS_DIR = "train_runs"


# ------------------------------------------------------------- param space


def _axis(values: SearchRange | list[float], key: str, log: bool):
    """One swept key: a grid over a list, log-uniform or uniform draws over a range."""
    if isinstance(values, SearchRange):
        if values.low == values.high:
            return values.low
        return ray.tune.loguniform(values.low, values.high) if log else ray.tune.uniform(values.low, values.high)
    if not values:
        raise UserError(f"{key} is an empty list, so the sweep would have no trials; give at least one value")
    return ray.tune.grid_search(list(values)) if len(values) > 1 else values[0]


def build_param_space(tune: TuneSettings) -> dict[str, Any]:
    """Tune's param space from ``cfg.tune``: MixUp α is always a grid; lr and weight decay a grid or a range."""
    if not tune.mixup_alpha:
        raise UserError("tune.mixup_alpha is an empty list, so the sweep would have no trials; e.g. [0.0, 0.4]")
    space = {
        "mixup_alpha": ray.tune.grid_search(list(tune.mixup_alpha)),
        "lr": _axis(tune.lr, "tune.lr", log=True),
        "weight_decay": _axis(tune.weight_decay, "tune.weight_decay", log=False),
    }
    if tune.num_samples > 1 and isinstance(tune.lr, list) and isinstance(tune.weight_decay, list):
        # Repeats of one grid point would otherwise be the same seeded run, bit for bit on CPU.
        space["seed"] = ray.tune.randint(0, 2**31 - 1)
    return space


def count_trials(tune: TuneSettings) -> int:
    """Trials the sweep will run: grid size x num_samples (ranges add draws, not grid points)."""
    size = len(tune.mixup_alpha)
    for values in (tune.lr, tune.weight_decay):
        if isinstance(values, list):
            size *= len(values)
    return size * tune.num_samples


def trial_config(cfg: VidrayConfig, params: dict[str, Any]) -> VidrayConfig:
    """``cfg`` with one trial's hyper-parameters in ``cfg.train`` (validated again)."""
    update = {k: float(params[k]) for k in SWEPT}
    if "seed" in params:
        update["seed"] = int(params["seed"])
    train = TrainSettings.model_validate({**cfg.train.model_dump(), **update})
    return cfg.model_copy(update={"train": train})


def check_sweep_config(cfg: VidrayConfig) -> None:
    tune = cfg.tune
    if tune.metric not in TUNABLE_METRICS:
        raise UserError(
            f"tune.metric={tune.metric!r} is not reported by training; use one of {', '.join(TUNABLE_METRICS)}"
        )
    expected_mode = "min" if tune.metric.endswith("_loss") else "max"
    if tune.mode != expected_mode:
        raise UserError(f"tune.mode={tune.mode!r} would pick the worst trials for tune.metric={tune.metric}; set tune.mode={expected_mode}")
    if tune.asha and tune.grace_period > cfg.train.epochs:
        raise UserError(
            f"tune.grace_period={tune.grace_period} is more than train.epochs={cfg.train.epochs}: ASHA could never "
            "compare trials; lower tune.grace_period or set tune.asha=false"
        )


# ------------------------------------------------------------- Ray


def _free_loopback_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def local_cluster_kwargs() -> dict[str, Any]:
    """ray.init() arguments for a fresh local cluster that a sweep can rely on.

    ASHA stops a trial by killing its process, which takes its Ray Train
    controller with it; Ray Train's placement-group cleaner then frees the
    trial's workers, and it finds out the controller died through the State
    API, i.e. the dashboard. So the dashboard runs (on loopback), and the
    cluster's processes are told its address: without that they would look for
    "the" Ray instance on the machine and fail, or pick the wrong one, whenever
    another Ray instance runs beside this one.
    """
    port = _free_loopback_port()
    return dict(
        include_dashboard=True,
        dashboard_host="127.0.0.1",
        dashboard_port=port,
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": f"http://127.0.0.1:{port}"}},
    )


class ReportToTune(TuneReportCallback):
    """Ray Train -> Tune, adding :data:`EPOCHS_DONE` so ASHA and the curves count epochs, not reports."""

    def after_report(self, run_context, metrics, checkpoint):
        metrics = [{**metrics[0], EPOCHS_DONE: int(metrics[0]["epoch"]) + 1}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def train_trial(params: dict[str, Any], *, cfg: VidrayConfig, dataset_dir: str, train_runs: str) -> None:
    """One trial: a full Ray Train run with the trial's hyper-parameters."""
    from vidray.train.driver import build_trainer, make_run_config

    trial_cfg = trial_config(cfg, params)
    # Several trials' data-loading progress bars interleaved in one log are noise;
    # the datasets built below carry this context to the processes that run them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    run_config = make_run_config(
        trial_cfg,
        # The trial id, not a timestamp: a resumed trial must find its Train run again.
        name=ray.tune.get_context().get_trial_id(),
        storage_path=train_runs,
        callbacks=[ReportToTune()],
    )
    build_trainer(trial_cfg, run_config=run_config, dataset_dir=dataset_dir).fit()
    wait_until_tune_has_the_last_report()


# How long the hand-over from Ray Train to Tune must look finished before the trial may end.
HANDOVER_QUIET_S = 2.0


def wait_until_tune_has_the_last_report(timeout: float = 120.0) -> None:
    """Return once the trial's process has taken every report TuneReportCallback sent.

    Works around a race in Ray 2.60's function trainable: the callback hands each
    epoch's metrics to the trial's main thread through a one-slot queue, and the main
    thread moves them into a one-slot result queue. ``fit()`` can return while the
    last epoch's metrics are still in the first queue; if this function then returns,
    Tune's end-of-function marker takes the result slot and the main thread blocks
    forever putting the last epoch behind it (seen as a sweep that hangs with idle
    CPUs). Waiting until both queues stay empty closes the window.
    """
    queues = train_to_tune_report_queues()
    if queues is None:
        return
    session, handover = queues
    deadline = time.monotonic() + timeout
    quiet_since = None
    while time.monotonic() < deadline:
        if handover.empty() and session.result_queue.empty():
            quiet_since = quiet_since or time.monotonic()
            if time.monotonic() - quiet_since >= HANDOVER_QUIET_S:
                return
        else:
            quiet_since = None
        time.sleep(0.05)


def wandb_callbacks(cfg: VidrayConfig) -> list:
    """Weights & Biases logging of every trial when run.wandb.enabled (each trial's wandb/ folder).

    The mode follows :func:`vidray.train.runs.wandb_mode`: WANDB_MODE=offline always keeps everything on
    disk; online mode needs a key, and without one the sweep stops here rather than prompting.
    """
    if not cfg.run.wandb.enabled:
        return []
    from ray.air.integrations.wandb import WandbLoggerCallback

    mode = wandb_mode(cfg.run.wandb)
    callback = WandbLoggerCallback(project=cfg.run.wandb.project, group=cfg.run.name, mode=mode)
    try:
        callback.setup()
    except ValueError as err:
        raise wandb_key_error(mode, err) from None
    return [callback]


# ------------------------------------------------------------- experiment dir


def sweep_state(cfg: VidrayConfig, experiment_path: str) -> RunState:
    """``new``, ``interrupted`` or ``finished``: what ``experiment_path`` holds for ``cfg``.

    Refuses, naming the keys, a sweep started with a config that shapes the trials differently:
    continuing it would mix two experiments in one table. Read from vidray's JSON files only: a
    finished sweep is reported from them and Tune's result.json files, never from Tune's pickles.
    Continuing an interrupted one does go through Tune's restore, which unpickles the experiment's
    state: the storage path must be one you trust, as Ray says of its own restore.
    """
    finished = bool((read_marker(experiment_path) or {}).get("finished"))
    if not finished and not ray.tune.Tuner.can_restore(experiment_path):
        return "new"
    saved = read_json(join_uri(experiment_path, SWEEP_CONFIG_FILE))
    if saved is not None:
        refuse_changed_config(saved, cfg, experiment_path, "sweep", saved_in=SWEEP_CONFIG_FILE)
    # Sweeps of older vidray versions carry no marker: a finished one is "continued" once, which
    # ends at once (every trial is terminated) and marks it finished.
    return "finished" if finished else "interrupted"


# ------------------------------------------------------------- console


class EpochLines(ray.tune.Callback):
    """One line per trial per epoch on the driver's console, instead of Tune's full result dumps."""

    def __init__(self, metric: str, epochs: int):
        self.metric = metric
        self.epochs = epochs

    def on_trial_result(self, iteration, trials, trial, result, **info):
        from vidray.report.results import trial_label

        epoch = result.get(EPOCHS_DONE)
        if epoch is None:
            return
        label = trial_label({k: trial.config[k] for k in SWEPT + ("seed",) if k in trial.config})
        speed = result.get("train_videos_per_s")
        print(
            f"[{trial.trial_id}] {label} | epoch {epoch}/{self.epochs} | "
            f"train loss {result.get('train_loss', float('nan')):.3f} | val loss {result.get('val_loss', float('nan')):.3f} | "
            f"val acc {result.get('val_accuracy', float('nan')):.3f} | {self.metric} {result.get(self.metric, float('nan')):.3f}"
            + (f" | {speed:.1f} clips/s" if speed else ""),
            flush=True,
        )


# ------------------------------------------------------------- the sweep


def run_sweep(cfg: VidrayConfig, restart: bool = False, verbose: bool = False) -> dict[str, Any]:
    """Run the sweep ``cfg`` describes and write the results table, figures and the best model
    under ``run.reports_dir``; return a summary with absolute paths.

    A sweep lives under ``run.storage_path/run.name``. Running the same command again prints
    the results of a finished sweep without training anything, and continues an interrupted
    one (Tune's restore: finished trials are kept, the others resume from their last
    checkpoint). ``restart`` (``--restart``) deletes it and starts over.
    """
    from vidray.cluster import DATA_CPUS, check_run_resources, cluster_capacity, derive_max_concurrent_trials
    from vidray.cluster import init_ray, shared_storage_paths
    from vidray.data.dataset import read_dataset_info
    from vidray.train.ingest import ingest_cpus
    from vidray.model.classifier import check_model_config
    from vidray.data.prepare import prepare_dataset
    from vidray.report.results import read_finished_trials, write_sweep_report
    from vidray.train.driver import check_dataset

    # Checks that need nothing but the config come first: they are instant.
    param_space = build_param_space(cfg.tune)
    check_sweep_config(cfg)
    check_model_config(cfg.model, cfg.data.frames, cfg.data.size)

    init_ray(**console_settings(verbose), **local_cluster_kwargs())
    storage_path, dataset_dir = shared_storage_paths(cfg)
    warn_if_inside_a_job_copy(cfg)
    capacity = cluster_capacity()
    # Whether the data will be cached is known only once it is prepared: check what holds either way now.
    check_run_resources(cfg.train, capacity, data_cpus=DATA_CPUS if cfg.train.cache_dataset == "never" else 0)
    # Trials run in other processes and directories: give them absolute paths.
    cfg = cfg.model_copy(
        update={
            "data": cfg.data.model_copy(update={"dataset_dir": dataset_dir}),
            "run": cfg.run.model_copy(update={"storage_path": storage_path, "reports_dir": cfg.run.reports_path()}),
        }
    )
    if Path(cfg.model.name_or_path).exists():
        model = cfg.model.model_copy(update={"name_or_path": str(Path(cfg.model.name_or_path).resolve())})
        cfg = cfg.model_copy(update={"model": model})
    callbacks = [EpochLines(cfg.tune.metric, cfg.train.epochs), *wandb_callbacks(cfg)]

    # Once, here: every trial reads the same shards.
    dataset_dir = prepare_dataset(cfg)
    info = read_dataset_info(dataset_dir)
    check_dataset(cfg, info, dataset_dir)
    data_cpus = ingest_cpus(cfg.train, info)
    check_run_resources(cfg.train, capacity, data_cpus)
    # Only a sweep that passed every check gets (or loses, with --restart) its folder.
    experiment_path, state = open_run(
        "tune", "sweep", storage_path, cfg.run.name, restart=restart,
        state_of=lambda folder: sweep_state(cfg, folder), finished_note="; its results follow",
    )  # fmt: skip
    max_concurrent = cfg.tune.max_concurrent_trials or derive_max_concurrent_trials(cfg.train, capacity, data_cpus)
    # The concurrency above assumes this caching decision: trials must not re-decide "auto"
    # on a cluster whose object store has changed meanwhile (nodes gone), or a trial that
    # streams could find no CPU left for Ray Data. (The saved sweep config keeps "auto".)
    cached = cfg.train.model_copy(update={"cache_dataset": "never" if data_cpus else "always"})
    trial_base = cfg.model_copy(update={"train": cached})

    trainable = ray.tune.with_resources(
        ray.tune.with_parameters(
            train_trial, cfg=trial_base, dataset_dir=dataset_dir, train_runs=join_uri(experiment_path, TRAIN_RUNS_DIR)
        ),
        TRIAL_DRIVER_RESOURCES,
    )
    if state == "finished":
        results = read_finished_trials(experiment_path)
        return write_sweep_report(results, cfg, experiment_path=experiment_path, dataset_dir=dataset_dir)
    if state == "interrupted":
        # Finished trials stay finished; interrupted and errored ones continue from their checkpoints.
        tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
    else:
        write_json(join_uri(experiment_path, SWEEP_CONFIG_FILE), cfg.model_dump(mode="json"))
        tuner = ray.tune.Tuner(
            trainable,
            param_space=param_space,
            tune_config=ray.tune.TuneConfig(
                num_samples=cfg.tune.num_samples,
                scheduler=build_trial_scheduler(cfg),
                max_concurrent_trials=max_concurrent,
            ),
            run_config=ray.tune.RunConfig(
                name=cfg.run.name, storage_path=storage_path, callbacks=callbacks, verbose=2 if verbose else 1
            ),
        )
    results = tuner.fit()
    if len(results) and results.num_errors == 0 and results.num_terminated == len(results):
        mark_run(experiment_path, "sweep", cfg.run.name, finished=True)
    return write_sweep_report(results, cfg, experiment_path=experiment_path, dataset_dir=dataset_dir)


def build_trial_scheduler(cfg: VidrayConfig):
    """ASHA on ``tune.metric`` over completed epochs, or None (every trial runs all epochs)."""
    if not cfg.tune.asha:
        return None
    return ray.tune.schedulers.AsyncHyperBandScheduler(
        time_attr=EPOCHS_DONE,
        metric=cfg.tune.metric,
        mode=cfg.tune.mode,
        max_t=cfg.train.epochs,
        grace_period=cfg.tune.grace_period,
        reduction_factor=cfg.tune.reduction_factor,
        # A trial that reaches the last epoch ends by itself; a Tune stop would
        # kill its Ray Train run mid-shutdown.
        stop_last_trials=False,
    )


def warn_if_inside_a_job_copy(cfg: VidrayConfig) -> None:
    """Under `ray job submit --working-dir`, a relative path lands in a copy Ray deletes: say so once."""
    if "runtime_resources" not in Path.cwd().parts:
        return
    relative = [key for key, value in (("run.storage_path", cfg.run.storage_path), ("run.reports_dir", cfg.run.reports_dir))
                if value is not None and "://" not in str(value) and not str(value).startswith(("/", "~"))]
    if relative:
        print(f"vidray tune: warning: {', '.join(relative)} is relative, so it points into this job's working-directory "
              f"copy ({Path.cwd()}), which Ray deletes; use an absolute path (the default is ~/ray_results)",
              file=sys.stderr, flush=True)
