"""LoRA adapters for any `nn.Linear`: add, train, merge into the weights or throw away.

Hu et al. 2021, "LoRA: Low-Rank Adaptation of Large Language Models" (https://arxiv.org/abs/2106.09685):
a frozen Linear ``y = W x`` becomes ``y = W x + (alpha / r) * B (A dropout(x))`` with ``A`` [r, in] and ``B``
[out, r]; ``B`` starts at zero so the adapted model starts equal to the base model. Initialisation follows
peft's default (``A`` Kaiming-uniform with a = sqrt(5), ``B`` zeros), drawn from a seeded generator so the
same seed gives the same adapters.

Used where prunekit trains a causal LM cheaply: depth pruning's recoverability estimate and recovery
(TinyFusion), and supervised fine-tuning on pruned data (Q-Tuning).

>>> import torch
>>> from torch import nn
>>> net = nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))
>>> names = add_lora(net, rank=2, seed=0)
>>> names
['0', '2']
>>> x = torch.randn(3, 4)
>>> y0 = net(x)
>>> with torch.no_grad():
...     _ = net[0].lora_b.add_(0.1)
>>> y1 = net(x)
>>> merged = merge_lora(net)
>>> bool(torch.allclose(merged(x), y1, atol=1e-6))
True
"""

from __future__ import annotations

import fnmatch
import math

import torch
from torch import nn

from prunekit.errors import InputError, int_at_least

__all__ = ["has_linear", "LoRALinear", "add_lora", "merge_lora", "remove_lora", "lora_parameters"]


class LoRALinear(nn.Module):
    """A frozen `base` Linear plus a trainable rank-`rank` update scaled by ``alpha / rank``."""

    def __init__(self, base: nn.Linear, *, rank: int, alpha: float, dropout: float = 0.0,
                 generator: torch.Generator | None = None):
        super().__init__()
        self.base = base
        self.rank = rank
        self.scaling = alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        w = base.weight
        a = torch.empty(rank, w.shape[1], dtype=torch.float32)  # [r, in]
        bound = 1.0 / math.sqrt(w.shape[1])  # kaiming_uniform_(a=sqrt(5)) on fan_in = in
        a.uniform_(-bound, bound, generator=generator)
        self.lora_a = nn.Parameter(a.to(device=w.device, dtype=w.dtype))
        self.lora_b = nn.Parameter(torch.zeros(w.shape[0], rank, device=w.device, dtype=w.dtype))  # [out, r]
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:
        """The base weight (what code that inspects ``.weight`` expects); the update is not folded in."""
        return self.base.weight

    def delta(self) -> torch.Tensor:
        return (self.lora_b @ self.lora_a) * self.scaling  # [out, in]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        update = (self.dropout(x) @ self.lora_a.t()) @ self.lora_b.t()  # [..., out]
        return self.base(x) + update * self.scaling

    def merged(self) -> nn.Linear:
        """A plain Linear whose weight is ``W + (alpha / r) B A``."""
        out = nn.utils.skip_init(nn.Linear, self.base.in_features, self.base.out_features,  # no draw from the
                                 bias=self.base.bias is not None,  # caller's global RNG: overwritten below
                                 device=self.base.weight.device, dtype=self.base.weight.dtype)
        with torch.no_grad():
            out.weight.copy_(self.base.weight + self.delta().to(self.base.weight.dtype))
            if self.base.bias is not None:
                out.bias.copy_(self.base.bias)
        return out


def _replace(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def add_lora(model: nn.Module, *, rank: int = 8, alpha: float = 16.0, dropout: float = 0.0,
             targets: tuple[str, ...] | None = None, exclude: tuple[str, ...] = ("lm_head", "*.lm_head"),
             seed: int = 0) -> list[str]:
    """Wrap every `nn.Linear` of `model` whose name matches a glob in `targets` (default: all) and none in
    `exclude` in a `LoRALinear`, in place; freeze every other parameter. Returns the wrapped names.

    With the default `targets`, a Linear narrower than `rank` (a gate with one output) gets its smaller side as
    its rank (some Linear must be `rank` wide); a Linear named in `targets` must be at least `rank` wide. A
    model that already carries adapters is refused (merge or remove them first); nothing is changed when
    anything is refused."""
    int_at_least(rank, "rank", 1)
    if not (isinstance(alpha, (int, float)) and math.isfinite(alpha) and alpha > 0):
        raise InputError(f"alpha must be a positive number, got {alpha!r}")
    if not (isinstance(dropout, (int, float)) and 0 <= dropout < 1):
        raise InputError(f"dropout must be in [0, 1), got {dropout!r}")
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise InputError("the model already has LoRA adapters; merge_lora or remove_lora first")
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)
             and (targets is None or any(fnmatch.fnmatchcase(n, t) for t in targets))
             and not any(fnmatch.fnmatchcase(n, e) for e in exclude)]
    if not names:
        which = "" if targets is None else f" matching targets={targets!r}"
        raise InputError(f"no nn.Linear{which} to put LoRA on (exclude={exclude!r}); LoRA adapts nn.Linear layers "
                         "only (not GPT-2's Conv1D)")
    ranks = {}
    for n in names:
        base = model.get_submodule(n)
        side = min(base.in_features, base.out_features)
        if side < rank and targets is not None:
            raise InputError(f"rank {rank} exceeds the smaller side of {n} ({base.out_features}x{base.in_features}); "
                             "give a smaller rank")
        ranks[n] = min(rank, side)
    if all(r < rank for r in ranks.values()):
        raise InputError(f"rank {rank} exceeds the smaller side of every Linear LoRA would adapt (the widest: "
                         f"{max(ranks.values())}); give a smaller rank")
    for p in model.parameters():
        p.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    for n in names:
        _replace(model, n, LoRALinear(model.get_submodule(n), rank=ranks[n], alpha=alpha, dropout=dropout,
                                      generator=generator))
    return names


def has_linear(model: nn.Module) -> bool:
    """Whether `model` holds an `nn.Linear` LoRA could adapt."""
    return any(isinstance(m, nn.Linear) for m in model.modules())


def lora_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The adapters' trainable parameters (A and B of every `LoRALinear`), in module order."""
    return [p for m in model.modules() if isinstance(m, LoRALinear) for p in (m.lora_a, m.lora_b)]


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its Linear (``W + (alpha/r) B A``), in place; returns `model`.

    The original Linear goes back with its weight updated, so the caller's hooks on it, references to it and
    to its parameters stay valid; parameters stay frozen as `add_lora` left them. (A weight another module shares,
    a tied embedding or a second adapted Linear, gets a merged copy: the other module keeps the weight it had.)"""
    adapters = [(n, m) for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    owners: dict[int, int] = {}  # modules holding each parameter: a tied embedding shares lm_head's weight
    for module in model.modules():
        for p in module.parameters(recurse=False):
            owners[id(p)] = owners.get(id(p), 0) + 1
    for n, m in adapters:
        if owners[id(m.base.weight)] > 1:
            _replace(model, n, m.merged())
            continue
        with torch.no_grad():
            m.base.weight.add_(m.delta().to(m.base.weight.dtype))
        _replace(model, n, m.base)
    return model


def remove_lora(model: nn.Module) -> nn.Module:
    """Drop every adapter and put the original Linear back, untouched, in place; returns `model`.

    Parameters stay frozen as `add_lora` left them; call ``model.requires_grad_(True)`` to train all of them."""
    for n, m in list(model.named_modules()):
        if isinstance(m, LoRALinear):
            _replace(model, n, m.base)
    return model
