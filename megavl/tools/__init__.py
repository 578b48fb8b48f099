"""Command-line tools: shard writing and the synthetic shapes dataset."""
