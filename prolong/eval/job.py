"""An EvalJob stage on Ray: shard the work items over workers, generate, score, write the stage.

The model is the upstream stage's ``final/`` (``model.fromStage``) or ``model.source``; the
tokenizer is ``tokenizer.source`` or the model's. A source is read from its staged copy
(``stagedPath``) or a local directory, never downloaded (:mod:`prolong.model.staging`). Work items (task, length, index) are dealt to
``cluster.world_size`` shards (:func:`prolong.eval.harness.shard`); each shard is one Ray task
holding one GPU (``device: gpu``) or one CPU core, which loads the model once, builds its own
samples and returns scored records. A failed task is retried ``cluster.maxFailures`` times.

The driver then writes, in this order: ``samples.jsonl`` (one record per sample: task, length,
depth, prompt hash, output, score), ``results.json``, ``report.md``, ``scores.png``,
``manifest.json`` and, last, ``COMPLETE`` -- the stage's commit point, as for training stages. A
stage that crashed before COMPLETE is simply evaluated again.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from prolong.data.errors import DataError
from prolong.eval.datacheck import check_data_dir
from prolong.eval.generate import build_generator
from prolong.eval.harness import (
    SampleBuilder,
    WorkItem,
    aggregate,
    evaluate_items,
    shard,
    work_items,
)
from prolong.eval.judge import JudgeClient, JudgeError, judge_records
from prolong.eval.nli import cites as nli_cites
from prolong.eval.nli import preflight as nli_preflight
from prolong.eval.nli import score_shard
from prolong.eval.report import (
    REPORT,
    RESULTS,
    SAMPLES,
    SCORES_PNG,
    comparability,
    markdown_report,
    scores_png,
)
from prolong.eval.samples import PromptFormat
from prolong.eval.sizing import Sizing
from prolong.eval.synthetic import essay_haystack
from prolong.model.staging import model_location as staged_model_location
from prolong.model.staging import tokenizer_location as staged_tokenizer_location
from prolong.spec import EvalJob
from prolong.stage.directory import Manifest, StageDir, local_copy
from prolong.stage.identity import StageRef
from prolong.stage.logs import LOG_MODE_ENV, stage_output
from prolong.versions import versions


def _absolute(path: str | None) -> str | None:
    """Workers run elsewhere: existing local paths travel absolute; URIs and hub ids as given."""
    if path is None or "://" in path:
        return path
    p = Path(path).expanduser()
    return str(p.resolve()) if p.exists() else path


def model_location(job: EvalJob, upstream_dir: str | None) -> str:
    """The weights to evaluate: the upstream stage's final/, else where model.source is loaded
    from (prolong.model.staging: its staged copy, or a local directory; workers never download,
    so a hub id with nothing staged is refused here, before any worker starts)."""
    if upstream_dir is not None:
        return f"{_absolute(upstream_dir).rstrip('/')}/final"
    where = staged_model_location(job.spec.model)
    if where is None:
        raise ValueError("an EvalJob needs model.fromStage (with its stage directory) or "
                         "model.source")
    return _absolute(where)


def tokenizer_location(job: EvalJob, model: str) -> str:
    """The tokenizer: where tokenizer.source (or a staged copy of it) is loaded from, the same
    resolution as the trainer's; else the evaluated model's directory, which holds one."""
    spec = job.spec
    where = staged_tokenizer_location(spec.tokenizer, spec.model, "tokenizer")
    return _absolute(where) if where is not None else model


def corpus_cache(job: EvalJob) -> str:
    """Where the essay haystack's corpus is built: <storage.root>/data/corpora (as `data
    prepare` does) for local roots, a temporary directory for object stores."""
    root = job.spec.storage.root
    if "://" in root:
        return os.path.join(tempfile.gettempdir(), "prolong-corpora")
    return str(Path(root).resolve() / "data" / "corpora")


def shard_config(job: EvalJob, model: str) -> dict[str, Any]:
    spec = job.spec
    return {"model": model, "tokenizer": tokenizer_location(job, model),
            "data_dir": _absolute(spec.data_dir), "seed": spec.seed,
            "backend": spec.generation.backend, "batch_size": spec.generation.batch_size,
            "max_new_tokens": spec.generation.max_new_tokens,
            "device": "cuda" if spec.cluster.device == "gpu" else "cpu",
            # Prompts keep their output budget free within the length, so the longest length is
            # all vLLM needs (capped at the model's own limit in prolong.eval.generate).
            "max_model_len": spec.generation.max_model_len or max(spec.lengths),
            "sizing": spec.sizing, "sizing_tokenizer": _absolute(spec.sizing_tokenizer),
            "use_chat_template": spec.use_chat_template,
            "nli_model": _absolute(spec.nli_model),
            "corpus_cache": corpus_cache(job)}


def eval_shard(items: Sequence[WorkItem], config: dict[str, Any]) -> list[dict[str, Any]]:
    """One worker's share: load the model once, build, generate and score its items."""
    from transformers import AutoTokenizer  # on the worker: it loads the model there

    if not items:
        return []
    model = local_copy(config["model"])
    tok_path = local_copy(config["tokenizer"])

    tokenizer = AutoTokenizer.from_pretrained(tok_path, local_files_only=True)
    counter = None
    if config.get("sizing_tokenizer"):  # HELMET counts documents with Llama-2's tokenizer
        counter = PromptFormat(AutoTokenizer.from_pretrained(
            local_copy(config["sizing_tokenizer"]), local_files_only=True))
    sizing = Sizing(config.get("sizing", "helmet"), config["max_new_tokens"], counter)
    builder = SampleBuilder(tokenizer, seed=config["seed"], data_dir=config["data_dir"],
                            haystack=essay_haystack(config["corpus_cache"]), sizing=sizing,
                            use_chat=config.get("use_chat_template", True))
    generator = build_generator(config["backend"], model, tokenizer_path=tok_path,
                                batch_size=config["batch_size"], device=config["device"],
                                max_model_len=config["max_model_len"])
    return evaluate_items(items, builder, generator, max_new_tokens=config["max_new_tokens"],
                          batch=max(config["batch_size"], 1) * 4)


def _logged_eval_shard(items: Sequence[WorkItem], config: dict[str, Any], directory: str,
                       index: int) -> list[dict[str, Any]]:
    """One shard as a Ray task, its output in ``<stage dir>/logs/eval-shard<index>.log``."""
    with stage_output(directory, f"eval-shard{index:03d}"):
        return eval_shard(items, config)


def _run_on_ray(shards: list[list[WorkItem]], config: dict[str, Any], job: EvalJob,
                directory: str, log: Any, *, console_logs: bool) -> list[dict[str, Any]]:
    import ray  # the in-process path (use_ray=False) runs without Ray

    cluster = job.spec.cluster
    gpu = cluster.device == "gpu"
    env = {"TOKENIZERS_PARALLELISM": "false", LOG_MODE_ENV: "console" if console_logs else "files"}
    if not gpu:
        env["OMP_NUM_THREADS"] = "1"
    task = ray.remote(_logged_eval_shard).options(
        num_gpus=1 if gpu else 0, num_cpus=1, max_retries=cluster.max_failures,
        retry_exceptions=cluster.max_failures > 0, runtime_env={"env_vars": env})
    pending = [task.remote(s, config, directory, i) for i, s in enumerate(shards)]
    records: list[dict[str, Any]] = []
    done = 0
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        records += ray.get(ready[0])
        done += 1
        log(f"eval shard {done}/{len(shards)} done ({len(records)} samples so far)")
    return records


def judge_client(judge: Any) -> JudgeClient | None:
    """The judge's client, or None without a judge; a missing API key or unreadable prompts are
    bad input (one line, exit 2), found before any model loads."""
    if judge is None:
        return None
    try:
        return JudgeClient.from_spec(judge)
    except JudgeError as exc:
        raise DataError(str(exc)) from None


def _logged_cite_shard(records: list[dict[str, Any]], config: dict[str, Any], directory: str,
                       index: int) -> list[dict[str, Any]]:
    with stage_output(directory, f"cite-shard{index:03d}"):
        return score_shard(records, config)


def _score_citations(records: list[dict[str, Any]], config: dict[str, Any], job: EvalJob,
                     directory: str, log: Any, *, use_ray: bool, console_logs: bool) -> None:
    """ALCE citation scores, after generation: the ALCE records dealt over the workers (one GPU
    each), each loading the NLI model once; the scored records replace their originals."""
    todo = [i for i, r in enumerate(records) if "cite_inputs" in r and "skipped" not in r]
    if not todo:
        return
    workers = max(1, min(job.spec.cluster.world_size, len(todo)))
    parts = [todo[k::workers] for k in range(workers)]
    cfg = {"nli_model": _absolute(config["nli_model"]), "device": config["device"]}
    if use_ray:
        import ray

        gpu = job.spec.cluster.device == "gpu"
        env = {"TOKENIZERS_PARALLELISM": "false",
               LOG_MODE_ENV: "console" if console_logs else "files"}
        task = ray.remote(_logged_cite_shard).options(
            num_gpus=1 if gpu else 0, num_cpus=1, max_retries=job.spec.cluster.max_failures,
            retry_exceptions=job.spec.cluster.max_failures > 0, runtime_env={"env_vars": env})
        scored = ray.get([task.remote([records[i] for i in part], cfg, directory, k)
                          for k, part in enumerate(parts)])
    else:
        scored = [score_shard([records[i] for i in part], cfg) for part in parts]
    for part, out in zip(parts, scored, strict=True):
        for i, rec in zip(part, out, strict=True):
            records[i] = rec
    log(f"citations scored with {config['nli_model']}: {len(todo)} ALCE samples")


def run_eval_stage(job: EvalJob, ref: StageRef, upstream_dir: str | None, *,
                   use_ray: bool = True, log: Any = print,
                   console_logs: bool = False) -> dict[str, Any]:
    """Evaluate one EvalJob stage and write its directory; returns results.json's content.
    ``use_ray=False`` runs the shards one after another in this process (tests, debugging).
    On Ray each shard's output goes to the stage's logs/ unless ``console_logs``."""
    stage = StageDir(ref.directory)
    if stage.is_complete():
        return stage.read_json(RESULTS)
    spec = job.spec
    start = time.monotonic()
    check_data_dir(spec)  # a missing or malformed data file is bad input: before any model loads
    nli_preflight(spec.nli_model, spec.tasks)  # likewise the NLI model and its sentence splitter
    judge = judge_client(spec.judge)  # and the judge's key and prompts
    model = model_location(job, upstream_dir)
    config = shard_config(job, model)
    items = work_items(spec.tasks, spec.lengths, spec.samples, spec.icl_samples)
    shards = [s for s in shard(items, spec.cluster.world_size) if s]
    log(f"eval {ref.stage}: {len(items)} samples ({len(spec.tasks)} tasks x "
        f"{len(spec.lengths)} lengths) on {len(shards)} workers, model {model}")
    if use_ray:
        records = _run_on_ray(shards, config, job, ref.directory, log, console_logs=console_logs)
    else:
        records = [r for s in shards for r in eval_shard(s, config)]
    records.sort(key=lambda r: (list(spec.tasks).index(r["task"]), r["length"], r["index"]))
    if spec.nli_model is not None and nli_cites(spec.tasks):  # the GPUs are free again
        _score_citations(records, config, job, ref.directory, log, use_ray=use_ray,
                         console_logs=console_logs)
    if judge is not None:  # on the driver, after generation: one concurrency limit
        judge_records(records, judge, concurrency=spec.judge.concurrency,
                      retries=spec.judge.retries, log=log)

    results = aggregate(records, tasks=spec.tasks, lengths=spec.lengths)
    name = f"{ref.pipeline}/{ref.stage}-{ref.id}"
    results.update({"name": name, "model": model, "seconds": time.monotonic() - start,
                    "backend": spec.generation.backend, "workers": len(shards),
                    "versions": versions(), **comparability(spec)})
    stage.ensure()
    stage.write_bytes(SAMPLES, "".join(json.dumps(r, sort_keys=True) + "\n"
                                       for r in records).encode())
    stage.write_json(RESULTS, results)
    stage.write_bytes(REPORT, markdown_report(results, title=f"HELMET: {name}").encode())
    stage.write_bytes(SCORES_PNG, scores_png(results, title=f"HELMET: {name}"))
    stage.write_manifest(Manifest.for_stage(
        ref, job.model_dump(mode="json", by_alias=True), model=model,
        results=stage.uri_of(RESULTS), samples=len(records), versions=results["versions"],
        summary={"average": results["average"]["mean"],
                 **{c: v["mean"] for c, v in results["categories"].items()}}))
    stage.mark_complete()
    return results  # the caller reports the stage's result (prolong.run.summary)
