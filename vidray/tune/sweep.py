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
      vidray_run.json                vidray's marker (vidray/train/runs.py), with "finished" and the trials' caching
      vidray_sweep.json              the config the sweep was started with
      <trial dir>/                   Tune's progress.csv, result.json, TensorBoard events, wandb/
      train_runs/<trial_id>/         that trial's Ray Train run: checkpoint_epoch_NNNN/ ...
      reports/                       results table, figures, best model (default run.reports_dir)

Running the same command again is safe (vidray/train/runs.py): a finished sweep trains
nothing (its results are then read back from vidray's and Tune's JSON files by the report,
vidray/report/results.py); an interrupted one is restored (finished trials are kept as they
are, an interrupted trial restarts its Ray Train run under the same name, so
Train continues from that run's latest checkpoint instead of epoch 0).
``--restart`` or a new ``run.name`` starts over.

The sweep writes; it does not report. :func:`run_sweep` returns a :class:`SweepOutcome`, and
``vidray tune`` (vidray/cli.py) hands it to the report stage (results table, figures, best model).
Here: the trial, the Train->Tune hand-over it waits on, and the run. The param space is
space.py, ASHA and the metric scheduler.py, the callbacks (console, W&B, Train->Tune) callbacks.py,
the sweep's folder experiment.py, the local cluster local_ray.py.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import ray
import ray.data
import ray.tune
import ray.util.queue

from vidray.compat import HANDOVER_MARKER, train_to_tune_report_queue
from vidray.cluster import (
    DATA_CPUS,
    check_run_resources,
    cluster_capacity,
    derive_max_concurrent_trials,
    init_ray,
)
from vidray.config import VidrayConfig
from vidray.data.dataset import read_dataset_info
from vidray.data.prepare import prepare_dataset
from vidray.errors import Interrupted
from vidray.storage import join_uri, resolve_path, write_json
from vidray.train.driver import (
    FINETUNE_SPLITS, build_trainer, check_dataset, check_resources_before_the_data, check_training_config, make_run_config,
    on_shared_storage, warn_of_untrainable_classes,
)
from vidray.train.optim import warn_if_warmup_fills_the_run
from vidray.train.placement import CachedSplits, cache_splits, ingest_cpus
from vidray.folder_lock import FolderLock, refuse_if_held
from vidray.train.runs import SWEEP_CONFIG_FILE, keep_to_its_data, mark_run, open_run, run_folder, warn_if_finished_on_other_data
from vidray.tune.callbacks import EpochLines, ReportToTune, wandb_callbacks
from vidray.tune.experiment import sweep_state, trials_cache_dataset, trials_ended
from vidray.tune.local_ray import local_cluster_kwargs
from vidray.tune.scheduler import build_trial_scheduler, check_sweep_config
from vidray.tune.space import build_param_space, count_trials, trial_config

# A trial's own process only waits on Ray Train: it needs memory, not a CPU.
# Even a fraction of a CPU would hurt: Ray Data's read tasks ask for a whole
# CPU, so on a 2-CPU machine a 1-CPU worker plus 0.01 for the trial would leave
# 0.99, and the workers would wait forever for data. (Tune refuses an empty request.)
TRIAL_DRIVER_RESOURCES = {"CPU": 0, "memory": 256 * 1024**2}

TRAIN_RUNS_DIR = "train_runs"

logger = logging.getLogger(__name__)


def train_trial(
    params: dict[str, Any],
    *,
    cfg: VidrayConfig,
    dataset_dir: str,
    train_runs: str,
    cached_splits: CachedSplits | None = None,
) -> None:
    """One trial: a full Ray Train run with the trial's hyper-parameters.

    ``cached_splits``: the splits the sweep's driver read into the object store
    (vidray.train.placement.cache_splits), when the trials cache them; without them the trial streams
    its splits (the driver decided that for every trial). Either way its workers keep their shards on
    their devices when ``train.cache_dataset`` (auto, device) says so, as a `vidray train` run's do.
    """
    trial_cfg = trial_config(cfg, params)
    # Several trials' data-loading progress bars interleaved in one log are noise; the
    # datasets built below (or derived from the cached ones) carry this to the processes that run them.
    ray.data.DataContext.get_current().enable_progress_bars = False
    for split in (cached_splits.train, cached_splits.val) if cached_splits else ():
        split.context.enable_progress_bars = False
    trial_id = ray.tune.get_context().get_trial_id()
    run_config = trial_run_config(trial_cfg, trial_id, train_runs, callbacks=[ReportToTune(cfg.tune.metric)])
    build_trainer(trial_cfg, run_config=run_config, dataset_dir=dataset_dir, cached_splits=cached_splits, trial=True).fit()
    wait_until_tune_has_the_last_report()


def trial_run_config(trial_cfg: VidrayConfig, trial_id: str, train_runs: str, **overrides: Any) -> ray.train.RunConfig:
    """A trial's Ray Train RunConfig: named by the trial id, not a timestamp (a resumed trial must find its
    Train run again), and keeping the best checkpoints by the metric the sweep ranks by, so that the epoch
    its report calls a trial's best is the one exported (kept by val macro-F1, a val_loss sweep exported
    another epoch)."""
    return make_run_config(
        trial_cfg, name=trial_id, storage_path=train_runs, score=trial_cfg.tune.metric, score_order=trial_cfg.tune.mode,
        **overrides,
    )


def wait_until_tune_has_the_last_report(timeout: float = 120.0) -> None:
    """Return once the trial's main thread has passed Tune every report TuneReportCallback sent.

    Works around a race in Ray 2.60's function trainable: the callback hands each
    epoch's metrics to the trial's main thread through a one-slot queue, and the main
    thread moves them into a one-slot result queue. ``fit()`` can return while the
    last epoch's metrics are still in the first queue, or already taken off it but not
    yet in the second (a window no attribute shows). If this function then returned,
    Tune's end-of-function marker would take the result slot and the main thread would
    block forever putting the last epoch behind it (seen as a sweep that hangs with
    idle CPUs).

    The main thread itself says when that window is closed: we put a marker it drops
    (vidray.compat.HANDOVER_MARKER) behind the last report, then a second one. The
    queue has one slot, so the second put returns only once the main thread has taken
    the first; and it takes the next item only after the call that handled the
    previous one has put that into the result queue. Train puts nothing after
    ``fit()`` returns, so the last report is then in Tune's hands. (If Tune stops the
    trial instead of asking for more, the process ends with this thread.)
    """
    handover = train_to_tune_report_queue()
    if handover is None:
        return
    deadline = time.monotonic() + timeout
    try:
        for _ in range(2):
            handover.put(HANDOVER_MARKER, timeout=max(0.0, deadline - time.monotonic()))
    except ray.util.queue.Full:
        logger.warning("the trial's last report did not reach Tune within %.0f s; ending the trial anyway", timeout)


# ------------------------------------------------------------- the sweep


@dataclass(frozen=True)
class SweepOutcome:
    """What a sweep leaves for its report (vidray/report/results.py: report_sweep)."""

    cfg: VidrayConfig  # as the trials ran it: absolute dataset, storage and reports paths
    experiment_path: str
    dataset_dir: str
    # Tune's results of this run; None when the sweep was already finished (nothing ran:
    # its trials are read back from the experiment folder).
    results: ray.tune.ResultGrid | None


def run_sweep(cfg: VidrayConfig, restart: bool = False, verbose: bool = False) -> SweepOutcome:
    """Run the sweep ``cfg`` describes; what it leaves (experiment folder, Tune's results) is the
    report's input (vidray/report/results.py: report_sweep).

    A sweep lives under ``run.storage_path/run.name``. Running the same command again trains
    nothing for a finished sweep (``results`` is then None), and continues an interrupted
    one (Tune's restore: finished trials are kept, the others resume from their last
    checkpoint). ``restart`` (``--restart``) deletes it and starts over.
    """
    # Checks that need nothing but the config come first: they are instant.
    param_space = build_param_space(cfg.tune, cfg.train.seed)
    check_sweep_config(cfg)
    check_training_config(cfg)  # what `vidray train` checks before Ray starts: the trials train so
    warn_if_warmup_fills_the_run("vidray tune", "train", cfg.train.epochs, cfg.train.warmup_epochs)
    # Before the data is prepared (open_run checks again, and FolderLock holds the run): a second sweep of a run
    # that a live driver trains, with data.stored_size changed say, deleted and decoded again the shards that one
    # was streaming, and only then was refused. It reads one file: before Ray starts, too.
    refuse_if_held("vidray tune", run_folder(resolve_path(cfg.run.storage_path), cfg.run.name))

    init_ray(verbose=verbose, **local_cluster_kwargs())
    # Trials run in other processes and directories: give them absolute paths.
    cfg = on_shared_storage(cfg, "vidray tune")
    cfg = cfg.model_copy(update={"run": cfg.run.model_copy(update={"reports_dir": cfg.run.reports_path()})})
    storage_path, dataset_dir = cfg.run.storage_path, cfg.data.dataset_dir
    capacity = cluster_capacity()
    check_resources_before_the_data(cfg.train)
    callbacks = [EpochLines(cfg.tune.metric, cfg.train.epochs), *wandb_callbacks(cfg)]

    if not restart:
        # A changed config is refused before the data is prepared (open_run checks again): `vidray tune
        # data.stored_size=160` on a sweep of 128 decoded the dataset again, deleting the shards it was started on,
        # and only then was refused. `vidray train` and `vidray pretrain` open their runs before preparing.
        sweep_state(cfg, run_folder(storage_path, cfg.run.name), tell=False)
    # Once, here: every trial reads the same shards.
    dataset_dir = prepare_dataset(cfg, verbose=verbose)
    info = read_dataset_info(dataset_dir)
    warn_of_untrainable_classes(info, "vidray tune")
    check_dataset(cfg, info, dataset_dir)
    data_cpus = ingest_cpus(cfg.train, info)
    check_run_resources(cfg.train, capacity, data_cpus)
    # Only a sweep that passed every check gets (or loses, with --restart) its folder.
    experiment_path, state = open_run(
        "tune", "sweep", storage_path, cfg.run.name, restart=restart,
        state_of=lambda folder: sweep_state(cfg, folder), finished_note="; its results follow",
    )  # fmt: skip
    if state == "finished":
        warn_if_finished_on_other_data(experiment_path, "sweep", info.identity(FINETUNE_SPLITS), "vidray tune")
        return SweepOutcome(cfg, experiment_path, dataset_dir, results=None)
    with FolderLock(experiment_path, "vidray tune"):
        keep_to_its_data(experiment_path, "sweep", state, info.identity(FINETUNE_SPLITS))
        # The sweep's concurrency (derived below, or restored by Tune) assumes one decision on the object
        # store, made here for every trial (cached_splits, or streamed): trials must not re-decide "auto" on a
        # cluster whose object store has changed meanwhile (nodes gone), nor a continued sweep stream what it
        # started with cached, or a trial that streams could find no CPU left for Ray Data. Device caches are
        # each worker's own decision, as in `vidray train` (vidray/train/ingest.py).
        caching = trials_cache_dataset(cfg, experiment_path, state, decided="never" if data_cpus else "always")
        if (caching == "never") != bool(data_cpus):  # kept from the sweep's start: check the cluster for it
            data_cpus = DATA_CPUS if caching == "never" else 0
            check_run_resources(cfg.train, capacity, data_cpus)
        # Cached, the splits are read once, here: the trials share this one copy in the object store
        # (N concurrent trials used to hold N), in the shard order of the sweep's seed. This driver owns
        # the blocks and outlives its trials; a driver that restores the sweep reads them again.
        cached_splits = None if data_cpus else cache_splits(dataset_dir, cfg.train.seed)
        trainable = ray.tune.with_resources(
            ray.tune.with_parameters(
                train_trial,
                cfg=cfg,
                dataset_dir=dataset_dir,
                train_runs=join_uri(experiment_path, TRAIN_RUNS_DIR),
                cached_splits=cached_splits,
            ),
            TRIAL_DRIVER_RESOURCES,
        )
        if state == "interrupted":
            # Finished trials stay finished; interrupted and errored ones continue from their checkpoints.
            tuner = ray.tune.Tuner.restore(experiment_path, trainable=trainable, resume_errored=True)
        else:
            write_json(join_uri(experiment_path, SWEEP_CONFIG_FILE), cfg.model_dump(mode="json"))
            derived = derive_max_concurrent_trials(cfg.train, capacity, data_cpus)  # a restored sweep keeps its own
            tuner = ray.tune.Tuner(
                trainable,
                param_space=param_space,
                tune_config=ray.tune.TuneConfig(
                    num_samples=1,  # tune.num_samples is an axis of the space's grid (build_param_space)
                    scheduler=build_trial_scheduler(cfg),
                    max_concurrent_trials=cfg.tune.max_concurrent_trials or derived,
                ),
                run_config=ray.tune.RunConfig(
                    name=cfg.run.name, storage_path=storage_path, callbacks=callbacks, verbose=2 if verbose else 1
                ),
            )
        results = tuner.fit()
        ended, trials = trials_ended(experiment_path), count_trials(cfg.tune)
        if ended < trials:  # Tune was stopped (Ctrl-C, SIGTERM): no report, no finished mark
            raise Interrupted(f"{ended} of {trials} trials ended; the same command continues the sweep, each trial from its last finished epoch")
        if results.num_errors == 0:
            mark_run(experiment_path, "sweep", cfg.run.name, finished=True)
    return SweepOutcome(cfg, experiment_path, dataset_dir, results)
