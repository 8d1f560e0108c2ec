"""Model loading, RoPE theta, attention backends, loss, and FLOPs accounting."""
