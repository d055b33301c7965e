"""Save a structurally pruned model, and `load` it back with no custom code.

- Every layer keeps the same widths (and the hidden size is a multiple of the query heads, which transformers'
  config requires): ``config.json`` says so with the standard fields (``num_attention_heads``,
  ``intermediate_size``, an explicit ``head_dim``), and plain ``AutoModelForCausalLM.from_pretrained`` loads it.
- Widths differ per layer (Týr's point): ``config.json`` keeps the dense model's fields and adds
  ``prunekit_layer_widths`` (``[{"heads", "intermediate"}, ...]``). Plain transformers refuses such a folder
  (the weight shapes do not match the config, a loud error rather than a wrong model); `load` builds the model
  class the config names (``AutoModelForCausalLM.from_config``, never ``trust_remote_code``), shrinks each
  layer to its widths and loads the safetensors weights, checking every tensor was matched.

Either way the reloaded model's logits equal the pruned model's in memory.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from prunekit import jsonl
from prunekit.errors import InputError
from prunekit.structured.units import (KEPT_ATTR, Widths, attention, kept_of, layer_widths, mlp_of, shrink_attention,
                                       shrink_mlp)
from prunekit.weights.engine import find_blocks
from prunekit.weights.io import write_atomically

__all__ = ["WIDTHS_KEY", "prepare_config", "save_structured", "load"]

WIDTHS_KEY = "prunekit_layer_widths"


def prepare_config(model) -> list[Widths]:
    """Write the model's widths into ``model.config`` (standard fields when uniform, else `WIDTHS_KEY`)."""
    widths = layer_widths(model)
    cfg = model.config
    head_dim = attention(find_blocks(model)[1][0]).head_dim
    cfg.head_dim = head_dim
    # transformers' config checks hidden_size % num_attention_heads == 0 even with an explicit head_dim
    if len(set(widths)) == 1 and cfg.hidden_size % widths[0].heads == 0:
        cfg.num_attention_heads = widths[0].heads
        cfg.intermediate_size = widths[0].intermediate
        if hasattr(cfg, WIDTHS_KEY):
            delattr(cfg, WIDTHS_KEY)
    else:
        setattr(cfg, WIDTHS_KEY, [w.to_dict() for w in widths])
    return widths


def save_structured(model, tokenizer, out: str | os.PathLike, *, metadata: dict, overwrite: bool = False,
                    extra=None, dtype=None, unchanged_from: str | os.PathLike | None = None) -> Path:
    """Save `model` (safetensors, in `dtype` when given), `tokenizer` and ``prunekit.json`` into `out`,
    atomically. `unchanged_from`: the input folder of a model computed in a narrower dtype; what the pruning did
    not change (the kept rows and columns of the shrunk Linears included) is saved as it stores it
    (`prunekit.weights.io.unchanged_from_input`)."""
    from prunekit.weights.io import parse_dtype, save_weights

    dtype = parse_dtype(dtype, what="the saved dtype")
    metadata = jsonl.check_metadata(metadata)  # before anything is changed or written
    prepare_config(model)

    def build(tmp: Path) -> None:
        save_weights(model, tmp, dtype, unchanged_from=unchanged_from, pruned_zeros=False)  # widths: no zeros
        if tokenizer is not None:
            tokenizer.save_pretrained(tmp)
        (tmp / "prunekit.json").write_text(jsonl.dumps(metadata, indent=2) + "\n")
        if extra is not None:
            extra(tmp)

    return write_atomically(out, build, overwrite=overwrite)


def _state_dict(path: Path) -> dict:
    from safetensors.torch import load_file

    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise InputError(f"{path} has no .safetensors weights; save the model with prunekit or save_pretrained")
    state = {}
    for f in files:
        state.update(load_file(str(f)))
    return state


def load(path: str | os.PathLike, *, dtype=None, check_finite: bool = True, device=None):
    """``(model, tokenizer)`` of a folder saved by prunekit (per-layer widths or not), or any HF model folder;
    `prunekit.load_model` with ``None`` for the tokenizer of a folder that has no ``tokenizer_config.json``
    (the same checks: NaN/Inf weights, unless ``check_finite=False`` to inspect a broken model, a config that
    does not match the weights, remote code); on `device` (``"cuda"``...) when given.

    >>> model, tok = load("pruned-smollm2")  # doctest: +SKIP
    """
    from prunekit.weights.io import load_checked

    return load_checked(path, dtype=dtype, check_finite=check_finite, tokenizer=None, device=device)


def load_widths_model(folder: Path, raw: dict, *, dtype=None) -> torch.nn.Module:
    """The model of prunekit folder `folder` whose config `raw` records per-layer widths, built and loaded."""
    from transformers import AutoConfig, AutoModelForCausalLM

    entries = raw[WIDTHS_KEY]
    try:
        widths = [Widths(int(e["heads"]), int(e["intermediate"])) for e in entries]
    except (TypeError, KeyError, ValueError):
        raise InputError(f"{folder}/config.json: {WIDTHS_KEY} must be a list of {{'heads', 'intermediate'}}") from None
    config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
    with torch.device("meta"):  # the dense model is built first: a config far larger than the weights is refused
        dense = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    stored = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    if 4 * dense > 32 * stored + 2**30:  # an intermediate_size of 1e8 allocated 25 GB, then a traceback
        raise InputError(f"{folder}/config.json describes a model of {dense:,} parameters, far more than its weights "
                         f"({stored / 2**20:.0f} MiB) can hold; fix the config or save the model again")
    model = AutoModelForCausalLM.from_config(config, dtype=dtype or torch.float32)
    _, blocks = find_blocks(model)
    if len(blocks) != len(widths):
        raise InputError(f"{folder}: {WIDTHS_KEY} has {len(widths)} layers, the config {len(blocks)}")
    kv = config.num_key_value_heads
    for block, w in zip(blocks, widths):
        if w.heads % kv or not kv <= w.heads <= config.num_attention_heads or not 1 <= w.intermediate <= config.intermediate_size:
            raise InputError(f"{folder}/config.json: layer widths {w.to_dict()} do not fit the model "
                             f"({config.num_attention_heads} query heads, {kv} KV heads, {config.intermediate_size} neurons)")
        if w.heads < config.num_attention_heads:  # (a fused qkv_proj keeps every head)
            shrink_attention(attention(block), _grouped(w.heads, kv, config.num_attention_heads), kv_heads=kv)
        shrink_mlp(mlp_of(block), torch.arange(w.intermediate))
    state = _state_dict(folder)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    wrong = [k for k, v in state.items() if k in shapes and tuple(v.shape) != shapes[k]]
    if wrong:  # load_state_dict raised a RuntimeError listing every mismatch
        k = wrong[0]
        raise InputError(f"{folder}: the weights do not match {WIDTHS_KEY} in config.json: {k} is "
                         f"{list(state[k].shape)}, the widths make it {list(shapes[k])} ({len(wrong)} tensors differ); "
                         "restore the config.json saved with these weights")
    result = model.load_state_dict(state, strict=False)
    tied = set()
    if getattr(config, "tie_word_embeddings", False):
        tied = {k for k in result.missing_keys if k.endswith("lm_head.weight")}
    missing = set(result.missing_keys) - tied
    if missing or result.unexpected_keys:
        raise InputError(f"{folder}: the weights do not match {WIDTHS_KEY}: missing {sorted(missing)[:3]}, "
                         f"unexpected {sorted(result.unexpected_keys)[:3]}")
    if tied:
        model.tie_weights()
    for module in model.modules():  # built at these widths, not pruned: the folder's tensors are the whole modules
        if kept_of(module) is not None:
            delattr(module, KEPT_ATTR)
    return model.eval()


def _grouped(heads: int, kv: int, dense_heads: int) -> torch.Tensor:
    """Query-head indices (of a dense layer with `dense_heads`) keeping ``heads / kv`` heads in every group."""
    per, dense_per = heads // kv, dense_heads // kv
    return (torch.arange(kv)[:, None] * dense_per + torch.arange(per)[None, :]).reshape(-1)
