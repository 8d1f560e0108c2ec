"""A whole run, as ``prolongctl report`` and the end of ``prolongctl run`` read it back: one row
per finished stage (training and eval alike), the eval stages' scores side by side, and the
run's report.md. A stage's own figures come from :mod:`prolong.train.report`, its scores from
the eval stage's results.json (:mod:`prolong.eval.report`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong.eval.report import RESULTS
from prolong.spec import KIND_MODELS
from prolong.specfile import load
from prolong.stage.directory import COMPLETE, MANIFEST, StageDir, read_metrics
from prolong.stage.identity import pipeline_stages, standalone_stage
from prolong.train.report import fmt, training_figures


@dataclass(frozen=True)
class StageRow:
    """One finished stage of a run, as ``prolongctl report`` lists it."""

    stage: str
    id: str
    kind: str
    directory: str
    devices: int
    seconds: float
    """Step time (training) or generation time (eval)."""
    steps: int | None = None
    tokens: int | None = None
    first_loss: float | None = None
    last_loss: float | None = None
    tokens_per_s_per_device: float | None = None
    mfu_dense: float | None = None
    average_score: float | None = None

    @property
    def device_hours(self) -> float:
        return self.seconds * self.devices / 3600

    @property
    def tokens_per_s(self) -> float | None:
        """All devices together."""
        per = self.tokens_per_s_per_device
        return None if per is None else per * self.devices


def stage_row(directory: str) -> StageRow:
    """The row of one finished stage directory (its manifest, metrics and results)."""
    stage = StageDir(directory)
    manifest = stage.read_manifest()
    job = KIND_MODELS[manifest.kind].model_validate(manifest.spec)
    devices = job.spec.cluster.world_size
    if manifest.kind == "EvalJob":
        results = stage.read_json(RESULTS) if stage.exists(RESULTS) else {}
        return StageRow(manifest.stage, manifest.id, manifest.kind, stage.uri,
                        devices=int(results.get("workers") or devices),
                        seconds=float(results.get("seconds") or 0.0),
                        average_score=manifest.summary.get("average"))
    fig = training_figures(read_metrics(stage), devices)
    return StageRow(manifest.stage, manifest.id, manifest.kind, stage.uri, devices=devices,
                    seconds=fig.step_seconds, steps=fig.steps, tokens=fig.tokens,
                    first_loss=fig.first_loss, last_loss=fig.last_loss, tokens_per_s_per_device=fig.tokens_per_s_per_device,
                    mfu_dense=fig.mfu_dense)


def run_rows(target: str | Path) -> tuple[str, list[StageRow]]:
    """(run name, its finished stages in run order) of a spec file (job or pipeline), a pipeline
    directory (``<storageRoot>/<pipeline>``) or one stage directory. Raises ValueError for a
    target that holds no finished stage."""
    path = Path(target)
    if path.is_file():
        loaded = load(path)
        doc = loaded.document
        refs = (pipeline_stages(doc, loaded.jobs) if loaded.is_pipeline
                else [standalone_stage(doc)])
        dirs = [r.directory for r in refs]
        name = doc.metadata.name
    elif (path / MANIFEST).is_file():
        dirs, name = [str(path)], path.name
    elif path.is_dir():
        # A pipeline directory: its stages in the order they completed.
        found = [p for p in path.iterdir() if (p / COMPLETE).is_file()]
        dirs = [str(p) for p in sorted(found, key=lambda p: (p / COMPLETE).stat().st_mtime)]
        name = path.name
    else:
        raise ValueError(f"{target}: no such file or directory")
    rows = [stage_row(d) for d in dirs if StageDir(d).is_complete()]
    if not rows:
        raise ValueError(f"{target}: no finished stage (no stage directory with {COMPLETE})")
    return name, rows


@dataclass(frozen=True)
class ScoreRow:
    """One task's (or the average's) HELMET scores of one eval stage, by length."""

    task: str
    stage: str
    by_length: list[float | None]
    mean: float | None


def eval_score_rows(stages: Sequence[tuple[str, str]]) -> tuple[list[str], list[ScoreRow]]:
    """(lengths, rows) of eval stages given as (stage name, directory): for each task, then the
    average, one row per stage in the order given, so that several stages of one run (ProLong's
    ablation: the same eval with and without the long stage) read next to each other, length by
    length. Stages without results.json are left out."""
    results = [(name, StageDir(d).read_json(RESULTS)) for name, d in stages
               if StageDir(d).exists(RESULTS)]
    lengths = sorted({str(n) for _, r in results for n in r.get("lengths", [])}, key=int)
    tasks = list(dict.fromkeys(t for _, r in results for t in r.get("tasks", {})))
    rows = []
    for task in [*tasks, "average"]:
        for name, r in results:
            block = r.get("average", {}) if task == "average" else r.get("tasks", {}).get(task)
            if block is None:
                continue
            by_length = block.get("by_length", {})
            rows.append(ScoreRow(task, name, [by_length.get(n) for n in lengths],
                                 block.get("mean")))
    return lengths, rows


def eval_results(runs: Sequence[tuple[str, list[StageRow]]]) -> list[tuple[str, dict[str, Any]]]:
    """(label, results.json) of every eval stage of the runs, for one comparison plot; labelled
    by stage, or run/stage when there are several runs."""
    out = []
    for name, rows in runs:
        for r in rows:
            stage = StageDir(r.directory)
            if r.kind == "EvalJob" and stage.exists(RESULTS):
                out.append((r.stage if len(runs) == 1 else f"{name}/{r.stage}",
                            stage.read_json(RESULTS)))
    return out


def scores_markdown(stages: Sequence[tuple[str, str]]) -> list[str]:
    """The eval stages' scores as a markdown table (empty when none has results)."""
    lengths, rows = eval_score_rows(stages)
    if not rows:
        return []
    out = ["| task | eval stage | " + " | ".join(lengths) + " | mean |",
           "|---|---|" + "---:|" * (len(lengths) + 1)]
    out += [f"| {r.task} | {r.stage} | " + " | ".join(fmt(v, ".1f") for v in r.by_length)
            + f" | {fmt(r.mean, '.1f')} |" for r in rows]
    return [*out, ""]


def run_markdown(runs: Sequence[tuple[str, list[StageRow]]],
                 price_per_device_hour: float | None) -> str:
    """report.md of ``prolongctl report --out``: one table per run, then the runs side by side."""
    lines = ["# Run report", ""]
    for name, rows in runs:
        lines += [f"## {name}", "", "| stage | id | kind | steps | tokens | last loss | time (s) | "
                  "devices | device-hours | tok/s/device | MFU | cost | eval avg |",
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in rows:
            cost = None if price_per_device_hour is None else r.device_hours * price_per_device_hour
            lines.append(
                f"| {r.stage} | {r.id} | {r.kind} | {fmt(r.steps, ',')} | {fmt(r.tokens, ',')} | "
                f"{fmt(r.last_loss, '.4f')} | {r.seconds:,.1f} | {r.devices} | "
                f"{r.device_hours:,.4f} | {fmt(r.tokens_per_s_per_device)} | "
                f"{fmt(r.mfu_dense, '.1%')} | {fmt(cost, ',.2f')} | {fmt(r.average_score, '.1f')} |")
        total = sum(r.device_hours for r in rows)
        lines += ["", f"Total: {total:,.4f} device-hours"
                  + (f", {total * price_per_device_hour:,.2f} at {price_per_device_hour:g} per "
                     "device-hour" if price_per_device_hour is not None else "") + ".", ""]
        scores = scores_markdown([(r.stage, r.directory) for r in rows if r.kind == "EvalJob"])
        if scores:
            lines += [f"### HELMET scores of {name}", "", *scores]
    if len(runs) > 1:
        stages = list(dict.fromkeys(r.stage for _, rows in runs for r in rows))
        lines += ["## Side by side", "",
                  "| stage | " + " | ".join(f"{n}: last loss / device-h / eval avg"
                                            for n, _ in runs) + " |",
                  "|---|" + "---|" * len(runs)]
        for stage in stages:
            cells = []
            for _, rows in runs:
                r = next((x for x in rows if x.stage == stage), None)
                cells.append("-" if r is None else
                             f"{fmt(r.last_loss, '.4f')} / {r.device_hours:,.4f} / "
                             f"{fmt(r.average_score, '.1f')}")
            lines.append(f"| {stage} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["Time is step time for training stages (the steps' own seconds) and generation time "
              "for eval stages; device-hours = time x devices / 3600.", ""]
    return "\n".join(lines)
