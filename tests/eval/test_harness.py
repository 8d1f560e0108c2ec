"""The harness on every task under sizing fill: released-format loaders on small files, scoring
pinned by a reference answerer (100) and a constant one (0), sharding and aggregation."""

from __future__ import annotations

import re

import pytest

from prolong.eval import loaders
from prolong.eval.generate import ConstantAnswerer, ReferenceAnswerer, choose_backend
from prolong.eval.harness import SampleBuilder, WorkItem, aggregate, run_local, shard, work_items
from prolong.eval.samples import PromptFormat
from prolong.eval.sizing import FILL, OMITTED
from prolong.eval.stopping import cut_at_newline
from prolong.eval.synthetic import essay_haystack
from prolong.eval.tasks import HELMET_TASKS

ALL_TASKS = list(HELMET_TASKS)
RELEASED = [t for t, i in HELMET_TASKS.items() if not i.synthetic]
LENGTH = 2048


@pytest.fixture(scope="module")
def builder(tokenizer, helmet_dir, corpus_cache):
    return SampleBuilder(tokenizer, seed=5, data_dir=str(helmet_dir),
                         haystack=essay_haystack(corpus_cache), sizing=FILL)


@pytest.fixture(scope="module")
def reference_run(builder):
    return run_local(ALL_TASKS, [LENGTH], 2, builder, ReferenceAnswerer())


def test_reference_answerer_scores_100_and_constant_0_on_every_task(builder, reference_run):
    records, results = reference_run
    assert {r["task"] for r in records} == set(ALL_TASKS)
    assert all(r["score"] == pytest.approx(100.0) for r in records), \
        [(r["task"], r["score"]) for r in records if r["score"] < 99.999]
    assert results["average"]["mean"] == pytest.approx(100.0)
    records, results = run_local(ALL_TASKS, [LENGTH], 2, builder, ConstantAnswerer())
    assert all(r["score"] == 0.0 for r in records), [r["task"] for r in records if r["score"]]
    records, _ = run_local(ALL_TASKS, [LENGTH], 1, builder, ConstantAnswerer(""))
    assert all(r["score"] == 0.0 for r in records)  # empty outputs


def test_released_prompts_fit_and_follow_helmet_formats(builder, tokenizer, reference_run):
    fmt = PromptFormat(tokenizer)
    for t in RELEASED:
        s = builder.build(WorkItem(t, LENGTH, 0))
        info = HELMET_TASKS[t]
        budget = LENGTH - info.max_new_tokens
        assert s.tokens == fmt.count(s.prompt, s.add_special_tokens) <= budget, t
        if info.chat:  # HELMET's chat-template tasks: chatml user turn, the generation prompt last
            assert s.prompt.startswith("<|im_start|>user\n") and not s.add_special_tokens, t
            assert s.prompt.endswith("<|im_start|>assistant\n"), t
        else:
            assert s.prompt.endswith("\n" + s.prefix), t
    nq = builder.build(WorkItem("nq", LENGTH, 1))
    assert nq.prompt.startswith(loaders.RAG_INSTRUCTION + "\n\n")
    assert len(re.findall(r"\nQuestion: .*\nAnswer: answer", nq.prompt)) == 2  # 2-shot demos
    assert 3 <= nq.extra["passages"] < 50  # passages dropped to fit 2K ...
    assert any(a in nq.prompt for a in nq.answers)  # ... never the gold one
    ms = builder.build(WorkItem("msmarco", LENGTH, 0))
    assert len(re.findall(r"\nRanking: [\d >]+\n", ms.prompt)) == 2
    shown = {i for i in re.findall(r"\[ID: (\d+)\]", ms.prompt) if int(i) < 100_000}  # not demos
    assert set(ms.extra["qrels"]) == shown and len(shown) < 50
    assert ms.answers[0].split(" > ")[:2] == [k for k, v in sorted(
        ms.extra["qrels"].items(), key=lambda kv: -kv[1])][:2]
    icl = builder.build(WorkItem("banking77", LENGTH, 0))
    assert icl.extra["demos"] > 30 and icl.prompt.endswith("\nlabel:")
    assert 'Only output "label: {label}" and nothing else.' in icl.prompt
    for t in ("narrativeqa", "infbench_qa", "infbench_mc", "infbench_sum", "multi_lexsum"):
        s = builder.build(WorkItem(t, LENGTH, 0))
        assert s.extra["document_tokens"] < s.extra["document_total"], t  # truncated to fit
        assert OMITTED in s.prompt, t
        assert s.tokens >= 0.98 * (LENGTH - HELMET_TASKS[t].max_new_tokens), t
    mc = builder.build(WorkItem("infbench_mc", LENGTH, 0))
    assert "\nOptions:\nA. option one" in mc.prompt and mc.answers[0] == "B"
    asqa = builder.build(WorkItem("alce_asqa", LENGTH, 0))
    assert "Document [1](Title:" in asqa.prompt and asqa.extra["docs"] < 40


def test_samples_past_the_end_of_a_file_are_skipped(builder):
    assert builder.build(WorkItem("nq", LENGTH, 3)) is None  # the test files hold 3 records
    assert builder.build(WorkItem("nq", LENGTH, 2)) is not None


def test_missing_released_file_says_which(tokenizer, tmp_path):
    b = SampleBuilder(tokenizer, seed=0, data_dir=str(tmp_path), sizing=FILL)
    with pytest.raises(loaders.MissingData, match="nq-dev-multikilt"):
        b.build(WorkItem("nq", LENGTH, 0))


def test_passage_counts_and_file_choice(tmp_path):
    assert loaders.passages_for("nq", 8192, FILL) == 50
    assert loaders.passages_for("msmarco", 131072, FILL) == 1000
    assert loaders.passages_for("nq", 1024, FILL) == 7
    for k in (50, 105, 1000):
        (tmp_path / f"x_k{k}_dep6.jsonl").write_text("")
    pat = "x_k{k}_dep6.jsonl"
    assert loaders.pick_k_file(str(tmp_path), pat, 60).endswith("x_k105_dep6.jsonl")
    assert loaders.pick_k_file(str(tmp_path), pat, 5000).endswith("x_k1000_dep6.jsonl")


def test_work_items_and_shards():
    items = work_items(["json_kv", "banking77"], [512, 1024], samples=3, icl_samples=5)
    assert len(items) == 2 * 3 + 2 * 5
    shards = shard(items, 3)
    assert sorted(i for s in shards for i in s) == sorted(items)  # a partition
    assert max(map(len, shards)) - min(map(len, shards)) <= 1
    for s in shards:  # each shard gets both lengths
        assert {i.length for i in s} == {512, 1024}


def test_aggregate_averages_tasks_then_categories():
    recs = [{"task": "json_kv", "length": 512, "score": 100.0},
            {"task": "json_kv", "length": 512, "score": 0.0},
            {"task": "ruler_mv", "length": 512, "score": 100.0},
            {"task": "nq", "length": 512, "score": 20.0}]
    res = aggregate(recs, tasks=["json_kv", "ruler_mv", "nq"], lengths=[512])
    assert res["tasks"]["json_kv"]["by_length"]["512"] == 50.0
    assert res["categories"]["recall"]["by_length"]["512"] == 75.0
    assert res["average"]["by_length"]["512"] == pytest.approx((75.0 + 20.0) / 2)


def test_backend_choice_and_newline_stop():
    assert choose_backend("auto", has_vllm=True, has_cuda=True) == "vllm"
    assert choose_backend("auto", has_vllm=True, has_cuda=False) == "hf"
    assert choose_backend("hf", has_vllm=True, has_cuda=True) == "hf"
    with pytest.raises(RuntimeError):
        choose_backend("vllm", has_vllm=False, has_cuda=True)
    assert cut_at_newline(" 42\nmore") == " 42"


def test_short_lengths_drop_demos_then_skip(builder):
    full = builder.build(WorkItem("msmarco", LENGTH, 0))
    assert full.extra["shots"] == 2
    short = builder.build(WorkItem("msmarco", 700, 0))
    assert short.extra["shots"] < 2 and short.tokens <= 700 - 200
    records, results = run_local(["msmarco", "json_kv"], [64], 1, builder, ReferenceAnswerer())
    assert all("skipped" in r for r in records)
    assert results["skipped"] == {"msmarco": {"64": 1}, "json_kv": {"64": 1}}
    assert results["average"]["mean"] is None
