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

The profiler records only the allocations and frees of its own thread. Python threads would hide
theirs, so the probe refuses to measure a process with other Python threads. One C++ thread
frees memory here: gloo's worker thread holds the tensors of a collective until it has finished
with it, and when the main thread has already dropped its own references (DeepSpeed releasing its
reduction bucket at the end of a backward), the bucket is freed on the gloo thread, a moment after
the reduction and long before the next backward allocates the next one. The profiler never sees
that free, so the dead bucket would stay in the sum and the next one would count twice (measured:
2x in about one run in twenty, ``buckets`` twice the estimate). :class:`BucketFrees` watches
DeepSpeed's buckets and notes the frees that happen on another thread; :func:`peak_allocated`
puts them back into the timeline. Smaller
tensors that gloo frees the same way (ZeRO-0's flattened gradients, 0.7 MiB here) are not
watched: they can add that much to a peak (3-4% of the smallest case), inside the margin.

Usage: ``python memory_probe.py --tasks TASKS.json --out OUT.json`` (a list of {name, job,
shard_dirs, steps}); writes {name: {peak, buckets, rest, off_thread_frees, watched,
losses, grad_norms}}.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import threading
import time
import weakref
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


class BucketFrees:
    """Notes when one of DeepSpeed's reduction buckets is freed on a thread other than this one,
    which the profiler cannot see (see the module docstring). It only looks: after each
    parameter's gradient hook (DeepSpeed's runs first, and allocates the buckets at a backward's
    first one) it takes a weak reference to each bucket in the optimizer's ``ipg_buckets``."""

    def __init__(self) -> None:
        self.thread = threading.get_ident()
        self.refs: dict[int, weakref.ref] = {}  # by id(); a tensor has no hash by value
        self.watched = 0
        self.off_thread: list[tuple[int, int]] = []
        """(time in ns on the profiler's clock, -bytes) of each free on another thread."""

    def watch(self, engine) -> None:
        buckets = getattr(engine.optimizer, "ipg_buckets", None)
        if buckets is None:  # ZeRO-0: no buckets
            return

        def look(_param=None) -> None:
            for bucket in buckets.values():
                held = bucket.buffer if isinstance(bucket.buffer, list) else [bucket.buffer]
                for tensor in held:
                    known = self.refs.get(id(tensor))
                    if isinstance(tensor, torch.Tensor) and (known is None or known() is not tensor):
                        nbytes = tensor.untyped_storage().nbytes()
                        self.refs[id(tensor)] = weakref.ref(
                            tensor, lambda _, n=nbytes: self._freed(n))
                        self.watched += 1

        look()  # ZeRO-3 allocates its buckets with the engine
        for param in engine.module.parameters():
            if param.requires_grad:
                param.register_post_accumulate_grad_hook(look)

    def _freed(self, nbytes: int) -> None:
        if threading.get_ident() != self.thread:
            self.off_thread.append((time.time_ns(), -nbytes))


def peak_allocated(prof, bucket_bytes: int, off_thread: list[tuple[int, int]] = ()) -> dict:
    """Peaks of live bytes from a profile's ``[memory]`` events and the frees the profiler could
    not see (``off_thread``; see the module docstring): ``peak`` of all of them; ``buckets``, the
    most bytes held at once in allocations of at least ``bucket_bytes`` (DeepSpeed's reduction
    buckets, by far the largest tensors of a small model); ``rest``, the peak of everything else.
    Each event is one allocation (+) or free (-), so a bucket-sized free is a bucket's."""
    events = sorted([(e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                     if e.name() == "[memory]"] + list(off_thread))
    live = peak = big = big_peak = rest_peak = 0
    for _, nbytes in events:
        live += nbytes
        if abs(nbytes) >= bucket_bytes:
            big += nbytes
        peak, big_peak = max(peak, live), max(big_peak, big)
        rest_peak = max(rest_peak, live - big)
    if big < 0:
        raise RuntimeError("more bucket-sized frees than allocations: a free was counted twice")
    return {"peak": peak, "buckets": big_peak, "rest": rest_peak}


def run_task(task: dict, root: Path) -> dict:
    from deepspeed.runtime.zero.config import DeepSpeedZeroConfig
    from torch.profiler import ProfilerActivity, profile

    from prolong.stage.payload import StageRun
    from prolong.train.loop import Worker

    ref = {"pipeline": "memory", "stage": task["name"], "kind": "PretrainJob", "id": "t",
           "upstream": [], "storageRoot": str(root / "runs")}
    run = StageRun(job=task["job"], stage=ref, upstream_dir=None, shard_dirs=task["shard_dirs"])
    # A bf16 bucket's bytes (half an fp32 one) of DeepSpeed's default reduce_bucket_size, which
    # our config leaves alone: a bucket of either width counts, and the small model has no other
    # tensor anywhere near that size.
    bucket_bytes = DeepSpeedZeroConfig.model_fields["reduce_bucket_size"].default * 2
    frees = BucketFrees()
    gc.collect()
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        worker = Worker(run, OneProcessContext())
        started = worker.start(None)
        frees.watch(started.built.engine)
        metrics = [worker.train_one(started.built, started.loader, step)
                   for step in range(1, task["steps"] + 1)]
    if threading.active_count() != 1:
        raise RuntimeError(f"the profiler only sees this thread; other threads ran: "
                           f"{[t.name for t in threading.enumerate()]}")
    out = {**peak_allocated(prof, bucket_bytes, frees.off_thread),
           "off_thread_frees": len(frees.off_thread), "watched": frees.watched,
           "losses": [m.loss for m in metrics], "grad_norms": [m.grad_norm for m in metrics]}
    engine = started.built.engine
    engine.destroy()
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
