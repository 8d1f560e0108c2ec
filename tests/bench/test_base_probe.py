"""The base probe reads what it claims, and the shipped quickstart base can read its context."""

from __future__ import annotations

import pytest

from bench.base_probe import SHIPPED_BASE, answer_spans, probe, probe_documents

# What the shipped base measured at 48 documents (bench/RESULTS.md), less a margin for the
# smaller sample here: a base re-made without its induction circuit, or one whose lookup did not
# form, fails.
SHIPPED_COPY_AT_LEAST = 0.9
SHIPPED_NEEDLE_FIRST_AT_LEAST = 0.5


def test_answer_spans_are_the_values_after_each_answer_lead():
    text = ("One of the special magic numbers for bold-cat is: 1234567.\n"
            "What is the special magic number for bold-cat mentioned in the provided text?\n"
            "The special magic number for bold-cat mentioned in the provided text is 1234567.\n")
    (start, end), = answer_spans(text)
    assert text[start:end] == " 1234567"


def test_probe_documents_are_held_out_and_fixed():
    needles, copies = probe_documents(3)
    assert (needles, copies) == probe_documents(3)
    assert all(answer_spans(n) for n in needles)
    assert all(c.count(c.splitlines()[0]) >= 2 for c in copies)


@pytest.mark.slow
def test_the_shipped_base_copies_and_looks_up():
    result = probe(SHIPPED_BASE, documents=16)
    assert result["copy"] >= SHIPPED_COPY_AT_LEAST, result
    assert result["needle_first"] >= SHIPPED_NEEDLE_FIRST_AT_LEAST, result
