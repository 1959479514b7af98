"""The sweep's folder on storage: what it holds for a config (new, interrupted, finished), and paths that would vanish."""

from __future__ import annotations

import sys
from pathlib import Path

import ray.tune

from vidray.config import VidrayConfig
from vidray.storage import join_uri, read_json
from vidray.train.runs import SWEEP_CONFIG_FILE, RunState, read_marker, refuse_changed_config


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


def trials_ended(experiment_path: str) -> int:
    """How many trials Tune's last snapshot of the sweep holds as ended: finished, stopped by ASHA, or errored.

    Not ``ResultGrid.num_terminated``: on Ctrl-C (and SIGTERM, vidray.cluster.sigterm_as_ctrl_c) Tune ends
    ``fit()`` as if the sweep were done. It saves its snapshot, then stops the running trials and counts
    them as terminated in the results it returns; trials it had not created yet are in neither. The
    snapshot, saved before, still holds them as running (``ExperimentAnalysis`` loads such a trial as
    pending), which is what Tuner.restore continues.
    """
    return sum(trial.status in ("TERMINATED", "ERROR") for trial in ray.tune.ExperimentAnalysis(experiment_path).trials)


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
