"""The ProLongPipeline operator: kopf handlers that run a pipeline's stages as KubeRay RayJobs.

Run it with ``kopf run --standalone --namespace=NS operator/handlers.py`` (``--all-namespaces``
for a cluster-wide install; the chart picks one). This directory has no ``__init__.py`` on
purpose: a package named ``operator`` would shadow the standard library.

Every handler is thin and ends in :func:`reconcile`, which reads the state through the Kubernetes
API (the pipeline, the RayJobs it owns, the stage directories' COMPLETE markers), asks the pure
planner :func:`prolong.reconcile.planner.plan_pipeline` what to do, and applies the plan: create
[ConfigMap, RayJob] pairs rendered by :func:`prolong.k8s.rayjob.render_stage` (owned by the
pipeline, so deleting it deletes them), delete superseded RayJobs, merge-patch the status. It is
idempotent: state is re-read every time, a 409 on create means "already exists", and the status
is patched only when it changed. What triggers it:

* the pipeline is created, resumed (operator restart) or its spec changes;
* a RayJob the operator manages changes (KubeRay updates its status);
* a timer every ``PROLONG_RESYNC_SECONDS`` (default 60), for what the cluster sends no event for
  (a COMPLETE marker appearing in storage, a retry's backoff running out) and for a missed
  event.

Each status change also posts Kubernetes Events on the pipeline (Normal for progress, Warning
for failures and retries: :func:`prolong.reconcile.events.transition_events`).

Configuration (environment): ``KUBECONFIG`` (a kubeconfig file; otherwise the pod's service
account, otherwise ~/.kube/config), ``PROLONG_RESYNC_SECONDS``.
"""

from __future__ import annotations

import datetime
import logging
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import kopf
from kubernetes.client import ApiClient, ApiException, CoreV1Api, CustomObjectsApi
from pydantic import ValidationError

from prolong.k8s.client import kube_client
from prolong.k8s.crd import GROUP, PLURAL, VERSION
from prolong.k8s.rayjob import RAY_GROUP, RAY_PLURAL, RAY_VERSION, render_stage
from prolong.reconcile.events import PipelineEvent, invalid_spec_event, transition_events
from prolong.reconcile.observe import observe_rayjob
from prolong.reconcile.planner import Plan, PlannedRayJob, invalid_spec_status, plan_pipeline
from prolong.reconcile.status import PipelineStatus
from prolong.spec import API_VERSION, Job, ProLongPipeline, SpecError
from prolong.specfile import pipeline_from_resource
from prolong.stage.directory import stage_complete
from prolong.stage.identity import pipeline_stages
from prolong.stage.names import ATTEMPT_LABEL, PIPELINE_LABEL, STAGE_ID_LABEL

MANAGED_BY = "prolong-operator"
RESYNC_SECONDS = float(os.environ.get("PROLONG_RESYNC_SECONDS", "60"))
MERGE_PATCH = "application/merge-patch+json"


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


# ------------------------------------------------------------------------------------------
# Reconcile: read, plan, apply
# ------------------------------------------------------------------------------------------

def reconcile(api: ApiClient, namespace: str, name: str, logger: logging.Logger | None = None,
              post: Callable[[dict[str, Any], PipelineEvent], None] | None = None) -> Plan | None:
    """Bring one pipeline one step forward. Returns the plan applied (None: nothing to plan,
    because the pipeline is gone or its spec is invalid). ``post`` posts a Kubernetes Event on
    the pipeline for each transition (the handlers pass :func:`post_event`)."""
    log = logger or logging.getLogger(__name__)
    with _serialised(namespace, name):
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
                patch_status(api, namespace, name, status)
                if post is not None:
                    post(body, invalid_spec_event(err.one_line()))
            return None
        owned = owned_rayjobs(api, body)
        complete = {r.directory for r in pipeline_stages(pipeline, jobs)
                    if stage_complete(r.directory)}
        plan = plan_pipeline(pipeline, jobs, [observe_rayjob(rj) for rj in owned], now=now,
                             complete=complete, previous=previous, generation=generation)
        for rayjob in plan.deletes:
            log.info("Deleting RayJob %s (its stage id is superseded)", rayjob)
            _ignore(404)(CustomObjectsApi(api).delete_namespaced_custom_object)(
                RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, rayjob)
        for run in plan.creates:
            log.info("Creating RayJob %s (stage %s, attempt %d)", run.name, run.stage, run.attempt)
            create_stage(api, body, pipeline, jobs, run)
        if plan.status != previous:
            patch_status(api, namespace, name, plan.status)
            if post is not None:
                for event in transition_events(previous, plan.status):
                    post(body, event)
        return plan


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
    return _ignore(404)(CustomObjectsApi(api).get_namespaced_custom_object)(
        GROUP, VERSION, namespace, PLURAL, name)


def owned_rayjobs(api: ApiClient, body: dict[str, Any]) -> list[dict[str, Any]]:
    """RayJobs of this pipeline: its label (server-side filter) and, when the pipeline has a uid,
    an ownerReference to it (a same-named pipeline deleted before does not count)."""
    meta = body["metadata"]
    items = CustomObjectsApi(api).list_namespaced_custom_object(
        RAY_GROUP, RAY_VERSION, meta["namespace"], RAY_PLURAL,
        label_selector=f"{PIPELINE_LABEL}={meta['name']}")["items"]
    uid = meta.get("uid")

    def ours(obj: dict[str, Any]) -> bool:
        m = obj.get("metadata") or {}
        labels = m.get("labels") or {}
        owners = {o.get("uid") for o in m.get("ownerReferences") or ()}
        return (labels.get(PIPELINE_LABEL) == meta["name"] and STAGE_ID_LABEL in labels
                and (uid is None or uid in owners))

    return [obj for obj in items if ours(obj)]


def create_stage(api: ApiClient, body: dict[str, Any], pipeline: ProLongPipeline,
                 jobs: dict[str, Job], run: PlannedRayJob) -> None:
    """Create the stage's ConfigMap (shared by its attempts: same stage id, same content) and the
    attempt's RayJob, both owned by the pipeline. 409 means it exists already: fine."""
    namespace = body["metadata"]["namespace"]
    configmap, rayjob = render_stage(pipeline, jobs, run.stage, namespace=namespace,
                                     managed_by=MANAGED_BY, name=run.name)
    owner = owner_reference(body)
    for obj in (configmap, rayjob):
        obj["metadata"]["ownerReferences"] = [owner]
    rayjob["metadata"]["labels"][ATTEMPT_LABEL] = str(run.attempt)
    _ignore(409)(CoreV1Api(api).create_namespaced_config_map)(namespace, configmap)
    _ignore(409)(CustomObjectsApi(api).create_namespaced_custom_object)(
        RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, rayjob)


def owner_reference(body: dict[str, Any]) -> dict[str, Any]:
    meta = body["metadata"]
    return {"apiVersion": API_VERSION, "kind": "ProLongPipeline", "name": meta["name"],
            "uid": meta.get("uid", ""), "controller": True, "blockOwnerDeletion": True}


def patch_status(api: ApiClient, namespace: str, name: str, status: PipelineStatus) -> None:
    """Merge-patch the status subresource (keys set to null are removed)."""
    _ignore(404)(CustomObjectsApi(api).patch_namespaced_custom_object_status)(
        GROUP, VERSION, namespace, PLURAL, name,
        {"status": status.model_dump(mode="json", by_alias=True)}, _content_type=MERGE_PATCH)


def _ignore(code: int):
    """Call through, returning None on an ApiException with this HTTP status; other API errors
    become kopf.TemporaryError (kopf retries the handler later)."""
    def wrap(fn):
        def call(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except ApiException as exc:
                if exc.status == code:
                    return None
                raise kopf.TemporaryError(f"{fn.__name__}: HTTP {exc.status} {exc.reason}",
                                          delay=10) from exc
        return call
    return wrap


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
