"""Stage identity: which run a stage is, and where its outputs live. Pure functions, no I/O.

A stage's id is a short hash of its canonical spec, the ids of the stages it starts from, and its
``rerun`` counter (part of the spec). The same id means the same run: resubmitting resumes it or,
when complete, does nothing. Changing a spec changes the id of that stage and of every stage after
it that starts from it; stages before it keep their ids and are reused.

:class:`StageRef` has exactly one JSON form (:meth:`StageRef.to_json`, camelCase like every file we
write for Kubernetes); stage.json, the worker payload and the tests all use it.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

from prolong.spec import Job, ProLongPipeline

ID_LENGTH = 8

# Fields that decide where and how pods are scheduled, not what is computed. Changing them must not
# re-run a finished 12K GPU-hour stage, so they stay out of the identity.
SCHEDULING_ONLY: tuple[tuple[str, ...], ...] = (
    ("cluster", "image"),
    ("cluster", "nodeSelector"),
    ("cluster", "tolerations"),
    ("cluster", "podTemplate"),
    ("cluster", "maxFailures"),
    ("cluster", "kubernetes"),
    ("checkpoint", "keep"),
    # When checkpoints are taken by time: resuming from any of them gives the same result
    # (tests/train: resume vs uninterrupted), so the cadence is not part of what is computed.
    ("checkpoint", "everyMinutes"),
    ("storage", "volumeClaim"),
    # The world layout: the global batch, the data order and the token-mean loss do not depend on
    # it (tests/train/test_reshape.py), and a stage resubmitted on fewer or more workers, or
    # another SP degree, resumes its own checkpoints (prolong.train.reshape).
    ("cluster", "nodes"),
    ("cluster", "workersPerNode"),
    ("parallelism", "sequenceParallel"),
    # Where the weights and tokenizer are staged and whether the hub may fill it: the same source
    # gives the same model wherever its copy lives.
    ("model", "stagedPath"),
    ("model", "allowHub"),
    ("model", "hubTokenSecret"),
    ("data", "tokenizer", "stagedPath"),
    ("data", "tokenizer", "allowHub"),
    ("tokenizer", "stagedPath"),
    ("tokenizer", "allowHub"),
    # Memory savers (loss chunk, activation offload, tiled MLP, allocator): the same loss and
    # gradients up to float rounding (tests/model/test_memory_knobs.py), so a stage that ran out
    # of memory can be resubmitted with them and resume its own checkpoints.
    ("parallelism", "memory"),
    # Gradient-reduction precision and overlap: the same gradients up to the reduction's rounding.
    ("parallelism", "communication"),
)

ADDED_WHEN_SET: tuple[tuple[str, ...], ...] = (
    ("model", "revision"),
)
"""Result-deciding fields added after stages had run: part of the id only when set."""

DEFAULT_STAGE_NAME = {"PretrainJob": "pretrain", "SFTJob": "sft", "EvalJob": "eval"}
"""The stage name of a job file run on its own."""

UNRESOLVED_PREFIX = "unresolved:"
"""A standalone file's fromStage enters its id by name (see :func:`standalone_stage`)."""


@dataclass(frozen=True)
class StageRef:
    """Where a stage lives: its pipeline, name, id and output directory."""

    pipeline: str
    stage: str
    kind: str
    id: str
    upstream: tuple[str, ...]
    """Ids of the stages this one starts from."""
    storage_root: str

    @property
    def dir_name(self) -> str:
        """``<stage>-<id>``: the stage directory's name (and Ray Train's run name)."""
        return f"{self.stage}-{self.id}"

    @property
    def pipeline_directory(self) -> str:
        """``<storageRoot>/<pipeline>``: where every stage of the pipeline lives."""
        return f"{self.storage_root.rstrip('/')}/{self.pipeline}"

    @property
    def directory(self) -> str:
        """``<storageRoot>/<pipeline>/<stage>-<id>``"""
        return f"{self.pipeline_directory}/{self.dir_name}"

    def to_json(self) -> dict[str, Any]:
        """The one JSON form (stage.json, the worker payload)."""
        return {"pipeline": self.pipeline, "stage": self.stage, "kind": self.kind, "id": self.id,
                "upstream": list(self.upstream), "storageRoot": self.storage_root}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> StageRef:
        return cls(pipeline=data["pipeline"], stage=data["stage"], kind=data["kind"],
                   id=data["id"], upstream=tuple(data["upstream"]),
                   storage_root=data["storageRoot"])

    def with_storage_root(self, root: str) -> StageRef:
        return StageRef(self.pipeline, self.stage, self.kind, self.id, self.upstream, root)


def identity_payload(job: Job) -> dict[str, Any]:
    """The part of a job's spec that determines its result (defaults filled in)."""
    spec = job.spec.model_dump(mode="json", by_alias=True)

    def parent(path: tuple[str, ...]) -> dict[str, Any]:
        node = spec
        for key in path[:-1]:
            node = node.get(key, {})
        return node

    for path in SCHEDULING_ONLY:
        parent(path).pop(path[-1], None)
    # Fields added after runs exist enter the id only when set, so that every run made before
    # them keeps its id (and resumes) where the new field is left out.
    for path in ADDED_WHEN_SET:
        if parent(path).get(path[-1]) is None:
            parent(path).pop(path[-1], None)
    return {"kind": job.kind, "spec": spec}


def stage_id(job: Job, upstream_ids: tuple[str, ...] = ()) -> str:
    canonical = json.dumps({"job": identity_payload(job), "upstream": list(upstream_ids)},
                           sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:ID_LENGTH]


def pipeline_stages(pipeline: ProLongPipeline, jobs: dict[str, Job]) -> list[StageRef]:
    """Every stage of a validated pipeline, in run order, with ids chained through fromStage."""
    refs: dict[str, StageRef] = {}
    for stage in pipeline.spec.stages:
        job = jobs[stage.name]
        src = job.spec.model.from_stage
        upstream = (refs[src].id,) if src else ()
        refs[stage.name] = StageRef(pipeline.metadata.name, stage.name, job.kind,
                                    stage_id(job, upstream), upstream, job.spec.storage.root)
    return list(refs.values())


def standalone_stage(job: Job) -> StageRef:
    """A job run on its own: pipeline = its name, stage = its kind's default name. A fromStage in a
    standalone file is unresolved here, so it enters the id by name."""
    src = job.spec.model.from_stage
    upstream = (f"{UNRESOLVED_PREFIX}{src}",) if src else ()
    return StageRef(job.metadata.name, DEFAULT_STAGE_NAME[job.kind], job.kind,
                    stage_id(job, upstream), upstream, job.spec.storage.root)
