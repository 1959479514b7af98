"""Ray Tune's Weights & Biases callback as a sweep's trials need it; a module of its own, imported only by a sweep
that logs to W&B (Ray's integration imports wandb, seconds), and where the Tuner's saved state is read again."""

from __future__ import annotations

from ray.air.integrations.wandb import WandbLoggerCallback
from ray.tune.result import TRAINING_ITERATION

from vidray.train.metrics import EPOCHS_DONE


class EpochStepWandb(WandbLoggerCallback):
    """Ray's callback, each result logged at its epochs done: a trial continued from its checkpoint (a sweep
    continued after its driver was killed) starts Tune's training_iteration at 1 again, and Ray's logged its
    epochs 3-5 at steps 1-3. Made with ``resume="allow"``, such a trial logs into its run (the trial id), which
    Ray's ``resume=False`` started a second time."""

    def log_trial_result(self, iteration, trial, result):
        if EPOCHS_DONE in result:
            result = {**result, TRAINING_ITERATION: result[EPOCHS_DONE]}
        super().log_trial_result(iteration, trial, result)
