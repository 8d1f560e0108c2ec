"""`prolongctl report` and the run summary over finished stages (training and eval alike)."""

from __future__ import annotations

import pytest
from rich.console import Console
from typer.testing import CliRunner

from prolong.cli import app
from prolong.eval.harness import aggregate
from prolong.eval.report import RESULTS
from prolong.run.report import eval_score_rows, run_markdown, run_rows, scores_markdown
from prolong.run.summary import scores_table
from prolong.spec import EvalJob, PretrainJob
from prolong.stage.directory import Manifest, MetricsLog, StageDir
from prolong.stage.identity import standalone_stage
from tests.conftest import job_dict
from tests.train.test_report import step_records


def _finished_stage(root, name: str = "stage1") -> StageDir:
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["storage"] = {"root": str(root)}
    job = PretrainJob.model_validate(data)
    ref = standalone_stage(job)
    stage = StageDir(ref.directory)
    log = MetricsLog(stage)
    for r in step_records(5):
        log.append(r)
    log.close()
    stage.write_manifest(Manifest.for_stage(ref, job.model_dump(mode="json", by_alias=True),
                                            steps=5, tokens=5 * 2048))
    stage.mark_complete()
    return stage


def test_run_rows_read_pipeline_and_stage_directories(tmp_path):
    stage = _finished_stage(tmp_path)
    name, rows = run_rows(stage.uri)
    assert [r.steps for r in rows] == [5] and rows[0].devices == 2
    pipeline_name, again = run_rows(str(tmp_path / "quickstart-stage1"))
    assert pipeline_name == "quickstart-stage1" and again == rows
    text = run_markdown([(name, rows), ("other", rows)], price_per_device_hour=3.0)
    assert "## Side by side" in text and f"{rows[0].device_hours * 3.0:,.2f}" in text
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no finished stage"):
        run_rows(str(tmp_path / "empty"))


def test_prolongctl_report(tmp_path):
    stage = _finished_stage(tmp_path)
    result = CliRunner().invoke(app, ["report", stage.uri, "--price-per-device-hour", "2",
                                      "--out", str(tmp_path / "out")], env={"COLUMNS": "160"})
    assert result.exit_code == 0, result.output
    assert "pretrain" in result.output and "total " in result.output
    assert "device-hours" in result.output and "at 2 per device-hour" in result.output
    assert (tmp_path / "out" / "report.md").read_text().startswith("# Run report")
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nope")])
    assert missing.exit_code == 2 and "no such file or directory" in missing.output


def _finished_eval(root, name: str, scores: dict[tuple[str, int], float]) -> StageDir:
    """An eval stage directory whose results.json is aggregated from per-sample records by the
    harness's own aggregate()."""
    data = job_dict("quickstart/eval.yaml")
    data["metadata"]["name"] = name
    data["spec"]["storage"] = {"root": str(root)}
    data["spec"]["model"] = {"source": str(root / "model")}
    job = EvalJob.model_validate(data)
    ref = standalone_stage(job)
    stage = StageDir(ref.directory)
    records = [{"task": task, "category": "recall", "metric": "substring_exact_match",
                "length": length, "score": score} for (task, length), score in scores.items()]
    results = aggregate(records)
    stage.write_json(RESULTS, {**results, "workers": 2, "seconds": 10.0})
    stage.write_manifest(Manifest.for_stage(ref, job.model_dump(mode="json", by_alias=True),
                                            summary={"average": results["average"]["mean"]}))
    stage.mark_complete()
    return stage


def test_eval_stages_of_one_run_compare_length_by_length(tmp_path):
    long_stage = _finished_eval(tmp_path, "eval", {("json_kv", 512): 50.0,
                                                   ("json_kv", 2048): 25.0})
    short_stage = _finished_eval(tmp_path, "eval-from-stage1", {("json_kv", 512): 40.0,
                                                                ("json_kv", 2048): 0.0})
    stages = [("eval", long_stage.uri), ("eval-from-stage1", short_stage.uri)]
    lengths, rows = eval_score_rows(stages)
    assert lengths == ["512", "2048"]
    assert [(r.task, r.stage, r.by_length, r.mean) for r in rows] == [
        ("json_kv", "eval", [50.0, 25.0], 37.5),
        ("json_kv", "eval-from-stage1", [40.0, 0.0], 20.0),
        ("average", "eval", [50.0, 25.0], 37.5),
        ("average", "eval-from-stage1", [40.0, 0.0], 20.0)]
    text = "\n".join(scores_markdown(stages))
    assert "| json_kv | eval-from-stage1 | 40.0 | 0.0 | 20.0 |" in text

    console = Console(width=80, record=True)
    console.print(scores_table(stages, "HELMET scores"))
    printed = console.export_text()
    assert "eval-from-stage1" in printed and max(map(len, printed.splitlines())) <= 80

    result = CliRunner().invoke(app, ["report", long_stage.uri, short_stage.uri,
                                      "--out", str(tmp_path / "out")], env={"COLUMNS": "100"})
    assert result.exit_code == 0, result.output
    assert "### HELMET scores of" in (tmp_path / "out" / "report.md").read_text()
    import matplotlib.image

    image = matplotlib.image.imread(str(tmp_path / "out" / "scores.png"), format="png")
    assert image.shape[0] >= 250 and image.shape[1] >= 300
