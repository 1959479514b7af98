"""Seeds and random state of a training worker: derived, set, captured and restored.

Every rank draws its own streams (dropout from torch's global generator, the
augmentation parameters from a dedicated ``torch.Generator``), all derived
from ``train.seed`` and the rank. Their states go into every checkpoint, so a
resumed single-worker CPU run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, rank, epoch, ...): independent streams for different parts."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


def seed_everything(seed: int, generator: torch.Generator) -> None:
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator.manual_seed(derive_seed(seed, 1))


def capture_rng_state(generator: torch.Generator) -> dict[str, Any]:
    """Every random stream a worker draws from: torch (dropout), CUDA, numpy, Python, and augmentation."""
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": generator.get_state(),
    }


def restore_rng_state(state: dict[str, Any], generator: torch.Generator) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["augment"])
