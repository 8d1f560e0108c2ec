"""One run of a stage at a time: the stage directory's lock."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time

import pytest

from prolong.stage import lock as L
from prolong.stage.lock import LOCK_FILE, StageLock, StageLocked


def _write_lock(directory, *, host: str, pid: int, age: float = 0.0) -> None:
    path = directory / LOCK_FILE
    directory.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"host": host, "pid": pid, "started": time.time() - age,
                                "token": "t"}))
    os.utime(path, (time.time() - age, time.time() - age))


def _dead_pid() -> int:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_held_while_running_and_gone_after(tmp_path):
    d = tmp_path / "p" / "s-1"
    with StageLock(str(d)):
        held = json.loads((d / LOCK_FILE).read_text())
        assert held["pid"] == os.getpid()
    assert not (d / LOCK_FILE).exists()


def test_a_second_run_refuses_and_says_who_holds_it(tmp_path):
    d = tmp_path / "s-1"
    with StageLock(str(d)), pytest.raises(StageLocked, match=rf"pid {os.getpid()} on .* since"):
        StageLock(str(d)).acquire()


def test_a_dead_holder_on_this_host_is_taken_over(tmp_path):
    import socket

    d = tmp_path / "s-1"
    _write_lock(d, host=socket.gethostname(), pid=_dead_pid())
    with StageLock(str(d)) as lock:
        assert json.loads((d / LOCK_FILE).read_text())["token"] == lock.holder.token


def test_a_live_holder_elsewhere_is_seen_by_its_heartbeat(tmp_path):
    """Another pod holds the stage and its heartbeat moves: the run refuses (after seeing it move,
    not after the whole stale period)."""
    d = tmp_path / "s-1"
    _write_lock(d, host="another-pod", pid=1)
    stop = threading.Event()

    def beat() -> None:
        while not stop.wait(0.05):
            os.utime(d / LOCK_FILE)

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    waits: list[str] = []
    start = time.monotonic()
    try:
        with pytest.raises(StageLocked, match="another-pod"):
            StageLock(str(d), stale_seconds=30, poll_seconds=0.2, on_wait=waits.append).acquire()
    finally:
        stop.set()
        thread.join()
    assert time.monotonic() - start < 5 and waits and "another-pod" in waits[0]


def test_a_silent_holder_elsewhere_is_taken_over_once_stale(tmp_path):
    """A pod that died a moment ago (its lock fresh, its heartbeat stopped): the retry waits for
    the lock to go stale, then takes it over."""
    d = tmp_path / "s-1"
    _write_lock(d, host="another-pod", pid=1)
    start = time.monotonic()
    with StageLock(str(d), stale_seconds=0.6, poll_seconds=0.05):
        assert json.loads((d / LOCK_FILE).read_text())["host"] != "another-pod"
    assert time.monotonic() - start >= 0.5
    _write_lock(d, host="another-pod", pid=1, age=L.STALE_SECONDS + 5)  # long silent: at once
    with StageLock(str(d), poll_seconds=60):
        assert json.loads((d / LOCK_FILE).read_text())["host"] != "another-pod"


def test_release_never_removes_a_lock_taken_over_by_another_run(tmp_path):
    d = tmp_path / "s-1"
    first = StageLock(str(d))
    first.acquire()
    _write_lock(d, host="another-pod", pid=1)  # as if it had been taken over
    first.release()
    assert json.loads((d / LOCK_FILE).read_text())["host"] == "another-pod"


def test_object_store_stages_are_not_locked():
    assert not StageLock("s3://bucket/p/s-1").enabled
