"""The memory settings of ``parallelism.memory`` that act on the model: TiledMLP and activation
offload. (The loss chunk goes to the chunked loss, the allocator setting to the workers' env.)

**TiledMLP** (DeepSpeed ALST, ``deepspeed.runtime.sequence_parallel.ulysses_sp.TiledMLP``): a
decoder layer's gated MLP holds three ``tokens x intermediateSize`` tensors (gate, up, their
product) -- at 65,536 local tokens of Llama-3-8B that is 5.25 GiB in bf16, the largest transient
of a 512K step. TiledMLP runs the MLP over ``shards`` slices of the sequence under no_grad, keeps
only its input, and recomputes one slice at a time in the backward, so one slice's intermediates
exist at once. The MLP is applied per token, so tiling changes nothing but float summation order
in the weight gradients (tests/model/test_memory_knobs.py holds it to 1e-5).

We patch each MLP *instance* (``module.forward``), not the ``LlamaMLP`` class as ALST's docstring
example does: the class is shared by every model in the process (the tests build tiled and plain
models side by side). ZeRO-3's hooks sit on the projections and fire for every slice, so every
rank must run the same number of slices or the parameter gathers deadlock; ALST all-reduces the
slice count for that. We need no collective: every row is ``sequenceLength`` tokens and every SP
rank holds ``sequenceLength / SP`` of them, so the count derived from the shape agrees everywhere.

**Activation offload**: transformers' ``activation_checkpointing_enable(offload=True)`` wraps each
checkpointed layer in ``torch.autograd.graph.save_on_cpu(pin_memory=True)``, so the layer inputs
that non-reentrant checkpointing saves for the recompute live in host memory. On a CPU worker it
is a host-to-host copy (it works, and saves nothing).
"""

from __future__ import annotations

import math
import types
from typing import Any

import torch

from prolong.model.build import enable_activation_checkpointing
from prolong.spec import ParallelismSpec

_PROJECTIONS = ("gate_proj", "up_proj", "down_proj")


def auto_tiles(tokens: int, hidden_size: int) -> int:
    """ALST's default slice count: one slice per ``hidden_size`` tokens, so each slice's
    intermediate is about ``hidden x intermediate`` elements, the size of one weight matrix."""
    return max(1, math.ceil(tokens / hidden_size))


def gated_mlps(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The Llama-style gated MLPs of ``model`` (modules with gate/up/down projections)."""
    return [m for m in model.modules() if all(hasattr(m, p) for p in _PROJECTIONS)
            and hasattr(m, "act_fn")]


def _plain_forward(mlp: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    # The class's own forward: the instance attribute is the tiled one.
    return type(mlp).forward(mlp, x)


def _tiled_forward(self: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from deepspeed.runtime.sequence_parallel.ulysses_sp import TiledMLP

    shards = self.prolong_tiles or auto_tiles(x.shape[-2], x.shape[-1])
    shards = min(shards, x.shape[-2])
    if shards == 1:
        return _plain_forward(self, x)
    # DeepSpeed's ZeRO reduces these parameters' gradients only after the last slice's backward
    # (TiledMLP marks them ds_grad_is_ready for that).
    params = [p for name in _PROJECTIONS for p in getattr(self, name).parameters()]
    return TiledMLP.apply(_plain_forward, self, x, shards, params)


def tile_mlps(model: torch.nn.Module, shards: int | None = None) -> int:
    """Route every gated MLP of ``model`` through TiledMLP with ``shards`` slices (None: auto,
    :func:`auto_tiles` of the tokens each call sees). Returns how many MLPs were tiled; a model
    without gated MLPs is an error (the setting would silently do nothing)."""
    mlps = gated_mlps(model)
    if not mlps:
        raise ValueError(f"tiledMlp: {type(model).__name__} has no gated MLP "
                         f"({'/'.join(_PROJECTIONS)}) to tile")
    for mlp in mlps:
        mlp.prolong_tiles = shards
        mlp.forward = types.MethodType(_tiled_forward, mlp)
    return len(mlps)


def apply_memory_settings(model: Any, parallelism: ParallelismSpec) -> None:
    """What ``parallelism.memory`` changes in a built model (the train loop calls this before
    handing the model to DeepSpeed): activation offload and TiledMLP."""
    memory = parallelism.memory
    if memory.activation_offload or memory.save_attention:
        if not parallelism.activation_checkpointing:  # the spec rules refuse this first
            raise ValueError("parallelism.memory.activationOffload and saveAttention need "
                             "activationCheckpointing")
        # Re-enabled with offload / selective saving: build_model enabled plain checkpointing,
        # and enabling again would add a second input-grad hook to the embeddings.
        model.disable_input_require_grads()
        enable_activation_checkpointing(model, offload=memory.activation_offload,
                                        save_attention=memory.save_attention)
    if memory.tiled_mlp:
        tile_mlps(model, memory.tiled_mlp_shards)
