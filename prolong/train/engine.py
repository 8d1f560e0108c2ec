"""The DeepSpeed engine of a training stage: the one builder the worker and the parity tests use.

:func:`build_engine` takes a plain model (built and, for SP > 1, already routed through Ulysses by
:func:`prolong.parallel.ulysses.apply_ulysses`), wraps it with its chunked loss, builds our torch
AdamW and the LR schedule, and hands all of it to ``deepspeed.initialize`` with the config
:func:`prolong.parallel.deepspeed_config.deepspeed_config` writes for the spec and the parallel
degrees. Because the SP parity tests call this same function, a config the trainer cannot start
(as ``offloadOptimizer`` once was) fails a test.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from prolong.parallel.deepspeed_config import build_optimizer, deepspeed_config
from prolong.parallel.dims import ParallelGroups
from prolong.parallel.ulysses import CausalLMWithLoss, deepspeed_mpu
from prolong.spec import TrainSpec
from prolong.train.schedule import build_scheduler


@dataclass
class Engine:
    """What :func:`build_engine` returns."""

    engine: Any
    """The ``deepspeed.DeepSpeedEngine`` around the model and its loss."""
    scheduler: torch.optim.lr_scheduler.LRScheduler
    """The LR schedule (DeepSpeed steps it after every optimizer step)."""
    config: dict[str, Any]
    """The DeepSpeed config it was built with."""


def build_engine(model: torch.nn.Module, spec: TrainSpec, groups: ParallelGroups, *,
                 load_universal: bool = False, **loss_kwargs: Any) -> Engine:
    """DeepSpeed ZeRO around ``model`` for one stage. ``load_universal``: the engine will load a
    universal checkpoint (DeepSpeed reads the switch from its config, ``checkpoint.load_universal``,
    when ``load_checkpoint`` runs; see :mod:`prolong.train.reshape`). ``loss_kwargs`` go to the
    chunked loss (``chunk_tokens``, ``checkpoint``; the defaults are the trainer's)."""
    # Imported here: importing deepspeed fixes its accelerator from DS_ACCELERATOR, which only a
    # worker's environment sets.
    import deepspeed

    wrapped = CausalLMWithLoss(model, **loss_kwargs)
    config = deepspeed_config(spec, groups.dims)
    if load_universal:
        config["checkpoint"] = {"load_universal": True}
    optimizer = build_optimizer(wrapped, spec)
    scheduler = build_scheduler(optimizer, spec.schedule, spec.total_steps)
    engine, _, _, scheduler = deepspeed.initialize(
        model=wrapped, optimizer=optimizer, lr_scheduler=scheduler, config=config,
        mpu=deepspeed_mpu(groups))
    return Engine(engine, scheduler, config)
