"""Every attention backend built and trained through transformers' real dispatch, with only the
CUDA kernel swapped for a CPU stand-in (tests/model/kernel_stand_ins.py), against a reference
that shares none of our attention code: transformers' own ``sdpa`` attention given an explicit
block-diagonal causal mask.

The model is built by the product's own function (``prolong.model.build.build_model``), so the
``attn_implementation`` names go through ``PreTrainedModel._check_and_adjust_attn_implementation``
exactly as on a GPU worker; a registered name containing "flash" dies there. The Ulysses wrapper
names (``ulysses_<name>``) go through DeepSpeed's real wrapper in the SP parity workers
(tests/parallel/test_sp_parity.py, cases ``3+attn-<backend>``).

Also here: the document layout is computed once per micro-batch, so the host syncs of a forward
do not grow with the number of layers.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prolong.model import attention as A
from prolong.model.build import build_model, packed_lm_loss
from prolong.spec import ArchitectureSpec, ModelSpec

sys.path.insert(0, str(Path(__file__).resolve().parent))
import kernel_stand_ins as K

ARCH = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=97, tie_word_embeddings=False)
LENGTHS = [[5, 1, 12, 14], [20, 12]]  # two packed rows of 32 tokens, a 1-token document included


def _batch():
    gen = torch.Generator().manual_seed(3)
    ids = torch.randint(0, ARCH["vocab_size"], (len(LENGTHS), 32), generator=gen)
    pos = torch.tensor([[p for n in row for p in range(n)] for row in LENGTHS])
    labels = ids.roll(-1, dims=1)
    labels[:, -1] = -100
    for r, row in enumerate(LENGTHS):  # no target across a document boundary
        end = 0
        for n in row:
            end += n
            labels[r, end - 1] = -100
    return ids, pos, labels


def _block_diagonal_mask(pos: torch.Tensor) -> torch.Tensor:
    """[B, 1, S, S] bool: same document and causal, from position restarts (written here, not
    taken from prolong.model.attention)."""
    starts = torch.ones_like(pos, dtype=torch.bool)
    starts[:, 1:] = pos[:, 1:] != pos[:, :-1] + 1
    doc = starts.cumsum(1)
    s = pos.shape[1]
    causal = torch.ones(s, s, dtype=torch.bool).tril()
    return ((doc[:, :, None] == doc[:, None, :]) & causal)[:, None]


def _spec(attention: str) -> ModelSpec:
    return ModelSpec(architecture=ArchitectureSpec(**ARCH), attention=attention, rope_theta=1e4)


def _loss_and_grads(model, ids, pos, labels, **forward):
    model.zero_grad(set_to_none=True)
    hidden = model.model(input_ids=ids, position_ids=pos, use_cache=False, **forward)
    logits = model.lm_head(hidden.last_hidden_state).double()
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels.flatten(),
                                             ignore_index=-100)
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters()}


@pytest.fixture(scope="module")
def reference():
    """transformers' own SDPA attention with an explicit block-diagonal mask, same weights."""
    from transformers import LlamaForCausalLM

    ours = build_model(_spec("sdpa"), dtype=torch.float64, seed=11)
    ref = LlamaForCausalLM._from_config(ours.config, attn_implementation="sdpa",
                                        dtype=torch.float64)
    ref.load_state_dict(ours.state_dict())
    ref.train()
    ids, pos, labels = _batch()
    loss, grads = _loss_and_grads(ref, ids, pos, labels, attention_mask=_block_diagonal_mask(pos))
    return ours.state_dict(), loss, grads


def test_no_registered_name_is_one_transformers_dispatches_on():
    from prolong.parallel.ulysses import ulysses_name

    for backend in A.BACKENDS:
        for name in (A.hf_name(backend), ulysses_name(A.hf_name(backend))):
            A.check_hf_name(name)  # raises on a reserved substring
    with pytest.raises(ValueError, match="'flash'"):
        A.check_hf_name("prolong_flash_attn")


@pytest.mark.parametrize("backend", A.BACKENDS)
def test_backend_builds_and_trains_through_transformers_dispatch(backend, reference):
    state, ref_loss, ref_grads = reference
    ids, pos, labels = _batch()
    with K.installed(A):
        model = build_model(_spec(backend), dtype=torch.float64, seed=11)
        assert model.config._attn_implementation == A.hf_name(backend)
        model.load_state_dict(state)
        model.train()
        loss, grads = _loss_and_grads(model, ids, pos, labels)
        calls = K.check_logged_max_lengths()
    if backend != "sdpa":
        # The kernel (stand-in) ran once per layer: the backend really dispatched to it.
        assert calls == ARCH["num_layers"], (backend, [c["kernel"] for c in K.CALLS])
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)
    for name, g in ref_grads.items():
        torch.testing.assert_close(grads[name], g, rtol=1e-8, atol=1e-10, msg=name)


@pytest.mark.parametrize("kernel", [K.fa2_varlen, K.fa3_varlen, K.fa4_varlen],
                         ids=["flash-attn-2", "flash-attn-3", "flash-attn-4"])
def test_every_flash_attention_generation_dispatches(kernel, reference):
    state, ref_loss, _ = reference
    ids, pos, labels = _batch()
    with K.installed(A, flash=kernel):
        model = build_model(_spec("flash_attn"), dtype=torch.float64, seed=11)
        model.load_state_dict(state)
        loss, _ = _loss_and_grads(model, ids, pos, labels)
        assert K.check_logged_max_lengths() == ARCH["num_layers"]
    torch.testing.assert_close(loss, ref_loss, rtol=1e-10, atol=1e-12)


# ----------------------------------------------------------------------------------------------
# host syncs per forward
# ----------------------------------------------------------------------------------------------

class SyncCounter(TorchDispatchMode):
    """Counts the aten ops that make the host wait for the device: ``nonzero`` (data-dependent
    output size) and ``_local_scalar_dense`` (``.item()``, ``int(t)``, ``bool(t)``)."""

    SYNCING = ("aten.nonzero", "aten._local_scalar_dense", "aten.item")

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if any(str(func).startswith(op) for op in self.SYNCING):
            self.count += 1
        return func(*args, **(kwargs or {}))


def _syncs_of_one_micro_batch(num_layers: int, *, precomputed: bool) -> int:
    arch = {**ARCH, "num_layers": num_layers}
    spec = ModelSpec(architecture=ArchitectureSpec(**arch), attention="torch_varlen",
                     rope_theta=1e4)
    ids, pos, labels = _batch()
    with K.installed(A, torch_varlen=K.varlen_attn_2_12):
        model = build_model(spec, dtype=torch.float64, seed=0,
                            activation_checkpointing=True)  # the recompute runs attention again
        model.train()
        with SyncCounter() as counter:
            # What train_step does per micro-batch: the layout once, then forward and backward.
            layout = A.document_layout(pos) if precomputed else None
            loss, _ = packed_lm_loss(model, ids, pos, labels, normalizer=100.0, chunk_tokens=16,
                                     layout=layout)
            loss.backward()
        assert K.check_logged_max_lengths() == 2 * num_layers  # forward + recompute
    return counter.count


def test_host_syncs_per_micro_batch_do_not_grow_with_layers():
    with_layout = {n: _syncs_of_one_micro_batch(n, precomputed=True) for n in (1, 3)}
    assert with_layout[1] == with_layout[3], with_layout
    # The layout itself is two of them (nonzero, max length); the rest is the loss's.
    assert with_layout[1] >= 2
    # Negative control: deriving the layout in every attention call costs two syncs per call
    # (per layer, and again in each layer's recompute); the counter sees them.
    per_call = {n: _syncs_of_one_micro_batch(n, precomputed=False) for n in (1, 3)}
    assert per_call[3] - per_call[1] == 2 * 2 * 2, per_call


def test_precomputed_layout_must_cover_the_sequence_attention_sees():
    q = torch.randn(1, 4, 8, 16, dtype=torch.float64)
    k = torch.randn(1, 2, 8, 16, dtype=torch.float64)
    chunk = A.document_layout(torch.tensor([[0, 1, 2, 0]]))  # a local SP chunk, not the full row
    with pytest.raises(ValueError, match="full row"):
        A.document_attention(q, k, k, None, backend="sdpa", layout=chunk)
    full = A.document_layout(torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]))
    got = A.document_attention(q, k, k, None, backend="sdpa", layout=full)
    want = A.document_attention(q, k, k, torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]]), backend="sdpa")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_versions_record_the_kernel_that_ran():
    from prolong.versions import versions

    before = versions()["attention-kernel"]
    with K.installed(A, flash=K.fa3_varlen):
        gen = torch.Generator().manual_seed(0)
        q = torch.randn(1, 4, 6, 8, generator=gen, dtype=torch.float64)
        k = torch.randn(1, 2, 6, 8, generator=gen, dtype=torch.float64)
        A.document_attention(q, k, k, torch.tensor([[0, 1, 2, 0, 1, 2]]), backend="flash_attn")
        recorded = versions()["attention-kernel"]
    assert "flash_attn=stand-in-fa3_varlen" in recorded, recorded
    assert versions()["attention-kernel"] == before  # the stand-in's record is undone
