"""The per-worker train loop that Ray Train runs: one stage, from start (or resume) to final/.

Per worker: build the model (random, pretrained, or the upstream stage's final/ weights), route
attention through our document-masked backend (wrapped by Ulysses when SP > 1), hand it to
DeepSpeed ZeRO with our AdamW and LR schedule, and feed this data-parallel rank's packed rows.
Each optimizer step is :func:`prolong.parallel.step.train_step` (the protocol the parity tests
hold to a single process).

State and its order of writing:

- every ``checkpoint.everySteps`` steps, at the last step and, with ``checkpoint.everyMinutes``,
  at the first step that long after the last save (rank 0's clock, broadcast:
  :mod:`prolong.train.cadence`), every rank writes its DeepSpeed
  shards (parameters, optimizer, LR scheduler), the loader state and its RNG state into a local
  temporary directory, reported with ``ray.train.report(checkpoint=...)``: Ray Train persists
  it as ``<stage dir>/checkpoint-<step>`` and only then registers it, so a crash mid-save keeps
  the previous checkpoint as the latest;
- after the last step, rank 0 writes ``final/`` (HF weights + tokenizer) through a temporary name,
  then ``manifest.json``, then ``COMPLETE``.

Resumption: Ray Train hands the latest checkpoint back (``ray.train.get_checkpoint``) when a run
with the same name and storage path is fitted again, or after a worker failure. A stage whose last
step was checkpointed but whose final/ was not written resumes straight into writing final/. A
checkpoint (or an upstream stage's final checkpoint) written on another world size is loaded
through DeepSpeed's universal copy, made once by rank 0 (:mod:`prolong.train.reshape`); the
loader continues with the same global rows, now dealt over the new data-parallel ranks.
:meth:`Worker.start` does all of it and needs no Ray, so the reshape tests drive it directly.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from prolong.data.mixture import MixtureLoader
from prolong.data.shards import TokenShards
from prolong.model.attention import hf_name, select_backend
from prolong.model.build import TORCH_DTYPES, architecture_of, build_model
from prolong.model.save import save_weights
from prolong.model.staging import load_dir, model_load_dir
from prolong.model.tiling import apply_memory_settings
from prolong.model.zero3 import Zero3Init
from prolong.parallel.deepspeed_config import deepspeed_config
from prolong.parallel.dims import ParallelGroups
from prolong.parallel.step import train_step
from prolong.parallel.ulysses import apply_ulysses, ensure_deepspeed_comm
from prolong.spec import TrainSpec
from prolong.stage.directory import (
    Manifest,
    MetricsLog,
    StageDir,
    local_copy,
    publish_directory,
    read_metrics,
)
from prolong.stage.logs import stage_output
from prolong.stage.payload import StageRun
from prolong.train.cadence import CheckpointClock, torch_broadcast
from prolong.train.chaos import chaos_point
from prolong.train.checkpoints import (
    CHECKPOINT_TAG,
    TRAINER_STATE,
    Layout,
    checkpoint_dir_name,
    checkpoint_problems,
    older_checkpoints,
    read_layout,
    rng_file,
    rng_file_for,
    step_of,
    write_digests,
)
from prolong.train.engine import Engine, build_engine
from prolong.train.faults import maybe_fault
from prolong.train.metrics import (
    RayGauges,
    StepMetrics,
    make_step_metrics,
    step_flops,
    with_save_time,
)
from prolong.train.report import (
    CURVES_PNG,
    TRAIN_REPORT,
    curves_png,
    training_figures,
    training_markdown,
)
from prolong.train.reshape import (
    UNIVERSAL_TAG,
    ReshapeError,
    convert_to_universal,
    has_universal,
    load_tag,
    load_universal,
)
from prolong.train.threads import usable_threads
from prolong.versions import versions


def zero3_partitioning(spec: TrainSpec, groups: ParallelGroups) -> Zero3Init | None:
    """How a ZeRO-3 stage builds its model: partitioned as it is created, with the engine's own
    DeepSpeed config and over the engine's group, so that no rank ever holds the whole model
    (None below stage 3: ZeRO 0-2 keep a full copy per rank anyway)."""
    if spec.parallelism.zero_stage != 3:
        return None
    return Zero3Init(deepspeed_config(spec, groups.dims), groups.world_group)


def training_model(spec: TrainSpec, groups: ParallelGroups, device: str | torch.device, *,
                   source: str | None = None,
                   load_weights: bool = True) -> tuple[torch.nn.Module, str]:
    """The model a training worker hands to :func:`~prolong.train.engine.build_engine`, and its
    attention backend: built from ``source`` (a local directory) or randomly from the spec,
    partitioned as it is created under ZeRO-3, routed through Ulysses, with the spec's
    ``parallelism.memory`` settings (activation offload, TiledMLP) applied. The one build order:
    the Worker and bench/ (which measures what the product trains) both call it.
    ``load_weights=False``: the shape only, for a DeepSpeed checkpoint to fill
    (:func:`~prolong.model.build.build_model`)."""
    dtype = TORCH_DTYPES[spec.resolved_precision]
    zero3 = zero3_partitioning(spec, groups)
    if zero3 is not None:
        ensure_deepspeed_comm()  # zero.Init partitions over deepspeed.comm's wrapped groups
    model = build_model(spec.model, device=device, dtype=dtype, source=source,
                        activation_checkpointing=spec.parallelism.activation_checkpointing,
                        seed=spec.seed, zero3=zero3, local_files_only=True,
                        load_weights=load_weights)
    backend = select_backend(spec.model.attention, device, dtype)
    apply_ulysses(model, groups, hf_name(backend), seq_length=spec.sequence_length)
    apply_memory_settings(model, spec.parallelism)
    return model, backend


def train_worker(config: dict[str, Any]) -> None:
    """Ray Train's ``train_loop_per_worker``."""
    # Ray Train is imported on the worker only (and by then it is loaded): importing it here keeps
    # this module importable where Ray is not installed, e.g. by the parity tests' workers.
    import ray.train

    run = StageRun.from_config(config)
    context = ray.train.get_context()
    # The threads worker_env asked for, at most this worker's share of the machine's cores.
    torch.set_num_threads(usable_threads(int(os.environ.get("OMP_NUM_THREADS", "1")),
                                         context.get_local_world_size()))
    with stage_output(run.stage_ref().directory, f"worker-rank{context.get_world_rank():03d}"):
        Worker(run, context).run()


@dataclass(frozen=True)
class LoadSource:
    """A checkpoint to load, and how."""

    directory: Path
    """Local directory of the checkpoint (``ds/``, ``trainer_state.json``, RNG files)."""
    uri: str
    """Where it lives in its stage directory (for messages)."""
    tag: str
    """``ds`` (DeepSpeed's own shards) or ``ds_universal`` (another world size)."""
    saved: Layout
    """The layout of the run that wrote it."""


@dataclass
class Started:
    """What :meth:`Worker.start` hands the train loop."""

    built: Engine
    model: torch.nn.Module
    loader: MixtureLoader
    step: int
    """The last completed step (0 on a fresh start)."""


class Worker:
    """One training process. ``context`` answers ``get_world_rank``, ``get_world_size`` and
    ``get_local_rank`` (Ray Train's context, or the tests' own over plain torch.distributed)."""

    def __init__(self, run: StageRun, context: Any):
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
        self.dims = self.spec.parallel_dims
        self.groups = self.dims.build(self.rank)
        self.layout = Layout.of(self.dims, self.spec.parallelism.zero_stage)
        self.name_suffix = ""
        """Appended to checkpoint names after a resume fell back past a broken checkpoint."""

    def _chaos(self, point: str, step: int) -> None:
        """A moment a chaos drill may kill a worker in (prolong.train.chaos; no-op without one)."""
        chaos_point(point, step, stage_dir=self.ref.directory, rank=self.rank)

    # ---- set-up --------------------------------------------------------------------------

    def _model(self, *, load_weights: bool = True) -> torch.nn.Module:
        """The model to train. ``load_weights=False`` when a checkpoint is loaded over it at once
        (a resume, a ``weightsAndOptimizer`` start): its shape comes from the same source's
        config, its weights are not read (16 GB for an 8B model)."""
        # The upstream stage's final/, else the staged (or local) model: never the hub.
        if self.run_info.upstream_dir is not None:
            final = StageDir(self.run_info.upstream_dir).final_uri
            # Only config.json is read when the weights are not: fetch that alone.
            source = local_copy(final, only=None if load_weights else ("config.json",))
        else:
            source = model_load_dir(self.spec.model)
        return training_model(self.spec, self.groups, self.device, source=source,
                              load_weights=load_weights)[0]

    def _loader(self) -> MixtureLoader:
        shards = {domain: TokenShards(path) for domain, path in self.run_info.shard_dirs.items()}
        return MixtureLoader.from_spec(self.spec, shards, dims=self.dims, rank=self.rank)

    # ---- the run -------------------------------------------------------------------------

    def run(self) -> None:
        import ray.train  # on the worker, where Ray Train runs this (see train_worker)

        stage = StageDir(self.ref.directory)
        self._chaos("start", 0)
        checkpoint = ray.train.get_checkpoint()
        # Loaded (and for another world size converted) while its local directory is at hand.
        with (checkpoint.as_directory() if checkpoint is not None
              else contextlib.nullcontext()) as latest:
            # On an object store the local copy has a temporary name: the stage's is its path's.
            started = self.start(None if latest is None else Path(latest),
                                 None if latest is None else checkpoint.path.rstrip("/")
                                 .rsplit("/", 1)[-1])
        built, loader, step = started.built, started.loader, started.step
        # Steps after the restored one are replayed: their old rows go (MetricsLog resume_from).
        log = MetricsLog(stage, resume_from=step) if self.rank == 0 else None
        gauges = (RayGauges(pipeline=self.ref.pipeline, stage=self.ref.stage,
                            stage_id=self.ref.id) if self.rank == 0 else None)
        ckpt = self.spec.checkpoint
        clock = CheckpointClock(ckpt.every_steps, self.spec.total_steps, ckpt.every_minutes,
                                broadcast=torch_broadcast(self.device if self.gpu else "cpu"))
        try:
            while step < self.spec.total_steps:
                step += 1
                metrics = self.train_one(built, loader, step)
                # Only checkpoints go through ray.train.report: each report waits for Ray Train's
                # controller (about a second on 2 CPUs, 410 s of a 300-step quickstart stage),
                # and nothing reads per-step results from Ray; metrics.jsonl and the gauges
                # carry every step. The save counts in the step's wall time, so its row is
                # written after it (a crash mid-save replays the step, and its row, anyway).
                # When: prolong.train.cadence, the same step on every rank.
                if clock.due(step):
                    saving = time.perf_counter()
                    self._save_and_report(built.engine, loader, step, metrics.as_record(), stage)
                    metrics = with_save_time(metrics, time.perf_counter() - saving)
                if log is not None:
                    log.append(metrics.as_record())
                if gauges is not None:
                    gauges.update(metrics)
                maybe_fault("step", step, stage, rank=self.rank)
        finally:
            if log is not None:
                log.close()
        self._finalize(built.engine, started.model, stage, step)

    def start(self, latest: Path | None, latest_name: str | None = None) -> Started:
        """Model, engine and loader, resumed from ``latest`` (the local directory of the stage's
        latest checkpoint, whose name in the stage directory is ``latest_name``, by default its
        own; or an older usable one) or started from the upstream stage's final
        checkpoint (weightsAndOptimizer), through the universal copy when the checkpoint was
        written on another world size. The engine is built after the choice: whether it loads
        a universal checkpoint is part of its DeepSpeed config. The model's weights are read only
        when no checkpoint is loaded over them."""
        if latest is not None:
            source = self._usable_checkpoint(latest, latest_name or latest.name)
        elif self.spec.model.init == "weightsAndOptimizer":
            source = self._upstream_checkpoint()
        else:
            source = None
        # parallelism.memory applied; the loss chunk goes to the engine
        model = self._model(load_weights=source is None)
        self.arch = self.spec.model.architecture or architecture_of(model)
        built = build_engine(model, self.spec, self.groups,
                             load_universal=source is not None and source.tag == UNIVERSAL_TAG,
                             chunk_tokens=self.spec.parallelism.memory.loss_chunk_tokens)
        loader = self._loader()
        step = self._restore(built, loader, source, resume=latest is not None)
        return Started(built, model, loader, step)

    def train_one(self, built: Engine, loader: MixtureLoader, step: int) -> StepMetrics:
        """Step ``step``: this rank's rows of it through :func:`train_step`, and its metrics
        (throughput over the wall time from asking the loader to the metrics; the caller adds a
        checkpoint save's time with :func:`~prolong.train.metrics.with_save_time`)."""
        asked = time.perf_counter()
        rows = loader.next_step()
        self._chaos("step", step)  # a drill's kill lands here: rows drawn, the step under way
        lr = built.scheduler.get_last_lr()[0]
        start = time.perf_counter()
        result = train_step(built.engine, rows, self.groups)
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
            tokens_per_domain=loader.tokens_by_domain, data_s=start - asked,
            wall_s=time.perf_counter() - asked)

    # ---- checkpoints ---------------------------------------------------------------------

    def _save_and_report(self, engine: Any, loader: MixtureLoader, step: int,
                         record: dict[str, Any], stage: StageDir) -> None:
        import ray.train  # on the worker, where Ray Train runs this (see train_worker)

        with tempfile.TemporaryDirectory(prefix="prolong-ckpt-") as tmp:
            self.write_checkpoint(Path(tmp), engine, loader, step, stage)
            ray.train.report(record, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=checkpoint_dir_name(step, self.name_suffix))
        if self.rank == 0:
            self._chaos("saved", step)

    def write_checkpoint(self, directory: Path, engine: Any, loader: MixtureLoader, step: int,
                         stage: StageDir) -> None:
        """This rank's part of checkpoint ``step`` in ``directory``: its DeepSpeed shards and
        RNG state, and on rank 0 the trainer state (step, loader state, this run's layout)."""
        engine.save_checkpoint(str(directory), tag=CHECKPOINT_TAG)
        maybe_fault("save", step, stage, rank=self.rank)
        self._chaos("save", step)  # shards written, RNG and trainer state not yet
        torch.save(_rng_state(), directory / rng_file(self.rank))
        if self.rank == 0:
            state = {"step": step, "stage_id": self.ref.id, "loader": loader.state_dict(),
                     "layout": self.layout.to_json()}
            (directory / TRAINER_STATE).write_text(json.dumps(state))
        write_digests(directory, self.rank)  # last: a checkpoint's files as written

    def _restore(self, built: Engine, loader: MixtureLoader, source: LoadSource | None, *,
                 resume: bool) -> int:
        """Load ``source``: the stage's own checkpoint (``resume``: engine, loader, RNG) or the
        upstream stage's (weights and optimizer state). Returns the last completed step."""
        if source is None:
            return 0
        engine = built.engine
        if resume:
            self._chaos("load", step_of(source.uri.rsplit("/", 1)[-1]) or 0)
        # Upstream: weights and AdamW moments; the LR schedule starts afresh (as ProLong's stage
        # 2 did), so the scheduler state is not loaded.
        kwargs = ({} if resume else
                  {"load_optimizer_states": True, "load_lr_scheduler_states": False})
        if source.tag == UNIVERSAL_TAG:
            load_universal(engine, source.directory, **kwargs)
        else:
            engine.load_checkpoint(str(source.directory), tag=CHECKPOINT_TAG, **kwargs)
        if not resume:
            # The learning rate the loaded optimizer carries is reset to this schedule's first.
            for group, lr in zip(engine.optimizer.param_groups, built.scheduler.get_last_lr(),
                                 strict=False):
                group["lr"] = lr
            return 0
        state = json.loads((source.directory / TRAINER_STATE).read_text())
        loader.load_state_dict(state["loader"])
        rng = source.directory / rng_file_for(self.rank, source.saved.world)
        _set_rng_state(torch.load(rng, weights_only=False))
        return int(state["step"])

    def _agree(self, ok: bool) -> bool:
        """True when ``ok`` on every rank."""
        # On the device the process group communicates on (NCCL needs a CUDA tensor).
        flag = torch.tensor([int(ok)], dtype=torch.int64, device=self.device if self.gpu else "cpu")
        if dist.is_initialized():
            dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        return bool(flag.item())

    def _usable_checkpoint(self, latest: Path, name: str) -> LoadSource:
        """``latest`` when every rank finds it usable, else the newest older checkpoint of the
        stage that is (all ranks agree on each candidate before any loads it). Checkpoints
        written after falling back get a name suffix, so none reuses a broken one's name."""
        stage = StageDir(self.ref.directory)
        step = step_of(name)
        # (name, uri) of each candidate; an older one is fetched only when its turn comes (on an
        # object store that is a download).
        candidates: list[tuple[str, str | None]] = [(name, None)]
        if step is not None:
            candidates += [(uri.rsplit("/", 1)[-1], uri) for uri in older_checkpoints(stage, step)]
        why: list[str] = []  # this rank's reason per candidate, for the error if none is usable
        for i, (cand_name, uri) in enumerate(candidates):
            directory = latest if uri is None else Path(local_copy(uri))
            # Each rank hashes its own files and rank 0's (the ranks agree below).
            problems = checkpoint_problems(directory, ranks={0, self.rank})
            if self._agree(not problems):
                source, reason = self._prepare(directory, stage.uri_of(cand_name))
                if source is not None:
                    if i:
                        self.name_suffix = f"-from{step_of(cand_name):06d}"
                        if self.rank == 0:
                            print(f"resuming from {cand_name} instead of the newer unusable "
                                  f"checkpoint(s) {', '.join(n for n, _ in candidates[:i])}",
                                  file=sys.stderr, flush=True)
                    return source
                problems = [reason]  # rank 0's, broadcast: logged by rank 0 alone
                if self.rank == 0:
                    print(f"checkpoint {cand_name} is unusable: {reason}", file=sys.stderr,
                          flush=True)
            elif problems:  # this rank's reasons; the others log theirs
                print(f"checkpoint {cand_name} is unusable on rank {self.rank}: "
                      f"{'; '.join(problems)}", file=sys.stderr, flush=True)
            why.append(f"{cand_name}: {'; '.join(problems)[:200]}" if problems
                       else f"{cand_name}: unusable on another rank")
        raise RuntimeError(f"no usable checkpoint in {self.ref.directory} ({'; '.join(why)}; "
                           "see the workers' logs)")

    def _prepare(self, directory: Path, uri: str) -> tuple[LoadSource | None, str | None]:
        """How to load the usable checkpoint ``directory`` on this run's layout: (source, None),
        or (None, why) when its universal copy could not be made. Raises ReshapeError when no
        copy can make it fit (the same on every rank: all read the same trainer state)."""
        saved = read_layout(directory)
        tag = load_tag(uri, saved, self.layout)
        if tag == UNIVERSAL_TAG:
            # Rank 0 converts, once; the broadcast of its outcome is also the others' wait.
            reason = None
            if self.rank == 0 and not has_universal(directory):
                print(f"converting {uri} (written by {saved.describe()}) to a universal checkpoint "
                      f"for {self.layout.describe()}", file=sys.stderr, flush=True)
                try:
                    convert_to_universal(directory)
                except Exception as exc:  # DeepSpeed's converter fails in many ways
                    first = (str(exc).strip().splitlines() or [""])[0][:200]
                    reason = f"its universal copy could not be made ({type(exc).__name__}: {first})"
            if dist.is_initialized() and dist.get_world_size() > 1:
                box = [reason]
                dist.broadcast_object_list(box, src=0)
                reason = box[0]
            if reason is not None:
                return None, reason
        return LoadSource(directory, uri, tag, saved), None

    def _upstream_checkpoint(self) -> LoadSource:
        manifest = StageDir(self.run_info.upstream_dir).read_manifest()
        if manifest.final_checkpoint is None:
            raise RuntimeError(f"{self.run_info.upstream_dir}: its manifest names no final "
                               "checkpoint (an eval stage?); weightsAndOptimizer needs a training "
                               "stage")
        uri = manifest.final_checkpoint
        source, reason = self._prepare(Path(local_copy(uri)), uri)
        if source is None:
            raise ReshapeError(f"{uri}: {reason}")
        return source

    # ---- the end -------------------------------------------------------------------------

    def _write_report(self, stage: StageDir, records: list[dict[str, Any]]) -> None:
        """report.md and curves.png (prolong.train.report), before the manifest vouches for them."""
        cluster = self.spec.cluster
        device = cluster.gpu_type if cluster.device == "gpu" else "CPU worker"
        title = f"{self.ref.pipeline}/{self.ref.dir_name}"
        figures = training_figures(records, self.world)
        stage.write_bytes(TRAIN_REPORT, training_markdown(title, figures, device=device).encode())
        stage.write_bytes(CURVES_PNG, curves_png(records, title))

    def _finalize(self, engine: Any, model: torch.nn.Module, stage: StageDir, step: int) -> None:
        """Consolidated HF weights + tokenizer in final/, then manifest.json, then COMPLETE.

        The weights are written one parameter at a time (prolong.model.save): under ZeRO-3 each
        parameter is gathered alone and streamed into rank 0's safetensors file, so no rank
        holds the whole model (gathering them all at once would put 16 GB of Llama-3-8B on every
        GPU and in rank 0's host memory). Every rank takes part in the gathers."""
        tmp = tempfile.mkdtemp(prefix="prolong-final-") if self.rank == 0 else None
        tok_hash = None
        try:
            save_weights(model, tmp)
            if self.rank == 0:
                self._chaos("final", step)  # weights written locally, final/ not published
                tok_hash = _write_final(tmp, self.run_info.tokenizer_dir, stage.final_uri)
                self._chaos("final", step)  # final/ published, no manifest or COMPLETE yet
        finally:
            if tmp is not None:
                shutil.rmtree(tmp, ignore_errors=True)
        if self.rank == 0:
            records = read_metrics(stage)
            self._write_report(stage, records)
            stage.write_manifest(Manifest.for_stage(
                self.ref, self.run_info.job, final=stage.final_uri,
                final_checkpoint=stage.uri_of(checkpoint_dir_name(step, self.name_suffix)),
                steps=step, tokens=step * self.spec.global_batch_tokens,
                tokenizer_hash=tok_hash, summary=metrics_summary(records), versions=versions()))
            stage.mark_complete()
        if dist.is_initialized():
            dist.barrier()


def _write_final(weights_dir: str, tokenizer_dir: str | None, final_uri: str) -> str | None:
    """The written weights and the stage's tokenizer, published under final/ in one move; returns
    the tokenizer's content hash (None without one) for the manifest. The tokenizer is where
    prolong.data.prepare.tokenizer_ref put it (a staged copy may be on an object store: load_dir
    fetches it)."""
    from transformers import AutoTokenizer  # only rank 0 writes final/, once per stage

    from prolong.data.tokenizer import tokenizer_hash

    tok_hash = None
    if tokenizer_dir is not None:
        tok = AutoTokenizer.from_pretrained(load_dir(tokenizer_dir), local_files_only=True)
        tok.save_pretrained(weights_dir)
        tok_hash = tokenizer_hash(tok)
    publish_directory(weights_dir, final_uri)
    return tok_hash


def metrics_summary(records: list[dict[str, Any]]) -> dict[str, Any]:
    """The manifest's summary of a training stage's metrics.jsonl."""
    if not records:
        return {}
    first, last = records[0], records[-1]
    return {"first_loss": first["loss"], "last_loss": last["loss"],
            "mean_tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records),
            "tokens_per_domain": last["tokens_per_domain"]}


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
