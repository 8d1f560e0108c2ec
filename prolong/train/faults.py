"""Failure injection for recovery tests and drills.

``PROLONG_FAULT=step:N`` makes rank 0 fail right after step N; ``save:N`` while step N's checkpoint
is being written (shards on disk, not yet reported). It fires once per stage directory (a marker
file there remembers it), so the restarted run goes through. Set on the driver, it travels to the
workers with their environment (:func:`prolong.train.entry.worker_env`).
"""

from __future__ import annotations

import os

from prolong.stage.directory import StageDir

FAULT_ENV = "PROLONG_FAULT"
FIRED_MARKER = ".fault-fired"


class InjectedFault(RuntimeError):
    """Raised where PROLONG_FAULT asked for a failure."""


def maybe_fault(point: str, step: int, stage: StageDir, *, rank: int) -> None:
    """Raise InjectedFault when PROLONG_FAULT names this point and step (rank 0, once)."""
    if rank != 0 or os.environ.get(FAULT_ENV) != f"{point}:{step}":
        return
    if stage.exists(FIRED_MARKER):
        return
    stage.write_json(FIRED_MARKER, {"point": point, "step": step})
    raise InjectedFault(f"injected fault ({FAULT_ENV}={point}:{step})")
