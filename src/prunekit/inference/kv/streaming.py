"""StreamingLLM: attention sinks plus a recent window.

Paper: Xiao, Tian, Chen, Han, Lewis, "Efficient Streaming Language Models with Attention Sinks", ICLR 2024,
https://arxiv.org/abs/2309.17453 (code: mit-han-lab/streaming-llm, ``StartRecentKVCache``).

Rule: keep the first ``sinks`` tokens (default 4) and the most recent ``budget - sinks`` tokens; evict the
middle. Positions (paper §3.2): RoPE positions are assigned *within the cache*, not from the original text:
after every eviction the kept keys are re-rotated to contiguous positions 0..m-1 and the next token gets
position m, so no query is ever further than ``budget + every - 1`` positions (the most the cache holds between
compressions) from any key it sees, which is what lets the model stream far past its trained context.

Departures: the reference stores keys before RoPE and rotates the whole cache at every step; we store RoPE'd
keys and rotate only the kept keys whose position changed, by the change (`engine.rotate_keys`); the result is
the same up to float rounding. A prompt longer than the budget is first processed whole (full attention at its
original positions, as one prefill) and then cut to the budget; the reference feeds long inputs token by token.
kvpress's ``StreamingLLMPress`` keeps original positions (no re-rotation; its issue #158); we follow the paper.
"""

from __future__ import annotations

import torch

from prunekit.errors import int_at_least
from prunekit.inference.kv.engine import Policy, View, check_budget

__all__ = ["StreamingLLM"]


class StreamingLLM(Policy):
    """StreamingLLM: attention sinks plus a recent window."""
    name = "streaming_llm"

    def __init__(self, *, budget: int, sinks: int = 4):
        self.sinks = int_at_least(sinks, "sinks", 0)
        super().__init__(budget=check_budget(budget, name=self.name, minimum=self.sinks + 1))

    def score(self, view: View) -> torch.Tensor:
        n, keep_recent = view.n, self.target(view.budget) - self.sinks
        idx = torch.arange(n, device=view.keys.device)
        keep = (idx < self.sinks) | (idx >= n - keep_recent)  # [n]
        return keep.float().expand(*view.state.orig.shape)  # [B, Hkv, n]

    def reposition(self, view: View, keep_pos: torch.Tensor) -> torch.Tensor:
        m = keep_pos.shape[-1]
        return torch.arange(m, device=keep_pos.device).expand_as(keep_pos)  # positions within the cache
