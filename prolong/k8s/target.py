"""What ``prolongctl submit JOB_FILE`` submits: the job alone, or one stage of the pipeline that
references it.

A stage file that starts from another stage (``model.fromStage``) has no upstream id or directory
of its own: rendered alone its entrypoint could only fail, after KubeRay had provisioned the GPUs.
So a job file is resolved through the pipeline that references it (``ref:``): the pipeline file
named by ``--pipeline``, else the one pipeline file beside it that does. Resolved that way it
takes the pipeline's name, its stage name, its real upstream ids and directories, and lands where
the pipeline (and so the next stage) expects it. A ``fromStage`` file that no pipeline references
is refused with the reason; a job file without ``fromStage`` and without a pipeline is a pipeline
of its own (:func:`prolong.stage.identity.standalone_stage`).

Whether an upstream stage is done is decided by :func:`upstream_state` from what the back end
read (its COMPLETE marker, the RayJobs of its id, its pipeline's status): pure, no I/O here.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prolong.k8s.rayjob import render_job, render_stage
from prolong.reconcile.observe import ObservedRayJob
from prolong.spec import Job, ProLongPipeline, SpecError, SpecIssue
from prolong.specfile import Loaded, load, read_yaml
from prolong.stage.identity import StageRef, pipeline_stages, standalone_stage
from prolong.stage.names import rayjob_name

FROM_STAGE_FIELD = "spec.model.fromStage"


@dataclass(frozen=True)
class StageTarget:
    """One stage to submit as its own [ConfigMap, RayJob]."""

    job: Job
    """The stage's job (named ``<pipeline>-<stage>`` inside a pipeline)."""
    ref: StageRef
    upstream: dict[str, StageRef] = field(default_factory=dict)
    """Stage name in ``fromStage`` -> the ref of the stage it names."""
    pipeline: Loaded | None = None
    """The pipeline the stage was resolved through (None: a job file on its own)."""
    file: str = ""
    """The job file given on the command line."""

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
    """The stage a job file stands for (see the module docstring). Raises SpecError."""
    job: Job = loaded.document
    found = _pipeline_of(loaded.path, pipeline_file)
    if found is None:
        src = job.spec.model.from_stage
        if src:
            raise SpecError([SpecIssue(
                FROM_STAGE_FIELD, f"starts from stage {src!r}, but no pipeline file beside it "
                "references this file, so that stage's id and directory are unknown: submit "
                "the pipeline, or name it with --pipeline FILE", src, file=loaded.path)])
        return StageTarget(job, standalone_stage(job), file=loaded.path)
    pipeline, stage = found
    refs = {r.stage: r for r in pipeline_stages(pipeline.document, pipeline.jobs)}
    stage_job = pipeline.jobs[stage]
    src = stage_job.spec.model.from_stage
    upstream = {src: refs[src]} if src else {}
    return StageTarget(stage_job, refs[stage], upstream, pipeline, loaded.path)


def _pipeline_of(job_file: str, pipeline_file: str | Path | None) -> tuple[Loaded, str] | None:
    """(the loaded pipeline, the stage name) of the pipeline that references ``job_file``."""
    me = Path(job_file).resolve()
    if pipeline_file is not None:
        stage = _stage_referencing(Path(pipeline_file), me, read_yaml(str(pipeline_file)))
        if stage is None:
            raise SpecError([SpecIssue("spec.stages", f"no stage has ref: {Path(job_file).name} "
                                       f"(the job file submitted)", file=str(pipeline_file))])
        return load(pipeline_file), stage
    matches = [(path, stage) for path in sorted(me.parent.glob("*.y*ml"))
               if path.resolve() != me
               and (stage := _stage_referencing(path, me, _neighbour(path))) is not None]
    if not matches:
        return None
    if len(matches) > 1:
        names = ", ".join(p.name for p, _ in matches)
        raise SpecError([SpecIssue("", f"referenced by several pipeline files ({names}): name one "
                                   "with --pipeline FILE", file=job_file)])
    path, stage = matches[0]
    return load(path), stage


def _neighbour(path: Path) -> dict[str, Any]:
    """A file beside the job file, as YAML ({} when it is not a readable spec: a broken
    neighbour is not this submission's to report)."""
    try:
        return read_yaml(str(path))
    except SpecError:
        return {}


def _stage_referencing(pipeline_file: Path, job_file: Path, raw: dict[str, Any]) -> str | None:
    """The name of the stage of ``pipeline_file`` (read as ``raw``) whose ``ref`` is ``job_file``
    (None when it is no pipeline or no stage refers to it). Only the stage list is read here;
    :func:`prolong.specfile.load` validates the pipeline when it is used."""
    if raw.get("kind") != "ProLongPipeline":
        return None
    stages = (raw.get("spec") or {}).get("stages") or []
    for stage in stages:
        if isinstance(stage, dict) and isinstance(stage.get("ref"), str) and \
                (pipeline_file.parent / stage["ref"]).resolve() == job_file:
            return str(stage.get("name"))
    return None


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


__all__ = ["FROM_STAGE_FIELD", "StageTarget", "UpstreamState", "pipeline_until", "refusal",
           "stage_target", "upstream_state"]
