"""The quickstart pipeline, shortened, end to end through `prolongctl run` as a user runs it:
stage 1 -> stage 2 (SP=2) -> SFT -> eval on a real local Ray, with the real console.

- the console stays short (worker and Ray logs land in each stage's logs/);
- a second run trains nothing;
- deleting one stage's COMPLETE re-runs that stage and the stages after it, and only those;
- metrics have one row per step after the resume;
- `prolongctl report` writes its tables and PNGs.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from PIL import Image

from tests.conftest import JOBS, REPO

pytestmark = [pytest.mark.slow, pytest.mark.ray]

CONSOLE_LINES = 45
"""The most console lines a four-stage run may print (header, bar and result per stage, the
summary and the scores); the full quickstart prints the same shape."""


MAIN_LINE = ("stage1", "stage2", "sft", "eval")
SFT_BELOW_LN_V = 0.25
"""A fresh init's first loss is at or above ln V (8.35 against 8.32 measured on the quickstart's
stage 1); after the shortened stages 1 and 2 (6 steps) SFT starts clearly below it."""
SFT_NEAR_STAGE2 = 1.0
"""Nats between SFT's first loss (its own data) and stage 2's last."""


def shortened(tmp: Path, data_dir: Path | None = None) -> Path:
    """A copy of jobs/quickstart/ with few steps, one eval length and two samples per task.
    ``data_dir`` (the quickstart_data fixture) is the prepared-data directory of every training
    stage: tests that run the quickstart's stages share one corpus, tokenizer and shards, and the
    first prepares them (data prepare is idempotent and locked, tests/data/test_prepare.py)."""
    out = tmp / "jobs"
    shutil.copytree(JOBS / "quickstart", out)
    short_eval = {"tasks": ["json_kv", "ruler_mk_needle"], "samples": 2}
    edits = {"stage1.yaml": {"steps": 4, "checkpoint": {"everySteps": 2}},
             "stage2.yaml": {"steps": 2, "checkpoint": {"everySteps": 2}},
             "sft.yaml": {"steps": 2, "checkpoint": {"everySteps": 2}},
             "eval.yaml": short_eval,
             "sft-from-stage1.yaml": {"steps": 1, "checkpoint": {"everySteps": 1}},
             "eval-from-stage1.yaml": {**short_eval, "samples": 1}}
    # base.yaml made the shipped base that stage 1 starts from; it is not a pipeline stage.
    assert sorted(edits) == sorted(p.name for p in out.glob("*.yaml")
                                   if p.name not in ("pipeline.yaml", "base.yaml"))
    # The main line only: the branch without the long stage (sft-from-stage1, eval-from-stage1)
    # would be two more Ray launches; what it adds is tested on its own (out_of_date in
    # tests/run/test_runner.py, the shared score table in tests/run/test_report.py).
    pipeline = yaml.safe_load((out / "pipeline.yaml").read_text())
    pipeline["spec"]["stages"] = [s for s in pipeline["spec"]["stages"] if s["name"] in MAIN_LINE]
    (out / "pipeline.yaml").write_text(yaml.safe_dump(pipeline, sort_keys=False))
    for name, spec_edits in edits.items():
        job = yaml.safe_load((out / name).read_text())
        job["spec"].update(spec_edits)
        job["spec"]["storage"] = {"root": str(tmp / "runs")}
        if data_dir is not None and "data" in job["spec"]:
            job["spec"]["data"]["preparedDir"] = str(data_dir)
        if job["kind"] == "EvalJob":
            job["spec"]["lengths"] = job["spec"]["lengths"][:1]
        (out / name).write_text(yaml.safe_dump(job, sort_keys=False))
    return out / "pipeline.yaml"


def prolongctl(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "COLUMNS": "120", "DS_ACCELERATOR": "cpu", "HF_HUB_OFFLINE": "1",
           "RAY_USAGE_STATS_ENABLED": "0", "TOKENIZERS_PARALLELISM": "false"}
    return subprocess.run([sys.executable, "-m", "prolong.cli", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)


def stage_dirs(runs: Path) -> dict[str, Path]:
    return {p.name.rsplit("-", 1)[0]: p for p in (runs / "quickstart").iterdir()
            if p.is_dir() and ".superseded-" not in p.name}


def losses(stage_dir: Path) -> list[float]:
    return [json.loads(line)["loss"] for line in
            (stage_dir / "metrics.jsonl").read_text().splitlines()]


def assert_sft_starts_from_stage2(dirs: dict[str, Path]) -> None:
    """SFT (``init: weights``) starts from stage 2's final/: its first loss is near stage 2's
    last and far below ln V, where a fresh init's would be."""
    vocab = json.loads((dirs["sft"] / "final" / "config.json").read_text())["vocab_size"]
    sft, stage2 = losses(dirs["sft"])[0], losses(dirs["stage2"])[-1]
    print(f"SFT's first loss {sft:.3f}, stage 2's last {stage2:.3f}, ln V {math.log(vocab):.3f}")
    assert sft < math.log(vocab) - SFT_BELOW_LN_V, (sft, stage2, math.log(vocab))
    assert abs(sft - stage2) < SFT_NEAR_STAGE2, (sft, stage2)


def test_shortened_quickstart(tmp_path, quickstart_data):
    pipeline = shortened(tmp_path, quickstart_data)
    first = prolongctl("run", str(pipeline))
    assert first.returncode == 0, first.stdout + first.stderr
    console = (first.stdout + first.stderr).splitlines()
    assert len(console) <= CONSOLE_LINES, "\n".join(console)
    assert not any("Reporting training result" in line for line in console)
    dirs = stage_dirs(tmp_path / "runs")
    assert sorted(dirs) == sorted(MAIN_LINE)
    for name, d in dirs.items():
        assert (d / "COMPLETE").is_file(), name
        assert any((d / "logs").iterdir()), f"{name}: no worker logs in logs/"
    for name in ("stage1", "stage2", "sft"):
        assert (dirs[name] / "report.md").is_file() and (dirs[name] / "curves.png").is_file()
    trained = {n: (dirs[n] / "metrics.jsonl").stat().st_mtime_ns for n in ("stage1", "stage2", "sft")}
    assert_sft_starts_from_stage2(dirs)
    results = (dirs["eval"] / "results.json").read_text()
    assert str(dirs["sft"] / "final") in results  # eval ran on SFT's final/ weights
    for name in ("report.md", "scores.png"):
        assert (dirs["eval"] / name).is_file(), name

    again = prolongctl("run", str(pipeline))
    assert again.returncode == 0, again.stdout + again.stderr
    assert (again.stdout + again.stderr).count("is complete:") == 4
    assert {n: (dirs[n] / "metrics.jsonl").stat().st_mtime_ns for n in trained} == trained

    (dirs["sft"] / "COMPLETE").unlink()
    third = prolongctl("run", str(pipeline))
    assert third.returncode == 0, third.stdout + third.stderr
    out = third.stdout + third.stderr
    assert "stage stage1 (" in out and "stage stage2 (" in out  # reported complete, not run
    for name in ("stage1", "stage2"):
        assert (dirs[name] / "metrics.jsonl").stat().st_mtime_ns == trained[name], name
    assert (dirs["sft"] / "COMPLETE").is_file() and (dirs["eval"] / "COMPLETE").is_file()
    steps = [json.loads(line)["step"] for line in
             (dirs["sft"] / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]  # resumed from its last checkpoint: each step once
    assert "runs again" in out
    (aside,) = [p for p in (tmp_path / "runs" / "quickstart").iterdir() if ".superseded-" in p.name]
    assert aside.name.startswith(dirs["eval"].name)
    assert (aside / "results.json").read_text() == results  # the replaced outputs are kept

    report = prolongctl("report", str(pipeline), "--out", str(tmp_path / "report"))
    assert report.returncode == 0, report.stdout + report.stderr
    assert (tmp_path / "report" / "report.md").read_text().startswith("# Run report")
    for png in (dirs["stage1"] / "curves.png", dirs["eval"] / "scores.png"):
        with Image.open(png) as image:
            assert image.format == "PNG" and image.width >= 600 and image.height >= 300
