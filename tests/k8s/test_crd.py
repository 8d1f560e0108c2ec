"""The ProLongPipeline CRD: generated from the models, structural, and accepting what we render."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from prolong.k8s import render
from prolong.k8s.crd import CRD_PATH, crd, crd_yaml
from prolong.k8s.dashboard import DASHBOARD_PATH, dashboard_json
from prolong.reconcile.status import PipelineStatus, StageStatus
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from prolong.train.metrics import METRICS

REPO = Path(__file__).resolve().parents[2]
PIPELINES = [REPO / "jobs" / "prolong-8b" / "pipeline.yaml", REPO / "jobs" / "quickstart" / "pipeline.yaml"]
REGENERATE = "run: .venv/bin/python -m prolong.k8s.crd"


@pytest.fixture(scope="module")
def schema() -> dict[str, Any]:
    return crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


@pytest.fixture(scope="module")
def validator(k8s):
    return k8s.crd_validator(crd(), "v1alpha1")


def test_committed_crd_matches_the_models():
    assert CRD_PATH.read_text() == crd_yaml(), f"charts/crds is stale; {REGENERATE}"


def test_committed_dashboard_matches_the_metrics():
    assert DASHBOARD_PATH.read_text() == dashboard_json(), \
        "run: .venv/bin/python -m prolong.k8s.dashboard"
    exprs = " ".join(t["expr"] for p in json.loads(dashboard_json())["panels"] for t in p["targets"])
    for metric in METRICS:
        assert metric.prometheus == f"ray_prolong_{metric.name}" and metric.prometheus in exprs


def _structural_problems(node: Any, path: str = "") -> list[str]:
    out = []
    if not isinstance(node, dict):
        return [f"{path}: not a schema object"]
    for junctor in ("$ref", "anyOf", "oneOf", "allOf", "not", "$defs", "definitions", "const",
                    "prefixItems", "discriminator"):
        if junctor in node:
            out.append(f"{path}: has {junctor}")
    if "type" not in node and not node.get("x-kubernetes-preserve-unknown-fields") \
            and not node.get("x-kubernetes-int-or-string"):
        out.append(f"{path}: no type")
    if node.get("additionalProperties") is False:
        out.append(f"{path}: additionalProperties false")
    if "additionalProperties" in node and "properties" in node:
        out.append(f"{path}: both properties and additionalProperties")
    if node.get("type") == "array" and "items" not in node:
        out.append(f"{path}: array without items")
    for name, sub in node.get("properties", {}).items():
        out += _structural_problems(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        out += _structural_problems(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        out += _structural_problems(node["additionalProperties"], f"{path}.*")
    return out


def test_schema_is_structural(schema):
    assert _structural_problems(schema) == []
    assert "$ref" not in json.dumps(schema)
    stage = schema["properties"]["spec"]["properties"]["stages"]["items"]
    assert stage["properties"]["spec"]["x-kubernetes-preserve-unknown-fields"] is True
    assert "pydantic" in stage["properties"]["spec"]["description"]
    assert stage["properties"]["kind"]["enum"] == ["PretrainJob", "SFTJob", "EvalJob"]


def test_crd_object(schema, k8s):
    obj = crd()
    k8s.kube_validate(obj, "CustomResourceDefinition")
    spec = obj["spec"]
    assert (spec["group"], spec["scope"], spec["names"]["kind"]) == \
        ("prolong.dev", "Namespaced", "ProLongPipeline")
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1" and version["subresources"] == {"status": {}}
    columns = {c["name"]: c["jsonPath"] for c in version["additionalPrinterColumns"]}
    assert columns == {"Phase": ".status.phase", "Stage": ".status.currentStage",
                       "Age": ".metadata.creationTimestamp"}
    # Descriptions come from the docstrings.
    retries = schema["properties"]["spec"]["properties"]["maxStageRetries"]
    assert retries["description"].startswith("Times a failed stage is resubmitted")
    stage_status = schema["properties"]["status"]["properties"]["stages"]["items"]["properties"]
    assert {"name", "phase", "rayJob", "dashboardURL", "id", "outputURI", "startTime",
            "completionTime", "attempts", "message"} <= set(stage_status)
    assert stage_status["rayJob"]["nullable"] is True


@pytest.mark.parametrize("path", PIPELINES, ids=lambda p: p.parent.name)
def test_schema_accepts_rendered_pipelines(path, validator, tmp_path, k8s):
    (cr,) = render(load(path), namespace="ml")
    assert k8s.errors_of(validator, cr) == []
    status = PipelineStatus(phase="Running", current_stage="stage2", observed_generation=1,
                            stages=[StageStatus(name="stage1", phase="Succeeded", id="abcd1234",
                                                attempts=1,
                                                start_time=datetime.now(timezone.utc))])
    with_status = {**cr, "status": status.model_dump(mode="json", by_alias=True)}
    assert k8s.errors_of(validator, with_status) == []
    # The custom resource is self-contained: loading it again gives the same stage ids.
    # (prolong.spec.Metadata knows name and labels only: the operator passes those two on.)
    meta = {k: v for k, v in cr["metadata"].items() if k in ("name", "labels")}
    (tmp_path / "cr.yaml").write_text(yaml.safe_dump({**cr, "metadata": meta}))
    again = load(tmp_path / "cr.yaml")
    original = load(path)
    assert [r.id for r in pipeline_stages(again.document, again.jobs)] == \
        [r.id for r in pipeline_stages(original.document, original.jobs)]


def test_schema_rejects_bad_pipelines(validator, k8s):
    (cr,) = render(load(PIPELINES[1]))
    bad_kind = json.loads(json.dumps(cr))
    bad_kind["spec"]["stages"][0]["kind"] = "TrainJob"
    no_spec = json.loads(json.dumps(cr))
    del no_spec["spec"]["stages"][1]["spec"]
    typo = json.loads(json.dumps(cr))
    typo["spec"]["maxStageRetry"] = 1
    long_name = json.loads(json.dumps(cr))
    long_name["metadata"]["name"] = "x" * 39
    for bad in (bad_kind, no_spec, typo, long_name):
        assert k8s.errors_of(validator, bad)
