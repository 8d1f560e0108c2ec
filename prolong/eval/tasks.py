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
    chat: bool = False
    """Wrap the prompt in the tokenizer's chat template (HELMET's ``use_chat_template``: true for
    long QA, summarization and citation, false for recall, RAG, re-rank and ICL). A tokenizer
    without a chat template gets the plain prompt."""
    stop_new_line: bool = False
    """Cut the output at its first newline (HELMET's ``stop_new_line``: RAG, re-rank, ICL)."""
    context_reserve: int = 0
    """Released long-document tasks: tokens HELMET keeps free of the document (instructions, demos,
    answer) -- its dataset names encode the document budget, e.g. narrativeqa_130772 at 131072.
    We size the document to the whole prompt instead (see prolong.eval.loaders); this number is
    the floor of what stays free."""


def _tasks(category: Category, metric: str, names: tuple[str, ...], max_new: int, *,
           synthetic: bool = False, shots: int = 2, chat: bool = False,
           stop_new_line: bool = False, reserve: int = 0) -> dict[str, TaskInfo]:
    return {n: TaskInfo(n, category, metric, synthetic, max_new, shots, chat, stop_new_line,
                        reserve) for n in names}


HELMET_TASKS: dict[str, TaskInfo] = {
    **_tasks("recall", "subem", ("json_kv",), 100, synthetic=True),
    **_tasks("recall", "ruler_recall", ("ruler_mk_needle", "ruler_mv"), 50, synthetic=True, shots=0),
    **_tasks("recall", "ruler_recall", ("ruler_mk_uuid",), 100, synthetic=True, shots=0),
    **_tasks("rag", "subem", ("nq", "triviaqa", "hotpotqa", "popqa"), 20, stop_new_line=True),
    **_tasks("rerank", "ndcg@10", ("msmarco",), 200, stop_new_line=True),
    **_tasks("icl", "accuracy", ("trec_coarse", "trec_fine", "nlu", "banking77", "clinc150"), 20,
             shots=0, stop_new_line=True),
    # HELMET's configs (longqa.yaml): 100 new tokens for NarrativeQA, 10 for both InfBench tasks.
    **_tasks("longqa", "judge_qa", ("narrativeqa",), 100, chat=True, reserve=300),
    **_tasks("longqa", "rougeL_f1", ("infbench_qa",), 10, chat=True, reserve=210),
    **_tasks("longqa", "accuracy", ("infbench_mc",), 10, chat=True, reserve=210),
    **_tasks("summ", "judge_summ", ("infbench_sum",), 1200, chat=True, reserve=1400),
    **_tasks("summ", "judge_summ", ("multi_lexsum",), 400, chat=True, reserve=700),
    **_tasks("cite", "alce_correctness", ("alce_asqa", "alce_qampari"), 300, chat=True),
}
"""Every HELMET task we know, by the name used in specs. NarrativeQA and summarization are scored
by a model judge (``EvalJob.spec.judge``, prolong.eval.judge); without one their records carry
ROUGE-L F1 under the metric name ``rougeL_f1_standin``. ALCE scores answer correctness and, when
``EvalJob.spec.nliModel`` names an NLI model, citation recall and precision (metric ``alce_cite``,
prolong.eval.citations); without one, correctness only, and reports say so."""

STANDIN = "rougeL_f1_standin"
"""The metric of a judged task's sample that no judge scored (no judge configured)."""

METRIC_NOTES: dict[str, str] = {
    "subem": "substring exact match",
    "ruler_recall": "fraction of gold values in the output",
    "ndcg@10": "NDCG@10 of the parsed ranking",
    "accuracy": "exact match of the parsed answer",
    "rougeL_f1": "ROUGE-L F1",
    STANDIN: "ROUGE-L F1, a stand-in: HELMET scores this task with a GPT-4o judge",
    "judge_qa": "model judge: fluency x correctness (0-3), x100/3 (HELMET's gpt-4-score)",
    "judge_summ": "model judge: fluency x F1 of key-point recall and precision, x100 "
                  "(HELMET's gpt-4-f1)",
    "alce_correctness": "ASQA STR-EM / QAMPARI recall-5 only: citation recall and precision not "
                        "computed (HELMET's Cite averages all six)",
    "alce_cite": "mean of ASQA STR-EM / QAMPARI recall-5, citation recall and citation precision "
                 "(NLI model; HELMET's Cite)",
}
"""How each metric is reported: what the report prints beside a score."""


def samples_for(info: TaskInfo, samples: int, icl_samples: int) -> int:
    """Samples per length of one task (HELMET: 100, 500 for ICL)."""
    return icl_samples if info.category == "icl" else samples

SYNTHETIC_TASKS = tuple(n for n, t in HELMET_TASKS.items() if t.synthetic)
