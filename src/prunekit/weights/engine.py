"""Block-by-block calibration for decoder-only models: the mechanics every weight method shares.

The engine finds the stack of decoder blocks (the ModuleList that holds most of the parameters:
``model.layers`` in Llama/Qwen/Mistral/Gemma, ``transformer.h`` in GPT-2), captures the inputs of the first
block *with all its keyword arguments* (rotary position embeddings, masks, cache positions: whatever this
version of transformers passes), and then walks the blocks one at a time. It never names a method: a method is
a function over one weight matrix and one statistic of that matrix's input (`prunekit.weights.stats`).

Two orders, both calibrating each block on the outputs of the already-pruned blocks before it:

- ``sequential="block"`` (default): the reference repositories' order (Wanda, SparseGPT, llm-compressor).
  Pass 1 accumulates statistics for every Linear over the batches with the dense block, and stops each
  batch as soon as the last Linear has seen its input (the rest of the dense forward is never used); all
  Linears are pruned; pass 2 re-runs the pruned block to produce the next block's inputs (skipped for the
  last block). Holds one batch of activations at a time (`batch_size`).
- ``sequential="layer"``: one forward pass per block over the whole calibration batch. A pre-hook on each
  Linear accumulates its statistic from the input it is about to receive, prunes the weight, and lets the
  forward continue with the pruned weight. One pass instead of ~1.9, but o_proj, gate/up and down_proj are
  calibrated on inputs from pruned predecessors (SparseGPT's ``--true-sequential`` order), and the whole
  batch's activations of one block are held at once. On SmolLM2-135M with Wanda 50% (128 x 512 tokens) it
  took 0.65x the time of llm-compressor, but gave ~1% higher perplexity than the reference order and
  1.6x its peak memory (2.55 GB against 1.58 GB), hence not the default.

In both orders, Linears that read the same tensor (q/k/v, gate/up) share one statistic, computed once.

Only the current block's activations and statistics are held besides the model, and a statistic is freed
as soon as the layers that read it are pruned; since each block is used alone, a later step can stream
blocks from disk.
"""

from __future__ import annotations

import fnmatch
import time
import warnings
from dataclasses import dataclass, field
from typing import Callable, Iterable

import torch
from torch import nn

from prunekit.errors import InputError
from prunekit.weights import stats as stats_lib

__all__ = ["LayerReport", "Refined", "Replacement", "UNCHANGED", "find_blocks", "target_linears",
           "capture_block_inputs", "for_block", "BlockKwargs", "prune_blocks"]

ERROR_TOKENS = 512  # calibration tokens per layer on which the relative reconstruction error is measured


@dataclass
class LayerReport:
    """What happened to one Linear: its measured sparsity and ``||(W - W') X||_F / ||W X||_F``."""

    name: str
    shape: tuple[int, int]  # [out, in]
    sparsity: float
    rel_error: float | None
    seconds: float
    extra_params: int = 0  # parameters a factorized replacement adds beyond the layer's own (ARMOR's A and B)
    info: dict | None = None  # what the method reports about this layer (losses, iterations, swaps)


@dataclass
class Replacement:
    """What a method returns instead of a plain weight when the layer changes form (ARMOR's factorization).

    `weight` is the dense equivalent ``[out, in]`` fp32 (used for the reconstruction error); `module` is
    installed in place of the Linear and must compute ``x @ weight.T + bias``; `sparsity` is that of its
    sparse part; `extra_params` what it adds beyond a dense Linear's parameters.
    """

    weight: torch.Tensor
    module: nn.Module
    sparsity: float
    extra_params: int = 0
    info: dict = field(default_factory=dict)


@dataclass
class Refined:
    """A pruned weight plus what the method reports about it (DSnoT's swaps and cycles)."""

    weight: torch.Tensor
    info: dict = field(default_factory=dict)


UNCHANGED = object()  # what a method that only measures returns (D-Pruner's general stage): the layer stays as is


def find_blocks(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The decoder blocks: the ModuleList of same-class modules that holds the most parameters."""
    best, best_params = None, 0
    for name, module in model.named_modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(m) for m in module}) != 1:
            continue
        params = sum(p.numel() for p in module.parameters())
        if params > best_params:
            best, best_params = (name, module), params
    if best is None:
        raise InputError(
            f"{type(model).__name__} has no ModuleList of decoder blocks; prunekit's weight engine supports "
            "decoder-only models whose blocks sit in a ModuleList (Llama, Qwen, Mistral, Gemma, GPT-2, ...)"
        )
    return best


def is_conv1d(module: nn.Module) -> bool:
    # transformers' GPT-2 style Conv1D stores its weight as [in, out]
    return type(module).__name__ == "Conv1D" and hasattr(module, "nf")


def is_factorized(module: nn.Module) -> bool:
    """A layer a method replaced by a factorization (ARMOR's ``A (core) B``): its sparse part is ``core``."""
    return hasattr(module, "core") and callable(getattr(module, "dense_weight", None))


def factorized_names(model: nn.Module) -> list[str]:
    """The names of `model`'s factorized (ARMOR) layers."""
    return [n for n, m in model.named_modules() if is_factorized(m)]


def first_of(names: list[str]) -> str:
    """``"a (and 3 more)"``: the first of `names`, and how many follow."""
    return names[0] + (f" (and {len(names) - 1} more)" if len(names) > 1 else "")


def refuse_factorized(model: nn.Module, training: str, instead: str) -> None:
    """Refuse to train a model holding factorized (ARMOR) layers: full training fills the N:M core's zeros (the
    saved core then reads as damaged) and LoRA finds no nn.Linear there. `training` names the step, `instead`
    what to do."""
    names = factorized_names(model)
    if names:
        raise InputError(f"{first_of(names)} is ARMOR-factorized (A core B, an N:M-sparse core): {training} would "
                         f"train the core's zeros away, and LoRA has no nn.Linear there to adapt; {instead}")


def zeros_in(t: torch.Tensor) -> int:
    """How many entries of `t` are zero, exactly. ``(t == 0).sum()`` built a bool mask and summed it in int64: a
    temporary of 8 bytes an entry, 250 MB on SmolLM2's embedding, which set `prunekit prune`'s peak memory."""
    try:
        return t.numel() - int(torch.count_nonzero(t))
    except NotImplementedError:  # no count_nonzero kernel for float8 or quantized tensors on the CPU
        return int((t == 0).sum())


def get_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as ``[out, in]`` (a view for Linear, a transposed view for Conv1D, the sparse core of
    a factorized layer)."""
    if is_factorized(module):
        return module.core
    return module.weight.T if is_conv1d(module) else module.weight


def set_weight(module: nn.Module, weight: torch.Tensor) -> None:
    target = get_weight(module)
    target.data.copy_(weight.to(target.dtype))


def target_linears(block: nn.Module, prefix: str, skip: Iterable[str] = ()) -> dict[str, nn.Module]:
    """Every Linear (and GPT-2 Conv1D) inside `block`, by full name, less those matching a `skip` glob and an
    MoE block's routers (`prunekit.weights.experts.routing_linears`: they stay dense).

    A skip pattern matches either the full name (``model.layers.3.mlp.down_proj``) or the name inside the
    block (``mlp.down_proj``), with shell-style wildcards: ``*down_proj``, ``self_attn.*``.
    """
    from prunekit.weights.experts import routing_linears

    skip = list(skip)
    routers = set(routing_linears(block))
    out = {}
    for name, module in block.named_modules():
        if not (isinstance(module, nn.Linear) or is_conv1d(module) or is_factorized(module)) or name in routers:
            continue
        full = f"{prefix}.{name}"
        if any(fnmatch.fnmatchcase(full, p) or fnmatch.fnmatchcase(name, p) for p in skip):
            continue
        out[full] = module
    return out


class _Captured(Exception):
    pass


class BlockKwargs(dict):
    """The keyword arguments a model passes its first block, for one batch; ``by_block`` holds those of each later
    block whose arguments differ (Gemma-2/3's sliding-window and full-attention layers get different masks, and
    Gemma-3's their own RoPE tables; Qwen2/3 with a sliding window from ``max_window_layers`` on). Run a block
    with ``block(hidden, **for_block(block, kwargs))``."""

    by_block: dict


def for_block(block: nn.Module, kwargs: dict) -> dict:
    """The keyword arguments `block` gets in the model's own forward (`kwargs` from `capture_block_inputs`)."""
    return getattr(kwargs, "by_block", {}).get(block, kwargs)


def _same(a, b) -> bool:
    if a is b:
        return True
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and bool(torch.equal(a, b)))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    try:
        return bool(a == b)
    except Exception:  # an object without a plain equality: treat as different (its block keeps its own)
        return False


def input_device(model: nn.Module) -> torch.device:
    """Where `model` takes its token ids: its input embedding's device (the first parameter's, else the CPU)."""
    emb = model.get_input_embeddings() if callable(getattr(model, "get_input_embeddings", None)) else None
    weight = getattr(emb, "weight", None)
    if isinstance(weight, torch.Tensor):
        return weight.device
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def _first_block_inputs(model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, *,
                        batch_size: int) -> list[tuple[torch.Tensor, BlockKwargs]]:
    """`capture_block_inputs` for a model whose blocks repeat: the first block's input and arguments, for all."""
    captured: list[tuple[torch.Tensor, BlockKwargs]] = []

    def grab(_module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        first = BlockKwargs({k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")})
        first.by_block = {}
        captured.append((hidden, first))
        raise _Captured

    handle = blocks[0].register_forward_pre_hook(grab, with_kwargs=True)
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            try:
                model(input_ids=input_ids[start : start + batch_size], use_cache=False)
            except _Captured:
                pass
            else:
                raise RuntimeError("the model's forward never reached its first decoder block")
    finally:
        handle.remove()
    return captured


def capture_block_inputs(
    model: nn.Module, blocks: nn.ModuleList, input_ids: torch.Tensor, *, batch_size: int
) -> list[tuple[torch.Tensor, BlockKwargs]]:
    """The first block's inputs: ``[(hidden [b, seq, d], kwargs)]`` per batch of samples, where `kwargs` (a
    `BlockKwargs`) also knows each later block's own arguments (see `for_block`).

    The later blocks' arguments are read in the same forward with every block's computation skipped (each hands
    its input on): the masks and RoPE tables a model gives its layers are made before its layer loop. Where
    skipping fails (a model whose loop needs real block outputs), the blocks run for real instead. A model that
    uses one block object at several depths gives every block the first block's arguments (they cannot be told
    apart by block).
    """
    input_ids = input_ids.to(input_device(model))
    if len({id(b) for b in blocks}) < len(blocks):
        return _first_block_inputs(model, blocks, input_ids, batch_size=batch_size)
    captured: list[tuple[torch.Tensor, BlockKwargs]] = []
    seen: dict[int, dict] = {}
    index = {id(b): i for i, b in enumerate(blocks)}

    def grab(module, args, kwargs):
        kwargs = dict(kwargs)
        hidden = args[0] if args else kwargs.pop("hidden_states")
        seen[index[id(module)]] = {k: v for k, v in kwargs.items() if k not in ("past_key_value", "past_key_values")}
        if module is blocks[0]:
            seen["hidden"] = hidden
        if module is blocks[-1]:
            raise _Captured

    def passthrough(hidden_states=None, *args, **kwargs):
        return hidden_states

    def run(batch, skip: bool) -> None:
        seen.clear()
        stubs = []
        try:
            if skip:
                for b in blocks:  # an instance attribute (a hook's own wrapper, e.g. accelerate's, is put back)
                    stubs.append((b, vars(b).get("forward")))
                    b.forward = passthrough
            model(input_ids=batch, use_cache=False)
        except _Captured:
            return
        finally:
            for b, own in reversed(stubs):
                if own is None:
                    del b.forward
                else:
                    b.forward = own
        raise RuntimeError("the model's forward never reached its last decoder block")

    handles = [b.register_forward_pre_hook(grab, with_kwargs=True) for b in blocks]
    skip = True
    try:
        for start in range(0, input_ids.shape[0], batch_size):
            batch = input_ids[start : start + batch_size]
            if skip:
                try:
                    run(batch, skip=True)
                except Exception:
                    skip = False  # this model's loop needs what its blocks return
            if not skip:
                run(batch, skip=False)
            if len(seen) != len(blocks) + 1:
                raise RuntimeError("the model's forward did not call each of its decoder blocks once")
            first = BlockKwargs(seen[0])
            first.by_block = {blocks[i]: seen[i] for i in range(1, len(blocks))
                              if seen[i].keys() != first.keys() or not all(_same(seen[i][k], first[k]) for k in first)}
            captured.append((seen["hidden"], first))
    finally:
        for h in handles:
            h.remove()
    return captured


def _block_output(out) -> torch.Tensor:
    return out[0] if isinstance(out, (tuple, list)) else out


def _error_rows(tokens: int, limit: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    return torch.randperm(tokens, generator=g)[:limit]


def _rel_error(w_old: torch.Tensor, w_new: torch.Tensor, x_sub: torch.Tensor) -> float:
    # ||(W - W') X||_F / ||W X||_F on the sampled calibration tokens; x_sub: [tokens, in]
    ref = torch.linalg.matrix_norm(x_sub @ w_old.T)
    return float(torch.linalg.matrix_norm(x_sub @ (w_old - w_new).T) / ref.clamp_min(1e-12))


class _Pruner:
    """Prunes the Linears of one block from per-input statistics; shared by both orders."""

    def __init__(self, block: nn.Module, layers: dict[str, nn.Module], stat: str | Callable | None, prune_fn: Callable,
                 error_tokens: int):
        self.block, self.layers, self.stat, self.prune_fn, self.error_tokens = block, layers, stat, prune_fn, error_tokens
        self.reports: list[LayerReport] = []

    def stat_for(self, name: str) -> str | None:
        """The statistic to gather for the input of layer `name` (a method may need less for some layers)."""
        return self.stat(name) if callable(self.stat) else self.stat

    def sample(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1])
        return flat[_error_rows(flat.shape[0], self.error_tokens).to(flat.device)].float()

    def prune_unreached(self, names) -> None:
        """Prune layers no calibration token reached (MoE experts: `prunekit.weights.experts`) with the statistic
        of white inputs; other layers the forward never called are an error."""
        names = sorted(names)
        called_never = [n for n in names if not getattr(self.layers[n], "prunekit_expert", False)]
        if called_never:
            raise RuntimeError(f"these layers were never called in the block's forward: {called_never}")
        for name in names:
            kind = self.stat_for(name)
            w = get_weight(self.layers[name])
            self.prune(name, None if kind is None else stats_lib.neutral(kind, w.shape[1]), None)
            report = self.reports[-1]
            # a method's own errors (DSnoT's error_base / error_refined) would be measured on no data here
            measured = {k: v for k, v in (report.info or {}).items() if not k.startswith("error_")}
            report.info = {**measured, "calibration_tokens": 0,
                           "note": "no calibration token was routed here: pruned as for white inputs (by |W|)"}

    def prune(self, name: str, statistic, x_sub: torch.Tensor | None) -> None:
        module = self.layers[name]
        start = time.perf_counter()
        w_old = get_weight(module).detach().to(torch.float32, copy=True)  # [out, in]
        statistic = stats_lib.to_device(statistic, w_old.device)  # a model on a GPU is pruned there
        out = self.prune_fn(w_old, statistic, name)
        extra, info, unchanged = 0, None, out is UNCHANGED
        if isinstance(out, Replacement):
            bias = getattr(module, "bias", None)
            if bias is not None and getattr(out.module, "bias", None) is None:
                out.module.bias = nn.Parameter(bias.detach().clone())  # the replacement keeps the Linear's bias
            set_weight(module, out.weight)  # in "layer" order the current forward still runs the old module
            like = get_weight(module)  # the replacement computes in the Linear's dtype and on its device
            if is_conv1d(module):  # the replacement must save its dense weight in the Conv1D's [in, out] layout
                if not hasattr(out.module, "conv1d_layout"):
                    raise InputError(f"{type(out.module).__name__} cannot stand in for the Conv1D {name} (GPT-2 "
                                     "style, weight stored [in, out]); use this method on models with Linear layers")
                out.module.conv1d_layout = True
            out.module.to(device=like.device, dtype=like.dtype)
            _install(self.block, module, out.module)
            self.layers[name] = out.module
            w_new, sparsity, extra, info = out.weight, out.sparsity, out.extra_params, out.info
        else:
            if isinstance(out, Refined):
                out, info = out.weight, out.info
            if unchanged:  # not written back (a method that prunes the tensor in place returns it: written)
                out = w_old
            else:
                if out is w_old and x_sub is not None:  # pruned in place: the module still holds what it was
                    w_old = get_weight(module).detach().to(torch.float32, copy=True)
                set_weight(module, out)
            w_new = out
            pruned = get_weight(module)
            sparsity = zeros_in(pruned) / pruned.numel()  # exact count: a float32 mean is off by ~1e-6
        if x_sub is None:
            rel = None
        else:  # an unchanged layer's error is 0 without two matrix products
            rel = 0.0 if unchanged else _rel_error(w_old, w_new, x_sub)
        self.reports.append(
            LayerReport(name, tuple(w_old.shape), sparsity, rel, time.perf_counter() - start, extra, info)
        )


def _install(block: nn.Module, old: nn.Module, new: nn.Module) -> None:
    """Put `new` where `old` sits inside `block`."""
    for inner, candidate in block.named_modules():
        if inner and candidate is old:
            parent_name, _, attr = inner.rpartition(".")
            setattr(block.get_submodule(parent_name) if parent_name else block, attr, new)
            return
    raise RuntimeError("the layer to replace is not inside the block being pruned")


def _one_pass(block, kwargs, hidden, pruner: _Pruner) -> torch.Tensor:
    last = {"x": None, "stat": None, "sub": None}

    def make_hook(name):
        def hook(_module, args):
            if name in done:
                return
            x = args[0]
            if x is not last["x"]:  # q/k/v and gate/up read the same tensor: one statistic for them
                _check_finite_input(name, x)
                last["x"], last["sub"] = x, pruner.sample(x)
                last["stat"] = None
                kind = pruner.stat_for(name)
                if kind is not None:
                    acc = stats_lib.make(kind, x.shape[-1], x.device)
                    acc.add(x, getattr(_module, "prunekit_sequences", None))  # an expert's: see weights.experts
                    last["stat"] = acc.value()
                    _check_finite_statistic(name, last["stat"], x.dtype)
            pruner.prune(name, last["stat"], last["sub"])
            done.add(name)

        return hook

    done: set[str] = set()
    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in pruner.layers.items()]
    try:
        out = _block_output(block(hidden, **for_block(block, kwargs)))
    finally:
        for h in handles:
            h.remove()
    pruner.prune_unreached(set(pruner.layers) - done)
    return out


class _StatsDone(Exception):
    pass


def _check_finite_input(name: str, x: torch.Tensor) -> None:
    """A NaN/Inf input made SparseGPT's Hessian "singular" (blamed on the calibration) and let Wanda finish on
    NaN norms: name the layer. (A float32 sum: one pass, no copy; a sum past float32's range is an overflow too.)"""
    if not torch.isfinite(x.sum(dtype=torch.float32)):
        _overflow(name, "holds NaN or Inf activations", x.dtype)


def _check_finite_statistic(name: str, value, dtype: torch.dtype) -> None:
    """Finite inputs can still be too large for their statistic (a Hessian of squares past float32's range)."""
    if not stats_lib.is_finite(value):
        _overflow(name, "is too large for its calibration statistic (NaN/Inf)", dtype)


def _overflow(name: str, what: str, dtype: torch.dtype) -> None:
    hint = ("" if dtype in (torch.float32, torch.float64) else
            ", or prune it in float32 (prune --compute-dtype float32, prunekit.load_model(..., dtype='float32'))")
    raise InputError(f"the input of {name} {what} on the calibration data: the model overflows before this layer "
                     f"({str(dtype).removeprefix('torch.')} activations); check its weights{hint}")


def _two_pass(block, batches: list, pruner: _Pruner, *, need_outputs: bool) -> None:
    """Statistics pass, pruning, then the pruned pass; replaces each batch's input by its output in place."""
    accs: dict[str, object] = {}  # leader name -> accumulator
    subs: dict[str, torch.Tensor] = {}  # leader name -> error sample (from the first batch)
    leader: dict[str, str] = {}  # layer -> the first layer that read the same input tensor
    seen: set[str] = set()
    last = {"x": None, "name": None}

    def make_hook(name):
        def hook(_module, args):
            x = args[0]
            if x is last["x"]:
                leader[name] = last["name"]
            else:
                _check_finite_input(name, x)  # in the statistics pass: nothing in this block is pruned yet
                leader[name] = name
                last["x"], last["name"] = x, name
                if name not in subs:
                    subs[name] = pruner.sample(x)
                kind = pruner.stat_for(name)
                if kind is not None:
                    if name not in accs:
                        accs[name] = stats_lib.make(kind, x.shape[-1], x.device)
                    accs[name].add(x, getattr(_module, "prunekit_sequences", None))  # see weights.experts
            seen.add(name)
            if len(seen) == len(pruner.layers):
                raise _StatsDone  # the rest of the dense forward (the last Linear on) is never used

        return hook

    handles = [m.register_forward_pre_hook(make_hook(n)) for n, m in pruner.layers.items()]
    try:
        for hidden, kwargs in batches:
            seen.clear()
            last["x"] = last["name"] = None
            try:
                block(hidden, **for_block(block, kwargs))
            except _StatsDone:
                pass
    finally:
        for h in handles:
            h.remove()
    last["x"] = None
    for lead, acc in accs.items():  # before anything in the block is pruned
        _check_finite_statistic(lead, acc.value(), get_weight(pruner.layers[lead]).dtype)
    pruner.prune_unreached(set(pruner.layers) - set(leader))
    readers = {}
    for name in leader:
        readers[leader[name]] = readers.get(leader[name], 0) + 1
    for name in pruner.layers:
        if name not in leader:
            continue
        lead = leader[name]
        acc = accs.get(lead)
        pruner.prune(name, acc.value() if acc is not None else None, subs[lead])
        readers[lead] -= 1
        if not readers[lead]:  # free a statistic as soon as the last layer reading it is pruned
            accs.pop(lead, None)
            subs.pop(lead)
    if not need_outputs:
        batches.clear()
        return
    for j in range(len(batches)):  # a batch's input is freed as soon as its output exists
        hidden, kwargs = batches[j]
        batches[j] = (_block_output(block(hidden, **for_block(block, kwargs))), kwargs)
        del hidden


def prune_blocks(
    model: nn.Module,
    input_ids: torch.Tensor | None,
    prune_fn: Callable,
    *,
    stat: str | Callable[[str], str | None] | None,
    skip: Iterable[str] = (),
    sequential: str = "block",
    batch_size: int = 4,
    error_tokens: int = ERROR_TOKENS,
    progress: bool = True,
    return_hidden: bool = False,
) -> tuple[list[LayerReport], torch.Tensor | None]:
    """Prune every target Linear of every block with ``prune_fn(weight [out, in] fp32, statistic, name)``.

    `prune_fn` returns the new weight, a `Refined` (weight plus a per-layer record), a `Replacement` (a module
    installed in the Linear's place) or `UNCHANGED` (it only measured: the layer stays as it is). `name` is the
    Linear's full name (``model.layers.3.mlp.down_proj``).
    `stat` names the statistic of each Linear's input (`prunekit.weights.stats`), or is a function of the
    Linear's name giving it (None: that layer's input needs none).

    `input_ids` (``[samples, seqlen]``) may be None only when `stat` is None (a data-free method); then no
    forward runs and no reconstruction error is measured. Returns the per-layer reports and, with
    `return_hidden`, the last block's propagated outputs (``[samples, seqlen, d]``), which equal the pruned
    model's hidden states before its final norm (without it, "block" order skips the last block's second
    pass).
    """
    if sequential not in ("layer", "block"):
        raise InputError(f"sequential must be 'layer' or 'block', got {sequential!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    prefix, blocks = find_blocks(model)
    layers_by_block = [target_linears(b, f"{prefix}.{i}", skip) for i, b in enumerate(blocks)]
    if not any(layers_by_block):
        raise InputError("no Linear layer is left to prune; check the skip patterns")
    factorized = [n for layers in layers_by_block for n, m in layers.items() if is_factorized(m)]
    if factorized:
        raise InputError(
            f"{first_of(factorized)} is already factorized (ARMOR); prune a dense model, "
            "or load this folder with plain transformers to get its dense equivalent"
        )
    _check_finite(layers_by_block)

    from tqdm.auto import tqdm

    bar = tqdm(total=len(blocks), desc="calibrate+prune blocks", unit="block", disable=not progress)
    reports: list[LayerReport] = []
    with torch.no_grad():
        if input_ids is None:
            if stat is not None:
                raise InputError("this method needs calibration data")
            for block, layers in zip(blocks, layers_by_block):
                pruner = _Pruner(block, layers, None, prune_fn, error_tokens)
                for name in layers:
                    pruner.prune(name, None, None)
                reports += pruner.reports
                bar.update()
            bar.close()
            return reports, None

        one_batch = sequential == "layer"
        batches = capture_block_inputs(
            model, blocks, input_ids, batch_size=input_ids.shape[0] if one_batch else batch_size
        )
        for index, (block, layers) in enumerate(zip(blocks, layers_by_block)):
            pruner = _Pruner(block, layers, stat, prune_fn, error_tokens)
            try:
                if one_batch:
                    hidden, kwargs = batches.pop()
                    batches.append((_one_pass(block, kwargs, hidden, pruner), kwargs))
                    del hidden
                else:
                    last = index == len(blocks) - 1
                    _two_pass(block, batches, pruner, need_outputs=return_hidden or not last)
                if not all(torch.isfinite(h.sum(dtype=torch.float32)) for h, _ in batches):
                    raise InputError(f"the pruned {prefix}.{index} outputs NaN or Inf activations on the calibration "
                                     "data (the model overflows); check its weights, or prune in float32 "
                                     "(prune --compute-dtype float32)")
            except Exception as err:
                _say_what_changed(err, reports + pruner.reports)
                raise
            order = {name: i for i, name in enumerate(layers)}  # module order: experts no token reached were first
            reports += sorted(pruner.reports, key=lambda r: order.get(r.name, len(order)))
            bar.update()
    bar.close()
    return reports, (torch.cat([h for h, _ in batches]) if return_hidden else None)


def _say_what_changed(err: Exception, done: list[LayerReport]) -> None:
    """The model is pruned in place, block by block: an error in a block leaves what came before it pruned.
    Say so (in the message of an InputError, which is all the CLI prints; as a note on anything else)."""
    if not done:
        return
    note = (f"the model in memory was changed in place before this error: {len(done)} layer(s), {done[0].name} to "
            f"{done[-1].name}, were already pruned; load it again before using it (files on disk are untouched)")
    if isinstance(err, InputError) and err.args:
        err.args = (f"{err.args[0]} ({note})", *err.args[1:])
    elif hasattr(err, "add_note"):  # Python >= 3.11
        err.add_note(note)
    else:  # 3.10 has no notes: an AttributeError here hid the real error
        warnings.warn(note, RuntimeWarning, stacklevel=3)


def _check_finite(layers_by_block: list[dict[str, nn.Module]]) -> None:
    for layers in layers_by_block:
        for name, module in layers.items():
            if not torch.isfinite(module.weight).all():
                raise InputError(f"layer {name} has NaN or Inf weights; repair or re-export the model before pruning")
