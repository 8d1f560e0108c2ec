"""One rank of the reshape tests: training stages through the trainer's own Worker, over plain
torch.distributed (gloo on CPU) instead of Ray Train.

Launched by ``sp_harness.launch`` with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. For each task
of the plan it builds :class:`prolong.train.loop.Worker` for the task's stage and calls what
``Worker.run`` calls: ``start`` (resume choice, universal conversion, engine, loader, restore),
``train_one`` per step, ``write_checkpoint`` where Ray Train would persist one (here straight into
the stage directory, where Ray Train copies it) and ``_finalize`` (final/, manifest, COMPLETE).
Rank 0 writes each task's per-step losses, grad norms, learning rates, scheduler step counts and
digests of the rows it read, and the scheduler's state right after ``start``, to the plan's
output file.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import gc
import json
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist


class GlooContext:
    """The three answers Worker asks of Ray Train's context, from torch.distributed."""

    def get_world_rank(self) -> int:
        return dist.get_rank()

    def get_world_size(self) -> int:
        return dist.get_world_size()

    def get_local_rank(self) -> int:
        return dist.get_rank()


@contextlib.contextmanager
def load_spies():
    """Counts of the product's own loaders while the block runs: the weights loaders
    ``build_model`` calls (``from_pretrained``'s wrapper, ZeRO-3's streaming loader) and
    DeepSpeed's ``load_checkpoint`` (the universal load calls it too). Each spy calls the real
    function."""
    import deepspeed.runtime.engine as ds_engine

    import prolong.model.build as build

    counts = {"weights": 0, "checkpoint": 0}
    targets = [(build, "_load_pretrained", "weights"), (build, "load_partitioned", "weights"),
               (ds_engine.DeepSpeedEngine, "load_checkpoint", "checkpoint")]
    originals = [getattr(owner, name) for owner, name, _ in targets]

    def spy(real, kind):
        @functools.wraps(real)
        def counted(*args, **kwargs):
            counts[kind] += 1
            return real(*args, **kwargs)
        return counted

    for (owner, name, kind), real in zip(targets, originals, strict=True):
        setattr(owner, name, spy(real, kind))
    try:
        yield counts
    finally:
        for (owner, name, _), real in zip(targets, originals, strict=True):
            setattr(owner, name, real)


def run_task(task: dict) -> dict:
    from prolong.stage.directory import StageDir
    from prolong.stage.payload import StageRun
    from prolong.train.checkpoints import checkpoint_dir_name
    from prolong.train.loop import Worker

    run = StageRun(job=task["job"], stage=task["ref"], upstream_dir=task.get("upstream_dir"),
                   shard_dirs=task["shard_dirs"])
    worker = Worker(run, GlooContext())
    stage = StageDir(worker.ref.directory)
    resume = task.get("resume")
    if task.get("expect_error"):  # a start that must be refused: its message, from every rank
        try:
            worker.start(Path(resume) if resume else None)
        except Exception as exc:
            return {"error": f"{type(exc).__name__}: {exc}"}
        raise AssertionError(f"task {task['name']} started")
    with load_spies() as loads:
        started = worker.start(Path(resume) if resume else None)
    built, loader = started.built, started.loader
    if task.get("state_after_start"):  # what the stage inherited, before its first step
        save_state(built, started.model, task["state_after_start"])
    # The schedule where start() left it: the scheduler's step count and the LR it set.
    scheduler = {"last_epoch": built.scheduler.last_epoch,
                 "lr": built.scheduler.get_last_lr(),
                 "optimizer_lr": [g["lr"] for g in built.engine.optimizer.param_groups]}
    drawn = watch_rows(loader)
    losses, grad_norms, lrs, rows, scheduler_steps = {}, {}, {}, {}, {}
    for step in range(started.step + 1, task["until"] + 1):
        scheduler_steps[step] = built.scheduler.last_epoch  # updates taken before this one
        metrics = worker.train_one(built, loader, step)
        losses[step], grad_norms[step], lrs[step] = metrics.loss, metrics.grad_norm, metrics.lr
        rows[step] = drawn[-1]
        if step in task.get("save", []):
            directory = Path(stage.uri) / checkpoint_dir_name(step)
            directory.mkdir(parents=True, exist_ok=True)
            worker.write_checkpoint(directory, built.engine, loader, step, stage)
            dist.barrier()
    if task.get("state_at_end"):  # what a downstream stage must inherit
        save_state(built, started.model, task["state_at_end"])
    if task.get("finalize"):
        worker._finalize(built.engine, started.model, stage, task["until"])
        if task.get("gathered_to"):  # what final/ must hold: DeepSpeed's own fp32 gather,
            # not prolong.model.zero3's (which final/ is written with)
            from deepspeed.utils import safe_get_full_fp32_param

            gathered = {name: safe_get_full_fp32_param(p).detach().clone().reshape(p.ds_shape)
                        for name, p in started.model.named_parameters()}
            if dist.get_rank() == 0:
                torch.save(gathered, task["gathered_to"])
    out = {"start_step": started.step, "losses": losses, "grad_norms": grad_norms,
           "lrs": lrs, "rows": rows, "scheduler_steps": scheduler_steps,
           "scheduler_after_start": scheduler, "loads": loads,
           "universal": built.config.get("checkpoint", {}).get("load_universal", False)}
    built.engine.destroy()
    del built, started
    gc.collect()
    return out


def watch_rows(loader) -> list[str]:
    """A digest of the tokens of every step's rows this rank reads, appended as ``train_one``
    draws them (a spy around the loader's own ``next_step``, which it calls)."""
    import hashlib

    digests = []
    real = loader.next_step

    @functools.wraps(real)
    def next_step():
        batches = real()
        h = hashlib.sha256()
        for batch in batches:
            h.update(batch.input_ids.numpy().tobytes())
        digests.append(h.hexdigest()[:16])
        return batches

    loader.next_step = next_step
    return digests


def save_state(built, model, path: str) -> None:
    """The full fp32 weights, AdamW moments and learning rate the engine holds, gathered by
    DeepSpeed (collective: every rank), saved by rank 0."""
    from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_optimizer_state

    zero_optimizer = built.engine.optimizer
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        # DeepSpeed 0.19's ZeRO-1/2 links parameters to optimizer state after the first param
        # group's first step, before torch's AdamW made state for the second: link again.
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    state = {"weights": {}, "exp_avg": {}, "exp_avg_sq": {}}
    for name, p in model.named_parameters():
        shape = getattr(p, "ds_shape", p.shape)
        state["weights"][name] = safe_get_full_fp32_param(p).detach().clone().reshape(shape)
        for key in ("exp_avg", "exp_avg_sq"):
            try:
                value = safe_get_full_optimizer_state(p, key)
            except ValueError:  # the optimizer holds no such state (nothing was loaded)
                value = torch.zeros(shape)
            state[key][name] = value.detach().clone().reshape(shape)
    state["lr"] = [g["lr"] for g in built.engine.optimizer.param_groups]
    state["scheduler_lr"] = built.scheduler.get_last_lr()
    if dist.get_rank() == 0:
        torch.save(state, path)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--plan", required=True)
    ap.add_argument("--out", required=True)
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=300))
    try:
        results = {}
        for task in json.loads(Path(args.plan).read_text()):
            began = time.perf_counter()
            results[task["name"]] = {**run_task(task), "seconds": time.perf_counter() - began}
            print(f"task {task['name']} done", file=sys.stderr, flush=True)
        if rank == 0:
            Path(args.out).write_text(json.dumps(results))
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
