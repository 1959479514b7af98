"""The end of every epoch on every worker: report the metrics, rank 0 with the checkpoint.

:func:`report_epoch` writes the checkpoint (vidray/model/checkpoint.py) before it
reports, or, with ``train.checkpoint_in_background``, hands Ray a function that
writes it on Ray's checkpoint-upload thread while training goes on.
"""

from __future__ import annotations

import json
import threading
from typing import Any

import ray
import ray.train

from vidray.compat import background_checkpoints_supported
from vidray.errors import warn_once
from vidray.model.checkpoint import host_snapshot, save_checkpoint
from vidray.storage import scratch, scratch_dir

_previous_write = threading.Event()
_previous_write.set()
# How long a snapshot waits for the previous epoch's write (which bounds host memory to two snapshots).
PENDING_WRITE_WAIT_S = 300


def report_epoch(
    metrics: dict[str, Any], *, model, training_state: dict[str, Any], info: dict[str, Any], background: bool = False
) -> None:
    """Every rank reports (it is a barrier); rank 0, the one given ``model``, attaches the checkpoint.

    ``background``: rank 0 only copies model and training state to host memory
    here (:func:`vidray.model.checkpoint.host_snapshot`) and hands Ray a function that
    writes and uploads them; Ray runs it on its checkpoint-upload thread while
    training goes on, and registers the checkpoint (the one a restart resumes
    from) only when it has returned. At most one such write is pending: the
    next snapshot waits for it. Otherwise the files are written and uploaded
    before the report returns, as every rank waits.
    """
    name = f"checkpoint_epoch_{metrics['epoch']:04d}"
    if background and not background_checkpoints_supported():
        warn_once(f"ray {ray.__version__} is not one vidray checked background checkpoints with; writing them in line")
        background = False
    if not background:
        with scratch("ckpt") as directory:
            checkpoint = None
            if model is not None:
                save_checkpoint(directory, model, training_state=training_state, info=info)
                checkpoint = ray.train.Checkpoint.from_directory(directory)
            ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=name)
        return

    # Here, not at the top: a Ray release without it (where background is off, above) still writes in line.
    from ray.train import CheckpointUploadMode

    if model is None:
        ray.train.report(metrics, checkpoint=None, checkpoint_dir_name=name, checkpoint_upload_mode=CheckpointUploadMode.ASYNC)
        return
    if not _previous_write.wait(timeout=PENDING_WRITE_WAIT_S):
        warn_once(f"the previous epoch's checkpoint is still being written after {PENDING_WRITE_WAIT_S} s; not waiting for it")
    snapshot = host_snapshot({"model": model.state_dict(), "training_state": training_state})
    info = json.loads(json.dumps(info, default=str))  # the history list grows while this is written
    storage = ray.train.get_context().get_storage()
    written = threading.Event()

    def write_and_upload(checkpoint: ray.train.Checkpoint, checkpoint_dir_name: str) -> ray.train.Checkpoint:
        try:
            save_checkpoint(
                checkpoint.path, model, training_state=snapshot["training_state"], info=info, model_state=snapshot["model"]
            )
            return storage.persist_current_checkpoint(checkpoint, checkpoint_dir_name)
        finally:
            written.set()

    _set_previous_write(written)
    # Ray deletes this directory once the upload has returned (delete_local_checkpoint_after_upload); if
    # this process is killed first, the next scratch folder made on this node removes it.
    directory = scratch_dir("ckpt")
    ray.train.report(
        metrics,
        checkpoint=ray.train.Checkpoint.from_directory(directory),
        checkpoint_dir_name=name,
        checkpoint_upload_mode=CheckpointUploadMode.ASYNC,
        checkpoint_upload_fn=write_and_upload,
    )


def _set_previous_write(event: threading.Event) -> None:
    global _previous_write
    _previous_write = event
