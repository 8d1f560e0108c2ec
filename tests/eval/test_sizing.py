"""HELMET sizing (the default): fixed amounts per length, truncation to the input budget, the
length filters, and prompt bytes equal to HELMET's templates filled in by hand. Each test fails on
the old fill-to-the-length behaviour."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from prolong.eval import loaders
from prolong.eval import synthetic as syn
from prolong.eval.harness import SampleBuilder, WorkItem
from prolong.eval.samples import PromptFormat
from prolong.eval.sizing import (
    AMOUNTS,
    FILL,
    OMITTED,
    Sizing,
    UnsupportedLength,
    precut_document,
    truncate_context,
)
from prolong.eval.tasks import HELMET_TASKS
from prolong.spec.helmet import HELMET_SIZING_LENGTHS, HELMET_TABLED_TASKS

HELMET = Sizing("helmet")


def test_tables_are_helmets_at_its_lengths():
    assert set(AMOUNTS) == HELMET_TABLED_TASKS
    assert all(tuple(t) == HELMET_SIZING_LENGTHS for t in AMOUNTS.values())
    # generate_configs.py, 8K and 128K columns
    assert [AMOUNTS["json_kv"][n] for n in (8192, 131072)] == [105, 1800]
    assert [AMOUNTS["nq"][n] for n in (8192, 131072)] == [50, 1000]
    assert [AMOUNTS["msmarco"][n] for n in (8192, 131072)] == [50, 1000]
    assert [AMOUNTS["trec_coarse"][n] for n in (8192, 131072)] == [400, 6600]
    assert [AMOUNTS["nlu"][n] for n in (8192, 131072)] == [510, 8296]
    assert [AMOUNTS["alce_asqa"][n] for n in (8192, 131072)] == [30, 700]
    with pytest.raises(UnsupportedLength, match=r"json_kv.*not 2048; use sizing: fill"):
        HELMET.amount("json_kv", 2048)


def test_json_kv_holds_helmets_pair_count_not_what_fits(tokenizer):
    fmt = PromptFormat(tokenizer)
    helmet = syn.json_kv(fmt, 8192, 0, seed=3, sizing=HELMET)
    filled = syn.json_kv(fmt, 8192, 0, seed=3, sizing=FILL)
    assert helmet.extra["pairs"] == 105 and not helmet.extra["truncated"]
    assert len(json.loads(helmet.prompt[:helmet.prompt.index("\n}") + 2])) == 105
    assert filled.extra["pairs"] != 105  # the old behaviour packs in as many as fit
    assert helmet.tokens <= 8192 - 100


def _pairs_shown(prompt: str) -> int:
    return prompt[:prompt.index("\n\nExtract the value")].count('": "')


def test_json_kv_is_truncated_at_the_end_of_its_context_to_the_budget(tokenizer):
    """At 4K, 50 UUID pairs exceed this tokenizer's budget: the JSON is cut from its end (HELMET's
    tokenize), the instruction, demos and question stay whole."""
    fmt = PromptFormat(tokenizer)
    s = syn.json_kv(fmt, 4096, 5, seed=3, sizing=Sizing("helmet", max_new_tokens=3000))
    assert s.extra["pairs"] == 50 and s.extra["truncated"]
    assert s.tokens <= 4096 - 3000
    assert _pairs_shown(s.prompt) < 50
    assert s.prompt.endswith(f"Key: {s.extra['key']}\nCorresponding value:")


def test_truncate_context_drops_the_excess_from_the_end():
    class Words:  # a tokenizer stand-in: one token per character
        def count(self, text, special=True):
            return len(text)

        def offsets(self, text):
            return [(i, i + 1) for i in range(len(text))]

    def render(context):
        return f"<{context}>", True

    kept, prompt, _, tokens = truncate_context(render, "abcdefghij", Words(), 7)
    assert (kept, prompt, tokens) == ("abcde", "<abcde>", 7)
    assert truncate_context(render, "abc", Words(), 7)[1] == "<abc>"  # fits: unchanged


@pytest.mark.parametrize("length", [4096, 8192])
def test_every_prompt_leaves_the_output_budget_free(tokenizer, helmet_dir, corpus_cache, length):
    b = SampleBuilder(tokenizer, seed=1, data_dir=str(helmet_dir),
                      haystack=syn.essay_haystack(corpus_cache), sizing=Sizing("helmet"))
    fmt = PromptFormat(tokenizer)
    for task in ("json_kv", "ruler_mk_needle", "ruler_mv", "trec_coarse", "alce_asqa"):
        s = b.build(WorkItem(task, length, 0))
        assert s.tokens == fmt.count(s.prompt, s.add_special_tokens), task
        assert s.tokens <= length - HELMET_TASKS[task].max_new_tokens, task


def test_icl_and_alce_use_helmets_counts(tokenizer, helmet_dir):
    fmt = PromptFormat(tokenizer)
    sizing = Sizing("helmet", max_new_tokens=1)
    icl = loaders.load_sample("trec_coarse", fmt, str(helmet_dir), 4096, 0, 0, sizing)
    assert icl.extra["demos"] == 200  # fill would put in however many fit
    asqa = loaders.load_sample("alce_asqa", fmt, str(helmet_dir), 4096, 0, 0, sizing)
    assert asqa.extra["docs"] == 8
    filled = loaders.load_sample("alce_asqa", fmt, str(helmet_dir), 4096, 0, 0, FILL)
    assert filled.extra["docs"] != 8


def _rag_dir(root: Path, k: int) -> Path:
    rec = {"id": "q1", "question": "who keeps the stone?", "answers": ["the keeper"],
           "ctxs": [{"title": f"T{i}", "text": f"passage {i}.", "has_answer": i == 1}
                    for i in range(k)]}
    demo = {"id": "d1", "question": "what is green?", "answers": ["the garden"],
            "ctxs": [{"title": "G", "text": "the garden is green.", "has_answer": True}]}
    (root / "kilt").mkdir(parents=True)
    (root / f"kilt/nq-dev-multikilt_1000_k{k}_dep6.jsonl").write_text(json.dumps(rec) + "\n")
    (root / "kilt/nq-train-multikilt_1000_k3_dep6.jsonl").write_text(json.dumps(demo) + "\n")
    return root


def test_nq_prompt_bytes_equal_helmets_template(tokenizer, tmp_path):
    """HELMET's load_qa prompt_template (user template + "\\n" + "Answer:") filled in by hand for
    one record of the k50 file at 8K: all 50 passages, the demo, the question."""
    data = _rag_dir(tmp_path, 50)
    s = loaders.load_sample("nq", PromptFormat(tokenizer), str(data), 8192, 0, 0, HELMET)
    passages = "\n\n".join(f"Document (Title: T{i}): passage {i}." for i in range(50))
    demo = ("Document (Title: G): the garden is green.\n\nQuestion: what is green?\n"
            "Answer: the garden\n\n")
    want = ("Use the given documents to write a concise and short answer to the question. Write "
            "your answer in the following format:\nAnswer: [answer]\n\n" + demo + passages
            + "\n\nQuestion: who keeps the stone?\nAnswer:")
    assert s.prompt == want and s.add_special_tokens
    assert s.extra["passages"] == 50


def test_helmet_sizing_reads_exactly_helmets_k_file(tokenizer, tmp_path):
    data = _rag_dir(tmp_path, 40)  # a k40 file: fill takes it, HELMET wants k50 at 8K
    with pytest.raises(loaders.MissingData, match=r"k50_dep6\.jsonl"):
        loaders.load_sample("nq", PromptFormat(tokenizer), str(data), 8192, 0, 0, HELMET)
    assert loaders.load_sample("nq", PromptFormat(tokenizer), str(data), 8192, 0, 0, FILL)


def test_chat_prompt_bytes_end_at_the_generation_prompt(tokenizer, tmp_path):
    """NarrativeQA with the chat template: HELMET's user template inside the chatml user turn,
    then "<|im_start|>assistant\\n" and nothing else (no "Answer:")."""
    (tmp_path / "narrativeqa").mkdir()
    doc = "The keeper guards the stone by the river."
    (tmp_path / "narrativeqa/test.jsonl").write_text(json.dumps(
        {"document": {"text": doc}, "question": {"text": "who guards the stone?"},
         "answers": [{"text": "the keeper"}]}) + "\n")
    (tmp_path / "narrativeqa/train.jsonl").write_text(json.dumps(
        {"document": {"text": "x"}, "question": {"text": "demo q?"},
         "answers": [{"text": "demo a"}]}) + "\n")
    s = loaders.load_sample("narrativeqa", PromptFormat(tokenizer), str(tmp_path), 4096, 0, 0,
                            Sizing("fill"))  # fill: the short document passes (no length filter)
    user = ("You are given a story, which can be either a novel or a movie script, and a "
            "question. Answer the question as concisely as you can, using a single phrase if "
            "possible.\n\nFor example:\n\nQuestion: demo q?\nAnswer: demo a\n\nNow, use the "
            "following story to answer the question:\n\n" + doc
            + "\n\nQuestion: who guards the stone?")
    assert s.prompt == f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"
    assert not s.add_special_tokens
    plain = loaders.load_sample("narrativeqa", PromptFormat(tokenizer, use_chat=False),
                                str(tmp_path), 4096, 0, 0, Sizing("fill"))
    assert plain.prompt == user + "\nAnswer:" and plain.add_special_tokens  # useChatTemplate false


def _long_records(root: Path, tokens_each: list[int], tokenizer) -> None:
    """Multi-LexSum records whose documents have about the given token counts."""
    fmt = PromptFormat(tokenizer)
    unit = "the river stone light city water green small house story. "
    per = fmt.count(unit * 50, False) / 50
    recs = [{"sources": [unit * int(n / per)], "summary/short": f"summary {i}",
             "summary/long": f"long {i}"} for i, n in enumerate(tokens_each)]
    (root / "multi_lexsum").mkdir(parents=True)
    (root / "multi_lexsum/validation.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))


def test_length_filter_drops_documents_below_helmets_bound(tokenizer, tmp_path):
    """Multi-LexSum keeps documents of at least 65536 counting tokens: of a short and a long
    record only the long one is a sample under helmet; fill keeps both."""
    _long_records(tmp_path, [2000, 70000], tokenizer)
    fmt = PromptFormat(tokenizer)
    first = loaders.load_sample("multi_lexsum", fmt, str(tmp_path), 8192, 0, 0, HELMET)
    assert first is not None and first.answers == ["summary 1"]
    assert loaders.load_sample("multi_lexsum", fmt, str(tmp_path), 8192, 1, 0, HELMET) is None
    assert loaders.load_sample("multi_lexsum", fmt, str(tmp_path), 8192, 1, 0, FILL) is not None
    # the document was cut to 8192 - 700 counting tokens and ends with HELMET's marker, then fits
    assert OMITTED in first.prompt and first.tokens <= 8192 - 400


def test_precut_keeps_helmets_document_budget(tokenizer):
    fmt = PromptFormat(tokenizer)
    doc = "the small house by the river. " * 400
    cut = precut_document(fmt, doc, 300)
    assert cut.endswith(OMITTED) and doc.startswith(cut[: -len(OMITTED)])
    assert fmt.count(cut, True) <= 300 + 2  # budget counts BOS; a merge at the cut may add one
    assert precut_document(fmt, "short text.", 300) == "short text."


def test_msmarco_reads_helmets_k_file_and_keeps_all_its_passages(tokenizer, helmet_dir):
    fmt = PromptFormat(tokenizer)
    with pytest.raises(loaders.MissingData):  # the fixture holds k50 only: 8K under helmet is k50
        loaders.load_sample("msmarco", fmt, str(helmet_dir), 4096, 0, 0, HELMET)  # 4K wants k14
    s = loaders.load_sample("msmarco", fmt, str(helmet_dir), 8192, 0, 0,
                            Sizing("helmet", max_new_tokens=1))
    assert s.extra["passages"] == 50
    assert len(re.findall(r"\[ID: \d+\] Document", s.prompt)) >= 50 - 1
