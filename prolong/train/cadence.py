"""When a training stage saves a checkpoint: every ``checkpoint.everySteps`` steps, at the last
step, and with ``checkpoint.everyMinutes`` at the first step ending that long after the last save.

Every rank must save at the same step (a DeepSpeed save is collective: a rank that saves alone
waits forever for the others), but ranks finish a step at slightly different times and their
clocks differ. So the time rule is decided once, on rank 0's clock, and broadcast as one integer
to every rank each step (a few microseconds against a step of seconds to minutes); the step rule
needs no communication. :class:`CheckpointClock` takes the broadcast as a function, so the tests
drive it over gloo and a single process needs none.
"""

from __future__ import annotations

import time
from collections.abc import Callable

Broadcast = Callable[[int], int]
"""Sends rank 0's value to every rank and returns it (identity on a single process)."""


class CheckpointClock:
    """``due(step)``: whether ``step`` is saved, the same answer on every rank."""

    def __init__(self, every_steps: int, total_steps: int, every_minutes: float | None = None,
                 *, broadcast: Broadcast | None = None,
                 now: Callable[[], float] = time.monotonic) -> None:
        self.every_steps, self.total_steps = every_steps, total_steps
        self.every_seconds = None if every_minutes is None else every_minutes * 60.0
        self.broadcast = broadcast or (lambda value: value)
        self.now = now
        self.last_save = now()

    def due(self, step: int) -> bool:
        by_steps = step % self.every_steps == 0 or step == self.total_steps
        if self.every_seconds is not None:
            # Every rank takes part in the broadcast every step, whatever its own clock says.
            late = int(self.now() - self.last_save >= self.every_seconds)
            by_time = bool(self.broadcast(late))
        else:
            by_time = False
        if by_steps or by_time:
            self.last_save = self.now()
            return True
        return False


def torch_broadcast(device: object = "cpu", group: object = None) -> Broadcast:
    """Rank 0's integer to every rank of ``group`` (the default group: all ranks) through
    torch.distributed; identity when it is not initialised (one process)."""
    import torch
    import torch.distributed as dist

    def send(value: int) -> int:
        if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
            return value
        box = torch.tensor([value], dtype=torch.int64, device=device)
        dist.broadcast(box, src=0, group=group)
        return int(box.item())

    return send
