"""One rank of the parity tests: DeepSpeed ZeRO + Ulysses SP on CPU over gloo.

Launched by sp_harness.launch with RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT. For each
requested ZeRO stage it builds the model from the problem's weights, wires it through the
trainer's own code (ParallelDims -> groups, apply_ulysses, prolong.train.engine.build_engine),
runs two optimizer steps (the problem's ``rows``, then ``rows2``) and gathers, for each, the
full gradients (before the update) and full weights (after it); under bf16 also the fp32 master
weights before the first step and the AdamW moments after each. Rank 0 saves them.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from datetime import timedelta
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "model"))
import kernel_stand_ins as K


def parse_case(case: str) -> tuple[int, set[str]]:
    """"3+ac+plain" -> (3, {"ac", "plain"}). Flags: ac (activation checkpointing), plain (the
    plain token mean, i.e. the ZeRO-1/2 divisor, whatever the stage: a negative control),
    offload (parallelism.offloadOptimizer: optimizer state on CPU, exactly as the trainer
    configures it), bf16 (DeepSpeed's
    bf16 mode on CPU: a smoke check of the GPU config, not held to fp32 tolerances), overlap
    (parallelism.communication.overlapComm forced on, as on the GPUs), attn-<backend> (the
    backend's registered name through the Ulysses wrapper, with its CUDA kernel replaced by the
    CPU stand-in of tests/model/kernel_stand_ins.py), sp4 (SP = 4 on the launch's 4 ranks
    whatever its --sp: more SP ranks than the model's 2 KV heads, where DeepSpeed's Ulysses
    replicates KV heads)."""
    stage, *flags = case.split("+")
    unknown = {f for f in flags if not f.startswith("attn-")} - {
        "ac", "plain", "offload", "bf16", "overlap", "sp4"}
    if unknown:
        raise ValueError(f"unknown case flags {unknown}")
    return int(stage), set(flags)


def build_engine(stage: int, flags: set[str], problem: dict, groups):
    """The model inside the trainer's own engine: prolong.train.engine.build_engine, the function
    Worker calls, with the spec's real DeepSpeed config (offload included) and client AdamW."""
    import sp_harness as H

    from prolong.parallel.ulysses import apply_ulysses
    from prolong.train.engine import build_engine as production_build_engine

    dims = groups.dims
    spec = H.train_spec(zero_stage=stage, sp=dims.sp, world=dims.world_size,
                        activation_checkpointing="ac" in flags,
                        offload_optimizer="offload" in flags,
                        overlap_comm=True if "overlap" in flags else None)
    if "bf16" in flags:
        spec = spec.model_copy(update={"precision": "bf16"})
    gas = spec.micro_batches_per_rank
    assert spec.parallel_dims == dims and gas * dims.dp == len(problem["rows"])

    attn = H.CORE_ATTN
    backend = next((f.removeprefix("attn-") for f in flags if f.startswith("attn-")), None)
    if backend is not None:
        from prolong.model import attention as A

        K.install(A)  # only the CUDA kernels: names, dispatch and the wrapper are the real ones
        attn = A.hf_name(backend)
    model = H.make_model(problem["state_dict"], attn=attn)
    name = apply_ulysses(model, groups, attn, seq_length=H.SEQ_LEN)
    assert model.config._attn_implementation == name
    if "overlap" in flags:
        assert spec.overlap_comm
    if "ac" in flags:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # Small loss chunks so the chunked (and checkpointed) loss path runs several chunks.
    built = production_build_engine(model, spec, groups, chunk_tokens=8, checkpoint=True)
    mine = slice(groups.dp_rank * gas, (groups.dp_rank + 1) * gas)
    return built.engine, model, [problem[key][mine] for key in H.STEP_ROWS]


def full_params(model) -> dict:
    """The full weights DeepSpeed optimizes: the fp32 masters (ZeRO >= 1, or bf16), the module's
    own parameters otherwise (ZeRO-0 in fp32 keeps no other copy)."""
    from deepspeed.utils import safe_get_full_fp32_param

    params = {}
    for name, p in model.named_parameters():  # collective under ZeRO: every rank, same order
        full = safe_get_full_fp32_param(p)
        full = p.detach() if full is None else full
        params[name] = full.detach().clone().reshape(getattr(p, "ds_shape", p.shape))
    return params


def full_moments(engine, model) -> dict | None:
    """AdamW's exp_avg and exp_avg_sq as DeepSpeed holds them (fp32 optimizer state), gathered;
    None where DeepSpeed keeps no mapping (ZeRO-0 in fp32)."""
    from deepspeed.utils import safe_get_full_optimizer_state

    # DeepSpeed 0.19's ZeRO-1/2 links each parameter to its optimizer state once, right after
    # the first param group's first step, when torch's AdamW (whose state is created lazily)
    # has no state yet for the second group (no weight decay): the link is redone here, with
    # DeepSpeed's own function, now that every group has state.
    zero_optimizer = engine.optimizer
    if hasattr(zero_optimizer, "_hp_optimizer_states_linked"):
        zero_optimizer._hp_optimizer_states_linked = False
        zero_optimizer._lazy_init_hp_params_optimizer_state()
    out = {"exp_avg": {}, "exp_avg_sq": {}}
    for name, p in model.named_parameters():  # collective: every rank, same order
        for key, moments in out.items():
            full = safe_get_full_optimizer_state(p, key)
            if full is None:
                return None
            moments[name] = full.detach().clone().reshape(getattr(p, "ds_shape", p.shape))
    return out


def run_case(case: str, problem: dict, groups) -> dict:
    from deepspeed.utils import safe_get_full_grad

    from prolong.parallel.step import train_step
    from prolong.parallel.ulysses import loss_normalizer

    stage, flags = parse_case(case)
    engine, model, step_rows = build_engine(stage, flags, problem, groups)
    masters = full_params(model) if "bf16" in flags else None  # before any step
    steps = []
    for rows in step_rows:
        grads = {}

        def read_grads(grads: dict = grads) -> None:  # collective under ZeRO-1/2/3
            for name, p in model.named_parameters():
                g = safe_get_full_grad(p)
                assert g is not None, f"no gradient for {name}"
                grads[name] = g.detach().clone().reshape(getattr(p, "ds_shape", p.shape))

        def plain_mean(n, *, zero_stage, **kw):  # the ZeRO-1/2 divisor whatever the stage
            return loss_normalizer(n, zero_stage=min(zero_stage, 1), **kw)

        result = train_step(engine, rows, groups, before_update=read_grads,
                            normalizer=plain_mean if "plain" in flags else loss_normalizer)
        assert grads, "before_update was not called"
        steps.append({"loss": result.loss, "grads": grads, "params": full_params(model),
                      "grad_norm": result.grad_norm, "valid_tokens": result.valid_tokens,
                      "moments": full_moments(engine, model) if "bf16" in flags else None})
    lp_dtypes = {str(p.dtype) for p in model.parameters()}
    engine.destroy()
    del engine
    gc.collect()
    return {**steps[0], "second": steps[1], "masters_before": masters,
            "module_dtypes": sorted(lp_dtypes)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--problem", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--sp", type=int, required=True)
    ap.add_argument("--cases", default="0,1,2,3", help="comma-separated, see parse_case")
    args = ap.parse_args()

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=timedelta(seconds=120))
    try:
        from prolong.parallel.dims import ParallelDims

        groups = ParallelDims(world_size=world, sp=args.sp, workers_per_node=world).build()
        sp4 = None  # built once, when a case asks for it (new_group is collective)
        problem = torch.load(args.problem, weights_only=False)
        results, timings = {}, {}
        for case in args.cases.split(","):
            t0 = time.perf_counter()
            if "sp4" in parse_case(case)[1] and sp4 is None:
                sp4 = ParallelDims(world_size=world, sp=4, workers_per_node=world).build()
            results[case] = run_case(case, problem, sp4 if "sp4" in case else groups)
            timings[case] = time.perf_counter() - t0
        if rank == 0:
            torch.save({"results": results, "timings": timings}, args.out)
        dist.barrier()
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
