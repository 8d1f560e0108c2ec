"""Spec issues: what a broken spec reports, and the typo hint every message shares.

:class:`SpecIssue` is one broken rule with the field path it applies to (``spec.data.streams[2]
.path``); :class:`SpecError` carries every issue of a file. Both structure errors (pydantic,
turned into issues by :mod:`prolong.specfile`) and recipe rules (:mod:`prolong.spec.rules`) end
up here. No pydantic models and no prolong imports, so any module can raise or report issues.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Any

_NO_VALUE = object()


@dataclass(frozen=True)
class SpecIssue:
    """One broken rule: where (file, field path), what was there, and the rule."""

    path: str
    rule: str
    value: Any = _NO_VALUE
    file: str | None = None

    def located(self, file: str | None = None, prefix: str = "") -> SpecIssue:
        path = f"{prefix}.{self.path}" if prefix and self.path else (prefix or self.path)
        return SpecIssue(path, self.rule, self.value, file if file is not None else self.file)

    def __str__(self) -> str:
        where = ": ".join(p for p in (self.file, self.path) if p)
        got = "" if self.value is _NO_VALUE else f" (got {_short_repr(self.value)})"
        return f"{where}: {self.rule}{got}" if where else f"{self.rule}{got}"


def _short_repr(value: Any, limit: int = 60) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass
class SpecError(Exception):
    """A spec file that cannot be used; carries every issue found."""

    issues: list[SpecIssue] = field(default_factory=list)

    def __str__(self) -> str:
        return str(self.issues[0]) if self.issues else "invalid spec"

    def one_line(self) -> str:
        more = len(self.issues) - 1
        return str(self) + (f" (+{more} more: prolongctl validate -v)" if more > 0 else "")


def did_you_mean(word: str, options: Any) -> str:
    match = difflib.get_close_matches(str(word), list(options), n=1, cutoff=0.6)
    return f" (did you mean {match[0]}?)" if match else ""

