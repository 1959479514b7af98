"""What the sweep's driver shows and logs as trials report: one console line per trial per epoch, and W&B;
and the Ray Train callback each trial's metrics reach Tune through.

Kept free of vidray.tune.sweep's imports: each trial's Ray Train controller unpickles ReportToTune, so
this module is all of vidray a controller imports for it (not the model code the sweep driver checks
configs with, seconds per process to import).
"""

from __future__ import annotations

import sys

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback
from ray.tune.result import TIMESTEPS_TOTAL

from vidray.config import VidrayConfig
from vidray.train.metrics import EPOCHS_DONE
from vidray.train.rows import rejected_clips_line, rejected_ids
from vidray.train.follow import wandb_key_error, wandb_mode
from vidray.tune.space import SWEPT, trial_label


class EpochLines(ray.tune.Callback):
    """One line per trial per epoch on the driver's console, instead of Tune's full result dumps; and one on
    stderr naming the stored clips an epoch rejected, once per video for the sweep (its trials read the same data)."""

    def __init__(self, metric: str, epochs: int):
        self.metric = metric
        self.epochs = epochs
        self.rejected: set[str] = set()  # the video ids already named

    def on_trial_result(self, iteration, trials, trial, result, **info):
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
        if new := [video_id for video_id in rejected_ids(result) if video_id not in self.rejected]:
            self.rejected.update(new)
            print(rejected_clips_line("vidray tune", new), file=sys.stderr, flush=True)


class ReportToTune(TuneReportCallback):
    """Ray Train -> Tune, adding :data:`EPOCHS_DONE` so ASHA and the curves count epochs, not reports.

    ``metric`` (the sweep's ``tune.metric``) leads the report after the epochs done: Tune's status table
    shows the first four metrics of a report, which were the 0-based ``epoch`` ("epoch 1" when two of
    two were done), the losses and accuracy, not what the sweep ranks trials by.
    """

    def __init__(self, metric: str | None = None):
        super().__init__()
        self.metric = metric

    def after_report(self, run_context, metrics, checkpoint):
        first = metrics[0]
        # timesteps_total too: the step Tune's TensorBoard logger puts a result at, which is otherwise Tune's
        # training_iteration, back at 1 in a trial continued from its checkpoint (epochs 3-5 drawn at steps 1-3).
        leading = {EPOCHS_DONE: int(first["epoch"]) + 1, TIMESTEPS_TOTAL: int(first["epoch"]) + 1}
        leading.update({key: first[key] for key in (self.metric, "train_loss", "val_loss") if key in first})
        metrics = [{**leading, **{k: v for k, v in first.items() if k not in leading}}, *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def wandb_callbacks(cfg: VidrayConfig) -> list:
    """Weights & Biases logging of every trial when run.wandb.enabled (each trial's wandb/ folder).

    The mode follows :func:`vidray.train.follow.wandb_mode`: WANDB_MODE=offline always keeps everything on
    disk; online mode needs a key, and without one the sweep stops here rather than prompting.
    """
    if not cfg.run.wandb.enabled:
        return []
    # Only for a sweep that logs to W&B: Ray's integration imports wandb itself, which takes seconds.
    from vidray.tune.wandb_trials import EpochStepWandb

    mode = wandb_mode(cfg.run.wandb)
    callback = EpochStepWandb(project=cfg.run.wandb.project, group=cfg.run.name, mode=mode, resume="allow")
    try:
        callback.setup()
    except ValueError as err:
        raise wandb_key_error(mode, err) from None
    return [callback]
