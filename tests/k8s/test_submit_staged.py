"""``prolongctl submit`` refuses a stage whose model or tokenizer stagedPath holds no finished
staging (exit 2, nothing created), before the cluster is asked anything, when the submitting
machine can see that path; a path it cannot see (the pods' volume, from a laptop) gets one
warning line and the submission goes on. Over HTTP against kmock, as the other submit tests."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prolong.model.staging import Staging, stage
from prolong.specfile import load
from tests.conftest import job_dict, on_volume
from tests.k8s import test_submit
from tests.k8s.test_submit import Api, cli
from tests.operator.conftest import CONFIGMAPS, PIPELINES, RAYJOBS

pytestmark = [pytest.mark.timeout(60), pytest.mark.asyncio]
api = test_submit.api


def job_file(tmp_path: Path, *, model: dict | None = None, tokenizer: dict | None = None,
             storage: dict | None = None) -> Path:
    """The quickstart's stage 1 with a staged model source, on its own (no pipeline beside)."""
    job = on_volume(job_dict("quickstart/stage1.yaml"), tmp_path / "runs")
    # The sources and staging targets of these tests live in tmp_path: a writable claim there.
    job["spec"]["cluster"]["kubernetes"] = {"volumes": [
        {"claim": "inputs", "mountPath": str(tmp_path), "readOnly": False}]}
    job["spec"]["model"].update(model or {})
    if tokenizer is None and model and "source" in model:
        tokenizer = {"source": model["source"]}  # not trained: the model is pretrained
    if tokenizer is not None:
        job["spec"]["data"]["tokenizer"] = tokenizer
    if storage is not None:
        job["spec"]["storage"] = storage
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


@pytest.fixture
def source(tmp_path: Path) -> Path:
    """A local "model" directory to stage (staging copies whatever files it holds)."""
    src = tmp_path / "source"
    src.mkdir()
    (src / "config.json").write_text("{}")
    return src


async def test_an_unstaged_model_is_refused_before_anything_is_created(
        api: Api, tmp_path: Path, source: Path) -> None:
    target = tmp_path / "models" / "m"
    target.parent.mkdir()
    spec = job_file(tmp_path, model={"source": str(source), "stagedPath": str(target)})
    result = await cli("submit", str(spec))
    assert result.exit_code == 2, result.output
    assert result.stderr.strip() == (
        f"{spec}: stage pretrain: spec.model.stagedPath: {target} is not staged (no STAGED.json "
        f"marker); nothing created. Run `prolongctl model stage {spec}` first (the workers load "
        "only staged copies)")
    assert api.creates(RAYJOBS) == 0 and api.creates(CONFIGMAPS) == 0

    # Staged (the product's own staging), the same submission goes through.
    doc = load(spec).document
    stage(Staging("model", "model.source", str(source), doc.spec.model.staged_path, False))
    result = await cli("submit", str(spec))
    assert result.exit_code == 0, result.output
    assert api.creates(RAYJOBS) == 1 and "warning" not in result.stderr


async def test_an_unstaged_tokenizer_is_refused_too(api: Api, tmp_path: Path,
                                                    source: Path) -> None:
    target = tmp_path / "tok"
    spec = job_file(tmp_path, tokenizer={"source": str(source), "stagedPath": str(target)})
    result = await cli("submit", str(spec))
    assert result.exit_code == 2, result.output
    assert f"spec.data.tokenizer.stagedPath: {target} is not staged" in result.stderr
    assert api.creates(RAYJOBS) == 0


async def test_an_object_store_path_is_read_from_here(api: Api, tmp_path: Path,
                                                      source: Path) -> None:
    uri = f"file://{tmp_path}/bucket/m"
    spec = job_file(tmp_path, model={"source": str(source), "stagedPath": uri})
    result = await cli("submit", str(spec))
    assert result.exit_code == 2 and f"{uri} is not staged" in result.stderr, result.output


async def test_a_path_on_the_pods_volume_is_a_warning_from_a_laptop(
        api: Api, tmp_path: Path, source: Path) -> None:
    root = tmp_path / "not-mounted-here"  # the PVC's mount point: absent on this machine
    target = f"{root}/models/m"
    spec = job_file(tmp_path, model={"source": str(source), "stagedPath": target},
                    storage={"root": str(root), "volumeClaim": "prolong-runs"})
    result = await cli("submit", str(spec))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert warnings == [
        f"warning: {spec}: stage pretrain: spec.model.stagedPath: {target}: cannot check it from "
        f"this machine (on volume prolong-runs at {root}, not mounted here); submitting anyway "
        "(its workers refuse to start if it is not staged)"]
    assert api.creates(RAYJOBS) == 1

    # Where the volume is mounted (submit run in a pod), the same path is checked: refused.
    root.mkdir()
    result = await cli("submit", str(job_file(
        tmp_path, model={"source": str(source), "stagedPath": target, "ropeTheta": 1e6},
        storage={"root": str(root), "volumeClaim": "prolong-runs"})))
    assert result.exit_code == 2 and f"{target} is not staged" in result.stderr, result.output


async def test_the_shipped_pipeline_warns_once_per_staged_place(api: Api) -> None:
    """prolong-8b stages its model and tokenizers to one directory on the volume: one warning
    from this machine (where /mnt/prolong is not mounted), and the pipeline is created."""
    from tests.conftest import JOBS

    result = await cli("submit", str(JOBS / "prolong-8b" / "pipeline.yaml"))
    assert result.exit_code == 0, result.output
    warnings = [line for line in result.stderr.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, result.stderr
    assert "/mnt/prolong/models/Meta-Llama-3-8B-Instruct" in warnings[0]
    assert api.creates(PIPELINES) == 1
