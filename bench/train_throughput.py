"""Training throughput: our engine against a plain transformers training step, in one process.

Both sides train the same model (one ``LlamaForCausalLM`` config, :func:`prolong.model.build.
llama_config`; the baseline starts from our initial weights) on the same packed rows (random
tokens through the real packer, documents delimited by ``position_ids``), with activation
checkpointing (non-reentrant, per decoder layer) and torch AdamW with the spec's settings and
gradient clipping:

- **ours**: the trainer's path, as :mod:`prolong.train.loop` builds it: ``build_model`` with the
  spec's attention backend (``auto``: flash-attn, then torch's varlen kernel, then flex, then the
  SDPA reference), ``apply_ulysses`` (nothing to wrap at SP 1), ``build_engine`` (DeepSpeed ZeRO,
  default stage 3 as the spec's default, bf16 with fp32 master weights on GPU), the chunked
  ``packed_lm_loss``, one ``train_step`` per optimizer step.
- **baseline**: ``AutoModelForCausalLM.from_config`` with ``flash_attention_2`` when flash-attn is
  importable, else ``sdpa`` (transformers derives the packed documents from ``position_ids``
  either way), HF labels, the model's own full-logits loss normalised by the step's valid tokens
  (``num_items_in_batch``, as HF Trainer does), ``clip_grad_norm_``, ``AdamW.step``. On GPU it
  keeps fp32 weights under bf16 autocast (HF Trainer's ``bf16=True`` without DeepSpeed: the same
  fp32 master copy our bf16 ZeRO keeps); ``--baseline-precision bf16`` trains bf16 weights
  directly instead (less memory, a numerically weaker recipe).

Reported per side: median step time of ``--steps`` timed steps after ``--warmup`` untimed ones
(the device synchronised around each), tokens/s, achieved FLOP/s and MFU in both conventions of
:mod:`prolong.model.flops` (document-causal 6N + 6·L·H·d·Σd²/S, and dense 6N + 12·L·H·d·S,
through the trainer's ``step_flops``), peak memory (CUDA: ``max_memory_allocated`` over the timed
steps; CPU: the RSS high-water mark above the RSS before the side was built), and the ratio
ours / baseline. The first step's losses of both sides are compared as a check that they train
the same thing. A side that runs out of memory is reported as OOM and the other still runs.

Examples::

    python bench/train_throughput.py --shape tiny --seq-len 1024           # CPU ratio
    python bench/train_throughput.py --shape 1b --seq-len 65536 --device cuda --json out.json
    python bench/train_throughput.py --shape 8b --layers 4 --seq-len 65536 --only ours  # memory
"""

from __future__ import annotations

import argparse
import json
import sys
import traceback
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import common, peak_memory
from bench.table import table_of, write_atomic


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="tiny", choices=sorted(common.SHAPES))
    ap.add_argument("--layers", type=int, default=None, help="decoder layers (default: the shape's)")
    ap.add_argument("--seq-len", type=int, default=1024, help="tokens per packed row (S)")
    ap.add_argument("--rows", type=int, default=1, help="rows (micro-batches) per optimizer step")
    ap.add_argument("--docs", default="one", choices=["one", "mixed"],
                    help="one document per row, or web-like mixed lengths")
    ap.add_argument("--warmup", type=int, default=2, help="untimed steps per side")
    ap.add_argument("--steps", type=int, default=5, help="timed steps per side")
    ap.add_argument("--device", default="auto", help="auto, cpu or cuda")
    ap.add_argument("--zero-stage", type=int, default=3, choices=[0, 1, 2, 3])
    ap.add_argument("--attention", default="auto",
                    choices=["auto", "flash_attn", "torch_varlen", "flex", "sdpa"],
                    help="our backend (the spec's model.attention)")
    ap.add_argument("--baseline-attention", default="auto",
                    choices=["auto", "flash_attention_2", "sdpa"],
                    help="transformers attn_implementation; auto: flash_attention_2 when "
                         "transformers finds flash-attn 2, else sdpa")
    ap.add_argument("--baseline-precision", default="auto", choices=["auto", "amp", "bf16", "fp32"],
                    help="auto: amp (fp32 weights, bf16 autocast) on CUDA, fp32 on CPU")
    ap.add_argument("--only", default="both", choices=["both", "ours", "baseline"])
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help="peak FLOP/s behind MFU (default: the GPU's dense bf16 datasheet peak)")
    ap.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--json", type=Path, default=None, help="write the result here")
    ap.add_argument("--purpose", default=None,
                    help="what this run is for, shown in the table (e.g. 'memory probe')")
    args = ap.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # for the result's command line
    for name in ("seq_len", "rows", "steps"):
        if getattr(args, name) < 1:
            ap.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 0:
        ap.error("--warmup must be >= 0")
    return args


def baseline_attention(requested: str) -> str:
    if requested != "auto":
        return requested
    from transformers.utils import is_flash_attn_2_available

    return "flash_attention_2" if is_flash_attn_2_available() else "sdpa"


def baseline_precision(requested: str, device: str) -> str:
    if requested == "auto":
        return "amp" if device == "cuda" else "fp32"
    if requested in ("amp", "bf16") and device != "cuda":
        common.usage_error(f"--baseline-precision {requested} needs --device cuda")
    return requested


# --------------------------------------------------------------------------------------------
# The transformers baseline
# --------------------------------------------------------------------------------------------

class Baseline:
    """A plain transformers training step: model loss, backward, clip, AdamW."""

    def __init__(self, arch: Any, spec: Any, state: dict[str, torch.Tensor], device: str,
                 attn: str, precision: str) -> None:
        from transformers import AutoModelForCausalLM

        from prolong.model.build import llama_config

        weights = torch.bfloat16 if precision == "bf16" else torch.float32
        with torch.device(device):
            self.model = AutoModelForCausalLM.from_config(
                llama_config(arch, rope_theta=spec.model.rope_theta), attn_implementation=attn,
                dtype=weights)
        self.model.load_state_dict(state)
        self.model.config.use_cache = False
        self.model.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False})
        self.model.train()
        opt = spec.optimizer
        self.optimizer = torch.optim.AdamW(
            self.model.parameters(), lr=spec.schedule.peak_lr, betas=tuple(opt.betas),
            eps=opt.eps, weight_decay=opt.weight_decay, fused=(device == "cuda") or None)
        self.clip = opt.grad_clip
        self.device = device
        self.autocast = precision == "amp"

    def step(self, rows: list[Any]) -> float:
        n = sum(int((r.shift_labels != -100).sum()) for r in rows)
        items = torch.tensor(n, device=self.device)
        total = 0.0
        for r in rows:
            ids = r.input_ids.to(self.device, non_blocking=True)
            pos = r.position_ids.to(self.device, non_blocking=True)
            labels = common.hf_labels(r.shift_labels).to(self.device, non_blocking=True)
            with torch.autocast(self.device, dtype=torch.bfloat16, enabled=self.autocast):
                out = self.model(input_ids=ids, position_ids=pos, labels=labels,
                                 num_items_in_batch=items, use_cache=False)
            out.loss.backward()
            total += float(out.loss.detach())
            del out
        if self.clip is not None:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return total


# --------------------------------------------------------------------------------------------
# One side, measured
# --------------------------------------------------------------------------------------------

def _measure(label: str, build, step, *, arch, args, rows, device, meter, peak) -> dict[str, Any]:
    """Build a side, warm it up, time it; OOM and errors become the side's status."""
    meter.begin_side()
    side: Any = None
    try:
        side = build()
        times, losses = common.timed_steps(lambda: step(side), warmup=args.warmup,
                                           steps=args.steps, device=device, meter=meter)
        out = {"status": "ok", "label": label, "first_loss": losses[0], "losses": losses,
               "peak_bytes": meter.peak_bytes(), "reserved_bytes": meter.reserved_bytes(),
               **common.throughput_figures(arch, args.seq_len, rows, times, peak)}
    except Exception as exc:
        oom = common.is_oom(exc)
        if not oom:
            traceback.print_exc()
        out = {"status": "oom" if oom else "error", "label": label,
               "reason": common.first_line(exc), "peak_bytes": meter.peak_bytes()}
    common.destroy_engine(side)
    side = None
    common.free_memory()
    return out


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Measure what ``args`` asks for; the result object ``--json`` writes."""
    device = common.resolve_device(args.device)
    b_precision = baseline_precision(args.baseline_precision, device)  # bad input fails first
    common.set_deepspeed_accelerator(device)
    common.preload_libraries(deepspeed=args.only != "baseline")
    if args.threads:
        torch.set_num_threads(args.threads)
    arch = common.architecture(args.shape, args.layers)
    spec = common.bench_spec(arch, seq_len=args.seq_len, rows=args.rows, device=device,
                             zero_stage=args.zero_stage, attention=args.attention,
                             seed=args.seed)
    rows = common.make_rows(args.seq_len, args.rows, arch.vocab_size, docs=args.docs,
                            seed=args.seed)
    peak, peak_source = common.peak_flops_for(device, args.peak_tflops)
    meter = common.MemoryMeter(device)
    attn = baseline_attention(args.baseline_attention)
    result: dict[str, Any] = {
        "bench": "train_throughput",
        "config": {"shape": common.shape_label(args.shape, arch), "arch": arch.model_dump(),
                   "seq_len": args.seq_len, "rows": args.rows, "docs": args.docs,
                   "device": device, "device_name": common.device_name(device),
                   "precision": spec.resolved_precision, "baseline_precision": b_precision,
                   "zero_stage": args.zero_stage, "warmup": args.warmup, "steps": args.steps,
                   "peak": peak_source, "memory_kind": meter.kind, "seed": args.seed,
                   "purpose": args.purpose},
        "versions": common.versions_summary(),
        "date": common.today(),
        "command": common.command_line("bench/train_throughput.py", args.argv),
    }
    state: dict[str, torch.Tensor] = {}
    with common.single_process_group(device):
        from prolong.parallel.dims import ParallelDims

        groups = ParallelDims(world_size=1, sp=1, workers_per_node=1).build(0)
        if args.only in ("both", "ours"):
            def build_ours():
                # The baseline starts from our initial weights: copy them only if it runs.
                ours = common.build_ours(spec, groups, device,
                                         initial_state=state if args.only == "both" else None)
                result["config"]["attention_ours"] = ours.backend
                return ours

            result["ours"] = _measure(
                f"attention {{backend}}, ZeRO-{args.zero_stage}, chunked loss", build_ours,
                lambda o: common.ours_step(o, rows), arch=arch, args=args, rows=rows,
                device=device, meter=meter, peak=peak)
            backend = result["config"].get("attention_ours", "?")
            result["ours"]["label"] = result["ours"]["label"].format(backend=backend)
        if args.only in ("both", "baseline"):
            if not state:  # baseline alone: our model's initial weights, built the same way
                state = common.initial_weights(spec, device)

            result["baseline"] = _measure(
                f"transformers {attn}, {b_precision}, AdamW", lambda: Baseline(
                    arch, spec, state, device, attn, b_precision),
                lambda b: b.step(rows), arch=arch, args=args, rows=rows, device=device,
                meter=meter, peak=peak)
            result["config"]["attention_baseline"] = attn
    state.clear()
    # The estimates beside the measured peaks: the plan's for our side's own spec (world 1, no
    # SP, the whole optimizer state on this one device), bench/peak_memory's for the baseline.
    from prolong.model.memory import estimate_memory

    if "ours" in result:
        result["ours"]["plan_peak_bytes"] = estimate_memory(spec, arch).peak
    if "baseline" in result:
        result["baseline"]["plan_peak_bytes"] = peak_memory.baseline_peak(
            arch, args.seq_len, b_precision).peak
    ours, base = result.get("ours"), result.get("baseline")
    if ours and base and ours["status"] == base["status"] == "ok":
        result["ratio"] = ours["tokens_per_s"] / base["tokens_per_s"]
        result["loss_rel_diff"] = abs(ours["first_loss"] - base["first_loss"]) / abs(
            base["first_loss"])
    return result


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    result = run(args)
    c = result["config"]
    print(f"{c['device_name']}; MFU peak {c['peak']}; {result['versions']}; {result['date']}")
    print(table_of([result]))
    if args.json:
        write_atomic(args.json, json.dumps(result, indent=1) + "\n")
    sides = [result[k] for k in ("ours", "baseline") if k in result]
    return 1 if any(s["status"] == "error" for s in sides) else 0


if __name__ == "__main__":
    raise SystemExit(main())
