"""The small training loop shared by every method that trains, and the data-scoring runs built on it.

- `small_cnn`, `mlp`: builtin classifiers small enough to train on a CPU (28x28 images, flat features).
- `train`: minibatch SGD (Nesterov momentum, weight decay, cosine learning-rate decay to 0), seeded shuffles,
  an `on_step` callback that sees every minibatch's logits, an `on_epoch` callback after every pass, and
  `callbacks`: objects whose `on_batch_start(step, model)` runs before each forward pass and whose
  `on_after_backward(step, model)` runs between the backward pass and the optimizer step (how a method that
  edits weights or gradients during training, such as `prunekit.cnn.trp.TRP`, plugs in).
- `score_runs`: R short runs from different seeds that record Data Diet's EL2N and GraNd at an early epoch and
  Toneva's forgetting events throughout (see `prunekit.data.methods`).
- `cross_val_probs`: out-of-fold predicted probabilities, the input of Confident Learning.

Everything is deterministic given `seed` (same machine, same thread count) and leaves the caller's global
random state alone.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> x = torch.randn(200, 2, generator=g); y = (x[:, 0] > 0).long()
>>> model = train(mlp(2, 2), x, y, epochs=5, lr=0.1, seed=0, progress=False)
>>> bool(accuracy(model, x, y) > 0.9)
True
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from prunekit.data.methods._checks import int_at_least, to_model
from prunekit.data.methods.el2n import el2n
from prunekit.data.methods.forgetting import ForgettingTracker
from prunekit.data.methods.grand import grand, grand_last_layer
from prunekit.errors import InputError, with_autograd, module_modes, restore_modes

__all__ = [
    "small_cnn", "mlp", "StepInfo", "train", "predict", "accuracy", "embed", "DataScores", "seeded_model", "score_runs",
    "cross_val_probs",
]


def small_cnn(num_classes: int = 10, channels: int = 1) -> nn.Sequential:
    """A two-block CNN for ``[B, channels, 28, 28]`` images (~0.2M parameters); the last layer is a Linear.

    >>> small_cnn()(torch.zeros(2, 1, 28, 28)).shape
    torch.Size([2, 10])
    """
    return nn.Sequential(
        nn.Conv2d(channels, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 16, 14, 14]
        nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # [B, 32, 7, 7]
        nn.Flatten(), nn.Linear(32 * 7 * 7, 128), nn.ReLU(),  # [B, 128]: the embedding
        nn.Linear(128, num_classes),  # [B, K]
    )


def mlp(in_features: int, num_classes: int, *, hidden: int = 128) -> nn.Sequential:
    """One hidden ReLU layer over flattened inputs: ``[B, ...] -> [B, num_classes]``."""
    return nn.Sequential(nn.Flatten(), nn.Linear(in_features, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))


@dataclass(frozen=True)
class StepInfo:
    """What `train` hands `on_step` for every minibatch (before the update)."""

    epoch: int  # 0-based pass over the data
    step: int  # 0-based optimizer step
    indices: torch.Tensor  # [B] positions in x
    logits: torch.Tensor  # [B, K] detached, from this step's forward pass
    labels: torch.Tensor  # [B]
    loss: float


def _as_inputs(x):
    """A numpy float array as a tensor (as the data functions take it; a reversed or strided view copied)."""
    if isinstance(x, np.ndarray) and np.issubdtype(x.dtype, np.floating):
        return torch.from_numpy(np.ascontiguousarray(x))
    return x


def _as_labels(y) -> torch.Tensor:
    """Labels as a tensor (a reversed numpy view copied: torch takes no negative strides)."""
    return torch.as_tensor(np.ascontiguousarray(y) if isinstance(y, np.ndarray) else y)


def _check_xy(x, y) -> tuple[torch.Tensor, torch.Tensor]:
    x = _as_inputs(x)
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise InputError("x must be a floating-point torch tensor or numpy array [N, ...] (uint8 images: divide by "
                         "255 first); convert with torch.as_tensor(x).float()")
    if x.ndim < 1 or len(x) == 0:
        raise InputError(f"x is empty (shape {tuple(x.shape)}); give at least one example")
    y = _as_labels(y)
    if y.is_floating_point() and y.ndim == 1 and bool(torch.isfinite(y).all()) and bool((y == y.round()).all()):
        y = y.long()  # whole-number float labels (3.0), as the label-issue functions take them
    if y.shape != (len(x),) or y.is_floating_point() or y.dtype == torch.bool:
        raise InputError(f"y must be integer class indices of shape [{len(x)}], got {y.dtype} {tuple(y.shape)}")
    if y.min() < 0:
        raise InputError(f"y has negative classes (min {int(y.min())}); labels are class indices 0..K-1")
    if not torch.isfinite(x).all():  # one NaN pixel trained NaN weights, or gave NaN probabilities, silently
        bad = int((~torch.isfinite(x.reshape(len(x), -1))).any(1).sum())
        raise InputError(f"x holds NaN or Inf values in {bad} example(s); clean or drop them first")
    return x, y.long()


def _check_classes(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> None:
    """Labels the model has no output for were a raw IndexError from cross-entropy, mid-training."""
    was = module_modes(model)
    model.eval()
    try:
        with torch.no_grad():
            out = model(to_model(x[:1], model))  # [1, K]
    finally:
        restore_modes(was)
    k = out.shape[-1]
    if int(y.max()) >= k:
        raise InputError(f"y has class {int(y.max())} but the model has only K={k} outputs; labels are class "
                         f"indices 0..{k - 1}")


@with_autograd
def train(model: nn.Module, x: torch.Tensor, y, *, epochs: int | None = None, steps: int | None = None,
          batch_size: int = 128, lr: float = 0.05, seed: int = 0, momentum: float = 0.9,
          weight_decay: float = 5e-4, on_step: Callable[[StepInfo], None] | None = None,
          on_epoch: Callable[[int, nn.Module], None] | None = None, callbacks: Sequence = (),
          until_epoch: int | None = None, progress: bool = True) -> nn.Module:
    """Train `model` in place on ``(x [N, ...], y [N])`` with cross-entropy; returns it (in eval mode).

    Give `epochs` (passes over the data) or `steps` (optimizer steps: the "same compute" recipe for a pruned
    subset), not both. SGD with Nesterov momentum; the learning rate decays from `lr` to 0 on a cosine over
    all steps. Each pass visits every example once in an order drawn from `seed`; the last batch may be
    short. `on_step(StepInfo)` runs after every forward pass, `on_epoch(epoch, model)` after every complete
    pass (``epoch`` counts from 1). Each object in `callbacks` may define ``on_batch_start(step, model)``
    (before the forward pass of optimizer step ``step``, counted from 0 over the whole run) and
    ``on_after_backward(step, model)`` (gradients computed, not yet applied). `until_epoch` stops after that many
    complete passes, on the learning-rate schedule of the whole run: the model is bitwise the full run's at
    that epoch (what a score taken early in training needs, without the rest).
    """
    x, y = _check_xy(x, y)
    _check_classes(model, x, y)
    batch_size = int_at_least(batch_size, "batch_size", 1)
    per_epoch = math.ceil(len(x) / batch_size)
    if (epochs is None) == (steps is None):
        raise InputError("give exactly one of epochs= (passes over the data) or steps= (optimizer steps)")
    total = per_epoch * int_at_least(epochs, "epochs", 1) if steps is None else int_at_least(steps, "steps", 1)
    stop = total if until_epoch is None else min(total, per_epoch * int_at_least(until_epoch, "until_epoch", 0))
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise InputError(f"lr must be a positive number, got {lr!r}")
    starts = [cb.on_batch_start for cb in callbacks if hasattr(cb, "on_batch_start")]
    after_backward = [cb.on_after_backward for cb in callbacks if hasattr(cb, "on_after_backward")]
    device = next(model.parameters()).device
    gen = torch.Generator().manual_seed(int(seed))
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, nesterov=momentum > 0,
                          weight_decay=weight_decay)
    model.train()
    step, epoch = 0, 0
    with tqdm(total=stop, desc="train", unit="step", disable=not progress, leave=False) as bar:
        while step < stop:
            order = torch.randperm(len(x), generator=gen)  # [N]
            for start in range(0, len(x), batch_size):
                if step >= stop:
                    break
                idx = order[start : start + batch_size]  # [B]
                xb, yb = to_model(x[idx], model), y[idx].to(device)
                for hook in starts:
                    hook(step, model)
                logits = model(xb)  # [B, K]
                loss = nn.functional.cross_entropy(logits, yb)
                if on_step is not None:
                    on_step(StepInfo(epoch, step, idx, logits.detach(), yb, float(loss.detach())))
                for group in opt.param_groups:
                    group["lr"] = lr * 0.5 * (1.0 + math.cos(math.pi * step / total))
                opt.zero_grad(set_to_none=True)
                loss.backward()
                for hook in after_backward:
                    hook(step, model)
                opt.step()
                step += 1
                bar.update(1)
            else:
                epoch += 1
                if on_epoch is not None:
                    model.eval()
                    on_epoch(epoch, model)
                    model.train()
    return model.eval()


def predict(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256) -> torch.Tensor:
    """Logits ``[N, K]`` (float32, CPU) in eval mode without gradients; the model's mode is restored."""
    return embed(model, x, batch_size=batch_size, with_embeddings=False)[0]


def accuracy(model: nn.Module, x: torch.Tensor, y, *, batch_size: int = 256) -> float:
    """Fraction of ``x`` classified as ``y``."""
    return float((predict(model, x, batch_size=batch_size).argmax(1) == _as_labels(y)).double().mean())


def _last_linear(model: nn.Module) -> nn.Linear:
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise InputError("the model has no nn.Linear; last-layer scores need logits from a final Linear")
    return linears[-1]


def embed(model: nn.Module, x: torch.Tensor, *, batch_size: int = 256,
          with_embeddings: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(logits [N, K], embeddings [N, D])``: the outputs and the inputs of the model's last ``nn.Linear``.

    The last Linear is the last one registered; its output must be the model's output (checked).
    """
    x = _as_inputs(x)
    if not isinstance(x, torch.Tensor):
        raise InputError(f"x must be a torch tensor or numpy float array [N, ...], got {type(x).__name__}")
    was_training = module_modes(model)
    model.eval()
    captured = []
    hook = None
    if with_embeddings:
        layer = _last_linear(model)
        hook = layer.register_forward_hook(lambda mod, inp, out: captured.append((inp[0].detach(), out.detach())))
    logits, embs = [], []
    try:
        with torch.no_grad():
            for start in range(0, len(x), batch_size):
                out = model(to_model(x[start : start + batch_size], model))  # [B, K]
                logits.append(out.float().cpu())
                if with_embeddings:
                    if not captured or not torch.equal(captured[-1][1], out):
                        raise InputError("the model's output is not its last nn.Linear's output; put the "
                                         "classifier Linear last (or register it last) for last-layer scores")
                    embs.append(captured[-1][0].reshape(len(out), -1).float().cpu())
                    captured.clear()
    finally:
        if hook is not None:
            hook.remove()
        restore_modes(was_training)
    return torch.cat(logits), (torch.cat(embs) if with_embeddings else None)


@dataclass
class DataScores:
    """Per-example difficulty from `score_runs` (float64 ``[N]`` each, higher = harder)."""

    el2n: np.ndarray  # mean over runs of ||softmax - onehot|| at score_epoch
    grand: np.ndarray | None  # exact GraNd at score_epoch (None unless exact_grand=True)
    grand_last_layer: np.ndarray  # last-layer GraNd approximation at score_epoch
    forgetting: np.ndarray | None  # mean over runs of forgetting events over all epochs; inf = unlearned in a
    # run (None when score_runs(forgetting=False) stopped at score_epoch)
    logits: np.ndarray  # [R, N, K] float32 at score_epoch
    score_epoch: int
    epochs: int
    seconds: dict = field(default_factory=dict)  # wall time of training and of each score
    models: list = field(default_factory=list, repr=False)  # the trained networks, one per run


def seeded_model(model_fn: Callable[[], nn.Module], seed: int) -> nn.Module:
    """``model_fn()`` initialised under ``torch.manual_seed(seed)``, leaving the caller's RNG state alone."""
    if isinstance(model_fn, nn.Module) or not callable(model_fn):
        raise InputError(f"model_fn must be a function that builds a fresh model (e.g. lambda: small_cnn(10)), "
                         f"got {'a model' if isinstance(model_fn, nn.Module) else type(model_fn).__name__}")
    with torch.random.fork_rng(devices=[]):  # seed the initialization without touching the caller's RNG
        torch.manual_seed(seed)
        model = model_fn()
    if not isinstance(model, nn.Module):
        raise InputError(f"model_fn must return a torch.nn.Module, got {type(model).__name__}")
    return model


@with_autograd  # model_fn too builds trainable weights under a caller's inference_mode()
def score_runs(model_fn: Callable[[], nn.Module], x: torch.Tensor, y, *, runs: int = 3, epochs: int,
               score_epoch: int | None = None, seed: int = 0, batch_size: int = 128, lr: float = 0.05,
               exact_grand: bool = False, grand_batch_size: int = 256, forgetting: bool = True,
               progress: bool = True) -> DataScores:
    """Train `runs` networks (``model_fn()`` seeded ``seed + r``) for `epochs` and score every example.

    EL2N and GraNd are taken after `score_epoch` complete epochs (0 = at initialization; default: a tenth of
    `epochs`, at least 1), from all `runs`, as in Data Diet. Forgetting events are counted over every
    presentation in all `epochs` (Toneva et al.). Exact GraNd (all parameters) costs about one extra
    training epoch per run; it runs only with ``exact_grand=True``. Last-layer GraNd and the embeddings need
    the model's output to come from its last ``nn.Linear``. ``forgetting=False`` (EL2N / GraNd only) stops each
    run after `score_epoch` on the schedule of all `epochs` (same scores, a fraction of the training; the
    `models` returned are then those of `score_epoch`) and leaves ``forgetting`` None.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(64, 2, generator=g); y = (x[:, 0] > 0).long()
    >>> s = score_runs(lambda: mlp(2, 2), x, y, runs=2, epochs=2, score_epoch=1, progress=False)
    >>> s.el2n.shape, s.forgetting.shape
    ((64,), (64,))
    """
    x, y = _check_xy(x, y)
    _check_classes(seeded_model(model_fn, seed), x, y)
    runs, epochs = int_at_least(runs, "runs", 1), int_at_least(epochs, "epochs", 1)
    score_epoch = max(1, epochs // 10) if score_epoch is None else score_epoch
    if isinstance(score_epoch, bool) or not isinstance(score_epoch, int) or not 0 <= score_epoch <= epochs:
        raise InputError(f"score_epoch must be an integer in [0, epochs={epochs}], got {score_epoch!r}")
    seconds = {"train": 0.0, "el2n+last_layer": 0.0, "grand": 0.0}
    logits_runs, emb_runs, grand_runs, forgets, models = [], [], [], [], []

    def score(model: nn.Module) -> None:
        t0 = time.perf_counter()
        logits, emb = embed(model, x)  # [N, K], [N, D]
        logits_runs.append(logits.numpy())
        emb_runs.append(emb.numpy())
        t1 = time.perf_counter()
        if exact_grand:
            grand_runs.append(grand(model, x, y, batch_size=grand_batch_size))
        seconds["el2n+last_layer"] += t1 - t0
        seconds["grand"] += time.perf_counter() - t1

    for r in tqdm(range(runs), desc="scoring runs", disable=not progress):
        model = seeded_model(model_fn, seed + r)
        tracker = ForgettingTracker(len(x))

        def on_step(info: StepInfo) -> None:
            tracker.update(info.indices.numpy(), (info.logits.argmax(1) == info.labels).cpu().numpy())

        def on_epoch(epoch: int, m: nn.Module) -> None:
            if epoch == score_epoch:
                score(m)

        if score_epoch == 0:
            score(model)
        t0, scored = time.perf_counter(), seconds["el2n+last_layer"] + seconds["grand"]
        train(model, x, y, epochs=epochs, batch_size=batch_size, lr=lr, seed=seed + r,
              on_step=on_step if forgetting else None, on_epoch=on_epoch,
              until_epoch=None if forgetting else score_epoch, progress=progress)
        scored = seconds["el2n+last_layer"] + seconds["grand"] - scored  # scoring inside on_epoch
        seconds["train"] += time.perf_counter() - t0 - scored
        if forgetting:
            forgets.append(tracker.scores())
        models.append(model)

    logits = np.stack(logits_runs)  # [R, N, K]
    labels = y.numpy()
    return DataScores(
        el2n=el2n(logits, labels),
        grand=np.mean(grand_runs, axis=0) if exact_grand else None,
        grand_last_layer=grand_last_layer(logits, np.stack(emb_runs), labels),
        forgetting=np.mean(forgets, axis=0) if forgetting else None,
        logits=logits.astype(np.float32),
        score_epoch=score_epoch,
        epochs=epochs,
        seconds=seconds,
        models=models,
    )


def _stratified_folds(y: np.ndarray, folds: int, rng: np.random.Generator) -> np.ndarray:
    """Fold number ``[N]`` per example: each class is shuffled and dealt round-robin, so folds are balanced."""
    fold = np.empty(len(y), dtype=np.int64)
    offset = 0
    for c in np.unique(y):
        idx = rng.permutation(np.flatnonzero(y == c))
        fold[idx] = (np.arange(len(idx)) + offset) % folds
        offset += len(idx)
    return fold


@with_autograd
def cross_val_probs(model_fn: Callable[[], nn.Module], x: torch.Tensor, y, *, folds: int = 5, epochs: int,
                    seed: int = 0, batch_size: int = 128, lr: float = 0.05, progress: bool = True) -> np.ndarray:
    """Out-of-fold predicted probabilities, float32 ``[N, K]`` (rows sum to 1), for Confident Learning.

    Examples are dealt into `folds` class-stratified folds (seeded); for each fold a fresh ``model_fn()``
    (seeded ``seed + fold``) trains on the other folds for `epochs` and predicts the held-out one, so no
    example is predicted by a model that saw it.

    >>> g = torch.Generator().manual_seed(0)
    >>> x = torch.randn(60, 2, generator=g); y = (x[:, 0] > 0).long()
    >>> p = cross_val_probs(lambda: mlp(2, 2), x, y, folds=3, epochs=3, progress=False)
    >>> p.shape, p.dtype
    ((60, 2), dtype('float32'))
    """
    x, y = _check_xy(x, y)
    _check_classes(seeded_model(model_fn, seed), x, y)
    folds = int_at_least(folds, "folds", 1)
    if not 2 <= folds <= len(x):
        raise InputError(f"folds must be in [2, N={len(x)}], got {folds}")
    fold = torch.from_numpy(_stratified_folds(y.numpy(), folds, np.random.default_rng(int(seed))))
    probs = None
    for f in tqdm(range(folds), desc="cross-validation", disable=not progress):
        held = (fold == f).nonzero()[:, 0]  # [n_f]
        seen = (fold != f).nonzero()[:, 0]
        model = train(seeded_model(model_fn, seed + f), x[seen], y[seen], epochs=epochs, batch_size=batch_size,
                      lr=lr, seed=seed + f, progress=progress)
        logits = predict(model, x[held]).double()  # [n_f, K]
        if probs is None:
            probs = torch.zeros(len(x), logits.shape[1], dtype=torch.float64)
        probs[held] = torch.softmax(logits, dim=1)
    out = probs.float()
    return (out / out.sum(1, keepdim=True)).numpy()
