"""Pruning what a model is: its weights."""

from prunekit._lazy import attach

attach(__name__, {})  # a submodule read as an attribute loads, as the eager imports once made it
