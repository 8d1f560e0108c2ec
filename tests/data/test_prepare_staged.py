"""Data preparation reads a hub-named tokenizer from its staged copy, never from the hub: its own
``data.tokenizer.stagedPath``, or the model's staged directory when the tokenizer is the model's.
Staged here by the product's own ``stage()`` from a locally trained tokenizer."""

from __future__ import annotations

import json
import random

import pytest
import yaml

from prolong.data import tokenizer as tokmod
from prolong.data.errors import DataError
from prolong.data.prepare import open_shards, prepare_file, stage_tokenizer
from prolong.model.staging import Staging, stage
from prolong.specfile import load
from tests.data.test_prepare import make_tokenizer, words, write_jsonl

HUB_ID = "org/some-tokenizer"


def write_job(tmp_path, *, model: dict, tokenizer: dict):
    spec = {"model": {"architecture": {"preset": "tiny"}, **model}, "sequenceLength": 256,
            "globalBatchTokens": 512, "steps": 1, "precision": "fp32",
            "data": {"streams": [{"domain": "web", "path": str(tmp_path / "d.jsonl"),
                                  "format": "jsonl", "proportion": 1.0}],
                     "tokenizer": tokenizer, "preparedDir": str(tmp_path / "prepared")},
            "schedule": {"peakLR": 1e-3}, "cluster": {"device": "cpu", "workersPerNode": 1}}
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob",
                                    "metadata": {"name": "job"}, "spec": spec}))
    return path


@pytest.mark.parametrize("whose", ["its own stagedPath", "the model's stagedPath"])
def test_a_hub_tokenizer_is_read_from_its_staged_copy(tmp_path, whose):
    staged = tmp_path / "storage" / "staged"
    if whose == "its own stagedPath":
        model, tokenizer = {}, {"source": HUB_ID, "stagedPath": str(staged), "allowHub": True}
        field = "data.tokenizer"
    else:
        model, tokenizer = {"source": HUB_ID, "stagedPath": str(staged), "allowHub": True}, {}
        field = "model"
    rng = random.Random(7)
    texts = [words(rng, rng.randint(3, 40)) for _ in range(60)]
    write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])
    job = write_job(tmp_path, model=model, tokenizer=tokenizer)

    # Not staged yet: refused on one line, nothing asked of the hub.
    with pytest.raises(DataError, match=rf"job: {field}.stagedPath: {staged} is not staged "
                                        r"\(run `prolongctl model stage FILE` first\)"):
        prepare_file(str(job), workers=1, progress=False)

    source = make_tokenizer(tmp_path / "local-tokenizer", seed=4)
    stage(Staging("tokenizer", f"{field}.source", str(source), str(staged), False))
    prepare_file(str(job), workers=1, progress=False)

    tok = tokmod.load_tokenizer(staged)
    loaded = load(job)
    shards = open_shards(loaded.jobs["job"], loaded)["web"]
    want = [ids for t in texts if (ids := tok(t, add_special_tokens=False)["input_ids"])]
    assert [shards.doc(i).tolist() for i in range(len(shards))] == want
    manifest = json.loads((tmp_path / "prepared" / "manifests" / "job.json").read_text())
    assert manifest["tokenizer"] == {"identity": f"source:{HUB_ID}", "location": str(staged),
                                     "hash": tokmod.tokenizer_hash(tok),
                                     "vocab_size": tokmod.vocab_size(tok)}
    # The tokenizer saved beside the stage's final weights is the staged one too.
    assert tokmod.tokenizer_hash(stage_tokenizer(loaded.jobs["job"], loaded)) == \
        tokmod.tokenizer_hash(tok)
