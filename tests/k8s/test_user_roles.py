"""The chart's user roles grant exactly what prolongctl calls: prolong-edit what submit, status,
logs and delete request, prolong-view what status and logs request; no verb more, none less.

The CLI's requests are recorded over HTTP against kmock (its real ``kubernetes`` client, through
a kubeconfig), through the paths each command takes: a job file submitted, submitted again, a
stage refused for its upstream, a pipeline created and edited, status, logs and delete of each.
This also covers what the chart must not need: no patch on ConfigMaps (the stage's ConfigMap
is created with its RayJob as owner), no Secrets.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import helm_python as helm
import kmock
import pytest
import yaml

from tests.conftest import chart_values, job_dict, on_volume, quickstart_on_volume
from tests.k8s import test_submit
from tests.k8s.test_submit import PODS, Api, cli, expected, inline_pipeline, stage_file
from tests.operator.apiserver import OPERATOR_CLIENT, Fault, UidApiServer, request_of
from tests.operator.conftest import CONFIGMAPS, NAMESPACE, RAYJOBS

pytestmark = [pytest.mark.timeout(90), pytest.mark.asyncio]
CHART = Path(__file__).resolve().parents[2] / "charts"
api = test_submit.api  # the kmock API fixture of the other submit tests
Grant = tuple[str, str, str]
VERBS = {"WATCH": "watch", "LIST": "list", "FETCH": "get", "CREATE": "create",
         "DELETE": "delete"}


@pytest.fixture
def kmock_options() -> dict[str, Any]:
    return {"cls": UidApiServer}


OPTIONAL_READS = {("apiextensions.k8s.io", "customresourcedefinitions", "get"),
                  ("kueue.x-k8s.io", "localqueues", "get")}
"""submit's preflight reads, which it does without when refused (403): KubeRay's RayJob CRD
(cluster-scoped: no namespace role can grant it; a warning line, strict field validation
remains; tests/k8s/test_submit.py) and Kueue's default LocalQueue (Kueue's webhook refuses in its
place). Not in the users' roles."""


def cli_grants(server: kmock.KubernetesEmulator, since: int = 0) -> set[Grant]:
    """(group, resource[/sub], verb) of every request the CLI's client made after the
    ``since``-th request, but the :data:`OPTIONAL_READS`."""
    out = set()
    for request in list(server)[since:]:
        if not (request.headers.get("User-Agent") or "").startswith(OPERATOR_CLIENT):
            continue
        res = request.resource
        if res is None or not res.plural:  # discovery, /openapi/v3: every user may
            continue
        action = request.action.name
        verb = ("update" if request.method.name == "PUT" else "patch") if action == "UPDATE" \
            else VERBS[action]
        resource = f"{res.plural}/{request.subresource}" if request.subresource else res.plural
        out.add((res.group, resource, verb))
    return out - OPTIONAL_READS


def chart_roles(values: dict | None = None) -> dict[str, set[Grant]]:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(chart_values(values or {}), name="prolong", namespace=NAMESPACE,
                                 is_install=True)
    objs = [o for name, text in manifests.items() if not name.endswith("NOTES.txt")
            for o in yaml.safe_load_all(text) if o]
    return {o["metadata"]["name"]: {(g, r, v) for rule in o["rules"] for g in rule["apiGroups"]
                                    for r in rule["resources"] for v in rule["verbs"]}
            for o in objs if o["kind"] == "ClusterRole"
            and o["metadata"]["labels"].get("app.kubernetes.io/component") == "user-roles"}


def _pod(name: str, job: str) -> dict:
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": NAMESPACE,
                         "labels": {"batch.kubernetes.io/job-name": job, "job-name": job}},
            "spec": {"containers": [{"name": "ray-job-submitter", "image": "x"}]}}


async def test_user_roles_grant_exactly_what_the_cli_calls(api: Api, tmp_path: Path) -> None:
    ok = lambda result: result.exit_code == 0 or pytest.fail(result.output)  # noqa: E731
    path = stage_file(tmp_path)
    name = expected(path)[1]["metadata"]["name"]
    ok(await cli("submit", str(path)))
    ok(await cli("submit", str(path)))  # exists: nothing created
    refused = await cli("submit", str(quickstart_on_volume(tmp_path / "qs", tmp_path / "runs")
                                      / "stage2.yaml"))  # upstream not done
    assert refused.exit_code == 2, refused.output
    ok(await cli("submit", str(inline_pipeline(tmp_path))))
    ok(await cli("submit", str(inline_pipeline(tmp_path, stage2_steps=7))))  # an edit: patch
    writes = len(list(api.kmock))

    api.kmock.objects[PODS, NAMESPACE, f"{name}-abcde"] = _pod(f"{name}-abcde", name)
    api.kmock[f"get /api/v1/namespaces/{NAMESPACE}/pods/{name}-abcde/log"] << b"step 1\n"
    await api.set_pipeline_status("quickstart", {"phase": "Running", "currentStage": "stage1",
                                                 "stages": [{"name": "stage1", "rayJob": name}]})
    reads = len(list(api.kmock))
    for args in (("status", name), ("status", "quickstart-stage1"), ("status", "quickstart"),
                 ("logs", name), ("logs", "quickstart")):
        ok(await cli(*args))
    await api.set_pipeline_status("quickstart", None)
    ok(await cli("status", "quickstart"))  # no status: is an operator watching?
    viewed = cli_grants(api.kmock, reads)

    ok(await cli("delete", name))
    ok(await cli("delete", "quickstart"))
    used = cli_grants(api.kmock)
    assert ("", "configmaps", "patch") not in used  # created owned, never patched
    assert ("", "configmaps", "create") in cli_grants(api.kmock)
    assert cli_grants(api.kmock, 0) >= cli_grants(api.kmock, writes)

    roles = chart_roles()
    assert set(roles) == {"prolong-edit", "prolong-view"}
    edit, view = roles["prolong-edit"], roles["prolong-view"]
    assert edit == used, (f"prolong-edit grants what nothing calls: {sorted(edit - used)}; "
                          f"lacks what is called: {sorted(used - edit)}")
    assert view == viewed, (f"prolong-view grants what status/logs do not call: "
                            f"{sorted(view - viewed)}; lacks: {sorted(viewed - view)}")
    assert chart_roles({"rbac": {"userRoles": False}}) == {}


async def test_the_roles_aggregate_into_edit_and_view() -> None:
    with helm.Chart.load(CHART) as chart:
        manifests = chart.render(chart_values({}), name="prolong", namespace=NAMESPACE, is_install=True)
    objs = {o["metadata"]["name"]: o for name, text in manifests.items()
            if not name.endswith("NOTES.txt")
            for o in yaml.safe_load_all(text) if o and o.get("kind") == "ClusterRole"}
    agg = "rbac.authorization.k8s.io/aggregate-to-"
    assert objs["prolong-edit"]["metadata"]["labels"][f"{agg}edit"] == "true"
    assert objs["prolong-view"]["metadata"]["labels"][f"{agg}view"] == "true"
    assert f"{agg}edit" not in objs["prolong-view"]["metadata"]["labels"]


def eval_file(tmp_path: Path) -> Path:
    """The quickstart eval on a local model: nothing to stage or prepare, so its RayJob is
    created first, then its ConfigMap (a stage with a preparation creates its ConfigMap first:
    the preparation Job mounts it)."""
    job = on_volume(job_dict("quickstart/eval.yaml"), tmp_path / "runs")
    job["spec"]["model"] = {"source": str(tmp_path / "runs" / "model")}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


async def test_a_refused_configmap_leaves_nothing_behind(api: Api, tmp_path: Path) -> None:
    """The RayJob is created first and its ConfigMap owned by it; when the ConfigMap is refused
    (a quota, a webhook) the RayJob is deleted again: no orphan either way."""
    path = eval_file(tmp_path)
    configmap, rayjob = expected(path)
    name = rayjob["metadata"]["name"]
    ok = await cli("submit", str(path))
    assert ok.exit_code == 0, ok.output
    stored = api.configmaps()[configmap["metadata"]["name"]]
    (owner,) = stored["metadata"]["ownerReferences"]
    assert owner == {"apiVersion": "ray.io/v1", "kind": "RayJob", "name": name,
                     "uid": api.rayjobs()[name]["metadata"]["uid"]}
    assert (await cli("delete", name)).exit_code == 0

    api.kmock.inject(Fault(request_of(OPERATOR_CLIENT, kmock.action.CREATE, CONFIGMAPS),
                           "reject", status=403))
    failed = await cli("submit", str(path))
    assert failed.exit_code == 1, failed.output
    assert "deleted again" in failed.stderr and "\n" not in failed.stderr.strip()
    await asyncio.sleep(0)
    assert name not in api.rayjobs() and not api.configmaps()
    assert sum(1 for r in api.kmock if r.action == kmock.action.CREATE
               and r.resource == RAYJOBS) == 2

    # A stage with a preparation: its ConfigMap comes first, so a refused one creates nothing.
    staged = stage_file(tmp_path)
    api.kmock.inject(Fault(request_of(OPERATOR_CLIENT, kmock.action.CREATE, CONFIGMAPS),
                           "reject", status=403))
    failed = await cli("submit", str(staged))
    assert failed.exit_code == 1 and "403" in failed.stderr, failed.output
    assert not api.configmaps() and not api.jobs()
    assert expected(staged)[1]["metadata"]["name"] not in api.rayjobs()
