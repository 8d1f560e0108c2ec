"""What ``prolongctl submit JOB_FILE`` submits: the job alone, or one stage of the pipeline that
references it, resolved by :func:`prolong.jobfile.job_stage` (the same resolution ``prolongctl
run`` uses, so both put a stage in the same directory).

Whether an upstream stage is done is decided by :func:`upstream_state` from what the back end
read (its COMPLETE marker, the RayJobs of its id, its pipeline's status): pure, no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

from prolong.jobfile import FROM_STAGE_FIELD, JobStage, job_stage
from prolong.k8s.rayjob import render_job, render_preparation, render_stage, stage_preparation
from prolong.reconcile.observe import ObservedRayJob
from prolong.spec import ProLongPipeline
from prolong.specfile import Loaded
from prolong.stage.identity import StageRef
from prolong.stage.names import rayjob_name


@dataclass(frozen=True)
class StageTarget(JobStage):
    """One stage to submit as its own [ConfigMap, RayJob]."""

    @property
    def rayjob_name(self) -> str:
        return rayjob_name(self.job.metadata.name, self.ref.id)

    def render(self, *, namespace: str | None = None,
               managed_by: str = "prolongctl") -> list[dict[str, Any]]:
        """[ConfigMap, RayJob]: stage.json names the real upstream ids and directories."""
        if self.pipeline is None:
            return render_job(self.job, self.ref, namespace=namespace, managed_by=managed_by)
        return render_stage(self.pipeline.document, self.pipeline.jobs, self.ref.stage,
                            namespace=namespace, managed_by=managed_by)

    def preparation(self, *, namespace: str | None = None,
                    managed_by: str = "prolongctl") -> dict[str, Any] | None:
        """The stage's preparation Job (None: nothing to stage or prepare), created and
        completed before its RayJob."""
        if self.pipeline is None:
            return render_preparation(self.job, self.ref, namespace=namespace,
                                      managed_by=managed_by)
        return stage_preparation(self.pipeline.document, self.pipeline.jobs, self.ref.stage,
                                 namespace=namespace, managed_by=managed_by)

    def pipeline_until_here(self) -> Loaded:
        """The pipeline cut after this stage (what ``--with-upstream`` submits): same name, so
        the same stage ids, directories and RayJob names."""
        if self.pipeline is None:
            raise ValueError("a job file on its own has no upstream stages")
        return pipeline_until(self.pipeline, self.ref.stage)


def pipeline_until(loaded: Loaded, stage: str) -> Loaded:
    """``loaded`` (a resolved pipeline) with the stages after ``stage`` left out."""
    doc: ProLongPipeline = loaded.document
    names = [s.name for s in doc.spec.stages]
    keep = names[: names.index(stage) + 1]
    spec = doc.spec.model_copy(update={"stages": doc.spec.stages[: len(keep)]})
    return Loaded(loaded.path, doc.model_copy(update={"spec": spec}),
                  {name: loaded.jobs[name] for name in keep})


def stage_target(loaded: Loaded, pipeline_file: str | Path | None = None) -> StageTarget:
    """The stage a job file stands for (:func:`prolong.jobfile.job_stage`). Raises SpecError."""
    found = job_stage(loaded, pipeline_file)
    return StageTarget(**{f.name: getattr(found, f.name) for f in fields(found)})


# ------------------------------------------------------------------------------------------
# Is an upstream stage done?
# ------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class UpstreamState:
    """Whether an upstream stage's output can be started from, and what says so."""

    done: bool
    evidence: str


def upstream_state(ref: StageRef, *, marker: bool, rayjobs: Iterable[ObservedRayJob] = (),
                   pipeline_status: dict[str, Any] | None = None) -> UpstreamState:
    """Done when its directory holds COMPLETE, a RayJob of its id succeeded, or its pipeline's
    status says the stage with this id Succeeded or was Skipped. Otherwise the evidence says why
    not (running, failed, never run)."""
    if marker:
        return UpstreamState(True, f"COMPLETE marker in {ref.directory}")
    runs = sorted((r for r in rayjobs if r.stage_id == ref.id), key=lambda r: (r.attempt, r.name))
    won = next((r for r in runs if r.outcome == "succeeded"), None)
    if won is not None:
        return UpstreamState(True, f"RayJob {won.name} succeeded")
    for st in (pipeline_status or {}).get("stages") or ():
        if st.get("name") == ref.stage and st.get("id") == ref.id and \
                st.get("phase") in ("Succeeded", "Skipped"):
            return UpstreamState(True, f"ProLongPipeline {ref.pipeline} says {st['phase']}")
    if runs:
        last = runs[-1]
        what = "running" if last.active else "failed"
        detail = f": {last.message}" if last.message and not last.active else ""
        return UpstreamState(False, f"{what} (RayJob {last.name}{detail})")
    return UpstreamState(False, f"not run (no RayJob of id {ref.id}, no COMPLETE marker in "
                                f"{ref.directory})")


def refusal(target: StageTarget, name: str, state: UpstreamState) -> str:
    """The one line that refuses a stage whose upstream is not done."""
    ref = target.upstream[name]
    return (f"{target.file}: {FROM_STAGE_FIELD}: stage {name} of pipeline {ref.pipeline} (id "
            f"{ref.id}) is not complete: {state.evidence}; nothing created. Submit it first, or "
            "pass --with-upstream to submit the pipeline up to this stage")


__all__ = ["StageTarget", "UpstreamState", "pipeline_until", "refusal", "stage_target",
           "upstream_state"]
