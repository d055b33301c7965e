"""Recovery after depth pruning: fine-tune the shallow model (LoRA or all weights), or distil the dense one.

Any depth method leaves a model with fewer blocks; a short fine-tuning on the calibration distribution
recovers much of what went (TinyFusion, Fang et al. 2025, https://arxiv.org/abs/2412.01199, Sec. 4 and
``train.py`` / ``train_masked_kd.py`` of https://github.com/VainF/TinyFusion).

- ``trainable="lora"``: LoRA (rank 8, alpha 16) on every Linear of the blocks, merged into the weights at
  the end (the result is a plain model); ``"full"``: every parameter of the model trains.
- ``teacher=None``: the task loss (`DepthTarget.loss`). With a teacher (the dense model): TinyFusion's
  masked KD, ``0.9 KD + 0.1 task + beta * Rep``, KD = `DepthTarget.distill` (KL of the teacher's next-token
  distribution for a causal LM, MSE of the predicted noise for a DiT), Rep = MSE between student block j's
  output and the teacher's hidden state at the same point of the stack (the output of teacher block
  ``keep[j+1] - 1``: for 1:2 keeping block 2j that is block 2j+1, the reference's D14 <- XL mapping),
  elements with ``|x - mean| >= 2 std`` (per sample, in teacher or student) masked out; beta goes linearly
  from `features` to 0 (the reference: 1e-2 -> 0; default here 0, i.e. output KD only).
- AdamW (wd 0), gradient-norm clip 1.0, the learning rate cosine-decayed to a tenth of `lr` (the reference
  decays 2e-4 -> 1e-4 over far longer runs); batches taken in order, cycling.

Departures: the reference fine-tunes all weights for 100k-500k steps with an EMA of the weights; a CPU budget
allows ~100 steps, where an EMA would lag the weights badly, so none is kept. LoRA recovery is prunekit's
default because it fits the same budget as TinyFusion's recoverability estimate.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.depth.core import DepthTarget, check_keep, hidden_of
from prunekit.errors import InputError, check_seed, int_at_least, with_autograd, module_modes, restore_modes
from prunekit.lora import add_lora, has_linear, lora_parameters, merge_lora, remove_lora
from prunekit.weights.engine import refuse_factorized
from prunekit.weights.io import non_finite

__all__ = ["RecoveryResult", "recover", "DEFAULT_LR"]

DEFAULT_LR = {"lora": 5e-4, "full": 5e-5}


@dataclass
class RecoveryResult:
    """What `recover` did: what it trained (LoRA or all weights), whether it distilled (and the feature-matching
    weight it started from), its steps, rate and losses."""
    trainable: str
    distilled: bool
    steps: int
    lr: float
    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    features: float = 0.0

    def to_dict(self) -> dict:
        return {"trainable": self.trainable, "distilled": self.distilled, "features": self.features,
                "steps": self.steps, "lr": self.lr,
                "loss_first": self.losses[0] if self.losses else None,
                "loss_last": self.losses[-1] if self.losses else None, "seconds": self.seconds}


def _masked_mse(s: torch.Tensor, t: torch.Tensor, k: float = 2.0) -> torch.Tensor:
    """MSE over elements within k std of the per-sample mean in both `s` and `t` (``[b, ...]``)."""
    def inside(x):
        flat = x.flatten(1)  # [b, n]
        mu, sd = flat.mean(1, keepdim=True), flat.std(1, keepdim=True)
        return ((flat - mu).abs() < k * sd).view_as(x)
    keep = (inside(s.detach()) & inside(t)).to(s.dtype)
    return ((s - t) ** 2 * keep).sum() / keep.sum().clamp_min(1)


def _upcast(module: nn.Module | None) -> dict:
    """Put every half-precision (fp16/bf16) parameter of `module` in float32; returns ``{name: its old data}``
    so `_restore` can put back either the old tensors or the trained values in the old dtype. Buffers stay."""
    if module is None:
        return {}
    old = {n: p.data for n, p in module.named_parameters() if p.dtype in (torch.float16, torch.bfloat16)}
    for n, p in module.named_parameters():
        if n in old:
            p.data = p.data.float()
    return old


def _restore(module: nn.Module | None, old: dict, *, keep_trained: bool) -> None:
    """Back to the dtypes `_upcast` found, by parameter name (merging LoRA made new Linears under the old names):
    the trained values rounded, or the old tensors themselves."""
    for n, p in module.named_parameters() if old else ():
        if n in old:
            p.data = p.data.to(old[n].dtype) if keep_trained else old[n]


@with_autograd
def recover(target: DepthTarget, *, steps: int = 100, trainable: str = "lora", lr: float | None = None,
            teacher: tuple[nn.Module, nn.ModuleList] | None = None, keep: list[bool] | None = None,
            features: float = 0.0, lora_rank: int = 8, lora_alpha: float = 16.0, seed: int = 0,
            progress: bool = False) -> RecoveryResult:
    """Fine-tune the (already pruned) `target` in place for `steps` steps; LoRA is merged at the end.

    `teacher`: ``(dense model, its blocks)`` for knowledge distillation (needs ``target.distill``); `keep` the
    keep-mask over the teacher's blocks (needed when `features` > 0). A half-precision (fp16/bf16) model trains
    on float32 copies of its weights (fp16 training diverges at any learning rate without loss scaling) and
    gets the trained weights back in its own dtype. A run that diverges raises an InputError; it leaves the
    model as it was when it trained LoRA or was in half precision (a float32 model trained in full keeps the
    diverged weights: reload it)."""
    int_at_least(steps, "steps", 1)
    if trainable not in DEFAULT_LR:
        raise InputError(f"trainable must be 'lora' or 'full', got {trainable!r}")
    lr = DEFAULT_LR[trainable] if lr is None else lr
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    if isinstance(features, bool) or not (isinstance(features, (int, float)) and math.isfinite(features)
                                          and features >= 0):
        raise InputError(f"features must be a finite number >= 0 (the feature-matching weight), got {features!r}")
    if features > 0 and teacher is None:  # it was accepted and never used
        raise InputError(f"features={features!r} matches the student's blocks to a teacher's; give teacher=(model, "
                         "blocks) and keep=, or leave features at 0")
    seed = check_seed(seed)
    if teacher is not None and target.distill is None:
        raise InputError("distillation needs a DepthTarget with a distill function")
    refuse_factorized(target.model, "recovery", "recover the dense model before ARMOR, or prune depth without "
                      "recovery (--recover none)")
    if trainable == "lora" and not has_linear(target.blocks):
        raise InputError("LoRA recovery adapts the blocks' nn.Linear layers and these blocks have none (GPT-2's are "
                         "Conv1D); recover with full fine-tuning: --recover full (trainable='full')")
    pairs: list[tuple[int, int]] = []
    if teacher is not None and features > 0:
        if keep is None:
            raise InputError("feature matching needs keep, the keep-mask over the teacher's blocks")
        keep = check_keep(keep, len(teacher[1]))
        kept = [i for i, k in enumerate(keep) if k]
        if len(kept) != target.depth:
            raise InputError(f"keep keeps {len(kept)} blocks but the student has {target.depth}")
        pairs = [(j, (kept[j + 1] - 1) if j + 1 < len(kept) else len(keep) - 1) for j in range(len(kept))]
    model = target.model
    was_training = module_modes(model)
    teacher_training = module_modes(teacher[0]) if teacher is not None else None
    requires = {id(p): p.requires_grad for p in model.parameters()}
    grads = {id(p): p.grad for p in model.parameters() if p.grad is not None}  # the caller's: set aside, put back
    for p in model.parameters():
        p.grad = None
    start = time.perf_counter()
    teacher_model = teacher[0] if teacher is not None else None
    half = _upcast(model)
    half_teacher = _upcast(teacher_model)
    if trainable == "lora":
        try:
            add_lora(target.blocks, rank=lora_rank, alpha=lora_alpha, seed=seed)
        except BaseException:  # refused (a rank too large, adapters already there): back to the dtypes found
            _restore(teacher_model, half_teacher, keep_trained=False)
            _restore(model, half, keep_trained=False)
            raise
        for n, p in model.named_parameters():
            if "lora_" not in n:
                p.requires_grad_(False)
        params = lora_parameters(target.blocks)
    else:
        model.requires_grad_(True)
        params = [p for p in model.parameters()]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / max(steps - 1, 1))))
    got_s: dict[int, torch.Tensor] = {}
    got_t: dict[int, torch.Tensor] = {}
    handles = []
    if pairs:
        def grab(store, key):
            def fn(_m, _a, out):
                store[key] = hidden_of(out)
            return fn
        for j, ti in pairs:
            handles.append(target.blocks[j].register_forward_hook(grab(got_s, j)))
            handles.append(teacher[1][ti].register_forward_hook(grab(got_t, ti)))
    if teacher is not None:  # its targets without dropout noise, with or without feature matching
        teacher[0].eval()
    losses: list[float] = []
    model.train()
    try:
        for step in tqdm(range(steps), desc="recovery", unit="step", disable=not progress):
            batch = target.batches[step % len(target.batches)]
            if teacher is None:
                loss = target.loss(model, batch)
            else:
                loss = 0.9 * target.distill(model, teacher[0], batch) + 0.1 * target.loss(model, batch)
                beta = features * (1 - step / max(steps - 1, 1))
                if pairs and beta > 0:
                    rep = sum(_masked_mse(got_s[j], got_t[ti].detach()) for j, ti in pairs) / len(pairs)
                    loss = loss + beta * rep
            opt.zero_grad(set_to_none=True)
            if not torch.isfinite(loss):
                losses.append(float("nan"))
                continue
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
    finally:
        for h in handles:
            h.remove()
        # diverged: a trained weight or a loss became NaN/Inf (a NaN loss skips its step, so the weights that
        # made it may still be finite, only huge)
        diverged = [n for n, p in model.named_parameters() if p.requires_grad and not bool(torch.isfinite(p).all())]
        if not all(math.isfinite(x) for x in losses):
            diverged = diverged or [f"the loss (step {next(i for i, x in enumerate(losses) if not math.isfinite(x))})"]
        if trainable == "lora":
            (remove_lora if diverged else merge_lora)(target.blocks)  # diverged factors are dropped, not merged
        for p in model.parameters():
            p.requires_grad_(requires.get(id(p), True))
        restore_modes(was_training)
        if teacher is not None:
            restore_modes(teacher_training)
        _restore(teacher_model, half_teacher, keep_trained=False)
        _restore(model, half, keep_trained=not diverged)
        overflowed = non_finite(model) if half else []
        if overflowed:  # trained weights past the half-precision range: the old ones back
            diverged = diverged or overflowed
            _restore(model, half, keep_trained=False)
        for p in model.parameters():  # the last step's gradients (a model-sized fp32 copy) are not left behind
            p.grad = grads.get(id(p))
    bad = non_finite(model)
    if diverged or bad:  # was saved as a model of NaN weights, exit 0
        first = (diverged or bad)[0]
        if bad:
            left = "the model is left non-finite; reload it"
        elif trainable == "lora" or half:
            left = "the model is left as it was before recovery"
        else:  # float32 full fine-tuning keeps no copy to go back to
            left = "the model keeps the diverged run's weights; reload it"
        raise InputError(f"recovery diverged at learning rate {lr:g}: {first}"
                         + (f" and {len(diverged or bad) - 1} other weights" if len(diverged or bad) > 1 else "")
                         + f" became NaN or Inf ({left}); lower the learning rate (--recover-lr)")
    return RecoveryResult(trainable, teacher is not None, steps, lr, losses, time.perf_counter() - start,
                          float(features) if teacher is not None else 0.0)
