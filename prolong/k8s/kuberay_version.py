"""Does this cluster's KubeRay know every RayJob field we render? Read from its CRD.

An API server prunes the fields a CRD's schema does not declare, silently when a create sends
no ``fieldValidation``: on KubeRay 1.3/1.4 ``deletionStrategy.deletionRules`` vanishes (no rule
left, ``shutdownAfterJobFinishes`` false: the GPUs are never released), on 1.5
``preRunningDeadlineSeconds`` and ``authOptions.secretName`` do. So before anything is created,
``submit`` and the operator read ``customresourcedefinitions/rayjobs.ray.io`` and refuse, in one
line, when a field of the RayJob about to be created is missing from its ``v1`` schema
(:func:`missing_fields`). Creates also send ``fieldValidation=Strict``
(:data:`STRICT_FIELDS`), so a field pruned for another reason is an error, not a loss.

The schema is the version's truth, not KubeRay's release number: no label or annotation of the
CRD carries the release (controller-gen writes only its own version). A feature gate is not in
the schema either: 1.5's CRD declares ``deletionRules`` but 1.5 refuses them unless
``RayJobDeletionPolicy`` is on; 1.5 fails this check on the fields 1.6 added. Test fixtures: the
CRDs of v1.4.2, v1.5.1, v1.6.0 and v1.7.0 (tests/k8s/kuberay_crds/SOURCE.md).

Pure functions plus :func:`read_rayjob_crd` (one GET); ``prolongctl doctor`` calls
:func:`missing_fields` with no render to check :data:`REQUIRED_FIELDS`.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

CRD_NAME = "rayjobs.ray.io"
CRD_PATH = f"/apis/apiextensions.k8s.io/v1/customresourcedefinitions/{CRD_NAME}"
MINIMUM_KUBERAY = "1.6"
"""The oldest KubeRay whose RayJob CRD declares every field we render (and whose
RayJobDeletionPolicy feature gate is on by default)."""
STRICT_FIELDS = "Strict"
"""``fieldValidation`` of every create: the API server answers 400 BadRequest naming a field its
schema lacks instead of dropping it."""

REQUIRED_FIELDS: tuple[str, ...] = (
    "spec.deletionStrategy.deletionRules",            # KubeRay 1.5 (1.3/1.4: deletionPolicy)
    "spec.preRunningDeadlineSeconds",                 # KubeRay 1.6
    "spec.rayClusterSpec.authOptions.mode",           # KubeRay 1.5
    "spec.rayClusterSpec.authOptions.secretName",     # KubeRay 1.6
    "spec.submissionMode",
    "spec.shutdownAfterJobFinishes",
    "spec.ttlSecondsAfterFinished",
    "spec.activeDeadlineSeconds",
    "spec.backoffLimit",
)
"""Fields some render of ours uses, for a check with no render at hand (``prolongctl doctor``).
Dotted paths; ``[]`` steps into a list's items."""


class KubeRayMismatch(ValueError):
    """The cluster's RayJob CRD lacks a field we render, or there is no such CRD."""


def crd_schema(crd: dict[str, Any], version: str = "v1") -> dict[str, Any]:
    """The openAPIV3Schema of ``version`` in a CRD; KubeRayMismatch when it serves none."""
    for ver in (crd.get("spec") or {}).get("versions") or []:
        if ver.get("name") == version:
            return ((ver.get("schema") or {}).get("openAPIV3Schema")) or {}
    raise KubeRayMismatch(f"CRD {CRD_NAME} serves no version {version}: prolong needs KubeRay "
                          f">= {MINIMUM_KUBERAY}")


def field_paths(obj: Any, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every leaf path of a rendered object's ``spec``, as steps (``[]`` for a list's items;
    a map's keys may hold dots, so paths are not split on them)."""
    if isinstance(obj, dict):
        if not obj and prefix:
            yield prefix
        for key, value in obj.items():
            if not prefix and key != "spec":
                continue  # apiVersion, kind, metadata: the API server's, never pruned
            yield from field_paths(value, (*prefix, key))
    elif isinstance(obj, list):
        for item in obj:
            yield from field_paths(item, (*prefix, "[]"))
        if not obj:
            yield prefix
    else:
        yield prefix


def _declared(schema: dict[str, Any], steps: list[str]) -> int | None:
    """How many of ``steps`` the schema declares before the first it lacks (None: all)."""
    node = schema
    for i, step in enumerate(steps):
        if node.get("x-kubernetes-preserve-unknown-fields"):
            return None  # the rest is kept as sent
        if step == "[]":
            if "items" not in node:
                return i
            node = node["items"]
            continue
        props = node.get("properties") or {}
        if step in props:
            node = props[step]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]  # a map: any key
        elif node.get("additionalProperties") is True:
            return None
        else:
            return i
    return None


def _steps(path: str | tuple[str, ...]) -> list[str]:
    if isinstance(path, tuple):
        return list(path)
    return [s for part in path.split(".") for s in part.replace("[]", ".[]").split(".") if s]


def _dotted(steps: list[str]) -> str:
    return ".".join(steps).replace(".[]", "[]")


def missing_fields(crd: dict[str, Any],
                   rendered: dict[str, Any] | Iterable[str | tuple[str, ...]] | None = None,
                   *, version: str = "v1") -> list[str]:
    """The fields of ``rendered`` (a RayJob dict, or dotted paths; default
    :data:`REQUIRED_FIELDS`) that the CRD's ``version`` schema does not declare, each cut at its
    first undeclared step, sorted, without repeats. [] when KubeRay knows them all."""
    schema = crd_schema(crd, version)
    if rendered is None:
        paths: Iterable[str | tuple[str, ...]] = REQUIRED_FIELDS
    elif isinstance(rendered, dict):
        paths = field_paths(rendered)
    else:
        paths = rendered
    missing = set()
    for path in paths:
        steps = _steps(path)
        cut = _declared(schema, steps)
        if cut is not None:
            missing.add(_dotted(steps[:cut + 1]))
    return sorted(missing)


def refusal(missing: list[str], where: str = "this cluster") -> str:
    """The one-line reason nothing is created."""
    shown = ", ".join(missing[:3]) + (f" (+{len(missing) - 3} more)" if len(missing) > 3 else "")
    return (f"KubeRay's RayJob CRD ({CRD_NAME}) on {where} lacks {shown}, which the rendered "
            f"RayJob sets: prolong needs KubeRay >= {MINIMUM_KUBERAY}; upgrade the "
            "kuberay-operator chart (CRDs included) and submit again")


def check_crd(crd: dict[str, Any] | None, rendered: dict[str, Any] | None = None,
              where: str = "this cluster") -> None:
    """Raise KubeRayMismatch with :func:`refusal`'s line when the CRD lacks a field of
    ``rendered`` (default :data:`REQUIRED_FIELDS`), or there is no CRD (``crd`` None)."""
    if crd is None:
        raise KubeRayMismatch(f"{where} has no CRD {CRD_NAME}: install KubeRay >= "
                              f"{MINIMUM_KUBERAY} (the kuberay-operator chart) first")
    missing = missing_fields(crd, rendered)
    if missing:
        raise KubeRayMismatch(refusal(missing, where))


def read_rayjob_crd(api: Any, _request_timeout: float = 30) -> dict[str, Any] | None:
    """The ``rayjobs.ray.io`` CRD as a dict through a kubernetes ApiClient (raw JSON: the typed
    model of a 1.4 MB schema is slow to build); None when there is none (404). Other HTTP errors
    raise kubernetes' ApiException, as every call of the client does."""
    # Imported here: kubernetes is heavy and `prolongctl validate` must not load it.
    from kubernetes.client import ApiException

    req = api.param_serialize("GET", CRD_PATH, header_params={"Accept": "application/json"},
                              auth_settings=["BearerToken"])
    resp = api.call_api(*req, _request_timeout=_request_timeout)
    resp.read()
    if resp.status == 404:
        return None
    if resp.status >= 300:
        raise ApiException(http_resp=resp)
    return json.loads(resp.data)


class CrdCache:
    """The RayJob CRD per API server, read at most every ``ttl`` seconds (450 kB of JSON: not
    once per create; a KubeRay upgrade is seen within ``ttl``). One per process
    (:data:`CRD_CACHE`), shared by whatever in it creates RayJobs. ``read`` is what reads
    (with the caller's retries); an exception of a ``keep`` type it raises (an answer, such as
    "forbidden") is kept and raised again until ``ttl``, any other is not kept."""

    def __init__(self, ttl: float = 300.0) -> None:
        self.ttl = ttl
        self._seen: dict[str, tuple[float, Any]] = {}
        self._lock = threading.Lock()

    def get(self, host: str, read: Callable[[], dict[str, Any] | None],
            keep: tuple[type[Exception], ...] = ()) -> dict[str, Any] | None:
        with self._lock:
            seen = self._seen.get(host)
            if seen is None or time.monotonic() - seen[0] > self.ttl:
                try:
                    found: Any = read()
                except keep as exc:  # an answer: the same until ttl
                    found = exc
                seen = self._seen[host] = (time.monotonic(), found)
        if isinstance(seen[1], Exception):
            raise seen[1]
        return seen[1]


CRD_CACHE = CrdCache()


__all__ = [
    "CRD_NAME",
    "CRD_PATH",
    "MINIMUM_KUBERAY",
    "REQUIRED_FIELDS",
    "STRICT_FIELDS",
    "KubeRayMismatch",
    "check_crd",
    "crd_schema",
    "field_paths",
    "missing_fields",
    "read_rayjob_crd",
    "refusal",
]
