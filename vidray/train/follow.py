"""What the driver of a ``vidray train`` or ``vidray pretrain`` run prints and logs of each epoch: the follower
(:class:`EpochFollower`) prints one line per epoch and logs each epoch to TensorBoard and, when
``run.wandb.enabled``, to Weights & Biases (a sweep logs through Tune's callbacks: vidray/tune/callbacks.py).

Each epoch is printed and logged by whichever driver of the run first sees its checkpoint. A driver killed
after an epoch's checkpoint but before its next look (1 s apart), or before the look after the last epoch,
leaves that epoch to the next driver of the run: the run's marker records the epochs its drivers logged
(:data:`FOLLOWED`), on the run's storage, so a run continued on another machine reads it too.
"""

from __future__ import annotations

import os
import sys
import threading
import uuid
from pathlib import Path
from typing import Any, Callable

from vidray.config import VidrayConfig, WandbSettings
from vidray.errors import UserError
from vidray.storage import local_mirror
from vidray.train.rows import rejected_clips_line, rejected_ids
from vidray.train.runs import checkpoints, latest_checkpoint, read_marker, update_marker

TENSORBOARD_DIR = "tensorboard"
# In the run's marker (vidray.train.runs.RUN_MARKER): the epochs a driver of the run printed and logged.
FOLLOWED = "followed_epochs"
# In the run's marker: the id of the run's Weights & Biases run, which every driver of the run logs into.
WANDB_RUN_ID = "wandb_run_id"
# How often the driver looks at the run's storage for a new epoch while Ray Train runs.
FOLLOW_EVERY_S = 1.0


def wandb_mode(settings: WandbSettings) -> str:
    """WANDB_MODE in the environment wins over run.wandb.mode, so WANDB_MODE=offline always keeps
    everything on disk; offline and disabled are exported so nothing looks for an API key."""
    mode = os.environ.get("WANDB_MODE") or settings.mode
    if mode in ("offline", "disabled"):
        os.environ["WANDB_MODE"] = mode
    return mode


def wandb_key_error(mode: str, err: Exception) -> UserError:
    return UserError(
        f"run.wandb.mode={mode} needs a Weights & Biases API key ({err}); set WANDB_API_KEY, "
        "or run.wandb.mode=offline to log locally"
    )


def tracking_dir(run_dir: str) -> Path:
    """Where a train or pretrain run's TensorBoard events and wandb/ folder go (both write local files): the run's
    own folder, or for a bucket the run's own folder on the driver's machine (:func:`vidray.storage.local_mirror`,
    e.g. ``~/ray_results/s3/<bucket>/<path>/<name>``), where its default ``run.reports_dir`` is too.
    ``run_dir`` is ``<storage_path>/<name>``: the folder is derived from it whole, not from ``name`` alone, which
    a local run of the same name (``~/ray_results/<name>``) or a run on another bucket also has."""
    return local_mirror(run_dir)


class EpochFollower:
    """The driver's view of a running train or pretrain run: reads each new epoch from the run's latest
    complete checkpoint (its ``vidray.json`` holds the whole history, so no epoch is missed however fast
    they come, and one being copied waits for the next look), prints one line for it (and one on stderr naming
    the stored clips it rejected, which the workers' warnings tell only with --verbose) and logs it to
    TensorBoard and, when enabled, Weights & Biases. ``command``: the warning's, e.g. "vidray train".

    Used as a context manager around ``fit()``; epochs printed and logged already (:data:`FOLLOWED`) are skipped.
    """

    def __init__(
        self, run_dir: str, cfg: VidrayConfig, *, command: str, name: str, line: Callable[[dict[str, Any], int], str],
        every_s: float = FOLLOW_EVERY_S,
    ):  # fmt: skip
        self.run_dir, self.cfg, self.name, self.line, self.every_s = run_dir, cfg, name, line, every_s
        self.command = command
        self.local_dir = tracking_dir(run_dir)
        marker = read_marker(run_dir)
        self.marked = marker is not None  # a folder vidray marked (vidray.train.runs.open_run): the record goes there
        followed = (marker or {}).get(FOLLOWED)
        self.wandb_run_id = (marker or {}).get(WANDB_RUN_ID)
        # Without a record (a run that older vidray started): the epochs it has are taken as printed and logged.
        if isinstance(followed, list) and all(isinstance(epoch, int) for epoch in followed):
            self.done = set(followed)
        else:
            self.done = {int(h["epoch"]) for h in self._history()}
        self.record_failed = False
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._follow, name="vidray-epochs", daemon=True)
        self.tensorboard = None
        self.wandb_run = None

    def __enter__(self) -> "EpochFollower":
        from tensorboardX import SummaryWriter

        self.local_dir.mkdir(parents=True, exist_ok=True)
        # Each driver its own events file: tensorboardX names it by the second and the host, so a second driver
        # of the run started within the same second on this machine overwrote the first one's file.
        suffix = f".{uuid.uuid4().hex[:8]}"
        self.tensorboard = SummaryWriter(str(self.local_dir / TENSORBOARD_DIR), filename_suffix=suffix)
        if self.cfg.run.wandb.enabled:
            # One W&B run for the run, whichever drivers follow it: each made its own, the epochs split between them.
            self.wandb_run_id = self.wandb_run_id or uuid.uuid4().hex[:8]
            self.wandb_run = start_wandb(self.cfg, self.name, self.local_dir, self.wandb_run_id)
        self._record()  # from now on the record says what is shown, whenever this driver is killed
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop.set()
        self.thread.join()
        self.poll()  # what the last epoch wrote after the thread's last look
        self.tensorboard.close()
        if self.wandb_run is not None:
            self.wandb_run.finish()

    def _follow(self) -> None:
        while not self.stop.wait(self.every_s):
            self.poll()

    def _record(self) -> None:
        """After each epoch is printed and logged (a kill in between logs it again: at least once, never lost). A
        record that cannot be written (a bucket that does not answer) costs only a repeat later: warned once."""
        if not self.marked:
            return
        try:
            wandb_id = {WANDB_RUN_ID: self.wandb_run_id} if self.wandb_run_id else {}
            update_marker(self.run_dir, **{FOLLOWED: sorted(self.done)}, **wandb_id)
        except (OSError, UserError) as err:  # a write, or a read (vidray.storage.read_json), the storage refused
            if not self.record_failed:
                self.record_failed = True
                print(f"{self.command}: warning: cannot record the epochs shown in {self.run_dir} ({err}); "
                      "a later run of this command may show some again", file=sys.stderr, flush=True)  # fmt: skip

    def catch_up(self) -> None:
        """For a run that is finished: print and log the epochs no driver did (its last driver was killed after the
        last epoch's checkpoint and before its look). Nothing at all, not even a TensorBoard file, when none is missing."""
        if any(int(h["epoch"]) not in self.done for h in self._history()):
            with self:
                pass

    def _history(self) -> list[dict[str, Any]]:
        try:
            latest = latest_checkpoint(checkpoints(self.run_dir))
        except (OSError, UserError):  # storage that did not answer this look (a 503, ESTALE): the next one tries again
            return []
        return latest[2].get("history", []) if latest else []

    def poll(self) -> None:
        for metrics in self._history():
            epoch = int(metrics["epoch"])
            if epoch in self.done:
                continue
            self.done.add(epoch)
            print(self.line(metrics, self.cfg.train.epochs), flush=True)
            if rejected := rejected_ids(metrics):
                print(rejected_clips_line(self.command, rejected), file=sys.stderr, flush=True)
            scalars = {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and k != "epoch"}
            for key, value in scalars.items():
                self.tensorboard.add_scalar(key, value, epoch + 1)
            self.tensorboard.flush()
            if self.wandb_run is not None:
                self.wandb_run.log({**scalars, "epoch": epoch + 1}, step=epoch + 1)
            self._record()


def start_wandb(cfg: VidrayConfig, name: str, local_dir: Path, run_id: str):
    """The Weights & Biases run ``run_id`` of one train or pretrain run, logged from the driver (no worker needs
    wandb), and continued by the run's later drivers (``resume="allow"``)."""
    import wandb

    mode = wandb_mode(cfg.run.wandb)
    try:
        # console="off": stdout stays vidray's, whose last line is the JSON summary.
        return wandb.init(
            project=cfg.run.wandb.project, group=cfg.run.name, name=name, dir=str(local_dir), mode=mode, id=run_id, resume="allow",
            config=cfg.model_dump(mode="json"), settings=wandb.Settings(silent=True, console="off"),
        )  # fmt: skip
    except (wandb.errors.Error, ValueError) as err:
        raise wandb_key_error(mode, err) from None
