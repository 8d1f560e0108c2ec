"""The operator under API faults, over HTTP against kmock (tests/operator/apiserver.py): 500s,
409 conflicts, lost and hung responses on create and patch, names already taken, watch
disconnects. What must hold whatever the API does:

- no duplicate RayJob: one per stage attempt, under the name the planner gives it, never a
  second one under another name;
- no stage starts before every earlier stage has a succeeded RayJob (checked by the API server
  at the moment each RayJob is stored);
- the status converges, quickly: faults are retried in place (the RayJob event handler is never
  retried by kopf, and the resync timer is 60 s away in these tests).
"""

from __future__ import annotations

import asyncio

import kmock
import pytest

from prolong.k8s.rayjob import render_stage
from prolong.specfile import pipeline_from_resource
from prolong.stage.names import LABEL_PREFIX, STAGE_ID_LABEL, STAGE_LABEL
from tests.operator.apiserver import KOPF_CLIENT, OPERATOR_CLIENT, Fault, named, request_of
from tests.operator.conftest import (
    BATCH_JOBS,
    CONFIGMAPS,
    NAMESPACE,
    PIPELINES,
    RAYJOBS,
    Cluster,
    load_handlers,
    pipeline_cr,
    rayjob_for,
    running_operator,
    stage_refs,
)

pytestmark = pytest.mark.timeout(60)

STAGES = ("stage1", "stage2", "sft", "eval")
CONVERGE = 6.0
"""Seconds a converging status may take here: in-place retries, not kopf's 10 s handler retry
nor the 60 s resync."""

CREATE_RAYJOB = request_of(OPERATOR_CLIENT, kmock.action.CREATE, RAYJOBS)
CREATE_CONFIGMAP = request_of(OPERATOR_CLIENT, kmock.action.CREATE, CONFIGMAPS)
PATCH_STATUS = request_of(OPERATOR_CLIENT, kmock.action.UPDATE, PIPELINES, "status")


@pytest.fixture(autouse=True)
def fast_api(monkeypatch: pytest.MonkeyPatch) -> None:
    """Short API timeouts and backoffs (read when the handlers load); the resync stays at 60 s,
    so only the fault handling can make a status converge within CONVERGE."""
    monkeypatch.setenv("PROLONG_API_TIMEOUT_SECONDS", "0.5")
    monkeypatch.setenv("PROLONG_API_BACKOFF_SECONDS", "0.1")
    monkeypatch.setenv("PROLONG_RESYNC_SECONDS", "60")


class Invariants:
    """Checked by the API server as each RayJob is stored: its name is the planner's name for
    its stage and attempt, no earlier one of that name existed, and every earlier stage has a
    succeeded RayJob of its current id."""

    def __init__(self, cluster: Cluster, cr: dict) -> None:
        self.cluster, self.cr, self.violations, self.created = cluster, cr, [], []
        self.refs = stage_refs(cr)
        cluster.kmock.on_write.append(self.check)

    def check(self, request: kmock.Request) -> None:
        if request.resource != RAYJOBS or request.action != kmock.action.CREATE:
            return
        meta = request.data["metadata"]
        stage, attempt = meta["labels"][STAGE_LABEL], int(meta["labels"][f"{LABEL_PREFIX}attempt"])
        self.created.append(meta["name"])
        if meta["name"] != rayjob_for(self.cr, stage, attempt):
            self.violations.append(f"{meta['name']} is not the name of {stage} attempt {attempt}")
        if self.created.count(meta["name"]) > 1:
            self.violations.append(f"{meta['name']} stored twice")
        rayjobs = self.cluster.rayjobs().values()
        for upstream in STAGES[:STAGES.index(stage)]:
            if not any(rj["metadata"]["labels"].get(STAGE_ID_LABEL) == self.refs[upstream].id
                       and (rj.get("status") or {}).get("jobStatus") == "SUCCEEDED"
                       for rj in rayjobs):
                self.violations.append(f"{meta['name']} started before {upstream} succeeded")


async def finish(cluster: Cluster, rj_name: str) -> None:
    await cluster.set_rayjob(rj_name, "Running", "RUNNING")
    await cluster.set_rayjob(rj_name, "Complete", "SUCCEEDED")


def stage(status: dict, name: str) -> dict:
    return next((s for s in status.get("stages") or () if s["name"] == name), {})


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


@pytest.mark.asyncio
async def test_lost_create_responses_make_no_second_rayjob(cluster: Cluster) -> None:
    """Each create is stored, then answered 500 (the response lost on its way back): the
    operator repeats it, reads the 409 as "ours, it exists", and goes on."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    invariants = Invariants(cluster, cr)
    for rj_name in (rayjob_for(cr, "stage1"), rayjob_for(cr, "stage2")):
        cluster.kmock.inject(Fault(named(CREATE_CONFIGMAP, f"{rj_name}-spec"), "lose"))
        cluster.kmock.inject(Fault(named(CREATE_RAYJOB, rj_name), "lose"))
    async with running_operator():
        await cluster.create_pipeline(cr)
        for rj_name in (rayjob_for(cr, "stage1"), rayjob_for(cr, "stage2")):
            await cluster.wait_rayjob(rj_name)
            await cluster.wait(f"status naming {rj_name}", lambda rj_name=rj_name: any(
                s.get("rayJob") == rj_name for s in cluster.status(name).get("stages", ())),
                timeout=CONVERGE)
            await finish(cluster, rj_name)
        await cluster.wait_rayjob(rayjob_for(cr, "sft"))
    assert invariants.violations == []
    assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:3])
    assert cluster.kmock.faults == []  # all four were met
    # Stage 1 and 2 twice each (the repeat answered 409: ours, it exists), sft once: no other.
    assert cluster.rayjob_creates() == 5


@pytest.mark.asyncio
async def test_a_hung_create_times_out_and_the_pipeline_goes_on(cluster: Cluster) -> None:
    """The first RayJob create is stored but never answered: without a client timeout it would
    hold the pipeline's reconcile (and its lock) for good."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    invariants = Invariants(cluster, cr)
    hung = cluster.kmock.inject(Fault(CREATE_RAYJOB, "hang"))
    async with running_operator():
        await cluster.create_pipeline(cr)
        first = await cluster.wait_rayjob(rayjob_for(cr, "stage1"))
        assert hung.hits == 1
        status = await cluster.wait("the status", lambda: (
            s if stage(s := cluster.status(name), "stage1").get("rayJob")
            == first["metadata"]["name"] else None), timeout=CONVERGE)
        assert stage(status, "stage1")["phase"] == "Submitted"
        await finish(cluster, rayjob_for(cr, "stage1"))
        await cluster.wait("stage 2", lambda: stage(cluster.status(name), "stage2")
                           .get("phase") == "Submitted", timeout=CONVERGE)
    assert invariants.violations == []
    assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:2])


@pytest.mark.asyncio
async def test_status_patches_answered_500_are_retried_with_backoff(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    invariants = Invariants(cluster, cr)
    async with running_operator():
        await cluster.create_pipeline(cr)
        first = rayjob_for(cr, "stage1")
        await cluster.wait_rayjob(first)
        await cluster.wait_status(name, lambda s: stage(s, "stage1").get("phase") == "Submitted")
        # Three refusals in a row: the RayJob event's reconcile and the one stage 2's creation
        # triggers each meet them; kopf retries neither.
        failing = cluster.kmock.inject(Fault(PATCH_STATUS, "reject", status=500, times=3))
        await finish(cluster, first)
        status = await cluster.wait("the status", lambda: (
            s if stage(s := cluster.status(name), "stage2").get("phase") == "Submitted"
            else None), timeout=CONVERGE)
    assert failing.hits == 3
    assert stage(status, "stage1")["phase"] == "Succeeded"
    assert invariants.violations == []
    assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:2])


@pytest.mark.asyncio
async def test_a_lost_status_patch_still_posts_its_events_once(cluster: Cluster) -> None:
    """Stored, then answered 500: the repeat carries the now stale resourceVersion (409), the
    fresh read finds the status written, and its events are posted then, once."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    lost = cluster.kmock.inject(Fault(PATCH_STATUS, "lose"))
    async with running_operator():
        await cluster.create_pipeline(cr)
        await cluster.wait("StageSubmitted", lambda: any(
            r == "StageSubmitted" for _, r, _ in cluster.events()), timeout=CONVERGE)
        await asyncio.sleep(0.3)  # room for a duplicate to show up
    assert lost.hits == 1
    assert [r for _, r, _ in cluster.events()].count("StageSubmitted") == 1
    assert stage(cluster.status(name), "stage1")["phase"] == "Submitted"


@pytest.mark.asyncio
async def test_a_status_conflict_is_planned_again_from_fresh_state(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two operators overlap (a rolling update): while the first one's status patch is on its
    way, the second sees stage 1 succeed, starts stage 2 and writes that. The first one's patch,
    planned from the older state, must not overwrite it: its resourceVersion is stale (409), so
    it reads again and plans again."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    # The first one's status patch waits while the other reconciles (six calls): its client
    # must not time out meanwhile, or the race is not the one staged here.
    monkeypatch.setenv("PROLONG_API_TIMEOUT_SECONDS", "10")
    first, other = load_handlers(), load_handlers()  # two processes: two sets of locks
    api = first.kube_client()
    await cluster.create_pipeline(cr)
    await asyncio.to_thread(first.reconcile, api, NAMESPACE, name)  # stage 1's preparation
    await cluster.wait("stage 1 prepared", lambda: any(
        j.get("status") for j in cluster.jobs().values()))
    await asyncio.to_thread(first.reconcile, api, NAMESPACE, name)  # stage 1's RayJob
    await cluster.set_rayjob(rayjob_for(cr, "stage1"), "Running", "RUNNING")
    cluster.jobs_end = None  # stage 2's preparation stays running

    hook_errors: list[BaseException] = []

    async def the_other_operator_moves_on() -> None:
        await cluster.set_rayjob(rayjob_for(cr, "stage1"), "Complete", "SUCCEEDED")
        try:
            await asyncio.to_thread(other.reconcile, other.kube_client(), NAMESPACE, name)
        except BaseException as exc:  # shown below: the race did not happen as staged
            hook_errors.append(exc)
            raise

    racing = cluster.kmock.inject(Fault(PATCH_STATUS, "before",
                                        hook=the_other_operator_moves_on))
    plan = await asyncio.to_thread(first.reconcile, api, NAMESPACE, name)
    assert racing.hits == 1 and not hook_errors, hook_errors
    status = cluster.status(name)
    assert [s["phase"] for s in status["stages"]] == ["Succeeded", "Preparing", "Pending",
                                                      "Pending"]
    assert [s.phase for s in plan.status.stages][:2] == ["Succeeded", "Preparing"]
    # The other one created stage 2's preparation; this one found it.
    assert plan.creates == () and plan.prepares == ()
    assert sorted(cluster.rayjobs()) == [rayjob_for(cr, "stage1")]
    assert len(cluster.jobs()) == 2


@pytest.mark.asyncio
async def test_a_rayjob_name_held_by_another_owner_blocks_the_stage(cluster: Cluster) -> None:
    """A same-named pipeline was deleted and its RayJob still waits for the garbage collector:
    the stage waits, says why, and is not started under another name; once the name is free,
    it starts."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    pipeline, jobs = pipeline_from_resource(cr)
    _, leftover = render_stage(pipeline, jobs, "stage1", namespace=NAMESPACE,
                               managed_by="prolong-operator")
    leftover["metadata"]["ownerReferences"] = [{
        "apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline", "name": name,
        "uid": "uid-0", "controller": True, "blockOwnerDeletion": True}]
    await cluster.create(RAYJOBS, leftover)
    invariants = Invariants(cluster, cr)
    async with running_operator():
        await cluster.create_pipeline(cr)
        status = await cluster.wait_status(name, lambda s: s.get("conditions") and
                                           stage(s, "stage1")["phase"] == "Pending")
        stage1 = stage(status, "stage1")
        assert "uid-0" in stage1["message"]
        assert rayjob_for(cr, "stage1") in stage1["message"]
        stalled = condition(status, "Stalled")
        assert (stalled["status"], stalled["reason"]) == ("True", "NameTaken")
        await cluster.wait("StageBlocked", lambda: ("Warning", "StageBlocked") in
                           [(t, r) for t, r, _ in cluster.events()])
        assert list(cluster.rayjobs()) == [rayjob_for(cr, "stage1")]  # nothing under another name

        await cluster.delete(RAYJOBS, rayjob_for(cr, "stage1"))
        await cluster.wait("our stage 1", lambda: (cluster.rayjobs().get(
            rayjob_for(cr, "stage1")) or {}).get("metadata", {}).get("ownerReferences", [{}])[0]
            .get("uid") == "uid-1", timeout=CONVERGE)
        status = await cluster.wait_status(name, lambda s: stage(s, "stage1")
                                           .get("phase") == "Submitted")
    assert condition(status, "Stalled")["status"] == "False"
    assert invariants.violations == []


@pytest.mark.asyncio
async def test_a_configmap_name_held_by_another_owner_blocks_the_stage(cluster: Cluster) -> None:
    """The operator does not list ConfigMaps: the create's 409 is what finds this one, and the
    RayJob that would mount it (to be garbage collected with its owner) is not created."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    pipeline, jobs = pipeline_from_resource(cr)
    leftover, _ = render_stage(pipeline, jobs, "stage1", namespace=NAMESPACE,
                               managed_by="prolong-operator")
    leftover["metadata"]["ownerReferences"] = [{
        "apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline", "name": name,
        "uid": "uid-0", "controller": True, "blockOwnerDeletion": True}]
    await cluster.create(CONFIGMAPS, leftover)
    await cluster.create_pipeline(cr)
    handlers = load_handlers()
    plan = await asyncio.to_thread(handlers.reconcile, handlers.kube_client(), NAMESPACE, name)
    assert plan.creates == () and cluster.rayjobs() == {}
    stage1 = stage(cluster.status(name), "stage1")
    assert stage1["phase"] == "Pending"
    assert f"ConfigMap {leftover['metadata']['name']}" in stage1["message"]
    assert "uid-0" in stage1["message"]


@pytest.mark.asyncio
async def test_an_orphan_of_the_same_run_is_adopted_not_run_again(cluster: Cluster) -> None:
    """Stage 1 was submitted alone (``prolongctl submit``) and finished before the pipeline was
    created: its RayJob has the stage's name and id but no owner. The pipeline adopts it (owner,
    managed-by) and goes on to stage 2, instead of running stage 1 a second time."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    pipeline, jobs = pipeline_from_resource(cr)
    _, orphan = render_stage(pipeline, jobs, "stage1", namespace=NAMESPACE,
                             managed_by="prolongctl")
    await cluster.create(RAYJOBS, orphan)
    await cluster.set_rayjob(orphan["metadata"]["name"], "Complete", "SUCCEEDED")
    invariants = Invariants(cluster, cr)
    async with running_operator():
        await cluster.create_pipeline(cr)
        status = await cluster.wait_status(name, lambda s: stage(s, "stage2")
                                           .get("phase") == "Submitted")
    adopted = cluster.rayjobs()[rayjob_for(cr, "stage1")]
    assert [o["uid"] for o in adopted["metadata"]["ownerReferences"]] == ["uid-1"]
    assert adopted["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "prolong-operator"
    assert stage(status, "stage1")["phase"] == "Succeeded"
    assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:2])
    assert invariants.violations == []


@pytest.mark.asyncio
async def test_a_watch_disconnect_resumes(cluster: Cluster) -> None:
    """Every watch stream ends and the API server refuses new watches of RayJobs for a while
    (a restart); stage 1 succeeds meanwhile. Once watches come back, the operator sees it and
    starts stage 2, long before the 60 s resync."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    invariants = Invariants(cluster, cr)
    first = rayjob_for(cr, "stage1")
    async with running_operator():
        await cluster.create_pipeline(cr)
        await cluster.wait_rayjob(first)
        await cluster.set_rayjob(first, "Running", "RUNNING")
        await cluster.wait_status(name, lambda s: stage(s, "stage1").get("phase") == "Running")
        down = cluster.kmock.inject(Fault(request_of(KOPF_CLIENT, kmock.action.WATCH, RAYJOBS),
                                          "reject", status=503, times=None))
        # The preparation Jobs' watch is refused too: its re-list after the cut would otherwise
        # start a reconcile that reads stage 1's new state without any RayJob watch.
        jobs_down = cluster.kmock.inject(Fault(request_of(KOPF_CLIENT, kmock.action.WATCH,
                                                          BATCH_JOBS),
                                               "reject", status=503, times=None))
        assert cluster.kmock.cut_watches() >= 2  # the pipelines' and the RayJobs'
        await cluster.wait("a refused watch", lambda: down.hits >= 1 and jobs_down.hits >= 1)
        await cluster.set_rayjob(first, "Complete", "SUCCEEDED")
        await asyncio.sleep(0.5)
        assert rayjob_for(cr, "stage2") not in cluster.rayjobs()  # the watch really was down
        cluster.kmock.faults.remove(down)
        cluster.kmock.faults.remove(jobs_down)
        await cluster.wait_rayjob(rayjob_for(cr, "stage2"))
        status = await cluster.wait_status(name, lambda s: stage(s, "stage2")
                                           .get("phase") == "Submitted")
    assert stage(status, "stage1")["phase"] == "Succeeded"
    assert invariants.violations == []
