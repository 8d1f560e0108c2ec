"""CPU stand-ins for the CUDA attention kernels, with the real signatures.

Each stand-in has the exact signature of the kernel it replaces (cited below), checks the calling
convention the way the kernel would (dtypes, head counts, causality flag, max length) and computes
the result with plain, differentiable torch ops from the same arguments, written independently of
``prolong.model.attention``. Everything around the kernel (transformers' dispatch, the
``document_layout`` kwarg, DeepSpeed's Ulysses wrapper, the token-major conversion) is the real
code; only the kernel call lands here.

The dense varlen computation is free of host syncs (document ids come from ``searchsorted`` on the
device), so the sync-count test can run a varlen backend through it. Each call is logged in
:data:`CALLS` (kernel name, max length, cu_seqlens) so tests can check the max length *after* the
forward, outside any sync count.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch

CALLS: list[dict[str, Any]] = []


def dense_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu: torch.Tensor,
                 scale: float, causal: bool) -> torch.Tensor:
    """[T, H, D] attention within the sequences ``cu`` delimits (KV heads repeated for GQA)."""
    assert cu.dtype == torch.int32 and q.dim() == 3, (cu.dtype, q.shape)
    t, h = q.shape[0], q.shape[1]
    groups = h // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    pos = torch.arange(t, device=q.device)
    seq = torch.searchsorted(cu[1:].long(), pos, right=True)  # sequence of each token
    allowed = seq[:, None] == seq[None, :]
    if causal:
        allowed = allowed & (pos[:, None] >= pos[None, :])
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return torch.einsum("hqk,khd->qhd", scores.softmax(-1), v)


def _log(kernel: str, cu: torch.Tensor, max_q: int, max_k: int) -> None:
    assert isinstance(max_q, int) and isinstance(max_k, int), "max lengths must be Python ints"
    CALLS.append({"kernel": kernel, "cu": cu, "max_q": max_q, "max_k": max_k})


def check_logged_max_lengths() -> int:
    """Every logged call's max lengths equal its longest sequence; returns the number of calls."""
    for call in CALLS:
        if "cu" not in call:  # flex: no lengths to check
            continue
        cu = call["cu"]
        longest = int((cu[1:] - cu[:-1]).max())
        assert call["max_q"] == call["max_k"] == longest, (call["kernel"], call["max_q"], longest)
    return len(CALLS)


# ----------------------------------------------------------------------------------------------
# torch.nn.attention.varlen.varlen_attn
# ----------------------------------------------------------------------------------------------

def varlen_attn_2_10(query, key, value, cu_seq_q, cu_seq_k, max_q, max_k, is_causal=False,
                     return_aux=None):
    """torch 2.9/2.10: ``is_causal``, no scale (always 1/sqrt(D)), equal head counts."""
    assert is_causal and key.shape[1] == query.shape[1]
    _log("torch-2.10", cu_seq_q, max_q, max_k)
    return dense_varlen(query, key, value, cu_seq_q, query.shape[-1] ** -0.5, True)


def varlen_attn_2_11(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor, max_q: int, max_k: int, *,
                     return_aux: Any = None, scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1)) -> torch.Tensor:
    """torch 2.11.0's public signature (torch/nn/attention/varlen.py at v2.11.0): keyword-only
    ``return_aux``, ``scale``, ``window_size`` (causal is ``(-1, 0)``); no ``enable_gqa``, no
    ``seqused_k``/``block_table``/``num_splits`` (those came with torch 2.12, pytorch#179468 et
    al.). Without ``enable_gqa`` the adapter must hand it KV heads repeated to H."""
    assert tuple(window_size) in ((-1, 0), (-1, -1)), window_size
    assert return_aux is None
    assert key.shape[1] == query.shape[1], "torch 2.11 varlen_attn got grouped KV heads"
    _log("torch-2.11", cu_seq_q, max_q, max_k)
    return dense_varlen(query, key, value, cu_seq_q, scale or query.shape[-1] ** -0.5,
                        tuple(window_size) == (-1, 0))


def varlen_attn_2_12(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     cu_seq_q: torch.Tensor, cu_seq_k: torch.Tensor | None, max_q: int,
                     max_k: int, *, return_aux: Any = None, scale: float | None = None,
                     window_size: tuple[int, int] = (-1, -1), enable_gqa: bool = False,
                     seqused_k: torch.Tensor | None = None, block_table: torch.Tensor | None = None,
                     num_splits: int | None = None) -> torch.Tensor:
    """torch 2.12/2.13's signature (as on this machine): ``enable_gqa`` takes grouped KV heads
    as they are; the adapter must use it rather than copying KV heads."""
    assert tuple(window_size) == (-1, 0) and return_aux is None
    grouped = key.shape[1] != query.shape[1]
    assert enable_gqa == grouped, "KV heads were repeated although the kernel takes them grouped"
    _log("torch-2.12", cu_seq_q, max_q, max_k)
    return dense_varlen(query, key, value, cu_seq_q, scale or query.shape[-1] ** -0.5, True)


# ----------------------------------------------------------------------------------------------
# flash-attention's flash_attn_varlen_func, three generations
# ----------------------------------------------------------------------------------------------

def fa2_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p=0.0,
               softmax_scale=None, causal=False, window_size=(-1, -1), softcap=0.0,
               alibi_slopes=None, deterministic=False, return_attn_probs=False, block_table=None):
    """flash-attn 2.8 (flash_attn/flash_attn_interface.py)."""
    assert causal and dropout_p == 0.0
    _log("flash-attn-2", cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    return dense_varlen(q, k, v, cu_seqlens_q, softmax_scale or q.shape[-1] ** -0.5, True)


def fa3_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, seqused_q=None,
               seqused_k=None, softmax_scale=None, causal=False, qv=None, q_descale=None,
               k_descale=None, v_descale=None, window_size=(-1, -1), attention_chunk=0,
               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, sm_margin=0,
               return_attn_probs=False):
    """flash-attn-3 (hopper/flash_attn_interface.py); older builds return (out, lse)."""
    assert causal
    _log("flash-attn-3", cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = dense_varlen(q, k, v, cu_seqlens_q, softmax_scale or q.shape[-1] ** -0.5, True)
    return (out, torch.zeros(q.shape[1], q.shape[0])) if return_attn_probs else out


def fa4_varlen(q, k, v, cu_seqlens_q=None, cu_seqlens_k=None, max_seqlen_q=None,
               max_seqlen_k=None, seqused_q=None, seqused_k=None, page_table=None,
               softmax_scale=None, causal=False, window_size=(None, None), learnable_sink=None,
               softcap=0.0, num_splits=1, pack_gqa=None, deterministic=False, return_lse=False):
    """flash-attn-4 (flash_attn/cute/interface.py): returns (out, lse)."""
    assert causal
    _log("flash-attn-4", cu_seqlens_q, max_seqlen_q, max_seqlen_k)
    out = dense_varlen(q, k, v, cu_seqlens_q, softmax_scale or q.shape[-1] ** -0.5, True)
    return out, torch.zeros(q.shape[1], q.shape[0])


# ----------------------------------------------------------------------------------------------
# FlexAttention
# ----------------------------------------------------------------------------------------------

def flex_attention(query, key, value, score_mod=None, block_mask=None, scale=None,
                   enable_gqa=False, return_lse=False, kernel_options=None, *, return_aux=None):
    """torch.nn.attention.flex_attention.flex_attention's signature (torch 2.11-2.13). Evaluates the
    block mask's own ``mask_mod`` densely, then plain softmax attention: the compiled kernel's
    result (and, unlike CPU flex in torch 2.13, with a backward)."""
    assert score_mod is None and block_mask is not None and not return_lse
    b, h, s, d = query.shape
    kv = key.shape[1]
    assert enable_gqa == (kv != h)
    bi = torch.arange(b).view(b, 1, 1)
    qi = torch.arange(s).view(1, s, 1)
    ki = torch.arange(s).view(1, 1, s)
    allowed = block_mask.mask_mod(bi, None, qi, ki)  # [B, S, S]
    CALLS.append({"kernel": "flex"})
    k = key.repeat_interleave(h // kv, dim=1)
    v = value.repeat_interleave(h // kv, dim=1)
    scores = (query @ k.transpose(-1, -2)) * (scale or d ** -0.5)
    scores = scores.masked_fill(~allowed[:, None].to(scores.device), float("-inf"))
    return scores.softmax(-1) @ v


# ----------------------------------------------------------------------------------------------
# Installing them
# ----------------------------------------------------------------------------------------------

STAND_INS = {
    "flash_attn": fa3_varlen,
    "torch_varlen": varlen_attn_2_11,
    "flex": flex_attention,
}
"""The stand-in each GPU backend runs with in the dispatch tests (the kernels the one-GPU check
machine and the train image actually have: torch 2.11, flash-attn-3 on the H100s)."""


def install(attention_module: Any, *, flash: Any = fa3_varlen,
            torch_varlen: Any = varlen_attn_2_11, flex: Any = flex_attention) -> dict[str, Any]:
    """Point ``prolong.model.attention``'s kernel lookups at the stand-ins; returns the previous
    lookups for :func:`restore`. Plain attribute assignment, so it also works in worker processes."""
    previous = {name: getattr(attention_module, name)
                for name in ("_flash_varlen_fn", "_torch_varlen_fn", "_flex_fn",
                             "unavailable_reason")}
    # What the process records as the kernels that ran: the stand-ins' names stay out of it.
    previous["_KERNELS_RUN"] = dict(attention_module._KERNELS_RUN)
    attention_module._KERNELS_RUN.clear()
    real_reason = previous["unavailable_reason"]
    attention_module._flash_varlen_fn = lambda: ("stand-in-" + flash.__name__, flash)
    attention_module._torch_varlen_fn = lambda: torch_varlen
    attention_module._flex_fn = lambda compiled: flex

    def reason(backend, device, dtype=None):
        # The stand-ins run anywhere: only "needs a CUDA device" is lifted, nothing else.
        return None if backend in STAND_INS else real_reason(backend, device, dtype)

    attention_module.unavailable_reason = reason
    CALLS.clear()
    return previous


def restore(attention_module: Any, previous: dict[str, Any]) -> None:
    previous = dict(previous)
    ran = previous.pop("_KERNELS_RUN")
    attention_module._KERNELS_RUN.clear()
    attention_module._KERNELS_RUN.update(ran)
    for name, value in previous.items():
        setattr(attention_module, name, value)


@contextlib.contextmanager
def installed(attention_module: Any, **kernels: Any) -> Iterator[None]:
    previous = install(attention_module, **kernels)
    try:
        yield
    finally:
        restore(attention_module, previous)
