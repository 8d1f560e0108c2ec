"""The ProLongPipeline's ``status``: what the operator reports, as pydantic models.

The CRD's status schema is generated from these models (:mod:`prolong.k8s.crd`), and the operator
builds its status patches with them, so the two cannot drift.
"""

from __future__ import annotations

from datetime import datetime
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

PipelinePhase = Literal["Pending", "Running", "Succeeded", "Failed"]
StagePhase = Literal["Pending", "Preparing", "Submitted", "Running", "Retrying", "Succeeded",
                     "Failed", "Skipped"]


class _Status(BaseModel):
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True,
                              use_attribute_docstrings=True)


class Condition(_Status):
    """A standard Kubernetes condition (metav1.Condition)."""

    type: str
    """Condition type, e.g. Ready, Reconciling, Stalled, SpecValid, StageFailed."""
    status: Literal["True", "False", "Unknown"]
    """Whether the condition holds."""
    reason: str | None = None
    """CamelCase reason for the last transition."""
    message: str | None = None
    """Human-readable details."""
    last_transition_time: datetime | None = None
    """When status last changed."""
    observed_generation: int | None = None
    """metadata.generation the condition was computed from."""


class StageStatus(_Status):
    """One stage of the pipeline as last observed."""

    name: str
    """Stage name (spec.stages[].name)."""
    phase: StagePhase = "Pending"
    """Pending, Preparing (its CPU-only preparation Job stages the model and prepares the data;
    no RayJob yet), Submitted (RayJob created), Running, Retrying (an attempt failed; the next one
    waits out its backoff), Succeeded, Failed, or Skipped (its output directory already holds a
    COMPLETE marker for the same stage id)."""
    id: str | None = None
    """Stage id: a hash of the stage's spec, upstream ids and rerun counter."""
    ray_job: str | None = None
    """Name of the RayJob running (or that ran) this stage."""
    dashboard_url: str | None = Field(None, alias="dashboardURL")
    """Ray dashboard of the stage's cluster while it runs."""
    output_uri: str | None = Field(None, alias="outputURI")
    """The stage directory: <storageRoot>/<pipeline>/<stage>-<id>."""
    start_time: datetime | None = None
    """When the current attempt's RayJob was created."""
    completion_time: datetime | None = None
    """When the stage reached Succeeded or Failed."""
    attempts: int = Field(0, ge=0)
    """RayJobs submitted for this stage id (1 + retries)."""
    message: str | None = None
    """Human-readable reason for the phase (e.g. the Ray job's failure message)."""
    next_attempt_time: datetime | None = None
    """Retrying: when the next attempt is created (exponential backoff)."""
    deployment_status: str | None = None
    """KubeRay's status.jobDeploymentStatus of the stage's RayJob (Initializing, Running,
    Complete, Failed, Retrying, ...)."""
    job_status: str | None = None
    """KubeRay's status.jobStatus: the Ray job's own status (PENDING, RUNNING, SUCCEEDED, ...)."""
    reason: str | None = None
    """KubeRay's status.reason (e.g. DeadlineExceeded, SubmissionFailed)."""
    cluster_state: str | None = None
    """status.rayClusterStatus.state of the RayJob's Ray cluster (ready, suspended, ...)."""
    cluster_conditions: list[Condition] = Field(default_factory=list)
    """status.rayClusterStatus.conditions (HeadPodReady, RayClusterProvisioned, ...): why a
    stage stuck before Running is stuck."""


class SpecChangeStatus(_Status):
    """What the operator did about RayJobs still running under stage ids that a spec edit
    changed or removed (spec.onSpecChange)."""

    policy: Literal["wait", "replace"]
    """spec.onSpecChange when they were found."""
    observed_generation: int | None = None
    """metadata.generation of the spec that superseded them."""
    waiting_for: list[str] = Field(default_factory=list)
    """wait: superseded RayJobs still running; the new spec's stages start once they end."""
    replaced: list[str] = Field(default_factory=list)
    """replace: superseded RayJobs deleted while they ran."""
    message: str | None = None
    """What was applied, in words."""


class PipelineStatus(_Status):
    """Progress of a ProLongPipeline, written by the operator."""

    phase: PipelinePhase = "Pending"
    """Pending, Running, Succeeded or Failed."""
    current_stage: str | None = None
    """Name of the stage running now (or the last one that ran)."""
    observed_generation: int | None = None
    """metadata.generation this status describes."""
    stages: list[StageStatus] = Field(default_factory=list)
    """Per-stage status, in run order."""
    conditions: list[Condition] = Field(default_factory=list)
    """Standard conditions."""
    spec_change: SpecChangeStatus | None = None
    """The last spec edit that met a running stage: waited for, or replaced."""
