"""``prolongctl doctor``: what a cluster needs before the first submit, checked one line each.

A platform engineer runs it once, after ``helm install prolong charts/``, with the spec files
that will be submitted (``prolongctl doctor jobs/prolong-8b/pipeline.yaml -n ml``). Each check
reads the cluster through the Kubernetes API and says ``ok`` or ``FAIL`` with what to do:

* kuberay: the ``rayjobs.ray.io`` CRD declares every RayJob field we render (KubeRay >= 1.6:
  :mod:`prolong.k8s.kuberay_version`);
* operator: the chart's operator (Deployment or StatefulSet) has a ready replica and watches this
  namespace (``--namespace=<ns>`` or ``--all-namespaces``);
* claims: each claim the stages mount (storage.volumeClaim, cluster.kubernetes.volumes) exists,
  is Bound, has the access mode its pods need (ReadWriteMany for one written by head, workers
  and preparation at once; ReadOnlyMany or ReadWriteMany for a read-only one), and a written one
  is writable by the pods' user (a probe Pod as uid 1000 with the stages' fsGroup touches a file
  there);
* secrets: each Secret the specs name exists with the key its reader takes;
* queues: each Kueue LocalQueue a stage is queued to exists;
* images: each stage names its image (cluster.image): the default name is not published.

Exit 2 when any check fails (:func:`run_checks` returns the lines; the CLI prints them).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from prolong.k8s.backend import ClusterError
from prolong.k8s.kuberay_version import KubeRayMismatch, check_crd, read_rayjob_crd
from prolong.k8s.rayjob import POD_SECURITY_CONTEXT, RAY_UID
from prolong.spec import EvalJob, Job

OPERATOR_SELECTOR = "app.kubernetes.io/name=prolong,app.kubernetes.io/component=operator"
"""The chart's operator workload (prolong.selectorLabels with component operator)."""
KUEUE_GROUP = "kueue.x-k8s.io"
KUEUE_VERSIONS = ("v1beta2", "v1beta1")
PROBE_LABELS = {"app.kubernetes.io/name": "prolong", "app.kubernetes.io/component": "doctor"}


@dataclass(frozen=True)
class Check:
    """One line of the report."""

    name: str
    ok: bool
    detail: str

    def line(self) -> str:
        return f"{'ok  ' if self.ok else 'FAIL'}  {self.name}: {self.detail}"


@dataclass(frozen=True)
class ClaimUse:
    claim: str
    mount: str
    written: bool
    where: str


def claim_uses(jobs: Iterable[Job]) -> dict[str, ClaimUse]:
    """Each claim the stages mount, written when any stage writes it."""
    out: dict[str, ClaimUse] = {}

    def add(use: ClaimUse) -> None:
        was = out.get(use.claim)
        out[use.claim] = use if was is None or (use.written and not was.written) else was

    for job in jobs:
        storage = job.spec.storage
        if storage.volume_claim is not None and "://" not in storage.root:
            add(ClaimUse(storage.volume_claim, storage.root, True, "storage.volumeClaim"))
        for vol in job.spec.cluster.kubernetes.volumes:
            add(ClaimUse(vol.claim, vol.mount_path, not vol.read_only,
                         "cluster.kubernetes.volumes"))
    return out


def secret_uses(jobs: Iterable[Job]) -> dict[tuple[str, str | None], str]:
    """(Secret, key it must hold or None for any) -> the spec field naming it."""
    out: dict[tuple[str, str | None], str] = {}
    for job in jobs:
        spec = job.spec
        if spec.model.hub_token_secret:
            out[(spec.model.hub_token_secret, "token")] = "model.hubTokenSecret"
        judge = getattr(spec, "judge", None) if isinstance(job, EvalJob) else None
        if judge is not None and judge.api_key_secret_ref:
            out[(judge.api_key_secret_ref, "JUDGE_API_KEY")] = "judge.apiKeySecretRef"
        k8s = spec.cluster.kubernetes
        if k8s.object_store_secret:
            out[(k8s.object_store_secret, None)] = "cluster.kubernetes.objectStoreSecret"
        if k8s.ray_auth_secret:
            out[(k8s.ray_auth_secret, "auth_token")] = "cluster.kubernetes.rayAuthSecret"
    return out


class Doctor:
    """The checks, over one namespace of one cluster (a kubernetes ApiClient)."""

    def __init__(self, api: Any, namespace: str, jobs: list[Job], *,
                 operator_namespace: str | None = None, probe: bool = True,
                 probe_timeout: float = 120.0, poll: float = 2.0) -> None:
        # Imported here: kubernetes is heavy and `prolongctl validate` must not load it.
        from kubernetes.client import AppsV1Api, CoreV1Api, CustomObjectsApi

        self.api, self.namespace, self.jobs = api, namespace, jobs
        self.operator_namespace = operator_namespace or namespace
        self.probe, self.probe_timeout, self.poll = probe, probe_timeout, poll
        self.core, self.apps = CoreV1Api(api), AppsV1Api(api)
        self.custom = CustomObjectsApi(api)

    # -- each check returns one or more lines
    def kuberay(self) -> list[Check]:
        try:
            check_crd(read_rayjob_crd(self.api), where="this cluster")
        except KubeRayMismatch as exc:
            return [Check("kuberay", False, str(exc))]
        return [Check("kuberay", True, "the rayjobs.ray.io CRD declares every RayJob field "
                                       "prolong renders (KubeRay >= 1.6)")]

    def operator(self) -> list[Check]:
        ns = self.operator_namespace
        found = [*self._items(self.apps.list_namespaced_deployment, ns),
                 *self._items(self.apps.list_namespaced_stateful_set, ns)]
        if not found:
            return [Check("operator", False, f"no prolong operator (Deployment or StatefulSet "
                          f"labelled {OPERATOR_SELECTOR}) in namespace {ns}: helm install "
                          f"prolong charts/ -n {ns} (or --operator-namespace)")]
        for obj in found:
            name = f"{obj['kind']} {ns}/{obj['metadata']['name']}"
            containers = obj["spec"]["template"]["spec"]["containers"]
            args = [a for c in containers for a in (c.get("command") or []) + (c.get("args") or [])]
            watched = [a.split("=", 1)[1] for a in args if a.startswith("--namespace=")]
            everywhere = "--all-namespaces" in args or "-A" in args
            ready = (obj.get("status") or {}).get("readyReplicas") or 0
            if ready < 1:
                return [Check("operator", False, f"{name} has no ready replica (kubectl "
                                                 f"describe pods -n {ns} -l "
                                                 f"{OPERATOR_SELECTOR})")]
            if not everywhere and self.namespace not in watched:
                return [Check("operator", False, f"{name} watches namespace "
                                                 f"{', '.join(watched) or 'none'}, not "
                                                 f"{self.namespace}: install the chart in "
                                                 f"{self.namespace}, or with "
                                                 "rbac.clusterWide=true")]
            scope = "every namespace" if everywhere else f"namespace {self.namespace}"
            return [Check("operator", True, f"{name} is ready and watches {scope}")]
        return []

    def claims(self) -> list[Check]:
        out = []
        uses = claim_uses(self.jobs)
        if not uses:
            return [Check("claims", True, "no stage mounts a claim (object-store storage)")]
        for use in uses.values():
            name = f"claim {use.claim}"
            pvc = self._get(self.core.read_namespaced_persistent_volume_claim, use.claim)
            if pvc is None:
                out.append(Check(name, False, f"no PersistentVolumeClaim {use.claim} in "
                                              f"namespace {self.namespace} ({use.where})"))
                continue
            phase = (pvc.get("status") or {}).get("phase")
            modes = set((pvc.get("status") or {}).get("accessModes") or
                        pvc["spec"].get("accessModes") or [])
            if phase != "Bound":
                out.append(Check(name, False, f"is {phase or 'not bound'}, not Bound: its "
                                              f"StorageClass "
                                              f"{pvc['spec'].get('storageClassName') or '(default)'}"
                                              " cannot provision it (ReadWriteMany needs EFS, "
                                              "Filestore, CephFS or NFS)"))
                continue
            need = {"ReadWriteMany"} if use.written else {"ReadWriteMany", "ReadOnlyMany"}
            if not modes & need:
                out.append(Check(name, False, f"access modes {', '.join(sorted(modes))}: the "
                                              f"head, workers and preparation pods on several "
                                              f"nodes need {' or '.join(sorted(need))}"))
                continue
            if use.written and self.probe:
                out.append(self._write_probe(use))
                continue
            out.append(Check(name, True, f"Bound, {', '.join(sorted(modes))}"
                             + ("" if use.written else ", mounted read-only")))
        return out

    def secrets(self) -> list[Check]:
        out = []
        for (secret, key), field in secret_uses(self.jobs).items():
            name = f"secret {secret}"
            obj = self._get(self.core.read_namespaced_secret, secret)
            if obj is None:
                out.append(Check(name, False, f"no Secret {secret} in namespace "
                                              f"{self.namespace} ({field})"))
            elif key is not None and key not in (obj.get("data") or {}) | \
                    (obj.get("stringData") or {}):
                out.append(Check(name, False, f"has no key {key} ({field} reads it)"))
            else:
                out.append(Check(name, True, f"present ({field})"))
        return out

    def queues(self) -> list[Check]:
        out = []
        for queue in sorted({j.spec.cluster.kubernetes.queue for j in self.jobs} - {None}):
            found = any(self._get(self.custom.get_namespaced_custom_object, KUEUE_GROUP, version,
                                  self.namespace, "localqueues", queue, first=True) is not None
                        for version in KUEUE_VERSIONS)
            out.append(Check(f"queue {queue}", found, "LocalQueue present" if found else
                             f"no Kueue LocalQueue {queue} in namespace {self.namespace} "
                             "(cluster.kubernetes.queue): create it, or leave queue out"))
        return out

    def images(self) -> list[Check]:
        missing = sorted({j.metadata.name for j in self.jobs if not j.spec.cluster.image})
        if missing:
            return [Check("images", False, f"{', '.join(missing)}: cluster.image is not set, and "
                                           "no image is published under the default name; "
                                           "build and push yours (make images REGISTRY=...) "
                                           "and name it in cluster.image")]
        images = sorted({j.spec.cluster.image for j in self.jobs})
        return [Check("images", True, ", ".join(images) or "no stages given")]

    def run(self) -> list[Check]:
        checks: list[Callable[[], list[Check]]] = [self.kuberay, self.operator, self.claims,
                                                   self.secrets, self.queues, self.images]
        out = []
        for check in checks:
            try:
                out += check()
            except ClusterError as exc:
                out.append(Check(check.__name__, False, str(exc)))
        return out

    # -- plumbing
    def _call(self, what: str, fn: Callable[..., Any], *args: Any) -> Any:
        # Imported here: kubernetes (and its urllib3) is heavy; see __init__.
        from kubernetes.client import ApiException
        from urllib3.exceptions import HTTPError

        try:
            return fn(*args, _request_timeout=30)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise ClusterError(f"{what}: HTTP {exc.status} {exc.reason}") from None
        except HTTPError as exc:
            raise ClusterError(f"{what}: cannot reach the Kubernetes API: {exc}") from None

    def _get(self, fn: Callable[..., Any], *args: Any, first: bool = False) -> Any:
        """A namespaced read as a dict (None: 404); ``first``: the args name the namespace."""
        args = args if first else (args[0], self.namespace, *args[1:])
        found = self._call(f"{fn.__name__} {args[0]}", fn, *args)
        return None if found is None else self.api.sanitize_for_serialization(found)

    def _items(self, fn: Callable[..., Any], namespace: str) -> list[dict[str, Any]]:
        found = self._call(f"{fn.__name__}", lambda **kw: fn(namespace,
                                                              label_selector=OPERATOR_SELECTOR,
                                                              **kw))
        kind = "StatefulSet" if "stateful" in fn.__name__ else "Deployment"
        items = (self.api.sanitize_for_serialization(found) or {}).get("items") or [] \
            if found is not None else []
        want = dict(s.split("=") for s in OPERATOR_SELECTOR.split(","))
        return [{"kind": kind, **o} for o in items
                if all((o["metadata"].get("labels") or {}).get(k) == v for k, v in want.items())]

    def _write_probe(self, use: ClaimUse) -> Check:
        """A Pod as the stages' user (uid 1000, their fsGroup) that writes and removes a file on
        the claim: the only way to know NFS or Filestore permissions let the pods write."""
        name = f"claim {use.claim}"
        image = next((j.spec.cluster.image for j in self.jobs if j.spec.cluster.image), None)
        if image is None:
            return Check(name, False, "Bound, but writability not checked: no stage names its "
                                      "image (see images)")
        pod_name = f"prolong-doctor-{uuid.uuid4().hex[:8]}"
        probe = f"{use.mount}/.prolong-doctor-{pod_name}"
        pod = {"apiVersion": "v1", "kind": "Pod",
               "metadata": {"name": pod_name, "labels": dict(PROBE_LABELS)},
               "spec": {"restartPolicy": "Never",
                        "securityContext": dict(POD_SECURITY_CONTEXT),
                        "containers": [{"name": "probe", "image": image,
                                        "command": ["sh", "-c", f"touch {probe} && rm {probe}"],
                                        "resources": {"limits": {"cpu": "100m",
                                                                 "memory": "64Mi"}},
                                        "securityContext": {
                                            "allowPrivilegeEscalation": False,
                                            "capabilities": {"drop": ["ALL"]}},
                                        "volumeMounts": [{"name": "claim",
                                                          "mountPath": use.mount}]}],
                        "volumes": [{"name": "claim", "persistentVolumeClaim": {
                            "claimName": use.claim}}]}}
        self._call("create the write probe", self.core.create_namespaced_pod, self.namespace,
                   pod)
        try:
            deadline = time.monotonic() + self.probe_timeout
            wait = 0.1  # a probe of a ready claim ends in seconds: look often at first
            while True:
                obj = self._get(self.core.read_namespaced_pod, pod_name) or {}
                phase = (obj.get("status") or {}).get("phase")
                if phase == "Succeeded":
                    return Check(name, True, f"Bound, ReadWriteMany, writable by uid {RAY_UID} "
                                             f"at {use.mount}")
                if phase == "Failed":
                    return Check(name, False, f"not writable by uid {RAY_UID} (the pods' user): "
                                              f"the probe Pod failed to write {use.mount}; give "
                                              f"the share's root to gid {RAY_UID} (fsGroup "
                                              "does not apply to NFS)")
                if time.monotonic() > deadline:
                    state = phase or "no phase"
                    return Check(name, False, f"the write probe Pod {pod_name} did not finish "
                                              f"in {self.probe_timeout:.0f} s ({state}): "
                                              f"kubectl describe pod -n {self.namespace} "
                                              f"{pod_name}")
                time.sleep(wait)
                wait = min(self.poll, wait * 2)
        finally:
            self._call("delete the write probe", self.core.delete_namespaced_pod, pod_name,
                       self.namespace)


def run_checks(api: Any, namespace: str, jobs: list[Job], **options: Any) -> list[Check]:
    return Doctor(api, namespace, jobs, **options).run()
