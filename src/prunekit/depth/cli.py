"""``prunekit prune MODEL --method {shortgpt,sensitivity,every-other,random,tinyfusion} --layers N --out DIR``.

Depth pruning from the command line, over `prunekit.depth`: choose the blocks to keep on calibration text,
drop the others, optionally recover by fine-tuning, and save a standard model (config and layer indices
rewritten) with ``prunekit.json`` (kept layer indices, what the method reported, perplexities), ``report.md``
and ``blocks.png`` (the blocks kept, over ShortGPT's or sensitivity's per-block score where there is one).
Everything is validated before the model is loaded; the output folder appears only when complete.

MODEL may also be a DiT folder written by `prunekit.depth.dit.save_dit` (the Fashion-MNIST testbed): then the
calibration data are ``--samples`` Fashion-MNIST training images (the data the DiT models; ``--calib`` must be
unset or ``fashion-mnist``), the loss is the diffusion loss, ``--eval fid`` reports the classifier FID and
class accuracy of DDIM samples before and after (30 per class, 25 steps; not Inception-FID), the speedup is
that of one denoiser forward, and the result is a DiT folder (`load_dit`) with ``prunekit.json``,
``report.md`` and ``blocks.png``.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time

__all__ = ["add_prune_arguments", "run_prune"]

RECOVERY = ("none", "lora", "full", "kd")
RECOVER_STEPS = 100  # --recover-steps default


def add_prune_arguments(pr) -> None:
    g = pr.add_argument_group("depth methods (shortgpt, sensitivity, every-other, random, tinyfusion)")
    g.add_argument("--layers", type=int, default=None, help="depth: blocks kept (e.g. 15 of SmolLM2's 30)")
    g.add_argument("--group", default=None, metavar="N:M[,N:M...]",
                   help="tinyfusion: keep N of every M consecutive blocks (default: the smallest uniform N:M "
                   "that keeps --layers, 15 of 30 -> 1:2; where that has over 20,000 masks, groups of about 6 "
                   "blocks, 13 of 30 -> 2:6,3:6,2:6,3:6,3:6)")
    g.add_argument("--learn-steps", type=int, default=200, help="tinyfusion: mask-learning steps (default 200)")
    g.add_argument("--candidates", type=int, default=8, help="random: random masks tried (default 8)")
    g.add_argument("--recover", choices=RECOVERY, default="none",
                   help="after pruning: none, lora (LoRA fine-tuning, merged), full (all weights) or kd "
                   "(LoRA trained to match the dense model's next-token distribution)")
    g.add_argument("--recover-steps", type=int, default=RECOVER_STEPS,
                   help=f"recovery steps of --batch-size windows (default {RECOVER_STEPS})")
    g.add_argument("--recover-lr", type=float, default=None, help="recovery learning rate (default 5e-4 LoRA, 5e-5 full)")
    g.add_argument("--kd-features", type=float, default=0.0, metavar="W",
                   help="with --recover kd: also match each kept block's output to the dense model's at the same "
                   "point of the stack, weight W annealed linearly to 0 (TinyFusion's masked KD uses 0.01; default 0: "
                   "output KD only)")


def _layers_for_ratio(model, ratio) -> str:
    """What `--ratio` would be in blocks kept, when the model's block count can be read without loading it (a
    user had to know SmolLM2 has 30 blocks)."""
    from prunekit import zoo
    from prunekit.weights.io import _json, config_depth, resolve_model

    try:
        if str(model) in zoo.MODELS and not (zoo.cache_dir() / "models" / str(model) / "config.json").exists():
            return ""  # not built yet: no conversion just for a hint
        config = _json(resolve_model(model) / "config.json") or {}
    except Exception:  # a bad model is refused later, with its own message
        return ""
    nested = config.get("model") if isinstance(config.get("model"), dict) else {}  # a prunekit DiT
    depth = config_depth(config) or (nested.get("depth") if isinstance(nested.get("depth"), int) else None)
    if not depth:
        return ""
    text = f"; {model} has {depth} blocks"
    if isinstance(ratio, (int, float)) and 0 <= ratio < 1:
        text += f", so removing {ratio:g} of them is --layers {max(1, round(depth * (1 - ratio)))}"
    return text


def _common_checks(args) -> dict:
    """The checks shared by language models and DiTs; returns the method's ``--option`` values."""
    from prunekit.errors import InputError, int_at_least
    from prunekit.weights.io import check_output

    if args.ratio is not None or args.pattern is not None:
        raise InputError("depth methods take --layers N (blocks kept), not --ratio or --pattern"
                         + _layers_for_ratio(args.model, args.ratio))
    if args.layers is None:
        raise InputError(f"{args.method} needs --layers N, the number of blocks to keep")
    int_at_least(args.layers, "--layers", 1)
    # --group, --learn-steps and --candidates for the wrong method, and --structure / --sequential, are refused
    # by prunekit.cli before this
    if args.recover == "none" and (args.recover_steps != RECOVER_STEPS or args.recover_lr is not None):
        flag = "--recover-lr" if args.recover_lr is not None else "--recover-steps"
        raise InputError(f"{flag} does nothing without --recover lora, full or kd; add --recover or leave {flag} out")
    if not (math.isfinite(args.kd_features) and args.kd_features >= 0):
        raise InputError(f"--kd-features is a feature-matching weight >= 0, got {args.kd_features}")
    if args.kd_features and args.recover != "kd":
        raise InputError(f"--kd-features matches blocks to the dense model's during distillation; add --recover kd "
                         f"(not {args.recover}) or leave --kd-features out")
    int_at_least(args.learn_steps, "--learn-steps", 1)
    int_at_least(args.candidates, "--candidates", 1)
    int_at_least(args.recover_steps, "--recover-steps", 1)
    int_at_least(args.batch_size, "--batch-size", 1)
    if args.recover_lr is not None and not (args.recover_lr > 0 and args.recover_lr != float("inf")):  # NaN fails too
        raise InputError(f"--recover-lr must be a positive number, got {args.recover_lr}")
    if args.skip or args.base or args.domain:
        raise InputError("--skip, --base and --domain are weight-method options; depth methods do not take them")
    from prunekit.cli import _options

    options = _options(args)
    if options and args.method != "tinyfusion":
        raise InputError(f"{args.method} takes no --option")
    check_output(args.out, overwrite=args.overwrite)
    return options


def _check_depth(args, depth) -> None:
    from prunekit.errors import InputError

    if isinstance(depth, int) and args.layers >= depth:
        raise InputError(f"--layers {args.layers} keeps every block or more (the model has {depth}); give a number "
                         f"below {depth}")
    if isinstance(depth, int) and args.method == "tinyfusion":
        from prunekit.depth import core

        groups = core.parse_groups(args.group, depth=depth, kept=args.layers)
        if args.group is None and len(set(groups)) > 1:
            print(f"prunekit: note: no uniform N:M keeps {args.layers} of {depth} blocks in groups of at most "
                  f"{core.DEFAULT_GROUP_OPTIONS:,} masks each; tinyfusion learns the groups "
                  f"{core._group_text(groups)} (choose others with --group)", file=sys.stderr)


def _dataless(args) -> bool:
    """every-other without recovery reads no calibration (its pattern is fixed), and says so of calibration flags
    given. (It cut the default 512-token wiki windows anyway, refused for a model of fewer positions, and recorded
    the flags as if used.)"""
    from prunekit.cli import _given

    if args.method != "every-other" or args.recover != "none":
        return False
    flags = [f for f in ("--calib", "--samples", "--seqlen", "--seed", "--batch-size") if _given(args, f)]
    if flags:
        print(f"prunekit: note: every-other keeps a fixed pattern and reads no calibration without --recover; "
              f"{', '.join(flags)} unused", file=sys.stderr)
    return True


def _validate(args):
    from pathlib import Path

    import torch

    import prunekit
    from prunekit.errors import InputError, check_not_input
    from prunekit.weights.io import (check_replaceable, config_depth, read_config, refuse_composite, resolve_model,
                                     stored_dtype)

    options = _common_checks(args)
    path = resolve_model(args.model)
    trains = ("tinyfusion learns its masks with LoRA" if args.method == "tinyfusion" else
              f"--recover {args.recover} fine-tunes the pruned model" if args.recover != "none" else None)
    if trains and args.compute_dtype != "float32" and (args.compute_dtype != "auto"
                                                       or stored_dtype(path) != torch.float32):
        raise InputError(f"--compute-dtype {args.compute_dtype} runs scoring only: {trains}, which prunekit does in "
                         "float32; leave --compute-dtype out")  # (the weights would be trained in the narrow dtype)
    check_not_input(args.out, path, args.calib, *(args.eval or "").split(","))
    check_replaceable(Path(args.out).expanduser())  # before the work: --overwrite replaces earlier outputs only
    config = read_config(path)
    refuse_composite(config, "depth pruning")  # before the load: it was refused after the selection work
    _check_depth(args, config_depth(config))  # GPT-2's n_layer, GPT-Neo's num_layers: the check was skipped
    calib = None if _dataless(args) else prunekit.load_text(args.calib or "wiki", purpose="calibration")
    evals = [t.strip() for t in args.eval.split(",") if t.strip()] if args.eval else []
    eval_texts = {t: prunekit.load_text(t, purpose="evaluation") for t in evals}
    return path, calib, eval_texts, options


def _speed_line(speed: dict) -> str:
    d, p = speed["dense"], speed["pruned"]
    return (f"measured speedup (1 thread, prefill {d['prefill_tokens']} tokens, decode {d['decode_tokens']}, "
            f"fastest of {speed['rounds']} alternating rounds): "
            f"prefill {speed['speedup']['prefill']:.2f}x ({d['prefill_s']:.3f} -> {p['prefill_s']:.3f} s), "
            f"decode {speed['speedup']['decode']:.2f}x ({d['decode_s_per_token'] * 1e3:.1f} -> "
            f"{p['decode_s_per_token'] * 1e3:.1f} ms/token); parameters {d['params']:,} -> {p['params']:,}")


def _skipped_layers(model, skip) -> list[str]:
    """The block Linears an earlier weight pruning's `--skip` globs left dense, by their names now."""
    import fnmatch

    import prunekit

    return [n for n in prunekit.sparsity(model)["layers"] if any(fnmatch.fnmatchcase(n, g) for g in skip)]


def _renumbered(names: list[str], kept: list[int], prefix: str) -> tuple[str, ...]:
    """`names` of layers in blocks ``prefix.i`` under the kept blocks' new indices (`kept`: old index per new one);
    those of dropped blocks go. The input's globs named the old indices."""
    new = {old: i for i, old in enumerate(kept)}
    out = []
    for name in names:
        index, _, rest = name[len(prefix) + 1:].partition(".")
        if name.startswith(prefix + ".") and index.isdigit() and int(index) in new:
            out.append(f"{prefix}.{new[int(index)]}.{rest}")
    return tuple(out)


def run_prune(args) -> int:
    from pathlib import Path

    import torch

    import prunekit
    import prunekit.depth as depth
    from prunekit import report
    from prunekit.cli import (_computed_in, _provenance, _recorded_if_readable, _versions, eval_dense, eval_pruned,
                              model_files, note_not_stored)
    from prunekit.evaluate import zeros_kept
    from prunekit.speed import noise_note, speed_against_dense
    from prunekit.depth.dit import is_dit_folder
    from prunekit.text import check_token_ids
    from prunekit.weights.engine import find_blocks, refuse_factorized
    from prunekit.errors import InputError
    from prunekit.lora import has_linear
    from prunekit.weights.io import MixedDtypes, carry_licence, output_dtype

    if is_dit_folder(args.model):
        return _run_dit(args)
    wall = time.perf_counter()
    path, calib, eval_texts, options = _validate(args)
    progress = not args.quiet
    saved_dtype, dtype_words = output_dtype(args.dtype, path)
    files = model_files(args, path)
    model, tok = prunekit.load_model(path, dtype=args.compute_dtype, device=args.device)
    if args.recover != "none":  # before the selection's work
        refuse_factorized(model, f"--recover {args.recover}", "recover the dense model before "
                          "ARMOR, or prune depth without --recover")
    if args.recover in ("lora", "kd") and not has_linear(find_blocks(model)[1]):
        raise InputError(f"--recover {args.recover} puts LoRA on the blocks' nn.Linear layers and these blocks have "
                         "none (GPT-2's are Conv1D); use --recover full")
    target = None
    if calib is not None:
        ids = prunekit.calibration_ids(tok, calib, samples=args.samples, seqlen=args.seqlen, seed=args.seed)
        check_token_ids(model, ids, what="calibration text")
        target = depth.causal_lm_target(model, ids, batch_size=args.batch_size)
    evaluation = eval_dense(model, tok, eval_texts, args, progress, files)
    dense_layers = len(find_blocks(model)[1])
    start = time.perf_counter()
    if target is None:  # every-other without recovery
        keep, info = depth.every_other(dense_layers, kept=args.layers), {}
    else:
        keep, info = depth.select_blocks(target, args.method, kept=args.layers, groups=args.group,
                                         steps=args.learn_steps, candidates=args.candidates, seed=args.seed,
                                         progress=progress, **options)
    seconds = time.perf_counter() - start  # the block selection's (recovery's is its own)
    teacher = copy.deepcopy(model) if args.recover == "kd" else None
    pattern, skip = _recorded_if_readable(Path(path))
    left_dense = _skipped_layers(model, skip)  # by name before the blocks are renumbered
    kept = depth.drop_layers(model, keep)
    if isinstance(saved_dtype, MixedDtypes):  # each kept block keeps its own tensors' dtypes under its new index
        saved_dtype = saved_dtype.renumbered(kept)
    skip = _renumbered(left_dense, kept, find_blocks(model)[0])
    input_sparsity = prunekit.sparsity(model)["total"]  # the kept blocks', as the input had them
    recovery = None
    for name, text in eval_texts.items() if args.recover != "none" else ():  # what recovery starts from
        evaluation[name]["before_recovery"] = prunekit.perplexity(
            model, tok, text, seqlen=args.eval_seqlen, tokens=evaluation[name]["dense"]["tokens"], progress=progress,
            desc=f"perplexity {name} before recovery").to_dict()
    if args.recover != "none":
        res = depth.recover(target, steps=args.recover_steps, trainable="full" if args.recover == "full" else "lora",
                            lr=args.recover_lr, teacher=(teacher, find_blocks(teacher)[1]) if teacher else None,
                            keep=keep, features=args.kd_features,
                            seed=args.seed, progress=progress)
        recovery = res.to_dict()
        del teacher
    step = "depth pruning" if args.recover == "none" else f"recovery (--recover {args.recover})"
    zeros, zeros_note = zeros_kept(step, input_sparsity, model, pattern, skip=skip)
    speed = unspeed = None
    if not args.no_speed:  # the dense model again, timed in turns with the pruned one under the same load
        speed, unspeed = speed_against_dense(path, model, dtype=args.compute_dtype)
        if unspeed:
            print(f"prunekit: note: {unspeed}", file=sys.stderr)
    eval_pruned(evaluation, model, tok, eval_texts, args, progress, saved_dtype, unchanged_from=path,
                kept_blocks=kept, pruned_zeros=False)
    meta = {
        "model": str(args.model), "input": _provenance(args.model), "method": args.method, "domain": "depth",
        "dense_layers": dense_layers,
        "kept_layers": kept, "removed_layers": [i for i in range(dense_layers) if i not in kept],
        "calibration": None if calib is None else {**calib.describe(), "samples": args.samples, "seqlen": args.seqlen,
                                                   "seed": args.seed, "batch_size": args.batch_size},
        "method_info": info, "recovery": recovery, "evaluation": evaluation, "speed": speed, "speed_skipped": unspeed,
        "input_zeros": zeros,  # a sparse input's zeros: how many recovery kept
        # an N:M pattern the blocks still keep, so `eval` checks it as it did the input's
        **({"pattern": pattern, "options": {"skip": list(skip)}} if zeros and zeros["pattern_kept"] else {}),
        "saved_dtype": str(saved_dtype).removeprefix("torch."),
        "compute_dtype": _computed_in(model),  # auto: the folder's dtype, as loaded
        "versions": _versions(), "seconds": seconds, "torch_threads": torch.get_num_threads(),
        "device": str(args.device), "wall_seconds": time.perf_counter() - wall,
    }
    narrower = meta["compute_dtype"] != "float32"  # the kept blocks are saved as the input stores them

    def extra(folder):
        lines = [f"# {args.method}: {dense_layers} -> {len(kept)} blocks", "",
                 f"kept layers: {kept}", f"recovery: {recovery or 'none'}", ""]
        if narrower:
            lines[-1:-1] = [f"computed in {meta['compute_dtype']}: the blocks scored on activations in that dtype "
                            "(the scores summed in float32)"]
        if speed is not None:
            lines += [_speed_line(speed), ""]
        elif unspeed:
            lines += [f"not timed: {unspeed}", ""]
        if evaluation:
            lines.append(report.ppl_table(evaluation))
        lines += ["", "![blocks kept](blocks.png)"]
        (folder / "report.md").write_text("\n".join(lines) + "\n")
        _plot_blocks(folder, args.method, dense_layers, kept, info)
        carry_licence(args.model, folder)

    out = depth.save_depth_pruned(model, tok, args.out, metadata=meta, overwrite=args.overwrite, extra=extra,
                                  dtype=saved_dtype, unchanged_from=path if narrower else None)
    print(f"pruned {args.model} with {args.method}: {dense_layers} -> {len(kept)} blocks, kept {kept}"
          + (f", recovered ({args.recover}, {args.recover_steps} steps)" if recovery else ""))
    if zeros_note:
        print(f"prunekit: note: {zeros_note}", file=sys.stderr)
    if speed is not None:
        print(_speed_line(speed))
        noisy = noise_note(speed)
        if noisy:
            print(f"prunekit: note: {noisy}", file=sys.stderr)
    if evaluation:
        print(report.ppl_table(evaluation))
    from prunekit.structured.export import WIDTHS_KEY

    # a Týr output's per-layer widths go with its blocks: plain transformers refuses the folder, as it did the input
    loader = "; load with prunekit.load: its widths differ per layer" if getattr(model.config, WIDTHS_KEY, None) else ""
    print(f"saved to {out} ({dtype_words}; report: {out / 'report.md'}{loader})")
    if narrower:
        note_not_stored(model, args.model, meta["compute_dtype"], kept_blocks=kept)
    return 0


_SCORES = {"shortgpt": ("block_influence", "block influence (1 - cos)"),
           "sensitivity": ("loss_without_block", "calibration loss without the block")}


def _plot_blocks(folder, method: str, depth: int, kept: list[int], info: dict) -> None:
    """``blocks.png``: the blocks kept, with the method's per-block score where it has one."""
    from prunekit import report

    key, name = _SCORES.get(method, (None, ""))
    report.plot_blocks(folder / "blocks.png", depth, kept, f"{method}: {depth} -> {len(kept)} blocks",
                       scores=info.get(key) if key else None, score_name=name)


DIT_EVAL = {"n_per_class": 30, "steps": 25, "seed": 0}


def _validate_dit(args):
    from pathlib import Path

    from prunekit.errors import InputError, check_not_input, int_at_least
    from prunekit.weights.io import check_replaceable

    options = _common_checks(args)
    if args.calib not in (None, "fashion-mnist"):
        raise InputError(f"a DiT calibrates on Fashion-MNIST training images; drop --calib {args.calib} "
                         "(or pass --calib fashion-mnist)")
    int_at_least(args.samples, "--samples", 1)
    if args.dtype != "auto":
        raise InputError(f"--dtype {args.dtype} applies to Hugging Face models; a DiT folder is saved as it is "
                         "(float32); leave --dtype out")
    if args.compute_dtype not in ("auto", "float32"):
        raise InputError(f"--compute-dtype {args.compute_dtype} applies to Hugging Face models; a DiT runs in "
                         "float32; leave --compute-dtype out")
    evals = [t.strip() for t in args.eval.split(",") if t.strip()] if args.eval else []
    if any(e != "fid" for e in evals):
        raise InputError(f"a DiT is evaluated with --eval fid (sample FID and class accuracy), not {args.eval}")
    if args.no_dense_cache:  # accepted and ignored
        raise InputError("--no-dense-cache applies to a language model's --eval perplexity; a DiT's FID is scored "
                         "every run; leave it out")
    path = Path(args.model).expanduser()
    check_not_input(args.out, path)
    check_replaceable(Path(args.out).expanduser())  # before the selection, recovery and FID (it came after them)
    if not (path / "model.safetensors").is_file():
        raise InputError(f"{path} has a DiT config.json but no model.safetensors; save it with prunekit.depth.dit.save_dit")
    _check_depth(args, json.loads((path / "config.json").read_text())["model"].get("depth"))
    return path, bool(evals), options


def _run_dit(args) -> int:
    import torch

    import prunekit.depth as depth
    from prunekit.cli import _versions
    from prunekit.depth import dit
    from prunekit.weights.io import check_finite_weights, parse_device

    wall = time.perf_counter()
    path, want_fid, options = _validate_dit(args)
    device = parse_device(args.device, what="--device")
    progress = not args.quiet
    model = check_finite_weights(dit.load_dit(path), path).to(device)
    images, labels = dit.fashion_images("train")
    pick = torch.randperm(len(images), generator=torch.Generator().manual_seed(args.seed))[: args.samples]
    target = dit.depth_target(model, images[pick], labels[pick], batch_size=args.batch_size, seed=args.seed)
    dense_layers = target.depth
    evaluation = {"dense": dit.evaluate_dit(model, **DIT_EVAL, progress=progress)} if want_fid else None
    dense_copy = None if args.no_speed else copy.deepcopy(model)  # timed alternately with the pruned model below
    start = time.perf_counter()
    keep, info = depth.select_blocks(target, args.method, kept=args.layers, groups=args.group, steps=args.learn_steps,
                                     candidates=args.candidates, seed=args.seed, progress=progress, **options)
    seconds = time.perf_counter() - start  # the block selection's (recovery's is its own)
    teacher = copy.deepcopy(model) if args.recover == "kd" else None
    depth.drop_blocks(model.blocks, keep)
    kept = [i for i, k in enumerate(keep) if k]
    recovery = None
    if args.recover != "none":
        res = depth.recover(target, steps=args.recover_steps, trainable="full" if args.recover == "full" else "lora",
                            lr=args.recover_lr, teacher=(teacher, teacher.blocks) if teacher else None,
                            keep=keep, features=args.kd_features,
                            seed=args.seed, progress=progress)
        recovery = res.to_dict()
        del teacher
    model.eval()
    speed = None if dense_copy is None else dit.forward_speedup(dense_copy, model)
    del dense_copy
    if want_fid:
        evaluation["pruned"] = dit.evaluate_dit(model, **DIT_EVAL, progress=progress)
    meta = {
        "model": str(args.model), "kind": "dit", "method": args.method, "domain": "depth", "dense_layers": dense_layers,
        "kept_layers": kept, "removed_layers": [i for i in range(dense_layers) if i not in kept],
        "calibration": {"data": "fashion-mnist train", "images": len(pick), "seed": args.seed,
                        "batch_size": args.batch_size},
        "method_info": info, "recovery": recovery, "speed": speed, "versions": _versions(),
        "evaluation": None if evaluation is None else {
            "settings": DIT_EVAL | {"metric": "Frechet distance on the project's Fashion-MNIST classifier features "
                                             "(not Inception-FID)"},
            **{k: {m: v[m] for m in ("fid", "class_accuracy", "n", "steps")} for k, v in evaluation.items()}},
        "seconds": seconds, "torch_threads": torch.get_num_threads(), "device": str(args.device),
        "wall_seconds": time.perf_counter() - wall,
    }
    lines = [f"# {args.method}: DiT {dense_layers} -> {len(kept)} blocks", "", f"kept blocks: {kept}",
             f"recovery: {recovery or 'none'}", ""]
    if speed is not None:
        lines += [f"measured speedup of one denoiser forward (16 images, 1 thread): {speed['speedup']:.2f}x "
                  f"({speed['dense_forward_s'] * 1e3:.1f} -> {speed['pruned_forward_s'] * 1e3:.1f} ms)", ""]
    if evaluation is not None:
        lines += ["| model | FID (classifier features, not Inception-FID) | class accuracy |", "| --- | ---: | ---: |"]
        lines += [f"| {k} | {v['fid']:.2f} | {v['class_accuracy']:.3f} |" for k, v in evaluation.items()]
    report_md = "\n".join(lines) + "\n"

    def extra(folder):
        from prunekit import jsonl

        (folder / "prunekit.json").write_text(jsonl.dumps(meta, indent=2) + "\n")
        (folder / "report.md").write_text(report_md + "\n![blocks kept](blocks.png)\n")
        _plot_blocks(folder, args.method, dense_layers, kept, info)

    out = dit.save_dit(model, args.out, info={"pruned_from": str(args.model), "kept_layers": kept},
                       overwrite=args.overwrite, extra=extra)
    print(f"pruned DiT {args.model} with {args.method}: {dense_layers} -> {len(kept)} blocks, kept {kept}"
          + (f", recovered ({args.recover}, {args.recover_steps} steps)" if recovery else ""))
    print(report_md.split("\n", 2)[2].strip())
    print(f"saved to {out} (report: {out / 'report.md'})")
    return 0
