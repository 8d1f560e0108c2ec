"""Client-side checks of rendered objects, for a dry run with no API server to ask.

* KubeRay kinds against KubeRay's own RayJob CRD schema (v1), shipped with the package as
  ``schemas/rayjob-v1.json.gz``: ``spec.versions[v1].schema.openAPIV3Schema`` of
  ``ray.io_rayjobs.yaml``, KubeRay v1.7 (``python -m prolong.k8s.schemas CRD_FILE`` regenerates
  it; a test keeps it equal to the CRD in shared/schemas/kuberay);
* the ProLongPipeline against the CRD generated from our models (:mod:`prolong.k8s.crd`);
* built-in kinds, and the pod templates of Ray kinds as Pods, with kubernetes-validate's strict
  Kubernetes schemas when it is installed (``pip install 'prolong[validate]'``: 100 MB of
  schemas, so not a dependency of the images).

Schemas are read strictly (:func:`strict_openapi`): the API server prunes unknown fields
silently, so a misspelt field would vanish there; here it is an error. CEL rules
(``x-kubernetes-validations``) are not evaluated: they run in the API server only.
"""

from __future__ import annotations

import copy
import functools
import gzip
import json
import sys
from importlib.util import find_spec
from pathlib import Path
from typing import Any

import jsonschema
import yaml

from prolong.k8s.crd import open_api_schema

KUBERAY_RAYJOB_SCHEMA = Path(__file__).with_name("schemas") / "rayjob-v1.json.gz"
KUBE_VERSION = "1.30"
"""The Kubernetes release whose schemas built-in kinds are checked against."""
CUSTOM_GROUPS = ("ray.io/", "monitoring.coreos.com/", "prolong.dev/", "kopf.dev/")
"""API groups of custom resources: kubernetes-validate has no schema for them."""


def strict_openapi(schema: dict[str, Any]) -> dict[str, Any]:
    """An OpenAPI v3 (CRD) schema as plain JSON Schema that rejects unknown fields and honours
    ``nullable``."""
    node = copy.deepcopy(schema)

    def walk(n: Any) -> None:
        if isinstance(n, list):
            for item in n:
                walk(item)
            return
        if not isinstance(n, dict):
            return
        if n.pop("nullable", False) and "type" in n:
            n["type"] = [n["type"], "null"]
            if "enum" in n:
                n["enum"] = [*n["enum"], None]
        if ("properties" in n and "additionalProperties" not in n
                and not n.get("x-kubernetes-preserve-unknown-fields")):
            n["additionalProperties"] = False
        for key, value in n.items():
            if key == "properties":
                for sub in value.values():
                    walk(sub)
            elif key not in ("enum", "default", "required", "example"):
                walk(value)

    walk(node)
    # The root's apiVersion, kind and metadata are the API server's (a CRD need not declare
    # them); metadata is ObjectMeta, validated by the API server itself, never pruned.
    if "properties" in node:
        props = node["properties"]
        for key in ("apiVersion", "kind"):
            props.setdefault(key, {"type": "string"})
        props.setdefault("metadata", {"type": "object"}).pop("additionalProperties", None)
    return node


def validator(schema: dict[str, Any]) -> jsonschema.Validator:
    """A strict validator for a CRD's openAPIV3Schema."""
    strict = strict_openapi(schema)
    cls = jsonschema.validators.validator_for(strict, default=jsonschema.Draft7Validator)
    return cls(strict)


def crd_version_schema(crd: dict[str, Any], version: str) -> dict[str, Any]:
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    return ver["schema"]["openAPIV3Schema"]


@functools.lru_cache(maxsize=1)
def rayjob_validator() -> jsonschema.Validator:
    with gzip.open(KUBERAY_RAYJOB_SCHEMA, "rt", encoding="utf-8") as f:
        return validator(json.load(f))


@functools.lru_cache(maxsize=1)
def pipeline_validator() -> jsonschema.Validator:
    return validator(open_api_schema())


def schema_errors(check: jsonschema.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in check.iter_errors(obj)]


def pod_templates(obj: dict[str, Any]) -> list[dict[str, Any]]:
    """Every pod template of a RayJob (its submitter's included) or RayCluster, as a Pod."""
    spec = obj["spec"].get("rayClusterSpec", obj["spec"])
    templates = [g["template"] for g in (spec["headGroupSpec"], *spec.get("workerGroupSpecs", []))]
    if "submitterPodTemplate" in obj["spec"]:
        templates.append(obj["spec"]["submitterPodTemplate"])
    return [{"apiVersion": "v1", "kind": "Pod",
             "metadata": {"name": "template", **t.get("metadata", {})},
             "spec": t["spec"]} for t in templates]


def kubernetes_validate_installed() -> bool:
    return find_spec("kubernetes_validate") is not None


def kubernetes_errors(obj: dict[str, Any]) -> list[str]:
    """Errors of a built-in object under Kubernetes' strict schemas ([] when kubernetes-validate
    is not installed: :func:`kubernetes_validate_installed` says whether it was checked)."""
    if not kubernetes_validate_installed():
        return []
    # Imported here: 100 MB of schemas, an optional extra (module docstring).
    import kubernetes_validate

    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        return [f"{'.'.join(map(str, exc.path))}: {exc.message}"]
    return []


def object_errors(obj: dict[str, Any]) -> list[str]:
    """Every error found in one rendered object, each prefixed with ``Kind/name``."""
    kind = obj["kind"]
    where = f"{kind}/{obj['metadata'].get('name')}"
    errors: list[str] = []
    if kind == "RayJob":
        errors += schema_errors(rayjob_validator(), obj)
        for pod in pod_templates(obj):
            errors += kubernetes_errors(pod)
    elif kind == "ProLongPipeline":
        errors += schema_errors(pipeline_validator(), obj)
    elif not obj["apiVersion"].startswith(CUSTOM_GROUPS):
        errors += kubernetes_errors(obj)
    return [f"{where}: {e}" for e in errors]


class InvalidObjects(ValueError):
    """A rendered object fails its schema (exit code 2: nothing is created)."""


def check_client_side(objects: list[dict[str, Any]]) -> str:
    """Check rendered objects here; raise InvalidObjects with the first error (and the count),
    else say what was checked."""
    errors = [e for obj in objects for e in object_errors(obj)]
    if errors:
        more = f" (+{len(errors) - 1} more)" if len(errors) > 1 else ""
        raise InvalidObjects(f"{errors[0]}{more}")
    checked = ["KubeRay's RayJob CRD schema" if any(o["kind"] == "RayJob" for o in objects)
               else "the ProLongPipeline CRD schema"]
    if kubernetes_validate_installed():
        checked.append(f"Kubernetes {KUBE_VERSION} schemas (kubernetes-validate)")
    else:
        checked.append("not Kubernetes' own schemas (pip install 'prolong[validate]')")
    return "checked against " + " and ".join(checked)


def extract_rayjob_schema(crd_file: Path, out: Path = KUBERAY_RAYJOB_SCHEMA) -> None:
    """Write the v1 schema of KubeRay's RayJob CRD (``ray.io_rayjobs.yaml``) to ``out``."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # 1.4 MB: libyaml when present
    schema = crd_version_schema(yaml.load(crd_file.read_text(), Loader=loader), "v1")
    data = json.dumps(schema, sort_keys=True, separators=(",", ":")).encode()
    out.write_bytes(gzip.compress(data, mtime=0))  # mtime 0: the same CRD, the same bytes


if __name__ == "__main__":
    extract_rayjob_schema(Path(sys.argv[1]))
