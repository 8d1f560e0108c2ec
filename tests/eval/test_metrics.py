"""Metric functions against hand-computed cases."""

from __future__ import annotations

import math
import random

import pytest

from prolong.eval import metrics as M


def test_normalize_and_subem():
    assert M.normalize_answer("The  Eiffel-Tower!") == "eiffeltower"
    assert M.subem("It is the Eiffel Tower, in Paris.", ["eiffel tower"]) == 1.0
    assert M.subem("It is in Paris.", ["eiffel tower", "Paris"]) == 1.0
    assert M.subem("London", ["eiffel tower", "Paris"]) == 0.0
    assert M.subem("", ["Paris"]) == 0.0  # empty output
    assert M.subem("anything", [""]) == 0.0  # an empty gold never matches


def test_ruler_recall_counts_values():
    assert M.ruler_recall("1234567 and 7654321", ["1234567", "7654321", "1111111", "2222222"]) == 0.5
    assert M.ruler_recall("", ["1234567"]) == 0.0
    assert M.ruler_recall("ABC-def", ["abc-DEF"]) == 1.0


def test_parse_output_and_accuracy():
    assert M.parse_output(" 17\nmore text", "label:") == "17"
    assert M.parse_output("label: 17 \n", "label:") == "17"
    assert M.parse_output("", "label:") is None
    assert M.accuracy(" 17", ["17"], "label:") == 1.0
    assert M.accuracy(" 171", ["17"], "label:") == 0.0
    assert M.accuracy("", ["17"], "label:") == 0.0
    assert M.mc_accuracy(" B", ["B", "B. the harbor"]) == 1.0
    assert M.mc_accuracy("I think B. the harbor is right", ["B", "B. the harbor"]) == 1.0
    assert M.mc_accuracy(" C", ["B", "B. the harbor"]) == 0.0


def test_parse_ranking():
    assert M.parse_ranking(" 3 > 1 > 2") == ["3", "1", "2"]
    assert M.parse_ranking("Ranking: [ID: 7] > ID: 4 > 7 > 9\nignored > 1") == ["7", "4", "9"]
    assert M.parse_ranking("") == []


def test_ndcg_hand_computed():
    qrels = {"a": 1, "b": 0, "c": 2}
    # ranking a, b, c: DCG = 1/log2(2) + 0 + 2/log2(4) = 2; ideal c, a: 2 + 1/log2(3)
    assert M.ndcg_at_10(["a", "b", "c"], qrels) == pytest.approx(2 / (2 + 1 / math.log2(3)))
    assert M.ndcg_at_10(["c", "a", "b"], qrels) == pytest.approx(1.0)
    assert M.ndcg_at_10([], qrels) == 0.0  # empty output
    assert M.ndcg_at_10(["x", "y"], qrels) == 0.0  # unknown ids
    assert M.ndcg_at_10(["a"], {"a": 0, "b": 0}) == 0.0  # nothing relevant at all


def test_ndcg_ties_and_repeats():
    # Tied gold labels: either order of the two relevant ids is ideal.
    qrels = {"a": 1, "b": 1, "c": 0}
    assert M.ndcg_at_10(["b", "a", "c"], qrels) == pytest.approx(1.0)
    assert M.ndcg_at_10(["a", "b", "c"], qrels) == pytest.approx(1.0)
    # c first: DCG = 1/log2(3) + 1/log2(4); IDCG = 1 + 1/log2(3)
    expect = (1 / math.log2(3) + 0.5) / (1 + 1 / math.log2(3))
    assert M.ndcg_at_10(["c", "a", "b"], qrels) == pytest.approx(expect)
    # A repeated id counts once, at its first place.
    assert M.ndcg_at_10(["c", "c", "a", "b"], qrels) == pytest.approx(expect)


def test_ndcg_cuts_at_10():
    qrels = {str(i): 0 for i in range(12)} | {"11": 3}
    ranking = [str(i) for i in range(12)]  # the only relevant id at rank 12: outside the cut
    assert M.ndcg_at_10(ranking, qrels) == 0.0
    assert M.ndcg_at_10(["11", *ranking[:11]], qrels) == pytest.approx(1.0)


def test_ndcg_matches_the_reference_on_random_cases():
    """trec_eval (pytrec_eval, required: ndcg_at_10 has no fallback) against our reference."""
    import pytrec_eval

    assert pytrec_eval.RelevanceEvaluator  # the real package, not a stub module
    rng = random.Random()
    for _ in range(50):
        ids = [str(i) for i in range(rng.randint(1, 25))]
        qrels = {d: rng.choice([0, 0, 1, 2, 3]) for d in ids}
        ranking = rng.sample(ids, rng.randint(0, len(ids)))
        assert M.ndcg_at_10(ranking, qrels) == pytest.approx(M.ndcg_reference(ranking, qrels))


def test_rouge_l_f1():
    # LCS("the cat sat", "the cat sat down") = 3: P = 3/3, R = 3/4, F1 = 6/7
    assert M.rouge_l_f1("the cat sat", ["the cat sat down"]) == pytest.approx(6 / 7)
    assert M.rouge_l_f1("the cat sat down", ["the cat sat down", "x"]) == pytest.approx(1.0)
    assert M.rouge_l_f1("", ["the cat"]) == 0.0
    assert M.rouge_l_f1("zebra", ["the cat"]) == 0.0


def test_alce_correctness():
    pairs = [["Gustave Eiffel", "Eiffel"], ["Stephen Sauvestre"]]
    assert M.asqa_str_em("It was Eiffel [1] with others.", pairs) == 0.5
    assert M.asqa_str_em("", pairs) == 0.0
    answers = [["a1", "alias"], ["b"], ["c"], ["d"], ["e"], ["f"], ["g"]]
    assert M.qampari_recall5("alias [1], b, c.", answers) == pytest.approx(3 / 5)
    assert M.qampari_recall5("a1, b, c, d, e, f", answers) == 1.0  # recall-5 caps at 5
    assert M.qampari_recall5("", answers) == 0.0


def test_score_output_dispatch():
    assert M.score_output("json_kv", "subem", " abc-1", ["abc-1"], prefix="Corresponding value:") == 1
    assert M.score_output("msmarco", "ndcg@10", " 2 > 1", ["2 > 1"],
                          extra={"qrels": {"1": 1, "2": 2}}) == pytest.approx(1.0)
    assert M.score_output("nq", "subem", "", ["Paris"]) == 0.0


def test_helmets_ranking_format_scores():
    """"Ranking: ID3 > ID1 > ID2", the format the prompt asks for, parses to the ids (the old
    parser kept "ID3" and scored 0); brackets and "[ID: 3]" too; the longest chain wins."""
    assert M.parse_ranking("Ranking: ID3 > ID1 > ID2") == ["3", "1", "2"]
    assert M.parse_ranking("[ID: 3] > [ID: 1] > [ID: 2]") == ["3", "1", "2"]
    assert M.parse_ranking("see 7 then: 3 > 1 > 2 > 3") == ["3", "1", "2"]
    qrels = {"3": 2, "1": 1, "2": 0}
    assert M.score_output("msmarco", "ndcg@10", "Ranking: ID3 > ID1 > ID2", ["3 > 1 > 2"],
                          extra={"qrels": qrels}) == pytest.approx(1.0)
