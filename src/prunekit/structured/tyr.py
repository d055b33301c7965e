"""Týr-the-Pruner: a supernet of locally pruned sublayers and an evolutionary search of the sparsity distribution.

Paper: Li et al. 2025, "Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity Distribution Optimization"
(NeurIPS 2025), https://arxiv.org/abs/2503.09657, code https://github.com/AMD-AGI/Tyr-the-Pruner
(``prune_to_supernet.py``, ``search_sparsity_dist.py``).

The algorithm, for a budget of ``ratio`` of the decoder blocks' Linear weights removed:

1. **Centre.** Start from the uniform distribution (`uniform_widths`): every layer keeps the same query heads
   per KV group and the same MLP neurons.
2. **Supernet.** Walk the blocks in order on calibration tokens. For each sublayer (o_proj with its heads,
   down_proj with its neurons) prune with the local second-order pruner (`local.prune_path`) to 9 levels
   ``centre + k Δ``, ``k = -4..4`` (clipped to what the layer can keep). Δ is 12.5% of the sublayer's units at
   the first iteration for the MLP and one query head per KV group for attention (the finest step GQA allows).
   **Expectation error accumulation**: the next sublayer and block are calibrated on
   ``Σ_e d_e W_e / Σ_e d_e`` (``d_e`` = kept fraction of level e; o_proj and down_proj feed the residual
   linearly, so this is the density-weighted mean of the pruned copies' outputs) -- ``propagate="expectation"``,
   the default, as in the paper -- or on the centre level (``propagate="centre"``), the released code's
   "median, faster" variant. Both cost the same here (one weight average), so the default follows the paper,
   whose ablation finds it better than propagating a single uniform copy.
3. **Search.** A (1+λ) evolutionary search over the level offsets: a child is the parent with
   ``min(U{1..4}, U{1..4})`` moves, each taking one level from a sublayer and giving one to another sublayer
   of the same type, so the parameter count is held exactly. Fitness = KL(dense ‖ pruned) on the dense
   model's top-`kl_topk` next-token logits (both renormalised over that support) on calibration windows;
   selection in stages on growing token budgets (`stages`), each on fresh random windows; the parent joins
   before the last stage (elitism). ``hidden_weight`` > 0 adds the paper's hidden-state term (its Eq. 6 sums
   distances of the first, median and last layers' hidden states to the logits' KL; the released code scores the
   logits alone, and so does the default, 0): ``hidden_weight`` times the mean over blocks 0, L/2 and L-1 of the
   per-token relative squared error ``||h - h'||^2 / ||h||^2`` of their outputs (`relative_error`). Measured on
   SmolLM2-135M at 30% (bench/structured.py's settings, seed 0), perplexity on Wikipedia / Pride and Prejudice /
   the other five Austen novels / the Python docs: hidden_weight 1 gave 31.67 / 103.02 / 121.79 / 60.62 against
   the default's 29.84 / 98.50 / 125.47 / 48.96 (uniform: 32.64 / 96.16 / 116.19 / 68.25); so not the default.
4. **Coarse to fine.** Each further iteration rebuilds the supernet around the best distribution with the MLP
   step halved; the result is the last iteration's best, physically pruned (`units`).

Departures from the reference, and why:

- Sizes are scaled to a CPU: defaults 2 iterations, 8 generations, 8 offspring, stages 256 tokens -> keep
  2, 8192 tokens -> keep 1 (reference: 4 iterations, 50 generations, 128 offspring, 2K/16K/128K tokens ->
  16/4/1) and ``kl_topk`` 1024 (reference 8192, for vocabularies of 128K). All are options. Measured on
  SmolLM2-135M with 32 x 256 calibration tokens (bench/structured.py): 15-26 minutes with one thread while a
  second job shared the 2-core CPU (stages 256:2,1024:1: 7-9 minutes); the supernet's cost grows with the
  calibration tokens (128 x 512, the CLI's default, is 8x more). `prunekit prune smollm2-135m --method tyr
  --ratio 0.3` with every default took 39 minutes with 2 threads, its first 27 sharing the CPU with a bench job;
  alone it ran a supernet block in about 6 s (30 blocks) and a search generation in about 27 s.
- Attention's step stays one query head per KV group at every iteration (it cannot halve); the reference
  halves both steps, in weights.
- Levels are snapshots of one greedy path (see `local`), not nine separate runs.
- Candidates run physically pruned (the reference runs zero-filled weights), so the search itself gets
  faster as the budget grows.
- Fitness windows are held out from the supernet. The reference draws both from FineWeb-Edu's first half, but
  its 4M calibration tokens dwarf the fitness budgets; with 8K tokens here, the supernet's least-squares refits
  fit the calibration windows themselves, and a search scored on those same windows rewards the levels that
  overfit them. So `prune_structured`, given calibration text, draws ``fitness_samples`` more windows
  (default: as many as `samples`) that only the teacher and the fitness see; with ready ids, the last
  ``fitness_samples`` rows are held out (default none: the search then scores on the supernet's windows).
  Measured on SmolLM2-135M (bench/structured.py, 32 x 256 calibration tokens, wiki / Austen perplexity; scored
  on the supernet's windows -> on 32 held-out windows; uniform): 20% 23.18 / 68.90 -> 22.92 / 73.07 (24.18 /
  71.63); 30% 30.42 / 96.19 -> 30.00 / 97.82 (32.53 / 96.45); 50% 76.41 / 286.16 -> 76.01 / 243.13 (78.22 /
  281.55). Wikipedia improves at every budget and Austen by 15% at 50%, at 2-6% on Austen at 20-30%; a larger
  last stage on the supernet's windows (4096 tokens) left 50% at 76.61 / 286.42.
- The last selection stage runs on 8192 tokens (all 32 held-out windows in the bench), not 1024: the stage
  picks the generation's parent, and on 1024 tokens its choice is noisy. Calibrated on Wikipedia alone, it gave
  (seed 0) 22.65 / 69.48, 29.70 / 103.61 and 71.94 / 265.22 against the 1024-token stage's 22.92 / 73.07,
  30.00 / 97.82 and 76.01 / 243.13: closer fit to the calibration domain, worse on Austen at 30% and 50%.
  Calibrated on both (``"wiki+austen"``), over 5 seeds, it lowered both texts' mean at every budget:
  Wikipedia / Austen at 20 / 30 / 50% 24.86 / 32.16, 33.26 / 38.81, 101.02 / 84.18 against the 1024-token
  stage's 25.59 / 33.25, 34.49 / 39.06, 101.40 / 87.91 (uniform: 26.72 / 35.87, 37.07 / 42.09, 107.73 /
  89.89), and Týr fell below uniform in 29 of the 30 same-seed pairs, against 27 of 30. It costs about 2-3x
  the pruning time (bench/structured.py). Hence the default since 2026-11-30.

``final="sequential"`` (the default; not in the reference, whose result is the supernet's levels: ``final="supernet"``) re-prunes the model once more at the
searched widths with each block calibrated on the already-pruned real blocks before it, instead of keeping the
supernet's levels, which were calibrated on the expectation over levels (the paper's own ablation puts that
expectation behind calibrating on the single real model). Measured on SmolLM2-135M (bench/structured.py, the
searched widths re-pruned): at 30%, 30.42 / 96.19 perplexity (Wikipedia / Austen) against the supernet's
31.08 / 102.53 and uniform's 32.53 / 96.45; at 50%, 74.66 / 277.45 against 86.13 / 315.94 and 78.22 / 281.55.
Hence the default. It costs one more calibration pass.

``uniform`` (`prune_uniform`) is the same pipeline with only the centre level and no search: the paper's
"w/o search" baseline.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from prunekit.errors import InputError, int_at_least
from prunekit.select import check_ratio
from prunekit.structured import local
from prunekit.structured.units import (
    Dims, Widths, attention, block_params, check_widths, head_columns, mlp_of, model_dims, shrink_attention,
    shrink_mlp,
)
from prunekit.weights.engine import capture_block_inputs, find_blocks, for_block, input_device

__all__ = ["STRUCTURES", "uniform_widths", "mutate", "prune_tyr", "prune_uniform", "tyr_options", "sparse_kl"]

STRUCTURES = ("heads", "neurons", "both")
PROPAGATE = ("expectation", "centre")


def _check_structure(structure: str) -> str:
    if structure not in STRUCTURES:
        raise InputError(f"structure must be one of {', '.join(STRUCTURES)}, got {structure!r}")
    return structure


def uniform_widths(dims: Dims, *, ratio: float, structure: str) -> list[Widths]:
    """The same widths for every layer, removing as close to `ratio` of the block Linear weights as units allow.

    ``heads``: query heads only (equal per KV group); ``neurons``: MLP neurons only; ``both``: the same fraction
    of the prunable weights of attention (q/o) and MLP, the head count rounded and the neurons making up the
    rest of the budget.
    """
    check_ratio(ratio)
    _check_structure(structure)
    if ratio == 0:
        raise InputError("ratio 0 removes nothing; give a fraction of the block weights to remove, e.g. --ratio 0.3")
    dense = Widths(dims.heads, dims.intermediate)
    per_layer = block_params(dims, [dense])
    removed = ratio * per_layer  # weights to remove from each layer
    group_step = dims.kv_heads * dims.head_params  # one query head less in every group
    if structure == "heads" and dims.fused_qkv:
        raise InputError("this model's attention fuses q, k and v into one qkv_proj and splits it by the head count "
                         "all layers share, so no head can go; use --structure neurons (--structure both prunes only "
                         "neurons here)")
    if structure == "heads" and dims.group == 1:  # "give a larger ratio", then "at most 0.000": one message
        raise InputError(f"head pruning removes query heads within each group sharing a KV head, and this model has "
                         f"as many KV heads as query heads ({dims.heads}: multi-head attention), so no head can go; "
                         "use --structure neurons (--structure both prunes only neurons here)")
    if structure == "heads":
        x = round(removed / group_step)
        most = (dims.group - 1) * group_step / per_layer
        if x > dims.group - 1:
            raise InputError(
                f"ratio {ratio:g} with --structure heads would leave layers with no query heads: heads alone can "
                f"remove at most {most:.3f} of the block weights (one head per KV group must stay); use "
                "--structure neurons or both"
            )
        if x == 0:
            raise InputError(f"ratio {ratio:g} is below half of the smallest head step ({group_step / per_layer:.3f} "
                             "of the block weights); give a larger ratio or --structure neurons/both")
        return [Widths((dims.group - x) * dims.kv_heads, dims.intermediate)] * dims.layers
    if structure == "neurons":
        n = round(removed / dims.neuron_params)
        if n >= dims.intermediate:
            raise InputError(f"ratio {ratio:g} with --structure neurons would remove every MLP neuron; the MLP holds "
                             f"{dims.intermediate * dims.neuron_params / per_layer:.3f} of the block weights")
        if n == 0:
            raise InputError(f"ratio {ratio:g} removes less than one neuron per layer; give a larger ratio")
        return [Widths(dims.heads, dims.intermediate - n)] * dims.layers
    prunable = dims.heads * dims.head_params + dims.intermediate * dims.neuron_params
    s = removed / prunable
    x = 0 if dims.fused_qkv else min(round(dims.group * s), dims.group - 1)
    n = round((removed - x * group_step) / dims.neuron_params)
    if n >= dims.intermediate:
        raise InputError(f"ratio {ratio:g} would remove every MLP neuron; give a smaller ratio")
    n = max(n, 0)
    if x == 0 and n == 0:
        raise InputError(f"ratio {ratio:g} removes less than one neuron per layer; give a larger ratio")
    return [Widths((dims.group - x) * dims.kv_heads, dims.intermediate - n)] * dims.layers


@dataclass
class Sublayer:
    """One searchable sublayer: its layer, kind ("attn" or "mlp"), centre and step in units, levels by offset."""

    layer: int
    kind: str
    centre: int
    step: int
    lo: int
    hi: int
    levels: dict[int, local.Level] = field(default_factory=dict)

    def units(self, offset: int) -> int:
        return self.centre + offset * self.step


def _sublayers(dims: Dims, centre: list[Widths], structure: str, mlp_step: int, spread: int) -> list[Sublayer]:
    subs = []
    for i, w in enumerate(centre):
        if structure in ("heads", "both") and not dims.fused_qkv:  # a fused qkv_proj keeps its heads
            g = w.heads // dims.kv_heads
            lo, hi = max(-spread, 1 - g), min(spread, dims.group - g)
            subs.append(Sublayer(i, "attn", w.heads, dims.kv_heads, lo, hi))
        if structure in ("neurons", "both"):
            lo = max(-spread, -((w.intermediate - 1) // mlp_step))
            hi = min(spread, (dims.intermediate - w.intermediate) // mlp_step)
            subs.append(Sublayer(i, "mlp", w.intermediate, mlp_step, lo, hi))
    return subs


def mutate(parent: np.ndarray, lo: np.ndarray, hi: np.ndarray, kinds: np.ndarray, rng: np.random.Generator,
           moves: int | None = None) -> np.ndarray:
    """A child of `parent` (level offsets): each move takes a level from one sublayer and gives one to another of
    the same kind, so the parameter count stays exactly the parent's. ``moves`` defaults to
    ``min(U{1..4}, U{1..4})`` (the reference's)."""
    child = parent.copy()
    n = moves if moves is not None else int(min(rng.integers(1, 5), rng.integers(1, 5)))
    for _ in range(n):
        options = []
        for kind in np.unique(kinds):
            down = np.flatnonzero((kinds == kind) & (child > lo))
            up = np.flatnonzero((kinds == kind) & (child < hi))
            if len(down) and len(up) and not (len(down) == 1 and len(up) == 1 and down[0] == up[0]):
                options.append((down, up))
        if not options:
            break
        down, up = options[int(rng.integers(len(options)))]
        while True:
            i, j = int(rng.choice(down)), int(rng.choice(up))
            if i != j:
                break
        child[i] -= 1
        child[j] += 1
    return child


def sparse_kl(teacher_values: torch.Tensor, teacher_index: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of KL(teacher ‖ student) on the teacher's top-k support, both renormalised there.

    `teacher_values` ``[tokens, k]`` logits, `teacher_index` ``[tokens, k]``, `student_logits` ``[tokens, vocab]``.
    """
    log_t = torch.log_softmax(teacher_values.float(), -1)  # [tokens, k]
    log_s = torch.log_softmax(student_logits.float().gather(-1, teacher_index.long()), -1)  # [tokens, k]
    return (log_t.exp() * (log_t - log_s)).sum(-1).mean()


def _parse_stages(stages) -> list[tuple[int, int]]:
    if isinstance(stages, str):
        try:
            stages = [tuple(int(v) for v in part.split(":")) for part in stages.split(",") if part.strip()]
        except ValueError:
            stages = None
    ok = isinstance(stages, (list, tuple)) and stages and all(
        isinstance(s, (list, tuple)) and len(s) == 2 and all(isinstance(v, int) and v >= 1 for v in s) for s in stages)
    if not ok:
        raise InputError("stages must look like '256:2,8192:1' (tokens:survivors per stage, tokens growing)")
    stages = [(int(t), int(k)) for t, k in stages]
    tokens = [t for t, _ in stages]
    if tokens != sorted(tokens):  # was accepted, against this message's own "tokens growing"
        raise InputError(f"stages {stages} must score on growing token counts, e.g. '256:2,8192:1'")
    if stages[-1][1] != 1:  # was changed to 1 without a word
        raise InputError(f"the last of the stages {stages} must keep 1 candidate (the search's answer), e.g. "
                         f"'{tokens[-1]}:1'")
    return stages


def tyr_options(*, iterations: int = 2, generations: int = 8, offspring: int = 8, stages="256:2,8192:1",
                kl_topk: int = 1024, propagate: str = "expectation", levels: int = 9, mlp_step: float = 0.125,
                neuron_step: int = 16, damp: float = 0.01, batch_size: int = 8, final: str = "sequential",
                fitness_samples: int | None = None, hidden_weight: float = 0.0) -> dict:
    """Týr's options, validated (`prune_tyr` takes the same keywords)."""
    out = {
        "fitness_samples": None if fitness_samples is None else int_at_least(fitness_samples, "fitness_samples", 0),
        "iterations": int_at_least(iterations, "iterations", 1),
        "generations": int_at_least(generations, "generations", 0),
        "offspring": int_at_least(offspring, "offspring", 1),
        "stages": _parse_stages(stages),
        "kl_topk": int_at_least(kl_topk, "kl_topk", 2),
        "levels": int_at_least(levels, "levels", 1),
        "neuron_step": int_at_least(neuron_step, "neuron_step", 1),
        "batch_size": int_at_least(batch_size, "batch_size", 1),
    }
    if final not in ("supernet", "sequential"):
        raise InputError(f"final must be 'supernet' (the searched supernet's levels) or 'sequential', got {final!r}")
    out["final"] = final
    if propagate not in PROPAGATE:
        raise InputError(f"propagate must be one of {', '.join(PROPAGATE)}, got {propagate!r}")
    if out["levels"] % 2 == 0:
        raise InputError(f"levels must be odd (the centre and as many on each side), got {levels}")
    if isinstance(mlp_step, bool) or not isinstance(mlp_step, (int, float)) or not 0 < mlp_step <= 0.5:
        raise InputError(f"mlp_step (the MLP level spacing, a fraction of its neurons) must be in (0, 0.5], got {mlp_step!r}")
    if isinstance(damp, bool) or not isinstance(damp, (int, float)) or not 0 <= damp <= 1:
        raise InputError(f"damp must be a number in [0, 1], got {damp!r}")
    if (isinstance(hidden_weight, bool) or not isinstance(hidden_weight, (int, float))
            or not 0 <= hidden_weight < math.inf):
        raise InputError(f"hidden_weight (the weight of the hidden-state term in the search's fitness) must be a "
                         f"number >= 0, got {hidden_weight!r}")
    out.update(propagate=propagate, mlp_step=float(mlp_step), damp=float(damp), hidden_weight=float(hidden_weight))
    return out


class _Stop(Exception):
    pass


def feed_until(block: nn.Module, batches: list, module: nn.Module, consume) -> None:
    """Run `block` on every batch only as far as `module`, calling ``consume(x)`` on each input `module` gets."""

    def hook(_m, args):
        consume(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        for hidden, kwargs in batches:
            try:
                block(hidden, **for_block(block, kwargs))
            except _Stop:
                pass
    finally:
        handle.remove()


def advance(block: nn.Module, batches: list) -> None:
    """Replace each batch's input by `block`'s output (the next block's input), in place."""
    for j in range(len(batches)):
        hidden, kwargs = batches[j]
        out = block(hidden, **for_block(block, kwargs))
        batches[j] = (out[0] if isinstance(out, (tuple, list)) else out, kwargs)


def _hessian(block: nn.Module, batches: list, module: nn.Module) -> torch.Tensor:
    """``X^T X`` of `module`'s input over every batch, running `block` only up to `module`."""
    acc = {"h": None}

    def consume(x):
        acc["h"] = local.accumulate_hessian(acc["h"], x)

    feed_until(block, batches, module, consume)
    return acc["h"]


def _zero_filled(level: local.Level, in_features: int, unit: int) -> torch.Tensor:
    full = torch.zeros(level.weight.shape[0], in_features, device=level.weight.device)  # [out, in]
    full[:, head_columns(level.keep, unit) if unit > 1 else level.keep] = level.weight
    return full


def _propagated(levels: dict[int, local.Level], sub: Sublayer, in_features: int, unit: int, mode: str) -> torch.Tensor:
    if mode == "centre" or len(levels) == 1:
        return _zero_filled(levels[0], in_features, unit)
    total = sum(lv.units for lv in levels.values())
    return sum(_zero_filled(lv, in_features, unit) * (lv.units / total) for lv in levels.values())


def build_supernet(model: nn.Module, batches: list, dims: Dims, subs: list[Sublayer], *, propagate: str,
                   damp: float, neuron_step: int, progress: bool) -> None:
    """Fill each sublayer's levels, block by block, calibrating each on the propagated earlier sublayers.

    `batches` (``[(hidden, kwargs)]`` inputs of the first block) are consumed. The model's weights are left dense.
    """
    from tqdm.auto import tqdm

    prefix, blocks = find_blocks(model)
    by_layer: dict[int, list[Sublayer]] = {}
    for s in subs:
        by_layer.setdefault(s.layer, []).append(s)
    with torch.no_grad():
        for i, block in enumerate(tqdm(blocks, desc="supernet", unit="block", disable=not progress)):
            saved = []
            try:  # the propagated weights are put back even when a later sublayer fails
                for sub in by_layer.get(i, []):
                    module = attention(block).o_proj if sub.kind == "attn" else mlp_of(block).down_proj
                    unit = dims.head_dim if sub.kind == "attn" else 1
                    h = _hessian(block, batches, module)  # [in, in]
                    if not torch.isfinite(h).all():  # else a raw LinAlgError from the SVD of a NaN matrix
                        where = "self_attn.o_proj" if sub.kind == "attn" else "mlp.down_proj"
                        raise InputError(f"the input of {prefix}.{i}.{where} is NaN/Inf or too large for its "
                                         "calibration statistic: the model's activations overflow before it; check "
                                         "its weights, or prune in float32")
                    offsets = range(sub.lo, sub.hi + 1)
                    path = local.prune_path(
                        module.weight.detach().float(), h, unit_size=unit, levels=[sub.units(k) for k in offsets],
                        groups=dims.kv_heads if sub.kind == "attn" else 1, step=neuron_step, damp=damp,
                    )
                    sub.levels = {k: path[sub.units(k)] for k in offsets}
                    saved.append((module, module.weight.detach().clone()))
                    module.weight.copy_(_propagated(sub.levels, sub, module.in_features, unit, propagate))
                if i < len(blocks) - 1:
                    advance(block, batches)
            finally:
                for module, weight in saved:
                    module.weight.copy_(weight)


class _Installer:
    """Installs sublayer levels into the model (physically pruned) and can put the dense modules back."""

    def __init__(self, model: nn.Module, dims: Dims):
        _, self.blocks = find_blocks(model)
        self.dims = dims
        self.dense = []
        for block in self.blocks:
            a, m = attention(block), mlp_of(block)
            self.dense.append({"q": getattr(a, "q_proj", None), "o": a.o_proj, "groups": a.num_key_value_groups,
                               "q_norm": getattr(a, "q_norm", None), "down": m.down_proj,
                               **{n: getattr(m, f"{n}_proj") for n in ("gate", "up", "gate_up") if
                                  isinstance(getattr(m, f"{n}_proj", None), nn.Module)}})
        self.current: dict[int, int] = {}

    def install(self, subs: list[Sublayer], offsets) -> None:
        for index, (sub, k) in enumerate(zip(subs, offsets)):
            k = int(k)
            if self.current.get(index) == k:
                continue
            block, dense, level = self.blocks[sub.layer], self.dense[sub.layer], sub.levels[k]
            if sub.kind == "attn":
                a = attention(block)
                a.q_proj, a.o_proj, a.num_key_value_groups = dense["q"], dense["o"], dense["groups"]
                if dense["q_norm"] is not None:  # a per-head q-norm is sliced from the dense one
                    a.q_norm = dense["q_norm"]
                shrink_attention(a, level.keep, o_weight=level.weight, kv_heads=self.dims.kv_heads)
            else:
                m = mlp_of(block)
                _dense_mlp(m, dense)
                shrink_mlp(m, level.keep, down_weight=level.weight)
            self.current[index] = k

    def restore(self) -> None:
        for block, dense in zip(self.blocks, self.dense):
            a, m = attention(block), mlp_of(block)
            if dense["q"] is not None:  # (a fused qkv_proj is never replaced)
                a.q_proj, a.o_proj, a.num_key_value_groups = dense["q"], dense["o"], dense["groups"]
                if hasattr(a, "num_heads"):
                    a.num_heads = dense["q"].out_features // a.head_dim
            if dense["q_norm"] is not None:
                a.q_norm = dense["q_norm"]
            _dense_mlp(m, dense)
            if hasattr(m, "intermediate_size"):
                m.intermediate_size = dense["down"].in_features
        self.current = {}


def _dense_mlp(mlp: nn.Module, dense: dict) -> None:
    """Put `dense`'s modules back into `mlp` (gate and up, or a fused gate_up, and down)."""
    for name in ("gate", "up", "gate_up", "down"):
        if name in dense:
            setattr(mlp, f"{name}_proj", dense[name])


def _widths_of(dims: Dims, subs: list[Sublayer], offsets) -> list[Widths]:
    heads = [dims.heads] * dims.layers
    inter = [dims.intermediate] * dims.layers
    for sub, k in zip(subs, offsets):
        if sub.kind == "attn":
            heads[sub.layer] = sub.units(int(k))
        else:
            inter[sub.layer] = sub.units(int(k))
    return [Widths(h, n) for h, n in zip(heads, inter)]


def probe_layers(n_layers: int) -> list[int]:
    """The blocks whose outputs the hidden-state term compares: the first, the middle and the last (paper, Eq. 6)."""
    return sorted({0, n_layers // 2, n_layers - 1})


class _Probe:
    """Records the outputs of some blocks on each forward (``outputs`` in the order of `layers`)."""

    def __init__(self, model: nn.Module, layers: list[int]):
        _, blocks = find_blocks(model)
        self.outputs: list[torch.Tensor] = []
        self.handles = [blocks[i].register_forward_hook(self._hook) for i in layers]

    def _hook(self, _m, _args, out):
        self.outputs.append(out[0] if isinstance(out, (tuple, list)) else out)

    def take(self) -> list[torch.Tensor]:
        out, self.outputs = self.outputs, []
        return out

    def close(self) -> None:
        for h in self.handles:
            h.remove()


@dataclass
class Teacher:
    """The dense model's top-k next-token logits ``[n, seq, k]`` on the fitness windows and, when the hidden-state
    term is on, its outputs of the probed blocks (one ``[n, seq, hidden]`` tensor per block)."""

    values: torch.Tensor
    index: torch.Tensor
    hidden: list[torch.Tensor] = field(default_factory=list)
    layers: list[int] = field(default_factory=list)


def _teacher(model: nn.Module, ids: torch.Tensor, topk: int, batch_size: int,
             layers: list[int] | None = None) -> Teacher:
    values, index, hidden = [], [], []
    probe = _Probe(model, layers) if layers else None
    try:
        with torch.no_grad():
            for start in range(0, ids.shape[0], batch_size):
                logits = model(input_ids=ids[start:start + batch_size], use_cache=False).logits  # [b, seq, vocab]
                top = torch.topk(logits.float(), min(topk, logits.shape[-1]), dim=-1)
                values.append(top.values.half())
                index.append(top.indices.int())
                if probe is not None:
                    hidden.append([h.half() for h in probe.take()])
    finally:
        if probe is not None:
            probe.close()
    per_layer = [torch.cat([h[j] for h in hidden]) for j in range(len(layers))] if layers else []
    return Teacher(torch.cat(values), torch.cat(index), per_layer, list(layers or []))


def relative_error(teacher: torch.Tensor, student: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``||h - h'||^2 / ||h||^2`` (`teacher`, `student` ``[..., hidden]``)."""
    t, s = teacher.float(), student.float()
    return ((t - s).pow(2).sum(-1) / t.pow(2).sum(-1).clamp_min(1e-12)).mean()


def _fitness(model, ids, teacher: Teacher, windows, batch_size, hidden_weight: float = 0.0) -> float:
    """KL(dense ‖ pruned) on the teacher's top-k logits, plus `hidden_weight` times the mean relative error of the
    probed blocks' outputs when that is on; averaged over `windows`."""
    total, k = 0.0, teacher.values.shape[-1]
    probe = _Probe(model, teacher.layers) if hidden_weight and teacher.layers else None
    try:
        with torch.no_grad():
            for start in range(0, len(windows), batch_size):
                w = windows[start:start + batch_size]
                logits = model(input_ids=ids[w], use_cache=False).logits  # [b, seq, vocab]
                score = sparse_kl(teacher.values[w].reshape(-1, k), teacher.index[w].reshape(-1, k),
                                  logits.reshape(-1, logits.shape[-1]))
                if probe is not None:
                    errors = [relative_error(t[w], h) for t, h in zip(teacher.hidden, probe.take())]
                    score = score + hidden_weight * torch.stack(errors).mean()
                total += float(score) * len(w)
    finally:
        if probe is not None:
            probe.close()
    return total / len(windows)


@dataclass
class SearchLog:
    iteration: int
    generation: int
    fitness: float
    offsets_moved: int
    seconds: float


def _search(model, installer, subs, ids, teacher, opts, rng, progress, log, iteration) -> np.ndarray:
    from tqdm.auto import tqdm

    lo = np.array([s.lo for s in subs])
    hi = np.array([s.hi for s in subs])
    kinds = np.array([0 if s.kind == "attn" else 1 for s in subs])
    parent = np.zeros(len(subs), dtype=np.int64)
    n, seqlen = ids.shape
    for gen in tqdm(range(opts["generations"]), desc=f"search {iteration + 1}", unit="gen", disable=not progress):
        start = time.perf_counter()
        kids, seen, tries = [], {tuple(parent)}, 0
        while len(kids) < opts["offspring"] and tries < 50 * opts["offspring"]:
            tries += 1
            child = mutate(parent, lo, hi, kinds, rng)
            if tuple(child) not in seen:
                seen.add(tuple(child))
                kids.append(child)
        if not kids:
            break
        cands, fit = kids, None
        for si, (tokens, keep) in enumerate(opts["stages"]):
            if si == len(opts["stages"]) - 1:
                cands = cands + [parent]
            windows = rng.choice(n, size=min(n, max(1, math.ceil(tokens / seqlen))), replace=False)
            fits = []
            for c in cands:
                installer.install(subs, c)
                fits.append(_fitness(model, ids, teacher, torch.as_tensor(windows), opts["batch_size"],
                                     opts["hidden_weight"]))
            order = np.argsort(fits, kind="stable")[:keep]
            cands, fit = [cands[i] for i in order], fits[order[0]]
        parent = cands[0]
        log.append(SearchLog(iteration, gen, float(fit), int(np.abs(parent).sum()), time.perf_counter() - start))
    return parent


@dataclass
class Outcome:
    """What a structured method decided: per-layer widths and what it reports (search log, sizes)."""

    widths: list[Widths]
    info: dict


def _calibration_batches(model, ids, batch_size):
    _, blocks = find_blocks(model)
    with torch.no_grad():
        return capture_block_inputs(model, blocks, ids, batch_size=batch_size)


def prune_tyr(model: nn.Module, ids: torch.Tensor, *, ratio: float, structure: str = "both", seed: int = 0,
              progress: bool = True, search: bool = True, **options) -> Outcome:
    """Týr-the-Pruner on `model` (in place: physically pruned) with calibration windows `ids` ``[n, seqlen]``."""
    opts = tyr_options(**options)
    dims = model_dims(model)
    centre = uniform_widths(dims, ratio=ratio, structure=structure)
    check_widths(dims, centre)
    if not search:
        opts["iterations"], opts["levels"] = 1, 1
    ids = ids.to(input_device(model))  # a model on a GPU is pruned there
    fids = ids
    if opts["fitness_samples"]:  # None (ids given directly): the supernet's windows, as the reference
        if ids.shape[0] <= opts["fitness_samples"]:
            raise InputError(f"fitness_samples={opts['fitness_samples']} leaves none of the {ids.shape[0]} calibration "
                             "windows for the supernet; give more windows or fewer fitness samples")
        ids, fids = ids[:-opts["fitness_samples"]], ids[-opts["fitness_samples"]:]
    rng = np.random.default_rng(seed)
    layers = probe_layers(dims.layers) if opts["hidden_weight"] else None
    teacher = (_teacher(model, fids, opts["kl_topk"], opts["batch_size"], layers)
               if search and opts["generations"] else None)
    installer = _Installer(model, dims)
    log: list[SearchLog] = []
    spread = opts["levels"] // 2
    mlp_step = max(1, round(opts["mlp_step"] * dims.intermediate))
    budget = block_params(dims, centre)
    for it in range(opts["iterations"]):
        if teacher is None and opts["final"] == "sequential":
            break  # no search: the centre widths stay, and the step below builds them afresh (this built them twice)
        installer.restore()
        subs = _sublayers(dims, centre, structure, mlp_step, spread)
        batches = _calibration_batches(model, ids, opts["batch_size"])
        build_supernet(model, batches, dims, subs, propagate=opts["propagate"], damp=opts["damp"],
                       neuron_step=opts["neuron_step"], progress=progress)
        del batches
        best = np.zeros(len(subs), dtype=np.int64)
        if teacher is not None:
            best = _search(model, installer, subs, fids, teacher, opts, rng, progress, log, it)
        if it == opts["iterations"] - 1 and opts["final"] == "supernet":
            installer.install(subs, best)
        centre = _widths_of(dims, subs, best)
        mlp_step = max(1, mlp_step // 2)
    if opts["final"] == "sequential":  # re-prune at the chosen widths, each block calibrated on the real model
        installer.restore()
        subs = _sublayers(dims, centre, structure, mlp_step, 0)
        build_supernet(model, _calibration_batches(model, ids, opts["batch_size"]), dims, subs, propagate="centre",
                       damp=opts["damp"], neuron_step=opts["neuron_step"], progress=progress)
        installer.install(subs, np.zeros(len(subs), dtype=np.int64))
    if block_params(dims, centre) != budget:
        raise RuntimeError("the search changed the parameter count; this is a bug in prunekit")
    info = {"dims": vars(dims), "options": {k: (list(map(list, v)) if k == "stages" else v) for k, v in opts.items()},
            "search": [vars(s) for s in log]}
    return Outcome(centre, info)


def prune_uniform(model: nn.Module, ids: torch.Tensor, *, ratio: float, structure: str = "both", seed: int = 0,
                  progress: bool = True, **options) -> Outcome:
    """The same local pruner and error accumulation at the uniform widths, no search (the paper's w/o search)."""
    allowed = {"neuron_step", "damp", "batch_size"}
    extra = set(options) - allowed
    if extra:
        raise InputError(f"uniform-structured takes the options {', '.join(sorted(allowed))}; not {', '.join(sorted(extra))}")
    out = prune_tyr(model, ids, ratio=ratio, structure=structure, seed=seed, progress=progress, search=False,
                    generations=0, **options)
    out.info["options"] = {k: out.info["options"][k] for k in ("neuron_step", "damp", "batch_size")}
    out.info.pop("search")
    return out
