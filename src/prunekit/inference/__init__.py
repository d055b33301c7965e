"""Pruning what a model keeps while it runs: sampled reasoning paths, conversation memory."""
