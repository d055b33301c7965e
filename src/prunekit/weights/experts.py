"""Mixture-of-experts weights fused into 3-D tensors, pruned as one Linear per expert.

transformers 5 stores a MoE block's experts as two parameters, ``gate_up_proj`` ``[experts, 2 * ffn, hidden]``
and ``down_proj`` ``[experts, hidden, ffn]`` (Mixtral, Qwen2-MoE, Qwen3-MoE, GraniteMoE, OLMoE, DeepSeek-V3,
GLM-4-MoE, ...). `unfused_experts` swaps each such module, for the length of a ``with`` block, for
`ExpertLinears`: one ``nn.Linear`` per expert and projection whose weight is a *view* of the fused tensor, and
the same routed forward (each expert sees only the tokens routed to it, as in the model's own eager loop). The
weight engine then hooks, calibrates and prunes every expert like any Linear, writing straight into the fused
tensors; on exit the original modules are back, holding the pruned weights, and the model saves as usual.

- **Equivalence is checked, not assumed.** Before the swap, both forwards run on random tokens and routes;
  a module that computes anything else (interleaved gate/up, transposed or biased experts, a post-expert norm:
  GPT-OSS for one) is an `InputError`.
- **Experts no calibration token reached.** Their inputs are unknown, so the engine prunes them with the
  statistic of white inputs (`prunekit.weights.stats.neutral`): Wanda then ranks by |W| per row, SparseGPT by
  |W| with no update, i.e. magnitude pruning, and DSnoT (zero input means: no expected output shift) keeps its
  base's mask; their reports say so (``info["calibration_tokens"] == 0``). The methods that prune experts are
  `prunekit.weights.prune.EXPERT_METHODS`; ARMOR (which replaces a Linear by a factorized module) and D-Pruner
  (which needs the gradient of each weight) are refused unless every expert is skipped.
- **Routers stay dense.** A block's routing Linears (the router, Qwen2-MoE's ``shared_expert_gate``: Linears
  of one or ``experts`` outputs beside the experts) are left out, as llm-compressor's MoE recipes ignore them.
  In transformers 5 most routers are not Linears at all.

Expert names read ``model.layers.3.mlp.experts.gate_up_proj.7`` (the fused parameter and the expert index), so
skip globs such as ``*experts*`` work.
"""

from __future__ import annotations

from contextlib import contextmanager

import torch
from torch import nn

from prunekit.errors import InputError

__all__ = ["ExpertLinears", "fused_experts", "routing_linears", "unfused_experts", "has_fused_experts"]

_FLAGS = {"is_concatenated": True, "is_transposed": False, "has_bias": False, "has_gate": True,
          "has_post_expert_norm": False}  # transformers' experts-layout flags, at the layout ExpertLinears runs


def _is_fused(module: nn.Module) -> bool:
    up, down = getattr(module, "gate_up_proj", None), getattr(module, "down_proj", None)
    return isinstance(up, nn.Parameter) and isinstance(down, nn.Parameter) and up.dim() == 3 and down.dim() == 3


def fused_experts(block: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name inside block, module)`` of every module holding fused 3-D ``gate_up_proj`` / ``down_proj``."""
    return [(name, module) for name, module in block.named_modules() if _is_fused(module)]


def has_fused_experts(model: nn.Module) -> bool:
    return any(_is_fused(m) for m in model.modules())


def _layout_problem(module: nn.Module) -> str | None:
    """Why `ExpertLinears` cannot stand in for `module`, or None."""
    up, down = module.gate_up_proj, module.down_proj
    experts, two_ffn, hidden = up.shape
    for flag, want in _FLAGS.items():
        if getattr(module, flag, want) != want:
            return f"{flag}={getattr(module, flag)!r}"
    if two_ffn % 2 or tuple(down.shape) != (experts, hidden, two_ffn // 2):
        return f"gate_up_proj {tuple(up.shape)} and down_proj {tuple(down.shape)} are not [E, 2F, H] and [E, H, F]"
    extra = [n for n, _ in module.named_parameters(recurse=False) if n not in ("gate_up_proj", "down_proj")]
    if extra:
        return f"it holds other parameters too ({', '.join(extra)})"
    if not callable(getattr(module, "act_fn", None)):
        return "it has no act_fn"
    return None


def _view_linear(fused: nn.Parameter, expert: int) -> nn.Linear:
    weight = fused.data[expert]  # [out, in], a view: what the engine writes lands in the fused tensor
    linear = nn.Linear(weight.shape[1], weight.shape[0], bias=False, device="meta")
    linear.weight = nn.Parameter(weight, requires_grad=False)
    linear.prunekit_expert = True  # may see no calibration token (see the module docstring)
    return linear


class ExpertLinears(nn.Module):
    """The experts of a fused module as ``gate_up_proj[e]`` / ``down_proj[e]`` Linears sharing its storage, with
    transformers' eager expert loop as forward: ``(hidden [tokens, H], top_k_index [tokens, k], top_k_weights
    [tokens, k]) -> [tokens, H]``."""

    def __init__(self, fused: nn.Module):
        super().__init__()
        self.sequence_length = None  # tokens per sequence of the current forward (set by `unfused_experts`)
        self.num_experts = fused.gate_up_proj.shape[0]
        self.act_fn = fused.act_fn
        self.gate_up_proj = nn.ModuleList(_view_linear(fused.gate_up_proj, e) for e in range(self.num_experts))
        self.down_proj = nn.ModuleList(_view_linear(fused.down_proj, e) for e in range(self.num_experts))

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor):
        out = torch.zeros_like(hidden_states)
        length = self.sequence_length
        if not length or hidden_states.shape[0] % length:
            length = None
        for e in range(self.num_experts):
            top_k_pos, token_idx = torch.where((top_k_index == e).T)  # the eager loop's order (summation order too)
            if token_idx.numel() == 0:
                continue
            # which sequence each routed token came from (the block flattens [batch, seq] in order), for the
            # calibration statistics (`prunekit.weights.stats`): per sequence, whatever the batch size
            sequences = None if length is None else token_idx // length
            self.gate_up_proj[e].prunekit_sequences = self.down_proj[e].prunekit_sequences = sequences
            gate, up = self.gate_up_proj[e](hidden_states[token_idx]).chunk(2, dim=-1)
            y = self.down_proj[e](self.act_fn(gate) * up) * top_k_weights[token_idx, top_k_pos, None]
            out.index_add_(0, token_idx, y.to(out.dtype))
        return out


def _check_same_function(fused: nn.Module, linears: ExpertLinears, where: str) -> None:
    experts, _, hidden = fused.gate_up_proj.shape
    like = fused.gate_up_proj
    g = torch.Generator().manual_seed(0)
    tokens, k = 4 * experts, min(2, experts)
    x = torch.randn(tokens, hidden, generator=g).to(device=like.device, dtype=like.dtype)
    index = torch.rand(tokens, experts, generator=g).argsort(-1)[:, :k].to(like.device)  # distinct experts per token
    weights = torch.rand(tokens, k, generator=g).to(device=like.device, dtype=like.dtype)
    with torch.no_grad():
        want, got = fused(x, index, weights), linears(x, index, weights)
    scale = float(want.abs().max().clamp_min(1e-30))
    tol = 1e-4 if like.dtype == torch.float32 else 2e-2
    if not (isinstance(want, torch.Tensor) and want.shape == got.shape
            and torch.allclose(got.float(), want.float(), rtol=tol, atol=tol * scale)):
        raise InputError(f"{where} ({type(fused).__name__}) computes its experts differently from the standard "
                         "gate_up/down layout, so weight pruning cannot prune them; prune a dense model")


@contextmanager
def unfused_experts(model: nn.Module, *, check: bool = True, strict: bool = True):
    """Inside the block, every fused experts module of `model`'s decoder blocks is an `ExpertLinears` (weights
    shared); yields the full names of the swapped modules. `check` runs the equivalence check first (the
    swap is then refused before anything changes); the model is restored on exit, errors included.
    ``strict=False`` (reading weights only, e.g. measuring sparsity) leaves modules of another layout fused
    instead of refusing them."""
    from prunekit.weights.engine import find_blocks

    prefix, blocks = find_blocks(model)
    swaps = []
    by_block: dict[int, list[ExpertLinears]] = {}  # block index -> its swapped modules
    for i, block in enumerate(blocks):
        for name, module in fused_experts(block):
            where = f"{prefix}.{i}.{name}"
            problem = _layout_problem(module)
            if problem and not strict:
                continue
            if problem:
                raise InputError(f"{where} ({type(module).__name__}) holds fused experts in a layout weight pruning "
                                 f"does not handle ({problem}); prune a dense model")
            linears = ExpertLinears(module)
            if check:
                _check_same_function(module, linears, where)
            parent_name, _, attr = name.rpartition(".")
            swaps.append((block.get_submodule(parent_name) if parent_name else block, attr, module, linears, where))
            by_block.setdefault(i, []).append(linears)

    def length_hook(held):
        def hook(_block, args, kwargs):  # the block's hidden states [batch, seq, hidden]: tokens per sequence
            hidden = args[0] if args else kwargs.get("hidden_states")
            length = hidden.shape[1] if isinstance(hidden, torch.Tensor) and hidden.dim() == 3 else None
            for linears in held:
                linears.sequence_length = length
        return hook

    handles = []
    try:
        for i, held in by_block.items():
            handles.append(blocks[i].register_forward_pre_hook(length_hook(held), with_kwargs=True))
        for parent, attr, _, linears, _ in swaps:
            setattr(parent, attr, linears)
        yield [where for *_, where in swaps]
    finally:
        for handle in handles:
            handle.remove()
        for parent, attr, module, _, _ in swaps:
            setattr(parent, attr, module)


def routing_linears(block: nn.Module) -> list[str]:
    """Names inside `block` of the Linears that route tokens in its MoE modules: Linears with 1 or E outputs
    beside a fused experts module of E experts, in the same parent (the router, a shared-expert gate)."""
    out = []
    for name, module in block.named_modules():
        experts = [m for _, m in module.named_children() if _is_fused(m) or isinstance(m, ExpertLinears)]
        if not experts:
            continue
        count = experts[0].num_experts if isinstance(experts[0], ExpertLinears) else experts[0].gate_up_proj.shape[0]
        for child_name, child in module.named_children():
            if isinstance(child, nn.Linear) and child.out_features in (1, count):
                out.append(f"{name}.{child_name}" if name else child_name)
    return out
