"""How much context a prompt holds at a length: HELMET's fixed amounts, or as much as fits.

**helmet** (the default; ``EvalJob.spec.sizing``). HELMET does not fill a length with the
evaluated model's tokenizer: its configs (``scripts/generate_configs.py``) fix an amount per
length, calibrated once with Llama-2's tokenizer, and every model gets the same content --

- JSON KV pairs, RAG and MS MARCO passages (the ``k`` of the released file), ICL demos (the
  ``<n>shot`` of the dataset name) and ALCE documents: :data:`AMOUNTS`;
- long documents (NarrativeQA, ∞Bench, Multi-LexSum) cut beforehand, with Llama-2's tokenizer, to
  the length minus a per-task reserve (``narrativeqa_130772`` at 131072), ending in HELMET's
  marker: :func:`precut_document`;
- and drops NarrativeQA / ∞Bench / Multi-LexSum samples whose document is shorter than a bound
  counted with that tokenizer (``data.py``'s ``filter_length``): :data:`LENGTH_FILTERS`.

Then the prompt, rendered for the evaluated model, is truncated to the input budget (length minus
the task's output budget): the excess tokens are cut off the end of the context -- the passages,
demos, pairs or document -- as HELMET's ``tokenize`` does (:func:`truncate_context`).

**fill** (our earlier behaviour, kept for lengths HELMET has no table for, such as the
quickstart's 512): the variable part grows until the prompt fills the input budget with the
evaluated model's tokenizer (:func:`prolong.eval.samples.fit`). Reports mark it as not comparable
to published HELMET numbers.

Both modes keep every prompt within ``length - max_new_tokens`` (:meth:`Sizing.budget`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Literal

from prolong.eval.samples import PromptFormat, TooShort, fit
from prolong.eval.tasks import HELMET_TASKS
from prolong.spec.helmet import HELMET_SIZING_LENGTHS

SizingMode = Literal["helmet", "fill"]


def _per_length(*amounts: int) -> dict[int, int]:
    return dict(zip(HELMET_SIZING_LENGTHS, amounts, strict=True))


_RAG = _per_length(20, 50, 105, 220, 440, 1000)
_ALCE = _per_length(8, 30, 75, 165, 345, 700)
AMOUNTS: dict[str, dict[int, int]] = {
    "json_kv": _per_length(50, 105, 220, 440, 900, 1800),  # pairs (test_k<n>_dep6.jsonl)
    "nq": _RAG, "triviaqa": _RAG, "hotpotqa": _RAG, "popqa": _RAG,  # passages (k<n> files)
    "msmarco": _per_length(14, 50, 130, 285, 600, 1000),  # passages
    # demos: the "<n>shot_balance" of each ICL dataset name
    "trec_coarse": _per_length(200, 400, 800, 1600, 3300, 6600),
    "trec_fine": _per_length(200, 400, 800, 1600, 3200, 6400),
    "banking77": _per_length(180, 360, 720, 1450, 2900, 5900),
    "clinc150": _per_length(220, 440, 880, 1750, 3525, 7050),
    "nlu": _per_length(250, 510, 1020, 2040, 4080, 8296),
    "alce_asqa": _ALCE, "alce_qampari": _ALCE,  # retrieved documents (alce_<task>_<n>)
}
"""HELMET's fixed amount of context per task and length, from its generate_configs.py (4K ...
128K; the paper reports 8K ... 128K)."""

DOCUMENT_RESERVE: dict[str, int] = {
    "narrativeqa": 300, "infbench_qa": 210, "infbench_mc": 210, "infbench_sum": 1400,
    "multi_lexsum": 700,
}
"""Tokens HELMET keeps free of the long document at each length: its dataset names carry
``length - reserve`` (200 for the prompt + the output budget; Multi-LexSum 300 + 400)."""

LENGTH_FILTERS: dict[str, tuple[str, int]] = {
    "narrativeqa": (">", 131072),
    "infbench_qa": (">=", 65536), "infbench_mc": (">=", 65536), "infbench_sum": (">=", 65536),
    "multi_lexsum": (">=", 65536),
}
"""Documents HELMET keeps, by their token count with its counting tokenizer (special tokens
included, as ``tokenizer(text)`` counts them) -- the same bound at every evaluated length."""

OMITTED = " ... [the rest of the text is omitted]"
"""HELMET's marker at the end of a long document it cut."""


class UnsupportedLength(ValueError):
    """``sizing: helmet`` at a length HELMET has no amount for (spec rules catch this first)."""


@dataclass(frozen=True)
class Sizing:
    """How one eval sizes its prompts."""

    mode: SizingMode = "helmet"
    max_new_tokens: int | None = None
    """The spec's override of every task's output budget (generation.maxNewTokens)."""
    counter: PromptFormat | None = None
    """The tokenizer HELMET counts long documents and length filters with (Llama-2's);
    None: the evaluated model's."""

    def budget(self, task: str, length: int) -> int:
        """Input tokens a prompt may have: the length minus the task's output budget."""
        return length - (self.max_new_tokens or HELMET_TASKS[task].max_new_tokens)

    def amount(self, task: str, length: int) -> int:
        """HELMET's fixed amount of ``task`` at ``length``."""
        table = AMOUNTS[task]
        if length not in table:
            raise UnsupportedLength(
                f"{task}: sizing helmet has amounts only at {', '.join(map(str, table))}, not "
                f"{length}; use sizing: fill")
        return table[length]

    def count_format(self, fmt: PromptFormat) -> PromptFormat:
        return self.counter or fmt


FILL = Sizing("fill")


def keeps_document(task: str, tokens: int) -> bool:
    """Whether HELMET's length filter keeps a document of ``tokens`` counting tokens."""
    op, bound = LENGTH_FILTERS[task]
    return tokens > bound if op == ">" else tokens >= bound


def precut_document(counter: PromptFormat, doc: str, limit: int) -> str:
    """HELMET's ``truncate_llama2``: a document over ``limit`` tokens (special tokens counted) is
    cut so that it plus the marker stays at ``limit`` and ends with the marker."""
    ids = counter.encode(doc, add_special_tokens=True)
    if len(ids) <= limit:
        return doc
    marker = counter.count(OMITTED, add_special_tokens=True)
    spans = counter.offsets_with_special(doc)
    return doc[: spans[max(limit - marker, 0)][1]] + OMITTED


def truncate_context(render: Callable[[str], tuple[str, bool]], context: str, fmt: PromptFormat,
                     budget: int) -> tuple[str, str, bool, int]:
    """HELMET's truncation: when the prompt ``render(context)`` exceeds ``budget`` tokens, drop as
    many tokens as it is over from the end of ``context`` (cut at that token's start) and render
    again. HELMET does this once; BPE merges at the new end can leave a token over, so we repeat
    until it fits (the first pass is HELMET's). Returns (context, prompt, special, tokens)."""
    while True:
        text, special = render(context)
        tokens = fmt.count(text, special)
        if tokens <= budget:
            return context, text, special, tokens
        if not context:
            raise TooShort(f"the prompt needs {tokens} tokens before any context; budget {budget}")
        spans = fmt.offsets(context)
        excess = tokens - budget
        context = context[: spans[-excess][0]] if excess <= len(spans) else ""


def size_prompt(sizing: Sizing, task: str, fmt: PromptFormat, length: int,
                parts: Callable[[int], tuple[str, Callable[[str], tuple[str, bool]]]], *,
                helmet_n: int, upper: int | None = None, guess: int = 8, minimum: int = 0,
                counter: PromptFormat | None = None) -> tuple[int, str, bool, int, bool]:
    """The prompt of one sample: ``parts(n)`` gives the context holding ``n`` units (pairs,
    passages, demos, documents) and the function that renders a prompt around a context.

    helmet: ``helmet_n`` units, then :func:`truncate_context` to the budget. fill: the largest
    ``n`` whose prompt fits the budget, counted with ``counter`` (default ``fmt``). Returns
    (n, prompt, add_special_tokens, tokens, truncated)."""
    budget = sizing.budget(task, length)
    if sizing.mode == "helmet":
        context, render = parts(helmet_n)
        kept, prompt, special, tokens = truncate_context(render, context, fmt, budget)
        return helmet_n, prompt, special, tokens, len(kept) < len(context)

    count = (counter or fmt).count

    def build(n: int) -> tuple[str, bool]:
        context, render = parts(n)
        return render(context)

    n, prompt, special, _ = fit(build, count, budget, upper=upper, guess=guess, minimum=minimum)
    return n, prompt, special, fmt.count(prompt, special), False
