"""One namespace story: submit resolves the namespace as kubectl does, and refuses a pipeline for
a namespace that no operator watches (the chart's marker ConfigMap), unless
--no-operator-check."""

from __future__ import annotations

import os
from pathlib import Path

import helm_python as helm
import kmock
import pytest
import yaml

from prolong.k8s.client import kube_client
from prolong.k8s.kube_backend import OPERATOR_MARKER
from prolong.k8s.kubeconfig import resolve_namespace
from tests.conftest import chart_values
from tests.k8s import test_submit
from tests.k8s.test_submit import Api, cli, inline_pipeline
from tests.operator.apiserver import OPERATOR_CLIENT, Fault, UidApiServer, named, request_of
from tests.operator.conftest import CONFIGMAPS, NAMESPACE, PIPELINES

CHART = Path(__file__).resolve().parents[2] / "charts"
api = test_submit.api  # the kmock API fixture of the other submit tests


@pytest.fixture
def kmock_options() -> dict:
    return {"cls": UidApiServer}


def _kubeconfig(path: Path, current: str | None, contexts: dict[str, str | None],
                server: str = "https://a.example:6443") -> Path:
    doc = {"apiVersion": "v1", "kind": "Config",
           "clusters": [{"name": "c", "cluster": {"server": server}}],
           "users": [{"name": "u", "user": {}}],
           "contexts": [{"name": n, "context": {"cluster": "c", "user": "u",
                                                **({"namespace": ns} if ns else {})}}
                        for n, ns in contexts.items()]}
    if current:
        doc["current-context"] = current
    path.write_text(yaml.safe_dump(doc))
    return path


def test_the_namespace_is_kubectls(tmp_path, monkeypatch):
    monkeypatch.delenv("POD_NAMESPACE", raising=False)
    first = _kubeconfig(tmp_path / "a", "ml", {"ml": "ml-team"}, "https://first:6443")
    # A later file's current-context and same-named context lose (kubectl: the first wins);
    # the kubernetes package alone would take the second file's current-context.
    second = _kubeconfig(tmp_path / "b", "other", {"other": "elsewhere", "ml": "not-this"},
                         "https://second:6443")
    monkeypatch.setenv("KUBECONFIG", os.pathsep.join([str(tmp_path / "missing"), str(first),
                                                      str(second)]))
    assert resolve_namespace(None) == ("ml-team", "kubeconfig context ml")
    assert resolve_namespace("x")[0] == "x"
    assert kube_client().configuration.host == "https://first:6443"  # the same context

    monkeypatch.setenv("KUBECONFIG", str(_kubeconfig(tmp_path / "c", "bare", {"bare": None})))
    assert resolve_namespace(None)[0] == "default"

    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "none"))
    monkeypatch.setenv("HOME", str(tmp_path))  # no ~/.kube/config either: in-cluster rules
    monkeypatch.setenv("POD_NAMESPACE", "from-pod")
    assert resolve_namespace(None) == ("from-pod", "$POD_NAMESPACE")


def chart_markers(values: dict) -> list[dict]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(chart_values(values), name="prolong", namespace="ml", is_install=True)
    return [o for name, text in manifests.items() if not name.endswith("NOTES.txt")
            for o in yaml.safe_load_all(text) if o and o["kind"] == "ConfigMap"
            and o["metadata"]["name"] == OPERATOR_MARKER]


def test_the_chart_marks_the_namespaces_its_operator_watches():
    (one,) = chart_markers({})
    assert one["metadata"]["namespace"] == "ml" and one["data"]["watches"] == "namespace ml"
    wide = chart_markers({"rbac": {"clusterWide": True},
                          "networkPolicy": {"stageNamespaces": ["team-a", "ml"]}})
    assert sorted(m["metadata"]["namespace"] for m in wide) == ["ml", "team-a"]
    assert {m["data"]["watches"] for m in wide} == {"all namespaces"}
    assert chart_markers({"operator": {"enabled": False}}) == []


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_submit_refuses_a_namespace_no_operator_watches(api: Api, tmp_path):
    api.kmock.objects[CONFIGMAPS, NAMESPACE, OPERATOR_MARKER] = None  # no operator here
    path = inline_pipeline(tmp_path)
    refused = await cli("submit", str(path))
    assert refused.exit_code == 2, refused.output
    line = refused.stderr.strip()
    assert "\n" not in line and f"no prolong operator watches namespace {NAMESPACE}" in line
    assert "--no-operator-check" in line
    assert api.creates(PIPELINES) == 0
    status = await cli("status", "quickstart")
    assert status.exit_code == 2  # nothing there

    forced = await cli("submit", str(path), "--no-operator-check")
    assert forced.exit_code == 0, forced.output
    assert api.creates(PIPELINES) == 1
    status = await cli("status", "quickstart")
    assert f"no prolong operator watches namespace {NAMESPACE}" in status.stdout

    # The chart's own marker, as it renders it for this namespace: accepted.
    (marker,) = [m for m in chart_markers({}) if m]
    marker["metadata"]["namespace"] = NAMESPACE
    api.kmock.objects[CONFIGMAPS, NAMESPACE, OPERATOR_MARKER] = marker
    again = await cli("submit", str(inline_pipeline(tmp_path, stage2_steps=7)))
    assert again.exit_code == 0, again.output
    assert "updated ProLongPipeline" in again.stderr


@pytest.mark.asyncio
@pytest.mark.timeout(60)
async def test_a_user_who_cannot_read_the_marker_is_warned_not_refused(api: Api, tmp_path):
    api.kmock.inject(Fault(named(request_of(OPERATOR_CLIENT, kmock.action.FETCH, CONFIGMAPS),
                                 OPERATOR_MARKER), "reject", status=403))
    result = await cli("submit", str(inline_pipeline(tmp_path)))
    assert result.exit_code == 0, result.output
    assert f"warning: cannot tell whether an operator watches namespace {NAMESPACE}" in \
        result.stderr and "HTTP 403" in result.stderr
    assert api.creates(PIPELINES) == 1
