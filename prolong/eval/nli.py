"""The entailment model behind ALCE citation scores, and the sentence splitter they use.

HELMET checks citations with TRUE (google/t5_xxl_true_nli_mixture, a T5-11B fine-tuned for NLI):
the input is "premise: <passages> hypothesis: <claim>", the model generates up to 10 tokens
greedily, and the pair is entailed when the decoded text (special tokens skipped) is exactly
"1". HELMET feeds the whole input, never truncated (T5's relative positions take any length),
in bfloat16 on a GPU. :class:`Seq2SeqEntailment` does the same with any local seq2seq checkpoint
named by ``EvalJob.spec.nliModel``, batched: pairs are sorted by length and padded, which changes
nothing but the padding a T5 encoder masks out.

Sentences are split with NLTK's pretrained English Punkt model, as HELMET's ``sent_tokenize``;
its data (``punkt_tab``) is installed with ``python -m nltk.downloader punkt_tab`` where
citations are scored. :func:`preflight` finds a missing model or splitter before any model
loads.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Sequence
from typing import Any, Protocol

from prolong.data.errors import DataError
from prolong.eval.citations import CITE_TASKS, QAMPARI_TASKS, Splitter

NLI_INPUT = "premise: {premise} hypothesis: {hypothesis}"
MAX_NEW_TOKENS = 10
ENTAILED = "1"
DEFAULT_BATCH = 16


class CitationDataMissing(DataError):
    """What citation scoring needs is not on this machine: bad input, found before generation."""


class Entailment(Protocol):
    """Whether each premise entails its hypothesis."""

    name: str

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]: ...


class Seq2SeqEntailment:
    """A seq2seq NLI model (TRUE's interface) from a local directory, on one device."""

    def __init__(self, path: str, *, device: str = "cpu", batch_size: int = DEFAULT_BATCH,
                 name: str | None = None):
        import torch
        from transformers import AutoModelForSeq2SeqLM

        self.name = name or path
        self.device = device
        self.batch_size = max(1, batch_size)
        self.tok = load_tokenizer(path)
        dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
        self.model = AutoModelForSeq2SeqLM.from_pretrained(
            path, local_files_only=True, dtype=dtype).to(device).eval()

    def __call__(self, pairs: Sequence[tuple[str, str]]) -> list[bool]:
        import torch

        texts = [NLI_INPUT.format(premise=p, hypothesis=h) for p, h in pairs]
        lengths = [len(ids) for ids in self.tok(texts, add_special_tokens=True)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: -lengths[i])
        out = [False] * len(texts)
        for start in range(0, len(order), self.batch_size):
            idx = order[start:start + self.batch_size]
            batch = self.tok([texts[i] for i in idx], padding=True, return_tensors="pt")
            with torch.inference_mode():
                gen = self.model.generate(
                    input_ids=batch["input_ids"].to(self.device),
                    attention_mask=batch["attention_mask"].to(self.device),
                    max_new_tokens=MAX_NEW_TOKENS, do_sample=False, num_beams=1)
            for i, row in zip(idx, gen, strict=True):
                out[i] = self.tok.decode(row, skip_special_tokens=True) == ENTAILED
        return out


@functools.lru_cache(maxsize=1)
def english_splitter() -> Splitter:
    """NLTK's pretrained English sentence splitter (HELMET's ``sent_tokenize``: the same Punkt
    model, which NLTK ships as ``punkt_tab`` since 3.8.2 and as a pickle before)."""
    from nltk.tokenize import PunktTokenizer

    try:
        return PunktTokenizer("english").tokenize
    except LookupError:
        raise CitationDataMissing(
            "nliModel: ASQA citation scores split sentences with NLTK's English Punkt model, "
            "which is not installed here (python -m nltk.downloader punkt_tab)") from None


def split_english(text: str) -> list[str]:
    """Sentences of ``text``; the splitter loads on first use (QAMPARI never needs it)."""
    return english_splitter()(text)


def cites(tasks: Sequence[str]) -> bool:
    return any(t in CITE_TASKS for t in tasks)


def preflight(nli_model: str | None, tasks: Sequence[str]) -> None:
    """Before any model loads: the NLI model is a local model directory and, for ASQA, the
    sentence splitter's data is installed. Object-store paths are checked where they are read."""
    if nli_model is None or not cites(tasks):
        return
    if "://" not in nli_model and not os.path.isfile(os.path.join(nli_model, "config.json")):
        raise CitationDataMissing(f"nliModel {nli_model}: not a local model directory (no "
                                  "config.json); give a local copy of a seq2seq NLI model "
                                  "(HELMET: google/t5_xxl_true_nli_mixture)")
    if "://" not in nli_model:
        load_tokenizer(nli_model)  # seconds now rather than a failure after hours of generation
    if any(t in CITE_TASKS and t not in QAMPARI_TASKS for t in tasks):
        english_splitter()


PROBE = NLI_INPUT.format(premise="", hypothesis="")
"""Text every NLI tokenizer must encode without unknown tokens (its own input format)."""


def load_tokenizer(path: str) -> Any:
    """The NLI model's tokenizer. transformers builds an empty one (every word unknown) for a
    directory without vocabulary files; that would score every citation from noise, so a
    tokenizer that cannot encode :data:`PROBE` is refused."""
    from transformers import AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except Exception as exc:  # any loader failure is the same bad input: report it in one line
        first = (str(exc).strip().splitlines() or [""])[0]
        raise CitationDataMissing(
            f"nliModel {path}: its tokenizer does not load ({type(exc).__name__}: {first}); "
            "a checkpoint with only spiece.model may need the sentencepiece package") from None
    unknown = tok.unk_token_id
    if unknown is not None and unknown in tok(PROBE, add_special_tokens=False)["input_ids"]:
        raise CitationDataMissing(f"nliModel {path}: its tokenizer has no vocabulary for "
                                  f"{PROBE.strip()!r} (vocabulary files missing?)")
    return tok


def score_shard(records: list[dict[str, Any]], config: dict[str, Any]) -> list[dict[str, Any]]:
    """One worker's ALCE records, their citations scored with the NLI model (loaded here)."""
    from prolong.eval.citations import score_records
    from prolong.stage.directory import local_copy

    if not records:
        return records
    path = local_copy(config["nli_model"])
    entails = Seq2SeqEntailment(path, device=config["device"], name=config["nli_model"])
    score_records(records, entails, split=split_english, model=entails.name)
    return records
