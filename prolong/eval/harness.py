"""The harness: tasks x lengths x samples -> per-sample records -> aggregated results.

Pure pieces first (:func:`work_items`, :func:`shard`, :func:`aggregate`), then the two that touch a
model or files (:func:`evaluate_items`: build each sample, generate, score).

A work item is (task, length, index); a worker builds the sample itself from the seed (synthetic)
or from dataDir (released), so shards travel as a few integers, never as 128K-token prompts.

Aggregation (HELMET's): a task's score at a length is the mean of its samples (x100); a category's
is the mean of its tasks; the average is the mean of the categories present. Each also gets a mean
over lengths.
"""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

from prolong.eval import loaders, synthetic
from prolong.eval.citations import CITE_METRIC, CITE_TASKS, cite_inputs, task_means
from prolong.eval.generate import Answerer
from prolong.eval.metrics import score_output
from prolong.eval.samples import PromptFormat, Sample, TooShort
from prolong.eval.sizing import Sizing
from prolong.eval.tasks import HELMET_TASKS, METRIC_NOTES, STANDIN, samples_for


@dataclass(frozen=True, order=True)
class WorkItem:
    task: str
    length: int
    index: int


def work_items(tasks: Sequence[str], lengths: Sequence[int], samples: int, icl_samples: int
               ) -> list[WorkItem]:
    """Every (task, length, index) of an eval, in spec order."""
    return [WorkItem(t, n, i) for t in tasks for n in lengths
            for i in range(samples_for(HELMET_TASKS[t], samples, icl_samples))]


def shard(items: Sequence[WorkItem], workers: int) -> list[list[WorkItem]]:
    """Deal items to ``workers`` shards so that each gets the same mix of tasks and lengths (and so
    about the same prefill cost): longest first, round-robin."""
    ordered = sorted(items, key=lambda w: (-w.length, w.task, w.index))
    out: list[list[WorkItem]] = [[] for _ in range(max(1, workers))]
    for k, item in enumerate(ordered):
        out[k % len(out)].append(item)
    return out


class SampleBuilder:
    """Builds samples for work items with one tokenizer (synthetic generators or loaders).
    ``sizing`` says how much context goes in (prolong.eval.sizing; HELMET's amounts by default);
    ``use_chat=False`` keeps every prompt plain (``useChatTemplate: false``)."""

    def __init__(self, tokenizer: Any, *, seed: int, data_dir: str | None = None,
                 haystack: Callable[[int], str] | None = None, sizing: Sizing | None = None,
                 use_chat: bool = True):
        self.fmt = PromptFormat(tokenizer, use_chat=use_chat)
        self.seed = seed
        self.data_dir = data_dir
        self.haystack = haystack
        self.sizing = sizing or Sizing()

    def build(self, item: WorkItem) -> Sample | None:
        info = HELMET_TASKS[item.task]
        if info.synthetic:
            return synthetic.generate(item.task, self.fmt, item.length, item.index, self.seed,
                                      haystack=self.haystack, sizing=self.sizing)
        if not self.data_dir:
            raise loaders.MissingData(f"task {item.task} needs dataDir")
        return loaders.load_sample(item.task, self.fmt, self.data_dir, item.length, item.index,
                                   self.seed, self.sizing)


def score_sample(sample: Sample, output: str) -> float:
    """The sample's score, 0-100."""
    info = HELMET_TASKS[sample.task]
    return 100.0 * score_output(sample.task, info.metric, output, sample.answers,
                                prefix=sample.prefix, extra=sample.extra)


JUDGE_FIELDS = ("question", "keypoints", "expert_summary")
"""What a model judge needs besides the output and the answers (prolong.eval.judge)."""


def record(sample: Sample, output: str) -> dict[str, Any]:
    """One sample's record. A task HELMET scores with a model judge starts out with the ROUGE-L
    stand-in (metric ``rougeL_f1_standin``) and its judge inputs; prolong.eval.judge replaces the
    score when a judge is configured."""
    info = HELMET_TASKS[sample.task]
    judged = info.metric.startswith("judge_")
    out = {"task": sample.task, "category": info.category,
           "metric": STANDIN if judged else info.metric,
           "length": sample.length, "index": sample.index, "depth": sample.depth,
           "prompt_hash": sample.prompt_hash, "prompt_tokens": sample.tokens,
           "truncated": bool(sample.extra.get("truncated")),
           "output": output, "answers": sample.answers, "score": score_sample(sample, output)}
    if judged:
        out["judge_inputs"] = {k: sample.extra.get(k) for k in JUDGE_FIELDS}
    if sample.task in CITE_TASKS and "passages" in sample.extra:
        # A plain prompt ends with the answer prefix; HELMET then reads it as part of the output.
        out["cite_inputs"] = cite_inputs(
            output, sample.extra["question"], sample.extra["passages"],
            completion_prefix=sample.prefix if sample.add_special_tokens else "")
    return out


def _build_or_skip(builder: SampleBuilder, item: WorkItem, skipped: list[dict[str, Any]]
                   ) -> Sample | None:
    try:
        return builder.build(item)
    except TooShort as exc:
        skipped.append({"task": item.task, "length": item.length, "index": item.index,
                        "skipped": str(exc)})
        return None


def evaluate_items(items: Iterable[WorkItem], builder: SampleBuilder, answerer: Answerer, *,
                   max_new_tokens: int | None = None, batch: int = 8,
                   progress: Callable[[int], None] | None = None) -> list[dict[str, Any]]:
    """Build, generate and score ``items``; returns one record per existing sample. Samples of one
    task and length are generated together, ``batch`` at a time (the generator batches inside).
    A sample whose fixed prompt alone exceeds its length (a length far below HELMET's 8K) is not
    scored: it comes back as a record with ``skipped`` (the reason) and no score."""
    groups: dict[tuple[str, int], list[WorkItem]] = defaultdict(list)
    for it in items:
        groups[(it.task, it.length)].append(it)
    out: list[dict[str, Any]] = []
    skipped: list[dict[str, Any]] = []
    for (task, _), group in groups.items():
        info = HELMET_TASKS[task]
        budget = max_new_tokens or info.max_new_tokens
        for start in range(0, len(group), batch):
            samples = [s for s in (_build_or_skip(builder, it, skipped)
                                   for it in group[start:start + batch]) if s]
            if not samples:
                continue
            outputs = answerer.generate(samples, budget, stop_new_line=info.stop_new_line)
            for s, o in zip(samples, outputs, strict=True):
                out.append(record(s, o))
            if progress is not None:
                progress(len(samples))
    return out + skipped


def _mean(xs: Iterable[float]) -> float | None:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else None


def _cite_parts(task: str, correctness: dict[str, float | None],
                cited: dict[tuple[str, int], list[tuple[float, float] | None]],
                lengths: Sequence[int]) -> dict[str, dict[str, float | None]]:
    """An ALCE task's three parts per length when its citations were scored (HELMET's Cite
    averages them, each a mean over its own samples); empty otherwise."""
    if not any(cited.get((task, n)) for n in lengths):
        return {}
    means = {str(n): task_means(cited[(task, n)]) for n in lengths if cited.get((task, n))}
    return {"correctness": dict(correctness),
            "citation_recall": {n: m[0] for n, m in means.items()},
            "citation_precision": {n: m[1] for n, m in means.items()}}


def aggregate(records: Sequence[dict[str, Any]], *, tasks: Sequence[str] | None = None,
              lengths: Sequence[int] | None = None) -> dict[str, Any]:
    """results.json's scores: per task, per category and on average, per length and overall."""
    tasks = list(tasks) if tasks is not None else sorted({r["task"] for r in records})
    lengths = sorted(lengths) if lengths is not None else sorted({r["length"] for r in records})
    by: dict[tuple[str, int], list[float]] = defaultdict(list)
    skipped: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    unjudged: dict[str, dict[str, int]] = defaultdict(lambda: defaultdict(int))
    metrics: dict[str, list[str]] = defaultdict(list)
    cited: dict[tuple[str, int], list[tuple[float, float] | None]] = defaultdict(list)
    for r in records:
        if "skipped" in r:
            skipped[r["task"]][str(r["length"])] += 1
            continue
        metrics[r["task"]].append(r.get("metric") or HELMET_TASKS[r["task"]].metric)
        if r.get("score") is None:  # the judge gave no usable answer: not scored, never a 0
            unjudged[r["task"]][str(r["length"])] += 1
            continue
        by[(r["task"], r["length"])].append(r["score"])
        if r.get("metric") == CITE_METRIC:
            c = r["citation"]
            cited[(r["task"], r["length"])].append(
                None if c["recall"] is None else (c["recall"], c["precision"]))
    task_scores: dict[str, Any] = {}
    for t in tasks:
        info = HELMET_TASKS[t]
        per = {str(n): _mean(by[(t, n)]) for n in lengths if by.get((t, n))}
        parts = _cite_parts(t, per, cited, lengths)
        if parts:
            per = {n: _mean(p[n] for p in parts.values()) for n in per
                   if all(n in p for p in parts.values())}
        used = list(dict.fromkeys(metrics.get(t) or [info.metric]))
        metric = used[0] if len(used) == 1 else "+".join(used)
        task_scores[t] = {"category": info.category, "metric": metric,
                          "metric_note": "; ".join(METRIC_NOTES.get(m, m) for m in used),
                          "samples": {str(n): len(by.get((t, n), [])) for n in lengths},
                          "by_length": per, "mean": _mean(per.values())}
        if parts:
            task_scores[t]["parts"] = parts
        if t in unjudged:
            task_scores[t]["unjudged"] = dict(unjudged[t])
    categories: dict[str, Any] = {}
    for cat in dict.fromkeys(HELMET_TASKS[t].category for t in tasks):
        members = [t for t in tasks if HELMET_TASKS[t].category == cat]
        per = {}
        for n in lengths:
            vals = [task_scores[t]["by_length"][str(n)] for t in members
                    if str(n) in task_scores[t]["by_length"]]
            if vals:
                per[str(n)] = _mean(vals)
        categories[cat] = {"tasks": members, "by_length": per, "mean": _mean(per.values())}
    avg = {}
    for n in lengths:
        vals = [c["by_length"][str(n)] for c in categories.values() if str(n) in c["by_length"]]
        if vals:
            avg[str(n)] = _mean(vals)
    return {"lengths": list(lengths), "tasks": task_scores, "categories": categories,
            "average": {"by_length": avg, "mean": _mean(avg.values())},
            "samples": sum(len(v) for v in by.values()),
            "skipped": {t: dict(v) for t, v in skipped.items()},
            "unjudged": {t: dict(v) for t, v in unjudged.items()}}


def run_local(tasks: Sequence[str], lengths: Sequence[int], samples: int, builder: SampleBuilder,
              answerer: Answerer, *, icl_samples: int | None = None,
              max_new_tokens: int | None = None) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """The whole harness in this process: (records, results)."""
    start = time.monotonic()
    items = work_items(tasks, lengths, samples, icl_samples or samples)
    records = evaluate_items(items, builder, answerer, max_new_tokens=max_new_tokens)
    records.sort(key=lambda r: (r["task"], r["length"], r["index"]))
    results = aggregate(records, tasks=tasks, lengths=lengths)
    results["seconds"] = time.monotonic() - start
    return records, results
