"""HEMA: conversation memory that keeps a prompt bounded over hundreds of turns.

Paper: Kwangseob Ahn, "HEMA: A Hippocampus-Inspired Extended Memory Architecture for Long-Context AI
Conversations", arXiv:2504.16754 (2025). No official code exists; this follows the paper's text.

Algorithm, per turn u_t (t = 0, 1, ...):

- Compact Memory: a one-sentence running summary S_t = Summarizer(S_{t-1}, u_t). Every ``sos_every`` (100)
  turns the block's running summaries are compressed into one block summary (level 1), and all block
  summaries into one summary of summaries (level 2). The compact memory is ``level-2 + S_t``.
- Vector Memory: u_t is cut into chunks (sentences packed up to ``chunk_words`` words), each embedded as a unit
  vector e = Phi(c); a query q retrieves R = argtop-k over stored chunks of cos(e_q, e_m).
- Semantic forgetting: every ``forget_every`` (100) turns, each chunk i (from turn t_i) gets the salience

      w_i = lambda * exp(-gamma * (t - t_i)) + beta * delta_i,   delta_i = 1 if retrieved in the last 100 turns,

  and the lowest ``forget_fraction`` (0.5%) of chunks, ``floor(fraction * n)`` of them, leave the index
  (ties: older chunk first, then lower id). Defaults: lambda = 1, gamma = 0.002, beta = 0.5 (the paper's).
  ``max_chunks`` (not the paper's; 0, no cap, by default) bounds the index: after each turn the lowest-salience
  chunks beyond the cap leave it the same way, so the index (what retrieval scans) stays that size however long
  the conversation; the dialogue log and the audit table of forgotten chunks still grow.
- Prompt: compact summary + retrieved chunks + the last ``tail_turns`` (2) turns + the query, under a token
  budget; retrieved chunks are taken in cosine order while they fit (the paper trims them by similarity).

Departures from the paper, and why:

- The paper prints the retrieval term as beta * (1 - delta_i), which gives the bonus to chunks *not*
  retrieved recently, against its own text ("bonus for recent retrievals"). The default follows the text
  (``retrieval_term="retrieved"``: beta * delta_i); ``retrieval_term="not_retrieved"`` is the printed formula.
- Age is counted from the turn a chunk was said, as the paper does; ``age_from="retrieved"`` (an option, not the
  paper's) counts it from the chunk's last retrieval when that is later, so a chunk in use is renewed.
- Summarizer: Distil-PEGASUS-dialogue is not available offline. Any object with ``update``/``combine`` works
  (`memory_summary`): an instruct LM via ``generate``, or the extractive fallback (default, no model).
- Embeddings: text-embedding-3-small (1536-d, an API) -> all-MiniLM-L6-v2 (384-d, offline), or any embedder.
- Index: FAISS IVF-4096 + OPQ-16 (approximate) -> an exact cosine scan in the store. Exact search makes
  retrieval quality independent of index tuning; its cost is linear in the chunks kept, so forgetting's effect
  on latency is direct.
- The paper does not say how the summary of summaries feeds the running summary. Here the running summary
  restarts after each summary-of-summaries pass (S for the first turn of a block ignores S_{t-1}), so S_t covers
  the current block and level 2 the blocks before: an error in S cannot cascade past its block.
- Forgetting removes vectors from the index; the turn's text stays in the dialogue log and the removed chunk
  is written to an audit table (id, turn, text, salience, pass), so nothing is dropped silently.
- A turn and everything it triggers (chunks, summaries, a forgetting pass) are one store transaction.

Measured (bench/memory.py, MiniLM, a 10,000-turn store with 125 planted facts each asked twice later): the
paper's forgetting defaults leave 7,884 chunks, cut the index scan's time by about a third, and lower recall@50
at question time from 1.00 to 0.87; the losses are all facts asked more than 1,000 turns after they were said
(0.48 beyond 5,000), because salience ranks every chunk not retrieved in the last 100 turns by its age alone.
With ``age_from="retrieved"`` the same run kept R@50 at 0.91 (0.64 beyond 5,000) at the same index size: facts
asked a second time had been renewed by their first ask.

Example (no model needed):

>>> import tempfile, os
>>> from prunekit.inference.memory_embed import HashEmbedder
>>> m = Memory(os.path.join(tempfile.mkdtemp(), "chat.db"), embedder=HashEmbedder())
>>> _ = m.add("My locker code is 4417.")
>>> _ = m.add({"role": "assistant", "content": "Noted, your locker code is saved."})
>>> m.retrieve("what is my locker code", k=1)[0].text
'My locker code is 4417.'
>>> m.prompt("what is my locker code?", budget=60).tokens <= 60
True
"""

from __future__ import annotations

import errno
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

import numpy as np

from prunekit.errors import InputError, int_at_least, is_real
from prunekit.inference.memory_embed import Embedder, HashEmbedder, MiniLMEmbedder
from prunekit.inference.memory_store import ForgetRecord, SQLiteStore, Store, SummaryRecord, TurnRecord
from prunekit.inference.memory_summary import ExtractiveSummarizer, Summarizer, split_sentences

__all__ = ["Memory", "Retrieved", "Prompt", "Added", "salience", "forget_choice", "chunk_text", "count_tokens",
           "RETRIEVAL_TERMS", "AGE_FROM", "Embedder", "HashEmbedder", "MiniLMEmbedder"]

RETRIEVAL_TERMS = ("retrieved", "not_retrieved")
AGE_FROM = ("said", "retrieved")
_RACE_ATTEMPTS = 5  # add_many redoes its summaries this often when another writer got in first
# count_tokens' estimate: a digit, a run of letters, a run of underscores, a punctuation mark
_ESTIMATE_PIECES = re.compile(r"\d|[^\W\d_]+|_+|[^\w\s]")
_ROLE = re.compile(r"^[A-Za-z_][\w-]{0,31}$")


@dataclass(frozen=True)
class Retrieved:
    """A chunk `Memory.retrieve` found: its id, turn, role, text and similarity score."""
    id: int
    turn: int
    role: str
    text: str
    score: float  # cosine similarity to the query


@dataclass(frozen=True)
class Added:
    """What `Memory.add` stored for one turn: its number, its chunks' ids, and any summary or forgetting it ran."""
    turn: int
    chunk_ids: list[int]
    forgotten: list[ForgetRecord] = field(default_factory=list)  # removed by the pass this turn triggered
    summary_of_summaries: bool = False  # this turn closed a block


@dataclass(frozen=True)
class Prompt:
    """What `Memory.prompt` assembled within its budget: the text, its tokens and what went into it."""
    text: str  # what to give the model (one user message, or plain text)
    tokens: int  # its length by the counter used (<= budget)
    budget: int
    summary: str | None  # the compact memory included, if any
    retrieved: list[Retrieved]  # included chunks, best first
    tail: list[TurnRecord]  # included recent turns, oldest first
    query: str
    left_out: int  # retrieved chunks that did not fit


def count_tokens(text: str, tokenizer=None) -> int:
    """Tokens of `text` by `tokenizer` (no special tokens), else an estimate that errs high on prose.

    The estimate counts a run of ASCII letters as one token per 5 letters (at least 1), every digit, every
    non-ASCII letter and every punctuation mark as one. On 600-character passages, SmolLM2's tokenizer
    (Llama-style BPE, one token per digit) counts 0.83x the estimate on wiki (at most 1.04x), 0.93x on Austen
    (at most 1.03x) and 0.99x on text dense in numbers and symbols (at most 1.08x). Against one word or mark a
    token, as before, it counted 1.18x on wiki and up to 3.2x on numbers, so prompts overran their budget.
    Emoji, CJK text and runs of whitespace are estimated low. Pass the model's tokenizer when the budget must be
    exact.

    >>> count_tokens("The code is 4417.")
    8
    """
    if not isinstance(text, str):
        raise InputError(f"count_tokens takes a string, got {type(text).__name__}")
    if tokenizer is not None:
        return len(tokenizer(text, add_special_tokens=False)["input_ids"])
    return sum(-(-len(p) // 5) if p.isascii() and p[0].isalpha() else len(p) if p[0].isalpha() else 1
               for p in _ESTIMATE_PIECES.findall(text))


def chunk_text(text: str, *, chunk_words: int) -> list[str]:
    """Sentences packed in order into chunks of at most `chunk_words` words (a longer sentence is cut by words).

    >>> chunk_text("One two. Three four five. Six.", chunk_words=3)
    ['One two.', 'Three four five.', 'Six.']
    """
    chunk_words = int_at_least(chunk_words, "chunk_words", 1)
    chunks, cur, n = [], [], 0
    for sentence in split_sentences(text):
        words = sentence.split()
        while len(words) > chunk_words:  # a sentence longer than a chunk: cut it, flushing what came before
            if cur:
                chunks.append(" ".join(cur))
                cur, n = [], 0
            chunks.append(" ".join(words[:chunk_words]))
            words = words[chunk_words:]
        if n + len(words) > chunk_words and cur:
            chunks.append(" ".join(cur))
            cur, n = [], 0
        if words:
            cur.extend(words)
            n += len(words)
    if cur:
        chunks.append(" ".join(cur))
    return chunks


def salience(turns: np.ndarray, last_retrieved: np.ndarray, now: int, *, lam: float = 1.0, gamma: float = 0.002,
             beta: float = 0.5, window: int = 100, retrieval_term: str = "retrieved",
             age_from: str = "said") -> np.ndarray:
    """HEMA's salience ``w_i = lam * exp(-gamma * age_i) + beta * delta_i`` for each chunk ``[n]``.

    ``age_i = now - turn_i`` (``age_from="said"``, the paper's) or ``now - max(turn_i, r_i)`` (``"retrieved"``:
    a retrieval renews the chunk, as in an LRU cache). ``delta_i = 1`` when chunk i was retrieved at a turn
    ``r_i`` within the last `window` turns (``now - r_i < window``; ``last_retrieved = -1``: never).
    ``retrieval_term="not_retrieved"`` uses the paper's printed ``beta * (1 - delta_i)`` instead.

    >>> salience(np.array([0, 90]), np.array([-1, 95]), 100, gamma=0.01).round(3).tolist()
    [0.368, 1.405]
    >>> salience(np.array([0, 0]), np.array([-1, 50]), 200, gamma=0.01, age_from="retrieved").round(3).tolist()
    [0.135, 0.223]
    """
    if retrieval_term not in RETRIEVAL_TERMS:
        raise InputError(f"retrieval_term must be one of {', '.join(RETRIEVAL_TERMS)}, got {retrieval_term!r}")
    if age_from not in AGE_FROM:
        raise InputError(f"age_from must be one of {', '.join(AGE_FROM)}, got {age_from!r}")
    lam, gamma, beta = _check_float("lam", lam), _check_float("gamma", gamma), _check_float("beta", beta)
    now = int_at_least(now, "now", 0)
    window = int_at_least(window, "window", 1)
    turns = _turn_numbers("turns", turns, low=0)  # [n]
    last = _turn_numbers("last_retrieved", last_retrieved, low=-1)  # [n]
    if turns.shape != last.shape:
        raise InputError(f"turns ({len(turns)}) and last_retrieved ({len(last)}) must have one entry per chunk")
    recent = (last >= 0) & (now - last < window)  # [n]
    bonus = recent if retrieval_term == "retrieved" else ~recent
    since = turns if age_from == "said" else np.maximum(turns, last)  # [n]
    return lam * np.exp(-gamma * (now - since).astype(np.float64)) + beta * bonus.astype(np.float64)


def forget_choice(ids: np.ndarray, turns: np.ndarray, scores: np.ndarray, fraction: float | None = None, *,
                  count: int | None = None) -> np.ndarray:
    """Positions of the ``floor(fraction * n)`` lowest-salience chunks, or of `count` of them (at most n; give one
    of the two). Ties: older turn, then lower id.

    >>> forget_choice(np.array([1, 2, 3, 4]), np.array([0, 0, 1, 2]), np.array([0.5, 0.2, 0.2, 0.9]), 0.5).tolist()
    [1, 2]
    """
    if (fraction is None) == (count is None):
        raise InputError("give forget_choice one of fraction= or count=")
    n = len(ids)
    if len(turns) != n or len(scores) != n:
        raise InputError(f"ids ({n}), turns ({len(turns)}) and scores ({len(scores)}) must have one entry per chunk")
    if count is None:
        m = int(math.floor(_check_float("fraction", fraction, high=1.0) * n + 1e-9))
    else:
        m = min(int_at_least(count, "count", 0), n)
    if m == 0:
        return np.zeros(0, dtype=np.int64)
    order = np.lexsort((np.asarray(ids), np.asarray(turns), np.asarray(scores)))  # by score, then turn, then id
    return np.sort(order[:m])


def _turn_numbers(name: str, values, *, low: int) -> np.ndarray:
    """`values` as an int64 array ``[n]`` of turn numbers >= `low`; whole-valued floats pass, 0.7 does not."""
    arr = np.asarray(values)
    if arr.ndim != 1 or arr.dtype.kind not in "iuf" or not np.isfinite(arr).all() or (arr != np.round(arr)).any():
        raise InputError(f"{name} must be a 1-D array of whole turn numbers, got {arr.tolist()!r:.80}")
    if arr.size and arr.min() < low:
        raise InputError(f"{name} must be turn numbers >= {low}, got {arr.min()}")
    return arr.astype(np.int64)


def _check_float(name: str, value, *, low: float = 0.0, high: float | None = None, open_low: bool = False) -> float:
    ok = is_real(value) and (value > low if open_low else value >= low) and (high is None or value <= high)
    if not ok:
        bound = f"{'>' if open_low else '>='} {low}" + (f" and <= {high}" if high is not None else "")
        raise InputError(f"{name} must be a finite number {bound}, got {value!r}")
    return float(value)


_TURN_KEYS = ("role", "content", "text")


def _check_query(query, what: str) -> None:
    if not isinstance(query, str):
        raise InputError(f"query must be a string (the question or message to {what}), got {type(query).__name__}")
    if not query.strip():
        raise InputError(f"query is empty; give the question or message to {what}")


class _ClosedStore:
    """What a closed `Memory` holds instead of its store: every use says so."""

    def close(self) -> None:
        pass

    def __getattr__(self, name):
        raise InputError("this Memory is closed; open the store again with Memory(path)")


class Memory:
    """A HEMA conversation memory over a store (an SQLite file by default).

    ``Memory(path)`` opens or creates the file (``create=False``: opens an existing store only;
    ``readonly=True``: opens it read-only, never writing its contents, so `retrieve` and `prompt` need
    ``mark=False``; it leaves no ``-shm``/``-wal`` side files of its own where the folder is writable, and keeps
    those a writer left, with their commits, as they are);
    ``store=`` takes any `Store` instead. `embedder` defaults to all-MiniLM-L6-v2 (loaded when first needed),
    `summarizer` to the extractive one; `tokenizer` (a Hugging Face tokenizer) makes prompt budgets exact for
    that model. A store remembers its embedder and refuses another. Options (keyword-only): see the module
    docstring for the algorithm they parametrise.
    """

    def __init__(self, path: str | os.PathLike | None = None, *, store: Store | None = None,
                 embedder: Embedder | None = None, summarizer: Summarizer | None = None, tokenizer=None,
                 chunk_words: int = 128, k: int = 5, tail_turns: int = 2, lam: float = 1.0, gamma: float = 0.002,
                 beta: float = 0.5, retrieval_window: int = 100, retrieval_term: str = "retrieved",
                 age_from: str = "said", forget_every: int = 100, forget_fraction: float = 0.005, max_chunks: int = 0,
                 sos_every: int = 100, synchronous: str = "full", create: bool = True, readonly: bool = False):
        if (path is None) == (store is None):
            raise InputError("give exactly one of a store path or store=")
        self.chunk_words = int_at_least(chunk_words, "chunk_words", 1)
        self.k = int_at_least(k, "k", 1)
        self.tail_turns = int_at_least(tail_turns, "tail_turns", 0)
        self.lam = _check_float("lam", lam)
        self.gamma = _check_float("gamma", gamma)
        self.beta = _check_float("beta", beta)
        self.retrieval_window = int_at_least(retrieval_window, "retrieval_window", 1)
        if retrieval_term not in RETRIEVAL_TERMS:
            raise InputError(f"retrieval_term must be one of {', '.join(RETRIEVAL_TERMS)}, got {retrieval_term!r}")
        self.retrieval_term = retrieval_term
        if age_from not in AGE_FROM:
            raise InputError(f"age_from must be one of {', '.join(AGE_FROM)}, got {age_from!r}")
        self.age_from = age_from
        self.forget_every = int_at_least(forget_every, "forget_every", 0, hint=" (0: only when forget() is called)")
        self.forget_fraction = _check_float("forget_fraction", forget_fraction, high=1.0)
        self.max_chunks = int_at_least(max_chunks, "max_chunks", 0, hint=" (0: no cap)")
        self.sos_every = int_at_least(sos_every, "sos_every", 0, hint=" (0: no summary of summaries)")
        self._own_embedder = embedder is None  # released on close (a caller's own embedder is left as it is)
        self.embedder = embedder if embedder is not None else MiniLMEmbedder()
        for attr in ("name", "dim", "encode"):
            if not hasattr(self.embedder, attr):
                raise InputError(f"embedder {self.embedder!r} lacks {attr!r}; it needs name, dim and encode(texts)")
        self.summarizer = summarizer if summarizer is not None else ExtractiveSummarizer()
        for attr in ("update", "combine"):
            if not callable(getattr(self.summarizer, attr, None)):
                raise InputError(f"summarizer {self.summarizer!r} lacks {attr}(); see prunekit.inference.memory_summary")
        self.tokenizer = tokenizer
        self.store = store if store is not None else SQLiteStore(path, synchronous=synchronous, create=create,
                                                                 readonly=readonly)
        try:
            self.store.check_embedder(self.embedder.name, int(self.embedder.dim))
        except BaseException:
            if store is None:
                self.store.close()
            raise

    # -- writing -------------------------------------------------------------------------------------------
    @staticmethod
    def _turn(turn) -> tuple[str, str]:
        if isinstance(turn, str):
            role, text = "user", turn
        elif isinstance(turn, Mapping):
            other = sorted(str(k) for k in turn if k not in _TURN_KEYS)
            if other:  # {"speaker", "text"} stored every turn as the user's, the speaker dropped
                raise InputError(f"a turn has field(s) {other} that memory does not read; a turn is {{\"role\": "
                                 "\"user\" or \"assistant\" (default user), \"content\": the message} (\"text\" is "
                                 "read as content)")
            if "content" in turn and "text" in turn:
                raise InputError("a turn has both 'content' and 'text'; give the message once, as 'content'")
            role = turn.get("role", "user")
            text = turn.get("content", turn.get("text"))
        else:
            raise InputError(f"a turn is a string or a mapping with 'role' and 'content', got {type(turn).__name__}")
        if text is not None and not isinstance(text, str):
            raise InputError(f"a turn's 'content' must be a string of the message's words, got {type(text).__name__}")
        if not text or not text.strip():
            raise InputError("turn text is empty; give the message's words (a mapping needs a non-empty 'content')")
        if not isinstance(role, str) or not _ROLE.match(role):
            raise InputError(f"role {role!r} must be a short name such as user or assistant (letters, digits, _ or -)")
        return role, text.strip()

    def add(self, turn) -> Added:
        """Store one turn (a string: a user message; or ``{"role", "content"}``) and run what it triggers."""
        return self.add_many([turn])[0]

    def add_many(self, turns) -> list[Added]:
        """Store several turns in order, embedding their chunks in one call; all commit together."""
        if isinstance(turns, (str, bytes, Mapping)):
            raise InputError(f"add_many takes a list of turns, got one {type(turns).__name__}; "
                             "give a single turn to add(), or wrap it in a list")
        parsed = [self._turn(t) for t in turns]
        if not parsed:
            return []
        pieces = [chunk_text(text, chunk_words=self.chunk_words) for _, text in parsed]
        flat = [c for p in pieces for c in p]
        emb = self._encode(flat, "for the turns' chunks (nothing was stored)")  # [chunks, dim]

        for _ in range(_RACE_ATTEMPTS):
            out = self._add_parsed(parsed, pieces, emb)
            if out is not None:
                return out
        raise OSError(errno.EBUSY, "the memory store kept changing while these turns were summarised: another "
                                   "process is writing to it (one writer at a time)",
                      str(getattr(self.store, "path", "")))

    def _encode(self, texts: list[str], where: str) -> np.ndarray:
        """The embedder's float32 [len(texts), dim], checked against its interface: the right shape, finite, and
        unit (or zero) rows, since search ranks by dot product as cosine similarity."""
        name = self.embedder.name
        emb = np.asarray(self.embedder.encode(texts), dtype=np.float32)
        if emb.shape != (len(texts), int(self.embedder.dim)):
            raise InputError(f"embedder {name} returned shape {emb.shape} for {len(texts)} texts; "
                             f"expected ({len(texts)}, {self.embedder.dim})")
        if not np.isfinite(emb).all():
            raise InputError(f"embedder {name} returned NaN or infinite vectors {where}")
        norm = np.linalg.norm(emb, axis=1)  # [n]
        off = np.flatnonzero((np.abs(norm - 1) > 1e-3) & (norm > 0))
        if off.size:
            raise InputError(f"embedder {name} returned rows of L2 norm {norm[off[0]]:.4g} (not 1; {off.size} of "
                             f"{len(texts)} rows) {where}; its encode() must return unit rows (divide each by its "
                             "norm): their dot product is taken as the cosine similarity")
        return emb

    def _summarised(self, method: str, *args, **kwargs) -> str:
        """The summarizer's `method` result, which must be a string (it is stored as one)."""
        out = getattr(self.summarizer, method)(*args, **kwargs)
        if not isinstance(out, str):
            raise InputError(f"summarizer {type(self.summarizer).__name__}.{method}() returned "
                             f"{type(out).__name__}; it must return the summary as a string")
        return out

    def _add_parsed(self, parsed, pieces, emb) -> list[Added] | None:
        """One attempt of `add_many`; None when another writer added turns since the summaries were made."""
        # Summaries first (an LM summarizer is slow): nothing is held open while the model runs.
        start = self.store.count_turns()
        prev = self.store.recent_turns(1)
        summary = prev[0].summary if prev else ""
        records, blocks = [], {}
        for i, (role, text) in enumerate(parsed):
            t = start + i
            fresh = self.sos_every and t % self.sos_every == 0  # a new block: the running summary restarts
            summary = self._summarised("update", "" if fresh else summary, text, role=role)
            records.append(TurnRecord(t, role, text, summary))
            if self.sos_every and (t + 1) % self.sos_every == 0:
                first = t + 1 - self.sos_every
                older = [r.summary for r in self.store.turns_between(first, start - 1)] if first < start else []
                block = older + [r.summary for r in records if r.turn >= first]
                blocks[t] = self._summarised("combine", list(dict.fromkeys(s for s in block if s)))
        level1 = [s.text for s in self.store.summaries(1)]
        sos = {}
        for t, text in blocks.items():
            level1.append(text)
            sos[t] = self._summarised("combine", list(level1))

        out, pos = [], 0
        with self.store.transaction():  # BEGIN IMMEDIATE: from here no other writer can add turns
            if self.store.count_turns() != start:
                return None  # the turn numbers and running summary are stale: rolled back, made again
            for record, chunks in zip(records, pieces):
                self.store.add_turn(record)
                ids = self.store.add_chunks(record.turn, record.role, chunks, emb[pos : pos + len(chunks)])
                pos += len(chunks)
                closed = record.turn in blocks
                if closed:
                    self.store.add_summary(SummaryRecord(1, record.turn, blocks[record.turn]))
                    self.store.add_summary(SummaryRecord(2, record.turn, sos[record.turn]))
                gone = []
                if self.forget_every and (record.turn + 1) % self.forget_every == 0:
                    gone = self._forget_now(record.turn)
                if self.max_chunks:
                    over = self.store.count_chunks() - self.max_chunks
                    if over > 0:  # the cap: the lowest-salience chunks beyond it, by the same rule
                        gone = gone + self._forget_now(record.turn, count=over)
                out.append(Added(record.turn, ids, gone, closed))
        return out

    def _forget_now(self, now: int, *, count: int | None = None) -> list[ForgetRecord]:
        """One pass at turn `now`: the lowest-salience ``forget_fraction`` of the chunks, or `count` of them."""
        ids, turns, last = self.store.chunk_state()
        scores = salience(turns, last, now, lam=self.lam, gamma=self.gamma, beta=self.beta,
                          window=self.retrieval_window, retrieval_term=self.retrieval_term, age_from=self.age_from)
        drop = forget_choice(ids, turns, scores, self.forget_fraction if count is None else None, count=count)
        if len(drop) == 0:
            return []
        texts = {c.id: c.text for c in self.store.chunks([int(ids[i]) for i in drop])}
        records = [ForgetRecord(int(ids[i]), int(turns[i]), texts[int(ids[i])], float(scores[i]), now) for i in drop]
        self.store.forget(records)
        return records

    def forget(self) -> list[ForgetRecord]:
        """Run one forgetting pass now (at the latest turn); returns what left the index, lowest salience first."""
        now = self.store.count_turns() - 1
        if now < 0:
            return []
        with self.store.transaction():
            gone = self._forget_now(now)
        return sorted(gone, key=lambda r: (r.salience, r.turn, r.chunk_id))

    # -- reading -------------------------------------------------------------------------------------------
    def summary(self) -> str:
        """The compact memory: the latest summary of summaries (if any) and the running summary S_t."""
        last = self.store.recent_turns(1)
        sos = self.store.summaries(2)
        parts = [sos[-1].text] if sos else []
        if last and last[0].summary and last[0].summary not in parts:
            parts.append(last[0].summary)
        return " ".join(parts)

    def retrieve(self, query: str, k: int | None = None, *, mark: bool = True) -> list[Retrieved]:
        """The `k` stored chunks most similar to `query` (cosine), best first; `mark` records them as retrieved
        now, which protects them in the next forgetting passes (the salience's beta term)."""
        _check_query(query, "retrieve for")
        k = self.k if k is None else int_at_least(k, "k", 1)
        found = self._search(query, k, skip_turns=set())
        if mark:
            self._mark(found)
        return found

    def _search(self, query: str, k: int, *, skip_turns: set) -> list[Retrieved]:
        """The `k` best chunks for `query` whose turn is not in `skip_turns` (fewer only when the index runs out)."""
        q = self._encode([query], "for the query")[0]  # [dim]
        fetch = k
        while True:
            hits = self.store.search(q, fetch)
            chunks = {c.id: c for c in self.store.chunks([i for i, _ in hits])}
            found = [Retrieved(i, chunks[i].turn, chunks[i].role, chunks[i].text, s) for i, s in hits if i in chunks]
            wanted = [r for r in found if r.turn not in skip_turns]
            if len(wanted) >= k or len(hits) < fetch:
                return wanted[:k]
            fetch += k - len(wanted)  # skipped chunks took places: look further down the ranking

    def _mark(self, found: list[Retrieved]) -> None:
        now = self.store.count_turns() - 1
        if found and now >= 0:
            with self.store.transaction():
                self.store.mark_retrieved([r.id for r in found], now)

    def _count(self, text: str) -> int:
        return count_tokens(text, self.tokenizer)

    @staticmethod
    def render(query: str, *, summary: str | None, retrieved: list[Retrieved], tail: list[TurnRecord],
               system: str | None = None) -> str:
        """The prompt text: system line, summary, retrieved chunks, recent turns, then the current message."""
        parts = [system.strip()] if system else []
        if summary:
            parts.append(f"Summary of the conversation: {summary}")
        if retrieved:
            parts.append("Earlier messages that may be relevant:\n" +
                         "\n".join(f"- (turn {r.turn}, {r.role}) {r.text}" for r in retrieved))
        if tail:
            parts.append("Most recent messages:\n" + "\n".join(f"{t.role}: {t.text}" for t in tail))
        parts.append(f"Current message: {query.strip()}")
        return "\n\n".join(parts)

    def message_tokens(self, query: str, *, system: str | None = None) -> int:
        """The tokens the prompt of `query` takes with nothing else in it (no summary, chunks or turns): the least
        budget `prompt` accepts."""
        return self._count(self.render(query, summary=None, retrieved=[], tail=[], system=system))

    def prompt(self, query: str, budget: int, *, k: int | None = None, tail_turns: int | None = None,
               use_summary: bool = True, system: str | None = None, mark: bool = True) -> Prompt:
        """HEMA's prompt for `query` in at most `budget` tokens.

        Filled in order while each part fits: the query (required), the compact summary (`use_summary`), the
        last `tail_turns` turns (newest first, stopping at the first that does not fit, so the tail has no
        gaps; shown oldest first), then the `k` chunks most similar to the query among those not from a turn
        already in the tail, in cosine order, skipping any that do not fit. ``k=0`` retrieves nothing (a
        summary-only or recent-turns-only prompt). Counts with the memory's `tokenizer`, else `count_tokens`'s
        fallback.
        """
        _check_query(query, "build the prompt for")
        if system is not None and not isinstance(system, str):
            raise InputError(f"system must be a string (the system line) or None, got {type(system).__name__}")
        budget = int_at_least(budget, "budget", 1)
        k = self.k if k is None else int_at_least(k, "k", 0)
        tail_n = self.tail_turns if tail_turns is None else int_at_least(tail_turns, "tail_turns", 0)
        state = {"summary": None, "retrieved": [], "tail": []}

        def fits(**change) -> bool:
            trial = {**state, **change}
            return self._count(self.render(query, system=system, **trial)) <= budget

        need = self.message_tokens(query, system=system)
        if need > budget:
            raise InputError(f"budget {budget} tokens is smaller than the message alone needs ({need}); "
                             "raise the budget or shorten the message")
        if use_summary:
            compact = self.summary()
            if compact and fits(summary=compact):
                state["summary"] = compact
        if tail_n:
            for turn in reversed(self.store.recent_turns(tail_n)):
                if not fits(tail=[turn] + state["tail"]):
                    break
                state["tail"] = [turn] + state["tail"]
        left_out = 0
        if k:
            # k chunks besides the tail's turns (the tail's own chunks used to take places among the k)
            found = self._search(query, k, skip_turns={t.turn for t in state["tail"]})
            if mark:
                self._mark(found)
            for r in found:
                if fits(retrieved=state["retrieved"] + [r]):
                    state["retrieved"] = state["retrieved"] + [r]
                else:
                    left_out += 1
        text = self.render(query, system=system, **state)
        return Prompt(text, self._count(text), budget, state["summary"], state["retrieved"], state["tail"],
                      query.strip(), left_out)

    def stats(self) -> dict:
        """Counts and settings: turns, chunks in the index, forgotten chunks, summaries, embedder, file size."""
        path = getattr(self.store, "path", None)
        real = Path(path).resolve() if path is not None else None  # the -wal is beside a link's target
        files = [real, real.with_name(real.name + "-wal")] if real is not None else []
        return {
            "store": str(path) if path is not None else type(self.store).__name__,
            "bytes": sum(f.stat().st_size for f in files if f.exists()) if files else None,
            "turns": self.store.count_turns(),
            "chunks": self.store.count_chunks(),
            "forgotten": len(self.store.forgotten()),
            "block_summaries": len(self.store.summaries(1)),
            "embedder": self.embedder.name,
            "dim": int(self.embedder.dim),
            "summary": self.summary(),
            "forgetting": {"lam": self.lam, "gamma": self.gamma, "beta": self.beta, "window": self.retrieval_window,
                           "retrieval_term": self.retrieval_term, "age_from": self.age_from,
                           "every": self.forget_every,
                           "fraction": self.forget_fraction, "max_chunks": self.max_chunks},
        }

    def close(self) -> None:
        self.store.close()
        if self._own_embedder and callable(getattr(self.embedder, "release", None)):
            self.embedder.release()  # a closed Memory kept its 52 MB MiniLM while the object lived
        self.store = _ClosedStore()  # a call after close() was a raw sqlite3.ProgrammingError

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
