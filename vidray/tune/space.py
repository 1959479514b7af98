"""What a sweep searches: Tune's param space from ``cfg.tune``, each trial's config, and its name."""

from __future__ import annotations

from functools import partial
from typing import Any

import numpy as np
import ray.tune

from vidray.config import SearchRange, TrainSettings, TuneSettings, VidrayConfig
from vidray.errors import UserError
from vidray.train.runs import SWEEP_SETS

# The sweep's hyper-parameters: each trial copies them into cfg.train (and ``seed`` when a pure grid is
# repeated, see build_param_space). Named once, in SWEEP_SETS: a sweep neither reads train's nor compares them.
SWEPT = tuple(key.removeprefix("train.") for key in SWEEP_SETS)
# Which of ``tune.num_samples`` drawn points a trial trains: a grid axis, so that every MixUp α gets the same points.
# Its name sorts after "mixup_alpha": Tune varies the first grid key by name fastest, so consecutive trials cover every
# α. Named "draw" it came first: every α=0 trial ran before any α=0.8 one, and ASHA, whose rungs compare a trial with
# those that reached them before it, never cut the first and judged each α against another history.
DRAW = "sample"


def _axis(values: SearchRange | list[float], key: str):
    """One swept key that is not drawn: a grid over a list, a constant for one value (or a range of one)."""
    if isinstance(values, SearchRange):
        return values.low
    if not values:
        raise UserError(f"{key} is an empty list, so the sweep would have no trials; give at least one value")
    return ray.tune.grid_search(list(values)) if len(values) > 1 else values[0]


def _draws(values: SearchRange, log: bool, count: int, rng: np.random.Generator) -> list[float]:
    """``count`` draws over a range: log-uniform (learning rates) or uniform."""
    if log:
        return np.exp(rng.uniform(np.log(values.low), np.log(values.high), count)).tolist()
    return rng.uniform(values.low, values.high, count).tolist()


def _drawn_value(values: list, config: dict[str, Any]) -> Any:
    return values[config[DRAW]]  # the trial's config, its grid keys resolved


def build_param_space(tune: TuneSettings, seed: int) -> dict[str, Any]:
    """Tune's param space from ``cfg.tune``: MixUp α is always a grid; lr and weight decay a grid or a range.

    A range's ``tune.num_samples`` points are drawn here, once, from ``seed`` (``train.seed``), and every α
    trains the same points: Tune drew each trial's own, so each α's result hung on its lr draws as much as on
    α (4 α x 3 draws over a decade of lr), and from an unseeded generator, so a --restart trained other points.
    """
    if not tune.mixup_alpha:
        raise UserError("tune.mixup_alpha is an empty list, so the sweep would have no trials; e.g. [0.0, 0.4]")
    rng = np.random.default_rng(seed)
    space: dict[str, Any] = {"mixup_alpha": ray.tune.grid_search(list(tune.mixup_alpha))}
    drawn: dict[str, list] = {}
    for key, values, log in (("lr", tune.lr, True), ("weight_decay", tune.weight_decay, False)):
        if isinstance(values, SearchRange) and values.low != values.high:
            drawn[key] = _draws(values, log, tune.num_samples, rng)
        else:
            space[key] = _axis(values, f"tune.{key}")
    if tune.num_samples > 1 and not drawn:
        # Repeats of one grid point (a range of one value too) would otherwise be the same seeded run, bit for bit on CPU.
        drawn["seed"] = rng.integers(0, 2**31 - 1, tune.num_samples).tolist()
    if tune.num_samples == 1:
        space.update({key: values[0] for key, values in drawn.items()})
    elif drawn:
        space[DRAW] = ray.tune.grid_search(list(range(tune.num_samples)))
        space.update({key: ray.tune.sample_from(partial(_drawn_value, values)) for key, values in drawn.items()})
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
