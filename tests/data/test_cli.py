"""The `data` sub-app through typer's CliRunner: exit codes and one-line errors."""

from __future__ import annotations

import json

import yaml
from typer.testing import CliRunner

from prolong.data import tokenizer as tokmod
from prolong.data.cli import data_app

runner = CliRunner()


def job_file(tmp_path, stream_path, tok_dir):
    doc = {"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob", "metadata": {"name": "j"},
           "spec": {"model": {"architecture": {"preset": "tiny"}}, "sequenceLength": 256,
                    "globalBatchTokens": 256, "steps": 1, "precision": "fp32",
                    "schedule": {"peakLR": 1e-3},
                    "cluster": {"device": "cpu", "workersPerNode": 1},
                    "data": {"tokenizer": {"source": str(tok_dir)},
                             "preparedDir": str(tmp_path / "prepared"),
                             "streams": [{"domain": "web", "path": str(stream_path),
                                          "format": "jsonl", "proportion": 1.0}]}}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def test_help_has_examples():
    result = runner.invoke(data_app, ["prepare", "--help"])
    assert result.exit_code == 0 and "prolongctl data prepare jobs/quickstart" in result.output


def test_prepare_success_then_bad_input_then_bad_spec(tmp_path):
    tok_dir = tmp_path / "tok"
    tokmod.train_bpe(["alpha beta gamma delta " * 50], 280, tok_dir)
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps({"text": f"alpha beta {i}"}) + "\n" for i in range(20)))
    path = job_file(tmp_path, data, tok_dir)
    ok = runner.invoke(data_app, ["prepare", str(path), "--workers", "1", "--no-progress"])
    assert ok.exit_code == 0, ok.output
    assert "web" in ok.output

    data.write_text('{"txt": "no text field"}\n')
    bad = runner.invoke(data_app, ["prepare", str(path), "-w", "1", "--no-progress"])
    assert bad.exit_code == 2
    line = bad.output.strip()
    assert "\n" not in line and "stream web" in line and "textField 'text'" in line

    spec = yaml.safe_load(path.read_text())
    spec["spec"]["sequenceLength"] = 100
    path.write_text(yaml.safe_dump(spec))
    invalid = runner.invoke(data_app, ["prepare", str(path), "--no-progress"])
    assert invalid.exit_code == 2
    assert "sequenceLength" in invalid.output and len(invalid.output.strip().splitlines()) == 1
    missing = runner.invoke(data_app, ["prepare", str(tmp_path / "nope.yaml")])
    assert missing.exit_code == 2 and "file not found" in missing.output
