"""What a spec will cost: steps, tokens, rows, FLOPs and GPU-hours per stage. Pure functions.

Attention cost depends on document lengths, which are only known once data is prepared. Until then
the document-causal figure assumes ``short_doc_tokens`` for concat/conversation streams; long
streams are exact (every document is targetLength tokens).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from prolong.eval.tasks import HELMET_TASKS
from prolong.model.flops import (
    PEAK_BF16_FLOPS,
    dense_flops_per_token,
    doc_causal_flops_per_token,
    prefill_flops_per_token,
)
from prolong.spec import ArchitectureSpec, EvalJob, Job, TrainSpec, resolved_architecture
from prolong.stage.identity import StageRef

DEFAULT_MFU = 0.4
DEFAULT_SHORT_DOC_TOKENS = 2048


@dataclass(frozen=True)
class DomainTokens:
    domain: str
    proportion: float
    tokens: float


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
    notes: list[str] = field(default_factory=list)


def plan_stage(job: Job, ref: StageRef, arch: ArchitectureSpec | None, *, mfu: float = DEFAULT_MFU,
               short_doc_tokens: int = DEFAULT_SHORT_DOC_TOKENS) -> StagePlan:
    if isinstance(job, EvalJob):
        return _plan_eval(job, ref, arch, mfu)
    return _plan_train(job.spec, ref, job.kind, arch, mfu, short_doc_tokens)


def _gpu_hours(total_flops: float, cluster_device: str, gpu_type: str, mfu: float) -> float | None:
    if cluster_device != "gpu":
        return None
    return total_flops / (mfu * PEAK_BF16_FLOPS[gpu_type]) / 3600.0


def _plan_train(spec: TrainSpec, ref: StageRef, kind: str, arch: ArchitectureSpec | None,
                mfu: float, short_doc_tokens: int) -> StagePlan:
    domains = [DomainTokens(s.domain, s.proportion, s.proportion * spec.total_tokens)
               for s in spec.data.streams]
    notes: list[str] = []
    dense = causal = total = hours = None
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
    return StagePlan(
        stage=ref, kind=kind, gpus=spec.cluster.world_size, device=spec.cluster.device,
        gpu_type=spec.cluster.gpu_type, sequence_length=spec.sequence_length,
        steps=spec.total_steps, tokens=spec.total_tokens, rows_per_step=spec.rows_per_step,
        micro_batches_per_rank=spec.micro_batches_per_rank, sp=spec.sp_size, dp=spec.dp_size,
        warmup_steps=spec.warmup_steps, domains=domains, flops_dense=dense,
        flops_doc_causal=causal, total_flops=total, gpu_hours=hours, notes=notes)


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
    hours = plan_stage(job, ref, arch, mfu=mfu).gpu_hours
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
