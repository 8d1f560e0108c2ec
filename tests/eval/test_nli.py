"""The NLI model path of citation scores (prolong.eval.nli) on a tiny T5 (the ``tiny_nli``
fixture: a word-level tokenizer and a 2-layer T5 trained for seconds to answer "1" / "0" on four
pairs, saved to a temporary directory and loaded back the way an eval loads nliModel). It knows
nothing about entailment; it proves the mechanics: loading, TRUE's input format, batching, decoding to
booleans, long inputs, and the scores reaching ALCE records."""

from __future__ import annotations

import pytest

from prolong.eval.citations import CITE_METRIC, cite_inputs
from prolong.eval.nli import (
    CitationDataMissing,
    Seq2SeqEntailment,
    english_splitter,
    preflight,
    score_shard,
)
from tests.eval.conftest import NLI_TRAIN as TRAIN


def test_the_model_answers_booleans_in_batches_of_any_size(tiny_nli):
    pairs = [(p, h) for p, h, _ in TRAIN]
    want = [y == "1" for *_, y in TRAIN]
    for batch_size in (1, 3, 16):
        got = Seq2SeqEntailment(str(tiny_nli), batch_size=batch_size)(pairs)
        assert got == want and all(isinstance(x, bool) for x in got)
    # HELMET never truncates: a premise far past T5's nominal 512 tokens still gets an answer.
    long = [(" ".join(["grass is green"] * 300), "grass is green"), *pairs]
    got = Seq2SeqEntailment(str(tiny_nli), batch_size=2)(long)
    assert len(got) == 5 and all(isinstance(x, bool) for x in got) and got[1:] == want


def test_a_shard_of_qampari_records_gets_citation_scores(tiny_nli):
    docs = [{"title": "0", "text": "the sky is blue"}, {"title": "1", "text": "cats bark"}]
    records = [{"task": "alce_qampari", "output": out, "score": 0.0,
                "cite_inputs": cite_inputs(out, "q", docs)}
               for out in ("x [1], y [2]", "nothing cited")]
    scored = score_shard(records, {"nli_model": str(tiny_nli), "device": "cpu"})
    for r in scored:
        c = r["citation"]
        assert r["metric"] == CITE_METRIC and c["nli_model"] == str(tiny_nli)
        assert 0.0 <= c["recall"] <= 1.0 and 0.0 <= c["precision"] <= 1.0
        assert all(isinstance(ch["supported"], bool) for ch in c["checks"])
    assert scored[0]["citation"]["citations"] == 2 and scored[1]["citation"]["citations"] == 0
    assert scored[1]["citation"]["recall"] == 0.0  # no citation: unsupported, model not asked


def test_citation_scores_follow_what_the_model_was_trained_on(tiny_nli):
    """The scores themselves, not just their range: a claim cited to a passage the tiny model
    was trained to entail it scores recall and precision 1.0; cited to a passage it was trained
    to contradict it, 0.0."""
    docs = [{"title": "0", "text": "the sky is blue"}, {"title": "1", "text": "grass is green"}]
    scores = {}
    for out in ("is blue [1]", "is blue [2]"):  # QAMPARI's claim: "the sky" + " is blue"
        record = {"task": "alce_qampari", "output": out, "score": 0.0,
                  "cite_inputs": cite_inputs(out, "the sky", docs)}
        (scored,) = score_shard([record], {"nli_model": str(tiny_nli), "device": "cpu"})
        c = scored["citation"]
        assert [ch["claim"] for ch in c["checks"]] == ["the sky is blue"], c
        scores[out] = (c["recall"], c["precision"])
    assert scores == {"is blue [1]": (1.0, 1.0), "is blue [2]": (0.0, 0.0)}, scores


def test_preflight_names_what_is_missing(tmp_path, tiny_nli):
    preflight(None, ["alce_asqa"])  # no NLI model: citations are not computed, nothing to check
    preflight(str(tmp_path), ["nq"])  # no ALCE task: the model is never loaded
    with pytest.raises(CitationDataMissing, match=r"^nliModel .*: not a local model directory"):
        preflight(str(tmp_path / "absent"), ["alce_qampari"])
    (tmp_path / "config-only").mkdir()
    (tmp_path / "config-only" / "config.json").write_text('{"model_type": "t5"}')
    # transformers builds an empty T5 tokenizer here; it is refused, not used.
    with pytest.raises(CitationDataMissing, match=r"config-only: its tokenizer has no vocab") \
            as err:
        preflight(str(tmp_path / "config-only"), ["alce_qampari"])
    assert "\n" not in str(err.value)
    preflight(str(tiny_nli), ["alce_qampari"])  # QAMPARI splits at commas: no NLTK data needed
    try:
        english_splitter()
    except CitationDataMissing as exc:  # this machine has no punkt_tab: ASQA is refused
        assert "punkt_tab" in str(exc) and "\n" not in str(exc)
        with pytest.raises(CitationDataMissing, match="punkt_tab"):
            preflight(str(tiny_nli), ["alce_asqa"])
    else:
        preflight(str(tiny_nli), ["alce_asqa"])
