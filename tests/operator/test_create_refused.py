"""Permanent failures fail fast (issue 20, item 5): a create the API server refuses with a 4xx
(an admission webhook's 403, a quota, Pod Security, a 400/422 schema error) and a cluster whose
KubeRay lacks a field of the render leave the stage Pending with the server's message, the
pipeline Stalled (CreateRefused) and a Warning Event, and are tried a bounded number of times,
not retried forever as a kopf TemporaryError that never reaches the status.

The handlers' reconcile runs directly (as in test_api_faults' two-operator test) against the
kmock API server over HTTP; the API server's refusals are injected faults with a real server's
words."""

from __future__ import annotations

import asyncio
import copy

import kmock
import pytest

from tests.conftest import serve_kuberay_crd
from tests.operator.apiserver import OPERATOR_CLIENT, Fault, request_of
from tests.operator.conftest import (
    CONFIGMAPS,
    NAMESPACE,
    RAYJOBS,
    Cluster,
    load_handlers,
    pipeline_cr,
    rayjob_for,
)

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
CREATE_RAYJOB = request_of(OPERATOR_CLIENT, kmock.action.CREATE, RAYJOBS)
REFUSALS = {
    "webhook": (403, 'admission webhook "vrayjob.kb.io" denied the request: '
                     'spec.shutdownAfterJobFinishes: Invalid value: false: a kueue managed job '
                     'should delete the cluster after finishing'),
    "quota": (403, 'rayjobs.ray.io "x" is forbidden: exceeded quota: gpu-quota, requested: '
                   'requests.nvidia.com/gpu=8, used: requests.nvidia.com/gpu=64, limited: '
                   'requests.nvidia.com/gpu=64'),
    "schema": (422, 'RayJob.ray.io "x" is invalid: spec.backoffLimit: Invalid value: -1'),
    "strict": (400, '.spec.rayClusterSpec.authOptions.secretName: field not declared in schema'),
}


@pytest.fixture
def handlers(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setenv("PROLONG_CREATE_RETRY_SECONDS", "1")  # read when the handlers load
    monkeypatch.setenv("PROLONG_MAX_CREATE_ATTEMPTS", "2")
    return load_handlers()


async def reconcile(handlers, cluster: Cluster, name: str, events: list) -> None:
    await asyncio.to_thread(handlers.reconcile, handlers.kube_client(), NAMESPACE, name, None,
                            lambda body, event: events.append(event))


async def through_preparation(handlers, cluster: Cluster, name: str, events: list) -> None:
    """Stage 1's preparation Job created by a first reconcile and completed by the test's Job
    controller: the next reconcile creates its RayJob (what these tests are about)."""
    await reconcile(handlers, cluster, name, events)
    await cluster.wait("stage 1 prepared", lambda: any(
        j.get("status") for j in cluster.jobs().values()))
    events.clear()


def creates(cluster: Cluster, resource: kmock.resource) -> int:
    return sum(1 for r in cluster.kmock if r.action == kmock.action.CREATE
               and r.resource == resource
               and r.headers.get("User-Agent", "").startswith(OPERATOR_CLIENT))


def stalled(status: dict) -> dict:
    return next(c for c in status["conditions"] if c["type"] == "Stalled")


@pytest.mark.parametrize("kind", list(REFUSALS))
async def test_a_refused_create_stalls_with_the_servers_message_and_is_retried_a_bounded_number_of_times(
        kind: str, cluster: Cluster, handlers) -> None:
    status_code, message = REFUSALS[kind]
    cr = pipeline_cr("jobs/quickstart/pipeline.yaml")
    name = cr["metadata"]["name"]
    refusal = cluster.kmock.inject(Fault(CREATE_RAYJOB, "reject", status=status_code, times=None,
                                         message=message))
    await cluster.create_pipeline(cr)
    events: list = []
    await through_preparation(handlers, cluster, name, events)
    await reconcile(handlers, cluster, name, events)
    status = cluster.status(name)
    stage1 = status["stages"][0]
    assert stage1["phase"] == "Pending" and message in stage1["message"]
    assert f"HTTP {status_code}" in stage1["message"] and "attempt 1 of 2" in stage1["message"]
    cond = stalled(status)
    assert cond["status"] == "True" and cond["reason"] == "CreateRefused"
    assert message in cond["message"]
    assert status["phase"] == "Pending"
    (event,) = [e for e in events if e.type == "Warning"]
    assert event.reason == "StageBlocked" and message in event.message
    assert creates(cluster, RAYJOBS) == 1
    if kind != "webhook":
        return  # the same path from here on: the retries once, below

    await reconcile(handlers, cluster, name, events)  # before the retry is due: not tried
    assert creates(cluster, RAYJOBS) == 1
    await asyncio.sleep(1.05)
    await reconcile(handlers, cluster, name, events)  # due: the second and last try
    assert creates(cluster, RAYJOBS) == 2
    assert "not tried again until the pipeline's spec changes" in \
        cluster.status(name)["stages"][0]["message"]
    await asyncio.sleep(2.1)  # past when a third would be due
    await reconcile(handlers, cluster, name, events)
    assert creates(cluster, RAYJOBS) == 2  # bounded
    assert refusal.hits == 2

    # The cause fixed and the spec edited (a new generation): tried again, and it runs.
    cluster.kmock.faults.remove(refusal)
    edited = copy.deepcopy(cr)
    edited["spec"]["maxStageRetries"] = cr["spec"].get("maxStageRetries", 2) + 1
    await cluster.edit_pipeline(name, edited["spec"], generation=2)
    await reconcile(handlers, cluster, name, events)
    assert rayjob_for(cr, "stage1") in cluster.rayjobs()
    assert stalled(cluster.status(name))["status"] == "False"


@pytest.mark.parametrize("tag", ["v1.5.1", None])
async def test_the_operator_creates_nothing_where_kuberay_lacks_a_rendered_field(
        tag: str | None, cluster: Cluster, handlers) -> None:
    serve_kuberay_crd(cluster.kmock, tag, priority=1)
    cr = pipeline_cr("jobs/quickstart/pipeline.yaml")
    name = cr["metadata"]["name"]
    await cluster.create_pipeline(cr)
    events: list = []
    await reconcile(handlers, cluster, name, events)
    assert creates(cluster, RAYJOBS) == creates(cluster, CONFIGMAPS) == 0
    status = cluster.status(name)
    cond = stalled(status)
    assert cond["reason"] == "CreateRefused" and "KubeRay >= 1.6" in cond["message"]
    want = "spec.preRunningDeadlineSeconds" if tag else "no CRD rayjobs.ray.io"
    assert want in cond["message"] and want in status["stages"][0]["message"]
    assert any(e.type == "Warning" and want in e.message for e in events)


# ---- a pod that cannot start fails the attempt at once ------------------------------------------

PODS = kmock.resource("v1/pods")


def container_status(name: str, state: dict) -> dict:
    """A container's status as the API server reports it (the fields it always sends)."""
    return {"name": name, "state": state, "image": "x", "imageID": "", "ready": False,
            "restartCount": 0}


@pytest.mark.parametrize(("reason", "message"), [
    ("ImagePullBackOff", 'Back-off pulling image "ghcr.io/prolong-dev/prolong-train:0.1.0"'),
    ("CreateContainerConfigError", 'secret "hf-token" not found')])
async def test_a_pod_that_cannot_start_fails_the_attempt_at_once(
        reason: str, message: str, cluster: Cluster, handlers) -> None:
    cr = pipeline_cr("jobs/quickstart/pipeline.yaml")
    name = cr["metadata"]["name"]
    rayjob = rayjob_for(cr, "stage1")
    await cluster.create_pipeline(cr)
    events: list = []
    await through_preparation(handlers, cluster, name, events)
    await reconcile(handlers, cluster, name, events)
    await cluster.set_rayjob_status(rayjob, {"jobDeploymentStatus": "Initializing",
                                             "rayClusterName": f"{rayjob}-rc"})
    healthy = container_status("ray-head", {"running": {}})
    for pod, state in ((f"{rayjob}-rc-head", healthy),
                       (f"{rayjob}-rc-cpu-workers-0", container_status("ray-worker", {
                           "waiting": {"reason": reason, "message": message}}))):
        await cluster.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
            "name": pod, "namespace": NAMESPACE, "labels": {"ray.io/cluster": f"{rayjob}-rc"}},
            "spec": {"containers": [{"name": state["name"], "image": "x"}]},
            "status": {"containerStatuses": [state]}})
    await reconcile(handlers, cluster, name, events)

    stored = cluster.rayjobs()[rayjob]
    want = f"pod {rayjob}-rc-cpu-workers-0 container ray-worker: {reason}: {message}"
    assert stored["metadata"]["annotations"]["prolong.dev/attempt-failed"] == want
    assert stored["spec"]["preRunningDeadlineSeconds"] == 1  # KubeRay fails it and releases
    stage1 = cluster.status(name)["stages"][0]
    # The quickstart allows no retry: the stage fails now (with retries left: Retrying).
    assert stage1["phase"] == "Failed" and want in stage1["message"]
    assert any(e.type == "Warning" and e.reason == "StageFailed" and reason in e.message
               for e in events)


async def test_a_pod_still_pulling_is_left_alone(cluster: Cluster, handlers) -> None:
    cr = pipeline_cr("jobs/quickstart/pipeline.yaml")
    name, rayjob = cr["metadata"]["name"], rayjob_for(cr, "stage1")
    await cluster.create_pipeline(cr)
    events: list = []
    await through_preparation(handlers, cluster, name, events)
    await reconcile(handlers, cluster, name, events)
    await cluster.set_rayjob_status(rayjob, {"jobDeploymentStatus": "Initializing",
                                             "rayClusterName": f"{rayjob}-rc"})
    await cluster.create(PODS, {"apiVersion": "v1", "kind": "Pod", "metadata": {
        "name": f"{rayjob}-rc-head", "namespace": NAMESPACE,
        "labels": {"ray.io/cluster": f"{rayjob}-rc"}},
        "spec": {"containers": [{"name": "ray-head", "image": "x"}]},
        "status": {"containerStatuses": [container_status("ray-head", {
            "waiting": {"reason": "ContainerCreating"}})]}})
    await reconcile(handlers, cluster, name, events)
    assert "annotations" not in cluster.rayjobs()[rayjob]["metadata"] or \
        "prolong.dev/attempt-failed" not in cluster.rayjobs()[rayjob]["metadata"]["annotations"]
    assert cluster.status(name)["stages"][0]["phase"] == "Submitted"
