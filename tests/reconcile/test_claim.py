"""What a name that already exists is to the operator (prolong.reconcile.claim): ours, an
orphan of the same run to adopt, or taken."""

from __future__ import annotations

import copy

import pytest

from prolong.k8s.rayjob import render_stage
from prolong.reconcile.claim import adoption_patch, claim, controlled_by_another
from prolong.specfile import load
from prolong.stage.names import ATTEMPT_LABEL, STAGE_ID_LABEL
from tests.conftest import JOBS

UID = "uid-1"
OWNER = {"apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline", "name": "prolong-8b",
         "uid": UID, "controller": True, "blockOwnerDeletion": True}


@pytest.fixture(scope="module")
def wanted() -> tuple[dict, dict]:
    """[ConfigMap, RayJob] of stage 1 as the operator creates them."""
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    objs = render_stage(loaded.document, loaded.jobs, "stage1", namespace="default")
    for obj in objs:
        obj["metadata"]["ownerReferences"] = [OWNER]
    objs[1]["metadata"]["labels"][ATTEMPT_LABEL] = "1"
    return objs


def existing(obj: dict, owners: list[dict] | None = None, **labels: str) -> dict:
    found = copy.deepcopy(obj)
    found["metadata"]["ownerReferences"] = owners if owners is not None else []
    found["metadata"]["labels"].update(labels)
    found["metadata"]["resourceVersion"] = "42"
    return found


def test_ours_whatever_else_it_carries(wanted):
    for obj in wanted:
        assert claim(existing(obj, [OWNER]), obj, UID).verdict == "ours"
        assert controlled_by_another(existing(obj, [OWNER]), UID) is None


def test_an_orphan_of_the_same_run_is_adopted(wanted):
    configmap, rayjob = wanted
    for obj in (configmap, rayjob):
        assert claim(existing(obj), obj, UID).verdict == "adopt"
    # prolongctl submit writes no attempt label: attempt 1 all the same
    bare = existing(rayjob)
    del bare["metadata"]["labels"][ATTEMPT_LABEL]
    assert claim(bare, rayjob, UID).verdict == "adopt"
    patch = adoption_patch(existing(rayjob, [{"kind": "Other", "uid": "x"}]), OWNER,
                           "prolong-operator")
    assert patch == {"metadata": {
        "resourceVersion": "42",  # a concurrent change answers 409 instead of being overwritten
        "ownerReferences": [{"kind": "Other", "uid": "x"}, OWNER],
        "labels": {"app.kubernetes.io/managed-by": "prolong-operator"}}}


def test_another_controller_or_another_run_is_taken(wanted):
    configmap, rayjob = wanted
    old = {**OWNER, "uid": "uid-0"}
    verdict = claim(existing(rayjob, [old]), rayjob, UID)
    assert verdict.verdict == "taken" and "uid-0" in verdict.reason
    assert rayjob["metadata"]["name"] in verdict.reason
    assert controlled_by_another(existing(rayjob, [old]), UID) == verdict.reason
    other_id = claim(existing(rayjob, **{STAGE_ID_LABEL: "ffffffff"}), rayjob, UID)
    assert other_id.verdict == "taken" and "ffffffff" in other_id.reason
    other_attempt = claim(existing(rayjob, **{ATTEMPT_LABEL: "2"}), rayjob, UID)
    assert other_attempt.verdict == "taken"
    assert claim(existing(configmap, **{STAGE_ID_LABEL: "x"}), configmap, UID).verdict == "taken"
    # A non-controller owner (e.g. a user's reference) does not make it someone else's.
    assert claim(existing(rayjob, [{**old, "controller": False}]), rayjob, UID).verdict == "adopt"


def test_without_a_uid_only_the_labels_tell(wanted):
    _, rayjob = wanted
    assert claim(existing(rayjob), rayjob, None).verdict == "ours"
    assert claim(existing(rayjob, **{STAGE_ID_LABEL: "x"}), rayjob, None).verdict == "taken"
