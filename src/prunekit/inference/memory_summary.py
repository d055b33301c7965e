"""Summarizers for HEMA's Compact Memory, and the one greedy chat call they and the CLI share.

A summarizer has two methods, both returning one sentence:

- ``update(previous, turn, *, role)``: the running summary S_t = Summarizer(S_{t-1}, u_t), u_t said by `role`;
- ``combine(summaries)``: one sentence over many (a block's running summaries, or the block summaries: the
  summary of summaries).

HEMA uses a fine-tuned Distil-PEGASUS-dialogue (<= 60 tokens). Offline we have an instruct LM
(`LMSummarizer`: any Hugging Face causal LM with a chat template, greedy) or no model at all
(`ExtractiveSummarizer`: picks the sentence that best represents its inputs).
"""

from __future__ import annotations

import re

from prunekit.errors import InputError, apply_chat_template

__all__ = ["Summarizer", "ExtractiveSummarizer", "LMSummarizer", "chat_generate", "split_sentences"]

_SENT = re.compile(r"(?<=[.!?])\s+")
_WORD = re.compile(r"[a-z0-9']+")
_STOP = frozenset(
    "a an the and or but if then so of to in on at by for with from as is are was were be been being it its this that "
    "these those i you he she we they me him her us them my your his our their what which who whom do does did have has "
    "had not no yes can could will would shall should may might must just also very too than there here about into "
    "over under up down out off again once only own same such both each few more most other some any all nor how why "
    "when where s t don ll re ve m d".split()
)


def split_sentences(text: str) -> list[str]:
    """Sentences at ``.``, ``!`` or ``?`` followed by white space (newlines also end one)."""
    out = []
    for line in text.splitlines():
        out.extend(s.strip() for s in _SENT.split(line) if s.strip())
    return out


def _content(sentence: str) -> list[str]:
    return [w for w in _WORD.findall(sentence.lower()) if w not in _STOP and len(w) > 1]


def _cut(sentence: str, max_words: int) -> str:
    words = sentence.split()
    return sentence if len(words) <= max_words else " ".join(words[:max_words])


def _check_words(max_words) -> int:
    if not isinstance(max_words, int) or isinstance(max_words, bool) or max_words < 1:
        raise InputError(f"max_words must be a positive integer, got {max_words!r}")
    return max_words


class Summarizer:
    """The interface: ``update(previous, turn, *, role) -> str`` and ``combine(summaries) -> str``, one sentence each."""

    def update(self, previous: str, turn: str, *, role: str = "user") -> str:
        raise NotImplementedError

    def combine(self, summaries: list[str]) -> str:
        raise NotImplementedError


class ExtractiveSummarizer(Summarizer):
    """The sentence that shares most content words with all the inputs, cut to `max_words` words.

    A sentence s scores ``sum over its distinct content words w of tf(w) / sqrt(|content(s)|)``, tf counted
    over every input; ties go to the later sentence (newer information). For ``update`` the inputs are the
    previous summary and the new turn, so a summary is replaced when a new sentence represents the two better.
    Needs no model; it cannot paraphrase or merge facts, which is what an LM summarizer is for.

    >>> ExtractiveSummarizer().update("", "Hi. My sister Ana lives in Lisbon and Ana loves Lisbon.")
    'My sister Ana lives in Lisbon and Ana loves Lisbon.'
    """

    def __init__(self, *, max_words: int = 40):
        self.max_words = _check_words(max_words)

    def _best(self, texts: list[str]) -> str:
        sentences = [s for t in texts if t for s in split_sentences(t)]
        if not sentences:
            return ""
        tf: dict[str, int] = {}
        for s in sentences:
            for w in _content(s):
                tf[w] = tf.get(w, 0) + 1
        best, best_score = sentences[-1], -1.0
        for s in sentences:
            words = set(_content(s))
            score = sum(tf[w] for w in words) / (len(words) ** 0.5) if words else 0.0
            if score >= best_score:
                best, best_score = s, score
        return _cut(best, self.max_words)

    def update(self, previous: str, turn: str, *, role: str = "user") -> str:
        return self._best([previous, turn])

    def combine(self, summaries: list[str]) -> str:
        return self._best(list(summaries))


def chat_ids(tokenizer, user: str, *, system: str | None = None):
    """The token ids ``[1, seq]`` a chat model is fed for one user message (its chat template, which may add a
    default system prompt; plain text if it has none)."""
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    if getattr(tokenizer, "chat_template", None):
        ids = apply_chat_template(tokenizer, messages, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)
        return ids["input_ids"]  # [1, seq]
    return tokenizer(((system + "\n\n") if system else "") + user + "\n", return_tensors="pt")["input_ids"]


def chat_overhead(tokenizer, *, system: str | None = None) -> int:
    """Tokens `chat_ids` adds around a user message (template markers, a default system prompt)."""
    probe = "Hello there."
    return int(chat_ids(tokenizer, probe, system=system).shape[1]) - len(
        tokenizer(probe, add_special_tokens=False)["input_ids"])


def chat_generate(model, tokenizer, user: str, *, system: str | None = None, max_new_tokens: int = 32) -> str:
    """Greedy reply of a chat model to one user message (its chat template; plain text if it has none)."""
    import torch

    from prunekit.text import check_generation_positions, check_vocab

    ids = chat_ids(tokenizer, user, system=system)  # [1, seq]
    check_vocab(model, ids, what="the prompt")
    check_generation_positions(model, ids.shape[1], max_new_tokens,
                               fix="lower the budget (--budget) or --max-new-tokens")
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    with torch.inference_mode():
        out = model.generate(ids.to(model.device), attention_mask=torch.ones_like(ids).to(model.device),
                             max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad)  # [1, seq + new]
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


class LMSummarizer(Summarizer):
    """One-sentence summaries from an instruct LM (chat template, greedy, at most `max_new_tokens`).

    Inputs longer than `max_input_words` words keep their end (the newest part). An empty reply keeps the
    previous summary (``update``) or falls back to the extractive choice (``combine``).
    """

    def __init__(self, model, tokenizer, *, max_new_tokens: int = 60, max_input_words: int = 400):
        if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
            raise InputError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
        self.model, self.tokenizer = model, tokenizer
        self.max_new_tokens = max_new_tokens
        self.max_input_words = _check_words(max_input_words)
        self._fallback = ExtractiveSummarizer()

    def _ask(self, body: str) -> str:
        words = body.split()
        if len(words) > self.max_input_words:
            body = " ".join(words[-self.max_input_words:])
        reply = chat_generate(self.model, self.tokenizer, body, max_new_tokens=self.max_new_tokens)
        first = split_sentences(reply)
        return first[0] if first else ""

    def update(self, previous: str, turn: str, *, role: str = "user") -> str:
        body = (f"Summary so far: {previous}\n" if previous else "") + f"New message from the {role}: {turn}\n\n" \
            "Write one sentence that summarizes the conversation so far, keeping names, numbers and facts."
        return self._ask(body) or previous or self._fallback.update("", turn)

    def combine(self, summaries: list[str]) -> str:
        listing = "\n".join(f"- {s}" for s in summaries if s)
        body = f"{listing}\n\nWrite one sentence that summarizes all of these points, keeping names and facts."
        return self._ask(body) or self._fallback.combine(summaries)
