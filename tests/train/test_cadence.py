"""Checkpoints by time (prolong.train.cadence): every rank saves at the same step although their
clocks disagree, because rank 0 decides and broadcasts; three ranks over gloo on CPU."""

from __future__ import annotations

import multiprocessing
import socket

import pytest
import torch.distributed as dist  # imported before the fork: the ranks inherit it

from prolong.train.cadence import CheckpointClock, torch_broadcast

STEPS = 40
EVERY_STEPS = 25
EVERY_MINUTES = 1.0


class FakeClock:
    """A rank's wall clock: each step takes ``seconds(step)``; ranks run at different speeds."""

    def __init__(self, rank: int) -> None:
        self.rank, self.t = rank, 0.0

    def __call__(self) -> float:
        return self.t

    def step(self, step: int) -> None:
        # Rank 0's steps take 7 s; the others' 5 s and 11 s (and jitter): left alone, each rank
        # would cross the minute at another step.
        self.t += (7.0, 5.0, 11.0)[self.rank] + 0.5 * ((step * (self.rank + 3)) % 3)


def due_steps(rank: int, broadcast=None) -> list[int]:
    clock = FakeClock(rank)
    cadence = CheckpointClock(EVERY_STEPS, STEPS, EVERY_MINUTES, broadcast=broadcast, now=clock)
    out = []
    for step in range(1, STEPS + 1):
        clock.step(step)
        if cadence.due(step):
            out.append(step)
    return out


def _rank(rank: int, world: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank,
                            world_size=world)
    try:
        results.put((rank, due_steps(rank, torch_broadcast("cpu"))))
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.timeout(120)
def test_every_rank_saves_at_rank_0s_steps_over_gloo():
    world = 3
    ctx = multiprocessing.get_context("fork")
    results = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(r, world, port, results)) for r in range(world)]
    for p in procs:
        p.start()
    got = dict(results.get(timeout=90) for _ in range(world))
    for p in procs:
        p.join(timeout=30)
        assert p.exitcode == 0
    alone = {r: due_steps(r) for r in range(world)}
    # The planted bug (each rank on its own clock, no broadcast) disagrees: the test can fail.
    assert len({tuple(v) for v in alone.values()}) == world
    assert got == {r: alone[0] for r in range(world)}
    # Rank 0's 7-7.5 s steps cross the minute every 9th step; the 25th step and the last
    # come by the step rule (the time since the last save restarts at each).
    assert alone[0] == [9, 18, 25, 34, 40]


def test_the_step_rule_alone_needs_no_clock_and_no_broadcast():
    calls = []
    cadence = CheckpointClock(10, 25, None, broadcast=lambda v: calls.append(v) or v)
    assert [s for s in range(1, 26) if cadence.due(s)] == [10, 20, 25]
    assert calls == []
