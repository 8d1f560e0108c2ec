"""Retrieval documents and dialogues: every answer is the context's, phrased as the eval asks."""

from __future__ import annotations

import json
import random
import re

import pytest

from prolong.data.retrieval import (
    KINDS,
    KV_INSTRUCTION,
    KV_PREFIX,
    ONE_PREFIX,
    kv_document,
    needle_document,
    retrieval_dialogue,
    retrieval_documents,
)

NEEDLE_LINE = re.compile(r"^One of the special magic (numbers|uuids) for (\S+) is: (\S+)\.$")
ANSWER_LINE = re.compile(r"^The special magic (number|uuid) for (\S+) mentioned in the provided "
                         r"text is (\S+)\.$")


def kv_answers(doc: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    obj_text, rest = doc.split(f"\n\n{KV_INSTRUCTION}\n\n")
    lookups = re.findall(rf"Key: (\S+)\n{KV_PREFIX} (\S+)", rest)
    return json.loads(obj_text), lookups


def needle_answers(doc: str) -> tuple[dict[str, str], list[tuple[str, str]]]:
    needles, answers = {}, []
    for line in doc.splitlines():
        if m := NEEDLE_LINE.match(line):
            needles[m.group(2)] = m.group(3)
        elif m := ANSWER_LINE.match(line):
            answers.append((m.group(2), m.group(3)))
    return needles, answers


def test_kv_document_answers_come_from_the_object_after_two_demos():
    doc = kv_document(random.Random(0), pairs=12, questions=5)
    obj, lookups = kv_answers(doc)
    assert len(obj) == 12 and len(lookups) == 2 + 5
    demos, asked = lookups[:2], lookups[2:]
    assert all(k not in obj for k, _ in demos)  # HELMET's demos are keys outside the object
    assert all(obj[k] == v for k, v in asked) and len({k for k, _ in asked}) == 5


@pytest.mark.parametrize("uuids", [False, True])
def test_needle_document_answers_match_their_needles(uuids):
    doc = needle_document(random.Random(1), needles=20, questions=4, uuids=uuids)
    needles, answers = needle_answers(doc)
    assert len(needles) == 20 and len(answers) == 4
    assert all(needles[k] == v for k, v in answers)
    assert doc.startswith("A special magic uuid" if uuids else "A special magic number")


def test_documents_are_deterministic_sized_and_of_every_kind():
    docs = list(retrieval_documents(3, 90, min_chars=250, max_chars=9_000))
    assert docs == list(retrieval_documents(3, 90, min_chars=250, max_chars=9_000))
    assert docs != list(retrieval_documents(4, 90, min_chars=250, max_chars=9_000))
    sizes = sorted(len(d) for d in docs)
    assert sizes[0] < 1_000 and sizes[-1] > 4_000  # spans the short and the long bucket
    kinds = {("kv" if KV_INSTRUCTION in d else "uuid" if "magic uuid" in d else "number")
             for d in docs}
    assert kinds == {"kv", "uuid", "number"} and len(KINDS) == 3
    for d in docs:
        if KV_INSTRUCTION in d:
            obj, lookups = kv_answers(d)
            assert all(obj[k] == v for k, v in lookups[2:]) and len(lookups) >= 2 + 1
        else:
            needles, answers = needle_answers(d)
            assert answers and all(needles[k] == v for k, v in answers)
        assert d.endswith(".\n") or d.endswith("\n")


def test_dialogues_answer_in_the_prompts_phrasing():
    rng = random.Random(5)
    seen = set()
    for _ in range(60):
        msgs = retrieval_dialogue(rng)
        assert [m["role"] for m in msgs] == ["user", "assistant"] * (len(msgs) // 2)
        first = msgs[0]["content"]
        if KV_INSTRUCTION in first:
            seen.add("kv")
            obj = json.loads(first.split(f"\n\n{KV_INSTRUCTION}")[0])
            for ask, answer in zip(msgs[::2], msgs[1::2], strict=True):
                key = ask["content"].rsplit("Key: ", 1)[1]
                assert answer["content"] == f"{KV_PREFIX} {obj[key]}"
        else:
            seen.add("needle")
            needles, _ = needle_answers(first)
            for ask, answer in zip(msgs[::2], msgs[1::2], strict=True):
                key = re.search(r"magic number for (\S+) mentioned", ask["content"]).group(1)
                assert answer["content"] == \
                    f"{ONE_PREFIX.format(one='number', query=key)} {needles[key]}."
    assert seen == {"kv", "needle"}


def test_documents_of_chosen_kinds_come_in_their_shares():
    docs = list(retrieval_documents(3, 40, min_chars=120, max_chars=1_200,
                                    kinds=("needle_words", "needle_words", "json_kv")))
    numbers = sum("magic number" in d for d in docs)
    assert numbers == 27 and sum(KV_INSTRUCTION in d for d in docs) == 13
    assert not any("magic uuid" in d for d in docs)
    with pytest.raises(ValueError, match="needle_word"):
        next(retrieval_documents(3, 1, min_chars=120, max_chars=200, kinds=("needle_word",)))
