"""Knorm: keep the keys of lowest L2 norm.

Paper: Devoto, Zhao, Scardapane, Minervini, "A Simple and Effective L2 Norm-Based Strategy for KV Cache
Compression", EMNLP 2024, https://arxiv.org/abs/2406.11430 (code: alessiodevoto/l2compress, ``l2_compress``;
kvpress ``KnormPress``).

Rule: a key of low L2 norm tends to receive high attention, so each KV head keeps the ``budget`` entries of
lowest ``||k||_2`` and evicts the rest. No attention weights are needed, so the model's own attention (sdpa,
flash) stays on. RoPE rotates pairs of coordinates, so the norm is the same before and after it. Original
positions.

Departures: the reference compresses a finished prefill by a ratio (``keep_ratio``) and leaves the cache alone
while decoding; kvpress's ``KnormPress`` does the same (``DecodingPress`` wraps it for decoding). prunekit's
engine also applies it when decoding pushes the cache over the budget, as for every policy, so a newly decoded
token of high norm may be evicted once the next compression comes (``every`` steps later). The reference's
``skip_layers`` (layers left uncompressed, [0, 1] in its README) is not an option: every layer is compressed to
the budget here, as kvpress does (between compressions it holds up to ``budget + every - 1`` tokens).
"""

from __future__ import annotations

import torch

from prunekit.inference.kv.engine import Policy, View, check_budget

__all__ = ["Knorm"]


class Knorm(Policy):
    """Knorm: keep the keys of lowest L2 norm."""
    name = "knorm"

    def __init__(self, *, budget: int):
        super().__init__(budget=check_budget(budget, name=self.name, minimum=1))

    def score(self, view: View) -> torch.Tensor:
        # fp32 norms so that half-precision keys do not tie distinct positions
        return -torch.linalg.vector_norm(view.keys, dim=-1, dtype=torch.float32)  # [B, Hkv, n]
