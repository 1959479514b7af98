"""Step telemetry of a training worker: step time, data-wait share, clips/s, TFLOP/s and MFU.

Measured on the host, with no device synchronisation of its own: the training
loop reads its accumulated loss once per log point (every
``train.log_every_steps`` optimizer steps) and once per epoch, and those reads
are the only times the host waits for the GPU, so the windows between them
are timed exactly. "Data wait" is the time the loop spent getting its next
batch (iterator plus host-to-device copy); while the GPU is busy with queued
work it runs ahead of the host and the wait is near zero; when the data path
is the bottleneck the GPU drains its queue and the wait is GPU idle time.

FLOPs are the model's (MFU): forward + backward of a ViT counted analytically,
3 x the forward (:func:`train_flops_per_clip`; ``benchmarks/train_step.py``
checks the formula against ``torch.utils.flop_counter``), whatever recomputation
activation checkpointing adds. MFU is achieved FLOP/s per device over the
device's datasheet dense bf16 peak (:data:`BF16_PEAK_TFLOPS`).
"""

from __future__ import annotations

import time
from typing import Any, Callable

import torch

# Datasheet dense bf16 tensor-core peaks (no sparsity), TFLOP/s; matched against torch.cuda.get_device_name(),
# most specific names first: each name holds the ones after it that it contains ("L40" holds "L4").
BF16_PEAK_TFLOPS = {
    "H200 NVL": 835.0,
    "H200": 989.0,
    "H100 NVL": 835.0,
    "H100 PCIe": 756.0,
    "H100": 989.0,  # SXM
    "A100": 312.0,
    "L40S": 362.0,
    "L40": 181.0,
    "L4": 121.0,
    "A10G": 70.0,
    "A10": 125.0,
}
# What every epoch's report carries (telemetry of that epoch); plus "mfu" where the peak is known.
EPOCH_TELEMETRY = ("step_s", "data_wait_share", "clips_per_s", "achieved_tflops")


def device_peak_tflops(device_name: str | None) -> float | None:
    if not device_name:
        return None
    for key, peak in BF16_PEAK_TFLOPS.items():
        if key in device_name:
            return peak
    return None


def vit_forward_flops(config, frames: int, size: int) -> dict[str, float]:
    """Tokens and forward FLOPs of one clip (2 per multiply-add): patch embedding, per layer
    ``24 N d² + 4 N² d`` (with the usual 4x MLP), head."""
    patch = config.patch_size if isinstance(config.patch_size, int) else config.patch_size[0]
    tubelet, d = config.tubelet_size, config.hidden_size
    tokens = (frames // tubelet) * (size // patch) ** 2
    embed = 2 * tokens * (3 * tubelet * patch * patch) * d
    forward = embed + config.num_hidden_layers * transformer_layer_flops(tokens, d, config.intermediate_size)
    return {"tokens": tokens, "forward": forward + 2 * d * config.num_labels}


def transformer_layer_flops(tokens: int, width: int, intermediate: int) -> float:
    """Forward FLOPs of one pre-norm transformer layer over ``tokens`` tokens."""
    return (
        2 * tokens * width * 3 * width  # q, k, v
        + 4 * tokens * tokens * width  # scores and weighted sum
        + 2 * tokens * width * width  # output projection
        + 2 * tokens * width * intermediate * 2  # MLP
    )


def train_flops_per_clip(config, frames: int, size: int) -> float:
    """Model FLOPs of one training clip: forward + backward = 3 x forward."""
    return 3.0 * vit_forward_flops(config, frames, size)["forward"]


class StepTelemetry:
    """Times one worker's epochs and windows of ``log_every`` optimizer steps.

    The loop calls :meth:`start_epoch`, :meth:`waited` after each batch arrives,
    :meth:`stepped` after each optimizer step, and :meth:`end_epoch`.
    ``read_loss`` (given by the loop) returns the mean loss of the micro-batches
    since the last call; it is the one place that waits for the device. Only
    a worker built with ``console=True`` prints.
    """

    def __init__(
        self,
        *,
        flops_per_clip: float,
        world_size: int,
        device: torch.device,
        log_every: int = 0,
        console: bool = False,
        printer: Callable[[str], None] = print,
    ):
        self.flops_per_clip = flops_per_clip
        self.world_size = world_size
        self.log_every = log_every
        self.console = console
        self.printer = printer
        name = torch.cuda.get_device_name(device) if device.type == "cuda" else None
        self.peak_tflops = device_peak_tflops(name)
        self.last_window: dict[str, Any] = {}
        self._epoch = self._window = None

    @staticmethod
    def _counters() -> dict[str, float]:
        return {"start": time.perf_counter(), "wait": 0.0, "clips": 0, "steps": 0}

    def start_epoch(self, epoch: int) -> None:
        self.epoch = epoch
        self._epoch, self._window = self._counters(), self._counters()

    def waited(self, seconds: float) -> None:
        self._epoch["wait"] += seconds
        self._window["wait"] += seconds

    def stepped(self, global_step: int, clips: int, read_loss: Callable[[], float]) -> None:
        """After an optimizer step that trained on ``clips`` clips of this worker."""
        for counters in (self._epoch, self._window):
            counters["clips"] += clips
            counters["steps"] += 1
        if self.log_every and global_step % self.log_every == 0:
            loss = read_loss()  # waits for the device: the window's timing is exact
            self.last_window = self._figures(self._window)
            if self.console:
                self.printer(self.line(f"epoch {self.epoch} step {global_step}", loss, self.last_window))
            self._window = self._counters()

    def end_epoch(self) -> dict[str, float]:
        """The epoch's figures (:data:`EPOCH_TELEMETRY`, and ``mfu`` on a GPU of known peak);
        call after the epoch's last device read, so the wall time is the device's."""
        return self._figures(self._epoch)

    def _figures(self, counters: dict[str, float]) -> dict[str, float]:
        wall = max(time.perf_counter() - counters["start"], 1e-9)
        steps = max(counters["steps"], 1)
        achieved = self.flops_per_clip * counters["clips"] / wall / 1e12  # per device
        figures = {
            "step_s": wall / steps,
            "data_wait_share": counters["wait"] / wall,
            "clips_per_s": counters["clips"] * self.world_size / wall,  # all workers, assuming equal shards
            "achieved_tflops": achieved,
        }
        if self.peak_tflops:
            figures["mfu"] = achieved / self.peak_tflops
        return figures

    @staticmethod
    def line(where: str, loss: float | None, figures: dict[str, float]) -> str:
        parts = [f"vidray: {where}"]
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        parts += [
            f"{figures['step_s']:.3f} s/step",
            f"data wait {100 * figures['data_wait_share']:.1f}%",
            f"{figures['clips_per_s']:.1f} clips/s",
            f"{figures['achieved_tflops']:.3f} TFLOP/s per device",
        ]
        if "mfu" in figures:
            parts.append(f"MFU {100 * figures['mfu']:.1f}%")
        return " | ".join(parts)
