"""Weight-pruning methods: one file each, each a plain function over one weight matrix and its statistics."""

from prunekit._lazy import attach

attach(__name__, {})  # a submodule read as an attribute loads, as the eager imports once made it
