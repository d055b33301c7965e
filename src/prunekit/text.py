"""Text for calibration and evaluation, cut into token windows the same way for every tool compared.

A source is ``"wiki"``, ``"austen"``, ``"python-docs"`` or a path to a ``.txt`` file or a ``.jsonl`` file with a
``text`` field.
The bundled corpora are split so calibration and evaluation never share a document:

- ``wiki``: the leads sorted by title; every 10th (index 0, 10, 20, ...) is held out for evaluation, the
  other nine tenths are calibration text. Documents are joined with a blank line.
- ``austen``: *Pride and Prejudice* is the evaluation text; the other five novels are calibration text.
- ``python-docs``: the Python 3.11 documentation pages (reST sources) sorted by path; every 10th (index 0, 10,
  20, ...) is held out for evaluation, the other nine tenths are calibration text (a domain corpus: prose
  about code, with code). Documents are joined with a blank line.

A file is used whole for either purpose; keep your own files disjoint.

A mixture ``"wiki+austen"`` (any sources joined with ``+``) is calibration text drawn from every part alike:
`calibration_ids` takes ``samples / k`` windows from each of the k parts (the first parts take one more when
it does not divide) and interleaves them (part 1, part 2, ..., part 1, ...), so every leading or trailing run
of windows is balanced too. A mixture is for calibration only: evaluate each source on its own.

Windows: calibration takes `samples` disjoint windows of `seqlen` tokens at random (seeded) from the token
stream; evaluation takes consecutive windows from the start. Tokenizers that put a start token at the head
of a sequence get it at the head of every window (SmolLM2's adds none).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass
from numbers import Integral
from pathlib import Path

import torch

from prunekit import zoo
from prunekit.errors import InputError, check_seed, int_at_least
from prunekit.jsonl import read_objects

__all__ = ["Text", "load_text", "calibration_ids", "evaluation_ids", "check_token_ids", "check_vocab"]

BUNDLED = ("wiki", "austen", "python-docs")


@dataclass(frozen=True)
class Text:
    """A text source: its name, its text, which documents it holds (in words), and a mixture's parts."""
    name: str  # "wiki", "austen", "python-docs" or the file path
    text: str
    documents: str  # which documents, in words, for the record
    parts: tuple["Text", ...] = ()  # a mixture's sources (calibration draws windows from each alike)

    @property
    def sha256(self) -> str:
        return hashlib.sha256(self.text.encode("utf-8")).hexdigest()

    def describe(self) -> dict:
        out = {"source": self.name, "documents": self.documents, "sha256": self.sha256, "chars": len(self.text)}
        if self.parts:
            out["parts"] = [p.describe() for p in self.parts]
        return out


def _is_file(path: Path, *, folder: bool = False) -> bool:
    """``path.is_file()`` (``is_dir()`` with `folder`), False for a name too long to be a path."""
    try:
        return path.is_dir() if folder else path.is_file()
    except OSError:  # "File name too long": it names nothing
        return False


def _read_file(path: Path) -> str:
    if not _is_file(path):
        if _is_file(path, folder=True):
            what = "is a folder"
        elif os.path.exists(path):  # a pipe such as <(...) or /dev/stdin was said not to exist
            what = "is not a regular file (a pipe or device; save the text to a file)"
        else:
            what = "does not exist"
        raise InputError(f"text file {path} {what}; give a .txt or .jsonl file, or 'wiki' / 'austen' / 'python-docs'")
    if path.suffix == ".jsonl":
        docs = []
        for lineno, record in read_objects(path, shape='{"text": "..."}'):
            if not isinstance(record.get("text"), str):
                raise InputError(f"{path}:{lineno} has no string 'text' field; each line must look like {{\"text\": \"...\"}}")
            docs.append(record["text"])
        text = "\n\n".join(docs)
    elif path.suffix in (".txt", ".md", ".text", ""):
        try:
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark is not text
        except UnicodeDecodeError:
            raise InputError(f"{path} is not UTF-8 text") from None
    else:
        raise InputError(f"{path}: unsupported text file type {path.suffix!r}; give a .txt or a .jsonl file")
    if not text.strip():
        raise InputError(f"{path} holds no text")
    return text


def load_text(source: str | Path, *, purpose: str) -> Text:
    """The text of `source` for `purpose` (``"calibration"`` or ``"evaluation"``)."""
    if purpose not in ("calibration", "evaluation"):
        raise InputError(f"purpose must be 'calibration' or 'evaluation', got {purpose!r}")
    if isinstance(source, Text):  # already loaded (text held in memory)
        if source.parts and purpose == "evaluation":
            raise InputError(f"{source.name!r} is a mixture: it serves calibration only; evaluate each of its parts "
                             "on its own")
        return source
    if isinstance(source, str) and not source.strip():
        raise InputError(f"the {purpose} text source is empty; give 'wiki', 'austen', 'python-docs' or a file path "
                         "(a Text object for text held in memory)")
    if not isinstance(source, (str, Path)):
        raise InputError(f"the {purpose} text must be 'wiki', 'austen', 'python-docs', a file path or a Text, "
                         f"got {type(source).__name__}")
    evaluation = purpose == "evaluation"
    if isinstance(source, str) and ("\n" in source or len(source) > 1024) and not _is_file(Path(source).expanduser()):
        shown = " ".join(source.split())[:40]
        raise InputError(f"the {purpose} text source ({len(source)} characters: {shown!r}...) is text, not 'wiki', "
                         f"'austen', 'python-docs' or a file path; pass text held in memory as prunekit.Text(name, "
                         "text, description), or write it to a .txt file")
    if isinstance(source, str) and "+" in source and not _is_file(Path(source).expanduser()):
        names = [n.strip() for n in source.split("+")]
        if len(names) < 2 or not all(names):
            raise InputError(f"text mixture {source!r} has an empty part; write it like 'wiki+austen'")
        if evaluation:
            raise InputError(f"{source!r} is a mixture: it serves calibration only; evaluate each of "
                             f"{', '.join(names)} on its own")
        parts = tuple(load_text(n, purpose=purpose) for n in names)
        return Text(source, "\n\n".join(p.text for p in parts),
                    "a mixture, windows drawn from each part alike: " + "; ".join(p.documents for p in parts), parts)
    if source == "wiki":
        docs = zoo.wiki_documents()
        chosen = [d["text"] for i, d in enumerate(docs) if (i % 10 == 0) == evaluation]
        which = "every 10th lead by title (index % 10 == 0)" if evaluation else "the leads with index % 10 != 0 by title"
        return Text("wiki", "\n\n".join(chosen), f"Wikipedia leads: {which}, {len(chosen)} of {len(docs)}")
    if source == "austen":
        books = zoo.austen_books()
        if evaluation:
            return Text("austen", books["prideprejudice"], "Pride and Prejudice")
        names = [n for n in books if n != "prideprejudice"]
        return Text("austen", "\n\n".join(books[n] for n in names), "Austen novels but Pride and Prejudice: " + ", ".join(names))
    if source == "python-docs":
        docs = zoo.python_docs()
        chosen = [d["text"] for i, d in enumerate(docs) if (i % 10 == 0) == evaluation]
        which = "every 10th page by path (index % 10 == 0)" if evaluation else "the pages with index % 10 != 0 by path"
        return Text("python-docs", "\n\n".join(chosen),
                    f"Python 3.11 documentation (reST): {which}, {len(chosen)} of {len(docs)}")
    path = Path(source).expanduser()  # "--calib=~/c.txt" reaches us unexpanded (the shell skips ~ after =)
    return Text(str(path), _read_file(path), f"the whole file {path.name}")


def position_limit(model) -> int | None:
    """The most positions the model embeds (``max_position_embeddings``, GPT-2's ``n_positions`` / ``n_ctx``,
    MPT's ``max_seq_len``), None when its config says none."""
    config = getattr(model, "config", None)
    for name in ("max_position_embeddings", "n_positions", "n_ctx", "max_seq_len"):
        value = getattr(config, name, None)
        if isinstance(value, Integral) and not isinstance(value, bool) and value > 0:
            return int(value)
    return None


def learned_position_limit(model) -> int | None:
    """`position_limit` for a model that embeds positions from a learned table (GPT-2's ``wpe``, OPT's
    ``embed_positions``), where a longer sequence is an IndexError mid-forward, or builds its ALiBi bias for that
    many (MPT, a shape error past it); None for RoPE and other models, which run past their configured length
    (extrapolating). A table that numbers positions from its padding index on (RoBERTa: ``padding_idx + 1``) holds
    that many fewer."""
    from torch import nn

    limit = position_limit(model)
    if limit is None or not hasattr(model, "named_modules"):
        return None
    if getattr(getattr(model, "config", None), "model_type", None) == "mpt":
        return limit

    def is_table(name: str) -> bool:  # GPT-2 / GPT-Neo `wpe`, OPT `embed_positions`, BERT-style `position_embeddings`
        last = name.rsplit(".", 1)[-1]
        return last == "wpe" or "pos" in last

    tables = [m for name, m in model.named_modules() if isinstance(m, nn.Embedding) and is_table(name)]
    # positions counted from padding_idx + 1 (RoBERTa-style decoders): the last row is position rows - 1
    offset = [m.num_embeddings - m.padding_idx - 1 for m in tables if m.padding_idx is not None]
    # GPT-J / CodeGen keep their sin/cos table as a buffer `embed_positions`, CTRL its sinusoids as `pos_encoding`
    tables += [b for name, b in model.named_buffers() if "pos" in name.rsplit(".", 1)[-1] and b.dim() >= 2
               and limit <= b.shape[0] <= limit + 2]
    return min([limit, *offset]) if tables else None


def check_positions(model, tokens: int, *, what: str, fix: str) -> None:
    """Refuse `tokens` positions in one sequence when `model`'s learned position table has fewer (see
    `learned_position_limit`): ``what`` names the sequence, ``fix`` says what to lower."""
    limit = learned_position_limit(model)
    if limit is not None and tokens > limit:
        raise InputError(f"{what} come to {tokens} tokens, past the model's {limit} learned positions; {fix}")


def check_generation_positions(model, prompt_tokens: int, new_tokens: int, *, fix: str) -> None:
    """`check_positions` for generating `new_tokens` after a prompt: the last new token is never fed back, so the
    model sees prompt + new - 1 positions."""
    check_positions(model, prompt_tokens + new_tokens - 1,
                    what=f"the prompt ({prompt_tokens} tokens) and the {new_tokens - 1} new tokens fed back", fix=fix)


def check_vocab(model, ids: torch.Tensor, *, what: str) -> None:
    """Refuse token ids `model` cannot embed: a tokenizer that does not match it (an IndexError mid-forward)."""
    if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
        return
    embed = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    vocab = getattr(embed, "num_embeddings", None)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise InputError(f"{what} has token id {lo if lo < 0 else hi}, outside the model's vocabulary of {vocab}; "
                         "use the model's own tokenizer")


def ids_from_numpy(value, what: str):
    """`value` as an int64 tensor when it is a numpy array of token ids (any integer dtype; a reversed view is
    copied), an InputError when it is a numpy array of anything else; any other value as it is."""
    import numpy as np

    if not isinstance(value, np.ndarray):
        return value
    if not np.issubdtype(value.dtype, np.integer):
        raise InputError(f"{what} array must be integer token ids, got {value.dtype}")
    if value.size and np.issubdtype(value.dtype, np.unsignedinteger) and value.max() > np.iinfo(np.int64).max:
        raise InputError(f"{what} array has token id {value.max()}, beyond any vocabulary; give the model "
                         "tokenizer's ids")
    # a copy when the array is read-only (np.load(mmap_mode="r")): torch warns on a tensor over one
    return torch.from_numpy(np.require(value, np.int64, ["C", "W"]))


def check_token_ids(model, ids: torch.Tensor, *, what: str) -> None:
    """Refuse token ids `model` cannot embed (a tokenizer that does not match it) and windows longer than the
    positions in its config (``n_positions`` / ``max_position_embeddings``), before any forward pass."""
    if not isinstance(ids, torch.Tensor) or ids.dim() < 1 or ids.numel() == 0:
        shape = list(ids.shape) if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise InputError(f"{what} holds no token ids ({shape}); give at least one window of token ids")
    check_vocab(model, ids, what=what)
    limit = learned_position_limit(model) or position_limit(model)  # a padding-offset table holds fewer
    if limit is not None and ids.shape[-1] > limit:
        flag = _EVAL_SEQLEN if what.startswith("evaluation") else "--seqlen, seqlen="
        raise InputError(f"{what}: windows of {ids.shape[-1]} tokens are longer than the model's {limit} positions; "
                         f"make them at most {limit} tokens ({flag})")


# the flags that set evaluation windows, in eval / prune --eval / Python (messages reach all three)
_EVAL_SEQLEN = "eval --seqlen, prune --eval-seqlen, seqlen="
_EVAL_TOKENS = "eval --tokens, prune --eval-tokens, tokens="
_PIECE = 1 << 20  # characters tokenized at once in a long text (the Rust tokenizer's peak grows with it)
_TRIES = 64  # cut places tried per piece before the rest of the text is tokenized whole
_MARGIN = 512  # characters either side of a cut that must tokenize alike cut and whole


_RUN = 64  # longest whitespace run a cut may touch: the check's 512-character margin must see all of it


def _short_run(text: str, cut: int) -> bool:
    """Whether the whitespace run touching `cut` (before and after it) is shorter than `_RUN`: the tokens of a
    longer run depend on where it starts, which a check around the cut would not see."""
    lo = cut
    while lo > 0 and text[lo - 1].isspace():
        lo -= 1
        if cut - lo >= _RUN:
            return False
    hi = cut
    while hi < len(text) and text[hi].isspace():
        hi += 1
        if hi - lo >= _RUN:
            return False
    return True


def _cut_places(text: str, start: int, end: int):
    """Places in ``(start, end]`` next to a newline, last first: before it after a letter or digit, after it before
    a letter or digit, and between two newlines (byte-level BPE pre-tokenizers split at one or another); never
    in or next to a whitespace run of `_RUN` or more."""
    newline = text.rfind("\n", start + 1, end)
    for _ in range(64 * _TRIES):  # newlines looked at per piece: a text of newlines alone has no place and stops here
        if newline <= start:
            break
        if text[newline - 1].isalnum() and _short_run(text, newline):
            yield newline  # "word|\n"
        after = newline + 1
        if after < end and (text[after].isalnum() or text[after] == "\n") and _short_run(text, after):
            yield after  # ".\n|Word" or ".\n|\nWord"
        newline = text.rfind("\n", start + 1, newline)


def _pieces(text: str, size: int | None = None, clean=None):
    """`text` in pieces of at most about `size` (`_PIECE`) characters, so a long text is tokenized a piece at a
    time (one 50 MB line took 6 GB in the Rust tokenizer, and a whole 4 MB corpus 600 MB). A cut falls next to a
    newline (`_cut_places`) where ``clean(text, cut)`` holds (`_cleanly` for a tokenizer: the text around it
    tokenizes alike cut and whole); after `_TRIES` places that fail, or with none, the rest stays whole."""
    size = size or _PIECE
    start = 0
    while len(text) - start > size:
        cut = next((c for c, _ in zip(_cut_places(text, start, start + size), range(_TRIES))
                    if clean is None or clean(text, c)), None)
        if cut is None:
            break
        yield text[start:cut]
        start = cut
    yield text[start:]


def _cleanly(tokenizer):
    """``clean(text, cut)``: whether `_MARGIN` characters either side of `cut` tokenize to the same tokens cut there
    as whole. Pre-tokenizer splits and BPE merges are local, so this is what cutting changes; a tokenizer that
    marks each text's start (SentencePiece's leading ▁) fails it everywhere, and its texts stay whole."""
    def encode(t):
        return tokenizer(t, add_special_tokens=False, verbose=False)["input_ids"]

    def clean(text: str, cut: int) -> bool:
        left, right = text[max(0, cut - _MARGIN): cut], text[cut: cut + _MARGIN]
        return encode(left) + encode(right) == encode(left + right)

    return clean


def _head(tokenizer) -> int | None:
    """The BOS id a window starts with, when the tokenizer adds one."""
    probe = tokenizer("a")["input_ids"]
    bos = tokenizer.bos_token_id
    return bos if bos is not None and probe and probe[0] == bos else None


def _stream(tokenizer, text: str, need: int | None = None) -> tuple[list[int], int | None]:
    """The token ids of `text` (its pieces cut where they tokenize alike cut and whole, so a prefix of pieces gives
    a prefix of the ids) and the window head; with `need`, at least that many ids, or all there are: evaluation
    takes windows from the start, and tokenized a 48 MB file whole to use its first 100 KB."""
    pieces = _pieces(text, clean=_cleanly(tokenizer)) if len(text) > _PIECE else [text]
    ids: list[int] = []
    for piece in pieces:
        ids.extend(tokenizer(piece, add_special_tokens=False, verbose=False)["input_ids"])
        if need is not None and len(ids) >= need:
            break
    return ids, _head(tokenizer)


def _windows(ids: list[int], head: int | None, seqlen: int, picks: list[int]) -> torch.Tensor:
    body = seqlen - (head is not None)
    rows = [([head] if head is not None else []) + ids[i * body : (i + 1) * body] for i in picks]
    return torch.tensor(rows, dtype=torch.long)


def _check_sizes(samples: int, seqlen: int) -> None:
    for name, v in (("samples", samples), ("seqlen", seqlen)):
        if isinstance(v, bool) or not isinstance(v, Integral) or v < 1:
            raise InputError(f"{name} must be a positive integer, got {v!r}")
    if seqlen < 2:
        raise InputError("seqlen must be at least 2 tokens")


def _as_text(text, purpose: str) -> Text:
    """`text` as a `Text`: a source name or path ("wiki", "notes.txt") is loaded for `purpose`."""
    if isinstance(text, (str, Path)):
        return load_text(text, purpose=purpose)
    if not isinstance(text, Text):
        raise InputError(f"the {purpose} text must be a prunekit.Text (prunekit.load_text('wiki', purpose="
                         f"{purpose!r})) or a source name or path, got {type(text).__name__}")
    return text


def calibration_ids(tokenizer, text: Text, *, samples: int = 128, seqlen: int = 512, seed: int = 0) -> torch.Tensor:
    """`samples` disjoint random windows ``[samples, seqlen]`` of the token stream of `text`.

    For a mixture (`Text.parts`), ``samples / k`` windows from each of its k parts, interleaved. A source name
    or path (``"wiki"``) is loaded with `load_text` for calibration."""
    _check_sizes(samples, seqlen)
    samples, seqlen = int(samples), int(seqlen)
    seed = check_seed(seed)
    text = _as_text(text, "calibration")
    if text.parts:
        k = len(text.parts)
        if samples < k:
            raise InputError(f"calibration mixture {text.name} has {k} parts; ask at least {k} samples (one per part)")
        shares = [samples // k + (i < samples % k) for i in range(k)]
        drawn = [calibration_ids(tokenizer, p, samples=n, seqlen=seqlen, seed=seed) for p, n in zip(text.parts, shares)]
        order = [(i, j) for j in range(max(shares)) for i in range(k) if j < shares[i]]
        return torch.stack([drawn[i][j] for i, j in order])
    ids, head = _stream(tokenizer, text.text)
    available = len(ids) // (seqlen - (head is not None))
    if available < samples:
        raise InputError(
            f"calibration text {text.name} has {len(ids)} tokens: {available} windows of {seqlen}, but "
            f"{samples} samples x {seqlen} tokens were asked; give more text or lower --samples / --seqlen"
        )
    picks = random.Random(seed).sample(range(available), samples)
    return _windows(ids, head, seqlen, picks)


def evaluation_ids(tokenizer, text: Text, *, seqlen: int = 512, tokens: int | None = None,
                   fit: bool = False) -> torch.Tensor:
    """Consecutive windows ``[n, seqlen]`` from the start of `text`: ``tokens // seqlen`` of them (all if None).
    A source name or path (``"wiki"``) is loaded with `load_text` for evaluation. A text too short for `tokens` is
    refused, or with ``fit=True`` all its whole windows are taken (at least one is needed either way)."""
    _check_sizes(1, seqlen)
    seqlen = int(seqlen)
    if tokens is not None:
        tokens = int_at_least(tokens, "tokens", 1)
    text = _as_text(text, "evaluation")
    body = seqlen - (_head(tokenizer) is not None)
    ids, head = _stream(tokenizer, text.text, need=None if tokens is None else max(tokens // seqlen, 1) * body)
    available = len(ids) // body
    wanted = available if tokens is None else tokens // seqlen
    if available < 1:
        raise InputError(
            f"evaluation text {text.name} has {len(ids)} tokens; it needs at least one window of {seqlen}; "
            f"give more text or a shorter window ({_EVAL_SEQLEN})"
        )
    if wanted < 1:
        raise InputError(f"{tokens} tokens are less than one window of {seqlen}; raise the tokens ({_EVAL_TOKENS}) or "
                         f"shorten the window ({_EVAL_SEQLEN})")
    if wanted > available and fit:
        wanted = available
    if wanted > available:
        raise InputError(
            f"evaluation text {text.name} has {available} windows of {seqlen} tokens, but {tokens} tokens ask for "
            f"{wanted} (16384 unless given); lower the tokens ({_EVAL_TOKENS}) or give more text"
        )
    return _windows(ids, head, seqlen, list(range(wanted)))
