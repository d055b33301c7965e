"""DSnoT: training-free prune-and-grow on top of a one-shot mask (magnitude, Wanda or SparseGPT).

Zhang, Zhao, Lin, Ding, Huang, Wang, Ji, "Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse
LLMs" (ICLR 2024), https://arxiv.org/abs/2310.08915; reference code zyxxmu/DSnoT (`lib/prune.py::prune_DSnoT`,
`lib/layerwrapper.py::WrappedGPT`).

Statistics of the layer's input over the calibration sequences (`prunekit.weights.stats.Moments`): Wanda's
``n_j = mean_seq sum_tokens x_j^2``, ``mu_j = mean_seq sum_tokens x_j`` and ``var_j`` (mean over sequences of
the variance of ``x_j`` within a sequence).

Algorithm, per Linear ``W [out, in]`` (fused mixture-of-experts weights: per expert, on the tokens routed to it,
`prunekit.weights.experts`):

1. The base method gives the initial pruned weights ``W'`` and mask (kept = nonzero in ``W'``).
2. Per output row ``r``, the expected output shift of the sparse row: ``err_r = sum_j W_rj mu_j - sum_{j kept}
   W'_rj mu_j`` (for magnitude/Wanda, where kept weights are unchanged, this is the reference's
   ``sum_{j pruned} W_rj mu_j``).
3. Regrow list: the pruned weights ordered by ``W_rj mu_j / var_j^pow_of_var_regrowing`` (ascending). Prune
   list (unstructured): the kept weights by Wanda score ``|W'_rj| sqrt(n_j)`` ascending, those with
   ``W'_rj mu_j < 0`` first in that order, those with ``>= 0`` last in reverse order, so both ends hold the
   lowest-score weight of each sign.
4. Up to `max_cycle_time` cycles, all rows at once: regrow the next weight from the end of the regrow list
   when ``err_r > 0`` (its contribution cancels the shift), else from the start; prune the next weight from the
   start of the prune list when ``err_r > 0`` (a negative contribution also cancels it), else from the end.
   N:M: the weight pruned is the kept weight of lowest base score in the regrown weight's own M-group (weights
   regrown or pruned earlier are never chosen again), so every group keeps N. The base score is the
   reference's ``initial_metric``: ``|W_rj|`` for magnitude, the Wanda score for Wanda, SparseGPT's saliency
   ``W_rj^2 / U_jj^2`` of the dense weights for SparseGPT (``U`` the upper Cholesky factor of the damped
   inverse Hessian). A row takes the swap and stays active while ``|err_r| > update_threshold`` (N:M also
   requires the sign of ``err_r`` after the swap to be unchanged, as the reference does; unstructured ignores
   it, the reference's default ``without_same_sign``).
   ``err_r += W'_rp mu_p - W_rg mu_g``. Every swap keeps the row's count of nonzeros, so the ratio and N:M
   pattern of the base mask are exact.

Defaults as in the reference (``max_cycle_time=50, update_threshold=0.1, pow_of_var_regrowing=1``) except
which layers are refined: the reference skips the MLP layers (``--skip_layer mlp``: they keep the base mask);
here every layer is refined by default (``skip_mlp=False``), with a SparseGPT base's OBS update recomputed for
the final mask (``obs_update=True``, below). ``skip_mlp=True, obs_update=False`` is the reference's setting.
Measured on SmolLM2-135M (bench/results/seed_weights.md, wiki perplexity; base alone -> reference setting ->
every layer refined): at 60% magnitude 3341 -> 3672 -> 1052, Wanda 97.09 -> 96.73 -> 96.03, SparseGPT 52.98 ->
51.52 -> 52.57; at 2:4 1142 -> 778 -> 336, 126.99 -> 121.14 -> 118.84, 50.88 -> 49.97 -> 50.24; at 50% 345.2 ->
363.8 -> 84.7, 34.85 -> 34.93 -> 34.22, 27.72 -> 27.80 -> 27.50. Refining every layer lowered the base's wiki
perplexity in all nine cases (the reference setting in five) and beat the reference setting in 15 of the 18
wiki and Python-docs figures (not SparseGPT 60% on wiki, 52.57 against 51.52, nor SparseGPT 2:4 on wiki, 50.24
against 49.97, nor SparseGPT 50% on docs, 25.24 against 25.19), at 1.0-5.4x its time (rows timed under
different loads).
``update_threshold`` is in the units of ``mu``, a sum over the tokens of one calibration sequence, so it is not
scale-free: the reference's 0.1 is meant for its 2048-token sequences. Here it is read in those units
(``threshold_seqlen=2048``) and rescaled to the calibration's own length: with 512-token windows the rows stop
at ``|err_r| <= 0.025``, the reference's stopping point for the same per-token shift (a bare 0.1 would stop
every row 4x earlier). Measured on SmolLM2-135M, Wanda 60%, 128 x 512 wiki calibration, wiki / Python-docs
perplexity on 32 x 512 held-out tokens: Wanda 97.09 / 52.19, DSnoT with a bare 0.1 98.42 / 60.17, rescaled
(0.025) 96.73 / 58.56. ``threshold_seqlen=None`` takes `update_threshold` as it is.

Departures from the reference, on purpose:
- SparseGPT base: the reference allocates a Hessian for ``--initial_method sparsegpt`` but never accumulates
  it, so every column looks dead, the initial scores are all zero and the weights are zeroed. Here the
  Hessian is accumulated and the base is a real SparseGPT result (`prunekit.weights.methods.sparsegpt`,
  with its OBS update of the kept weights); DSnoT then works on those updated weights, a regrown weight
  returns to its dense value, and the unstructured prune list ranks kept weights by Wanda score on their
  updated values.
  With ``obs_update=True`` (the default) SparseGPT's OBS update is recomputed once the mask is final, from the
  dense weights and for that mask (`sparsegpt.prune_weight` with ``mask=``): the base's updated values
  compensate for the base's mask, not for the swapped one, and a weight regrown at its dense value is
  compensated twice. Rows are independent given the mask, so with the guard each row keeps the recomputed
  values only where they lower its exact error. Measured at 60% (wiki / Python-docs perplexity; SparseGPT
  alone 52.98 / 79.82): with every layer refined it lowers both, 53.07 / 74.69 -> 52.57 / 70.85; with the MLP
  layers skipped it trades wiki for docs, 51.52 / 71.57 -> 53.64 / 67.75.
- Guard (``guard=True``): the swaps chase the *expected* output shift only, and can raise the true
  reconstruction error ``||(W - W_new) X||^2 = d^T H d`` (``d`` a row's difference from the dense row,
  ``H = 2 X X^T / n_seq``). Each row's exact error is tracked along its swaps (two rank-one updates of
  ``H d`` per swap) and the row keeps the prefix of its swaps with the lowest error, zero swaps included:
  DSnoT can then never increase a layer's reconstruction error on the calibration data. ``guard=False`` is
  the reference's behaviour and needs no Hessian for magnitude/Wanda bases. Measured on SmolLM2-135M, Wanda
  60%, dense-model inputs of three attention Linears (16 x 512 wiki calibration tokens; error on the
  calibration tokens / 4096 held-out wiki tokens / 4096 Python-docs tokens): the reference's swaps *raised*
  every one (block 5 q_proj 0.147 -> 0.158 / 0.147 -> 0.158 / 0.150 -> 0.163, o_proj 0.291 -> 0.295 /
  0.292 -> 0.295 / 0.335 -> 0.351), the guarded ones lowered them (q_proj 0.147 -> 0.144 / 0.147 -> 0.145 /
  0.150 -> 0.150, o_proj 0.291 -> 0.255 / 0.292 -> 0.258 / 0.335 -> 0.320; block 12 o_proj alike).
- The reference's lists also contain the kept (regrow) or pruned (prune) weights in the middle with score
  0 and can "regrow" a weight that is already kept after a long run, changing the sparsity; here a row stops
  when its list of candidates of the needed sign runs out.

>>> import torch
>>> from prunekit.weights.stats import InputMoments
>>> m = InputMoments(torch.ones(8), torch.tensor([1., 1, 1, 1, -1, -1, -1, -1]), torch.ones(8))
>>> out = prune_weight(torch.ones(2, 8), {"moments": m}, ratio=0.5, pattern=None, guard=False)
>>> int((out.weight == 0).sum())
8
"""

from __future__ import annotations

import torch

from prunekit.errors import InputError
from prunekit.select import NM
from prunekit.weights.engine import Refined
from prunekit.weights.methods import magnitude, sparsegpt, wanda
from prunekit.weights.stats import InputMoments

BASES = ("magnitude", "wanda", "sparsegpt")


def stats_for(base: str = "wanda", guard: bool = True, skip_mlp: bool = False, **_options):
    """The calibration statistic DSnoT reads, per layer name, for these options.

    A refined layer needs the moments (and the Hessian for the guard); a skipped one only its base's statistic.
    """
    if base not in BASES:
        raise InputError(f"dsnot base must be one of {', '.join(BASES)}, got {base!r}")

    def for_layer(name: str) -> str | None:
        refined = not (skip_mlp and _is_mlp(name))
        parts = ["hessian"] if base == "sparsegpt" or (refined and guard) else []
        parts += ["moments"] if refined else (["norms"] if base == "wanda" else [])
        return "+".join(parts) or None

    return for_layer


def _as_dict(stats) -> dict:
    if stats is None:
        return {}
    if isinstance(stats, dict):
        return stats
    if isinstance(stats, InputMoments):
        return {"moments": stats}
    return {"hessian" if stats.dim() == 2 else "norms": stats}


# the modules that hold a block's feed-forward layers: ``mlp`` (Llama, Qwen, GPT-2, Mixtral and most MoE models
# in transformers 5), GraniteMoE's ``block_sparse_moe``, ``feed_forward`` (Llama 4), and any expert
_FFN_PARTS = frozenset({"mlp", "block_sparse_moe", "feed_forward", "ffn", "moe", "experts", "shared_expert",
                        "shared_experts"})


def _is_mlp(name: str | None) -> bool:
    """Whether layer `name` is a feed-forward (MLP or expert) layer: what ``skip_mlp`` leaves at the base mask, as
    the reference's ``--skip_layer mlp`` does for Llama's ``mlp`` modules."""
    parts = (name or "").split(".")
    return not _FFN_PARTS.isdisjoint(parts[:-1])


def _base(weight, stats, base, ratio, pattern, percdamp):
    if base == "magnitude":
        return magnitude.prune_weight(weight, None, ratio=ratio, pattern=pattern)
    if base == "wanda":
        norms = stats["moments"].norms if "moments" in stats else stats["norms"]
        return wanda.prune_weight(weight, norms, ratio=ratio, pattern=pattern)
    return sparsegpt.prune_weight(weight, stats["hessian"], ratio=ratio, pattern=pattern, percdamp=percdamp)


def _base_score(w0, w, stats, base, wanda_score, percdamp) -> torch.Tensor:
    """The base method's importance of each weight, ``[out, in]`` (the reference's ``initial_metric``)."""
    if base == "magnitude":
        return w.abs()
    if base == "wanda":
        return wanda_score
    u = sparsegpt.inverse_cholesky(stats["hessian"], percdamp)  # [in, in], upper
    return w0.pow(2) / torch.diag(u).pow(2)[None, :]


def _ends(rows: int, cols: int, device) -> torch.Tensor:
    """``[rows, 2]`` pointers to each row's first and last column."""
    return torch.stack([torch.zeros(rows, dtype=torch.long, device=device),
                        torch.full((rows,), cols - 1, dtype=torch.long, device=device)], 1)


def _two_ended(key: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per row: indices ordered [low entries by key asc] [others] [high entries by key asc], and the counts."""
    group = torch.where(low, 0, torch.where(high, 2, 1))
    order = torch.sort(key, dim=1, stable=True).indices
    order = torch.gather(order, 1, torch.sort(torch.gather(group, 1, order), dim=1, stable=True).indices)
    return order, low.sum(1), high.sum(1)


def prune_weight(
    weight: torch.Tensor,
    stats: dict,
    *,
    ratio: float,
    pattern: NM | None,
    name: str | None = None,
    base: str = "wanda",
    max_cycle_time: int = 50,
    update_threshold: float = 0.1,
    threshold_seqlen: int | None = 2048,
    pow_of_var_regrowing: float = 1.0,
    skip_mlp: bool = False,
    guard: bool = True,
    obs_update: bool = True,
    percdamp: float = sparsegpt.PERCDAMP,
) -> Refined:
    """The base method's pruned `weight` (``[out, in]`` fp32) refined by DSnoT's prune-and-grow swaps.

    `stats`: what `stats_for` asked for this layer: ``{"moments": InputMoments, "hessian": H}`` for a refined
    layer (the Hessian only with `guard` or a SparseGPT base), the base's own statistic for a skipped one.
    """
    stats_for(base, guard)
    stats = _as_dict(stats)
    if not isinstance(max_cycle_time, int) or isinstance(max_cycle_time, bool) or max_cycle_time < 0:
        raise InputError(f"max_cycle_time must be a non-negative integer, got {max_cycle_time!r}")
    if not update_threshold >= 0:
        raise InputError(f"update_threshold must be >= 0, got {update_threshold!r}")
    if threshold_seqlen is not None and (not isinstance(threshold_seqlen, int) or isinstance(threshold_seqlen, bool)
                                         or threshold_seqlen < 1):
        raise InputError(f"threshold_seqlen must be a positive integer (tokens) or None, got {threshold_seqlen!r}")
    w0 = weight.float()
    w = _base(w0, stats, base, ratio, pattern, percdamp).float()  # [out, in]
    if (skip_mlp and _is_mlp(name)) or max_cycle_time == 0:
        return Refined(w, {"swaps": 0, "cycles": 0, "skipped": bool(skip_mlp and _is_mlp(name))})
    mom = stats["moments"]
    mu, var = mom.sums[None, :], mom.var[None, :]  # [1, in]
    threshold = update_threshold
    if threshold_seqlen is not None and mom.tokens:
        threshold = update_threshold * mom.tokens / threshold_seqlen  # same per-token shift as the reference's
    kept = w != 0
    pruned = ~kept & (w0 != 0)  # a dense zero is nothing to regrow
    contrib = torch.where(kept, w, w0) * mu  # [out, in]: W'_j mu_j for kept, W_j mu_j for pruned
    err = (w0 * mu).sum(1) - (w * mu).sum(1)  # [out]
    sign0 = torch.sign(err)
    grow_key = contrib / var.clamp_min(1e-12).pow(pow_of_var_regrowing) if pow_of_var_regrowing else contrib.clone()
    grow, n_grow_neg, n_grow_pos = _two_ended(grow_key, pruned & (grow_key < 0), pruned & (grow_key > 0))
    score = w.abs() * mom.norms.sqrt()[None, :]  # Wanda score on the current weights
    rows, cols = w.shape
    dev = w.device
    ar = torch.arange(rows, device=dev)
    if pattern is None:
        key = torch.where(contrib < 0, score, -score)  # negatives by score asc; non-negatives so the end is lowest
        prune, n_prune_neg, n_prune_pos = _two_ended(key, kept & (contrib < 0), kept & (contrib >= 0))
        p_ptr = _ends(rows, cols, dev)
    else:  # initially pruned (and later regrown) weights are never pruned
        blocked = torch.where(kept, _base_score(w0, w, stats, base, score, percdamp), torch.inf)
    g_ptr = _ends(rows, cols, dev)
    h = stats.get("hessian") if guard else None
    if h is not None:
        delta = w0 - w  # [out, in]
        hd = delta @ h  # [out, in]
        e_now = (delta * hd).sum(1)
        e_best, best_t = e_now.clone(), torch.zeros(rows, dtype=torch.long, device=dev)
        e_start = e_now.clone()
    history = []
    active = torch.ones(rows, dtype=torch.bool, device=dev)
    cycles = 0
    while cycles < max_cycle_time and bool(active.any()):
        cycles += 1
        side = (err > 0).long()  # 1: regrow a positive contribution from the end
        gi = g_ptr[ar, side]
        g = grow[ar, gi]
        g_ok = torch.where(side == 1, gi >= cols - n_grow_pos, gi < n_grow_neg)
        g_ptr[ar, side] = gi + torch.where(side == 1, -1, 1)
        if pattern is None:
            pside = (err < 0).long()  # 0: prune a negative contribution from the start
            pi = p_ptr[ar, pside]
            p = prune[ar, pi]
            p_ok = torch.where(pside == 1, pi >= cols - n_prune_pos, pi < n_prune_neg)
            p_ptr[ar, pside] = pi + torch.where(pside == 1, -1, 1)
        else:
            start = g - g % pattern.m
            group = start[:, None] + torch.arange(pattern.m, device=dev)[None, :]  # [out, m]
            vals, arg = torch.gather(blocked, 1, group).min(1)
            p = start + arg
            p_ok = torch.isfinite(vals)
        after = err + contrib[ar, p] - contrib[ar, g]
        active &= g_ok & p_ok & (err.abs() > threshold)
        if pattern is not None:
            active &= torch.sign(after) == sign0
        rs = ar[active]
        if rs.numel() == 0:
            break
        gs, ps = g[active], p[active]
        kept[rs, gs] = True
        kept[rs, ps] = False
        err = torch.where(active, after, err)
        if pattern is not None:
            blocked[rs, ps] = torch.inf
        if h is not None:
            # d_g: W_g - 0 -> 0 (regrown to its dense value); d_p: W_p - W'_p -> W_p (pruned)
            dg, dp = -delta[rs, gs], w[rs, ps]
            e_now[rs] += (2 * dg * hd[rs, gs] + dg * dg * h[gs, gs] + 2 * dp * hd[rs, ps] + dp * dp * h[ps, ps]
                          + 2 * dg * dp * h[gs, ps])
            delta[rs, gs] = 0
            delta[rs, ps] += dp
            hd[rs] += dg[:, None] * h[gs] + dp[:, None] * h[ps]
            better = e_now < e_best
            e_best = torch.where(better, e_now, e_best)
            best_t = torch.where(better, cycles, best_t)
        history.append((active.clone(), g, p))
    if h is not None:  # replay each row's swaps up to its best prefix
        kept = w != 0
        for t, (took, g, p) in enumerate(history, 1):
            take = took & (t <= best_t)
            rs = ar[take]
            kept[rs, g[take]] = True
            kept[rs, p[take]] = False
    out = torch.where(kept, torch.where(w != 0, w, w0), torch.zeros_like(w))
    kept_cycles = best_t if h is not None else torch.full((rows,), cycles, device=dev)  # swaps each row keeps
    swaps = sum(int((took & (t <= kept_cycles)).sum()) for t, (took, _, _) in enumerate(history, 1))
    info = {"swaps": swaps, "cycles": cycles, "skipped": False}
    e_final = e_best if h is not None else None  # each row's exact error (the guard tracked it)
    if base == "sparsegpt" and obs_update and swaps:
        # SparseGPT's update for the final mask, from the dense row; rows are independent given the mask,
        # so with the guard each row keeps whichever of this and its value above has the lower error.
        solved = sparsegpt.prune_weight(w0, stats["hessian"], ratio=ratio, pattern=None, percdamp=percdamp, mask=kept)
        if h is not None:
            d = w0 - solved
            e_solved = ((d @ h) * d).sum(1)
            better = e_solved < e_best
            out = torch.where(better[:, None], solved, out)
            e_final = torch.where(better, e_solved, e_best)
            info["rows_resolved"] = int(better.sum())
        else:
            out = solved
            info["rows_resolved"] = rows
    if h is not None:
        info.update(error_base=float(e_start.sum()), error_refined=float(e_final.sum()))
    return Refined(out, info)
