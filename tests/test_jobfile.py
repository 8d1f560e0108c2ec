"""One resolution of a job file for ``prolongctl run`` and ``submit`` (prolong.jobfile): a file a
pipeline references is that pipeline's stage, in the pipeline's directory, with its upstream's
real directory; ``run PIPELINE`` is unchanged; a fromStage file no pipeline references is bad
input (exit 2, one line naming the file and the field)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.jobfile import FROM_STAGE_FIELD, job_stage
from prolong.k8s.backend import submission
from prolong.run.runner import data_source, stages_of
from prolong.spec import SpecError
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from tests.conftest import JOBS

runner = CliRunner()


@pytest.fixture
def quickstart(tmp_path: Path) -> Path:
    """jobs/quickstart copied, its storage root in tmp (no stage of it is complete)."""
    out = tmp_path / "quickstart"
    shutil.copytree(JOBS / "quickstart", out)
    for path in out.glob("*.yaml"):
        doc = yaml.safe_load(path.read_text())
        if doc.get("kind") != "ProLongPipeline":
            doc["spec"].setdefault("storage", {})["root"] = str(tmp_path / "runs")
            path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return out


def _pipeline_refs(directory: Path) -> dict:
    loaded = load(directory / "pipeline.yaml")
    return {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}


def test_run_and_submit_put_a_stage_file_where_the_pipeline_does(quickstart):
    refs = _pipeline_refs(quickstart)
    for stage in ("stage1", "stage2"):
        loaded = load(quickstart / f"{stage}.yaml")
        ((job, ref, upstream_dirs),) = stages_of(loaded)
        assert ref == refs[stage]  # pipeline quickstart, stage name, id and directory
        assert ref.directory.endswith(f"/quickstart/{stage}-{ref.id}")
        assert ref == submission(loaded).ref  # what submit renders and creates
        assert job.metadata.name == f"quickstart-{stage}"
        assert data_source(loaded).path == str(quickstart / "pipeline.yaml")
    ((_, _, upstream_dirs),) = stages_of(load(quickstart / "stage2.yaml"))
    assert upstream_dirs == {"stage1": refs["stage1"].directory}
    # The pipeline file itself: every stage, as before.
    pipeline = load(quickstart / "pipeline.yaml")
    assert [r for _, r, _ in stages_of(pipeline)] == list(refs.values())
    assert data_source(pipeline) is pipeline


def test_a_job_file_no_pipeline_references(tmp_path, quickstart):
    alone = tmp_path / "alone"
    alone.mkdir()
    shutil.copy(quickstart / "stage1.yaml", alone / "stage1.yaml")
    ((_, ref, _),) = stages_of(load(alone / "stage1.yaml"))
    assert (ref.pipeline, ref.stage) == ("quickstart-stage1", "pretrain")  # its own pipeline
    shutil.copy(quickstart / "stage2.yaml", alone / "stage2.yaml")
    with pytest.raises(SpecError) as err:
        job_stage(load(alone / "stage2.yaml"))
    assert f"{FROM_STAGE_FIELD}: starts from stage 'stage1'" in err.value.one_line()
    result = runner.invoke(app, ["run", str(alone / "stage2.yaml"), "--no-progress"])
    assert result.exit_code == 2
    assert result.output.count("\n") == 1 and str(alone / "stage2.yaml") in result.output
    assert FROM_STAGE_FIELD in result.output
    # --pipeline must name a pipeline that references the file, for run as for submit.
    result = runner.invoke(app, ["run", str(alone / "stage2.yaml"), "--pipeline",
                                 str(quickstart / "pipeline.yaml"), "--no-progress"])
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert "spec.stages: no stage has ref: stage2.yaml" in result.output
    ((_, ref, _),) = stages_of(load(quickstart / "stage2.yaml"),
                               pipeline_file=str(quickstart / "pipeline.yaml"))
    assert ref == _pipeline_refs(quickstart)["stage2"]


def test_run_of_a_stage_file_needs_its_pipeline_upstream(quickstart):
    """Refused before any data is prepared or Ray starts, naming the directory the pipeline's
    stage 1 writes (not a directory of its own)."""
    stage1 = _pipeline_refs(quickstart)["stage1"]
    result = runner.invoke(app, ["run", str(quickstart / "stage2.yaml"), "--no-progress"])
    assert result.exit_code == 1
    assert f"needs stage stage1 complete at {stage1.directory}" in result.output
