"""Shared checks for the Kubernetes tests: KubeRay's CRD schemas (read from shared/, the source
the packaged copy is checked against), kubernetes-validate, and the strict reading of OpenAPI
schemas that ``prolongctl submit --dry-run`` uses offline (prolong.k8s.schemas: the API server
silently prunes unknown fields; here they fail)."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from prolong.k8s.schemas import CUSTOM_GROUPS, KUBE_VERSION, pod_templates, strict_openapi
from tests.oracles.admission import assert_runs

REPO = Path(__file__).resolve().parents[2]
# The KubeRay CRDs live in shared/, beside the checkout (CI, developers) or inside it.
_CANDIDATES = [REPO.parent / "shared" / "schemas" / "kuberay", REPO / "shared" / "schemas" / "kuberay"]
KUBERAY_SCHEMAS = next((p for p in _CANDIDATES if p.is_dir()), _CANDIDATES[0])
_YAML_LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


def crd_validator(crd: dict[str, Any], version: str) -> jsonschema.Validator:
    (ver,) = [v for v in crd["spec"]["versions"] if v["name"] == version]
    schema = strict_openapi(ver["schema"]["openAPIV3Schema"])
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return cls(schema)


def errors_of(validator: jsonschema.Validator, obj: dict[str, Any]) -> list[str]:
    return [f"{'.'.join(map(str, e.absolute_path))}: {e.message}"
            for e in validator.iter_errors(obj)]


@pytest.fixture(scope="session")
def kuberay() -> dict[str, jsonschema.Validator]:
    """Validators for RayJob and RayCluster (KubeRay CRDs, version v1)."""
    out = {}
    for kind, file in (("RayJob", "ray.io_rayjobs.yaml"), ("RayCluster", "ray.io_rayclusters.yaml")):
        # 1-1.4 MB each: libyaml's loader takes 0.5 s where the pure-Python one takes 7 s.
        crd = yaml.load((KUBERAY_SCHEMAS / file).read_text(), Loader=_YAML_LOADER)
        out[kind] = crd_validator(crd, "v1")
    return out


@pytest.fixture(scope="session")
def validate_object(kuberay) -> Callable[[dict[str, Any]], None]:
    """Validate one rendered object: built-in kinds with kubernetes-validate (strict), KubeRay
    kinds with KubeRay's CRD schema plus their pod templates as Pods, and a RayJob with what
    KubeRay 1.6 and 1.7 and Kueue make of it (tests.oracles.admission.assert_runs)."""

    def check(obj: dict[str, Any]) -> None:
        kind = obj["kind"]
        where = f"{kind}/{obj['metadata'].get('name')}"
        if kind in kuberay:
            errs = errors_of(kuberay[kind], obj)
            assert not errs, f"{where} fails KubeRay's schema: {errs[:5]}"
            if kind == "RayJob":  # every KubeRay we claim, Kueue, our preflight
                assert_runs(obj)
            for pod in pod_templates(obj):
                kube_validate(pod, where)
        elif not obj["apiVersion"].startswith(CUSTOM_GROUPS):
            kube_validate(obj, where)

    return check


def kube_validate(obj: dict[str, Any], where: str) -> None:
    try:
        kubernetes_validate.validate(obj, KUBE_VERSION, strict=True)
    except kubernetes_validate.ValidationError as exc:
        path = ".".join(map(str, exc.path))
        raise AssertionError(f"{where}: {path}: {exc.message}") from None


@pytest.fixture(scope="session")
def k8s() -> SimpleNamespace:
    """The helpers above, for test modules (conftest cannot be imported under importlib mode)."""
    return SimpleNamespace(crd_validator=crd_validator, errors_of=errors_of,
                           kube_validate=kube_validate, strict_openapi=strict_openapi,
                           pod_templates=pod_templates)


def shipped_stage_renders() -> list[tuple[str, Any, dict, dict, dict]]:
    """Every stage of every shipped pipeline as ``submit`` renders it: (pipeline/stage, job,
    ConfigMap, RayJob, preparation Job)."""
    from prolong.k8s.rayjob import render_preparation, render_stage
    from prolong.specfile import load
    from prolong.stage.identity import pipeline_stages
    from tests.conftest import JOBS

    out = []
    for path in sorted(JOBS.glob("*/pipeline.yaml")):
        loaded = load(path)
        refs = {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}
        for stage, job in loaded.jobs.items():
            cm, rj = render_stage(loaded.document, loaded.jobs, stage, namespace="ml")
            out.append((f"{path.parent.name}/{stage}", job, cm, rj,
                        render_preparation(job, refs[stage], namespace="ml")))
    return out
