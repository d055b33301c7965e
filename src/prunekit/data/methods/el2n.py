"""EL2N: the error L2-norm of an early-training prediction.

Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training"
(NeurIPS 2021), https://arxiv.org/abs/2107.07075; reference code mansheej/data_diet (`data_diet/scores.py`,
`get_lord_error_fn` with ``ord=2``; `scripts/get_mean_score.py` averages over runs).

Algorithm: train R networks from different seeds for a few epochs (the paper: epoch 20 of 200 on CIFAR-10),
then for every example ``EL2N(x, y) = mean_r ‖softmax(f_r(x)) - onehot(y)‖₂``. High = the early network is
wrong or unsure = hard. Data Diet keeps the highest scores.

Departures from the reference: none in the math. This file only scores given outputs; training the R runs is
`prunekit.train.score_runs`. The reference averages over 10 runs; the number here is whatever ``R`` you pass.

>>> import numpy as np
>>> logits = np.array([[4., 0.], [0., 0.]])  # [N=2, K=2]: confident and right, then 50/50
>>> el2n(logits, np.array([0, 0])).round(4)
array([0.0254, 0.7071])
"""

from __future__ import annotations

import numpy as np

from prunekit.data.methods._checks import float_array, labels_array
from prunekit.errors import InputError

__all__ = ["el2n", "softmax"]


def softmax(logits: np.ndarray) -> np.ndarray:
    """Numerically stable softmax over the last axis (float64); `logits` an array, tensor or nested list. A -inf
    logit (a masked class) gets probability 0; +inf, and a row with every logit -inf, are refused."""
    logits = float_array(logits, "logits", ndims=(1, 2, 3), allow_neg_inf=True)
    if np.isneginf(logits).all(axis=-1).any():
        raise InputError("logits has a row whose every value is -inf (no class possible); fix or drop it")
    z = logits - logits.max(axis=-1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=-1, keepdims=True)


def el2n(outputs, labels, *, from_logits: bool | None = None) -> np.ndarray:
    """Mean over runs of ``‖p(x) - onehot(y)‖₂``: float64 ``[N]``, higher = harder.

    `outputs`: ``[R, N, K]`` (R runs or checkpoints) or ``[N, K]`` (one run): logits, or probabilities with
    ``from_logits=False`` (each row must sum to 1 within 1e-3). `labels`: integer ``[N]`` in ``[0, K)``.
    Left out, `from_logits` reads logits, and outputs whose every row is in [0, 1] and sums to 1 are refused:
    probabilities taken for logits were softmaxed again, which flattens them and moves the scores quietly.
    """
    out = float_array(outputs, "outputs", ndims=(2, 3))
    if out.ndim == 2:
        out = out[None]  # [1, N, K]
    _, n, k = out.shape
    y = labels_array(labels, n=n, k=k)
    if from_logits is None:
        if out.min() >= 0 and out.max() <= 1 and np.abs(out.sum(axis=-1) - 1.0).max() <= 1e-3:
            raise InputError("outputs look like probabilities (every row is in [0, 1] and sums to 1); pass "
                             "from_logits=False to score probabilities, or from_logits=True if they are logits")
        from_logits = True
    if from_logits:
        probs = softmax(out)  # [R, N, K]
    else:
        if out.min() < -1e-6 or out.max() > 1 + 1e-6:
            raise InputError("outputs with from_logits=False must be probabilities in [0, 1]; "
                             "pass logits with from_logits=True")
        err = np.abs(out.sum(axis=-1) - 1.0)  # [R, N]
        if err.max() > 1e-3:
            r, i = np.unravel_index(int(err.argmax()), err.shape)
            raise InputError(f"outputs with from_logits=False must have rows summing to 1; run {r}, example {i} "
                             f"sums to {out[r, i].sum():.6g}. Pass logits with from_logits=True")
        probs = out.copy()
    probs[:, np.arange(n), y] -= 1.0  # p - onehot(y)
    return np.linalg.norm(probs, axis=-1).mean(axis=0)  # [N]
