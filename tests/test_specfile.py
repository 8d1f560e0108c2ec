"""Loading spec files: YAML errors, references between files, and where errors point."""

from __future__ import annotations

import re
import shutil

import pytest
import yaml

from prolong.spec import ProLongPipeline, SpecError
from prolong.specfile import dump_yaml, load, parse_document, read_yaml
from tests.conftest import JOBS, job_dict


def test_broken_yaml_names_line_and_column(write_spec):
    path = write_spec("apiVersion: prolong.dev/v1alpha1\nkind: PretrainJob\nspec: {model: [\n")
    with pytest.raises(SpecError) as info:
        load(path)
    text = str(info.value)
    assert text.startswith(f"{path}: line 4") and "invalid YAML" in text


def test_top_level_must_be_a_mapping(write_spec):
    with pytest.raises(SpecError, match="must be a YAML mapping"):
        load(write_spec("- just\n- a list\n"))


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="file not found"):
        load(tmp_path / "nope.yaml")


def test_pipeline_inlines_references():
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    pipeline = loaded.document
    assert isinstance(pipeline, ProLongPipeline)
    assert [s.kind for s in pipeline.spec.stages] == ["PretrainJob", "PretrainJob", "SFTJob", "EvalJob"]
    assert set(loaded.jobs) == {"stage1", "stage2", "sft", "eval"}
    assert loaded.jobs["stage2"].metadata.name == "prolong-8b-stage2"
    # The resolved (inline) pipeline is itself a valid document: what the cluster receives.
    again = parse_document(read_yaml_text(dump_yaml(pipeline)))
    assert again == pipeline


def read_yaml_text(text):
    import yaml
    return yaml.safe_load(text)


def test_error_in_referenced_file_names_that_file(tmp_path):
    for name in ("stage1.yaml", "stage2.yaml", "sft.yaml", "eval.yaml", "pipeline.yaml"):
        shutil.copy(JOBS / "quickstart" / name, tmp_path / name)
    text = re.sub(r"(?m)^  steps: \d+$", "  steps: -1", (tmp_path / "stage2.yaml").read_text())
    (tmp_path / "stage2.yaml").write_text(text)
    with pytest.raises(SpecError) as info:
        load(tmp_path / "pipeline.yaml")
    issue = info.value.issues[0]
    assert issue.file == str(tmp_path / "stage2.yaml") and issue.path == "spec.steps"


def test_missing_reference(tmp_path, write_spec):
    for name in ("stage1.yaml", "sft.yaml", "eval.yaml", "sft-from-stage1.yaml",
                 "eval-from-stage1.yaml"):
        shutil.copy(JOBS / "quickstart" / name, tmp_path / name)
    data = job_dict("quickstart/pipeline.yaml")
    data["spec"]["stages"][1]["ref"] = "stage-two.yaml"
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    # The line names the pipeline file and its field, and the path it looked for.
    assert [str(i) for i in info.value.issues] == [
        f"{tmp_path}/pipeline.yaml: spec.stages[1].ref: file not found: "
        f"{tmp_path}/stage-two.yaml (got 'stage-two.yaml')"]


def _inline_quickstart():
    import yaml
    return yaml.safe_load(dump_yaml(load(JOBS / "quickstart/pipeline.yaml").document))


@pytest.mark.parametrize("src, rule", [("stage3", "names no stage"), ("sft", "runs later"),
                                       ("stage2", "cannot start from itself")])
def test_from_stage_must_name_an_earlier_stage(write_spec, src, rule):
    data = _inline_quickstart()
    data["spec"]["stages"][1]["spec"]["model"]["fromStage"] = src
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    issue = info.value.issues[0]
    assert issue.path == "spec.stages[1].spec.model.fromStage" and rule in issue.rule


def test_stage_names_unique(write_spec):
    data = _inline_quickstart()
    data["spec"]["stages"][3]["name"] = "sft"
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert info.value.issues[0].path == "spec.stages[3].name"


def test_stage_architecture_must_match_upstream(write_spec):
    data = _inline_quickstart()
    data["spec"]["stages"][1]["spec"]["model"]["architecture"] = {"preset": "tiny", "numLayers": 3}
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert info.value.issues[0].path == "spec.stages[1].spec.model.architecture"


def test_optimizer_continuation_needs_same_zero_stage(write_spec):
    data = _inline_quickstart()
    data["spec"]["stages"][1]["spec"]["parallelism"]["zeroStage"] = 3
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert info.value.issues[0].path == "spec.stages[1].spec.parallelism.zeroStage"


def test_eval_cannot_be_a_starting_point(write_spec):
    data = _inline_quickstart()
    stage = data["spec"]["stages"][3]
    data["spec"]["stages"].append({"name": "again", "kind": "EvalJob",
                                   "spec": {**stage["spec"], "model": {"fromStage": "eval"}}})
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert "training stage" in info.value.issues[0].rule


def test_stages_share_one_storage_root(write_spec):
    data = _inline_quickstart()
    data["spec"]["stages"][2]["spec"]["storage"]["root"] = "/elsewhere"
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert info.value.issues[0].path == "spec.stages[2].spec.storage.root"


def test_bad_stage_shape(write_spec):
    data = _inline_quickstart()
    data["spec"]["stages"][0] = {"name": "stage1", "kind": "TrainJob", "spec": {}}
    with pytest.raises(SpecError) as info:
        load(write_spec(data, "pipeline.yaml"))
    assert info.value.issues[0].path.startswith("spec.stages[0]")


def test_yaml_lists_read_as_mapping(tmp_path):
    (tmp_path / "x.yaml").write_text("kind: PretrainJob\n")
    assert read_yaml(str(tmp_path / "x.yaml")) == {"kind": "PretrainJob"}


def test_inline_stages_of_a_long_pipeline_name_load(write_spec):
    data = _inline_quickstart()
    data["metadata"]["name"] = "a" * 38  # the longest name allowed
    loaded = load(write_spec(data, "pipeline.yaml"))
    assert loaded.jobs["stage1"].metadata.name == "a" * 38 + "-stage1"


def test_odd_field_names_stay_on_one_line(write_spec):
    data = job_dict("quickstart/stage1.yaml")
    data["spec"]["data"]["streams"][0] = {"\n": 0}  # found by the mutation test
    with pytest.raises(SpecError) as info:
        load(write_spec(data))
    assert all("\n" not in str(i) for i in info.value.issues)
    assert any('streams[0]["\\n"]' in i.path for i in info.value.issues)


@pytest.mark.parametrize(("where", "typo", "hint"), [
    (("spec", "cluster"), "chatTemplate", "podTemplate"),  # an SFT field, not a cluster one
    (("spec", "cluster"), "podTemplat", "podTemplate"),
    (("spec", "schedule"), "peakLr", "peakLR"),
    (("spec", "data", "streams", 0), "domian", "domain"),
])
def test_a_typo_is_matched_against_the_fields_of_its_own_section(where, typo, hint):
    data = job_dict("quickstart/stage1.yaml")
    node = data
    for key in where:
        node = node[key]
    node[typo] = 1
    with pytest.raises(SpecError) as err:
        parse_document(data, file="job.yaml")
    path = ".".join(str(k) for k in where).replace(".0", "[0]")
    assert str(err.value.issues[0]) == \
        f"job.yaml: {path}.{typo}: unknown field (did you mean {hint}?)"


def test_a_typo_in_a_pipeline_stage_is_matched_in_its_section():
    doc = yaml.safe_load(dump_yaml(load(JOBS / "quickstart/pipeline.yaml").document))
    doc["spec"]["stages"][1]["spec"]["cluster"]["chatTemplate"] = "x"
    doc["spec"]["onSpecChang"] = "wait"
    with pytest.raises(SpecError) as err:
        parse_document(doc, file="p.yaml")
    assert sorted(map(str, err.value.issues)) == [
        "p.yaml: spec.onSpecChang: unknown field (did you mean onSpecChange?)",
        "p.yaml: spec.stages[1].spec.cluster.chatTemplate: unknown field (did you mean "
        "podTemplate?)"]
