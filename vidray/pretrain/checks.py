"""What a pretraining config must satisfy, checked from the config alone (and a checkpoint's config.json).

Apart from the driver (vidray/pretrain/driver.py, which imports Ray Train and VideoMAE's modeling code)
so that `vidray pretrain` refuses a run that cannot work in about two seconds, before Ray starts.
"""

from __future__ import annotations

from vidray.config import VidrayConfig
from vidray.errors import UserError
from vidray.model.pretraining import check_pretraining_model


def check_pretrain_config(cfg: VidrayConfig) -> None:
    """Everything that needs only the config (and a checkpoint's config.json): before Ray starts."""
    check_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    parts = cfg.train.num_workers * cfg.train.grad_accum_steps
    if cfg.pretrain.batch_size % parts:
        raise UserError(
            f"pretrain.batch_size={cfg.pretrain.batch_size} is the global batch and must be divisible by "
            f"train.num_workers x train.grad_accum_steps = {parts}"
        )
