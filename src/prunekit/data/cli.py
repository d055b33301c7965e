"""``prunekit data ...``: label issues, selection and scoring of a dataset, over `prunekit.data`.

Inputs are .npy (memory-mapped), .csv or .parquet; outputs name example indices and scores, are written
atomically, and an existing output is refused unless ``--overwrite``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np

from prunekit import jsonl

__all__ = ["add_parser", "COMMANDS"]


SCORES = ("el2n", "grand", "grand_last_layer", "forgetting", "prototypes", "probs")


def add_parser(sub) -> None:
    data = sub.add_parser("data", help="prune what a model learns from: label issues, example scores, selection")
    dsub = data.add_subparsers(dest="data_command", required=True)

    from prunekit.data.methods.confident import FILTERS, RANKINGS
    from prunekit.weights.io import add_device_argument

    li = dsub.add_parser("label-issues", help="find mislabeled examples with Confident Learning (cleanlab's answers)")
    li.add_argument("--labels", default=None,
                    help="given labels, one per example (.npy/.csv/.parquet): integer classes 0..K-1, or class names "
                    "matched to --probs' column names (a CSV header, parquet columns); or fashion-mnist: the zoo "
                    "copy's 60,000 training labels (data score --data fashion-mnist's)")
    li.add_argument("--probs", required=True, help="out-of-sample predicted probabilities [N, K] (.npy/.csv/.parquet)")
    li.add_argument("--label-column", default=None, metavar="NAME",
                    help="instead of --labels: the labels are column NAME of the --probs table (.csv with a header, "
                    ".parquet), class indices or the names of its other columns, which hold the probabilities "
                    "(numbers are indices unless they can only be column names)")
    li.add_argument("--filter", default="prune_by_noise_rate", choices=FILTERS, help="which rule flags an issue")
    li.add_argument("--rank-by", default="self_confidence", choices=RANKINGS,
                    help="label-quality score that orders the issues, worst first (default self_confidence)")
    li.add_argument("--frac-noise", type=float, default=None,
                    help="flag only this fraction of the estimated issues (default 1; prune_by_* filters and "
                    "both only)")
    li.add_argument("--min-examples-per-class", type=int, default=None,
                    help="leave at least this many examples of each class unflagged (default 1; prune_by_* filters "
                    "and both only)")
    li.add_argument("--allow-missing-classes", action="store_true", help="accept classes that no example has")
    li.add_argument("--out", required=True,
                    help="table of issues: index,label,predicted and the --rank-by score "
                    "(.csv/.parquet; .npy: indices)")
    li.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    li.add_argument("--json", action="store_true", help="print a JSON summary (counts, noise matrix, prior) on stdout")

    se = dsub.add_parser("select", help="keep a fraction of a dataset by a difficulty score")
    se.add_argument("--scores", required=True,
                    help="one difficulty score per example, higher = harder (.npy/.csv/.parquet; or the index,<score> "
                    "table that `data score` writes)")
    se.add_argument("--keep", type=float, required=True, help="fraction of examples kept, in (0, 1]")
    se.add_argument("--strategy", choices=("hard", "easy", "ccs", "random"), default="hard",
                    help="hard: keep the highest scores; easy: the lowest; ccs: coverage-centric stratified; random")
    se.add_argument("--labels", default=None,
                    help="class labels, for --balanced: indices or class names (a file), or fashion-mnist")
    se.add_argument("--score-column", default=None, metavar="NAME",
                    help="the scores are column NAME of the --scores table (.csv with a header, .parquet)")
    se.add_argument("--label-column", default=None, metavar="NAME",
                    help="instead of --labels: the labels are column NAME of the --scores table")
    se.add_argument("--balanced", action="store_true", help="keep the same fraction of every class")
    se.add_argument("--seed", type=int, default=0, help="seed of --strategy random and ccs draws")
    se.add_argument("--out", required=True, help="kept example indices (.npy), or index,score table (.csv/.parquet)")
    se.add_argument("--overwrite", action="store_true", help="replace an existing --out file")

    sc = dsub.add_parser("score", help="score every example with short training runs of a builtin model")
    sc.add_argument("--data", required=True,
                    help="fashion-mnist (the offline zoo copy, train split), or inputs: images [N, 28, 28] / [N, C, 28, 28] "
                    "(small CNN) or features [N, D] (MLP) in .npy/.csv/.parquet")
    sc.add_argument("--labels", default=None, help="integer labels [N] (not with --data fashion-mnist)")
    sc.add_argument("--method", required=True, choices=SCORES,
                    help="el2n, grand (exact, all parameters), grand_last_layer, forgetting, prototypes (k-means on the "
                    "trained model's penultimate features, or on --embeddings), or probs (out-of-fold probabilities [N, K] "
                    "for `data label-issues`)")
    sc.add_argument("--model", choices=("auto", "cnn", "mlp"), default="auto", help="auto: cnn for 28x28 images, else mlp")
    sc.add_argument("--runs", type=int, default=None, help="independent training runs averaged (default 3)")
    sc.add_argument("--epochs", type=int, default=None, help="epochs per run (default 10)")
    sc.add_argument("--score-epoch", type=int, default=None,
                    help="epoch after which EL2N / GraNd are taken (default: a tenth of --epochs, at least 1)")
    sc.add_argument("--folds", type=int, default=None, help="folds for --method probs (default 5)")
    sc.add_argument("--clusters", type=int, default=None, help="k-means clusters for --method prototypes (default 10)")
    sc.add_argument("--embeddings", default=None, help="embeddings [N, D] for --method prototypes (no training then)")
    sc.add_argument("--batch-size", type=int, default=None, help="training batch size (default 128)")
    sc.add_argument("--lr", type=float, default=None, help="SGD learning rate (default 0.05)")
    sc.add_argument("--seed", type=int, default=0, help="seed of the training runs, folds and k-means")
    sc.add_argument("--out", required=True, help="scores [N] (.npy), or index,score table (.csv/.parquet); probs: [N, K]")
    sc.add_argument("--overwrite", action="store_true", help="replace an existing --out file")
    sc.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(sc, where="the builtin model trains and scores")

    tr = dsub.add_parser("train", help="train the builtin CNN / MLP on kept examples (select's --out) and report "
                         "held-out accuracy: the end of a data diet")
    tr.add_argument("--data", required=True, help="fashion-mnist (the zoo copy's train split; its test split is the "
                    "held-out set) or inputs as for `data score`")
    tr.add_argument("--labels", default=None, help="integer labels [N] (not with --data fashion-mnist)")
    tr.add_argument("--keep", default=None, help="the examples to train on: kept indices (.npy, as `data select` "
                    "writes), a table with an index column (.csv/.parquet), or a boolean mask [N] (.npy); default all")
    tr.add_argument("--test-data", default=None, help="held-out inputs shaped as --data (fashion-mnist: its test "
                    "split unless given)")
    tr.add_argument("--test-labels", default=None, help="held-out integer labels")
    tr.add_argument("--model", choices=("auto", "cnn", "mlp"), default="auto",
                    help="auto: cnn for 28x28 images, else mlp")
    tr.add_argument("--epochs", type=int, default=10,
                    help="passes over all N examples that set the budget (default 10)")
    tr.add_argument("--budget", choices=("same-steps", "same-epochs"), default="same-steps",
                    help="same-steps: as many optimizer steps as --epochs over all N examples (the data-diet papers' "
                    "comparison, the default); same-epochs: --epochs passes over the kept examples (fewer steps)")
    tr.add_argument("--batch-size", type=int, default=128, help="training batch size (default 128)")
    tr.add_argument("--lr", type=float, default=0.05, help="SGD learning rate (default 0.05)")
    tr.add_argument("--seed", type=int, default=0, help="seed of the initial weights and the batch order")
    tr.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    tr.add_argument("--quiet", action="store_true", help="no progress bars")
    add_device_argument(tr, where="the builtin model trains and scores")

    qt = dsub.add_parser("qtune", help="Q-Tuning: keep the SFT samples and response tokens worth training on "
                         "(Error-Uncertainty plane), and optionally fine-tune on them")
    qt.add_argument("model", help="local Hugging Face causal LM folder or zoo name (smollm2-135m)")
    qt.add_argument("--data", required=True, help='JSONL, one {"instruction": ..., "response": ...} per line (Alpaca '
                    'instruction/input/output, Dolly instruction/context/response, prompt/completion and '
                    'single-turn chat messages also read)')
    qt.add_argument("--samples", type=float, default=0.2, help="fraction of samples kept, in (0, 1] (default 0.2)")
    qt.add_argument("--tokens", type=float, default=0.75,
                    help="fraction of the kept samples' response tokens kept in the loss, in (0, 1] (default 0.75)")
    qt.add_argument("--lam", type=float, default=0.5, help="neighbours' weight in the token score (default 0.5)")
    qt.add_argument("--max-length", type=int, default=512, help="tokens per pair, prompt cut from the left (default 512)")
    qt.add_argument("--batch-size", type=int, default=8, help="pairs per forward pass when scoring, and the training "
                    "batch with --train")
    qt.add_argument("--train", action="store_true", help="fine-tune on the selection and save the model in OUT/model")
    qt.add_argument("--mode", choices=("static", "epoch", "batch"), default=None,
                    help="with --train: static (the written selection; the default), epoch (re-scored each epoch) or "
                    "batch (re-scored per loaded batch, the paper's dynamic mode)")
    qt.add_argument("--epochs", type=int, default=None, help="with --train: epochs (default 1)")
    qt.add_argument("--lr", type=float, default=None, help="with --train: AdamW learning rate (default 2e-4)")
    qt.add_argument("--lora-rank", type=int, default=None,
                    help="with --train: LoRA rank, merged into the saved model (default 8); 0 = full fine-tuning")
    qt.add_argument("--seed", type=int, default=0, help="with --train: seed of the fine-tuning")
    qt.add_argument("--dtype", choices=("auto", "float32", "float16", "bfloat16"), default=None,
                    help="with --train: dtype of the saved model (default auto: the input's; training runs in "
                    "float32, and a half-precision save can round away much of a small update, said on stderr)")
    qt.add_argument("--out", required=True, help="output folder: kept.jsonl, scores.csv, summary.json, eu_plane.png")
    qt.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    add_device_argument(qt)
    qt.add_argument("--quiet", action="store_true", help="no progress bars")


def _cmd_label_issues(args) -> int:
    from prunekit.data.io import (check_output_file, numbered_header, read_array, read_class_labels,
                                  read_labeled_table, read_matrix, resolve_numeric_labels, write_table)
    from prunekit.data.methods import confident as cl
    from prunekit.errors import InputError, check_not_input

    check_output_file(args.out, overwrite=args.overwrite)
    if (args.labels is None) == (args.label_column is None):
        raise InputError("give the labels as a file (--labels) or as a column of the --probs table (--label-column "
                         "NAME), one of the two")
    check_not_input(args.out, args.labels, args.probs)
    for name, default in (("frac_noise", 1.0), ("min_examples_per_class", 1)):
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif args.filter not in ("prune_by_noise_rate", "prune_by_class", "both"):  # as cleanlab: say so, do not stop
            print(f"prunekit: note: {flag} is used by the prune_by_noise_rate, prune_by_class and both filters only; "
                  f"ignored for {args.filter}", file=sys.stderr)
    if args.label_column is not None:
        probs, classes, labels, named = read_labeled_table(args.probs, args.label_column)
    else:
        def read_labels(classes):
            raw = None
            if classes and args.labels != "fashion-mnist":  # numbers beside named columns: positions, or names
                try:
                    raw = np.asarray(read_array(args.labels, what="labels", columns=1))
                except InputError:  # words: matched to the names below
                    raw = None
                raw = raw.astype(np.float64) if raw is not None and raw.dtype.kind in "iuf" else None  # bool,
                # complex, strings: the readers below (which refuse the first two)
            if raw is not None:
                return resolve_numeric_labels(raw, classes, f"labels file {args.labels}")
            return read_class_labels(args.labels, classes=classes, match_names=True)  # names -> columns

        probs, classes = read_matrix(args.probs, what="probabilities", names=True)
        header = numbered_header(args.probs, probs) if classes is None else None
        if header is not None:  # a header of numbered class names (2019,2020), read as a row of numbers
            try:
                labels, named = read_labels(header)
            except InputError as refused:  # a bad label under the header's names, or no header: as many as rows?
                try:
                    fits = len(read_labels(None)[0]) == len(probs) - 1
                except InputError:
                    fits = False
                if fits:
                    raise refused from None  # the header reading, with the label it cannot place
                header = None
            if header is not None and len(labels) == len(probs) - 1:
                probs, classes = probs[1:], header
                print(f"prunekit: note: the first row of {args.probs} ({','.join(header[:8])}"
                      f"{',...' if len(header) > 8 else ''}) is read as its header: the class names", file=sys.stderr)
            else:
                header = None
        if header is None:
            labels, named = read_labels(classes)
    start = time.perf_counter()
    try:
        ranked = cl.find_label_issues(labels, probs, filter_by=args.filter, frac_noise=args.frac_noise,
                                      min_examples_per_class=args.min_examples_per_class,
                                      allow_missing_classes=args.allow_missing_classes,
                                      return_indices_ranked_by=args.rank_by)
    except InputError as e:  # every column but the label one was read as a class: name them
        if args.label_column is None or not ("must sum to 1" in str(e) or "must lie in [0, 1]" in str(e)):
            raise
        raise InputError(f"{e}; with --label-column every other column of {args.probs} is read as a class "
                         f"probability ({', '.join(classes[:12])}{', ...' if len(classes) > 12 else ''}): keep only "
                         "the label and the class columns") from None
    seconds = time.perf_counter() - start
    flagged = np.asarray(probs[ranked])  # [issues, K]
    quality = cl.label_quality_scores(labels[ranked], flagged, method=args.rank_by) if len(ranked) else np.empty(0)
    predicted = flagged.argmax(axis=1) if len(ranked) else np.empty(0, dtype=np.int64)
    table = {"index": ranked.astype(np.int64), "label": labels[ranked], "predicted": predicted}
    if named and not str(args.out).lower().endswith(".npy"):
        table.update(label_name=np.array([classes[i] for i in labels[ranked]], dtype=object),
                     predicted_name=np.array([classes[i] for i in predicted], dtype=object))
    table[args.rank_by] = quality
    write_table(args.out, table, overwrite=args.overwrite)
    n = len(labels)
    if args.json:
        est = cl.estimate_noise(labels, probs, allow_missing_classes=args.allow_missing_classes)
        print(jsonl.dumps({"examples": n, "classes": probs.shape[1], "issues": int(len(ranked)),
                           "filter_by": args.filter, "rank_by": args.rank_by, "seconds": seconds, "out": str(args.out),
                           "prior": est.prior.tolist(), "noise_matrix": est.noise_matrix.tolist(),
                           "noise_matrix_axes": "noise_matrix[given][true] = P(given label | true label); "
                                                "prior[true] = P(true label)"}))
    else:
        print(f"{len(ranked)} label issues among {n} examples ({100 * len(ranked) / n:.2f}%), filter {args.filter}, "
              f"{seconds:.2f} s; ranked by {args.rank_by}, worst first, in {args.out}")
    return 0


def _cmd_select(args) -> int:
    from prunekit.data.io import (_is_float, check_output_file, index_order, label_groups, read_label_groups,
                                  read_table_columns, read_vector, write_table)
    from prunekit.errors import InputError, check_not_input, check_seed
    from prunekit.select import select_examples

    check_output_file(args.out, overwrite=args.overwrite)
    check_not_input(args.out, args.scores, args.labels)
    check_seed(args.seed, "--seed")
    if args.labels is not None and args.label_column is not None:
        raise InputError("give the labels as a file (--labels) or as a column of the --scores table (--label-column), "
                         "not both")
    if args.label_column is not None and args.score_column is None:
        raise InputError("--label-column reads the labels from the --scores table: name its score column too "
                         "(--score-column)")
    if args.label_column is not None and args.label_column == args.score_column:
        raise InputError(f"--score-column and --label-column both name {args.label_column!r}; give the label column")
    labels = None
    if args.score_column is None:
        scores = np.asarray(read_vector(args.scores, what="scores"), dtype=np.float64)
    else:  # one read of the table: scores, labels, and the index that orders its rows
        wanted = [args.score_column, *([args.label_column] if args.label_column else []), "index"]
        table = read_table_columns(args.scores, wanted, what="scores", optional=("index",))
        cells = table[args.score_column]
        where = f"scores file {args.scores} column {args.score_column!r}"
        bad = [i for i, c in enumerate(cells) if not _is_float(c)]
        if bad:
            raise InputError(f"{where} row {bad[0]}: {cells[bad[0]]!r} is not a number")
        scores = np.array([float(c) for c in cells])
        gaps = np.isnan(scores) | np.isneginf(scores)  # +inf is a legal score (never learned), as in --scores files
        if gaps.any():
            raise InputError(f"{where} row {int(np.argmax(gaps))}: NaN or -inf; fill or drop it")
        # a sorted or filtered table: its rows back in example order
        order = index_order(table["index"], args.scores, "scores") if "index" in table else np.arange(len(scores))
        scores = scores[order]
        if args.label_column is not None:
            labels = label_groups(table[args.label_column], f"scores file {args.scores} column {args.label_column!r}")
            labels = labels[order]
    if args.label_column is not None:
        if not args.balanced:
            print("prunekit: note: --label-column is used with --balanced only; ignored", file=sys.stderr)
    elif args.labels is not None:
        labels, header = read_label_groups(args.labels, len(scores))  # class names too: balancing needs the groups
        if header is not None:  # one row more than the scores: its first row was taken as a header
            print(f"prunekit: note: {args.labels} has one row more than {args.scores}; its first row ({header!r}) is "
                  "read as a header, not a label", file=sys.stderr)
        if len(labels) != len(scores):
            raise InputError(f"labels has {len(labels)} entries but scores has {len(scores)}; they must describe the same examples")
        if not args.balanced:  # read and checked, then unused: it looked as if the selection used them
            print("prunekit: note: --labels is used with --balanced only; ignored", file=sys.stderr)
    elif args.balanced:
        raise InputError("--balanced needs --labels (or --label-column)")
    if args.seed != 0 and args.strategy in ("hard", "easy"):  # they take no random draw
        print(f"prunekit: note: --seed is used with --strategy random or ccs only; ignored by {args.strategy}",
              file=sys.stderr)
    keep = select_examples(scores, args.keep, strategy=args.strategy, labels=labels if args.balanced else None,
                           balanced=args.balanced, seed=args.seed)
    kept = np.flatnonzero(keep)
    write_table(args.out, {"index": kept.astype(np.int64), "score": scores[kept]}, overwrite=args.overwrite)
    print(f"kept {len(kept)} of {len(scores)} examples ({args.strategy}{', class-balanced' if args.balanced else ''}); "
          f"indices in {args.out}")
    return 0


def _inputs(args):
    """``(x float32 tensor, y int64 tensor, model_fn)`` for `data score`."""
    import torch

    from prunekit import train
    from prunekit.data.io import check_real, read_labels, read_named
    from prunekit.errors import InputError

    if args.data == "fashion-mnist":
        if args.labels is not None:
            raise InputError("--data fashion-mnist brings its own labels; drop --labels")
        from prunekit import zoo

        x, y, _, _ = zoo.fashion_mnist()
    else:
        if args.labels is None:
            raise InputError("--labels is required with a data file")
        x, columns = read_named(args.data, what="data")
        x = np.asarray(x)
        ids = [c for c in (columns or []) if c.strip().lower() in ("id", "index", "idx", "example", "example_id")]
        if ids:  # an id column was trained on as a feature
            raise InputError(f"data file {args.data} has a column {ids[0]!r}, which looks like an example id, not a "
                             "feature; drop it (the output names examples by their row)")
        y = read_labels(args.labels)
        data_flag, labels_flag = getattr(args, "flags", ("--data", "--labels"))  # train's held-out set: --test-*
        if len(x) != len(y):
            raise InputError(f"{data_flag} {args.data} has {len(x)} examples but {labels_flag} {args.labels} has "
                             f"{len(y)}; they must describe the same examples")
        if not np.issubdtype(x.dtype, np.number):
            raise InputError(f"{data_flag} {args.data} must be numeric, got {x.dtype}")
        check_real(x, args.data, "data")
        if 0 in x.shape[1:]:
            raise InputError(f"data file {args.data} has shape {x.shape}: no values per example; give features "
                             "[N, D] with D >= 1 or images [N, 28, 28]")
    if y.min() < 0:
        raise InputError(f"labels must be class indices >= 0; found {int(y.min())}")
    k = int(y.max()) + 1  # the model gets one output per class 0..max(label)
    if k > max(len(y), 1000):  # more classes than examples, and an output layer that would be absurdly wide
        raise InputError(f"labels imply {k} classes (the largest label is {k - 1}) but there are only {len(y)} "
                         "examples; remap the labels to 0..K-1 (numpy.unique(labels, return_inverse=True))")
    empty = np.setdiff1d(np.arange(k), y)
    if empty.size and getattr(args, "method", None) == "probs":  # label-issues then refused those classes' columns
        print(f"prunekit: note: no example has class(es) {', '.join(map(str, empty[:5]))}"
              f"{', ...' if empty.size > 5 else ''} of 0..{k - 1}; their columns will be near 0, and label-issues "
              "needs --allow-missing-classes (or remap the labels to 0..K-1 first)", file=sys.stderr)
    scale = 255.0 if x.dtype == np.uint8 else 1.0
    with np.errstate(all="ignore"):  # NaN, Inf and float32 overflow are refused below, by file and row
        x = torch.from_numpy(np.ascontiguousarray(x, dtype=np.float32) / scale)
    bad = ~torch.isfinite(x)
    if bad.any():
        rows = bad.reshape(x.shape[0], -1).any(1).nonzero()[:, 0]
        raise InputError(f"data file {args.data} has NaN or Inf (or values too large for float32) in {len(rows)} "
                         f"row(s), the first row {int(rows[0])}; clean it first")
    image = x.dim() in (3, 4) and tuple(x.shape[-2:]) == (28, 28)
    if args.model != "mlp" and x.dim() == 4 and tuple(x.shape[1:3]) == (28, 28) and not image:  # [N, 28, 28, C]
        raise InputError(f"data {tuple(x.shape)} looks like channels-last images; the builtin CNN takes [N, C, 28, "
                         "28]: transpose it (x.transpose(0, 3, 1, 2)), or pass --model mlp to flatten it")
    kind = args.model if args.model != "auto" else ("cnn" if image else "mlp")
    if kind == "cnn":
        if not image:
            raise InputError(f"the builtin CNN takes 28x28 images ([N, 28, 28] or [N, C, 28, 28]), got {tuple(x.shape)}; use --model mlp")
        if x.dim() == 3:
            x = x[:, None]  # [N, 1, 28, 28]
        channels = x.shape[1]

        def model_fn():
            return train.small_cnn(k, channels)
    else:
        features = int(np.prod(x.shape[1:])) if x.dim() > 1 else 1
        x = x.reshape(len(x), features)

        def model_fn():
            return train.mlp(features, k)
    return x, torch.from_numpy(y.astype(np.int64)), model_fn


SCORE_DEFAULTS = {"runs": 3, "epochs": 10, "score_epoch": None, "folds": 5, "clusters": 10, "batch_size": 128,
                  "lr": 0.05}


def _check_score_options(args) -> list[str]:
    """The numeric options of `data score`, checked before any data is read; returns notes on the options the
    method does not use, to print once the inputs are read too (an error stays one line)."""
    import math

    from prunekit.errors import InputError, check_seed, int_at_least

    training = ("epochs", "batch_size", "lr")
    used = {"probs": ("folds", *training), "prototypes": ("clusters",) if args.embeddings else ("clusters", *training),
            "forgetting": ("runs", *training)}.get(args.method, ("runs", "score_epoch", *training))
    notes = []
    for name, default in SCORE_DEFAULTS.items():
        flag = "--" + name.replace("_", "-")
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif name not in used:  # a script looping over methods with one flag set: say so, do not stop
            how = f"--method {args.method}" + (" with --embeddings (no training)" if args.embeddings else "")
            notes.append(f"prunekit: note: {flag} is not used by {how}; ignored")
    if args.embeddings and args.method == "prototypes" and args.model != "auto":  # no network is built
        notes.append("prunekit: note: --model is not used by --method prototypes with --embeddings (no training); "
                     "ignored")
        args.model = "auto"  # and not checked against the data's shape either
    int_at_least(args.epochs, "--epochs", 1)
    int_at_least(args.batch_size, "--batch-size", 1)
    check_seed(args.seed, "--seed")
    if args.method == "probs":
        int_at_least(args.folds, "--folds", 2)
    elif args.method == "prototypes":
        int_at_least(args.clusters, "--clusters", 1)
    else:
        int_at_least(args.runs, "--runs", 1)
    if args.score_epoch is not None and not 0 <= args.score_epoch <= args.epochs:
        raise InputError(f"--score-epoch must be in [0, --epochs={args.epochs}], got {args.score_epoch}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    return notes


def _saturated(logits: np.ndarray) -> bool:
    """Whether every example's top softmax probability is 1 to within 1e-6 in every run (`logits` [R, N, K]):
    what a run blown up by too high a learning rate gives, not a model that learned."""
    z = logits.astype(np.float64)
    z = z - z.max(-1, keepdims=True)
    top = 1.0 / np.exp(z).sum(-1)  # the largest probability, [R, N]
    return bool((top > 1 - 1e-6).all())


def _diverged(models, x=None) -> bool:
    """Whether training drove a weight (or batch-norm statistic) of `models` to NaN or Inf, or, given inputs
    `x`, any of their outputs on `x`."""
    import torch

    from prunekit.data.methods._checks import to_model

    if any(t.is_floating_point() and not torch.isfinite(t).all()
           for m in models for t in [*m.parameters(), *m.buffers()]):
        return True
    if x is None:
        return False
    with torch.no_grad():
        return any(not torch.isfinite(m.eval()(to_model(x[i: i + 1024], m))).all()
                   for m in models for i in range(0, len(x), 1024))


def _cmd_score(args) -> int:
    from prunekit import train
    from prunekit.data.io import check_output_file, read_matrix, write_table
    from prunekit.data.methods.prototypes import prototype_distance
    from prunekit.errors import InputError, check_not_input

    from prunekit.weights.io import parse_device

    device = parse_device(args.device, what="--device")
    check_output_file(args.out, overwrite=args.overwrite)
    check_not_input(args.out, None if args.data == "fashion-mnist" else args.data, args.labels, args.embeddings)
    if args.embeddings is not None and args.method != "prototypes":
        raise InputError("--embeddings is for --method prototypes")
    notes = _check_score_options(args)
    start = time.perf_counter()
    progress = not args.quiet
    x, y, base_fn = _inputs(args)
    if args.method == "probs" and args.folds > len(y):
        raise InputError(f"--folds {args.folds} needs at least {args.folds} examples, the data has {len(y)}; "
                         "lower --folds")
    if args.method == "prototypes" and args.clusters > len(y):
        raise InputError(f"--clusters {args.clusters} needs at least {args.clusters} examples, the data has {len(y)}; "
                         "lower --clusters")
    for note in notes:
        print(note, file=sys.stderr)
    built = []  # every model trained, to tell diverged training from bad data

    def model_fn():  # built on the CPU (the same initial weights on every device), then moved
        built.append(base_fn().to(device))
        return built[-1]

    def diverged() -> InputError:
        return InputError(f"training diverged at --lr {args.lr:g}: the model's weights or outputs became NaN or Inf; "
                          f"lower --lr, or scale the data to about unit size (its largest magnitude is "
                          f"{float(x.abs().max()):.3g})")

    common = dict(seed=args.seed, batch_size=args.batch_size, lr=args.lr, progress=progress)
    try:
        if args.method == "probs":
            probs = outputs = train.cross_val_probs(model_fn, x, y, folds=args.folds, epochs=args.epochs, **common)
        elif args.method == "prototypes":
            outputs = None
            if args.embeddings is not None:
                emb = np.asarray(read_matrix(args.embeddings, what="embeddings"))
                if len(emb) != len(y):
                    raise InputError(f"embeddings has {len(emb)} rows but the data has {len(y)} examples")
                how = f"k-means on {args.embeddings}"
            else:
                model = train.train(train.seeded_model(model_fn, args.seed), x, y, epochs=args.epochs, **common)
                logits, emb = train.embed(model, x)
                outputs, emb = logits.numpy(), emb.numpy()
                how = f"k-means on the penultimate features of a model trained {args.epochs} epochs"
            zero = np.flatnonzero(~np.asarray(emb).any(axis=1))  # the API's message offered an option we lack
            if len(zero):
                where = (f"row {zero[0]} of {args.embeddings}" if args.embeddings is not None
                         else f"the penultimate features of example {zero[0]}")
                fix = ("drop or fix those rows" if args.embeddings is not None else
                       "train with another --lr, --epochs or --seed, or give --embeddings")
                raise InputError(f"{where} is all zeros ({len(zero)} such row(s)): cosine distance to a centroid is "
                                 f"undefined for it; {fix}")
            scores = prototype_distance(emb, k=args.clusters, seed=args.seed)
        else:
            result = train.score_runs(model_fn, x, y, runs=args.runs, epochs=args.epochs, score_epoch=args.score_epoch,
                                      exact_grand=args.method == "grand", forgetting=args.method == "forgetting",
                                      **common)
            scores, outputs = getattr(result, args.method), result.logits
            if args.method == "forgetting":
                how = f"{args.runs} runs x {args.epochs} epochs"
            else:  # the rest of the run would not change the score, so it is not trained
                how = f"{args.runs} runs, taken after epoch {result.score_epoch} of a {args.epochs}-epoch schedule"
                if result.score_epoch and _saturated(result.logits):  # the refusal a later NaN used to give
                    raise InputError(f"training diverged at --lr {args.lr:g}: after epoch {result.score_epoch} every "
                                     "prediction is certain (probability 1), so the scores take only two values; "
                                     "lower --lr")
    except InputError:
        if _diverged(built, x):
            raise diverged() from None
        raise
    if _diverged(built) or (outputs is not None and not np.isfinite(outputs).all()):  # no error, but meaningless
        raise diverged()
    if args.method == "probs":
        npy = str(args.out).lower().endswith(".npy")
        columns = {"probs": probs} if npy else {f"p{j}": probs[:, j] for j in range(probs.shape[1])}
        write_table(args.out, columns, overwrite=args.overwrite)
        print(f"out-of-fold probabilities of {len(y)} examples ({args.folds} folds x {args.epochs} epochs, "
              f"{time.perf_counter() - start:.1f} s) in {args.out}")
        if (probs.max(axis=1) > 1 - 1e-6).all():  # a run blown up by its learning rate (or trivially easy data)
            print(f"prunekit: note: every out-of-fold probability is 0 or 1 to within 1e-6: the folds' models are "
                  f"certain of every example, which a learning rate too high for the data gives (--lr {args.lr:g}); "
                  "Confident Learning then flags only the misclassified examples and cannot rank them; unless the "
                  "data is that easy, lower --lr", file=sys.stderr)
        return 0
    npy = str(args.out).lower().endswith(".npy")
    columns = {args.method: scores} if npy else {"index": np.arange(len(scores)), args.method: scores}
    write_table(args.out, columns, overwrite=args.overwrite)
    print(f"{args.method} of {len(scores)} examples ({how}; {time.perf_counter() - start:.1f} s), higher = harder, "
          f"in {args.out}")
    return 0


def _cmd_qtune(args) -> int:
    import csv

    from prunekit.cli import _provenance, _torch_threads, _versions

    from prunekit.data import sft as S
    from prunekit.data.methods import qtuning as Q
    from prunekit.errors import InputError, check_not_input, check_seed, file_sha256, int_at_least
    from pathlib import Path

    from prunekit.weights.io import (carry_licence, check_fits_dtype, check_output, check_replaceable, load_model,
                                     output_dtype, parse_device, resolve_model, save_weights, UpdateRounding,
                                     write_atomically)

    check_output(args.out, overwrite=args.overwrite)
    parse_device(args.device, what="--device")
    ignored = []
    for name, default in (("mode", "static"), ("epochs", 1), ("lr", 2e-4), ("lora_rank", 8), ("dtype", "auto")):
        if getattr(args, name) is None:
            setattr(args, name, default)
        elif not args.train:
            ignored.append("--" + name.replace("_", "-"))
    S.check_ratio(args.samples, "--samples")
    S.check_ratio(args.tokens, "--tokens")
    if not 0 <= args.lam <= 1:
        raise InputError(f"--lam must be in [0, 1], got {args.lam}")
    int_at_least(args.epochs, "--epochs", 1)
    int_at_least(args.batch_size, "--batch-size", 1)
    int_at_least(args.max_length, "--max-length", 4)  # tokenize()'s own message named max_length
    int_at_least(args.lora_rank, "--lora-rank", 0)
    check_seed(args.seed, "--seed")
    if args.seed != 0 and not args.train:  # the scoring pass draws nothing
        ignored.append("--seed")
    if not args.lr > 0:
        raise InputError(f"--lr must be positive, got {args.lr}")
    check_not_input(args.out, args.data, resolve_model(args.model))
    check_replaceable(Path(args.out).expanduser())  # before the work: --overwrite replaces earlier outputs only
    lines = S.read_sft_lines(args.data)
    records = [obj for _, obj in lines]
    written = ("index", "quadrant", "ppl", "entropy", "response_tokens", "token_keep")  # kept.jsonl's own fields
    later = ("cut_to_max_length",)  # written since: an earlier run's rows may lack it
    rescored = 0
    for i, record in enumerate(records):
        taken = [k for k in written + later if k in record]
        if all(k in record for k in written):  # an earlier run's kept.jsonl row: its scores give way to this run's
            records[i] = {k: v for k, v in record.items() if k not in written + later}
            rescored += 1
        elif taken:
            raise InputError(f"{args.data}:{lines[i][0]}: example {i} (from 0) has the field {taken[0]!r}, which qtune "
                             f"writes into kept.jsonl ({', '.join(written + later)}); rename it")
    if rescored:
        print(f"prunekit: note: {rescored} example(s) of {args.data} come from an earlier qtune's kept.jsonl; its "
              f"fields ({', '.join(written + later)}) are replaced by this run's", file=sys.stderr)
    if ignored:  # after the checks, so that an error stays one line
        print(f"prunekit: note: {', '.join(ignored)} {'is' if len(ignored) == 1 else 'are'} used with --train only; "
              "ignored (nothing is fine-tuned)", file=sys.stderr)
    start = time.perf_counter()
    model, tok = load_model(args.model, device=args.device)
    if args.train:  # before the scoring pass
        from prunekit.weights.engine import refuse_factorized

        refuse_factorized(model, "fine-tuning", "fine-tune the dense model, then prune it with ARMOR")
        saved_dtype, saved_words = output_dtype(args.dtype, args.model)  # trained in float32, saved in this
        check_fits_dtype(model, saved_dtype)  # a float16 save of weights past its range: refused before the work
    examples = S.tokenize(records, tok, max_length=args.max_length)
    cut = {part: sum(e.cut in (part, "both") for e in examples) for part in ("prompt", "response")}
    if cut["response"]:
        print(f"prunekit: note: {cut['response']} of {len(examples)} responses were cut (their end token too) to fit "
              f"--max-length {args.max_length}, of which a prompt keeps at least half; raise --max-length to keep "
              "them whole", file=sys.stderr)
    pad_id = S._pad_id(tok)
    nll, ent, resp = S.score_examples(model, examples, pad_id=pad_id, batch_size=args.batch_size, progress=not args.quiet)
    sel = Q.qtuning_select(nll, ent, resp, sample_ratio=args.samples, token_ratio=args.tokens, lam=args.lam)
    scored = time.perf_counter() - start
    report = rounding = None
    if args.train:
        if args.mode == "static":  # the selection just written, not a second scoring pass
            pruner = S.FixedSelection(sel)
        else:
            pruner = Q.QTuning(sample_ratio=args.samples, token_ratio=args.tokens, lam=args.lam, seed=args.seed,
                               every=args.mode)
        from prunekit.cli import _recorded_if_readable
        from prunekit.evaluate import sparsity, zeros_kept

        input_sparsity = sparsity(model)["total"]
        rounding = UpdateRounding(model, saved_dtype, full=not args.lora_rank)  # what the save loses of the update
        report = S.sft(model, examples, pad_id=pad_id, pruner=pruner, epochs=args.epochs, batch_size=args.batch_size,
                       lr=args.lr, lora_rank=args.lora_rank or None, seed=args.seed, progress=not args.quiet)
        from prunekit.lora import merge_lora

        if args.lora_rank:
            rounding.measure_adapters(model)
        merge_lora(model)
        if not args.lora_rank:
            rounding.measure(model)
        rounding = rounding.result()
        pattern, skip = _recorded_if_readable(resolve_model(args.model))
        zeros, zeros_note = zeros_kept("fine-tuning (--train)", input_sparsity, model, pattern, skip=skip,
                                      output="OUT/model")
    counts = {Q.NAMES[q]: int((sel.quadrant == q).sum()) for q in (1, 2, 3, 4)}
    summary = {"model": str(args.model), "data": str(args.data), "samples": len(examples), "kept_samples": sel.samples,
               "response_tokens": int(resp.sum()), "kept_response_tokens": sel.tokens,
               "kept_samples_response_tokens": int((resp & sel.keep_samples[:, None]).sum()),
               # kept samples whose every response token the token budget dropped: they train on nothing
               "kept_samples_without_tokens": int((sel.keep_samples & ~sel.keep_tokens.any(1)).sum()),
               "sample_ratio": args.samples, "token_ratio": args.tokens, "lam": args.lam, "quadrants": counts,
               "thresholds": sel.info, "scoring_seconds": round(scored, 2), "max_length": args.max_length,
               "cut_prompts": cut["prompt"], "cut_responses": cut["response"],
               # what a rerun needs: --seed changes the trained model, batches and threads the sums
               "data_sha256": file_sha256(args.data), "batch_size": args.batch_size,
               "seed": args.seed if args.train else None,
               "torch_threads": _torch_threads(), "device": str(args.device), "versions": _versions()}
    if report is not None:
        summary["training"] = {"mode": args.mode, "epochs": args.epochs, "lr": args.lr, "steps": report.steps,
                               "tokens_trained": report.tokens_trained, "tokens_forward": report.tokens_forward,
                               "tokens_scored": report.tokens_scored, "seconds": round(report.seconds, 2),
                               "lora_rank": args.lora_rank or None, "input_zeros": zeros,
                               "saved_dtype": str(saved_dtype).removeprefix("torch."),
                               # |saved - trained| / |trained - input| over the changed weights (null: as trained)
                               "saved_update_error": None if rounding is None else round(rounding, 4)}
        record = {"model": str(args.model), "input": _provenance(args.model), "method": "qtune", "domain": "sft",
                  **{k: summary[k] for k in ("data", "data_sha256", "sample_ratio", "token_ratio", "lam", "samples",
                                             "kept_samples", "max_length", "batch_size", "seed")},
                  "training": summary["training"], "saved_dtype": summary["training"]["saved_dtype"],
                  "torch_threads": summary["torch_threads"], "versions": summary["versions"]}

    def build(tmp):
        with open(tmp / "kept.jsonl", "w", encoding="utf-8") as f:
            for i in np.flatnonzero(sel.keep_samples):
                e = examples[i]
                ids = e.ids[e.prompt_len:]
                row = dict(records[i])
                row.update(index=int(i), quadrant=Q.NAMES[int(sel.quadrant[i])], ppl=float(sel.ppl[i]),
                           entropy=float(sel.entropy[i]), response_tokens=tok.convert_ids_to_tokens(ids),
                           token_keep=sel.keep_tokens[i, e.prompt_len: len(e.ids)].astype(int).tolist(),
                           cut_to_max_length=e.cut)  # "prompt", "response" or "both": shortened to --max-length
                f.write(jsonl.line(row) + "\n")
        with open(tmp / "scores.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["index", "ppl", "entropy", "quadrant", "quadrant_name", "placed_by", "kept", "response_tokens",
                        "kept_tokens", "cut_to_max_length"])
            for i, e in enumerate(examples):
                w.writerow([i, f"{sel.ppl[i]:.6g}", f"{sel.entropy[i]:.6g}", int(sel.quadrant[i]),
                            Q.NAMES[int(sel.quadrant[i])], str(sel.placed_by[i]), int(sel.keep_samples[i]),
                            e.response_len, int(sel.keep_tokens[i].sum()), e.cut or ""])
        (tmp / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        Q.plot_eu_plane(sel, tmp / "eu_plane.png", title=f"EU plane: {sel.samples} of {len(examples)} samples kept")
        if report is not None:
            save_weights(model, tmp / "model", saved_dtype)
            tok.save_pretrained(tmp / "model")
            # what was done, so a command run on the model records its history (as prune's outputs do)
            (tmp / "model" / "prunekit.json").write_text(jsonl.dumps(record, indent=2) + "\n")
            carry_licence(args.model, tmp / "model")

    write_atomically(args.out, build, overwrite=args.overwrite)
    # the kept samples by quadrant (the group sizes, `counts`, were printed as if they were what was kept)
    kept_by = {Q.NAMES[q]: int(((sel.quadrant == q) & sel.keep_samples).sum()) for q in (2, 4, 1, 3)}
    kept_text = ", ".join(f"{n} {name}" for name, n in kept_by.items() if n)
    print(f"kept {sel.samples} of {len(examples)} samples ({kept_text}) and {sel.tokens} of their "
          f"{summary['kept_samples_response_tokens']} response tokens"
          + (f"; fine-tuned {report.steps} step{'s' * (report.steps != 1)} on {report.tokens_trained} tokens in "
             f"{report.seconds:.0f} s" if report else "")
          + f"; in {args.out}")
    if report is not None and zeros_note:
        print(f"prunekit: note: {zeros_note}", file=sys.stderr)
    if rounding is not None and rounding > 0.1:
        print(f"prunekit: note: saved in {saved_words}, the fine-tuned weights are off their trained values by "
              f"{rounding:.0%} of the update's size (the rounding moves each weight by up to half the dtype's step "
              "there, and an update smaller than that is lost); --dtype float32 saves them as trained",
              file=sys.stderr)
    if round(len(examples) * args.samples) < 1:  # 1 of 1 kept at --samples 0.25, unsaid
        print(f"prunekit: note: --samples {args.samples} of {len(examples)} samples rounds to none; kept one, the "
              "fewest a selection keeps", file=sys.stderr)
    wanted, done = sel.info["token_drop_wanted"], sel.info["token_drop_done"]
    if done < wanted:  # the rule prunes misconceptions' tokens only: they can hold fewer than the budget drops
        total = summary["kept_samples_response_tokens"]
        held = (f"those held {done}, all dropped" if done else "none of the kept samples is one, so none was "
                "dropped")
        print(f"prunekit: note: --tokens {args.tokens} asked to drop {wanted} of the kept samples' {total} response "
              f"tokens, but Q-Tuning drops only the misconception samples' tokens and {held}: "
              f"{sel.tokens / total:.0%} of the tokens are kept", file=sys.stderr)
    if summary["kept_samples_without_tokens"]:
        print(f"prunekit: note: {summary['kept_samples_without_tokens']} of the {sel.samples} kept samples lost every "
              "response token to --tokens (all 0 in their token_keep in kept.jsonl): they are trained on nothing, so "
              "a trainer that ignores the masks trains on other data than Q-Tuning; raise --tokens to keep more",
              file=sys.stderr)
    return 0


def _read_kept(path, n: int) -> np.ndarray:
    """Sorted indices of the examples to keep out of `n`: a .npy of indices or a boolean mask [n], or a
    .csv/.parquet table whose ``index`` column (what `data select` writes) or single column holds them."""
    from prunekit.data.io import check_real, read_named
    from prunekit.errors import InputError

    table, names = read_named(path, what="keep")
    table = np.asarray(table)
    check_real(table, path, "keep")  # complex indices lost their imaginary parts with only a numpy warning
    if str(path).lower().endswith(".csv") and not names:  # pandas' Series.to_csv writes the header "0": an index?
        raise InputError(f"keep file {path} has no header row, so its first row could be a header (pandas writes "
                         "'0') or an index; give the column a header, index (data select writes one; pandas: "
                         "pd.Series(kept, name='index').to_csv(path, index=False))")
    if table.dtype == bool:
        if table.shape != (n,):
            raise InputError(f"keep file {path} is a boolean mask of shape {table.shape}; it needs one entry per "
                             f"example ({n})")
        return np.flatnonzero(table)
    if table.ndim == 2:
        lower = [c.strip().lower() for c in names or []]
        if "index" not in lower:
            raise InputError(f"keep file {path} has {table.shape[1]} columns and no 'index' column; give the kept "
                             "indices (what `data select --out` writes)")
        table = table[:, lower.index("index")]
    if table.ndim != 1 or not np.issubdtype(table.dtype, np.number):
        raise InputError(f"keep file {path} must hold example indices, got shape {table.shape} of {table.dtype}")
    if not (np.all(np.isfinite(table)) and np.all(table == np.round(table))):
        raise InputError(f"keep file {path} must hold whole-number example indices")
    bad = (table < 0) | (table >= n)  # before the cast: 1e30 became a negative int64
    if bad.any():
        raise InputError(f"keep file {path} row {int(np.argmax(bad))}: index {table[np.argmax(bad)]:.0f} is not an "
                         f"example of the data (0..{n - 1})")
    kept = table.astype(np.int64)
    if len(np.unique(kept)) != len(kept):
        mask = len(kept) == n and set(np.unique(kept).tolist()) <= {0, 1}
        raise InputError(f"keep file {path} lists an example twice; give each kept index once"
                         + (" (it looks like a 0/1 mask: save it as a boolean .npy, np.save(path, mask.astype(bool)), "
                            "or give its indices, np.flatnonzero(mask))" if mask else ""))
    return np.sort(kept)


def _cmd_train(args) -> int:
    import argparse as ap
    import math

    import torch

    from prunekit import train
    from prunekit.errors import InputError, check_seed, int_at_least
    from prunekit.weights.io import parse_device

    device = parse_device(args.device, what="--device")
    int_at_least(args.epochs, "--epochs", 1)
    int_at_least(args.batch_size, "--batch-size", 1)
    check_seed(args.seed, "--seed")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise InputError(f"--lr must be a positive number, got {args.lr}")
    if (args.test_data is None) != (args.test_labels is None):
        raise InputError("give --test-data and --test-labels together")
    if args.data != "fashion-mnist" and args.test_data is None:
        raise InputError("--test-data and --test-labels are needed with a data file (fashion-mnist brings its test "
                         "split): held-out accuracy is what this command reports")
    start = time.perf_counter()
    x, y, model_fn = _inputs(args)
    if args.test_data is not None:
        test = ap.Namespace(data=args.test_data, labels=args.test_labels, model=args.model,
                            flags=("--test-data", "--test-labels"))
        x_test, y_test, _ = _inputs(test)
        test_source = str(args.test_data)
    else:  # the zoo copy's test split, scaled as _inputs scales its train split
        from prunekit import zoo

        _, _, xt, yt = zoo.fashion_mnist()
        x_test = torch.from_numpy(np.ascontiguousarray(xt, dtype=np.float32) / 255.0)
        x_test = x_test.reshape(len(xt), *x.shape[1:])  # [M, 1, 28, 28] for the CNN, [M, 784] for the MLP
        y_test = torch.from_numpy(yt.astype(np.int64))
        test_source = "fashion-mnist test split"
    if tuple(x_test.shape[1:]) != tuple(x.shape[1:]):
        raise InputError(f"held-out inputs are shaped {tuple(x_test.shape[1:])} per example, the training inputs "
                         f"{tuple(x.shape[1:])}; give them in the same shape")
    reach = float(x.abs().max()), float(x_test.abs().max())  # after uint8 pixels were divided by 255
    if min(reach) > 0 and max(reach) / min(reach) > 20:  # uint8 pixels beside 0-255 floats, or the reverse
        raise InputError(f"the training inputs reach {reach[0]:.3g} and the held-out inputs {reach[1]:.3g} (uint8 "
                         "pixels are divided by 255, other values are taken as they are): give both on one scale")
    k = int(y.max()) + 1
    if int(y_test.max()) >= k:
        raise InputError(f"held-out label {int(y_test.max())} is a class the training labels never use (0..{k - 1})")
    kept = _read_kept(args.keep, len(y)) if args.keep is not None else np.arange(len(y))
    if len(kept) == len(y) and args.budget != "same-steps":  # the budgets differ only for a subset
        print(f"prunekit: note: every example trains ({'no --keep' if args.keep is None else 'the keep file keeps all'}"
              f"), so --budget {args.budget} is the same run as same-steps", file=sys.stderr)
    if len(kept) == 0:
        raise InputError(f"keep file {args.keep} keeps no example")
    n = len(y)
    steps = args.epochs * math.ceil(n / args.batch_size) if args.budget == "same-steps" else None
    idx = torch.from_numpy(kept)
    model = train.seeded_model(model_fn, args.seed).to(device)  # the CPU's initial weights, moved
    if args.budget == "same-steps":
        train.train(model, x[idx], y[idx], steps=steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    progress=not args.quiet)
    else:
        train.train(model, x[idx], y[idx], epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                    progress=not args.quiet)
    if _diverged([model], x_test):
        raise InputError(f"training diverged at --lr {args.lr:g}: the model's weights or outputs became NaN or Inf; "
                         "lower --lr, or scale the data to about unit size")
    acc = train.accuracy(model, x_test, y_test)
    used = steps if steps is not None else args.epochs * math.ceil(len(kept) / args.batch_size)
    out = {"examples": n, "kept": len(kept), "steps": used, "budget": args.budget, "epochs": args.epochs,
           "test_accuracy": acc, "test_examples": len(y_test), "test": test_source, "seed": args.seed,
           "device": str(device), "seconds": time.perf_counter() - start}
    if args.json:
        print(jsonl.dumps(out))
    else:
        print(f"trained on {len(kept)} of {n} examples ({used} steps, {args.budget}); held-out accuracy {acc:.4f} on "
              f"{len(y_test)} examples ({test_source})")
    return 0


COMMANDS = {"label-issues": _cmd_label_issues, "select": _cmd_select, "score": _cmd_score, "qtune": _cmd_qtune,
            "train": _cmd_train}


def run(args: argparse.Namespace) -> int:
    return COMMANDS[args.data_command](args)
