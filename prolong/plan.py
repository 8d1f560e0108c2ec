"""What a spec will cost: steps, tokens, rows, FLOPs and GPU-hours per stage. Pure functions.

Attention cost depends on document lengths, which are only known once data is prepared. Until then
the document-causal figure assumes ``short_doc_tokens`` for concat/conversation streams; long
streams are exact (every document is targetLength tokens). The lockstep efficiency of a training
stage (how much of each micro-step its replicas spend waiting for the slowest row) replays the
loader's own planning and placement over such lengths (:mod:`prolong.data.lockstep`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from prolong.eval.tasks import HELMET_TASKS
from prolong.model.flops import (
    PEAK_BF16_FLOPS,
    dense_flops_per_token,
    doc_causal_flops_per_token,
    prefill_flops_per_token,
)
from prolong.model.memory import ESTIMATE_MARGIN, GIB, MemoryEstimate, estimate_memory
from prolong.spec import ArchitectureSpec, EvalJob, Job, TrainSpec, resolved_architecture
from prolong.stage.identity import StageRef

if TYPE_CHECKING:  # the replay imports the loader, and with it torch: only when a plan needs it
    from prolong.data.lockstep import LockstepEstimate

DEFAULT_MFU = 0.4
DEFAULT_SHORT_DOC_TOKENS = 2048


@dataclass(frozen=True)
class DomainTokens:
    domain: str
    proportion: float
    tokens: float


@dataclass(frozen=True)
class MemoryRow:
    """One line of the memory breakdown: what, its bytes per GPU, and how it was counted."""

    item: str
    bytes: float
    detail: str


@dataclass(frozen=True)
class StagePlan:
    stage: StageRef
    kind: str
    gpus: int
    device: str
    gpu_type: str
    sequence_length: int | None = None
    steps: int | None = None
    tokens: int | None = None
    rows_per_step: int | None = None
    micro_batches_per_rank: int | None = None
    sp: int | None = None
    dp: int | None = None
    warmup_steps: int | None = None
    domains: list[DomainTokens] = field(default_factory=list)
    flops_dense: float | None = None
    """FLOPs per token, 6N+12LHdS (training) or 2N+4LHdS averaged over prompts (eval)."""
    flops_doc_causal: float | None = None
    """FLOPs per token, 6N+6LHd·Σd²/S (training only)."""
    total_flops: float | None = None
    gpu_hours: float | None = None
    """At the requested MFU on the dense convention; None on CPU or when the shape is unknown."""
    prompts: int | None = None
    """Evaluation: number of prompts."""
    memory: MemoryEstimate | None = None
    """Training: estimated peak memory per GPU (prolong.model.memory); None without a shape."""
    memory_rows: list[MemoryRow] = field(default_factory=list)
    """``memory`` as the lines ``prolongctl plan`` prints."""
    memory_warning: str | None = None
    """Set when the estimate does not fit the device, or fits with less to spare than its margin
    (prolong.model.memory.ESTIMATE_MARGIN)."""
    lockstep: LockstepEstimate | None = None
    """Training: mean / max row FLOPs per micro-step under the loader's placement, replayed."""
    notes: list[str] = field(default_factory=list)
    checkpoint_hours: float | None = None
    """Training: wall-clock hours between two checkpoints at the planned speed (the sooner of
    checkpoint.everySteps steps and checkpoint.everyMinutes plus the step that ends past it)."""
    at_risk_gpu_hours: float | None = None
    """Training: GPU-hours one interruption can lose (the work since the last checkpoint, at
    most ``checkpoint_hours`` on every GPU)."""


def checkpoint_risk(spec: TrainSpec, gpu_hours: float | None) -> tuple[float | None, float | None]:
    """(hours between checkpoints, GPU-hours at risk per interruption) of a training stage whose
    whole run costs ``gpu_hours``; (None, None) without an estimate."""
    if gpu_hours is None or spec.total_steps < 1:
        return None, None
    gpus = max(1, spec.cluster.world_size)
    step_hours = gpu_hours / gpus / spec.total_steps
    interval = min(spec.checkpoint.every_steps, spec.total_steps) * step_hours
    if spec.checkpoint.every_minutes is not None:
        # Saved at the first step that ends past the interval: up to one step later.
        interval = min(interval, spec.checkpoint.every_minutes / 60.0 + step_hours)
    return interval, interval * gpus


def plan_stage(job: Job, ref: StageRef, arch: ArchitectureSpec | None, *, mfu: float = DEFAULT_MFU,
               short_doc_tokens: int = DEFAULT_SHORT_DOC_TOKENS,
               lockstep: bool = True) -> StagePlan:
    """``lockstep``: replay the loader to estimate the lockstep efficiency (about half a second
    per training stage; deadlines, which need only the GPU-hours, skip it)."""
    if isinstance(job, EvalJob):
        return _plan_eval(job, ref, arch, mfu)
    return _plan_train(job.spec, ref, job.kind, arch, mfu, short_doc_tokens, lockstep)


def _gpu_hours(total_flops: float, cluster_device: str, gpu_type: str, mfu: float) -> float | None:
    if cluster_device != "gpu":
        return None
    return total_flops / (mfu * PEAK_BF16_FLOPS[gpu_type]) / 3600.0


def _plan_train(spec: TrainSpec, ref: StageRef, kind: str, arch: ArchitectureSpec | None,
                mfu: float, short_doc_tokens: int, lockstep: bool) -> StagePlan:
    domains = [DomainTokens(s.domain, s.proportion, s.proportion * spec.total_tokens)
               for s in spec.data.streams]
    notes: list[str] = []
    dense = causal = total = hours = memory = balance = None
    if arch is None:
        notes.append(f"architecture inherited from stage {spec.model.from_stage}: plan the "
                     "pipeline file for FLOPs")
    else:
        seq = spec.sequence_length
        eff = 0.0
        for s in spec.data.streams:
            doc = spec.stream_target_length(s) if s.packing == "long" else min(short_doc_tokens, seq)
            eff += s.proportion * doc
        if any(s.packing != "long" for s in spec.data.streams):
            notes.append(f"document-causal FLOPs assume {short_doc_tokens}-token short documents")
        dense = dense_flops_per_token(arch, seq)
        causal = doc_causal_flops_per_token(arch, eff)
        total = dense * spec.total_tokens
        hours = _gpu_hours(total, spec.cluster.device, spec.cluster.gpu_type, mfu)
        memory = estimate_memory(spec, arch)
        if lockstep:
            balance = _lockstep(spec, arch, short_doc_tokens, notes)
    return StagePlan(
        stage=ref, kind=kind, gpus=spec.cluster.world_size, device=spec.cluster.device,
        gpu_type=spec.cluster.gpu_type, sequence_length=spec.sequence_length,
        steps=spec.total_steps, tokens=spec.total_tokens, rows_per_step=spec.rows_per_step,
        micro_batches_per_rank=spec.micro_batches_per_rank, sp=spec.sp_size, dp=spec.dp_size,
        warmup_steps=spec.warmup_steps, domains=domains, flops_dense=dense,
        flops_doc_causal=causal, total_flops=total, gpu_hours=hours, memory=memory,
        memory_rows=memory_rows(memory, spec, arch) if memory is not None else [],
        memory_warning=memory_warning(memory, spec) if memory is not None else None,
        lockstep=balance, notes=notes,
        checkpoint_hours=checkpoint_risk(spec, hours)[0],
        at_risk_gpu_hours=checkpoint_risk(spec, hours)[1])


def _lockstep(spec: TrainSpec, arch: ArchitectureSpec, short_doc_tokens: int,
              notes: list[str]) -> LockstepEstimate:
    """The stage's lockstep efficiency, and a note on what more sequence parallelism (fewer
    replicas, more micro-batches each for the placement to sort) would give."""
    from prolong.data.lockstep import replay_lockstep  # imports torch (prolong.data.packing)

    node = spec.cluster.workers_per_node
    wider = [sp for sp in range(spec.sp_size + 1, node + 1) if node % sp == 0]
    by_sp = replay_lockstep(spec, arch, short_doc_tokens=short_doc_tokens, sp_options=wider)
    own = by_sp.pop(spec.sp_size)
    if by_sp:
        why = (f"at SP {own.sp} each rank runs one micro-batch, so a step's rows all run at once "
               "and no placement can balance them; " if own.micro_batches_per_rank == 1 else "")
        sps = " / ".join(str(e.sp) for e in by_sp.values())
        notes.append(f"{why}lockstep efficiency at SP {sps} ("
                     + " / ".join(str(e.micro_batches_per_rank) for e in by_sp.values())
                     + " micro-batches per rank): "
                     + " / ".join(f"{e.efficiency:.2f}" for e in by_sp.values())
                     + ", for Ulysses' all-to-all per layer")
    return own


def _gib(value: float) -> str:
    return f"{value / GIB:,.2f} GiB"


def memory_rows(e: MemoryEstimate, spec: TrainSpec, arch: ArchitectureSpec) -> list[MemoryRow]:
    """The estimate as labelled lines, each saying how it was counted."""
    par, mem = spec.parallelism, spec.parallelism.memory
    world, zero = spec.cluster.world_size, par.zero_stage
    dtype = spec.resolved_precision
    tokens = spec.sequence_length // spec.sp_size
    by = f"/ {world}" if world > 1 else "unpartitioned"
    grads = dtype if zero == 0 else "fp32 accumulation"
    rows = [
        MemoryRow("parameters", e.parameters, f"{dtype}, ZeRO-{zero}"
                  + (f" {by}" if zero == 3 else ", full copy")),
        MemoryRow("gradients", e.gradients, f"{grads}"
                  + (f", ZeRO-{zero} {by}" if zero >= 2 else ", full copy")),
        MemoryRow("optimizer state", e.optimizer,
                  "offloaded to host" if par.offload_optimizer else
                  ("fp32 master + 2 AdamW moments" if (zero or dtype == "bf16") else
                   "2 AdamW moments") + (f" {by}" if zero and not par.offload_optimizer else "")),
        MemoryRow("ZeRO buffers", e.zero_buffers, ("reduce bucket, 5e8 elements"
                  + (" x 2 (overlap)" if spec.overlap_comm and zero in (1, 2) else "")
                  + f", reduced in {par.communication.data_type}"
                  + (f" (+ the bucket cast to {par.communication.data_type})"
                     if zero == 3 and par.communication.data_type != dtype else ""))
                  if zero else "none under ZeRO-0"),
        MemoryRow("activation checkpoints", e.checkpoints,
                  (("final hidden state (layer inputs offloaded)" if mem.activation_offload else
                    f"{arch.num_layers + 1} hidden states x {tokens:,} tokens")
                   + (f" + {arch.num_layers} attention outputs and LSEs (saveAttention)"
                      if mem.save_attention else ""))
                  if par.activation_checkpointing else "all saved activations (no checkpointing)"),
        MemoryRow("largest transient", e.transient,
                  f"{e.transient_kind}; of loss chunk ({min(mem.loss_chunk_tokens, tokens):,} "
                  f"tokens) {e.loss / GIB:.2f} and layer {e.layer / GIB:.2f}: MLP "
                  f"{e.mlp / GIB:.2f}" + (f" in {e.mlp_tiles} tiles" if e.mlp_tiles > 1 else "")
                  + f", attention {e.attention / GIB:.2f}"),
    ]
    if e.host:
        rows.append(MemoryRow("host memory per worker", e.host, "offloaded, not on the GPU"))
    return rows


def memory_warning(e: MemoryEstimate, spec: TrainSpec) -> str | None:
    """A warning when the estimated peak will not fit the GPU, or may not: the estimate is held
    to within ESTIMATE_MARGIN of measured peaks, so a peak that close to the device is no proof
    that it fits."""
    if e.device_bytes is None or not e.tight:
        return None
    gpu = spec.cluster.gpu_type
    if e.fits:
        what = (f"may not fit: the estimate is within {ESTIMATE_MARGIN:.0%} of measured peaks, "
                f"so the peak may reach {_gib(e.upper_bound)}")
    else:
        what = "will not fit"
    return (f"estimated peak {_gib(e.peak)} per GPU {what} ({gpu}: {_gib(e.device_bytes)}); "
            "see parallelism.memory (lossChunkTokens, tiledMlp, activationOffload), "
            "offloadOptimizer, a higher zeroStage or more sequenceParallel")


def _plan_eval(job: EvalJob, ref: StageRef, arch: ArchitectureSpec | None, mfu: float) -> StagePlan:
    spec = job.spec
    prompts = 0
    prompt_tokens = 0.0
    total = 0.0
    for name in spec.tasks:
        info = HELMET_TASKS[name]
        n = spec.icl_samples if info.category == "icl" else spec.samples
        for length in spec.lengths:
            prompts += n
            prompt_tokens += n * length
            if arch is not None:
                total += n * length * prefill_flops_per_token(arch, length)
    notes = ["prefill only; decoding is memory-bound and not counted"]
    if arch is None:
        notes.append("architecture unknown: plan the pipeline file for FLOPs")
    per_token = total / prompt_tokens if arch is not None and prompt_tokens else None
    hours = _gpu_hours(total, spec.cluster.device, spec.cluster.gpu_type, mfu) if arch else None
    return StagePlan(stage=ref, kind=job.kind, gpus=spec.cluster.world_size,
                     device=spec.cluster.device, gpu_type=spec.cluster.gpu_type,
                     tokens=int(prompt_tokens), prompts=prompts, flops_dense=per_token,
                     total_flops=total if arch is not None else None, gpu_hours=hours, notes=notes)


STARTUP_ALLOWANCE_SECONDS = 3600
"""Added to the estimate for a stage's default deadline: image pull, data preparation, Ray start,
checkpoint loading."""


def wall_hours(job: Job, ref: StageRef, jobs: dict[str, Job] | None = None, *,
               mfu: float = DEFAULT_MFU) -> float | None:
    """Estimated wall-clock hours of a stage on its cluster (GPU-hours over GPUs at ``mfu``);
    None without an estimate (CPU, unknown shape). ``jobs``: the pipeline's stages, through which
    fromStage finds the architecture."""
    arch = resolved_architecture(job, jobs or {})
    hours = plan_stage(job, ref, arch, mfu=mfu, lockstep=False).gpu_hours
    return None if hours is None else hours / job.spec.cluster.world_size


def default_active_deadline(job: Job, ref: StageRef,
                            jobs: dict[str, Job] | None = None) -> int | None:
    """The RayJob's activeDeadlineSeconds when the spec sets none: the estimate x
    ``activeDeadlineMargin`` + :data:`STARTUP_ALLOWANCE_SECONDS`; None without an estimate."""
    hours = wall_hours(job, ref, jobs)
    if hours is None:
        return None
    margin = job.spec.cluster.kubernetes.active_deadline_margin
    return math.ceil(hours * 3600 * margin) + STARTUP_ALLOWANCE_SECONDS
