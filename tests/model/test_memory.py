"""The per-GPU memory estimate (prolong.model.memory): its arithmetic against hand-computed numbers
for the Llama-3-8B shape, and the estimate held to the measured peak of real training steps of a
small model on CPU through the trainer's own Worker (tests/model/memory_probe.py says how the
peak is measured)."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from prolong.data.shards import ShardWriter
from prolong.model.memory import (
    DEVICE_MEMORY_BYTES,
    ESTIMATE_MARGIN,
    GIB,
    REDUCE_BUCKET_ELEMENTS,
    allocator_env,
    estimate_memory,
    parameter_count,
)
from prolong.spec import ArchitectureSpec, MemorySpec, PretrainJob
from prolong.specfile import load
from tests.conftest import JOBS

LLAMA_8B_PARAMS = 8_030_261_248  # Meta-Llama-3-8B's published count


def stage2():
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    return loaded.jobs["stage2"].spec, ArchitectureSpec(preset="llama3-8b")


def with_parallelism(spec, **changes):
    par = spec.parallelism.model_copy(update=changes)
    return spec.model_copy(update={"parallelism": par})


def test_parameter_count_is_llama3_8b():
    assert parameter_count(ArchitectureSpec(preset="llama3-8b")) == LLAMA_8B_PARAMS


def test_stage2_by_hand():
    spec, arch = stage2()  # 512K, SP 8 x DP 8 = 64 workers, ZeRO-3, bf16, checkpointing
    e = estimate_memory(spec, arch)
    n, w, t = LLAMA_8B_PARAMS, 64, 524288 // 8
    assert e.parameters == n * 2 / w                     # bf16, partitioned (ZeRO-3)
    assert e.gradients == n * 4 / w                      # fp32 accumulation, partitioned
    assert e.optimizer == n * 12 / w                     # fp32 master + 2 moments, partitioned
    # One bf16 bucket (ZeRO-3), and the fp32 copy it is cast to for the reduction
    # (parallelism.communication.dataType: fp32, DeepSpeed's own choice under SP > 1).
    assert e.zero_buffers == REDUCE_BUCKET_ELEMENTS * (2 + 4)
    assert e.checkpoints == 33 * t * 4096 * 2            # 32 layer inputs + the final hidden
    assert e.checkpoints / GIB == pytest.approx(16.5)
    # The loss chunk: 8,192 x 128,256 logits at 16 bytes (3 fp32 + 2 bf16), two hidden-state
    # gradients, and the gathered LM head with its gradient (ZeRO-3).
    assert e.loss == 8192 * 128256 * 16 + 2 * t * 4096 * 2 + 128256 * 4096 * 4
    # MLP: norm output + (4 saved + 2 gradients) x T x 14336, bf16.
    assert e.mlp == t * 4096 * 2 + 6 * t * 14336 * 2
    assert e.transient_kind == "loss chunk"
    assert e.peak / GIB == pytest.approx(40.01, abs=0.01)
    assert e.device_bytes == DEVICE_MEMORY_BYTES["H100"] and e.fits and not e.tight


def test_reduction_precision_and_overlap_are_counted():
    from prolong.spec import CommunicationSpec

    spec, arch = stage2()
    fp32 = estimate_memory(spec, arch)
    bf16 = estimate_memory(with_parallelism(
        spec, communication=CommunicationSpec(data_type="bf16")), arch)
    assert fp32.zero_buffers - bf16.zero_buffers == REDUCE_BUCKET_ELEMENTS * 4  # the fp32 cast
    zero2 = with_parallelism(spec, zero_stage=2)
    plain = estimate_memory(with_parallelism(
        zero2, communication=CommunicationSpec(overlap_comm=False)), arch)
    overlap = estimate_memory(zero2, arch)  # left out: on for GPU workers
    assert plain.zero_buffers == REDUCE_BUCKET_ELEMENTS * 4
    assert overlap.zero_buffers == 2 * plain.zero_buffers


def test_memory_settings_move_the_peak():
    spec, arch = stage2()
    base = estimate_memory(spec, arch)
    small_chunk = estimate_memory(with_parallelism(
        spec, memory=MemorySpec(loss_chunk_tokens=2048)), arch)
    assert base.loss - small_chunk.loss == 6144 * 128256 * 16
    tiled = estimate_memory(with_parallelism(spec, memory=MemorySpec(tiled_mlp=True)), arch)
    assert tiled.mlp_tiles == 16 and tiled.mlp < base.mlp / 3
    offload = estimate_memory(with_parallelism(spec, memory=MemorySpec(activation_offload=True)),
                              arch)
    assert offload.checkpoints == 65536 * 4096 * 2 and offload.host == 32 * 65536 * 4096 * 2
    off_opt = estimate_memory(with_parallelism(spec, offload_optimizer=True), arch)
    assert off_opt.optimizer == 0 and off_opt.host == LLAMA_8B_PARAMS * 12 / 64


def test_zero_stages_by_hand():
    spec, arch = stage2()
    n, w = LLAMA_8B_PARAMS, 64
    z0 = estimate_memory(with_parallelism(spec, zero_stage=0), arch)
    assert (z0.parameters, z0.gradients, z0.optimizer, z0.zero_buffers) == (2 * n, 2 * n,
                                                                             12 * n, 0)
    z2 = estimate_memory(with_parallelism(spec, zero_stage=2), arch)
    assert (z2.parameters, z2.gradients, z2.optimizer) == (2 * n, 4 * n / w, 12 * n / w)
    # overlap_comm double-buffers; ZeRO-2 buckets at the reduction's precision (fp32 by default)
    assert z2.zero_buffers == 2 * REDUCE_BUCKET_ELEMENTS * 4
    assert not z0.fits  # 16 bytes x 8B parameters on every GPU


def test_allocator_env_only_on_gpu():
    assert allocator_env(MemorySpec(), gpu=True) == {
        "PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_env(MemorySpec(), gpu=False) == {}
    assert allocator_env(MemorySpec(expandable_segments=False), gpu=True) == {}


def test_workers_and_pods_get_the_allocator_setting():
    from prolong.k8s import render
    from prolong.train.entry import worker_env

    assert worker_env(True, memory=MemorySpec())["PYTORCH_CUDA_ALLOC_CONF"] == \
        "expandable_segments:True"
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_env(True, memory=MemorySpec(
        expandable_segments=False))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in worker_env(False, memory=MemorySpec())
    _, rayjob = render(load(JOBS / "prolong-8b/stage2-512k.yaml"))
    spec = rayjob["spec"]["rayClusterSpec"]
    pods = [spec["headGroupSpec"], *spec["workerGroupSpecs"]]
    for pod in pods:
        # The Ray container comes first; the head also runs the driver-log follower (HTTPMode).
        container = pod["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        assert env["PYTORCH_CUDA_ALLOC_CONF"] == "expandable_segments:True"
    _, cpu_rayjob = render(load(JOBS / "quickstart/stage1.yaml"))
    assert "PYTORCH_CUDA_ALLOC_CONF" not in json.dumps(cpu_rayjob)


# -- measured on CPU -------------------------------------------------------------------------

PROBE = Path(__file__).resolve().parent / "memory_probe.py"
# Small enough for seconds per step, large enough that activations and logits (MiBs) dominate
# the profiler's own noise.
ARCH = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numKeyValueHeads=2,
            intermediateSize=256, vocabSize=512, tieWordEmbeddings=False)
MARGIN = ESTIMATE_MARGIN
"""estimate / measured must lie in [1 - MARGIN, 1 + MARGIN]: the product's own margin, the one
``plan`` warns with. Measured (the probe as the fixture runs it; 3 runs of every case and 14 more
of ZeRO-1/2): 0.927 without checkpointing (autograd keeps a few small tensors per layer that the
estimate does not count), 0.96-1.03 for the others, whole and without the buckets; the buckets
exactly the estimate's in every run, 8 of which had a bucket freed on gloo's thread."""

CASES = {
    # name: (sequence length, zero stage, activation checkpointing, memory settings)
    "checkpointed": (2048, 0, True, {}),
    "no-checkpointing": (2048, 0, False, {}),
    "mlp-bound": (4096, 0, True, {"lossChunkTokens": 512}),
    "mlp-bound-tiled": (4096, 0, True, {"lossChunkTokens": 512, "tiledMlp": True}),
    "loss-bound": (1024, 0, True, {"lossChunkTokens": 1024}),
    "zero1": (2048, 1, True, {}),
    "zero2": (2048, 2, True, {}),
    "zero2-tiled-chunked": (2048, 2, True, {"tiledMlp": True, "tiledMlpShards": 3,
                                             "lossChunkTokens": 300}),
    # ZeRO-3 builds the model partitioned (zero.Init) and allocates its one bucket at start-up.
    "zero3": (2048, 3, True, {}),
    "zero3-tiled-chunked": (2048, 3, True, {"tiledMlp": True, "lossChunkTokens": 300}),
}


def job(seq: int, zero: int, checkpointing: bool, memory: dict) -> dict:
    return {"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "memory"},
            "spec": {"model": {"architecture": ARCH, "attention": "sdpa"},
                     "data": {"streams": [{"domain": "long", "path": "long.jsonl",
                                           "format": "jsonl", "packing": "long",
                                           "proportion": 1.0}]},
                     "sequenceLength": seq, "globalBatchTokens": seq, "steps": 2,
                     "schedule": {"peakLR": 1e-3, "warmupSteps": 0}, "precision": "fp32",
                     "parallelism": {"zeroStage": zero, "activationCheckpointing": checkpointing,
                                     "memory": memory},
                     "checkpoint": {"everySteps": 100},
                     "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": 1}}}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def measured(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    rng = np.random.default_rng(0)
    shard_dirs = {}
    for seq in sorted({c[0] for c in CASES.values()}):
        writer = ShardWriter(root / f"long-{seq}", dtype=np.uint16)
        for _ in range(2):
            writer.add(rng.integers(0, ARCH["vocabSize"], size=seq))
        shard_dirs[seq] = {"long": str(writer.close())}
    tasks = [{"name": name, "job": job(*case), "shard_dirs": shard_dirs[case[0]], "steps": 2}
             for name, case in CASES.items()]
    (root / "tasks.json").write_text(json.dumps(tasks))
    env = {**os.environ, "MASTER_PORT": str(free_port()), "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    proc = subprocess.run([sys.executable, str(PROBE), "--tasks", str(root / "tasks.json"),
                           "--out", str(root / "out.json")], env=env, capture_output=True,
                          text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {t["name"]: (PretrainJob.model_validate(t["job"]), r)
            for t in tasks for r in [json.loads((root / "out.json").read_text())[t["name"]]]}



def mib(value: float) -> str:
    return f"{value / 2**20:.2f} MiB"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(CASES))
def test_estimate_holds_to_the_measured_cpu_peak(measured, name):
    job_, result = measured[name]
    estimate = estimate_memory(job_.spec, job_.spec.model.architecture)
    ratio = estimate.peak / result["peak"]
    assert 1 - MARGIN <= ratio <= 1 + MARGIN, (
        f"{name}: estimate {mib(estimate.peak)}, measured {mib(result['peak'])} (x{ratio:.3f})")
    # DeepSpeed's reduction buckets (5e8 elements, ~1.9 GiB in fp32) dwarf the small model, so
    # the whole peak alone would hold little else to the margin: the rest is held on its own...
    rest = (estimate.peak - estimate.zero_buffers) / result["rest"]
    assert 1 - MARGIN <= rest <= 1 + MARGIN, (
        f"{name} without the buckets: estimate {mib(estimate.peak - estimate.zero_buffers)}, "
        f"measured {mib(result['rest'])} (x{rest:.3f})")
    # ... and the buckets exactly: never two sets alive at once (see estimate_memory).
    assert result["buckets"] == estimate.zero_buffers, (
        f"{name}: {mib(result['buckets'])} of reduction buckets alive at once, the estimate "
        f"counts {mib(estimate.zero_buffers)}")


@pytest.mark.slow
def test_memory_settings_change_no_loss_through_the_worker(measured):
    # The train loop's own path (apply_memory_settings, the engine's loss chunk), ZeRO 0-3:
    # the same two losses with TiledMLP and other chunk sizes, up to float rounding.
    def losses(name):
        return measured[name][1]["losses"]

    assert losses("mlp-bound-tiled") == pytest.approx(losses("mlp-bound"), rel=1e-6)
    assert losses("zero2-tiled-chunked") == pytest.approx(losses("zero2"), rel=1e-6)
    assert losses("zero2") == pytest.approx(losses("checkpointed"), rel=1e-6)
    assert losses("zero1") == pytest.approx(losses("checkpointed"), rel=1e-6)
    assert losses("zero3-tiled-chunked") == pytest.approx(losses("zero3"), rel=1e-6)
    # ... and the settings did something: the tiled run's peak is well below the plain one's.
    assert measured["mlp-bound-tiled"][1]["peak"] < 0.6 * measured["mlp-bound"][1]["peak"]
