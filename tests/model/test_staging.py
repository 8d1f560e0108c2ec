"""Model and tokenizer staging: `prolongctl model stage FILE` copies a local source to storage once
(atomically, with its marker), workers load from the staged copy, and the hub, the token and a
missing copy are refused on one line with exit 2. Nothing here talks to the hub: the hub cases
stop before any download."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.k8s.rayjob import hub_token_env, render_standalone
from prolong.model import staging as S
from prolong.model.build import build_model
from prolong.spec import ArchitectureSpec, ModelSpec, PretrainJob
from prolong.stage.identity import stage_id

MICRO = dict(num_layers=2, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=48, vocab_size=300, tie_word_embeddings=False)
CAMEL = ArchitectureSpec(**MICRO).model_dump(by_alias=True, exclude={"preset"})


def job_dict(model: dict, tokenizer: dict | None = None) -> dict:
    return {"apiVersion": "prolong.dev/v1alpha1", "kind": "PretrainJob",
            "metadata": {"name": "staging"},
            "spec": {"model": {"architecture": CAMEL, "attention": "sdpa", **model},
                     "data": {"tokenizer": tokenizer or {},
                              "streams": [{"domain": "d", "path": "x.jsonl", "format": "jsonl",
                                           "proportion": 1.0}]},
                     "sequenceLength": 256, "globalBatchTokens": 512, "steps": 1,
                     "schedule": {"peakLR": 1e-3, "warmupSteps": 0, "decay": "constant"},
                     "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": 1}}}


def write_job(path: Path, model: dict, tokenizer: dict | None = None) -> Path:
    path.write_text(yaml.safe_dump(job_dict(model, tokenizer)))
    return path


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    """A locally saved micro model with its tokenizer: the "source" to stage."""
    from prolong.data.tokenizer import train_bpe

    root = tmp_path_factory.mktemp("source")
    build_model(ModelSpec(architecture=ArchitectureSpec(**MICRO)), seed=3).save_pretrained(
        root / "model")
    words = [f"word{i} token{i % 7} staged{i % 13}" for i in range(400)]
    train_bpe(words, MICRO["vocab_size"], root / "tokenizer")  # it replaces its directory
    for f in (root / "tokenizer").iterdir():
        shutil.copy(f, root / "model")
    return root / "model"


def run(*args: str):
    return CliRunner().invoke(app, list(args))


def test_stage_once_then_load_from_the_staged_copy(source, tmp_path):
    target = tmp_path / "storage" / "models" / "micro"
    spec_file = write_job(tmp_path / "job.yaml", {"source": str(source),
                                                  "stagedPath": str(target)})
    first = run("model", "stage", str(spec_file))
    assert first.exit_code == 0, first.output
    assert f"model {source} -> {target}" in first.output
    marker = json.loads((target / S.STAGED).read_text())
    assert marker["what"] == "model" and marker["source"] == str(source)
    assert sorted(p.name for p in target.parent.iterdir()) == ["micro"]  # no .partial left
    again = run("model", "stage", str(spec_file))
    assert again.exit_code == 0 and "(already staged)" in again.output

    # The worker's path: the staged directory, loaded offline; the same weights as the source.
    spec = PretrainJob.model_validate(job_dict({"source": "/nonexistent/elsewhere",
                                                "stagedPath": str(target)})).spec
    where = S.model_load_dir(spec.model)
    assert where == str(target)
    loaded = build_model(spec.model, source=where, local_files_only=True)
    original = build_model(spec.model, source=str(source), local_files_only=True)
    for (name, a), (_, b) in zip(loaded.named_parameters(), original.named_parameters(),
                                 strict=True):
        assert torch.equal(a, b), name
    from prolong.data.tokenizer import load_tokenizer

    assert load_tokenizer(where).encode("word3 token3") == load_tokenizer(source).encode(
        "word3 token3")


def test_a_tokenizer_with_its_own_source_is_staged_beside(source, tmp_path):
    spec_file = write_job(tmp_path / "job.yaml",
                          {"source": str(source), "stagedPath": str(tmp_path / "m")},
                          {"source": str(source), "stagedPath": str(tmp_path / "t")})
    result = run("model", "stage", str(spec_file))
    assert result.exit_code == 0, result.output
    assert "tokenizer" in result.output and S.is_staged(str(tmp_path / "t"))


def test_staging_does_not_change_the_stage_id(source):
    plain = PretrainJob.model_validate(job_dict({"source": str(source)}))
    staged = PretrainJob.model_validate(job_dict(
        {"source": str(source), "stagedPath": "s3://bucket/models/micro", "allowHub": True,
         "hubTokenSecret": "hf-token"}, {"stagedPath": "gs://b/tok", "allowHub": True}))
    assert stage_id(plain) == stage_id(staged)


@pytest.mark.parametrize(("model", "message"), [
    ({"source": "org/some-model", "stagedPath": "STAGE"},
     "model.source: org/some-model is not a local directory and the hub is not allowed "
     "(set model.allowHub: true to download it)"),
    ({"source": "meta-llama/Meta-Llama-3-8B-Instruct", "stagedPath": "STAGE", "allowHub": True},
     "model.source: meta-llama/Meta-Llama-3-8B-Instruct is gated and HF_TOKEN is not set (in "
     "the cluster it comes from model.hubTokenSecret)"),
    ({"source": "SOURCE"},
     "model.stagedPath: no stage sets it, so there is nothing to stage"),
])
def test_refusals_are_one_line_with_exit_2(source, tmp_path, monkeypatch, model, message):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    model = {k: (str(tmp_path / "staged") if v == "STAGE" else str(source) if v == "SOURCE"
                 else v) for k, v in model.items()}
    spec_file = write_job(tmp_path / "job.yaml", model)
    result = run("model", "stage", str(spec_file))
    assert result.exit_code == 2, result.output
    assert result.output.strip() == f"{spec_file}: {message}"
    assert not (tmp_path / "staged").exists()  # refused before any copy


def test_workers_refuse_a_missing_staging_and_an_unstaged_hub_id(tmp_path):
    missing = ModelSpec(source="org/m", stagedPath=str(tmp_path / "never-staged"))
    with pytest.raises(S.StagingError, match=r"^model.stagedPath: .*never-staged is not staged "
                                             r"\(run `prolongctl model stage FILE` first\)$"):
        S.model_load_dir(missing)
    (tmp_path / "half").mkdir()  # files but no marker: a copy that did not finish
    (tmp_path / "half" / "config.json").write_text("{}")
    with pytest.raises(S.StagingError, match="half is not staged"):
        S.model_load_dir(ModelSpec(source="org/m", stagedPath=str(tmp_path / "half")))
    with pytest.raises(S.StagingError, match=r"^model.source: org/m is not a local directory "
                                             "and workers do not download"):
        S.model_load_dir(ModelSpec(source="org/m", allowHub=True))
    assert S.model_load_dir(ModelSpec(architecture=ArchitectureSpec(**MICRO))) is None


def test_the_token_secret_is_for_the_staging_step_and_reaches_no_ray_pod(source):
    """The Ray pods never download (they load stagedPath), so HF_TOKEN is not theirs: only the
    staging Job's container gets hub_token_env."""
    job = PretrainJob.model_validate(job_dict({"source": str(source), "stagedPath": "/s/m",
                                               "hubTokenSecret": "hf-token"}))
    want = {"name": S.TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": "hf-token",
                                                                 "key": S.TOKEN_SECRET_KEY}}}
    assert hub_token_env(job) == [want]
    rayjob = next(o for o in render_standalone(job) if o["kind"] == "RayJob")
    cluster = rayjob["spec"]["rayClusterSpec"]
    pods = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in
                                                      cluster["workerGroupSpecs"]]
    for pod in pods:
        for container in pod["spec"]["containers"]:
            assert S.TOKEN_ENV not in {e["name"] for e in container.get("env", [])}
            assert all(S.TOKEN_ENV not in str(f) and "hf-token" not in str(f)
                       for f in container.get("envFrom", []))
    assert "hf-token" not in str(rayjob)
    no_secret = PretrainJob.model_validate(job_dict({"source": str(source)}))
    assert hub_token_env(no_secret) == []


def test_a_tokenizer_only_copy_is_replaced_by_the_model_and_another_source_refused(source,
                                                                                     tmp_path):
    """Stage 2's tokenizer shares stage 1's model directory (jobs/prolong-8b): staged alone
    first, it must not pass for the model; a copy of another source is never reused."""
    target = str(tmp_path / "shared")
    assert S.stage(S.Staging("tokenizer", "data.tokenizer.source", str(source), target, False))
    assert S.staged_marker(target)["what"] == "tokenizer"
    model = S.Staging("model", "model.source", str(source), target, False)
    assert S.stage(model)  # copied over the tokenizer-only directory
    assert S.staged_marker(target)["what"] == "model" and (tmp_path / "shared" /
                                                            "model.safetensors").is_file()
    assert not S.stage(model)
    assert not S.stage(S.Staging("tokenizer", "data.tokenizer.source", str(source), target,
                                 False))  # the model's copy holds the tokenizer
    other = tmp_path / "other"
    shutil.copytree(source, other)
    with pytest.raises(S.StagingError, match=rf"^model.source: {target} holds a copy of "
                                             rf"{source}, not {other} \(pass --force"):
        S.stage(S.Staging("model", "model.source", str(other), target, False))
    assert S.stage(S.Staging("model", "model.source", str(other), target, False), force=True)


def shipped_copy(source: Path, tmp_path: Path, shipped_id: str = "0badc0de") -> Path:
    """``source`` as ``prolong.run.ship`` leaves a final/: with its shipped.json."""
    final = tmp_path / "shipped" / "final"
    shutil.copytree(source, final)
    (final / S.SHIPPED).write_text(json.dumps({"pipeline": "demo-base", "stage": "pretrain",
                                               "id": shipped_id}))
    return final


def test_a_shipped_model_is_loaded_only_under_its_revision(source, tmp_path):
    # The stage id hashes the spec, which holds the directory's path, not its weights: without
    # the revision, re-shipping the base would leave every stage made from the old one "complete".
    final = shipped_copy(source, tmp_path)
    with pytest.raises(S.StagingError, match=r"^model.revision: .*final holds the weights of run "
                                             r"demo-base/pretrain-0badc0de and model.revision is "
                                             r"not set; set it to '0badc0de'"):
        S.model_location(ModelSpec(source=str(final)))
    with pytest.raises(S.StagingError, match=r"model\.revision is 'feedface'"):
        S.model_location(ModelSpec(source=str(final), revision="feedface"))
    assert S.model_location(ModelSpec(source=str(final), revision="0badc0de")) == str(final)
    # A plain local directory carries no version: any revision is a label.
    assert S.model_location(ModelSpec(source=str(source), revision="v1")) == str(source)
    # The revision is part of the stage's id: new weights, a new run.
    ids = {stage_id(PretrainJob.model_validate(job_dict({"source": str(final), **r})))
           for r in ({}, {"revision": "0badc0de"}, {"revision": "feedface"})}
    assert len(ids) == 3


def test_staging_a_shipped_model_checks_its_revision_and_records_it(source, tmp_path):
    final = shipped_copy(source, tmp_path)
    target = tmp_path / "staged"
    spec_file = write_job(tmp_path / "job.yaml", {"source": str(final), "stagedPath": str(target)})
    result = run("model", "stage", str(spec_file))
    assert result.exit_code == 2 and "model.revision is not set" in result.output
    assert not target.exists()
    spec_file = write_job(tmp_path / "job.yaml", {"source": str(final), "stagedPath": str(target),
                                                  "revision": "0badc0de"})
    assert run("model", "stage", str(spec_file)).exit_code == 0
    assert json.loads((target / S.STAGED).read_text())["revision"] == "0badc0de"
    # The copy is of that revision: a spec naming another one is refused, not handed the old copy.
    (final / S.SHIPPED).write_text(json.dumps({"pipeline": "demo-base", "stage": "pretrain",
                                               "id": "feedface"}))
    spec_file = write_job(tmp_path / "job.yaml", {"source": str(final), "stagedPath": str(target),
                                                  "revision": "feedface"})
    result = run("model", "stage", str(spec_file))
    assert result.exit_code == 2, result.output
    assert "holds revision '0badc0de'" in result.output
