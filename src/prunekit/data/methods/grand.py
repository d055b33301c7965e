"""GraNd: the norm of an example's loss gradient.

Paul, Ganguli, Dziugaite, "Deep Learning on a Data Diet: Finding Important Examples Early in Training"
(NeurIPS 2021), https://arxiv.org/abs/2107.07075; reference code mansheej/data_diet (`data_diet/scores.py`,
`get_grad_norm_fn`: the per-example Jacobian of the cross-entropy over all parameters, then its L2 norm).

Algorithm: ``GraNd(x, y) = mean_r ‖∇_θ CE(f(θ_r, x), y)‖₂`` over R networks θ_r (the paper: at
initialization or a few epochs in). High = the example still pulls hard on the weights = hard.

Two functions:

- `grand`: the exact score over every parameter that requires grad, with ``torch.func`` (``vmap(grad(...))``
  over ``functional_call``), `batch_size` examples at a time. Costs about one backward pass per example.
- `grand_last_layer`: the *last-layer approximation* used by DeepCore (PatrickZH/DeepCore,
  `deepcore/methods/grand.py`): only the final Linear's gradient, ``[∂L/∂z, ∂L/∂z ⊗ e]`` for logits ``z``
  and the Linear's input (embedding) ``e``, whose norm is ``‖p - onehot(y)‖₂ · sqrt(1 + ‖e‖²)`` in closed
  form. It equals `grand` for a model that is a single Linear layer with a bias.

Departures from the reference: the reference builds a B x P Jacobian per batch with ``jacrev``; here
``vmap(grad)`` gives the same per-example gradients, whose squared norms are summed parameter by parameter.
Models are scored in ``eval()`` mode (dropout off, batch-norm running statistics), as the reference scores
with ``train=False``; their mode is restored afterwards. The loss is each example's own cross-entropy, not
divided by a batch size.

>>> import torch
>>> model = torch.nn.Linear(3, 2)
>>> x, y = torch.randn(5, 3), torch.tensor([0, 1, 1, 0, 1])
>>> exact = grand(model, x, y)
>>> with torch.no_grad():
...     approx = grand_last_layer(model(x), x, y)
>>> bool(abs(exact - approx).max() < 1e-5)
True
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from prunekit.data.methods._checks import float_array, labels_array, to_model
from prunekit.data.methods.el2n import softmax
from prunekit.errors import InputError, module_modes, restore_modes

__all__ = ["grand", "grand_last_layer"]


def _model_list(models) -> list[nn.Module]:
    if isinstance(models, nn.Module):
        return [models]
    if isinstance(models, Sequence) and models and all(isinstance(m, nn.Module) for m in models):
        return list(models)
    raise InputError("models must be a torch.nn.Module or a non-empty list of them (one per run)")


def _grad_norms(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> torch.Tensor:
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach() for k, v in model.named_parameters() if v.requires_grad}
    if not params:
        raise InputError("the model has no parameters that require grad; GraNd has nothing to differentiate")
    frozen = {k: v.detach() for k, v in model.named_parameters() if not v.requires_grad}
    buffers = {k: v.detach() for k, v in model.named_buffers()}
    device = next(iter(params.values())).device

    def loss(p, xi, yi):  # one example: xi [...], yi []
        logits = functional_call(model, (p, frozen, buffers), (xi.unsqueeze(0),))  # [1, K]
        return nn.functional.cross_entropy(logits, yi.unsqueeze(0))

    per_example = vmap(grad(loss), in_dims=(None, 0, 0))
    norms = torch.empty(len(x), dtype=torch.float64)
    for start in range(0, len(x), batch_size):
        xb = to_model(x[start : start + batch_size], model)
        yb = y[start : start + batch_size].to(device)
        grads = per_example(params, xb, yb)  # {name: [B, *param.shape]}
        sq = sum(g.reshape(len(xb), -1).double().pow(2).sum(1) for g in grads.values())  # [B]
        norms[start : start + len(xb)] = sq.sqrt().cpu()
    return norms


def grand(models, x, y, *, batch_size: int = 256) -> np.ndarray:
    """Exact GraNd: mean over `models` of each example's cross-entropy gradient norm, float64 ``[N]``.

    `models`: an ``nn.Module`` mapping ``[B, ...]`` inputs to ``[B, K]`` logits, or a list of them (one per
    run or checkpoint; the score is their mean). `x`: a float tensor ``[N, ...]``; `y`: integer ``[N]`` in
    ``[0, K)``. `batch_size` bounds memory: a batch holds ``batch_size`` copies of the gradient.
    """
    model_list = _model_list(models)
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point torch tensor [N, ...]; convert with torch.as_tensor(x).float()")
    if x.ndim < 1 or len(x) == 0:
        raise InputError(f"x is empty (shape {tuple(x.shape)}); give at least one example")
    if not torch.isfinite(x).all():
        raise InputError("x has NaN or infinite values; fix or drop those examples")
    n = len(x)
    labels = labels_array(y, "y", n=n)
    y_t = torch.as_tensor(labels)
    total = torch.zeros(n, dtype=torch.float64)
    for model in model_list:
        was_training = module_modes(model)
        model.eval()
        try:
            with torch.no_grad():
                probe = model(to_model(x[:1], model))  # [1, K]: learn K to check the labels
            if probe.ndim != 2:
                raise InputError(f"the model must return logits [B, K], got shape {tuple(probe.shape)}")
            if labels.max() >= probe.shape[1]:
                raise InputError(f"y has class {labels.max()} but the model has only K={probe.shape[1]} outputs")
            total += _grad_norms(model, x, y_t, batch_size)
        finally:
            restore_modes(was_training)
    return (total / len(model_list)).numpy()


def grand_last_layer(logits, embeddings, labels, *, bias: bool = True) -> np.ndarray:
    """Last-layer GraNd approximation (DeepCore's): float64 ``[N]``, averaged over runs.

    `logits`: ``[R, N, K]`` or ``[N, K]``, the outputs of a final Linear; `embeddings`: ``[R, N, D]`` or
    ``[N, D]``, that Linear's inputs. The gradient of the cross-entropy with respect to the Linear's weight is
    ``g ⊗ e`` and to its bias ``g``, where ``g = softmax(z) - onehot(y)``, so the norm is
    ``‖g‖ · sqrt(‖e‖² + 1)`` (``‖g‖ · ‖e‖`` with ``bias=False``).
    """
    z = float_array(logits, "logits", ndims=(2, 3))
    e = float_array(embeddings, "embeddings", ndims=(2, 3))
    if z.ndim == 2:
        z = z[None]  # [1, N, K]
    if e.ndim == 2:
        e = e[None]  # [1, N, D]
    if z.shape[:2] != e.shape[:2]:
        raise InputError(f"logits {tuple(z.shape)} and embeddings {tuple(e.shape)} must agree on runs and examples")
    _, n, k = z.shape
    y = labels_array(labels, n=n, k=k)
    g = softmax(z)  # [R, N, K]
    g[:, np.arange(n), y] -= 1.0  # dL/dz = p - onehot(y)
    g_sq = (g * g).sum(-1)  # [R, N]
    e_sq = (e * e).sum(-1) + (1.0 if bias else 0.0)  # [R, N]
    return np.sqrt(g_sq * e_sq).mean(axis=0)  # [N]
