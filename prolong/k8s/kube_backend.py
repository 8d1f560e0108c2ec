"""The Kubernetes API back end of ``prolongctl submit / status / logs / delete``.

The ``kubernetes`` client with $KUBECONFIG, else the pod's service account, else ~/.kube/config.
A job file becomes its [ConfigMap, RayJob] (what ``render`` prints); a pipeline file becomes the
ProLongPipeline custom resource, which the operator runs.

Names are deterministic: a job's RayJob is ``<job name>-<stage id>``, so submitting the same stage
again finds the existing run, reports it and creates nothing. Success is ``jobDeploymentStatus:
Complete`` AND ``jobStatus: SUCCEEDED`` (KubeRay sets Complete on a failed Ray job too):
:func:`prolong.reconcile.observe.rayjob_outcome` decides, as it does for the operator.
"""

from __future__ import annotations

import codecs
import datetime
import json
import os
import time
from collections.abc import Callable
from typing import IO, Any

from rich.console import Console
from rich.table import Table

from prolong.k8s import dump_all
from prolong.k8s.backend import (
    DEFAULT_INTERVAL,
    Backend,
    ClusterError,
    ClusterUnreachable,
    Observation,
    Submission,
    SubmitRefused,
    Submitted,
    UnknownName,
    follow,
)
from prolong.k8s.crd import GROUP, PLURAL, VERSION
from prolong.k8s.kubeconfig import resolve_namespace
from prolong.k8s.kuberay_version import (
    CRD_NAME,
    MINIMUM_KUBERAY,
    STRICT_FIELDS,
    KubeRayMismatch,
    check_crd,
    read_rayjob_crd,
)
from prolong.k8s.preparation import job_outcome
from prolong.k8s.rayjob import (
    DRIVER_LOG_CONTAINER,
    QUEUE_LABEL,
    RAY_GROUP,
    RAY_PLURAL,
    RAY_VERSION,
    SUBMITTER_CONTAINER,
    pipeline_resource,
    render_stage,
)
from prolong.k8s.schemas import check_client_side
from prolong.k8s.target import StageTarget, UpstreamState, refusal, upstream_state
from prolong.reconcile.observe import observe_rayjob
from prolong.spec import SpecError
from prolong.specfile import Loaded, pipeline_from_resource
from prolong.stage.directory import stage_complete
from prolong.stage.identity import pipeline_stages
from prolong.stage.names import (
    DIRECTORY_ANNOTATION,
    PIPELINE_LABEL,
    STAGE_ID_LABEL,
    STAGE_LABEL,
)

HEAD_CONTAINER = "ray-head"
EXISTS = object()
"""What :meth:`Kube.call` answers for a 409 with ``exists_ok``."""
OPERATOR_MARKER = "prolong-operator"
"""The ConfigMap the chart puts into each namespace its operator watches
(charts/templates/operator-marker.yaml): how ``submit`` knows a pipeline will be run."""


def rayjob_line(obj: dict[str, Any]) -> str:
    """One line: outcome, KubeRay's two statuses, the message."""
    rj = observe_rayjob(obj)
    parts = [rj.outcome]
    detail = ", ".join(x for x in (rj.deployment_status and f"deployment {rj.deployment_status}",
                                    rj.job_status and f"job {rj.job_status}") if x)
    if detail:
        parts.append(f"({detail})")
    if rj.message:
        parts.append(f"- {rj.message}")
    return " ".join(parts)


def kube_client() -> Any:
    """The Kubernetes client (prolong.k8s.client), or a ClusterError saying none is configured."""
    # Imported here: kubernetes is heavy and `prolongctl validate` must not load it.
    import kubernetes

    # Imported here: prolong.k8s.client imports kubernetes at its top.
    from prolong.k8s.client import kube_client as configured_client

    try:
        return configured_client()
    except (kubernetes.config.ConfigException, OSError) as exc:
        raise ClusterUnreachable(f"no Kubernetes cluster configured ({exc}); set KUBECONFIG or "
                                 "use --ray-address") from None


def default_namespace() -> str:
    """The namespace kubectl would use without --namespace (prolong.k8s.kubeconfig)."""
    return resolve_namespace(None)[0]


class Kube:
    """The few API calls the commands make, with errors turned into ClusterError."""

    def __init__(self, api: Any, namespace: str) -> None:
        # Imported here: kubernetes is heavy and `prolongctl validate` must not load it.
        from kubernetes.client import BatchV1Api, CoreV1Api, CustomObjectsApi

        self.api = api
        self.namespace = namespace
        self.core = CoreV1Api(api)
        self.batch = BatchV1Api(api)
        self.custom = CustomObjectsApi(api)

    # -- plumbing
    def call(self, what: str, fn: Callable[..., Any], *args: Any, missing_ok: bool = False,
             exists_ok: bool = False, **kwargs: Any) -> Any:
        # Imported here: kubernetes (and its urllib3) is heavy; see __init__.
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, **kwargs)
        except ApiException as exc:
            if exc.status == 404 and missing_ok:
                return None
            if exc.status == 409 and exists_ok:
                return EXISTS
            raise ClusterError(f"{what}: HTTP {exc.status} {exc.reason}: "
                               f"{_api_message(exc)}") from None
        except HTTPError as exc:
            raise ClusterUnreachable(f"{what}: cannot reach the Kubernetes API at "
                               f"{self.api.configuration.host}: {exc}") from None

    def _custom(self, group: str, version: str, plural: str) -> tuple[str, str, str, str]:
        return group, version, self.namespace, plural

    # -- RayJobs
    def get_rayjob(self, name: str) -> dict[str, Any] | None:
        return self.call(f"get RayJob {name}", self.custom.get_namespaced_custom_object,
                         *self._custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL), name, missing_ok=True)

    def rayjobs(self, **labels: str) -> list[dict[str, Any]]:
        """RayJobs with these labels (filtered here too: label selectors are a server's
        courtesy)."""
        selector = ",".join(f"{k}={v}" for k, v in labels.items())
        found = self.call("list RayJobs", self.custom.list_namespaced_custom_object,
                          *self._custom(RAY_GROUP, RAY_VERSION, RAY_PLURAL),
                          label_selector=selector or None, missing_ok=True)
        items = (found or {}).get("items", [])
        return [o for o in items if all(((o.get("metadata") or {}).get("labels") or {}).get(k) == v
                                        for k, v in labels.items())]

    # -- pipelines
    def get_pipeline(self, name: str) -> dict[str, Any] | None:
        return self.call(f"get ProLongPipeline {name}", self.custom.get_namespaced_custom_object,
                         *self._custom(GROUP, VERSION, PLURAL), name, missing_ok=True)

    # -- Jobs (stage preparation)
    def get_job(self, name: str) -> dict[str, Any] | None:
        found = self.call(f"get Job {name}", self.batch.read_namespaced_job, name,
                          self.namespace, missing_ok=True)
        return None if found is None else self.api.sanitize_for_serialization(found)

    def server_dry_run(self) -> bool:
        """Whether the API server does server-side dry runs: it publishes OpenAPI v3 (1.24+;
        dryRun is GA since 1.18) for the groups we write. An emulator that does not is treated
        as not honouring ``dryRun`` either, and the dry run stays on this side."""
        try:
            req = self.api.param_serialize("GET", "/openapi/v3", auth_settings=["BearerToken"])
            resp = self.api.call_api(*req, _request_timeout=10)
            resp.read()
            if resp.status != 200:
                return False
            paths = json.loads(resp.data).get("paths", {})
        except Exception:  # any failure: client-side
            return False
        return "api/v1" in paths and any(p.startswith(f"apis/{RAY_GROUP}/") or
                                         p.startswith(f"apis/{GROUP}/") for p in paths)

    def rayjob_crd(self) -> dict[str, Any] | None:
        """KubeRay's RayJob CRD (None: not installed); Forbidden when this user may not read
        CRDs (cluster-scoped: many namespace users may not)."""
        from kubernetes.client import ApiException

        try:
            return read_rayjob_crd(self.api)
        except ApiException as exc:
            if exc.status == 403:
                raise Forbidden(_api_message(exc)) from None
            return self.call(f"get CRD {CRD_NAME}", _raise, exc)

    def default_local_queue(self) -> bool:
        """Whether Kueue's ``default`` LocalQueue exists here (Kueue then manages every RayJob
        of the namespace, queue label or not); False without Kueue or without read access."""
        from kubernetes.client import ApiException

        try:
            self.custom.get_namespaced_custom_object(*KUEUE_LOCAL_QUEUE[:2], self.namespace,
                                                     KUEUE_LOCAL_QUEUE[2], "default")
        except ApiException:
            return False  # 404: no such queue or no Kueue; 403: not ours to know
        return True

    def create(self, obj: dict[str, Any], *, dry_run: bool = False) -> dict[str, Any] | None:
        """Create one object; None when it exists already (409). Returns what the server
        answered, else (a 200 where the client expects 201 gives no body) the object sent.
        Strict field validation: a field the server's schema lacks is an error (400), never
        silently dropped."""
        kind, name = obj["kind"], obj["metadata"]["name"]
        extra: dict[str, Any] = {"field_validation": STRICT_FIELDS}
        if dry_run:
            extra["dry_run"] = "All"
        if kind == "ConfigMap":
            out = self.call(f"create ConfigMap {name}", self.core.create_namespaced_config_map,
                            self.namespace, obj, exists_ok=True, **extra)
            out = self.api.sanitize_for_serialization(out) if out not in (None, EXISTS) else out
        elif kind == "Job":
            out = self.call(f"create Job {name}", self.batch.create_namespaced_job,
                            self.namespace, obj, exists_ok=True, **extra)
            out = self.api.sanitize_for_serialization(out) if out not in (None, EXISTS) else out
        else:
            group, version = obj["apiVersion"].split("/")
            plural = RAY_PLURAL if kind == "RayJob" else PLURAL
            out = self.call(f"create {kind} {name}", self.custom.create_namespaced_custom_object,
                            group, version, self.namespace, plural, obj, exists_ok=True, **extra)
        if out is EXISTS:
            return None
        return out if isinstance(out, dict) and out else obj


class Forbidden(ClusterError):
    """The API server answered 403 to a read this user may lack the right for."""


KUEUE_LOCAL_QUEUE = ("kueue.x-k8s.io", "v1beta1", "localqueues")
"""Kueue's LocalQueue (v1beta1: served by every Kueue release with RayJob support)."""


def _raise(exc: Exception) -> None:
    raise exc


def preflight(kube: Kube, rayjobs: list[dict[str, Any]], console: Console) -> None:
    """Before anything is created: KubeRay's RayJob CRD must declare every field of these
    RayJobs (:mod:`prolong.k8s.kuberay_version`; an API server would drop the rest silently),
    and an unqueued stage must not land in a namespace where Kueue's ``default`` LocalQueue
    makes Kueue manage it (its webhook refuses a managed RayJob that keeps its cluster).
    SubmitRefused names the first problem; a CRD this user may not read is a warning line
    (the creates' strict field validation still refuses an unknown field)."""
    where = f"cluster {kube.api.configuration.host}"
    try:
        crd = kube.rayjob_crd()
    except Forbidden as exc:
        console.print(f"warning: cannot read CRD {CRD_NAME} ({exc}): KubeRay's version not "
                      f"checked (prolong needs KubeRay >= {MINIMUM_KUBERAY})", markup=False)
    else:
        for rayjob in rayjobs:
            try:
                check_crd(crd, rayjob, where)
            except KubeRayMismatch as exc:
                raise SubmitRefused(str(exc)) from None
    unqueued = [rj for rj in rayjobs if QUEUE_LABEL not in rj["metadata"].get("labels", {})]
    if unqueued and kube.default_local_queue():
        stage = unqueued[0]["metadata"]["labels"].get(STAGE_LABEL, "?")
        raise SubmitRefused(
            f"namespace {kube.namespace} has Kueue's default LocalQueue, so Kueue manages "
            f"stage {stage}'s RayJob, which has no queue and keeps its cluster for the deletion "
            "rules (Kueue refuses that): set spec.cluster.kubernetes.queue (e.g. default)")


def _api_message(exc: Any) -> str:
    try:
        return json.loads(exc.body).get("message") or exc.body
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or "").strip().splitlines()[0] if exc.body else ""


def submit_k8s(what: Submission, kube: Kube, console: Console, *, dry_run: bool = False,
               yaml_out: Console | None = None, with_upstream: bool = False,
               operator_check: bool = True) -> Submitted:
    """Create the objects of a pipeline or a stage unless its run exists already. A stage whose
    upstream stages are not complete is refused (SubmitRefused) before anything is created, or
    with ``with_upstream`` its pipeline is submitted up to that stage. A pipeline is refused
    when no operator watches the namespace (:func:`check_operator`), unless not
    ``operator_check``."""
    if not isinstance(what, StageTarget):
        return _submit_pipeline(what, kube, console, dry_run=dry_run, yaml_out=yaml_out,
                                operator_check=operator_check)
    target = what
    ns = kube.namespace
    configmap, rayjob = target.render(namespace=ns)
    name = rayjob["metadata"]["name"]
    labels = rayjob["metadata"]["labels"]
    existing = kube.get_rayjob(name) or next(iter(kube.rayjobs(**{
        STAGE_ID_LABEL: labels[STAGE_ID_LABEL], PIPELINE_LABEL: labels[PIPELINE_LABEL]})), None)
    if existing is not None:
        where = f"{ns}/{existing['metadata']['name']}"
        state = rayjob_line(existing)
        console.print(f"RayJob {where} exists (stage {labels[STAGE_LABEL]}, id "
                      f"{labels[STAGE_ID_LABEL]}): {state}; nothing created", markup=False)
        return Submitted("RayJob", ns, existing["metadata"]["name"], False, state)
    states = upstream_states(kube, target)
    pending = {n: s for n, s in states.items() if not s.done}
    if pending:
        stage, state = next(iter(pending.items()))
        if not with_upstream:
            raise SubmitRefused(refusal(target, stage, state))
        up = target.upstream[stage]
        console.print(f"stage {stage} of pipeline {up.pipeline} is not complete "
                      f"({state.evidence}): submitting ProLongPipeline {up.pipeline} up to stage "
                      f"{target.ref.stage} instead (--with-upstream)", markup=False)
        return _submit_pipeline(target.pipeline_until_here(), kube, console, dry_run=dry_run,
                                yaml_out=yaml_out, partial=True, operator_check=operator_check)
    for stage, state in states.items():
        console.print(f"upstream stage {stage}: {state.evidence}", markup=False)
    preflight(kube, [rayjob], console)
    prep = target.preparation(namespace=ns)
    objects = [configmap, *([prep] if prep else []), rayjob]
    if dry_run:
        return _dry_run(kube, objects, console, yaml_out)
    # Without a preparation: the RayJob first, then its ConfigMap with the RayJob as owner from
    # birth (no ConfigMap is ever left behind by a refused RayJob; the head pod waits for the
    # ConfigMap to mount, a moment later). With one: the ConfigMap first (the preparation Job
    # mounts it), the Job to completion, and only then the RayJob.
    if prep is not None:  # the GPUs are asked for only once the data and model are ready
        kube.create(configmap)
        prepare_first(kube, prep, console)
    created = kube.create(rayjob)
    if created is None:  # created by someone else a moment ago
        state = rayjob_line(kube.get_rayjob(name) or {})
        console.print(f"RayJob {ns}/{name} exists: {state}; nothing created", markup=False)
        return Submitted("RayJob", ns, name, False, state)
    if prep is None:
        create_owned_configmap(kube, configmap, created)
    # With a preparation, its ConfigMap and Job were created before the RayJob, so they have no
    # owner (no patch is needed or granted): `prolongctl delete` removes them by their labels.
    console.print(f"created ConfigMap {ns}/{configmap['metadata']['name']} and RayJob {ns}/{name} "
                  f"(stage {labels[STAGE_LABEL]}, id {labels[STAGE_ID_LABEL]})", markup=False)
    return Submitted("RayJob", ns, name, True, "submitted", objects)


def create_owned_configmap(kube: Kube, configmap: dict[str, Any], rayjob: dict[str, Any]) -> None:
    """Create the stage's ConfigMap owned by ``rayjob`` (it goes with the RayJob: garbage
    collection). If that fails, the RayJob is deleted again (its head pod would wait for the
    ConfigMap until its deadline, holding the GPUs) and the failure raised."""
    meta = rayjob.get("metadata") or {}
    if not meta.get("uid"):  # the create's answer had no body: read the RayJob back
        meta = (kube.get_rayjob(meta["name"]) or {}).get("metadata") or meta
    if meta.get("uid"):
        configmap = {**configmap, "metadata": {**configmap["metadata"], "ownerReferences": [{
            "apiVersion": f"{RAY_GROUP}/{RAY_VERSION}", "kind": "RayJob", "name": meta["name"],
            "uid": meta["uid"]}]}}
    try:
        kube.create(configmap)
    except ClusterError as exc:
        kube.call(f"delete RayJob {meta['name']}", kube.custom.delete_namespaced_custom_object,
                  RAY_GROUP, RAY_VERSION, kube.namespace, RAY_PLURAL, meta["name"],
                  propagation_policy="Background", missing_ok=True)
        raise ClusterError(f"{exc}; RayJob {kube.namespace}/{meta['name']} deleted again, "
                           "nothing left behind") from None


class PreparationFailed(ClusterError):
    """The stage's preparation Job failed: its RayJob is not created (no GPU is asked for)."""


def prepare_interval() -> float:
    """Seconds between reads of a preparation Job while submit waits for it."""
    return float(os.environ.get("PROLONG_PREPARE_POLL_SECONDS", "5"))


def prepare_first(kube: Kube, prep: dict[str, Any], console: Console) -> None:
    """Create the stage's preparation Job (an existing one is reused: same stage id, same
    inputs) and wait until it completes; PreparationFailed when it fails. Interrupting submit
    leaves the Job running: submitting again waits for the same Job, then creates the RayJob."""
    name = prep["metadata"]["name"]
    where = f"{kube.namespace}/{name}"
    if kube.create(prep) is None:
        console.print(f"preparation Job {where} exists", markup=False)
    else:
        console.print(f"created preparation Job {where} (CPU only: model staging and data "
                      "preparation); the RayJob is created once it completes", markup=False)
    told = False
    while True:
        outcome, why = job_outcome(kube.get_job(name))
        if outcome == "succeeded":
            console.print(f"preparation Job {where} complete", markup=False)
            return
        if outcome == "failed":
            raise PreparationFailed(
                f"preparation Job {where} failed ({why}); RayJob not created, no GPU asked "
                f"for. Its log: kubectl logs -n {kube.namespace} job/{name} --all-containers; "
                "fix the input, delete the Job and submit again")
        if outcome == "absent":
            raise PreparationFailed(f"preparation Job {where} was deleted while submit waited "
                                    "for it; RayJob not created")
        if not told:
            console.print(f"waiting for preparation Job {where} (Ctrl-C leaves it running; "
                          "submit again to continue)", markup=False)
            told = True
        time.sleep(prepare_interval())


def upstream_states(kube: Kube, target: StageTarget) -> dict[str, UpstreamState]:
    """Each upstream stage's state as this cluster and the storage show it: its COMPLETE
    marker, else the RayJobs of its id, else its pipeline's status."""
    states: dict[str, UpstreamState] = {}
    for stage, ref in target.upstream.items():
        if stage_complete(ref.directory):
            states[stage] = upstream_state(ref, marker=True)
            continue
        runs = [observe_rayjob(o) for o in kube.rayjobs(**{PIPELINE_LABEL: ref.pipeline,
                                                            STAGE_ID_LABEL: ref.id})]
        body = None if any(r.outcome == "succeeded" for r in runs) else \
            kube.get_pipeline(ref.pipeline)
        states[stage] = upstream_state(ref, marker=False, rayjobs=runs,
                                       pipeline_status=(body or {}).get("status"))
    return states


def _dry_run(kube: Kube, objects: list[dict[str, Any]], console: Console,
             yaml_out: Console | None) -> Submitted:
    server = kube.server_dry_run()
    if server:
        for obj in objects:
            kube.create(obj, dry_run=True)
        how = "server-side: the API server validated them"
    else:
        how = ("client-side: this API server does not advertise server-side dry runs; "
               f"{check_client_side(objects)}")
    names = ", ".join(f"{o['kind']} {kube.namespace}/{o['metadata']['name']}" for o in objects)
    console.print(f"dry run ({how}); would create {names}", markup=False)
    (yaml_out or console).print(dump_all(objects), markup=False, end="", highlight=False)
    last = objects[-1]
    return Submitted(last["kind"], kube.namespace, last["metadata"]["name"], False, "dry run",
                     objects)


def dry_run_offline(what: Submission, namespace: str, reason: str, console: Console,
                    yaml_out: Console | None = None) -> Submitted:
    """A dry run with no cluster to ask: render, check the objects here
    (:func:`prolong.k8s.schemas.check_client_side`) and say so. Upstream stages are judged by
    their COMPLETE marker alone."""
    if isinstance(what, StageTarget):
        configmap, rayjob = what.render(namespace=namespace)
        prep = what.preparation(namespace=namespace)
        objects = [configmap, *([prep] if prep else []), rayjob]
        for stage, ref in what.upstream.items():
            seen = ("COMPLETE marker found" if stage_complete(ref.directory) else
                    "not checked: no cluster to ask and no COMPLETE marker readable from here")
            console.print(f"upstream stage {stage} (id {ref.id}, {ref.directory}): {seen}",
                          markup=False)
    else:
        objects = [pipeline_resource(what.document, namespace=namespace)]
    how = check_client_side(objects)
    names = ", ".join(f"{o['kind']} {namespace}/{o['metadata']['name']}" for o in objects)
    console.print(f"dry run (client-side, {how}; no cluster reachable: {reason}); would create "
                  f"{names}", markup=False)
    (yaml_out or console).print(dump_all(objects), markup=False, end="", highlight=False)
    last = objects[-1]
    return Submitted(last["kind"], namespace, last["metadata"]["name"], False, "dry run", objects)


def cr_stage_ids(body: dict[str, Any]) -> dict[str, str]:
    """Stage name -> id of a ProLongPipeline as stored in the cluster ({} if unreadable)."""
    try:
        pipeline, jobs = pipeline_from_resource(body)
    except (SpecError, KeyError, TypeError):
        return {}
    return {r.stage: r.id for r in pipeline_stages(pipeline, jobs)}


def merge_patch(old: Any, new: Any) -> Any:
    """The JSON merge patch (RFC 7386) that turns ``old`` into ``new``: removed keys become null,
    lists are replaced whole."""
    if not isinstance(old, dict) or not isinstance(new, dict):
        return new
    patch: dict[str, Any] = {key: None for key in old if key not in new}
    for key, value in new.items():
        if key not in old:
            patch[key] = value
        elif old[key] != value:
            patch[key] = merge_patch(old[key], value)
    return patch


def check_operator(kube: Kube, console: Console) -> None:
    """Refuse (SubmitRefused, one line) a pipeline for a namespace that no operator watches: it
    would sit there with no status. The chart's marker ConfigMap says one does; a user who may
    not read ConfigMaps there gets a warning line instead of a refusal."""
    ns = kube.namespace
    try:
        found = kube.call(f"read ConfigMap {ns}/{OPERATOR_MARKER}",
                          kube.core.read_namespaced_config_map, OPERATOR_MARKER, ns,
                          missing_ok=True, _request_timeout=30)
    except ClusterUnreachable:
        raise
    except ClusterError as exc:  # e.g. 403: this user may not read ConfigMaps here
        console.print(f"warning: cannot tell whether an operator watches namespace {ns} ({exc})",
                      markup=False)
        return
    if found is not None:
        return
    raise SubmitRefused(f"no prolong operator watches namespace {ns} (no ConfigMap "
                        f"{ns}/{OPERATOR_MARKER}, which the chart puts in each namespace its "
                        "operator watches), so the pipeline would never run; nothing created. "
                        "Use -n with a watched namespace, install the chart for this one, or "
                        "pass --no-operator-check")


def _submit_pipeline(loaded: Loaded, kube: Kube, console: Console, *, dry_run: bool,
                     yaml_out: Console | None, partial: bool = False,
                     operator_check: bool = True) -> Submitted:
    """Create the pipeline's custom resource, or update its spec when its stage ids changed.
    ``partial``: ``loaded`` is a pipeline cut after a stage (--with-upstream), which never
    replaces a resource that has other stages (that would drop them)."""
    ns = kube.namespace
    if operator_check:
        check_operator(kube, console)
    cr = pipeline_resource(loaded.document, namespace=ns)
    name = cr["metadata"]["name"]
    ours = {r.stage: r.id for r in pipeline_stages(loaded.document, loaded.jobs)}
    existing = kube.get_pipeline(name)
    if existing is None or cr_stage_ids(existing) != ours:
        # What the operator will create, checked now rather than found Stalled later.
        preflight(kube, [render_stage(loaded.document, loaded.jobs, s, namespace=ns)[1]
                         for s in ours], console)
    if existing is None:
        if dry_run:
            return _dry_run(kube, [cr], console, yaml_out)
        created = kube.create(cr)
        if created is not None:
            console.print(f"created ProLongPipeline {ns}/{name} ({len(ours)} stages: "
                          f"{', '.join(f'{s} {i}' for s, i in ours.items())})", markup=False)
            return Submitted("ProLongPipeline", ns, name, True, "Pending", [cr])
        existing = kube.get_pipeline(name) or {}
    theirs = cr_stage_ids(existing)
    phase = (existing.get("status") or {}).get("phase") or "Pending"
    if partial and theirs != ours:
        if all(theirs.get(s) == i for s, i in ours.items()):
            console.print(f"ProLongPipeline {ns}/{name} exists and runs these stages with the "
                          f"same ids: {phase}; nothing changed", markup=False)
            return Submitted("ProLongPipeline", ns, name, False, phase)
        raise SubmitRefused(f"ProLongPipeline {ns}/{name} exists with other stages or ids; "
                            f"--with-upstream would replace them: submit {loaded.path} itself "
                            "to update it")
    if theirs == ours:
        console.print(f"ProLongPipeline {ns}/{name} exists with the same stage ids: {phase}; "
                      "nothing changed", markup=False)
        return Submitted("ProLongPipeline", ns, name, False, phase)
    changed = [s for s, i in ours.items() if theirs.get(s) != i]
    if dry_run:
        console.print(f"dry run: would update ProLongPipeline {ns}/{name}; stages with new ids "
                      f"(they run again): {', '.join(changed) or 'none'}", markup=False)
        (yaml_out or console).print(dump_all([cr]), markup=False, end="", highlight=False)
        return Submitted("ProLongPipeline", ns, name, False, "dry run", [cr])
    patch = merge_patch({"spec": existing.get("spec") or {}}, {"spec": cr["spec"]})
    kube.call(f"update ProLongPipeline {name}", kube.custom.patch_namespaced_custom_object,
              GROUP, VERSION, ns, PLURAL, name, patch,
              _content_type="application/merge-patch+json")
    how = ("a stage running under an old id runs to its end first" if
           loaded.document.spec.on_spec_change == "wait" else "a stage running under an old id "
           "is stopped")
    console.print(f"updated ProLongPipeline {ns}/{name}; stages with new ids (they run again): "
                  f"{', '.join(changed) or 'none'} (onSpecChange "
                  f"{loaded.document.spec.on_spec_change}: {how})", markup=False)
    return Submitted("ProLongPipeline", ns, name, True, phase, [cr])


def wait_k8s(kube: Kube, sub: Submitted, console: Console, *, interval: float = DEFAULT_INTERVAL,
             timeout: float | None = None) -> bool:
    """Follow a RayJob or a pipeline until it ends; True when it succeeded."""
    where = f"{sub.namespace}/{sub.name}"
    if sub.kind == "RayJob":
        def look() -> Observation:
            obj = kube.get_rayjob(sub.name)
            if obj is None:
                return Observation({f"RayJob {where}": "deleted"}, done=True, ok=False, gone=True)
            outcome = observe_rayjob(obj).outcome
            done = outcome in ("succeeded", "failed")
            return Observation({f"RayJob {where}": rayjob_line(obj)}, done=done,
                               ok=outcome == "succeeded", completed=int(done), total=1)
    else:
        def look() -> Observation:
            body = kube.get_pipeline(sub.name)
            if body is None:
                return Observation({f"pipeline {where}": "deleted"}, done=True, ok=False,
                                   gone=True)
            return _pipeline_observation(body, where)
    obs = follow(console, f"{sub.kind} {where}", look, interval=interval, timeout=timeout)
    verdict = "succeeded" if obs.ok else ("was deleted" if obs.gone else "failed")
    console.print(f"{sub.kind} {where} {verdict}", markup=False)
    return obs.ok


def _pipeline_observation(body: dict[str, Any], where: str) -> Observation:
    status = body.get("status") or {}
    meta = body.get("metadata") or {}
    total = len((body.get("spec") or {}).get("stages") or [])
    phase = status.get("phase") or "Pending"
    generation, observed = meta.get("generation"), status.get("observedGeneration")
    current = generation is None or observed is None or observed >= generation
    stages = status.get("stages") or []
    lines = {f"pipeline {where}": phase if status else "Pending (no status yet: is the operator "
             "running?)"}
    for st in stages:
        text = st.get("phase", "Pending")
        if st.get("rayJob"):
            text += f" (RayJob {st['rayJob']})"
        if st.get("message"):
            text += f" - {st['message']}"
        lines[f"  stage {st.get('name')} {st.get('id') or ''}".rstrip()] = text
    done_stages = sum(1 for st in stages if st.get("phase") in ("Succeeded", "Skipped"))
    # Stalled (kstatus): an invalid spec or spent retries; it will not move without an edit.
    stalled = any(c.get("type") == "Stalled" and c.get("status") == "True"
                  for c in status.get("conditions") or [])
    done = current and (phase in ("Succeeded", "Failed") or stalled)
    return Observation(lines, done=done, ok=done and phase == "Succeeded" and not stalled,
                       completed=done_stages, total=total)


def status_k8s(kube: Kube, name: str, console: Console) -> None:
    """Print a pipeline, a RayJob, or every RayJob of a job name; UnknownName otherwise."""
    body = kube.get_pipeline(name)
    if body is not None:
        _print_pipeline(body, kube.namespace, console,
                        none_yet=None if body.get("status") else _why_no_status(kube))
        return
    obj = kube.get_rayjob(name)
    if obj is not None:
        _print_rayjobs([obj], kube.namespace, console)
        return
    runs = kube.rayjobs(**{PIPELINE_LABEL: name})
    if runs:
        _print_rayjobs(runs, kube.namespace, console)
        return
    raise UnknownName(f"no ProLongPipeline, RayJob or job named {name} in namespace "
                      f"{kube.namespace}")


def _why_no_status(kube: Kube) -> str:
    """Why a pipeline may have no status yet: no operator watches its namespace (no marker), or
    the one that does has not reached it."""
    try:
        check_operator(kube, Console(quiet=True))
    except SubmitRefused:
        return (f"no status yet: no prolong operator watches namespace {kube.namespace} (no "
                f"ConfigMap {kube.namespace}/{OPERATOR_MARKER})")
    return "no status yet: is the operator running?"


def _print_pipeline(body: dict[str, Any], namespace: str, console: Console,
                    none_yet: str | None = None) -> None:
    status = body.get("status") or {}
    name = body["metadata"]["name"]
    head = f"ProLongPipeline {namespace}/{name}: {status.get('phase') or 'Pending'}"
    if status.get("currentStage"):
        head += f" (current stage {status['currentStage']})"
    console.print(head, markup=False)
    if not status:
        console.print(f"  {none_yet or 'no status yet: is the operator running?'}",
                      markup=False)
    ids = cr_stage_ids(body)
    by_name = {st.get("name"): st for st in status.get("stages") or []}
    table = Table(show_edge=False, pad_edge=False)
    for col in ("stage", "id", "phase", "RayJob", "attempts", "KubeRay", "message"):
        table.add_column(col, overflow="fold")
    for stage in ids or by_name:
        st = by_name.get(stage, {})
        table.add_row(stage, st.get("id") or ids.get(stage, "-"), st.get("phase", "Pending"),
                      st.get("rayJob") or "-", str(st.get("attempts", 0)), kuberay_state(st),
                      st.get("message") or "")
    console.print(table)
    for stage, st in by_name.items():  # why a stage before Running waits
        for cond in st.get("clusterConditions") or []:
            if cond.get("status") == "False":
                console.print(f"  {stage}: Ray cluster {cond.get('type')}=False"
                              f"{': ' + cond['reason'] if cond.get('reason') else ''}"
                              f"{' (' + cond['message'] + ')' if cond.get('message') else ''}",
                              markup=False)
        if st.get("nextAttemptTime"):
            console.print(f"  {stage}: next attempt at {st['nextAttemptTime']}", markup=False)
    for stage, st in by_name.items():  # whole lines: URLs are for copying
        if st.get("dashboardURL"):
            console.print(f"  dashboard of {stage}: {_dashboard(st['dashboardURL'])}",
                          markup=False, soft_wrap=True)
    for cond in status.get("conditions") or []:
        # What needs reading: a condition that is not in its good state (Ready and SpecValid
        # True; Stalled and StageFailed False), and Reconciling while it says what is going on.
        good = "False" if cond.get("type") in ("Stalled", "StageFailed", "Reconciling") \
            else "True"
        if cond.get("status") != good:
            console.print(f"  condition {cond.get('type')}={cond.get('status')}: "
                          f"{cond.get('message') or cond.get('reason') or ''}", markup=False)


def kuberay_state(st: dict[str, Any]) -> str:
    """KubeRay's view of a stage's RayJob: deployment/job status (reason), e.g.
    ``Failed (DeadlineExceeded)``."""
    state = "/".join(x for x in (st.get("deploymentStatus"), st.get("jobStatus")) if x)
    if st.get("reason"):
        state += f" ({st['reason']})"
    return state or "-"


def _print_rayjobs(objs: list[dict[str, Any]], namespace: str, console: Console) -> None:
    objs = sorted(objs, key=lambda o: (o.get("metadata") or {}).get("creationTimestamp") or "",
                  reverse=True)
    for obj in objs:
        meta = obj["metadata"]
        labels = meta.get("labels") or {}
        status = obj.get("status") or {}
        console.print(f"RayJob {namespace}/{meta['name']}: {rayjob_line(obj)}", markup=False)
        table = Table(show_header=False, show_edge=False, box=None, pad_edge=False)
        table.add_column("key", style="dim")
        table.add_column("value", overflow="fold")
        rows = [("pipeline", labels.get(PIPELINE_LABEL)), ("stage", labels.get(STAGE_LABEL)),
                ("stage id", labels.get(STAGE_ID_LABEL)),
                ("output", (meta.get("annotations") or {}).get(DIRECTORY_ANNOTATION)),
                ("reason", status.get("reason")),
                ("ray cluster", status.get("rayClusterName")),
                ("cluster state", (status.get("rayClusterStatus") or {}).get("state")),
                *[(f"cluster {c.get('type')}", f"{c.get('status')}"
                   f"{': ' + c['reason'] if c.get('reason') else ''}"
                   f"{' (' + c['message'] + ')' if c.get('message') else ''}")
                  for c in (status.get("rayClusterStatus") or {}).get("conditions") or []
                  if isinstance(c, dict) and c.get("status") != "True"],
                ("ray job id", status.get("jobId")),
                ("dashboard", _dashboard(status.get("dashboardURL"))),
                ("started", status.get("startTime")), ("ended", status.get("endTime"))]
        for key, value in rows:
            if value:
                table.add_row(f"  {key}", str(value))
        console.print(table)


def _dashboard(url: str | None) -> str | None:
    if not url:
        return None
    return url if "://" in url else f"http://{url}"


def _submitter_or_head(kube: Kube, obj: dict[str, Any]) -> tuple[str, str | None]:
    """(pod, container) whose log holds the Ray job's output: KubeRay's submitter Job's pod
    (K8sJobMode: ``ray job submit`` tails the job's logs), else the head pod's driver-log
    container (HTTPMode: it follows the driver's log file), else its head container."""
    name = obj["metadata"]["name"]
    pods = kube.call("list pods", kube.core.list_namespaced_pod, kube.namespace).items

    def labelled(pod: Any, **want: str) -> bool:
        labels = pod.metadata.labels or {}
        return all(labels.get(k) == v for k, v in want.items())

    def newest(found: list[Any]) -> Any:
        return max(found, key=lambda p: p.metadata.creation_timestamp or
                   datetime.datetime.min.replace(tzinfo=datetime.timezone.utc))

    submitters = [p for p in pods if labelled(p, **{"batch.kubernetes.io/job-name": name})
                  or labelled(p, **{"job-name": name})]
    if submitters:
        return newest(submitters).metadata.name, None
    cluster = (obj.get("status") or {}).get("rayClusterName")
    heads = [p for p in pods if cluster and labelled(p, **{"ray.io/cluster": cluster,
                                                           "ray.io/node-type": "head"})]
    if heads:
        pod = newest(heads)
        names = [c.name for c in (pod.spec.containers if pod.spec else [])]
        # HTTPMode: the driver-log container follows the driver; SidecarMode: the submitter.
        return pod.metadata.name, next((c for c in (DRIVER_LOG_CONTAINER, SUBMITTER_CONTAINER,
                                                    HEAD_CONTAINER) if c in names), None)
    raise ClusterError(f"RayJob {kube.namespace}/{name} has no submitter or head pod (yet); "
                       f"state: {rayjob_line(obj)}")


def logs_k8s(kube: Kube, name: str, out: IO[str], *, follow_logs: bool = False) -> None:
    """Write the logs of a RayJob (or a pipeline's current stage, or a job name's latest
    RayJob)."""
    obj = kube.get_rayjob(name)
    if obj is None:
        body = kube.get_pipeline(name)
        if body is not None:
            status = body.get("status") or {}
            stages = {st.get("name"): st for st in status.get("stages") or []}
            current = stages.get(status.get("currentStage")) or {}
            run = current.get("rayJob") or next(
                (st["rayJob"] for st in reversed(list(stages.values())) if st.get("rayJob")), None)
            if run is None:
                raise ClusterError(f"ProLongPipeline {kube.namespace}/{name} has no RayJob yet")
            obj = kube.get_rayjob(run)
            if obj is None:
                raise ClusterError(f"RayJob {kube.namespace}/{run} of pipeline {name} is gone")
        else:
            runs = kube.rayjobs(**{PIPELINE_LABEL: name})
            if not runs:
                raise UnknownName(f"no RayJob, ProLongPipeline or job named {name} in namespace "
                                  f"{kube.namespace}")
            obj = max(runs, key=lambda o: o["metadata"].get("creationTimestamp") or "")
    pod, container = _submitter_or_head(kube, obj)
    extra = {"container": container} if container else {}
    # The raw stream: a log is bytes, whatever content type the server labels it with.
    resp = kube.call(f"logs of pod {pod}", kube.core.read_namespaced_pod_log, pod,
                     kube.namespace, follow=follow_logs or None, _preload_content=False, **extra)
    if resp.status >= 300:
        raise ClusterError(f"logs of pod {kube.namespace}/{pod}: HTTP {resp.status} "
                           f"{resp.data.decode('utf-8', errors='replace')[:300]}")
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    try:
        for chunk in resp.stream(4096):
            out.write(decoder.decode(chunk))
            out.flush()
    finally:
        resp.release_conn()


def delete_k8s(kube: Kube, name: str, console: Console) -> list[str]:
    """Delete a pipeline CR, or a RayJob with its ConfigMap, or every prolongctl RayJob of a job
    name. Operator-managed RayJobs are refused (delete their pipeline)."""
    deleted: list[str] = []
    ns = kube.namespace
    body = kube.get_pipeline(name)
    if body is not None:
        kube.call(f"delete ProLongPipeline {name}", kube.custom.delete_namespaced_custom_object,
                  GROUP, VERSION, ns, PLURAL, name, propagation_policy="Background",
                  missing_ok=True)
        console.print(f"deleted ProLongPipeline {ns}/{name} (its RayJobs and ConfigMaps go with "
                      "it)", markup=False)
        return [f"ProLongPipeline/{name}"]
    obj = kube.get_rayjob(name)
    runs = [obj] if obj is not None else kube.rayjobs(**{PIPELINE_LABEL: name})
    if not runs:
        raise UnknownName(f"no ProLongPipeline, RayJob or job named {name} in namespace {ns}")
    for rj in runs:
        meta = rj["metadata"]
        labels = meta.get("labels") or {}
        owners = [o for o in meta.get("ownerReferences") or ()
                  if o.get("kind") == "ProLongPipeline"]
        if owners:
            raise ClusterError(f"RayJob {ns}/{meta['name']} belongs to ProLongPipeline "
                               f"{owners[0].get('name')} (the operator would run it again): "
                               f"delete the pipeline instead")
        kube.call(f"delete RayJob {meta['name']}", kube.custom.delete_namespaced_custom_object,
                  RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, meta["name"],
                  propagation_policy="Background", missing_ok=True)
        deleted.append(f"RayJob/{meta['name']}")
        if STAGE_ID_LABEL in labels:
            want = {STAGE_ID_LABEL: labels[STAGE_ID_LABEL]}
            if PIPELINE_LABEL in labels:
                want[PIPELINE_LABEL] = labels[PIPELINE_LABEL]
            selector = ",".join(f"{k}={v}" for k, v in want.items())
            cms = kube.call("list ConfigMaps", kube.core.list_namespaced_config_map, ns,
                            label_selector=selector).items
            for cm in cms:
                cm_labels = cm.metadata.labels or {}
                if all(cm_labels.get(k) == v for k, v in want.items()):
                    kube.call(f"delete ConfigMap {cm.metadata.name}",
                              kube.core.delete_namespaced_config_map, cm.metadata.name, ns,
                              missing_ok=True)
                    deleted.append(f"ConfigMap/{cm.metadata.name}")
            # The stage's preparation Job (created before its RayJob: no owner), its pod with it.
            jobs = kube.call("list Jobs", kube.batch.list_namespaced_job, ns,
                             label_selector=selector, missing_ok=True)
            for job in (jobs.items if jobs is not None else []):
                job_labels = job.metadata.labels or {}
                if all(job_labels.get(k) == v for k, v in want.items()):
                    kube.call(f"delete Job {job.metadata.name}", kube.batch.delete_namespaced_job,
                              job.metadata.name, ns, propagation_policy="Background",
                              missing_ok=True)
                    deleted.append(f"Job/{job.metadata.name}")
    console.print(f"deleted in {ns}: {', '.join(deleted)}", markup=False)
    return deleted




class KubeBackend(Backend):
    """:class:`Backend` on the Kubernetes API of one namespace."""

    def __init__(self, kube: Kube, *, operator_check: bool = True) -> None:
        self.kube = kube
        self.operator_check = operator_check

    def submit(self, what: Submission, console: Console, *, dry_run: bool = False,
               yaml_out: Console | None = None, with_upstream: bool = False) -> Submitted:
        return submit_k8s(what, self.kube, console, dry_run=dry_run, yaml_out=yaml_out,
                          with_upstream=with_upstream, operator_check=self.operator_check)

    def wait(self, submitted: Submitted, console: Console, *,
             interval: float = DEFAULT_INTERVAL, timeout: float | None = None) -> bool:
        return wait_k8s(self.kube, submitted, console, interval=interval, timeout=timeout)

    def status(self, name: str, console: Console) -> None:
        status_k8s(self.kube, name, console)

    def logs(self, name: str, out: IO[str], *, follow: bool = False) -> None:
        logs_k8s(self.kube, name, out, follow_logs=follow)

    def delete(self, name: str, console: Console) -> list[str]:
        return delete_k8s(self.kube, name, console)


__all__ = [
    "HEAD_CONTAINER", "OPERATOR_MARKER", "Forbidden", "Kube", "KubeBackend", "check_operator",
    "cr_stage_ids",
    "default_namespace", "delete_k8s", "dry_run_offline", "kube_client", "logs_k8s",
    "merge_patch", "preflight", "rayjob_line", "status_k8s", "submit_k8s", "upstream_states",
    "wait_k8s",
]
