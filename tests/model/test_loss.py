"""Chunked, globally normalised LM loss against the full-logits loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from prolong.model.loss import (
    IGNORE_INDEX,
    chunked_lm_loss,
    count_valid_tokens,
)


def random_batch(gen: torch.Generator, b: int, s: int, hd: int, vocab: int, p_masked: float = 0.3):
    hidden = torch.randn(b, s, hd, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, hd, generator=gen, dtype=torch.float64) / hd ** 0.5
    labels = torch.randint(0, vocab, (b, s), generator=gen)
    labels[torch.rand(b, s, generator=gen, dtype=torch.float64) < p_masked] = IGNORE_INDEX
    return hidden, weight, labels


def full_logits_lm_loss(hidden, weight, labels, *, normalizer):
    """The reference, written here and sharing nothing with prolong.model.loss: all logits at
    once in float64, F.cross_entropy summed over the valid tokens, over the normaliser."""
    logits = hidden.double() @ weight.double().T
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels.reshape(-1),
                           ignore_index=-100, reduction="sum") / normalizer


def loss_and_grads(fn, hidden, weight, labels, **kwargs):
    h = hidden.clone().requires_grad_()
    w = weight.clone().requires_grad_()
    out = fn(h, w, labels, **kwargs)
    loss = out[0] if isinstance(out, tuple) else out
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("checkpoint", [True, False])
@pytest.mark.parametrize("chunk", [1, 4, 7, 16, 37, 64, 100])
def test_chunked_equals_full_logits(chunk, checkpoint):
    """Chunk sizes that divide S=64 and that do not (7, 37), one token, all of it, more than it."""
    gen = torch.Generator().manual_seed(chunk * 2 + checkpoint)
    hidden, weight, labels = random_batch(gen, 2, 64, 16, 50)
    norm = float(count_valid_tokens(labels))
    want = loss_and_grads(full_logits_lm_loss, hidden, weight, labels, normalizer=norm)
    got = loss_and_grads(chunked_lm_loss, hidden, weight, labels, normalizer=norm,
                         chunk_tokens=chunk, checkpoint=checkpoint)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


@settings(max_examples=15, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), s=st.integers(1, 50), chunk=st.integers(1, 60))
def test_chunked_equals_full_logits_random_shapes(seed, s, chunk):
    gen = torch.Generator().manual_seed(seed)
    hidden, weight, labels = random_batch(gen, 1, s, 8, 20)
    norm = max(1.0, float(count_valid_tokens(labels)))
    want = loss_and_grads(full_logits_lm_loss, hidden, weight, labels, normalizer=norm)
    got = loss_and_grads(chunked_lm_loss, hidden, weight, labels, normalizer=norm,
                         chunk_tokens=chunk)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-12, atol=1e-12)


def test_matches_plain_cross_entropy_mean():
    gen = torch.Generator().manual_seed(3)
    hidden, weight, labels = random_batch(gen, 2, 30, 8, 20)
    loss, n_valid = chunked_lm_loss(hidden, weight, labels, normalizer=count_valid_tokens(labels),
                                    chunk_tokens=8)
    logits = hidden @ weight.T
    want = F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1), ignore_index=IGNORE_INDEX)
    torch.testing.assert_close(loss, want, rtol=1e-12, atol=1e-12)
    assert int(n_valid) == int((labels != IGNORE_INDEX).sum())


def test_global_normaliser_averages_per_token_not_per_micro_batch():
    """Two micro-batches with 3 and 40 valid tokens: the step's loss is the mean over all 43
    tokens, so the small micro-batch weighs 3/43, not 1/2."""
    gen = torch.Generator().manual_seed(4)
    h1, weight, y1 = random_batch(gen, 1, 48, 8, 20, p_masked=0.0)
    h2, _, y2 = random_batch(gen, 1, 48, 8, 20, p_masked=0.0)
    y1[:, 3:] = IGNORE_INDEX
    y2[:, 40:] = IGNORE_INDEX
    total = count_valid_tokens(y1) + count_valid_tokens(y2)
    assert total == 43
    w = weight.clone().requires_grad_()
    step_loss = 0.0
    for h, y in ((h1, y1), (h2, y2)):  # gradient accumulation: one backward per micro-batch
        loss, _ = chunked_lm_loss(h, w, y, normalizer=total, chunk_tokens=5)
        loss.backward()
        step_loss += loss.item()
    # Reference: one cross-entropy mean over the 43 tokens of both micro-batches together.
    w_ref = weight.clone().requires_grad_()
    logits = torch.cat([h1, h2], 1) @ w_ref.T
    ref = F.cross_entropy(logits.reshape(-1, 20), torch.cat([y1, y2], 1).reshape(-1),
                          ignore_index=IGNORE_INDEX)
    ref.backward()
    torch.testing.assert_close(torch.tensor(step_loss, dtype=torch.float64), ref.detach())
    torch.testing.assert_close(w.grad, w_ref.grad, rtol=1e-12, atol=1e-12)
    # ...and that is not the mean of the two micro-batch means.
    per_batch = [F.cross_entropy((h @ weight.T)[0], y[0], ignore_index=IGNORE_INDEX)
                 for h, y in ((h1, y1), (h2, y2))]
    assert abs(sum(per_batch).item() / 2 - ref.item()) > 1e-3


def test_lm_head_module_and_weight_agree():
    gen = torch.Generator().manual_seed(5)
    hidden, weight, labels = random_batch(gen, 1, 20, 8, 20)
    head = torch.nn.Linear(8, 20, bias=False, dtype=torch.float64)
    with torch.no_grad():
        head.weight.copy_(weight)
    h = hidden.clone().requires_grad_()
    loss, _ = chunked_lm_loss(h, head, labels, normalizer=7.0, chunk_tokens=6)
    loss.backward()
    want = loss_and_grads(full_logits_lm_loss, hidden, weight, labels, normalizer=7.0)
    torch.testing.assert_close(loss.detach(), want[0])
    torch.testing.assert_close(h.grad, want[1])
    torch.testing.assert_close(head.weight.grad, want[2])


def test_all_masked_chunks_contribute_nothing():
    gen = torch.Generator().manual_seed(6)
    hidden, weight, labels = random_batch(gen, 1, 16, 8, 20, p_masked=0.0)
    labels[:, :12] = IGNORE_INDEX  # the first three chunks of 4 have no target
    loss, n_valid = chunked_lm_loss(hidden, weight, labels, normalizer=4.0, chunk_tokens=4)
    want = full_logits_lm_loss(hidden[:, 12:], weight, labels[:, 12:], normalizer=4.0)
    torch.testing.assert_close(loss, want)
    assert int(n_valid) == 4


def test_bf16_hidden_gives_float32_loss():
    """bf16 hidden states and head (the GPU precision): the bf16 matmul rounds each logit to
    8 bits, then the cross-entropy must run in fp32. So the loss equals the float64 reference
    on the bf16-rounded logits up to fp32 rounding (measured 2e-8); a cross-entropy taken in
    bf16 is off by ~7e-4."""
    gen = torch.Generator().manual_seed(7)
    hidden, weight, labels = random_batch(gen, 1, 16, 8, 20)
    hidden, weight = hidden.bfloat16(), weight.bfloat16()
    loss, _ = chunked_lm_loss(hidden, weight, labels, normalizer=10.0, chunk_tokens=5)
    assert loss.dtype == torch.float32 and torch.isfinite(loss)
    logits = (hidden.double() @ weight.double().T).bfloat16().double()
    want = F.cross_entropy(logits.reshape(-1, 20), labels.reshape(-1), ignore_index=-100,
                           reduction="sum") / 10.0
    assert abs(loss.double() - want).item() <= 1e-5 * abs(want).item(), (loss.item(), want.item())


def _saved_numel(checkpoint: bool) -> int:
    gen = torch.Generator().manual_seed(8)
    hidden, weight, labels = random_batch(gen, 1, 64, 8, 500)
    sizes = {}

    def pack(t):
        # The weight is saved by every chunk but is one tensor: count storages once.
        sizes[t.untyped_storage().data_ptr()] = t.numel()
        return t

    h = hidden.clone().requires_grad_()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss, _ = chunked_lm_loss(h, weight, labels, normalizer=10.0, chunk_tokens=8,
                                  checkpoint=checkpoint)
    loss.backward()
    assert h.grad is not None
    return sum(sizes.values())


def test_checkpointed_chunks_keep_no_logits_for_backward():
    """With checkpointing, autograd keeps only each chunk's inputs; without it, it keeps every
    chunk's logits (64 x 500 values in all here)."""
    logits = 64 * 500
    assert _saved_numel(checkpoint=True) < logits / 4
    assert _saved_numel(checkpoint=False) >= logits


def test_rejects_bad_arguments():
    hidden, weight, labels = random_batch(torch.Generator().manual_seed(9), 1, 8, 4, 10)
    with pytest.raises(ValueError, match="normalizer"):
        chunked_lm_loss(hidden, weight, labels, normalizer=0, chunk_tokens=4)
    with pytest.raises(ValueError, match="chunk_tokens"):
        chunked_lm_loss(hidden, weight, labels, normalizer=1, chunk_tokens=0)
    with pytest.raises(ValueError, match=r"\[B, S\]"):
        chunked_lm_loss(hidden, weight, labels[:, :4], normalizer=1, chunk_tokens=4)
