"""HELMET's tasks as data: name, category, metric, where the samples come from, output budget.

The table is the single list of task names that specs accept (``EvalJob.spec.tasks``). Numbers
follow RECIPE.md (HELMET paper and configs). Synthetic tasks are generated locally at any length;
the others read HELMET's released jsonl files from ``EvalJob.spec.dataDir``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

Category = Literal["recall", "rag", "rerank", "icl", "longqa", "summ", "cite"]


@dataclass(frozen=True)
class TaskInfo:
    name: str
    category: Category
    metric: str
    synthetic: bool
    """True when samples are generated locally (no data files needed)."""
    max_new_tokens: int
    shots: int
    """In-context demonstrations: HELMET uses 2 except for ICL (the many-shot prompt is the task)
    and RULER (no demos)."""


def _tasks(category: Category, metric: str, names: tuple[str, ...], max_new: int, *,
           synthetic: bool = False, shots: int = 2) -> dict[str, TaskInfo]:
    return {n: TaskInfo(n, category, metric, synthetic, max_new, shots) for n in names}


HELMET_TASKS: dict[str, TaskInfo] = {
    **_tasks("recall", "subem", ("json_kv",), 100, synthetic=True),
    **_tasks("recall", "ruler_recall", ("ruler_mk_needle", "ruler_mv"), 50, synthetic=True, shots=0),
    **_tasks("recall", "ruler_recall", ("ruler_mk_uuid",), 100, synthetic=True, shots=0),
    **_tasks("rag", "subem", ("nq", "triviaqa", "hotpotqa", "popqa"), 20),
    **_tasks("rerank", "ndcg@10", ("msmarco",), 200),
    **_tasks("icl", "accuracy", ("trec_coarse", "trec_fine", "nlu", "banking77", "clinc150"), 20,
             shots=0),
    **_tasks("longqa", "rougeL_f1", ("narrativeqa", "infbench_qa"), 100),
    **_tasks("longqa", "accuracy", ("infbench_mc",), 10),
    **_tasks("summ", "rougeL_f1", ("infbench_sum",), 1200),
    **_tasks("summ", "rougeL_f1", ("multi_lexsum",), 400),
    **_tasks("cite", "alce", ("alce_asqa", "alce_qampari"), 300),
}
"""Every HELMET task we know, by the name used in specs. Where HELMET scores with a model judge
(NarrativeQA, summarization) we report ROUGE-L F1 and name it as the stand-in."""

SYNTHETIC_TASKS = tuple(n for n, t in HELMET_TASKS.items() if t.synthetic)
