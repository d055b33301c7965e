"""Data Diet on Fashion-MNIST: which 30/50/70% of the training set to keep, and Confident Learning on noisy labels.

One recipe for every run: `prunekit.train.small_cnn` (two conv blocks, ~0.2M parameters), SGD with Nesterov
momentum 0.9, weight decay 5e-4, cosine decay from --lr to 0, batch --batch-size, no augmentation, inputs
standardized with the training set's mean and std. Every run gets the same number of optimizer steps as
--epochs passes over the full 60k set: a 50% subset sees its examples twice as often. This is Data Diet's
protocol (mansheej/data_diet `scripts/run_keep_max_scores.py`: ``num_steps = 200 * 390`` whatever the subset
size), so a pruned run costs the same compute and only the data differs.

Scores (higher = harder; all methods keep the hardest examples, except random):

- el2n: ``‖softmax - onehot‖₂`` after --score-epoch epochs, averaged over --score-runs runs (seeds 1000+).
- grand: exact per-example gradient norm over all parameters (torch.func) at the same epoch and runs; with
  --last-layer-grand the cheaper last-layer approximation instead. Both are computed; the JSON gives their
  Spearman correlation.
- forgetting: Toneva's forgetting events over all --epochs of the same runs (never learned = inf).
- prototypes: cosine distance to the nearest of k=10 k-means centroids, in the 128-d penultimate layer of the
  first scoring run's final network (a supervised embedding: no self-supervised model is available offline;
  the clustering itself does not use labels).
- random: a seeded uniform subset.
- el2n_ccs (only with --ccs): EL2N through coverage-centric selection (Zheng et al. 2023: hardest 10% cut,
  50 equal-width strata), the high-pruning-rate remedy.

The scoring runs are ordinary full-data runs of the recipe, so their test accuracy is the full-data baseline.

Label noise: 20% of the training labels flipped uniformly to another class (seeded); out-of-fold probabilities
from `prunekit.train.cross_val_probs` (--cv-folds folds, same recipe); `find_label_issues(filter_by=
"prune_by_noise_rate")`; then the recipe trained on the noisy labels vs on the noisy labels minus the issues.

Writes bench/results/data_diet_fashion_mnist.{json,md,png}.

    python bench/data_diet_fashion_mnist.py            # the full run (~35 min on 2 CPU cores; --ccs: +5 min)
    python bench/data_diet_fashion_mnist.py --quick    # a 1-2 minute smoke test on 6k examples
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from prunekit import zoo
from prunekit.select import select_examples
from prunekit.train import accuracy, cross_val_probs, embed, score_runs, small_cnn, train
from prunekit.data.methods.prototypes import prototype_distance
from prunekit.data.methods.confident import find_label_issues  # CL: prunekit's own (same API as cleanlab's)

ROOT = Path(__file__).resolve().parent
METHODS = ("el2n", "grand", "forgetting", "prototypes", "random")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", type=int, default=None,
                   help="training seeds per (method, fraction) (default 3; --quick 1)")
    p.add_argument("--epochs", type=int, default=None,
                   help="full-data epochs of the recipe (pruned runs: same steps) (default 4; --quick 2)")
    p.add_argument("--ccs", action="store_true", help="also select with EL2N + coverage-centric strata (CCS)")
    p.add_argument("--fractions", type=float, nargs="+", default=[0.3, 0.5, 0.7], help="fractions kept")
    p.add_argument("--score-runs", type=int, default=None,
                   help="independent runs averaged by EL2N / GraNd / forgetting (default 3; --quick 2)")
    p.add_argument("--score-epoch", type=int, default=1, help="epoch at which EL2N and GraNd are taken")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--last-layer-grand", action="store_true", help="select with last-layer GraNd, not exact")
    p.add_argument("--noise", type=float, default=0.2, help="fraction of training labels flipped for the CL part")
    p.add_argument("--cv-folds", type=int, default=3)
    p.add_argument("--quick", action="store_true",
                   help="smoke test: 6k train / 2k test, 1 seed, 2 epochs, 2 score runs (unless given)")
    p.add_argument("--out", type=Path, default=ROOT / "results")
    args = p.parse_args(argv)
    # --quick sets what the user did not give (it replaced an explicit --epochs / --seeds / --score-runs)
    for name, full, quick in (("seeds", 3, 1), ("epochs", 4, 2), ("score_runs", 3, 2)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    return args


def load(quick: bool):
    x_tr, y_tr, x_te, y_te = zoo.fashion_mnist()  # uint8 [N, 28, 28], int64 [N]
    if quick:
        x_tr, y_tr, x_te, y_te = x_tr[:6000], y_tr[:6000], x_te[:2000], y_te[:2000]
    mean, std = x_tr.mean() / 255.0, x_tr.std() / 255.0

    def prep(x):
        return ((torch.from_numpy(x).float() / 255.0 - mean) / std).unsqueeze(1)  # [N, 1, 28, 28]

    return prep(x_tr), torch.from_numpy(y_tr), prep(x_te), torch.from_numpy(y_te)


def flip_labels(y: np.ndarray, fraction: float, k: int, seed: int) -> np.ndarray:
    """Exactly round(fraction * N) labels moved to a uniformly chosen *other* class."""
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(y), size=round(fraction * len(y)), replace=False)
    noisy = y.copy()
    noisy[idx] = (y[idx] + rng.integers(1, k, size=len(idx))) % k
    return noisy


def spearman(a: np.ndarray, b: np.ndarray) -> float:
    def ranks(v):
        v = np.where(np.isinf(v), np.nanmax(v[np.isfinite(v)]) + 1.0, v)
        order = np.argsort(v, kind="stable")
        r = np.empty(len(v))
        r[order] = np.arange(len(v))
        # average ranks over ties
        _, inv, counts = np.unique(v, return_inverse=True, return_counts=True)
        sums = np.bincount(inv, weights=r)
        return sums[inv] / counts[inv]

    return float(np.corrcoef(ranks(a), ranks(b))[0, 1])


def summary(values: list[float]) -> dict:
    arr = np.array(values) * 100
    return {"per_seed": [round(v, 3) for v in arr.tolist()], "mean": round(float(arr.mean()), 3),
            "std": round(float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, 3)}


def atomic_write(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def main(argv=None) -> dict:
    args = parse_args(argv)
    t_start = time.perf_counter()
    seconds = {}
    x, y, x_test, y_test = load(args.quick)
    n, k = len(x), 10
    steps = args.epochs * math.ceil(n / args.batch_size)  # every run: the full-data recipe's step count
    recipe = dict(batch_size=args.batch_size, lr=args.lr)
    print(f"Fashion-MNIST: {n} train / {len(x_test)} test; {args.epochs} epochs = {steps} steps per run",
          file=sys.stderr)

    def run(xs, ys, seed):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = small_cnn(k)
        train(model, xs, ys, steps=steps, seed=seed, progress=False, **recipe)
        return accuracy(model, x_test, y_test)

    # 1. scores from full-data runs (also the full-data baseline)
    t0 = time.perf_counter()
    scored = score_runs(lambda: small_cnn(k), x, y, runs=args.score_runs, epochs=args.epochs,
                        score_epoch=args.score_epoch, seed=1000, exact_grand=not args.last_layer_grand,
                        **recipe)
    full = [accuracy(m, x_test, y_test) for m in scored.models]
    seconds["score_runs"] = round(time.perf_counter() - t0, 1)
    seconds.update({f"score_runs.{key}": round(v, 1) for key, v in scored.seconds.items()})
    t0 = time.perf_counter()
    _, emb = embed(scored.models[0], x)  # [N, 128]: penultimate layer of a trained network
    proto = prototype_distance(emb, k=10, seed=0)
    seconds["prototypes"] = round(time.perf_counter() - t0, 1)
    grand_used = scored.grand_last_layer if args.last_layer_grand else scored.grand
    scores = {"el2n": scored.el2n, "grand": grand_used, "forgetting": scored.forgetting, "prototypes": proto}
    correlations = {f"{a}~{b}": round(spearman(scores[a], scores[b]), 3)
                    for i, a in enumerate(scores) for b in list(scores)[i + 1:]}
    if scored.grand is not None:
        correlations["grand_exact~grand_last_layer"] = round(spearman(scored.grand, scored.grand_last_layer), 3)
    print(f"full data: {np.mean(full) * 100:.2f}%; score correlations (Spearman): {correlations}", file=sys.stderr)

    # 2. train on the kept subsets
    t0 = time.perf_counter()
    methods = METHODS + (("el2n_ccs",) if args.ccs else ())
    results = {m: {} for m in methods}
    jobs = [(m, f, s) for m in methods for f in args.fractions for s in range(args.seeds)]
    for method, frac, seed in tqdm(jobs, desc="pruned runs"):
        if method == "random":
            keep = select_examples(np.zeros(n), frac, strategy="random", seed=seed)
        elif method == "el2n_ccs":  # Zheng et al. 2023 defaults: 50 strata; hardest 10% cut (fewer if needed)
            keep = select_examples(scores["el2n"], frac, strategy="ccs", seed=seed)
        else:
            keep = select_examples(scores[method], frac, strategy="hard")
        idx = torch.from_numpy(np.flatnonzero(keep))
        results[method].setdefault(str(frac), []).append(run(x[idx], y[idx], seed))
        acc = results[method][str(frac)][-1]
        tqdm.write(f"{method} keep {frac:.0%} seed {seed}: {acc * 100:.2f}%", file=sys.stderr)
    seconds["pruned_runs"] = round(time.perf_counter() - t0, 1)

    # 3. Confident Learning on 20% uniform label noise
    t0 = time.perf_counter()
    noisy = flip_labels(y.numpy(), args.noise, k, seed=0)
    flipped = noisy != y.numpy()
    probs = cross_val_probs(lambda: small_cnn(k), x, torch.from_numpy(noisy), folds=args.cv_folds,
                            epochs=args.epochs, seed=2000, **recipe)
    issues = find_label_issues(noisy, probs, filter_by="prune_by_noise_rate")
    seconds["cross_val_probs+cl"] = round(time.perf_counter() - t0, 1)
    t0 = time.perf_counter()
    clean_idx = torch.from_numpy(np.flatnonzero(~issues))
    noisy_t = torch.from_numpy(noisy)
    cl_noisy = [run(x, noisy_t, seed) for seed in tqdm(range(args.seeds), desc="noisy labels")]
    cl_clean = [run(x[clean_idx], noisy_t[clean_idx], seed) for seed in tqdm(range(args.seeds), desc="issues removed")]
    seconds["cl_runs"] = round(time.perf_counter() - t0, 1)
    seconds["total"] = round(time.perf_counter() - t_start, 1)

    out = {
        "config": {**vars(args), "out": str(args.out), "n_train": n, "n_test": len(x_test), "steps_per_run": steps,
                   "model": "prunekit.train.small_cnn", "optimizer": "SGD nesterov momentum 0.9, wd 5e-4, cosine",
                   "same_steps_for_pruned_runs": True, "grand": "last-layer" if args.last_layer_grand else "exact",
                   "prototype_embedding": "penultimate layer (128-d) of scoring run 0 after training; k=10, cosine",
                   "selection": "keep the hardest (highest score); random: uniform, seeded", "balanced": False},
        "full_data": summary(full),
        "pruned": {m: {f: summary(v) for f, v in r.items()} for m, r in results.items()},
        "score_correlations_spearman": correlations,
        "confident_learning": {
            "noise": args.noise, "flipped": int(flipped.sum()), "issues_found": int(issues.sum()),
            "precision": round(float((issues & flipped).sum() / max(issues.sum(), 1)), 4),
            "recall": round(float((issues & flipped).sum() / flipped.sum()), 4),
            "train_on_noisy": summary(cl_noisy), "train_without_issues": summary(cl_clean),
            "find_label_issues": find_label_issues.__module__,
        },
        "seconds": seconds,
        "machine": {"platform": platform.platform(), "python": platform.python_version(), "torch": torch.__version__,
                    "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads()},
    }
    stem = "data_diet_fashion_mnist" + ("_quick" if args.quick else "")
    atomic_write(args.out / f"{stem}.json", (json.dumps(out, indent=2) + "\n").encode())
    atomic_write(args.out / f"{stem}.md", markdown(out).encode())
    plot(out, args.out / f"{stem}.png")
    print(markdown(out))
    return out


def markdown(out: dict) -> str:
    cfg, full = out["config"], out["full_data"]
    fracs = sorted({f for r in out["pruned"].values() for f in r}, key=float)
    lines = [
        "# Data Diet on Fashion-MNIST (prunekit)", "",
        f"small CNN, {cfg['epochs']} epochs of the full set = {cfg['steps_per_run']} steps for every run (pruned "
        f"runs: same steps), batch {cfg['batch_size']}, lr {cfg['lr']}; test accuracy % mean ± std over "
        f"{cfg['seeds']} seeds. GraNd: {cfg['grand']}. Prototypes: {cfg['prototype_embedding']}.", "",
        f"Full data ({cfg['n_train']} examples): **{full['mean']:.2f} ± {full['std']:.2f}**", "",
        "| method | " + " | ".join(f"keep {float(f):.0%}" for f in fracs) + " |",
        "|---|" + "---|" * len(fracs),
    ]
    for method, r in out["pruned"].items():
        lines.append(f"| {method} | " + " | ".join(f"{r[f]['mean']:.2f} ± {r[f]['std']:.2f}" for f in fracs) + " |")
    cl = out["confident_learning"]
    lines += [
        "", f"## Confident Learning, {cl['noise']:.0%} uniform label noise ({cl['flipped']} flipped)", "",
        f"`find_label_issues` ({cl['find_label_issues']}, prune_by_noise_rate) on {cfg['cv_folds']}-fold "
        f"out-of-sample probabilities: {cl['issues_found']} issues, precision {cl['precision']:.3f}, recall "
        f"{cl['recall']:.3f}.", "",
        "| training labels | test accuracy % |", "|---|---|",
        f"| noisy | {cl['train_on_noisy']['mean']:.2f} ± {cl['train_on_noisy']['std']:.2f} |",
        f"| noisy, issues removed | {cl['train_without_issues']['mean']:.2f} ± "
        f"{cl['train_without_issues']['std']:.2f} |",
        "", "Score rank correlations (Spearman): "
        + ", ".join(f"{k} {v}" for k, v in out["score_correlations_spearman"].items()),
        "", f"Wall time: {out['seconds']['total'] / 60:.1f} min on {out['machine']['cpu_count']} CPU cores "
        f"({out['machine']['torch_threads']} torch threads). Seconds: {out['seconds']}", "",
    ]
    return "\n".join(lines)


def plot(out: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    full = out["full_data"]
    ax.axhline(full["mean"], color="black", lw=1, label=f"full data {full['mean']:.2f}")
    ax.axhspan(full["mean"] - full["std"], full["mean"] + full["std"], color="black", alpha=0.08)
    for method, r in out["pruned"].items():
        fracs = sorted(r, key=float)
        ax.errorbar([float(f) * 100 for f in fracs], [r[f]["mean"] for f in fracs],
                    yerr=[r[f]["std"] for f in fracs], marker="o", capsize=3, label=method)
    ax.set_xlabel("% of training set kept (same steps)")
    ax.set_ylabel("test accuracy %")
    ax.set_title("Fashion-MNIST, small CNN: keep the hardest examples")
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}.png")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


if __name__ == "__main__":
    main()
