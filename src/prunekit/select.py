"""Keep-masks from scores.

Every selector takes `scores` (higher = more worth keeping) and returns a boolean `keep` mask of the same
shape (True = kept). `ratio` is the fraction removed, in [0, 1); `pattern` is an `NM` (at most `n` nonzeros in
every `m` consecutive weights along the last, input, dimension). The reference repositories (Wanda,
SparseGPT, llm-compressor) count the *zeros* per group instead; `NM.zeros` converts at that boundary.

Data pruning is the exception to "higher = keep": its scores (`prunekit.data.methods`) are *difficulty*, and
whether to keep the hard or the easy end is the point of the choice, so `select_examples` takes a `strategy`
and `keep`, the fraction of examples kept, in (0, 1].

>>> import torch
>>> keep_per_row(torch.tensor([[3., 1., 2., 0.]]), 0.5)
tensor([[ True, False,  True, False]])
>>> keep_n_m(torch.tensor([[3., 1., 2., 0.]]), parse_pattern("1:2"))
tensor([[ True, False,  True, False]])
>>> select_examples([0.1, 0.9, 0.5, 0.7], 0.5)  # keep the harder half
array([False,  True, False,  True])
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass

import numpy as np
import torch

from prunekit.data.methods._checks import to_numpy
from prunekit.errors import InputError

__all__ = [
    "NM", "parse_pattern", "check_ratio", "ratio_for", "keep_per_row", "keep_global", "keep_n_m", "select_examples",
]


@dataclass(frozen=True)
class NM:
    """At most `n` nonzeros in every `m` consecutive input weights (2:4 keeps 2 of every 4)."""

    n: int
    m: int

    @property
    def zeros(self) -> int:
        """Zeros per group: the `prune_n` of the reference code."""
        return self.m - self.n

    @property
    def ratio(self) -> float:
        return self.zeros / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


_PATTERN = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


def parse_pattern(pattern: str | NM | None) -> NM | None:
    """Parse ``"N:M"`` (or ``None`` / ``"unstructured"`` for no pattern) into an `NM`."""
    if pattern is None:
        return pattern
    if isinstance(pattern, NM):
        n, m = pattern.n, pattern.m
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (n, m)) or not 1 <= n < m:
            raise InputError(f"pattern {pattern} is impossible: it needs whole numbers 1 <= N < M (N nonzeros kept "
                             "of every M weights); use e.g. NM(2, 4)")
        return pattern
    if not isinstance(pattern, str):
        raise InputError(f"pattern must be a string like '2:4', got {type(pattern).__name__}")
    if pattern.strip().lower() in ("", "unstructured", "none"):
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise InputError(f"pattern {pattern!r} is not of the form N:M; use e.g. '2:4' (--pattern 2:4: keep 2 of "
                         "every 4)")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1 or n >= m:
        raise InputError(
            f"pattern {pattern!r} is impossible: it needs 1 <= N < M (N nonzeros kept of every M weights); "
            "use e.g. 2:4 or 4:8"
        )
    if 1.0 - n / m >= 1.0:  # a sparsity that rounds to 1.0 was refused as "ratio 1.0 is outside [0, 1)"
        raise InputError(f"pattern {pattern!r} keeps {n} of {m}, a fraction too small to represent; use a smaller M "
                         "(e.g. 2:4 or 4:8)")
    return NM(n, m)


def check_ratio(ratio: float) -> float:
    """Validate a removal ratio: a finite number in [0, 1)."""
    if isinstance(ratio, (bool, np.bool_)) or not isinstance(ratio, numbers.Real):  # numpy scalars are Real too
        raise InputError(f"ratio must be a number in [0, 1), got {ratio!r}")
    ratio = float(ratio)
    if not math.isfinite(ratio) or not 0.0 <= ratio < 1.0:
        raise InputError(f"ratio {ratio} is outside [0, 1); give the fraction of weights to remove, e.g. 0.5")
    return ratio


def ratio_for(ratio: float | None, pattern: NM | None) -> float:
    """The removal ratio a run uses: an N:M pattern fixes it at 1 - N/M; a ratio that disagrees is an error."""
    if pattern is None:
        if ratio is None:
            raise InputError("give a ratio (fraction removed, in [0, 1)) or an N:M pattern")
        return check_ratio(ratio)
    if ratio is not None and abs(check_ratio(ratio) - pattern.ratio) > 1e-9:
        raise InputError(
            f"ratio {ratio} disagrees with pattern {pattern}, which removes {pattern.ratio:g}; "
            "drop the ratio or make them agree"
        )
    return pattern.ratio


def _keep_lowest_removed(scores: torch.Tensor, k: int) -> torch.Tensor:
    """Remove the `k` lowest scores along the last dim; ties at the cut go to the earlier index.

    The tie rule is the Wanda reference's stable ascending sort. A stable sort of every row is ~4x slower
    than `topk` on a CPU, so `topk` chooses and only rows where a tie straddles the cut are sorted.
    """
    rows = scores.reshape(-1, scores.shape[-1])  # [R, C]: every leading dim is a row
    keep = torch.ones_like(rows, dtype=torch.bool)
    if k > 0:
        values, idx = torch.topk(rows, k, dim=-1, largest=False, sorted=False)  # [R, k]
        cut = values.amax(dim=-1, keepdim=True)
        straddle = (rows == cut).sum(-1) != (values == cut).sum(-1)  # [R]: a tie at the cut was left out
        if straddle.any():
            tied = straddle.nonzero().squeeze(1)
            idx[tied] = torch.sort(rows[tied], dim=-1, stable=True).indices[:, :k]
        keep.scatter_(-1, idx, False)
    return keep.reshape(scores.shape)


def _check_scores(scores) -> None:
    """Refuse what no mask can be made from: not a tensor, no entries, or NaN (it would be ranked arbitrarily)."""
    if not isinstance(scores, torch.Tensor):
        raise InputError(f"scores must be a torch.Tensor (e.g. torch.as_tensor(x)), got {type(scores).__name__}")
    if scores.ndim == 0 or scores.numel() == 0:
        raise InputError(f"scores must have at least one entry and one dimension, got shape {list(scores.shape)}")
    if scores.is_complex() or scores.dtype == torch.bool:
        raise InputError(f"scores must be real numbers, got dtype {scores.dtype}")
    if scores.is_floating_point() and bool(torch.isnan(scores).any()):
        raise InputError("scores contain NaN, which cannot be ranked; fix what produced them (NaN weights or inputs)")


def keep_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove ``int(cols * ratio)`` lowest scores in every row (Wanda's comparison group)."""
    ratio = check_ratio(ratio)
    _check_scores(scores)
    return _keep_lowest_removed(scores, int(scores.shape[-1] * ratio))


def keep_global(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove ``int(numel * ratio)`` lowest scores over the whole tensor."""
    ratio = check_ratio(ratio)
    _check_scores(scores)
    flat = _keep_lowest_removed(scores.reshape(-1), int(scores.numel() * ratio))
    return flat.reshape(scores.shape)


def keep_n_m(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive entries along the last dim; `pattern` is an
    `NM` or a string such as ``"2:4"`` (`parse_pattern`'s rules)."""
    pattern = parse_pattern(pattern)
    if pattern is None:
        raise InputError("keep_n_m needs an N:M pattern such as NM(2, 4) or '2:4'")
    _check_scores(scores)
    cols = scores.shape[-1]
    if cols % pattern.m:
        raise InputError(f"pattern {pattern} needs an input size divisible by {pattern.m}, got {cols}")
    groups = scores.reshape(*scores.shape[:-1], cols // pattern.m, pattern.m)
    return _keep_lowest_removed(groups, pattern.zeros).reshape(scores.shape)


# ---------------------------------------------------------------------------------------------------------------
# Examples: keep-masks from per-example difficulty (data pruning)

_STRATEGIES = ("hard", "easy", "random", "ccs")


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def _class_budgets(sizes: np.ndarray, keep: float, total: int) -> np.ndarray:
    """Largest remainder: ``floor(keep * n_c)`` each, one more for the largest remainders until `total`."""
    exact = keep * sizes.astype(np.float64)  # [C]
    budgets = np.minimum(np.floor(exact).astype(np.int64), sizes)
    order = np.argsort(-(exact - budgets), kind="stable")  # largest remainder first, ties to the lower class
    for c in order[: max(total - int(budgets.sum()), 0)]:
        budgets[c] += 1
    return budgets


def _ccs(d: np.ndarray, m: int, rng: np.random.Generator, bins: int, cutoff: float) -> np.ndarray:
    """Coverage-centric selection of `m` positions of `d` (Zheng et al. 2023, Algorithm 1)."""
    n = len(d)
    by_hardness = np.argsort(-d, kind="stable")  # hardest first; +inf first of all
    cut = min(int(cutoff * n), n - m)  # never cut so deep that the budget cannot be met
    rest = np.sort(by_hardness[cut:])  # [n - cut] positions, in index order
    s = d[rest]
    finite = np.isfinite(s)
    stratum = np.full(len(s), bins - 1, dtype=np.int64)  # [n - cut]; +inf left after the cut: the hardest
    if finite.any():
        values = s[finite]
        lo, hi = values.min(), values.max()
        with np.errstate(over="ignore"):
            overflows = not np.isfinite(hi - lo)
        if overflows:  # a span past float64's range (scores of +-1e308): halve it, exactly
            values, lo, hi = values / 2, lo / 2, hi / 2
        width = (hi - lo) / bins
        stratum[finite] = np.minimum(((values - lo) / width).astype(np.int64), bins - 1) if hi > lo else 0
    strata = [rest[stratum == b] for b in range(bins) if (stratum == b).any()]
    chosen = []
    for i in np.argsort([len(x) for x in strata], kind="stable"):  # smallest strata first
        share = min(len(strata[i]), m // (len(strata) - len(chosen)))
        chosen.append(rng.choice(strata[i], size=share, replace=False) if share < len(strata[i]) else strata[i])
        m -= share
    return np.concatenate(chosen)


def _select_group(d: np.ndarray, m: int, strategy: str, rng: np.random.Generator, bins: int,
                  cutoff: float) -> np.ndarray:
    """Positions (into `d`) of the `m` examples `strategy` keeps."""
    if m >= len(d):
        return np.arange(len(d))
    if strategy == "hard":
        return np.argsort(-d, kind="stable")[:m]  # ties: the lower index first
    if strategy == "easy":
        return np.argsort(d, kind="stable")[:m]
    if strategy == "random":
        return rng.choice(len(d), size=m, replace=False)
    return _ccs(d, m, rng, bins, cutoff)


def class_groups(labels: np.ndarray) -> list[np.ndarray]:
    """The indices of each class present in `labels` ``[N]``, ascending, classes in sorted order: one stable sort
    (a scan of all N per class took 6 s for 1M examples of 16k classes)."""
    _, inverse = np.unique(labels, return_inverse=True)
    inverse = inverse.reshape(-1)
    order = np.argsort(inverse, kind="stable")
    return np.split(order, np.cumsum(np.bincount(inverse))[:-1])


def select_examples(difficulty, keep: float, *, strategy: str = "hard", labels=None, balanced: bool = False,
                    seed: int = 0, ccs_bins: int = 50, ccs_cutoff: float = 0.1) -> np.ndarray:
    """A bool keep-mask ``[N]`` that keeps ``round(keep * N)`` examples (at least one) by their difficulty.

    `difficulty`: float ``[N]``, higher = harder; ``+inf`` (never learned) is the hardest, NaN and ``-inf`` are
    errors. `keep`: the fraction kept, in (0, 1]. `strategy`:

    - ``"hard"``: the highest difficulty (Data Diet, forgetting; Sorscher et al. when data is abundant);
    - ``"easy"``: the lowest;
    - ``"random"``: a uniformly random subset drawn with `seed` (the baseline to beat);
    - ``"ccs"``: coverage-centric coreset selection (Zheng, Liu, Li, Prakash, "Coverage-centric Coreset
      Selection for High Pruning Rates", ICLR 2023, https://arxiv.org/abs/2210.15809): drop the hardest
      `ccs_cutoff` fraction (likely mislabeled; fewer if the budget needs them), split the rest into
      `ccs_bins` equal-width difficulty strata, then, smallest stratum first, give each non-empty stratum
      ``min(its size, remaining budget // strata left)`` examples drawn at random. Coverage of the whole
      difficulty range is what keeps high pruning rates above random.

    ``balanced=True`` (needs integer `labels` ``[N]``) gives each class ``round(keep * n_c)`` (largest
    remainder, so the total is exactly ``round(keep * N)``) and applies the strategy within each class. Ties
    go to the lower index; the random strategies depend only on `seed`.

    >>> select_examples([3., 1., 2., 0.], 0.5, strategy="easy")
    array([False,  True, False,  True])
    >>> select_examples([3., 1., 2., 0.], 0.5, labels=[0, 0, 1, 1], balanced=True)
    array([ True, False,  True, False])
    """
    d = to_numpy(difficulty, "difficulty")
    if d.ndim != 1 or d.size == 0 or d.dtype == bool or not np.issubdtype(d.dtype, np.number):
        raise InputError(f"difficulty must be a non-empty 1-D array of numbers [N], got {d.dtype} {tuple(d.shape)}")
    d = d.astype(np.float64)  # [N]
    if np.isnan(d).any() or np.isneginf(d).any():
        raise InputError("difficulty has NaN or -inf values; fix those scores (+inf, never learned, is allowed)")
    n = len(d)
    if isinstance(keep, bool) or not isinstance(keep, (int, float, np.floating, np.integer)):
        raise InputError(f"keep must be a number in (0, 1], the fraction of examples kept; got {keep!r}")
    keep = float(keep)
    if not math.isfinite(keep) or not 0.0 < keep <= 1.0:
        raise InputError(f"keep {keep} is outside (0, 1]; give the fraction of examples to keep, e.g. 0.5")
    if strategy not in _STRATEGIES:
        raise InputError(f"strategy {strategy!r} is unknown; use one of {', '.join(_STRATEGIES)}")
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise InputError(f"seed must be a non-negative integer, got {seed!r}")
    if isinstance(ccs_bins, bool) or not isinstance(ccs_bins, (int, np.integer)) or ccs_bins < 1:
        raise InputError(f"ccs_bins must be a positive integer (number of difficulty strata), got {ccs_bins!r}")
    if isinstance(ccs_cutoff, bool) or not isinstance(ccs_cutoff, (int, float)) or not 0.0 <= ccs_cutoff < 1.0:
        raise InputError(f"ccs_cutoff must be in [0, 1) (fraction of hardest examples dropped), got {ccs_cutoff!r}")
    y = None
    if labels is not None:
        y = to_numpy(labels, "labels")
        if y.shape != (n,) or y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
            raise InputError(f"labels must be integer class indices of shape [{n}], got {y.dtype} {tuple(y.shape)}")
    if balanced and y is None:
        raise InputError("balanced=True splits the budget across classes and needs labels=[N] class indices")
    if y is not None and not balanced:  # they were checked, then unused: the selection looked class-aware
        raise InputError("labels are used with balanced=True only (each class keeps its share); pass "
                         "balanced=True, or leave labels out")

    total = max(1, _round_half_up(keep * n))
    rng = np.random.default_rng(int(seed))
    if balanced:
        groups = class_groups(y)
        budgets = _class_budgets(np.array([len(g) for g in groups]), keep, total)
    else:
        groups, budgets = [np.arange(n)], [total]
    mask = np.zeros(n, dtype=bool)
    for idx, m in zip(groups, budgets):
        if m > 0:
            mask[idx[_select_group(d[idx], int(m), strategy, rng, int(ccs_bins), float(ccs_cutoff))]] = True
    return mask
