"""Full cache: the baseline every policy is compared with. Nothing is scored or evicted; the cache grows by one
entry per token. Going through the engine (instead of no context at all) costs only the bookkeeping, and its
output is bitwise identical to the model's own forward (tested).
"""

from __future__ import annotations

from prunekit.inference.kv.engine import Policy, check_budget

__all__ = ["FullCache"]


class FullCache(Policy):
    """Full cache: the baseline every policy is compared with; nothing is scored or evicted."""
    name = "full"
    compresses = False

    def __init__(self, *, budget: int | None = None):
        if budget is not None:  # a budget means nothing here; accepted (when valid) so callers can loop over policies
            check_budget(budget, name=self.name)
        super().__init__(budget=None)
