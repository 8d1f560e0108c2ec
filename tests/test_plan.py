"""The planner reproduces ProLong's budgets: steps, tokens and GPU-hours per stage."""

from __future__ import annotations

import pytest

from prolong.plan import plan_stage
from prolong.spec import resolved_architecture
from prolong.specfile import load
from prolong.stage.identity import pipeline_stages
from tests.conftest import JOBS


@pytest.fixture(scope="module")
def prolong_plan():
    loaded = load(JOBS / "prolong-8b/pipeline.yaml")
    return {r.stage: plan_stage(loaded.jobs[r.stage], r,
                                resolved_architecture(loaded.jobs[r.stage], loaded.jobs))
            for r in pipeline_stages(loaded.document, loaded.jobs)}


def test_steps_and_tokens(prolong_plan):
    assert [prolong_plan[s].steps for s in ("stage1", "stage2", "sft")] == [5000, 2500, 250]
    assert [prolong_plan[s].tokens for s in ("stage1", "stage2", "sft")] == [
        20_971_520_000, 20_971_520_000, 1_048_576_000]


def test_gpu_hours_match_prolongs_reported_budget(prolong_plan):
    # ProLong reports 2.2K H100-hours for stage 1 and 12.2K for stage 2; the dense convention at
    # MFU 0.4 lands within 5% of both.
    assert prolong_plan["stage1"].gpu_hours == pytest.approx(2200, rel=0.05)
    assert prolong_plan["stage2"].gpu_hours == pytest.approx(12200, rel=0.06)
    assert prolong_plan["eval"].gpu_hours > 0


def test_rows_and_parallel_layout(prolong_plan):
    s2 = prolong_plan["stage2"]
    assert (s2.rows_per_step, s2.sp, s2.dp, s2.micro_batches_per_rank) == (16, 8, 8, 2)
    assert prolong_plan["stage1"].warmup_steps == 500


def test_domain_tokens_add_up(prolong_plan):
    s2 = prolong_plan["stage2"]
    assert sum(d.tokens for d in s2.domains) == pytest.approx(s2.tokens)
    books = {d.domain: d.tokens for d in s2.domains}
    assert books["books-64k"] == pytest.approx(0.25 * s2.tokens)


def test_long_documents_set_document_causal_cost(prolong_plan):
    # Stage 2's 512K documents make its attention much costlier per token than stage 1's.
    assert prolong_plan["stage2"].flops_doc_causal > 2 * prolong_plan["stage1"].flops_doc_causal
    assert prolong_plan["stage1"].flops_doc_causal < prolong_plan["stage1"].flops_dense


def test_cpu_stage_has_no_gpu_hours():
    loaded = load(JOBS / "quickstart/stage1.yaml")
    job = loaded.document
    from prolong.stage.identity import standalone_stage
    p = plan_stage(job, standalone_stage(job), job.spec.model.architecture)
    assert p.gpu_hours is None and p.steps == job.spec.steps
    assert p.tokens == job.spec.steps * job.spec.global_batch_tokens


def test_standalone_stage_without_architecture_says_so():
    loaded = load(JOBS / "prolong-8b/eval.yaml")
    from prolong.stage.identity import standalone_stage
    p = plan_stage(loaded.document, standalone_stage(loaded.document), None)
    assert p.total_flops is None and any("architecture" in n for n in p.notes)
