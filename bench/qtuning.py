"""Q-Tuning on SmolLM2-135M-Instruct: LoRA SFT on pruned instruction data, against full data and baselines.

Data (`prunekit.data.sft_tasks`, data seed 0): ``--train`` instruction/response pairs, half reading-comprehension
year questions from the Wikipedia leads and half two-/three-step arithmetic word problems, and ``--test`` held-out
pairs from other leads and another random stream; at most ``--max-length`` tokens each, chat template.
Training: LoRA rank 8 (alpha 16) on every block Linear, AdamW at ``--lr``, batch ``--batch-size``, ``--epochs``
epochs (default one), loss on response tokens only. Rows:

- ``full``: every sample, every response token.
- ``random``: ``round(N * ratio)`` random samples, ``--token-ratio`` of their response tokens at random.
- ``ppl``: the highest-perplexity samples under the starting model, random tokens as ``random``.
- ``qtuning_static``: Q-Tuning scored once under the starting model (quadrants + neighbour-smoothed token PPL).
- ``qtuning_dynamic``: Q-Tuning re-scored per loaded batch under the model being trained (the paper's mode);
  only the kept rows are trained on.
Protocols (``--protocol``) for the pruned rows:
- ``same-steps`` (the default; the reference's, whose trainer prunes inside every micro-batch of the full data
  loader, so a pruned run takes as many optimizer steps as full data, each on fewer samples and tokens): static
  selections train in batches of ``round(batch_size * ratio)`` kept samples, the dynamic mode scores each
  loaded batch of ``batch_size`` samples and steps on the rows it keeps. Row ids end in ``-same``.
- ``fewer-steps``: every training batch holds ``batch_size`` kept samples (the dynamic mode loads
  ``batch_size / ratio`` to keep that many), so a run at 25% takes a quarter of full data's steps.

Metrics on the held-out set: exact-match accuracy of the answer after "The answer is" (greedy, up to
``--max-new-tokens``), response perplexity; tokens trained on (loss tokens), positions forwarded in training,
positions scored without gradients, and wall time (training + the selection's scoring; the starting model's
scores are computed once and shared by ``ppl`` and ``qtuning_static``, their time is added to each such row).
The training seed (LoRA init, order, random picks) varies; the data does not.

    python bench/qtuning.py                          # 25% rows, then 12.5% and 50%, seeds 0 1 2
    python bench/qtuning.py --ratios 0.25 --seeds 0  # one budget, one seed
    python bench/qtuning.py --resume                 # skip rows already in the results file
    python bench/qtuning.py --merge other.json       # add the rows of a parallel run (other seeds) to the results
    python bench/qtuning.py --eu-stats               # per-task EU statistics of the starting model, into the results
    python bench/qtuning.py --device cuda --train 862 --test 370 --epochs 3 --out /tmp/q/qtuning.json  # on a GPU
    python bench/qtuning.py --jobs 16 --device cuda ...  # each run its own process, 16 at a time, merged at the end

Writes bench/results/qtuning.json (``{"rows": [{"method", "sample_ratio", "token_ratio", "accuracy", "ppl",
"tokens_trained", "seconds", ...}]}``), bench/results/qtuning.md and bench/results/qtuning_eu.png.
``--noise F`` misaligns a fraction F of the training pairs (`sft_tasks.add_noise`: their responses rotated among
themselves; the held-out pairs stay clean) and writes bench/results/qtuning_noise<100F>.json / .md / _eu.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from prunekit.data import sft as S
from prunekit.data import sft_tasks
from prunekit.data.methods.qtuning import QTuning, plot_eu_plane, qtuning_select
from prunekit.lora import merge_lora

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("full", "random", "ppl", "qtuning_static", "qtuning_dynamic")


PROTOCOLS = ("same-steps", "fewer-steps")


def _row_id(method, ratio, seed, protocol="fewer-steps"):
    suffix = "-same" if protocol == "same-steps" and method != "full" else ""
    return f"{method}-{ratio}-s{seed}{suffix}"


def _protocol(row) -> str:
    return "-" if row["method"] == "full" else row.get("protocol", "fewer-steps")


def _plan(args) -> list[tuple[str, float, int, str]]:
    """(method, sample ratio, seed, row id) of every run, seed 0 of every budget first, then the other seeds (a
    partial run still covers each budget); one full-data row per seed."""
    plan = []
    for ratio in args.ratios:
        for seed in args.seeds:
            for m in args.methods:
                if m == "full":
                    if _row_id("full", 1.0, seed) not in {p[3] for p in plan}:  # one full row for both protocols
                        plan.append(("full", 1.0, seed, _row_id("full", 1.0, seed)))
                    continue
                plan.append((m, ratio, seed, _row_id(m, ratio, seed, args.protocol)))
    plan.sort(key=lambda p: (p[2] != args.seeds[0], args.ratios.index(p[1]) if p[1] in args.ratios else -1, p[2]))
    return plan


def _merge_rows(data: dict, files) -> None:
    """Add to ``data["rows"]`` the rows of the result `files` whose ids it lacks (the first file with an id wins)."""
    ids = {r["id"] for r in data["rows"]}
    for f in files:
        rows = [r for r in json.loads(Path(f).read_text())["rows"] if r["id"] not in ids]
        data["rows"] += rows
        ids.update(r["id"] for r in rows)


def _run_parallel(args, out: Path) -> int:
    """Each run in its own process of this script, `args.jobs` at a time, then merged into `out`. On a GPU a LoRA
    step of a small model is launch-bound: on an H200, 16 processes each took 2.2-3.4x as long as one alone.
    Each process keeps its own allocator's cache: at ``--eval-batch-size 128`` each held about 10 GB after its
    first evaluation, so 16 of them ran out of the H200's 140 GB (7 of the 39 runs failed so); use a smaller
    evaluation batch with many jobs."""
    import shutil
    import subprocess
    import sys
    import tempfile
    from concurrent.futures import ThreadPoolExecutor

    data = json.loads(out.read_text()) if args.resume and out.exists() else None
    done = {r["id"] for r in data["rows"]} if data else set()
    todo = [p for p in _plan(args) if p[3] not in done]
    common = ["--model", args.model, "--device", args.device, "--train", str(args.train), "--test", str(args.test),
              "--max-length", str(args.max_length), "--max-new-tokens", str(args.max_new_tokens),
              "--token-ratio", str(args.token_ratio), "--protocol", args.protocol, "--lr", str(args.lr),
              "--batch-size", str(args.batch_size), "--epochs", str(args.epochs),
              "--eval-batch-size", str(args.eval_batch_size), "--threads", str(args.threads),
              "--noise", str(args.noise)]
    tmp = Path(tempfile.mkdtemp(prefix="qtuning-"))

    def run(p):
        method, ratio, seed, rid = p
        # a full row is planned at ratio 1.0; its process takes any budget (full ignores it)
        cmd = [sys.executable, str(Path(__file__).resolve()), *common, "--methods", method,
               "--ratios", str(args.ratios[0] if method == "full" else ratio), "--seeds", str(seed),
               "--out", str(tmp / f"{rid}.json")]
        with open(tmp / f"{rid}.log", "w") as log:
            rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
        print(f"[{time.strftime('%H:%M:%S')}] {rid}: {'done' if rc == 0 else f'FAILED (exit {rc})'}", flush=True)
        return rid, rc

    print(f"{len(todo)} runs, {args.jobs} at a time; logs in {tmp}", flush=True)
    with ThreadPoolExecutor(args.jobs) as pool:
        results = list(pool.map(run, todo))
    failed = [rid for rid, rc in results if rc != 0]
    files = [tmp / f"{rid}.json" for rid, rc in results if rc == 0]
    if data is None and files:
        data = json.loads(files[0].read_text())
        data["rows"] = []
        data["meta"]["plot"] = None
    if data is not None:
        _merge_rows(data, files)
        plot = tmp / f"{_row_id('qtuning_static', 0.25, args.seeds[0], args.protocol)}_eu.png"
        if plot.exists() and not data["meta"].get("plot"):  # the first --seeds' 25% static run drew the EU plane
            shutil.copyfile(plot, out.with_name(out.stem + "_eu.png"))
            data["meta"]["plot"] = out.stem + "_eu.png"
        _save(data["rows"], data["meta"], out)
        print(f"{len(data['rows'])} rows in {out}")
    if failed:
        print(f"{len(failed)} run(s) failed, their logs kept in {tmp}: {', '.join(failed)}")
        return 1
    shutil.rmtree(tmp)
    return 0


def _save(rows, meta, path_json: Path):
    path_json.parent.mkdir(parents=True, exist_ok=True)
    tmp = path_json.with_suffix(".json.tmp")
    tmp.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1) + "\n")
    os.replace(tmp, path_json)
    path_json.with_suffix(".md").write_text(_markdown(rows, meta))


def _fmt(values, digits=1, scale=1.0):
    vals = [v * scale for v in values]
    if len(vals) == 1:
        return f"{vals[0]:.{digits}f}"
    return f"{statistics.mean(vals):.{digits}f} ± {statistics.stdev(vals):.{digits}f}"


def _target_lines(rows) -> list[str]:
    """Issue 10's target, judged per protocol and Q-Tuning variant from the seed means at 25% of the samples."""
    def mean(method, protocol, key="accuracy"):
        vals = [r[key] for r in rows if r["method"] == method and _protocol(r) == protocol
                and (method == "full" or r["sample_ratio"] == 0.25)]
        return (statistics.mean(vals), len(vals)) if vals else (None, 0)

    full, n_full = mean("full", "-")
    full_tok, _ = mean("full", "-", "tokens_trained")
    lines = ["", "## Target (issue 10)", "",
             "At 25% of the samples Q-Tuning must beat random and PPL-only in accuracy, be within 1 point of full "
             "data (or above), and train on at least 3x fewer tokens; seed means, full data"
             f" {100 * full:.1f}% over {n_full} seed(s)." if full is not None else "", ""]
    if full is None:
        return lines
    for protocol in PROTOCOLS:
        for method in ("qtuning_static", "qtuning_dynamic"):
            acc, n = mean(method, protocol)
            if acc is None:
                continue
            rnd, _ = mean("random", protocol)
            ppl, _ = mean("ppl", protocol)
            fewer = full_tok / mean(method, protocol, "tokens_trained")[0]
            checks = [("random", rnd is not None and acc > rnd), ("PPL-only", ppl is not None and acc > ppl),
                      ("full - 1 point", acc >= full - 0.01), ("3x fewer tokens", fewer >= 3)]
            missed = [name for name, ok in checks if not ok]
            lines.append(f"- {method}, {protocol}: {100 * acc:.1f}% ({n} seed(s)) against random "
                         f"{'-' if rnd is None else f'{100 * rnd:.1f}%'}, PPL-only "
                         f"{'-' if ppl is None else f'{100 * ppl:.1f}%'}, full {100 * full:.1f}%; {fewer:.1f}x fewer "
                         f"tokens: {'met' if not missed else 'MISSED (' + ', '.join(missed) + ')'}")
    return lines


def _markdown(rows, meta) -> str:
    epochs = meta.get("epochs", 1)
    epochs = "one epoch" if epochs == 1 else f"{epochs} epochs"
    lines = [f"# Q-Tuning on SmolLM2-135M-Instruct (LoRA SFT, {epochs})", "",
             f"Train {meta['train']} pairs"
             + (f", {100 * meta['noise']:g}% of them misaligned (each answers another pair's instruction)"
                if meta.get("noise") else "")
             + f" ({meta['train_tokens']} positions, {meta['train_response_tokens']} response "
             f"tokens), held-out {meta['test']} pairs; year questions from Wikipedia leads + arithmetic word problems "
             f"(`prunekit.data.sft_tasks`, data seed 0). LoRA r=8, lr {meta['lr']}, batch {meta['batch_size']}, "
             f"max length {meta['max_length']}. Token ratio {meta['token_ratio']}. "
             + (f"On {meta['machine']}: " if meta.get("device", "cpu") != "cpu"
                else "One thread on a shared 2-core VM: ")
             + "timings are indicative. Starting model (no SFT): accuracy "
             f"{100 * meta['base']['accuracy']:.1f}%, response PPL {meta['base']['ppl']:.2f}.", "",
             *([meta["note"], ""] if meta.get("note") else []),
             "Mean ± std over seeds (training seed; data fixed). `tokens` = loss tokens trained on; `fwd` = positions "
             "forwarded with gradients; `scored` = positions forwarded without gradients to select data.", "",
             "Protocol `same-steps`: a pruned run takes as many optimizer steps as full data (smaller batches; the "
             "reference's trainer); `fewer-steps`: the same batch size as full data, so fewer steps.", "",
             "| method | protocol | samples | seeds | accuracy % | year % | arith % | held-out PPL | tokens | fewer tokens than full | fwd | scored | seconds |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    full_tok = [r["tokens_trained"] for r in rows if r["method"] == "full"]
    full_tok = statistics.mean(full_tok) if full_tok else None
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["method"], r["sample_ratio"], _protocol(r)), []).append(r)
    order = sorted(groups, key=lambda k: (-k[1] if k[0] == "full" else k[1], k[2], METHODS.index(k[0])))
    order = [k for k in order if k[0] == "full"] + [k for k in order if k[0] != "full"]
    for key in order:
        g = groups[key]
        tok = statistics.mean(r["tokens_trained"] for r in g)
        ratio = f"{full_tok / tok:.1f}x" if full_tok and tok else "-"
        lines.append(
            f"| {key[0]} | {key[2]} | {100 * key[1]:g}% | {len(g)} | {_fmt([r['accuracy'] for r in g], 1, 100)} "
            f"| {_fmt([r['acc_year'] for r in g], 1, 100)} | {_fmt([r['acc_arith'] for r in g], 1, 100)} "
            f"| {_fmt([r['ppl'] for r in g], 2)} | {tok:.0f} | {ratio} "
            f"| {statistics.mean(r['tokens_forward'] for r in g):.0f} | {statistics.mean(r['tokens_scored'] for r in g):.0f} "
            f"| {_fmt([r['seconds'] for r in g], 0)} |")
    lines += ["", "Per run:", "", "| id | accuracy % | PPL | tokens | steps | train s | eval s |", "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['id']} | {100 * r['accuracy']:.1f} | {r['ppl']:.2f} | {r['tokens_trained']} | {r['steps']} "
                     f"| {r['train_seconds']:.0f} | {r['eval_seconds']:.0f} |")
    eu = meta.get("eu_stats")
    if eu:
        lines += ["", "Under the starting model, by task (`--eu-stats`; Q-Tuning static at "
                  f"{100 * eu['sample_ratio']:g}% of the pairs, token ratio {eu['token_ratio']:g}):", "",
                  "| task | pairs | median response PPL | median entropy | pairs kept | response tokens kept "
                  "(of the kept pairs') |", "|---|---|---|---|---|---|"]
        for task, t in eu["tasks"].items():
            lines.append(f"| {task} | {t['pairs']} | {t['median_ppl']:.2f} | {t['median_entropy']:.2f} | "
                         f"{t['kept_pairs']} | {100 * t['kept_token_share']:.0f}% |")
    if meta.get("plot"):  # drawn only by a run with a 25% static row (a --ratios 0.5 run linked a missing file)
        lines += ["", "The starting model's EU plane over the training pairs, with Q-Tuning's 25% selection (filled = "
                  "kept; dashed/dotted lines: the final quantile thresholds):", "", f"![EU plane]({meta['plot']})"]
    lines += _target_lines(rows)
    lines += ["", f"Machine: {meta['machine']}; torch {meta['torch']}.", ""]
    return "\n".join(lines)


def _evaluate(model, tok, test_records, test_ex, pad_id, args):
    start = time.perf_counter()
    outs = S.generate(model, tok, [r["instruction"] for r in test_records], max_new_tokens=args.max_new_tokens,
                      batch_size=args.eval_batch_size)
    hits = [sft_tasks.exact_match(o, r["answer"]) for o, r in zip(outs, test_records)]
    by = {t: [h for h, r in zip(hits, test_records) if r["task"] == t] for t in ("year", "arith")}
    ppl = S.response_perplexity(model, test_ex, pad_id=pad_id, batch_size=args.eval_batch_size)
    return {"accuracy": float(np.mean(hits)), "acc_year": float(np.mean(by["year"])) if by["year"] else float("nan"),
            "acc_arith": float(np.mean(by["arith"])) if by["arith"] else float("nan"), "ppl": ppl,
            "eval_seconds": time.perf_counter() - start, "sample_outputs": outs[:3]}


def _eu_stats(st, records, sample_ratio: float, token_ratio: float) -> dict:
    """Per task: median response PPL and entropy under the starting model, and what Q-Tuning's static selection
    keeps of it (pairs, and the share of the kept pairs' response tokens left in the loss)."""
    sel = qtuning_select(st["nll"], st["ent"], st["resp"], sample_ratio=sample_ratio, token_ratio=token_ratio)
    tasks = {}
    for task in sorted({r["task"] for r in records}):
        idx = np.array([i for i, r in enumerate(records) if r["task"] == task])
        kept = idx[sel.keep_samples[idx]]
        resp = int(st["resp"][kept].sum())
        tasks[task] = {"pairs": len(idx), "median_ppl": float(np.median(sel.ppl[idx])),
                       "median_entropy": float(np.median(sel.entropy[idx])), "kept_pairs": len(kept),
                       "kept_token_share": float(sel.keep_tokens[kept].sum() / resp) if resp else float("nan")}
    return {"sample_ratio": sample_ratio, "token_ratio": token_ratio, "tasks": tasks}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--train", type=int, default=192)
    ap.add_argument("--test", type=int, default=80)
    ap.add_argument("--max-length", type=int, default=128)
    ap.add_argument("--max-new-tokens", type=int, default=36)
    ap.add_argument("--ratios", type=float, nargs="+", default=[0.25, 0.125, 0.5])
    ap.add_argument("--token-ratio", type=float, default=0.7)
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    ap.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    ap.add_argument("--protocol", default="same-steps", choices=PROTOCOLS,
                    help="pruned rows: as many optimizer steps as full data (the reference's), or full's batch size")
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--epochs", type=int, default=1, help="passes over the training pairs (default 1)")
    ap.add_argument("--device", default="cpu", help="where the model trains and is evaluated (cpu, cuda, cuda:N)")
    ap.add_argument("--eval-batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--noise", type=float, default=0.0, help="fraction of training pairs misaligned (0 = clean)")
    ap.add_argument("--out", default=None, help="default bench/results/qtuning.json (qtuning_noise<100F>.json with --noise)")
    ap.add_argument("--model", default="smollm2-135m")
    ap.add_argument("--eu-stats", action="store_true",
                    help="only score the training pairs under the starting model and add, per task, the median PPL and "
                    "entropy and what Q-Tuning's static selection at the first --ratios keeps, to the results")
    ap.add_argument("--jobs", type=int, default=1,
                    help="run each (method, budget, seed) in its own process, this many at a time, and merge them")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="only merge the rows of these result files (runs of other seeds in parallel) into --out")
    args = ap.parse_args(argv)
    if args.jobs < 1:
        ap.error(f"--jobs must be at least 1, got {args.jobs}")
    args.resume = args.resume or args.eu_stats  # the statistics join the rows already there
    torch.set_num_threads(args.threads)
    out = Path(args.out or RESULTS / (f"qtuning_noise{round(100 * args.noise)}.json" if args.noise else "qtuning.json"))
    if args.merge:
        data = json.loads(out.read_text())
        _merge_rows(data, args.merge)
        _save(data["rows"], data["meta"], out)
        print(f"{len(data['rows'])} rows in {out}")
        return 0
    if args.jobs > 1 and not args.eu_stats:
        return _run_parallel(args, out)

    from prunekit.weights.io import load_model

    base, tok = load_model(args.model, device=args.device)
    pad_id = S._pad_id(tok)
    train_rec, test_rec = sft_tasks.build_tasks(train=args.train, test=args.test, seed=0)
    if args.noise:
        train_rec = sft_tasks.add_noise(train_rec, args.noise, seed=1)
    train_ex = S.tokenize(train_rec, tok, max_length=args.max_length)
    test_ex = S.tokenize(test_rec, tok, max_length=args.max_length)
    rows = json.loads(out.read_text())["rows"] if args.resume and out.exists() else []
    old = json.loads(out.read_text()).get("meta", {}) if args.resume and out.exists() else {}
    done = {r["id"] for r in rows}
    meta = {"model": args.model, "train": len(train_ex), "test": len(test_ex), "max_length": args.max_length,
            "train_tokens": sum(len(e.ids) for e in train_ex), "train_response_tokens": sum(e.response_len for e in train_ex),
            "lr": args.lr, "batch_size": args.batch_size, "token_ratio": args.token_ratio, "epochs": args.epochs,
            "noise": args.noise, "plot": old.get("plot"),  # set when this run draws it (a 25% static row)
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs, {args.threads} thread(s)"
                       + (f", {torch.cuda.get_device_name(base.device)}" if base.device.type == "cuda" else ""),
            "device": str(base.device),
            "torch": torch.__version__, "base": old.get("base")}
    if old.get("eu_stats"):  # a resumed run kept the rows but dropped the --eu-stats table the README quotes
        meta["eu_stats"] = old["eu_stats"]

    if meta["base"] is None:
        ev = _evaluate(base, tok, test_rec, test_ex, pad_id, args)
        meta["base"] = {k: ev[k] for k in ("accuracy", "acc_year", "acc_arith", "ppl", "eval_seconds")}
        print(f"starting model: accuracy {100 * ev['accuracy']:.1f}% ppl {ev['ppl']:.2f} ({ev['eval_seconds']:.0f} s) "
              f"e.g. {ev['sample_outputs'][:2]}", flush=True)
        _save(rows, meta, out)

    stats_cache = {}
    if args.eu_stats:
        nll, ent, resp = S.score_examples(base, train_ex, pad_id=pad_id, batch_size=args.batch_size, progress=True)
        meta["eu_stats"] = _eu_stats({"nll": nll, "ent": ent, "resp": resp}, train_rec, args.ratios[0],
                                     args.token_ratio)
        _save(rows, meta, out)
        print(json.dumps(meta["eu_stats"], indent=1))
        return 0

    def base_stats():
        if not stats_cache:
            t0 = time.perf_counter()
            nll, ent, resp = S.score_examples(base, train_ex, pad_id=pad_id, batch_size=args.batch_size, progress=True)
            stats_cache.update(nll=nll, ent=ent, resp=resp, seconds=time.perf_counter() - t0)
            print(f"scored the training set under the starting model in {stats_cache['seconds']:.0f} s", flush=True)
        return stats_cache

    for method, ratio, seed, rid in _plan(args):
        if rid in done:
            continue
        model = copy.deepcopy(base)
        pruner, pre = None, None
        extra_seconds, scored = 0.0, 0
        token_ratio = 1.0 if method == "full" else args.token_ratio
        if method == "random":
            pruner = S.RandomPruner(sample_ratio=ratio, token_ratio=token_ratio, seed=seed)
        elif method in ("ppl", "qtuning_static"):
            st = base_stats()
            if method == "ppl":
                sel = S.PerplexityPruner(sample_ratio=ratio, token_ratio=token_ratio, seed=seed).select(
                    nll=st["nll"], entropy=st["ent"], response=st["resp"])
            else:
                sel = qtuning_select(st["nll"], st["ent"], st["resp"], sample_ratio=ratio, token_ratio=token_ratio)
                if abs(ratio - 0.25) < 1e-9 and seed == args.seeds[0]:
                    plot_eu_plane(sel, out.with_name(out.stem + "_eu.png"),
                                  title=f"EU plane, SmolLM2-135M on the {len(train_ex)} training pairs: Q-Tuning at "
                                        f"{100 * ratio:g}% samples")
                    meta["plot"] = out.stem + "_eu.png"
            pre = sel
            extra_seconds, scored = st["seconds"], sum(len(e.ids) for e in train_ex)
        elif method == "qtuning_dynamic":
            pruner = QTuning(sample_ratio=ratio, token_ratio=token_ratio, every="batch", seed=seed)
        if pre is not None:
            pruner = S.FixedSelection(pre)
        print(f"[{time.strftime('%H:%M:%S')}] {rid} ...", flush=True)
        batch_size, load_batch = args.batch_size, None
        if method != "full" and args.protocol == "same-steps":
            if method == "qtuning_dynamic":
                load_batch = args.batch_size  # score each batch of the full loader, step on what it keeps
            else:
                batch_size = max(1, round(args.batch_size * ratio))
        rep = S.sft(model, train_ex, pad_id=pad_id, pruner=pruner, epochs=args.epochs, batch_size=batch_size,
                    load_batch=load_batch, lr=args.lr, seed=seed, progress=False)
        merge_lora(model)  # the same function, fewer matmuls per generated token
        ev = _evaluate(model, tok, test_rec, test_ex, pad_id, args)
        row = {"id": rid, "method": method, "sample_ratio": ratio, "token_ratio": token_ratio, "seed": seed,
               "protocol": None if method == "full" else args.protocol, "train_batch_size": batch_size,
               "load_batch": load_batch,
               "accuracy": ev["accuracy"], "acc_year": ev["acc_year"], "acc_arith": ev["acc_arith"], "ppl": ev["ppl"],
               "tokens_trained": rep.tokens_trained, "tokens_forward": rep.tokens_forward,
               "tokens_scored": rep.tokens_scored + scored, "samples_trained": rep.samples_trained, "steps": rep.steps,
               "seconds": rep.seconds + extra_seconds, "train_seconds": rep.seconds, "eval_seconds": ev["eval_seconds"],
               "final_loss": float(np.mean(rep.losses[-3:])) if rep.losses else None,
               "sample_outputs": ev["sample_outputs"]}
        rows.append(row)
        done.add(rid)
        _save(rows, meta, out)
        print(f"  acc {100 * row['accuracy']:.1f}% (year {100 * row['acc_year']:.1f}, arith {100 * row['acc_arith']:.1f}) "
              f"ppl {row['ppl']:.2f} tokens {row['tokens_trained']} steps {row['steps']} train {rep.seconds:.0f} s "
              f"eval {ev['eval_seconds']:.0f} s", flush=True)
        del model
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
