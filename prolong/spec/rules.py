"""Recipe rules: the cross-field checks of pass 2 (:func:`check_job`, :func:`check_pipeline`).

Rules such as "proportions sum to 1" or "sequence length divisible by SP x 256" relate several
fields, sometimes of several stages. They are plain functions over validated models, not pydantic
validators, because a validator can only point at the whole model: each rule returns
:class:`~prolong.spec.issues.SpecIssue` objects with the exact field path, so the user knows which
field to fix. Paths are relative to the job's ``spec`` (``check_job`` prefixes ``spec.``) or, for
``check_pipeline``, to the pipeline document.

HELMET task names come from :mod:`prolong.spec.helmet` (plain data), so the rules do not import
:mod:`prolong.eval`.
"""

from __future__ import annotations

import math
from typing import Any

from prolong.parallel.dims import ParallelDimsError
from prolong.spec.helmet import HELMET_SIZING_LENGTHS, HELMET_TABLED_TASKS, HELMET_TASK_SYNTHETIC
from prolong.spec.issues import SpecIssue, did_you_mean
from prolong.spec.models import (
    EMBEDDED_CORPORA,
    SEQ_ALIGN,
    ArchitectureSpec,
    EvalJob,
    EvalSpec,
    Job,
    ModelSpec,
    ProLongPipeline,
    SFTJob,
    TrainJobs,
    TrainSpec,
)
from prolong.stage.uri import is_hub_id

PROPORTION_TOLERANCE = 1e-6


def check_job(job: Job) -> list[SpecIssue]:
    """Recipe rules for one job on its own. Rules that relate a stage to the stages before it
    (fromStage) are checked by :func:`check_pipeline`."""
    if isinstance(job, EvalJob):
        issues = _check_eval(job.spec)
    else:
        issues = _check_train(job.spec, is_sft=isinstance(job, SFTJob))
    issues += _check_model_source(job.spec.model, job_kind=job.kind)
    issues += _check_staging(job)
    issues += _check_pod_template(job)
    return [i.located(prefix="spec") for i in issues]


def _check_train(spec: TrainSpec, *, is_sft: bool) -> list[SpecIssue]:
    out: list[SpecIssue] = []
    streams = spec.data.streams
    total = math.fsum(s.proportion for s in streams)
    if abs(total - 1.0) > PROPORTION_TOLERANCE:
        out.append(SpecIssue("data.streams", "stream proportions must sum to 1", round(total, 9)))
    seen: dict[str, int] = {}
    for i, s in enumerate(streams):
        where = f"data.streams[{i}]"
        if s.domain in seen:
            out.append(SpecIssue(f"{where}.domain", f"domain repeats data.streams[{seen[s.domain]}]"
                                 "; give each stream its own domain name", s.domain))
        seen.setdefault(s.domain, i)
        if s.format == "embedded" and s.path not in EMBEDDED_CORPORA:
            out.append(SpecIssue(f"{where}.path", "embedded corpus must be one of "
                                 + ", ".join(EMBEDDED_CORPORA) + did_you_mean(s.path, EMBEDDED_CORPORA),
                                 s.path))
        if is_sft and s.packing != "conversation":
            out.append(SpecIssue(f"{where}.packing", "SFTJob streams must use packing: conversation",
                                 s.packing))
        if s.max_length is not None and s.max_length < spec.stream_min_length(s):
            out.append(SpecIssue(f"{where}.maxLength", "must be at least the stream's minLength "
                                 f"{spec.stream_min_length(s)} tokens", s.max_length))
        if not is_sft and s.packing == "conversation":
            out.append(SpecIssue(f"{where}.packing", "packing conversation belongs to SFTJob; "
                                 "pretraining streams use concat or long", s.packing))
        if s.packing != "long":
            if s.target_length is not None:
                out.append(SpecIssue(f"{where}.targetLength", "targetLength applies to packing: "
                                     "long only", s.target_length))
            continue
        target = spec.stream_target_length(s)
        if target > spec.sequence_length or spec.sequence_length % target:
            out.append(SpecIssue(f"{where}.targetLength", "must divide sequenceLength "
                                 f"{spec.sequence_length} (documents fill whole rows)", target))
        if s.min_length is not None and s.min_length < target:
            out.append(SpecIssue(f"{where}.minLength", f"long documents must be at least "
                                 f"targetLength {target} tokens", s.min_length))

    sp = spec.sp_size
    if spec.sequence_length % (sp * SEQ_ALIGN):
        out.append(SpecIssue("sequenceLength", f"must be divisible by sequenceParallel x {SEQ_ALIGN}"
                             f" = {sp * SEQ_ALIGN}", spec.sequence_length))
    out += _check_sp_heads(spec.model.architecture, sp)
    if spec.parallelism.offload_optimizer and spec.parallelism.zero_stage == 0:
        # DeepSpeed offloads optimizer state only inside its ZeRO optimizers (prolong.parallel).
        out.append(SpecIssue("parallelism.offloadOptimizer", "needs parallelism.zeroStage >= 1 "
                             "(DeepSpeed offloads optimizer state only under ZeRO)", True))
    if sp > 1 and spec.resolved_precision == "bf16" and spec.parallelism.zero_stage == 1:
        # Measured in tests/parallel/test_sp_parity.py (DeepSpeed 0.19.8): ZeRO-1 + bf16 runs
        # DeepSpeed's BF16_Optimizer, which counts the grad norm on SP rank 0 only and crashes on
        # the other SP ranks. ZeRO-2 costs no more memory and passes the parity tests.
        out.append(SpecIssue("parallelism.zeroStage", "ZeRO-1 with bf16 fails under sequence "
                             "parallelism in DeepSpeed (grad norm on SP rank 0 only); use "
                             "zeroStage 2 or 3", 1))
    out += _check_memory(spec)
    cluster = spec.cluster
    try:
        dims = spec.parallel_dims
    except ParallelDimsError as exc:
        dims = None
        where = "cluster.workersPerNode" if exc.field == "workersPerNode" else \
            "parallelism.sequenceParallel"
        out.append(SpecIssue(where, str(exc), cluster.workers_per_node
                             if exc.field == "workersPerNode" else sp))
    if dims is not None:
        row_quantum = spec.sequence_length * dims.dp
        if spec.global_batch_tokens % row_quantum:
            out.append(SpecIssue("globalBatchTokens", f"must be a multiple of sequenceLength x "
                                 f"data-parallel size = {spec.sequence_length} x {dims.dp} = "
                                 f"{row_quantum}", spec.global_batch_tokens))
    if spec.tokens is not None and spec.tokens % spec.global_batch_tokens:
        out.append(SpecIssue("tokens", f"must be a multiple of globalBatchTokens "
                             f"{spec.global_batch_tokens}", spec.tokens))
    sched = spec.schedule
    if spec.total_steps >= 1 and spec.warmup_steps >= spec.total_steps:
        field_ = "schedule.warmupSteps" if sched.warmup_steps is not None else "schedule.warmupRatio"
        out.append(SpecIssue(field_, f"warmup ({spec.warmup_steps} steps) must be shorter than the "
                             f"run ({spec.total_steps} steps)",
                             sched.warmup_steps if sched.warmup_steps is not None else sched.warmup_ratio))
    if sched.min_lr is not None and sched.min_lr > sched.peak_lr:
        out.append(SpecIssue("schedule.minLR", f"must not exceed peakLR {sched.peak_lr}", sched.min_lr))

    tok = spec.data.tokenizer
    if tok.train_vocab_size is not None:
        if tok.source is not None:
            out.append(SpecIssue("data.tokenizer", "give source or trainVocabSize, not both"))
        if spec.model.source is not None or spec.model.from_stage is not None:
            out.append(SpecIssue("data.tokenizer.trainVocabSize", "a freshly trained tokenizer only"
                                 " fits a randomly initialised model (no model.source/fromStage)",
                                 tok.train_vocab_size))
        arch = spec.model.architecture
        if arch is not None and arch.vocab_size != tok.train_vocab_size:
            out.append(SpecIssue("data.tokenizer.trainVocabSize", "must equal "
                                 f"model.architecture.vocabSize {arch.vocab_size}",
                                 tok.train_vocab_size))
    if cluster.device == "cpu" and spec.precision == "bf16":
        out.append(SpecIssue("precision", "bf16 training needs cluster.device: gpu (CPU runs fp32)",
                             spec.precision))
    return out


def _check_memory(spec: TrainSpec) -> list[SpecIssue]:
    """Rules of ``parallelism.memory``: settings that only mean something together with others."""
    par = spec.parallelism
    mem = par.memory
    out = []
    if mem.activation_offload and not par.activation_checkpointing:
        # What is offloaded is each checkpointed layer's saved input: without checkpointing there
        # is nothing of that kind (and autograd would keep every intermediate on the GPU anyway).
        out.append(SpecIssue("parallelism.memory.activationOffload", "needs "
                             "parallelism.activationCheckpointing: true (it offloads the "
                             "checkpointed layer inputs)", True))
    if mem.save_attention and not par.activation_checkpointing:
        out.append(SpecIssue("parallelism.memory.saveAttention", "needs "
                             "parallelism.activationCheckpointing: true (it keeps the attention "
                             "outputs a checkpointed layer would recompute)", True))
    if mem.activation_offload and spec.cluster.device == "cpu":
        # transformers offloads into pinned host memory, which a CPU-only torch cannot allocate
        # ("pin_memory=True requires a CUDA or other accelerator backend"); on a CPU worker the
        # activations are in host memory already.
        out.append(SpecIssue("parallelism.memory.activationOffload", "needs cluster.device: gpu "
                             "(on CPU the activations are in host memory already, and pinned "
                             "memory needs an accelerator)", True))
    if mem.tiled_mlp_shards is not None:
        local = spec.sequence_length // spec.sp_size
        if not mem.tiled_mlp:
            out.append(SpecIssue("parallelism.memory.tiledMlpShards", "applies with "
                                 "parallelism.memory.tiledMlp: true only", mem.tiled_mlp_shards))
        elif mem.tiled_mlp_shards > local:
            out.append(SpecIssue("parallelism.memory.tiledMlpShards", "must not exceed the tokens "
                                 f"each worker holds, sequenceLength / sequenceParallel = {local}",
                                 mem.tiled_mlp_shards))
    return out


def _check_sp_heads(arch: ArchitectureSpec | None, sp: int) -> list[SpecIssue]:
    """Ulysses gives each SP rank numAttentionHeads / SP query heads, so SP must divide them.
    KV heads are either split the same way or, when fewer than SP, replicated: SP must then be a
    multiple of numKeyValueHeads (DeepSpeed's UlyssesSPAttentionHF does exactly this)."""
    if sp == 1 or arch is None:
        return []
    out = []
    if arch.num_attention_heads % sp:
        out.append(SpecIssue("parallelism.sequenceParallel", "must divide "
                             f"model.architecture.numAttentionHeads {arch.num_attention_heads}", sp))
    kv = arch.num_key_value_heads
    if kv % sp and sp % kv:
        out.append(SpecIssue("parallelism.sequenceParallel", f"must divide, or be a multiple of, "
                             f"model.architecture.numKeyValueHeads {kv}", sp))
    return out


def _check_eval(spec: EvalSpec) -> list[SpecIssue]:
    out: list[SpecIssue] = []
    released = []
    for i, name in enumerate(spec.tasks):
        synthetic = HELMET_TASK_SYNTHETIC.get(name)
        if synthetic is None:
            out.append(SpecIssue(f"tasks[{i}]", "unknown HELMET task"
                                 + did_you_mean(name, HELMET_TASK_SYNTHETIC)
                                 + " (see prolong.eval.tasks)", name))
        elif not synthetic:
            released.append(name)
    if len(set(spec.tasks)) != len(spec.tasks):
        out.append(SpecIssue("tasks", "lists a task twice", spec.tasks))
    if released and not spec.data_dir:
        out.append(SpecIssue("dataDir", "required for tasks that read HELMET's released data: "
                             + ", ".join(released)))
    if len(set(spec.lengths)) != len(spec.lengths):
        out.append(SpecIssue("lengths", "lists a length twice", spec.lengths))
    tabled = [t for t in spec.tasks if t in HELMET_TABLED_TASKS]
    if spec.sizing == "helmet" and tabled:
        for i, n in enumerate(spec.lengths):
            if n not in HELMET_SIZING_LENGTHS:
                out.append(SpecIssue(
                    f"lengths[{i}]", "sizing helmet has HELMET's amounts only at "
                    + ", ".join(map(str, HELMET_SIZING_LENGTHS)) + f" (needed by {tabled[0]}); "
                    "set sizing: fill for other lengths", n))
    return out


def _check_model_source(model: ModelSpec, job_kind: str) -> list[SpecIssue]:
    out: list[SpecIssue] = []
    if model.source is not None and model.from_stage is not None:
        out.append(SpecIssue("model", "give model.source or model.fromStage, not both"))
    if model.source is None and model.from_stage is None:
        if job_kind == "EvalJob":
            out.append(SpecIssue("model", "an EvalJob needs model.source or model.fromStage"))
        elif model.architecture is None:
            out.append(SpecIssue("model.architecture", "random initialisation (no source, no "
                                 "fromStage) needs an architecture"))
    if model.init == "weightsAndOptimizer" and model.from_stage is None:
        out.append(SpecIssue("model.init", "weightsAndOptimizer needs model.fromStage", model.init))
    if job_kind == "EvalJob" and model.init != "weights":
        out.append(SpecIssue("model.init", "evaluation loads weights only", model.init))
    return out


def _check_staging(job: Job) -> list[SpecIssue]:
    """A hub id as a source needs a staged copy to load from: workers do not download
    (prolong.model.staging), so without one every worker of the stage would refuse to start,
    after the cluster provisioned them all."""
    model = job.spec.model
    out = []
    if model.source is not None and is_hub_id(model.source) and model.staged_path is None:
        out.append(SpecIssue("model.source", "is a hub id and workers do not download: set "
                             "model.stagedPath (and allowHub) and stage it once with "
                             "`prolongctl model stage FILE`", model.source))
    data = getattr(job.spec, "data", None)
    tok, field = (data.tokenizer, "data.tokenizer") if data is not None else \
        (job.spec.tokenizer, "tokenizer")
    # A tokenizer whose source is the model's loads from the model's staged copy (which holds
    # the tokenizer files); without one, the model.source issue above already says what to do.
    if tok.source is not None and is_hub_id(tok.source) and tok.staged_path is None and \
            tok.source != model.source:
        out.append(SpecIssue(f"{field}.source", "is a hub id and workers do not download: set "
                             f"{field}.stagedPath (and allowHub) and stage it once with "
                             "`prolongctl model stage FILE`", tok.source))
    return out


def _check_pod_template(job: Job) -> list[SpecIssue]:
    """cluster.podTemplate's patches against the core Pod schema, as each will meet its pod
    template (a bad field is found here, not by the API server after the GPUs were asked for)."""
    patches = job.spec.cluster.pod_template
    if patches is None:
        return []
    # Imported here: prolong.k8s's package imports the renderer, which imports this package.
    from prolong.k8s.podtemplate import (
        HEAD_CONTAINER,
        RESERVED_LABELS,
        WORKER_CONTAINER,
        patch_errors,
    )

    out = []
    for group, patch, container in (("head", patches.head, HEAD_CONTAINER),
                                    ("workers", patches.workers, WORKER_CONTAINER)):
        if patch is None:
            continue
        for problem in patch_errors(patch, container, RESERVED_LABELS):
            where = f"cluster.podTemplate.{group}" + (f".{problem.path}" if problem.path else "")
            out.append(SpecIssue(where.replace(".[", "["), problem.rule))
    return out


def _check_lineage(job: Job, upstream: dict[str, Job]) -> list[SpecIssue]:
    """Rules between a stage and the earlier stage it starts from (paths relative to its spec)."""
    model = job.spec.model
    src = upstream.get(model.from_stage) if model.from_stage else None
    if src is None:
        return []
    if isinstance(src, EvalJob):
        return [SpecIssue("model.fromStage", "must name a training stage, not an EvalJob",
                          model.from_stage)]
    out = []
    if model.init == "weightsAndOptimizer" and isinstance(job, TrainJobs) and \
            src.spec.parallelism.zero_stage != job.spec.parallelism.zero_stage:
        out.append(SpecIssue("parallelism.zeroStage", "continuing the optimizer state of stage "
                             f"{model.from_stage} needs its ZeRO stage "
                             f"{src.spec.parallelism.zero_stage}", job.spec.parallelism.zero_stage))
    up_arch = resolved_architecture(src, upstream)
    if model.architecture is not None and up_arch is not None and \
            _arch_shape(model.architecture) != _arch_shape(up_arch):
        out.append(SpecIssue("model.architecture", f"differs from stage {model.from_stage}'s; a "
                             "stage inherits the shape of the weights it starts from"))
    return out


def _arch_shape(arch: ArchitectureSpec) -> dict[str, Any]:
    return arch.model_dump(exclude={"preset"})


def resolved_architecture(job: Job, upstream: dict[str, Job] | None = None) -> ArchitectureSpec | None:
    """The job's architecture, following fromStage through ``upstream`` when it states none."""
    seen = set()
    while job is not None:
        arch = job.spec.model.architecture
        if arch is not None:
            return arch
        name = job.spec.model.from_stage
        if name is None or upstream is None or name in seen:
            return None
        seen.add(name)
        job = upstream.get(name)
    return None


def check_pipeline(pipeline: ProLongPipeline, jobs: dict[str, Job]) -> list[SpecIssue]:
    """Rules across stages. ``jobs`` maps each stage name to its (inlined) job."""
    out: list[SpecIssue] = []
    names = [s.name for s in pipeline.spec.stages]
    index = {}
    for i, name in enumerate(names):
        if name in index:
            out.append(SpecIssue(f"spec.stages[{i}].name", f"repeats spec.stages[{index[name]}]", name))
        index.setdefault(name, i)
    storage_roots: dict[str, str] = {}
    for i, name in enumerate(names):
        job = jobs.get(name)
        if job is None:
            continue
        src = job.spec.model.from_stage
        where = f"spec.stages[{i}]"
        if src is not None:
            j = index.get(src)
            if j is None:
                out.append(SpecIssue(f"{where}.spec.model.fromStage", "names no stage of this "
                                     "pipeline" + did_you_mean(src, names), src))
            elif j == i:
                out.append(SpecIssue(f"{where}.spec.model.fromStage", "a stage cannot start from "
                                     "itself", src))
            elif j > i:
                out.append(SpecIssue(f"{where}.spec.model.fromStage", f"names stage {src}, which "
                                     "runs later (stages start from earlier stages only, so there "
                                     "are no cycles)", src))
        before = {n: jobs[n] for n in names[:i] if n in jobs}
        out += [x.located(prefix=f"{where}.spec") for x in _check_lineage(job, before)]
        storage_roots[name] = job.spec.storage.root
    roots = set(storage_roots.values())
    if len(roots) > 1:
        first = names[0]
        for i, name in enumerate(names):
            if name in storage_roots and storage_roots[name] != storage_roots.get(first):
                out.append(SpecIssue(f"spec.stages[{i}].spec.storage.root", "every stage of a "
                                     f"pipeline shares one storage root ({first} uses "
                                     f"{storage_roots.get(first)!r})", storage_roots[name]))
    return out

