"""``prunekit compare RUN [RUN ...]``: one table of several `prunekit prune` outputs, read from their records.

Each folder's ``prunekit.json`` says what was done (weights, structured widths or depth), what it cost and what
it measured; nothing is re-run. A row holds the method and budget, what was removed (the block Linears' measured
sparsity, the parameters left, or the blocks kept), the perplexity before and after on every ``--eval`` text
the runs share (``--text`` picks them; a text a run did not score is left blank, and said), the speedup measured
against the dense model where the run measured one (prefill and decode for an LM, one denoiser forward for a
DiT, whose FID on the project's classifier features is its ``fid`` column), and the run's wall time.
Perplexities compare only on the same file, windows and tokens: a column whose runs scored different files
(by sha256) or windows is named in a note under the table.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from prunekit import jsonl
from prunekit.errors import InputError

__all__ = ["summarize", "table"]


def _read(folder: Path) -> dict:
    record = folder / "prunekit.json"
    if not folder.is_dir():
        raise InputError(f"{folder} is not a folder; give the --out folders of `prunekit prune` runs")
    if not record.is_file():
        raise InputError(f"{folder} has no prunekit.json: it is not the output of `prunekit prune` (compare reads "
                         "the record each run writes)")
    try:
        meta = json.loads(record.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise InputError(f"{record} is not valid JSON ({e}); fix it or leave that run out") from None
    if not isinstance(meta, dict):
        raise InputError(f"{record} holds a JSON {type(meta).__name__}, not the object prunekit writes")
    return meta


def _number(value) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _int(value) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def summarize(folder: str | Path) -> dict:
    """One row for the `prunekit prune` output `folder`: ``run, kind, method, budget, removed, evaluation
    ({text: {dense, pruned, windows, seqlen, sha256}}), prefill_speedup, decode_speedup, forward_speedup (a DiT's),
    method_seconds, seconds`` (the method's own time; the whole command's, None for a folder saved from Python),
    and the budget as numbers for scripts (None where the kind has none): ``ratio, pattern, sparsity``
    (weights: measured on the layers pruned), ``params_before, params_after`` (structured; depth when its speed
    was measured), ``dense_layers, kept_layers`` (depth: the indices kept), and a weights run's ``options`` as
    recorded. `budget` and `removed` are the same as text."""
    folder = Path(folder).expanduser()
    meta = _read(folder)
    numbers = dict.fromkeys(("ratio", "pattern", "sparsity", "params_before", "params_after", "dense_layers",
                             "kept_layers", "profile"))
    if meta.get("kind") == "dit" or "kept_layers" in meta:  # depth (a DiT's record has no perplexity)
        kind = "depth"
        dense, kept = meta.get("dense_layers"), meta.get("kept_layers")
        budget = f"{len(kept)} of {dense} blocks" if isinstance(kept, list) else "?"
        recovery = meta.get("recovery")
        gone = dense - len(kept) if isinstance(kept, list) and isinstance(dense, int) else None
        numbers.update(dense_layers=_int(dense), kept_layers=kept if isinstance(kept, list) else None)
        timed = meta.get("speed") if isinstance(meta.get("speed"), dict) else {}
        for side in ("dense", "pruned"):  # a depth run's parameter counts, measured with its speed
            counts = timed.get(side) if isinstance(timed.get(side), dict) else {}
            numbers["params_before" if side == "dense" else "params_after"] = _int(counts.get("params"))
        removed = None if gone is None else f"{gone} block" + ("s" if gone != 1 else "")
        if isinstance(recovery, dict):
            how = "KD, " if recovery.get("distilled") else ""
            budget += f", recovered ({how}{recovery.get('trainable', '?')}, {recovery.get('steps', '?')} steps)"
    elif "structure" in meta:
        kind = "structured"
        budget = f"ratio {meta.get('ratio')} ({meta.get('structure')})"
        before, after = _number(meta.get("params_before")), _number(meta.get("params_after"))
        removed = f"params {before:,.0f} -> {after:,.0f}" if before and after is not None else None
        numbers.update(ratio=_number(meta.get("ratio")), params_before=_int(meta.get("params_before")),
                       params_after=_int(meta.get("params_after")))
    elif "layers" in meta and "sequential" in meta:
        kind = "weights"
        budget = meta.get("pattern") or f"{meta.get('ratio')} unstructured"
        if isinstance(meta.get("profile"), dict):  # OWL: a ratio per block, averaging the one given
            numbers["profile"] = str(meta["profile"].get("name", "?"))
            budget += f", {numbers['profile'].upper()} block ratios"
        sparsity = _number(meta.get("total_sparsity"))  # measured on the layers pruned
        skip = meta.get("skip") if isinstance(meta.get("skip"), list) else []
        if skip:  # the sparsity is then of the other layers (`prunekit eval` counts every block Linear)
            budget += ", dense " + " ".join(str(s) for s in skip)
        removed = None if sparsity is None else f"sparsity {sparsity:.4f}" + (" of the pruned layers" if skip else "")
        pattern = meta.get("pattern")
        numbers.update(ratio=_number(meta.get("ratio")), pattern=pattern if isinstance(pattern, str) else None,
                       sparsity=sparsity)
    else:
        raise InputError(f"{folder / 'prunekit.json'} is not a record of `prunekit prune` (weights, structured or "
                         "depth); compare reads those")
    evaluation = {}
    raw = meta.get("evaluation")
    if meta.get("kind") == "dit" and isinstance(raw, dict):  # {"settings", "dense", "pruned"}: FIDs, not texts
        pair = {k: raw.get(k) if isinstance(raw.get(k), dict) else {} for k in ("dense", "pruned")}
        if pair["dense"] or pair["pruned"]:
            evaluation["fid"] = {"dense": _number(pair["dense"].get("fid")),
                                 "pruned": _number(pair["pruned"].get("fid")), "windows": None, "seqlen": None,
                                 "sha256": None}
    else:
        for text, pair in (raw.items() if isinstance(raw, dict) else ()):
            if isinstance(pair, dict) and isinstance(pair.get("dense"), dict) and isinstance(pair.get("pruned"), dict):
                dense, pruned = pair["dense"], pair["pruned"]
                source = dense.get("text") if isinstance(dense.get("text"), dict) else {}
                sha = source.get("sha256")
                evaluation[str(text)] = {"dense": _number(dense.get("ppl")), "pruned": _number(pruned.get("ppl")),
                                         "windows": _int(dense.get("windows")), "seqlen": _int(dense.get("seqlen")),
                                         "sha256": sha if isinstance(sha, str) else None}
    speed = meta.get("speed")
    ratios = speed.get("speedup") if isinstance(speed, dict) else None
    forward = _number(ratios)  # a DiT's: one denoiser forward
    ratios = ratios if isinstance(ratios, dict) else {}
    return {"run": str(folder), "kind": kind, "method": meta.get("method"), "budget": budget, "removed": removed,
            "evaluation": evaluation, "prefill_speedup": _number(ratios.get("prefill")),
            "decode_speedup": _number(ratios.get("decode")), "forward_speedup": forward,
            "seconds": _number(meta.get("wall_seconds")),  # a PruneResult's `seconds` is the method's alone
            "method_seconds": _method_seconds(meta),
            "options": meta.get("options") if isinstance(meta.get("options"), dict) else None,  # as the run recorded
            # prune --compute-dtype (weight methods since 2026-12-03, structured and depth since 2026-12-04;
            # earlier runs computed in float32)
            "compute_dtype": str(meta.get("compute_dtype") or "float32"),
            **numbers}


def _method_seconds(meta: dict) -> float | None:
    """The time the method itself took (a depth run's block selection plus its recovery), without loading,
    evaluation, speed measurement or saving; None for a record that lacks it (depth runs before 2026-12-02)."""
    seconds = _number(meta.get("seconds"))
    recovery = meta.get("recovery")
    if seconds is not None and isinstance(recovery, dict):
        extra = _number(recovery.get("seconds"))
        seconds = None if extra is None else seconds + extra
    return seconds


def _f(value, fmt: str) -> str:
    return "" if value is None or (isinstance(value, float) and not math.isfinite(value)) else format(value, fmt)


def table(rows: list[dict], texts: list[str]) -> tuple[str, list[str]]:
    """A markdown table of `rows` (from `summarize`) with dense and pruned perplexity on each of `texts`, and its
    `notes`."""
    head = ["run", "kind", "method", "budget", "removed"]
    for t in texts:
        head += [f"{t} dense", f"{t} pruned"]
    head += ["speedup (prefill / decode)", "method s", "wall s"]
    lines = ["| " + " | ".join(head) + " |", "| " + " | ".join("---:" if i >= 5 else "---" for i in range(len(head)))
             + " |"]
    for r in rows:
        base = (r.get("options") or {}).get("base")  # DSnoT on Wanda or on SparseGPT: two methods in one name
        method = str(r["method"]) + (f" (base={base})" if isinstance(base, str) else "")
        if r.get("compute_dtype", "float32") != "float32":  # the activations and updates were rounded
            method += f" [{r['compute_dtype']}]"
        cells = [r["run"], r["kind"], method, r["budget"], r["removed"] or ""]
        for t in texts:
            e = r["evaluation"].get(t, {})
            cells += [_f(e.get("dense"), ".3f"), _f(e.get("pruned"), ".3f")]
        pair = [_f(r["prefill_speedup"], ".2f"), _f(r["decode_speedup"], ".2f")]
        speed = (" / ".join(f"{s}x" if s else "-" for s in pair) if any(pair) else
                 f"{r['forward_speedup']:.2f}x (forward)" if r.get("forward_speedup") is not None else "")
        cells += [speed, _f(r["method_seconds"], ".1f"), _f(r["seconds"], ".1f")]
        lines.append("| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |")
    return "\n".join(lines), notes(rows, texts)


def notes(rows: list[dict], texts: list[str]) -> list[str]:
    """What would mislead in a table of `rows` over `texts`: texts the runs scored on different files or windows,
    one file under two names, runs that scored some of the texts only."""
    said = []
    for r in rows:
        missing = [t for t in texts if t not in r["evaluation"]
                   or not all(_f(r["evaluation"][t][k], "g") for k in ("dense", "pruned"))]
        if missing:
            said.append(f"{r['run']} records no score for {', '.join(missing)} (a prune without that --eval, a "
                         "folder saved from Python without an evaluation in its metadata, or a value missing from "
                         "the record): those cells are blank")
    for t in texts:
        scored = [r["evaluation"][t] for r in rows if t in r["evaluation"]]
        files = {e["sha256"] for e in scored if e["sha256"] is not None}  # None: a record without it
        if len(files) > 1:
            said.append(f"{t} names different files in different runs (sha256 "
                         + ", ".join(sorted(str(s)[:12] for s in files)) + "): those perplexities do not compare")
        shapes = {(e["windows"], e["seqlen"]) for e in scored}
        if len(shapes) > 1:
            said.append(f"{t} was scored on different windows by different runs ("
                         + ", ".join(f"{w} x {s}" for w, s in sorted(shapes, key=str)) + "): those perplexities do "
                         "not compare")
    by_file: dict[str, list[str]] = {}  # one file under several --eval spellings: columns apart
    for t in texts:
        for sha in dict.fromkeys(r["evaluation"][t]["sha256"] for r in rows if t in r["evaluation"]):
            if sha is not None:
                by_file.setdefault(sha, []).append(t)
    for sha, names in by_file.items():
        if len(names) > 1:
            said.append(f"{' and '.join(names)} are the same file (sha256 {sha[:12]}) in different spellings: give "
                         "the runs one --eval spelling to compare them in one column")
    return said


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="one table of several prune outputs (method, budget, perplexity, speed)",
                       description="One markdown table of prune outputs, read from their prunekit.json (nothing is "
                       "re-run): method, budget, what was removed, dense and pruned perplexity per --eval text, the "
                       "measured speedup, 'method s' (the method's own time: a depth run's selection plus its "
                       "recovery) and 'wall s' (the whole command: loading, evaluation, speed rounds, saving).")
    p.add_argument("runs", nargs="+", help="output folders of `prunekit prune` (their prunekit.json is read)")
    p.add_argument("--text", default=None, help="comma-separated --eval texts to show (default: every text a run "
                   "scored, in the order first seen)")
    p.add_argument("--json", action="store_true", help="print one JSON object {texts: [...], rows: [...], notes: "
                   "[...]} on stdout (the notes also go to stderr)")


def run(args) -> int:
    rows = [summarize(r) for r in args.runs]
    seen = list(dict.fromkeys(t for r in rows for t in r["evaluation"]))
    if args.text is not None:
        texts = [t.strip() for t in args.text.split(",") if t.strip()]
        twice = [t for t in dict.fromkeys(texts) if texts.count(t) > 1]
        if twice:  # it gave two identical columns and a note calling them "different spellings"
            raise InputError(f"--text {args.text} lists {twice[0]} twice; give each text once")
        missing = [t for t in texts if t not in seen]
        if not texts or missing:
            raise InputError(f"--text {args.text}: no run scored {', '.join(missing) or 'that'}; the runs scored "
                             f"{', '.join(seen) or 'no text (run prune with --eval)'}")
    else:
        texts = seen
    by_folder: dict = {}
    for run in args.runs:  # one folder given twice (overlapping globs): its row is printed twice
        by_folder.setdefault(Path(run).expanduser().resolve(), []).append(str(run))
    repeated = [f"{' and '.join(names)} are one run folder: its row appears {len(names)} times"
                for names in by_folder.values() if len(names) > 1]
    if args.json:  # a script gating on the numbers is told when they do not compare, as a reader is
        said = notes(rows, texts) + repeated
        print(jsonl.dumps({"texts": texts, "rows": rows, "notes": said}))
    else:
        md, said = table(rows, texts)
        said += repeated
        print(md)
    for note in said:
        print(f"prunekit: note: {note}", file=sys.stderr)
    return 0
