"""KV-cache policies: generate with a token budget, keeping the cached keys and values that matter.

>>> import prunekit.inference.kv as kv
>>> # with kv.policy(model, "snapkv", budget=512):
>>> #     out = model.generate(**tok("...", return_tensors="pt"), max_new_tokens=64)

Policies (one file each in this folder): ``full`` (no eviction), ``streaming_llm`` (sinks + recent, positions
within the cache), ``h2o`` (accumulated attention + recent), ``snapkv`` (observation-window votes per KV
head), ``knorm`` (lowest key L2 norm per KV head), ``delta`` (Δ-layers pick pages, later layers attend only to
them; the cache itself stays full) and ``deep_forcing`` (deep sink + participative compression). The engine
(`engine.py`) owns the hooks, the compression schedule, the cache surgery and RoPE re-rotation; batch size 1
only.
"""

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__all__ = [
    "POLICIES", "POLICY_NAMES", "Engine", "Policy", "policy", "make_policy", "policy_options", "cache_bytes",
    "cache_tokens", "kv_layers", "rotate_keys", "calibrate_delta_layers", "default_delta_layers", "wiki_delta_layers",
    "SUPPORTED_MODEL_TYPES", "EVERY", "FullCache", "StreamingLLM", "H2O", "SnapKV", "Knorm", "Delta", "DeepForcing",
]

# the keys of POLICIES, for the command line's help without importing torch
POLICY_NAMES = ("full", "streaming_llm", "h2o", "snapkv", "knorm", "delta", "deep_forcing")

attach(__name__, {
    "prunekit.inference.kv.policies": ("POLICIES", "policy", "make_policy", "policy_options"),
    "prunekit.inference.kv.engine": ("EVERY", "SUPPORTED_MODEL_TYPES", "Engine", "Policy", "cache_bytes",
                                     "cache_tokens", "kv_layers", "rotate_keys"),
    "prunekit.inference.kv.delta": ("Delta", "calibrate_delta_layers", "default_delta_layers", "wiki_delta_layers"),
    "prunekit.inference.kv.deep_forcing": ("DeepForcing",),
    "prunekit.inference.kv.full": ("FullCache",),
    "prunekit.inference.kv.h2o": ("H2O",),
    "prunekit.inference.kv.knorm": ("Knorm",),
    "prunekit.inference.kv.snapkv": ("SnapKV",),
    "prunekit.inference.kv.streaming": ("StreamingLLM",),
})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit.inference.kv.deep_forcing import DeepForcing
    from prunekit.inference.kv.delta import Delta, calibrate_delta_layers, default_delta_layers, wiki_delta_layers
    from prunekit.inference.kv.engine import (EVERY, SUPPORTED_MODEL_TYPES, Engine, Policy, cache_bytes,
                                              cache_tokens, kv_layers, rotate_keys)
    from prunekit.inference.kv.full import FullCache
    from prunekit.inference.kv.h2o import H2O
    from prunekit.inference.kv.knorm import Knorm
    from prunekit.inference.kv.policies import POLICIES, make_policy, policy, policy_options
    from prunekit.inference.kv.snapkv import SnapKV
    from prunekit.inference.kv.streaming import StreamingLLM
