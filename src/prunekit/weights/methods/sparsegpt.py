"""SparseGPT: one-shot pruning with an Optimal Brain Surgeon update.

Frantar, Alistarh, "SparseGPT: Massive Language Models Can Be Accurately Pruned in One-Shot" (ICML 2023),
https://arxiv.org/abs/2301.00774; reference code IST-DASLab/sparsegpt (`sparsegpt.py::SparseGPT.fasterprune`).

Algorithm, over ``H = 2 X X^T / n_seq`` (fp32, from `prunekit.weights.stats.Hessian`):

1. Columns whose input is always zero (``H_jj == 0``) are zeroed and get ``H_jj = 1``.
2. Damp: ``H += 0.01 * mean(diag H) * I``; take the upper Cholesky factor of ``H^-1``
   (Cholesky, ``cholesky_inverse``, Cholesky again).
3. Walk the input columns in blocks of 128. Unstructured: in each block choose the weights to remove by the
   OBS saliency ``w^2 / [H^-1]_jj^2`` over the whole rows x 128 block. N:M: at every m-th column choose, per
   row, the ``m - n`` lowest saliencies of the next `m` columns, computed on the *updated* weights.
4. Column by column: zero the removed weights and spread their error over the remaining columns of the block
   (``W[:, j:] -= err * Hinv[j, j:]``); after the block, apply the block's errors to all later columns at
   once (lazy batch update). Same arithmetic as the reference, laid out so each column costs two tensor ops.

Departures from the reference:
- The reference selects with ``<= sorted[int(numel * ratio)]``, one weight more per block than asked (plus
  ties); here exactly ``int(rows * block * ratio)`` weights per block go.
- When the Cholesky factorisation fails (a singular H, too few samples) the reference crashes and
  llm-compressor falls back to the identity; here the damping is multiplied by 10 and the factorisation
  retried (up to 6 times) with a warning, so the OBS update stays meaningful.

>>> import torch
>>> x = torch.randn(64, 8); h = 2 * x.T @ x
>>> w = prune_weight(torch.randn(4, 8), h, ratio=0.5, pattern=None)
>>> int((w == 0).sum())
16
"""

from __future__ import annotations

import warnings

import torch

from prunekit.errors import InputError
from prunekit.select import NM, keep_global, keep_n_m

BLOCKSIZE = 128
PERCDAMP = 0.01


def inverse_cholesky(h: torch.Tensor, percdamp: float = PERCDAMP, *, tries: int = 6) -> torch.Tensor:
    """Upper Cholesky factor of ``(H + damp * I)^-1`` with ``damp = percdamp * mean(diag H)``.

    Raises the damping tenfold and retries when H is not positive definite (from `PERCDAMP` when `percdamp` is
    0, which tenfold would leave at 0).
    """
    mean_diag = torch.diag(h).mean()
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    for attempt in range(tries):
        factor = percdamp if attempt == 0 else (percdamp or PERCDAMP) * 10.0**attempt
        damp = factor * mean_diag
        lower, info = torch.linalg.cholesky_ex(h + damp * eye)
        if info == 0:
            hinv = torch.cholesky_inverse(lower)
            upper, info = torch.linalg.cholesky_ex(hinv, upper=True)
            if info == 0:
                if attempt:
                    warnings.warn(
                        f"SparseGPT: Hessian not positive definite; damping raised to {factor:g} "
                        "x mean(diag H). More calibration samples make this unnecessary.",
                        stacklevel=3,
                    )
                return upper
    raise InputError(
        "SparseGPT: the Hessian stays singular even at "
        f"{(percdamp or PERCDAMP) * 10.0 ** (tries - 1):g} x mean(diag H) damping; check the calibration inputs "
        "(more samples, or text the model's inputs vary on)"
    )


def prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    ratio: float,
    pattern: NM | None,
    blocksize: int = BLOCKSIZE,
    percdamp: float = PERCDAMP,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """The pruned and OBS-updated copy of `weight` (``[out, in]``) given ``H`` (``[in, in]``, fp32).

    `mask` (bool ``[out, in]``, True = keep) fixes which weights stay instead of choosing them: the sweep then
    only computes the OBS update of the kept weights for that mask (`ratio` and `pattern` are not used). With
    the mask SparseGPT itself chose, the result is SparseGPT's own.
    """
    w = weight.detach().clone().float()  # [out, in]
    if mask is not None and mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} does not match the weight's {tuple(w.shape)}")
    h = hessian.clone()
    rows, cols = w.shape
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    w[:, dead] = 0
    hinv = inverse_cholesky(h, percdamp)  # [in, in], upper
    if mask is not None:
        pattern = None
    if pattern is not None:
        # A group of m columns must not straddle two blocks.
        blocksize = max(pattern.m, blocksize - blocksize % pattern.m)

    for i1 in range(0, cols, blocksize):
        i2 = min(i1 + blocksize, cols)
        # The block is walked transposed ([b, out]) so each step touches contiguous rows, and each column
        # costs two ops: err_i = w_i * prune_i / d_i, then w[i:] -= Hinv[i, i:] (x) err_i. After its step a
        # column equals its pruned value q_i (w_i - err_i * d_i), so the kept/pruned result is w1 * keep.
        w1 = w[:, i1:i2].T.contiguous()  # [b, out]
        err1 = torch.empty_like(w1)  # [b, out]
        hinv1 = hinv[i1:i2, i1:i2]  # [b, b]
        d = torch.diag(hinv1)  # [b]
        if mask is not None:
            keep1 = mask[:, i1:i2].T.contiguous()  # [b, out]
        elif pattern is None:
            # one cut over the whole out x b block, ties ordered as the reference's row-major flatten
            keep1 = keep_global(w1.T.square() / d.square()[None, :], ratio).T  # [b, out]
        else:
            keep1 = torch.ones_like(w1, dtype=torch.bool)  # [b, out], chosen group by group below
        scale = (~keep1) / d[:, None]  # [b, out]: 1/d_i where pruned, 0 where kept
        for i in range(i2 - i1):
            if pattern is not None and i % pattern.m == 0:
                g = slice(i, i + pattern.m)  # choose N:M on the weights as updated so far
                keep1[g] = keep_n_m((w1[g].square() / d[g].square()[:, None]).T, pattern).T
                scale[g] = (~keep1[g]) / d[g][:, None]
            torch.mul(w1[i], scale[i], out=err1[i])
            w1[i:].addr_(hinv1[i, i:], err1[i], alpha=-1)
        w[:, i1:i2] = (w1 * keep1).T
        w[:, i2:] -= err1.T @ hinv[i1:i2, i2:]
    return w
