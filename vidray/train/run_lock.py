"""One driver per run folder: a second `vidray train`, `pretrain` or `tune` on a run that a live driver
is training is refused, and ``--restart`` does not delete it.

Without this, the same job submitted twice (two `ray job submit`s, two terminals) had both drivers train
into one folder, each "continuing" the other's run, and ``--restart`` deleted a folder that a running
sweep was writing.

The driver that trains a run holds ``<run folder>/.vidray_driver.json`` (:class:`RunLock`): its host,
process id and process start time, and a heartbeat it rewrites every :data:`HEARTBEAT_S`. Another driver
reads it (:func:`refuse_if_held`) and takes it as live when

* on the same host: that process still runs (and started when the file says: a reused pid is not it);
* on another host, where its process cannot be looked at: its heartbeat is under :data:`STALE_AFTER_S` old.

A driver killed with SIGKILL, or lost with its machine, leaves the file behind; the next driver finds it
stale and takes the run over (continuing it, as after any interruption).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from vidray.errors import UserError
from vidray.storage import local_part, join_uri, open_filesystem

LOCK_FILE = ".vidray_driver.json"
HEARTBEAT_S = 30.0
# Four heartbeats missed: a driver on another host is gone (or its clock is far off ours).
STALE_AFTER_S = 120.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22), or None where
    there is no /proc: with the pid, what tells a process from a later one that got its pid."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
            return f.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _runs(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def this_driver(command: str) -> dict[str, Any]:
    pid = os.getpid()
    now = time.time()
    return {
        "command": command, "host": socket.gethostname(), "pid": pid, "process_start": _process_start(pid),
        "since": now, "heartbeat": now, "token": uuid.uuid4().hex,
    }  # fmt: skip


def is_live(holder: dict[str, Any], now: float | None = None) -> bool:
    """Whether the driver ``holder`` describes is still running (see the module's docstring)."""
    try:
        host, pid, heartbeat = str(holder["host"]), int(holder["pid"]), float(holder["heartbeat"])
    except (KeyError, TypeError, ValueError):
        return False  # not a lock vidray wrote whole: nobody holds the run
    if host != socket.gethostname():
        return (time.time() if now is None else now) - heartbeat < STALE_AFTER_S
    if not _runs(pid):
        return False
    started = _process_start(pid)
    return started is None or holder.get("process_start") in (None, started)


def read_holder(folder: str) -> dict[str, Any] | None:
    fs, path = open_filesystem(join_uri(folder, LOCK_FILE))
    try:
        with fs.open_input_stream(path) as f:
            holder = json.loads(f.read())
    except (FileNotFoundError, OSError, ValueError):
        return None
    return holder if isinstance(holder, dict) else None


def _is_this_process(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def refuse_if_held(command: str, folder: str) -> None:
    """A one-line UserError when a live driver other than this process holds ``folder``."""
    holder = read_holder(folder)
    if holder is None or _is_this_process(holder) or not is_live(holder):
        return
    since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder.get("since", 0))))
    raise UserError(
        f"{folder} is in use: `{holder.get('command', 'vidray')}` (pid {holder['pid']} on host {holder['host']}, "
        f"since {since}) is training it; wait for it to end or stop it, or set run.name to a new name "
        f"(if that driver is gone, delete {join_uri(folder, LOCK_FILE)})"
    )


class RunLock:
    """``with RunLock(folder, "vidray train"):`` this process is the run's driver until the block ends.

    Entering refuses a run that a live driver holds (:func:`refuse_if_held`) and takes over a stale lock.
    On a local path (or file://) the file is hard-linked into place, which fails when one is there, so of
    two drivers that start together one gets it; on s3:// or gs:// it is read, checked and written, and
    two drivers starting within that moment could both pass. A thread rewrites the heartbeat while the
    block runs; leaving deletes the file if it is still this driver's.
    """

    def __init__(self, folder: str, command: str):
        self.folder, self.command = folder, command
        self.uri = join_uri(folder, LOCK_FILE)
        self.holder = this_driver(command)
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def __enter__(self) -> "RunLock":
        refuse_if_held(self.command, self.folder)
        self._write(first=True)
        if not self._still_ours():  # another driver took it in the same moment
            refuse_if_held(self.command, self.folder)
            raise UserError(f"{self.folder} was taken by another driver as this one started; set run.name to a new name")
        self._beating = threading.Thread(target=self._beat, name="vidray-run-lock", daemon=True)
        self._beating.start()
        return self

    def _write(self, first: bool = False) -> None:
        text = json.dumps(self.holder, indent=1)
        local = local_part(self.uri)
        if local is None:  # an object store's write lands whole when the stream closes
            fs, path = open_filesystem(self.uri)
            with fs.open_output_stream(path) as f:
                f.write(text.encode())
            return
        # Written aside, then put in place whole: a driver reading it must never see an empty file.
        tmp = f"{local}.{self.holder['token'][:8]}.tmp"
        with open(tmp, "w") as f:
            f.write(text)
        try:
            if first:
                try:
                    os.link(tmp, local)  # fails if a lock is there: of two drivers starting together, one gets it
                    return
                except FileExistsError:
                    refuse_if_held(self.command, self.folder)  # a live driver's: refused; a stale one is replaced
                except OSError:
                    pass  # a filesystem without hard links
            os.replace(tmp, local)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    def _still_ours(self) -> bool:
        holder = read_holder(self.folder)
        return holder is not None and holder.get("token") == self.holder["token"]

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            if self._still_ours():
                self.holder["heartbeat"] = time.time()
                self._write()

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        if self._still_ours():
            fs, path = open_filesystem(self.uri)
            try:
                fs.delete_file(path)
            except FileNotFoundError:
                pass
