"""The chaos drill's parts (prolong.train.chaos): the PROLONG_CHAOS value, the seeded plan, and
the killer against real worker processes it SIGKILLs (tests/train/chaos_worker.py stands in for
a Ray Train worker; the test restarts the group as Ray Train does). The whole-run drill on Ray
is tests/train/test_chaos_drill.py (marker chaos)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from prolong.train.chaos import (
    CHAOS_ENV,
    ChaosMonkey,
    ChaosSpec,
    ChaosSpecError,
    chaos_drill,
    plan_kills,
    read_kills,
)
from prolong.train.entry import worker_env

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("text", ["", "seed:1", "kills:3", "seed:x,kills:3", "seed:1,kills:-1",
                                  "seed:1,kills:3,seed:2", "speed:1,kills:3", "seed=1,kills=3"])
def test_a_bad_chaos_value_is_one_line(text):
    with pytest.raises(ChaosSpecError) as err:
        ChaosSpec.parse(text)
    assert CHAOS_ENV in str(err.value) and "\n" not in str(err.value)


def test_the_value_parses_in_either_order():
    assert ChaosSpec.parse("kills:20,seed:7") == ChaosSpec(seed=7, kills=20)


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("kills", [1, 3, 5, 20])
def test_the_plan_covers_every_moment(seed, kills):
    plan = plan_kills(ChaosSpec(seed, kills), world=2, every_steps=3)
    assert len(plan) == kills
    points = [k.point for k in plan]
    # The first kill comes after the first checkpoint (steps 4-6), so that restarts load one.
    assert points[0] == "step" and 3 <= plan[0].skip < 6
    assert "load" not in points[:1]
    finals = [i for i, p in enumerate(points) if p == "final"]
    assert finals == list(range(kills - len(finals), kills))  # final/ kills last
    assert {k.victim for k in plan} <= {0, 1}
    if kills >= 5:
        assert set(points) == {"step", "save", "load", "final"}
        assert plan[1].label == "twice-in-interval" and plan[1].skip == 0
    assert plan == plan_kills(ChaosSpec(seed, kills), world=2, every_steps=3)  # seeded


def test_the_variable_travels_to_the_workers(monkeypatch):
    monkeypatch.setenv(CHAOS_ENV, "seed:1,kills:2")
    assert worker_env(False)[CHAOS_ENV] == "seed:1,kills:2"
    monkeypatch.delenv(CHAOS_ENV)
    assert CHAOS_ENV not in worker_env(False)


def test_a_plan_beyond_max_failures_is_refused(tmp_path, monkeypatch):
    monkeypatch.setenv(CHAOS_ENV, "seed:1,kills:4")
    with (pytest.raises(ChaosSpecError, match=r"4 kills exceed cluster\.maxFailures 3"),
          chaos_drill(str(tmp_path), world=2, every_steps=3, max_failures=3, say=print)):
        pass
    with (pytest.raises(ChaosSpecError, match="not a local stage directory"),
          chaos_drill("s3://b/p/s", world=2, every_steps=3, max_failures=4, say=print)):
        pass


def _spawn(stage: Path, rank: int, steps: int, every: int, group: int) -> subprocess.Popen:
    env = {**os.environ, CHAOS_ENV: "seed:0,kills:1", "PYTHONPATH": str(REPO)}
    return subprocess.Popen([sys.executable, str(REPO / "tests/train/chaos_worker.py"),
                             str(stage), str(rank), str(steps), str(every), str(group)],
                            env=env)


def _events(stage: Path) -> str:
    path = stage / ".chaos" / "events.jsonl"
    return path.read_text() if path.exists() else ""


def test_the_killer_sigkills_workers_at_the_moments_they_announce(tmp_path):
    # Two stand-in workers per group; when the killer SIGKILLs one, the test stops the other and
    # starts a new group (Ray Train's restart), until the stage's final marker is written.
    stage, steps, every = tmp_path / "stage", 16, 2
    stage.mkdir()
    plan = plan_kills(ChaosSpec(seed=5, kills=5), world=2, every_steps=every)
    killed_by_us: list[int] = []
    with ChaosMonkey(stage, plan) as monkey:
        for _group in range(len(plan) + 1):
            procs = []
            for rank in range(2):  # up one after the other, as Ray Train's group starts
                procs.append(_spawn(stage, rank, steps, every, _group))
                while f'"pid": {procs[-1].pid},' not in _events(stage):
                    time.sleep(0.01)
            deadline = time.monotonic() + 60
            # Until one fails (a finished rank 1 is not a failure) or both are done.
            while (not any(p.poll() not in (None, 0) for p in procs)
                   and any(p.poll() is None for p in procs) and time.monotonic() < deadline):
                time.sleep(0.01)
            dead = [p for p in procs if p.poll() not in (None, 0)]
            for p in procs:
                if p.poll() is None:  # the group's teardown after a worker died
                    p.terminate()
                    p.wait(timeout=10)
            killed_by_us += [p.pid for p in dead if p.returncode == -signal.SIGKILL]
            if (stage / "final").exists() and all(p.returncode == 0 for p in procs):
                break
    assert monkey.error is None
    kills = read_kills(stage)
    # Each at its planned moment; a plan the run outlives takes final/ instead (the last steps
    # after a late restart can be fewer than a kill's drawn skip), never nothing.
    assert len(kills) == len(plan)
    assert all(k["point"] in (p.point, "final") for k, p in zip(kills, plan, strict=True))
    assert sum(k["point"] == p.point for k, p in zip(kills, plan, strict=True)) >= 4
    # The planned rank, or the announcer where the planned one had already exited (rank 1 has
    # nothing to do during final/ here; in a Worker it waits in the last barrier).
    assert all(k["victim_rank"] in (p.victim, k["announced_by"]) for k, p in zip(kills, plan,
                                                                                  strict=True))
    # Each recorded kill is a process that died of SIGKILL (its exit status says so).
    assert sorted(k["victim_pid"] for k in kills) == sorted(killed_by_us)
    assert all(k["died"] for k in kills)
    assert (stage / "final").read_text() == "done"
    # A restart loads the newest checkpoint the killer saw saved.
    loads = [k for k in kills if k["point"] == "load"]
    assert all(k["checkpoint"] == k["step"] for k in loads)
    assert "5 of 5 planned worker kills" in monkey.summary()
