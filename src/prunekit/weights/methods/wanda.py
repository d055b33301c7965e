"""Wanda: pruning by weights and activations.

Sun, Liu, Bair, Kolter, "A Simple and Effective Pruning Approach for Large Language Models" (ICLR 2024),
https://arxiv.org/abs/2306.11695; reference code locuslab/wanda (`lib/prune.py::prune_wanda`,
`lib/layerwrapper.py::WrappedGPT`).

Algorithm: score ``S_ij = |W_ij| * ||X_j||_2`` where ``X_j`` is the j-th input feature over all calibration
tokens. Unstructured: within each *output row*, remove the ``int(d_in * ratio)`` lowest scores (stable sort,
as the reference). N:M: keep the `n` highest scores of every `m` consecutive inputs in each row. The kept
weights are not changed.

Departures from the reference: none in the math (the input norms are summed in row chunks rather than by
``torch.norm``: the same sum, rounded differently and closer to a float64 one). The engine's default order
(``sequential="block"``) is the reference's: all Linears of a block calibrated on the dense block's inputs, then
the pruned block re-run.
``sequential="layer"`` instead prunes each Linear as its inputs arrive (see `prunekit.weights.engine`), so
o_proj and down_proj see the outputs of already-pruned predecessors.

>>> import torch
>>> w = torch.tensor([[1., 1., 4., 1.]])
>>> prune_weight(w, torch.tensor([9., 1., 0.01, 4.]), ratio=0.5, pattern=None)
tensor([[1., 0., 0., 1.]])
"""

from __future__ import annotations

import torch

from prunekit.select import NM, keep_n_m, keep_per_row


def prune_weight(weight: torch.Tensor, norms_sq: torch.Tensor, *, ratio: float, pattern: NM | None) -> torch.Tensor:
    """The pruned copy of `weight` (``[out, in]``, fp32) given the input's squared column norms (``[in]``)."""
    scores = weight.abs() * norms_sq.sqrt()[None, :]  # [out, in]
    keep = keep_n_m(scores, pattern) if pattern else keep_per_row(scores, ratio)
    return weight * keep
