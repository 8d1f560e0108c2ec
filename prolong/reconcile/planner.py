"""The pipeline planner: what the operator does next. Observed state in, a plan out (no I/O).

Policy, in one place:

* Run order is the order of spec.stages: a stage starts when every earlier stage is Succeeded
  (or Skipped); ``fromStage`` feeds the ids, not the order. One stage runs at a time.
* A stage is Succeeded when a RayJob of its *current* id reached ``jobDeploymentStatus:
  Complete`` AND ``jobStatus: SUCCEEDED`` (KubeRay also sets Complete when the Ray job failed),
  when the previous status already said so for the same id, or (Skipped) when its directory
  holds the COMPLETE marker.
* A RayJob is run-once, so a retry is a new RayJob: attempt 1 is named like ``render_stage``
  names it, attempt n > 1 gets ``-r<n>`` (see :func:`attempt_rayjob_name`). A stage gets
  1 + maxStageRetries attempts; after the last one fails the pipeline is Failed. Attempts are
  counted from the RayJobs themselves (label prolong.dev/attempt), never from the status, so a
  restarted operator neither forgets nor repeats one.
* Between attempts the stage is Retrying for an exponential backoff
  (:func:`retry_backoff`: retryBackoffSeconds x 2^(n-1) after the n-th failure, at most
  retryBackoffMaxSeconds), counted from the failed RayJob's endTime (else from when the
  operator first saw it fail), so a fault that needs time to clear (a node draining, a quota)
  is not hit again at once with a full cluster's worth of GPUs.
* The COMPLETE marker is the truth about a stage's output: it is written last, after final/ and
  the manifest, by the run itself. A stage whose directory holds it counts as Succeeded (Skipped
  when no RayJob of its id exists) whatever its RayJob says: still RUNNING (the driver is
  winding down after writing it) or FAILED (it failed after the output was complete, e.g. in
  teardown). Its RayJob is then not retried, and the next stage may start while that RayJob
  finishes on its own (KubeRay's deletion rules release its cluster).
* A spec change (new generation) only changes ids: stages whose id is unchanged keep their
  result, stages with a new id (the edited one and the ones starting from it) run again from
  attempt 1. A RayJob still running under an id that is no longer current (superseded) is
  handled by ``spec.onSpecChange``: ``wait`` (the default) lets it run to its end and starts
  nothing of the new spec before it has (a GitOps sync of a typo fix never kills a multi-day
  stage); ``replace`` deletes it at once (it would burn GPU hours for a result nobody reads).
  ``status.specChange`` and an Event say which was applied. Finished RayJobs are left as
  history (logs, their ConfigMap) and go with the pipeline through their ownerReferences. A
  spec edited back to an earlier id finds its finished RayJob (or its running one) again.
* A stage with something to prepare (a model to stage, token shards to build: the operator
  says which, in ``preparations``) gets its preparation Job first, and its RayJob only once
  that Job completed: the stage is Preparing meanwhile, so no GPU waits on a tokenizer. A
  failed preparation fails the stage (and the pipeline) without any RayJob: its input is
  wrong, and an attempt on 64 GPUs would fail the same way. Deleting the failed Job lets the
  operator prepare again.
* A name the plan would create that exists but is not the pipeline's (``taken``, judged by
  :func:`prolong.reconcile.claim.claim`) is not created under another name: the stage stays
  Pending with the reason and the pipeline is Stalled (reason NameTaken) until the name is free.
  A create the API server refused for good (``refused``: a 4xx, or a KubeRay too old for the
  render) is the same, with reason CreateRefused and the server's message.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime, timedelta

from prolong.reconcile.observe import ObservedRayJob
from prolong.reconcile.status import Condition, PipelineStatus, SpecChangeStatus, StageStatus
from prolong.spec import Job, PipelineSpec, ProLongPipeline
from prolong.stage.identity import StageRef, pipeline_stages
from prolong.stage.names import attempt_rayjob_name, rayjob_name

_DONE_PHASES = ("Succeeded", "Skipped")


@dataclass(frozen=True)
class PlannedRayJob:
    """A RayJob to create: the ``attempt``-th run of stage ``stage`` with id ``stage_id``."""

    stage: str
    stage_id: str
    name: str
    attempt: int


@dataclass(frozen=True)
class Preparation:
    """A stage's preparation Job as observed: ``outcome`` absent, running, succeeded or failed
    (prolong.k8s.preparation.job_outcome), with the Job controller's reason when failed."""

    name: str
    outcome: str
    reason: str | None = None


@dataclass(frozen=True)
class Plan:
    """What to do now: create these preparation Jobs and RayJobs, delete those, write this
    status."""

    creates: tuple[PlannedRayJob, ...]
    deletes: tuple[str, ...]
    """Names of RayJobs to delete (active runs of superseded stage ids)."""
    status: PipelineStatus
    retry_at: datetime | None = None
    """When a Retrying stage's next attempt is due (reconcile again then)."""
    prepares: tuple[str, ...] = ()
    """Stages whose preparation Job to create (before any RayJob of theirs)."""


def retry_backoff(spec: PipelineSpec, failed_attempts: int) -> timedelta:
    """The wait after a stage's ``failed_attempts``-th failed attempt before the next one."""
    seconds = spec.retry_backoff_seconds * 2 ** max(0, failed_attempts - 1)
    return timedelta(seconds=min(seconds, spec.retry_backoff_max_seconds))


def plan_pipeline(pipeline: ProLongPipeline, jobs: dict[str, Job],
                  rayjobs: Iterable[ObservedRayJob], *, now: datetime,
                  complete: Collection[str] = (), previous: PipelineStatus | None = None,
                  generation: int | None = None, taken: Mapping[str, str] | None = None,
                  refused: Mapping[str, str] | None = None,
                  preparations: Mapping[str, Preparation] | None = None) -> Plan:
    """Decide the next step of a validated pipeline.

    ``rayjobs``: every RayJob the pipeline owns. ``complete``: stage directories
    (:attr:`StageRef.directory`) that hold the COMPLETE marker. ``previous``: the status last
    written (None for a new pipeline). ``generation``: metadata.generation of the spec.
    ``taken``: RayJob names that exist but are not the pipeline's, with the reason.
    ``refused``: RayJob names whose create the API server refused (a 4xx: an admission webhook,
    a quota, Pod Security, a schema) or that this cluster's KubeRay cannot run, with the
    server's message; not created now (the caller bounds the retries). Both leave the stage
    Pending with the reason and the pipeline Stalled.
    ``preparations``: stage name -> its preparation Job, for the stages (of their current id)
    that have something to prepare; a stage left out has nothing to prepare.
    """
    refs = pipeline_stages(pipeline, jobs)
    max_attempts = 1 + pipeline.spec.max_stage_retries
    current = {(r.stage, r.id) for r in refs}
    runs: dict[tuple[str, str], list[ObservedRayJob]] = {}
    for rj in sorted(rayjobs, key=lambda r: (r.attempt, r.name)):
        runs.setdefault((rj.stage, rj.stage_id), []).append(rj)
    superseded = sorted((rj for key, group in runs.items() if key not in current
                         for rj in group if rj.active), key=lambda r: r.name)
    policy = pipeline.spec.on_spec_change
    deletes = tuple(rj.name for rj in superseded) if policy == "replace" else ()
    held = policy == "wait" and bool(superseded)  # nothing new starts while they run
    spec_change = _spec_change(policy, superseded, previous, generation)
    before = {s.name: s for s in (previous.stages if previous else ())}

    creates: list[PlannedRayJob] = []
    prepares: list[str] = []
    stages: list[StageStatus] = []
    waiting = False  # an earlier stage is not done yet
    failure: str | None = None
    blocked: str | None = None  # the stage whose RayJob name is taken or create refused
    blocked_by = "NameTaken"
    retry_at: datetime | None = None
    for ref in refs:
        mine = runs.get((ref.stage, ref.id), [])
        prev = before.get(ref.stage)
        prev = prev if prev is not None and prev.id == ref.id else None
        first = rayjob_name(jobs[ref.stage].metadata.name, ref.id)
        st = _stage_status(ref, mine, prev, complete, now)
        if st is None and not waiting and not held:
            latest = mine[-1] if mine else None
            retry = latest is not None and latest.outcome == "failed" and \
                latest.attempt < max_attempts
            if retry:
                st = _run_status(ref, latest, prev, now, phase="Retrying", message=None)
                due = st.completion_time + retry_backoff(pipeline.spec, latest.attempt)
                if now < due:
                    st.next_attempt_time = due
                    st.message = (f"attempt {latest.attempt} failed: {_reason(latest)}; attempt "
                                  f"{latest.attempt + 1} of {max_attempts} at "
                                  f"{due.isoformat(timespec='seconds')}")
                    retry_at = due if retry_at is None else min(retry_at, due)
                else:
                    st = None
            prep = (preparations or {}).get(ref.stage)
            next_name = attempt_rayjob_name(first, latest.attempt + 1 if latest else 1)
            if st is None and (latest is None or retry) and prep is not None and \
                    prep.outcome != "succeeded" and \
                    not ((taken or {}).get(next_name) or (refused or {}).get(next_name)):
                if prep.outcome == "failed":
                    failure = (f"stage {ref.stage} preparation Job {prep.name} failed: "
                               f"{prep.reason}; no RayJob created (fix the input, then delete "
                               "the Job to prepare again)")
                    st = StageStatus(name=ref.stage, id=ref.id, phase="Failed",
                                     output_uri=ref.directory,
                                     attempts=latest.attempt if latest else 0, message=failure)
                else:
                    if prep.outcome == "absent":
                        prepares.append(ref.stage)
                    st = StageStatus(name=ref.stage, id=ref.id, phase="Preparing",
                                     output_uri=ref.directory,
                                     attempts=latest.attempt if latest else 0,
                                     message=f"preparation Job {prep.name} (CPU only): staging "
                                             "the model and preparing the data; the RayJob "
                                             "follows")
            if st is None and (latest is None or retry):
                attempt = latest.attempt + 1 if latest else 1
                run = PlannedRayJob(ref.stage, ref.id, attempt_rayjob_name(first, attempt), attempt)
                why = (taken or {}).get(run.name) or (refused or {}).get(run.name)
                if why is not None:
                    blocked = ref.stage
                    blocked_by = "NameTaken" if run.name in (taken or {}) else "CreateRefused"
                    st = StageStatus(name=ref.stage, id=ref.id, phase="Pending",
                                     output_uri=ref.directory,
                                     attempts=latest.attempt if latest else 0, message=why)
                else:
                    creates.append(run)
                    message = None if latest is None else (
                        f"attempt {latest.attempt} failed: {_reason(latest)}; "
                        f"retrying (attempt {attempt} of {max_attempts})")
                    st = StageStatus(name=ref.stage, id=ref.id, phase="Submitted",
                                     ray_job=run.name, output_uri=ref.directory, start_time=now,
                                     attempts=attempt, message=message)
            elif st is None and latest.outcome == "failed":
                failure = (f"stage {ref.stage} failed after {latest.attempt} attempt"
                           f"{'s' if latest.attempt > 1 else ''}: {_reason(latest)}")
                st = _run_status(ref, latest, prev, now, phase="Failed", message=failure)
        if st is None:  # waiting behind an earlier stage, or running
            latest = mine[-1] if mine else None
            if latest is not None and latest.active:
                st = _run_status(ref, latest, prev, now,
                                 phase="Running" if latest.outcome == "running" else "Submitted",
                                 message=latest.message or _not_ready(latest))
            else:
                st = StageStatus(name=ref.stage, id=ref.id, phase="Pending",
                                 output_uri=ref.directory, attempts=len(mine) and mine[-1].attempt)
        stages.append(st)
        if st.phase not in _DONE_PHASES:
            waiting = True

    phase, current_stage = _pipeline_phase(stages, failure, blocked)
    if held and failure is None and blocked is None:  # the superseded run is what runs now
        phase, current_stage = "Running", superseded[0].stage
    status = PipelineStatus(phase=phase, current_stage=current_stage,
                            observed_generation=generation, stages=stages,
                            spec_change=spec_change)
    status.conditions = _conditions(status, previous, failure, now, generation,
                                    blocked=next((s.message for s in stages
                                                  if s.name == blocked), None),
                                    held=spec_change.message if held else None,
                                    blocked_by=blocked_by)
    return Plan(tuple(creates), deletes, status, retry_at, tuple(prepares))


def _spec_change(policy: str, superseded: list[ObservedRayJob], previous: PipelineStatus | None,
                 generation: int | None) -> SpecChangeStatus | None:
    """status.specChange: the superseded RayJobs waited for or deleted now; with none, the last
    record (its wait marked over)."""
    before = previous.spec_change if previous is not None else None
    if not superseded:
        if before is not None and before.waiting_for:
            return before.model_copy(update={
                "waiting_for": [], "message": f"onSpecChange wait: {', '.join(before.waiting_for)}"
                                              " ended; the new spec's stages run"})
        return before
    what = "; ".join(f"RayJob {rj.name} (stage {rj.stage}, id {rj.stage_id})" for rj in superseded)
    names = [rj.name for rj in superseded]
    if policy == "wait":
        return SpecChangeStatus(policy="wait", observed_generation=generation, waiting_for=names,
                                message=f"onSpecChange wait: {what} runs to its end; the new "
                                        "spec's stages start after it")
    return SpecChangeStatus(policy="replace", observed_generation=generation, replaced=names,
                            message=f"onSpecChange replace: deleted {what}")


def invalid_spec_status(previous: PipelineStatus | None, reason: str, *, now: datetime,
                        generation: int | None = None) -> PipelineStatus:
    """The status of a pipeline whose spec cannot be used: the last known stages, unchanged
    (nothing is created or deleted), with SpecValid=False and the one-line reason."""

    base = previous.model_copy(deep=True) if previous is not None else PipelineStatus()
    base.observed_generation = generation
    # kstatus: an invalid spec is Stalled (it will not progress until edited), not Reconciling.
    conds = [Condition(type="SpecValid", status="False", reason="InvalidSpec", message=reason),
             Condition(type="Ready", status="False", reason="InvalidSpec", message=reason),
             Condition(type="Reconciling", status="False", reason="InvalidSpec"),
             Condition(type="Stalled", status="True", reason="InvalidSpec", message=reason)]
    mine = {c.type for c in conds}
    keep = [c for c in base.conditions if c.type not in mine]
    base.conditions = _stamped(conds, previous, now, generation) + keep
    return base


def _stage_status(ref: StageRef, mine: list[ObservedRayJob], prev: StageStatus | None,
                  complete: Collection[str], now: datetime) -> StageStatus | None:
    """The status of a stage that is done (or None when it is not)."""

    won = next((rj for rj in mine if rj.outcome == "succeeded"), None)
    if won is not None:
        return _run_status(ref, won, prev, now, phase="Succeeded", message=None,
                           attempts=mine[-1].attempt)
    if prev is not None and prev.phase in _DONE_PHASES:
        return prev.model_copy(update={"dashboard_url": None, "output_uri": ref.directory})
    if ref.directory in complete:
        return StageStatus(name=ref.stage, id=ref.id, phase="Skipped" if not mine else "Succeeded",
                           output_uri=ref.directory, completion_time=now,
                           ray_job=mine[-1].name if mine else None,
                           attempts=mine[-1].attempt if mine else 0,
                           message="output already complete (COMPLETE marker)")
    return None


def _run_status(ref: StageRef, rj: ObservedRayJob, prev: StageStatus | None, now: datetime, *,
                phase: str, message: str | None, attempts: int | None = None) -> StageStatus:
    """A stage's status from one of its RayJobs; times observed win, else the previous status's
    for the same RayJob (so that a repeated reconcile writes the same status), else now."""

    same = prev if prev is not None and prev.ray_job == rj.name else None
    done = phase in ("Succeeded", "Failed", "Retrying")  # the RayJob has ended
    return StageStatus(
        name=ref.stage, id=ref.id, phase=phase, ray_job=rj.name,
        dashboard_url=None if done else rj.dashboard_url, output_uri=ref.directory,
        start_time=rj.start_time or (same.start_time if same else None) or now,
        completion_time=(rj.end_time or (same.completion_time if same else None) or now)
        if done else None,
        attempts=rj.attempt if attempts is None else attempts, message=message,
        deployment_status=rj.deployment_status, job_status=rj.job_status, reason=rj.reason,
        cluster_state=rj.cluster_state,
        cluster_conditions=[Condition(type=c.type, status=_condition_status(c.status),
                                      reason=c.reason, message=_short(c.message))
                            for c in rj.cluster_conditions])


def _condition_status(value: str) -> str:
    return value if value in ("True", "False") else "Unknown"


def _not_ready(rj: ObservedRayJob) -> str | None:
    """Why a RayJob that has not started is waiting, from its cluster's False conditions
    (e.g. "HeadPodReady=False: ContainersNotReady"); None when nothing says."""
    parts = [f"{c.type}=False" + (f": {c.reason}" if c.reason else "") +
             (f" ({_short(c.message)})" if c.message else "")
             for c in rj.cluster_conditions if c.status == "False"]
    if not parts:
        return None
    state = rj.deployment_status or "waiting"
    return f"{state}: {'; '.join(parts)}"


MESSAGE_MAX = 300
"""Longest RayJob message quoted in the status (Ray's can carry 20,000 characters of logs)."""


def _short(text: str | None) -> str | None:
    """One line of at most MESSAGE_MAX characters."""
    if not text:
        return None
    line = " ".join(text.split())
    return line if len(line) <= MESSAGE_MAX else line[:MESSAGE_MAX - 3] + "..."


def _reason(rj: ObservedRayJob) -> str:
    if rj.failure:  # failed by the operator: a pod of its cluster cannot start
        return f"RayJob {rj.name} failed at once: {_short(rj.failure)}"
    state = "/".join(s for s in (rj.deployment_status, rj.job_status) if s) or "unknown state"
    if rj.reason and rj.reason not in (rj.message or ""):
        state += f" ({rj.reason})"
    message = _short(rj.message)
    return f"RayJob {rj.name} {state}" + (f": {message}" if message else "")


def _pipeline_phase(stages: list[StageStatus], failure: str | None,
                    blocked: str | None) -> tuple[str, str | None]:
    if failure is not None:
        return "Failed", next(s.name for s in stages if s.phase == "Failed")
    if blocked is not None:
        return "Pending", blocked
    active = next((s for s in stages if s.phase in ("Preparing", "Submitted", "Running",
                                                    "Retrying")), None)
    if active is not None:
        return "Running", active.name
    if all(s.phase in _DONE_PHASES for s in stages):
        return "Succeeded", stages[-1].name
    done = [s.name for s in stages if s.phase in _DONE_PHASES]
    return "Pending", done[-1] if done else None


def _conditions(status: PipelineStatus, previous: PipelineStatus | None, failure: str | None,
                now: datetime, generation: int | None, *,
                blocked: str | None = None, held: str | None = None,
                blocked_by: str = "NameTaken") -> list[Condition]:

    """Ready, plus kstatus' Reconciling (work in progress) and Stalled (will not progress by
    itself: retries spent, a RayJob name taken, or an invalid spec), which Flux and Argo CD's
    health checks read."""
    n = len(status.stages)
    if status.phase == "Succeeded":
        ready = Condition(type="Ready", status="True", reason="Succeeded",
                          message=f"all {n} stages succeeded")
        reconciling = Condition(type="Reconciling", status="False", reason="Succeeded")
    elif status.phase == "Failed":
        ready = Condition(type="Ready", status="False", reason="Failed", message=failure)
        reconciling = Condition(type="Reconciling", status="False", reason="Failed")
    elif blocked is not None:
        ready = Condition(type="Ready", status="False", reason=blocked_by, message=blocked)
        reconciling = Condition(type="Reconciling", status="False", reason=blocked_by)
    else:
        current = next((s for s in status.stages if s.name == status.current_stage), None)
        where = f"stage {status.current_stage} " if status.current_stage else ""
        ready = Condition(type="Ready", status="False", reason=status.phase,
                          message=f"{where}{status.phase.lower()}".strip())
        why = "RetryBackoff" if current is not None and current.phase == "Retrying" else \
            (current.phase if current is not None else status.phase)
        detail = current.message if current is not None and current.message else None
        reconciling = Condition(type="Reconciling", status="True", reason=why,
                                message=f"{where}{why}".strip() + (f": {detail}" if detail else ""))
        if held is not None:
            reconciling = Condition(type="Reconciling", status="True",
                                    reason="WaitingForSupersededRun", message=held)
    stalled = (Condition(type="Stalled", status="True", reason="RetriesExhausted",
                         message=failure) if failure is not None else
               Condition(type="Stalled", status="True", reason=blocked_by, message=blocked)
               if blocked is not None else
               Condition(type="Stalled", status="False", reason="NotStalled"))
    failed = (Condition(type="StageFailed", status="True", reason="RetriesExhausted",
                        message=failure) if failure is not None else
              Condition(type="StageFailed", status="False", reason="NoFailure"))
    valid = Condition(type="SpecValid", status="True", reason="Valid")
    return _stamped([valid, ready, reconciling, stalled, failed], previous, now, generation)


def _stamped(conds: list[Condition], previous: PipelineStatus | None, now: datetime,
             generation: int | None) -> list[Condition]:
    """Set observedGeneration and lastTransitionTime (kept while the status stays the same)."""
    old = {c.type: c for c in (previous.conditions if previous else ())}
    for c in conds:
        was = old.get(c.type)
        c.last_transition_time = (was.last_transition_time if was is not None and
                                  was.status == c.status and was.last_transition_time else now)
        c.observed_generation = generation
    return conds
