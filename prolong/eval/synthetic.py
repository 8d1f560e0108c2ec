"""HELMET's synthetic recall tasks, generated locally at any length (up to 512K and beyond).

Built to RECIPE.md's description (and HELMET's prompt templates in its ``data.py``), not copied from
HELMET's released files, which we do not have:

- **json_kv**: keys and values are random UUID4 strings; the context is one JSON object with one
  pair per line (``json.dumps(..., indent=0)``, so it parses as JSON); the prompt is the context, a
  blank line, "Extract the value corresponding to the specified key in the JSON object below.", a
  blank line, two demos ("Key: k" / "Corresponding value: v", pairs that are not in the object),
  "Key: <key>" and the answer prefix "Corresponding value:". ``sizing: helmet``: HELMET's pair
  count (105 / 220 / 440 / 900 / 1800 at 8K ... 128K), truncated to the input budget;
  ``sizing: fill``: the most pairs that fit.
  Six queries per dictionary: samples 6g ... 6g+5 share dictionary g and ask keys at depths 0, 0.2,
  ..., 1 (the key's position among the pairs).
- **ruler_mk_needle**: the haystack is other needles, "One of the special magic numbers for
  {key} is: {value}.", one per line; keys are words (adjective-noun), values 7-digit numbers.
- **ruler_mk_uuid**: the same with UUID keys and values ("... magic uuids for ...").
- **ruler_mv**: an essay haystack (local prose: prolong.data.corpus's ``books``), one key with 4
  values, inserted at sentence ends from the sample's depth towards the end; the answer is all
  four values (RULER recall).

RULER samples use the same six-point depth grid (sample i asks at depth (i mod 6) / 5). RULER's
files fill their length (less the output budget) by construction, so both sizings fill the input
budget; ``helmet`` counts with its counting tokenizer (Llama-2's, when configured) and then
truncates for the evaluated model, as HELMET's released files would be.

Every sample is a pure function of (seed, task, length, index) and the tokenizer: workers build
their own shards without shipping prompts around.
"""

from __future__ import annotations

import functools
import json
import random
import re
from collections.abc import Callable
from pathlib import Path

from prolong.data.corpus import corpus_file
from prolong.data.retrieval import (
    ALL_PREFIX,
    ALL_QUESTION,
    KV_INSTRUCTION,
    KV_PREFIX,
    NEEDLE,
    ONE_PREFIX,
    ONE_QUESTION,
    seven_digits,
    uuid4,
    word_keys,
)
from prolong.eval.samples import PromptFormat, Sample, fit
from prolong.eval.sizing import Sizing, size_prompt, truncate_context
from prolong.eval.tasks import HELMET_TASKS

DEPTHS = 6
"""Evenly spaced depths per dictionary (HELMET's "dep6"): 0, 0.2, ..., 1."""

MV_VALUES = 4


def group_and_depth(index: int) -> tuple[int, float]:
    """Sample ``index`` asks about dictionary ``index // 6`` at depth ``(index % 6) / 5``."""
    return index // DEPTHS, (index % DEPTHS) / (DEPTHS - 1)


def rng_for(seed: int, task: str, length: int, group: int) -> random.Random:
    return random.Random(f"{seed}/{task}/{length}/{group}")


def position(depth: float, n: int) -> int:
    """Index among ``n`` items at ``depth`` (0 = first, 1 = last)."""
    return min(n - 1, max(0, round(depth * (n - 1)))) if n else 0


# ---------------------------------------------------------------------------------------------
# JSON KV
# ---------------------------------------------------------------------------------------------

def json_kv(fmt: PromptFormat, length: int, index: int, seed: int,
            sizing: Sizing | None = None) -> Sample:
    sizing = sizing or Sizing()
    group, depth = group_and_depth(index)
    rng = rng_for(seed, "json_kv", length, group)
    info = HELMET_TASKS["json_kv"]
    demos = [(uuid4(rng), uuid4(rng)) for _ in range(info.shots)]
    # Enough pairs for any length: extended lazily, the same stream for every size.
    pairs: list[tuple[str, str]] = []

    def pairs_upto(n: int) -> list[tuple[str, str]]:
        while len(pairs) < n:
            pairs.append((uuid4(rng), uuid4(rng)))
        return pairs[:n]

    demo_text = "".join(f"Key: {k}\n{KV_PREFIX} {v}\n\n" for k, v in demos)

    def parts(n: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        kv = pairs_upto(max(n, 1))
        key = kv[position(depth, len(kv))][0]

        def render(context: str) -> tuple[str, bool]:
            user = f"{context}\n\n{KV_INSTRUCTION}\n\n{demo_text}Key: {key}"
            return fmt.render(user, KV_PREFIX, chat=info.chat)
        return json.dumps(dict(kv), indent=0), render

    helmet_n = sizing.amount("json_kv", length) if sizing.mode == "helmet" else 1
    n, prompt, special, tokens, cut = size_prompt(sizing, "json_kv", fmt, length, parts,
                                                  helmet_n=helmet_n, guess=max(1, length // 64),
                                                  minimum=1)
    kv = pairs_upto(n)
    key, value = kv[position(depth, n)]
    return Sample("json_kv", length, index, prompt, [value], tokens, depth, special, KV_PREFIX,
                  {"pairs": n, "key": key, "key_index": position(depth, n), "truncated": cut})


def _ruler_prompt(task: str, fmt: PromptFormat, length: int, sizing: Sizing,
                  build: Callable[[int], tuple[str, bool]], context_of: Callable[[int], str],
                  render_of: Callable[[int], Callable[[str], tuple[str, bool]]], *,
                  upper: int | None, guess: int, minimum: int) -> tuple[int, str, bool, int]:
    """Fill the input budget (counted with the counting tokenizer under helmet), then, under
    helmet, truncate the context for the evaluated model."""
    budget = sizing.budget(task, length)
    counter = sizing.count_format(fmt) if sizing.mode == "helmet" else fmt
    n, prompt, special, tokens = fit(build, counter.count, budget, upper=upper, guess=guess,
                                     minimum=minimum)
    if sizing.mode == "helmet" and counter is not fmt:
        _, prompt, special, tokens = truncate_context(render_of(n), context_of(n), fmt, budget)
    return n, prompt, special, tokens


# ---------------------------------------------------------------------------------------------
# RULER: multi-key needles (words or UUIDs), multi-value
# ---------------------------------------------------------------------------------------------

def ruler_mk(fmt: PromptFormat, length: int, index: int, seed: int, *, uuids: bool,
             sizing: Sizing | None = None) -> Sample:
    task = "ruler_mk_uuid" if uuids else "ruler_mk_needle"
    _, depth = group_and_depth(index)
    rng = rng_for(seed, task, length, index)
    kind, one = ("uuids", "uuid") if uuids else ("numbers", "number")
    info = HELMET_TASKS[task]
    needles: list[tuple[str, str]] = []
    words = word_keys(rng)

    def needles_upto(n: int) -> list[tuple[str, str]]:
        while len(needles) < n:
            key = uuid4(rng) if uuids else next(words)
            needles.append((key, uuid4(rng) if uuids else seven_digits(rng)))
        return needles[:n]

    def parts(n: int) -> tuple[str, str, str]:
        ns = needles_upto(max(n, 1))
        key, value = ns[position(depth, len(ns))]
        context = "\n".join(NEEDLE.format(kind=kind, key=k, value=v) for k, v in ns)
        return context, key, value

    def render_of(n: int) -> Callable[[str], tuple[str, bool]]:
        key = parts(n)[1]

        def render(context: str) -> tuple[str, bool]:
            user = ONE_QUESTION.format(one=one, context=context, query=key)
            return fmt.render(user, ONE_PREFIX.format(one=one, query=key), chat=info.chat)
        return render

    def build(n: int) -> tuple[str, bool]:
        return render_of(n)(parts(n)[0])

    n, prompt, special, tokens = _ruler_prompt(
        task, fmt, length, sizing or Sizing(), build, lambda n: parts(n)[0], render_of,
        upper=None, guess=max(1, length // 32), minimum=1)
    _, key, value = parts(n)
    return Sample(task, length, index, prompt, [value], tokens, depth, special,
                  ONE_PREFIX.format(one=one, query=key), {"needles": n, "key": key})


def ruler_mv(fmt: PromptFormat, length: int, index: int, seed: int,
             haystack: Callable[[int], str], sizing: Sizing | None = None) -> Sample:
    """``haystack(chars)``: at least ``chars`` characters of prose (see :func:`essay_haystack`)."""
    _, depth = group_and_depth(index)
    rng = rng_for(seed, "ruler_mv", length, index)
    info = HELMET_TASKS["ruler_mv"]
    key = next(word_keys(rng))
    values: list[str] = []
    while len(values) < MV_VALUES:
        v = seven_digits(rng)
        if v not in values:
            values.append(v)
    needles = [NEEDLE.format(kind="numbers", key=key, value=v) for v in values]
    prefix = ALL_PREFIX.format(kind="numbers", query=key)
    text = haystack(length * 6)
    offsets = fmt.offsets(text)
    while len(offsets) < length:
        text = text + "\n\n" + text
        offsets = fmt.offsets(text)
    depths = [depth + k * (1 - depth) / MV_VALUES for k in range(MV_VALUES)]

    def context_of(n: int) -> str:
        cut = offsets[n - 1][1] if n > 0 else 0
        return insert_at_sentences(text[:cut], needles, depths)

    def render(context: str) -> tuple[str, bool]:
        user = ALL_QUESTION.format(kind="numbers", context=context, query=key)
        return fmt.render(user, prefix, chat=info.chat)

    def build(n: int) -> tuple[str, bool]:
        return render(context_of(n))

    n, prompt, special, tokens = _ruler_prompt(
        "ruler_mv", fmt, length, sizing or Sizing(), build, context_of, lambda n: render,
        upper=len(offsets), guess=max(1, length * 3 // 4), minimum=0)
    return Sample("ruler_mv", length, index, prompt, values, tokens, depth, special, prefix,
                  {"key": key, "reference": ", ".join(values), "haystack_tokens": n})


_SENTENCE_END = re.compile(r"[.!?]\s")


def insert_at_sentences(text: str, needles: list[str], depths: list[float]) -> str:
    """Put each needle at the first sentence end at or after its depth (by characters), or at
    the end; needles keep their order."""
    cuts = []
    for d in depths:
        at = int(d * len(text))
        m = _SENTENCE_END.search(text, at)
        cuts.append(m.start() + 1 if m else len(text))
    out, last = [], 0
    for cut, needle in sorted(zip(cuts, needles, strict=True), key=lambda x: x[0]):
        out.append(text[last:cut])
        out.append(" " + needle)
        last = cut
    out.append(text[last:])
    return "".join(out)


@functools.lru_cache(maxsize=4)
def _books_text(cache_dir: str) -> str:
    docs = [json.loads(line)["text"] for line in
            corpus_file("books", cache_dir).read_text(encoding="utf-8").splitlines() if line]
    return "\n\n".join(d.strip() for d in docs)


def essay_haystack(cache_dir: str | Path) -> Callable[[int], str]:
    """Prose from the local ``books`` corpus (built under ``cache_dir`` when missing), repeated as
    often as a length needs (RULER repeats its essays too)."""
    def get(chars: int) -> str:
        text = _books_text(str(cache_dir))
        reps = max(1, -(-chars // max(len(text), 1)))
        return "\n\n".join([text] * reps)[:chars]
    return get


def generate(task: str, fmt: PromptFormat, length: int, index: int, seed: int, *,
             haystack: Callable[[int], str] | None = None,
             sizing: Sizing | None = None) -> Sample:
    """Sample ``index`` of synthetic ``task`` at ``length`` tokens."""
    if task == "json_kv":
        return json_kv(fmt, length, index, seed, sizing)
    if task == "ruler_mk_needle":
        return ruler_mk(fmt, length, index, seed, uuids=False, sizing=sizing)
    if task == "ruler_mk_uuid":
        return ruler_mk(fmt, length, index, seed, uuids=True, sizing=sizing)
    if task == "ruler_mv":
        if haystack is None:
            raise ValueError("ruler_mv needs a haystack (essay_haystack(cache_dir))")
        return ruler_mv(fmt, length, index, seed, haystack, sizing)
    raise KeyError(f"{task} is not a synthetic task")
