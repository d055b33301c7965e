"""Prototype distance: how far an example's embedding lies from the nearest k-means centroid.

Sorscher, Geirhos, Shekhar, Ganguli, Morcos, "Beyond neural scaling laws: beating power law scaling via data
pruning" (NeurIPS 2022), https://arxiv.org/abs/2206.14486. There is no official code for the metric; the
released ImageNet scores (rgeirhos/dataset-pruning-metrics) use cosine similarity to the centroid.

Algorithm (self-supervised prototypes): embed every example (the paper: a self-supervised SwAV model), run
k-means in the embedding space, and score each example by the cosine distance ``1 - cos(e, c)`` to its
nearest centroid ``c``. Near a centroid = prototypical = easy; far = hard. The paper keeps the hard examples
when data is abundant and the easy ones when it is scarce. With `labels`, k-means runs within each class (the
supervised-prototype variant; ``k=1`` gives the class centroid).

Departures from the paper: k-means is this file's own (k-means++ seeding, Lloyd iterations, spherical for
cosine: unit vectors and renormalized centroid means); the embedding is the caller's choice. An empty
cluster is re-seeded with the point farthest from its centroid.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> emb = torch.cat([torch.tensor([1., 0.]) + 0.05 * torch.randn(20, 2, generator=g),
...                  torch.tensor([0., 1.]) + 0.05 * torch.randn(20, 2, generator=g),
...                  torch.tensor([[1., 1.]])])  # two tight directions and one example in between
>>> int(prototype_distance(emb, k=2).argmax())
40
"""

from __future__ import annotations

import numpy as np
import torch

from prunekit.data.methods._checks import float_array, int_at_least, labels_array
from prunekit.errors import InputError, check_seed
from prunekit.select import class_groups

__all__ = ["kmeans", "prototype_distance"]


def _tensor(emb) -> torch.Tensor:
    """`emb` as a float64 ``[N, D]`` tensor over writable memory (a read-only memory map is copied)."""
    arr = np.ascontiguousarray(float_array(emb, "emb", ndims=(2,)))
    return torch.from_numpy(arr if arr.flags.writeable else arr.copy())


def _scaled(x: torch.Tensor) -> tuple[torch.Tensor, float]:
    """``(x / s, s)`` with s the largest |value| when squares would overflow (or underflow) float64, else
    ``(x, 1)``: k-means' assignments do not change with a common scale, its distances scale by s."""
    s = float(x.abs().max())
    if s > 1e100 or 0 < s < 1e-100:
        return x / s, s
    return x, 1.0


def _unit(x: torch.Tensor, name: str) -> torch.Tensor:
    peak = x.abs().amax(dim=1, keepdim=True)  # [N, 1]
    if (peak == 0).any():
        i = int((peak[:, 0] == 0).nonzero()[0])
        raise InputError(f"{name} row {i} is all zeros; cosine distance is undefined for it (use cosine=False)")
    norms = x.norm(dim=1, keepdim=True)  # [N, 1]
    if not (torch.isfinite(norms).all() and (norms > 0).all()):  # squares overflowed or underflowed float64
        x = x / peak
        norms = x.norm(dim=1, keepdim=True)
    return x / norms


def _dist(x: torch.Tensor, c: torch.Tensor, cosine: bool) -> torch.Tensor:
    """Distances ``[N, k]``: ``1 - x·c`` for unit vectors, else squared Euclidean."""
    if cosine:
        return (1.0 - x @ c.T).clamp_min(0.0)
    return ((x * x).sum(1, keepdim=True) - 2.0 * x @ c.T + (c * c).sum(1)[None, :]).clamp_min(0.0)


def _kmeans(x: torch.Tensor, k: int, iters: int, gen: torch.Generator,
            cosine: bool) -> tuple[torch.Tensor, torch.Tensor]:
    n = len(x)
    # k-means++: each new centre is drawn with probability proportional to the distance to the nearest one.
    centres = [int(torch.randint(n, (1,), generator=gen))]
    nearest = _dist(x, x[centres[0]][None], cosine)[:, 0]  # [N]
    for _ in range(1, k):
        weights = nearest.clone()
        weights[centres] = 0.0
        if weights.sum() <= 0:  # fewer distinct points than k: pick any unused point
            weights = torch.ones(n, dtype=x.dtype)
            weights[centres] = 0.0
        centres.append(int(torch.multinomial(weights, 1, generator=gen)))
        nearest = torch.minimum(nearest, _dist(x, x[centres[-1]][None], cosine)[:, 0])
    c = x[centres].clone()  # [k, D]
    assign = torch.full((n,), -1, dtype=torch.long)
    for _ in range(iters):
        d = _dist(x, c, cosine)  # [N, k]
        new = d.argmin(1)  # [N]: ties go to the lower cluster index
        if torch.equal(new, assign):
            break
        assign = new
        sums = torch.zeros_like(c).index_add_(0, assign, x)  # [k, D]
        counts = torch.bincount(assign, minlength=k)  # [k]
        far = d.gather(1, assign[:, None])[:, 0].clone()  # [N]: distance to own centroid
        for j in (counts == 0).nonzero()[:, 0].tolist():  # an empty cluster takes the worst-fitted point
            i = int(far.argmax())
            far[i] = -1.0
            sums[j], counts[j] = x[i], 1
            counts[assign[i]] -= 1
            sums[assign[i]] -= x[i]
            assign[i] = j
        c = sums / counts[:, None].clamp_min(1)
        if cosine:
            c = c / c.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return c, _dist(x, c, cosine).argmin(1)


def kmeans(emb, k: int, *, iters: int = 100, seed: int = 0, cosine: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """k-means with k-means++ seeding: ``(centroids float64 [k, D], assignment int64 [N])``.

    `emb`: ``[N, D]`` array or tensor. ``cosine=True`` is spherical k-means (rows and centroids on the unit
    sphere, nearest = highest cosine); ``cosine=False`` is Euclidean. Stops early when no assignment changes.

    >>> centroids, assign = kmeans([[0., 1.], [0., 2.], [3., 0.]], 2)
    >>> bool(assign[0] == assign[1] != assign[2])  # cluster numbers are arbitrary; the grouping is not
    True
    """
    x = _tensor(emb)  # [N, D] float64
    k = int_at_least(k, "k", 1)
    iters = int_at_least(iters, "iters", 1)
    seed = check_seed(seed)  # below 2**63: the groups' seeds add their number
    if k > len(x):
        raise InputError(f"k={k} clusters need at least {k} examples, got {len(x)}; lower k")
    x, scale = (_unit(x, "emb"), 1.0) if cosine else _scaled(x)
    c, assign = _kmeans(x, k, iters, torch.Generator().manual_seed(seed), cosine)
    return (c if cosine else c * scale).numpy(), assign.numpy()


def prototype_distance(emb, *, k: int = 10, seed: int = 0, labels=None, iters: int = 100,
                       cosine: bool = True) -> np.ndarray:
    """Distance of each example to its nearest k-means centroid, float64 ``[N]``; higher = less typical.

    `emb`: ``[N, D]`` embeddings. ``labels=None``: k clusters over all examples (self-supervised prototypes).
    With integer `labels` ``[N]``: k clusters within each class (``min(k, class size)``), each example measured
    against its own class's centroids (supervised prototypes). ``cosine=True``: ``1 - cos``; else Euclidean.
    """
    x = _tensor(emb)  # [N, D] float64
    k = int_at_least(k, "k", 1)
    iters = int_at_least(iters, "iters", 1)
    seed = check_seed(seed)  # below 2**63: the groups' seeds add their number
    x, scale = (_unit(x, "emb"), 1.0) if cosine else _scaled(x)
    groups = [np.arange(len(x))]
    if labels is not None:
        y = labels_array(labels, n=len(x))
        groups = class_groups(y)
    elif k > len(x):
        raise InputError(f"k={k} clusters need at least {k} examples, got {len(x)}; lower k")
    out = np.empty(len(x), dtype=np.float64)
    for g, idx in enumerate(groups):
        xg = x[torch.from_numpy(idx)]  # [n_c, D]
        gen = torch.Generator().manual_seed(seed + g)
        c, _ = _kmeans(xg, min(k, len(idx)), iters, gen, cosine)
        d = _dist(xg, c, cosine).amin(1)  # [n_c]
        out[idx] = (d if cosine else d.sqrt() * scale).numpy()
    return out
