"""Sample reasoning paths from a Hugging Face causal LM, with the log-probability of every sampled token.

`sample_paths` draws `n` completions per question and records, per path, the text, the answer an extractor
pulls out of it, and the per-token log-probabilities the voting rules of `prunekit.inference.reasoning`
need (RPC's path probability is ``exp(mean(logprobs))``).

How it samples (one question at a time, all `n` paths in one batch):
  1. the prompt (the tokenizer's chat template when it has one, else plain text) is run once, batch 1;
  2. its KV cache is repeated `n` times, so the prompt is never recomputed per path;
  3. each step draws x_t ~ softmax(z_t / T) with a seeded `torch.Generator` (pure temperature sampling: no
     top-k / top-p, so the recorded value is the log-probability under the distribution actually sampled
     from), and records log softmax(z_t / T)[x_t] <= 0;
  4. a path stops at an end token, the tokenizer's EOS or one of the model's ``generation_config.eos_token_id``
     (a chat model's end-of-turn, as `generate` stops), kept as its last token and counted in the log-probs
     like generate's scores, or at `max_new_tokens`; finished paths are dropped from the batch and the cache
     (`DynamicCache.batch_select_indices`), so short answers cost only their own length.
The temperature matters: the log-probs are of the *tempered* distribution (T = 1 gives the model's own).
The reference code (WNJXYK/RPC) ships no sampler; its released paths carry a ``mean_logprob`` per path
from the sampling engine, which is what ``exp(mean(logprobs))`` reproduces here.

Seeding: question i uses a generator seeded with ``seed * 1_000_003 + i`` (i = its index in the list plus
`start`), so a question's paths do not depend on which other questions were sampled in the same call; a
resumed run gives the same paths as an uninterrupted one.
"""

from __future__ import annotations

import inspect
import os
import re
import tempfile
from pathlib import Path
from typing import Callable, Iterable

from prunekit import jsonl
from prunekit.errors import InputError, apply_chat_template, apply_umask, follow_link, hidden_name, place_file

__all__ = ["DEFAULT_INSTRUCTION", "extract_answer", "build_prompt", "sample_paths", "sample_question"]

DEFAULT_INSTRUCTION = "Solve the problem. Think step by step, briefly, and end with 'The answer is N.'"

# digits with thousands grouped by commas ("1,200", not "3,5" or "1,2000", which read as the number before the
# comma), decimals and an exponent
_NUMBER = r"-?(?:\d{1,3}(?:,\d{3})+(?!\d)|\d+)(?:\.\d+)?(?:[eE][+-]?\d+)?"
# "answer is 5", "answer: 5", "answer is: 5", "answer = 5", "answer is indeed $\boxed{5}$"
_FILLER = r"(?:(?:indeed|actually|therefore|thus|then|just|simply|exactly|still|clearly|now|also|so)\b[\s,]*)*"
# one whitespace run between "answer is" and the number (three in a row took cubic time on a run of spaces)
_ANSWER_IS = re.compile(r"answer\s*(?:is|:|=)[\s,:]*" + _FILLER + r"(?:\$\s*)?\\?(?:boxed\{\s*)?(" + _NUMBER + ")",
                        re.IGNORECASE)
# arithmetic right after the stated number, on its line: "the answer is simply 3 x 4 = 12" states 12, "the answer
# is 2^3 = 8" states 8, "the answer is 2 + 3, which equals 5" states 5. It starts with an operator: "the answer
# is 8 = 5 + 3" states 8, its justification after it
_OPERATOR = r"(?:\*\*|[-+*/×÷xX·^]|\\times|\\cdot)"
# (no whitespace of its own before "which": a run of spaces matched by two stars in a row took quadratic time)
_RESULT = r"(?:=|\bequals\b|\bis equal to\b|(?:,[ \t]*)?\b(?:which|that)[ \t]+(?:is|equals|gives|makes)\b)"
_CHAIN = re.compile(r"[ \t]*" + _OPERATOR + r"[ \t]*" + _NUMBER
                    + r"(?:[ \t]*(?:" + _OPERATOR + r"|" + _RESULT + r")[ \t]*" + _NUMBER + ")*")
# a denominator: "/4" of "3/4" (not of "3/4.5")
_OVER = r"[ \t]*/[ \t]*(\d+)(?!\.?\d)"
# a result and its number, a fraction whole: "= 3/4" states 3/4
_AFTER_RESULT = re.compile(_RESULT + r"[ \t]*(" + _NUMBER + ")(?:" + _OVER + ")?")
# a fraction stated with no arithmetic after it: "the answer is 3/4" states 3/4 (compared as 0.75)
_FRACTION = re.compile(_OVER)
# the last number of a text with no "answer is", a fraction whole: "so the probability is 1/2" states 1/2
_LAST = re.compile(r"(" + _NUMBER + r")(?:" + _OVER + ")?")
_WHOLE = re.compile(r"-?\d+")


def _with_denominator(number: str, denominator: str, *, digits: int | None = None) -> str:
    """``number/denominator`` where `number` is a whole number (and both have at most `digits` digits), else
    `number`: "1.5/3" and "1,000/4" are no fraction of whole numbers ("2023/2024" is a season, `digits` 3)."""
    if not denominator or not _WHOLE.fullmatch(number):
        return number
    if digits is not None and max(len(number.lstrip("-")), len(denominator)) > digits:
        return number
    return f"{number}/{denominator}"


def _norm_number(text: str) -> str:
    """The number as the votes compare it (`reasoning.canonical_answer`), written back: "1,200.50" -> "1200.5",
    "5.0" -> "5", "1e3" -> "1000" (every comma was dropped: "3,5" read as 35, and "1e3" as 1)."""
    from prunekit.inference.reasoning import canonical_answer

    return str(canonical_answer(text))


def extract_answer(text: str) -> str | None:
    """The answer a completion states: the number after the last "answer is" (or "answer:", "answer is:",
    "answer =", with words like "indeed" or "therefore" between: "the answer is indeed 5"; when arithmetic
    follows it, the result after its last "=", "equals" or ", which is": "the answer is 3 x 4 = 12" -> "12",
    "the answer is 2^3 = 8" -> "8"), else the last number in the text; ``None`` when it has no number. A
    fraction of whole numbers is one number: "the answer is 3/4", "the answer is 1/2 + 1/4 = 3/4" -> "0.75"
    (with "=" after it, the result: "the answer is 6/2 = 3" -> "3"); as the last number of a text with no
    "answer is" only where both have at most 3 digits ("so it is 3/4" -> "0.75"; "in 2023/2024" -> "2024").
    It is written as the votes compare answers (`prunekit.inference.reasoning.canonical_answer`): thousands
    separators and trailing zeros dropped, an exponent applied ("1,200.50" -> "1200.5", "2.5e3" -> "2500"), so
    equal numbers compare equal as strings. A comma that does not group thousands ends the number ("the answer is
    3,5" -> "3"; with no "answer is", "x is 3,5" -> "5", the last number)."""
    last = None
    for last in _ANSWER_IS.finditer(text):
        pass
    if last is not None:
        chain = _CHAIN.match(text, last.end())
        results = _AFTER_RESULT.findall(chain.group(0)) if chain else []
        if results:
            return _norm_number(_with_denominator(*results[-1]))
        fraction = _FRACTION.match(text, last.end())
        # the fraction alone: "3/4 + 1" (arithmetic with no result) states its first number, as "3 + 1" does
        if fraction and chain and chain.end() > fraction.end():
            fraction = None
        return _norm_number(_with_denominator(last.group(1), fraction.group(1) if fraction else ""))
    numbers = _LAST.findall(text)
    if not numbers:
        return None
    number, denominator = numbers[-1]
    whole = _with_denominator(number, denominator, digits=3)
    return _norm_number(denominator if denominator and whole == number else whole)  # no fraction: the last number


def build_prompt(tokenizer, question: str, *, instruction: str | None = DEFAULT_INSTRUCTION,
                 examples: tuple = (), chat: bool | None = None) -> str:
    """The text fed to the model. With the tokenizer's chat template (``chat=None``: when it has one): each
    worked example ``(question, solution)`` as a user turn and an assistant turn, then the question as the
    last user turn, every user turn prefixed by ``instruction``. Without one: the same as plain text,
    ``"{instruction}\\n\\nQuestion: ...\\nAnswer: ..."`` blocks ending in ``"Answer:"``."""
    for ex in examples:
        if not (isinstance(ex, (tuple, list)) and len(ex) == 2 and all(isinstance(x, str) for x in ex)):
            raise InputError("examples must be (question, solution) pairs of strings")
    if chat is None:
        chat = bool(getattr(tokenizer, "chat_template", None))
    if chat:
        if not getattr(tokenizer, "chat_template", None):
            raise InputError("chat=True but the tokenizer has no chat template; pass chat=False")
        user = (lambda q: f"{instruction}\n\n{q}") if instruction else (lambda q: q)
        messages = []
        for q, a in examples:
            messages += [{"role": "user", "content": user(q)}, {"role": "assistant", "content": a}]
        messages.append({"role": "user", "content": user(question)})
        return apply_chat_template(tokenizer, messages, add_generation_prompt=True, tokenize=False)
    head = f"{instruction}\n\n" if instruction else ""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
    return f"{head}{shots}Question: {question}\nAnswer:"


_TORCH_SEEDS = range(-(2**63), 2**64)  # what torch.Generator.manual_seed takes


def _check(*, n, max_new_tokens, temperature, seed):
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        raise InputError(f"{n!r} paths per question (--samples, n=): it must be an integer >= 1")
    if not isinstance(max_new_tokens, int) or isinstance(max_new_tokens, bool) or max_new_tokens < 1:
        raise InputError(f"{max_new_tokens!r} new tokens (--max-new-tokens, max_new_tokens=): it must be an integer "
                         ">= 1")
    if not isinstance(temperature, (int, float)) or isinstance(temperature, bool) or not temperature > 0 \
            or temperature == float("inf"):
        raise InputError(f"temperature={temperature!r} must be a finite number > 0 (greedy decoding has no "
                         "distribution to sample from)")
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise InputError(f"seed={seed!r} must be an integer")
    if seed not in _TORCH_SEEDS:  # a larger one was an OverflowError traceback
        raise InputError(f"seed={seed!r} must lie in [-2**63, 2**64)")


def check_question_seeds(seed: int, start: int, count: int) -> None:
    """Refuse a base `seed` whose per-question seeds (``seed * 1_000_003 + start + i``, i < `count`) leave
    torch's range, before any work (it was a traceback at the first question, leaving a --resume file)."""
    for own in (seed * 1_000_003 + start, seed * 1_000_003 + start + max(count - 1, 0)):
        if own not in _TORCH_SEEDS:
            raise InputError(f"seed={seed!r} (--seed) is too large in size: question seeds are seed x 1,000,003 + "
                             f"the question's index and must lie in [-2**63, 2**64); use a seed of magnitude below "
                             f"{2**63 // 1_000_003 - count:,}")


def _ids(value) -> set:
    """Token ids from one id or a list of them (numpy and 0-d torch integers too); None: none."""
    import operator

    if value is None:
        return set()
    many = value.tolist() if hasattr(value, "tolist") else value
    many = list(many) if isinstance(many, (list, tuple, set)) else [many]
    out = set()
    for v in many:
        try:
            if isinstance(v, (bool, float)):
                raise TypeError
            out.add(operator.index(v))
        except TypeError:
            raise InputError(f"end token ids must be whole numbers, got {value!r}") from None
    return out


def end_tokens(model, tokenizer) -> set:
    """The ids a sampled path ends at: the tokenizer's EOS and the model's ``generation_config.eos_token_id`` (one
    id or a list: a chat model's end-of-turn may be only there, and `generate` stops at every one)."""
    config = getattr(model, "generation_config", None)
    return _ids(getattr(tokenizer, "eos_token_id", None)) | _ids(getattr(config, "eos_token_id", None))


def sample_question(model, tokenizer, prompt: str, *, n: int, max_new_tokens: int = 96, temperature: float = 1.0,
                    seed: int = 0, eos_token_id: int | list[int] | None = None) -> list[dict]:
    """`n` sampled completions of one prompt: ``[{"text", "tokens", "logprobs"}]`` (see the module doc).
    `eos_token_id` (one id or several) replaces the end tokens `end_tokens` finds."""
    import torch
    from transformers import DynamicCache

    _check(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    eos = end_tokens(model, tokenizer) if eos_token_id is None else _ids(eos_token_id)
    device = next(model.parameters()).device
    ids = tokenizer(prompt, return_tensors="pt", add_special_tokens=False)["input_ids"].to(device)  # [1, L]
    if ids.shape[1] == 0:
        raise InputError("the prompt is empty after tokenization")
    from prunekit.text import check_generation_positions, check_vocab

    check_vocab(model, ids, what="the prompt")
    check_generation_positions(model, ids.shape[1], max_new_tokens,
                               fix="lower --max-new-tokens (max_new_tokens=) or shorten the prompt")
    gen = torch.Generator(device=device).manual_seed(seed)
    tokens: list[list[int]] = [[] for _ in range(n)]
    logprobs: list[list[float]] = [[] for _ in range(n)]
    with torch.inference_mode():
        cache = DynamicCache(config=model.config)
        # transformers renamed `past_key_values` to `cache` in late 5.x; pass whichever this model takes
        key = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
        out = model(input_ids=ids, use_cache=True, **{key: cache})  # fills `cache` in place (read back, the
        # output's `past_key_values` field only raises transformers' deprecation warning)
        cache.batch_repeat_interleave(n)  # the prompt's keys/values, shared by every path
        logits = out.logits[:, -1, :].float().expand(n, -1)  # [n, V]
        alive = torch.arange(n, device=device)  # which paths the batch rows are
        pos = ids.shape[1]
        for step in range(max_new_tokens):
            logp = torch.log_softmax(logits / temperature, dim=-1)  # [a, V]
            nxt = torch.multinomial(logp.exp(), 1, generator=gen)  # [a, 1]
            lp = logp.gather(1, nxt).squeeze(1)  # [a]
            done = torch.zeros(len(alive), dtype=torch.bool, device=device)
            for row, (path, tok, value) in enumerate(zip(alive.tolist(), nxt.squeeze(1).tolist(), lp.tolist())):
                tokens[path].append(tok)
                logprobs[path].append(min(value, 0.0))
                done[row] = tok in eos
            if step == max_new_tokens - 1 or bool(done.all()):
                break
            if bool(done.any()):
                keep = (~done).nonzero().squeeze(1)  # [a']
                cache.batch_select_indices(keep)
                alive, nxt = alive[keep], nxt[keep]
            position = torch.full((len(alive), 1), pos, dtype=torch.long, device=device)  # [a, 1]
            out = model(input_ids=nxt, position_ids=position, use_cache=True, **{key: cache})
            logits = out.logits[:, -1, :].float()  # [a, V]
            pos += 1
    texts = tokenizer.batch_decode(tokens, skip_special_tokens=True)
    return [{"text": t, "tokens": k, "logprobs": lp} for t, k, lp in zip(texts, tokens, logprobs)]


def _question(q, i: int) -> tuple[str, object, tuple | None]:
    if isinstance(q, str):
        return q, None, None
    if isinstance(q, dict) and isinstance(q.get("question"), str):
        examples = q.get("examples")
        if examples is not None:
            if not isinstance(examples, (list, tuple)):
                raise InputError(f"question {i}: 'examples' must be a list of (question, solution) pairs")
            examples = tuple(tuple(e) if isinstance(e, (list, tuple)) else e for e in examples)
        return q["question"], q.get("answer"), examples
    raise InputError(f"question {i}: expected a string or {{'question': str, 'answer': ...}}, got {type(q).__name__}")


def sample_paths(model, tokenizer, questions: Iterable, *, n: int = 16, max_new_tokens: int = 96,
                 temperature: float = 1.0, seed: int = 0, extractor: Callable[[str], object] = extract_answer,
                 instruction: str | None = DEFAULT_INSTRUCTION, examples: tuple = (), chat: bool | None = None,
                 start: int = 0,
                 out: str | os.PathLike | None = None, overwrite: bool = False, on_record: Callable | None = None,
                 progress: bool = False) -> list[dict]:
    """Sample `n` reasoning paths for every question; one record per question, in the JSONL format that
    `prunekit.inference.reasoning.load_paths` reads:
    ``{"question", "answer", "paths": [{"text", "answer", "logprobs"}], "sampling"}``, where ``"sampling"``
    says how the paths were drawn: ``{"model", "n", "max_new_tokens", "temperature", "seed"}`` (the model's
    name or folder; the question's own seed, so one record is reproducible alone).

    `questions` are strings or ``{"question": str, "answer": reference}`` dicts (a dict may carry its own
    worked ``"examples"``, used instead of `examples`); `extractor(text)` maps a
    completion to its answer (``None`` when it states none; default `extract_answer`); `instruction`,
    `examples` and `chat` shape the prompt (`build_prompt`). With `out`, the
    records are written to that JSONL file atomically (a temporary file renamed at the end; an existing file
    is refused unless `overwrite`). `on_record(record)` is called after each question (e.g. to append it to a
    resumable file). Question i is sampled with seed ``seed * 1_000_003 + start + i``.
    """
    _check(n=n, max_new_tokens=max_new_tokens, temperature=temperature, seed=seed)
    if not callable(extractor):
        raise InputError("extractor must be a function text -> answer")
    questions = list(questions)
    check_question_seeds(seed, start, len(questions))
    parsed = [_question(q, i) for i, q in enumerate(questions)]
    target = None
    if out is not None:
        target = Path(out).expanduser()
        if target.is_dir():
            raise InputError(f"out={target} is a folder; give a file name for the JSONL of sampled paths")
        if target.exists() and not overwrite:
            raise InputError(f"{target} exists; pass --overwrite (in Python: overwrite=True) or choose another file")
        if not target.parent.is_dir():
            raise InputError(f"{target.parent} is not a folder; create it first")
    records = []
    name = getattr(getattr(model, "config", None), "name_or_path", None) or None
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(parsed), desc="sampling", unit="question")
    for i, (text, reference, own) in enumerate(parsed):
        prompt = build_prompt(tokenizer, text, instruction=instruction, examples=examples if own is None else own,
                              chat=chat)
        own_seed = seed * 1_000_003 + start + i
        paths = sample_question(model, tokenizer, prompt, n=n, max_new_tokens=max_new_tokens,
                                temperature=temperature, seed=own_seed)
        record = {"question": text, "answer": None if reference is None else str(reference),
                  "paths": [{"text": p["text"], "answer": _answer(extractor, p["text"]),
                             "logprobs": [round(v, 6) for v in p["logprobs"]]} for p in paths],
                  "sampling": {"model": name, "n": n, "max_new_tokens": max_new_tokens,
                               "temperature": temperature, "seed": own_seed}}
        records.append(record)
        if on_record is not None:
            on_record(record)
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()
    if target is not None:
        write_jsonl(target, records, overwrite=overwrite)
    return records


def _answer(extractor, text):
    value = extractor(text)
    return None if value is None else str(value)


def write_jsonl(path: str | os.PathLike, records: list[dict], *, overwrite: bool = True) -> Path:
    """Write `records` one JSON object a line, atomically (temporary file in the same folder, then rename); a
    symbolic link is written where it points. Without `overwrite`, a file that appeared meanwhile is kept and
    this is an InputError."""
    path = follow_link(Path(path).expanduser())
    fd, tmp = tempfile.mkstemp(prefix=hidden_name(path.name, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            for r in records:
                f.write(jsonl.line(r) + "\n")  # a non-finite float as null, not an invalid NaN token
        apply_umask(tmp)
        place_file(tmp, path, overwrite=overwrite)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
