"""The DeepSpeed config of a training stage, as a pure function of its TrainSpec and the parallel
degrees (:class:`prolong.parallel.dims.ParallelDims`, the one object that decides DP and SP).

Choices that are not just copying a field:

- **Batch.** One packed row per micro-batch (``train_micro_batch_size_per_gpu: 1``) and
  ``gradient_accumulation_steps = dims.micro_batches_per_rank(rows per step)``. ``train_batch_size`` is left out:
  DeepSpeed derives it as micro x GAS x (world / SP), and stating it twice could only disagree.
- **Precision.** ``auto`` is bf16 on GPU, fp32 on CPU. Under bf16 with ZeRO >= 1, gradients are
  accumulated in fp32 across micro-batches (``data_types.grad_accum_dtype``): ProLong accumulates
  8+ rows per step, and bf16 accumulation loses the small ones. ZeRO-0 cannot mix bf16 weights with
  fp32 accumulation in DeepSpeed (NotImplementedError), so it keeps bf16 there.
- **Clipping** is always written: DeepSpeed clips at 1.0 by default since 0.19.3, so leaving it out
  would silently clip a spec that says ``gradClip: null``. null -> 0.0 (disabled).
- **Optimizer.** Never an ``optimizer`` section: the trainer always passes a ``torch.optim.AdamW``
  (:func:`build_optimizer`) as DeepSpeed's client optimizer. DeepSpeed's own "AdamW"
  JIT-compiles an op at first use (``cpu_adam`` on CPU, ~50 s, or ``fused_adam`` on CUDA,
  minutes, unless the image pre-built it), while torch's AdamW needs no build and is fused on
  CUDA (``fused=True``). ZeRO accepts it with ``zero_allow_untested_optimizer``.
- **Offload.** With ``offloadOptimizer`` ZeRO keeps the fp32 master weights and AdamW moments on
  the CPU and steps the client optimizer there. DeepSpeed refuses a client optimizer under
  offload unless ``zero_force_ds_cpu_optimizer`` is false (it would rather build its
  DeepSpeedCPUAdam), so the flag is written false. torch's AdamW on CPU tensors is slower than
  DeepSpeedCPUAdam's AVX kernel but needs no build, and the SP parity tests
  (tests/parallel/test_sp_parity.py, cases ``+offload``) show the step equals a single process's.
- **ZeRO-3 gradient reduction.** ``reduce_scatter: true`` is written explicitly: with it ZeRO-3
  always averages gradients over all DP x SP ranks (coalesced reduce-scatter), whereas with
  ``reduce_scatter: false`` it divides by DP only for buckets that fit ``reduce_bucket_size`` and
  by DP x SP for larger ones. The loss normalisation in :mod:`prolong.parallel.ulysses` relies on
  one fixed divisor per stage.
- **Gradient reduction** at one stated precision, ``parallelism.communication.dataType`` (fp32
  by default), written as both ``communication_data_type`` and
  ``seq_parallel_communication_data_type``: left alone, DeepSpeed 0.19 reduces a bf16 model's
  gradients in bf16 without SP but in fp32 with SP > 1 (``engine._configure_distributed_model``
  swaps in the SP type), so stage 1 and stage 2 would differ and the plan would count the wrong
  bucket width. ``overlap_comm`` follows ``parallelism.communication.overlapComm`` (on GPUs by
  default); the SP parity tests run it forced on, on CPU (case ``2+overlap``).
- **Sequence parallelism.** ``sequence_parallel_size`` = SP (DeepSpeed uses it for its batch
  arithmetic when no mpu says otherwise; the trainer also passes the mpu).
- **Activation checkpointing** is applied on the model side (transformers'
  ``gradient_checkpointing_enable``, non-reentrant), not through DeepSpeed's
  ``activation_checkpointing`` section, which only serves Megatron-style models.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from prolong.parallel.dims import ParallelDims
from prolong.spec import TrainSpec

LOG_EVERY_NEVER = 1 << 30


def deepspeed_config(spec: TrainSpec, dims: ParallelDims) -> dict[str, Any]:
    """The ``config`` dict for ``deepspeed.initialize`` of a TrainSpec (PretrainSpec/SFTSpec)."""
    par = spec.parallelism
    opt = spec.optimizer
    stage = par.zero_stage
    bf16 = spec.resolved_precision == "bf16"
    if par.offload_optimizer and stage == 0:
        raise ValueError("offloadOptimizer needs ZeRO stage >= 1")

    zero: dict[str, Any] = {"stage": stage}
    if stage >= 1:
        zero.update(contiguous_gradients=True, overlap_comm=spec.overlap_comm,
                    reduce_scatter=True)
    if par.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": spec.cluster.device == "gpu"}

    config: dict[str, Any] = {
        "train_micro_batch_size_per_gpu": 1,
        "gradient_accumulation_steps": dims.micro_batches_per_rank(spec.rows_per_step),
        "gradient_clipping": float(opt.grad_clip) if opt.grad_clip is not None else 0.0,
        "zero_optimization": zero,
        "bf16": {"enabled": bf16},
        "fp16": {"enabled": False},
        "sequence_parallel_size": dims.sp,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": LOG_EVERY_NEVER,
        "wall_clock_breakdown": False,
        # One stated reduction precision: DeepSpeed otherwise reduces in the model's dtype
        # without SP and switches to seq_parallel_communication_data_type (default fp32) with it.
        "communication_data_type": par.communication.data_type,
        "seq_parallel_communication_data_type": par.communication.data_type,
    }
    if bf16 and stage >= 1:
        config["data_types"] = {"grad_accum_dtype": "fp32"}
    if par.offload_optimizer:
        config["zero_force_ds_cpu_optimizer"] = False  # our torch AdamW steps on the CPU copy
    return config


def param_groups(named_params: Iterable[tuple[str, torch.nn.Parameter]],
                 weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: decay on matrices (dim >= 2), none on norms and biases (as HF Trainer, which
    ProLong trained with, does)."""
    decay, no_decay = [], []
    for _, p in named_params:
        if not p.requires_grad:
            continue
        # ds_shape: under ZeRO-3 a parameter built partitioned (zero.Init) has empty data.
        (decay if len(getattr(p, "ds_shape", p.shape)) >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(model: torch.nn.Module, spec: TrainSpec,
                    lr: float | None = None) -> torch.optim.AdamW:
    """The client optimizer: torch AdamW with the spec's betas, eps and weight decay (fused on
    CUDA). Build it before ``deepspeed.initialize`` (DeepSpeed wraps it). Under offload ZeRO
    steps it on CPU copies of the parameters, so it is not built fused for CUDA then."""
    opt = spec.optimizer
    fused = next(model.parameters()).is_cuda and not spec.parallelism.offload_optimizer
    return torch.optim.AdamW(param_groups(model.named_parameters(), opt.weight_decay),
                             lr=spec.schedule.peak_lr if lr is None else lr,
                             betas=tuple(opt.betas), eps=opt.eps, fused=fused or None)
