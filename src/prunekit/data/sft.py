"""Supervised fine-tuning (SFT) of a causal LM on instruction/response pairs, with a data pruner as a plug-in.

The pieces, top to bottom:

- `read_sft` / `tokenize`: a JSONL file of ``{"instruction", "response"}`` objects (or Alpaca's, Dolly's and
  prompt/completion field names; see `read_sft`) becomes `Example` s: the
  prompt through the tokenizer's chat template (``user`` turn + generation prompt; a plain
  ``### Instruction / ### Response`` layout for tokenizers without a template), then the response and the
  end-of-turn token. Only response tokens (and that end token) are ever trained on.
- `token_stats`: one no-grad forward gives, at every target position t, the token's negative log-likelihood
  ``nll[t] = -log p(x_t | x_<t)`` and the predictive entropy ``H(p(. | x_<t))``; `response_stats` reduces them
  to a response perplexity and a mean entropy per example (the Error-Uncertainty plane of Q-Tuning).
- `Selection`: what a pruner returns: which samples stay (``keep_samples`` [N]) and which of their response
  tokens stay in the loss (``keep_tokens`` [N, T]).
- Pruners: `RandomPruner` (random samples, random tokens), `PerplexityPruner` (the highest-perplexity samples,
  random tokens), `RandomTokensPruner` (every sample, random tokens), and `prunekit.data.methods.qtuning.QTuning`.
  A pruner says when it runs: ``every="once"`` (static: scored once under the starting model), ``"epoch"``
  (re-scored over the whole set at each epoch start) or ``"batch"`` (re-scored per loaded batch under the current
  model, as Q-Tuning's reference does).
  Your own pruner is any object with ``every``, a ``select(*, nll, entropy, response)`` method returning a
  `Selection` (``response`` [N, T] marks each sample's response positions; ``nll`` and ``entropy`` [N, T] are
  `token_stats` under the current model when the pruner's ``needs_model`` is True, else None; ``needs_model``
  defaults to False) and, for ``every="batch"`` without ``load_batch``, a ``sample_ratio`` that sizes the loaded
  batch. Its selection is checked: the shapes must match and kept tokens must be response tokens of kept samples.
- `sft`: the training loop (LoRA by default, or every parameter); the loss is the mean token cross-entropy over
  the kept tokens of the kept samples.

What pruning saves, honestly: dropped samples are never forwarded in training (for ``every="batch"`` the whole
loaded batch is forwarded once without gradients to score it; `SFTReport.tokens_scored` counts that). Pruned
tokens inside a kept sample stay in the *input*, because a decoder-only model's later tokens attend to them and
removing them would change the context of the tokens that are kept; they only leave the loss, as in the
reference. The one exact physical saving at token level: positions after a row's last kept target are cut from
the forward (causal attention: nothing before them depends on them). `SFTReport.tokens_forward` counts the
positions the training forwards really ran.

>>> from prunekit.data.sft import Selection
>>> import numpy as np
>>> s = Selection(keep_samples=np.array([True, False]), keep_tokens=np.array([[0, 1, 1], [0, 0, 0]], bool))
>>> s.samples, s.tokens
(1, 2)
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from prunekit.errors import (InputError, apply_chat_template, check_model, check_seed, int_at_least, is_real,
                             module_modes, restore_modes, with_autograd)
from prunekit.speed import forward_takes
from prunekit.weights.io import check_finite_weights

__all__ = [
    "Example", "Selection", "SFTReport", "read_sft", "sft_pair", "tokenize", "pad", "token_stats", "score_examples",
    "response_stats", "check_ratio", "FixedSelection", "RandomPruner", "PerplexityPruner", "RandomTokensPruner", "sft",
    "generate", "response_perplexity",
]

_FALLBACK = "### Instruction:\n{instruction}\n\n### Response:\n"
EVERY = ("once", "epoch", "batch")


@dataclass
class Example:
    """One tokenized pair: ``ids`` = prompt + response (+ end token); the first ``prompt_len`` are the prompt."""

    ids: list[int]
    prompt_len: int
    index: int = 0  # position in the source data
    cut: str | None = None  # "prompt", "response" or "both" when `tokenize` shortened the pair to max_length

    @property
    def response_len(self) -> int:
        return len(self.ids) - self.prompt_len


@dataclass
class Selection:
    """A pruner's answer over N samples padded to T positions (position t = token ids[t] as a target).

    ``keep_tokens[i]`` is a subset of sample i's response positions and all False for a dropped sample.
    ``quadrant`` (1-4, Q-Tuning only; 0 = none), ``ppl``, ``entropy`` and ``placed_by`` (how Q-Tuning gave
    the quadrant: "thresholds", "top-up" or "midlines", see `qtuning.Quadrants`) are per-sample diagnostics."""

    keep_samples: np.ndarray  # [N] bool
    keep_tokens: np.ndarray  # [N, T] bool
    quadrant: np.ndarray | None = None  # [N] int8
    ppl: np.ndarray | None = None  # [N] float64
    entropy: np.ndarray | None = None  # [N] float64
    info: dict = field(default_factory=dict)
    placed_by: np.ndarray | None = None  # [N] str

    @property
    def samples(self) -> int:
        return int(self.keep_samples.sum())

    @property
    def tokens(self) -> int:
        return int(self.keep_tokens.sum())


@dataclass
class SFTReport:
    """What `sft` cost: steps, samples and tokens trained on, positions forwarded and scored, seconds, selections."""
    steps: int = 0
    samples_trained: int = 0  # sample visits that contributed to a loss (over all epochs)
    tokens_trained: int = 0  # loss tokens over all steps
    tokens_forward: int = 0  # positions the training forwards ran (with gradients)
    tokens_scored: int = 0  # positions forwarded without gradients to score data (pruners that need the model)
    seconds: float = 0.0
    losses: list[float] = field(default_factory=list)
    selections: list[Selection] = field(default_factory=list)  # epoch-level selections (every="once"/"epoch")


# ----------------------------------------------------------------------------------------------- data in
def check_ratio(value, name: str) -> float:
    """A fraction kept, in (0, 1]."""
    if not is_real(value) or not 0 < value <= 1:
        raise InputError(f"{name} is the fraction kept and must be in (0, 1], got {value!r}")
    return float(value)



def _check_number(value, name: str, *, low: float, strict: bool, hint: str = "") -> float:
    """`value` as a float if it is a finite number above `low` (``strict``) or at least `low`; else `InputError`."""
    if not is_real(value) or (value <= low if strict else value < low):
        raise InputError(f"{name} must be a finite number {'>' if strict else '>='} {low}{hint}, got {value!r}")
    return float(value)


def _check_examples(examples, pad_id, model: nn.Module) -> None:
    """Refuse an empty or malformed list of `Example` s, and a `pad_id` or token id outside `model`'s embedding:
    a bad id would fail deep in the forward pass (or read out of bounds on a GPU)."""
    if isinstance(examples, (str, dict, Example)) or not examples:
        raise InputError("no examples given; pass a non-empty list of Example (see tokenize)")
    check_model(model, "Q-Tuning scoring and SFT")
    vocab = model.get_input_embeddings().num_embeddings
    if isinstance(pad_id, bool) or not isinstance(pad_id, (int, np.integer)) or not 0 <= pad_id < vocab:
        raise InputError(f"pad_id must be a token id in the model's vocabulary [0, {vocab}), got {pad_id!r}")
    low, high = vocab, -1
    for i, e in enumerate(examples):
        if not isinstance(e, Example) or not e.ids or not 0 <= e.prompt_len < len(e.ids):
            raise InputError(f"example {i} must be an Example with ids and 0 <= prompt_len < len(ids) (see tokenize)")
        low, high = min(low, min(e.ids)), max(high, max(e.ids))
    if low < 0 or high >= vocab:
        raise InputError(f"token ids run {low}..{high}, outside the model's vocabulary [0, {vocab}); "
                         "tokenize with the model's own tokenizer")
    from prunekit.text import check_positions

    longest = max(range(len(examples)), key=lambda i: len(examples[i].ids))
    check_positions(model, len(examples[longest].ids), what=f"example {longest}'s prompt and response",
                    fix="lower --max-length (tokenize's max_length=)")


# the field names instruction sets use (Alpaca: instruction/input/output; Dolly: instruction/context/response;
# OpenAI-style: prompt/completion), each mapped to ours; the input or context is appended to the instruction
_INSTRUCTION_KEYS = ("instruction", "prompt")
_RESPONSE_KEYS = ("response", "output", "completion")
_INPUT_KEYS = ("input", "context")
_SHAPE = ('{"instruction": "...", "response": "..."} (also "output" or "completion" for the response, "prompt" '
          'for the instruction, an "input" or "context" appended to the instruction, or "messages": one user and '
          'one assistant turn)')


def _field(record: dict, keys: tuple[str, ...], what: str, *, required: bool) -> str | None:
    present = [k for k in keys if k in record and record[k] is not None and record[k] != ""]
    if len(present) > 1:
        raise InputError(f"fields {' and '.join(map(repr, present))} both give the {what}; keep one")
    if not present:
        if required:
            raise InputError(f"no {what} field ({', '.join(map(repr, keys))}) with a non-empty string")
        return None
    value = record[present[0]]
    if not isinstance(value, str) or not value.strip():
        must = "a non-empty string" if required else 'a non-blank string, or "" / null for none (as Alpaca\'s)'
        raise InputError(f"field {present[0]!r} (the {what}) must be {must}, got {value!r}")
    return value


def _chat_pair(messages) -> tuple[str, str]:
    """A single-turn chat: ``[{"role": "user", ...}, {"role": "assistant", ...}]``."""
    turns = [(m.get("role"), m.get("content")) if isinstance(m, dict) else (None, None) for m in messages]
    if [r for r, _ in turns] != ["user", "assistant"]:
        raise InputError(f"'messages' must be one user turn then one assistant turn, got roles "
                         f"{[r for r, _ in turns]}; prunekit's SFT takes single-turn pairs (put a system prompt "
                         "into the user turn, or split a conversation into pairs)")
    for role, content in turns:
        if not isinstance(content, str) or not content.strip():
            raise InputError(f"the {role} turn's 'content' must be a non-empty string, got {content!r}")
    return turns[0][1], turns[1][1]


def sft_pair(record: dict) -> tuple[str, str]:
    """``(instruction, response)`` of one record in any of the accepted shapes (see `read_sft`); an ``input`` or
    ``context`` field is appended to the instruction after a blank line (Alpaca's and Dolly's layouts)."""
    if not isinstance(record, dict):
        raise InputError(f"an example must be a JSON object {_SHAPE}, got {type(record).__name__}")
    if "messages" in record:
        others = [k for k in _INSTRUCTION_KEYS + _RESPONSE_KEYS + _INPUT_KEYS if k in record]
        if others or not isinstance(record["messages"], list):
            raise InputError("'messages' must be a list of {role, content} turns, without instruction/response fields"
                             if not others else f"give either 'messages' or {others[0]!r}, not both")
        return _chat_pair(record["messages"])
    instruction = _field(record, _INSTRUCTION_KEYS, "instruction", required=True)
    extra = _field(record, _INPUT_KEYS, "input", required=False)
    response = _field(record, _RESPONSE_KEYS, "response", required=True)
    return (instruction if extra is None else f"{instruction}\n\n{extra}"), response


def read_sft(path: str | os.PathLike) -> list[dict]:
    """The records of a JSONL file of instruction/response pairs, as given (other keys kept). Accepted shapes:
    ``instruction``/``response`` (ours), Alpaca's ``instruction``/``input``/``output``, Dolly's
    ``instruction``/``context``/``response``, ``prompt``/``completion`` and a single-turn chat ``messages``
    (``[{"role": "user", ...}, {"role": "assistant", ...}]``); `sft_pair` reads any of them."""
    return [obj for _, obj in read_sft_lines(path)]


def read_sft_lines(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """`read_sft`'s records with the line number (from 1) each came from, for messages that name the line."""
    from prunekit.jsonl import read_objects

    rows = read_objects(path, shape=_SHAPE)
    if not rows:
        raise InputError(f"{path} holds no examples; give one {_SHAPE} per line")
    out = []
    for no, obj in rows:
        try:
            sft_pair(obj)
        except InputError as e:
            raise InputError(f"{path}:{no}: {e}; each line must be {_SHAPE}") from None
        out.append((no, obj))
    return out


def prompt_text(tokenizer, instruction: str) -> str:
    """The prompt a model sees: its chat template's user turn + generation prompt, or a plain layout."""
    if getattr(tokenizer, "chat_template", None):
        return apply_chat_template(tokenizer, [{"role": "user", "content": instruction}], tokenize=False,
                                   add_generation_prompt=True)
    return _FALLBACK.format(instruction=instruction)


def _end_id(tokenizer) -> int:
    if tokenizer.eos_token_id is None:
        raise InputError("the tokenizer has no eos token; SFT needs one to end each response")
    return int(tokenizer.eos_token_id)


def tokenize(records: list[dict], tokenizer, *, max_length: int = 128) -> list[Example]:
    """`Example` s for ``records`` (any shape `sft_pair` reads). A pair longer than `max_length` tokens loses
    prompt tokens from the left first (the instruction's end is nearest the answer), down to half the length,
    then response tokens from the right (its end token too); `Example.cut` records which."""
    int_at_least(max_length, "max_length", 4)
    if not records:
        raise InputError("no examples given; SFT needs at least one instruction/response pair")
    end = _end_id(tokenizer)
    out = []
    for i, r in enumerate(records):
        try:
            instruction, response = sft_pair(r)
        except InputError as e:
            raise InputError(f"example {i}: {e}") from None
        p = tokenizer(prompt_text(tokenizer, instruction), add_special_tokens=False)["input_ids"]
        a = tokenizer(response, add_special_tokens=False)["input_ids"] + [end]
        cut = None
        if len(p) + len(a) > max_length:
            room = max_length - len(a)
            if room >= max(1, max_length // 2):
                p, cut = p[len(p) - room:], "prompt"
            else:
                both = len(p) > max_length // 2  # the prompt loses its left end too (it said "response" alone)
                p = p[max(0, len(p) - max_length // 2):]  # a prompt under half stays whole
                a, cut = a[: max_length - len(p)], "both" if both else "response"
        out.append(Example(ids=list(p) + list(a), prompt_len=len(p), index=i, cut=cut))
    return out


def pad(examples: list[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Right-padded ``(ids [B, T], attention [B, T] bool, response [B, T] bool)``."""
    if not examples:
        raise InputError("no examples given; pad needs at least one Example")
    t = max(len(e.ids) for e in examples)
    ids = torch.full((len(examples), t), pad_id, dtype=torch.long)  # [B, T]
    attn = torch.zeros((len(examples), t), dtype=torch.bool)  # [B, T]
    resp = torch.zeros((len(examples), t), dtype=torch.bool)  # [B, T]
    for b, e in enumerate(examples):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        attn[b, : len(e.ids)] = True
        resp[b, e.prompt_len: len(e.ids)] = True
    return ids, attn, resp


def _pad_id(tokenizer_or_id) -> int:
    if isinstance(tokenizer_or_id, int):
        return tokenizer_or_id
    tid = tokenizer_or_id.pad_token_id
    return int(tid if tid is not None else tokenizer_or_id.eos_token_id)


# ---------------------------------------------------------------------------------------- the EU plane
def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def token_stats(model: nn.Module, ids: torch.Tensor, attn: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(nll [B, T], entropy [B, T])`` float32 under `model`: at target position t >= 1, ``-log p(ids[t] | ids[<t])``
    and the entropy of ``p(. | ids[<t])``; position 0 (no context) and padding are 0."""
    dev = _device(model)
    no_cache = {"use_cache": False} if forward_takes(type(model), "use_cache") else {}  # no KV cache to build
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev).long(), **no_cache).logits  # [B, T, V]
    target = ids[:, 1:].to(dev)  # [B, T-1]
    nll = torch.empty(target.shape, device=dev)
    ent = torch.empty(target.shape, device=dev)
    for r in range(ids.shape[0]):  # one sequence's [T-1, V] temporaries at a time, not the batch's (~3 GB less at 8)
        logp = torch.log_softmax(logits[r, :-1].float(), dim=-1)  # [T-1, V]
        nll[r] = -logp.gather(-1, target[r, :, None]).squeeze(-1)
        ent[r] = -(logp.exp().mul_(logp)).sum(-1)
        del logp
    del logits
    valid = attn[:, 1:].to(dev)  # [B, T-1]
    zero = torch.zeros(ids.shape[0], 1, device=dev)
    return (torch.cat([zero, nll * valid], 1).cpu(), torch.cat([zero, ent * valid], 1).cpu())  # [B, T] each


def score_examples(model: nn.Module, examples: list[Example], *, pad_id: int, batch_size: int = 8,
                   progress: bool = False) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`token_stats` over every example, padded to the longest: ``(nll [N, T], entropy [N, T], response [N, T])``."""
    check_model(model, "Q-Tuning scoring")
    check_finite_weights(model, "the model")  # a NaN weight scored 87% of the tokens NaN
    return _score(model, examples, pad_id=pad_id, batch_size=batch_size, progress=progress)


def _score(model: nn.Module, examples: list[Example], *, pad_id: int, batch_size: int,
           progress: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """`score_examples` without the scan of the weights: SFT's re-scoring of each loaded batch (checked once)."""
    int_at_least(batch_size, "batch_size", 1)
    _check_examples(examples, pad_id, model)
    t = max(len(e.ids) for e in examples)
    n = len(examples)
    nll, ent, resp = np.zeros((n, t), np.float64), np.zeros((n, t), np.float64), np.zeros((n, t), bool)
    was_training = module_modes(model)
    model.eval()
    order = sorted(range(n), key=lambda i: len(examples[i].ids))  # batches of similar length waste less padding
    starts = range(0, n, batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="scoring", leave=False)
    try:
        for s in starts:
            rows = order[s: s + batch_size]
            ids, attn, r = pad([examples[i] for i in rows], pad_id)
            a, b = token_stats(model, ids, attn)
            w = ids.shape[1]
            nll[rows, :w], ent[rows, :w], resp[rows, :w] = a.double().numpy(), b.double().numpy(), r.numpy()
    finally:  # the caller's mode, also after an error or Ctrl-C
        restore_modes(was_training)
    return nll, ent, resp


def response_stats(nll: np.ndarray, entropy: np.ndarray, response: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sample: response perplexity ``exp(mean nll)`` and mean predictive entropy over the response positions."""
    count = np.maximum(response.sum(1), 1)  # [N]
    mean_nll = (nll * response).sum(1) / count  # [N]
    over = np.flatnonzero(mean_nll > np.log(np.finfo(np.float64).max))
    if len(over):  # exp overflowed (a warning), then "ppl has infinite values; fix those examples" blamed the data
        i = int(over[0])
        raise InputError(f"the model's mean loss on the response of sample {i} is {mean_nll[i]:.4g} nats (and on "
                         f"{len(over)} sample(s) past 709.8), a perplexity past float64's range: the model is far "
                         "off this data (untrained, or broken weights?); check the model")
    ppl = np.exp(mean_nll)  # [N]
    ent = (entropy * response).sum(1) / count  # [N]
    return ppl, ent


# --------------------------------------------------------------------------------------------- pruners
def drop_tokens(keep_tokens: np.ndarray, candidates: np.ndarray, n_drop: int, *, scores: np.ndarray | None = None,
                rng: np.random.Generator | None = None) -> np.ndarray:
    """``keep_tokens`` [N, T] with ``n_drop`` of the True ``candidates`` positions set False: the highest
    ``scores`` (ties: lower flat index first), or uniformly at random with ``rng``. Never more than the candidates."""
    flat = np.flatnonzero(candidates & keep_tokens)
    n_drop = int(min(max(n_drop, 0), flat.size))
    out = keep_tokens.copy()
    if n_drop == 0:
        return out
    if scores is not None:
        order = np.argsort(-scores.reshape(-1)[flat], kind="stable")
        chosen = flat[order[:n_drop]]
    else:
        chosen = rng.choice(flat, size=n_drop, replace=False)
    out.reshape(-1)[chosen] = False
    return out


def samples_for(n: int, ratio: float) -> int:
    """How many of `n` samples a sample ratio keeps: ``round(n * ratio)``, at least 1."""
    return min(n, max(1, int(round(n * ratio))))


def token_budget_selection(keep_samples: np.ndarray, response: np.ndarray, token_ratio: float,
                           rng: np.random.Generator) -> np.ndarray:
    """Kept samples' response positions, less ``round((1 - token_ratio) * their count)`` of them, dropped at
    random."""
    keep = response & keep_samples[:, None]  # [N, T]
    n_drop = int(round((1.0 - token_ratio) * keep.sum()))
    return drop_tokens(keep, keep, n_drop, rng=rng)


class _Pruner:
    needs_model = False
    name = "pruner"

    def __init__(self, *, sample_ratio: float = 1.0, token_ratio: float = 1.0, every: str = "once", seed: int = 0):
        self.sample_ratio = check_ratio(sample_ratio, "sample_ratio")
        self.token_ratio = check_ratio(token_ratio, "token_ratio")
        if every not in EVERY:
            raise InputError(f"every must be one of {', '.join(EVERY)}, got {every!r}")
        self.every = every
        self.rng = np.random.default_rng(check_seed(seed))

    def __repr__(self) -> str:
        return f"{type(self).__name__}(sample_ratio={self.sample_ratio}, token_ratio={self.token_ratio}, every={self.every!r})"


class FixedSelection:
    """A selection made beforehand (say by `qtuning_select` under the starting model), applied once: static mode
    without a second scoring pass."""

    needs_model = False
    every = "once"
    name = "fixed"

    def __init__(self, selection: Selection):
        if not isinstance(selection, Selection):
            raise InputError(f"FixedSelection takes a Selection, got {type(selection).__name__}")
        self.selection = selection

    def select(self, *, response: np.ndarray, **_) -> Selection:
        if self.selection.keep_tokens.shape[0] != response.shape[0]:
            raise InputError(f"the selection covers {self.selection.keep_tokens.shape[0]} samples but the data has "
                             f"{response.shape[0]}")
        return self.selection


class RandomPruner(_Pruner):
    """Baseline: ``round(N * sample_ratio)`` samples at random, then ``token_ratio`` of their response tokens at random."""

    name = "random"

    def select(self, *, response: np.ndarray, **_) -> Selection:
        n = response.shape[0]
        keep = np.zeros(n, bool)
        keep[self.rng.choice(n, samples_for(n, self.sample_ratio), replace=False)] = True
        return Selection(keep, token_budget_selection(keep, response, self.token_ratio, self.rng))


class RandomTokensPruner(_Pruner):
    """Baseline: every sample, ``sample_ratio * token_ratio`` of all response tokens at random (the same token budget
    as the sample-level methods, spread over all samples)."""

    name = "random_tokens"

    def select(self, *, response: np.ndarray, **_) -> Selection:
        keep = response.any(1)
        ratio = self.sample_ratio * self.token_ratio
        return Selection(keep, token_budget_selection(keep, response, ratio, self.rng))


class PerplexityPruner(_Pruner):
    """Baseline: the ``round(N * sample_ratio)`` samples of highest response perplexity (the hardest under the
    current model), then ``token_ratio`` of their response tokens at random."""

    name = "ppl"
    needs_model = True

    def select(self, *, nll: np.ndarray, entropy: np.ndarray, response: np.ndarray, **_) -> Selection:
        ppl, ent = response_stats(nll, entropy, response)
        keep = np.zeros(len(ppl), bool)
        keep[np.argsort(-ppl, kind="stable")[: samples_for(len(ppl), self.sample_ratio)]] = True
        return Selection(keep, token_budget_selection(keep, response, self.token_ratio, self.rng), ppl=ppl, entropy=ent)


# ------------------------------------------------------------------------------------------- training
def _select(pruner, model, examples, pad_id, batch_size, report: SFTReport, progress: bool) -> Selection:
    if getattr(pruner, "needs_model", False):
        nll, ent, resp = _score(model, examples, pad_id=pad_id, batch_size=batch_size, progress=progress)
        report.tokens_scored += sum(len(e.ids) for e in examples)
        if report.steps and not (np.isfinite(nll).all() and np.isfinite(ent).all()):
            raise _diverged(report.steps)  # the examples scored fine before the steps: not "fix those examples"
    else:
        t = max(len(e.ids) for e in examples)
        resp = np.zeros((len(examples), t), bool)
        for i, e in enumerate(examples):
            resp[i, e.prompt_len: len(e.ids)] = True
        nll = ent = None
    return _checked(pruner.select(nll=nll, entropy=ent, response=resp), resp, pruner)


def _checked(sel, response: np.ndarray, pruner) -> Selection:
    """`sel` if it is a `Selection` over these samples whose kept tokens are response tokens of kept samples.
    (A pruner's prompt positions in the loss trained on the prompt; a mask of the wrong width was cut or padded.)"""
    who = f"pruner {type(pruner).__name__}"
    if not isinstance(sel, Selection):
        raise InputError(f"{who}: select() must return a Selection, got {type(sel).__name__}")
    n, t = response.shape
    ks, kt = np.asarray(sel.keep_samples), np.asarray(sel.keep_tokens)
    if ks.dtype != bool or kt.dtype != bool or ks.shape != (n,) or kt.shape != (n, t):
        raise InputError(f"{who}: the selection must be boolean keep_samples [{n}] and keep_tokens [{n}, {t}] (the "
                         f"samples padded to their longest), got {ks.dtype} {list(ks.shape)} and {kt.dtype} "
                         f"{list(kt.shape)}")
    outside = kt & ~(response & ks[:, None])
    if outside.any():
        i, j = np.argwhere(outside)[0]
        what = "a prompt or padding position" if ks[i] else "a dropped sample"
        raise InputError(f"{who}: keep_tokens marks {int(outside.sum())} position(s) that are not response tokens "
                         f"of kept samples (first: sample {i}, position {j}, {what}); only response tokens of kept "
                         "samples may be trained on")
    return sel


def _diverged(steps: int) -> InputError:
    if not steps:  # nothing was trained yet: not the learning rate
        return InputError("the training loss is NaN/Inf before any optimizer step: the model's activations overflow "
                          "on these examples (check its dtype and weights)")
    return InputError(f"fine-tuning diverged: the model gives NaN/Inf after {steps} optimizer steps; lower the "
                      "learning rate (--lr)")


def _step(model, batch: list[Example], masks: list[np.ndarray], pad_id: int, opt, params, max_grad_norm,
          report: SFTReport) -> None:
    """One optimizer step on `batch`, the loss over the True positions of each example's mask [len(ids)]."""
    ids, attn, _ = pad(batch, pad_id)
    train = torch.zeros_like(attn)  # [B, T]
    for b, m in enumerate(masks):
        train[b, : len(m)] = torch.from_numpy(m[: ids.shape[1]])
    train[:, 0] = False  # position 0 has no context to predict it from
    n_tok = int(train.sum())
    if n_tok == 0:
        return
    last = int(train.nonzero()[:, 1].max()) + 1  # positions after the last target change no kept loss term
    ids, attn, train = ids[:, :last], attn[:, :last], train[:, :last]
    dev = _device(model)
    logits = model(input_ids=ids.to(dev), attention_mask=attn.to(dev).long()).logits[:, :-1]  # [B, T-1, V]
    target = ids[:, 1:].to(dev).masked_fill(~train[:, 1:].to(dev), -100)  # [B, T-1]
    loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), target.reshape(-1), ignore_index=-100,
                           reduction="sum") / n_tok
    if not torch.isfinite(loss):
        raise _diverged(report.steps)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if max_grad_norm is not None:
        torch.nn.utils.clip_grad_norm_(params, max_grad_norm)
    opt.step()
    report.steps += 1
    report.samples_trained += int(train.any(1).sum())
    report.tokens_trained += n_tok
    report.tokens_forward += int(attn.sum())
    report.losses.append(loss.item())


@with_autograd
def sft(model: nn.Module, examples: list[Example], *, pad_id: int, pruner=None, epochs: int = 1,
        batch_size: int = 8, load_batch: int | None = None, lr: float = 2e-4, weight_decay: float = 0.0,
        lora_rank: int | None = 8, lora_alpha: float = 16.0, max_grad_norm: float | None = 1.0, seed: int = 0,
        progress: bool = True) -> SFTReport:
    """Fine-tune `model` in place on `examples` (AdamW, constant `lr`, response tokens only) and return what it
    cost. ``lora_rank=None`` trains every parameter; otherwise LoRA adapters of that rank go on every Linear but
    ``lm_head`` (an existing set of adapters is reused). `pruner` (optional) picks samples and loss tokens:
    once before training, at each epoch start, or per loaded batch of `load_batch` examples (default
    ``round(batch_size / sample_ratio)``, so the kept rows make a training batch of about `batch_size`, the same
    as the other modes'); only the kept rows are forwarded with gradients. The model is left in eval mode, as
    `prunekit.train.train` leaves its model. A float16 model trains on float32 copies of its parameters (AdamW
    cannot step in float16) and gets the trained values back in float16."""
    from prunekit.lora import LoRALinear, add_lora, lora_parameters
    from prunekit.weights.engine import refuse_factorized

    # every argument is checked here, before LoRA goes into the caller's model
    int_at_least(epochs, "epochs", 1)
    int_at_least(batch_size, "batch_size", 1)
    if not examples:
        raise InputError("no examples given; SFT needs at least one")
    if load_batch is not None:
        int_at_least(load_batch, "load_batch", 1)
    lr = _check_number(lr, "lr", low=0.0, strict=True)
    weight_decay = _check_number(weight_decay, "weight_decay", low=0.0, strict=False)
    if lora_rank is not None:
        int_at_least(lora_rank, "lora_rank", 1, hint=" (None: train every parameter)")
        lora_alpha = _check_number(lora_alpha, "lora_alpha", low=0.0, strict=True)
    if max_grad_norm is not None:
        max_grad_norm = _check_number(max_grad_norm, "max_grad_norm", low=0.0, strict=True, hint=" (None: no clipping)")
    seed = check_seed(seed)
    _check_examples(examples, pad_id, model)
    check_finite_weights(model, "the model")  # a NaN model was trained on (once here, not per re-scored batch)
    if pruner is not None and not hasattr(pruner, "select"):
        raise InputError(f"pruner must have a select(...) method (a prunekit pruner), got {type(pruner).__name__}")
    if pruner is not None and getattr(pruner, "every", None) not in EVERY:
        raise InputError(f"pruner.every must be one of {', '.join(EVERY)}, got {getattr(pruner, 'every', None)!r}")
    if pruner is not None and pruner.every == "batch" and load_batch is None:
        if not hasattr(pruner, "sample_ratio"):
            raise InputError(f"a per-batch pruner ({type(pruner).__name__}) needs a sample_ratio attribute to size "
                             "the loaded batch, or pass load_batch")
        check_ratio(pruner.sample_ratio, "pruner.sample_ratio")
    refuse_factorized(model, "fine-tuning", "fine-tune the dense model, then prune it with ARMOR")
    # float16 parameters train on float32 copies (AdamW's second moment and eps round to 0 in float16: a step of
    # inf at any learning rate); each gets its trained value back in float16, new LoRA adapters their base's dtype
    half = [p for p in model.parameters() if p.dtype == torch.float16]
    for p in half:
        p.data = p.data.float()
    try:
        if lora_rank is not None:
            if not any(isinstance(m, LoRALinear) for m in model.modules()):
                add_lora(model, rank=lora_rank, alpha=lora_alpha, seed=seed)
            params = lora_parameters(model)
        else:
            params = [p for p in model.parameters()]
            for p in params:
                p.requires_grad_(True)
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        gen = torch.Generator().manual_seed(seed)
        report = SFTReport()
        start = time.perf_counter()
        selection = None
        masks_all = [np.arange(len(e.ids)) >= e.prompt_len for e in examples]  # response positions
        for epoch in range(epochs):
            pool = list(range(len(examples)))
            masks = masks_all
            if pruner is not None and pruner.every in ("once", "epoch"):
                if selection is None or pruner.every == "epoch":
                    selection = _select(pruner, model, examples, pad_id, batch_size, report, progress)
                    report.selections.append(selection)
                pool = [i for i in pool if selection.keep_samples[i]]
                masks = [selection.keep_tokens[i, : len(e.ids)] for i, e in enumerate(examples)]
            order = [pool[j] for j in torch.randperm(len(pool), generator=gen).tolist()]
            per_batch = pruner is not None and pruner.every == "batch"
            step = batch_size
            if per_batch:
                step = load_batch or max(batch_size, int(round(batch_size / pruner.sample_ratio)))
            starts = range(0, len(order), step)
            if progress:
                from tqdm.auto import tqdm

                starts = tqdm(starts, desc=f"sft epoch {epoch + 1}/{epochs}", leave=False)
            model.train()
            for s in starts:
                rows = order[s: s + step]
                batch = [examples[i] for i in rows]
                if per_batch:
                    model.eval()
                    sel = _select(pruner, model, batch, pad_id, batch_size, report, False)
                    model.train()
                    kept = np.flatnonzero(sel.keep_samples)
                    _step(model, [batch[k] for k in kept], [sel.keep_tokens[k, : len(batch[k].ids)] for k in kept],
                          pad_id, opt, params, max_grad_norm, report)
                else:
                    _step(model, batch, [masks[i] for i in rows], pad_id, opt, params, max_grad_norm, report)
        model.eval()
        for p in params:
            p.grad = None
        if not all(bool(torch.isfinite(p).all()) for p in params):  # the last step's update, no loss after it
            raise _diverged(report.steps)
    finally:
        for p in half:
            p.data = p.data.half()
        for m in model.modules() if half else ():
            if isinstance(m, LoRALinear):
                for p in (m.lora_a, m.lora_b):
                    p.data = p.data.to(m.base.weight.dtype)
    if half and not all(bool(torch.isfinite(p).all()) for p in params):  # a trained value past float16's range
        raise _diverged(report.steps)
    report.seconds = time.perf_counter() - start
    return report


# -------------------------------------------------------------------------------------------- evaluation
@torch.no_grad()
def response_perplexity(model: nn.Module, examples: list[Example], *, pad_id: int, batch_size: int = 8) -> float:
    """Token-weighted perplexity of the responses (and end tokens) given their prompts."""
    nll, ent, resp = score_examples(model, examples, pad_id=pad_id, batch_size=batch_size)
    return float(np.exp((nll * resp).sum() / max(resp.sum(), 1)))


@torch.no_grad()
def generate(model: nn.Module, tokenizer, instructions: list[str], *, max_new_tokens: int = 24,
             batch_size: int = 8, progress: bool = False) -> list[str]:
    """Greedy responses to `instructions` (prompts as in training), batched with left padding."""
    if isinstance(instructions, (str, bytes)) or not all(isinstance(x, str) for x in instructions):
        raise InputError("instructions must be a list of strings; for one instruction pass a list of one")
    int_at_least(max_new_tokens, "max_new_tokens", 1)
    int_at_least(batch_size, "batch_size", 1)
    dev = _device(model)
    end = _end_id(tokenizer)
    pad_id = _pad_id(tokenizer)
    out: list[str] = []
    starts = range(0, len(instructions), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc="generate", leave=False)
    for s in starts:
        prompts = [tokenizer(prompt_text(tokenizer, x), add_special_tokens=False)["input_ids"]
                   for x in instructions[s: s + batch_size]]
        t = max(map(len, prompts))
        ids = torch.tensor([[pad_id] * (t - len(p)) + p for p in prompts])  # [B, T]
        attn = torch.tensor([[0] * (t - len(p)) + [1] * len(p) for p in prompts])  # [B, T]
        gen = model.generate(input_ids=ids.to(dev), attention_mask=attn.to(dev), max_new_tokens=max_new_tokens,
                             do_sample=False, eos_token_id=end, pad_token_id=pad_id)
        for row in gen[:, t:].tolist():
            if end in row:
                row = row[: row.index(end)]
            out.append(tokenizer.decode(row, skip_special_tokens=True))
    return out
