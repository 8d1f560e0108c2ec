"""A stage's preparation: a CPU-only Kubernetes Job that stages the model (``prolongctl model
stage``) and prepares the data (``prolongctl data prepare``) before the stage's GPU RayJob exists.

Why a Job of its own: tokenizing a stage's 20B tokens takes hours, and copying a gated 16 GB
checkpoint from the hub minutes; done by the driver on the Ray head (as ``prolongctl run`` does
on a laptop), all 64 GPUs would idle meanwhile, and a bad path would be found only after they
were provisioned. The operator (and ``prolongctl submit`` for one stage) creates the stage's
ConfigMap and this Job, waits for the Job to complete, and only then creates the RayJob, whose
entrypoint (``prolongctl run --require-prepared``) refuses, in one line, data that is not
prepared instead of preparing it.

The pod: the stage's image and ConfigMap (``/etc/prolong/job.yaml`` and ``stage.json``, the same
files the head reads, so both resolve the same directories), every volume the stage mounts
(:mod:`prolong.k8s.mounts`), ``cluster.kubernetes.prepare``'s CPUs and memory, no GPU and no
GPU toleration. The model is staged in an init container, the only container that gets the hub
token (``HF_TOKEN`` from ``model.hubTokenSecret``); the data is prepared in the main one. Pure
functions: no cluster access.
"""

from __future__ import annotations

from typing import Any

from prolong.spec import EvalJob, Job
from prolong.stage.identity import StageRef
from prolong.stage.names import fit_name

PREPARE_SUFFIX = "-prep"
PREPARATION_NAME_MAX = 63
"""A Job's name becomes the ``job-name`` label of its pods: at most 63 characters."""
ROLE_LABEL = "prolong.dev/role"
"""``preparation`` on the Job and its pod (the RayJob's pods have none)."""
ROLE = "preparation"
STAGE_CONTAINER = "stage-model"
PREPARE_CONTAINER = "prepare-data"
HF_TOKEN_ENV = "HF_TOKEN"
HF_TOKEN_KEY = "token"
"""prolong.model.staging's TOKEN_ENV and TOKEN_SECRET_KEY (not imported: it loads the
filesystem layer, and rendering must not)."""


def preparation_name(rayjob: str) -> str:
    """The Job of the stage whose first RayJob is named ``rayjob`` (one per stage id: retries
    of the stage reuse its preparation)."""
    return fit_name(rayjob + PREPARE_SUFFIX, PREPARATION_NAME_MAX)


def stages_model(job: Job) -> bool:
    """Whether the stage has a model or tokenizer to stage (a stagedPath; prolongctl model
    stage copies each once, and keeps a finished copy)."""
    spec = job.spec
    tok = spec.tokenizer if isinstance(job, EvalJob) else spec.data.tokenizer
    return spec.model.staged_path is not None or tok.staged_path is not None


def prepares_data(job: Job) -> bool:
    """Training stages have token shards to prepare; an eval reads its dataDir as it is."""
    return not isinstance(job, EvalJob)


def needs_preparation(job: Job) -> bool:
    return stages_model(job) or prepares_data(job)


def preparation_commands(job: Job, job_file: str) -> list[tuple[str, list[str]]]:
    """(container name, command) of each step, in order."""
    steps = []
    if stages_model(job):
        steps.append((STAGE_CONTAINER, ["prolongctl", "model", "stage", job_file]))
    if prepares_data(job):
        cpus = job.spec.cluster.kubernetes.prepare.cpus
        steps.append((PREPARE_CONTAINER, ["prolongctl", "data", "prepare", job_file,
                                          "--workers", str(cpus), "--no-progress"]))
    return steps


def render_preparation(job: Job, ref: StageRef, *, name: str, labels: dict[str, str],
                       image: str, configmap: str, spec_mount: str, job_file: str,
                       volumes: list[dict[str, Any]], mounts: list[dict[str, Any]],
                       env: list[dict[str, Any]], env_from: list[dict[str, Any]],
                       pod_security: dict[str, Any], container_security: dict[str, Any],
                       namespace: str | None = None) -> dict[str, Any] | None:
    """The batch/v1 Job preparing ``job`` (None when there is nothing to prepare). The pod
    parts the RayJob's pods share (image, env, volumes, security) come from its renderer, so
    both read the same files the same way."""
    steps = preparation_commands(job, job_file)
    if not steps:
        return None
    cluster = job.spec.cluster
    prep = cluster.kubernetes.prepare
    res = {"cpu": str(prep.cpus), "memory": f"{prep.memory_gi}Gi"}
    all_mounts = [*mounts, {"name": "prolong-spec", "mountPath": spec_mount, "readOnly": True}]

    def container(cname: str, command: list[str], extra_env: list[dict]) -> dict[str, Any]:
        c: dict[str, Any] = {
            "name": cname, "image": image, "imagePullPolicy": "IfNotPresent",
            "command": command,
            "env": [dict(e) for e in env] + extra_env,
            "resources": {"requests": dict(res), "limits": dict(res)},
            "volumeMounts": [dict(m) for m in all_mounts],
            "securityContext": dict(container_security),
        }
        if env_from:
            c["envFrom"] = [dict(e) for e in env_from]
        return c

    token = ([{"name": HF_TOKEN_ENV, "valueFrom": {"secretKeyRef": {
        "name": job.spec.model.hub_token_secret, "key": HF_TOKEN_KEY}}}]
        if job.spec.model.hub_token_secret else [])
    containers = [container(cname, cmd, token if cname == STAGE_CONTAINER else [])
                  for cname, cmd in steps]
    pod: dict[str, Any] = {
        "restartPolicy": "Never",
        "containers": containers[-1:],
        "volumes": [*(dict(v) for v in volumes),
                    {"name": "prolong-spec", "configMap": {"name": configmap}}],
        "securityContext": dict(pod_security),
    }
    if len(containers) > 1:  # staging first, alone with the token
        pod["initContainers"] = containers[:-1]
    tolerations = [t.model_dump(exclude_none=True) for t in cluster.tolerations]
    if tolerations:
        pod["tolerations"] = tolerations
    if cluster.kubernetes.service_account:
        pod["serviceAccountName"] = cluster.kubernetes.service_account
    job_labels = {**labels, ROLE_LABEL: ROLE}
    meta: dict[str, Any] = {"name": name, "labels": job_labels}
    if namespace:
        meta["namespace"] = namespace
    return {
        "apiVersion": "batch/v1", "kind": "Job", "metadata": meta,
        "spec": {
            "backoffLimit": prep.backoff_limit,
            "activeDeadlineSeconds": prep.active_deadline_seconds,
            "template": {"metadata": {"labels": dict(job_labels)}, "spec": pod},
        },
    }


def job_outcome(obj: dict[str, Any] | None) -> tuple[str, str | None]:
    """("absent" | "running" | "succeeded" | "failed", the reason) of a preparation Job, from
    its status conditions (Complete / Failed, as the Job controller sets them)."""
    if obj is None:
        return "absent", None
    status = obj.get("status") or {}
    for cond in status.get("conditions") or ():
        if cond.get("status") != "True":
            continue
        if cond.get("type") == "Complete":
            return "succeeded", None
        if cond.get("type") == "Failed":
            why = ": ".join(x for x in (cond.get("reason"), cond.get("message")) if x)
            return "failed", why or "Failed"
    return "running", None
