"""``prolongctl eval ...``: the evaluation sub-commands (mounted by prolong.cli as ``eval``)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from prolong.cli_errors import err
from prolong.eval.report import (
    comparison_markdown,
    comparison_png,
    comparison_rows,
    load_paper,
    load_run,
    paper_markdown,
    paper_rows,
)

eval_app = typer.Typer(
    help="HELMET evaluation results: compare eval stage directories.",
    no_args_is_help=True,
    add_completion=False,
)


@eval_app.callback()
def _group() -> None:
    """HELMET evaluation results: compare eval stage directories."""
    # A callback keeps `report` a sub-command even while it is the only one.


@eval_app.command("report")
def report(
    dirs: Annotated[list[Path], typer.Argument(help="Eval stage directories (or results.json files).",
                                               show_default=False)],
    out: Annotated[Path | None, typer.Option(
        "--out", "-o", help="Also write comparison.md and comparison.png into this directory.")] = None,
    paper: Annotated[Path | None, typer.Option(
        "--paper", help="Published scores to show beside the runs, with which of ours are "
                        "comparable (e.g. jobs/prolong-8b/helmet-paper.json).")] = None,
) -> None:
    """Put eval runs side by side: one row per category and length, one column per run.

    \b
    Examples:
      prolongctl eval report runs/quickstart/eval-*/
      prolongctl eval report runs/a/eval-1234abcd runs/b/eval-5678ef90 --out reports/
    """
    console = Console(highlight=False, soft_wrap=True)
    runs = []
    published = None
    try:
        for d in dirs:
            runs.append(load_run(d))
        if paper is not None:
            published = load_paper(paper)
    except (FileNotFoundError, ValueError) as exc:
        err.print(f"prolongctl eval report: {exc}", markup=False)  # one line, never wrapped
        raise typer.Exit(2) from None
    names = _unique([name for name, _ in runs])
    runs = [(n, r) for n, (_, r) in zip(names, runs, strict=True)]
    table = Table(title="HELMET (scores 0-100)", show_edge=False, pad_edge=False)
    table.add_column("category", no_wrap=True)
    table.add_column("length", justify="right", no_wrap=True)
    for name in names:
        table.add_column(name, justify="right")
    for row in comparison_rows(runs):
        style = "bold" if row[0] == "average" else None
        table.add_row(*row, style=style)
    console.print(table)
    if published is not None:
        ptable = Table(title=f"Published HELMET scores ({published['source'][:60]}...)",
                       show_edge=False, pad_edge=False)
        for head in ["category", *names, *published["models"], "comparable"]:
            ptable.add_column(head)
        for row in paper_rows(runs, published):
            ptable.add_row(*row)
        console.print(ptable)
    if out is not None:
        out.mkdir(parents=True, exist_ok=True)
        if published is not None:
            (out / "paper.md").write_text(paper_markdown(runs, published))
        (out / "comparison.md").write_text(comparison_markdown(runs))
        (out / "comparison.png").write_bytes(comparison_png(runs))
        console.print(f"wrote {out / 'comparison.md'} and {out / 'comparison.png'}", markup=False)


def _unique(names: list[str]) -> list[str]:
    seen: dict[str, int] = {}
    out = []
    for n in names:
        seen[n] = seen.get(n, 0) + 1
        out.append(n if seen[n] == 1 else f"{n} ({seen[n]})")
    return out
