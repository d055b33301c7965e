"""TinyFusion: learn which blocks to drop so that the shallow model recovers best after fine-tuning.

Fang, Yu, Wang (CVPR 2025), "TinyFusion: Diffusion Transformers Learned Shallow",
https://arxiv.org/abs/2412.01199, code https://github.com/VainF/TinyFusion (``prune_by_learning.py``,
``models_with_layer_pruning.py``).

Algorithm (over the L blocks of a `DepthTarget`):

- Split the blocks into local groups of M consecutive blocks, N kept in each (an N:M pattern over layers;
  mixed groups allowed). Group k enumerates its C(M, N) admissible masks as rows of ``O_k`` and learns one
  logit vector ``g_k`` (init 0.02 everywhere: uniform).
- Each step, for every sample n and group k, draw a hard straight-through Gumbel-softmax one-hot
  ``y = GS(s * g_k, tau)`` (one-hot forward, soft gradient backward) and set the sample's gates
  ``m[n, k] = y @ O_k``. Every block is gated, ``x <- m * block(x) + (1 - m) * x``.
- LoRA (rank 8, alpha 16) on every Linear of the blocks is trained jointly with the logits: it stands for
  the fine-tuning that will follow ("recoverability", ``min_p min_dW E[L(x, W + dW, m)]``).
- ``tau`` goes linearly 4 -> 0.1 over the steps, the logit scale s is 100, AdamW (wd 0) with lr 1e-4 on
  LoRA and 1e-3 on the logits, gradient-norm clip 1.0, steps with a non-finite loss skipped, and an EMA
  (0.999) of the logits decides: group k keeps ``O_k[argmax ema(g_k)]``. LoRA is thrown away and the
  original weights kept (the function restores the model exactly as it found it).

Departures from the reference code, and why:

- The reference keeps an EMA of the whole model (gates included) and reads the gates from it; only the
  logits' EMA is used for the decision, so only that is kept (identical decision, less memory).
- The Gumbel noise comes from a seeded ``torch.Generator`` instead of the global RNG (reproducible
  decisions under a seed without touching the caller's RNG state); the straight-through estimator is the
  same as ``F.gumbel_softmax(hard=True)``.
- LoRA wraps the Linears of the blocks only (the reference wraps every Linear of DiT, including the
  embedders and final layer; for a causal LM the tied 49k-row head would dominate the cost and is kept
  frozen, as most LoRA recipes do). The logit scale, temperature, learning rates, EMA decay and LoRA rank
  are the reference's; the number of steps is the caller's (the reference runs ~10k at batch 128; a CPU
  budget allows a few hundred, so the EMA, whose horizon is ~1000 steps, averages the whole trajectory).
- No autocast (fp32 on CPU).
- The default groups when no uniform N:M group has at most 20,000 masks (13 of 30 blocks: only 13:30, 120
  million): consecutive groups of about 6 blocks (`prunekit.depth.core.balanced_groups`). A group of over a
  million masks is refused. The reference takes the pattern from its caller and enumerates whatever it is given.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.depth.core import DepthTarget, batch_size_of, check_kept, gates, group_options, parse_groups
from prunekit.errors import InputError, check_seed, int_at_least, with_autograd, module_modes, restore_modes
from prunekit.lora import add_lora, has_linear, lora_parameters, remove_lora
from prunekit.weights.engine import refuse_factorized

__all__ = ["TinyFusionResult", "tinyfusion", "sample_masks"]


@dataclass
class TinyFusionResult:
    """TinyFusion's decision (`keep`, one bool per block) with the groups, the learned and EMA logits and the losses."""
    keep: list[bool]
    groups: list[tuple[int, int]]
    logits: list[list[float]]  # the final logits per group (unscaled)
    ema_logits: list[list[float]]  # what decided
    confidence: list[float]  # max softmax(scale * ema logits) per group
    losses: list[float] = field(default_factory=list)  # training loss per step (nan: skipped step)
    steps: int = 0
    seconds: float = 0.0
    options: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return {k: getattr(self, k) for k in ("keep", "groups", "logits", "ema_logits", "confidence", "steps",
                                              "seconds", "options")} | {
            "kept_layers": [i for i, k in enumerate(self.keep) if k],
            "loss_first": self.losses[0] if self.losses else None,
            "loss_last": self.losses[-1] if self.losses else None,
        }


def sample_masks(logits: list[torch.Tensor], options: list[torch.Tensor], *, samples: int, tau: float,
                 scale: float, generator: torch.Generator) -> torch.Tensor:
    """Per-sample block gates ``[samples, depth]`` from hard straight-through Gumbel-softmax over each group's
    admissible masks (``options[k]`` ``[C, M]``); differentiable in `logits` through the soft probabilities."""
    parts = []
    for g, opts in zip(logits, options):
        z = (g * scale).expand(samples, -1)  # [samples, C]
        u = torch.rand(z.shape, generator=generator).to(z.device).clamp_(1e-10, 1 - 1e-10)
        soft = ((z - torch.log(-torch.log(u))) / tau).softmax(-1)  # [samples, C]
        hard = torch.nn.functional.one_hot(soft.argmax(-1), soft.shape[-1]).to(soft.dtype)  # [samples, C]
        y = hard - soft.detach() + soft  # straight-through: one-hot forward, soft gradient backward
        parts.append(y @ opts)  # [samples, M]
    return torch.cat(parts, dim=1)  # [samples, depth]


def _temperatures(tau) -> tuple[float, float]:
    """(start, end) from a pair of numbers or a string ``"4,0.1"`` (the CLI's ``--option tau=4,0.1``)."""
    given = tau
    if isinstance(tau, str):
        try:
            tau = tuple(float(x) for x in tau.replace(":", ",").split(","))
        except ValueError:
            tau = None
    ok = isinstance(tau, (tuple, list)) and len(tau) == 2 and all(
        isinstance(t, (int, float)) and not isinstance(t, bool) and math.isfinite(t) and t > 0 for t in tau)
    if not ok:
        raise InputError(f"tau must be two positive temperatures (start, end), e.g. tau=4,0.1; got {given!r}")
    return float(tau[0]), float(tau[1])


@with_autograd
def tinyfusion(target: DepthTarget, *, kept: int, groups=None, steps: int = 200, tau: tuple[float, float] = (4.0, 0.1),
               scale: float = 100.0, lr_gates: float = 1e-3, lr_lora: float = 1e-4, ema: float = 0.999,
               lora_rank: int = 8, lora_alpha: float = 16.0, recoverability: str = "lora", seed: int = 0,
               progress: bool = False) -> TinyFusionResult:
    """Learn a keep-mask with `kept` blocks over `target` (see the module docstring); the model is left as it
    was. `groups`: ``"N:M"``, ``"N:M,N:M,..."`` or None (smallest uniform pattern, or
    `prunekit.depth.core.balanced_groups` where that has too many masks; see `parse_groups`). `recoverability`: "lora"
    (the reference's default) or "frozen" (learn the mask on the frozen model)."""
    check_kept(kept, target.depth)
    groups = parse_groups(groups, depth=target.depth, kept=kept)
    int_at_least(steps, "steps", 1)
    seed = check_seed(seed)
    for name, v in (("scale", scale), ("lr_gates", lr_gates), ("lr_lora", lr_lora)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            raise InputError(f"{name} must be a positive number, got {v!r}")
    tau = _temperatures(tau)
    if not (isinstance(ema, (int, float)) and 0 <= ema < 1):
        raise InputError(f"ema must be in [0, 1), got {ema!r}")
    if recoverability not in ("lora", "frozen"):
        raise InputError(f"recoverability must be 'lora' or 'frozen', got {recoverability!r}")
    if recoverability == "lora":
        refuse_factorized(target.model, "TinyFusion's LoRA recoverability estimate", "learn the mask without it: "
                          "--option recoverability=frozen (recoverability='frozen')")
    if recoverability == "lora" and not has_linear(target.blocks):
        raise InputError("TinyFusion's recoverability estimate puts LoRA on the blocks' nn.Linear layers and these "
                         "blocks have none (GPT-2's are Conv1D); learn the mask without it: --option "
                         "recoverability=frozen (recoverability='frozen')")
    from prunekit.weights.engine import input_device

    device = input_device(target.model)  # the gates' logits live with the model (a GPU's too)
    options = [group_options(n, m).to(device) for n, m in groups]  # [C_k, M_k] each
    logits = [nn.Parameter(torch.full((o.shape[0],), 0.02, device=device)) for o in options]  # [C_k] each
    ema_logits = [g.detach().clone() for g in logits]
    gen = torch.Generator().manual_seed(seed)
    model = target.model
    was_training = module_modes(model)
    requires = {id(p): p.requires_grad for p in model.parameters()}
    losses: list[float] = []
    start = time.perf_counter()
    lora_names = []
    with gates(target.blocks) as g:
        try:
            for p in model.parameters():  # only the logits and the adapters train
                p.requires_grad_(False)
            if recoverability == "lora":
                lora_names = add_lora(target.blocks, rank=lora_rank, alpha=lora_alpha, seed=seed)
            groups_params = [{"params": logits, "lr": lr_gates}]
            if lora_names:
                groups_params.append({"params": lora_parameters(target.blocks), "lr": lr_lora})
            opt = torch.optim.AdamW(groups_params, weight_decay=0.0)
            trainable = [p for grp in groups_params for p in grp["params"]]
            model.train()
            bar = tqdm(range(steps), desc="tinyfusion", unit="step", disable=not progress)
            for step in bar:
                t = tau[0] + (tau[1] - tau[0]) * step / max(steps - 1, 1)
                batch = target.batches[step % len(target.batches)]
                masks = sample_masks(logits, options, samples=batch_size_of(batch), tau=t, scale=scale,
                                     generator=gen)  # [b, depth]
                for i, gate in enumerate(g):
                    gate.gate = masks[:, i]  # [b]
                loss = target.loss(model, batch)
                if not torch.isfinite(loss):
                    losses.append(float("nan"))
                    opt.zero_grad(set_to_none=True)
                    continue
                opt.zero_grad(set_to_none=True)
                loss.backward()
                torch.nn.utils.clip_grad_norm_(trainable, 1.0)
                opt.step()
                with torch.no_grad():
                    for e, p in zip(ema_logits, logits):
                        e.mul_(ema).add_(p.detach(), alpha=1 - ema)
                losses.append(float(loss.detach()))
                bar.set_postfix(loss=f"{losses[-1]:.3f}", tau=f"{t:.2f}")
        finally:
            if lora_names:
                remove_lora(target.blocks)
            for p in model.parameters():
                p.requires_grad_(requires.get(id(p), True))
            restore_modes(was_training)
    keep = []
    for e, opts in zip(ema_logits, options):
        keep += [bool(v) for v in opts[int(e.argmax())].tolist()]
    confidence = [float((e * scale).softmax(-1).max()) for e in ema_logits]
    return TinyFusionResult(
        keep=keep, groups=groups, logits=[p.detach().tolist() for p in logits],
        ema_logits=[e.tolist() for e in ema_logits], confidence=confidence, losses=losses, steps=steps,
        seconds=time.perf_counter() - start,
        options=dict(tau=list(tau), scale=scale, lr_gates=lr_gates, lr_lora=lr_lora, ema=ema, lora_rank=lora_rank,
                     lora_alpha=lora_alpha, recoverability=recoverability, seed=seed),
    )
