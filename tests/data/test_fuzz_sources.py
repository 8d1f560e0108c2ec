"""Broken data files through ``prolongctl data prepare``, called in-process (the CLI's own typer
app, one CliRunner call per case): every mutated JSONL, Parquet, Arrow IPC and MDS source gets
exit 0 (the mutation left valid data, and the prepared directory is whole) or exit 2 with one
line naming the file (and line, row or shard); never a traceback, another exit code, or a
half-written prepared directory (a ``.partial`` left, a shard directory without its meta).

Cases are drawn by seeded mutators (truncation, bit flips, wrong types, missing columns, empty
files, huge lines, invalid UTF-8, deep nesting, shards whose index disagrees with their files).
make test runs a sample of each format; make bench (marker chaos) runs 1,000 and prints the
counts for README's Status table.
"""

from __future__ import annotations

import json
import random
import shutil
import struct
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.data import sources
from prolong.data import tokenizer as tokmod
from prolong.data.errors import DataError
from prolong.data.shards import META_FILE, OFFSETS_FILE, TOKENS_FILE

FORMATS = ("jsonl", "parquet", "arrow", "mds")
VOCAB = 300
SAMPLE_PER_FORMAT = 6  # make test
FULL = 1000  # make bench: over all formats


def words(rng: random.Random, n: int) -> str:
    return " ".join("".join(rng.choice("abcdefghijkl") for _ in range(rng.randint(1, 6)))
                    for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    rng = random.Random(1)
    path = tmp_path_factory.mktemp("tok") / "bpe"
    tokmod.train_bpe([words(rng, 200) for _ in range(100)], VOCAB, path)
    return path


# ---- valid sources ----------------------------------------------------------------------------

def _texts(rng: random.Random) -> list[str]:
    return [words(rng, rng.randint(1, 40)) for _ in range(rng.randint(3, 12))]


def write_mds(directory: Path, samples: list[np.ndarray], *, per_shard: int = 2) -> None:
    """An MDS dataset (index.json + uncompressed shards) with one ndarray:uint32 column
    ``input_ids``, in the on-disk layout prolong.data.mds reads (and streaming's MDSWriter
    writes: sample count, offsets, the writer's JSON config, then the samples)."""
    directory.mkdir(parents=True)
    shards = []
    for s, start in enumerate(range(0, len(samples), per_shard)):
        chunk = samples[start: start + per_shard]
        config = json.dumps({"columns": {"input_ids": "ndarray:uint32"}}).encode()
        # ndarray:uint32 without a shape: a shape code (ndim 1 << 2 | uint32 shape 2), the
        # length, the values; each sample led by its variable column's size.
        cols = [struct.pack("<BI", 6, len(a)) + a.astype("<u4").tobytes() for a in chunk]
        bodies = [struct.pack("<I", len(c)) + c for c in cols]
        head = 4 + 4 * (len(chunk) + 1) + len(config)
        offsets, pos = [], head
        for b in bodies:
            offsets.append(pos)
            pos += len(b)
        offsets.append(pos)
        data = (struct.pack("<I", len(chunk)) + struct.pack(f"<{len(offsets)}I", *offsets)
                + config + b"".join(bodies))
        name = f"shard.{s:05d}.mds"
        (directory / name).write_bytes(data)
        shards.append({"column_encodings": ["ndarray:uint32"], "column_names": ["input_ids"],
                       "column_sizes": [None], "compression": None, "format": "mds",
                       "hashes": [], "raw_data": {"basename": name, "bytes": len(data),
                                                  "hashes": {}},
                       "samples": len(chunk), "size_limit": 1 << 20, "version": 2,
                       "zip_data": None})
    (directory / "index.json").write_text(json.dumps({"shards": shards, "version": 2}))


def write_source(fmt: str, root: Path, rng: random.Random) -> Path:
    """A valid source of ``fmt`` under ``root``; returns the stream's path."""
    texts = _texts(rng)
    if fmt == "jsonl":
        path = root / "docs.jsonl"
        path.write_text("".join(json.dumps({"text": t, "id": i}) + "\n"
                                for i, t in enumerate(texts)))
    elif fmt == "parquet":
        path = root / "docs.parquet"
        pq.write_table(pa.table({"text": texts, "id": list(range(len(texts)))}), path,
                       row_group_size=4)
    elif fmt == "arrow":
        path = root / "docs.arrow"
        table = pa.table({"text": texts, "id": list(range(len(texts)))})
        with pa.ipc.new_file(str(path), table.schema) as writer:
            for batch in table.to_batches(max_chunksize=4):
                writer.write_batch(batch)
    else:
        path = root / "mds"
        write_mds(path, [np.array([rng.randrange(VOCAB) for _ in range(rng.randint(1, 60))],
                                  dtype=np.uint32) for _ in range(rng.randint(2, 7))])
    return path


# ---- mutators ---------------------------------------------------------------------------------

def _bytes_mutation(path: Path, rng: random.Random) -> str:
    data = bytearray(path.read_bytes())
    kind = rng.choice(("truncate", "bitflip", "bitflips", "empty", "zero-run", "append-junk"))
    if kind == "truncate":
        data = data[: rng.randrange(len(data))]
    elif kind == "bitflip":
        i = rng.randrange(len(data))
        data[i] ^= 1 << rng.randrange(8)
    elif kind == "bitflips":
        for _ in range(rng.randint(2, 20)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
    elif kind == "empty":
        data = bytearray()
    elif kind == "zero-run":
        i = rng.randrange(len(data))
        data[i: i + rng.randint(1, 64)] = bytes(min(64, len(data) - i))
    else:
        data += bytes(rng.randrange(256) for _ in range(rng.randint(1, 64)))
    path.write_bytes(bytes(data))
    return kind


def _jsonl_mutation(path: Path, rng: random.Random) -> str:
    lines = path.read_bytes().splitlines(keepends=True)
    i = rng.randrange(len(lines))
    kind = rng.choice(("wrong-type", "missing-field", "not-json", "not-object", "invalid-utf8",
                       "huge-line", "deep-nesting", "nul-bytes", "bom", "bytes"))
    record = json.loads(lines[i])
    if kind == "wrong-type":
        record["text"] = rng.choice([1, 2.5, True, None, [], ["a"], {"a": 1}])
        lines[i] = json.dumps(record).encode() + b"\n"
    elif kind == "missing-field":
        del record["text"]
        lines[i] = json.dumps(record).encode() + b"\n"
    elif kind == "not-json":
        lines[i] = lines[i][: max(1, len(lines[i]) // 2)] + b"\n"
    elif kind == "not-object":
        lines[i] = json.dumps(rng.choice([[record["text"]], record["text"], 3])).encode() + b"\n"
    elif kind == "invalid-utf8":
        j = rng.randrange(len(lines[i]))
        lines[i] = lines[i][:j] + rng.choice([b"\xff", b"\xc3\x28", b"\xed\xa0\x80", b"\xf8"]) \
            + lines[i][j:]
    elif kind == "huge-line":
        lines[i] = b'{"text": "' + b"ab " * rng.randint(50_000, 200_000) + \
            rng.choice([b'"}\n', b"\n", b""])
    elif kind == "deep-nesting":
        depth = rng.randint(2_000, 200_000)
        lines[i] = b'{"text": ' + b"[" * depth + b"]" * depth + b"}\n"
    elif kind == "nul-bytes":
        lines[i] = lines[i][:-2] + b"\x00\x00" + lines[i][-2:]
    elif kind == "bom":
        lines[i] = b"\xef\xbb\xbf" + lines[i]
    else:
        return _bytes_mutation(path, rng)
    path.write_bytes(b"".join(lines))
    return kind


def _table_mutation(fmt: str, path: Path, rng: random.Random) -> str:
    kind = rng.choice(("wrong-type", "missing-column", "nulls", "binary-invalid-utf8",
                       "no-rows", "list-column", "bytes", "bytes", "bytes"))
    if kind == "bytes":
        return _bytes_mutation(path, rng)
    n = rng.randint(1, 6)
    text = {"wrong-type": pa.array(list(range(n))),
            "nulls": pa.array(["a b"] * (n - 1) + [None]),
            "binary-invalid-utf8": pa.array([b"ok"] * (n - 1) + [b"\xff\xfe"], pa.binary()),
            "no-rows": pa.array([], pa.string()),
            "list-column": pa.array([["a"]] * n)}.get(kind)
    columns = {"id": pa.array(list(range(len(text) if text is not None else n)))}
    if text is not None:
        columns["text"] = text
    table = pa.table(columns)
    if fmt == "parquet":
        pq.write_table(table, path)
    else:
        with pa.ipc.new_file(str(path), table.schema) as writer:
            writer.write_table(table)
    return kind


def _mds_mutation(root: Path, rng: random.Random) -> str:
    index_path = root / "index.json"
    index = json.loads(index_path.read_text())
    shards = sorted(root.glob("shard.*.mds"))
    kind = rng.choice(("shard-bytes", "shard-bytes", "index-bytes", "index-samples",
                       "index-missing-key", "index-wrong-type", "missing-shard", "extra-shard",
                       "index-basename", "index-compression", "index-encoding", "no-index",
                       "index-raw-bytes"))
    entry = rng.choice(index["shards"])
    if kind == "shard-bytes":
        return "shard-" + _bytes_mutation(rng.choice(shards), rng)
    if kind == "index-bytes":
        return "index-" + _bytes_mutation(index_path, rng)
    if kind == "index-samples":
        entry["samples"] = rng.choice([0, entry["samples"] + rng.randint(1, 3), -1, 2**40])
    elif kind == "index-missing-key":
        del entry[rng.choice(["raw_data", "column_names", "column_encodings", "column_sizes",
                              "samples"])]
    elif kind == "index-wrong-type":
        key = rng.choice(["samples", "column_names", "raw_data", "column_sizes", "shards"])
        value = rng.choice(["x", 3, None, [], {}])
        if key == "shards":
            index["shards"] = value
        else:
            entry[key] = value
    elif kind == "missing-shard":
        rng.choice(shards).unlink()
        return kind
    elif kind == "extra-shard":
        index["shards"].append(dict(entry, raw_data={"basename": "shard.99999.mds",
                                                     "bytes": 10, "hashes": {}}))
    elif kind == "index-basename":
        entry["raw_data"]["basename"] = rng.choice(["../escape.mds", "", "nope.mds", "/etc"])
    elif kind == "index-compression":
        entry["compression"] = rng.choice(["zstd", "gz", "lz77", 7])
    elif kind == "index-encoding":
        entry["column_encodings"] = [rng.choice(["pkl", "int", "str", "ndarray:float32",
                                                 "ndarray:uint32:3", "json"])]
    elif kind == "no-index":
        index_path.unlink()
        return kind
    else:
        entry["raw_data"]["bytes"] = rng.choice([0, 1, 10**12])
    index_path.write_text(json.dumps(index))
    return kind


def mutate(fmt: str, path: Path, rng: random.Random) -> str:
    if fmt == "jsonl":
        return _jsonl_mutation(path, rng)
    if fmt in ("parquet", "arrow"):
        return _table_mutation(fmt, path, rng)
    return _mds_mutation(path, rng)


# ---- what a case must end with ----------------------------------------------------------------

def expected_documents(fmt: str, path: Path) -> int | None:
    """The oracle, written apart from the product with the plain libraries: how many documents
    the mutated source holds, or None where it must be refused. An exit 0 that read another
    number (a reader that skipped a bad line or sample instead of refusing it) is a loss."""
    try:
        if fmt == "jsonl":
            count = 0
            for raw in path.read_bytes().splitlines():
                line = raw.decode("utf-8").strip()  # strict, as the product reads
                if not line:
                    continue
                record = json.loads(line)
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    return None
                count += 1
            return count or None
        if fmt in ("parquet", "arrow"):
            if fmt == "parquet":
                table = pq.read_table(path, columns=["text"])
            else:
                try:
                    table = pa.ipc.open_file(str(path)).read_all()
                except (pa.ArrowException, OSError, ValueError):
                    table = pa.ipc.open_stream(pa.memory_map(str(path))).read_all()
            values = table.column("text").to_pylist()
            ok = values and all(isinstance(v, str) for v in values)
            return len(values) if ok else None
        index = json.loads((path / "index.json").read_text())
        total = sum(entry["samples"] for entry in index["shards"])
        return total or None
    except (ValueError, KeyError, TypeError, OSError, RecursionError, pa.ArrowException):
        return None


def documents_read(prepared: Path) -> int | None:
    """Documents the preparation read (the tokenized shards' count plus the empty ones)."""
    metas = [json.loads(m.read_text()) for m in prepared.rglob("meta.json")
             if "inputs" in json.loads(m.read_text())]
    if len(metas) != 1:
        return None
    return metas[0]["num_docs"] + metas[0]["empty_documents"]


# ---- one case ---------------------------------------------------------------------------------

@dataclass
class Outcome:
    fmt: str
    mutation: str
    exit_code: int
    message: str
    lost: list[str]
    """What makes it a failure of ours: a traceback, another exit code, a message of more than
    one line or not naming the file, a half-written prepared directory."""


runner = CliRunner()


def write_job(case: Path, stream_path: Path, fmt: str, tok_dir: Path) -> Path:
    spec = {"model": {"architecture": {"preset": "tiny", "vocabSize": VOCAB}},
            "sequenceLength": 256, "globalBatchTokens": 512, "steps": 1, "precision": "fp32",
            "data": {"streams": [{"domain": "web", "path": str(stream_path), "format": fmt,
                                  "proportion": 1.0}],
                     "tokenizer": {"source": str(tok_dir)},
                     "preparedDir": str(case / "prepared")},
            "schedule": {"peakLR": 1e-3}, "cluster": {"device": "cpu", "workersPerNode": 1}}
    path = case / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob",
                                    "metadata": {"name": "job"}, "spec": spec}))
    return path


def half_written(prepared: Path) -> list[str]:
    """Staging directories left behind, or shard directories without the meta a whole one ends
    with (prolong.data.shards.ShardWriter writes it last, then renames the directory)."""
    if not prepared.exists():
        return []
    problems = [f"{p} left behind" for p in prepared.rglob("*.partial")]
    for directory in prepared.rglob("*"):
        if directory.is_dir() and any((directory / f).exists() for f in (
                TOKENS_FILE, OFFSETS_FILE)) and not (directory / META_FILE).is_file():
            problems.append(f"{directory} has shards but no meta.json")
    return problems


def run_case(tmp: Path, fmt: str, seed: int, tok_dir: Path) -> Outcome:
    rng = random.Random(seed)
    case = tmp / f"{fmt}-{seed}"
    case.mkdir()
    source = write_source(fmt, case, rng)
    mutation = mutate(fmt, source, rng)
    job = write_job(case, source, fmt, tok_dir)
    expected = expected_documents(fmt, source)
    result = runner.invoke(app, ["data", "prepare", str(job), "--no-progress", "--workers", "1"])
    stderr = result.stderr.strip()
    lost = []
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        lost.append(f"raised {type(result.exception).__name__}: {result.exception}"[:300])
    if "Traceback" in result.output or "Traceback" in stderr:
        lost.append("traceback")
    if result.exit_code == 2:
        if len(stderr.splitlines()) != 1:
            lost.append(f"{len(stderr.splitlines())} lines: {stderr[:300]!r}")
        elif str(source) not in stderr and source.name not in stderr:
            lost.append(f"does not name the file: {stderr[:300]!r}")
    elif result.exit_code != 0:
        lost.append(f"exit {result.exit_code}: {stderr[-300:]!r}")
    elif fmt != "mds" and expected is None:
        # MDS shards have no reader but ours: for them only the count is checked.
        lost.append("accepted a source the oracle refuses")
    elif (read := documents_read(case / "prepared")) != expected:
        lost.append(f"read {read} documents, the source holds {expected}")
    lost += half_written(case / "prepared")
    shutil.rmtree(case)
    return Outcome(fmt, mutation, result.exit_code, stderr.splitlines()[0] if stderr else "",
                   lost)


def fuzz(tmp: Path, tok_dir: Path, cases: dict[str, range]) -> list[Outcome]:
    outcomes = [run_case(tmp, fmt, seed, tok_dir) for fmt, seeds in cases.items()
                for seed in seeds]
    lost = [o for o in outcomes if o.lost]
    assert not lost, "\n".join(f"{o.fmt}/{o.mutation}: {'; '.join(o.lost)}" for o in lost[:20])
    return outcomes


def test_the_unmutated_sources_prepare(tmp_path, tok_dir):
    # The baseline every mutation starts from is valid: exit 0, whole shards.
    for fmt in FORMATS:
        rng = random.Random(0)
        case = tmp_path / fmt
        case.mkdir()
        source = write_source(fmt, case, rng)
        result = runner.invoke(app, ["data", "prepare", str(write_job(case, source, fmt, tok_dir)),
                                     "--no-progress", "--workers", "1"])
        assert result.exit_code == 0, (fmt, result.output, result.stderr)
        assert half_written(case / "prepared") == []


@pytest.mark.parametrize("fmt", FORMATS)
def test_broken_sources_get_one_line(tmp_path, tok_dir, fmt):
    outcomes = fuzz(tmp_path, tok_dir, {fmt: range(SAMPLE_PER_FORMAT)})
    assert sum(o.exit_code == 2 for o in outcomes) >= SAMPLE_PER_FORMAT // 2


def test_a_reader_that_skips_bad_lines_is_caught(tmp_path, tok_dir, monkeypatch):
    # The planted bug: the JSONL reader drops a line it cannot read instead of refusing the
    # file (an error swallowed). Every such case exits 0, as a valid source would; the oracle's
    # count is what tells them apart.
    real = sources._field

    def lenient(row, stream, conv, where):
        try:
            return real(row, stream, conv, where)
        except DataError:
            return {"text": ""}  # the bad record becomes an empty document, dropped later

    monkeypatch.setattr(sources, "_field", lenient)
    with pytest.raises(AssertionError, match=r"read .* documents, the source holds None|accepted"):
        fuzz(tmp_path, tok_dir, {"jsonl": range(20)})


@pytest.mark.chaos
def test_a_thousand_broken_sources(tmp_path, tok_dir):
    per = FULL // len(FORMATS)
    outcomes = fuzz(tmp_path, tok_dir, {fmt: range(10_000, 10_000 + per) for fmt in FORMATS})
    refused = Counter(o.fmt for o in outcomes if o.exit_code == 2)
    kinds = Counter(f"{o.fmt}/{o.mutation}" for o in outcomes)
    print(f"\ndata files: {len(outcomes)} tried, {len(outcomes)} answered in one line "
          f"({sum(refused.values())} exit 2, {len(outcomes) - sum(refused.values())} exit 0 "
          f"with whole output), 0 lost; refused per format {dict(refused)}")
    print("mutations:", dict(sorted(kinds.items())))
