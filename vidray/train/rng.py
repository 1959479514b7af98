"""Seeds and random state of a training worker: derived, set, captured and restored.

Every rank draws its own streams, all derived from ``train.seed`` and the rank:
dropout from torch's global generator(s), and the augmentation parameters from
dedicated generators (:class:`AugmentGenerators`): per-clip tensors (frame
offsets, crop boxes, flips) from a generator on the training device, so they
are drawn where they are used with no host-to-device copy, and the few
per-batch scalars of MixUp/CutMix from a host generator, which needs no copy
either. On CPU the two are one generator. Their states go into every
checkpoint, so a resumed run continues exactly where the interrupted one was.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch


def derive_seed(*parts: int) -> int:
    """A 32-bit seed from integers (seed, rank, epoch, ...): independent streams for different parts."""
    return int(np.random.SeedSequence([abs(int(p)) for p in parts]).generate_state(1)[0])


@dataclass
class AugmentGenerators:
    """The augmentation streams of one worker: ``host`` (CPU) and ``device`` (the training device's;
    the same object as ``host`` on CPU, so a CPU run draws exactly one stream)."""

    host: torch.Generator
    device: torch.Generator

    @classmethod
    def for_device(cls, device: torch.device) -> "AugmentGenerators":
        host = torch.Generator()
        return cls(host, host if device.type == "cpu" else torch.Generator(device=device))

    @property
    def separate(self) -> bool:
        return self.device is not self.host

    def copy(self) -> "AugmentGenerators":
        """Fresh generators in the same states (one, on CPU): draws from them leave these untouched."""
        host = torch.Generator()
        host.set_state(self.host.get_state())
        if not self.separate:
            return AugmentGenerators(host, host)
        device = torch.Generator(device=self.device.device)
        device.set_state(self.device.get_state())
        return AugmentGenerators(host, device)


def seed_everything(seed: int, generator: torch.Generator, device_generator: torch.Generator | None = None) -> None:
    """Seed torch (all devices), numpy, Python and the augmentation generator(s) from ``seed``."""
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)
    generator.manual_seed(derive_seed(seed, 1))
    if device_generator is not None and device_generator is not generator:
        device_generator.manual_seed(derive_seed(seed, 2))


def _on_cuda(generator: torch.Generator, device_generator: torch.Generator | None) -> bool:
    """Whether the worker trains on CUDA (its device stream is a CUDA generator of its own). Not whether CUDA is
    there: a CPU run on a GPU node started CUDA in every worker to save its streams, a context on GPU 0 each."""
    return device_generator is not None and device_generator is not generator and device_generator.device.type == "cuda"


def capture_rng_state(generator: torch.Generator, device_generator: torch.Generator | None = None) -> dict[str, Any]:
    """Every random stream a worker draws from: torch (dropout), CUDA, numpy, Python, and augmentation."""
    separate = device_generator is not None and device_generator is not generator
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if _on_cuda(generator, device_generator) else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
        "augment": generator.get_state(),
        "augment_device": device_generator.get_state() if separate else None,
    }


def restore_rng_state(
    state: dict[str, Any], generator: torch.Generator, device_generator: torch.Generator | None = None
) -> None:
    """Put back what :func:`capture_rng_state` captured.

    A device generator with no saved state (the checkpoint was written by a CPU
    run, or before device generators existed) is seeded from the restored host
    stream: still determined by the checkpoint, so a resume is reproducible.
    """
    torch.set_rng_state(state["torch"])
    if state["cuda"] is not None and _on_cuda(generator, device_generator):
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(state["numpy"])
    random.setstate(state["python"])
    generator.set_state(state["augment"])
    if device_generator is not None and device_generator is not generator:
        saved = state.get("augment_device")
        if saved is not None:
            device_generator.set_state(saved)
        else:
            device_generator.manual_seed(int(torch.randint(0, 2**62, (1,), generator=generator)))
