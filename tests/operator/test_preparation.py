"""The operator prepares a stage (its CPU-only preparation Job: model staging, data preparation)
before it asks for the stage's GPUs (its RayJob), through kopf's real watch loop against kmock
over HTTP; the test plays the Job controller."""

from __future__ import annotations

import asyncio

import kmock
import pytest

from tests.operator.conftest import (
    BATCH_JOBS,
    RAYJOBS,
    Cluster,
    pipeline_cr,
    rayjob_for,
    running_operator,
)
from tests.operator.test_operator import assert_fits_the_crd, condition, phases

pytestmark = pytest.mark.timeout(90)


def creates(cluster: Cluster) -> list[tuple[str, str]]:
    """(plural, name) of every Job and RayJob created, in order."""
    out = []
    for r in cluster.kmock:
        if r.action == kmock.action.CREATE and r.resource in (BATCH_JOBS, RAYJOBS):
            body = r.data if isinstance(r.data, dict) else {}
            out.append((r.resource.plural, (body.get("metadata") or {}).get("name")))
    return out


@pytest.mark.asyncio
async def test_the_rayjob_is_created_only_once_the_preparation_completed(cluster: Cluster):
    cluster.jobs_end = None  # the preparation runs until the test ends it
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    prep = rayjob_for(cr, "stage1") + "-prep"
    async with running_operator():
        await cluster.create_pipeline(cr)
        status = await cluster.wait_status(name, lambda s: phases(s)[:1] == ["Preparing"])
        assert prep in status["stages"][0]["message"]
        assert status["phase"] == "Running" and status["currentStage"] == "stage1"
        assert condition(status, "Reconciling")["reason"] == "Preparing"
        assert_fits_the_crd(status)
        job = cluster.jobs()[prep]
        assert job["metadata"]["ownerReferences"][0]["uid"] == "uid-1"
        assert job["metadata"]["labels"]["prolong.dev/role"] == "preparation"
        await asyncio.sleep(1.0)  # reconciles come and go: still no RayJob, no second Job
        assert cluster.rayjobs() == {} and list(cluster.jobs()) == [prep]

        await cluster.set_job(prep, "Complete")
        await cluster.wait_rayjob(rayjob_for(cr, "stage1"))
        status = await cluster.wait_status(name, lambda s: phases(s)[:1] == ["Submitted"])
        await cluster.wait("the StageSubmitted event", lambda: "StageSubmitted" in
                           [r for _, r, _ in cluster.events()])
    assert creates(cluster) == [("jobs", prep), ("rayjobs", rayjob_for(cr, "stage1"))]
    reasons = [r for _, r, _ in cluster.events()]
    assert reasons.index("StagePreparing") < reasons.index("StageSubmitted")


@pytest.mark.asyncio
async def test_a_failed_preparation_fails_the_stage_without_a_rayjob(cluster: Cluster):
    cluster.jobs_end = "Failed"
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    async with running_operator():
        await cluster.create_pipeline(cr)
        status = await cluster.wait_status(name, lambda s: s.get("phase") == "Failed")
        await asyncio.sleep(0.5)  # no RayJob, no retry shows up
    stage1 = status["stages"][0]
    assert phases(status) == ["Failed", "Pending", "Pending", "Pending"]
    assert "preparation Job" in stage1["message"] and "BackoffLimitExceeded" in \
        stage1["message"] and "no RayJob created" in stage1["message"]
    assert condition(status, "Stalled")["status"] == "True"
    assert cluster.rayjobs() == {} and len(cluster.jobs()) == 1
    assert_fits_the_crd(status)
