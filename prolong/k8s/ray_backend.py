"""The Ray Job Submission API back end of ``prolongctl submit / status / logs / delete``.

``--ray-address URL``: an existing Ray cluster's Job Submission API (what KubeRay's HTTPMode
uses). The spec travels in the job's ``runtime_env`` working_dir (``job.yaml`` and, for a stage,
``stage.json``; a pipeline as ``pipeline.yaml`` with its stages inline) and the entrypoint is
``prolongctl run <file> --ray-address auto``. Submission ids are deterministic (a job's RayJob
name; a pipeline's name and a hash of its stage ids), so submitting again submits nothing.

Ray 2.60 token auth: the dashboard wants ``Authorization: Bearer <token>``. The token is taken
from ``--ray-token`` / $RAY_AUTH_TOKEN, else the Kubernetes Secret ``--ray-token-secret
[NAMESPACE/]NAME`` names (key ``auth_token``: the Secret KubeRay generates for a cluster with
``authOptions.mode: token``, named like the cluster, or the chart's ``rayCluster.auth.secretName``),
else the file $RAY_AUTH_TOKEN_PATH, else ``~/.ray/auth_token`` (where ``ray start`` / ``ray
get-auth-token --generate`` keep it), and sent as that header; Ray's own client only adds it when
the *client* process runs with RAY_AUTH_MODE=token, which a laptop talking to a remote cluster
usually does not.
"""

from __future__ import annotations

import asyncio
import base64
import datetime
import hashlib
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from prolong.k8s.backend import (
    DEFAULT_INTERVAL,
    Backend,
    ClusterError,
    Observation,
    Submission,
    SubmitRefused,
    Submitted,
    UnknownName,
    follow,
    target_name,
)
from prolong.k8s.kube_backend import Kube, default_namespace, kube_client
from prolong.k8s.target import StageTarget, UpstreamState, refusal
from prolong.specfile import dump_yaml
from prolong.stage.directory import stage_complete
from prolong.stage.identity import pipeline_stages
from prolong.stage.names import (
    DIRECTORY_ANNOTATION,
    KIND_LABEL,
    PIPELINE_LABEL,
    STAGE_ID_LABEL,
    STAGE_LABEL,
    rayjob_name,
)
from prolong.stage.payload import JOB_FILE

PIPELINE_FILE = "pipeline.yaml"
TERMINAL_RAY = ("SUCCEEDED", "FAILED", "STOPPED")


def ray_submission_id(what: Submission) -> str:
    """Deterministic Ray submission id: a stage's RayJob name; for a pipeline, its name and a
    short hash of every stage id (same stages, same id)."""
    if isinstance(what, StageTarget):
        return target_name(what)
    loaded = what
    ids = [r.id for r in pipeline_stages(loaded.document, loaded.jobs)]
    digest = hashlib.sha256(",".join(ids).encode()).hexdigest()[:8]
    return rayjob_name(loaded.document.metadata.name, digest)


TOKEN_KEY = "auth_token"
"""The key of the Ray token in KubeRay's per-cluster Secret (and in a Secret named by
``rayAuthSecret`` / the chart's ``rayCluster.auth.secretName``)."""


class TokenSecretError(ValueError):
    """--ray-token-secret names a Secret that is missing or holds no token (bad input: exit 2)."""


def ray_token(explicit: str | None = None, *, secret: str | None = None,
              namespace: str | None = None) -> str | None:
    """The Ray auth token: explicit (--ray-token / $RAY_AUTH_TOKEN), else the Secret ``secret``
    ([NAMESPACE/]NAME, default namespace ``namespace`` or the kubeconfig context's), else
    $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; None when there is none (a cluster without
    token auth)."""
    if explicit:
        return explicit.strip()
    env = os.environ.get("RAY_AUTH_TOKEN")
    if env:
        return env.strip()
    if secret:
        return secret_token(secret, namespace)
    for path in (os.environ.get("RAY_AUTH_TOKEN_PATH"), str(Path.home() / ".ray" / "auth_token")):
        if path:
            try:
                token = Path(path).read_text().strip()
            except OSError:
                continue
            if token:
                return token
    return None


def secret_token(secret: str, namespace: str | None = None) -> str:
    """The token in the Secret ``[NAMESPACE/]NAME`` (key auth_token), read through the Kubernetes
    API (kubeconfig or service account: ``get`` on that Secret is all it needs)."""
    ns, _, name = secret.rpartition("/")
    ns = ns or namespace or default_namespace()
    kube = Kube(kube_client(), ns)
    found = kube.call(f"get Secret {ns}/{name}", kube.core.read_namespaced_secret, name, ns,
                      missing_ok=True)
    where = f"--ray-token-secret {secret}: Secret {ns}/{name}"
    if found is None:
        raise TokenSecretError(f"{where} does not exist (KubeRay names it like the Ray cluster)")
    encoded = (found.data or {}).get(TOKEN_KEY)
    if not encoded:
        raise TokenSecretError(f"{where} has no key {TOKEN_KEY}")
    token = base64.b64decode(encoded).decode().strip()
    if not token:
        raise TokenSecretError(f"{where}: key {TOKEN_KEY} is empty")
    return token


def normalise_address(address: str) -> str:
    """``host:port`` -> ``http://host:port`` (the dashboard's HTTP address)."""
    address = address.rstrip("/")
    if "://" not in address:
        address = f"http://{address}"
    return address


class RayJobs:
    """The Job Submission API of one Ray cluster, with errors turned into ClusterError."""

    def __init__(self, address: str, token: str | None = None) -> None:
        # Imported here: ray is heavy and `prolongctl validate` must not load it.
        from ray.job_submission import JobSubmissionClient

        self.address = normalise_address(address)
        headers = {"Authorization": f"Bearer {token}"} if token else None
        try:
            self.client = JobSubmissionClient(self.address, headers=headers)
        except Exception as exc:  # ConnectionError, AuthenticationError, ...
            raise ClusterError(self._explain(exc)) from None

    def _explain(self, exc: Exception) -> str:
        text = " ".join(str(exc).split())
        if "401" in text or "403" in text or "uthenticat" in text:
            return (f"Ray at {self.address} refused the request (token auth): pass --ray-token or "
                    "set RAY_AUTH_TOKEN (`ray get-auth-token` on the head node prints it)")
        return f"Ray at {self.address}: {type(exc).__name__}: {text[:300]}"

    def call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except Exception as exc:
            raise ClusterError(self._explain(exc)) from None

    def info(self, submission_id: str) -> Any | None:
        """The job's JobDetails, or None when there is no such job."""
        try:
            return self.client.get_job_info(submission_id)
        except RuntimeError as exc:
            if "404" in str(exc) or "does not exist" in str(exc):
                return None
            raise ClusterError(self._explain(exc)) from None
        except Exception as exc:
            raise ClusterError(self._explain(exc)) from None

    def dashboard(self, submission_id: str) -> str:
        return f"{self.address}/#/jobs/{submission_id}"


def ray_files(what: Submission) -> tuple[dict[str, str], str]:
    """The working_dir's files and the spec file's name in it."""
    if isinstance(what, StageTarget):
        configmap = what.render()[0]
        return dict(configmap["data"]), JOB_FILE
    return {PIPELINE_FILE: dump_yaml(what.document)}, PIPELINE_FILE


def ray_entrypoint(spec_file: str) -> str:
    return f"prolongctl run {spec_file} --ray-address auto"


def _ray_metadata(what: Submission) -> dict[str, str]:
    if isinstance(what, StageTarget):
        ref = what.ref
        return {PIPELINE_LABEL: ref.pipeline, STAGE_LABEL: ref.stage, STAGE_ID_LABEL: ref.id,
                KIND_LABEL: what.job.kind, DIRECTORY_ANNOTATION: ref.directory}
    return {PIPELINE_LABEL: what.document.metadata.name, KIND_LABEL: what.document.kind}


def _relative_roots(what: Submission) -> list[str]:
    jobs = [what.job] if isinstance(what, StageTarget) else list(what.jobs.values())
    roots = {j.spec.storage.root for j in jobs}
    return sorted(r for r in roots if "://" not in r and not Path(r).is_absolute())


def ray_line(info: Any) -> str:
    status = str(getattr(info, "status", "UNKNOWN"))
    message = getattr(info, "message", None)
    return f"{status}" + (f" - {' '.join(message.split())}" if message else "")


def ray_upstream_pending(target: StageTarget, ray: RayJobs) -> str | None:
    """The refusal of a stage whose upstream is not done on this Ray cluster (neither its
    COMPLETE marker nor a SUCCEEDED Ray job with the upstream's submission id), else None."""
    for name, ref in target.upstream.items():
        if stage_complete(ref.directory):
            continue
        sid = rayjob_name(f"{ref.pipeline}-{ref.stage}", ref.id)
        info = ray.info(sid)
        if info is not None and str(info.status) == "SUCCEEDED":
            continue
        seen = (f"Ray job {sid} is {info.status}" if info is not None else
                f"no Ray job {sid} at {ray.address}, no COMPLETE marker in {ref.directory}")
        return refusal(target, name, UpstreamState(False, seen))
    return None


# Ray's dashboard answers 500 "No available agent to submit job" until the head's job agent has
# registered, which takes seconds after a head starts (longer on a busy node). The request was not
# taken, so asking again is safe; anything else is not retried.
AGENT_NOT_READY = "No available agent to submit job"
AGENT_WAIT_S = (1.0, 2.0, 4.0, 8.0, 15.0, 30.0)


def submit_when_agent_ready(send: Callable[[], Any], console: Console, *,
                            waits: tuple[float, ...] = AGENT_WAIT_S,
                            sleep: Callable[[float], None] = time.sleep) -> Any:
    """``send()``, asked again after each wait while Ray says its job agent is not up yet."""
    for wait in (*waits, None):
        try:
            return send()
        except Exception as exc:
            if wait is None or AGENT_NOT_READY not in str(exc):
                raise
            console.print(f"Ray's job agent is not up yet; submitting again in {wait:g} s",
                          markup=False)
            sleep(wait)
    raise AssertionError("unreachable")


def submit_ray(what: Submission, ray: RayJobs, console: Console, *,
               dry_run: bool = False, with_upstream: bool = False) -> Submitted:
    """Submit a stage (or a whole pipeline) through the Job Submission API unless its submission
    id exists already. A stage whose upstream is not done is refused, or with ``with_upstream``
    its pipeline up to that stage is submitted instead."""
    if isinstance(what, StageTarget) and what.upstream:
        pending = ray_upstream_pending(what, ray)
        if pending is not None:
            if not with_upstream:
                raise SubmitRefused(pending)
            what = what.pipeline_until_here()
    loaded = what
    sid = ray_submission_id(loaded)
    existing = ray.info(sid)
    if existing is not None:
        state = ray_line(existing)
        console.print(f"Ray job {sid} exists at {ray.address}: {state}; nothing submitted "
                      f"({ray.dashboard(sid)})", markup=False)
        return Submitted("RayJob", ray.address, sid, False, str(existing.status))
    files, spec_file = ray_files(loaded)
    entrypoint = ray_entrypoint(spec_file)
    for root in _relative_roots(loaded):
        console.print(f"note: storage.root {root} is relative: on the cluster it resolves inside "
                      "the job's working directory; use a shared absolute path or an object store",
                      markup=False)
    if dry_run:
        console.print(f"dry run: would submit Ray job {sid} to {ray.address}: {entrypoint} "
                      f"(working_dir with {', '.join(sorted(files))})", markup=False)
        return Submitted("RayJob", ray.address, sid, False, "dry run")
    with tempfile.TemporaryDirectory(prefix="prolong-submit-") as tmp:
        for fname, text in files.items():
            Path(tmp, fname).write_text(text)
        env = {"RAY_USAGE_STATS_ENABLED": "0"}
        meta = _ray_metadata(loaded)
        for key, var in ((PIPELINE_LABEL, "PROLONG_PIPELINE"), (STAGE_LABEL, "PROLONG_STAGE"),
                         (STAGE_ID_LABEL, "PROLONG_STAGE_ID")):
            if key in meta:
                env[var] = meta[key]
        try:
            submit_when_agent_ready(
                lambda: ray.client.submit_job(entrypoint=entrypoint, submission_id=sid,
                                              metadata=meta,
                                              runtime_env={"working_dir": tmp, "env_vars": env}),
                console)
        except Exception as exc:
            again = ray.info(sid) if "already exists" in str(exc) else None
            if again is None:
                raise ClusterError(ray._explain(exc)) from None
            console.print(f"Ray job {sid} exists at {ray.address}: {ray_line(again)}; nothing "
                          "submitted", markup=False)
            return Submitted("RayJob", ray.address, sid, False, str(again.status))
    console.print(f"submitted Ray job {sid} to {ray.address}: {entrypoint} "
                  f"({ray.dashboard(sid)})", markup=False)
    return Submitted("RayJob", ray.address, sid, True, "PENDING")


def wait_ray(ray: RayJobs, sid: str, console: Console, *, interval: float = DEFAULT_INTERVAL,
             timeout: float | None = None) -> bool:
    def look() -> Observation:
        info = ray.info(sid)
        if info is None:
            return Observation({f"Ray job {sid}": "deleted"}, done=True, ok=False, gone=True)
        status = str(info.status)
        done = status in TERMINAL_RAY
        return Observation({f"Ray job {sid}": ray_line(info)}, done=done,
                           ok=status == "SUCCEEDED", completed=int(done), total=1)

    obs = follow(console, f"Ray job {sid}", look, interval=interval, timeout=timeout)
    console.print(f"Ray job {sid} {'succeeded' if obs.ok else 'did not succeed'}", markup=False)
    return obs.ok


def _ray_runs(ray: RayJobs, name: str) -> list[Any]:
    info = ray.info(name)
    if info is not None:
        return [info]
    jobs = ray.call(ray.client.list_jobs)
    runs = [j for j in jobs if (j.metadata or {}).get(PIPELINE_LABEL) == name and j.submission_id]
    if not runs:
        raise UnknownName(f"no Ray job or job named {name} at {ray.address}")
    return sorted(runs, key=lambda j: j.start_time or 0, reverse=True)


def status_ray(ray: RayJobs, name: str, console: Console) -> None:
    for info in _ray_runs(ray, name):
        sid = info.submission_id
        console.print(f"Ray job {sid} at {ray.address}: {ray_line(info)}", markup=False)
        table = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
        table.add_column("key", style="dim")
        table.add_column("value", overflow="fold")
        meta = info.metadata or {}
        rows = [("pipeline", meta.get(PIPELINE_LABEL)), ("stage", meta.get(STAGE_LABEL)),
                ("stage id", meta.get(STAGE_ID_LABEL)),
                ("output", meta.get(DIRECTORY_ANNOTATION)),
                ("entrypoint", info.entrypoint), ("ray job id", info.job_id),
                ("dashboard", ray.dashboard(sid)), ("started", _epoch_ms(info.start_time)),
                ("ended", _epoch_ms(info.end_time))]
        for key, value in rows:
            if value:
                table.add_row(f"  {key}", str(value))
        console.print(table)


def logs_ray(ray: RayJobs, name: str, out: IO[str], *, follow_logs: bool = False) -> None:
    sid = _ray_runs(ray, name)[0].submission_id
    if not follow_logs:
        out.write(ray.call(ray.client.get_job_logs, sid))
        return

    async def tail() -> None:
        async for chunk in ray.client.tail_job_logs(sid):
            out.write(chunk)
            out.flush()

    ray.call(asyncio.run, tail())


def delete_ray(ray: RayJobs, name: str, console: Console, *, timeout: float = 60) -> list[str]:
    deleted = []
    for info in _ray_runs(ray, name):
        sid = info.submission_id
        if str(info.status) not in TERMINAL_RAY:
            ray.call(ray.client.stop_job, sid)
            deadline = time.monotonic() + timeout
            while str(ray.call(ray.client.get_job_status, sid)) not in TERMINAL_RAY:
                if time.monotonic() > deadline:
                    raise ClusterError(f"Ray job {sid} did not stop within {timeout:.0f} s")
                time.sleep(1)
        ray.call(ray.client.delete_job, sid)
        deleted.append(sid)
    console.print(f"stopped and deleted Ray job{'s' if len(deleted) > 1 else ''} "
                  f"{', '.join(deleted)} at {ray.address}", markup=False)
    return deleted


def _epoch_ms(value: int | None) -> str | None:
    if not value:
        return None
    return datetime.datetime.fromtimestamp(value / 1000, tz=datetime.timezone.utc).isoformat(
        timespec="seconds")


class RayBackend(Backend):
    """:class:`Backend` on one Ray cluster's Job Submission API."""

    def __init__(self, ray: RayJobs) -> None:
        self.ray = ray

    def submit(self, what: Submission, console: Console, *, dry_run: bool = False,
               yaml_out: Console | None = None, with_upstream: bool = False) -> Submitted:
        """As :func:`submit_ray`; a Ray dry run has no objects to print, so ``yaml_out`` stays
        unused."""
        return submit_ray(what, self.ray, console, dry_run=dry_run, with_upstream=with_upstream)

    def wait(self, submitted: Submitted, console: Console, *,
             interval: float = DEFAULT_INTERVAL, timeout: float | None = None) -> bool:
        return wait_ray(self.ray, submitted.name, console, interval=interval, timeout=timeout)

    def status(self, name: str, console: Console) -> None:
        status_ray(self.ray, name, console)

    def logs(self, name: str, out: IO[str], *, follow: bool = False) -> None:
        logs_ray(self.ray, name, out, follow_logs=follow)

    def delete(self, name: str, console: Console) -> list[str]:
        return delete_ray(self.ray, name, console)


__all__ = [
    "PIPELINE_FILE", "TERMINAL_RAY", "TOKEN_KEY", "RayBackend", "RayJobs", "TokenSecretError",
    "delete_ray", "logs_ray", "normalise_address", "ray_entrypoint", "ray_files", "ray_line",
    "ray_submission_id", "ray_token", "secret_token", "status_ray", "submit_ray", "wait_ray",
]
