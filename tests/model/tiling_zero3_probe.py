"""One process of test_memory_knobs' ZeRO-3 check: two optimizer steps of the tiny model through
the product's functions (build_model, apply_memory_settings, build_engine with the spec's loss
chunk, train_step) under DeepSpeed ZeRO-3 on CPU, once plain and once with TiledMLP (3 tiles)
and 100-token loss chunks. ZeRO-3 is where TiledMLP's per-tile recompute meets DeepSpeed's
parameter gathers and its ds_grad_is_ready gradient hooks. Prints {case: [[loss, grad_norm]]}.
(Launched with MASTER_PORT set; one worker over gloo.)"""

from __future__ import annotations

import json
import os
from datetime import timedelta

import torch
import torch.distributed as dist

ARCH = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numKeyValueHeads=2,
            intermediateSize=256, vocabSize=512, tieWordEmbeddings=False)
SEQ = 512


def spec(memory: dict):
    from prolong.spec import PretrainJob

    return PretrainJob.model_validate({
        "apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "m"},
        "spec": {"model": {"architecture": ARCH, "attention": "sdpa"},
                 "data": {"streams": [{"domain": "l", "path": "x", "format": "jsonl",
                                       "packing": "long", "proportion": 1.0}]},
                 "sequenceLength": SEQ, "globalBatchTokens": 2 * SEQ, "steps": 2,
                 "schedule": {"peakLR": 1e-3, "warmupSteps": 0}, "precision": "fp32",
                 "parallelism": {"zeroStage": 3, "memory": memory},
                 "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": 1}}}).spec


def main() -> None:
    from prolong.model.build import build_model
    from prolong.model.tiling import apply_memory_settings
    from prolong.parallel.step import train_step
    from prolong.parallel.ulysses import skip_cpu_shm_comm_build
    from prolong.train.engine import build_engine

    torch.set_num_threads(1)
    # As the Worker does: no JIT build of DeepSpeed's CPU shared-memory op (gloo never uses it,
    # and its build waits on a lock in the shared torch_extensions cache).
    skip_cpu_shm_comm_build()
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=300))
    gen = torch.Generator().manual_seed(0)
    rows = []
    for _ in range(2):
        ids = torch.randint(0, ARCH["vocabSize"], (1, SEQ), generator=gen)
        labels = torch.roll(ids, -1, 1)
        labels[0, -1] = -100
        rows.append({"input_ids": ids, "shift_labels": labels,
                     "position_ids": torch.arange(SEQ).unsqueeze(0)})
    out = {}
    cases = {"plain": {}, "tiled": {"tiledMlp": True, "tiledMlpShards": 3, "lossChunkTokens": 100}}
    for name, memory in cases.items():
        s = spec(memory)
        groups = s.parallel_dims.build(0)
        model = build_model(s.model, activation_checkpointing=True, seed=0)
        apply_memory_settings(model, s.parallelism)
        built = build_engine(model, s, groups, chunk_tokens=s.parallelism.memory.loss_chunk_tokens)
        out[name] = [[r.loss, r.grad_norm] for r in
                     (train_step(built.engine, rows, groups) for _ in range(2))]
        built.engine.destroy()
    print("RESULT " + json.dumps(out), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
