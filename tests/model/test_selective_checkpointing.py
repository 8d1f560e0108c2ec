"""parallelism.memory.saveAttention: selective activation checkpointing that keeps the attention
kernel's outputs. The gradients equal plain checkpointing's, the backward's recompute runs no
attention kernel, and the plan counts what is kept."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from prolong.model.build import attention_kernel_ops, build_model, packed_lm_loss
from prolong.model.tiling import apply_memory_settings
from prolong.spec import ArchitectureSpec, MemorySpec, ModelSpec, ParallelismSpec

ARCH = dict(num_layers=3, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=48, vocab_size=97, tie_word_embeddings=False)
LENGTHS = [9, 1, 14, 8]  # four documents: the reference runs one kernel call per document


class KernelCalls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = attention_kernel_ops()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += func in self.ops
        return func(*args, **(kwargs or {}))


def _run(save_attention: bool):
    model = build_model(ModelSpec(architecture=ArchitectureSpec(**ARCH), rope_theta=1e4),
                        dtype=torch.float64, seed=2, activation_checkpointing=True)
    apply_memory_settings(model, ParallelismSpec(memory=MemorySpec(save_attention=save_attention)))
    model.train()
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, ARCH["vocab_size"], (1, sum(LENGTHS)), generator=gen)
    pos = torch.tensor([[p for n in LENGTHS for p in range(n)]])
    labels = ids.roll(-1, 1)
    labels[0, -1] = -100
    with KernelCalls() as forward:
        loss, _ = packed_lm_loss(model, ids, pos, labels, normalizer=31.0, chunk_tokens=8)
    with KernelCalls() as backward:
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    return loss.detach(), grads, forward.count, backward.count


def test_saved_attention_gives_the_same_gradients_without_recomputing_the_kernel():
    loss, grads, fwd, bwd = _run(save_attention=False)
    sel_loss, sel_grads, sel_fwd, sel_bwd = _run(save_attention=True)
    calls = ARCH["num_layers"] * len(LENGTHS)
    assert fwd == sel_fwd == calls
    assert bwd == calls  # plain checkpointing runs every kernel call again in the recompute
    assert sel_bwd == 0  # selective: the kernel's outputs were kept
    torch.testing.assert_close(sel_loss, loss, rtol=0, atol=0)
    for name, g in grads.items():
        torch.testing.assert_close(sel_grads[name], g, rtol=1e-12, atol=1e-14, msg=name)


def test_the_plan_counts_the_kept_outputs():
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from test_memory import stage2, with_parallelism

    from prolong.model.memory import GIB, estimate_memory

    spec, arch = stage2()  # 8B, 512K / SP 8: 65,536 local tokens
    base = estimate_memory(spec, arch)
    kept = estimate_memory(with_parallelism(spec, memory=MemorySpec(save_attention=True)), arch)
    per_layer = 65536 * 4096 * 2 + 65536 * 32 * 4  # output (bf16) + LSE (fp32 per head)
    assert kept.checkpoints - base.checkpoints == 32 * per_layer
    assert per_layer / GIB == pytest.approx(0.51, abs=0.01)
