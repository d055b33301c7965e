"""Magnitude pruning: remove the weights of smallest absolute value.

The baseline every pruning paper reports (Han et al., "Learning both Weights and Connections for Efficient
Neural Networks", https://arxiv.org/abs/1506.02626; as run by the Wanda repository's `prune_magnitude`).

Algorithm: score ``|W_ij|``; unstructured removes the lowest ``int(numel * ratio)`` scores of each layer (the
comparison group is the whole layer, as in the reference); N:M keeps the `n` largest of every `m` consecutive
input weights of each row. No calibration data, no weight update.

Departure from the reference: the reference thresholds at ``sorted[int(numel * ratio)]`` with ``<=``, which
removes one weight more than asked (and every tie); this removes exactly ``int(numel * ratio)``.

>>> import torch
>>> prune_weight(torch.tensor([[1., -4., 2., 3.]]), None, ratio=0.5, pattern=None)
tensor([[ 0., -4.,  0.,  3.]])
"""

from __future__ import annotations

import torch

from prunekit.select import NM, keep_global, keep_n_m


def prune_weight(weight: torch.Tensor, stats: None, *, ratio: float, pattern: NM | None) -> torch.Tensor:
    """The pruned copy of `weight` (``[out, in]``, fp32)."""
    scores = weight.abs()
    keep = keep_n_m(scores, pattern) if pattern else keep_global(scores, ratio)
    return weight * keep
