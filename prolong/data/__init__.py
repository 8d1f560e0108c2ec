"""The data pipeline: sources, tokenization into shards, long-document builders, mixture, packing."""
