"""Process groups, the DeepSpeed config and the Ulysses (ALST) sequence-parallel wiring.

How a training worker puts them together (after Ray Train / torchrun initialised
torch.distributed)::

    dims = ParallelDims.from_spec(spec)               # validates world = DP x SP
    groups = dims.build()                             # SP, DP and world subgroups (collective)
    model = build_model(spec.model, ...)              # plain HF causal LM, our core attention
    apply_ulysses(model, groups, attn_name,           # wraps it in UlyssesSPAttentionHF (SP > 1)
                  seq_length=spec.sequence_length)    # and hands torch.distributed to deepspeed.comm
    module = CausalLMWithLoss(model, chunk_tokens=...)
    config = deepspeed_config(spec)
    optimizer = build_optimizer(module, spec) if uses_client_optimizer(config) else None
    engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, config=config,
                                      mpu=deepspeed_mpu(groups))
    for rows in my_replica_rows_per_step:             # rows of data-parallel rank groups.dp_rank
        result = train_step(engine, rows, groups)     # loss, valid tokens, grad norm

Modules: :mod:`.dims` (degrees and groups), :mod:`.deepspeed_config` (config dict, client AdamW),
:mod:`.ulysses` (attention wrapper, mpu, row sharding, loss normalisation, the module DeepSpeed
wraps), :mod:`.step` (one optimizer step in the order DeepSpeed needs).
"""
