"""Synthetic recall generators under sizing fill: JSON KV structure and depths, target lengths,
determinism (HELMET sizing: tests/eval/test_sizing.py)."""

from __future__ import annotations

import json
import re

import pytest

from prolong.eval import synthetic as syn
from prolong.eval.samples import PromptFormat, TooShort, fit
from prolong.eval.sizing import FILL
from prolong.eval.tasks import HELMET_TASKS

UUID = re.compile(r"^[0-9a-f]{8}-[0-9a-f]{4}-4[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$")


def kv_object(prompt: str) -> dict[str, str]:
    start = prompt.index("{")
    end = prompt.index("\n}", start) + 2
    return json.loads(prompt[start:end])


@pytest.mark.parametrize("index", range(6))
def test_json_kv_parses_holds_pairs_and_puts_the_key_at_its_depth(tokenizer, index):
    fmt = PromptFormat(tokenizer)
    s = syn.json_kv(fmt, 4096, index, seed=7, sizing=FILL)
    obj = kv_object(s.prompt)
    assert len(obj) == s.extra["pairs"] > 20
    lines = s.prompt[s.prompt.index("{"):s.prompt.index("\n}") + 2].splitlines()
    assert len(lines) == len(obj) + 2  # one pair per line between the braces
    assert all(UUID.match(k) and UUID.match(v) for k, v in obj.items())
    keys = list(obj)
    depth = index / 5
    assert s.depth == pytest.approx(depth)
    assert keys.index(s.extra["key"]) == round(depth * (len(keys) - 1))
    assert obj[s.extra["key"]] == s.answers[0]
    tail = s.prompt[s.prompt.index("\n}") + 2:]
    assert tail.startswith("\n\nExtract the value corresponding to the specified key in the JSON "
                           "object below.\n\nKey: ")
    assert tail.endswith(f"Key: {s.extra['key']}\nCorresponding value:")
    demos = re.findall(r"Key: (\S+)\nCorresponding value: (\S+)", tail)
    assert len(demos) == 2 and all(k not in obj for k, _ in demos)


def test_six_queries_share_one_dictionary(tokenizer):
    fmt = PromptFormat(tokenizer)
    objs = [kv_object(syn.json_kv(fmt, 2048, i, seed=1, sizing=FILL).prompt) for i in range(7)]
    assert all(o == objs[0] for o in objs[:6])
    assert objs[6] != objs[0]


def test_requested_pair_count_by_length(tokenizer):
    """Pair counts scale with the length (HELMET: 105 ... 1800 at 8K ... 128K)."""
    fmt = PromptFormat(tokenizer)
    small = syn.json_kv(fmt, 2048, 0, 0, sizing=FILL).extra["pairs"]
    large = syn.json_kv(fmt, 8192, 0, 0, sizing=FILL).extra["pairs"]
    assert 3.5 < large / small < 5  # budgets 8092 / 1948 tokens after the 100-token output


@pytest.mark.parametrize("task", ["json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv"])
@pytest.mark.parametrize("length", [4096, 16384])
def test_every_generator_hits_its_length_within_2_percent(tokenizer, corpus_cache, task, length):
    fmt = PromptFormat(tokenizer)
    s = syn.generate(task, fmt, length, 4, seed=3, haystack=syn.essay_haystack(corpus_cache),
                       sizing=FILL)
    assert s.tokens == fmt.count(s.prompt, s.add_special_tokens)  # the recorded count is real
    budget = length - HELMET_TASKS[task].max_new_tokens  # the output budget stays free
    assert 0.98 * budget <= s.tokens <= budget
    assert s.task == task and s.length == length and s.depth == pytest.approx(0.8)
    again = syn.generate(task, fmt, length, 4, seed=3, haystack=syn.essay_haystack(corpus_cache),
                       sizing=FILL)
    assert again.prompt == s.prompt  # deterministic from the seed
    other = syn.generate(task, fmt, length, 4, seed=4, haystack=syn.essay_haystack(corpus_cache),
                       sizing=FILL)
    assert other.prompt != s.prompt


def test_ruler_long_length(tokenizer):
    """Lengths far beyond the tests' model work the same (here 128K tokens)."""
    fmt = PromptFormat(tokenizer)
    s = syn.generate("ruler_mk_needle", fmt, 131072, 2, seed=0, sizing=FILL)
    assert 0.98 * (131072 - 50) <= s.tokens <= 131072 - 50


def test_ruler_needles(tokenizer, corpus_cache):
    fmt = PromptFormat(tokenizer)
    mk = syn.generate("ruler_mk_needle", fmt, 2048, 0, seed=0, sizing=FILL)
    needles = re.findall(r"One of the special magic numbers for (\S+) is: (\d+)\.", mk.prompt)
    assert len(needles) == mk.extra["needles"] and len({k for k, _ in needles}) == len(needles)
    assert all(re.fullmatch(r"[a-z]+(-[a-z]+)+", k) and len(v) == 7 for k, v in needles)
    assert needles[0] == (mk.extra["key"], mk.answers[0])  # depth 0: the first needle
    assert mk.prompt.endswith(f"The special magic number for {mk.extra['key']} mentioned in the "
                              "provided text is")
    uu = syn.generate("ruler_mk_uuid", fmt, 2048, 5, seed=0, sizing=FILL)
    needles = re.findall(r"One of the special magic uuids for (\S+) is: (\S+)\.", uu.prompt)
    assert all(UUID.match(k) and UUID.match(v) for k, v in needles)
    assert needles[-1] == (uu.extra["key"], uu.answers[0])  # depth 1: the last needle
    mv = syn.generate("ruler_mv", fmt, 2048, 2, seed=0, haystack=syn.essay_haystack(corpus_cache),
                       sizing=FILL)
    found = re.findall(rf"One of the special magic numbers for {mv.extra['key']} is: (\d+)\.",
                       mv.prompt)
    assert found == mv.answers and len(set(found)) == 4
    assert mv.prompt.count("One of the special magic") == 4  # the haystack is an essay


def test_fit_finds_the_largest_size_and_refuses_too_short():
    def build(n):
        return "ab " * n, True

    def count(text, _special):
        return len(text) // 2 + 5

    n, _, _, tokens = fit(build, count, 1000)
    assert tokens <= 1000 and count(build(n + 1)[0], True) > 1000
    assert fit(build, count, 1000, upper=10)[0] == 10
    with pytest.raises(TooShort):
        fit(build, count, 3)
