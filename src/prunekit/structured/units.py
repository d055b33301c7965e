"""Structural units of a Llama-style decoder and their physical removal (the Linear layers really shrink).

Units:

- **Attention heads.** With grouped-query attention (GQA) each KV head serves ``G = n_q / n_kv`` query heads
  (query head ``h`` reads KV head ``h // G``, transformers' ``repeat_kv`` layout). prunekit prunes **query
  heads within groups, the same number in every group of a layer**, and keeps every KV head. Why: pruning
  whole KV groups (a KV head with its query heads) is very coarse on small GQA models (SmolLM2-135M has 3 KV
  heads: 33% steps, and a layer can lose at most two of three groups), while an equal count per group keeps
  the standard layout, so a layer with ``n_kv * g`` query heads is an ordinary Llama attention with
  ``num_key_value_groups = g`` and plain transformers runs it. Unequal counts per group would need a custom
  attention (or duplicated KV heads), which the exported model must not require. The price: k_proj/v_proj are
  never pruned, and a layer keeps at least one query head per group (``g >= 1``): a request that would leave
  a layer with no heads is refused. A head is the ``head_dim`` rows of q_proj and the ``head_dim`` columns of
  o_proj it owns, and its row of a per-head q-norm (Cohere's ``use_qk_norm``: weight ``[heads, head_dim]``).
- **MLP neurons.** Neuron ``j`` is row ``j`` of gate_proj and up_proj and column ``j`` of down_proj. A fused
  ``gate_up_proj`` (Phi-3, GLM: weight ``[2 * intermediate, hidden]``, the gate rows first, split in half by the
  forward) holds neuron ``j`` in rows ``j`` and ``intermediate + j``.

A fused ``qkv_proj`` (Phi-3) keeps every head: its attention splits the fused output by the config's head count,
which all layers share, so the heads of one layer cannot go alone; such a model prunes neurons only
(`Dims.fused_qkv`).

`Widths` records what a layer keeps; `shrink_attention` / `shrink_mlp` perform the surgery on one block given
the kept indices and (optionally) the refitted o_proj / down_proj weight; `set_widths` does it for a whole
model with given kept indices. Shapes follow PyTorch: a Linear weight is ``[out_features, in_features]``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from prunekit.errors import InputError
from prunekit.weights.engine import find_blocks

__all__ = ["Dims", "Widths", "model_dims", "layer_widths", "check_widths", "shrink_attention", "shrink_mlp",
           "block_params", "linear_params", "head_columns", "gate_up_weights", "kept_of"]


@dataclass(frozen=True)
class Widths:
    """What one decoder layer keeps: query heads (a multiple of the KV heads) and MLP neurons."""

    heads: int
    intermediate: int

    def to_dict(self) -> dict:
        return {"heads": self.heads, "intermediate": self.intermediate}


@dataclass(frozen=True)
class Dims:
    """The dense shape of a model's decoder layers (all layers of the input model share it)."""

    layers: int
    hidden: int
    head_dim: int
    heads: int  # query heads of the dense model
    kv_heads: int
    intermediate: int
    fused_qkv: bool = False  # q, k and v in one qkv_proj (Phi-3): heads are kept, neurons only are pruned

    @property
    def group(self) -> int:  # query heads per KV head in the dense model
        return self.heads // self.kv_heads

    @property
    def head_params(self) -> int:  # one query head: head_dim rows of q_proj + head_dim columns of o_proj
        return 2 * self.hidden * self.head_dim

    @property
    def neuron_params(self) -> int:  # one neuron: a row of gate_proj and up_proj, a column of down_proj
        return 3 * self.hidden


def _fused_qkv(attn: nn.Module) -> bool:
    return isinstance(getattr(attn, "qkv_proj", None), nn.Linear) and not hasattr(attn, "q_proj")


def _attn(block: nn.Module) -> nn.Module:
    attn = getattr(block, "self_attn", None)
    parts = ("qkv_proj",) if _fused_qkv(attn) else ("q_proj", "k_proj", "v_proj")
    parts += ("o_proj", "head_dim")
    if attn is None or not all(hasattr(attn, n) for n in parts):
        raise InputError(
            f"{type(block).__name__} has no Llama-style self_attn (q_proj, k_proj, v_proj, o_proj, or a fused qkv_proj "
            "and o_proj); structured pruning supports Llama, Mistral, Qwen2, Phi-3 and other models with that layout"
        )
    return attn


def _fused_mlp(mlp: nn.Module) -> bool:
    """A dense MLP whose gate and up projections are one Linear (Phi-3, GLM); a MoE block's 3-D experts are not."""
    return isinstance(getattr(mlp, "gate_up_proj", None), nn.Linear) and not hasattr(mlp, "gate_proj")


def _mlp(block: nn.Module) -> nn.Module:
    mlp = getattr(block, "mlp", None)
    split = mlp is not None and all(hasattr(mlp, n) for n in ("gate_proj", "up_proj"))
    if mlp is None or not isinstance(getattr(mlp, "down_proj", None), nn.Linear) or not (split or _fused_mlp(mlp)):
        raise InputError(
            f"{type(block).__name__} has no gated MLP (gate_proj and up_proj, or a fused gate_up_proj, and down_proj); "
            "structured pruning (heads "
            "as well as neurons) supports Llama-style blocks only; weight pruning (--method wanda, sparsegpt, ...) "
            "and depth pruning (--method shortgpt, ...) work on this model"
        )
    return mlp


def _query_heads(attn: nn.Module) -> int:
    return (attn.o_proj.in_features if _fused_qkv(attn) else attn.q_proj.out_features) // attn.head_dim


def _kv_heads(attn: nn.Module) -> int:
    if _fused_qkv(attn):  # [q | k | v] rows
        return (attn.qkv_proj.out_features - attn.o_proj.in_features) // (2 * attn.head_dim)
    return attn.k_proj.out_features // attn.head_dim


def gate_up_weights(mlp: nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
    """The gate and up projections' weights ``[intermediate, hidden]`` of a gated MLP (views of a fused one)."""
    if _fused_mlp(mlp):
        return mlp.gate_up_proj.weight.chunk(2, dim=0)
    return mlp.gate_proj.weight, mlp.up_proj.weight


def layer_widths(model: nn.Module) -> list[Widths]:
    """The widths each decoder layer has now."""
    _, blocks = find_blocks(model)
    out = []
    for block in blocks:
        attn, mlp = _attn(block), _mlp(block)
        out.append(Widths(_query_heads(attn), mlp.down_proj.in_features))
    return out


def model_dims(model: nn.Module) -> Dims:
    """The dense dims of `model`; refuses a model whose layers already differ (prune a dense model)."""
    _, blocks = find_blocks(model)
    attn, mlp = _attn(blocks[0]), _mlp(blocks[0])
    widths = layer_widths(model)
    if len(set(widths)) != 1:
        raise InputError("the model's layers already have different widths; structured pruning starts from a model "
                         "whose layers all have the same widths")
    hd = attn.head_dim
    fused = _fused_qkv(attn)
    dims = Dims(len(blocks), (attn.qkv_proj if fused else attn.q_proj).in_features, hd, _query_heads(attn),
                _kv_heads(attn), mlp.down_proj.in_features, fused_qkv=fused)
    if dims.heads % dims.kv_heads:
        raise InputError(f"{dims.heads} query heads are not a multiple of {dims.kv_heads} KV heads")
    return dims


def check_heads_prunable(model: nn.Module, dims: Dims) -> None:
    """Refuse head pruning where the saved model could not hold fewer heads: a q/k norm over all heads at once
    (OLMo2: removing heads changes what it normalises over), or an architecture that derives its head size from
    ``hidden_size / num_attention_heads`` and ignores ``head_dim`` (StableLM), or sizes o_proj from
    ``hidden_size`` (Helium), so a config with fewer heads builds layers of another shape. Checked by building
    one attention layer from such a config (on the meta device)."""
    import copy

    _, blocks = find_blocks(model)
    attn = _attn(blocks[0])
    if dims.fused_qkv:  # no head is removed (`uniform_widths` refuses --structure heads with the reason)
        return
    for norm, rows in (("q_norm", dims.heads), ("k_norm", dims.kv_heads)):
        weight = getattr(getattr(attn, norm, None), "weight", None)
        per_head = isinstance(weight, torch.Tensor) and tuple(weight.shape) == (rows, dims.head_dim)  # Cohere
        if isinstance(weight, torch.Tensor) and weight.numel() != dims.head_dim and not per_head:
            raise InputError(f"{type(attn).__name__}.{norm} normalises all heads together ({weight.numel()} values, "
                             f"head size {dims.head_dim}), so heads cannot be removed; prune neurons only "
                             "(--structure neurons)")
    config = getattr(model, "config", None)
    if config is None:
        return
    fewer = copy.deepcopy(config)
    kept = dims.heads - dims.kv_heads if dims.heads > dims.kv_heads else dims.heads  # one head less per KV group
    fewer.num_attention_heads, fewer.head_dim = kept, dims.head_dim
    try:  # on the meta device: no memory, no weights drawn from the caller's random generator
        with torch.device("meta"):
            probe = type(attn)(fewer, layer_idx=0)
    except Exception:  # an attention class built another way: nothing to compare
        return
    q = getattr(probe, "q_proj", None)
    if isinstance(q, nn.Linear) and q.out_features != kept * dims.head_dim:
        raise InputError(f"{type(attn).__name__} sizes its heads from hidden_size / num_attention_heads, not head_dim, "
                         f"so a model with fewer heads would not load; prune neurons only (--structure neurons)")
    o = getattr(probe, "o_proj", None)
    if isinstance(o, nn.Linear) and o.in_features != kept * dims.head_dim:  # Helium: o_proj is hidden x hidden
        raise InputError(f"{type(attn).__name__} builds o_proj with {o.in_features} inputs whatever the number of "
                         f"heads, so a model with fewer heads would not load; prune neurons only "
                         "(--structure neurons)")


def check_widths(dims: Dims, widths: list[Widths]) -> None:
    """Refuse widths the standard GQA layout cannot hold, or that leave a layer with no heads or neurons."""
    if len(widths) != dims.layers:
        raise InputError(f"widths for {len(widths)} layers given, the model has {dims.layers}")
    for i, w in enumerate(widths):
        if w.heads % dims.kv_heads:
            raise InputError(
                f"layer {i}: {w.heads} query heads break GQA: it must be a multiple of the {dims.kv_heads} KV heads "
                f"(the same number of query heads in every group), e.g. {max(1, w.heads // dims.kv_heads) * dims.kv_heads}"
            )
        if not dims.kv_heads <= w.heads <= dims.heads:
            raise InputError(f"layer {i}: {w.heads} query heads; keep between {dims.kv_heads} (one per KV group, "
                             f"a layer must keep heads) and {dims.heads}")
        if not 1 <= w.intermediate <= dims.intermediate:
            raise InputError(f"layer {i}: {w.intermediate} MLP neurons; keep between 1 and {dims.intermediate}")


def linear_params(dims: Dims, w: Widths) -> int:
    """Weights of one layer's block Linears (no biases) at widths `w`."""
    kv = 2 * dims.hidden * dims.kv_heads * dims.head_dim
    return kv + w.heads * dims.head_params + w.intermediate * dims.neuron_params


def block_params(dims: Dims, widths: list[Widths]) -> int:
    return sum(linear_params(dims, w) for w in widths)


def head_columns(heads: torch.Tensor, head_dim: int) -> torch.Tensor:
    """The feature indices (q_proj rows, o_proj columns) of query heads `heads` (sorted), ``[len * head_dim]``."""
    return (heads[:, None] * head_dim + torch.arange(head_dim, device=heads.device)[None, :]).reshape(-1)


KEPT_ATTR = "_prunekit_kept"  # on a shrunk module: (rows, cols) of the module it replaced that it keeps (None: all)


def kept_of(module: nn.Module) -> tuple | None:
    """The ``(rows, cols)`` index tensors (None: every one) of the module `module` replaced that it keeps, for a
    Linear or per-head norm made by `shrink_attention` / `shrink_mlp`; None for any other module. The kept
    o_proj / down_proj columns of a refit hold new values: only their positions are the replaced module's."""
    return getattr(module, KEPT_ATTR, None)


def _kept_since_loaded(like: nn.Module, rows, cols) -> tuple:
    """`rows` and `cols` of `like` as indices into what `like` itself kept (a module shrunk twice in one session
    still names the rows and columns of the tensor it was loaded with)."""
    before = kept_of(like) or (None, None)
    compose = lambda old, new: new if old is None else old if new is None else old[new]  # noqa: E731
    return compose(before[0], rows), compose(before[1], cols)


def _new_linear(weight: torch.Tensor, bias: torch.Tensor | None, like: nn.Linear, *, rows=None,
                cols=None) -> nn.Linear:
    out_f, in_f = weight.shape
    lin = nn.utils.skip_init(nn.Linear, in_f, out_f, bias=bias is not None, device=like.weight.device,
                             dtype=like.weight.dtype)  # no draw from the caller's global RNG: overwritten below
    with torch.no_grad():
        lin.weight.copy_(weight)
        if bias is not None:
            lin.bias.copy_(bias)
    lin.requires_grad_(like.weight.requires_grad)
    setattr(lin, KEPT_ATTR, _kept_since_loaded(like, rows, cols))  # the save gives back what a narrower dtype rounded
    return lin


def shrink_attention(attn: nn.Module, keep_heads: torch.Tensor, *, o_weight: torch.Tensor | None = None,
                     kv_heads: int) -> None:
    """Keep query heads `keep_heads` (sorted, the same count in each KV group) of `attn`, in place.

    `o_weight` ``[hidden, len(keep_heads) * head_dim]`` replaces o_proj's kept columns (a refit); else they are
    sliced from o_proj.
    """
    hd = attn.head_dim
    n_q = attn.q_proj.out_features // hd
    group = n_q // kv_heads
    keep_heads = torch.as_tensor(keep_heads, dtype=torch.long).sort().values
    per_group = torch.bincount(keep_heads // group, minlength=kv_heads)
    if len(keep_heads) == 0 or int(per_group.min()) != int(per_group.max()) or int(per_group.min()) < 1:
        raise InputError(f"query heads to keep {keep_heads.tolist()} break GQA: each of the {kv_heads} KV groups "
                         "must keep the same number (at least one)")
    cols = head_columns(keep_heads, hd)  # [kept * head_dim]
    q, o = attn.q_proj, attn.o_proj
    q_bias = q.bias[cols] if q.bias is not None else None
    w_o = o.weight[:, cols] if o_weight is None else o_weight.to(o.weight.dtype)  # [hidden, kept * head_dim]
    if w_o.shape != (o.out_features, cols.numel()):
        raise ValueError(f"o_weight has shape {tuple(w_o.shape)}, expected {(o.out_features, cols.numel())}")
    attn.q_proj = _new_linear(q.weight[cols], q_bias, q, rows=cols)  # [kept * head_dim, hidden]
    attn.o_proj = _new_linear(w_o, o.bias, o, cols=cols)
    norm = getattr(attn, "q_norm", None)
    weight = getattr(norm, "weight", None)
    if isinstance(weight, torch.Tensor) and tuple(weight.shape) == (n_q, hd):  # one row per head (Cohere's qk-norm)
        attn.q_norm = _rows_of(norm, keep_heads)
    attn.num_key_value_groups = int(per_group[0])
    if hasattr(attn, "num_heads"):
        attn.num_heads = len(keep_heads)


def _rows_of(norm: nn.Module, rows: torch.Tensor) -> nn.Module:
    """A copy of per-head norm `norm` (weight ``[heads, head_dim]``) keeping the heads `rows`; `norm` is unchanged,
    so the dense module can be put back."""
    import copy

    new = copy.deepcopy(norm)
    new.weight = nn.Parameter(norm.weight.detach()[rows].clone(), requires_grad=norm.weight.requires_grad)
    setattr(new, KEPT_ATTR, _kept_since_loaded(norm, rows, None))
    return new


def shrink_mlp(mlp: nn.Module, keep: torch.Tensor, *, down_weight: torch.Tensor | None = None) -> None:
    """Keep neurons `keep` (sorted indices) of `mlp`, in place; `down_weight` ``[hidden, len(keep)]`` is a refit."""
    keep = torch.as_tensor(keep, dtype=torch.long).sort().values
    if keep.numel() == 0:
        raise InputError("an MLP must keep at least one neuron")
    d = mlp.down_proj
    w_d = d.weight[:, keep] if down_weight is None else down_weight.to(d.weight.dtype)  # [hidden, kept]
    if w_d.shape != (d.out_features, keep.numel()):
        raise ValueError(f"down_weight has shape {tuple(w_d.shape)}, expected {(d.out_features, keep.numel())}")
    if _fused_mlp(mlp):  # the gate rows of the kept neurons, then their up rows: the forward's chunk(2) splits them
        gu = mlp.gate_up_proj
        rows = torch.cat([keep, keep + d.in_features])
        mlp.gate_up_proj = _new_linear(gu.weight[rows], gu.bias[rows] if gu.bias is not None else None, gu, rows=rows)
    else:
        g, u = mlp.gate_proj, mlp.up_proj
        mlp.gate_proj = _new_linear(g.weight[keep], g.bias[keep] if g.bias is not None else None, g,
                                    rows=keep)  # [kept, hidden]
        mlp.up_proj = _new_linear(u.weight[keep], u.bias[keep] if u.bias is not None else None, u, rows=keep)
    mlp.down_proj = _new_linear(w_d, d.bias, d, cols=keep)
    if hasattr(mlp, "intermediate_size"):
        mlp.intermediate_size = keep.numel()


def attention(block: nn.Module) -> nn.Module:
    return _attn(block)


def mlp_of(block: nn.Module) -> nn.Module:
    return _mlp(block)
