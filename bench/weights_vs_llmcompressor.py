"""prunekit vs llm-compressor 0.14: Wanda and SparseGPT on SmolLM2-135M, side by side in one run.

Both tools get the same 128 x 512 calibration windows of Wikipedia leads (the calibration split of
`prunekit.text`: nine tenths of the leads by title), prune the same layers (every Linear of the 30 decoder
blocks; nothing else: checked on the saved models), and are scored by the same perplexity code on the held-out
leads and on Pride and Prejudice. Each pruning job runs in its own process (llm-compressor in its own venv,
since it pins transformers<=5.17); `seconds` is the pruning call alone (model already loaded), `process_seconds`
the whole process, `peak_rss_mb` the worker process's own peak resident memory
(VmHWM) when the pruning call returns (`peak_rss_process_mb`: at exit, after saving).

    python bench/weights_vs_llmcompressor.py [--samples 128] [--seqlen 512] [--eval-tokens 16384] [--seed 0]

Writes bench/results/weights_vs_llmcompressor.json and .md.

`--dtype bfloat16` loads and prunes the model in bfloat16 in both tools (prunekit's `--compute-dtype bfloat16`;
llm-compressor's model loaded in bfloat16, as its examples do); the statistics are float32 in both. The pruned
models are scored in float32, and the dense row is the float32 model rounded to bfloat16. Its results go to
bench/results/weights_vs_llmcompressor_bf16.json and .md unless `--out` says otherwise.

`--ratio R` sets the unstructured configs' ratio (default 0.5; another ratio needs its own `--out`), and a config
`method/unstructured/owl` gives both tools OWL's block ratios (prunekit `--profile owl`, llm-compressor
`sparsity_profile="owl"`, M 5, lambda 0.08); llm-compressor 0.14.0.1's OWL fails in `oneshot`, and its row records
the error.

`--seed N` draws other calibration windows (the same ones for both tools); its rows carry `seed` and sit beside
the other seeds' rows (a run replaces its own seed's rows only; a results file of other settings is refused:
give such a run another `--out`). One seed's perplexities move by a few percent with nothing but floating-point rounding (a
batch size, a library version), more than the 1% target, so the markdown also compares the tools' means over
the seeds that ran. Seeds can run in parallel into other files (`--out`) and be merged (`--merge`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import prunekit  # noqa: E402
from llmc_env import ensure_llmc_venv  # noqa: E402
from prunekit.weights.engine import find_blocks, target_linears  # noqa: E402

CONFIGS = [("wanda", "unstructured"), ("wanda", "2:4"), ("sparsegpt", "unstructured"), ("sparsegpt", "2:4")]


def run_worker(cmd: list[str]) -> dict:
    """Run a worker; return its JSON line (seconds of the pruning call, its own peak RSS) plus wall seconds.

    The peak RSS comes from the worker's /proc/self/status VmHWM: wait4's ru_maxrss would count the parent's
    memory at fork time, which is this (large) benchmark process.
    """
    start = time.perf_counter()
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.run(cmd, stdout=out, stderr=err, text=True)
        wall = time.perf_counter() - start
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode:
        raise RuntimeError(f"{' '.join(cmd[:2])} failed ({proc.returncode}):\n{stderr[-3000:]}")
    result = json.loads(stdout.strip().splitlines()[-1])
    result["process_seconds"] = wall
    return result


def check_changes(dense_state: dict, folder: Path, pattern: str) -> dict:
    """Which tensors the tool changed (only block Linears may), their sparsity, and N:M conformance."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, use_kernels=False).eval()
    prefix, blocks = find_blocks(model)
    targets = {f"{n}.weight" for i, b in enumerate(blocks) for n in target_linears(b, f"{prefix}.{i}")}
    state = model.state_dict()
    changed = [k for k, v in state.items() if not torch.equal(v, dense_state[k])]
    unexpected = sorted(set(changed) - targets)
    untouched = sorted(targets - set(changed))
    info = {"changed": len(changed), "unexpected_changed": unexpected, "targets_unchanged": untouched,
            "sparsity": prunekit.sparsity(model)["total"]}
    if pattern != "unstructured":
        info["pattern_violations"] = prunekit.check_pattern(model, pattern)
    return model, info


def mask_difference(folder_a: Path, folder_b: Path) -> dict:
    """How far two tools' masks differ: the fraction of block Linear weights kept by one and pruned by the other,
    and the first block where any differs (None: identical masks)."""
    from safetensors.torch import load_file

    def weights(folder):
        out = {}
        for f in sorted(folder.glob("*.safetensors")):
            out.update(load_file(f))
        return {k: v for k, v in out.items() if ".layers." in k and k.endswith(".weight") and v.ndim == 2}

    a, b = weights(folder_a), weights(folder_b)
    total = differ = 0
    first = None
    for k in sorted(a, key=lambda k: int(k.split(".layers.")[1].split(".")[0])):
        d = int(((a[k] != 0) != (b[k] != 0)).sum())
        total, differ = total + a[k].numel(), differ + d
        if d and first is None:
            first = int(k.split(".layers.")[1].split(".")[0])
    return {"mask_differs": differ / total, "first_block_differing": first}


def _write(path: Path, text: str) -> None:
    """Write through a temporary sibling: an interrupt mid-write left the committed results truncated."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=128)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    ap.add_argument("--configs", default=",".join(f"{m}/{p}" for m, p in CONFIGS),
                    help="method/pattern[/owl],...: /owl gives both tools OWL's block ratios (prunekit --profile owl, "
                    "llm-compressor sparsity_profile='owl'; M 5, lambda 0.08) around --ratio")
    ap.add_argument("--ratio", type=float, default=0.5, help="the unstructured configs' ratio (default 0.5)")
    ap.add_argument("--tools", default="llmcompressor,prunekit",
                    help="prunekit = default (reference) order; prunekit-layer = --sequential layer")
    ap.add_argument("--work", default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--update", action="store_true",
                    help="re-run only --configs and replace their rows in the existing results (other rows keep "
                    "their earlier run; every row records when it ran)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the calibration windows (both tools get the same)")
    ap.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                    help="the dtype both tools load and prune the model in")
    ap.add_argument("--out", default=None,
                    help="results JSON (the markdown goes beside it; default results/weights_vs_llmcompressor.json, "
                    "with --dtype bfloat16 results/weights_vs_llmcompressor_bf16.json)")
    ap.add_argument("--merge", nargs="+", default=None, metavar="JSON",
                    help="merge these results files' rows into --out (same tool, config and seed: replaced), "
                    "rewrite the markdown, exit")
    ap.add_argument("--repeats", type=int, default=1,
                    help="prune each config this many times per tool, the tools' order alternating between repeats; "
                    "`seconds` and `peak_rss_mb` are the medians, every run is kept in `runs`")
    args = ap.parse_args()
    suffix = "" if args.dtype == "float32" else "_bf16"
    out_json = Path(args.out or HERE / "results" / f"weights_vs_llmcompressor{suffix}.json")
    if args.merge:
        if not out_json.exists():
            raise SystemExit(f"--merge: {out_json} does not exist; --out names the results file to merge into")
        record = json.loads(out_json.read_text())
        for extra in args.merge:
            rows = json.loads(Path(extra).read_text())["rows"]
            keys = {row_key(r) for r in rows}
            record["rows"] = [r for r in record["rows"] if row_key(r) not in keys] + rows
        sort_rows(record)
        out_json.write_text(json.dumps(record, indent=2) + "\n")
        write_markdown(record, out_json.with_suffix(".md"))
        print(out_json.with_suffix(".md").read_text())
        return 0
    if args.repeats < 1:
        raise SystemExit("--repeats must be >= 1")
    earlier = json.loads(out_json.read_text()) if out_json.exists() else None
    if earlier is not None:  # a smoke run (--samples 4) or another seed replaced the committed file whole
        had = (earlier["calibration"].get("samples"), earlier["calibration"].get("seqlen"),
               earlier["evaluation"]["wiki"].get("tokens"))
        now = (args.samples, args.seqlen, args.eval_tokens // args.seqlen * args.seqlen)
        if had != now or earlier.get("dtype", "float32") != args.dtype or earlier.get("ratio", 0.5) != args.ratio:
            raise SystemExit(f"{out_json} holds results of other settings (samples, seqlen, eval tokens = {had}, dtype "
                             f"{earlier.get('dtype', 'float32')}, ratio {earlier.get('ratio', 0.5)}; this run {now}, "
                             f"{args.dtype}, ratio {args.ratio}); give this run another "
                             "--out")

    model_dir = prunekit.zoo.model_path("smollm2-135m")
    llmc_python = ensure_llmc_venv() if "llmcompressor" in args.tools else None
    work = Path(args.work or tempfile.mkdtemp(prefix="prunekit-bench-"))
    work.mkdir(parents=True, exist_ok=True)

    dense, tok = prunekit.load_model(model_dir)
    if args.dtype != "float32":  # what both tools start from; scored (and compared with) in float32
        dense = dense.to(getattr(torch, args.dtype)).float()
    calib_text = prunekit.load_text("wiki", purpose="calibration")
    ids = prunekit.calibration_ids(tok, calib_text, samples=args.samples, seqlen=args.seqlen, seed=args.seed)
    calib_file = work / "calib.safetensors"
    save_file({"input_ids": ids.contiguous()}, calib_file)
    texts = {"wiki": prunekit.load_text("wiki", purpose="evaluation"),
             "austen": prunekit.load_text("austen", purpose="evaluation")}

    def ppl(model) -> dict:
        return {f"ppl_{k}": prunekit.perplexity(model, tok, t, seqlen=args.seqlen, tokens=args.eval_tokens,
                                                progress=False).ppl for k, t in texts.items()}

    dense_state = {k: v.clone() for k, v in dense.state_dict().items()}
    record = {
        "model": "smollm2-135m (SmolLM2-135M-Instruct dequantized from GGUF Q4_1 to fp32)",
        "calibration": {**calib_text.describe(), "samples": args.samples, "seqlen": args.seqlen},
        "evaluation": {k: {**t.describe(), "tokens": args.eval_tokens // args.seqlen * args.seqlen, "seqlen": args.seqlen}
                       for k, t in texts.items()},
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "torch": torch.__version__,
                    "threads": torch.get_num_threads()},
        "dtype": args.dtype,
        "ratio": args.ratio,
        "dense": ppl(dense),
        "rows": [],
    }
    del dense
    print(f"dense: {record['dense']}", file=sys.stderr)
    out_json.parent.mkdir(exist_ok=True)
    rerun = {config_key(item) for item in args.configs.split(",")}
    same_dense = earlier is not None and (abs(earlier["dense"]["ppl_wiki"] - record["dense"]["ppl_wiki"])
                                          <= 1e-6 * record["dense"]["ppl_wiki"])
    if args.update and earlier is not None:
        if not same_dense:
            raise SystemExit("--update: the dense model or evaluation changed since the earlier run; re-run everything")
        record["rows"] = [r for r in earlier["rows"] if (r["method"], r["pattern"], r.get("profile", "uniform"))
                          not in rerun
                          or r.get("seed", 0) != args.seed or r["tool"] not in args.tools.split(",")]
        # (the other tools' rows of a re-run config stay: `--tools prunekit-layer --update` dropped llm-compressor's)
    elif same_dense:  # another seed's rows stay beside this seed's (they were dropped)
        record["rows"] = [r for r in earlier["rows"] if r.get("seed", 0) != args.seed]

    for item in args.configs.split(","):
        method, pattern, profile = config_key(item)
        owl = ["--profile", "owl", "--owl-m", "5", "--owl-lambda", "0.08"] if profile == "owl" else []
        tools = args.tools.split(",")
        rows: dict[str, dict] = {}
        for rep in range(args.repeats):  # side by side: both tools for one config before the next
            for tool in (tools if rep % 2 == 0 else tools[::-1]):
                out = work / f"{tool}-{method}-{pattern.replace(':', 'of')}{'-owl' if owl else ''}"
                if out.exists():
                    shutil.rmtree(out)
                common = ["--model", str(model_dir), "--calib", str(calib_file), "--method", method,
                          "--pattern", pattern, "--ratio", str(args.ratio), "--out", str(out), "--dtype", args.dtype,
                          *owl]
                if tool == "llmcompressor":
                    try:
                        res = run_worker([str(llmc_python), str(HERE / "_llmc_worker.py"), *common])
                    except RuntimeError as err:  # its OWL fails in 0.14.0.1: say so in a row, go on with prunekit
                        if profile != "owl":
                            raise
                        last = [line for line in str(err).splitlines() if line.strip()][-1]
                        rows[tool] = {"tool": tool, "method": method, "pattern": pattern, "seed": args.seed,
                                      "profile": profile, "error": last.strip(),
                                      "ran": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                                      "versions": {"llmcompressor": "0.14.0.1"}}
                        print(json.dumps(rows[tool]), file=sys.stderr)
                        continue
                else:  # "prunekit" (default order) or "prunekit-layer" (--sequential layer)
                    order = ["--sequential", "layer"] if tool == "prunekit-layer" else []
                    res = run_worker([sys.executable, str(HERE / "_prunekit_worker.py"), *common, *order])
                model, info = check_changes(dense_state, out, pattern)
                run = {**ppl(model), "seconds": res["seconds"], "process_seconds": res["process_seconds"],
                       "peak_rss_mb": res["peak_rss_mb"], "peak_rss_process_mb": res["peak_rss_process_mb"],
                       "ran": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
                       "versions": {k: res[k] for k in ("llmcompressor", "transformers", "prunekit") if k in res}}
                del model
                row = rows.setdefault(tool, {"tool": tool, "method": method, "pattern": pattern, "seed": args.seed,
                                             "profile": profile, "runs": []})
                if res.get("block_ratios"):  # prunekit's OWL ratios, per block
                    row["block_ratios"] = res["block_ratios"]
                row["runs"].append(run)
                row.update({**run, **info})
                for key in ("seconds", "process_seconds", "peak_rss_mb", "peak_rss_process_mb"):
                    row[key] = statistics.median(r[key] for r in row["runs"])
                peer_out = work / f"llmcompressor-{method}-{pattern.replace(':', 'of')}{'-owl' if owl else ''}"
                if tool != "llmcompressor" and peer_out.exists():
                    row |= mask_difference(peer_out, out)
                print(json.dumps(row), file=sys.stderr)
        record["rows"].extend(rows[t] for t in tools)
        _write(out_json, json.dumps(record, indent=2) + "\n")  # partial results survive an interrupt
    sort_rows(record)
    _write(out_json, json.dumps(record, indent=2) + "\n")
    write_markdown(record, out_json.with_suffix(".md"))
    print(out_json.with_suffix(".md").read_text())
    return 0


def config_key(item: str) -> tuple[str, str, str]:
    """``"wanda/unstructured/owl"`` -> (method, pattern, profile); the profile defaults to uniform."""
    parts = item.split("/")
    if len(parts) not in (2, 3) or (len(parts) == 3 and parts[2] not in ("uniform", "owl")):
        raise SystemExit(f"--configs: {item!r} is not method/pattern or method/pattern/owl")
    if len(parts) == 3 and parts[2] == "owl" and parts[1] != "unstructured":
        raise SystemExit(f"--configs: {item!r}: OWL sets unstructured ratios per block")
    return parts[0], parts[1], parts[2] if len(parts) == 3 else "uniform"


def row_key(r: dict) -> tuple:
    return r["tool"], r["method"], r["pattern"], r.get("seed", 0), r.get("profile", "uniform")


def sort_rows(record: dict) -> None:
    """Rows by seed, then config; ``calibration.seeds`` lists the seeds present (each row carries its own)."""
    order = {c: i for i, c in enumerate(CONFIGS)}
    record["rows"].sort(key=lambda r: (r.get("seed", 0), order.get((r["method"], r["pattern"]), len(order)),
                                       r.get("profile", "uniform") == "owl"))
    record["calibration"].pop("seed", None)  # written by runs before rows carried their seed
    record["calibration"]["seeds"] = sorted({r.get("seed", 0) for r in record["rows"]})


def _side_by_side(row: dict, peer: dict) -> bool:
    """Whether two rows were timed in one run (within an hour; rows from before runs were dated count as one)."""
    if "ran" not in row or "ran" not in peer:
        return True
    when = [time.mktime(time.strptime(x["ran"], "%Y-%m-%d %H:%M UTC")) for x in (row, peer)]
    return abs(when[0] - when[1]) <= 3600


def write_markdown(record: dict, path: Path) -> None:
    ev = record["evaluation"]
    cal = record["calibration"]
    main_seed = min((r.get("seed", 0) for r in record["rows"]), default=0)  # 0, or a seed-only file's seed
    lines = [
        "# prunekit vs llm-compressor: weight pruning on SmolLM2-135M",
        "",
        f"Calibration: {cal['samples']} x {cal['seqlen']} tokens of Wikipedia leads ({cal['documents']}). "
        f"Perplexity: held-out Wikipedia leads {ev['wiki']['tokens'] // ev['wiki']['seqlen']} x {ev['wiki']['seqlen']} tokens; "
        f"Pride and Prejudice {ev['austen']['tokens'] // ev['austen']['seqlen']} x {ev['austen']['seqlen']} tokens. " +
        (f"Dense (dequantized fp32): wiki {record['dense']['ppl_wiki']:.3f}, "
         f"austen {record['dense']['ppl_austen']:.3f}. "
         if record.get("dtype", "float32") == "float32" else
         f"Both tools load and prune the model in {record['dtype']} (statistics in float32); every model is scored in "
         f"float32. Dense (the dequantized fp32 model rounded to {record['dtype']}): wiki "
         f"{record['dense']['ppl_wiki']:.3f}, austen {record['dense']['ppl_austen']:.3f}. ") +
        f"Machine: {record['machine']['cpus']} CPUs, torch {record['machine']['torch']}. "
        f"This table: calibration seed {main_seed}" + (f"; unstructured ratio {record['ratio']:g}" if
                                                       record.get("ratio", 0.5) != 0.5 else "") + ".",
        "",
        "| method | pattern | tool | ppl wiki | ppl austen | seconds | peak RSS MB | ppl ratio (wiki/austen) | time ratio | memory ratio | masks differ (first block) |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | ---: | ---: | ---: |",
    ]
    main_rows = [r for r in record["rows"] if r.get("seed", 0) == main_seed]
    by = {(r["tool"], r["method"], r["pattern"], r.get("profile", "uniform")): r for r in main_rows}
    for r in main_rows:
        method = r["method"] + (" + OWL" if r.get("profile") == "owl" else "")
        if "error" in r:  # the tool failed on this config
            lines.append(f"| {method} | {r['pattern']} | {r['tool']} | failed: {r['error']} | | | | | | | |")
            continue
        peer = by.get(("llmcompressor", r["method"], r["pattern"], r.get("profile", "uniform")))
        if peer is not None and "error" in peer:
            peer = None
        ratios = "| |"  # three empty ratio cells (with "| | |" the row had 12 cells under 11 columns)
        if r["tool"].startswith("prunekit") and peer:
            time_ratio = f"{r['seconds'] / peer['seconds']:.2f}" if _side_by_side(r, peer) else "-"
            ratios = (f"{r['ppl_wiki'] / peer['ppl_wiki']:.3f} / {r['ppl_austen'] / peer['ppl_austen']:.3f} | "
                      f"{time_ratio} | {r['peak_rss_mb'] / peer['peak_rss_mb']:.2f}")
        first = r.get("first_block_differing")
        masks = f"{r['mask_differs']:.2%} ({'-' if first is None else first})" if "mask_differs" in r else ""
        runs = r.get("runs") or []
        each = ", ".join(f"{x['seconds']:.0f}" for x in runs)
        secs = f"{r['seconds']:.1f}" + (f" ({each})" if len(runs) > 1 else "")
        lines.append(f"| {method} | {r['pattern']} | {r['tool']} | {r['ppl_wiki']:.3f} | {r['ppl_austen']:.3f} | "
                     f"{secs} | {r['peak_rss_mb']:.0f} | {ratios} | {masks} |")
    lines += ["", "Ratios are prunekit / llm-compressor (targets: ppl <= 1.01, time <= 0.7, memory <= 1.0). "
              "`seconds` is the pruning call alone; every tool pruned exactly the 210 block Linears "
              "(`changed`/`unexpected_changed` in the JSON). `prunekit` runs the reference order "
              "(`--sequential block`, the default); `prunekit-layer` the one-pass order (`--sequential layer`). "
              "`masks differ`: the share of the block Linears' weights that one tool keeps and the other prunes, and "
              "the first block (of 30) where any differs; the blocks before it have identical masks. Rows whose "
              "`ran` dates differ in the JSON were re-run with `--update`; a time ratio is given only for a row that "
              "ran within an hour of the peer's (`-` otherwise: another time, another load on the shared machine). "
              "A row run with `--repeats N` shows the "
              "median `seconds` and, in brackets, each run's (the tools' order alternated between repeats). "
              "Runs since 2026-11-29 19:35 UTC record both tools' versions (`versions`): the llm-compressor venv pins "
              "only llmcompressor==0.14.0.1, so a venv rebuilt later may bring other dependency versions."]
    if any(r.get("profile") == "owl" for r in record["rows"]):
        lines += ["", "`+ OWL`: both tools set each block's ratio from its share of outlier |W| x ||X|| scores (M 5, "
                  "lambda 0.08; prunekit `--profile owl`, llm-compressor `sparsity_profile=\"owl\"`), averaging the "
                  "unstructured ratio."]
    lines += seed_table(record["rows"])
    path.write_text("\n".join(lines) + "\n")


def seed_table(rows: list[dict]) -> list[str]:
    """Perplexity over calibration seeds: each tool's mean per config, the ratio of the means, each seed's ratio."""
    seeds = sorted({r.get("seed", 0) for r in rows})
    if len(seeds) < 2:
        return []
    by = {row_key(r): r for r in rows}
    lines = ["", "## Over calibration seeds", "",
             "The seed draws the 128 calibration windows (both tools get the same ones); the table above shows the "
             "lowest seed. Perplexity is the mean over the seeds where both tools ran; `ratio of means` is prunekit's mean over "
             "llm-compressor's (target <= 1.01); then each seed's ratio. Only perplexity is compared here: the "
             "seed runs may have shared the machine, so their `seconds` are not timings.", "",
             "| method | pattern | seeds | llm-compressor wiki / Austen | prunekit wiki / Austen | ratio of means "
             "(wiki / Austen) | per-seed ratios wiki | per-seed ratios Austen |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for method, pattern in CONFIGS:
        tools = ("llmcompressor", "prunekit")
        both = [s for s in seeds if all((tool, method, pattern, s, "uniform") in by for tool in tools)]
        if len(both) < 2:
            continue
        ppl = {(tool, s, t): by[(tool, method, pattern, s, "uniform")][f"ppl_{t}"] for tool in tools for s in both
               for t in ("wiki", "austen")}
        mean = {tool: {t: statistics.mean(ppl[(tool, s, t)] for s in both) for t in ("wiki", "austen")}
                for tool in tools}
        each = {t: ", ".join(f"{ppl[('prunekit', s, t)] / ppl[('llmcompressor', s, t)]:.3f}" for s in both)
                for t in ("wiki", "austen")}
        lm, pk = mean["llmcompressor"], mean["prunekit"]
        lines.append(f"| {method} | {pattern} | {','.join(map(str, both))} | {lm['wiki']:.3f} / {lm['austen']:.3f} | "
                     f"{pk['wiki']:.3f} / {pk['austen']:.3f} | {pk['wiki'] / lm['wiki']:.3f} / "
                     f"{pk['austen'] / lm['austen']:.3f} | {each['wiki']} | {each['austen']} |")
    return lines


if __name__ == "__main__":
    sys.exit(main())
