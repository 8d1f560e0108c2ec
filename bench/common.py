"""What the training benchmarks share: shapes, rows, the spec, our engine, timing and memory.

Our side is built exactly as a training worker builds it (:mod:`prolong.train.loop`): the model from
``prolong.model.build.build_model`` with the spec's attention backend
(``prolong.model.attention.select_backend``), routed through
``prolong.parallel.ulysses.apply_ulysses`` (a no-op wrap at SP 1), handed to
``prolong.train.engine.build_engine`` (DeepSpeed ZeRO, our client AdamW, the chunked
``packed_lm_loss``), and stepped by ``prolong.parallel.step.train_step``. Nothing of the trainer is
re-implemented here; only the data is synthetic (random tokens, no loader), because the loader has
its own benchmark (``bench/data_loader.py``).

Timing follows the device notes (METHOD.md): untimed warm-up steps first (allocator growth, kernel
selection, AdamW state creation), the device synchronised around every timed step, the median of
the timed steps reported with all of them kept.
"""

from __future__ import annotations

import contextlib
import ctypes
import datetime as _dt
import gc
import os
import socket
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from prolong.data.packing import MicroBatch, build_row  # noqa: E402
from prolong.model.flops import PEAK_BF16_FLOPS  # noqa: E402
from prolong.spec import ArchitectureSpec, PretrainSpec  # noqa: E402
from prolong.train.metrics import step_flops  # noqa: E402

SHAPES: dict[str, str] = {
    "tiny": "tiny",         # 2 layers, hidden 64: CPU runs and tests
    "1b": "llama3.2-1b",    # 16 layers, hidden 2048, 32/8 heads, vocab 128,256
    "8b": "llama3-8b",      # 32 layers, hidden 4096; cut with --layers for one GPU
}
"""Bench shape name -> ArchitectureSpec preset."""


def architecture(shape: str, layers: int | None = None) -> ArchitectureSpec:
    """The ArchitectureSpec of a bench shape, optionally with only ``layers`` decoder layers (a
    few layers of the 8B shape hold what one rank holds per layer at 512K with SP=8)."""
    if shape not in SHAPES:
        raise ValueError(f"unknown shape {shape!r}; choose one of {', '.join(SHAPES)}")
    fields: dict[str, Any] = {"preset": SHAPES[shape]}
    if layers is not None:
        fields["num_layers"] = layers
    return ArchitectureSpec(**fields)


def shape_label(shape: str, arch: ArchitectureSpec) -> str:
    full = ArchitectureSpec(preset=SHAPES[shape]).num_layers
    return shape if arch.num_layers == full else f"{shape}[{arch.num_layers}/{full} layers]"


# --------------------------------------------------------------------------------------------
# Rows
# --------------------------------------------------------------------------------------------

def document_lengths(seq_len: int, docs: str, rng: np.random.Generator) -> list[int]:
    """Document lengths of one row: ``one`` document filling it (the issue's target case), or
    ``mixed`` web-text-like lengths: log-normal (sigma 1.2, as the data-loader benchmark's short
    stream) with a median of about 700 tokens, or S/8 for rows under 5,320 tokens, so that
    short CPU rows still pack several documents; cut at the row end."""
    if docs == "one":
        return [seq_len]
    if docs != "mixed":
        raise ValueError(f"docs must be 'one' or 'mixed', not {docs!r}")
    mu = float(np.log(min(665.0, seq_len / 8)))
    lengths, left = [], seq_len
    while left:
        d = int(min(left, max(1, rng.lognormal(mu, 1.2))))
        lengths.append(d)
        left -= d
    return lengths


def make_rows(seq_len: int, rows: int, vocab: int, *, docs: str = "one",
              seed: int = 0) -> list[MicroBatch]:
    """``rows`` packed rows of random tokens, built by the real packer (prolong.data.packing)."""
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        pieces = [rng.integers(0, vocab, d) for d in document_lengths(seq_len, docs, rng)]
        out.append(build_row(pieces, domain="bench").to_torch())
    return out


def hf_labels(shift_labels: torch.Tensor) -> torch.Tensor:
    """transformers' unshifted ``labels`` whose shift is ``shift_labels``: its loss pads one -100
    at the end and drops the first position, so labels[t] = shift_labels[t-1]. The row's last
    shift label is always -100 (its target is in no row), so nothing is lost."""
    labels = torch.full_like(shift_labels, -100)
    labels[..., 1:] = shift_labels[..., :-1]
    return labels


# --------------------------------------------------------------------------------------------
# Spec and device
# --------------------------------------------------------------------------------------------

def usage_error(message: str) -> None:
    """Bad input: one line naming the option and the rule, exit 2 (as the CLI does)."""
    print(f"{Path(sys.argv[0]).name}: {message}", file=sys.stderr)
    raise SystemExit(2)


def resolve_device(name: str) -> str:
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if name not in ("cpu", "cuda"):
        usage_error(f"--device must be auto, cpu or cuda, not {name!r}")
    if name == "cuda" and not torch.cuda.is_available():
        usage_error("--device cuda: torch sees no CUDA device here")
    return name


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    import platform

    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"CPU ({platform.machine()}, {cpus} cores, {torch.get_num_threads()} torch threads)"


def gpu_type(device: str) -> str | None:
    """The GPU model behind PEAK_BF16_FLOPS, read from the device name (None on CPU or for a GPU
    we hold no peak for)."""
    if device != "cuda":
        return None
    name = torch.cuda.get_device_name().upper()
    return next((kind for kind in PEAK_BF16_FLOPS if kind in name), None)


def bench_spec(arch: ArchitectureSpec, *, seq_len: int, rows: int, device: str, zero_stage: int,
               world: int = 1, sp: int = 1, attention: str = "auto",
               activation_checkpointing: bool = True, seed: int = 0) -> PretrainSpec:
    """A real PretrainSpec for the benchmark's layout (its DeepSpeed config is the trainer's)."""
    kind = gpu_type(device)
    cluster: dict[str, Any] = {"device": "gpu" if device == "cuda" else "cpu", "nodes": 1,
                               "workersPerNode": world}
    if kind is not None:
        cluster["gpuType"] = kind
    return PretrainSpec.model_validate({
        "model": {"architecture": arch.model_dump(exclude={"preset"}), "attention": attention},
        # The stream is never read: the benchmark feeds synthetic rows to train_step directly.
        "data": {"streams": [{"domain": "bench", "path": "unused.jsonl", "format": "jsonl",
                              "proportion": 1.0}]},
        "sequenceLength": seq_len,
        "globalBatchTokens": seq_len * rows,
        "steps": 1_000,
        "schedule": {"peakLR": 1e-5, "warmupSteps": 0, "decay": "constant"},
        "parallelism": {"sequenceParallel": sp, "zeroStage": zero_stage,
                        "activationCheckpointing": activation_checkpointing},
        "cluster": cluster,
        "seed": seed,
    })


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def single_process_group(device: str):
    """torch.distributed over one rank (gloo on CPU, NCCL on CUDA), as a launcher would set it up
    for a one-worker stage; torn down afterwards if this created it."""
    import torch.distributed as dist

    if dist.is_initialized():
        yield
        return
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def set_deepspeed_accelerator(device: str) -> None:
    """DeepSpeed fixes its accelerator when first imported: set it from the bench's device, over
    any inherited value (the Makefile exports DS_ACCELERATOR=cpu for the CPU test suite)."""
    os.environ["DS_ACCELERATOR"] = "cuda" if device == "cuda" else "cpu"


def preload_libraries(deepspeed: bool = True) -> None:
    """Import the heavy libraries before any side is measured, so neither side's CPU memory
    figure counts a library's import; and keep their deprecation chatter out of the table."""
    import logging
    import warnings

    warnings.filterwarnings("ignore", category=FutureWarning)
    import transformers.models.llama.modeling_llama  # noqa: F401

    if deepspeed:
        import deepspeed as ds

        ds.utils.logger.setLevel(logging.WARNING)


# --------------------------------------------------------------------------------------------
# Our engine: the trainer's own functions
# --------------------------------------------------------------------------------------------

@dataclass
class Ours:
    model: torch.nn.Module
    built: Any
    """prolong.train.engine.Engine"""
    backend: str
    """The concrete attention backend the spec resolved to."""
    groups: Any


def _our_model(spec: PretrainSpec, device: str) -> tuple[torch.nn.Module, str]:
    """Our model with the product's build and seed, not partitioned and not routed through
    Ulysses: the baseline's starting weights."""
    from prolong.model.attention import select_backend
    from prolong.model.build import TORCH_DTYPES, build_model

    dtype = TORCH_DTYPES[spec.resolved_precision]
    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
    model = build_model(spec.model, device=dev, dtype=dtype,
                        activation_checkpointing=spec.parallelism.activation_checkpointing,
                        seed=spec.seed)
    return model, select_backend(spec.model.attention, dev, dtype)


def build_ours(spec: PretrainSpec, groups: Any, device: str,
               initial_state: dict[str, torch.Tensor] | None = None) -> Ours:
    """Model and DeepSpeed engine as ``prolong.train.loop.Worker`` builds them (random weights,
    no checkpoint): :func:`prolong.train.loop.training_model` (ZeRO-3 partitioned build, Ulysses,
    ``parallelism.memory``), then ``build_engine`` with the spec's loss chunk, so the bench
    measures what the product trains. ``initial_state``, when given, receives a CPU copy of the
    full initial weights (gathered under ZeRO-3), for a baseline to start from."""
    from prolong.train.engine import build_engine
    from prolong.train.loop import training_model

    dev = torch.device("cuda", torch.cuda.current_device()) if device == "cuda" else "cpu"
    model, backend = training_model(spec, groups, dev)
    if initial_state is not None:
        initial_state.update(_full_cpu_state(model,
                                             partitioned=spec.parallelism.zero_stage == 3))
    built = build_engine(model, spec, groups,
                         chunk_tokens=spec.parallelism.memory.loss_chunk_tokens)
    return Ours(model, built, backend, groups)


def initial_weights(spec: PretrainSpec, device: str) -> dict[str, torch.Tensor]:
    """Initial weights of our architecture (same build and seed, not partitioned), on the CPU:
    what the baseline starts from when our side does not run."""
    model, _ = _our_model(spec, device)
    state = _cpu_state(model)
    del model
    free_memory()
    return state


def _full_cpu_state(model: torch.nn.Module, *, partitioned: bool) -> dict[str, torch.Tensor]:
    if not partitioned:
        return _cpu_state(model)
    import deepspeed

    with deepspeed.zero.GatheredParameters(list(model.parameters()), modifier_rank=None):
        return _cpu_state(model)


def _cpu_state(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}


def ours_step(ours: Ours, rows: list[MicroBatch]) -> float:
    """One optimizer step through prolong.parallel.step.train_step; its logged loss."""
    from prolong.parallel.step import train_step

    return train_step(ours.built.engine, rows, ours.groups).loss


def destroy_engine(obj: Any) -> None:
    """Tear down the DeepSpeed engine of an :class:`Ours` (its hooks hold the parameters)."""
    engine = getattr(getattr(obj, "built", None), "engine", None)
    if engine is not None and hasattr(engine, "destroy"):
        engine.destroy()


def free_memory() -> None:
    """Collect what the caller dropped, so the next side starts from a clean device."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    trim_heap()


def trim_heap() -> None:
    """Give freed heap pages back to the OS (glibc), so a CPU side's RSS does not start on the
    previous side's freed memory."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


# --------------------------------------------------------------------------------------------
# Timing and memory
# --------------------------------------------------------------------------------------------

def synchronize(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


class MemoryMeter:
    """Peak memory of a side's timed steps. CUDA: ``torch.cuda.max_memory_allocated`` after a
    reset at the end of warm-up (weights, gradients, optimizer state and activations: all that
    torch holds at the step's peak). CPU: the process's resident-set high-water mark (VmHWM,
    reset through /proc/self/clear_refs at the end of warm-up) minus the RSS before the side was
    built, so one side's figure neither includes the libraries nor the other side's memory."""

    def __init__(self, device: str) -> None:
        self.device = device
        self.base = 0
        self.kind = "CUDA allocated" if device == "cuda" else "RSS above start"

    def begin_side(self) -> None:
        """Call before building a side (the CPU figure is relative to this point)."""
        if self.device != "cuda":
            trim_heap()
            self.base = _status_kib("VmRSS") * 1024

    def reset_peak(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            return
        with contextlib.suppress(OSError):
            Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current RSS

    def peak_bytes(self) -> int | None:
        if self.device == "cuda":
            torch.cuda.synchronize()
            return int(torch.cuda.max_memory_allocated())
        hwm = _status_kib("VmHWM")
        return None if hwm == 0 else max(0, hwm * 1024 - self.base)

    def reserved_bytes(self) -> int | None:
        return int(torch.cuda.max_memory_reserved()) if self.device == "cuda" else None


def _status_kib(field: str) -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def timed_steps(step: Callable[[], float], *, warmup: int, steps: int, device: str,
                meter: MemoryMeter | None = None) -> tuple[list[float], list[float]]:
    """(seconds of each timed step, loss of every step, warm-up included). The device is
    synchronised before and after each timed step; the meter's peak is reset after warm-up."""
    losses = []
    for _ in range(warmup):
        losses.append(step())
    synchronize(device)
    if meter is not None:
        meter.reset_peak()
    times = []
    for _ in range(steps):
        synchronize(device)
        t0 = time.perf_counter()
        losses.append(step())
        synchronize(device)
        times.append(time.perf_counter() - t0)
    return times, losses


def throughput_figures(arch: ArchitectureSpec, seq_len: int, rows: list[MicroBatch],
                       times: list[float], peak_flops: float | None) -> dict[str, Any]:
    """Tokens/s, achieved TFLOP/s and MFU in both conventions (prolong.model.flops, through the
    trainer's own step_flops) from the median step time."""
    median = statistics.median(times)
    dense, causal = step_flops(arch, seq_len, [r.doc_lengths.tolist() for r in rows])
    tokens = sum(r.seq_len for r in rows)
    return {
        "step_s": median,
        "step_s_all": times,
        "step_s_spread": (max(times) - min(times)) / median if median else None,
        "tokens_per_step": tokens,
        "tokens_per_s": tokens / median,
        "tflops_dense": dense / median / 1e12,
        "tflops_causal": causal / median / 1e12,
        "mfu_dense": dense / median / peak_flops if peak_flops else None,
        "mfu_causal": causal / median / peak_flops if peak_flops else None,
    }


def peak_flops_for(device: str, override_tflops: float | None) -> tuple[float | None, str]:
    """The peak behind MFU and where it came from."""
    if override_tflops:
        return override_tflops * 1e12, f"{override_tflops:g} TFLOP/s (given)"
    kind = gpu_type(device)
    if kind is None:
        return None, "none (no bf16 peak for this device)"
    return PEAK_BF16_FLOPS[kind], f"{PEAK_BF16_FLOPS[kind] / 1e12:.1f} TFLOP/s ({kind} dense bf16)"


def command_line(script: str, argv: list[str]) -> str:
    """The command that reproduces a result: the script and its arguments, without ``--json``'s
    output path (where the figures went is not part of what was measured)."""
    kept, skip = [], False
    for arg in argv:
        if skip:
            skip = False
        elif arg == "--json":
            skip = True
        elif not arg.startswith("--json="):
            kept.append(arg)
    return " ".join(["python", script, *kept])


def versions_summary() -> str:
    from prolong.versions import summary

    return summary()


def today() -> str:
    return _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0][:300] if text else ''}"


def is_oom(exc: BaseException) -> bool:
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()
