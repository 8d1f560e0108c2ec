"""The chart's ValidatingAdmissionPolicy for a cluster-wide operator (charts/templates/
admission-policy.yaml): rendered only with rbac.clusterWide, valid under Kubernetes 1.30's strict
schemas, and its CEL expressions, evaluated by a CEL engine (cel-python) the way the API server
composes them (match condition, then variables, then validations), admit exactly the operator's
own stage ConfigMaps and RayJobs.

cel-python is not cel-go: it lacks the Kubernetes CEL libraries and heterogeneous equality (``x
!= null``), so the policy sticks to standard CEL (macros, ``has``, ``in``, ternaries), which both
engines evaluate alike. cel-python has no type checker either: tests.oracles.cel_types walks its
parse tree to check every expression against the types of the kinds the policy matches
(kubernetes-validate's schemas for ConfigMap and Job, KubeRay's CRDs for RayJob) and of
``request``, as cel-go's checker does; evaluation alone misses whatever no sample reaches
(charts/README.md, "What the policy's tests prove", says what stays unproven).
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
from prolong.k8s.schemas import KUBE_VERSION
from prolong.specfile import load
from prolong.stage.names import PIPELINE_LABEL, STAGE_ID_LABEL, STAGE_LABEL
from tests.conftest import chart_values
from tests.oracles import admission as oracle
from tests.oracles import cel_types as C

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


# -- the API server's type check, as far as cel-python's parse tree allows ----------------------

# Built-in resources a policy may match: (group, plural) -> (kind, apiVersion). A rule naming
# another fails below until its kind is added here (kubernetes-validate has its schema).
BUILTIN = {("", "configmaps"): ("ConfigMap", "v1"), ("batch", "jobs"): ("Job", "batch/v1")}


def custom_resource_definitions() -> list[tuple[str, dict[str, Any]]]:
    """(source, CRD): KubeRay's RayJob CRD at every tag we claim, and the chart's own CRDs."""
    out = [(f"KubeRay {tag}", oracle.crd(tag)) for tag in oracle.kuberay.TAGS.values()]
    for path in sorted((REPO / "charts" / "crds").glob("*.yaml")):
        out += [("charts/crds", d) for d in yaml.safe_load_all(path.read_text()) if d]
    return out


def matched_kinds(policy: dict[str, Any]) -> dict[str, C.Obj]:
    """The type of every kind ``policy``'s resource rules match, per version (a ``*`` version:
    every version the CRD serves) and, for KubeRay, per claimed tag."""
    crds: dict[tuple[str, str], list[tuple[str, dict[str, Any]]]] = {}
    for source, crd in custom_resource_definitions():
        crds.setdefault((crd["spec"]["group"], crd["spec"]["names"]["plural"]), []).append(
            (source, crd))
    kinds = {}
    for rule in policy["spec"]["matchConstraints"]["resourceRules"]:
        versions = rule["apiVersions"]
        for group in rule["apiGroups"]:
            for resource in rule["resources"]:
                assert "*" not in group + resource, f"cannot enumerate the kinds of {rule}"
                if (group, resource) in BUILTIN:
                    kind, api_version = BUILTIN[group, resource]
                    assert {api_version.rpartition("/")[2], "*"} & set(versions), rule
                    kinds[f"{api_version}.{kind}"] = C.builtin_kind_type(kind, api_version,
                                                                        KUBE_VERSION)
                    continue
                assert (group, resource) in crds, f"no schema for {group}/{resource}: add it"
                for source, crd in crds[group, resource]:
                    for version, kind_type in C.crd_kind_types(crd, KUBE_VERSION).items():
                        if version in versions or "*" in versions:
                            kinds[f"{kind_type.name} ({source})"] = kind_type
    return kinds


def test_every_expression_type_checks_against_the_kinds_it_matches(policy) -> None:
    """Variables, the match condition, the validation and its message, each against ``dyn``
    objects (what admission compiles) and against ConfigMap v1, Job batch/v1 and RayJob (v1
    and v1alpha1 of KubeRay 1.6 and 1.7): every field they read exists, every operator has an
    overload for its operands' types, and each returns the type its place asks for."""
    kinds = matched_kinds(policy)
    assert sorted({k.name for k in kinds.values()}) == [
        "batch/v1.Job", "ray.io/v1.RayJob", "ray.io/v1alpha1.RayJob", "v1.ConfigMap"]
    assert len(kinds) == 2 + 2 * len(oracle.kuberay.TAGS)
    checked = C.check_policy(policy, kinds).types
    assert len(checked) == 1 + len(kinds)
    for types in checked.values():
        assert {k: str(v) for k, v in types.items()} == {
            "spec.variables[0] (stageLabels)": "list(string)",
            "spec.variables[1] (newIsOurs)": "bool", "spec.variables[2] (oldWasOurs)": "bool",
            "spec.matchConditions[0] (prolong-operator)": "bool",
            "spec.validations[0].expression": "bool",
            "spec.validations[0].messageExpression": "string"}


CONFIGMAP_REFUSALS = [
    ("object.metadata.lables", "undefined field 'lables' of v1.ConfigMap.metadata"),
    ("has(object.metadata.lables)", "undefined field 'lables'"),
    ("object.spec.x", "undefined field 'spec' of v1.ConfigMap"),
    ("request.userInfo.usrname == 'a'", "undefined field 'usrname' of kubernetes.UserInfo"),
    ("object.metadata.labels['a'] == 1", "no overload of == for (string, int)"),
    ("object.metadata.name != 0", "no overload of != for (string, int)"),
    ("object.metadata.name != null", "no overload of != for (string, null_type)"),
    ("object.metadata.generation == 1.0", "no overload of == for (int, double)"),
    ("object.metadata.generation + 1u > 0", "no overload of 'add' for (int, uint)"),
    ("'x' + object.metadata.generation", "no overload of 'add' for (string, int)"),
    ("1 in object.metadata.labels", "no overload of 'in' for (int, map(string, string))"),
    ("object.metadata.labels[1]", "a key of map(string, string) must be string, got int"),
    ("['a', 1]", "list literal mixes string and int"),
    ("object.metadata.name ? 1 : 2", "the ternary's condition must be bool, got string"),
    ("object.metadata.labels.all(k, k)", "all()'s predicate must be bool, got string"),
    ("variables.nope", "undefined field 'nope' of kubernetes.variables"),
    ("nope", "undeclared reference to 'nope'"),
    ("object.metadata.name.lowerAscii() == 'a'", "lowerAscii() on string is not modelled"),
    ("authorizer.group('') != null", "'authorizer' is not modelled"),
]


@pytest.mark.parametrize(("expression", "reason"), CONFIGMAP_REFUSALS,
                         ids=[e for e, _ in CONFIGMAP_REFUSALS])
def test_the_type_check_refuses_what_cel_go_refuses(expression, reason) -> None:
    env = {"object": C.builtin_kind_type("ConfigMap", "v1", KUBE_VERSION),
           "request": C.request_type(), "variables": C.obj("kubernetes.variables")}
    with pytest.raises(C.CELTypeError) as info:
        C.check(expression, env)
    assert reason in str(info.value), str(info.value)


def test_the_type_check_accepts_well_typed_expressions() -> None:
    """The controls: what cel-go accepts passes, with the type it infers."""
    env = {"object": C.builtin_kind_type("Job", "batch/v1", KUBE_VERSION),
           "request": C.request_type()}
    for expression, want in [
            ("object.spec.template.spec.containers.all(c, c.image.startsWith('r/'))", "bool"),
            ("object.spec.backoffLimit > 1.5", "bool"),  # numeric ordering across types
            ("object.metadata.ownerReferences.map(r, r.name)", "list(string)"),
            ("object.spec.template.spec.containers[0].resources.limits['cpu']", "dyn"),
            ("object.metadata.creationTimestamp - object.metadata.creationTimestamp",
             "google.protobuf.Duration"),
            ("has(object.spec.suspend) && object.spec.suspend", "bool"),
            ("request.userInfo.groups.exists(g, g == 'system:masters')", "bool"),
            ("size(object.metadata.name) + 1", "int"),
            ("{'a': 1}['a'] == 1 ? [1] + [2] : []", "list(int)")]:
        assert str(C.check(expression, env)) == want, expression


def test_the_type_check_holds_each_expression_to_the_type_its_place_asks(policy) -> None:
    kinds = {"v1.ConfigMap": C.builtin_kind_type("ConfigMap", "v1", KUBE_VERSION)}
    for path, text, reason in [
            (("validations", 0, "expression"), "request.operation",
             "spec.validations[0].expression, object dyn (admission): must evaluate to bool, "
             "got string"),
            (("validations", 0, "messageExpression"), "request.dryRun",
             "must evaluate to string, got bool"),
            (("matchConditions", 0, "expression"), "request.userInfo.groups",
             "spec.matchConditions[0] (prolong-operator), object dyn (admission): must evaluate "
             "to bool")]:
        broken = copy.deepcopy(policy)
        section, index, key = path
        broken["spec"][section][index][key] = text
        with pytest.raises(C.CELTypeError) as info:
            C.check_policy(broken, kinds)
        assert reason in str(info.value), str(info.value)


def test_a_misspelling_no_sample_reaches_passes_evaluation_but_not_the_type_check(
        policy, stage_objects) -> None:
    """Why the type check is here. Let UPDATE also admit an object being deleted (so that the
    operator could drop a finalizer), with ``deletionTimestamp`` misspelled: ``has()`` of an
    absent key is false in cel-python and cel-go alike, so every sample is admitted or denied
    exactly as before and the evaluation tests above pass, while in a cluster the clause can
    never be true. The type check names the field."""
    broken = copy.deepcopy(policy)
    rule = broken["spec"]["validations"][0]
    old = "variables.oldWasOurs && variables.newIsOurs"
    assert rule["expression"].endswith(old)
    rule["expression"] = rule["expression"].replace(
        old, "variables.oldWasOurs && (variables.newIsOurs || "
             "has(object.metadata.deletionTimestmap))")
    test_the_operator_may_create_adopt_and_delete_its_own(broken, stage_objects)
    test_anything_else_is_denied_with_the_reason(broken, stage_objects)
    test_other_users_are_not_matched(broken)
    with pytest.raises(C.CELTypeError) as info:
        C.check_policy(broken, matched_kinds(broken))
    assert ("spec.validations[0].expression, object v1.ConfigMap: undefined field "
            "'deletionTimestmap' of v1.ConfigMap.metadata") in str(info.value), str(info.value)
