"""The operator's reconcile through random sequences of API faults, over HTTP against kmock.

Each sequence runs one pipeline to its end while, at random, the API server rejects a request
(500, 503, a spurious 409), stores it and loses the response, holds the response past the
client's timeout, answers slowly, or lets another operator (a second copy of the handlers, with
its own locks, as in a rolling update) reconcile the same pipeline while a status patch is on
its way; two operators also reconcile at once, operators restart, and KubeRay runs, fails and
succeeds the RayJobs. The handlers are called directly (kopf's watch loop is what
test_api_faults.py drives; here the point is many interleavings fast). Invariants, checked by
the API server as each RayJob is stored and after every step:

- every RayJob has the planner's name for its stage and attempt, and none is stored twice;
- a stage starts only when every earlier stage has a succeeded RayJob, no other RayJob of the
  pipeline is still running, the stage has not succeeded already, and (a retry) its previous
  attempt failed; no stage gets more than 1 + maxStageRetries attempts;
- the stored status never claims a success that no RayJob had, and no write takes one back
  (a status planned from an older state must not overwrite a newer one);

and at the end, faults off, the pipeline settles: Succeeded or Failed as its RayJobs say, and a
further reconcile creates nothing and writes nothing.
"""

from __future__ import annotations

import asyncio
import collections
import copy
import functools
import os
import random
import time
from typing import Any

import kmock
import kopf
import pytest

from prolong.stage.names import LABEL_PREFIX, PIPELINE_LABEL, STAGE_ID_LABEL, STAGE_LABEL
from tests.operator.apiserver import OPERATOR_CLIENT, Fault, request_of
from tests.operator.conftest import (
    CONFIGMAPS,
    NAMESPACE,
    PIPELINES,
    RAYJOBS,
    Cluster,
    load_handlers,
    pipeline_cr,
    rayjob_for,
    stage_refs,
)

pytestmark = pytest.mark.timeout(120)

SEQUENCES = int(os.environ.get("PROLONG_FAULT_SEQUENCES", "12"))
"""A few seconds each; set it higher for a soak run (e.g. 200, with PROLONG_FAULT_BUDGET_S)."""
STEPS = 24
BUDGET_S = float(os.environ.get("PROLONG_FAULT_BUDGET_S", "30"))
"""No sequence starts after this many seconds (a slow CI machine runs fewer, at least 3)."""
STAGES = ("stage1", "stage2", "sft", "eval")
TARGETS = {
    "create RayJob": request_of(OPERATOR_CLIENT, kmock.action.CREATE, RAYJOBS),
    "create ConfigMap": request_of(OPERATOR_CLIENT, kmock.action.CREATE, CONFIGMAPS),
    "patch status": request_of(OPERATOR_CLIENT, kmock.action.UPDATE, PIPELINES, "status"),
    "list RayJobs": request_of(OPERATOR_CLIENT, kmock.action.LIST, RAYJOBS),
    "get pipeline": request_of(OPERATOR_CLIENT, kmock.action.FETCH, PIPELINES),
}
FAULTS = {  # (target, kind): weight. "race": another operator reconciles during the patch.
    ("patch status", "race"): 3, ("patch status", "reject"): 2, ("patch status", "lose"): 2,
    ("patch status", "hang"): 1, ("create RayJob", "lose"): 2, ("create RayJob", "reject"): 2,
    ("create RayJob", "hang"): 1, ("create RayJob", "slow"): 1, ("create ConfigMap", "lose"): 1,
    ("create ConfigMap", "reject"): 1, ("list RayJobs", "reject"): 1, ("list RayJobs", "hang"): 1,
    ("get pipeline", "reject"): 1, ("get pipeline", "slow"): 1,
}


def terminal(rj: dict) -> str | None:
    """"succeeded" / "failed" for a finished RayJob (as the test plays KubeRay), else None."""
    job = (rj.get("status") or {}).get("jobStatus")
    return {"SUCCEEDED": "succeeded", "FAILED": "failed"}.get(job)


def operator() -> tuple[Any, Any]:
    """An operator process: the handlers loaded afresh (their own locks) and one API client,
    as kopf's startup handler makes it."""
    handlers = load_handlers()
    return handlers, handlers.kube_client()


@functools.cache
def base_cr() -> dict:
    cr = pipeline_cr()
    cr["spec"].update(maxStageRetries=1, retryBackoffSeconds=0)
    return cr


class Sequence:
    def __init__(self, cluster: Cluster, seed: int) -> None:
        self.cluster, self.seed, self.rng = cluster, seed, random.Random(seed)
        self.cr = copy.deepcopy(base_cr())
        self.name = self.cr["metadata"]["name"] = f"p{seed}"
        self.cr["metadata"]["uid"] = f"uid-{seed}"
        self.max_attempts = 2
        self.refs = stage_refs(self.cr)
        self.operators = [operator(), operator()]
        self.violations: list[str] = []
        self.armed: list[Fault] = []
        self.stored: list[str] = []
        self.ever_succeeded: set[str] = set()
        self.log: list[str] = []

    # --- what the API server sees -------------------------------------------------------

    def rayjobs(self) -> dict[str, dict]:
        return {n: rj for n, rj in self.cluster.rayjobs().items()
                if rj["metadata"]["labels"].get(PIPELINE_LABEL) == self.name}

    def on_write(self, request: kmock.Request) -> None:
        if request.resource == PIPELINES and request.subresource == "status":
            if request.name == self.name:
                self.check_status()  # at the moment of each write, not only between steps
            return
        meta = request.data["metadata"]
        if request.resource != RAYJOBS or request.action != kmock.action.CREATE or \
                meta["labels"].get(PIPELINE_LABEL) != self.name:
            return
        name, labels = meta["name"], meta["labels"]
        stage, attempt = labels[STAGE_LABEL], int(labels[f"{LABEL_PREFIX}attempt"])
        self.stored.append(name)
        others = {n: rj for n, rj in self.rayjobs().items() if n != name}
        mine = {rj["metadata"]["labels"][f"{LABEL_PREFIX}attempt"]: rj for rj in others.values()
                if rj["metadata"]["labels"][STAGE_LABEL] == stage}

        def bad(what: str) -> None:
            self.violations.append(f"{name}: {what}")

        if name != rayjob_for(self.cr, stage, attempt) or attempt > self.max_attempts:
            bad(f"not the planner's name for {stage} attempt {attempt}")
        if self.stored.count(name) > 1:
            bad("stored twice")
        if attempt > 1 and terminal(mine.get(str(attempt - 1), {})) != "failed":
            bad(f"attempt {attempt} while attempt {attempt - 1} had not failed")
        if any(terminal(rj) == "succeeded" for rj in mine.values()):
            bad("a stage that had succeeded started again")
        if any(terminal(rj) is None for rj in others.values()):
            bad("started while another RayJob of the pipeline was running")
        for upstream in STAGES[:STAGES.index(stage)]:
            if not any(rj["metadata"]["labels"].get(STAGE_ID_LABEL) == self.refs[upstream].id
                       and terminal(rj) == "succeeded" for rj in others.values()):
                bad(f"started before {upstream} succeeded")

    def check_status(self) -> None:
        status = self.cluster.status(self.name)
        succeeded = {rj["metadata"]["labels"][STAGE_LABEL] for rj in self.rayjobs().values()
                     if terminal(rj) == "succeeded"}
        now = {s["name"] for s in status.get("stages", ()) if s["phase"] == "Succeeded"}
        if now - succeeded:
            self.violations.append(f"status claims {sorted(now - succeeded)} succeeded")
        if self.ever_succeeded - now:
            self.violations.append(f"status took back {sorted(self.ever_succeeded - now)}")
        self.ever_succeeded |= now

    # --- the steps ------------------------------------------------------------------------

    async def reconcile(self, index: int) -> None:
        await self.run(self.operators[index])

    async def run(self, op: tuple[Any, Any]) -> None:
        handlers, api = op
        try:
            await asyncio.to_thread(handlers.reconcile, api, NAMESPACE, self.name)
        except kopf.TemporaryError as err:  # kopf would run the handler again; so do we
            self.log.append(f"  temporary: {err}")

    async def kuberay(self, finish: bool = False) -> None:
        """Move one active RayJob on: to RUNNING, then SUCCEEDED (mostly) or FAILED; at once to
        the end with ``finish``."""
        active = [n for n, rj in self.rayjobs().items() if terminal(rj) is None]
        if not active:
            return
        name = self.rng.choice(active)
        if not finish and (self.rayjobs()[name].get("status") or {}).get("jobStatus") != \
                "RUNNING":
            await self.cluster.set_rayjob(name, "Running", "RUNNING")
        elif self.rng.random() < 0.8:
            await self.cluster.set_rayjob(name, "Complete", "SUCCEEDED")
        else:
            await self.cluster.set_rayjob(name, "Complete", "FAILED", "injected failure")
        self.log.append(f"  kuberay {name}: {self.rayjobs()[name]['status']['jobStatus']}")

    def fault(self) -> None:
        target, kind = self.rng.choices(list(FAULTS), weights=list(FAULTS.values()))[0]
        status = self.rng.choice([500, 503, 409]) if kind == "reject" else 500
        match = TARGETS[target]
        if kind == "race":  # another operator reconciles while this status patch is on its way
            other = self.operators[self.rng.randrange(2)]

            async def race() -> None:  # the status this patch carries is now out of date
                await self.kuberay(finish=True)
                await self.run(other)
            fault = Fault(match, "before", hook=race)
        else:
            fault = Fault(match, kind, status=status, delay=0.05)
        self.cluster.kmock.inject(fault)
        self.armed.append(fault)
        self.log.append(f"  fault: {kind} {status if kind == 'reject' else ''} on {target}")

    async def step(self) -> None:
        what = self.rng.choices(["reconcile", "both", "kuberay", "fault", "restart"],
                                weights=[4, 1, 3, 2, 1])[0]
        self.log.append(what)
        if what == "reconcile":
            await self.reconcile(self.rng.randrange(2))
        elif what == "both":  # two operators at once
            await asyncio.gather(self.reconcile(0), self.reconcile(1))
        elif what == "kuberay":
            await self.kuberay()
        elif what == "fault":
            self.fault()
        else:
            self.operators[self.rng.randrange(2)] = operator()

    async def settle(self) -> str:
        """Faults off; KubeRay finishes what runs, the operator reconciles, until the end."""
        self.cluster.kmock.faults.clear()
        for _ in range(40):
            await self.reconcile(0)
            self.check_status()
            phase = self.cluster.status(self.name).get("phase")
            if phase in ("Succeeded", "Failed"):
                return phase
            await self.kuberay()
        raise AssertionError(f"seed {self.seed}: did not settle; status "
                             f"{self.cluster.status(self.name)}")


def expected_phase(rayjobs: dict[str, dict], max_attempts: int) -> str:
    """What the RayJobs say: Failed when some stage spent its attempts, else Succeeded."""
    for stage in STAGES:
        runs = [rj for rj in rayjobs.values() if rj["metadata"]["labels"][STAGE_LABEL] == stage]
        if not any(terminal(rj) == "succeeded" for rj in runs):
            assert len(runs) == max_attempts and all(terminal(rj) == "failed" for rj in runs)
            return "Failed"
    return "Succeeded"


@pytest.mark.asyncio
async def test_random_fault_sequences_keep_the_invariants(
        cluster: Cluster, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROLONG_API_TIMEOUT_SECONDS", "0.25")  # read when the handlers load
    monkeypatch.setenv("PROLONG_API_BACKOFF_SECONDS", "0.01")
    start = time.monotonic()
    ran = 0
    met: collections.Counter[str] = collections.Counter()  # faults that hit, by kind
    for seed in range(SEQUENCES):
        if time.monotonic() - start > BUDGET_S:
            break
        began = time.monotonic()
        cluster.kmock.objects.clear()  # each sequence on an empty cluster
        seq = Sequence(cluster, seed)
        cluster.kmock.on_write[:] = [seq.on_write]
        await cluster.create_pipeline(seq.cr)
        for _ in range(STEPS):
            cluster.kmock.forget_requests()
            await seq.step()
            seq.check_status()
        phase = await seq.settle()
        history = "\n".join(seq.log)
        assert seq.violations == [], f"seed {seed}:\n{history}"
        assert phase == expected_phase(seq.rayjobs(), seq.max_attempts), f"seed {seed}"
        # Converged: one more reconcile of each operator creates nothing and writes nothing.
        cluster.kmock.forget_requests()
        patches = cluster.status_patches()
        for handlers, api in seq.operators:
            plan = await asyncio.to_thread(handlers.reconcile, api, NAMESPACE, seq.name)
            assert plan.creates == () and plan.deletes == (), f"seed {seed}"
        assert cluster.status_patches() == patches, f"seed {seed}: status still changing"
        ran += 1
        met.update(f.kind if f.kind != "reject" else f"reject {f.status}"
                   for f in seq.armed if f.hits)
        print(f"seed {seed}: {phase}, {len(seq.stored)} RayJobs, "
              f"{time.monotonic() - began:.2f} s")
    assert ran >= min(SEQUENCES, 3), f"only {ran} sequences within {BUDGET_S} s"
    print(f"{ran} sequences; faults met: {dict(met)}")
    # The sequences really meet every kind of fault (else this test would prove little).
    assert set(met) >= {"reject 500", "reject 409", "lose", "hang", "before"}, met

