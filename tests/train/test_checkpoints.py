"""Telling a usable checkpoint from a broken one, and finding the older ones."""

from __future__ import annotations

import json

import torch

from prolong.stage.directory import StageDir
from prolong.train.checkpoints import (
    CHECKPOINT_TAG,
    TRAINER_STATE,
    Layout,
    checkpoint_dir_name,
    checkpoint_problems,
    older_checkpoints,
    read_layout,
    rng_file,
    rng_file_for,
    step_of,
)


def _checkpoint(root, step: int, world: int = 2):
    d = root / checkpoint_dir_name(step)
    (d / CHECKPOINT_TAG).mkdir(parents=True)
    (d / TRAINER_STATE).write_text(json.dumps({"step": step, "loader": {}}))
    for r in range(world):
        torch.save({"rng": r}, d / rng_file(r))
        torch.save({"w": torch.randn(64, 64)}, d / CHECKPOINT_TAG /
                   f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
    torch.save({"w": torch.randn(64, 64)}, d / CHECKPOINT_TAG / "mp_rank_00_model_states.pt")
    return d


def test_a_complete_checkpoint_is_usable(tmp_path):
    assert checkpoint_problems(_checkpoint(tmp_path, 3)) == []


def test_each_kind_of_damage_is_named(tmp_path):
    d = _checkpoint(tmp_path, 6)
    shard = d / CHECKPOINT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    (d / rng_file(1)).unlink()
    (d / TRAINER_STATE).write_text("{not json")
    problems = checkpoint_problems(d)
    assert any("zero_pp_rank_1_mp_rank_00_optim_states.pt cannot be read" in p for p in problems)
    assert any("missing rng-rank00001.pt" in p for p in problems)
    assert any(f"{TRAINER_STATE} unreadable" in p for p in problems)


def test_completeness_is_judged_against_the_layout_that_wrote_it(tmp_path):
    # Recorded by 4 ranks, 2 optimizer shards and RNG files are left: incomplete, whatever world
    # the resuming run has (a checkpoint of another world size is reshaped, not refused).
    d = _checkpoint(tmp_path, 9)
    state = json.loads((d / TRAINER_STATE).read_text())
    state["layout"] = Layout(world=4, zero_stage=2, sp=2).to_json()
    (d / TRAINER_STATE).write_text(json.dumps(state))
    assert read_layout(d) == Layout(world=4, zero_stage=2, sp=2)
    problems = checkpoint_problems(d)
    assert any("missing rng-rank00002.pt, rng-rank00003.pt" in p for p in problems)
    assert any("2 optimizer shards in ds/, 4 expected" in p for p in problems)
    # Without a recorded layout, a lost RNG file cannot make the world look smaller.
    del state["layout"]
    (d / TRAINER_STATE).write_text(json.dumps(state))
    (d / rng_file(1)).unlink()
    assert any("missing rng-rank00001.pt" in p for p in checkpoint_problems(d))


def test_rng_files_on_a_larger_world():
    assert [rng_file_for(r, 2) for r in range(4)] == [rng_file(0), rng_file(1), rng_file(0),
                                                      rng_file(1)]


def test_older_checkpoints_newest_first(tmp_path):
    for step in (3, 6, 9):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-000004-from000003").mkdir()
    (tmp_path / "final").mkdir()
    stage = StageDir(str(tmp_path))
    names = [u.rsplit("/", 1)[-1] for u in older_checkpoints(stage, 9)]
    assert names == ["checkpoint-000006", "checkpoint-000004-from000003", "checkpoint-000003"]
    assert step_of("checkpoint-000004-from000003") == 4 and step_of("final") is None
