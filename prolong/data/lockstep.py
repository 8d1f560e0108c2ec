"""How long a stage's data-parallel replicas wait for each other: the loader's own planning,
replayed over document lengths alone (no tokens are read, no shards need exist).

ZeRO-3 gathers every layer's parameters over all ranks, so every micro-step of every replica
ends when the slowest row of that micro-step ends. The *lockstep efficiency* of a stage is
Σ mean row cost / Σ max row cost over its micro-steps
(:func:`prolong.data.mixture.lockstep_efficiency`): the share of device time that trains. A row's
cost is its document-causal FLOPs (:mod:`prolong.model.flops`: ``6N`` per token plus
``6·L·H·d·Σdᵢ²``), so a 512K row holding one document costs about 4.7x a row of 64K documents.

:func:`replay_lockstep` builds the stage's :class:`~prolong.data.mixture.MixtureLoader` over
:class:`DocumentLengths` (lengths standing in for token shards) and asks it for each step's
placement, exactly as the workers' loaders do: the same stream choice, per-epoch permutations,
packing cursors and lockstep placement (:func:`~prolong.data.mixture.place_rows`). Long streams'
documents are exactly their target length, as prepare cuts them; short streams' lengths are
drawn (seeded) from a geometric distribution with mean ``short_doc_tokens``, the plan's stated
assumption. Their rows cost nearly the same whatever the draw (at 64K and beyond their attention
is a few percent of their FLOPs), so the figure rests on the long streams, which are exact.
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from prolong.data.mixture import MixtureLoader, lockstep_efficiency, place_rows, row_costs
from prolong.data.shards import DocumentOffsets
from prolong.model.flops import doc_causal_flops_per_token
from prolong.spec import ArchitectureSpec, DataStream, TrainSpec

REPLAY_STEPS = 32
"""Steps replayed per estimate (or the stage's steps, when fewer). The loader's stream choice
keeps every step's mix within a row of its shares, so the figure settles fast: for the ProLong-8B
stages 32 steps agree with 1,000 to 0.001 (a third of a second per stage instead of ten)."""
_SHORT_DOCS = 8192
_LONG_DOCS = 512


class DocumentLengths(DocumentOffsets):
    """A stream's document lengths in the shape the loader's planning reads from
    :class:`~prolong.data.shards.TokenShards` (offsets, lengths, counts). It has no tokens:
    building a row from it fails; planning one does not."""

    tokens = None
    mask_array = None

    def __init__(self, lengths: np.ndarray, name: str):
        self.offsets = np.concatenate([[0], np.cumsum(np.asarray(lengths, dtype=np.int64))])
        self.directory = Path(f"<lengths of {name}>")


def assumed_lengths(spec: TrainSpec, stream: DataStream, *, short_doc_tokens: int,
                    seed: int = 0) -> DocumentLengths:
    """Document lengths for ``stream`` before its data is prepared: exactly the target length
    for a long stream; geometric with mean ``short_doc_tokens`` (seeded) otherwise."""
    if stream.packing == "long":
        return DocumentLengths(np.full(_LONG_DOCS, spec.stream_target_length(stream)),
                               stream.domain)
    rng = np.random.default_rng([seed, zlib.crc32(stream.domain.encode())])
    return DocumentLengths(rng.geometric(1.0 / max(1, short_doc_tokens), _SHORT_DOCS),
                           stream.domain)


@dataclass(frozen=True)
class LockstepEstimate:
    sp: int
    dp: int
    micro_batches_per_rank: int
    efficiency: float
    """Σ mean / Σ max row FLOPs over the replayed micro-steps."""
    steps: int
    """Steps replayed."""


def replay_lockstep(spec: TrainSpec, arch: ArchitectureSpec, *, short_doc_tokens: int,
                    sp_options: Iterable[int] = (), steps: int = REPLAY_STEPS,
                    lengths: Mapping[str, DocumentLengths] | None = None
                    ) -> dict[int, LockstepEstimate]:
    """The stage's lockstep efficiency over its first ``steps`` steps, keyed by SP degree: the
    spec's, and each of ``sp_options`` whose replicas deal the step's rows evenly (fewer
    replicas, more micro-batches each). The global rows do not depend on the layout, so they are
    planned once and placed per layout by the loader's :func:`place_rows`. ``lengths``: real
    document lengths per domain (default: :func:`assumed_lengths`)."""
    world, rows, seq = spec.cluster.world_size, spec.rows_per_step, spec.sequence_length
    layouts = sorted({spec.sp_size, *(sp for sp in sp_options
                                      if world % sp == 0 and rows % (world // sp) == 0)})
    streams = [(s, (lengths or {}).get(s.domain)
                or assumed_lengths(spec, s, short_doc_tokens=short_doc_tokens, seed=spec.data.seed))
               for s in spec.data.streams]
    loader = MixtureLoader(streams, seq_len=seq, rows_per_step=rows, seed=spec.data.seed,
                           target_lengths=[spec.stream_target_length(s) for s in spec.data.streams])
    lockstep = spec.parallelism.reorder_micro_batches
    waves: dict[int, list[list[float]]] = {sp: [] for sp in layouts}
    replayed = max(1, min(steps, spec.total_steps))
    for _ in range(replayed):
        costs = row_costs(loader.next_planned())
        flops = [seq * doc_causal_flops_per_token(arch, c / seq) for c in costs]
        for sp in layouts:
            placed = place_rows(costs, world // sp, lockstep=lockstep)
            waves[sp] += [[flops[rank[k]] for rank in placed] for k in range(len(placed[0]))]
    return {sp: LockstepEstimate(sp, world // sp, rows // (world // sp),
                                 lockstep_efficiency(waves[sp]), replayed) for sp in layouts}
