"""PROLONG_FAULT: fires at the named point on rank 0, once per stage directory."""

from __future__ import annotations

import pytest

from prolong.stage.directory import StageDir
from prolong.train.faults import FAULT_ENV, InjectedFault, maybe_fault


def test_fault_fires_once_at_its_point(tmp_path, monkeypatch):
    stage = StageDir(str(tmp_path / "p" / "s-1"))
    monkeypatch.setenv(FAULT_ENV, "step:3")
    maybe_fault("step", 2, stage, rank=0)  # not the step
    maybe_fault("save", 3, stage, rank=0)  # not the point
    maybe_fault("step", 3, stage, rank=1)  # not rank 0
    with pytest.raises(InjectedFault, match="injected fault"):
        maybe_fault("step", 3, stage, rank=0)
    maybe_fault("step", 3, stage, rank=0)  # the restarted run goes through


def test_no_fault_without_the_variable(tmp_path, monkeypatch):
    monkeypatch.delenv(FAULT_ENV, raising=False)
    maybe_fault("step", 1, StageDir(str(tmp_path / "s")), rank=0)
