"""Seed weight methods on SmolLM2-135M: DSnoT, ARMOR and D-Pruner next to the baselines they build on.

Same rules as `bench/weights_vs_llmcompressor.py`: calibration 128 x 512 tokens (seed 0) of the Wikipedia
leads' calibration split (D-Pruner's and the domain-only baselines' domain text: the Python documentation's
calibration split), perplexity on 32 x 512 tokens of held-out Wikipedia leads and of held-out Python
documentation, the block Linears pruned in the reference order. Every row starts from a fresh copy of the
model and runs in this process, one after another.

    python bench/seed_weights.py                   # every row (about two hours on 2 CPU cores)
    python bench/seed_weights.py --only dsnot      # one section: dsnot, armor or dpruner
    python bench/seed_weights.py --resume          # skip rows already in the results file

Writes bench/results/seed_weights.json (``{"rows": [{"method", "base", "pattern", "ppl_wiki", "ppl_domain",
"seconds", ...}]}``, rows merged by id so sections can run separately) and bench/results/seed_weights.md.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.weights.methods import dpruner

RESULTS = Path(__file__).resolve().parent / "results"
SAMPLES, SEQLEN, EVAL_TOKENS = 128, 512, 32 * 512
DOMAIN_SAMPLES = 64  # D-Pruner's domain windows (backprop: ~15 s per 2 x 512 on 2 cores)
PATTERNS = {"50%": (0.5, None), "60%": (0.6, None), "2:4": (None, "2:4")}


ORDER = [  # what the targets need first (DSnoT at 60%, ARMOR against 2:4, D-Pruner), then the rest
    "dense", "magnitude-60%", "dsnot-magnitude-60%", "wanda-60%", "dsnot-wanda-60%", "sparsegpt-60%",
    "dsnot-sparsegpt-60%", "sparsegpt-2:4", "armor-2:4", "wanda-2:4", "wanda-50%", "sparsegpt-50%",
    "wanda-domain-50%", "sparsegpt-domain-50%", "dpruner-50%", "dpruner-paper-50%", "dsnot-noguard-wanda-60%",
    "dsnot-t0.1+mlp-wanda-60%",
]


def _rows() -> list[dict]:
    rows = [dict(id="dense", section="dense", method="dense", base=None, pattern=None)]
    for pat in ("60%", "2:4", "50%"):
        for base in ("magnitude", "wanda", "sparsegpt"):
            rows.append(dict(id=f"{base}-{pat}", section="dsnot", method=base, base=None, pattern=pat))
            # the reference's setting (MLP layers skipped, no OBS update)
            rows.append(dict(id=f"dsnot-{base}-{pat}", section="dsnot", method="dsnot", base=base, pattern=pat,
                             options={"base": base, "skip_mlp": True, "obs_update": False}))
            # prunekit's defaults: every layer refined (SparseGPT's OBS update recomputed for the final mask)
            rows.append(dict(id=f"dsnot+mlp-{base}-{pat}", section="dsnot", method="dsnot", base=base, pattern=pat,
                             options={"base": base, "skip_mlp": False, "obs_update": True}))
            if pat == "60%":  # update_threshold 0.1 taken as it is (not rescaled from 2048- to 512-token sums)
                rows.append(dict(id=f"dsnot-t0.1-{base}-{pat}", section="dsnot", method="dsnot", base=base,
                                 pattern=pat, options={"base": base, "threshold_seqlen": None, "skip_mlp": True,
                                                       "obs_update": False}))
            if pat == "60%" and base == "sparsegpt":  # the OBS update alone, and the MLP layers alone
                rows.append(dict(id=f"dsnot+obs-{base}-{pat}", section="dsnot", method="dsnot", base=base,
                                 pattern=pat, options={"base": base, "skip_mlp": True, "obs_update": True}))
                rows.append(dict(id=f"dsnot+mlp-noobs-{base}-{pat}", section="dsnot", method="dsnot", base=base,
                                 pattern=pat, options={"base": base, "skip_mlp": False, "obs_update": False}))
            if pat == "60%" and base == "wanda":
                rows.append(dict(id=f"dsnot-t0.1+mlp-{base}-{pat}", section="dsnot", method="dsnot", base=base,
                                 pattern=pat, options={"base": base, "skip_mlp": False, "threshold_seqlen": None}))
                # the reference's behaviour: no guard on the exact reconstruction error
                rows.append(dict(id=f"dsnot-noguard-{base}-{pat}", section="dsnot", method="dsnot", base=base,
                                 pattern=pat, options={"base": base, "guard": False, "threshold_seqlen": None,
                                                       "skip_mlp": True}))
    rows.append(dict(id="armor-2:4", section="armor", method="armor", base=None, pattern="2:4"))
    rows.append(dict(id="armor-bs128-2:4", section="armor", method="armor", base=None, pattern="2:4",
                     options={"block_size": 128}))
    for method in ("wanda", "sparsegpt"):
        rows.append(dict(id=f"{method}-domain-50%", section="dpruner", method=method, base=None, pattern="50%",
                         calib="python-docs"))
    rows.append(dict(id="dpruner-50%", section="dpruner", method="dpruner", base=None, pattern="50%",
                     options={"domain": "python-docs", "domain_samples": DOMAIN_SAMPLES, "lam": dpruner.LAM,
                              "general_weight": dpruner.GENERAL_WEIGHT}))  # the defaults, recorded as they ran
    # the paper's form: the general importance only through the regulariser (prunekit's defaults before
    # 2026-11-29's seventh session)
    rows.append(dict(id="dpruner-paper-50%", section="dpruner", method="dpruner", base=None, pattern="50%",
                     options={"domain": "python-docs", "domain_samples": DOMAIN_SAMPLES, "lam": 10.0,
                              "general_weight": 0.0}))
    rank = {rid: i for i, rid in enumerate(ORDER)}
    return sorted(rows, key=lambda r: rank.get(r["id"], len(ORDER)))


def _load(path: Path) -> dict:
    if path.is_file():
        return json.loads(path.read_text())
    return {"rows": []}


def _linear_params(model) -> int:
    from prunekit.weights.engine import find_blocks, target_linears

    prefix, blocks = find_blocks(model)
    return sum(get.weight.numel() for i, b in enumerate(blocks) for get in target_linears(b, f"{prefix}.{i}").values())


def run_row(row: dict, texts: dict) -> dict:
    torch.manual_seed(0)
    model, tok = prunekit.load_model("smollm2-135m")
    seconds, result = 0.0, None
    if row["method"] != "dense":
        ratio, pattern = PATTERNS[row["pattern"]]
        # magnitude reads no data: calibrating it would only measure its reconstruction error, at a full pass's cost
        calib = None if row["method"] == "magnitude" else texts["calib-" + row.get("calib", "wiki")]
        linear = _linear_params(model)
        start = time.perf_counter()
        result = prunekit.prune(model, method=row["method"], ratio=ratio, pattern=pattern, calibration=calib,
                                tokenizer=tok, samples=SAMPLES, seqlen=SEQLEN, seed=0, progress=False,
                                **row.get("options", {}))
        seconds = time.perf_counter() - start
    out = {k: row.get(k) for k in ("id", "section", "method", "base", "pattern")}
    out["calibration"] = row.get("calib", "wiki") if row["method"] != "dense" else None
    out["options"] = row.get("options", {})
    for key, name in (("ppl_wiki", "eval-wiki"), ("ppl_domain", "eval-python-docs")):
        out[key] = prunekit.perplexity(model, tok, texts[name], seqlen=SEQLEN, tokens=EVAL_TOKENS, progress=False).ppl
    out["seconds"] = round(seconds, 1)
    if result is not None:
        out["sparsity"] = round(result.total_sparsity, 5)
        extra = sum(r.extra_params for r in result.layers)
        out["param_overhead"] = round(extra / linear, 4)
        infos = [r.info for r in result.layers if r.info]
        if row["method"] == "dsnot":
            out["swaps"] = sum(i.get("swaps", 0) for i in infos)
            out["layers_refined"] = sum(1 for i in infos if not i.get("skipped"))
        if row["method"] == "armor":
            out["proxy_loss_sparsegpt"] = sum(i["proxy_loss_sparsegpt"] for i in infos) / len(infos)
            out["proxy_loss_armor"] = sum(i["proxy_loss"] for i in infos) / len(infos)
            out["layers_below_sparsegpt"] = sum(i["proxy_loss"] <= i["proxy_loss_sparsegpt"] for i in infos)
        if result.mean_rel_error is not None:
            out["mean_rel_error"] = round(result.mean_rel_error, 5)
    return out


def _fmt(x, digits=3):
    return "" if x is None else f"{x:.{digits}f}"


def write_markdown(data: dict, path: Path) -> None:
    rows = {r["id"]: r for r in data["rows"]}
    meta = data.get("meta", {})
    lines = ["# Seed weight methods on SmolLM2-135M: DSnoT, ARMOR, D-Pruner", "",
             f"Calibration {SAMPLES} x {SEQLEN} tokens (seed 0) of Wikipedia leads (calibration split) unless the row "
             f"says python-docs; perplexity on {EVAL_TOKENS // SEQLEN} x {SEQLEN} held-out tokens of Wikipedia "
             "leads (`ppl_wiki`) and of the Python 3.11 documentation (`ppl_domain`). "
             f"Machine: {meta.get('machine', '?')}. `seconds` is the pruning call alone.", ""]
    if "dense" in rows:
        d = rows["dense"]
        lines += [f"Dense (dequantized fp32): wiki {_fmt(d['ppl_wiki'])}, python-docs {_fmt(d['ppl_domain'])}.", ""]
    settings = [  # (row id prefix, what it is)
        ("", "base alone"),
        ("dsnot-", "DSnoT, reference settings (MLP layers skipped)"),
        ("dsnot+mlp-", "DSnoT, prunekit's defaults: every layer refined (skip_mlp=False, obs_update=True)"),
        ("dsnot+obs-", "DSnoT, MLP layers skipped, obs_update=True"),
        ("dsnot+mlp-noobs-", "DSnoT, every layer refined, obs_update=False"),
        ("dsnot-t0.1-", "DSnoT, bare threshold 0.1"),
        ("dsnot-t0.1+mlp-", "DSnoT, bare threshold 0.1, every layer refined"),
        ("dsnot-noguard-", "DSnoT, bare threshold 0.1, no guard (the reference's swaps)"),
    ]
    lines += ["## DSnoT on each base mask", "",
              "| base | pattern | setting | ppl wiki | vs base | ppl docs | vs base | seconds | swaps |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for pat in ("60%", "2:4", "50%"):  # the target sparsity first
        for base in ("magnitude", "wanda", "sparsegpt"):
            b = rows.get(f"{base}-{pat}")
            for prefix, what in settings:
                r = rows.get(f"{prefix}{base}-{pat}")
                if not r:
                    continue
                rel = lambda k: f"{100 * (r[k] / b[k] - 1):+.1f}%" if b and prefix else ""  # noqa: E731
                lines.append(f"| {base} | {pat} | {what} | {_fmt(r['ppl_wiki'])} | {rel('ppl_wiki')} | "
                             f"{_fmt(r['ppl_domain'])} | {rel('ppl_domain')} | {r['seconds']:.1f} | {r.get('swaps', '')} |")
    lines += ["", "Reference settings: max_cycle_time 50, update_threshold 0.1 in the reference's 2048-token units (0.025 "
              "for these 512-token windows), pow_of_var_regrowing 1, MLP layers skipped (skip_mlp=True, obs_update=False); "
              "plus prunekit's guard (each row keeps the prefix of its swaps with the lowest exact reconstruction error). "
              "\"every layer refined\" (prunekit's defaults since the fifth session of 2026-11-29): the MLP "
              "layers too, and for a SparseGPT base its OBS update recomputed for the final mask (`obs_update`, which "
              "does nothing on the other bases). Every row records the options it ran with. \"bare threshold 0.1\": update_threshold 0.1 on 512-token sums "
              "(threshold_seqlen=None, rows stop 4x earlier). `vs base`: relative to the base mask alone.", ""]
    lines += ["## ARMOR 2:4", "", "Proxy loss: ``tr((W - W') H (W - W')^T) / tr(W H W^T)`` per layer on the calibration "
              "inputs, mean over the 210 layers (SparseGPT's is ARMOR's starting point in the same run).", "",
              "| method | ppl wiki | ppl docs | seconds | parameter overhead | mean proxy loss |",
              "| --- | ---: | ---: | ---: | ---: | ---: |"]
    for rid in ("wanda-2:4", "sparsegpt-2:4", "armor-2:4", "armor-bs128-2:4"):
        r = rows.get(rid)
        if r:
            armor = rows.get("armor-2:4", {})
            loss = (_fmt(r.get("proxy_loss_armor"), 4) if r["method"] == "armor"
                    else _fmt(armor.get("proxy_loss_sparsegpt"), 4) if rid == "sparsegpt-2:4" else "")
            name = r["method"] + (f" (block size {r['options']['block_size']})" if r.get("options", {}).get("block_size")
                                  else " (block size 32)" if r["method"] == "armor" else "")
            lines.append(f"| {name} | {_fmt(r['ppl_wiki'])} | {_fmt(r['ppl_domain'])} | {r['seconds']:.1f} | "
                         f"{100 * r.get('param_overhead', 0):.1f}% | {loss} |")
    lines += ["", "## D-Pruner at 50% against general-only and domain-only calibration", "",
              "| method | calibration | ppl wiki | ppl docs | seconds |", "| --- | --- | ---: | ---: | ---: |"]
    for rid in ("wanda-50%", "sparsegpt-50%", "wanda-domain-50%", "sparsegpt-domain-50%", "dpruner-50%",
                "dpruner-paper-50%"):
        r = rows.get(rid)
        if r:
            cal = "wiki + python-docs" if r["method"] == "dpruner" else r["calibration"]
            name = r["method"]
            if r["method"] == "dpruner":
                o = r.get("options", {})
                form = "the paper's form: " if rid == "dpruner-paper-50%" else ""
                name += (f" ({form}lam {o['lam']:g}, general_weight {o['general_weight']:g})" if "lam" in o
                         else " (lam 10, before general_weight existed)")
            lines.append(f"| {name} | {cal} | {_fmt(r['ppl_wiki'])} | {_fmt(r['ppl_domain'])} | {r['seconds']:.1f} |")
    if data.get("notes"):
        lines += ["", "## Notes", "", *[f"- {n}" for n in data["notes"]]]
    lines += ["", "An empty cell is a row not in the recorded results (run it with `--rows ID` or `--resume`)."]
    path.write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", choices=("dense", "dsnot", "armor", "dpruner"), action="append")
    ap.add_argument("--rows", default=None, help="comma-separated row ids")
    ap.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    ap.add_argument("--out", default=str(RESULTS / "seed_weights.json"))
    ap.add_argument("--merge", default=None, metavar="JSON",
                    help="only merge the rows of another results file (a section run elsewhere) into --out")
    args = ap.parse_args(argv)
    if args.merge:
        data, other = _load(Path(args.out)), _load(Path(args.merge))
        ids = {r["id"] for r in other["rows"]}
        data["rows"] = [r for r in data["rows"] if r["id"] not in ids] + other["rows"]
        data.setdefault("meta", other.get("meta", {}))
        Path(args.out).write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(data, Path(args.out).with_suffix(".md"))
        return 0
    torch.set_num_threads(torch.get_num_threads())
    path = Path(args.out)
    data = _load(path)
    done = {r["id"] for r in data["rows"]}
    rows = [r for r in _rows() if not args.only or r["section"] in args.only or r["id"] == "dense"]
    if args.rows:
        wanted = set(args.rows.split(","))
        rows = [r for r in _rows() if r["id"] in wanted]
    if args.resume:
        rows = [r for r in rows if r["id"] not in done]
    texts = {f"calib-{n}": prunekit.load_text(n, purpose="calibration") for n in ("wiki", "python-docs")}
    texts.update({f"eval-{n}": prunekit.load_text(n, purpose="evaluation") for n in ("wiki", "python-docs")})
    data["meta"] = {"machine": f"{torch.get_num_threads()} CPU threads, torch {torch.__version__}, python {platform.python_version()}",
                    "samples": SAMPLES, "seqlen": SEQLEN, "eval_tokens": EVAL_TOKENS,
                    "texts": {k: v.describe() for k, v in texts.items()}}
    for row in rows:
        t = time.perf_counter()
        out = run_row(row, texts)
        print(f"{row['id']}: wiki {out['ppl_wiki']:.3f} docs {out['ppl_domain']:.3f} prune {out['seconds']:.1f} s "
              f"(row {time.perf_counter() - t:.0f} s)", flush=True)
        data["rows"] = [r for r in data["rows"] if r["id"] != out["id"]] + [out]
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(path)
        write_markdown(data, path.with_suffix(".md"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
