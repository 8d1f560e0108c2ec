"""The chart's Role grants exactly what the operator calls: no verb more, none less.

What the operator calls is derived from the code, three ways:

* the handlers' own API calls, read from operator/handlers.py with ast: every method of the
  kubernetes client's CoreV1Api / CustomObjectsApi it names, the verb from the method name and
  the resource from the method name (core) or from the group and plural it passes (custom
  objects). A call this reader cannot resolve fails the test instead of being skipped;
* what kopf itself requests (list, watch, its finalizer and annotation patches, Events, peering),
  recorded over HTTP: kopf's real reactor runs the handlers against kmock through a pipeline's
  life (created, a stage superseded by an edit, its RayJob deleted), in each mode the chart
  renders (namespaced or cluster-wide, standalone or with peering); kopf's requests are told
  apart by their User-Agent;
* what admission requires: an ownerReference with blockOwnerDeletion (handlers.owner_reference)
  needs update on the owner's finalizers under OwnerReferencesPermissionEnforcement.

The rendered Role (ClusterRole with rbac.clusterWide) must equal the union.
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import copy
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import helm_python as helm
import kmock
import kopf
import pytest
import yaml
from kubernetes.client import BatchV1Api, CoreV1Api, CustomObjectsApi

from tests.conftest import chart_values
from tests.operator.conftest import (
    HANDLERS,
    NAMESPACE,
    Cluster,
    load_handlers,
    pipeline_cr,
    rayjob_for,
)

pytestmark = pytest.mark.timeout(120)

CHART = Path(__file__).resolve().parents[2] / "charts"
Grant = tuple[str, str, str]
"""(apiGroup, resource or resource/subresource, verb)"""
API_CLASSES = {"CoreV1Api": CoreV1Api, "BatchV1Api": BatchV1Api,
               "CustomObjectsApi": CustomObjectsApi}
BUILTIN_GROUPS = {"CoreV1Api": "", "BatchV1Api": "batch"}
"""The API group of each built-in API class (its methods name the resource)."""
KUBE_CLIENT_NAMES = {"ApiClient", "ApiException", *API_CLASSES}
"""What the handlers may import from kubernetes.client: a new API class (BatchV1Api, ...) must
be taught to this reader first."""
VERBS = {"get": "get", "read": "get", "list": "list", "create": "create", "delete": "delete",
         "patch": "patch", "replace": "update", "delete_collection": "deletecollection"}
METHOD = re.compile(r"^(delete_collection|get|read|list|create|delete|patch|replace)_"
                    r"(namespaced_|cluster_)?(\w+?)(_status|_log|_scale)?$")
PEERINGS = kmock.resource("kopf.dev/v1/kopfpeerings")
CLUSTER_PEERINGS = kmock.resource("kopf.dev/v1/clusterkopfpeerings")


# -- the handlers' calls (ast) ---------------------------------------------------------------

def _plural(snake: str) -> str:
    """config_map -> configmaps (the core kinds' plurals the handlers may use)."""
    word = snake.replace("_", "")
    return word if word.endswith("s") else f"{word}s"


def handler_calls() -> set[Grant]:
    module = load_handlers()
    tree = ast.parse(HANDLERS.read_text())
    parents = {child: node for node in ast.walk(tree) for child in ast.iter_child_nodes(node)}

    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module == "kubernetes.client":
            names = {a.name for a in node.names}
            assert names <= KUBE_CLIENT_NAMES, f"teach this test {sorted(names - KUBE_CLIENT_NAMES)}"

    def function_of(node: ast.AST) -> ast.AST:
        while node in parents and not isinstance(node, ast.FunctionDef):
            node = parents[node]
        return node

    def tuples_in(scope: ast.AST) -> dict[str, list[ast.expr]]:
        """name -> elements of the tuple literals assigned to a name in this function."""
        out = {}
        for n in ast.walk(scope):
            if isinstance(n, ast.Assign) and isinstance(n.value, ast.Tuple):
                for target in n.targets:
                    if isinstance(target, ast.Name):
                        out[target.id] = list(n.value.elts)
        return out

    def api_args(ref: ast.Attribute) -> list[ast.expr]:
        """The arguments the API method gets: ``m(args)``, ``wrapper(m, args)`` or
        ``wrap(...)(m)(args)``, starred tuples of the same function spread out."""
        parent = parents[ref]
        if isinstance(parent, ast.Call) and parent.func is ref:
            args = parent.args
        elif isinstance(parent, ast.Call) and ref in parent.args:
            outer = parents.get(parent)
            if isinstance(outer, ast.Call) and outer.func is parent and parent.args == [ref]:
                args = outer.args
            else:
                args = parent.args[parent.args.index(ref) + 1:]
        else:
            raise AssertionError(f"handlers.py:{ref.lineno}: {ref.attr} used in a way this test "
                                 "cannot read; call it, or pass it to a wrapper with its args")
        local = tuples_in(function_of(ref))
        spread: list[ast.expr] = []
        for arg in args:
            if isinstance(arg, ast.Starred):
                assert isinstance(arg.value, ast.Name) and arg.value.id in local, \
                    f"handlers.py:{ref.lineno}: cannot read *{ast.unparse(arg.value)}"
                spread += local[arg.value.id]
            else:
                spread.append(arg)
        return spread

    def value(node: ast.expr, line: int) -> str:
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            return node.value
        if isinstance(node, ast.Name) and isinstance(getattr(module, node.id, None), str):
            return getattr(module, node.id)
        raise AssertionError(f"handlers.py:{line}: cannot resolve {ast.unparse(node)} to a "
                             "group or plural; use a module-level constant")

    grants: set[Grant] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and ast.unparse(node.func) in (
                "kopf.event", "kopf.info", "kopf.warn", "kopf.exception"):
            grants.add(("", "events", "create"))
        if not isinstance(node, ast.Attribute):
            continue
        match = METHOD.match(node.attr)
        owner = next((name for name, cls in API_CLASSES.items()
                      if callable(getattr(cls, node.attr, None))), None)
        if owner is None or match is None:
            continue
        verb = VERBS[match.group(1)]
        sub = (match.group(4) or "").lstrip("_")
        if owner in BUILTIN_GROUPS:
            resource = _plural(match.group(3))
            grants.add((BUILTIN_GROUPS[owner], f"{resource}/{sub}" if sub else resource, verb))
            continue
        args = api_args(node)
        plural_at = 3 if match.group(2) == "namespaced_" else 2
        group, plural = value(args[0], node.lineno), value(args[plural_at], node.lineno)
        grants.add((group, f"{plural}/{sub}" if sub else plural, verb))
    return grants


def admission_grants() -> set[Grant]:
    handlers = load_handlers()
    owner = handlers.owner_reference({"metadata": {"name": "p", "namespace": NAMESPACE,
                                                   "uid": "u"}})
    if not owner.get("blockOwnerDeletion"):
        return set()
    return {(owner["apiVersion"].split("/")[0], f"{handlers.PLURAL}/finalizers", "update")}


# -- kopf's calls (recorded over HTTP) -------------------------------------------------------

KMOCK_VERBS = {"WATCH": "watch", "LIST": "list", "FETCH": "get", "CREATE": "create",
               "DELETE": "delete"}


def kopf_grants(cluster: Cluster) -> set[Grant]:
    out = set()
    for request in cluster.kmock:
        if not (request.headers.get("User-Agent") or "").startswith("kopf/"):
            continue
        res = request.resource
        if res is None or not res.plural:  # discovery (/api, /apis/<group>/<version>)
            continue
        action = request.action.name
        verb = ("update" if request.method.name == "PUT" else "patch") \
            if action == "UPDATE" else KMOCK_VERBS[action]
        resource = f"{res.plural}/{request.subresource}" if request.subresource else res.plural
        out.add((res.group, resource, verb))
    return out


@contextlib.asynccontextmanager
async def operator(**mode: Any) -> AsyncIterator[None]:
    """kopf's reactor with the handlers, in one of the chart's modes (kopf.operator takes what
    ``kopf run`` takes: namespaces or clusterwide, standalone or peering_name)."""
    registry = kopf.OperatorRegistry()
    kopf.set_default_registry(registry)
    load_handlers()
    ready = asyncio.Event()
    task = asyncio.create_task(kopf.operator(registry=registry, ready_flag=ready, **mode))
    try:
        await asyncio.wait_for(ready.wait(), timeout=15)
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, timeout=15)
        kopf.set_default_registry(kopf.OperatorRegistry())


async def a_pipeline_life(cluster: Cluster) -> None:
    """Created; its first stage's RayJob created and running; an edit supersedes it (deleted,
    replaced); events posted on the way."""
    cr = pipeline_cr("jobs/quickstart/pipeline.yaml")
    await cluster.create_pipeline(cr)
    old = rayjob_for(cr, "stage1")
    await cluster.wait_rayjob(old)
    await cluster.set_rayjob(old, "Running", "RUNNING")
    edited = copy.deepcopy(cr)
    edited["spec"]["stages"][0]["spec"]["rerun"] = 1
    edited["spec"]["onSpecChange"] = "replace"  # the policy under which the operator deletes
    await cluster.edit_pipeline(cr["metadata"]["name"], edited["spec"], generation=2)
    await cluster.wait_rayjob(rayjob_for(edited, "stage1"))
    await cluster.wait(f"deletion of {old}", lambda: old not in cluster.rayjobs())
    await cluster.wait("an Event", lambda: cluster.events())


# -- the chart -------------------------------------------------------------------------------

def rendered(values: dict[str, Any]) -> tuple[set[Grant], list[dict[str, Any]]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(chart_values(values), name="prolong", namespace=NAMESPACE, is_install=True)
    objs = [o for name, text in manifests.items() if not name.endswith("NOTES.txt")
            for o in yaml.safe_load_all(text) if o]
    (role,) = [o for o in objs if o["kind"] in ("Role", "ClusterRole")
               and o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
               and o["metadata"]["name"].endswith("-operator")]
    assert role["kind"] == ("ClusterRole" if values["rbac"]["clusterWide"] else "Role")
    grants = {(g, r, v) for rule in role["rules"] for g in rule["apiGroups"]
              for r in rule["resources"] for v in rule["verbs"]}
    return grants, objs


MODES = {
    "namespaced": ({"namespaces": [NAMESPACE], "standalone": True},
                   {"rbac": {"clusterWide": False}}),
    "cluster-wide": ({"clusterwide": True, "standalone": True}, {"rbac": {"clusterWide": True}}),
    "namespaced-peering": ({"namespaces": [NAMESPACE], "peering_name": "prolong-operator"},
                           {"rbac": {"clusterWide": False}, "operator": {"peering": {"enabled": True}}}),
    "cluster-wide-peering": ({"clusterwide": True, "peering_name": "prolong-operator"},
                             {"rbac": {"clusterWide": True}, "operator": {"peering": {"enabled": True}}}),
}


@pytest.fixture(scope="module")
def code_grants() -> set[Grant]:
    return handler_calls() | admission_grants()


def test_the_reader_sees_the_handlers_calls(code_grants):
    """The ast reader finds what handlers.py plainly calls (so an empty reading cannot pass)."""
    assert ("prolong.dev", "prolongpipelines/status", "patch") in code_grants
    assert ("ray.io", "rayjobs", "create") in code_grants
    assert ("", "configmaps", "create") in code_grants
    assert ("batch", "jobs", "create") in code_grants and ("batch", "jobs", "list") in code_grants
    assert not any(r == "configmaps" and v == "delete" for _, r, v in code_grants)


@pytest.mark.asyncio
@pytest.mark.parametrize("mode", list(MODES))
async def test_the_role_grants_exactly_what_the_operator_calls(mode, cluster: Cluster,
                                                               code_grants) -> None:
    kopf_mode, values = MODES[mode]
    granted, objs = rendered(values)
    if "peering_name" in kopf_mode:
        # The peering object as the chart renders it, in a cluster that serves kopf's CRDs.
        (peering,) = [o for o in objs if o["apiVersion"] == "kopf.dev/v1"]
        res = CLUSTER_PEERINGS if values["rbac"]["clusterWide"] else PEERINGS
        cluster.kmock.resources[res] = kmock.ResourceInfo(
            namespaced=res is PEERINGS, kind=peering["kind"], verbs={"list", "watch", "patch"})
        path = f"/apis/kopf.dev/v1/{res.plural}" if res is CLUSTER_PEERINGS else \
            f"/apis/kopf.dev/v1/namespaces/{NAMESPACE}/{res.plural}"
        async with cluster.session.post(path, json=peering) as resp:
            assert resp.status < 300, await resp.text()
        kopf_mode = {**kopf_mode, "priority": 1}
    async with operator(**kopf_mode):
        await a_pipeline_life(cluster)
    recorded = kopf_grants(cluster)
    if "peering_name" in kopf_mode:
        assert any(r.endswith("kopfpeerings") for _, r, _ in recorded), "no peering seen"
    wanted = code_grants | recorded
    assert granted == wanted, (f"the Role grants what nothing calls: {sorted(granted - wanted)}; "
                               f"it lacks what is called: {sorted(wanted - granted)}")


def test_the_kuberay_crd_reader_grants_the_one_read_the_operator_makes():
    """The handlers read KubeRay's RayJob CRD (prolong.k8s.kuberay_version.read_rayjob_crd, by
    name: no kubernetes API class the reader above sees); the chart grants exactly get on that
    one CRD, cluster-wide (a namespaced Role cannot), to the operator's ServiceAccount."""
    from prolong.k8s.kuberay_version import CRD_NAME

    tree = ast.parse(HANDLERS.read_text())
    reads = {n.args[0].id for n in ast.walk(tree) if isinstance(n, ast.Call)
             and ast.unparse(n.func) == "API.call" and n.args
             and isinstance(n.args[0], ast.Name)}
    assert "read_rayjob_crd" in reads
    for values in ({"rbac": {"clusterWide": False}}, {"rbac": {"clusterWide": True}}):
        _, objs = rendered(values)
        (reader,) = [o for o in objs if o["kind"] == "ClusterRole"
                     and o["metadata"]["name"].endswith("-kuberay-crd-reader")]
        assert reader["rules"] == [{"apiGroups": ["apiextensions.k8s.io"],
                                    "resources": ["customresourcedefinitions"],
                                    "resourceNames": [CRD_NAME], "verbs": ["get"]}]
        (binding,) = [o for o in objs if o["kind"] == "ClusterRoleBinding"
                      and o["roleRef"]["name"] == reader["metadata"]["name"]]
        (operator_binding,) = [o for o in objs if o["kind"] in ("RoleBinding",
                                                               "ClusterRoleBinding")
                               and o["roleRef"]["name"].endswith("-operator")]
        assert binding["subjects"] == operator_binding["subjects"]
