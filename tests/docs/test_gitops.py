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


# --- the Argo CD health check, run by a real Lua interpreter on real status objects ----------

def argocd_health(obj: dict) -> tuple[str, str]:
    """(status, message) of docs/gitops/argocd-cm-health.yaml's check for ``obj``, as Argo CD
    runs it (Lua; ``obj`` is the resource as a table)."""
    from lupa import LuaRuntime

    script = objects()["ConfigMap/argocd-cm"]["data"][
        "resource.customizations.health.prolong.dev_ProLongPipeline"]
    lua = LuaRuntime(unpack_returned_tuples=True)
    run = lua.eval(f"function(obj)\n{script}\nend")
    hs = run(lua.table_from(obj, recursive=True))
    return hs["status"], hs["message"]


def _pipeline_with(status) -> dict:
    return {"apiVersion": "prolong.dev/v1alpha1", "kind": "ProLongPipeline",
            "metadata": {"name": "prolong-8b", "generation": 1},
            "status": status.model_dump(mode="json", by_alias=True, exclude_none=True)}


def test_argocd_health_on_the_operators_statuses():
    from datetime import datetime, timezone

    from prolong.reconcile.observe import ObservedRayJob
    from prolong.reconcile.planner import invalid_spec_status, plan_pipeline
    from prolong.specfile import load
    from prolong.stage.identity import pipeline_stages

    now = datetime(2026, 11, 1, tzinfo=timezone.utc)
    loaded = load(REPO / "jobs" / "prolong-8b" / "pipeline.yaml")
    refs = pipeline_stages(loaded.document, loaded.jobs)

    def rayjob(ref, deployment, job, attempt=1):
        return ObservedRayJob(name=f"{ref.stage}-{attempt}", stage=ref.stage, stage_id=ref.id,
                              attempt=attempt, deployment_status=deployment, job_status=job,
                              message="NCCL timeout", end_time=now)

    def health(rayjobs, **kw):
        plan = plan_pipeline(loaded.document, loaded.jobs, rayjobs, now=now, generation=1, **kw)
        return argocd_health(_pipeline_with(plan.status))

    assert health([]) [0] == "Progressing"
    assert health([rayjob(refs[0], "Running", "RUNNING")]) == ("Progressing",
                                                              "stage stage1 Running: NCCL timeout")
    status, message = health([rayjob(refs[0], "Complete", "FAILED")])
    assert status == "Progressing" and "RetryBackoff" in message  # waits for its retry
    failed = [rayjob(refs[0], "Complete", "FAILED", a) for a in (1, 2, 3)]
    status, message = health(failed)
    assert status == "Degraded" and "failed after 3 attempts" in message
    done = [rayjob(r, "Complete", "SUCCEEDED") for r in refs]
    assert health(done) == ("Healthy", "all stages succeeded")

    invalid = invalid_spec_status(None, "pipeline.yaml: spec.stages[3].spec.samples: must be "
                                        ">= 1", now=now, generation=1)
    status, message = argocd_health(_pipeline_with(invalid))
    assert status == "Degraded" and "spec.stages[3].spec.samples" in message

    # A spec edit the operator has not reconciled yet is Progressing, not the old verdict.
    stale = _pipeline_with(plan_pipeline(loaded.document, loaded.jobs, done, now=now,
                                         generation=1).status)
    stale["metadata"]["generation"] = 2
    assert argocd_health(stale)[0] == "Progressing"
    assert argocd_health({"metadata": {"name": "x"}})[0] == "Progressing"  # no status yet
