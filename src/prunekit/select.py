"""Keep-masks from scores.

Every selector takes `scores` (higher = more worth keeping) and returns a boolean `keep` mask of the same
shape (True = kept). `ratio` is the fraction removed, in [0, 1); `pattern` is an `NM` (at most `n` nonzeros in
every `m` consecutive weights along the last, input, dimension). The reference repositories (Wanda,
SparseGPT, llm-compressor) count the *zeros* per group instead; `NM.zeros` converts at that boundary.

>>> import torch
>>> keep_per_row(torch.tensor([[3., 1., 2., 0.]]), 0.5)
tensor([[ True, False,  True, False]])
>>> keep_n_m(torch.tensor([[3., 1., 2., 0.]]), parse_pattern("1:2"))
tensor([[ True, False,  True, False]])
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch

from prunekit.errors import InputError

__all__ = ["NM", "parse_pattern", "check_ratio", "ratio_for", "keep_per_row", "keep_global", "keep_n_m"]


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
    if pattern is None or isinstance(pattern, NM):
        return pattern
    if not isinstance(pattern, str):
        raise InputError(f"pattern must be a string like '2:4', got {type(pattern).__name__}")
    if pattern.strip().lower() in ("", "unstructured", "none"):
        return None
    match = _PATTERN.match(pattern)
    if not match:
        raise InputError(f"pattern {pattern!r} is not of the form N:M; use e.g. --pattern 2:4 (keep 2 of every 4)")
    n, m = int(match.group(1)), int(match.group(2))
    if m < 1 or n < 1 or n >= m:
        raise InputError(
            f"pattern {pattern!r} is impossible: it needs 1 <= N < M (N nonzeros kept of every M weights); "
            "use e.g. 2:4 or 4:8"
        )
    return NM(n, m)


def check_ratio(ratio: float) -> float:
    """Validate a removal ratio: a finite number in [0, 1)."""
    if isinstance(ratio, bool) or not isinstance(ratio, (int, float)):
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


def keep_per_row(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove ``int(cols * ratio)`` lowest scores in every row (Wanda's comparison group)."""
    ratio = check_ratio(ratio)
    return _keep_lowest_removed(scores, int(scores.shape[-1] * ratio))


def keep_global(scores: torch.Tensor, ratio: float) -> torch.Tensor:
    """Remove ``int(numel * ratio)`` lowest scores over the whole tensor."""
    ratio = check_ratio(ratio)
    flat = _keep_lowest_removed(scores.reshape(-1), int(scores.numel() * ratio))
    return flat.reshape(scores.shape)


def keep_n_m(scores: torch.Tensor, pattern: NM) -> torch.Tensor:
    """Keep the `n` highest scores in every group of `m` consecutive entries along the last dim."""
    cols = scores.shape[-1]
    if cols % pattern.m:
        raise InputError(f"pattern {pattern} needs an input size divisible by {pattern.m}, got {cols}")
    groups = scores.reshape(*scores.shape[:-1], cols // pattern.m, pattern.m)
    return _keep_lowest_removed(groups, pattern.zeros).reshape(scores.shape)
