"""What a pretrained base can read in its context: copy and needle-lookup accuracy, teacher-forced.

The quickstart's base (``jobs/quickstart/base/``) is there so that the quickstart's HELMET recall
scores show something: it must have an induction circuit (copy a span seen earlier) and use it to
look a key up. HELMET's scores come only after SFT; this probe reads the base itself, on
documents none of its training streams hold (their own seed), so ``make quickstart-base`` can say
whether the circuit formed:

- **copy**: documents of ``prolong.data.repeats`` (symbol segments repeated 2-6 times); the
  share of tokens after the first line that the model predicts (argmax) exactly. Without an
  induction circuit this sits near chance (about 1/36).
- **needle**: RULER-style needle lists in HELMET's phrasing (``prolong.data.retrieval``, 4-20
  needles, 3 questions each); for each answer, whether every token of the 7-digit value is
  predicted (``needle_exact``) and whether its first one is (``needle_first``, the lookup itself:
  once the right needle is found, the remaining digits are a copy).

Run: ``.venv/bin/python bench/base_probe.py [MODEL_DIR] [--documents N] [--json]``
(MODEL_DIR: a final/ directory; default the shipped quickstart base).
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from prolong.data.repeats import repeat_document  # noqa: E402
from prolong.data.retrieval import ONE_PREFIX, needle_document  # noqa: E402

SHIPPED_BASE = ROOT / "jobs/quickstart/base/final"
SEED = "base-probe"
"""Held out: the training corpora draw from other seeds (prolong.data.corpus)."""
ANSWER_LEAD = ONE_PREFIX.format(one="number", query="{key}").split("{key}")[0]


def probe_documents(count: int) -> tuple[list[str], list[str]]:
    """``count`` needle documents and ``count`` copy documents, a pure function of ``count``."""
    rng = random.Random(SEED)
    needles = [needle_document(rng, rng.randint(4, 20), 3, uuids=False) for _ in range(count)]
    copies = [repeat_document(rng, "symbols") for _ in range(count)]
    return needles, copies


def answer_spans(text: str) -> list[tuple[int, int]]:
    """Character spans of the values after each "The special magic number for K ... is"."""
    spans, i = [], 0
    while (i := text.find(ANSWER_LEAD, i)) >= 0:
        start = text.index(" is ", i) + len(" is")
        end = text.index(".", start)
        spans.append((start, end))
        i = end
    return spans


def probe(model_dir: str | Path, documents: int = 48) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    needles, copies = probe_documents(documents)

    def predictions(text: str):
        enc = tok(text, return_offsets_mapping=True, add_special_tokens=False)
        ids = enc["input_ids"]
        with torch.no_grad():
            pred = model(torch.tensor([ids])).logits[0].argmax(-1).tolist()
        return ids, pred, enc["offset_mapping"]

    exact = first = answers = 0
    for text in needles:
        ids, pred, offsets = predictions(text)
        for start, end in answer_spans(text):
            span = [t for t, (s, e) in enumerate(offsets) if t > 0 and s >= start and e <= end]
            hits = [pred[t - 1] == ids[t] for t in span]
            answers += 1
            exact += all(hits)
            first += hits[0]
    copied = scored = 0
    for text in copies:
        ids, pred, offsets = predictions(text)
        first_line = text.index("\n")
        for t in range(1, len(ids)):
            if offsets[t][0] > first_line:
                copied += pred[t - 1] == ids[t]
                scored += 1
    return {"copy": copied / scored, "needle_first": first / answers,
            "needle_exact": exact / answers, "answers": answers, "documents": documents}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model_dir", nargs="?", default=str(SHIPPED_BASE))
    parser.add_argument("--documents", type=int, default=48)
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    args = parser.parse_args(argv)
    result = probe(args.model_dir, args.documents)
    if args.json:
        print(json.dumps(result))
    else:
        print(f"{args.model_dir}: copy {result['copy']:.3f}, needle lookup (first digit) "
              f"{result['needle_first']:.3f}, needle exact {result['needle_exact']:.3f} "
              f"({result['answers']} answers, {result['documents']} documents of each kind)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
