"""Task loops shared by prunekit's side and kvpress's worker of bench/kv_vs_kvpress.py.

Imports only torch and transformers, so it runs in prunekit's venv and in kvpress's own venv (transformers
5.2 there). Each task takes the context managers that compress: ``prefill_ctx`` wraps the context prefill,
``rest_ctx`` wraps what follows (the question, decoding, a teacher-forced continuation). prunekit's policy
is one context around everything (it keeps compressing while decoding); kvpress's press wraps the prefill
only, which is how its pipeline uses it. Positions are passed explicitly (absolute positions), as kvpress's
pipeline does; prunekit's engine counts positions itself.
"""

from __future__ import annotations

import inspect
import math
import time
from contextlib import nullcontext

import torch
from transformers import DynamicCache

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
INSTRUCTION = "There is a pass key hidden inside a lot of irrelevant text. Find it and memorize it.\n\n"


def cache_bytes(cache) -> int:
    """Memory behind the cache's keys and values: whole storages, so room kept for the next tokens counts too."""
    storages = {}
    for layer in cache.layers:
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def cache_tokens(cache) -> int:
    return max(0 if layer.keys is None else layer.keys.shape[-2] for layer in cache.layers)


def new_cache(model):
    return DynamicCache(config=model.config)


def cache_arg(model, cache) -> dict:
    """The forward's cache keyword: transformers >= 5.2x renamed ``past_key_values`` to ``cache`` (the old name
    warns), kvpress's venv has the old one."""
    params = inspect.signature(model.forward).parameters
    return {"cache" if "cache" in params else "past_key_values": cache}


def passkey_sample(tok, *, context: int, depth: float, key: int) -> dict:
    """Chat-formatted passkey prompt whose context part is about `context` tokens; needle at `depth` (0..1)."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    head = tok.apply_chat_template([{"role": "user", "content": "X"}], tokenize=False, add_generation_prompt=True)
    pre, post = head.split("X", 1)
    question = "\n\nWhat is the pass key? Answer with the number only."
    unit = len(tok(FILLER, add_special_tokens=False)["input_ids"])
    fixed = len(tok(pre + INSTRUCTION + needle, add_special_tokens=False)["input_ids"])
    n_fill = max(1, (context - fixed) // unit)
    at = int(round(depth * n_fill))
    body = INSTRUCTION + FILLER * at + needle + FILLER * (n_fill - at)
    ctx_ids = tok(pre + body, add_special_tokens=False)["input_ids"]
    q_ids = tok(question + post + "The pass key is", add_special_tokens=False)["input_ids"]
    return {"context_ids": ctx_ids, "question_ids": q_ids, "answer": str(key), "depth": depth}


class AttentionTimer:
    """Wall time spent inside the attention modules (forward pre/post hooks on each layer's self_attn)."""

    def __init__(self, model):
        self.seconds = 0.0
        self._t = {}
        self.handles = []
        for layer in model.model.layers:
            attn = layer.self_attn
            self.handles.append(attn.register_forward_pre_hook(self._pre))
            self.handles.append(attn.register_forward_hook(self._post))

    def _pre(self, module, args):
        self._t[id(module)] = time.perf_counter()

    def _post(self, module, args, out):
        self.seconds += time.perf_counter() - self._t.pop(id(module))

    def remove(self):
        for h in self.handles:
            h.remove()


@torch.no_grad()
def passkey(model, sample: dict, *, prefill_ctx=nullcontext, rest_ctx=nullcontext, new_tokens: int = 8,
            timed: bool = False) -> dict:
    """Prefill the context (compressed), then the question, then greedy decoding; exact match on the number."""
    ctx = torch.tensor([sample["context_ids"]])
    q = torch.tensor([sample["question_ids"]])
    n_ctx = ctx.shape[1]
    cache = new_cache(model)
    with prefill_ctx():
        model(input_ids=ctx, **cache_arg(model, cache), position_ids=torch.arange(n_ctx)[None], use_cache=True,
              logits_to_keep=1)
    kept_after_prefill = cache_tokens(cache)
    timer = AttentionTimer(model) if timed else None
    with rest_ctx():
        pos = n_ctx
        out = model(input_ids=q, **cache_arg(model, cache), position_ids=torch.arange(pos, pos + q.shape[1])[None],
                    use_cache=True, logits_to_keep=1)
        pos += q.shape[1]
        nxt = out.logits[0, -1].argmax()
        generated = [int(nxt)]
        peak = cache_bytes(cache)
        if timer:
            timer.seconds = 0.0
        start = time.perf_counter()
        for i in range(new_tokens - 1):
            out = model(input_ids=nxt.view(1, 1), **cache_arg(model, cache), position_ids=torch.tensor([[pos + i]]),
                        use_cache=True)
            nxt = out.logits[0, -1].argmax()
            generated.append(int(nxt))
            peak = max(peak, cache_bytes(cache))
        decode_s = time.perf_counter() - start
    if timer:
        timer.remove()
    return {"generated": generated, "kept_after_prefill": kept_after_prefill, "cache_tokens_end": cache_tokens(cache),
            "decode_s": decode_s, "decode_tokens": new_tokens - 1, "peak_cache_mb": peak / 2**20,
            "attention_s": timer.seconds if timer else None}


def warm_up(model, sample: dict, *, new_tokens: int) -> None:
    """One untimed plain decode on `sample`. A process's first long-context decode pays one-off costs (the
    allocator growing, kernels' first calls); both tools run this before their timed speed jobs, so neither
    side's first row pays them."""
    passkey(model, sample, new_tokens=new_tokens)


def exact_match(text: str, answer: str) -> bool:
    digits = "".join(ch if ch.isdigit() else " " for ch in text).split()
    return bool(digits) and digits[0] == answer


@torch.no_grad()
def continuation_nll(model, ids: list[int], *, context: int, prefill_ctx=nullcontext, rest_ctx=nullcontext) -> dict:
    """Prefill `context` tokens (compressed), then score the rest teacher-forced in one forward: summed NLL."""
    x = torch.tensor([ids])
    cache = new_cache(model)
    with prefill_ctx():
        out = model(input_ids=x[:, :context], **cache_arg(model, cache), position_ids=torch.arange(context)[None],
                    use_cache=True, logits_to_keep=1)
    first = out.logits[0, -1].float().log_softmax(-1)[x[0, context]]
    kept = cache_tokens(cache)
    with rest_ctx():
        out = model(input_ids=x[:, context:-1], **cache_arg(model, cache),
                    position_ids=torch.arange(context, x.shape[1] - 1)[None], use_cache=True)
    logp = out.logits[0].float().log_softmax(-1).gather(-1, x[0, context + 1:, None])[:, 0]
    nll = -(float(first) + float(logp.sum()))
    return {"nll": nll, "tokens": x.shape[1] - context, "kept_after_prefill": kept}


@torch.no_grad()
def streaming_nll(model, ids: list[int], *, chunk: int, ctx=nullcontext) -> dict:
    """Feed `ids` in chunks through one cache under `ctx`; NLL of every token after the first; cache tracked."""
    x = torch.tensor([ids])
    cache = new_cache(model)
    nll, count, peak, curve = 0.0, 0, 0, []
    mark, step = 0, max(chunk, x.shape[1] // 16)
    with ctx():
        for s in range(0, x.shape[1] - 1, chunk):
            e = min(s + chunk, x.shape[1] - 1)
            out = model(input_ids=x[:, s:e], **cache_arg(model, cache), position_ids=torch.arange(s, e)[None],
                        use_cache=True)
            logp = out.logits[0].float().log_softmax(-1).gather(-1, x[0, s + 1:e + 1, None])[:, 0]
            nll -= float(logp.sum())
            count += e - s
            peak = max(peak, cache_tokens(cache))
            if e >= mark:
                curve.append([e, math.exp(nll / count)])  # running perplexity after e tokens
                mark += step
    return {"nll": nll, "tokens": count, "peak_cache_tokens": peak, "curve": curve}
