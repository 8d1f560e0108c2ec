"""Before ``prolongctl submit`` creates anything: is every stagedPath the stages load from staged?

Workers load the model and tokenizer from their staged copies and refuse to start without one
(prolong.model.staging): found by the workers, that is a failure after KubeRay has provisioned
every GPU of the stage. So submit checks each ``model.stagedPath`` and tokenizer ``stagedPath``
first, like an incomplete upstream stage, and refuses (exit 2, nothing created) when one holds no
finished staging.

What the submitting machine can check decides the answer:

- an object-store URI (s3://, gs://) is read with this machine's credentials; when it cannot be
  read from here (no credentials, no network), that is a warning, not a refusal;
- a local path on the stage's volume (under ``storage.root`` with ``storage.volumeClaim`` set:
  the PersistentVolumeClaim the pods mount there) is checked only when that root is a directory
  here too (submit run from a pod or a machine that mounts the same volume). From a laptop it is
  not, and submit prints one warning line and goes on;
- any other local path is checked when its parent directory exists here; when it does not, the
  path is on another machine's filesystem (the Ray cluster's), and that is a warning too.

A warning never blocks: only a path that this machine can see and that holds no finished staging
refuses the submission.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

from prolong.k8s.target import StageTarget
from prolong.spec import EvalJob, Job
from prolong.stage.uri import is_object_store


@dataclass(frozen=True)
class StagedPath:
    """One stagedPath a stage loads from, as this machine sees it."""

    stage: str
    field: str
    """The spec field (``spec.model.stagedPath``, ``spec.data.tokenizer.stagedPath``, ...)."""
    uri: str
    staged: bool | None
    """None: it cannot be checked from this machine (``evidence`` says why)."""
    evidence: str


def staged_paths(job: Job) -> list[tuple[str, str]]:
    """(spec field, stagedPath) of every staged copy ``job``'s workers load from."""
    out = []
    if job.spec.model.staged_path is not None:
        out.append(("spec.model.stagedPath", job.spec.model.staged_path))
    tok, field = ((job.spec.tokenizer, "spec.tokenizer") if isinstance(job, EvalJob)
                  else (job.spec.data.tokenizer, "spec.data.tokenizer"))
    if tok.staged_path is not None:
        out.append((f"{field}.stagedPath", tok.staged_path))
    return out


def _under(path: str, root: str) -> bool:
    return PurePosixPath(path).is_relative_to(PurePosixPath(root))


def check_path(job: Job, uri: str) -> tuple[bool | None, str]:
    """(staged, evidence) for ``uri``; staged is None when this machine cannot tell."""
    from prolong.model.staging import STAGED, staged_marker

    if is_object_store(uri):
        try:
            marker = staged_marker(uri)
        except OSError as exc:  # pyarrow's filesystem errors are OSErrors
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            return None, f"cannot read it from this machine ({first})"
    else:
        storage = job.spec.storage
        on_volume = storage.volume_claim is not None and not is_object_store(storage.root) \
            and _under(uri, storage.root)
        anchor = Path(storage.root) if on_volume else Path(uri).parent
        if not anchor.is_dir():
            where = (f"on volume {storage.volume_claim} at {storage.root}, not mounted here"
                     if on_volume else f"{anchor} is not on this machine")
            return None, f"cannot check it from this machine ({where})"
        marker = staged_marker(uri)
    if marker is None:
        return False, f"no {STAGED} marker"
    return True, f"staged from {marker.get('source')}"


def check_stages(jobs: dict[str, Job]) -> list[StagedPath]:
    """Every stagedPath of ``jobs`` (stage name -> job), each place checked once."""
    seen: dict[str, tuple[bool | None, str]] = {}
    out = []
    for stage, job in jobs.items():
        for field, uri in staged_paths(job):
            if uri not in seen:
                seen[uri] = check_path(job, uri)
            staged, evidence = seen[uri]
            out.append(StagedPath(stage, field, uri, staged, evidence))
    return out


def refusal(file: str, path: StagedPath) -> str:
    """The one line that refuses a submission whose staged copy is missing."""
    return (f"{file}: stage {path.stage}: {path.field}: {path.uri} is not staged "
            f"({path.evidence}); nothing created. Run `prolongctl model stage {file}` first "
            "(the workers load only staged copies)")


def warning(file: str, path: StagedPath) -> str:
    """The one line for a stagedPath that cannot be checked from here."""
    return (f"warning: {file}: stage {path.stage}: {path.field}: {path.uri}: "
            f"{path.evidence}; submitting anyway (its workers refuse to start if it is not "
            "staged)")


def check_submission(what: Any, console: Any, *, with_upstream: bool = False) -> None:
    """Refuse (:class:`prolong.k8s.backend.SubmitRefused`) a submission whose stages load from a
    stagedPath that holds no finished staging; print a warning line for each one this machine
    cannot check. ``what`` is a Submission: a pipeline (every stage is checked) or one stage
    (with ``with_upstream`` also the stages before it, which may then be submitted with it)."""
    from prolong.k8s.backend import SubmitRefused

    if isinstance(what, StageTarget):
        file = what.file
        jobs = (what.pipeline_until_here().jobs if with_upstream and what.pipeline is not None
                else {what.ref.stage: what.job})
    else:
        file, jobs = str(what.path), what.jobs
    checked = check_stages(jobs)
    missing = next((p for p in checked if p.staged is False), None)
    if missing is not None:
        raise SubmitRefused(refusal(file, missing))
    warned = set()
    for path in checked:
        if path.staged is None and path.uri not in warned:
            warned.add(path.uri)
            console.print(warning(file, path), markup=False)


__all__ = ["StagedPath", "check_path", "check_stages", "check_submission", "refusal",
           "staged_paths", "warning"]
