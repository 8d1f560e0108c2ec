"""Peak GPU memory of each side of bench/train_throughput.py, estimated from shapes before anything
runs, and the row length at which the ours / baseline ratio fits on one GPU.

- **ours**: the plan's own estimate (:func:`prolong.model.memory.estimate_memory`) for the spec the
  benchmark trains (:func:`bench.common.bench_spec`: world 1, ZeRO-3, bf16 on the GPU, activation
  checkpointing, the chunked loss), so it is exactly what ``prolongctl plan`` would print for it.
- **baseline**: a plain transformers step (bench/train_throughput.py's ``Baseline``): fp32 weights,
  gradients and both AdamW moments (16 bytes per parameter, under bf16 autocast), one fp32 hidden
  state per layer and token kept by checkpointing, the recompute of one layer, and the **full
  logits**: the LM head's bf16 output for every position plus two fp32 copies (the loss upcasts
  them, and log-softmax's output and gradient are fp32) -- 10 bytes per position x vocabulary. At
  1B/64K that is 65,536 x 128,256 x 10 = 84 GB, 98 GB with the model states: more than an H100.

:func:`ratio_length` picks the longest candidate length (32K, then 16K) at which both sides fit
in ``fraction`` of the device; the MFU figure keeps 64K with our side alone.

    python bench/peak_memory.py --shape 1b --lengths 32768,16384 --mfu-length 65536
    python bench/peak_memory.py ... --json plan.json   # a table row per estimate (bench/table.py)

The last line printed is ``RATIO_SEQ_LEN=<n>`` (0 when no candidate fits), for gpu_check.sh.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from prolong.model.memory import (
    DEVICE_MEMORY_BYTES,
    GIB,
    TIGHT_FRACTION,
    estimate_memory,
    parameter_count,
)
from prolong.spec import ArchitectureSpec, PretrainSpec

SHAPES = {"tiny": "tiny", "1b": "llama3.2-1b", "8b": "llama3-8b"}  # as bench/common.py's


def architecture(shape: str, layers: int | None = None) -> ArchitectureSpec:
    fields: dict[str, Any] = {"preset": SHAPES[shape]}
    if layers is not None:
        fields["num_layers"] = layers
    return ArchitectureSpec(**fields)


def gpu_spec(arch: ArchitectureSpec, seq_len: int, gpu_type: str = "H100",
             zero_stage: int = 3) -> PretrainSpec:
    """The spec bench/common.bench_spec builds on one GPU of ``gpu_type`` (without asking torch
    which GPU is there, so it runs on a CPU machine)."""
    return PretrainSpec.model_validate({
        "model": {"architecture": arch.model_dump(exclude={"preset"})},
        "data": {"streams": [{"domain": "bench", "path": "unused.jsonl", "format": "jsonl",
                              "proportion": 1.0}]},
        "sequenceLength": seq_len, "globalBatchTokens": seq_len, "steps": 1_000,
        "schedule": {"peakLR": 1e-5, "warmupSteps": 0, "decay": "constant"},
        "parallelism": {"zeroStage": zero_stage, "activationCheckpointing": True},
        "cluster": {"device": "gpu", "nodes": 1, "workersPerNode": 1, "gpuType": gpu_type},
    })


def ours_peak(arch: ArchitectureSpec, seq_len: int, gpu_type: str = "H100") -> float:
    """Our side's peak: the plan's estimate for the benchmark's spec."""
    return estimate_memory(gpu_spec(arch, seq_len, gpu_type), arch).peak


@dataclass(frozen=True)
class BaselineEstimate:
    """Bytes of the transformers baseline at its peak (see the module docstring)."""

    model_states: float
    """fp32 parameters, gradients and AdamW moments: 16 bytes per parameter."""
    checkpoints: float
    """One fp32 hidden state per layer (and the final one) per token."""
    layer: float
    """Recompute + backward of one decoder layer (bf16 activations under autocast)."""
    logits: float
    """The full logits: bf16 and two fp32 copies of positions x vocabulary."""
    hidden_grads: float

    @property
    def peak(self) -> float:
        return (self.model_states + self.checkpoints
                + max(self.layer, self.logits + self.hidden_grads))


def baseline_peak(arch: ArchitectureSpec, seq_len: int,
                  precision: str = "amp") -> BaselineEstimate:
    """The transformers baseline's peak at ``seq_len`` tokens. ``precision`` as
    train_throughput's ``--baseline-precision``: amp (fp32 weights, bf16 autocast; the GPU
    default), bf16 (bf16 weights, gradients and moments) or fp32 (the CPU default)."""
    if precision not in ("amp", "bf16", "fp32"):
        raise ValueError(f"unknown baseline precision {precision!r}")
    n = parameter_count(arch)
    s, h, i, v = seq_len, arch.hidden_size, arch.intermediate_size, arch.vocab_size
    kv = arch.num_key_value_heads * arch.head_dim
    act = 4 if precision == "fp32" else 2  # bytes of a matmul output
    hidden = 2 if precision == "bf16" else 4  # the residual stream (fp32 under autocast)
    attention = (5 * s * h + 3 * s * kv) * act
    mlp = s * h * act + 6 * s * i * act
    hidden_grads = 2 * s * h * hidden
    return BaselineEstimate(
        model_states=(8 if precision == "bf16" else 16) * n,
        checkpoints=(arch.num_layers + 1) * s * h * hidden,
        layer=attention + mlp + hidden_grads,
        # The LM head's output (bf16, or fp32 on CPU), the loss's fp32 copy, and log-softmax's
        # fp32 gradient (fp32 logits are not copied again by the upcast).
        logits=s * v * ((2 if act == 2 else 0) + 4 + 4 + (4 if act == 4 else 0)),
        hidden_grads=hidden_grads,
    )


def ratio_length(arch: ArchitectureSpec, candidates: list[int], device_bytes: float,
                 fraction: float = TIGHT_FRACTION, gpu_type: str = "H100") -> int | None:
    """The longest candidate at which both sides' estimates fit in ``fraction`` of the device."""
    budget = fraction * device_bytes
    for seq_len in sorted(candidates, reverse=True):
        if max(ours_peak(arch, seq_len, gpu_type), baseline_peak(arch, seq_len).peak) <= budget:
            return seq_len
    return None


def plan(shape: str, lengths: list[int], mfu_length: int, device_bytes: float,
         gpu_type: str = "H100", fraction: float = TIGHT_FRACTION) -> dict[str, Any]:
    """The memory plan of a GPU check: both sides at each candidate length, ours at the MFU
    length, and the chosen ratio length (a ``memory_plan`` result for bench/table.py)."""
    arch = architecture(shape)
    rows = []
    for seq_len in sorted(set(lengths) | {mfu_length}, reverse=True):
        base = baseline_peak(arch, seq_len)
        rows.append({"seq_len": seq_len, "ours": ours_peak(arch, seq_len, gpu_type),
                     "baseline": base.peak, "baseline_parts": asdict(base)})
    return {"bench": "memory_plan", "shape": shape, "device_bytes": device_bytes,
            "gpu_type": gpu_type, "fraction": fraction, "mfu_length": mfu_length,
            "ratio_length": ratio_length(arch, lengths, device_bytes, fraction, gpu_type),
            "rows": rows}


def describe(result: dict[str, Any]) -> list[str]:
    budget = result["fraction"] * result["device_bytes"] / GIB
    lines = [f"memory plan, {result['shape']} on {result['gpu_type']} "
             f"({result['device_bytes'] / GIB:.1f} GiB; fits = under {budget:.1f} GiB):"]
    for row in result["rows"]:
        lines.append(f"  S={row['seq_len']:>6}: ours {row['ours'] / GIB:6.1f} GiB, transformers "
                     f"baseline {row['baseline'] / GIB:6.1f} GiB (full logits "
                     f"{row['baseline_parts']['logits'] / GIB:.1f} GiB)")
    chosen = result["ratio_length"]
    lines.append(f"  ratio ours / baseline at S={chosen}; MFU (ours alone) at "
                 f"S={result['mfu_length']}" if chosen else
                 "  no candidate length fits both sides: the ratio is not measured")
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="1b", choices=sorted(SHAPES))
    ap.add_argument("--lengths", default="32768,16384",
                    help="candidate ratio lengths, comma-separated (the longest that fits wins)")
    ap.add_argument("--mfu-length", type=int, default=65536)
    ap.add_argument("--gpu-type", default="H100", choices=sorted(DEVICE_MEMORY_BYTES))
    ap.add_argument("--device-bytes", type=float, default=None,
                    help="the GPU's memory (default: the gpu type's, as nvidia-smi reports it)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    try:
        lengths = [int(x) for x in args.lengths.split(",") if x]
    except ValueError:
        ap.error(f"--lengths must be comma-separated integers, got {args.lengths!r}")
    device_bytes = args.device_bytes or DEVICE_MEMORY_BYTES[args.gpu_type]
    result = plan(args.shape, lengths, args.mfu_length, device_bytes, args.gpu_type)
    print("\n".join(describe(result)))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    print(f"RATIO_SEQ_LEN={result['ratio_length'] or 0}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
