"""parallelism.memory does not change what is computed: TiledMLP on or off, any loss chunk size,
give the same loss and gradients (1e-5, fp32) on the tiny model built by the product's own
build_model and prepared by the function the train loop calls (apply_memory_settings). This is
what lets the settings sit in SCHEDULING_ONLY (prolong.stage.identity). The same through the
whole Worker and DeepSpeed is in tests/model/test_memory.py."""

from __future__ import annotations

import pytest
import torch

from prolong.model.build import build_model, packed_lm_loss
from prolong.model.tiling import apply_memory_settings, auto_tiles, gated_mlps, tile_mlps
from prolong.spec import ArchitectureSpec, ModelSpec, ParallelismSpec

TOL = 1e-5


def tiny_model(*, checkpointing: bool):
    spec = ModelSpec(architecture=ArchitectureSpec(preset="tiny"), attention="sdpa")
    model = build_model(spec, dtype=torch.float32, activation_checkpointing=checkpointing, seed=0)
    model.train()
    return model


def packed(seq: int = 96, vocab: int = 4096):
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(0, vocab, (1, seq), generator=gen)
    lengths = [40, 31, seq - 71]
    pos = torch.cat([torch.arange(n) for n in lengths]).unsqueeze(0)
    labels = torch.roll(ids, -1, dims=1)
    starts = torch.cumsum(torch.tensor(lengths), 0)
    labels[0, starts - 1] = -100
    return ids, pos, labels


def loss_and_grads(model, *, chunk_tokens: int = 8192):
    ids, pos, labels = packed()
    model.zero_grad(set_to_none=True)
    loss, _ = packed_lm_loss(model, ids, pos, labels, normalizer=90.0, chunk_tokens=chunk_tokens)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


def assert_same(a, b):
    torch.testing.assert_close(a[0], b[0], rtol=TOL, atol=TOL)
    for name in a[1]:
        torch.testing.assert_close(a[1][name], b[1][name], rtol=TOL, atol=TOL, msg=name)


@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("shards", [None, 5])
def test_tiled_mlp_gives_the_same_loss_and_gradients(checkpointing, shards):
    plain = loss_and_grads(tiny_model(checkpointing=checkpointing))
    model = tiny_model(checkpointing=checkpointing)
    memory = {"tiledMlp": True, "tiledMlpShards": shards}
    apply_memory_settings(model, ParallelismSpec.model_validate(
        {"activationCheckpointing": checkpointing, "memory": memory}))
    # The MLPs really run through DeepSpeed's TiledMLP (96 tokens / hidden 64 -> 2 tiles auto).
    seen = []
    for mlp in gated_mlps(model):
        mlp.register_forward_hook(lambda m, i, out: seen.append(type(out.grad_fn).__name__))
    tiled = loss_and_grads(model)
    assert seen and all("TiledMLP" in name for name in seen), seen
    assert_same(tiled, plain)


def test_auto_tiles_follow_alst():
    # ALST: ceil(seqlen / hidden). 65,536 local tokens of Llama-3-8B (hidden 4096): 16 tiles.
    assert auto_tiles(65536, 4096) == 16
    assert auto_tiles(96, 64) == 2 and auto_tiles(10, 64) == 1


def test_tiling_a_model_without_gated_mlps_is_an_error():
    with pytest.raises(ValueError, match="no gated MLP"):
        tile_mlps(torch.nn.Sequential(torch.nn.Linear(4, 4)))


@pytest.mark.parametrize("chunk", [1, 7, 32, 96, 8192])
def test_loss_chunk_size_gives_the_same_loss_and_gradients(chunk):
    model = tiny_model(checkpointing=True)
    assert_same(loss_and_grads(model, chunk_tokens=chunk), loss_and_grads(model, chunk_tokens=5))


def test_activation_offload_on_cpu_is_what_the_spec_rule_refuses():
    # transformers offloads into pinned host memory; a CPU-only torch has no pinned allocator.
    # prolong.spec.rules refuses activationOffload on CPU workers for this reason.
    model = tiny_model(checkpointing=True)
    apply_memory_settings(model, ParallelismSpec.model_validate(
        {"activationCheckpointing": True, "memory": {"activationOffload": True}}))
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinned memory works here")
    with pytest.raises(RuntimeError, match="pin_memory"):
        loss_and_grads(model)


def test_activation_offload_needs_checkpointing_in_the_model_too():
    with pytest.raises(ValueError, match="activationCheckpointing"):
        apply_memory_settings(tiny_model(checkpointing=False), ParallelismSpec.model_validate(
            {"activationCheckpointing": False, "memory": {"activationOffload": True}}))


def test_memory_settings_keep_the_stage_id():
    from prolong.specfile import load
    from prolong.stage.identity import stage_id
    from tests.conftest import JOBS

    job = load(JOBS / "prolong-8b/stage2-512k.yaml").document
    par = job.spec.parallelism
    changed = par.model_copy(update={"memory": par.memory.model_copy(update=dict(
        loss_chunk_tokens=2048, tiled_mlp=True, tiled_mlp_shards=8, activation_offload=True,
        expandable_segments=False))})
    other = job.model_copy(update={"spec": job.spec.model_copy(update={"parallelism": changed})})
    assert stage_id(other) == stage_id(job)
    # ... while a field that changes what is computed still changes it.
    zero2 = job.model_copy(update={"spec": job.spec.model_copy(update={
        "parallelism": par.model_copy(update={"zero_stage": 2})})})
    assert stage_id(zero2) != stage_id(job)


@pytest.mark.slow
def test_tiled_mlp_under_zero3_gives_the_same_steps():
    import json
    import os
    import socket
    import subprocess
    import sys
    from pathlib import Path

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "MASTER_PORT": str(port), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(Path(__file__).with_name("tiling_zero3_probe.py"))],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT "))
    out = json.loads(line.removeprefix("RESULT "))
    for (loss, norm), (loss_t, norm_t) in zip(out["plain"], out["tiled"], strict=True):
        assert loss_t == pytest.approx(loss, rel=TOL) and norm_t == pytest.approx(norm, rel=TOL)
    assert out["plain"][1][0] < out["plain"][0][0]  # it trains: the second step's loss is lower
