"""Reading a RayJob object as the planner sees it (the operator and prolongctl use this)."""

from __future__ import annotations

from datetime import datetime, timezone

from prolong.reconcile.observe import observe_rayjob
from prolong.stage.names import LABEL_PREFIX


def test_observing_a_kuberay_rayjob() -> None:
    obj = {"metadata": {"name": "p-stage1-0123abcd-r2", "creationTimestamp": "2026-11-01T10:00:00Z",
                        "labels": {f"{LABEL_PREFIX}stage": "stage1",
                                   f"{LABEL_PREFIX}stage-id": "0123abcd",
                                   f"{LABEL_PREFIX}attempt": "2"}},
           "status": {"jobDeploymentStatus": "Complete", "jobStatus": "FAILED",
                      "message": "exit code 1", "dashboardURL": "p-head-svc:8265",
                      "startTime": "2026-11-01T10:00:05Z", "endTime": "2026-11-01T11:00:00Z"}}
    seen = observe_rayjob(obj)
    assert (seen.stage, seen.stage_id, seen.attempt) == ("stage1", "0123abcd", 2)
    assert seen.outcome == "failed" and seen.message == "exit code 1"
    assert seen.start_time == datetime(2026, 11, 1, 10, 0, 5, tzinfo=timezone.utc)
    assert seen.end_time == datetime(2026, 11, 1, 11, tzinfo=timezone.utc)
    fresh = observe_rayjob({"metadata": {"name": "x", "labels": {}}})
    assert (fresh.attempt, fresh.outcome, fresh.start_time) == (1, "submitted", None)
