"""How trials are compared and stopped: ``tune.metric`` and ``tune.mode``, and ASHA over completed epochs."""

from __future__ import annotations

from ray.tune.schedulers import AsyncHyperBandScheduler

from vidray.config import VidrayConfig
from vidray.errors import UserError
from vidray.train.metrics import EPOCHS_DONE, TUNABLE_METRICS


def check_sweep_config(cfg: VidrayConfig) -> None:
    """Refuse a metric training does not report, a mode that picks the worst trials, or an ASHA that never compares."""
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


def build_trial_scheduler(cfg: VidrayConfig) -> AsyncHyperBandScheduler | None:
    """ASHA on ``tune.metric`` over completed epochs, or None (every trial runs all epochs)."""
    if not cfg.tune.asha:
        return None
    return AsyncHyperBandScheduler(
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
