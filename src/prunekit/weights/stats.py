"""Calibration statistics of a Linear's input, accumulated batch by batch, by name.

Both follow the reference code's running means over *sequences* (not tokens), so the numbers match theirs:

- ``"norms"`` (Wanda, `lib/layerwrapper.py`): ``s_j = sum_tokens x_j^2 / n_seq``, so ``sqrt(s)`` is
  ``||X_j||_2`` up to a constant that no per-row comparison sees.
- ``"hessian"`` (SparseGPT, `sparsegpt.py::add_batch`): ``H = 2/n_seq * sum_tokens x x^T`` in fp32.
- ``"moments"`` (DSnoT, `lib/layerwrapper.py`): Wanda's norms plus, per input column, the running mean over
  sequences of ``sum_tokens x_j`` and the mean over sequences of the variance of ``x_j`` within a sequence
  (the reference feeds one sequence per forward, so its token-weighted average of batch variances is that).

Names join with ``+`` (``"hessian+moments"``): the value is then a dict of the parts by name.

>>> import torch
>>> acc = Hessian(3); acc.add(torch.ones(2, 4, 3)); acc.value().shape
torch.Size([3, 3])
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from prunekit.errors import InputError

__all__ = ["ColumnNorms", "Hessian", "Moments", "STATS", "make", "neutral"]


def _flatten(x: torch.Tensor, groups: torch.Tensor | None = None) -> tuple[torch.Tensor, int]:
    # x: [batch, seq, d_in] or [tokens, d_in] -> ([tokens, d_in] fp32, sequences in this batch); `groups` [tokens]:
    # the sequence each row of a [tokens, d_in] input came from (an MoE expert's routed tokens), else it is one
    if groups is not None:
        _check_groups(x, groups)
        return x.float(), int(groups.unique().numel())
    sequences = x.shape[0] if x.dim() == 3 else 1
    return x.reshape(-1, x.shape[-1]).float(), sequences


def _check_groups(x: torch.Tensor, groups: torch.Tensor) -> None:
    if x.dim() != 2 or groups.dim() != 1 or groups.shape[0] != x.shape[0]:
        raise ValueError(f"groups {list(groups.shape)} must give one sequence index per row of a [tokens, d_in] "
                         f"input, got {list(x.shape)}")


class ColumnNorms:
    """Running mean over sequences of each input column's squared norm: ``[d_in]``."""

    ROWS = 4096  # tokens squared and summed at a time

    def __init__(self, d_in: int, device=None):
        self.sq = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.sequences = 0

    def add(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        x, seqs = _flatten(x, groups)
        self.sq = self.sq.to(x.device)  # accumulate where the activations are (a no-op after the first batch)
        self.sq *= self.sequences / (self.sequences + seqs)
        self.sequences += seqs
        # Row chunks of x^2 summed down the tokens. On 2 CPU cores, for 2048 x 1536 inputs, this is ~10x faster
        # than torch.linalg.vector_norm(x, dim=0) (the reference's torch.norm), and 10-100x closer to a float64
        # sum; a temporary holds at most ROWS tokens.
        total = torch.zeros_like(self.sq)
        for start in range(0, x.shape[0], self.ROWS):
            total += x[start : start + self.ROWS].square().sum(0)
        self.sq += total / self.sequences

    def value(self) -> torch.Tensor:
        return self.sq


class Hessian:
    """Running ``2/n_seq * X X^T`` in fp32: ``[d_in, d_in]``.

    Inputs of width >= `WIDE` accumulate only the upper triangle, in row bands, and `value()` mirrors it:
    fewer flops, measured on 2 CPU cores ~1.6x faster for d_in = 576 (bands of 128) and ~1.5x for
    d_in = 1536 (bands of 256) than one full GEMM.
    """

    WIDE = 512  # below this a single GEMM is as fast

    def __init__(self, d_in: int, device=None):
        self.h = torch.zeros(d_in, d_in, dtype=torch.float32, device=device)
        self.sequences = 0
        self.upper_only = d_in >= self.WIDE
        self.band = 128 if d_in < 1024 else 256

    def add(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        x, seqs = _flatten(x, groups)
        self.h = self.h.to(x.device)
        self.h *= self.sequences / (self.sequences + seqs)
        self.sequences += seqs
        x = x * (2.0 / self.sequences) ** 0.5  # [tokens, d_in]
        if not self.upper_only:
            self.h.addmm_(x.T, x)
            return
        b = self.band
        for i in range(0, x.shape[1], b):  # band [i:i+b, i:] covers the upper triangle
            self.h[i : i + b, i:].addmm_(x[:, i : i + b].T, x[:, i:])

    def value(self) -> torch.Tensor:
        if self.upper_only:
            return torch.triu(self.h) + torch.triu(self.h, 1).T
        return self.h


@dataclass
class InputMoments:
    norms: torch.Tensor  # [d_in] mean over sequences of sum_tokens x_j^2 (Wanda's scaler_row)
    sums: torch.Tensor  # [d_in] mean over sequences of sum_tokens x_j (DSnoT's sum_metric_row)
    var: torch.Tensor  # [d_in] mean over sequences of the within-sequence variance of x_j
    tokens: float | None = None  # mean tokens per calibration sequence (the length `sums` sums over)


class Moments:
    """DSnoT's statistics of a Linear's input: ``InputMoments`` (norms, sums, var), each ``[d_in]``."""

    def __init__(self, d_in: int, device=None):
        self.norms = ColumnNorms(d_in, device)
        self.sums = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.var = torch.zeros(d_in, dtype=torch.float32, device=device)
        self.sequences = 0
        self.tokens = 0

    def add(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        """Add a batch ``[seqs, tokens, d_in]``, or rows ``[tokens, d_in]``: one sequence, or with `groups`
        (``[tokens]``, the sequence each row came from: an MoE expert's routed tokens) one per distinct group, so
        the result does not depend on how sequences were batched."""
        self.norms.add(x, groups)
        if groups is not None:
            _check_groups(x, groups)
            xf = x.float()
            _, inverse, counts = groups.unique(return_inverse=True, return_counts=True)
            seqs = counts.numel()
            sums = xf.new_zeros(seqs, xf.shape[1]).index_add_(0, inverse, xf)  # [seqs, d_in]
            dev = xf - (sums / counts[:, None])[inverse]
            var = xf.new_zeros(seqs, xf.shape[1]).index_add_(0, inverse, dev * dev) / counts[:, None]
            tokens = xf.shape[0]
        else:
            x3 = (x if x.dim() == 3 else x.reshape(1, -1, x.shape[-1])).float()  # [seqs, tokens, d_in]
            seqs, tokens = x3.shape[0], x3.shape[0] * x3.shape[1]
            sums, var = x3.sum(dim=1), torch.var(x3, dim=1, unbiased=False)  # [seqs, d_in] each
        keep = self.sequences / (self.sequences + seqs)
        self.sequences += seqs
        self.tokens += tokens
        self.sums, self.var = self.sums.to(sums.device), self.var.to(var.device)
        self.sums = self.sums * keep + sums.sum(dim=0) / self.sequences
        self.var = self.var * keep + var.sum(dim=0) / self.sequences

    def value(self) -> InputMoments:
        return InputMoments(self.norms.value(), self.sums, self.var, self.tokens / max(self.sequences, 1))


class Composite:
    """Several statistics of the same input at once; ``value()`` is a dict by name."""

    def __init__(self, names: list[str], d_in: int, device=None):
        self.parts = {n: STATS[n](d_in, device) for n in names}

    def add(self, x: torch.Tensor, groups: torch.Tensor | None = None) -> None:
        for part in self.parts.values():
            part.add(x, groups)

    def value(self) -> dict:
        return {n: p.value() for n, p in self.parts.items()}


STATS = {"norms": ColumnNorms, "hessian": Hessian, "moments": Moments}


def make(name: str, d_in: int, device=None):
    """A fresh accumulator for statistic `name` (or ``"a+b"``) over inputs of width `d_in`, on `device` (the
    activations'; an accumulator also moves to its first input's device)."""
    if "+" in name:
        return Composite(name.split("+"), d_in, device)
    return STATS[name](d_in, device)


def is_finite(value) -> bool:
    """Whether a statistic's value (a tensor, `InputMoments` or a `Composite` dict of them) holds no NaN/Inf."""
    if value is None:
        return True
    if isinstance(value, dict):
        return all(is_finite(v) for v in value.values())
    if isinstance(value, InputMoments):
        return all(bool(torch.isfinite(t).all()) for t in (value.norms, value.sums, value.var))
    return bool(torch.isfinite(value).all())


def to_device(value, device: torch.device):
    """A statistic's value (as `is_finite` takes it) on `device`: the layer's, where the method computes."""
    if value is None:
        return None
    if isinstance(value, dict):
        return {k: to_device(v, device) for k, v in value.items()}
    if isinstance(value, InputMoments):
        return InputMoments(value.norms.to(device), value.sums.to(device), value.var.to(device), value.tokens)
    return value.to(device) if isinstance(value, torch.Tensor) else value


def neutral(name: str, d_in: int):
    """The value statistic `name` takes for white inputs (every column of unit norm, uncorrelated): what a layer
    that saw no calibration token is pruned with (an MoE expert no token was routed to). Wanda's norms are then
    equal, SparseGPT's Hessian the identity: both reduce to magnitude pruning (no weight update). DSnoT's moments
    are unit norms and variances with zero means: no expected output shift, so it makes no swap. A composite name
    (``"a+b"``) gives the dict of its parts, as `Composite` does."""
    if "+" in name:
        return {part: neutral(part, d_in) for part in name.split("+")}
    if name == "moments":
        return InputMoments(torch.ones(d_in), torch.zeros(d_in), torch.ones(d_in), None)
    if name == "norms":
        return torch.ones(d_in, dtype=torch.float32)
    if name == "hessian":
        return torch.eye(d_in, dtype=torch.float32)
    raise InputError(f"no neutral value for the statistic {name!r}: a layer no calibration token reached cannot "
                     "be pruned with it")
