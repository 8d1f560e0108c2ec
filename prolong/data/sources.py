"""Documents from a DataStream: one iterator per source format, one error type for bad input.

A document is text (or, for conversation streams, a list of ``{role, content}`` messages, or, for
MDS, token ids already) plus an id that stays the same across runs (file path relative to the
stream's root, and line/row/sample number), so manifests and errors can point at it.

Formats (``DataStream.format``):

- ``jsonl``: one JSON object per line; the document is ``textField`` (``messagesField`` for
  conversation streams). Blank lines are skipped.
- ``parquet``, ``arrow`` (Arrow IPC file or stream, as ``datasets`` writes), ``hf_disk``
  (``datasets.load_from_disk``; a DatasetDict must have a ``train`` split).
- ``text_dir``: every file is one document.
- ``repo_dir``: every sub-directory is one repository: its text files concatenated in sorted path
  order, each preceded by a header line ``<<< path/inside/repo >>>`` (ProLong's code-repo rule: all
  files of one repository in one document, no dependency ordering). Binary files (a NUL byte, or
  not UTF-8) are skipped, as are hidden files/directories, ``__pycache__`` and symlinks.
- ``mds``: ProLong's released Mosaic shards (already tokenized; see :mod:`prolong.data.mds`).
- ``embedded``: built by :mod:`prolong.data.corpus` into a jsonl file first; the caller passes
  that file as ``path`` (see :func:`prolong.data.prepare.resolve_stream`).

``path`` may be a file, a directory (every matching file under it, recursively, sorted) or a glob.
Relative paths are relative to the working directory, like ``storage.root``.

Errors (DataError, naming the stream and the path): missing path, a stream with no documents,
invalid UTF-8 (file and byte offset), a missing text/messages field (file and line/row).
"""

from __future__ import annotations

import glob
import json
import os
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from prolong.data import mds
from prolong.data.errors import DataError
from prolong.spec import DataStream

# Which files a directory contributes, per format (text_dir/repo_dir take every file).
_SUFFIXES = {"jsonl": (".jsonl", ".json"), "parquet": (".parquet",), "arrow": (".arrow",)}
_SKIP_DIRS = {"__pycache__", "node_modules"}
ROLES = ("system", "user", "assistant")
# A NUL byte in the first block is the usual "binary file" test (git and grep use the same idea).
_BINARY_PROBE = 8192


@dataclass(frozen=True)
class Document:
    """One document of a stream: exactly one of text, messages, tokens is set."""

    id: str
    text: str | None = None
    messages: list[dict[str, str]] | None = None
    tokens: np.ndarray | None = None


def iter_documents(stream: DataStream) -> Iterator[Document]:
    """Every document of ``stream`` in a fixed order. Raises DataError for bad input, and when the
    stream turns out to hold no document at all (never a silent empty dataset)."""
    conv = stream.packing == "conversation"
    readers = {"jsonl": _jsonl, "parquet": _parquet, "arrow": _arrow, "hf_disk": _hf_disk,
               "text_dir": _text_dir, "repo_dir": _repo_dir, "mds": _mds}
    if stream.format not in readers:
        raise DataError(f"format {stream.format} must be resolved before reading "
                        "(embedded corpora are built by prolong.data.corpus)",
                        domain=stream.domain, path=stream.path)
    if conv and stream.format in ("text_dir", "repo_dir", "mds"):
        raise DataError(f"conversation streams need messages; format {stream.format} holds text",
                        domain=stream.domain, path=stream.path)
    count = 0
    try:
        for doc in readers[stream.format](stream, conv):
            count += 1
            yield doc
    except DataError as err:
        if err.domain is None:  # name the stream on errors raised below us
            raise DataError(str(err), domain=stream.domain) from None
        raise
    if count == 0:
        raise DataError("stream has no documents", domain=stream.domain, path=stream.path)


# ---------------------------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------------------------

def _has_magic(path: str) -> bool:
    return glob.has_magic(path)


def resolve_files(stream: DataStream) -> list[Path]:
    """The files a file-based stream reads, sorted; DataError when there are none.
    (repo_dir: every file of every repository; mds: index and shard files.)"""
    if stream.format == "repo_dir":
        return [f for repo in resolve_repos(stream) for f in _walk(repo)]
    if stream.format in ("mds", "hf_disk"):
        root = Path(stream.path)
        if not root.exists():
            raise DataError("path does not exist", domain=stream.domain, path=stream.path)
        return _walk(root) if root.is_dir() else [root]
    suffixes = _SUFFIXES.get(stream.format)
    matches = sorted(glob.glob(stream.path, recursive=True)) if _has_magic(stream.path) \
        else [stream.path]
    files: list[Path] = []
    for m in matches:
        p = Path(m)
        if p.is_dir():
            files += [f for f in _walk(p) if suffixes is None or f.name.endswith(suffixes)]
        elif p.is_file():
            files.append(p)
    if not matches or not any(Path(m).exists() for m in matches):
        raise DataError("path does not exist" + (" (the glob matches nothing)"
                                                 if _has_magic(stream.path) else ""),
                        domain=stream.domain, path=stream.path)
    if not files:
        want = f" (looked for {', '.join(suffixes)})" if suffixes else ""
        raise DataError(f"no input files{want}", domain=stream.domain, path=stream.path)
    return files


def resolve_repos(stream: DataStream) -> list[Path]:
    """repo_dir: the repositories (sub-directories of path, or the directories a glob matches)."""
    if _has_magic(stream.path):
        repos = [Path(m) for m in sorted(glob.glob(stream.path, recursive=True))]
    else:
        root = Path(stream.path)
        if not root.is_dir():
            raise DataError("path does not exist" if not root.exists() else
                            "repo_dir needs a directory whose sub-directories are repositories",
                            domain=stream.domain, path=stream.path)
        repos = sorted(p for p in root.iterdir() if p.is_dir() and not _hidden(p.name))
    repos = [r for r in repos if r.is_dir() and not r.is_symlink()]
    if not repos:
        raise DataError("no repositories (sub-directories) found", domain=stream.domain,
                        path=stream.path)
    return repos


def _hidden(name: str) -> bool:
    return name.startswith(".") or name in _SKIP_DIRS


def _walk(root: Path) -> list[Path]:
    """Regular files under root (no symlinks, hidden entries or __pycache__), sorted by their
    path relative to root. scandir's entries carry their type, so no extra stat per file."""
    out: list[tuple[str, Path]] = []
    todo = [(Path(root), "")]
    while todo:
        directory, rel = todo.pop()
        with os.scandir(directory) as entries:
            for e in entries:
                if _hidden(e.name) or e.is_symlink():
                    continue
                if e.is_dir():
                    todo.append((Path(e.path), f"{rel}{e.name}/"))
                elif e.is_file():
                    out.append((f"{rel}{e.name}", Path(e.path)))
    return [p for _, p in sorted(out)]


def _rel(path: Path, stream: DataStream) -> str:
    base = Path(stream.path)
    if not _has_magic(stream.path) and base.is_dir():
        return path.relative_to(base).as_posix()
    return path.as_posix() if _has_magic(stream.path) else path.name


# ---------------------------------------------------------------------------------------------
# Text decoding
# ---------------------------------------------------------------------------------------------

def decode_utf8(data: bytes, where: str, *, offset: int = 0) -> str:
    """Strict UTF-8; the error names the file and the byte offset of the first bad byte."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DataError(f"invalid UTF-8 at byte offset {offset + exc.start} "
                        f"({data[exc.start:exc.start + 4]!r})", path=where) from None


def is_binary(data: bytes) -> bool:
    if b"\0" in data[:_BINARY_PROBE]:
        return True
    try:
        data.decode("utf-8")
    except UnicodeDecodeError:
        return True
    return False


def _field(row: Any, stream: DataStream, conv: bool, where: str) -> dict[str, Any]:
    """The document's text or messages from one record."""
    name = stream.messages_field if conv else stream.text_field
    if not isinstance(row, dict) or row.get(name) is None:
        keys = ", ".join(sorted(row)) if isinstance(row, dict) else type(row).__name__
        raise DataError(f"record has no {'messagesField' if conv else 'textField'} {name!r} "
                        f"(has: {keys})", path=where)
    value = row[name]
    if conv:
        return {"messages": check_messages(value, where)}
    if not isinstance(value, str):
        raise DataError(f"field {name!r} must be a string, got {type(value).__name__}", path=where)
    return {"text": value}


def check_messages(value: Any, where: str) -> list[dict[str, str]]:
    """A conversation in UltraChat form: a non-empty list of {role, content} with known roles,
    in order (an optional system message first, then user and assistant turns taking turns from
    the user: a chat template renders nothing sensible otherwise), and at least one assistant turn
    (otherwise it would contribute no label)."""
    if not isinstance(value, list) or not value:
        raise DataError("messages must be a non-empty list of {role, content}", path=where)
    out = []
    for i, m in enumerate(value):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str) or \
                not isinstance(m.get("content"), str):
            raise DataError(f"message {i} must be {{role: str, content: str}}", path=where)
        if m["role"] not in ROLES:
            raise DataError(f"message {i} has role {m['role']!r}; expected one of "
                            f"{', '.join(ROLES)}", path=where)
        out.append({"role": m["role"], "content": m["content"]})
    _check_turn_order(out, where)
    if not any(m["role"] == "assistant" for m in out):
        raise DataError("conversation has no assistant turn", path=where)
    return out


def _check_turn_order(messages: list[dict[str, str]], where: str) -> None:
    expected = "user"
    for i, m in enumerate(messages):
        if m["role"] == "system":
            if i:
                raise DataError(f"message {i} is a system message; only the first message may be",
                                path=where)
            continue
        if m["role"] != expected:
            article = "an" if expected == "assistant" else "a"
            raise DataError(f"message {i} has role {m['role']!r} where {article} {expected} turn comes "
                            "(turns go user, assistant, user, ...)", path=where)
        expected = "assistant" if expected == "user" else "user"


# ---------------------------------------------------------------------------------------------
# Readers
# ---------------------------------------------------------------------------------------------

def _jsonl(stream: DataStream, conv: bool) -> Iterator[Document]:
    for path in resolve_files(stream):
        rel = _rel(path, stream)
        offset = 0
        with open(path, "rb") as f:
            for lineno, raw in enumerate(f, start=1):
                where = f"{path}:{lineno}"
                line = decode_utf8(raw, str(path), offset=offset).strip()
                offset += len(raw)
                if not line:
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"invalid JSON: {exc.msg} (column {exc.colno})",
                                    path=where) from None
                except RecursionError:  # the parser recurses once per nesting level
                    raise DataError("invalid JSON: nested too deeply", path=where) from None
                yield Document(f"{rel}:{lineno}", **_field(row, stream, conv, where))


def _rows(batches: Iterable[Any], stream: DataStream, conv: bool, path: str,
          rel: str) -> Iterator[Document]:
    """Documents from record batches (pyarrow RecordBatch or dict of columns). A file that turns
    out corrupt past its header (a bad page, a truncated batch, invalid UTF-8 in a string
    column) is a DataError naming it and the first row of the batch that failed."""
    name = stream.messages_field if conv else stream.text_field
    row = 0
    batches = iter(batches)
    while True:
        try:
            batch = next(batches, None)
            if batch is None:
                return
            column = batch[name] if isinstance(batch, dict) else batch.column(name)
            values = column if isinstance(column, list) else column.to_pylist()
        except (OSError, ValueError, KeyError, TypeError, IndexError) as exc:
            # pyarrow's errors are OSError or ValueError (ArrowInvalid) subclasses; decoding a
            # string column raises UnicodeDecodeError (a ValueError).
            raise DataError(f"unreadable from row {row + 1}: {_first_line(exc)}",
                            path=path) from None
        for value in values:
            row += 1
            yield Document(f"{rel}:{row}", **_field({name: value}, stream, conv,
                                                   f"{path} row {row}"))


def _names(schema: Any, path: str) -> list[str]:
    """A file's column names (a corrupt schema can hold names that are not UTF-8)."""
    try:
        return list(schema.names)
    except ValueError as exc:
        raise DataError(f"unreadable schema: {_first_line(exc)}", path=path) from None


def _first_line(exc: BaseException) -> str:
    text = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
    return text if len(text) <= 200 else text[:197] + "..."


def _require_column(names: list[str], stream: DataStream, conv: bool, path: str) -> None:
    name = stream.messages_field if conv else stream.text_field
    if name not in names:
        raise DataError(f"no {'messagesField' if conv else 'textField'} column {name!r} "
                        f"(columns: {', '.join(names)})", path=path)


def _parquet(stream: DataStream, conv: bool) -> Iterator[Document]:
    import pyarrow.parquet as pq

    name = stream.messages_field if conv else stream.text_field
    for path in resolve_files(stream):
        try:
            pf = pq.ParquetFile(path)
        except Exception as exc:  # pyarrow raises several types for a non-parquet file
            raise DataError(f"not a readable parquet file: {_first_line(exc)}",
                            path=str(path)) from None
        _require_column(_names(pf.schema_arrow, str(path)), stream, conv, str(path))
        yield from _rows(pf.iter_batches(columns=[name], batch_size=1024), stream, conv,
                         str(path), _rel(path, stream))


def _arrow(stream: DataStream, conv: bool) -> Iterator[Document]:
    import pyarrow as pa

    for path in resolve_files(stream):
        source = pa.memory_map(str(path))
        try:
            reader = pa.ipc.open_file(source)
            batches = (reader.get_batch(i) for i in range(reader.num_record_batches))
            schema = reader.schema
        except (pa.ArrowException, OSError, ValueError):
            source.seek(0)
            try:
                reader = pa.ipc.open_stream(source)
            except (pa.ArrowException, OSError, ValueError) as exc:
                raise DataError(f"not an Arrow IPC file or stream: {_first_line(exc)}",
                                path=str(path)) from None
            batches, schema = reader, reader.schema
        _require_column(_names(schema, str(path)), stream, conv, str(path))
        yield from _rows(batches, stream, conv, str(path), _rel(path, stream))


def _hf_disk(stream: DataStream, conv: bool) -> Iterator[Document]:
    import datasets

    root = Path(stream.path)
    if not root.exists():
        raise DataError("path does not exist", path=stream.path)
    try:
        ds = datasets.load_from_disk(str(root))
    except (FileNotFoundError, ValueError) as exc:
        raise DataError(f"not a datasets.save_to_disk directory: {exc}", path=stream.path) \
            from None
    if isinstance(ds, datasets.DatasetDict):
        if "train" not in ds:
            raise DataError(f"DatasetDict without a train split (splits: {', '.join(ds)})",
                            path=stream.path)
        ds = ds["train"]
    _require_column(list(ds.column_names), stream, conv, stream.path)
    name = stream.messages_field if conv else stream.text_field
    batches = ({name: b[name]} for b in ds.select_columns([name]).iter(batch_size=1024))
    yield from _rows(batches, stream, conv, stream.path, root.name)


def _read_text(path: Path) -> str:
    return decode_utf8(path.read_bytes(), str(path))


def _text_dir(stream: DataStream, conv: bool) -> Iterator[Document]:
    for path in resolve_files(stream):
        yield Document(_rel(path, stream), text=_read_text(path))


def repo_document(repo: Path, *, max_chars: int | None = None,
                  suffixes: tuple[str, ...] | None = None) -> tuple[str, list[str]]:
    """One repository as one document: ``<<< rel/path >>>`` header, then the file's text, for
    every text file in sorted path order. Returns (text, included paths).

    ``max_chars`` (used by the embedded corpus to bound its size) stops before the file that would
    take the document past that many characters; the first file is always kept. ``suffixes``
    keeps only files with those endings."""
    parts, included, size = [], [], 0
    for path in _walk(repo):
        if suffixes is not None and not path.name.endswith(suffixes):
            continue
        data = path.read_bytes()
        if is_binary(data):
            continue
        rel = path.relative_to(repo).as_posix()
        text = data.decode("utf-8")
        part = f"<<< {rel} >>>\n{text}" + ("" if text.endswith("\n") else "\n")
        if max_chars is not None and size + len(part) > max_chars and parts:
            break
        parts.append(part)
        included.append(rel)
        size += len(part)
    return "".join(parts), included


def _repo_dir(stream: DataStream, conv: bool) -> Iterator[Document]:
    for repo in resolve_repos(stream):
        text, files = repo_document(repo)
        if files:  # a repository of binaries only contributes nothing
            yield Document(repo.name, text=text)


def _mds(stream: DataStream, conv: bool) -> Iterator[Document]:
    if not Path(stream.path).exists():
        raise DataError("path does not exist", path=stream.path)
    for doc_id, ids, _domain in mds.iter_documents(stream.path):
        yield Document(doc_id, tokens=ids)
