"""DELTA against the full cache: decode speed on SmolLM2-135M at a 4k context, alternated step by step.

`bench/kv_vs_kvpress.py` times each policy in its own run, one after another; on a shared CPU the load moves
between runs by more than DELTA saves (its full cache stays; only the sparse layers' attention shrinks). Here
one process holds one model copy per arm (the plain model, prunekit's full-cache policy, DELTA at each budget), prefills all of them with the
same 4,096 tokens of Pride and Prejudice, then decodes greedily, one step of every arm per round, in an order
that rotates each round. Each arm's figure is the median step time after 3 warm-up rounds, so a change of load
hits every arm alike.

    python bench/kv_delta_speed.py                   # budgets 1024 and 2048 (25% and 50%), 60 rounds
    python bench/kv_delta_speed.py --steps 30 --budgets 1024

Writes bench/results/kv_delta_speed.json and .md.
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--budgets", default="1024,2048", help="DELTA budgets (tokens attended by sparse layers)")
    ap.add_argument("--steps", type=int, default=60, help="decoding rounds (one step of every arm each)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(RESULTS / "kv_delta_speed.json"))
    args = ap.parse_args(argv)
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
    budgets = [int(b) for b in args.budgets.split(",")]
    arms = [("plain", None), ("full", None)] + [("delta", b) for b in budgets]
    models = [model] + [copy.deepcopy(model) for _ in arms[1:]]
    caches = [DynamicCache(config=model.config) for _ in arms]
    times = [[] for _ in arms]
    with torch.no_grad():
        contexts = [kv.policy(m, name, budget=b) for m, (name, b) in zip(models[1:], arms[1:])]
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
    plain_ms = 1000 * statistics.median(times[0][3:])
    full_ms = 1000 * statistics.median(times[1][3:])
    rows = []
    for j, (name, budget) in enumerate(arms):
        ms = 1000 * statistics.median(times[j][3:])
        row = {"policy": name, "budget": budget, "context": args.context, "ms_per_token": round(ms, 2),
               "tokens_per_s": round(1000 / ms, 3), "speedup_vs_plain": round(plain_ms / ms, 4),
               "speedup_vs_engine_full": round(full_ms / ms, 4)}
        if name == "delta":
            pol = pols[j]
            row["attended"] = round(pol.attended / pol.available, 4)
        rows.append(row)
    data = {"rows": rows, "meta": {"steps": args.steps, "warmup_rounds": 3, "threads": args.threads,
                                   "machine": platform.machine(), "torch": torch.__version__,
                                   "ran": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(data, indent=1) + "\n")
    lines = ["# DELTA vs the full cache: decode speed, alternated", "",
             f"SmolLM2-135M, {args.context}-token prefill of Pride and Prejudice, greedy decoding, {args.steps} rounds "
             f"(one step of every arm per round, rotating order), median after 3 warm-up rounds, {args.threads} CPU "
             f"thread(s), torch {torch.__version__}. `attended`: keys attended / keys a full cache attends, over all "
             "layers and steps.", "",
             "`plain`: the model with no KV context (transformers' DynamicCache, which concatenates the whole cache "
             "at every step); `full`: prunekit's full-cache policy, the same engine as DELTA (cache appended in place) "
             "with nothing scored or skipped.", "",
             "| policy | budget | ms / token | tokens / s | speed vs plain | speed vs full | attended |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['policy']} | {r['budget'] or ''} | {r['ms_per_token']:.2f} | {r['tokens_per_s']:.2f} | "
                     f"{r['speedup_vs_plain']:.3f}x | {r['speedup_vs_engine_full']:.3f}x | {r.get('attended', '')} |")
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
