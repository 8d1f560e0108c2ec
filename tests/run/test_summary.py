"""The end-of-run summary as people read it: on an 80-column terminal nothing is cut."""

from __future__ import annotations

from rich.console import Console

from prolong.run.report import StageRow
from prolong.run.summary import StageOutcome, summary_table
from prolong.stage.identity import StageRef


def test_summary_fits_80_columns_with_the_quickstarts_longest_stage_names():
    outcomes = []
    for stage, kind in (("stage1", "PretrainJob"), ("sft-from-stage1", "SFTJob"),
                        ("eval-from-stage1", "EvalJob")):
        ref = StageRef("quickstart", stage, kind, "663fee73", (), "./runs")
        train = kind != "EvalJob"
        row = StageRow(stage, ref.id, kind, ref.directory, devices=2, seconds=202.0,
                       steps=300 if train else None, tokens=1_228_800 if train else None,
                       first_loss=8.006 if train else None, last_loss=3.319 if train else None,
                       tokens_per_s_per_device=3559.5 if train else None,
                       average_score=None if train else 0.0)
        outcomes.append(StageOutcome(ref, row, wall_seconds=202.0))
    console = Console(width=80, record=True)
    console.print(summary_table(outcomes))
    text = console.export_text()
    assert "…" not in text, text
    assert "8.006->3.319" in text and "3m22s" in text and "eval avg 0.0" in text
    assert max(len(line) for line in text.splitlines()) <= 80
