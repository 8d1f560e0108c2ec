"""ALCE citation recall and precision (prolong.eval.citations) on hand-worked examples.

The entailment here is a rule (a premise entails a claim when it holds every word of it), so each
expected number below is worked out by hand from HELMET's rules; the splitter is NLTK's Punkt
algorithm without the English model's learned abbreviations (the model is not installed here),
which splits these plain sentences as the English model does."""

from __future__ import annotations

import re

import pytest
from nltk.tokenize.punkt import PunktSentenceTokenizer

from prolong.eval.citations import (
    CITE_METRIC,
    CiteInput,
    cite_inputs,
    cited_indices,
    claims,
    normalize_output,
    resolve,
    score_citations,
    score_records,
    strip_citations,
    task_means,
)
from prolong.eval.harness import SampleBuilder, WorkItem, aggregate, record
from prolong.eval.sizing import Sizing

SPLIT = PunktSentenceTokenizer().tokenize

DOCS = [{"title": "Paris", "text": "Paris is the capital of France."},
        {"title": "Berlin", "text": "Berlin is the capital of Germany."},
        {"title": "Rome", "text": "Rome hosts the Colosseum."},
        {"title": "Oslo", "text": "Oslo lies in Norway."}]


def _words(text: str) -> set[str]:
    return set(re.findall(r"[a-z0-9]+", text.lower()))


class WordEntails:
    """Entailed when the premise holds every word of the hypothesis; records every batch."""

    def __init__(self):
        self.batches: list[list[tuple[str, str]]] = []

    def __call__(self, pairs):
        self.batches.append(list(pairs))
        return [_words(h) <= _words(p) for p, h in pairs]


def _item(output: str, *, question: str = "q", qampari: bool = False, docs=DOCS) -> CiteInput:
    return CiteInput(normalize_output(output), question, dict(enumerate(docs)), len(docs),
                     qampari=qampari)


def test_a_hand_worked_asqa_answer():
    out = ("Paris is the capital of France [1][2]. Berlin is the capital of Germany [2]. "
           "Rome is big [3]. Madrid is in Spain. Okay [9].")
    entails = WordEntails()
    (score,) = score_citations([_item(out)], entails, split=SPLIT)
    checks = [c.to_json() for c in score.checks]
    assert [c["claim"] for c in checks] == [
        "Paris is the capital of France.", "Berlin is the capital of Germany.", "Rome is big.",
        "Madrid is in Spain.", "Okay."]
    # 1: doc 1 alone entails it (needed); doc 2 alone does not, and doc 1 without it still does:
    # doc 2 is not needed. 2: supported by its one citation. 3: unsupported. 4: no citation.
    # 5: cites passage 9 of 4.
    assert [c["supported"] for c in checks] == [True, True, False, False, False]
    assert checks[0]["needed"] == [True, False]
    assert checks[3]["rejected"] == "no citation"
    assert checks[4]["rejected"] == "cites past the passage list"
    assert score.recall == pytest.approx(2 / 5)
    assert score.citations == 4  # 2 + 1 + 1; rejected claims keep none
    assert score.precision == pytest.approx((1 + 1 + 0) / 4)
    # Joint passages, then single passages of the supported two-citation claim; the
    # leave-one-out set of passage 2 is passage 1 alone, already asked: each pair goes once.
    assert [len(b) for b in entails.batches] == [3, 2]


def test_both_passages_needed_when_neither_alone_supports():
    out = "Paris is the capital of Germany [1][2]."  # each passage holds half the words
    (score,) = score_citations([_item(out)], WordEntails(), split=SPLIT)
    assert score.recall == 1.0 and score.precision == 1.0
    assert score.checks[0].needed == [True, True]


def test_helmet_citation_quirks():
    # "[1, 2]" cites only passage 1; "[0]" reads index -1, the last passage of the full list.
    assert cited_indices("a [1, 2] b [0]") == [0, -1]
    assert resolve(-1, 4) == 3 and resolve(4, 4) is None and resolve(-1, 0) is None
    (zero,) = score_citations([_item("Oslo lies in Norway [0].")], WordEntails(), split=SPLIT)
    assert zero.recall == 1.0 and zero.precision == 1.0
    # At most three citations are kept; the fourth is neither asked about nor counted.
    entails = WordEntails()
    (four,) = score_citations([_item("Paris is the capital of France [1][2][3][4].")],
                              entails, split=SPLIT)
    assert four.checks[0].cited == [0, 1, 2] and four.citations == 3
    assert four.precision == pytest.approx(1 / 3)  # passages 2 and 3 are not needed
    # The third round: passages 1+3 without 2, passages 1+2 without 3.
    assert [len(b) for b in entails.batches] == [1, 3, 2]
    # One citation past the list rejects the claim, though [1] alone would support it.
    (past,) = score_citations([_item("Paris is the capital of France [1][5].")], WordEntails(),
                              split=SPLIT)
    assert past.recall == 0.0 and past.precision == 0.0 and past.citations == 0


def test_claim_text_and_output_normalisation():
    assert strip_citations("Paris [1][2] is | big [3].") == "Paris is big."
    assert normalize_output("\n\nParis [1]\n\nBerlin<|im_end|>", "Answer:") == \
        "Answer: Paris [1] Berlin"
    # Sentences under five characters are dropped; an output of such is left out, not 0.
    assert claims("Yes. It is [1].", "q", qampari=False, split=SPLIT) == ["It is [1]."]
    assert score_citations([_item("1. 2.")], WordEntails(), split=SPLIT) == [None]
    assert task_means([None, (1.0, 0.5), (0.0, 0.0)]) == (50.0, 25.0)
    assert task_means([None]) == (0.0, 0.0)


def test_a_hand_worked_qampari_list():
    question = "capital"
    out = "Paris [1], Berlin [2], Rome [3]."
    item = _item(out, question=question, qampari=True)
    assert claims(item.output, question, qampari=True, split=SPLIT) == \
        ["capital Paris [1]", "capital Berlin [2]", "capital Rome [3]"]
    (score,) = score_citations([item], WordEntails(), split=SPLIT)
    assert score.recall == pytest.approx(2 / 3) and score.precision == pytest.approx(2 / 3)


def test_alce_records_carry_their_cited_passages_and_score_into_cite(tokenizer, helmet_dir):
    builder = SampleBuilder(tokenizer, seed=0, data_dir=str(helmet_dir), sizing=Sizing("fill", 300))
    samples = [builder.build(WorkItem("alce_qampari", 2048, i)) for i in range(2)]
    passages = samples[0].extra["passages"]
    first = samples[0].answers[0]
    # Sample 0 cites passage 2 for its first answer and passage 40 (past the prompt's documents
    # but in the data file's list) for nothing; sample 1 cites nothing.
    outputs = [f"{first} [2], nothing [40]", samples[1].answers[0]]
    records = [record(s, o) for s, o in zip(samples, outputs, strict=True)]
    stored = records[0]["cite_inputs"]
    assert stored["num_docs"] == len(passages) == 40
    assert sorted(stored["docs"]) == ["1", "39"]
    assert stored["docs"]["1"]["text"] == passages[1]["text"]
    assert stored["question"] == samples[0].extra["question"]

    # Entailed exactly when the cited passage is passage 2: the first claim only.
    def entails(pairs):
        return [p.startswith(f"Title: {passages[1]['title']}\n{passages[1]['text']}")
                for p, _ in pairs]

    assert score_records(records, entails, split=SPLIT, model="rule") == 2
    assert all(r["metric"] == CITE_METRIC for r in records)
    assert records[0]["citation"]["recall"] == 0.5
    assert records[0]["citation"]["precision"] == 0.5
    assert records[1]["citation"]["recall"] == 0.0 and records[1]["citation"]["citations"] == 0
    results = aggregate(records, tasks=["alce_qampari"], lengths=[2048])
    task = results["tasks"]["alce_qampari"]
    correctness = sum(r["score"] for r in records) / 2
    assert task["parts"] == {"correctness": {"2048": correctness},
                             "citation_recall": {"2048": 25.0},
                             "citation_precision": {"2048": 25.0}}
    assert task["by_length"]["2048"] == pytest.approx((correctness + 25.0 + 25.0) / 3)
    assert task["metric"] == CITE_METRIC
    assert results["categories"]["cite"]["by_length"]["2048"] == task["by_length"]["2048"]


def test_plain_prompts_put_the_answer_prefix_in_front():
    stored = cite_inputs("Paris [1]", "q", DOCS, completion_prefix="Answer:")
    assert stored["completion_prefix"] == "Answer:" and list(stored["docs"]) == ["0"]
