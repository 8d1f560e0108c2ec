"""How many OpenMP threads a training worker may use: its own module, because the driver side
(entry.py, which builds the workers' env) and the worker side (loop.py) both need it and loop.py
is imported by entry.py."""

from __future__ import annotations

import os


def usable_threads(wanted: int, local_workers: int, available: int | None = None) -> int:
    """``wanted`` threads, at most this process's share of the cores it may run on (a GPU box
    with fewer cores than the spec's pods, e.g. a workstation): oversubscribed OpenMP threads
    spin against each other."""
    if available is None:
        available = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (
            os.cpu_count() or 1)
    return max(1, min(wanted, available // max(1, local_workers)))
