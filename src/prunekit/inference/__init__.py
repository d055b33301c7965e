"""Pruning what a model keeps while it runs: the KV cache (`prunekit.inference.kv`), sampled reasoning paths
(`prunekit.inference.reasoning`) and long conversation memory (`prunekit.inference.memory`)."""

from prunekit._lazy import attach

attach(__name__, {})  # a submodule read as an attribute loads, as the eager imports once made it
