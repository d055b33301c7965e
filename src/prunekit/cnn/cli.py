"""``prunekit cnn ...``: train the Fashion-MNIST testbed, compress it with UDFC or train it with TRP, evaluate.

    prunekit cnn train --out runs/base                       # plain training (the testbed recipe)
    prunekit cnn trp --out runs/trp --energy 0.9 --nuclear 3e-4 --period 20 --scheme channel [--split faster]
    prunekit cnn udfc testbed --ratio 0.3 --bits 6 --out runs/udfc30w6   # data-free, seconds
    prunekit cnn eval runs/udfc30w6 --device cuda          # every command takes --device (default cpu)

A model is a folder (``model.safetensors`` + ``config.json``) or ``testbed`` (the cached seed-0 testbed, trained
on first use, on the CPU whatever --device says, so that every run compares against the same model). Outputs
are written to a temporary folder and renamed; an existing ``--out`` is refused unless ``--overwrite``. Bad input
exits with code 2 before anything is written.
"""

from __future__ import annotations

import argparse
import sys
import time

from prunekit import jsonl

__all__ = ["add_parser", "run", "COMMANDS"]


def add_parser(sub) -> None:
    from prunekit.weights.io import add_device_argument

    def device(p):
        add_device_argument(p, where="the CNN is trained, compressed, evaluated and timed")

    cnn = sub.add_parser("cnn", help="compress CNNs: UDFC (data-free pruning + quantization), TRP (trained rank pruning)")
    csub = cnn.add_subparsers(dest="cnn_command", required=True)

    def training(p):
        p.add_argument("--out", required=True, help="output folder (refused if it exists, unless --overwrite)")
        p.add_argument("--epochs", type=int, default=None, help="epochs over Fashion-MNIST (default: the testbed's 3)")
        p.add_argument("--seed", type=int, default=0, help="seed of the initialisation and batch order")
        p.add_argument("--examples", type=int, default=None, help="train on the first N training images only (quick runs)")
        p.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
        p.add_argument("--quiet", action="store_true", help="no progress bars")
        device(p)

    tr = csub.add_parser("train", help="train the ResNet-20-style testbed on Fashion-MNIST")
    training(tr)

    tp = csub.add_parser("trp", help="train with Trained Rank Pruning, then split each conv into two thin convs")
    training(tp)
    tp.add_argument("--period", type=int, default=20, help="substitute the truncated SVD every m steps (default 20)")
    tp.add_argument("--energy", type=float, default=0.9, help="singular-value energy kept, in (0, 1] (default 0.9)")
    tp.add_argument("--nuclear", type=float, default=3e-4, help="nuclear-norm weight lambda (default 3e-4; 0 = off)")
    tp.add_argument("--scheme", choices=("channel", "spatial"), default="channel",
                    help="channel: kxk conv to r channels then 1x1; spatial: kx1 then 1xk (default channel)")
    tp.add_argument("--split", choices=("fewer-flops", "faster"), default="fewer-flops",
                    help="which layers end as two thin convs: every one whose split costs fewer FLOPs (default), or "
                         "only those whose split runs faster on this machine, timed on a batch of 256 test images "
                         "(the others stay one conv holding the same low-rank weight)")

    ud = csub.add_parser("udfc", help="data-free channel pruning + weight quantization with closed-form compensation")
    ud.add_argument("model", help="model folder, or `testbed`")
    ud.add_argument("--ratio", type=float, default=0.3,
                    help="fraction of each block's conv1 channels removed, in [0, 1), rounded down per block (0.3 of "
                    "16 channels removes 4)")
    ud.add_argument("--bits", type=int, default=None, help="weight bits, 2..16 (default: no quantization)")
    ud.add_argument("--method", choices=("udfc", "merge", "none"), default="udfc",
                    help="udfc: closed-form compensation; merge: Neuron Merging; none: no compensation")
    ud.add_argument("--criterion", choices=("l2", "l1"), default="l2", help="filter norm that ranks channels")
    ud.add_argument("--quantize", choices=("all", "pairs"), default="all",
                    help="all: every Conv2d/Linear; pairs: only the pruned blocks' two convs")
    ud.add_argument("--out", required=True, help="output folder")
    ud.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    ud.add_argument("--eval", action="store_true", help="also measure Fashion-MNIST test accuracy before and after")
    device(ud)

    ev = csub.add_parser("eval", help="test accuracy, parameters, FLOPs and time per batch of a CNN folder")
    ev.add_argument("model", help="model folder, or `testbed`")
    ev.add_argument("--json", action="store_true", help="print one JSON object")
    device(ev)


def _device(args):
    """``--device`` as a torch.device, checked before anything loads or is written."""
    from prunekit.weights.io import parse_device

    return parse_device(args.device, what="--device")


def _model(name: str, device=None):
    """The model of `name` on `device` (the testbed is trained on the CPU, then moved)."""
    from prunekit.cnn import resnet

    if name == "testbed":
        folder = resnet.testbed_folder(seed=0)
        if not (folder / "config.json").is_file():  # a user had a silent 1,407-step training bar to wonder at
            print(f"prunekit: note: training the testbed once (seed 0, {resnet.TESTBED['epochs']} epochs on "
                  f"Fashion-MNIST, a few minutes on a CPU); cached in {folder}", file=sys.stderr)
        model = resnet.testbed(seed=0)
    else:
        model = resnet.load_model(name)
    return model if device is None else model.to(device)


def _check_training(args) -> None:
    from prunekit.errors import InputError

    if args.epochs is not None and args.epochs < 1:
        raise InputError(f"--epochs must be >= 1, got {args.epochs}")
    if args.examples is not None and args.examples < 1:
        raise InputError(f"--examples must be >= 1, got {args.examples}")
    if args.seed < 0:
        raise InputError(f"--seed must be an integer >= 0, got {args.seed}")


def _check_fashion_input(model, name: str, hint: str = "") -> None:
    """Refuse a model that cannot take Fashion-MNIST's one-channel images, before any evaluation."""
    from prunekit.errors import InputError

    channels = model.config["in_channels"]
    if channels != 1:
        raise InputError(f"{name} takes {channels}-channel images but evaluation uses Fashion-MNIST (1 channel); "
                         f"give a 1-channel model{hint}")
    classes = model.config.get("num_classes", 10)
    if classes != 10:  # a 5-class head scored 0.1000 on the 10 classes, exit 0
        raise InputError(f"{name} has {classes} output classes but evaluation uses Fashion-MNIST's 10; give a "
                         f"10-class model{hint}")


def _summary(model, xte, yte) -> dict:
    from prunekit import train as tr
    from prunekit.cnn.flops import count_flops, count_params, ms_per_batch

    return {"accuracy": tr.accuracy(model, xte, yte), "params": count_params(model),
            "flops": count_flops(model, tuple(xte.shape[1:])),
            "ms_per_batch_256": ms_per_batch(model, xte[:256], repeats=5, warmup=1)}


def _train(args, trp_options: dict | None) -> int:
    from prunekit import train as tr
    from prunekit.cnn import resnet
    from prunekit.cnn.trp import TRP

    device = _device(args)
    _check_training(args)
    out = resnet.check_output_dir(args.out, overwrite=args.overwrite)
    epochs = args.epochs or resnet.TESTBED["epochs"]
    model = tr.seeded_model(lambda: resnet.ResNet(widths=resnet.TESTBED["widths"], blocks=resnet.TESTBED["blocks"]), args.seed)
    model.to(device)  # the same initial weights on every device
    trp = TRP(model, **trp_options) if trp_options is not None else None  # validates the options first
    xtr, ytr, xte, yte = resnet.fashion_tensors()
    if args.examples is not None:
        if args.examples > len(xtr):  # it trained on all 60,000 and recorded the number asked for
            print(f"prunekit: note: --examples {args.examples} is more than the {len(xtr)} training images; "
                  f"training on all {len(xtr)}", file=sys.stderr)
        xtr, ytr = xtr[: args.examples], ytr[: args.examples]
    t0 = time.perf_counter()
    resnet.fit(model, xtr, ytr, epochs=epochs, seed=args.seed, callbacks=[trp] if trp else (), progress=not args.quiet)
    seconds = time.perf_counter() - t0
    meta = {"trained": f"fashion-mnist, {len(xtr)} training images", "epochs": epochs, "seed": args.seed,
            "train_seconds": seconds, "device": str(device)}
    if trp is not None and trp.substitutions == 1 and args.period > 1:  # any larger --period: the same model
        print(f"prunekit: note: TRP substituted the truncated SVD once, at the first step: the run is no longer "
              f"than --period {args.period} steps; lower --period or train longer", file=sys.stderr)
    if trp is not None:
        meta["trp"] = dict(trp_options, accuracy_before_decomposition=tr.accuracy(model, xte, yte))
        meta["trp"]["ranks"] = trp.decompose()
        if args.split == "faster":
            from prunekit.cnn.trp import split_where_faster

            timing = split_where_faster(model, xte[:256])
            meta["trp"]["split"] = "faster"
            meta["trp"]["kept_whole"] = sorted(n for n, i in timing.items() if not i["split"])
    from prunekit.weights.io import non_finite

    bad = non_finite(model, buffers=True)
    if bad:  # was saved (exit 0) as a model that `cnn eval` then refused
        from prunekit.errors import InputError

        raise InputError(f"training diverged: {bad[0]}" + (f" and {len(bad) - 1} other tensors" if len(bad) > 1 else "")
                         + " became NaN or Inf" + ("; lower --nuclear" if trp else "") + "; nothing was saved")
    meta.update(_summary(model, xte, yte))
    resnet.save_model(model, out, metadata=meta, overwrite=args.overwrite)
    decomposed = len(getattr(model, "lowrank", {}) or {})  # what is split now (--split faster kept some whole)
    split = meta.get("trp", {})  # --split faster timed only what decompose split: with nothing split, nothing ran
    why = ("none ran faster as two thin convs" if split.get("split") == "faster" and split.get("ranks") else
           "at this --energy none saves FLOPs")
    what = (f"TRP-trained and decomposed ({decomposed} layers split)" if decomposed else
            f"TRP-trained (no layer split: {why})") if trp else "trained"
    print(f"{what} in {seconds:.0f} s: test accuracy {meta['accuracy']:.4f}, {meta['params']} parameters, "
          f"{meta['flops']} FLOPs (MACs) per image; saved to {out}")
    return 0


def _cmd_train(args) -> int:
    return _train(args, None)


def _cmd_trp(args) -> int:
    return _train(args, {"period": args.period, "energy": args.energy, "nuclear": args.nuclear, "scheme": args.scheme})


def _cmd_udfc(args) -> int:
    from prunekit.cnn import resnet
    from prunekit.cnn.udfc import _check_bits, compress
    from prunekit.select import check_ratio

    from prunekit.errors import check_not_input
    from prunekit.weights.io import check_replaceable

    device = _device(args)
    check_ratio(args.ratio)
    _check_bits(args.bits)
    if args.bits is None and args.quantize != "all":  # nothing is quantized
        print("prunekit: note: --quantize is used with --bits only; ignored (no quantization)", file=sys.stderr)
    # no channel is removed: nothing is ranked, and without --bits nothing is compensated (with --bits, udfc still
    # corrects the quantization error)
    unused = [f for f, dest, default in (("--method", "method", "udfc"), ("--criterion", "criterion", "l2"))
              if getattr(args, dest) != default and (dest == "criterion" or args.bits is None)]
    if args.ratio == 0 and unused:
        print(f"prunekit: note: --ratio 0 removes no channel, so {' and '.join(unused)} "
              f"{'changes' if len(unused) == 1 else 'change'} nothing; ignored", file=sys.stderr)
    out = resnet.check_output_dir(args.out, overwrite=args.overwrite)
    check_not_input(out, resnet.testbed_folder() if args.model == "testbed" else args.model)  # the cache, too
    check_replaceable(out)  # before the work: --overwrite replaces earlier outputs only
    model = _model(args.model, device)
    if args.eval:
        _check_fashion_input(model, args.model, " or drop --eval")
    t0 = time.perf_counter()
    result = compress(model, ratio=args.ratio, bits=args.bits, method=args.method, criterion=args.criterion,
                      quantize=args.quantize)
    seconds = time.perf_counter() - t0
    meta = {"source": str(args.model), **result.to_dict(), "criterion": args.criterion,
            "quantize": args.quantize if args.bits is not None else None,
            "seconds": seconds, "device": str(device)}
    line = ""
    if args.eval:
        _, _, xte, yte = resnet.fashion_tensors()
        before, after = _summary(model, xte, yte), _summary(result.model, xte, yte)
        meta["evaluation"] = {"before": before, "after": after}
        line = (f"; test accuracy {before['accuracy']:.4f} -> {after['accuracy']:.4f}, FLOPs {before['flops']} -> "
                f"{after['flops']}")
    resnet.save_model(result.model, out, metadata=meta, overwrite=args.overwrite)
    kept = sum(b["kept"] for b in result.blocks)
    total = sum(b["channels"] for b in result.blocks)
    print(f"{args.method}: kept {kept}/{total} conv1 channels in {len(result.blocks)} blocks, "
          f"{'fp32' if args.bits is None else f'{args.bits}-bit'} weights, {seconds:.2f} s{line}; saved to {out}")
    return 0


def _cmd_eval(args) -> int:
    from prunekit.cnn import resnet

    device = _device(args)
    model = _model(args.model, device)
    _check_fashion_input(model, args.model)
    _, _, xte, yte = resnet.fashion_tensors()
    s = dict(_summary(model, xte, yte), device=str(device))
    if args.json:
        print(jsonl.dumps(s))
    else:
        print(f"{args.model}: test accuracy {s['accuracy']:.4f}, {s['params']} parameters, {s['flops']} FLOPs (MACs) "
              f"per image, {s['ms_per_batch_256']:.1f} ms per batch of 256 on {device}")
    return 0


COMMANDS = {"train": _cmd_train, "trp": _cmd_trp, "udfc": _cmd_udfc, "eval": _cmd_eval}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.cnn_command](args)
