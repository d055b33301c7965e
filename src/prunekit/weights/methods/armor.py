"""ARMOR: an N:M-sparse core between two block-diagonal matrices, fitted by block coordinate descent.

Liu et al., "ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix Factorization" (ICLR 2026);
reference code LawrenceRLiu/ARMOR (`src/ARMOR_compress.py::BlockCompressLearnable`, `sparse_core_step`,
`src/sparse_compress.py`).

Representation. Each Linear weight ``W [out, in]`` becomes ``W' = A (S * M) B``: a core ``S`` whose mask ``M`` is
N:M along the input dimension (2:4 keeps 2 of every 4 consecutive inputs of a row) between block-diagonal
``A [out, out]`` and ``B [in, in]``, stored as ``[ceil(out/bs), bs, bs]`` and ``[ceil(in/bs), bs, bs]``
(``bs = min(block_size, dim)``). When bs does not divide a dimension the last block is padded: its padded
rows and columns are never read (inputs are zero-padded, outputs cut), and `extra_params` counts only the
real ``bs^2 + ... + rest^2`` entries. `ArmorLinear` computes ``x -> B -> core -> A``; with PyTorch's 2:4
kernels on CUDA (compute capability >= 8.0, fp16/bf16) the core product runs semi-structured sparse.

Proxy loss (normalised): ``l = tr(E H E^T) / tr(W H W^T)``, ``E = W - W'``, ``H = 2/n sum x x^T`` (the engine's
"hessian" statistic, as SparseGPT's). This is the exact squared output error of the layer on the calibration
inputs, relative to the output's own energy.

Algorithm (block coordinate descent, `_fit`):

1. Start from SparseGPT's N:M solution for the same layer: ``A = B = I``, ``S`` = that solution, ``M`` = its
   support. This iterate's loss is the first one recorded, so the result is never worse than SparseGPT.
2. Each iteration computes ``T = S B``, ``E = W - A T``, ``E H``, the loss ``sum(E * EH)``, and with
   ``G = dl/dW' = -2 E H / tr(W H W^T)`` the gradients ``dA_i = G_i T_i^T`` (row block i),
   ``dB_j = S_j^T (A^T G)_j`` (column block j) and ``dS = A^T G B^T``: all block-diagonal products are
   batched matmuls on the ``[nb, bs, bs]`` stacks.
3. Discrete step (`_discrete_step`): in every (A-block i, B-block j) pair one group of m consecutive core
   entries is sampled with probability proportional to the L1 norm of ``dS`` on it (the reference's
   ``gradient_all_random``). With all else fixed the loss is quadratic in the group's values s: group g (row
   r, columns c..c+m) contributes ``a_r (B_g^T s)^T`` to W' (``a_r`` = column r of A, ``B_g`` = rows c..c+m
   of B), so ``l(s) = l_0 - 2 s^T f + |a_r|^2 s^T G_g s`` with ``G_g = B_g H B_g^T / tr(W H W^T)`` and
   ``f = -dS_g / 2 + |a_r|^2 G_g s_now``. On a support T (one of the C(m, n) candidates, 6 for 2:4) the
   least-squares values are ``s_T = G_TT^-1 f_T / |a_r|^2`` and the loss ``l_0 - f_T^T G_TT^-1 f_T / |a_r|^2``;
   the best candidate is taken when it lowers the loss. Groups in different A-blocks never interact
   (``a_r^T a_r' = 0``); within an A-block the full H couples the groups of different B-blocks, so the cross
   terms ``(a_r^T a_r') (u^T H u') / tr(W H W^T)`` (``u = B_g^T (s_new - s_now)``) are computed exactly and
   the block's groups are all accepted only when that joint change beats its best single group, which alone
   is accepted otherwise. The step never raises the loss (tested: the predicted change equals the actual).
4. Continuous step: one Adam step on A, B and the masked core values (Adam state of re-solved groups reset),
   learning rate ``lr`` for A and B (dimensionless, around the identity) and ``CORE_LR * lr * rms(core)`` for
   the core, so the core's steps are relative to its scale; linear warm-up over the first 10% of the
   iterations, then cosine decay to 0.
5. The best iterate is kept; the loop stops after `iters` iterations or when the loss has not improved by
   a relative 1e-6 for `patience` iterations. A final fp32 check of ``L(new) - L(SparseGPT)`` (computed as
   one trace, without cancellation) falls back to SparseGPT's solution if rounding made it worse.

Defaults, measured on SmolLM2-135M block 5 (H from 16 x 512 wiki calibration tokens; loss normalised by
``tr(W H W^T)``; seconds on one CPU thread of a shared 2-core machine, ~1.7-2.4x faster with 2 threads):

    layer (out x in)        SparseGPT 2:4 | bs=128, 100 it      overhead | bs=32, 100 it      overhead
    q_proj (576 x 576)      0.0161        | 0.0032 (0.20x) 2.4 s  +42.0% | 0.0087 (0.54x) 1.5 s  +11.1%
    gate_proj (1536 x 576)  0.0424        | 0.0143 (0.34x) 5.4 s  +30.1% | 0.0277 (0.65x) 4.0 s   +7.6%
    down_proj (576 x 1536)  0.0688        | 0.0167 (0.24x) 7.8 s  +30.1% | 0.0410 (0.60x) 7.8 s   +7.6%

(overhead = entries of A and B / entries of the dense layer. Refitting the core alone, with A = B = I held
fixed, reaches only ~0.84x in 150 iterations on q_proj and gate_proj: the gain comes from the factors.)

- ``block_size=32``: on SmolLM2-135M (576 wide) the paper's 128 adds 35.5% to the block Linears' parameters
  (30-42% per layer, 81.5% on the 192-row k/v projections), which defeats 2:4; 32 adds 9.2% (7.6-11.1%, 22.2%
  on k/v). The paper reports +2.4-5% with 128 on 3584-8192-wide models; use 128 for those.
- ``iters=100``, ``lr=1e-2``, ``CORE_LR=10``, 10% warm-up + cosine: the fastest decrease among lr 1e-3..3e-2
  x core multiplier 1..30 at 60-200 iterations; 200 iterations give another 4-37% lower loss at twice the
  time. Estimated from the per-layer times with 2 threads, 100 iterations put all 210 Linears of
  SmolLM2-135M at about 6 (bs=32) to 8 (bs=128) minutes on 2 cores. The reference's ``lr 1e-4`` is tuned
  for 3000-20000 iterations.
- ``patience=20``: the longest stall observed in these runs was 4 iterations.

Departures from the reference:

- Full Hessian: the reference's loss is ``sum_ij (W - W')_ij^2 diag(H)_j``, which ignores the correlation of
  inputs; the full-H loss is the layer's actual output error on the calibration data (what SparseGPT
  minimises), so the two methods are compared on the same objective. Its cost is one ``[out, in] x [in, in]``
  matmul per iteration and the exact cross-term check of step 3 (with diag(H), groups in different
  (A-block, B-block) pairs do not interact, so the reference needs no such check).
- Initialisation from SparseGPT's N:M solution instead of NoWag-P (a Wanda-like 2:4 mask on row/column-
  normalised weights); no NoWag normalisation (the reference normalises W and folds the norms into A and B
  at export): the core's Adam step is scaled by its RMS instead, which plays the same role.
- Learning rate, schedule, iterations and patience as above (reference: constant 1e-4, 20000 iterations
  in the paper scripts, 3000 in ARMOR.yaml, patience 100).
- Monotone by construction: the best iterate is kept and the discrete step is exact; the reference keeps the
  last iterate (its best-state copy is commented out), takes the Adam step before the discrete one and
  counts patience against the previous iterate rather than the best.
- Dimensions that the block size does not divide are supported (the reference asserts divisibility).
- Group sampling draws from the same distribution by inverse CDF (``torch.multinomial`` is slow on CPU).
- General N:M with up to C(M, N) = 70 candidate supports (4:8); the reference runs 2:4.

Saving: `ArmorLinear.state_dict` holds only the dense ``weight`` (``A S B``) and ``bias``, so
``model.save_pretrained`` writes a checkpoint any transformers install loads as a plain dense model with the
same function; `save_factors` writes ``armor.safetensors`` beside it and `install_factors` restores the
factorized modules after checking they reproduce the loaded weights.
"""

from __future__ import annotations

import itertools
import json
import math
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import InputError
from prunekit.weights.engine import is_conv1d, zeros_in
from prunekit.select import NM, parse_pattern, ratio_for
from prunekit.weights.engine import Replacement
from prunekit.weights.methods import sparsegpt

__all__ = ["ArmorLinear", "prune_weight", "proxy_loss", "save_factors", "install_factors", "FACTORS_FILE"]

BLOCK_SIZE = 32
# The first semi-structured product after each conversion is compared with the dense core: a max difference over
# this share of the output's max sends the layer dense. On an H200 the kernel's right outputs were within 8.6e-3
# (bf16) of fp32, its wrong ones (a strided input, since made contiguous) about 1.4 off.
SPARSE_CHECK_TOL = 0.05
ITERS = 100
LR = 1e-2
CORE_LR = 10.0  # the core's Adam step is CORE_LR * LR * rms(kept core values); A and B step LR
WARMUP = 0.1  # linear warm-up over this fraction of the iterations, then cosine decay to 0
PATIENCE = 20
MIN_REL_IMPROVEMENT = 1e-6
MAX_CANDIDATES = 70  # C(8, 4): 4:8 is the largest pattern whose supports are enumerated
FACTORS_FILE = "armor.safetensors"
_FORMAT = "prunekit-armor/1"
_META_KEY = "prunekit_armor"  # the one metadata key of armor.safetensors (JSON)


# ---------------------------------------------------------------------------------------------------------------
# Block-diagonal products on (nblocks, bs, bs) stacks. A dimension d that bs does not divide is padded to
# nblocks * bs; the padded rows/columns of the last block (the identity, from the fit) never touch real entries:
# inputs are zero-padded and outputs cut, and in the fit their gradients are exactly zero.


def _nblocks(d: int, bs: int) -> int:
    return -(-d // bs)


def _pad_last(x: torch.Tensor, size: int) -> torch.Tensor:
    return x if x.shape[-1] == size else F.pad(x, (0, size - x.shape[-1]))


def _apply_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``x @ D^T`` for the block-diagonal ``D`` stored as `blocks` (``[nb, bs, bs]``); `x` is ``[..., d]``."""
    nb, bs, _ = blocks.shape
    d = x.shape[-1]
    xb = _pad_last(x, nb * bs).reshape(*x.shape[:-1], nb, bs)  # [..., nb, bs]
    y = torch.einsum("...nk,nlk->...nl", xb, blocks).reshape(*x.shape[:-1], nb * bs)
    return y[..., :d] if nb * bs != d else y


_STRIDED_ROWS = 256  # on a CPU the strided GEMM wins from this many rows on (below, the permuted copy's)


def _forward_blocks(x: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """`_apply_blocks` for `ArmorLinear`'s forward: the same product as one batched GEMM over the blocks.

    Without autograd it reads the blocks of `x` and writes those of the output where they lie (strided views of
    ``[rows, nb, bs]``, no permuted copy): on an H200 (bf16, CUDA graphs, 4096 rows) that made the block
    product 2.5-2.9x faster than the einsum at widths 4096 and 11008, and on this 2-core CPU (fp32, one thread)
    1.16-1.5x from 256 rows on; fewer CPU rows take the bmm of a permuted copy, faster there (1.13-1.65x than
    the einsum). With autograd: `_apply_blocks`.
    """
    if torch.is_grad_enabled() and (x.requires_grad or blocks.requires_grad):
        return _apply_blocks(x, blocks)
    nb, bs, _ = blocks.shape
    d = x.shape[-1]
    flat = _pad_last(x, nb * bs).reshape(-1, nb * bs)  # [rows, nb*bs]
    rows = flat.shape[0]
    xb, bt = flat.view(rows, nb, bs).transpose(0, 1), blocks.transpose(1, 2)  # [nb, rows, bs], [nb, bs, bs]
    if x.device.type == "cpu" and rows < _STRIDED_ROWS:
        y = torch.bmm(xb, bt).transpose(0, 1)
    else:
        y = torch.empty(rows, nb, bs, device=x.device, dtype=torch.result_type(flat, blocks))
        torch.bmm(xb, bt, out=y.transpose(0, 1))
    y = y.reshape(*x.shape[:-1], nb * bs)
    return y[..., :d] if nb * bs != d else y


def _identity_blocks(d: int, bs: int, device=None) -> torch.Tensor:
    """``[nb, bs, bs]`` identities: the block-diagonal identity of size `d` (padded to whole blocks)."""
    return torch.eye(bs, device=device).expand(_nblocks(d, bs), bs, bs).contiguous()


def _left(blocks: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``D @ T`` for ``T`` ``[nb*bs, n]``."""
    nb, bs, _ = blocks.shape
    return torch.bmm(blocks, t.view(nb, bs, -1)).view(nb * bs, -1)


def _right(t: torch.Tensor, blocks: torch.Tensor) -> torch.Tensor:
    """``T @ D`` for ``T`` ``[n, nb*bs]``."""
    nb, bs, _ = blocks.shape
    return torch.einsum("onk,nkl->onl", t.view(t.shape[0], nb, bs), blocks).reshape(t.shape[0], nb * bs)


def _dense(a: torch.Tensor, core: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``A @ core @ B`` ``[out, in]`` from the (padded) block stacks."""
    out, inp = core.shape
    padded = F.pad(core, (0, b.shape[0] * b.shape[1] - inp, 0, a.shape[0] * a.shape[1] - out))
    return _left(a, _right(padded, b))[:out, :inp]


def _real_block_params(d: int, bs: int) -> int:
    """Entries of a block-diagonal d x d matrix with blocks of `bs` (the last one smaller when bs does not divide d)."""
    full, rest = divmod(d, bs)
    return full * bs * bs + rest * rest


def _block_size_for(d: int, block_size: int) -> int:
    return min(block_size, d)


# ---------------------------------------------------------------------------------------------------------------
# The module


class ArmorLinear(nn.Module):
    """``y = x @ (A @ core @ B)^T + bias`` with an N:M-sparse `core` and block-diagonal `a`, `b`.

    `a` is ``[ceil(out/bs_a), bs_a, bs_a]`` and `b` ``[ceil(in/bs_b), bs_b, bs_b]``; when a block size does
    not divide its dimension, the last block is padded (its padded rows/columns are unused: inputs are padded
    with zeros and outputs cut). The forward runs x -> B -> core -> A without forming the dense weight; on a
    CUDA device of compute capability >= 8.0 with fp16/bf16 inputs and a 2:4 core, the core product uses
    PyTorch's semi-structured sparse kernels (converted once, cached), falling back to dense when PyTorch
    refuses the shape or its first product disagrees with the dense core (`SPARSE_CHECK_TOL`; a RuntimeWarning
    says so); ``sparse_kernel=False`` (an attribute too) keeps it dense. Measured on an H200 with torch
    2.11+cu130 (bench/results/armor_cuda.md): called eagerly, each semi-structured product took 0.47-1.18 ms,
    most of it host time in PyTorch's cuSPARSELt op (its kernel: 8-375 us), so slower than the dense core at
    every shape; replayed from a CUDA graph it was 1.15-1.38x faster than the dense core on 7B shapes at 4096
    tokens, slower at 64 tokens or fewer. With the block-diagonal A and B (`_forward_blocks`' batched GEMM) the
    whole layer took 0.98-1.30x the dense equivalent's one product there, graphed (1.32-1.71x with the einsum),
    and 1.12-4.17x at 512 tokens or fewer: on a GPU the faster model is the dense ``A core B`` that
    `save_pretrained` writes (it is not 2:4-sparse). Saving (`state_dict`) emits only the dense ``weight`` and
    ``bias``, so a ``save_pretrained`` checkpoint loads anywhere as a plain dense model; `save_factors` keeps
    the factors.
    ``conv1d_layout``: the module replaces a GPT-2 style ``Conv1D``, whose checkpoints hold the weight as
    ``[in, out]``; the dense weight is saved (and compared on load) transposed.
    """

    def __init__(self, core: torch.Tensor, a: torch.Tensor, b: torch.Tensor, bias: torch.Tensor | None = None,
                 *, pattern: NM = NM(2, 4), conv1d_layout: bool = False, sparse_kernel: bool = True):
        super().__init__()
        self.sparse_kernel = bool(sparse_kernel)
        self.conv1d_layout = bool(conv1d_layout)
        self.out_features, self.in_features = core.shape
        if a.shape[1] != a.shape[2] or b.shape[1] != b.shape[2]:
            raise InputError(f"ARMOR blocks must be square, got a {tuple(a.shape)} and b {tuple(b.shape)}")
        out, inp = self.out_features, self.in_features
        if a.shape[0] != _nblocks(out, a.shape[1]) or b.shape[0] != _nblocks(inp, b.shape[1]):
            raise InputError(
                f"ARMOR factors do not fit a {self.out_features}x{self.in_features} core: "
                f"a {tuple(a.shape)}, b {tuple(b.shape)}"
            )
        self.pattern = pattern
        self.block_size = (a.shape[1], b.shape[1])  # (output side A, input side B)
        self.core = nn.Parameter(core.detach().clone())
        self.a = nn.Parameter(a.detach().clone())
        self.b = nn.Parameter(b.detach().clone())
        self.bias = None if bias is None else nn.Parameter(bias.detach().clone())
        self._sparse_cache: tuple | None = None
        self._sparse_failed = False
        self._sparse_checked = False

    @property
    def extra_params(self) -> int:
        """Entries of A and B beyond the core (padding not counted)."""
        return _real_block_params(self.out_features, self.block_size[0]) + _real_block_params(
            self.in_features, self.block_size[1]
        )

    def factors(self) -> dict[str, torch.Tensor]:
        return {"core": self.core.detach(), "a": self.a.detach(), "b": self.b.detach()}

    def dense_weight(self) -> torch.Tensor:
        """``A @ core @ B`` ``[out, in]``."""
        with torch.no_grad():
            return _dense(self.a, self.core, self.b)

    def _sparse_core(self, x: torch.Tensor):
        """The core as a semi-structured sparse tensor when this device and dtype allow it, else None."""
        if (not self.sparse_kernel or self._sparse_failed or x.device.type != "cuda"
                or x.dtype not in (torch.float16, torch.bfloat16)
                or self.core.dtype != x.dtype or (self.pattern.n, self.pattern.m) != (2, 4)
                or not hasattr(torch.sparse, "to_sparse_semi_structured")
                or torch.cuda.get_device_capability(x.device)[0] < 8):
            return None
        key = (x.device, x.dtype, self.core._version, self.core.data_ptr())
        if self._sparse_cache is None or self._sparse_cache[0] != key:
            try:
                sparse = torch.sparse.to_sparse_semi_structured(self.core.detach())
            except (RuntimeError, ValueError, NotImplementedError):
                self._sparse_failed = True
                return None
            self._sparse_cache = (key, sparse)
            self._sparse_checked = False  # a new conversion is checked against the dense core once
        return self._sparse_cache[1]

    def _core_product(self, xb: torch.Tensor) -> torch.Tensor:
        sparse = self._sparse_core(xb)
        if sparse is not None:
            try:
                # contiguous: B's output is a column slice when its blocks pad the input; with that strided view
                # PyTorch 2.11's semi-structured product returned wrong rows (H200, measured: 1.4 relative error)
                flat = xb.reshape(-1, xb.shape[-1]).contiguous()
                y = F.linear(flat, sparse)
            except (RuntimeError, ValueError, NotImplementedError):
                self._sparse_failed = True
            else:
                if not self._sparse_checked:  # that wrong result raised nothing: compare once with the dense core
                    self._sparse_checked = True
                    dense = F.linear(flat, self.core)
                    scale = float(dense.detach().abs().max().float())
                    if not float((y - dense).detach().abs().max().float()) <= SPARSE_CHECK_TOL * scale + 1e-6:
                        self._sparse_failed = True
                        warnings.warn(f"ARMOR: PyTorch's semi-structured product disagreed with the dense core on a "
                                      f"{self.out_features}x{self.in_features} layer; it runs dense from now on",
                                      RuntimeWarning, stacklevel=2)
                        y = dense
                return y.reshape(*xb.shape[:-1], self.out_features)
        return F.linear(xb, self.core)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _forward_blocks(self._core_product(_forward_blocks(x, self.b)), self.a)
        return y if self.bias is None else y + self.bias

    def stored_weight(self) -> torch.Tensor:
        """The dense weight as the replaced layer stores it: ``[out, in]``, or ``[in, out]`` for a Conv1D."""
        dense = self.dense_weight()
        return dense.T.contiguous() if self.conv1d_layout else dense

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        # Only the dense equivalent: any transformers install loads the checkpoint as a plain Linear (or Conv1D).
        destination[prefix + "weight"] = self.stored_weight().to(self.core.dtype)
        if self.bias is not None:
            destination[prefix + "bias"] = self.bias if keep_vars else self.bias.detach()

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        if prefix + "core" in state_dict or prefix + "weight" not in state_dict:
            return super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                                 unexpected_keys, error_msgs)
        # A dense checkpoint cannot restore the factors; accept it only when it is this module's own weight.
        if not _matches(state_dict[prefix + "weight"], self.stored_weight()):
            error_msgs.append(f"{prefix}weight differs from the ARMOR factors' dense weight; install the factors "
                              "from armor.safetensors instead (prunekit.weights.methods.armor.install_factors)")
        if self.bias is not None:
            if prefix + "bias" in state_dict:
                with torch.no_grad():
                    self.bias.copy_(state_dict[prefix + "bias"])
            elif strict:
                missing_keys.append(prefix + "bias")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, pattern={self.pattern}, "
                f"block_size={self.block_size}, bias={self.bias is not None}"
                + (", conv1d_layout=True" if self.conv1d_layout else "")
                + ("" if self.sparse_kernel else ", sparse_kernel=False"))


def _matches(weight: torch.Tensor, dense: torch.Tensor) -> bool:
    """Equal up to a bf16 rounding (a checkpoint saved in half precision still matches its factors)."""
    if weight.shape != dense.shape:
        return False
    w, d = weight.detach().float().cpu(), dense.detach().float().cpu()
    return bool(torch.allclose(w, d, rtol=1e-2, atol=1e-3 * float(d.abs().max().clamp_min(1e-30))))


# ---------------------------------------------------------------------------------------------------------------
# Factor files

def save_factors(model: nn.Module, folder: str | Path, *, widen_to: torch.dtype | None = None) -> int:
    """Write ``folder/armor.safetensors``: ``{name}.core``, ``{name}.a``, ``{name}.b`` of every ArmorLinear, in
    their own dtype (factors rounded to half precision one by one would no longer match the dense weight), or in
    `widen_to` where that is wider (float32 for a half-precision model saved in float32: exact).

    The metadata (strings) holds the format, the block size(s) and each module's pattern and block sizes as
    JSON. Returns the number of modules written (no file when there are none).
    """
    from safetensors.torch import save_file

    tensors, modules = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, ArmorLinear):
            for key, value in module.factors().items():
                value = value.detach().cpu()
                if widen_to is not None and torch.finfo(widen_to).bits > torch.finfo(value.dtype).bits:
                    value = value.to(widen_to)
                tensors[f"{name}.{key}"] = value.contiguous()
            modules[name] = {"pattern": str(module.pattern), "block_size": list(module.block_size)}
    if not modules:
        return 0
    sizes = sorted({s for entry in modules.values() for s in entry["block_size"]})
    # one metadata key: safetensors writes several in a random order, so two identical runs wrote different bytes
    metadata = {_META_KEY: json.dumps({"format": _FORMAT, "block_size": ",".join(map(str, sizes)),
                                       "modules": json.dumps(modules)}, sort_keys=True)}
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / FACTORS_FILE), metadata=metadata)
    return len(modules)


def install_factors(model: nn.Module, folder: str | Path) -> int:
    """Replace each Linear named in ``folder/armor.safetensors`` by its ArmorLinear; returns the count (0 if absent).

    The Linear's loaded weight must equal the factors' dense reconstruction (to bf16 rounding): a folder whose
    weights and factors come from different runs is refused with an InputError.
    """
    from safetensors import safe_open

    path = Path(folder) / FACTORS_FILE
    if not path.is_file():
        return 0
    try:  # a truncated file was a raw SafetensorError
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise InputError(f"{path} is not a readable safetensors file ({' '.join(str(e).split())[:160]}); re-save the "
                         "model, or delete the file to load the dense model") from None
    if _META_KEY in metadata:  # else a file saved before the keys went into one
        try:
            metadata = json.loads(metadata[_META_KEY])
        except (ValueError, RecursionError):
            metadata = {}
        metadata = metadata if isinstance(metadata, dict) else {}
    if metadata.get("format") != _FORMAT:
        raise InputError(f"{path} is not a prunekit ARMOR factor file (format {metadata.get('format')!r})")
    try:
        modules = json.loads(metadata["modules"])
        if not isinstance(modules, dict) or not all(isinstance(v, dict) for v in modules.values()):
            raise ValueError("not a {module: {pattern, block_size}} object")
    except (KeyError, ValueError, TypeError, RecursionError):
        raise InputError(f"{path}: the metadata lacks the module list; re-save the factors") from None
    names = sorted({k.rsplit(".", 1)[0] for k in tensors})
    if set(names) != set(modules):
        raise InputError(f"{path}: the tensors and the metadata name different modules")
    for name in names:
        parts = {key: tensors.get(f"{name}.{key}") for key in ("core", "a", "b")}
        if any(v is None for v in parts.values()):
            raise InputError(f"{path}: {name} lacks one of .core/.a/.b")
        try:
            linear = model.get_submodule(name)
        except AttributeError:
            raise InputError(f"{path} names {name}, which this model does not have") from None
        conv1d = is_conv1d(linear)  # GPT-2: weight stored [in, out]
        if not (isinstance(linear, nn.Linear) or conv1d):
            raise InputError(f"{path} names {name}, a {type(linear).__name__}, not a Linear")
        weight = linear.weight.T if conv1d else linear.weight  # [out, in]
        if parts["core"].shape != weight.shape:
            raise InputError(f"{path}: {name} core is {tuple(parts['core'].shape)}, the model's weight "
                             f"{tuple(weight.shape)}")
        pattern = _parse_nm(modules[name].get("pattern", ""), path)
        if not _is_n_m(parts["core"], pattern):
            raise InputError(f"{path}: the core of {name} is not {pattern} sparse; the file is damaged")
        new = ArmorLinear(parts["core"], parts["a"], parts["b"], linear.bias, pattern=pattern, conv1d_layout=conv1d)
        if not _matches(weight, new.dense_weight()):
            diff = float((weight.detach().float().cpu() - new.dense_weight().float()).abs().max())
            raise InputError(
                f"{folder}: the weights of {name} and {FACTORS_FILE} disagree (max |difference| {diff:.3g}); "
                "they come from different runs; re-save the model and its factors together"
            )
        new = new.to(device=weight.device, dtype=weight.dtype)
        parent_name, _, attr = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, attr, new)
    return len(names)


def _parse_nm(text: str, path: Path) -> NM:
    try:
        pattern = parse_pattern(text)
    except InputError:
        pattern = None
    if pattern is None:
        raise InputError(f"{path}: pattern {text!r} in the metadata is not N:M; the file is damaged")
    return pattern


def _is_n_m(core: torch.Tensor, pattern: NM) -> bool:
    """At most n nonzeros in every m consecutive entries of each row."""
    rows, cols = core.shape
    if cols % pattern.m:
        return False
    return bool(((core != 0).reshape(rows, cols // pattern.m, pattern.m).sum(-1) <= pattern.n).all())


# ---------------------------------------------------------------------------------------------------------------
# The fit


def proxy_loss(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """``tr((W - W') H (W - W')^T) / tr(W H W^T)``: the layer's output error on the calibration inputs."""
    e = (weight - new).double()
    h = hessian.double()
    w = weight.double()
    return float((e * (e @ h)).sum() / (w * (w @ h)).sum().clamp_min(1e-300))


class _Problem:
    """W, H and the block layout, padded to whole blocks (padded rows of W and rows/columns of H are zero)."""

    def __init__(self, weight: torch.Tensor, hessian: torch.Tensor, block_size: int, pattern: NM):
        self.out, self.inp = weight.shape
        self.bo, self.bi = _block_size_for(self.out, block_size), _block_size_for(self.inp, block_size)
        self.nbo, self.nbi = _nblocks(self.out, self.bo), _nblocks(self.inp, self.bi)
        self.po, self.pi = self.nbo * self.bo, self.nbi * self.bi  # padded sizes
        self.m, self.n = pattern.m, pattern.n
        self.device = dev = weight.device
        self.w = F.pad(weight.float(), (0, self.pi - self.inp, 0, self.po - self.out))  # [po, pi]
        self.h = F.pad(hessian.to(dev, torch.float32), (0, self.pi - self.inp, 0, self.pi - self.inp))  # [pi, pi]
        self.wh = self.w @ self.h  # [po, pi]
        self.scale = float((self.w * self.wh).sum()) or 1.0  # tr(W H W^T)
        self.h_diag = torch.stack([self.h[j * self.bi:(j + 1) * self.bi, j * self.bi:(j + 1) * self.bi]
                                   for j in range(self.nbi)])  # [nbi, bi, bi]
        self.gpb = self.bi // self.m  # groups per block row
        rows = torch.arange(self.po, device=dev).view(self.nbo, 1, self.bo, 1) < self.out
        first = torch.arange(self.pi, device=dev).view(self.nbi, self.gpb, self.m)[..., 0]  # a group's first column
        cols = (first < self.inp).view(1, self.nbi, 1, self.gpb)
        self.valid = (rows & cols).reshape(self.nbo, self.nbi, self.bo * self.gpb)  # real groups (not padding)
        self.candidates = torch.tensor(list(itertools.combinations(range(self.m), self.n)), device=dev)  # [C, n]
        self.arange_m = torch.arange(self.m, device=dev)

    def pad_core(self, core: torch.Tensor) -> torch.Tensor:
        return F.pad(core, (0, self.pi - self.inp, 0, self.po - self.out))


def _loss_grads(p: _Problem, a, core, b):
    """Normalised loss ``l = tr(E H E^T) / tr(W H W^T)`` and its gradients in A, B and the (unmasked) core."""
    t = _right(core, b)  # core @ B  [po, pi]
    e = p.w - _left(a, t)  # E = W - A core B  [po, pi]
    eh = e @ p.h  # E H  [po, pi]
    loss = float((e * eh).sum()) / p.scale
    g = eh.mul_(-2.0 / p.scale)  # dl/dW' = -2 E H / scale
    grad_a = torch.bmm(g.view(p.nbo, p.bo, p.pi), t.view(p.nbo, p.bo, p.pi).transpose(1, 2))  # [nbo, bo, bo]
    dt = torch.bmm(a.transpose(1, 2), g.view(p.nbo, p.bo, p.pi)).view(p.po, p.pi)  # A^T G
    grad_b = torch.einsum("onk,onl->nkl", core.view(p.po, p.nbi, p.bi), dt.view(p.po, p.nbi, p.bi))
    grad_core = torch.einsum("onl,nkl->onk", dt.view(p.po, p.nbi, p.bi), b).reshape(p.po, p.pi)  # A^T G B^T
    return loss, grad_a, grad_b, grad_core


def _sample_groups(p: _Problem, grad_core: torch.Tensor, gen: torch.Generator):
    """One group per (A-block, B-block) pair, drawn with probability proportional to the L1 norm of the loss
    gradient on the group (the reference's ``gradient_all_random``). Returns rows and first columns, each
    ``[nbo, nbi]``."""
    nbo, nbi, bo, gpb, m = p.nbo, p.nbi, p.bo, p.gpb, p.m
    l1 = grad_core.abs().view(-1, m) @ torch.ones(m, device=p.device)  # [po*pi/m]; a sum over dim m is slow on CPU
    l1 = l1.view(nbo, bo, nbi, gpb).permute(0, 2, 1, 3).reshape(nbo, nbi, bo * gpb)
    l1 = (l1 / l1.amax(-1, keepdim=True).clamp_min(1e-30) + 1e-6) * p.valid  # every real group stays possible
    cdf = l1.cumsum(-1)  # inverse-CDF sampling: far cheaper than torch.multinomial on a CPU
    u = torch.rand(nbo, nbi, 1, generator=gen, device=p.device) * cdf[..., -1:]
    pick = torch.searchsorted(cdf, u).squeeze(-1).clamp_max(bo * gpb - 1)  # [nbo, nbi]
    rows = torch.arange(nbo, device=p.device).view(nbo, 1) * bo + pick // gpb
    starts = torch.arange(nbi, device=p.device).view(1, nbi) * p.bi + (pick % gpb) * m
    return rows, starts


def _discrete_step(p: _Problem, a, core, mask, b, grad_core, gen) -> tuple[torch.Tensor, float, int]:
    """Re-solve one sampled group per (A-block, B-block) pair over all its C(m, n) supports, in place.

    Returns the entries that changed (``[po, pi]`` bool), the loss change (<= 0) and how many groups changed
    support.

    A group g (row r, columns c..c+m) with values s enters as ``W' = ... + a_r (B_g^T s)^T`` (``a_r`` column r
    of A, ``B_g`` rows c..c+m of B), so with everything else fixed the loss is quadratic in s:
    ``l(s) = l_0 - 2 s^T f + |a_r|^2 s^T G s`` with ``G = B_g H B_g^T / scale`` and
    ``f = -grad_g / 2 + |a_r|^2 G s_current`` (``grad`` the loss gradient in the core). On a support T the
    minimiser is ``s_T = G_TT^-1 f_T / |a_r|^2`` and the loss ``l_0 - f_T^T G_TT^-1 f_T / |a_r|^2``.
    Groups in different A-blocks do not interact (``a_r^T a_r' = 0``); within one A-block the cross terms
    ``(a_r^T a_r') (u^T H u') / scale`` (``u = B_g^T delta``) are computed exactly, and the block's groups are
    all accepted only when that joint change beats the best single group, which alone is accepted otherwise.
    So the step never raises the loss.
    """
    nbo, nbi, bo, bi = p.nbo, p.nbi, p.bo, p.bi
    rows, starts = _sample_groups(p, grad_core, gen)  # [nbo, nbi]: group (i, j) lies in A-block i, B-block j
    ar_m, dev = p.arange_m, p.device
    cols = starts.unsqueeze(-1) + ar_m  # [nbo, nbi, m]
    s = core[rows.unsqueeze(-1), cols]  # [nbo, nbi, m]
    grad = grad_core[rows.unsqueeze(-1), cols]  # [nbo, nbi, m]
    a_col = a.transpose(1, 2)[torch.arange(nbo, device=dev).view(nbo, 1), rows % bo]  # [nbo, nbi, bo]: A[:, r]
    asq = a_col.square().sum(-1).clamp_min(1e-30)  # [nbo, nbi]
    b_g = b[torch.arange(nbi, device=dev).view(1, nbi, 1), (starts % bi).unsqueeze(-1) + ar_m]  # [nbo, nbi, m, bi]
    bh = torch.einsum("ijmb,jbc->ijmc", b_g, p.h_diag)  # [nbo, nbi, m, bi]
    g = bh @ b_g.transpose(-1, -2) / p.scale  # [nbo, nbi, m, m]
    f = -grad / 2 + asq.unsqueeze(-1) * (g @ s.unsqueeze(-1)).squeeze(-1)  # [nbo, nbi, m]

    cand = p.candidates  # [C, n]
    f_t = f[..., cand]  # [nbo, nbi, C, n]
    g_tt = g[..., cand.unsqueeze(-1), cand.unsqueeze(-2)]  # [nbo, nbi, C, n, n]
    # a tiny ridge keeps dead inputs solvable; with it f_T^T x under-states the true decrease, never over-states
    ridge = 1e-6 * torch.diagonal(g, dim1=-2, dim2=-1).mean(-1) + 1e-30  # [nbo, nbi]
    eye = torch.eye(p.n, device=dev)
    x = torch.linalg.solve(g_tt + ridge[..., None, None, None] * eye, f_t.unsqueeze(-1)).squeeze(-1)  # [.., C, n]
    gain = (f_t * x).sum(-1)  # [nbo, nbi, C]
    best = gain.argmax(-1)  # [nbo, nbi]
    best_x = torch.gather(x, 2, best[..., None, None].expand(nbo, nbi, 1, p.n)).squeeze(2) / asq.unsqueeze(-1)
    s_new = torch.zeros_like(s).scatter_(-1, cand[best], best_x)  # [nbo, nbi, m]
    current = -2 * (s * f).sum(-1) + asq * (s.unsqueeze(-2) @ g @ s.unsqueeze(-1)).view(nbo, nbi)
    delta_l = -gain.gather(-1, best.unsqueeze(-1)).squeeze(-1) / asq - current  # [nbo, nbi], <= 0
    improve = delta_l < 0  # [nbo, nbi]

    # exact joint change within each A-block: the singles plus the cross terms
    delta = (s_new - s) * improve.unsqueeze(-1)  # [nbo, nbi, m]
    u = torch.einsum("ijm,ijmb->ijb", delta, b_g)  # [nbo, nbi, bi]: B_g^T delta in block j's coordinates
    uh = torch.einsum("ijb,jbc->ijc", u, p.h.view(nbi, bi, p.pi))  # [nbo, nbi, pi]
    uhu = torch.einsum("ijkc,ikc->ijk", uh.view(nbo, nbi, nbi, bi), u)  # [nbo, nbi, nbi]
    cross = (a_col @ a_col.transpose(1, 2)) * uhu / p.scale  # [nbo, nbi, nbi]
    cross = cross - torch.diag_embed(torch.diagonal(cross, dim1=-2, dim2=-1))
    joint = (delta_l * improve).sum(-1) + cross.sum((-2, -1))  # [nbo]
    single = torch.where(improve, delta_l, torch.zeros_like(delta_l)).min(-1)  # [nbo]
    take_all = joint <= single.values
    only = torch.zeros_like(improve).scatter_(-1, single.indices.unsqueeze(-1), True)
    accept = improve & (take_all.unsqueeze(-1) | only)  # [nbo, nbi]
    change = float(torch.where(take_all, joint, single.values).sum())

    r, c = rows[accept].unsqueeze(-1), cols[accept]  # [K, 1], [K, m]
    new = s_new[accept]  # [K, m]
    swapped = int(((new != 0) != mask[r, c]).any(-1).sum())
    core[r, c] = new
    mask[r, c] = new != 0
    changed = torch.zeros_like(mask)
    changed[r, c] = True
    return changed, change, swapped


class _Adam:
    """Plain Adam on a list of tensors, with per-tensor learning-rate multipliers."""

    def __init__(self, params, scales, betas=(0.9, 0.999), eps=1e-8):
        self.params, self.scales, self.betas, self.eps = params, scales, betas, eps
        self.m = [torch.zeros_like(q) for q in params]
        self.v = [torch.zeros_like(q) for q in params]
        self.t = 0

    def step(self, grads, lr: float) -> None:
        self.t += 1
        b1, b2 = self.betas
        c1, c2 = 1 - b1**self.t, 1 - b2**self.t
        for q, g, m, v, scale in zip(self.params, grads, self.m, self.v, self.scales):
            m.mul_(b1).add_(g, alpha=1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
            q.addcdiv_(m, v.div(c2).sqrt_().add_(self.eps), value=-lr * scale / c1)


def _lr_at(lr: float, it: int, iters: int) -> float:
    warm = max(1, int(WARMUP * iters))
    if it < warm:
        return lr * (it + 1) / warm
    return lr * 0.5 * (1 + math.cos(math.pi * (it - warm) / max(1, iters - warm)))


def _check(weight: torch.Tensor, hessian: torch.Tensor, ratio, pattern, block_size: int) -> NM:
    if pattern is None:
        raise InputError("armor needs --pattern N:M (e.g. 2:4): its core is N:M sparse, unstructured is not supported")
    if not isinstance(pattern, NM):
        raise InputError(f"armor needs an N:M pattern (e.g. 2:4), got {pattern!r}")
    ratio_for(ratio, pattern)
    if math.comb(pattern.m, pattern.n) > MAX_CANDIDATES:
        raise InputError(f"armor enumerates all C(M, N) supports of a group; {pattern} has "
                         f"{math.comb(pattern.m, pattern.n)}, more than {MAX_CANDIDATES}; use 2:4 or 4:8")
    out, inp = weight.shape
    if inp % pattern.m:
        raise InputError(f"pattern {pattern} needs an input size divisible by {pattern.m}, got {inp}")
    if hessian.shape != (inp, inp):
        raise InputError(
            f"armor needs the [in, in] Hessian, got {tuple(hessian.shape)} for weight {tuple(weight.shape)}"
        )
    if isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1:
        raise InputError(f"armor block size must be a positive integer, got {block_size!r}")
    if _block_size_for(inp, block_size) % pattern.m:
        raise InputError(f"armor block size {block_size} must be a multiple of the pattern's M={pattern.m}")
    return pattern


def _check_schedule(iters, lr, patience) -> None:
    if isinstance(iters, bool) or not isinstance(iters, int) or iters < 0:
        raise InputError(f"armor iterations must be a non-negative integer, got {iters!r}")
    if isinstance(patience, bool) or not isinstance(patience, int) or patience < 1:
        raise InputError(f"armor patience must be a positive integer, got {patience!r}")
    if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise InputError(f"armor learning rate must be a positive number, got {lr!r}")


def prune_weight(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    *,
    ratio: float | None = None,
    pattern: NM | None,
    block_size: int = BLOCK_SIZE,
    iters: int = ITERS,
    lr: float = LR,
    patience: int = PATIENCE,
    seed: int = 0,
    bias: torch.Tensor | None = None,
) -> Replacement:
    """Fit ``W' = A (core * M) B`` to `weight` (``[out, in]``) under ``H`` (``[in, in]``); see the module docstring.

    `bias` (``[out]``), when given, goes into the returned module unchanged. The returned `Replacement` has the
    dense equivalent, the `ArmorLinear`, the core's sparsity, the parameters A and B add, and
    ``info = {"proxy_loss_sparsegpt", "proxy_loss", "iterations", "support_changes", "block_size"}`` (losses
    normalised by ``tr(W H W^T)``).
    """
    pattern = _check(weight, hessian, ratio, pattern, block_size)
    _check_schedule(iters, lr, patience)
    w0 = sparsegpt.prune_weight(weight, hessian, ratio=pattern.ratio, pattern=pattern)  # [out, in]
    p = _Problem(weight, hessian, block_size, pattern)
    a, b, core, loss0, loss, it, swaps = _fit(p, p.pad_core(w0), iters=iters, lr=lr, patience=patience, seed=seed)
    core = core[: p.out, : p.inp]
    module = ArmorLinear(core, a, b, bias, pattern=pattern)
    dense = module.dense_weight()
    if _loss_change(weight, w0, dense, hessian) > 0:  # fp32 noise on a negligible gain: SparseGPT's solution
        a, b, core, loss = _identity_blocks(p.out, p.bo, p.device), _identity_blocks(p.inp, p.bi, p.device), w0, loss0
        module = ArmorLinear(core, a, b, bias, pattern=pattern)
        dense = module.dense_weight()
    zeros = zeros_in(core)
    info = {"proxy_loss_sparsegpt": loss0, "proxy_loss": loss, "iterations": it, "support_changes": swaps,
            "block_size": [p.bo, p.bi]}
    return Replacement(weight=dense, module=module, sparsity=zeros / core.numel(), extra_params=module.extra_params,
                       info=info)


def _fit(p: _Problem, core: torch.Tensor, *, iters: int, lr: float, patience: int, seed: int):
    """The BCD loop from ``A = B = I`` and `core` (padded); returns the best iterate and its bookkeeping."""
    a, b = _identity_blocks(p.out, p.bo, p.device), _identity_blocks(p.inp, p.bi, p.device)
    mask = core != 0
    kept = core[mask]
    core_rms = float(kept.square().mean().sqrt()) if kept.numel() else 1.0
    adam = _Adam([a, b, core], [1.0, 1.0, CORE_LR * (core_rms or 1.0)])
    gen = torch.Generator(device=p.device).manual_seed(seed)
    best, best_state, loss0, stale, swaps, it = math.inf, None, None, 0, 0, 0
    for it in range(iters + 1):
        loss, grad_a, grad_b, grad_core = _loss_grads(p, a, core, b)
        loss0 = loss if loss0 is None else loss0
        stale = 0 if loss < best * (1 - MIN_REL_IMPROVEMENT) else stale + 1
        if loss < best:
            best, best_state = loss, (a.clone(), b.clone(), core.clone())
        if it == iters or stale >= patience:
            break
        changed, _, swapped = _discrete_step(p, a, core, mask, b, grad_core, gen)
        swaps += swapped
        grad_core.mul_(mask).masked_fill_(changed, 0.0)  # the re-solved groups sit at their least-squares optimum
        for state in (adam.m[2], adam.v[2]):
            state.masked_fill_(changed, 0.0)
        adam.step([grad_a, grad_b, grad_core], _lr_at(lr, it, iters))
        core.mul_(mask)
    return (*best_state, loss0, best, it, swaps)


def _loss_change(weight, old, new, hessian) -> float:
    """``L(new) - L(old)`` computed as ``tr((new - old) H (new + old - 2 W)^T)``: no cancellation of two losses."""
    diff = (new - old).float()
    return float((diff * ((new + old - 2 * weight).float() @ hessian.float())).sum())
