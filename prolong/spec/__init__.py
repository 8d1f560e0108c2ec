"""Job specs: the single source of truth for what a ProLong stage is.

Every spec file is a Kubernetes-style object (``apiVersion: prolong.dev/v1alpha1``, ``kind``,
``metadata.name``, ``spec``). Validation happens in two passes:

1. **Structure** (pydantic): types, ranges, enums, unknown fields (``extra="forbid"``: a typo must
   never be silently ignored).
2. **Recipe rules** (:func:`check_job`, :func:`check_pipeline`): cross-field rules such as
   "proportions sum to 1" or "sequence length divisible by SP x 256". They live in plain functions
   that return :class:`SpecIssue` objects with an exact field path, because a pydantic model
   validator can only point at the whole model, and a user needs to know *which* field to fix.

YAML uses camelCase (Kubernetes convention); Python attributes are snake_case. Attribute
docstrings become field descriptions (``use_attribute_docstrings``), which the CRD generator reuses.
Loading files, resolving pipeline references and turning errors into one-line messages live in
:mod:`prolong.specfile`.

The package is split by concern, along the two passes:

- :mod:`.issues` -- :class:`SpecIssue`, :class:`SpecError` and :func:`did_you_mean`: what either
  pass reports (no pydantic models);
- :mod:`.models` -- the pydantic models (pass 1) and the constants they use; the CRD schema and
  the stage ids are generated from them;
- :mod:`.rules` -- the recipe rules (pass 2) and :func:`resolved_architecture`;
- :mod:`.helmet` -- the HELMET task names specs accept, as plain data, so that the spec does not
  import :mod:`prolong.eval`.

Every public name is re-exported here: import from ``prolong.spec``, not from the modules.
Imports from prolong: :mod:`prolong.stage.names` and :mod:`prolong.parallel.dims`, and (inside
the rule that checks ``cluster.podTemplate``) :mod:`prolong.k8s.podtemplate`, which imports
nothing from prolong.
"""

from __future__ import annotations

from prolong.spec.helmet import HELMET_SIZING_LENGTHS, HELMET_TABLED_TASKS, HELMET_TASK_SYNTHETIC
from prolong.spec.issues import (
    SpecError,
    SpecIssue,
    did_you_mean,
)
from prolong.spec.models import (
    API_VERSION,
    ARCHITECTURE_PRESETS,
    DNS_LABEL,
    DOMAIN_NAME,
    EMBEDDED_CORPORA,
    JOB_KINDS,
    KIND_MODELS,
    KINDS,
    SEQ_ALIGN,
    STAGE_TAGS,
    ArchitecturePreset,
    ArchitectureSpec,
    AttentionBackend,
    CheckpointSpec,
    ClusterNetwork,
    ClusterSpec,
    CommunicationSpec,
    DataSpec,
    DataStream,
    Document,
    EvalJob,
    EvalSpec,
    EvalStage,
    GenerationSpec,
    GPUType,
    InlineStage,
    Job,
    JudgeSpec,
    KubernetesSpec,
    MemorySpec,
    Metadata,
    ModelSpec,
    OptimizerSpec,
    Packing,
    ParallelismSpec,
    PipelineSpec,
    PodTemplates,
    PrepareSpec,
    PretrainJob,
    PretrainSpec,
    PretrainStage,
    ProLongPipeline,
    RefStage,
    ScheduleSpec,
    SFTJob,
    SFTOptions,
    SFTSpec,
    SFTStage,
    SourceFormat,
    SpecModel,
    Stage,
    StorageSpec,
    SubmissionMode,
    TokenizerSpec,
    Toleration,
    TrainJobs,
    TrainSpec,
    VolumeSpec,
    all_field_aliases,
    field_aliases_at,
)
from prolong.spec.rules import (
    PROPORTION_TOLERANCE,
    check_job,
    check_pipeline,
    resolved_architecture,
)

__all__ = [
    "API_VERSION",
    "ARCHITECTURE_PRESETS",
    "DNS_LABEL",
    "DOMAIN_NAME",
    "EMBEDDED_CORPORA",
    "HELMET_SIZING_LENGTHS",
    "HELMET_TABLED_TASKS",
    "HELMET_TASK_SYNTHETIC",
    "JOB_KINDS",
    "KINDS",
    "KIND_MODELS",
    "PROPORTION_TOLERANCE",
    "SEQ_ALIGN",
    "STAGE_TAGS",
    "ArchitecturePreset",
    "ArchitectureSpec",
    "AttentionBackend",
    "CheckpointSpec",
    "ClusterNetwork",
    "ClusterSpec",
    "CommunicationSpec",
    "DataSpec",
    "DataStream",
    "Document",
    "EvalJob",
    "EvalSpec",
    "EvalStage",
    "GPUType",
    "GenerationSpec",
    "InlineStage",
    "Job",
    "JudgeSpec",
    "KubernetesSpec",
    "MemorySpec",
    "Metadata",
    "ModelSpec",
    "OptimizerSpec",
    "Packing",
    "ParallelismSpec",
    "PipelineSpec",
    "PodTemplates",
    "PrepareSpec",
    "PretrainJob",
    "PretrainSpec",
    "PretrainStage",
    "ProLongPipeline",
    "RefStage",
    "SFTJob",
    "SFTOptions",
    "SFTSpec",
    "SFTStage",
    "ScheduleSpec",
    "SourceFormat",
    "SpecError",
    "SpecIssue",
    "SpecModel",
    "Stage",
    "StorageSpec",
    "SubmissionMode",
    "TokenizerSpec",
    "Toleration",
    "TrainJobs",
    "TrainSpec",
    "VolumeSpec",
    "all_field_aliases",
    "check_job",
    "check_pipeline",
    "did_you_mean",
    "field_aliases_at",
    "resolved_architecture",
]
