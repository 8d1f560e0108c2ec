"""The mixture loader over real token shards.

Short streams store ``arange(num_tokens)`` as their tokens, so every emitted token id *is* its
position in the stream: coverage, document boundaries and masks can be checked exactly."""

from __future__ import annotations

import json
from itertools import chain
from pathlib import Path

import numpy as np
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from prolong.data.errors import DataError
from prolong.data.mixture import MixtureLoader, lockstep_efficiency, next_stream, place_rows
from prolong.data.packing import IGNORE_INDEX, sp_slice
from prolong.data.shards import ShardWriter, TokenShards
from prolong.spec import DataStream, PretrainJob
from tests.conftest import job_dict

S = 64
T = 16  # long documents: four to a row


def _write(path: Path, lengths, *, ids=None, with_mask=False, seed=0) -> TokenShards:
    rng = np.random.default_rng(seed)
    w = ShardWriter(path, dtype=np.uint32, with_mask=with_mask)
    start = 0
    for n in lengths:
        doc = np.arange(start, start + n) if ids is None else ids(n, rng)
        w.add(doc, rng.integers(0, 2, n) if with_mask else None)
        start += n
    w.close()
    return TokenShards(path)


@pytest.fixture(scope="module")
def shards(tmp_path_factory) -> dict[str, TokenShards]:
    root = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(1)
    return {
        # 23 long documents: the epoch length is no multiple of the four documents per row.
        "long": _write(root / "long", [T] * 23, ids=lambda n, r: r.integers(0, 128256, n)),
        # ~6,000 tokens: about 90 rows per epoch.
        "short": _write(root / "short", rng.integers(1, 40, 300).tolist()),
        "chat": _write(root / "chat", rng.integers(5, 90, 29).tolist(), with_mask=True),
    }


def stream(domain, packing, proportion, **kw) -> DataStream:
    return DataStream(domain=domain, path=domain, format="jsonl", packing=packing,
                      proportion=proportion, **kw)


MIX = [("long", "long", 0.3), ("short", "concat", 0.7)]


def loader(shards, mix=MIX, **kw) -> MixtureLoader:
    streams = [(stream(d, p, w, target_length=T if p == "long" else None), shards[d])
               for d, p, w in mix]
    kw.setdefault("seq_len", S)
    kw.setdefault("rows_per_step", 4)
    return MixtureLoader(streams, **kw)


def flat(rows):
    return [(r.domain, r.input_ids.tobytes()) for r in rows]


# --------------------------------------------------------------------------------------------


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.integers(1, 1000), min_size=1, max_size=12),
       seed=st.integers(0, 2**31))
@example(weights=[7, 13, 7, 1, 1, 10, 13, 1, 10, 4], seed=-1)  # largest-deficit drifts to 1.015
def test_next_stream_keeps_every_share_within_one_row(weights, seed):
    p = [w / sum(weights) for w in weights]
    priority = (list(range(len(p))) if seed < 0 else
                np.random.default_rng(seed).permutation(len(p)).tolist())
    counts = [0] * len(p)
    worst = 0.0
    for n in range(1, 1500):
        counts[next_stream(p, counts, priority)] += 1
        worst = max(worst, max(abs(c - n * q) for c, q in zip(counts, p, strict=True)))
    assert worst < 1 + 1e-9


def test_next_stream_breaks_ties_by_priority():
    assert next_stream([0.5, 0.5], [0, 0], [1, 0]) == 1
    assert next_stream([0.5, 0.5], [0, 0], [0, 1]) == 0


@settings(max_examples=25, deadline=None)
@given(weights=st.lists(st.integers(1, 20), min_size=3, max_size=3),
       seed=st.integers(0, 2**31), rows_per_step=st.sampled_from([1, 2, 3, 8]))
def test_token_shares_track_proportions_within_one_row(shards, weights, seed, rows_per_step):
    total = sum(weights)
    mix = [("long", "long", weights[0] / total), ("short", "concat", weights[1] / total),
           ("chat", "conversation", weights[2] / total)]
    ld = loader(shards, mix, seed=seed, rows_per_step=rows_per_step)
    for step in range(1, 40):
        ld.next_rows()
        n = step * rows_per_step
        for (domain, _, p) in mix:
            # Largest-deficit selection: never a full row away from the exact share.
            assert abs(ld.tokens_by_domain[domain] / S - n * p) < 1 + 1e-9


def test_every_short_token_used_exactly_once_per_epoch(shards):
    sh = shards["short"]
    ld = loader(shards, [("short", "concat", 1.0)], rows_per_step=1, reorder=False, seed=5)
    n = sh.num_tokens
    rows = [ld.next_rows()[0] for _ in range(-(-3 * n // S))]
    emitted = np.concatenate([r.input_ids for r in rows])
    starts = set(sh.offsets[:-1].tolist())
    orders = []
    for e in range(3):
        epoch = emitted[e * n:(e + 1) * n]
        assert sorted(epoch.tolist()) == list(range(n))  # each token exactly once
        # Documents stay whole and in order: a jump in ids only happens onto a document start.
        jumps = np.flatnonzero(np.diff(epoch) != 1) + 1
        assert all(int(epoch[j]) in starts for j in jumps)
        orders.append(epoch[[0, *jumps.tolist()]].tolist())
    assert orders[0] != orders[1] != orders[2]  # a fresh shuffle each epoch
    # Rows agree with the tokens: positions restart exactly at document starts and row starts.
    for r in rows:
        restart = r.position_ids == 0
        expect = np.isin(r.input_ids, list(starts))
        expect[0] = True
        assert (restart == expect).all()
        ok = r.shift_labels != IGNORE_INDEX
        assert (r.shift_labels[ok] == r.input_ids[1:][ok[:-1]]).all()
        assert not ok[-1] and (~ok[:-1] == expect[1:]).all()


def test_long_stream_rows_hold_s_over_target_documents(shards):
    ld = loader(shards, [("long", "long", 1.0)], rows_per_step=2, reorder=False)
    docs = {shards["long"].doc(i).tobytes() for i in range(len(shards["long"]))}
    for _ in range(20):  # several epochs of 23 documents, rows straddling epochs
        for row in ld.next_rows():
            assert row.doc_lengths.tolist() == [T] * (S // T)
            assert (row.position_ids == np.tile(np.arange(T), S // T)).all()
            for k in range(S // T):
                assert row.input_ids[k * T:(k + 1) * T].astype(np.uint32).tobytes() in docs


def test_long_stream_with_wrong_lengths_is_a_data_error(shards, tmp_path):
    bad = _write(tmp_path / "bad", [T, T, T + 1])
    with pytest.raises(DataError, match=r"stream books.*not exactly targetLength"):
        MixtureLoader([(stream("books", "long", 1.0, target_length=T), bad)], seq_len=S,
                      rows_per_step=1)


def test_conversations_start_rows_and_mask_targets(shards):
    sh = shards["chat"]
    ld = loader(shards, [("chat", "conversation", 1.0)], rows_per_step=2)
    starts = set(sh.offsets[:-1].tolist())
    for _ in range(30):
        for row in ld.next_rows():
            ids = row.input_ids
            doc_starts = np.flatnonzero(row.position_ids == 0)
            assert all(int(ids[j]) in starts for j in doc_starts)  # never mid-conversation
            target_ok = sh.mask_array[ids[1:]] == 1  # the mask of each target token
            labels = row.shift_labels[:-1]
            assert (labels[~target_ok] == IGNORE_INDEX).all()
            keep = target_ok & (row.position_ids[1:] != 0)
            assert (labels[keep] == ids[1:][keep]).all()
            assert (labels[~keep] == IGNORE_INDEX).all()


@pytest.mark.parametrize("dp_size", [2, 4])
def test_dp_ranks_get_disjoint_rows_covering_the_global_rows(shards, dp_size):
    ref = loader(shards, rows_per_step=8, reorder=False, seed=3)
    ranks = [loader(shards, rows_per_step=8, reorder=False, seed=3, dp_rank=r, dp_size=dp_size)
             for r in range(dp_size)]
    short = [set() for _ in ranks]
    for _ in range(12):  # ~67 short rows: within the short stream's first epoch
        global_rows = flat(ref.next_rows())
        per_rank = [flat(ld.next_rows()) for ld in ranks]
        for r, rows in enumerate(per_rank):
            assert rows == global_rows[r::dp_size]  # global row j -> rank j % dp_size
            for domain, b in rows:
                if domain == "short":
                    short[r] |= set(np.frombuffer(b, np.int64).tolist())
    # Disjoint: no short-stream token reached two ranks (token ids are unique positions).
    assert sum(map(len, short)) == len(set().union(*short))
    assert ref.streams[1].cursor.doc < ref.streams[1].n_docs
    for ld in ranks:  # the metrics and the state are global, the same on every rank
        assert ld.step_targets == ref.step_targets
        assert ld.tokens_by_domain == ref.tokens_by_domain
        assert ld.state_dict() == ref.state_dict()


def test_step_targets_count_every_rank_s_loss_positions(shards):
    mix = [("long", "long", 0.2), ("short", "concat", 0.3), ("chat", "conversation", 0.5)]
    ranks = [loader(shards, mix, rows_per_step=6, dp_size=3, dp_rank=r) for r in range(3)]
    for _ in range(10):
        counted = sum(row.num_targets for ld in ranks for row in ld.next_rows())
        assert {ld.step_targets for ld in ranks} == {counted}


def test_sp_ranks_of_a_group_get_the_same_rows_and_slices(shards):
    sp = 4
    group = [loader(shards, rows_per_step=4, dp_size=2, dp_rank=1, seed=9) for _ in range(sp)]
    for _ in range(5):
        steps = [ld.next_step() for ld in group]
        for micro in zip(*steps, strict=True):
            full = micro[0]
            for k, mb in enumerate(micro):
                assert mb.input_ids.equal(full.input_ids)
                part = sp_slice(mb, k, sp)
                assert part.shift_labels.equal(full.shift_labels[:, k * S // sp:(k + 1) * S // sp])
            joined = np.concatenate([sp_slice(mb, k, sp).shift_labels.numpy()
                                     for k, mb in enumerate(micro)], axis=-1)
            assert (joined == full.shift_labels.numpy()).all()


def _cost(row) -> int:
    return int((row.doc_lengths.astype(np.int64) ** 2).sum())


def test_lockstep_placement_deals_the_step_s_rows_by_cost(shards):
    """reorder=True: the same rows per step as the seeded deal (and as one rank alone), each
    micro-step's rows all dearer than the next one's, and per step a lockstep efficiency at least
    that of the old placement (seeded deal, then each rank's rows sorted by cost)."""
    dp = 4
    seeded = [loader(shards, rows_per_step=8, dp_size=dp, dp_rank=r, reorder=False, seed=4)
              for r in range(dp)]
    dealt = [loader(shards, rows_per_step=8, dp_size=dp, dp_rank=r, reorder=True, seed=4)
             for r in range(dp)]
    alone = loader(shards, rows_per_step=8, reorder=True, seed=4)
    better = 0
    for _ in range(15):
        old = [sorted(ld.next_rows(), key=lambda r: -_cost(r)) for ld in seeded]
        new = [ld.next_rows() for ld in dealt]
        assert sorted(flat(chain(*old))) == sorted(flat(chain(*new))) == sorted(
            flat(alone.next_rows()))
        waves = [[_cost(rank[k]) for rank in new] for k in range(2)]
        assert min(waves[0]) >= max(waves[1])
        old_waves = [[_cost(rank[k]) for rank in old] for k in range(2)]
        assert lockstep_efficiency(waves) >= lockstep_efficiency(old_waves) - 1e-12
        better += lockstep_efficiency(waves) > lockstep_efficiency(old_waves) + 1e-9
    assert better  # the fixture's steps are not all balanced already
    assert {ld.state_dict() == alone.state_dict() for ld in dealt} == {True}


def test_place_rows_by_cost_then_least_loaded_rank():
    costs = [5, 9, 1, 9, 3, 7]  # the seeded order
    # Sorted (stable): 9 (j=1), 9 (j=3), 7 (5), 5 (0), 3 (4), 1 (2). Micro-step 0: rows 1, 3, 7
    # to ranks 0, 1, 2; micro-step 1: the dearest left (5) to the rank with the least so far (2),
    # then 3 and 1 to ranks 0 and 1 (tied at 9: the lower rank first).
    assert place_rows(costs, 3) == [[1, 4], [3, 2], [5, 0]]
    assert place_rows(costs, 1) == [[1, 3, 5, 0, 4, 2]]
    assert place_rows(costs, 2, lockstep=False) == [[0, 2, 4], [1, 3, 5]]
    assert lockstep_efficiency([[9, 9, 7], [5, 3, 1]]) == pytest.approx((25 / 3 + 3) / 14)
    with pytest.raises(ValueError, match="evenly"):
        place_rows(costs, 4)


@pytest.mark.parametrize("seed", [0, 1])
def test_resume_from_state_gives_identical_rows(shards, seed):
    mix = [("long", "long", 0.2), ("short", "concat", 0.5), ("chat", "conversation", 0.3)]
    saw_carry = saw_epoch = False
    for k in range(0, 24, 3):
        run = loader(shards, mix, seed=seed)
        for _ in range(k):
            run.next_rows()
        state = json.loads(json.dumps(run.state_dict()))  # JSON round trip, as in a checkpoint
        resumed = loader(shards, mix, seed=seed)
        resumed.load_state_dict(state)
        cursors = {s["domain"]: s for s in state["streams"]}
        saw_carry |= cursors["short"]["offset"] > 0
        before = {s.domain: s.cursor.doc // s.n_docs for s in run.streams}
        for _ in range(6):
            assert flat(resumed.next_rows()) == flat(run.next_rows())
        saw_epoch |= any(s.cursor.doc // s.n_docs > before[s.domain] for s in run.streams)
        assert resumed.state_dict() == run.state_dict()
    assert saw_carry and saw_epoch  # resumed with a carry-over pending and across an epoch end


def test_state_from_another_run_is_refused(shards):
    state = loader(shards, seed=1).state_dict()
    with pytest.raises(ValueError, match="seed"):
        loader(shards, seed=2).load_state_dict(state)
    with pytest.raises(ValueError, match="streams"):
        loader(shards, [("short", "concat", 0.7), ("long", "long", 0.3)],
               seed=1).load_state_dict(state)


def test_from_spec_quickstart_stage2(tmp_path):
    """The repository's own quickstart stage 2: long 2K and 256-token streams plus concat."""
    job = PretrainJob.model_validate(job_dict("quickstart/stage2.yaml"))
    spec = job.spec
    by_domain = {}
    for i, s in enumerate(spec.data.streams):
        target = spec.stream_target_length(s)
        lengths = [target] * 5 if s.packing == "long" else [300, 700, 1100, 90] * 3
        by_domain[s.domain] = _write(tmp_path / s.domain, lengths, seed=i)
    ld = MixtureLoader.from_spec(spec, by_domain, dims=spec.parallel_dims, rank=0)
    assert ld.micro_batches == spec.micro_batches_per_rank
    for _ in range(10):
        step = ld.next_step()
        assert len(step) == spec.rows_per_step // spec.dp_size
        for mb in step:
            assert mb.input_ids.shape == (1, spec.sequence_length)
    assert sum(ld.tokens_by_domain.values()) == 10 * spec.global_batch_tokens
