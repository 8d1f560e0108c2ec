"""A RayJob as the planner sees it: its stage, attempt and KubeRay's two statuses.

:func:`observe_rayjob` is the one reading of a RayJob object (the operator and ``prolongctl
status/submit --wait`` both use it); :func:`rayjob_outcome` decides success: ``jobDeploymentStatus:
Complete`` AND ``jobStatus: SUCCEEDED`` (KubeRay also sets Complete when the Ray job failed).
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass
from typing import Any, Literal

from prolong.stage.names import ATTEMPT_LABEL, STAGE_ID_LABEL, STAGE_LABEL

RayJobOutcome = Literal["submitted", "running", "succeeded", "failed"]

_FAILED_JOB_STATUSES = ("FAILED", "STOPPED")
_FAILED_DEPLOYMENT_STATUSES = ("Failed", "ValidationFailed")


@dataclass(frozen=True)
class ClusterCondition:
    """One condition of the RayJob's Ray cluster, as KubeRay reports it."""

    type: str
    status: str
    reason: str | None = None
    message: str | None = None


@dataclass(frozen=True)
class ObservedRayJob:
    """One RayJob owned by the pipeline, as read from the cluster."""

    name: str
    stage: str
    """Label prolong.dev/stage."""
    stage_id: str
    """Label prolong.dev/stage-id."""
    attempt: int = 1
    """Label prolong.dev/attempt (1 when absent)."""
    deployment_status: str | None = None
    """status.jobDeploymentStatus (KubeRay's view of the RayJob)."""
    job_status: str | None = None
    """status.jobStatus (the Ray job's own status)."""
    message: str | None = None
    reason: str | None = None
    """status.reason: KubeRay's cause of the current state (e.g. DeadlineExceeded)."""
    cluster_state: str | None = None
    """status.rayClusterStatus.state."""
    cluster_conditions: tuple[ClusterCondition, ...] = ()
    """status.rayClusterStatus.conditions."""
    dashboard_url: str | None = None
    start_time: datetime.datetime | None = None
    end_time: datetime.datetime | None = None
    failure: str | None = None
    """Annotation prolong.dev/attempt-failed: the operator failed this attempt itself (a pod of
    its cluster cannot start: :func:`pod_failure`), whatever KubeRay says yet."""

    @property
    def outcome(self) -> RayJobOutcome:
        if self.failure:
            return "failed"
        return rayjob_outcome(self.deployment_status, self.job_status)

    @property
    def active(self) -> bool:
        return self.outcome in ("submitted", "running")


def rayjob_outcome(deployment_status: str | None, job_status: str | None) -> RayJobOutcome:
    """Classify a RayJob's status. Success needs both Complete and SUCCEEDED; a RayJob that
    KubeRay is retrying itself (backoffLimit > 0) is still running."""
    if deployment_status == "Complete" and job_status == "SUCCEEDED":
        return "succeeded"
    if deployment_status in _FAILED_DEPLOYMENT_STATUSES or deployment_status == "Complete":
        return "failed"  # Complete without SUCCEEDED: the Ray job failed or was stopped
    if job_status in _FAILED_JOB_STATUSES and deployment_status != "Retrying":
        return "failed"
    if deployment_status == "Running" or job_status == "RUNNING":
        return "running"
    return "submitted"


def observe_rayjob(obj: dict[str, Any]) -> ObservedRayJob:
    """A RayJob read back from the cluster, as the pipeline planner sees it."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    status = obj.get("status") or {}
    cluster = status.get("rayClusterStatus") or {}
    try:
        attempt = max(1, int(labels.get(ATTEMPT_LABEL, "1")))
    except ValueError:
        attempt = 1
    return ObservedRayJob(
        name=meta.get("name", ""), stage=labels.get(STAGE_LABEL, ""),
        stage_id=labels.get(STAGE_ID_LABEL, ""), attempt=attempt,
        deployment_status=status.get("jobDeploymentStatus") or None,
        job_status=status.get("jobStatus") or None,
        message=status.get("message") or status.get("reason") or None,
        reason=status.get("reason") or None,
        cluster_state=cluster.get("state") or None,
        cluster_conditions=tuple(
            ClusterCondition(str(c.get("type")), str(c.get("status")), c.get("reason") or None,
                             c.get("message") or None)
            for c in cluster.get("conditions") or () if isinstance(c, dict) and c.get("type")),
        dashboard_url=status.get("dashboardURL") or None,
        start_time=_k8s_time(status.get("startTime") or meta.get("creationTimestamp")),
        end_time=_k8s_time(status.get("endTime")),
        failure=(meta.get("annotations") or {}).get(FAILURE_ANNOTATION) or None)


FAILURE_ANNOTATION = "prolong.dev/attempt-failed"
"""Set by the operator on a RayJob whose attempt it failed (the reason, one line)."""
POD_FAILURES = ("ErrImagePull", "ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull",
                "CreateContainerConfigError", "CreateContainerError")
"""Waiting reasons of a container that waiting does not cure: the image cannot be pulled (a
wrong name or tag, no pull secret), or the container cannot be made (a missing Secret or
ConfigMap key, a bad mount). Until the pre-running deadline KubeRay would hold every other pod,
and their GPUs, for nothing."""


def pod_failure(pods: list[dict[str, Any]]) -> str | None:
    """The first container of these pods (API dicts) that waits for a reason in
    :data:`POD_FAILURES`, as ``pod P container C: Reason: message``; None when none does."""
    for pod in pods:
        status = pod.get("status") or {}
        for cs in [*(status.get("initContainerStatuses") or []),
                   *(status.get("containerStatuses") or [])]:
            waiting = ((cs.get("state") or {}).get("waiting")) or {}
            if waiting.get("reason") in POD_FAILURES:
                text = f"pod {(pod.get('metadata') or {}).get('name')} container " \
                       f"{cs.get('name')}: {waiting['reason']}"
                if waiting.get("message"):
                    text += f": {waiting['message']}"
                return text[:500]
    return None


def _k8s_time(value: str | None) -> datetime.datetime | None:
    if not value:
        return None
    try:  # Python 3.10's fromisoformat does not read the "Z" Kubernetes writes
        return datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
