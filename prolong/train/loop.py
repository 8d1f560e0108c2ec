"""The per-worker train loop that Ray Train runs: one stage, from start (or resume) to final/.

Per worker: build the model (random, pretrained, or the upstream stage's final/ weights), route
attention through our document-masked backend (wrapped by Ulysses when SP > 1), hand it to
DeepSpeed ZeRO with our AdamW and LR schedule, and feed this data-parallel rank's packed rows.
Each optimizer step is :func:`prolong.parallel.step.train_step` (the protocol the parity tests
hold to a single process).

State and its order of writing:

- every ``checkpoint.everySteps`` steps and at the last step, every rank writes its DeepSpeed
  shards (parameters, optimizer, LR scheduler), the loader state and its RNG state into a local
  temporary directory, reported with ``ray.train.report(checkpoint=...)``: Ray Train persists
  it as ``<stage dir>/checkpoint-<step>`` and only then registers it, so a crash mid-save keeps
  the previous checkpoint as the latest;
- after the last step, rank 0 writes ``final/`` (HF weights + tokenizer) through a temporary name,
  then ``manifest.json``, then ``COMPLETE``.

Resumption: Ray Train hands the latest checkpoint back (``ray.train.get_checkpoint``) when a run
with the same name and storage path is fitted again, or after a worker failure. A stage whose last
step was checkpointed but whose final/ was not written resumes straight into writing final/.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

CHECKPOINT_TAG = "ds"
TRAINER_STATE = "trainer_state.json"
FAULT_ENV = "PROLONG_FAULT"
"""Failure injection for recovery tests and drills: ``step:N`` makes rank 0 fail right after step
N, ``save:N`` while step N's checkpoint is being written (shards on disk, not yet reported).
Fires once per stage directory (a marker file remembers it), so the restarted run goes through."""


def checkpoint_dir_name(step: int) -> str:
    return f"checkpoint-{step:06d}"


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    import ray.train

    from prolong.train.entry import StageRun

    run = StageRun.from_config(config)
    Worker(run, ray.train.get_context()).run()


class Worker:
    def __init__(self, run, context):
        from prolong.parallel.dims import ParallelDims

        self.run_info = run
        self.job = run.job_model()
        self.spec = self.job.spec
        self.ref = run.stage_ref()
        self.rank = context.get_world_rank()
        self.world = context.get_world_size()
        self.gpu = self.spec.cluster.device == "gpu"
        if self.gpu:
            self.device = torch.device("cuda", context.get_local_rank())
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.groups = ParallelDims.from_spec(self.spec).build(self.rank)

    # ---- set-up --------------------------------------------------------------------------

    def _model(self):
        from prolong.model.attention import hf_name, select_backend
        from prolong.model.build import build_model
        from prolong.parallel.deepspeed_config import resolve_precision
        from prolong.parallel.ulysses import apply_ulysses

        spec = self.spec
        dtype = torch.bfloat16 if resolve_precision(spec) == "bf16" else torch.float32
        source = None
        if self.run_info.upstream_dir is not None:
            source = _local_path(f"{self.run_info.upstream_dir.rstrip('/')}/final")
        model = build_model(spec.model, device=self.device, dtype=dtype, source=source,
                            activation_checkpointing=spec.parallelism.activation_checkpointing,
                            seed=spec.seed)
        backend = select_backend(spec.model.attention, self.device, dtype)
        apply_ulysses(model, self.groups, hf_name(backend), seq_length=spec.sequence_length)
        return model

    def _engine(self, model):
        import deepspeed

        from prolong.parallel.deepspeed_config import build_optimizer, deepspeed_config
        from prolong.parallel.ulysses import CausalLMWithLoss, deepspeed_mpu
        from prolong.train.schedule import build_scheduler

        wrapped = CausalLMWithLoss(model)
        optimizer = build_optimizer(wrapped, self.spec)
        scheduler = build_scheduler(optimizer, self.spec.schedule, self.spec.total_steps)
        engine, optimizer, _, scheduler = deepspeed.initialize(
            model=wrapped, optimizer=optimizer, lr_scheduler=scheduler,
            config=deepspeed_config(self.spec), mpu=deepspeed_mpu(self.groups))
        return engine, scheduler

    def _loader(self):
        from prolong.data.mixture import MixtureLoader
        from prolong.data.shards import TokenShards

        shards = {domain: TokenShards(path) for domain, path in self.run_info.shard_dirs.items()}
        return MixtureLoader.from_spec(self.spec, shards, dp_rank=self.groups.dp_rank)

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> None:
        import ray.train

        from prolong.train.stage_dir import MetricsLog, StageDir

        stage = StageDir(self.ref.directory)
        model = self._model()
        self.arch = self.spec.model.architecture or _architecture_of(model)
        engine, scheduler = self._engine(model)
        loader = self._loader()
        step = self._restore(engine, scheduler, loader, ray.train.get_checkpoint())
        log = MetricsLog(stage) if self.rank == 0 else None
        gauges = self._gauges()
        try:
            while step < self.spec.total_steps:
                step += 1
                metrics = self._train_one(engine, scheduler, loader, step)
                record = metrics.as_record()
                if log is not None:
                    log.append(record)
                if gauges is not None:
                    gauges.update(metrics)
                if step % self.spec.checkpoint.every_steps == 0 or step == self.spec.total_steps:
                    self._save_and_report(engine, loader, step, record)
                else:
                    ray.train.report(record)
                self._maybe_fault("step", step, stage)
        finally:
            if log is not None:
                log.close()
        self._finalize(engine, model, stage, step)

    def _train_one(self, engine, scheduler, loader, step: int):
        import torch.distributed as dist

        from prolong.parallel.step import train_step
        from prolong.train.metrics import make_step_metrics, step_flops

        rows = loader.next_step()
        lr = scheduler.get_last_lr()[0]
        start = time.perf_counter()
        result = train_step(engine, rows, self.groups)
        seconds = time.perf_counter() - start
        dense, causal = step_flops(self.arch, self.spec.sequence_length,
                                   [r.doc_lengths.tolist() for r in rows])
        # Every SP rank of a replica holds the same rows: sum the FLOPs over DP only.
        flops = torch.tensor([dense, causal], dtype=torch.float64,
                             device=self.device if self.gpu else "cpu")
        if self.groups.dp > 1:
            dist.all_reduce(flops, group=self.groups.dp_group)
        return make_step_metrics(
            step=step, loss=result.loss, lr=lr, grad_norm=result.grad_norm, seconds=seconds,
            tokens=self.spec.global_batch_tokens, dense_flops=float(flops[0]),
            causal_flops=float(flops[1]), valid_tokens=result.valid_tokens, devices=self.world,
            device_kind=self.spec.cluster.device, gpu_type=self.spec.cluster.gpu_type,
            tokens_per_domain=loader.tokens_by_domain)

    def _gauges(self):
        if self.rank != 0:
            return None
        from prolong.train.metrics import RayGauges

        return RayGauges(pipeline=self.ref.pipeline, stage=self.ref.stage, stage_id=self.ref.id)

    # ---- checkpoints ---------------------------------------------------------------------

    def _maybe_fault(self, point: str, step: int, stage) -> None:
        if self.rank != 0 or os.environ.get(FAULT_ENV) != f"{point}:{step}":
            return
        marker = ".fault-fired"
        if stage.exists(marker):
            return
        stage.write_json(marker, {"point": point, "step": step})
        raise RuntimeError(f"injected fault ({FAULT_ENV}={point}:{step})")

    def _save_and_report(self, engine, loader, step: int, record: dict[str, Any]) -> None:
        import ray.train
        from ray.train import Checkpoint

        from prolong.train.stage_dir import StageDir

        with tempfile.TemporaryDirectory(prefix="prolong-ckpt-") as tmp:
            engine.save_checkpoint(tmp, tag=CHECKPOINT_TAG)
            self._maybe_fault("save", step, StageDir(self.ref.directory))
            torch.save(_rng_state(), Path(tmp) / f"rng-rank{self.rank:05d}.pt")
            if self.rank == 0:
                state = {"step": step, "stage_id": self.ref.id, "loader": loader.state_dict()}
                (Path(tmp) / TRAINER_STATE).write_text(json.dumps(state))
            ray.train.report(record, checkpoint=Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step))

    def _restore(self, engine, scheduler, loader, checkpoint) -> int:
        """Resume from Ray Train's checkpoint, or start from the upstream stage's optimizer state
        (weightsAndOptimizer). Returns the last completed step."""
        if checkpoint is not None:
            with checkpoint.as_directory() as directory:
                engine.load_checkpoint(directory, tag=CHECKPOINT_TAG)
                state = json.loads((Path(directory) / TRAINER_STATE).read_text())
                loader.load_state_dict(state["loader"])
                rng = Path(directory) / f"rng-rank{self.rank:05d}.pt"
                if rng.exists():
                    _set_rng_state(torch.load(rng, weights_only=False))
            return int(state["step"])
        if self.spec.model.init == "weightsAndOptimizer":
            upstream = self._upstream_checkpoint()
            # Weights and AdamW moments from the upstream stage; the LR schedule starts afresh
            # (as ProLong's stage 2 did), so the scheduler state is not loaded and the learning
            # rate the loaded optimizer carries is reset to this schedule's first value.
            engine.load_checkpoint(upstream, tag=CHECKPOINT_TAG, load_optimizer_states=True,
                                   load_lr_scheduler_states=False)
            for group, lr in zip(engine.optimizer.param_groups, scheduler.get_last_lr(), strict=False):
                group["lr"] = lr
        return 0

    def _upstream_checkpoint(self) -> str:
        from prolong.train.stage_dir import StageDir

        manifest = StageDir(self.run_info.upstream_dir).read_manifest()
        return _local_path(manifest["final_checkpoint"])

    # ---- the end -------------------------------------------------------------------------

    def _finalize(self, engine, model, stage, step: int) -> None:
        """Consolidated HF weights + tokenizer in final/, then manifest.json, then COMPLETE."""
        import deepspeed
        import torch.distributed as dist

        from prolong.versions import versions

        params = list(model.parameters())
        gather = (deepspeed.zero.GatheredParameters(params, modifier_rank=None)
                  if engine.zero_optimization_stage() == 3 else contextlib.nullcontext())
        with gather:
            state = ({k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}
                     if self.rank == 0 else None)
        if self.rank == 0:
            _write_final(model, state, self.run_info.tokenizer_dir, stage.final_uri)
            records = _read_last_metrics(stage)
            stage.write_manifest({
                "pipeline": self.ref.pipeline, "stage": self.ref.stage, "id": self.ref.id,
                "kind": self.job.kind, "upstream": list(self.ref.upstream),
                "spec": self.run_info.job,
                "final": stage.final_uri,
                "final_checkpoint": stage.uri_of(checkpoint_dir_name(step)),
                "steps": step, "tokens": step * self.spec.global_batch_tokens,
                "summary": records, "versions": versions(),
            })
            stage.mark_complete()
        if dist.is_initialized():
            dist.barrier()


def _write_final(model, state: dict[str, torch.Tensor], tokenizer_dir: str | None,
                 final_uri: str) -> None:
    """HF-format weights and the tokenizer, published under final/ in one move."""
    import pyarrow.fs as pafs
    from transformers import AutoTokenizer

    from prolong.train.stage_dir import resolve

    with tempfile.TemporaryDirectory(prefix="prolong-final-") as tmp:
        model.save_pretrained(tmp, state_dict=state, safe_serialization=True)
        if tokenizer_dir is not None:
            AutoTokenizer.from_pretrained(tokenizer_dir).save_pretrained(tmp)
        fs, path = resolve(final_uri)
        if isinstance(fs, pafs.LocalFileSystem):
            partial = Path(path + ".partial")
            shutil.rmtree(partial, ignore_errors=True)
            shutil.copytree(tmp, partial)
            partial.chmod(0o755)  # mkdtemp's 0700 would hide the weights from other users
            shutil.rmtree(path, ignore_errors=True)
            os.replace(partial, path)
        else:
            # Object stores have no rename; COMPLETE (written after this) is the commit point.
            pafs.copy_files(tmp, path, destination_filesystem=fs)


def _read_last_metrics(stage) -> dict[str, Any]:
    from prolong.train.stage_dir import read_metrics

    records = read_metrics(stage)
    if not records:
        return {}
    first, last = records[0], records[-1]
    return {"first_loss": first["loss"], "last_loss": last["loss"],
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
            "tokens_per_domain": last["tokens_per_domain"]}


def _architecture_of(model):
    from prolong.spec import ArchitectureSpec

    c = model.config
    return ArchitectureSpec(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                            num_attention_heads=c.num_attention_heads,
                            num_key_value_heads=c.num_key_value_heads,
                            intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                            tie_word_embeddings=c.tie_word_embeddings)


def _local_path(uri: str) -> str:
    """A local directory for ``uri``: itself when local, else a downloaded copy."""
    if "://" not in uri:
        return uri
    import pyarrow.fs as pafs

    from prolong.train.stage_dir import resolve

    fs, path = resolve(uri)
    local = tempfile.mkdtemp(prefix="prolong-upstream-")
    pafs.copy_files(path, local, source_filesystem=fs)
    return local


def _rng_state() -> dict[str, Any]:
    state = {"python": random.getstate(), "numpy": np.random.get_state(),
             "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
