"""The device's measured bf16 matmul rate: the practical ceiling beside the datasheet peak.

MFU is reported against the datasheet's dense bf16 peak (prolong.model.flops.PEAK_BF16_FLOPS); an
N x N x N bf16 product through torch on random data (never zeros: they run faster than real data)
says how much of that peak a large, perfectly shaped matmul reaches on this card. Timed with CUDA
events, ``--warmup`` products first, the median of ``--repeats``; on CPU (dry runs) fp32 and the
host clock.

Run: ``python bench/matmul_ceiling.py [--n 8192] [--json OUT]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench.common import device_name, resolve_device
from bench.table import table_of, write_atomic


def measure(n: int, warmup: int, repeats: int, device: str) -> dict:
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    gen = torch.Generator(device=device).manual_seed(0)
    a = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    b = torch.randn(n, n, device=device, dtype=dtype, generator=gen)
    for _ in range(warmup):
        torch.mm(a, b)
    times = []
    for _ in range(repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            torch.mm(a, b)
            times.append(time.perf_counter() - t0)
    median = statistics.median(times)
    return {"bench": "matmul", "n": n, "dtype": str(dtype).removeprefix("torch."),
            "device_name": device_name(device), "warmup": warmup, "repeats": repeats,
            "seconds": times, "tflops": 2 * n**3 / median / 1e12}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1")
    result = measure(args.n, args.warmup, args.repeats, resolve_device(args.device))
    print(table_of([result]))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
