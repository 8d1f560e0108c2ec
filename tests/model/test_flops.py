"""FLOPs per token against hand computation for Llama-3-8B."""

from __future__ import annotations

import pytest

from prolong.model.flops import (
    dense_flops_per_token,
    doc_causal_flops_per_token,
    effective_length,
    matmul_params,
    prefill_flops_per_token,
)
from prolong.spec import ArchitectureSpec

LLAMA3_8B = ArchitectureSpec(preset="llama3-8b")


def test_matmul_params_llama3_8b():
    per_layer = 4096 * 4096 * 2 + 4096 * 1024 * 2 + 3 * 4096 * 14336
    assert matmul_params(LLAMA3_8B) == 32 * per_layer + 4096 * 128256
    assert matmul_params(LLAMA3_8B) == pytest.approx(7.5047e9, rel=1e-4)


def test_dense_and_document_causal():
    n = matmul_params(LLAMA3_8B)
    lhd = 32 * 32 * 128
    assert dense_flops_per_token(LLAMA3_8B, 65536) == 6 * n + 12 * lhd * 65536
    # One document filling the row: causal attention is half the dense attention term.
    full = doc_causal_flops_per_token(LLAMA3_8B, 65536)
    assert full - 6 * n == pytest.approx((dense_flops_per_token(LLAMA3_8B, 65536) - 6 * n) / 2)
    # Eight 8K documents in a 64K row cost an eighth of one 64K document's attention.
    eight = doc_causal_flops_per_token(LLAMA3_8B, effective_length([8192] * 8))
    assert eight - 6 * n == pytest.approx((full - 6 * n) / 8)
    assert prefill_flops_per_token(LLAMA3_8B, 1000) == pytest.approx(
        dense_flops_per_token(LLAMA3_8B, 1000) / 3)


def test_effective_length():
    assert effective_length([3, 1]) == pytest.approx((9 + 1) / 4)
    assert effective_length([]) == 0.0
