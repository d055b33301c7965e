"""SnapKV: votes of an observation window, pooled, per KV head.

Paper: Li et al., "SnapKV: LLM Knows What You are Looking for Before Generation", NeurIPS 2024,
https://arxiv.org/abs/2404.14469 (code: FasterDecoding/SnapKV, ``SnapKVCluster``; kvpress ``SnapKVPress``).

Rule: the last ``window`` queries (default 32, the reference's) attend over the whole cache (softmax, causal
inside the window); each earlier key's vote is its attention averaged over the window queries and the query
heads of its KV head, then smoothed by a 1-D average pool of width ``kernel`` (default 5, stride 1, same
length). The window's own keys are always kept; of the rest, each KV head keeps its ``budget - window`` best.
Original positions.

Departures: the reference compresses only at prefill and only when the prompt is longer than the budget; the
engine also calls it when decoding pushes the cache over budget, with the buffered last ``window`` queries
(decoded tokens included) as the window (kvpress's ``DecodingPress`` does the same with hidden states). GQA:
votes are averaged over the query heads of a KV head (kvpress's choice; the reference had no GQA). The window
shrinks to the budget when the budget is smaller.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from prunekit.errors import InputError, int_at_least
from prunekit.inference.kv.engine import Policy, View, check_budget

__all__ = ["SnapKV"]


class SnapKV(Policy):
    """SnapKV: votes of an observation window, pooled, per KV head."""
    name = "snapkv"

    def __init__(self, *, budget: int, window: int = 32, kernel: int = 5):
        self.window = int_at_least(window, "window (observation-window queries)", 1)
        self.kernel = int_at_least(kernel, "kernel (pooling width)", 1)
        if self.kernel % 2 == 0:
            raise InputError(f"kernel must be odd so pooling keeps the length (got {kernel})")
        super().__init__(budget=check_budget(budget, name=self.name, minimum=1))
        self.query_window = self.window

    def score(self, view: View) -> torch.Tensor:
        queries = view.state.queries  # [B, Hq, w, d]
        w = min(queries.shape[2], view.n, self.target(view.budget))
        probs = self.window_probs(view, queries[:, :, -w:])  # [B, Hq, w, n]
        b, hq, _, n = probs.shape
        votes = probs[..., : n - w].mean(2)  # [B, Hq, n - w]
        if n - w > 0 and self.kernel > 1:
            votes = F.avg_pool1d(votes, self.kernel, stride=1, padding=self.kernel // 2)  # zero-padded, as the reference
        votes = votes.view(b, hq // view.groups, view.groups, n - w).mean(2)  # [B, Hkv, n - w]
        window = votes.new_full((b, hq // view.groups, w), float("inf"))
        return torch.cat([votes, window], dim=-1)  # [B, Hkv, n]

