"""Every path a stage reads lies in a volume its pods mount (prolong.k8s.mounts), checked on the
rendered pods themselves: the Ray head, the workers and the preparation Job."""

from __future__ import annotations

from pathlib import Path, PurePosixPath

import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.mounts import mount_issues, read_paths
from prolong.k8s.rayjob import render_preparation
from prolong.spec import SpecError
from prolong.specfile import parse_document
from tests.conftest import JOBS, job_dict
from tests.k8s.conftest import shipped_stage_renders

runner = CliRunner()
PROLONG_8B = JOBS / "prolong-8b"


def _ray_container_only(pod: dict) -> dict:
    """A Ray pod with its Ray container alone (KubeRay's: the first; a sidecar such as HTTPMode's
    driver-log follower reads nothing of the stage's)."""
    return {**pod, "containers": pod["containers"][:1]}


def _pods(objs: list[dict]) -> dict[str, dict]:
    """Pod spec of the head, the workers and the preparation Job of a rendered stage."""
    _, rayjob, prep = objs
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = {"head": _ray_container_only(cluster["headGroupSpec"]["template"]["spec"]),
            "workers": _ray_container_only(cluster["workerGroupSpecs"][0]["template"]["spec"])}
    if prep is not None:
        pods["preparation"] = prep["spec"]["template"]["spec"]
    return pods


def _mounted(pod: dict, path: str) -> dict | None:
    """The mount of ``pod``'s every container that holds ``path`` (None when one lacks it),
    with its volume's claim: read from the render, not from the rule."""
    claims = {v["name"]: v["persistentVolumeClaim"]["claimName"] for v in pod["volumes"]
              if "persistentVolumeClaim" in v}
    found = None
    for container in [*pod.get("initContainers", []), *pod["containers"]]:
        holders = [m for m in container["volumeMounts"] if m["name"] in claims and
                   (PurePosixPath(path) == PurePosixPath(m["mountPath"]) or
                    PurePosixPath(m["mountPath"]) in PurePosixPath(path).parents)]
        if not holders:
            return None
        found = max(holders, key=lambda m: len(m["mountPath"]))
    return found


PROLONG_8B_STAGES = [(label, job, [cm, rj, prep]) for label, job, cm, rj, prep
                     in shipped_stage_renders() if label.startswith("prolong-8b/")]


@pytest.mark.parametrize(("label", "job", "objs"), PROLONG_8B_STAGES,
                         ids=[s[0] for s in PROLONG_8B_STAGES])
def test_every_prolong_8b_stage_renders_with_all_its_paths_mounted(label, job, objs):
    assert mount_issues(job) == []
    paths = read_paths(job)
    assert any(f.startswith(("data.streams", "dataDir")) for f, _, _ in paths)
    for role, pod in _pods(objs).items():
        for field, value, written in paths:
            mount = _mounted(pod, value)
            assert mount is not None, f"{label}: {role} pod does not mount {field} {value}"
            assert not (written and mount.get("readOnly")), f"{label}: {field} is read-only"


def test_every_shipped_job_file_passes_the_rule_when_it_names_a_volume():
    """validate applies the rule to every stage that names a volume; the quickstart names none
    (it runs on a laptop) and stays valid."""
    files = sorted(JOBS.glob("*/*.yaml"))
    result = runner.invoke(app, ["validate", *map(str, files)])
    assert result.exit_code == 0, result.output
    assert result.stdout.count("ok  ") == len(files)


def test_day_one_stage1_without_the_data_volume_is_refused_in_one_line(tmp_path: Path):
    """The shipped stage 1 as it was before this rule: /data in no pod. validate exits 2 with one
    line naming the file, the field and the rule; submit creates nothing (it exits before any
    cluster is asked: the kubeconfig points nowhere)."""
    raw = job_dict("prolong-8b/stage1-64k.yaml")
    del raw["spec"]["cluster"]["kubernetes"]
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    line = result.stderr.strip()
    assert "\n" not in line
    assert line.startswith(f"{path}: spec.data.streams[0].path: is not under a volume the "
                           "stage's pods mount (mounted: /mnt/prolong (storage.volumeClaim))")
    assert "cluster.kubernetes.volumes" in line and "(+9 more" in line
    submit = runner.invoke(app, ["submit", str(path), "--dry-run"],
                           env={"KUBECONFIG": str(tmp_path / "none")})
    assert submit.exit_code == 2 and submit.stderr.strip() == line
    assert "would create" not in submit.output


@pytest.mark.parametrize(("edit", "field", "rule"), [
    (lambda s: s["data"]["streams"][0].update(path="/scratch/code"),
     "spec.data.streams[0].path", "is not under a volume"),
    (lambda s: s["model"].update(stagedPath="/data/models/llama"),
     "spec.model.stagedPath", "is written by the stage but /data"),
    (lambda s: s["storage"].update(root="./runs"), "spec.storage.root", "is not under a volume"),
    (lambda s: s["data"].update(preparedDir="/tmp/shards"), "spec.data.preparedDir",
     "is not under a volume"),
])
def test_each_path_a_stage_reads_is_held_to_the_mounts(edit, field, rule):
    raw = job_dict("prolong-8b/stage1-64k.yaml")
    edit(raw["spec"])
    before = mount_issues(parse_document(job_dict("prolong-8b/stage1-64k.yaml")))
    issues = {i.path: i.rule for i in mount_issues(parse_document(raw))}
    assert before == [] and rule in issues[field]


def test_eval_paths_and_a_pipeline_stage_name_their_file(tmp_path: Path):
    """An eval's dataDir, nliModel, sizingTokenizer and judge.helmetDir; in a pipeline with
    inline stages the issue names the pipeline file and the stage's path in it."""
    raw = job_dict("prolong-8b/eval.yaml")
    raw["spec"].update(nliModel="/models/t5-nli", sizingTokenizer="/data/tok")
    issues = mount_issues(parse_document(raw))
    assert [i.path for i in issues] == ["spec.nliModel"]
    pipeline = {"apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline",
                "metadata": {"name": "p"},
                "spec": {"stages": [{"name": "eval", "kind": "EvalJob",
                                     "spec": {**raw["spec"], "model": {"source": "/data/m"}}}]}}
    path = tmp_path / "pipeline.yaml"
    path.write_text(yaml.safe_dump(pipeline, sort_keys=False))
    result = runner.invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    assert result.stderr.startswith(f"{path}: spec.stages[0].spec.nliModel: is not under")


def test_volumes_are_mounted_in_every_pod_as_declared():
    raw = job_dict("prolong-8b/stage1-64k.yaml")
    raw["spec"]["cluster"]["kubernetes"]["volumes"].append(
        {"claim": "scratch", "mountPath": "/scratch", "subPath": "team-a", "readOnly": False})
    job = parse_document(raw)
    from prolong.k8s.rayjob import render_standalone
    from prolong.stage.identity import standalone_stage

    _, rayjob = render_standalone(job)
    objs = [None, rayjob, render_preparation(job, standalone_stage(job))]
    for role, pod in _pods(objs).items():
        mount = _mounted(pod, "/scratch/x")
        assert mount is not None and mount["subPath"] == "team-a" and not mount["readOnly"], role
        assert _mounted(pod, "/data/x")["readOnly"] is True, role


def test_a_volume_needs_a_claim_and_an_absolute_path():
    raw = job_dict("prolong-8b/stage1-64k.yaml")
    raw["spec"]["cluster"]["kubernetes"]["volumes"] = [{"claim": "Data", "mountPath": "data"}]
    with pytest.raises(SpecError) as err:
        parse_document(raw)
    paths = {i.path for i in err.value.issues}
    assert {"spec.cluster.kubernetes.volumes[0].claim",
            "spec.cluster.kubernetes.volumes[0].mountPath"} <= paths
