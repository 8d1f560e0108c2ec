"""What a training stage cost and how it went: ``report.md`` and ``curves.png`` in its directory,
and the figures ``prolongctl report`` puts side by side.

Every figure is computed from ``metrics.jsonl`` (one row per step, replayed steps replaced):

- *step time* is the sum of the steps' wall times (``wall_s``: the data wait, the optimizer step
  and the checkpoint saves; rows written before wall_s existed count their ``seconds``), without
  start-up or data preparation; *device-hours* = step time x devices / 3600; the data wait and
  the saves are also shown alone;
- *tokens/s per device* = tokens / step time / devices;
- MFU is the mean of the per-step values (only on GPUs: a CPU has no rated peak here), in both
  conventions (dense 6N + 12LHdS, and document-causal).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prolong.eval.report import RESULTS
from prolong.plots import png_bytes, pyplot
from prolong.spec import KIND_MODELS
from prolong.specfile import load
from prolong.stage.directory import COMPLETE, MANIFEST, StageDir, read_metrics
from prolong.stage.identity import pipeline_stages, standalone_stage

TRAIN_REPORT = "report.md"
CURVES_PNG = "curves.png"


@dataclass(frozen=True)
class TrainingFigures:
    """The headline figures of one training stage."""

    steps: int
    tokens: int
    step_seconds: float
    devices: int
    first_loss: float | None
    """Mean loss of the first loss_window(steps) steps (last_loss: of the last ones)."""
    last_loss: float | None
    min_loss: float | None
    mfu_dense: float | None
    mfu_doc_causal: float | None
    tokens_per_domain: dict[str, int]
    data_seconds: float = 0.0
    """Of step_seconds: waiting for the loader."""
    save_seconds: float = 0.0
    """Of step_seconds: writing checkpoints."""

    @property
    def device_hours(self) -> float:
        return self.step_seconds * self.devices / 3600

    @property
    def tokens_per_s(self) -> float | None:
        return self.tokens / self.step_seconds if self.step_seconds > 0 else None

    @property
    def tokens_per_s_per_device(self) -> float | None:
        rate = self.tokens_per_s
        return None if rate is None else rate / self.devices

    def cost(self, price_per_device_hour: float | None) -> float | None:
        return None if price_per_device_hour is None else self.device_hours * price_per_device_hour


def _mean(values: Sequence[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return sum(known) / len(known) if known else None


def loss_window(steps: int) -> int:
    """Steps averaged for the first and last loss: a tenth of the run, 1 to 10 steps. One step's
    loss depends on which domains its rows came from (a row of retrieval documents scores far
    below a row of code), so a single first or last step can say the opposite of the trend."""
    return max(1, min(10, steps // 10))


def training_figures(records: Sequence[dict[str, Any]], devices: int) -> TrainingFigures:
    losses = [r["loss"] for r in records]
    k = loss_window(len(losses))
    return TrainingFigures(
        steps=len(records), tokens=sum(int(r["tokens"]) for r in records),
        step_seconds=sum(float(r.get("wall_s") or r["seconds"]) for r in records),
        data_seconds=sum(float(r.get("data_s", 0.0)) for r in records),
        save_seconds=sum(float(r.get("save_s", 0.0)) for r in records), devices=devices,
        first_loss=_mean(losses[:k]), last_loss=_mean(losses[-k:]) if losses else None,
        min_loss=min(losses) if losses else None,
        mfu_dense=_mean([r.get("mfu_dense") for r in records]),
        mfu_doc_causal=_mean([r.get("mfu_doc_causal") for r in records]),
        tokens_per_domain=dict(records[-1].get("tokens_per_domain", {})) if records else {})


def fmt(value: float | None, spec: str = ",.0f", missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def training_markdown(title: str, fig: TrainingFigures, *, device: str) -> str:
    """``report.md`` of a training stage."""
    total = sum(fig.tokens_per_domain.values()) or 1
    lines = [
        f"# {title}", "",
        "| figure | value |", "|---|---|",
        f"| steps | {fig.steps:,} |",
        f"| tokens | {fig.tokens:,} |",
        f"| loss (first -> last, means of {loss_window(fig.steps)} steps; min) | "
        f"{fmt(fig.first_loss, '.4f')} -> "
        f"{fmt(fig.last_loss, '.4f')} (min {fmt(fig.min_loss, '.4f')}) |",
        f"| devices | {fig.devices} x {device} |",
        f"| step time | {fmt(fig.step_seconds, ',.1f')} s |",
        f"| of which data wait; checkpoint saves | {fig.data_seconds:,.1f} s; "
        f"{fig.save_seconds:,.1f} s |",
        f"| device-hours | {fmt(fig.device_hours, ',.4f')} |",
        f"| tokens/s (all devices) | {fmt(fig.tokens_per_s)} |",
        f"| tokens/s per device | {fmt(fig.tokens_per_s_per_device)} |",
        f"| MFU, dense 6N+12LHdS | {fmt(fig.mfu_dense, '.1%', 'n/a (no rated peak for ' + device + ')')} |",
        f"| MFU, document-causal | {fmt(fig.mfu_doc_causal, '.1%', 'n/a')} |",
        "",
        "Tokens per domain:", "",
        "| domain | tokens | share |", "|---|---|---|",
        *(f"| {d} | {n:,} | {n / total:.1%} |" for d, n in fig.tokens_per_domain.items()),
        "",
        "Step time is the sum of the steps' wall times (data wait and checkpoint saves "
        "included, start-up not); tokens/s and MFU are over it; "
        "device-hours = step time x devices / 3600. Curves: curves.png.", ""]
    return "\n".join(lines)


def curves_png(records: Sequence[dict[str, Any]], title: str) -> bytes:
    """Loss, learning rate, grad norm, tokens/s, MFU and tokens per domain against step."""
    plt = pyplot()
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), dpi=100)
    steps = [r["step"] for r in records]

    def panel(ax: Any, key: str, label: str, *, log: bool = False) -> None:
        pairs = [(s, r[key]) for s, r in zip(steps, records, strict=True) if r.get(key) is not None]
        if pairs:
            ax.plot([p[0] for p in pairs], [p[1] for p in pairs], linewidth=1.5)
            if log and all(p[1] > 0 for p in pairs):
                ax.set_yscale("log")
        else:
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set_title(label)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)

    panel(axes[0][0], "loss", "loss (token-averaged CE)")
    panel(axes[0][1], "lr", "learning rate")
    panel(axes[0][2], "grad_norm", "gradient norm (before clipping)")
    panel(axes[1][0], "tokens_per_s", "tokens/s (all devices)")
    ax = axes[1][1]
    measured = False
    for key, label in (("mfu_dense", "dense"), ("mfu_doc_causal", "document-causal")):
        pairs = [(s, r[key]) for s, r in zip(steps, records, strict=True) if r.get(key) is not None]
        if pairs:
            measured = True
            ax.plot([p[0] for p in pairs], [100 * p[1] for p in pairs], label=label)
    if measured:
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "MFU: GPU runs only\n(no rated peak for a CPU)", ha="center",
                va="center", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
    ax.set_title("MFU (%)")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    ax = axes[1][2]
    domains = list(dict.fromkeys(d for r in records for d in r.get("tokens_per_domain", {})))
    for d in domains:
        ax.plot(steps, [r.get("tokens_per_domain", {}).get(d, 0) for r in records], label=d)
    if domains:
        ax.legend(fontsize=8)
    ax.set_title("tokens consumed per domain")
    ax.set_xlabel("step")
    ax.grid(alpha=0.3)
    fig.suptitle(title)
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------
# A whole run: `prolongctl report`
# ---------------------------------------------------------------------------------------------

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
