"""Q-Tuning: joint sample and token pruning of supervised fine-tuning data on the Error-Uncertainty plane.

Paper: Wang et al. 2025, "Winning the Pruning Gamble: A Unified Approach to Joint Sample and Token Pruning for
Efficient Supervised Fine-Tuning", https://arxiv.org/abs/2509.23873. Reference code: github.com/Q-tuning/Q-tuning
@ dd6eba55, ``LLaMA-Factory/src/llamafactory/train/sft/trainer.py`` (``plug == "wisely"``, ``token_method="wise"``).

The algorithm, for N samples under the current model:

1. Error-Uncertainty plane: ``PPL_n = exp(mean_{t in response} -log p(y_t | x, y_<t))`` and
   ``Ent_n = mean_{t in response} H(p(. | x, y_<t))``.
2. Quadrants by quantile thresholds, one parameter pair (alpha, beta) moved in lockstep on [0, 0.49] until
   ``|Q2| + |Q4| = round(N * sample_ratio)`` (the reference bisects):
   Q2 valuable misconception ``PPL > Q_{1-a}(PPL) and Ent <= Q_b(Ent)`` (keep, prune tokens);
   Q4 calibration ``PPL <= Q_a(PPL) and Ent > Q_{1-b}(Ent)`` (keep whole); the rest are dropped: Q1 harmful
   noise (high PPL, high Ent) and Q3 redundant knowledge (low PPL, low Ent).
3. Top-up when fewer than K samples qualify (as the reference): min-max normalise ``p = PPL``, ``e = Ent``;
   fill with the remaining samples of highest ``max(p - e, e - p)``; those with ``p - e >= e - p`` count as
   misconceptions (their tokens may be pruned), the others as calibration.
4. Token pruning inside misconception samples only: ``PPL_i = exp(nll_i)``,
   ``s_i = (1 - lambda) PPL_i + lambda (PPL_{i-1} + PPL_{i+1}) / 2`` (a neighbour outside the response counts 0),
   lambda = 0.5; the highest-scoring tokens leave the loss until the kept samples keep ``token_ratio`` of their
   response tokens (or every misconception token is gone).

Defaults are the reference's: ``sample_ratio=0.2``, ``token_ratio=0.75``, ``lam=0.5``.

Departures from the reference, and why:

- Entropy is averaged over the response tokens, not over every attention position (prompt included) as the
  reference's ``_compute_ppl_entropy`` does: the paper defines the uncertainty over the response and the prompt
  is shared, unsupervised text.
- The search is exact instead of 10 halvings with a 1% tolerance. The qualified set only changes where a
  quantile crosses a sample, at ``alpha = j / (N - 1)``, so alpha is searched (by bisection) over the midpoints
  between those steps, and the widest thresholds that qualify at most K samples are taken; when no step gives
  exactly K (several samples qualify at the same step) the reference's top-up fills the rest. Only when even the
  narrowest thresholds qualify more than K are the qualified samples of lowest ``max(p - e, e - p)`` dropped.
  The sample budget is met exactly, as prunekit's budgets always are; the reference keeps an overshoot.
  (Bisecting alpha itself down to 1e-16 let floating-point rounding of the two quantiles at a step pick which
  of the samples that qualify together was kept.)
- Token scores are the paper's, with the neighbours' mean, ``lambda (PPL_{i-1} + PPL_{i+1}) / 2`` (as the issue
  and the slime reimplementation state it). In the reference code's ``wisely`` plug, ``token_method="wise"``
  falls through to the raw per-token cross-entropy (no neighbour term); a neighbour score exists only in its
  ``budget`` plug, as the sum ``PPL_i + PPL_{i-1} + PPL_{i+1}``.
- Token budget: ``round((1 - token_ratio) * kept samples' response tokens)`` are dropped from misconception
  samples. The reference sets ``keep = round(all batch tokens * sample_ratio * token_ratio)`` with prompt tokens
  counted, and charges the dropped samples' tokens first; ours keeps the token ratio a property of the kept
  responses, so every method (and baseline) at a given token ratio trains on the same share of its samples.
- Static (``every="once"``) and per-epoch modes are ours; the reference is per micro-batch only
  (``every="batch"``). In per-batch mode prunekit forwards the loaded batch once without gradients to score it
  and trains on the kept rows only; the reference forwards the whole batch with gradients and masks the loss,
  which saves no compute.

>>> import numpy as np
>>> ppl = np.array([9., 8., 1., 2., 9., 1.5])
>>> ent = np.array([0.1, 5., 5., 0.2, 0.3, 4.])
>>> quadrants(ppl, ent, sample_ratio=0.5).keep.nonzero()[0].tolist()  # two misconceptions, one calibration
[0, 2, 4]
"""

from __future__ import annotations

from dataclasses import dataclass
from numbers import Real

import numpy as np

from prunekit.data.methods._checks import float_array
from prunekit.data.sft import Selection, _Pruner, check_ratio, drop_tokens, response_stats, samples_for
from prunekit.errors import InputError

__all__ = ["Quadrants", "quadrants", "token_scores", "qtuning_select", "QTuning", "NAMES"]

NAMES = {1: "harmful noise", 2: "misconception", 3: "redundant", 4: "calibration"}


@dataclass
class Quadrants:
    """Per sample: ``quadrant`` 1-4 at the final thresholds (Q2/Q4 as the selection saw them, Q1/Q3 split
    by the midpoints), ``keep`` (exactly K), ``misconception`` (kept and token-prunable), the thresholds, and
    ``placed_by`` [N], how the quadrant was given: ``"thresholds"`` (inside Q2's or Q4's thresholds),
    ``"top-up"`` (kept to fill the budget: Q2 or Q4 by the side of the plane it leans to, where the thresholds
    may say otherwise) or ``"midlines"`` (not kept: the side of the midlines between the thresholds)."""

    quadrant: np.ndarray  # [N] int8
    keep: np.ndarray  # [N] bool
    misconception: np.ndarray  # [N] bool, subset of keep
    alpha: float
    ppl_hi: float
    ppl_lo: float
    ent_lo: float
    ent_hi: float
    topped_up: int
    placed_by: np.ndarray  # [N] str


def _minmax(x: np.ndarray) -> np.ndarray:
    span = x.max() - x.min()
    return np.zeros_like(x) if span < 1e-12 else (x - x.min()) / span


def quadrants(ppl, entropy, *, sample_ratio: float = 0.2) -> Quadrants:
    """Quadrant assignment and exactly ``round(N * sample_ratio)`` kept samples (at least 1); see the module."""
    ppl = float_array(ppl, "ppl", ndims=(1,))
    ent = float_array(entropy, "entropy", ndims=(1,))
    if len(ppl) != len(ent):
        raise InputError(f"ppl has {len(ppl)} values but entropy has {len(ent)}; give one of each per sample")
    sample_ratio = check_ratio(sample_ratio, "sample_ratio")
    n = len(ppl)
    k = samples_for(n, sample_ratio)

    def at(alpha: float):
        hi, lo = np.quantile(ppl, 1 - alpha), np.quantile(ppl, alpha)
        elo, ehi = np.quantile(ent, alpha), np.quantile(ent, 1 - alpha)
        return (ppl > hi) & (ent <= elo), (ppl <= lo) & (ent > ehi), (hi, lo, elo, ehi)

    # the qualified set is constant between the quantiles' steps j / (n - 1): search the steps' midpoints, where
    # the count is monotone in alpha and no rounding of 1 - alpha against alpha decides a sample
    high = 0.49
    edges = [0.0] + [j / (n - 1) for j in range(1, n - 1) if j / (n - 1) < high] + [high]
    grid = [(a + b) / 2 for a, b in zip(edges, edges[1:])]
    lo_i, hi_i = -1, len(grid)  # the widest grid point with at most k qualified lies in (lo_i, hi_i)
    while hi_i - lo_i > 1:
        mid = (lo_i + hi_i) // 2
        q2, q4, _ = at(grid[mid])
        lo_i, hi_i = (mid, hi_i) if int(q2.sum() + q4.sum()) <= k else (lo_i, mid)
    alpha = grid[max(lo_i, 0)]  # lo_i == -1: even the narrowest qualifies more than k (trimmed below)
    q2, q4, th = at(alpha)
    p, e = _minmax(ppl), _minmax(ent)
    extremity = np.maximum(p - e, e - p)  # how far into Q2 (p >> e) or Q4 (e >> p) a sample sits
    keep = q2 | q4
    misconception = q2.copy()
    count = int(keep.sum())
    topped = 0
    if count > k:  # ties at a quantile: drop the least extreme qualified samples
        qualified = np.flatnonzero(keep)
        drop = qualified[np.argsort(extremity[qualified], kind="stable")[: count - k]]
        keep[drop] = misconception[drop] = False
    elif count < k:  # the reference's top-up
        rest = np.flatnonzero(~keep)
        extra = rest[np.argsort(-extremity[rest], kind="stable")[: k - count]]
        keep[extra] = True
        misconception[extra] = (p - e)[extra] >= (e - p)[extra]
        topped = len(extra)
    hi, lo, elo, ehi = (float(x) for x in th)
    pm, em = (hi + lo) / 2, (elo + ehi) / 2
    quadrant = np.where(ppl > pm, np.where(ent > em, 1, 2), np.where(ent > em, 4, 3)).astype(np.int8)
    quadrant[q2] = 2
    quadrant[q4] = 4
    quadrant[keep & misconception] = 2
    quadrant[keep & ~misconception] = 4
    placed = np.where(q2 | q4, "thresholds", np.where(keep, "top-up", "midlines"))
    return Quadrants(quadrant, keep, misconception & keep, float(alpha), hi, lo, elo, ehi, topped, placed)


def _check_lam(lam) -> float:
    """The neighbours' weight: a number in [0, 1] (numpy scalars too, not a bool)."""
    if isinstance(lam, (bool, np.bool_)) or not isinstance(lam, Real) or not 0 <= lam <= 1:
        raise InputError(f"lam (the neighbours' weight) must be a number in [0, 1], got {lam!r}")
    return float(lam)


def token_scores(nll, response, *, lam: float = 0.5) -> np.ndarray:
    """``s_i = (1 - lam) PPL_i + lam (PPL_{i-1} + PPL_{i+1}) / 2`` with ``PPL_i = exp(nll_i)`` over the response
    positions ``response`` [N, T] (0 elsewhere; a neighbour outside the response counts 0). Higher = pruned first."""
    nll = float_array(nll, "nll", ndims=(2,))
    response = np.asarray(response, dtype=bool)
    if response.shape != nll.shape:
        raise InputError(f"response mask has shape {response.shape} but nll has {nll.shape}")
    lam = _check_lam(lam)
    tok = np.where(response, np.exp(np.minimum(nll, 80.0)), 0.0)  # [N, T]; exp capped so it stays finite
    left = np.pad(tok[:, :-1], ((0, 0), (1, 0)))  # [N, T]: PPL_{i-1}
    right = np.pad(tok[:, 1:], ((0, 0), (0, 1)))  # [N, T]: PPL_{i+1}
    return np.where(response, (1 - lam) * tok + lam * (left + right) / 2, 0.0)


def qtuning_select(nll, entropy, response, *, sample_ratio: float = 0.2, token_ratio: float = 0.75,
                   lam: float = 0.5) -> Selection:
    """The whole method over token statistics ``nll``, ``entropy`` and the ``response`` mask, each [N, T]
    (`prunekit.data.sft.score_examples` makes them): kept samples and their kept loss tokens."""
    response = np.asarray(response, dtype=bool)
    nll = float_array(nll, "nll", ndims=(2,))
    entropy = float_array(entropy, "entropy", ndims=(2,))
    if not (nll.shape == entropy.shape == response.shape):
        raise InputError(f"nll {nll.shape}, entropy {entropy.shape} and response {response.shape} must have one shape")
    if not response.any(1).all():
        raise InputError(f"sample {int(np.flatnonzero(~response.any(1))[0])} has no response token to score")
    token_ratio = check_ratio(token_ratio, "token_ratio")
    ppl, ent = response_stats(nll, entropy, response)
    q = quadrants(ppl, ent, sample_ratio=sample_ratio)
    keep_tokens = response & q.keep[:, None]  # [N, T]
    n_drop = int(round((1.0 - token_ratio) * keep_tokens.sum()))
    scores = token_scores(nll, response, lam=lam)
    keep_tokens = drop_tokens(keep_tokens, response & q.misconception[:, None], n_drop, scores=scores)
    info = {"alpha": q.alpha, "ppl_hi": q.ppl_hi, "ppl_lo": q.ppl_lo, "ent_lo": q.ent_lo, "ent_hi": q.ent_hi,
            # the lines that place a sample not kept: Q1 / Q3 and the ones left out of Q2 / Q4
            "ppl_mid": (q.ppl_hi + q.ppl_lo) / 2, "ent_mid": (q.ent_lo + q.ent_hi) / 2,
            "topped_up": q.topped_up, "token_drop_wanted": n_drop,
            "token_drop_done": int((response & q.keep[:, None]).sum() - keep_tokens.sum())}
    return Selection(q.keep, keep_tokens, quadrant=q.quadrant, ppl=ppl, entropy=ent, info=info,
                     placed_by=q.placed_by)


class QTuning(_Pruner):
    """The Q-Tuning pruner for `prunekit.data.sft.sft`: ``every="batch"`` (the paper's dynamic mode, re-scored per
    loaded batch under the current model), ``"epoch"`` or ``"once"`` (static, scored under the starting model)."""

    name = "qtuning"
    needs_model = True

    def __init__(self, *, sample_ratio: float = 0.2, token_ratio: float = 0.75, lam: float = 0.5,
                 every: str = "batch", seed: int = 0):
        super().__init__(sample_ratio=sample_ratio, token_ratio=token_ratio, every=every, seed=seed)
        self.lam = _check_lam(lam)

    def select(self, *, nll, entropy, response, **_) -> Selection:
        return qtuning_select(nll, entropy, response, sample_ratio=self.sample_ratio, token_ratio=self.token_ratio,
                              lam=self.lam)


def plot_eu_plane(selection: Selection, path, *, title: str = "Error-Uncertainty plane") -> None:
    """Scatter of (response PPL, mean entropy) per sample, coloured by quadrant, kept samples filled (triangles:
    kept by the top-up, where the thresholds may place them elsewhere), with the final quantile thresholds;
    written to `path` (PNG)."""
    from prunekit.report import figure

    if selection.ppl is None or selection.quadrant is None:
        raise InputError("this selection has no EU-plane statistics (only Q-Tuning's has)")
    colours = {1: "tab:red", 2: "tab:blue", 3: "tab:gray", 4: "tab:green"}
    fig, ax = figure(figsize=(6, 4.5))
    topped = (selection.placed_by == "top-up") if selection.placed_by is not None else np.zeros_like(
        selection.keep_samples)
    for qd, c in colours.items():
        for kept, top, words in ((True, False, " (kept)"), (True, True, " (kept: top-up)"), (False, False, "")):
            m = (selection.quadrant == qd) & (selection.keep_samples == kept) & (topped == top)
            if m.any():
                ax.scatter(selection.ppl[m], selection.entropy[m], s=14 if kept else 10, c=c if kept else "none",
                           edgecolors=c, linewidths=0.7, marker="^" if top else "o",
                           label=f"Q{qd} {NAMES[qd]}{words} ({int(m.sum())})")
    info = selection.info
    for key, style in (("ppl_hi", "--"), ("ppl_lo", ":")):
        if key in info:
            ax.axvline(info[key], color="k", ls=style, lw=0.8)
    for key, style in (("ent_lo", ":"), ("ent_hi", "--")):
        if key in info:
            ax.axhline(info[key], color="k", ls=style, lw=0.8)
    ax.set_xscale("log")
    ax.set_xlabel("error: response perplexity (log scale)")
    ax.set_ylabel("uncertainty: mean predictive entropy (nats)")
    ax.set_title(title, fontsize=10)
    ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
