"""``prolongctl submit STAGE_FILE`` for a stage that starts from another, over HTTP against kmock:
the stage is resolved through the pipeline file that references it, gets its upstream's real id
and directory, and is refused (exit 2, nothing created) while that upstream is not complete."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from prolong.data.prepare import tokenizer_ref
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from prolong.stage.payload import JOB_FILE, STAGE_FILE
from tests.conftest import JOBS, quickstart_on_volume
from tests.k8s import test_submit
from tests.k8s.test_submit import Api, cli
from tests.operator.conftest import CONFIGMAPS, PIPELINES, RAYJOBS

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
QUICKSTART = JOBS / "quickstart"
api = test_submit.api  # the kmock API fixture of the other submit tests


@pytest.fixture(autouse=True)
def quickstart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The quickstart files with their storage on a volume, as a stage submitted to Kubernetes
    needs (tests.conftest.quickstart_on_volume): QUICKSTART names this test's copy."""
    copy = quickstart_on_volume(tmp_path / "quickstart", tmp_path / "runs")
    monkeypatch.setattr(sys.modules[__name__], "QUICKSTART", copy)
    return copy


@pytest.fixture
def refs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, quickstart: Path) -> dict:
    """The quickstart pipeline's stages. Their storage root is an empty directory of tmp_path,
    so it holds no COMPLETE marker unless a test writes one."""
    monkeypatch.chdir(tmp_path)
    loaded = load(QUICKSTART / "pipeline.yaml")
    return {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}


def rayjob_of(stage: str, refs: dict) -> str:
    return f"quickstart-{stage}-{refs[stage].id}"


async def test_stage2_is_refused_while_stage1_has_not_run(api: Api, refs: dict) -> None:
    result = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert result.exit_code == 2, result.output
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{QUICKSTART / 'stage2.yaml'}: spec.model.fromStage: stage stage1")
    assert f"(id {refs['stage1'].id}) is not complete: not run" in line
    assert "--with-upstream" in line and "nothing created" in line
    assert api.creates(RAYJOBS) == 0 and api.creates(CONFIGMAPS) == 0


async def test_stage2_after_stage1_succeeded_names_stage1s_real_id_and_directory(
        api: Api, refs: dict, tmp_path: Path) -> None:
    # Stage 1 submitted from its own file lands where the pipeline puts it.
    first = await cli("submit", str(QUICKSTART / "stage1.yaml"))
    assert first.exit_code == 0, first.output
    stage1 = rayjob_of("stage1", refs)
    assert stage1 in api.rayjobs()
    assert api.rayjobs()[stage1]["metadata"]["annotations"]["prolong.dev/directory"] == \
        refs["stage1"].directory

    await api.set_rayjob(stage1, "Running", "RUNNING")
    running = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert running.exit_code == 2 and f"running (RayJob {stage1})" in running.stderr

    await api.set_rayjob(stage1, "Complete", "FAILED", message="worker died")
    failed = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert failed.exit_code == 2 and f"failed (RayJob {stage1}: worker died)" in failed.stderr
    assert api.creates(RAYJOBS) == 1

    await api.set_rayjob(stage1, "Complete", "SUCCEEDED")
    done = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert done.exit_code == 0, done.output
    assert f"upstream stage stage1: RayJob {stage1} succeeded" in done.stderr
    stage2 = rayjob_of("stage2", refs)
    rayjob = api.rayjobs()[stage2]
    labels = rayjob["metadata"]["labels"]
    assert (labels["prolong.dev/pipeline"], labels["prolong.dev/stage"]) == ("quickstart",
                                                                             "stage2")
    files = api.configmaps()[f"{stage2}-spec"]["data"]
    stage_json = json.loads(files[STAGE_FILE])
    assert stage_json["upstream"] == [refs["stage1"].id]
    assert stage_json["upstreamStages"] == {
        "stage1": {"id": refs["stage1"].id, "directory": refs["stage1"].directory}}
    assert stage_json["id"] == refs["stage2"].id

    # The entrypoint's own reading of those two files (prolongctl run /etc/prolong/job.yaml):
    # stage 2 of the pipeline, starting from stage 1's directory, with stage 1's tokenizer.
    # Imported here: the runner loads torch and the eval harness, which the other tests skip.
    from prolong.run.runner import stages_of

    etc = tmp_path / "etc-prolong"
    etc.mkdir()
    for name, text in files.items():
        (etc / name).write_text(text)
    entry = load(etc / JOB_FILE)
    ((job, ref, upstream_dirs),) = stages_of(entry)
    assert ref == refs["stage2"]
    assert upstream_dirs == {"stage1": refs["stage1"].directory}
    assert tokenizer_ref(job, entry).location == f"{refs['stage1'].directory}/final"


async def test_a_complete_marker_is_enough(api: Api, refs: dict, tmp_path: Path) -> None:
    marker = tmp_path / refs["stage1"].directory / "COMPLETE"
    marker.parent.mkdir(parents=True)
    marker.write_text("")
    result = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert result.exit_code == 0, result.output
    assert "COMPLETE marker" in result.stderr
    assert list(api.rayjobs()) == [rayjob_of("stage2", refs)]


async def test_a_pipeline_status_that_says_succeeded_is_enough(api: Api, refs: dict) -> None:
    assert (await cli("submit", str(QUICKSTART / "pipeline.yaml"))).exit_code == 0
    await api.set_pipeline_status("quickstart", {"phase": "Running", "stages": [
        {"name": "stage1", "id": refs["stage1"].id, "phase": "Succeeded"}]})
    result = await cli("submit", str(QUICKSTART / "stage2.yaml"))
    assert result.exit_code == 0, result.output
    assert "ProLongPipeline quickstart says Succeeded" in result.stderr


async def test_with_upstream_submits_the_pipeline_up_to_the_stage(api: Api, refs: dict) -> None:
    result = await cli("submit", str(QUICKSTART / "stage2.yaml"), "--with-upstream")
    assert result.exit_code == 0, result.output
    cr = api.pipeline("quickstart")
    assert [s["name"] for s in cr["spec"]["stages"]] == ["stage1", "stage2"]
    assert api.creates(RAYJOBS) == 0  # the operator runs the pipeline

    # Again: the resource runs these stages already. A full pipeline is never cut down.
    again = await cli("submit", str(QUICKSTART / "stage2.yaml"), "--with-upstream")
    assert again.exit_code == 0 and "nothing changed" in again.stderr
    assert (await cli("submit", str(QUICKSTART / "pipeline.yaml"))).exit_code == 0
    every = len(refs)  # all of the pipeline's stages
    assert every > 2 and len(api.pipeline("quickstart")["spec"]["stages"]) == every
    sft = await cli("submit", str(QUICKSTART / "stage2.yaml"), "--with-upstream")
    assert sft.exit_code == 0 and len(api.pipeline("quickstart")["spec"]["stages"]) == every
    assert api.creates(PIPELINES) == 1


async def test_a_fromstage_file_no_pipeline_references_is_refused(api: Api,
                                                                  tmp_path: Path) -> None:
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(QUICKSTART / "stage2.yaml", alone / "stage2.yaml")
    result = await cli("submit", str(alone / "stage2.yaml"))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip().startswith(f"{alone / 'stage2.yaml'}: spec.model.fromStage: "
                                            "starts from stage 'stage1', but no pipeline file")
    assert api.creates(RAYJOBS) == 0

    # Named explicitly, the pipeline must reference the file.
    elsewhere = await cli("submit", str(alone / "stage2.yaml"), "--pipeline",
                          str(QUICKSTART / "pipeline.yaml"))
    assert elsewhere.exit_code == 2
    assert "spec.stages: no stage has ref: stage2.yaml" in elsewhere.stderr


async def test_render_resolves_the_stage_through_its_pipeline(refs: dict) -> None:
    result = await cli("render", str(QUICKSTART / "stage2.yaml"))
    assert result.exit_code == 0, result.output
    configmap, prep, _ = yaml.safe_load_all(result.stdout)
    assert prep["kind"] == "Job"  # the preparation Job sits between ConfigMap and RayJob
    assert json.loads(configmap["data"][STAGE_FILE])["upstreamStages"]["stage1"]["id"] == \
        refs["stage1"].id
    assert "unresolved:" not in result.stdout


async def test_dry_run_without_a_cluster_checks_here(tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    from typer.testing import CliRunner

    from prolong.cli import app

    # A kubeconfig whose server refuses connections: configured, but not reachable.
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "gone",
        "clusters": [{"name": "gone", "cluster": {"server": "http://127.0.0.1:9"}}],
        "contexts": [{"name": "gone", "context": {"cluster": "gone", "user": "u",
                                                   "namespace": "ml"}}],
        "users": [{"name": "u", "user": {}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    monkeypatch.chdir(tmp_path)
    result = CliRunner().invoke(app, ["submit", str(QUICKSTART / "stage2.yaml"), "--dry-run"])
    assert result.exit_code == 0, result.output
    assert "dry run (client-side, checked against KubeRay's RayJob CRD schema and Kubernetes" \
        in result.stderr
    assert "no cluster reachable" in result.stderr and "RayJob ml/quickstart-stage2-" \
        in result.stderr
    assert "upstream stage stage1" in result.stderr and "not checked" in result.stderr
    kinds = [o["kind"] for o in yaml.safe_load_all(result.stdout)]
    assert kinds == ["ConfigMap", "Job", "RayJob"]  # the preparation Job checked here too

    # Without --dry-run the same cluster is an error (exit 1), not a silent local render.
    real = CliRunner().invoke(app, ["submit", str(QUICKSTART / "stage1.yaml")])
    assert real.exit_code == 1 and "cannot reach the Kubernetes API" in real.stderr


async def test_status_shows_kuberays_reason_and_the_cluster_conditions(api: Api,
                                                                       refs: dict) -> None:
    """prolongctl status on what the operator and KubeRay write for a stage stuck before
    Running (the status is built by the planner itself, from an observed RayJob)."""
    from datetime import datetime, timezone

    from prolong.reconcile.observe import observe_rayjob
    from prolong.reconcile.planner import plan_pipeline

    loaded = load(QUICKSTART / "pipeline.yaml")
    assert (await cli("submit", str(QUICKSTART / "pipeline.yaml"))).exit_code == 0
    rayjob = {"metadata": {"name": rayjob_of("stage1", refs), "labels": {
        "prolong.dev/stage": "stage1", "prolong.dev/stage-id": refs["stage1"].id}},
        "status": {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded",
                   "message": "passed preRunningDeadlineSeconds",
                   "rayClusterStatus": {"state": "", "conditions": [
                       {"type": "HeadPodReady", "status": "False", "reason": "Unschedulable",
                        "message": "0/3 nodes: insufficient nvidia.com/gpu"}]}}}
    plan = plan_pipeline(loaded.document, loaded.jobs, [observe_rayjob(rayjob)],
                         now=datetime.now(timezone.utc), generation=1)
    await api.set_pipeline_status("quickstart",
                                  plan.status.model_dump(mode="json", by_alias=True))
    shown = await cli("status", "quickstart")
    assert shown.exit_code == 0, shown.output
    out = " ".join(shown.stdout.split())
    assert "Failed (DeadlineExceeded)" in out
    assert "stage1: Ray cluster HeadPodReady=False: Unschedulable (0/3 nodes: insufficient " \
           "nvidia.com/gpu)" in out
    assert "condition Stalled=True" in out
