"""stage.json (one writer, one reader that checks the id) and the worker payload."""

from __future__ import annotations

import json

import pytest

from prolong.k8s.rayjob import render_stage
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from prolong.stage.payload import (
    JOB_FILE,
    STAGE_FILE,
    StageFileError,
    StageRun,
    read_stage_file,
    stage_file_text,
)
from tests.conftest import JOBS


def _pipeline():
    loaded = load(JOBS / "quickstart/pipeline.yaml")
    return loaded, {r.stage: r for r in pipeline_stages(loaded.document, loaded.jobs)}


def test_stage_file_round_trips_and_is_what_the_renderer_writes(tmp_path):
    loaded, refs = _pipeline()
    text = stage_file_text(refs["stage2"], {"stage1": refs["stage1"]})
    configmap, _ = render_stage(loaded.document, loaded.jobs, "stage2")
    assert configmap["data"][STAGE_FILE] == text
    path = tmp_path / STAGE_FILE
    path.write_text(text)
    (tmp_path / JOB_FILE).write_text(configmap["data"][JOB_FILE])
    info = read_stage_file(path, loaded.jobs["stage2"])
    assert info.ref == refs["stage2"]
    assert info.upstream_dirs == {"stage1": refs["stage1"].directory}
    assert info.upstream["stage1"].id == refs["stage1"].id
    assert json.loads(text)["directory"] == refs["stage2"].directory


def test_stage_file_of_another_job_is_refused(tmp_path):
    loaded, refs = _pipeline()
    path = tmp_path / STAGE_FILE
    path.write_text(stage_file_text(refs["stage2"], {"stage1": refs["stage1"]}))
    with pytest.raises(StageFileError, match=f"stage id {refs['stage2'].id} does not match"):
        read_stage_file(path, loaded.jobs["sft"])


def test_stage_run_survives_its_trip_to_the_workers():
    loaded, refs = _pipeline()
    job = loaded.jobs["stage2"]
    run = StageRun(job=job.model_dump(mode="json", by_alias=True), stage=refs["stage2"].to_json(),
                   upstream_dir="/abs/stage1", shard_dirs={"d": "/abs/shards"},
                   tokenizer_dir="/abs/tok")
    back = StageRun.from_config(json.loads(json.dumps(run.to_config())))
    assert back == run and back.stage_ref() == refs["stage2"] and back.job_model() == job
