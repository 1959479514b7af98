"""The sweep's folder on storage: what it holds for a config (new, interrupted, finished), and how its trials get
their data."""

from __future__ import annotations

import sys

import ray.tune

from vidray.config import VidrayConfig
from vidray.storage import join_uri, read_json
from vidray.train.runs import SWEEP_CONFIG_FILE, RunState, mark_run, read_marker, refuse_changed_config

# The marker's record of how the sweep's trials get their data: "always" (the splits cached in the object store
# once, by the sweep's driver) or "never" (streamed by Ray Data every epoch; vidray/train/placement.py).
TRIALS_CACHE = "trials_cache_dataset"


def sweep_state(cfg: VidrayConfig, experiment_path: str, tell: bool = True) -> RunState:
    """``new``, ``interrupted`` or ``finished``: what ``experiment_path`` holds for ``cfg``; ``tell``: say on
    the console what a continued sweep keeps of its start that ``cfg`` asks otherwise (its tracking).

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
        tracked = saved.get("run", {}).get("wandb")
        if tell and not finished and tracked is not None and tracked != cfg.run.wandb.model_dump(mode="json"):
            # Tune's restore takes the sweep's callbacks from its pickle, W&B's included: what was asked is not done.
            print(f"vidray tune: run.wandb differs from what the interrupted sweep {experiment_path} started with "
                  f"({tracked}): a continued sweep keeps its tracking (--restart starts it over)", file=sys.stderr)  # fmt: skip
    # Sweeps of older vidray versions carry no marker: a finished one is "continued" once, which
    # ends at once (every trial is terminated) and marks it finished.
    return "finished" if finished else "interrupted"


def trials_cache_dataset(cfg: VidrayConfig, experiment_path: str, state: RunState, decided: str) -> str:
    """Whether the sweep's trials read their splits from the object store (``always``) or stream them (``never``):
    ``decided`` (what this run would choose for ``cfg``), unless the sweep is an interrupted one that started
    with the other choice. (Each trial's workers still decide on device caches, vidray/train/ingest.py.)

    That one is kept: Tune restores the sweep's max_concurrent_trials, counted for the choice it started with,
    and trials that stream where that count left no CPU free would take every CPU with their workers while
    Ray Data's read tasks waited for one: a sweep that hangs. The choice is recorded in vidray's marker the first
    time (a sweep of an older vidray, which has no record, by the run that continues it).
    """
    kept = (read_marker(experiment_path) or {}).get(TRIALS_CACHE)
    if state != "interrupted" or kept not in ("always", "never"):
        mark_run(experiment_path, "sweep", cfg.run.name, **{TRIALS_CACHE: decided})
        return decided
    if kept != decided:
        how = {"always": "cached in the object store", "never": "streamed every epoch"}
        print(f"vidray tune: train.cache_dataset={cfg.train.cache_dataset} would have the trials' data {how[decided]}, "
              f"but the interrupted sweep {experiment_path} started with it {how[kept]} and its number of concurrent "
              "trials counts on that: kept (--restart starts the sweep over)", file=sys.stderr, flush=True)  # fmt: skip
    return kept


def trials_ended(experiment_path: str) -> int:
    """How many trials Tune's last snapshot of the sweep holds as ended: finished, stopped by ASHA, or errored.

    Not ``ResultGrid.num_terminated``: on Ctrl-C (and SIGTERM, vidray.cluster.sigterm_as_ctrl_c) Tune ends
    ``fit()`` as if the sweep were done. It saves its snapshot, then stops the running trials and counts
    them as terminated in the results it returns; trials it had not created yet are in neither. The
    snapshot, saved before, still holds them as running (``ExperimentAnalysis`` loads such a trial as
    pending), which is what Tuner.restore continues.
    """
    return sum(trial.status in ("TERMINATED", "ERROR") for trial in ray.tune.ExperimentAnalysis(experiment_path).trials)

