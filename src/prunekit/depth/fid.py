"""Sample quality of the Fashion-MNIST DiT: a Frechet distance on a Fashion-MNIST classifier's features, and
that classifier's accuracy on generated images of each class.

THIS IS NOT INCEPTION-FID. The Frechet Inception Distance (Heusel et al., "GANs Trained by a Two Time-Scale
Update Rule Converge to a Local Nash Equilibrium", arXiv:1706.08500) fits a Gaussian to the 2048-d pool
features of an ImageNet Inception-v3 for real and for generated images and reports
``||mu_r - mu_g||^2 + Tr(S_r + S_g - 2 (S_r S_g)^{1/2})``. Here the same formula runs on the 128-d
penultimate-layer features (the input of the last Linear) of `prunekit.train.small_cnn` trained by this
project on the Fashion-MNIST training set (cached under ``$PRUNEKIT_CACHE/dit/``). Its numbers are only
comparable with each other (same classifier, same real set, same sample count); they are not comparable with
any published FID.

The matrix square root is taken the stable symmetric way: ``Tr (S_r S_g)^{1/2} = Tr (A S_g A)^{1/2}`` with
``A = S_r^{1/2}``, both from symmetric eigendecompositions (negative round-off eigenvalues clipped to 0), in
float64, instead of ``scipy.linalg.sqrtm`` of the non-symmetric product.

>>> import torch
>>> g = torch.Generator().manual_seed(0)
>>> a = torch.randn(500, 8, generator=g, dtype=torch.float64)
>>> round(frechet_distance(a, a), 6)
0.0
>>> frechet_distance(a, a + 1.0) > 7.9
True
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch
from torch import nn

from prunekit.errors import InputError, int_at_least

__all__ = ["classifier", "features", "frechet_distance", "fid", "class_accuracy", "CLASSES"]

CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_RECIPE = {"arch": "small_cnn", "epochs": 8, "batch_size": 128, "lr": 0.05, "seed": 0, "inputs": "[-1,1]",
           "version": 1}
_LOADED: dict[str, nn.Module] = {}


def _key() -> str:
    return hashlib.sha256(json.dumps(_RECIPE, sort_keys=True).encode()).hexdigest()[:16]


def classifier(*, train_if_missing: bool = True, progress: bool = True) -> nn.Module:
    """The project's Fashion-MNIST classifier (`prunekit.train.small_cnn`, inputs ``[N, 1, 28, 28]`` in [-1, 1]).

    Trained once (8 epochs of SGD, seed 0; a few minutes on one CPU thread) and cached as
    ``$PRUNEKIT_CACHE/dit/classifier-<key>/``; ``model.info`` holds its test accuracy.
    """
    from safetensors.torch import load_file, save_file

    from prunekit.depth.dit import fashion_images
    from prunekit.train import accuracy, small_cnn, train
    from prunekit.zoo import _atomic_dir, cache_dir

    folder = cache_dir() / "dit" / f"classifier-{_key()}"
    if str(folder) in _LOADED:
        return _LOADED[str(folder)]
    if not folder.is_dir():
        if not train_if_missing:
            raise InputError(f"no trained classifier at {folder}; call classifier(train_if_missing=True)")
        x, y = fashion_images("train")
        xt, yt = fashion_images("test")
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(_RECIPE["seed"])
            model = small_cnn()
        train(model, x, y, epochs=_RECIPE["epochs"], batch_size=_RECIPE["batch_size"], lr=_RECIPE["lr"],
              seed=_RECIPE["seed"], progress=progress)
        info = {"recipe": _RECIPE, "test_accuracy": round(accuracy(model, xt, yt), 5)}

        def build(tmp: Path) -> None:
            save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp / "model.safetensors"))
            (tmp / "info.json").write_text(json.dumps(info, indent=1))

        _atomic_dir(folder, build)
    model = small_cnn()
    model.load_state_dict(load_file(str(folder / "model.safetensors")))
    model.info = json.loads((folder / "info.json").read_text())
    model.eval().requires_grad_(False)
    _LOADED[str(folder)] = model
    return model


def _check_images(images, name: str) -> torch.Tensor:
    from prunekit.depth.dit import _check_images as check

    return check(images, name)


def features(images: torch.Tensor, *, model: nn.Module | None = None, batch_size: int = 500) -> torch.Tensor:
    """Penultimate-layer features ``[N, 128]`` (float64) of ``images [N, 1, 28, 28]`` in [-1, 1].

    `model`: any classifier whose last registered ``nn.Linear`` gives its output (default: `classifier()`).
    """
    from prunekit.train import embed

    images = _check_images(images, "images")
    model = classifier() if model is None else model
    return embed(model, images, batch_size=int_at_least(batch_size, "batch_size", 1))[1].double()  # [N, F]


def _gaussian(f: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    f = f.detach().cpu().double().numpy()
    return f.mean(0), np.cov(f, rowvar=False)  # [F], [F, F]


def _sqrt_psd(m: np.ndarray) -> np.ndarray:
    w, v = np.linalg.eigh((m + m.T) / 2)
    return (v * np.sqrt(np.clip(w, 0, None))) @ v.T


def frechet_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frechet distance between Gaussian fits of feature sets ``a [N, F]`` and ``b [M, F]``."""
    for name, f in (("a", a), ("b", b)):
        if not isinstance(f, torch.Tensor) or f.ndim != 2 or len(f) < 2:
            raise InputError(f"{name} must be a tensor of features [N, F] with N >= 2")
        if not torch.isfinite(f).all():
            raise InputError(f"{name} contains NaN or infinite features")
    if a.shape[1] != b.shape[1]:
        raise InputError(f"feature sizes differ: {a.shape[1]} vs {b.shape[1]}")
    mu1, s1 = _gaussian(a)
    mu2, s2 = _gaussian(b)
    root = _sqrt_psd(s1)
    cross = np.sqrt(np.clip(np.linalg.eigvalsh(root @ s2 @ root), 0, None)).sum()  # Tr (S1 S2)^{1/2}
    return float(max(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * cross, 0.0))


def fid(real: torch.Tensor, fake: torch.Tensor, *, model: nn.Module | None = None) -> float:
    """Fashion-MNIST-classifier FID (NOT Inception-FID) between image sets ``[N, 1, 28, 28]`` in [-1, 1]."""
    real, fake = _check_images(real, "real images"), _check_images(fake, "fake images")
    if len(real) < 2 or len(fake) < 2:
        raise InputError("FID needs at least 2 real and 2 generated images (use hundreds or more)")
    return frechet_distance(features(real, model=model), features(fake, model=model))


def class_accuracy(images: torch.Tensor, labels, *, model: nn.Module | None = None) -> dict:
    """The classifier's accuracy on ``images`` generated for classes ``labels [N]``.

    Returns ``{"accuracy": float, "per_class": [K floats, NaN where a class has no image]}``.
    """
    from prunekit.train import predict

    images = _check_images(images, "images")
    model = classifier() if model is None else model
    labels = torch.as_tensor(labels)
    if labels.shape != (len(images),) or labels.is_floating_point() or labels.dtype == torch.bool:
        raise InputError(f"labels must be integer classes of shape [{len(images)}], got {labels.dtype} "
                         f"{tuple(labels.shape)}")
    logits = predict(model, images)  # [N, K]
    k, pred = logits.shape[1], logits.argmax(1)  # K, [N]
    if int(labels.min()) < 0 or int(labels.max()) >= k:
        raise InputError(f"labels must be classes 0..{k - 1}, got {int(labels.min())}..{int(labels.max())}")
    hit = (pred == labels).double()  # [N]
    per_class = [float(hit[labels == c].mean()) if bool((labels == c).any()) else float("nan") for c in range(k)]
    return {"accuracy": float(hit.mean()), "per_class": per_class}
