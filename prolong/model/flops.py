"""FLOPs per token for a Llama-style decoder, in the two conventions we report.

- **dense** (the usual MFU convention): ``6·N + 12·L·H·d·S``. N counts matmul parameters: the
  attention and MLP projections of every layer and the LM head. The input embedding is a lookup,
  not a matmul, so it is excluded. 12·L·H·d·S is full (non-causal) attention for forward and
  backward.
- **document-causal**: ``6·N + 6·L·H·d·Σdᵢ²/S``. With packed documents and no cross-document
  attention, a row of documents d₁…dₖ (Σdᵢ = S) does causal attention inside each document only,
  which costs half of Σdᵢ² per layer and head instead of S². For one document filling the row it is
  half the dense figure; for short packed documents it is far less.

The dense figure at MFU 0.4 reproduces ProLong's reported budgets (2.2K H100-hours for stage 1,
12.2K for stage 2), which is why GPU-hour estimates use it.
"""

from __future__ import annotations

from collections.abc import Iterable

from prolong.spec import ArchitectureSpec

# Dense bf16 tensor-core peak per GPU (FLOP/s), without sparsity.
PEAK_BF16_FLOPS = {
    "H100": 989.4e12,  # SXM5
    "H200": 989.4e12,
    "A100": 312.0e12,
    "B200": 2250.0e12,
}


def matmul_params(arch: ArchitectureSpec) -> int:
    """N: parameters that take part in a matmul per token (embedding lookup excluded)."""
    h, kv_dim = arch.hidden_size, arch.num_key_value_heads * arch.head_dim
    attention = h * h * 2 + h * kv_dim * 2  # q, o; k, v
    mlp = 3 * h * arch.intermediate_size  # gate, up, down
    lm_head = h * arch.vocab_size
    return arch.num_layers * (attention + mlp) + lm_head


def _attention_width(arch: ArchitectureSpec) -> int:
    """L·H·d (query heads)."""
    return arch.num_layers * arch.num_attention_heads * arch.head_dim


def dense_flops_per_token(arch: ArchitectureSpec, seq_len: int) -> float:
    """6·N + 12·L·H·d·S (training: forward + backward)."""
    return 6.0 * matmul_params(arch) + 12.0 * _attention_width(arch) * seq_len


def doc_causal_flops_per_token(arch: ArchitectureSpec, effective_length: float) -> float:
    """6·N + 6·L·H·d·(Σdᵢ²/S): ``effective_length`` is Σdᵢ²/S, the token-weighted mean document
    length of the row (S for one document filling the row)."""
    return 6.0 * matmul_params(arch) + 6.0 * _attention_width(arch) * effective_length


def effective_length(doc_lengths: Iterable[int]) -> float:
    """Σdᵢ²/Σdᵢ for the documents of one or more rows."""
    lengths = list(doc_lengths)
    total = sum(lengths)
    return sum(d * d for d in lengths) / total if total else 0.0


def prefill_flops_per_token(arch: ArchitectureSpec, context_len: int) -> float:
    """Forward pass only (evaluation prompts): 2·N + 4·L·H·d·S, a third of the dense figure."""
    return 2.0 * matmul_params(arch) + 4.0 * _attention_width(arch) * context_len
