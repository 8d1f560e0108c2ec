"""Telling a usable checkpoint from a broken one, and finding the older ones."""

from __future__ import annotations

import json

import torch

from prolong.stage.directory import StageDir
from prolong.train.checkpoints import (
    CHECKPOINT_TAG,
    TRAINER_STATE,
    checkpoint_dir_name,
    checkpoint_problems,
    older_checkpoints,
    rng_file,
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
    assert checkpoint_problems(_checkpoint(tmp_path, 3), world=2, zero_stage=2) == []


def test_each_kind_of_damage_is_named(tmp_path):
    d = _checkpoint(tmp_path, 6)
    shard = d / CHECKPOINT_TAG / "zero_pp_rank_1_mp_rank_00_optim_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])  # truncated
    (d / rng_file(1)).unlink()
    (d / TRAINER_STATE).write_text("{not json")
    problems = checkpoint_problems(d, world=2, zero_stage=2)
    assert any("zero_pp_rank_1_mp_rank_00_optim_states.pt cannot be read" in p for p in problems)
    assert any("missing rng-rank00001.pt" in p for p in problems)
    assert any(f"{TRAINER_STATE} unreadable" in p for p in problems)
    # A checkpoint of another world size does not fit this run.
    assert any("2 optimizer shards" in p for p in
               checkpoint_problems(_checkpoint(tmp_path, 9), world=4, zero_stage=1))


def test_older_checkpoints_newest_first(tmp_path):
    for step in (3, 6, 9):
        _checkpoint(tmp_path, step)
    (tmp_path / "checkpoint-000004-from000003").mkdir()
    (tmp_path / "final").mkdir()
    stage = StageDir(str(tmp_path))
    names = [u.rsplit("/", 1)[-1] for u in older_checkpoints(stage, 9)]
    assert names == ["checkpoint-000006", "checkpoint-000004-from000003", "checkpoint-000003"]
    assert step_of("checkpoint-000004-from000003") == 4 and step_of("final") is None
