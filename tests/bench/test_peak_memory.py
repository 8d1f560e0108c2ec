"""bench/peak_memory.py: each side's estimated peak at the GPU check's shapes, and the ratio length
it picks for an 80 GB H100 (the check's 1B/64K baseline did not fit: the issue-19 finding)."""

from __future__ import annotations

import pytest

from bench import peak_memory as P
from prolong.model.memory import DEVICE_MEMORY_BYTES, GIB, TIGHT_FRACTION, parameter_count

ONE_B = P.architecture("1b")
H100 = DEVICE_MEMORY_BYTES["H100"]


def test_baseline_at_1b_64k_is_the_full_logits_plus_fp32_model_states():
    e = P.baseline_peak(ONE_B, 65536)
    assert e.logits == 65536 * 128256 * (2 + 4 + 4)  # bf16 logits and two fp32 copies
    assert e.logits / 1e9 == pytest.approx(84.1, abs=0.1)
    assert e.model_states == 16 * parameter_count(ONE_B)
    assert e.peak > H100  # it cannot run on an H100: no ratio at 64K
    assert (e.model_states + e.logits) / 1e9 == pytest.approx(103.9, abs=0.1)


def test_ratio_length_is_the_longest_where_both_sides_fit():
    assert P.ratio_length(ONE_B, [32768, 16384], H100) == 32768
    for seq_len in (32768, 16384):
        assert P.baseline_peak(ONE_B, seq_len).peak <= TIGHT_FRACTION * H100
        assert P.ours_peak(ONE_B, seq_len) <= TIGHT_FRACTION * H100
    assert P.ours_peak(ONE_B, 65536) <= TIGHT_FRACTION * H100  # MFU at 64K, ours alone
    # A 48 GB card: only 16K... and a 40 GB one fits neither.
    assert P.ratio_length(ONE_B, [32768, 16384], 48 * GIB) == 16384
    assert P.ratio_length(ONE_B, [32768, 16384], 40 * GIB) is None


def test_baseline_precisions():
    amp, bf16, fp32 = (P.baseline_peak(ONE_B, 4096, p) for p in ("amp", "bf16", "fp32"))
    assert bf16.model_states == amp.model_states / 2
    assert fp32.logits == 4096 * 128256 * 12 and amp.logits == 4096 * 128256 * 10
    with pytest.raises(ValueError, match="precision"):
        P.baseline_peak(ONE_B, 4096, "fp8")


def test_plan_prints_both_estimates_and_the_choice(capsys, tmp_path):
    assert P.main(["--json", str(tmp_path / "plan.json")]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[-1] == "RATIO_SEQ_LEN=32768"
    s64 = next(line for line in out if "S= 65536" in line)
    assert "ours" in s64 and "transformers baseline" in s64 and "full logits 78.3 GiB" in s64
    import json

    from bench.table import table_of
    assert "ratio length (both sides fit)" in table_of([json.loads((tmp_path / "plan.json").read_text())])
