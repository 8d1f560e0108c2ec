"""The operator's planner (prolong.reconcile.planner.plan_pipeline): observed state in, plan out."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import yaml

from prolong.k8s.rayjob import render_stage
from prolong.reconcile.events import transition_events
from prolong.reconcile.observe import ClusterCondition, ObservedRayJob, rayjob_outcome
from prolong.reconcile.planner import Plan, invalid_spec_status, plan_pipeline, retry_backoff
from prolong.reconcile.status import PipelineStatus
from prolong.specfile import Loaded, dump_yaml, load
from prolong.stage.identity import pipeline_stages
from prolong.stage.names import DNS_1035, RAYJOB_NAME_MAX, attempt_rayjob_name, rayjob_name
from tests.conftest import JOBS

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
STAGES = ["stage1", "stage2", "sft", "eval"]


def _inline(name: str = "prolong-8b/pipeline.yaml") -> dict:
    return yaml.safe_load(dump_yaml(load(JOBS / name).document))


def _load(write_spec, data: dict) -> Loaded:
    return load(write_spec(data, "pipeline.yaml"))


@pytest.fixture(scope="module")
def p8b() -> Loaded:
    return load(JOBS / "prolong-8b/pipeline.yaml")


def ids(loaded: Loaded) -> dict[str, str]:
    return {r.stage: r.id for r in pipeline_stages(loaded.document, loaded.jobs)}


def name_of(loaded: Loaded, stage: str, attempt: int = 1) -> str:
    first = rayjob_name(loaded.jobs[stage].metadata.name, ids(loaded)[stage])
    return attempt_rayjob_name(first, attempt)


def run(loaded: Loaded, stage: str, deployment: str | None = None, job: str | None = None,
        attempt: int = 1, message: str | None = None, **kw) -> ObservedRayJob:
    return ObservedRayJob(name=name_of(loaded, stage, attempt), stage=stage,
                          stage_id=ids(loaded)[stage], attempt=attempt,
                          deployment_status=deployment, job_status=job, message=message, **kw)


def done(loaded: Loaded, stage: str, attempt: int = 1) -> ObservedRayJob:
    return run(loaded, stage, "Complete", "SUCCEEDED", attempt)


def plan(loaded: Loaded, rayjobs=(), **kw) -> Plan:
    kw.setdefault("now", T0)
    kw.setdefault("generation", 1)
    return plan_pipeline(loaded.document, loaded.jobs, rayjobs, **kw)


def phases(p: Plan) -> list[str]:
    return [s.phase for s in p.status.stages]


def cond(status: PipelineStatus, kind: str):
    return next(c for c in status.conditions if c.type == kind)


# --- RayJob status ---------------------------------------------------------------------------

@pytest.mark.parametrize(("deployment", "job", "outcome"), [
    (None, None, "submitted"),
    ("Initializing", None, "submitted"),
    ("Suspended", None, "submitted"),
    ("Running", "PENDING", "running"),
    ("Running", "RUNNING", "running"),
    ("Running", "SUCCEEDED", "running"),      # KubeRay has not finished the deployment yet
    ("Complete", "SUCCEEDED", "succeeded"),
    ("Complete", "FAILED", "failed"),         # Complete is also set when the Ray job failed
    ("Complete", "STOPPED", "failed"),
    ("Complete", None, "failed"),
    ("Failed", None, "failed"),
    ("Failed", "RUNNING", "failed"),
    ("ValidationFailed", None, "failed"),
    ("Running", "FAILED", "failed"),
    ("Retrying", "FAILED", "submitted"),      # KubeRay resubmits itself (backoffLimit > 0)
])
def test_rayjob_outcome(deployment, job, outcome):
    assert rayjob_outcome(deployment, job) == outcome


# --- names ------------------------------------------------------------------------------------

def test_attempt_names_fit_kuberay_and_stay_distinct():
    short = rayjob_name("quickstart-sft", "0123abcd")
    assert attempt_rayjob_name(short, 1) == short
    assert attempt_rayjob_name(short, 2) == short + "-r2"
    longest = rayjob_name("p" * 38 + "-" + "s" * 20, "0123abcd")  # 38-char pipeline, 20-char stage
    other = rayjob_name("p" * 38 + "-" + "s" * 19 + "t", "0123abcd")
    names = {attempt_rayjob_name(n, a) for n in (short, longest, other) for a in range(1, 13)}
    assert len(names) == 36
    for n in names:
        assert len(n) <= RAYJOB_NAME_MAX and DNS_1035.match(n), n
        assert "0123abcd" in n
    assert attempt_rayjob_name(longest, 11).endswith("-0123abcd-r11")
    with pytest.raises(ValueError):
        attempt_rayjob_name(short, 0)


def test_first_attempt_is_named_as_render_stage_names_it(p8b):
    first = plan(p8b).creates[0]
    _, rayjob = render_stage(p8b.document, p8b.jobs, "stage1")
    assert first.name == rayjob["metadata"]["name"]


# --- running in order -------------------------------------------------------------------------

def test_a_new_pipeline_starts_its_first_stage_only(p8b):
    p = plan(p8b, generation=3)
    assert [(c.stage, c.stage_id, c.attempt) for c in p.creates] == [("stage1", ids(p8b)["stage1"], 1)]
    assert p.deletes == ()
    st = p.status
    assert (st.phase, st.current_stage, st.observed_generation) == ("Running", "stage1", 3)
    assert phases(p) == ["Submitted", "Pending", "Pending", "Pending"]
    s1 = st.stages[0]
    assert (s1.ray_job, s1.attempts, s1.start_time) == (name_of(p8b, "stage1"), 1, T0)
    refs = pipeline_stages(p8b.document, p8b.jobs)
    assert [s.output_uri for s in st.stages] == [r.directory for r in refs]
    assert [s.id for s in st.stages] == [r.id for r in refs]
    assert cond(st, "SpecValid").status == "True"
    assert (cond(st, "Ready").status, cond(st, "Ready").reason) == ("False", "Running")
    assert cond(st, "StageFailed").status == "False"
    assert {c.observed_generation for c in st.conditions} == {3}


def test_a_running_stage_blocks_the_next(p8b):
    p = plan(p8b, [run(p8b, "stage1", "Running", "RUNNING", dashboard_url="http://head:8265",
                       message="step 10")])
    assert p.creates == ()
    assert phases(p) == ["Running", "Pending", "Pending", "Pending"]
    assert p.status.stages[0].dashboard_url == "http://head:8265"
    assert p.status.stages[0].message == "step 10"


@pytest.mark.parametrize("i", range(4))
def test_each_success_starts_the_next_stage(p8b, i):
    p = plan(p8b, [done(p8b, s) for s in STAGES[:i]])
    assert [c.stage for c in p.creates] == [STAGES[i]]
    assert phases(p) == ["Succeeded"] * i + ["Submitted"] + ["Pending"] * (3 - i)
    assert p.status.current_stage == STAGES[i]


def test_success_needs_job_status_succeeded(p8b):
    p = plan(p8b, [run(p8b, "stage1", "Running", "SUCCEEDED")])
    assert p.creates == () and phases(p)[0] == "Running"


def test_all_stages_succeeded(p8b):
    end = T0 - timedelta(hours=1)
    p = plan(p8b, [done(p8b, s) for s in STAGES[:3]] +
             [run(p8b, "eval", "Complete", "SUCCEEDED", end_time=end, dashboard_url="x")])
    assert p.creates == () and p.deletes == ()
    assert (p.status.phase, p.status.current_stage) == ("Succeeded", "eval")
    assert phases(p) == ["Succeeded"] * 4
    assert p.status.stages[3].completion_time == end
    assert p.status.stages[3].dashboard_url is None
    assert (cond(p.status, "Ready").status, cond(p.status, "Ready").reason) == ("True", "Succeeded")


# --- failures and retries ---------------------------------------------------------------------

LONG_AGO = T0 - timedelta(hours=2)  # every backoff of the 8B pipeline has passed


def test_a_failed_stage_is_retried_as_a_new_rayjob(p8b):
    p = plan(p8b, [done(p8b, "stage1"),
                   run(p8b, "stage2", "Complete", "FAILED", message="OOM", end_time=LONG_AGO)])
    (retry,) = p.creates
    assert (retry.stage, retry.attempt) == ("stage2", 2)
    assert retry.name == name_of(p8b, "stage2") + "-r2"
    s2 = p.status.stages[1]
    assert (s2.phase, s2.attempts, s2.ray_job) == ("Submitted", 2, retry.name)
    assert "attempt 1 failed" in s2.message and "OOM" in s2.message
    assert "attempt 2 of 3" in s2.message
    assert p.status.phase == "Running"


def test_retries_are_counted_from_the_rayjobs(p8b):
    rayjobs = [done(p8b, "stage1"), run(p8b, "stage2", "Failed", None, 1, end_time=LONG_AGO),
               run(p8b, "stage2", "Complete", "STOPPED", 2, end_time=LONG_AGO)]
    (retry,) = plan(p8b, rayjobs).creates
    assert retry.attempt == 3 and retry.name == name_of(p8b, "stage2", 3)


def test_after_the_last_retry_the_pipeline_fails(p8b):
    assert p8b.document.spec.max_stage_retries == 2
    rayjobs = [done(p8b, "stage1")] + [
        run(p8b, "stage2", "Complete", "FAILED", a, message=f"boom {a}") for a in (1, 2, 3)]
    p = plan(p8b, rayjobs)
    assert p.creates == () and p.deletes == ()
    assert (p.status.phase, p.status.current_stage) == ("Failed", "stage2")
    assert phases(p) == ["Succeeded", "Failed", "Pending", "Pending"]
    s2 = p.status.stages[1]
    assert s2.attempts == 3 and s2.ray_job == name_of(p8b, "stage2", 3)
    assert s2.completion_time == T0
    ready, failed = cond(p.status, "Ready"), cond(p.status, "StageFailed")
    assert (ready.status, ready.reason) == ("False", "Failed")
    assert (failed.status, failed.reason) == ("True", "RetriesExhausted")
    assert "stage stage2 failed after 3 attempts" in failed.message
    assert "boom 3" in failed.message and ready.message == failed.message


def test_retries_back_off_exponentially(p8b):
    spec = p8b.document.spec
    assert (spec.retry_backoff_seconds, spec.retry_backoff_max_seconds) == (60, 1800)
    assert [retry_backoff(spec, n).total_seconds() for n in (1, 2, 3, 5, 9)] == \
        [60, 120, 240, 960, 1800]
    failed_at = T0 - timedelta(seconds=100)  # attempt 2 failed 100 s ago: 120 s to wait
    rayjobs = [done(p8b, "stage1"), run(p8b, "stage2", "Failed", None, 1, end_time=LONG_AGO),
               run(p8b, "stage2", "Complete", "FAILED", 2, message="NCCL timeout",
                   reason="AppFailed", end_time=failed_at)]
    waiting = plan(p8b, rayjobs)
    assert waiting.creates == ()
    s2 = waiting.status.stages[1]
    due = failed_at + timedelta(seconds=120)
    assert (s2.phase, s2.next_attempt_time, waiting.retry_at) == ("Retrying", due, due)
    assert s2.completion_time == failed_at and s2.attempts == 2
    assert "attempt 2 failed" in s2.message and "NCCL timeout" in s2.message
    assert f"attempt 3 of 3 at {due.isoformat(timespec='seconds')}" in s2.message
    assert (waiting.status.phase, waiting.status.current_stage) == ("Running", "stage2")
    reconciling = cond(waiting.status, "Reconciling")
    assert (reconciling.status, reconciling.reason) == ("True", "RetryBackoff")
    assert cond(waiting.status, "Stalled").status == "False"
    # Once the backoff has passed, the third attempt is created.
    later = plan(p8b, rayjobs, now=due, previous=waiting.status)
    assert [(c.stage, c.attempt) for c in later.creates] == [("stage2", 3)]
    assert later.retry_at is None


def test_a_failure_without_an_end_time_waits_from_when_it_was_first_seen(p8b):
    rayjobs = [done(p8b, "stage1"), run(p8b, "stage2", "Failed", None, reason="DeadlineExceeded",
                                        message="preRunningDeadlineSeconds exceeded")]
    first = plan(p8b, rayjobs)
    assert first.status.stages[1].completion_time == T0 and first.creates == ()
    assert "(DeadlineExceeded)" in first.status.stages[1].message
    # The next reconcile keeps the time it first saw the failure, so the wait does not restart.
    again = plan(p8b, rayjobs, now=T0 + timedelta(seconds=59), previous=first.status)
    assert again.creates == () and again.status == first.status
    assert plan(p8b, rayjobs, now=T0 + timedelta(seconds=60), previous=again.status).creates


def test_a_complete_marker_wins_over_what_the_rayjob_says(p8b):
    """The rule in the planner's docstring: COMPLETE is written last by the run itself, so the
    stage succeeded whatever its RayJob says, and it is not retried."""
    stage1 = pipeline_stages(p8b.document, p8b.jobs)[0]
    for rayjob in (run(p8b, "stage1", "Running", "RUNNING"),
                   run(p8b, "stage1", "Complete", "FAILED", message="teardown crashed")):
        p = plan(p8b, [rayjob], complete={stage1.directory})
        s1 = p.status.stages[0]
        assert (s1.phase, s1.ray_job) == ("Succeeded", rayjob.name), rayjob
        assert "COMPLETE marker" in s1.message
        assert [(c.stage, c.attempt) for c in p.creates] == [("stage2", 1)]
        assert p.deletes == ()  # the running one finishes on its own
    skipped = plan(p8b, [], complete={stage1.directory})
    assert skipped.status.stages[0].phase == "Skipped"


def test_a_stage_stuck_before_running_says_why(p8b):
    stuck = run(p8b, "stage1", "Initializing", None, cluster_state=None, cluster_conditions=(
        ClusterCondition("HeadPodReady", "False", "ContainersNotReady", "image pull backoff"),
        ClusterCondition("RayClusterProvisioned", "False", "Unschedulable",
                         "0/12 nodes: insufficient nvidia.com/gpu")))
    s1 = plan(p8b, [stuck]).status.stages[0]
    assert (s1.phase, s1.deployment_status) == ("Submitted", "Initializing")
    assert s1.message.startswith("Initializing: HeadPodReady=False: ContainersNotReady")
    assert "insufficient nvidia.com/gpu" in s1.message
    assert [(c.type, c.status, c.reason) for c in s1.cluster_conditions] == [
        ("HeadPodReady", "False", "ContainersNotReady"),
        ("RayClusterProvisioned", "False", "Unschedulable")]


def test_no_retries_fail_at_once(write_spec):
    data = _inline("quickstart/pipeline.yaml")
    assert data["spec"]["maxStageRetries"] == 0
    qs = _load(write_spec, data)
    p = plan(qs, [run(qs, "stage1", "Failed", None, message="bad image")])
    assert p.creates == () and p.status.phase == "Failed"
    assert "after 1 attempt:" in p.status.stages[0].message


# --- spec changes -----------------------------------------------------------------------------

def test_editing_eval_reruns_only_eval(p8b, write_spec):
    finished = plan(p8b, [done(p8b, s) for s in STAGES])
    data = _inline()
    data["spec"]["stages"][3]["spec"]["samples"] = 50
    edited = _load(write_spec, data)
    p = plan(edited, [done(p8b, s) for s in STAGES], previous=finished.status, generation=2)
    assert [(c.stage, c.stage_id, c.attempt) for c in p.creates] == [("eval", ids(edited)["eval"], 1)]
    assert p.deletes == ()  # the finished old eval RayJob stays as history
    assert phases(p) == ["Succeeded"] * 3 + ["Submitted"]
    assert p.status.stages[:3] == finished.status.stages[:3]
    assert p.status.observed_generation == 2


def test_editing_a_stage_reruns_it_and_the_ones_after_it(p8b, write_spec):
    rayjobs = [done(p8b, "stage1"), run(p8b, "stage2", "Running", "RUNNING")]
    before = plan(p8b, rayjobs)
    data = _inline()
    data["spec"]["stages"][0]["spec"]["rerun"] = 1
    data["spec"]["onSpecChange"] = "replace"
    edited = _load(write_spec, data)
    p = plan(edited, rayjobs, previous=before.status, generation=2)
    assert p.deletes == (name_of(p8b, "stage2"),)  # active run of a superseded id
    assert [(c.stage, c.name) for c in p.creates] == [("stage1", name_of(edited, "stage1"))]
    assert phases(p) == ["Submitted", "Pending", "Pending", "Pending"]
    assert all(a != b for a, b in zip(ids(edited).values(), ids(p8b).values(), strict=True))
    change = p.status.spec_change
    assert change.policy == "replace" and change.replaced == [name_of(p8b, "stage2")]
    events = transition_events(before.status, p.status)
    assert ("Warning", "SpecChangeReplaced") in [(e.type, e.reason) for e in events]
    assert name_of(p8b, "stage2") in next(e.message for e in events
                                          if e.reason == "SpecChangeReplaced")


def test_under_wait_a_superseded_running_stage_runs_to_its_end(p8b, write_spec):
    """onSpecChange wait (the default): the edit keeps the running RayJob; the new id starts
    once it has ended, and the status and Events say so."""
    rayjobs = [done(p8b, "stage1"), run(p8b, "stage2", "Running", "RUNNING")]
    before = plan(p8b, rayjobs)
    data = _inline()
    data["spec"]["stages"][1]["spec"]["seed"] = 7  # a typo fix: stage2's id changes
    edited = _load(write_spec, data)
    assert edited.document.spec.on_spec_change == "wait"
    p = plan(edited, rayjobs, previous=before.status, generation=2)
    old = name_of(p8b, "stage2")
    assert p.deletes == () and p.creates == ()
    assert phases(p) == ["Succeeded", "Pending", "Pending", "Pending"]
    assert (p.status.phase, p.status.current_stage) == ("Running", "stage2")
    assert p.status.spec_change.waiting_for == [old]
    assert cond(p.status, "Reconciling").reason == "WaitingForSupersededRun"
    assert old in cond(p.status, "Reconciling").message
    events = transition_events(before.status, p.status)
    assert [(e.type, e.reason) for e in events] == [("Normal", "SpecChangeWaiting")]
    assert plan(edited, rayjobs, previous=p.status, generation=2).status == p.status

    ended = [done(p8b, "stage1"), run(p8b, "stage2", "Complete", "SUCCEEDED")]
    after = plan(edited, ended, previous=p.status, generation=2)
    assert [(c.stage, c.name) for c in after.creates] == [("stage2", name_of(edited, "stage2"))]
    assert after.status.spec_change.waiting_for == [] and after.status.phase == "Running"
    assert ("Normal", "SpecChangeWaitOver") in [(e.type, e.reason)
                                                for e in transition_events(p.status, after.status)]


def test_a_spec_edited_back_reuses_the_finished_run(p8b, write_spec):
    data = _inline()
    data["spec"]["stages"][3]["spec"]["samples"] = 50
    edited = _load(write_spec, data)
    rayjobs = [done(p8b, s) for s in STAGES] + [run(edited, "eval", "Running", "RUNNING")]
    data = _inline()
    data["spec"]["onSpecChange"] = "replace"
    p = plan(_load(write_spec, data), rayjobs, generation=3)
    assert p.creates == ()
    assert p.deletes == (name_of(edited, "eval"),)
    assert p.status.phase == "Succeeded"
    # wait: the edited-away eval still runs to its end; nothing is left to start.
    p = plan(p8b, rayjobs, generation=3)
    assert p.creates == () and p.deletes == ()
    assert (p.status.phase, p.status.current_stage) == ("Running", "eval")


def test_removed_stages_lose_their_active_rayjobs_under_replace(p8b, write_spec):
    ghost = ObservedRayJob(name="prolong-8b-old-0000aaaa", stage="old", stage_id="0000aaaa",
                           deployment_status="Running", job_status="RUNNING")
    finished_ghost = ObservedRayJob(name="prolong-8b-old-0000bbbb", stage="old",
                                    stage_id="0000bbbb", deployment_status="Complete",
                                    job_status="SUCCEEDED")
    data = _inline()
    data["spec"]["onSpecChange"] = "replace"
    replace = _load(write_spec, data)
    assert plan(replace, [ghost, finished_ghost]).deletes == ("prolong-8b-old-0000aaaa",)
    waiting = plan(p8b, [ghost, finished_ghost])  # wait: it ends first
    assert waiting.deletes == () and waiting.creates == ()


# --- memory: previous status, COMPLETE markers, idempotence -----------------------------------

def test_a_succeeded_stage_stays_succeeded_without_its_rayjob(p8b):
    first = plan(p8b, [done(p8b, "stage1")])
    p = plan(p8b, [], previous=first.status)  # the RayJob was removed since
    assert phases(p)[0] == "Succeeded"
    assert [c.stage for c in p.creates] == ["stage2"]


def test_a_complete_marker_skips_the_stage(p8b):
    refs = pipeline_stages(p8b.document, p8b.jobs)
    p = plan(p8b, complete={refs[0].directory, refs[1].directory})
    assert phases(p) == ["Skipped", "Skipped", "Submitted", "Pending"]
    assert [c.stage for c in p.creates] == ["sft"]
    assert "COMPLETE" in p.status.stages[0].message
    every = plan(p8b, complete={r.directory for r in refs})
    assert every.creates == () and every.status.phase == "Succeeded"


def test_planning_again_is_a_fixed_point(p8b):
    """What a restarted operator sees: the RayJob it created (no status yet) and the status it
    wrote. It creates nothing more and writes the same status (so no patch)."""
    first = plan(p8b)
    (created,) = first.creates
    seen = ObservedRayJob(name=created.name, stage=created.stage, stage_id=created.stage_id,
                          attempt=created.attempt)
    again = plan(p8b, [seen], previous=first.status, now=T0 + timedelta(minutes=5))
    assert again.creates == () and again.deletes == ()
    assert again.status == first.status

    retry = plan(p8b, [done(p8b, "stage1"), run(p8b, "stage2", "Failed", None, end_time=LONG_AGO)],
                 previous=first.status)
    (r2,) = retry.creates
    seen_r2 = run(p8b, "stage2", None, None, attempt=2)
    later = plan(p8b, [done(p8b, "stage1"), run(p8b, "stage2", "Failed", None), seen_r2],
                 previous=retry.status, now=T0 + timedelta(minutes=5))
    assert later.creates == ()
    assert later.status.stages[1].ray_job == r2.name
    assert later.status.stages[1].start_time == T0


def test_conditions_keep_their_transition_time_until_they_change(p8b):
    first = plan(p8b)
    later = plan(p8b, [run(p8b, "stage1", "Running", "RUNNING")], previous=first.status,
                 now=T0 + timedelta(hours=1))
    assert cond(later.status, "Ready").last_transition_time == T0
    end = plan(p8b, [done(p8b, s) for s in STAGES], previous=later.status,
               now=T0 + timedelta(hours=2))
    assert cond(end.status, "Ready").last_transition_time == T0 + timedelta(hours=2)
    assert cond(end.status, "SpecValid").last_transition_time == T0


def test_an_invalid_spec_keeps_the_last_status(p8b):
    before = plan(p8b, [run(p8b, "stage1", "Running", "RUNNING")])
    st = invalid_spec_status(before.status, "spec.stages[3].spec.samples: bad", now=T0, generation=4)
    assert st.stages == before.status.stages and st.phase == "Running"
    assert st.observed_generation == 4
    valid, ready = cond(st, "SpecValid"), cond(st, "Ready")
    assert (valid.status, valid.reason, valid.message) == \
        ("False", "InvalidSpec", "spec.stages[3].spec.samples: bad")
    assert (ready.status, ready.reason) == ("False", "InvalidSpec")
    fresh = invalid_spec_status(None, "x", now=T0)
    assert fresh.phase == "Pending" and fresh.stages == []
    again = invalid_spec_status(st, "x", now=T0 + timedelta(hours=1), generation=4)
    assert cond(again, "SpecValid").last_transition_time == T0


def test_failure_messages_are_one_short_line(p8b):
    logs = "Job entrypoint command failed with exit code 1, last available logs:\n" + "x" * 5000
    p = plan(p8b, [run(p8b, "stage1", "Complete", "FAILED", a, message=logs) for a in (1, 2, 3)])
    message = cond(p.status, "StageFailed").message
    assert "\n" not in message and len(message) < 400 and message.endswith("...")


def test_a_taken_name_is_not_created_and_the_stage_says_why(p8b):
    """A RayJob name that exists but is not the pipeline's: no create, never another name; the
    stage waits with the reason and the pipeline is Stalled until the name is free."""
    reason = f"cannot create RayJob {name_of(p8b, 'stage2')}: controlled by someone else"
    p = plan(p8b, [done(p8b, "stage1")], taken={name_of(p8b, "stage2"): reason})
    assert p.creates == ()
    stage2 = p.status.stages[1]
    assert (stage2.phase, stage2.message, stage2.ray_job) == ("Pending", reason, None)
    assert (p.status.phase, p.status.current_stage) == ("Pending", "stage2")
    conds = {c.type: c for c in p.status.conditions}
    assert (conds["Stalled"].status, conds["Stalled"].reason) == ("True", "NameTaken")
    assert conds["Stalled"].message == reason
    assert (conds["Ready"].reason, conds["Reconciling"].status) == ("NameTaken", "False")
    events = transition_events(None, p.status)
    assert ("Warning", "StageBlocked") in [(e.type, e.reason) for e in events]
    assert transition_events(p.status, p.status) == []  # said once, not on every reconcile
    # Only that attempt's name counts: a retry's name taken blocks the retry, not attempt 1.
    retry = plan(p8b, [run(p8b, "stage1", "Complete", "FAILED")],
                 taken={name_of(p8b, "stage1", 2): reason})
    assert retry.creates == () and retry.status.stages[0].attempts == 1
    free = plan(p8b, [done(p8b, "stage1")], taken={"someone-else": reason})
    assert [c.name for c in free.creates] == [name_of(p8b, "stage2")]
