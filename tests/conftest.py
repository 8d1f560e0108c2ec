"""Shared fixtures: the repository's job files as dicts, and a writer for mutated copies."""

from __future__ import annotations

import copy
import os
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
JOBS = REPO / "jobs"

# Tests never reach a model hub, and DeepSpeed runs on the CPU accelerator here.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("DS_ACCELERATOR", "cpu")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-xdist (make test: -n 2 --dist loadgroup) the tests that start Ray run on one
    worker, one after another: two local Ray instances at once would share Ray's default ports
    and session files. Everything else (single-process tests, and ranks over gloo, which take
    free ports) is spread over both workers, so at most two tests run at a time. Mark every test
    that starts Ray with ``ray``. Without xdist the group does nothing."""
    for item in items:
        if item.get_closest_marker("ray") is not None:
            item.add_marker(pytest.mark.xdist_group("ray"))


def job_dict(relpath: str) -> dict[str, Any]:
    """A job file under jobs/ as a fresh dict (safe to mutate)."""
    return copy.deepcopy(yaml.safe_load((JOBS / relpath).read_text()))


@pytest.fixture
def write_spec(tmp_path: Path) -> Callable[..., Path]:
    """write_spec(data, name="job.yaml") -> path of a YAML file holding ``data``."""

    def write(data: Any, name: str = "job.yaml") -> Path:
        path = tmp_path / name
        path.write_text(yaml.safe_dump(data, sort_keys=False) if not isinstance(data, str) else data)
        return path

    return write


@pytest.fixture(scope="session")
def quickstart_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One prepared-data directory for the tests that run the shortened quickstart
    (tests/test_quickstart.py shortened(..., data_dir=)): preparing the corpus, tokenizer and
    shards is most of such a test's time, and the same inputs give the same prepared data."""
    return tmp_path_factory.mktemp("quickstart-data")


def use_kmock_kubeconfig(kmock_url: str, tmp_path: Path, namespace: str, monkeypatch) -> Path:
    """Point every Kubernetes client of the process (the kubernetes package, kopf) at kmock
    through a real kubeconfig file: HTTP all the way, nothing monkeypatched but $KUBECONFIG."""
    kubeconfig = tmp_path / "kubeconfig"
    kubeconfig.write_text(yaml.safe_dump({
        "apiVersion": "v1", "kind": "Config", "current-context": "kmock",
        "clusters": [{"name": "kmock", "cluster": {"server": kmock_url.rstrip("/")}}],
        "contexts": [{"name": "kmock", "context": {"cluster": "kmock", "user": "kmock",
                                                    "namespace": namespace}}],
        "users": [{"name": "kmock", "user": {}}]}))
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return kubeconfig


KUBERAY_CRD_PATH = "/apis/apiextensions.k8s.io/v1/customresourcedefinitions/rayjobs.ray.io"


def serve_kuberay_crd(kmock: Any, tag: str | None = "v1.7.0", priority: float = 0) -> None:
    """Make kmock answer the GET of KubeRay's RayJob CRD with the CRD of ``tag``
    (tests/k8s/kuberay_crds), as an API server with that KubeRay installed does; None: 404, no
    KubeRay. A higher ``priority`` overrides an earlier answer (a test's own cluster)."""
    from tests.oracles.admission import crd

    route = (kmock ** priority)[f"get {KUBERAY_CRD_PATH}"]
    if tag is None:
        route << 404 << {"kind": "Status", "apiVersion": "v1", "status": "Failure",
                         "reason": "NotFound", "code": 404,
                         "message": 'customresourcedefinitions.apiextensions.k8s.io '
                                    '"rayjobs.ray.io" not found'}
    else:
        route << crd(tag)
def on_volume(job: dict[str, Any], root: Path, claim: str = "prolong-runs") -> dict[str, Any]:
    """``job`` (a job file's dict) with its storage on a claim mounted at ``root``, as a stage
    submitted to Kubernetes needs (prolong.k8s.mounts: a relative ./runs is in no pod's
    volume). ``root`` is also a directory of this machine, where the tests write markers."""
    job["spec"]["storage"] = {"root": str(root), "volumeClaim": claim}
    model = job["spec"].get("model") or {}
    source = model.get("source")
    if isinstance(source, str) and source.startswith("./"):
        # A model in this checkout (the quickstart's base) is on no pod's volume either: a copy
        # on the claim, as a user would put it there.
        copied = root / "models" / Path(source).parent.name
        if not copied.exists():
            shutil.copytree(REPO / source, copied)
        model["source"] = str(copied)
    return job


def quickstart_on_volume(dest: Path, root: Path) -> Path:
    """A copy of jobs/quickstart in ``dest`` whose stages keep their outputs on a claim mounted
    at ``root`` (:func:`on_volume`); returns ``dest``."""
    dest.mkdir(parents=True, exist_ok=True)
    for src in (JOBS / "quickstart").glob("*.yaml"):
        doc = yaml.safe_load(src.read_text())
        if doc.get("kind") != "ProLongPipeline":
            on_volume(doc, root)
        (dest / src.name).write_text(yaml.safe_dump(doc, sort_keys=False))
    return dest


CHART_REQUIRED: dict[str, Any] = {
    "operator": {"image": {"repository": "registry.example.com/ml/prolong-operator"}},
    "rayCluster": {"image": {"repository": "registry.example.com/ml/prolong-train"}},
    "storage": {"storageClassName": "efs-sc"},
}
"""What the chart makes every install name: its images (none is published under a default
name) and, for the claim it creates, a ReadWriteMany StorageClass."""


def chart_values(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` over :data:`CHART_REQUIRED` (a deep merge: ``values`` wins)."""
    def merge(base: Any, over: Any) -> Any:
        if not isinstance(base, dict) or not isinstance(over, dict):
            return copy.deepcopy(over)
        out = copy.deepcopy(base)
        for key, value in over.items():
            out[key] = merge(out.get(key), value) if key in out else copy.deepcopy(value)
        return out

    return merge(CHART_REQUIRED, values)
