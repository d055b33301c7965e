"""Make a depth-pruned Hugging Face causal LM a standard model: fewer layers, config and indices rewritten.

`drop_layers` removes blocks in place and rewrites what transformers reads per layer: ``num_hidden_layers``,
each attention's ``layer_idx`` (the KV cache is indexed by it), and per-layer config lists (``layer_types``
and any other list attribute of the config with one entry per layer). The saved folder loads with plain
``AutoModelForCausalLM.from_pretrained``. `prunekit.speed.measure_speed` times the result.

>>> # doctest: +SKIP
>>> kept = drop_layers(model, keep)          # keep: one bool per layer
>>> model.save_pretrained("out")             # or prunekit.depth.save_depth_pruned(...)
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prunekit.depth.core import check_keep, drop_blocks
from prunekit.errors import InputError
from prunekit.jsonl import check_metadata
from prunekit.weights.engine import find_blocks

__all__ = ["drop_layers", "save_depth_pruned"]

# config attributes that hold one entry per layer in some transformers architectures
_PER_LAYER = ("layer_types", "no_rope_layers", "sliding_window_layers", "swa_layers", "mlp_only_layers")


def drop_layers(model: nn.Module, keep: list[bool]) -> list[int]:
    """Keep only the decoder layers where `keep` is True (in place); returns the kept original indices."""
    _, blocks = find_blocks(model)
    depth = len(blocks)
    keep = check_keep(keep, depth)
    config = model.config
    if getattr(config, "num_hidden_layers", depth) != depth:
        raise InputError(f"config.num_hidden_layers is {config.num_hidden_layers} but the model has {depth} blocks")
    kept = [i for i, k in enumerate(keep) if k]
    drop_blocks(blocks, keep)
    for new, block in enumerate(blocks):
        for module in block.modules():
            if hasattr(module, "layer_idx") and isinstance(module.layer_idx, int):
                module.layer_idx = new
    config.num_hidden_layers = len(kept)
    for name, value in list(vars(config).items()):
        if isinstance(value, (list, tuple)) and len(value) == depth and (name in _PER_LAYER or name.endswith("_layers")
                                                                          or name.endswith("layer_types")):
            setattr(config, name, type(value)(value[i] for i in kept))
    return kept


def save_depth_pruned(model, tokenizer, out, *, metadata: dict, overwrite: bool = False, extra=None,
                      dtype=None) -> Path:
    """Save a model `drop_layers` pruned (atomically, with ``prunekit.json``); see `prunekit.save_pruned`."""
    from prunekit.weights.io import save_pruned

    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict recording kept_layers, e.g. {{'kept_layers': [0, 2, 3]}}; "
                         f"got {type(metadata).__name__}")
    if "kept_layers" not in metadata:
        raise InputError("metadata must record kept_layers, the original indices of the kept layers")
    check_metadata(metadata)
    return save_pruned(model, tokenizer, out, metadata=metadata, overwrite=overwrite, extra=extra, dtype=dtype)
