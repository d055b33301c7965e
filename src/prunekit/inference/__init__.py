"""Pruning what a model keeps while it runs: the KV cache (`prunekit.inference.kv`), sampled reasoning paths
(`prunekit.inference.reasoning`) and long conversation memory (`prunekit.inference.memory`)."""
