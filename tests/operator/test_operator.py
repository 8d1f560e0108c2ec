"""The operator over HTTP against kmock: kopf's reactor runs our handlers; the test plays the API
server and KubeRay (see conftest.py)."""

from __future__ import annotations

import asyncio
import copy
from datetime import datetime, timezone

import jsonschema
import kmock
import pytest
import yaml

from prolong.stage.names import LABEL_PREFIX
from tests.k8s.conftest import REPO, strict_openapi
from tests.operator.conftest import (
    NAMESPACE,
    Cluster,
    load_handlers,
    pipeline_cr,
    rayjob_for,
    running_operator,
    stage_refs,
)

# A hung watch or handler fails the test instead of the whole run.
pytestmark = pytest.mark.timeout(60)

STAGES = ("stage1", "stage2", "sft", "eval")


async def run_stage(cluster: Cluster, cr: dict, stage: str, attempt: int = 1) -> dict:
    """Wait for the stage's RayJob, then let it run and succeed."""
    name = rayjob_for(cr, stage, attempt)
    rayjob = await cluster.wait_rayjob(name)
    await cluster.set_rayjob(name, "Running", "RUNNING")
    await cluster.set_rayjob(name, "Complete", "SUCCEEDED")
    return rayjob


def assert_fits_the_crd(status: dict) -> None:
    """The status the operator wrote passes the CRD's status schema (unknown fields fail)."""
    crd = yaml.safe_load((REPO / "charts/crds/prolong.dev_prolongpipelines.yaml").read_text())
    (version,) = crd["spec"]["versions"]
    schema = strict_openapi(version["schema"]["openAPIV3Schema"]["properties"]["status"])
    jsonschema.Draft7Validator(schema, format_checker=jsonschema.FormatChecker()).validate(status)


def phases(status: dict) -> list[str]:
    return [s["phase"] for s in status.get("stages", [])]


def condition(status: dict, kind: str) -> dict:
    return next(c for c in status["conditions"] if c["type"] == kind)


@pytest.mark.asyncio
async def test_runs_the_four_stages_in_order_and_owns_what_it_creates(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    refs = stage_refs(cr)
    async with running_operator():
        await cluster.create_pipeline(cr)
        for i, stage in enumerate(STAGES):
            rj_name = rayjob_for(cr, stage)
            rayjob = await cluster.wait_rayjob(rj_name)
            await cluster.set_rayjob(rj_name, "Running", "RUNNING")
            status = await cluster.wait_status(
                name, lambda s, i=i: len(phases(s)) == 4 and phases(s)[i] == "Running")
            assert status["currentStage"] == stage
            assert status["stages"][i]["dashboardURL"].startswith(rj_name)
            assert phases(status)[:i] == ["Succeeded"] * i
            assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:i + 1])

            # What deletion cascades through: both objects are owned by the pipeline.
            owner = {"apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline",
                     "name": name, "uid": "uid-1", "controller": True,
                     "blockOwnerDeletion": True}
            configmap = cluster.configmaps()[f"{rj_name}-spec"]
            assert rayjob["metadata"]["ownerReferences"] == [owner]
            assert configmap["metadata"]["ownerReferences"] == [owner]
            labels = rayjob["metadata"]["labels"]
            assert labels[f"{LABEL_PREFIX}stage-id"] == refs[stage].id
            assert labels[f"{LABEL_PREFIX}attempt"] == "1"
            assert labels["app.kubernetes.io/managed-by"] == "prolong-operator"
            assert rayjob["metadata"]["annotations"][f"{LABEL_PREFIX}directory"] == \
                refs[stage].directory
            await cluster.set_rayjob(rj_name, "Complete", "SUCCEEDED")
        status = await cluster.wait_status(name, lambda s: s.get("phase") == "Succeeded")
    assert phases(status) == ["Succeeded"] * 4
    assert [s["id"] for s in status["stages"]] == [refs[s].id for s in STAGES]
    assert [s["outputURI"] for s in status["stages"]] == [refs[s].directory for s in STAGES]
    assert status["observedGeneration"] == 1
    assert condition(status, "Ready")["status"] == "True"
    assert condition(status, "SpecValid")["status"] == "True"
    assert cluster.rayjob_creates() == 4
    assert_fits_the_crd(status)


@pytest.mark.asyncio
async def test_a_failed_stage_is_retried_then_the_pipeline_fails(cluster: Cluster) -> None:
    cr = pipeline_cr()  # maxStageRetries: 2, so three attempts
    cr["spec"]["retryBackoffSeconds"] = 0  # the backoff has its own test
    name = cr["metadata"]["name"]
    assert cr["spec"]["maxStageRetries"] == 2
    endings = [("Complete", "FAILED", "worker died"),  # KubeRay says Complete for a failed job
               ("Failed", None, "activeDeadlineSeconds exceeded"),
               ("Complete", "STOPPED", "NCCL timeout")]
    async with running_operator():
        await cluster.create_pipeline(cr)
        for attempt, (deployment, job, message) in enumerate(endings, start=1):
            rj_name = rayjob_for(cr, "stage1", attempt)
            rayjob = await cluster.wait_rayjob(rj_name)
            assert rayjob["metadata"]["labels"][f"{LABEL_PREFIX}attempt"] == str(attempt)
            await cluster.set_rayjob(rj_name, deployment, job, message)
        status = await cluster.wait_status(name, lambda s: s.get("phase") == "Failed")
        await asyncio.sleep(0.5)  # give a wrong 4th attempt the time to show up
        assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, "stage1", a) for a in (1, 2, 3))
    assert rayjob_for(cr, "stage1", 2) == rayjob_for(cr, "stage1") + "-r2"
    assert phases(status) == ["Failed", "Pending", "Pending", "Pending"]
    assert status["currentStage"] == "stage1"
    stage1 = status["stages"][0]
    assert stage1["attempts"] == 3
    assert stage1["rayJob"] == rayjob_for(cr, "stage1", 3)
    assert "failed after 3 attempts" in stage1["message"] and "NCCL timeout" in stage1["message"]
    ready, failed = condition(status, "Ready"), condition(status, "StageFailed")
    assert ready["status"] == "False" and ready["reason"] == "Failed"
    assert failed["status"] == "True" and "NCCL timeout" in failed["message"]
    stalled, reconciling = condition(status, "Stalled"), condition(status, "Reconciling")
    assert (stalled["status"], stalled["reason"]) == ("True", "RetriesExhausted")
    assert reconciling["status"] == "False"
    assert all(c["observedGeneration"] == 1 for c in status["conditions"])
    events = await cluster.wait("the last event", lambda: cluster.events()
                                if any(r == "PipelineFailed" for _, r, _ in cluster.events())
                                else None)
    reasons = [(t, r) for t, r, _ in events]
    # The stage's preparation Job first, its RayJob once that completed.
    assert reasons[:2] == [("Normal", "StagePreparing"), ("Normal", "StageSubmitted")]
    assert reasons.count(("Warning", "StageRetried")) == 2
    assert ("Warning", "StageFailed") in reasons and reasons[-1] == ("Warning", "PipelineFailed")
    assert any("NCCL timeout" in m for t, r, m in events if r == "StageFailed")
    assert_fits_the_crd(status)


@pytest.mark.asyncio
async def test_editing_the_eval_stage_reruns_only_eval(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    async with running_operator():
        await cluster.create_pipeline(cr)
        for stage in STAGES:
            await run_stage(cluster, cr, stage)
        before = await cluster.wait_status(name, lambda s: s.get("phase") == "Succeeded")

        edited = copy.deepcopy(cr)
        edited["spec"]["stages"][3]["spec"]["samples"] = 50
        edited["metadata"]["generation"] = 2
        new_eval = rayjob_for(edited, "eval")
        assert new_eval != rayjob_for(cr, "eval")
        await cluster.edit_pipeline(name, edited["spec"], generation=2)
        await cluster.wait_rayjob(new_eval)
        status = await cluster.wait_status(name, lambda s: s.get("observedGeneration") == 2)
        assert phases(status) == ["Succeeded"] * 3 + ["Submitted"]
        assert status["stages"][:3] == before["stages"][:3]  # same ids, same runs, kept
        assert status["stages"][3]["id"] == stage_refs(edited)["eval"].id
        # The finished RayJob of the old eval id stays (history; goes with the pipeline).
        assert sorted(cluster.rayjobs()) == sorted(
            [rayjob_for(cr, s) for s in STAGES] + [new_eval])
        assert cluster.rayjob_creates() == 5

        await run_stage(cluster, edited, "eval")
        status = await cluster.wait_status(name, lambda s: s.get("phase") == "Succeeded")
    assert condition(status, "Ready")["observedGeneration"] == 2


@pytest.mark.asyncio
async def test_a_running_stage_whose_id_changes_is_replaced(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    async with running_operator():
        await cluster.create_pipeline(cr)
        old = rayjob_for(cr, "stage1")
        await cluster.wait_rayjob(old)
        await cluster.set_rayjob(old, "Running", "RUNNING")

        edited = copy.deepcopy(cr)
        edited["spec"]["stages"][0]["spec"]["rerun"] = 1
        edited["spec"]["onSpecChange"] = "replace"
        new = rayjob_for(edited, "stage1")
        await cluster.edit_pipeline(name, edited["spec"], generation=2)
        await cluster.wait_rayjob(new)
        await cluster.wait(f"deletion of {old}", lambda: old not in cluster.rayjobs())
        status = await cluster.wait_status(name, lambda s: s["stages"][0]["rayJob"] == new)
        await cluster.wait("the SpecChangeReplaced event", lambda: any(
            r == "SpecChangeReplaced" and old in m for _, r, m in cluster.events()))
    assert status["stages"][0]["phase"] == "Submitted"
    assert status["stages"][0]["attempts"] == 1
    assert status["specChange"]["policy"] == "replace"
    assert status["specChange"]["replaced"] == [old]
    assert_fits_the_crd(status)


@pytest.mark.asyncio
async def test_under_wait_an_edit_lets_the_running_stage_finish(cluster: Cluster) -> None:
    """onSpecChange wait (the default): the RayJob of the edited running stage is kept; the new
    id is created only once it has ended."""
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    async with running_operator():
        await cluster.create_pipeline(cr)
        old = rayjob_for(cr, "stage1")
        await cluster.wait_rayjob(old)
        await cluster.set_rayjob(old, "Running", "RUNNING")

        edited = copy.deepcopy(cr)
        edited["spec"]["stages"][0]["spec"]["rerun"] = 1
        new = rayjob_for(edited, "stage1")
        await cluster.edit_pipeline(name, edited["spec"], generation=2)
        status = await cluster.wait_status(name, lambda s: s.get("observedGeneration") == 2)
        assert status["specChange"] == {"policy": "wait", "observedGeneration": 2,
                                        "waitingFor": [old], "replaced": [],
                                        "message": status["specChange"]["message"]}
        assert condition(status, "Reconciling")["reason"] == "WaitingForSupersededRun"
        assert_fits_the_crd(status)
        await cluster.wait("the SpecChangeWaiting event", lambda: any(
            r == "SpecChangeWaiting" and old in m for _, r, m in cluster.events()))
        await asyncio.sleep(0.5)
        assert sorted(cluster.rayjobs()) == [old]  # kept, and nothing new beside it

        await cluster.set_rayjob(old, "Complete", "SUCCEEDED")
        await cluster.wait_rayjob(new)
        status = await cluster.wait_status(name, lambda s: s["stages"][0]["rayJob"] == new)
    assert old in cluster.rayjobs()  # history, never deleted
    assert status["specChange"]["waitingFor"] == []


@pytest.mark.asyncio
async def test_a_restarted_operator_creates_no_duplicates(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    async with running_operator():
        await cluster.create_pipeline(cr)
        await run_stage(cluster, cr, "stage1")
        await cluster.wait_rayjob(rayjob_for(cr, "stage2"))
        await cluster.wait_status(name, lambda s: s.get("currentStage") == "stage2")
    assert cluster.rayjob_creates() == 2

    # A fresh handler invocation over the same state, outside kopf: nothing to create.
    handlers = load_handlers()
    patches = cluster.status_patches()
    plan = await asyncio.to_thread(handlers.reconcile, handlers.kube_client(), NAMESPACE, name)
    assert plan.creates == () and plan.deletes == ()
    assert cluster.status_patches() == patches  # the same status: not written again
    assert [s.phase for s in plan.status.stages] == ["Succeeded", "Submitted", "Pending",
                                                     "Pending"]

    # A restarted operator: resumes, lists the RayJobs, creates nothing, then carries on.
    async with running_operator():
        await asyncio.sleep(1.0)
        assert cluster.rayjob_creates() == 2
        await run_stage(cluster, cr, "stage2")
        await cluster.wait_rayjob(rayjob_for(cr, "sft"))
        await cluster.wait_status(name, lambda s: s.get("currentStage") == "sft")
    assert sorted(cluster.rayjobs()) == sorted(rayjob_for(cr, s) for s in STAGES[:3])
    assert cluster.rayjob_creates() == 3


@pytest.mark.asyncio
async def test_an_invalid_spec_is_reported_in_status_not_crashed_on(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    bad = copy.deepcopy(cr)
    bad["spec"]["stages"][3]["spec"]["samples"] = 0
    bad["spec"]["stages"][1]["spec"]["data"]["streams"][0]["proportion"] = 0.9
    async with running_operator():
        await cluster.create_pipeline(bad)
        status = await cluster.wait_status(name, lambda s: s.get("conditions"))
        valid = condition(status, "SpecValid")
        assert valid["status"] == "False" and valid["reason"] == "InvalidSpec"
        assert condition(status, "Stalled")["status"] == "True"  # what Argo CD reads
        assert condition(status, "Reconciling")["status"] == "False"
        await cluster.wait("the InvalidSpec event", lambda: any(
            (t, r) == ("Warning", "InvalidSpec") for t, r, _ in cluster.events()))
        assert "spec.stages[3].spec.samples" in valid["message"]
        assert "\n" not in valid["message"]
        assert cluster.rayjobs() == {}

        await cluster.edit_pipeline(name, cr["spec"], generation=2)
        await cluster.wait_rayjob(rayjob_for(cr, "stage1"))
        status = await cluster.wait_status(
            name, lambda s: condition(s, "SpecValid")["status"] == "True"
            and s["stages"][0]["phase"] == "Submitted")
    assert status["observedGeneration"] == 2
    assert phases(status) == ["Submitted", "Pending", "Pending", "Pending"]


def test_stages_must_be_inline_in_the_cluster() -> None:
    handlers = load_handlers()
    cr = pipeline_cr()
    cr["spec"]["stages"][0] = {"name": "stage1", "ref": "stage1-64k.yaml"}
    with pytest.raises(handlers.SpecError) as err:
        handlers.resolve(cr)
    assert "spec.stages[0].ref" in err.value.one_line()


@pytest.mark.asyncio
async def test_a_stage_whose_output_is_complete_is_skipped(cluster: Cluster, tmp_path) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    for stage in cr["spec"]["stages"]:
        stage["spec"]["storage"]["root"] = str(tmp_path)
    stage1 = stage_refs(cr)["stage1"]
    (tmp_path / name / f"stage1-{stage1.id}").mkdir(parents=True)
    (tmp_path / name / f"stage1-{stage1.id}" / "COMPLETE").write_text("")
    async with running_operator():
        await cluster.create_pipeline(cr)
        await cluster.wait_rayjob(rayjob_for(cr, "stage2"))
        status = await cluster.wait_status(name, lambda s: s.get("currentStage") == "stage2"
                                           and s["stages"][1]["phase"] == "Submitted")
    assert sorted(cluster.rayjobs()) == [rayjob_for(cr, "stage2")]
    assert phases(status) == ["Skipped", "Submitted", "Pending", "Pending"]
    assert status["stages"][0]["outputURI"] == stage1.directory


@pytest.mark.asyncio
async def test_creating_what_exists_is_not_an_error(cluster: Cluster) -> None:
    """A 409 on create means "already there" (two reconciles racing, or a crash between the
    create and the status patch)."""
    handlers = load_handlers()
    cr = pipeline_cr()
    await cluster.create_pipeline(cr)
    pipeline, jobs = handlers.resolve(cr)
    (run,) = handlers.plan_pipeline(pipeline, jobs, [], now=datetime.now(timezone.utc)).creates
    api = handlers.kube_client()
    for _ in range(2):
        await asyncio.to_thread(handlers.create_stage, api, cr, pipeline, jobs, run)
    assert list(cluster.rayjobs()) == [run.name]
    assert list(cluster.configmaps()) == [f"{run.name}-spec"]
    assert cluster.rayjob_creates() == 2


@pytest.mark.asyncio
async def test_a_stage_stuck_initializing_says_why_then_fails_and_backs_off(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    """A RayJob whose cluster never comes up: its conditions reach the stage's status; KubeRay's
    preRunningDeadlineSeconds fails it with its reason; the retry waits out its backoff."""
    monkeypatch.setenv("PROLONG_RESYNC_SECONDS", "0.3")  # read when the handlers load
    cr = pipeline_cr()
    cr["spec"].update(retryBackoffSeconds=2, retryBackoffMaxSeconds=2)
    name = cr["metadata"]["name"]
    first = rayjob_for(cr, "stage1")
    created: dict[str, datetime] = {}  # RayJob -> when the API server stored its create

    def record_creates(request) -> None:
        data = request.data if isinstance(request.data, dict) else {}
        if request.action == kmock.action.CREATE and data.get("kind") == "RayJob":
            created.setdefault(data["metadata"]["name"], datetime.now(timezone.utc))

    cluster.kmock.on_write.append(record_creates)
    async with running_operator():
        await cluster.create_pipeline(cr)
        rayjob = await cluster.wait_rayjob(first)
        assert rayjob["spec"]["preRunningDeadlineSeconds"] == 1800
        assert rayjob["spec"]["jobId"] == first
        await cluster.set_rayjob_status(first, {
            "jobDeploymentStatus": "Initializing", "rayClusterName": f"{first}-abcde",
            "rayClusterStatus": {"state": "", "conditions": [
                {"type": "HeadPodReady", "status": "False", "reason": "ContainersNotReady",
                 "message": "ImagePullBackOff"},
                {"type": "RayClusterProvisioned", "status": "False",
                 "reason": "RayClusterPodsProvisioning"}]}})
        status = await cluster.wait_status(name, lambda s: (s.get("stages") or [{}])[0]
                                           .get("deploymentStatus") == "Initializing")
        stage1 = status["stages"][0]
        assert stage1["phase"] == "Submitted"
        assert "HeadPodReady=False: ContainersNotReady (ImagePullBackOff)" in stage1["message"]
        assert [c["type"] for c in stage1["clusterConditions"]] == ["HeadPodReady",
                                                                    "RayClusterProvisioned"]
        reconciling = condition(status, "Reconciling")
        assert reconciling["status"] == "True" and "ImagePullBackOff" in reconciling["message"]
        assert_fits_the_crd(status)

        # KubeRay gives up at the deadline: the stage waits 2 s, then attempt 2 is created.
        ended = datetime.now(timezone.utc)
        await cluster.set_rayjob_status(first, {
            "jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
            "message": "The RayJob has passed the preRunningDeadlineSeconds",
            "endTime": ended.isoformat().replace("+00:00", "Z")})
        status = await cluster.wait_status(
            name, lambda s: (s.get("stages") or [{}])[0].get("phase") == "Retrying")
        stage1 = status["stages"][0]
        assert stage1["reason"] == "DeadlineExceeded" and stage1["nextAttemptTime"]
        assert "(DeadlineExceeded)" in stage1["message"] and "attempt 2 of 3" in stage1["message"]
        assert condition(status, "Reconciling")["reason"] == "RetryBackoff"
        assert_fits_the_crd(status)
        assert rayjob_for(cr, "stage1", 2) not in cluster.rayjobs()  # not before the backoff
        await cluster.wait_rayjob(rayjob_for(cr, "stage1", 2))
        # The 2 s backoff, not the 0.3 s resync: attempt 2 exists no earlier than endTime + 2 s.
        waited = (created[rayjob_for(cr, "stage1", 2)] - ended).total_seconds()
        assert waited >= 2, f"attempt 2 created {waited:.2f} s after the failed attempt's endTime"
        await cluster.wait("events", lambda: ("Warning", "StageRetried") in
                           [(t, r) for t, r, _ in cluster.events()])
    reasons = [(t, r) for t, r, _ in cluster.events()]
    assert reasons.index(("Normal", "StageSubmitted")) < \
        reasons.index(("Warning", "StageAttemptFailed")) < reasons.index(("Warning", "StageRetried"))
    failed_msg = next(m for _, r, m in cluster.events() if r == "StageAttemptFailed")
    assert "DeadlineExceeded" in failed_msg


@pytest.mark.asyncio
async def test_kuberay_retrying_a_job_is_shown_not_counted_as_a_failure(cluster: Cluster) -> None:
    cr = pipeline_cr()
    name = cr["metadata"]["name"]
    first = rayjob_for(cr, "stage1")
    async with running_operator():
        await cluster.create_pipeline(cr)
        await cluster.wait_rayjob(first)
        await cluster.set_rayjob_status(first, {
            "jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "reason": "AppFailed",
            "message": "Ray job failed; KubeRay resubmits (backoffLimit)"})
        status = await cluster.wait_status(name, lambda s: (s.get("stages") or [{}])[0]
                                           .get("deploymentStatus") == "Retrying")
    stage1 = status["stages"][0]
    assert (stage1["phase"], stage1["jobStatus"], stage1["reason"]) == ("Submitted", "FAILED",
                                                                        "AppFailed")
    assert "KubeRay resubmits" in stage1["message"]
    assert cluster.rayjob_creates() == 1  # KubeRay's own retry is not a new attempt
