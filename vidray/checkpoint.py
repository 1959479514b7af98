"""The checkpoint directory written once per epoch by vidray/train.py (layout in docs/design.md)::

    checkpoint_dir/
      model/              save_pretrained(): config.json (id2label/label2id) + model.safetensors
      training_state.pt   optimizer, scheduler, epoch, global_step, per-rank RNG states
      vidray.json         {"epoch", "metrics", "history", "data": {...}, "config": {...}}
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from vidray.errors import UserError

MODEL_DIR = "model"
TRAINING_STATE = "training_state.pt"
INFO = "vidray.json"


def save_checkpoint(
    directory: str | Path,
    model,
    *,
    training_state: dict[str, Any],
    info: dict[str, Any],
) -> Path:
    """Write model/, training_state.pt and vidray.json into ``directory`` (created)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(directory / MODEL_DIR, safe_serialization=True)
    torch.save(training_state, directory / TRAINING_STATE)
    (directory / INFO).write_text(json.dumps(info, indent=2, sort_keys=True, default=str))
    return directory


def read_checkpoint_info(directory: str | Path) -> dict[str, Any]:
    """vidray.json of a checkpoint: epoch, metrics, history, data (frames, size, stored_frames, stored_size, classes), config."""
    path = Path(directory) / INFO
    if not path.is_file():
        raise UserError(f"{directory} is not a vidray checkpoint: {INFO} is missing (pass a checkpoint_* directory)")
    return json.loads(path.read_text())


def load_training_state(directory: str | Path) -> dict[str, Any]:
    # Our own file holding RNG states (numpy/python objects), so the full unpickler is needed.
    return torch.load(Path(directory) / TRAINING_STATE, map_location="cpu", weights_only=False)


def load_checkpoint_model(directory: str | Path):
    """(model, info) from a checkpoint directory: the trained classifier, with its position table restored."""
    from vidray.model import load_model

    info = read_checkpoint_info(directory)
    model_dir = Path(directory) / MODEL_DIR
    if not (model_dir / "config.json").is_file():
        raise UserError(f"{directory} holds no {MODEL_DIR}/config.json: the checkpoint is incomplete")
    return load_model(str(model_dir)), info
