"""The Helm chart, rendered offline with Helm's own engine (helm-python-sdk): lint-clean, every
object valid for Kubernetes 1.30 / KubeRay, least-privilege RBAC, values schema enforced."""

from __future__ import annotations

import json
from pathlib import Path

import helm_python as helm
import kopf
import pytest
import yaml

from prolong.k8s.crd import crd_yaml
from prolong.train.metrics import METRICS
from tests.conftest import chart_values

REPO = Path(__file__).resolve().parents[2]
CHART = REPO / "charts"
H100 = yaml.safe_load((CHART / "ci" / "h100-values.yaml").read_text())
VALUES = {"default": chart_values({}), "h100": H100,
          "cluster-wide": chart_values({
              "rbac": {"clusterWide": True}, "rayCluster": {"enabled": True},
              "monitoring": {"podMonitor": {"enabled": True},
                             "serviceMonitor": {"enabled": True}}}),
          "peering": chart_values({"operator": {"peering": {"enabled": True}, "replicas": 3,
                                                "storage": {"mount": False}}}),
          "cluster-wide-peering": chart_values({"rbac": {"clusterWide": True},
                                                "operator": {"peering": {"enabled": True}}})}
CLUSTER_SCOPED = ("ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering",
                  "ValidatingAdmissionPolicy", "ValidatingAdmissionPolicyBinding")
NAMESPACE = "ml"
# What the operator may touch: (apiGroup, resource). The verbs are checked against the code in
# tests/operator/test_rbac.py.
ALLOWED = {("prolong.dev", "prolongpipelines"), ("prolong.dev", "prolongpipelines/status"),
           ("prolong.dev", "prolongpipelines/finalizers"), ("ray.io", "rayjobs"),
           ("", "configmaps"), ("", "events"), ("", "pods"), ("batch", "jobs")}


@pytest.fixture
def chart():
    """The chart as loaded (per test: Helm's render drops disabled dependencies in place)."""
    with helm.Chart.load(CHART) as loaded:
        yield loaded


@pytest.fixture(scope="module")
def rendered():
    """values name -> (objects, NOTES.txt)."""
    out = {}
    for name, values in VALUES.items():
        with helm.Chart.load(CHART) as chart:
            manifests = chart.render(values, name="prolong", namespace=NAMESPACE,
                                     is_install=True)
        notes = manifests.pop("prolong/templates/NOTES.txt", "")
        objs = [o for text in manifests.values() for o in yaml.safe_load_all(text) if o]
        out[name] = (objs, notes)
    return out


def _kinds(objs):
    return [o["kind"] for o in objs]


def _one(objs, kind):
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


@pytest.mark.parametrize("values", ["default", "h100"])
def test_lint_clean(values):
    report = helm.lint(CHART, VALUES[values], strict=True, namespace=NAMESPACE,
                       kube_version="v1.30.0")
    assert report["errors"] == []
    assert [m for m in report["messages"] if m["severity"] >= 2] == []


@pytest.mark.parametrize("values", list(VALUES))
def test_every_object_is_valid(values, rendered, validate_object):
    objs, notes = rendered[values]
    assert objs
    for obj in objs:
        validate_object(obj)
        if obj["kind"] not in CLUSTER_SCOPED:
            assert obj["metadata"]["namespace"] in (NAMESPACE,)
    assert "KubeRay" in notes


def test_default_install(rendered):
    objs, _ = rendered["default"]
    assert sorted(_kinds(objs)) == sorted(["ServiceAccount", "Role", "RoleBinding", "Deployment",
                                           "PersistentVolumeClaim", "ConfigMap", "ConfigMap",
                                           "NetworkPolicy", "NetworkPolicy", "ClusterRole",
                                           "ClusterRole",  # + marker, users' roles
                                           # the KubeRay CRD reader (tests/operator/test_rbac)
                                           "ClusterRole", "ClusterRoleBinding"])
    pvc = _one(objs, "PersistentVolumeClaim")
    assert pvc["metadata"]["name"] == "prolong-runs"  # what jobs/prolong-8b mount
    assert pvc["spec"]["accessModes"] == ["ReadWriteMany"]
    assert pvc["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    deploy = _one(objs, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    assert container["command"] == ["kopf"]
    args = container["args"]
    assert args[:2] == ["run", "--standalone"] and args[-1] == "/app/operator/handlers.py"
    assert f"--namespace={NAMESPACE}" in args and "--all-namespaces" not in args
    assert deploy["spec"]["replicas"] == 1 and deploy["spec"]["strategy"]["type"] == "Recreate"
    assert deploy["spec"]["template"]["spec"]["securityContext"]["runAsNonRoot"] is True
    assert container["securityContext"]["readOnlyRootFilesystem"] is True
    # The storage PVC, read-only at the storage root: the operator reads COMPLETE markers.
    assert {"name": "storage", "mountPath": "/mnt/prolong", "readOnly": True} in \
        container["volumeMounts"]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "prolong-runs",
                                                         "readOnly": True}} in \
        deploy["spec"]["template"]["spec"]["volumes"]


def _operator_role(objs, kind):
    """The operator's Role or ClusterRole (beside it: the one-CRD reader, test_rbac)."""
    (role,) = [o for o in objs if o["kind"] == kind and o["metadata"]["name"].endswith("-operator")]
    return role


def _rules(objs, kind):
    return _operator_role(_operators(objs), kind)["rules"]


def _operators(objs):
    """The objects of the operator (the users' roles and the marker left out)."""
    def users(o):
        return (o["metadata"].get("labels") or {}).get("app.kubernetes.io/component") == \
            "user-roles"

    def marker(o):
        return o["kind"] == "ConfigMap" and o["metadata"]["name"] == "prolong-operator"

    return [o for o in objs if not users(o) and not marker(o)]


def test_rbac_is_least_privilege(rendered):
    # Cluster-wide, kopf lists no namespaces or CRDs: the handlers turn its scanning off.
    for values, kind, extra in (("default", "Role", set()), ("h100", "Role", set()),
                                ("cluster-wide", "ClusterRole", set())):
        objs = _operators(rendered[values][0])
        assert not [o for o in objs if o["kind"] == ("ClusterRole" if kind == "Role" else "Role")
                    and not o["metadata"]["name"].endswith("-kuberay-crd-reader")]
        granted = set()
        for rule in _rules(objs, kind):
            assert "*" not in rule["verbs"] and "*" not in rule["resources"]
            assert "*" not in rule["apiGroups"]
            granted |= {(g, r) for g in rule["apiGroups"] for r in rule["resources"]}
            if "events" not in rule["resources"]:
                assert "deletecollection" not in rule["verbs"]
        assert granted == ALLOWED | extra, values
        binding = _operator_role(objs, f"{kind}Binding")
        assert binding["roleRef"]["kind"] == kind
        assert binding["subjects"][0]["name"] == _one(objs, "ServiceAccount")["metadata"]["name"]
    args = _one(rendered["cluster-wide"][0], "Deployment")["spec"]["template"]["spec"][
        "containers"][0]["args"]
    assert "--all-namespaces" in args


def test_h100_ray_cluster(rendered):
    objs, notes = rendered["h100"]
    assert "PersistentVolumeClaim" not in _kinds(objs)  # storage.create: false -> existing claim
    cluster = _one(objs, "RayCluster")
    assert len(cluster["metadata"]["name"]) <= 47
    (group,) = cluster["spec"]["workerGroupSpecs"]
    assert group["replicas"] == 2
    pod = group["template"]["spec"]
    limits = pod["containers"][0]["resources"]["limits"]
    assert limits["nvidia.com/gpu"] == "8" and limits["vpc.amazonaws.com/efa"] == "32"
    assert pod["containers"][0]["resources"]["requests"] == limits
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    assert {"name": "storage", "persistentVolumeClaim": {"claimName": "prolong-runs"}} in pod["volumes"]
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert "nvidia.com/gpu" not in head["resources"]["limits"]
    assert cluster["spec"]["authOptions"] == {"mode": "token"}  # token auth by default
    assert cluster["spec"]["rayVersion"] == "2.60.0"
    service = _one(objs, "Service")
    assert service["spec"]["selector"] == {"ray.io/cluster": cluster["metadata"]["name"],
                                           "ray.io/node-type": "head"}
    assert {p["port"] for p in service["spec"]["ports"]} == {8265, 8080}
    monitor = _one(objs, "PodMonitor")
    assert monitor["spec"]["selector"]["matchLabels"] == {"ray.io/is-ray-node": "yes"}
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert "port-forward" in notes


def test_grafana_dashboard(rendered):
    objs, notes = rendered["default"]
    cm = _one(_operators(objs), "ConfigMap")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    # Where it lands, and what kube-prometheus-stack's sidecar needs to find it there.
    assert f"The dashboard's ConfigMap is in namespace {cm['metadata']['namespace']}." in notes
    assert "searchNamespace" in notes and "monitoring.grafanaDashboard.namespace" in notes
    with helm.Chart.load(CHART) as chart:
        moved = chart.render(chart_values({"monitoring": {"grafanaDashboard": {"namespace": "monitoring"}}}),
                             name="prolong", namespace=NAMESPACE, is_install=True)
    assert "The dashboard's ConfigMap is in namespace monitoring." in \
        moved["prolong/templates/NOTES.txt"]
    board = json.loads(cm["data"]["prolong-training.json"])
    exprs = " ".join(t["expr"] for p in board["panels"] for t in p["targets"])
    for name in ("loss", "tokens_per_second", "mfu", "mfu_doc_causal", "grad_norm", "lr",
                 "domain_tokens"):
        assert f"ray_prolong_{name}" in exprs
    assert {m.name for m in METRICS} >= {"loss", "mfu", "mfu_doc_causal"}


def test_chart_ships_the_generated_crd(chart):
    (crd,) = [c for c in chart.crds if c["filename"].endswith("prolong.dev_prolongpipelines.yaml")]
    assert crd["data"] == crd_yaml()
    # and kopf's peering CRDs (operator.peering, from the kopf-peering dependency), both scopes
    (peering,) = [c for c in chart.crds if c["filename"].endswith("kopf.dev_peerings.yaml")]
    kinds = {d["spec"]["names"]["kind"]: d["spec"]["scope"]
             for d in yaml.safe_load_all(peering["data"]) if d}
    assert kinds == {"KopfPeering": "Namespaced", "ClusterKopfPeering": "Cluster"}
    assert len(chart.crds) == 2
    assert chart.metadata["name"] == "prolong" and chart.metadata["apiVersion"] == "v2"


@pytest.mark.parametrize("values", list(VALUES))
def test_peering_crds_come_only_with_peering(chart, values):
    """kopf's peering CRDs sit in the crds/ of a dependency whose condition is
    operator.peering.enabled: Helm installs a dependency's crds/ only when it is enabled, and
    renders its templates (a marker template here) only then."""
    (peering,) = [c for c in chart.crds if c["filename"].endswith("kopf.dev_peerings.yaml")]
    assert "/charts/kopf-peering/crds/" in peering["filename"], peering["filename"]
    (dep,) = [d for d in chart.metadata["dependencies"] if d["name"] == "kopf-peering"]
    assert dep["condition"] == "operator.peering.enabled"
    manifests = chart.render(VALUES[values], name="prolong", namespace=NAMESPACE,
                             is_install=True)
    enabled = any("charts/kopf-peering/" in name for name in manifests)
    assert enabled == bool(VALUES[values].get("operator", {}).get("peering", {}).get("enabled"))


@pytest.mark.parametrize("bad", [
    {"rbac": {"clusterWide": "yes"}},
    {"storage": {"accessModes": ["ReadWriteEverywhere"]}},
    {"rayCluster": {"workers": {"gpusPerNode": -1}}},
    {"operator": {"logFormat": "xml"}},
    {"rayCluster": {"name": "x" * 48}},
    {"monitoring": {"podMonitor": {"enable": True}}},
    {"rayCluster": {"auth": {"mode": "none"}}},
    {"networkPolicy": {"clientsFrom": [{"pods": {"matchLabels": {"a": "b"}}}]}},
    {"networkPolicy": {"stageNamespaces": ["Team_B"]}},
    # An unauthenticated job-submission API on a public address: refused.
    {"dashboard": {"service": {"type": "LoadBalancer"}}, "rayCluster": {"auth": {"mode": "disabled"}}},
])
def test_values_schema_rejects_bad_values(chart, bad):
    with pytest.raises(helm.HelmValuesError):
        chart.validate_schema(bad)
    chart.validate_schema(H100)
    chart.validate_schema(chart_values({"dashboard": {"service": {"type": "LoadBalancer"}}}))


def _container(workload):
    (container,) = workload["spec"]["template"]["spec"]["containers"]
    return container


@pytest.mark.parametrize(("values", "scope"), [("peering", "KopfPeering"),
                                               ("cluster-wide-peering", "ClusterKopfPeering")])
def test_peering_runs_replicas_with_distinct_priorities(values, scope, rendered, chart, k8s):
    objs, _ = rendered[values]
    assert "Deployment" not in _kinds(objs)
    workload = _one(objs, "StatefulSet")
    assert workload["spec"]["replicas"] == (3 if values == "peering" else 2)
    args = _container(workload)["args"]
    assert "--standalone" not in args
    # kopf pauses every replica that shares the highest priority: each takes its ordinal.
    assert "--peering=prolong-operator" in args and "--priority=$(POD_INDEX)" in args
    env = {e["name"]: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath")
           for e in _container(workload)["env"]}
    assert env["POD_INDEX"] == "metadata.labels['apps.kubernetes.io/pod-index']"
    assert env["POD_ID"] == "metadata.name"
    # The peering object kopf patches exists, named as --peering says, valid for kopf's CRD.
    peering = _one(objs, scope)
    assert peering["metadata"]["name"] == "prolong-operator"
    (crd,) = [d for c in chart.crds if c["filename"].endswith("kopf.dev_peerings.yaml")
              for d in yaml.safe_load_all(c["data"]) if d and d["spec"]["names"]["kind"] == scope]
    assert k8s.errors_of(k8s.crd_validator(crd, "v1"), peering) == []
    assert ("namespace" in peering["metadata"]) == (crd["spec"]["scope"] == "Namespaced")
    (rule,) = [r for r in _rules(objs, "ClusterRole" if "cluster" in values else "Role")
               if r["apiGroups"] == ["kopf.dev"]]
    assert rule["resources"] == [crd["spec"]["names"]["plural"]]


def test_standalone_is_one_recreated_replica(rendered):
    objs, _ = rendered["default"]
    assert "StatefulSet" not in _kinds(objs) and "KopfPeering" not in _kinds(objs)
    assert not [r for r in _rules(objs, "Role") if r["apiGroups"] == ["kopf.dev"]]


def test_the_storage_mount_is_optional(rendered):
    pod = _one(rendered["peering"][0], "StatefulSet")["spec"]["template"]["spec"]
    assert "storage" not in {v["name"] for v in pod["volumes"]}
    assert "storage" not in {m["name"] for m in pod["containers"][0]["volumeMounts"]}
    pod = _one(rendered["default"][0], "Deployment")["spec"]["template"]["spec"]
    assert "storage" in {v["name"] for v in pod["volumes"]}


def test_notes_say_how_to_uninstall_and_get_the_token(rendered):
    _, notes = rendered["default"]
    # kopf's finalizer: the pipelines go first, while the operator still runs to release them.
    first, then = notes.index("kubectl delete prolongpipelines"), notes.index("helm uninstall")
    assert first < then
    assert kopf.OperatorSettings().persistence.finalizer in notes
    _, notes = rendered["h100"]
    assert "--ray-token-secret" in notes and "auth_token" in notes


def _gib(quantity: str) -> int:
    return int(str(quantity).removesuffix("Gi")) * 2**30


@pytest.mark.parametrize("values", ["cluster-wide", "h100"])
def test_the_long_lived_ray_cluster_is_restricted_and_its_store_fits_in_shm(values, rendered):
    """The chart's RayCluster: the restricted securityContext every stage's pods have, and an
    object store (Ray's default for the pod's memory) inside /dev/shm."""
    from ray._private import ray_constants

    from prolong.k8s.rayjob import POD_SECURITY_CONTEXT

    objs, _ = rendered[values]
    matches = [o for o in objs if o["kind"] == "RayCluster"]
    if not matches:
        pytest.skip("no RayCluster in these values")
    rc = matches[0]["spec"]
    for group in (rc["headGroupSpec"], *rc["workerGroupSpecs"]):
        spec = group["template"]["spec"]
        assert spec["securityContext"] == POD_SECURITY_CONTEXT
        ctx = spec["containers"][0]["securityContext"]
        assert ctx["allowPrivilegeEscalation"] is False and ctx["capabilities"]["drop"] == ["ALL"]
        (shm,) = [v for v in spec["volumes"] if v["name"] == "dshm"]
        shm_bytes = _gib(shm["emptyDir"]["sizeLimit"])
        if "object-store-memory" in group["rayStartParams"]:
            assert int(group["rayStartParams"]["object-store-memory"]) <= shm_bytes
            continue
        memory = _gib(spec["containers"][0]["resources"]["limits"]["memory"])
        # ray._private.utils.resolve_object_store_memory, with this pod's shm
        cap = min(ray_constants.DEFAULT_OBJECT_STORE_MAX_MEMORY_BYTES,
                  max(ray_constants.REQUIRE_SHM_SIZE_THRESHOLD, int(shm_bytes * 0.95)))
        store = min(int(memory * ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION), cap)
        assert store <= shm_bytes, (group.get("groupName", "head"), store, shm_bytes)


def test_the_install_names_its_images_and_a_storage_class(chart):
    """No image is published under a default name, and the default StorageClass (EBS, PD)
    cannot make a ReadWriteMany claim: an install that names neither is refused, saying what to
    set and how to build the images."""
    with pytest.raises(helm.HelmValuesError):  # the claim the chart creates: its class
        chart.validate_schema({"storage": {"create": True}})
    chart.validate_schema({"storage": {"create": False}})  # an existing claim: none needed
    with pytest.raises(Exception, match=r"operator.image.repository: name the operator image.*"
                                        r"make images REGISTRY"):
        chart.render(chart_values({"operator": {"image": {"repository": ""}}}), name="prolong",
                     namespace=NAMESPACE, is_install=True)
    with pytest.raises(helm.HelmValuesError, match=r"/storage/storageClassName"):
        chart.render(chart_values({"storage": {"storageClassName": ""}}), name="prolong",
                     namespace=NAMESPACE, is_install=True)


def test_images_storage_class_and_fsgroup_as_named(rendered):
    objs, notes = rendered["cluster-wide"]
    assert _one(objs, "PersistentVolumeClaim")["spec"]["storageClassName"] == "efs-sc"
    deploy = _one(objs, "Deployment")
    assert _container(deploy)["image"] == "registry.example.com/ml/prolong-operator:0.1.0"
    ray = _one(objs, "RayCluster")["spec"]
    for group in (ray["headGroupSpec"], *ray["workerGroupSpecs"]):
        pod = group["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.example.com/ml/prolong-train:0.1.0"
        assert pod["securityContext"]["fsGroup"] == 1000 == pod["securityContext"]["runAsUser"]
    assert "make images REGISTRY=<registry>" in notes
    assert "operator: registry.example.com/ml/prolong-operator:0.1.0" in notes
    assert "spec.cluster.image" in notes and "prolongctl doctor" in notes
