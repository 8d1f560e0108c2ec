"""An EvalJob whose model.source is a hub id loads the model and its tokenizer from the staged
copy (model.stagedPath), never from the hub; not staged, it is refused before any model loads.
Staged here by the product's own ``stage()`` from a tiny model saved locally."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from prolong.eval.job import model_location, run_eval_stage, shard_config
from prolong.model.staging import Staging, StagingError, stage
from prolong.spec import EvalJob
from prolong.stage.identity import standalone_stage
from tests.eval.test_end_to_end import tiny_model  # noqa: F401 - the fixture

HUB_ID = "org/tiny-instruct"


def eval_job(root: Path, staged: Path, tokenizer: dict | None = None) -> EvalJob:
    return EvalJob.model_validate({
        "apiVersion": "prolong.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": "staged"},
        "spec": {"model": {"source": HUB_ID, "stagedPath": str(staged), "allowHub": True},
                 "tokenizer": tokenizer or {}, "tasks": ["json_kv"], "lengths": [512],
                 "samples": 2, "sizing": "fill", "seed": 1,
                 "generation": {"backend": "hf", "batchSize": 2, "maxNewTokens": 3},
                 "storage": {"root": str(root)},
                 "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": 1}}})


def test_eval_loads_the_staged_model_and_tokenizer(tmp_path, tiny_model,  # noqa: F811
                                                   corpus_cache):
    root = tmp_path / "runs"
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpora").symlink_to(corpus_cache)  # reuse the built essay corpus
    staged = tmp_path / "storage" / "models" / "tiny"
    job = eval_job(root, staged)
    ref = standalone_stage(job)
    with pytest.raises(StagingError, match=rf"^model.stagedPath: {staged} is not staged"):
        run_eval_stage(job, ref, None, use_ray=False, log=lambda _m: None)
    assert not Path(ref.directory).exists()  # refused before any model or sample

    stage(Staging("model", "model.source", str(tiny_model), str(staged), False))
    where = model_location(job, None)
    assert where == str(staged)
    assert shard_config(job, where)["tokenizer"] == str(staged)  # the staged copy holds it
    run_eval_stage(job, ref, None, use_ray=False, log=lambda _m: None)
    records = [json.loads(line) for line in
               (Path(ref.directory) / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2 and all(r["task"] == "json_kv" for r in records)

    # A tokenizer of the same hub id loads from the model's staged copy as well.
    same = eval_job(root, staged, {"source": HUB_ID})
    assert shard_config(same, model_location(same, None))["tokenizer"] == str(staged)
