"""ALCE citation recall and precision, as HELMET's ``eval_alce.py`` (``compute_autoais``) scores
them: pure functions over an entailment callable (prolong.eval.nli supplies the real one).

The rules, as facts of HELMET's scorer (commit 4526dfb):

- **The output** is what the model wrote, with the answer prefix in front when the prompt was a
  plain completion (HELMET prepends its system template then), every run of newlines replaced
  by one space, and ``<|im_end|>`` removed (:func:`normalize_output`).
- **Claims.** ASQA: NLTK's English sentence splitter (``nltk.sent_tokenize``), dropping
  sentences shorter than 5 characters once stripped (a split-off "1." is not a claim). QAMPARI:
  the output with trailing whitespace, then "." then "," stripped, split at every comma; each
  item (stripped) is prefixed with the question and a space. A sample with no claim is left out
  of both means (it is not scored 0).
- **Citations** of a claim: every "[" followed by digits, read as that number minus one (so
  "[1, 2]" cites only passage 1, and "[0]" cites index -1, which is the *last* passage of the
  sample's full list, by Python indexing); at most 3 are kept (``--at_most_citations 3``, the
  default HELMET's eval.py runs with). The passages are the sample's whole retrieved list in the
  data file, not only the ones shown in the prompt; a claim citing past its end, or citing
  nothing, is unsupported without a call to the model.
- **The claim** checked is the sentence with its citations removed (" [n" and "[n" deleted,
  then " |" and every "]"), stripped.
- **A passage** reads "Title: <title>\\n<text>" (``sent`` instead of ``text`` when the record has
  one); several passages are joined with "\\n".
- **Recall** of a claim: the joined cited passages entail it. **Precision**: a claim with one
  citation adds 1 when supported; a supported claim with several adds 1 per citation that is
  needed: the passage alone entails the claim, or else the other citations without it do not.
  An unsupported claim adds nothing. A sample's recall is supported claims / claims, its
  precision the sum / citations kept over its claims (0 when it kept none).
- **A task's** citation recall (precision) is the mean over its samples that have claims, x100;
  0 when none has. HELMET's Cite category averages, per task, correctness, citation recall and
  citation precision (``scripts/collect_results.py``).

Calls to the model are made in three rounds (joint passages, then single passages of supported
multi-citation claims, then leave-one-out sets where a single passage failed) so that a whole
shard's claims go to the model in batches; each answer depends only on its (premise, claim)
pair, so the rounds reproduce HELMET's one-at-a-time order exactly.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

Entails = Callable[[Sequence[tuple[str, str]]], Sequence[bool]]
"""A batch of (premise, hypothesis) pairs -> whether each premise entails its hypothesis."""

Splitter = Callable[[str], list[str]]
"""Text -> sentences."""

AT_MOST_CITATIONS = 3
MIN_CLAIM_CHARS = 5
CITE_TASKS = ("alce_asqa", "alce_qampari")
QAMPARI_TASKS = ("alce_qampari",)

_CITE_MARK = re.compile(r"\[(\d+)")
_SPACED_MARK = re.compile(r" \[\d+")
_BARE_MARK = re.compile(r"\[\d+")
_NEWLINES = re.compile(r"\n+")


class CitationError(RuntimeError):
    """Citation scoring cannot run (the sentence splitter's data or the NLI model is missing)."""


def normalize_output(output: str, completion_prefix: str = "") -> str:
    """The output as HELMET's citation scorer reads it."""
    return _NEWLINES.sub(" ", completion_prefix + output).replace("<|im_end|>", "")


def strip_citations(sentence: str) -> str:
    """The claim of a sentence: citation marks removed as HELMET removes them."""
    text = _BARE_MARK.sub("", _SPACED_MARK.sub("", sentence))
    return text.replace(" |", "").replace("]", "")


def cited_indices(sentence: str) -> list[int]:
    """0-based passage indices cited in a sentence, in order, repeats kept ("[0]" gives -1)."""
    return [int(n) - 1 for n in _CITE_MARK.findall(sentence)]


def resolve(index: int, num_docs: int) -> int | None:
    """The list position a cited index reads (-1: the last passage), None past the end."""
    if index >= num_docs or index < -num_docs:
        return None
    return index % num_docs


def claims(output: str, question: str, *, qampari: bool, split: Splitter) -> list[str]:
    """The sentences (ASQA) or list items (QAMPARI) of a normalised output, citations still in."""
    if qampari:
        items = output.rstrip().rstrip(".").rstrip(",").split(",")
        return [f"{question} {item.strip()}" for item in items]
    return [s for s in split(output) if len(s.strip()) >= MIN_CLAIM_CHARS]


def format_doc(doc: Mapping[str, Any]) -> str:
    body = doc["sent"] if "sent" in doc else doc.get("text", "")
    return f"Title: {doc.get('title', '')}\n{body}"


@dataclass(frozen=True)
class CiteInput:
    """What one sample's citations are scored from."""

    output: str
    """The normalised output (:func:`normalize_output`)."""
    question: str
    docs: Mapping[int, Mapping[str, Any]]
    """Passages by list position (0-based); only the cited ones are needed."""
    num_docs: int
    """Length of the sample's full passage list (decides which citations are out of range)."""
    qampari: bool = False


@dataclass
class ClaimCheck:
    claim: str
    cited: list[int]
    """0-based indices as written (at most :data:`AT_MOST_CITATIONS` when in range)."""
    supported: bool = False
    rejected: str | None = None
    """Why the claim was unsupported without asking the model."""
    needed: list[bool] = field(default_factory=list)
    """Per citation of a supported multi-citation claim: whether it is needed."""

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = {"claim": self.claim, "cited": [i + 1 for i in self.cited],
                               "supported": self.supported}
        if self.rejected:
            out["rejected"] = self.rejected
        if self.needed:
            out["needed"] = self.needed
        return out


@dataclass
class CiteScore:
    """One sample's citation scores (0-1) and the check of every claim."""

    recall: float
    precision: float
    citations: int
    checks: list[ClaimCheck]

    def to_json(self) -> dict[str, Any]:
        return {"recall": self.recall, "precision": self.precision, "claims": len(self.checks),
                "citations": self.citations, "checks": [c.to_json() for c in self.checks]}


class _Asker:
    """Collects (premise, claim) pairs for a round and answers them in one batch, each distinct
    pair once."""

    def __init__(self, entails: Entails):
        self.entails = entails
        self.known: dict[tuple[str, str], bool] = {}

    def run(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        todo = list(dict.fromkeys(p for p in pairs if p not in self.known))
        if todo:
            answers = list(self.entails(todo))
            if len(answers) != len(todo):
                raise CitationError(f"entailment returned {len(answers)} answers for "
                                    f"{len(todo)} pairs")
            self.known.update(zip(todo, (bool(a) for a in answers), strict=True))
        return [self.known[p] for p in pairs]


def _passages(item: CiteInput, refs: Sequence[int]) -> str:
    return "\n".join(format_doc(item.docs[resolve(r, item.num_docs)]) for r in refs)


def score_citations(items: Sequence[CiteInput], entails: Entails, *, split: Splitter
                    ) -> list[CiteScore | None]:
    """Citation recall and precision of each sample (None: no claim, left out of the means)."""
    checks: list[list[ClaimCheck] | None] = []
    targets: list[tuple[int, int, str]] = []  # (sample, claim, checked text)
    for s, item in enumerate(items):
        sents = claims(item.output, item.question, qampari=item.qampari, split=split)
        if not sents:
            checks.append(None)
            continue
        mine = []
        for c, sent in enumerate(sents):
            refs = cited_indices(sent)
            check = ClaimCheck(strip_citations(sent).strip(), refs)
            if not refs:
                check.rejected = "no citation"
            elif any(resolve(r, item.num_docs) is None for r in refs):
                check.rejected = "cites past the passage list"
            else:
                check.cited = refs[:AT_MOST_CITATIONS]
                targets.append((s, c, check.claim))
            mine.append(check)
        checks.append(mine)

    ask = _Asker(entails)
    joint = ask.run([(_passages(items[s], checks[s][c].cited), claim)
                     for s, c, claim in targets])
    multi = []
    for (s, c, _), ok in zip(targets, joint, strict=True):
        checks[s][c].supported = ok
        if ok and len(checks[s][c].cited) > 1:
            multi.append((s, c))
    singles = [(s, c, k) for s, c in multi for k in range(len(checks[s][c].cited))]
    alone = ask.run([(_passages(items[s], [checks[s][c].cited[k]]), checks[s][c].claim)
                     for s, c, k in singles])
    retry = [(s, c, k) for (s, c, k), ok in zip(singles, alone, strict=True) if not ok]
    others = ask.run([(_passages(items[s], _without(checks[s][c].cited, k)), checks[s][c].claim)
                      for s, c, k in retry])
    redundant = {key for key, ok in zip(retry, others, strict=True) if ok}
    for s, c in multi:
        checks[s][c].needed = [(s, c, k) not in redundant
                               for k in range(len(checks[s][c].cited))]

    out: list[CiteScore | None] = []
    for mine in checks:
        if mine is None:
            out.append(None)
            continue
        kept = sum(len(ch.cited) for ch in mine if ch.rejected is None)
        credit = sum(sum(ch.needed) if ch.needed else int(ch.supported) for ch in mine)
        out.append(CiteScore(recall=sum(ch.supported for ch in mine) / len(mine),
                             precision=credit / kept if kept else 0.0, citations=kept,
                             checks=mine))
    return out


def _without(refs: Sequence[int], k: int) -> list[int]:
    """The citations without the k-th; HELMET removes the first occurrence of its value, which for
    a repeated citation is the same multiset."""
    rest = list(refs)
    rest.remove(refs[k])
    return rest


def task_means(scores: Sequence[tuple[float, float] | None]) -> tuple[float, float]:
    """(citation recall, citation precision) of a task at one length, 0-100, from its samples'
    (recall, precision) in 0-1: means over the samples with claims (None: none), 0 when no
    sample has one (as HELMET reports it)."""
    kept = [s for s in scores if s is not None]
    if not kept:
        return 0.0, 0.0
    return (100 * sum(r for r, _ in kept) / len(kept), 100 * sum(p for _, p in kept) / len(kept))


# ---------------------------------------------------------------------------------------------
# Records: what a sample carries to the scorer, and the scores it gets back
# ---------------------------------------------------------------------------------------------

def cite_inputs(output: str, question: str, docs: Sequence[Mapping[str, Any]], *,
                completion_prefix: str = "") -> dict[str, Any]:
    """A record's ``cite_inputs``: the question, the full list's length and only the passages its
    output cites (a 128K prompt holds hundreds; samples.jsonl keeps what the score read). The
    question is searched too: QAMPARI's claims start with it."""
    text = normalize_output(output, completion_prefix)
    cited = {resolve(i, len(docs)) for i in cited_indices(f"{question} {text}")} - {None}
    return {"question": question, "num_docs": len(docs), "completion_prefix": completion_prefix,
            "docs": {str(i): {k: docs[i][k] for k in ("title", "text", "sent") if k in docs[i]}
                     for i in sorted(cited)}}


def input_of(record: Mapping[str, Any]) -> CiteInput:
    inputs = record["cite_inputs"]
    return CiteInput(normalize_output(record["output"], inputs.get("completion_prefix", "")),
                     inputs["question"], {int(k): v for k, v in inputs["docs"].items()},
                     int(inputs["num_docs"]), qampari=record["task"] in QAMPARI_TASKS)


CITE_METRIC = "alce_cite"
"""The metric of an ALCE record whose citations were scored."""


def score_records(records: list[dict[str, Any]], entails: Entails, *, split: Splitter,
                  model: str) -> int:
    """Score the citations of every ALCE record in place (``citation`` and metric
    :data:`CITE_METRIC`); returns how many were scored. ``score`` stays the correctness."""
    todo = [r for r in records if "cite_inputs" in r and "skipped" not in r]
    for r, s in zip(todo, score_citations([input_of(r) for r in todo], entails, split=split),
                    strict=True):
        r["citation"] = {"nli_model": model, **(s.to_json() if s is not None else
                                                {"recall": None, "precision": None,
                                                 "claims": 0})}
        r["metric"] = CITE_METRIC
    return len(todo)
