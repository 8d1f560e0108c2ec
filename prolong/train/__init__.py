"""The training engine: LR schedule, the train loop, checkpoints, metrics and the Ray Train
entry point (one module each)."""
