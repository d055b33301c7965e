"""``prunekit generate``: generation under a KV-cache policy, over `prunekit.inference.kv.policy`: greedy by
default, sampled with ``--temperature`` (and ``--top-p`` / ``--top-k``, seeded by ``--seed``).

Prints the generated text on stdout and one line of numbers (tokens cached, cache size, speed) on stderr, or
everything as one JSON object with ``--json``. Writes no files.
"""

from __future__ import annotations

import contextlib
import sys
import time
from pathlib import Path

from prunekit import jsonl

__all__ = ["add_parser", "run"]


def add_parser(sub) -> None:
    from prunekit.weights.io import add_device_argument

    from prunekit.inference.kv import POLICY_NAMES

    ge = sub.add_parser("generate", help="generate text with a KV-cache policy and a token budget")
    ge.add_argument("model", help="local Hugging Face model folder or zoo name (smollm2-135m)")
    src = ge.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", default=None, help="the prompt text")
    src.add_argument("--prompt-file", default=None, help="a UTF-8 text file holding the prompt")
    ge.add_argument("--kv", required=True, metavar="POLICY", help=f"KV-cache policy: {', '.join(POLICY_NAMES)}")
    ge.add_argument("--budget", type=int, default=None,
                    help="cached tokens kept per layer and KV head (delta: tokens its sparse layers attend to)")
    ge.add_argument("--max-new-tokens", type=int, default=64, help="tokens to generate (default 64)")
    ge.add_argument("--temperature", type=float, default=0.0,
                    help="0: greedy decoding (default); above 0: sample from softmax(logits / T)")
    ge.add_argument("--top-p", type=float, default=None,
                    help="with --temperature: sample from the smallest set of tokens holding P of the probability")
    ge.add_argument("--top-k", type=int, default=None,
                    help="with --temperature: sample from the K most likely tokens (default: all of them)")
    ge.add_argument("--seed", type=int, default=None, help="with --temperature: the sampling seed (default 0)")
    ge.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16", "auto"),
                    help="dtype the model runs in, and so its cache (default float32; auto: as the folder stores it)")
    add_device_argument(ge)
    ge.add_argument("--every", type=int, default=None,
                    help="while decoding, compress when the cache reaches budget + EVERY (default 16; 1 holds the "
                         "budget exactly, at a compression per token)")
    ge.add_argument("--once", action="store_true",
                    help="compress the prompt only, at its prefill, and keep every generated token (kvpress's and "
                         "SnapKV's use of a budget: the cache ends at the budget plus the new tokens but the last; "
                         "no --every)")
    ge.add_argument("--chat", action="store_true", help="wrap the prompt in the tokenizer's chat template as a user turn")
    ge.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                    help="a policy option (repeatable), e.g. --option sinks=4 --option delta_layers=2,15,24 "
                         "(delta_layers=calibrate: placed where attention shifts most on 1,024 Wikipedia tokens)")
    ge.add_argument("--json", action="store_true", help="print one JSON object on stdout")
    ge.add_argument("--quiet", action="store_true", help="no progress bars")


def _sampling(args) -> tuple[dict, list[str]]:
    """`generate`'s sampling keyword arguments from the flags, and notes for flags greedy decoding ignores."""
    import math

    from prunekit.errors import InputError

    t = args.temperature
    if not math.isfinite(t) or t < 0:
        raise InputError(f"--temperature must be 0 (greedy) or a finite number above 0 (got {t})")
    given = [flag for flag, value in (("--top-p", args.top_p), ("--top-k", args.top_k), ("--seed", args.seed))
             if value is not None]
    if t == 0:
        return {"do_sample": False}, [f"{flag} is not used by greedy decoding (--temperature 0)" for flag in given]
    top_p = 1.0 if args.top_p is None else args.top_p
    if not (math.isfinite(top_p) and 0 < top_p <= 1):
        raise InputError(f"--top-p must be in (0, 1] (got {top_p})")
    top_k = 0 if args.top_k is None else args.top_k
    if top_k < 0:
        raise InputError(f"--top-k must be at least 1, or 0 for all tokens (got {top_k})")
    if args.seed is not None and not 0 <= args.seed < 2**63:  # torch.manual_seed overflowed after the model load
        raise InputError(f"--seed must be in [0, 2**63), got {args.seed}")
    # top_k=0 spelled out: transformers' own default would keep the 50 most likely tokens only
    return {"do_sample": True, "temperature": t, "top_p": top_p, "top_k": top_k,
            "seed": 0 if args.seed is None else args.seed}, []


def run(args) -> int:
    import torch
    from transformers import DynamicCache

    import prunekit
    from prunekit.errors import InputError, apply_chat_template, int_at_least
    from prunekit.inference import kv
    from prunekit.weights.io import parse_device, resolve_model

    parse_device(args.device, what="--device")
    if args.max_new_tokens < 1:
        raise InputError(f"--max-new-tokens must be at least 1 (got {args.max_new_tokens})")
    from prunekit.cli import parse_options

    options = parse_options(args.option, example="sinks=4")
    sampling, ignored = _sampling(args)  # ignored: options this run does not use, named once the inputs are checked
    calibrate = str(options.get("delta_layers", "")).strip().lower() == "calibrate"
    if calibrate:
        if kv.POLICIES.get(args.kv.replace("-", "_")) is not kv.Delta:
            raise InputError("--option delta_layers=calibrate is for --kv delta only")
        options.pop("delta_layers")
    checked = kv.make_policy(args.kv, budget=args.budget, **options)  # validate before loading anything
    if args.every is None:
        args.every = kv.EVERY
    else:
        int_at_least(args.every, "--every", 1)
        if not checked.compresses:
            ignored.append(f"--every is not used by --kv {args.kv} (it never evicts)")
        elif args.once:
            ignored.append("--every is not used with --once (it never compresses while decoding)")
    if args.once and not checked.compresses:
        ignored.append(f"--once is not used by --kv {args.kv} (it never evicts)")
    if args.budget is not None and checked.budget is None:
        ignored.append(f"--budget is not used by --kv {args.kv} (it keeps every token)")
    if args.prompt_file is not None:
        path = Path(args.prompt_file).expanduser()
        if path.is_dir() or not path.exists():  # a pipe (<(...), /dev/stdin) is read once, like a file
            what = "is a folder" if path.is_dir() else "does not exist"
            raise InputError(f"prompt file {path} {what}; give a UTF-8 text file")
        try:
            prompt = path.read_text(encoding="utf-8-sig")
        except UnicodeDecodeError:
            raise InputError(f"prompt file {path} is not UTF-8 text") from None
    else:
        prompt = args.prompt
    if not prompt.strip():
        raise InputError("the prompt is empty; give some text with --prompt or --prompt-file")
    for note in ignored:
        print(f"prunekit: note: {note}; ignored", file=sys.stderr)
    resolve_model(args.model)
    model, tok = prunekit.load_model(args.model, dtype=args.dtype, device=args.device)
    unhooked = None  # why the engine cannot hook this model, when --kv full runs it without the engine

    def refused(e: InputError) -> str:
        if not isinstance(checked, kv.FullCache):
            raise e
        why = str(e).split(";")[0]  # full keeps every token: the model's own attention gives its output
        print(f"prunekit: note: {why}; --kv full needs no engine, so the model generates as plain transformers "
              "would, with its own cache", file=sys.stderr)
        return why

    try:
        kv.Engine.check(model)  # before the notes below: they promised an output an unsupported model never gives
    except InputError as e:
        unhooked = refused(e)
    if args.chat:
        if not getattr(tok, "chat_template", None):
            raise InputError(f"{args.model}'s tokenizer has no chat template; drop --chat")
        ids = apply_chat_template(tok, [{"role": "user", "content": prompt}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)["input_ids"]
    else:
        ids = tok(prompt, return_tensors="pt")["input_ids"]
    from prunekit.text import check_vocab

    check_vocab(model, ids, what="the prompt")
    if unhooked is None:  # a sliding window: the engine runs within it only
        try:
            kv.Engine.check_window(model, ids.shape[1] + args.max_new_tokens - 1)
        except InputError as e:
            unhooked = refused(e)
    if calibrate:  # the paper's placement rule, on the bundled Wikipedia text (as the benchmarks do)
        options["delta_layers"], _ = kv.wiki_delta_layers(model, tok)
        if not args.json and not args.quiet:
            print(f"delta: calibrated delta layers {options['delta_layers']}", file=sys.stderr)
    # the policy that runs (its options now final), checked against this model (DELTA's layers) before a note
    # promises an output
    running = kv.make_policy(args.kv, budget=args.budget, **options)
    if unhooked is None:
        kv.Engine(model, running, budget=running.budget)
    from prunekit.text import position_limit

    limit = position_limit(model)
    # StreamingLLM, and Deep Forcing with topc_rope=unify, number every kept key within the cache; Deep Forcing's
    # default keeps its Top-C keys' original positions, the other policies keep them all
    renumbers = isinstance(checked, kv.StreamingLLM) or getattr(checked, "topc_rope", None) == "unify"
    fed = ids.shape[1] + args.max_new_tokens - 1  # positions fed: the last new token is never fed back
    if limit is not None and fed > limit and not renumbers:
        which = "its Top-C keys at " if isinstance(checked, kv.DeepForcing) else ""
        print(f"prunekit: note: prompt {ids.shape[1]} + {args.max_new_tokens} new tokens run past the model's {limit} "
              f"positions; --kv {args.kv} keeps {which}the original positions, so those past {limit} extrapolate RoPE "
              "(streaming_llm, and deep_forcing with --option topc_rope=unify, number positions within the cache)",
              file=sys.stderr)
    elif limit is not None and renumbers and fed > limit:
        # the positions a forward uses: the whole prompt in one, then the cache plus the step that triggers a
        # compression (budget + every; a policy that evicts below its budget and refills: budget + 1)
        # (--once: the kept prompt, then every new token but the last)
        step = args.every if checked.target(checked.budget) == checked.budget else 1
        kept = checked.target(checked.budget) if ids.shape[1] > checked.budget else ids.shape[1]
        cached = kept + args.max_new_tokens - 1 if args.once else checked.budget + step
        used = max(ids.shape[1], cached)
        if used > limit:
            why = (f"the prompt's {ids.shape[1]} tokens go through in one forward" if ids.shape[1] >= cached else
                   f"with --once the {kept} tokens kept of the prompt are followed by "
                   f"{args.max_new_tokens - 1} cached new tokens" if args.once else
                   f"a compressing step sees --budget {checked.budget} + {f'--every {step}' if step > 1 else 1} tokens")
            print(f"prunekit: note: --kv {args.kv} numbers positions within the cache, but {why}: positions up to "
                  f"{used - 1} pass the model's {limit}, so RoPE extrapolates there", file=sys.stderr)
    # the last new token is never fed back, so the cache holds at most prompt + new - 1 tokens
    if checked.budget is not None and ids.shape[1] + args.max_new_tokens - 1 <= checked.budget:
        what = "evicts nothing" if checked.compresses else "attends to every key"
        print(f"prunekit: note: --budget {checked.budget} holds the whole sequence (prompt {ids.shape[1]} + at most "
              f"{args.max_new_tokens - 1} cached new tokens), so --kv {args.kv} {what}: the output is --kv full's",
              file=sys.stderr)
    elif args.once and checked.compresses and ids.shape[1] <= checked.budget:
        print(f"prunekit: note: --budget {checked.budget} holds the whole prompt ({ids.shape[1]} tokens) and --once "
              f"compresses nothing after it, so --kv {args.kv} evicts nothing: the output is --kv full's",
              file=sys.stderr)
    cache = DynamicCache(config=model.config)
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id  # (`or` took a pad id 0 for none)
    generation = {k: v for k, v in sampling.items() if k != "seed"}
    if sampling["do_sample"]:
        torch.manual_seed(sampling["seed"])
    forwards = []  # when each forward ended: the first is the prefill, the rest decode one token each
    peak = [0, 0]  # the most tokens a layer held, and the most bytes the cache took, after any forward

    def ended(*_):
        forwards.append(time.perf_counter())
        peak[0] = max(peak[0], *kv.cache_tokens(cache), 0)
        peak[1] = max(peak[1], kv.cache_bytes(cache))

    hook = model.register_forward_hook(ended)
    start = time.perf_counter()
    try:
        hooked = (kv.policy(model, running, every=args.every, once=args.once) if unhooked is None
                  else contextlib.nullcontext(checked))
        with torch.no_grad(), hooked as pol:
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                                 cache=cache, pad_token_id=pad, **generation)
    finally:
        hook.remove()
    seconds = time.perf_counter() - start
    new = out[0, ids.shape[1]:]
    text = tok.decode(new, skip_special_tokens=True)
    tokens = kv.cache_tokens(cache)
    decode = forwards[-1] - forwards[0] if len(forwards) > 1 else 0.0
    seen = int(ids.shape[1] + new.numel() - 1)  # what a full cache holds per layer (the last token is not cached)
    result = {
        "model": str(args.model), "policy": args.kv, "budget": pol.budget,
        "every": args.every if checked.compresses and not args.once else None,
        "once": bool(args.once and checked.compresses), "options": options,
        "dtype": str(next(model.parameters()).dtype).removeprefix("torch."),
        "sampling": sampling, "prompt_tokens": int(ids.shape[1]), "new_tokens": int(new.numel()), "text": text,
        # the peaks: a compressing policy holds up to budget + every - 1 between compressions (more than at the end)
        "cache_tokens_max": peak[0] if tokens else None, "cache_tokens_end": max(tokens) if tokens else None,
        "cache_bytes": peak[1],
        "full_cache_bytes": _full_cache_bytes(kv.kv_layers(cache), seen), "seconds": seconds,
        "tokens_per_s": new.numel() / seconds if seconds > 0 else None,  # prefill included
        "prefill_seconds": forwards[0] - start if forwards else None,
        "decode_tokens_per_s": (len(forwards) - 1) / decode if decode > 0 else None,  # the tokens after the first
    }
    if getattr(pol, "available", 0):
        result["attended_fraction"] = pol.attended / pol.available
    # what the model's own cache does on a model the engine refuses: layers that keep a recurrent state instead of
    # keys and values (not counted above), and layers whose sliding window evicts past it (held < a full cache)
    recurrent = len(cache.layers) - len(tokens)
    own = kv.kv_layers(cache) if unhooked is not None else []  # hooked, a window is never passed
    windows = sorted({layer.sliding_window for layer in own if getattr(layer, "is_sliding", False)})
    sliding = sum(bool(getattr(layer, "is_sliding", False)) for layer in own)
    if recurrent:
        result["recurrent_layers"] = recurrent
    if sliding:
        result["sliding_window_layers"] = sliding
    if args.json:
        print(jsonl.dumps(result))
    else:
        print(text)
        full = (f" ({result['cache_tokens_max'] / seen:.0%} of the full cache's {seen}, "
                f"{result['full_cache_bytes'] / 2**20:.2f} MiB)" if seen > 0 and tokens else "")
        speed = (f"prefill {result['prefill_seconds']:.2f} s" if result["prefill_seconds"] is not None else "")
        if result["decode_tokens_per_s"] is not None:
            speed += f", then decode {result['decode_tokens_per_s']:.1f} tok/s"
        held = (f"cache at most {result['cache_tokens_max']} tokens/layer{full}, {result['cache_bytes'] / 2**20:.2f} "
                "MiB allocated" if tokens else f"no key/value cache (its {recurrent} layers keep a recurrent state)")
        if tokens and recurrent:
            held += (f" in its {len(tokens)} attention layer{'s' * (len(tokens) > 1)} ({recurrent} other layer"
                     f"{'s keep' if recurrent > 1 else ' keeps'} a recurrent state, not counted)")
        if sliding:
            held += (f"; {sliding} of {len(tokens)} attention layers keep at most the last "
                     f"{'/'.join(map(str, windows))} tokens (the model's own sliding window), so past it they hold "
                     "less than a full cache")
        print(f"{args.kv}: prompt {result['prompt_tokens']} + {result['new_tokens']} new tokens; {held}; {speed}",
              file=sys.stderr)
    return 0


def _full_cache_bytes(layers, tokens: int) -> int:
    """What the keys and values of `tokens` positions take in every one of a cache's key/value `layers` (their
    dtypes and head shapes): the cache without a policy or a sliding window."""
    total = 0
    for layer in layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                total += t.element_size() * (t.numel() // t.shape[-2]) * tokens
    return total
