"""HELMET evaluation: task definitions, generators, metrics, reports.

- :mod:`~prolong.eval.tasks` -- the task table (names, categories, metrics, output budgets).
- :mod:`~prolong.eval.samples` -- the Sample record, prompt rendering and length fitting.
- :mod:`~prolong.eval.synthetic` -- JSON KV and RULER generators at any length.
- :mod:`~prolong.eval.loaders` -- HELMET's released data files (formats from its public code).
- :mod:`~prolong.eval.metrics` -- SubEM, RULER recall, NDCG@10, accuracy, ROUGE-L F1, ALCE.
- :mod:`~prolong.eval.generate` -- greedy generation (transformers; vLLM on a GPU).
- :mod:`~prolong.eval.harness` -- work items, shards, scoring and aggregation.
- :mod:`~prolong.eval.report` -- report.md, scores.png and multi-run comparisons.
- :mod:`~prolong.eval.job` -- an EvalJob stage on Ray (called by ``prolongctl run``).
- :mod:`~prolong.eval.cli` -- ``prolongctl eval report``.
"""
