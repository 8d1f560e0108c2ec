"""Document-masked attention: every backend against the per-document SDPA reference, the
reference against an explicit block-diagonal causal mask, backend choice, and the way DeepSpeed's
Ulysses wrapper calls the core function."""

from __future__ import annotations

import inspect
import itertools
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolong.model import attention as A

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_stand_ins as K

CUDA = torch.cuda.is_available()
needs_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------

def positions_for(lengths: list[int]) -> list[int]:
    return [p for n in lengths for p in range(n)]


def random_lengths(gen: torch.Generator, total: int, max_docs: int = 6) -> list[int]:
    """Random document lengths (each >= 1) summing to ``total``."""
    n = int(torch.randint(1, min(max_docs, total) + 1, (1,), generator=gen))
    cuts = sorted(torch.randperm(total - 1, generator=gen)[: n - 1].add(1).tolist())
    bounds = [0, *cuts, total]
    return [b - a for a, b in itertools.pairwise(bounds)]


def random_qkv(gen: torch.Generator, b: int, h: int, kv: int, s: int, d: int,
               dtype=torch.float64, device="cpu"):
    def rnd(heads):
        return torch.randn(b, heads, s, d, generator=gen, dtype=torch.float64).to(device, dtype)
    return rnd(h), rnd(kv), rnd(kv)


def dense_masked_attention(q, k, v, position_ids, scale):
    """Attention with an explicit [B, S, S] block-diagonal causal mask built from document ids
    (independent of every backend's code path)."""
    b, h, s, _ = q.shape
    groups = h // k.shape[1]
    k = k.repeat_interleave(groups, dim=1)
    v = v.repeat_interleave(groups, dim=1)
    doc = torch.zeros(b, s, dtype=torch.long)
    for row in range(b):
        for t in range(1, s):
            restart = position_ids[row, t] != position_ids[row, t - 1] + 1
            doc[row, t] = doc[row, t - 1] + int(restart)
    same = doc[:, :, None] == doc[:, None, :]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    allowed = (same & causal)[:, None]  # [B, 1, S, S]
    scores = (q @ k.transpose(-1, -2)) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    return (scores.softmax(-1) @ v).transpose(1, 2)


def batch_positions(gen: torch.Generator, b: int, s: int) -> tuple[torch.Tensor, list[list[int]]]:
    rows = [random_lengths(gen, s) for _ in range(b)]
    return torch.tensor([positions_for(r) for r in rows]), rows


seeds = st.integers(0, 2**31 - 1)


# ----------------------------------------------------------------------------------------------
# documents from position ids
# ----------------------------------------------------------------------------------------------

def test_layout_from_position_ids():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [5, 6, 7, 8, 0, 1]])
    layout = A.document_layout(pos)
    # Row 2 starts mid-document (5, 6, ...): the row boundary is still a document boundary.
    assert layout.cu_seqlens.tolist() == [0, 3, 5, 6, 10, 12]
    assert layout.lengths == [3, 2, 1, 4, 2]
    assert layout.max_seqlen == 4
    assert layout.doc_ids.tolist() == [[0, 0, 0, 1, 1, 2], [3, 3, 3, 3, 4, 4]]
    assert layout.cu_seqlens.dtype == torch.int32


def test_any_position_jump_starts_a_document():
    # A restart at 0 is the contract; any discontinuity is treated the same way (as transformers'
    # packed-sequence detection does), so no two unrelated spans ever attend to each other.
    assert A.document_layout(torch.tensor([[0, 1, 7, 8, 0]])).lengths == [2, 2, 1]


def test_layout_rejects_bad_shape():
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        A.document_layout(torch.arange(5))


# ----------------------------------------------------------------------------------------------
# the reference itself
# ----------------------------------------------------------------------------------------------

@settings(max_examples=25, deadline=None)
@given(seed=seeds, b=st.integers(1, 2), s=st.integers(1, 40), kv=st.sampled_from([1, 2, 4]))
def test_reference_equals_dense_block_diagonal_mask(seed, b, s, kv):
    gen = torch.Generator().manual_seed(seed)
    h, d = 4, 8
    q, k, v = random_qkv(gen, b, h, kv, s, d)
    pos, _ = batch_positions(gen, b, s)
    scale = d ** -0.5
    ref_in = [x.clone().requires_grad_() for x in (q, k, v)]
    dense_in = [x.clone().requires_grad_() for x in (q, k, v)]
    got = A.document_attention(*ref_in, pos, backend="sdpa")
    want = dense_masked_attention(*dense_in, pos, scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)
    (got * weight).sum().backward()
    (want * weight).sum().backward()
    for r, t in zip(ref_in, dense_in, strict=True):
        torch.testing.assert_close(r.grad, t.grad, rtol=1e-10, atol=1e-10)


def test_reference_is_not_plain_causal():
    """Guard against a reference that ignores documents: with two documents, plain causal
    attention over the row differs from it."""
    gen = torch.Generator().manual_seed(0)
    q, k, v = random_qkv(gen, 1, 4, 2, 12, 8)
    pos = torch.tensor([positions_for([5, 7])])
    docs = A.document_attention(q, k, v, pos, backend="sdpa")
    causal = A.document_attention(q, k, v, torch.arange(12)[None], backend="sdpa")
    torch.testing.assert_close(docs[:, :5], causal[:, :5])  # the first document sees no other
    assert (docs[:, 5:] - causal[:, 5:]).abs().max() > 1e-3


def test_custom_scale_is_used():
    gen = torch.Generator().manual_seed(1)
    q, k, v = random_qkv(gen, 1, 4, 2, 9, 8)
    pos = torch.tensor([positions_for([4, 5])])
    got = A.document_attention(q, k, v, pos, backend="sdpa", scale=0.3)
    torch.testing.assert_close(got, dense_masked_attention(q, k, v, pos, 0.3))


# ----------------------------------------------------------------------------------------------
# backends against the reference
# ----------------------------------------------------------------------------------------------

def _compare_backend(backend: str, *, device: str, dtype: torch.dtype, seed: int, grads: bool,
                     tol: float, s: int = 96, b: int = 2, h: int = 4, kv: int = 2, d: int = 64,
                     lengths: list[int] | None = None):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = random_qkv(gen, b, h, kv, s, d, dtype=dtype, device=device)
    if lengths is None:
        pos, _ = batch_positions(gen, b, s)
    else:
        pos = torch.tensor([positions_for(lengths)] * b)
    pos = pos.to(device)
    # The reference: the dense block-diagonal mask (no code shared with any backend, sdpa
    # included), in float64 on the CPU from the very same (rounded) inputs.
    ref_in = [x.detach().double().cpu().requires_grad_(grads) for x in (q, k, v)]
    test_in = [x.detach().requires_grad_(grads) for x in (q, k, v)]
    want = dense_masked_attention(*ref_in, pos.cpu(), d ** -0.5)
    got = A.document_attention(*test_in, pos, backend=backend)
    assert got.shape == (b, s, h, d) and got.dtype == dtype
    assert_near(got, want, tol, "out")
    if grads:
        weight = torch.randn(want.shape, generator=gen, dtype=torch.float64)
        (want * weight).sum().backward()
        (got * weight.to(device, dtype)).sum().backward()
        for name, r, t in zip("qkv", ref_in, test_in, strict=True):
            assert_near(t.grad, r.grad, tol, f"d{name}")


def assert_near(got: torch.Tensor, want: torch.Tensor, tol: float, what: str) -> None:
    """Largest error relative to the largest reference value: robust for low-precision kernels,
    and as strict as an elementwise check for float64 (tol 1e-10)."""
    got, want = got.detach().double().cpu(), want.detach()
    err = (got - want).abs().max().item() / max(want.abs().max().item(), 1e-30)
    assert err <= tol, f"{what}: max error {err:.3g} (relative to max |ref|) exceeds {tol}"


CPU_BACKENDS = [bk for bk in A.BACKENDS if A.unavailable_reason(bk, "cpu", torch.float64) is None]


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@settings(max_examples=8, deadline=None)
@given(seed=seeds)
def test_cpu_backends_match_reference_float64(backend, seed):
    _compare_backend(backend, device="cpu", dtype=torch.float64, seed=seed, grads=True, tol=1e-10,
                     s=48, d=16)


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@settings(max_examples=5, deadline=None)
@given(seed=seeds)
def test_flex_forward_on_cpu_matches_reference_float64(seed):
    """FlexAttention's document mask_mod, checked on CPU in eager mode (forward only: torch 2.13
    has no FlexAttention backward on CPU, see test_flex_backward_on_cpu_is_unsupported)."""
    _compare_backend("flex", device="cpu", dtype=torch.float64, seed=seed, grads=False,
                     tol=1e-10, s=48, d=16)


def test_flex_backward_on_cpu_is_unsupported():
    """Records why flex is not selectable on CPU; if a torch release adds the backward, this
    fails and flex can become a CPU training backend."""
    if CUDA:
        pytest.skip("checks CPU behaviour only")
    gen = torch.Generator().manual_seed(0)
    q, k, v = (x.requires_grad_() for x in random_qkv(gen, 1, 4, 2, 16, 8))
    with pytest.raises(NotImplementedError, match="backward"):
        A.document_attention(q, k, v, torch.tensor([positions_for([6, 10])]), backend="flex")
    assert "no backward" in A.unavailable_reason("flex", "cpu")


GPU_BACKENDS = ["flash_attn", "torch_varlen"]
"""The varlen kernels; flex (compiled per static shape: minutes cold) has its own one-shape test,
which bench/gpu_check.sh runs last, in its own part."""


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_gpu_backends_match_reference_bf16(backend, seed):
    why = A.unavailable_reason(backend, "cuda", torch.bfloat16)
    if why:
        pytest.skip(f"{backend}: {why}")
    # bf16 inputs, float64 reference from the same rounded inputs; bf16 output rounding and
    # bf16 accumulation inside the kernels bound the error.
    _compare_backend(backend, device="cuda", dtype=torch.bfloat16, seed=seed, grads=True,
                     tol=2e-2, s=1024, d=128, h=8, kv=2)


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("backend", GPU_BACKENDS)
def test_gpu_backends_long_documents(backend):
    """A row with one long document and a tail of short ones (the shape of ProLong's rows)."""
    why = A.unavailable_reason(backend, "cuda", torch.bfloat16)
    if why:
        pytest.skip(f"{backend}: {why}")
    _compare_backend(backend, device="cuda", dtype=torch.bfloat16, seed=7, grads=True,
                     tol=2e-2, s=4096, b=1, d=128, h=8, kv=2, lengths=[3000, 700, 1, 299, 96])


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("lengths", [None, [700, 1, 227, 96]], ids=["random", "long-doc"])
def test_gpu_flex_one_shape(lengths):
    """Compiled FlexAttention at one static shape (bf16, S=1024, GQA), random documents and a long
    one with short ones beside it: one compile for both."""
    why = A.unavailable_reason("flex", "cuda", torch.bfloat16)
    if why:
        pytest.skip(f"flex: {why}")
    _compare_backend("flex", device="cuda", dtype=torch.bfloat16, seed=4, grads=True, tol=2e-2,
                     s=1024, b=1, d=128, h=8, kv=2, lengths=lengths)


@pytest.mark.gpu
@needs_cuda
def test_gpu_flex_in_float32():
    if A.unavailable_reason("flex", "cuda") is not None:
        pytest.skip(A.unavailable_reason("flex", "cuda"))
    _compare_backend("flex", device="cuda", dtype=torch.float32, seed=3, grads=True, tol=1e-3,
                     s=512, d=64)


# ----------------------------------------------------------------------------------------------
# choosing a backend
# ----------------------------------------------------------------------------------------------

def _fake_reason(available: set[str]):
    return lambda backend, device, dtype: None if backend in available else "not installed"


@pytest.mark.parametrize(("available", "expected"), [
    ({"flash_attn", "torch_varlen", "flex", "sdpa"}, "flash_attn"),
    ({"torch_varlen", "flex", "sdpa"}, "torch_varlen"),
    ({"flex", "sdpa"}, "flex"),
    ({"sdpa"}, "sdpa"),
])
def test_auto_prefers_flash_then_varlen_then_flex_then_sdpa(available, expected):
    assert A.select_backend("auto", "cuda", reason=_fake_reason(available)) == expected


def test_explicit_request_is_honoured_or_refused():
    reason = _fake_reason({"flex", "sdpa"})
    assert A.select_backend("sdpa", "cuda", reason=reason) == "sdpa"
    with pytest.raises(A.AttentionBackendError, match="'flash_attn' is unavailable on cuda: not installed"):
        A.select_backend("flash_attn", "cuda", reason=reason)


def test_real_choice_on_cpu():
    assert A.select_backend("auto", "cpu", torch.float32) == "sdpa"
    for backend in ("flash_attn", "torch_varlen", "flex"):
        with pytest.raises(A.AttentionBackendError, match=backend):
            A.select_backend(backend, "cpu", torch.float32)
    assert "CUDA" in A.unavailable_reason("flash_attn", "cpu")
    with pytest.raises(ValueError, match="unknown attention backend"):
        A.select_backend("flash", "cpu")


def test_half_precision_kernels_refuse_fp32_on_cuda():
    assert "bfloat16" in A.unavailable_reason("torch_varlen", "cuda", torch.float32)


# ----------------------------------------------------------------------------------------------
# the transformers entry point, called the way DeepSpeed's Ulysses wrapper calls it
# ----------------------------------------------------------------------------------------------

def test_registered_with_transformers():
    from transformers import AttentionInterface
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    names = A.register_attention_backends()
    assert set(names) == set(A.BACKENDS)
    for name in names.values():
        assert name in ALL_ATTENTION_FUNCTIONS
        assert name in AttentionInterface._global_mapping


def _alst_call(fn, q, k, v, position_ids, scale):
    """What UlyssesSPAttentionHF.forward does after its all-to-all (deepspeed 0.19.8): positional
    (module, q, k, v, attention_mask) with the mask dropped to None, then the model's kwargs with
    position_ids replaced by the all-gathered [B, S] tensor."""
    module = torch.nn.Module()
    return fn(module, q, k, v, None, dropout=0.0, scaling=scale, position_ids=position_ids,
              output_attentions=False)


@pytest.mark.parametrize(("h", "kv", "sp"), [(4, 2, 2), (8, 2, 4), (4, 4, 4), (8, 4, 2)])
def test_head_shards_equal_the_single_process_result(h, kv, sp):
    """After Ulysses' all-to-all, SP rank r holds heads [r·H/SP, (r+1)·H/SP) of the full sequence
    and the KV heads they read (KV/SP of them, or one replicated KV head when SP > KV). Each rank's
    output must be the matching slice of the single-process output."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    gen = torch.Generator().manual_seed(h * 100 + kv * 10 + sp)
    b, s, d = 2, 40, 8
    q, k, v = random_qkv(gen, b, h, kv, s, d)
    pos, _ = batch_positions(gen, b, s)
    fn = ALL_ATTENTION_FUNCTIONS[A.hf_name("sdpa")]
    full, weights = _alst_call(fn, q, k, v, pos, d ** -0.5)
    assert weights is None and full.shape == (b, s, h, d)
    hq = h // sp
    for rank in range(sp):
        heads = slice(rank * hq, (rank + 1) * hq)
        if sp > kv:  # one KV head per rank, replicated (kv_replication_factor = sp // kv)
            kv_idx = (rank * hq) // (h // kv)
            kr, vr = k[:, kv_idx:kv_idx + 1], v[:, kv_idx:kv_idx + 1]
        else:
            kvl = kv // sp
            kr, vr = k[:, rank * kvl:(rank + 1) * kvl], v[:, rank * kvl:(rank + 1) * kvl]
        out, _ = _alst_call(fn, q[:, heads], kr, vr, pos, d ** -0.5)
        torch.testing.assert_close(out, full[:, :, heads], rtol=1e-12, atol=1e-12)


def test_hf_entry_refuses_what_it_cannot_honour():
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    fn = ALL_ATTENTION_FUNCTIONS[A.hf_name("sdpa")]
    q = torch.randn(1, 4, 6, 8)
    k = torch.randn(1, 2, 6, 8)
    module = torch.nn.Module()
    with pytest.raises(ValueError, match="dropout"):
        fn(module, q, k, k, None, dropout=0.1, scaling=1.0, position_ids=torch.arange(6)[None])
    with pytest.raises(ValueError, match="attention_mask"):
        fn(module, q, k, k, torch.ones(1, 1, 6, 6, dtype=torch.bool), scaling=1.0)
    with pytest.raises(ValueError, match="KV cache"):
        fn(module, q[:, :, :1], k, k, None, scaling=1.0, position_ids=torch.tensor([[5]]))
    # No position_ids: each row is one document (plain causal attention).
    out, _ = fn(module, q, k, k, None, scaling=8 ** -0.5)
    torch.testing.assert_close(out, dense_masked_attention(q, k, k, torch.arange(6)[None], 8 ** -0.5))


# ----------------------------------------------------------------------------------------------
# the varlen adapters on CPU, against stand-in kernels with the real signatures
# ----------------------------------------------------------------------------------------------
# The real kernels are CUDA-only (tested above on a GPU). The stand-ins
# (tests/model/kernel_stand_ins.py) have the real signatures, assert the calling convention and
# compute varlen attention densely, so the conversion code (token-major layout, int32 cu_seqlens,
# max length, GQA, scale, causality flag) is tested everywhere.

@pytest.mark.parametrize("scale", [None, 0.2])
@pytest.mark.parametrize(("backend", "fake"), [
    ("torch_varlen", K.varlen_attn_2_12), ("torch_varlen", K.varlen_attn_2_11),
    ("torch_varlen", K.varlen_attn_2_10), ("flash_attn", K.fa2_varlen),
    ("flash_attn", K.fa3_varlen), ("flash_attn", K.fa4_varlen)],
    ids=["torch-2.12", "torch-2.11", "torch-2.10", "flash-attn-2", "flash-attn-3", "flash-attn-4"])
def test_varlen_adapters_with_stand_in_kernels(monkeypatch, backend, fake, scale):
    import torch.nn.attention.varlen as varlen_mod

    # torch's own module attribute: the adapter looks varlen_attn up there at every call.
    monkeypatch.setattr(varlen_mod, "varlen_attn", fake)
    monkeypatch.setattr(A, "_flash_varlen_fn", lambda: ("stand-in", fake))
    K.CALLS.clear()
    gen = torch.Generator().manual_seed(21)
    b, h, kv, s, d = 2, 4, 2, 30, 8
    q, k, v = random_qkv(gen, b, h, kv, s, d)
    pos, _ = batch_positions(gen, b, s)
    got = A.document_attention(q, k, v, pos, backend=backend, scale=scale)
    want = dense_masked_attention(q, k, v, pos, d ** -0.5 if scale is None else scale)
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    assert K.check_logged_max_lengths() == 1


def test_torch_varlen_passes_grouped_kv_heads_only_where_the_kernel_takes_them(monkeypatch):
    """torch 2.12+ (enable_gqa): KV heads go in as they are; torch 2.11 (no enable_gqa): repeated
    to H. The stand-ins assert the head counts they receive."""
    import torch.nn.attention.varlen as varlen_mod

    seen = []
    for fake in (K.varlen_attn_2_12, K.varlen_attn_2_11):
        def spy(query, key, *args, _fake=fake, **kwargs):
            seen.append((_fake.__name__, query.shape[1], key.shape[1]))
            return _fake(query, key, *args, **kwargs)
        spy.__signature__ = inspect.signature(fake)
        monkeypatch.setattr(varlen_mod, "varlen_attn", spy)
        gen = torch.Generator().manual_seed(5)
        q, k, v = random_qkv(gen, 1, 8, 2, 12, 8)
        A.document_attention(q, k, v, torch.tensor([positions_for([5, 7])]), backend="torch_varlen")
    assert seen == [("varlen_attn_2_12", 8, 2), ("varlen_attn_2_11", 8, 8)]


def fa_varlen_without(*names: str):
    """A flash-attn-like varlen stand-in whose signature lacks ``names`` (as an older or newer
    release might): it computes what a kernel would without them (no causal mask, its own
    default scale)."""
    def kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, **given):
        return K.dense_varlen(q, k, v, cu_seqlens_q,
                              given.get("softmax_scale") or q.shape[-1] ** -0.5,
                              given.get("causal", False))

    params = [inspect.Parameter(n, inspect.Parameter.POSITIONAL_OR_KEYWORD) for n in
              ("q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k")]
    params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=None)
               for n in ("softmax_scale", "causal") if n not in names]
    kernel.__signature__ = inspect.Signature(params)
    return kernel


@pytest.mark.parametrize("missing", [("causal",), ("softmax_scale",), ("softmax_scale", "causal")])
def test_flash_adapter_refuses_a_kernel_that_does_not_name_a_keyword(monkeypatch, missing):
    """Dropping ``causal`` would attend to later tokens, dropping ``softmax_scale`` use the
    kernel's default: the adapter must refuse such a kernel, naming what it lacks."""
    monkeypatch.setattr(A, "_flash_varlen_fn", lambda: ("stand-in", fa_varlen_without(*missing)))
    gen = torch.Generator().manual_seed(3)
    q, k, v = random_qkv(gen, 1, 4, 2, 16, 8)
    pos, _ = batch_positions(gen, 1, 16)
    with pytest.raises(A.AttentionBackendError) as info:
        A.document_attention(q, k, v, pos, backend="flash_attn", scale=0.2)
    assert f"takes no {', '.join(missing)}" in str(info.value), str(info.value)


def test_installed_flash_kernel_names_every_keyword_the_adapter_passes():
    """Where flash-attn is installed (the GPU image), its real varlen kernel's signature must
    name what the adapter passes; skipped where it is not (it needs CUDA to import)."""
    found = A._flash_varlen_fn()
    if found is None:
        pytest.skip("flash-attn is not installed here")
    kind, fn = found
    params = inspect.signature(fn).parameters  # the real one: no **kwargs escape hatch
    missing = [key for key in A.FLASH_VARLEN_KEYWORDS if key not in params]
    assert missing == [], f"{kind} {fn.__module__}.{fn.__qualname__} takes no {missing}"
