"""Packing: every field of a packed row against a token-by-token reference built from the explicit
list of documents, for random document lengths, all three modes, label masks and SP slices."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from prolong.data.errors import DataError
from prolong.data.packing import (
    IGNORE_INDEX,
    Cursor,
    build_row,
    pack_stream,
    plan_row,
    sp_slice,
)

# --------------------------------------------------------------------------------------------
# An independent reference: walk the tokens one at a time, the way the contract is worded.
# --------------------------------------------------------------------------------------------


def reference_rows(docs, masks, mode, seq_len, target_length=None):
    """Expected rows as dicts of plain lists. Each token carries (id, mask, starts_document)."""
    if masks is None:
        masks = [[1] * len(d) for d in docs]
    rows = []
    if mode == "long":
        k = seq_len // target_length
        groups = [docs[i:i + k] for i in range(0, len(docs) - k + 1, k)]
        gmasks = [masks[i:i + k] for i in range(0, len(docs) - k + 1, k)]
        for g, gm in zip(groups, gmasks, strict=True):
            toks = [(int(t), int(m), j == 0) for d, dm in zip(g, gm, strict=True)
                    for j, (t, m) in enumerate(zip(d, dm, strict=True))]
            rows.append(toks)
    elif mode == "concat":
        flat = [(int(t), int(m), j == 0) for d, dm in zip(docs, masks, strict=True)
                for j, (t, m) in enumerate(zip(d, dm, strict=True))]
        for i in range(0, len(flat) - seq_len + 1, seq_len):
            row = flat[i:i + seq_len]
            row[0] = (row[0][0], row[0][1], True)  # a carried-over remainder is a new document
            rows.append(row)
    else:  # conversation: append whole conversations; a full row takes S tokens, drops the rest
        buf = []
        for d, dm in zip(docs, masks, strict=True):
            buf += [(int(t), int(m), j == 0) for j, (t, m) in enumerate(zip(d, dm, strict=True))]
            if len(buf) >= seq_len:
                rows.append(buf[:seq_len])
                buf = []
    out = []
    for row in rows:
        ids = [t for t, _, _ in row]
        starts = [s for _, _, s in row]
        labels, pos, lengths = [], [], []
        p = 0
        for t in range(seq_len):
            if starts[t]:
                p = 0
                lengths.append(0)
            pos.append(p)
            p += 1
            lengths[-1] += 1
            nxt_ok = t + 1 < seq_len and not starts[t + 1] and row[t + 1][1] == 1
            labels.append(ids[t + 1] if nxt_ok else IGNORE_INDEX)
        out.append({"input_ids": ids, "shift_labels": labels, "position_ids": pos,
                    "doc_lengths": lengths})
    return out


def make_docs(lengths, seed, with_mask):
    rng = np.random.default_rng(seed)
    docs = [rng.integers(0, 128256, n).astype(np.uint32) for n in lengths]
    masks = [rng.integers(0, 2, n).astype(np.uint8) for n in lengths] if with_mask else None
    return docs, masks


def assert_rows_match(rows, expected):
    assert len(rows) == len(expected)
    for row, exp in zip(rows, expected, strict=True):
        for name in ("input_ids", "shift_labels", "position_ids", "doc_lengths"):
            got = getattr(row, name)
            assert got.dtype == np.int64, name
            assert got.tolist() == exp[name], name
        assert row.doc_lengths.sum() == row.seq_len


# --------------------------------------------------------------------------------------------
# Random documents, all modes
# --------------------------------------------------------------------------------------------


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 40), min_size=1, max_size=30),
       seq_len=st.integers(1, 64), with_mask=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_concat_rows_match_reference(lengths, seq_len, with_mask, seed):
    docs, masks = make_docs(lengths, seed, with_mask)
    expected = reference_rows(docs, masks, "concat", seq_len)
    rows, cursor = pack_stream(docs, "concat", seq_len, len(expected), masks=masks)
    assert_rows_match(rows, expected)
    # The cursor points at the first unused token: everything before it was used exactly once.
    used = len(expected) * seq_len
    assert sum(lengths[:cursor.doc]) + cursor.offset == used


@settings(max_examples=60, deadline=None)
@given(lengths=st.lists(st.integers(1, 50), min_size=1, max_size=30),
       seq_len=st.integers(1, 64), with_mask=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_conversation_rows_match_reference(lengths, seq_len, with_mask, seed):
    docs, masks = make_docs(lengths, seed, with_mask)
    expected = reference_rows(docs, masks, "conversation", seq_len)
    rows, cursor = pack_stream(docs, "conversation", seq_len, len(expected), masks=masks)
    assert_rows_match(rows, expected)
    assert cursor.offset == 0  # never resumes inside a conversation


@settings(max_examples=40, deadline=None)
@given(target=st.integers(1, 16), per_row=st.integers(1, 8), n_rows=st.integers(1, 4),
       with_mask=st.booleans(), seed=st.integers(0, 2**32 - 1))
def test_long_rows_hold_s_over_target_documents(target, per_row, n_rows, with_mask, seed):
    seq_len = target * per_row
    docs, masks = make_docs([target] * (per_row * n_rows), seed, with_mask)
    rows, cursor = pack_stream(docs, "long", seq_len, n_rows, masks=masks, target_length=target)
    assert_rows_match(rows, reference_rows(docs, masks, "long", seq_len, target))
    for row in rows:
        assert row.doc_lengths.tolist() == [target] * per_row
    assert cursor == Cursor(per_row * n_rows, 0)


def test_long_rejects_documents_of_other_lengths_and_bad_targets():
    docs = [np.arange(8), np.arange(7)]
    with pytest.raises(DataError, match="expected exactly targetLength 8"):
        pack_stream(docs, "long", 16, 1, target_length=8, domain="books")
    with pytest.raises(DataError, match="does not divide"):
        plan_row("long", 16, lambda k: 6, target_length=6)


def test_conversation_longer_than_row_is_truncated_and_remainder_dropped():
    docs = [np.arange(100, 110), np.arange(200, 203), np.arange(300, 306)]
    rows, cursor = pack_stream(docs, "conversation", 4, 2)
    assert [r.input_ids.tolist() for r in rows] == [[100, 101, 102, 103], [200, 201, 202, 300]]
    assert rows[1].doc_lengths.tolist() == [3, 1]
    assert rows[1].shift_labels.tolist() == [201, 202, IGNORE_INDEX, IGNORE_INDEX]
    assert cursor == Cursor(3, 0)


def test_concat_carry_over_starts_next_row_at_position_zero():
    docs = [np.arange(10, 16), np.arange(20, 23)]
    rows, cursor = pack_stream(docs, "concat", 4, 2)
    assert rows[0].input_ids.tolist() == [10, 11, 12, 13]
    assert rows[0].shift_labels.tolist() == [11, 12, 13, IGNORE_INDEX]  # target 14 is next row's
    assert rows[1].input_ids.tolist() == [14, 15, 20, 21]
    assert rows[1].position_ids.tolist() == [0, 1, 0, 1]
    assert rows[1].shift_labels.tolist() == [15, IGNORE_INDEX, 21, IGNORE_INDEX]
    assert cursor == Cursor(1, 2)  # two tokens of document 1 are pending


def test_sft_mask_zero_means_no_target():
    ids = np.array([5, 6, 7, 8, 9, 10], dtype=np.uint32)
    mask = np.array([0, 0, 1, 1, 0, 1], dtype=np.uint8)  # the mask is on the *target* token
    row = build_row([ids], [mask])
    assert row.shift_labels.tolist() == [IGNORE_INDEX, 7, 8, IGNORE_INDEX, 10, IGNORE_INDEX]
    assert row.num_targets == 3


def test_empty_documents_take_no_room():
    docs = [np.arange(3), np.zeros(0, np.int64), np.arange(10, 13)]
    rows, _ = pack_stream(docs, "concat", 6, 1)
    assert rows[0].doc_lengths.tolist() == [3, 3]


# --------------------------------------------------------------------------------------------
# Torch views and sequence-parallel slices
# --------------------------------------------------------------------------------------------


def test_to_torch_is_a_view_with_batch_dimension():
    row = build_row([np.arange(4, dtype=np.uint32), np.arange(4, dtype=np.uint32)])
    mb = row.to_torch()
    assert mb.input_ids.shape == (1, 8) and mb.input_ids.dtype == torch.int64
    assert mb.input_ids.data_ptr() == row.input_ids.ctypes.data
    assert mb.attention_cost == row.attention_cost == 32
    assert set(mb.model_inputs()) == {"input_ids", "position_ids", "shift_labels"}


@settings(max_examples=40, deadline=None)
@given(lengths=st.lists(st.integers(1, 30), min_size=1, max_size=20),
       sp=st.sampled_from([1, 2, 4, 8]), chunk=st.integers(1, 8), seed=st.integers(0, 2**32 - 1))
def test_sp_slices_concatenate_to_the_row_and_keep_shifted_targets(lengths, sp, chunk, seed):
    seq_len = sp * chunk
    docs, _ = make_docs([*lengths, seq_len], seed, with_mask=False)
    rows, _ = pack_stream(docs, "concat", seq_len, 1)
    row = rows[0]
    for r in (row, row.to_torch()):
        parts = [sp_slice(r, k, sp) for k in range(sp)]
        for name in ("input_ids", "shift_labels", "position_ids"):
            full = np.asarray(getattr(r, name)).reshape(-1)
            joined = np.concatenate([np.asarray(getattr(p, name)).reshape(-1) for p in parts])
            assert (joined == full).all()
        for p in parts:
            assert p.seq_len == chunk
            assert np.asarray(p.doc_lengths).tolist() == row.doc_lengths.tolist()
    # Shifted before slicing: a slice's last label is the next slice's first input (unless a
    # document starts there), which a per-slice shift could never know.
    for k in range(sp - 1):
        lo, nxt = sp_slice(row, k, sp), sp_slice(row, k + 1, sp)
        if nxt.position_ids[0] != 0:
            assert lo.shift_labels[-1] == nxt.input_ids[0]
    with pytest.raises(ValueError):
        sp_slice(row, sp, sp)
