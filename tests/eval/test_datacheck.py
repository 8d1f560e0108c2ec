"""dataDir is checked before any model is loaded: a missing or malformed file is one line naming
the file (and line) and the rule, and `prolongctl run` exits 2."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.data.errors import DataError
from prolong.eval.datacheck import check_data_dir
from prolong.spec import EvalSpec
from tests.eval.conftest import write_helmet_data


def spec(data_dir: Path, tasks: list[str], lengths=(8192,), sizing="fill") -> EvalSpec:
    return EvalSpec.model_validate({"model": {"source": "/nowhere"}, "tasks": tasks,
                                    "lengths": list(lengths), "dataDir": str(data_dir),
                                    "sizing": sizing})


@pytest.fixture()
def data(tmp_path) -> Path:
    return write_helmet_data(tmp_path / "helmet", n=2)


def test_a_complete_data_dir_passes(data):
    check_data_dir(spec(data, ["nq", "msmarco", "banking77", "narrativeqa", "infbench_qa",
                               "multi_lexsum", "alce_asqa"]))


def test_a_missing_file_is_named(data):
    (data / "icl/banking77/test.jsonl").unlink()
    with pytest.raises(DataError, match=r"icl/banking77/test\.jsonl: missing"):
        check_data_dir(spec(data, ["banking77"]))


def test_helmet_sizing_needs_helmets_k_file(data):
    with pytest.raises(DataError, match=r"k105_dep6\.jsonl: missing.*nq at 16384"):
        check_data_dir(spec(data, ["nq"], lengths=(16384,), sizing="helmet"))


def test_a_malformed_line_is_named_with_its_line(data):
    path = data / "narrativeqa/test.jsonl"
    lines = path.read_text().splitlines()
    path.write_text("\n".join([lines[0], "{not json", *lines[1:]]) + "\n")
    with pytest.raises(DataError, match=r"narrativeqa/test\.jsonl:2: not valid JSON"):
        check_data_dir(spec(data, ["narrativeqa"]))
    path.write_text(lines[0] + '\n{"question": {"text": "q"}}\n')
    with pytest.raises(DataError, match=r"test\.jsonl:2: record lacks document, answers"):
        check_data_dir(spec(data, ["narrativeqa"]))


def test_prolongctl_run_exits_2_before_loading_any_model(data, tmp_path):
    shutil.rmtree(data / "msmarco")
    job = {"apiVersion": "prolong.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "bad"},
           "spec": {"model": {"source": str(tmp_path / "no-model")}, "tasks": ["msmarco"],
                    "lengths": [8192], "dataDir": str(data), "storage": {"root": str(tmp_path)},
                    "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": 1}}}
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(job))
    result = CliRunner().invoke(app, ["run", str(path)])
    assert result.exit_code == 2, result.output
    lines = [x for x in result.output.splitlines() if x.strip()]
    assert len(lines) == 1 and "test_reranking_data_k50_dep3.jsonl: missing" in lines[0]
