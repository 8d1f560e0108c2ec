"""Token shards: round trip, masks, atomic publication."""

from __future__ import annotations

import numpy as np
import pytest

from prolong.data.shards import ShardWriter, TokenShards, token_dtype


def test_round_trip_random_documents(tmp_path):
    rng = np.random.default_rng()
    docs = [rng.integers(0, 128256, size=int(n)) for n in rng.integers(0, 50, size=20)]
    writer = ShardWriter(tmp_path / "s", dtype=token_dtype(128256))
    for d in docs:
        writer.add(d)
    writer.close({"tokenizer": "abc"})
    shards = TokenShards(tmp_path / "s")
    assert len(shards) == len(docs) and shards.meta["tokenizer"] == "abc"
    assert shards.tokens.dtype == np.uint32 and shards.mask(0) is None
    for i, d in enumerate(docs):
        np.testing.assert_array_equal(shards.doc(i), d)
    np.testing.assert_array_equal(shards.lengths, [len(d) for d in docs])
    assert shards.num_tokens == sum(len(d) for d in docs)


def test_masks_round_trip(tmp_path):
    writer = ShardWriter(tmp_path / "s", dtype=token_dtype(4096), with_mask=True)
    writer.add([5, 6, 7], mask=[0, 1, 1])
    writer.add([8], mask=[1])
    writer.close()
    shards = TokenShards(tmp_path / "s")
    assert shards.tokens.dtype == np.uint16
    np.testing.assert_array_equal(shards.mask(0), [0, 1, 1])
    with pytest.raises(ValueError, match="mask"):
        w = ShardWriter(tmp_path / "t", with_mask=True)
        w.add([1, 2])


def test_unfinished_writer_leaves_no_shard(tmp_path):
    writer = ShardWriter(tmp_path / "s")
    writer.add([1, 2, 3])
    # Not closed: nothing is published under the final name.
    with pytest.raises(FileNotFoundError, match="prolongctl data prepare"):
        TokenShards(tmp_path / "s")
    writer.abort()
    assert not (tmp_path / "s.partial").exists()


def test_rewrite_replaces_previous_shard(tmp_path):
    for value in (1, 2):
        w = ShardWriter(tmp_path / "s")
        w.add([value] * 3)
        w.close()
    np.testing.assert_array_equal(TokenShards(tmp_path / "s").doc(0), [2, 2, 2])


def test_rejects_out_of_range_ids(tmp_path):
    w = ShardWriter(tmp_path / "s", dtype=np.uint16)
    with pytest.raises(ValueError, match="out of range"):
        w.add([70000])
