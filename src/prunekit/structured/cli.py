"""`prunekit prune MODEL --method tyr|uniform-structured|magnitude-structured|wanda-structured --structure ...`.

`prunekit.cli` adds these options to its `prune` parser (`add_prune_arguments`) and calls `run_prune` when the
method's registry domain is "structured". Everything is validated before the model is pruned; the output folder
is written atomically (the pruned model, ``prunekit.json`` with the per-layer widths, perplexity and measured
speed, ``report.md`` and ``widths.png``, the fraction of heads and neurons each layer keeps).
"""

from __future__ import annotations

import json
import sys
import time

from prunekit.errors import InputError, check_not_input

__all__ = ["add_prune_arguments", "run_prune"]


def add_prune_arguments(pr) -> None:
    pr.add_argument("--structure", choices=("heads", "neurons", "both"), default=None,
                    help="structured methods: prune query heads (equal per KV group), MLP neurons, or both (default)")
    pr.add_argument("--no-speed", action="store_true",
                    help="structured and depth methods: skip the measured CPU prefill/decode timing of dense and pruned models")


def _report(meta: dict, table: str) -> str:
    lines = [f"# {meta['method']} ({meta['structure']}) on {meta['model']}", "",
             f"Removed {meta['removed']:.4f} of the block Linear weights (asked {meta['ratio']:g}); parameters "
             f"{meta['params_before']:,} -> {meta['params_after']:,}.", ""]
    if meta.get("compute_dtype", "float32") != "float32":  # prune --compute-dtype
        lines[-1:-1] = [f"Computed in {meta['compute_dtype']}: the weights and activations in that dtype, the "
                        "calibration statistics and refits summed in float32."]
    speed = meta.get("speed")
    if speed:
        d, p = speed["dense"], speed["pruned"]
        lines += ["| | dense | pruned | speedup |", "| --- | ---: | ---: | ---: |",
                  f"| prefill {d['prefill_tokens']} tokens (s) | {d['prefill_s']:.3f} | {p['prefill_s']:.3f} | "
                  f"{speed['speedup']['prefill']:.2f}x |",
                  f"| decode (s/token) | {d['decode_s_per_token']:.4f} | {p['decode_s_per_token']:.4f} | "
                  f"{speed['speedup']['decode']:.2f}x |",
                  f"| parameter memory (MiB) | {d['param_bytes'] / 2**20:.1f} | {p['param_bytes'] / 2**20:.1f} | |", "",
                  f"Measured on this CPU with {d['threads']} thread(s): dense and pruned timed in {speed['rounds']} "
                  "alternating rounds, the fastest of each.", ""]
    elif meta.get("speed_skipped"):
        lines += [f"Not timed: {meta['speed_skipped']}.", ""]
    for name, ev in meta.get("evaluation", {}).items():
        lines.append(f"Perplexity on {name}: dense {ev['dense']['ppl']:.3f}, pruned {ev['pruned']['ppl']:.3f} "
                     f"({ev['pruned']['tokens']} tokens).")
    lines += ["", "## Per-layer widths", "", "![fraction of heads and neurons kept per layer](widths.png)", "", table,
              ""]
    return "\n".join(lines)


def run_prune(args) -> int:
    import prunekit
    from prunekit import registry, report
    from prunekit.cli import (_computed_in, _given, _options, _provenance, _recorded_if_readable, _torch_threads,
                              _versions, eval_dense, eval_pruned, model_files, note_not_stored)
    from prunekit.evaluate import zeros_kept
    from prunekit.speed import noise_note, speed_against_dense
    from prunekit.structured import check_request, prune_structured, save_structured
    from prunekit.structured.core import calibration_windows
    from prunekit.structured.units import model_dims
    from prunekit.text import check_token_ids
    from pathlib import Path

    from prunekit.weights.io import carry_licence, check_output, check_replaceable, output_dtype, resolve_model

    wall = time.perf_counter()
    registry.get(args.method, "structured")
    if args.ratio is None:
        raise InputError(f"{args.method} needs --ratio: the fraction of the block weights to remove, e.g. --ratio 0.3")
    for flag, bad in (("--pattern", args.pattern), ("--skip", args.skip), ("--base", args.base), ("--domain", args.domain)):
        if bad:
            raise InputError(f"{flag} does not apply to structured method {args.method}; leave it out")
    structure = args.structure or "both"
    options = _options(args)  # --base / --domain were refused above
    check_request(args.method, ratio=args.ratio, structure=structure, options=options)
    check_output(args.out, overwrite=args.overwrite)
    check_not_input(args.out, resolve_model(args.model), args.calib, *(args.eval or "").split(","))
    check_replaceable(Path(args.out).expanduser())  # before the work: --overwrite replaces earlier outputs only
    evals_src = [t.strip() for t in args.eval.split(",") if t.strip()] if args.eval else []
    eval_texts = {t: prunekit.load_text(t, purpose="evaluation") for t in evals_src}
    calib = args.calib if args.calib is not None else "wiki"
    if args.method == "magnitude-structured":  # it cut windows from a --calib and recorded them as if used
        calib = None
        flags = [f for f in ("--calib", "--samples", "--seqlen", "--seed") if _given(args, f)]
        if flags:
            print(f"prunekit: note: magnitude-structured ranks units by their weights alone; {', '.join(flags)} "
                  "unused", file=sys.stderr)
    calib_text = prunekit.load_text(calib, purpose="calibration") if calib else None
    progress = not args.quiet
    saved_dtype, dtype_words = output_dtype(args.dtype, args.model)
    files = model_files(args, resolve_model(args.model))
    model, tok = prunekit.load_model(args.model, dtype=args.compute_dtype, device=args.device)
    dims = model_dims(model)
    check_request(args.method, ratio=args.ratio, structure=structure, options=options, dims=dims)
    if structure == "both" and dims.fused_qkv:
        print(f"prunekit: note: {args.model}'s attention fuses q, k and v into one qkv_proj, split by the head count "
              "all layers share, so its heads stay and only MLP neurons are pruned", file=sys.stderr)
    elif structure == "both" and dims.group == 1:  # it pruned neurons only, without a word
        print(f"prunekit: note: {args.model} has as many KV heads as query heads (multi-head attention); head "
              "pruning removes query heads within a KV group, so only MLP neurons are pruned", file=sys.stderr)
    ids = None
    if calib_text is not None:
        # Týr's held-out fitness windows drawn as the Python API draws them (the CLI scored on the supernet's own)
        ids = calibration_windows(args.method, tok, calib_text, samples=args.samples, seqlen=args.seqlen,
                                  seed=args.seed, options=options)
        check_token_ids(model, ids, what="calibration text")
    evaluation = eval_dense(model, tok, eval_texts, args, progress, files)
    input_sparsity = prunekit.sparsity(model)["total"]
    pattern, skip = _recorded_if_readable(resolve_model(args.model))
    result = prune_structured(model, method=args.method, ratio=args.ratio, structure=structure, tokenizer=tok,
                              calibration=ids, seed=args.seed, progress=progress, **options)
    zeros, zeros_note = zeros_kept(f"{args.method} (its kept weights are refit)" if args.method in ("tyr",
                                   "uniform-structured") else args.method, input_sparsity, model, pattern, skip=skip)
    eval_pruned(evaluation, model, tok, eval_texts, args, progress, saved_dtype, unchanged_from=args.model,
                pruned_zeros=False)
    speed = unspeed = None
    if not args.no_speed:  # the dense model again, timed in turns with the pruned one under the same load
        speed, unspeed = speed_against_dense(args.model, model, dtype=args.compute_dtype)
        if unspeed:
            print(f"prunekit: note: {unspeed}", file=sys.stderr)
    meta = {"model": str(args.model), "input": _provenance(args.model), **result.to_dict(),
            "calibration": calib_text.describe() if calib_text else None,
            "samples": args.samples if ids is not None else 0, "seqlen": args.seqlen if ids is not None else None,
            "seed": args.seed,
            "evaluation": evaluation, "speed": speed, "speed_skipped": unspeed, "input_zeros": zeros,
            "saved_dtype": str(saved_dtype).removeprefix("torch."),
            "compute_dtype": _computed_in(model),  # auto: the folder's dtype, as loaded
            "versions": _versions(), "torch_threads": _torch_threads(), "device": str(args.device),
            "wall_seconds": None}
    meta["wall_seconds"] = time.perf_counter() - wall
    report_md = _report(meta, result.table())

    def extra(folder):
        (folder / "report.md").write_text(report_md)
        dense = result.dense_widths
        report.plot_widths(folder / "widths.png", [(w.heads, w.intermediate) for w in result.widths],
                           (dense.heads, dense.intermediate), f"{args.method} ({structure}), ratio {args.ratio:g}")
        carry_licence(args.model, folder)

    narrower = meta["compute_dtype"] != "float32"  # what the work did not change is saved as the input stores it
    out = save_structured(model, tok, args.out, metadata=meta, overwrite=args.overwrite, extra=extra,
                          dtype=saved_dtype, unchanged_from=resolve_model(args.model) if narrower else None)
    print(f"pruned {args.model} with {args.method} ({structure}): removed {result.removed:.4f} of the block weights, "
          f"parameters {result.params_before:,} -> {result.params_after:,}, {result.seconds:.1f} s")
    if zeros_note:
        print(f"prunekit: note: {zeros_note}", file=sys.stderr)
    widths = sorted({(w.heads, w.intermediate) for w in result.widths})
    print("per-layer widths (query heads, neurons): " + json.dumps([[w.heads, w.intermediate] for w in result.widths])
          if len(widths) > 1 else f"every layer keeps {widths[0][0]} query heads and {widths[0][1]} neurons")
    if speed is not None:
        print(f"measured speedup (1 thread): prefill {speed['speedup']['prefill']:.2f}x, "
              f"decode {speed['speedup']['decode']:.2f}x")
        noisy = noise_note(speed)
        if noisy:
            print(f"prunekit: note: {noisy}", file=sys.stderr)
    if evaluation:  # the table weight and depth pruning print
        print(report.ppl_table(evaluation))
    from prunekit.structured.export import WIDTHS_KEY

    per_layer = getattr(model.config, WIDTHS_KEY, None)
    why = ("its widths differ per layer" if per_layer and len({(w["heads"], w["intermediate"]) for w in per_layer}) > 1
           else "transformers refuses a hidden size its head count does not divide")  # uniform widths, 3 of 64
    loader = (f"prunekit.load: {why}" if per_layer
              else "plain transformers or prunekit.load")  # it named prunekit.load for uniform widths too
    print(f"saved to {out} ({dtype_words}; report: {out / 'report.md'}; load with {loader})")
    if narrower:
        note_not_stored(model, args.model, meta["compute_dtype"])
    return 0
