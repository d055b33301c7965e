"""The DiT testbed of depth pruning (issue 9, testbed 2): the cached Fashion-MNIST DiT, its sample quality and its
per-block cost.

Trains (or loads from ``$PRUNEKIT_CACHE/dit/``) the default `prunekit.depth.dit.DiT` (hidden 128, 12 blocks,
4 heads, patch 4 -> 49 tokens) and the project's Fashion-MNIST classifier, then measures:

- ``classifier``: the classifier's own test accuracy (10,000 test images);
- ``real-floor``: the classifier FID of 1,000 real training images (100 per class) against the test set, the
  floor a perfect generator would reach at this sample count;
- ``dit-g<G>``: DDIM-50 samples, 100 per class, guidance G: classifier FID against the test set and the
  classifier's accuracy on the samples of each class (FID on the classifier's 128-d penultimate features, NOT
  Inception-FID: comparable only within this file);
- ``speed``: DDIM sampling time of the full model against the same model with every other block removed
  (blocks 0, 2, 4, ...), alternated in the same process at one thread, median of the repeats.

    python bench/dit_testbed.py                    # every row (~25 min at one thread after training)
    python bench/dit_testbed.py --resume           # skip rows measured on the cached weights already
    python bench/dit_testbed.py --guidance 1 2     # the guidance scales of the dit-g rows
    python bench/dit_testbed.py --only speed --out /tmp/s.json && python bench/dit_testbed.py --merge /tmp/s.json

Writes bench/results/dit_testbed.json (``{"meta", "train", "rows": [{"id", ...}]}``) and bench/results/dit_testbed.md,
and a grid of samples bench/results/dit_testbed.png. Every row records ``weights``: the fingerprints
(`prunekit.depth.dit.weights_fingerprint`) of the DiT and classifier it was measured on, since a model retrained
on another machine or thread count lands under the same cache key with other weights.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
from torch import nn

from prunekit.depth import dit as D
from prunekit.depth import fid as F

RESULTS = Path(__file__).resolve().parent / "results"
N_PER_CLASS, STEPS = 100, 50
SECTIONS = ("classifier", "real-floor", "dit", "speed", "grid")


def _save(data: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)
    write_markdown(data, path.with_suffix(".md"))


def _every_other(model: D.DiT) -> D.DiT:
    half = D.DiT(model.config)
    half.load_state_dict(model.state_dict())
    half.blocks = nn.ModuleList(half.blocks[i] for i in range(0, len(half.blocks), 2))
    return half.eval()


def row_speed(model: D.DiT, *, n: int, steps: int, repeats: int) -> dict:
    half = _every_other(model)
    labels = torch.arange(10).repeat_interleave(max(1, n // 10))
    times = {"full": [], "half": []}
    for _ in range(repeats):  # alternate, so load changes on the shared machine hit both alike
        for name, m in (("full", model), ("half", half)):
            t = time.perf_counter()
            D.sample(m, labels, steps=steps, seed=0)
            times[name].append(time.perf_counter() - t)
    full, halfs = statistics.median(times["full"]), statistics.median(times["half"])
    return {"id": "speed", "samples": len(labels), "steps": steps, "repeats": repeats, "blocks_full": len(model.blocks),
            "blocks_half": len(half.blocks), "seconds_full": round(full, 3), "seconds_half": round(halfs, 3),
            "speedup": round(full / halfs, 3), "all_seconds": {k: [round(v, 3) for v in vs] for k, vs in times.items()}}


def write_grid(model: D.DiT, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images = D.sample(model, torch.arange(10).repeat_interleave(10), steps=STEPS, seed=1)  # [100, 1, 28, 28]
    grid = images.reshape(10, 10, 28, 28).permute(0, 2, 1, 3).reshape(280, 280)  # class per row
    fig, ax = plt.subplots(figsize=(5, 5.3))
    ax.imshow(grid.numpy(), cmap="gray", vmin=-1, vmax=1)
    ax.set_yticks([14 + 28 * i for i in range(10)], F.CLASSES, fontsize=7)
    ax.set_xticks([])
    ax.set_title(f"DiT ({len(model.blocks)} blocks), DDIM-{STEPS}, guidance 1", fontsize=9)
    fig.tight_layout()
    tmp = path.with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    tmp.replace(path)


def _fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def testbed_weights(dit) -> dict:
    """Fingerprints (`prunekit.depth.dit.weights_fingerprint`) of `dit` and of the cached classifier the FID uses.

    A DiT or classifier retrained on another machine or thread count lands under the same cache key with other
    weights, so result rows record these and ``--resume`` skips only rows measured on the cached ones."""
    return {"dit": D.weights_fingerprint(dit), "classifier": D.weights_fingerprint(F.classifier(progress=False))}


def weights_lines(rows: list[dict]) -> list[str]:
    """A markdown line naming the weights `rows` were measured on (``weights``), flagging a mix."""
    seen = sorted({json.dumps(r["weights"], sort_keys=True) if "weights" in r else "not recorded" for r in rows})
    if not seen:
        return []
    if len(seen) == 1:
        return [f"Weights fingerprints (`prunekit.depth.dit.weights_fingerprint`): {seen[0]}.", ""]
    return [f"**The rows were measured on different weights** ({'; '.join(seen)}; `weights` in the JSON): compare "
            "only rows measured on the same ones.", ""]


def write_markdown(data: dict, path: Path) -> None:
    rows = {r["id"]: r for r in data["rows"]}
    meta, train = data.get("meta", {}), data.get("train", {})
    lines = ["# DiT testbed (issue 9, testbed 2): class-conditional DiT on Fashion-MNIST", "",
             f"Model: {meta.get('model', '?')}. Machine: {meta.get('machine', '?')}.", "",
             *weights_lines(data["rows"]),
             "**FID here is a Fashion-MNIST-classifier FID, not Inception-FID**: the Frechet distance of Gaussian fits "
             "to the 128-d penultimate features of `prunekit.train.small_cnn` trained by the project; comparable only "
             f"between rows of this file (same classifier, same 10,000 real test images, {10 * N_PER_CLASS:,} samples per row), not with any "
             "published number.", ""]
    if train:
        lines += [f"Training: {train.get('steps')} steps of batch {train.get('batch_size')} (AdamW lr {train.get('lr')}, "
                  f"warm-up {train.get('warmup')}, cosine; EMA {train.get('ema_decay')}), {train.get('seconds', 0) / 60:.1f} "
                  f"min at {train.get('threads')} thread(s) on the shared machine; final loss (mean of the last 100 "
                  f"steps) {train.get('final_loss')}; loss every {train.get('log_every')} steps: "
                  f"{', '.join(str(x) for x in train.get('losses', [])[::5])} ... (every 5th shown).", ""]
    if "classifier" in rows:
        lines += [f"Classifier test accuracy: {rows['classifier']['test_accuracy']:.4f}.", ""]
    lines += ["| rows | FID (classifier features) | class accuracy | sampling s |", "| --- | ---: | ---: | ---: |"]
    if "real-floor" in rows:
        r = rows["real-floor"]
        lines.append(f"| 1,000 real training images (the floor) | {_fmt(r['fid'])} | {_fmt(r['class_accuracy'])} | |")
    for rid, r in sorted(rows.items()):
        if rid.startswith("dit-g"):
            lines.append(f"| DiT {r['blocks']} blocks, DDIM-{r['steps']}, guidance {r['guidance']} | {_fmt(r['fid'])} | "
                         f"{_fmt(r['class_accuracy'])} | {_fmt(r['seconds'], 1)} |")
    for rid, r in sorted(rows.items()):
        if rid.startswith("dit-g"):
            per = ", ".join(f"{c} {a:.2f}" for c, a in zip(F.CLASSES, r["per_class"]))
            lines += ["", f"Per-class accuracy (guidance {r['guidance']}): {per}."]
    if "speed" in rows:
        s = rows["speed"]
        lines += ["", "## Per-block cost", "",
                  f"DDIM-{s['steps']} sampling of {s['samples']} images at one thread, median of {s['repeats']} "
                  f"alternated runs: {s['blocks_full']} blocks {s['seconds_full']:.2f} s, every other block "
                  f"({s['blocks_half']} blocks) {s['seconds_half']:.2f} s: speedup **{s['speedup']:.2f}x** "
                  "(issue 9 target at half depth: >= 1.8x)."]
    if data.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in data["notes"]]]
    lines += ["", "![samples](dit_testbed.png)" if (path.parent / "dit_testbed.png").exists() else ""]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=" ".join(__doc__.split("\n\n")[0].split()))
    ap.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    ap.add_argument("--guidance", type=float, nargs="+", default=[1.0])
    ap.add_argument("--speed-samples", type=int, default=50)
    ap.add_argument("--speed-repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", choices=SECTIONS, action="append", help="run only these sections (repeatable)")
    ap.add_argument("--out", default=str(RESULTS / "dit_testbed.json"))
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="only merge the rows of another results file (a section run in parallel) into --out")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    path = Path(args.out)
    data = json.loads(path.read_text()) if path.is_file() else {"rows": []}
    if args.merge:
        other = json.loads(Path(args.merge).read_text())
        ids = {r["id"] for r in other["rows"]}
        data["rows"] = [r for r in data["rows"] if r["id"] not in ids] + other["rows"]
        for key in ("meta", "train"):
            data.setdefault(key, other.get(key, {}))
        _save(data, path)
        return 0
    wanted = set(args.only or SECTIONS)
    model = D.pretrained_dit(progress=False)
    clf = F.classifier(progress=False)
    weights = testbed_weights(model)
    done = {r["id"] for r in data["rows"] if r.get("weights") == weights} if args.resume else set()
    stale = sorted(r["id"] for r in data["rows"] if r.get("weights") != weights)
    if args.resume and stale:
        print(f"rows measured on other weights than the cached DiT and classifier ({weights}), re-run if selected: "
              f"{', '.join(stale)}", file=sys.stderr)

    def put(row: dict) -> None:
        row = row | {"weights": weights}
        data["rows"] = [r for r in data["rows"] if r["id"] != row["id"]] + [row]
        _save(data, path)
        print(json.dumps({k: v for k, v in row.items() if k != "per_class"}), flush=True)

    params = sum(p.numel() for p in model.parameters())
    data["meta"] = {"machine": f"{args.threads} CPU thread(s), torch {torch.__version__}, python {platform.python_version()}",
                    "model": f"DiT hidden {model.config.hidden}, {len(model.blocks)} blocks, {model.config.heads} heads, "
                             f"patch {model.config.patch} ({model.config.tokens} tokens), {params / 1e6:.2f}M parameters, "
                             f"label dropout {model.config.class_dropout}",
                    "cache_key": D.dit_cache_key(D.DiTConfig(), D.TrainConfig(), 0), "weights": weights}
    data["train"] = model.train_info.get("train_config", {}) | {
        k: model.train_info.get(k) for k in ("seconds", "final_loss", "losses", "log_every", "threads")}
    real, real_labels = D.fashion_images("test")
    if "classifier" not in done and "classifier" in wanted:
        put({"id": "classifier", "test_accuracy": clf.info["test_accuracy"], "recipe": clf.info["recipe"]})
    if "real-floor" not in done and "real-floor" in wanted:
        x, y = D.fashion_images("train")
        pick = torch.cat([torch.nonzero(y == c)[:N_PER_CLASS, 0] for c in range(10)])  # [1000]
        acc = F.class_accuracy(x[pick], y[pick])
        put({"id": "real-floor", "fid": F.fid(real, x[pick]), "class_accuracy": acc["accuracy"],
             "per_class": acc["per_class"], "n": len(pick)})
    # the first guidance scale and the speed row first: the rest is extra if time runs short
    for i, g in enumerate(args.guidance):
        rid = f"dit-g{g:g}"
        if rid not in done and "dit" in wanted:
            out = D.evaluate_dit(model, n_per_class=N_PER_CLASS, steps=STEPS, seed=0, guidance=g, real=real)
            put({"id": rid, "blocks": len(model.blocks)} | out)
        if i == 0 and "speed" not in done and "speed" in wanted:
            put(row_speed(model, n=args.speed_samples, steps=STEPS, repeats=args.speed_repeats))
    if "grid" in wanted and (not (path.parent / "dit_testbed.png").exists() or not args.resume):
        write_grid(model, path.parent / "dit_testbed.png")
        write_markdown(data, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
