"""The KubeRay preflight (prolong.k8s.kuberay_version) against the RayJob CRDs of v1.4.2, v1.5.1,
v1.6.0 and v1.7.0, and the KubeRay / Kueue oracles (tests/oracles) against our renders."""

from __future__ import annotations

import copy
import hashlib
from pathlib import Path

import pytest
import yaml

from prolong.k8s.kuberay_version import (
    MINIMUM_KUBERAY,
    REQUIRED_FIELDS,
    KubeRayMismatch,
    check_crd,
    missing_fields,
)
from prolong.k8s.rayjob import PRIORITY_CLASS_LABEL, QUEUE_LABEL, render_stage, render_standalone
from prolong.spec import SpecError
from prolong.specfile import load, parse_document
from tests.oracles import kuberay, kueue
from tests.oracles.admission import ALL_TAGS, CRDS, crd, rayjob_errors

REPO = Path(__file__).resolve().parents[2]
STAGE2 = REPO / "jobs" / "prolong-8b" / "stage2-512k.yaml"


def _shipped_rayjobs() -> list[tuple[str, dict]]:
    out = []
    for path in sorted((REPO / "jobs").glob("*/pipeline.yaml")):
        loaded = load(path)
        for stage in loaded.jobs:
            out.append((f"{path.parent.name}/{stage}",
                        render_stage(loaded.document, loaded.jobs, stage, namespace="ml")[1]))
    return out


SHIPPED = _shipped_rayjobs()


def _stage2(**k8s) -> dict:
    raw = yaml.safe_load(STAGE2.read_text())
    raw["spec"]["cluster"]["kubernetes"] = k8s
    return render_standalone(parse_document(raw))[1]


def test_every_shipped_render_passes_the_preflight_on_16_and_17_and_fails_it_before():
    for label, rayjob in SHIPPED:
        for tag in ("v1.6.0", "v1.7.0"):
            assert missing_fields(crd(tag), rayjob) == [], (label, tag)
            check_crd(crd(tag), rayjob)
        # 1.4 prunes the deletion rules and the deadline; 1.5 the deadline (added in 1.6).
        assert {"spec.deletionStrategy", "spec.preRunningDeadlineSeconds",
                "spec.rayClusterSpec.authOptions"} <= set(missing_fields(crd("v1.4.2"), rayjob))
        assert "spec.preRunningDeadlineSeconds" in missing_fields(crd("v1.5.1"), rayjob)
        for tag in ("v1.4.2", "v1.5.1"):
            with pytest.raises(KubeRayMismatch) as refused:
                check_crd(crd(tag), rayjob, where="cluster ml")
            line = str(refused.value)
            assert "\n" not in line and "spec.preRunningDeadlineSeconds" in line
            assert f"KubeRay >= {MINIMUM_KUBERAY}" in line and "cluster ml" in line


def test_the_required_fields_without_a_render_say_the_same():
    assert missing_fields(crd("v1.7.0")) == missing_fields(crd("v1.6.0")) == []
    assert missing_fields(crd("v1.5.1")) == ["spec.preRunningDeadlineSeconds",
                                            "spec.rayClusterSpec.authOptions.secretName"]
    assert "spec.deletionStrategy" in missing_fields(crd("v1.4.2"))
    assert set(REQUIRED_FIELDS) >= {"spec.deletionStrategy.deletionRules",
                                    "spec.rayClusterSpec.authOptions.secretName"}
    with pytest.raises(KubeRayMismatch, match=r"has no CRD rayjobs\.ray\.io"):
        check_crd(None)


def test_a_map_key_with_dots_and_a_field_no_version_has():
    rayjob = _stage2(rayAuthSecret="shared-token")
    # Label keys and resource names hold dots and slashes: map keys, never fields.
    assert missing_fields(crd("v1.6.0"), rayjob) == []
    assert missing_fields(crd("v1.5.1"), rayjob) == [
        "spec.deletionStrategy.deletionRules[].condition.jobDeploymentStatus",
        "spec.preRunningDeadlineSeconds", "spec.rayClusterSpec.authOptions.secretName"]
    bad = copy.deepcopy(rayjob)
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0][
        "resourcez"] = {}
    assert missing_fields(crd("v1.7.0"), bad) == [
        "spec.rayClusterSpec.workerGroupSpecs[].template.spec.containers[].resourcez"]


def test_the_fixtures_are_the_tags_crds():
    """Each fixture is the CRD of its tag (SOURCE.md records the YAML's sha256); the v1.7.0 one is
    also the CRD in shared/schemas/kuberay, when that is beside this checkout (the same blob)."""
    from tests.k8s.conftest import KUBERAY_SCHEMAS

    source = (CRDS / "SOURCE.md").read_text()
    assert sorted(p.name for p in CRDS.glob("*.json.gz")) == [
        f"ray.io_rayjobs-{t}.json.gz" for t in ALL_TAGS]
    for tag in ALL_TAGS:
        assert f"| {tag} |" in source
        assert crd(tag)["metadata"]["name"] == "rayjobs.ray.io"
        assert crd(tag)["spec"]["group"] == "ray.io"
    shared = KUBERAY_SCHEMAS / "ray.io_rayjobs.yaml"
    if shared.exists():
        row = next(line for line in source.splitlines() if line.startswith("| v1.7.0 |"))
        assert hashlib.sha256(shared.read_bytes()).hexdigest() in row


# ---- Kueue: a queued stage -------------------------------------------------------------------

def test_a_queued_stage_is_admitted_by_kueue_and_run_by_kuberay():
    rayjob = _stage2(queue="h100-queue", priorityClass="prolong-high")
    labels = rayjob["metadata"]["labels"]
    assert labels[QUEUE_LABEL] == "h100-queue" and labels[PRIORITY_CLASS_LABEL] == "prolong-high"
    spec = rayjob["spec"]
    assert spec["shutdownAfterJobFinishes"] is True and spec["ttlSecondsAfterFinished"] == 300
    assert "deletionStrategy" not in spec
    assert rayjob_errors(rayjob) == []
    stored, refused = kueue.admit(rayjob)
    assert stored["spec"]["suspend"] is True and refused == []  # Kueue holds it until admitted


def test_the_oracles_refuse_the_queued_render_of_before():
    """The render before this change: the queue label, shutdownAfterJobFinishes false and the
    deletion rules. Kueue's webhook refuses it, and KubeRay refuses it once Kueue suspends it."""
    old = _stage2()
    old["metadata"]["labels"][QUEUE_LABEL] = "h100-queue"
    errors = rayjob_errors(old)
    assert any("rayjob_webhook.go:138" in e and "delete the cluster" in e for e in errors)
    assert any("KubeRay 1.6" in e and "validation.go:293" in e for e in errors)
    assert any("KubeRay 1.7" in e and "validation.go:547" in e for e in errors)


def test_an_unqueued_stage_in_a_kueue_managed_namespace_is_refused_and_a_queue_fixes_it():
    managed = kueue.Namespace(default_local_queue=True)
    assert any("delete the cluster" in e for e in rayjob_errors(_stage2(), managed))
    assert rayjob_errors(_stage2(queue="default"), managed) == []
    everything = kueue.Namespace(manage_jobs_without_queue_name=True)
    assert any("delete the cluster" in e for e in rayjob_errors(_stage2(), everything))


def test_a_priority_class_needs_a_queue():
    raw = yaml.safe_load(STAGE2.read_text())
    raw["spec"]["cluster"]["kubernetes"] = {"priorityClass": "high"}
    with pytest.raises(SpecError, match="priorityClass needs queue"):
        parse_document(raw)


# ---- the oracles' own rules fire --------------------------------------------------------------

@pytest.mark.parametrize(("edit", "cited"), [
    (lambda s: s.update(shutdownAfterJobFinishes=True), {"1.6": 513, "1.7": 771}),
    (lambda s: s.update(ttlSecondsAfterFinished=60), {"1.6": 495, "1.7": 753}),
    (lambda s: s["deletionStrategy"]["deletionRules"][0]["condition"].update(ttlSeconds=10**6),
     {"1.6": 617, "1.7": 875}),
    (lambda s: s.update(submissionMode="InteractiveMode", backoffLimit=1), {"1.6": 333, "1.7": 587}),
    (lambda s: s.update(activeDeadlineSeconds=0), {"1.6": 365, "1.7": 619}),
    (lambda s: s["rayClusterSpec"]["workerGroupSpecs"][0].pop("maxReplicas"),
     {"1.6": 124, "1.7": 125}),
    (lambda s: s["rayClusterSpec"].update(rayVersion="2.50.0"), {"1.6": 238, "1.7": 284}),
    (lambda s: s.update(clusterSelector={"ray.io/cluster": "x"}), {"1.6": 289, "1.7": 543}),
    (lambda s: s.update(entrypointNumGpus=1), {"1.6": 289, "1.7": 543}),  # not ported: flagged
])
def test_each_ported_rule_fires_with_its_line(edit, cited):
    rayjob = _stage2()
    edit(rayjob["spec"])
    for version in kuberay.TAGS:
        errors = kuberay.validate(rayjob, version)
        want = f"{kuberay.TAGS[version]} {kuberay.FILE}:{cited[version]}"
        assert any(want in e for e in errors), (version, errors)


def test_kueue_rules_fire_with_their_lines():
    rayjob = _stage2(queue="q")
    rayjob["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] = True
    rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["groupName"] = "head"
    rayjob["metadata"]["labels"][kueue.MAX_EXEC_LABEL] = "0"
    errors = kueue.validate_create(kueue.default(rayjob))
    for line in ("common.go:302", "common.go:320", "validation.go:236"):
        assert any(line in e for e in errors), (line, errors)
