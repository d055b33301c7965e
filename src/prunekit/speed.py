"""Measured CPU speed and memory of a causal LM: prefill time, decode time per token, parameter bytes.

Timing runs with the thread count given (default one, so runs on a shared machine compare fairly), a warm-up
call first, and the median of `repeats` calls. Prefill: one forward over ``[1, prefill]`` random tokens with a
cache, computing the logits of the last position only (``logits_to_keep=1``, what ``generate`` does; the other
positions' logits are never used in generation). Decode: `decode` greedy steps, one token at a time, after
that prefill (seconds per token). `compare_speed` times a dense and a pruned model in alternating rounds and
keeps each one's fastest round, so a change of load on a shared machine hits both alike; structured
(`prunekit.structured`) and depth (`prunekit.depth`) pruning report it, and `speedup` compares two timings.
"""

from __future__ import annotations

import functools
import statistics
import time
from numbers import Integral

import torch
from torch import nn

from prunekit.errors import InputError, check_seed, int_at_least
from prunekit.weights.engine import input_device

__all__ = ["compare_speed", "compare_speed_with_dense", "dense_reload_note", "measure_speed", "noise_note",
           "speed_against_dense", "speedup"]


@functools.lru_cache(maxsize=None)
def forward_takes(cls, name: str) -> bool:
    """Whether the forward of model class `cls` names the argument `name` (read once per class)."""
    import inspect

    return name in inspect.signature(cls.forward).parameters


def _last_only(cls) -> dict:
    """``{"logits_to_keep": 1}`` when the model's forward takes it (transformers' causal LMs), else ``{}``."""
    return {"logits_to_keep": 1} if forward_takes(cls, "logits_to_keep") else {}


@functools.lru_cache(maxsize=None)
def _cache_arg() -> str:
    """transformers 5.24 renamed the forward's ``past_key_values`` to ``cache`` (pyproject needs 5.24; the old
    name is kept for a model class whose forward still takes it)."""
    import inspect

    from transformers import LlamaModel

    return "cache" if "cache" in inspect.signature(LlamaModel.forward).parameters else "past_key_values"


def _cache(out):
    return getattr(out, "cache", None) if getattr(out, "cache", None) is not None else out.past_key_values


def _decode(model, out, steps):
    """Seconds per token of `steps` greedy steps continuing the prefill whose output is `out` (its cache grows)."""
    cache = _cache(out)
    token = out.logits[:, -1:].argmax(-1)  # [1, 1]
    start = time.perf_counter()
    for _ in range(steps):
        out = model(input_ids=token, **{_cache_arg(): cache}, use_cache=True)
        cache = _cache(out)
        token = out.logits[:, -1:].argmax(-1)
    sync_device(token.device)
    return (time.perf_counter() - start) / steps


def sync_device(device: torch.device) -> None:
    """Wait for a GPU's queued work, so a wall-clock time covers it (a no-op on the CPU)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_speed(model: nn.Module, *, prefill: int | None = None, decode: int | None = None, repeats: int = 3,
                  threads: int = 1, vocab: int | None = None, seed: int = 0) -> dict:
    """``{"prefill_s", "decode_s_per_token", "param_bytes", "params", ...}`` measured where the model is (this CPU,
    unless it is on a GPU: then synchronized, `threads` still sets the CPU threads).

    `prefill` / `decode`: tokens timed, by default 512 and 64, or fewer when the model has fewer positions
    (its ``max_position_embeddings`` / ``n_positions``): decode an eighth of them, prefill the rest. The result
    records the counts used (``prefill_tokens``, ``decode_tokens``)."""
    from prunekit.text import position_limit

    limit = position_limit(model)
    if decode is None:
        decode = 64 if limit is None else max(1, min(64, limit // 8))
    if prefill is None:
        prefill = 512 if limit is None else max(1, min(512, limit - decode))
    prefill = int_at_least(prefill, "prefill", 1)
    decode = int_at_least(decode, "decode", 1)
    if limit is not None and prefill + decode > limit:
        raise InputError(f"prefill {prefill} + decode {decode} tokens exceed the {limit} positions this model "
                         f"embeds; time at most {limit} tokens in all")
    repeats = int_at_least(repeats, "repeats", 1)
    threads = int_at_least(threads, "threads", 1)
    size = model.get_input_embeddings().num_embeddings
    if vocab is None:
        vocab = size
    elif isinstance(vocab, bool) or not isinstance(vocab, Integral) or not 1 <= vocab <= size:
        raise InputError(f"vocab (the token ids drawn) must be an integer from 1 to the model's {size}, got {vocab!r}")
    seed = check_seed(seed)
    device = input_device(model)
    ids = torch.randint(0, vocab, (1, prefill), generator=torch.Generator().manual_seed(seed)).to(device)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        with torch.no_grad():
            model(input_ids=ids[:, :8], use_cache=True)  # warm-up
            pre, dec = [], []
            for _ in range(repeats):  # each decode timing continues the prefill just timed (it ran a second one)
                start = time.perf_counter()
                out = model(input_ids=ids, use_cache=True, **_last_only(type(model)))
                sync_device(device)
                pre.append(time.perf_counter() - start)
                dec.append(_decode(model, out, decode))
                del out
    finally:
        torch.set_num_threads(before)
    params = sum(p.numel() for p in model.parameters())
    return {
        "prefill_tokens": prefill, "decode_tokens": decode, "threads": threads, "repeats": repeats,
        "prefill_s": statistics.median(pre), "decode_s_per_token": statistics.median(dec),
        "params": params, "param_bytes": sum(p.numel() * p.element_size() for p in model.parameters()),
    }


def speedup(dense: dict, pruned: dict) -> dict:
    """``{"prefill", "decode"}``: how many times faster `pruned` ran than `dense` (two `measure_speed` results)."""
    return {"prefill": dense["prefill_s"] / pruned["prefill_s"],
            "decode": dense["decode_s_per_token"] / pruned["decode_s_per_token"]}


def compare_speed(dense: nn.Module, pruned: nn.Module, *, rounds: int = 3, **kwargs) -> dict:
    """``{"dense", "pruned", "speedup", "median_speedup", "rounds"}``: `measure_speed` (with `kwargs`, one call a
    model a round) of `dense` then `pruned`, `rounds` times in turn. ``dense`` / ``pruned`` hold each model's
    fastest prefill and fastest decode over the rounds (other jobs on a shared CPU only ever add time, so the
    minimum is the least disturbed measurement), ``speedup`` their ratios, ``median_speedup`` the ratios of the
    medians. Timing one model before pruning and the other after would compare two different loads."""
    rounds = int_at_least(rounds, "rounds", 1)
    kwargs.setdefault("repeats", 1)
    runs = {"dense": [], "pruned": []}
    for _ in range(rounds):
        for name, model in (("dense", dense), ("pruned", pruned)):
            runs[name].append(measure_speed(model, **kwargs))
    best = {name: {**rows[0], "rounds": rounds, "prefill_s": min(r["prefill_s"] for r in rows),
                   "decode_s_per_token": min(r["decode_s_per_token"] for r in rows)}
            for name, rows in runs.items()}
    med = {name: {k: statistics.median(r[k] for r in rows) for k in ("prefill_s", "decode_s_per_token")}
           for name, rows in runs.items()}
    return {"dense": best["dense"], "pruned": best["pruned"], "speedup": speedup(best["dense"], best["pruned"]),
            "median_speedup": speedup(med["dense"], med["pruned"]), "rounds": rounds}


def noise_note(result: dict, *, tolerance: float = 0.25) -> str | None:
    """A warning when `compare_speed`'s two summaries of the same rounds disagree: the fastest-of-rounds and the
    median speedup more than `tolerance` apart (relative) for prefill or decode, which other jobs on the CPU cause
    (a loaded 2-core VM gave 3.36x decode for a model with 1.31x fewer weights, its median 1.17x); else None."""
    median = result.get("median_speedup")
    if not median:
        return None
    apart = [f"{k} {result['speedup'][k]:.2f}x fastest vs {median[k]:.2f}x median" for k in ("prefill", "decode")
             if abs(result["speedup"][k] / median[k] - 1) > tolerance]
    if not apart:
        return None
    return (f"the speed rounds disagree ({'; '.join(apart)}): other work on this CPU disturbed the timing, so the "
            "speedup is unreliable; time it again on a quiet machine (prunekit.measure_speed, or prune again)")


def _available_bytes() -> int | None:
    """The memory a new allocation can take without swapping (Linux's MemAvailable), or None where unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def dense_bytes(dense_path, dtype=None) -> int | None:
    """The bytes of the floating-point weights of the model folder `dense_path` loaded in `dtype` (`load_model`'s:
    None is float32, "auto" each stored tensor's own size), read from the headers of the safetensors files the
    loader reads (the index's, else ``model.safetensors``: a ``consolidated.safetensors`` or an adapter beside
    them counted twice); a ``.bin`` folder's from its config (parameters of the model built on the meta device);
    None where neither can be read."""
    import json
    from math import prod

    from safetensors import safe_open

    from prunekit.weights.io import _SAFETENSORS_DTYPES, parse_dtype, resolve_model

    dtype = parse_dtype(dtype)
    itemsize = None if dtype == "auto" else (dtype or torch.float32).itemsize
    folder = resolve_model(dense_path)
    index = folder / "model.safetensors.index.json"
    try:
        if index.is_file():
            files = sorted({folder / name for name in json.loads(index.read_text())["weight_map"].values()})
        else:
            files = [folder / "model.safetensors"] if (folder / "model.safetensors").is_file() else []
    except (OSError, ValueError, KeyError, TypeError, AttributeError):  # an unreadable index: say nothing
        return None
    if not files:
        return _config_bytes(folder, itemsize)
    total = 0
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                part = f.get_slice(name)
                stored = _SAFETENSORS_DTYPES.get(part.get_dtype())  # a floating-point tensor's dtype name
                if stored:
                    total += prod(part.get_shape()) * (itemsize or getattr(torch, stored).itemsize)
    return total


def _config_bytes(folder, itemsize: int | None) -> int | None:
    """The floating-point parameters' bytes of the model `folder`'s config describes (built on the meta device:
    nothing is allocated), at `itemsize` bytes each (None: the config's dtype); None where it cannot be built."""
    try:
        from transformers import AutoConfig, AutoModelForCausalLM

        config = AutoConfig.from_pretrained(folder, trust_remote_code=False)
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(config, trust_remote_code=False)
        stored = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
        size = itemsize or (getattr(torch, stored, torch.float32) if isinstance(stored, str) else
                            stored if isinstance(stored, torch.dtype) else torch.float32).itemsize
        return sum(p.numel() for p in model.parameters() if p.is_floating_point()) * size
    except Exception:  # a size estimate must not stop the run: the timing then goes ahead, as before
        return None


def _device_free_bytes(device) -> int | None:
    """Free memory of a CUDA `device` (``torch.cuda.mem_get_info``), or None for any other device or where unknown."""
    if device is None or torch.device(device).type != "cuda":
        return None
    try:
        return int(torch.cuda.mem_get_info(torch.device(device))[0])
    except (RuntimeError, AssertionError):
        return None


def dense_reload_note(dense_path, dtype=None, *, margin: float = 1.2, device=None) -> str | None:
    """Why `compare_speed_with_dense` should not run here, or None: it loads the dense model from `dense_path`
    again beside the pruned one, and the memory available (Linux's MemAvailable; on a CUDA `device` also the GPU's
    free memory) is below `margin` times the dense model's weights in `dtype` (a large model's run was killed at
    the end, its pruned model unsaved)."""
    need = dense_bytes(dense_path, dtype)
    if need is None:
        return None
    for free, where in ((_available_bytes(), "this machine has"), (_device_free_bytes(device), f"{device} has")):
        if free is not None and need * margin > free:
            return (f"the speed timing was skipped: it loads the dense model again beside the pruned one, "
                    f"{need / 2**30:.1f} GiB of weights, and {where} {free / 2**30:.1f} GiB available (a run killed "
                    "for memory saves nothing); prunekit.measure_speed times the saved model on its own")
    return None


def speed_against_dense(dense_path, pruned: nn.Module, *, dtype=None) -> tuple[dict | None, str | None]:
    """``(compare_speed_with_dense(...), None)``, or ``(None, why)`` where the dense model would not fit beside the
    pruned one (`dense_reload_note`, on the pruned model's device): the structured and depth prune commands'
    timing."""
    skipped = dense_reload_note(dense_path, dtype, device=input_device(pruned))
    return (None, skipped) if skipped else (compare_speed_with_dense(dense_path, pruned, dtype=dtype), None)


def compare_speed_with_dense(dense_path, pruned: nn.Module, *, dtype=None, **kwargs) -> dict:
    """`compare_speed` against the dense model loaded again from `dense_path` in `dtype` (`load_model`'s: the
    pruned model's own, for a like-for-like timing) and onto the pruned model's device (the prune CLIs: the dense
    model was changed in place, so it is reloaded after pruning and timed in turns with the pruned one)."""
    from prunekit.weights.io import load_model

    dense, _ = load_model(dense_path, dtype=dtype, device=input_device(pruned))
    return compare_speed(dense, pruned, **kwargs)
