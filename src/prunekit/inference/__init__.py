"""Pruning what a model keeps while it runs: sampled reasoning paths (`reasoning`), conversation memory."""
