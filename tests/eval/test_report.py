"""Reports name the sizing, judge and stand-ins, and `prolongctl eval report --paper` puts runs
next to the published table, marking which of our numbers are comparable."""

from __future__ import annotations

import json
from pathlib import Path

from typer.testing import CliRunner

from prolong.cli import app
from prolong.eval.report import comparability, load_paper, markdown_report, paper_markdown
from prolong.spec import EvalSpec
from tests.conftest import JOBS

PAPER = JOBS / "prolong-8b/helmet-paper.json"


def results(spec: EvalSpec, scores: dict[str, float]) -> dict:
    n = "131072"
    cats = {c: {"tasks": [], "by_length": {n: v}, "mean": v} for c, v in scores.items()}
    avg = sum(scores.values()) / len(scores)
    return {"lengths": [131072], "categories": cats, "tasks": {}, "samples": 1,
            "average": {"by_length": {n: avg}, "mean": avg}, **comparability(spec)}


def spec(**fields) -> EvalSpec:
    return EvalSpec.model_validate({"model": {"source": "m"}, "tasks": ["json_kv"],
                                    "lengths": [131072], **fields})


def test_the_papers_table_is_data_with_its_source():
    paper = load_paper(PAPER)
    assert paper["length"] == 131072 and "2410.02660" in paper["source"]
    assert paper["models"]["ProLong-8B (paper)"] == {
        "recall": 98.8, "rag": 63.2, "icl": 86.5, "rerank": 22.5, "longqa": 43.9, "summ": 29.2,
        "average": 49.4}
    assert paper["models"]["Llama-3.1-8B-Instruct (paper)"]["rerank"] == 14.0


def test_comparability_follows_sizing_judge_and_tokenizer():
    full = comparability(spec(judge={"endpoint": "http://j/v1", "model": "gpt-4o", "helmetDir": "/HELMET"},
                              sizingTokenizer="/models/llama-2"))
    assert set(full["not_comparable"]) == {"cite"}  # citation scores are never computed
    bare = comparability(spec())
    assert "stand-in" in bare["not_comparable"]["longqa"]
    assert "Llama-2" in bare["not_comparable"]["summ"] and "recall" not in bare["not_comparable"]
    fill = comparability(spec(sizing="fill"))
    assert all("sizing fill" in why for why in fill["not_comparable"].values())
    text = markdown_report(results(spec(sizing="fill"), {"recall": 50.0}))
    assert "Sizing: **fill** -- not comparable to published HELMET numbers" in text
    assert "judge: none (ROUGE-L stand-ins)" in text


def test_eval_report_shows_runs_beside_the_paper(tmp_path: Path):
    good = tmp_path / "good"
    good.mkdir()
    (good / "results.json").write_text(json.dumps(
        {**results(spec(judge={"endpoint": "http://j/v1", "model": "gpt-4o", "helmetDir": "/HELMET"},
                        sizingTokenizer="/t"), {"recall": 97.0, "summ": 30.0}), "name": "ours"}))
    fill = tmp_path / "fill"
    fill.mkdir()
    (fill / "results.json").write_text(json.dumps(
        {**results(spec(sizing="fill"), {"recall": 99.0}), "name": "filled"}))
    out = tmp_path / "out"
    res = CliRunner().invoke(app, ["eval", "report", str(good), str(fill), "--paper", str(PAPER),
                                   "--out", str(out)])
    assert res.exit_code == 0, res.output
    md = (out / "paper.md").read_text()
    row = next(line for line in md.splitlines() if line.startswith("| Recall |"))
    assert "| 97.0 | 99.0 | 98.8 | 95.2 |" in row
    assert "ours: comparable" in row and "filled: not comparable (sizing fill" in row
    assert "ours: not comparable (not run)" in next(
        line for line in md.splitlines() if line.startswith("| RAG |"))
    assert md == paper_markdown([("ours", json.loads((good / "results.json").read_text())),
                                 ("filled", json.loads((fill / "results.json").read_text()))],
                                load_paper(PAPER))
    bad = CliRunner().invoke(app, ["eval", "report", str(good), "--paper", str(tmp_path / "x")])
    assert bad.exit_code == 2 and "no such file" in bad.output
