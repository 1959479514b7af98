"""How a video is seen at inference: ``clips`` temporal x ``crops`` spatial views, averaged.

Torch-free, so that a driver that only plans the work (``vidray predict --out``'s) can name the
protocol without importing torch; the inference step itself is vidray/model/inference.py.
"""

from __future__ import annotations

from dataclasses import dataclass

from vidray.errors import UserError

CROP_CHOICES = (1, 3)


@dataclass(frozen=True)
class Views:
    """How many views of a video are averaged: ``clips`` temporal x ``crops`` spatial."""

    clips: int = 1
    crops: int = 1

    def __post_init__(self) -> None:
        if self.clips < 1:
            raise UserError(f"--clips must be >= 1, got {self.clips}")
        if self.crops not in CROP_CHOICES:
            raise UserError(f"--crops must be 1 (centre) or 3 (left, centre, right), got {self.crops}")

    @property
    def count(self) -> int:
        return self.clips * self.crops

    def describe(self) -> str:
        """The protocol as the results tables print it, e.g. ``5 clips x 3 crops (left, center, right)``."""
        where = "center" if self.crops == 1 else "left, center, right"
        clips = f"{self.clips} clip{'s' if self.clips > 1 else ''}"
        return f"{clips} x {self.crops} crop{'s' if self.crops > 1 else ''} ({where})"

    def as_dict(self) -> dict:
        return {"clips": self.clips, "crops": self.crops, "protocol": self.describe()}
