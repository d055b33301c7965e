"""An offline instruction set with checkable short answers, for SFT experiments (Q-Tuning's benchmark).

Two kinds of instruction/response pairs, deterministic under a seed:

- ``year``: reading comprehension over the Wikipedia leads of `prunekit.zoo`. A passage of one to three
  consecutive sentences of a lead (at most ``max_words`` words) in which one sentence states a year plainly
  (``in 1887``, ``by 1887``, ...; that sentence holds exactly one year); the instruction shows a short window of
  that sentence with the year blanked, and the response quotes the window and gives the year. Other years may
  sit in the other sentences, so the answer must be found, not guessed.
- ``arith``: two- and three-step arithmetic word problems (add, subtract, multiply, share equally) whose
  answers are computed; the response shows each step, then the answer.

Every response ends with ``The answer is X.``; `extract_answer` takes X back and `exact_match` compares it to
the record's ``answer`` after `normalize` (lowercase, no surrounding punctuation or articles, no thousands
commas). Train and held-out sets come from disjoint leads (split by a hash of the title) and disjoint
random streams.

>>> tr, te = build_tasks(train=4, test=2, seed=0, documents=[{"title": "X", "text": "X was founded in 1901 by Y."}] * 0)
>>> sorted({r["task"] for r in tr})
['arith']
>>> exact_match("So 3 + 4 = 7. The answer is 7.", "7"), normalize(" The Answer, ")
(True, 'answer')
"""

from __future__ import annotations

import hashlib
import random
import re

from prunekit.errors import InputError, check_seed, int_at_least, is_real

__all__ = ["build_tasks", "add_noise", "year_questions", "arithmetic_problems", "extract_answer", "normalize",
           "exact_match"]

_YEAR = re.compile(r"\b(in|by|since|until|from|during|of|around|circa|c\.)\s+((1[0-9]|20)\d\d)\b")
_ANY_YEAR = re.compile(r"\b(1[0-9]|20)\d\d\b")
_SENT = re.compile(r"(?<=[.!?])\s+(?=[A-Z])")


def _held_out(title: str, test_share: float = 0.3) -> bool:
    h = int(hashlib.sha256(title.encode()).hexdigest()[:8], 16)
    return h / 0xFFFFFFFF < test_share


def _check_documents(documents) -> None:
    if isinstance(documents, (str, bytes, dict)) or not hasattr(documents, "__iter__"):
        raise InputError(f"documents must be a list of {{'title', 'text'}} dicts, got {type(documents).__name__}")
    for i, d in enumerate(documents):
        if not isinstance(d, dict) or not all(isinstance(d.get(k), str) for k in ("title", "text")):
            raise InputError(f"document {i} must be a dict with string fields 'title' and 'text'")



def year_questions(documents: list[dict], *, max_words: int = 28, window: int = 3) -> list[dict]:
    """Every year question the leads give (at most one per lead), in document order, with ``title``."""
    max_words = int_at_least(max_words, "max_words", 5, hint=" (a passage's word limit)")
    window = int_at_least(window, "window", 1, hint=" (words shown before the blank)")
    _check_documents(documents)
    out = []
    for d in documents:
        sents = [s.strip() for s in _SENT.split(d["text"]) if s.strip()]
        for j, s in enumerate(sents):
            years = _ANY_YEAR.findall(s)
            m = _YEAR.search(s)
            if m is None or len(years) != 1 or len(s.split()) > max_words - 4:
                continue
            passage = [s]
            if j > 0 and len(" ".join([sents[j - 1], s]).split()) <= max_words:
                passage.insert(0, sents[j - 1])
            if j + 1 < len(sents) and len(" ".join(passage + [sents[j + 1]]).split()) <= max_words:
                passage.append(sents[j + 1])
            year = m.group(2)
            words = s[: m.start(2)].split()
            after = s[m.end(2):].split()
            before_w = words[-window:]
            after_w = after[: max(2, window // 2)]
            blank = " ".join(before_w + ["____"] + after_w).rstrip(",;:")
            quote = " ".join(before_w + [year] + after_w).rstrip(",;:")
            out.append({
                "task": "year", "title": d["title"], "answer": year,
                "instruction": f"Read the passage and give the year that fills the blank.\nPassage: {' '.join(passage)}\n"
                               f"Blank: \"...{blank}...\"",
                "response": f"The passage says \"...{quote}...\". The answer is {year}.",
            })
            break
    return out


_NAMES = ["Anna", "Ben", "Carla", "David", "Elena", "Farid", "Grace", "Hugo", "Ines", "Jonas", "Kira", "Liam",
          "Maya", "Noah", "Olga", "Pedro", "Rosa", "Sami", "Tara", "Victor"]
_ITEMS = ["apples", "books", "marbles", "pencils", "stamps", "cookies", "stickers", "coins", "shells", "cards"]


def arithmetic_problems(n: int, *, seed: int) -> list[dict]:
    """`n` word problems of two or three steps, answers computed (never negative, shares exact)."""
    n = int_at_least(n, "n", 0)
    rng = random.Random(check_seed(seed))
    out = []
    while len(out) < n:
        name, item = rng.choice(_NAMES), rng.choice(_ITEMS)
        a, b = rng.randint(3, 40), rng.randint(2, 30)
        kind = rng.randrange(4)
        if kind == 0:  # a + b - c
            c = rng.randint(1, a + b - 1)
            total = a + b - c
            q = (f"{name} has {a} {item}. {name} gets {b} more and then gives {c} away. "
                 f"How many {item} does {name} have now?")
            steps = f"{a} + {b} = {a + b}. {a + b} - {c} = {total}."
        elif kind == 1:  # a * b + c
            a, b, c = rng.randint(2, 9), rng.randint(2, 12), rng.randint(1, 20)
            total = a * b + c
            q = (f"{name} buys {a} boxes with {b} {item} in each box, and already had {c} {item}. "
                 f"How many {item} does {name} have in all?")
            steps = f"{a} * {b} = {a * b}. {a * b} + {c} = {total}."
        elif kind == 2:  # (a + b) / k
            k = rng.randint(2, 6)
            share = rng.randint(2, 12)
            a = rng.randint(1, share * k - 1)
            b = share * k - a
            total = share
            q = (f"{name} has {a} {item} and finds {b} more. {name} shares them equally among {k} friends. "
                 f"How many {item} does each friend get?")
            steps = f"{a} + {b} = {a + b}. {a + b} / {k} = {total}."
        else:  # a - b + c - d
            a = rng.randint(20, 60)
            b = rng.randint(1, a - 5)
            c = rng.randint(1, 20)
            d = rng.randint(1, a - b + c - 1)
            total = a - b + c - d
            q = (f"{name} starts with {a} {item}, loses {b}, wins {c}, and then gives {d} to a friend. "
                 f"How many {item} are left?")
            steps = f"{a} - {b} = {a - b}. {a - b} + {c} = {a - b + c}. {a - b + c} - {d} = {total}."
        out.append({"task": "arith", "answer": str(total), "instruction": q,
                    "response": f"{steps} The answer is {total}."})
    return out


def build_tasks(*, train: int = 320, test: int = 120, seed: int = 0, arith_share: float = 0.5,
                documents: list[dict] | None = None) -> tuple[list[dict], list[dict]]:
    """``(train records, held-out records)``: ``arith_share`` arithmetic problems, the rest year questions from the
    leads (`documents`, default the zoo's Wikipedia leads; train and test from disjoint leads), shuffled by `seed`.
    Falls back to arithmetic only when the documents give no year question."""
    int_at_least(train, "train", 1)
    int_at_least(test, "test", 1)
    seed = check_seed(seed)
    if not is_real(arith_share) or not 0 <= arith_share <= 1:
        raise InputError(f"arith_share must be a number in [0, 1], got {arith_share!r}")
    if documents is None:
        from prunekit import zoo

        documents = zoo.wiki_documents()
    _check_documents(documents)
    qs = year_questions(documents)
    rng = random.Random(seed)
    pools = {False: [q for q in qs if not _held_out(q["title"])], True: [q for q in qs if _held_out(q["title"])]}
    sets = []
    for held, n, stream in ((False, train, 2 * seed), (True, test, 2 * seed + 1)):
        pool = pools[held]
        n_year = min(len(pool), n - int(round(n * arith_share))) if pool else 0
        chosen = rng.sample(pool, n_year)
        rows = chosen + arithmetic_problems(n - n_year, seed=10_000 + stream)
        rng.shuffle(rows)
        sets.append(rows)
    return sets[0], sets[1]


def add_noise(records: list[dict], fraction: float, *, seed: int = 0) -> list[dict]:
    """A copy of `records` in which ``round(fraction * len)`` of them, drawn by `seed`, answer another instruction:
    the chosen records' responses are rotated by one among themselves (misaligned pairs, the harmful noise that
    SFT data pruning is meant to drop) and marked ``"noisy": True``. Fewer than two chosen records cannot be
    rotated, so then the copy is unchanged. `records` itself is not modified."""
    if not is_real(fraction) or not 0 <= fraction < 1:
        raise InputError(f"noise fraction must be in [0, 1), got {fraction!r}")
    seed = check_seed(seed)
    if isinstance(records, (str, bytes, dict)) or not hasattr(records, "__iter__"):
        raise InputError(f"records must be a list of {{'instruction', 'response'}} dicts, got {type(records).__name__}")
    for i, r in enumerate(records):
        if not isinstance(r, dict) or "response" not in r:
            raise InputError(f"record {i} must be a dict with a 'response' (the answers are what the noise moves)")
    out = [dict(r) for r in records]
    k = int(round(fraction * len(out)))
    if k < 2:
        return out
    chosen = random.Random(seed).sample(range(len(out)), k)
    responses = [records[i]["response"] for i in chosen]
    for j, i in enumerate(chosen):
        out[i]["response"] = responses[(j + 1) % k]
        out[i]["noisy"] = True
    return out


_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize(text: str) -> str:
    """Lowercase, no articles, no thousands commas, no punctuation at the ends, single spaces."""
    t = text.lower().strip()
    t = re.sub(r"(?<=\d),(?=\d{3}\b)", "", t)
    t = _ARTICLES.sub(" ", t)
    t = t.strip(" \t\n.,;:!?\"'()[]")
    return " ".join(t.split())


def extract_answer(response: str) -> str:
    """The X of the last ``answer is X`` in `response`, else its first line."""
    hits = re.findall(r"answer is\s*:?\s*([^\n]+?)\s*(?:\.\s*$|\.\s+|\n|$)", response, flags=re.IGNORECASE)
    if hits:
        return hits[-1]
    return response.strip().splitlines()[0] if response.strip() else ""


def exact_match(response: str, answer: str) -> bool:
    return normalize(extract_answer(response)) == normalize(answer)
