"""Copy documents: one segment repeated, so every later repetition is predictable by copying."""

from __future__ import annotations

import random
import re

import pytest

from prolong.data.repeats import (
    ALPHABET,
    ITEMS,
    REPEATS,
    SYMBOLS,
    repeat_document,
    repeat_documents,
)


@pytest.mark.parametrize("kind", ["symbols", "items"])
def test_a_document_is_one_segment_repeated(kind):
    rng = random.Random(7)
    for _ in range(50):
        doc = repeat_document(rng, kind)
        lines = doc.rstrip("\n").split("\n")
        assert REPEATS[0] <= len(lines) <= REPEATS[1] and len(set(lines)) == 1
        units = lines[0].split(" ")
        if kind == "symbols":
            assert SYMBOLS[0] <= len(units) <= SYMBOLS[1]
            assert all(len(u) == 1 and u in ALPHABET for u in units)
        else:
            assert ITEMS[0] <= len(units) <= ITEMS[1]
            assert all(re.fullmatch(r"[1-9]\d{6}|[a-z]+(-[a-z]+){1,2}", u) for u in units)


def test_documents_are_deterministic_and_alternate_kinds():
    docs = list(repeat_documents(1, 20))
    assert docs == list(repeat_documents(1, 20)) and docs != list(repeat_documents(2, 20))
    symbol_docs = docs[0::2]
    assert all(len(line.split(" ")[0]) == 1 for line in symbol_docs)
    assert any("-" in d for d in docs[1::2])
    with pytest.raises(ValueError, match="unknown segment kind"):
        repeat_document(random.Random(0), "letters")
