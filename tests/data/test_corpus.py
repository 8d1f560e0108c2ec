"""Embedded corpora: built from this environment only, deterministic, bounded, well-formed."""

from __future__ import annotations

import itertools
import json

import pytest

from prolong.data import corpus
from prolong.data.errors import DataError
from prolong.data.sources import check_messages, repo_document


def rows(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_deterministic_and_reused(tmp_path):
    name = "sft-conversations"  # uses every kind of input: docstrings, pydoc topics, an RNG
    a = corpus.corpus_file(name, tmp_path / "a")
    corpus._docstrings.cache_clear()
    b = corpus.corpus_file(name, tmp_path / "b")
    assert a.read_bytes() == b.read_bytes()
    mtime = a.stat().st_mtime_ns
    assert corpus.corpus_file(name, tmp_path / "a") == a and a.stat().st_mtime_ns == mtime


def test_code_repos_are_site_packages_packages_concatenated(tmp_path):
    docs = rows(corpus.corpus_file("code-repos", tmp_path))
    assert corpus.MAX_REPOS // 2 <= len(docs) <= corpus.MAX_REPOS
    packages = {p.name: p for p in corpus._packages()}
    for doc in docs:
        name = doc["id"].removeprefix("site-packages/")
        text, files = repo_document(packages[name], max_chars=corpus.REPO_CHARS, suffixes=(".py",))
        assert doc["text"] == text and files
        assert doc["text"].startswith(f"<<< {files[0]} >>>\n")
        # Bounded: files are added while they fit (a first file alone may be longer).
        assert len(text) >= corpus.MIN_REPO_CHARS and (len(text) <= corpus.REPO_CHARS
                                                       or len(files) == 1)


def test_books_are_long_distinct_prose(tmp_path):
    docs = rows(corpus.corpus_file("books", tmp_path))
    assert len(docs) >= corpus.MIN_BOOKS
    assert all(corpus.MIN_BOOK_CHARS <= len(d["text"]) <= corpus.MAX_BOOK_CHARS for d in docs)
    assert len({d["text"] for d in docs}) == len(docs)
    assert len({d["id"] for d in docs}) == len(docs)


def test_short_text_is_short(tmp_path):
    docs = rows(corpus.corpus_file("short-text", tmp_path))
    assert len(docs) >= 500
    assert all(100 <= len(d["text"]) <= 4_000 for d in docs)


def test_conversations_are_ultrachat_form_with_retrieval_dialogues(tmp_path):
    docs = rows(corpus.corpus_file("sft-conversations", tmp_path))
    assert len(docs) >= 1_000
    for doc in docs:
        check_messages(doc["messages"], doc["id"])
    # Their answers are checked against their contexts in test_retrieval.py.
    assert sum(d["id"].startswith("retrieval/") for d in docs) == corpus.RETRIEVAL_DIALOGUES


def test_retrieval_corpus_spans_both_length_buckets(tmp_path):
    docs = rows(corpus.corpus_file("retrieval", tmp_path))
    assert len(docs) == corpus.RETRIEVAL_DOCUMENTS
    sizes = [len(d["text"]) for d in docs]
    # Context sizes are log-uniform; the questions add a few hundred characters to each.
    assert min(sizes) < corpus.RETRIEVAL_MIN_CHARS + 1_000
    assert max(sizes) > corpus.RETRIEVAL_MAX_CHARS // 2


def test_unknown_corpus(tmp_path):
    with pytest.raises(DataError, match="one of code-repos"):
        corpus.corpus_file("wikipedia", tmp_path)


def test_base_curriculum_corpora():
    """retrieval-short: documents sized for short rows, word-key needles most often; repeats: copy
    documents. (The builders' first records: the whole corpora take seconds to write.)"""
    short = [d["text"] for d in itertools.islice(corpus._retrieval_short(), 400)]
    sizes = sorted(len(t) for t in short)
    assert sizes[len(sizes) // 2] < 1_500 < sizes[-1] < corpus.SHORT_RETRIEVAL_MAX_CHARS + 2_000
    assert sum("magic number" in t for t in short) == 200  # half are word-key needle documents
    assert corpus.SHORT_RETRIEVAL_DOCUMENTS >= 10 * corpus.RETRIEVAL_DOCUMENTS
    repeats = [d["text"] for d in itertools.islice(corpus._repeats(), 400)]
    assert all(len(set(t.rstrip("\n").split("\n"))) == 1 for t in repeats)
