"""Deep Forcing on a streaming language model: Deep Sink plus Participative Compression.

Paper: Yi, Jang, Cho, Nam, Yoon, Kim, "Deep Forcing: Training-Free Long Video Generation with Deep Sink and
Participative Compression", arXiv 2512.05081 (project: cvlab-kaist.github.io/DeepForcing). The paper works on
a chunk-wise autoregressive video model (Self Forcing on Wan2.1); here its two mechanisms drive a text LM's
KV cache, as the issue asks.

- **Deep Sink.** A large share of the window, ``sinks`` (default 0.5 of the budget; the paper keeps 10 of 21
  frames and reports 40-60% works), is kept for good: the first tokens of the stream. Their RoPE phase is
  re-aligned so they sit immediately before the tokens that follow them in the cache: only the sink keys are
  rotated (by Δ = new position − old position, `engine.rotate_keys`), the tail is left alone.
- **Participative Compression (PC).** When the window (``budget`` tokens) is full, keep
  sinks ∪ Top-C ∪ recent, in temporal order, and evict the rest. ``recent``: the last R tokens (default 0.2 of
  the budget; paper: 4 of 21 frames). Top-C: the ``topc`` (default 0.1 of the budget; paper: 2 of 21) middle
  tokens with the largest ϕ_j = Σ_{r ∈ recent} Σ_h q_{r,h}·k_{j,h} / (√d·H): raw dot products of the R most
  recent queries (post-RoPE), summed over queries and heads (the released code's ``fusion="sum"``), no
  softmax. The kept Top-C keys are re-aligned like the sinks (the paper's "temporal RoPE unification").
  After a compression the cache holds S + C + R tokens and refills to the budget before the next one, so
  compression runs once every ``budget − S − C − R`` tokens (the paper: 21 → 16 frames).

So every kept key is laid out contiguously before the newest token and queries keep their positions: no
relative distance ever exceeds the budget, which is what lets the model run past its trained context. The
selection is shared by all heads (ϕ sums over heads).

Departures: frames become tokens (one "frame" = one token; the default fractions follow the paper's frame
counts). The video code rotates only the temporal third of RoPE channels; a text LM has 1-D RoPE, so all
channels rotate. The paper runs PC only at the first diffusion step; an LM has no diffusion steps, so PC runs
whenever the window is full.
"""

from __future__ import annotations

import math

import torch

from prunekit.errors import InputError
from prunekit.inference.kv.engine import Policy, View, check_budget, check_fraction

__all__ = ["DeepForcing"]


class DeepForcing(Policy):
    name = "deep_forcing"

    def __init__(self, *, budget: int, sinks: float = 0.5, recent: float = 0.2, topc: float = 0.1):
        check_budget(budget, name=self.name, minimum=4)
        self.sinks = int(round(check_fraction(sinks, what="sinks (fraction of the budget)") * budget))
        self.recent = max(1, int(round(check_fraction(recent, what="recent (fraction of the budget)") * budget)))
        self.topc = int(round(check_fraction(topc, what="topc (fraction of the budget)") * budget))
        if self.sinks + self.recent + self.topc >= budget:
            raise InputError(f"deep_forcing: sinks + recent + topc = {self.sinks + self.recent + self.topc} tokens leaves no "
                             f"room in a budget of {budget}; lower the fractions (defaults 0.5, 0.2, 0.1)")
        super().__init__(budget=budget)
        self.query_window = self.recent

    def target(self, budget: int) -> int:
        return self.sinks + self.topc + self.recent

    def score(self, view: View) -> torch.Tensor:
        n, (b, hkv) = view.n, view.state.orig.shape[:2]
        queries = view.state.queries[:, :, -self.recent:].float()  # [B, Hq, r, d]
        hq, d = queries.shape[1], queries.shape[-1]
        qsum = queries.sum(2).view(b, hkv, view.groups, d).sum(2)  # [B, Hkv, d]: Σ_r Σ_(h in group) q
        phi = (view.keys.float() @ qsum[..., None]).squeeze(-1).sum(1) / (math.sqrt(d) * hq)  # [B, n]
        scores = phi[:, None, :].expand(b, hkv, n).clone()  # [B, Hkv, n], the same for every head
        scores[..., : self.sinks] = float("inf")
        scores[..., n - self.recent:] = float("inf")
        return scores

    def reposition(self, view: View, keep_pos: torch.Tensor) -> torch.Tensor:
        m = keep_pos.shape[-1]
        last = keep_pos[..., -1:]  # [B, Hkv, 1]: the newest token keeps its position
        return last - (m - 1) + torch.arange(m, device=keep_pos.device)  # contiguous, ending at the newest
