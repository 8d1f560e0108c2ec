"""One run of a stage at a time: ``<stage dir>/.lock``.

``prolongctl run`` holds the lock of each stage while it runs it, so a second run of the same stage
(another terminal, a CI job, a person) refuses at once and says who holds it, instead of two Ray
Train runs writing into one directory.

- The lock is a small JSON file (host, pid, start time, a random token) created with
  ``O_CREAT | O_EXCL``: of two runs starting together, exactly one creates it.
- The holder refreshes its modification time every :data:`HEARTBEAT_SECONDS` (a daemon thread).
- A lock is *stale* when its holder is on this host and its process is gone, or when its
  heartbeat is older than :data:`STALE_SECONDS`. A stale lock is taken over: it is renamed away
  (atomic; of two runs taking it over, one wins the rename) and created afresh.
- A holder on this host whose process lives: the run refuses at once. A holder on another host
  (another pod: the operator's retry of a stage runs in a new one, maybe seconds after the old
  pod died) cannot be asked: the run watches the heartbeat instead, refusing as soon as it
  moves (the holder lives) and taking over once it is stale (the holder died).
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
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong.stage.uri import absolute, is_object_store

LOCK_FILE = ".lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 180.0
POLL_SECONDS = 5.0


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


def _beat_of(path: Path) -> float | None:
    try:
        return path.stat().st_mtime
    except FileNotFoundError:
        return None


class StageLock:
    """The lock of one stage directory, as a context manager. The timings are parameters so that
    a test can use short ones; runs use the module's defaults."""

    def __init__(self, stage_directory: str, *, heartbeat_seconds: float = HEARTBEAT_SECONDS,
                 stale_seconds: float = STALE_SECONDS, poll_seconds: float = POLL_SECONDS,
                 on_wait: Callable[[str], None] | None = None):
        self.directory = stage_directory
        self.path = None if is_object_store(stage_directory) else \
            Path(absolute(stage_directory)) / LOCK_FILE
        self.holder = Holder(socket.gethostname(), os.getpid(), time.time(), uuid.uuid4().hex)
        self.heartbeat_seconds = heartbeat_seconds
        self.stale_seconds = stale_seconds
        self.poll_seconds = poll_seconds
        self.on_wait = on_wait
        self._stop = threading.Event()
        self._beat: threading.Thread | None = None

    def is_stale(self, holder: Holder) -> bool:
        """Whether a lock's holder is gone: no heartbeat for stale_seconds, or its process on
        this host has exited."""
        assert self.path is not None
        beat = _beat_of(self.path)
        if beat is None or time.time() - beat > self.stale_seconds:
            return True
        return holder.host == socket.gethostname() and holder.pid > 0 and not _alive(holder.pid)

    def _holder_lives(self, other: Holder) -> bool:
        """True when the holder is alive; False once its lock is stale (or gone)."""
        assert self.path is not None
        if self.is_stale(other):
            return False
        if other.host == socket.gethostname():
            return True  # its process exists (is_stale checked)
        first = _beat_of(self.path)
        if self.on_wait is not None:
            self.on_wait(f"stage directory {self.directory} is locked by {other.describe()}; "
                         f"waiting up to {self.stale_seconds:.0f} s to see whether it still runs")
        while True:
            time.sleep(self.poll_seconds)
            beat = _beat_of(self.path)
            if beat is None or self.is_stale(other):
                return False
            if beat != first or _read(self.path) != other:
                return True  # its heartbeat moved (or someone else holds it now)

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
            if self._holder_lives(other):
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
        while not self._stop.wait(self.heartbeat_seconds):
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
