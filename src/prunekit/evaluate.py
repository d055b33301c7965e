"""Honest numbers for a model: perplexity on held-out text, measured sparsity, N:M conformance.

>>> prunekit.perplexity(model, tokenizer, "wiki", seqlen=512, tokens=16384).ppl  # doctest: +SKIP
"""

from __future__ import annotations

import math
import sys
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from prunekit.errors import InputError, check_model, int_at_least, module_modes, restore_modes
from prunekit.select import NM, parse_pattern
from prunekit.text import Text, check_token_ids, evaluation_ids, load_text
from prunekit.weights.engine import find_blocks, get_weight, input_device, target_linears, zeros_in
from prunekit.weights.io import check_finite_weights

__all__ = ["Perplexity", "perplexity", "perplexity_of_ids", "sparsity", "check_pattern"]

EVAL_TOKENS = 16384


@dataclass
class Perplexity:
    """Perplexity on held-out windows: ``ppl = exp(nll)``, the mean over the tokens each window predicts (all but
    its first: ``windows * (seqlen - 1)``); `tokens` is the text evaluated, ``windows * seqlen``."""
    ppl: float
    nll: float  # mean negative log-likelihood per predicted token
    tokens: int  # windows x seqlen
    seqlen: int
    windows: int
    text: dict  # source, documents, sha256

    def to_dict(self) -> dict:
        return asdict(self)

    def __float__(self) -> float:  # float(prunekit.perplexity(...)): the perplexity itself
        return float(self.ppl)


def _overflow_error(model: nn.Module, window: int, windows: int) -> InputError:
    dtype = next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)
    fix = ("check its weights" if dtype in (torch.float32, torch.float64) else
           "evaluate it in float32 (prunekit eval --dtype float32, prune --compute-dtype float32, or "
           "prunekit.load_model(..., dtype='float32'))")
    return InputError(f"the model gives NaN or infinite logits on window {window} of {windows} (its "
                      f"{str(dtype).removeprefix('torch.')} activations overflow); {fix}")


def perplexity_of_ids(model: nn.Module, ids: torch.Tensor, *, batch_size: int = 4, progress: bool = True,
                      desc: str = "perplexity") -> tuple[float, int]:
    """``(mean NLL, predicted tokens)`` of `model` over windows `ids` (``[n, seqlen]``); `desc` labels the bar."""
    from tqdm.auto import tqdm

    batch_size = int_at_least(batch_size, "batch_size", 1)
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.shape[0] < 1 or ids.shape[1] < 2:
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"ids must be token windows [n >= 1, seqlen >= 2] (one next-token prediction at least), "
                         f"got {shape}")
    total, count = 0.0, 0
    ids = ids.to(input_device(model))  # a model on a GPU scores there
    was_training = module_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            for start in tqdm(range(0, ids.shape[0], batch_size), desc=desc, unit="batch",
                              disable=not progress):
                batch = ids[start : start + batch_size]
                logits = model(input_ids=batch, use_cache=False).logits  # [b, seq, vocab]
                # one window at a time: the whole batch's shifted, reshaped fp32 copy and its log-softmax held
                # three batch-sized logits at once (+1.2 GB for 4 x 512 tokens of a 49k vocabulary)
                for j, (row, target) in enumerate(zip(logits, batch)):  # [seq, vocab], [seq]
                    loss = float(torch.nn.functional.cross_entropy(row[:-1].float(), target[1:], reduction="sum"))
                    if not math.isfinite(loss):  # NaN logits were reported as perplexity inf, without a word
                        raise _overflow_error(model, start + j, ids.shape[0])
                    total += loss
                count += batch[:, 1:].numel()
                del logits
    finally:  # the caller's mode, also after an error or Ctrl-C
        restore_modes(was_training)
    return total / count, count


def perplexity(model: nn.Module, tokenizer, text: str | Text = "wiki", *, seqlen: int = 512,
               tokens: int | None = EVAL_TOKENS, batch_size: int = 4, progress: bool = True,
               fit: bool = False, desc: str = "perplexity") -> Perplexity:
    """Perplexity ``exp(mean NLL)`` over the first ``tokens // seqlen`` windows of held-out `text` (all its windows
    for ``tokens=None``). A text too short for `tokens` is refused; ``fit=True`` scores all its whole windows
    instead (the result's ``tokens`` and ``windows`` say how many)."""
    check_model(model, "perplexity")
    check_finite_weights(model, "the model")  # a NaN weight gave ppl=inf, nll=nan
    if callable(getattr(model, "can_generate", None)) and not model.can_generate():  # a masked LM got a number
        raise InputError(f"perplexity here is next-token perplexity, which needs a causal LM; {type(model).__name__} "
                         "is not one")
    int_at_least(batch_size, "batch_size", 1)
    if tokens is not None:
        int_at_least(tokens, "tokens", 1)
    if tokenizer is None or not callable(tokenizer):
        raise InputError("perplexity needs the model's tokenizer: perplexity(model, tokenizer, text)")
    source = text if isinstance(text, Text) else load_text(text, purpose="evaluation")
    ids = evaluation_ids(tokenizer, source, seqlen=seqlen, tokens=tokens, fit=fit)
    check_token_ids(model, ids, what="evaluation text")
    nll, _ = perplexity_of_ids(model, ids, batch_size=batch_size, progress=progress, desc=desc)
    ppl = math.exp(nll) if nll < math.log(sys.float_info.max) else math.inf  # math.exp overflowed past ~709
    return Perplexity(ppl, nll, ids.numel(), seqlen, ids.shape[0], source.describe())


def _block_linears(model: nn.Module, skip=()) -> dict[str, nn.Module]:
    """The Linears weight pruning targets: every block Linear, each fused MoE expert as its own (see
    `prunekit.weights.experts`; valid only inside `unfused_experts`), routers left out, and those `skip` names."""
    prefix, blocks = find_blocks(model)
    return {name: m for i, block in enumerate(blocks)
            for name, m in target_linears(block, f"{prefix}.{i}", skip).items()}


def sparsity(model: nn.Module) -> dict:
    """Fraction of zeros in every Linear of the decoder blocks (fused MoE experts one by one, routers not
    counted): ``{"total": over them all (weighted by size), "layers": {name: fraction}, "model_total": over
    every parameter of the model (embeddings, norms and head included)}``."""
    from prunekit.weights import experts

    check_model(model, "sparsity")
    layers, zeros, numel = {}, 0, 0
    with experts.unfused_experts(model, check=False, strict=False):
        for name, module in _block_linears(model).items():
            w = get_weight(module)
            z = zeros_in(w)
            layers[name] = z / w.numel()
            zeros, numel = zeros + z, numel + w.numel()
    all_params = sum(p.numel() for p in model.parameters())
    all_zeros = sum(zeros_in(p) for p in model.parameters())
    return {"total": zeros / max(numel, 1), "layers": layers, "model_total": all_zeros / all_params}


def check_pattern(model: nn.Module, pattern: str | NM, *, skip=()) -> list[str]:
    """Names of block Linears that break `pattern` (at most n nonzeros in every m consecutive inputs); none
    for no pattern (None or "unstructured"). `skip`: glob patterns of layers left dense on purpose (prune's
    ``skip``), not checked."""
    skip = (skip,) if isinstance(skip, str) else tuple(skip)
    nm = parse_pattern(pattern)
    if nm is None:
        return []
    from prunekit.weights import experts

    bad = []
    with experts.unfused_experts(model, check=False, strict=False):
        for name, module in _block_linears(model, skip).items():
            w = get_weight(module)  # [out, in]
            if w.shape[1] % nm.m or ((w.reshape(w.shape[0], -1, nm.m) != 0).sum(-1) > nm.n).any():
                bad.append(name)
    return bad


def zero_masks(model: nn.Module) -> dict[str, tuple[torch.Size, np.ndarray]]:
    """Where each block Linear holding zeros is zero, by the names `sparsity` uses: its shape and the bool mask
    packed 8 to a byte (``np.packbits`` of the flat mask; bool tensors held 100 MB for SmolLM2-135M)."""
    from prunekit.weights import experts

    masks = {}
    with experts.unfused_experts(model, check=False, strict=False):
        for name, m in _block_linears(model).items():
            zero = (get_weight(m) == 0).cpu()
            if bool(zero.any()):
                masks[name] = (zero.shape, np.packbits(zero.reshape(-1).numpy()))
    return masks


def zeros_refilled(masks: dict[str, tuple[torch.Size, np.ndarray]], model: nn.Module) -> int:
    """How many zeros of `masks` (`zero_masks` before a step that keeps layer names and shapes) are nonzero now."""
    from prunekit.weights import experts

    count = 0
    with experts.unfused_experts(model, check=False, strict=False):
        layers = _block_linears(model)
        for name, (shape, packed) in masks.items():
            if name not in layers or get_weight(layers[name]).shape != shape:
                continue
            nonzero = (get_weight(layers[name]) != 0).cpu().reshape(-1).numpy()
            count += int((np.unpackbits(packed, count=nonzero.size).astype(bool) & nonzero).sum())
    return count


def zeros_kept(step: str, input_sparsity: float, model: nn.Module, pattern: str | None = None, *,
               skip=(), output: str = "OUT") -> tuple[dict | None, str | None]:
    """What a step that is not weight pruning (depth or width pruning, recovery, fine-tuning) left of a sparse
    input's zeros: ``({"input_sparsity", "sparsity", "input_pattern", "pattern_kept"}, note)``, the note (a
    sentence, or None) when the step filled many of them (5 points of sparsity or more) or broke `pattern` (the
    input's recorded N:M pattern; `skip` the layers its pruning left dense; `output`: where the note says the model
    is). ``(None, None)`` for a dense input."""
    if input_sparsity <= 0.005 and pattern is None:
        return None, None
    now = sparsity(model)["total"]
    broken = bool(check_pattern(model, pattern, skip=skip)) if pattern else False
    record = {"input_sparsity": input_sparsity, "sparsity": now, "input_pattern": pattern,
              "pattern_kept": None if pattern is None else not broken}
    if not broken and now >= input_sparsity - 0.05:
        return record, None
    return record, (f"the input was {input_sparsity:.4f} sparse ({pattern or 'unstructured'}) in its block Linears "
                    f"and {step} filled its zeros: the output is {now:.4f} sparse"
                    + (f" and breaks {pattern}" if broken else "")
                    + f"; prune the weights after this step (prunekit prune {output} --method ...) to make "
                    "it sparse again")
