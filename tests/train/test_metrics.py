"""Step metrics: throughput and both MFU conventions from real document lengths."""

from __future__ import annotations

import pytest

from prolong.model.flops import PEAK_BF16_FLOPS, matmul_params
from prolong.spec import ArchitectureSpec
from prolong.train.metrics import make_step_metrics, step_flops

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
