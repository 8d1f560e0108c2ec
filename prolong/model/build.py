"""Build the transformers ``LlamaForCausalLM`` a stage trains, and run its decoder body.

Two ways in:

- **random weights** from an :class:`~prolong.spec.ArchitectureSpec` (the tiny preset for tests
  and the quickstart);
- **pretrained weights** from ``ModelSpec.source`` (an HF id or local path) or a resolved
  ``fromStage`` directory. The loaded config is checked against the stated architecture, and a
  mismatch raises :class:`ArchitectureMismatch` naming every differing field: training the wrong
  shape for days because a path pointed elsewhere is the failure this guards against.

Either way the RoPE base frequency comes from ``ModelSpec.rope_theta`` when given (ProLong raises
Llama-3's 5e5 to 8e6 for 64K and 1.28e8 for 512K), the attention implementation is one of ours
(:mod:`prolong.model.attention`, chosen by :func:`~prolong.model.attention.select_backend`), and
activation checkpointing uses transformers' own, non-reentrant, per decoder layer.

Precision is decided once, by ``TrainSpec.resolved_precision`` (bf16 on GPU, fp32 on CPU unless
the spec says otherwise); the caller passes the dtype (:data:`TORCH_DTYPES`), fp32 by default.
Weights are never downloaded by tests: they load from local directories with
``local_files_only=True``.

Under ZeRO-3 the worker passes a :class:`~prolong.model.zero3.Zero3Init`: the model is then built
partitioned (``deepspeed.zero.Init``) and pretrained weights are streamed in tensor by tensor
(:mod:`prolong.model.zero3`), so no rank ever holds the whole model. ZeRO 0-2 keep a full copy
per rank anyway, and load it with ``from_pretrained``.

:func:`decoder_hidden_states` runs the decoder body only (embeddings, layers, final norm) so that
:func:`~prolong.model.loss.chunked_lm_loss` applies the LM head chunk by chunk; calling the full
``LlamaForCausalLM.forward`` would materialise the logits of the whole row.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from prolong.model.attention import (
    LAYOUT_KWARG,
    DocumentLayout,
    hf_name,
    register_attention_backends,
    select_backend,
)
from prolong.model.loss import chunked_lm_loss
from prolong.model.zero3 import Zero3Init, build_partitioned, load_partitioned
from prolong.spec import ArchitectureSpec, ModelSpec

# ArchitectureSpec field -> LlamaConfig attribute.
_CONFIG_FIELDS = {
    "num_layers": "num_hidden_layers",
    "hidden_size": "hidden_size",
    "num_attention_heads": "num_attention_heads",
    "num_key_value_heads": "num_key_value_heads",
    "intermediate_size": "intermediate_size",
    "vocab_size": "vocab_size",
    "tie_word_embeddings": "tie_word_embeddings",
}


class ArchitectureMismatch(ValueError):
    """A loaded model's config differs from the architecture the spec states."""


TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
"""A resolved precision (``TrainSpec.resolved_precision``) as a torch dtype."""


def llama_config(arch: ArchitectureSpec, *, rope_theta: float | None = None,
                 max_position_embeddings: int = 131072) -> Any:
    """A ``LlamaConfig`` of the given shape (Llama-3 defaults elsewhere: RMSNorm eps 1e-5,
    RoPE theta 5e5 unless ``rope_theta`` is given)."""
    from transformers import LlamaConfig

    cfg = LlamaConfig(
        vocab_size=arch.vocab_size,
        hidden_size=arch.hidden_size,
        intermediate_size=arch.intermediate_size,
        num_hidden_layers=arch.num_layers,
        num_attention_heads=arch.num_attention_heads,
        num_key_value_heads=arch.num_key_value_heads,
        tie_word_embeddings=arch.tie_word_embeddings,
        max_position_embeddings=max_position_embeddings,
        rms_norm_eps=1e-5,
        use_cache=False,
    )
    set_rope_theta(cfg, 5e5 if rope_theta is None else rope_theta)
    return cfg


def set_rope_theta(config: Any, theta: float) -> None:
    """Set the RoPE base frequency (transformers 5 keeps it in ``rope_parameters``; 4.x used a
    ``rope_theta`` attribute)."""
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict):
        config.rope_parameters = {**params, "rope_theta": float(theta)}
    else:
        config.rope_theta = float(theta)


def rope_theta_of(config: Any) -> float:
    params = getattr(config, "rope_parameters", None)
    if isinstance(params, dict) and "rope_theta" in params:
        return float(params["rope_theta"])
    return float(config.rope_theta)


def architecture_mismatches(config: Any, arch: ArchitectureSpec) -> list[str]:
    """Human-readable differences between a model config and the stated architecture."""
    out = []
    for field, attr in _CONFIG_FIELDS.items():
        want, have = getattr(arch, field), getattr(config, attr, None)
        if want != have:
            out.append(f"{field}: spec says {want}, model has {have}")
    return out


def check_architecture(config: Any, arch: ArchitectureSpec, *, where: str = "the model") -> None:
    """Raise :class:`ArchitectureMismatch` unless ``config`` has exactly ``arch``'s shape."""
    diffs = architecture_mismatches(config, arch)
    if diffs:
        raise ArchitectureMismatch(f"{where} does not match model.architecture: " + "; ".join(diffs))


def build_model(spec: ModelSpec, *, device: str | torch.device = "cpu",
                dtype: torch.dtype = torch.float32, source: str | None = None,
                activation_checkpointing: bool = False, local_files_only: bool = False,
                seed: int | None = None, zero3: Zero3Init | None = None,
                load_weights: bool = True) -> Any:
    """A ``LlamaForCausalLM`` (or the checkpoint's causal-LM class) ready to train.

    ``source`` overrides ``spec.source`` (the train loop passes a ``fromStage`` weights directory
    or the staged model here). With neither, the model is randomly initialised from
    ``spec.architecture`` (seeded by ``seed`` when given). ``zero3``: build it partitioned for
    ZeRO-3 (its parameters then live where ``deepspeed.zero.Init`` put them, and ``device`` is
    not used); pretrained weights must then be a local safetensors directory.

    ``load_weights=False``: the shape only (the source's config, checked as usual), with the
    parameters left unset (no read of the weights, no random init), for a caller that loads a
    DeepSpeed checkpoint over them at once: a resume, or a ``weightsAndOptimizer`` start, would
    otherwise read the 16 GB of an 8B model only for ``load_checkpoint`` to overwrite them.
    """
    register_attention_backends()
    backend = select_backend(spec.attention, device, dtype)
    attn = hf_name(backend)
    source = source or spec.source
    if source is None:
        if spec.architecture is None:
            raise ValueError("random initialisation needs model.architecture")
        cfg = llama_config(spec.architecture, rope_theta=spec.rope_theta)
        if seed is not None:
            torch.manual_seed(seed)
        if zero3 is not None:
            model = build_partitioned(cfg, zero3, attn=attn, dtype=dtype, init=load_weights)
        elif load_weights:
            from transformers import LlamaForCausalLM

            model = LlamaForCausalLM._from_config(cfg, attn_implementation=attn, dtype=dtype)
        else:
            model = _unloaded(cfg, attn=attn, dtype=dtype)
    elif zero3 is not None:
        if not Path(source).is_dir():
            raise FileNotFoundError(f"model source {source!r} is not a local directory (ZeRO-3 "
                                    "streams weights from a local or staged directory)")
        config = pretrained_config(source, spec, local_files_only=True)
        model = build_partitioned(config, zero3, attn=attn, dtype=dtype, init=False)
        if load_weights:
            load_partitioned(model, source)
    elif not load_weights:
        model = _unloaded(pretrained_config(source, spec, local_files_only=local_files_only),
                          attn=attn, dtype=dtype)
    else:
        model = _load_pretrained(source, spec, attn=attn, dtype=dtype,
                                 local_files_only=local_files_only)
    if zero3 is None:
        model.to(device)
    model.config.use_cache = False
    if activation_checkpointing:
        enable_activation_checkpointing(model)
    return model


def architecture_of(model: Any) -> ArchitectureSpec:
    """The shape of a loaded model, as the spec states one (for FLOPs when the spec gives none)."""
    c = model.config
    return ArchitectureSpec(num_layers=c.num_hidden_layers, hidden_size=c.hidden_size,
                            num_attention_heads=c.num_attention_heads,
                            num_key_value_heads=c.num_key_value_heads,
                            intermediate_size=c.intermediate_size, vocab_size=c.vocab_size,
                            tie_word_embeddings=c.tie_word_embeddings)


ATTENTION_KERNEL_OPS = (
    # (namespace, op): every attention kernel our backends reach, as the dispatcher sees it.
    ("aten", "_scaled_dot_product_flash_attention_for_cpu"),  # the sdpa reference on CPU
    ("aten", "_scaled_dot_product_flash_attention"),
    ("aten", "_scaled_dot_product_efficient_attention"),
    ("aten", "_scaled_dot_product_cudnn_attention"),
    ("aten", "_flash_attention_forward"),                       # torch's varlen_attn (2.10/2.11)
    ("torch_attn", "_varlen_attn"),                             # torch's varlen_attn custom op
    ("flash_attn", "_flash_attn_varlen_forward"),               # flash-attn 2 (custom op)
    ("flash_attn_3", "fwd"),                                    # flash-attn-3
)
"""Ops whose outputs (attention output and log-sum-exp) selective checkpointing keeps. An op a
kernel does not register (FlexAttention's higher-order op, flash-attn-4's CuTe call) is simply
recomputed: the knob then saves nothing there, and the result is the same."""


def attention_kernel_ops() -> set[Any]:
    """The :data:`ATTENTION_KERNEL_OPS` this process has (namespaces load with their packages)."""
    found = set()
    for namespace, name in ATTENTION_KERNEL_OPS:
        try:
            packet = getattr(getattr(torch.ops, namespace), name)
        except (AttributeError, RuntimeError):
            continue
        found.update(getattr(packet, overload) for overload in packet.overloads())
    return found


def save_attention_context() -> Any:
    """A ``context_fn`` for ``torch.utils.checkpoint``: selective activation checkpointing that
    keeps each attention kernel's outputs (output and LSE: T x H activations and T x heads floats
    per layer), so the recompute re-runs the norms, projections and RoPE but not the kernel, the
    costliest op of a long row (90 % of the counted FLOPs at 8B/512K)."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = attention_kernel_ops()

    def policy(ctx: Any, op: Any, *args: Any, **kwargs: Any) -> CheckpointPolicy:
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def enable_activation_checkpointing(model: Any, *, offload: bool = False,
                                    save_attention: bool = False) -> None:
    """Recompute each decoder layer in the backward (non-reentrant checkpoint). ``offload`` keeps
    the saved layer inputs in pinned host memory (transformers >= 5.23), as ALST does at 512K+.
    ``save_attention``: selective checkpointing that keeps the attention kernel's outputs
    (:func:`save_attention_context`)."""
    kwargs: dict[str, Any] = {"use_reentrant": False}
    if save_attention:
        kwargs["context_fn"] = save_attention_context()
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.23
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs,
                                              offload=offload)
    else:
        if offload:
            raise ValueError("activation offload needs transformers >= 5.23")
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


def pretrained_config(source: str, spec: ModelSpec, *, local_files_only: bool) -> Any:
    """The config of the checkpoint at ``source``, checked against ``spec.architecture`` and with
    the spec's RoPE theta applied."""
    from transformers import AutoConfig

    if local_files_only and not Path(source).is_dir():
        raise FileNotFoundError(f"model source {source!r} is not a local directory "
                                "(local_files_only: nothing is downloaded)")
    config = AutoConfig.from_pretrained(source, local_files_only=local_files_only)
    if spec.architecture is not None:
        check_architecture(config, spec.architecture, where=f"model at {source}")
    if spec.rope_theta is not None:
        set_rope_theta(config, spec.rope_theta)
    config.use_cache = False
    return config


def _unloaded(config: Any, *, attn: str, dtype: torch.dtype) -> Any:
    """The causal LM of ``config`` with its parameters left as allocated (transformers'
    ``no_init_weights``: no init pass), for a checkpoint load to fill."""
    from transformers import AutoModelForCausalLM
    from transformers.initialization import no_init_weights

    with no_init_weights():
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn, dtype=dtype)
    model.tie_weights()
    return model


def _load_pretrained(source: str, spec: ModelSpec, *, attn: str, dtype: torch.dtype,
                     local_files_only: bool) -> Any:
    from transformers import AutoModelForCausalLM

    config = pretrained_config(source, spec, local_files_only=local_files_only)
    return AutoModelForCausalLM.from_pretrained(source, config=config, dtype=dtype,
                                                attn_implementation=attn,
                                                local_files_only=local_files_only)


def decoder_hidden_states(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                          layout: DocumentLayout | None = None) -> torch.Tensor:
    """Final-norm hidden states ``[B, S, Hd]`` of a causal LM's decoder body (no LM head).

    ``position_ids`` are required: they carry the document boundaries (and, under Ulysses, ALST
    asserts they are present in every attention call). ``layout``: the documents of the sequence
    attention sees (the full row, also under Ulysses), computed once per micro-batch by the
    caller; every layer (and its recompute) then reuses it instead of deriving it with two host
    syncs (see :mod:`prolong.model.attention`).
    """
    body = model.get_decoder() if hasattr(model, "get_decoder") else model.model
    extra = {} if layout is None else {LAYOUT_KWARG: layout}
    out = body(input_ids=input_ids, position_ids=position_ids, use_cache=False, **extra)
    return out.last_hidden_state


def packed_lm_loss(model: Any, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   shift_labels: torch.Tensor, *, normalizer: float, chunk_tokens: int = 8192,
                   checkpoint: bool = True,
                   layout: DocumentLayout | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decoder body + chunked, globally normalised LM loss for one packed micro-batch
    (``layout``: see :func:`decoder_hidden_states`)."""
    hidden = decoder_hidden_states(model, input_ids, position_ids, layout)
    return chunked_lm_loss(hidden, model.get_output_embeddings(), shift_labels,
                           normalizer=normalizer, chunk_tokens=chunk_tokens, checkpoint=checkpoint)
