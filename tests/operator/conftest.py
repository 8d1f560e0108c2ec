"""The operator against kmock's Kubernetes emulator, over HTTP.

kopf's real reactor (``kopf.operator``: discovery, list + watch streams, handler dispatch) runs as
a task in the test's event loop, with ``operator/handlers.py`` imported into a fresh registry, as
``kopf run`` would; both kopf and the handlers' ``kubernetes`` client reach kmock through a
kubeconfig named by $KUBECONFIG. The tests play the API server's and KubeRay's part through the
same HTTP API: they create and edit the pipeline, and patch RayJob statuses.

kmock is a plain object store: it keeps no generation (tests set metadata.generation as the API
server would), ignores label selectors (the handlers filter by ownership as well), and has no
garbage collector (the tests assert the ownerReferences that make deletion cascade). Every test
here runs it as :class:`tests.operator.apiserver.ApiServer`, which adds resourceVersions with
optimistic concurrency (409 on a stale patch), injected faults and watch disconnects.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.util
import itertools
import sys
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import kmock
import kopf
import pytest
import pytest_asyncio
import yaml

from prolong.specfile import dump_yaml, load, pipeline_from_resource
from prolong.stage.identity import StageRef, pipeline_stages
from prolong.stage.names import attempt_rayjob_name, rayjob_name
from tests.conftest import serve_kuberay_crd, use_kmock_kubeconfig
from tests.operator.apiserver import ApiServer, in_background
from tests.oracles.admission import warm_oracles

REPO = Path(__file__).resolve().parents[2]
HANDLERS = REPO / "operator" / "handlers.py"
NAMESPACE = "default"
PIPELINES = kmock.resource("prolong.dev/v1alpha1/prolongpipelines")
RAYJOBS = kmock.resource("ray.io/v1/rayjobs")
CONFIGMAPS = kmock.resource("v1/configmaps")
BATCH_JOBS = kmock.resource("batch/v1/jobs")
EVENTS = kmock.resource("v1/events")
_module_ids = itertools.count()


@pytest.fixture(autouse=True)
def _outside_the_checkout(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The operator looks for stage outputs where the specs put them, ./runs: run from the
    checkout, a developer's own `make quickstart` would make every quickstart stage "complete"
    to it. The tests run in a directory of their own, with the checkout's jobs/ (the quickstart's
    base is named relative to it)."""
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    monkeypatch.chdir(tmp_path)


def load_handlers() -> Any:
    """Import operator/handlers.py as a fresh module (``operator`` is not a package)."""
    name = f"prolong_operator_handlers_{next(_module_ids)}"
    spec = importlib.util.spec_from_file_location(name, HANDLERS)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def pipeline_cr(path: str = "jobs/prolong-8b/pipeline.yaml", *, uid: str = "uid-1") -> dict:
    """A pipeline file inlined into the custom resource, as the API server would store it."""
    doc = yaml.safe_load(dump_yaml(load(REPO / path).document))
    doc["metadata"].update(namespace=NAMESPACE, uid=uid, generation=1, resourceVersion="1")
    return doc


def stage_refs(cr: dict) -> dict[str, StageRef]:
    """The stages of a pipeline CR, resolved here independently of the handlers."""
    pipeline, jobs = pipeline_from_resource(cr)
    return {r.stage: r for r in pipeline_stages(pipeline, jobs)}


def rayjob_for(cr: dict, stage: str, attempt: int = 1) -> str:
    """The name the operator gives a stage's attempt (the name render_stage gives attempt 1)."""
    ref = stage_refs(cr)[stage]
    return attempt_rayjob_name(rayjob_name(f"{cr['metadata']['name']}-{stage}", ref.id), attempt)


class Cluster:
    """The test's side of the API: what the API server and KubeRay would do, over HTTP."""

    def __init__(self, kmock: ApiServer, session: aiohttp.ClientSession) -> None:
        self.kmock = kmock
        self.session = session
        self.jobs_end: str | None = "Complete"
        """What the Job controller makes of each created Job (Complete, Failed; None: it
        stays running until the test says)."""
        self._job_controller: asyncio.Task | None = None

    def _path(self, res: kmock.resource, name: str | None = None, sub: str | None = None) -> str:
        base = f"/api/{res.version}" if res.group == "" else f"/apis/{res.group}/{res.version}"
        path = f"{base}/namespaces/{NAMESPACE}/{res.plural}"
        return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")

    async def _send(self, method: str, path: str, body: dict | None = None) -> dict:
        headers = {"Content-Type": "application/merge-patch+json"} if method == "PATCH" else {}
        async with self.session.request(method, path, json=body, headers=headers) as resp:
            assert resp.status < 300, f"{method} {path}: {resp.status} {await resp.text()}"
            return await resp.json()

    async def create_pipeline(self, cr: dict) -> None:
        await self._send("POST", self._path(PIPELINES), cr)

    async def create(self, res: kmock.resource, obj: dict) -> None:
        """Create any object (what someone other than the operator left in the namespace)."""
        await self._send("POST", self._path(res), obj)

    async def delete(self, res: kmock.resource, name: str) -> None:
        """Delete an object (as the garbage collector or a user would)."""
        await self._send("DELETE", self._path(res, name))

    async def edit_pipeline(self, name: str, spec: dict, generation: int) -> None:
        await self._send("PATCH", self._path(PIPELINES, name),
                         {"spec": spec, "metadata": {"generation": generation}})

    async def set_rayjob(self, name: str, deployment: str, job: str | None,
                         message: str | None = None) -> None:
        """Play KubeRay: patch the RayJob's status subresource."""
        await self._send("PATCH", self._path(RAYJOBS, name, "status"), {"status": {
            "jobDeploymentStatus": deployment, "jobStatus": job, "message": message,
            "dashboardURL": f"{name}-head-svc.{NAMESPACE}.svc:8265"}})

    async def set_job(self, name: str, end: str, reason: str | None = None) -> None:
        """Play the Job controller: the Job's pods ended (Complete or Failed)."""
        now = "2026-01-01T00:00:00Z"
        cond = {"type": end, "status": "True", "lastTransitionTime": now,
                "reason": reason or ("Completed" if end == "Complete" else "BackoffLimitExceeded"),
                "message": None if end == "Complete" else "Job has reached the specified "
                                                          "backoff limit"}
        counts = {"succeeded": 1} if end == "Complete" else {"failed": 2}
        await self._send("PATCH", self._path(BATCH_JOBS, name, "status"), {"status": {
            "conditions": [cond], "startTime": now, **counts}})

    def jobs(self) -> dict[str, dict]:
        return {key[2]: obj.raw for key, obj in self.kmock.objects.items()
                if key[0] == BATCH_JOBS and not obj.deleted}

    async def run_job_controller(self) -> None:
        """Until the test ends: each Job created ends as :attr:`jobs_end` says (a moment later,
        over HTTP, as the Job controller's status update would)."""
        done: set[str] = set()
        while True:
            for name, job in list(self.jobs().items()):
                if name not in done and self.jobs_end is not None and not job.get("status"):
                    done.add(name)
                    await self.set_job(name, self.jobs_end)
            await asyncio.sleep(0.05)

    def pipeline(self, name: str) -> dict:
        return self.kmock.objects[PIPELINES, NAMESPACE, name].raw

    def status(self, name: str) -> dict:
        return self.pipeline(name).get("status") or {}

    def rayjobs(self) -> dict[str, dict]:
        return {key[2]: obj.raw for key, obj in self.kmock.objects.items()
                if key[0] == RAYJOBS and not obj.deleted}

    def configmaps(self) -> dict[str, dict]:
        return {key[2]: obj.raw for key, obj in self.kmock.objects.items()
                if key[0] == CONFIGMAPS and not obj.deleted}

    def status_patches(self) -> int:
        return sum(1 for r in self.kmock if r.action == kmock.action.UPDATE
                   and r.resource == PIPELINES and r.subresource == "status")

    def events(self) -> list[tuple[str, str, str]]:
        """(type, reason, message) of every Event posted, in order (kopf posts core v1 Events
        on the pipeline)."""
        return [(r.data.get("type"), r.data.get("reason"), r.data.get("message"))
                for r in self.kmock if r.action == kmock.action.CREATE and r.resource == EVENTS
                and isinstance(r.data, dict)]

    async def set_rayjob_status(self, name: str, status: dict) -> None:
        """Play KubeRay with a whole status (reason, rayClusterStatus, ...)."""
        await self._send("PATCH", self._path(RAYJOBS, name, "status"), {"status": status})

    def rayjob_creates(self) -> int:
        return sum(1 for r in self.kmock if r.action == kmock.action.CREATE and r.resource == RAYJOBS)

    async def wait(self, what: str, check: Callable[[], Any], timeout: float = 15) -> Any:
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}; rayjobs: "
                                     f"{sorted(self.rayjobs())}")
            await asyncio.sleep(0.05)

    async def wait_rayjob(self, name: str) -> dict:
        return await self.wait(f"RayJob {name}", lambda: self.rayjobs().get(name))

    async def wait_status(self, name: str, check: Callable[[dict], Any]) -> dict:
        await self.wait(f"status of {name}", lambda: check(self.status(name)))
        return self.status(name)


@pytest.fixture
def kmock_options() -> dict[str, Any]:
    """kmock's plugin builds its server from these: ours, with resourceVersions and faults."""
    return {"cls": ApiServer}


@pytest_asyncio.fixture
async def cluster(kmock: ApiServer, tmp_path: Path,
                  monkeypatch: pytest.MonkeyPatch) -> AsyncIterator[Cluster]:
    info = kmock.ResourceInfo
    kmock.resources[PIPELINES] = info(namespaced=True, kind="ProLongPipeline",
                                      singular="prolongpipeline", subresources={"status"},
                                      verbs={"get", "list", "watch", "create", "patch"})
    kmock.resources[RAYJOBS] = info(namespaced=True, kind="RayJob", singular="rayjob",
                                    subresources={"status"},
                                    verbs={"get", "list", "watch", "create", "patch", "delete"})
    kmock.resources["v1/configmaps"] = info(namespaced=True, kind="ConfigMap",
                                            verbs={"get", "list", "create", "delete"})
    kmock.resources["v1/events"] = info(namespaced=True, kind="Event", verbs={"create"})
    kmock.resources["v1/pods"] = info(namespaced=True, kind="Pod",
                                      verbs={"get", "list", "create"})
    kmock.resources[BATCH_JOBS] = info(namespaced=True, kind="Job", subresources={"status"},
                                 verbs={"get", "list", "watch", "create", "patch"})
    # kopf waits for the namespaces resource to be discovered (a real cluster always serves it),
    # though the handlers turn namespace scanning off (kmock 0.8 cannot parse the path
    # /api/v1/namespaces anyway: HTTP 500).
    kmock.resources["v1/namespaces"] = info(namespaced=False, kind="Namespace",
                                            verbs={"list", "watch"})
    serve_kuberay_crd(kmock)  # KubeRay 1.7's RayJob CRD (the operator's preflight reads it)
    warm_oracles()  # their first call builds validators (0.5 s): not inside a timed request
    url = str(kmock.url).rstrip("/")
    use_kmock_kubeconfig(url, tmp_path, NAMESPACE, monkeypatch)
    # No keep-alive: kopf cancels the tasks started while it ran when it stops, and those
    # include kmock's handlers of whatever connections were open then.
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        cluster = Cluster(kmock, session)
        async with in_background(cluster.run_job_controller()):
            yield cluster
    # Every RayJob the operator created passed KubeRay's and Kueue's oracles (a test that
    # expects a refusal clears the list).
    assert not kmock.refusals, kmock.refusals


@contextlib.asynccontextmanager
async def running_operator() -> AsyncIterator[Any]:
    """kopf's reactor with operator/handlers.py, namespaced, as ``kopf run --standalone
    --namespace=default operator/handlers.py`` runs it; stopped (and awaited) on exit."""
    registry = kopf.OperatorRegistry()
    kopf.set_default_registry(registry)
    handlers = load_handlers()
    ready = asyncio.Event()
    task = asyncio.create_task(kopf.operator(
        registry=registry, namespaces=[NAMESPACE], standalone=True,
        ready_flag=ready))
    try:
        await asyncio.wait_for(ready.wait(), timeout=15)
        yield handlers
    finally:
        # Cancelled rather than stopped by its flag: kopf gives every task started after it
        # (here also kmock's request handlers, such as its own watch streams) 5 s to finish.
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
        kopf.set_default_registry(kopf.OperatorRegistry())
