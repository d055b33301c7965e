"""A small class-conditional diffusion transformer (DiT) on Fashion-MNIST: the depth-pruning testbed of TinyFusion.

Paper: W. Peebles, S. Xie, "Scalable Diffusion Models with Transformers" (DiT), arXiv:2212.09748; reference
code facebookresearch/DiT (``models.py``, ``diffusion/``). TinyFusion (G. Fang et al., "TinyFusion: Diffusion
Transformers Learned Shallow", arXiv:2412.01199) prunes whole blocks of such a model; this file is the model
it prunes here, trained by prunekit itself and cached.

The model, top to bottom (``x_t [B, 1, 28, 28]``, ``t [B]`` in 0..T-1, ``y [B]`` in 0..K-1, or K = "no class"):

- patchify: a ``p x p`` stride-``p`` convolution to ``D`` channels, flattened to ``T = (28/p)^2`` tokens, plus
  a fixed 2D sin-cos position embedding (half the channels encode the row, half the column);
- conditioning ``c = MLP(sincos(t)) + E[y]`` ``[B, D]`` (the label table has a row K, the null class of
  classifier-free guidance, when the model is trained with label dropout);
- N blocks with adaLN-zero: ``(shift1, scale1, gate1, shift2, scale2, gate2) = Linear(SiLU(c))`` and
  ``x <- x + gate1 * Attn(LN(x) * (1 + scale1) + shift1)``, ``x <- x + gate2 * MLP(LN(x) * (1 + scale2) + shift2)``;
  the modulation Linear starts at zero, so every block is the identity at initialization;
- a final adaLN layer (also zero-initialized) to ``p*p`` values per token, unpatchified to ``[B, 1, 28, 28]``:
  the predicted noise epsilon.

Diffusion (DDPM, Ho et al. arXiv:2006.11239; DDIM, Song et al. arXiv:2010.02502): T = 1000 steps with a linear
beta schedule from 1e-4 to 0.02, ``x_t = sqrt(abar_t) x_0 + sqrt(1 - abar_t) eps``; the loss is
``|| eps - eps_theta(x_t, t, y) ||^2`` at ``t ~ U{0..T-1}``. Sampling is deterministic DDIM (eta = 0) on
``steps`` evenly spaced timesteps ``0, T/steps, 2T/steps, ...`` (the reference's "ddimN" spacing):
``x0_hat = (x_t - sqrt(1 - abar_t) eps) / sqrt(abar_t)``, ``x_prev = sqrt(abar_prev) x0_hat + sqrt(1 - abar_prev) eps``,
with classifier-free guidance ``eps = eps_null + g (eps_y - eps_null)``.

Contract for depth pruning (``prunekit.depth``): ``model.blocks`` is an ``nn.ModuleList`` whose blocks take
``(x [B, T, D], c [B, D]) -> x [B, T, D]``; replacing it by a shorter ``nn.ModuleList`` of kept blocks gives a
working shallower model (nothing else counts the blocks; `save_dit` records the new depth).

Departures from the reference, and why:
- learn_sigma is off: the model predicts epsilon only (one output channel) and samples with DDIM, which needs
  no learned variance; the reference's extra variance channel and its VLB loss term serve DDPM-250 sampling.
- Pixel space (1 x 28 x 28, patch 4 -> 49 tokens), no VAE: Fashion-MNIST is small enough.
- Attention and MLP are written here (no timm): ``Linear(D, 3D)`` qkv with bias, softmax attention
  (``scaled_dot_product_attention``), ``Linear(D, D)`` projection; MLP ``D -> 4D -> D`` with tanh-GELU, as the
  reference's timm modules compute.
- Label dropout draws from the caller's generator (the reference uses the global RNG), so a loss is a
  deterministic function of its generator.
- Training (`train_dit`) is sized for a CPU: AdamW at a higher learning rate than the reference's constant
  1e-4 (``lr`` with a linear warm-up and a cosine decay), gradient clipping at 1, and an EMA decay of 0.995
  with the usual ``(1 + s) / (10 + s)`` warm-up (the reference's 0.9999 averages over ~10k steps; this run has
  2,400). The EMA weights are the ones cached and returned. The default budget (2,400 steps of batch 32,
  ~77k images, 1.3 epochs) is sized to finish in well under an hour at one thread on a shared 2-core machine
  (a batch-32 step took 0.9 s with three other jobs on the two cores).
- The label table starts at std 1 (``label_init_std``), not the reference's 0.02. Adam moves each entry of a
  table by at most about ``lr`` per step, so in a CPU budget of a few thousand steps (the reference trains 400k)
  a 0.02 table stays near zero and the model ignores the class: measured after 600 steps (batch 32, seed 0),
  the loss on 512 test images with their true labels and with wrong labels differed by 0.0001 at t = 200 (row
  norms 0.30), and a first cached model trained this way (1,400 steps) drew samples of the asked class 10.5% of
  the time, chance. At std 1 the rows start as distinct random vectors of norm ~sqrt(D), comparable to the
  timestep embedding, and the same 600-step run gave a gap of 0.023 (0.124 true against 0.147 wrong).
- DDIM clips ``x0_hat`` to [-1, 1] (the reference's ``clip_denoised`` option; its sampling script of latents turns it
  off, which is right for latents but not for pixels in [-1, 1]) and recomputes epsilon from the clipped
  ``x0_hat``, as the reference's ``ddim_sample`` does.

>>> import torch
>>> model = DiT(DiTConfig(hidden=32, depth=2, heads=2))
>>> model(torch.zeros(3, 1, 28, 28), torch.tensor([0, 10, 999]), torch.tensor([0, 1, 2])).shape
torch.Size([3, 1, 28, 28])
>>> sample(model, torch.tensor([3, 7]), steps=2, seed=0).shape
torch.Size([2, 1, 28, 28])
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import InputError, int_at_least, module_modes, restore_modes
from prunekit.speed import sync_device
from prunekit.weights.engine import input_device

__all__ = [
    "DiTConfig", "TrainConfig", "DiT", "DiTBlock", "Schedule", "schedule", "diffusion_loss", "sample",
    "fashion_images", "train_dit", "pretrained_dit", "save_dit", "load_dit", "dit_cache_key", "evaluate_dit",
    "depth_target", "forward_seconds", "forward_speedup", "is_dit_folder", "weights_fingerprint",
]

IMAGE_SIZE, CHANNELS = 28, 1


# ----------------------------------------------------------------------------------------------- configs
@dataclass(frozen=True)
class DiTConfig:
    """The architecture. ``class_dropout > 0`` adds the null class (row ``num_classes`` of the label table)."""

    hidden: int = 128
    depth: int = 12
    heads: int = 4
    patch: int = 4
    mlp_ratio: float = 4.0
    num_classes: int = 10
    class_dropout: float = 0.1
    label_init_std: float = 1.0

    def __post_init__(self):
        int_at_least(self.hidden, "hidden", 8)
        int_at_least(self.depth, "depth", 1)
        int_at_least(self.heads, "heads", 1)
        int_at_least(self.num_classes, "num_classes", 1)
        if self.patch not in (1, 2, 4, 7, 14, 28):
            raise InputError(f"patch must divide 28 (1, 2, 4, 7, 14 or 28), got {self.patch!r}")
        if self.hidden % self.heads or self.hidden % 4:
            raise InputError(f"hidden ({self.hidden}) must be a multiple of 4 and of heads ({self.heads})")
        if not (isinstance(self.mlp_ratio, (int, float)) and math.isfinite(self.mlp_ratio) and self.mlp_ratio > 0):
            raise InputError(f"mlp_ratio must be a positive number, got {self.mlp_ratio!r}")
        if not (isinstance(self.class_dropout, (int, float)) and 0 <= self.class_dropout < 1):
            raise InputError(f"class_dropout must be in [0, 1), got {self.class_dropout!r}")
        if not (isinstance(self.label_init_std, (int, float)) and math.isfinite(self.label_init_std)
                and self.label_init_std > 0):
            raise InputError(f"label_init_std must be a positive number, got {self.label_init_std!r}")

    @property
    def tokens(self) -> int:
        return (IMAGE_SIZE // self.patch) ** 2


@dataclass(frozen=True)
class TrainConfig:
    """How `train_dit` trains: AdamW (no weight decay), warm-up then cosine decay, EMA of the weights."""

    steps: int = 2400
    batch_size: int = 32
    lr: float = 5e-4
    warmup: int = 100
    ema_decay: float = 0.995
    grad_clip: float = 1.0

    def __post_init__(self):
        int_at_least(self.steps, "steps", 1)
        int_at_least(self.batch_size, "batch_size", 1)
        int_at_least(self.warmup, "warmup", 0)
        for name in ("lr", "grad_clip"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
                raise InputError(f"{name} must be a positive number, got {v!r}")
        if not (isinstance(self.ema_decay, (int, float)) and 0 <= self.ema_decay < 1):
            raise InputError(f"ema_decay must be in [0, 1), got {self.ema_decay!r}")


# ------------------------------------------------------------------------------------------------- model
def _sincos_1d(dim: int, pos: np.ndarray) -> np.ndarray:
    omega = 1.0 / 10000 ** (np.arange(dim // 2, dtype=np.float64) / (dim / 2))  # [dim/2]
    out = np.outer(pos.reshape(-1), omega)  # [M, dim/2]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)  # [M, dim]


def _sincos_2d(dim: int, grid: int) -> torch.Tensor:
    """Fixed position embedding ``[grid*grid, dim]``: the first half encodes the column, the second the row."""
    ww, hh = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64))  # [grid, grid] each
    emb = np.concatenate([_sincos_1d(dim // 2, ww), _sincos_1d(dim // 2, hh)], axis=1)  # [grid*grid, dim]
    return torch.from_numpy(emb).float()


def _timestep_features(t: torch.Tensor, dim: int = 256, max_period: float = 10000.0) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]  # [B, half]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # [B, dim]


def _modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)  # [B, T, D]


class DiTBlock(nn.Module):
    """One transformer block with adaLN-zero conditioning: ``forward(x [B, T, D], c [B, D]) -> [B, T, D]``."""

    def __init__(self, hidden: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)
        self.norm2 = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        inner = int(hidden * mlp_ratio)
        self.fc1 = nn.Linear(hidden, inner)
        self.fc2 = nn.Linear(inner, hidden)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 6 * hidden))

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        qkv = self.qkv(x).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)  # [3, B, H, T, d/H]
        out = F.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])  # [B, H, T, d/H]
        return self.proj(out.transpose(1, 2).reshape(b, t, d))  # [B, T, D]

    def mlp(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))  # [B, T, D]

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift1, scale1, gate1, shift2, scale2, gate2 = self.adaLN_modulation(c).chunk(6, dim=1)  # 6 x [B, D]
        x = x + gate1.unsqueeze(1) * self.attention(_modulate(self.norm1(x), shift1, scale1))  # [B, T, D]
        return x + gate2.unsqueeze(1) * self.mlp(_modulate(self.norm2(x), shift2, scale2))  # [B, T, D]


class _FinalLayer(nn.Module):
    def __init__(self, hidden: int, patch: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden, patch * patch * CHANNELS)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden, 2 * hidden))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)  # 2 x [B, D]
        return self.linear(_modulate(self.norm(x), shift, scale))  # [B, T, p*p]


class DiT(nn.Module):
    """Class-conditional DiT for ``[B, 1, 28, 28]`` images in [-1, 1]: ``forward(x_t, t, y) -> eps [B, 1, 28, 28]``.

    ``t``: ``[B]`` integer timesteps in ``0..999``; ``y``: ``[B]`` class indices in ``0..num_classes-1``, or
    ``num_classes`` (no class) when the model was built with ``class_dropout > 0``.
    """

    def __init__(self, config: DiTConfig | None = None):
        super().__init__()
        config = DiTConfig() if config is None else config
        if not isinstance(config, DiTConfig):
            raise InputError(f"config must be a DiTConfig, got {type(config).__name__}")
        self.config = config
        d, p = config.hidden, config.patch
        self.x_embedder = nn.Conv2d(CHANNELS, d, kernel_size=p, stride=p)
        self.register_buffer("pos_embed", _sincos_2d(d, IMAGE_SIZE // p).unsqueeze(0), persistent=False)  # [1, T, D]
        self.t_embedder = nn.Sequential(nn.Linear(256, d), nn.SiLU(), nn.Linear(d, d))
        self.y_embedder = nn.Embedding(config.num_classes + (config.class_dropout > 0), d)
        self.blocks = nn.ModuleList(DiTBlock(d, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.final_layer = _FinalLayer(d, p)
        self._init_weights()

    @property
    def null_class(self) -> int | None:
        """The label index meaning "no class" (classifier-free guidance), or None without one."""
        return self.config.num_classes if self.y_embedder.num_embeddings > self.config.num_classes else None

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.x_embedder.weight  # [D, 1, p, p], initialised like a Linear over the flattened patch
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.bias)
        nn.init.normal_(self.y_embedder.weight, std=self.config.label_init_std)
        nn.init.normal_(self.t_embedder[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder[2].weight, std=0.02)
        for block in self.blocks:  # adaLN-zero: every block starts as the identity
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for lin in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(lin.weight)
            nn.init.zeros_(lin.bias)

    def _check(self, x, t, y) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or tuple(x.shape[1:]) != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE):
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise InputError(f"x_t must be a tensor [B, 1, 28, 28], got {shape}")
        t, y = torch.as_tensor(t, device=x.device), torch.as_tensor(y, device=x.device)
        if t.shape != (len(x),) or y.shape != (len(x),):
            raise InputError(f"t and y must have shape [{len(x)}] (one per image), got {tuple(t.shape)} and "
                             f"{tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise InputError(f"y must hold integer class indices, got {y.dtype}")
        top = self.y_embedder.num_embeddings - 1
        if len(y) and (int(y.min()) < 0 or int(y.max()) > top):
            raise InputError(f"class labels must lie in 0..{top} (0..{self.config.num_classes - 1}"
                             f"{', plus ' + str(top) + ' for no class' if self.null_class is not None else ''}), "
                             f"got {int(y.min())}..{int(y.max())}")
        return x, t, y.long()

    def condition(self, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """The conditioning vector ``c [B, D]`` every block receives."""
        return self.t_embedder(_timestep_features(t)) + self.y_embedder(y)  # [B, D]

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return self.x_embedder(x).flatten(2).transpose(1, 2) + self.pos_embed  # [B, T, D]

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        p, g = self.config.patch, IMAGE_SIZE // self.config.patch
        x = x.reshape(len(x), g, g, p, p, CHANNELS)  # [B, g, g, p, p, C]
        return torch.einsum("nhwpqc->nchpwq", x).reshape(len(x), CHANNELS, IMAGE_SIZE, IMAGE_SIZE)  # [B, C, 28, 28]

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x_t, t, y = self._check(x_t, t, y)
        c = self.condition(t, y)  # [B, D]
        x = self.embed(x_t)  # [B, T, D]
        for block in self.blocks:
            x = block(x, c)  # [B, T, D]
        return self.unpatchify(self.final_layer(x, c))  # [B, 1, 28, 28]


# --------------------------------------------------------------------------------------------- diffusion
@dataclass(frozen=True)
class Schedule:
    betas: torch.Tensor  # [T] float64
    alphas_cumprod: torch.Tensor  # [T] float64: abar_t

    @property
    def T(self) -> int:
        return len(self.betas)


def schedule(num_timesteps: int = 1000) -> Schedule:
    """The linear beta schedule of DDPM (1e-4 to 0.02 at T = 1000, scaled by 1000/T as the reference does)."""
    n = int_at_least(num_timesteps, "num_timesteps", 2)
    scale = 1000 / n
    betas = torch.linspace(scale * 1e-4, scale * 0.02, n, dtype=torch.float64)  # [T]
    return Schedule(betas, torch.cumprod(1 - betas, 0))


_SCHEDULE = schedule(1000)


def _check_images(images, name: str = "images") -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or not images.is_floating_point():
        raise InputError(f"{name} must be a floating-point tensor [N, 1, 28, 28] in [-1, 1]")
    if images.ndim != 4 or tuple(images.shape[1:]) != (CHANNELS, IMAGE_SIZE, IMAGE_SIZE) or len(images) == 0:
        raise InputError(f"{name} must have shape [N, 1, 28, 28] with N >= 1, got {tuple(images.shape)}")
    if not torch.isfinite(images).all():
        raise InputError(f"{name} contain NaN or infinite values; pass finite pixels scaled to [-1, 1]")
    return images


def _check_labels(model: DiT, labels, n: int | None = None) -> torch.Tensor:
    labels = torch.as_tensor(labels)
    if labels.ndim != 1 or labels.is_floating_point() or labels.dtype == torch.bool or len(labels) == 0:
        raise InputError(f"labels must be a non-empty 1-D tensor of integer classes, got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    if n is not None and len(labels) != n:
        raise InputError(f"labels has {len(labels)} entries for {n} images; give one class per image")
    k = model.config.num_classes
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise InputError(f"labels must be classes 0..{k - 1}, got {int(labels.min())}..{int(labels.max())}")
    return labels.long()


def _check_model(model) -> DiT:
    if not isinstance(model, DiT):
        raise InputError(f"model must be a prunekit.depth.dit.DiT, got {type(model).__name__}")
    return model


def diffusion_loss(model: DiT, images: torch.Tensor, labels, *, generator: torch.Generator,
                   class_dropout: float | None = None) -> torch.Tensor:
    """Epsilon-prediction MSE at ``t ~ U{0..999}`` (one per image): a scalar with gradients.

    ``images [B, 1, 28, 28]`` in [-1, 1], ``labels [B]`` classes. ``t``, the noise and the label dropout are drawn
    from `generator` (a CPU ``torch.Generator``), so the loss is a deterministic function of its state.
    ``class_dropout``: the fraction of labels replaced by the null class (default: the model's training value;
    0 when the model has no null class).

    >>> m = DiT(DiTConfig(hidden=32, depth=2, heads=2))
    >>> x = torch.zeros(4, 1, 28, 28); y = torch.tensor([0, 1, 2, 3])
    >>> float(diffusion_loss(m, x, y, generator=torch.Generator().manual_seed(0)).detach()) > 0
    True
    """
    model = _check_model(model)
    images = _check_images(images)
    labels = _check_labels(model, labels, len(images))
    if not isinstance(generator, torch.Generator):
        raise InputError("generator must be a torch.Generator, e.g. torch.Generator().manual_seed(0)")
    p = model.config.class_dropout if class_dropout is None else class_dropout
    if not (isinstance(p, (int, float)) and 0 <= p < 1):
        raise InputError(f"class_dropout must be in [0, 1), got {p!r}")
    if p > 0 and model.null_class is None:
        raise InputError("class_dropout > 0 needs a model with a null class (built with class_dropout > 0)")
    b = len(images)
    t = torch.randint(0, _SCHEDULE.T, (b,), generator=generator)  # [B]
    noise = torch.randn(images.shape, generator=generator)  # [B, 1, 28, 28]
    if p > 0:
        drop = torch.rand(b, generator=generator) < p  # [B]
        labels = torch.where(drop, torch.full_like(labels, model.null_class), labels)  # [B]
    device = next(model.parameters()).device
    abar = _SCHEDULE.alphas_cumprod[t].float().view(b, 1, 1, 1)  # [B, 1, 1, 1]
    x_t = abar.sqrt() * images.cpu() + (1 - abar).sqrt() * noise  # [B, 1, 28, 28]
    eps = model(x_t.to(device), t.to(device), labels.to(device))  # [B, 1, 28, 28]
    return F.mse_loss(eps, noise.to(device))


def _ddim_timesteps(steps: int) -> list[int]:
    stride = _SCHEDULE.T // steps
    return list(range(0, stride * steps, stride))  # the reference's "ddimN" spacing: 0, stride, ...


@torch.no_grad()
def sample(model: DiT, labels, *, steps: int = 50, guidance: float = 1.0, seed: int = 0,
           generator: torch.Generator | None = None, batch_size: int = 500) -> torch.Tensor:
    """Generate ``[N, 1, 28, 28]`` images in [-1, 1] of classes ``labels [N]`` by DDIM (eta = 0) in `steps` steps.

    ``guidance`` g: classifier-free guidance ``eps = eps_null + g (eps_y - eps_null)`` (1 = plain conditional
    sampling, one forward per step; other values need a model with a null class and cost two). The starting
    noise comes from `generator` if given, else from a generator seeded with `seed`; images are generated in
    chunks of `batch_size` in order (the noise does not depend on `batch_size`; the float rounding of batched
    matmuls may).
    """
    model = _check_model(model)
    labels = _check_labels(model, labels)
    steps = int_at_least(steps, "steps", 1)
    if steps > _SCHEDULE.T:
        raise InputError(f"steps must be at most {_SCHEDULE.T}, got {steps}")
    batch_size = int_at_least(batch_size, "batch_size", 1)
    if not (isinstance(guidance, (int, float)) and math.isfinite(guidance)):
        raise InputError(f"guidance must be a finite number, got {guidance!r}")
    if guidance != 1 and model.null_class is None:
        raise InputError("guidance != 1 needs a model trained with class_dropout > 0 (it has no null class)")
    if generator is None:
        generator = torch.Generator().manual_seed(int(seed))
    elif not isinstance(generator, torch.Generator):
        raise InputError("generator must be a torch.Generator or None")
    device = next(model.parameters()).device
    was_training = module_modes(model)
    model.eval()
    ts = _ddim_timesteps(steps)
    abar = _SCHEDULE.alphas_cumprod
    out = []
    try:
        for start in range(0, len(labels), batch_size):
            y = labels[start : start + batch_size].to(device)  # [b]
            x = torch.randn((len(y), CHANNELS, IMAGE_SIZE, IMAGE_SIZE), generator=generator).to(device)  # [b, 1, 28, 28]
            for i in reversed(range(len(ts))):
                t = torch.full((len(y),), ts[i], dtype=torch.long, device=device)  # [b]
                if guidance == 1:
                    eps = model(x, t, y)  # [b, 1, 28, 28]
                else:
                    both = model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, model.null_class)]))
                    cond, uncond = both.chunk(2)  # 2 x [b, 1, 28, 28]
                    eps = uncond + guidance * (cond - uncond)
                a_t = float(abar[ts[i]])
                a_prev = float(abar[ts[i - 1]]) if i > 0 else 1.0
                x0 = ((x - math.sqrt(1 - a_t) * eps) / math.sqrt(a_t)).clamp(-1, 1)  # [b, 1, 28, 28]
                eps = (x - math.sqrt(a_t) * x0) / math.sqrt(1 - a_t)  # epsilon consistent with the clipped x0
                x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps  # [b, 1, 28, 28]
            out.append(x.clamp(-1, 1).cpu())
    finally:
        restore_modes(was_training)
    return torch.cat(out)


# ------------------------------------------------------------------------------------- training and cache
def fashion_images(split: str = "train") -> tuple[torch.Tensor, torch.Tensor]:
    """Fashion-MNIST ``(images [N, 1, 28, 28] float32 in [-1, 1], labels [N] int64)`` of ``split`` train/test."""
    if split not in ("train", "test"):
        raise InputError(f"split must be 'train' or 'test', got {split!r}")
    from prunekit.zoo import fashion_mnist

    x_train, y_train, x_test, y_test = fashion_mnist()
    x, y = (x_train, y_train) if split == "train" else (x_test, y_test)
    images = torch.from_numpy(x).float().div(127.5).sub(1).unsqueeze(1)  # [N, 1, 28, 28]
    return images, torch.from_numpy(y).long()


def dit_cache_key(config: DiTConfig, train_config: TrainConfig, seed: int) -> str:
    """A short hash of everything that decides the trained weights (architecture, recipe, seed, data)."""
    blob = json.dumps({"model": asdict(config), "train": asdict(train_config), "seed": int(seed),
                       "data": "fashion-mnist-train", "schedule": "linear-1000", "version": 1}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def weights_fingerprint(model: nn.Module) -> str:
    """A short sha256 of a model's parameters and buffers (names, shapes, dtypes and float32 bytes, in name order).

    `dit_cache_key` names what *should* decide the weights; training on another machine or thread count gives
    other weights under the same key (float sums run in another order). Results record this fingerprint so
    rows measured on different weights are never mixed unnoticed."""
    h = hashlib.sha256()
    for name, t in sorted(model.state_dict().items()):
        h.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        h.update(t.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def train_dit(config: DiTConfig | None = None, train_config: TrainConfig | None = None, *, seed: int = 0,
              images: torch.Tensor | None = None, labels=None, progress: bool = True,
              log_every: int = 100) -> tuple[DiT, dict]:
    """Train a DiT on ``images``/``labels`` (default: the Fashion-MNIST training set); returns ``(ema_model, info)``.

    Each step draws a minibatch uniformly with replacement and takes one `diffusion_loss` step (label dropout
    ``config.class_dropout``); the returned model holds the EMA of the weights.

    ``info``: ``{"seconds", "final_loss" (mean of the last 100 steps' losses), "losses" (mean per `log_every`
    steps), "threads"}``. Deterministic given `seed` on one machine at one thread count.
    """
    config = DiTConfig() if config is None else config
    train_config = TrainConfig() if train_config is None else train_config
    if not isinstance(train_config, TrainConfig):
        raise InputError(f"train_config must be a TrainConfig, got {type(train_config).__name__}")
    log_every = int_at_least(log_every, "log_every", 1)
    if images is None:
        if labels is not None:
            raise InputError("give labels only together with images")
        images, labels = fashion_images("train")
    images = _check_images(images)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(int(seed))
        model = DiT(config)
    labels = _check_labels(model, labels, len(images))
    ema = DiT(config)
    ema.load_state_dict(model.state_dict())
    ema.requires_grad_(False).eval()
    tc = train_config
    opt = torch.optim.AdamW(model.parameters(), lr=tc.lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(int(seed) + 1)
    losses, window, start = [], [], time.perf_counter()
    from tqdm.auto import tqdm

    model.train()
    with tqdm(total=tc.steps, desc="train DiT", unit="step", disable=not progress, leave=False) as bar:
        for step in range(tc.steps):
            idx = torch.randint(0, len(images), (tc.batch_size,), generator=gen)  # [B]
            lr = tc.lr * min(1.0, (step + 1) / max(tc.warmup, 1)) * 0.5 * (1 + math.cos(math.pi * step / tc.steps))
            for group in opt.param_groups:
                group["lr"] = lr
            loss = diffusion_loss(model, images[idx], labels[idx], generator=gen)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
            opt.step()
            decay = min(tc.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for pe, pm in zip(ema.parameters(), model.parameters()):
                    pe.lerp_(pm, 1 - decay)
            window.append(float(loss.detach()))
            if len(window) == log_every or step == tc.steps - 1:
                losses.append(round(sum(window) / len(window), 5))
                bar.set_postfix(loss=losses[-1])
                if not progress:
                    print(f"step {step + 1}/{tc.steps} loss {losses[-1]:.4f} "
                          f"{time.perf_counter() - start:.0f}s", flush=True)
                window = []
            bar.update(1)
    tail = losses[-max(1, 100 // log_every):]
    info = {"seconds": round(time.perf_counter() - start, 1), "final_loss": round(sum(tail) / len(tail), 5),
            "losses": losses, "log_every": log_every, "threads": torch.get_num_threads()}
    return ema, info


def save_dit(model: DiT, folder, *, info: dict | None = None, overwrite: bool = False, extra=None) -> Path:
    """Write ``model.safetensors`` + ``config.json`` (depth = the current ``len(model.blocks)``) atomically.

    An existing `folder` is refused unless `overwrite`; ``extra(tmp_folder)`` may add files before the rename.
    """
    from safetensors.torch import save_file

    from prunekit.weights.io import write_atomically

    model = _check_model(model)
    cfg = asdict(model.config) | {"depth": len(model.blocks)}
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}

    def build(tmp: Path) -> None:
        save_file(state, str(tmp / "model.safetensors"))
        (tmp / "config.json").write_text(json.dumps({"model": cfg, "info": info or {}}, indent=1))
        if extra is not None:
            extra(tmp)

    return write_atomically(folder, build, overwrite=overwrite)


def is_dit_folder(folder) -> bool:
    """Whether `folder` holds a DiT written by `save_dit` (its config.json has a ``model`` section with ``patch``)."""
    cfg = Path(folder).expanduser() / "config.json"
    if not cfg.is_file():
        return False
    try:
        meta = json.loads(cfg.read_text())
    except (ValueError, UnicodeDecodeError, RecursionError):
        return False
    return isinstance(meta, dict) and isinstance(meta.get("model"), dict) and "patch" in meta["model"]


def load_dit(folder) -> DiT:
    """A `DiT` (eval mode) from a folder written by `save_dit`."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise InputError(f"{folder} is not a saved DiT (needs config.json and model.safetensors)")
    try:
        meta = json.loads((folder / "config.json").read_text())
        section = meta["model"]
        if not isinstance(section, dict):
            raise TypeError("'model' is not an object")
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise InputError(f"{folder}/config.json is not a saved DiT's config ({e}); write it with save_dit") from None
    known = {f.name for f in fields(DiTConfig)}
    config = DiTConfig(**{k: v for k, v in section.items() if k in known})
    from safetensors import safe_open

    with torch.device("meta"):  # shapes first: a hidden of 400000 allocated 640 GB before any check
        want = {k: tuple(v.shape) for k, v in DiT(config).state_dict().items()}
    try:
        with safe_open(str(folder / "model.safetensors"), framework="pt") as f:
            have = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types
        raise InputError(f"{folder}/model.safetensors is not a readable safetensors file ({str(e)[:160]}); write "
                         "the folder with save_dit") from None
    if want != have:
        odd = sorted(k for k in set(want) | set(have) if want.get(k) != have.get(k))[0]
        raise InputError(f"{folder}/model.safetensors does not hold the DiT its config.json describes ({odd}: "
                         f"{have.get(odd)} in the file, {want.get(odd)} for the config); write the folder with "
                         "save_dit")
    model = DiT(config)
    try:
        model.load_state_dict(load_file(str(folder / "model.safetensors")))
    except Exception as e:  # a truncated file, or tensors that do not fit the config
        raise InputError(f"{folder}/model.safetensors does not hold this DiT's weights ({str(e).splitlines()[0][:200]}); "
                         "write the folder with save_dit") from None
    model.train_info = meta.get("info", {})
    return model.eval()


def pretrained_dit(config: DiTConfig | None = None, train_config: TrainConfig | None = None, *, seed: int = 0,
                   train_if_missing: bool = True, progress: bool = True) -> DiT:
    """The cached trained DiT of ``(config, train_config, seed)`` from ``$PRUNEKIT_CACHE/dit/<key>/``.

    Trained once with `train_dit` (defaults: ~40 minutes at one thread of a loaded 2-core machine) and saved; later calls load it
    in well under a second. ``model.train_info`` holds the training record (seconds, losses).
    """
    from prunekit.zoo import cache_dir

    config = DiTConfig() if config is None else config
    train_config = TrainConfig() if train_config is None else train_config
    folder = cache_dir() / "dit" / dit_cache_key(config, train_config, seed)
    if not folder.is_dir():
        if not train_if_missing:
            raise InputError(f"no trained DiT at {folder}; call pretrained_dit(train_if_missing=True) to train it")
        model, info = train_dit(config, train_config, seed=seed, progress=progress)
        info = info | {"train_config": asdict(train_config), "seed": int(seed)}
        save_dit(model, folder, info=info)
    return load_dit(folder)


def evaluate_dit(model: DiT, *, n_per_class: int = 100, steps: int = 50, seed: int = 0, guidance: float = 1.0,
                 real: torch.Tensor | None = None, progress: bool = True) -> dict:
    """Sample ``n_per_class`` images of every class (DDIM, `steps`) and score them with the project classifier
    (trained on first use, with a progress bar unless `progress` is false).

    Returns ``{"fid", "class_accuracy", "per_class" [K], "n", "steps", "guidance", "seconds"}``: ``fid`` is the
    Frechet distance between the classifier-feature Gaussians of the samples and of ``real`` (default: the
    10,000 Fashion-MNIST test images), a Fashion-MNIST-classifier FID, not Inception-FID (see
    `prunekit.depth.fid`); ``class_accuracy`` the fraction of samples the classifier assigns to the class they
    were generated for.
    """
    from prunekit.depth import fid as fidmod

    model = _check_model(model)
    n_per_class = int_at_least(n_per_class, "n_per_class", 1)
    k = model.config.num_classes
    labels = torch.arange(k).repeat_interleave(n_per_class)  # [K * n]
    start = time.perf_counter()
    fake = sample(model, labels, steps=steps, seed=seed, guidance=guidance)  # [K * n, 1, 28, 28]
    seconds = time.perf_counter() - start
    if real is None:
        real = fashion_images("test")[0]
    judge = fidmod.classifier(progress=progress)
    acc = fidmod.class_accuracy(fake, labels, model=judge)
    return {"fid": fidmod.fid(real, fake, model=judge), "class_accuracy": acc["accuracy"],
            "per_class": acc["per_class"], "n": len(labels), "steps": steps, "guidance": guidance,
            "seconds": round(seconds, 2)}


def depth_target(model: DiT, images: torch.Tensor, labels, *, batch_size: int = 32, seed: int = 0):
    """A `prunekit.depth.DepthTarget` over a DiT's blocks: batches of `images` ``[N, 1, 28, 28]`` in [-1, 1] with
    their `labels` ``[N]``; the loss is `diffusion_loss` with t, noise and label dropout drawn from a generator that
    restarts at the same seed for each batch on every pass, so every method and step sees the same draws. The
    distillation loss (recovery by KD) is the MSE between the student's and the dense teacher's predicted noise
    on the same draws."""
    from prunekit.depth.core import DepthTarget

    model = _check_model(model)
    images = _check_images(images)
    labels = _check_labels(model, labels, len(images))
    b = int_at_least(batch_size, "batch_size", 1)
    batches = [(i, images[i : i + b], labels[i : i + b]) for i in range(0, len(images), b)]

    def draws(i: int) -> torch.Generator:
        return torch.Generator().manual_seed(int(seed) * 100_003 + i)

    def loss(m, batch):
        i, x, y = batch
        return diffusion_loss(m, x, y, generator=draws(i))

    def distill(student, teacher, batch):
        i, x, y = batch
        captured = {}
        handle = teacher.register_forward_hook(lambda _m, _a, out: captured.setdefault("eps", out.detach()))
        try:  # an interrupt inside the forward left the hook on the caller's model for good
            with torch.no_grad():
                diffusion_loss(teacher, x, y, generator=draws(i))
        finally:
            handle.remove()
        handle = student.register_forward_hook(lambda _m, _a, out: captured.setdefault("student", out))
        try:
            diffusion_loss(student, x, y, generator=draws(i))
        finally:
            handle.remove()
        return ((captured["student"] - captured["eps"]) ** 2).mean()

    return DepthTarget(model, model.blocks, batches, loss, distill)


@torch.no_grad()
def forward_seconds(model: DiT, *, batch: int = 16, repeats: int = 5, threads: int = 1) -> float:
    """Seconds of one denoiser forward over ``[batch, 1, 28, 28]`` at `threads` threads, the fastest of `repeats`
    (after a warm-up): a DDIM sample costs `steps` of these (two with guidance)."""
    model = _check_model(model)
    batch, repeats = int_at_least(batch, "batch", 1), int_at_least(repeats, "repeats", 1)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, CHANNELS, IMAGE_SIZE, IMAGE_SIZE, generator=g)
    t = torch.randint(0, _SCHEDULE.T, (batch,), generator=g)
    y = torch.arange(batch) % model.config.num_classes
    dev = input_device(model)
    x, t, y = x.to(dev), t.to(dev), y.to(dev)
    was, before = module_modes(model), torch.get_num_threads()
    model.eval()
    torch.set_num_threads(int_at_least(threads, "threads", 1))
    try:
        model(x, t, y)
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            model(x, t, y)
            sync_device(dev)  # a GPU's queued forward, not just its launch
            times.append(time.perf_counter() - start)
    finally:
        torch.set_num_threads(before)
        restore_modes(was)
    return min(times)


def forward_speedup(dense: DiT, pruned: DiT, *, rounds: int = 5, repeats: int = 3) -> dict:
    """`forward_seconds` of `dense` and `pruned` in alternated rounds, the fastest of each (load on a shared
    machine hits both alike): ``{"dense_forward_s", "pruned_forward_s", "speedup"}``."""
    timed = [(forward_seconds(dense, repeats=repeats), forward_seconds(pruned, repeats=repeats))
             for _ in range(int_at_least(rounds, "rounds", 1))]
    out = {"dense_forward_s": min(d for d, _ in timed), "pruned_forward_s": min(p for _, p in timed)}
    return out | {"speedup": out["dense_forward_s"] / out["pruned_forward_s"]}
