"""Our MDS reader against shards written by the real streaming.MDSWriter.

The fixtures and their expected.json come from fixtures/make_mds_fixtures.py (run in a throwaway
venv with mosaicml-streaming: it cannot be installed next to our dependencies).
"""

from __future__ import annotations

import json
import shutil
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

from prolong.data.errors import DataError
from prolong.data.mds import MDSDataset, iter_documents
from prolong.data.sources import iter_documents as stream_documents
from prolong.spec import DataStream

FIXTURES = Path(__file__).parent / "fixtures" / "mds"
READABLE = ["prolong", "prolong-zstd", "prolong-gz", "prolong-bz2", "prolong-br",
            "prolong-snappy", "encodings"]


def expected(name: str) -> dict:
    return json.loads((FIXTURES / name / "expected.json").read_text())


def assert_same(value, want) -> None:
    if isinstance(want, dict) and "values" in want and "dtype" in want:
        assert isinstance(value, np.ndarray)
        assert value.dtype.name == want["dtype"]
        assert list(value.shape) == want["shape"]
        assert value.ravel().tolist() == want["values"]
    elif isinstance(want, dict) and "bytes_hex" in want:
        assert value == bytes.fromhex(want["bytes_hex"])
    elif isinstance(value, np.generic):
        assert value.item() == want
    elif isinstance(value, Decimal):
        assert str(value) == str(want)
    else:
        assert value == want and type(value) is type(want)


@pytest.mark.parametrize("name", READABLE)
def test_fixture_reads_back_what_mdswriter_wrote(name):
    want = expected(name)
    ds = MDSDataset(FIXTURES / name)
    assert ds.columns == want["columns"] or set(ds.columns) == set(want["columns"])
    rows = list(ds)
    assert len(rows) == len(ds) == len(want["samples"])
    for row, sample in zip(rows, want["samples"], strict=True):
        assert set(row) == set(sample)
        for key in sample:
            assert_same(row[key], sample[key])


def test_uncompressed_fixture_spans_several_shards():
    assert len(MDSDataset(FIXTURES / "prolong").shards) > 1


def test_documents_are_the_indexed_spans_of_input_ids(tmp_path):
    want = expected("prolong")["samples"]
    docs = list(iter_documents(FIXTURES / "prolong"))
    spans = [(i, s, e) for i, row in enumerate(want)
             for s, e in np.asarray(row["indices"]["values"]).reshape(-1, 2).tolist()]
    assert len(docs) == len(spans)
    for (doc_id, ids, domain), (i, s, e) in zip(docs, spans, strict=True):
        assert ids.tolist() == want[i]["input_ids"]["values"][s:e]
        assert domain == want[i]["domain"]
        assert doc_id.startswith(f"./{i}/")
    # The same documents through a DataStream of format mds (nested datasets found under a root).
    for name in ("prolong", "prolong-zstd"):
        shutil.copytree(FIXTURES / name, tmp_path / "release" / name)
    stream = DataStream(domain="code", path=str(tmp_path / "release"), format="mds",
                        proportion=1.0)
    through_stream = list(stream_documents(stream))
    assert [d.tokens.tolist() for d in through_stream if d.id.startswith("prolong/")] == \
        [ids.tolist() for _, ids, _ in docs]
    assert len(through_stream) == len(docs) + len(list(iter_documents(FIXTURES / "prolong-zstd")))


def test_pickle_encoding_is_refused_naming_shard_and_encoding():
    with pytest.raises(DataError) as exc:
        MDSDataset(FIXTURES / "pickle")
    msg = str(exc.value)
    assert "'pkl'" in msg and "shard.00000.mds" in msg and "column obj" in msg


@pytest.mark.parametrize("compression", ["lz4", "xz:6"])
def test_unsupported_compression_is_refused_naming_shard(tmp_path, compression):
    ds_dir = tmp_path / "ds"
    shutil.copytree(FIXTURES / "prolong-zstd", ds_dir)
    index = json.loads((ds_dir / "index.json").read_text())
    index["shards"][0]["compression"] = compression
    (ds_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match=rf"compression '{compression}' is not supported.*zstd") \
            as exc:
        MDSDataset(ds_dir)
    assert "shard 0" in str(exc.value)


def test_unknown_encoding_and_corrupt_shard(tmp_path):
    ds_dir = tmp_path / "ds"
    shutil.copytree(FIXTURES / "prolong", ds_dir)
    index = json.loads((ds_dir / "index.json").read_text())
    index["shards"][1]["column_encodings"][0] = "jpeg"
    (ds_dir / "index.json").write_text(json.dumps(index))
    with pytest.raises(DataError, match="'jpeg' is not supported"):
        MDSDataset(ds_dir)
    shutil.rmtree(ds_dir)
    shutil.copytree(FIXTURES / "prolong", ds_dir)
    shard = ds_dir / "shard.00000.mds"
    shard.write_bytes(shard.read_bytes()[:-5])
    with pytest.raises(DataError, match=r"shard\.00000\.mds.*(truncated|corrupt|sizes)"):
        list(MDSDataset(ds_dir))


def test_not_an_mds_directory(tmp_path):
    with pytest.raises(DataError, match=r"no index\.json"):
        MDSDataset(tmp_path)
