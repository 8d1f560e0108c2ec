"""Model building, loading checks, and the proof that a packed row trains exactly like its
documents run one by one (no cross-document attention), in float64."""

from __future__ import annotations

import itertools

import pytest
import torch
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st

from prolong.model import attention as A
from prolong.model.build import (
    TORCH_DTYPES,
    ArchitectureMismatch,
    build_model,
    check_architecture,
    decoder_hidden_states,
    packed_lm_loss,
    rope_theta_of,
)
from prolong.model.loss import IGNORE_INDEX
from prolong.spec import ArchitectureSpec, ModelSpec

# Smaller than the tiny preset, so float64 forward + backward of a few rows takes milliseconds.
MICRO = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=97, tie_word_embeddings=False)


def micro_model(attention: str = "sdpa", *, checkpointing: bool = False, seed: int = 0,
                rope_theta: float | None = 1e4):
    spec = ModelSpec(architecture=ArchitectureSpec(**MICRO), attention=attention,
                     rope_theta=rope_theta)
    model = build_model(spec, dtype=torch.float64, activation_checkpointing=checkpointing,
                        seed=seed)
    model.train()
    return model


def packed_row(gen: torch.Generator, lengths: list[int], vocab: int):
    """input_ids, position_ids and shift_labels of one packed row, as the data pipeline makes
    them: positions restart at 0 per document; the last token of each document has no target."""
    ids = torch.randint(0, vocab, (1, sum(lengths)), generator=gen)
    pos, labels, start = [], [], 0
    for n in lengths:
        pos += list(range(n))
        labels += [*ids[0, start + 1:start + n].tolist(), IGNORE_INDEX]
        start += n
    return ids, torch.tensor([pos]), torch.tensor([labels])


def loss_and_grads(model, ids, pos, labels, normalizer, chunk_tokens=16):
    model.zero_grad(set_to_none=True)
    loss, n_valid = packed_lm_loss(model, ids, pos, labels, normalizer=normalizer,
                                   chunk_tokens=chunk_tokens)
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters()}
    return loss.detach(), int(n_valid), grads


def per_document(model, ids, pos, labels, lengths, normalizer):
    """The same documents, one forward and backward each; gradients accumulate as in training."""
    model.zero_grad(set_to_none=True)
    total, start = torch.zeros((), dtype=torch.float64), 0
    for n in lengths:
        sl = slice(start, start + n)
        loss, _ = packed_lm_loss(model, ids[:, sl], pos[:, sl], labels[:, sl],
                                 normalizer=normalizer, chunk_tokens=16)
        loss.backward()
        total += loss.detach()
        start += n
    return total, {n: p.grad.detach().clone() for n, p in model.named_parameters()}


def assert_same(loss_a, grads_a, loss_b, grads_b, tol=1e-11):
    torch.testing.assert_close(loss_a, loss_b, rtol=tol, atol=tol)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=tol, atol=tol,
                                   msg=lambda m, name=name: f"{name}: {m}")


def _lengths(draw_total: int, cuts: list[int]) -> list[int]:
    bounds = [0, *sorted(set(c for c in cuts if 0 < c < draw_total)), draw_total]
    return [b - a for a, b in itertools.pairwise(bounds)]


# ----------------------------------------------------------------------------------------------
# packed row == documents one by one
# ----------------------------------------------------------------------------------------------

@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 2**31 - 1), total=st.integers(8, 48),
       cuts=st.lists(st.integers(1, 47), min_size=1, max_size=4))
def test_packed_row_equals_documents_one_by_one(seed, total, cuts):
    lengths = _lengths(total, cuts)
    gen = torch.Generator().manual_seed(seed)
    model = micro_model(seed=seed % 1000)
    ids, pos, labels = packed_row(gen, lengths, MICRO["vocab_size"])
    norm = float(max(1, int((labels != IGNORE_INDEX).sum())))
    loss, n_valid, grads = loss_and_grads(model, ids, pos, labels, norm)
    assert n_valid == total - len(lengths)
    ref_loss, ref_grads = per_document(model, ids, pos, labels, lengths, norm)
    assert_same(loss, grads, ref_loss, ref_grads)


def test_packed_row_equals_documents_with_activation_checkpointing():
    gen = torch.Generator().manual_seed(11)
    lengths = [9, 1, 14, 8]
    model = micro_model(checkpointing=True, seed=3)
    assert model.model.gradient_checkpointing
    ids, pos, labels = packed_row(gen, lengths, MICRO["vocab_size"])
    loss, _, grads = loss_and_grads(model, ids, pos, labels, 28.0)
    ref_loss, ref_grads = per_document(model, ids, pos, labels, lengths, 28.0)
    assert_same(loss, grads, ref_loss, ref_grads)
    plain = micro_model(checkpointing=False, seed=3)
    assert_same(loss, grads, *loss_and_grads(plain, ids, pos, labels, 28.0)[::2])


def test_two_rows_in_one_batch():
    gen = torch.Generator().manual_seed(12)
    model = micro_model(seed=4)
    rows = [packed_row(gen, lengths, MICRO["vocab_size"]) for lengths in ([5, 11], [16])]
    ids, pos, labels = (torch.cat(parts) for parts in zip(*rows, strict=True))
    loss, _, grads = loss_and_grads(model, ids, pos, labels, 29.0)
    model.zero_grad(set_to_none=True)
    ref = torch.zeros((), dtype=torch.float64)
    for row_ids, row_pos, row_labels in rows:
        part, _ = packed_lm_loss(model, row_ids, row_pos, row_labels, normalizer=29.0)
        part.backward()
        ref += part.detach()
    assert_same(loss, grads, ref, {n: p.grad.clone() for n, p in model.named_parameters()})


def _sdpa_as_ulysses_calls_it(module, query, key, value, attention_mask, *args, **kwargs):
    """transformers' sdpa behind DeepSpeed's uattn_wrapper (deepspeed 0.19.8): any tensor mask
    is replaced by None before the core function runs, so sdpa falls back to is_causal=True over
    the whole gathered row."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    return sdpa_attention_forward(module, query, key, value, None, *args, **kwargs)


@pytest.mark.parametrize("variant", ["sdpa_under_ulysses", "sdpa_default_forward"])
def test_transformers_sdpa_attends_across_documents(variant):
    """The check above can fail: transformers' sdpa on the same packed row does not match the
    documents run one by one, in the two ways it is commonly used.

    - sdpa_under_ulysses: ALST drops the mask, sdpa attends causally across documents (the known
      trap that made us register our own attention).
    - sdpa_default_forward: a forward with use_cache=True (the default of a stock LlamaConfig;
      build_model turns it off) builds a DynamicCache, and transformers 5.23 detects packed rows
      from position_ids only when there is no cache.

    (In a single process with use_cache=False, transformers 5.23's sdpa does build a
    block-diagonal [B, 1, S, S] mask from position_ids, which is correct but O(S²) memory.)
    """
    from transformers import AttentionInterface

    gen = torch.Generator().manual_seed(13)
    lengths = [10, 7, 15]
    model = micro_model(seed=5)
    ids, pos, _ = packed_row(gen, lengths, MICRO["vocab_size"])
    docs = [slice(0, 10), slice(10, 17), slice(17, 32)]
    with torch.no_grad():
        want = torch.cat([decoder_hidden_states(model, ids[:, s], pos[:, s]) for s in docs], 1)
        if variant == "sdpa_under_ulysses":
            AttentionInterface.register("test_sdpa_ulysses", _sdpa_as_ulysses_calls_it)
            model.set_attn_implementation("test_sdpa_ulysses")
            got = decoder_hidden_states(model, ids, pos)
        else:
            model.set_attn_implementation("sdpa")
            got = model.model(input_ids=ids, position_ids=pos, use_cache=True).last_hidden_state
    torch.testing.assert_close(got[:, :10], want[:, :10])  # the first document is unaffected
    assert (got[:, 10:] - want[:, 10:]).abs().max() > 1e-3


# ----------------------------------------------------------------------------------------------
# building and loading
# ----------------------------------------------------------------------------------------------

def test_build_tiny_from_spec():
    spec = ModelSpec(architecture=ArchitectureSpec(preset="tiny"), rope_theta=8e6)
    model = build_model(spec, seed=0)
    cfg = model.config
    check_architecture(cfg, spec.architecture)
    assert rope_theta_of(cfg) == 8e6
    assert cfg._attn_implementation == A.hf_name("sdpa")  # auto on CPU
    assert model.dtype == torch.float32 and not cfg.use_cache
    assert not model.model.gradient_checkpointing


def test_same_seed_same_weights():
    a, b = micro_model(seed=7), micro_model(seed=7)
    for (name, pa), (_, pb) in zip(a.named_parameters(), b.named_parameters(), strict=True):
        assert torch.equal(pa, pb), name


def test_resolved_precision_maps_to_a_dtype():
    from prolong.spec import PretrainJob
    from tests.conftest import JOBS

    data = yaml.safe_load((JOBS / "quickstart/stage1.yaml").read_text())
    data["spec"]["precision"] = "auto"
    job = PretrainJob.model_validate(data)
    assert TORCH_DTYPES[job.spec.resolved_precision] == torch.float32  # auto on CPU
    gpu = job.spec.model_copy(update={"cluster": job.spec.cluster.model_copy(
        update={"device": "gpu"})})
    assert TORCH_DTYPES[gpu.resolved_precision] == torch.bfloat16  # auto on GPU
    fp32 = gpu.model_copy(update={"precision": "fp32"})
    assert TORCH_DTYPES[fp32.resolved_precision] == torch.float32


def test_unavailable_attention_is_a_clear_error():
    spec = ModelSpec(architecture=ArchitectureSpec(**MICRO), attention="flash_attn")
    with pytest.raises(A.AttentionBackendError, match=r"flash_attn.*CUDA"):
        build_model(spec)


def test_random_init_needs_an_architecture():
    with pytest.raises(ValueError, match="architecture"):
        build_model(ModelSpec())


def test_load_local_checkpoint_applies_rope_theta_and_checks_shape(tmp_path):
    saved = micro_model(seed=8)
    saved.save_pretrained(tmp_path / "ckpt")
    arch = ArchitectureSpec(**MICRO)
    spec = ModelSpec(source=str(tmp_path / "ckpt"), architecture=arch, rope_theta=1.28e8)
    loaded = build_model(spec, dtype=torch.float64, local_files_only=True)
    assert rope_theta_of(loaded.config) == 1.28e8
    assert loaded.config._attn_implementation == A.hf_name("sdpa")
    for (name, a), (_, b) in zip(saved.named_parameters(), loaded.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    # The new theta is what the rotary embedding actually uses.
    want = 1.0 / (1.28e8 ** (torch.arange(0, 8, 2, dtype=torch.float64) / 8))
    torch.testing.assert_close(loaded.model.rotary_emb.inv_freq.double(), want, rtol=1e-6, atol=0)

    wrong = ArchitectureSpec(**{**MICRO, "num_layers": 3, "vocab_size": 100})
    with pytest.raises(ArchitectureMismatch, match=r"num_layers: spec says 3, model has 2; "
                                                   r"vocab_size: spec says 100, model has 97"):
        build_model(ModelSpec(source=str(tmp_path / "ckpt"), architecture=wrong),
                    local_files_only=True)


def test_source_override_and_no_download(tmp_path):
    spec = ModelSpec(source="meta-llama/Meta-Llama-3-8B-Instruct",
                     architecture=ArchitectureSpec(**MICRO))
    with pytest.raises(FileNotFoundError, match="not a local directory"):
        build_model(spec, local_files_only=True)
    micro_model(seed=9).save_pretrained(tmp_path / "stage1")
    loaded = build_model(spec, source=str(tmp_path / "stage1"), local_files_only=True)
    assert loaded.config.num_hidden_layers == MICRO["num_layers"]


# ----------------------------------------------------------------------------------------------
# ZeRO-3 loading: which checkpoint keys fill which parameters (the 2-rank load itself is in
# test_zero3_loading.py)
# ----------------------------------------------------------------------------------------------

def test_checkpoint_keys_are_matched_to_parameters_tied_ones_by_any_name(tmp_path):
    from prolong.model.zero3 import checkpoint_files, checkpoint_shapes, match_parameters

    tied = build_model(ModelSpec(architecture=ArchitectureSpec(**{**MICRO,
                                                                  "tie_word_embeddings": True})))
    tied.save_pretrained(tmp_path / "tied")
    shapes = checkpoint_shapes(checkpoint_files(tmp_path / "tied"))
    assert "lm_head.weight" not in shapes  # transformers saves a tied weight once
    pairs, problems = match_parameters(tied, shapes)
    assert problems == []
    assert [k for k, _ in pairs] == [n for n, _ in tied.named_parameters()]

    untied = micro_model()
    _, problems = match_parameters(untied, shapes)
    assert problems == ["missing 1 parameter(s) (lm_head.weight)"]
    wrong = {**shapes, "model.norm.weight": (31,), "extra.weight": (2,)}
    _, problems = match_parameters(tied, wrong)
    assert problems == ["1 key(s) name no parameter of the model (extra.weight)",
                        "1 shape(s) differ (model.norm.weight is (31,), the model's (32,))"]
