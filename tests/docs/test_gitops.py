"""docs/gitops/: the example manifests parse, core kinds are valid Kubernetes 1.30 objects, and
the Argo CD / Flux objects say what docs/gitops.md promises (CRDs never pruned, applied first;
the chart without its CRDs; pipelines pruned but not waited for)."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
MANIFESTS = sorted((DOCS / "gitops").glob("*.yaml"))
KINDS = {"argoproj.io/v1alpha1": {"Application"},
         "source.toolkit.fluxcd.io/v1": {"GitRepository"},
         "kustomize.toolkit.fluxcd.io/v1": {"Kustomization"},
         "helm.toolkit.fluxcd.io/v2": {"HelmRelease"}}


def objects() -> dict[str, dict]:
    out = {}
    for path in MANIFESTS:
        for obj in yaml.safe_load_all(path.read_text()):
            if obj:
                out[f"{obj['kind']}/{obj['metadata']['name']}"] = obj
    return out


def test_there_are_argo_and_flux_examples():
    names = {p.name for p in MANIFESTS}
    assert {"argocd-crds.yaml", "argocd-pipelines.yaml", "flux-crds.yaml",
            "flux-pipelines.yaml"} <= names
    guide = (DOCS / "gitops.md").read_text()
    for path in MANIFESTS:  # every example is linked from the guide
        assert f"(gitops/{path.name})" in guide, path.name


@pytest.mark.parametrize("path", MANIFESTS, ids=lambda p: p.name)
def test_manifest_parses_and_validates(path: Path):
    docs = [d for d in yaml.safe_load_all(path.read_text()) if d]
    assert docs
    for obj in docs:
        assert obj["metadata"]["name"]
        group = obj["apiVersion"].rpartition("/")[0]
        if "." in group:  # Argo CD / Flux kinds: no schema here, check what they are
            assert obj["kind"] in KINDS.get(obj["apiVersion"], set()), obj["apiVersion"]
            assert isinstance(obj.get("spec"), dict)
        else:
            kubernetes_validate.validate(obj, "1.30", strict=True)


def test_argocd_applications():
    objs = objects()
    crds, operator, pipelines = (objs[f"Application/prolong-{n}"]
                                 for n in ("crds", "operator", "pipelines"))
    assert crds["spec"]["source"]["path"] == "charts/crds"
    assert (REPO / "charts" / "crds").is_dir()
    assert crds["spec"]["syncPolicy"]["automated"]["prune"] is False
    assert operator["spec"]["source"]["helm"]["skipCrds"] is True
    assert pipelines["spec"]["syncPolicy"]["automated"] == {"prune": True, "selfHeal": True}
    assert "ServerSideApply=true" in pipelines["spec"]["syncPolicy"]["syncOptions"]
    waves = [int(a["metadata"]["annotations"]["argocd.argoproj.io/sync-wave"])
             for a in (crds, operator, pipelines)]
    assert waves == sorted(waves) and waves[0] < waves[2]
    # Label tracking would claim the operator's objects (app.kubernetes.io/instance=<pipeline>)
    # if an Application were named after a pipeline.
    assert pipelines["metadata"]["name"] not in ("quickstart", "prolong-8b")
    health = objs["ConfigMap/argocd-cm"]["data"]
    assert "resource.customizations.health.prolong.dev_ProLongPipeline" in health


def test_flux_units():
    objs = objects()
    crds = objs["Kustomization/prolong-crds"]
    pipelines = objs["Kustomization/prolong-pipelines"]
    release = objs["HelmRelease/prolong"]
    assert crds["spec"]["prune"] is False and crds["spec"]["path"] == "./charts/crds"
    assert pipelines["spec"]["prune"] is True and pipelines["spec"].get("wait") is not True
    assert "healthChecks" not in pipelines["spec"]
    assert {"name": "prolong-crds"} in pipelines["spec"]["dependsOn"]
    assert release["spec"]["install"]["crds"] == release["spec"]["upgrade"]["crds"] == "Skip"
    source = objs["GitRepository/ml-platform"]
    for unit in (crds, pipelines):
        assert unit["spec"]["sourceRef"] == {"kind": "GitRepository",
                                             "name": source["metadata"]["name"]}
