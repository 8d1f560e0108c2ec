"""HELMET's metrics, each a pure function of (output, gold) returning a score in [0, 1].

- :func:`subem` -- substring exact match: some normalised gold answer occurs in the normalised
  output (normalisation as SQuAD/HELMET: lower case, no punctuation, no articles, single spaces).
- :func:`ruler_recall` -- fraction of the gold values found in the output (case-insensitive).
- :func:`ndcg_at_10` -- NDCG@10 of a ranking of passage ids against graded labels, linear gains and
  log2 discounts, computed by trec_eval's ``ndcg_cut.10`` (``pytrec_eval``, required); the
  tests hold :func:`ndcg_reference`, our own, equal to it.
- :func:`accuracy` -- exact match of the parsed answer (ICL labels, ∞Bench MC letters).
- :func:`rouge_l_f1` -- ROUGE-L F1 (``rouge-score``, stemming), best over the golds: HELMET's
  metric for ∞Bench QA, and the stand-in for NarrativeQA and summarization when no model judge is
  configured (prolong.eval.judge scores those).
- :func:`alce_correctness` -- ALCE answer correctness: ASQA STR-EM (fraction of questions whose
  short answers appear), QAMPARI recall-5. Citation recall and precision need an NLI model
  (HELMET: TRUE, T5-11B): prolong.eval.citations scores them after generation when
  ``nliModel`` is set.

HELMET also scores the output after parsing off an answer prefix and keeps the better of the two
(:func:`parse_output`); :func:`score_output` does the same.
"""

from __future__ import annotations

import math
import re
import string
from collections.abc import Sequence
from typing import Any

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = set(string.punctuation)


def normalize_answer(text: str) -> str:
    """Lower case, drop punctuation and articles, collapse whitespace (SQuAD's normalisation)."""
    text = "".join(ch for ch in text.lower() if ch not in _PUNCT)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def parse_output(output: str, prefix: str = "Answer:") -> str | None:
    """The answer part of an output: the rest of the line after ``prefix`` when the output repeats
    it (case-insensitive), else the first non-empty line; None for an empty output."""
    if prefix:
        m = re.search(re.escape(prefix.strip()) + r"(.*)(?:\n|$)", output, flags=re.IGNORECASE)
        if m is not None:
            return m.group(1).strip()
    for line in output.splitlines():
        if line.strip():
            return line.strip()
    return None


def subem(output: str, answers: Sequence[str]) -> float:
    out = normalize_answer(output)
    return float(any(normalize_answer(a) and normalize_answer(a) in out for a in answers))


def exact_match(output: str, answers: Sequence[str]) -> float:
    out = normalize_answer(output)
    return float(any(normalize_answer(a) == out for a in answers))


def ruler_recall(output: str, answers: Sequence[str]) -> float:
    if not answers:
        return 0.0
    low = output.lower()
    return sum(a.lower() in low for a in answers) / len(answers)


def accuracy(output: str, answers: Sequence[str], prefix: str = "Answer:") -> float:
    parsed = parse_output(output, prefix)
    return exact_match(parsed, answers) if parsed is not None else 0.0


def mc_accuracy(output: str, answers: Sequence[str], prefix: str = "Answer:") -> float:
    """∞Bench MC: answers = [letter, "letter. option text"]. Exact match of the (parsed) output with
    either, or the full "letter. option" anywhere in the output (HELMET's rule)."""
    if accuracy(output, answers, prefix) or exact_match(output, answers):
        return 1.0
    return float(len(answers) > 1 and answers[1].lower() in output.lower())


_RANK_CHAIN = re.compile(r"(\d+)(?:\s*>\s*(\d+))*")


def parse_ranking(output: str) -> list[str]:
    """Passage ids of a ranking output, best first, first occurrence of each kept -- HELMET's
    ``parse_rankings``: drop brackets and colons and every "id" (any case), then take the longest
    run of integers joined by ">" ("Ranking: ID3 > ID1 > ID2" -> 3, 1, 2). Passage ids are
    integers in HELMET's files, so nothing else can match a label."""
    text = re.sub(r"[\[\]:]", "", output).lower().replace("id", "")
    longest = max((m.group(0) for m in _RANK_CHAIN.finditer(text)), key=len, default="")
    ids: list[str] = []
    for part in longest.split(">"):
        part = part.strip()
        if part.isdigit() and part not in ids:
            ids.append(part)
    return ids


def ndcg_at_10(ranking: Sequence[str], qrels: dict[str, int], *, k: int = 10) -> float:
    """NDCG@k of ``ranking`` (ids, best first) against graded relevance ``qrels``: gain = label,
    discount log2(rank + 1), ideal from the labels sorted; ids not in qrels count 0. Repeated ids
    count once (their first place). No relevant passage at all: 0."""
    # A declared dependency, imported here only to keep it off the import path of the rest:
    # no silent fallback to ndcg_reference, which would turn the tests' cross-check of the two
    # into a self-comparison.
    import pytrec_eval

    seen: list[str] = []
    for doc in ranking:
        if doc not in seen:
            seen.append(doc)
    if not seen or not any(v > 0 for v in qrels.values()):
        return 0.0
    # trec_eval orders by score, then by doc id descending: distinct scores keep our order.
    run = {"q": {doc: float(len(seen) - i) for i, doc in enumerate(seen)}}
    evaluator = pytrec_eval.RelevanceEvaluator({"q": {d: int(v) for d, v in qrels.items()}},
                                               {f"ndcg_cut.{k}"})
    return float(evaluator.evaluate(run)["q"][f"ndcg_cut_{k}"])


def ndcg_reference(ranking: Sequence[str], qrels: dict[str, int], *, k: int = 10) -> float:
    """NDCG@k in plain Python (the definition trec_eval implements)."""
    seen: list[str] = []
    for doc in ranking:
        if doc not in seen:
            seen.append(doc)
    dcg = sum(qrels.get(doc, 0) / math.log2(i + 2) for i, doc in enumerate(seen[:k]))
    ideal = sorted((v for v in qrels.values() if v > 0), reverse=True)[:k]
    idcg = sum(v / math.log2(i + 2) for i, v in enumerate(ideal))
    return dcg / idcg if idcg > 0 else 0.0


def rouge_l_f1(output: str, answers: Sequence[str]) -> float:
    """ROUGE-L F1 (stemmed), best over the golds. Stand-in for HELMET's model judge."""
    from rouge_score import rouge_scorer

    if not output.strip():
        return 0.0
    scorer = _scorer(rouge_scorer)
    return max((scorer.score(a, output)["rougeL"].fmeasure for a in answers if a.strip()),
               default=0.0)


_SCORER: list[Any] = []


def _scorer(module: Any) -> Any:
    if not _SCORER:
        _SCORER.append(module.RougeScorer(["rougeL"], use_stemmer=True))
    return _SCORER[0]


_CITATION = re.compile(r"\[\d+(?:,\s*\d+)*\]")


def asqa_str_em(output: str, qa_pairs: Sequence[Sequence[str]]) -> float:
    """ALCE ASQA STR-EM: fraction of the disambiguated questions one of whose short answers occurs
    in the (normalised, citation-free) output."""
    if not qa_pairs:
        return 0.0
    out = normalize_answer(_CITATION.sub("", output))
    hits = sum(any(normalize_answer(a) and normalize_answer(a) in out for a in shorts)
               for shorts in qa_pairs)
    return hits / len(qa_pairs)


def qampari_recall5(output: str, answers: Sequence[Sequence[str]]) -> float:
    """ALCE QAMPARI recall-5: the output is a comma-separated list; an answer (a list of aliases)
    is found when an alias equals one item; min(found, 5) / min(len(answers), 5)."""
    if not answers:
        return 0.0
    text = _CITATION.sub("", output).rstrip().rstrip(".")
    preds = {normalize_answer(p) for p in text.split(",") if p.strip()}
    found = sum(any(normalize_answer(a) in preds for a in aliases) for aliases in answers)
    return min(found, 5) / min(len(answers), 5)


def alce_correctness(output: str, extra: dict[str, Any]) -> float:
    if "qa_pairs" in extra:
        return asqa_str_em(output, extra["qa_pairs"])
    return qampari_recall5(output, extra["answer_lists"])


def score_output(task: str, metric: str, output: str, answers: Sequence[str], *, prefix: str = "",
                 extra: dict[str, Any] | None = None) -> float:
    """The sample's score in [0, 1] by the task's metric; SubEM and RULER recall also try the output
    with its answer prefix parsed off and keep the better (as HELMET does)."""
    extra = extra or {}
    if metric == "subem":
        parsed = parse_output(output, prefix or "Answer:")
        return max(subem(output, answers), subem(parsed, answers) if parsed else 0.0)
    if metric == "ruler_recall":
        return ruler_recall(output, answers)
    if metric == "ndcg@10":
        return ndcg_at_10(parse_ranking(output), extra["qrels"])
    if metric == "accuracy":
        label_prefix = prefix or "Answer:"
        if task == "infbench_mc":
            return mc_accuracy(output, answers, label_prefix)
        return accuracy(output, answers, label_prefix)
    if metric in ("rougeL_f1", "judge_qa", "judge_summ"):  # judged tasks: the stand-in
        parsed = parse_output(output, prefix) if prefix else None
        best = rouge_l_f1(output, answers)
        return max(best, rouge_l_f1(parsed, answers)) if parsed else best
    if metric == "alce_correctness":
        return alce_correctness(output, extra)
    raise KeyError(f"unknown metric {metric}")
