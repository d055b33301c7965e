"""KV policies against the full cache: decode speed on SmolLM2-135M at a 4k context, alternated step by step.

`bench/kv_vs_kvpress.py` times each policy in its own run, one after another; on a shared CPU the load moves
between runs by more than most policies change (DELTA keeps its full cache; only its sparse layers' attention
shrinks). Here one process holds one model copy per arm (the plain model, prunekit's full-cache policy, and
every policy at 25% and 50% of the context), prefills all of them with the same 4,096 tokens of Pride and
Prejudice, then decodes greedily, one step of every arm per round, in an order that rotates each round. Each
arm's figure is its mean step time after 3 warm-up rounds (the evicting policies' compressions included), so a
change of load hits every arm alike.

    python bench/kv_speed.py                          # every policy at budgets 1024 and 2048, 60 rounds
    python bench/kv_speed.py --steps 30 --arms full,delta:1024
    python bench/kv_speed.py --arms full,knorm:1024,knorm+once:1024 --out /tmp/kv_speed_knorm.json
    # bench/results/kv_speed_once.json (60 rounds at 4k; plain is always timed):
    python bench/kv_speed.py --arms full,knorm:1024,knorm+once:1024,h2o:1024,h2o+once:1024,snapkv:1024,\
snapkv+once:1024,streaming_llm:1024,streaming_llm+once:1024 --out bench/results/kv_speed_once.json

An arm ``POLICY+once`` runs the policy with ``once=True``: the prefill is compressed, decoding never is.

Writes bench/results/kv_speed.json and .md.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
DEFAULT_ARMS = ",".join(["full"] + [f"{p}:{b}" for b in (1024, 2048) for p in
                                    ("delta", "delta_calibrated", "streaming_llm", "h2o", "snapkv", "knorm",
                                     "deep_forcing")])
WARMUP = 3  # rounds left out of every timing (first calls, allocator growth)


def _arms(spec: str) -> list[tuple[str, int | None]]:
    arms = []
    for item in spec.split(","):
        name, _, budget = item.strip().partition(":")
        arms.append((name, int(budget) if budget else None))
    return arms


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--arms", default=DEFAULT_ARMS,
                    help="POLICY[:BUDGET],... besides the plain model (delta_calibrated: DELTA at calibrated layers; "
                    "POLICY+once: with once=True, only the prefill compressed)")
    ap.add_argument("--every", type=int, default=16, help="evicting policies compress when budget + EVERY is reached")
    ap.add_argument("--steps", type=int, default=60, help="decoding rounds (one step of every arm each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "kv_speed.json"))
    args = ap.parse_args(argv)
    if args.steps <= WARMUP:  # every timing is of the rounds after the warm-up ones
        ap.error(f"--steps must be more than the {WARMUP} warm-up rounds, got {args.steps}")
    torch.set_num_threads(args.threads)
    import prunekit
    from transformers import DynamicCache

    from prunekit.inference import kv

    model, tok = prunekit.load_model("smollm2-135m")
    model.eval()
    text = prunekit.load_text("austen", purpose="evaluation")
    ids = tok(text.text[: 12 * args.context], return_tensors="pt").input_ids[:, : args.context]  # [1, T]
    if ids.shape[1] < args.context:
        raise SystemExit(f"the text gives only {ids.shape[1]} tokens; lower --context")
    arms = [("plain", None)] + _arms(args.arms)
    calibrated = None
    if any(name == "delta_calibrated" for name, _ in arms):  # as bench/kv_vs_kvpress.py: 1,024 Wikipedia tokens
        calibrated, _ = kv.wiki_delta_layers(model, tok)
    models = [model] + [copy.deepcopy(model) for _ in arms[1:]]
    caches = [DynamicCache(config=model.config) for _ in arms]
    times = [[] for _ in arms]

    def context(m, name, budget):
        if name == "delta_calibrated":
            return kv.policy(m, "delta", budget=budget, delta_layers=calibrated)
        if name == "full":
            return kv.policy(m, "full")
        if name.endswith("+once"):
            return kv.policy(m, name.removesuffix("+once"), budget=budget, once=True)
        return kv.policy(m, name, budget=budget, every=args.every)

    with torch.no_grad():
        contexts = [context(m, name, b) for m, (name, b) in zip(models[1:], arms[1:])]
        pols = [None] + [c.__enter__() for c in contexts]
        try:
            nxt = [m(input_ids=ids, cache=c, use_cache=True).logits[:, -1:].argmax(-1) for m, c in zip(models, caches)]
            for i in range(args.steps):
                for j in [(i + k) % len(arms) for k in range(len(arms))]:
                    t0 = time.perf_counter()
                    nxt[j] = models[j](input_ids=nxt[j], cache=caches[j], use_cache=True).logits[:, -1:].argmax(-1)
                    times[j].append(time.perf_counter() - t0)
        finally:
            for c in reversed(contexts):
                c.__exit__(None, None, None)
    # the mean counts the evicting policies' compressions (one step in `every`); the median does not
    plain_ms = 1000 * statistics.fmean(times[0][WARMUP:])
    full_ms = next((1000 * statistics.fmean(t[WARMUP:]) for (name, _), t in zip(arms, times) if name == "full"), None)
    rows = []
    for j, (name, budget) in enumerate(arms):
        ms = 1000 * statistics.fmean(times[j][WARMUP:])
        row = {"policy": name, "budget": budget, "context": args.context, "ms_per_token": round(ms, 2),
               "median_ms": round(1000 * statistics.median(times[j][WARMUP:]), 2), "tokens_per_s": round(1000 / ms, 3),
               "speedup_vs_plain": round(plain_ms / ms, 4),
               "speedup_vs_engine_full": round(full_ms / ms, 4) if full_ms else None,
               "cache_mb": round(kv.cache_bytes(caches[j]) / 2**20, 1)}
        if name.startswith("delta"):
            pol = pols[j]
            row["attended"] = round(pol.attended / pol.available, 4)
            row["delta_layers"] = calibrated if name == "delta_calibrated" else kv.default_delta_layers(model.config.num_hidden_layers)
        rows.append(row)
    data = {"rows": rows, "meta": {"steps": args.steps, "warmup_rounds": WARMUP, "threads": args.threads,
                                   "every": args.every,
                                   "machine": platform.machine(), "torch": torch.__version__,
                                   "ran": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# KV policies against the full cache: decode speed, alternated", "",
             f"SmolLM2-135M, {args.context}-token prefill of Pride and Prejudice, greedy decoding, {args.steps} rounds "
             f"(one step of every arm per round, rotating order), after 3 warm-up rounds, {args.threads} CPU "
             f"thread(s), torch {torch.__version__}. `ms / token` is the mean step time, which includes the evicting "
             + (f"policies' compressions (every {args.every} steps); `median` leaves them out. " if args.every > 1 else
                "policies' compressions (every step, so `median` includes them too). ")
             + "`attended`: keys attended / keys a "
             "full cache attends, over all layers and steps. `cache MB`: the storage behind the cache at the end.", "",
             "`plain`: the model with no KV context (transformers' DynamicCache, which concatenates the whole cache "
             "at every step); `full`: prunekit's full-cache policy, the same engine as the others (cache appended in "
             "place) with nothing scored or evicted. `delta_calibrated`: DELTA at the layers `calibrate_delta_layers` "
             "places on 1,024 Wikipedia tokens. `POLICY+once`: the policy with once=True (the prefill compressed to "
             "the budget, every decoded token kept, no compression while decoding).", "",
             "| policy | budget | ms / token | median | tokens / s | speed vs plain | speed vs full | cache MB | attended |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        vs_full = f"{r['speedup_vs_engine_full']:.3f}x" if r["speedup_vs_engine_full"] else ""
        lines.append(f"| {r['policy']} | {r['budget'] or ''} | {r['ms_per_token']:.2f} | {r['median_ms']:.2f} | "
                     f"{r['tokens_per_s']:.2f} | {r['speedup_vs_plain']:.3f}x | {vs_full} | {r['cache_mb']} | "
                     f"{r.get('attended', '')} |")
    slow = [f"{r['policy']}:{r['budget']}" for r in rows if r["speedup_vs_plain"] < 1.0]
    lines += ["", "Target (every policy decodes at least as fast as the full cache, plain model): "
              + ("met" if not slow else "MISSED by " + ", ".join(slow))]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
