"""Learning-rate schedule: linear warmup, then cosine, linear or constant to a floor.

Conventions (those of transformers' ``get_cosine_schedule_with_warmup`` with a minimum-LR ratio,
which ProLong's Trainer-based runs used):

- ``lr_at(step)`` is the learning rate of the optimizer update with 0-based index ``step``:
  the scheduler is stepped after each ``optimizer.step()``.
- Warmup rises linearly from 0 at step 0 to ``peak_lr`` at step ``warmup`` (so the first update
  has LR 0 when there is any warmup; that update still advances Adam's moments).
- After warmup, progress p = (step - warmup) / (total - warmup) runs from 0 to 1 and the LR goes
  from ``peak_lr`` to the floor: cosine ``floor + (peak - floor)·½(1 + cos πp)``, linear
  ``floor + (peak - floor)(1 - p)``, or stays at ``peak_lr`` (constant).
- Steps past ``total`` stay at the floor.

ProLong stage 1 (5000 steps, warmupRatio 0.1, peak 1e-5, minLRRatio 0.1): 0 at step 0, 5e-6 at
250, 1e-5 at 500, 5.5e-6 at 2750, 1e-6 at 5000.

Stage 2 restarts the schedule (ProLong continues the AdamW state with a fresh schedule), so a
schedule never depends on earlier stages. :func:`build_scheduler` returns a
``torch.optim.lr_scheduler.LambdaLR`` whose state dict (``last_epoch``) is what checkpoints save.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from prolong.spec import ScheduleSpec


def lr_at(step: int, schedule: ScheduleSpec, total_steps: int) -> float:
    """Learning rate of the update with 0-based index ``step`` out of ``total_steps``."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    peak, floor = schedule.peak_lr, schedule.floor_lr
    warmup = schedule.warmup_steps_for(total_steps)
    if warmup and warmup >= total_steps:
        # The job rules reject this (warmup must be shorter than the run); guard direct callers.
        raise ValueError(f"warmup ({warmup} steps) must be shorter than the run ({total_steps})")
    if step < warmup:
        return peak * step / warmup
    if schedule.decay == "constant":
        return peak
    decay_steps = max(1, total_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    if schedule.decay == "cosine":
        return floor + (peak - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    return floor + (peak - floor) * (1.0 - progress)


def lr_lambda(schedule: ScheduleSpec, total_steps: int) -> Callable[[int], float]:
    """Multiplier of ``peak_lr`` per step, as ``LambdaLR`` wants it."""
    lr_at(0, schedule, total_steps)  # validate once, up front
    peak = schedule.peak_lr
    return lambda step: lr_at(step, schedule, total_steps) / peak


def build_scheduler(optimizer: torch.optim.Optimizer, schedule: ScheduleSpec,
                    total_steps: int) -> torch.optim.lr_scheduler.LambdaLR:
    """A ``LambdaLR`` following :func:`lr_at`. Sets every param group's base LR to ``peak_lr``
    (so the optimizer's own ``lr`` argument does not matter) before the scheduler applies step 0."""
    for group in optimizer.param_groups:
        group["lr"] = schedule.peak_lr
        group.pop("initial_lr", None)
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(schedule, total_steps))
