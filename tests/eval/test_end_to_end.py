"""A tiny random Llama evaluated end to end on CPU: the stage directory gets every output, the
report command compares two runs, and `prolongctl run` runs an EvalJob on Ray workers."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import yaml
from typer.testing import CliRunner

from prolong.cli import app
from prolong.eval.job import run_eval_stage
from prolong.spec import ArchitectureSpec, EvalJob
from prolong.stage.directory import StageDir
from prolong.stage.identity import standalone_stage

TASKS = ["json_kv", "ruler_mk_needle", "ruler_mk_uuid", "ruler_mv", "nq", "msmarco", "banking77",
         "narrativeqa", "multi_lexsum"]


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory, tokenizer, tokenizer_dir) -> Path:
    """A random tiny Llama (prolong.model.build's config) saved with the test tokenizer, the way a
    stage's final/ looks."""
    from transformers import LlamaForCausalLM

    from prolong.model.build import llama_config

    torch.manual_seed(0)
    arch = ArchitectureSpec(preset="tiny", vocab_size=len(tokenizer))
    model = LlamaForCausalLM(llama_config(arch, max_position_embeddings=4096))
    out = tmp_path_factory.mktemp("upstream") / "sft-0000" / "final"
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out


def eval_job(root: Path, helmet_dir: Path, model: Path | None = None, *, seed: int = 1,
             workers: int = 1, name: str = "tiny-eval") -> dict:
    spec = {"tasks": TASKS, "lengths": [512, 1024], "samples": 2, "iclSamples": 2,
            "dataDir": str(helmet_dir), "seed": seed, "sizing": "fill",  # below HELMET's lengths
            "generation": {"backend": "hf", "batchSize": 2, "maxNewTokens": 3},
            "storage": {"root": str(root)},
            "cluster": {"device": "cpu", "nodes": 1, "workersPerNode": workers}}
    spec["model"] = {"source": str(model)} if model is not None else {"fromStage": "sft"}
    return {"apiVersion": "prolong.dev/v1alpha1", "kind": "EvalJob", "metadata": {"name": name},
            "spec": spec}


@pytest.fixture(scope="module")
def two_runs(tmp_path_factory, helmet_dir, tiny_model, corpus_cache):
    root = tmp_path_factory.mktemp("runs")
    (root / "data").mkdir()
    (root / "data" / "corpora").symlink_to(corpus_cache)  # reuse the built essay corpus
    dirs = []
    for seed, tasks in ((1, TASKS), (2, ["json_kv", "nq"])):  # the second: a cheaper, other run
        spec = eval_job(root, helmet_dir, seed=seed)
        spec["spec"]["tasks"] = tasks
        job = EvalJob.model_validate(spec)
        ref = standalone_stage(job)
        upstream = str(tiny_model.parent)  # fromStage: the upstream stage's final/
        run_eval_stage(job, ref, upstream, use_ray=False, log=lambda _m: None)
        dirs.append(Path(ref.directory))
    return dirs


def test_tiny_model_eval_writes_every_output(two_runs, tiny_model):
    d = two_runs[0]
    for name in ("samples.jsonl", "results.json", "report.md", "scores.png", "manifest.json",
                 "COMPLETE"):
        assert (d / name).is_file(), name
    records = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert len(records) == len(TASKS) * 2 * 2
    for r in records:
        assert {"task", "length", "depth", "prompt_hash", "output", "score"} <= set(r)
        assert 0.0 <= r["score"] <= 100.0 and r["prompt_tokens"] <= r["length"]
    assert {r["depth"] for r in records if r["task"] == "json_kv"} == {0.0, 0.2}
    results = json.loads((d / "results.json").read_text())
    assert set(results["categories"]) == {"recall", "rag", "rerank", "icl", "longqa", "summ"}
    assert results["lengths"] == [512, 1024] and results["samples"] == len(records)
    assert results["model"] == str(tiny_model)
    report = (d / "report.md").read_text()
    assert "| Recall |" in report and "| **average** |" in report and "rougeL_f1" in report
    assert (d / "scores.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    manifest = StageDir(str(d)).read_manifest()
    assert manifest.kind == "EvalJob" and manifest.samples == len(records)
    assert (d / "COMPLETE").stat().st_mtime >= (d / "manifest.json").stat().st_mtime


def test_eval_report_compares_two_runs(two_runs, tmp_path):
    out = tmp_path / "cmp"
    result = CliRunner().invoke(app, ["eval", "report", *map(str, two_runs), "--out", str(out)])
    assert result.exit_code == 0, result.output
    names = [json.loads((d / "results.json").read_text())["name"] for d in two_runs]
    assert names[0] != names[1]
    for n in names:
        assert n in result.output
    assert "Recall" in result.output and "average" in result.output
    md = (out / "comparison.md").read_text()
    assert all(n in md for n in names) and "| Recall | 512 |" in md
    assert "| ICL | 512 |" in md and "| - |" in md  # a category only the first run has
    assert (out / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    bad = CliRunner().invoke(app, ["eval", "report", str(tmp_path)])
    assert bad.exit_code == 2


def test_citations_are_scored_with_the_nli_model_and_cite_becomes_comparable(
        tmp_path, helmet_dir, tiny_model, tiny_nli, corpus_cache):
    root = tmp_path / "runs"
    spec = eval_job(root, helmet_dir, tiny_model, name="cite-eval")
    spec["spec"].update(tasks=["alce_qampari"], lengths=[1024], nliModel=str(tiny_nli))
    job = EvalJob.model_validate(spec)
    ref = standalone_stage(job)
    run_eval_stage(job, ref, None, use_ray=False, log=lambda _m: None)
    d = Path(ref.directory)
    records = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 2
    for r in records:
        assert r["metric"] == "alce_cite" and r["citation"]["nli_model"] == str(tiny_nli)
        assert r["citation"]["claims"] >= 1  # QAMPARI: every output is a list of >= 1 item
        assert 0.0 <= r["citation"]["recall"] <= 1.0
    results = json.loads((d / "results.json").read_text())
    task = results["tasks"]["alce_qampari"]
    assert set(task["parts"]) == {"correctness", "citation_recall", "citation_precision"}
    assert task["by_length"]["1024"] == pytest.approx(
        sum(p["1024"] for p in task["parts"].values()) / 3)
    assert results["nli_model"] == str(tiny_nli)
    assert "not computed" not in results["not_comparable"]["cite"]  # only sizing fill is left
    report = (d / "report.md").read_text()
    assert "Cite parts" in report and "citation NLI: " + str(tiny_nli) in report
    # The same eval without nliModel: correctness only, and it says so.
    del spec["spec"]["nliModel"]
    bare = EvalJob.model_validate(spec)
    assert standalone_stage(bare).id != ref.id
    run_eval_stage(bare, standalone_stage(bare), None, use_ray=False, log=lambda _m: None)
    plain = json.loads((Path(standalone_stage(bare).directory) / "results.json").read_text())
    assert "parts" not in plain["tasks"]["alce_qampari"]
    assert "citation recall and precision not computed" in plain["not_comparable"]["cite"]


@pytest.mark.slow
@pytest.mark.ray
def test_prolongctl_run_evaluates_on_ray_workers(tmp_path, helmet_dir, tiny_model, corpus_cache,
                                                 tiny_nli):
    """`prolongctl run` on an EvalJob: two CPU Ray workers share the samples (and then score the
    ALCE citations); same results as the in-process run of the same spec, and a second run is a
    no-op."""
    import ray

    from prolong.run.runner import run_file

    root = tmp_path / "runs"
    (root / "data").mkdir(parents=True)
    (root / "data" / "corpora").symlink_to(corpus_cache)
    job = eval_job(root, helmet_dir, tiny_model, workers=2, name="ray-eval")
    job["spec"]["tasks"] = ["json_kv", "nq", "alce_qampari"]
    job["spec"]["lengths"] = [512]  # one length: the sharing across workers is what is tested
    job["spec"]["nliModel"] = str(tiny_nli)
    path = tmp_path / "eval.yaml"
    path.write_text(yaml.safe_dump(job))
    ray.init(num_cpus=2, include_dashboard=False, logging_level="ERROR", log_to_driver=False)
    try:
        (ref,) = run_file(path, progress=False)
    finally:
        ray.shutdown()
    d = Path(ref.directory)
    assert StageDir(str(d)).is_complete()
    records = [json.loads(line) for line in (d / "samples.jsonl").read_text().splitlines()]
    assert len(records) == 3 * 1 * 2
    assert all(r["citation"]["claims"] >= 1 for r in records if r["task"] == "alce_qampari")
    # The same spec in one process gives the same outputs (greedy, deterministic samples).
    local = tmp_path / "local"
    (local / "data").mkdir(parents=True)
    (local / "data" / "corpora").symlink_to(corpus_cache)
    job["spec"]["storage"]["root"] = str(local)
    lj = EvalJob.model_validate(job)
    run_eval_stage(lj, standalone_stage(lj), None, use_ray=False, log=lambda _m: None)
    again = [json.loads(line) for line in
             (Path(standalone_stage(lj).directory) / "samples.jsonl").read_text().splitlines()]
    key = lambda r: (r["task"], r["length"], r["index"])  # noqa: E731
    assert [(key(r), r["prompt_hash"], r["output"], r.get("citation"))
            for r in sorted(records, key=key)] == \
        [(key(r), r["prompt_hash"], r["output"], r.get("citation"))
         for r in sorted(again, key=key)]
    assert run_file(path, progress=False) == [ref]  # complete: nothing to do


def test_batched_left_padded_generation_equals_one_by_one(tiny_model, tokenizer):
    """Left padding + attention mask + KV cache: a batch decodes exactly as single prompts do."""
    from prolong.eval.generate import HFGenerator
    from prolong.eval.samples import PromptFormat
    from prolong.eval.sizing import FILL
    from prolong.eval.synthetic import json_kv

    fmt = PromptFormat(tokenizer)
    samples = [json_kv(fmt, n, 0, seed=9, sizing=FILL) for n in (500, 650, 800)]
    assert len({s.tokens for s in samples}) == 3
    one = HFGenerator(str(tiny_model), batch_size=1, device="cpu").generate(samples, 6)
    many = HFGenerator(str(tiny_model), batch_size=3, device="cpu").generate(samples, 6)
    assert one == many and all(one)
