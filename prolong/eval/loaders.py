"""HELMET's non-synthetic tasks from its released data files in ``EvalJob.spec.dataDir``.

**What was verified, and against what.** Nothing here has been run on HELMET's real files (they
cannot be downloaded where this was written). File names, field names, prompt templates, demo
formats and the passage counts per length were written from HELMET's public code (princeton-nlp/
HELMET: ``data.py`` and ``configs/*.yaml``), read as reference, and are tested on small files in
that format written by the tests. Where HELMET does not read a released file but a Hugging Face
dataset (ICL, NarrativeQA, ∞Bench, Multi-LexSum), we read a jsonl export of that dataset with the
dataset's own field names, at the paths listed below -- our convention, not HELMET's.

Layout under ``dataDir`` (HELMET's ``data/`` directory, plus the exports):

==================  ==========================================================================
nq, triviaqa        ``kilt/{nq,triviaqa}-dev-multikilt_1000_k{K}_dep6.jsonl``, demos
                    ``kilt/{name}-train-multikilt_1000_k3_dep6.jsonl``
hotpotqa            the same with ``dep3``
popqa               ``kilt/popqa_test_1000_k{K}_dep6.jsonl`` (demos: the k3 file, other
                    questions); HELMET's kilt_popqa_3 keeps log10(s_pop) < 3
                    -- records: question, answers, ctxs [{title, text, has_answer}], id?, s_pop?
msmarco             ``msmarco/test_reranking_data_k{K}_dep3.jsonl``, demos the k10 file
                    -- records: qid, query, ctxs [{id, title?, text, label}]
trec_coarse, ...    ``icl/{task}/train.jsonl`` and ``icl/{task}/test.jsonl`` -- exports of
                    CogComp/trec (text, coarse_label / fine_label), PolyAI/banking77 (text,
                    label), clinc_oos plus (text, intent), nlu_evaluation_data (text, label)
narrativeqa         ``narrativeqa/test.jsonl`` (+ ``train.jsonl`` for demo questions) -- HF
                    narrativeqa: document.text, question.text, answers[].text
infbench_*          ``infbench/longbook_{qa,choice,sum}_eng.jsonl`` -- InfiniteBench's files:
                    id, context, input, answer [..], options [..]
multi_lexsum        ``multi_lexsum/validation.jsonl`` (+ ``train.jsonl`` for demos) -- HF
                    allenai/multi_lexsum: sources [..], summary/short
alce_asqa, _qampari ``alce/{asqa,qampari}_eval_gtr_top2000.json`` (JSON list or jsonl) and the
                    prompt file ``{asqa,qampari}_revised.json`` under ``alce/`` or ``prompts/``
                    (instruction, demo_prompt, doc_prompt, demos) -- records: question, docs
                    [{title, text}], qa_pairs [{short_answers}] (ASQA) or answers [[aliases]]
==================  ==========================================================================

Sizing, per length L (see prolong.eval.sizing; the input budget B is L minus the task's output
budget, in tokens of the evaluated model's tokenizer):

- ``sizing: helmet``: RAG / re-rank read the file with HELMET's passage count for L and use all of
  a record's passages; ICL uses HELMET's shot count (label-balanced; labels mapped to random
  integers per sample); ALCE HELMET's document count; long documents are cut to L minus HELMET's
  reserve with the counting tokenizer (Llama-2's in HELMET) and filtered by HELMET's length
  bounds. Then the end of the context is truncated until the prompt fits B.
- ``sizing: fill``: as many passages (never dropping the gold ones: has_answer / label > 0), demos
  or documents as fit B, from the file with the nearest larger K; long documents are cut to what
  fits and marked " ... [the rest of the text is omitted]".

Sample i of a task is record i of the file shuffled with the eval seed; indices past the end of a
file give no sample (:func:`load_sample` returns None).
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import math
import os
import random
import re
from collections.abc import Callable, Iterator
from typing import Any

from prolong.eval.samples import PromptFormat, Sample, TooShort
from prolong.eval.sizing import (
    DOCUMENT_RESERVE,
    LENGTH_FILTERS,
    OMITTED,
    Sizing,
    keeps_document,
    precut_document,
    size_prompt,
)
from prolong.eval.tasks import HELMET_TASKS


class MissingData(FileNotFoundError):
    """A task's released data file is not in dataDir."""



RAG_FILES = {
    "nq": ("kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl", "kilt/nq-train-multikilt_1000_k3_dep6.jsonl"),
    "triviaqa": ("kilt/triviaqa-dev-multikilt_1000_k{k}_dep6.jsonl",
                 "kilt/triviaqa-train-multikilt_1000_k3_dep6.jsonl"),
    "hotpotqa": ("kilt/hotpotqa-dev-multikilt_1000_k{k}_dep3.jsonl",
                 "kilt/hotpotqa-train-multikilt_1000_k3_dep3.jsonl"),
    "popqa": ("kilt/popqa_test_1000_k{k}_dep6.jsonl", "kilt/popqa_test_1000_k3_dep6.jsonl"),
}
RERANK_FILES = ("msmarco/test_reranking_data_k{k}_dep3.jsonl",
                "msmarco/test_reranking_data_k10_dep3.jsonl")
POPQA_POPULARITY = 3.0
"""HELMET's kilt_popqa_3: only entities with log10(popularity) below 3."""

ICL_LABEL_FIELDS = {"trec_coarse": "coarse_label", "trec_fine": "fine_label", "clinc150": "intent"}
INFBENCH_FILES = {"infbench_qa": "longbook_qa_eng", "infbench_mc": "longbook_choice_eng",
                  "infbench_sum": "longbook_sum_eng"}

RAG_INSTRUCTION = ("Use the given documents to write a concise and short answer to the question. "
                   "Write your answer in the following format:\nAnswer: [answer]")
RERANK_INSTRUCTION = ("You are provided with a list of documents, each indicated by their ID. Rank "
                      "each document based on their relevance to the question in descending order "
                      "from most relelvant to least relevant texts. Include all documents in the "
                      "rankings. Write your answer using the unique IDs, with the following "
                      "format:\nRanking: ID3 > ID1 > ID2")  # "relelvant": HELMET's spelling
ICL_INSTRUCTION = ('Use the provided mapping from the text to label to assign a label to the text. '
                   'Only output "label: {label}" and nothing else. ')
NARRATIVEQA_INSTRUCTION = ("You are given a story, which can be either a novel or a movie script, "
                           "and a question. Answer the question as concisely as you can, using a "
                           "single phrase if possible.")
INFBENCH_QA_INSTRUCTION = ("You are given a story and a question. Answer the question as concisely "
                           "as you can, using a single phrase if possible.")
INFBENCH_MC_INSTRUCTION = ("You are given a story and a question with multiple choices. Choose the "
                           "best answer from the options provided. Only one of the following "
                           "options is correct, output the answer using one single letter (A, B, "
                           "C, or D). Don't say anything else.")
INFBENCH_SUM_INSTRUCTION = ("You are given a book and you are tasked to summarize it. Write a "
                            "summary of about 1000 to 1200 words. Only write about the plot and "
                            "characters of the story. Do not discuss the themes or background of "
                            "the book. Do not provide any analysis or commentary.")
LEXSUM_INSTRUCTION = ("You are given the legal documents in a civil rights lawsuit, and you are "
                      "tasked to summarize the case. Write a concise summary of one paragraph (200 "
                      "to 250 words). The summary should contain a short description of the "
                      "background, the parties involved, and the outcomes of the case.")


# ---------------------------------------------------------------------------------------------
# Files
# ---------------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=16)
def read_records(path: str) -> tuple[dict[str, Any], ...]:
    """Records of a .jsonl file, or of a .json file holding a list or {"data": [...]}."""
    with open(path, encoding="utf-8") as f:
        if path.endswith(".jsonl"):
            return tuple(json.loads(line) for line in f if line.strip())
        data = json.load(f)
    if isinstance(data, dict) and "data" in data:
        data = data["data"]
    return tuple(data)


def _require(data_dir: str, rel: str) -> str:
    path = os.path.join(data_dir, rel)
    if not os.path.isfile(path):
        raise MissingData(f"{path}: missing (HELMET's released data; see prolong.eval.loaders)")
    return path


def passages_for(task: str, length: int, sizing: Sizing) -> int:
    """Passages wanted at ``length``: HELMET's count where it has one; elsewhere (fill only) the
    8K count scaled with the length (at least 1)."""
    if sizing.mode == "helmet":
        return sizing.amount(task, length)
    try:
        return sizing.amount(task, length)
    except ValueError:
        return max(1, math.ceil(sizing.amount(task, 8192) * length / 8192))


def k_file(data_dir: str, pattern: str, want: int, sizing: Sizing) -> str:
    """helmet: exactly HELMET's file for ``want`` passages; fill: :func:`pick_k_file`."""
    if sizing.mode == "helmet":
        return _require(data_dir, pattern.format(k=want))
    return pick_k_file(data_dir, pattern, want)


def pick_k_file(data_dir: str, pattern: str, want: int) -> str:
    """The file of ``pattern`` (``{k}`` = passage count) with the smallest K >= ``want``, else the
    largest K there is."""
    regex = re.compile(re.escape(pattern).replace(re.escape("{k}"), r"(\d+)") + "$")
    found = []
    for path in glob.glob(os.path.join(glob.escape(data_dir), pattern.replace("{k}", "*"))):
        m = regex.search(path.replace(os.sep, "/"))
        if m:
            found.append((int(m.group(1)), path))
    if not found:
        raise MissingData(f"{os.path.join(data_dir, pattern.replace('{k}', '<K>'))}: no file "
                          "(HELMET's released data; see prolong.eval.loaders)")
    larger = sorted(f for f in found if f[0] >= want)
    return larger[0][1] if larger else max(found)[1]


def sample_order(n: int, seed: int, task: str) -> list[int]:
    order = list(range(n))
    random.Random(f"{seed}/{task}/order").shuffle(order)
    return order


def _key_rng(key: str, seed: int) -> random.Random:
    return random.Random(int(hashlib.sha256(key.encode()).hexdigest(), 16) % 2**31 + seed)


def _pick_demos(demos: tuple[dict[str, Any], ...], key: str, key_of: Callable[[dict], str],
                shots: int, seed: int) -> list[dict[str, Any]]:
    """``shots`` demos with distinct keys other than ``key``, the same for the same question."""
    rng = _key_rng(key, seed)
    order = list(range(len(demos)))
    rng.shuffle(order)
    out, keys = [], {key}
    for i in order:
        if len(out) >= shots:
            break
        k = key_of(demos[i])
        if k not in keys:
            keys.add(k)
            out.append(demos[i])
    return out


def _truncator(fmt: PromptFormat, doc: str) -> tuple[Callable[[int], str], int]:
    """(first-n-tokens-of-doc, token count of doc); a cut document ends with HELMET's marker."""
    offsets = fmt.offsets(doc)

    def cut(n: int) -> str:
        if n >= len(offsets):
            return doc
        return (doc[: offsets[n - 1][1]] if n > 0 else "") + OMITTED
    return cut, len(offsets)


def _keep(n: int, gold: list[bool]) -> list[int]:
    """Indices of the passages kept when ``n`` fit: every gold one, then the others in order."""
    golds = [i for i, g in enumerate(gold) if g]
    others = [i for i, g in enumerate(gold) if not g][: max(0, n - len(golds))]
    return sorted(golds + others)


def _depth(kept: list[int], gold: list[bool]) -> float | None:
    pos = [j for j, i in enumerate(kept) if gold[i]]
    if not pos:
        return None
    return pos[0] / max(len(kept) - 1, 1)


# ---------------------------------------------------------------------------------------------
# RAG and re-rank
# ---------------------------------------------------------------------------------------------

def _passage(c: dict[str, Any]) -> str:
    return f"Document (Title: {c.get('title', '')}): {c['text']}"


def _rag_key(r: dict[str, Any]) -> str:
    return str(r.get("id", r["question"]))


def _popular_enough(r: dict[str, Any]) -> bool:
    pop = r.get("s_pop")
    return pop is None or (pop > 0 and math.log10(pop) < POPQA_POPULARITY)


def rag(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
        shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    info = HELMET_TASKS[task]
    test_pat, demo_rel = RAG_FILES[task]
    want = passages_for(task, length, sizing)
    records = read_records(k_file(data_dir, test_pat, want, sizing))
    demos = read_records(_require(data_dir, demo_rel))
    if task == "popqa":
        records = tuple(r for r in records if _popular_enough(r))
        demos = tuple(r for r in demos if _popular_enough(r))
    if index >= len(records):
        return None
    rec = records[sample_order(len(records), seed, task)[index]]
    chosen = _pick_demos(demos, _rag_key(rec), _rag_key, shots, seed)
    demo_text = "".join(
        "\n\n".join(_passage(c) for c in d["ctxs"]) + f"\n\nQuestion: {d['question']}\n"
        f"Answer: {d['answers'][0]}\n\n" for d in chosen)
    ctxs = rec["ctxs"]
    gold = [bool(c.get("has_answer")) for c in ctxs]

    def render(context: str) -> tuple[str, bool]:
        user = f"{RAG_INSTRUCTION}\n\n{demo_text}{context}\n\nQuestion: {rec['question']}"
        return fmt.render(user, "Answer:", chat=info.chat)

    def parts(n: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        idx = range(len(ctxs)) if sizing.mode == "helmet" else _keep(n, gold)
        return "\n\n".join(_passage(ctxs[i]) for i in idx), render

    n, prompt, special, tokens, cut = size_prompt(sizing, task, fmt, length, parts,
                                                  helmet_n=len(ctxs), upper=len(ctxs), guess=want)
    kept = list(range(len(ctxs))) if sizing.mode == "helmet" else _keep(n, gold)
    return Sample(task, length, index, prompt, list(rec["answers"]), tokens, _depth(kept, gold),
                  special, "Answer:", {"passages": len(kept), "truncated": cut})


def _rerank_passage(c: dict[str, Any]) -> str:
    if "title" in c:
        return f"[ID: {c['id']}] Document (Title: {c['title']}): {c['text']}"
    return f"[ID: {c['id']}] Document: {c['text']}"


def _ranking(ctxs: list[dict[str, Any]]) -> str:
    return " > ".join(str(c["id"]) for c in sorted(ctxs, key=lambda c: c["label"], reverse=True))


def msmarco(fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
            shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    info = HELMET_TASKS["msmarco"]
    want = passages_for("msmarco", length, sizing)
    records = read_records(k_file(data_dir, RERANK_FILES[0], want, sizing))
    demos = read_records(_require(data_dir, RERANK_FILES[1]))
    if index >= len(records):
        return None
    rec = records[sample_order(len(records), seed, "msmarco")[index]]
    chosen = _pick_demos(demos, str(rec["qid"]), lambda d: str(d["qid"]), shots, seed)
    demo_text = "".join(
        "\n\n".join(_rerank_passage(c) for c in d["ctxs"]) + f"\n\nQuery: {d['query']}\n"
        f"Ranking: {_ranking(d['ctxs'])}\n\n" for d in chosen)
    ctxs = [{**c, "id": str(c["id"])} for c in rec["ctxs"]]
    gold = [int(c["label"]) > 0 for c in ctxs]

    def render(context: str) -> tuple[str, bool]:
        user = f"{RERANK_INSTRUCTION}\n\n{demo_text}{context}\n\nQuery: {rec['query']}"
        return fmt.render(user, "Ranking:", chat=info.chat)

    def kept_ids(n: int) -> list[int]:
        return list(range(len(ctxs))) if sizing.mode == "helmet" else _keep(n, gold)

    def parts(n: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        return "\n\n".join(_rerank_passage(ctxs[i]) for i in kept_ids(n)), render

    n, prompt, special, tokens, cut = size_prompt(sizing, "msmarco", fmt, length, parts,
                                                  helmet_n=len(ctxs), upper=len(ctxs), guess=want)
    kept = [ctxs[i] for i in kept_ids(n)]
    # HELMET scores against every passage's label of the record (its qrels), kept or cut.
    return Sample("msmarco", length, index, prompt, [_ranking(kept)], tokens, None, special,
                  "Ranking:", {"qrels": {c["id"]: int(c["label"]) for c in kept},
                               "passages": len(kept), "truncated": cut})


# ---------------------------------------------------------------------------------------------
# ICL
# ---------------------------------------------------------------------------------------------

def _label_field(task: str, record: dict[str, Any]) -> str:
    name = ICL_LABEL_FIELDS.get(task, "label")
    return name if name in record else "label"


def _balanced_demos(train: tuple[dict[str, Any], ...], field: str, rng: random.Random
                    ) -> Iterator[dict[str, Any]]:
    """Label-balanced demos, endlessly: rounds of one random example per label, each round in a
    random order (HELMET's ``balance``: every label equally often)."""
    by_label: dict[Any, list[dict[str, Any]]] = {}
    for r in train:
        by_label.setdefault(r[field], []).append(r)
    labels = sorted(by_label, key=str)
    while True:
        rnd = [rng.choice(by_label[lab]) for lab in labels]
        rng.shuffle(rnd)
        yield from rnd


def icl(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
        sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    info = HELMET_TASKS[task]
    train = read_records(_require(data_dir, f"icl/{task}/train.jsonl"))
    test = read_records(_require(data_dir, f"icl/{task}/test.jsonl"))
    if index >= len(test):
        return None
    rec = test[sample_order(len(test), seed, task)[index]]
    field = _label_field(task, rec)
    num_labels = 1 + max(int(r[field]) for r in (*train, *test))
    local = (int(hashlib.sha256(rec["text"].encode()).hexdigest(), 16) + seed) % 2**31
    rng = random.Random(local)
    mapping = list(range(num_labels))  # labels become random integers (HELMET's default)
    rng.shuffle(mapping)
    stream = _balanced_demos(train, field, rng)
    demos: list[str] = []

    def render(context: str) -> tuple[str, bool]:
        return fmt.render(f"{ICL_INSTRUCTION}\n\n{context}\n\n{rec['text']}", "label:",
                          chat=info.chat)

    def parts(n: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        while len(demos) < n:
            d = next(stream)
            demos.append(f"{d['text']}\nlabel: {mapping[int(d[field])]}")
        return "\n\n".join(demos[:n]), render

    helmet_n = sizing.amount(task, length) if sizing.mode == "helmet" else 0
    n, prompt, special, tokens, cut = size_prompt(sizing, task, fmt, length, parts,
                                                  helmet_n=helmet_n, guess=max(1, length // 16))
    return Sample(task, length, index, prompt, [str(mapping[int(rec[field])])], tokens, None,
                  special, "label:", {"demos": n, "truncated": cut})


# ---------------------------------------------------------------------------------------------
# Long documents: NarrativeQA, ∞Bench, Multi-LexSum
# ---------------------------------------------------------------------------------------------

def _text(value: Any) -> str:
    return value["text"] if isinstance(value, dict) else str(value)


def _nqa_fields(r: dict[str, Any]) -> tuple[str, str, list[str]]:
    doc = _text(r["document"]) if "document" in r else r["context"]
    question = _text(r["question"])
    answers = r.get("answers", r.get("answer"))
    answers = [_text(a) for a in answers] if isinstance(answers, list) else [str(answers)]
    return doc, question, answers


_DOC_TOKENS: dict[tuple[int, str], int] = {}


def _doc_tokens(counter: PromptFormat, doc: str) -> int:
    """Counting-tokenizer length of a document, special tokens included (HELMET's filter counts
    ``tokenizer(text)``); cached, since NarrativeQA asks ~30 questions per book."""
    key = (id(counter), hashlib.sha256(doc.encode()).hexdigest())
    if key not in _DOC_TOKENS:
        _DOC_TOKENS[key] = counter.count(doc, add_special_tokens=True)
    return _DOC_TOKENS[key]


def length_filtered(task: str, records: tuple[dict[str, Any], ...], doc_of: Callable[[dict], str],
                    fmt: PromptFormat, sizing: Sizing) -> tuple[dict[str, Any], ...]:
    """helmet: only the records whose document passes HELMET's length filter for ``task``."""
    if sizing.mode != "helmet" or task not in LENGTH_FILTERS:
        return records
    counter = sizing.count_format(fmt)
    return tuple(r for r in records if keeps_document(task, _doc_tokens(counter, doc_of(r))))


def _long_doc_sample(task: str, fmt: PromptFormat, length: int, index: int, doc: str,
                     make_user: Callable[[str], str], prefix: str, answers: list[str],
                     extra: dict[str, Any] | None = None, sep: str = "\n",
                     sizing: Sizing | None = None) -> Sample:
    sizing = sizing or Sizing()
    info = HELMET_TASKS[task]

    def render(context: str) -> tuple[str, bool]:
        return fmt.render(make_user(context), prefix, chat=info.chat, sep=sep)

    if sizing.mode == "helmet":
        # Cut to HELMET's document budget with its counting tokenizer, then to the input budget.
        doc = precut_document(sizing.count_format(fmt), doc, length - DOCUMENT_RESERVE[task])
        cut, total = (lambda n: doc), 0
    else:
        cut, total = _truncator(fmt, doc)

    def parts(n: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        return cut(n), render

    n, prompt, special, tokens, truncated = size_prompt(
        sizing, task, fmt, length, parts, helmet_n=0, upper=total, guess=length, minimum=0)
    return Sample(task, length, index, prompt, answers, tokens, None, special, prefix,
                  {**(extra or {}), "document_tokens": n, "document_total": total,
                   "truncated": truncated})


def narrativeqa(fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
                shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    test = length_filtered("narrativeqa", read_records(_require(data_dir, "narrativeqa/test.jsonl")),
                           lambda r: _nqa_fields(r)[0], fmt, sizing)
    if index >= len(test):
        return None
    rec = test[sample_order(len(test), seed, "narrativeqa")[index]]
    train_path = os.path.join(data_dir, "narrativeqa/train.jsonl")
    pool = read_records(train_path) if os.path.isfile(train_path) else test
    doc, question, answers = _nqa_fields(rec)
    chosen = _pick_demos(pool, question, lambda r: _nqa_fields(r)[1], shots, seed)
    demo = ""
    if chosen:
        demo = ("For example:\n\n" + "\n\n".join(
            f"Question: {_nqa_fields(d)[1]}\nAnswer: {_nqa_fields(d)[2][0]}" for d in chosen)
            + "\n\nNow, use the following story to answer the question:\n\n")
    return _long_doc_sample(
        "narrativeqa", fmt, length, index, doc,
        lambda ctx: f"{NARRATIVEQA_INSTRUCTION}\n\n{demo}{ctx}\n\nQuestion: {question}",
        "Answer:", answers, {"question": question}, sizing=sizing)


def _options(r: dict[str, Any]) -> str:
    return "\n".join(f"{chr(ord('A') + i)}. {o}" for i, o in enumerate(r["options"]))


def _mc_answers(r: dict[str, Any]) -> list[str]:
    letter = chr(ord("A") + list(r["options"]).index(r["answer"][0]))
    return [letter, f"{letter}. {r['answer'][0]}"]


INFBENCH_KEYPOINTS = "infbench/longbook_sum_eng_keypoints.jsonl"
"""HELMET's key points of the ∞Bench summaries (id, keypoints): what its judge checks recall on."""


def _infbench_keypoints(data_dir: str, rec_id: Any) -> list[str] | None:
    path = os.path.join(data_dir, INFBENCH_KEYPOINTS)
    if not os.path.isfile(path):
        return None
    by_id = {str(r["id"]): r["keypoints"] for r in read_records(path)}
    return by_id.get(str(rec_id))


def infbench(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
             shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    records = read_records(_require(data_dir, f"infbench/{INFBENCH_FILES[task]}.jsonl"))
    records = length_filtered(task, records, lambda r: r["context"], fmt, sizing)
    if index >= len(records):
        return None
    rec = records[sample_order(len(records), seed, task)[index]]
    others = [r for r in records if r.get("id") != rec.get("id")]
    random.Random(f"{seed}/{task}/demos").shuffle(others)
    chosen = others[: shots]
    question = rec.get("input", "")
    extra: dict[str, Any] = {"question": question}
    if task == "infbench_qa":
        items = [f"[story text]\nQuestion: {d['input']}\nAnswer: {d['answer'][0]}" for d in chosen]
        answers = [str(a) for a in rec["answer"]]
        instruction, prefix, sep = INFBENCH_QA_INSTRUCTION, "Answer:", "\n\n"
        tail = f"\n\nQuestion: {question}"
    elif task == "infbench_mc":
        items = [f"[story text]\nQuestion: {d['input']}\nOptions:\n{_options(d)}\n"
                 f"Answer: {_mc_answers(d)[0]}" for d in chosen]
        answers = _mc_answers(rec)
        instruction, prefix, sep = INFBENCH_MC_INSTRUCTION, "Answer:", "\n\n"
        tail = f"\n\nQuestion: {question}\nOptions:\n{_options(rec)}"
    else:
        items = [f"[story text]\nSummary: {d['answer'][0].strip()}" for d in chosen]
        answers = [str(a) for a in rec["answer"]]
        instruction, prefix, sep = INFBENCH_SUM_INSTRUCTION, "Summary:", "\n\n"
        tail = "\n\nNow summarize the book."
        extra = {"keypoints": _infbench_keypoints(data_dir, rec.get("id")),
                 "expert_summary": answers[0]}
    demo = ("For example:\n\n" + "\n\n".join(items) + "\n\nNow, read the following story:\n\n"
            if items else "")
    return _long_doc_sample(task, fmt, length, index, rec["context"],
                            lambda ctx: f"{instruction}\n\n{demo}{ctx}{tail}", prefix, answers,
                            extra, sep=sep, sizing=sizing)


def multi_lexsum(fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
                 shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    test = tuple(r for r in read_records(_require(data_dir, "multi_lexsum/validation.jsonl"))
                 if r.get("summary/short"))
    test = length_filtered("multi_lexsum", test, lambda r: "\n\n".join(r["sources"]), fmt, sizing)
    if index >= len(test):
        return None
    rec = test[sample_order(len(test), seed, "multi_lexsum")[index]]
    train_path = os.path.join(data_dir, "multi_lexsum/train.jsonl")
    pool = tuple(r for r in (read_records(train_path) if os.path.isfile(train_path) else test)
                 if r.get("summary/short"))
    chosen = _pick_demos(pool, rec["summary/short"], lambda r: r["summary/short"], shots,
                         seed)
    demo = ""
    if chosen:
        demo = ("Example summaries:\n\n" + "\n\n".join(f"Summary: {d['summary/short']}"
                                                       for d in chosen)
                + "\n\nNow, write a summary of the following legal documents.\n")
    # HELMET's judge: recall on the short summary's key points, precision against the long one.
    extra = {"keypoints": rec.get("summary/short_keypoints"),
             "expert_summary": rec.get("summary/long") or rec["summary/short"]}
    return _long_doc_sample(
        "multi_lexsum", fmt, length, index, "\n\n".join(rec["sources"]),
        lambda ctx: f"{LEXSUM_INSTRUCTION}\n\n{demo}Legal documents:\n{ctx}\n\nNow please "
                    "summarize the case.", "Summary:", [rec["summary/short"]], extra, sep="\n\n",
        sizing=sizing)


# ---------------------------------------------------------------------------------------------
# ALCE
# ---------------------------------------------------------------------------------------------

class _Keep(dict):
    """str.format_map mapping that leaves unknown fields as they are."""

    def __missing__(self, key: str) -> str:
        return "{" + key + "}"


def _doc(doc_prompt: str, d: dict[str, Any], i: int) -> str:
    return doc_prompt.format_map(_Keep({**d, "ID": i + 1, "T": d.get("title", ""),
                                        "P": d.get("text", "")}))


def alce(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
         shots: int = 2, sizing: Sizing | None = None) -> Sample | None:
    sizing = sizing or Sizing()
    info = HELMET_TASKS[task]
    name = task.removeprefix("alce_")
    path = next((p for p in (f"alce/{name}_eval_gtr_top2000.json",
                             f"alce/{name}_eval_gtr_top2000.jsonl")
                 if os.path.isfile(os.path.join(data_dir, p))), None)
    prompts = next((p for p in (f"alce/{name}_revised.json", f"prompts/{name}_revised.json")
                    if os.path.isfile(os.path.join(data_dir, p))), None)
    if path is None or prompts is None:
        raise MissingData(f"{data_dir}: needs alce/{name}_eval_gtr_top2000.json and "
                          f"alce/ or prompts/{name}_revised.json (HELMET's released data)")
    records = read_records(os.path.join(data_dir, path))
    with open(os.path.join(data_dir, prompts), encoding="utf-8") as f:
        spec = json.load(f)
    if index >= len(records):
        return None
    rec = records[sample_order(len(records), seed, task)[index]]
    instruction, doc_prompt = spec["instruction"], spec["doc_prompt"]
    rng = random.Random(f"{seed}/{task}/{index}/demos")
    demo_text = "\n\n\n".join(
        spec["demo_prompt"].format_map(_Keep({
            **d, "instruction": instruction, "INST": instruction, "Q": d.get("question", ""),
            "A": d.get("answer", ""),
            "context": "\n\n".join(_doc(doc_prompt, x, i) for i, x in enumerate(d.get("docs", []))),
            "D": "\n\n".join(_doc(doc_prompt, x, i) for i, x in enumerate(d.get("docs", [])))}))
        for d in rng.sample(spec["demos"], min(shots, len(spec["demos"]))))
    if demo_text:
        demo_text += "\n\n\n"
    docs = rec["docs"]

    def render(context: str) -> tuple[str, bool]:
        user = f"{demo_text}{instruction}\n\nQuestion: {rec['question']}\n\n{context}"
        return fmt.render(user, "Answer:", chat=info.chat, sep="\n\n")

    def parts(k: int) -> tuple[str, Callable[[str], tuple[str, bool]]]:
        return "\n\n".join(_doc(doc_prompt, d, i) for i, d in enumerate(docs[:k])), render

    helmet_n = sizing.amount(task, length) if sizing.mode == "helmet" else 0
    n, prompt, special, tokens, cut = size_prompt(sizing, task, fmt, length, parts,
                                                  helmet_n=helmet_n, upper=len(docs),
                                                  guess=max(1, length // 200))
    n = min(n, len(docs))
    if "qa_pairs" in rec:
        groups = [list(q["short_answers"]) for q in rec["qa_pairs"]]
        extra = {"qa_pairs": groups, "reference": " ".join(f"{g[0]}." for g in groups if g)}
    else:
        groups = [list(a) if isinstance(a, list) else [a] for a in rec["answers"]]
        extra = {"answer_lists": groups, "reference": ", ".join(g[0] for g in groups if g)}
    return Sample(task, length, index, prompt, [g[0] for g in groups if g], tokens, None, special,
                  "Answer:", {**extra, "docs": n, "truncated": cut,
                              # citation scores read the whole list, as HELMET's scorer does
                              "question": rec["question"], "passages": docs})


# ---------------------------------------------------------------------------------------------

def load_sample(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
                sizing: Sizing | None = None) -> Sample | None:
    """Sample ``index`` of released task ``task`` at ``length``, or None past the (filtered)
    file's end. HELMET's 2 demos are kept when they fit; at lengths too short for them (HELMET
    starts at 4K) fewer are used, and ``extra["shots"]`` says how many."""
    info = HELMET_TASKS[task]
    sizing = sizing or Sizing()
    if info.shots == 0:
        return _load(task, fmt, data_dir, length, index, seed, 0, sizing)
    for shots in range(info.shots, -1, -1):
        try:
            sample = _load(task, fmt, data_dir, length, index, seed, shots, sizing)
        except TooShort:
            if shots == 0:
                raise
            continue
        if sample is not None:
            sample.extra["shots"] = shots
        return sample
    raise AssertionError("unreachable")


def _load(task: str, fmt: PromptFormat, data_dir: str, length: int, index: int, seed: int,
          shots: int, sizing: Sizing) -> Sample | None:
    category = HELMET_TASKS[task].category
    if category == "rag":
        return rag(task, fmt, data_dir, length, index, seed, shots, sizing)
    if task == "msmarco":
        return msmarco(fmt, data_dir, length, index, seed, shots, sizing)
    if category == "icl":
        return icl(task, fmt, data_dir, length, index, seed, sizing)
    if task == "narrativeqa":
        return narrativeqa(fmt, data_dir, length, index, seed, shots, sizing)
    if task in INFBENCH_FILES:
        return infbench(task, fmt, data_dir, length, index, seed, shots, sizing)
    if task == "multi_lexsum":
        return multi_lexsum(fmt, data_dir, length, index, seed, shots, sizing)
    if category == "cite":
        return alce(task, fmt, data_dir, length, index, seed, shots, sizing)
    raise KeyError(f"{task} has no loader")
