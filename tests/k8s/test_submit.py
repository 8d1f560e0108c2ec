"""prolongctl submit / status / logs / delete on the Kubernetes path, over HTTP against kmock.

The CLI's real ``kubernetes`` client talks to kmock's emulator through a kubeconfig named by
$KUBECONFIG (nothing is monkeypatched). The client is synchronous, so each CLI call runs in a
thread while the event loop serves kmock; the tests play KubeRay and the operator by patching
statuses over the same HTTP API (see tests/operator/conftest.py).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml
from rich.console import Console
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.backend import UnknownName
from prolong.k8s.kube_backend import OPERATOR_MARKER, KubeBackend
from prolong.k8s.rayjob import pipeline_resource, render_standalone
from prolong.k8s.submit import open_backend
from prolong.specfile import dump_yaml, load
from prolong.stage.identity import pipeline_stages
from tests.conftest import (
    KUBERAY_CRD_PATH,
    job_dict,
    on_volume,
    quickstart_on_volume,
    serve_kuberay_crd,
    use_kmock_kubeconfig,
)
from tests.operator.apiserver import in_background
from tests.operator.conftest import BATCH_JOBS, CONFIGMAPS, NAMESPACE, PIPELINES, RAYJOBS, Cluster

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
PODS = kmock.resource("v1/pods")
runner = CliRunner()


class Api(Cluster):
    def creates(self, resource: kmock.resource) -> int:
        return sum(1 for r in self.kmock if r.action == kmock.action.CREATE
                   and r.resource == resource)

    def configmaps(self) -> dict[str, dict]:
        """The stages' ConfigMaps (the operator's marker left out)."""
        return {k: v for k, v in super().configmaps().items() if k != OPERATOR_MARKER}

    async def set_pipeline_status(self, name: str, status: dict) -> None:
        await self._send("PATCH", self._path(PIPELINES, name, "status"), {"status": status})


@pytest_asyncio.fixture
async def api(kmock: kmock.KubernetesEmulator, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    info = kmock.ResourceInfo
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    kmock.resources[PIPELINES] = info(namespaced=True, kind="ProLongPipeline",
                                      singular="prolongpipeline", subresources={"status"},
                                      verbs=verbs)
    kmock.resources[RAYJOBS] = info(namespaced=True, kind="RayJob", singular="rayjob",
                                    subresources={"status"}, verbs=verbs)
    kmock.resources[CONFIGMAPS] = info(namespaced=True, kind="ConfigMap", verbs=verbs)
    kmock.resources[PODS] = info(namespaced=True, kind="Pod", subresources={"log"},
                                 verbs={"get", "list"})
    # The chart's marker: an operator watches this namespace (tests/k8s/test_namespace.py
    # covers a namespace without one).
    kmock.objects[CONFIGMAPS, NAMESPACE, OPERATOR_MARKER] = {
        "apiVersion": "v1", "kind": "ConfigMap",
        "metadata": {"name": OPERATOR_MARKER, "namespace": NAMESPACE}}
    serve_kuberay_crd(kmock)  # KubeRay 1.7 installed (tests that want another serve theirs)
    kmock.resources[BATCH_JOBS] = info(namespaced=True, kind="Job", subresources={"status"},
                                 verbs=verbs)
    url = str(kmock.url).rstrip("/")
    use_kmock_kubeconfig(url, tmp_path, NAMESPACE, monkeypatch)
    # submit reads a stage's preparation Job until it ends; the test's Job controller ends it.
    monkeypatch.setenv("PROLONG_PREPARE_POLL_SECONDS", "0.05")
    async with aiohttp.ClientSession(base_url=url,
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        api = Api(kmock, session)
        async with in_background(api.run_job_controller()):
            yield api


async def cli(*args: str):
    """prolongctl in a thread (its client blocks; kmock answers from this event loop)."""
    return await asyncio.to_thread(runner.invoke, app, list(args))


def stage_file(tmp_path: Path, steps: int = 30) -> Path:
    job = on_volume(job_dict("quickstart/stage1.yaml"), tmp_path / "runs")
    job["spec"]["steps"] = steps
    path = tmp_path / f"stage1-{steps}.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def expected(path: Path) -> tuple[dict, dict]:
    configmap, rayjob = render_standalone(load(path).document, namespace=NAMESPACE)
    return configmap, rayjob


async def test_submit_creates_configmap_and_rayjob_once(api: Api, tmp_path: Path) -> None:
    path = stage_file(tmp_path)
    configmap, rayjob = expected(path)
    name = rayjob["metadata"]["name"]

    first = await cli("submit", str(path))
    assert first.exit_code == 0, first.output
    assert f"RayJob {NAMESPACE}/{name}" in first.stderr
    stored = api.rayjobs()[name]
    assert stored["spec"] == rayjob["spec"] and stored["metadata"]["labels"] == \
        rayjob["metadata"]["labels"]
    assert api.configmaps()[f"{name}-spec"]["data"] == configmap["data"]

    again = await cli("submit", str(path))
    assert again.exit_code == 0, again.output
    assert f"RayJob {NAMESPACE}/{name} exists" in again.stderr
    assert "submitted" in again.stderr and "nothing created" in again.stderr
    assert api.creates(RAYJOBS) == 1 and api.creates(CONFIGMAPS) == 1

    # The state it reports is KubeRay's.
    await api.set_rayjob(name, "Running", "RUNNING")
    third = await cli("submit", str(path))
    assert "running (deployment Running, job RUNNING)" in third.stderr
    assert api.creates(RAYJOBS) == 1


async def test_dry_run_creates_nothing(api: Api, tmp_path: Path) -> None:
    path = stage_file(tmp_path)
    _, rayjob = expected(path)
    result = await cli("submit", str(path), "--dry-run", "-n", NAMESPACE)
    assert result.exit_code == 0, result.output
    assert "client-side" in result.stderr and f"RayJob {NAMESPACE}/" in result.stderr
    objs = list(yaml.safe_load_all(result.stdout))
    assert [o["kind"] for o in objs] == ["ConfigMap", "Job", "RayJob"]
    assert objs[2]["metadata"]["name"] == rayjob["metadata"]["name"]
    assert api.creates(RAYJOBS) == 0 and api.creates(CONFIGMAPS) == 0
    assert not api.rayjobs() and not api.configmaps()


def quickstart(tmp_path: Path) -> Path:
    return quickstart_on_volume(tmp_path / "quickstart", tmp_path / "runs")


def inline_pipeline(tmp_path: Path, *, stage2_steps: int | None = None) -> Path:
    """The quickstart pipeline with its stages inline (optionally stage 2 edited)."""
    doc = yaml.safe_load(dump_yaml(load(quickstart(tmp_path) / "pipeline.yaml").document))
    if stage2_steps is not None:
        (stage2,) = [s for s in doc["spec"]["stages"] if s["name"] == "stage2"]
        stage2["spec"]["steps"] = stage2_steps
    path = tmp_path / f"pipeline-{stage2_steps}.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


async def test_pipeline_creates_the_custom_resource_with_stages_inline(api: Api,
                                                                       tmp_path: Path) -> None:
    source = quickstart(tmp_path) / "pipeline.yaml"
    result = await cli("submit", str(source))
    assert result.exit_code == 0, result.output
    cr = api.pipeline("quickstart")
    loaded = load(source)
    assert cr["spec"] == pipeline_resource(loaded.document, namespace=NAMESPACE)["spec"]
    assert all("spec" in s and "ref" not in s for s in cr["spec"]["stages"])
    assert api.creates(RAYJOBS) == 0  # the operator creates those

    same = await cli("submit", str(inline_pipeline(tmp_path)))  # same stages, written inline
    assert same.exit_code == 0 and "exists with the same stage ids" in same.stderr
    assert api.creates(PIPELINES) == 1

    # An edited stage 2: it and the stages after it get new ids; stage 1 keeps its id.
    edited = await cli("submit", str(inline_pipeline(tmp_path, stage2_steps=7)))
    assert edited.exit_code == 0, edited.output
    assert "stages with new ids (they run again): stage2, sft, eval (onSpecChange wait: " \
        "a stage running under an old id runs to its end first)" in edited.stderr
    stored = {s["name"]: s for s in api.pipeline("quickstart")["spec"]["stages"]}
    assert stored["stage2"]["spec"]["steps"] == 7 and api.creates(PIPELINES) == 1

    # status: phase and a stage table with ids, from what the operator wrote.
    refs = pipeline_stages(loaded.document, loaded.jobs)
    await api.set_pipeline_status("quickstart", {
        "phase": "Running", "currentStage": "stage1", "stages": [
            {"name": "stage1", "id": refs[0].id, "phase": "Running", "rayJob": "qs-stage1-x",
             "attempts": 1, "dashboardURL": "qs-stage1-x-head-svc.default.svc:8265"}]})
    shown = await cli("status", "quickstart")
    assert shown.exit_code == 0, shown.output
    assert "ProLongPipeline default/quickstart: Running (current stage stage1)" in shown.stdout
    assert refs[0].id in shown.stdout and "http://qs-stage1-x-head-svc" in shown.stdout
    assert "eval" in shown.stdout

    gone = await cli("delete", "quickstart")
    assert gone.exit_code == 0, gone.output
    assert ("quickstart" not in {k[2] for k, o in api.kmock.objects.items()
                                 if k[0] == PIPELINES and not o.deleted})


@pytest.mark.parametrize(("job_status", "code"), [("SUCCEEDED", 0), ("FAILED", 1)])
async def test_wait_gates_on_complete_and_succeeded(api: Api, tmp_path: Path, job_status: str,
                                                    code: int) -> None:
    path = stage_file(tmp_path)
    name = expected(path)[1]["metadata"]["name"]
    waiting = asyncio.create_task(cli("submit", str(path), "--wait", "--interval", "0.05",
                                      "--timeout", "30"))
    await api.wait_rayjob(name)
    await api.set_rayjob(name, "Initializing", None)
    await asyncio.sleep(0.2)
    await api.set_rayjob(name, "Running", "RUNNING")
    await asyncio.sleep(0.2)
    assert not waiting.done()
    # KubeRay writes Complete for a failed Ray job too: only SUCCEEDED is success.
    await api.set_rayjob(name, "Complete", job_status, message="done")
    result = await asyncio.wait_for(waiting, 20)
    assert result.exit_code == code, result.output
    assert "running (deployment Running, job RUNNING)" in result.stderr
    assert ("succeeded" if code == 0 else "failed") in result.stderr.splitlines()[-1]


async def test_wait_follows_a_pipeline(api: Api, tmp_path: Path) -> None:
    waiting = asyncio.create_task(cli("submit", str(quickstart(tmp_path) / "pipeline.yaml"), "--wait",
                                      "--interval", "0.05", "--timeout", "30"))
    await api.wait("pipeline", lambda: (PIPELINES, NAMESPACE, "quickstart") in api.kmock.objects)
    await api.set_pipeline_status("quickstart", {"phase": "Running", "stages": [
        {"name": "stage1", "phase": "Running"}]})
    await asyncio.sleep(0.2)
    await api.set_pipeline_status("quickstart", {"phase": "Failed", "stages": [
        {"name": "stage1", "phase": "Failed", "message": "attempt 1 failed"}]})
    result = await asyncio.wait_for(waiting, 20)
    assert result.exit_code == 1, result.output
    assert "attempt 1 failed" in result.stderr


async def test_status_logs_and_delete_of_a_rayjob(api: Api, tmp_path: Path) -> None:
    path = stage_file(tmp_path)
    _, rayjob = expected(path)
    name = rayjob["metadata"]["name"]
    assert (await cli("submit", str(path))).exit_code == 0
    await api.set_rayjob(name, "Complete", "SUCCEEDED")

    for ref in (name, "quickstart-stage1", str(path)):  # RayJob name, job name, spec file
        shown = await cli("status", ref)
        assert shown.exit_code == 0, shown.output
        assert f"RayJob default/{name}: succeeded (deployment Complete, job SUCCEEDED)" \
            in shown.stdout
        assert rayjob["metadata"]["labels"]["prolong.dev/stage-id"] in shown.stdout

    # HTTPMode (the default): no submitter; the head pod's driver-log container follows the
    # driver's log (the rendered head pod, as KubeRay creates it for the RayJob's cluster).
    await api.set_rayjob_status(name, {"rayClusterName": f"{name}-rc"})
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]
    api.kmock.objects[PODS, NAMESPACE, f"{name}-rc-head"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-rc-head", "namespace": NAMESPACE,
                     "labels": {"ray.io/cluster": f"{name}-rc", "ray.io/node-type": "head"}},
        "spec": head["spec"]}
    api.kmock[f"get /api/v1/namespaces/{NAMESPACE}/pods/{name}-rc-head/log"] << (
        lambda request: b"driver: step 9 loss 6.5\n"
        if request.params.get("container") == "driver-log" else b"ray head's own log\n")
    logs = await cli("logs", name)
    assert logs.exit_code == 0, logs.output
    assert logs.stdout == "driver: step 9 loss 6.5\n"

    # K8sJobMode: KubeRay's submitter Job is named like the RayJob; its pod has the log.
    api.kmock.objects[PODS, NAMESPACE, f"{name}-abcde"] = {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": f"{name}-abcde", "namespace": NAMESPACE,
                     "labels": {"batch.kubernetes.io/job-name": name, "job-name": name}},
        "spec": {"containers": [{"name": "ray-job-submitter", "image": "x"}]}}
    api.kmock[f"get /api/v1/namespaces/{NAMESPACE}/pods/{name}-abcde/log"] << b"step 3 loss 7.1\n"
    logs = await cli("logs", name)
    assert logs.exit_code == 0, logs.output
    assert "step 3 loss 7.1" in logs.stdout

    unknown = await cli("status", "no-such-run")
    assert unknown.exit_code == 2
    assert unknown.stderr.strip() == "no ProLongPipeline, RayJob or job named no-such-run in " \
                                     "namespace default"

    deleted = await cli("delete", name)
    assert deleted.exit_code == 0, deleted.output
    assert name not in api.rayjobs() and f"{name}-spec" not in api.configmaps()
    assert (await cli("delete", name)).exit_code == 2
    assert (await cli("logs", name)).exit_code == 2


async def test_delete_refuses_an_operator_rayjob(api: Api) -> None:
    api.kmock.objects[RAYJOBS, NAMESPACE, "qs-stage1-abc"] = {
        "apiVersion": "ray.io/v1", "kind": "RayJob",
        "metadata": {"name": "qs-stage1-abc", "namespace": NAMESPACE,
                     "ownerReferences": [{"kind": "ProLongPipeline", "name": "quickstart"}]}}
    result = await cli("delete", "qs-stage1-abc")
    assert result.exit_code == 1 and "delete the pipeline instead" in result.stderr
    assert "qs-stage1-abc" in api.rayjobs()


async def test_open_backend_picks_kubernetes_in_the_context_namespace(api: Api) -> None:
    backend = open_backend(None, None, None)
    assert isinstance(backend, KubeBackend) and backend.kube.namespace == NAMESPACE
    assert open_backend("ml", None, None).kube.namespace == "ml"
    # Through the interface, as the CLI calls it: the unknown name is the backend's answer.
    with pytest.raises(UnknownName, match="no ProLongPipeline, RayJob or job named nope"):
        await asyncio.to_thread(backend.status, "nope", Console())


# ---- the KubeRay preflight and Kueue's default LocalQueue (issue 20) --------------------------

@pytest.mark.parametrize(("tag", "missing"), [
    ("v1.5.1", "spec.preRunningDeadlineSeconds"), ("v1.4.2", "spec.deletionStrategy"),
    (None, "has no CRD rayjobs.ray.io")])
async def test_submit_refuses_a_kuberay_that_would_drop_fields(api: Api, tmp_path: Path, tag,
                                                              missing) -> None:
    serve_kuberay_crd(api.kmock, tag, priority=1)
    for path in (stage_file(tmp_path), quickstart(tmp_path) / "pipeline.yaml"):
        result = await cli("submit", str(path))
        assert result.exit_code == 2, result.output
        line = result.stderr.strip()
        assert "\n" not in line and missing in line and "KubeRay >= 1.6" in line, line
    assert api.creates(RAYJOBS) == api.creates(PIPELINES) == api.creates(CONFIGMAPS) == 0


async def test_creates_are_strict_and_a_readable_crd_is_not_required(api: Api,
                                                                    tmp_path: Path) -> None:
    api.kmock[f"get {KUBERAY_CRD_PATH}"] ** 1 << 403 << {
        "kind": "Status", "code": 403, "reason": "Forbidden",
        "message": "customresourcedefinitions is forbidden: User cannot get"}
    result = await cli("submit", str(stage_file(tmp_path)))
    assert result.exit_code == 0, result.output
    assert "warning: cannot read CRD rayjobs.ray.io" in result.output
    creates = [r for r in api.kmock if r.action == kmock.action.CREATE
               and r.resource in (RAYJOBS, CONFIGMAPS)]
    assert len(creates) == 2
    assert all(r.params.get("fieldValidation") == "Strict" for r in creates)


async def test_an_unqueued_stage_is_refused_where_kueue_has_a_default_queue(
        api: Api, tmp_path: Path) -> None:
    api.kmock[f"get /apis/kueue.x-k8s.io/v1beta1/namespaces/{NAMESPACE}/localqueues/default"] \
        << {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
            "metadata": {"name": "default", "namespace": NAMESPACE}}
    path = stage_file(tmp_path)
    result = await cli("submit", str(path))
    assert result.exit_code == 2, result.output
    assert "default LocalQueue" in result.stderr and "spec.cluster.kubernetes.queue" in \
        result.stderr
    assert api.creates(RAYJOBS) == 0
    job = yaml.safe_load(path.read_text())
    job["spec"]["cluster"].setdefault("kubernetes", {})["queue"] = "default"
    path.write_text(yaml.safe_dump(job))
    result = await cli("submit", str(path))
    assert result.exit_code == 0, result.output
    (created,) = api.rayjobs().values()
    assert created["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "default"
    assert created["spec"]["shutdownAfterJobFinishes"] is True
