"""Forgetting events: how often training forgets an example it had learned.

Toneva, Sordoni, Combes, Trischler, Bengio, Gordon, "An Empirical Study of Example Forgetting during Deep
Neural Network Learning" (ICLR 2019), https://arxiv.org/abs/1812.05159; as used by Data Diet
(mansheej/data_diet, `data_diet/forgetting.py`).

Algorithm: record, each time an example is presented in a minibatch, whether the network classifies it
correctly (from that step's forward pass, before the update). A *forgetting event* is correct at one
presentation and incorrect at the next. The score is the number of events; an example that is never
classified correctly gets ``+inf`` (the most forgotten, never the least). High = hard.

Departures from the reference: none. DeepCore's `Forgetting` gives never-learned examples 0, so they are
pruned first; here they are the hardest, as in Toneva et al. and Data Diet.

>>> import numpy as np
>>> correct = np.array([[1, 0, 0], [0, 0, 1], [1, 0, 1], [0, 0, 1]], dtype=bool)  # [T=4, N=3]
>>> forgetting_counts(correct)
array([ 2., inf,  0.])
>>> tracker = ForgettingTracker(3)
>>> for t in range(4):
...     tracker.update([2, 0, 1], correct[t, [2, 0, 1]])
>>> tracker.scores()
array([ 2., inf,  0.])
"""

from __future__ import annotations

import numpy as np

from prunekit.data.methods._checks import to_numpy
from prunekit.errors import InputError

__all__ = ["forgetting_counts", "ForgettingTracker"]


def _bool_array(value, name: str, ndim: int) -> np.ndarray:
    arr = to_numpy(value, name)
    if arr.ndim != ndim:
        raise InputError(f"{name} must be {ndim}-D, got shape {tuple(arr.shape)}")
    if arr.dtype != bool:
        if not np.issubdtype(arr.dtype, np.number) or not np.isin(arr, (0, 1)).all():
            raise InputError(f"{name} must be booleans (or 0/1): True = classified correctly")
        arr = arr.astype(bool)
    return arr


def forgetting_counts(correct) -> np.ndarray:
    """Forgetting events per example from a correctness history, float64 ``[N]`` (``inf`` = never learned).

    `correct`: bool ``[T, N]``, ``correct[t, i]`` = example ``i`` was classified correctly at its ``t``-th
    presentation.
    """
    c = _bool_array(correct, "correct", 2)  # [T, N]
    if c.size == 0:
        raise InputError(f"correct is empty (shape {tuple(c.shape)}); give at least one presentation of one example")
    events = (c[:-1] & ~c[1:]).sum(axis=0).astype(np.float64)  # [N]: correct at t-1, wrong at t
    events[~c.any(axis=0)] = np.inf
    return events


class ForgettingTracker:
    """Counts forgetting events online: call `update` with each minibatch's correctness during training.

    Equal to `forgetting_counts` on the history it was given. An example never presented counts as never
    learned (``inf``).
    """

    def __init__(self, n: int):
        if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 1:
            raise InputError(f"n must be the (positive) number of training examples, got {n!r}")
        self.n = int(n)
        self.forgets = np.zeros(self.n, dtype=np.int64)  # [N]
        self.learned = np.zeros(self.n, dtype=bool)  # [N]: ever correct
        self._last = np.zeros(self.n, dtype=bool)  # [N]: correct at the latest presentation

    def update(self, indices, correct) -> None:
        """Record one minibatch: `indices` int ``[B]`` (distinct) and their correctness bool ``[B]``."""
        idx = to_numpy(indices, "indices")
        ok = _bool_array(correct, "correct", 1)
        if idx.ndim != 1 or idx.shape != ok.shape:
            raise InputError(f"indices {tuple(idx.shape)} and correct {tuple(ok.shape)} must be 1-D and equal in size")
        if idx.size == 0:
            return
        if idx.dtype == bool or not np.issubdtype(idx.dtype, np.integer):
            raise InputError(f"indices must be integer example indices, got dtype {idx.dtype}")
        if idx.min() < 0 or idx.max() >= self.n:
            raise InputError(f"indices must be in [0, {self.n}); got {idx.min()}..{idx.max()}")
        if len(np.unique(idx)) != len(idx):
            raise InputError("indices repeat within one update; give each example at most once per minibatch")
        self.forgets[idx] += self._last[idx] & ~ok
        self._last[idx] = ok
        self.learned[idx] |= ok

    def scores(self) -> np.ndarray:
        """Forgetting events so far, float64 ``[N]``; ``inf`` for examples never classified correctly."""
        out = self.forgets.astype(np.float64)
        out[~self.learned] = np.inf
        return out
