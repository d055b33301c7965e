"""``prunekit``: the command line over the public API, with the same names; no logic of its own.

Exit codes: 0 success, 2 bad input (a one-line message says what to fix; nothing is written), 130 Ctrl-C
(nothing is written).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import re
import sys
import time
from importlib import import_module
from pathlib import Path

from prunekit import jsonl

__all__ = ["main"]

# Commands whose argparse and dispatch live in their own module (``add_parser(sub)``, ``run(args)``).
_MODULES = {
    "data": "prunekit.data.cli",
    "cnn": "prunekit.cnn.cli",
    "memory": "prunekit.inference.memory_cli",
    "generate": "prunekit.inference.kv.cli",
    "reason": "prunekit.inference.cli",
    "compare": "prunekit.compare",
}

# `prunekit prune` methods of another registry domain than "weights" (structured widths, depth), each run by
# its own module: ``add_prune_arguments(parser)`` adds that domain's options to `prune`, ``run_prune(args)``
# runs it. The weight methods stay in `_cmd_prune` below.
_PRUNE_DOMAINS: dict[str, str] = {"structured": "prunekit.structured.cli", "depth": "prunekit.depth.cli"}

# `prune` options that only some methods use: who takes each (registry domains or method names). A method that
# does not use one refuses it when it differs from its default, instead of silently ignoring it. (--pattern,
# --skip, --base and --domain are refused by the structured and depth modules themselves.)
_PRUNE_FLAG_USERS: dict[str, tuple[str, ...]] = {
    "--sequential": ("weights",),
    "--profile": ("weights",),
    "--owl-m": ("weights",),
    "--owl-lambda": ("weights",),
    "--batch-size": ("weights", "depth"),
    "--structure": ("structured",),
    "--no-speed": ("structured", "depth"),
    "--layers": ("depth",),
    "--group": ("tinyfusion",),
    "--learn-steps": ("tinyfusion",),
    "--candidates": ("random",),
    "--recover": ("depth",),
    "--recover-steps": ("depth",),
    "--recover-lr": ("depth",),
    "--kd-features": ("depth",),
}
_DOMAIN_WORDS = {"weights": "weight", "structured": "structured", "depth": "depth"}
COMPUTE_DTYPES = ("float32", "bfloat16", "float16", "auto")  # prune --compute-dtype, eval --dtype


def _computed_in(model) -> str:
    """The dtype(s) `model`'s floating-point parameters compute in, "+"-joined when they differ."""
    return "+".join(sorted({str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()}))


class _Help(argparse.HelpFormatter):
    """Each option's help ends with its default when the text does not say it already (several did not)."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (not action.option_strings or action.required or "default" in text.lower() or default is None
                or default is False or default is argparse.SUPPRESS or default == []):
            return text
        shown = str(default).replace("%", "%%")  # argparse %-formats the help text
        return f"{text} (default {shown})" if text else f"default {shown}"


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error, like every other prunekit error (argparse prints its usage block first);
    the subcommand parsers are made of this class too, with `_Help`'s defaults."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", _Help)
        super().__init__(*args, **kwargs)

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message}; see `{self.prog} --help`\n")


def _parser() -> argparse.ArgumentParser:
    from prunekit.weights.io import add_device_argument

    p = _Parser(prog="prunekit", description="Prune what a model is, what it learns from, and what it keeps.")
    sub = p.add_subparsers(dest="command", required=True)

    pr = sub.add_parser("prune", help="prune a causal LM (weights, heads and neurons, or whole blocks) and save it")
    _add_prune_arguments(pr)

    ev = sub.add_parser("eval", help="perplexity and sparsity of a causal LM")
    ev.add_argument("model", help="local Hugging Face model folder or zoo name")
    ev.add_argument("--text", default="wiki", help="wiki (held-out leads), austen (Pride and Prejudice), python-docs "
                    "or a .txt/.jsonl file")
    ev.add_argument("--seqlen", type=int, default=512, help="tokens per perplexity window (default 512)")
    ev.add_argument("--tokens", type=int, default=None,
                    help="tokens evaluated, cut into seqlen windows (default 16384, or every whole window of a shorter "
                    "text; a number given is required)")
    ev.add_argument("--batch-size", type=int, default=4, help="windows per forward pass; fewer hold less memory "
                    "(the logits of a batch are batch x seqlen x vocabulary floats)")
    ev.add_argument("--pattern", default=None, help="also check that every block Linear is N:M (default: the "
                    "pattern in prunekit.json); exit status 1 when a layer breaks it")
    ev.add_argument("--dtype", choices=COMPUTE_DTYPES, default="float32",
                    help="the dtype the model is loaded and run in (default float32; auto: the folder's main dtype); "
                    "bfloat16 holds half the memory and runs faster on a CPU with bfloat16 units, the loss itself "
                    "is summed in float32")
    add_device_argument(ev)
    ev.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ev.add_argument("--quiet", action="store_true", help="no progress bars")

    sub.add_parser("methods", help="list every registered method")

    for module in _MODULES.values():
        import_module(module).add_parser(sub)
    _name_choices(p)
    return p


def _name_choices(parser: argparse.ArgumentParser) -> None:
    """A missing subcommand is named by its choices ("required: {score,select,...}"), not by argparse's internal
    dest ("required: data_command"), everywhere below `parser`."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            action.metavar = "{" + ",".join(action.choices) + "}"
            for child in action.choices.values():
                _name_choices(child)


def _add_prune_arguments(pr) -> None:
    from prunekit.weights.io import add_device_argument

    pr.add_argument("model", help="local Hugging Face model folder or zoo name (smollm2-135m)")
    pr.add_argument("--method", required=True, help="weights: magnitude, wanda, sparsegpt, dsnot, armor, dpruner; heads/neurons: tyr, "
                    "uniform-structured, ...; whole blocks: shortgpt, tinyfusion, ... (see `prunekit methods`)")
    pr.add_argument("--ratio", type=float, default=None,
                    help="fraction of weights removed, in [0, 1) (structured methods: above 0)")
    pr.add_argument("--pattern", default=None, help="N:M: at most N nonzeros in every M consecutive input weights (2:4)")
    pr.add_argument("--calib", default=None, help="calibration text: wiki, austen, python-docs, a .txt/.jsonl file, "
                    "or a mixture drawn from each part alike like wiki+austen (default wiki; "
                    "magnitude uses none unless given)")
    pr.add_argument("--samples", type=int, default=128, help="calibration windows (default 128)")
    pr.add_argument("--seqlen", type=int, default=512, help="tokens per calibration window (default 512)")
    pr.add_argument("--seed", type=int, default=0, help="seed for choosing the calibration windows, and for a method's "
                    "own draws (Týr's search, TinyFusion's masks, random's candidates)")
    pr.add_argument("--skip", action="append", default=[], metavar="GLOB",
                    help="leave layers matching this name glob dense (repeatable), e.g. '*down_proj'")
    pr.add_argument("--sequential", choices=("block", "layer"), default="block",
                    help="block: the reference's order, statistics from the dense block then a pass through the "
                    "pruned block, --batch-size sequences at a time (default); layer: one pass per block over all "
                    "samples, each Linear pruned as its inputs arrive (one pass instead of two, about twice the "
                    "memory)")
    pr.add_argument("--batch-size", type=int, default=4, help="sequences per forward: weight methods with --sequential "
                    "block, depth methods' scoring, mask learning and recovery (default 4)")
    pr.add_argument("--profile", choices=("uniform", "owl"), default="uniform",
                    help="weight methods: uniform, every block at --ratio (default); owl, a ratio per block from its "
                    "share of outlier |W| x ||X|| scores, averaging --ratio (OWL, Yin et al. 2024; llm-compressor's "
                    "sparsity_profile='owl'): magnitude, wanda, sparsegpt and dsnot, unstructured, with calibration")
    pr.add_argument("--owl-m", type=float, default=5.0,
                    help="--profile owl: a score is an outlier above this multiple of its block's mean (default 5)")
    pr.add_argument("--owl-lambda", type=float, default=0.08,
                    help="--profile owl: block ratios lie within about this much of --ratio (default 0.08)")
    pr.add_argument("--base", default=None, help="dsnot: the mask it starts from: magnitude, wanda (default) or sparsegpt")
    pr.add_argument("--domain", default=None, metavar="TEXT",
                    help="dpruner: domain text (python-docs or a .txt/.jsonl file); --calib is the general text")
    pr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a method option (repeatable), e.g. --option skip_mlp=false --option max_cycle_time=100; "
                    "`prunekit methods` names them")
    pr.add_argument("--eval", default=None, metavar="TEXTS",
                    help="also measure dense and pruned perplexity on these comma-separated texts "
                    "(wiki,austen,python-docs,FILE), as `prunekit eval` does")
    pr.add_argument("--eval-tokens", type=int, default=None,
                    help="tokens per perplexity evaluation (default 16384, or every whole window of a shorter "
                    "text; a number given is required)")
    pr.add_argument("--eval-seqlen", type=int, default=512,
                    help="tokens per perplexity window for --eval (default 512, eval's default; --seqlen is the "
                    "calibration windows')")
    pr.add_argument("--no-dense-cache", action="store_true",
                    help="score the dense model on the --eval texts again even when an earlier run scored the same "
                    "model files on the same windows (kept in $PRUNEKIT_CACHE/eval; PRUNEKIT_EVAL_CACHE=off turns "
                    "the cache off)")
    pr.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
    pr.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    pr.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default="auto",
                    help="dtype of the saved weights (default auto: the input's; the work runs in --compute-dtype)")
    pr.add_argument("--compute-dtype", choices=COMPUTE_DTYPES, default="float32",
                    help="weight, structured and depth methods (depth: without training): the dtype the model is "
                    "loaded and run in, --eval and the speed timing included (default float32; auto: the folder's "
                    "main dtype). bfloat16 holds half the memory and, on a CPU with bfloat16 units, runs faster; "
                    "calibration statistics, weight updates and refits are still summed in float32, the activations "
                    "are rounded (README: the cost in perplexity), and what the method did not change is saved as "
                    "the input stores it")
    add_device_argument(pr)
    pr.add_argument("--quiet", action="store_true", help="no progress bars")
    for module in _PRUNE_DOMAINS.values():
        import_module(module).add_prune_arguments(pr)


def _refuse_foreign_flags(args, spec) -> None:
    """InputError for the first option given (not at its default) that `spec`'s method does not use."""
    from prunekit import registry
    from prunekit.errors import InputError

    for flag, users in _PRUNE_FLAG_USERS.items():
        if spec.domain in users or spec.name in users or not _given(args, flag):
            continue
        takers = " and ".join(f"{_DOMAIN_WORDS[u]} methods ({', '.join(registry.names(u))})" if u in _DOMAIN_WORDS
                              else f"{u} only" for u in users)
        hint = ""
        if flag == "--batch-size" and spec.domain == "structured" and spec.name != "magnitude-structured":
            hint = f" ({spec.name} takes --option batch_size=N)"
        raise InputError(f"{flag} does not apply to {_DOMAIN_WORDS[spec.domain]} method {spec.name}; it is for "
                         f"{takers}; leave it out{hint}")


@functools.cache
def _prune_defaults() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(add_help=False)
    _add_prune_arguments(parser)
    return parser


def _prune_default(dest: str):
    return _prune_defaults().get_default(dest)


def _given(args, flag: str) -> bool:
    """Whether `prune` option `flag` (``--batch-size``) differs from its default."""
    dest = flag.lstrip("-").replace("-", "_")
    return getattr(args, dest) != _prune_default(dest)


def _refuse_unused_calibration_flags(args, spec, calib) -> bool:
    """InputError for a calibration option (not at its default) that this weight method's run will not use, as
    `_refuse_foreign_flags` does for other methods' options; returns whether --batch-size is used."""
    from prunekit.errors import InputError

    def given(*flags):
        return [f for f in flags if _given(args, f)]

    if calib is None:  # data-free and no --calib: nothing is calibrated
        flags = given("--samples", "--seqlen", "--seed", "--batch-size", "--sequential")
        if flags:
            raise InputError(f"{flags[0]} sets the calibration, and {spec.name} uses none unless --calib is given "
                             "(then only to measure its reconstruction error); leave it out or give --calib TEXT")
        return False
    if spec.prune_model is not None:  # D-Pruner runs its own passes
        flags = given("--sequential", "--batch-size")
        if flags:
            raise InputError(f"{flags[0]} does not apply to {spec.name}, which runs its own calibration passes "
                             "(its domain batches: --option domain_batch_size=N); leave it out")
        return False
    if args.sequential == "layer":
        if args.profile == "owl":  # OWL's outlier pass runs --batch-size sequences at a time
            return True
        if given("--batch-size"):
            raise InputError("--batch-size sets the sequences per forward with --sequential block; --sequential layer "
                             "forwards all samples at once; leave one of them out")
        return False
    return True


def _torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _versions() -> dict:
    import torch
    import transformers

    import prunekit

    return {"prunekit": prunekit.__version__, "torch": torch.__version__, "transformers": transformers.__version__,
            "python": platform.python_version()}


def _value(text: str):
    low = text.lower()
    if low in ("true", "false"):
        return low == "true"
    if low == "none":  # e.g. --option threshold_seqlen=none
        return None
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def parse_options(items, *, example: str) -> dict:
    """``--option KEY=VALUE`` items as a dict (dashes in keys read as underscores; true/false/none, ints and floats
    converted); a malformed or repeated key is an InputError naming `example`."""
    from prunekit.errors import InputError

    options = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise InputError(f"--option {item!r} must look like KEY=VALUE, e.g. --option {example}")
        name = key.strip().replace("-", "_")
        if name in options:  # the last one won silently
            raise InputError(f"--option {name} is given twice; give it once")
        options[name] = _value(value.strip())
    return options


def _options(args) -> dict:
    from prunekit.errors import InputError

    options = parse_options(args.option, example="skip_mlp=false")
    for name in ("base", "domain"):
        if getattr(args, name) is not None:
            if name in options:
                raise InputError(f"--{name} and --option {name}=... both given; give one")
            options[name] = getattr(args, name)
    return options


def _cmd_prune(args) -> int:
    import prunekit
    from prunekit import report
    from prunekit.errors import InputError, check_not_input, check_seed, int_at_least
    from prunekit.select import parse_pattern, ratio_for
    from prunekit.weights.prune import check_profile
    from pathlib import Path

    from prunekit.weights.io import (check_fits_dtype, check_output, check_replaceable, output_dtype, parse_device,
                                     resolve_model)

    wall = time.perf_counter()
    known = prunekit.registry.METHODS.get(args.method)
    if known is None or known.domain not in ("weights", *_PRUNE_DOMAINS):
        choices = [n for domain in ("weights", *_PRUNE_DOMAINS) for n in prunekit.registry.names(domain)]
        raise InputError(f"unknown method {args.method!r} for prune; choose one of: {', '.join(choices)}")
    _refuse_foreign_flags(args, known)
    if args.eval is not None and not any(t.strip() for t in args.eval.split(",")):  # "," evaluated nothing, silently
        raise InputError(f"--eval {args.eval!r} names no text; give e.g. --eval wiki,austen or leave it out")
    if args.eval_tokens is not None and not args.eval:
        raise InputError("--eval-tokens sets how much of the --eval texts is scored; give --eval TEXTS or leave it out")
    if args.eval_seqlen != _prune_default("eval_seqlen") and not args.eval:
        raise InputError("--eval-seqlen sets the windows of the --eval texts; give --eval TEXTS or leave it out")
    if args.no_dense_cache and not args.eval:
        raise InputError("--no-dense-cache re-scores the dense model on the --eval texts; give --eval TEXTS or leave "
                         "it out")
    int_at_least(args.seqlen, "--seqlen", 2)
    _check_eval_sizes(args.eval_seqlen, args.eval_tokens, "--eval-tokens", seqlen_flag="--eval-seqlen")
    check_seed(args.seed, "--seed")
    int_at_least(args.samples, "--samples", 1, hint=" (calibration windows)")
    parse_device(args.device, what="--device")
    if known.domain in _PRUNE_DOMAINS:
        return import_module(_PRUNE_DOMAINS[known.domain]).run_prune(args)
    spec = prunekit.registry.get(args.method, "weights")  # validate everything before the slow work
    if args.method == "armor" and not args.pattern:  # it was said after the model loaded and calibration began
        raise InputError("armor needs --pattern N:M (e.g. 2:4): its core is N:M sparse, unstructured is not supported")
    ratio = ratio_for(args.ratio, parse_pattern(args.pattern))
    options = _options(args)
    prunekit.prune_options(args.method, options)
    if args.profile == "uniform" and (_given(args, "--owl-m") or _given(args, "--owl-lambda")):
        raise InputError("--owl-m and --owl-lambda set OWL's block ratios; give --profile owl or leave them out")
    check_profile(args.profile, args.method, parse_pattern(args.pattern), ratio, args.owl_m, args.owl_lambda)
    uses_calib = spec.stat_for(options) or spec.prune_model or args.profile == "owl"
    calib = args.calib if args.calib is not None else ("wiki" if uses_calib else None)
    batch_size_used = _refuse_unused_calibration_flags(args, spec, calib)
    check_output(args.out, overwrite=args.overwrite)
    check_not_input(args.out, resolve_model(args.model), args.calib, *(args.eval or "").split(","), args.domain)
    check_replaceable(Path(args.out).expanduser())  # before the work: --overwrite replaces earlier outputs only
    progress = not args.quiet
    calib_text = prunekit.load_text(calib, purpose="calibration") if calib else None
    evals_src = [t.strip() for t in args.eval.split(",") if t.strip()] if args.eval else []
    eval_texts = {t: prunekit.load_text(t, purpose="evaluation") for t in evals_src}
    saved_dtype, dtype_words = output_dtype(args.dtype, args.model)
    files = model_files(args, resolve_model(args.model))
    # after the texts: a missing file fails before the slow load
    model, tok = prunekit.load_model(args.model, dtype=args.compute_dtype, device=args.device)
    # before the slow work: weight pruning keeps every tensor, so the save would refuse it (depth and structured
    # pruning may drop the offending block, head or channel: their save checks what is left)
    check_fits_dtype(model, saved_dtype)
    evaluation = eval_dense(model, tok, eval_texts, args, progress, files)
    result = prunekit.prune(
        model, method=args.method, ratio=ratio, pattern=args.pattern, calibration=calib_text, tokenizer=tok,
        samples=args.samples, seqlen=args.seqlen, seed=args.seed, skip=tuple(args.skip),
        sequential=args.sequential, batch_size=args.batch_size, progress=progress, profile=args.profile,
        owl_m=args.owl_m, owl_lambda=args.owl_lambda, **options,
    )
    eval_pruned(evaluation, model, tok, eval_texts, args, progress, saved_dtype, unchanged_from=args.model)
    input_sparsity, refilled = result.input_sparsity, result.input_zeros_refilled
    meta = {
        "model": str(args.model), "input": _provenance(args.model),
        # with input_sparsity, input_zeros_refilled (SparseGPT's updates can make zeros nonzero), model_sparsity
        # and pattern_violations
        **{k: v for k, v in result.to_dict().items() if k != "layers"},
        # both change SparseGPT's and ARMOR's weights (the order of sums), so a rerun needs them
        "batch_size": args.batch_size if batch_size_used else None, "torch_threads": _torch_threads(),
        "device": str(args.device),  # a GPU's sums differ from the CPU's, and ARMOR's seeded draws too
        # D-Pruner's domain text as the calibration text is described (its name alone did not say which file)
        "domain": prunekit.load_text(args.domain, purpose="calibration").describe() if args.domain else None,
        "skip": list(args.skip),  # the globs left dense: total_sparsity is over the other layers
        "layers": [dict(vars(r), shape=list(r.shape)) for r in result.layers],
        "evaluation": evaluation,
        "saved_dtype": str(saved_dtype).removeprefix("torch."),
        "compute_dtype": _computed_in(model),  # auto: the folder's dtype, as loaded
        "versions": _versions(),
        "wall_seconds": None,
    }
    meta["wall_seconds"] = time.perf_counter() - wall
    from prunekit.weights.io import carry_licence

    # what the work did not change is saved as the input stores it (auto on a float32 folder: nothing to give back)
    narrower = meta["compute_dtype"] != "float32"
    out = prunekit.save_pruned(model, tok, args.out, metadata=meta, overwrite=args.overwrite,
                               extra=lambda folder: (report.write_report(folder, meta),
                                                     carry_licence(args.model, folder)), dtype=saved_dtype,
                               unchanged_from=args.model if narrower else None)
    measured = sum(r.rel_error is not None for r in result.layers)
    error = (f"mean relative error {result.mean_rel_error:.4f}" if result.mean_rel_error is not None
             else "relative error not measured by this method")  # was printed as "nan"
    if result.mean_rel_error is not None and measured < len(result.layers):
        error += f" (over the {measured} layers that have one)"
    print(f"pruned {args.model} with {args.method} ({result.pattern or f'{ratio:g} unstructured'}): "
          f"sparsity {result.total_sparsity:.4f} over {len(result.layers)} layers, {error}, {result.seconds:.1f} s")
    unreached = sum((r.info or {}).get("calibration_tokens") == 0 for r in result.layers)
    if unreached:
        print(f"prunekit: note: {unreached} of the {len(result.layers)} layers (mixture-of-experts experts) saw no "
              "calibration token, so they were pruned by |W| alone (their records say calibration_tokens: 0); more "
              "or longer calibration samples (--samples, --seqlen) reach more experts", file=sys.stderr)
    if refilled and input_sparsity > 0.005:  # it said "its zeros stay zeros" while SparseGPT refilled thousands
        # (below 0.5%: a dense model's stray zeros, e.g. the zoo model's from its 4-bit source; nothing to say)
        print(f"prunekit: note: the input was already {input_sparsity:.4f} sparse in the layers pruned (pruned "
              f"before?); {args.method}'s weight updates made {refilled:,} of its zeros nonzero again, so the output "
              f"is {result.total_sparsity:.4f} sparse and not a subset of the input's weights", file=sys.stderr)
    elif input_sparsity > 0.005 and result.total_sparsity > ratio + 0.005:
        print(f"prunekit: note: the input was already {input_sparsity:.4f} sparse in the layers pruned (pruned "
              f"before?) and its zeros stay zeros, so the sparsity reached, {result.total_sparsity:.4f}, is above "
              f"{'the pattern' if result.pattern else f'--ratio {ratio:g}'}", file=sys.stderr)
    elif not result.pattern and abs(result.total_sparsity - ratio) > 0.005:  # narrow layers round per row
        print(f"prunekit: note: the sparsity reached, {result.total_sparsity:.4f}, differs from --ratio {ratio:g}: "
              f"{args.method} removes a whole number of weights per output row (floor(inputs x ratio)), which "
              "narrow layers round away", file=sys.stderr)
    if evaluation:
        print(report.ppl_table(evaluation))
    print(f"saved to {out} ({dtype_words}; report: {out / 'report.md'})")
    if narrower:
        note_not_stored(model, args.model, meta["compute_dtype"])
    if args.method == "armor":  # a user shipping the folder to a 2:4 runtime got a dense model, unwarned
        print(f"prunekit: note: {out / 'model.safetensors'} holds the dense product A core B, so plain transformers "
              f"loads a dense model; the {args.pattern} cores and factors are in armor.safetensors, which "
              "prunekit.load_model puts back", file=sys.stderr)
    return 0


def _left_after_a_stop(args) -> str:
    """What a stopped command left, in its own words (reason and memory were told of folders and prunekit.json)."""
    if args.command == "memory":
        return "the store keeps every turn committed before this moment, and nothing of the unfinished write"
    whole = "the earlier output, or this run's if its save had finished"
    if args.command in ("prune", "cnn") or getattr(args, "data_command", None) == "qtune":  # output folders
        which = "; its prunekit.json says which" if args.command == "prune" else ""
        return f"no output was left half-written: an output folder holds what was whole at this moment ({whole}{which})"
    return f"no output was left half-written: an output file holds what was whole at this moment ({whole})"


def note_not_stored(model, source, compute_dtype: str, *, kept_blocks: list[int] | None = None) -> None:
    """The note of a run computed in a narrower dtype than its input's: the tensors whose stored values the save
    could not give back (`prunekit.weights.io.names_not_stored`)."""
    from prunekit.weights.io import names_not_stored, resolve_model

    lost = names_not_stored(model, resolve_model(source), kept_blocks=kept_blocks)
    if lost:  # a .bin folder, or names the loader rewrote: their values stay rounded
        print(f"prunekit: note: {len(lost)} tensor(s) of the output ({lost[0]}, ...) are not in {source}'s "
              f"safetensors files under their names, so they are saved as computed, rounded to {compute_dtype}; "
              "--compute-dtype float32 keeps them as they were", file=sys.stderr)


def model_files(args, path) -> list | None:
    """The files of the model folder `path` as `eval_dense` keys its cache on, read before the model is loaded;
    None when nothing will be looked up (no --eval, or --no-dense-cache)."""
    from prunekit import evalcache

    return evalcache.folder_files(path) if args.eval and not args.no_dense_cache else None


def eval_dense(model, tok, texts: dict, args, progress: bool, files: list | None = None) -> dict:
    """``{name: {"dense": perplexity dict}}`` of `model` on each of `texts` before a prune command changes it, with
    ``args.eval_seqlen`` / ``args.eval_tokens``; a text shorter than the default token count is scored whole.
    With `files` (`model_files` of ``args.model`` taken before the model was loaded from it), a figure an earlier
    run measured on the same model files and windows is reused (`prunekit.evalcache`; its dict then says
    ``"cached": "<when it was scored>"``), and what is scored is kept for the next run."""
    import prunekit
    from prunekit import evalcache
    from prunekit.evaluate import EVAL_TOKENS, Perplexity
    from prunekit.weights.io import resolve_model

    evaluation, reused = {}, []
    tokens, fit, batch_size = args.eval_tokens or EVAL_TOKENS, args.eval_tokens is None, 4
    folder = resolve_model(args.model) if files is not None else None

    def unchanged() -> bool:  # the folder still holds what was loaded (it was not replaced meanwhile)
        try:
            return evalcache.folder_files(folder) == files
        except OSError:
            return False

    for name, text in texts.items():
        key = None if files is None or not unchanged() else evalcache.key_for(
            folder, text, files=files, seqlen=args.eval_seqlen, tokens=tokens, fit=fit, batch_size=batch_size,
            dtype=_computed_in(model))
        hit = evalcache.lookup(key) if key is not None else None
        if hit is not None:
            ppl = Perplexity(**hit["dense"])
            reused.append(f"{name} (scored {hit['computed']})")
        else:
            ppl = prunekit.perplexity(model, tok, text, seqlen=args.eval_seqlen, tokens=tokens, batch_size=batch_size,
                                      progress=progress, fit=fit, desc=f"perplexity {name} dense")
            if key is not None and unchanged():
                evalcache.store(key, ppl.to_dict())
        if fit:
            _note_fitted(ppl, args.eval_seqlen, "--eval-tokens")
        evaluation[name] = {"dense": ppl.to_dict() if hit is None else dict(ppl.to_dict(), cached=hit["computed"])}
    if reused:
        print(f"prunekit: note: reused the dense perplexity an earlier run measured on the same model files and "
              f"windows: {', '.join(reused)}; --no-dense-cache scores it again", file=sys.stderr)
    return evaluation


def eval_pruned(evaluation: dict, model, tok, texts: dict, args, progress: bool, saved_dtype=None, *,
                unchanged_from=None, kept_blocks: list[int] | None = None, pruned_zeros: bool = True) -> None:
    """Add ``"pruned"`` to each of `evaluation`'s texts, on the windows its dense perplexity was scored on, with the
    weights first rounded to `saved_dtype` (the output's: what is scored is what is saved). A model computed in a
    narrower dtype than its folder's: `unchanged_from` (the folder), `kept_blocks` and `pruned_zeros` as its save
    gets them (`prunekit.weights.io.round_to_saved`)."""
    import prunekit
    from prunekit.weights.io import resolve_model, round_to_saved

    if texts:
        narrower = _computed_in(model) != "float32"  # the save gives back the input's values: round those
        round_to_saved(model, saved_dtype, unchanged_from=resolve_model(unchanged_from) if narrower and
                       unchanged_from is not None else None, kept_blocks=kept_blocks, pruned_zeros=pruned_zeros)
    for name, text in texts.items():
        evaluation[name]["pruned"] = prunekit.perplexity(model, tok, text, seqlen=args.eval_seqlen,
                                                         tokens=evaluation[name]["dense"]["tokens"],
                                                         progress=progress, desc=f"perplexity {name} pruned").to_dict()


def _note_fitted(ppl, seqlen: int, tokens_flag: str) -> None:
    """Say on stderr when a text shorter than the default token count was scored whole (no count given)."""
    from prunekit.evaluate import EVAL_TOKENS

    if ppl.tokens < EVAL_TOKENS // seqlen * seqlen:
        print(f"prunekit: note: {ppl.text['source']} holds {ppl.windows} window(s) of {seqlen} tokens, fewer than the "
              f"default {EVAL_TOKENS} tokens; scored them all ({ppl.tokens} tokens). Give {tokens_flag} to require a "
              "count", file=sys.stderr)


def _check_eval_sizes(seqlen: int, tokens: int | None, tokens_flag: str, *, seqlen_flag: str = "--seqlen") -> None:
    """The window >= 2 tokens and the token budget >= 1 (0 is not "the default"), before anything is loaded."""
    from prunekit.errors import InputError, int_at_least

    int_at_least(seqlen, seqlen_flag, 2)
    if tokens is not None:
        int_at_least(tokens, tokens_flag, 1, hint=" (tokens evaluated; leave it out for the default)")
        if tokens > seqlen and tokens % seqlen:  # whole windows only: 1000 in windows of 512 scored 512, unsaid
            print(f"prunekit: note: {tokens_flag} {tokens} is not a multiple of {seqlen_flag} {seqlen}; scoring "
                  f"{tokens // seqlen} whole window(s), {tokens // seqlen * seqlen} tokens", file=sys.stderr)
        if tokens < seqlen:  # was blamed on the text, naming eval's --tokens
            raise InputError(f"{tokens_flag} {tokens} is less than one {seqlen_flag} window of {seqlen} tokens; raise "
                             f"{tokens_flag} or lower {seqlen_flag}")


def _record(path: Path) -> dict | None:
    """The ``prunekit.json`` object in model folder `path`, None when there is none; a broken file is an
    InputError."""
    from prunekit.errors import InputError

    recorded = Path(path) / "prunekit.json"
    if not recorded.is_file():
        return None
    try:
        meta = json.loads(recorded.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:  # deep nesting: a RecursionError
        raise InputError(f"{recorded} is not valid JSON ({e}); fix or delete it, or give --pattern") from None
    if not isinstance(meta, dict):
        raise InputError(f"{recorded} holds a JSON {type(meta).__name__}, not the object prunekit writes; fix or "
                         "delete it, or give --pattern")
    return meta


def _recorded(path: Path) -> tuple[str | None, tuple]:
    """The N:M pattern a prunekit.json in model folder `path` records (or None) and the skip globs its pruning
    left dense; a broken file is an InputError."""
    from prunekit.errors import InputError
    from prunekit.select import parse_pattern

    recorded = path / "prunekit.json"
    meta = _record(path)
    if meta is None:
        return None, ()
    pattern = meta.get("pattern")
    if pattern is not None and not isinstance(pattern, str):
        raise InputError(f"{recorded} records pattern {pattern!r}, not an N:M string; fix it or give --pattern")
    if pattern is not None:
        try:
            parse_pattern(pattern)
        except InputError as e:
            raise InputError(f"{recorded} records a bad pattern: {e}; fix it or give --pattern") from None
    options = meta.get("options")
    skip = options.get("skip") if isinstance(options, dict) else None
    if not isinstance(skip, list) or not all(isinstance(g, str) for g in skip):
        skip = []
    return pattern, tuple(skip)


def _recorded_if_readable(path: Path) -> tuple[str | None, tuple]:
    """`_recorded` for a step that only reports on the input's pattern (depth, widths, qtune): a broken record
    reads as none (it failed those runs after their work, and told them to give a --pattern they do not take)."""
    from prunekit.errors import InputError

    try:
        return _recorded(Path(path))
    except InputError:
        return None, ()


def _provenance(model: str) -> dict:
    """Where the input came from, for an output's record: its folder (absolute) and, when prunekit made it, what
    its own record says (method, pattern, its input...), so a chain of steps keeps its history."""
    from prunekit.errors import InputError
    from prunekit.weights.io import resolve_model

    folder = resolve_model(model)
    try:
        meta = _record(folder)
    except (InputError, OSError):  # unreadable: `_recorded` says so where it matters
        meta = None
    keys = ("model", "method", "domain", "ratio", "pattern", "compute_dtype", "input")
    return {"folder": str(folder), "prunekit": {k: meta[k] for k in keys if k in meta} if meta else None}


def _cmd_eval(args) -> int:
    import prunekit
    from prunekit.errors import InputError, int_at_least
    from prunekit.evaluate import EVAL_TOKENS
    from prunekit.weights.io import parse_device, resolve_model, stored_dtypes

    _check_eval_sizes(args.seqlen, args.tokens, "--tokens")
    parse_device(args.device, what="--device")
    int_at_least(args.batch_size, "--batch-size", 1)
    path = resolve_model(args.model)
    if args.pattern is None:
        pattern, skip = _recorded(path)
    else:  # --pattern overrides the record; the layers it says --skip left dense still are
        pattern = args.pattern
        try:
            skip = _recorded(path)[1]
        except InputError:
            skip = ()
    if pattern is not None:
        prunekit.parse_pattern(pattern)
    text = prunekit.load_text(args.text, purpose="evaluation")  # a missing or empty file fails before the load
    model, tok = prunekit.load_model(path, dtype=args.dtype, device=args.device)
    ppl = prunekit.perplexity(model, tok, text, seqlen=args.seqlen, tokens=args.tokens or EVAL_TOKENS,
                              batch_size=args.batch_size, progress=not args.quiet, fit=args.tokens is None)
    if args.tokens is None:
        _note_fitted(ppl, args.seqlen, "--tokens")
    measured = prunekit.sparsity(model)
    stored = str(stored_dtypes(path)).removeprefix("torch.")  # "bfloat16", or "bfloat16 with float32 tensors"
    out = {**ppl.to_dict(), "sparsity": measured["total"], "model_sparsity": measured["model_total"],
           "pattern": pattern, "stored_dtype": stored, "computed_in": _computed_in(model)}
    if pattern is not None:
        bad = prunekit.check_pattern(model, pattern, skip=skip)
        out["pattern_ok"] = not bad
        out["pattern_violations"] = bad
        if skip:
            out["pattern_skipped"] = list(skip)  # left dense on purpose (prunekit.json's skip), not checked
    if args.json:
        print(jsonl.dumps(out))
    else:
        print(f"{args.model}: perplexity {ppl.ppl:.3f} on {ppl.text['source']} ({ppl.windows} x {ppl.seqlen} = "
              f"{ppl.tokens} tokens; weights stored in {stored}, computed in {out['computed_in']})")
        print(f"sparsity of block Linears {measured['total']:.4f}; of all parameters {measured['model_total']:.4f}")
        if pattern is not None:
            left = f" (layers matching {', '.join(skip)} left dense by --skip, not checked)" if skip else ""
            verdict = "every layer conforms" if out["pattern_ok"] else f"{len(bad)} layers break it"
            print(f"pattern {pattern}: {verdict}{left}")
    if pattern is not None and bad:  # a check a script can test without parsing the output
        print(f"prunekit: pattern {pattern} is broken by {len(bad)} layer(s), first {bad[0]}", file=sys.stderr)
        return 1
    return 0


def _option_defaults(spec) -> dict:
    """The ``--option`` keys method `spec` takes, with their defaults (weights, structured, tinyfusion and the KV
    policies; the other depth methods take none)."""
    import inspect

    if spec.domain == "kv":
        from prunekit.inference.kv import policy_options

        return policy_options(spec.name)
    if spec.domain == "weights":
        from prunekit.weights.prune import method_options

        return method_options(spec.name)
    if spec.domain == "structured":  # Týr's options; the plain methods take a few of them
        from prunekit.structured.core import _PLAIN_OPTIONS
        from prunekit.structured.tyr import tyr_options

        defaults = {p.name: p.default for p in inspect.signature(tyr_options).parameters.values()}
        if spec.name == "tyr":
            return defaults
        return {k: v for k, v in defaults.items() if k in _PLAIN_OPTIONS[spec.name]}
    if spec.name == "tinyfusion":
        from prunekit.depth.methods import _TINYFUSION_OPTIONS
        from prunekit.depth.tinyfusion import tinyfusion

        params = inspect.signature(tinyfusion).parameters.values()
        return {p.name: p.default for p in params if p.name in _TINYFUSION_OPTIONS}
    return {}


def _as_option(value) -> str:
    """A default written as ``--option KEY=VALUE`` takes it (Python's repr, ``tau=(4.0, 0.1)`` or ``base='wanda'``,
    was refused when copied)."""
    if value is None or isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (tuple, list)):
        return ",".join(_as_option(v) for v in value)
    return str(value)


def _cmd_methods(_args) -> int:
    from prunekit import registry
    from prunekit.weights.prune import OWL_METHODS

    for spec in registry.METHODS.values():
        print(f"{spec.name:<18} {spec.domain:<10} {spec.summary}\n{'':<30}{spec.paper} <{spec.url}>")
        opts = _option_defaults(spec)  # structured and tinyfusion were left out, though --option takes theirs
        if opts:
            print(f"{'':<30}--option defaults: {' '.join(f'{k}={_as_option(v)}' for k, v in opts.items())}")
        if spec.name in OWL_METHODS:
            print(f"{'':<30}--profile owl: a ratio per block from its outlier scores (OWL, Yin et al. 2024 "
                  "<https://arxiv.org/abs/2310.05175>; --owl-m 5 --owl-lambda 0.08)")
    return 0


class Terminated(BaseException):
    """SIGTERM (``kill``, ``timeout``, CI) as an exception, so the clean-up that Ctrl-C gets runs for it too."""


def _on_sigterm(_signum, _frame):
    raise Terminated()


class _StdoutFailed(Exception):
    """Writing to standard output failed (a full device): the work itself was done."""


class _Stream:
    """A wrapper of sys.stdout or sys.stderr: what it does not change goes to the stream."""

    def __init__(self, stream):
        self._stream = stream

    def __getattr__(self, name):
        return getattr(self._stream, name)


class _GuardedStdout(_Stream):
    """sys.stdout whose write errors say they are stdout's: "No space left on device" after a saved run read as
    if the save had failed, and a retrying script added the same memory turns twice."""

    def _call(self, fn, *args):
        try:
            return fn(*args)
        except BrokenPipeError:  # `| head`: main's own quiet exit
            raise
        except OSError as e:
            raise _StdoutFailed(e.strerror or str(e)) from None

    def write(self, text):
        return self._call(self._stream.write, text)

    def flush(self):
        return self._call(self._stream.flush)


class _DroppingStderr(_Stream):
    """sys.stderr that drops what it cannot write: progress bars and notes are diagnostics, and a full log device
    (``2>/dev/full``) failed the run at its first loading bar, with nothing said and nothing saved."""

    def write(self, text):
        try:
            return self._stream.write(text)
        except (OSError, ValueError):  # ValueError: the stream was closed
            return len(text)

    def flush(self):
        try:
            self._stream.flush()
        except (OSError, ValueError):
            pass


# arguments that are tokenized or written into an output (a report, a store) with their names: bytes that are not
# UTF-8 in them were tracebacks in the tokenizer or at the save, after the work (a file only read is fine)
_UTF8 = {"out": "--out", "store": "--store", "prompt": "--prompt", "calib": "--calib", "eval": "--eval",
         "domain": "--domain", "query": "query"}


# options that name a file or folder: "-" is no standard stream there (`reason --answers -` wrote a file named "-")
_PATHS = {"out": "--out", "answers": "--answers", "questions": "--questions", "prompt_file": "--prompt-file",
          "calib": "--calib", "eval": "--eval", "domain": "--domain", "store": "--store", "jsonl": "--jsonl",
          "data": "--data", "test_data": "--test-data", "labels": "--labels", "test_labels": "--test-labels",
          "probs": "--probs", "scores": "--scores", "embeddings": "--embeddings", "model": "the model",
          "keep": "--keep", "paths": "PATHS", "runs": "RUN"}


def _refuse_dash(args) -> None:
    from prunekit.errors import InputError

    names = dict(_PATHS, **({"text": "--text"} if args.command == "eval" else {}))  # memory add's text is a turn
    for name, flag in names.items():
        value = getattr(args, name, None)
        if name == "eval" and isinstance(value, str):  # a comma list: --eval wiki,-
            value = [v.strip() for v in value.split(",")]
        if value == "-" or (isinstance(value, list) and "-" in value):
            raise InputError(f"{flag} -: prunekit reads and writes files, not standard input or output; give a file "
                             "path (save piped data to a file first; a file read whole may also be /dev/stdin)")


def _check_utf8(args) -> None:
    from prunekit.errors import InputError

    names = dict(_UTF8, **({"text": "text"} if args.command == "memory" else {}))  # eval's --text is only read
    for name, flag in names.items():
        value = getattr(args, name, None)
        if isinstance(value, str) and any("\udc80" <= c <= "\udcff" for c in value):
            shown = value.encode("utf-8", "surrogateescape").decode("utf-8", "replace")
            raise InputError(f"{flag} {shown!r} holds bytes that are not UTF-8 (shown as \ufffd); give UTF-8 text "
                             "and file names")


def _flags(parser: argparse.ArgumentParser, args) -> dict[str, str]:
    """Each option's Python name (argparse dest) -> its flag, along the subcommands `args` chose; less the names
    the user gave as ``--option KEY=VALUE`` (``--option batch_size=0`` is not prune's --batch-size)."""
    flags: dict[str, str] = {}
    while parser is not None:
        chosen = None
        for action in parser._actions:
            if isinstance(action, argparse._SubParsersAction):
                chosen = action.choices.get(getattr(args, action.dest, None))
            elif action.option_strings and action.dest != "help":
                flags[action.dest] = max(action.option_strings, key=len)
        parser = chosen
    for item in getattr(args, "option", None) or []:
        flags.pop(str(item).split("=", 1)[0].strip().replace("-", "_"), None)
    return flags


# Python names that are not the dest of their flag (cleanlab's pred_probs is `--probs`).
_API_NAMES = {"pred_probs": "probs"}


def _in_flags(message: str, flags: dict[str, str]) -> str:
    """A message from the Python API names a parameter as Python does (``batch_size must be ...``,
    ``max_new_tokens=0 must be ...``); on the command line it names the flag the user typed instead."""
    head = re.match(r"([a-z][a-z0-9_]*)(?:=(\S+))? must ", message)
    if head and head.group(1) in flags:
        value = f"={head.group(2)}" if head.group(2) else ""
        message = f"{flags[head.group(1)]}{value} must {message[head.end():]}"
    names = {**{n: flags[d] for n, d in _API_NAMES.items() if d in flags}, **flags}
    for name, flag in names.items():  # snake_case names elsewhere in the message, not inside a path, a file name
        if "_" in name:  # or double quotes (a key of a JSON file, such as generation_config.json's "max_new_tokens")
            message = re.sub(rf"(?<![\w/\\.\"-]){name}(?![\w=/\\\"]|\.\w)", flag, message)
    return message


def _is_terminal(stream) -> bool:
    try:
        return stream is not None and stream.isatty()
    except (AttributeError, ValueError, OSError):  # a closed or unusual stream: not a terminal
        return False


def main(argv: list[str] | None = None) -> int:
    import signal

    parser = _parser()
    args = parser.parse_args(argv)
    from prunekit.errors import InputError

    bars = contextlib.ExitStack()
    if getattr(args, "quiet", False):  # for this command only: a caller's process gets its bars back
        from prunekit.weights.io import quiet_progress_bars, silent_progress_bars

        bars.enter_context(quiet_progress_bars())
        bars.enter_context(silent_progress_bars())
    elif not _is_terminal(sys.stderr) and not any(k.startswith("TQDM_") and k[5:].lower() == "mininterval"
                                                   for k in os.environ):  # a log (the variable as tqdm reads it)
        from prunekit.weights.io import sparse_progress_bars

        bars.enter_context(sparse_progress_bars())
    try:  # Python's default SIGTERM ends the process without running `finally`: temp folders were left
        previous = signal.signal(signal.SIGTERM, _on_sigterm)
    except ValueError:  # not the main thread: leave the handler alone
        previous = None
    stdout, stderr = sys.stdout, sys.stderr
    if stdout is not None:  # None when the shell closed it (>&-): print then writes nothing
        sys.stdout = _GuardedStdout(stdout)
    if stderr is not None:
        sys.stderr = _DroppingStderr(stderr)
    try:
        _check_utf8(args)
        _refuse_dash(args)
        if args.command in _MODULES:
            return import_module(_MODULES[args.command]).run(args)
        return {"prune": _cmd_prune, "eval": _cmd_eval, "methods": _cmd_methods}[args.command](args)
    except InputError as e:  # one line: a library's text quoted in a message (pyarrow, SQLite) may hold newlines
        text = " ".join(line.strip() for line in str(e).splitlines() if line.strip())
        print(f"prunekit: error: {_in_flags(text, _flags(parser, args))}", file=sys.stderr)
        return 2
    except _StdoutFailed as e:
        print(f"prunekit: error: could not write to standard output ({e}); what the command saved before that "
              "(its --out, a store) is complete", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, Terminated) as e:  # outputs are renamed into place whole, so none is half-written
        what = "interrupted" if isinstance(e, KeyboardInterrupt) else "terminated"
        print(f"prunekit: {what}; {_left_after_a_stop(args)}", file=sys.stderr)
        return 130 if isinstance(e, KeyboardInterrupt) else 143
    except BrokenPipeError:  # `prunekit ... | head`: the reader left; stop quietly (it was "error: Broken pipe")
        try:
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at interpreter exit
        except (OSError, ValueError):
            pass
        return 141  # 128 + SIGPIPE, as a shell reports a program the closed pipe stopped; 1 is a system refusal
    except OSError as e:  # the system refused (no space, no permission, a name too long): one line, not a traceback
        where = str(e.filename) if e.filename is not None else ""
        where = f": {where if len(where) <= 200 else where[:200] + '...'}" if where else ""
        print(f"prunekit: error: {e.strerror or e}{where}", file=sys.stderr)
        return 1
    except Exception as e:  # safetensors and tokenizers report a full disk as their own errors, not OSErrors
        if type(e).__name__ == "SafetensorError" and "I/O error" in str(e):
            print(f"prunekit: error: could not write the weights: {str(e).split('I/O error: ')[-1]}", file=sys.stderr)
            return 1
        if re.search(r"\(os error \d+\)$", str(e)):  # tokenizers (Rust): "No space left on device (os error 28)"
            print(f"prunekit: error: {str(e).splitlines()[-1]}", file=sys.stderr)
            return 1
        raise
    finally:
        sys.stdout, sys.stderr = stdout, stderr
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
        bars.close()


if __name__ == "__main__":
    sys.exit(main())
