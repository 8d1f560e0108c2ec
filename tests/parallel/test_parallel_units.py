"""Pure pieces of prolong.parallel: degrees and group layout, the DeepSpeed config, row sharding,
the loss normalisation, the mpu interface, and the spec rule this package adds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from prolong.parallel.deepspeed_config import (
    build_optimizer,
    deepspeed_config,
    param_groups,
)
from prolong.parallel.dims import ParallelDims, ParallelDimsError
from prolong.parallel.ulysses import (
    SequenceParallelMPU,
    deepspeed_mpu,
    grad_divisor,
    loss_normalizer,
    reduce_step_loss,
    sp_shard,
)
from prolong.spec import SpecError
from prolong.specfile import load
from tests.conftest import job_dict

sys.path.insert(0, str(Path(__file__).resolve().parent))
import sp_harness as H

# --------------------------------------------------------------------------------------------
# ParallelDims
# --------------------------------------------------------------------------------------------


def test_sp_groups_are_consecutive_ranks_and_dp_groups_strided():
    dims = ParallelDims(world_size=16, sp=4, workers_per_node=8)
    assert dims.dp == 4
    assert dims.all_sp_groups() == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9, 10, 11], [12, 13, 14, 15]]
    assert dims.all_dp_groups() == [[0, 4, 8, 12], [1, 5, 9, 13], [2, 6, 10, 14], [3, 7, 11, 15]]
    assert (dims.sp_rank(6), dims.dp_rank(6)) == (2, 1)
    assert dims.sp_group_ranks(6) == [4, 5, 6, 7] and dims.dp_group_ranks(6) == [2, 6, 10, 14]
    for r in range(16):  # every rank is in exactly one group of each kind, at its coordinates
        assert dims.sp_group_ranks(r)[dims.sp_rank(r)] == r
        assert dims.dp_group_ranks(r)[dims.dp_rank(r)] == r


def test_no_sp_is_pure_data_parallelism():
    dims = ParallelDims(world_size=4)
    assert (dims.dp, dims.sp_enabled, dims.dp_enabled) == (4, False, True)
    assert dims.all_sp_groups() == [[0], [1], [2], [3]] and dims.all_dp_groups() == [[0, 1, 2, 3]]


@pytest.mark.parametrize(("kwargs", "match"), [
    (dict(world_size=6, sp=4), "does not divide the world size 6"),
    (dict(world_size=16, sp=16, workers_per_node=8), "must divide the workers per node 8"),
    (dict(world_size=12, sp=2, workers_per_node=8), "workers per node 8 does not divide"),
    (dict(world_size=0), "world size must be >= 1"),
    (dict(world_size=4, sp=0), "must be >= 1"),
])
def test_bad_degrees_are_rejected(kwargs, match):
    with pytest.raises(ParallelDimsError, match=match):
        ParallelDims(**kwargs)


def test_rank_outside_world_is_rejected():
    with pytest.raises(ParallelDimsError, match="outside"):
        ParallelDims(world_size=4, sp=2).sp_rank(4)


def test_dims_from_spec():
    spec = load_spec("quickstart/stage2.yaml")
    dims = ParallelDims.from_spec(spec)
    assert (dims.world_size, dims.sp, dims.dp) == (spec.cluster.world_size, spec.sp_size,
                                                    spec.dp_size)


# --------------------------------------------------------------------------------------------
# DeepSpeed config
# --------------------------------------------------------------------------------------------


def load_spec(relpath: str, **parallelism):
    data = job_dict(relpath)
    data["spec"].setdefault("parallelism", {}).update(parallelism)
    return _validate(data)


def _validate(data):
    from prolong.spec import KIND_MODELS

    return KIND_MODELS[data["kind"]].model_validate(data).spec


def test_config_of_the_quickstart():
    spec = load_spec("quickstart/stage1.yaml")  # 8 rows, 2 CPU workers, SP 1, ZeRO-2, fp32
    cfg = deepspeed_config(spec, spec.parallel_dims)
    assert cfg["train_micro_batch_size_per_gpu"] == 1
    assert cfg["gradient_accumulation_steps"] == spec.micro_batches_per_rank == 4
    assert "train_batch_size" not in cfg
    assert cfg["zero_optimization"] == {"stage": 2, "contiguous_gradients": True,
                                        "overlap_comm": False, "reduce_scatter": True}
    assert cfg["bf16"] == {"enabled": False} and cfg["fp16"] == {"enabled": False}
    assert "data_types" not in cfg
    assert cfg["gradient_clipping"] == 1.0
    assert cfg["sequence_parallel_size"] == 1
    assert "optimizer" not in cfg and cfg["zero_allow_untested_optimizer"] is True
    assert "zero_force_ds_cpu_optimizer" not in cfg


def test_config_of_prolong_stage2():
    spec = load_spec("prolong-8b/stage2-512k.yaml")
    cfg = deepspeed_config(spec, spec.parallel_dims)
    assert spec.resolved_precision == "bf16" and cfg["bf16"] == {"enabled": True}
    assert cfg["data_types"] == {"grad_accum_dtype": "fp32"}
    assert cfg["sequence_parallel_size"] == 8 == spec.sp_size
    assert cfg["zero_optimization"]["stage"] == spec.parallelism.zero_stage
    assert cfg["zero_optimization"]["reduce_scatter"] is True
    assert cfg["gradient_accumulation_steps"] == spec.micro_batches_per_rank


def test_clipping_is_always_explicit():
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["optimizer"] = {"gradClip": None}
    spec = _validate(data)
    assert deepspeed_config(spec, spec.parallel_dims)["gradient_clipping"] == 0.0
    data["spec"]["optimizer"] = {"gradClip": 0.5}
    spec = _validate(data)
    assert deepspeed_config(spec, spec.parallel_dims)["gradient_clipping"] == 0.5


def test_offload_keeps_our_client_optimizer():
    """Offload steps our torch AdamW on the CPU copy: no optimizer section (DeepSpeed would build
    its own and refuse ours), and DeepSpeed's insistence on DeepSpeedCPUAdam switched off. That
    this trains correctly is shown by the +offload parity cases, through build_engine."""
    spec = load_spec("quickstart/stage1.yaml", offloadOptimizer=True, zeroStage=3)
    cfg = deepspeed_config(spec, spec.parallel_dims)
    assert cfg["zero_optimization"]["offload_optimizer"] == {"device": "cpu", "pin_memory": False}
    assert "optimizer" not in cfg and cfg["zero_force_ds_cpu_optimizer"] is False
    zero0 = load_spec("quickstart/stage1.yaml", offloadOptimizer=True, zeroStage=0)
    with pytest.raises(ValueError, match="ZeRO stage >= 1"):
        deepspeed_config(zero0, zero0.parallel_dims)


def test_bf16_under_zero0_keeps_bf16_accumulation():
    data = job_dict("prolong-8b/stage1-64k.yaml")
    data["spec"]["parallelism"]["zeroStage"] = 0
    spec = _validate(data)
    assert "data_types" not in deepspeed_config(spec, spec.parallel_dims)


def test_client_optimizer_decays_matrices_only():
    model = H.make_model()
    groups = param_groups(model.named_parameters(), 0.1)
    assert [g["weight_decay"] for g in groups] == [0.1, 0.0]
    assert all(p.dim() >= 2 for p in groups[0]["params"])
    assert all(p.dim() == 1 for p in groups[1]["params"])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    spec = load_spec("quickstart/stage1.yaml")
    opt = build_optimizer(model, spec)
    assert isinstance(opt, torch.optim.AdamW)
    assert opt.defaults["betas"] == (0.9, 0.95) and opt.defaults["lr"] == spec.schedule.peak_lr


# --------------------------------------------------------------------------------------------
# Ulysses pieces
# --------------------------------------------------------------------------------------------


def test_sp_shard_takes_contiguous_chunks_that_reassemble_the_row():
    row = H.make_rows(seed=3, rows=1, seq_len=64)[0]
    row["doc_lengths"] = torch.tensor([64])
    shards = [sp_shard(row, r, 4) for r in range(4)]
    for f in ("input_ids", "shift_labels", "position_ids"):
        assert torch.equal(torch.cat([s[f] for s in shards], dim=-1), row[f])
        assert all(s[f].shape == (1, 16) for s in shards)
    assert shards[2]["doc_lengths"] is row["doc_lengths"]  # non-token fields pass through
    # Labels were shifted over the whole row: the last token of chunk 0 targets chunk 1's first.
    first_of_next = row["input_ids"][0, 16]
    assert shards[0]["shift_labels"][0, -1] in (first_of_next, -100)


@pytest.mark.parametrize(("rank", "sp"), [(2, 2), (-1, 2), (0, 3)])
def test_sp_shard_rejects_bad_splits(rank, sp):
    row = H.make_rows(seed=0, rows=1, seq_len=64)[0]
    with pytest.raises(ValueError, match="cannot give"):
        sp_shard(row, rank, sp)


def test_grad_divisor_per_stage():
    assert [grad_divisor(s, dp=4, sp=8) for s in (0, 1, 2, 3)] == [4, 4, 4, 32]
    assert [grad_divisor(s, dp=2, sp=1) for s in (0, 1, 2, 3)] == [2, 2, 2, 2]
    with pytest.raises(ValueError):
        grad_divisor(4, dp=1, sp=1)


def test_loss_normalizer_undoes_deepspeeds_divisions():
    # 1000 valid tokens, DP 2, SP 2, GAS 3: DeepSpeed divides by GAS x divisor afterwards.
    assert loss_normalizer(1000, zero_stage=2, dp=2, sp=2, grad_accum_steps=3) == 1000 / 6
    assert loss_normalizer(1000, zero_stage=3, dp=2, sp=2, grad_accum_steps=3) == 1000 / 12
    with pytest.raises(ValueError, match="no valid tokens"):
        loss_normalizer(0, zero_stage=3, dp=1, sp=2, grad_accum_steps=1)


def test_reduce_step_loss_without_process_group():
    assert reduce_step_loss(torch.tensor(30.0), 10) == 3.0


class _FakeGroups:
    sp, rank, sp_rank = 4, 5, 1
    sp_group, world_group = object(), object()
    dims = ParallelDims(world_size=8, sp=4)


def test_mpu_is_recognised_by_deepspeed_as_sequence_parallel():
    mpu = SequenceParallelMPU(_FakeGroups())
    # DeepSpeed keys on these: an SP mpu has initialize_sequence_parallel and no data-parallel
    # group (otherwise SP would be treated as tensor parallelism and ZeRO would shard over DP only).
    assert hasattr(mpu, "initialize_sequence_parallel")
    assert not hasattr(mpu, "get_data_parallel_group")
    assert mpu.get_sequence_parallel_world_size() == 4 and mpu.get_sequence_parallel_rank() == 1
    assert mpu.get_sequence_data_parallel_world_size() == 8
    assert mpu.get_sequence_data_parallel_rank() == 5
    assert mpu.get_sequence_parallel_group() is _FakeGroups.sp_group
    assert mpu.get_sequence_data_parallel_group() is _FakeGroups.world_group
    assert mpu.get_model_parallel_rank() == 1
    with pytest.raises(ValueError):
        mpu.initialize_sequence_parallel(2)


def test_no_mpu_without_sp():
    class NoSP(_FakeGroups):
        sp = 1

    assert deepspeed_mpu(NoSP()) is None
    assert isinstance(deepspeed_mpu(_FakeGroups()), SequenceParallelMPU)


def test_step_check_is_sensitive_to_a_wrong_grad_norm():
    """The parity test's one-step comparison must catch a wrong clip coefficient: eps is chosen
    near the gradients' size, so Adam's first step is not just sign(g)."""
    problem = H.make_problem(seed=11)
    ref = H.reference(problem)
    o = problem["optim"]
    model = H.make_model(problem["state_dict"])
    for k, p in model.named_parameters():
        p.grad = ref["grads"][k].clone()
    torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"] * 2)  # norm off by 2x
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), o["weight_decay"]),
                            lr=o["lr"], betas=o["betas"], eps=o["eps"])
    opt.step()
    wrong = {k: p.detach() for k, p in model.named_parameters()}
    err, _ = H.update_err(wrong, ref["params"], problem["state_dict"])
    assert err > 100 * 1e-3


# --------------------------------------------------------------------------------------------
# The spec rule
# --------------------------------------------------------------------------------------------


def test_offload_without_zero_is_rejected(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["parallelism"].update(offloadOptimizer=True, zeroStage=0)
    with pytest.raises(SpecError) as info:
        load(write_spec(data))
    issues = [(i.path, i.rule) for i in info.value.issues]
    assert any(p == "spec.parallelism.offloadOptimizer" and "zeroStage >= 1" in r
               for p, r in issues), issues
    data["spec"]["parallelism"]["zeroStage"] = 1
    load(write_spec(data))  # accepted with ZeRO


@pytest.mark.parametrize(("precision", "device", "stage", "sp", "rejected"), [
    ("bf16", "gpu", 1, 2, True),
    ("auto", "gpu", 1, 8, True),
    ("bf16", "gpu", 2, 2, False),
    ("bf16", "gpu", 1, 1, False),   # ZeRO-1 + bf16 without SP is fine
    ("fp32", "gpu", 1, 2, False),
    ("auto", "cpu", 1, 2, False),   # auto is fp32 on CPU
])
def test_zero1_with_bf16_under_sp_is_rejected(write_spec, precision, device, stage, sp, rejected):
    data = job_dict("quickstart/stage2.yaml")  # SP 2, 2 workers
    spec = data["spec"]
    spec["precision"] = precision
    spec["cluster"].update(device=device, workersPerNode=8)
    spec["parallelism"].update(zeroStage=stage, sequenceParallel=sp)
    spec["globalBatchTokens"] = spec["sequenceLength"] * 8 // sp * 2
    path = write_spec(data)
    if not rejected:
        load(path)
        return
    with pytest.raises(SpecError) as info:
        load(path)
    issues = [(i.path, i.rule) for i in info.value.issues]
    assert any(p == "spec.parallelism.zeroStage" and "ZeRO-1 with bf16" in r
               for p, r in issues), issues
