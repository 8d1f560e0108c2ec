"""The chart's ValidatingAdmissionPolicy for a cluster-wide operator (charts/templates/
admission-policy.yaml): rendered only with rbac.clusterWide, valid under Kubernetes 1.30's strict
schemas, and its CEL expressions, evaluated by a CEL engine (cel-python) the way the API server
composes them (match condition, then variables, then validations), admit exactly the operator's
own stage ConfigMaps and RayJobs.

cel-python is not cel-go: it lacks the Kubernetes CEL libraries and heterogeneous equality (``x
!= null``), so the policy sticks to standard CEL (macros, ``has``, ``in``, ternaries), which both
engines evaluate alike; the API server's own type-checking of the expressions against the
matched kinds is not reproduced here.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import helm_python as helm
import pytest
import yaml

from prolong.k8s.rayjob import render_stage
from prolong.specfile import load
from prolong.stage.names import PIPELINE_LABEL, STAGE_ID_LABEL, STAGE_LABEL
from tests.conftest import chart_values

REPO = Path(__file__).resolve().parents[2]
NAMESPACE = "ml"
OPERATOR = f"system:serviceaccount:{NAMESPACE}:prolong"
POLICY = "ValidatingAdmissionPolicy"
BINDING = "ValidatingAdmissionPolicyBinding"


def render(values: dict[str, Any]) -> list[dict[str, Any]]:
    with helm.Chart.load(REPO / "charts") as chart:
        manifests = chart.render(chart_values(values), name="prolong", namespace=NAMESPACE, is_install=True)
    manifests.pop("prolong/templates/NOTES.txt", None)
    return [o for text in manifests.values() for o in yaml.safe_load_all(text) if o]


@pytest.fixture(scope="module")
def cluster_wide() -> list[dict[str, Any]]:
    return render({"rbac": {"clusterWide": True}})


@pytest.fixture(scope="module")
def policy(cluster_wide) -> dict[str, Any]:
    (found,) = [o for o in cluster_wide if o["kind"] == POLICY]
    return found


# -- the API server's evaluation, on cel-python ---------------------------------------------

_ENV = celpy.Environment()


def cel(expression: str, activation: dict[str, Any]) -> Any:
    return _ENV.program(_ENV.compile(expression)).evaluate(activation)


def admit(policy: dict[str, Any], operation: str, obj: dict | None, old: dict | None, *,
          user: str = OPERATOR) -> tuple[bool, str | None]:
    """(allowed, message) of one admission request under ``policy``: unmatched requests are
    allowed; a matched one is denied by the first validation that is false."""
    spec = policy["spec"]
    target = obj or old
    plural = {"ConfigMap": "configmaps", "RayJob": "rayjobs"}[target["kind"]]
    rules = [r for r in spec["matchConstraints"]["resourceRules"]
             if plural in r["resources"] and operation in r["operations"]]
    if not rules:
        return True, None
    request = {"operation": operation, "userInfo": {"username": user},
               "resource": {"group": target["apiVersion"].rpartition("/")[0], "resource": plural},
               "namespace": target["metadata"].get("namespace", NAMESPACE),
               "name": target["metadata"]["name"]}
    act: dict[str, Any] = {"request": celpy.json_to_cel(request),
                           "object": celpy.json_to_cel(obj), "oldObject": celpy.json_to_cel(old)}
    if not all(cel(c["expression"], act) for c in spec["matchConditions"]):
        return True, None
    # Each variable sees the ones before it (values already CEL's: no JSON round trip).
    variables = celpy.celtypes.MapType()
    for var in spec["variables"]:
        value = cel(var["expression"], {**act, "variables": variables})
        variables = celpy.celtypes.MapType({**variables, celpy.celtypes.StringType(var["name"]):
                                            value})
    act["variables"] = variables
    for check in spec["validations"]:
        if not cel(check["expression"], act):
            return False, str(cel(check["messageExpression"], act))
    return True, None


# -- samples ---------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def stage_objects() -> tuple[dict[str, Any], dict[str, Any]]:
    """The [ConfigMap, RayJob] the operator creates for the quickstart's stage 2."""
    loaded = load(REPO / "jobs" / "quickstart" / "pipeline.yaml")
    return tuple(render_stage(loaded.document, loaded.jobs, "stage2", namespace=NAMESPACE))


FOREIGN = {"apiVersion": "v1", "kind": "ConfigMap",
           "metadata": {"name": "aws-auth", "namespace": "kube-system"},
           "data": {"mapRoles": "- rolearn: arn:aws:iam::1:role/node"}}


def labelled(obj: dict[str, Any], **labels: str) -> dict[str, Any]:
    out = copy.deepcopy(obj)
    out["metadata"].setdefault("labels", {}).update(labels)
    return out


def test_only_a_cluster_wide_operator_gets_the_policy(cluster_wide, validate_object) -> None:
    kinds = [o["kind"] for o in cluster_wide]
    assert kinds.count(POLICY) == 1 and kinds.count(BINDING) == 1
    for obj in cluster_wide:
        if obj["kind"] in (POLICY, BINDING):
            assert obj["apiVersion"] == "admissionregistration.k8s.io/v1"
            validate_object(obj)  # kubernetes-validate, Kubernetes 1.30, strict
    (binding,) = [o for o in cluster_wide if o["kind"] == BINDING]
    (policy,) = [o for o in cluster_wide if o["kind"] == POLICY]
    assert binding["spec"] == {"policyName": policy["metadata"]["name"],
                               "validationActions": ["Deny"]}
    assert policy["spec"]["failurePolicy"] == "Fail"
    for values in ({}, {"rbac": {"clusterWide": True, "ownObjectsPolicy": False}}):
        assert not [o for o in render(values) if o["kind"] in (POLICY, BINDING)], values


def test_the_policy_names_the_labels_the_renderer_sets(policy, stage_objects) -> None:
    (var,) = [v for v in policy["spec"]["variables"] if v["name"] == "stageLabels"]
    assert list(cel(var["expression"], {})) == [PIPELINE_LABEL, STAGE_LABEL, STAGE_ID_LABEL]
    for obj in stage_objects:
        assert {PIPELINE_LABEL, STAGE_LABEL, STAGE_ID_LABEL} <= set(obj["metadata"]["labels"])


def test_the_operator_may_create_adopt_and_delete_its_own(policy, stage_objects) -> None:
    for obj in stage_objects:
        assert admit(policy, "CREATE", obj, None) == (True, None), obj["kind"]
        adopted = copy.deepcopy(obj)
        adopted["metadata"]["ownerReferences"] = [{"apiVersion": "prolong.dev/v1alpha1",
                                                   "kind": "ProLongPipeline", "name": "quickstart",
                                                   "uid": "u-1", "controller": True}]
        assert admit(policy, "UPDATE", adopted, obj) == (True, None), obj["kind"]
        assert admit(policy, "DELETE", None, obj) == (True, None), obj["kind"]


def test_anything_else_is_denied_with_the_reason(policy, stage_objects) -> None:
    configmap, rayjob = stage_objects
    allowed, message = admit(policy, "CREATE", FOREIGN, None)
    assert not allowed
    assert message == ("the prolong operator may create, change and delete only configmaps "
                       "labelled prolong.dev/pipeline, prolong.dev/stage and prolong.dev/stage-id "
                       "(a stage's); kube-system/aws-auth is not one")
    taken_over = labelled(FOREIGN, **{k: configmap["metadata"]["labels"][k]
                                      for k in (PIPELINE_LABEL, STAGE_LABEL, STAGE_ID_LABEL)})
    assert admit(policy, "UPDATE", taken_over, FOREIGN)[0] is False  # labelling it is no way in
    assert admit(policy, "UPDATE", FOREIGN, FOREIGN)[0] is False
    assert admit(policy, "DELETE", None, FOREIGN)[0] is False
    stripped = copy.deepcopy(configmap)
    del stripped["metadata"]["labels"][STAGE_ID_LABEL]
    assert admit(policy, "CREATE", stripped, None)[0] is False
    assert admit(policy, "UPDATE", stripped, configmap)[0] is False
    assert admit(policy, "CREATE", labelled(configmap, **{STAGE_LABEL: ""}), None)[0] is False
    foreign_job = copy.deepcopy(rayjob)
    foreign_job["metadata"]["labels"] = {"app": "someone-elses"}
    allowed, message = admit(policy, "DELETE", None, foreign_job)
    assert not allowed and message.split("only ")[1].startswith("rayjobs labelled")


def test_other_users_are_not_matched(policy) -> None:
    for user in ("system:serviceaccount:kube-system:generic-garbage-collector",
                 "system:serviceaccount:other:prolong", "alice@example.com"):
        assert admit(policy, "DELETE", None, FOREIGN, user=user) == (True, None), user
