"""``make bench``: every benchmark this machine can run, then one table of all their figures.

Each benchmark runs in its own process (``--json`` into a temporary directory), under its own
time limit, so one that fails or hangs becomes a FAILED row and the others still report. On a
machine without CUDA the GPU figures of issue 10 are listed as not measured, with their targets;
with CUDA the single-GPU throughput cases run too (SP=2 on CUDA needs two GPUs).

CPU sizes are chosen to finish in a few minutes on 2 cores: the data loader at S=65,536 with 8
steps of 8 rows (best of 2), the throughput bench on the tiny shape at 1,024 tokens (one
document) and 4,096 tokens (mixed documents), 5 timed steps per side, and the SP overhead on
the tiny shape at 1,024 tokens with 2 rows per step, 3 timed steps per layout.

Run: ``.venv/bin/python bench/run_all.py [--markdown OUT.md] [--quick]``.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import today, versions_summary
from bench.table import load_results, table_of, write_atomic

BENCH = Path(__file__).resolve().parent

GPU_TARGETS = [
    # (case, figure, target) of issue 10 that need a CUDA device.
    ("1b S=65536 x1 (one doc)", "ours / transformers tokens/s", ">= 1.3x"),
    ("1b S=65536 x1 (one doc)", "MFU, document-causal", ">= 45%"),
    ("1b S=16384 and S=131072 x1 (one doc)", "ours / transformers tokens/s", "(recorded; no target)"),
    ("8b[4/32 layers] S=65536 (one rank's share of 512K at SP=8)", "tokens/s, peak CUDA memory",
     "(recorded; the plan's estimate to compare)"),
    ("SP=2 vs SP=1 on two GPUs", "rank-time overhead", "<= 10%"),
    ("flash_attn / torch_varlen / flex vs SDPA", "pytest -m gpu (fwd+bwd, GQA)", "all pass"),
]


def cases(cuda: bool, quick: bool) -> list[tuple[str, list[str], float]]:
    """(name, argv, timeout seconds) of each benchmark to run here."""
    py = sys.executable
    steps = ["--warmup", "1", "--steps", "2" if quick else "3"]
    # More timed steps for the throughput ratio: on a shared 2-core machine one step's time
    # swings by tens of percent, and the median of 5 moves less than that of 3.
    tp_steps = ["--warmup", "1", "--steps", "2" if quick else "5"]
    out = [
        ("data loader", [py, str(BENCH / "data_loader.py"), "--steps", "4" if quick else "8",
                         "--repeats", "1" if quick else "2"], 300.0),
        ("train throughput tiny S=1024",
         [py, str(BENCH / "train_throughput.py"), "--device", "cpu", "--shape", "tiny",
          "--seq-len", "1024", *tp_steps], 240.0),
        ("train throughput tiny S=4096 mixed",
         [py, str(BENCH / "train_throughput.py"), "--device", "cpu", "--shape", "tiny",
          "--seq-len", "4096", "--docs", "mixed", *tp_steps], 300.0),
        ("SP overhead tiny S=1024",
         [py, str(BENCH / "sp_overhead.py"), "--device", "cpu", "--seq-len", "1024", "--rows",
          "2", *steps], 420.0),
    ]
    if cuda:
        for s in (16384, 65536, 131072):
            out.append((f"train throughput 1b S={s} (CUDA)",
                        [py, str(BENCH / "train_throughput.py"), "--device", "cuda", "--shape",
                         "1b", "--seq-len", str(s), "--warmup", "2", "--steps", "5"], 600.0))
        out.append(("train throughput 8b[4 layers] S=65536 (CUDA)",
                    [py, str(BENCH / "train_throughput.py"), "--device", "cuda", "--shape", "8b",
                     "--layers", "4", "--seq-len", "65536", "--warmup", "2", "--steps", "5"],
                    600.0))
    return out


def run_case(name: str, argv: list[str], timeout: float, out: Path) -> dict[str, Any] | None:
    """Run one benchmark with ``--json out``; None on success, else a failed ``part`` result."""
    t0 = time.monotonic()
    print(f"[bench] {name} ...", file=sys.stderr, flush=True)
    try:
        proc = subprocess.run([*argv, "--json", str(out)], capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    except subprocess.TimeoutExpired:
        return {"bench": "part", "name": name, "status": "timeout",
                "detail": f"killed after {timeout:.0f} s", "seconds": timeout}
    seconds = time.monotonic() - t0
    print(f"[bench] {name}: {seconds:.0f} s", file=sys.stderr, flush=True)
    if proc.returncode or not out.exists():
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
        return {"bench": "part", "name": name, "status": "failed",
                "detail": f"exit {proc.returncode}: {tail[0][:200]}", "seconds": seconds}
    return None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--markdown", type=Path, default=None, help="also write the table here")
    ap.add_argument("--quick", action="store_true", help="fewer steps (a smoke run)")
    args = ap.parse_args(argv)
    import torch

    cuda = torch.cuda.is_available()
    t0 = time.monotonic()
    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-all-") as tmp:
        for i, (name, cmd, timeout) in enumerate(cases(cuda, args.quick)):
            out = Path(tmp) / f"{i:02d}.json"
            failed = run_case(name, cmd, timeout, out)
            results.extend([failed] if failed else load_results([out]))
    if not cuda:
        results += [{"bench": "not_measured", "group": "GPU", "case": case, "figure": figure,
                     "reason": "no CUDA device on this machine", "target": target}
                    for case, figure, target in GPU_TARGETS]
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    title = (f"make bench, {today()}, {time.monotonic() - t0:.0f} s, load average {load:.1f} "
             f"on {os.cpu_count()} CPUs\n{versions_summary()}")
    commands = [f"- {r['command']}" for r in results if r.get("command")]
    text = f"{title}\n\n{table_of(results)}\n\ncommands (from the repository root):\n" + \
        "\n".join(commands) + "\n"
    print(text, end="")
    if args.markdown:
        write_atomic(args.markdown, text)
    return 1 if any(r.get("status") in ("failed", "timeout") for r in results) else 0


if __name__ == "__main__":
    raise SystemExit(main())
