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
# What a pretraining run's saved config is not compared on when it continues (vidray.train.runs.refuse_changed_config):
# the train.* keys it takes from pretrain.* (the pretrain.* keys are compared instead, so a refusal offers
# pretrain.lr=..., not train.lr=..., which its command line refuses), what it fixes, and the sweep section it resets.
# A run started with another fixed value is continued: model.dropout=0.1 reached pretraining before it was fixed
# at 0.0 (VideoMAE pretrains without), and such a run could then be neither continued nor summarised. Its model
# keeps the dropout its checkpoint's config.json was saved with (the worker loads that as it is).
NOT_COMPARED_ON_RESUME: tuple[str, ...] = (*PRETRAINING_SETS, "tune.")


def check_pretrain_config(cfg: VidrayConfig) -> None:
    """Everything that needs only the config (and a checkpoint's config.json): before Ray starts."""
    check_pretraining_model(cfg.model, cfg.pretrain, cfg.data.frames, cfg.data.size)
    parts = cfg.train.num_workers * cfg.train.grad_accum_steps
    if cfg.pretrain.batch_size % parts:
        raise UserError(
            f"pretrain.batch_size={cfg.pretrain.batch_size} is the global batch and must be divisible by "
            f"train.num_workers x train.grad_accum_steps = {parts}"
        )
