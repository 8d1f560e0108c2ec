"""Render one stage (a PretrainJob, SFTJob or EvalJob) into a KubeRay v1 ``RayJob``.

The output is a list of two plain dicts, applied together:

* a ConfigMap ``<rayjob>-spec`` holding the job spec (``job.yaml``, defaults filled in) and the
  stage's identity (``stage.json``: pipeline, stage, id, upstream ids and directories), mounted at
  ``/etc/prolong`` in the Ray head pod, where the driver runs;
* the RayJob: one head group (no GPU, ``num-cpus: 0`` so no training work lands there) and one
  worker group of ``cluster.nodes`` pods, each asking for ``workersPerNode`` GPUs, with a
  memory-backed ``/dev/shm``, the shared storage and the fabric's devices and NCCL environment.
  Its entrypoint is :data:`ENTRYPOINT`, run by KubeRay against the cluster it created.

Pure functions: no cluster access. KubeRay facts this relies on (ray-operator/apis/ray/v1):
RayJob names are at most 47 characters (the RayCluster and its head Service derive longer names
from it) and DNS-1035; a RayJob is run-once (spec edits after creation are ignored), so a new
stage id gives a new name; ``deletionStrategy.deletionRules`` needs ``shutdownAfterJobFinishes``
false (and the RayJobDeletionPolicy feature gate, on by default since KubeRay 1.6), and a worker
rule's TTL may not exceed its cluster rule's; ``authOptions.mode: token`` needs ``rayVersion``
2.52.0 or later; the Ray
container is the first container of each pod template; KubeRay derives the Ray resources
(``num-gpus``, ``num-cpus``, memory) from the container limits.
"""

from __future__ import annotations

from importlib import metadata
from typing import Any

import yaml

from prolong.eval.judge import API_KEY_ENV as JUDGE_API_KEY_ENV
from prolong.k8s.podtemplate import (
    HEAD_CONTAINER,
    RESERVED_LABELS,
    WORKER_CONTAINER,
    apply_pod_templates,
)
from prolong.k8s.preparation import preparation_name
from prolong.k8s.preparation import render_preparation as preparation_job
from prolong.model.memory import allocator_env
from prolong.plan import default_active_deadline
from prolong.spec import (
    API_VERSION,
    ClusterSpec,
    Job,
    KubernetesSpec,
    ProLongPipeline,
)
from prolong.stage.identity import StageRef, pipeline_stages, standalone_stage
from prolong.stage.logs import POD_STDOUT, TEE_ENV
from prolong.stage.names import (
    DIRECTORY_ANNOTATION,
    JOB_NAME_MAX,
    KIND_LABEL,
    LABEL_PREFIX,
    PIPELINE_LABEL,
    STAGE_ID_LABEL,
    STAGE_LABEL,
    configmap_name,
    fit_name,
    rayjob_name,
)
from prolong.stage.payload import JOB_FILE, STAGE_FILE, stage_file_text
from prolong.stage.uri import is_object_store


def _package_version() -> str:
    try:
        return metadata.version("prolong")
    except metadata.PackageNotFoundError:  # a source tree that was never installed
        return "0.0.0"


__version__ = _package_version()

ENTRYPOINT = "prolongctl run /etc/prolong/job.yaml --ray-address auto --require-prepared"
"""What the RayJob runs on the head pod (the engine's ``prolongctl run``); the stage's
preparation Job has staged the model and prepared the data, and the head only checks that."""
SPEC_MOUNT = "/etc/prolong"
DEFAULT_IMAGE = f"ghcr.io/prolong-dev/prolong-train:{__version__}"
"""Image used when cluster.image is not set (built from images/train/Dockerfile)."""

KUBERAY_SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")
"""Every mode KubeRay v1 accepts (rayjob_types.go); the CRD schema itself has no enum."""

RAY_GROUP, RAY_VERSION, RAY_PLURAL = "ray.io", "v1", "rayjobs"
"""KubeRay's RayJob resource, as the Kubernetes API addresses it."""
GPU_RESOURCE = "nvidia.com/gpu"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
PRIORITY_CLASS_LABEL = "kueue.x-k8s.io/priority-class"
"""Kueue's WorkloadPriorityClass of a queued RayJob (kueue pkg/controller/constants:48)."""
RAY_METRICS_PORT = 8080
DASHBOARD_PORT = 8265
RAY_UID = 1000
"""The user the train image runs as (images/train/Dockerfile; KubeRay's images use it too)."""
POD_SECURITY_CONTEXT = {"runAsNonRoot": True, "runAsUser": RAY_UID, "runAsGroup": RAY_UID,
                        "fsGroup": RAY_UID, "fsGroupChangePolicy": "OnRootMismatch",
                        "seccompProfile": {"type": "RuntimeDefault"}}
"""Pod-level part of Kubernetes' restricted profile for every Ray pod we render. fsGroup: the
volumes a stage mounts are group-writable by the pods' user (a fresh block volume is owned by
root); OnRootMismatch changes ownership once, not on every start of a pod over a large
volume."""
SUBMITTER_CONTAINER = "ray-job-submitter"
"""KubeRay's submitter container (K8sJobMode: a Job named like the RayJob; SidecarMode: in the
head pod)."""
DRIVER_LOG_CONTAINER = "driver-log"
"""HTTPMode's log container in the head pod: it follows the Ray driver's log file, so the pod
log API (``prolongctl logs``, ``kubectl logs -c driver-log``) shows the run as the submitter's
pod does in K8sJobMode. HTTPMode has no submitter, and the head container's own log is Ray's,
not the driver's."""
RAY_LOGS_MOUNT = "/tmp/ray"
"""Ray's session directory in the head container (its logs/ holds job-driver-<id>.log)."""
SUBMITTER_RESOURCES = {"requests": {"cpu": "500m", "memory": "200Mi"},
                       "limits": {"cpu": "1", "memory": "1Gi"}}
"""What KubeRay gives its default submitter (common.GetDefaultSubmitterContainer)."""

# Per-worker defaults (see KubernetesSpec): an 8 x H100 node has 192-208 vCPUs and 1.8-2 TiB.
DEFAULT_CPUS_PER_WORKER = {"gpu": 22.0, "cpu": 2.0}
DEFAULT_MEMORY_PER_WORKER_GI = {"gpu": 200, "cpu": 4}

NETWORK_RESOURCES: dict[str, dict[str, int]] = {
    "tcp": {},
    "infiniband": {"rdma/rdma_shared_device_a": 1},
    "efa": {"vpc.amazonaws.com/efa": 32},
}
NETWORK_ENV: dict[str, dict[str, str]] = {
    "tcp": {},
    "infiniband": {"NCCL_IB_DISABLE": "0"},
    # NCCL_NET_PLUGIN in the container env, not in /etc/profile.d: KubeRay >= 1.4 starts Ray
    # with `/bin/bash -c` (utils.GetContainerCommand: `-l` only with ENABLE_LOGIN_SHELL on the
    # operator), which reads no profile. The plugin's directory is on the image's
    # LD_LIBRARY_PATH (images/train/Dockerfile); without this variable NCCL never loads it.
    "efa": {"FI_PROVIDER": "efa", "FI_EFA_USE_DEVICE_RDMA": "1", "NCCL_NET_PLUGIN": "ofi"},
}
FABRIC_CHECK = ["python", "-m", "prolong.k8s.fabric"]
"""The GPU workers' container command: KubeRay runs it before ``ray start`` as ``<command> &&
ulimit ...; ray start ...`` under ``/bin/bash -c`` (ray-operator/controllers/ray/common/pod.go,
BuildPod), so the check that says which network NCCL took runs in every GPU pod, and with
PROLONG_FABRIC_STRICT=1 a wrong fabric stops the pod before Ray starts."""


# ------------------------------------------------------------------------------------------
# Labels
# ------------------------------------------------------------------------------------------

def stage_labels(job: Job, ref: StageRef, *, managed_by: str = "prolongctl") -> dict[str, str]:
    """Labels of every object rendered for a stage (user labels first, ours win)."""
    labels = dict(job.metadata.labels)
    labels.update({
        "app.kubernetes.io/name": "prolong",
        "app.kubernetes.io/instance": ref.pipeline,
        "app.kubernetes.io/component": ref.stage,
        "app.kubernetes.io/part-of": "prolong",
        "app.kubernetes.io/version": __version__,
        "app.kubernetes.io/managed-by": managed_by,
        PIPELINE_LABEL: ref.pipeline,
        STAGE_LABEL: ref.stage,
        STAGE_ID_LABEL: ref.id,
        KIND_LABEL: job.kind,
    })
    return labels


# ------------------------------------------------------------------------------------------
# Pod layout
# ------------------------------------------------------------------------------------------

def worker_resources(cluster: ClusterSpec) -> dict[str, str]:
    """Requests (= limits) of one worker pod: GPUs, CPU, memory and fabric devices."""
    k8s = cluster.kubernetes
    workers = cluster.workers_per_node
    cpus = k8s.cpus_per_worker or DEFAULT_CPUS_PER_WORKER[cluster.device]
    mem = k8s.memory_per_worker_gi or DEFAULT_MEMORY_PER_WORKER_GI[cluster.device]
    out = {"cpu": _cpu_quantity(cpus * workers), "memory": f"{mem * workers}Gi"}
    if cluster.device == "gpu":
        out[GPU_RESOURCE] = str(workers)
        fabric = k8s.network_resources if k8s.network_resources is not None \
            else NETWORK_RESOURCES[k8s.network]
        out.update({name: str(count) for name, count in fabric.items()})
    return out


def _cpu_quantity(cores: float) -> str:
    return str(int(cores)) if float(cores).is_integer() else f"{round(cores * 1000)}m"


def _memory_gi(resources: dict[str, str]) -> int:
    return int(resources["memory"].removesuffix("Gi"))


GIB = 2**30
OBJECT_STORE_PROPORTION = 0.3
OBJECT_STORE_MAX_BYTES = 200 * 10**9
"""Ray's default object store: 30% of the node's memory, at most 200 GB
(ray_constants.DEFAULT_OBJECT_STORE_MEMORY_PROPORTION / _MAX_MEMORY_BYTES)."""


def object_store_bytes(memory_gi: int, shm_gi: int) -> int:
    """The object store a Ray pod is started with (``object-store-memory``): Ray's default, but
    within 95% of the pod's /dev/shm. Left to Ray, a small shm gets a store larger than itself
    (Ray never caps below 10 GB), which then lives in /tmp on disk instead of memory."""
    default = min(int(memory_gi * GIB * OBJECT_STORE_PROPORTION), OBJECT_STORE_MAX_BYTES)
    return min(default, int(shm_gi * GIB * 0.95))


def ray_env(cluster: ClusterSpec, ref: StageRef) -> list[dict[str, Any]]:
    env = {
        "PROLONG_PIPELINE": ref.pipeline,
        "PROLONG_STAGE": ref.stage,
        "PROLONG_STAGE_ID": ref.id,
        "RAY_USAGE_STATS_ENABLED": "0",
        # Workers' output goes to the stage's logs/ and, copied from there, to the pod's stdout
        # (prolong.stage.logs), where kubectl logs and the cluster's log collection read it.
        TEE_ENV: POD_STDOUT,
    }
    env.update(NETWORK_ENV[cluster.kubernetes.network] if cluster.device == "gpu" else {})
    env.update(cluster.kubernetes.nccl_env)
    return [{"name": k, "value": v} for k, v in env.items()]


def allocator_pod_env(job: Job) -> list[dict[str, Any]]:
    """A training stage's CUDA allocator setting (parallelism.memory.expandableSegments) for its
    GPU pods, as the Ray Train workers also get it (prolong.train.entry.worker_env)."""
    par = getattr(job.spec, "parallelism", None)
    if par is None:
        return []
    env = allocator_env(par.memory, gpu=job.spec.cluster.device == "gpu")
    return [{"name": k, "value": v} for k, v in env.items()]


def judge_key_env(job: Job) -> list[dict[str, Any]]:
    """An EvalJob's judge API key, from the Secret its judge names (key JUDGE_API_KEY), as the
    environment variable the judge reads (prolong.eval.judge); nothing for other jobs."""
    judge = getattr(job.spec, "judge", None)
    if judge is None or judge.api_key_secret_ref is None:
        return []
    return [{"name": JUDGE_API_KEY_ENV, "valueFrom": {"secretKeyRef": {
        "name": judge.api_key_secret_ref, "key": JUDGE_API_KEY_ENV}}}]


def _storage_volume(job: Job) -> tuple[list[dict], list[dict]]:
    """(volumes, mounts) for the shared storage (none for an object-store root) and the
    claims of cluster.kubernetes.volumes: what every pod of the stage mounts
    (prolong.k8s.mounts holds every path the stage reads to these)."""
    storage = job.spec.storage
    volumes, mounts = [], []
    if storage.volume_claim is not None and not is_object_store(storage.root):
        volumes.append({"name": "storage",
                        "persistentVolumeClaim": {"claimName": storage.volume_claim}})
        mounts.append({"name": "storage", "mountPath": storage.root})
    for i, vol in enumerate(job.spec.cluster.kubernetes.volumes):
        volumes.append({"name": f"volume-{i}", "persistentVolumeClaim": {
            "claimName": vol.claim, "readOnly": vol.read_only}})
        mount = {"name": f"volume-{i}", "mountPath": vol.mount_path, "readOnly": vol.read_only}
        if vol.sub_path:
            mount["subPath"] = vol.sub_path
        mounts.append(mount)
    return volumes, mounts


def _container(name: str, image: str, resources: dict[str, str], env: list[dict],
               mounts: list[dict], ports: list[dict], env_from: list[dict],
               capabilities: list[str]) -> dict[str, Any]:
    container: dict[str, Any] = {
        "name": name,
        "image": image,
        "imagePullPolicy": "IfNotPresent",
        "resources": {"requests": dict(resources), "limits": dict(resources)},
        "env": [dict(e) for e in env],  # copies: head and workers never share objects
        "ports": ports,
        "volumeMounts": [dict(m) for m in mounts],
        # Ray stops itself on SIGTERM; give it time to flush logs and checkpoints.
        "lifecycle": {"preStop": {"exec": {"command": ["/bin/sh", "-c", "ray stop"]}}},
    }
    if env_from:
        container["envFrom"] = env_from
    # Kubernetes' "restricted" profile; an RDMA fabric adds IPC_LOCK (pinned memory for the
    # verbs), the one documented exception.
    caps: dict[str, list[str]] = {"drop": ["ALL"]}
    if capabilities:
        caps["add"] = list(capabilities)
    container["securityContext"] = {"allowPrivilegeEscalation": False, "capabilities": caps}
    return container


def _pod_spec(container: dict[str, Any], volumes: list[dict], cluster: ClusterSpec, *,
              workers: bool) -> dict[str, Any]:
    tolerations = [t.model_dump(exclude_none=True) for t in cluster.tolerations]
    if workers and cluster.device == "gpu":
        tolerations.append({"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"})
    pod: dict[str, Any] = {"containers": [container], "volumes": [dict(v) for v in volumes],
                           "securityContext": dict(POD_SECURITY_CONTEXT)}
    if tolerations:
        pod["tolerations"] = tolerations
    if workers and cluster.node_selector:
        pod["nodeSelector"] = dict(cluster.node_selector)
    if cluster.kubernetes.service_account:
        pod["serviceAccountName"] = cluster.kubernetes.service_account
    return pod


def submitter_template(image: str, pod_labels: dict[str, str]) -> dict[str, Any]:
    """The pod of KubeRay's submitter Job (K8sJobMode), as KubeRay's default one (the head's
    image, its resources, restartPolicy Never) plus what the default lacks: the stage's labels
    (the chart's NetworkPolicy lets only labelled stage pods reach a head's dashboard) and the
    restricted securityContext (a namespace enforcing Pod Security "restricted" refuses the
    default). No command: KubeRay fills in ``ray job submit``, the dashboard address, the
    submission id and the auth token's environment."""
    container = {"name": SUBMITTER_CONTAINER, "image": image, "imagePullPolicy": "IfNotPresent",
                 "resources": {k: dict(v) for k, v in SUBMITTER_RESOURCES.items()},
                 "securityContext": {"allowPrivilegeEscalation": False,
                                     "capabilities": {"drop": ["ALL"]}}}
    return {"metadata": {"labels": dict(pod_labels)},
            "spec": {"restartPolicy": "Never", "containers": [container],
                     "securityContext": dict(POD_SECURITY_CONTEXT)}}


def add_driver_log(head_pod: dict[str, Any], job_id: str) -> None:
    """Share Ray's session directory of the head container with a :data:`DRIVER_LOG_CONTAINER`
    that follows ``job-driver-<job_id>.log`` (``tail -F`` waits for the file and follows it by
    name). Same image, the restricted profile, a submitter's share of the head's resources."""
    head_pod["volumes"].append({"name": "ray-logs", "emptyDir": {}})
    head_pod["containers"][0]["volumeMounts"].append({"name": "ray-logs",
                                                      "mountPath": RAY_LOGS_MOUNT})
    log = f"{RAY_LOGS_MOUNT}/session_latest/logs/job-driver-{job_id}.log"
    head_pod["containers"].append({
        "name": DRIVER_LOG_CONTAINER, "image": head_pod["containers"][0]["image"],
        "imagePullPolicy": "IfNotPresent", "command": ["tail", "-n", "+1", "-F", log],
        "resources": {"requests": {"cpu": "50m", "memory": "64Mi"},
                      "limits": {"cpu": "250m", "memory": "128Mi"}},
        "volumeMounts": [{"name": "ray-logs", "mountPath": RAY_LOGS_MOUNT, "readOnly": True}],
        "securityContext": {"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}}})


def auth_options(k8s: KubernetesSpec) -> dict[str, str]:
    """KubeRay's authOptions: token auth unless the spec turns it off; the token comes from
    rayAuthSecret (key auth_token) or, by default, the Secret KubeRay generates per cluster."""
    if k8s.ray_auth != "token":
        return {"mode": "disabled"}
    out = {"mode": "token"}
    if k8s.ray_auth_secret:
        out["secretName"] = k8s.ray_auth_secret
    return out


def hub_token_env(job: Job) -> list[dict[str, Any]]:
    """HF_TOKEN from the Secret ``model.hubTokenSecret`` names (key ``token``), for the one step
    that downloads: the container that stages a gated hub model (the CPU staging Job). Never in
    the Ray pods (they load the staged copy; a token there is a secret on 64 GPUs' worth of
    pods for nothing). (prolong.model.staging's TOKEN_ENV and TOKEN_SECRET_KEY; not imported
    here: it loads the filesystem layer.) [] without a Secret."""
    secret = job.spec.model.hub_token_secret
    if secret is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": secret, "key": "token"}}}]


def ray_cluster_spec(job: Job, ref: StageRef, spec_configmap: str,
                     pod_labels: dict[str, str]) -> dict[str, Any]:
    cluster = job.spec.cluster
    k8s = cluster.kubernetes
    image = cluster.image or DEFAULT_IMAGE
    env = ray_env(cluster, ref) + judge_key_env(job)  # the judge runs on the head (the driver)
    env += allocator_pod_env(job)  # no hub_token_env: the Ray pods never download
    env_from = ([{"secretRef": {"name": k8s.object_store_secret}}]
                if k8s.object_store_secret else [])
    storage_volumes, storage_mounts = _storage_volume(job)
    rdma = cluster.device == "gpu" and (k8s.network != "tcp" or bool(k8s.network_resources))

    def shm(resources: dict[str, str]) -> tuple[dict, dict]:
        size = max(1, int(_memory_gi(resources) * k8s.shm_fraction))
        return ({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": f"{size}Gi"}},
                {"name": "dshm", "mountPath": "/dev/shm"})

    def store(resources: dict[str, str]) -> str:
        size = max(1, int(_memory_gi(resources) * k8s.shm_fraction))
        return str(object_store_bytes(_memory_gi(resources), size))

    head_res = {"cpu": str(k8s.head_cpus), "memory": f"{k8s.head_memory_gi}Gi"}
    head_shm_vol, head_shm_mount = shm(head_res)
    spec_vol = {"name": "prolong-spec", "configMap": {"name": spec_configmap}}
    spec_mount = {"name": "prolong-spec", "mountPath": SPEC_MOUNT, "readOnly": True}
    head_ports = [{"name": "gcs-server", "containerPort": 6379},
                  {"name": "dashboard", "containerPort": DASHBOARD_PORT},
                  {"name": "client", "containerPort": 10001},
                  {"name": "metrics", "containerPort": RAY_METRICS_PORT}]
    head = _container(HEAD_CONTAINER, image, head_res, env, [head_shm_mount, spec_mount,
                      *storage_mounts], head_ports, env_from, [])
    head_pod = _pod_spec(head, [head_shm_vol, spec_vol, *storage_volumes], cluster, workers=False)

    worker_res = worker_resources(cluster)
    worker_shm_vol, worker_shm_mount = shm(worker_res)
    worker = _container(WORKER_CONTAINER, image, worker_res, env, [worker_shm_mount, *storage_mounts],
                        [{"name": "metrics", "containerPort": RAY_METRICS_PORT}], env_from,
                        ["IPC_LOCK"] if rdma else [])
    if cluster.device == "gpu":
        worker["command"] = list(FABRIC_CHECK)
    worker_pod = _pod_spec(worker, [worker_shm_vol, *storage_volumes], cluster, workers=True)

    group = "gpu-workers" if cluster.device == "gpu" else "cpu-workers"
    return {
        "rayVersion": k8s.ray_version,
        "authOptions": auth_options(k8s),
        "enableInTreeAutoscaling": False,
        "headGroupSpec": {
            # num-cpus 0: Ray schedules no task or actor with resources on the head pod.
            "rayStartParams": {"dashboard-host": "0.0.0.0", "num-cpus": "0",
                               "metrics-export-port": str(RAY_METRICS_PORT),
                               "object-store-memory": store(head_res)},
            "template": {"metadata": {"labels": dict(pod_labels)}, "spec": head_pod},
        },
        "workerGroupSpecs": [{
            "groupName": group,
            "replicas": cluster.nodes,
            "minReplicas": cluster.nodes,
            "maxReplicas": cluster.nodes,
            "numOfHosts": 1,
            "rayStartParams": {"metrics-export-port": str(RAY_METRICS_PORT),
                               "object-store-memory": store(worker_res)},
            "template": {"metadata": {"labels": dict(pod_labels)}, "spec": worker_pod},
        }],
    }


# ------------------------------------------------------------------------------------------
# Objects
# ------------------------------------------------------------------------------------------

def render_job(job: Job, ref: StageRef, *, upstream: dict[str, StageRef] | None = None,
               namespace: str | None = None, managed_by: str = "prolongctl",
               name: str | None = None,
               pipeline_jobs: dict[str, Job] | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] for one stage. ``upstream`` maps stage names this stage starts from to
    their refs (recorded in stage.json so the engine finds their outputs). ``name``: the RayJob's
    name when it is not the stage's first (a retry's ``-r<n>``); the ConfigMap is the stage's
    either way. ``pipeline_jobs``: the pipeline's stages, for the default deadline's estimate."""
    first = rayjob_name(job.metadata.name, ref.id)
    name = name or first
    labels = stage_labels(job, ref, managed_by=managed_by)
    k8s = job.spec.cluster.kubernetes
    meta: dict[str, Any] = {"name": name, "labels": labels}
    if namespace:
        meta["namespace"] = namespace
    cm_name = configmap_name(first)
    cm_meta = {**meta, "name": cm_name, "labels": dict(labels)}

    dumped = job.model_dump(mode="json", by_alias=True)
    job_doc = {key: dumped[key] for key in ("apiVersion", "kind", "metadata", "spec")}
    # A pipeline stage's job is named <pipeline>-<stage>, which may exceed what a job file allows;
    # the real names travel in the labels and stage.json.
    job_doc["metadata"]["name"] = fit_name(job.metadata.name, JOB_NAME_MAX)
    job_doc["metadata"]["labels"] = {**job_doc["metadata"]["labels"],
                                     **{k: v for k, v in labels.items() if k.startswith(LABEL_PREFIX)}}
    configmap = {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": cm_meta,
        "data": {JOB_FILE: yaml.safe_dump(job_doc, sort_keys=False, width=100),
                 STAGE_FILE: stage_file_text(ref, upstream)},
    }

    rj_labels = dict(labels)
    if k8s.queue:
        rj_labels[QUEUE_LABEL] = k8s.queue
        if k8s.priority_class:
            rj_labels[PRIORITY_CLASS_LABEL] = k8s.priority_class
    pod_labels = dict(labels)  # the user's labels too (cost reports read them off the pods)
    spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": k8s.submission_mode,
        # The Ray submission id: one per RayJob (a retry is a new RayJob), so resubmitting the
        # same RayJob never runs the entrypoint twice.
        "jobId": name,
        "backoffLimit": k8s.backoff_limit,
        "preRunningDeadlineSeconds": k8s.pre_running_deadline_seconds,
        **lifecycle(k8s),
        "rayClusterSpec": ray_cluster_spec(job, ref, cm_name, pod_labels),
        "metadata": {"pipeline": ref.pipeline, "stage": ref.stage, "stageId": ref.id},
    }
    if k8s.submission_mode == "HTTPMode":
        add_driver_log(spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"], name)
    if k8s.submission_mode == "K8sJobMode":
        spec["submitterConfig"] = {"backoffLimit": k8s.submitter_backoff_limit}
        spec["submitterPodTemplate"] = submitter_template(
            spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"],
            pod_labels)
    deadline = (default_active_deadline(job, ref, pipeline_jobs)
                if k8s.active_deadline_seconds is None else k8s.active_deadline_seconds)
    if deadline:  # 0 or no estimate: no limit
        spec["activeDeadlineSeconds"] = deadline
    patches = job.spec.cluster.pod_template
    if patches is not None:  # last, over everything rendered above (prolong.k8s.podtemplate)
        apply_pod_templates(spec["rayClusterSpec"], patches.head, patches.workers,
                            {k: v for k, v in pod_labels.items() if k.startswith(RESERVED_LABELS)})
    rayjob = {"apiVersion": "ray.io/v1", "kind": "RayJob",
              "metadata": {**meta, "labels": rj_labels,
                           "annotations": {DIRECTORY_ANNOTATION: ref.directory}},
              "spec": spec}
    return [configmap, rayjob]


ENDINGS: tuple[dict[str, str], ...] = ({"jobStatus": "SUCCEEDED"}, {"jobStatus": "FAILED"},
                                       {"jobDeploymentStatus": "Failed"})
"""Every way a RayJob ends that KubeRay's deletion rules can match: the Ray job succeeded or
failed, or the RayJob itself failed (a deadline passed, submission failed) with no Ray job
status."""


def lifecycle(k8s: KubernetesSpec) -> dict[str, Any]:
    """How KubeRay releases the stage's Ray cluster once its job ends.

    With deletionRules (the default): the workers (the GPUs) after releaseWorkersAfterSeconds,
    the whole cluster after deleteClusterAfterSeconds (the head keeps the logs until then), for
    every ending. The RayJob itself stays: its status is the stage's history, and it goes with
    its pipeline or ``prolongctl delete``. KubeRay requires shutdownAfterJobFinishes false with
    rules. Without rules, and for a queued stage: shutdownAfterJobFinishes and one TTL for the
    whole cluster (Kueue's webhook refuses a managed RayJob without shutdownAfterJobFinishes,
    kueue v0.19.2 rayjob_webhook.go:138, and KubeRay refuses rules beside it)."""
    if not k8s.deletion_rules or k8s.queue:
        return {"shutdownAfterJobFinishes": True,
                "ttlSecondsAfterFinished": k8s.delete_cluster_after_seconds}
    rules = [{"condition": {**ending, "ttlSeconds": ttl}, "policy": policy}
             for ending in ENDINGS
             for policy, ttl in (("DeleteWorkers", k8s.release_workers_after_seconds),
                                 ("DeleteCluster", k8s.delete_cluster_after_seconds))]
    return {"shutdownAfterJobFinishes": False, "deletionStrategy": {"deletionRules": rules}}


def render_preparation(job: Job, ref: StageRef, *, namespace: str | None = None,
                       managed_by: str = "prolongctl") -> dict[str, Any] | None:
    """The stage's preparation Job (prolong.k8s.preparation), or None when it has nothing to
    stage or prepare: the RayJob's image, ConfigMap, volumes, object-store env and security,
    no GPU. It is created, and must complete, before the RayJob."""
    first = rayjob_name(job.metadata.name, ref.id)
    cluster = job.spec.cluster
    k8s = cluster.kubernetes
    volumes, mounts = _storage_volume(job)
    env = [{"name": k, "value": v} for k, v in (("PROLONG_PIPELINE", ref.pipeline),
                                                ("PROLONG_STAGE", ref.stage),
                                                ("PROLONG_STAGE_ID", ref.id))]
    env_from = ([{"secretRef": {"name": k8s.object_store_secret}}]
                if k8s.object_store_secret else [])
    return preparation_job(
        job, ref, name=preparation_name(first),
        labels=stage_labels(job, ref, managed_by=managed_by), image=cluster.image or DEFAULT_IMAGE,
        configmap=configmap_name(first), spec_mount=SPEC_MOUNT,
        job_file=f"{SPEC_MOUNT}/{JOB_FILE}", volumes=volumes, mounts=mounts, env=env,
        env_from=env_from, pod_security=dict(POD_SECURITY_CONTEXT),
        container_security={"allowPrivilegeEscalation": False,
                            "capabilities": {"drop": ["ALL"]}},
        namespace=namespace)


def stage_preparation(pipeline: ProLongPipeline, jobs: dict[str, Job], stage: str, *,
                      namespace: str | None = None,
                      managed_by: str = "prolong-operator") -> dict[str, Any] | None:
    """:func:`render_preparation` of one stage of a resolved pipeline (what the operator
    creates before the stage's first RayJob)."""
    refs = {r.stage: r for r in pipeline_stages(pipeline, jobs)}
    return render_preparation(jobs[stage], refs[stage], namespace=namespace,
                              managed_by=managed_by)


def render_standalone(job: Job, *, namespace: str | None = None) -> list[dict[str, Any]]:
    """A job file submitted on its own (pipeline = its name, stage = its kind's default)."""
    return render_job(job, standalone_stage(job), namespace=namespace)


def render_stage(pipeline: ProLongPipeline, jobs: dict[str, Job], stage: str, *,
                 namespace: str | None = None, managed_by: str = "prolong-operator",
                 name: str | None = None) -> list[dict[str, Any]]:
    """[ConfigMap, RayJob] of one stage of a resolved pipeline (what the operator creates);
    ``name``: the RayJob's, for an attempt after the first."""
    refs = {r.stage: r for r in pipeline_stages(pipeline, jobs)}
    if stage not in refs:
        raise KeyError(f"pipeline {pipeline.metadata.name} has no stage {stage!r}")
    job = jobs[stage]
    src = job.spec.model.from_stage
    upstream = {src: refs[src]} if src else {}
    return render_job(job, refs[stage], upstream=upstream, namespace=namespace,
                      managed_by=managed_by, name=name, pipeline_jobs=jobs)


def pipeline_resource(pipeline: ProLongPipeline, *,
                      namespace: str | None = None) -> dict[str, Any]:
    """The ProLongPipeline custom resource with every stage inline (what render/submit apply)."""
    for stage in pipeline.spec.stages:
        if not hasattr(stage, "spec"):
            raise ValueError(f"stage {stage.name} is not inline; load the pipeline with "
                             "prolong.specfile.load, which inlines ref stages")
    doc = pipeline.model_dump(mode="json", by_alias=True)
    doc["apiVersion"] = API_VERSION
    if namespace:
        doc["metadata"]["namespace"] = namespace
    return doc
