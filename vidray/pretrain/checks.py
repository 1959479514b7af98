"""What a pretraining config must satisfy, checked from the config alone (and a checkpoint's config.json), and
which of its keys pretraining reads.

Apart from the driver (vidray/pretrain/driver.py, which imports Ray Train and VideoMAE's modeling code)
so that `vidray pretrain` refuses a run that cannot work in about two seconds, before Ray starts.
"""

from __future__ import annotations

from vidray.config import VidrayConfig
from vidray.errors import UserError
from vidray.model.pretraining import check_pretraining_model

# The train.* keys a pretraining run takes from pretrain.* (the rest of ``train`` is how it runs: workers, GPUs, ...).
FROM_PRETRAIN = ("epochs", "batch_size", "lr", "weight_decay", "warmup_epochs")
# What pretraining does not use (MixUp, label smoothing, layer decay; dropout: VideoMAE pretrains without), at fixed values.
FIXED_FOR_PRETRAINING = {
    "train.scheduler": "cosine", "train.layer_decay": 1.0, "train.label_smoothing": 0.0, "train.mixup_alpha": 0.0,
    "train.cutmix_alpha": 0.0, "train.eval_clips": 1, "model.dropout": 0.0,
}  # fmt: skip
# Keys `vidray pretrain` never reads, each beside the one that sets it there (None: nothing does): refused on its
# command line (vidray.train.runs.refuse_ignored_overrides).
PRETRAINING_SETS: dict[str, str | None] = {
    **{f"train.{key}": f"pretrain.{key}" for key in FROM_PRETRAIN}, **dict.fromkeys(FIXED_FOR_PRETRAINING),
}


def check_pretrain_config(cfg: VidrayConfig) -> None:
    """Everything that needs only the config (and a checkpoint's config.json): before Ray starts."""
    check_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    parts = cfg.train.num_workers * cfg.train.grad_accum_steps
    if cfg.pretrain.batch_size % parts:
        raise UserError(
            f"pretrain.batch_size={cfg.pretrain.batch_size} is the global batch and must be divisible by "
            f"train.num_workers x train.grad_accum_steps = {parts}"
        )
