"""One run of a stage at a time: ``<stage dir>/.lock``.

``prolongctl run`` holds the lock of each stage while it runs it, so a second run of the same stage
(another terminal, a CI job, a person) refuses at once and says who holds it, instead of two Ray
Train runs writing into one directory.

- The lock is a small JSON file (host, pid, start time, a random token) created with
  ``O_CREAT | O_EXCL``: of two runs starting together, exactly one creates it.
- The holder refreshes its modification time every :data:`HEARTBEAT_SECONDS` (a daemon thread).
- A lock is *stale* when its holder is on this host and its process is gone, or when its
  heartbeat is older than :data:`STALE_SECONDS` (a holder on another machine or pod that died:
  the operator's retry of a stage runs in a new pod). A stale lock is taken over: it is renamed
  away (atomic; of two runs taking it over, one wins the rename) and created afresh.
- Released (deleted) when the run ends, successfully or not.

Local stage directories only: an object store has no create-if-absent, so stages there are not
locked (the run says so once).
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong.stage.uri import absolute, is_object_store

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 180.0


class StageLocked(RuntimeError):
    """The stage is being run by someone else (the message says who)."""


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    started: float
    token: str

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host} since {since}"


def _read(path: Path) -> Holder | None:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
        return Holder(str(data["host"]), int(data["pid"]), float(data["started"]),
                      str(data["token"]))
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        # Half-written by a holder that died mid-write: as good as no holder, once it is old.
        return Holder("?", -1, 0.0, "")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


def is_stale(path: Path, holder: Holder, *, now: float | None = None) -> bool:
    """Whether a lock's holder is gone (see the module docstring)."""
    now = time.time() if now is None else now
    try:
        beat = path.stat().st_mtime
    except FileNotFoundError:
        return True
    if now - beat > STALE_SECONDS:
        return True
    return holder.host == socket.gethostname() and holder.pid > 0 and not _alive(holder.pid)


class StageLock:
    """The lock of one stage directory, as a context manager."""

    def __init__(self, stage_directory: str):
        self.directory = stage_directory
        self.path = None if is_object_store(stage_directory) else \
            Path(absolute(stage_directory)) / LOCK_FILE
        self.holder = Holder(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    @property
    def enabled(self) -> bool:
        return self.path is not None

    def _create(self) -> bool:
        assert self.path is not None
        try:
            fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            json.dump(self.holder.__dict__, f)
        return True

    def acquire(self) -> None:
        """Take the lock, taking over a stale one; StageLocked when a live run holds it."""
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(3):
            if self._create():
                self._beat = threading.Thread(target=self._heartbeat, daemon=True)
                self._beat.start()
                return
            other = _read(self.path)
            if other is None:
                continue  # released between our create and our read: try again
            if not is_stale(self.path, other):
                raise StageLocked(f"stage directory {self.directory} is being run by "
                                  f"{other.describe()} (lock {self.path}); wait for it, or stop "
                                  "that run first")
            # Take over: move the stale lock aside; only one taker's rename succeeds.
            aside = self.path.with_name(f"{LOCK_FILE}.stale-{uuid.uuid4().hex}")
            try:
                os.rename(self.path, aside)
                aside.unlink(missing_ok=True)
            except FileNotFoundError:
                pass
        raise StageLocked(f"could not take the lock {self.path} (runs keep racing for it)")

    def _heartbeat(self) -> None:
        assert self.path is not None
        while not self._stop.wait(HEARTBEAT_SECONDS):
            try:
                os.utime(self.path)
            except FileNotFoundError:
                return

    def release(self) -> None:
        if self.path is None:
            return
        self._stop.set()
        if _read(self.path) == self.holder:  # never delete a lock someone took over
            self.path.unlink(missing_ok=True)

    def __enter__(self) -> StageLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
