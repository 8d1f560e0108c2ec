"""Shared pieces of the multi-process parity tests: the problem (a tiny Llama and one global batch
of packed rows), the single-process reference, the worker launcher and the comparison.

The test process writes the problem to a file, computes the reference itself, launches one
worker process per rank (``sp_worker.py``, gloo on CPU) and compares what rank 0 writes back.
Everything here is plain torch + transformers + our modules; nothing downloads.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
WORKER = HERE / "sp_worker.py"
CORE_ATTN = "prolong_docs_reference"  # prolong.model.attention.hf_name("sdpa"), checked below

# Tiny Llama of the brief: 2 layers, hidden 64, 4 heads, 2 KV heads, vocab 256, fp32.
TINY = dict(num_layers=2, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, vocab_size=256, tie_word_embeddings=False)
SEQ_LEN = 64
ROWS = 4  # one global batch: SP=2 -> 4 micro-batches on one replica; SP=2 x DP=2 -> 2 each
# AdamW for the one-step check. Adam's first step is nearly sign(g) (scale-invariant), so eps is
# set near the gradients' magnitude and clipping is active: a wrong gradient scale or grad norm
# then changes the update.
OPTIM = dict(lr=1e-2, betas=(0.9, 0.95), eps=1e-4, weight_decay=0.1, grad_clip=0.05)


# --------------------------------------------------------------------------------------------
# Problem
# --------------------------------------------------------------------------------------------

def make_rows(seed: int, rows: int = ROWS, seq_len: int = SEQ_LEN,
              vocab: int = TINY["vocab_size"]) -> list[dict[str, torch.Tensor]]:
    """Packed rows with random document lengths (some 1-token documents, some documents crossing
    the SP chunk boundary) and a few label-masked targets, built by the real packer."""
    from prolong.data.packing import build_row

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(rows):
        lengths, left = [], seq_len
        while left:
            d = int(min(left, rng.choice([1, rng.integers(2, 12), rng.integers(12, 48)])))
            lengths.append(d)
            left -= d
        pieces = [rng.integers(0, vocab, size=d) for d in lengths]
        masks = [(rng.random(d) > 0.1).astype(np.int8) for d in lengths]
        row = build_row(pieces, masks).to_torch()
        out.append({"input_ids": row.input_ids.clone(), "shift_labels": row.shift_labels.clone(),
                    "position_ids": row.position_ids.clone()})
    return out


def arch_spec() -> Any:
    from prolong.spec import ArchitectureSpec

    return ArchitectureSpec(**TINY)


def make_model(state_dict: dict[str, torch.Tensor] | None = None, seed: int = 0,
               attn: str = CORE_ATTN) -> Any:
    from transformers import LlamaForCausalLM

    from prolong.model.attention import hf_name, register_attention_backends
    from prolong.model.build import llama_config

    assert hf_name("sdpa") == CORE_ATTN
    register_attention_backends()
    torch.manual_seed(seed)
    model = LlamaForCausalLM._from_config(llama_config(arch_spec(), rope_theta=1e4),
                                          attn_implementation=attn, dtype=torch.float32)
    if state_dict is not None:
        model.load_state_dict(state_dict)
    model.config.use_cache = False
    return model


def make_problem(seed: int) -> dict[str, Any]:
    model = make_model(seed=seed)
    # Random init of transformers leaves norms at 1 and is the same for every seed's structure;
    # perturb the norms so their gradients are not degenerate.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
    # Two optimizer steps, on different rows: a step that reuses stale state (moments, LR,
    # weights of the bf16 copy) shows in the second.
    return {"seed": seed, "state_dict": {k: v.clone() for k, v in model.state_dict().items()},
            "rows": make_rows(seed), "rows2": make_rows(seed + 1), "optim": dict(OPTIM)}


def train_spec(*, zero_stage: int, sp: int, world: int, seq_len: int = SEQ_LEN, rows: int = ROWS,
               activation_checkpointing: bool = False, offload_optimizer: bool = False,
               grad_clip: float | None = OPTIM["grad_clip"], device: str = "cpu",
               overlap_comm: bool | None = None) -> Any:
    """A real PretrainSpec for the layout (its DeepSpeed config is what the workers use)."""
    from prolong.spec import PretrainSpec

    return PretrainSpec.model_validate({
        "model": {"architecture": TINY, "attention": "sdpa"},
        "data": {"streams": [{"domain": "d", "path": "x.jsonl", "format": "jsonl",
                              "proportion": 1.0}]},
        "sequenceLength": seq_len,
        "globalBatchTokens": seq_len * rows,
        "steps": 1,
        "optimizer": {"betas": list(OPTIM["betas"]), "eps": OPTIM["eps"],
                      "weightDecay": OPTIM["weight_decay"], "gradClip": grad_clip},
        "schedule": {"peakLR": OPTIM["lr"], "warmupSteps": 0, "decay": "constant"},
        "parallelism": {"sequenceParallel": sp, "zeroStage": zero_stage,
                        "activationCheckpointing": activation_checkpointing,
                        "offloadOptimizer": offload_optimizer,
                        "communication": {"overlapComm": overlap_comm}},
        "cluster": {"device": device, "nodes": 1, "workersPerNode": world},
    })


# --------------------------------------------------------------------------------------------
# Reference: one process, the whole global batch, plain torch
# --------------------------------------------------------------------------------------------

STEP_ROWS = ("rows", "rows2")
"""The problem's rows of optimizer step 1 and step 2."""


def gradients(state_dict: dict[str, torch.Tensor], rows: list[dict[str, torch.Tensor]]
              ) -> tuple[float, dict[str, torch.Tensor]]:
    """The single process's token-mean loss and full gradients on one global batch, in fp32."""
    model = make_model(state_dict)
    loss = _accumulate(model, rows)
    return loss, {k: p.grad.detach().clone() for k, p in model.named_parameters()}


def reference(problem: dict[str, Any]) -> dict[str, Any]:
    """Loss, full gradients, global grad norm and the weights after each of two AdamW steps (with
    clipping) of the single process on the same global batches: step 1 at the top level,
    step 2 under ``"second"``."""
    from prolong.parallel.deepspeed_config import param_groups

    o = problem["optim"]
    model = make_model(problem["state_dict"])
    opt = torch.optim.AdamW(param_groups(model.named_parameters(), o["weight_decay"]), lr=o["lr"],
                            betas=o["betas"], eps=o["eps"])
    steps = []
    for key in STEP_ROWS:
        model.zero_grad(set_to_none=True)
        loss = _accumulate(model, problem[key])
        grads = {k: p.grad.detach().clone() for k, p in model.named_parameters()}
        grad_norm = float(torch.nn.utils.clip_grad_norm_(model.parameters(), o["grad_clip"]))
        opt.step()
        params = {k: p.detach().clone() for k, p in model.named_parameters()}
        steps.append({"loss": loss, "grads": grads, "params": params, "grad_norm": grad_norm})
    return {**steps[0], "second": steps[1]}


def _accumulate(model: Any, rows: list[dict[str, torch.Tensor]]) -> float:
    """Backward of the token mean over ``rows`` (gradients accumulate in ``.grad``); the loss."""
    from prolong.model.build import packed_lm_loss

    n = sum(int((r["shift_labels"] != -100).sum()) for r in rows)
    total = 0.0
    for r in rows:
        loss, _ = packed_lm_loss(model, r["input_ids"], r["position_ids"], r["shift_labels"],
                                 normalizer=n, checkpoint=False)
        loss.backward()
        total += float(loss.detach())
    return total


def fp32_master_adamw(masters: dict[str, torch.Tensor], grads: list[dict[str, torch.Tensor]],
                      optim: dict[str, Any]) -> list[dict[str, dict[str, torch.Tensor]]]:
    """What mixed-precision training must do with the gradients it computed: torch AdamW (with
    clipping at the global norm) on fp32 master weights, one step per gradient dict. Returns,
    after each step, the masters and both moments (``exp_avg``, ``exp_avg_sq``)."""
    from prolong.parallel.deepspeed_config import param_groups

    params = {k: torch.nn.Parameter(v.detach().float().clone()) for k, v in masters.items()}
    opt = torch.optim.AdamW(param_groups(params.items(), optim["weight_decay"]), lr=optim["lr"],
                            betas=optim["betas"], eps=optim["eps"])
    out = []
    for g in grads:
        for k, p in params.items():
            p.grad = g[k].detach().float().reshape(p.shape).clone()
        torch.nn.utils.clip_grad_norm_(params.values(), optim["grad_clip"])
        opt.step()
        out.append({"params": {k: p.detach().clone() for k, p in params.items()},
                    **{m: {k: opt.state[p][m].clone() for k, p in params.items()}
                       for m in ("exp_avg", "exp_avg_sq")}})
    return out


# --------------------------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------------------------

def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max|a-b| / max|b| (b the reference); elementwise ratios would blow up on near-zeros."""
    a, b = a.detach().double().reshape(b.shape), b.detach().double()
    scale = b.abs().max().item()
    return (a - b).abs().max().item() / (scale if scale > 0 else 1.0)


def worst(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor]) -> tuple[float, str]:
    assert set(got) == set(ref), f"parameter names differ: {set(got) ^ set(ref)}"
    errs = {k: rel_err(got[k], ref[k]) for k in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


def update_err(got: dict[str, torch.Tensor], ref: dict[str, torch.Tensor],
               before: dict[str, torch.Tensor],
               got_before: dict[str, torch.Tensor] | None = None) -> tuple[float, str]:
    """Relative error of the *update* (after - before): stricter than comparing weights.
    ``got_before``: where ``got`` started, when not from ``before`` (a second step)."""
    got_before = before if got_before is None else got_before
    errs = {k: rel_err(got[k] - got_before[k].reshape(got[k].shape), ref[k] - before[k])
            for k in ref}
    name = max(errs, key=errs.get)
    return errs[name], name


# --------------------------------------------------------------------------------------------
# Launching workers
# --------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(world: int, args: list[str], *, timeout: float, log_dir: Path,
           worker: Path = WORKER) -> None:
    """Run ``worker args`` (by default ``sp_worker.py``) as ``world`` gloo ranks on this machine;
    raise with the logs of every rank if any fails or the whole run exceeds ``timeout``. Always
    reaps every process."""
    port = free_port()
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
           "WORLD_SIZE": str(world), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "PYTHONUNBUFFERED": "1",
           # A private, empty extensions cache: any DeepSpeed JIT op build lands here, and the
           # tests assert it stays empty (a build costs 1-2 minutes on 2 cores).
           "TORCH_EXTENSIONS_DIR": str(log_dir / "torch_extensions")}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH")) if p)
    procs, logs = [], []
    try:
        for rank in range(world):
            log = open(log_dir / f"rank{rank}.log", "w+")  # noqa: SIM115 - closed below
            logs.append(log)
            procs.append(subprocess.Popen(
                [sys.executable, str(worker), *args],
                env={**env, "RANK": str(rank), "LOCAL_RANK": str(rank)},
                stdout=log, stderr=subprocess.STDOUT, cwd=REPO, start_new_session=True))
        deadline = time.monotonic() + timeout
        failed = None
        while any(p.poll() is None for p in procs):
            if time.monotonic() > deadline:
                failed = f"timed out after {timeout:.0f} s"
                break
            bad = [i for i, p in enumerate(procs) if p.returncode not in (None, 0)]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
                break
            time.sleep(0.1)
        if failed is None:
            bad = [i for i, p in enumerate(procs) if p.returncode != 0]
            if bad:
                failed = f"rank {bad[0]} exited with {procs[bad[0]].returncode}"
        if failed:
            raise RuntimeError(f"{world}-process run failed: {failed}\n" + _tails(logs))
    finally:
        for p in procs:
            if p.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(p.pid, signal.SIGKILL)
        for p in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)
        for log in logs:
            log.close()


def _tails(logs: list[Any], chars: int = 4000) -> str:
    out = []
    for rank, log in enumerate(logs):
        log.flush()
        log.seek(0)
        text = log.read()
        out.append(f"----- rank {rank} (last {chars} chars) -----\n{text[-chars:]}")
    return "\n".join(out)
