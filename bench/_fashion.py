"""Fashion-MNIST with 20% of its training labels flipped, and out-of-fold probabilities of a small CNN on it.

Used by `label_issues_vs_cleanlab.py`; cached under ``$PRUNEKIT_CACHE/bench/`` (keyed by every setting) since
the cross-validation is the slow part (minutes on 2 CPUs).
"""

from __future__ import annotations

import hashlib
import json

import numpy as np


def flip_labels(y: np.ndarray, rate: float, *, classes: int, seed: int) -> np.ndarray:
    """A copy of `y` with `rate` of the examples (chosen at random) moved to another class, uniformly."""
    rng = np.random.default_rng(seed)
    noisy = y.copy()
    chosen = rng.choice(len(y), size=int(round(rate * len(y))), replace=False)
    noisy[chosen] = (y[chosen] + rng.integers(1, classes, size=len(chosen))) % classes
    return noisy


def noisy_cv_probs(*, rate: float = 0.2, folds: int = 4, epochs: int = 4, seed: int = 0, quick: bool = False) -> dict:
    """``{"clean", "noisy", "probs", "description"}`` for the Fashion-MNIST training split."""
    import torch

    from prunekit import train, zoo

    x, y, _, _ = zoo.fashion_mnist()
    if quick:
        x, y, epochs = x[:6000], y[:6000], 2
    settings = {"rate": rate, "folds": folds, "epochs": epochs, "seed": seed, "n": len(y), "torch": torch.__version__}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]
    path = zoo.cache_dir() / "bench" / f"fashion_noisy_cv_{key}.npz"
    noisy = flip_labels(y, rate, classes=10, seed=seed)
    description = (f"Fashion-MNIST train ({len(y)}), {rate:.0%} labels flipped uniformly to another class (seed {seed}); "
                   f"out-of-fold probabilities of prunekit.train.small_cnn, {folds} folds x {epochs} epochs")
    if path.exists():
        probs = np.load(path)["probs"]
    else:
        xt = torch.from_numpy(x.astype(np.float32)[:, None] / 255.0)  # [N, 1, 28, 28]
        with torch.random.fork_rng(devices=[]):
            probs = train.cross_val_probs(lambda: train.small_cnn(10), xt, torch.from_numpy(noisy), folds=folds,
                                          epochs=epochs, seed=seed, progress=True)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp.npz")
        np.savez(tmp, probs=probs)
        tmp.replace(path)
    return {"clean": y, "noisy": noisy, "probs": probs.astype(np.float32), "description": description}
