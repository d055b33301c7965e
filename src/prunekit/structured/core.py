"""`prune_structured` and its checks: run a registered structured method on a model and shrink its
Linear layers to the chosen widths (the package docstring, `prunekit.structured`, shows the workflow)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch
from torch import nn

from prunekit.errors import InputError, check_model, check_seed, int_at_least, module_modes, restore_modes
from prunekit.select import check_ratio
from prunekit.structured.tyr import STRUCTURES, tyr_options
from prunekit.structured.units import (Widths, attention, block_params, check_heads_prunable, layer_widths,
                                       mlp_of, model_dims)

__all__ = ["StructuredResult", "prune_structured", "check_request"]


@dataclass
class StructuredResult:
    """What `prune_structured` did: the widths chosen per layer against the dense ones, sizes and the method's info."""
    method: str
    ratio: float  # asked: fraction of block Linear weights to remove
    structure: str
    widths: list[Widths]
    dense_widths: Widths
    block_params_before: int
    block_params_after: int
    params_before: int
    params_after: int
    seconds: float
    info: dict = field(default_factory=dict)

    @property
    def removed(self) -> float:
        """Measured fraction of the block Linear weights removed."""
        return 1 - self.block_params_after / self.block_params_before

    def to_dict(self) -> dict:
        return {
            "method": self.method, "ratio": self.ratio, "structure": self.structure, "removed": self.removed,
            "dense_widths": self.dense_widths.to_dict(), "widths": [w.to_dict() for w in self.widths],
            "block_params_before": self.block_params_before, "block_params_after": self.block_params_after,
            "params_before": self.params_before, "params_after": self.params_after, "seconds": self.seconds,
            "info": self.info,
        }

    def table(self) -> str:
        """The per-layer widths chosen, as markdown."""
        rows = ["| layer | query heads | MLP neurons |", "| ---: | ---: | ---: |"]
        rows += [f"| {i} | {w.heads} / {self.dense_widths.heads} | {w.intermediate} / {self.dense_widths.intermediate} |"
                 for i, w in enumerate(self.widths)]
        return "\n".join(rows)


_PLAIN_OPTIONS = {"uniform-structured": {"neuron_step", "damp", "batch_size"}, "magnitude-structured": set(),
                  "wanda-structured": {"batch_size"}}


def check_request(method: str, *, ratio: float, structure: str, options: dict, dims=None) -> None:
    """Validate a structured request before any slow work (and, given the model's `dims`, its widths)."""
    from prunekit import registry
    from prunekit.structured.tyr import uniform_widths

    registry.get(method, "structured")
    check_ratio(ratio)
    if structure not in STRUCTURES:
        raise InputError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    if method == "tyr":
        import inspect

        known = set(inspect.signature(tyr_options).parameters)
        extra = set(options) - known
        if extra:
            raise InputError(f"tyr does not take the option(s) {', '.join(sorted(extra))} "
                             f"(its options: {', '.join(f'{k}=' for k in sorted(known))})")
        tyr_options(**options)
    else:
        extra = set(options) - _PLAIN_OPTIONS[method]
        if extra:
            # NAME=: the command line's message kept batch_size, a --option, instead of naming --batch-size
            allowed = ", ".join(f"{k}=" for k in sorted(_PLAIN_OPTIONS[method])) or "none"
            raise InputError(f"{method} does not take the option(s) {', '.join(sorted(extra))} (its options: "
                             f"{allowed})")
        if "neuron_step" in options or "damp" in options or "batch_size" in options:
            tyr_options(**options)
    if dims is not None:
        uniform_widths(dims, ratio=ratio, structure=structure)


_SHRUNK = {"attn": ("q_proj", "o_proj", "q_norm", "num_key_value_groups", "num_heads"),
           "mlp": ("gate_proj", "up_proj", "gate_up_proj", "down_proj", "intermediate_size")}


def _dense_modules(model: nn.Module) -> list[tuple[nn.Module, dict]]:
    """What the structured methods replace (they build new, smaller Linears; the dense ones are not changed)."""
    from prunekit.weights.engine import find_blocks

    held = []
    for block in find_blocks(model)[1]:
        for part, names in ((attention(block), _SHRUNK["attn"]), (mlp_of(block), _SHRUNK["mlp"])):
            held.append((part, {n: getattr(part, n) for n in names if hasattr(part, n)}))
    return held


def _put_back(held: list[tuple[nn.Module, dict]]) -> None:
    for part, attrs in held:
        for name, value in attrs.items():
            setattr(part, name, value)


def calibration_windows(method: str, tokenizer, text, *, samples: int, seqlen: int, seed: int,
                        options: dict) -> torch.Tensor:
    """`samples` windows of `text` for `method`; for Týr, ``fitness_samples`` more (set in `options`, default
    `samples`) at the end, which its search holds out for the fitness. The command line draws them here too."""
    from prunekit.text import calibration_ids

    extra = 0
    if method == "tyr":  # held-out windows for the search's fitness (default: as many as the supernet's)
        if options.get("fitness_samples") is None:
            options["fitness_samples"] = samples
        extra = options["fitness_samples"]
    try:
        return calibration_ids(tokenizer, text, samples=samples + extra, seqlen=seqlen, seed=seed)
    except InputError as e:
        if not extra:
            raise
        raise InputError(f"{e} (Týr draws fitness_samples={extra} windows on top of --samples {samples} for its "
                         "search: pass --option fitness_samples=N with a smaller N, 0 to score on the "
                         "calibration windows themselves)") from None


def prune_structured(model: nn.Module, *, method: str = "tyr", ratio: float, structure: str = "both",
                     tokenizer=None, calibration="wiki", samples: int = 128, seqlen: int = 512, seed: int = 0,
                     progress: bool = True, **options) -> StructuredResult:
    """Prune `model`'s heads and/or neurons in place (physically) with a structured `method`.

    `calibration`: a text source (``"wiki"``, ``"austen"``, a file path, a `prunekit.Text`) cut into `samples`
    windows of `seqlen` tokens with `tokenizer`, or a ready ``[samples, seqlen]`` LongTensor of token ids. Týr
    draws ``fitness_samples`` more windows from the text (default: `samples` more) that only its search's
    fitness sees; with ready ids, ``fitness_samples=F`` holds out their last F rows (default: none).
    `magnitude-structured` needs none. Method options (Týr: ``iterations``, ``generations``, ``offspring``,
    ``stages``, ``kl_topk``, ``propagate``, ``levels``, ``mlp_step``, ``neuron_step``, ``damp``,
    ``batch_size``) go as keywords.

    All or nothing: an error or interrupt on the way (Týr's search installs candidate widths as it goes) puts
    every block's dense modules back and the model's train/eval mode with them.
    """
    from prunekit import registry
    from prunekit.text import Text, check_token_ids, load_text
    from prunekit.weights.io import check_finite_weights, refuse_composite

    check_request(method, ratio=ratio, structure=structure, options=options)
    check_model(model, "prune_structured")
    refuse_composite(model.config, "structured pruning")  # it pruned, then failed to save (no hidden_size)
    samples = int_at_least(samples, "samples", 1)  # "2" reached Týr as "2" + "2" = "22"
    seqlen = int_at_least(seqlen, "seqlen", 2)
    seed = check_seed(seed)
    check_finite_weights(model, "the model")  # a NaN weight failed in an SVD after the model had changed
    from prunekit.weights.engine import factorized_names, first_of

    factorized = factorized_names(model)
    if factorized:  # an AttributeError traceback ('ArmorLinear' object has no attribute 'weight')
        raise InputError(f"{first_of(factorized)} is already factorized (ARMOR); structured pruning removes heads "
                         "and neurons of dense Linears: prune the widths first, then ARMOR")
    dims = model_dims(model)
    check_request(method, ratio=ratio, structure=structure, options=options, dims=dims)
    if structure in ("heads", "both"):
        check_heads_prunable(model, dims)
    spec = registry.get(method, "structured")
    ids = None
    if method != "magnitude-structured" or isinstance(calibration, torch.Tensor):
        if isinstance(calibration, torch.Tensor):
            ids = calibration
            if ids.dim() != 2 or ids.is_floating_point() or ids.is_complex() or ids.dtype == torch.bool:
                raise InputError(f"calibration ids must be integer token ids [samples, seqlen], got {ids.dtype} "
                                 f"{list(ids.shape)}")
            ids = ids.long()  # int32 ids were refused here (prune takes them)
            if ids.numel() == 0:
                raise InputError("calibration ids are empty; give [samples, seqlen] token ids")
            check_token_ids(model, ids, what="calibration tensor")
        else:
            if tokenizer is None:
                raise InputError(f"{method} needs calibration text and a tokenizer (tokenizer=...)")
            text = calibration if isinstance(calibration, Text) else load_text(calibration, purpose="calibration")
            ids = calibration_windows(method, tokenizer, text, samples=samples, seqlen=seqlen, seed=seed,
                                      options=options)
            check_token_ids(model, ids, what="calibration text")
    widths_before = layer_widths(model)
    before_block = block_params(dims, widths_before)
    before = sum(p.numel() for p in model.parameters())
    start = time.perf_counter()
    was_training = module_modes(model)
    dense = _dense_modules(model)
    model.eval()
    try:
        outcome = spec.fn(model, ids, ratio=ratio, structure=structure, seed=seed, progress=progress, **options)
    except BaseException:
        _put_back(dense)
        raise
    finally:
        restore_modes(was_training)
    widths = layer_widths(model)
    if widths != outcome.widths:
        raise RuntimeError("the pruned model's widths differ from the method's decision; this is a bug in prunekit")
    return StructuredResult(
        method, ratio, structure, widths, Widths(dims.heads, dims.intermediate), before_block,
        block_params(dims, widths), before, sum(p.numel() for p in model.parameters()),
        time.perf_counter() - start, outcome.info,
    )
