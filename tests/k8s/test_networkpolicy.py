"""The chart's NetworkPolicies, read the way Kubernetes enforces them: who may reach which port of
which Ray pod. The pods are the real ones: the pod templates of stage RayJobs that
prolong.k8s.rayjob renders (head, workers, KubeRay's submitter) and the chart's RayCluster, with
the labels KubeRay adds; the policies come from Helm's own engine."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import helm_python as helm
import pytest
import yaml

from prolong.k8s import render
from prolong.specfile import load
from prolong.stage.names import STAGE_ID_LABEL
from tests.conftest import chart_values

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts"
NAMESPACE = "ml"
# Every port a Ray node listens on by default: GCS, dashboard (job submission), client, metrics,
# dashboard agent, object manager, a node manager / worker port.
RAY_PORTS = (6379, 8265, 10001, 8080, 52365, 8076, 10002, 19999)
KUBERAY = ("kuberay-system", {"app.kubernetes.io/name": "kuberay-operator"})
PROMETHEUS = ("monitoring", {"app.kubernetes.io/name": "prometheus"})
NOTEBOOK = (NAMESPACE, {"app": "notebook"})  # any other pod of the namespace


def _render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(chart_values(values), name="prolong", namespace=NAMESPACE, is_install=True)
    manifests.pop("prolong/templates/NOTES.txt", None)
    return [o for text in manifests.values() for o in yaml.safe_load_all(text) if o]


# -- NetworkPolicy semantics (networking.k8s.io/v1) -------------------------------------------

def selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    """A LabelSelector ({} selects everything)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for expr in selector.get("matchExpressions") or ():
        key, op, values = expr["key"], expr["operator"], expr.get("values") or []
        if not {"In": key in labels and labels[key] in values,
                "NotIn": key not in labels or labels[key] not in values,
                "Exists": key in labels, "DoesNotExist": key not in labels}[op]:
            return False
    return True


def _peer_admits(peer: dict[str, Any], policy_ns: str, src_ns: str,
                 src_labels: dict[str, str]) -> bool:
    if "ipBlock" in peer:
        return False  # pod-to-pod traffic here
    ns_labels = {"kubernetes.io/metadata.name": src_ns}
    if "namespaceSelector" in peer:
        if not selects(peer["namespaceSelector"], ns_labels):
            return False
    elif src_ns != policy_ns:  # a podSelector alone: the policy's own namespace
        return False
    return selects(peer.get("podSelector") or {}, src_labels)


def _port_admits(rule: dict[str, Any], port: int) -> bool:
    if not rule.get("ports"):
        return True
    return any(p.get("protocol", "TCP") == "TCP"
               and p["port"] <= port <= p.get("endPort", p["port"]) for p in rule["ports"])


def reachable(policies: list[dict[str, Any]], src: tuple[str, dict[str, str]],
              dst: tuple[str, dict[str, str]], port: int) -> bool:
    """Whether a pod (namespace, labels) may open a TCP connection to another on ``port``."""
    dst_ns, dst_labels = dst
    isolating = [p for p in policies if p["metadata"]["namespace"] == dst_ns
                 and "Ingress" in p["spec"].get("policyTypes", ["Ingress"])
                 and selects(p["spec"]["podSelector"], dst_labels)]
    if not isolating:
        return True
    return any(_port_admits(rule, port)
               and (not rule.get("from") or any(_peer_admits(peer, p["metadata"]["namespace"],
                                                             *src) for peer in rule["from"]))
               for p in isolating for rule in p["spec"].get("ingress") or ())


# -- the pods ------------------------------------------------------------------------------

def stage_pods(path: str) -> dict[str, tuple[str, dict[str, str]]]:
    """head / worker / submitter of a stage's RayJob: (namespace, labels as KubeRay sets them)."""
    _, rayjob = render(load(REPO / path), namespace=NAMESPACE)
    spec = rayjob["spec"]
    cluster = f"{rayjob['metadata']['name']}-abcde"  # KubeRay's generated RayCluster name
    out = {}
    for role, template in (("head", spec["rayClusterSpec"]["headGroupSpec"]["template"]),
                           ("worker", spec["rayClusterSpec"]["workerGroupSpecs"][0]["template"]),
                           ("submitter", spec.get("submitterPodTemplate"))):
        if template is not None:
            labels = dict(template["metadata"]["labels"])
            if role != "submitter":
                labels.update({"ray.io/cluster": cluster, "ray.io/is-ray-node": "yes",
                               "ray.io/node-type": role})
            out[role] = (NAMESPACE, labels)
    return out


def chart_cluster_pods(objs: list[dict[str, Any]]) -> dict[str, tuple[str, dict[str, str]]]:
    (cluster,) = [o for o in objs if o["kind"] == "RayCluster"]
    name = cluster["metadata"]["name"]
    head = cluster["spec"]["headGroupSpec"]["template"]["metadata"]["labels"]
    worker = cluster["spec"]["workerGroupSpecs"][0]["template"]["metadata"]["labels"]
    ray = {"ray.io/cluster": name, "ray.io/is-ray-node": "yes"}  # KubeRay labels every pod so
    return {"head": (NAMESPACE, {**head, **ray, "ray.io/node-type": "head"}),
            "worker": (NAMESPACE, {**worker, **ray, "ray.io/node-type": "worker"})}


def policies_of(objs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [o for o in objs if o["kind"] == "NetworkPolicy"]


# -- the tests -------------------------------------------------------------------------------

@pytest.mark.parametrize("values", [{}, {"rbac": {"clusterWide": True}},
                                    {"operator": {"enabled": False}, "rayCluster": {"enabled": True}}])
def test_every_render_has_the_policies(values, validate_object):
    objs = _render(values)
    names = {p["metadata"]["name"] for p in policies_of(objs)}
    assert {"prolong-ray-stages", "prolong-ray-stage-heads"} <= names
    if values.get("rayCluster", {}).get("enabled"):
        assert {"prolong-ray", "prolong-ray-head"} <= names
    for policy in policies_of(objs):
        validate_object(policy)
        # The label the policy keys on is the one the renderer puts on stage pods.
        if policy["metadata"]["name"].startswith("prolong-ray-stage"):
            (expr,) = policy["spec"]["podSelector"]["matchExpressions"]
            assert expr == {"key": STAGE_ID_LABEL, "operator": "Exists"}


@pytest.mark.parametrize("path", ["jobs/prolong-8b/stage2-512k.yaml", "jobs/quickstart/stage1.yaml"])
def test_a_stage_cluster_is_closed_but_to_itself_and_kuberay(path):
    policies = policies_of(_render({}))
    pods = stage_pods(path)
    # HTTPMode (the default): KubeRay's operator submits to the head's dashboard, no submitter
    # pod (K8sJobMode's is labelled like the stage: test_rayjob).
    assert set(pods) == {"head", "worker"}
    head = pods["head"]
    for port in RAY_PORTS:
        for member in pods.values():
            assert reachable(policies, member, head, port), (member, port)
            assert reachable(policies, member, pods["worker"], port), (member, port)
        # Metrics (8080) are open to every pod by default (metricsFrom); nothing else is.
        assert reachable(policies, NOTEBOOK, head, port) == (port == 8080), port
        assert reachable(policies, KUBERAY, head, port) == (port in (8265, 8080)), port
        assert reachable(policies, PROMETHEUS, head, port) == (port == 8080), port
        assert reachable(policies, PROMETHEUS, pods["worker"], port) == (port == 8080), port
        assert reachable(policies, KUBERAY, pods["worker"], port) == (port == 8080), port


def test_the_long_lived_cluster_is_its_own_zone():
    objs = _render({"rayCluster": {"enabled": True},
                    "networkPolicy": {"clientsFrom": [{"namespaceSelector": {"matchLabels": {
                        "kubernetes.io/metadata.name": "notebooks"}}}], "metricsFrom": []}})
    policies = policies_of(objs)
    pods = chart_cluster_pods(objs)
    stage = stage_pods("jobs/quickstart/stage1.yaml")
    notebook = ("notebooks", {"app": "jupyter"})
    for port in RAY_PORTS:
        assert reachable(policies, pods["worker"], pods["head"], port)
        assert reachable(policies, pods["head"], pods["worker"], port)
        # A stage cluster is another cluster: no way into this one, nor back.
        assert not reachable(policies, stage["head"], pods["head"], port)
        assert not reachable(policies, pods["worker"], stage["head"], port)
        assert reachable(policies, notebook, pods["head"], port) == (port in (8265, 10001))
        assert not reachable(policies, notebook, pods["worker"], port)
        assert not reachable(policies, PROMETHEUS, pods["head"], port)  # metricsFrom: []
        assert reachable(policies, KUBERAY, pods["head"], port) == (port == 8265)


def test_stage_namespaces_and_kuberay_namespace_are_values():
    values = {"networkPolicy": {"stageNamespaces": ["ml", "team-b"], "kuberayOperator": {
        "namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "kuberay-system"}},
        "podSelector": {"matchLabels": {"app.kubernetes.io/name": "kuberay-operator"}}}}}
    policies = policies_of(_render(values))
    head = stage_pods("jobs/quickstart/stage1.yaml")["head"]
    other_head = ("team-b", head[1])
    impostor = ("ml", KUBERAY[1])  # the operator's labels on a pod in another namespace
    assert not reachable(policies, NOTEBOOK, other_head, 6379)
    assert reachable(policies, KUBERAY, other_head, 8265)
    assert not reachable(policies, impostor, head, 8265)
    # Without the policy (a namespace not listed) nothing is closed: the test can tell.
    assert reachable(policies, NOTEBOOK, ("team-c", head[1]), 6379)


def test_disabled_renders_none():
    assert not policies_of(_render({"networkPolicy": {"enabled": False},
                                    "rayCluster": {"enabled": True}}))
