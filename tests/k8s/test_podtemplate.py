"""cluster.podTemplate: Kubernetes' strategic merge over the rendered pod templates, checked
against the core Pod schema at validate time, scheduling-only."""

from __future__ import annotations

import copy
import gzip
import json

import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.podtemplate import (
    SCHEMA_FILE,
    SCHEMA_KUBE_VERSION,
    PatchError,
    extract_schema,
    patch_errors,
    strategic_merge,
)
from prolong.k8s.rayjob import render_stage
from prolong.k8s.schemas import KUBE_VERSION
from prolong.specfile import dump_yaml, load
from prolong.stage.identity import pipeline_stages
from tests.conftest import JOBS

DO_NOT_DISRUPT = "karpenter.sh/do-not-disrupt"
BASE = {"metadata": {"labels": {"prolong.dev/stage": "s"}},
        "spec": {"containers": [{"name": "ray-worker", "image": "train:1",
                                 "env": [{"name": "A", "value": "1"}],
                                 "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}]}],
                 "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}],
                 "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists"}],
                 "nodeSelector": {"pool": "gpu"}}}


# -- the shipped schema -----------------------------------------------------------------------

def test_the_shipped_schema_is_kubernetes_validates_pod_template():
    assert SCHEMA_KUBE_VERSION == KUBE_VERSION
    with gzip.open(SCHEMA_FILE, "rt") as f:
        shipped = json.load(f)
    assert shipped == extract_schema(), "run python -m prolong.k8s.podtemplate"
    spec = shipped["io.k8s.api.core.v1.PodSpec"]["properties"]
    assert spec["containers"]["x-kubernetes-patch-merge-key"] == "name"
    assert "x-kubernetes-patch-strategy" not in spec["tolerations"]


# -- strategic merge --------------------------------------------------------------------------

def test_lists_with_a_merge_key_merge_by_it():
    patch = {"spec": {
        "containers": [{"name": "ray-worker", "env": [{"name": "B", "value": "2"},
                                                      {"name": "A", "value": "9"}]},
                       {"name": "dcgm", "image": "dcgm:1"}],
        "volumes": [{"name": "cache", "emptyDir": {}}],
        "imagePullSecrets": [{"name": "regcred"}]}}
    out = strategic_merge(BASE, patch)
    containers = out["spec"]["containers"]
    assert [c["name"] for c in containers] == ["ray-worker", "dcgm"]  # Ray stays first
    assert containers[0]["image"] == "train:1"  # untouched fields kept
    assert containers[0]["env"] == [{"name": "A", "value": "9"}, {"name": "B", "value": "2"}]
    assert containers[0]["volumeMounts"] == BASE["spec"]["containers"][0]["volumeMounts"]
    assert [v["name"] for v in out["spec"]["volumes"]] == ["dshm", "cache"]
    assert out["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
    assert out["metadata"] == BASE["metadata"]
    assert BASE["spec"]["containers"][0]["env"] == [{"name": "A", "value": "1"}]  # not mutated


def test_atomic_lists_are_replaced_and_maps_merge():
    patch = {"spec": {"tolerations": [{"key": "pool", "operator": "Equal", "value": "sys"}],
                      "nodeSelector": {"zone": "a"}, "securityContext": {"fsGroup": 1000}}}
    out = strategic_merge(BASE, patch)
    # Kubernetes defines no merge key for tolerations: the patch's list replaces ours.
    assert out["spec"]["tolerations"] == [{"key": "pool", "operator": "Equal", "value": "sys"}]
    assert out["spec"]["nodeSelector"] == {"pool": "gpu", "zone": "a"}
    assert out["spec"]["securityContext"] == {"fsGroup": 1000}


def test_directives_and_nulls():
    out = strategic_merge(BASE, {"spec": {
        "nodeSelector": {"$patch": "replace", "pool": "system"},
        "volumes": [{"name": "dshm", "$patch": "delete"}],
        "containers": [{"name": "ray-worker", "env": [{"$patch": "replace"},
                                                      {"name": "C", "value": "3"}]}]},
        "metadata": {"labels": {"prolong.dev/stage": None}}})
    assert out["spec"]["nodeSelector"] == {"pool": "system"}
    assert out["spec"]["volumes"] == []
    assert out["spec"]["containers"][0]["env"] == [{"name": "C", "value": "3"}]
    assert out["metadata"]["labels"] == {}
    with pytest.raises(PatchError, match=r"spec.containers\[0\]: name is missing"):
        strategic_merge(BASE, {"spec": {"containers": [{"image": "x"}]}})
    # A scalar list with the merge strategy (finalizers) is a set: new values are added.
    fin = strategic_merge({"metadata": {"finalizers": ["a"]}}, {"metadata": {"finalizers": ["b", "a"]}})
    assert fin["metadata"]["finalizers"] == ["a", "b"]


@pytest.mark.parametrize(("patch", "path", "rule"), [
    ({"spec": {"tolerations": [{"key": "a", "efect": "NoSchedule"}]}},
     "spec.tolerations[0].efect", "unknown field (did you mean effect?)"),
    ({"spec": {"priorityClassName": 7}}, "spec.priorityClassName", "is not of type"),
    ({"spec": {"securityContext": {"fsGroup": "users"}}}, "spec.securityContext.fsGroup",
     "is not of type"),
    ({"metadata": {"annotation": {"a": "b"}}}, "metadata.annotation",
     "unknown field (did you mean annotations?)"),
    ({"spec": {"containers": [{"name": "ray-worker", "$patch": "delete"}]}}, "spec.containers",
     "must stay"),
    ({"spec": {"volumes": [{"name": "x", "hostPth": {"path": "/x"}}]}}, "spec.volumes[0].hostPth",
     "unknown field (did you mean hostPath?)"),
    ({"spec": {"affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [{"key": "a", "values": ["b"]}]}]}}}}},
     "spec.affinity.nodeAffinity.requiredDuringSchedulingIgnoredDuringExecution."
     "nodeSelectorTerms[0].matchExpressions[0].operator", "required field is missing"),
    ({"spec": {"containers": [{"name": "a", "image": "b"}, {"image": "c"}]}},
     "spec.containers[1]", "name is missing"),
    ({"spec": {"nodeSelector": {"$patch": "merge-all"}}}, "spec.nodeSelector.$patch",
     "must be one of"),
    ({"spec": {"$retainKeys": ["a"]}}, "spec.$retainKeys", "unsupported patch directive"),
    ({"metadata": {"labels": {"prolong.dev/stage": "x"}}},
     'metadata.labels["prolong.dev/stage"]', "set by prolong"),
])
def test_bad_patches_name_the_path_and_rule(patch, path, rule):
    problems = patch_errors(patch, "ray-worker", ("prolong.dev/",))
    assert problems, patch
    assert problems[0].path == path and rule in problems[0].rule, problems


def test_a_full_example_patch_is_clean():
    assert patch_errors(WORKERS_PATCH, "ray-worker") == []
    assert patch_errors(HEAD_PATCH, "ray-head") == []


# -- rendering a pipeline ---------------------------------------------------------------------

HEAD_PATCH = {"spec": {
    "priorityClassName": "training-high",
    "affinity": {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchExpressions": [
            {"key": "node-pool", "operator": "In", "values": ["system"]}]}]}}},
    "tolerations": [{"key": "CriticalAddonsOnly", "operator": "Exists"}]}}
WORKERS_PATCH = {
    "metadata": {"annotations": {DO_NOT_DISRUPT: "true"}, "labels": {"cost/owner": "llm"}},
    "spec": {
        "priorityClassName": "training-high",
        "imagePullSecrets": [{"name": "regcred"}],
        "securityContext": {"fsGroup": 1000},
        "containers": [
            {"name": "ray-worker", "volumeMounts": [{"name": "nccl-plugin",
                                                     "mountPath": "/usr/local/nccl"}]},
            {"name": "tcpxo-daemon", "image": "us-docker.pkg.dev/gce-ai-infra/tcpxo:v1",
             "securityContext": {"allowPrivilegeEscalation": False,
                                 "capabilities": {"drop": ["ALL"]}}}],
        "volumes": [{"name": "nccl-plugin", "emptyDir": {}}]}}


def _pipeline(write_spec, patches: dict | None, labels: dict | None = None):
    data = yaml.safe_load(dump_yaml(load(JOBS / "prolong-8b/pipeline.yaml").document))
    if labels:
        data["metadata"]["labels"] = labels
    for stage in data["spec"]["stages"]:
        if patches is not None:
            stage["spec"]["cluster"]["podTemplate"] = copy.deepcopy(patches)
    return load(write_spec(data, "pipeline.yaml"))


@pytest.fixture(scope="module")
def patched(tmp_path_factory):
    path = tmp_path_factory.mktemp("pt")

    def write(data, name):
        (path / name).write_text(yaml.safe_dump(data, sort_keys=False))
        return path / name

    return (_pipeline(write, {"head": HEAD_PATCH, "workers": WORKERS_PATCH},
                      {"team": "llm-platform", "kustomize.toolkit.fluxcd.io/name": "pipelines"}),
            _pipeline(write, None))


def _pods(rayjob):
    rc = rayjob["spec"]["rayClusterSpec"]
    return rc["headGroupSpec"]["template"], rc["workerGroupSpecs"][0]["template"]


def test_patches_reach_every_stage_and_validate(patched, validate_object):
    loaded, _ = patched
    for stage in loaded.jobs:
        configmap, rayjob = render_stage(loaded.document, loaded.jobs, stage, namespace="ml")
        head, worker = _pods(rayjob)
        # Head placement: the system pool, never the GPU nodes; the workers keep their own.
        terms = head["spec"]["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"]
        assert terms[0]["matchExpressions"][0]["values"] == ["system"]
        assert head["spec"]["priorityClassName"] == "training-high"
        assert "affinity" not in worker["spec"]
        # A sidecar after the Ray container, whose own fields and mounts are kept and extended.
        names = [c["name"] for c in worker["spec"]["containers"]]
        assert names == ["ray-worker", "tcpxo-daemon"]
        ray = worker["spec"]["containers"][0]
        assert ray["resources"]["limits"].get("nvidia.com/gpu") or stage == "eval"
        assert {m["name"] for m in ray["volumeMounts"]} >= {"dshm", "nccl-plugin"}
        assert worker["spec"]["securityContext"]["fsGroup"] == 1000
        assert worker["spec"]["securityContext"]["runAsNonRoot"] is True  # ours kept
        assert worker["spec"]["imagePullSecrets"] == [{"name": "regcred"}]
        # The annotation reaches the pods of a pipeline stage; labels of the pipeline reach
        # every stage's RayJob and pods, our own stay, a GitOps tool's do not travel.
        assert worker["metadata"]["annotations"] == {DO_NOT_DISRUPT: "true"}
        for labels in (rayjob["metadata"]["labels"], head["metadata"]["labels"],
                       worker["metadata"]["labels"]):
            assert labels["team"] == "llm-platform"
            assert labels["prolong.dev/stage"] == stage
            assert not any(k.startswith("kustomize.toolkit") for k in labels)
        assert worker["metadata"]["labels"]["cost/owner"] == "llm"
        for obj in (configmap, rayjob):
            validate_object(obj)


def test_patches_change_no_stage_id(patched):
    loaded, plain = patched
    ids = [r.id for r in pipeline_stages(loaded.document, loaded.jobs)]
    assert ids == [r.id for r in pipeline_stages(plain.document, plain.jobs)]


def test_an_unpatched_render_is_unchanged_by_the_feature(patched):
    _, plain = patched
    _, rayjob = render_stage(plain.document, plain.jobs, "stage1")
    _, worker = _pods(rayjob)
    assert "annotations" not in worker["metadata"]
    assert "podTemplate" not in yaml.safe_dump(plain.document.model_dump(by_alias=True))


def test_validate_names_the_file_and_path_of_a_bad_field(write_spec):
    data = yaml.safe_load(dump_yaml(load(JOBS / "prolong-8b/pipeline.yaml").document))
    data["spec"]["stages"][1]["spec"]["cluster"]["podTemplate"] = {
        "workers": {"spec": {"tolerations": [{"key": "gpu", "efect": "NoSchedule"}]}}}
    path = write_spec(data, "pipeline.yaml")
    result = CliRunner().invoke(app, ["validate", str(path)])
    assert result.exit_code == 2
    line = result.output.strip()
    assert line == (f"{path}: spec.stages[1].spec.cluster.podTemplate.workers.spec."
                    "tolerations[0].efect: unknown field (did you mean effect?)"), line
