"""The mixture loader: a stage's token shards -> each optimizer step's micro-batches for one
data-parallel rank.

How a step's rows are chosen, deterministically from the seed:

1. **Which stream.** Every row is ``S`` tokens of a single stream, so token shares are row shares.
   Rows go to streams by earliest-deadline-first over the row counts (:func:`next_stream`; a
   refinement of largest-deficit selection), ties by a seeded priority. After any number of
   rows every stream is less than one row away from its exact share: no sampling noise to
   average out, and a resumed run only needs the counts.
2. **Which documents.** Each stream reads its documents in a fresh permutation per epoch, drawn
   from (seed, crc32(domain), epoch), and starts the next epoch when the current one runs out.
   Seeding by domain name, not by position, keeps a stream's order when streams are added or
   reordered. The stream's cursor (document ordinal across epochs, plus the concat carry-over
   offset) is all the state there is; with concat packing every token is used exactly once per
   epoch (a row may straddle two epochs). See :mod:`prolong.data.packing` for the modes.
3. **Which rank and micro-step** (:func:`place_rows`). The step's ``rows_per_step`` rows are put
   in a seeded order (seed, step). With ``reorder=True`` (the spec's ``reorderMicroBatches``)
   they are then dealt by cost, **lockstep-aware**: ZeRO-3 gathers every layer over all ranks,
   so each micro-step lasts as long as its most expensive row on any rank. The rows are sorted by
   Σ(document length²) (what document-causal attention costs; the linear FLOPs are the same
   for every row of ``S`` tokens), most expensive first, stable (equal costs keep the seeded
   order); micro-step ``k`` takes sorted rows ``k·dp .. k·dp + dp - 1``, which minimises the
   sum of the micro-steps' maxima; within a micro-step the dearest row goes to the rank with the
   least cost so far (longest processing time first), so the ranks' totals stay even where only
   the step boundary synchronises (ZeRO 0-2). The peak memory shows at the first micro-step,
   as with ProLong's sort. With ``reorder=False`` global row ``j`` of the seeded order goes to
   rank ``j % dp_size``. Either way the shuffle keeps the deficit pattern from handing one rank
   the same stream every step, and a step's set of rows does not depend on the placement, so
   neither does its gradient (the loss is the token mean over all of them).
   Every rank plans all global rows (lengths only, cheap) but reads tokens only for its own, so
   the global rows, the state and the per-domain counts are identical on every rank and
   independent of ``dp_size``; the placement is a pure function of the planned rows, so the
   state holds nothing for it. The loader knows nothing of sequence parallelism: every SP rank
   of a group builds the same loader (same dp_rank) and gets the same rows;
   :func:`prolong.data.packing.sp_slice` cuts them.
4. **Lockstep efficiency** (:func:`lockstep_efficiency`): mean row cost over max row cost per
   micro-step, time-weighted; ``prolongctl plan`` replays this planning over document lengths
   (:mod:`prolong.data.lockstep`) to print it for each training stage.

Because every rank plans every global row, it also knows the step's global numbers without any
communication: tokens per domain (cumulative, for metrics) and the count of loss positions over all
ranks (``step_targets``, the token-averaged loss's denominator).

Trade-offs: planning every global row on every rank costs O(rows per step × documents per row)
Python steps per step, negligible next to a training step and the price of rank-independent
state. A permutation per epoch holds one int64 per document (16 MB for 2M short documents).
Rows are fresh numpy arrays exposed as torch views; nothing is prefetched in a background
thread (the loader is far faster than a training step; see bench/data_loader.py).
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import numpy as np

from prolong.data.errors import DataError
from prolong.data.packing import Cursor, MicroBatch, PackedRow, Span, build_row, plan_row
from prolong.data.shards import TokenShards
from prolong.parallel.dims import ParallelDims
from prolong.spec import DataStream, TrainSpec

STATE_VERSION = 1
_TIE = 1e-9  # relative float noise in n·p and c/p: closer than this is equal
_SEED_TAG_PRIORITY = 0x7072696F  # separate seed domains so the draws never coincide
_SEED_TAG_DOCS = 0x646F6373
_SEED_TAG_STEP = 0x73746570


def next_stream(proportions: Sequence[float], counts: Sequence[int],
                priority: Sequence[int]) -> int:
    """Which stream gets the next row, given the rows each already has (pure, deterministic).

    Earliest deadline first: stream i's j-th row may come once ``n·pᵢ > j − 1`` (else it would be
    a full row ahead of its share) and must come by ``n = j / pᵢ`` (else a full row behind).
    Among the streams whose next row may come, the one due first goes; equal deadlines go by
    ``priority`` (lower first). EDF is optimal for such unit jobs with release times and
    deadlines, and a schedule meeting them all exists (Tijdeman's chairman assignment theorem),
    so for every n and i: |cᵢ(n) − n·pᵢ| < 1. Plain largest-deficit selection does not
    guarantee that: with ten streams it drifts past 1.1 rows.
    """
    n = sum(counts) + 1
    best, best_due = -1, math.inf
    for i, p in enumerate(proportions):
        c = counts[i]
        if c >= n * p * (1 - _TIE):
            continue  # released only once n·p > c
        due = (c + 1) / p
        if best < 0 or due < best_due * (1 - _TIE) or (
                due <= best_due * (1 + _TIE) and priority[i] < priority[best]):
            best, best_due = i, due
    if best < 0:  # unreachable while Σp = 1 (the shares' slack sums to one row); float safety
        best = max(range(len(counts)), key=lambda i: n * proportions[i] - counts[i])
    return best


def place_rows(costs: Sequence[int], dp_size: int, *, lockstep: bool = True) -> list[list[int]]:
    """Which of a step's global rows each data-parallel rank runs, in micro-step order: one list
    of indices into ``costs`` (the rows' Σd², in the seeded order) per rank. ``lockstep``: dealt
    by cost (module docstring, item 3); otherwise row ``j`` goes to rank ``j % dp_size``.
    Deterministic: ints and stable sorts only."""
    n = len(costs)
    if dp_size < 1 or n % dp_size:
        raise ValueError(f"{n} rows cannot be dealt evenly over {dp_size} ranks")
    if not lockstep:
        return [list(range(r, n, dp_size)) for r in range(dp_size)]
    order = sorted(range(n), key=lambda j: -costs[j])
    ranks: list[list[int]] = [[] for _ in range(dp_size)]
    totals = [0] * dp_size
    for k in range(0, n, dp_size):
        cheapest_first = sorted(range(dp_size), key=lambda r: (totals[r], r))
        for j, r in zip(order[k:k + dp_size], cheapest_first, strict=True):
            ranks[r].append(j)
            totals[r] += costs[j]
    return ranks


def lockstep_efficiency(micro_steps: Sequence[Sequence[float]]) -> float:
    """Σ mean / Σ max over micro-steps, each given as the costs of its rows on every rank: the
    share of the devices' time that does work when every micro-step waits for its slowest row
    (1.0 when every row of a micro-step costs the same)."""
    busy = sum(sum(c) / len(c) for c in micro_steps)
    wall = sum(max(c) for c in micro_steps)
    return busy / wall if wall else 1.0


def row_costs(planned: Sequence[tuple[int, Sequence[Span]]]) -> list[int]:
    """Σd² of each planned row, (stream, spans) (each span is one document of the row): the
    placement's cost, exact in ints."""
    return [sum((b - a) * (b - a) for _, a, b in spans) for _, spans in planned]


class _Stream:
    """One stream's documents in shuffled per-epoch order, and its cursor."""

    def __init__(self, stream: DataStream, shards: TokenShards | Any, target_length: int,
                 seed: int):
        self.domain = stream.domain
        self.packing = stream.packing
        self.target_length = target_length
        self.shards = shards
        # Plain ndarray views of the memory maps: slicing an np.memmap runs Python-level
        # __array_finalize__ per slice, a third of the planning time for short documents.
        # None for lengths alone (prolong.data.lockstep): such a stream plans rows, builds none.
        self.tokens = None if shards.tokens is None else shards.tokens.view(np.ndarray)
        self.mask = None if shards.mask_array is None else shards.mask_array.view(np.ndarray)
        self.offsets = shards.offsets
        self.lengths = shards.lengths
        self.n_docs = len(shards)
        self.key = zlib.crc32(stream.domain.encode())
        self.seed = seed
        self.cursor = Cursor()
        self._perms: dict[int, np.ndarray] = {}
        self._perm_lengths: dict[int, np.ndarray] = {}
        where = str(shards.directory)
        if self.n_docs == 0 or shards.num_tokens == 0:
            raise DataError("the stream has no tokens", domain=self.domain, path=where)
        if self.packing == "long":
            bad = np.flatnonzero(self.lengths != target_length)
            if bad.size:
                raise DataError(f"{bad.size} of {self.n_docs} documents are not exactly "
                                f"targetLength {target_length} tokens long (first: document "
                                f"{int(bad[0])}, {int(self.lengths[bad[0]])} tokens); long "
                                "streams need documents cut to targetLength",
                                domain=self.domain, path=where)

    def perm(self, epoch: int) -> np.ndarray:
        p = self._perms.get(epoch)
        if p is None:
            rng = np.random.default_rng([self.seed, _SEED_TAG_DOCS, self.key, epoch])
            p = rng.permutation(self.n_docs)
            # A row straddles at most two epochs; keep the current one and the next.
            for old in [e for e in self._perms if e < epoch - 1]:
                del self._perms[old], self._perm_lengths[old]
            self._perms[epoch] = p
            # The lengths in this epoch's order: planning reads one per document, every step on
            # every rank (and prolongctl plan replays it), so one lookup instead of two.
            self._perm_lengths[epoch] = self.lengths[p]
        return p

    def doc_id(self, ordinal: int) -> int:
        epoch, i = divmod(ordinal, self.n_docs)
        return int(self.perm(epoch)[i])

    def length_of(self, ordinal: int) -> int:
        epoch, i = divmod(ordinal, self.n_docs)
        lengths = self._perm_lengths.get(epoch)
        if lengths is None:
            self.perm(epoch)
            lengths = self._perm_lengths[epoch]
        return int(lengths[i])

    def plan(self, seq_len: int) -> list[Span]:
        spans, self.cursor = plan_row(self.packing, seq_len, self.length_of, self.cursor,
                                      target_length=self.target_length, domain=self.domain)
        return spans

    def targets(self, spans: list[Span]) -> int:
        """Loss positions of the row ``spans`` make, without building it: inside each piece every
        position but the last predicts the next token, unless the mask says otherwise."""
        if self.mask is None:
            return sum(b - a - 1 for _, a, b in spans)
        total = 0
        for ordinal, a, b in spans:
            start = int(self.offsets[self.doc_id(ordinal)])
            total += int(np.count_nonzero(self.mask[start + a + 1: start + b]))
        return total

    def build(self, spans: list[Span]) -> PackedRow:
        offsets, tokens, mask = self.offsets, self.tokens, self.mask
        pieces, masks = [], ([] if mask is not None else None)
        for ordinal, a, b in spans:
            start = int(offsets[self.doc_id(ordinal)])
            pieces.append(tokens[start + a: start + b])
            if masks is not None:
                masks.append(mask[start + a: start + b])
        return build_row(pieces, masks, domain=self.domain)


class MixtureLoader:
    """Yields, per optimizer step, this data-parallel rank's micro-batches
    (``rows_per_step / dp_size`` of them) as :class:`~prolong.data.packing.MicroBatch` lists.

    ``streams``: the stage's (DataStream, TokenShards) pairs. ``target_lengths``: per stream, the
    long-packing document length (default: the stream's targetLength, else ``seq_len``).
    """

    def __init__(self, streams: Sequence[tuple[DataStream, TokenShards]], *, seq_len: int,
                 rows_per_step: int, dp_rank: int = 0, dp_size: int = 1, seed: int = 0,
                 reorder: bool = True, target_lengths: Sequence[int | None] | None = None):
        if not streams:
            raise ValueError("a mixture needs at least one stream")
        if rows_per_step < 1 or dp_size < 1 or rows_per_step % dp_size:
            raise ValueError(f"rows_per_step {rows_per_step} must be a positive multiple of "
                             f"dp_size {dp_size}")
        if not 0 <= dp_rank < dp_size:
            raise ValueError(f"dp_rank {dp_rank} outside 0..{dp_size - 1}")
        domains = [s.domain for s, _ in streams]
        if len(set(domains)) != len(domains):
            raise ValueError(f"domains repeat: {domains}")
        targets = list(target_lengths) if target_lengths is not None else [None] * len(streams)
        self.seq_len, self.rows_per_step = seq_len, rows_per_step
        self.dp_rank, self.dp_size = dp_rank, dp_size
        self.seed, self.reorder = seed, reorder
        self.streams = [_Stream(s, sh, t or s.target_length or seq_len, seed)
                        for (s, sh), t in zip(streams, targets, strict=True)]
        total = math.fsum(s.proportion for s, _ in streams)
        self.proportions = [s.proportion / total for s, _ in streams]
        prio = np.random.default_rng([seed, _SEED_TAG_PRIORITY]).permutation(len(streams))
        self._priority = [int(x) for x in prio]
        self.step = 0
        self.rows_taken = [0] * len(streams)
        self.tokens_by_domain: dict[str, int] = dict.fromkeys(domains, 0)
        """Tokens consumed per domain, cumulative over all data-parallel ranks (identical on
        every rank, so any one of them can report the metric)."""
        self.step_targets = 0
        """Loss positions (labels other than -100) in all rows of the last step, over all
        data-parallel ranks: the denominator of the token-averaged loss, known on every rank
        without an all-reduce."""

    @classmethod
    def from_spec(cls, spec: TrainSpec, shards: Mapping[str, TokenShards], *, dims: ParallelDims,
                  rank: int, reorder: bool | None = None) -> MixtureLoader:
        """The loader of global rank ``rank`` for a training spec; ``shards`` maps each stream's
        domain to its shards. Which rows the rank reads (its data-parallel rank and the number of
        replicas) both come from ``dims``, the same object that built its process groups."""
        missing = [s.domain for s in spec.data.streams if s.domain not in shards]
        if missing:
            raise DataError(f"no prepared shards for {', '.join(missing)} "
                            "(run `prolongctl data prepare`)", domain=missing[0])
        return cls([(s, shards[s.domain]) for s in spec.data.streams],
                   seq_len=spec.sequence_length, rows_per_step=spec.rows_per_step,
                   dp_rank=dims.dp_rank(rank), dp_size=dims.dp, seed=spec.data.seed,
                   reorder=spec.parallelism.reorder_micro_batches if reorder is None else reorder,
                   target_lengths=[spec.stream_target_length(s) for s in spec.data.streams])

    @property
    def micro_batches(self) -> int:
        return self.rows_per_step // self.dp_size

    # ---- row selection -----------------------------------------------------------------

    def _pick_stream(self) -> int:
        i = next_stream(self.proportions, self.rows_taken, self._priority)
        self.rows_taken[i] += 1
        return i

    def _plan_step(self) -> list[tuple[int, list[Span]]]:
        """All global rows of the next step, in rank-assignment order: (stream, spans)."""
        planned = []
        for _ in range(self.rows_per_step):
            i = self._pick_stream()
            planned.append((i, self.streams[i].plan(self.seq_len)))
        order = np.random.default_rng([self.seed, _SEED_TAG_STEP, self.step]).permutation(
            self.rows_per_step)
        return [planned[j] for j in order]

    def next_planned(self) -> list[tuple[int, list[Span]]]:
        """All global rows of the next step, (stream, spans) in the seeded order, without reading
        a token; advances the loader (state, tokens per domain, step targets) to the next step.
        Which rank runs which is :func:`place_rows` of their costs (:meth:`next_placement`)."""
        planned = self._plan_step()
        self.step_targets = 0
        for i, spans in planned:
            self.tokens_by_domain[self.streams[i].domain] += self.seq_len
            self.step_targets += self.streams[i].targets(spans)
        self.step += 1
        return planned

    def next_placement(self) -> list[list[tuple[int, list[Span]]]]:
        """The next step's global rows as every data-parallel rank runs them: per rank, its
        (stream, spans) in micro-step order (reads no tokens)."""
        planned = self.next_planned()
        placed = place_rows(row_costs(planned), self.dp_size, lockstep=self.reorder)
        return [[planned[j] for j in rank] for rank in placed]

    def next_rows(self) -> list[PackedRow]:
        """This rank's rows of the next step (numpy), in micro-step order."""
        return [self.streams[i].build(spans)
                for i, spans in self.next_placement()[self.dp_rank]]

    def next_step(self) -> list[MicroBatch]:
        """This rank's micro-batches of the next step, as [1, S] torch tensors."""
        return [row.to_torch() for row in self.next_rows()]

    def __iter__(self) -> Iterator[list[MicroBatch]]:
        while True:
            yield self.next_step()

    # ---- resumption -------------------------------------------------------------------

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue with exactly the rows an uninterrupted run would get
        (small and JSON-serialisable; the same on every rank)."""
        return {
            "version": STATE_VERSION,
            "step": self.step,
            "seed": self.seed,
            "seq_len": self.seq_len,
            "rows_per_step": self.rows_per_step,
            "streams": [{"domain": s.domain, "num_docs": s.n_docs,
                         "num_tokens": s.shards.num_tokens, "rows": self.rows_taken[i],
                         "doc": s.cursor.doc, "offset": s.cursor.offset,
                         "tokens": self.tokens_by_domain[s.domain]}
                        for i, s in enumerate(self.streams)],
        }

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"loader state version {state.get('version')!r}, expected "
                             f"{STATE_VERSION}")
        for key in ("seed", "seq_len", "rows_per_step"):
            if state[key] != getattr(self, key):
                raise ValueError(f"loader state has {key} {state[key]}, this loader "
                                 f"{getattr(self, key)}: it belongs to another run")
        saved = [s["domain"] for s in state["streams"]]
        if saved != [s.domain for s in self.streams]:
            raise ValueError(f"loader state is for streams {saved}, this loader has "
                             f"{[s.domain for s in self.streams]}")
        for s, st in zip(self.streams, state["streams"], strict=True):
            if (st["num_docs"], st["num_tokens"]) != (s.n_docs, s.shards.num_tokens):
                raise DataError("the shards changed since the loader state was saved "
                                f"({st['num_docs']} documents / {st['num_tokens']} tokens then, "
                                f"{s.n_docs} / {s.shards.num_tokens} now)",
                                domain=s.domain, path=str(s.shards.directory))
        self.step = int(state["step"])
        self.rows_taken = [int(st["rows"]) for st in state["streams"]]
        for s, st in zip(self.streams, state["streams"], strict=True):
            s.cursor = Cursor(int(st["doc"]), int(st["offset"]))
            self.tokens_by_domain[s.domain] = int(st["tokens"])
