"""What every depth method shares: the `DepthTarget`, block gates, keep-masks over layers, N:M groups.

A depth method decides which whole blocks of a stack to keep. It needs three things from a model, which a
`DepthTarget` gives without naming the architecture:

- ``blocks``: the ``nn.ModuleList`` of blocks, in order (decoder layers of a causal LM, DiT blocks);
- ``batches``: calibration / training batches (a list; training cycles through it);
- ``loss(model, batch) -> scalar``: the task loss (next-token cross-entropy for a causal LM, noise-prediction
  MSE for a diffusion transformer); optional ``distill(student, teacher, batch) -> scalar`` for recovery by
  knowledge distillation, and ``blocks_only(model, batch)``, a forward through the blocks without the head and
  loss (a causal LM's base model: ShortGPT's block influence needs nothing after the blocks).

A gate wraps a block so that ``x <- m * block(x, ...) + (1 - m) * x`` with ``m`` a number or one value per
sample (TinyFusion's gating). A block may return a tensor or a tuple whose first item is the hidden state
(Hugging Face decoder layers); the gate returns the same kind. With ``m`` a hard 0 the block is skipped.

>>> import torch
>>> from torch import nn
>>> blocks = nn.ModuleList([nn.Linear(4, 4) for _ in range(3)])
>>> with gates(blocks) as g:
...     g[1].gate = 0.0
...     x = torch.randn(2, 4)
...     y = g[1](x)
>>> bool(torch.equal(x, y)), type(blocks[1]).__name__
(True, 'Linear')
"""

from __future__ import annotations

import contextlib
import itertools
import math
from dataclasses import dataclass
from numbers import Integral
from typing import Any, Callable, Sequence

import torch
from torch import nn

from prunekit.errors import InputError, int_at_least

__all__ = [
    "DepthTarget", "GatedBlock", "gates", "causal_lm_target", "parse_groups", "balanced_groups", "group_options",
    "check_keep", "keep_top", "batch_size_of", "hidden_of", "drop_blocks",
]


@dataclass
class DepthTarget:
    """A stack of blocks, the data to judge it on and the loss that judges it (see the module docstring)."""

    model: nn.Module
    blocks: nn.ModuleList
    batches: Sequence[Any]
    loss: Callable[[nn.Module, Any], torch.Tensor]
    distill: Callable[[nn.Module, nn.Module, Any], torch.Tensor] | None = None
    # optional: runs the blocks on a batch and stops there (no head, no loss); `block_influence` needs only that
    blocks_only: Callable[[nn.Module, Any], Any] | None = None

    def __post_init__(self):
        if not isinstance(self.blocks, nn.ModuleList) or len(self.blocks) < 2:
            raise InputError("a DepthTarget needs an nn.ModuleList of at least 2 blocks")
        if len(self.batches) == 0:
            raise InputError("a DepthTarget needs at least one calibration batch; give calibration data")

    @property
    def depth(self) -> int:
        return len(self.blocks)


def batch_size_of(batch) -> int:
    """Samples in a batch: a tensor's first dimension, or that of the first tensor in a tuple/list/dict."""
    if isinstance(batch, torch.Tensor):
        return batch.shape[0]
    items = batch.values() if isinstance(batch, dict) else batch
    for item in items:
        if isinstance(item, torch.Tensor):
            return item.shape[0]
    raise InputError("a batch must be a tensor or hold one (tuple, list or dict of tensors)")


def hidden_of(out) -> torch.Tensor:
    """The hidden state a block returned (a tensor, or the first item of a tuple)."""
    return out[0] if isinstance(out, (tuple, list)) else out


class GatedBlock(nn.Module):
    """``x <- m * block(x, ...) + (1 - m) * x``; ``gate`` None means m = 1 (the plain block).

    ``gate`` may be a float or a tensor ``[batch]`` (one gate per sample, broadcast over the other dimensions).
    The first positional argument (or ``hidden_states``) is the block's input ``x``.
    """

    def __init__(self, block: nn.Module):
        super().__init__()
        self.block = block
        self.gate: float | torch.Tensor | None = None
        self.tuple_output: bool | None = None  # whether the block returns a tuple (a skip returns the same kind)

    def __getattr__(self, name):  # the model may read attributes of its layers (attention_type, ...)
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("block"), name)

    def forward(self, *args, **kwargs):
        x = args[0] if args else kwargs["hidden_states"]  # [b, ...]
        m = self.gate
        if m is None or (not isinstance(m, torch.Tensor) and m == 1):
            return self.block(*args, **kwargs)
        if not isinstance(m, torch.Tensor) and m == 0:  # a hard skip: the block is not run at all
            if self.tuple_output is None:  # never ran: learn what kind of output the block gives
                self.tuple_output = isinstance(self.block(*args, **kwargs), (tuple, list))
            return (x,) if self.tuple_output else x
        out = self.block(*args, **kwargs)
        self.tuple_output = isinstance(out, (tuple, list))
        h = hidden_of(out)  # [b, ...]
        if isinstance(m, torch.Tensor) and m.dim() == 1:
            m = m.to(h.device, h.dtype).view(-1, *([1] * (h.dim() - 1)))  # [b, 1, ...]
        new = m * h + (1 - m) * x
        return (new, *out[1:]) if isinstance(out, (tuple, list)) else new


@contextlib.contextmanager
def gates(blocks: nn.ModuleList):
    """Wrap every block of `blocks` in a `GatedBlock` (in place) for the duration; yields the gates."""
    wrapped = [GatedBlock(b) for b in blocks]
    originals = list(blocks)
    for i, g in enumerate(wrapped):
        blocks[i] = g
    try:
        yield wrapped
    finally:
        for i, b in enumerate(originals):
            blocks[i] = b


# masks one group may enumerate: C(22, 11) = 705,432 is a 62 MB float32 mask table; C(30, 13) = 119,759,850 did
# not fit
MAX_GROUP_OPTIONS = 1_000_000
# the most masks of the default's uniform N:M (C(16, 8) = 12,870); past it the default is `balanced_groups`,
# whose logits a few hundred steps can still learn (9 of 19 blocks is one 9:19 group of 92,378 masks)
DEFAULT_GROUP_OPTIONS = 20_000
BALANCED_GROUP_SIZE = 6  # blocks per group of that default


def _group_text(groups) -> str:
    """"1:2" for a uniform list, else "2:6,3:6,...": the form --group takes."""
    if len(set(groups)) == 1:
        (n, m), = set(groups)
        return f"{n}:{m}"
    return ",".join(f"{n}:{m}" for n, m in groups)


def balanced_groups(depth: int, kept: int, size: int | None = None) -> list[tuple[int, int]]:
    """Consecutive groups of about `size` blocks (ceil(depth / size) of them, at most `kept`), each keeping its
    share of `kept`: one block each, the rest spread over the groups' other blocks by cumulative rounding down
    (13 of 30 -> 2:6,3:6,2:6,3:6,3:6). Every group keeps 1 to M."""
    size = BALANCED_GROUP_SIZE if size is None else int_at_least(size, "size (blocks per group)", 1)
    count = max(1, min(kept, math.ceil(depth / size)))
    ends = [depth * (i + 1) // count for i in range(count)]
    sizes = [e - s for s, e in zip([0, *ends], ends)]
    spare, room = kept - count, depth - count  # blocks kept beyond one a group, and room for them
    reach = list(itertools.accumulate(m - 1 for m in sizes))
    extra = [spare * r // room if room else 0 for r in reach]
    return [(1 + e - s, m) for s, e, m in zip([0, *extra], extra, sizes)]


def parse_groups(groups: str | Sequence[tuple[int, int]] | None, *, depth: int, kept: int) -> list[tuple[int, int]]:
    """Local groups of consecutive blocks as ``[(n, m)]`` (n kept of every m), covering all `depth` blocks.

    `groups` is ``"N:M"`` (repeated depth / M times), ``"N:M,N:M,..."`` (in order) or a list of pairs; None
    picks the smallest uniform pattern with ``depth / M`` groups that keeps `kept` (15 of 30 -> 1:2, 20 of
    30 -> 2:3), or, where that group has more than `DEFAULT_GROUP_OPTIONS` masks (13 of 30 has only 13:30),
    `balanced_groups` (13 of 30 -> 2:6,3:6,2:6,3:6,3:6). A group of more than `MAX_GROUP_OPTIONS` is refused.
    """
    int_at_least(depth, "depth (number of blocks)", 1)
    if isinstance(kept, bool) or not isinstance(kept, Integral) or not 1 <= kept <= depth:
        raise InputError(f"--layers (blocks kept) must be an integer from 1 to the {depth} blocks, got {kept!r}")
    depth, kept = int(depth), int(kept)
    if groups is None:
        g = math.gcd(depth, kept)
        if math.comb(depth // g, kept // g) <= DEFAULT_GROUP_OPTIONS:
            return [(kept // g, depth // g)] * g
        return balanced_groups(depth, kept)
    if isinstance(groups, str):
        pairs = []
        for part in groups.split(","):
            n, sep, m = part.strip().partition(":")
            try:
                pairs.append((int(n), int(m)))
            except ValueError:
                raise InputError(f"group {part.strip()!r} must look like N:M (keep N of every M blocks), e.g. 1:2") from None
            if not sep:
                raise InputError(f"group {part.strip()!r} must look like N:M (keep N of every M blocks), e.g. 1:2")
        if len(pairs) == 1:
            n, m = pairs[0]
            if m < 1 or depth % m:
                raise InputError(f"group size {m} does not divide the {depth} blocks; choose M among "
                                 f"{[d for d in range(1, depth + 1) if depth % d == 0]}")
            pairs = pairs * (depth // m)
        groups = pairs
    groups = [(int(n), int(m)) for n, m in groups]
    for n, m in groups:
        if m < 1 or not 1 <= n <= m:
            raise InputError(f"group {n}:{m} must keep between 1 and M blocks of M >= 1")
    if sum(m for _, m in groups) != depth:
        raise InputError(f"the groups cover {sum(m for _, m in groups)} blocks but the model has {depth}; "
                         "their sizes M must add up to the number of blocks")
    if sum(n for n, _ in groups) != kept:
        raise InputError(f"the groups keep {sum(n for n, _ in groups)} blocks but --layers asks for {kept}")
    for n, m in groups:
        if math.comb(m, n) > MAX_GROUP_OPTIONS:
            raise InputError(f"group {n}:{m} has {math.comb(m, n):,} masks to enumerate, more than the "
                             f"{MAX_GROUP_OPTIONS:,} prunekit learns logits over; split it into smaller groups, "
                             f"e.g. --group {_group_text(balanced_groups(depth, kept))}")
    return groups


def group_options(n: int, m: int) -> torch.Tensor:
    """Every binary mask of m slots with exactly n ones, ``[C(m, n), m]`` float, in lexicographic order of the
    kept positions (1:2 -> [[1, 0], [0, 1]]; 2:3 -> [[1, 1, 0], [1, 0, 1], [0, 1, 1]])."""
    m = int_at_least(m, "group size M", 1)
    if isinstance(n, bool) or not isinstance(n, Integral) or not 1 <= n <= m:
        raise InputError(f"a group must keep between 1 and its M = {m} blocks, got N = {n!r}")
    if math.comb(m, n) > MAX_GROUP_OPTIONS:
        raise InputError(f"group {n}:{m} has {math.comb(m, n):,} masks, more than {MAX_GROUP_OPTIONS:,}; use smaller "
                         "groups")
    combos = list(itertools.combinations(range(m), n))
    out = torch.zeros(len(combos), m)  # [options, m]
    for row, kept in enumerate(combos):
        out[row, list(kept)] = 1.0
    return out


def check_keep(keep: Sequence[bool] | torch.Tensor, depth: int) -> list[bool]:
    values = keep.tolist() if isinstance(keep, torch.Tensor) else list(keep)
    if not all(isinstance(k, bool) or k in (0, 1) for k in values):  # [0, 2, 3] was read as a mask
        raise InputError(f"the keep-mask must hold one True/False per block, got {values!r}; to keep blocks by "
                         "index, build the mask: [i in kept for i in range(depth)]")
    keep = [bool(k) for k in values]
    if len(keep) != depth:
        raise InputError(f"the keep-mask has {len(keep)} entries but there are {depth} blocks")
    if not any(keep):
        raise InputError("the keep-mask keeps no block; keep at least one")
    return keep


def check_kept(kept: int, depth: int) -> int:
    int_at_least(kept, "layers (blocks kept)", 1)
    if depth < 2:  # "give a number below 1" could not be followed
        raise InputError(f"the model has {depth} block; depth pruning keeps at least 1 and drops at least 1, so it "
                         "needs 2 or more")
    if kept >= depth:
        raise InputError(f"keeping {kept} blocks (--layers / kept=) keeps every block (the model has {depth}); give a "
                         f"number below {depth}")
    return kept


def keep_top(scores: torch.Tensor, kept: int, *, protect: Sequence[int] = ()) -> list[bool]:
    """Keep the `kept` blocks with the highest `scores` (ties: the earlier block); `protect` always kept.

    A NaN score (a block whose outputs or removal loss overflowed, or NaN weights) is an `InputError`: it cannot
    be ranked, and a sort with it in would misorder every other block too."""
    scores = scores.clone().double()  # [depth]
    for i in protect:
        scores[i] = math.inf
    bad = torch.isnan(scores).nonzero().flatten().tolist()
    if bad:
        raise InputError(f"the block scores of block(s) {bad} are NaN, so the blocks cannot be ranked; the "
                         f"calibration run overflowed or the weights hold NaN: load the model in float32 and "
                         f"check its weights")
    order = sorted(range(len(scores)), key=lambda i: (-float(scores[i]), i))
    chosen = set(order[:kept])
    return [i in chosen for i in range(len(scores))]


def drop_blocks(blocks: nn.ModuleList, keep: Sequence[bool]) -> nn.ModuleList:
    """Keep only the blocks where `keep` is True, in place (the same ModuleList object); returns it."""
    keep = check_keep(keep, len(blocks))
    kept = [b for b, k in zip(blocks, keep) if k]
    for i in range(len(blocks) - 1, -1, -1):
        del blocks[i]
    for b in kept:
        blocks.append(b)
    return blocks


def causal_lm_target(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4) -> DepthTarget:
    """A `DepthTarget` for a Hugging Face causal LM: calibration windows `ids` ``[n, seqlen]`` in batches of
    `batch_size`, loss = next-token cross-entropy, distillation = KL(teacher || student) per token."""
    from prunekit.weights.engine import find_blocks, input_device

    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 1:
        raise InputError("calibration ids must be a [samples, seqlen] tensor with at least one sample; give calibration text")
    if ids.dtype not in (torch.long, torch.int) or ids.shape[1] < 2:  # torch and transformers failed later
        raise InputError(f"calibration ids must be integer token ids [samples, seqlen >= 2], got {ids.dtype} "
                         f"{tuple(ids.shape)}")
    from prunekit.text import check_token_ids

    check_token_ids(model, ids, what="calibration ids")
    ids = ids.long()
    int_at_least(batch_size, "batch_size", 1)
    _, blocks = find_blocks(model)
    ids = ids.to(input_device(model))  # a model on a GPU is scored there
    batches = [ids[i : i + batch_size] for i in range(0, ids.shape[0], batch_size)]

    def loss(m: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        return m(input_ids=batch, labels=batch, use_cache=False).loss

    def distill(student: nn.Module, teacher: nn.Module, batch: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            t = teacher(input_ids=batch, use_cache=False).logits.float()  # [b, seq, vocab]
        s = student(input_ids=batch, use_cache=False).logits.float()  # [b, seq, vocab]
        return torch.nn.functional.kl_div(s.log_softmax(-1).flatten(0, 1), t.log_softmax(-1).flatten(0, 1),
                                          log_target=True, reduction="batchmean")

    def blocks_only(m: nn.Module, batch: torch.Tensor):  # the base model: no 49k-vocabulary logits, no loss
        return getattr(m, "base_model", m)(input_ids=batch, use_cache=False)  # (a wrapper without one: the whole)

    return DepthTarget(model, blocks, batches, loss, distill, blocks_only)
