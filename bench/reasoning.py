"""Answer aggregation over sampled reasoning paths on SmolLM2-135M-Instruct: SC, PC and RPC at n = 4..64.

The questions are arithmetic word problems this script generates (seeded) with computed answers: one or
two operations (+, -, x) over small numbers, worded from six templates. The model answers through its
chat template, one user turn holding a brief instruction and one worked example (so paths are short and end
in "The answer is N."), with pure temperature sampling (T = 0.8), at most 64 new tokens, 64 paths per
question, all 64 in one batch over the prompt's shared KV cache (`prunekit.inference.sampling`).

The sampled paths are cached in ``$PRUNEKIT_CACHE/bench/reasoning-<config hash>.jsonl``, one question a line,
appended and flushed as each question finishes, so an interrupted run resumes where it stopped and a rerun
with the same settings never resamples. Evaluation then draws, for every n, `--resamples` random subsets of
n of the 64 paths per question (fixed seed) and averages accuracy and ECE over them.

    python bench/reasoning.py --tune 30 --tune-n 8      # single-sample accuracy on 30 questions, 8 paths each
    python bench/reasoning.py --sample-only              # sample (resumable; ~20-30 s a question on 1 thread)
    python bench/reasoning.py                            # sample what is missing, evaluate, write results

Writes bench/results/reasoning.json (``{"rows": [{"method", "n", "accuracy", "ece", ...}], ...meta}``),
bench/results/reasoning.md and bench/results/reasoning.png.
"""

from __future__ import annotations

import argparse
import hashlib
import inspect
import json
import os
import platform
import random
import sys
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"
NS = (4, 8, 16, 32, 64)
SAMPLES, MAX_NEW_TOKENS, TEMPERATURE = 64, 64, 0.8
INSTRUCTION = "Solve the problem. Show the steps briefly, then end with 'The answer is N.'"
GENERATOR_VERSION = 3

NAMES = ["Tom", "Anna", "Ben", "Lily", "Max", "Emma", "Sam", "Mia", "Leo", "Zoe", "Nina", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "cards", "shells", "coins", "eggs"]
FAMILIES = ("add", "sub", "mul", "add_mul", "mul_sub", "add_sub")


def _problem(rng: random.Random, family: str) -> tuple[str, str, int]:
    """(question, worked solution, answer) of one family, numbers drawn from `rng`."""
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    if family == "add":
        a, b = rng.randint(2, 20), rng.randint(2, 9)
        ans = a + b
        return (f"{name} has {a} {item}. {name} gets {b} more {item}. How many {item} does {name} have now?",
                f"{a} + {b} = {ans}. The answer is {ans}.", ans)
    if family == "sub":
        a = rng.randint(5, 20)
        b = rng.randint(1, min(9, a - 1))
        ans = a - b
        return (f"{name} has {a} {item} and gives away {b} of them. How many {item} does {name} have left?",
                f"{a} - {b} = {ans}. The answer is {ans}.", ans)
    if family == "mul":
        b, c = rng.randint(2, 5), rng.randint(2, 9)
        ans = b * c
        return (f"{name} has {b} bags with {c} {item} in each bag. How many {item} does {name} have?",
                f"{b} x {c} = {ans}. The answer is {ans}.", ans)
    if family == "add_mul":
        a, b, c = rng.randint(2, 9), rng.randint(2, 3), rng.randint(2, 5)
        ans = a + b * c
        return (f"{name} has {a} {item}. {name} buys {b} bags with {c} {item} in each bag. "
                f"How many {item} does {name} have now?",
                f"{b} x {c} = {b * c}. {a} + {b * c} = {ans}. The answer is {ans}.", ans)
    if family == "mul_sub":
        b, c = rng.randint(2, 4), rng.randint(2, 5)
        d = rng.randint(1, b * c - 1)
        ans = b * c - d
        return (f"{name} has {b} boxes with {c} {item} in each box. {name} gives away {d} {item}. "
                f"How many {item} are left?",
                f"{b} x {c} = {b * c}. {b * c} - {d} = {ans}. The answer is {ans}.", ans)
    a = rng.randint(3, 12)  # add_sub
    b, c = rng.randint(2, 6), rng.randint(1, a)
    ans = a + b - c
    return (f"{name} has {a} {item}. {name} finds {b} more and then loses {c}. How many {item} does {name} have?",
            f"{a} + {b} = {a + b}. {a + b} - {c} = {ans}. The answer is {ans}.", ans)


def make_question(rng: random.Random) -> dict:
    """One word problem with its computed answer and a worked example of the same family (other numbers)."""
    family = rng.choice(FAMILIES)
    eq, es, _ = _problem(rng, family)
    q, _, ans = _problem(rng, family)
    return {"question": q, "answer": str(ans), "family": family, "examples": [[eq, es]]}


def make_questions(count: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    return [make_question(rng) for _ in range(count)]


def _config(args) -> dict:
    # extractor 3: "the answer is indeed 5" and "answer is 3 x 4 = 12" read 5 and 12 (2026-12-02); extractor 4:
    # "answer is 2^3 = 8", "2 + 3, which equals 5" and "3/4" read 8, 5 and 0.75 (2026-12-04); a cache's answers
    # were extracted when sampled
    return {"generator": GENERATOR_VERSION, "extractor": 4, "question_seed": args.question_seed, "n": SAMPLES,
            "max_new_tokens": MAX_NEW_TOKENS, "temperature": TEMPERATURE, "instruction": INSTRUCTION,
            "model": "smollm2-135m", "seed": args.seed}


def cache_file(args) -> Path:
    from prunekit import zoo

    key = hashlib.sha256(json.dumps(_config(args), sort_keys=True).encode()).hexdigest()[:12]
    folder = zoo.cache_dir() / "bench"
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"reasoning-{key}.jsonl"


def read_cache(path: Path) -> list[dict]:
    """The complete records in the cache (a line cut by a crash at its end is ignored and later overwritten)."""
    if not path.is_file():
        return []
    records = []
    with open(path) as f:
        for line in f:
            if not line.endswith("\n"):
                break
            records.append(json.loads(line))
    return records


def sample(args, count: int) -> list[dict]:
    from prunekit import zoo
    from prunekit.inference.sampling import sample_paths
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = cache_file(args)
    done = read_cache(path)
    if len(done) >= count:
        return done[:count]
    # drop a torn last line before appending
    with open(path, "a+") as f:
        f.seek(0)
        good = sum(len(line) for line in f if line.endswith("\n"))
        f.truncate(good)
    questions = make_questions(count, args.question_seed)
    todo = questions[len(done):]
    print(f"sampling {len(todo)} questions x {SAMPLES} paths into {path} ({len(done)} cached)", flush=True)
    model_dir = zoo.model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    t0 = time.perf_counter()
    state = {"k": 0}

    def append(record):
        record["family"] = todo[state["k"]]["family"]
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
            f.flush()
            os.fsync(f.fileno())
        state["k"] += 1
        k, dt = state["k"], time.perf_counter() - t0
        correct = sum(p["answer"] == record["answer"] for p in record["paths"]) / len(record["paths"])
        SAMPLING_RATE["s"] = dt / k
        print(f"{len(done) + k}/{count}  {dt / k:.1f} s/question  single-path accuracy {correct:.2f}", flush=True)

    sample_paths(model, tok, todo, n=SAMPLES, max_new_tokens=MAX_NEW_TOKENS, temperature=TEMPERATURE,
                 seed=args.seed, instruction=INSTRUCTION, start=len(done), on_record=append)
    return read_cache(path)[:count]


def tune(args) -> int:
    """Single-path accuracy on a few questions, to set the difficulty (not cached)."""
    from prunekit import zoo
    from prunekit.inference.sampling import sample_paths
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = zoo.model_path("smollm2-135m")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32, use_kernels=False).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    questions = make_questions(args.tune, args.question_seed + 1000)  # not the benchmark's questions
    t0 = time.perf_counter()
    recs = sample_paths(model, tok, questions, n=args.tune_n, max_new_tokens=MAX_NEW_TOKENS,
                        temperature=TEMPERATURE, seed=args.seed, instruction=INSTRUCTION)
    dt = time.perf_counter() - t0
    per = [sum(p["answer"] == r["answer"] for p in r["paths"]) / len(r["paths"]) for r in recs]
    lengths = [len(p["logprobs"]) for r in recs for p in r["paths"]]
    for r, a in zip(recs[:5], per):
        first = r["paths"][0]
        print(json.dumps(r["question"]), r["answer"], "|", repr(first["text"][:200]), first["answer"], a)
    print(f"single-path accuracy {sum(per) / len(per):.3f} over {len(recs)} questions x {args.tune_n}; "
          f"mean path length {sum(lengths) / len(lengths):.1f} tokens; {dt:.0f} s")
    return 0


def _secs(x):
    return "unrecorded" if x is None else f"{x:.0f} s"


def _fmt(x, digits=1):
    return "-" if x is None or x != x else f"{100 * x:.{digits}f}"


def targets(rows: list[dict]) -> dict:
    """The issue's targets, checked on the rows."""
    by = {(r["method"], r["n"]): r for r in rows}
    ns = sorted({r["n"] for r in rows})
    top = max(ns)
    sc_best = by[("sc", top)]["accuracy"]
    reach = [n for n in ns if by[("rpc", n)]["accuracy"] >= sc_best - 1e-12]
    return {
        "rpc_accuracy_at_least_sc_every_n": all(by[("rpc", n)]["accuracy"] >= by[("sc", n)]["accuracy"] - 1e-12
                                                for n in ns),
        "rpc_ece_below_sc_every_n": all(by[("rpc", n)]["ece"] < by[("sc", n)]["ece"] for n in ns),
        "rpc_ece_below_sc_mean": sum(by[("rpc", n)]["ece"] for n in ns) < sum(by[("sc", n)]["ece"] for n in ns),
        "sc_accuracy_at_max_n": sc_best,
        "rpc_samples_to_reach_sc_max": min(reach) if reach else None,
        "rpc_reaches_sc_max_with_half_the_samples": bool(reach) and min(reach) <= top // 2,
    }


def write_markdown(data: dict, path: Path) -> None:
    rows, meta = data["rows"], data
    ns = sorted({r["n"] for r in rows})
    by = {(r["method"], r["n"]): r for r in rows}
    lines = [
        "# Answer aggregation over sampled reasoning paths (SmolLM2-135M-Instruct)",
        "",
        f"{meta['questions']} generated arithmetic word problems ({meta['question_note']}), {meta['samples']} sampled "
        f"paths each (T = {meta['temperature']}, at most {meta['max_new_tokens']} new tokens); single-path accuracy "
        f"{100 * meta['single_path_accuracy']:.1f}%. Each cell: accuracy / ECE in %, averaged over "
        f"{meta['resamples']} random n-subsets of every question's paths (seed {meta['seed']}; n = {max(ns)} uses all "
        "paths once). The same subsets are used for every method.",
        "",
        "| method | " + " | ".join(f"n={n}" for n in ns) + " |",
        "|---|" + "---|" * len(ns),
    ]
    for m in ("sc", "pc", "rpc"):
        lines.append(f"| {m.upper()} | " + " | ".join(
            f"{_fmt(by[(m, n)]['accuracy'])} / {_fmt(by[(m, n)]['ece'])}" for n in ns) + " |")
    lines.append("")
    lines.append("RPC dropped " + ", ".join(f"{_fmt(by[('rpc', n)]['pruned_fraction'])}% (n={n})" for n in ns)
                 + " of the paths.")
    t = meta["targets"]
    reach = f"n={t['rpc_samples_to_reach_sc_max']}" if t["rpc_samples_to_reach_sc_max"] else "none of the tested n"
    agree = meta.get("gradient_agreement")
    if agree:
        fit = meta.get("weibull_gradient", "analytic")  # runs before 2026-12-01 used the exact gradient
        other = "the exact gradient" if fit == "numeric" else "the reference's finite differences"
        used = "the reference's finite differences" if fit == "numeric" else "the exact gradient"
        lines += ["", f"The Weibull fit uses {used}; with {other} the RPC keep-mask is identical on "
                  + ", ".join(f"{_fmt(v['identical_keep_masks'], 0)}% (n={k})" for k, v in agree.items())
                  + f" of {next(iter(agree.values()))['subsets']} random subsets (per path: "
                  + ", ".join(f"{_fmt(v['paths_agreeing'], 1)}%" for v in agree.values()) + ")."]
    lines += ["", "Targets:",
              f"- RPC accuracy >= SC at every n: {'met' if t['rpc_accuracy_at_least_sc_every_n'] else 'missed'}"
              + "".join(f" (n={n}: {100 * by[('rpc', n)]['accuracy']:.3f} against "
                        f"{100 * by[('sc', n)]['accuracy']:.3f})"
                        for n in ns if by[("rpc", n)]["accuracy"] < by[("sc", n)]["accuracy"] - 1e-12),
              f"- RPC ECE < SC at every n: {'met' if t['rpc_ece_below_sc_every_n'] else 'missed'} "
              f"(lower on average over n: {'yes' if t['rpc_ece_below_sc_mean'] else 'no'})",
              f"- SC's n={max(ns)} accuracy ({_fmt(t['sc_accuracy_at_max_n'])}%) reached by RPC with "
              f"{reach}: "
              f"{'met' if t['rpc_reaches_sc_max_with_half_the_samples'] else 'missed'} (target <= {max(ns) // 2})",
              "", "Single-path accuracy by problem family: " + ", ".join(
                  f"{k} {_fmt(v)}% ({meta['family_counts'][k]} q)" for k, v in meta["family_accuracy"].items()),
              "", f"Sampling: {_secs(meta['sampling_seconds_per_question'])} per question (64 paths, 1 CPU thread on a "
              f"shared machine); evaluation {_secs(meta['evaluation_seconds'])}.", ""]
    if meta.get("note"):
        lines += [meta["note"], ""]
    path.write_text("\n".join(lines))


def write_plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = data["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
    for m, style in (("sc", "o-"), ("pc", "s--"), ("rpc", "^-")):
        rs = sorted((r for r in rows if r["method"] == m), key=lambda r: r["n"])
        ns = [r["n"] for r in rs]
        axes[0].plot(ns, [100 * r["accuracy"] for r in rs], style, label=m.upper())
        axes[1].plot(ns, [100 * r["ece"] for r in rs], style, label=m.upper())
    for ax, name in zip(axes, ("accuracy (%)", "ECE (%)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(NS, [str(n) for n in NS])
        ax.set_xlabel("sampled paths n")
        ax.set_ylabel(name)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"SmolLM2-135M-Instruct, {data['questions']} arithmetic word problems")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def gradient_agreement(qs, per_n: int, seed: int = 0) -> dict:
    """How often RPC's keep-mask is the same with scipy's finite differences (the reference's, prunekit's
    default) and with the analytic gradient, on `per_n` random n-subsets of random questions for each n < 64."""
    import numpy as np

    from prunekit.inference import reasoning as R

    rng = np.random.default_rng(seed)
    out = {}
    for n in NS:
        same_mask = same_paths = total = 0
        for _ in range(per_n):
            q = qs[rng.integers(len(qs))]
            idx = rng.choice(len(q.answers), size=min(n, len(q.answers)), replace=False)
            p = R.path_probabilities([q.logprobs[i] for i in idx])
            masks = []
            for g in ("analytic", "numeric"):
                if np.unique(p).size < 2:
                    masks.append(np.ones(len(p), dtype=bool))
                    continue
                mix = R.fit_weibull_mixture(p, gradient=g)
                masks.append(~((mix.posterior_high(p) < 0.5) & (p < p.mean())))
            same_mask += bool((masks[0] == masks[1]).all())
            same_paths += int((masks[0] == masks[1]).sum())
            total += len(p)
        out[str(n)] = {"subsets": per_n, "identical_keep_masks": same_mask / per_n,
                       "paths_agreeing": same_paths / total}
    return out


def evaluate(args, records: list[dict]) -> int:
    import transformers

    from prunekit.inference import reasoning as R

    if not records:
        print("no sampled questions to evaluate", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    qs = [R._parse({k: r[k] for k in ("question", "answer", "paths")}, "cache", i + 1) for i, r in enumerate(records)]
    rows = []
    for n in NS:
        for m in R.METHODS:
            res = R.evaluate(qs, method=m, n=n, resamples=args.resamples, seed=args.seed)
            rows.append({k: res[k] for k in ("method", "n", "accuracy", "ece", "accuracy_std", "ece_std", "rounds",
                                             "pruned_fraction")})
            print(f"{m:>3} n={n:<3} accuracy {100 * res['accuracy']:.2f}  ECE {100 * res['ece']:.2f}  "
                  f"pruned {100 * res['pruned_fraction']:.1f}%", flush=True)
    agreement = gradient_agreement(qs, args.gradient_check) if args.gradient_check else None
    print("analytic vs finite-difference gradient, RPC keep-masks:", json.dumps(agreement), flush=True)
    per_q = [sum(R.canonical_answer(p["answer"]) == R.canonical_answer(r["answer"]) for p in r["paths"])
             / len(r["paths"]) for r in records]
    fam: dict = {}
    for r, a in zip(records, per_q):
        fam.setdefault(r.get("family", "?"), []).append(a)
    lengths = [len(p["logprobs"]) for r in records for p in r["paths"]]
    data = {
        "rows": rows,
        "targets": None,
        "model": "smollm2-135m (SmolLM2-135M-Instruct)",
        "questions": len(records),
        "questions_requested": args.questions,
        "question_note": "one or two of + - x over small numbers (one step: operands up to 20 and 9; two steps: "
                         "results up to 24), from six templates, a worked example of the same template in the prompt",
        "samples": SAMPLES, "temperature": TEMPERATURE, "max_new_tokens": MAX_NEW_TOKENS, "instruction": INSTRUCTION,
        "resamples": args.resamples, "seed": args.seed, "question_seed": args.question_seed,
        "single_path_accuracy": sum(per_q) / len(per_q),
        "family_accuracy": {k: sum(v) / len(v) for k, v in sorted(fam.items())},
        "family_counts": {k: len(v) for k, v in sorted(fam.items())},
        "mean_path_tokens": sum(lengths) / len(lengths),
        "sampling_seconds_per_question": _sampling_rate(args.sampling_log),
        "evaluation_seconds": time.perf_counter() - t0,
        "gradient_agreement": agreement,
        "weibull_gradient": inspect.signature(R.fit_weibull_mixture).parameters["gradient"].default,
        "note": args.note,
        "cache": str(cache_file(args)),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "python": platform.python_version()},
    }
    data["targets"] = targets(rows)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(data, indent=1))
    os.replace(tmp, out)
    write_markdown(data, out.with_suffix(".md"))
    write_plot(data, out.with_suffix(".png"))
    print(json.dumps(data["targets"]))
    print(f"wrote {out}, {out.with_suffix('.md')} and {out.with_suffix('.png')}")
    return 0


def _sampling_rate(log: str | None) -> float | None:
    """Seconds per question of the sampling run: measured by this process if it sampled, else the last
    "s/question" figure of the sampling run's log (``--sampling-log``), else None."""
    if SAMPLING_RATE["s"] is not None or not log:
        return SAMPLING_RATE["s"]
    import re

    hits = re.findall(r"([0-9.]+) s/question", Path(log).read_text())
    return float(hits[-1]) if hits else None


SAMPLING_RATE = {"s": None}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--questions", type=int, default=200, help="questions (default 200)")
    ap.add_argument("--question-seed", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0, help="sampling seed")
    ap.add_argument("--resamples", type=int, default=10,
                    help="random n-subsets per question and n (default 10, as the reference's 10 seeds)")
    ap.add_argument("--sample-only", action="store_true", help="only sample (resumable), no evaluation")
    ap.add_argument("--cached-only", action="store_true", help="evaluate the questions already cached, sample none")
    ap.add_argument("--tune", type=int, default=0, metavar="Q", help="only measure single-path accuracy on Q questions")
    ap.add_argument("--tune-n", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--gradient-check", type=int, default=30, metavar="K",
                    help="compare RPC keep-masks from the reference's finite-difference fit (the default) and the "
                    "analytic-gradient fit on K "
                    "random subsets per n (0: skip; default 30)")
    ap.add_argument("--sampling-log", default=None, help="log of a separate --sample-only run (for its s/question)")
    ap.add_argument("--note", default=None, help="a sentence about how this run was made, kept in the results")
    ap.add_argument("--markdown-only", action="store_true",
                    help="rewrite the .md and .png from an existing results .json (adding --note), compute nothing")
    ap.add_argument("--out", default=str(RESULTS / "reasoning.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.markdown_only:
        out = Path(args.out)
        data = json.loads(out.read_text())
        if args.note:
            data["note"] = args.note
            out.write_text(json.dumps(data, indent=1))
        write_markdown(data, out.with_suffix(".md"))
        write_plot(data, out.with_suffix(".png"))
        return 0
    if args.tune:
        return tune(args)
    if args.cached_only:
        records = read_cache(cache_file(args))[: args.questions]
    else:
        records = sample(args, args.questions)
    if args.sample_only:
        return 0
    return evaluate(args, records)


if __name__ == "__main__":
    sys.exit(main())
