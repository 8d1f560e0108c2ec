"""A job file -> the pipeline stage it stands for, for every command that takes one
(``prolongctl run``, ``submit``, ``render``, ``status FILE``).

A stage file that starts from another stage (``model.fromStage``) has no upstream id or directory
of its own: run or rendered alone it could only fail (on a cluster, after KubeRay had provisioned
the GPUs). So a job file is resolved through the pipeline that references it (``ref:``): the
pipeline file named by ``--pipeline``, else the one pipeline file beside it that does. Resolved
that way it takes the pipeline's name, its stage name, its real upstream ids and directories, and
lands where the pipeline (and so the next stage) expects it: ``prolongctl run
jobs/quickstart/stage1.yaml`` writes ``<root>/quickstart/stage1-<id>``, the directory ``run
jobs/quickstart/pipeline.yaml`` and the operator use. A ``fromStage`` file that no pipeline
references is refused with the reason; a job file without ``fromStage`` and without a pipeline is
a pipeline of its own (:func:`prolong.stage.identity.standalone_stage`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prolong.spec import Job, SpecError, SpecIssue
from prolong.specfile import Loaded, load, read_yaml
from prolong.stage.identity import StageRef, pipeline_stages, standalone_stage

FROM_STAGE_FIELD = "spec.model.fromStage"


@dataclass(frozen=True)
class JobStage:
    """The stage a job file stands for."""

    job: Job
    """The stage's job (named ``<pipeline>-<stage>`` inside a pipeline)."""
    ref: StageRef
    upstream: dict[str, StageRef] = field(default_factory=dict)
    """Stage name in ``fromStage`` -> the ref of the stage it names."""
    pipeline: Loaded | None = None
    """The pipeline the stage was resolved through (None: a job file on its own)."""
    file: str = ""
    """The job file given on the command line."""


def job_stage(loaded: Loaded, pipeline_file: str | Path | None = None) -> JobStage:
    """The stage a job file stands for (see the module docstring). Raises SpecError."""
    job: Job = loaded.document
    found = _pipeline_of(loaded.path, pipeline_file)
    if found is None:
        src = job.spec.model.from_stage
        if src:
            raise SpecError([SpecIssue(
                FROM_STAGE_FIELD, f"starts from stage {src!r}, but no pipeline file beside it "
                "references this file, so that stage's id and directory are unknown: use the "
                "pipeline file, or name it with --pipeline FILE", src, file=loaded.path)])
        return JobStage(job, standalone_stage(job), file=loaded.path)
    pipeline, stage = found
    refs = {r.stage: r for r in pipeline_stages(pipeline.document, pipeline.jobs)}
    stage_job = pipeline.jobs[stage]
    src = stage_job.spec.model.from_stage
    upstream = {src: refs[src]} if src else {}
    return JobStage(stage_job, refs[stage], upstream, pipeline, loaded.path)


def _pipeline_of(job_file: str, pipeline_file: str | Path | None) -> tuple[Loaded, str] | None:
    """(the loaded pipeline, the stage name) of the pipeline that references ``job_file``."""
    me = Path(job_file).resolve()
    if pipeline_file is not None:
        stage = _stage_referencing(Path(pipeline_file), me, read_yaml(str(pipeline_file)))
        if stage is None:
            raise SpecError([SpecIssue("spec.stages", f"no stage has ref: {Path(job_file).name} "
                                       f"(the job file given)", file=str(pipeline_file))])
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
    neighbour is not this command's to report)."""
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


__all__ = ["FROM_STAGE_FIELD", "JobStage", "job_stage"]
