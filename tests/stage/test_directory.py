"""Stage directory: atomic JSON, completion marker last, metrics log."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prolong.stage.directory import COMPLETE, Manifest, MetricsLog, StageDir, read_metrics
from prolong.stage.identity import StageRef


def test_manifest_then_complete(tmp_path):
    stage = StageDir(str(tmp_path / "pipe" / "stage1-abc"))
    assert not stage.is_complete()
    with pytest.raises(RuntimeError, match="manifest"):
        stage.mark_complete()
    ref = StageRef("pipe", "stage1", "PretrainJob", "abc", (), str(tmp_path))
    stage.write_manifest(Manifest.for_stage(ref, {"kind": "PretrainJob"}, final=stage.final_uri,
                                            steps=3))
    stage.mark_complete()
    manifest = stage.read_manifest()
    assert stage.is_complete() and (manifest.id, manifest.steps) == ("abc", 3)
    assert manifest.final == stage.final_uri and manifest.results is None
    assert json.loads((tmp_path / "pipe" / "stage1-abc" / COMPLETE).read_text())["completed_at"] > 0
    # no temporary files left behind
    assert sorted(p.name for p in (tmp_path / "pipe" / "stage1-abc").iterdir()) == [COMPLETE, "manifest.json"]


def test_relative_paths_are_made_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    stage = StageDir("./runs/p/s-1")
    assert stage.uri == str(tmp_path / "runs/p/s-1")


def test_metrics_log_appends_lines(tmp_path):
    stage = StageDir(str(tmp_path / "s"))
    log = MetricsLog(stage)
    for step in range(3):
        log.append({"step": step, "loss": 1.0 / (step + 1)})
    log.close()
    again = MetricsLog(stage)  # a resumed run appends
    again.append({"step": 3, "loss": 0.2})
    again.close()
    assert [r["step"] for r in read_metrics(stage)] == [0, 1, 2, 3]


def test_completion_is_read_through_uris_too(tmp_path):
    """The operator and the runner ask stage_complete, which reads URIs (here file://, as s3://
    and gs:// go through the same pyarrow filesystem layer) as well as local paths."""
    from prolong.stage.directory import stage_complete

    d = tmp_path / "p" / "stage1-abc"
    stage = StageDir(str(d))
    ref = StageRef("p", "stage1", "PretrainJob", "abc", (), str(tmp_path))
    assert not stage_complete(str(d)) and not stage_complete(f"file://{d}")
    stage.write_manifest(Manifest.for_stage(ref, {}))
    stage.mark_complete()
    assert stage_complete(str(d)) and stage_complete(f"file://{d}")
    assert StageDir(f"file://{d}").read_manifest().id == "abc"


def test_publish_directory_replaces_in_one_move(tmp_path):
    from prolong.stage.directory import publish_directory

    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"new")
    dest = tmp_path / "stage" / "final"
    dest.mkdir(parents=True)
    (dest / "stale.bin").write_bytes(b"old")
    publish_directory(str(src), str(dest))
    assert sorted(p.name for p in dest.iterdir()) == ["model.safetensors"]
    assert not (tmp_path / "stage" / "final.partial").exists()


def test_a_resumed_run_replaces_its_replayed_steps(tmp_path):
    """Resumed from the checkpoint of step 3, steps 4-5 run again: their old rows go, so the log
    (the raw file, not only the reader) holds each step once, with the replayed values."""
    stage = StageDir(str(tmp_path / "s"))
    log = MetricsLog(stage)
    for step in range(1, 6):
        log.append({"step": step, "loss": 10.0 - step})
    log.close()
    resumed = MetricsLog(stage, resume_from=3)
    for step in (4, 5, 6):
        resumed.append({"step": step, "loss": 1.0 * step})
    resumed.close()
    raw = [json.loads(line) for line in (tmp_path / "s" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in raw] == [1, 2, 3, 4, 5, 6]
    assert [r["loss"] for r in raw] == [9.0, 8.0, 7.0, 4.0, 5.0, 6.0]
    assert read_metrics(stage) == raw


def test_reader_keeps_the_last_row_of_a_step(tmp_path):
    d = tmp_path / "s"
    d.mkdir()
    rows = [{"step": 1, "loss": 3.0}, {"step": 2, "loss": 2.0}, {"step": 2, "loss": 2.5},
            {"step": 3, "loss": 1.0}]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert [(r["step"], r["loss"]) for r in read_metrics(StageDir(str(d)))] == \
        [(1, 3.0), (2, 2.5), (3, 1.0)]


def test_final_problems_name_each_missing_weight_file(tmp_path):
    from prolong.stage.directory import final_problems

    d = tmp_path / "p" / "stage1-abc"
    assert final_problems(str(d)) == [f"{d}/final is missing"]
    (d / "final").mkdir(parents=True)
    (d / "final" / "config.json").write_text("{}")
    (d / "final" / "model.safetensors").write_bytes(b"x")
    assert final_problems(str(d)) == []
    (d / "final" / "model.safetensors").unlink()
    (d / "final" / "model.safetensors.index.json").write_text(json.dumps({"weight_map": {
        "a": "model-00001-of-00002.safetensors", "b": "model-00002-of-00002.safetensors"}}))
    (d / "final" / "model-00001-of-00002.safetensors").write_bytes(b"x")
    assert final_problems(str(d)) == [f"{d}/final/model-00002-of-00002.safetensors is missing"]


def test_local_copy_of_only_some_files(tmp_path):
    """A model whose weights will not be read is fetched as its config alone."""
    from prolong.stage.directory import local_copy

    src = tmp_path / "final"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "model.safetensors").write_bytes(b"weights")
    assert local_copy(str(src), only=("config.json",)) == str(src)  # local: read in place
    copy = Path(local_copy(f"file://{src}", only=("config.json",)))
    assert sorted(p.name for p in copy.iterdir()) == ["config.json"]
    assert sorted(p.name for p in Path(local_copy(f"file://{src}")).iterdir()) == [
        "config.json", "model.safetensors"]
