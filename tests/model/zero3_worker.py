"""One rank of the ZeRO-3 loading test: load a saved model through the trainer's own path
(``zero3_partitioning`` -> ``build_model(zero3=...)``) and measure this process's peak memory
while it loads.

Launched by ``sp_harness.launch`` (gloo on CPU, ``DS_ACCELERATOR=cpu``). The measure is the
process's resident-set high-water mark (``VmHWM``), reset just before loading by writing 5 to
``/proc/self/clear_refs``, minus the resident set at that moment. On CPU every tensor is host
memory, and torch has no CPU allocator statistics; tracemalloc sees only Python's allocator, not
tensor storage. Resident memory sees every page the load touches (tensors, DeepSpeed's buffers,
safetensors reads), so it can only overstate what loading holds, with one exception: freed memory
that glibc keeps mapped and that a later allocation reuses is not counted twice. The launcher
fixes glibc's mmap threshold at 64 KiB (``MALLOC_MMAP_THRESHOLD_``) so that every tensor-sized
allocation is its own mapping, returned to the system when freed, and the same measure of a full
(ZeRO-2) load, run in the same process, shows it reaches the whole model.

Rank 0 writes every rank's figures and the gathered weights' comparison with the saved file.
The same measure covers writing the partitioned model back (``prolong.model.save``, what the
trainer's ``_finalize`` writes final/ with): rank 0 writes the file, every rank gathers.
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


def resident_kib() -> dict[str, int]:
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0])
    return out


def peak_while(fn):
    """(fn's result, bytes by which this process's peak resident set rose above its resident set
    at the start)."""
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current VmRSS
    start = resident_kib()["VmRSS"]
    result = fn()
    return result, (resident_kib()["VmHWM"] - start) * 1024


def read_all(model):
    """``model``, every parameter read once."""
    for p in model.parameters():
        float(p.detach().sum())
    return model


def zero3_spec(world: int, arch: dict):
    from prolong.spec import PretrainSpec

    return PretrainSpec.model_validate({
        "model": {"architecture": arch, "attention": "sdpa"},
        "data": {"streams": [{"domain": "d", "path": "x.jsonl", "format": "jsonl",
                              "proportion": 1.0}]},
        "sequenceLength": 256, "globalBatchTokens": 256 * world, "steps": 1,
        "schedule": {"peakLR": 1e-3, "warmupSteps": 0, "decay": "constant"},
        "precision": "fp32",
        "parallelism": {"zeroStage": 3},
        "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": world}})


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    parser.add_argument("--warmup-model", required=True, help="a micro model, loaded first")
    parser.add_argument("--warmup", required=True, help="its architecture as JSON")
    parser.add_argument("--arch", required=True, help="the architecture as JSON")
    parser.add_argument("--no-weights", required=True, help="a model directory with only its "
                        "config.json: refused on every rank")
    parser.add_argument("--save-to", required=True, help="where rank 0 writes the loaded model "
                        "back through the trainer's final/ writer (prolong.model.save)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=120))
    rank, world = dist.get_rank(), dist.get_world_size()
    from safetensors.torch import load_file

    from prolong.model.build import build_model
    from prolong.model.save import save_weights
    from prolong.model.zero3 import PartitionedLoadError, gathered_parameters
    from prolong.parallel.ulysses import ensure_deepspeed_comm
    from prolong.train.loop import zero3_partitioning

    arch = json.loads(args.arch)
    spec = zero3_spec(world, arch)
    groups = spec.parallel_dims.build(rank)
    ensure_deepspeed_comm()
    zero3 = zero3_partitioning(spec, groups)
    # Both paths once on a micro model first: what the first load costs the process once (modules
    # imported, DeepSpeed's and transformers' set-up) is not memory this model's loading holds.
    warm = zero3_spec(world, json.loads(args.warmup)).model
    for _ in gathered_parameters(build_model(warm, source=args.warmup_model, zero3=zero3)):
        pass
    read_all(build_model(warm, source=args.warmup_model, local_files_only=True))

    model, zero3_peak = peak_while(lambda: build_model(spec.model, source=args.model,
                                                       zero3=zero3))
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    # Gathered one parameter at a time; compared on rank 0 with what was saved.
    saved = load_file(str(Path(args.model) / "model.safetensors")) if rank == 0 else {}
    worst, names = 0.0, []
    for name, value in gathered_parameters(model):
        if rank == 0:
            names.append(name)
            worst = max(worst, float((value - saved[name]).abs().max()))
    del saved
    gc.collect()
    # Writing it back as final/ is written: one parameter gathered at a time, streamed to disk.
    save_to = Path(args.save_to) if rank == 0 else None
    if save_to is not None:
        save_to.mkdir(parents=True, exist_ok=True)
    _, save_peak = peak_while(lambda m=model: save_weights(m, save_to))

    def gather_all(m=model):
        """The control: what _finalize did before, every parameter gathered at once."""
        import deepspeed

        with deepspeed.zero.GatheredParameters(list(m.parameters())):
            read_all(m)

    _, gather_all_peak = peak_while(gather_all)
    del model
    gc.collect()
    dist.barrier()
    # The control: the ZeRO 0-2 path (from_pretrained, a full copy per rank), same measure. Its
    # parameters may be views of the mapped safetensors file, read only when first used (on a
    # GPU, when they are copied to the device): they are read here, as training would.
    full, full_peak = peak_while(lambda: read_all(build_model(spec.model, source=args.model,
                                                              local_files_only=True)))
    del full
    try:
        build_model(warm, source=args.no_weights, zero3=zero3)
        refusal = None
    except PartitionedLoadError as exc:
        refusal = str(exc)
    figures = {"rank": rank, "refusal": refusal, "zero3_peak": zero3_peak, "partition_bytes": local,
               "full_peak": full_peak, "save_peak": save_peak,
               "gather_all_peak": gather_all_peak}
    every = [None] * world
    dist.all_gather_object(every, figures)
    if rank == 0:
        Path(args.out).write_text(json.dumps({"ranks": every, "worst_abs_diff": worst,
                                              "names": names}))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    main()
