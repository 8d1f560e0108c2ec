"""Oracle: Kueue's RayJob admission webhooks (defaulting, then validateCreate), ported as rules.

Read at kubernetes-sigs/kueue tag :data:`TAG` (commit 8eab6877). A RayJob create passes
Kueue's mutating webhook ``Default`` (pkg/controller/jobs/rayjob/rayjob_webhook.go:77-90), then
its validating webhook ``validateCreate`` (same file, lines 107-158), then KubeRay's controller
sees the mutated object (:mod:`tests.oracles.kuberay`). The two cluster settings that decide
whether Kueue manages a RayJob are parameters: a LocalQueue named ``default`` in the
namespace, and ``manageJobsWithoutQueueName`` in Kueue's configuration.
"""

from __future__ import annotations

import copy
import re
from dataclasses import dataclass
from typing import Any

TAG = "v0.19.2"
WEBHOOK = "pkg/controller/jobs/rayjob/rayjob_webhook.go"
COMMON = "pkg/controller/jobs/raycluster/common.go"
DEFAULTS = "pkg/controller/jobframework/defaults.go"
UTILS = "pkg/controller/jobframework/utils.go"
VALIDATION = "pkg/controller/jobframework/validation.go"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"           # pkg/controller/constants/constants.go:23
DEFAULT_QUEUE = "default"                            # constants.go:27
PRIORITY_LABEL = "kueue.x-k8s.io/priority-class"    # constants.go:48
MAX_EXEC_LABEL = "kueue.x-k8s.io/max-exec-time-seconds"  # constants.go:59
MAX_POD_SETS = 18                                    # jobframework/constants.go:21
DNS_1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")


@dataclass(frozen=True)
class Namespace:
    """What Kueue knows about the RayJob's namespace and its own configuration."""

    default_local_queue: bool = False
    manage_jobs_without_queue_name: bool = False


def _cite(path: str, line: int) -> str:
    return f"kueue {TAG} {path}:{line}"


NO_DEFAULTS = Namespace()


def default(rayjob: dict[str, Any], ns: Namespace = NO_DEFAULTS) -> dict[str, Any]:
    """Kueue's mutating webhook: the default LocalQueue's label when there is one and the job
    names none (defaults.go:80-98), then ``suspend: true`` for a job Kueue manages (defaults.go:
    36-46 -> utils.go:148-155: a queue name, or manageJobsWithoutQueueName)."""
    out = copy.deepcopy(rayjob)
    labels = out.setdefault("metadata", {}).setdefault("labels", {})
    if ns.default_local_queue and not labels.get(QUEUE_LABEL):
        labels[QUEUE_LABEL] = DEFAULT_QUEUE
    if labels.get(QUEUE_LABEL) or ns.manage_jobs_without_queue_name:
        out.setdefault("spec", {})["suspend"] = True
    return out


def validate_create(rayjob: dict[str, Any], ns: Namespace = NO_DEFAULTS) -> list[str]:
    """``validateCreate`` on a defaulted RayJob: each error with its citation. [] = admitted."""
    errs: list[str] = []
    labels = (rayjob.get("metadata") or {}).get("labels") or {}
    spec = rayjob.get("spec") or {}
    if ns.manage_jobs_without_queue_name or labels.get(QUEUE_LABEL):  # webhook.go:111
        selector, cluster = spec.get("clusterSelector"), spec.get("rayClusterSpec")
        if selector and cluster:
            return [f"spec.clusterSelector: a kueue managed job should not use an existing "
                    f"cluster [{_cite(WEBHOOK, 118)}]"]
        if selector:
            return []  # webhook.go:124: a RayJob on an existing cluster is not Kueue's
        if not cluster:
            return [f"spec.rayClusterSpec: required for Kueue-managed jobs "
                    f"[{_cite(WEBHOOK, 130)}]"]
        if not spec.get("shutdownAfterJobFinishes"):
            errs.append(f"spec.shutdownAfterJobFinishes: a kueue managed job should delete the "
                        f"cluster after finishing [{_cite(WEBHOOK, 138)}]")
        # raycluster.ValidateCreate (webhook.go:144)
        if cluster.get("enableInTreeAutoscaling"):
            errs.append(f"spec.rayClusterSpec.enableInTreeAutoscaling: a kueue managed job "
                        f"should only use autoscaling when workload slicing is enabled "
                        f"[{_cite(COMMON, 302)}]")
        groups = cluster.get("workerGroupSpecs") or []
        if len(groups) + 1 > MAX_POD_SETS:
            errs.append(f"spec.rayClusterSpec.workerGroupSpecs: {len(groups) + 1} pod sets, "
                        f"at most {MAX_POD_SETS} [{_cite(COMMON, 314)}]")
        for i, group in enumerate(groups):
            if group.get("groupName") == "head":
                errs.append(f"spec.rayClusterSpec.workerGroupSpecs[{i}].groupName: \"head\" is "
                            f"reserved for the head group [{_cite(COMMON, 320)}]")
    # jobframework.ValidateJobOnCreate (webhook.go:148)
    queue = labels.get(QUEUE_LABEL)
    if queue is not None and not DNS_1123_SUBDOMAIN.match(queue):
        errs.append(f"metadata.labels[{QUEUE_LABEL}]: {queue!r} is not a DNS-1123 subdomain "
                    f"[{_cite(VALIDATION, 176)}]")
    if MAX_EXEC_LABEL in labels:
        value = labels[MAX_EXEC_LABEL]
        if not value.lstrip("-").isdigit() or int(value) <= 0:
            errs.append(f"metadata.labels[{MAX_EXEC_LABEL}]: should be a positive integer "
                        f"[{_cite(VALIDATION, 236)}]")
    return errs


def admit(rayjob: dict[str, Any],
          ns: Namespace = NO_DEFAULTS) -> tuple[dict[str, Any], list[str]]:
    """(the RayJob as stored, the webhook's refusals): what a cluster with Kueue makes of a
    create."""
    defaulted = default(rayjob, ns)
    return defaulted, validate_create(defaulted, ns)
