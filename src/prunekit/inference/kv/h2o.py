"""H2O: heavy hitters plus recent tokens, by accumulated attention.

Paper: Zhang et al., "H2O: Heavy-Hitter Oracle for Efficient Generative Inference of Large Language Models",
NeurIPS 2023, https://arxiv.org/abs/2306.14048 (code: FMInference/H2O, ``H2OKVCache_LayerWise``).

Rule: every cached key accumulates the attention probability it receives from every query that has seen it,
summed over queries (and, with grouped-query attention, over the query heads sharing its KV head):
``acc_j += Σ_t softmax(q_t·K/√d)_j``. When the cache is over budget it keeps, per KV head, the most recent
``recent`` tokens (default half the budget, H2O's equal heavy/recent split) and the ``budget - recent``
non-recent tokens with the largest ``acc``; evicted tokens take their scores with them. Original positions.

Departures: the reference computes the probabilities inside its eager attention; we recompute them from q and
K after the model's own attention (so sdpa stays on), in chunks of 512 queries at prefill. The reference sums
over the batch; we run batch size 1. GQA aggregation (sum over the group) is ours: the reference models have
one query head per KV head. kvpress's ``ObservedAttentionPress`` divides by how many queries could see each
key; H2O does not, and neither do we.
"""

from __future__ import annotations

import torch

from prunekit.inference.kv.engine import Policy, View, check_budget, check_fraction

__all__ = ["H2O"]


class H2O(Policy):
    """H2O: heavy hitters plus recent tokens, by accumulated attention."""
    name = "h2o"

    def __init__(self, *, budget: int, recent: float = 0.5):
        self.recent = check_fraction(recent, what="recent (the fraction of the budget kept for recent tokens)")
        super().__init__(budget=check_budget(budget, name=self.name, minimum=2))

    def observe(self, view: View, q: torch.Tensor, q_pos: torch.Tensor) -> None:
        st = view.state
        if "acc" not in st.extras:
            st.extras["acc"] = torch.zeros(st.orig.shape, dtype=torch.float32, device=q.device)  # [B, Hkv, n]
        per_head = self.received_attention(view, q)  # [B, Hq, n], summed over the queries a chunk at a time
        b, hq, n = per_head.shape
        received = per_head.view(b, hq // view.groups, view.groups, n).sum(2)  # [B, Hkv, n]
        st.extras["acc"] += received

    def score(self, view: View) -> torch.Tensor:
        n, target = view.n, self.target(view.budget)
        recent = min(int(round(self.recent * target)), target)
        scores = view.state.extras["acc"].clone()  # [B, Hkv, n]
        if recent:
            scores[..., n - recent:] = float("inf")
        return scores
