"""OWL: a ratio per decoder block from the share of outlier activations-times-weights it holds.

Paper: Yin, Wu, Zhang, Ouyang, Hu, Pechenizkiy, Wang, Liu, "Outlier Weighed Layerwise Sparsity (OWL): A
Missing Secret Sauce for Pruning LLMs to High Sparsity", ICML 2024, https://arxiv.org/abs/2310.05175;
reference code luuyin/OWL (`lib/prune_all.py::prune_wanda_outlier`, ``check_outlier_mean``); the same rule is
llm-compressor's ``sparsity_profile="owl"`` (``owl_m``, ``owl_lmbda``, `SparsityModifierBase
._infer_owl_layer_sparsity`).

Uniform pruning removes the same fraction from every block. OWL removes less where the block holds more
outliers. One pass of calibration data through the dense model gives each Linear's input column norms
``||X_j||``. Wanda's score ``A_ij = |W_ij| * ||X_j||`` is then pooled over every pruned Linear of block ``l``,
and its outlier ratio is

    D_l = 100 * #{A > M * mean(A)} / #A             (M = ``m``, 5 in the paper)

The ratios are rescaled to [0, 2λ] and centred on the target density:

    D'_l = (D_l - min D) / (max D - min D) * 2λ      density_l = D'_l - mean(D') + (1 - ratio)

and block ``l`` is pruned at ``1 - density_l``. The mean over blocks is the target ratio, so a model whose
blocks are all the same size reaches it overall (each Linear then rounds per row as usual).

The ratios then drive any per-layer method: the paper applies them to magnitude, Wanda and SparseGPT. The
outlier pass always uses the dense model's activations (the reference's first pass does not prune), whatever
the method; magnitude pruning therefore needs calibration text under OWL.

Departures from the reference: only the Linears that will be pruned are pooled (the reference pools every
Linear of the block; the two agree unless ``skip`` leaves some dense). A block ratio that falls outside [0, 1)
is refused, naming the block and asking for a smaller λ (the reference sets a ratio <= 0 to 0.01, which moves
the mean away from the target). Blocks whose outlier ratios are all equal (a single block, say) get the
uniform ratio, where the reference divides by zero. Unstructured only: an N:M pattern fixes every layer's
ratio (the reference's N:M branch ignores the OWL ratios).

>>> owl_ratios([1.0, 3.0, 2.0], ratio=0.7, lam=0.08)     # the outlier-richest block is pruned least
[0.78, 0.62, 0.7]
"""

from __future__ import annotations

import math
from collections import Counter

import torch
from torch import nn

from prunekit.errors import InputError
from prunekit.weights.engine import UNCHANGED, find_blocks, prune_blocks, target_linears

__all__ = ["M", "LAMBDA", "outlier_ratios", "owl_ratios", "check_owl"]

M = 5.0  # the paper's and llm-compressor's examples' threshold multiple (Hyper_m / owl_m)
LAMBDA = 0.08  # the paper's λ for LLaMA at 70% (Lamda / owl_lmbda)


def check_owl(m, lam) -> tuple[float, float]:
    """`m` > 0 and `lam` in [0, 0.5), both finite numbers, as floats."""
    for value, name, low in ((m, "owl_m", "> 0"), (lam, "owl_lambda", "in [0, 0.5)")):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise InputError(f"{name} must be a finite number {low}, got {value!r}")
    if m <= 0:
        raise InputError(f"owl_m must be > 0 (a score counts as an outlier above owl_m x the block's mean), got {m!r}")
    if not 0 <= lam < 0.5:  # the ratios span 2λ around the target: from 0.5 on, one falls outside [0, 1)
        raise InputError(f"owl_lambda must be in [0, 0.5) (block ratios span 2 x owl_lambda around the target), "
                         f"got {lam!r}")
    return float(m), float(lam)


def outlier_ratios(model: nn.Module, input_ids: torch.Tensor, *, m: float = M, skip=(), batch_size: int = 4,
                   progress: bool = True) -> list[float]:
    """``D_l``, in percent, for every decoder block of the dense `model` on calibration ids ``[samples, seqlen]``:
    the share of Wanda scores ``|W| * ||X||`` of its pruned Linears above `m` times their mean. The model is not
    changed."""
    prefix, blocks = find_blocks(model)
    block_of = {name: i for i, block in enumerate(blocks) for name in target_linears(block, f"{prefix}.{i}", skip)}
    expected = Counter(block_of.values())  # Linears per block
    scores: dict[int, list[torch.Tensor]] = {}
    ratios: list[float | None] = [None] * len(blocks)

    def measure(weight, norms_sq, name):
        i = block_of[name]
        scores.setdefault(i, []).append((weight.abs() * norms_sq.sqrt()[None, :]).flatten())  # [out * in]
        if len(scores[i]) == expected[i]:  # the block's last Linear: pool, count, free
            pooled = torch.cat(scores.pop(i))
            ratios[i] = 100.0 * int((pooled > m * pooled.mean()).sum()) / pooled.numel()
        return UNCHANGED

    prune_blocks(model, input_ids, measure, stat="norms", skip=skip, sequential="block", batch_size=batch_size,
                 progress=progress)
    # a block whose Linears `skip` left all dense has no score: it is not pruned either (ratio unused)
    return [0.0 if r is None else r for r in ratios]


def owl_ratios(outliers: list[float], *, ratio: float, lam: float = LAMBDA, pruned: list[bool] | None = None
               ) -> list[float]:
    """The ratio removed from each block, from its outlier ratio (`outlier_ratios`), the target `ratio` and λ.

    `pruned` (default: all) marks the blocks that have layers to prune; the others take no part (and get the
    target ratio, which nothing uses). Raises `InputError` when a block's ratio falls outside [0, 1)."""
    pruned = [True] * len(outliers) if pruned is None else list(pruned)
    used = [d for d, p in zip(outliers, pruned) if p]
    if not used:
        raise InputError("OWL found no block with a layer to prune; check the skip patterns")
    low, high = min(used), max(used)
    spread = [(d - low) / (high - low) * 2 * lam if high > low else 0.0 for d in used]
    mean = sum(spread) / len(spread)
    densities = iter(s - mean + (1 - ratio) for s in spread)
    out = [round(1 - next(densities), 12) if p else ratio for p in pruned]
    for i, r in enumerate(out):
        if not 0 <= r < 1:
            raise InputError(f"OWL would prune block {i} at a ratio of {r:.4f}, outside [0, 1), at ratio {ratio:g} "
                             f"with owl_lambda {lam:g}; lower owl_lambda (--owl-lambda) to at most "
                             f"{min(ratio, 1 - ratio):g} or so")
    return out
