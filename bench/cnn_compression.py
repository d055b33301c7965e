"""CNN compression on Fashion-MNIST: UDFC (data-free pruning + quantization) and TRP (trained rank pruning).

Testbed: `prunekit.cnn.resnet.testbed` (ResNet-20 widths 16/32/64, stride-2 stem, 3 epochs of SGD on the full
60k training images, one per seed, cached under $PRUNEKIT_CACHE/models). Everything is measured on the full
10k test images; CPU time is the median of 10 no-grad forward passes of a batch of 256 on ONE thread.

Rows (each seed is a separately trained testbed; the table gives mean +- std over seeds):
- unpruned: the testbed.
- UDFC at 30% / 50% of every block's conv1 channels removed x 8 / 6 / 4-bit weights (every Conv2d and Linear,
  per-channel uniform), against no compensation and Neuron Merging (same channels, same quantizer); plus
  pruning only (fp32) and quantization only (0%). No data and no fine-tuning in any of them.
- TRP (channel scheme, period 20, energy 0.9, lambda 3e-4, the testbed recipe otherwise), trained from scratch
  per seed and decomposed at the ranks of its last substitution, against the normally trained testbed of the
  same seed decomposed by truncated SVD to the same FLOPs (one energy threshold for all layers, bisected).
  Other energies (``--trp-energy``) and the spatial scheme (``--trp-scheme spatial``) get rows of their own.
  Each TRP model also gets a "split where faster" row: the same model with `split_where_faster` applied
  (layers whose two thin convs ran slower than one conv of the same rank, on this machine and a batch of 256,
  fused back; same function, more FLOPs, less time).
- TRP's energy threshold is chosen on validation images (``--select-energy``): every candidate and the unpruned
  recipe are trained on the training images minus 5,000 held out (a fixed permutation) and scored on those;
  the largest FLOP reduction (at least 2x) within 1 point of the unpruned model wins. The test images are not
  used to choose.

    python bench/cnn_compression.py                  # everything, resumable (rows are cached in the JSON)
    python bench/cnn_compression.py --seeds 1        # seed 0 only
    python bench/cnn_compression.py --only udfc      # one section: udfc or trp
    python bench/cnn_compression.py --only trp --seed-from 2 --out part2.json   # one seed in another process,
    python bench/cnn_compression.py --merge part2.json                          # ... merged afterwards
    python bench/cnn_compression.py --retime         # all CPU times again, interleaved (after everything)
    python bench/cnn_compression.py --select-energy 0.9,0.93,0.95 --select-seeds 3   # TRP's energy, on validation
    python bench/cnn_compression.py --only trp --trp-energy 0.93 --trp-scheme spatial  # spatial-scheme rows

Writes bench/results/cnn_compression.json (``{"rows": [{"method", "setting", "accuracy", "params", "flops",
"ms_per_batch", ...}], "runs": [...]}``) and bench/results/cnn_compression.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "cnn_compression"
RATIOS, BITS, UDFC_METHODS = (0.3, 0.5), (8, 6, 4), ("udfc", "merge", "none")
TRP_OPTS = dict(period=20, energy=0.9, nuclear=3e-4, scheme="channel")


FASTER = "split where faster"


def _variant(energy: float, scheme: str) -> str:
    return (" spatial" if scheme == "spatial" else "") + ("" if energy == TRP_OPTS["energy"] else f" e={energy:g}")


def trp_setting(energy: float, scheme: str = TRP_OPTS["scheme"], faster: bool = False) -> str:
    return ", ".join(["decomposed", *_variant(energy, scheme).split(), *([FASTER] if faster else [])])


def svd_setting(energy: float, scheme: str = TRP_OPTS["scheme"]) -> str:
    return "same FLOPs as TRP" + _variant(energy, scheme)


def setting_energy(setting: str) -> float:
    m = re.search(r"e=([0-9.]+)", setting)
    return float(m.group(1)) if m else TRP_OPTS["energy"]


def setting_scheme(setting: str) -> str:
    return "spatial" if "spatial" in setting else "channel"


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def measure(model, xte, yte) -> dict:
    from prunekit import train as tr
    from prunekit.cnn.flops import count_flops, count_params, ms_per_batch

    return {"accuracy": tr.accuracy(model, xte, yte), "params": count_params(model),
            "flops": count_flops(model, (1, 28, 28)), "ms_per_batch": ms_per_batch(model, xte[:256], repeats=10)}


def split(holdout: int):
    """``(x_fit, y_fit, x_eval, y_eval)``: the 60k training images minus `holdout` validation images (a fixed
    permutation, seed 1234) and those validation images; with ``holdout == 0`` the full training set and the
    10k test images."""
    from prunekit.cnn import resnet

    xtr, ytr, xte, yte = resnet.fashion_tensors()
    if not holdout:
        return xtr, ytr, xte, yte
    perm = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(1234))
    fit_idx, val_idx = perm[:-holdout], perm[-holdout:]
    return xtr[fit_idx], ytr[fit_idx], xtr[val_idx], ytr[val_idx]


def _suffix(epochs: int, seed: int, holdout: int) -> str:
    return f"-fmnist-e{epochs}-s{seed}" + (f"-val{holdout}" if holdout else "")


def trp_model(seed: int, epochs: int, energy: float = TRP_OPTS["energy"], *, holdout: int = 0,
              scheme: str = TRP_OPTS["scheme"]):
    """TRP-trained and decomposed testbed for `seed`, cached like the testbed (`holdout` > 0: trained without the
    validation images of `split`; its metadata's accuracies are then on them, not on the test set)."""
    from prunekit import train as tr
    from prunekit import zoo
    from prunekit.cnn import resnet
    from prunekit.cnn.trp import TRP

    o = dict(TRP_OPTS, energy=energy, scheme=scheme)
    folder = zoo.cache_dir() / "models" / (f"cnn-trp-{o['scheme']}-p{o['period']}-e{o['energy']}-l{o['nuclear']}"
                                           + _suffix(epochs, seed, holdout))
    if (folder / "config.json").is_file():
        meta = json.loads((folder / "config.json").read_text())["metadata"]
        return resnet.load_model(folder), meta
    xfit, yfit, xev, yev = split(holdout)
    w = resnet.TESTBED["widths"]
    model = tr.seeded_model(lambda: resnet.ResNet(widths=w, blocks=resnet.TESTBED["blocks"]), seed)
    cb = TRP(model, **o)
    t0 = time.perf_counter()
    resnet.fit(model, xfit, yfit, epochs=epochs, seed=seed, callbacks=[cb], progress=False)
    seconds = time.perf_counter() - t0
    before = tr.accuracy(model, xev, yev)
    ranks = cb.decompose()
    meta = {**o, "epochs": epochs, "seed": seed, "holdout": holdout, "train_seconds": seconds,
            "accuracy_before_decomposition": before, "ranks": ranks, "substitutions": cb.substitutions}
    if holdout:
        meta["val_accuracy"] = tr.accuracy(model, xev, yev)
    log(f"TRP e={energy:g} {scheme} seed {seed} holdout {holdout}: {seconds:.0f} s, accuracy before decomposition "
        f"{before:.4f}, ranks {ranks}")
    resnet.save_model(model, folder, metadata=meta, overwrite=True)
    return model, meta


def unpruned_holdout(seed: int, epochs: int, holdout: int):
    """The testbed recipe trained without `split`'s validation images: ``(model, validation accuracy)``."""
    from prunekit import train as tr
    from prunekit import zoo
    from prunekit.cnn import resnet

    folder = zoo.cache_dir() / "models" / ("cnn-resnet20s2-" + "-".join(map(str, resnet.TESTBED["widths"]))
                                           + _suffix(epochs, seed, holdout))
    if (folder / "config.json").is_file():
        return resnet.load_model(folder), json.loads((folder / "config.json").read_text())["metadata"]["val_accuracy"]
    xfit, yfit, xval, yval = split(holdout)
    model = tr.seeded_model(lambda: resnet.ResNet(widths=resnet.TESTBED["widths"], blocks=resnet.TESTBED["blocks"]),
                            seed)
    resnet.fit(model, xfit, yfit, epochs=epochs, seed=seed, progress=False)
    acc = tr.accuracy(model, xval, yval)
    log(f"unpruned seed {seed} holdout {holdout}: validation accuracy {acc:.4f}")
    resnet.save_model(model, folder, metadata={"seed": seed, "epochs": epochs, "holdout": holdout, "val_accuracy": acc},
                      overwrite=True)
    return model, acc


def select_energy(energies, seeds, epochs: int, holdout: int) -> dict:
    """Choose TRP's energy threshold on validation images held out of the training set, never on the test set:
    the candidate with the largest FLOP reduction (at least 2x) whose mean validation accuracy over `seeds` is
    within 1 point of the unpruned model's (trained on the same images); if none is, the closest one."""
    from prunekit import train as tr
    from prunekit.cnn.flops import count_flops

    _, _, xval, yval = split(holdout)
    cands = []
    base = [unpruned_holdout(s, epochs, holdout)[1] for s in seeds]
    full = None
    for e in energies:
        accs, flops = [], []
        for s in seeds:
            model, _ = trp_model(s, epochs, e, holdout=holdout)
            accs.append(tr.accuracy(model, xval, yval))
            flops.append(count_flops(model, (1, 28, 28)))
            if full is None:
                full = count_flops(unpruned_holdout(s, epochs, holdout)[0], (1, 28, 28))
        cands.append({"energy": e, "val_accuracy": statistics.mean(accs), "val_accuracies": accs,
                      "flop_reduction": full / statistics.mean(flops),
                      "drop_points": 100 * (statistics.mean(base) - statistics.mean(accs))})
    ok = [c for c in cands if c["flop_reduction"] >= 2 and c["drop_points"] <= 1]
    chosen = max(ok, key=lambda c: c["flop_reduction"]) if ok else min(cands, key=lambda c: c["drop_points"])
    return {"scheme": TRP_OPTS["scheme"], "holdout": holdout, "seeds": list(seeds), "unpruned_val_accuracy": statistics.mean(base),
            "unpruned_val_accuracies": base, "candidates": cands, "chosen": chosen["energy"],
            "within_1_point": bool(ok)}


def load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"runs": []}


def save(path: Path, data: dict) -> None:
    data["rows"] = aggregate(data["runs"])
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, path)
    (path.with_suffix(".md")).write_text(markdown(data))


def aggregate(runs: list[dict]) -> list[dict]:
    groups: dict[tuple, list[dict]] = {}
    for r in runs:
        groups.setdefault((r["method"], r["setting"]), []).append(r)
    rows = []
    for (method, setting), rs in groups.items():
        acc = [r["accuracy"] for r in rs]
        rows.append({"method": method, "setting": setting, "accuracy": statistics.mean(acc),
                     "accuracy_std": statistics.stdev(acc) if len(acc) > 1 else 0.0, "seeds": sorted(r["seed"] for r in rs),
                     "params": round(statistics.mean(r["params"] for r in rs)),
                     "flops": round(statistics.mean(r["flops"] for r in rs)),
                     "ms_per_batch": statistics.mean(r["ms_per_batch"] for r in rs),
                     **({"extra": rs[0]["extra"]} if rs[0].get("extra") else {})})
    return rows


def _find(rows, method, setting):
    return next((r for r in rows if r["method"] == method and r["setting"] == setting), None)


def _paired(runs: list[dict], a: tuple, b: tuple) -> str:
    """Per-seed accuracy differences a - b in points, for the seeds both have."""
    acc = {}
    for r in runs:
        acc[(r["method"], r["setting"], r["seed"])] = r["accuracy"]
    seeds = sorted({r["seed"] for r in runs if (*a, r["seed"]) in acc and (*b, r["seed"]) in acc})
    return ", ".join(f"seed {s}: {100 * (acc[(*a, s)] - acc[(*b, s)]):+.2f}" for s in seeds)


def targets(rows: list[dict], runs: list[dict] = (), selection: dict | None = None) -> list[str]:
    out = []
    u, m, n = (_find(rows, k, "30% + 6-bit") for k in ("UDFC", "Neuron Merging", "no compensation"))
    if u and m and n:
        du, dm = 100 * (u["accuracy"] - n["accuracy"]), 100 * (u["accuracy"] - m["accuracy"])
        ok = du >= 5 and dm > 0
        out.append(f"- UDFC at 30% + 6 bits: {100 * u['accuracy']:.2f}% vs no compensation {100 * n['accuracy']:.2f}% "
                   f"({du:+.2f} points; target >= +5) and Neuron Merging {100 * m['accuracy']:.2f}% ({dm:+.2f}): "
                   f"**{'met' if ok else 'missed'}** (per seed vs no compensation: "
                   f"{_paired(runs, ('UDFC', '30% + 6-bit'), ('no compensation', '30% + 6-bit'))}; vs Neuron Merging: "
                   f"{_paired(runs, ('UDFC', '30% + 6-bit'), ('Neuron Merging', '30% + 6-bit'))})")
    base = _find(rows, "unpruned", "fp32")
    for t in [r for r in rows if r["method"] == "TRP" and FASTER not in r["setting"]]:
        s = _find(rows, "SVD after training", svd_setting(setting_energy(t["setting"]), setting_scheme(t["setting"])))
        if not (base and s):
            continue
        red = base["flops"] / t["flops"]
        d_base, d_svd = 100 * (t["accuracy"] - base["accuracy"]), 100 * (t["accuracy"] - s["accuracy"])
        ok = red >= 2 and d_base >= -1 and d_svd >= 2
        how = ""
        if selection:
            chosen = (selection["chosen"] == setting_energy(t["setting"])
                      and selection.get("scheme", "channel") == setting_scheme(t["setting"]))
            how = "; the energy chosen on validation images" if chosen else "; not the setting chosen on validation images"
        out.append(f"- TRP ({t['setting']}, {len(t['seeds'])} seeds{how}): {red:.2f}x fewer FLOPs, {100 * t['accuracy']:.2f}% vs unpruned {100 * base['accuracy']:.2f}% "
                   f"({d_base:+.2f} points; target >= -1) and vs SVD after training {100 * s['accuracy']:.2f}% "
                   f"({d_svd:+.2f}; target >= +2), FLOP target >= 2x: **{'met' if ok else 'missed'}** (per seed vs "
                   f"the same seed's unpruned: {_paired(runs, ('TRP', t['setting']), ('unpruned', 'fp32'))})")
        pts = sorted((r["flops"], r["ms_per_batch"]) for r in (base, t, s))
        mono = all(b[1] >= a[1] for i, a in enumerate(pts) for b in pts[i + 1:] if b[0] > 1.05 * a[0])  # FLOPs apart
        out.append(f"- CPU time vs FLOPs (unpruned / TRP {t['setting']} / its SVD rows): "
                   + ", ".join(f"{f / 1e6:.2f} MFLOPs -> {ms:.1f} ms" for f, ms in pts)
                   + f": **{'falls with FLOPs' if mono else 'does not fall monotonically'}**")
        f = _find(rows, "TRP", t["setting"] + ", " + FASTER)
        if f:
            out.append(f"- TRP {t['setting']}, split only where the split runs faster (same function): "
                       f"{f['flops'] / 1e6:.2f} MFLOPs -> {f['ms_per_batch']:.1f} ms ({base['ms_per_batch'] / f['ms_per_batch']:.2f}x "
                       f"faster than unpruned; split everywhere: {t['ms_per_batch'] / f['ms_per_batch']:.2f}x its time), "
                       f"accuracy {100 * f['accuracy']:.2f}% (split everywhere {100 * t['accuracy']:.2f}%)")
    arch = sorted({(r["flops"], round(r["ms_per_batch"], 1), "unpruned" if r["method"] == "unpruned" else
                    f"{r['method']} {r['setting']}") for r in rows
                   if r["method"] in ("unpruned", "TRP") or (r["method"] == "UDFC" and r["setting"].endswith("8-bit")
                                                             and not r["setting"].startswith("0%"))})
    if arch:
        slower = [(a, b) for i, a in enumerate(arch) for b in arch[i + 1:] if b[0] > 1.05 * a[0] and b[1] < a[1]]
        out.append("- Every architecture by FLOPs (MFLOPs -> ms): " + "; ".join(f"{lab} {f / 1e6:.2f} -> {ms:.1f}"
                                                                          for f, ms, lab in arch)
                   + (f". Pairs where more FLOPs ran faster: {len(slower)} of {len(arch) * (len(arch) - 1) // 2}; "
                      + _explain(slower) if slower else ": monotone"))
    pr = [(r["flops"], r["ms_per_batch"]) for r in rows if r["method"] == "UDFC" and r["setting"].endswith("8-bit")
          and not r["setting"].startswith("0%")]
    if base and pr:
        out.append("- UDFC pruned models (8-bit rows; quantization is simulated in fp32, so bits do not change time): "
                   + ", ".join(f"{f / 1e6:.2f} MFLOPs -> {ms:.1f} ms" for f, ms in sorted(pr))
                   + f"; unpruned {base['flops'] / 1e6:.2f} MFLOPs -> {base['ms_per_batch']:.1f} ms")
    return out


def _explain(pairs) -> str:
    """Sort pairs (fewer-FLOPs model slower than a more-FLOPs one) by cause: channel-scheme TRP splits on the
    cheap side (thin convs cost more per FLOP), a gap under 1 ms (timing noise), or anything else."""
    thin = sum(1 for a, _ in pairs if a[2].startswith("TRP") and "spatial" not in a[2])
    noise = sum(1 for a, b in pairs if not (a[2].startswith("TRP") and "spatial" not in a[2]) and a[1] - b[1] < 1.0)
    other = len(pairs) - thin - noise
    return (f"{thin} have channel-scheme TRP convs on the fewer-FLOPs side, {noise} differ by under 1 ms"
            + (f", {other} other" if other else ""))


def markdown(data: dict) -> str:
    rows = data["rows"]
    lines = ["# CNN compression on Fashion-MNIST (ResNet-20-style testbed)", "",
             data.get("setup", ""), "", data.get("timing", "CPU times measured row by row (shared, loaded machine)."), "",
             "| method | setting | test accuracy % (mean ± std) | seeds | params | FLOPs (MACs) | CPU ms / batch 256 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} | "
                     f"{len(r['seeds'])} | {r['params']:,} | {r['flops']:,} | {r['ms_per_batch']:.1f} |")
    sel = data.get("selection")
    if sel:
        lines += ["", "## TRP's energy threshold, chosen on validation images", "",
                  f"Each candidate trained on the training images minus {sel['holdout']} held out (seeds "
                  f"{', '.join(map(str, sel['seeds']))}; {sel.get('scheme', 'channel')} scheme), scored on those "
                  "held-out images; the unpruned recipe trained "
                  f"on the same images: {100 * sel['unpruned_val_accuracy']:.2f}%. Rule: the largest FLOP reduction "
                  "(at least 2x) within 1 point of it. The test images play no part.", "",
                  "| energy | validation accuracy % | drop (points) | FLOP reduction |", "| --- | --- | --- | --- |"]
        for c in sel["candidates"]:
            lines.append(f"| {c['energy']:g} | {100 * c['val_accuracy']:.2f} | {c['drop_points']:+.2f} | "
                         f"{c['flop_reduction']:.2f}x |")
        lines += ["", f"Chosen: e = {sel['chosen']:g}" + ("" if sel["within_1_point"] else
                                                         " (no candidate was within 1 point; the closest)") + "."]
    lines += ["", "## Targets", "", *targets(rows, data["runs"], sel), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds --seed-from .. seeds-1 (default 0, 1, 2)")
    p.add_argument("--seed-from", type=int, default=0, help="first seed (parallel sections: one process per seed)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the testbed's)")
    p.add_argument("--only", choices=("udfc", "trp"), default=None)
    p.add_argument("--trp-energy", type=float, default=TRP_OPTS["energy"],
                   help="TRP's energy threshold for this run's TRP rows (default 0.9; others get their own rows)")
    p.add_argument("--trp-scheme", choices=("channel", "spatial"), default=TRP_OPTS["scheme"],
                   help="TRP's decomposition scheme for this run's TRP rows (default channel)")
    p.add_argument("--out", default=str(RESULTS / f"{NAME}.json"))
    p.add_argument("--retime", action="store_true",
                   help="re-measure CPU time of every distinct architecture round-robin (fair under a varying load) and exit")
    p.add_argument("--merge", default=None, help="add the runs of another results file (a parallel section) and exit")
    p.add_argument("--select-energy", default=None, metavar="E1,E2,...",
                   help="choose TRP's energy among these on validation images held out of training (see --holdout, "
                        "--select-seeds), record the choice and exit")
    p.add_argument("--select-seeds", type=int, default=1, help="seeds 0 .. N-1 for --select-energy (default 1)")
    p.add_argument("--holdout", type=int, default=5000, help="validation images held out for --select-energy")
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from prunekit.cnn import resnet
    from prunekit.cnn.trp import decompose, energy_for_flops, split_where_faster
    from prunekit.cnn.udfc import compress

    epochs = args.epochs or resnet.TESTBED["epochs"]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load(path)
    data["setup"] = (f"Testbed: ResNet-20 widths 16/32/64 with a stride-2 stem, {epochs} epochs of SGD (lr 0.1 cosine, "
                     "batch 128, wd 5e-4) on the 60k training images per seed; accuracy on the 10k test images. "
                     "UDFC and its baselines use no data and no fine-tuning; quantization is per-channel uniform on "
                     f"every Conv2d/Linear. TRP: {TRP_OPTS} (rows marked e=0.93: energy 0.93; spatial: the spatial scheme; "
                     "split where faster: the same model with `split_where_faster` applied), trained "
                     "from scratch with the testbed recipe and decomposed at the ranks of its last substitution; "
                     "SVD baseline: the same seed's normally trained testbed decomposed (channel scheme) at one energy "
                     "threshold bisected to TRP's FLOPs. CPU: median of 10 forward passes, batch 256, 1 thread, "
                     f"{platform.processor() or platform.machine()}, torch {torch.__version__}.")
    done = {(r["method"], r["setting"], r["seed"]) for r in data["runs"]}
    if args.merge:
        for r in load(Path(args.merge))["runs"]:
            if (r["method"], r["setting"], r["seed"]) not in done:
                data["runs"].append(r)
                done.add((r["method"], r["setting"], r["seed"]))
        save(path, data)
        print(markdown(data))
        return 0
    if args.select_energy:
        energies = [float(e) for e in args.select_energy.split(",")]
        data["selection"] = select_energy(energies, range(args.select_seeds), epochs, args.holdout)
        save(path, data)
        print(markdown(data))
        return 0
    _, _, xte, yte = resnet.fashion_tensors()

    def record(method, setting, seed, model, **extra):
        if (method, setting, seed) in done:
            return
        row = {"method": method, "setting": setting, "seed": seed, **measure(model, xte, yte)}
        if extra:
            row["extra"] = extra
        data["runs"].append(row)
        done.add((method, setting, seed))
        save(path, data)
        log(f"{method:<20} {setting:<22} seed {seed}: acc {row['accuracy']:.4f} flops {row['flops']} "
            f"ms {row['ms_per_batch']:.1f}")

    names = {"udfc": "UDFC", "merge": "Neuron Merging", "none": "no compensation"}
    if args.retime:
        retime(data, epochs, xte)
        save(path, data)
        print(markdown(data))
        return 0
    # order: what the targets need first (seed 0), then the other seeds
    for seed in range(args.seed_from, args.seeds):
        base = resnet.testbed(seed=seed, epochs=epochs, progress=False, log=log)
        record("unpruned", "fp32", seed, base)
        if args.only in (None, "udfc"):
            plan = [(0.3, 6)] + [(r, b) for r in RATIOS for b in BITS if (r, b) != (0.3, 6)] + [(r, None) for r in RATIOS]
            for ratio, bits in plan:
                for method in UDFC_METHODS:
                    setting = f"{round(100 * ratio)}% + {bits}-bit" if bits else f"{round(100 * ratio)}% fp32"
                    if (names[method], setting, seed) in done:
                        continue
                    record(names[method], setting, seed, compress(base, ratio=ratio, bits=bits, method=method).model)
            for bits in BITS:
                for method in ("udfc", "none"):
                    key = (names[method], f"0% + {bits}-bit", seed)
                    if key not in done:
                        record(*key, compress(base, ratio=0.0, bits=bits, method=method).model)
        if args.only in (None, "trp"):
            e, sch = args.trp_energy, args.trp_scheme
            keys = [("TRP", trp_setting(e, sch), seed), ("SVD after training", svd_setting(e, sch), seed),
                    ("TRP", trp_setting(e, sch, faster=True), seed)]
            if any(k not in done for k in keys):
                from prunekit.cnn.flops import count_flops

                small, meta = trp_model(seed, epochs, e, scheme=sch)
                record(*keys[0], small, accuracy_before_decomposition=meta["accuracy_before_decomposition"])
                target = count_flops(small, (1, 28, 28))
                energy, ranks = energy_for_flops(base, target, scheme=sch)
                svd = _copy(base)
                decompose(svd, scheme=sch, ranks=ranks)
                record(*keys[1], svd, energy=energy)
                fast = _copy(small)
                timing = split_where_faster(fast, xte[:256])
                record(*keys[2], fast, kept_whole=sorted(n for n, i in timing.items() if not i["split"]))
    save(path, data)
    print(markdown(data))
    return 0


def retime(data: dict, epochs: int, xte, rounds: int = 15) -> None:
    """Time one model per distinct architecture, interleaved: every round runs each model once, so a change of
    load on the shared machine hits all of them alike. The median over rounds replaces ``ms_per_batch``."""
    from prunekit.cnn import resnet
    from prunekit.cnn.flops import count_flops
    from prunekit.cnn.trp import decompose, energy_for_flops, fuse_layers
    from prunekit.cnn.udfc import compress

    models = {}  # key -> model
    owner = {}  # (method, setting, seed) -> key
    for r in data["runs"]:
        seed = r["seed"]
        if r["method"] in ("UDFC", "Neuron Merging", "no compensation", "unpruned"):
            ratio = 0.0 if r["method"] == "unpruned" else int(r["setting"].split("%")[0]) / 100
            key = f"pruned {ratio:g}"  # the shapes depend only on the ratio (int(C * ratio) per block)
            if key not in models:
                models[key] = compress(resnet.testbed(seed=seed, epochs=epochs), ratio=ratio).model
        else:
            key = f"{r['method']} {r['setting']} seed {seed}"
            if key not in models:
                sch = setting_scheme(r["setting"])
                small, _ = trp_model(seed, epochs, setting_energy(r["setting"]), scheme=sch)
                if r["method"] == "TRP" and FASTER in r["setting"]:  # the layers its run kept whole, fused again
                    fuse_layers(small, r["extra"]["kept_whole"])
                    models[key] = small
                elif r["method"] == "TRP":
                    models[key] = small
                else:
                    base = resnet.testbed(seed=seed, epochs=epochs)
                    _, ranks = energy_for_flops(base, count_flops(small, (1, 28, 28)), scheme=sch)
                    models[key] = _copy(base)
                    decompose(models[key], scheme=sch, ranks=ranks)
        owner[(r["method"], r["setting"], seed)] = key
    batch = xte[:256]
    times = {k: [] for k in models}
    with torch.no_grad():
        for m in models.values():
            m.eval()(batch)  # warm-up
        for _ in range(rounds):
            for k, m in models.items():
                t0 = time.perf_counter()
                m(batch)
                times[k].append(1000 * (time.perf_counter() - t0))
    for r in data["runs"]:
        r["ms_per_batch"] = statistics.median(times[owner[(r["method"], r["setting"], r["seed"])]])
    data["timing"] = (f"ms_per_batch re-measured together: {rounds} interleaved rounds over {len(models)} distinct "
                      "architectures, median per architecture, batch 256, 1 thread")
    log("retimed: " + ", ".join(f"{k} {statistics.median(v):.1f} ms" for k, v in times.items()))


def _copy(model):
    import copy

    return copy.deepcopy(model)


if __name__ == "__main__":
    sys.exit(main())
