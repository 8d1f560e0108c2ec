"""The chaos drill end to end (marker ``chaos``: make bench runs it; 30-40 minutes on 2 cores).

A quickstart-sized stage (2 CPU workers, ZeRO-2, Ulysses SP=2, the tiny Llama on the embedded
corpus) runs under ``PROLONG_CHAOS=seed:23,kills:20``: the driver's killer thread SIGKILLs a
worker process 20 times, at moments the workers announce (mid-step, mid-save, while a restarted
worker loads its checkpoint, twice in one checkpoint interval, while final/ is published). Ray
Train restarts the group each time (maxFailures 20). The stage must end exactly where the same
stage run without a fault ends: per-step losses, final weights, metrics.jsonl with each step
once, every checkpoint directory whole. The kill log is printed (pytest -s) and kept in the
stage's .chaos/kills.jsonl.

Too slow for make test's budget (each kill costs a worker-group restart, 20-40 s here); the
killer itself is tested against real processes in test_chaos.py.
"""

from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch

from prolong.run.runner import run_file
from prolong.train.chaos import CHAOS_ENV, read_kills
from prolong.train.checkpoints import checkpoint_problems, step_of
from tests.train.test_ray_run import _final_weights, _losses_by_step, only_stage, stage_spec

# Each kill costs a worker-group restart (Ray Train notices the death, stops the group, starts
# new processes that import torch and DeepSpeed): 60-90 s each on a shared 2-core machine.
pytestmark = [pytest.mark.slow, pytest.mark.ray, pytest.mark.chaos, pytest.mark.timeout(5400)]

KILLS = int(os.environ.get("PROLONG_CHAOS_DRILL_KILLS", "20"))
STEPS, EVERY = 12, 3


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


def drill_spec(tmp: Path, data: Path, *, max_failures: int) -> Path:
    return stage_spec(tmp, data, steps=STEPS, every=EVERY, sp=2, seq=512,
                      max_failures=max_failures)


def test_twenty_kills_end_on_the_uninterrupted_run(ray_cluster, tmp_path_factory, monkeypatch):
    data = tmp_path_factory.mktemp("data")
    reference = drill_spec(tmp_path_factory.mktemp("reference"), data, max_failures=0)
    run_file(reference, progress=False)
    ref_stage = only_stage(reference)

    monkeypatch.setenv(CHAOS_ENV, f"seed:23,kills:{KILLS}")
    drilled = drill_spec(tmp_path_factory.mktemp("chaos"), data, max_failures=KILLS)
    run_file(drilled, progress=False)
    stage = only_stage(drilled)
    root = Path(stage.uri)

    kills = read_kills(root)
    print(f"\n{len(kills)} kills:")
    for k in kills:
        print(f"  #{k['kill']:2d} t={k['time'] - kills[0]['time']:7.1f}s {k['point']:5s} "
              f"step {k['step']:2d} (announced by rank {k['announced_by']}) -> killed rank "
              f"{k['victim_rank']} pid {k['victim_pid']}; newest checkpoint {k['checkpoint']}"
              f"{'; ' + k['label'] if k['label'] else ''}")
    assert len(kills) == KILLS and all(k["died"] for k in kills)
    points = {k["point"] for k in kills}
    assert points >= {"step", "save", "load", "final"}, points
    # Twice within one checkpoint interval: two kills in a row with no checkpoint between, the
    # second one in training (not in the restart's load).
    assert any(b["saves_since_previous_kill"] == 0 and b["point"] in ("step", "save")
               and a["point"] in ("step", "save") for a, b in itertools.pairwise(kills)), kills
    assert stage.is_complete()

    # Each step once in the raw log, with the uninterrupted run's losses.
    raw = (root / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw] == list(range(1, STEPS + 1))
    expected, got = _losses_by_step(ref_stage), _losses_by_step(stage)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    ref_w, w = _final_weights(ref_stage), _final_weights(stage)
    assert w.keys() == ref_w.keys()
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)

    # Nothing half-written: every checkpoint left is whole, no partial final/.
    checkpoints = [p for p in root.iterdir() if step_of(p.name) is not None]
    assert checkpoints
    for directory in checkpoints:
        assert checkpoint_problems(directory) == [], directory
    assert not list(root.glob("*.partial")) and not list(root.glob("*.tmp*"))
    assert stage.read_manifest().final_checkpoint.endswith(f"checkpoint-{STEPS:06d}")
