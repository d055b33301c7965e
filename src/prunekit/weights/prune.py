"""`prune`: one call from a model, a method name and a budget to a pruned model and its per-layer record.

>>> model, tok = prunekit.load_model("smollm2-135m")            # doctest: +SKIP
>>> result = prunekit.prune(model, method="wanda", ratio=0.5, calibration="wiki", tokenizer=tok)  # doctest: +SKIP
>>> result.total_sparsity                                       # doctest: +SKIP
0.5
"""

from __future__ import annotations

import contextlib
import fnmatch
import functools
import inspect
import math
import os
import time
from dataclasses import asdict, dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit import registry
from prunekit.errors import InputError, check_model, module_modes, restore_modes
from prunekit.select import parse_pattern, ratio_for
from prunekit.text import Text, calibration_ids, check_token_ids, ids_from_numpy, load_text
from prunekit.weights.engine import LayerReport, find_blocks, get_weight, is_factorized, prune_blocks, target_linears
from prunekit.weights import owl
from prunekit.weights.io import check_finite_weights

__all__ = ["PruneResult", "prune", "prune_options", "method_options", "check_profile"]


@dataclass
class PruneResult:
    """What `prune` did: the method, budget and pattern, the calibration used, and one `LayerReport` per Linear."""
    method: str
    ratio: float
    pattern: str | None
    sequential: str
    layers: list[LayerReport]
    seconds: float
    calibration: dict | None  # source, documents, sha256, samples, seqlen, seed
    options: dict = field(default_factory=dict)
    input_sparsity: float = 0.0  # of the layers pruned, before pruning (a model pruned before)
    input_zeros_refilled: int = 0  # the input's zeros that are nonzero after pruning (SparseGPT's updates)
    model_sparsity: float | None = None  # zeros over every parameter (embeddings, norms, head included)
    pattern_violations: list[str] | None = None  # layers that break the pattern (None: no pattern)
    # the per-block ratios and how they were found (OWL: m, lambda, outlier_ratios in %, ratios); None: uniform
    profile: dict | None = None

    @property
    def total_sparsity(self) -> float:
        numel = sum(r.shape[0] * r.shape[1] for r in self.layers)
        return sum(r.sparsity * r.shape[0] * r.shape[1] for r in self.layers) / max(numel, 1)

    @property
    def mean_rel_error(self) -> float | None:
        errs = [r.rel_error for r in self.layers if r.rel_error is not None]
        return sum(errs) / len(errs) if errs else None

    def to_dict(self) -> dict:
        d = asdict(self)
        d["total_sparsity"] = self.total_sparsity
        d["mean_rel_error"] = self.mean_rel_error
        return d


def _calibration(calibration, tokenizer, model, *, samples: int, seqlen: int,
                 seed: int) -> tuple[torch.Tensor | None, dict | None]:
    if calibration is None:
        return None, None
    calibration = ids_from_numpy(calibration, "calibration")  # "given as text" was the error; uint16 too
    if isinstance(calibration, torch.Tensor):
        if calibration.dim() != 2 or calibration.is_floating_point() or calibration.is_complex() \
                or calibration.dtype == torch.bool:
            raise InputError("calibration tensor must be integer token ids of shape [samples, seqlen] (int64)")
        if calibration.numel() == 0:
            raise InputError("calibration tensor is empty; give [samples, seqlen] token ids")
        check_token_ids(model, calibration, what="calibration tensor")
        return calibration.long(), {"source": "token ids given by the caller", "samples": calibration.shape[0], "seqlen": calibration.shape[1]}
    if tokenizer is None:
        raise InputError("calibration given as text needs the tokenizer: prune(..., tokenizer=tok)")
    text = calibration if isinstance(calibration, Text) else load_text(calibration, purpose="calibration")
    ids = calibration_ids(tokenizer, text, samples=samples, seqlen=seqlen, seed=seed)
    check_token_ids(model, ids, what="calibration text")
    return ids, {**text.describe(), "samples": samples, "seqlen": seqlen, "seed": seed}


# Arguments the engine fills per layer (``mask``: SparseGPT's fixed keep-mask of one layer, which DSnoT passes),
# not options a user sets for the whole model.
_FIXED = {"weight", "stats", "hessian", "ratio", "pattern", "name", "bias", "model", "general_ids", "tokenizer",
          "skip", "progress", "samples", "seqlen", "seed", "mask"}


def method_options(method: str) -> dict:
    """The options weight method `method` takes, with their defaults (what ``prunekit methods`` lists)."""
    spec = registry.get(method, "weights")
    params = inspect.signature(spec.prune_model or spec.fn).parameters.values()
    return {p.name: p.default for p in params if p.name not in _FIXED and p.default is not p.empty}


# Options that must be integers >= 1 (a SparseGPT block of 0 columns never advances) or numbers >= 0 (a negative
# damping makes the Hessian indefinite); every other numeric option only has to have its default's type.
_POSITIVE_INT = {"blocksize"}
_NON_NEGATIVE = {"percdamp"}


def _option_kind(method: str, name: str, default) -> tuple[type | None, bool]:
    """(bool, int or float when option `name` is one of these, else None; whether it may be None), from its
    default and its annotation."""
    spec = registry.get(method, "weights")
    words = str(inspect.signature(spec.prune_model or spec.fn).parameters[name].annotation).replace("|", " ").split()
    nullable = default is None or "None" in words or "Optional" in str(words)
    if default is not None:
        return (type(default) if type(default) in (bool, int, float) else None), nullable
    return next((kind for kind in (bool, int, float) if kind.__name__ in words), None), nullable


def _check_option(method: str, name: str, value, default) -> None:
    kind, nullable = _option_kind(method, name, default)
    fix = f"; fix {name}= (--option {name}=... on the command line; default {default!r})"
    if value is None and kind is not None and not nullable:
        raise InputError(f"{method} option {name} cannot be none{fix}")
    if value is None or kind is None:
        return
    if kind is bool:
        if not isinstance(value, bool):
            raise InputError(f"{method} option {name} must be true or false, got {value!r}{fix}")
        return
    if isinstance(value, bool) or not isinstance(value, int if kind is int else (int, float)):
        raise InputError(f"{method} option {name} must be {'an integer' if kind is int else 'a number'}, got {value!r}{fix}")
    if not math.isfinite(value):
        raise InputError(f"{method} option {name} must be finite, got {value!r}{fix}")
    if name in _POSITIVE_INT and value < 1:
        raise InputError(f"{method} option {name} must be an integer >= 1, got {value!r}{fix}")
    if name in _NON_NEGATIVE and value < 0:
        raise InputError(f"{method} option {name} must be >= 0, got {value!r}{fix}")


def prune_options(method: str, options: dict) -> None:
    """Refuse options `method` does not take, values of the wrong type (a word where a number or true/false
    belongs) and, for DSnoT, a bad base, before any slow work."""
    accepted = method_options(method)
    unknown = set(options) - set(accepted)
    if unknown:
        raise InputError(f"method {method} takes no option(s) {sorted(unknown)}; it takes {sorted(accepted) or 'none'}")
    for name, value in options.items():
        _check_option(method, name, value, accepted[name])
    registry.get(method, "weights").stat_for(options)


def _check_skip(model: nn.Module, skip) -> None:
    """Refuse a skip glob that matches no block Linear: a typo would otherwise prune what it meant to keep."""
    if not skip:
        return
    prefix, blocks = find_blocks(model)
    every = [target_linears(b, f"{prefix}.{i}") for i, b in enumerate(blocks)]
    for glob in skip:
        if all(len(target_linears(b, f"{prefix}.{i}", [glob])) == len(every[i]) for i, b in enumerate(blocks)):
            example = next(iter(every[0]), f"{prefix}.0.?")
            raise InputError(f"skip pattern {glob!r} matches no layer; names look like {example} (full) or "
                             f"{example[len(prefix) + 3:]} (inside a block)")


def _check_pattern_fits(model: nn.Module, skip, nm) -> None:
    """An N:M pattern needs every pruned Linear's input size to be a multiple of M: found mid-run, after the first
    layers were pruned, and without the layer's name."""
    if nm is None:
        return
    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        for name, module in target_linears(block, f"{prefix}.{i}", skip).items():
            d_in = get_weight(module).shape[1]
            if d_in % nm.m:
                parts = name.split(".")
                # an expert (`...experts.down_proj.7`): every expert of that projection, not the index
                glob = f"*{'.'.join(parts[-3:-1])}.*" if parts[-1].isdigit() and len(parts) > 2 else f"*{parts[-1]}"
                raise InputError(f"pattern {nm} needs each layer's input size to be a multiple of {nm.m}, but {name} "
                                 f"has {d_in}; leave such layers dense with --skip '{glob}' "
                                 f"(skip=[...]), or use a ratio")


def _fused_weights(block: nn.Module) -> list[tuple[str, torch.Tensor]]:
    """Weights of more than 2 dimensions held by a module that is not a convolution: the fused expert tensors
    of Mixtral-style MoE blocks (``experts.gate_up_proj`` ``[experts, 2 * ffn, hidden]``)."""
    conv = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
    return [(f"{mod_name}.{p_name}" if mod_name else p_name, p)
            for mod_name, module in block.named_modules() if not isinstance(module, conv) and not is_factorized(module)
            for p_name, p in module.named_parameters(recurse=False) if p.dim() > 2]


EXPERT_METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")  # those that prune fused MoE experts (weights.experts)


_WHY_NOT_EXPERTS = {"armor": "it replaces each Linear by a factorized module, which a fused expert tensor cannot hold",
                    "dpruner": "it needs each weight's gradient, which it takes from Linear layers only"}


def _refuse_fused_weights(model: nn.Module, method: str, skip=()) -> None:
    """Weights fused into 3-D tensors are not Linears, so the engine would prune only the attention and report
    that as the model's sparsity. Fused MoE experts in the standard layout are pruned one expert at a time
    (`prunekit.weights.experts`) by the methods in `EXPERT_METHODS`; another method is refused unless `skip`
    leaves every expert dense (it then prunes the rest). (A convolution's small kernel, as in hybrid Mamba/LFM2
    blocks, is left dense, as before.)"""
    from prunekit.weights import experts

    prefix, blocks = find_blocks(model)
    for i, block in enumerate(blocks):
        handled = {f"{name}.{p}" if name else p for name, _ in experts.fused_experts(block)
                   for p in ("gate_up_proj", "down_proj")}
        fused = _fused_weights(block)
        other = [(name, param) for name, param in fused if name not in handled]
        if other:
            name, param = other[0]
            raise InputError(
                f"{prefix}.{i}.{name} is a {param.dim()}-D weight {tuple(param.shape)} that is not a Linear (fused "
                "weights prunekit does not recognise as mixture-of-experts gate_up_proj/down_proj), which weight "
                "pruning cannot prune: it prunes Linear layers only and would leave them dense; prune a dense model")
        if fused and method not in EXPERT_METHODS:
            names = [f"{name}.{p}.{e}" if name else f"{p}.{e}" for name, module in experts.fused_experts(block)
                     for p in ("gate_up_proj", "down_proj") for e in range(module.gate_up_proj.shape[0])]
            if all(any(fnmatch.fnmatchcase(f"{prefix}.{i}.{n}", g) or fnmatch.fnmatchcase(n, g) for g in skip)
                   for n in names):
                continue  # every expert left dense on purpose: the method prunes the rest
            why = _WHY_NOT_EXPERTS.get(method, "it prunes Linear layers only")
            raise InputError(
                f"{prefix}.{i}.{fused[0][0]} holds fused mixture-of-experts weights, which {method} cannot prune "
                f"({why}); the methods that prune MoE experts: {', '.join(EXPERT_METHODS)}; or leave the experts "
                f"dense with --skip '*experts*' (skip=[...]) and {method} prunes the rest")


class _Default(str):
    """A default argument that reads as its value but is told apart from the same value given explicitly."""


_WIKI = _Default("wiki")


def prune(
    model: nn.Module,
    *,
    method: str,
    ratio: float | None = None,
    pattern: str | None = None,
    calibration: str | Text | torch.Tensor | None = _WIKI,
    tokenizer=None,
    samples: int = 128,
    seqlen: int = 512,
    seed: int = 0,
    skip: tuple[str, ...] = (),
    sequential: str = "block",
    batch_size: int = 4,
    progress: bool = True,
    profile: str = "uniform",
    owl_m: float = owl.M,
    owl_lambda: float = owl.LAMBDA,
    **options,
) -> PruneResult:
    """Prune the Linear layers of `model`'s decoder blocks in place and return the per-layer record.

    `method`: a name from ``prunekit methods`` (magnitude, wanda, sparsegpt, dsnot, armor, dpruner). `ratio`: fraction of weights
    removed, in [0, 1). `pattern`: ``"N:M"``, at most N nonzeros in every M consecutive input weights (fixes
    the ratio at 1 - N/M). `calibration`: ``"wiki"``, ``"austen"``, a .txt/.jsonl path, a `Text`, or token ids
    ``[samples, seqlen]``; ignored by data-free methods unless given explicitly (then it only measures their
    reconstruction error). `skip`: glob patterns of layer names to leave dense. `sequential`: ``"block"``
    (the reference's order: statistics from the dense block, then a second pass through the pruned block,
    `batch_size` sequences at a time) or ``"layer"`` (one pass per block over all samples at once, each
    Linear pruned as its inputs arrive: one pass instead of two, about twice the peak memory, calibrated on pruned
    predecessors). `profile`: ``"uniform"`` (every block at `ratio`) or ``"owl"`` (a ratio per block from its
    share of outlier Wanda scores, averaging `ratio`: `prunekit.weights.owl`, with `owl_m` and `owl_lambda`;
    unstructured magnitude, wanda, sparsegpt and dsnot; it needs calibration text). Extra `options` go to the
    method (sparsegpt: ``blocksize``, ``percdamp``; dsnot: ``base``, ``skip_mlp``, ``max_cycle_time``, ...; dpruner:
    ``domain``, ...; ``prunekit methods`` lists each method's options with their defaults).

    Bad input is refused before the model changes. The model is pruned in place, block by block, so an error
    found only on the way (activations that overflow in a late block) leaves the earlier blocks pruned; the
    error's message says which layers.
    """
    check_model(model, "prune")
    skip = (skip,) if isinstance(skip, str) else skip
    if not isinstance(skip, (list, tuple)) or not all(isinstance(g, str) for g in skip):
        raise InputError(f"skip must be a list of glob patterns of layer names, e.g. ['*.mlp.*'], got {skip!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise InputError(f"seed must be an integer >= 0, got {seed!r}")
    spec = registry.get(method, "weights")
    nm = parse_pattern(pattern)
    if method == "armor" and nm is None:  # said by the first layer, after the model's calibration had begun
        raise InputError("armor needs --pattern N:M (pattern=, e.g. 2:4): its core is N:M sparse, unstructured is "
                         "not supported")
    ratio = ratio_for(ratio, nm)
    owl_m, owl_lambda = check_profile(profile, method, nm, ratio, owl_m, owl_lambda)
    # every parameter, not only the pruned Linears: a NaN embedding left the model half pruned when the
    # activations went non-finite after the first block
    check_finite_weights(model, "the model")
    _refuse_fused_weights(model, method, skip)
    from prunekit.weights import experts

    with experts.unfused_experts(model, check=False):  # skip globs may name experts (one Linear each)
        _check_skip(model, skip)
        _check_pattern_fits(model, tuple(skip), nm)
    # numpy numbers as Python ones: validated alike, and the result's options stay JSON (save_pruned failed)
    options = {k: v.item() if isinstance(v, np.generic) else v for k, v in options.items()}
    prune_options(method, options)
    stat = spec.stat_for(options)
    if stat is None and calibration is _WIKI and profile == "uniform":  # given: it measures the error
        calibration = None  # data-free: don't pay a calibration pass for the default
    from prunekit.evaluate import check_pattern, sparsity, zero_masks, zeros_refilled

    zeros_before = sparsity(model)["layers"]  # an input pruned before: where its zeros are (not in `seconds`)
    was_zero = zero_masks(model) if any(z > 0 for z in zeros_before.values()) else {}
    start = time.perf_counter()
    ids, calib_info = _calibration(calibration, tokenizer, model, samples=samples, seqlen=seqlen, seed=seed)
    if stat is not None and ids is None:
        raise InputError(f"method {method} needs calibration text; give calibration='wiki' or a file")
    if profile == "owl" and ids is None:
        raise InputError("profile='owl' needs calibration text (its outlier ratios are Wanda scores on it), also for "
                         "magnitude; give calibration='wiki' or a file")
    was_training = module_modes(model)
    model.eval()
    try:
        with contextlib.ExitStack() as moe:
            if experts.has_fused_experts(model):  # one Linear per expert while pruning (routers stay dense)
                moe.enter_context(experts.unfused_experts(model))
            layer_ratios, profile_record = None, None
            if profile == "owl":
                layer_ratios, profile_record = _owl(model, ids, ratio=ratio, m=owl_m, lam=owl_lambda,
                                                    skip=tuple(skip), batch_size=batch_size, progress=progress)
            layers = _run(spec, model, ids, ratio=ratio, nm=nm, tokenizer=tokenizer, samples=samples, seqlen=seqlen,
                          seed=seed, skip=tuple(skip), sequential=sequential, batch_size=batch_size,
                          progress=progress, options=options, stat=stat, layer_ratios=layer_ratios)
    finally:
        restore_modes(was_training)
    seconds = time.perf_counter() - start
    sizes = {r.name: r.shape[0] * r.shape[1] for r in layers}
    return PruneResult(
        method=method, ratio=ratio, pattern=str(nm) if nm else None, sequential=sequential, layers=layers,
        # every option with the value it ran with, defaults included: DSnoT's base was missing unless typed
        seconds=seconds, calibration=calib_info,
        options={k: _recordable(v) for k, v in dict(method_options(method), **options, skip=list(skip)).items()},
        input_sparsity=sum(zeros_before.get(n, 0.0) * s for n, s in sizes.items()) / max(sum(sizes.values()), 1),
        input_zeros_refilled=zeros_refilled(was_zero, model) if was_zero else 0,
        model_sparsity=sparsity(model)["model_total"],
        pattern_violations=check_pattern(model, nm, skip=tuple(skip)) if nm else None,  # --skip: dense on purpose
        profile=profile_record,
    )


PROFILES = ("uniform", "owl")
OWL_METHODS = ("magnitude", "wanda", "sparsegpt", "dsnot")  # per-layer methods with a ratio (the paper's three + DSnoT)


def check_profile(profile, method: str, nm, ratio: float, m, lam) -> tuple[float, float]:
    """Refuse a profile other than uniform / owl, OWL with a pattern or a method it cannot drive, and bad OWL
    numbers; the checked (m, lambda)."""
    if profile not in PROFILES:
        raise InputError(f"profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    if profile == "uniform":
        if (m, lam) != (owl.M, owl.LAMBDA):
            raise InputError("owl_m and owl_lambda set OWL's block ratios; give profile='owl' (--profile owl) or "
                             "leave them out")
        return m, lam
    if nm is not None:
        raise InputError(f"profile 'owl' sets a ratio per block, but the pattern {nm} fixes every layer's ratio at "
                         f"{ratio:g}; use --ratio (unstructured) with OWL, or the uniform profile with a pattern")
    if method not in OWL_METHODS:
        raise InputError(f"profile 'owl' drives the per-layer methods {', '.join(OWL_METHODS)}, not {method}")
    return owl.check_owl(m, lam)


def _owl(model, ids, *, ratio, m, lam, skip, batch_size, progress) -> tuple[dict[str, float], dict]:
    """OWL's ratio for each Linear to prune (its block's), on the dense `model`, and the record of the blocks'."""
    prefix, blocks = find_blocks(model)
    layers = [target_linears(b, f"{prefix}.{i}", skip) for i, b in enumerate(blocks)]
    outliers = owl.outlier_ratios(model, ids, m=m, skip=skip, batch_size=batch_size, progress=progress)
    ratios = owl.owl_ratios(outliers, ratio=ratio, lam=lam, pruned=[bool(names) for names in layers])
    return ({name: r for names, r in zip(layers, ratios) for name in names},
            {"name": "owl", "m": m, "lambda": lam, "outlier_ratios": outliers, "ratios": ratios})


def _recordable(value):
    """An option as the record holds it: token ids (D-Pruner's domain as a tensor) as their shape, a `Text` as its
    description, a path as a string, so `save_pruned(metadata=result)` does not fail on them after the work."""
    if isinstance(value, (torch.Tensor, np.ndarray)):
        return f"token ids {list(value.shape)}"
    if isinstance(value, Text):
        return value.describe()
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def _run(spec, model, ids, *, ratio, nm, tokenizer, samples, seqlen, seed, skip, sequential, batch_size, progress,
         options, stat, layer_ratios=None) -> list:
    if spec.prune_model is not None:
        return spec.prune_model(
            model, ids, ratio=ratio, pattern=nm, tokenizer=tokenizer, samples=samples, seqlen=seqlen, seed=seed,
            skip=tuple(skip), progress=progress, **options,
        )
    params = inspect.signature(spec.fn).parameters
    seeded = {"seed": seed} if "seed" in params else {}  # one seed for the run (ARMOR's group sampling)
    fn = functools.partial(spec.fn, pattern=nm, **seeded, **options)
    takes_name = "name" in params
    layer_ratios = layer_ratios or {}  # OWL: each Linear at its block's ratio

    def prune_one(w, s, name):
        return fn(w, s, ratio=layer_ratios.get(name, ratio), **({"name": name} if takes_name else {}))

    layers, _ = prune_blocks(model, ids, prune_one, stat=stat, skip=skip, sequential=sequential,
                             batch_size=batch_size, progress=progress)
    return layers
