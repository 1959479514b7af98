"""Decoding shards on the Ray cluster: one task per shard, handed out by Ray Data or plain Ray, and crash isolation.

Who hands the tasks out (``data.dispatch``): Ray Data (``ray_data``, the default: the dashboard's
Data view follows the run) or plain Ray tasks (``ray_tasks``). Both run :func:`decode_shard` once
per shard and write the same files. Measured on 2 CPUs (docs/benchmarks.md, "Preprocessing against
its own decode work"), Ray Data's executor hands each finished task's CPU to the next one about
0.13 s late (it polls its running tasks with a 0.1 s ``ray.wait`` timeout) and starts 2 s later
(its helper actors, workers importing Ray Data): plain tasks decode 1.2x the videos/s, within 5 %
of plain decoder processes.

Fault isolation: one task decodes one shard (:func:`run_shards`). A
decoder that kills its worker process (segfault) loses only its shard's task;
such shards are re-run one video per Ray task (:func:`isolate_crashes`), the
video whose task dies is rejected with "decoder crashed the worker", and the
others are written as usual. (Like any reject, it stays rejected on resume;
``--retry-crashed`` decodes it again: the crash need not recur.)

This module imports Ray, which costs seconds: vidray/data/preprocess.py loads it
only when a run has shards to decode.
"""

from __future__ import annotations

import sys
import tempfile
import time
import warnings

import numpy as np
import ray
import ray.data

from vidray.data.clip import VideoError
from vidray.config import Dispatch
from vidray.data.decode_shard import WORKER_CRASH_REASON, decode_checked, decode_shard, decode_shards
from vidray.data.shard_files import OUTCOME_COLUMNS, WORKER_CRASH, outcome_row, write_shard
from vidray.data.shards import GPU_SHARE_PER_DECODE_TASK, DecodeSettings, Shard
from vidray.data.video import (
    DecoderUnavailableError,
    encode_mp4,
    read_clip,
    require_cuda_decoding,
    require_decoder,
)
from vidray.errors import UserError

PROGRESS_EVERY_S = 15.0


def run_shards(shards: list[Shard], out: str, settings: DecodeSettings, crash_on: str | None,
               dispatch: Dispatch = "ray_data"):  # fmt: skip
    """{shard id: outcome rows} for the shards whose task finished: one task per shard (``dispatch``:
    a Ray Data task, or a plain Ray task).

    The shards go in biggest first (``shards``' order): the run does not end
    with one CPU decoding a heavy shard while the others idle. Either way the
    tasks spread over the nodes, a task is retried once (a lost node), and a
    shard whose task failed is left out of the result for :func:`isolate_crashes`.
    """
    if dispatch == "ray_tasks":
        return _run_shards_as_tasks(shards, out, settings, crash_on)
    # Ray Data's progress bars and per-operator stats cost the driver more CPU than anything else
    # it does here, so they are off; one line every PROGRESS_EVERY_S says how far it got.
    context = ray.data.DataContext.get_current()
    context.enable_progress_bars = False
    ds = ray.data.from_items([{"shard": s.to_json()} for s in shards], override_num_blocks=len(shards))
    gpu = {"num_gpus": GPU_SHARE_PER_DECODE_TASK} if settings.device == "cuda" else {}
    with warnings.catch_warnings():
        # Ray 2.60 has no named parameter for task retries; the remote-args route it deprecates
        # still works until Ray 2.64 (tests/test_preprocess.py's crash tests fail if it stops).
        warnings.filterwarnings("ignore", message="`ray_remote_args` is deprecated")
        ds = ds.map_batches(
            decode_shards,
            batch_size=1,
            batch_format="numpy",
            fn_kwargs={"out": out, "settings": settings, "crash_on": crash_on},
            num_cpus=1,
            # Ray Data retries tasks forever by default, and a decoder that segfaults on a
            # file does so every time. One retry covers a lost node; after that
            # isolate_crashes takes the shard over, video by video.
            max_retries=1,
            **gpu,
        )
    ds.context.max_errored_blocks = -1  # a failed shard is recovered below, never fatal
    results: dict[str, list[dict]] = {}
    progress = _Progress(len(shards))
    for row in ds.iter_rows():
        results.setdefault(row["shard"], []).append({c: _plain(row[c]) for c in OUTCOME_COLUMNS})
        progress.update(sum(1 for rows in results.values() if rows))
    return results


def _run_shards_as_tasks(shards: list[Shard], out: str, settings: DecodeSettings, crash_on: str | None):
    """:func:`run_shards` without Ray Data: every shard's task submitted at once, in ``shards``' order
    (Ray's scheduler starts the next one the moment a CPU frees), its outcome rows taken as it ends."""
    decode = ray.remote(max_retries=1, **settings.task_options())(decode_shard)
    pending = {decode.remote(out, shard, settings, crash_on): shard for shard in shards}
    results: dict[str, list[dict]] = {}
    progress = _Progress(len(shards))
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1, timeout=PROGRESS_EVERY_S)
        for ref in done:
            shard = pending.pop(ref)
            try:
                results[shard.id] = ray.get(ref)
            except ray.exceptions.RayError:
                pass  # its worker died, or it raised (a node without the decoder): isolate_crashes says which
        progress.update(len(results))
    return results


class _Progress:
    """One line every :data:`PROGRESS_EVERY_S` on stderr: how many of the shards are decoded."""

    def __init__(self, shards: int):
        self.shards = shards
        self.started = self.reported = time.monotonic()

    def update(self, done: int) -> None:
        if time.monotonic() - self.reported >= PROGRESS_EVERY_S:
            self.reported = time.monotonic()
            print(f"vidray preprocess: {done}/{self.shards} shards decoded in {self.reported - self.started:.0f} s",
                  file=sys.stderr, flush=True)  # fmt: skip


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def isolate_crashes(shards: list[Shard], out: str, settings: DecodeSettings, crash_on: str | None):
    """Re-run lost shards one video per task; a task whose worker dies marks its video.

    A shard is also lost when its node lacks the decoder: that fails the run here, in one line.
    """
    decode_one = ray.remote(max_retries=0, **settings.task_options())(decode_checked)
    results = {}
    for shard in shards:  # one shard at a time bounds the driver's memory to one shard
        refs = [decode_one.remote(v, settings, crash_on) for v in shard.videos]
        outcomes = []
        for video, ref in zip(shard.videos, refs):
            try:
                outcomes.append(ray.get(ref))
            except ray.exceptions.RayTaskError as err:
                if isinstance(getattr(err, "cause", None), DecoderUnavailableError):
                    raise DecoderUnavailableError(f"{err.cause} (on a Ray worker node)") from None
                reason = f"{WORKER_CRASH_REASON} ({type(err).__name__})"
                outcomes.append((outcome_row(video, "rejected", WORKER_CRASH, reason), None))
            except ray.exceptions.RayError as err:
                reason = f"{WORKER_CRASH_REASON} ({type(err).__name__})"
                outcomes.append((outcome_row(video, "rejected", WORKER_CRASH, reason), None))
        results[shard.id] = write_shard(out, shard, outcomes, store=settings.store)
    return results


def check_cuda_workers(settings: DecodeSettings) -> None:
    """Fail the run once, with a one-line reason, when GPU decode tasks cannot run or cannot decode
    (no GPU in the cluster; no CUDA build of torch/torchcodec on the GPU node), instead of
    waiting forever or rejecting every video one by one."""
    if not ray.cluster_resources().get("GPU"):
        raise UserError(
            "data.decoder_device=cuda but the Ray cluster has no GPU; use data.decoder_device=cpu "
            "(on an autoscaling cluster, start a GPU node first)"
        )

    def check() -> None:
        # On a GPU node: the packages load, CUDA is there, and one real clip decodes on it
        # (NVDEC with the resize), so a node that cannot does not reject every video one by one.
        require_decoder(settings.decoder, settings.device)
        require_cuda_decoding()
        with tempfile.TemporaryDirectory() as tmp:
            frames = np.random.default_rng(0).integers(0, 255, (8, 96, 128, 3), dtype=np.uint8)
            path = encode_mp4(f"{tmp}/check.mp4", frames)
            try:
                read_clip(path, settings.stored_frames, settings.stored_size, settings.decoder, settings.device)
            except VideoError as err:
                raise UserError(f"data.decoder_device=cuda: a test clip does not decode on this GPU ({err.reason})")

    try:
        ray.get(ray.remote(max_retries=0, **settings.task_options())(check).remote())
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        raise UserError(str(cause) if isinstance(cause, UserError) else str(err).splitlines()[0]) from None
