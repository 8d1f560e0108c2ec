"""Ulysses sequence parallelism (DeepSpeed ALST) wired to our model, groups and loss.

Four pieces, each a small function or object, applied to a plain HF causal LM:

1. :func:`apply_ulysses` wraps a registered core attention (ours: document-masked, see
   :mod:`prolong.model.attention`) in DeepSpeed's ``UlyssesSPAttentionHF`` and points the model at
   the wrapper. After the wrapper's all-to-all every SP rank holds the full sequence for
   H/SP query heads; it all-gathers ``position_ids`` over the SP group and hands them to the core
   function, which derives the document layout from them, so the mask is exactly the
   single-process one.

   We build ``UlyssesSPAttentionHF`` ourselves instead of calling
   ``UlyssesSPAttentionHF.register_with_transformers`` because that helper (a) creates a second
   set of SP groups in ``parallel_state_sp``'s module globals (and asserts if called twice in a
   process), while :class:`~prolong.parallel.dims.ParallelDims` already built ours, and (b)
   overwrites the core name in ``ALL_ATTENTION_FUNCTIONS``, so the plain function is gone from
   the process. The wrapper is the same as its ``uattn_wrapper``: drop any ``attention_mask``
   (HF built it for the local shard; ours is derived from position_ids) and call the module. It is
   registered under its own name, ``ulysses_<core>``, for which transformers builds no mask.

2. :class:`SequenceParallelMPU`, the ``mpu`` handed to ``deepspeed.initialize``: the interface of
   DeepSpeed's ``parallel_state_sp`` over our groups. DeepSpeed recognises an SP mpu by its
   ``initialize_sequence_parallel`` attribute; without it DeepSpeed would treat SP as tensor
   parallelism (model-parallel grad norm, ZeRO-3 partitioning over DP only). It must *not* have
   ``get_data_parallel_group``: ZeRO partitions and reduces over the "sequence data parallel"
   group (all DP x SP ranks), which is what we want for memory. Like ``parallel_state_sp`` it
   aliases "model parallel" to SP; DeepSpeed's BF16_Optimizer (ZeRO-1 + bf16) then skips every
   gradient on SP ranks > 0 and crashes, so the spec rejects that combination.

3. :func:`sp_shard`: the loader gives every SP rank the same full row with labels already
   shifted; each rank keeps its contiguous S/SP chunk of input_ids, shift_labels and position_ids.

4. The loss normalisation (:func:`grad_divisor`, :func:`loss_normalizer`,
   :func:`global_valid_tokens`). The step's loss is ``Σ_{valid tokens of the step} CE / N`` with
   N the valid-token count over all DP x SP ranks and micro-batches. Each rank's micro-batch
   contributes ``Σ_local CE / N``; under Ulysses the backward of rank r's term reaches the other
   SP ranks' activations through the all-to-all, so *summing* every rank's local gradient gives
   the exact gradient. DeepSpeed does not sum:

   - ``engine.backward`` divides the loss by the gradient-accumulation steps (GAS);
   - ZeRO-0/1/2 then all-reduce over DP x SP ranks and divide by ``world / SP`` = DP;
   - ZeRO-3 (coalesced reduce-scatter, the path ``reduce_scatter: true`` pins) divides by the
     full DP x SP.

   So each rank divides its summed CE by ``N / (GAS · D)`` with ``D`` = DP (ZeRO 0-2) or DP·SP
   (ZeRO-3): DeepSpeed's division by GAS·D then leaves exactly the sum. This is why ALST's
   documented pattern (all-gather the per-rank losses, weighted mean: every rank's loss is the
   whole SP group's) is SP x too large under ZeRO-1/2 and right under ZeRO-3, and a plain
   token-weighted mean is right under ZeRO-1/2 and SP x too small under ZeRO-3. It also avoids
   the differentiable all_gather entirely (its backward fails on gloo subgroups). The parity
   tests (tests/parallel/test_sp_parity.py) hold every accepted stage to a single process.

   N is all-reduced once per step, before the first micro-batch, from each rank's *local* chunks
   of all its micro-batches of the step (so every token is counted exactly once), over the world
   group. The logged loss is the all-reduced ``Σ CE`` over N (:func:`reduce_step_loss`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch

from prolong.data.packing import IGNORE_INDEX
from prolong.model.attention import DocumentLayout
from prolong.model.build import packed_lm_loss
from prolong.parallel.dims import ParallelGroups

SP_FIELDS = ("input_ids", "shift_labels", "position_ids")
"""Per-token fields of a packed row that are split over SP ranks."""


# --------------------------------------------------------------------------------------------
# The mpu
# --------------------------------------------------------------------------------------------

class SequenceParallelMPU:
    """DeepSpeed's ``parallel_state_sp`` interface over :class:`ParallelGroups`."""

    def __init__(self, groups: ParallelGroups) -> None:
        self.groups = groups

    def initialize_sequence_parallel(self, sequence_parallel_size: int) -> None:
        """Marker DeepSpeed looks for (``hasattr``); our groups are already built."""
        if sequence_parallel_size != self.groups.sp:
            raise ValueError(f"groups were built for SP {self.groups.sp}, not "
                             f"{sequence_parallel_size}")

    def get_sequence_parallel_group(self) -> Any:
        return self.groups.sp_group

    def get_sequence_parallel_world_size(self) -> int:
        return self.groups.sp

    def get_sequence_parallel_rank(self) -> int:
        return self.groups.sp_rank

    def get_sequence_data_parallel_group(self) -> Any:
        return self.groups.world_group

    def get_sequence_data_parallel_world_size(self) -> int:
        return self.groups.dims.world_size

    def get_sequence_data_parallel_rank(self) -> int:
        return self.groups.rank

    # parallel_state_sp aliases "model parallel" to SP (checkpoint file names use it).
    get_model_parallel_group = get_sequence_parallel_group
    get_model_parallel_world_size = get_sequence_parallel_world_size
    get_model_parallel_rank = get_sequence_parallel_rank


def deepspeed_mpu(groups: ParallelGroups) -> SequenceParallelMPU | None:
    """The ``mpu`` argument of ``deepspeed.initialize``: None without SP (DeepSpeed's default
    groups are then exactly data parallelism)."""
    return SequenceParallelMPU(groups) if groups.sp > 1 else None


# --------------------------------------------------------------------------------------------
# Attention
# --------------------------------------------------------------------------------------------

def ensure_deepspeed_comm() -> None:
    """Let ``deepspeed.comm`` (which ALST calls) wrap the already initialised torch.distributed
    world (Ray Train, torchrun or a test initialises it); idempotent."""
    import deepspeed
    import torch.distributed as dist

    if not dist.is_initialized():
        raise RuntimeError("torch.distributed must be initialised before wiring Ulysses")
    skip_cpu_shm_comm_build()
    deepspeed.init_distributed(dist_backend=dist.get_backend())


def skip_cpu_shm_comm_build() -> None:
    """On DeepSpeed's CPU accelerator, ``deepspeed.comm`` JIT-compiles a shared-memory all-reduce
    op (``deepspeed_shm_comm``) the first time it wraps the process group: 1-2 minutes of C++
    build on a 2-core machine, for a kernel only CPU *inference* all-reduce uses. Training over
    gloo never needs it, so on CPU the build is skipped (DeepSpeed then uses plain
    torch.distributed). No effect on GPU. Call before ``deepspeed.init_distributed`` /
    ``deepspeed.initialize``."""
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != "cpu":
        return
    import importlib

    # By module path: the attribute ``deepspeed.comm.torch`` is the torch package itself.
    ds_torch_comm = importlib.import_module("deepspeed.comm.torch")
    ds_torch_comm.build_shm_op = lambda: None


def ulysses_name(core_attn: str) -> str:
    return f"ulysses_{core_attn}"


def apply_ulysses(model: Any, groups: ParallelGroups, core_attn: str, *,
                  seq_length: int | None = None, micro_batch_size: int = 1) -> str:
    """Route ``model``'s attention through ``UlyssesSPAttentionHF`` around ``core_attn`` (a name
    registered with transformers' AttentionInterface). Returns the attn_implementation now set
    on the model (``core_attn`` itself when SP is 1: nothing to wrap).

    ``seq_length`` fixes the global row length (shape checks every layer); None lets it vary.
    """
    ensure_deepspeed_comm()
    if groups.sp == 1:
        model.set_attn_implementation(core_attn)
        return core_attn
    from deepspeed.runtime.sequence_parallel.ulysses_sp import UlyssesSPAttentionHF
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    if core_attn not in ALL_ATTENTION_FUNCTIONS:
        raise ValueError(f"attention {core_attn!r} is not registered with transformers")
    if seq_length is not None and seq_length % groups.sp:
        raise ValueError(f"sequence length {seq_length} is not divisible by SP {groups.sp}")
    cfg = model.config.get_text_config()
    uattn = UlyssesSPAttentionHF(
        attn=ALL_ATTENTION_FUNCTIONS[core_attn],
        batch_size=micro_batch_size,
        attn_head_count=cfg.num_attention_heads,
        attn_head_size=getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads,
        kv_head_count=cfg.num_key_value_heads,
        num_hidden_layers=cfg.num_hidden_layers,
        process_group=groups.sp_group,
        seq_length_is_variable=seq_length is None,
        local_seq_length=None if seq_length is None else seq_length // groups.sp,
        global_seq_length=seq_length,
    )
    uattn.core_attn_implementation = core_attn

    def ulysses_attention(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                          value: torch.Tensor, attention_mask: Any, *args: Any,
                          **kwargs: Any) -> tuple[torch.Tensor, Any]:
        # A mask built for the local shard is meaningless after the all-to-all; documents come
        # from the gathered position_ids.
        return uattn(module, query, key, value, None, *args, **kwargs)

    ulysses_attention.uattn = uattn  # type: ignore[attr-defined]  (for inspection in tests)
    name = ulysses_name(core_attn)
    AttentionInterface.register(name, ulysses_attention)
    model.set_attn_implementation(name)
    return name


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def sp_shard(row: Mapping[str, Any], sp_rank: int, sp: int,
             fields: Iterable[str] = SP_FIELDS) -> dict[str, Any]:
    """This SP rank's contiguous chunk ``[rank·S/SP, (rank+1)·S/SP)`` of each per-token field
    (``[B, S]`` tensors, split on the last dim); other entries are passed through. Labels must
    already be shifted over the full row."""
    fields = tuple(fields)
    missing = [f for f in fields if f not in row]
    if missing:
        raise KeyError(f"packed row lacks {', '.join(missing)}")
    seq = row[fields[0]].shape[-1]
    if sp < 1 or seq % sp or not 0 <= sp_rank < sp:
        raise ValueError(f"cannot give SP rank {sp_rank} of {sp} a chunk of a {seq}-token row")
    chunk = seq // sp
    out = dict(row)
    for f in fields:
        if row[f].shape[-1] != seq:
            raise ValueError(f"{f} has {row[f].shape[-1]} tokens, {fields[0]} {seq}")
        out[f] = row[f][..., sp_rank * chunk:(sp_rank + 1) * chunk]
    return out


# --------------------------------------------------------------------------------------------
# Loss normalisation
# --------------------------------------------------------------------------------------------

def grad_divisor(zero_stage: int, dp: int, sp: int) -> int:
    """What DeepSpeed 0.19 divides the summed gradients of all DP x SP ranks by (after its 1/GAS):
    DP for ZeRO 0-2 (it multiplies SP back in), DP x SP for ZeRO-3's reduce-scatter."""
    if zero_stage not in (0, 1, 2, 3):
        raise ValueError(f"unknown ZeRO stage {zero_stage}")
    return dp * sp if zero_stage == 3 else dp


def loss_normalizer(global_valid_tokens: float, *, zero_stage: int, dp: int, sp: int,
                    grad_accum_steps: int) -> float:
    """The ``normalizer`` each rank divides its summed CE by, so that after ``engine.backward``
    (x 1/GAS) and DeepSpeed's reduction (x 1/:func:`grad_divisor`) the gradient is exactly that
    of ``Σ CE / global_valid_tokens`` over the whole step."""
    if global_valid_tokens <= 0:
        raise ValueError("the step has no valid tokens (every label is -100)")
    return global_valid_tokens / (grad_accum_steps * grad_divisor(zero_stage, dp, sp))


def count_valid(shift_labels: torch.Tensor) -> torch.Tensor:
    """Valid (label != -100) tokens, as an int64 tensor on the labels' device (no host sync)."""
    return (shift_labels != IGNORE_INDEX).sum(dtype=torch.int64)


def global_valid_tokens(local_shift_labels: Iterable[torch.Tensor], group: Any = None) -> int:
    """Valid tokens of the whole step: this rank's local chunks of all its micro-batches, summed
    over ``group`` (the world: DP x SP). One all-reduce per step; call on every rank. The labels
    must be on the device the process group's backend communicates from (CUDA for NCCL)."""
    import torch.distributed as dist

    labels = list(local_shift_labels)
    if not labels:
        raise ValueError("no micro-batches")
    n = torch.stack([count_valid(x) for x in labels]).sum().reshape(1)
    if dist.is_initialized():
        dist.all_reduce(n, group=group)
    return int(n.item())


def reduce_step_loss(ce_sum: torch.Tensor | float, global_tokens: int, group: Any = None) -> float:
    """The step's token-mean loss for logging: this rank's summed CE over its micro-batches
    (a tensor on the backend's device), all-reduced over ``group`` (the world), divided by the
    global valid-token count."""
    import torch.distributed as dist

    t = torch.as_tensor(ce_sum).detach().to(torch.float64).reshape(1).clone()
    if dist.is_initialized():
        dist.all_reduce(t, group=group)
    return float(t.item()) / global_tokens


# --------------------------------------------------------------------------------------------
# The module DeepSpeed wraps
# --------------------------------------------------------------------------------------------

LossFn = Callable[..., tuple[torch.Tensor, torch.Tensor]]
"""``loss_fn(model, input_ids, position_ids, shift_labels, *, normalizer, **kw) -> (loss, n_valid)``:
decoder body + chunked CE summed over valid tokens / normalizer
(:func:`prolong.model.build.packed_lm_loss`)."""


class CausalLMWithLoss(torch.nn.Module):
    """A HF causal LM plus its chunked loss, as the one module ``deepspeed.initialize`` wraps: the
    decoder runs to the final hidden states and the LM head is applied chunk by chunk (no full
    logits). Keeping the LM-head call inside the engine's forward lets ZeRO-3's hooks gather its
    weight.

    forward returns ``(loss, ce_sum)``: ``loss`` for ``engine.backward`` and the detached summed
    CE of this micro-batch's valid tokens (for :func:`reduce_step_loss`).
    """

    def __init__(self, model: torch.nn.Module, loss_fn: LossFn | None = None,
                 **loss_kwargs: Any) -> None:
        super().__init__()
        self.model = model
        self.loss_fn = loss_fn or packed_lm_loss
        self.loss_kwargs = loss_kwargs

    def forward(self, input_ids: torch.Tensor, position_ids: torch.Tensor,
                shift_labels: torch.Tensor, normalizer: float,
                layout: DocumentLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        # layout: the full row's documents (prolong.model.attention.document_layout), computed
        # once per micro-batch so no layer pays the host syncs of deriving it.
        extra = {} if layout is None else {"layout": layout}
        loss, _ = self.loss_fn(self.model, input_ids, position_ids, shift_labels,
                               normalizer=normalizer, **self.loss_kwargs, **extra)
        return loss, loss.detach() * normalizer
