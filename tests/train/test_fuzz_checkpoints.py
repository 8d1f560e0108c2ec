"""Damaged checkpoints: truncate, flip bits in, empty, zero a run of, or delete one file of a
checkpoint (DeepSpeed's model and optimizer shards, ``latest``, the trainer state, an RNG file,
a digests file), then find the checkpoint to resume from with the product's own discovery
(:func:`~prolong.train.checkpoints.checkpoint_problems` on the newest, then
:func:`~prolong.train.checkpoints.older_checkpoints`): the damaged one must be refused with a
reason, and the resume must fall back to the newest whole one. A flipped bit inside a tensor
leaves an archive torch opens without complaint: only the digests each rank records catch it.

make test: a checkpoint of torch archives laid out as a 2-rank ZeRO-2 checkpoint (fast);
make bench (marker chaos): 1,000 cases on real DeepSpeed checkpoints written by the trainer's
Worker on two gloo ranks, and real resumes from damaged ones that end on the uninterrupted run's
losses (tests/train/reshape_worker.py drives the Worker).
"""

from __future__ import annotations

import json
import random
import shutil
from collections import Counter
from pathlib import Path

import pytest
import torch

from prolong.stage.directory import StageDir
from prolong.train import checkpoints as ckpt
from prolong.train.checkpoints import (
    CHECKPOINT_TAG,
    TRAINER_STATE,
    Layout,
    checkpoint_dir_name,
    checkpoint_problems,
    older_checkpoints,
    rng_file,
    write_digests,
)

SAMPLE = 30
FULL = 1000
KINDS = ("truncate", "bitflip", "bitflips", "empty", "zero-run", "delete")


def synthetic_checkpoint(stage: Path, step: int) -> Path:
    """A 2-rank ZeRO-2 checkpoint's files (torch archives with tensors), as each rank writes
    them, with each rank's digests (the product's write_digests)."""
    d = stage / checkpoint_dir_name(step)
    (d / CHECKPOINT_TAG).mkdir(parents=True)
    torch.manual_seed(step)
    (d / "latest").write_text(CHECKPOINT_TAG)
    torch.save({"module": {"w": torch.randn(32, 32)}}, d / CHECKPOINT_TAG /
               "mp_rank_00_model_states.pt")
    (d / TRAINER_STATE).write_text(json.dumps({
        "step": step, "loader": {"position": step}, "layout": Layout(2, 2, 2).to_json()}))
    for r in range(2):
        torch.save({"optimizer_state_dict": {"zero_stage": 2, "m": torch.randn(64, 64)}},
                   d / CHECKPOINT_TAG / f"zero_pp_rank_{r}_mp_rank_00_optim_states.pt")
        torch.save({"torch": torch.get_rng_state()}, d / rng_file(r))
    for r in range(2):
        write_digests(d, r)
    return d


def damage(directory: Path, rng: random.Random) -> str:
    """One file of ``directory`` damaged; returns what and how."""
    files = sorted(p for p in directory.rglob("*") if p.is_file())
    target = rng.choice(files)
    kind = rng.choice(KINDS)
    data = bytearray(target.read_bytes())
    if kind == "delete" or not data:
        target.unlink()
        kind = "delete"
    elif kind == "truncate":
        target.write_bytes(bytes(data[: rng.randrange(len(data))]))
    elif kind in ("bitflip", "bitflips"):
        for _ in range(1 if kind == "bitflip" else rng.randint(2, 30)):
            i = rng.randrange(len(data))
            data[i] ^= 1 << rng.randrange(8)
        target.write_bytes(bytes(data))
    elif kind == "empty":
        target.write_bytes(b"")
    else:
        i = rng.randrange(len(data))
        n = min(rng.randint(1, 256), len(data) - i)
        before = bytes(data[i: i + n])
        data[i: i + n] = bytes(n) if any(before) else b"\xff" * n
        target.write_bytes(bytes(data))
    return f"{target.relative_to(directory).as_posix()}:{kind}"


def resume_choice(stage: StageDir, latest: Path) -> tuple[str | None, list[str]]:
    """What a resume picks, as Worker._usable_checkpoint does on one rank: the latest when it
    has no problems, else the newest older one that has none. (name, problems of the latest)"""
    problems = checkpoint_problems(latest)
    if not problems:
        return latest.name, problems
    for uri in older_checkpoints(stage, ckpt.step_of(latest.name)):
        if not checkpoint_problems(Path(uri)):
            return uri.rsplit("/", 1)[-1], problems
    return None, problems


def fuzz(root: Path, make: callable, seeds: range) -> Counter:
    """Damage the newest of two checkpoints once per seed; every case must fall back to the
    older one with a reason of at most a few short lines."""
    template = root / "template"
    older, newest = make(template)
    stage_dir = root / "stage"
    results: Counter = Counter()
    failures = []
    for seed in seeds:
        shutil.rmtree(stage_dir, ignore_errors=True)
        shutil.copytree(template, stage_dir)
        latest = stage_dir / newest
        what = damage(latest, random.Random(seed))
        chosen, problems = resume_choice(StageDir(str(stage_dir)), latest)
        if chosen != older:
            failures.append(f"{what}: resumed from {chosen} ({problems})")
        elif not problems or any("\n" in p or len(p) > 400 for p in problems):
            failures.append(f"{what}: reasons {problems!r}")
        results[what.rsplit(":", 1)[1]] += 1
    assert not failures, "\n".join(failures[:20])
    return results


def _synthetic_pair(template: Path) -> tuple[str, str]:
    synthetic_checkpoint(template, 3)
    synthetic_checkpoint(template, 6)
    return checkpoint_dir_name(3), checkpoint_dir_name(6)


def test_a_whole_checkpoint_and_its_digests_are_usable(tmp_path):
    d = synthetic_checkpoint(tmp_path, 3)
    assert checkpoint_problems(d) == []
    assert sorted(json.loads((d / "digests-rank00001.json").read_text())) == [
        "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt", "rng-rank00001.pt"]
    assert checkpoint_problems(d, ranks={1}) == []


def test_damaged_checkpoints_fall_back_to_the_newest_whole_one(tmp_path):
    results = fuzz(tmp_path, _synthetic_pair, range(SAMPLE))
    assert set(results) == set(KINDS)


def test_without_the_digests_a_flipped_bit_resumes_from_damaged_state(tmp_path, monkeypatch):
    # The planted bug: discovery without the digest check (torch opens an archive whose tensor
    # bytes changed). The fuzz run must fail on the flips that only the digests see.
    monkeypatch.setattr(ckpt, "_digest_problems", lambda *a, **k: [])
    with pytest.raises(AssertionError, match="resumed from checkpoint-000006"):
        fuzz(tmp_path, _synthetic_pair, range(SAMPLE))


# ---- real checkpoints (marker chaos) --------------------------------------------------------

@pytest.fixture(scope="module")
def real(tmp_path_factory):
    """Two-rank ZeRO-2 runs through the trainer's Worker over gloo: a reference of 6 steps with
    checkpoints at 3 and 6, and resumes from damaged copies of checkpoint 6."""
    from tests.parallel import sp_harness as H
    from tests.train.test_reshape import WORKER, job, write_shards

    root = tmp_path_factory.mktemp("fuzz-ckpt")
    shards = write_shards(root / "shards")
    ref = {"pipeline": "fuzz", "stage": "ref", "kind": "PretrainJob", "id": "t", "upstream": [],
           "storageRoot": str(root / "runs")}
    stage = root / "runs" / "fuzz" / "ref-t"
    plan = [{"name": "ref", "job": job(world=2), "ref": ref, "shard_dirs": shards, "until": 6,
             "save": [3, 6]}]
    work = root / "launch-ref"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps(plan))
    H.launch(2, ["--plan", str(work / "plan.json"), "--out", str(work / "out.json")],
             timeout=600, log_dir=work, worker=WORKER)
    reference = json.loads((work / "out.json").read_text())["ref"]
    return {"root": root, "stage": stage, "reference": reference, "shards": shards,
            "launch": H.launch, "worker": WORKER, "job": job}


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_a_thousand_damaged_real_checkpoints(real, tmp_path):
    def pair(template: Path) -> tuple[str, str]:
        shutil.copytree(real["stage"] / checkpoint_dir_name(3), template / checkpoint_dir_name(3))
        shutil.copytree(real["stage"] / checkpoint_dir_name(6), template / checkpoint_dir_name(6))
        return checkpoint_dir_name(3), checkpoint_dir_name(6)

    results = fuzz(tmp_path, pair, range(FULL))
    print(f"\ncheckpoints: {sum(results.values())} tried, {sum(results.values())} answered "
          f"(fell back to the newest whole checkpoint, the reason named), 0 lost; {dict(results)}")


@pytest.mark.chaos
@pytest.mark.timeout(3600)
def test_resumes_from_damaged_checkpoints_end_on_the_uninterrupted_losses(real):
    # Each damaged copy of the stage resumes with checkpoint 6 as the latest: the Worker must
    # refuse it, fall back to checkpoint 3 and replay steps 4-6 with the reference's losses.
    root, reference = real["root"], real["reference"]
    plan, rng = [], random.Random(7)
    targets = ["ds/mp_rank_00_model_states.pt", "ds/zero_pp_rank_1_mp_rank_00_optim_states.pt",
               TRAINER_STATE, rng_file(1)]
    for i, target in enumerate(targets):
        copy = root / "runs" / "fuzz" / f"c{i}-t"
        shutil.copytree(real["stage"], copy)
        path = copy / checkpoint_dir_name(6) / target
        data = bytearray(path.read_bytes())
        data[len(data) * 3 // 4] ^= 1 << rng.randrange(8)  # deep in the tensor data
        path.write_bytes(bytes(data))
        ref = {"pipeline": "fuzz", "stage": f"c{i}", "kind": "PretrainJob", "id": "t",
               "upstream": [], "storageRoot": str(root / "runs")}
        plan.append({"name": f"c{i}", "job": real["job"](world=2), "ref": ref,
                     "shard_dirs": real["shards"], "until": 6,
                     "resume": str(copy / checkpoint_dir_name(6))})
    work = root / "launch-resume"
    work.mkdir()
    (work / "plan.json").write_text(json.dumps(plan))
    real["launch"](2, ["--plan", str(work / "plan.json"), "--out", str(work / "out.json")],
                   timeout=900, log_dir=work, worker=real["worker"])
    out = json.loads((work / "out.json").read_text())
    log = (work / "rank0.log").read_text()
    for i, target in enumerate(targets):
        got = out[f"c{i}"]
        assert got["start_step"] == 3, (target, got)
        for step in ("4", "5", "6"):
            assert got["losses"][step] == pytest.approx(reference["losses"][step], rel=1e-6)
    assert log.count("resuming from checkpoint-000003") == len(targets)
