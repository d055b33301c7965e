"""D-Pruner: dual pruning for a target domain, keeping general ability and domain knowledge.

Zhang, Liu, Zhao, Cheng, Bao, Zhang, Mitra, Chen, "Pruning as a Domain-specific LLM Extractor" (NAACL 2024
Findings), https://arxiv.org/abs/2405.06275. The authors' repository (psunlpgroup/D-Pruner) now holds only a
README: the code was withdrawn as NEC's property. The stages below follow the paper's description (general
importance = error of removing a weight on open-domain text; an NTP loss regularised by it; a Taylor/empirical-
Fisher dual importance on domain text; an unstructured mask). A fork that predates the withdrawal
(compressionOrg/D-Pruner: ``general.py``, ``src/lomo.py``, ``save_model.py``) was read to pin down what the
paper leaves implicit; where it departs from the paper's equations we say so. No code is taken from it.

Three stages, over the Linear layers inside the decoder blocks (embeddings, norms and the LM head stay dense):

1. **General importance** from an open-domain calibration set (Wikipedia leads here; C4 in the paper), the
   Optimal Brain Surgeon error of removing each weight alone::

       H   = 2/n_seq * sum_tokens x x^T                       (per Linear, inputs of the *dense* model)
       G_m = w_m^2 / [H^-1]_mm,   H^-1 = (H + delta I)^-1,   delta = percdamp * mean(diag H)

   Columns whose input is always zero (``H_jj = 0``) get ``G = 0`` (removing those weights changes nothing on
   general text). G is normalised per layer, ``G_hat = G / mean_layer(G)``, so that lambda means the same in
   every layer.
2. **Domain stage**: a few SGD steps on domain calibration sequences (the paper fine-tunes with LOMO, which is
   plain SGD with the update fused into the backward pass) on the regularised loss::

       L(w') = L_NTP(domain batch; w') + lambda * sum_m G_m (w'_m - w_m)^2,   with  w'_m - w_m = -alpha g_m

   i.e. the regulariser penalises how far one SGD step would move a weight that matters for general text
   (the substitution of ``w' - w`` by one step is our reading; the authors' ``lomo.py`` computes that form).
   Its gradient, with the Hessian diagonal approximated by the empirical Fisher ``F_m = g_m^2``, is
   ``2 lambda alpha^2 G_m g_m F_m``, so the regularised gradient is ``g_hat_m = g_m (1 + 2 lambda alpha^2 G_m
   g_m^2)``, with ``g = dL_NTP/dw'`` on the batch. At every step the **dual importance** (second-order Taylor
   estimate of the change in the regularised loss when w'_m is zeroed, Hessian diagonal again the empirical
   Fisher ``g_hat^2``) is accumulated::

       S_m += | g_hat_m w'_m + 1/2 (g_hat_m w'_m)^2 |

   and the weights take the step ``w' <- w' - alpha * clip(g_hat)``.
3. **Mask**: in each Linear, the ``int(numel * ratio)`` weights with the lowest final score are removed (one
   cut over the whole layer, as the paper). The final score adds the general importance to the dual one, each
   normalised to mean 1 over the layer (a departure, see below)::

       score_m = S_m / mean_layer(S) + general_weight * G_hat_m          (general_weight = 1 by default)

   ``general_weight = 0, lam = 10`` is the paper's form (the general importance enters only through the
   regulariser).
   The mask is applied to the *original* weights: the SGD steps only serve the importance estimate (the
   authors' ``save_model.py`` masks the pretrained checkpoint, not the fine-tuned one).

Choices the paper leaves open, and the ones made here (all keyword options of `prune_model`):

- **The general importance is added to the final score** (`general_weight`, default 1). In the paper it acts
  only through the regulariser, i.e. through the gradient, so a weight with no domain gradient scores 0
  however much general text needs it; on SmolLM2-135M the regulariser moved 5.5% of the mask at lam 0 -> 100
  and left D-Pruner far behind Wanda on Wikipedia. Adding ``G_hat`` keeps the weights general text needs.
  We tried several forms of the extra term, on validation windows (16 x 512 tokens, seed 1, of the *calibration*
  splits of Wikipedia and python-docs; general importance from 128 x 512 wiki windows, domain stage 32 steps
  of 2 x 512 python-docs tokens at lam 0), wiki / docs perplexity at 50%, per-layer cut:
  S alone 49.17 / 21.55; G alone 50.94 / 52.39; S + w G_hat for w = 0.5, 1, 2: 37.07 / 20.85, 35.09 / 21.02,
  34.56 / 21.53; S + G_hat w^2 (the regulariser's own curvature, ``lam G_m w_m^2``, which a second-order
  expansion of the regularised loss adds when w'_m is zeroed) at 1: 41.94 / 21.03; S + (Wanda's
  ``w^2 ||x||^2``) at 0.3, 1, 3: 41.13 / 20.94, 36.39 / 21.15, 34.09 / 22.06. On the same windows Wanda's
  score per row with Wikipedia norms gave 34.67 / 31.04 and with python-docs norms 39.09 / 24.67 (norms of
  the dense model's activations). So ``S + G_hat`` at weight 1 (equal weight to the two normalised
  importances) was taken: the general ability of Wikipedia-calibrated Wanda at a domain perplexity below
  Wanda calibrated on the domain itself. ``max(S_hat, w G_hat)`` at w = 0.5, 1, 2 gave 45.21 / 21.51,
  39.63 / 21.31, 34.34 / 21.38.
- **lam defaults to 0** when the general importance is added. The regulariser amplifies the gradients of
  weights with a large G, so after the per-layer normalisation it too pulls the score toward the general
  importance; with both, the general side counts twice. On the planted test (tests/test_dpruner.py: input
  columns only domain text excites) the domain-only weights kept were 72% at lam 0 alone, 58% at lam 0 with
  general_weight 1, 33% at lam 10 alone and 0.1% at lam 10 with general_weight 1.

- ``G`` uses the true OBS term ``[H^-1]_mm`` (the squared norm of column m of the upper Cholesky factor U of
  ``H^-1 = U^T U``). SparseGPT's saliency ``w^2 / U_mm^2``, which the authors' ``general.py`` saved, is the
  OBS term only given all earlier columns fixed, and was taken on weights already updated by SparseGPT's
  sweep at 52% sparsity. Here no weight is changed by this stage; the block-by-block pass propagates the
  dense activations.
- **lambda is dimensionless.** ``2 lambda alpha^2 G_m g_m^2`` depends on the scale of the loss, of the
  gradients and of G (the authors' code adds further factors 1/1000 and a loss scale, so their lambda = 0.1 has
  no transferable meaning). We write the regularised gradient as::

       g_hat_m = g_m (1 + lambda * G_hat_m * g_m^2 / mean_layer(g^2))

   i.e. the paper's ``2 lambda' alpha^2 mean(G) mean(g^2)`` (per layer and step) is our `lam`: a weight of
   average general importance and average squared gradient has its gradient scaled by ``1 + lam``. lam = 0 is
   pure domain Taylor importance; a large lam ranks each layer by ``G_hat |g|^3 |w|``, i.e. toward the
   general importance (a weight with no domain gradient at all still scores 0: the paper's importance is
   multiplicative). On the planted test that pull is strong; on SmolLM2-135M lam 0 -> 100 changed 5.5% of
   the mask but raised its agreement with the G-only mask only from 84.3% to 84.6%. The authors' code adds
   ``2 lambda alpha^2 G g^2`` (g squared: the sign is lost, so a negative gradient is *shrunk*); we keep the
   Fisher-consistent ``g^3``, whose sign follows g.
- The empirical Fisher is the square of the batch-mean gradient (batches of `domain_batch_size` sequences), not the
  mean of per-sequence squares.
- S is accumulated at the current weights w' with the regularised, unclipped gradient; the step uses the
  gradient clipped to global norm `clip` over all pruned Linears (the reference LOMO config: clip 1.0,
  lr 0.03, linear schedule with warm-up, 5 epochs, batch 8). Here the learning rate is constant and
  training runs `steps` steps (default: one pass over the domain sequences).
- The authors' code also adds ``(g w)^2 / 2000`` instead of ``/ 2`` and a ``w^3`` term inside the absolute
  value; neither is in the paper, and neither is used here.
- Comparison group: ``scope="layer"`` (default, the paper's per-layer percentile) or ``scope="row"`` (per
  output row, as Wanda). The paper's optional "iterative blocking" (a cut per 128 input columns) is not
  implemented.
- The model runs in eval mode (no dropout) during the domain stage; only the pruned Linears' weights get
  gradients (everything else has ``requires_grad`` off); flags, mode and weights are restored on any error.

Defaults: as many domain windows of `seqlen` tokens as general ones (`prunekit.prune` passes `samples`, 128;
32 when called without), batch 2, one pass, lr 0.03, clip 1.0, lam 0, general_weight 1,
scope "layer", percdamp 0.01. With clip 1.0 a step moves the pruned Linears by at most lr = 0.03 in L2 norm,
against ~2,000 for their weights in SmolLM2-135M: as in the reference config the steps barely move the
model, and the importance is in effect accumulated at the original weights.

The paper's form (``general_weight=0``, lam as stated), measured at an earlier stage on SmolLM2-135M
(dequantized fp32), ratio 0.5, perplexity on 4,096 held-out tokens (8 x 512) of python-docs / wiki; G and
Wanda-wiki from 32 x 512 wiki tokens, Wanda-docs from 32 x 512 python-docs tokens, D-Pruner's domain stage
on 16 x 512 python-docs tokens (8 steps of 2; the masks of every lam came from one pass with lr 0): dense
10.23 / 13.14; Wanda-wiki 23.96 / 31.11; Wanda-docs 19.44 / 36.39; the G mask alone (per layer, no update)
37.31 / 44.87; D-Pruner per layer lam 0: 19.96 / 65.70, lam 1: 20.07 / 59.50, lam 10: 20.61 / 55.43, lam 100:
20.57 / 54.48; per row lam 0: 24.56 / 53.67, lam 10: 25.76 / 46.12. So D-Pruner beats
the general-only Wanda on the domain, lam trades a little domain perplexity for general perplexity and
flattens from ~10, the per-layer cut is much better on the domain than the per-row one; but at this size
(16 domain sequences, a 135M model) the gradient-based score loses on Wikipedia to both Wanda baselines and
is not better than Wanda calibrated on the domain itself. Hence the added general importance (above);
`bench/seed_weights.py` reports both forms.

>>> import torch
>>> x = torch.randn(256, 4); x[:, 3] = 0
>>> g = general_importance(torch.ones(2, 4), 2 * x.T @ x / 256)
>>> bool((g[:, :3] > 0).all()), bool((g[:, 3] == 0).all())
(True, True)
"""

from __future__ import annotations

import math
import time
from typing import Iterable

import torch
from torch import nn

from prunekit.errors import InputError, int_at_least, is_real, module_modes, restore_modes, with_autograd
from prunekit.select import NM, check_ratio, keep_global, keep_per_row, parse_pattern
from prunekit.text import Text, calibration_ids, ids_from_numpy, load_text
from prunekit.weights.engine import (UNCHANGED, LayerReport, find_blocks, get_weight, input_device, prune_blocks,
                                     set_weight, target_linears, zeros_in)
from prunekit.weights.methods.sparsegpt import PERCDAMP, inverse_cholesky

__all__ = ["general_importance", "regularised_grad", "dual_importance", "final_score", "prune_model"]

DOMAIN_SAMPLES = 32
BATCH_SIZE = 2
LR = 0.03
LAM = 0.0  # the paper's regulariser is off by default: the added general importance does its job (see above)
GENERAL_WEIGHT = 1.0
CLIP = 1.0
SCOPES = ("layer", "row")


def general_importance(weight: torch.Tensor, hessian: torch.Tensor, *, percdamp: float = PERCDAMP) -> torch.Tensor:
    """``G = w^2 / [H^-1]_mm`` (``[out, in]`` fp32) from ``H`` (``[in, in]``); 0 on columns with no input."""
    h = hessian.detach().clone().float()
    dead = torch.diag(h) == 0
    h[dead, dead] = 1
    upper = inverse_cholesky(h, percdamp)  # (H + delta I)^-1 = U^T U
    hinv_diag = upper.square().sum(0)  # [in]: [H^-1]_jj = ||U[:, j]||^2
    g = weight.detach().float().square() / hinv_diag[None, :]
    g[:, dead] = 0
    return g


def regularised_grad(grad: torch.Tensor, general: torch.Tensor, lam: float) -> torch.Tensor:
    """``g (1 + lam * G_hat * g^2 / mean(g^2))``: the NTP gradient plus the general-importance regulariser's."""
    if lam == 0:
        return grad
    fisher = grad.square()
    return grad * (1 + (lam / fisher.mean().clamp_min(torch.finfo(torch.float32).tiny)) * general * fisher)


def dual_importance(grad_hat: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """``|g_hat w + 1/2 (g_hat w)^2|``: the second-order change of the loss when each weight is zeroed."""
    gw = grad_hat * weight
    return (gw + 0.5 * gw.square()).abs()


def final_score(dual: torch.Tensor, general: torch.Tensor, general_weight: float) -> torch.Tensor:
    """``S / mean(S) + general_weight * G_hat`` over one layer (`general` is G_hat, already mean 1)."""
    if general_weight == 0:
        return dual
    mean = dual.mean()
    return (dual / mean if mean > 0 else dual) + general_weight * general


def _check_ids(ids, what: str, fix: str, vocab: int | None) -> torch.Tensor:
    if not isinstance(ids, torch.Tensor) or ids.dim() != 2 or ids.dtype not in (torch.long, torch.int, torch.int16):
        raise InputError(f"{what} must be token ids of shape [sequences, seqlen] (int64); {fix}")
    if ids.shape[0] < 1 or ids.shape[1] < 2:
        raise InputError(f"{what} has shape {tuple(ids.shape)}: it needs at least 1 sequence of 2 tokens; {fix}")
    if vocab is not None and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
        raise InputError(f"{what} holds token ids outside the model's vocabulary [0, {vocab}); {fix}")
    return ids.long()


def _positive_int(value, name: str, allow_none: bool = False):
    if value is None and allow_none:
        return None
    return int_at_least(value, name, 1)  # a numpy integer too


def _non_negative(value, name: str) -> float:
    if not is_real(value) or value < 0:  # a numpy float too
        raise InputError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _domain_ids(domain, tokenizer, *, samples: int, seqlen: int, seed: int, vocab: int | None) -> torch.Tensor:
    fix = "give domain='python-docs' (--domain python-docs), a .txt/.jsonl file, or token ids [sequences, seqlen]"
    if domain is None:
        raise InputError(f"D-Pruner needs a domain corpus; {fix}")
    domain = ids_from_numpy(domain, "the domain")  # as calibration ids may be
    if isinstance(domain, torch.Tensor):
        return _check_ids(domain, "the domain tensor", fix, vocab)
    if tokenizer is None:
        raise InputError("a domain given as text needs the tokenizer: prune_model(..., tokenizer=tok)")
    text = domain if isinstance(domain, Text) else load_text(domain, purpose="calibration")
    try:
        ids = calibration_ids(tokenizer, text, samples=samples, seqlen=seqlen, seed=seed)
    except InputError as e:  # it spoke of the "calibration text" and --samples, which set the general windows
        if "samples x" in str(e):
            raise InputError(f"the domain text {text.name} holds fewer than {samples} windows of {seqlen} tokens; "
                             "give more domain text or lower --option domain_samples=... (domain_samples=) or "
                             "--seqlen") from None
        if "calibration mixture" in str(e):
            raise InputError(f"the domain mixture {text.name} has {len(text.parts)} parts: ask at least one window "
                             "each with --option domain_samples=... (domain_samples=)") from None
        raise
    return _check_ids(ids, "the domain text", fix, vocab)


def _vocab(model: nn.Module) -> int | None:
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    return getattr(emb, "num_embeddings", None)


def _general_stage(model, general_ids, *, skip, percdamp, progress) -> tuple[dict[str, torch.Tensor], dict[str, float]]:
    """G_hat per Linear (CPU fp32, mean 1 per layer) from the dense model's block-by-block Hessians."""
    general: dict[str, torch.Tensor] = {}

    def measure(weight, hessian, name):
        g = general_importance(weight, hessian, percdamp=percdamp)
        mean = g.mean()
        general[name] = (g / mean if mean > 0 else g).cpu()
        return UNCHANGED  # the engine then propagates the dense activations

    reports, _ = prune_blocks(model, general_ids, measure, stat="hessian", skip=skip, sequential="block",
                              progress=progress)
    return general, {r.name: r.seconds for r in reports}


def _domain_stage(model, layers: dict[str, nn.Module], general: dict[str, torch.Tensor], domain_ids: torch.Tensor, *,
                  steps: int, lr: float, lam: float, batch_size: int, clip: float,
                  progress: bool) -> dict[str, torch.Tensor]:
    """S per Linear (``[out, in]`` fp32), accumulated over `steps` SGD steps; the weights end moved (lr > 0)."""
    from tqdm.auto import tqdm

    scores = {name: torch.zeros(get_weight(m).shape, dtype=torch.float32) for name, m in layers.items()}
    device = input_device(model)
    batches = list(domain_ids.split(batch_size))
    for step in tqdm(range(steps), desc="D-Pruner domain steps", unit="step", disable=not progress):
        batch = batches[step % len(batches)].to(device)
        loss = model(input_ids=batch, labels=batch, use_cache=False).loss
        if not torch.isfinite(loss):
            if step:  # finite at step 0, so the SGD steps diverged: the learning rate, not the model or data
                raise InputError(f"D-Pruner's domain SGD diverged: the loss is {loss.item()} at step {step} "
                                 f"(lr {lr:g}); lower the learning rate (--option lr=...)")
            raise InputError(f"D-Pruner: the domain loss of the unchanged model is {loss.item()}; its activations "
                             "overflow on the domain text (check the model's dtype and weights)")
        loss.backward()
        with torch.no_grad():
            steps_by_layer, sq_norm = {}, 0.0
            for name, module in layers.items():
                weight = get_weight(module)  # [out, in] view of the parameter
                grad = module.weight.grad
                module.weight.grad = None
                if grad is None:
                    continue
                grad = (grad.T if weight is not module.weight else grad).float().cpu()  # [out, in]
                grad_hat = regularised_grad(grad, general[name], lam)
                scores[name] += dual_importance(grad_hat, weight.float().cpu())
                if lr > 0:
                    steps_by_layer[name] = grad_hat
                    sq_norm += float(grad_hat.square().sum())
            if lr > 0:
                coef = min(1.0, clip / (math.sqrt(sq_norm) + 1e-6)) if clip > 0 else 1.0
                for name, grad_hat in steps_by_layer.items():
                    weight = get_weight(layers[name])
                    weight.sub_((grad_hat * (lr * coef)).to(weight.device, weight.dtype))
    return scores


@with_autograd  # its domain stage backpropagates: inside a caller's no_grad / inference_mode too
def prune_model(
    model: nn.Module,
    general_ids: torch.Tensor,
    *,
    ratio: float,
    pattern: NM | str | None = None,
    tokenizer=None,
    domain: str | Text | torch.Tensor | None = None,
    samples: int | None = None,
    seqlen: int = 512,
    seed: int = 0,
    domain_samples: int | None = None,
    steps: int | None = None,
    lr: float = LR,
    lam: float = LAM,
    general_weight: float = GENERAL_WEIGHT,
    domain_batch_size: int = BATCH_SIZE,
    clip: float = CLIP,
    scope: str = "layer",
    percdamp: float = PERCDAMP,
    skip: Iterable[str] = (),
    progress: bool = True,
) -> list[LayerReport]:
    """Prune the decoder blocks' Linears of `model` in place with D-Pruner; one `LayerReport` per Linear.

    `general_ids`: ``[samples, seqlen]`` token ids of the general calibration text (the caller tokenizes;
    `samples` is how many there are). `domain`: token ids ``[n, seqlen]`` or a text source of
    `prunekit.text.load_text` (``"python-docs"``, a file, a `Text`), cut into `domain_samples` random windows
    of `seqlen` tokens (seeded by `seed`; default as many as `samples`, else 32) with `tokenizer`. `steps` SGD
    steps of `domain_batch_size` domain sequences (default one pass over them), learning rate `lr`, gradient clipped
    to global norm `clip`; `lam` the weight of the general-importance regulariser (dimensionless, see the
    module docstring); `general_weight` the weight of the general importance added to the final score (0: the
    paper's form); `scope` the comparison group of the cut, ``"layer"`` or ``"row"``. `pattern` must be
    None: D-Pruner is unstructured. The reports' `rel_error` is None (no reconstruction error is measured);
    `seconds` counts the layer's general-importance and masking time, not the shared domain stage.

    Memory besides the model: G, S, the step's gradients and a copy of the original weights of the pruned
    Linears (4 fp32 copies, ~1.7 GB for SmolLM2-135M) plus one batch's activations for backprop; a float16
    model's domain stage runs on a float32 copy of its parameters (float16 gradients underflow). Peak RSS on
    SmolLM2-135M: 3.6 GB with 128-token windows; ~5.7 GB with 2 x 512-token batches and four score sets.
    """
    ratio = check_ratio(ratio)
    if parse_pattern(pattern) is not None:
        raise InputError(f"D-Pruner is unstructured: pattern {pattern} is not supported; drop the pattern and give "
                         "a ratio (use sparsegpt or wanda for N:M)")
    if scope not in SCOPES:
        raise InputError(f"scope must be 'layer' or 'row', got {scope!r}")
    if domain_samples is None:
        domain_samples = samples if samples is not None else DOMAIN_SAMPLES
    domain_samples = _positive_int(domain_samples, "domain_samples")
    seqlen = _positive_int(seqlen, "seqlen")
    steps = _positive_int(steps, "steps", allow_none=True)
    batch_size = _positive_int(domain_batch_size, "domain_batch_size")
    lr, lam, clip = _non_negative(lr, "lr"), _non_negative(lam, "lam"), _non_negative(clip, "clip")
    general_weight = _non_negative(general_weight, "general_weight")
    vocab = _vocab(model)
    general_ids = _check_ids(general_ids, "general_ids", "tokenize the general calibration text with "
                             "prunekit.calibration_ids", vocab)
    domain_ids = _domain_ids(domain, tokenizer, samples=domain_samples, seqlen=seqlen, seed=seed, vocab=vocab)
    if steps is None:
        steps = math.ceil(domain_ids.shape[0] / batch_size)
    prefix, blocks = find_blocks(model)
    layers = {}
    for i, block in enumerate(blocks):
        layers.update(target_linears(block, f"{prefix}.{i}", skip))
    if not layers:
        raise InputError("no Linear layer is left to prune; check the skip patterns")

    general, seconds = _general_stage(model, general_ids, skip=skip, percdamp=percdamp, progress=progress)

    params = list(model.parameters())
    flags = [p.requires_grad for p in params]
    grads = [p.grad for p in params]  # the caller's: set aside, so they neither add into step 0's gradient nor are lost
    was_training = module_modes(model)
    originals = {name: get_weight(m).detach().clone() for name, m in layers.items()} if lr > 0 else {}
    # float16 gradients underflow (a tiny model with large activations: 70-100% of each layer's gradient off, the
    # mask 17% off float32's): the domain stage runs on float32 copies, and the float16 tensors are put back
    half = {p: p.data for p in params if p.dtype == torch.float16}
    try:
        for p in half:
            p.data = p.data.float()
        for p in params:
            p.grad = None
            p.requires_grad_(False)
        for m in layers.values():
            m.weight.requires_grad_(True)
        model.eval()  # autograd is on here whatever the caller set: `with_autograd`
        scores = _domain_stage(model, layers, general, domain_ids, steps=steps, lr=lr, lam=lam,
                               batch_size=batch_size, clip=clip, progress=progress)
    finally:
        for p, data in half.items():
            p.data = data
        for p, flag, grad in zip(params, flags, grads):
            p.grad = grad
            p.requires_grad_(flag)
        restore_modes(was_training)
        with torch.no_grad():
            for name, w in originals.items():
                set_weight(layers[name], w)
    del originals

    reports = []
    with torch.no_grad():
        for name, module in layers.items():
            start = time.perf_counter()
            score = final_score(scores.pop(name), general.pop(name), general_weight)
            keep = keep_global(score, ratio) if scope == "layer" else keep_per_row(score, ratio)
            weight = get_weight(module)
            set_weight(module, weight.float() * keep.to(weight.device))
            sparsity = zeros_in(get_weight(module)) / weight.numel()
            reports.append(LayerReport(name, tuple(weight.shape), sparsity, None,
                                       seconds.get(name, 0.0) + time.perf_counter() - start))
    return reports
