"""Deep Forcing on a streaming language model: Deep Sink plus Participative Compression.

Paper: Yi, Jang, Cho, Nam, Yoon, Kim, "Deep Forcing: Training-Free Long Video Generation with Deep Sink and
Participative Compression", arXiv 2512.05081 (project: cvlab-kaist.github.io/DeepForcing). The paper works on
a chunk-wise autoregressive video model (Self Forcing on Wan2.1); here its two mechanisms drive a text LM's
KV cache, as the issue asks.

- **Deep Sink.** A large share of the window, ``sinks`` (default 0.5 of the budget; the paper keeps 10 of 21
  frames and reports 40-60% works), is kept for good: the first tokens of the stream. At every compression
  their RoPE phase is re-aligned so that they sit immediately before a contiguous tail as long as the rest of
  the kept cache, ending at the newest token: only the sink keys are rotated (by Δ = new position − old
  position, `engine.rotate_keys`), as the released code does (it counts the tail up to the chunk being generated;
  here the tail ends at the newest token).
- **Participative Compression (PC).** When the window (``budget`` tokens) is full, keep
  sinks ∪ Top-C ∪ recent, in temporal order, and evict the rest. ``recent``: the last R tokens (default 0.2 of
  the budget; paper: 4 of 21 frames). Top-C: the ``topc`` (default 0.1 of the budget; paper: 2 of 21) middle
  tokens with the largest ϕ_j = Σ_{r ∈ recent} Σ_h q_{r,h}·k_{j,h} / (√d·H): raw dot products of the R most
  recent queries (post-RoPE), summed over queries and heads (the released code's ``fusion="sum"``), no
  softmax. A token may be picked as Top-C at most ``max_reuse`` times (the released wrapper's
  ``topc_max_reuse=7``; 0: no limit); when fewer than C candidates are under the limit, the best of the others
  fill the quota (the reference then keeps fewer tokens).
  After a compression the cache holds S + C + R tokens and refills to the budget before the next one, so
  compression runs once every ``budget − S − C − R`` tokens (the paper: 21 → 16 frames).
- **Top-C positions** (``topc_rope``). The paper's text also moves the Top-C keys next to the tail ("temporal
  RoPE unification", ``"unify"``: every kept key laid out contiguously before the newest token). The released
  code does not: its Top-C relocation slice is empty in the released configuration, so Top-C and recent keys
  keep the phases they were cached with (``"keep"``, the default, and what the issue asks: "rotating only the
  sink keys").

What each choice does on text (SmolLM2-135M, 16k tokens of Pride and Prejudice streamed in 64-token chunks
through a 256-token window; StreamingLLM 22.78; `bench/kv_vs_kvpress.py` and its README section): the reuse
limit matters most. Without it a token the recent queries like is picked at every compression and never
leaves; with ``"unify"`` it is also moved next to the newest text each time. At the paper's fractions:
``"unify"`` without a limit 25.60, ``"keep"`` without a limit 24.40, with the limit 23.80 (unify) / 23.95 (keep).
The deep sink is the other cost: half the window spent on the book's first tokens. With sinks 0.02, recent
0.5, Top-C 0.45: 22.31 (keep, no limit), 22.26 (unify, limit 7).

Queries keep their positions, and the newest token keeps its own. The selection is shared by all heads
(ϕ sums over heads). With ``"keep"`` a Top-C key is as far from the queries as it really is, so the reuse limit
also bounds that distance (past ``max_reuse`` picks a token stays only when too few others are left); with
``max_reuse=0`` a token can stay until its distance passes the model's trained context. ``"unify"`` keeps
every distance within the budget.

Departures: frames become tokens (one "frame" = one token; the default fractions follow the paper's frame
counts). The video code rotates only the temporal third of RoPE channels; a text LM has 1-D RoPE, so all
channels rotate. The paper runs PC only at the first diffusion step; an LM has no diffusion steps, so PC runs
whenever the window is full.
"""

from __future__ import annotations

import math

import torch

from prunekit.errors import InputError, int_at_least
from prunekit.inference.kv.engine import Policy, View, check_budget, check_fraction

__all__ = ["DeepForcing", "TOPC_ROPE"]

TOPC_ROPE = ("keep", "unify")


class DeepForcing(Policy):
    """Deep Forcing on a streaming language model: Deep Sink plus Participative Compression."""
    name = "deep_forcing"

    def __init__(self, *, budget: int, sinks: float = 0.5, recent: float = 0.2, topc: float = 0.1,
                 max_reuse: int = 7, topc_rope: str = "keep"):
        check_budget(budget, name=self.name, minimum=4)
        self.sinks = int(round(check_fraction(sinks, what="sinks (fraction of the budget)") * budget))
        self.recent = max(1, int(round(check_fraction(recent, what="recent (fraction of the budget)") * budget)))
        self.topc = int(round(check_fraction(topc, what="topc (fraction of the budget)") * budget))
        if self.sinks + self.recent + self.topc >= budget:
            raise InputError(f"deep_forcing: sinks + recent + topc = {self.sinks + self.recent + self.topc} tokens leaves no "
                             f"room in a budget of {budget}; lower the fractions (defaults 0.5, 0.2, 0.1)")
        self.max_reuse = int_at_least(max_reuse, "max_reuse (times a token may be picked as Top-C; 0: no limit)", 0)
        if topc_rope not in TOPC_ROPE:
            raise InputError(f"deep_forcing: topc_rope must be one of {', '.join(TOPC_ROPE)}, got {topc_rope!r}")
        self.topc_rope = topc_rope
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
        lo, hi = self.sinks, n - self.recent  # the Top-C candidates: [lo, hi)
        if self.max_reuse and self.topc and hi > lo:
            if "topc_uses" not in view.state.extras:  # times each entry was picked; the engine keeps it aligned
                view.state.extras["topc_uses"] = torch.zeros(b, hkv, n, device=phi.device)
            uses = view.state.extras["topc_uses"]
            mid = phi[:, lo:hi]
            spent = uses[:, 0, lo:hi] >= self.max_reuse  # the same for every head
            # tokens at the limit rank below every other candidate, in their own ϕ order
            phi[:, lo:hi] = torch.where(spent, mid - (mid.max() - mid.min() + 1), mid)
            picked = phi[:, lo:hi].topk(min(self.topc, hi - lo), dim=-1).indices + lo  # [B, C]
            uses.scatter_add_(2, picked[:, None].expand(b, hkv, -1), uses.new_ones(1).expand(b, hkv, picked.shape[-1]))
        scores = phi[:, None, :].expand(b, hkv, n).clone()  # [B, Hkv, n], the same for every head
        scores[..., :lo] = float("inf")
        scores[..., hi:] = float("inf")
        return scores

    def reposition(self, view: View, keep_pos: torch.Tensor) -> torch.Tensor:
        m = keep_pos.shape[-1]
        last = keep_pos[..., -1:]  # [B, Hkv, 1]: the newest token keeps its position
        if self.topc_rope == "unify":
            return last - (m - 1) + torch.arange(m, device=keep_pos.device)  # contiguous, ending at the newest
        s = min(self.sinks, m - 1)
        new = keep_pos.clone()
        new[..., :s] = last - (m - 1) + torch.arange(s, device=keep_pos.device)  # before a tail of m - s tokens
        return new
