"""Lockstep-aware placement (prolong.data.mixture.place_rows) and its replay for the plan
(prolong.data.lockstep): the same gradient as the seeded deal, and the plan's figure is the
loader's own."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from prolong.data.lockstep import DocumentLengths, replay_lockstep
from prolong.data.mixture import MixtureLoader, lockstep_efficiency
from prolong.data.shards import ShardWriter, TokenShards
from prolong.model.build import build_model
from prolong.model.flops import doc_causal_flops_per_token
from prolong.parallel.dims import ParallelDims
from prolong.parallel.ulysses import CausalLMWithLoss, global_valid_tokens, loss_normalizer
from prolong.spec import ArchitectureSpec, PretrainSpec

SEQ, ROWS, WORLD = 64, 8, 4
TINY = dict(numLayers=2, hiddenSize=32, numAttentionHeads=4, numKeyValueHeads=2,
            intermediateSize=64, vocabSize=128, tieWordEmbeddings=False)


@pytest.fixture(autouse=True, scope="module")
def _one_intra_op_thread():
    """Tiny float64 ops: with several intra-op threads on a small, busy machine the thread
    wake-ups cost 10-40x the arithmetic (as in tests/model/conftest.py). Restored afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("lockstep")
    rng = np.random.default_rng(0)
    text = ShardWriter(root / "text", dtype=np.uint16)
    for _ in range(200):
        text.add(rng.integers(0, 128, size=int(rng.integers(2, 40))))
    long = ShardWriter(root / "long", dtype=np.uint16)
    for _ in range(20):
        long.add(rng.integers(0, 128, size=SEQ))
    quarter = ShardWriter(root / "quarter", dtype=np.uint16)
    for _ in range(40):
        quarter.add(rng.integers(0, 128, size=SEQ // 4))
    return {"text": str(text.close()), "long": str(long.close()),
            "quarter": str(quarter.close())}


def spec(*, sp: int = 1, reorder: bool = True) -> PretrainSpec:
    streams = [
        {"domain": "text", "path": "t", "format": "jsonl", "proportion": 0.4},
        {"domain": "long", "path": "l", "format": "jsonl", "packing": "long", "proportion": 0.3},
        {"domain": "quarter", "path": "q", "format": "jsonl", "packing": "long",
         "targetLength": SEQ // 4, "proportion": 0.3}]
    return PretrainSpec.model_validate({
        "model": {"architecture": TINY, "attention": "sdpa"},
        "data": {"streams": streams, "seed": 7}, "sequenceLength": SEQ,
        "globalBatchTokens": SEQ * ROWS, "steps": 40, "precision": "fp32",
        "schedule": {"peakLR": 1e-3, "warmupSteps": 2},
        "parallelism": {"sequenceParallel": sp, "zeroStage": 3, "reorderMicroBatches": reorder},
        "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": WORLD}})


def loaders(s: PretrainSpec, shards: dict[str, str]) -> list[MixtureLoader]:
    """The loader of each data-parallel replica (its first rank), as the workers build them."""
    opened = {d: TokenShards(p) for d, p in shards.items()}
    dims = s.parallel_dims
    return [MixtureLoader.from_spec(s, opened, dims=dims, rank=r * dims.sp)
            for r in range(dims.dp)]


@pytest.mark.parametrize("sp", [1, 2])
def test_the_plan_replays_the_workers_placement(shards, sp):
    """replay_lockstep over the shards' lengths alone gives the efficiency of the rows the
    workers' own loaders build, per replica and micro-step."""
    s = spec(sp=sp)
    arch = ArchitectureSpec(**{k[0].lower() + k[1:]: v for k, v in TINY.items()})

    def flops(row) -> float:
        d = row.doc_lengths.astype(np.int64)
        return SEQ * doc_causal_flops_per_token(arch, float(d @ d) / SEQ)

    steps = 32
    waves = []
    replicas = loaders(s, shards)
    for _ in range(steps):
        per_rank = [ld.next_rows() for ld in replicas]
        waves += [[flops(rows[k]) for rows in per_rank] for k in range(len(per_rank[0]))]
    lengths = {d: DocumentLengths(TokenShards(p).lengths, d) for d, p in shards.items()}
    replayed = replay_lockstep(s, arch, short_doc_tokens=1, steps=steps, lengths=lengths,
                               sp_options=(1, 2, 4))
    assert sorted(replayed) == [1, 2, 4]
    own = replayed[sp]
    assert (own.dp, own.micro_batches_per_rank) == (WORLD // sp, ROWS * sp // WORLD)
    assert own.efficiency == pytest.approx(lockstep_efficiency(waves), rel=1e-12)
    # More micro-batches per replica leave the placement more to balance.
    assert replayed[1].efficiency < replayed[4].efficiency
    unbalanced = replay_lockstep(spec(sp=sp, reorder=False), arch, short_doc_tokens=1,
                                 steps=steps, lengths=lengths)[sp]
    assert unbalanced.efficiency < own.efficiency


def test_lockstep_placement_leaves_the_gradient_unchanged(shards):
    """Each step's gradient through the product's loss path (CausalLMWithLoss over the chunked
    loss, normalised by loss_normalizer as train_step does) summed over the replicas as
    DeepSpeed's reduction does (x 1/GAS per backward, / DP), is the same to 1e-6 whether the rows
    were dealt by cost or by the seeded deal (today's placement without its within-rank sort,
    which only reorders a rank's own rows): the placement moves rows between ranks and
    micro-steps, never in or out of the step."""
    dims = ParallelDims(WORLD, 1, WORLD)
    model = build_model(spec().model, dtype=torch.float64, seed=0)
    module = CausalLMWithLoss(model)
    params = [p for p in model.parameters() if p.requires_grad]

    def gradient(per_rank) -> tuple[torch.Tensor, float]:
        gas = len(per_rank[0])
        n = global_valid_tokens([mb.shift_labels for rows in per_rank for mb in rows])
        norm = loss_normalizer(n, zero_stage=3, dp=dims.dp, sp=1, grad_accum_steps=gas)
        model.zero_grad(set_to_none=True)
        ce = 0.0
        for rows in per_rank:
            for mb in rows:
                loss, ce_sum = module(input_ids=mb.input_ids, position_ids=mb.position_ids,
                                      shift_labels=mb.shift_labels, normalizer=norm)
                (loss / gas / dims.dp).backward()
                ce += float(ce_sum)
        return torch.cat([p.grad.flatten() for p in params]), ce / n

    def row_sets(per_rank) -> list[set[bytes]]:
        return [{mb.input_ids.numpy().tobytes() for mb in rows} for rows in per_rank]

    dealt, seeded = loaders(spec(), shards), loaders(spec(reorder=False), shards)
    for step in range(2):
        a = [ld.next_step() for ld in dealt]
        b = [ld.next_step() for ld in seeded]
        assert sorted(map(sorted, row_sets(a))) != sorted(map(sorted, row_sets(b)))  # rows moved
        (ga, la), (gb, lb) = gradient(a), gradient(b)
        assert ga.abs().max() > 1e-3  # a real gradient
        assert torch.allclose(ga, gb, rtol=0, atol=1e-6), (step, (ga - gb).abs().max())
        assert la == pytest.approx(lb, abs=1e-6)
    # Negative control: a step with one row swapped for a repeat of another has another gradient.
    other, _ = gradient([[a[0][0], a[0][0]], *a[1:]])
    assert (other - ga).abs().max() > 1e-4
