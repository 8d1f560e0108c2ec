"""Synthetic copy documents: random segments, each repeated several times (an induction curriculum).

Why: a small model learns to look something up in its context only once it has an induction
circuit (a head that finds the earlier occurrence of the current token and copies what followed
it). On prose and even on retrieval documents that circuit forms only after tens of millions of
tokens; on rows where most tokens are predictable *only* by copying an earlier span it forms far
sooner, and sooner still when the copied symbols come from a small alphabet (issue 22's probes).
The quickstart base (``jobs/quickstart/base.yaml``) trains on these next to the retrieval
documents, so that the lookups of HELMET's recall tasks have a circuit to use.

Each document is one segment repeated 2-6 times, one repetition per line. A segment is either

- ``symbols``: 6-32 symbols drawn from a small alphabet (lowercase letters and digits, space
  separated, so that a byte-level BPE maps each to one token), or
- ``items``: 3-8 items of the needles' own kinds (word keys such as ``bold-cat`` and 7-digit
  numbers, :mod:`prolong.data.retrieval`), so that the copying carries over to the tokens a
  recall answer is made of.

The first repetition is unpredictable; every later one is predictable exactly by copying.
"""

from __future__ import annotations

import random
from collections.abc import Iterator

from prolong.data.retrieval import seven_digits, word_keys

ALPHABET = "abcdefghijklmnopqrstuvwxyz0123456789"
SYMBOLS = (6, 32)       # symbols per segment, inclusive
ITEMS = (3, 8)          # items (word keys or 7-digit numbers) per segment, inclusive
REPEATS = (2, 6)        # repetitions per document, inclusive
KINDS = ("symbols", "items")


def symbol_segment(rng: random.Random, alphabet: str = ALPHABET) -> str:
    return " ".join(rng.choice(alphabet) for _ in range(rng.randint(*SYMBOLS)))


def item_segment(rng: random.Random) -> str:
    keys = word_keys(rng)
    return " ".join(next(keys) if rng.random() < 0.5 else seven_digits(rng)
                    for _ in range(rng.randint(*ITEMS)))


def repeat_document(rng: random.Random, kind: str) -> str:
    """One segment of ``kind`` (symbols or items), repeated 2-6 times, one per line."""
    if kind not in KINDS:
        raise ValueError(f"unknown segment kind {kind!r}; expected one of {', '.join(KINDS)}")
    segment = symbol_segment(rng) if kind == "symbols" else item_segment(rng)
    return "\n".join([segment] * rng.randint(*REPEATS)) + "\n"


def repeat_documents(seed: int, count: int) -> Iterator[str]:
    """``count`` copy documents, kinds in turn; a pure function of the arguments."""
    rng = random.Random(f"repeats/{seed}")
    for i in range(count):
        yield repeat_document(rng, KINDS[i % len(KINDS)])
