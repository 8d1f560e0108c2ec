"""Stage directory: atomic JSON, completion marker last, metrics log."""

from __future__ import annotations

import json

import pytest

from prolong.train.stage_dir import COMPLETE, MetricsLog, StageDir, read_metrics


def test_manifest_then_complete(tmp_path):
    stage = StageDir(str(tmp_path / "pipe" / "stage1-abc"))
    assert not stage.is_complete()
    with pytest.raises(RuntimeError, match="manifest"):
        stage.mark_complete()
    stage.write_manifest({"id": "abc", "final": stage.final_uri})
    stage.mark_complete()
    assert stage.is_complete() and stage.read_manifest()["id"] == "abc"
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
