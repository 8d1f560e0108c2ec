"""The ProLongPipeline operator: kopf handlers that run a pipeline's stages as KubeRay RayJobs.

Run it with ``kopf run --standalone --namespace=NS operator/handlers.py`` (``--all-namespaces``
for a cluster-wide install; the chart picks one). This directory has no ``__init__.py`` on
purpose: a package named ``operator`` would shadow the standard library.

Every handler is thin and ends in :func:`reconcile`, which reads the state through the Kubernetes
API (the pipeline, the RayJobs it owns, the stage directories' COMPLETE markers), asks the pure
planner :func:`prolong.reconcile.planner.plan_pipeline` what to do, and applies the plan: create
[ConfigMap, RayJob] pairs rendered by :func:`prolong.k8s.rayjob.render_stage` (owned by the
pipeline, so deleting it deletes them), delete superseded RayJobs, merge-patch the status. It is
idempotent: state is re-read every time, and the status is patched only when it changed.

Under API faults (:data:`API`): every call has a timeout, and 5xx, 429, timeouts and broken
connections are retried in place with backoff (a create whose response was lost is safe to
repeat: names are deterministic). A 409 on create means the name exists: ours (nothing to do),
an orphan of the same run (adopted), or someone else's (the stage waits, NameTaken, with the
reason in its status; never a second RayJob under another name). The status patch carries the
resourceVersion it was planned from; a 409 means the pipeline changed meanwhile: read again, the
same status goes again when only metadata moved, and the plan is made again from the fresh read
when another writer changed the status (:func:`write_status`). What triggers it:

* the pipeline is created, resumed (operator restart) or its spec changes;
* a RayJob the operator manages changes (KubeRay updates its status);
* a timer every ``PROLONG_RESYNC_SECONDS`` (default 60), for what the cluster sends no event for
  (a COMPLETE marker appearing in storage, a retry's backoff running out) and for a missed
  event.

Each status change also posts Kubernetes Events on the pipeline (Normal for progress, Warning
for failures, retries and a stage blocked by a taken name:
:func:`prolong.reconcile.events.transition_events`).

Configuration (environment): ``KUBECONFIG`` (a kubeconfig file; otherwise the pod's service
account, otherwise ~/.kube/config), ``PROLONG_RESYNC_SECONDS``, ``PROLONG_API_TIMEOUT_SECONDS``
(per API call, default 30), ``PROLONG_API_BACKOFF_SECONDS`` (the first retry's wait, default
0.2, doubling).
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kopf
import urllib3
from kubernetes.client import ApiClient, ApiException, BatchV1Api, CoreV1Api, CustomObjectsApi
from pydantic import ValidationError

from prolong.k8s.client import RetryPolicy, kube_client
from prolong.k8s.crd import GROUP, PLURAL, VERSION
from prolong.k8s.kuberay_version import (
    CRD_CACHE,
    CRD_NAME,
    STRICT_FIELDS,
    KubeRayMismatch,
    check_crd,
    read_rayjob_crd,
)
from prolong.k8s.preparation import ROLE as PREPARATION_ROLE
from prolong.k8s.preparation import ROLE_LABEL, job_outcome, needs_preparation, preparation_name
from prolong.k8s.rayjob import (
    RAY_GROUP,
    RAY_PLURAL,
    RAY_VERSION,
    render_stage,
    stage_preparation,
)
from prolong.reconcile.claim import adoption_patch, claim, controlled_by_another
from prolong.reconcile.events import PipelineEvent, invalid_spec_event, transition_events
from prolong.reconcile.observe import (
    FAILURE_ANNOTATION,
    ObservedRayJob,
    observe_rayjob,
    pod_failure,
)
from prolong.reconcile.planner import (
    Plan,
    PlannedRayJob,
    Preparation,
    invalid_spec_status,
    plan_pipeline,
)
from prolong.reconcile.status import PipelineStatus
from prolong.spec import API_VERSION, Job, ProLongPipeline, SpecError
from prolong.specfile import pipeline_from_resource
from prolong.stage.directory import stage_complete
from prolong.stage.identity import pipeline_stages
from prolong.stage.names import ATTEMPT_LABEL, PIPELINE_LABEL, STAGE_ID_LABEL, rayjob_name

MANAGED_BY = "prolong-operator"
RESYNC_SECONDS = float(os.environ.get("PROLONG_RESYNC_SECONDS", "60"))
MERGE_PATCH = "application/merge-patch+json"
RAY_CLUSTER_LABEL = "ray.io/cluster"
"""KubeRay's label on every pod of a Ray cluster (the cluster's name)."""
API = RetryPolicy(timeout=float(os.environ.get("PROLONG_API_TIMEOUT_SECONDS", "30")),
                  first_delay=float(os.environ.get("PROLONG_API_BACKOFF_SECONDS", "0.2")))
"""Every API call of the reconcile: a timeout (a hung connection must not hold a pipeline's
reconcile, and its lock, forever) and transient faults retried with backoff in place, because
kopf does not retry the RayJob event handler."""
FRESH_READS = 5
MAX_CREATE_ATTEMPTS = int(os.environ.get("PROLONG_MAX_CREATE_ATTEMPTS", "3"))
"""Creates of one RayJob the API server may refuse (a 4xx) before the operator stops trying
until the pipeline's spec changes (or the operator restarts)."""
CREATE_RETRY_SECONDS = float(os.environ.get("PROLONG_CREATE_RETRY_SECONDS", "60"))
"""The wait after a refused create before the next try, doubling (a quota may free up, a
missing Secret or a webhook may be fixed); the resync timer's pass finds it due."""
TRANSIENT_4XX = (408, 409, 429)
"""4xx answers that are not the request's fault: a timeout, a conflict, throttling."""
RETRY_DELAY = 10
"""Seconds before kopf runs a create/update/resume handler again after a TemporaryError."""


# ------------------------------------------------------------------------------------------
# Handlers
# ------------------------------------------------------------------------------------------

@kopf.on.startup()
def configure(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    # Progress and diff-base in annotations only: the status belongs to the CRD's schema.
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix="prolong.dev")
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix="prolong.dev", key="last-handled-configuration")
    settings.posting.level = logging.WARNING
    # Serve exactly the namespaces given (--namespace) or all of them (--all-namespaces): no
    # listing of namespaces or CRDs, which the chart's namespaced Role does not grant anyway.
    settings.scanning.disabled = True
    memo.api = kube_client()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """The same cluster as :func:`kube_client`: $KUBECONFIG, else the service account."""
    if os.environ.get("KUBECONFIG"):
        return kopf.login_with_kubeconfig(**kwargs)
    return kopf.login_with_service_account(**kwargs) or kopf.login_via_client(**kwargs)


@kopf.on.create(GROUP, VERSION, PLURAL)
@kopf.on.resume(GROUP, VERSION, PLURAL)
@kopf.on.update(GROUP, VERSION, PLURAL, field="spec")
def pipeline_changed(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger,
                     **_: Any) -> None:
    reconcile(memo.api, namespace, name, logger, post_event)


@kopf.timer(GROUP, VERSION, PLURAL, interval=RESYNC_SECONDS, initial_delay=RESYNC_SECONDS)
def resync(name: str, namespace: str, memo: kopf.Memo, logger: logging.Logger, **_: Any) -> None:
    reconcile(memo.api, namespace, name, logger, post_event)


@kopf.on.event(RAY_GROUP, RAY_VERSION, RAY_PLURAL,
               labels={"app.kubernetes.io/managed-by": MANAGED_BY, PIPELINE_LABEL: kopf.PRESENT})
def rayjob_changed(labels: kopf.Labels, namespace: str, memo: kopf.Memo, logger: logging.Logger,
                   **_: Any) -> None:
    reconcile(memo.api, namespace, labels[PIPELINE_LABEL], logger, post_event)


@kopf.on.event("batch", "v1", "jobs",
               labels={"app.kubernetes.io/managed-by": MANAGED_BY, PIPELINE_LABEL: kopf.PRESENT,
                       ROLE_LABEL: PREPARATION_ROLE})
def preparation_changed(labels: kopf.Labels, namespace: str, memo: kopf.Memo,
                        logger: logging.Logger, **_: Any) -> None:
    """A stage's preparation Job changed (completed: its RayJob can be created now)."""
    reconcile(memo.api, namespace, labels[PIPELINE_LABEL], logger, post_event)


# ------------------------------------------------------------------------------------------
# Reconcile: read, plan, apply
# ------------------------------------------------------------------------------------------

class Stale(Exception):
    """What the plan was made from has changed: a write carrying the resourceVersion it read was
    answered 409, or a create found its name taken or adopted an object. Read and plan again."""


class NameTaken(Stale):
    """A name the plan creates belongs to someone else: plan again with it taken (the stage
    waits, with ``reason`` in its status)."""

    def __init__(self, rayjob: str, reason: str) -> None:
        super().__init__(reason)
        self.rayjob, self.reason = rayjob, reason


class Refused(Exception):
    """The API server refused a create with a 4xx that retrying as it is cannot cure."""


class CreateRefused(Exception):
    """A stage's objects cannot be created: the API server refused them (an admission webhook's
    403, a quota, Pod Security, a 400/422 schema error) or this cluster's KubeRay lacks a field
    of the render. The stage waits with ``reason`` in its status (Stalled, CreateRefused) and
    a Warning Event; :data:`REFUSALS` bounds the retries."""

    def __init__(self, run: PlannedRayJob, body: dict[str, Any], reason: str) -> None:
        super().__init__(reason)
        self.rayjob = run.name
        self.generation = body["metadata"].get("generation")
        self.reason = f"cannot create RayJob {run.name} for stage {run.stage}: {reason}"


class CrdUnreadable(Exception):
    """The operator may not read KubeRay's CRD (no RBAC for it); nothing is checked."""


def server_message(exc: ApiException) -> str:
    """The Status message of an API error (what a webhook or quota says), else its body."""
    try:
        return json.loads(exc.body).get("message") or str(exc.body)
    except (TypeError, ValueError, AttributeError):
        return str(exc.body or exc.reason or "").strip()[:500]


class Refusals:
    """The creates refused per (namespace, pipeline, RayJob), for the spec generation they were
    made from: how many, and when the next try is due. A refused RayJob is retried after
    CREATE_RETRY_SECONDS x 2^(n-1) s (the resync timer's pass finds it due), at most
    MAX_CREATE_ATTEMPTS times; a new generation starts afresh. In memory: a restarted operator
    tries again (its first reconcile re-reads everything else anyway)."""

    def __init__(self) -> None:
        self._seen: dict[tuple[str, str, str], tuple[int | None, int, datetime.datetime, str]] = {}
        self._lock = threading.Lock()

    def record(self, namespace: str, pipeline: str, refused: CreateRefused) -> None:
        key = (namespace, pipeline, refused.rayjob)
        now = datetime.datetime.now(datetime.timezone.utc)
        with self._lock:
            generation, count, _, _ = self._seen.get(key, (refused.generation, 0, now, ""))
            count = count + 1 if generation == refused.generation else 1
            due = now + datetime.timedelta(seconds=CREATE_RETRY_SECONDS * 2 ** (count - 1))
            if count >= MAX_CREATE_ATTEMPTS:
                why = (f"{refused.reason} (refused {count} times; not tried again until the "
                       "pipeline's spec changes)")
            else:
                why = (f"{refused.reason} (attempt {count} of {MAX_CREATE_ATTEMPTS}; next at "
                       f"{due.isoformat(timespec='seconds')})")
            self._seen[key] = (refused.generation, count, due, why)

    def holding(self, namespace: str, pipeline: str, generation: int | None,
                now: datetime.datetime) -> dict[str, str]:
        """RayJob name -> why, for the refused creates not to try now."""
        out = {}
        with self._lock:
            for (ns, name, rayjob), (gen, count, due, why) in list(self._seen.items()):
                if (ns, name) != (namespace, pipeline):
                    continue
                if gen != generation:
                    del self._seen[(ns, name, rayjob)]
                elif count >= MAX_CREATE_ATTEMPTS or now < due:
                    out[rayjob] = why
        return out


REFUSALS = Refusals()


def kuberay_crd(api: ApiClient) -> dict[str, Any] | None:
    """KubeRay's RayJob CRD as the API server serves it (None: no KubeRay), from the process's
    cache (read at most every CRD_CACHE.ttl s); CrdUnreadable without RBAC for it."""
    def read() -> dict[str, Any] | None:
        try:
            return API.call(read_rayjob_crd, api)
        except ApiException as exc:
            if exc.status == 403:
                raise CrdUnreadable(f"read CRD {CRD_NAME}: {server_message(exc)}") from None
            raise kopf.TemporaryError(f"read CRD {CRD_NAME}: HTTP {exc.status} {exc.reason}",
                                      delay=RETRY_DELAY) from exc
    return CRD_CACHE.get(api.configuration.host, read, keep=(CrdUnreadable,))


def reconcile(api: ApiClient, namespace: str, name: str, logger: logging.Logger | None = None,
              post: Callable[[dict[str, Any], PipelineEvent], None] | None = None) -> Plan | None:
    """Bring one pipeline one step forward. Returns the plan applied (None: nothing to plan,
    because the pipeline is gone or its spec is invalid). ``post`` posts a Kubernetes Event on
    the pipeline for each transition (the handlers pass :func:`post_event`).

    API calls ride out transient faults under :data:`API` (timeouts, retries with backoff); a
    :class:`Stale` plan is made again from a fresh read, up to FRESH_READS times (the RayJobs
    it created are found by that read, so nothing is created twice)."""
    log = logger or logging.getLogger(__name__)
    with _serialised(namespace, name):
        taken: dict[str, str] = {}  # RayJob names found taken: not planned again
        for _ in range(FRESH_READS):
            try:
                return _reconcile_once(api, namespace, name, log, post, taken)
            except NameTaken as found:
                log.warning("%s", found.reason)
                taken[found.rayjob] = found.reason
            except CreateRefused as refused:  # planned again: the stage shows the refusal
                log.warning("%s", refused.reason)
                REFUSALS.record(namespace, name, refused)
            except Stale as why:
                log.info("Planning again from a fresh read: %s", why)
        raise kopf.TemporaryError(f"the pipeline changed during each of {FRESH_READS} reads",
                                  delay=RETRY_DELAY)


def _reconcile_once(api: ApiClient, namespace: str, name: str, log: logging.Logger,
                    post: Callable[[dict[str, Any], PipelineEvent], None] | None,
                    taken: dict[str, str]) -> Plan | None:
    body = get_pipeline(api, namespace, name)
    if body is None or body["metadata"].get("deletionTimestamp"):
        return None
    previous = previous_status(body)
    generation = body["metadata"].get("generation")
    now = datetime.datetime.now(datetime.timezone.utc)
    try:
        pipeline, jobs = resolve(body)
    except SpecError as err:
        status = invalid_spec_status(previous, err.one_line(), now=now, generation=generation)
        if status != previous:
            log.warning("Invalid spec: %s", err.one_line())
            write_status(api, body, previous, status)
            if post is not None:
                post(body, invalid_spec_event(err.one_line()))
        return None
    owned, held = pipeline_rayjobs(api, body)
    taken.update(held)
    complete = {r.directory for r in pipeline_stages(pipeline, jobs)
                if stage_complete(r.directory)}
    observed = [fail_on_pods(api, namespace, observe_rayjob(rj), rj, log) for rj in owned]
    plan = plan_pipeline(pipeline, jobs, observed, now=now,
                         complete=complete, previous=previous, generation=generation,
                         taken=taken, refused=REFUSALS.holding(namespace, name, generation, now),
                         preparations=stage_preparations(api, body, pipeline, jobs))
    for rayjob in plan.deletes:
        log.info("Deleting RayJob %s (its stage id is superseded)", rayjob)
        _call(CustomObjectsApi(api).delete_namespaced_custom_object,
              RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, rayjob, ok=(404,))
    for stage in plan.prepares:
        log.info("Creating the preparation Job of stage %s (before its RayJob)", stage)
        create_preparation(api, body, pipeline, jobs, stage)
    for run in plan.creates:
        log.info("Creating RayJob %s (stage %s, attempt %d)", run.name, run.stage, run.attempt)
        create_stage(api, body, pipeline, jobs, run)
    if plan.status != previous:
        write_status(api, body, previous, plan.status)
        if post is not None:
            for event in transition_events(previous, plan.status):
                post(body, event)
    return plan


def fail_on_pods(api: ApiClient, namespace: str, rj: ObservedRayJob, obj: dict[str, Any],
                 log: logging.Logger) -> ObservedRayJob:
    """A RayJob not running yet whose Ray cluster has a pod that cannot start (an image that
    cannot be pulled, a missing Secret: :func:`prolong.reconcile.observe.pod_failure`) fails
    now, not at its pre-running deadline with every GPU held meanwhile: the operator annotates
    it with the reason (the planner then retries or fails the stage) and sets its
    preRunningDeadlineSeconds to 1, so KubeRay fails it too and its deletion rules release the
    cluster. Attempts stay counted from the RayJobs: it is not deleted."""
    cluster = ((obj.get("status") or {}).get("rayClusterName")) or None
    if rj.outcome != "submitted" or cluster is None:
        return rj
    pods = _call(CoreV1Api(api).list_namespaced_pod, namespace,
                 label_selector=f"{RAY_CLUSTER_LABEL}={cluster}", ok=(403, 404))
    if pods is None:  # a Role without pods/list (an older chart): KubeRay's deadline decides
        return rj
    found = [p for p in api.sanitize_for_serialization(pods).get("items", [])
             if ((p.get("metadata") or {}).get("labels") or {}).get(RAY_CLUSTER_LABEL) == cluster]
    failure = pod_failure(found)
    if failure is None:
        return rj
    log.warning("Failing RayJob %s at once: %s", rj.name, failure)
    _call(CustomObjectsApi(api).patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION,
          namespace, RAY_PLURAL, rj.name,
          {"metadata": {"annotations": {FAILURE_ANNOTATION: failure}},
           "spec": {"preRunningDeadlineSeconds": 1}},
          _content_type=MERGE_PATCH, ok=(404,))
    return dataclasses.replace(rj, failure=failure)


def post_event(body: dict[str, Any], event: PipelineEvent) -> None:
    """Post an Event on the pipeline through kopf's poster (it batches and retries; needs kopf's
    context, which every handler has)."""
    kopf.event(body, type=event.type, reason=event.reason, message=event.message)


def resolve(body: dict[str, Any]) -> tuple[ProLongPipeline, dict[str, Job]]:
    """The CR as a validated pipeline and its stage jobs. Raises SpecError."""
    return pipeline_from_resource(body)


def previous_status(body: dict[str, Any]) -> PipelineStatus | None:
    raw = body.get("status")
    if not raw:
        return None
    try:
        return PipelineStatus.model_validate(raw)
    except ValidationError:  # written by someone else: start afresh
        return None


# ------------------------------------------------------------------------------------------
# Kubernetes API edges
# ------------------------------------------------------------------------------------------

def get_pipeline(api: ApiClient, namespace: str, name: str) -> dict[str, Any] | None:
    return _call(CustomObjectsApi(api).get_namespaced_custom_object,
                 GROUP, VERSION, namespace, PLURAL, name, ok=(404,))


def pipeline_rayjobs(api: ApiClient,
                     body: dict[str, Any]) -> tuple[list[dict[str, Any]], dict[str, str]]:
    """The RayJobs this pipeline owns: its label (server-side filter) and, when the pipeline has
    a uid, an ownerReference to it (a same-named pipeline deleted before does not count). Also
    those with its label that another controller holds, by name, with the reason: their names
    are taken."""
    meta = body["metadata"]
    items = _call(CustomObjectsApi(api).list_namespaced_custom_object,
                  RAY_GROUP, RAY_VERSION, meta["namespace"], RAY_PLURAL,
                  label_selector=f"{PIPELINE_LABEL}={meta['name']}")["items"]
    uid = meta.get("uid")
    owned, taken = [], {}
    for obj in items:
        m = obj.get("metadata") or {}
        labels = m.get("labels") or {}
        if labels.get(PIPELINE_LABEL) != meta["name"] or STAGE_ID_LABEL not in labels:
            continue
        owners = {o.get("uid") for o in m.get("ownerReferences") or ()}
        if uid is None or uid in owners:
            owned.append(obj)
        elif (reason := controlled_by_another(obj, uid)) is not None:
            taken[m.get("name", "")] = reason
    return owned, taken


def stage_preparations(api: ApiClient, body: dict[str, Any], pipeline: ProLongPipeline,
                       jobs: dict[str, Job]) -> dict[str, Preparation]:
    """The preparation Job of every stage (of its current id) that has something to prepare,
    as observed (absent when not created yet). One list of the pipeline's Jobs."""
    meta = body["metadata"]
    names = {ref.stage: preparation_name(rayjob_name(jobs[ref.stage].metadata.name, ref.id))
             for ref in pipeline_stages(pipeline, jobs) if needs_preparation(jobs[ref.stage])}
    if not names:
        return {}
    found = _call(BatchV1Api(api).list_namespaced_job, meta["namespace"],
                  label_selector=f"{PIPELINE_LABEL}={meta['name']}")
    items = {j["metadata"]["name"]: j for j in api.sanitize_for_serialization(found)["items"]
             if (j["metadata"].get("labels") or {}).get(PIPELINE_LABEL) == meta["name"]}
    out = {}
    for stage, name in names.items():
        outcome, reason = job_outcome(items.get(name))
        out[stage] = Preparation(name, outcome, reason)
    return out


def create_preparation(api: ApiClient, body: dict[str, Any], pipeline: ProLongPipeline,
                       jobs: dict[str, Job], stage: str) -> None:
    """Create the stage's ConfigMap (its RayJob uses the same one later) and its preparation
    Job, both owned by the pipeline. A Job that exists already (a lost answer, a racing
    reconcile) is the same stage id's: nothing to do."""
    namespace = body["metadata"]["namespace"]
    refs = {r.stage: r for r in pipeline_stages(pipeline, jobs)}
    first = rayjob_name(jobs[stage].metadata.name, refs[stage].id)
    run = PlannedRayJob(stage, refs[stage].id, first, 1)
    create_stage(api, body, pipeline, jobs, run, configmap_only=True)
    job = stage_preparation(pipeline, jobs, stage, namespace=namespace, managed_by=MANAGED_BY)
    job["metadata"]["ownerReferences"] = [owner_reference(body)]
    try:
        _exists_already(BatchV1Api(api).create_namespaced_job, namespace, job)
    except Refused as exc:  # Pod Security, a quota: the stage shows it, as for a RayJob
        raise CreateRefused(run, body, f"its preparation Job {job['metadata']['name']}: "
                                       f"{exc}") from None


def create_stage(api: ApiClient, body: dict[str, Any], pipeline: ProLongPipeline,
                 jobs: dict[str, Job], run: PlannedRayJob, *, configmap_only: bool = False
                 ) -> None:
    """Create the stage's ConfigMap (shared by its attempts and its preparation Job: same stage
    id, same content) and, unless ``configmap_only``, the attempt's RayJob, both owned by the
    pipeline. A 409 means the name exists: fine when it is
    ours (a create whose response was lost, a racing reconcile), adopted when it is an orphan
    of the same run, NameTaken otherwise (:func:`prolong.reconcile.claim.claim`)."""
    namespace = body["metadata"]["namespace"]
    configmap, rayjob = render_stage(pipeline, jobs, run.stage, namespace=namespace,
                                     managed_by=MANAGED_BY, name=run.name)
    owner = owner_reference(body)
    for obj in (configmap, rayjob):
        obj["metadata"]["ownerReferences"] = [owner]
    rayjob["metadata"]["labels"][ATTEMPT_LABEL] = str(run.attempt)
    try:  # before anything is created: can this cluster's KubeRay run it?
        check_crd(kuberay_crd(api), rayjob, f"namespace {namespace}'s cluster")
    except KubeRayMismatch as exc:
        raise CreateRefused(run, body, str(exc)) from None
    except CrdUnreadable as exc:  # no RBAC for it: the strict create still refuses an unknown
        logging.getLogger(__name__).warning("KubeRay's version not checked: %s", exc)
    try:
        _create_stage_objects(api, run, namespace, configmap, rayjob, owner,
                              configmap_only=configmap_only)
    except Refused as exc:
        raise CreateRefused(run, body, str(exc)) from None


def _create_stage_objects(api: ApiClient, run: PlannedRayJob, namespace: str,
                          configmap: dict[str, Any], rayjob: dict[str, Any],
                          owner: dict[str, Any], *, configmap_only: bool = False) -> None:
    core, custom = CoreV1Api(api), CustomObjectsApi(api)
    ray = (RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL)
    if _exists_already(core.create_namespaced_config_map, namespace, configmap):
        cm_name = configmap["metadata"]["name"]
        existing = _call(core.read_namespaced_config_map, cm_name, namespace, ok=(404,))
        _settle(api, run, configmap, existing and api.sanitize_for_serialization(existing),
                owner, lambda patch: _call(core.patch_namespaced_config_map, cm_name, namespace,
                                           patch, _content_type=MERGE_PATCH))
    if configmap_only:
        return
    if _exists_already(custom.create_namespaced_custom_object, *ray, rayjob):
        existing = _call(custom.get_namespaced_custom_object, *ray, run.name, ok=(404,))
        _settle(api, run, rayjob, existing, owner, lambda patch: _call(
            custom.patch_namespaced_custom_object, *ray, run.name, patch,
            _content_type=MERGE_PATCH))


def _settle(api: ApiClient, run: PlannedRayJob, wanted: dict[str, Any],
            existing: dict[str, Any] | None, owner: dict[str, Any],
            patch: Callable[[dict[str, Any]], Any]) -> None:
    """After a create answered 409: nothing to do when the object found is ours; adopt an orphan
    of the same run, then plan again from it; NameTaken when it is someone else's."""
    kind, name = wanted["kind"], wanted["metadata"]["name"]
    if existing is None:  # deleted since the 409: plan again
        raise Stale(f"{kind} {name} answered 409 on create, then 404")
    existing = {"kind": kind, **existing}
    verdict = claim(existing, wanted, owner["uid"] or None)
    if verdict.verdict == "taken":
        raise NameTaken(run.name, f"cannot create RayJob {run.name} for stage {run.stage}: "
                                  f"{verdict.reason}")
    if verdict.verdict == "adopt":
        patch(adoption_patch(existing, owner, MANAGED_BY))
        raise Stale(f"adopted {kind} {name}, an orphan of the same run")


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": "ProLongPipeline", "name": meta["name"],
            "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}


def write_status(api: ApiClient, body: dict[str, Any], base: PipelineStatus | None,
                 status: PipelineStatus) -> None:
    """Write ``status``, planned from ``body`` whose status was ``base``. On a 409 (the pipeline
    changed since it was read) read it again: when its status is ``status`` already, the write
    landed and only its answer was lost; when it is still ``base``, only metadata moved (kopf's
    own annotations, a label) and the same status goes again with the new resourceVersion (each
    write stays one planning pass, so no transition, and no Event, is skipped); when someone
    else changed the status (another operator), Stale: plan again from the fresh state."""
    for _ in range(FRESH_READS):
        try:
            patch_status(api, body, status)
            return
        except Stale:
            meta = body["metadata"]
            fresh = get_pipeline(api, meta["namespace"], meta["name"])
            if fresh is None or previous_status(fresh) == status:
                return
            if previous_status(fresh) != base:
                raise
            body = fresh
    raise kopf.TemporaryError(f"status of {body['metadata']['name']}: {FRESH_READS} conflicts in a "
                              "row", delay=RETRY_DELAY)


def patch_status(api: ApiClient, body: dict[str, Any], status: PipelineStatus) -> None:
    """Merge-patch the status subresource (keys set to null are removed). The patch carries the
    resourceVersion the status was planned from: if the pipeline changed since, the API server
    answers 409 (Stale) instead of a status made from an older state overwriting a newer one."""
    meta = body["metadata"]
    patch: dict[str, Any] = {"status": status.model_dump(mode="json", by_alias=True)}
    if meta.get("resourceVersion"):
        patch["metadata"] = {"resourceVersion": meta["resourceVersion"]}
    _call(CustomObjectsApi(api).patch_namespaced_custom_object_status,
          GROUP, VERSION, meta["namespace"], PLURAL, meta["name"], patch,
          _content_type=MERGE_PATCH, ok=(404,))


def _exists_already(create: Callable[..., Any], *args: Any) -> bool:
    """Create through ``create``; True when the name exists already (409). (Not read from the
    return value: the client returns None for a 200 where it expects 201.)"""
    try:
        _call(create, *args, refuse=True, field_validation=STRICT_FIELDS)
    except Stale:  # a create's 409 is AlreadyExists
        return True
    return False


def _call(fn: Callable[..., Any], *args: Any, ok: tuple[int, ...] = (), refuse: bool = False,
          **kwargs: Any) -> Any:
    """``fn(*args, **kwargs)`` under :data:`API` (timeout, transient faults retried with
    backoff). None on an HTTP status in ``ok``; 409 Conflict raises Stale; with ``refuse``
    (creates), any other 4xx but a timeout or throttling raises Refused with the server's
    message (retrying it as it is cannot help); whatever else fails becomes
    kopf.TemporaryError (kopf retries the create/update/resume handlers; the resync timer
    catches up on a RayJob event whose reconcile failed)."""
    try:
        return API.call(fn, *args, **kwargs)
    except ApiException as exc:
        if exc.status in ok:
            return None
        if exc.status == 409:
            raise Stale(f"{fn.__name__}: HTTP 409 {exc.reason}") from exc
        if refuse and exc.status is not None and 400 <= exc.status < 500 and \
                exc.status not in TRANSIENT_4XX:
            raise Refused(f"HTTP {exc.status} {exc.reason}: {server_message(exc)}") from exc
        raise kopf.TemporaryError(f"{fn.__name__}: HTTP {exc.status} {exc.reason}",
                                  delay=RETRY_DELAY) from exc
    except urllib3.exceptions.HTTPError as exc:  # timed out, or no answer, after the retries
        raise kopf.TemporaryError(f"{fn.__name__}: {exc}", delay=RETRY_DELAY) from exc


_locks: dict[tuple[str, str], threading.Lock] = {}
_locks_guard = threading.Lock()


@contextmanager
def _serialised(namespace: str, name: str) -> Iterator[None]:
    """One reconcile per pipeline at a time (kopf runs sync handlers in a thread pool, and a
    pipeline event, a RayJob event and the timer may arrive together)."""
    with _locks_guard:
        lock = _locks.setdefault((namespace, name), threading.Lock())
    with lock:
        yield
