"""One optimizer step of a DeepSpeed engine over packed rows: the protocol the parity tests hold
to a single process (tests/parallel/test_sp_parity.py), for the train loop to call as is.

Order matters, and two parts of it are easy to get wrong:

1. The global valid-token count N is all-reduced *before* the first micro-batch (every rank's
   local chunks of all its micro-batches, over the DP x SP world), because every micro-batch's
   loss is divided by it (:func:`prolong.parallel.ulysses.loss_normalizer`).
2. ``engine.step()`` is called after **every** micro-batch, not once per step: DeepSpeed counts
   micro-steps in ``step()`` and decides from that count whether a ``backward`` is at the
   accumulation boundary (where it reduces gradients) and whether ``step()`` updates the weights.
   Calling it once after GAS backwards reduces nothing and updates nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from prolong.model.attention import document_layout
from prolong.parallel.dims import ParallelGroups
from prolong.parallel.ulysses import (
    SP_FIELDS,
    global_valid_tokens,
    loss_normalizer,
    reduce_step_loss,
    sp_shard,
)


@dataclass(frozen=True)
class StepResult:
    loss: float
    """Token-mean loss of the step over every rank and micro-batch (what ProLong logs)."""
    valid_tokens: int
    """N: valid (label != -100) tokens of the step, all ranks."""
    grad_norm: float | None
    """Global gradient norm before clipping, as DeepSpeed reports it (None under ZeRO-0)."""


def _fields(row: Mapping[str, Any] | Any) -> dict[str, torch.Tensor]:
    """A packed row as a dict of its per-token fields (a mapping or a prolong.data MicroBatch)."""
    if isinstance(row, Mapping):
        return {f: row[f] for f in SP_FIELDS}
    return {f: getattr(row, f) for f in SP_FIELDS}


def train_step(engine: Any, rows: Sequence[Mapping[str, Any] | Any], groups: ParallelGroups, *,
               before_update: Callable[[], None] | None = None,
               normalizer: Callable[..., float] = loss_normalizer) -> StepResult:
    """Run one optimizer step of ``engine`` (from ``deepspeed.initialize`` around a
    :class:`~prolong.parallel.ulysses.CausalLMWithLoss`) over this rank's ``rows``.

    ``rows``: the full packed rows of this data-parallel replica for the step (every SP rank of
    the replica passes the same rows), one per micro-batch, labels already shifted, in the order
    to run them. ``before_update`` runs after the last backward, when the reduced gradients are
    readable (``deepspeed.utils.safe_get_full_grad``), and before the weights change.
    ``normalizer`` is injectable for the tests' negative control only.
    """
    gas = engine.gradient_accumulation_steps()
    if len(rows) != gas:
        raise ValueError(f"the engine accumulates {gas} micro-batches per step, got {len(rows)} rows")
    device = getattr(engine, "device", None)
    local, layouts = [], []
    for row in rows:
        fields = _fields(row)
        shard = sp_shard(fields, groups.sp_rank, groups.sp)
        local.append({k: v.to(device, non_blocking=True) if device is not None else v
                      for k, v in shard.items()})
        # The documents of the full row (what attention sees after Ulysses' all-to-all), once
        # per micro-batch: its two host syncs are then not paid again in every layer.
        full_pos = fields["position_ids"]
        layouts.append(document_layout(full_pos.to(device) if device is not None else full_pos))
    n_global = global_valid_tokens([b["shift_labels"] for b in local], groups.world_group)
    norm = normalizer(n_global, zero_stage=engine.zero_optimization_stage(), dp=groups.dp,
                           sp=groups.sp, grad_accum_steps=gas)
    ce_sum = torch.zeros((), dtype=torch.float64, device=local[0]["shift_labels"].device)
    for i, b in enumerate(local):
        loss, ce = engine(input_ids=b["input_ids"], position_ids=b["position_ids"],
                          shift_labels=b["shift_labels"], normalizer=norm, layout=layouts[i])
        engine.backward(loss)
        ce_sum += ce.detach().double()
        last = i == gas - 1
        if engine.is_gradient_accumulation_boundary() != last:
            raise RuntimeError("DeepSpeed's micro-step count is out of step with this loop (was "
                               "engine.step() skipped, or backward called outside train_step?)")
        if last and before_update is not None:
            before_update()
        engine.step()
    grad_norm = engine.get_global_grad_norm()
    loss = reduce_step_loss(ce_sum, n_global, groups.world_group)
    return StepResult(loss=loss, valid_tokens=n_global,
                      grad_norm=None if grad_norm is None else float(grad_norm))
