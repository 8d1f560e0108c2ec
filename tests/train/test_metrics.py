"""Step metrics: throughput and both MFU conventions from real document lengths."""

from __future__ import annotations

import pytest

from prolong.model.flops import PEAK_BF16_FLOPS, matmul_params
from prolong.spec import ArchitectureSpec
from prolong.train.metrics import make_step_metrics, step_flops, with_save_time

ARCH = ArchitectureSpec(preset="llama3-8b")


def test_mfu_conventions_on_known_rows():
    rows = [[65536], [8192] * 8]  # one long document; eight short ones
    dense_step, causal_step = step_flops(ARCH, 65536, rows)
    m = make_step_metrics(step=1, loss=2.0, lr=1e-5, grad_norm=1.0, seconds=10.0, tokens=131072,
                          dense_flops=dense_step, causal_flops=causal_step, valid_tokens=131000,
                          devices=2, device_kind="gpu", gpu_type="H100",
                          tokens_per_domain={"books": 65536})
    n6 = 6 * matmul_params(ARCH)
    lhd = 32 * 32 * 128
    dense = 2 * 65536 * (n6 + 12 * lhd * 65536)
    causal = 65536 * (n6 + 6 * lhd * 65536) + 65536 * (n6 + 6 * lhd * 8192)
    peak = PEAK_BF16_FLOPS["H100"] * 2 * 10.0
    assert m.tokens == 131072 and m.tokens_per_s_per_device == pytest.approx(131072 / 20)
    assert m.mfu_dense == pytest.approx(dense / peak)
    assert m.mfu_doc_causal == pytest.approx(causal / peak)
    assert m.mfu_doc_causal < m.mfu_dense


def test_cpu_has_no_mfu():
    dense_step, causal_step = step_flops(ArchitectureSpec(preset="tiny"), 256, [[100, 156]])
    m = make_step_metrics(step=1, loss=2.0, lr=1e-3, grad_norm=None, seconds=1.0, tokens=256,
                          dense_flops=dense_step, causal_flops=causal_step, valid_tokens=254,
                          devices=2, device_kind="cpu", gpu_type="H100", tokens_per_domain={})
    assert m.mfu_dense is None and m.mfu_doc_causal is None and m.tokens_per_s == 256


def test_every_dashboard_metric_is_exported():
    from prolong.k8s.dashboard import dashboard
    from prolong.train.metrics import METRICS, StepMetrics

    fields = set(StepMetrics.__dataclass_fields__)
    assert {m.step_field for m in METRICS} <= fields
    assert len({m.name for m in METRICS}) == len(METRICS)
    assert [p["title"] for p in dashboard()["panels"]] == [m.title for m in METRICS]


def test_throughput_and_mfu_are_over_the_wall_time():
    """The data wait and a checkpoint save count: over the step's 10 s alone the figures would
    read 30% high here (13 s of wall time)."""
    dense_step, causal_step = step_flops(ARCH, 65536, [[65536]])
    kw = dict(step=5, loss=2.0, lr=1e-5, grad_norm=1.0, seconds=10.0, tokens=65536,
              dense_flops=dense_step, causal_flops=causal_step, valid_tokens=65535, devices=1,
              device_kind="gpu", gpu_type="H100", tokens_per_domain={})
    compute_only = make_step_metrics(**kw)
    m = make_step_metrics(**kw, data_s=1.0, wall_s=11.5)
    assert (m.seconds, m.data_s, m.save_s, m.wall_s) == (10.0, 1.0, 0.0, 11.5)
    assert m.tokens_per_s == pytest.approx(65536 / 11.5)
    assert m.mfu_dense == pytest.approx(compute_only.mfu_dense * 10.0 / 11.5)
    # The wall time is never shorter than its parts.
    assert make_step_metrics(**kw, data_s=2.0, wall_s=3.0).wall_s == 12.0
    saved = with_save_time(m, 1.5)
    assert (saved.save_s, saved.wall_s, saved.seconds) == (1.5, 13.0, 10.0)
    assert saved.tokens_per_s == pytest.approx(65536 / 13.0)
    assert saved.tokens_per_s_per_device == pytest.approx(65536 / 13.0)
    assert saved.mfu_dense == pytest.approx(compute_only.mfu_dense * 10.0 / 13.0)
    assert saved.mfu_doc_causal == pytest.approx(compute_only.mfu_doc_causal * 10.0 / 13.0)
    record = saved.as_record()
    assert (record["data_s"], record["save_s"], record["wall_s"]) == (1.0, 1.5, 13.0)
    cpu = with_save_time(make_step_metrics(**{**kw, "device_kind": "cpu"}), 2.0)
    assert cpu.mfu_dense is None and cpu.tokens_per_s == pytest.approx(65536 / 12.0)
