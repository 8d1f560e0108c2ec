"""A stage's preparation Job (prolong.k8s.preparation): CPU only, valid under Kubernetes' own
schema, the hub token in the staging step alone; ``submit`` completes it before it creates the
RayJob (kmock over HTTP, the test playing the Job controller), and the RayJob's entrypoint
refuses data that was not prepared."""

from __future__ import annotations

import asyncio
from pathlib import Path

import kmock
import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.preparation import HF_TOKEN_ENV, PREPARE_CONTAINER, STAGE_CONTAINER
from prolong.k8s.rayjob import ENTRYPOINT, GPU_RESOURCE
from tests.conftest import JOBS, quickstart_on_volume
from tests.k8s import test_submit
from tests.k8s.conftest import shipped_stage_renders
from tests.k8s.test_submit import Api, cli
from tests.operator.conftest import BATCH_JOBS, CONFIGMAPS, RAYJOBS

api = test_submit.api


ALL = shipped_stage_renders()


@pytest.mark.parametrize(("label", "job", "cm", "rj", "prep"), ALL, ids=[a[0] for a in ALL])
def test_the_preparation_job_is_valid_and_cpu_only(label, job, cm, rj, prep, validate_object):
    if job.kind == "EvalJob" and job.spec.model.staged_path is None:
        assert prep is None  # nothing to stage, no shards: the eval needs no preparation
        return
    validate_object(prep)  # kubernetes-validate, strict, batch/v1 Job
    pod = prep["spec"]["template"]["spec"]
    containers = [*pod.get("initContainers", []), *pod["containers"]]
    head = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert pod["restartPolicy"] == "Never"
    assert pod["securityContext"] == head["securityContext"]
    assert {"name": "prolong-spec", "configMap": {"name": cm["metadata"]["name"]}} in \
        pod["volumes"]
    assert not any(t.get("key") == GPU_RESOURCE for t in pod.get("tolerations", []))
    for c in containers:
        assert GPU_RESOURCE not in c["resources"]["limits"]
        assert c["image"] == head["containers"][0]["image"]
        assert c["command"][-1 if c["name"] == STAGE_CONTAINER else 3] == "/etc/prolong/job.yaml"
        token = [e for e in c["env"] if e["name"] == HF_TOKEN_ENV]
        # The hub token reaches the staging step only; data preparation never downloads.
        assert bool(token) == (c["name"] == STAGE_CONTAINER and
                               job.spec.model.hub_token_secret is not None)
    names = [c["name"] for c in containers]
    assert names[-1] == (PREPARE_CONTAINER if job.kind != "EvalJob" else STAGE_CONTAINER)
    assert prep["metadata"]["name"] == rj["metadata"]["name"] + "-prep"
    assert "--require-prepared" in rj["spec"]["entrypoint"] == ENTRYPOINT


def test_stage1_of_prolong_8b_stages_then_prepares():
    (_, job, _, _, prep), = [a for a in ALL if a[0] == "prolong-8b/stage1"]
    pod = prep["spec"]["template"]["spec"]
    assert [c["command"][:3] for c in pod["initContainers"]] == [["prolongctl", "model", "stage"]]
    (main,) = pod["containers"]
    assert main["command"][:3] == ["prolongctl", "data", "prepare"]
    assert main["command"][4:6] == ["--workers", str(job.spec.cluster.kubernetes.prepare.cpus)]
    assert main["resources"]["limits"] == {"cpu": "16", "memory": "64Gi"}


def test_the_entrypoint_refuses_unprepared_data_in_one_line(tmp_path: Path, monkeypatch):
    """``prolongctl run --require-prepared`` (what the RayJob runs): a stage whose data was not
    prepared is refused before Ray starts, in one line."""
    jobs = quickstart_on_volume(tmp_path / "quickstart", tmp_path / "runs")
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["run", str(jobs / "stage1.yaml"), "--require-prepared",
                                      "--no-progress"])
    assert result.exit_code == 1
    line = result.stderr.strip()
    assert "\n" not in line and line.startswith("prolongctl run: stage quickstart-stage1 is not "
                                                "prepared: ")
    assert "preparation Job" in line
    assert not (tmp_path / "runs" / "data" / "shards").exists()  # nothing was prepared here


def _stage_file(tmp_path: Path) -> Path:
    return quickstart_on_volume(tmp_path / "quickstart", tmp_path / "runs") / "stage1.yaml"


def _creates(api: Api) -> list[str]:
    return [r.resource.plural for r in api.kmock if r.action == kmock.action.CREATE
            and r.resource in (CONFIGMAPS, BATCH_JOBS, RAYJOBS)]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_submit_completes_the_preparation_before_it_creates_the_rayjob(api: Api,
                                                                             tmp_path: Path):
    api.jobs_end = None  # the preparation runs until the test ends it
    path = _stage_file(tmp_path)
    submitting = asyncio.create_task(cli("submit", str(path)))
    await api.wait("the preparation Job", lambda: api.jobs())
    await asyncio.sleep(0.3)  # submit polls the Job: no RayJob while it runs
    assert api.rayjobs() == {} and not submitting.done()
    (name,) = api.jobs()
    await api.set_job(name, "Complete")
    result = await asyncio.wait_for(submitting, 20)
    assert result.exit_code == 0, result.output
    assert _creates(api) == ["configmaps", "jobs", "rayjobs"]
    (rayjob,) = api.rayjobs()
    assert name == f"{rayjob}-prep"
    assert "waiting for preparation Job" in result.stderr
    again = await cli("submit", str(path))  # the same stage: nothing new
    assert again.exit_code == 0 and _creates(api) == ["configmaps", "jobs", "rayjobs"]


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_failed_preparation_creates_no_rayjob(api: Api, tmp_path: Path):
    api.jobs_end = "Failed"
    result = await cli("submit", str(_stage_file(tmp_path)))
    assert result.exit_code == 1
    line = result.stderr.strip().splitlines()[-1]
    assert "failed (BackoffLimitExceeded: Job has reached the specified backoff limit); " \
           "RayJob not created, no GPU asked for" in line
    assert "kubectl logs" in line and "delete the Job and submit again" in line
    assert api.rayjobs() == {} and _creates(api) == ["configmaps", "jobs"]


def test_render_prints_the_preparation_between_configmap_and_rayjob():
    result = CliRunner().invoke(app, ["render", str(JOBS / "prolong-8b" / "eval.yaml")])
    assert result.exit_code == 0, result.output
    assert [o["kind"] for o in yaml.safe_load_all(result.stdout)] == ["ConfigMap", "RayJob"]
    result = CliRunner().invoke(app, ["render", str(JOBS / "prolong-8b" / "sft.yaml")])
    assert [o["kind"] for o in yaml.safe_load_all(result.stdout)] == ["ConfigMap", "Job",
                                                                        "RayJob"]
