"""The HELMET task names a spec accepts, as plain data: name -> whether the task is synthetic.

``EvalJob.spec.tasks`` must name tasks from this table, and every task that is not synthetic
reads HELMET's released files, so it needs ``EvalJob.spec.dataDir`` (:mod:`prolong.spec.rules`).
The full task table (category, metric, output budget, prompt format) is
:data:`prolong.eval.tasks.HELMET_TASKS`; it is not imported here, so that validating a spec never
imports :mod:`prolong.eval`. ``tests/spec/test_helmet.py`` checks that the two agree exactly.
"""

from __future__ import annotations

HELMET_TASK_SYNTHETIC: dict[str, bool] = {
    # recall: generated locally at any length
    "json_kv": True,
    "ruler_mk_needle": True,
    "ruler_mv": True,
    "ruler_mk_uuid": True,
    # rag
    "nq": False,
    "triviaqa": False,
    "hotpotqa": False,
    "popqa": False,
    # rerank
    "msmarco": False,
    # icl
    "trec_coarse": False,
    "trec_fine": False,
    "nlu": False,
    "banking77": False,
    "clinc150": False,
    # longqa
    "narrativeqa": False,
    "infbench_qa": False,
    "infbench_mc": False,
    # summ
    "infbench_sum": False,
    "multi_lexsum": False,
    # cite
    "alce_asqa": False,
    "alce_qampari": False,
}
"""Every HELMET task name specs accept, in :data:`prolong.eval.tasks.HELMET_TASKS` order, mapped to
True when its samples are generated locally (no dataDir needed)."""

HELMET_SIZING_LENGTHS: tuple[int, ...] = (4096, 8192, 16384, 32768, 65536, 131072)
"""The lengths HELMET's configs give fixed amounts for (scripts/generate_configs.py: 4K ... 128K).
``sizing: helmet`` accepts only these for the tasks in :data:`HELMET_TABLED_TASKS`;
``tests/eval/test_sizing.py`` keeps them equal to the tables in :mod:`prolong.eval.sizing`."""

HELMET_TABLED_TASKS: frozenset[str] = frozenset({
    "json_kv", "nq", "triviaqa", "hotpotqa", "popqa", "msmarco",
    "trec_coarse", "trec_fine", "nlu", "banking77", "clinc150", "alce_asqa", "alce_qampari"})
"""Tasks whose HELMET amount (pairs, passages, shots, documents) is a per-length table; the
others (RULER, long documents) derive theirs from the length itself."""
