"""Depth pruning on SmolLM2-135M (30 blocks): ShortGPT, sensitivity, every-other, best random mask, TinyFusion.

Every row starts from a fresh copy of the dense model, picks the blocks to keep on calibration windows of the
Wikipedia leads' calibration split, drops the others, measures held-out Wikipedia perplexity, then gets the
same recovery budget (the same LoRA steps on the same windows, in the same order) and is measured again.
TinyFusion learns its mask on steps x batch windows (DiT: images, with their t and noise draws), each seen once as
in the reference's one epoch: the 256 calibration windows while they suffice, fresh ones from the same split beyond.
Speedup: prefill of 256 tokens + 32 greedy decode steps with the KV cache, batch 1, one thread, the best of
3, dense and pruned timed alternately in the same process (best of 3 each). Sizes are chosen for a CPU shared four ways (see SETTINGS,
recorded in the results); they are far below the paper's (10k mask-learning steps, 100k+ recovery steps).

    python bench/depth.py --kept 15            # the 15-block rows
    python bench/depth.py --kept 20 --resume   # skip rows already in the results file
    python bench/depth.py --report             # rewrite the .md and the plot from the .json
    python bench/depth.py --dit --only tinyfusion-2:4,tinyfusion-3:6   # TinyFusion with larger local groups
    python bench/depth.py --kept 20 --only tinyfusion-4:6@400           # ... and 400 mask-learning steps
    python bench/depth.py --kept 15 --only shortgpt --recovery-steps 300  # a longer recovery of the same blocks
    python bench/depth.py --dit --only sensitivity,tinyfusion --recovery-steps 1000   # ... on the DiT

Writes bench/results/depth.json (``{"rows": [{"model", "method", "kept", "metric", "before_recovery",
"after_recovery", "speedup", ...}], "settings": ...}``; rows merged by id under a file lock so several
depths can run at once), bench/results/depth.md and bench/results/depth.png. DiT rows record ``weights``, the
fingerprints of the cached DiT and classifier they were measured on; with ``--resume`` only rows measured on the
cached weights count as done.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import json
import platform
import re
import statistics
import time
from pathlib import Path

import torch

import prunekit
from prunekit import depth
from prunekit.errors import InputError
from prunekit.speed import measure_speed

RESULTS = Path(__file__).resolve().parent / "results"
OUT = RESULTS / "depth.json"


def tinyfusion_spec(method: str, steps: int) -> tuple[str | None, int]:
    """The groups and mask-learning steps of a TinyFusion method name: ``tinyfusion`` (the smallest uniform N:M
    pattern over blocks, 1:2 at half depth), ``tinyfusion-N:M`` (larger local groups), either with ``@STEPS`` for
    another number of mask-learning steps than the bench's `steps` (``tinyfusion-5:10@400``)."""
    name, at, n = method.partition("@")
    if at and not (n.isdigit() and int(n) > 0):
        raise SystemExit(f"{method!r}: the steps after '@' must be a positive whole number, e.g. tinyfusion-5:10@400")
    return name.partition("-")[2] or None, int(n) if n else steps


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


def _compact_lists(text: str) -> str:
    """Indented JSON with every list of plain numbers on one line (TinyFusion's logits run to 924 per group)."""
    return re.sub(r"\[\s+([-\d.eE+, \n]+?)\s+\]", lambda m: "[" + " ".join(m.group(1).split()) + "]", text)


def set_out(folder: Path) -> None:
    """Write depth.json/.md/.png into `folder` instead of bench/results."""
    global RESULTS, OUT
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"--out {folder} is a file; give a folder")
    RESULTS, OUT = folder, folder / "depth.json"


def _update(row: dict | None = None, settings: dict | None = None) -> dict:
    """The results file, with `row` merged in by id and `settings` set (written only when one is given)."""
    OUT.parent.mkdir(parents=True, exist_ok=True)
    with open(OUT.with_suffix(".lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        data = json.loads(OUT.read_text()) if OUT.is_file() else {"rows": []}
        if row is None and settings is None:
            return data
        if settings is not None:
            data["settings"] = settings
        if row is not None:
            data["rows"] = [r for r in data["rows"] if r["id"] != row["id"]] + [row]
            data["rows"].sort(key=lambda r: (r["kept"], r.get("seed", 0), r["method"]))
        tmp = OUT.with_suffix(".json.tmp")
        tmp.write_text(_compact_lists(json.dumps(data, indent=2)) + "\n")
        tmp.replace(OUT)
    return data


def _ppl(model, tok, text) -> float:
    return prunekit.perplexity(model, tok, text, seqlen=SETTINGS["eval_seqlen"], tokens=SETTINGS["eval_tokens"],
                               progress=False).ppl


def _speed(model) -> dict:
    s = measure_speed(model, prefill=SETTINGS["speed_prompt"], decode=SETTINGS["speed_new_tokens"], repeats=1,
                      threads=SETTINGS["threads"])
    return {**s, "decode_s": s["decode_s_per_token"] * s["decode_tokens"]}


def _speed_pair(dense, pruned, rounds: int = 3) -> tuple[dict, dict]:
    """Dense and pruned timed alternately (the CPU is shared: interleaving sees the same load), best of each."""
    best = [None, None]
    for _ in range(rounds):
        for i, m in enumerate((dense, pruned)):
            s = _speed(m)
            if best[i] is None or s["prefill_s"] + s["decode_s"] < best[i]["prefill_s"] + best[i]["decode_s"]:
                best[i] = s
    return best[0], best[1]


def recovery_label(method: str, steps: int | None, default: int | None = None) -> str:
    """The row's method name: `method` itself at the settings' recovery budget (`default`, SmolLM2's unless
    given), ``METHOD+recS`` for S other steps."""
    if steps is not None and steps < 1:
        raise SystemExit(f"--recovery-steps must be a positive whole number, got {steps}")
    default = SETTINGS["recovery_steps"] if default is None else default
    return method if steps is None or steps == default else f"{method}+rec{steps}"


def run(kept: int, seed: int, resume: bool, methods, recovery_steps: int | None = None) -> None:
    """One row per method. With `recovery_steps` other than the settings', the row (``METHOD+recS``) recovers the
    blocks its ``METHOD`` row of the same depth and seed kept (no new selection: TinyFusion's can take over an hour)
    for S steps on ``S x recovery_batch`` windows, each seen once; without such a row it selects as usual."""
    torch.set_num_threads(SETTINGS["threads"])
    recovery_label("", recovery_steps)  # refuses a bad budget before anything loads
    rec_steps = recovery_steps or SETTINGS["recovery_steps"]
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

    def windows(n: int) -> torch.Tensor:
        """`n` windows, each seen once: the calibration windows while they suffice, fresh ones from the split beyond."""
        return ids if n <= ids.shape[0] else prunekit.calibration_ids(
            tok, calib, samples=n, seqlen=SETTINGS["seqlen"], seed=SETTINGS["window_seed"])

    rec_ids = windows(rec_steps * SETTINGS["recovery_batch"])
    for method in methods:
        label = recovery_label(method, recovery_steps)
        rid = f"{label}-{kept}-s{seed}"
        if resume:  # another process may have written it meanwhile
            done = {r["id"] for r in _update()["rows"]}
        if rid in done:
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {rid}", flush=True)
        t0 = time.perf_counter()
        model = copy.deepcopy(dense)
        score = depth.causal_lm_target(model, ids[: SETTINGS["score_windows"]], batch_size=4)
        source = next((r for r in _update()["rows"] if r["id"] == f"{method}-{kept}-s{seed}"), None) \
            if label != method else None
        if source is not None:
            keep = [i in source["kept_layers"] for i in range(model.config.num_hidden_layers)]
            info = {"selection_from": source["id"]}
        elif method.startswith("tinyfusion"):
            groups, steps = tinyfusion_spec(method, SETTINGS["tinyfusion_steps"])
            tf_ids = windows(steps * SETTINGS["tinyfusion_batch"])  # each seen once, as in the reference's one epoch
            target = depth.causal_lm_target(model, tf_ids, batch_size=SETTINGS["tinyfusion_batch"])
            keep, info = depth.select_blocks(target, "tinyfusion", kept=kept, steps=steps, seed=seed, progress=False,
                                             groups=groups)
            info["samples"] = int(tf_ids.shape[0])
        else:
            keep, info = depth.select_blocks(score, method, kept=kept, candidates=SETTINGS["random_candidates"],
                                             seed=seed, progress=False)
        calib_loss = depth.calibration_loss(score, keep)
        select_s = time.perf_counter() - t0
        kept_layers = depth.drop_layers(model, keep)
        before = _ppl(model, tok, held)
        dense_speed, sp = _speed_pair(dense, model)
        speedup = (dense_speed["prefill_s"] + dense_speed["decode_s"]) / (sp["prefill_s"] + sp["decode_s"])
        rec_target = depth.causal_lm_target(model, rec_ids, batch_size=SETTINGS["recovery_batch"])
        rec = depth.recover(rec_target, steps=rec_steps, trainable="lora", lr=SETTINGS["recovery_lr"], seed=seed)
        after = _ppl(model, tok, held)
        info = {k: v for k, v in info.items() if k not in ("keep",)}
        row = {"id": rid, "model": "SmolLM2-135M", "method": label, "kept": kept, "seed": seed, "metric": "wiki_ppl",
               "before_recovery": before, "after_recovery": after, "speedup": speedup,
               "prefill_speedup": dense_speed["prefill_s"] / sp["prefill_s"],
               "decode_speedup": dense_speed["decode_s"] / sp["decode_s"], "speed": sp, "dense_speed": dense_speed,
               "kept_layers": kept_layers, "calibration_loss": calib_loss, "select_seconds": select_s,
               "recovery": rec.to_dict(), "recovery_steps": rec_steps, "recovery_windows": int(rec_ids.shape[0]),
               "method_info": info, "seconds": time.perf_counter() - t0,
               "versions": {"torch": torch.__version__, "python": platform.python_version()}}
        _update(row)
        print(f"  kept {kept_layers}: ppl {before:.2f} -> {after:.2f} after recovery, speedup {speedup:.2f}x, "
              f"{row['seconds']:.0f} s", flush=True)
        report()


DIT = dict(
    kept=(6,), train_images=4096, batch=32, score_batches=4,  # 12 blocks -> 6 (1:2); 4 x 32 images score masks
    tinyfusion_steps=200, random_candidates=8, recovery="full", recovery_steps=200, recovery_lr=1e-4,
    eval_per_class=30, eval_steps=25, metric="fid on the project's Fashion-MNIST classifier features (not Inception-FID)",
)


def dit_target(model, images, labels, *, seed: int):
    """`prunekit.depth.dit.depth_target` at the bench's batch size: the noise-prediction loss with t, noise and label
    dropout drawn from a generator that restarts at `seed` for each batch, so every method sees the same draws."""
    from prunekit.depth.dit import depth_target

    return depth_target(model, images, labels, batch_size=DIT["batch"], seed=seed)


def run_dit(seed: int, resume: bool, methods, recovery_steps: int | None = None) -> None:
    """One row per method. With `recovery_steps` other than the settings', the row (``METHOD+recS``) fine-tunes
    the blocks its ``METHOD`` row of the same seed kept for S steps on ``S x batch`` training images drawn afresh
    (each seen once while the 60,000 last); without such a row it selects as usual."""
    from dit_testbed import testbed_weights

    from prunekit.depth import dit as ditmod

    recovery_label("", recovery_steps, DIT["recovery_steps"])  # refuses a bad budget before anything loads
    rec_steps = recovery_steps or DIT["recovery_steps"]
    torch.set_num_threads(1)
    try:
        dense = ditmod.pretrained_dit(train_if_missing=False, progress=False)
    except InputError as e:  # it ended in a traceback naming an API call
        raise SystemExit(f"{e}\nTrain and cache it first: python bench/dit_testbed.py (about 40 minutes)") from None
    weights = testbed_weights(dense)  # rows record it; --resume skips only rows measured on these weights
    dit_rows = [r for r in _update(settings=None)["rows"] if r["model"] == "DiT-FashionMNIST"]
    done = {r["id"] for r in dit_rows if r.get("weights") == weights} if resume else set()
    other = sorted(r["id"] for r in dit_rows if r.get("weights") != weights)
    if resume and other:
        print(f"DiT rows measured on other weights than the cached ones ({weights}), re-run if selected: "
              f"{', '.join(other)}", flush=True)
    all_images, all_labels = ditmod.fashion_images("train")
    order = torch.randperm(len(all_images), generator=torch.Generator().manual_seed(0))
    pick = order[: DIT["train_images"]]
    images, labels = all_images[pick], all_labels[pick]

    def fresh(n: int):
        """The first `n` training images of the same permutation (cycling past 60,000)."""
        take = order.repeat(-(-n // len(order)))[:n]
        return all_images[take], all_labels[take]

    # a longer recovery sees fresh images; the settings' budget keeps its 4,096 images (1.6 passes)
    rec_images, rec_labels = (images, labels) if rec_steps == DIT["recovery_steps"] else fresh(rec_steps * DIT["batch"])
    if "dit-dense" not in done:
        ev = ditmod.evaluate_dit(dense, n_per_class=DIT["eval_per_class"], steps=DIT["eval_steps"], seed=0)
        _update({"id": "dit-dense", "model": "DiT-FashionMNIST", "method": "dense", "kept": len(dense.blocks),
                 "metric": "fid_classifier", "before_recovery": ev["fid"], "after_recovery": None, "speedup": 1.0,
                 "class_accuracy": ev["class_accuracy"], "dit_settings": DIT, "weights": weights})
    for kept in DIT["kept"]:
        for method in methods:
            label = recovery_label(method, recovery_steps, DIT["recovery_steps"])
            rid = f"dit-{label}-{kept}-s{seed}"
            if rid in done:
                continue
            print(f"[{time.strftime('%H:%M:%S')}] {rid}", flush=True)
            t0 = time.perf_counter()
            model = copy.deepcopy(dense)
            score = dit_target(model, images[: DIT["score_batches"] * DIT["batch"]],
                               labels[: DIT["score_batches"] * DIT["batch"]], seed=seed)
            source = next((r for r in dit_rows if r["id"] == f"dit-{method}-{kept}-s{seed}"
                           and r.get("weights") == weights), None) if label != method else None
            if source is not None:
                keep = [i in source["kept_layers"] for i in range(len(dense.blocks))]
                info = {"selection_from": source["id"]}
            elif method.startswith("tinyfusion"):
                groups, steps = tinyfusion_spec(method, DIT["tinyfusion_steps"])
                tf_images, tf_labels = fresh(steps * DIT["batch"])  # each image (and its t and noise draw) seen once
                keep, info = depth.select_blocks(dit_target(model, tf_images, tf_labels, seed=seed), "tinyfusion",
                                                 kept=kept, steps=steps, seed=seed, groups=groups)
                info["samples"] = len(tf_images)
            else:
                keep, info = depth.select_blocks(score, method, kept=kept, candidates=DIT["random_candidates"], seed=seed)
            calib_loss = depth.calibration_loss(score, keep)
            kept_layers = [i for i, k in enumerate(keep) if k]
            depth.drop_blocks(model.blocks, keep)
            before = ditmod.evaluate_dit(model, n_per_class=DIT["eval_per_class"], steps=DIT["eval_steps"], seed=0)
            speedup = ditmod.forward_speedup(dense, model)["speedup"]  # 16 images, 1 thread, alternated rounds
            rec = depth.recover(dit_target(model, rec_images, rec_labels, seed=seed + 1), steps=rec_steps,
                                trainable=DIT["recovery"], lr=DIT["recovery_lr"], seed=seed)
            after = ditmod.evaluate_dit(model, n_per_class=DIT["eval_per_class"], steps=DIT["eval_steps"], seed=0)
            info = {k: v for k, v in info.items() if k != "keep"}
            _update({"id": rid, "model": "DiT-FashionMNIST", "method": label, "kept": kept, "seed": seed,
                     "metric": "fid_classifier", "before_recovery": before["fid"], "after_recovery": after["fid"],
                     "speedup": speedup, "class_accuracy_before": before["class_accuracy"],
                     "class_accuracy_after": after["class_accuracy"], "kept_layers": kept_layers,
                     "calibration_loss": calib_loss, "recovery": rec.to_dict(), "recovery_steps": rec_steps,
                     "recovery_images": len(rec_images), "method_info": info,
                     "seconds": time.perf_counter() - t0, "dit_settings": DIT, "weights": weights})
            print(f"  kept {kept_layers}: FID {before['fid']:.2f} -> {after['fid']:.2f}, speedup {speedup:.2f}x, "
                  f"{time.perf_counter() - t0:.0f} s", flush=True)
            report()


BASELINES = ("shortgpt", "sensitivity", "every-other", "random")


def target_lines(rows: list[dict]) -> list[str]:
    """Issue 9's targets, judged from `rows`: TinyFusion after recovery against every baseline (per model, depth
    and recovery budget; lower is better for both metrics), and the speedup at half depth."""
    def mean(values):
        return statistics.mean(values)

    lines = ["", "## Targets (issue 9)", "",
             "TinyFusion's quality after recovery must beat every baseline's (mean over at least 3 seeds where "
             "training is involved). Judged per model, depth and recovery budget (a method's `+recN` rows had N steps instead "
             "of the settings'): the best mean over the TinyFusion settings run with 3 seeds or more (any setting when "
             "none was) against the best baseline's mean, lower is better; met only when TinyFusion's has 3 seeds. "
             "Speedup at half depth must be at least 1.8x: the median over the rows at that depth "
             "(each has the same shape).", ""]
    groups: dict = {}
    for r in rows:
        if r["method"] != "dense" and r["after_recovery"] is not None:
            base, _, rec = r["method"].partition("+")
            groups.setdefault((r["model"], r["kept"], rec), {}).setdefault(base, []).append(r["after_recovery"])
    for (model_name, kept, rec), methods in sorted(groups.items()):
        tf = {m: v for m, v in methods.items() if m.startswith("tinyfusion")}
        bl = {m: v for m, v in methods.items() if m in BASELINES}
        if not tf or not bl:
            continue
        seeded = {m: v for m, v in tf.items() if len(v) >= 3} or tf
        t_name, b_name = min(seeded, key=lambda m: mean(tf[m])), min(bl, key=lambda m: mean(bl[m]))
        t, b = mean(tf[t_name]), mean(bl[b_name])
        steps = rec[3:] if rec else (DIT if model_name.startswith("DiT") else SETTINGS)["recovery_steps"]
        few = [m for m in (t_name, b_name) if len(methods[m]) < 3]
        absent = [m for m in BASELINES if m not in bl]
        verdict = "MISSED" if t >= b else "met" if len(tf[t_name]) >= 3 else "not shown (TinyFusion under 3 seeds)"
        lines.append(f"- {model_name}, {kept} blocks, {steps} recovery steps: {t_name} {t:.3f} ({len(tf[t_name])} "
                     f"seed(s)) against {b_name} {b:.3f} ({len(bl[b_name])} seed(s)): {verdict}"
                     + (f"; fewer than 3 seeds: {', '.join(few)}" if few else "")
                     + (f"; not run at this budget: {', '.join(absent)}" if absent else ""))
    dense = {r["model"]: r for r in rows if r["method"] == "dense"}
    for model_name in sorted(dense):
        half = [r["speedup"] for r in rows if r["model"] == model_name and r["method"] != "dense"
                and 2 * r["kept"] == dense[model_name]["kept"]]
        if half:
            med = statistics.median(half)
            lines.append(f"- {model_name}, half depth ({dense[model_name]['kept'] // 2} blocks): speedup median "
                         f"{med:.2f}x over {len(half)} rows (range {min(half):.2f}-{max(half):.2f}): "
                         f"{'met' if med >= 1.8 else 'MISSED'}")
    return lines


def report() -> None:
    from dit_testbed import weights_lines

    data = _update()
    rows = data["rows"]
    lines = ["# Depth pruning: SmolLM2-135M (30 blocks) and a Fashion-MNIST DiT (12 blocks)", "",
             "SmolLM2: held-out Wikipedia perplexity right after pruning and after the same LoRA recovery budget; "
             "speedup = (prefill 256 + decode 32) time dense / pruned, 1 thread, dense and pruned timed alternately "
             f"in the same process. Settings: `{json.dumps(data.get('settings', SETTINGS))}`", "",
             "DiT: FID between classifier features of generated and real test images (the project's Fashion-MNIST "
             "classifier, not Inception-FID) right after pruning and after the same full fine-tuning budget; speedup "
             f"= forward time of 16 images dense / pruned. Settings: `{json.dumps(DIT)}`", "",
             "TinyFusion methods: `tinyfusion` uses the smallest uniform N:M groups over blocks (1:2 at half depth), "
             "`tinyfusion-N:M` groups of M blocks with N kept, `@S` S mask-learning steps instead of the settings' "
             "`tinyfusion_steps`; `-cyc256` (SmolLM2 rows measured before the mask learning saw each window "
             "once): learned on the 256 calibration windows cycled.", "",
             *weights_lines([r for r in rows if r["model"] == "DiT-FashionMNIST"]),
             *([f"SmolLM2 speedups re-measured with `--retime` ({sorted({r['retimed'] for r in rows if 'retimed' in r})[0]}; "
                "prefill computes the last position's logits only, as generate does); the figures measured during the "
                "runs, under load, are kept in the JSON as `speed_history`.", ""] if any("retimed" in r for r in rows) else []),
             "| model | kept | method | seed | kept layers | metric | before recovery | after recovery | speedup (prefill / decode) |",
             "| --- | ---: | --- | ---: | --- | --- | ---: | ---: | --- |"]
    for r in rows:
        after = f"{r['after_recovery']:.2f}" if r["after_recovery"] is not None else "-"
        sp = f"{r['speedup']:.2f}x" + (f" ({r['prefill_speedup']:.2f} / {r['decode_speedup']:.2f})" if "prefill_speedup" in r else "")
        lines.append(f"| {r['model']} | {r['kept']} | {r['method']} | {r.get('seed', '-')} | {r.get('kept_layers', 'all')} | "
                     f"{r['metric']} | {r['before_recovery']:.2f} | {after} | {sp} |")
    groups: dict = {}
    for r in rows:
        if r["method"] != "dense" and r["after_recovery"] is not None:
            groups.setdefault((r["model"], r["kept"], r["method"]), []).append(r)
    if any(len(g) > 1 for g in groups.values()):
        def ms(values):
            return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

        lines += ["", "Mean ± standard deviation over the seeds that ran (after recovery; class accuracy of the DiT's "
                  "samples after recovery):", "",
                  "| model | kept | method | seeds | before recovery | after recovery | class accuracy |",
                  "| --- | ---: | --- | --- | ---: | ---: | ---: |"]
        for (model_name, kept, method), g in sorted(groups.items(), key=lambda kv: (kv[0][0], kv[0][1],
                                                                                   statistics.mean(r["after_recovery"] for r in kv[1]))):
            acc = [r["class_accuracy_after"] for r in g if r.get("class_accuracy_after") is not None]
            lines.append(f"| {model_name} | {kept} | {method} | {','.join(str(r.get('seed', 0)) for r in g)} | "
                         f"{ms([r['before_recovery'] for r in g])} | {ms([r['after_recovery'] for r in g])} | "
                         f"{ms(acc) if acc else '-'} |")
    lines += target_lines(rows)
    (RESULTS / "depth.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    panels = [("SmolLM2-135M", 15), ("SmolLM2-135M", 20)] + sorted(
        {(r["model"], r["kept"]) for r in rows if r["model"] != "SmolLM2-135M" and r["method"] != "dense"})
    fig, axes = plt.subplots(1, len(panels), figsize=(6 * len(panels), 5.5))
    for ax, (model_name, kept) in zip(axes, panels):
        sub = [r for r in rows if r["kept"] == kept and r["model"] == model_name and r["after_recovery"] is not None]
        names = sorted({r["method"] for r in sub})
        for j, stage in enumerate(("before_recovery", "after_recovery")):
            vals = [sum(r[stage] for r in sub if r["method"] == n) / max(1, sum(r["method"] == n for r in sub)) for n in names]
            ax.bar([i + 0.4 * j for i in range(len(names))], vals, width=0.4, label=stage.replace("_", " "))
        ax.set_xticks([i + 0.2 for i in range(len(names))], names, rotation=60, ha="right", fontsize=7)
        ax.set_yscale("log")
        ax.set_title(f"{model_name}, {kept} blocks: {sub[0]['metric'] if sub else ''}")
        ax.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "depth.png", dpi=90)
    plt.close(fig)


def retime(rounds: int) -> None:
    """Re-measure the speedup of every SmolLM2 row (its kept layers) on this machine, e.g. once it is quiet, with
    the current speed probe; the earlier figures move to ``speed_history``."""
    torch.set_num_threads(SETTINGS["threads"])
    dense, _ = prunekit.load_model(SETTINGS["model"])
    rows = [r for r in _update()["rows"] if r["model"] == "SmolLM2-135M" and r.get("kept_layers")]
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    for r in rows:
        model = copy.deepcopy(dense)
        depth.drop_layers(model, [i in r["kept_layers"] for i in range(dense.config.num_hidden_layers)])
        dense_speed, sp = _speed_pair(dense, model, rounds=rounds)
        old = {k: r[k] for k in ("speedup", "prefill_speedup", "decode_speedup") if k in r}
        r["speed_history"] = r.get("speed_history", []) + [old]
        r.update(speedup=(dense_speed["prefill_s"] + dense_speed["decode_s"]) / (sp["prefill_s"] + sp["decode_s"]),
                 prefill_speedup=dense_speed["prefill_s"] / sp["prefill_s"],
                 decode_speedup=dense_speed["decode_s"] / sp["decode_s"], speed=sp, dense_speed=dense_speed,
                 retimed=f"{when}, best of {rounds} alternated rounds")
        _update(r)
        print(f"{r['id']}: speedup {r['speedup']:.2f}x (prefill {r['prefill_speedup']:.2f}, decode "
              f"{r['decode_speedup']:.2f}); was {old.get('speedup', float('nan')):.2f}x", flush=True)
    report()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--kept", type=int, default=15, help="blocks kept (15 or 20)")
    p.add_argument("--seed", type=int, default=0, help="seed of the methods that draw (TinyFusion, random, LoRA init)")
    p.add_argument("--only", default=None, help="comma-separated methods (default all)")
    p.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    p.add_argument("--report", action="store_true", help="only rewrite the markdown and plot")
    p.add_argument("--retime", type=int, default=None, metavar="ROUNDS",
                   help="only re-measure every SmolLM2 row's speedup (best of ROUNDS alternated rounds)")
    p.add_argument("--recovery-steps", type=int, default=None, metavar="S",
                   help="S recovery steps instead of the settings' (rows METHOD+recS, reusing the blocks of the METHOD "
                        "row of the same depth and seed)")
    p.add_argument("--dit", action="store_true", help="the DiT testbed (needs the cached pretrained DiT) instead of SmolLM2")
    p.add_argument("--out", default=str(RESULTS), metavar="DIR",
                   help="folder of depth.json, depth.md and depth.png (default bench/results; rows merge into its "
                        "json)")
    a = p.parse_args()
    set_out(Path(a.out).expanduser())
    if a.report:
        report()
        return
    if a.retime is not None:
        retime(a.retime)
        return
    methods = [m.strip() for m in a.only.split(",")] if a.only else list(METHODS)
    if a.dit:
        run_dit(a.seed, a.resume, methods, a.recovery_steps)
    else:
        run(a.kept, a.seed, a.resume, methods, a.recovery_steps)


if __name__ == "__main__":
    main()
