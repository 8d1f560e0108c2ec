"""The benchmarks' own code: table formatting, result rows, the GPU check's argument handling, and
short CPU runs of train_throughput (and, slow, sp_overhead) through the benchmarks' functions, so
that bench/ cannot rot while nobody has a GPU."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import common, sp_overhead, table, train_throughput  # noqa: E402

# ----------------------------------------------------------------------------------------------
# Formatting
# ----------------------------------------------------------------------------------------------


def test_format_table_pads_columns_and_escapes_pipes():
    text = table.format_table([("a", "b|c", "1", "", "x"), ("long name", "", "22", "", "")])
    lines = text.splitlines()
    assert len(lines) == 4
    assert len({len(line) for line in lines}) == 1  # every line padded to the same width
    assert lines[0].startswith("| bench") and set(lines[1]) <= {"|", "-"}
    assert "b\\|c" in lines[2]


def test_format_table_rejects_rows_of_the_wrong_width():
    with pytest.raises(ValueError, match="5 cells"):
        table.format_table([("only", "three", "cells")])


@pytest.mark.parametrize(("fn", "value", "text"), [
    (table.fmt_count, 12_345.4, "12,345"),
    (table.fmt_count, 76_712_345, "76.7M"),
    (table.fmt_count, None, "-"),
    (table.fmt_seconds, 0.1234, "123.4 ms"),
    (table.fmt_seconds, 4.5, "4.50 s"),
    (table.fmt_bytes, 3 * 2**30, "3.00 GiB"),
    (table.fmt_bytes, 300 * 2**20, "300 MiB"),
    (table.fmt_pct, 0.4512, "45.1%"),
    (table.fmt_ratio, 1.3, "1.30x"),
])
def test_number_formats(fn, value, text):
    assert fn(value) == text


def _figures(rows):
    return {(r[0], r[2]): r[3] for r in rows}


def test_rows_of_each_result_kind():
    dl = table.rows_for({"bench": "data_loader", "seq_len": 65536, "rows": 64, "goal": 53_000,
                         "ours_tokens_per_s": 8e7, "streaming_tokens_per_s": 4e7})
    assert _figures(dl)[("data loader", "ratio ours / streaming")] == "2.00x"
    assert "met" in dl[0][4]
    sp = table.rows_for({"bench": "sp_overhead", "loss_rel_diff": 1e-9,
                         "config": {"shape": "tiny", "seq_len": 1024, "rows": 2, "device": "cpu",
                                    "backend": "gloo"},
                         "sp1": {"step_s": 2.0}, "sp2": {"step_s": 1.2}})
    figures = _figures(sp)
    assert figures[("SP overhead", "step-time ratio SP=2 / SP=1")] == "0.60x"
    assert figures[("SP overhead", "rank-time overhead 2*t(SP=2)/t(SP=1) - 1")] == "20.0%"
    assert "CPU/gloo" in sp[2][4]
    part = table.rows_for({"bench": "part", "name": "gpu tests", "status": "skipped",
                           "seconds": 3.0, "detail": "no CUDA"})
    assert part == [("gpu check", "gpu tests", "status", "SKIPPED", "no CUDA; 3 s")]
    blank = table.rows_for({"bench": "not_measured", "case": "1b S=65536", "figure": "ratio",
                            "reason": "no CUDA device", "target": ">= 1.3x"})
    assert blank[0][3] == "not measured" and ">= 1.3x" in blank[0][4]
    ceilings = table.rows_for({"bench": "matmul", "n": 8192, "dtype": "bfloat16",
                               "device_name": "NVIDIA H200", "warmup": 3, "repeats": 10,
                               "tflops": 788.4, "copy_mib": 4096, "copy_tb_per_s": 4.31})
    assert [r[3] for r in ceilings] == ["788", "4.31"]
    with pytest.raises(ValueError, match="unknown result kind"):
        table.rows_for({"bench": "nope"})


def test_throughput_rows_report_oom_and_the_ratio_only_when_both_ran():
    side = {"status": "ok", "label": "x", "tokens_per_s": 1000.0, "step_s": 2.0,
            "tflops_dense": 1.0, "tflops_causal": 0.5, "mfu_dense": 0.4, "mfu_causal": 0.2,
            "peak_bytes": 2**30}
    result = {"bench": "train_throughput",
              "config": {"shape": "1b", "seq_len": 65536, "rows": 1, "docs": "one",
                         "device": "cuda", "device_name": "NVIDIA H200", "precision": "bf16",
                         "memory_kind": "CUDA allocated"},
              "ours": side, "baseline": {"status": "oom", "label": "y", "reason": "OOM: 2 GiB",
                                         "peak_bytes": None}}
    figures = _figures(table.rows_for(result))
    assert figures[("train throughput", "ours tokens/s")] == "1,000"
    assert figures[("train throughput", "transformers baseline tokens/s")] == "OOM"
    assert figures[("train throughput", "peak CUDA allocated (ours / transformers baseline)")] == \
        "1.00 GiB / -"
    assert ("train throughput", "ratio ours / baseline") not in figures
    assert "MFU causal 20.0% / dense 40.0%" in table.rows_for(result)[0][4]


def test_table_cli_writes_the_table_and_merged_json(tmp_path, capsys):
    good = tmp_path / "a.json"
    good.write_text(json.dumps({"bench": "part", "name": "x", "status": "ok", "seconds": 1}))
    broken = tmp_path / "b.json"
    broken.write_text("{not json")
    md, merged = tmp_path / "out" / "figures.md", tmp_path / "out" / "figures.json"
    assert table.main([str(good), str(broken), "--markdown", str(md), "--merged-json",
                       str(merged), "--title", "T"]) == 0
    assert md.read_text() == capsys.readouterr().out
    assert md.read_text().startswith("T\n\n| bench")
    assert "UNREADABLE" in md.read_text()  # a broken result is a row, not a crash
    assert [r["status"] for r in json.loads(merged.read_text())] == ["ok", "unreadable"]
    assert not [p for p in md.parent.iterdir() if p.name.startswith(".")]  # no temporary left
    lacking = tmp_path / "c.json"
    lacking.write_text(json.dumps({"bench": "matmul"}))
    assert table.main([str(lacking)]) == 2


# ----------------------------------------------------------------------------------------------
# Rows and labels
# ----------------------------------------------------------------------------------------------


def test_hf_labels_shift_back_to_the_packed_rows_labels():
    row = common.make_rows(4096, 1, 256, docs="mixed", seed=0)[0]
    assert len(row.doc_lengths) > 1
    labels = common.hf_labels(row.shift_labels)
    # transformers' ForCausalLMLoss: pad one -100 at the end, drop the first position.
    shifted = torch.nn.functional.pad(labels, (0, 1), value=-100)[..., 1:]
    assert torch.equal(shifted, row.shift_labels)


def test_shapes():
    assert common.architecture("1b").num_layers == 16
    eight = common.architecture("8b", layers=4)
    assert (eight.num_layers, eight.hidden_size) == (4, 4096)
    assert common.shape_label("8b", eight) == "8b[4/32 layers]"
    with pytest.raises(ValueError, match="unknown shape"):
        common.architecture("70b")


def test_train_throughput_rejects_bad_arguments(capsys):
    with pytest.raises(SystemExit) as exc:
        train_throughput.parse_args(["--seq-len", "0"])
    assert exc.value.code == 2 and "--seq-len must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exc:
        train_throughput.run(train_throughput.parse_args(["--baseline-precision", "amp",
                                                          "--device", "cpu"]))
    assert exc.value.code == 2 and "needs --device cuda" in capsys.readouterr().err


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without CUDA")
def test_cuda_requested_without_cuda_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exc:
        common.resolve_device("cuda")
    assert exc.value.code == 2 and "torch sees no CUDA device" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Short CPU runs through the benchmarks' own functions
# ----------------------------------------------------------------------------------------------


def test_train_throughput_two_cpu_steps_of_the_tiny_shape(tmp_path):
    args = train_throughput.parse_args(["--device", "cpu", "--shape", "tiny", "--seq-len", "128",
                                        "--docs", "mixed", "--warmup", "0", "--steps", "2",
                                        "--json", str(tmp_path / "r.json")])
    result = train_throughput.run(args)
    ours, base = result["ours"], result["baseline"]
    assert ours["status"] == base["status"] == "ok", (ours, base)
    assert len(ours["step_s_all"]) == len(base["step_s_all"]) == 2
    assert result["config"]["attention_ours"] == "sdpa"
    assert result["ratio"] == pytest.approx(ours["tokens_per_s"] / base["tokens_per_s"])
    # Same weights, same rows, fp32: the first step's losses are the same loss.
    assert result["loss_rel_diff"] < 1e-5
    # Both trained: the second step's loss moved.
    assert ours["losses"][1] != ours["losses"][0] and base["losses"][1] != base["losses"][0]
    assert ours["tokens_per_step"] == 128 and ours["mfu_causal"] is None  # no CPU peak
    assert ours["tflops_causal"] < ours["tflops_dense"]  # mixed documents: causal < dense
    text = table.table_of([result])
    assert "ratio ours / baseline" in text and "CPU ratio" in text
    # The recorded command reproduces the figures (where --json wrote them is left out).
    assert result["command"] == ("python bench/train_throughput.py --device cpu --shape tiny "
                                 "--seq-len 128 --docs mixed --warmup 0 --steps 2")


def _gpu_check(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), *args],
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize(("args", "message"), [
    (["--bogus"], "unknown argument '--bogus'"),
    (["--budget", "soon"], "--budget must be a whole number of seconds"),
    (["--budget", "30"], "--budget must be at least 60 seconds"),
    (["--wheels", "/nonexistent/wheels", "--cpu-dry-run"], "is not a directory"),
    (["--out"], "--out needs a directory"),
])
def test_gpu_check_rejects_bad_arguments(args, message):
    proc = _gpu_check(*args)
    assert proc.returncode == 2, proc.stderr
    assert message in proc.stderr and proc.stderr.count("\n") == 1


def test_gpu_check_help():
    proc = _gpu_check("--help")
    assert proc.returncode == 0 and "--cpu-dry-run" in proc.stdout


@pytest.mark.bench
def test_sp_overhead_runs_both_layouts_on_cpu():
    args = sp_overhead.parse_args(["--device", "cpu", "--seq-len", "64", "--rows", "2",
                                   "--warmup", "0", "--steps", "1", "--timeout", "240"])
    result = sp_overhead.run(args)
    assert result["sp1"]["world"] == 1 and result["sp2"]["world"] == 2
    assert result["ratio"] == pytest.approx(result["sp2"]["step_s"] / result["sp1"]["step_s"])
    assert result["loss_rel_diff"] < 1e-5  # SP parity on the first step
    assert "rank-time overhead" in table.table_of([result])


@pytest.mark.bench
def test_gpu_check_cpu_dry_run_writes_its_table(tmp_path):
    """The whole GPU check at CPU sizes: every part runs or says why not, the table and the
    merged figures land in the output directory, within the device's 8-file limit."""
    out, wheels = tmp_path / "out", tmp_path / "wheels"
    wheels.mkdir()
    proc = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "--cpu-dry-run",
                           "--out", str(out), "--wheels", str(wheels), "--budget", "540"],
                          capture_output=True, text=True, timeout=620)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and {"figures.md", "figures.json", "env.txt"} <= set(files), files
    figures = json.loads((out / "figures.json").read_text())
    kinds = [r["bench"] for r in figures]
    assert kinds.count("train_throughput") == 3 and "matmul" in kinds, kinds
    parts = {r["name"]: r["status"] for r in figures if r["bench"] == "part"}
    assert parts == {"install": "skipped", "gpu tests": "ok", "flex test": "ok"}, parts
    # The memory plan is made for the real card (an 80 GB H100): the ratio runs where both sides
    # fit, the MFU at 64K with ours alone.
    plan = next(r for r in figures if r["bench"] == "memory_plan")
    assert plan["ratio_length"] == 32768 and plan["mfu_length"] == 65536
    ratio, mfu, probe = [r for r in figures if r["bench"] == "train_throughput"]
    assert "baseline" in ratio and "baseline" not in mfu and "baseline" not in probe
    assert probe["ours"]["status"] == "ok" and probe["ours"]["plan_peak_bytes"] > 0
    assert probe["config"]["purpose"].startswith("memory probe (world 1")
    md = (out / "figures.md").read_text()
    assert f"command: bash bench/gpu_check.sh --cpu-dry-run --out {out}" in md
    assert "ratio ours / baseline" in md and "no wheels in" in md
    assert "peak estimated (ours / transformers baseline)" in md
    assert "PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True" in md
