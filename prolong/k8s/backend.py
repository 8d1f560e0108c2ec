"""The one interface of ``prolongctl submit / status / logs / delete``, and what its back ends share.

:class:`Backend` is what the commands call; :func:`prolong.k8s.submit.open_backend` picks one:
:class:`prolong.k8s.kube_backend.KubeBackend` (the Kubernetes API) or
:class:`prolong.k8s.ray_backend.RayBackend` (a Ray cluster's Job Submission API). Both report
failures as :class:`ClusterError` (exit code 1) and unknown names as :class:`UnknownName` (exit
code 2), and follow a run with :func:`follow`.
"""

from __future__ import annotations

import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
)

from prolong.k8s.target import StageTarget, stage_target
from prolong.specfile import Loaded, load

Submission = Loaded | StageTarget
"""What ``submit`` is given: a loaded pipeline file, or the stage a job file stands for
(:func:`prolong.k8s.target.stage_target`)."""

DEFAULT_INTERVAL = 5.0


class ClusterError(RuntimeError):
    """The cluster could not be reached or refused a request, or a followed run failed
    (exit code 1)."""


class ClusterUnreachable(ClusterError):
    """No cluster is configured, or its API cannot be reached (a dry run then checks the objects
    on this side)."""


class UnknownName(LookupError):
    """No RayJob, job or pipeline by that name (exit code 2)."""


class SubmitRefused(ValueError):
    """What was asked cannot start as things stand, e.g. its upstream stage is not complete
    (exit code 2; nothing was created)."""


@dataclass
class Submitted:
    """What ``submit`` did: ``created`` False when the run existed already (or a dry run)."""

    kind: str
    namespace: str
    name: str
    created: bool
    state: str = ""
    objects: list[dict[str, Any]] = field(default_factory=list)


class Backend(ABC):
    """Where ``submit`` puts a spec and where ``status``, ``logs`` and ``delete`` find its run.

    NAME is a run's name as :func:`resolve_name` gives it (a pipeline, a RayJob or submission id,
    a job name). Failures raise :class:`ClusterError`, unknown names :class:`UnknownName`.
    """

    @abstractmethod
    def submit(self, what: Submission, console: Console, *, dry_run: bool = False,
               yaml_out: Console | None = None, with_upstream: bool = False) -> Submitted:
        """Create the run of a pipeline or a stage unless it exists already; notes go to
        ``console``, a dry run's objects (where there are any) to ``yaml_out``. A stage whose
        upstream stages are not complete raises :class:`SubmitRefused` before anything is
        created, or with ``with_upstream`` submits its pipeline up to that stage instead."""

    @abstractmethod
    def wait(self, submitted: Submitted, console: Console, *,
             interval: float = DEFAULT_INTERVAL, timeout: float | None = None) -> bool:
        """Follow a submitted run until it ends; True when it succeeded."""

    @abstractmethod
    def status(self, name: str, console: Console) -> None:
        """Print the state of a run."""

    @abstractmethod
    def logs(self, name: str, out: IO[str], *, follow: bool = False) -> None:
        """Write a run's logs to ``out`` (and keep streaming them with ``follow``)."""

    @abstractmethod
    def delete(self, name: str, console: Console) -> list[str]:
        """Delete a run; returns what was deleted."""


# ------------------------------------------------------------------------------------------
# What a spec file becomes
# ------------------------------------------------------------------------------------------

def submission(loaded: Loaded, pipeline_file: str | Path | None = None) -> Submission:
    """A pipeline file as it is; a job file as the stage it stands for (resolved through the
    pipeline that references it, ``pipeline_file`` or the one beside it). Raises SpecError."""
    return loaded if loaded.is_pipeline else stage_target(loaded, pipeline_file)


def target_name(what: Submission) -> str:
    """The RayJob name of a stage (also its Ray submission id), or a pipeline's name
    (on Kubernetes; :func:`prolong.k8s.ray_backend.ray_submission_id` names a whole pipeline on
    Ray)."""
    if isinstance(what, StageTarget):
        return what.rayjob_name
    return what.document.metadata.name


def resolve_name(name: str) -> str:
    """NAME as given, or the run name of a spec file when NAME is one (``status job.yaml``)."""
    if name.endswith((".yaml", ".yml")) and Path(name).is_file():
        return target_name(submission(load(name)))
    return name


# ------------------------------------------------------------------------------------------
# Following a run until it ends
# ------------------------------------------------------------------------------------------

@dataclass
class Observation:
    """One look at a followed run."""

    lines: dict[str, str]
    """Item (a RayJob, a stage) -> its state line; a changed line is printed."""
    done: bool
    ok: bool
    completed: int = 0
    total: int = 1
    gone: bool = False


def follow(console: Console, title: str, look: Callable[[], Observation], *,
           interval: float = DEFAULT_INTERVAL, timeout: float | None = None) -> Observation:
    """Poll ``look`` until the run ends (or ``timeout`` seconds pass: ClusterError), showing a
    progress bar (completed stages) and printing each state change."""
    start = time.monotonic()
    seen: dict[str, str] = {}
    columns = (SpinnerColumn(), TextColumn("{task.description}"), BarColumn(),
               MofNCompleteColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console, transient=True) as progress:
        task = progress.add_task(title, total=1)
        while True:
            obs = look()
            for key, line in obs.lines.items():
                if seen.get(key) != line:
                    progress.console.print(f"{key}: {line}", markup=False, highlight=False)
                    seen[key] = line
            progress.update(task, completed=obs.completed, total=max(obs.total, 1))
            if obs.done or obs.gone:
                return obs
            if timeout is not None and time.monotonic() - start > timeout:
                raise ClusterError(f"{title}: still running after {timeout:.0f} s (--timeout)")
            time.sleep(interval)


__all__ = [
    "DEFAULT_INTERVAL",
    "Backend",
    "ClusterError",
    "ClusterUnreachable",
    "Observation",
    "Submission",
    "SubmitRefused",
    "Submitted",
    "UnknownName",
    "follow",
    "resolve_name",
    "submission",
    "target_name",
]
