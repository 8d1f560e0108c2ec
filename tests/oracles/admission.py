"""What a real cluster makes of a RayJob create, for every KubeRay version we claim: the API
server's strict schema check against that version's CRD (tests/k8s/kuberay_crds), our own
preflight (prolong.k8s.kuberay_version), Kueue's webhooks (:mod:`tests.oracles.kueue`) and
KubeRay's controller validation (:mod:`tests.oracles.kuberay`) on what Kueue let through.

Every RayJob the tests render goes through :func:`rayjob_errors`: the render tests through the
``validate_object`` fixture (tests/k8s/conftest.py), the operator's and ``submit``'s creates
through the kmock API server (tests/operator/apiserver.py), which refuses what a cluster
would refuse."""

from __future__ import annotations

import functools
import gzip
import json
from pathlib import Path
from typing import Any

import jsonschema

from prolong.k8s.kuberay_version import crd_schema, missing_fields
from prolong.k8s.schemas import schema_errors, validator
from tests.oracles import kuberay, kueue

CRDS = Path(__file__).resolve().parents[1] / "k8s" / "kuberay_crds"
ALL_TAGS = ("v1.4.2", "v1.5.1", "v1.6.0", "v1.7.0")
CLAIMED = tuple(kuberay.TAGS)  # ("1.6", "1.7")


@functools.cache
def crd(tag: str) -> dict[str, Any]:
    """KubeRay's RayJob CRD at ``tag`` (a fresh copy is the caller's to keep: do not mutate)."""
    with gzip.open(CRDS / f"ray.io_rayjobs-{tag}.json.gz", "rt", encoding="utf-8") as f:
        return json.load(f)


@functools.cache
def schema_validator(tag: str) -> jsonschema.Validator:
    """The strict (unknown fields fail) validator of the CRD's v1 schema at ``tag``."""
    return validator(crd_schema(crd(tag)))


NO_KUEUE_DEFAULTS = kueue.Namespace()
"""A namespace without Kueue's default LocalQueue, Kueue not managing unlabelled jobs."""


def warm_oracles() -> None:
    """Build the cached validators now (half a second the first time, milliseconds after)."""
    for version in CLAIMED:
        schema_validator(kuberay.TAGS[version])


def rayjob_errors(rayjob: dict[str, Any],
                  namespace: kueue.Namespace = NO_KUEUE_DEFAULTS) -> list[str]:
    """Everything a cluster with KubeRay 1.6 or 1.7 (and Kueue set up as ``namespace`` says)
    refuses or fails in this RayJob, each prefixed with the version; [] = it runs."""
    errors: list[str] = []
    for version in CLAIMED:
        tag = kuberay.TAGS[version]
        errors += [f"KubeRay {version} CRD schema: {e}"
                   for e in schema_errors(schema_validator(tag), rayjob)]
        errors += [f"KubeRay {version} preflight: {m} undeclared"
                   for m in missing_fields(crd(tag), rayjob)]
        stored, refused = kueue.admit(rayjob, namespace)
        errors += [f"Kueue webhook: {e}" for e in refused]
        errors += [f"KubeRay {version} ValidateRayJobSpec: {e}"
                   for e in kuberay.validate(stored, version)]
    return list(dict.fromkeys(errors))


def assert_runs(rayjob: dict[str, Any], namespace: kueue.Namespace = NO_KUEUE_DEFAULTS) -> None:
    errors = rayjob_errors(rayjob, namespace)
    assert not errors, f"RayJob {rayjob['metadata'].get('name')}: " + "; ".join(errors[:5])
