"""Token-averaged causal-LM loss, computed in chunks of the sequence.

**Normalisation.** ProLong averages the loss over every valid token of an optimizer step, not over
micro-batches: a micro-batch with 10 valid tokens must weigh a tenth of one with 100. So each call
returns ``Σ CE(valid tokens of this micro-batch) / normalizer``, where the caller passes the
*global* valid-token count of the step (all data- and sequence-parallel ranks, all micro-batches).
Summing these over every micro-batch and rank gives the step's token mean. How that sum relates
to what DeepSpeed does with gradients (averaging over data-parallel ranks, dividing by gradient
accumulation steps, ZeRO-3 vs ZeRO-1/2 under Ulysses) is the train loop's business, settled by a
parity test against a single process; this module only computes the local term.

**Chunking.** The logits of a 512K-token row (x 128K vocabulary, fp32) would take 256 GiB. The
hidden states are split along the sequence into chunks of ``chunk_tokens``; each chunk is
projected by the LM head, reduced to a summed cross-entropy and dropped. With ``checkpoint=True``
each chunk runs under non-reentrant ``torch.utils.checkpoint``, so the backward recomputes one
chunk's logits at a time too: peak memory is one chunk of logits instead of S of them, for the
price of a second LM-head matmul per chunk. Without it the forward is still chunked but autograd
keeps every chunk's logits for the backward (fine for tests and short rows).

**Labels** are already shifted (``shift_labels[t]`` is the target of position t; -100 marks
tokens without a target: each document's first token, masked tokens). The LM head can be given as
a module (preferred: under ZeRO-3 its forward hook gathers the partitioned weight, as ALST's
``TiledFusedLogitsLoss`` also relies on) or as a bare weight tensor.

Cross-entropy is taken in at least float32 (bf16 logits are upcast per chunk; float64 stays
float64 so the tests can compare tightly).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint as _checkpoint

from prolong.data.packing import IGNORE_INDEX


def count_valid_tokens(shift_labels: torch.Tensor) -> int:
    """Tokens with a target (labels != -100). Sum this over the step's micro-batches and ranks to
    get the ``normalizer``."""
    return int((shift_labels != IGNORE_INDEX).sum())


def _project(hidden: torch.Tensor, lm_head: torch.nn.Module | torch.Tensor) -> torch.Tensor:
    if isinstance(lm_head, torch.Tensor):
        return F.linear(hidden, lm_head)
    return lm_head(hidden)


def _chunk_ce_sum(hidden: torch.Tensor, labels: torch.Tensor,
                  lm_head: torch.nn.Module | torch.Tensor) -> torch.Tensor:
    logits = _project(hidden, lm_head)
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def chunked_lm_loss(hidden: torch.Tensor, lm_head: torch.nn.Module | torch.Tensor,
                    shift_labels: torch.Tensor, *, normalizer: float, chunk_tokens: int = 8192,
                    checkpoint: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy of the valid tokens divided by ``normalizer``.

    hidden ``[B, S, Hd]`` (final-norm output of the decoder), ``lm_head`` an ``nn.Module`` mapping
    Hd -> V or a weight ``[V, Hd]``, shift_labels ``[B, S]``. ``chunk_tokens`` is the number of
    sequence positions per chunk (a last, shorter chunk takes the remainder). Returns the scalar
    loss and this call's number of valid tokens (a tensor: counting it needs no host sync).
    """
    if hidden.shape[:2] != shift_labels.shape:
        raise ValueError(f"hidden {tuple(hidden.shape)} and labels {tuple(shift_labels.shape)} "
                         "must agree on [B, S]")
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}")
    if not normalizer > 0:
        raise ValueError(f"normalizer must be a positive token count, got {normalizer}")
    # split() has one backward that concatenates the chunk gradients, instead of one full-size
    # zero tensor per chunk as slicing would give.
    total = None
    for h_chunk, y_chunk in zip(hidden.split(chunk_tokens, dim=1),
                                shift_labels.split(chunk_tokens, dim=1), strict=True):
        if checkpoint and torch.is_grad_enabled():
            part = _checkpoint(_chunk_ce_sum, h_chunk, y_chunk, lm_head, use_reentrant=False)
        else:
            part = _chunk_ce_sum(h_chunk, y_chunk, lm_head)
        total = part if total is None else total + part
    n_valid = (shift_labels != IGNORE_INDEX).sum()
    return total / normalizer, n_valid
