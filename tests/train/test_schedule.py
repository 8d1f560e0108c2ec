"""LR schedule: exact values at exact steps, the LambdaLR factory, and rejected combinations."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from prolong.spec import ScheduleSpec
from prolong.train.schedule import build_scheduler, lr_at


def sched(**kw) -> ScheduleSpec:
    return ScheduleSpec.model_validate(kw)


PROLONG_STAGE1 = sched(peakLR=1e-5, warmupRatio=0.1, decay="cosine", minLRRatio=0.1)


@pytest.mark.parametrize(("step", "lr"), [
    (0, 0.0),
    (1, 2e-8),
    (250, 5e-6),
    (499, 1e-5 * 499 / 500),
    (500, 1e-5),            # end of warmup: the peak
    (2750, 5.5e-6),         # half-way through the cosine: (peak + floor) / 2
    (5000, 1e-6),           # the floor, minLRRatio 0.1
    (6000, 1e-6),           # past the end: stays at the floor
])
def test_prolong_stage1(step, lr):
    assert PROLONG_STAGE1.warmup_steps_for(5000) == 500
    assert lr_at(step, PROLONG_STAGE1, 5000) == pytest.approx(lr, rel=1e-12, abs=1e-20)


def test_cosine_quarter_points():
    # progress 1/4: floor + (peak - floor) * (1 + cos(pi/4)) / 2
    want = 1e-6 + 9e-6 * (1 + math.cos(math.pi / 4)) / 2
    assert lr_at(500 + 1125, PROLONG_STAGE1, 5000) == pytest.approx(want, rel=1e-12)


def test_sft_absolute_floor_and_warmup_ratio():
    s = sched(peakLR=2e-5, warmupRatio=0.05, decay="cosine", minLR=2e-6)
    assert lr_at(50, s, 1000) == pytest.approx(2e-5)
    assert lr_at(25, s, 1000) == pytest.approx(1e-5)
    assert lr_at(1000, s, 1000) == pytest.approx(2e-6)


def test_linear_decay():
    s = sched(peakLR=1e-3, warmupSteps=10, decay="linear", minLRRatio=0.0)
    assert lr_at(10, s, 110) == pytest.approx(1e-3)
    assert lr_at(60, s, 110) == pytest.approx(5e-4)
    assert lr_at(85, s, 110) == pytest.approx(2.5e-4)
    assert lr_at(110, s, 110) == pytest.approx(0.0)


def test_constant_after_warmup():
    s = sched(peakLR=3e-4, warmupSteps=4, decay="constant")
    assert [lr_at(i, s, 20) for i in (0, 2, 4, 10, 20, 30)] == pytest.approx(
        [0.0, 1.5e-4, 3e-4, 3e-4, 3e-4, 3e-4])


def test_no_warmup_starts_at_peak():
    s = sched(peakLR=1e-4, warmupSteps=0, decay="cosine", minLRRatio=0.1)
    assert lr_at(0, s, 100) == pytest.approx(1e-4)
    assert lr_at(100, s, 100) == pytest.approx(1e-5)


def test_default_warmup_and_floor():
    s = sched(peakLR=1e-4)  # defaults: warmup 10% of the run, cosine to 10% of the peak
    assert lr_at(10, s, 100) == pytest.approx(1e-4)
    assert lr_at(100, s, 100) == pytest.approx(1e-5)


@settings(max_examples=60, deadline=None)
@given(total=st.integers(2, 3000), ratio=st.floats(0, 0.9), decay=st.sampled_from(
    ["cosine", "linear", "constant"]), floor=st.floats(0, 1))
def test_shape_properties(total, ratio, decay, floor):
    s = sched(peakLR=1e-4, warmupRatio=ratio, decay=decay, minLRRatio=floor)
    warmup = s.warmup_steps_for(total)
    if warmup >= total:
        return  # rejected by the job rules and by lr_at
    lrs = [lr_at(i, s, total) for i in range(total + 2)]
    assert all(a <= b + 1e-18 for a, b in itertools.pairwise(lrs[:warmup + 1]))  # rises
    assert lrs[warmup] == pytest.approx(1e-4)
    tail = lrs[warmup:]
    assert all(a >= b - 1e-18 for a, b in itertools.pairwise(tail))  # then never rises
    assert min(tail) >= s.floor_lr - 1e-18
    assert lrs[total] == pytest.approx(s.floor_lr, abs=1e-18)


def test_lambda_lr_follows_lr_at_and_resumes():
    total = 40
    s = sched(peakLR=1e-3, warmupSteps=5, decay="cosine", minLRRatio=0.1)
    param = torch.nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([param], lr=123.0)  # overwritten: the schedule owns the LR
    sch = build_scheduler(opt, s, total)
    seen = []
    for _ in range(total):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sch.step()
    assert seen == pytest.approx([lr_at(i, s, total) for i in range(total)], rel=1e-12, abs=1e-20)

    # Resume at step 17 from a state dict, as a checkpoint restore does.
    opt2 = torch.optim.SGD([torch.nn.Parameter(torch.zeros(2))], lr=1.0)
    sch2 = build_scheduler(opt2, s, total)
    param3 = torch.nn.Parameter(torch.zeros(2))
    opt3 = torch.optim.SGD([param3], lr=1.0)
    sch3 = build_scheduler(opt3, s, total)
    for _ in range(17):
        opt3.step()
        sch3.step()
    sch2.load_state_dict(sch3.state_dict())
    opt2.param_groups[0]["lr"] = sch2.get_last_lr()[0]
    assert opt2.param_groups[0]["lr"] == pytest.approx(lr_at(17, s, total))
    sch2.step()
    assert sch2.get_last_lr()[0] == pytest.approx(lr_at(18, s, total))


def test_invalid_combinations_are_rejected():
    with pytest.raises(ValidationError, match="warmupRatio or warmupSteps"):
        sched(peakLR=1e-5, warmupRatio=0.1, warmupSteps=10)
    with pytest.raises(ValidationError, match="minLRRatio or minLR"):
        sched(peakLR=1e-5, minLRRatio=0.1, minLR=1e-6)
    with pytest.raises(ValidationError):
        sched(peakLR=0)
    with pytest.raises(ValueError, match="shorter than the run"):
        lr_at(0, sched(peakLR=1e-5, warmupSteps=10), 10)
    with pytest.raises(ValueError, match="total_steps"):
        lr_at(0, PROLONG_STAGE1, 0)
    with pytest.raises(ValueError, match="step"):
        lr_at(-1, PROLONG_STAGE1, 100)
