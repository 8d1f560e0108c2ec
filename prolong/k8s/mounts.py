"""Which directories a stage's pods can read, and the rule that every local path it reads is one
of them. Pure functions over a validated job: no cluster access.

A stage's pods (the Ray head, the workers and the preparation Job) see the storage volume
(``storage.volumeClaim``, mounted at ``storage.root``: what the renders have always mounted) and
the claims of ``cluster.kubernetes.volumes``. A stream, a HELMET ``dataDir`` or a staged model
anywhere else does not exist in the pod: today that is found in data preparation after 64 GPUs
were provisioned, or ten days in when the eval starts. :func:`mount_issues` finds it before
anything is created; ``prolongctl validate`` (for a stage meant for Kubernetes) and ``submit``
refuse it with one line naming the file, the field and the rule.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath

from prolong.spec import EvalJob, Job, SpecError, SpecIssue
from prolong.specfile import Loaded, read_yaml
from prolong.stage.uri import is_hub_id, is_object_store


@dataclass(frozen=True)
class Mount:
    """A directory every pod of the stage has: ``where`` names the spec field that mounts it."""

    path: str
    where: str
    read_only: bool


def stage_mounts(job: Job) -> list[Mount]:
    """The volumes the renders mount into every pod of ``job`` (head, workers, preparation)."""
    spec = job.spec
    out = []
    if spec.storage.volume_claim is not None and not is_object_store(spec.storage.root):
        out.append(Mount(spec.storage.root, "storage.volumeClaim", False))
    for i, vol in enumerate(spec.cluster.kubernetes.volumes):
        out.append(Mount(vol.mount_path, f"cluster.kubernetes.volumes[{i}]", vol.read_only))
    return out


def for_kubernetes(job: Job) -> bool:
    """Whether a job says it runs on Kubernetes: it names a volume (storage.volumeClaim or
    cluster.kubernetes.volumes). ``validate`` applies the mount rule to those; ``submit``
    applies it to every stage it sends to a cluster."""
    return job.spec.storage.volume_claim is not None or bool(job.spec.cluster.kubernetes.volumes)


def read_paths(job: Job) -> list[tuple[str, str, bool]]:
    """(field path, value, written) of every local path ``job`` reads or writes in its pods.
    Hub ids and object-store URIs are not paths; an embedded corpus is built in the pod."""
    spec = job.spec
    out: list[tuple[str, str, bool]] = []

    def add(field: str, value: str | None, *, source: bool = False, written: bool = False):
        if value is None or is_object_store(value) or (source and is_hub_id(value)):
            return
        out.append((field, value, written))

    add("storage.root", spec.storage.root, written=True)
    add("model.source", spec.model.source, source=True)
    add("model.stagedPath", spec.model.staged_path, written=True)
    if isinstance(job, EvalJob):
        tok, tok_field = spec.tokenizer, "tokenizer"
        add("dataDir", spec.data_dir)
        add("nliModel", spec.nli_model)
        add("sizingTokenizer", spec.sizing_tokenizer, source=True)
        if spec.judge is not None:
            add("judge.helmetDir", spec.judge.helmet_dir)
    else:
        tok, tok_field = spec.data.tokenizer, "data.tokenizer"
        add("data.preparedDir", spec.data.prepared_dir, written=True)
        for i, stream in enumerate(spec.data.streams):
            if stream.format != "embedded":
                add(f"data.streams[{i}].path", stream.path)
    add(f"{tok_field}.source", tok.source, source=True)
    add(f"{tok_field}.stagedPath", tok.staged_path, written=True)
    return out


def under(path: str, mount: str) -> bool:
    """Whether ``path`` lies in the directory ``mount`` (both absolute; a glob's literal
    prefix decides)."""
    p, m = PurePosixPath(path), PurePosixPath(mount)
    return p.is_absolute() and (p == m or m in p.parents)


def mount_issues(job: Job) -> list[SpecIssue]:
    """One issue per local path of ``job`` that no volume of its pods holds (or that it writes
    under a read-only one). Paths are relative to the job's document (``spec.data...``)."""
    mounts = stage_mounts(job)
    where = ", ".join(f"{m.path} ({m.where})" for m in mounts) or "none"
    issues = []
    for field, value, written in read_paths(job):
        holder = max((m for m in mounts if under(value, m.path)), key=lambda m: len(m.path),
                     default=None)
        if holder is None:
            issues.append(SpecIssue(f"spec.{field}", "is not under a volume the stage's pods "
                                    f"mount (mounted: {where}); add a claim to "
                                    "cluster.kubernetes.volumes, or move it under one", value))
        elif written and holder.read_only:
            issues.append(SpecIssue(f"spec.{field}", f"is written by the stage but "
                                    f"{holder.path} ({holder.where}) is mounted readOnly", value))
    return issues


def kubernetes_issues(loaded: Loaded, *, declared_only: bool = False) -> list[SpecIssue]:
    """:func:`mount_issues` of every stage of a loaded file, each naming the file the field is
    in (a pipeline's ``ref:`` stage: its own job file). ``declared_only``: only the stages that
    say they run on Kubernetes (:func:`for_kubernetes`), as ``validate`` checks them; ``submit``
    checks every stage it sends to a cluster."""
    if not loaded.is_pipeline:
        job = loaded.document
        if declared_only and not for_kubernetes(job):
            return []
        return [i.located(file=loaded.path) for i in mount_issues(job)]
    raw_stages = (read_yaml(loaded.path).get("spec") or {}).get("stages") or []
    out = []
    for i, stage in enumerate(loaded.document.spec.stages):
        job = loaded.jobs[stage.name]
        if declared_only and not for_kubernetes(job):
            continue
        raw = raw_stages[i] if i < len(raw_stages) and isinstance(raw_stages[i], dict) else {}
        for issue in mount_issues(job):
            if "ref" in raw:
                out.append(issue.located(file=str(Path(loaded.path).parent / raw["ref"])))
            else:
                out.append(issue.located(file=loaded.path, prefix=f"spec.stages[{i}]"))
    return out


def check_mounts(loaded: Loaded, *, declared_only: bool = False) -> None:
    """SpecError (one line per the CLI: file, field, rule) when a stage reads a path its pods
    do not mount."""
    issues = kubernetes_issues(loaded, declared_only=declared_only)
    if issues:
        raise SpecError(issues)
