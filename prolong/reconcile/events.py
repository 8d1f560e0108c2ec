"""The Kubernetes Events of a pipeline: one per stage transition (pure: two statuses in, events
out; the operator posts them on the ProLongPipeline).

Normal for progress (a stage submitted, running, succeeded, skipped; the pipeline succeeded),
Warning for trouble (an attempt failed and the stage waits to retry, a retry was submitted, a
stage cannot start because its RayJob's name is taken, a stage or the pipeline failed, the spec
is invalid). ``kubectl describe prolongpipeline`` and
``kubectl events`` show them without reading the status.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from prolong.reconcile.status import PipelineStatus, StageStatus

EVENT_MESSAGE_MAX = 1000
"""Kubernetes keeps at most 1 kB of an Event's message (events.k8s.io/v1 note)."""


@dataclass(frozen=True)
class PipelineEvent:
    type: Literal["Normal", "Warning"]
    reason: str
    message: str


_STAGE_EVENTS: dict[str, tuple[Literal["Normal", "Warning"], str]] = {
    "Pending": ("Warning", "StageBlocked"),  # only a Pending stage with a message: name taken
    "Preparing": ("Normal", "StagePreparing"),
    "Submitted": ("Normal", "StageSubmitted"),
    "Running": ("Normal", "StageRunning"),
    "Retrying": ("Warning", "StageAttemptFailed"),
    "Succeeded": ("Normal", "StageSucceeded"),
    "Skipped": ("Normal", "StageSkipped"),
    "Failed": ("Warning", "StageFailed"),
}


def transition_events(previous: PipelineStatus | None,
                      status: PipelineStatus) -> list[PipelineEvent]:
    """What changed from ``previous`` to ``status``: a stage's phase, id or RayJob, and the
    pipeline's end. A stage still Pending has nothing to report, unless it says why it cannot
    start."""
    before = {s.name: s for s in (previous.stages if previous else ())}
    events = [_stage_event(st) for st in status.stages
              if (st.phase != "Pending" or st.message) and _changed(before.get(st.name), st)]
    events += _spec_change_events(previous, status)
    was = previous.phase if previous else None
    if status.phase != was and status.phase in ("Succeeded", "Failed"):
        kind: Literal["Normal", "Warning"] = "Normal" if status.phase == "Succeeded" \
            else "Warning"
        ready = next((c for c in status.conditions if c.type == "Ready"), None)
        events.append(PipelineEvent(kind, f"Pipeline{status.phase}",
                                    _fit(ready.message if ready and ready.message
                                         else f"pipeline {status.phase.lower()}")))
    return events


def _spec_change_events(previous: PipelineStatus | None,
                        status: PipelineStatus) -> list[PipelineEvent]:
    """A spec edit that met a running stage: Normal when it waits for it (onSpecChange wait) and
    when that wait is over, Warning when it deleted it (replace)."""
    new = status.spec_change
    old = previous.spec_change if previous is not None else None
    if new is None or new == old or not new.message:
        return []
    if new.replaced:
        return [PipelineEvent("Warning", "SpecChangeReplaced", _fit(new.message))]
    if new.waiting_for:
        if old is not None and old.waiting_for == new.waiting_for:
            return []  # the same wait, seen at a later generation
        return [PipelineEvent("Normal", "SpecChangeWaiting", _fit(new.message))]
    if old is not None and old.waiting_for:
        return [PipelineEvent("Normal", "SpecChangeWaitOver", _fit(new.message))]
    return []


def invalid_spec_event(reason: str) -> PipelineEvent:
    return PipelineEvent("Warning", "InvalidSpec", _fit(reason))


def _changed(old: StageStatus | None, new: StageStatus) -> bool:
    key = (old.phase, old.id, old.ray_job) if old is not None else None
    blocked = new.phase == "Pending" and (old is None or old.message != new.message)
    return blocked or key != (new.phase, new.id, new.ray_job)


def _stage_event(st: StageStatus) -> PipelineEvent:
    kind, reason = _STAGE_EVENTS[st.phase]
    if st.phase == "Submitted" and st.attempts > 1:
        kind, reason = "Warning", "StageRetried"
    where = f"stage {st.name} ({st.id})" + (f" RayJob {st.ray_job}" if st.ray_job else "")
    text = f"{where}: {st.phase.lower()}" + (f": {st.message}" if st.message else "")
    return PipelineEvent(kind, reason, _fit(text))


def _fit(text: str) -> str:
    return text if len(text) <= EVENT_MESSAGE_MAX else text[:EVENT_MESSAGE_MAX - 3] + "..."
