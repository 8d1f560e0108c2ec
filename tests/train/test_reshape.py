"""Resuming on another world size (issue 14, item 4): a checkpoint written by 2 workers (DP 2 or
SP 2) resumes on 1, one written by 1 resumes on 2, and a stage starts from an upstream stage that
ran on 2 workers, each within 1e-5 of the loss of a run that never changed its world size.

The reference. A stage's global batch (``globalBatchTokens / sequenceLength`` rows per step) and
its data order do not depend on the layout: every rank plans the same global rows of a step, in a
seeded order, and replica ``d`` of ``DP`` reads rows ``d, d + DP, ...`` of it (SP ranks of a
replica share its rows); the loss is the token mean over the whole global batch. So a run on any
layout follows the same global loss trajectory up to the order of float sums, and "uninterrupted"
is a run that used the resuming layout from step 1 to the end, with the same spec otherwise:

- 2 workers (DP 2, or SP 2) to step 3, then 1 worker to step 6  vs  1 worker for steps 1-6;
- 1 worker to step 3, then 2 workers (DP 2, or SP 2)            vs  those 2 workers for 1-6;
- stage 2 (weightsAndOptimizer, fresh schedule, 1 worker) from a stage 1 that ran on DP 2
  vs  the same stage 2 from the same stage 1 run on 1 worker.

Everything runs through the trainer's own Worker (reshape_worker.py: ``start``, ``train_one``,
``write_checkpoint``, ``_finalize``) over gloo, ZeRO-2 (the quickstart's) and ZeRO-3 (whose
universal load needs the repairs in prolong.train.reshape). Before the universal path existed,
every resume here failed: DeepSpeed refuses ZeRO shards of another world size.
"""

from __future__ import annotations

import json
import shutil
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from prolong.data.mixture import MixtureLoader
from prolong.data.shards import ShardWriter, TokenShards
from prolong.parallel.dims import ParallelDims
from prolong.spec import PretrainSpec
from prolong.train.checkpoints import TRAINER_STATE, Layout, checkpoint_dir_name, read_layout
from prolong.train.reshape import UNIVERSAL_TAG, ReshapeError, load_tag

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "parallel"))
import sp_harness as H  # the parity tests' launcher, shared

pytestmark = pytest.mark.slow

WORKER = Path(__file__).resolve().parent / "reshape_worker.py"
TINY = dict(numLayers=2, hiddenSize=64, numAttentionHeads=4, numKeyValueHeads=2,
            intermediateSize=128, vocabSize=256, tieWordEmbeddings=False)
SEQ, ROWS, STEPS, SAVE = 64, 4, 6, 3
TOLERANCE = 1e-5


def job(*, world: int, sp: int = 1, zero: int = 2, steps: int = STEPS,
        upstream: bool = False, init: str = "weightsAndOptimizer", reorder: bool = True) -> dict:
    model = {"architecture": TINY, "attention": "sdpa"}
    schedule = {"peakLR": 3e-3, "warmupSteps": 2, "decay": "cosine"}
    if upstream:
        model.update(fromStage="up", init=init)
        # A fresh schedule whose first LR (the peak: no warmup) differs from where the
        # upstream's ended (its floor), so that an inherited LR shows.
        schedule = {"peakLR": 2e-3, "warmupSteps": 0, "decay": "cosine"}
    streams = [{"domain": "text", "path": "text.jsonl", "format": "jsonl", "proportion": 0.6},
               {"domain": "long", "path": "long.jsonl", "format": "jsonl", "packing": "long",
                "proportion": 0.4}]
    return {"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "reshape"},
            "spec": {"model": model, "data": {"streams": streams, "seed": 3},
                     "sequenceLength": SEQ, "globalBatchTokens": SEQ * ROWS, "steps": steps,
                     "schedule": schedule,
                     "precision": "fp32",
                     "parallelism": {"sequenceParallel": sp, "zeroStage": zero,
                                     "reorderMicroBatches": reorder},
                     "checkpoint": {"everySteps": SAVE},
                     "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": world}}}


def write_shards(root: Path) -> dict[str, str]:
    rng = np.random.default_rng(0)
    text = ShardWriter(root / "text", dtype=np.uint16)
    for _ in range(60):
        text.add(rng.integers(0, 256, size=int(rng.integers(3, 90))))
    long = ShardWriter(root / "long", dtype=np.uint16)
    for _ in range(12):
        long.add(rng.integers(0, 256, size=SEQ))
    return {"text": str(text.close()), "long": str(long.close())}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reshape")
    shards = write_shards(root / "shards")

    def ref(name: str) -> dict:
        return {"pipeline": "reshape", "stage": name, "kind": "PretrainJob", "id": "t",
                "upstream": [], "storageRoot": str(root / "runs")}

    def checkpoint(name: str) -> str:
        return str(root / "runs" / "reshape" / f"{name}-t" / checkpoint_dir_name(SAVE))

    def task(name: str, spec: dict, *, stage: str | None = None, **more) -> dict:
        return {"name": name, "job": spec, "ref": ref(stage or name), "shard_dirs": shards,
                "until": STEPS, **more}

    one = [task("ref-z2", job(world=1), save=[SAVE]),
           task("ref-z3", job(world=1, zero=3), save=[SAVE]),
           task("up1", job(world=1, steps=SAVE), until=SAVE, save=[SAVE], finalize=True,
                state_at_end=str(root / "state-up1-end.pt"))]
    # SP = 1 before SP = 2 in one process: DeepSpeed keeps the mpu of the last engine built with
    # one in a module global, and an engine built without one (SP 1) would inherit it.
    two = [task("dp2-z2", job(world=2), save=[SAVE]),
           # The seeded deal instead of the lockstep placement: the same rows per step.
           task("dp2-z2-seeded", job(world=2, reorder=False), until=SAVE),
           task("dp2-z3", job(world=2, zero=3), until=SAVE, save=[SAVE]),
           task("up2", job(world=2, steps=SAVE), until=SAVE, save=[SAVE], finalize=True,
                state_at_end=str(root / "state-up2-end.pt")),
           task("final-z3", job(world=2, zero=3, steps=SAVE), until=SAVE, finalize=True,
                gathered_to=str(root / "final-z3-gathered.pt")),
           # 1 -> 2: the reference runs' stages, resumed on two workers.
           task("ref-z2>dp2", job(world=2), stage="ref-z2", resume=checkpoint("ref-z2")),
           task("sp2-z2", job(world=2, sp=2), until=SAVE, save=[SAVE]),
           task("sp2-z3", job(world=2, sp=2, zero=3), save=[SAVE]),
           # The plain restart under SP: the same layout, DeepSpeed's own shards.
           task("sp2-z3>sp2", job(world=2, sp=2, zero=3), stage="sp2-z3",
                resume=checkpoint("sp2-z3")),
           task("ref-z3>sp2", job(world=2, sp=2, zero=3), stage="ref-z3",
                resume=checkpoint("ref-z3")),
           # The same world size with another SP degree: DeepSpeed's own shards load as they
           # are (load_tag answers "ds"); SP 2 then DP 2, so the mpu note above still holds
           # for everything before it.
           task("sp2-z3>dp2", job(world=2, zero=3), stage="sp2-z3",
                resume=checkpoint("sp2-z3"))]
    back = [task(f"{c}>1", job(world=1, zero=int(c[-1])), stage=c, resume=checkpoint(c))
            for c in ("dp2-z2", "sp2-z2", "dp2-z3", "sp2-z3")]
    back += [task("dp2-z2>1 again", job(world=1), stage="dp2-z2", resume=checkpoint("dp2-z2"),
                  until=SAVE),
             task("down-from-up1", job(world=1, steps=SAVE, upstream=True), stage="down1",
                  until=SAVE, upstream_dir=str(Path(checkpoint("up1")).parent),
                  state_after_start=str(root / "state-down1-start.pt")),
             task("down-from-up2", job(world=1, steps=SAVE, upstream=True), stage="down2",
                  until=SAVE, upstream_dir=str(Path(checkpoint("up2")).parent),
                  state_after_start=str(root / "state-down2-start.pt")),
             # init: weights, the one start that reads the upstream weights (and no checkpoint).
             task("weights-from-up1", job(world=1, steps=SAVE, upstream=True, init="weights"),
                  stage="down4", until=1, upstream_dir=str(Path(checkpoint("up1")).parent)),
             # Refused: another ZeRO stage; shards that open but do not convert (made below).
             task("zero3-from-up2", job(world=1, zero=3, steps=SAVE, upstream=True),
                  stage="down3", upstream_dir=str(Path(checkpoint("up2")).parent),
                  expect_error=True),
             task("broken>1", job(world=1), stage="broken", resume=checkpoint("broken"),
                  expect_error=True)]
    results, logs = {}, {}
    for world, tasks in (("1", one), ("2", two), ("1b", back)):
        if world == "1b":  # a copy of a 2-worker checkpoint whose optimizer shard lost its state
            broken = Path(checkpoint("broken"))
            shutil.copytree(checkpoint("dp2-z2"), broken)
            shard = next((broken / "ds").glob("zero_pp_rank_1_*optim_states.pt"))
            torch.save({"not": "a ZeRO shard"}, shard)
        work = root / f"launch-{world}"
        work.mkdir()
        (work / "plan.json").write_text(json.dumps(tasks))
        H.launch(int(world[0]), ["--plan", str(work / "plan.json"), "--out",
                                 str(work / "out.json")],
                 timeout=300, log_dir=work, worker=WORKER)
        results.update(json.loads((work / "out.json").read_text()))
        logs[world] = (work / "rank0.log").read_text()
    return {"root": root, "results": results, "logs": logs, "checkpoint": checkpoint,
            "shards": shards, "final": lambda name: root / "runs" / "reshape" / f"{name}-t" / "final"}


def losses(result: dict, steps, key: str = "losses") -> list[float]:
    return [result[key][str(s)] for s in steps]


def grad_norms(result: dict, steps) -> list[float]:
    """Under Adam a wrong gradient scale barely moves the loss; the grad norm shows it."""
    return losses(result, steps, "grad_norms")


def worst_relative(got: list[float], want: list[float]) -> float:
    return max(abs(a - b) / abs(b) for a, b in zip(got, want, strict=True))


def worst(got: list[float], want: list[float]) -> float:
    return max(abs(a - b) for a, b in zip(got, want, strict=True))


@pytest.mark.parametrize("case", ["dp2-z2", "sp2-z2", "dp2-z3", "sp2-z3"])
def test_two_workers_resume_on_one(runs, case):
    results = runs["results"]
    reference = results[f"ref-z{case[-1]}"]
    resumed = results[f"{case}>1"]
    assert resumed["start_step"] == SAVE and resumed["universal"]
    after = range(SAVE + 1, STEPS + 1)
    err = worst(losses(resumed, after), losses(reference, after))
    print(f"{case} -> 1 worker: steps {SAVE + 1}-{STEPS} within {err:.1e} of the 1-worker run")
    assert err <= TOLERANCE, (losses(resumed, after), losses(reference, after))
    norm_err = worst_relative(grad_norms(resumed, after), grad_norms(reference, after))
    assert norm_err <= TOLERANCE, (grad_norms(resumed, after), grad_norms(reference, after))
    # The layout-independent trajectory the reference rests on: the 2-worker steps too.
    before = range(1, SAVE + 1)
    assert worst(losses(results[case], before), losses(reference, before)) <= TOLERANCE
    assert worst_relative(grad_norms(results[case], before),
                          grad_norms(reference, before)) <= TOLERANCE
    # The universal copy sits beside DeepSpeed's shards; no temporary directory is left.
    directory = Path(runs["checkpoint"](case))
    assert (directory / UNIVERSAL_TAG / "zero").is_dir()
    assert sorted(p.name for p in directory.iterdir() if p.name.startswith(".")) == []


@pytest.mark.parametrize("case,reference", [("ref-z2>dp2", "dp2-z2"), ("ref-z3>sp2", "sp2-z3")])
def test_one_worker_resumes_on_two(runs, case, reference):
    resumed, ref = runs["results"][case], runs["results"][reference]
    assert resumed["start_step"] == SAVE and resumed["universal"]
    after = range(SAVE + 1, STEPS + 1)
    err = worst(losses(resumed, after), losses(ref, after))
    print(f"{case}: steps {SAVE + 1}-{STEPS} within {err:.1e} of the uninterrupted {reference}")
    assert err <= TOLERANCE, (losses(resumed, after), losses(ref, after))
    norm_err = worst_relative(grad_norms(resumed, after), grad_norms(ref, after))
    assert norm_err <= TOLERANCE, (grad_norms(resumed, after), grad_norms(ref, after))


def test_same_world_size_with_another_sp_degree_resumes_natively(runs):
    """A ZeRO-3 checkpoint of SP 2 on 2 workers resumed on 2 workers without SP (DP 2): the
    same world, so DeepSpeed's shards load as they are, and the trajectory is the
    layout-independent one of the 1-worker run."""
    results = runs["results"]
    resumed, ref = results["sp2-z3>dp2"], results["ref-z3"]
    assert resumed["start_step"] == SAVE and not resumed["universal"]
    after = range(SAVE + 1, STEPS + 1)
    assert worst(losses(resumed, after), losses(ref, after)) <= TOLERANCE, (
        losses(resumed, after), losses(ref, after))
    assert worst_relative(grad_norms(resumed, after), grad_norms(ref, after)) <= TOLERANCE


def test_sp_resume_continues_the_uninterrupted_run(runs):
    """Stopped after step 3 of 6 under SP 2, ZeRO-3 (warmup 2 steps, then cosine) and resumed on
    the same layout through Worker.start: the scheduler resumes at step 3 with the LR the
    uninterrupted run had there (not warmup's 0), the loader at the rows of step 4 (not those
    of step 1), and steps 4-6 (rows, LR, loss, grad norm) are those of the run that never
    stopped. The scheduler is checked itself: one left at its start hides in step 4 (DeepSpeed
    restores the optimizer's LR with its state) and shows in the loss only at step 6, by 2e-4."""
    from prolong.train.schedule import lr_at

    results = runs["results"]
    resumed, ref = results["sp2-z3>sp2"], results["sp2-z3"]
    spec = PretrainSpec.model_validate(job(world=2, sp=2, zero=3)["spec"])
    assert spec.schedule.warmup_steps_for(spec.total_steps) == 2 < SAVE
    assert spec.schedule.decay == "cosine"
    assert resumed["start_step"] == SAVE and not resumed["universal"]
    after, before = range(SAVE + 1, STEPS + 1), range(1, SAVE + 1)
    # The scheduler right after start(): SAVE updates taken, the LR of update SAVE (0-based).
    want_lr = lr_at(SAVE, spec.schedule, spec.total_steps)
    sched = resumed["scheduler_after_start"]
    assert sched["last_epoch"] == ref["scheduler_steps"][str(SAVE + 1)] == SAVE, sched
    assert sched["lr"] == pytest.approx([want_lr] * len(sched["lr"]), rel=1e-12), (sched, want_lr)
    assert sched["optimizer_lr"] == pytest.approx(sched["lr"], rel=1e-12), sched
    assert ref["lrs"][str(SAVE + 1)] == pytest.approx(want_lr, rel=1e-12)
    assert want_lr not in (0.0, spec.schedule.peak_lr)  # a restart or a constant LR would show
    # Each step after the resume: the uninterrupted run's LR, rows, loss and grad norm.
    assert losses(resumed, after, "lrs") == pytest.approx(losses(ref, after, "lrs"), rel=1e-12)
    assert losses(resumed, after, "lrs") == pytest.approx(
        [lr_at(s - 1, spec.schedule, spec.total_steps) for s in after], rel=1e-12)
    assert losses(resumed, after, "scheduler_steps") == losses(ref, after, "scheduler_steps")
    assert losses(resumed, after, "rows") == losses(ref, after, "rows")
    assert not set(losses(resumed, after, "rows")) & set(losses(ref, before, "rows")), (
        "the resumed run read rows of steps before its checkpoint")
    err = worst(losses(resumed, after), losses(ref, after))
    print(f"SP 2 resumed at step {SAVE}: steps {SAVE + 1}-{STEPS} within {err:.1e} of the "
          f"uninterrupted run; LR {losses(resumed, after, 'lrs')} ({resumed['seconds']:.1f} s)")
    assert err <= TOLERANCE, (losses(resumed, after), losses(ref, after))
    norm_err = worst_relative(grad_norms(resumed, after), grad_norms(ref, after))
    assert norm_err <= TOLERANCE, (grad_norms(resumed, after), grad_norms(ref, after))


def test_a_stage_starts_from_an_upstream_of_another_world_size(runs):
    results = runs["results"]
    native, universal = results["down-from-up1"], results["down-from-up2"]
    assert not native["universal"] and universal["universal"]
    steps = range(1, SAVE + 1)
    err = worst(losses(universal, steps), losses(native, steps))
    print(f"stage 2 from a DP-2 stage 1: within {err:.1e} of stage 2 from a 1-worker stage 1")
    assert err <= TOLERANCE, (losses(universal, steps), losses(native, steps))
    assert worst_relative(grad_norms(universal, steps), grad_norms(native, steps)) <= TOLERANCE


@pytest.mark.parametrize("n", ["1", "2"])
def test_a_stage_inherits_its_upstreams_weights_and_moments_with_a_fresh_schedule(runs, n):
    """What ``init: weightsAndOptimizer`` promises, after ``start()`` and before the first step:
    the fp32 weights and both AdamW moments are the upstream's at its end (from a 1-worker
    upstream, and from a DP-2 one through the universal copy), the LR is the new schedule's
    first value, and the first loss is that of the trained weights, not of a fresh init."""
    from prolong.train.schedule import lr_at

    root, results = runs["root"], runs["results"]
    up = torch.load(root / f"state-up{n}-end.pt")
    down = torch.load(root / f"state-down{n}-start.pt")
    for key in ("weights", "exp_avg", "exp_avg_sq"):
        assert sorted(down[key]) == sorted(up[key])
        err, name = H.worst(down[key], up[key])
        assert err <= 1e-7, f"upstream {n}: {key} after start() differ by {err:.2e} ({name})"
    assert any(v.abs().max() > 0 for v in up["exp_avg_sq"].values())  # moments were trained
    spec = PretrainSpec.model_validate(job(world=1, steps=SAVE, upstream=True)["spec"])
    first = lr_at(0, spec.schedule, spec.total_steps)
    assert down["lr"] == pytest.approx([first] * len(down["lr"]), rel=1e-12), (down["lr"], first)
    assert down["scheduler_lr"] == pytest.approx([first] * len(down["lr"]), rel=1e-12)
    assert up["lr"][0] != pytest.approx(first)  # where the upstream's schedule ended differs
    # The downstream's step 1 reads the rows of the upstream's step 1 (same data, same seed),
    # where the fresh init's loss is known: from the trained weights it is clearly lower
    # (0.22 nats measured; the upstream's own last loss is on other rows).
    fresh = results[f"up{n}"]["losses"]["1"]
    got = results[f"down-from-up{n}"]["losses"]["1"]
    assert got < fresh - 0.05, (got, fresh)


def test_the_universal_copy_is_made_once(runs):
    again = runs["results"]["dp2-z2>1 again"]
    assert again["start_step"] == SAVE and again["universal"] and again["losses"] == {}
    log = runs["logs"]["1b"]
    assert log.count(f"converting {runs['checkpoint']('dp2-z2')} (written by 2 workers "
                     "(DP 2 x SP 1), ZeRO-2) to a universal checkpoint for 1 worker") == 1, log


def test_lockstep_placement_trains_like_the_seeded_deal(runs):
    """Through DeepSpeed on 2 DP ranks: rows dealt by cost (dp2-z2) and by the seeded deal
    (reorderMicroBatches false) move between ranks and micro-steps but not out of the step, so
    the gradient norms and the losses of steps 1-3 agree to 1e-6."""
    lockstep, seeded = runs["results"]["dp2-z2"], runs["results"]["dp2-z2-seeded"]
    steps = range(1, SAVE + 1)
    for key in ("losses", "grad_norms"):
        got, want = losses({"losses": lockstep[key]}, steps), losses({"losses": seeded[key]}, steps)
        assert worst(got, want) <= 1e-6, (key, got, want)
    shards = {d: TokenShards(p) for d, p in runs["shards"].items()}

    def placement(reorder: bool) -> list[list[Counter]]:
        spec = PretrainSpec.model_validate(job(world=2, reorder=reorder)["spec"])
        ranks = [MixtureLoader.from_spec(spec, shards, dims=ParallelDims(2), rank=r)
                 for r in range(2)]
        return [[Counter(tuple(row.input_ids.tolist()) for row in ld.next_rows()) for ld in ranks]
                for _ in steps]

    dealt, seeded_rows = placement(True), placement(False)
    assert dealt != seeded_rows  # rows did change ranks
    assert [a[0] + a[1] for a in dealt] == [b[0] + b[1] for b in seeded_rows]


def test_a_start_loads_its_weights_once(runs):
    """A resume and a weightsAndOptimizer start build the model without reading its weights and
    load only the checkpoint; init: weights reads the weights; a fresh start reads neither
    (counted by spies around the product's loaders, reshape_worker.load_spies)."""
    results = runs["results"]
    checkpoint_only = {"weights": 0, "checkpoint": 1}
    for name in ("ref-z2>dp2", "ref-z3>sp2", "dp2-z2>1", "sp2-z2>1", "dp2-z3>1", "sp2-z3>1",
                 "dp2-z2>1 again", "down-from-up1", "down-from-up2"):
        assert results[name]["loads"] == checkpoint_only, (name, results[name]["loads"])
    assert results["weights-from-up1"]["loads"] == {"weights": 1, "checkpoint": 0}
    for name in ("ref-z2", "ref-z3", "dp2-z3", "sp2-z3"):
        assert results[name]["loads"] == {"weights": 0, "checkpoint": 0}, name


def test_rows_each_rank_reads_after_the_change(runs):
    """Step 4 after the DP-2 checkpoint: the one worker reads every global row of the step, the
    two DP ranks had split them (rows j, j + 2, ...), and both SP ranks read all of them."""
    state = json.loads((Path(runs["checkpoint"]("dp2-z2")) / TRAINER_STATE).read_text())
    shards = {d: TokenShards(p) for d, p in runs["shards"].items()}

    def rows(world: int, sp: int, rank: int) -> Counter:
        spec = PretrainSpec.model_validate(job(world=world, sp=sp)["spec"])
        loader = MixtureLoader.from_spec(spec, shards, dims=ParallelDims(world, sp), rank=rank)
        loader.load_state_dict(state["loader"])
        return Counter(tuple(r.input_ids.tolist()) for r in loader.next_rows())

    one = rows(1, 1, 0)
    assert sum(one.values()) == ROWS
    assert rows(2, 1, 0) + rows(2, 1, 1) == one and rows(2, 1, 0) != one
    assert rows(2, 2, 0) == rows(2, 2, 1) == one


def test_layout_is_recorded_and_inferred_for_older_checkpoints(runs, tmp_path):
    for case, layout in (("dp2-z2", Layout(world=2, zero_stage=2, sp=1)),
                         ("sp2-z3", Layout(world=2, zero_stage=3, sp=2))):
        directory = Path(runs["checkpoint"](case))
        assert read_layout(directory) == layout
        # Written before layouts were recorded: its files tell the world and the ZeRO stage.
        old = tmp_path / case
        shutil.copytree(directory, old, ignore=shutil.ignore_patterns(UNIVERSAL_TAG))
        state = json.loads((old / TRAINER_STATE).read_text())
        del state["layout"]
        (old / TRAINER_STATE).write_text(json.dumps(state))
        assert read_layout(old) == Layout(world=2, zero_stage=layout.zero_stage)


def test_refusals_name_the_checkpoint_and_the_reason(runs):
    results, root = runs["results"], runs["root"]
    up2 = runs["checkpoint"]("up2")
    assert results["zero3-from-up2"]["error"] == (
        f"ReshapeError: {up2}: written with ZeRO-2, this run uses ZeRO-3; DeepSpeed converts a "
        "checkpoint to another world size but not to another ZeRO stage (run with zeroStage 2)")
    # Files that open but do not convert: no older checkpoint to fall back to, so the error
    # names the stage, the checkpoint and DeepSpeed's reason, on one line.
    error = results["broken>1"]["error"]
    assert error.startswith(f"RuntimeError: no usable checkpoint in {root}/runs/reshape/broken-t "
                            "(checkpoint-000003: its universal copy could not be made (")
    assert "\n" not in error, error
    assert "checkpoint checkpoint-000003 is unusable: its universal copy" in runs["logs"]["1b"]
    assert not (Path(runs["checkpoint"]("broken")) / UNIVERSAL_TAG).exists()
    assert not [p for p in Path(runs["checkpoint"]("broken")).iterdir() if p.name[0] == "."]


def test_impossible_conversions_are_one_line_naming_the_checkpoint():
    two, one = Layout(world=2, zero_stage=2, sp=1), Layout(world=1, zero_stage=2, sp=1)
    assert load_tag("/runs/p/s-1/checkpoint-000003", two, one) == UNIVERSAL_TAG
    assert load_tag("/runs/p/s-1/checkpoint-000003", two, Layout(2, 2, sp=2)) == "ds"
    assert load_tag("/x", Layout(2, 0, 1), Layout(1, 0, 1)) == "ds"  # ZeRO-0: one full file
    for saved, current, uri, reason in [
            (two, Layout(world=1, zero_stage=3, sp=1), "/runs/p/s-1/checkpoint-000003",
             "written with ZeRO-2, this run uses ZeRO-3"),
            (two, one, "s3://bucket/p/s-1/checkpoint-000003", "not an object store")]:
        with pytest.raises(ReshapeError) as err:
            load_tag(uri, saved, current)
        message = str(err.value)
        assert message.startswith(f"{uri}: ") and reason in message and "\n" not in message


def test_final_weights_under_zero3_load_and_equal_the_gathered_ones(runs):
    """_finalize under ZeRO-3 on 2 workers writes final/ one parameter at a time
    (prolong.model.save): it loads with from_pretrained and equals the fp32 weights DeepSpeed
    itself gathers (safe_get_full_fp32_param), not those of the gatherer final/ uses."""
    from transformers import AutoModelForCausalLM

    final = runs["final"]("final-z3")
    gathered = torch.load(runs["root"] / "final-z3-gathered.pt")
    model = AutoModelForCausalLM.from_pretrained(final, local_files_only=True)
    params = dict(model.named_parameters())
    assert sorted(params) == sorted(gathered)
    for name, value in gathered.items():
        assert torch.equal(params[name].detach(), value), name
    assert any(v.abs().max() > 0 for v in gathered.values())
