"""Structured width pruning on SmolLM2-135M: Týr-the-Pruner, uniform, simple baselines, and Torch-Pruning.

Every row starts from a fresh copy of the dense model (fp32, dequantized from the zoo's 4-bit GGUF: the dense
baseline is already a little lossy), removes `ratio` of the decoder blocks' Linear weights (query heads, equal
per KV group, and MLP neurons: ``--structure both``), then measures:

- perplexity on held-out Wikipedia leads and on Pride and Prejudice (``--eval-tokens`` tokens, 512-token windows);
- measured CPU speed with ONE thread: prefill of 1 x 512 tokens and decode of 64 tokens, dense and pruned timed
  alternately in the same process (`--repeats` rounds; the fastest round of each, since other jobs on a shared
  CPU only add time; medians kept too), so a shared machine's load hits both alike;
- parameters of the whole model (embeddings included) and of the block Linears.

Torch-Pruning 1.6 (``GroupMagnitudeImportance(p=2)``, its LLM example's settings: no calibration, heads pruned
whole with ``prune_num_heads``, head dims kept, the hidden width kept like prunekit's rows) is the peer at the
same block parameter count (see `_torch_pruning`: on this GQA model it prunes MLP neurons only).

    python bench/structured.py --ratios 0.3                      # 30% rows (the first run)
    python bench/structured.py --ratios 0.2,0.5 --resume         # more budgets, rows already run kept
    python bench/structured.py --retime 5                        # re-measure every row's speed (a quiet machine)
    python bench/structured.py --retime 5 --only 'tyr-0.5-*'     # ... or only some rows'
    python bench/structured.py --calib wiki+austen --seed 1 --tag final1k \
        --tyr-options "iterations=2,generations=8,offspring=8,stages=256:2;1024:1"   # other settings, own ids

Writes bench/results/structured.json (``{"rows": [{"method", "removed", "ppl_wiki", "ppl_austen",
"prefill_speedup", "decode_speedup", "params", ...}], "settings": {...}}``), structured.md and structured.png.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

import prunekit
from prunekit.cli import _value
from prunekit.speed import measure_speed
from prunekit.structured.tyr import tyr_options

RESULTS = Path(__file__).resolve().parent / "results"
METHODS = ("tyr", "uniform-structured", "wanda-structured", "magnitude-structured", "torch-pruning")
TYR_OPTIONS = "iterations=2,generations=8,offspring=8,stages=256:2;8192:1"
DEFAULT_STAGES = [list(s) for s in tyr_options()["stages"]]  # the library's (rows before 2026-11-30: 256:2;1024:1)


def _opts(text: str) -> dict:
    out = {}
    for item in filter(None, text.split(",")):
        k, _, v = item.partition("=")
        out[k.strip()] = _value(v.strip().replace(";", ","))
    return out


def _block_linear_params(model) -> int:
    from prunekit.weights.engine import find_blocks

    _, blocks = find_blocks(model)
    return sum(m.weight.numel() for b in blocks for m in b.modules() if isinstance(m, torch.nn.Linear))


def _speed(dense, pruned, repeats: int) -> dict:
    d, p = [], []
    for _ in range(repeats):  # alternate, so load on the shared machine hits both alike
        d.append(measure_speed(dense, repeats=1))
        p.append(measure_speed(pruned, repeats=1))
    # the fastest round of each: on a shared CPU other jobs only ever add time, so the minimum is the least
    # disturbed measurement; the medians are kept for the record
    low = lambda rows, k: min(r[k] for r in rows)  # noqa: E731
    med = lambda rows, k: statistics.median(r[k] for r in rows)  # noqa: E731
    out = {"dense_prefill_s": low(d, "prefill_s"), "pruned_prefill_s": low(p, "prefill_s"),
           "dense_decode_s": low(d, "decode_s_per_token"), "pruned_decode_s": low(p, "decode_s_per_token"),
           "median_prefill_speedup": med(d, "prefill_s") / med(p, "prefill_s"),
           "median_decode_speedup": med(d, "decode_s_per_token") / med(p, "decode_s_per_token"),
           "dense_param_mb": d[0]["param_bytes"] / 2**20, "pruned_param_mb": p[0]["param_bytes"] / 2**20}
    out["prefill_speedup"] = out["dense_prefill_s"] / out["pruned_prefill_s"]
    out["decode_speedup"] = out["dense_decode_s"] / out["pruned_decode_s"]
    return out


def _ppl(model, tok, texts, eval_tokens) -> dict:
    return {f"ppl_{k}": prunekit.perplexity(model, tok, t, seqlen=512, tokens=eval_tokens, progress=False).ppl
            for k, t in texts.items()}


def _torch_pruning(model, target_block_params: int) -> dict:
    """Torch-Pruning 1.6, magnitude importance, at `target_block_params` block Linear weights; returns its settings.

    Its LLM example's settings (GroupMagnitudeImportance(p=2), local ratios, num_heads, head dims kept) with
    o_proj / down_proj / lm_head ignored so the hidden width stays, as in prunekit's rows. DepGraph cannot trace
    transformers' SDPA path with GQA here (``shape '[9, -1]' is invalid``), so the graph is built with eager
    attention (the same math). Head pruning is off (``prune_num_heads=False``) and it prunes MLP neurons only,
    at the channel ratio that removes the target's block weights: with the example's ``prune_num_heads=True``
    and ``head_pruning_ratio`` = that ratio, it pruned no query heads at 30% and 50% but 3 of 9 at 20%
    (on top of the neurons: 26% of the block weights instead of 20%), so the budget would not match.
    """
    import torch_pruning as tp

    from prunekit.weights.engine import find_blocks

    cfg = model.config
    _, blocks = find_blocks(model)
    dense_block = _block_linear_params(model)
    mlp = sum(b.mlp.gate_proj.weight.numel() * 3 for b in blocks)
    ratio = (dense_block - target_block_params) / mlp
    num_heads = {}
    for b in blocks:
        a = b.self_attn
        num_heads[a.q_proj] = cfg.num_attention_heads
        num_heads[a.k_proj] = cfg.num_key_value_heads
        num_heads[a.v_proj] = cfg.num_key_value_heads
    ignored = [model.lm_head] + [b.self_attn.o_proj for b in blocks] + [b.mlp.down_proj for b in blocks]
    model.set_attn_implementation("eager")
    use_cache, model.config.use_cache = model.config.use_cache, False  # Torch-Pruning #461: it traces one tensor
    for p in model.parameters():
        p.requires_grad_(True)
    pruner = tp.pruner.BasePruner(
        model, torch.randint(0, cfg.vocab_size, (1, 16)), importance=tp.importance.GroupMagnitudeImportance(p=2),
        global_pruning=False, pruning_ratio=ratio, ignored_layers=ignored, num_heads=num_heads,
        prune_num_heads=False, prune_head_dims=False, output_transform=lambda out: out.logits,
    )
    with torch.enable_grad():  # DepGraph traces autograd
        pruner.step()
    removed = dense_block - _block_linear_params(model)
    want = dense_block - target_block_params
    if abs(removed - want) > 3 * cfg.hidden_size * len(blocks):  # within one neuron per block
        raise RuntimeError(f"Torch-Pruning removed {removed:,} block weights, the target is {want:,}")
    model.set_attn_implementation("sdpa")
    model.config.use_cache = use_cache
    for b in blocks:
        a = b.self_attn
        a.num_key_value_groups = a.q_proj.out_features // a.k_proj.out_features
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    from importlib.metadata import version

    # the installed package's version: tp.__version__ says 1.6.0 in torch-pruning 1.6.1
    return {"channel_ratio": ratio, "importance": "GroupMagnitudeImportance(p=2)",
            "torch_pruning": version("torch-pruning")}


def _row_id(method: str, ratio: float, seed: int, calib: str = "wiki", tag: str = "") -> str:
    return (f"{method}-{ratio:g}" + ("" if calib == "wiki" else f"-{calib}") + (f"-s{seed}" if seed else "")
            + (f"-{tag}" if tag else ""))


def run_row(method: str, ratio: float, args, texts, dense, tok) -> dict:
    model, _ = prunekit.load_model("smollm2-135m")
    row = {"id": _row_id(method, ratio, args.seed, args.calib, args.tag), "method": method, "ratio": ratio,
           "structure": args.structure, "seed": args.seed, "calibration": args.calib}
    start = time.perf_counter()
    if method == "torch-pruning":
        from prunekit.structured.tyr import uniform_widths
        from prunekit.structured.units import block_params, layer_widths, model_dims

        dims = model_dims(model)
        target = block_params(dims, uniform_widths(dims, ratio=ratio, structure=args.structure))
        dense_block = _block_linear_params(model)
        row["peer"] = _torch_pruning(model, target)
        row["prune_seconds"] = time.perf_counter() - start
        row["widths"] = [[w.heads, w.intermediate] for w in layer_widths(model)]
        row["block_params"] = _block_linear_params(model)
        row["removed"] = 1 - row["block_params"] / dense_block
        row["params"] = sum(p.numel() for p in model.parameters())
        return _measure(row, model, args, texts, dense, tok)
    options = _opts(args.tyr_options) if method == "tyr" else {}
    result = prunekit.prune_structured(model, method=method, ratio=ratio, structure=args.structure, tokenizer=tok,
                                       calibration=args.calib, samples=args.samples, seqlen=args.seqlen,
                                       seed=args.seed, progress=not args.quiet, **options)
    row["prune_seconds"] = time.perf_counter() - start
    row["widths"] = [[w.heads, w.intermediate] for w in result.widths]
    if method == "tyr":
        row["search"] = result.info.get("search")
        row["options"] = result.info.get("options")
    row["removed"] = result.removed
    row["block_params"] = result.block_params_after
    row["params"] = result.params_after
    return _measure(row, model, args, texts, dense, tok)


def _measure(row, model, args, texts, dense, tok) -> dict:
    row.update(_ppl(model, tok, texts, args.eval_tokens))
    row.update(_speed(dense, model, args.repeats))
    row["param_reduction_speedup"] = row["dense_param_mb"] / row["pruned_param_mb"]
    row["block_reduction_speedup"] = 1 / (1 - row["removed"])
    return row


def _final_sequential(args, data: dict, out: Path) -> int:
    import numpy as np

    from prunekit.structured import tyr
    from prunekit.structured.units import Widths, block_params, layer_widths, model_dims

    src = next(r for r in data["rows"] if r["id"] == args.final_sequential)
    model, tok = prunekit.load_model("smollm2-135m")
    dims = model_dims(model)
    widths = [Widths(h, n) for h, n in src["widths"]]
    ids = prunekit.calibration_ids(tok, prunekit.load_text("wiki", purpose="calibration"), samples=args.samples,
                                   seqlen=args.seqlen, seed=0)
    start = time.perf_counter()
    subs = tyr._sublayers(dims, widths, args.structure, 1, 0)
    installer = tyr._Installer(model, dims)
    with torch.no_grad():
        tyr.build_supernet(model, tyr._calibration_batches(model, ids, 8), dims, subs, propagate="centre", damp=0.01,
                           neuron_step=16, progress=not args.quiet)
        installer.install(subs, np.zeros(len(subs), dtype=np.int64))
    assert layer_widths(model) == widths
    texts = {"wiki": prunekit.load_text("wiki", purpose="evaluation"),
             "austen": prunekit.load_text("austen", purpose="evaluation")}
    row = {"id": f"{src['id']}-final-sequential", "method": "tyr (final=sequential)", "ratio": src["ratio"],
           "structure": args.structure, "source_row": src["id"], "prune_seconds_after_search": time.perf_counter() - start,
           "removed": src["removed"], "block_params": block_params(dims, widths),
           "params": sum(p.numel() for p in model.parameters()), "widths": src["widths"]}
    row.update(_ppl(model, tok, texts, args.eval_tokens))
    data["rows"] = [r for r in data["rows"] if r["id"] != row["id"]] + [row]
    out.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, out.with_suffix(".md"))
    plot(data, out.with_suffix(".png"))
    print(json.dumps({k: v for k, v in row.items() if k != "widths"}), flush=True)
    return 0


def _shaped(dense, widths):
    """A copy of `dense` cut to `widths` (the first heads of each KV group, the first neurons): the same shapes as
    the row's model, which is all its speed depends on (the weights kept do not change the FLOPs)."""
    import copy

    from prunekit.structured.units import attention, mlp_of, model_dims, shrink_attention, shrink_mlp
    from prunekit.weights.engine import find_blocks

    model, dims = copy.deepcopy(dense), model_dims(dense)
    per = dims.heads // dims.kv_heads
    with torch.no_grad():
        for block, (heads, neurons) in zip(find_blocks(model)[1], widths):
            if heads < dims.heads:
                keep = [g * per + i for g in range(dims.kv_heads) for i in range(heads // dims.kv_heads)]
                shrink_attention(attention(block), torch.tensor(keep), kv_heads=dims.kv_heads)
            if neurons < dims.intermediate:
                shrink_mlp(mlp_of(block), torch.arange(neurons))
    return model


def retime(data: dict, out: Path, rounds: int, only: str | None = None) -> int:
    """Re-measure every row's speed (or the rows `only` names: comma-separated ids, ``*`` and ``?`` allowed) on
    this machine, e.g. once it is quiet, from its widths; rows with the same widths share one measurement. The
    figures measured during the runs move to ``speed_history``."""
    import fnmatch

    patterns = None if only is None else [p.strip() for p in only.split(",") if p.strip()]
    dense, _ = prunekit.load_model("smollm2-135m")
    when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
    done: dict = {}
    keys = ("prefill_speedup", "decode_speedup", "median_prefill_speedup", "median_decode_speedup")
    for r in data["rows"]:
        if "widths" not in r or (patterns is not None and not any(fnmatch.fnmatchcase(r["id"], p) for p in patterns)):
            continue
        shape = json.dumps(r["widths"])
        if shape not in done:
            done[shape] = _speed(dense, _shaped(dense, r["widths"]), rounds)
            done[shape]["retimed"] = f"{when}, best of {rounds} alternated rounds, shapes rebuilt from the widths"
        old = {k: r[k] for k in keys if k in r}
        if old:
            r["speed_history"] = r.get("speed_history", []) + [old]
        r.update(done[shape])
        r["param_reduction_speedup"] = r["dense_param_mb"] / r["pruned_param_mb"]
        r["block_reduction_speedup"] = 1 / (1 - r["removed"])
        print(f"{r['id']}: prefill {r['prefill_speedup']:.2f}x decode {r['decode_speedup']:.2f}x "
              f"(promise {r['param_reduction_speedup']:.2f}x); was {old}", flush=True)
        out.write_text(json.dumps(data, indent=1) + "\n")
    write_markdown(data, out.with_suffix(".md"))
    plot(data, out.with_suffix(".png"))
    return 0


def _label(row: dict) -> str:
    """Týr's rows name their final step: the default (sequential), or the reference's supernet levels; rows not
    calibrated on wiki name their calibration."""
    calib = row.get("calibration", "wiki")
    return _method_label(row) + ("" if calib == "wiki" else f" [calib {calib}]")


def _method_label(row: dict) -> str:
    if row["method"] == "tyr":
        final = (row.get("options") or {}).get("final", "supernet")  # rows run before `final` existed: supernet
        stages = (row.get("options") or {}).get("stages") or [[256, 2], [1024, 1]]
        other = "" if stages == DEFAULT_STAGES else ", stages " + ";".join(f"{t}:{k}" for t, k in stages)
        if not (row.get("options") or {}).get("fitness_samples"):  # rows from before the held-out fitness windows
            other += ", fitness on the supernet's windows"
        return f"tyr (final={final}{', end to end' if final == 'sequential' else ''}{other})"
    if row["method"] == "tyr (final=sequential)":
        return f"tyr (final=sequential, re-pruned at {row['source_row']}'s widths)"
    return row["method"]


def _seeded(rows: list[dict]) -> dict:
    """The rows run by the script (id ``METHOD-RATIO[-CALIB][-sSEED][-TAG]``), by (label, ratio, calibration) then
    seed: the label tells Týr's settings apart (a tag only names them)."""
    out: dict = {}
    for r in rows:
        if r["method"] in ("dense", "torch-pruning", "magnitude-structured"):
            continue  # no calibration windows, nothing seeded
        calib = r.get("calibration", "wiki")
        if r["id"].startswith(_row_id(r["method"], r["ratio"], r.get("seed", 0), calib)):
            out.setdefault((_method_label(r), r["ratio"], calib), {})[r.get("seed", 0)] = r
    return out


def _seed_table(rows: list[dict]) -> list[str]:
    """Mean ± std over seeds, and Týr minus uniform on the same seed's calibration windows."""
    import statistics

    groups = {k: v for k, v in _seeded(rows).items() if len(v) > 1}
    if not groups:
        return []
    lines = ["Over seeds (rows run at more than one seed, grouped by their settings; the seed draws the calibration "
             "windows of both methods and Týr's search; mean ± std):", "",
             "| method | calibration | removed | seeds | ppl wiki | ppl austen "
             "| Týr - uniform, same seed: wiki | austen |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: |"]

    def ms(values):
        return f"{statistics.mean(values):.2f}" + (f" ± {statistics.stdev(values):.2f}" if len(values) > 1 else "")

    for (label, ratio, calib), by_seed in sorted(groups.items(), key=lambda kv: (kv[0][2], kv[0][1], kv[0][0])):
        seeds = sorted(by_seed)
        diff = ["", ""]
        base = groups.get(("uniform-structured", ratio, calib), {})
        paired = [s for s in seeds if s in base]
        if label.startswith("tyr") and paired:
            diff = [" / ".join(f"{by_seed[s][k] - base[s][k]:+.2f}" for s in paired) for k in ("ppl_wiki", "ppl_austen")]
        lines.append(f"| {label} | {calib} | {ratio:g} | {','.join(map(str, seeds))} | "
                     f"{ms([by_seed[s]['ppl_wiki'] for s in seeds])} | {ms([by_seed[s]['ppl_austen'] for s in seeds])} | "
                     f"{diff[0]} | {diff[1]} |")
    return lines


def write_markdown(data: dict, path: Path) -> None:
    s = data["settings"]
    retimed = sorted({r["retimed"] for r in data["rows"] if "retimed" in r})
    untimed = sorted(r["id"] for r in data["rows"] if "retimed" not in r and "prefill_speedup" in r and r["method"] != "dense")
    lines = ["# Structured pruning on SmolLM2-135M", "",
             f"Calibration {s['samples']} x {s['seqlen']} tokens of the Wikipedia leads' calibration split (the row's seed "
             "draws the windows, and Týr's search), or where a row says `[calib wiki+austen]`, half the windows from "
             "the leads' calibration split and half from the five Austen novels other than Pride and Prejudice, "
             "interleaved (so Týr's held-out fitness windows are half and half too); "
             f"perplexity on {s['eval_tokens']} held-out tokens (512-token windows); speed with one thread, prefill "
             f"1 x 512 and decode 64 tokens, dense and pruned alternated, fastest of {s['repeats']} rounds; structure "
             f"`{s['structure']}`; Týr options `{s['tyr_options']}`. Dense is SmolLM2-135M-Instruct dequantized from "
             "4-bit GGUF to fp32. `removed` = fraction of the block Linear weights removed; the promise of a row is "
             "1 / (1 - removed) for the blocks, and dense / pruned parameter bytes for the whole model (the embeddings "
             "and the tied LM head, 28 M of the 134.5 M parameters, stay; the LM head is ~20% of a prefill's FLOPs).", "",
             *([f"Speed re-measured with `--retime` ({'; '.join(retimed)}); the figures measured during the runs are kept in "
                "the JSON as `speed_history`.", ""] if retimed else []),
             *([f"Not re-timed (speed measured during the run, under load): {', '.join(untimed)}.", ""]
               if retimed and untimed else []),
             "| method | seed | removed | params | ppl wiki | ppl austen | prefill speedup | decode speedup | (medians) | promise (all params) | promise (blocks) | prune s |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in sorted(data["rows"], key=lambda r: (r.get("ratio", 0), r["method"], r.get("seed", 0))):
        f = lambda k, d=3: "" if r.get(k) is None else f"{r[k]:.{d}f}"  # noqa: E731
        lines.append(f"| {_label(r)} | {r.get('seed', 0) if r['method'] != 'dense' else ''} | {f('removed')} | {r.get('params', 0):,} | {f('ppl_wiki', 2)} | {f('ppl_austen', 2)} | "
                     f"{f('prefill_speedup', 2)} | {f('decode_speedup', 2)} | "
                     f"{f('median_prefill_speedup', 2)} / {f('median_decode_speedup', 2)} | {f('param_reduction_speedup', 2)} | "
                     f"{f('block_reduction_speedup', 2)} | "
                     f"{f('prune_seconds', 0)} |")
    lines += ["", *_seed_table(data["rows"]), ""]
    for r in data["rows"]:
        o = r.get("options")
        if r["method"] == "tyr" and o:
            stages = ", ".join(f"{t} tokens -> {k}" for t, k in o["stages"])
            fitness = (f"fitness on {o['fitness_samples']} held-out windows" if o.get("fitness_samples")
                       else "fitness on the supernet's windows")
            lines.append(f"- `{r['id']}`: {o['iterations']} iteration(s) x {o['generations']} generations x "
                         f"{o['offspring']} offspring, stages {stages}, {fitness}, kl_topk {o['kl_topk']}, propagate "
                         f"{o['propagate']}, widths per layer (query heads, neurons): {r['widths']}")
        if r["method"] == "torch-pruning" and r.get("peer"):
            lines.append(f"- `{r['id']}`: Torch-Pruning {r['peer']['torch_pruning']} {r['peer']['importance']}, "
                         f"channel ratio {r['peer']['channel_ratio']:.4f} of the MLP neurons (no heads: see the "
                         "script's docstring), widths per layer: "
                         f"{sorted({tuple(w) for w in r['widths']})}")
    path.write_text("\n".join(lines) + "\n")


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    calibs = sorted({r.get("calibration", "wiki") for r in data["rows"]}, key=lambda c: c != "wiki")
    for method, calib in [(m, c) for c in calibs for m in METHODS + ("dense",)]:
        rows = [r for r in data["rows"] if r["method"] == method and r.get("ppl_wiki")
                and r.get("calibration", "wiki") == calib]
        if rows:
            label = method if calib == "wiki" else f"{method} [calib {calib}]"
            ax.scatter([r.get("prefill_speedup", 1.0) for r in rows], [r["ppl_wiki"] for r in rows], label=label,
                       marker="o" if calib == "wiki" else "x")
            for r in rows:
                ax.annotate(f"{r.get('ratio', 0):g}", (r.get("prefill_speedup", 1.0), r["ppl_wiki"]), fontsize=7)
    ax.set_xlabel("measured prefill speedup (1 thread)")
    ax.set_ylabel("perplexity, held-out Wikipedia")
    ax.set_yscale("log")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ratios", default="0.3", help="comma-separated fractions of block weights to remove")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--structure", default="both", choices=("heads", "neurons", "both"))
    ap.add_argument("--calib", default="wiki",
                    help="calibration text (wiki, austen, a mixture like wiki+austen); rows not on wiki get -CALIB "
                    "in their id")
    ap.add_argument("--samples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=8192)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of the calibration windows and of Týr's search (row ids get -sSEED unless 0)")
    ap.add_argument("--tyr-options", default=TYR_OPTIONS, help="KEY=VALUE,... (';' for ',' inside a value)")
    ap.add_argument("--resume", action="store_true", help="skip rows already in the results file")
    ap.add_argument("--final-sequential", default=None, metavar="ROW",
                    help="re-prune at the widths Týr's row ROW found, each block on the real pruned blocks (what "
                    "final=sequential does after the search), and add a row with its perplexity (speed: same widths)")
    ap.add_argument("--no-dense", action="store_true", help="skip the dense row (another run records it)")
    ap.add_argument("--merge", default=None, metavar="JSON", help="merge the rows of another results file, rewrite the tables, exit")
    ap.add_argument("--retime", type=int, default=None, metavar="ROUNDS",
                    help="only re-measure every row's speed (best of ROUNDS alternated rounds), e.g. on a quiet machine")
    ap.add_argument("--tag", default="", help="appended to the row ids (e.g. a run with other --tyr-options)")
    ap.add_argument("--only", default=None, metavar="IDS",
                    help="with --retime: only these rows (comma-separated ids; shell-style * and ? allowed)")
    ap.add_argument("--quiet", action="store_true")
    ap.add_argument("--out", default=str(RESULTS / "structured.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)  # was a FileNotFoundError after the first (dense) row
    data = json.loads(out.read_text()) if out.exists() else {"rows": []}
    if args.retime is not None:
        return retime(data, out, args.retime, args.only)
    data["settings"] = {"samples": args.samples, "seqlen": args.seqlen, "eval_tokens": args.eval_tokens,
                        "repeats": args.repeats, "structure": args.structure, "tyr_options": args.tyr_options,
                        "threads": 1, "torch": torch.__version__, "python": platform.python_version()}
    if args.merge:
        extra = json.loads(Path(args.merge).read_text())["rows"]
        ids = {r["id"] for r in extra if r["id"] != "dense"}
        data["rows"] = [r for r in data["rows"] if r["id"] not in ids] + [r for r in extra if r["id"] != "dense"]
        out.write_text(json.dumps(data, indent=1) + "\n")
        write_markdown(data, out.with_suffix(".md"))
        plot(data, out.with_suffix(".png"))
        return 0
    if args.final_sequential:
        return _final_sequential(args, data, out)
    done = {r["id"] for r in data["rows"]}
    dense, tok = prunekit.load_model("smollm2-135m")
    texts = {"wiki": prunekit.load_text("wiki", purpose="evaluation"),
             "austen": prunekit.load_text("austen", purpose="evaluation")}
    if "dense" not in done and not args.no_dense:
        row = {"id": "dense", "method": "dense", "ratio": 0.0, "removed": 0.0, "params": sum(p.numel() for p in dense.parameters()),
               "block_params": _block_linear_params(dense), "prefill_speedup": 1.0, "decode_speedup": 1.0}
        row.update(_ppl(dense, tok, texts, args.eval_tokens))
        data["rows"].append(row)
        out.write_text(json.dumps(data, indent=1) + "\n")
        print(json.dumps(row), flush=True)
    for ratio in [float(r) for r in args.ratios.split(",")]:
        for method in args.methods.split(","):
            rid = _row_id(method, ratio, args.seed, args.calib, args.tag)
            if args.resume and rid in done:
                continue
            row = run_row(method, ratio, args, texts, dense, tok)
            data["rows"] = [r for r in data["rows"] if r["id"] != rid] + [row]
            out.write_text(json.dumps(data, indent=1) + "\n")
            write_markdown(data, out.with_suffix(".md"))
            plot(data, out.with_suffix(".png"))
            print(json.dumps({k: v for k, v in row.items() if k not in ("search", "widths", "options")}), flush=True)
    write_markdown(data, out.with_suffix(".md"))
    plot(data, out.with_suffix(".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
