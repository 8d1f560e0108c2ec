"""Peak memory per GPU of a training stage, on paper: what ``prolongctl plan`` prints.

Pure arithmetic over the spec (no torch). The peak of a step is the persistent part plus the
largest transient:

**Persistent** (bytes per parameter, N parameters, partitioned over all W = DP x SP ranks the way
DeepSpeed ZeRO partitions over its sequence-data-parallel group; ``p`` = 2 in bf16, 4 in fp32):

============  ==================  =========================  =========================
ZeRO          parameters          gradients                  fp32 master + 2 moments
============  ==================  =========================  =========================
0             p                   p                          (4 if bf16) + 8
1             p                   4 (fp32 accumulation)      12 / W
2             p                   4 / W                      12 / W
3             p / W               4 / W                      12 / W
============  ==================  =========================  =========================

Under bf16 with ZeRO >= 1 our DeepSpeed config accumulates gradients in fp32
(:mod:`prolong.parallel.deepspeed_config`); DeepSpeed's ZeRO optimizers keep an fp32 master
partition even for fp32 models; ``offloadOptimizer`` moves master and moments to host memory.
ZeRO >= 1 also allocates its gradient-reduction bucket up front, ``reduce_bucket_size`` = 5e8
elements whatever the model's size (two of them with ``overlap_comm``, which we turn on on GPUs),
at the reduction's precision (``parallelism.communication.dataType``, fp32 by default; ZeRO-3
then also holds the bucket cast to it while reducing).

**Activation checkpoints**: with activation checkpointing every decoder layer keeps its input,
one hidden state per local token (T = sequenceLength / SP), plus the final hidden state that the
loss reads: (L + 1) x T x hiddenSize activations. ``saveAttention`` (selective checkpointing) adds
each layer's attention output and log-sum-exp: L x T x (hiddenSize activations + heads fp32). With ``activationOffload`` the layer inputs live
in host memory. Without checkpointing every layer keeps all it saves for the backward instead.

**Transients**, the largest of:

- *decoder layer*: the backward of one layer, recomputed whole, holds that layer's saved
  activations -- attention (norm output, q/k/v, rotated q/k, attention output, residual; under
  Ulysses the all-to-all copies too, each rank holding heads / SP of the full sequence) and MLP
  (norm output, gate, up, SiLU, product: 4 x T x intermediateSize, and two such gradients while
  its backward runs; with TiledMLP only one tile's worth, T / shards);
- *loss chunk*: the LM head over lossChunkTokens positions: logits, their log-softmax and its
  gradient in fp32 (three c x V tensors, measured on CPU: 3.0-3.4x one fp32 c x V tensor), plus
  the bf16 logits and their gradient in bf16;

each with, under ZeRO-3, the gathered weights (and their unreduced gradient) of the layer or the
LM head it runs.

**How close it is.** tests/model/test_memory.py holds the estimate to within
:data:`ESTIMATE_MARGIN` (10 %) of the measured peak of real training steps of a small model on
CPU through the trainer's own Worker, for every ZeRO stage: the whole peak, the peak without
DeepSpeed's buckets, and the buckets themselves. So the true peak can be up to
``peak / (1 - ESTIMATE_MARGIN)``, and ``plan`` warns when that exceeds the GPU
(:attr:`MemoryEstimate.tight`). Not counted and not proven: the CUDA context (~0.5-1 GiB), NCCL's
buffers and allocator fragmentation (expandable segments reduce the latter).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from prolong.spec import ArchitectureSpec, MemorySpec, TrainSpec

GIB = 1 << 30
MIB = 1 << 20

DEVICE_MEMORY_BYTES = {
    # Total memory as the driver reports it (nvidia-smi), per GPU model of ClusterSpec.gpuType.
    "H100": 81559 * MIB,   # H100 SXM5 80 GB
    "H200": 143771 * MIB,  # H200 141 GB
    "A100": 81920 * MIB,   # A100 80 GB
    "B200": 183359 * MIB,  # B200 180 GB
}
ESTIMATE_MARGIN = 0.10
"""The estimate lies within this fraction of the measured peak (estimate / measured in
[1 - margin, 1 + margin]): what tests/model/test_memory.py holds every case to, and what ``plan``
allows for when it warns."""
TIGHT_FRACTION = 1 - ESTIMATE_MARGIN
"""Above this share of the device's memory a stage is reported as tight: an estimate that
may be :data:`ESTIMATE_MARGIN` under the true peak no longer proves the peak fits."""

REDUCE_BUCKET_ELEMENTS = 500_000_000
"""DeepSpeed's default ``reduce_bucket_size`` (our config leaves it alone)."""
CUDA_ALLOC_CONF = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}


def allocator_env(memory: MemorySpec, *, gpu: bool) -> dict[str, str]:
    """The workers' CUDA allocator setting (``parallelism.memory.expandableSegments``); nothing
    on CPU workers."""
    return dict(CUDA_ALLOC_CONF) if gpu and memory.expandable_segments else {}


def parameter_count(arch: ArchitectureSpec) -> int:
    """All parameters: embedding, LM head (unless tied), projections and norms."""
    h, kv = arch.hidden_size, arch.num_key_value_heads * arch.head_dim
    layer = 2 * h * h + 2 * h * kv + 3 * h * arch.intermediate_size + 2 * h
    embeddings = arch.vocab_size * h * (1 if arch.tie_word_embeddings else 2)
    return arch.num_layers * layer + embeddings + h


def layer_parameter_count(arch: ArchitectureSpec) -> int:
    h, kv = arch.hidden_size, arch.num_key_value_heads * arch.head_dim
    return 2 * h * h + 2 * h * kv + 3 * h * arch.intermediate_size + 2 * h


@dataclass(frozen=True)
class MemoryEstimate:
    """Estimated bytes per GPU of one training stage at its peak (see the module docstring)."""

    parameters: float
    gradients: float
    optimizer: float
    """fp32 master weights and the two AdamW moments kept on the device (0 when offloaded)."""
    zero_buffers: float
    """DeepSpeed's gradient-reduction bucket(s)."""
    checkpoints: float
    """Activations kept across the whole step on the device (checkpointed layer inputs)."""
    layer: float
    """Transient of one decoder layer's backward (attention + MLP, gathered ZeRO-3 weights)."""
    mlp: float
    """The MLP's part of ``layer`` (tiled with TiledMLP)."""
    attention: float
    """The attention's part of ``layer``."""
    loss: float
    """Transient of one loss chunk (logits, log-softmax, gradients; gathered LM head)."""
    host: float
    """Host memory per worker taken by offloading (optimizer state, activation checkpoints)."""
    device_bytes: float | None
    """The GPU's memory; None on CPU workers."""
    mlp_tiles: int = 1

    @property
    def transient(self) -> float:
        return max(self.layer, self.loss)

    @property
    def transient_kind(self) -> str:
        return "loss chunk" if self.loss >= self.layer else "decoder layer"

    @property
    def persistent(self) -> float:
        return (self.parameters + self.gradients + self.optimizer + self.zero_buffers
                + self.checkpoints)

    @property
    def peak(self) -> float:
        return self.persistent + self.transient

    @property
    def fits(self) -> bool | None:
        return None if self.device_bytes is None else self.peak <= self.device_bytes

    @property
    def upper_bound(self) -> float:
        """The largest true peak this estimate allows: it is at least ``1 - ESTIMATE_MARGIN`` of
        the measured peak."""
        return self.peak / (1 - ESTIMATE_MARGIN)

    @property
    def tight(self) -> bool:
        """The stage may not fit: the peak within the estimate's margin exceeds the device
        (the same as ``peak > TIGHT_FRACTION x device``)."""
        return self.device_bytes is not None and self.upper_bound > self.device_bytes


def estimate_memory(spec: TrainSpec, arch: ArchitectureSpec) -> MemoryEstimate:
    """Peak bytes per worker of a training stage of shape ``arch``."""
    par, mem = spec.parallelism, spec.parallelism.memory
    world, sp, zero = spec.cluster.world_size, spec.sp_size, par.zero_stage
    gpu = spec.cluster.device == "gpu"
    act = 2 if spec.resolved_precision == "bf16" else 4  # bytes per activation and parameter
    n = parameter_count(arch)

    # -- persistent: model states by ZeRO stage ------------------------------------------------
    params = n * act / (world if zero == 3 else 1)
    if zero == 0:
        grads = n * act
        opt = n * ((4 if act == 2 else 0) + 8)
    else:
        grads = n * 4 / (world if zero >= 2 else 1)
        opt = n * 12 / world
    host = 0.0
    if par.offload_optimizer:
        host, opt = opt, 0.0
    if zero == 0:
        buffers = 0.0
    else:
        # One set of buckets at a time is the worst the product reaches, not one per backward:
        # DeepSpeed 0.19's ZeRO-1/2 (stage_1_and_2.py) allocates them in setup_buckets at the
        # first gradient hook of each backward, after dropping its old list, and releases them at
        # the end of that backward (independent_gradient_partition_epilogue ->
        # _release_ipg_buffers), once the gradients in them are copied out (copy_grads_in_partition)
        # or dropped. The communication backend may hold a bucket a moment longer, until the
        # reduction's work object goes (gloo frees it on its worker thread), but that is over
        # long before the next backward's first gradient: traced on CPU, the gloo thread freed
        # the old bucket 0.7 ms after the release and the next one came 69 ms later, on a tiny
        # model whose forward takes milliseconds. (On GPUs that NCCL lets go of a finished work
        # within a forward pass is assumed, not measured.) The runs of
        # tests/model/test_memory.py that measured two buckets had missed that free (the
        # profiler sees its own thread only), not held two. ZeRO-3 allocates its buckets once,
        # when the engine is built. The test holds the bucket bytes alive at once to exactly
        # this count.
        #
        # The reduction's precision (parallelism.communication.dataType): ZeRO 2 buckets at it;
        # ZeRO-3 buckets in the model's dtype and casts the whole bucket to it before reducing
        # (stage3.__avg_scatter_contiguous_grads), a second, wider copy while it is reduced.
        comm = 4 if par.communication.data_type == "fp32" or act == 4 else 2
        bucket_bytes = {1: 4, 2: comm, 3: act}[zero]
        copies = 2 if spec.overlap_comm and zero in (1, 2) else 1  # overlap_comm double-buffers
        buffers = REDUCE_BUCKET_ELEMENTS * bucket_bytes * copies
        if zero == 3 and comm != act:
            buffers += REDUCE_BUCKET_ELEMENTS * comm

    # -- activations ---------------------------------------------------------------------------
    t = spec.sequence_length // sp  # local tokens per worker
    h, i, v = arch.hidden_size, arch.intermediate_size, arch.vocab_size
    kv = arch.num_key_value_heads * arch.head_dim
    attention = (5 * t * h + 3 * t * kv) * act
    if sp > 1:
        # Ulysses' all-to-all copies: q and the output for heads / SP of the full sequence (T x H
        # elements each); k and v for max(kvHeads / SP, 1) heads of the full sequence.
        kv_full = spec.sequence_length * max(arch.num_key_value_heads // sp, 1) * arch.head_dim
        attention += (2 * t * h + 2 * kv_full) * act
    tiles = 1
    if mem.tiled_mlp:
        tiles = min(mem.tiled_mlp_shards or math.ceil(t / h), t)
    tile = math.ceil(t / tiles)
    # Saved: the norm output (T x H, the whole input even when tiled) and, per tile, gate, up,
    # SiLU and product; while its backward runs, two intermediate-sized gradients.
    mlp = t * h * act + (4 + 2) * tile * i * act
    if tiles > 1:
        mlp += 2 * t * h * act  # TiledMLP's whole-input gradient buffer and concatenated output
    hidden_grads = 2 * t * h * act  # the gradient flowing in and the one flowing out
    layer_saved = attention + mlp - 2 * tile * i * act  # what the forward leaves for backward
    gathered_layer = layer_parameter_count(arch) * (act + act) if zero == 3 else 0.0
    gathered_head = v * h * (act + act) if zero == 3 else 0.0

    if par.activation_checkpointing:
        checkpoints = (arch.num_layers + 1) * t * h * act
        if mem.activation_offload:
            host += arch.num_layers * t * h * act
            checkpoints = t * h * act
        if mem.save_attention:
            # Each layer's attention output (T x H in the activation dtype; under Ulysses heads/SP
            # of the full sequence, the same count) and its log-sum-exp (fp32, one per head and
            # token), kept on the device by selective checkpointing.
            checkpoints += arch.num_layers * (t * h * act + t * arch.num_attention_heads * 4)
        layer = attention + mlp + hidden_grads + gathered_layer
    else:
        checkpoints = arch.num_layers * layer_saved + t * h * act
        layer = 2 * tile * i * act + hidden_grads + gathered_layer

    chunk = min(mem.loss_chunk_tokens, t)
    logits = chunk * v * (12 + (2 * act if act == 2 else 0))
    loss = logits + hidden_grads + gathered_head

    return MemoryEstimate(parameters=params, gradients=grads, optimizer=opt,
                          zero_buffers=buffers, checkpoints=checkpoints, layer=layer, mlp=mlp,
                          attention=attention, loss=loss, host=host,
                          device_bytes=DEVICE_MEMORY_BYTES[spec.cluster.gpu_type] if gpu else None,
                          mlp_tiles=tiles)
