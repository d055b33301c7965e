"""Make a depth-pruned Hugging Face causal LM a standard model: fewer layers, config and indices rewritten.

`drop_layers` removes blocks in place and rewrites what transformers reads per layer: ``num_hidden_layers``,
each attention's ``layer_idx`` (the KV cache is indexed by it), and per-layer config lists (``layer_types``
and any other list attribute of the config with one entry per layer). The saved folder loads with plain
``AutoModelForCausalLM.from_pretrained``. `prunekit.speed.measure_speed` times the result.

>>> kept = drop_layers(model, keep)          # keep: one bool per layer  # doctest: +SKIP
>>> model.save_pretrained("out")             # or prunekit.depth.save_depth_pruned(...)  # doctest: +SKIP
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from prunekit.depth.core import check_keep, drop_blocks
from prunekit.errors import InputError
from prunekit.jsonl import check_metadata
from prunekit.weights.engine import find_blocks
from prunekit.weights.io import refuse_composite

__all__ = ["drop_layers", "save_depth_pruned"]

# config attributes that hold one entry per layer in some transformers architectures
_PER_LAYER = ("layer_types", "no_rope_layers", "sliding_window_layers", "swa_layers",
              "prunekit_layer_widths")  # the last: a Týr output's per-layer widths (`prunekit.load`)


def drop_layers(model: nn.Module, keep: list[bool]) -> list[int]:
    """Keep only the decoder layers where `keep` is True (in place); returns the kept original indices.

    For a transformers model the rewritten config is checked before anything changes: the architecture it
    describes must have exactly the kept blocks' weights (names and shapes), so the saved folder cannot load
    with some layers freshly initialised. Layouts given by rule are rewritten: Qwen-MoE's dense layers
    (``mlp_only_layers`` + ``decoder_sparse_step``) become ``decoder_sparse_step=1`` and the kept dense layers'
    new indices; DeepSeek-V3/GLM-4-MoE's ``first_k_dense_replace`` counts the kept dense layers, and Qwen2/3's
    ``max_window_layers`` the kept layers below the first sliding one (so the rule and ``layer_types`` agree). A layout
    prunekit cannot express is an `InputError`, with the model untouched.
    """
    prefix, blocks = find_blocks(model)
    depth = len(blocks)
    keep = check_keep(keep, depth)
    config = model.config
    if getattr(config, "num_hidden_layers", depth) != depth:
        raise InputError(f"config.num_hidden_layers is {config.num_hidden_layers} but the model has {depth} blocks")
    kept = [i for i, k in enumerate(keep) if k]
    refuse_composite(config, "depth pruning")
    if getattr(config, "scale_attn_by_inverse_layer_idx", False) and any(new != old for new, old in enumerate(kept)):
        # GPT-2 fixes 1 / (layer index + 1) into each block when it is built: reloaded, a moved block scaled otherwise
        raise InputError("this model scales each block's attention by 1 / (its layer index + 1) "
                         "(scale_attn_by_inverse_layer_idx), so a kept block that moves to a new index would compute "
                         "something else once saved and loaded; no config can say otherwise. The model is unchanged; "
                         "drop only the last blocks, or prune a model without that setting")
    updates = _config_updates(config, kept, depth)
    _check_rewritten_config(model, prefix, kept, updates)
    drop_blocks(blocks, keep)
    for new, block in enumerate(blocks):
        for module in block.modules():
            for attr in ("layer_idx", "layer_id"):  # the cache slot: GPT-Neo's is layer_id (an IndexError in generate)
                if isinstance(getattr(module, attr, None), int) and not isinstance(getattr(module, attr), bool):
                    setattr(module, attr, new)
    for name, value in updates.items():
        setattr(config, name, value)
    return kept


def _config_updates(config, kept: list[int], depth: int) -> dict:
    """The config attributes that change when only the `kept` of `depth` layers remain."""
    updates = {"num_hidden_layers": len(kept)}
    attrs = vars(config)
    only = attrs.get("mlp_only_layers")  # Qwen-MoE: indices of the layers with a dense MLP
    if isinstance(only, (list, tuple)):
        if "decoder_sparse_step" in attrs:  # layer i is sparse iff i not in only and (i + 1) % step == 0
            step = attrs["decoder_sparse_step"] or 1
            experts = getattr(config, "num_experts", 1) or 0
            dense = [new for new, old in enumerate(kept) if old in only or not (experts > 0 and (old + 1) % step == 0)]
            updates["decoder_sparse_step"] = 1
        else:
            dense = [new for new, old in enumerate(kept) if old in only]
        updates["mlp_only_layers"] = type(only)(dense)
    first = attrs.get("first_k_dense_replace")  # DeepSeek-V3, GLM-4-MoE: the first k layers are dense
    if isinstance(first, int) and not isinstance(first, bool):
        updates["first_k_dense_replace"] = sum(old < first for old in kept)
    window = attrs.get("max_window_layers")  # Qwen2/3: with use_sliding_window, layers from this index slide
    if isinstance(window, int) and not isinstance(window, bool):  # (layer_types, rewritten below, says it too)
        updates["max_window_layers"] = sum(old < window for old in kept)
    for name, value in attrs.items():
        if name in updates:
            continue
        if isinstance(value, (list, tuple)) and len(value) == depth and (name in _PER_LAYER or name.endswith("_layers")
                                                                          or name.endswith("layer_types")):
            updates[name] = type(value)(value[i] for i in kept)
    return updates


def _weight_shapes(model: nn.Module) -> dict[str, tuple]:
    return {k: tuple(v.shape) for k, v in model.state_dict().items()}


def _check_rewritten_config(model: nn.Module, prefix: str, kept: list[int], updates: dict) -> None:
    """Refuse when `model`'s architecture, rebuilt from the config with `updates`, would not hold exactly the
    kept blocks' weights. Skipped for models that are not transformers models, and for those whose own config
    already does not describe their weights (a structurally pruned model with per-layer widths)."""
    import copy

    import torch

    try:
        from transformers import PreTrainedModel
    except ImportError:  # pragma: no cover - transformers is a dependency
        return
    if not isinstance(model, PreTrainedModel):
        return

    def skeleton(config) -> dict[str, tuple] | None:
        try:
            with torch.device("meta"):
                return _weight_shapes(type(model)(config))
        except Exception:  # an architecture that cannot be built from its config alone: nothing to compare
            return None

    have = _weight_shapes(model)
    if skeleton(model.config) != have:
        return
    config = copy.deepcopy(model.config)
    for name, value in updates.items():
        setattr(config, name, value)
    lead = prefix + "."
    renamed = {str(old): str(new) for new, old in enumerate(kept)}
    expected = {}
    for key, shape in have.items():
        if key.startswith(lead):
            index, rest = key[len(lead):].split(".", 1)
            if index not in renamed:
                continue
            key = f"{lead}{renamed[index]}.{rest}"
        expected[key] = shape
    built = skeleton(config)
    if built is None:  # the config built before the blocks went; now it does not (Gemma3n's per-layer lists)
        raise InputError(f"dropping blocks of this {config.model_type!r} model leaves a config its architecture "
                         "cannot be built from (it holds per-layer settings prunekit does not rewrite); the model is "
                         "unchanged")
    if built == expected:
        return
    missing = sorted(set(built) - set(expected))
    unused = sorted(set(expected) - set(built))
    resized = sorted(k for k in set(built) & set(expected) if built[k] != expected[k])
    first = (missing or unused or resized)[0]
    raise InputError(f"dropping these blocks of this {config.model_type!r} model leaves a config that describes other "
                     f"weights than the kept blocks hold ({len(missing)} missing, {len(unused)} unused, {len(resized)} "
                     f"resized; e.g. {first}): its config lays out its layers in a way prunekit does not rewrite. "
                     "The model is unchanged; keep other blocks or rewrite the config by hand")


def save_depth_pruned(model, tokenizer, out, *, metadata: dict, overwrite: bool = False, extra=None,
                      dtype=None, unchanged_from=None) -> Path:
    """Save a model `drop_layers` pruned (atomically, with ``prunekit.json``); see `prunekit.save_pruned`.

    `metadata` must record ``kept_layers``: the original (dense) indices of the layers kept, ascending, one per
    layer the model has now (what `drop_layers` returns). `unchanged_from`: the input folder of a model run in a
    narrower dtype; every value nothing changed, each kept block's included, is saved as that folder stores it
    under the block's old index."""
    from prunekit.weights.engine import find_blocks
    from prunekit.weights.io import save_pruned

    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict recording kept_layers, e.g. {{'kept_layers': [0, 2, 3]}}; "
                         f"got {type(metadata).__name__}")
    if "kept_layers" not in metadata:
        raise InputError("metadata must record kept_layers, the original indices of the kept layers")
    kept, depth = metadata["kept_layers"], len(find_blocks(model)[1])
    if (not isinstance(kept, (list, tuple)) or len(kept) != depth
            or not all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in kept)
            or any(a >= b for a, b in zip(kept, kept[1:]))):  # [9, 0, 7, 7, 3] for 2 layers was written as given
        raise InputError(f"metadata kept_layers={kept!r} must list the {depth} layers the model has by their original "
                         "indices, ascending (what drop_layers returns)")
    check_metadata(metadata)
    return save_pruned(model, tokenizer, out, metadata=metadata, overwrite=overwrite, extra=extra, dtype=dtype,
                       unchanged_from=unchanged_from, kept_blocks=list(kept), pruned_zeros=False)
