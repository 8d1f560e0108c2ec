"""The planner driven through random histories: RayJobs that run, succeed or fail in any order,
operators that restart (with the status kept, or lost), spec edits mid-run. On every step:

- no RayJob is planned twice (a name that exists is never created again);
- no stage starts before every earlier stage has succeeded (or was skipped);
- at most one stage of the current spec runs at a time;
- a stage id that succeeded is never started again, and none gets more than 1 + maxStageRetries
  attempts;
- a retry is never created before its backoff has passed since the failed attempt ended (its
  endTime, else when a reconcile first saw it fail);
- spec.onSpecChange: under ``wait`` an edit never deletes a running RayJob (one whose id the
  edit changed runs to its end), nothing new starts while such a run is active, and so at most
  one RayJob of any id runs at a time; under ``replace`` no RayJob of a superseded id is left
  running after a reconcile. Histories switch between the two as well;

and at the end, with the cluster left to finish, the pipeline settles: Succeeded, or Failed with
its retries spent, and a further reconcile changes nothing.
"""

from __future__ import annotations

import dataclasses
from datetime import datetime, timedelta, timezone

import pytest
import yaml
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from prolong.reconcile.observe import ObservedRayJob
from prolong.reconcile.planner import Plan, plan_pipeline, retry_backoff
from prolong.reconcile.status import PipelineStatus
from prolong.specfile import Loaded, dump_yaml, load
from prolong.stage.identity import pipeline_stages
from tests.conftest import JOBS

T0 = datetime(2026, 11, 1, 12, 0, tzinfo=timezone.utc)
DONE = ("Succeeded", "Skipped")


POLICIES = ("wait", "replace")


@pytest.fixture(scope="module")
def variants(tmp_path_factory) -> dict[tuple[str, str], Loaded]:
    """The quickstart pipeline and three edits of it (one changes only eval, one stage 2 and so
    every stage after it, one every stage), each under both onSpecChange policies."""
    base = yaml.safe_load(dump_yaml(load(JOBS / "quickstart/pipeline.yaml").document))
    # Retries with short backoffs, so that histories reach them: 20 s, 40 s, then 60 s at most.
    base["spec"].update(maxStageRetries=2, retryBackoffSeconds=20, retryBackoffMaxSeconds=60)
    out = {}
    for name, edit in (("base", None), ("eval", (3, "samples", 3)), ("stage2", (1, "seed", 7)),
                       ("stage1", (0, "seed", 7))):
        for policy in POLICIES:
            data = yaml.safe_load(yaml.safe_dump(base))
            data["spec"]["onSpecChange"] = policy
            if edit is not None:
                index, key, value = edit
                data["spec"]["stages"][index]["spec"][key] = value
            path = tmp_path_factory.mktemp(f"{name}-{policy}") / "pipeline.yaml"
            path.write_text(yaml.safe_dump(data, sort_keys=False))
            out[name, policy] = load(path)
    return out


@dataclasses.dataclass
class Cluster:
    rayjobs: dict[str, ObservedRayJob] = dataclasses.field(default_factory=dict)
    complete: set[str] = dataclasses.field(default_factory=set)
    status: PipelineStatus | None = None
    variant: str = "base"
    policy: str = "wait"
    generation: int = 1
    succeeded_ids: set[tuple[str, str]] = dataclasses.field(default_factory=set)
    now: datetime = T0
    failed_seen: dict[str, datetime] = dataclasses.field(default_factory=dict)
    """RayJob name -> when a reconcile first saw it failed."""


def reconcile(cluster: Cluster, loaded: Loaded) -> Plan:
    for rj in cluster.rayjobs.values():
        if rj.outcome == "failed":
            cluster.failed_seen.setdefault(rj.name, cluster.now)
    plan = plan_pipeline(loaded.document, loaded.jobs, list(cluster.rayjobs.values()),
                         now=cluster.now, complete=cluster.complete, previous=cluster.status,
                         generation=cluster.generation)
    order = [r.stage for r in pipeline_stages(loaded.document, loaded.jobs)]
    current = {(r.stage, r.id) for r in pipeline_stages(loaded.document, loaded.jobs)}
    superseded = {rj.name for rj in cluster.rayjobs.values()
                  if rj.active and (rj.stage, rj.stage_id) not in current}
    if loaded.document.spec.on_spec_change == "wait":
        running = {rj.name for rj in cluster.rayjobs.values() if rj.active}
        assert not set(plan.deletes) & running, f"wait deleted a running RayJob {plan.deletes}"
        assert not (superseded and plan.creates), (superseded, plan.creates)
        assert plan.status.spec_change is None or \
            plan.status.spec_change.waiting_for == sorted(superseded)
    else:
        assert set(plan.deletes) == superseded
    phase = {s.name: s.phase for s in plan.status.stages}
    assert len(plan.creates) <= 1, plan.creates
    for run in plan.creates:
        assert run.name not in cluster.rayjobs, f"RayJob {run.name} planned twice"
        earlier = order[: order.index(run.stage)]
        assert all(phase[s] in DONE for s in earlier), (run.stage, phase)
        assert (run.stage, run.stage_id) not in cluster.succeeded_ids, f"{run.stage} re-run"
        assert run.attempt <= 1 + loaded.document.spec.max_stage_retries, run
        if run.attempt > 1:
            (failed,) = [rj for rj in cluster.rayjobs.values() if (rj.stage, rj.stage_id,
                         rj.attempt) == (run.stage, run.stage_id, run.attempt - 1)]
            ended = failed.end_time or cluster.failed_seen[failed.name]
            wait = retry_backoff(loaded.document.spec, failed.attempt)
            assert cluster.now >= ended + wait, (run, ended, wait, cluster.now)
    for name in plan.deletes:
        cluster.rayjobs.pop(name, None)
    for run in plan.creates:
        cluster.rayjobs[run.name] = ObservedRayJob(name=run.name, stage=run.stage,
                                                   stage_id=run.stage_id, attempt=run.attempt)
    cluster.status = plan.status
    active = [rj for rj in cluster.rayjobs.values()
              if rj.active and (rj.stage, rj.stage_id) in current]
    assert len(active) <= 1, [rj.name for rj in active]
    if loaded.document.spec.on_spec_change == "wait":  # old ids included
        assert sum(rj.active for rj in cluster.rayjobs.values()) <= 1, cluster.rayjobs
    else:
        assert not any(rj.active and (rj.stage, rj.stage_id) not in current
                       for rj in cluster.rayjobs.values())
    return plan


OUTCOMES = {"running": ("Running", "RUNNING"), "succeeded": ("Complete", "SUCCEEDED"),
            "failed": ("Complete", "FAILED"), "deploy_failed": ("Failed", None)}
ACTIONS = st.one_of(
    st.just(("reconcile",)),
    st.tuples(st.just("advance"), st.integers(0, 5), st.sampled_from(sorted(OUTCOMES)),
              st.booleans(), st.booleans()),
    st.tuples(st.just("wait"), st.sampled_from([5, 20, 45, 90])),
    st.just(("restart_keep",)),
    st.just(("restart_lose_status",)),
    st.tuples(st.just("edit"), st.sampled_from(["base", "eval", "stage2", "stage1"])),
    st.tuples(st.just("policy"), st.sampled_from(POLICIES)),
)


def advance(cluster: Cluster, loaded: Loaded, k: int, outcome: str, marker: bool,
            end_time: bool = True) -> None:
    """A RayJob (the k-th active one) moves on; a success may also leave its COMPLETE marker.
    An ending carries KubeRay's endTime, or (``end_time`` False) none."""
    active = sorted((rj for rj in cluster.rayjobs.values() if rj.active), key=lambda r: r.name)
    if not active:
        return
    rj = active[k % len(active)]
    deployment, job = OUTCOMES[outcome]
    ended = cluster.now if outcome != "running" and end_time else None
    cluster.rayjobs[rj.name] = dataclasses.replace(rj, deployment_status=deployment,
                                                   job_status=job, end_time=ended)
    if outcome == "succeeded":
        cluster.succeeded_ids.add((rj.stage, rj.stage_id))
        if marker:
            for ref in pipeline_stages(loaded.document, loaded.jobs):
                if (ref.stage, ref.id) == (rj.stage, rj.stage_id):
                    cluster.complete.add(ref.directory)


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(actions=st.lists(ACTIONS, max_size=40))
def test_planner_invariants_hold_through_random_histories(variants, policy, actions):
    cluster = Cluster(policy=policy)
    for action in actions:
        loaded = variants[cluster.variant, cluster.policy]
        kind = action[0]
        if kind == "reconcile" or kind == "restart_keep":  # a restart re-reads everything
            reconcile(cluster, loaded)
        elif kind == "restart_lose_status":
            cluster.status = None
            reconcile(cluster, loaded)
        elif kind == "advance":
            advance(cluster, loaded, *action[1:])
        elif kind == "wait":
            cluster.now += timedelta(seconds=action[1])
        elif kind == "edit" and action[1] != cluster.variant:
            cluster.variant = action[1]
            cluster.generation += 1
        elif kind == "policy" and action[1] != cluster.policy:
            cluster.policy = action[1]
            cluster.generation += 1
    # Left alone, the cluster finishes whatever runs; the pipeline must settle.
    loaded = variants[cluster.variant, cluster.policy]
    for _ in range(40):
        plan = reconcile(cluster, loaded)
        if plan.status.phase in ("Succeeded", "Failed") and not plan.creates:
            break
        for rj in list(cluster.rayjobs.values()):
            if rj.active:
                advance(cluster, loaded, 0, "succeeded", True)
        cluster.now += timedelta(seconds=30)  # backoffs pass
    else:
        pytest.fail(f"the pipeline did not settle: {cluster.status.phase}")
    again = reconcile(cluster, loaded)
    assert not again.creates and not again.deletes and again.status.phase == plan.status.phase


@pytest.mark.parametrize("policy", POLICIES)
@settings(max_examples=40, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much])
@given(before=st.lists(ACTIONS.filter(lambda a: a[0] not in ("edit", "policy")), max_size=12),
       edit=st.sampled_from(["stage1", "stage2"]), after=st.lists(
           st.one_of(st.just(("reconcile",)), st.tuples(st.just("wait"), st.just(45)),
                     st.just(("restart_lose_status",))), max_size=8))
def test_an_id_changing_edit_of_a_running_stage(variants, policy, before, edit, after):
    """Whatever ran before: an edit that changes the id of the stage that runs keeps its RayJob
    running under wait (until it ends, no new stage starts), and deletes it under replace."""
    cluster = Cluster(policy=policy)
    for action in before:
        if action[0] == "advance":
            advance(cluster, variants["base", policy], *action[1:])
        elif action[0] == "wait":
            cluster.now += timedelta(seconds=action[1])
        else:
            if action[0] == "restart_lose_status":
                cluster.status = None
            reconcile(cluster, variants["base", policy])
    reconcile(cluster, variants["base", policy])
    edited = variants[edit, policy]
    ids = {r.stage: r.id for r in pipeline_stages(edited.document, edited.jobs)}
    running = [rj for rj in cluster.rayjobs.values() if rj.active and ids[rj.stage] != rj.stage_id]
    assume(running)
    cluster.generation += 1
    for action in [("reconcile",), *after]:
        if action[0] == "wait":
            cluster.now += timedelta(seconds=action[1])
            continue
        if action[0] == "restart_lose_status":
            cluster.status = None
        plan = reconcile(cluster, edited)
        if policy == "wait":
            assert all(cluster.rayjobs[rj.name].active for rj in running)
            assert plan.creates == () and plan.status.phase == "Running"
            assert plan.status.spec_change.waiting_for == sorted(rj.name for rj in running)
        else:
            assert not any(rj.name in cluster.rayjobs for rj in running)
