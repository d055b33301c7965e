"""Týr-the-Pruner's local pruner: second-order removal of input-channel groups of one Linear, then a refit.

Paper: Li et al. 2025, "Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity Distribution Optimization"
(NeurIPS 2025), https://arxiv.org/abs/2503.09657, code https://github.com/AMD-AGI/Tyr-the-Pruner
(``src/local_pruner.py``, derived from OSSCAR / ZipLM).

A unit is a group of input columns of ``W [out, in]``: a query head is ``head_dim`` columns of o_proj, a
neuron one column of down_proj. With calibration inputs ``X [n, in]`` the pruner minimises
``||X W^T - X W'^T||_F^2`` over ``W'`` that is zero on the removed units:

- ``H = X^T X + λ I``, ``λ = damp * mean(diag(X^T X))`` (damp = 1%); columns never active (``diag = 0``) get
  ``H_jj = 1`` and their weights are removed first. ``G = H W^T`` is the dense output's target.
- Saliency of unit ``S`` (its columns): ``ΔE_S = Σ_rows W[:, S] ([H^-1]_SS)^-1 W[:, S]^T`` (the exact error
  increase of removing S when W is optimal for the kept columns, the OBS block formula).
- Each round removes the lowest-saliency units, applies the OBS update
  ``W -= W[:, S] ([H^-1]_SS)^-1 [H^-1]_S,:`` and downdates ``H^-1 -= [H^-1]_:,S ([H^-1]_SS)^-1 [H^-1]_S,:``
  (the Schur complement: the inverse of H restricted to the kept columns, zero elsewhere).
- After the last round the kept columns ``K`` are refit by least squares, ``W_K^T = H_KK^-1 G_K``
  (with ``damp = 0`` this is exactly ``lstsq(X_K, X W^T)``).

Departures from the released code, and why:

- **Progressive, as in the paper, not the release.** The release removes the MLP's units in 16 rounds and all
  heads in one round; here each round removes one query head per KV group (GQA: every group keeps the same
  count, see `units`) or ``neuron_step`` neurons (default 16, the paper's granularity).
- **One greedy path, several levels.** `prune_path` walks from the dense width down to the smallest level
  asked and snapshots the kept set at every level (then refits each), so the supernet's nine levels of a
  sublayer cost one pass instead of nine, and the levels are nested. The reference prunes each level from the
  dense weights; since each round's OBS update keeps W optimal for its kept set, the two differ only by the
  order rounds happen to remove units.
- **Units are ranked by the OBS saliency alone**, ``W_S^T (Hinv_SS)^-1 W_S / 2``: the exact rise of the
  reconstruction error when the unit goes and the rest are refit (a brute-force check agrees). The released
  score adds ``G_S · W_S`` with ``G = H W_dense`` fixed. That G is the dense layer's target, not the error's
  gradient (``H W - G``, which the OBS updates keep at zero on the kept set), so the term does not vanish: on
  random correlated inputs it was 85-95% of the released score, and the two scores removed a different first
  unit in 145 of 200 random layers (a QA check). This ranking is prunekit's, not the release's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["Level", "accumulate_hessian", "damped", "saliency", "prune_path", "refit"]


@dataclass
class Level:
    """One pruned copy of a sublayer: kept units (sorted) and the refitted kept columns ``[out, kept cols]``."""

    units: int
    keep: torch.Tensor  # [units] unit indices, sorted
    weight: torch.Tensor  # [out, units * unit_size]


def accumulate_hessian(h: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """``h + X^T X`` over the tokens of `x` ``[..., in]`` in fp32 (``h`` None starts at zero)."""
    flat = x.reshape(-1, x.shape[-1]).to(torch.float32)  # [n, in]
    if h is None:
        h = torch.zeros(flat.shape[1], flat.shape[1], device=flat.device)
    return h.addmm_(flat.T, flat)  # [in, in]


def damped(h: torch.Tensor, damp: float) -> torch.Tensor:
    """``H + damp * mean(diag H) I``, with dead columns (``diag = 0``) given ``H_jj = 1``."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1.0
    diag += damp * float(diag.mean())
    return h


def _cols(units: torch.Tensor, size: int) -> torch.Tensor:
    return (units[:, None] * size + torch.arange(size, device=units.device)[None, :]).reshape(-1)  # [units * size]


def saliency(w: torch.Tensor, hinv: torch.Tensor, units: torch.Tensor, size: int) -> torch.Tensor:
    """OBS block saliency of each unit in `units`: ``Σ_rows W_S ([H^-1]_SS)^-1 W_S^T``, ``[len(units)]``."""
    cols = _cols(units, size).view(len(units), size)  # [u, size]
    if size == 1:
        c = cols[:, 0]
        return (w[:, c] ** 2).sum(0) / torch.diagonal(hinv)[c]  # [u]
    blocks = hinv[cols[:, :, None], cols[:, None, :]]  # [u, size, size]
    ws = w[:, cols].permute(1, 0, 2)  # [u, out, size]
    sol = torch.linalg.solve(blocks, ws.transpose(1, 2))  # [u, size, out]
    return (ws.transpose(1, 2) * sol).sum((1, 2))  # [u]


def _remove(w: torch.Tensor, hinv: torch.Tensor, cols: torch.Tensor) -> None:
    """OBS update of `w` ``[out, in]`` for removing columns `cols`, and the downdate of `hinv`, in place."""
    rows = hinv[cols]  # [s, in]
    coef = torch.linalg.solve(rows[:, cols], rows)  # [s, in] = ([H^-1]_SS)^-1 [H^-1]_S,:
    # rank-s updates in place: `hinv -= rows.T @ coef` made, faulted in and freed an [in, in] temporary each round
    # (13.9 of 14 ms a round at in = 1536; uniform-structured on SmolLM2 spent 31% of its CPU time there)
    w.addmm_(w[:, cols], coef, alpha=-1)
    hinv.addmm_(rows.T, coef, alpha=-1)
    w.index_fill_(1, cols, 0.0)
    hinv.index_fill_(0, cols, 0.0)
    hinv.index_fill_(1, cols, 0.0)


def refit(h: torch.Tensor, g: torch.Tensor, keep_cols: torch.Tensor) -> torch.Tensor:
    """Least-squares weights of the kept columns: ``W_K = (H_KK^-1 G_K)^T``, ``[out, len(keep_cols)]``.

    `h` ``[in, in]`` is the (damped) Hessian, `g` ``[in, out]`` = ``H_dense W^T``.
    """
    h_kk = h[keep_cols][:, keep_cols].double()
    g_k = g[keep_cols].double()  # [k, out]
    try:
        chol = torch.linalg.cholesky(h_kk)
        sol = torch.cholesky_solve(g_k, chol)
    except torch.linalg.LinAlgError:
        sol = torch.linalg.lstsq(h_kk, g_k).solution
    return sol.T.to(torch.float32).contiguous()  # [out, k]


def prune_path(w: torch.Tensor, h: torch.Tensor, *, unit_size: int, levels: list[int], groups: int = 1,
               step: int = 1, damp: float = 0.01) -> dict[int, Level]:
    """Prune the input-column units of `w` ``[out, in]`` greedily and return a refitted copy at each level.

    `levels`: kept unit counts wanted. `groups`: units are split into this many equal consecutive groups
    (GQA: query heads per KV head) and each round removes one unit from every group, so every group keeps the
    same count (levels must then be multiples of `groups`). `step`: units removed per round when
    ``groups == 1``. `h` ``[in, in]`` is ``X^T X`` (undamped). Returns ``{units: Level}``.
    """
    out_f, in_f = w.shape
    n_units = in_f // unit_size
    if n_units * unit_size != in_f:
        raise ValueError(f"{in_f} input columns are not a multiple of the unit size {unit_size}")
    if n_units % groups:
        raise ValueError(f"{n_units} units do not split into {groups} equal groups")
    wanted = sorted({int(k) for k in levels}, reverse=True)
    for k in wanted:
        if not 1 <= k <= n_units or k % groups:
            raise ValueError(f"level {k} units: keep between 1 and {n_units}, a multiple of {groups}")
    hd = damped(h.to(torch.float32), damp)  # [in, in]
    w0 = w.detach().to(torch.float32)
    g = hd @ w0.T  # [in, out]
    dead = torch.diagonal(h) == 0
    try:
        hinv = torch.cholesky_inverse(torch.linalg.cholesky(hd.double())).to(torch.float32)  # [in, in]
    except torch.linalg.LinAlgError:
        hinv = torch.linalg.pinv(hd.double()).to(torch.float32)
    cur = w0.clone()
    alive = torch.ones(n_units, dtype=torch.bool, device=w.device)
    # units whose every column is dead carry no signal: they go first, at zero cost
    dead_units = dead.view(n_units, unit_size).all(1)
    out: dict[int, Level] = {}
    per_group = n_units // groups
    count = n_units
    for target in wanted:
        while count > target:
            idx = alive.nonzero().squeeze(1)  # [alive]
            sal = saliency(cur, hinv, idx, unit_size)  # [alive]
            sal = torch.where(dead_units[idx], torch.full_like(sal, -1.0), sal)
            if groups == 1:
                k = min(step, count - target)
                chosen = idx[torch.topk(sal, k, largest=False).indices]
            else:
                gid = idx // per_group
                chosen = torch.stack([idx[gid == j][torch.argmin(sal[gid == j])] for j in range(groups)])
            _remove(cur, hinv, _cols(chosen, unit_size))
            alive[chosen] = False
            count -= len(chosen)
        keep = alive.nonzero().squeeze(1)
        out[target] = Level(target, keep.clone(), refit(hd, g, _cols(keep, unit_size)))
    return out
