"""Pruning what a model keeps while it runs: the KV cache (`prunekit.inference.kv`)."""
