"""What every HELMET task produces: a :class:`Sample` (prompt, gold answers, where the evidence sits),
sized with the evaluated model's own tokenizer.

Length convention: a sample "at length L" is a prompt of at most L tokens of the evaluated model's
tokenizer, chat template and special tokens included; the output budget comes on top (HELMET's
``input_max_length`` is the input too). Generators and loaders size the variable part of the
prompt (pairs, needles, haystack, passages, demos, the document) with :func:`fit`, the largest
size whose prompt still fits.

Prompt assembly follows HELMET (``data.py`` and ``model_utils.tokenize``): the prompt is
``user + sep + prefix`` where ``prefix`` is the answer prefix ("Answer:", "Corresponding value:",
...), encoded with the tokenizer's special tokens (BOS); or, for tasks HELMET runs with its chat
template (``useChatTemplate`` and the task's own setting), the user turn alone rendered by the
tokenizer's chat template with its generation prompt -- nothing after it, no system message --
encoded without adding special tokens (the template holds them).
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Sample:
    """One prompt of one task at one length, with everything needed to score its output."""

    task: str
    length: int
    index: int
    prompt: str
    """Exactly the text the model reads (chat template already applied when the task uses one)."""
    answers: list[str]
    """Gold answers (any-of for SubEM/accuracy, all-of for RULER recall, the gold ranking for
    re-rank, the reference summary for summarization)."""
    tokens: int
    """Prompt length in tokens of the evaluated model's tokenizer."""
    depth: float | None = None
    """Where the queried evidence sits in the context (0 = start, 1 = end); None when the task
    has no single position (released data)."""
    add_special_tokens: bool = True
    """Whether encoding the prompt adds the tokenizer's special tokens (False for chat-rendered
    prompts: the template already holds them)."""
    prefix: str = ""
    """The answer prefix the prompt ends with (used to parse outputs)."""
    extra: dict[str, Any] = field(default_factory=dict)
    """Task-specific scoring data: qrels (re-rank), qa_pairs (ALCE ASQA), reference output."""

    @property
    def prompt_hash(self) -> str:
        return hashlib.sha256(self.prompt.encode()).hexdigest()[:16]

    @property
    def reference(self) -> str:
        """An output that scores 100: what a perfect model would write."""
        return self.extra.get("reference", self.answers[0] if self.answers else "")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class PromptFormat:
    """Renders prompts and counts their tokens with one tokenizer (a fast transformers tokenizer).
    ``use_chat=False`` (``useChatTemplate: false``, for base models) never applies a chat
    template."""

    def __init__(self, tokenizer: Any, *, use_chat: bool = True):
        self.tok = tokenizer
        template = getattr(tokenizer, "chat_template", None)
        self.has_chat = use_chat and isinstance(template, str) and bool(template)

    def render(self, user: str, prefix: str, *, chat: bool, sep: str = "\n") -> tuple[str, bool]:
        """(prompt text, add_special_tokens) for a user turn and an answer prefix. A chat prompt
        ends at the template's generation prompt: HELMET puts no answer prefix after it."""
        if chat and self.has_chat:
            text = self.tok.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                                add_generation_prompt=True)
            return text, False
        return user + sep + prefix, True

    def count(self, text: str, add_special_tokens: bool = True) -> int:
        return len(self.encode(text, add_special_tokens))

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        # The backend directly: no "sequence longer than model_max_length" warnings at 512K.
        return self.tok.backend_tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of every token of ``text`` (no special tokens)."""
        return self.tok.backend_tokenizer.encode(text, add_special_tokens=False).offsets

    def offsets_with_special(self, text: str) -> list[tuple[int, int]]:
        """Character spans with the special tokens encoding adds ((0, 0) for a BOS), as
        ``tokenizer(text, return_offsets_mapping=True)`` gives them."""
        return self.tok.backend_tokenizer.encode(text, add_special_tokens=True).offsets


class TooShort(ValueError):
    """The fixed part of a task's prompt alone exceeds the target length."""


def fit(build: Callable[[int], tuple[str, bool]], count: Callable[[str, bool], int], target: int,
        *, upper: int | None = None, guess: int = 8, minimum: int = 0) -> tuple[int, str, bool, int]:
    """The largest ``n`` (``minimum`` <= n <= ``upper``) whose prompt ``build(n)`` has at most
    ``target`` tokens; returns (n, prompt, add_special_tokens, tokens).

    Token counts grow almost linearly in ``n`` (BPE merges across piece boundaries make it only
    almost), so the search extrapolates from what it measured and alternates with bisection once
    the answer is bracketed: a handful of tokenizations even at 512K tokens.
    """
    def measure(n: int) -> tuple[str, bool, int]:
        text, special = build(n)
        return text, special, count(text, special)

    lo_n, lo = minimum, measure(minimum)
    if lo[2] > target:
        raise TooShort(f"the prompt needs {lo[2]} tokens before any context; target {target}")
    base = lo[2]
    hi_n = None if upper is None else upper + 1  # smallest size known not to fit (or not allowed)
    hi_t: int | None = None

    def per_unit() -> float:
        if lo_n > minimum:
            return max((lo[2] - base) / (lo_n - minimum), 1e-6)
        if hi_t is not None:
            return max((hi_t - base) / (hi_n - minimum), 1e-6)
        return 1.0

    n = max(minimum + 1, guess)
    step = 0
    while hi_n is None or hi_n - lo_n > 1:
        if hi_n is not None:
            n = min(max(n, lo_n + 1), hi_n - 1)
        cur = measure(n)
        if cur[2] <= target:
            lo_n, lo = n, cur
        else:
            hi_n, hi_t = n, cur[2]
        step += 1
        if hi_n is None:  # still growing: extrapolate, at least doubling
            n = max(2 * n, lo_n + int((target - lo[2]) / per_unit()) + 1)
        elif step % 2:
            n = lo_n + int((target - lo[2]) / per_unit())
        else:
            n = (lo_n + hi_n) // 2
    return (lo_n, *lo)
