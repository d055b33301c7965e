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

    python bench/cnn_compression.py                  # everything, resumable (rows are cached in the JSON)
    python bench/cnn_compression.py --seeds 1        # seed 0 only
    python bench/cnn_compression.py --only udfc      # one section: udfc or trp
    python bench/cnn_compression.py --only trp --seed-from 2 --out part2.json   # one seed in another process,
    python bench/cnn_compression.py --merge part2.json                          # ... merged afterwards
    python bench/cnn_compression.py --retime         # all CPU times again, interleaved (after everything)

Writes bench/results/cnn_compression.json (``{"rows": [{"method", "setting", "accuracy", "params", "flops",
"ms_per_batch", ...}], "runs": [...]}``) and bench/results/cnn_compression.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NAME = "cnn_compression"
RATIOS, BITS, UDFC_METHODS = (0.3, 0.5), (8, 6, 4), ("udfc", "merge", "none")
TRP_OPTS = dict(period=20, energy=0.9, nuclear=3e-4, scheme="channel")


def trp_setting(energy: float) -> str:
    return "decomposed" if energy == TRP_OPTS["energy"] else f"decomposed, e={energy:g}"


def svd_setting(energy: float) -> str:
    return "same FLOPs as TRP" if energy == TRP_OPTS["energy"] else f"same FLOPs as TRP e={energy:g}"


def setting_energy(setting: str) -> float:
    return float(setting.split("e=")[1]) if "e=" in setting else TRP_OPTS["energy"]


def log(msg: str) -> None:
    print(time.strftime("%H:%M:%S"), msg, flush=True)


def measure(model, xte, yte) -> dict:
    from prunekit import train as tr
    from prunekit.cnn.flops import count_flops, count_params, ms_per_batch

    return {"accuracy": tr.accuracy(model, xte, yte), "params": count_params(model),
            "flops": count_flops(model, (1, 28, 28)), "ms_per_batch": ms_per_batch(model, xte[:256], repeats=10)}


def trp_model(seed: int, epochs: int, energy: float = TRP_OPTS["energy"]):
    """TRP-trained and decomposed testbed for `seed`, cached like the testbed."""
    from prunekit import train as tr
    from prunekit import zoo
    from prunekit.cnn import resnet
    from prunekit.cnn.trp import TRP

    o = dict(TRP_OPTS, energy=energy)
    folder = zoo.cache_dir() / "models" / (f"cnn-trp-{o['scheme']}-p{o['period']}-e{o['energy']}-l{o['nuclear']}"
                                           f"-fmnist-e{epochs}-s{seed}")
    if (folder / "config.json").is_file():
        meta = json.loads((folder / "config.json").read_text())["metadata"]
        return resnet.load_model(folder), meta
    xtr, ytr, xte, yte = resnet.fashion_tensors()
    w = resnet.TESTBED["widths"]
    model = tr.seeded_model(lambda: resnet.ResNet(widths=w, blocks=resnet.TESTBED["blocks"]), seed)
    cb = TRP(model, **o)
    t0 = time.perf_counter()
    resnet.fit(model, xtr, ytr, epochs=epochs, seed=seed, callbacks=[cb], progress=False)
    seconds = time.perf_counter() - t0
    before = tr.accuracy(model, xte, yte)
    ranks = cb.decompose()
    meta = {**o, "epochs": epochs, "seed": seed, "train_seconds": seconds, "accuracy_before_decomposition": before,
            "ranks": ranks, "substitutions": cb.substitutions}
    log(f"TRP seed {seed}: {seconds:.0f} s, accuracy before decomposition {before:.4f}, ranks {ranks}")
    resnet.save_model(model, folder, metadata=meta, overwrite=True)
    return model, meta


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


def targets(rows: list[dict], runs: list[dict] = ()) -> list[str]:
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
    for t in [r for r in rows if r["method"] == "TRP"]:
        s = _find(rows, "SVD after training", svd_setting(setting_energy(t["setting"])))
        if not (base and s):
            continue
        red = base["flops"] / t["flops"]
        d_base, d_svd = 100 * (t["accuracy"] - base["accuracy"]), 100 * (t["accuracy"] - s["accuracy"])
        ok = red >= 2 and d_base >= -1 and d_svd >= 2
        out.append(f"- TRP ({t['setting']}, {len(t['seeds'])} seeds): {red:.2f}x fewer FLOPs, {100 * t['accuracy']:.2f}% vs unpruned {100 * base['accuracy']:.2f}% "
                   f"({d_base:+.2f} points; target >= -1) and vs SVD after training {100 * s['accuracy']:.2f}% "
                   f"({d_svd:+.2f}; target >= +2), FLOP target >= 2x: **{'met' if ok else 'missed'}** (per seed vs "
                   f"the same seed's unpruned: {_paired(runs, ('TRP', t['setting']), ('unpruned', 'fp32'))})")
        pts = sorted((r["flops"], r["ms_per_batch"]) for r in (base, t, s))
        mono = all(b[1] >= a[1] for i, a in enumerate(pts) for b in pts[i + 1:] if b[0] > 1.05 * a[0])  # FLOPs apart
        out.append(f"- CPU time vs FLOPs (unpruned / TRP {t['setting']} / its SVD rows): "
                   + ", ".join(f"{f / 1e6:.2f} MFLOPs -> {ms:.1f} ms" for f, ms in pts)
                   + f": **{'falls with FLOPs' if mono else 'does not fall monotonically'}**")
    pr = [(r["flops"], r["ms_per_batch"]) for r in rows if r["method"] == "UDFC" and r["setting"].endswith("8-bit")
          and not r["setting"].startswith("0%")]
    if base and pr:
        out.append("- UDFC pruned models (8-bit rows; quantization is simulated in fp32, so bits do not change time): "
                   + ", ".join(f"{f / 1e6:.2f} MFLOPs -> {ms:.1f} ms" for f, ms in sorted(pr))
                   + f"; unpruned {base['flops'] / 1e6:.2f} MFLOPs -> {base['ms_per_batch']:.1f} ms")
    return out


def markdown(data: dict) -> str:
    rows = data["rows"]
    lines = ["# CNN compression on Fashion-MNIST (ResNet-20-style testbed)", "",
             data.get("setup", ""), "", data.get("timing", "CPU times measured row by row (shared, loaded machine)."), "",
             "| method | setting | test accuracy % (mean ± std) | seeds | params | FLOPs (MACs) | CPU ms / batch 256 |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['setting']} | {100 * r['accuracy']:.2f} ± {100 * r['accuracy_std']:.2f} | "
                     f"{len(r['seeds'])} | {r['params']:,} | {r['flops']:,} | {r['ms_per_batch']:.1f} |")
    lines += ["", "## Targets", "", *targets(rows, data["runs"]), ""]
    return "\n".join(lines)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3, help="seeds --seed-from .. seeds-1 (default 0, 1, 2)")
    p.add_argument("--seed-from", type=int, default=0, help="first seed (parallel sections: one process per seed)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default: the testbed's)")
    p.add_argument("--only", choices=("udfc", "trp"), default=None)
    p.add_argument("--trp-energy", type=float, default=TRP_OPTS["energy"],
                   help="TRP's energy threshold for this run's TRP rows (default 0.9; others get their own rows)")
    p.add_argument("--out", default=str(RESULTS / f"{NAME}.json"))
    p.add_argument("--retime", action="store_true",
                   help="re-measure CPU time of every distinct architecture round-robin (fair under a varying load) and exit")
    p.add_argument("--merge", default=None, help="add the runs of another results file (a parallel section) and exit")
    args = p.parse_args()
    torch.set_num_threads(1)
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
    from prunekit.cnn import resnet
    from prunekit.cnn.trp import decompose, energy_for_flops
    from prunekit.cnn.udfc import compress

    epochs = args.epochs or resnet.TESTBED["epochs"]
    path = Path(args.out)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = load(path)
    data["setup"] = (f"Testbed: ResNet-20 widths 16/32/64 with a stride-2 stem, {epochs} epochs of SGD (lr 0.1 cosine, "
                     "batch 128, wd 5e-4) on the 60k training images per seed; accuracy on the 10k test images. "
                     "UDFC and its baselines use no data and no fine-tuning; quantization is per-channel uniform on "
                     f"every Conv2d/Linear. TRP: {TRP_OPTS} (rows marked e=0.93: energy 0.93, else the same), trained "
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
            e = args.trp_energy
            if ("TRP", trp_setting(e), seed) not in done or ("SVD after training", svd_setting(e), seed) not in done:
                small, meta = trp_model(seed, epochs, e)
                record("TRP", trp_setting(e), seed, small, accuracy_before_decomposition=meta["accuracy_before_decomposition"])
                from prunekit.cnn.flops import count_flops

                target = count_flops(small, (1, 28, 28))
                energy, ranks = energy_for_flops(base, target, scheme=TRP_OPTS["scheme"])
                svd = _copy(base)
                decompose(svd, scheme=TRP_OPTS["scheme"], ranks=ranks)
                record("SVD after training", svd_setting(e), seed, svd, energy=energy)
    save(path, data)
    print(markdown(data))
    return 0


def retime(data: dict, epochs: int, xte, rounds: int = 15) -> None:
    """Time one model per distinct architecture, interleaved: every round runs each model once, so a change of
    load on the shared machine hits all of them alike. The median over rounds replaces ``ms_per_batch``."""
    from prunekit.cnn import resnet
    from prunekit.cnn.flops import count_flops
    from prunekit.cnn.trp import decompose, energy_for_flops
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
                small, _ = trp_model(seed, epochs, setting_energy(r["setting"]))
                if r["method"] == "TRP":
                    models[key] = small
                else:
                    base = resnet.testbed(seed=seed, epochs=epochs)
                    _, ranks = energy_for_flops(base, count_flops(small, (1, 28, 28)), scheme=TRP_OPTS["scheme"])
                    models[key] = _copy(base)
                    decompose(models[key], scheme=TRP_OPTS["scheme"], ranks=ranks)
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
