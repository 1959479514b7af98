"""One driver per folder that vidray writes: a run, a dataset being preprocessed, a prediction output.

* A second `vidray train`, `pretrain` or `tune` on a run that a live driver is training is refused, and
  ``--restart`` does not delete it. Before, the same job submitted twice (two `ray job submit`s, two
  terminals) had both drivers train into one folder, each "continuing" the other's run, and
  ``--restart`` deleted a folder that a running sweep was writing.
* A second `vidray predict --out OUT` while one writes OUT is refused: it would predict the same chunks,
  or delete the first one's parts as another model's.
* A preprocessing run (``vidray preprocess``, or a train, pretrain or sweep preparing its data) waits
  while another writes the same dataset, then reuses what that one wrote. Two sweeps started together
  on a fresh dataset used to decode the same shards, each deleting the other's temporaries.

The driver holds ``<folder>/.vidray_driver.json`` (:class:`FolderLock`): its host, process id and
process start time, and a heartbeat it rewrites every :data:`HEARTBEAT_S`. Another driver reads it
(:func:`live_holder`) and takes it as live when

* on the same host: that process still runs (and started when the file says: a reused pid is not it);
* on another host, where its process cannot be looked at: its heartbeat is under :data:`STALE_AFTER_S` old.

A driver killed with SIGKILL, or lost with its machine, leaves the file behind; the next driver finds it
stale and takes the folder over (continuing the run, as after any interruption).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import sys
import threading
import time
import uuid
from typing import Any, Iterator

from vidray.errors import UserError
from vidray.storage import join_uri, local_part, open_filesystem, read_json

LOCK_FILE = ".vidray_driver.json"
HEARTBEAT_S = 30.0
# Four heartbeats missed: a driver on another host is gone (or its clock is far off ours).
STALE_AFTER_S = 120.0
RUN_ELSEWHERE = "set run.name to a new name"
# How often a driver that waits (``wait=True``) looks again.
WAIT_POLL_S = 1.0


def _process_start(pid: int) -> str | None:
    """The process's start time in clock ticks since boot (/proc/PID/stat, field 22), or None where
    there is no /proc: with the pid, what tells a process from a later one that got its pid.
    "zombie" for a process that has exited but was not yet reaped by its parent."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            # The command name (field 2) may hold spaces and parentheses: count fields after the last ")".
            fields = f.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return "zombie" if fields[0] == "Z" else fields[19]


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
    return started != "zombie" and (started is None or holder.get("process_start") in (None, started))


def read_holder(folder: str) -> dict[str, Any] | None:
    holder = read_json(join_uri(folder, LOCK_FILE))
    return holder if isinstance(holder, dict) else None


def _is_this_process(holder: dict[str, Any]) -> bool:
    return holder.get("host") == socket.gethostname() and holder.get("pid") == os.getpid()


def live_holder(folder: str) -> dict[str, Any] | None:
    """The live driver, other than this process, that holds ``folder``; None when none does."""
    holder = read_holder(folder)
    if holder is None or _is_this_process(holder) or not is_live(holder):
        return None
    return holder


def _who(holder: dict[str, Any]) -> str:
    try:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(float(holder["since"])))
    except (KeyError, TypeError, ValueError, OverflowError):
        since = "an unknown time"
    return f"`{holder.get('command', 'vidray')}` (pid {holder['pid']} on host {holder['host']}, since {since})"


def refuse_if_held(command: str, folder: str, instead: str = RUN_ELSEWHERE) -> None:
    """A one-line UserError when a live driver other than this process holds ``folder`` (``instead``: the
    way around it that the message offers)."""
    holder = live_holder(folder)
    if holder is not None:
        raise UserError(
            f"{folder} is in use: {_who(holder)} is running on it; wait for it to end or stop it, or {instead} "
            f"(if that driver is gone, delete {join_uri(folder, LOCK_FILE)})"
        )


@contextlib.contextmanager
def _folder_flock(uri: str) -> Iterator[None]:
    """An exclusive flock on the local folder that holds ``uri`` while the block runs; nothing for an object store.

    The hard link of :meth:`FolderLock._write` settles two drivers that find no lock. Two that find the same
    stale lock both replace it, and without this both could read their own file back and go on: one driver
    checks and writes while the other waits here. Where the filesystem refuses flock (NFS: EBADF on a
    folder), the link alone decides.
    """
    local = local_part(uri)
    if local is None:
        yield
        return
    try:
        fd = os.open(os.path.dirname(local) or ".", os.O_RDONLY)
    except OSError:
        yield
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
        except OSError:
            pass
        yield
    finally:
        os.close(fd)  # releases the flock


class FolderLock:
    """``with FolderLock(folder, "vidray train"):`` this process is the folder's driver until the block ends.

    Entering refuses a folder that a live driver holds (:func:`refuse_if_held`), or with ``wait`` waits
    until none does, saying so on stderr; a stale lock is taken over.
    On a local path (or file://) the file is checked and put in place while this process holds an
    exclusive ``flock`` on the folder itself (:func:`_folder_flock`), so of two drivers that start together,
    or that take over the same stale lock together, one gets it (a flock ends with its process, so it is
    never stale itself). On NFS, EFS or Filestore, Linux emulates flock with byte-range locks, which a
    folder (opened read-only) cannot take: there only the link decides, which settles two drivers that
    find no lock but not two that take over the same stale one in the same moment. On s3:// or gs:// it
    is read, checked and written, and two drivers starting within that moment could both pass. A thread
    rewrites the heartbeat while the block runs; leaving deletes the file if it is still this driver's.
    """

    def __init__(self, folder: str, command: str, instead: str = RUN_ELSEWHERE, wait: bool = False):
        self.folder, self.command, self.instead, self.wait = folder, command, instead, wait
        self.uri = join_uri(folder, LOCK_FILE)
        self.holder = this_driver(command)
        self._stop = threading.Event()
        self._beating: threading.Thread | None = None

    def __enter__(self) -> "FolderLock":
        while True:
            if self.wait:
                self._wait_until_free()
            try:
                self._take()
                break
            except UserError:
                if not self.wait:
                    raise  # a driver that waits lost a race for it: it waits for the winner
        self._beating = threading.Thread(target=self._beat, name="vidray-folder-lock", daemon=True)
        self._beating.start()
        return self

    def _take(self) -> None:
        with _folder_flock(self.uri):
            refuse_if_held(self.command, self.folder, self.instead)
            self._write(first=True)
        if not self._still_ours():
            # Another driver took it in the same moment: refused (a driver that waits, waits for it). When
            # no other process holds it (this process's own lock on the folder), this one goes on.
            refuse_if_held(self.command, self.folder, self.instead)

    def _wait_until_free(self) -> None:
        told = None
        while (holder := live_holder(self.folder)) is not None:
            if holder.get("token") != told:  # one line per driver waited for
                print(f"{self.command}: waiting for {_who(holder)} to finish writing {self.folder}", file=sys.stderr, flush=True)
                told = holder.get("token")
            time.sleep(WAIT_POLL_S)

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
                    refuse_if_held(self.command, self.folder, self.instead)  # a live one: refused; a stale one: replaced
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
        failing = False
        while not self._stop.wait(HEARTBEAT_S):
            try:
                if self._still_ours():
                    self.holder["heartbeat"] = time.time()
                    self._write()
            except (OSError, UserError) as err:  # a write, or a read (vidray.storage.read_json), the storage refused
                # One failed beat (an S3 PUT, NFS ESTALE, a full disk) ended this thread while the driver trained on:
                # its lock went stale, and another driver took the folder over, or --restart deleted it. The next
                # beat tries again; said once per run of failures, not every HEARTBEAT_S.
                if not failing:
                    print(f"{self.command}: could not renew the heartbeat in {self.uri} ({err}); trying again every "
                          f"{HEARTBEAT_S:g} s: check the storage (a lock not renewed for {STALE_AFTER_S:g} s is another "
                          "driver's to take over)", file=sys.stderr, flush=True)  # fmt: skip
                failing = True
            else:
                failing = False

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._beating is not None:
            self._beating.join()
        try:
            if self._still_ours():
                fs, path = open_filesystem(self.uri)
                try:
                    fs.delete_file(path)
                except FileNotFoundError:
                    pass
        except (OSError, UserError) as err:
            # The run itself is over: storage that does not answer now must not turn it into a failure, nor hide the
            # error it ends with. The lock, no longer renewed, is stale after STALE_AFTER_S and free to take.
            print(f"{self.command}: could not release the lock {self.uri} ({err}); it is free to take once "
                  f"{STALE_AFTER_S:g} s old", file=sys.stderr, flush=True)
