"""One process of the memory tests: real training steps through the trainer's own Worker (model,
parallelism.memory settings, DeepSpeed engine with the spec's loss chunk, loader, train_step) on
CPU, one worker over gloo, with the peak of torch's CPU allocations measured around them.

How the peak is measured: torch 2.13 has no CPU allocator statistics (no ``torch.cpu.memory``),
tracemalloc does not see torch's allocations, and RSS hides ``torch.empty`` pages never touched
(DeepSpeed's 5e8-element reduction bucket) while counting the interpreter's. The profiler does
see every allocation and free of c10's CPU allocator (``profile_memory=True``: a ``[memory]``
event with the signed size of each), so the running sum of those events, in time order, is the
live bytes torch allocated since the profiler started; its maximum is the peak. The profiler
starts before the model is built, so parameters, gradients, optimizer state, DeepSpeed's buffers
and every activation count, which is what the estimate claims for a GPU.

Usage: ``python memory_probe.py --tasks TASKS.json --out OUT.json`` (a list of {name, job,
shard_dirs, steps}); writes {name: {peak, losses, grad_norms}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class OneProcessContext:
    """What Worker asks of Ray Train's context, for a world of one."""

    def get_world_rank(self) -> int:
        return 0

    def get_world_size(self) -> int:
        return 1

    def get_local_rank(self) -> int:
        return 0


def peak_allocated(prof) -> int:
    """Peak of live bytes from a profile's ``[memory]`` events (see the module docstring)."""
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    live = peak = 0
    for e in events:
        live += e.nbytes()
        peak = max(peak, live)
    return peak


def run_task(task: dict, root: Path) -> dict:
    from torch.profiler import ProfilerActivity, profile

    from prolong.stage.payload import StageRun
    from prolong.train.loop import Worker

    ref = {"pipeline": "memory", "stage": task["name"], "kind": "PretrainJob", "id": "t",
           "upstream": [], "storageRoot": str(root / "runs")}
    run = StageRun(job=task["job"], stage=ref, upstream_dir=None, shard_dirs=task["shard_dirs"])
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        worker = Worker(run, OneProcessContext())
        started = worker.start(None)
        metrics = [worker.train_one(started.built, started.loader, step)
                   for step in range(1, task["steps"] + 1)]
    out = {"peak": peak_allocated(prof), "losses": [m.loss for m in metrics],
           "grad_norms": [m.grad_norm for m in metrics]}
    started.built.engine.destroy()
    del started, worker, prof
    gc.collect()
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tasks", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()
    torch.set_num_threads(1)
    for name, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"),
                        ("WORLD_SIZE", "1")):
        os.environ.setdefault(name, value)
    dist.init_process_group("gloo", rank=0, world_size=1, timeout=timedelta(seconds=300))
    try:
        results = {}
        for task in json.loads(Path(args.tasks).read_text()):
            results[task["name"]] = run_task(task, Path(args.tasks).parent)
            print(f"task {task['name']} done", file=sys.stderr, flush=True)
        Path(args.out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
