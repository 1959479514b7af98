"""What a sweep searches: Tune's param space from ``cfg.tune``, each trial's config, and its name."""

from __future__ import annotations

from typing import Any

import ray.tune
from ray.tune.search.sample import Domain

from vidray.config import SearchRange, TrainSettings, TuneSettings, VidrayConfig
from vidray.errors import UserError

# The sweep's hyper-parameters: Tune samples them, each trial copies them into cfg.train
# (and ``seed`` when a pure grid is repeated, see build_param_space).
SWEPT = ("mixup_alpha", "lr", "weight_decay")


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
    drawn = any(isinstance(space[key], Domain) for key in ("lr", "weight_decay"))  # a range of one value is a constant
    if tune.num_samples > 1 and not drawn:
        # Repeats of one grid point (a range of one value too) would otherwise be the same seeded run, bit for bit on CPU.
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


def short_number(value: float) -> str:
    """5e-05 -> 5e-5, 0.001 -> 1e-3, 0.05 -> 0.05, 0.4 -> 0.4: how people write learning rates."""
    if value != 0 and abs(value) < 0.01:
        mantissa, exponent = f"{value:.2e}".split("e")
        return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"
    return f"{value:.3g}"


def trial_label(params: dict[str, Any]) -> str:
    """A trial's name for people (console lines, the results table): "MixUp α=0.4, lr=5e-5, wd=0.05"."""
    alpha = float(params["mixup_alpha"])
    mixup = "No MixUp" if alpha == 0 else f"MixUp α={short_number(alpha)}"
    label = f"{mixup}, lr={short_number(float(params['lr']))}, wd={short_number(float(params['weight_decay']))}"
    if "seed" in params:
        label += f", seed={int(params['seed'])}"
    return label
