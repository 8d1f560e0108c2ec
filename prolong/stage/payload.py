"""What travels with a stage: ``stage.json`` (its identity inside a pipeline, beside ``job.yaml``)
and :class:`StageRun` (what each training worker receives).

``stage.json`` is written by the Kubernetes renderer into the stage's ConfigMap and by ``prolongctl
submit --ray-address`` into the job's working directory; ``prolongctl run`` reads it on the head
pod. :func:`stage_file_text` is its one writer and :func:`read_stage_file` its one reader, which
also refuses a stage.json whose id does not match the job spec beside it (the outputs would land
under a wrong id).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from prolong.spec import KIND_MODELS, Job
from prolong.stage.identity import StageRef, stage_id

JOB_FILE = "job.yaml"
STAGE_FILE = "stage.json"
"""Beside job.yaml: the stage's identity inside its pipeline."""


class StageFileError(ValueError):
    """A stage.json that does not belong to the job spec beside it."""


@dataclass(frozen=True)
class UpstreamStage:
    """A stage this one starts from: its id and directory."""

    id: str
    directory: str


@dataclass(frozen=True)
class StageFile:
    """The content of stage.json: the stage's ref, and the stages it starts from, by name."""

    ref: StageRef
    upstream: dict[str, UpstreamStage] = field(default_factory=dict)

    @property
    def upstream_dirs(self) -> dict[str, str]:
        return {name: up.directory for name, up in self.upstream.items()}

    def to_json(self) -> dict[str, Any]:
        return {**self.ref.to_json(), "directory": self.ref.directory,
                "upstreamStages": {name: {"id": up.id, "directory": up.directory}
                                   for name, up in self.upstream.items()}}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageFile:
        ups = {name: UpstreamStage(up["id"], up["directory"])
               for name, up in (data.get("upstreamStages") or {}).items()}
        return cls(StageRef.from_json(data), ups)


def stage_file_text(ref: StageRef, upstream: dict[str, StageRef] | None = None) -> str:
    """stage.json for ``ref``; ``upstream`` maps the stage names it starts from to their refs."""
    info = StageFile(ref, {name: UpstreamStage(r.id, r.directory)
                           for name, r in (upstream or {}).items()})
    return json.dumps(info.to_json(), indent=2, sort_keys=True) + "\n"


def read_stage_file(path: str | Path, job: Job) -> StageFile:
    """stage.json at ``path``, checked against the job spec beside it. Raises StageFileError."""
    info = StageFile.from_json(json.loads(Path(path).read_text()))
    want = stage_id(job, info.ref.upstream)
    if want != info.ref.id:
        raise StageFileError(f"{path}: stage id {info.ref.id} does not match the job spec beside "
                             f"it ({want}); re-render the stage")
    return info


def stage_file_beside(spec_path: str | Path) -> Path:
    return Path(spec_path).with_name(STAGE_FILE)


@dataclass(frozen=True)
class StageRun:
    """Everything a worker needs to train one stage (JSON-serialisable: it travels in Ray Train's
    ``train_loop_config``). Every path is absolute or a URI."""

    job: dict[str, Any]
    """The resolved job (by alias, JSON); re-validated on the worker by :meth:`job_model`."""
    stage: dict[str, Any]
    """The StageRef in its JSON form (:meth:`StageRef.to_json`)."""
    upstream_dir: str | None = None
    """Stage directory of model.fromStage (its final/ weights, manifest, last checkpoint)."""
    shard_dirs: dict[str, str] = field(default_factory=dict)
    """Per domain: the prepared token-shard directory."""
    tokenizer_dir: str | None = None
    """The tokenizer saved with the prepared data (copied into final/)."""

    def job_model(self) -> Job:
        return KIND_MODELS[self.job["kind"]].model_validate(self.job)

    def stage_ref(self) -> StageRef:
        return StageRef.from_json(self.stage)

    def to_config(self) -> dict[str, Any]:
        return {"stage_run": {"job": self.job, "stage": self.stage,
                              "upstream_dir": self.upstream_dir, "shard_dirs": self.shard_dirs,
                              "tokenizer_dir": self.tokenizer_dir}}

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> StageRun:
        return cls(**config["stage_run"])
