"""Oracle: KubeRay's own validation of a RayJob, ported from the tagged Go source as rules.

KubeRay's RayJob controller runs ``ValidateRayJobMetadata`` and ``ValidateRayJobSpec``
(ray-operator/controllers/ray/utils/validation.go) on every reconcile and marks a RayJob that
fails them ``ValidationFailed`` (rayjob_controller.go: v1.6.0 lines 484-485, v1.7.0 lines
470-471); its CRD schema checks none of it. Each rule below is one ``if`` of that file, with the
line it sits on at each tag we claim (:data:`TAGS`). Only rules about fields a RayJob of ours can
carry are ported; a spec field outside :data:`PORTED_FIELDS` is itself an error here ("port its
rules"), so a render that starts using a new KubeRay field cannot pass unread.

Feature gates are modelled at their defaults of the tag (pkg/features/features.go:
RayJobDeletionPolicy Beta, on by default since v1.6.0, line 65; v1.7.0 line 107).
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

FILE = "ray-operator/controllers/ray/utils/validation.go"
TAGS = {"1.6": "v1.6.0", "1.7": "v1.7.0"}
"""KubeRay versions we claim, and the tag each was read at."""
MAX_RAYJOB_NAME = 47  # constant.go: MaxRayJobNameLength = MaxRayClusterNameLength(53) - 6
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")

PORTED_FIELDS = {
    "entrypoint", "submissionMode", "jobId", "backoffLimit", "preRunningDeadlineSeconds",
    "activeDeadlineSeconds", "shutdownAfterJobFinishes", "ttlSecondsAfterFinished",
    "deletionStrategy", "rayClusterSpec", "metadata", "submitterConfig", "submitterPodTemplate",
    "suspend",
}
"""RayJob spec fields whose rules are ported (the rest of ValidateRayJobSpec concerns fields
we never render: clusterSelector, runtimeEnvYAML, ...)."""
PORTED_CLUSTER_FIELDS = {"rayVersion", "authOptions", "enableInTreeAutoscaling",
                         "headGroupSpec", "workerGroupSpecs"}


@dataclass(frozen=True)
class Rule:
    lines: dict[str, int]
    """Line of the rule's ``if`` in validation.go at each tag."""
    check: Callable[[dict[str, Any], dict[str, Any]], str | None]
    """(RayJob, spec) -> the error KubeRay gives, or None."""

    def cite(self, version: str) -> str:
        return f"kuberay {TAGS[version]} {FILE}:{self.lines[version]}"


def _spec(rj: dict[str, Any]) -> dict[str, Any]:
    return rj.get("spec") or {}


def _cluster(spec: dict[str, Any]) -> dict[str, Any]:
    return spec.get("rayClusterSpec") or {}


def _groups(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return _cluster(spec).get("workerGroupSpecs") or []


def _head_container(spec: dict[str, Any]) -> dict[str, Any]:
    containers = (((_cluster(spec).get("headGroupSpec") or {}).get("template") or {})
                  .get("spec") or {}).get("containers") or [{}]
    return containers[0]  # RayContainerIndex = 0


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value") for e in container.get("env") or []}


def _autoscaling(spec: dict[str, Any]) -> bool:
    return bool(_cluster(spec).get("enableInTreeAutoscaling"))


def _rules_of(spec: dict[str, Any]) -> list[dict[str, Any]]:
    return ((spec.get("deletionStrategy") or {}).get("deletionRules")) or []


def _deletion_rule_errors(spec: dict[str, Any]) -> str | None:
    """validateDeletionRules + validateDeletionCondition + validateTTLConsistency."""
    ttl: dict[tuple[str, str], dict[str, int]] = {}
    errs = []
    for i, rule in enumerate(_rules_of(spec)):
        cond = rule.get("condition") or {}
        has_job, has_dep = "jobStatus" in cond, "jobDeploymentStatus" in cond
        if has_job and has_dep:
            errs.append(f"deletionRules[{i}]: cannot set both JobStatus and JobDeploymentStatus")
            continue
        if not has_job and not has_dep:
            errs.append(f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus "
                        "must be set")
            continue
        if cond.get("ttlSeconds", 0) < 0:
            errs.append(f"deletionRules[{i}]: TTLSeconds must be non-negative")
            continue
        if _autoscaling(spec) and rule.get("policy") == "DeleteWorkers":
            errs.append(f"deletionRules[{i}]: DeleteWorkers not supported with autoscaling")
            continue
        key = ("jobStatus", cond["jobStatus"]) if has_job else \
            ("jobDeploymentStatus", cond["jobDeploymentStatus"])
        by_policy = ttl.setdefault(key, {})
        if rule.get("policy") in by_policy:
            errs.append(f"deletionRules[{i}]: duplicate rule for {rule.get('policy')} and {key}")
            continue
        by_policy[rule.get("policy")] = cond.get("ttlSeconds", 0)
    for key, by_policy in ttl.items():
        order = [(p, by_policy[p]) for p in ("DeleteWorkers", "DeleteCluster", "DeleteSelf")
                 if p in by_policy]
        for (p0, t0), (p1, t1) in itertools.pairwise(order):
            if t1 < t0:
                errs.append(f"for {key}: {p1} TTL ({t1}) must be >= {p0} TTL ({t0})")
    return "; ".join(errs) or None


def _legacy_policies(spec: dict[str, Any]) -> str | None:
    ds = spec.get("deletionStrategy") or {}
    if "onSuccess" not in ds and "onFailure" not in ds:
        return None
    return "legacy onSuccess/onFailure deletion policies: not rendered by prolong, not ported"


def _worker_replicas(spec: dict[str, Any]) -> str | None:
    for g in _groups(spec):
        name = g.get("groupName")
        lo, hi = g.get("minReplicas"), g.get("maxReplicas")
        if not _autoscaling(spec) and (lo is None or hi is None):
            return f"worker group {name} must set both minReplicas and maxReplicas"
        if lo is not None and lo < 0:
            return f"worker group {name} has negative minReplicas {lo}"
        if hi is not None and hi < 0:
            return f"worker group {name} has negative maxReplicas {hi}"
        if lo is not None and hi is not None and lo > hi:
            return f"worker group {name} has minReplicas {lo} greater than maxReplicas {hi}"
    return None


def _group_resources(spec: dict[str, Any]) -> str | None:
    groups = [("Head", _cluster(spec).get("headGroupSpec") or {}), *[
        (g.get("groupName"), g) for g in _groups(spec)]]
    for name, g in groups:
        params = g.get("rayStartParams") or {}
        if any(params.get(k) for k in ("num-cpus", "num-gpus", "memory", "resources")) \
                and g.get("resources"):
            return f"resource fields set in both rayStartParams and Resources for {name} group"
        if "labels" in params:
            return f"rayStartParams['labels'] is not supported for {name} group"
    return None


def _token_version(spec: dict[str, Any]) -> str | None:
    cluster = _cluster(spec)
    auth = cluster.get("authOptions") or {}
    if auth.get("mode") != "token":
        if auth.get("enableK8sTokenAuth"):
            return "authOptions.enableK8sTokenAuth is enabled but authOptions.mode not 'token'"
        return None
    version = cluster.get("rayVersion") or ""
    if not version:
        return "authOptions.mode is 'token' but RayVersion was not specified"
    parts = re.match(r"^v?(\d+)\.(\d+)(?:\.(\d+))?", version)
    if parts is None:
        return f"authOptions.mode is 'token' but RayVersion format is invalid: {version}"
    if tuple(int(x or 0) for x in parts.groups()) < (2, 52, 0):
        return f"authOptions.mode is 'token' but minimum Ray version is 2.52.0, got {version}"
    return None


def _unported(spec: dict[str, Any]) -> str | None:
    extra = sorted(set(spec) - PORTED_FIELDS) + [
        f"rayClusterSpec.{k}" for k in sorted(set(_cluster(spec)) - PORTED_CLUSTER_FIELDS)]
    if extra:
        return f"the oracle ports no rule for {', '.join(extra)}: port them from {FILE}"
    return None


RULES: dict[str, Rule] = {
    "metadata.name length": Rule({"1.6": 280, "1.7": 534}, lambda rj, s: (
        f"RayJob name should be no more than {MAX_RAYJOB_NAME} characters"
        if len(rj["metadata"]["name"]) > MAX_RAYJOB_NAME else None)),
    "metadata.name DNS-1035": Rule({"1.6": 283, "1.7": 537}, lambda rj, s: (
        "RayJob name should be a valid DNS1035 label"
        if not DNS_1035.match(rj["metadata"]["name"]) else None)),
    "suspend needs shutdownAfterJobFinishes": Rule({"1.6": 293, "1.7": 547}, lambda rj, s: (
        "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
        if s.get("suspend") and not s.get("shutdownAfterJobFinishes") else None)),
    "ttlSecondsAfterFinished >= 0": Rule({"1.6": 297, "1.7": 551}, lambda rj, s: (
        "TTLSecondsAfterFinished must be a non-negative integer"
        if s.get("ttlSecondsAfterFinished", 0) < 0 else None)),
    "TTL needs shutdownAfterJobFinishes": Rule({"1.6": 495, "1.7": 753}, lambda rj, s: (
        "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
        if not s.get("shutdownAfterJobFinishes") and s.get("ttlSecondsAfterFinished", 0) > 0
        else None)),
    "deletionStrategy needs its feature gate": Rule({"1.6": 505, "1.7": 763}, lambda rj, s: (
        None)),  # RayJobDeletionPolicy is on by default at both tags (module docstring)
    "deletionRules exclude shutdownAfterJobFinishes": Rule({"1.6": 513, "1.7": 771},
        lambda rj, s: ("spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules "
                       "are mutually exclusive"
                       if _rules_of(s) and s.get("shutdownAfterJobFinishes") else None)),
    "deletionRules exclude legacy policies": Rule({"1.6": 516, "1.7": 774},
                                                  lambda rj, s: _legacy_policies(s)),
    "empty deletionStrategy": Rule({"1.6": 530, "1.7": 788}, lambda rj, s: (
        "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules "
        "field" if "deletionStrategy" in s and not _rules_of(s) and not _legacy_policies(s)
        else None)),
    "deletion rules: conditions, uniqueness, TTL order": Rule(
        {"1.6": 617, "1.7": 875}, lambda rj, s: _deletion_rule_errors(s)),
    "rayClusterSpec or clusterSelector": Rule({"1.6": 310, "1.7": 564}, lambda rj, s: (
        "one of RayClusterSpec or ClusterSelector must be set"
        if not s.get("rayClusterSpec") and not s.get("clusterSelector") else None)),
    "InteractiveMode has no backoffLimit": Rule({"1.6": 333, "1.7": 587}, lambda rj, s: (
        "BackoffLimit is incompatible with InteractiveMode"
        if s.get("submissionMode") == "InteractiveMode" and (s.get("backoffLimit") or 0) > 0
        else None)),
    "SidecarMode has no submitterPodTemplate": Rule({"1.6": 338, "1.7": 592}, lambda rj, s: (
        "SidecarMode doesn't support SubmitterPodTemplate"
        if s.get("submissionMode") == "SidecarMode" and "submitterPodTemplate" in s else None)),
    "SidecarMode has no submitterConfig": Rule({"1.6": 342, "1.7": 596}, lambda rj, s: (
        "SidecarMode doesn't support SubmitterConfig"
        if s.get("submissionMode") == "SidecarMode" and "submitterConfig" in s else None)),
    "SidecarMode head restartPolicy": Rule({"1.6": 346, "1.7": 600}, lambda rj, s: (
        "restartPolicy for head Pod should be Never or unset when using SidecarMode"
        if s.get("submissionMode") == "SidecarMode" and (
            _cluster(s).get("headGroupSpec", {}).get("template", {}).get("spec", {})
            .get("restartPolicy") not in (None, "", "Never")) else None)),
    "no K8s token auth for RayJobs": Rule({"1.6": 352, "1.7": 606}, lambda rj, s: (
        "K8s token auth mode is currently not supported for RayJob"
        if (_cluster(s).get("authOptions") or {}).get("enableK8sTokenAuth") else None)),
    "activeDeadlineSeconds > 0": Rule({"1.6": 365, "1.7": 619}, lambda rj, s: (
        "activeDeadlineSeconds must be a positive integer"
        if "activeDeadlineSeconds" in s and s["activeDeadlineSeconds"] <= 0 else None)),
    "preRunningDeadlineSeconds > 0": Rule({"1.6": 368, "1.7": 622}, lambda rj, s: (
        "preRunningDeadlineSeconds must be a positive integer"
        if "preRunningDeadlineSeconds" in s and s["preRunningDeadlineSeconds"] <= 0 else None)),
    "backoffLimit >= 0": Rule({"1.6": 371, "1.7": 625}, lambda rj, s: (
        "backoffLimit must be a positive integer" if (s.get("backoffLimit") or 0) < 0 else None)),
    # ValidateRayClusterSpec, called at v1.6.0:355 / v1.7.0:609
    "head has a container": Rule({"1.6": 103, "1.7": 104}, lambda rj, s: (
        "headGroupSpec should have at least one container"
        if not _cluster(s).get("headGroupSpec", {}).get("template", {}).get("spec", {})
        .get("containers") else None)),
    "workers have a container": Rule({"1.6": 118, "1.7": 119}, lambda rj, s: (
        "workerGroupSpec should have at least one container"
        if any(not g.get("template", {}).get("spec", {}).get("containers") for g in _groups(s))
        else None)),
    "worker replicas": Rule({"1.6": 124, "1.7": 125}, lambda rj, s: _worker_replicas(s)),
    "group resources and labels": Rule({"1.6": 64, "1.7": 65},
                                       lambda rj, s: _group_resources(s)),
    "RAY_REDIS_ADDRESS needs GCS FT options": Rule({"1.6": 155, "1.7": 159}, lambda rj, s: (
        "RAY_REDIS_ADDRESS implicitly enables GCS fault tolerance"
        if "RAY_REDIS_ADDRESS" in _env(_head_container(s)) else None)),
    "no redis username": Rule({"1.6": 184, "1.7": 192}, lambda rj, s: (
        "cannot set redis username" if "REDIS_USERNAME" in _env(_head_container(s))
        or (_cluster(s).get("headGroupSpec", {}).get("rayStartParams") or {}).get(
            "redis-username") else None)),
    "autoscaler v2 env without autoscaling": Rule({"1.6": 198, "1.7": 206}, lambda rj, s: (
        "RAY_enable_autoscaler_v2 cannot be set when enableInTreeAutoscaling is false"
        if not _autoscaling(s) and _env(_head_container(s)).get("RAY_enable_autoscaler_v2")
        in ("1", "true") else None)),
    "token auth needs Ray 2.52": Rule({"1.6": 238, "1.7": 284}, lambda rj, s: _token_version(s)),
    "fields outside this port": Rule({"1.6": 289, "1.7": 543}, lambda rj, s: _unported(s)),
}


def validate(rayjob: dict[str, Any], version: str) -> list[str]:
    """What KubeRay ``version`` (a key of :data:`TAGS`) says about a RayJob as its controller
    sees it (after admission webhooks): each error with the rule's citation. [] = accepted."""
    if version not in TAGS:
        raise ValueError(f"no KubeRay {version} in this oracle (claimed: {sorted(TAGS)})")
    spec = _spec(rayjob)
    out = []
    for name, rule in RULES.items():
        error = rule.check(rayjob, spec)
        if error:
            out.append(f"{error} [{name}: {rule.cite(version)}]")
    return out
