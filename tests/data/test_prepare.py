"""prepare_file end to end on real files: shards, length rules, masks, manifests, re-runs."""

from __future__ import annotations

import itertools
import json
import random
import shutil
import string
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml
from hypothesis import given
from hypothesis import strategies as st
from rich.console import Console

from prolong.data import tokenizer as tokmod
from prolong.data.errors import DataError
from prolong.data.prepare import (
    length_histogram,
    length_pieces,
    open_shards,
    prepare_file,
    shard_dirs,
)
from prolong.data.shards import TokenShards
from prolong.specfile import load
from prolong.stage.lock import LOCK_FILE, StageLock

REPO = Path(__file__).resolve().parents[2]


# ---------------------------------------------------------------------------------------------
# Pure rules
# ---------------------------------------------------------------------------------------------

@given(st.integers(0, 5_000), st.integers(1, 600), st.integers(0, 400))
def test_long_rule_cuts_consecutive_full_pieces(length, target, extra_min):
    min_length = target + extra_min
    pieces = length_pieces(length, packing="long", min_length=min_length, target_length=target)
    if length < min_length:
        assert pieces == []
        return
    assert [b - a for a, b in pieces] == [target] * (length // target)
    assert pieces[0][0] == 0
    assert all(b == a2 for (_, b), (a2, _) in itertools.pairwise(pieces))
    assert 0 <= length - pieces[-1][1] < target  # the dropped remainder is shorter than a piece


@given(st.integers(0, 5_000), st.integers(1, 600), st.sampled_from(["concat", "conversation"]))
def test_whole_documents_kept_at_or_above_minimum(length, min_length, packing):
    pieces = length_pieces(length, packing=packing, min_length=min_length)
    assert pieces == ([(0, length)] if length >= min_length and length > 0 else [])


@given(st.integers(0, 5_000), st.integers(1, 600), st.integers(1, 5_000),
       st.sampled_from(["concat", "conversation", "long"]))
def test_documents_over_max_length_are_dropped(length, min_length, max_length, packing):
    target = min_length if packing == "long" else None
    pieces = length_pieces(length, packing=packing, min_length=min_length, target_length=target,
                           max_length=max_length)
    if length > max_length:
        assert pieces == []
    else:
        assert pieces == length_pieces(length, packing=packing, min_length=min_length,
                                       target_length=target)


def test_length_histogram_power_of_two_buckets():
    hist = length_histogram(np.array([1, 2, 3, 4, 5, 1024, 1025]))
    assert hist == [{"upTo": 1, "documents": 1}, {"upTo": 2, "documents": 1},
                    {"upTo": 4, "documents": 2}, {"upTo": 8, "documents": 1},
                    {"upTo": 1024, "documents": 1}, {"upTo": 2048, "documents": 1}]


# ---------------------------------------------------------------------------------------------
# Small jobs on files written here
# ---------------------------------------------------------------------------------------------

def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice(string.ascii_lowercase[:12]) for _ in range(rng.randint(1, 6)))
                    for _ in range(n))


def make_tokenizer(path: Path, seed: int) -> Path:
    rng = random.Random(seed)
    tokmod.train_bpe([words(rng, 200) for _ in range(100)], 300, path)
    return path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    return make_tokenizer(tmp_path_factory.mktemp("tok") / "bpe", seed=1)


def write_job(tmp_path: Path, streams: list[dict], tokenizer: Path, *, kind: str = "PretrainJob",
              name: str = "job") -> Path:
    spec = {"model": {"architecture": {"preset": "tiny"}}, "sequenceLength": 256,
            "globalBatchTokens": 512, "steps": 1, "precision": "fp32",
            "data": {"streams": streams, "tokenizer": {"source": str(tokenizer)},
                     "preparedDir": str(tmp_path / "prepared")},
            "schedule": {"peakLR": 1e-3}, "cluster": {"device": "cpu", "workersPerNode": 1}}
    doc = {"apiVersion": "prolong.dev/v1alpha1", "kind": kind, "metadata": {"name": name},
           "spec": spec}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def test_concat_and_long_streams(tmp_path, tok_dir):
    rng = random.Random()
    short = [words(rng, rng.randint(1, 30)) for _ in range(300)]
    long = [words(rng, rng.randint(10, 200)) for _ in range(300)]
    write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in short])
    write_jsonl(tmp_path / "long.jsonl", [{"body": t} for t in long])
    job = write_job(tmp_path, [
        {"domain": "web", "path": str(tmp_path / "short.jsonl"), "format": "jsonl",
         "packing": "concat", "minLength": 5, "proportion": 0.5},
        {"domain": "books", "path": str(tmp_path / "long.jsonl"), "format": "jsonl",
         "packing": "long", "targetLength": 64, "textField": "body", "proportion": 0.5}], tok_dir)
    report = prepare_file(str(job), workers=2, progress=False)  # a real process pool
    assert report.work_done and [s.built for s in report.streams] == [True, True]
    tok = tokmod.load_tokenizer(tok_dir)

    loaded = load(job)
    shards = open_shards(loaded.jobs["job"], loaded)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in short]
    kept = [i for i in ids if len(i) >= 5]
    web = shards["web"]
    assert [web.doc(i).tolist() for i in range(len(web))] == kept
    assert web.tokens.dtype == np.uint16 and web.mask(0) is None

    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in long]
    pieces = [d[k: k + 64] for d in ids if len(d) >= 64 for k in range(0, len(d) - 63, 64)]
    books = shards["books"]
    assert [books.doc(i).tolist() for i in range(len(books))] == pieces
    stats = json.loads((books.directory / "stats.json").read_text())
    assert stats["documents"] == len(pieces) and stats["tokens"] == 64 * len(pieces)
    assert stats["dropped"] == sum(len(d) < 64 for d in ids)
    manifest = json.loads((tmp_path / "prepared" / "manifests" / "job.json").read_text())
    assert manifest["tokenizer"]["hash"] == tokmod.tokenizer_hash(tok)
    assert manifest["streams"]["books"]["rules"] == {"packing": "long", "minLength": 64,
                                                     "targetLength": 64}

    again = prepare_file(str(job), workers=2, progress=False)
    assert not again.work_done and [s.built for s in again.streams] == [False, False]
    # A changed input is detected and only its stream is re-done.
    write_jsonl(tmp_path / "short.jsonl", [{"text": t} for t in short[:-1]])
    third = prepare_file(str(job), workers=1, progress=False)
    assert [s.built for s in third.streams] == [True, False]
    assert len(TokenShards(shard_dirs(loaded.jobs["job"], loaded)["web"])) == \
        sum(len(i) >= 5 for i in [tok(t, add_special_tokens=False)["input_ids"]
                                  for t in short[:-1]])


def test_all_documents_shorter_than_the_minimum(tmp_path, tok_dir):
    write_jsonl(tmp_path / "s.jsonl", [{"text": "a b c"}] * 10)
    job = write_job(tmp_path, [{"domain": "books", "path": str(tmp_path / "s.jsonl"),
                                "format": "jsonl", "packing": "long", "targetLength": 128,
                                "proportion": 1.0}], tok_dir)
    with pytest.raises(DataError, match=r"stream books.*all 10 documents are shorter than "
                                        r"minLength 128"):
        prepare_file(str(job), workers=1, progress=False)


def test_max_length_takes_one_length_bucket_of_a_source(tmp_path, tok_dir):
    rng = random.Random(3)
    texts = [words(rng, rng.randint(1, 200)) for _ in range(200)]
    write_jsonl(tmp_path / "mixed.jsonl", [{"text": t} for t in texts])
    job = write_job(tmp_path, [
        {"domain": "short", "path": str(tmp_path / "mixed.jsonl"), "format": "jsonl",
         "packing": "concat", "maxLength": 40, "proportion": 0.5},
        {"domain": "long", "path": str(tmp_path / "mixed.jsonl"), "format": "jsonl",
         "packing": "concat", "minLength": 41, "proportion": 0.5}], tok_dir)
    prepare_file(str(job), workers=1, progress=False)
    tok = tokmod.load_tokenizer(tok_dir)
    ids = [tok(t, add_special_tokens=False)["input_ids"] for t in texts]
    loaded = load(job)
    shards = open_shards(loaded.jobs["job"], loaded)
    short, long = shards["short"], shards["long"]
    assert [short.doc(i).tolist() for i in range(len(short))] == [d for d in ids if len(d) <= 40]
    assert [long.doc(i).tolist() for i in range(len(long))] == [d for d in ids if len(d) > 40]
    assert len(short) and len(long)


def test_max_length_below_every_document(tmp_path, tok_dir):
    write_jsonl(tmp_path / "s.jsonl", [{"text": "a b c d e f g h i j k l"}] * 10)
    job = write_job(tmp_path, [{"domain": "web", "path": str(tmp_path / "s.jsonl"),
                                "format": "jsonl", "packing": "concat", "maxLength": 2,
                                "proportion": 1.0}], tok_dir)
    with pytest.raises(DataError, match=r"stream web.*all 10 documents are longer than "
                                        r"maxLength 2 tokens"):
        prepare_file(str(job), workers=1, progress=False)


def test_a_second_preparation_waits_for_the_first_then_reuses_its_work(tmp_path, tok_dir):
    """Two `data prepare` of one prepared directory never build at the same time: with the
    directory's lock held, a second run waits (writes nothing), and finishes once it is free."""
    rng = random.Random(7)
    write_jsonl(tmp_path / "docs.jsonl", [{"text": words(rng, 40)} for _ in range(50)])
    job = write_job(tmp_path, [{"domain": "web", "path": str(tmp_path / "docs.jsonl"),
                                "format": "jsonl", "proportion": 1.0}], tok_dir)
    prepared = tmp_path / "prepared"
    code = ("import sys; from prolong.data.prepare import prepare_file; "
            "r = prepare_file(sys.argv[1], workers=1, progress=True); print(r.work_done)")
    with StageLock(str(prepared)):  # the first run, as another process would hold it
        second = subprocess.Popen([sys.executable, "-c", code, str(job)], cwd=REPO,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(3.0)
        assert second.poll() is None  # still waiting
        assert not (prepared / "shards").exists() and not (prepared / "tokenized").exists()
    out, err = second.communicate(timeout=120)
    assert second.returncode == 0, err
    assert "waiting: another data preparation holds" in err and out.strip().endswith("True")
    assert not (prepared / LOCK_FILE).exists()  # released
    again = prepare_file(str(job), workers=1, progress=False)
    assert not again.work_done  # the waiting run's shards are whole and reused


def test_missing_and_empty_inputs_name_the_stream(tmp_path, tok_dir):
    job = write_job(tmp_path, [{"domain": "web", "path": str(tmp_path / "none.jsonl"),
                                "format": "jsonl", "proportion": 1.0}], tok_dir)
    with pytest.raises(DataError, match=r"stream web.*none\.jsonl.*does not exist"):
        prepare_file(str(job), workers=1, progress=False)
    (tmp_path / "none.jsonl").write_text("")
    with pytest.raises(DataError, match=r"stream web.*no documents"):
        prepare_file(str(job), workers=1, progress=False)


def test_shards_prepared_with_another_tokenizer_are_detected(tmp_path):
    tok_path = make_tokenizer(tmp_path / "tok", seed=2)
    rng = random.Random()
    write_jsonl(tmp_path / "d.jsonl", [{"text": words(rng, 40)} for _ in range(50)])
    job = write_job(tmp_path, [{"domain": "web", "path": str(tmp_path / "d.jsonl"),
                                "format": "jsonl", "proportion": 1.0}], tok_path)
    prepare_file(str(job), workers=1, progress=False)
    loaded = load(job)
    assert "web" in shard_dirs(loaded.jobs["job"], loaded)
    shutil.rmtree(tok_path)
    make_tokenizer(tok_path, seed=3)  # same path, other tokenizer
    with pytest.raises(DataError, match=r"stream web.*prepared with another tokenizer"):
        shard_dirs(loaded.jobs["job"], loaded)
    redo = prepare_file(str(job), workers=1, progress=False)
    assert redo.work_done and redo.streams[0].built
    assert "web" in shard_dirs(loaded.jobs["job"], loaded)


def test_mds_ids_outside_the_vocabulary_are_refused(tmp_path, tok_dir):
    job = write_job(tmp_path, [{"domain": "code", "format": "mds", "proportion": 1.0,
                                "path": str(Path(__file__).parent / "fixtures/mds/prolong")}],
                    tok_dir)
    with pytest.raises(DataError, match=r"stream code.*outside the tokenizer's vocabulary "
                                        r"\(300\).*another tokenizer"):
        prepare_file(str(job), workers=1, progress=False)


def test_conversation_masks_decode_to_the_assistant_turns(tmp_path, tok_dir):
    rng = random.Random()
    convs = []
    for _ in range(40):
        msgs = []
        for _ in range(rng.randint(1, 3)):
            msgs += [{"role": "user", "content": words(rng, rng.randint(1, 20))},
                     {"role": "assistant", "content": words(rng, rng.randint(1, 20))}]
        convs.append({"messages": msgs})
    write_jsonl(tmp_path / "chat.jsonl", convs)
    job = write_job(tmp_path, [{"domain": "chat", "path": str(tmp_path / "chat.jsonl"),
                                "format": "jsonl", "packing": "conversation",
                                "proportion": 1.0}], tok_dir, kind="SFTJob")
    prepare_file(str(job), workers=1, progress=False)
    loaded = load(job)
    shards = open_shards(loaded.jobs["job"], loaded)["chat"]
    tok = tokmod.load_tokenizer(tok_dir)
    assert len(shards) == len(convs)
    for i, conv in enumerate(convs):
        ids, mask = shards.doc(i), shards.mask(i)
        assert tok.decode(ids.tolist()) == tok.apply_chat_template(conv["messages"], tokenize=False)
        labelled = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
        runs = [tok.decode(ids[a:b].tolist()) for a, b in zip(labelled[::2], labelled[1::2],
                                                               strict=True)]
        assert runs == [m["content"] + tokmod.IM_END for m in conv["messages"]
                        if m["role"] == "assistant"]


def test_stage_from_upstream_needs_its_pipeline(tmp_path):
    shutil.copytree(REPO / "jobs" / "quickstart", tmp_path / "quickstart")
    with pytest.raises(DataError, match=r"tokenizer from stage 'stage1'.*prepare the pipeline"):
        prepare_file(str(tmp_path / "quickstart" / "stage2.yaml"), workers=1, progress=False)


# ---------------------------------------------------------------------------------------------
# The quickstart, from nothing
# ---------------------------------------------------------------------------------------------

def test_quickstart_pipeline_from_nothing_then_nothing_to_do(tmp_path, monkeypatch):
    shutil.copytree(REPO / "jobs" / "quickstart", tmp_path / "quickstart")
    # stage 1's model.source, ./jobs/quickstart/base/final, is relative to the working directory
    (tmp_path / "jobs").symlink_to(REPO / "jobs")
    monkeypatch.chdir(tmp_path)  # storage.root is ./runs
    path = "quickstart/pipeline.yaml"
    first = prepare_file(path, workers=1, progress=False)
    # Every stage reads with the pretrained base's tokenizer: nothing to train.
    assert first.work_done and first.tokenizers_trained == []
    assert sorted(first.corpora) == ["books", "code-repos", "retrieval", "retrieval-short",
                                     "sft-conversations", "short-text"]
    by = {(s.stage, s.domain): s for s in first.streams}
    assert set(by) == {("stage1", "code-repos"), ("stage1", "books"), ("stage1", "short-text"),
                       ("stage1", "retrieval"),
                       ("stage2", "code-repos-2k"), ("stage2", "code-repos-512"),
                       ("stage2", "books-2k"), ("stage2", "books-512"), ("stage2", "short-text"),
                       ("stage2", "retrieval-2k"), ("stage2", "retrieval-512"),
                       ("sft", "conversations"), ("sft-from-stage1", "conversations")}
    # The two SFT stages read the same conversations: one shard directory.
    assert by["sft", "conversations"].shard_dir == by["sft-from-stage1", "conversations"].shard_dir
    # Same stream + tokenizer + rules: one shard directory, built once.
    assert by["stage1", "code-repos"].shard_dir == by["stage2", "code-repos-512"].shard_dir
    assert by["stage1", "short-text"].shard_dir == by["stage2", "short-text"].shard_dir
    assert by["stage1", "retrieval"].shard_dir == by["stage2", "retrieval-512"].shard_dir
    assert by["stage2", "books-2k"].shard_dir != by["stage2", "books-512"].shard_dir
    assert by["stage2", "retrieval-2k"].shard_dir != by["stage2", "retrieval-512"].shard_dir

    loaded = load(path)
    tok = tokmod.load_tokenizer(REPO / "jobs" / "quickstart" / "base" / "final")
    assert len(tok) == 512
    for name in ("stage1", "stage2", "sft", "sft-from-stage1"):
        shards = open_shards(loaded.jobs[name], loaded)
        assert set(shards) == {d for s, d in by if s == name}
    stage2 = open_shards(loaded.jobs["stage2"], loaded)
    for domain, target in (("code-repos-2k", 2048), ("books-2k", 2048), ("books-512", 512)):
        assert set(stage2[domain].lengths.tolist()) == {target}
    # The retrieval buckets: one source, split by minLength / maxLength.
    assert max(stage2["retrieval-512"].lengths) <= 512
    assert min(stage2["retrieval-2k"].lengths) >= 513 and max(stage2["retrieval-2k"].lengths) <= 2048
    for domain in ("books-2k", "code-repos-2k"):  # enough distinct long documents
        stats = json.loads((stage2[domain].directory / "stats.json").read_text())
        assert stats["kept_source_documents"] >= 16, stats
    sft = open_shards(loaded.jobs["sft"], loaded)["conversations"]
    assert sft.mask_array is not None and 0 < int(sft.mask_array.sum()) < sft.num_tokens

    assert first.shards_built == 8  # stage1: 4, stage2: 3 new (4 shared), sft: 1
    console = Console(record=True, width=200)
    console.print(first)
    rendered = console.export_text()
    assert "books-2k" in rendered and "reused" in rendered and "built 8 shard dir(s)" in rendered

    second = prepare_file(path, workers=1, progress=False)
    assert not second.work_done
    assert not second.tokenizers_trained and not second.tokenized_built
    assert [s.built for s in second.streams] == [False] * len(first.streams)
    assert [(s.documents, s.tokens) for s in second.streams] == \
        [(s.documents, s.tokens) for s in first.streams]
    nothing = prepare_file("quickstart/eval.yaml", progress=False)  # EvalJob: no shards
    assert not nothing.streams and not nothing.work_done
