"""The end of ``prolongctl run``: one line per finished stage and a summary of the whole run.

Everything here is read back from the stage directories (manifest.json, metrics.jsonl,
results.json), so a stage finished by an earlier run is summarised the same way as one that ran
now; only the wall time is this run's own.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from rich.console import Console
from rich.table import Table

from prolong.eval.report import REPORT, SCORES_PNG
from prolong.run.report import StageRow, eval_score_rows, stage_row
from prolong.stage.directory import StageDir
from prolong.stage.identity import StageRef
from prolong.stage.logs import LOGS_DIR
from prolong.train.report import fmt


@dataclass(frozen=True)
class StageOutcome:
    """What one stage produced, as its directory says (the row ``prolongctl report`` shows, so
    the two never disagree), and this run's wall time for it."""

    ref: StageRef
    row: StageRow
    wall_seconds: float | None = None
    """None when the stage was complete before this run."""

    @classmethod
    def read(cls, ref: StageRef, *, wall_seconds: float | None = None) -> StageOutcome:
        return cls(ref, stage_row(ref.directory), wall_seconds)

    def line(self) -> str:
        """The one result line of a stage that just finished."""
        r, where = self.row, self.ref.directory
        took = f" in {_duration(self.wall_seconds)}" if self.wall_seconds is not None else ""
        if r.kind == "EvalJob":
            score = "no samples" if r.average_score is None else f"average {r.average_score:.1f}"
            return f"stage {self.ref.stage} complete{took}: {score} -> {where}"
        loss = (f", loss {r.first_loss:.3f} -> {r.last_loss:.3f}"
                if r.first_loss is not None else "")
        rate = f", {r.tokens_per_s:,.0f} tok/s" if r.tokens_per_s is not None else ""
        return f"stage {self.ref.stage} complete{took}: {r.steps} steps{loss}{rate} -> {where}"


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    minutes, secs = divmod(round(seconds), 60)
    return f"{minutes}m{secs:02d}s" if minutes else f"{seconds:.1f}s"


def _count(value: int | None) -> str:
    if value is None:
        return "-"
    for unit, size in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if value >= size:
            return f"{value / size:.1f}{unit}"
    return str(value)


def summary_table(outcomes: list[StageOutcome]) -> Table:
    # Narrow enough for an 80-column terminal with 16-character stage names (the stage lines
    # above name each stage's kind; the title says what the loss column holds).
    table = Table(title="run summary (loss: first -> last, means of the first and last steps)",
                  title_justify="left", show_edge=False, pad_edge=False)
    for col in ("stage", "id", "steps", "tokens", "loss", "tok/s", "wall"):
        table.add_column(col, justify="right" if col in ("steps", "tokens", "tok/s") else "left",
                         no_wrap=True)
    for o in outcomes:
        r = o.row
        loss = (f"{r.first_loss:.3f}->{r.last_loss:.3f}" if r.first_loss is not None else
                (f"eval avg {r.average_score:.1f}" if r.average_score is not None else "-"))
        table.add_row(o.ref.stage, o.ref.id,
                      "-" if r.steps is None else str(r.steps), _count(r.tokens), loss,
                      "-" if r.tokens_per_s is None else f"{r.tokens_per_s:,.0f}",
                      _duration(o.wall_seconds) if o.wall_seconds is not None else "earlier")
    return table


def scores_table(stages: list[tuple[str, str]], title: str) -> Table | None:
    """HELMET scores of eval stages, given as (stage name, directory), by task and length; with
    several stages each task has one row per stage, so that they compare length by length. None
    when no stage has results."""
    lengths, rows = eval_score_rows(stages)
    if not rows:
        return None
    several = len({r.stage for r in rows}) > 1
    table = Table(title=title, title_justify="left", show_edge=False, pad_edge=False)
    table.add_column("task")
    if several:
        table.add_column("eval stage")
    for n in lengths:
        table.add_column(n, justify="right")
    table.add_column("mean", justify="right")
    for i, r in enumerate(rows):
        last_of_task = i + 1 == len(rows) or rows[i + 1].task != r.task
        first_of_task = i == 0 or rows[i - 1].task != r.task
        table.add_row(r.task if first_of_task else "", *([r.stage] if several else []),
                      *(fmt(v, ".1f") for v in r.by_length), fmt(r.mean, ".1f"),
                      end_section=several and last_of_task)
    return table


def run_table(name: str, rows: list[StageRow], price_per_device_hour: float | None) -> Table:
    """``prolongctl report``: one run's stages with their time, device-hours and cost."""
    table = Table(title=f"run {name}", title_justify="left", show_edge=False, pad_edge=False)
    for col in ("stage", "id", "steps", "tokens", "last loss", "time", "device-h",
                "tok/s/dev", "MFU", "cost", "eval"):
        table.add_column(col, no_wrap=True,
                         justify="left" if col in ("stage", "id") else "right")
    for r in rows:
        cost = None if price_per_device_hour is None else r.device_hours * price_per_device_hour
        table.add_row(r.stage, r.id, fmt(r.steps, ","), _count(r.tokens),
                      fmt(r.last_loss, ".3f"), _duration(r.seconds), f"{r.device_hours:.4f}",
                      fmt(r.tokens_per_s_per_device), fmt(r.mfu_dense, ".1%"),
                      fmt(cost, ",.2f"), fmt(r.average_score, ".1f"))
    return table


def print_run_report(console: Console, runs: list[tuple[str, list[StageRow]]],
                     price_per_device_hour: float | None) -> None:
    """What ``prolongctl report`` prints: each run's table and its eval scores."""
    for name, rows in runs:
        console.print(run_table(name, rows, price_per_device_hour))
        total = sum(r.device_hours for r in rows)
        cost = (f", cost {total * price_per_device_hour:,.2f} at {price_per_device_hour:g} per "
                "device-hour" if price_per_device_hour is not None else
                " (--price-per-device-hour for a cost)")
        console.print(f"total {total:.4f} device-hours{cost}", markup=False, soft_wrap=True)
        evals = [(r.stage, r.directory) for r in rows if r.kind == "EvalJob"]
        table = scores_table(evals, f"HELMET scores of {name}"
                             + (f"/{evals[0][0]}" if len(evals) == 1 else ""))
        if table is not None:
            console.print(table)
        console.print()


def print_summary(console: Console, outcomes: list[StageOutcome]) -> None:
    """The summary table, each eval stage's scores and where the reports and logs are."""
    if not outcomes:
        return
    console.print()
    console.print(summary_table(outcomes))
    evals = [o for o in outcomes if o.row.kind == "EvalJob"]
    table = scores_table([(o.ref.stage, o.ref.directory) for o in evals],
                         "HELMET scores" + (f" of {evals[0].ref.stage} ({evals[0].ref.id})"
                                            if len(evals) == 1 else ""))
    if table is not None:
        console.print()
        console.print(table)
        for o in evals:
            base = StageDir(o.ref.directory).uri
            console.print(f"reports: {base}/{REPORT}, {base}/{SCORES_PNG}", markup=False,
                          soft_wrap=True)
    logs = [o for o in outcomes if o.wall_seconds is not None]
    if logs:
        console.print(f"worker logs: <stage dir>/{LOGS_DIR}/ "
                      f"(e.g. {Path(StageDir(logs[-1].ref.directory).uri) / LOGS_DIR})",
                      markup=False, soft_wrap=True)
