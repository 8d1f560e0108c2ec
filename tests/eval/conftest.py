"""Fixtures of the eval tests: a tokenizer trained here, the essay corpus, and small data files in
the format of HELMET's released data (written from its loading code, see prolong.eval.loaders)."""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import pytest

WORDS = ["the", "a", "of", "river", "stone", "light", "city", "water", "green", "small", "house", "story", "people", "found", "before", "under", "between", "again", "morning", "evening", "window", "garden", "letter", "summer", "winter", "mountain", "question", "answer", "document", "legal", "court", "case", "plaintiff", "defendant", "judge", "order", "motion", "settlement", "class", "action", "rights", "county", "state", "federal", "agreement", "records", "report"]


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def sentences(rng: random.Random, n: int) -> str:
    return " ".join(words(rng, rng.randint(6, 14)).capitalize() + "." for _ in range(n))


@pytest.fixture(scope="session")
def tokenizer_dir(tmp_path_factory) -> Path:
    """A byte-level BPE (chatml template, special tokens) trained on words, UUID-like hex and
    digits, so UUIDs and numbers tokenize as they would in a real vocabulary's worst case."""
    from prolong.data.tokenizer import train_bpe

    rng = random.Random(0)
    texts = [sentences(rng, 20) for _ in range(200)]
    texts += ["".join(rng.choice("0123456789abcdef-") for _ in range(400)) for _ in range(50)]
    out = tmp_path_factory.mktemp("tok") / "tokenizer"
    train_bpe(texts, 600, out)
    return out


@pytest.fixture(scope="session")
def tokenizer(tokenizer_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corpora")


def _write_jsonl(path: Path, records: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_helmet_data(root: Path, *, n: int = 3, seed: int = 0) -> Path:
    """Small files for every released task, named and shaped as HELMET's (see the loaders)."""
    rng = random.Random(seed)

    def rag_record(i: int, k: int, key: str) -> dict[str, Any]:
        answer = f"answer{key}{i}"
        ctxs = [{"title": words(rng, 2), "text": sentences(rng, 2), "has_answer": False}
                for _ in range(k)]
        ctxs[k // 2] = {"title": words(rng, 2), "text": f"It is known that {answer} is right.",
                        "has_answer": True}
        return {"id": f"{key}-{i}", "question": f"what is {words(rng, 4)} {i}?",
                "answers": [answer, f"alias{i}"], "ctxs": ctxs, "s_pop": 100 + i}

    for task, (test, demo) in {
        "nq": ("nq-dev-multikilt_1000_k50_dep6", "nq-train-multikilt_1000_k3_dep6"),
        "triviaqa": ("triviaqa-dev-multikilt_1000_k50_dep6", "triviaqa-train-multikilt_1000_k3_dep6"),
        "hotpotqa": ("hotpotqa-dev-multikilt_1000_k50_dep3", "hotpotqa-train-multikilt_1000_k3_dep3"),
        "popqa": ("popqa_test_1000_k50_dep6", "popqa_test_1000_k3_dep6"),
    }.items():
        _write_jsonl(root / "kilt" / f"{test}.jsonl", [rag_record(i, 50, task) for i in range(n)])
        if task != "popqa":
            _write_jsonl(root / "kilt" / f"{demo}.jsonl",
                         [rag_record(i, 3, task + "demo") for i in range(4)])
        else:  # popqa's demos come from its own k3 file (other questions)
            _write_jsonl(root / "kilt" / f"{demo}.jsonl",
                         [rag_record(i, 3, task) for i in range(4)])

    def rerank_record(i: int, k: int) -> dict[str, Any]:
        ctxs = [{"id": str(1000 * i + j), "title": words(rng, 2), "text": sentences(rng, 2),
                 "label": 0} for j in range(k)]
        ctxs[3]["label"] = 2
        ctxs[k - 2]["label"] = 1
        return {"qid": f"q{i}", "query": words(rng, 5), "ctxs": ctxs}

    _write_jsonl(root / "msmarco/test_reranking_data_k50_dep3.jsonl",
                 [rerank_record(i, 50) for i in range(n)])
    _write_jsonl(root / "msmarco/test_reranking_data_k10_dep3.jsonl",
                 [rerank_record(100 + i, 10) for i in range(4)])

    for task, field, labels in (("trec_coarse", "coarse_label", 6), ("trec_fine", "fine_label", 12),
                                ("nlu", "label", 8), ("banking77", "label", 10),
                                ("clinc150", "intent", 9)):
        train = [{"text": words(rng, 8), field: j % labels} for j in range(60)]
        test = [{"text": words(rng, 8) + f" {i}", field: i % labels} for i in range(n)]
        _write_jsonl(root / f"icl/{task}/train.jsonl", train)
        _write_jsonl(root / f"icl/{task}/test.jsonl", test)

    def story(m: int) -> str:
        return "\n\n".join(sentences(rng, 8) for _ in range(m))

    _write_jsonl(root / "narrativeqa/test.jsonl", [
        {"document": {"text": story(40)}, "question": {"text": f"who went to the {words(rng, 2)}?"},
         "answers": [{"text": f"the keeper {i}"}, {"text": f"keeper {i}"}]} for i in range(n)])
    _write_jsonl(root / "narrativeqa/train.jsonl", [
        {"document": {"text": "unused"}, "question": {"text": f"demo question {i}?"},
         "answers": [{"text": f"demo answer {i}"}]} for i in range(4)])
    _write_jsonl(root / "infbench/longbook_qa_eng.jsonl", [
        {"id": i, "context": story(40), "input": f"where is {words(rng, 2)}?",
         "answer": [f"harbor {i}"], "options": []} for i in range(n)])
    _write_jsonl(root / "infbench/longbook_choice_eng.jsonl", [
        {"id": i, "context": story(40), "input": f"which {words(rng, 2)}?",
         "answer": [f"option two {i}"], "options": [f"option one {i}", f"option two {i}",
                                                    f"option three {i}", f"option four {i}"]}
        for i in range(n)])
    _write_jsonl(root / "infbench/longbook_sum_eng.jsonl", [
        {"id": i, "context": story(40), "input": "", "answer": [sentences(rng, 6)], "options": []}
        for i in range(n)])
    _write_jsonl(root / "multi_lexsum/validation.jsonl", [
        {"sources": [story(15), story(15)], "summary/short": sentences(rng, 5),
         "summary/long": sentences(rng, 10)} for _ in range(n)])
    _write_jsonl(root / "multi_lexsum/train.jsonl", [
        {"sources": ["unused"], "summary/short": sentences(rng, 3)} for _ in range(4)])

    def docs(m: int) -> list[dict[str, str]]:
        return [{"title": words(rng, 2), "text": sentences(rng, 3)} for _ in range(m)]

    asqa = [{"question": f"who built {words(rng, 2)}?", "answer": "long form",
             "qa_pairs": [{"short_answers": [f"builder{i}a", f"b{i}"]},
                          {"short_answers": [f"builder{i}b"]}], "docs": docs(40)}
            for i in range(n)]
    qampari = [{"question": f"list {words(rng, 2)}", "answers": [[f"item{i}x", f"ix{i}"],
                                                                 [f"item{i}y"], [f"item{i}z"]],
                "docs": docs(40)} for i in range(n)]
    (root / "alce").mkdir(parents=True, exist_ok=True)
    (root / "alce/asqa_eval_gtr_top2000.json").write_text(json.dumps(asqa))
    (root / "alce/qampari_eval_gtr_top2000.json").write_text(json.dumps(qampari))
    for name in ("asqa", "qampari"):
        prompt = {"instruction": f"Write an accurate answer ({name}) citing the documents.",
                  "demo_prompt": "{instruction}\n\nQuestion: {question}\n\n{context}\n\n"
                                 "Answer: {answer}",
                  "doc_prompt": "Document [{ID}](Title: {title}): {text}",
                  "demos": [{"question": f"demo {j}?", "answer": f"demo answer {j} [1].",
                             "docs": docs(2)} for j in range(3)]}
        (root / f"alce/{name}_revised.json").write_text(json.dumps(prompt))
    return root


@pytest.fixture(scope="session")
def helmet_dir(tmp_path_factory) -> Path:
    return write_helmet_data(tmp_path_factory.mktemp("helmet"))


NLI_TRAIN = [("the sky is blue", "the sky is blue", "1"), ("the sky is blue", "cats bark", "0"),
             ("grass is green", "grass is green", "1"), ("grass is green", "the sky is blue", "0")]
"""(premise, hypothesis, answer) pairs the tiny NLI model learns."""


@pytest.fixture(scope="session")
def tiny_nli(tmp_path_factory) -> Path:
    """A tiny seq2seq NLI model in TRUE's interface (see tests/eval/test_nli.py)."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast, T5Config, T5ForConditionalGeneration

    from prolong.eval.nli import NLI_INPUT

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2}
    for text in ["premise: hypothesis: Title: 0 1", *(f"{p} {h}" for p, h, _ in NLI_TRAIN)]:
        for w in text.split():
            vocab.setdefault(w, len(vocab))
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    core.post_processor = processors.TemplateProcessing(single="$A </s>",
                                                        special_tokens=[("</s>", 1)])
    core.decoder = decoders.WordPiece()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", eos_token="</s>",
                                  unk_token="<unk>")
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # a 2-layer model: threads only contend
    model = T5ForConditionalGeneration(T5Config(
        vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
        decoder_start_token_id=0, pad_token_id=0, eos_token_id=1))
    batch = tok([NLI_INPUT.format(premise=p, hypothesis=h) for p, h, _ in NLI_TRAIN],
                padding=True, return_tensors="pt")
    labels = tok([y for *_, y in NLI_TRAIN], return_tensors="pt").input_ids
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(80):
        loss = model(**batch, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    torch.set_num_threads(threads)
    out = tmp_path_factory.mktemp("nli") / "tiny-true"
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
