"""Worker logs in the stage directory: ``<stage dir>/logs/<name>.log``.

A training worker (or an eval shard) writes everything it prints -- Python logging, Ray Train's
per-report lines, DeepSpeed's and gloo's C++ output, child processes -- into one file per rank
instead of the driver's console, so the console keeps to the stage lines, the progress bar and the
summary. ``prolongctl run --verbose`` keeps the old behaviour (output on the console through Ray).

The redirection works on file descriptors 1 and 2 (not just ``sys.stdout``), which is what catches
native libraries' output. It applies to local stage directories; on an object store the output
stays where Ray keeps it (the node's Ray session logs), as nothing can be appended there.

On Kubernetes the log file is also copied, line by line and prefixed with the worker's name, to
the pod's own stdout (``$PROLONG_WORKER_TEE``, which the rendered pods set to ``/proc/1/fd/1``:
the container's first process, whose output the kubelet collects), so that ``kubectl logs`` and
the cluster's log collection see training too. The file stays the primary sink (written through
the file descriptors, so a crash loses nothing of it); a thread follows it for the copy.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prolong.stage.uri import absolute, is_object_store

LOGS_DIR = "logs"
LOG_MODE_ENV = "PROLONG_WORKER_LOGS"
"""``files`` (the default: logs/ in the stage directory) or ``console`` (Ray forwards them)."""
TEE_ENV = "PROLONG_WORKER_TEE"
"""A path that a worker's log is also copied to (the rendered pods: ``/proc/1/fd/1``)."""
POD_STDOUT = "/proc/1/fd/1"
TEE_INTERVAL = 0.5
"""Seconds between two looks at the log file for new output to copy."""


def logs_dir(stage_directory: str) -> Path | None:
    """``<stage dir>/logs`` for a local stage directory; None on an object store."""
    if is_object_store(stage_directory):
        return None
    return Path(absolute(stage_directory)) / LOGS_DIR


def logs_to_files() -> bool:
    return os.environ.get(LOG_MODE_ENV, "files") != "console"


@contextmanager
def output_to(path: Path) -> Iterator[Path]:
    """Send this process's stdout and stderr (fds 1 and 2) to ``path``, appended, until exit."""
    path.parent.mkdir(parents=True, exist_ok=True)
    sys.stdout.flush()
    sys.stderr.flush()
    saved = (os.dup(1), os.dup(2))
    streams = (sys.stdout, sys.stderr)
    try:
        with open(path, "a", buffering=1, encoding="utf-8", errors="replace") as sink:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            # The Python streams too: they may not be fds 1 and 2 (a test runner's capture).
            sys.stdout = sys.stderr = sink
            try:
                yield path
            finally:
                sink.flush()
                sys.stdout, sys.stderr = streams
                os.dup2(saved[0], 1)
                os.dup2(saved[1], 2)
    finally:
        os.close(saved[0])
        os.close(saved[1])


class _Follower:
    """Copies what is appended to a log file, from where it ended when started, to ``target``
    (each line prefixed ``[name] ``), in a thread, until stopped (then once more)."""

    def __init__(self, path: Path, target: str, name: str) -> None:
        self.path, self.target, self.prefix = path, target, f"[{name}] ".encode()
        self.offset = path.stat().st_size if path.exists() else 0
        self.partial = b""
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name=f"tee-{name}", daemon=True)

    def __enter__(self) -> _Follower:
        # Non-blocking: a pod stdout nobody drains must never stall training (a chunk that does
        # not fit is dropped there; the file has it).
        self.out = os.open(self.target, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NONBLOCK,
                           0o644)
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop.set()
        self.thread.join(timeout=10)
        self.copy(final=True)
        os.close(self.out)

    def _run(self) -> None:
        while not self.stop.wait(TEE_INTERVAL):
            self.copy()

    def copy(self, final: bool = False) -> None:
        try:
            with open(self.path, "rb") as f:
                f.seek(self.offset)
                data = f.read()
        except OSError:
            return
        self.offset += len(data)
        lines = (self.partial + data).split(b"\n")
        self.partial = lines.pop()  # an unfinished line waits for its end
        if final and self.partial:
            lines.append(self.partial)
            self.partial = b""
        text = b"".join(self.prefix + line + b"\n" for line in lines)
        if text:
            with contextlib.suppress(OSError):  # the pod's stdout gone: the file has it all
                os.write(self.out, text)


@contextmanager
def stage_output(stage_directory: str, name: str) -> Iterator[Path | None]:
    """Inside a worker: its output goes to ``<stage dir>/logs/<name>.log`` (unless logs go to the
    console, or the stage directory is on an object store), and is copied to $PROLONG_WORKER_TEE
    when set. Yields the log file, or None."""
    where = logs_dir(stage_directory)
    if where is None or not logs_to_files():
        yield None
        return
    with output_to(where / f"{name}.log") as path:
        tee = os.environ.get(TEE_ENV)
        if not tee:
            yield path
            return
        try:
            follower = _Follower(path, tee, name).__enter__()
        except OSError as exc:  # no pod stdout to write to: the file alone
            print(f"prolong: not copying this log to {tee}: {exc}", flush=True)
            yield path
            return
        try:
            yield path
        finally:
            sys.stdout.flush()
            follower.__exit__()
