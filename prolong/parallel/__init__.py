"""Process groups, the DeepSpeed config and the Ulysses (ALST) sequence-parallel wiring.

How a training worker puts them together (after Ray Train / torchrun initialised
torch.distributed; :mod:`prolong.train.loop` and the SP parity tests do exactly this)::

    dims = spec.parallel_dims                         # ParallelDims: validated world = DP x SP
    groups = dims.build()                             # SP, DP and world subgroups (collective)
    model = build_model(spec.model, ...)              # plain HF causal LM, our core attention
    apply_ulysses(model, groups, attn_name,           # wraps it in UlyssesSPAttentionHF (SP > 1)
                  seq_length=spec.sequence_length)    # and hands torch.distributed to deepspeed.comm
    built = build_engine(model, spec, groups)         # prolong.train.engine: CausalLMWithLoss,
                                                      # deepspeed_config(spec, dims), client AdamW,
                                                      # LR schedule, deepspeed.initialize + mpu
    for rows in my_replica_rows_per_step:             # rows of data-parallel rank groups.dp_rank
        result = train_step(built.engine, rows, groups)  # loss, valid tokens, grad norm

Modules: :mod:`.dims` (degrees and groups), :mod:`.deepspeed_config` (config dict, client AdamW),
:mod:`.ulysses` (attention wrapper, mpu, row sharding, loss normalisation, the module DeepSpeed
wraps), :mod:`.step` (one optimizer step in the order DeepSpeed needs).
"""
