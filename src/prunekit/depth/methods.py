"""Depth-pruning baselines that score blocks once: ShortGPT, sensitivity, every-other, best random mask.

Each returns a keep-mask over the blocks of a `DepthTarget` (True = kept) with exactly `kept` Trues.

- **ShortGPT** (Men et al. 2024, "ShortGPT: Layers in Large Language Models are More Redundant Than You
  Expect", https://arxiv.org/abs/2403.03853): Block Influence ``BI_i = 1 - E_tokens[cos(x_i, x_{i+1})]``
  between a block's input and output hidden states on calibration data; the blocks with the lowest BI go.
  As in TinyFusion's ``prune_by_score.py`` (which reimplements it as a baseline), the last block is never
  removed. Departure: the mean is over every token of every calibration window (the paper averages over
  tokens too; TinyFusion averages per image then over images, the same thing for equal-length inputs).
- **Sensitivity** (the "Sensitivity Analysis" baseline of TinyFusion, Fang et al. 2025, Table 1): the
  calibration loss with block i alone removed, ``s_i = L(model without block i)``; the blocks whose removal
  raises the loss least go (one-shot, not iterative).
- **Every-other** (a fixed pattern): keep `kept` evenly spaced blocks, the first and the last included,
  ``floor(j (L - 1) / (kept - 1) + 1/2)`` for j = 0..kept-1. For 15 of 30 this is 0, 2, ..., 12, 15, 17, ..., 29:
  the first block of each pair in the first half and the last in the second half, which is TinyFusion's
  "Oracle (BK-SDM)" pattern for DiT-XL.
- **Random** (TinyFusion Table 3, "loss-stratified random"): `candidates` random masks (uniform over all
  masks keeping `kept` blocks; seeded), the one with the lowest calibration loss kept. The paper draws
  100k masks; a CPU budget allows a few (default 8), stated in every record.
"""

from __future__ import annotations

import math

import torch
from tqdm.auto import tqdm

from prunekit.depth.core import DepthTarget, batch_size_of, check_keep, check_kept, gates, hidden_of, keep_top
from prunekit.depth.tinyfusion import tinyfusion
from prunekit.errors import InputError, check_seed, int_at_least, module_modes, restore_modes

__all__ = ["shortgpt", "sensitivity", "every_other", "random_masks", "block_influence", "calibration_loss",
           "select_blocks"]


@torch.no_grad()
def calibration_loss(target: DepthTarget, keep: list[bool] | None = None) -> float:
    """Mean loss over the target's samples with the blocks where `keep` is False skipped (None: all kept).

    Each batch's loss (a mean over its samples) is weighted by its sample count, so a short last batch does not
    count as much as a full one and the result does not depend on the batch size."""
    keep = check_keep(keep, target.depth) if keep is not None else [True] * target.depth
    was = module_modes(target.model)
    target.model.eval()
    try:
        with gates(target.blocks) as g:
            for gate, k in zip(g, keep):
                gate.gate = None if k else 0.0
            sizes = [batch_size_of(b) for b in target.batches]
            total = sum(float(target.loss(target.model, b)) * n for b, n in zip(target.batches, sizes))
    finally:  # the caller's mode, also after an error or Ctrl-C
        restore_modes(was)
    return total / sum(sizes)


@torch.no_grad()
def block_influence(target: DepthTarget) -> torch.Tensor:
    """ShortGPT's ``BI_i = 1 - mean cos(x_in, x_out)`` over all tokens of the calibration batches, ``[depth]``."""
    sums = torch.zeros(len(target.blocks), dtype=torch.float64)
    counts = torch.zeros(len(target.blocks), dtype=torch.float64)

    def hook(i):
        def fn(_module, args, kwargs, out):
            x = (args[0] if args else kwargs["hidden_states"]).float()  # [b, ..., d]
            y = hidden_of(out).float()  # [b, ..., d]
            cos = torch.nn.functional.cosine_similarity(x.flatten(0, -2), y.flatten(0, -2), dim=-1)  # [tokens]
            sums[i] += float(cos.double().sum())  # the sums stay on the CPU, the model may be on a GPU
            counts[i] += cos.numel()
        return fn

    handles = [b.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(target.blocks)]
    was = module_modes(target.model)
    target.model.eval()
    try:
        for b in target.batches:  # the blocks only when the target says how: a causal LM's logits and loss are unused
            (target.blocks_only or target.loss)(target.model, b)
    finally:
        for h in handles:
            h.remove()
        restore_modes(was)
    return 1 - sums / counts  # [depth]


def shortgpt(target: DepthTarget, *, kept: int, influence: torch.Tensor | None = None) -> list[bool]:
    """Keep the `kept` blocks of highest Block Influence (the last block always kept); `influence` is
    `block_influence(target)` when already computed."""
    check_kept(kept, target.depth)
    return keep_top(block_influence(target) if influence is None else influence, kept, protect=(target.depth - 1,))


def removal_losses(target: DepthTarget, *, progress: bool = False) -> torch.Tensor:
    """The calibration loss with each block removed alone, ``[depth]``."""
    losses = torch.zeros(target.depth, dtype=torch.float64)  # [depth]
    for i in tqdm(range(target.depth), desc="sensitivity", unit="block", disable=not progress):
        losses[i] = calibration_loss(target, [j != i for j in range(target.depth)])
    return losses


def sensitivity(target: DepthTarget, *, kept: int, progress: bool = False,
                losses: torch.Tensor | None = None) -> list[bool]:
    """Keep the `kept` blocks whose removal alone raises the calibration loss most; `losses` is
    `removal_losses(target)` when already computed."""
    check_kept(kept, target.depth)
    return keep_top(removal_losses(target, progress=progress) if losses is None else losses, kept)


def every_other(depth: int, *, kept: int) -> list[bool]:
    """`kept` evenly spaced blocks of `depth`, the first and last included (1 block: the last)."""
    check_kept(kept, depth)
    if kept == 1:
        return [i == depth - 1 for i in range(depth)]
    chosen = {int(j * (depth - 1) / (kept - 1) + 0.5) for j in range(kept)}  # halves round up
    return [i in chosen for i in range(depth)]


def random_masks(target: DepthTarget, *, kept: int, candidates: int = 8, seed: int = 0,
                 progress: bool = False) -> tuple[list[bool], list[dict]]:
    """The calibration-loss-best of `candidates` distinct random keep-masks (all of them when fewer exist); also
    returns every candidate's loss."""
    check_kept(kept, target.depth)
    int_at_least(candidates, "candidates", 1)
    gen = torch.Generator().manual_seed(check_seed(seed))
    masks: list[list[int]] = []  # distinct: on 6 blocks, 8 draws held 5 masks, one scored three times
    while len(masks) < min(candidates, math.comb(target.depth, kept)):
        chosen = sorted(torch.randperm(target.depth, generator=gen)[:kept].tolist())
        if chosen not in masks:
            masks.append(chosen)
    tried = []
    for chosen in tqdm(masks, desc="random masks", unit="mask", disable=not progress):
        keep = [i in chosen for i in range(target.depth)]
        tried.append({"kept_layers": chosen, "loss": calibration_loss(target, keep)})
    if all(math.isnan(t["loss"]) for t in tried):
        raise InputError(f"the calibration loss is NaN for every one of the {len(tried)} random masks; the model's "
                         f"outputs overflow or its weights hold NaN: load it in float32 and check its weights")
    best = min(tried, key=lambda t: (math.isnan(t["loss"]), t["loss"]))  # a NaN loss ranks last, not first
    return [i in best["kept_layers"] for i in range(target.depth)], tried


_TINYFUSION_OPTIONS = {"tau", "scale", "lr_gates", "lr_lora", "ema", "lora_rank", "lora_alpha", "recoverability"}


def select_blocks(target: DepthTarget, method: str, *, kept: int, groups=None, steps: int = 200, candidates: int = 8,
                  seed: int = 0, progress: bool = False, **options) -> tuple[list[bool], dict]:
    """The keep-mask of built-in depth method `method` (shortgpt, sensitivity, every-other, random or tinyfusion)
    over `target`, and what the method reports. For an importance of your own, build the mask yourself and hand it
    to `prunekit.depth.drop_layers`."""
    if options and method != "tinyfusion":
        raise InputError(f"{method} takes no options ({', '.join(options)} given)")
    if groups is not None and method != "tinyfusion":
        raise InputError(f"groups apply to tinyfusion only, not {method}")
    if method == "shortgpt":  # the influence once: it is a pass over the calibration data (it ran twice)
        check_kept(kept, target.depth)
        influence = block_influence(target)
        return shortgpt(target, kept=kept, influence=influence), {"block_influence": influence.tolist()}
    if method == "sensitivity":
        check_kept(kept, target.depth)
        losses = removal_losses(target, progress=progress)
        return sensitivity(target, kept=kept, losses=losses), {"loss_without_block": losses.tolist()}
    if method == "every-other":
        return every_other(target.depth, kept=kept), {}
    if method == "random":
        keep, tried = random_masks(target, kept=kept, candidates=candidates, seed=seed, progress=progress)
        return keep, {"candidates": tried}
    if method == "tinyfusion":
        unknown = set(options) - _TINYFUSION_OPTIONS
        if unknown:
            raise InputError(f"unknown tinyfusion option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_TINYFUSION_OPTIONS))}")
        res = tinyfusion(target, kept=kept, groups=groups, steps=steps, seed=seed, progress=progress, **options)
        return res.keep, res.to_dict()
    raise InputError(f"unknown depth method {method!r}; choose shortgpt, sensitivity, every-other, random or tinyfusion")
