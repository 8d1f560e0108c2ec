"""Every recipe rule of prolong.spec (prolong.spec.rules and the model validators of
prolong.spec.models): each bad spec is rejected with the right field and rule."""

from __future__ import annotations

import pytest

from prolong.spec import SpecError
from prolong.specfile import load
from tests.conftest import JOBS, job_dict


def issues_of(write_spec, data, name="job.yaml") -> list[tuple[str, str]]:
    with pytest.raises(SpecError) as info:
        load(write_spec(data, name))
    return [(i.path, i.rule) for i in info.value.issues]


def first(write_spec, data, name="job.yaml"):
    with pytest.raises(SpecError) as info:
        load(write_spec(data, name))
    return info.value.issues[0]


@pytest.mark.parametrize("path", sorted(p.relative_to(JOBS).as_posix() for p in JOBS.glob("*/*.yaml")))
def test_every_recipe_file_is_valid(path):
    loaded = load(JOBS / path)
    assert loaded.document.metadata.name


def test_recipe_numbers_are_prolongs():
    stage1 = load(JOBS / "prolong-8b/stage1-64k.yaml").document.spec
    stage2 = load(JOBS / "prolong-8b/stage2-512k.yaml").document.spec
    sft = load(JOBS / "prolong-8b/sft.yaml").document.spec
    assert (stage1.sequence_length, stage1.global_batch_tokens, stage1.total_steps) == (65536, 4194304, 5000)
    assert (stage2.sequence_length, stage2.global_batch_tokens, stage2.total_steps) == (524288, 8388608, 2500)
    assert (sft.sequence_length, sft.global_batch_tokens, sft.total_steps) == (65536, 4194304, 250)
    assert (stage1.model.rope_theta, stage2.model.rope_theta) == (8e6, 1.28e8)
    assert stage2.model.init == "weightsAndOptimizer" and stage2.parallelism.sequence_parallel == 8
    assert stage1.schedule.floor_lr == pytest.approx(1e-6)
    assert sft.schedule.floor_lr == pytest.approx(2e-6) and sft.warmup_steps == 12
    assert stage1.optimizer.betas == (0.9, 0.95) and stage1.optimizer.weight_decay == 0.1
    long_64k = {s.domain: s.target_length for s in stage2.data.streams if s.target_length}
    assert long_64k == {"code-repos-64k": 65536, "books-64k": 65536}
    assert sum(s.proportion for s in stage1.data.streams if s.packing == "long") == pytest.approx(0.63)


def test_proportions_must_sum_to_one(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["data"]["streams"][2]["proportion"] = 0.1  # 0.2 -> 0.1: sums to 0.9
    issue = first(write_spec, data)
    assert issue.path == "spec.data.streams"
    assert "sum to 1" in issue.rule and issue.value == pytest.approx(0.9)


def test_sequence_length_divisible_by_sp_times_256(write_spec):
    data = job_dict("quickstart/stage2.yaml")
    data["spec"]["sequenceLength"] = 2048 + 256  # SP=2 needs multiples of 512
    data["spec"]["globalBatchTokens"] = 2304 * 2
    for s in data["spec"]["data"]["streams"]:
        s.pop("targetLength", None)
    assert ("spec.sequenceLength", "must be divisible by sequenceParallel x 256 = 512") in issues_of(write_spec, data)


def test_sp_must_divide_query_heads(write_spec):
    data = job_dict("prolong-8b/stage2-512k.yaml")
    data["spec"]["model"]["architecture"] = {"preset": "llama3-8b", "numAttentionHeads": 20,
                                             "numKeyValueHeads": 4, "hiddenSize": 2560}
    assert any(p == "spec.parallelism.sequenceParallel" and "numAttentionHeads 20" in r
               for p, r in issues_of(write_spec, data))


def test_sp_and_kv_heads_divide_or_replicate(write_spec):
    data = job_dict("prolong-8b/stage1-64k.yaml")
    data["spec"]["parallelism"]["sequenceParallel"] = 4
    data["spec"]["globalBatchTokens"] = 65536 * 16
    # 24 query heads / 6 KV heads: SP 4 divides 24, but neither divides nor is a multiple of 6.
    data["spec"]["model"]["architecture"] = {"preset": "llama3-8b", "numAttentionHeads": 24,
                                             "numKeyValueHeads": 6, "hiddenSize": 3072}
    issues = issues_of(write_spec, data)
    assert ("spec.parallelism.sequenceParallel",
            "must divide, or be a multiple of, model.architecture.numKeyValueHeads 6") in issues
    # SP 16 with 8 KV heads replicates KV heads: accepted (DeepSpeed's rule).
    ok = job_dict("prolong-8b/stage2-512k.yaml")
    ok["spec"]["parallelism"]["sequenceParallel"] = 16
    ok["spec"]["cluster"]["workersPerNode"] = 16
    ok["spec"]["globalBatchTokens"] = 524288 * 8
    load(write_spec(ok, "ok.yaml"))


def test_sp_groups_stay_within_a_node(write_spec):
    data = job_dict("prolong-8b/stage2-512k.yaml")
    data["spec"]["cluster"]["workersPerNode"] = 4
    issue = first(write_spec, data)
    assert issue.path == "spec.parallelism.sequenceParallel" and "within a node" in issue.rule


def test_global_batch_divisible_by_sequence_times_dp(write_spec):
    data = job_dict("prolong-8b/stage1-64k.yaml")
    data["spec"]["globalBatchTokens"] = 65536 * 32  # 32 rows over DP 64
    issue = first(write_spec, data)
    assert issue.path == "spec.globalBatchTokens" and "65536 x 64" in issue.rule
    assert issue.value == 65536 * 32


@pytest.mark.parametrize("field", ["peakLR", "minLR"])
def test_learning_rates_positive(write_spec, field):
    data = job_dict("prolong-8b/sft.yaml")
    data["spec"]["schedule"][field] = -1e-5
    issue = first(write_spec, data)
    assert issue.path == f"spec.schedule.{field}" and "greater than" in issue.rule


def test_floor_above_peak_rejected(write_spec):
    data = job_dict("prolong-8b/sft.yaml")
    data["spec"]["schedule"]["minLR"] = 1e-4
    assert first(write_spec, data).path == "spec.schedule.minLR"


def test_warmup_shorter_than_run(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["schedule"].pop("warmupRatio")
    data["spec"]["schedule"]["warmupSteps"] = data["spec"]["steps"]
    issue = first(write_spec, data)
    assert issue.path == "spec.schedule.warmupSteps" and "shorter than the run" in issue.rule


def test_steps_or_tokens(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    batch = data["spec"]["globalBatchTokens"]
    data["spec"]["tokens"] = batch * 30
    assert "give exactly one of steps or tokens" in first(write_spec, data).rule
    del data["spec"]["steps"]
    assert load(write_spec(data)).document.spec.total_steps == 30
    data["spec"]["tokens"] = batch * 30 + 1
    assert first(write_spec, data).path == "spec.tokens"


def test_unknown_field_is_rejected_with_suggestion(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["sequenceLenght"] = data["spec"].pop("sequenceLength")
    issues = issues_of(write_spec, data)
    # The typo explains the missing field: one issue, not two.
    assert issues == [("spec.sequenceLenght", "unknown field (did you mean sequenceLength?)")]
    del data["spec"]["globalBatchTokens"]
    assert ("spec.globalBatchTokens", "required field is missing") in issues_of(write_spec, data)


def test_unknown_kind_suggests(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["kind"] = "PretrainingJob"
    issue = first(write_spec, data)
    assert issue.path == "kind" and "did you mean PretrainJob?" in issue.rule
    assert "ProLongPipeline" in issue.rule


@pytest.mark.parametrize("kind", [[], {"a": 1}, None, 3])
def test_kind_of_the_wrong_type(write_spec, kind):  # [] was found by the mutation test
    data = job_dict("quickstart/stage1.yaml")
    data["kind"] = kind
    assert first(write_spec, data).path == "kind"


def test_api_version_checked(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["apiVersion"] = "prolong.dev/v1"
    assert first(write_spec, data).path == "apiVersion"


def test_type_errors_name_field_and_value(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["steps"] = "thirty"
    issue = first(write_spec, data)
    assert issue.path == "spec.steps" and issue.value == "thirty" and "integer" in issue.rule


def test_domains_unique_and_embedded_names_known(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["data"]["streams"][1]["domain"] = "code-repos"
    data["spec"]["data"]["streams"][2]["path"] = "short-texts"
    issues = issues_of(write_spec, data)
    assert any(p == "spec.data.streams[1].domain" for p, _ in issues)
    assert any(p == "spec.data.streams[2].path" and "did you mean short-text?" in r for p, r in issues)


def test_long_target_must_divide_sequence(write_spec):
    data = job_dict("quickstart/stage2.yaml")
    data["spec"]["data"]["streams"][1]["targetLength"] = 300
    assert first(write_spec, data).path == "spec.data.streams[1].targetLength"
    data = job_dict("quickstart/stage2.yaml")
    data["spec"]["data"]["streams"][1]["minLength"] = 100
    assert first(write_spec, data).path == "spec.data.streams[1].minLength"


def test_max_length_must_reach_min_length(write_spec):
    data = job_dict("quickstart/stage2.yaml")
    data["spec"]["data"]["streams"][1]["maxLength"] = 100  # a long stream: minLength = 512
    issue = first(write_spec, data)
    assert issue.path == "spec.data.streams[1].maxLength" and "minLength 512" in issue.rule


def test_packing_matches_job_kind(write_spec):
    sft = job_dict("quickstart/sft.yaml")
    sft["spec"]["data"]["streams"][0]["packing"] = "concat"
    assert first(write_spec, sft).path == "spec.data.streams[0].packing"
    pre = job_dict("quickstart/stage1.yaml")
    pre["spec"]["data"]["streams"][2]["packing"] = "conversation"
    assert first(write_spec, pre).path == "spec.data.streams[2].packing"


def test_trained_tokenizer_must_match_vocab(write_spec):
    data = job_dict("quickstart/base.yaml")  # the quickstart's one trained tokenizer
    data["spec"]["data"]["tokenizer"]["trainVocabSize"] = 8192
    issue = first(write_spec, data)
    assert issue.path == "spec.data.tokenizer.trainVocabSize" and "512" in issue.rule


def test_model_source_rules(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["model"]["init"] = "weightsAndOptimizer"
    assert first(write_spec, data).path == "spec.model.init"
    data = job_dict("prolong-8b/stage1-64k.yaml")
    data["spec"]["model"]["fromStage"] = "stage0"
    assert "not both" in first(write_spec, data).rule
    data = job_dict("quickstart/base.yaml")  # random weights: the shape must be stated
    del data["spec"]["model"]["architecture"]
    assert first(write_spec, data).path == "spec.model.architecture"


def test_architecture_needs_preset_or_fields(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["model"]["architecture"] = {"numLayers": 2}
    issue = first(write_spec, data)
    assert issue.path == "spec.model.architecture" and "hiddenSize" in issue.rule


def test_eval_tasks_known_and_released_data_needs_dir(write_spec):
    data = job_dict("prolong-8b/eval.yaml")
    data["spec"]["tasks"][0] = "json_kvv"
    del data["spec"]["dataDir"]
    issues = issues_of(write_spec, data)
    assert any(p == "spec.tasks[0]" and "did you mean json_kv?" in r for p, r in issues)
    assert any(p == "spec.dataDir" and "nq" in r for p, r in issues)
    synthetic = job_dict("quickstart/eval.yaml")  # synthetic tasks need no dataDir
    load(write_spec(synthetic, "eval.yaml"))


def test_cpu_runs_cannot_use_bf16(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["precision"] = "bf16"
    assert first(write_spec, data).path == "spec.precision"


def test_eval_sizing_helmet_is_the_default_and_needs_helmets_lengths(write_spec):
    shipped = load(JOBS / "prolong-8b/eval.yaml").document
    assert shipped.spec.sizing == "helmet" and shipped.spec.use_chat_template
    data = job_dict("quickstart/eval.yaml")
    del data["spec"]["sizing"]  # the quickstart's 512 / 1024 need sizing: fill
    issues = issues_of(write_spec, data)
    rule = next(r for p, r in issues if p == "spec.lengths[0]")
    assert "4096, 8192" in rule and "json_kv" in rule and "sizing: fill" in rule
    assert load(JOBS / "quickstart/eval.yaml").document.spec.sizing == "fill"


def test_eval_judge_fields(write_spec):
    data = job_dict("prolong-8b/eval.yaml")
    data["spec"]["judge"] = {"endpoint": "ftp://judge", "model": "gpt-4o-2024-05-13",
                             "helmetDir": "/HELMET"}
    assert first(write_spec, data).path.startswith("spec.judge.endpoint")
    data["spec"]["judge"] = {"endpoint": "http://judge:8000/v1", "model": "m",
                             "helmetDir": "/HELMET", "apiKeySecretRef": "judge-key"}
    judge = load(write_spec(data, "eval.yaml")).document.spec.judge
    assert judge.api_key_secret_ref == "judge-key" and judge.retries == 3


def _memory(data: dict, **memory) -> dict:
    data["spec"].setdefault("parallelism", {})["memory"] = memory
    return data


def test_activation_offload_needs_checkpointing(write_spec):
    data = _memory(job_dict("prolong-8b/stage2-512k.yaml"), activationOffload=True)
    data["spec"]["parallelism"]["activationCheckpointing"] = False
    data["spec"]["model"] = {"source": "/models/llama", "architecture": {"preset": "llama3-8b"}}
    assert ("spec.parallelism.memory.activationOffload",
            "needs parallelism.activationCheckpointing: true (it offloads the checkpointed layer "
            "inputs)") in issues_of(write_spec, data)


def test_activation_offload_needs_a_gpu(write_spec):
    data = _memory(job_dict("quickstart/stage2.yaml"), activationOffload=True)
    data["spec"]["parallelism"]["activationCheckpointing"] = True
    issue = first(write_spec, data)
    assert issue.path == "spec.parallelism.memory.activationOffload"
    assert "cluster.device: gpu" in issue.rule and "pinned memory" in issue.rule


def test_tiled_mlp_shards_need_tiled_mlp_and_fit_the_local_tokens(write_spec):
    issue = first(write_spec, _memory(job_dict("quickstart/stage2.yaml"), tiledMlpShards=4))
    assert (issue.path, issue.rule) == ("spec.parallelism.memory.tiledMlpShards",
                                        "applies with parallelism.memory.tiledMlp: true only")
    data = job_dict("quickstart/stage2.yaml")
    local = data["spec"]["sequenceLength"] // data["spec"]["parallelism"]["sequenceParallel"]
    issue = first(write_spec, _memory(data, tiledMlp=True, tiledMlpShards=local + 1))
    assert issue.path == "spec.parallelism.memory.tiledMlpShards" and str(local) in issue.rule
    load(write_spec(_memory(job_dict("quickstart/stage2.yaml"), tiledMlp=True, tiledMlpShards=local,
                            lossChunkTokens=512)))


@pytest.mark.parametrize("field,value", [("lossChunkTokens", 0), ("tiledMlpShards", 0),
                                         ("lossChunkTokenz", 1)])
def test_memory_fields_are_checked(write_spec, field, value):
    with pytest.raises(SpecError) as info:
        load(write_spec(_memory(job_dict("quickstart/stage2.yaml"), **{field: value})))
    assert any("parallelism.memory" in i.path for i in info.value.issues)


HUB_RULE = "is a hub id and workers do not download: set {field}.stagedPath (and allowHub) and " \
           "stage it once with `prolongctl model stage FILE`"


def test_a_hub_model_needs_a_staged_path(write_spec):
    data = job_dict("prolong-8b/stage1-64k.yaml")
    del data["spec"]["model"]["stagedPath"]
    issues = issues_of(write_spec, data)
    assert ("spec.model.source", HUB_RULE.format(field="model")) in issues
    # Its tokenizer is the model's, so it is refused through model.source only.
    assert not any(p.startswith("spec.data.tokenizer") for p, _ in issues)


@pytest.mark.parametrize("relpath", ["prolong-8b/stage2-512k.yaml", "prolong-8b/sft.yaml"])
def test_a_hub_tokenizer_needs_a_staged_path(write_spec, relpath):
    data = job_dict(relpath)
    del data["spec"]["data"]["tokenizer"]["stagedPath"]
    assert issues_of(write_spec, data) == [("spec.data.tokenizer.source",
                                            HUB_RULE.format(field="data.tokenizer"))]


def test_a_tokenizer_of_another_hub_id_is_not_covered_by_the_models_staging(write_spec):
    data = job_dict("prolong-8b/stage1-64k.yaml")
    data["spec"]["data"]["tokenizer"] = {"source": "meta-llama/Llama-2-7b-hf"}
    assert issues_of(write_spec, data) == [("spec.data.tokenizer.source",
                                            HUB_RULE.format(field="data.tokenizer"))]
    data["spec"]["data"]["tokenizer"]["stagedPath"] = "/mnt/prolong/tokenizers/llama2"
    load(write_spec(data))


def test_an_eval_tokenizer_from_the_hub_needs_a_staged_path(write_spec):
    data = job_dict("quickstart/eval.yaml")
    data["spec"]["tokenizer"] = {"source": "org/tok"}
    assert issues_of(write_spec, data) == [("spec.tokenizer.source",
                                            HUB_RULE.format(field="tokenizer"))]
    data["spec"]["tokenizer"]["stagedPath"] = "gs://bucket/tok"
    load(write_spec(data))


@pytest.mark.parametrize("source", ["/models/llama", "./models/llama", "s3://bucket/llama",
                                    "gs://bucket/llama", "org/name"])
def test_paths_are_not_hub_ids(write_spec, tmp_path, monkeypatch, source):
    """Absolute and ./ paths, object stores, and an org/name that is a local directory are
    storage, not the hub: no staging needed (a missing path fails when it is read)."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "org" / "name").mkdir(parents=True)
    data = job_dict("prolong-8b/stage1-64k.yaml")
    model = data["spec"]["model"]
    for key in ("stagedPath", "allowHub", "hubTokenSecret"):
        del model[key]
    model["source"] = source
    data["spec"]["data"]["tokenizer"]["source"] = source
    load(write_spec(data))
