"""``prolongctl doctor`` against kmock over HTTP: a cluster that passes every check, and one that
fails each of them (KubeRay's CRD, the operator, the claims, the Secrets, the LocalQueue, the
images). The test plays the API server's stored objects and the kubelet (the write probe Pod's
phase)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import kmock
import pytest
import pytest_asyncio
import yaml

from tests.conftest import JOBS, use_kmock_kubeconfig
from tests.k8s.test_submit import cli
from tests.operator.apiserver import in_background
from tests.operator.conftest import NAMESPACE, Cluster
from tests.oracles.admission import crd as kuberay_crd

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]

CRDS = kmock.resource("apiextensions.k8s.io/v1/customresourcedefinitions")
DEPLOYMENTS = kmock.resource("apps/v1/deployments")
STATEFULSETS = kmock.resource("apps/v1/statefulsets")
PVCS = kmock.resource("v1/persistentvolumeclaims")
SECRETS = kmock.resource("v1/secrets")
PODS = kmock.resource("v1/pods")
LOCALQUEUES = kmock.resource("kueue.x-k8s.io/v1beta1/localqueues")
IMAGE = "registry.example.com/ml/prolong-train:1.0"


class Api(Cluster):
    probe_phase = "Succeeded"

    async def put(self, res: kmock.resource, obj: dict) -> None:
        if res == CRDS:
            async with self.session.post(f"/apis/{res.group}/{res.version}/{res.plural}",
                                         json=obj) as resp:
                assert resp.status < 300, await resp.text()
            return
        await self._send("POST", self._path(res), obj)

    def pods(self) -> dict[str, dict]:
        return {key[2]: obj.raw for key, obj in self.kmock.objects.items()
                if key[0] == PODS and not obj.deleted}

    async def kubelet(self) -> None:
        """Each Pod created runs to :attr:`probe_phase`."""
        done: set[str] = set()
        while True:
            for name in list(self.pods()):
                if name not in done:
                    done.add(name)
                    await self._send("PATCH", self._path(PODS, name, "status"),
                                     {"status": {"phase": self.probe_phase}})
            await asyncio.sleep(0.05)


@pytest_asyncio.fixture
async def api(kmock: kmock.KubernetesEmulator, tmp_path: Path,
              monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Api]:
    info = kmock.ResourceInfo
    verbs = {"get", "list", "watch", "create", "patch", "delete"}
    kmock.resources[CRDS] = info(namespaced=False, kind="CustomResourceDefinition", verbs=verbs)
    kmock.resources[DEPLOYMENTS] = info(namespaced=True, kind="Deployment", verbs=verbs)
    kmock.resources[STATEFULSETS] = info(namespaced=True, kind="StatefulSet", verbs=verbs)
    kmock.resources[PVCS] = info(namespaced=True, kind="PersistentVolumeClaim", verbs=verbs)
    kmock.resources[SECRETS] = info(namespaced=True, kind="Secret", verbs=verbs)
    kmock.resources[PODS] = info(namespaced=True, kind="Pod", subresources={"status"},
                                 verbs=verbs)
    kmock.resources[LOCALQUEUES] = info(namespaced=True, kind="LocalQueue", verbs=verbs)
    url = str(kmock.url).rstrip("/")
    use_kmock_kubeconfig(url, tmp_path, NAMESPACE, monkeypatch)
    async with aiohttp.ClientSession(base_url=url,
                                     connector=aiohttp.TCPConnector(force_close=True)) as session:
        api = Api(kmock, session)
        async with in_background(api.kubelet()):
            yield api


def specs(tmp_path: Path, *, image: bool = True) -> list[Path]:
    """The prolong-8b stage files with an image named and stage 1 queued (a copy)."""
    out = []
    for name in ("stage1-64k.yaml", "eval.yaml"):
        doc = yaml.safe_load((JOBS / "prolong-8b" / name).read_text())
        cluster = doc["spec"]["cluster"]
        if image:
            cluster["image"] = IMAGE
        if name.startswith("stage1"):
            cluster["kubernetes"]["queue"] = "gpu-queue"
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        out.append(path)
    return out


def operator(*, ready: int = 1, args: tuple[str, ...] = ("--namespace=default",)) -> dict:
    labels = {"app.kubernetes.io/name": "prolong", "app.kubernetes.io/component": "operator"}
    return {"apiVersion": "apps/v1", "kind": "Deployment",
            "metadata": {"name": "prolong-operator", "labels": labels},
            "spec": {"selector": {"matchLabels": labels}, "template": {
                "metadata": {"labels": labels},
                "spec": {"containers": [{"name": "operator", "image": "op", "command": ["kopf"],
                                         "args": ["run", "--standalone", *args]}]}}},
            "status": {"readyReplicas": ready}}


def claim(name: str, *, phase: str = "Bound", modes: tuple[str, ...] = ("ReadWriteMany",)):
    return {"apiVersion": "v1", "kind": "PersistentVolumeClaim", "metadata": {"name": name},
            "spec": {"accessModes": list(modes), "storageClassName": "efs",
                     "resources": {"requests": {"storage": "1Ti"}}},
            "status": {"phase": phase, "accessModes": list(modes)}}


def secret(name: str, key: str) -> dict:
    return {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name},
            "data": {key: "c2VjcmV0"}}


async def healthy(api: Api) -> None:
    crd = kuberay_crd("v1.7.0")
    await api.put(CRDS, crd)
    await api.put(DEPLOYMENTS, operator())
    await api.put(PVCS, claim("prolong-runs"))
    await api.put(PVCS, claim("prolong-data", modes=("ReadOnlyMany",)))
    await api.put(SECRETS, secret("hf-token", "token"))
    await api.put(LOCALQUEUES, {"apiVersion": "kueue.x-k8s.io/v1beta1", "kind": "LocalQueue",
                                "metadata": {"name": "gpu-queue"},
                                "spec": {"clusterQueue": "gpus"}})


async def test_a_ready_cluster_passes_every_check(api: Api, tmp_path: Path) -> None:
    await healthy(api)
    result = await cli("doctor", *map(str, specs(tmp_path)), "--probe-timeout", "20")
    assert result.exit_code == 0, result.output
    lines = result.stdout.strip().splitlines()
    assert [line.split()[1].rstrip(":") for line in lines[:-1]] == [
        "kuberay", "operator", "claim", "claim", "secret", "queue", "images"]
    assert all(line.startswith("ok") for line in lines[:-1]), result.stdout
    assert "writable by uid 1000 at /mnt/prolong" in result.stdout
    assert "prolong-data: Bound, ReadOnlyMany, mounted read-only" in result.stdout
    assert lines[-1] == "7 of 7 checks passed in namespace default"
    assert api.pods() == {}  # the probe Pod is deleted


async def test_a_cluster_that_fails_each_check(api: Api, tmp_path: Path) -> None:
    await api.put(CRDS, kuberay_crd("v1.5.1"))  # before preRunningDeadlineSeconds
    await api.put(DEPLOYMENTS, operator(args=("--namespace=other",)))
    await api.put(PVCS, claim("prolong-runs", phase="Pending"))
    await api.put(PVCS, claim("prolong-data", modes=("ReadWriteOnce",)))
    await api.put(SECRETS, secret("hf-token", "HF_TOKEN"))  # the wrong key
    result = await cli("doctor", *map(str, specs(tmp_path, image=False)))
    assert result.exit_code == 2, result.output
    lines = dict(line.split(":", 1) for line in result.stdout.strip().splitlines()[:-1])
    assert "preRunningDeadlineSeconds" in lines["FAIL  kuberay"] and ">= 1.6" in \
        lines["FAIL  kuberay"]
    assert "watches namespace other, not default" in lines["FAIL  operator"]
    assert "is Pending, not Bound" in lines["FAIL  claim prolong-runs"]
    assert "ReadOnlyMany or ReadWriteMany" in lines["FAIL  claim prolong-data"]
    assert "has no key token (model.hubTokenSecret" in lines["FAIL  secret hf-token"]
    assert "no Kueue LocalQueue gpu-queue" in lines["FAIL  queue gpu-queue"]
    assert "cluster.image is not set" in lines["FAIL  images"]
    assert result.stdout.strip().splitlines()[-1] == "0 of 7 checks passed in namespace default"


@pytest.mark.parametrize("case", ["not-ready", "not-writable", "no-crd"])
async def test_each_failure_is_one_line_with_the_fix(api: Api, tmp_path: Path, case: str):
    await healthy(api)
    if case == "not-ready":
        await api.delete(DEPLOYMENTS, "prolong-operator")
        await api.put(DEPLOYMENTS, operator(ready=0))
    elif case == "not-writable":
        api.probe_phase = "Failed"
    elif case == "no-crd":
        async with api.session.delete(f"/apis/{CRDS.group}/{CRDS.version}/{CRDS.plural}/"
                                      "rayjobs.ray.io") as resp:
            assert resp.status < 300, await resp.text()
    result = await cli("doctor", *map(str, specs(tmp_path)), "--probe-timeout", "20")
    assert result.exit_code == 2, result.output
    (failed,) = [line for line in result.stdout.splitlines() if line.startswith("FAIL")]
    expected = {"not-ready": "has no ready replica",
                "not-writable": "not writable by uid 1000",
                "no-crd": "has no CRD rayjobs.ray.io"}[case]
    assert expected in failed
    assert api.pods() == {}
