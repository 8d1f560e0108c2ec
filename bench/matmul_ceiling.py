"""The device's two measured ceilings: the bf16 matmul rate and the device-to-device copy rate.

MFU is reported against the datasheet's dense bf16 peak (prolong.model.flops.PEAK_BF16_FLOPS); an
N x N x N bf16 product through torch on random data (never zeros: they run faster than real data)
says how much of that peak a large, perfectly shaped matmul reaches on this card, and a large copy
(bytes read plus bytes written) bounds the memory-bound parts of a step (the device notes,
METHOD.md: measure both ceilings once). Timed with CUDA events, ``--warmup`` runs first, the
median of ``--repeats``; on CPU (dry runs) fp32 and the host clock.

Run: ``python bench/matmul_ceiling.py [--n 8192] [--copy-mib 4096] [--json OUT]``.
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


def copy_rate(mib: int, warmup: int, repeats: int, device: str) -> float:
    """Bytes read plus bytes written per second of a ``mib`` MiB device-to-device copy."""
    src = torch.randn(mib * 2**20 // 4, device=device)
    dst = torch.empty_like(src)
    times = []
    for i in range(warmup + repeats):
        if device == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            dst.copy_(src)
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            dst.copy_(src)
            seconds = time.perf_counter() - t0
        if i >= warmup:
            times.append(seconds)
    return 2 * src.numel() * 4 / statistics.median(times)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=8192)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--repeats", type=int, default=10)
    ap.add_argument("--copy-mib", type=int, default=4096, help="size of the timed copy")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    if args.n < 1 or args.repeats < 1:
        ap.error("--n and --repeats must be >= 1")
    device = resolve_device(args.device)
    result = measure(args.n, args.warmup, args.repeats, device)
    if args.copy_mib > 0:
        result["copy_mib"] = args.copy_mib
        result["copy_tb_per_s"] = copy_rate(args.copy_mib, args.warmup, args.repeats, device) / 1e12
    print(table_of([result]))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
