"""Worker logs in the stage directory: ``<stage dir>/logs/<name>.log``.

A training worker (or an eval shard) writes everything it prints -- Python logging, Ray Train's
per-report lines, DeepSpeed's and gloo's C++ output, child processes -- into one file per rank
instead of the driver's console, so the console keeps to the stage lines, the progress bar and the
summary. ``prolongctl run --verbose`` keeps the old behaviour (output on the console through Ray).

The redirection works on file descriptors 1 and 2 (not just ``sys.stdout``), which is what catches
native libraries' output. It applies to local stage directories; on an object store the output
stays where Ray keeps it (the node's Ray session logs), as nothing can be appended there.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from prolong.stage.uri import absolute, is_object_store

LOGS_DIR = "logs"
LOG_MODE_ENV = "PROLONG_WORKER_LOGS"
"""``files`` (the default: logs/ in the stage directory) or ``console`` (Ray forwards them)."""


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


@contextmanager
def stage_output(stage_directory: str, name: str) -> Iterator[Path | None]:
    """Inside a worker: its output goes to ``<stage dir>/logs/<name>.log`` (unless logs go to the
    console, or the stage directory is on an object store). Yields the log file, or None."""
    where = logs_dir(stage_directory)
    if where is None or not logs_to_files():
        yield None
        return
    with output_to(where / f"{name}.log") as path:
        yield path
