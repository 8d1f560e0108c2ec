"""The spec models: every field a ProLong spec file accepts, as pydantic models.

This module holds the *structure* of a spec (pass 1 of :mod:`prolong.spec`): types, ranges, enums,
defaults, camelCase aliases and unknown-field rejection, plus the few model validators whose
error can only be about the whole section (``architecture`` needs a preset or explicit fields,
``steps`` or ``tokens``). Cross-field recipe rules live in :mod:`prolong.spec.rules` instead,
because a pydantic validator can only point at the whole model while a rule returns a
:class:`~prolong.spec.issues.SpecIssue` naming the exact field to fix.

The CRD schema (``python -m prolong.k8s.crd``) and the stage ids (:mod:`prolong.stage.identity`)
are generated from these models: a changed field, alias, default or docstring changes them.
Imports from prolong: :mod:`prolong.stage.names` (name rules) and :mod:`prolong.parallel.dims`
(the DP x SP layout behind :attr:`TrainSpec.parallel_dims`), neither of which imports prolong.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Discriminator,
    Field,
    Tag,
    model_validator,
)
from pydantic.alias_generators import to_camel

from prolong.parallel.dims import ParallelDims
from prolong.stage.names import DNS_1035_PATTERN, JOB_NAME_MAX, STAGE_NAME_MAX

API_VERSION = "prolong.dev/v1alpha1"
JOB_KINDS = ("PretrainJob", "SFTJob", "EvalJob")
KINDS = (*JOB_KINDS, "ProLongPipeline")

# Ulysses splits the sequence into SP shards; each shard must stay a multiple of 256 tokens so that
# flash-attention tiles and the tiled-loss chunks line up.
SEQ_ALIGN = 256

DNS_LABEL = DNS_1035_PATTERN
_DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
"""A Kubernetes object name such as a WorkloadPriorityClass's (DNS-1123 subdomain)."""
DOMAIN_NAME = r"^[A-Za-z0-9][A-Za-z0-9_.-]*$"

# Local corpora that `prolongctl data prepare` builds without any download (see prolong.data).
EMBEDDED_CORPORA = ("code-repos", "books", "short-text", "retrieval", "retrieval-short", "repeats",
                    "sft-conversations")


class SpecModel(BaseModel):
    """Base for every spec section: camelCase in YAML, unknown fields rejected."""

    model_config = ConfigDict(
        extra="forbid",
        alias_generator=to_camel,
        populate_by_name=True,
        use_attribute_docstrings=True,
        validate_default=True,
    )


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

ArchitecturePreset = Literal["llama3-8b", "llama3.2-1b", "tiny"]

ARCHITECTURE_PRESETS: dict[str, dict[str, Any]] = {
    # Llama-3-8B (RECIPE.md): 32 layers, hidden 4096, 32 query heads, 8 KV heads, MLP 14336.
    "llama3-8b": dict(num_layers=32, hidden_size=4096, num_attention_heads=32,
                      num_key_value_heads=8, intermediate_size=14336, vocab_size=128256,
                      tie_word_embeddings=False),
    # Llama-3.2-1B: the "1B-shape" model used for single-GPU throughput checks.
    "llama3.2-1b": dict(num_layers=16, hidden_size=2048, num_attention_heads=32,
                        num_key_value_heads=8, intermediate_size=8192, vocab_size=128256,
                        tie_word_embeddings=True),
    # A Llama small enough to train on a 2-core CPU in seconds (quickstart and tests).
    "tiny": dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=176, vocab_size=4096, tie_word_embeddings=False),
}


class ArchitectureSpec(SpecModel):
    """Shape of a Llama-style decoder. Fields left out are taken from ``preset``."""

    preset: ArchitecturePreset | None = None
    """Named shape to start from: llama3-8b, llama3.2-1b or tiny. Explicit fields override it."""
    num_layers: int | None = Field(None, ge=1)
    """Number of transformer blocks (L)."""
    hidden_size: int | None = Field(None, ge=8)
    """Model width; the head dimension is hiddenSize / numAttentionHeads."""
    num_attention_heads: int | None = Field(None, ge=1)
    """Query heads (H)."""
    num_key_value_heads: int | None = Field(None, ge=1)
    """Key/value heads (grouped-query attention); must divide numAttentionHeads."""
    intermediate_size: int | None = Field(None, ge=1)
    """Width of the gated MLP."""
    vocab_size: int | None = Field(None, ge=2)
    """Vocabulary size; must equal the tokenizer's."""
    tie_word_embeddings: bool | None = None
    """Whether the LM head shares the input embedding matrix."""

    @model_validator(mode="after")
    def _fill_from_preset(self) -> ArchitectureSpec:
        base = ARCHITECTURE_PRESETS.get(self.preset or "", {})
        for name, value in base.items():
            if getattr(self, name) is None:
                object.__setattr__(self, name, value)
        missing = [to_camel(n) for n in ARCHITECTURE_PRESETS["tiny"] if getattr(self, n) is None]
        if missing:
            raise ValueError(f"needs a preset or explicit {', '.join(missing)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hiddenSize {self.hidden_size} is not divisible by "
                             f"numAttentionHeads {self.num_attention_heads}")
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError(f"numAttentionHeads {self.num_attention_heads} is not divisible by "
                             f"numKeyValueHeads {self.num_key_value_heads}")
        return self

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads


AttentionBackend = Literal["auto", "flash_attn", "torch_varlen", "flex", "sdpa"]


class ModelSpec(SpecModel):
    """Where the weights come from and how the model is configured for long context."""

    source: str | None = None
    """HF model id or local path of a pretrained causal LM (e.g. meta-llama/Meta-Llama-3-8B-Instruct).
    Leave out, together with fromStage, to start from random weights of ``architecture``."""
    revision: str | None = None
    """Which version of ``source``: a hub revision (branch, tag or commit) that staging downloads,
    or, for a local copy made by ``python -m prolong.run.ship``, the shipped stage's id (its
    ``shipped.json``; required then, and checked wherever the model is loaded). Part of the stage
    id, so a stage that names new weights runs again instead of reusing a run made from the old."""
    from_stage: str | None = None
    """Name of an earlier stage of the same pipeline whose final weights this stage starts from."""
    init: Literal["weights", "weightsAndOptimizer"] = "weights"
    """With fromStage: take only the weights (SFT, eval), or the weights and the AdamW state with a
    fresh LR schedule (ProLong's stage 1 -> stage 2)."""
    architecture: ArchitectureSpec | None = None
    """Model shape. Required for random initialisation; with source or fromStage it is checked
    against the loaded config and used by ``prolongctl plan``."""
    rope_theta: float | None = Field(None, gt=0)
    """RoPE base frequency. Left out: keep the checkpoint's (Llama-3: 5e5)."""
    attention: AttentionBackend = "auto"
    """Attention kernel: auto picks flash_attn, then torch_varlen, then flex, then sdpa (the
    per-document CPU reference). All of them mask across packed documents."""
    staged_path: str | None = None
    """Directory (local, on the storage volume, or s3:// / gs://) that ``prolongctl model stage``
    copies ``source`` to once, and that every worker loads the model from. Workers never download:
    a hub id as source needs this."""
    allow_hub: bool = False
    """Let ``prolongctl model stage`` fetch ``source`` from the Hugging Face hub. Off: source must
    be a local directory."""
    hub_token_secret: str | None = Field(None, pattern=DNS_LABEL)
    """Kubernetes Secret whose key ``token`` holds the Hugging Face token for a gated source
    (meta-llama/...), as HF_TOKEN in the staging step's environment only (the model-staging Job:
    :func:`prolong.k8s.rayjob.hub_token_env`), never in the Ray pods, which never download.
    ``prolongctl model stage`` on a workstation reads HF_TOKEN from its own environment."""


# --------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------

SourceFormat = Literal["jsonl", "parquet", "arrow", "hf_disk", "repo_dir", "text_dir", "mds",
                       "embedded"]
Packing = Literal["concat", "long", "conversation"]


class TokenizerSpec(SpecModel):
    """Which tokenizer turns text into ids."""

    source: str | None = None
    """HF id or local path. Left out: the model's source (or the upstream stage's tokenizer)."""
    train_vocab_size: int | None = Field(None, ge=256)
    """Train a byte-level BPE tokenizer of this size on the job's own streams (the quickstart
    does this: no download). Must equal the architecture's vocabSize."""
    staged_path: str | None = None
    """Directory (local, volume, or s3:// / gs://) that ``prolongctl model stage`` copies
    ``source`` to and the tokenizer is loaded from. Left out with a staged model: the model's
    staged directory, which holds its tokenizer files."""
    allow_hub: bool = False
    """Let ``prolongctl model stage`` fetch ``source`` from the Hugging Face hub (the token is the
    model's hubTokenSecret)."""


class DataStream(SpecModel):
    """One source of documents and its share of the training tokens."""

    domain: str = Field(pattern=DOMAIN_NAME)
    """Name used in per-domain token counts and metrics; unique within a job."""
    path: str
    """File, directory or glob (or, with format embedded, the name of a local corpus)."""
    format: SourceFormat
    """jsonl / parquet / arrow / hf_disk (datasets.save_to_disk); repo_dir: every sub-directory is
    one repository whose files are concatenated into one document; text_dir: one document per
    file; mds: ProLong's released Mosaic shards (already tokenized); embedded: a corpus built
    locally without download (code-repos, books, short-text, retrieval, retrieval-short, repeats,
    sft-conversations)."""
    proportion: float = Field(gt=0, le=1)
    """Share of the stage's training tokens drawn from this stream; shares sum to 1."""
    packing: Packing = "concat"
    """concat: short documents concatenated, the cut remainder starts the next row. long: each
    document (at least targetLength tokens) is cut to targetLength and sequenceLength /
    targetLength of them fill a row (one per row when equal). conversation: SFT conversations
    concatenated, the cut remainder discarded."""
    target_length: int | None = Field(None, ge=1)
    """For long streams: tokens per document slot (default: the sequence length). 65536 inside a
    524288 row packs 64K documents eight to a row, as ProLong's stage 2 does."""
    min_length: int | None = Field(None, ge=1)
    """Documents shorter than this are dropped (default: targetLength for long streams, 1
    otherwise)."""
    max_length: int | None = Field(None, ge=1)
    """Documents longer than this are dropped (default: no limit). Takes one length bucket of a
    mixed-length source: short retrieval episodes for a 512-token stage, long ones for the next."""
    text_field: str = "text"
    """Column holding the document text (jsonl, parquet, arrow, hf_disk)."""
    messages_field: str = "messages"
    """Column holding a conversation as a list of {role, content} (packing conversation)."""


class DataSpec(SpecModel):
    """The stage's data mixture."""

    streams: list[DataStream] = Field(min_length=1)
    """The mixture. Proportions are token shares and must sum to 1."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """Tokenizer used for every stream."""
    prepared_dir: str | None = None
    """Where ``prolongctl data prepare`` writes token shards. Default: <storage.root>/data."""
    seed: int = 0
    """Seed of the mixture order (the same seed gives the same rows)."""


# --------------------------------------------------------------------------------------------
# Optimisation
# --------------------------------------------------------------------------------------------

class OptimizerSpec(SpecModel):
    """AdamW settings (ProLong: betas 0.9/0.95, weight decay 0.1, clip 1.0)."""

    name: Literal["adamw"] = "adamw"
    """Only AdamW is supported."""
    betas: tuple[Annotated[float, Field(ge=0, lt=1)], Annotated[float, Field(ge=0, lt=1)]] = (0.9, 0.95)
    """Adam beta1 and beta2."""
    eps: float = Field(1e-8, gt=0)
    """Adam epsilon."""
    weight_decay: float = Field(0.1, ge=0)
    """Decoupled weight decay."""
    grad_clip: float | None = Field(1.0, gt=0)
    """Clip the global gradient norm to this value; null disables clipping."""


class ScheduleSpec(SpecModel):
    """Learning-rate schedule: linear warmup, then decay to a floor."""

    peak_lr: float = Field(alias="peakLR", gt=0)
    """Learning rate at the end of warmup."""
    warmup_ratio: float | None = Field(None, ge=0, lt=1)
    """Warmup as a fraction of all steps (ProLong: 0.1; SFT: 0.05). Default 0.1 when warmupSteps is
    not given either."""
    warmup_steps: int | None = Field(None, ge=0)
    """Warmup in steps, instead of warmupRatio."""
    decay: Literal["cosine", "linear", "constant"] = "cosine"
    """Shape after warmup."""
    min_lr_ratio: float | None = Field(None, alias="minLRRatio", ge=0, le=1)
    """Floor as a fraction of peakLR (ProLong: 0.1). Default 0.1 when minLR is not given either."""
    min_lr: float | None = Field(None, alias="minLR", ge=0)
    """Floor as an absolute value (ProLong SFT: 2e-6), instead of minLRRatio."""

    @model_validator(mode="after")
    def _one_of_each(self) -> ScheduleSpec:
        if self.warmup_ratio is not None and self.warmup_steps is not None:
            raise ValueError("give warmupRatio or warmupSteps, not both")
        if self.min_lr_ratio is not None and self.min_lr is not None:
            raise ValueError("give minLRRatio or minLR, not both")
        return self

    def warmup_steps_for(self, total_steps: int) -> int:
        if self.warmup_steps is not None:
            return self.warmup_steps
        ratio = 0.1 if self.warmup_ratio is None else self.warmup_ratio
        return round(ratio * total_steps)

    @property
    def floor_lr(self) -> float:
        if self.decay == "constant":
            return self.peak_lr
        if self.min_lr is not None:
            return self.min_lr
        return self.peak_lr * (0.1 if self.min_lr_ratio is None else self.min_lr_ratio)


class MemorySpec(SpecModel):
    """Memory savers for long rows. None of them changes what is computed (the loss and gradients
    agree up to float rounding, tests/model/test_memory_knobs.py), so they are scheduling-only: a
    stage resubmitted with other settings here keeps its id and resumes its checkpoints."""

    loss_chunk_tokens: int = Field(8192, ge=1)
    """Sequence positions per chunk of the LM-head + cross-entropy: the largest fp32 logits tensor
    is lossChunkTokens x vocabSize (8,192 x 128,256 x 4 bytes = 3.9 GiB for Llama-3)."""
    activation_offload: bool = False
    """Keep each checkpointed decoder layer's input in pinned host memory instead of on the GPU
    (costs a copy each way per layer). Needs activationCheckpointing."""
    tiled_mlp: bool = False
    """Run each decoder layer's MLP over the local tokens in tiles (DeepSpeed ALST's TiledMLP), so
    that only one tile's intermediate activations exist at a time; each tile is recomputed in the
    backward."""
    tiled_mlp_shards: int | None = Field(None, ge=1)
    """Tiles per MLP call with tiledMlp. Left out: auto, ceil(local tokens / hiddenSize) as ALST
    does (16 at 65,536 local tokens of Llama-3-8B)."""
    save_attention: bool = False
    """Selective activation checkpointing: keep each layer's attention output and log-sum-exp
    (T x hiddenSize activations and T x heads floats per layer: 0.5 GiB per layer at 65,536 local
    tokens of Llama-3-8B), so the backward's recompute re-runs the projections but not the
    attention kernel. Needs activationCheckpointing."""
    expandable_segments: bool = True
    """Run GPU workers with PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True, so that the caching
    allocator grows segments instead of fragmenting at long, varying sizes."""


class CommunicationSpec(SpecModel):
    """How gradients travel between workers (scheduling only: the same gradients up to the
    reduction's rounding, so a stage resubmitted with other settings resumes its checkpoints)."""

    data_type: Literal["fp32", "bf16"] = "fp32"
    """Precision of DeepSpeed's gradient reduction (``communication_data_type`` and
    ``seq_parallel_communication_data_type``, written both). Left to DeepSpeed, a bf16 stage
    would reduce in bf16 without SP and silently in fp32 with SP>1; stated here, every stage
    reduces at one precision and ``prolongctl plan`` counts its buckets at that width."""
    overlap_comm: bool | None = None
    """Overlap the gradient reduction with the backward (DeepSpeed ``overlap_comm``; double
    reduce buckets under ZeRO 1/2). Left out: on for GPU workers, off on CPU."""


class ParallelismSpec(SpecModel):
    """How one stage is split across workers."""

    sequence_parallel: int = Field(1, ge=1)
    """Ulysses sequence-parallel degree (SP): each row is split over SP workers of one node.
    ProLong's stage 2 uses 8."""
    zero_stage: Literal[0, 1, 2, 3] = 3
    """DeepSpeed ZeRO stage (3 shards parameters, like ProLong's FSDP full sharding)."""
    activation_checkpointing: bool = True
    """Recompute activations in the backward pass (needed at 64K and beyond)."""
    reorder_micro_batches: bool = True
    """Deal each step's rows over the data-parallel replicas and their micro-steps by cost (sum of
    squared document lengths), dearest first, so that the rows of one micro-step cost about the
    same on every replica: ZeRO-3 makes each micro-step wait for its slowest row (the plan
    prints the resulting lockstep efficiency). ProLong sorted each worker's own micro-batches
    (+11.7% throughput); this also chooses which rows share a micro-step. Off: a seeded deal."""
    offload_optimizer: bool = False
    """Keep optimizer state in CPU memory (ZeRO-Offload)."""
    memory: MemorySpec = Field(default_factory=MemorySpec)
    """Loss chunk, activation offload, tiled MLP and allocator settings (scheduling only)."""
    communication: CommunicationSpec = Field(default_factory=CommunicationSpec)
    """Gradient-reduction precision and overlap (scheduling only)."""


class CheckpointSpec(SpecModel):
    """Checkpoint cadence and retention."""

    every_steps: int = Field(125, ge=1)
    """Save every N optimizer steps (ProLong: 125 for pretraining, 250 for SFT). The last step is
    always saved."""
    keep: int = Field(2, ge=1)
    """How many recent checkpoints to keep."""
    every_minutes: float | None = Field(None, gt=0)
    """Also save at the first step that ends at least this many minutes after the last save
    (rank 0's clock, broadcast so every rank saves at the same step). Bounds the work one
    interruption loses when steps are long: ProLong's 512K stage runs about 5 min a step, so
    everySteps 125 alone is about 10 h of 64 GPUs. Scheduling only: the stage id ignores it."""


class StorageSpec(SpecModel):
    """Where stage outputs live: <root>/<pipeline>/<stage>-<id>/."""

    root: str = "./runs"
    """Directory (local or a shared mount) or object-store URI (s3://, gs://)."""
    volume_claim: str | None = None
    """On Kubernetes: a ReadWriteMany PersistentVolumeClaim mounted at root."""


class Toleration(SpecModel):
    """A Kubernetes toleration for the worker pods."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


class VolumeSpec(SpecModel):
    """A PersistentVolumeClaim mounted into every pod of a stage: the Ray head, the workers and
    the preparation Job (data sets, a HELMET checkout, NLI and tokenizer copies)."""

    claim: str = Field(pattern=DNS_LABEL)
    """Name of the PersistentVolumeClaim, in the stage's namespace."""
    mount_path: str = Field(pattern=r"^/")
    """Absolute path where the claim is mounted (e.g. /data)."""
    sub_path: str | None = Field(None, pattern=r"^[^/]")
    """Directory inside the volume to mount instead of its root."""
    read_only: bool = True
    """Mount read-only (input data); false when the stage writes there."""


class PrepareSpec(SpecModel):
    """The CPU-only Kubernetes Job that stages the model and prepares the data of a stage before
    its GPU RayJob is created (prolong.k8s.preparation)."""

    cpus: int = Field(16, ge=1)
    """CPU cores of the preparation pod (tokenizer processes: at most this many)."""
    memory_gi: int = Field(64, ge=1)
    """Memory in GiB of the preparation pod."""
    backoff_limit: int = Field(1, ge=0)
    """Pod retries of the Job before the preparation counts as failed."""
    active_deadline_seconds: int = Field(86400, ge=60)
    """Wall-clock limit of the preparation Job (tokenizing 20B tokens takes hours)."""


GPUType = Literal["H100", "H200", "A100", "B200"]
ClusterNetwork = Literal["tcp", "infiniband", "efa"]
SubmissionMode = Literal["K8sJobMode", "HTTPMode"]


class KubernetesSpec(SpecModel):
    """How the stage's Ray cluster is laid out on Kubernetes (the rendered KubeRay RayJob).

    Scheduling only: no field here changes what is computed, so none of them changes a stage's
    id (see prolong.stage.identity.SCHEDULING_ONLY). Defaults fit an 8 x H100 node (a3-highgpu-8g,
    p5.48xlarge: 192-208 vCPUs, 1.8-2 TiB memory) with room left for system daemons.
    """

    cpus_per_worker: float | None = Field(None, gt=0)
    """CPU cores requested (and limited) per training worker; a worker pod asks for this x
    workersPerNode. Default: 22 with device gpu (176 cores for 8 GPUs), 2 with device cpu."""
    memory_per_worker_gi: int | None = Field(None, ge=1)
    """Memory in GiB requested (and limited) per training worker; a worker pod asks for this x
    workersPerNode. Default: 200 with device gpu (1600Gi for 8 GPUs), 4 with device cpu."""
    shm_fraction: float = Field(0.25, gt=0, le=0.5)
    """Size of the memory-backed /dev/shm (NCCL, data-loader workers) as a fraction of the pod's
    memory; it counts against the pod's memory limit."""
    head_cpus: int = Field(8, ge=1)
    """CPU cores of the Ray head pod (no GPU; it runs the driver and the dashboard only)."""
    head_memory_gi: int = Field(32, ge=1)
    """Memory in GiB of the Ray head pod."""
    network: ClusterNetwork = "tcp"
    """Inter-node fabric. tcp: the pod network. infiniband: RDMA devices from the NVIDIA network
    operator (default resource rdma/rdma_shared_device_a: 1, NCCL_IB_DISABLE=0). efa: AWS EFA
    (default resource vpc.amazonaws.com/efa: 32 as on p5.48xlarge, FI_PROVIDER=efa,
    FI_EFA_USE_DEVICE_RDMA=1). RDMA fabrics also get the IPC_LOCK capability."""
    network_resources: dict[str, int] | None = None
    """Extended resources per worker pod for the fabric, replacing the network's default, e.g.
    {rdma/ib: 8} or {vpc.amazonaws.com/efa: 16}."""
    nccl_env: dict[str, str] = Field(default_factory=dict)
    """Extra environment for every Ray container (NCCL_*, FI_*, ...); wins over the network's
    defaults."""
    queue: str | None = Field(None, pattern=DNS_LABEL)
    """Kueue LocalQueue: sets the kueue.x-k8s.io/queue-name label, so Kueue admits the RayJob.
    A queued stage is released with shutdownAfterJobFinishes and ttlSecondsAfterFinished =
    deleteClusterAfterSeconds (Kueue refuses a managed RayJob that keeps its cluster, and
    KubeRay refuses deletionRules beside shutdownAfterJobFinishes), so deletionRules and
    releaseWorkersAfterSeconds do not apply. In a namespace with Kueue's ``default``
    LocalQueue, or under manageJobsWithoutQueueName, Kueue manages every RayJob: set a queue
    there (``prolongctl submit`` refuses an unqueued stage where it finds a default LocalQueue)."""
    priority_class: str | None = Field(None, pattern=_DNS_SUBDOMAIN, max_length=253)
    """Kueue WorkloadPriorityClass of a queued stage (the kueue.x-k8s.io/priority-class label);
    needs queue."""
    submission_mode: SubmissionMode = "HTTPMode"
    """How KubeRay submits the entrypoint. HTTPMode (default): the KubeRay operator submits
    through the dashboard's job API and follows the Ray job itself, so no submitter can fail a
    healthy multi-day run (``prolongctl logs`` reads the driver's log through the dashboard).
    K8sJobMode: a Kubernetes Job runs ``ray job submit``; KubeRay fails the RayJob when that Job
    runs out of retries (an eviction, a drain, a dropped log stream), though the Ray job runs."""
    deletion_rules: bool = True
    """Release the Ray cluster with KubeRay's deletionStrategy.deletionRules (KubeRay 1.6+, where
    the RayJobDeletionPolicy feature gate is on by default): the worker pods when the job ends,
    the head after deleteClusterAfterSeconds. false, and always for a queued stage:
    shutdownAfterJobFinishes with ttlSecondsAfterFinished = deleteClusterAfterSeconds (workers and
    head go together)."""
    release_workers_after_seconds: int = Field(0, ge=0)
    """Seconds after the Ray job ends (succeeded or failed) before KubeRay deletes the worker
    pods and so releases their GPUs (deletionRules only)."""
    delete_cluster_after_seconds: int = Field(300, ge=0)
    """Seconds after the Ray job ends before KubeRay deletes the whole Ray cluster; until then
    the head pod keeps the dashboard and the driver's logs. At least
    releaseWorkersAfterSeconds."""
    pre_running_deadline_seconds: int = Field(1800, ge=1)
    """Seconds the RayJob may take to reach Running (pods scheduled, image pulled, job
    submitted); past that KubeRay fails it with its reason instead of waiting forever."""
    active_deadline_seconds: int | None = Field(None, ge=0)
    """Wall-clock limit of the whole RayJob in seconds; the job fails when it is exceeded.
    Default: the plan's estimate (prolongctl plan) x activeDeadlineMargin + 1 h for start-up;
    no limit when there is no estimate (device cpu, unknown model size). 0: no limit."""
    active_deadline_margin: float = Field(2.0, ge=1.0)
    """Multiplier on the plan's wall-clock estimate for the default activeDeadlineSeconds
    (the estimate assumes the plan's MFU)."""
    backoff_limit: int = Field(0, ge=0)
    """Times KubeRay re-creates the Ray cluster and resubmits after a failed Ray job. 0: Ray
    Train's maxFailures handles worker failures and the pipeline's maxStageRetries the rest."""
    submitter_backoff_limit: int = Field(2, ge=0)
    """Retries of KubeRay's submitter Job (K8sJobMode: submitterConfig.backoffLimit) when
    ``ray job submit`` itself fails, e.g. while the dashboard is still starting."""
    ray_auth: Literal["token", "disabled"] = "token"
    """Ray token authentication on the stage's cluster (authOptions.mode). token: every Ray API
    (dashboard, job submission, client) needs the token from the cluster's Secret; KubeRay
    injects it into the Ray pods and its submitter. disabled: anyone who reaches the pods' ports
    can run code on them."""
    ray_auth_secret: str | None = Field(None, pattern=DNS_LABEL)
    """Secret (key auth_token) holding the Ray token, for one token shared by several stages.
    Default: KubeRay generates one Secret per Ray cluster, named like the cluster."""
    ray_version: str = Field("2.60.0", pattern=r"^[0-9]+\.[0-9]+\.[0-9]+$")
    """Ray version of the image (rayClusterSpec.rayVersion); KubeRay needs 2.52.0 or later for
    token authentication."""

    @model_validator(mode="after")
    def _deletion_order(self) -> KubernetesSpec:
        # KubeRay refuses rules whose workers outlive their cluster (validateTTLConsistency).
        if self.release_workers_after_seconds > self.delete_cluster_after_seconds:
            raise ValueError("releaseWorkersAfterSeconds must not exceed "
                             "deleteClusterAfterSeconds")
        if self.priority_class and not self.queue:
            raise ValueError("priorityClass needs queue (Kueue reads it on queued RayJobs only)")
        major, minor, _ = (int(x) for x in self.ray_version.split("."))
        if self.ray_auth == "token" and (major, minor) < (2, 52):
            raise ValueError("rayAuth token needs rayVersion 2.52.0 or later (KubeRay refuses "
                             "it on older Ray)")
        return self
    object_store_secret: str | None = Field(None, pattern=DNS_LABEL)
    """Secret whose keys become environment variables of every Ray container (e.g.
    AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) when storage.root is s3:// or
    gs://."""
    service_account: str | None = Field(None, pattern=DNS_LABEL)
    """ServiceAccount of the Ray pods (e.g. one bound to a cloud role for object-store access)."""
    volumes: list[VolumeSpec] = Field(default_factory=list)
    """More PersistentVolumeClaims for every pod of the stage (head, workers, preparation Job),
    beside storage.volumeClaim at storage.root. Every local path the stage reads (streams,
    dataDir, nliModel, sizingTokenizer, stagedPath, ...) must lie under one of them or under
    storage.root: ``prolongctl validate`` and ``submit`` refuse a stage that reads elsewhere."""
    prepare: PrepareSpec = Field(default_factory=PrepareSpec)
    """The CPU-only Job that stages the model and prepares the data before the GPUs are asked
    for."""


class PodTemplates(SpecModel):
    """Strategic-merge patches over the pod templates prolong renders, one for the Ray head and
    one for the workers (prolong.k8s.podtemplate): labels, annotations, priorityClassName,
    imagePullSecrets, affinity, nodeSelector, tolerations, securityContext, extra containers
    and volumes. Scheduling only: no stage id changes."""

    # Left out of the dump while unset, so that job.yaml and the pipeline resource of a spec
    # without patches stay as they were.
    head: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)
    """Patch over the head pod's template ({metadata: ..., spec: ...}), e.g. a nodeSelector that
    keeps the head off the GPU nodes, or a priority class."""
    workers: dict[str, Any] | None = Field(None, exclude_if=lambda v: v is None)
    """Patch over the worker pods' template. Lists merge as kubectl patch merges them:
    containers, volumes, env and imagePullSecrets by name; tolerations are replaced whole (use
    cluster.tolerations to add to ours)."""


class ClusterSpec(SpecModel):
    """Where the stage runs: the shape of the Ray cluster."""

    device: Literal["gpu", "cpu"] = "gpu"
    """gpu: one worker per GPU; cpu: workers are CPU processes (gloo), for laptops and CI."""
    nodes: int = Field(1, ge=1)
    """Number of machines."""
    workers_per_node: int = Field(8, ge=1)
    """Training processes per machine (one per GPU)."""
    gpu_type: GPUType = "H100"
    """GPU model: used for scheduling and for the peak FLOP/s behind MFU and GPU-hour estimates."""
    image: str | None = None
    """Container image for the Ray pods (Kubernetes)."""
    node_selector: dict[str, str] = Field(default_factory=dict)
    """Kubernetes node selector for the worker pods."""
    tolerations: list[Toleration] = Field(default_factory=list)
    """Kubernetes tolerations for the worker pods."""
    max_failures: int = Field(3, ge=0)
    """Worker-group failures Ray Train recovers from (restarting from the last checkpoint)."""
    kubernetes: KubernetesSpec = Field(default_factory=KubernetesSpec)
    """Pod resources, fabric, queue and RayJob lifecycle on Kubernetes (scheduling only)."""
    pod_template: PodTemplates | None = Field(None, exclude_if=lambda v: v is None)
    """Patches over the rendered head and worker pod templates (Kubernetes strategic merge),
    checked against the core Pod schema by validate (scheduling only)."""

    @property
    def world_size(self) -> int:
        return self.nodes * self.workers_per_node


# --------------------------------------------------------------------------------------------
# Job kinds
# --------------------------------------------------------------------------------------------

class TrainSpec(SpecModel):
    """What PretrainJob and SFTJob share: one training run over a packed data mixture."""

    model: ModelSpec
    """Starting weights and model configuration."""
    data: DataSpec
    """The data mixture."""
    sequence_length: int = Field(ge=1)
    """Tokens per packed row (S). Every micro-batch is one row."""
    global_batch_tokens: int = Field(ge=1)
    """Tokens per optimizer step across all workers (ProLong: 4,194,304 at 64K, 8,388,608 at 512K)."""
    steps: int | None = Field(None, ge=1)
    """Optimizer steps. Give steps or tokens."""
    tokens: int | None = Field(None, ge=1)
    """Token budget, instead of steps: a multiple of globalBatchTokens."""
    optimizer: OptimizerSpec = Field(default_factory=OptimizerSpec)
    """AdamW settings."""
    schedule: ScheduleSpec
    """Learning-rate schedule."""
    precision: Literal["auto", "bf16", "fp32"] = "auto"
    """auto: bf16 on GPU, fp32 on CPU."""
    parallelism: ParallelismSpec = Field(default_factory=ParallelismSpec)
    """Sequence parallelism, ZeRO, activation checkpointing, micro-batch order."""
    checkpoint: CheckpointSpec = Field(default_factory=CheckpointSpec)
    """Checkpoint cadence."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Where outputs go."""
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    """Cluster shape."""
    seed: int = 0
    """Seed for initialisation and dropout-free training randomness."""
    rerun: int = Field(0, ge=0)
    """Bump to run this stage again with an identical spec (it changes the stage id)."""

    @model_validator(mode="after")
    def _steps_or_tokens(self) -> TrainSpec:
        if (self.steps is None) == (self.tokens is None):
            raise ValueError("give exactly one of steps or tokens")
        return self

    # Derived quantities, used by rules, the planner and the trainer alike.
    @property
    def parallel_dims(self) -> ParallelDims:
        """The DP x SP layout: the one decider of the parallel degrees (raises ParallelDimsError
        for degrees that do not fit; validation reports that as a spec issue)."""
        return ParallelDims.from_spec(self)

    @property
    def sp_size(self) -> int:
        return self.parallelism.sequence_parallel

    @property
    def dp_size(self) -> int:
        return self.parallel_dims.dp

    @property
    def resolved_precision(self) -> Literal["bf16", "fp32"]:
        """``precision`` with auto resolved: bf16 on GPU, fp32 on CPU."""
        if self.precision != "auto":
            return self.precision
        return "bf16" if self.cluster.device == "gpu" else "fp32"

    @property
    def overlap_comm(self) -> bool:
        """``parallelism.communication.overlapComm`` with auto resolved: on for GPU workers."""
        stated = self.parallelism.communication.overlap_comm
        return self.cluster.device == "gpu" if stated is None else stated

    @property
    def rows_per_step(self) -> int:
        return self.global_batch_tokens // self.sequence_length

    @property
    def micro_batches_per_rank(self) -> int:
        """Gradient-accumulation steps: rows each data-parallel group processes per step."""
        return self.parallel_dims.micro_batches_per_rank(self.rows_per_step)

    @property
    def total_steps(self) -> int:
        return self.steps if self.steps is not None else self.tokens // self.global_batch_tokens

    @property
    def total_tokens(self) -> int:
        return self.total_steps * self.global_batch_tokens

    @property
    def warmup_steps(self) -> int:
        return self.schedule.warmup_steps_for(self.total_steps)

    def stream_target_length(self, stream: DataStream) -> int:
        return stream.target_length or self.sequence_length

    def stream_min_length(self, stream: DataStream) -> int:
        if stream.min_length is not None:
            return stream.min_length
        return self.stream_target_length(stream) if stream.packing == "long" else 1


class PretrainSpec(TrainSpec):
    """Continued pretraining on long and short data (ProLong stages 1 and 2)."""


class SFTOptions(SpecModel):
    """How conversations become training rows."""

    chat_template: Literal["auto", "llama3", "chatml"] = "auto"
    """auto: the tokenizer's own chat template when it has one, else chatml (documented fallback)."""
    assistant_only_loss: bool = True
    """Put labels on assistant turns only (ProLong's SFT)."""


class SFTSpec(TrainSpec):
    """Supervised fine-tuning on packed conversations (ProLong: UltraChat)."""

    sft: SFTOptions = Field(default_factory=SFTOptions)
    """Chat formatting and label masking."""


class GenerationSpec(SpecModel):
    """Decoding settings for evaluation (HELMET: greedy)."""

    backend: Literal["auto", "hf", "vllm"] = "auto"
    """auto: vLLM when importable on a GPU, else transformers generate."""
    batch_size: int = Field(1, ge=1)
    """Prompts decoded together."""
    max_new_tokens: int | None = Field(None, ge=1)
    """Override every task's own output budget."""
    max_model_len: int | None = Field(None, ge=1)
    """vLLM's context limit; default: the model's own limit (max_position_embeddings), never
    more, since HELMET keeps every prompt plus its answer within the length."""


class JudgeSpec(SpecModel):
    """A model judge for LongQA and summarization (HELMET: GPT-4o), reached through any
    OpenAI-compatible chat-completions endpoint (vLLM, TGI, a hosted API)."""

    endpoint: str = Field(pattern=r"^https?://")
    """Base URL of the API, e.g. https://api.openai.com/v1 (/chat/completions is appended)."""
    model: str = Field(min_length=1)
    """Model name sent with each request (HELMET: gpt-4o-2024-05-13)."""
    helmet_dir: str = Field(min_length=1)
    """A local checkout of princeton-nlp/HELMET: the judge reads HELMET's own prompts from its
    scripts/eval_gpt4_longqa.py and eval_gpt4_summ.py (prolong does not ship HELMET's text)."""
    api_key_secret_ref: str | None = Field(None, pattern=DNS_LABEL)
    """Secret in the stage's namespace holding the API key under the key JUDGE_API_KEY; rendered
    RayJobs set it on the head and worker containers as the environment variable JUDGE_API_KEY
    (secretKeyRef), where the judge reads it. None: no Authorization header (a local vLLM
    server)."""
    concurrency: int = Field(8, ge=1)
    """Requests in flight at once."""
    retries: int = Field(3, ge=0)
    """Further attempts after a failed, timed-out or unparseable reply; then the sample is
    reported as unjudged (never scored 0)."""
    timeout_seconds: float = Field(120.0, gt=0)
    """Per-request timeout."""
    temperature: float = Field(0.1, ge=0)
    """HELMET's judge runs at 0.1."""
    max_tokens: int = Field(4096, ge=1)
    """Judge reply budget (HELMET: 4096 for summaries)."""


class EvalSpec(SpecModel):
    """HELMET evaluation of a model at several context lengths."""

    model: ModelSpec
    """The model to evaluate (normally fromStage: the SFT stage)."""
    tokenizer: TokenizerSpec = Field(default_factory=TokenizerSpec)
    """Tokenizer (default: the model's)."""
    tasks: list[str] = Field(min_length=1)
    """HELMET task names (json_kv, ruler_mk_needle, nq, msmarco, banking77, narrativeqa, ...)."""
    lengths: list[Annotated[int, Field(ge=256)]] = Field(min_length=1)
    """Context lengths in tokens (HELMET: 8192 ... 131072)."""
    samples: int = Field(100, ge=1)
    """Samples per task and length (HELMET: 100)."""
    icl_samples: int = Field(500, ge=1, alias="iclSamples")
    """Samples per ICL task and length (HELMET: 500)."""
    data_dir: str | None = None
    """Directory holding HELMET's released data files; needed by every non-synthetic task."""
    generation: GenerationSpec = Field(default_factory=GenerationSpec)
    """Decoding settings."""
    sizing: Literal["helmet", "fill"] = "helmet"
    """helmet: HELMET's fixed amounts per length (JSON KV pairs, ICL shots, RAG / re-rank
    passages, ALCE documents, long documents cut to HELMET's budgets) and its length filters, then
    truncated to fit; only at HELMET's lengths (4096 ... 131072). fill: as much as fits the length
    with the evaluated model's tokenizer, at any length -- not comparable to published HELMET
    numbers."""
    sizing_tokenizer: str | None = None
    """Tokenizer HELMET counts long documents and its length filters with (it uses
    meta-llama/Llama-2-7b-hf), as a local path or hub id. None: the evaluated model's tokenizer,
    and reports say so."""
    use_chat_template: bool = True
    """true: HELMET's default for instruct models (the chat template for LongQA, summarization and
    citation, plain prompts for the rest); false: plain prompts everywhere (base models)."""
    judge: JudgeSpec | None = None
    """Model judge for NarrativeQA and summarization; None: ROUGE-L stand-ins, named as such."""
    # Left out of the dump (and so of the stage id) while unset: an eval without it computes
    # what every eval computed before the field existed, so existing stage ids stay valid;
    # once set it changes the Cite scores, and the path enters the id.
    nli_model: str | None = Field(None, min_length=1, exclude_if=lambda v: v is None)
    """Local directory of a seq2seq NLI model for ALCE citation recall and precision (HELMET:
    google/t5_xxl_true_nli_mixture); it runs on the eval workers after generation, and ASQA
    also needs NLTK's punkt_tab data there. None: citation scores are reported as not
    computed."""
    seed: int = 42
    """Seed for synthetic generators and demo selection."""
    storage: StorageSpec = Field(default_factory=StorageSpec)
    """Where results go."""
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    """Samples are sharded over workers (one GPU each)."""
    rerun: int = Field(0, ge=0)
    """Bump to evaluate again with an identical spec."""


class Metadata(SpecModel):
    """Kubernetes-style object metadata."""

    name: str = Field(pattern=DNS_LABEL, max_length=JOB_NAME_MAX)
    """Lowercase DNS label; at most 38 characters so that <name>-<stage id> fits KubeRay's
    47-character RayJob limit."""
    labels: dict[str, str] = Field(default_factory=dict)
    """Free-form labels copied to rendered Kubernetes objects."""


class _Object(SpecModel):
    api_version: Literal["prolong.dev/v1alpha1"] = Field(alias="apiVersion")
    """Always prolong.dev/v1alpha1."""
    metadata: Metadata
    """Name and labels."""


class PretrainJob(_Object):
    """A continued-pretraining stage."""

    kind: Literal["PretrainJob"]
    spec: PretrainSpec


class SFTJob(_Object):
    """A supervised fine-tuning stage."""

    kind: Literal["SFTJob"]
    spec: SFTSpec


class EvalJob(_Object):
    """A HELMET evaluation stage."""

    kind: Literal["EvalJob"]
    spec: EvalSpec


Job = PretrainJob | SFTJob | EvalJob
TrainJobs = (PretrainJob, SFTJob)


# --------------------------------------------------------------------------------------------
# Pipeline
# --------------------------------------------------------------------------------------------

class _StageBase(SpecModel):
    name: str = Field(pattern=DNS_LABEL, max_length=STAGE_NAME_MAX)
    """Stage name, unique in the pipeline; other stages refer to it with fromStage."""


class RefStage(_StageBase):
    """A stage kept in its own file (jobs/ only; render and submit inline it)."""

    ref: str
    """Path of the job file, relative to the pipeline file."""


class PretrainStage(_StageBase):
    """An inline PretrainJob stage."""

    kind: Literal["PretrainJob"]
    spec: PretrainSpec


class SFTStage(_StageBase):
    """An inline SFTJob stage."""

    kind: Literal["SFTJob"]
    spec: SFTSpec


class EvalStage(_StageBase):
    """An inline EvalJob stage."""

    kind: Literal["EvalJob"]
    spec: EvalSpec


InlineStage = PretrainStage | SFTStage | EvalStage


def _stage_tag(value: Any) -> str:
    if isinstance(value, dict):
        return "ref" if "ref" in value else str(value.get("kind", "ref"))
    return "ref" if isinstance(value, RefStage) else getattr(value, "kind", "ref")


Stage = Annotated[
    Annotated[RefStage, Tag("ref")]
    | Annotated[PretrainStage, Tag("PretrainJob")]
    | Annotated[SFTStage, Tag("SFTJob")]
    | Annotated[EvalStage, Tag("EvalJob")],
    Discriminator(_stage_tag, custom_error_type="invalid_stage",
                  custom_error_message="a stage needs either ref: FILE or kind (PretrainJob, "
                                       "SFTJob, EvalJob) and spec"),
]
STAGE_TAGS = ("ref", *JOB_KINDS)


class PipelineSpec(SpecModel):
    """The stages of a ProLong pipeline, run in order; each may start from an earlier one."""

    stages: list[Stage] = Field(min_length=1)
    """Stages in run order (ProLong: stage1 -> stage2 -> sft -> eval)."""
    max_stage_retries: int = Field(2, ge=0)
    """Times a failed stage is resubmitted before the pipeline is marked Failed."""
    retry_backoff_seconds: int = Field(60, ge=0)
    """Wait after a stage's first failed attempt before the next one; doubled after each
    further failure (exponential backoff), up to retryBackoffMaxSeconds."""
    retry_backoff_max_seconds: int = Field(1800, ge=0)
    """Longest wait between two attempts of a stage."""
    on_spec_change: Literal["wait", "replace"] = "wait"
    """What an edit does to a stage that runs under an id the edit changed (or removed). wait: it
    runs to its end, and the stages of the new spec start after it (a GitOps sync of a typo fix
    never kills a multi-day stage). replace: its RayJob is deleted at once and the new id
    starts."""


class ProLongPipeline(_Object):
    """A pipeline of stages; in the cluster its stages are always inline."""

    kind: Literal["ProLongPipeline"]
    spec: PipelineSpec

    def stage(self, name: str) -> InlineStage | RefStage:
        return next(s for s in self.spec.stages if s.name == name)


Document = Job | ProLongPipeline
KIND_MODELS: dict[str, type[BaseModel]] = {
    "PretrainJob": PretrainJob,
    "SFTJob": SFTJob,
    "EvalJob": EvalJob,
    "ProLongPipeline": ProLongPipeline,
}



def all_field_aliases() -> set[str]:
    """Every camelCase field name any spec section accepts (for typo suggestions)."""
    names: set[str] = set()
    todo: list[type[BaseModel]] = list(KIND_MODELS.values())
    done: set[type[BaseModel]] = set()
    while todo:
        model = todo.pop()
        if model in done:
            continue
        done.add(model)
        for fname, finfo in model.model_fields.items():
            names.add(finfo.alias or fname)
            todo.extend(_models_in(finfo.annotation))
    return names


def field_aliases_at(model: type[BaseModel], loc: tuple[Any, ...]) -> set[str] | None:
    """The field names the model at ``loc`` (pydantic's error location, below ``model``)
    accepts, for a typo suggestion from the right section; None when the path leads to no model
    (then suggestions come from every section)."""
    current: Any = model
    for item in loc:
        models = _models_in(current) if not (isinstance(current, type)
                                             and issubclass(current, BaseModel)) else [current]
        if isinstance(item, int):
            args = [a for a in getattr(current, "__args__", ()) or ()]
            if not args:
                return None
            current = args[0]
            continue
        if item in STAGE_TAGS:  # the discriminated stage union's branch
            tagged = {"ref": RefStage, "PretrainJob": PretrainStage, "SFTJob": SFTStage,
                      "EvalJob": EvalStage}
            current = tagged[item]
            continue
        fields = {(f.alias or n): f for m in models for n, f in m.model_fields.items()}
        fields.update({n: f for m in models for n, f in m.model_fields.items()})
        if item not in fields:
            return None
        current = _unwrap(fields[item].annotation)
    found = [current] if isinstance(current, type) and issubclass(current, BaseModel) else \
        _models_in(current)
    if len(found) != 1:
        return None
    return {f.alias or n for n, f in found[0].model_fields.items()}


def _unwrap(annotation: Any) -> Any:
    """X from Optional[X] / Annotated[X, ...]; a list stays a list (an index follows)."""
    while True:
        origin = getattr(annotation, "__origin__", None)
        args = [a for a in getattr(annotation, "__args__", ()) or () if a is not type(None)]
        if origin is Annotated or (hasattr(annotation, "__metadata__") and args):
            annotation = args[0]
        elif origin is None and len(args) == 1 and not isinstance(annotation, type):
            annotation = args[0]  # X | None
        else:
            return annotation


def _models_in(annotation: Any) -> list[type[BaseModel]]:
    found = []
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        found.append(annotation)
    for arg in getattr(annotation, "__args__", ()) or ():
        found += _models_in(arg)
    for meta in getattr(annotation, "__metadata__", ()) or ():
        found += _models_in(meta)
    origin = getattr(annotation, "__origin__", None)
    if origin is not None and origin is not annotation:
        found += _models_in(origin) if isinstance(origin, type) else []
    return found
