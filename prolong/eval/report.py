"""Reports of eval results: markdown tables and score-vs-length plots, for one run or several.

One run (an eval stage's ``results.json``): ``report.md`` holds a category x length table with the
average (HELMET's headline layout) and a task x length table naming each metric (stand-ins are
named as such); ``scores.png`` plots score against length per category.

Several runs side by side (``prolongctl eval report DIR...``): one row per category and length,
one column per run; markdown + a PNG with one panel per category.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prolong.eval.tasks import METRIC_NOTES
from prolong.plots import png_bytes, pyplot


def comparability(spec: Any) -> dict[str, Any]:
    """What a run's scores can stand next to: the settings that decide it (sizing, judge, chat
    template, counting tokenizer) and, per category, None when comparable to published
    HELMET numbers or the reason it is not. Stored in results.json; reports print it."""
    reasons: dict[str, list[str]] = {c: [] for c in CATEGORY_TITLES}
    if spec.sizing != "helmet":
        for c in reasons:
            reasons[c].append("sizing fill (prompts filled with the model's tokenizer)")
    if not spec.use_chat_template:
        for c in ("longqa", "summ", "cite"):
            reasons[c].append("useChatTemplate false")
    if spec.judge is None:
        reasons["longqa"].append("NarrativeQA scored by the ROUGE-L stand-in (no judge)")
        reasons["summ"].append("ROUGE-L stand-in (no judge)")
    if spec.sizing == "helmet" and not spec.sizing_tokenizer:
        for c in ("longqa", "summ"):
            reasons[c].append("documents cut and filtered with the model's tokenizer, not "
                              "Llama-2's (sizingTokenizer unset)")
    # HELMET's Cite averages correctness with citation recall and precision (an NLI model, TRUE
    # T5-11B): without nliModel we compute correctness only.
    if spec.nli_model is None:
        reasons["cite"].append("citation recall and precision not computed (no nliModel)")
    return {"sizing": spec.sizing, "sizing_tokenizer": spec.sizing_tokenizer,
            "use_chat_template": spec.use_chat_template,
            "judge": spec.judge.model if spec.judge is not None else None,
            "nli_model": spec.nli_model,
            "not_comparable": {c: "; ".join(r) for c, r in reasons.items() if r}}


RESULTS = "results.json"
REPORT = "report.md"
SCORES_PNG = "scores.png"
SAMPLES = "samples.jsonl"

CATEGORY_TITLES = {"recall": "Recall", "rag": "RAG", "rerank": "Re-rank", "icl": "ICL",
                   "longqa": "LongQA", "summ": "Summ", "cite": "Cite"}


def length_label(n: int | str) -> str:
    n = int(n)
    if n >= 1024 and n % 1024 == 0:
        return f"{n // 1024}K"
    return str(n)


def fmt_score(v: float | None) -> str:
    return "-" if v is None else f"{v:.1f}"


def markdown_report(results: dict[str, Any], title: str = "HELMET results") -> str:
    lengths = [str(n) for n in results["lengths"]]
    head = "| | " + " | ".join(length_label(n) for n in lengths) + " | mean |"
    rule = "|---|" + "---:|" * (len(lengths) + 1)
    lines = [f"# {title}", ""]
    if results.get("model"):
        lines += [f"Model: `{results['model']}`", ""]
    lines += settings_lines(results)
    lines += ["## Categories", "", head, rule]
    for cat, c in results["categories"].items():
        lines.append(f"| {CATEGORY_TITLES.get(cat, cat)} | "
                     + " | ".join(fmt_score(c["by_length"].get(n)) for n in lengths)
                     + f" | {fmt_score(c['mean'])} |")
    avg = results["average"]
    lines.append("| **average** | " + " | ".join(fmt_score(avg["by_length"].get(n)) for n in lengths)
                 + f" | {fmt_score(avg['mean'])} |")
    lines += ["", "## Tasks", "", "| task | metric | " + " | ".join(length_label(n) for n in lengths)
              + " | mean |", "|---|---|" + "---:|" * (len(lengths) + 1)]
    for task, t in results["tasks"].items():
        lines.append(f"| {task} | {t['metric']} | "
                     + " | ".join(fmt_score(t["by_length"].get(n)) for n in lengths)
                     + f" | {fmt_score(t['mean'])} |")
    parted = {task: t["parts"] for task, t in results["tasks"].items() if t.get("parts")}
    if parted:
        lines += ["", "Cite parts (the task's score is their mean, as HELMET's Cite):", "",
                  "| task | part | " + " | ".join(length_label(n) for n in lengths) + " |",
                  "|---|---|" + "---:|" * len(lengths)]
        for task, parts in parted.items():
            lines += [f"| {task} | {part} | "
                      + " | ".join(fmt_score(per.get(n)) for n in lengths) + " |"
                      for part, per in parts.items()]
    unjudged = results.get("unjudged") or {}
    if unjudged:
        lines += ["", "Unjudged (no usable judge reply after retries; left out of the means): "
                  + "; ".join(f"{task} at {', '.join(f'{length_label(n)} x{c}' for n, c in per.items())}"
                              for task, per in unjudged.items()) + "."]
    skipped = results.get("skipped") or {}
    if skipped:
        lines += ["", "Not scored (the fixed prompt alone exceeds the length): " + "; ".join(
            f"{task} at {', '.join(f'{length_label(n)} x{c}' for n, c in per.items())}"
            for task, per in skipped.items()) + "."]
    used = dict.fromkeys(t["metric"] for t in results["tasks"].values())
    lines += ["", "Metrics: " + "; ".join(f"{m}: {METRIC_NOTES.get(m, m)}" for m in used) + ".",
              f"Scores are 0-100; {results.get('samples', 0)} samples; lengths are prompt tokens "
              "of the evaluated model's tokenizer.", ""]
    return "\n".join(lines)


MODEL_OWN = "the model's own"


def settings_lines(results: dict[str, Any]) -> list[str]:
    """The settings that decide comparability, and which categories are not comparable."""
    if "sizing" not in results:
        return ["Settings: not recorded (a run from before sizing was recorded): not comparable "
                "to published HELMET numbers.", ""]
    sizing = results["sizing"]
    lines = [f"Sizing: **{sizing}**" + ("" if sizing == "helmet" else
                                         " -- not comparable to published HELMET numbers")
             + f"; judge: {results.get('judge') or 'none (ROUGE-L stand-ins)'}"
             + f"; chat template: {'HELMET defaults' if results.get('use_chat_template', True) else 'off'}"
             + f"; counting tokenizer: {results.get('sizing_tokenizer') or MODEL_OWN}"
             + f"; citation NLI: {results.get('nli_model') or 'none (not computed)'}.", ""]
    for cat, why in (results.get("not_comparable") or {}).items():
        lines.append(f"- {CATEGORY_TITLES.get(cat, cat)}: not comparable ({why})")
    return [*lines, ""] if results.get("not_comparable") else lines


def scores_png(results: dict[str, Any], title: str = "HELMET") -> bytes:
    """Score against length, one line per category and the average (PNG bytes)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=100)
    lengths = [int(n) for n in results["lengths"]]
    series = {CATEGORY_TITLES.get(k, k): v["by_length"] for k, v in results["categories"].items()}
    series["average"] = results["average"]["by_length"]
    for name, per in series.items():
        xs = [n for n in lengths if str(n) in per]
        ax.plot(xs, [per[str(n)] for n in xs], marker="o",
                linewidth=2.5 if name == "average" else 1.5,
                linestyle="--" if name == "average" else "-", label=name)
    _length_axis(ax, lengths)
    ax.set_ylabel("score")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return png_bytes(fig)


def _length_axis(ax: Any, lengths: Sequence[int]) -> None:
    if len(lengths) > 1:
        ax.set_xscale("log", base=2)
    ax.set_xticks(list(lengths))
    ax.set_xticklabels([length_label(n) for n in lengths])
    ax.set_xlabel("context length (tokens)")
    ax.set_ylim(-2, 102)
    ax.grid(alpha=0.3)


# ---------------------------------------------------------------------------------------------
# Several runs
# ---------------------------------------------------------------------------------------------

def load_run(path: str | Path) -> tuple[str, dict[str, Any]]:
    """(name, results) of an eval directory (or a results.json file)."""
    p = Path(path)
    file = p if p.is_file() else p / RESULTS
    if not file.is_file():
        raise FileNotFoundError(f"{path}: no {RESULTS} (not an eval stage directory?)")
    results = json.loads(file.read_text())
    name = results.get("name") or (p.parent.name if p.is_file() else p.name)
    return name, results


def comparison_rows(runs: Sequence[tuple[str, dict[str, Any]]]) -> list[list[str]]:
    """[category, length, score of run 1, ...] rows, categories then the average, each with a
    'mean' row."""
    lengths = sorted({int(n) for _, r in runs for n in r["lengths"]})
    cats = list(dict.fromkeys(c for _, r in runs for c in r["categories"]))
    rows = []
    for cat in [*cats, "average"]:
        label = "average" if cat == "average" else CATEGORY_TITLES.get(cat, cat)
        for n in [*lengths, None]:
            cells = []
            for _, r in runs:
                block = r["average"] if cat == "average" else r["categories"].get(cat)
                if block is None:
                    cells.append("-")
                elif n is None:
                    cells.append(fmt_score(block["mean"]))
                else:
                    cells.append(fmt_score(block["by_length"].get(str(n))))
            rows.append([label, "mean" if n is None else length_label(n), *cells])
    return rows


def comparison_markdown(runs: Sequence[tuple[str, dict[str, Any]]]) -> str:
    names = [n for n, _ in runs]
    lines = ["# HELMET comparison", "", "| category | length | " + " | ".join(names) + " |",
             "|---|---|" + "---:|" * len(names)]
    lines += ["| " + " | ".join(row) + " |" for row in comparison_rows(runs)]
    return "\n".join(lines) + "\n"


def comparison_png(runs: Sequence[tuple[str, dict[str, Any]]]) -> bytes:
    plt = pyplot()
    cats = [*dict.fromkeys(c for _, r in runs for c in r["categories"]), "average"]
    cols = min(4, len(cats))
    rows = -(-len(cats) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4 * cols, 3.2 * rows), dpi=90, squeeze=False)
    lengths = sorted({int(n) for _, r in runs for n in r["lengths"]})
    for ax, cat in zip(axes.flat, cats, strict=False):
        for name, r in runs:
            block = r["average"] if cat == "average" else r["categories"].get(cat)
            if not block:
                continue
            xs = [n for n in lengths if str(n) in block["by_length"]]
            ax.plot(xs, [block["by_length"][str(n)] for n in xs], marker="o", label=name)
        _length_axis(ax, lengths)
        ax.set_title(CATEGORY_TITLES.get(cat, cat))
    for ax in list(axes.flat)[len(cats):]:
        ax.axis("off")
    axes.flat[0].legend(fontsize=7)
    return png_bytes(fig)


# ---------------------------------------------------------------------------------------------
# A run next to published numbers
# ---------------------------------------------------------------------------------------------

def load_paper(path: str | Path) -> dict[str, Any]:
    """Published HELMET scores (jobs/prolong-8b/helmet-paper.json): source, length, models ->
    {category: score, "average": score}."""
    try:
        paper = json.loads(Path(path).read_text())
        models, length, source = paper["models"], int(paper["length"]), paper["source"]
    except FileNotFoundError:
        raise FileNotFoundError(f"{path}: no such file (published scores)") from None
    except (ValueError, KeyError, TypeError) as exc:
        raise ValueError(f"{path}: not a published-scores file (needs source, length, models): "
                         f"{exc}") from None
    return {"source": source, "length": length, "models": models, "note": paper.get("note")}


def paper_rows(runs: Sequence[tuple[str, dict[str, Any]]], paper: dict[str, Any]
               ) -> list[list[str]]:
    """[category, run scores at the paper's length..., published scores..., comparable?] per
    category of the paper, then the average. A run's score is comparable when the run used
    HELMET's sizing and nothing else marks the category (judge, counting tokenizer, ...)."""
    n = str(paper["length"])
    cats = list(dict.fromkeys(c for m in paper["models"].values() for c in m if c != "average"))
    rows = []
    for cat in [*cats, "average"]:
        cells = []
        marks = []
        for name, r in runs:
            block = r["average"] if cat == "average" else r["categories"].get(cat)
            cells.append(fmt_score(block["by_length"].get(n)) if block else "-")
            if cat == "average":
                marks.append(f"{name}: average of the categories run")
                continue
            why = (r.get("not_comparable") or {}).get(cat) if "sizing" in r else \
                "settings not recorded"
            marks.append(f"{name}: " + ("comparable" if block and not why else
                                        f"not comparable ({why or 'not run'})"))
        cells += [fmt_score(m.get(cat)) for m in paper["models"].values()]
        rows.append([CATEGORY_TITLES.get(cat, cat), *cells, "; ".join(marks)])
    return rows


def paper_markdown(runs: Sequence[tuple[str, dict[str, Any]]], paper: dict[str, Any]) -> str:
    heads = [name for name, _ in runs] + list(paper["models"])
    lines = [f"# HELMET at {length_label(paper['length'])}: runs next to published scores", "",
             f"Source: {paper['source']}", ""]
    if paper.get("note"):
        lines += [f"Note: {paper['note']}", ""]
    lines += ["| category | " + " | ".join(heads) + " | comparable |",
              "|---|" + "---:|" * len(heads) + "---|"]
    lines += ["| " + " | ".join(row) + " |" for row in paper_rows(runs, paper)]
    return "\n".join(lines) + "\n"
