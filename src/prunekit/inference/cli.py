"""``prunekit reason ...``: vote over sampled reasoning paths (SC, PC, RPC), or sample them from a model.

    prunekit reason PATHS.jsonl --method rpc [--n 8] [--resamples 10] [--seed 0] [--json] [--answers OUT.jsonl]
    prunekit reason --model smollm2-135m --questions Q.jsonl --samples 16 --out PATHS.jsonl

The questions file holds one ``{"question": str, "answer": reference}`` object a line; the paths file is
what `prunekit.inference.reasoning.load_paths` reads. Output files are written atomically and an existing
one is refused unless ``--overwrite``.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

from prunekit import jsonl

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from prunekit.weights.io import DEVICE_HELP

    r = sub.add_parser("reason", help="vote over sampled reasoning paths (sc, pc, rpc) or sample them from a model")
    r.add_argument("paths", nargs="?", default=None, help="JSONL of sampled paths to vote over")
    r.add_argument("--method", choices=("sc", "pc", "rpc"), default=None,
                   help="sc: majority vote; pc: perplexity consistency; rpc: reasoning pruning + pc (required to vote "
                        "over FILE)")
    r.add_argument("--n", type=int, default=None, help="paths per question (default all); below the paths "
                   "available, accuracy and ECE are averaged over --resamples random n-subsets")
    r.add_argument("--resamples", type=int, default=None,
                   help="random n-subsets averaged when --n is given (default 10)")
    r.add_argument("--seed", type=int, default=0, help="seed of the n-subsets, or of the sampling")
    r.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    r.add_argument("--answers", default=None,
                   help="voting: write each question's chosen answer, its confidence and the paths kept to this JSONL "
                        "(all of a question's paths vote, whatever --n; questions need no reference answer then)")
    r.add_argument("--model", default=None, help="sample: local Hugging Face model folder or zoo name (smollm2-135m)")
    r.add_argument("--questions", default=None, help="sample: JSONL of {\"question\", \"answer\"} objects")
    r.add_argument("--samples", type=int, default=None, help="sample: paths per question (default 16)")
    r.add_argument("--max-new-tokens", type=int, default=None, help="sample: longest path in tokens (default 96)")
    r.add_argument("--temperature", type=float, default=None,
                   help="sample: temperature; the recorded log-probs are of the tempered distribution (default 1)")
    r.add_argument("--device", default=None, help="sample: " + DEVICE_HELP)
    r.add_argument("--out", default=None, help="sample: output JSONL of sampled paths")
    r.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    r.add_argument("--resume", action="store_true",
                   help="sample: keep each question's paths in OUT.partial as they come, and continue from it when "
                   "it exists (same model, questions and options); it is removed once OUT is written")
    r.add_argument("--quiet", action="store_true", help="no progress bars")


def _read_questions(path: str) -> list[dict]:
    from prunekit.errors import InputError

    p = Path(path).expanduser()
    if not p.is_file():
        raise InputError(f"--questions {p} is not a file; give a JSONL of {{\"question\", \"answer\"}} objects")
    from prunekit.jsonl import read_objects

    out = []
    for no, obj in read_objects(p, shape='{"question": str, "answer": ...}'):
        if not isinstance(obj.get("question"), str) or not obj["question"].strip():
            raise InputError(f"{p}:{no}: expected {{\"question\": non-empty str, \"answer\": ...}}")
        out.append({"question": obj["question"], "answer": obj.get("answer")})
    if not out:
        raise InputError(f"{p} holds no questions")
    return out


# options of the sampling mode, with their defaults
SAMPLING = {"samples": 16, "max_new_tokens": 96, "temperature": 1.0, "device": "cpu"}
VOTING = {"n": None, "resamples": 10}  # and of the voting mode


def _only_for(args, mine: dict, other: dict, mode: str, other_mode: str) -> None:
    """Fill `mine`'s defaults; refuse any option of the other mode (they were silently ignored)."""
    from prunekit.errors import InputError

    given = [name for name in other if getattr(args, name) is not None]
    if args.overwrite and mode == "voting" and args.answers is None:
        raise InputError("--overwrite replaces an existing output: the --out of sampling (--model) or the --answers "
                         "file of voting; give one, or drop --overwrite")
    if given:
        flags = ", ".join("--" + name.replace("_", "-") for name in given)
        raise InputError(f"{flags} {'is' if len(given) == 1 else 'are'} for {other_mode}; drop "
                         f"{'it' if len(given) == 1 else 'them'} when {mode}")
    for name, default in mine.items():
        if getattr(args, name) is None:
            setattr(args, name, default)


def _check_out(path, flag: str, what: str, overwrite: bool, *inputs) -> Path:
    """An output JSONL file: refused before the work when it cannot or should not be written."""
    from prunekit.errors import InputError, check_not_input, check_writable, follow_link

    out = follow_link(Path(path).expanduser())  # written where a link points: its folder is checked
    if out.is_dir():
        raise InputError(f"{flag} {out} is a folder; give a file name for {what}")
    if out.exists() and not overwrite:
        raise InputError(f"{out} exists; pass --overwrite or choose another {flag}")
    if not out.parent.is_dir():
        raise InputError(f"{out.parent} is not a folder; create it first")
    check_writable(out, flag=flag)  # before the work: a read-only folder failed only at the save
    check_not_input(out, *inputs, flag=flag)
    return out


def _sample(args) -> int:
    from prunekit.errors import InputError
    from prunekit.inference.sampling import _check, check_question_seeds
    from prunekit.weights.io import parse_device, resolve_model

    if args.paths is not None or args.method is not None or args.answers is not None:
        raise InputError("sampling (--model) takes no paths file, --method or --answers; vote in a second command")
    _only_for(args, SAMPLING, VOTING, "sampling", "voting over a paths file")
    if args.questions is None or args.out is None:
        raise InputError("sampling needs --questions Q.jsonl and --out PATHS.jsonl")
    out = _check_out(args.out, "--out", "the JSONL of sampled paths", args.overwrite, args.questions, args.model)
    _check(n=args.samples, max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed)
    parse_device(args.device, what="--device")
    questions = _read_questions(args.questions)
    check_question_seeds(args.seed, 0, len(questions))
    resolve_model(args.model)
    partial = out.with_name(out.name + ".partial")
    if partial.exists() and not args.resume:  # a plain run left it beside OUT, and the next --resume was refused
        raise InputError(f"{partial} holds the questions an interrupted --resume run sampled; add --resume to "
                         f"continue it, or delete {partial} to start over")
    lock = _resume_lock(out) if args.resume else None  # two resumers appended to one .partial: it was lost
    try:
        return _sample_into(args, out, partial, questions)
    finally:
        if lock is not None:
            if not partial.exists():  # nothing left to resume: no lock file either (kept beside a .partial)
                Path(lock.name).unlink(missing_ok=True)
            lock.close()


def _resume_lock(out: Path):
    """An exclusive lock on ``OUT.lock`` for a ``--resume`` run (released when its process ends, even killed)."""
    import fcntl

    from prunekit.errors import InputError

    lock = open(out.with_name(out.name + ".lock"), "a")
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.close()
        raise InputError(f"another prunekit run is sampling into {out} with --resume; let it finish (or stop it), "
                         "then run this again") from None
    return lock


def _sample_into(args, out: Path, partial: Path, questions: list[dict]) -> int:
    from prunekit.inference.sampling import sample_paths
    from prunekit.weights.io import load_model

    done = _resume_from(partial, args, questions) if args.resume else []
    model, tok = load_model(args.model, device=args.device)
    if not args.resume:
        records = sample_paths(model, tok, questions, n=args.samples, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, seed=args.seed, out=out, overwrite=args.overwrite,
                               progress=not args.quiet)
    else:
        from prunekit.inference.sampling import write_jsonl

        mode = "a" if done else "w"
        with open(partial, mode, encoding="utf-8") as log:
            if not done:  # on disk before the first question's sampling (a kill there left an empty file)
                log.write(jsonl.line({"prunekit_partial": 1, "settings": _settings(args)}) + "\n")
                log.flush()
                os.fsync(log.fileno())

            def keep(record):  # each question's paths on disk before the next is sampled
                log.write(jsonl.line(record) + "\n")
                log.flush()
                os.fsync(log.fileno())

            try:
                new = sample_paths(model, tok, questions[len(done):], n=args.samples,
                                   max_new_tokens=args.max_new_tokens, temperature=args.temperature, seed=args.seed,
                                   start=len(done), on_record=keep, progress=not args.quiet)
            except BaseException:
                print(f"prunekit: note: the questions sampled so far are kept in {partial}; run the same command "
                      "with --resume to continue", file=sys.stderr)
                raise
        records = done + new
        write_jsonl(out, records, overwrite=args.overwrite)
        partial.unlink(missing_ok=True)
    paths = sum(len(r["paths"]) for r in records)
    if args.json:
        print(jsonl.dumps({"model": str(args.model), "questions": len(records), "paths": paths, "out": str(out)}))
    else:
        print(f"sampled {paths} paths for {len(records)} questions from {args.model}; saved to {out}")
    missing = sum(r["answer"] is None for r in records)
    if missing:
        print(f"prunekit: note: {missing} question(s) have no \"answer\": written with answer null; `prunekit "
              "reason` needs a reference answer to score them", file=sys.stderr)
    return 0


def _settings(args) -> dict:
    from prunekit.errors import file_sha256

    return {"model": str(args.model), "questions_sha256": file_sha256(args.questions), "samples": args.samples,
            "max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "seed": args.seed}


def _resume_from(partial: Path, args, questions: list[dict]) -> list[dict]:
    """The records an interrupted ``--resume`` run kept in `partial` (none when it does not exist); refused
    when they were made with other settings or questions."""
    from prunekit.errors import InputError

    if not partial.exists() or partial.stat().st_size == 0:  # empty: killed before its header reached the disk
        return []
    lines = partial.read_text(encoding="utf-8").splitlines()
    try:
        head = json.loads(lines[0]) if lines else {}
    except json.JSONDecodeError:
        head = {}
    records = []
    for line in lines[1:]:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut by the interruption: it and what follows are sampled again
            break
    if not isinstance(head, dict) or head.get("prunekit_partial") != 1:
        raise InputError(f"{partial} is not a prunekit progress file; remove it or choose another --out")
    if head.get("settings") != _settings(args):
        raise InputError(f"{partial} was sampled with other settings ({head.get('settings')}); run with those, or "
                         "remove it to start again")
    if len(records) > len(questions) or any(not isinstance(r, dict) or r.get("question") != q["question"]
                                            for r, q in zip(records, questions)):
        raise InputError(f"{partial} does not hold these questions; remove it to start again")
    from prunekit.inference.reasoning import _parse

    for i, record in enumerate(records):  # what the output will hold must read back (a damaged path was copied)
        try:
            parsed = _parse(record, partial, i + 2)
        except InputError as e:
            raise InputError(f"{e}; the progress file is damaged: remove it to start again") from None
        if len(parsed.texts) != args.samples or any(lp is None for lp in parsed.logprobs):
            raise InputError(f"{partial}:{i + 2}: {len(parsed.texts)} paths, not the {args.samples} sampled ones "
                             "with their log-probs; the progress file is damaged: remove it to start again")
    if records:
        print(f"prunekit: note: resuming after {len(records)} of {len(questions)} questions kept in {partial}",
              file=sys.stderr)
    partial.write_text("".join(line + "\n" for line in lines[:1 + len(records)]), encoding="utf-8")
    return records


def run(args) -> int:
    from prunekit.errors import InputError
    from prunekit.inference import reasoning

    if args.model is not None:
        return _sample(args)
    if args.resume:
        raise InputError("--resume continues an interrupted sampling run (--model ... --out ...); voting needs none")
    if args.paths is None:
        raise InputError("give a JSONL of sampled paths to vote over, or --model/--questions/--out to sample")
    if args.method is None:
        raise InputError("--method is required: sc, pc or rpc")
    if args.questions is not None or args.out is not None:
        raise InputError("--questions and --out are for sampling, which needs --model")
    resamples_given = args.resamples is not None
    _only_for(args, VOTING, SAMPLING, "voting", "sampling (--model)")
    out = None if args.answers is None else _check_out(args.answers, "--answers", "the chosen answers",
                                                         args.overwrite, args.paths)
    questions = reasoning.load_paths(args.paths)
    reasoning.check_n(args.n, questions)  # before the note below, which says the run goes on
    unknown = sum(not reasoning.has_reference(q.answer) for q in questions)
    if args.n is None or args.n >= max(len(q.answers) for q in questions):  # no subsets are drawn
        unused = [f for f, given in (("--resamples", resamples_given), ("--seed", args.seed != 0)) if given]
        if unused and (out is None or not unknown):  # else the note of --answers names them
            print(f"prunekit: note: {' and '.join(unused)} {'is' if len(unused) == 1 else 'are'} used when --n is "
                  "below the paths per question; ignored (every question votes over all its paths once)",
                  file=sys.stderr)
    if out is not None:
        subsets = [f for f, given in (("--n", args.n is not None), ("--resamples", resamples_given),
                                      ("--seed", args.seed != 0)) if given]
        return _write_answers(args, questions, out, subsets, unknown)
    res = reasoning.evaluate(questions, method=args.method, n=args.n, resamples=args.resamples, seed=args.seed)
    _print_evaluation(args, res)
    return 0


def _write_answers(args, questions, out: Path, subsets: list[str], unknown: int) -> int:
    """--answers: every question's choice written to `out`; accuracy and ECE printed too when every question
    has a reference answer (`unknown`: how many have none; `subsets`: the flags given for that evaluation)."""
    from prunekit.inference import reasoning
    from prunekit.inference.sampling import write_jsonl

    picks = reasoning.choose(questions, method=args.method)
    res = None
    if not unknown:
        res = reasoning.evaluate(questions, method=args.method, n=args.n, resamples=args.resamples, seed=args.seed)
    write_jsonl(out, picks, overwrite=args.overwrite)
    if res is not None:
        res["answers"] = str(out)
        _print_evaluation(args, res)
        if not args.json:
            print(f"chosen answers (all paths voting): {out}")
        return 0
    if subsets:
        print(f"prunekit: note: {', '.join(subsets)} {'is' if len(subsets) == 1 else 'are'} for the accuracy and ECE, "
              f"which {unknown} question(s) without a reference answer rule out; ignored", file=sys.stderr)
    summary = {"method": args.method, "questions": len(picks), "without_reference": unknown, "answers": str(out),
               "mean_confidence": sum(p["confidence"] for p in picks) / len(picks)}
    if args.json:
        print(jsonl.dumps(summary))
    else:
        print(f"{args.method}: chose an answer for each of {len(picks)} questions (mean confidence "
              f"{100 * summary['mean_confidence']:.1f}%) -> {out}; {unknown} have no reference answer, so no "
              "accuracy or ECE")
    return 0


def _print_evaluation(args, res: dict) -> None:
    low, high = res["paths_per_question"]
    res["paths_available"] = low
    if args.json:
        print(jsonl.dumps(res))
        return
    if args.n is not None and args.n < high:
        how = (f"averaged over {res['rounds']} random subsets of {res['n']} paths per question (seed {args.seed})"
               if res["rounds"] > 1 else f"one random subset of {res['n']} paths per question (seed {args.seed})")
    else:
        how = f"all {low} paths per question" if low == high else f"all paths per question ({low} to {high})"
    print(f"{args.method}: accuracy {100 * res['accuracy']:.2f}%  ECE {100 * res['ece']:.2f}%  "
          f"over {res['questions']} questions, {how}")
    if args.method == "rpc":
        print(f"reasoning pruning dropped {100 * res['pruned_fraction']:.1f}% of the paths")
