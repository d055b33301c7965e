"""``prunekit memory {add,ask,stats} --store FILE``: a HEMA conversation memory in one SQLite file.

    prunekit memory add --store chat.db "My locker code is 4417."
    prunekit memory add --store chat.db --role assistant "Noted."
    prunekit memory add --store chat.db --jsonl turns.jsonl         # one {"role", "content"} per line
    prunekit memory ask --store chat.db "What is my locker code?" --budget 256
    prunekit memory ask --store chat.db "What is my locker code?" --model smollm2-135m
    prunekit memory stats --store chat.db

A new store records its embedder (``--embedder minilm``, the default, or ``hash``); later commands use the
recorded one. Every write is one transaction: bad input changes nothing, and a store that a failed first
``add`` would have created is removed.
"""

from __future__ import annotations

import json
import sqlite3
import sys
from pathlib import Path

from prunekit import jsonl

__all__ = ["add_parser", "run"]

_NAMES = {"all-MiniLM-L6-v2": "minilm", "hash-bow-256": "hash"}
MAX_NEW_TOKENS = 64  # memory ask --max-new-tokens


def add_parser(sub) -> None:
    from prunekit.inference.memory import AGE_FROM, RETRIEVAL_TERMS
    from prunekit.inference.memory_embed import EMBEDDERS

    mem = sub.add_parser("memory", help="long conversation memory (HEMA): add turns, ask with a bounded prompt, stats")
    msub = mem.add_subparsers(dest="memory_command", required=True)

    def common(p):
        p.add_argument("--store", required=True, help="the memory's SQLite file (created by the first add)")
        p.add_argument("--embedder", choices=EMBEDDERS, default=None,
                       help="minilm (all-MiniLM-L6-v2, the default for a new store) or hash (no model); an existing "
                       "store uses the one it was built with")
        p.add_argument("--json", action="store_true", help="print one JSON object on stdout")

    add = msub.add_parser("add", help="append turns to the memory")
    add.add_argument("text", nargs="?", default=None, help="the turn's text (or use --jsonl)")
    add.add_argument("--role", default=None, help="speaker of TEXT (default user)")
    add.add_argument("--jsonl", default=None, metavar="FILE", help="turns, one JSON object {role, content} per line")
    # forgetting options: a store records the ones given, and later commands use them unless given again
    add.add_argument("--forget-every", type=int, default=None,
                     help="turns between forgetting passes (0: never; default 100, or what the store recorded)")
    add.add_argument("--forget-fraction", type=float, default=None,
                     help="fraction pruned per pass (default 0.005, or what the store recorded)")
    add.add_argument("--max-chunks", type=int, default=None,
                     help="cap on the chunks kept: after each turn the lowest-salience ones beyond it are forgotten "
                     "(0: no cap; the default, or what the store recorded)")
    add.add_argument("--retrieval-term", choices=RETRIEVAL_TERMS, default=None,
                     help="salience bonus for recently retrieved chunks (the paper's text; the default) or for chunks "
                     "not retrieved (its printed formula)")
    add.add_argument("--age-from", choices=AGE_FROM, default=None,
                     help="a chunk's age counts from the turn it was said (the paper's; the default) or from its last "
                     "retrieval when later")
    common(add)

    ask = msub.add_parser("ask", help="retrieve for a message and print the assembled prompt (and an answer)")
    ask.add_argument("query", help="the current message")
    ask.add_argument("--k", type=int, default=5, help="chunks retrieved (default 5)")
    ask.add_argument("--budget", type=int, default=512, help="prompt budget in tokens (default 512)")
    ask.add_argument("--tail", type=int, default=2, help="recent turns in the prompt (default 2)")
    ask.add_argument("--model", default=None, help="also answer with this causal LM (zoo name or folder); its "
                     "tokenizer then counts the budget, chat template included")
    ask.add_argument("--max-new-tokens", type=int, default=MAX_NEW_TOKENS,
                     help="with --model: the longest answer in tokens")
    ask.add_argument("--no-mark", action="store_true", help="do not record the retrieval (read-only)")
    ask.add_argument("--quiet", action="store_true", help="with --model: no progress bars")
    common(ask)

    st = msub.add_parser("stats", help="turns, chunks, forgotten chunks, summaries")
    common(st)

    fg = msub.add_parser("forget", help="run a forgetting pass now and list the chunks it removed (or, with "
                         "--log, every chunk forgotten so far)")
    fg.add_argument("--fraction", type=float, default=None,
                    help="fraction of the index pruned by this pass (default: the store's recorded --forget-fraction)")
    fg.add_argument("--log", action="store_true", help="only list what earlier passes forgot; change nothing")
    common(fg)


class _Recorded:
    """The store's recorded embedder, for commands that embed nothing (stats, forget): no weights loaded."""

    def __init__(self, name: str, dim: int):
        self.name, self.dim = name, dim

    def encode(self, texts):
        raise RuntimeError("this command embeds nothing")


def _embedder(args, path: Path, create: bool, *, needed: bool = True):
    from prunekit.errors import InputError
    from prunekit.inference.memory_embed import make_embedder, minilm_path
    from prunekit.inference.memory_store import SQLiteStore

    name = args.embedder
    recorded = None
    if path.is_file() and path.stat().st_size > 0:
        try:
            store = SQLiteStore(path, readonly=True)
        except InputError:
            if not create:
                raise
            store = None  # an empty or foreign file: `memory add` makes it a store, or says why it cannot
        if store is not None:
            try:
                recorded, dim = store.embedder()
            finally:
                store.close()
    if recorded is not None:
        if name is not None and recorded in _NAMES and _NAMES[recorded] != name:
            raise InputError(f"{path} was built with --embedder {_NAMES[recorded]}, not {name}; drop --embedder")
        if not needed:  # stats, forget: the name and size are what Memory checks; the weights are never used
            return _Recorded(recorded, dim)
        if recorded not in _NAMES:
            raise InputError(f"{path} was built with embedder {recorded}, which the CLI cannot load; use the Python "
                             "API")
        name = _NAMES[recorded]
    name = name or "minilm"
    if name == "minilm":
        minilm_path()  # fail now, before anything is created
    return make_embedder(name)


def _turns(args) -> list:
    """The turns to add, each checked (a bad line of a --jsonl file named) before the store is touched."""
    from prunekit.errors import InputError

    from prunekit.inference.memory import Memory
    from prunekit.jsonl import read_objects

    if (args.text is None) == (args.jsonl is None):
        raise InputError("give the turn's text or --jsonl FILE (one of them)")
    if args.jsonl is not None and args.role is not None:  # each line's own role was stored; --role went unused
        raise InputError("--role sets the speaker of TEXT; each --jsonl line names its own \"role\"; leave --role out")
    if args.text is not None:
        turn = {"role": "user" if args.role is None else args.role, "content": args.text}
        Memory._turn(turn)
        return [turn]
    src = Path(args.jsonl).expanduser()
    if not src.is_file():
        raise InputError(f"--jsonl {src} is not a file")

    turns = []
    for no, item in read_objects(src, shape='{"role", "content"}'):
        try:
            Memory._turn(item)
        except InputError as e:
            raise InputError(f"{src}:{no}: {e}") from None
        turns.append(item)
    if not turns:
        raise InputError(f"{src} holds no turns")
    return turns


FORGETTING = {"forget_every": 100, "forget_fraction": 0.005, "retrieval_term": "retrieved", "age_from": "said",
              "max_chunks": 0}


def _open(args, *, create: bool, readonly: bool = False, embeds: bool = True, **given):
    """The memory at ``--store`` with the forgetting options `given` (None = not given): each one not given is
    what the store recorded, else the default. Returns ``(memory, settings it was opened with)``."""
    from prunekit.errors import InputError
    from prunekit.inference.memory import Memory
    from prunekit.inference.memory_store import SQLiteStore

    path = Path(args.store).expanduser()
    if not create and not path.exists():
        raise InputError(f"no memory store at {path}; create it with `prunekit memory add --store {path} TEXT`")
    embedder = _embedder(args, path, create, needed=embeds)  # fails before a new store file is made
    store = SQLiteStore(path, create=create, readonly=readonly)
    try:
        recorded = _recorded_forgetting(store)
        if recorded is None:
            if all(given.get(k) is not None for k in FORGETTING if k != "max_chunks"):
                recorded = {}  # every option given (the cap may stay off): they replace the broken record
            else:
                raise InputError(f"{path} records unreadable forgetting options; give --forget-every, "
                                 "--forget-fraction, --retrieval-term and --age-from (and --max-chunks for a cap) to "
                                 "`memory add` to record them again")
        settings = {k: given.get(k) if given.get(k) is not None else recorded.get(k, v) for k, v in FORGETTING.items()}
        return Memory(store=store, embedder=embedder, **settings), settings  # Memory checks every value
    except BaseException:
        store.close()
        raise


def _recorded_forgetting(store) -> dict | None:
    """The forgetting options `store` recorded (empty: none yet), None when the record is unreadable."""
    try:
        recorded = json.loads(store.setting("cli.forgetting") or "{}")
    except json.JSONDecodeError:
        return None
    return recorded if isinstance(recorded, dict) else None


def _changed_settings(store, settings: dict) -> str:
    """The forgetting options that differ from those `store` recorded (``--max-chunks 10 -> 4``); empty for a new
    store or an unreadable record (whose options are all given again)."""
    recorded = _recorded_forgetting(store)
    if not recorded:
        return ""
    return ", ".join(f"--{k.replace('_', '-')} {recorded.get(k, v)} -> {settings[k]}" for k, v in FORGETTING.items()
                     if recorded.get(k, v) != settings[k])


def _holds_no_turns(path: Path) -> bool:
    """Whether the store this run created is still empty: another `memory add` may have opened it since and
    committed turns (an interrupted first add deleted them). Unreadable or busy counts as not empty."""
    import sqlite3

    try:
        db = sqlite3.connect(f"{path.absolute().as_uri()}?mode=ro", uri=True, timeout=1.0)
        try:
            tables = {r[0] for r in db.execute("SELECT name FROM sqlite_master WHERE type = 'table'")}
            return "turns" not in tables or db.execute("SELECT COUNT(*) FROM turns").fetchone()[0] == 0
        finally:
            db.close()
    except sqlite3.Error:
        return False


def _cmd_add(args) -> int:
    path = Path(args.store).expanduser()
    turns = _turns(args)
    created = not path.exists()
    if created:
        from prunekit.errors import check_writable

        check_writable(path, flag="--store")  # not under a file, and writable
    try:
        mem, settings = _open(args, create=True, forget_every=args.forget_every, forget_fraction=args.forget_fraction,
                              retrieval_term=args.retrieval_term, age_from=args.age_from, max_chunks=args.max_chunks)
        try:
            changed = _changed_settings(mem.store, settings)
            added = mem.add_many(turns)
            with mem.store.transaction():  # later adds (and stats) use these unless given others
                mem.store.set_setting("cli.forgetting", json.dumps(settings))
            stats = mem.stats()
        finally:
            mem.close()
    except BaseException:
        if created and _holds_no_turns(path):  # leave no empty store behind (but never another writer's turns)
            for p in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
                p.unlink(missing_ok=True)
        raise
    gone = sum(len(a.forgotten) for a in added)
    if changed:  # lowering --max-chunks forgot down to the new cap at once, and only the count was printed
        print(f"prunekit: note: {path}'s forgetting options changed: {changed}; recorded for later adds",
              file=sys.stderr)
    if args.json:
        print(jsonl.dumps({"added": [a.turn for a in added], "chunks": sum(len(a.chunk_ids) for a in added),
                           "forgotten": gone, "turns": stats["turns"], "store": str(path)}))
    else:
        print(f"added {len(added)} turn(s) ({sum(len(a.chunk_ids) for a in added)} chunks) to {path}: "
              f"{stats['turns']} turns, {stats['chunks']} chunks" + (f"; forgot {gone} chunks" if gone else ""))
    return 0


def _cmd_ask(args) -> int:
    from prunekit.errors import InputError

    for name, low in (("--k", 0), ("--budget", 1), ("--tail", 0), ("--max-new-tokens", 1)):
        value = getattr(args, name[2:].replace("-", "_"))
        if value < low:
            raise InputError(f"{name} must be >= {low}, got {value}")
    if not args.query.strip():
        raise InputError("the message to ask about is empty")
    if args.model is None and args.max_new_tokens != MAX_NEW_TOKENS:  # nothing is generated without a model
        print("prunekit: note: --max-new-tokens is used with --model only; ignored (the prompt is printed)",
              file=sys.stderr)
    model = tok = None
    # before loading a model: a missing store is said at once; --no-mark writes nothing, so it reads read-only
    mem, _ = _open(args, create=False, readonly=args.no_mark)
    try:
        if args.model is not None:
            import prunekit

            model, tok = prunekit.load_model(args.model)
        mem.tokenizer = tok
        wrap = 0
        if tok is not None:  # the chat template's markers and default system prompt come out of the budget
            from prunekit.inference.memory_summary import chat_overhead

            wrap = chat_overhead(tok)
            if wrap >= args.budget:
                raise InputError(f"--budget {args.budget} leaves nothing for the memory: the model's chat template "
                                 f"alone takes {wrap} tokens; give a larger --budget")
            need = mem.message_tokens(args.query)  # prompt's refusal named the budget less the template's share
            if need + wrap > args.budget:
                raise InputError(f"--budget {args.budget} is smaller than the message alone needs: {need} tokens, "
                                 f"and {wrap} the model's chat format adds around it; raise --budget or shorten the "
                                 "message")
        p = mem.prompt(args.query, args.budget - wrap, k=args.k, tail_turns=args.tail, mark=not args.no_mark)
    finally:
        mem.close()
    answer = None
    if model is not None:
        from prunekit.inference.memory_summary import chat_generate

        answer = chat_generate(model, tok, p.text, max_new_tokens=args.max_new_tokens)
    if args.json:
        print(jsonl.dumps({"retrieved": [vars(r) for r in p.retrieved], "prompt": p.text, "tokens": p.tokens + wrap,
                           "budget": args.budget, "template_tokens": wrap, "left_out": p.left_out,
                           "answer": answer}))
        return 0
    print(f"retrieved {len(p.retrieved)} chunk(s)" + (f" ({p.left_out} more did not fit)" if p.left_out else "") + ":")
    for r in p.retrieved:
        print(f"  [{r.score:.3f}] turn {r.turn} {r.role}: {r.text}")
    counter = "the model's tokenizer" if tok is not None else "an estimate (give --model to count exactly)"
    # the chat template's markers, or without one the special tokens (a BOS) the tokenizer adds
    wrapped = f", {wrap} of them added around the message by the chat format" if wrap else ""
    print(f"prompt ({p.tokens + wrap} of {args.budget} tokens by {counter}{wrapped}):\n-----\n{p.text}\n-----")
    if answer is not None:
        print(f"answer: {answer}")
    return 0


def _cmd_forget(args) -> int:
    from prunekit.errors import InputError

    if args.fraction is not None and not 0 < args.fraction <= 1:
        raise InputError(f"--fraction must be in (0, 1], got {args.fraction}")
    if args.log and args.fraction is not None:  # --log forgets nothing: the fraction went unused
        raise InputError("--log only lists what earlier passes forgot, and --fraction sizes a pass run now; leave "
                         "one of them out")
    mem, settings = _open(args, create=False, readonly=args.log, embeds=False)
    try:
        if args.log:
            gone = mem.store.forgotten()
        else:
            if args.fraction is not None:
                mem.forget_fraction = args.fraction
            gone = mem.forget()
        left = mem.stats()["chunks"]
    finally:
        mem.close()
    if args.json:
        print(jsonl.dumps({"forgotten": [vars(g) for g in gone], "chunks": left}))
        return 0
    fraction = args.fraction or settings["forget_fraction"]
    what = "forgotten so far" if args.log else f"forgotten now (fraction {fraction:g})"
    print(f"{len(gone)} chunk(s) {what}; {left} chunks in the index")
    for g in gone:
        print(f"  turn {g.turn} (salience {g.salience:.4f}, pass at turn {g.at_turn}): {g.text[:100]}")
    return 0


def _cmd_stats(args) -> int:
    mem, _ = _open(args, create=False, readonly=True, embeds=False)
    try:
        stats = mem.stats()
    finally:
        mem.close()
    if args.json:
        print(jsonl.dumps(stats))
    else:
        for key in ("store", "bytes", "turns", "chunks", "forgotten", "block_summaries", "embedder", "summary"):
            print(f"{key}: {stats[key]}")
        f = stats["forgetting"]
        cap = f"at most {f['max_chunks']} chunks" if f["max_chunks"] else "no cap on the chunks"
        print(f"forgetting: {f['fraction']:g} of the chunks every {f['every']} turns" if f["every"] else
              "forgetting: no periodic pass", end=f"; {cap}\n")
    return 0


def run(args) -> int:
    from prunekit.errors import InputError

    try:
        commands = {"add": _cmd_add, "ask": _cmd_ask, "stats": _cmd_stats, "forget": _cmd_forget}
        return commands[args.memory_command](args)
    except sqlite3.DatabaseError as e:
        import errno

        if "disk is full" in str(e) or "disk I/O error" in str(e):  # the system, not the input: exit 1
            raise OSError(errno.ENOSPC if "full" in str(e) else errno.EIO, f"memory store: {e}", args.store) from None
        if "locked" in str(e) or "busy" in str(e):  # another process's write outlasted the busy timeout: exit 1
            from prunekit.inference.memory_store import BUSY_SECONDS

            raise OSError(errno.EBUSY, f"memory store is locked by another process writing to it (waited "
                                       f"{BUSY_SECONDS:g} s; one writer at a time)", args.store) from None
        raise InputError(f"memory store {args.store}: {e}") from None
