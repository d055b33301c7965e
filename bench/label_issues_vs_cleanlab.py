"""prunekit vs cleanlab 2.9: Confident Learning label issues, side by side in one run.

Settings: noisy labels from cleanlab's own generator (`generate_noise_matrix_from_trace` with trace 0.8 K and
a valid noise matrix, then `generate_noisy_labels`) at N x K = 100k x 10, 1M x 10, 200k x 100 and 200k x 1000,
with softmax probabilities of a synthetic classifier of the true labels (logits N(0, 1) + 3.5 on the true
class, float32); plus Fashion-MNIST with 20% of the training labels flipped and out-of-sample probabilities
from a small CNN (`bench/_fashion.py`). At K = 1000 cleanlab's generator floors every flip count to zero
(N p_k n_jk < 1), so that setting concentrates the noise (``frac_zero_noise_rates=0.99``); the JSON records
the noise rate actually generated.

Every `filter_by` mode and a ranked call run in separate worker processes (`_label_worker.py`), each tool twice
(the faster time is kept); `diff` counts examples whose flag differs between the tools (ranked rows: positions
where the two orderings differ). Peak memory is the call's own working memory (peak RSS minus RSS before the
call, inputs already loaded). cleanlab runs with ``n_jobs=1``, its faster setting on 2 cores.
A last row runs prunekit on a memory-mapped ``pred_probs`` (the streaming path).

    python bench/label_issues_vs_cleanlab.py [--quick] [--no-fashion]

Writes bench/results/label_issues_vs_cleanlab.json and .md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_self_confidence", "low_normalized_margin")
SETTINGS = [(100_000, 10), (1_000_000, 10), (200_000, 100), (200_000, 1000)]


def synthetic(n: int, k: int, seed: int = 0):
    import warnings

    from cleanlab.benchmarking.noise_generation import generate_noise_matrix_from_trace, generate_noisy_labels

    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    prior = np.bincount(true, minlength=k) / n
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        noise = generate_noise_matrix_from_trace(k, 0.8 * k, py=prior, valid_noise_matrix=True,
                                                 frac_zero_noise_rates=0.99 if k >= 1000 else 0.0, seed=seed)
    given = generate_noisy_labels(true, noise)
    logits = rng.normal(size=(n, k)).astype(np.float32)
    logits[np.arange(n), true] += 3.5
    logits -= logits.max(axis=1, keepdims=True)
    probs = np.exp(logits)
    probs /= probs.sum(axis=1, keepdims=True)
    return given, probs, true


def worker(tool: str, labels: Path, probs: Path, mode: str, out: Path, *, rank_by=None, mmap=False) -> dict:
    cmd = [sys.executable, str(HERE / "_label_worker.py"), "--tool", tool, "--labels", str(labels), "--probs", str(probs),
           "--filter", mode, "--out", str(out)]
    if rank_by:
        cmd += ["--rank-by", rank_by]
    if mmap:
        cmd.append("--mmap")
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        raise RuntimeError(f"{tool} worker failed on {mode}:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def compare(a: np.ndarray, b: np.ndarray) -> int:
    if a.dtype == bool:
        return int((a != b).sum())
    if len(a) != len(b):  # rankings of different sets
        return int(max(len(a), len(b)))
    return int((a != b).sum())


def run_setting(name: str, labels: np.ndarray, probs: np.ndarray, true: np.ndarray, work: Path, *, extra: dict) -> list[dict]:
    n, k = probs.shape
    lp, pp = work / f"{name}-labels.npy", work / f"{name}-probs.npy"
    np.save(lp, labels)
    np.save(pp, probs)
    rows = []
    jobs = [(m, None, False) for m in FILTERS] + [("prune_by_noise_rate", "self_confidence", False)]
    for mode, rank_by, _ in jobs:
        res = {}
        for tool in ("cleanlab", "prunekit"):
            out = work / f"{name}-{tool}-{mode}-{rank_by}.npy"
            res[tool] = worker(tool, lp, pp, mode, out, rank_by=rank_by)
            res[tool]["result"] = np.load(out)
        issues = res["prunekit"]["result"]
        flagged = issues if issues.dtype == bool else np.isin(np.arange(n), issues)
        wrong = labels != true
        row = {
            "setting": name, "n": n, "k": k, "filter_by": mode + (f" ranked by {rank_by}" if rank_by else ""),
            "diff": compare(res["prunekit"]["result"], res["cleanlab"]["result"]),
            "issues": int(flagged.sum()),
            "precision": float((flagged & wrong).sum() / max(1, flagged.sum())),
            "recall": float((flagged & wrong).sum() / max(1, wrong.sum())),
            "seconds_prunekit": res["prunekit"]["seconds"], "seconds_cleanlab": res["cleanlab"]["seconds"],
            "peak_mb_prunekit": res["prunekit"]["peak_mb"], "peak_mb_cleanlab": res["cleanlab"]["peak_mb"],
            **extra,
        }
        row["speedup"] = row["seconds_cleanlab"] / row["seconds_prunekit"]
        rows.append(row)
        print(json.dumps({key: (round(v, 4) if isinstance(v, float) else v) for key, v in row.items()}), flush=True)
    return rows


def run_mmap(name: str, work: Path, n: int, k: int) -> dict:
    lp, pp = work / f"{name}-labels.npy", work / f"{name}-probs.npy"
    res = worker("prunekit", lp, pp, "prune_by_noise_rate", work / f"{name}-mmap.npy", mmap=True)
    same = np.array_equal(np.load(work / f"{name}-mmap.npy"), np.load(work / f"{name}-cleanlab-prune_by_noise_rate-None.npy"))
    return {"setting": name, "n": n, "k": k, "filter_by": "prune_by_noise_rate (pred_probs memory-mapped, prunekit only)",
            "diff": 0 if same else -1, "seconds_prunekit": res["seconds"], "peak_mb_prunekit": res["peak_mb"],
            "seconds_cleanlab": None, "peak_mb_cleanlab": None, "input_mb": n * k * 4 / 2**20}


def markdown(result: dict) -> str:
    lines = [
        "# prunekit vs cleanlab: Confident Learning label issues",
        "",
        f"Machine: {result['machine']['cpus']} CPUs, numpy {result['machine']['numpy']}, cleanlab {result['machine']['cleanlab']}. "
        "Times: faster of two calls, each tool in its own process; peak MB: the call's own working memory "
        "(peak RSS minus RSS before the call; pred_probs loaded, float32). cleanlab with n_jobs=1.",
        "",
        "| setting | N x K | filter_by | diff | issues | precision / recall | s prunekit | s cleanlab | speedup | peak MB prunekit | peak MB cleanlab |",
        "| --- | --- | --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in result["rows"]:
        cl_s = f"{r['seconds_cleanlab']:.3f}" if r["seconds_cleanlab"] is not None else "-"
        cl_m = f"{r['peak_mb_cleanlab']:.0f}" if r["peak_mb_cleanlab"] is not None else "-"
        sp = f"{r['speedup']:.1f}x" if r.get("speedup") else "-"
        pr = f"{r['precision']:.3f} / {r['recall']:.3f}" if "precision" in r else "-"
        lines.append(f"| {r['setting']} | {r['n']} x {r['k']} | {r['filter_by']} | {r['diff']} | {r.get('issues', '-')} | {pr} | "
                     f"{r['seconds_prunekit']:.3f} | {cl_s} | {sp} | {r['peak_mb_prunekit']:.0f} | {cl_m} |")
    lines += ["", "Noise actually generated per setting: " + ", ".join(f"{k}: {v:.4f}" for k, v in result["noise_rate"].items()), ""]
    return "\n".join(lines)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small settings only (a smoke test; writes *_quick.*)")
    ap.add_argument("--no-fashion", action="store_true", help="skip the Fashion-MNIST setting")
    ap.add_argument("--out", default=None, help="results path without suffix (default "
                    "bench/results/label_issues_vs_cleanlab, or ..._quick with --quick)")
    args = ap.parse_args()
    if args.out is None:  # a smoke test rewrote the committed results
        args.out = str(HERE / "results" / ("label_issues_vs_cleanlab" + ("_quick" if args.quick else "")))
    import cleanlab

    settings = [(20_000, 10), (20_000, 100)] if args.quick else SETTINGS
    rows, noise_rate = [], {}
    start = time.time()
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for n, k in settings:
            name = f"synthetic-{n // 1000}k-x{k}"
            labels, probs, true = synthetic(n, k)
            noise_rate[name] = float((labels != true).mean())
            rows += run_setting(name, labels, probs, true, work, extra={})
            if (n, k) == settings[1]:
                rows.append(run_mmap(name, work, n, k))
                print(json.dumps(rows[-1]), flush=True)
            del labels, probs, true
        if not args.no_fashion:
            from _fashion import noisy_cv_probs

            fm = noisy_cv_probs(quick=args.quick)
            noise_rate["fashion-mnist"] = float((fm["noisy"] != fm["clean"]).mean())
            rows += run_setting("fashion-mnist", fm["noisy"], fm["probs"], fm["clean"], work,
                                extra={"probs_from": fm["description"]})
    result = {
        "rows": rows,
        "noise_rate": noise_rate,
        "generator": "cleanlab.benchmarking.noise_generation: trace 0.8 K, valid_noise_matrix, frac_zero_noise_rates 0.99 at K >= 1000",
        "seconds": time.time() - start,
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "numpy": np.__version__,
                    "cleanlab": cleanlab.__version__, "python": platform.python_version()},
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    for suffix, text in ((".json", json.dumps(result, indent=1)), (".md", markdown(result))):
        tmp = out.with_name(f".{out.name}{suffix}.tmp")  # an interrupt mid-write left the results truncated
        tmp.write_text(text)
        os.replace(tmp, out.with_suffix(suffix))
    print(markdown(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
