"""TRP: Trained Rank Pruning, low-rank convolutions learned during training.

Paper: Yuhui Xu, Yuxi Li, Shuai Zhang, Wei Wen, Botao Wang, Yingyong Qi, Yiran Chen, Weiyao Lin, Hongkai Xiong,
"Trained Rank Pruning for Efficient Deep Neural Networks", IJCAI 2020, arXiv:1812.02402 / arXiv:2004.14566.
Reference code: github.com/yuhuixu1993/Trained-Rank-Pruning (``cifar-TRP.py``, ``decompose.py``).

A conv weight ``W [N, C, kh, kw]`` is read as a matrix in one of two ways:

    channel (TRP1, Zhang et al.):   M = W.reshape(N, C*kh*kw)                     -> conv kh x kw (C -> r), conv 1x1 (r -> N)
    spatial (TRP2, Jaderberg et al.): M = W.permute(1, 2, 0, 3).reshape(C*kh, N*kw) -> conv kh x 1 (C -> r), conv 1 x kw (r -> N)

With ``M = U S V^T`` (singular values descending), the rank kept is the smallest ``r`` with
``sum_{j<=r} s_j^2 / sum_j s_j^2 >= e`` (energy threshold, default e = 0.9). Training (`TRP`):

    every m optimizer steps t (t % m == 0), before the forward pass:
        for each eligible W:  W <- reshape^-1(U_r S_r V_r^T)          (low-rank substitution)
    after that step's backward pass:
        W.grad += lambda * reshape^-1(U_r V_r^T)                      (sub-gradient of lambda * ||M||_*)
    at the end: decompose each eligible conv into two thinner convs through sqrt(S) on each side.

Between substitutions the weights drift off the low-rank manifold and the next substitution pulls them back,
so the network learns to live with ranks that keep falling while the loss allows (the paper's Fig. 1).
Eligible layers (as in the reference's ``get_look_up_table``): every ``nn.Conv2d`` with a kernel larger than
1x1 and ``groups == 1``, except the first such convolution (the stem); the final Linear is not touched.

Departures from the reference code, and why:
- The period counts optimizer steps over the whole run; the reference uses ``batch_idx % m``, which restarts
  every epoch (the same thing when m divides the steps per epoch).
- The nuclear sub-gradient is the truncated ``U_r V_r^T`` at the substitution steps, as the research notes
  describe the TRP scripts; the repository's ``nuclear_regularize`` (full-rank ``U V^T`` at every step) is a
  separate script and not what TRP does.
- Decomposition works for any stride, padding and dilation (the reference decomposes stride-1 convs only and
  hard-codes padding 1): the first factor keeps the stride/padding/dilation of its axis, the second the other.
- The final ranks default to those of the last substitution (the weights were exactly that rank a few steps
  earlier); the reference picks them with a value threshold (keep ``s_j >= 0.05``), which `decompose` also
  offers (``value=``), as it offers a fresh energy threshold (``energy=``).
- The baseline (`energy_for_flops`): a normally trained network decomposed with one energy threshold for all
  layers, found by bisection so that the whole network's FLOPs do not exceed a budget (e.g. TRP's).
- `split_where_faster` (not in the paper): FLOPs are not CPU time. A split whose thin convs run slower than
  the whole conv (few channels on a large map) is fused back into one conv holding the same rank-r weight, so
  the network computes the same function at its best measured speed on the machine it is timed on.

>>> from prunekit.cnn.resnet import ResNet
>>> model = ResNet(widths=(8, 16, 32))
>>> trp = TRP(model, period=10, energy=0.9, nuclear=3e-4)
>>> trp.on_batch_start(0, model); len(trp.ranks)  # every 3x3 conv but the stem
18
>>> ranks = decompose(model, energy=0.9)
"""

from __future__ import annotations

import functools
import math
from numbers import Integral, Real

import torch
from torch import nn

from prunekit.errors import InputError, module_modes, restore_modes

__all__ = [
    "SCHEMES", "TRP", "LowRankConv", "eligible_convs", "to_matrix", "from_matrix", "energy_rank", "low_rank",
    "nuclear_subgradient", "decompose_conv", "install_lowrank", "decompose", "energy_for_flops", "fuse_lowrank",
    "fuse_layers", "split_where_faster",
]

SCHEMES = ("channel", "spatial")


def _check_scheme(scheme: str) -> str:
    if scheme not in SCHEMES:
        raise InputError(f"scheme must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    return scheme


def _check_energy(energy, name: str = "energy") -> float:
    if isinstance(energy, bool) or not isinstance(energy, (int, float)) or not 0.0 < float(energy) <= 1.0:
        raise InputError(f"{name} must be a fraction of singular-value energy in (0, 1], got {energy!r}")
    return float(energy)


def to_matrix(w: torch.Tensor, scheme: str) -> torch.Tensor:
    """The matrix a scheme decomposes: channel ``[N, C*kh*kw]``, spatial ``[C*kh, N*kw]``."""
    n, c, kh, kw = w.shape
    if _check_scheme(scheme) == "channel":
        return w.reshape(n, c * kh * kw)
    return w.permute(1, 2, 0, 3).reshape(c * kh, n * kw)


def from_matrix(m: torch.Tensor, shape, scheme: str) -> torch.Tensor:
    """Inverse of `to_matrix`: a weight ``[N, C, kh, kw]``."""
    n, c, kh, kw = shape
    if _check_scheme(scheme) == "channel":
        return m.reshape(n, c, kh, kw)
    return m.reshape(c, kh, n, kw).permute(2, 0, 1, 3).contiguous()


def energy_rank(s: torch.Tensor, energy: float) -> int:
    """Smallest r with ``sum_{j<=r} s_j^2 >= energy * sum_j s_j^2`` (s descending); at least 1."""
    e = s.double() ** 2
    total = float(e.sum())
    if total == 0.0:
        return 1
    cum = torch.cumsum(e, 0)
    r = int((cum < energy * total * (1 - 1e-12)).sum()) + 1
    return max(1, min(r, len(s)))


def low_rank(w: torch.Tensor, *, scheme: str = "channel", energy: float | None = None, rank: int | None = None):
    """Truncated SVD of a conv weight: ``(W_r [N, C, kh, kw], U_r, S_r, Vh_r)`` in the scheme's matrix form."""
    if (energy is None) == (rank is None):
        raise InputError("give exactly one of energy= or rank=")
    m = to_matrix(w.detach().double(), scheme)  # [P, Q]
    u, s, vh = torch.linalg.svd(m, full_matrices=False)  # [P, k], [k], [k, Q]
    r = energy_rank(s, _check_energy(energy)) if rank is None else max(1, min(int(rank), len(s)))
    u, s, vh = u[:, :r], s[:r], vh[:r]
    w_r = from_matrix((u * s) @ vh, w.shape, scheme).to(w.dtype)  # [N, C, kh, kw]
    return w_r, u, s, vh


def nuclear_subgradient(w: torch.Tensor, *, scheme: str = "channel", energy: float = 1.0) -> torch.Tensor:
    """``U_r V_r^T`` shaped like `w`: a sub-gradient of the nuclear norm of `w`'s scheme matrix.

    With ``energy=1.0`` and a full-rank matrix with distinct singular values this is the gradient of
    ``||to_matrix(w)||_*``; TRP uses the truncated factors of its substitution step.
    """
    _, u, _, vh = low_rank(w, scheme=scheme, energy=energy)
    return from_matrix(u @ vh, w.shape, scheme).to(w.dtype)


def eligible_convs(model: nn.Module) -> dict[str, nn.Conv2d]:
    """TRP's layers: every ``nn.Conv2d`` with a kernel larger than 1x1 and groups 1, except the first one."""
    convs = [(n, m) for n, m in model.named_modules()
             if isinstance(m, nn.Conv2d) and m.kernel_size != (1, 1) and m.groups == 1]
    return dict(convs[1:])


def _zero_padded(conv: nn.Conv2d) -> bool:
    """What the decomposition can split: numeric zero padding (not ``padding='same'`` or reflect)."""
    return not isinstance(conv.padding, str) and conv.padding_mode == "zeros"


def _resolve_layers(model: nn.Module, layers) -> dict[str, nn.Conv2d]:
    if layers is None:
        found = eligible_convs(model)
        if not found:  # it trained with nothing to prune, then blamed an empty `layers` the user never gave
            raise InputError("the model has no Conv2d TRP can decompose (kernel > 1x1, groups 1, not the first "
                             "conv); name layers explicitly, or prune this model another way")
        odd = [n for n, m in found.items() if not _zero_padded(m)]
        if odd:
            raise InputError(f"{odd[0]} has padding={found[odd[0]].padding!r}, padding_mode="
                             f"{found[odd[0]].padding_mode!r}; decomposition needs numeric zero padding: pass layers= "
                             "without it")
        return found
    if isinstance(layers, str):  # iterating it named each character
        raise InputError(f"layers must be a list of Conv2d names, e.g. [{layers!r}], got the string {layers!r}")
    mods = dict(model.named_modules())
    out = {}
    for name in layers:
        m = mods.get(name)
        if not isinstance(m, nn.Conv2d) or m.groups != 1:
            raise InputError(f"layer {name!r} is not an ungrouped nn.Conv2d of the model; name Conv2d modules "
                             "as model.named_modules() spells them")
        if not _zero_padded(m):  # found only at the end, with earlier layers already replaced
            raise InputError(f"layer {name!r} has padding={m.padding!r}, padding_mode={m.padding_mode!r}; "
                             "decomposition needs numeric zero padding")
        out[name] = m
    if not out:
        raise InputError("layers is empty; name at least one Conv2d, or pass layers=None for TRP's default")
    return out


class TRP:
    """Trained Rank Pruning as a training callback, for `prunekit.train.train(callbacks=[trp])` or a plain loop.

    ``period`` (m): substitute every m optimizer steps; ``energy`` (e): singular-value energy kept; ``nuclear``
    (lambda): weight of the nuclear-norm sub-gradient (0 turns it off); ``scheme``: "channel" or "spatial";
    ``layers``: Conv2d module names (default: `eligible_convs`). A plain loop::

        trp = TRP(model, period=20)
        for step, (x, y) in enumerate(batches):
            trp.on_batch_start(step)
            loss = F.cross_entropy(model(x), y)
            opt.zero_grad(); loss.backward()
            trp.on_after_backward(step)
            opt.step()
        ranks = trp.decompose()          # the model now holds two thin convs per eligible layer
    """

    def __init__(self, model: nn.Module, *, period: int = 20, energy: float = 0.9, nuclear: float = 3e-4,
                 scheme: str = "channel", layers=None):
        if isinstance(period, bool) or not isinstance(period, int) or period < 1:
            raise InputError(f"period must be a positive integer (substitute every `period` steps), got {period!r}")
        if isinstance(nuclear, bool) or not isinstance(nuclear, (int, float)) or not math.isfinite(nuclear) or nuclear < 0:
            raise InputError(f"nuclear must be a number >= 0 (the nuclear-norm weight lambda), got {nuclear!r}")
        self.model = model
        self.period, self.energy, self.nuclear = period, _check_energy(energy), float(nuclear)
        self.scheme = _check_scheme(scheme)
        self.layers = _resolve_layers(model, layers)
        self.ranks: dict[str, int] = {}
        self.substitutions = 0
        self._sub: dict[str, torch.Tensor] = {}
        self._sub_step = -1

    @torch.no_grad()
    def on_batch_start(self, step: int, model: nn.Module | None = None) -> None:
        """At every `period`-th step: replace each weight by its truncated SVD and keep ``U_r V_r^T``."""
        if step % self.period:
            return
        _check_finite_convs(self.layers, hint=" (training diverged? lower the learning rate)")
        new = {}  # every SVD first, then the copies: a failing SVD left the earlier layers substituted
        for name, conv in self.layers.items():
            w_r, u, _, vh = low_rank(conv.weight, scheme=self.scheme, energy=self.energy)  # [N, C, kh, kw]
            new[name] = (w_r, u, vh)
        for name, (w_r, u, vh) in new.items():
            w = self.layers[name].weight
            w.copy_(w_r)
            self.ranks[name] = int(u.shape[1])
            if self.nuclear:
                self._sub[name] = from_matrix(u @ vh, w.shape, self.scheme).to(w.dtype)  # [N, C, kh, kw]
        self._sub_step = step
        self.substitutions += 1

    @torch.no_grad()
    def on_after_backward(self, step: int, model: nn.Module | None = None) -> None:
        """At a substitution step: ``W.grad += lambda * U_r V_r^T``."""
        if not self.nuclear or step != self._sub_step:
            return
        for name, conv in self.layers.items():
            if conv.weight.grad is not None:
                conv.weight.grad.add_(self._sub[name], alpha=self.nuclear)

    def decompose(self, *, energy: float | None = None, value: float | None = None) -> dict[str, int]:
        """Split every TRP layer into two thin convs, in place; returns ``{name: rank}``.

        Default ranks: those of the last substitution (the weights have only drifted since; before any
        substitution, the energy threshold e). ``energy=`` or ``value=`` choose them afresh instead.
        """
        if energy is None and value is None:
            if self.ranks:
                return decompose(self.model, scheme=self.scheme, ranks=self.ranks)
            energy = self.energy
        return decompose(self.model, layers=list(self.layers), scheme=self.scheme, energy=energy, value=value)


class LowRankConv(nn.Sequential):
    """Two convolutions that compute a rank-r conv: ``first`` (C -> r) then ``second`` (r -> N)."""

    def __init__(self, first: nn.Conv2d, second: nn.Conv2d, scheme: str):
        super().__init__()
        self.first, self.second, self.scheme = first, second, scheme

    @property
    def rank(self) -> int:
        return self.first.out_channels


def _factor_convs(conv: nn.Conv2d, rank: int, scheme: str) -> LowRankConv:
    n, c, kh, kw = conv.weight.shape
    (sh, sw), (dh, dw) = conv.stride, conv.dilation
    if isinstance(conv.padding, str) or conv.padding_mode != "zeros":
        raise InputError(f"decomposition needs numeric zero padding; this conv has padding={conv.padding!r}, "
                         f"padding_mode={conv.padding_mode!r}")
    ph, pw = conv.padding
    bias = conv.bias is not None
    kw_ = dict(device=conv.weight.device, dtype=conv.weight.dtype)
    conv2d = functools.partial(nn.utils.skip_init, nn.Conv2d)  # the caller fills the weights: no global RNG draw
    if scheme == "channel":
        first = conv2d(c, rank, (kh, kw), conv.stride, conv.padding, conv.dilation, bias=False, **kw_)
        second = conv2d(rank, n, 1, bias=bias, **kw_)
    else:
        first = conv2d(c, rank, (kh, 1), (sh, 1), (ph, 0), (dh, 1), bias=False, **kw_)
        second = conv2d(rank, n, (1, kw), (1, sw), (0, pw), (1, dw), bias=bias, **kw_)
    return LowRankConv(first, second, scheme)


@torch.no_grad()
def decompose_conv(conv: nn.Conv2d, *, rank: int, scheme: str = "channel") -> LowRankConv:
    """Two convs computing the rank-`rank` truncation of `conv` (sqrt(S) split between them).

    channel: ``first.weight [r, C, kh, kw] = sqrt(S) Vh``, ``second.weight [N, r, 1, 1] = U sqrt(S)``;
    spatial: ``first.weight [r, C, kh, 1] = (U sqrt(S))^T``, ``second.weight [N, r, 1, kw] = sqrt(S) Vh``.
    """
    _check_scheme(scheme)
    if not isinstance(conv, nn.Conv2d) or conv.groups != 1:
        raise InputError("decompose_conv takes an ungrouped nn.Conv2d")
    n, c, kh, kw = conv.weight.shape
    _, u, s, vh = low_rank(conv.weight, scheme=scheme, rank=rank)  # u [P, r], s [r], vh [r, Q]
    r = len(s)
    root = s.sqrt()
    lr = _factor_convs(conv, r, scheme)
    if scheme == "channel":
        lr.first.weight.copy_((root[:, None] * vh).reshape(r, c, kh, kw))  # [r, C, kh, kw]
        lr.second.weight.copy_((u * root).reshape(n, r, 1, 1))  # [N, r, 1, 1]
    else:
        lr.first.weight.copy_((u * root).T.reshape(r, c, kh, 1))  # rows of U are (c, i): [r, C, kh, 1]
        lr.second.weight.copy_((root[:, None] * vh).reshape(r, n, kw).permute(1, 0, 2)[:, :, None, :])  # [N, r, 1, kw]
    if conv.bias is not None:
        lr.second.bias.copy_(conv.bias)
    return lr


def _set_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, attr, new)


def install_lowrank(model: nn.Module, name: str, *, rank: int, scheme: str, module: LowRankConv | None = None) -> None:
    """Replace conv `name` by a `LowRankConv` (zero-filled shapes unless `module` is given); recorded in
    ``model.lowrank`` so `prunekit.cnn.resnet.save_model` can describe it."""
    conv = model.get_submodule(name)
    if not isinstance(conv, nn.Conv2d):
        raise InputError(f"{name!r} is not an nn.Conv2d (already decomposed?)")
    if module is None:
        module = _factor_convs(conv, rank, _check_scheme(scheme))
        with torch.no_grad():  # skip_init left the memory as it was
            for p in module.parameters():
                p.zero_()
    _set_module(model, name, module)
    record = dict(getattr(model, "lowrank", {}))
    record[name] = {"rank": int(rank), "scheme": scheme}
    model.lowrank = record


def _ranks(layers: dict[str, nn.Conv2d], scheme: str, energy: float | None, value: float | None) -> dict[str, int]:
    out = {}
    for name, conv in layers.items():
        s = torch.linalg.svdvals(to_matrix(conv.weight.detach().double(), scheme))  # [k]
        out[name] = energy_rank(s, energy) if value is None else max(1, int((s >= value).sum()))
    return out


def decompose(model: nn.Module, *, layers=None, scheme: str = "channel", energy: float | None = None,
              value: float | None = None, ranks: dict | None = None) -> dict[str, int]:
    """Replace each layer (default `eligible_convs`) by two thin convs, in place; returns ``{name: rank}``.

    Ranks come from exactly one of: ``energy`` (fraction of singular-value energy kept), ``value`` (keep
    singular values >= value, the reference's post-TRP rule) or ``ranks`` ({name: rank}). A layer whose two
    thin convs would cost as many FLOPs as the one is left whole (and not in the returned dict).
    """
    _check_scheme(scheme)
    if sum(x is not None for x in (energy, value, ranks)) != 1:
        raise InputError("give exactly one of energy=, value= or ranks=")
    if energy is not None:
        _check_energy(energy)
    if value is not None and (isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(value)
                              or value < 0):
        raise InputError(f"value must be a finite singular-value threshold >= 0, got {value!r}")
    if ranks is not None:
        if not isinstance(ranks, dict):
            raise InputError(f"ranks must be a dict {{conv name: rank}}, got {type(ranks).__name__}")
        for name, r in ranks.items():
            if isinstance(r, bool) or not isinstance(r, Integral) or r < 1:
                raise InputError(f"ranks[{name!r}] must be an integer >= 1, got {r!r}")
    chosen = _resolve_layers(model, layers if ranks is None else list(ranks))
    _check_finite_convs(chosen)
    got = dict(ranks) if ranks is not None else _ranks(chosen, scheme, energy, value)
    built = {}  # every factorization first, then the swaps: a late failure left the model half decomposed
    for name, conv in chosen.items():
        r = int(got[name])
        if _worth(conv, r, scheme):  # else two thin convs would cost as much as the one
            built[name] = (r, decompose_conv(conv, rank=r, scheme=scheme))
    for name, (r, module) in built.items():
        install_lowrank(model, name, rank=r, scheme=scheme, module=module)
    return {name: r for name, (r, _) in built.items()}


def _check_finite_convs(convs: dict, hint: str = "") -> None:
    bad = [name for name, conv in convs.items() if not torch.isfinite(conv.weight).all()]
    if bad:
        more = f" (and {len(bad) - 1} more)" if len(bad) > 1 else ""
        raise InputError(f"conv {bad[0]}{more} has NaN or Inf weights{hint}; nothing was changed")


def energy_for_flops(model: nn.Module, flops: int, *, input_shape=(1, 28, 28), scheme: str = "channel",
                     layers=None, iters: int = 50) -> tuple[float, dict[str, int]]:
    """The SVD-after-training baseline's ranks: the largest single energy threshold whose decomposition keeps
    the whole network at most `flops` multiply-accumulates. Returns ``(energy, {name: rank})`` (only layers
    whose split saves FLOPs); the model is not changed."""
    from prunekit.cnn.flops import count_flops

    _check_scheme(scheme)
    if isinstance(flops, bool) or not isinstance(flops, Real) or not math.isfinite(flops) or flops <= 0:
        raise InputError(f"flops must be a positive number of multiply-accumulates (the budget), got {flops!r}")
    if isinstance(iters, bool) or not isinstance(iters, Integral) or iters < 1:
        raise InputError(f"iters must be an integer >= 1 (bisection steps), got {iters!r}")
    chosen = _resolve_layers(model, layers)
    sizes = {}  # name -> (out_h, out_w, in_w)
    hooks = [conv.register_forward_hook(
        lambda mod, inp, out, name=name: sizes.__setitem__(name, (out.shape[2], out.shape[3], inp[0].shape[3])))
        for name, conv in chosen.items()]
    try:
        full = count_flops(model, input_shape)
    finally:
        for h in hooks:
            h.remove()
    svals = {n: torch.linalg.svdvals(to_matrix(c.weight.detach().double(), scheme)) for n, c in chosen.items()}

    def cost(e: float) -> tuple[int, dict[str, int]]:
        total, ranks = full, {}
        for name, conv in chosen.items():
            r = energy_rank(svals[name], e)
            if _worth(conv, r, scheme):
                ranks[name] = r
                total += _split_flops(conv, r, scheme, *sizes[name]) - conv.weight.numel() * sizes[name][0] * sizes[name][1]
        return total, ranks

    lo, hi = 0.0, 1.0
    if cost(1e-9)[0] > flops:
        raise InputError(f"even rank 1 in every layer exceeds {flops} FLOPs; raise the budget")
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if cost(mid)[0] <= flops:
            lo = mid
        else:
            hi = mid
    return lo, cost(max(lo, 1e-9))[1]


@torch.no_grad()
def fuse_lowrank(lr: LowRankConv) -> nn.Conv2d:
    """One conv computing what `lr`'s two thin convs compute (its weight has rank ``lr.rank``)."""
    first, second = lr.first, lr.second
    r = first.out_channels
    if lr.scheme == "channel":  # first [r, C, kh, kw], second [N, r, 1, 1]
        n, (c, kh, kw) = second.out_channels, first.weight.shape[1:]
        w = (second.weight.reshape(n, r) @ first.weight.reshape(r, c * kh * kw)).reshape(n, c, kh, kw)
        stride, padding, dilation = first.stride, first.padding, first.dilation
    else:  # first [r, C, kh, 1] along the height, second [N, r, 1, kw] along the width
        w = torch.einsum("nrj,rci->ncij", second.weight[:, :, 0, :], first.weight[:, :, :, 0])  # [N, C, kh, kw]
        n, c, kh, kw = w.shape
        stride = (first.stride[0], second.stride[1])
        padding = (first.padding[0], second.padding[1])
        dilation = (first.dilation[0], second.dilation[1])
    conv = nn.utils.skip_init(nn.Conv2d, c, n, (kh, kw), stride, padding, dilation, bias=second.bias is not None,
                              device=w.device, dtype=w.dtype)
    conv.weight.copy_(w)
    if second.bias is not None:
        conv.bias.copy_(second.bias)
    return conv


@torch.no_grad()
def split_where_faster(model: nn.Module, example: torch.Tensor, *, timer=None, rounds: int = 5) -> dict[str, dict]:
    """Keep each decomposed layer split only where the two thin convs run faster than one conv; in place.

    FLOPs are not time: on a CPU a thin conv (few channels on a large map) can cost more than the whole conv it
    replaces (in the Fashion-MNIST testbed's first stage, 16 -> 6 -> 16 channels on 14x14 ran slower than
    16 -> 16). For every `LowRankConv` of `model`, the layer's input is taken from one forward pass of
    `example` (a batch like the ones the model will serve), then the split pair and `fuse_lowrank`'s single
    conv (same rank-r weight, so the same function) are timed on it, alternately over `rounds` rounds so that
    a change of load hits both alike (each side's time: the median over rounds); the faster stays.
    ``timer(module, x) -> milliseconds`` is one round's measurement (default: the median of 4 calls after a
    warm-up, under the caller's thread count). The choice holds for the machine and batch it was timed on.
    Returns ``{name: {"rank", "split_ms", "whole_ms", "split"}}``; fused layers leave ``model.lowrank``.
    """
    import statistics

    if not isinstance(example, torch.Tensor) or example.ndim < 2:
        raise InputError("example must be an input batch tensor [B, ...] like the ones the model will serve")
    if not torch.isfinite(example).all():
        raise InputError("example holds NaN or Inf; time on real inputs")
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise InputError(f"rounds must be a positive integer, got {rounds!r}")
    if timer is None:
        from prunekit.cnn.flops import ms_per_batch

        def timer(module, x):
            return ms_per_batch(module, x, repeats=4, warmup=1)
    lowrank = {n: m for n, m in model.named_modules() if isinstance(m, LowRankConv)}
    if not lowrank:
        return {}
    from prunekit.data.methods._checks import to_model

    example = to_model(example, model)  # the layers are timed where the model runs (a CPU batch for a GPU model)
    inputs = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=n: inputs.__setitem__(name, inp[0]))
             for n, m in lowrank.items()]
    was_training = module_modes(model)
    model.eval()
    try:
        model(example)
    finally:
        for h in hooks:
            h.remove()
        restore_modes(was_training)
    out = {}
    for name, lr in lowrank.items():
        whole = fuse_lowrank(lr)
        x = inputs[name]
        times = [(float(timer(lr, x)), float(timer(whole, x))) for _ in range(rounds)]  # alternated
        split_ms, whole_ms = (statistics.median(t) for t in zip(*times))
        keep = split_ms < whole_ms
        out[name] = {"rank": lr.rank, "split_ms": split_ms, "whole_ms": whole_ms, "split": keep}
        if not keep:
            fuse_layers(model, [name])
    return out


@torch.no_grad()
def fuse_layers(model: nn.Module, names) -> None:
    """Turn each named `LowRankConv` of `model` back into one conv (`fuse_lowrank`), in place."""
    record = dict(getattr(model, "lowrank", {}))
    for name in names:
        lr = model.get_submodule(name)
        if not isinstance(lr, LowRankConv):
            raise InputError(f"{name!r} is not a decomposed layer of the model")
        _set_module(model, name, fuse_lowrank(lr).train(lr.training))
        record.pop(name, None)
    model.lowrank = record


def _split_flops(conv: nn.Conv2d, r: int, scheme: str, out_h: int, out_w: int, in_w: int) -> int:
    """Multiply-accumulates of the two thin convs (the spatial scheme's kh x 1 factor runs at width in_w)."""
    n, c, kh, kw = conv.weight.shape
    if scheme == "channel":
        return out_h * out_w * (r * c * kh * kw + n * r)
    return out_h * in_w * r * c * kh + out_h * out_w * n * r * kw


def _lowrank_cost(conv: nn.Conv2d, r: int, scheme: str) -> int:
    """Multiply-accumulates per output pixel of the two thin convs. The spatial scheme's kh x 1 factor runs
    at the input's width, stride_w times the output's (a stride-2 conv's split was priced as if at stride 1
    and kept where it cost more than the conv)."""
    n, c, kh, kw = conv.weight.shape
    return r * c * kh * kw + n * r if scheme == "channel" else r * c * kh * conv.stride[1] + n * r * kw


def _worth(conv: nn.Conv2d, r: int, scheme: str) -> bool:
    return _lowrank_cost(conv, r, scheme) < conv.weight.numel()
