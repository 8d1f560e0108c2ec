"""Document-masked causal attention: one signature, several backends.

A packed row holds several documents back to back; ``position_ids`` restart at 0 where a document
starts (see "Packed batch" in ARCHITECTURE.md). Every backend here computes causal attention
*inside* each document and never across documents, so a packed row trains exactly like its
documents run one by one. Shapes follow transformers: query ``[B, H, S, D]``, key/value
``[B, KV, S, D]`` (grouped-query attention when KV < H), output ``[B, S, H, D]``.

Backends, in the order ``auto`` tries them:

- ``flash_attn``: ``flash_attn_varlen_func`` from the fastest flash-attention build present for
  the GPU: flash-attn-3 (``flash_attn_interface``, Hopper only) first on SM90, flash-attn-4
  (``flash_attn.cute``, Hopper and Blackwell) next, flash-attn 2 last. CUDA, fp16/bf16 only.
  :func:`kernels_run` says which one ran (``prolong.versions.versions()`` records it).
- ``torch_varlen``: ``torch.nn.attention.varlen.varlen_attn`` (a flash kernel shipped inside CUDA
  builds of torch). Same layout as flash-attn, no extra package; CUDA, fp16/bf16 only. Grouped KV
  heads go in un-repeated where the function takes ``enable_gqa`` (torch >= 2.12); torch 2.11's
  has no such argument and gets them repeated.
- ``flex``: FlexAttention with a document ``mask_mod``, compiled. Any dtype the compiler supports,
  but building the block mask costs O(S²/128²) per new row (cached for the layers of one row). On
  CPU torch 2.13 runs it forward-only (no backward), so it is not selectable there.
- ``sdpa``: the reference. A Python loop over documents, ``scaled_dot_product_attention`` with
  ``is_causal=True`` per document, KV heads repeated for GQA. Obviously correct, any device and
  dtype (float64 included), slow with many short documents. The tests hold every other backend
  to it.

Documents come from ``position_ids`` alone: a token starts a new document when it is the first of
its row or its position is not the previous position + 1 (a restart at 0 is the normal case; any
other jump is treated the same way, as transformers' packed-sequence detection does). Nothing uses
``attention_mask``: padding is not part of the packed-batch contract, and under sequence
parallelism DeepSpeed discards the mask anyway.

Each backend is registered with transformers under its own name (:data:`HF_NAMES`:
``prolong_docs_fa``, ``prolong_docs_reference``, ...). Building a model with
``attn_implementation=<name>`` routes every layer through :func:`hf_attention_forward`.
transformers builds no mask for names it does not know, so no O(S²) mask is ever materialised.
The names avoid every substring transformers 5 acts on (:data:`RESERVED_IN_HF_NAMES`): its
``is_flash_attention_requested`` is a substring test for "flash", and a name that passes it is
imported as a flash kernel (falling back to the hub-kernels loader, which raises), so a name like
``prolong_flash_attn`` kills the model build. The spec's ``attention:`` values (``flash_attn``,
...) are ours and never reach transformers.
DeepSpeed's ALST (``UlyssesSPAttentionHF.register_with_transformers(model, <name>, sp, ...)``)
looks the name up, wraps the function and stores the wrapper under the same name in
``ALL_ATTENTION_FUNCTIONS``' local mapping, which takes precedence over our global registration
(so registering again later cannot undo it). After its all-to-all, the wrapper calls our function
with query ``[B, H/SP, S, D]`` and key/value ``[B, KV/SP (or 1, replicated), S, D]`` for the *full*
sequence, ``attention_mask=None``, and ``position_ids`` all-gathered over the SP group and
concatenated along dim 1 (``[B, S]``). The document layout derived from them is therefore exactly
the single-process one, and attention over a subset of heads is independent of the other heads.

The document layout costs two host syncs (``nonzero`` and the max length). The trainer computes
it once per micro-batch from the *full* row (:func:`document_layout`; every SP rank holds the
full row before it keeps its chunk) and passes it down the model as the ``document_layout``
forward kwarg; transformers hands model kwargs to every attention call, ALST's wrapper passes
them through untouched, and activation checkpointing replays them in the recompute. So the syncs
are per micro-batch, not per layer (and not again in the recompute). The layout must describe the
sequence attention sees (the gathered full row under ALST): its ``doc_ids`` shape is checked
against the query, which needs no sync. Without the kwarg the layout is derived from
``position_ids`` in every call, as before.
"""

from __future__ import annotations

import functools
import importlib.util
import inspect
import itertools
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

BACKENDS = ("flash_attn", "torch_varlen", "flex", "sdpa")
"""Concrete backends, in the order ``auto`` prefers them."""

HF_NAMES = {
    "flash_attn": "prolong_docs_fa",
    "torch_varlen": "prolong_docs_torch_varlen",
    "flex": "prolong_docs_flex",
    "sdpa": "prolong_docs_reference",
}
"""The transformers ``attn_implementation`` name of each backend (never the spec's value: see
:data:`RESERVED_IN_HF_NAMES`)."""

RESERVED_IN_HF_NAMES = ("flash", "sdpa", "flex_attention", "eager", "paged", "/", ":", "|")
"""Substrings transformers 5.24 dispatches on when it checks an ``attn_implementation``
(``modeling_utils._check_and_adjust_attn_implementation`` and ``get_correct_attn_implementation``,
``utils.generic.is_flash_attention_requested``; ``/`` and ``:`` make it a hub kernel id). A
registered name holding one is not treated as a plain registered function."""

LAYOUT_KWARG = "document_layout"
"""The model forward kwarg that carries a precomputed :class:`DocumentLayout` to every layer."""

_HALF = (torch.float16, torch.bfloat16)


class AttentionBackendError(RuntimeError):
    """A requested attention backend cannot run here (missing package, device or dtype)."""


# ----------------------------------------------------------------------------------------------
# Documents from position_ids
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DocumentLayout:
    """Where the documents of a ``[B, S]`` batch lie once its rows are flattened to ``B*S`` tokens.

    A row boundary is always a document boundary: a document never spans two rows.
    """

    cu_seqlens: torch.Tensor
    """int32 ``[N+1]``: offsets of the N documents in the flattened batch (0 first, B*S last)."""
    doc_ids: torch.Tensor
    """int32 ``[B, S]``: index of each token's document (0..N-1, increasing along the row)."""
    max_seqlen: int
    """Length of the longest document."""

    @property
    def lengths(self) -> list[int]:
        return (self.cu_seqlens[1:] - self.cu_seqlens[:-1]).tolist()


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """Bool ``[B, S]``: True where a token starts a document (first of its row, or a position that
    does not continue the previous one — normally a restart at 0)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be [B, S], got shape {tuple(position_ids.shape)}")
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def document_layout(position_ids: torch.Tensor) -> DocumentLayout:
    """Documents of a packed ``[B, S]`` batch from its position ids."""
    starts = document_starts(position_ids).reshape(-1)
    total = starts.numel()
    doc_ids = (starts.cumsum(0) - 1).to(torch.int32)
    offsets = starts.nonzero().flatten()  # host sync: the number of documents is data-dependent
    end = torch.tensor([total], device=offsets.device, dtype=offsets.dtype)
    cu_seqlens = torch.cat([offsets, end]).to(torch.int32)
    max_seqlen = int((cu_seqlens[1:] - cu_seqlens[:-1]).max())
    return DocumentLayout(cu_seqlens, doc_ids.reshape(position_ids.shape), max_seqlen)


# ----------------------------------------------------------------------------------------------
# Backends. Each takes q [B, H, S, D], k/v [B, KV, S, D], a layout and a scale; returns [B, S, H, D].
# ----------------------------------------------------------------------------------------------

def _tokens_major(x: torch.Tensor) -> torch.Tensor:
    """[B, H, S, D] -> [B*S, H, D], the varlen kernels' layout."""
    b, h, s, d = x.shape
    return x.transpose(1, 2).reshape(b * s, h, d)


def sdpa_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                   scale: float) -> torch.Tensor:
    """Per-document SDPA: the reference every other backend is tested against."""
    b, h, s, d = q.shape
    groups = h // k.shape[1]
    # Repeating KV heads (rather than enable_gqa) keeps the reference free of kernel-specific
    # GQA handling: head i of the query reads KV head i // groups, as in transformers' repeat_kv.
    qt, kt, vt = _tokens_major(q), _tokens_major(k), _tokens_major(v)
    outs = []
    bounds = layout.cu_seqlens.tolist()
    for start, end in itertools.pairwise(bounds):
        qd = qt[start:end].transpose(0, 1).unsqueeze(0)  # [1, H, L, D]
        kd = kt[start:end].transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
        vd = vt[start:end].transpose(0, 1).repeat_interleave(groups, dim=0).unsqueeze(0)
        od = F.scaled_dot_product_attention(qd, kd, vd, is_causal=True, scale=scale)
        outs.append(od.squeeze(0).transpose(0, 1))  # [L, H, D]
    return torch.cat(outs).reshape(b, s, h, d)


@functools.cache
def _flash_varlen_fn() -> tuple[str, Callable[..., Any]] | None:
    """The flash-attention varlen function to use here and its label, or None.

    On Hopper (SM90) flash-attn-3 (``flash_attn_interface``, built from the repo's ``hopper/``)
    comes first: it is the Hopper-tuned kernel (TMA, warp specialisation, FP8-capable), about
    1.5-2x flash-attn 2's throughput at long sequence lengths. flash-attn-4 (``flash_attn.cute``)
    runs on SM90 and SM100 and comes next; flash-attn 2 (any SM80+) last. A package that fails
    to import counts as absent."""
    major = torch.cuda.get_device_capability()[0] if torch.cuda.is_available() else 0
    candidates = []
    if major == 9:
        candidates.append(("flash-attn-3", "flash_attn_interface", "flash_attn_interface"))
    if major >= 9:
        candidates.append(("flash-attn-4", "flash_attn", "flash_attn.cute"))
    candidates.append(("flash-attn-2", "flash_attn", "flash_attn"))
    for label, top, module in candidates:
        if importlib.util.find_spec(top) is None:
            continue
        try:
            fn = importlib.import_module(module).flash_attn_varlen_func
        except Exception:  # a broken optional install means "not available"
            continue
        return label, fn
    return None


def _torch_varlen_fn() -> Callable[..., Any]:
    """torch's ``varlen_attn``, looked up at every call (so the version-specific signature is the
    installed one)."""
    from torch.nn.attention import varlen

    return varlen.varlen_attn


def _flex_fn(compiled: bool) -> Callable[..., Any]:
    """FlexAttention, compiled (the real kernel) or eager (exact, materialises the scores)."""
    if compiled:
        return _compiled_flex()
    from torch.nn.attention.flex_attention import flex_attention

    return flex_attention


_KERNELS_RUN: dict[str, str] = {}
"""Backend -> the kernel that ran it in this process (filled on first use)."""


def kernels_run() -> dict[str, str]:
    """Which kernel each backend used so far in this process, e.g. ``{"flash_attn":
    "flash-attn-3==3.0.0b1"}`` (no spaces): what a run's manifest records next to the library
    versions (``prolong.versions.versions()["attention-kernel"]``)."""
    return dict(_KERNELS_RUN)


def _record_kernel(backend: str, label: str, distribution: str | None = None) -> None:
    if backend in _KERNELS_RUN:
        return
    version = None
    if distribution is not None:
        from importlib import metadata

        try:
            version = metadata.version(distribution)
        except metadata.PackageNotFoundError:
            version = None
    _KERNELS_RUN[backend] = f"{label}=={version}" if version else label


FLASH_VARLEN_KEYWORDS = ("cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                         "softmax_scale", "causal")
"""The keywords :func:`flash_attn_varlen` passes: each is part of what the call means (document
bounds, scale, causality), so the kernel's signature must name every one of them."""


def unnamed_keywords(fn: Callable[..., Any], keywords: Any) -> list[str]:
    """Those of ``keywords`` that ``fn``'s signature does not name (none when it takes
    ``**kwargs`` or has no inspectable signature: then the call itself will tell)."""
    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return []
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return []
    return [key for key in keywords if key not in params]


def flash_attn_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                      scale: float) -> torch.Tensor:
    found = _flash_varlen_fn()
    if found is None:
        raise AttentionBackendError("flash_attn: none of flash-attn-3, flash-attn-4, flash-attn 2 "
                                    "is importable")
    label, fn = found
    b, h, s, d = q.shape
    cu = layout.cu_seqlens
    kwargs = dict(zip(FLASH_VARLEN_KEYWORDS, (cu, cu, layout.max_seqlen, layout.max_seqlen,
                                              scale, True), strict=True))
    # A keyword the kernel does not name is refused, never dropped: without ``causal`` the
    # kernel would attend to later tokens, without ``softmax_scale`` use its default scale.
    missing = unnamed_keywords(fn, kwargs)
    if missing:
        raise AttentionBackendError(
            f"flash_attn: the installed {label} varlen kernel ({getattr(fn, '__module__', '?')}."
            f"{getattr(fn, '__qualname__', fn)}) takes no {', '.join(missing)}; this version is "
            "not supported (use attention: torch_varlen or sdpa)")
    _record_kernel("flash_attn", label, label if label != "flash-attn-2" else "flash-attn")
    # Every flash-attention generation takes grouped KV heads as they are (KV < H).
    out = fn(_tokens_major(q), _tokens_major(k), _tokens_major(v), **kwargs)
    out = out[0] if isinstance(out, tuple) else out  # flash-attn-3/4 may return (out, lse)
    return out.reshape(b, s, h, d)


def torch_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                 scale: float) -> torch.Tensor:
    varlen_attn = _torch_varlen_fn()
    b, h, s, d = q.shape
    kv = k.shape[1]
    params = inspect.signature(varlen_attn).parameters
    extra: dict[str, Any] = {}
    # Causality is spelled window_size=(-1, 0) since torch 2.11 and is_causal=True before.
    if "window_size" in params:
        extra["window_size"] = (-1, 0)
    else:
        extra["is_causal"] = True
    gqa = "enable_gqa" in params  # torch >= 2.12; 2.11's varlen_attn has no such argument
    if kv != h:
        if gqa:
            extra["enable_gqa"] = True  # grouped KV heads go in as they are: no H/KV-fold copy
        else:
            k = k.repeat_interleave(h // kv, dim=1)
            v = v.repeat_interleave(h // kv, dim=1)
    if "scale" in params:
        extra["scale"] = scale
    elif abs(scale - d ** -0.5) > 1e-12:
        q = q * (scale / d ** -0.5)  # no scale argument: fold a non-default scale into q
    _record_kernel("torch_varlen", "torch.varlen_attn" + ("+enable_gqa" if gqa else ""), "torch")
    cu = layout.cu_seqlens
    out = varlen_attn(_tokens_major(q), _tokens_major(k), _tokens_major(v), cu, cu,
                      layout.max_seqlen, layout.max_seqlen, **extra)
    out = out[0] if isinstance(out, tuple) else out  # return_aux asks for (out, lse)
    return out.reshape(b, s, h, d)


@functools.cache
def _compiled_flex() -> Callable[..., Any]:
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention materialises the full score matrix: compile once per process.
    return torch.compile(flex_attention, dynamic=False)


class _BlockMaskCache:
    """One-entry cache: every layer of one forward sees the same documents, and building a
    BlockMask is far costlier than comparing the document ids."""

    def __init__(self) -> None:
        self.doc_ids: torch.Tensor | None = None
        self.block_mask: Any = None

    def get(self, doc_ids: torch.Tensor, compile_mask: bool) -> Any:
        from torch.nn.attention.flex_attention import create_block_mask

        cached = self.doc_ids
        if cached is not None and cached.shape == doc_ids.shape and \
                cached.device == doc_ids.device and torch.equal(cached, doc_ids):
            return self.block_mask
        ids = doc_ids.clone()

        def same_doc_causal(b, h, q_idx, kv_idx):
            return (ids[b, q_idx] == ids[b, kv_idx]) & (q_idx >= kv_idx)

        bsz, seq = ids.shape
        self.block_mask = create_block_mask(same_doc_causal, bsz, None, seq, seq,
                                            device=ids.device, _compile=compile_mask)
        self.doc_ids = ids
        return self.block_mask


_block_masks = _BlockMaskCache()


def flex_document(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, layout: DocumentLayout,
                  scale: float, *, compiled: bool | None = None) -> torch.Tensor:
    """FlexAttention with a same-document causal mask. ``compiled`` defaults to "on CUDA"; eager
    mode (CPU tests) is exact but materialises the scores."""
    if compiled is None:
        compiled = q.is_cuda
    block_mask = _block_masks.get(layout.doc_ids.to(q.device), compile_mask=compiled)
    fn = _flex_fn(compiled)
    _record_kernel("flex", "flex_attention" + ("+compiled" if compiled else "+eager"), "torch")
    out = fn(q, k, v, block_mask=block_mask, scale=scale, enable_gqa=k.shape[1] != q.shape[1])
    return out.transpose(1, 2)


_KERNELS: dict[str, Callable[..., torch.Tensor]] = {
    "flash_attn": flash_attn_varlen,
    "torch_varlen": torch_varlen,
    "flex": flex_document,
    "sdpa": sdpa_reference,
}


# ----------------------------------------------------------------------------------------------
# Choosing a backend (pure: requested name, what is installed, device, dtype)
# ----------------------------------------------------------------------------------------------

def _has_torch_varlen() -> bool:
    return importlib.util.find_spec("torch.nn.attention.varlen") is not None


def _has_flex() -> bool:
    return importlib.util.find_spec("torch.nn.attention.flex_attention") is not None


def unavailable_reason(backend: str, device: str | torch.device,
                       dtype: torch.dtype | None = None) -> str | None:
    """Why ``backend`` cannot train on ``device``/``dtype`` here, or None when it can."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of "
                         f"{', '.join(('auto', *BACKENDS))}")
    dev = torch.device(device).type
    if backend == "sdpa":
        return None
    if backend == "flex":
        if not _has_flex():
            return "this torch has no torch.nn.attention.flex_attention"
        if dev != "cuda":
            return (f"FlexAttention has no backward on {dev} in torch {torch.__version__} "
                    "(forward-only), so it cannot train there")
        return None
    if dev != "cuda":
        return f"needs a CUDA device, not {dev}"
    if dtype is not None and dtype not in _HALF:
        return f"supports only float16/bfloat16, not {dtype}"
    if backend == "flash_attn":
        found = _flash_varlen_fn()
        return None if found is not None else ("none of flash-attn-3, flash-attn-4, "
                                                "flash-attn 2 is importable")
    if not _has_torch_varlen():
        return f"torch {torch.__version__} has no torch.nn.attention.varlen"
    return None


def select_backend(requested: str, device: str | torch.device,
                   dtype: torch.dtype | None = None,
                   reason: Callable[[str, Any, Any], str | None] | None = None) -> str:
    """The concrete backend for ``requested`` (``auto`` or a backend name) on ``device``.

    ``auto`` takes the first available of flash_attn, torch_varlen, flex, sdpa (sdpa always is).
    An explicitly requested backend that cannot run raises :class:`AttentionBackendError` with the
    reason. ``reason`` (default :func:`unavailable_reason`, looked up when called) is injectable so
    the choice can be tested for any combination of installs.
    """
    if reason is None:
        reason = unavailable_reason
    if requested == "auto":
        for backend in BACKENDS:
            if reason(backend, device, dtype) is None:
                return backend
        raise AttentionBackendError("no attention backend available")  # unreachable: sdpa
    why = reason(requested, device, dtype)
    if why is not None:
        raise AttentionBackendError(f"attention backend {requested!r} is unavailable on "
                                    f"{torch.device(device).type}: {why}")
    return requested


# ----------------------------------------------------------------------------------------------
# The one signature, and the transformers entry point
# ----------------------------------------------------------------------------------------------

def document_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                       position_ids: torch.Tensor | None, *, backend: str,
                       scale: float | None = None,
                       layout: DocumentLayout | None = None) -> torch.Tensor:
    """Causal attention within the documents that ``position_ids`` delimit.

    query ``[B, H, S, D]``, key/value ``[B, KV, S, D]`` (KV divides H), position_ids ``[B, S]``
    (or ``[1, S]``, broadcast over the batch). Returns ``[B, S, H, D]`` in query's dtype.
    ``layout``: the documents, precomputed by the caller (no host sync here); it must cover
    exactly these ``B x S`` tokens, and ``position_ids`` are then not read.
    """
    if backend not in _KERNELS:
        raise ValueError(f"unknown attention backend {backend!r}")
    b, h, s, d = query.shape
    if key.shape[2] != s or value.shape != key.shape:
        raise ValueError(f"query {tuple(query.shape)} and key/value {tuple(key.shape)} must cover "
                         "the same tokens (no KV cache: these backends are for training)")
    if h % key.shape[1]:
        raise ValueError(f"{key.shape[1]} key/value heads do not divide {h} query heads")
    if layout is not None:
        if tuple(layout.doc_ids.shape) != (b, s):
            raise ValueError(f"the precomputed document layout covers {tuple(layout.doc_ids.shape)} "
                             f"tokens, attention [B, S] = {(b, s)} (under Ulysses it must be the "
                             "full row's, not the local chunk's)")
    else:
        if position_ids is None:
            raise ValueError("document attention needs position_ids or a precomputed layout")
        if position_ids.shape[-1] != s:
            raise ValueError(f"position_ids cover {position_ids.shape[-1]} tokens, attention {s}")
        layout = document_layout(position_ids.to(query.device).expand(b, s))
    return _KERNELS[backend](query, key, value, layout, d ** -0.5 if scale is None else scale)


def hf_attention_forward(module: torch.nn.Module, query: torch.Tensor, key: torch.Tensor,
                         value: torch.Tensor, attention_mask: torch.Tensor | None,
                         scaling: float | None = None, dropout: float = 0.0, *,
                         backend: str, position_ids: torch.Tensor | None = None,
                         **kwargs: Any) -> tuple[torch.Tensor, None]:
    """transformers' attention-function signature around :func:`document_attention`.

    Called by ``LlamaAttention`` as ``fn(module, q, k, v, attention_mask, dropout=..., scaling=...,
    position_ids=..., **kwargs)``, directly or through DeepSpeed's Ulysses wrapper.
    """
    layout = kwargs.pop(LAYOUT_KWARG, None)
    del kwargs  # output_attentions, cache positions, ...: nothing here depends on them
    if dropout:
        raise ValueError("attention dropout is not supported by the document-masked backends "
                         f"(got {dropout}); ProLong trains without it")
    if attention_mask is not None:
        # transformers builds no mask for our names (and ALST drops any), so a mask here was made
        # by the caller: honouring it is not supported, ignoring it would be silently wrong.
        raise ValueError("document attention takes its mask from position_ids; a prepared "
                         "attention_mask is not supported (padding is not part of packed rows)")
    if position_ids is None and layout is None:
        # Plain (unpacked) rows: one document per row.
        position_ids = torch.arange(query.shape[2], device=query.device).unsqueeze(0)
    return document_attention(query, key, value, position_ids, backend=backend,
                              scale=scaling, layout=layout), None


def register_attention_backends() -> dict[str, str]:
    """Register every backend with transformers (idempotent). Returns backend -> HF name.

    Registration imports nothing optional: a backend that cannot run fails when first called.
    """
    from transformers import AttentionInterface

    for backend, name in HF_NAMES.items():
        check_hf_name(name)
        AttentionInterface.register(name, functools.partial(hf_attention_forward, backend=backend))
    return dict(HF_NAMES)


def check_hf_name(name: str) -> None:
    """Refuse a name transformers would not dispatch as a plain registered function."""
    bad = [part for part in RESERVED_IN_HF_NAMES if part in name]
    if bad:
        raise ValueError(f"attention name {name!r} contains {bad[0]!r}, which transformers "
                         "dispatches on (see RESERVED_IN_HF_NAMES); register it under another name")


def hf_name(backend: str) -> str:
    """The transformers ``attn_implementation`` for a concrete backend."""
    return HF_NAMES[backend]


register_attention_backends()
