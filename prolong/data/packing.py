"""Packing: documents -> fixed-length training rows (the packed-batch contract).

A row is ``S`` tokens of one stream. Its fields, all int64 and of length ``S`` except the last:

- ``input_ids``;
- ``shift_labels``, already shifted: ``shift_labels[t]`` is the target of position ``t``, i.e.
  ``input_ids[t + 1]``; -100 where ``t + 1`` starts a new document (a document's first token is
  never predicted from the previous document), at the row's last position (its target lies in the
  next row, or nowhere), and where the shard's label mask is 0 on the target token (SFT);
- ``position_ids``, restarting at 0 at every document start; the attention backends derive
  cu_seqlens / document ids from them, so they are the one place document boundaries live;
- ``doc_lengths``, the lengths of the row's documents in order (they sum to ``S``), for load
  balancing (Σd²) and FLOPs accounting.

Labels are shifted *before* a row is split across sequence-parallel ranks (:func:`sp_slice`):
shifting a slice would lose the target of each slice's last token.

Packing modes (``DataStream.packing``):

- ``long``: documents of exactly ``target_length`` tokens (the prepare step cuts them),
  ``S / target_length`` of them per row. Anything else is a :class:`DataError`, not silently fixed,
  because a wrong length means the prepared shards do not match the spec.
- ``concat``: short documents concatenated; the document cut by the row end carries over and its
  remainder starts the next row. **The remainder is a new document at position 0** of the next row
  (its first token is therefore not a target either): the model cannot attend to the previous row,
  so positions continuing from the cut would only claim context that is not there. Carry-over
  means every token of the stream is used exactly once per epoch.
- ``conversation`` (SFT): concatenated the same way, but the cut remainder is discarded, so no row
  starts mid-conversation; a conversation longer than ``S`` is truncated to ``S``.

Planning and copying are separate: :func:`plan_row` decides, from document *lengths* only, which
token spans fill the next row and where the stream's cursor goes; :func:`build_row` copies the
spans and derives the fields. The mixture loader plans every global row (cheap) but builds only
the rows of its own data-parallel rank. Fields are built with a few vectorised numpy passes and
no per-token Python; the arrays are fresh per row (callers keep rows alive across a step, so
reusing buffers would be a trap) and convert to torch without a copy (``torch.from_numpy``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Literal, TypeVar

import numpy as np
import torch

from prolong.data.errors import DataError

IGNORE_INDEX = -100
"""The label of a position with no target (document starts, row ends, masked tokens): PyTorch's
cross-entropy default. The loss and the SP wiring import it from here."""
PackingMode = Literal["long", "concat", "conversation"]


@dataclass(frozen=True)
class PackedRow:
    """One packed row as numpy arrays (see the module docstring for the fields)."""

    input_ids: np.ndarray
    shift_labels: np.ndarray
    position_ids: np.ndarray
    doc_lengths: np.ndarray
    domain: str = ""

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def attention_cost(self) -> int:
        """Σ dᵢ²: what document-masked causal attention costs, up to a constant."""
        d = self.doc_lengths.astype(np.int64, copy=False)
        return int(np.dot(d, d))

    @property
    def num_targets(self) -> int:
        """Positions that contribute to the loss."""
        return int(np.count_nonzero(self.shift_labels != IGNORE_INDEX))

    @property
    def tokens_by_domain(self) -> dict[str, int]:
        """Rows are single-stream: every token belongs to ``domain``."""
        return {self.domain: self.seq_len}

    def to_torch(self) -> MicroBatch:
        """[1, S] torch views of the same memory (no copy)."""
        return MicroBatch(
            input_ids=torch.from_numpy(self.input_ids).unsqueeze(0),
            shift_labels=torch.from_numpy(self.shift_labels).unsqueeze(0),
            position_ids=torch.from_numpy(self.position_ids).unsqueeze(0),
            doc_lengths=torch.from_numpy(self.doc_lengths),
            domain=self.domain,
        )


@dataclass(frozen=True)
class MicroBatch:
    """One micro-batch as the train loop consumes it: a packed row as [1, S] int64 tensors,
    plus the row's document lengths ([n]) and its domain."""

    input_ids: torch.Tensor
    shift_labels: torch.Tensor
    position_ids: torch.Tensor
    doc_lengths: torch.Tensor
    domain: str = ""

    @property
    def seq_len(self) -> int:
        return int(self.input_ids.shape[-1])

    @property
    def attention_cost(self) -> int:
        d = self.doc_lengths.to(torch.int64)
        return int((d * d).sum())

    def model_inputs(self) -> dict[str, torch.Tensor]:
        """Keyword arguments for a transformers causal LM (``shift_labels`` is the loss's)."""
        return {"input_ids": self.input_ids, "position_ids": self.position_ids,
                "shift_labels": self.shift_labels}


@dataclass(frozen=True)
class Cursor:
    """Where a stream's next row starts: document ordinal ``doc`` in the stream's document
    sequence, ``offset`` tokens into it (non-zero only for a concat carry-over)."""

    doc: int = 0
    offset: int = 0


Span = tuple[int, int, int]
"""(document ordinal, start, stop): tokens [start, stop) of that document."""


def plan_row(packing: PackingMode, seq_len: int, length_of: Callable[[int], int],
             cursor: Cursor = Cursor(), *, target_length: int | None = None,
             domain: str | None = None) -> tuple[list[Span], Cursor]:
    """The spans that fill the next row of ``seq_len`` tokens, and the cursor after it.

    ``length_of(k)`` is the length of document ``k`` of the stream (the caller maps ordinals to
    shuffled shard documents and epochs). Each span starts a new document in the row.
    """
    if packing == "long":
        target = target_length or seq_len
        if seq_len % target:
            raise DataError(f"targetLength {target} does not divide the sequence length {seq_len}",
                            domain=domain)
        if cursor.offset:
            raise ValueError("a long stream's cursor never points inside a document")
        spans = []
        for k in range(cursor.doc, cursor.doc + seq_len // target):
            n = length_of(k)
            if n != target:
                raise DataError(f"long-packed document has {n} tokens, expected exactly "
                                f"targetLength {target} (prepare cuts long documents to it)",
                                domain=domain)
            spans.append((k, 0, target))
        return spans, Cursor(cursor.doc + len(spans), 0)
    if packing not in ("concat", "conversation"):
        raise ValueError(f"unknown packing {packing!r}")
    if packing == "conversation" and cursor.offset:
        raise ValueError("a conversation stream's cursor never points inside a conversation")
    spans = []
    need, doc, off = seq_len, cursor.doc, cursor.offset
    while need:  # terminates: the loader refuses streams without tokens
        n = length_of(doc)
        take = min(n - off, need)
        if take > 0:  # empty documents take no room and start nothing
            spans.append((doc, off, off + take))
            need -= take
        if off + take == n:
            doc, off = doc + 1, 0
        elif packing == "conversation":
            doc, off = doc + 1, 0  # the cut remainder is discarded
        else:
            off += take  # the cut remainder starts the next row
    return spans, Cursor(doc, off)


def build_row(pieces: Sequence[np.ndarray], masks: Sequence[np.ndarray] | None = None, *,
              domain: str = "") -> PackedRow:
    """A row from its documents in order (each piece starts a new document). ``masks``: the
    pieces' 0/1 label masks, 1 where the token may be a target; None when every token may be."""
    lengths = np.fromiter((len(p) for p in pieces), dtype=np.int64, count=len(pieces))
    seq_len = int(lengths.sum())
    if seq_len < 1 or not lengths.all():
        raise ValueError(f"a row needs non-empty pieces, got lengths {lengths.tolist()}")
    input_ids = np.empty(seq_len, dtype=np.int64)
    if len(pieces) == 1:
        input_ids[:] = pieces[0]
    else:
        np.concatenate(pieces, out=input_ids, casting="unsafe")
    target_ok = None
    if masks is not None:
        target_ok = np.empty(seq_len, dtype=bool)
        if len(masks) == 1:
            target_ok[:] = masks[0]
        else:
            np.concatenate(masks, out=target_ok, casting="unsafe")
    shift_labels, position_ids = row_fields(input_ids, lengths, target_ok)
    return PackedRow(input_ids, shift_labels, position_ids, lengths, domain)


def row_fields(input_ids: np.ndarray, doc_lengths: np.ndarray,
               target_ok: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(shift_labels, position_ids) of a row of ``input_ids`` made of ``doc_lengths`` documents."""
    seq_len = input_ids.shape[0]
    labels = np.empty(seq_len, dtype=np.int64)
    labels[:-1] = input_ids[1:]
    labels[-1] = IGNORE_INDEX
    starts = np.cumsum(doc_lengths[:-1])  # where documents 1..n-1 start
    labels[starts - 1] = IGNORE_INDEX
    if target_ok is not None:
        # The mask belongs to the target token: position t predicts token t+1.
        np.putmask(labels[:-1], ~target_ok[1:], IGNORE_INDEX)
    # Positions: 0, 1, 2, ... with a step back to 0 at each document start, as one cumsum.
    steps = np.ones(seq_len, dtype=np.int64)
    steps[0] = 0
    steps[starts] = 1 - doc_lengths[:-1]
    position_ids = np.cumsum(steps, out=steps)
    return labels, position_ids


def pack_stream(docs: Sequence[np.ndarray], packing: PackingMode, seq_len: int, rows: int, *,
                masks: Sequence[np.ndarray] | None = None, target_length: int | None = None,
                cursor: Cursor = Cursor(), domain: str = "") -> tuple[list[PackedRow], Cursor]:
    """``rows`` rows from an explicit list of documents read in order (no shuffling, no epochs):
    the loader's packing without the mixture, for callers that hold their documents in memory."""
    out = []
    for _ in range(rows):
        spans, cursor = plan_row(packing, seq_len, lambda k: len(docs[k]), cursor,
                                 target_length=target_length, domain=domain or None)
        pieces = [docs[k][a:b] for k, a, b in spans]
        row_masks = None if masks is None else [masks[k][a:b] for k, a, b in spans]
        out.append(build_row(pieces, row_masks, domain=domain))
    return out, cursor


R = TypeVar("R", PackedRow, MicroBatch)


def sp_slice(row: R, rank: int, sp: int) -> R:
    """The part of ``row`` that sequence-parallel rank ``rank`` of ``sp`` holds: the contiguous
    chunk [rank·S/SP, (rank+1)·S/SP) of every per-token field. ``doc_lengths`` stays the whole
    row's: after Ulysses' all-to-all every rank attends over the full sequence (for its heads),
    so the full row's documents are what its attention costs."""
    seq_len = row.seq_len
    if sp < 1 or seq_len % sp or not 0 <= rank < sp:
        raise ValueError(f"cannot give rank {rank} of {sp} a slice of a {seq_len}-token row")
    chunk = seq_len // sp
    lo, hi = rank * chunk, (rank + 1) * chunk
    return replace(row, input_ids=row.input_ids[..., lo:hi],
                   shift_labels=row.shift_labels[..., lo:hi],
                   position_ids=row.position_ids[..., lo:hi])
