"""Stage identity: same spec -> same id; a change re-runs that stage and the ones after it."""

from __future__ import annotations

import yaml

from prolong.specfile import dump_yaml, load
from prolong.stage.identity import ID_LENGTH, StageRef, pipeline_stages, stage_id, standalone_stage
from tests.conftest import JOBS


def _inline(name: str) -> dict:
    return yaml.safe_load(dump_yaml(load(JOBS / name).document))


def _ids(write_spec, data) -> dict[str, str]:
    loaded = load(write_spec(data, "pipeline.yaml"))
    return {r.stage: r.id for r in pipeline_stages(loaded.document, loaded.jobs)}


def test_ids_are_stable_and_short(write_spec):
    data = _inline("prolong-8b/pipeline.yaml")
    first, again = _ids(write_spec, data), _ids(write_spec, data)
    assert first == again
    assert all(len(i) == ID_LENGTH and int(i, 16) >= 0 for i in first.values())
    assert len(set(first.values())) == 4


def test_ref_and_inline_pipelines_have_the_same_ids(write_spec):
    loaded = load(JOBS / "quickstart/pipeline.yaml")
    from_refs = {r.stage: r.id for r in pipeline_stages(loaded.document, loaded.jobs)}
    assert from_refs == _ids(write_spec, _inline("quickstart/pipeline.yaml"))


def test_changing_a_stage_reruns_it_and_its_descendants_only(write_spec):
    data = _inline("prolong-8b/pipeline.yaml")
    before = _ids(write_spec, data)
    data["spec"]["stages"][1]["spec"]["schedule"]["peakLR"] = 5e-6  # the released script's LR
    after = _ids(write_spec, data)
    assert after["stage1"] == before["stage1"]
    assert all(after[s] != before[s] for s in ("stage2", "sft", "eval"))


def test_editing_eval_changes_only_eval(write_spec):
    data = _inline("prolong-8b/pipeline.yaml")
    before = _ids(write_spec, data)
    data["spec"]["stages"][3]["spec"]["samples"] = 50
    after = _ids(write_spec, data)
    assert [s for s in before if before[s] != after[s]] == ["eval"]


def test_rerun_counter_changes_identity(write_spec):
    data = _inline("quickstart/pipeline.yaml")
    before = _ids(write_spec, data)
    data["spec"]["stages"][2]["spec"]["rerun"] = 1
    after = _ids(write_spec, data)
    assert [s for s in before if before[s] != after[s]] == ["sft", "eval"]


def test_scheduling_only_fields_keep_identity(write_spec):
    data = _inline("prolong-8b/pipeline.yaml")
    before = _ids(write_spec, data)
    cluster = data["spec"]["stages"][0]["spec"]["cluster"]
    cluster["image"] = "registry.example/prolong:2"
    cluster["nodeSelector"] = {"pool": "h100"}
    cluster["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    cluster["maxFailures"] = 9
    assert _ids(write_spec, data) == before


def test_the_world_layout_keeps_identity(write_spec):
    # A stage that lost a node resumes its own checkpoints on fewer workers, or another SP degree.
    data = _inline("prolong-8b/pipeline.yaml")
    before = _ids(write_spec, data)
    stage2 = data["spec"]["stages"][1]["spec"]
    stage2["cluster"]["nodes"] = 4
    stage2["cluster"]["workersPerNode"] = 4
    stage2["parallelism"]["sequenceParallel"] = 4
    assert _ids(write_spec, data) == before


def test_explicit_default_equals_omitted(write_spec):
    job = load(JOBS / "quickstart/stage1.yaml").document
    data = yaml.safe_load((JOBS / "quickstart/stage1.yaml").read_text())
    data["spec"]["seed"] = 0  # the default, written out
    assert stage_id(load(write_spec(data)).document) == stage_id(job)


def test_directories_follow_the_layout():
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    refs = pipeline_stages(loaded.document, loaded.jobs)
    assert refs[1].directory == f"/mnt/prolong/prolong-8b/stage2-{refs[1].id}"
    assert refs[1].upstream == (refs[0].id,)
    solo = standalone_stage(load(JOBS / "quickstart/stage1.yaml").document)
    assert solo.directory == f"./runs/quickstart-stage1/pretrain-{solo.id}"


# The ids of every shipped spec, pinned: runs already on disk (runs/<pipeline>/<stage>-<id>/) must
# keep resuming after a refactor. An intended change to what a stage computes changes these on
# purpose; anything else that changes them is a bug.
PINNED_PIPELINE_IDS = {
    "prolong-8b/pipeline.yaml": {"stage1": "a12b524d", "stage2": "def3c1ca", "sft": "dd601f0d",
                                 "eval": "a93d35c6"},
    # Issue 22: stage 1 continues the shipped base (model.source), with its tokenizer and shape.
    # Re-made base (28,000 steps): stage 1 names its id as model.revision, so every id changes.
    "quickstart/pipeline.yaml": {"stage1": "1e61baad", "stage2": "7720c934", "sft": "5c08c6df",
                                 "eval": "f0e0a221", "sft-from-stage1": "873dc40c",
                                 "eval-from-stage1": "e4dec39d"},
}
PINNED_STANDALONE_IDS = {
    "prolong-8b/stage1-64k.yaml": "a12b524d",
    "prolong-8b/stage2-512k.yaml": "6c67c7e2",
    "prolong-8b/sft.yaml": "a9d1ede2",
    "prolong-8b/eval.yaml": "78f044bf",
    "quickstart/base.yaml": "f5267ecd",
    "quickstart/stage1.yaml": "1e61baad",
    "quickstart/stage2.yaml": "01ab7181",
    "quickstart/sft.yaml": "4679d415",
    "quickstart/eval.yaml": "741802bc",
    "quickstart/sft-from-stage1.yaml": "7410370a",
    "quickstart/eval-from-stage1.yaml": "25a5a900",
}


def test_shipped_pipeline_ids_are_pinned():
    for name, want in PINNED_PIPELINE_IDS.items():
        loaded = load(JOBS / name)
        assert {r.stage: r.id for r in pipeline_stages(loaded.document, loaded.jobs)} == want, name


def test_shipped_job_ids_are_pinned():
    for name, want in PINNED_STANDALONE_IDS.items():
        assert standalone_stage(load(JOBS / name).document).id == want, name


def test_stage_ref_has_one_json_form():
    loaded = load(JOBS / "quickstart/pipeline.yaml")
    for ref in pipeline_stages(loaded.document, loaded.jobs):
        data = ref.to_json()
        assert set(data) == {"pipeline", "stage", "kind", "id", "upstream", "storageRoot"}
        assert StageRef.from_json(data) == ref
