"""prunekit's KV-cache policies vs kvpress 0.5.5 presses on SmolLM2-135M-Instruct (8k context), side by side.

Tasks (all greedy, batch 1, fp32 on CPU):
- ``passkey``: a 5-digit pass key hidden in filler text at several depths of a chat prompt of about
  `--contexts` tokens; budgets 25% and 50% of the context; exact match of the first number answered.
  Protocol (kvpress's pipeline): the context is prefilled and compressed, then the question is fed and the
  answer decoded greedily. ``delta`` uses the default Δ-layers (the reference's 2/14/22 of 28, scaled to 30
  layers); ``delta_calibrated`` the layers `calibrate_delta_layers` picks on 1,024 tokens of Wikipedia. prunekit's policy stays on while decoding (its cache never exceeds the budget
  + `--every` - 1); kvpress compresses the context once (its cache holds budget + question + answer).
  ``--once`` also runs each evicting prunekit policy with ``once=True`` (rows ``NAME+once``): the context's
  forward is compressed and the question and answer are appended, kvpress's protocol.
- ``ppl``: Pride and Prejudice in consecutive windows: prefill `--ppl-context` tokens compressed to each of
  `--ppl-budgets`, then score the next `--ppl-tokens` teacher-forced in one forward; perplexity over all
  windows. DELTA is left out here: its sparse path runs only for one-token decoding steps.
- ``stream``: StreamingLLM and Deep Forcing settings (prunekit only) over the first `--stream-tokens` tokens
  of the book (past the model's 8k context), fed `--stream-chunk` tokens at a time through one cache of
  `--stream-windows` tokens; perplexity of every token after the first. `--stream-offsets 0,16384,32768` streams
  three stretches of the book, each through a fresh cache, and scores them together.
- ``speed``: one passkey prompt of `--speed-context` tokens, then `--speed-tokens` decoding steps timed:
  decode tokens/s, peak KV-cache MB while decoding, and seconds inside the attention modules (hooks).
  ``full`` is the plain model (no engine, no press) in each tool's own environment; prunekit's
  ``full_engine`` is the same through the engine (its overhead).

kvpress runs in its own venv (it pins transformers<5.3; ``bench/kvpress_env.py``) through
``bench/_kvpress_worker.py``; both sides share the task loops of ``bench/_kv_tasks.py`` and the same token ids.
Runs are resumable: every finished sample is a line of ``bench/results/kv_vs_kvpress.raw.jsonl`` (``--out DIR``:
the outputs go to DIR instead).

    python bench/kv_vs_kvpress.py                       # the issue's full size
    python bench/kv_vs_kvpress.py --reduced ...         # labelled "reduced"; the flags after it make it smaller

The committed results (``bench/results/kv_vs_kvpress.md``) are the full size, with two more Deep Forcing
settings: ``python bench/kv_vs_kvpress.py --stream-policies "streaming_llm,deep_forcing,\
deep_forcing:topc_rope=unify,deep_forcing:sinks=0.25/recent=0.4/topc=0.32,\
deep_forcing:sinks=0.02/recent=0.5/topc=0.45"``. Their Deep Forcing rows were re-run on 2026-11-30 after the
Top-C reuse limit and the released code's RoPE handling went in (the other rows were kept from the raw file).
The ``NAME+once`` passkey rows were added on 2026-12-04 by the same command with ``--once`` (only the new jobs
ran; every other row is read back from the raw file).
A reduced run (2 passkey depths at 2k only, 1 perplexity window, streaming window 512 only, speed at 25%) is
``bench/results/kv_vs_kvpress_reduced.md``:

    python bench/kv_vs_kvpress.py --reduced --name kv_vs_kvpress_reduced --contexts 2048 --depths 0.25,0.75 \
        --ppl-windows 1 --stream-windows 512 --speed-fractions 0.25 --stream-policies "streaming_llm,\
        deep_forcing,deep_forcing:topc_rope=unify,deep_forcing:sinks=0.02/recent=0.5/topc=0.45"

Both ran on one thread of a shared 2-core CPU.
``bench/results/kv_stream_stretches.md`` is ``--tasks stream --stream-offsets 0,16384,32768`` for StreamingLLM and
``deep_forcing:sinks=0.02/recent=0.5/topc=0.45``, one process per policy (``--name`` a and b, then their raw
files joined and reported with ``--report-only --name kv_stream_stretches`` and the same ``--tasks stream
--stream-offsets 0,16384,32768 --stream-policies "streaming_llm,deep_forcing:sinks=0.02/recent=0.5/topc=0.45"``:
``--report-only`` reports the rows its flags ask for, so rebuilding ``kv_vs_kvpress.md`` needs the command above
with ``--once``, and ``kv_delta_depths.md`` its own command below).
``bench/results/kv_delta_depths.md`` is DELTA's passkey at 19 depths, with no kvpress press:

    python bench/kv_vs_kvpress.py --name kv_delta_depths --tasks passkey --fractions 0.25 \
        --depths 0.05,0.1,0.15,0.2,0.25,0.3,0.35,0.4,0.45,0.5,0.55,0.6,0.65,0.7,0.75,0.8,0.85,0.9,0.95 \
        --passkey-policies full,delta,delta_calibrated

Writes bench/results/kv_vs_kvpress.json ({"rows": [...]}) and .md.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
import warnings
from contextlib import nullcontext
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
warnings.filterwarnings("ignore")

import _kv_tasks as tasks  # noqa: E402
import prunekit  # noqa: E402
import prunekit.inference.kv as kv  # noqa: E402
from kvpress_env import ensure_kvpress_venv  # noqa: E402

PRUNEKIT_POLICIES = ["streaming_llm", "h2o", "snapkv", "knorm", "delta", "delta_calibrated", "deep_forcing"]
EVICTING = [p for p in PRUNEKIT_POLICIES if not p.startswith("delta")]
ONCE = "+once"  # a row's policy NAME+once: NAME with once=True (compress the context's forward only)
KVPRESS_PRESSES = ["snapkv", "streaming_llm", "knorm", "expected_attention"]
RESULTS = HERE / "results"


def parse_args(argv=None):
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    floats = lambda s: [float(x) for x in s.split(",") if x]  # noqa: E731
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", default="ppl,stream,passkey,speed")
    p.add_argument("--contexts", type=ints, default=[2048, 4096], help="passkey context lengths")
    p.add_argument("--depths", type=floats, default=[0.1, 0.3, 0.5, 0.7, 0.9], help="needle depths")
    p.add_argument("--fractions", type=floats, default=[0.25, 0.5], help="passkey budgets as fractions of the context")
    p.add_argument("--passkey-policies", default="", metavar="NAMES",
                   help="the passkey task runs only these policies, of either tool (e.g. full,delta,delta_calibrated; "
                   "with --tasks passkey and no press named, no kvpress venv is needed); default every one")
    p.add_argument("--once", action="store_true",
                   help="passkey: also run each evicting prunekit policy with once=True (rows NAME+once): only the "
                   "context's forward is compressed, the question and answer are kept, as kvpress's pipeline does")
    p.add_argument("--new-tokens", type=int, default=8)
    p.add_argument("--ppl-context", type=int, default=2048)
    p.add_argument("--ppl-tokens", type=int, default=256)
    p.add_argument("--ppl-windows", type=int, default=4)
    p.add_argument("--ppl-budgets", type=ints, default=[256, 512, 1024])
    p.add_argument("--stream-tokens", type=int, default=16384)
    p.add_argument("--stream-windows", type=ints, default=[256, 512, 1024])
    p.add_argument("--stream-chunk", type=int, default=64)
    p.add_argument("--stream-offsets", type=ints, default=[0],
                   help="where each streamed stretch starts in the book (tokens); a row's perplexity is over all of them")
    p.add_argument("--stream-policies", default="streaming_llm,deep_forcing,deep_forcing:topc_rope=unify,"
                   "deep_forcing:sinks=0.25/recent=0.4/topc=0.32,deep_forcing:sinks=0.02/recent=0.5/topc=0.45",
                   help="prunekit policies streamed; NAME:KEY=VALUE/KEY=VALUE sets options, e.g. deep_forcing:sinks=0.1")
    p.add_argument("--speed-context", type=int, default=4096)
    p.add_argument("--speed-tokens", type=int, default=32)
    p.add_argument("--speed-fractions", type=floats, default=[0.25, 0.5], help="speed budgets as fractions of the context")
    p.add_argument("--every", type=int, default=16, help="prunekit: compress while decoding when budget + EVERY is reached")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reduced", action="store_true", help="label the outputs as a reduced-size run")
    p.add_argument("--name", default="kv_vs_kvpress")
    p.add_argument("--out", default=str(RESULTS), metavar="DIR",
                   help="folder of NAME.json, NAME.md and NAME.raw.jsonl (default bench/results)")
    p.add_argument("--report-only", action="store_true", help="rewrite the .json/.md from the raw samples; run nothing")
    args = p.parse_args(argv)
    if args.passkey_policies and not args.passkey_policies.replace(",", ""):  # "," ran no passkey job, silently
        p.error(f"--passkey-policies {args.passkey_policies!r} names no policy; give e.g. full,delta or leave it out")
    unknown = set(args.passkey_policies.split(",")) - {"", "full", *PRUNEKIT_POLICIES, *KVPRESS_PRESSES}
    if unknown:
        known = ", ".join(dict.fromkeys(["full", *PRUNEKIT_POLICIES, *KVPRESS_PRESSES]))
        p.error(f"--passkey-policies: unknown {', '.join(sorted(unknown))}; choose from {known}")
    return args


def load_raw(path: Path) -> dict:
    done = {}
    if path.exists():
        for line in path.read_text().splitlines():
            if line.strip():
                rec = json.loads(line)
                done[rec["key"]] = rec
    return done


def append_raw(path: Path, rec: dict) -> None:
    rec = {**rec, "ran": rec.get("ran") or time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}  # which run: speeds
    with open(path, "a") as f:
        f.write(json.dumps(rec) + "\n")


def make_jobs(args, tok, book: list[int]) -> list[dict]:
    jobs = []
    if "ppl" in args.tasks:
        span = args.ppl_context + args.ppl_tokens
        for w in range(args.ppl_windows):
            ids = book[w * span:(w + 1) * span]
            for tool, names in (("prunekit", ["full"] + [p for p in PRUNEKIT_POLICIES if not p.startswith("delta")]), ("kvpress", ["full"] + KVPRESS_PRESSES)):
                for name in names:
                    for budget in ([None] if name == "full" else args.ppl_budgets):
                        jobs.append(dict(tool=tool, policy=name, task="ppl", context=args.ppl_context, budget=budget, sample=w,
                                         ids=ids))
    if "stream" in args.tasks:
        for name in [x for x in args.stream_policies.split(",") if x]:
            for window in args.stream_windows:
                for offset in args.stream_offsets:
                    jobs.append(dict(tool="prunekit", policy=name, task="stream", context=args.stream_tokens, budget=window,
                                     sample=offset))
    for task, contexts, depths in (("passkey", args.contexts, args.depths), ("speed", [args.speed_context], [0.5])):
        if task not in args.tasks:
            continue
        for context in contexts:
            for depth in depths:
                rng = random.Random(f"{context}-{depth}")
                sample = tasks.passkey_sample(tok, context=context, depth=depth, key=rng.randint(10000, 99999))
                new = args.new_tokens if task == "passkey" else args.speed_tokens
                budgets = [int(f * context) for f in (args.fractions if task == "passkey" else args.speed_fractions)]
                for tool, names in (("prunekit", ["full"] + (["full_engine"] if task == "speed" else []) + PRUNEKIT_POLICIES),
                                    ("kvpress", ["full"] + KVPRESS_PRESSES)):
                    if task == "passkey" and args.passkey_policies:
                        chosen = args.passkey_policies.split(",")
                        names = [n for n in names if n in chosen and (tool == "prunekit" or n != "full" or
                                                                      any(c in KVPRESS_PRESSES for c in chosen))]
                    if task == "passkey" and tool == "prunekit" and args.once:
                        names = names + [n + ONCE for n in names if n in EVICTING]
                    for name in names:
                        for budget in ([None] if name.startswith("full") else budgets):
                            jobs.append(dict(tool=tool, policy=name, task=task, context=context, budget=budget, sample=depth,
                                             sample_data=sample, new_tokens=new))
    for job in jobs:
        job["key"] = f"{job['tool']}|{job['policy']}|{job['task']}|{job['context']}|{job['budget']}|{job['sample']}"
    return jobs


DELTA_LAYERS: list[int] = []  # set by main from calibrate_delta_layers


def parse_spec(spec: str):
    """'deep_forcing:sinks=0.1/topc_rope=unify' -> ('deep_forcing', {'sinks': 0.1, 'topc_rope': 'unify'})."""
    name, _, rest = spec.partition(":")
    opts = {}
    for item in [x for x in rest.split("/") if x]:
        k, _, v = item.partition("=")
        opts[k] = v
        for kind in (int, float):
            try:
                opts[k] = kind(v)
                break
            except ValueError:
                pass
    return name, opts


def policy_ctx(model, name, budget, every):
    if name.endswith(ONCE):
        return lambda: kv.policy(model, name.removesuffix(ONCE), budget=budget, every=every, once=True)
    if ":" in name:
        base, opts = parse_spec(name)
        return lambda: kv.policy(model, base, budget=budget, every=every, **opts)
    if name == "delta_calibrated":
        return lambda: kv.policy(model, "delta", budget=budget, every=every, delta_layers=DELTA_LAYERS)
    if name == "full":
        return nullcontext
    if name == "full_engine":
        return lambda: kv.policy(model, "full")
    return lambda: kv.policy(model, name, budget=budget, every=every)


def run_prunekit(job, model, tok, book, args) -> dict:
    name, budget, task = job["policy"], job["budget"], job["task"]
    start = time.perf_counter()
    holder = {}

    def ctx():
        inner = policy_ctx(model, name, budget, args.every)()

        class Keep:
            def __enter__(self):
                holder["policy"] = inner.__enter__()
                return holder["policy"]

            def __exit__(self, *exc):
                return inner.__exit__(*exc)

        return Keep()

    if task in ("passkey", "speed"):
        with ctx():
            res = tasks.passkey(model, job["sample_data"], new_tokens=job["new_tokens"], timed=task == "speed")
        res["text"] = tok.decode(res["generated"], skip_special_tokens=True)
        res["correct"] = tasks.exact_match(res["text"], job["sample_data"]["answer"])
    elif task == "ppl":
        with ctx():
            res = tasks.continuation_nll(model, job["ids"], context=job["context"])
    else:
        off = job["sample"]
        res = tasks.streaming_nll(model, book[off: off + args.stream_tokens + 1], chunk=args.stream_chunk, ctx=ctx)
    pol = holder.get("policy")
    if pol is not None and getattr(pol, "available", 0):
        res["attended_fraction"] = pol.attended / pol.available
    res.update(key=job["key"], seconds=time.perf_counter() - start)
    return res


def run_kvpress(jobs, model_dir, raw_path, threads: int):
    if not jobs:
        return
    py = ensure_kvpress_venv()
    with tempfile.TemporaryDirectory() as tmp:
        spec = []
        for j in jobs:
            s = {k: v for k, v in j.items() if k != "sample_data"}
            if "sample_data" in j:
                s["sample"] = j["sample_data"]
            spec.append(s)
        jobs_file = Path(tmp) / "jobs.json"
        jobs_file.write_text(json.dumps(spec))
        out = Path(tmp) / "rows.jsonl"
        # the threads prunekit's side runs with (kvpress got 1 whatever --threads said)
        env = dict(os.environ, OMP_NUM_THREADS=str(threads), PYTHONWARNINGS="ignore")
        proc = subprocess.run([str(py), str(HERE / "_kvpress_worker.py"), "--model", str(model_dir), "--jobs", str(jobs_file),
                               "--out", str(out), "--threads", str(threads)], env=env)
        if out.exists():
            for line in out.read_text().splitlines():
                append_raw(raw_path, json.loads(line))
        if proc.returncode:
            raise RuntimeError(f"kvpress worker failed ({proc.returncode}); finished samples were kept")


def aggregate(jobs, raw, args) -> list[dict]:
    groups = {}
    for job in jobs:
        rec = raw.get(job["key"])
        if rec is None:
            continue
        gk = (job["tool"], job["policy"], job["task"], job["context"], job["budget"])
        groups.setdefault(gk, []).append((job, rec))
    rows = []
    for (tool, policy, task, context, budget), items in groups.items():
        recs = [r for _, r in items]
        row = dict(tool=tool, policy=policy, task=task, context=context, budget=budget, score=None, tokens_per_s=None,
                   peak_mb=None, n=len(recs), reduced=args.reduced)
        if task in ("passkey", "speed"):
            row["metric"] = "exact-match accuracy"
            row["score"] = sum(r["correct"] for r in recs) / len(recs)
            row["tokens_per_s"] = sum(r["decode_tokens"] for r in recs) / sum(r["decode_s"] for r in recs)
            row["peak_mb"] = max(r["peak_cache_mb"] for r in recs)
            if task == "speed":
                row["attention_s_per_token"] = sum(r["attention_s"] for r in recs) / sum(r["decode_tokens"] for r in recs)
                row["ran"] = sorted({r["ran"][:13] for r in recs if r.get("ran")}) or None  # None: before dates
            row["kept_after_prefill"] = max(r["kept_after_prefill"] for r in recs)
        else:
            row["metric"] = "perplexity"
            row["score"] = math.exp(sum(r["nll"] for r in recs) / sum(r["tokens"] for r in recs))
            if task == "stream":
                row["peak_cache_tokens"] = max(r["peak_cache_tokens"] for r in recs)
                row["curve"] = recs[0]["curve"]
            else:
                row["kept_after_prefill"] = max(r["kept_after_prefill"] for r in recs)
        if any("attended_fraction" in r for r in recs):
            row["attended_fraction"] = sum(r.get("attended_fraction", 0) for r in recs) / len(recs)
        rows.append(row)
    order = {"ppl": 0, "stream": 1, "passkey": 2, "speed": 3}
    rows.sort(key=lambda r: (order[r["task"]], r["context"], r["budget"] or 0, r["tool"], r["policy"]))
    return rows


def targets(rows) -> list[str]:
    out = []
    by = {}
    for r in rows:
        by.setdefault((r["task"], r["context"], r["budget"]), []).append(r)
    for (task, context, budget), rs in sorted(by.items(), key=lambda x: (x[0][0], x[0][1], x[0][2] or 0)):
        if budget is None or task not in ("passkey", "ppl"):
            continue
        better = max if task == "passkey" else min
        kp = [r for r in rs if r["tool"] == "kvpress"]
        # DELTA keeps the whole cache (its budget is keys attended, not kept): also compare evicting policies alone
        # and the evicting policies under kvpress's protocol (once: the question and answer are never evicted)
        evicting = [r for r in rs if r["tool"] == "prunekit" and not r["policy"].startswith("delta")]
        for label, pk in (("best", [r for r in rs if r["tool"] == "prunekit"]),
                          ("best evicting", [r for r in evicting if not r["policy"].endswith(ONCE)]),
                          ("best evicting with once (kvpress's protocol)", [r for r in evicting if r["policy"].endswith(ONCE)])):
            if pk and kp and (label == "best" or len(pk) < len([r for r in rs if r["tool"] == "prunekit"])):
                bp, bk = better(pk, key=lambda r: r["score"]), better(kp, key=lambda r: r["score"])
                ok = bp["score"] >= bk["score"] if task == "passkey" else bp["score"] <= bk["score"]
                out.append(f"- {task} {context} tokens, budget {budget}: prunekit {label} {bp['policy']} {bp['score']:.3f} vs "
                           f"kvpress best {bk['policy']} {bk['score']:.3f}: {'met' if ok else 'MISSED'}")
    speed = [r for r in rows if r["task"] == "speed"]
    if speed:
        for tool in ("prunekit", "kvpress"):
            full = next((r for r in speed if r["tool"] == tool and r["policy"] == "full"), None)
            if full is None:
                continue
            for r in speed:
                if r["tool"] != tool or r["policy"] == "full":
                    continue
                ok = r["tokens_per_s"] >= full["tokens_per_s"]
                out.append(f"- speed {r['context']}: {tool} {r['policy']} budget {r['budget']}: {r['tokens_per_s']:.2f} tok/s vs full "
                           f"{full['tokens_per_s']:.2f} ({'met' if ok else 'MISSED'}); peak cache {r['peak_mb']:.1f} MB vs "
                           f"{full['peak_mb']:.1f}; attention {1000 * r['attention_s_per_token']:.1f} vs "
                           f"{1000 * full['attention_s_per_token']:.1f} ms/token")
    for context, variant in sorted({(r["context"], p) for r in rows if r["task"] == "passkey"
                                    for p in ("delta", "delta_calibrated")}):
        full = next((r for r in rows if r["task"] == "passkey" and r["context"] == context and r["tool"] == "prunekit"
                     and r["policy"] == "full"), None)
        delta = next((r for r in rows if r["task"] == "passkey" and r["context"] == context and r["policy"] == variant
                      and r["budget"] == int(0.25 * context)), None)
        if full and delta:
            out.append(f"- {variant} at 25% ({context} tokens): accuracy {delta['score']:.3f} vs full {full['score']:.3f} "
                       f"({'met' if delta['score'] >= full['score'] else 'MISSED'}); keys attended while decoding "
                       f"{delta.get('attended_fraction', float('nan')):.3f} of the full cache's")
    for window in sorted({r["budget"] for r in rows if r["task"] == "stream"}):
        s = next((r for r in rows if r["task"] == "stream" and r["budget"] == window and r["policy"] == "streaming_llm"), None)
        for d in [r for r in rows if r["task"] == "stream" and r["budget"] == window and r["policy"].startswith("deep_forcing")]:
            if s:
                out.append(f"- streaming {s['context']} tokens, window {window}: {d['policy']} ppl {d['score']:.3f} vs "
                           f"StreamingLLM {s['score']:.3f} ({'met' if d['score'] < s['score'] else 'MISSED'})")
    return out


def write_outputs(rows, args, meta):
    folder = Path(args.out).expanduser()
    folder.mkdir(parents=True, exist_ok=True)
    data = {"rows": rows, "meta": meta, "targets": targets(rows)}
    tmp = folder / f".{args.name}.json.tmp"
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, folder / f"{args.name}.json")
    lines = [f"# KV-cache policies: prunekit vs kvpress on SmolLM2-135M-Instruct{' (REDUCED-SIZE RUN)' if args.reduced else ''}", ""]
    lines.append(f"Settings: {json.dumps(meta['settings'])}")
    lines.append("")
    lines.append("passkey/speed score: exact-match accuracy (higher is better); ppl/stream score: perplexity (lower is better). "
                 "tokens_per_s: greedy decoding after the prompt; peak_mb: peak KV-cache MB while decoding. "
                 "One CPU thread on a shared 2-core machine: speeds are noisy.")
    lines.append("")
    lines.append("Protocol: the context is prefilled and compressed to the budget without seeing the question (kvpress's "
                 "pipeline); prunekit's policies keep compressing while decoding (cache <= budget + every - 1), kvpress's "
                 "cache holds budget + question + answer; prunekit's `NAME+once` rows run NAME with once=True, "
                 "kvpress's protocol: only the context's forward is compressed. `delta` keeps the whole cache: its budget is the keys its sparse "
                 "layers attend to (`attended`: fraction of keys attended over all layers while decoding). `deep_forcing` "
                 "compresses to sinks + topc + recent (0.8 x budget at its defaults) and refills to the budget; Top-C "
                 "and recent keys keep their RoPE phases unless `topc_rope=unify`. "
                 "ppl: one teacher-forced continuation "
                 "after the compressed prefill; stream: chunks through one cache past the model's 8k context.")
    lines.append("")
    lines.append("| task | context | budget | tool | policy | n | score | tok/s | peak MB | attn ms/tok | attended |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        f = lambda v, fmt: "" if v is None else format(v, fmt)  # noqa: E731
        lines.append(f"| {r['task']} | {r['context']} | {r['budget'] or 'full'} | {r['tool']} | {r['policy']} | {r['n']} | "
                     f"{f(r['score'], '.3f')} | {f(r['tokens_per_s'], '.2f')} | {f(r['peak_mb'], '.1f')} | "
                     f"{f(r.get('attention_s_per_token') and 1000 * r['attention_s_per_token'], '.1f')} | "
                     f"{f(r.get('attended_fraction'), '.3f')} |")
    speed = [r for r in rows if r["task"] == "speed"]
    runs = {tuple(r.get("ran") or ()) for r in speed}
    if len(runs) > 1:  # rows re-timed later sat beside the others without a word
        lines += ["", "Speed rows come from more than one run (timings depend on the machine's load at the time): "
                  + "; ".join(f"{r['tool']} {r['policy']} @ {r['budget'] or 'full'}: "
                              + (", ".join(r["ran"]) if r.get("ran") else "undated")
                              for r in speed) + ". Rows recorded before runs were dated are `undated`; the README "
                  "says which of those were re-timed alone."]
    elif runs == {()}:
        lines += ["", "Speed rows carry no run date (recorded before runs were dated): some may come from later "
                  "re-timings; the README says which."]
    lines += ["", "## Targets", ""] + (targets(rows) or ["- (no comparable rows yet)"])
    tmp = folder / f".{args.name}.md.tmp"
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, folder / f"{args.name}.md")


def main(argv=None) -> int:
    args = parse_args(argv)
    args.tasks = [t for t in args.tasks.split(",") if t]
    torch.set_num_threads(args.threads)
    model_dir = prunekit.zoo.model_path("smollm2-135m")
    model, tok = prunekit.load_model(model_dir)
    book_text = prunekit.load_text("austen", purpose="evaluation").text
    need = max(max(args.stream_offsets) + args.stream_tokens + 1, args.ppl_windows * (args.ppl_context + args.ppl_tokens))
    book = tok(book_text[: need * 8], add_special_tokens=False)["input_ids"]
    if len(book) < need:
        raise SystemExit(f"Pride and Prejudice gave only {len(book)} tokens; need {need}")
    layers, shifts = kv.wiki_delta_layers(model, tok)
    DELTA_LAYERS[:] = layers
    folder = Path(args.out).expanduser()
    if folder.exists() and not folder.is_dir():
        raise SystemExit(f"--out {folder} is a file; give a folder")
    raw_path = folder / f"{args.name}.raw.jsonl"
    folder.mkdir(parents=True, exist_ok=True)
    raw = load_raw(raw_path)
    jobs = make_jobs(args, tok, book)
    if not args.report_only and any(j["tool"] == "kvpress" and j["key"] not in raw for j in jobs):
        ensure_kvpress_venv()  # before prunekit's jobs: a missing or broken peer venv failed only after them
    meta = {"model": "smollm2-135m (SmolLM2-135M-Instruct, dequantized fp32)", "reduced": args.reduced,
            "settings": {k: v for k, v in vars(args).items() if k not in ("name", "out", "report_only")},
            "versions": {"prunekit": prunekit.__version__, "torch": torch.__version__, "python": platform.python_version()},
            "delta_layers": {"default": kv.default_delta_layers(model.config.num_hidden_layers), "calibrated": layers,
                             "calibration": "first 1024 tokens of the wiki calibration split, last 64 queries",
                             "shifts": [round(x, 4) for x in shifts]},
            "machine": f"{platform.machine()}, {os.cpu_count()} CPUs (shared), {args.threads} thread(s)"}
    wall = time.perf_counter()
    for task in [] if args.report_only else args.tasks:
        pending = [j for j in jobs if j["task"] == task and j["key"] not in raw]
        todo = [j for j in pending if j["tool"] == "prunekit"]
        if task == "speed" and todo:  # kvpress's worker does the same before its speed jobs
            tasks.warm_up(model, todo[0]["sample_data"], new_tokens=todo[0]["new_tokens"])
        for job in todo:
            rec = run_prunekit(job, model, tok, book, args)
            append_raw(raw_path, rec)
            raw[job["key"]] = rec
            print(f"[kv_vs_kvpress] {job['key']} {rec['seconds']:.1f}s", file=sys.stderr, flush=True)
            write_outputs(aggregate(jobs, raw, args), args, meta)
        run_kvpress([j for j in pending if j["tool"] == "kvpress"], model_dir, raw_path, args.threads)
        raw = load_raw(raw_path)
        write_outputs(aggregate(jobs, raw, args), args, meta)
    write_outputs(aggregate(jobs, load_raw(raw_path), args), args, meta)
    print(f"done in {time.perf_counter() - wall:.0f} s; wrote {folder / args.name}.json/.md", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
