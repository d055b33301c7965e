"""Simple structured baselines at uniform widths: magnitude and Wanda-style unit scores, no weight update.

- ``magnitude-structured`` (data-free; the norm criterion of Li et al. 2017, "Pruning Filters for Efficient
  ConvNets", https://arxiv.org/abs/1608.08710, and Torch-Pruning's ``GroupMagnitudeImportance(p=2)`` over a
  coupled group): a query head scores ``||W_q[rows of h]||^2 + ||W_o[:, cols of h]||^2``; a neuron
  ``||W_gate[j]||^2 + ||W_up[j]||^2 + ||W_down[:, j]||^2``.
- ``wanda-structured`` (Wanda's ``|W| * ||x||`` summed over a unit's input columns of o_proj / down_proj, as
  Wanda-sp in An et al. 2024, "Fluctuation-based Adaptive Structured Pruning for LLMs" (FLAP),
  https://arxiv.org/abs/2312.11983): ``score_u = Σ_{c in u} Σ_rows |W[r, c]| ||X_c||_2``, with X the
  calibration input of that Linear, blocks pruned in order and each calibrated on the pruned blocks before it.

Both keep the same widths in every layer (`tyr.uniform_widths`), the top-scoring query heads in each KV group
(the same count per group, see `units`) and the top-scoring neurons. Neither updates the kept weights: they
are what a structured pruner does without second-order information.
"""

from __future__ import annotations

import torch
from torch import nn

from prunekit.errors import InputError
from prunekit.structured.tyr import Outcome, _calibration_batches, advance, feed_until, uniform_widths
from prunekit.structured.units import (Dims, attention, check_widths, gate_up_weights, mlp_of, model_dims,
                                       shrink_attention, shrink_mlp)
from prunekit.weights.engine import find_blocks

__all__ = ["prune_magnitude", "prune_wanda", "keep_heads", "keep_top"]


def keep_heads(scores: torch.Tensor, kv_heads: int, keep: int) -> torch.Tensor:
    """The `keep` query heads (a multiple of `kv_heads`) with the highest scores, the same count per KV group."""
    per = scores.numel() // kv_heads
    k = keep // kv_heads
    top = torch.topk(scores.view(kv_heads, per), k, dim=1).indices  # [kv, k]
    return (top + torch.arange(kv_heads, device=top.device)[:, None] * per).reshape(-1).sort().values


def keep_top(scores: torch.Tensor, keep: int) -> torch.Tensor:
    return torch.topk(scores, keep).indices.sort().values


def _per_head(v: torch.Tensor, head_dim: int) -> torch.Tensor:
    return v.view(-1, head_dim).sum(1)  # [heads]


def _apply(block, dims: Dims, w, head_scores, neuron_scores) -> None:
    if w.heads < dims.heads:
        shrink_attention(attention(block), keep_heads(head_scores, dims.kv_heads, w.heads), kv_heads=dims.kv_heads)
    if w.intermediate < dims.intermediate:
        shrink_mlp(mlp_of(block), keep_top(neuron_scores, w.intermediate))


def _plan(model, name: str, options: dict, *, ratio: float, structure: str):
    """Refuse unknown options; the model's dims, the uniform widths for `ratio`, and its blocks."""
    if options:
        raise InputError(f"{name} got unknown option(s) {', '.join(sorted(options))}")
    dims = model_dims(model)
    widths = uniform_widths(dims, ratio=ratio, structure=structure)
    check_widths(dims, widths)
    return dims, widths, find_blocks(model)[1]


def prune_magnitude(model: nn.Module, ids: torch.Tensor | None = None, *, ratio: float, structure: str = "both",
                    seed: int = 0, progress: bool = True, **options) -> Outcome:
    """Uniform widths, units kept by the L2 norm of their weights (no calibration data; `ids` is ignored)."""
    dims, widths, blocks = _plan(model, "magnitude-structured", options, ratio=ratio, structure=structure)
    with torch.no_grad():
        for block, w in zip(blocks, widths):
            a, m = attention(block), mlp_of(block)
            heads = None
            if w.heads < dims.heads:  # (a fused qkv_proj, which keeps its heads, has no q_proj)
                heads = _per_head((a.q_proj.weight.float() ** 2).sum(1), dims.head_dim) + \
                    _per_head((a.o_proj.weight.float() ** 2).sum(0), dims.head_dim)  # [heads]
            gate, up = gate_up_weights(m)
            neurons = (gate.float() ** 2).sum(1) + (up.float() ** 2).sum(1) + \
                (m.down_proj.weight.float() ** 2).sum(0)  # [intermediate]
            _apply(block, dims, w, heads, neurons)
    return Outcome(widths, {"dims": vars(dims)})


def _input_norms(block, batches, module) -> torch.Tensor:
    acc = {"s": None}

    def consume(x):
        sq = (x.reshape(-1, x.shape[-1]).float() ** 2).sum(0)  # [in]
        acc["s"] = sq if acc["s"] is None else acc["s"] + sq

    feed_until(block, batches, module, consume)
    return acc["s"].sqrt()  # [in]


def prune_wanda(model: nn.Module, ids: torch.Tensor, *, ratio: float, structure: str = "both", seed: int = 0,
                progress: bool = True, batch_size: int = 8, **options) -> Outcome:
    """Uniform widths, units kept by Wanda's ``|W| ||x||`` summed over their o_proj / down_proj columns."""
    from tqdm.auto import tqdm

    dims, widths, blocks = _plan(model, "wanda-structured", options, ratio=ratio, structure=structure)
    batches = _calibration_batches(model, ids, batch_size)
    with torch.no_grad():
        for i, (block, w) in enumerate(tqdm(list(zip(blocks, widths)), desc="wanda-structured", unit="block",
                                            disable=not progress)):
            a, m = attention(block), mlp_of(block)
            heads = neurons = None
            if w.heads < dims.heads:
                norms = _input_norms(block, batches, a.o_proj)  # [heads * head_dim]
                heads = _per_head((a.o_proj.weight.float().abs() * norms[None]).sum(0), dims.head_dim)
                shrink_attention(a, keep_heads(heads, dims.kv_heads, w.heads), kv_heads=dims.kv_heads)
            if w.intermediate < dims.intermediate:
                norms = _input_norms(block, batches, m.down_proj)  # [intermediate]
                neurons = (m.down_proj.weight.float().abs() * norms[None]).sum(0)
                shrink_mlp(m, keep_top(neurons, w.intermediate))
            if i < len(blocks) - 1:
                advance(block, batches)
    return Outcome(widths, {"dims": vars(dims)})
