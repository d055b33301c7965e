"""Depth pruning on SmolLM2-135M (30 blocks): ShortGPT, sensitivity, every-other, best random mask, TinyFusion.

Every row starts from a fresh copy of the dense model, picks the blocks to keep on calibration windows of the
Wikipedia leads' calibration split, drops the others, measures held-out Wikipedia perplexity, then gets the
same recovery budget (the same LoRA steps on the same windows, in the same order) and is measured again.
Speedup: prefill of 256 tokens + 32 greedy decode steps with the KV cache, batch 1, one thread, the best of
3, dense and pruned timed alternately in the same process (best of 3 each). Sizes are chosen for a CPU shared four ways (see SETTINGS,
recorded in the results); they are far below the paper's (10k mask-learning steps, 100k+ recovery steps).

    python bench/depth.py --kept 15            # the 15-block rows
    python bench/depth.py --kept 20 --resume   # skip rows already in the results file
    python bench/depth.py --report             # rewrite the .md and the plot from the .json

Writes bench/results/depth.json (``{"rows": [{"model", "method", "kept", "metric", "before_recovery",
"after_recovery", "speedup", ...}], "settings": ...}``; rows merged by id under a file lock so several
depths can run at once), bench/results/depth.md and bench/results/depth.png.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import platform
import time
from pathlib import Path

import torch

import prunekit
from prunekit import depth

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "depth.json"
METHODS = ("tinyfusion", "shortgpt", "every-other", "sensitivity", "random")
SETTINGS = dict(
    model="smollm2-135m", calib="wiki", seqlen=128, windows=256, window_seed=0,
    score_windows=8,  # ShortGPT / sensitivity / random masks: calibration loss on these windows (batches of 4)
    tinyfusion_steps=100, tinyfusion_batch=2,  # reference defaults otherwise (tau 4->0.1, x100, EMA .999, LoRA 8)
    random_candidates=8,
    recovery="lora", recovery_steps=30, recovery_batch=4, recovery_lr=1e-3,
    eval_text="wiki (held-out split)", eval_seqlen=256, eval_tokens=4096,
    speed_prompt=256, speed_new_tokens=32, threads=1,
)


def _update(row: dict | None = None, settings: dict | None = None) -> dict:
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
        if settings is not None:
            data["settings"] = settings
        if row is not None:
            data["rows"] = [r for r in data["rows"] if r["id"] != row["id"]] + [row]
            data["rows"].sort(key=lambda r: (r["kept"], r.get("seed", 0), r["method"]))
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(data, indent=2) + "\n")
        tmp.replace(OUT)
    return data


def _ppl(model, tok, text) -> float:
    return prunekit.perplexity(model, tok, text, seqlen=SETTINGS["eval_seqlen"], tokens=SETTINGS["eval_tokens"],
                               progress=False).ppl


def _speed(model) -> dict:
    return depth.speed(model, prompt=SETTINGS["speed_prompt"], new_tokens=SETTINGS["speed_new_tokens"], repeats=1)


def _speed_pair(dense, pruned, rounds: int = 3) -> tuple[dict, dict]:
    """Dense and pruned timed alternately (the CPU is shared: interleaving sees the same load), best of each."""
    best = [None, None]
    for _ in range(rounds):
        for i, m in enumerate((dense, pruned)):
            s = _speed(m)
            if best[i] is None or s["prefill_s"] + s["decode_s"] < best[i]["prefill_s"] + best[i]["decode_s"]:
                best[i] = s
    return best[0], best[1]


def run(kept: int, seed: int, resume: bool, methods) -> None:
    torch.set_num_threads(SETTINGS["threads"])
    existing = _update(settings=SETTINGS)["rows"]
    done = {r["id"] for r in existing} if resume else set()
    dense, tok = prunekit.load_model(SETTINGS["model"])
    calib = prunekit.load_text(SETTINGS["calib"], purpose="calibration")
    held = prunekit.load_text("wiki", purpose="evaluation")
    ids = prunekit.calibration_ids(tok, calib, samples=SETTINGS["windows"], seqlen=SETTINGS["seqlen"],
                                   seed=SETTINGS["window_seed"])  # [256, 128]
    if "dense" not in done:
        sp = _speed(dense)
        _update({"id": "dense", "model": "SmolLM2-135M", "method": "dense", "kept": 30, "metric": "wiki_ppl",
                 "before_recovery": _ppl(dense, tok, held), "after_recovery": None, "speedup": 1.0, "speed": sp})
    for method in methods:
        rid = f"{method}-{kept}-s{seed}"
        if rid in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {rid}", flush=True)
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        score = depth.causal_lm_target(model, ids[: SETTINGS["score_windows"]], batch_size=4)
        if method == "tinyfusion":
            target = depth.causal_lm_target(model, ids, batch_size=SETTINGS["tinyfusion_batch"])
            keep, info = depth.select_blocks(target, "tinyfusion", kept=kept, steps=SETTINGS["tinyfusion_steps"],
                                             seed=seed, progress=False)
        else:
            keep, info = depth.select_blocks(score, method, kept=kept, candidates=SETTINGS["random_candidates"],
                                             seed=seed, progress=False)
        calib_loss = depth.calibration_loss(score, keep)
        select_s = time.perf_counter() - t0
        kept_layers = depth.drop_layers(model, keep)
        before = _ppl(model, tok, held)
        dense_speed, sp = _speed_pair(dense, model)
        speedup = (dense_speed["prefill_s"] + dense_speed["decode_s"]) / (sp["prefill_s"] + sp["decode_s"])
        rec_target = depth.causal_lm_target(model, ids, batch_size=SETTINGS["recovery_batch"])
        rec = depth.recover(rec_target, steps=SETTINGS["recovery_steps"], trainable="lora", lr=SETTINGS["recovery_lr"],
                            seed=seed)
        after = _ppl(model, tok, held)
        info = {k: v for k, v in info.items() if k not in ("keep",)}
        row = {"id": rid, "model": "SmolLM2-135M", "method": method, "kept": kept, "seed": seed, "metric": "wiki_ppl",
               "before_recovery": before, "after_recovery": after, "speedup": speedup,
               "prefill_speedup": dense_speed["prefill_s"] / sp["prefill_s"],
               "decode_speedup": dense_speed["decode_s"] / sp["decode_s"], "speed": sp, "dense_speed": dense_speed,
               "kept_layers": kept_layers, "calibration_loss": calib_loss, "select_seconds": select_s,
               "recovery": rec.to_dict(), "method_info": info, "seconds": time.perf_counter() - t0,
               "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        _update(row)
        print(f"  kept {kept_layers}: ppl {before:.2f} -> {after:.2f} after recovery, speedup {speedup:.2f}x, "
              f"{row['seconds']:.0f} s", flush=True)
        report()


def report() -> None:
    data = _update()
    rows = data["rows"]
    lines = ["# Depth pruning: SmolLM2-135M (30 blocks)", "",
             "Held-out Wikipedia perplexity right after pruning and after the same LoRA recovery budget; speedup "
             "= (prefill 256 + decode 32) time dense / pruned, 1 thread, dense and pruned timed alternately in the same process. Settings: "
             f"`{json.dumps(data.get('settings', SETTINGS))}`", "",
             "| kept | method | seed | kept layers | ppl before recovery | ppl after recovery | speedup (prefill / decode) |",
             "| ---: | --- | ---: | --- | ---: | ---: | --- |"]
    for r in rows:
        after = f"{r['after_recovery']:.2f}" if r["after_recovery"] is not None else "-"
        sp = f"{r['speedup']:.2f}x" + (f" ({r['prefill_speedup']:.2f} / {r['decode_speedup']:.2f})" if "prefill_speedup" in r else "")
        lines.append(f"| {r['kept']} | {r['method']} | {r.get('seed', '-')} | {r.get('kept_layers', 'all')} | "
                     f"{r['before_recovery']:.2f} | {after} | {sp} |")
    (RESULTS / "depth.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for ax, kept in zip(axes, (15, 20)):
        sub = [r for r in rows if r["kept"] == kept]
        names = sorted({r["method"] for r in sub})
        for j, stage in enumerate(("before_recovery", "after_recovery")):
            vals = [sum(r[stage] for r in sub if r["method"] == n) / max(1, sum(r["method"] == n for r in sub)) for n in names]
            ax.bar([i + 0.4 * j for i in range(len(names))], vals, width=0.4, label=stage.replace("_", " "))
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=30)
        ax.set_yscale("log")
        ax.set_title(f"{kept} of 30 blocks: held-out wiki ppl")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "depth.png", dpi=90)
    plt.close(fig)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kept", type=int, default=15, help="blocks kept (15 or 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the methods that draw (TinyFusion, random, LoRA init)")
    p.add_argument("--only", default=None, help="comma-separated methods (default all)")
    p.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown and plot")
    a = p.parse_args()
    if a.report:
        report()
        return
    methods = [m.strip() for m in a.only.split(",")] if a.only else list(METHODS)
    run(a.kept, a.seed, a.resume, methods)


if __name__ == "__main__":
    main()
