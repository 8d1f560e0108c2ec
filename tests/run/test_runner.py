"""prolongctl run's refusals: what it checks before it prepares data or starts Ray."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from prolong.run.runner import RunError, out_of_date, run_file, worker_job
from prolong.spec import SpecError
from prolong.specfile import load
from prolong.stage.directory import Manifest, StageDir
from prolong.stage.identity import pipeline_stages, standalone_stage
from prolong.stage.lock import LOCK_FILE, StageLock
from tests.conftest import JOBS, job_dict


def test_prolongctl_run_refuses_a_stage_another_run_holds(tmp_path, monkeypatch):
    """No data preparation, no Ray: the refusal comes first, and names the holder."""
    monkeypatch.chdir(tmp_path)
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["storage"] = {"root": str(tmp_path / "runs")}
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(data))
    ref = standalone_stage(load(path).document)
    with StageLock(ref.directory), pytest.raises(RunError, match="is being run by pid"):
        run_file(path, progress=False)
    assert not (tmp_path / "runs" / "data").exists()  # nothing was prepared


def test_prolongctl_run_refuses_an_upstream_with_missing_weights(tmp_path):
    """Stage 1 finished earlier but its final/ lost its weights: running the pipeline refuses
    before preparing data or starting Ray, naming the missing path."""
    for src in (JOBS / "quickstart").glob("*.yaml"):
        (tmp_path / src.name).write_text(src.read_text().replace("./runs", str(tmp_path / "runs")))
    loaded = load(tmp_path / "pipeline.yaml")
    stage1 = pipeline_stages(loaded.document, loaded.jobs)[0]
    assert stage1.storage_root == str(tmp_path / "runs")
    done = StageDir(stage1.directory)
    (tmp_path / "runs" / "quickstart" / stage1.dir_name / "final").mkdir(parents=True)
    done.write_manifest(Manifest.for_stage(stage1, {}))
    done.mark_complete()
    with pytest.raises(RunError, match=r"stage stage2 starts from stage stage1, whose final "
                                       r"weights are incomplete: .*final/config.json is missing"):
        run_file(tmp_path / "pipeline.yaml", progress=False)
    assert not (tmp_path / "runs" / "data").exists()
    stage2 = pipeline_stages(loaded.document, loaded.jobs)[1]
    assert not (Path(stage2.directory) / LOCK_FILE).exists()  # the locks were released


def _quickstart_copy(tmp_path: Path):
    for src in (JOBS / "quickstart").glob("*.yaml"):
        (tmp_path / src.name).write_text(src.read_text().replace("./runs", str(tmp_path / "runs")))
    loaded = load(tmp_path / "pipeline.yaml")
    return loaded, {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}


def _finish(ref, at: float) -> StageDir:
    stage = StageDir(ref.directory)
    stage.write_manifest(Manifest.for_stage(ref, {}))
    stage.write_json("COMPLETE", {"completed_at": at})
    return stage


def test_a_stage_is_out_of_date_when_its_upstream_reruns_or_completed_after_it(tmp_path):
    loaded, refs = _quickstart_copy(tmp_path)
    dirs = {name: ref.directory for name, ref in refs.items()}
    sft, evaluation = loaded.jobs["sft"], loaded.jobs["eval"]
    _finish(refs["stage2"], 100.0)
    _finish(refs["sft"], 200.0)
    assert out_of_date(sft, refs["sft"], dirs, rerunning=set()) is None
    assert "stage2, which it starts from, runs again" in \
        out_of_date(sft, refs["sft"], dirs, rerunning={"stage2"})
    _finish(refs["stage2"], 300.0)  # stage 2 was run again after sft finished
    assert "completed after it" in out_of_date(sft, refs["sft"], dirs, rerunning=set())
    # An incomplete upstream is not "newer": upstream_ready reports it.
    assert out_of_date(evaluation, refs["eval"], dirs, rerunning=set()) is None
    assert out_of_date(loaded.jobs["stage1"], refs["stage1"], dirs, rerunning=set()) is None
    # The branch without the long stage starts from stage1: stage 2 running again leaves it be.
    _finish(refs["stage1"], 50.0)
    _finish(refs["sft-from-stage1"], 150.0)
    branch = loaded.jobs["sft-from-stage1"]
    assert out_of_date(branch, refs["sft-from-stage1"], dirs, rerunning={"stage2", "sft"}) is None
    assert "stage1, which it starts from, runs again" in \
        out_of_date(branch, refs["sft-from-stage1"], dirs, rerunning={"stage1"})


def test_supersede_keeps_the_replaced_outputs_and_the_lock(tmp_path):
    stage = StageDir(str(tmp_path / "stage"))
    stage.write_json("results.json", {"score": 1})
    (tmp_path / "stage" / "final").mkdir()
    (tmp_path / "stage" / LOCK_FILE).write_text("held")
    aside = Path(stage.supersede(keep=(LOCK_FILE,)))
    assert aside.parent == tmp_path and aside.name.startswith("stage.superseded-")
    assert sorted(p.name for p in aside.iterdir()) == ["final", "results.json"]
    assert [p.name for p in (tmp_path / "stage").iterdir()] == [LOCK_FILE]
    assert not stage.is_complete() and stage.completed_at() is None


def test_workers_get_a_local_model_source_as_an_absolute_path(monkeypatch, tmp_path):
    """Workers run in another directory: stage 1's ./jobs/quickstart/base/final must reach them
    absolute, or they look for it where they run (and refuse to download it)."""
    job = load(JOBS / "quickstart/stage1.yaml").document
    monkeypatch.chdir(JOBS.parent)
    sent = worker_job(job)["spec"]["model"]["source"]
    assert sent == str((JOBS / "quickstart/base/final").resolve())
    assert job.spec.model.source == "./jobs/quickstart/base/final"  # the spec keeps its words
    monkeypatch.chdir(tmp_path)  # not a directory from here: left as written (a hub id, say)
    assert worker_job(job)["spec"]["model"]["source"] == "./jobs/quickstart/base/final"


def test_prolongctl_run_refuses_the_shipped_base_without_its_revision(tmp_path, monkeypatch):
    """Stage 1 starts from the shipped base (./jobs/quickstart/base/final); its id follows the
    base's weights only through model.revision, so a spec without it is bad input, refused with
    the file and field before any data preparation or Ray."""
    monkeypatch.chdir(JOBS.parent)
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["storage"] = {"root": str(tmp_path / "runs")}
    del data["spec"]["model"]["revision"]
    path = tmp_path / "stage1.yaml"
    path.write_text(yaml.safe_dump(data))
    with pytest.raises(SpecError) as refused:
        run_file(path, progress=False)
    line = refused.value.one_line()
    assert line.startswith(f"{path}: stage pretrain: spec.model.revision: ")
    assert "model.revision is not set; set it to" in line
    assert not (tmp_path / "runs").exists()  # nothing was prepared or locked
