"""Every source format read back from real files written here; every bad input named clearly."""

from __future__ import annotations

import json
import random
import string

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from prolong.data.errors import DataError
from prolong.data.sources import iter_documents, repo_document
from prolong.spec import DataStream


def stream(path, fmt, **kw) -> DataStream:
    return DataStream(domain=kw.pop("domain", "d"), path=str(path), format=fmt, proportion=1.0, **kw)


def random_texts(n: int, seed: int | None = None) -> list[str]:
    rng = random.Random(seed)
    alphabet = string.ascii_letters + " \n\tàéü—✓\"'{}"
    return ["".join(rng.choice(alphabet) for _ in range(rng.randint(1, 200))) for _ in range(n)]


def test_jsonl_round_trip_with_blank_lines_and_ids(tmp_path):
    texts = random_texts(20)
    lines = []
    for t in texts:
        lines += [json.dumps({"text": t, "other": 1}), ""]
    (tmp_path / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    docs = list(iter_documents(stream(tmp_path / "a.jsonl", "jsonl")))
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == [f"a.jsonl:{2 * i + 1}" for i in range(20)]


def test_directory_and_glob_read_files_in_sorted_order(tmp_path):
    texts = random_texts(6)
    (tmp_path / "sub").mkdir()
    names = ["b.jsonl", "a.jsonl", "sub/c.jsonl"]
    for i, name in enumerate(names):
        (tmp_path / name).write_text(
            "".join(json.dumps({"body": t}) + "\n" for t in texts[2 * i: 2 * i + 2]))
    (tmp_path / "notes.txt").write_text("not a jsonl file")
    by_dir = [d.text for d in iter_documents(stream(tmp_path, "jsonl", text_field="body"))]
    assert by_dir == texts[2:4] + texts[0:2] + texts[4:6]  # a, b, sub/c
    by_glob = [d.text for d in iter_documents(stream(tmp_path / "*.jsonl", "jsonl",
                                                     text_field="body"))]
    assert by_glob == texts[2:4] + texts[0:2]


def test_parquet_and_arrow_round_trip(tmp_path):
    texts = random_texts(50)
    table = pa.table({"text": texts, "n": list(range(50))})
    pq.write_table(table, tmp_path / "x.parquet", row_group_size=7)
    got = [d.text for d in iter_documents(stream(tmp_path / "x.parquet", "parquet"))]
    assert got == texts
    with pa.OSFile(str(tmp_path / "file.arrow"), "wb") as sink, \
            pa.ipc.new_file(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=9)
    with pa.OSFile(str(tmp_path / "stream.arrow"), "wb") as sink, \
            pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table, max_chunksize=11)
    for name in ("file.arrow", "stream.arrow"):
        docs = list(iter_documents(stream(tmp_path / name, "arrow")))
        assert [d.text for d in docs] == texts
        assert docs[3].id == f"{name}:4"


def test_hf_disk_round_trip_and_dataset_dict(tmp_path):
    import datasets

    texts = random_texts(30)
    ds = datasets.Dataset.from_dict({"content": texts})
    ds.save_to_disk(str(tmp_path / "single"))
    got = [d.text for d in iter_documents(stream(tmp_path / "single", "hf_disk",
                                                 text_field="content"))]
    assert got == texts
    datasets.DatasetDict({"train": ds, "test": ds.select(range(2))}).save_to_disk(
        str(tmp_path / "dict"))
    got = [d.text for d in iter_documents(stream(tmp_path / "dict", "hf_disk",
                                                 text_field="content"))]
    assert got == texts


def test_text_dir_one_document_per_file(tmp_path):
    texts = random_texts(5)
    for i, t in enumerate(texts):
        (tmp_path / f"doc{i}.txt").write_text(t, encoding="utf-8")
    (tmp_path / ".hidden").write_text("skipped")
    docs = list(iter_documents(stream(tmp_path, "text_dir")))
    assert [d.text for d in docs] == texts
    assert [d.id for d in docs] == [f"doc{i}.txt" for i in range(5)]


def test_repo_dir_concatenates_sorted_files_with_headers_and_skips_binaries(tmp_path):
    repo = tmp_path / "repos" / "proj"
    (repo / "src" / "pkg").mkdir(parents=True)
    (repo / ".git").mkdir()
    (repo / ".git" / "HEAD").write_text("ref")
    (repo / "src" / "pkg" / "__pycache__").mkdir()
    (repo / "src" / "pkg" / "__pycache__" / "m.pyc").write_bytes(b"\0\1")
    (repo / "README.md").write_text("# Proj\n")
    (repo / "src" / "pkg" / "b.py").write_text("B = 2")  # no final newline
    (repo / "src" / "pkg" / "a.py").write_text("A = 1\n")
    (repo / "src" / "logo.png").write_bytes(b"\x89PNG\r\n\x1a\n\0\0")
    (repo / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (tmp_path / "repos" / "other").mkdir()
    (tmp_path / "repos" / "other" / "x.txt").write_text("x\n")
    docs = list(iter_documents(stream(tmp_path / "repos", "repo_dir")))
    assert [d.id for d in docs] == ["other", "proj"]
    assert docs[1].text == ("<<< README.md >>>\n# Proj\n"
                            "<<< src/pkg/a.py >>>\nA = 1\n"
                            "<<< src/pkg/b.py >>>\nB = 2\n")
    _, files = repo_document(repo, suffixes=(".py",))
    assert files == ["src/pkg/a.py", "src/pkg/b.py"]


def test_messages_rows_for_conversation_streams(tmp_path):
    conv = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    (tmp_path / "c.jsonl").write_text(json.dumps({"msgs": conv, "id": 7}) + "\n")
    docs = list(iter_documents(stream(tmp_path / "c.jsonl", "jsonl", packing="conversation",
                                      messages_field="msgs")))
    assert docs[0].messages == conv and docs[0].text is None


# ---------------------------------------------------------------------------------------------
# Bad input: a DataError that names the stream and the path, never an empty dataset
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ["jsonl", "parquet", "arrow", "hf_disk", "text_dir", "repo_dir",
                                 "mds"])
def test_missing_path(tmp_path, fmt):
    with pytest.raises(DataError, match="does not exist") as exc:
        list(iter_documents(stream(tmp_path / "nope", fmt, domain="books")))
    assert "stream books" in str(exc.value) and "nope" in str(exc.value)


def test_glob_matching_nothing(tmp_path):
    with pytest.raises(DataError, match="glob matches nothing"):
        list(iter_documents(stream(tmp_path / "*.jsonl", "jsonl")))


def test_empty_stream(tmp_path):
    (tmp_path / "e.jsonl").write_text("\n\n")
    with pytest.raises(DataError, match=r"stream web.*no documents"):
        list(iter_documents(stream(tmp_path / "e.jsonl", "jsonl", domain="web")))
    (tmp_path / "dir").mkdir()
    with pytest.raises(DataError, match="no input files"):
        list(iter_documents(stream(tmp_path / "dir", "parquet")))


def test_invalid_utf8_names_file_and_byte_offset(tmp_path):
    good = json.dumps({"text": "fine"}) + "\n"
    bad = b'{"text": "caf\xe9"}\n'
    (tmp_path / "x.jsonl").write_bytes(good.encode() * 3 + bad)
    with pytest.raises(DataError) as exc:
        list(iter_documents(stream(tmp_path / "x.jsonl", "jsonl", domain="web")))
    offset = len(good.encode()) * 3 + bad.index(b"\xe9")
    assert f"byte offset {offset}" in str(exc.value)
    assert "x.jsonl" in str(exc.value) and "stream web" in str(exc.value)
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(b"ok \xff\xfe")
    with pytest.raises(DataError, match=r"a\.txt.*byte offset 3"):
        list(iter_documents(stream(tmp_path / "docs", "text_dir")))


def test_missing_text_field(tmp_path):
    (tmp_path / "x.jsonl").write_text(json.dumps({"text": "a"}) + "\n" +
                                      json.dumps({"body": "b"}) + "\n")
    with pytest.raises(DataError, match=r"x\.jsonl:2.*no textField 'text' \(has: body\)"):
        list(iter_documents(stream(tmp_path / "x.jsonl", "jsonl")))
    pq.write_table(pa.table({"body": ["a"]}), tmp_path / "x.parquet")
    with pytest.raises(DataError, match=r"no textField column 'text' \(columns: body\)"):
        list(iter_documents(stream(tmp_path / "x.parquet", "parquet")))


def _msg(role: str, content: str = "x") -> dict[str, str]:
    return {"role": role, "content": content}


@pytest.mark.parametrize(("messages", "rule"), [
    ([_msg("user", "only a question")], "no assistant turn"),
    ([_msg("robot")], "role 'robot'"),
    ([_msg("assistant"), _msg("user")], r"message 0 has role 'assistant' where a user turn comes"),
    ([_msg("user"), _msg("user"), _msg("assistant")],
     r"message 1 has role 'user' where an assistant turn comes"),
    ([_msg("user"), _msg("assistant"), _msg("system")], "message 2 is a system message"),
])
def test_bad_conversations(tmp_path, messages, rule):
    good = {"messages": [_msg("system"), _msg("user"), _msg("assistant")]}
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps(good) + "\n" + json.dumps({"messages": messages}) + "\n")
    with pytest.raises(DataError, match=rule) as info:
        list(iter_documents(stream(path, "jsonl", packing="conversation")))
    assert str(path) in str(info.value) and ":2" in str(info.value)  # the file and its line
