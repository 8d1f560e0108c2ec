"""End to end on a real local Ray cluster: Ray Train with 2 CPU workers, DeepSpeed, Ulysses SP=2,
the tiny Llama on the embedded corpus.

- an SP=2 stage learns (loss falls), writes its stage directory, and a second run of the same id
  does nothing;
- a run that dies while a checkpoint is being written, submitted again, resumes from the previous
  checkpoint and ends with exactly the losses and weights of an uninterrupted run;
- a run on 2 workers that dies, submitted again on 1 worker, resumes the same stage.
"""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
import yaml
from rich.console import Console
from safetensors.torch import load_file

from prolong.data.tokenizer import load_tokenizer, tokenizer_hash
from prolong.run.runner import run_file
from prolong.stage.directory import StageDir, read_metrics
from prolong.train.faults import FAULT_ENV
from tests.conftest import job_dict

pytestmark = [pytest.mark.slow, pytest.mark.ray]


@pytest.fixture(scope="module")
def ray_cluster():
    import ray

    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """One prepared corpus (tokenizer + shards) shared by the tests of this module."""
    return tmp_path_factory.mktemp("data")


def stage_spec(tmp: Path, data: Path, *, steps: int, every: int, sp: int, seq: int,
               max_failures: int = 0, workers: int = 2) -> Path:
    # The quickstart's base spec: random weights and a trained tokenizer, so that "learns" means
    # a clear drop (stage 1 now continues the shipped, already trained base).
    job = job_dict("quickstart/base.yaml")
    spec = job["spec"]
    spec["sequenceLength"] = seq
    spec["globalBatchTokens"] = seq * 2
    spec["steps"] = steps
    spec["schedule"] = {**spec["schedule"], "warmupSteps": None, "warmupRatio": 0.1}
    spec["checkpoint"] = {"everySteps": every, "keep": 2}
    spec["parallelism"]["sequenceParallel"] = sp
    spec["cluster"]["maxFailures"] = max_failures
    spec["cluster"]["workersPerNode"] = workers
    spec["storage"] = {"root": str(tmp / "runs")}
    spec["data"]["preparedDir"] = str(data)
    tmp.mkdir(parents=True, exist_ok=True)
    path = tmp / "job.yaml"
    path.write_text(yaml.safe_dump(job, sort_keys=False))
    return path


def only_stage(path: Path) -> StageDir:
    runs = Path(yaml.safe_load(path.read_text())["spec"]["storage"]["root"])
    (directory,) = (runs / "quickstart-base").iterdir()
    return StageDir(str(directory))


def test_sp2_stage_learns_and_completes(ray_cluster, prepared, tmp_path):
    path = stage_spec(tmp_path, prepared, steps=30, every=10, sp=2, seq=512)
    console = Console(file=io.StringIO(), width=100)
    run_file(path, progress=False, console=console)
    stage = only_stage(path)
    # A quiet console: the stage line, its result line and the summary; what the workers print
    # (Ray Train's per-report lines among it) is in the stage's logs/, one file per rank.
    text = console.file.getvalue()
    assert len(text.splitlines()) <= 12, text
    assert "Reporting training result" not in text
    assert "stage pretrain complete in" in text and "run summary" in text, text
    logs = sorted(p.name for p in (Path(stage.uri) / "logs").iterdir())
    assert logs == ["worker-rank000.log", "worker-rank001.log"]
    assert "Reporting training result" in (Path(stage.uri) / "logs" / logs[0]).read_text()
    # The stage's own report, written before the manifest vouches for it.
    assert "| steps | 30 |" in (Path(stage.uri) / "report.md").read_text()
    assert (Path(stage.uri) / "curves.png").read_bytes().startswith(b"\x89PNG")
    assert stage.is_complete()
    losses = [r["loss"] for r in read_metrics(stage)]
    assert len(losses) == 30
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5, losses
    manifest = stage.read_manifest()
    assert manifest.steps == 30 and manifest.versions["deepspeed"]
    assert (Path(stage.uri) / "checkpoint-000030").is_dir()
    assert {p.name for p in (Path(stage.uri) / "final").iterdir()} >= {
        "config.json", "model.safetensors", "tokenizer.json"}
    # The manifest names final/'s tokenizer by content (a shipped copy is checked against it).
    assert manifest.tokenizer_hash == tokenizer_hash(load_tokenizer(Path(stage.uri) / "final"))
    # Same id again: nothing runs, nothing changes.
    before = (Path(stage.uri) / "metrics.jsonl").read_text()
    run_file(path, progress=False)
    assert (Path(stage.uri) / "metrics.jsonl").read_text() == before


def _final_weights(stage: StageDir) -> dict[str, torch.Tensor]:
    return load_file(str(Path(stage.uri) / "final" / "model.safetensors"))


def _losses_by_step(stage: StageDir) -> dict[int, float]:
    # A resumed run appends the steps it redoes; the last record of each step wins.
    return {r["step"]: r["loss"] for r in read_metrics(stage)}


@pytest.fixture(scope="module")
def uninterrupted(ray_cluster, prepared, tmp_path_factory) -> StageDir:
    path = stage_spec(tmp_path_factory.mktemp("reference"), prepared, steps=8, every=3, sp=1,
                      seq=256)
    run_file(path, progress=False)
    return only_stage(path)


def test_step_metrics_count_the_data_wait_and_the_saves(uninterrupted):
    """Each row of the train loop's metrics.jsonl: the data wait, the save on exactly the
    checkpointed steps (3, 6 and the last), and throughput over the wall time they add up to."""
    records = read_metrics(uninterrupted)
    assert [r["step"] for r in records] == list(range(1, 9))
    for r in records:
        assert r["data_s"] > 0 and r["wall_s"] >= r["data_s"] + r["seconds"] + r["save_s"]
        assert (r["save_s"] > 0) == (r["step"] in (3, 6, 8)), r
        assert r["tokens_per_s"] == pytest.approx(r["tokens"] / r["wall_s"])


def test_crash_while_checkpointing_resumes_like_an_uninterrupted_run(uninterrupted, prepared,
                                                                    tmp_path, monkeypatch):
    # Rank 0 dies while checkpoint 6 is being written (its shards on disk, not yet reported), and
    # the run fails (maxFailures 0). Submitting the same stage again (what the operator's retry
    # or a GitOps re-sync does) must resume from checkpoint 3, the last one registered, and end
    # exactly where an uninterrupted run does: "resume equals uninterrupted" and "a crash
    # mid-save keeps the previous checkpoint" in one.
    fault = "save:6"
    monkeypatch.setenv(FAULT_ENV, fault)
    faulty = stage_spec(tmp_path / "faulty", prepared, steps=8, every=3, sp=1, seq=256,
                        max_failures=0)
    with pytest.raises(Exception, match="injected fault"):
        run_file(faulty, progress=False)
    assert not only_stage(faulty).is_complete()
    run_file(faulty, progress=False)

    ref_stage, stage = uninterrupted, only_stage(faulty)
    fired = json.loads((Path(stage.uri) / ".fault-fired").read_text())
    assert f"{fired['point']}:{fired['step']}" == fault
    # Resumed from checkpoint 3: steps 4-6 ran twice, and their replayed rows replaced the first
    # ones, so the log itself holds each step once.
    raw = (Path(stage.uri) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw] == list(range(1, 9))
    expected, got = _losses_by_step(ref_stage), _losses_by_step(stage)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    ref_w, w = _final_weights(ref_stage), _final_weights(stage)
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_a_corrupt_latest_checkpoint_resumes_from_the_previous_one(uninterrupted, prepared,
                                                                   tmp_path, monkeypatch):
    # The run dies after step 7, with checkpoints 3 and 6 registered; then checkpoint 6 is
    # damaged (a truncated optimizer shard, as a full disk would leave it). Submitted again, the
    # stage must report it, resume from checkpoint 3 and still end where an uninterrupted run
    # ends; the checkpoint it writes at step 6 must not reuse the broken one's name.
    monkeypatch.setenv(FAULT_ENV, "step:7")
    path = stage_spec(tmp_path / "corrupt", prepared, steps=8, every=3, sp=1, seq=256,
                      max_failures=0)
    with pytest.raises(Exception, match="injected fault"):
        run_file(path, progress=False)
    stage = only_stage(path)
    shard = next((Path(stage.uri) / "checkpoint-000006" / "ds").glob("*optim_states.pt"))
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    run_file(path, progress=False)

    assert stage.is_complete()
    log = (Path(stage.uri) / "logs" / "worker-rank000.log").read_text()
    assert "checkpoint checkpoint-000006 is unusable" in log and "cannot be read" in log
    assert "resuming from checkpoint-000003" in log
    raw = (Path(stage.uri) / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in raw] == list(range(1, 9))
    expected, got = _losses_by_step(uninterrupted), _losses_by_step(stage)
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-6), step
    assert (Path(stage.uri) / "checkpoint-000006-from000003").is_dir()
    assert stage.read_manifest().final_checkpoint.endswith("checkpoint-000008-from000003")
    ref_w, w = _final_weights(uninterrupted), _final_weights(stage)
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor, rtol=1e-6, atol=1e-7, msg=name)


def test_a_stage_checkpointed_on_two_workers_resumes_on_one(uninterrupted, prepared, tmp_path,
                                                             monkeypatch):
    # The 2-worker run dies after step 7 (checkpoints 3 and 6 registered). Submitted again with
    # one worker per node (a node lost), it is the same stage (the layout is not part of the
    # id), so it resumes from checkpoint 6 through DeepSpeed's universal copy and ends where the
    # uninterrupted run ends. That run used 2 workers: the global batch and data order do not
    # depend on the layout, so neither does the loss trajectory (tests/train/test_reshape.py
    # holds it to a 1-worker run as well).
    monkeypatch.setenv(FAULT_ENV, "step:7")
    path = stage_spec(tmp_path / "shrink", prepared, steps=8, every=3, sp=1, seq=256)
    with pytest.raises(Exception, match="injected fault"):
        run_file(path, progress=False)
    stage = only_stage(path)
    stage_spec(tmp_path / "shrink", prepared, steps=8, every=3, sp=1, seq=256, workers=1)
    run_file(path, progress=False)

    assert only_stage(path).uri == stage.uri and stage.is_complete()
    logs = sorted(p.name for p in (Path(stage.uri) / "logs").iterdir())
    log = (Path(stage.uri) / "logs" / "worker-rank000.log").read_text()
    assert logs == ["worker-rank000.log", "worker-rank001.log"]  # the 2-worker run's
    assert "to a universal checkpoint for 1 worker (DP 1 x SP 1), ZeRO-2" in log, log[-3000:]
    assert (Path(stage.uri) / "checkpoint-000006" / "ds_universal" / "zero").is_dir()
    expected, got = _losses_by_step(uninterrupted), _losses_by_step(stage)
    assert got.keys() == expected.keys()
    for step in expected:
        assert got[step] == pytest.approx(expected[step], abs=1e-5), step
    ref_w, w = _final_weights(uninterrupted), _final_weights(stage)
    for name, tensor in ref_w.items():
        torch.testing.assert_close(w[name], tensor, rtol=1e-4, atol=1e-6, msg=name)
