"""Embedded corpora: training text found on the machine itself, so the quickstart needs no download.

Everything is read from the running interpreter's standard library and site-packages, in sorted
order, so a corpus is a pure function of the environment (Python version + installed
distributions): the same venv on a fresh CI machine builds byte-identical files. Each corpus is
bounded in size so that building, training a tokenizer on it and tokenizing it take seconds.

- ``code-repos``: one top-level package of site-packages = one repository document, its ``.py``
  files concatenated by :func:`prolong.data.sources.repo_document` (the repo_dir rule), capped at
  :data:`REPO_CHARS` per repository and :data:`MAX_REPOS` repositories (skipping ones under
  :data:`MIN_REPO_CHARS`, too short for a long-document stream).
- ``books``: long prose: the Python reference topics shipped in ``pydoc_data`` (grouped into
  chapters), long package descriptions (dist-info METADATA) and long licence/readme/notice texts
  (deduplicated by content); standard-library module sources fill up to :data:`MIN_BOOKS` when the
  environment has too little prose. Every book is at least :data:`MIN_BOOK_CHARS` characters, well
  over 2,048 tokens of a 4,096-entry BPE (about 3-4 characters per token on this text).
- ``short-text``: docstrings of standard-library modules, classes and functions, and paragraphs
  of the books: short documents for concat streams.
- ``retrieval``: synthetic retrieval documents in HELMET's recall phrasing
  (:mod:`prolong.data.retrieval`): a JSON object of UUID pairs with lookups, RULER needle lists
  with questions and answers; context sizes log-uniform from :data:`RETRIEVAL_MIN_CHARS` to
  :data:`RETRIEVAL_MAX_CHARS`, so a stream's ``minLength``/``maxLength`` picks one length bucket.
- ``retrieval-short``: the same kinds of documents at short-row sizes (contexts of
  :data:`SHORT_RETRIEVAL_MIN_CHARS` to :data:`SHORT_RETRIEVAL_MAX_CHARS`, word-key needles twice as
  often as the other kinds), and ten times as many: a base model trained on 256-token rows reads
  each one at most a few times instead of learning its keys by heart.
- ``repeats``: copy documents (:mod:`prolong.data.repeats`), random segments over a small alphabet
  or of needle-like items, each repeated: the induction curriculum of the quickstart base.
- ``sft-conversations``: conversations in UltraChat form (``messages``: [{role, content}]): a user
  asks what a standard-library object does and the assistant answers with its documentation;
  a user asks about a Python reference topic and the assistant answers with its opening; and
  retrieval dialogues over a JSON object or a needle list (answers exact, 1-3 turns each).

Each corpus is written to ``<cache>/<name>-<envkey>/data.jsonl`` (``{"id", "text"}`` or
``{"id", "messages"}``) under a temporary name and renamed; a finished directory is reused.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.metadata
import inspect
import json
import os
import random
import re
import shutil
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from prolong.data.errors import DataError
from prolong.data.repeats import repeat_documents
from prolong.data.retrieval import retrieval_dialogue, retrieval_documents
from prolong.data.sources import is_binary, repo_document
from prolong.spec import EMBEDDED_CORPORA

CORPUS_VERSION = 2  # bump when a builder changes its output for the same environment
DATA_FILE = "data.jsonl"

REPO_CHARS = 48_000
MIN_REPO_CHARS = 12_000
MAX_REPOS = 24
MIN_BOOK_CHARS = 16_000
MAX_BOOK_CHARS = 48_000
CHAPTER_CHARS = 24_000
MIN_BOOKS = 40
MAX_BOOKS = 48
DOCSTRING_FILES = 60
MAX_SHORT = 2_500
RETRIEVAL_DIALOGUES = 600
RETRIEVAL_DOCUMENTS = 4_000
RETRIEVAL_MIN_CHARS = 250
RETRIEVAL_MAX_CHARS = 9_000
SHORT_RETRIEVAL_DOCUMENTS = 40_000
SHORT_RETRIEVAL_MIN_CHARS = 120
SHORT_RETRIEVAL_MAX_CHARS = 1_200
SHORT_RETRIEVAL_KINDS = ("needle_words", "json_kv", "needle_words", "needle_uuids")
REPEAT_DOCUMENTS = 60_000
SEED = 1234

_PROSE_NAMES = re.compile(r"^(license|licence|copying|notice|readme|authors|changelog|changes)"
                          r"(\.(txt|rst|md))?$|\.(txt|rst|md)$", re.IGNORECASE)


@functools.lru_cache(maxsize=1)
def environment_key() -> str:
    """What the corpora depend on: Python version, installed distributions (their dist-info
    directory names carry name and version; parsing every METADATA would take seconds), builder
    version and size limits. Cached: the environment does not change under a running process."""
    dists = sorted(p.name for p in _site_packages().iterdir()
                   if p.name.endswith((".dist-info", ".egg-info")))
    text = json.dumps([CORPUS_VERSION, sys.version, dists, MAX_REPOS, REPO_CHARS, MAX_BOOKS])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def corpus_file(name: str, cache_dir: str | Path) -> Path:
    """Build corpus ``name`` under ``cache_dir`` if needed; return its jsonl file."""
    if name not in BUILDERS:
        raise DataError(f"unknown embedded corpus; expected one of {', '.join(EMBEDDED_CORPORA)}",
                        path=name)
    out = Path(cache_dir) / f"{name}-{environment_key()}"
    data = out / DATA_FILE
    if data.is_file():
        return data
    staging = out.with_name(out.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    count = 0
    with open(staging / DATA_FILE, "w", encoding="utf-8") as f:
        for record in BUILDERS[name]():
            f.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    if count == 0:
        shutil.rmtree(staging)
        raise DataError("embedded corpus came out empty in this environment", path=name)
    (staging / "meta.json").write_text(json.dumps(
        {"name": name, "documents": count, "version": CORPUS_VERSION, "python": sys.version},
        indent=2))
    shutil.rmtree(out, ignore_errors=True)
    staging.rename(out)
    return data


# ---------------------------------------------------------------------------------------------
# Where the text comes from
# ---------------------------------------------------------------------------------------------

def _site_packages() -> Path:
    return Path(sysconfig.get_paths()["purelib"])


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _packages() -> list[Path]:
    """Top-level packages of site-packages (directories with __init__.py), sorted by name."""
    root = _site_packages()
    return sorted((p for p in root.iterdir()
                   if p.is_dir() and not p.name.startswith((".", "_")) and
                   (p / "__init__.py").is_file()), key=lambda p: p.name)


def _code_repos() -> Iterator[dict[str, Any]]:
    kept = 0
    for pkg in _packages():
        text, _ = repo_document(pkg, max_chars=REPO_CHARS, suffixes=(".py",))
        if len(text) < MIN_REPO_CHARS:
            continue
        yield {"id": f"site-packages/{pkg.name}", "text": text}
        kept += 1
        if kept >= MAX_REPOS:
            return


def _topic_chapters() -> Iterator[tuple[str, str]]:
    """pydoc's reference topics, in name order, grouped into chapters of >= CHAPTER_CHARS."""
    from pydoc_data.topics import topics

    parts: list[str] = []
    names: list[str] = []
    for name in sorted(topics):
        parts.append(topics[name].strip() + "\n")
        names.append(name)
        if sum(map(len, parts)) >= CHAPTER_CHARS:
            yield f"pydoc/{names[0]}..{names[-1]}", "\n".join(parts)
            parts, names = [], []
    if parts:
        yield f"pydoc/{names[0]}..{names[-1]}", "\n".join(parts)


def _descriptions() -> Iterator[tuple[str, str]]:
    """Long package descriptions (the README each distribution ships in its METADATA)."""
    dists = sorted(importlib.metadata.distributions(), key=lambda d: d.metadata["Name"] or "")
    for d in dists:
        body = d.metadata.get_payload() if hasattr(d.metadata, "get_payload") else None
        if isinstance(body, str) and body.strip():
            yield f"metadata/{d.metadata['Name']}", body.strip() + "\n"


def _prose_files() -> Iterator[tuple[str, str]]:
    """Licence, notice and readme-like text files anywhere in site-packages or the stdlib."""
    for root in (_site_packages(), _stdlib()):
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")
                                 and d not in ("__pycache__", "site-packages", "test", "tests"))
            for name in sorted(filenames):
                if not _PROSE_NAMES.search(name):
                    continue
                path = Path(dirpath, name)
                if path.is_symlink() or path.stat().st_size < MIN_BOOK_CHARS:
                    continue
                data = path.read_bytes()
                if not is_binary(data) and _looks_like_prose(data.decode("utf-8")):
                    yield f"{root.name}/{path.relative_to(root).as_posix()}", data.decode("utf-8")


def _looks_like_prose(text: str) -> bool:
    """Mostly letters, with spaces between words (rejects logs, stack dumps and tables shipped
    as .txt)."""
    sample = text[:20_000]
    letters = sum(c.isalpha() or c == " " for c in sample)
    return letters >= 0.75 * len(sample) and sample.count(" ") >= 0.1 * len(sample)


def _stdlib_sources() -> Iterator[tuple[str, str]]:
    """Fallback books: the longest-standing long text of all, the standard library's sources."""
    std = _stdlib()
    for path in sorted(std.glob("*.py")):
        if not path.name.startswith("_") and path.stat().st_size >= MIN_BOOK_CHARS:
            yield f"stdlib/{path.name}", path.read_text(encoding="utf-8")


def _books() -> Iterator[dict[str, Any]]:
    seen: set[str] = set()
    count = 0
    sources = [_topic_chapters(), _descriptions(), _prose_files(), _stdlib_sources()]
    for i, source in enumerate(sources):
        if i == len(sources) - 1 and count >= MIN_BOOKS:
            break  # the fallback only fills a prose-poor environment
        for doc_id, text in source:
            text = _cut(text, MAX_BOOK_CHARS)
            digest = hashlib.sha256(text.encode()).hexdigest()
            if len(text) < MIN_BOOK_CHARS or digest in seen:
                continue
            seen.add(digest)
            yield {"id": doc_id, "text": text}
            count += 1
            if count >= MAX_BOOKS:
                return


def _cut(text: str, limit: int) -> str:
    """At most ``limit`` characters, ending at a paragraph break when there is one."""
    if len(text) <= limit:
        return text
    head = text[:limit]
    end = head.rfind("\n\n")
    return head[: end + 1] if end > limit // 2 else head


@functools.lru_cache(maxsize=1)
def _docstrings() -> tuple[tuple[str, str], ...]:
    """(qualified name, cleaned docstring) of stdlib modules, classes and functions. Cached:
    short-text and sft-conversations both use them and parsing is the slow part."""
    return tuple(_parse_docstrings())


def _parse_docstrings() -> Iterator[tuple[str, str]]:
    std = _stdlib()
    files = sorted(p for p in std.glob("*.py") if not p.name.startswith("_"))[:DOCSTRING_FILES]
    for path in files:
        module = path.stem
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node, qual in _named_nodes(tree, module):
            doc = ast.get_docstring(node, clean=True)
            if doc:
                yield qual, doc


def _named_nodes(tree: ast.Module, module: str) -> Iterator[tuple[ast.AST, str]]:
    yield tree, module
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef) and \
                not node.name.startswith("_"):
            yield node, f"{module}.{node.name}"
            if isinstance(node, ast.ClassDef):
                for sub in node.body:
                    if isinstance(sub, ast.FunctionDef) and not sub.name.startswith("_"):
                        yield sub, f"{module}.{node.name}.{sub.name}"


def _short_text() -> Iterator[dict[str, Any]]:
    count = 0
    for qual, doc in _docstrings():
        if 120 <= len(doc) <= 4_000:
            yield {"id": f"docstring/{qual}", "text": doc}
            count += 1
    for doc_id, text in _topic_chapters():
        for j, para in enumerate(re.split(r"\n\s*\n", text)):
            para = para.strip()
            if 200 <= len(para) <= 3_000 and count < MAX_SHORT:
                yield {"id": f"{doc_id}#{j}", "text": para}
                count += 1


def _sft_conversations() -> Iterator[dict[str, Any]]:
    rng = random.Random(SEED)
    qa = []
    for qual, doc in _docstrings():
        if 80 <= len(doc) <= 1_500 and "." in qual:
            question = rng.choice(["What does `{q}` do in Python?",
                                   "Explain the Python standard-library object `{q}`.",
                                   "I came across `{q}`. What is it for?"]).format(q=qual)
            qa.append({"id": f"qa/{qual}", "messages": [
                {"role": "user", "content": question},
                {"role": "assistant", "content": doc}]})
    from pydoc_data.topics import topics

    for name in sorted(topics):
        first = _cut(inspect.cleandoc(topics[name]), 1_200).strip()
        if len(first) >= 80:
            qa.append({"id": f"topic/{name}", "messages": [
                {"role": "system", "content": "You are a concise assistant for Python questions."},
                {"role": "user", "content": f"Tell me about the Python topic '{name}'."},
                {"role": "assistant", "content": first}]})
    yield from qa[:1_500]
    for i in range(RETRIEVAL_DIALOGUES):
        yield {"id": f"retrieval/{i}", "messages": retrieval_dialogue(rng)}


def _retrieval() -> Iterator[dict[str, Any]]:
    docs = retrieval_documents(SEED, RETRIEVAL_DOCUMENTS, min_chars=RETRIEVAL_MIN_CHARS,
                               max_chars=RETRIEVAL_MAX_CHARS)
    for i, text in enumerate(docs):
        yield {"id": f"retrieval/{i}", "text": text}


def _retrieval_short() -> Iterator[dict[str, Any]]:
    docs = retrieval_documents(SEED + 1, SHORT_RETRIEVAL_DOCUMENTS,
                               min_chars=SHORT_RETRIEVAL_MIN_CHARS,
                               max_chars=SHORT_RETRIEVAL_MAX_CHARS, kinds=SHORT_RETRIEVAL_KINDS)
    for i, text in enumerate(docs):
        yield {"id": f"retrieval-short/{i}", "text": text}


def _repeats() -> Iterator[dict[str, Any]]:
    for i, text in enumerate(repeat_documents(SEED, REPEAT_DOCUMENTS)):
        yield {"id": f"repeats/{i}", "text": text}


BUILDERS = {"code-repos": _code_repos, "books": _books, "short-text": _short_text,
            "retrieval": _retrieval, "retrieval-short": _retrieval_short, "repeats": _repeats,
            "sft-conversations": _sft_conversations}
