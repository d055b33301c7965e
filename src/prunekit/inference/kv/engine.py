"""The KV-cache engine: hooks every attention layer of a Hugging Face causal LM for the length of a ``with`` block,
keeps per-layer bookkeeping, and asks a policy which cached tokens to keep.

A policy (one file per method in this folder) only scores; this file owns the mechanics, once:

- **Hooking.** On entering, each decoder layer's attention module gets an instance-level ``forward`` (the class
  is never touched, nothing is patched at import time, no global registry is written); on exit the instance
  attribute is deleted, so the module's class ``forward`` is back and the model is exactly what it was
  (parameters, buffers, config and ``_attn_implementation`` are never written). The replacement forward is the
  Llama attention (q/k/v projections, optional q/k norms, RoPE, cache update, attention, o_proj) with the
  cache surgery in between; the attention itself is still the model's own ``ALL_ATTENTION_FUNCTIONS``
  implementation (sdpa stays sdpa). Policies that need attention probabilities compute them from q and k for
  the queries they look at, so no policy forces eager attention.
- **Compression.** After a forward has appended its tokens to a layer's cache, the engine compresses the layer
  when it holds more than ``budget`` tokens: at once after a multi-token forward (prefill, or a teacher-forced
  chunk), and during one-token decoding when the cache reaches ``budget + every`` (default `EVERY` = 16;
  ``every=1``: every step over budget, which holds the budget exactly but pays a compression per token: on
  SmolLM2-135M at a 4k context and budget 1024, StreamingLLM, H2O, SnapKV and Knorm then decode at 0.63-0.91x
  the full cache's speed, against 1.24-1.40x with 16). It keeps ``policy.target(budget)`` entries per KV head
  by ``policy.score``'s top-k, in their original order, and really gathers them into new, smaller key/value
  tensors (`cache_bytes` measures it).
  So between forwards a layer holds at most ``budget + every - 1`` tokens; during the forward that triggers a
  compression, attention also sees that forward's new tokens. A policy whose target is below the budget
  (Deep Forcing) compresses as soon as the budget is passed and then refills, so it holds at most ``budget``.
  ``once=True`` compresses only in the first forward of each new cache (the prompt under ``generate``; the
  context, when a caller feeds the context and then the question) and appends every later token: nothing after
  the first forward is ever evicted, so a layer holds ``target(budget)`` plus every token since, and decoding
  pays no compression (nor a policy's scoring: `Policy.observe` is not called after the first forward, unless
  the policy replaces the attention). That is how kvpress's pipeline and the SnapKV paper use a budget. "First"
  is meant literally: a context fed in several forwards has only its first compressed, and ``generate`` with
  ``prefill_chunk_size`` is refused.
- **Positions.** New tokens get their absolute position (tokens seen so far), counted by the engine rather than
  taken from ``cache.get_seq_length()``, which shrinks when entries go. A policy may re-position the kept
  entries (StreamingLLM: contiguous positions within the cache; Deep Forcing: sinks moved next to the recent
  tokens); the engine then re-rotates only the keys whose position changed (`rotate_keys`: a RoPE rotation by
  Δ positions) and continues numbering new tokens after the last kept position.
- **Cache growth.** The engine appends each forward's keys and values to the layer in place (`_append`): the
  layer's ``keys``/``values`` are views of the first ``n`` tokens of a buffer with room for max(128 tokens,
  n/32) more, remade larger when full (an amortised copy of 1-32 tokens per step instead of n), and never past
  ``budget + every`` for a policy that compresses.
  ``DynamicLayer.update`` instead concatenates, copying the whole cache at every decoding step (as much memory
  traffic as attending to it). Outputs are bitwise those of the model's own cache (tested); `cache_bytes`
  counts the buffers' whole storage. On SmolLM2-135M at a 4k context (one thread, `bench/kv_speed.py`)
  the full-cache policy decodes at 1.00-1.12x the plain model's speed (five runs), its bookkeeping included.
- **Per-layer state.** Original positions of the kept entries (``orig``), their current RoPE positions
  (``pos``), policy-owned tensors aligned with the entries (gathered with them), and a buffer of the last
  ``policy.query_window`` post-RoPE queries (the observation window).

Batches: batch size 1 only, unpadded; a larger batch (several prompts, ``num_beams`` or
``num_return_sequences`` > 1) raises `InputError` at the first forward, and ``generate`` refuses a prompt
whose ``attention_mask`` marks padding, or in which ``generate`` finds padding itself (no mask given, the pad id
present and different from EOS); per-sequence budgets with padding are not implemented, and pads that generate
would not mask cannot be told from text and are attended as tokens. A cache the policy has compressed cannot be
handed back to ``generate`` to continue: transformers takes the tokens past its (shrunken) length as new and
would feed evicted ones again, so that is an `InputError` too; pass the whole text with a fresh cache (direct
forwards of new tokens only, e.g. streaming a text in chunks, may continue: the engine numbers positions
itself). While the context is open, the model's ``generate`` (and transformers' mask inference for it) are
instance attributes that make these checks, on the model inside a ``torch.compile`` wrapper; after the context
exits nothing checks, so a compressed cache must not be given to plain ``generate`` then either (direct forwards
that pass each token's position, as kvpress's pipeline does, may continue it).
Attention weights (``output_attentions``) come back where the model's attention computed them (eager), over the
entries the cache kept. Supported architectures: Llama-style attention with rotary embeddings and a
``DynamicCache`` (model types in `SUPPORTED_MODEL_TYPES`: llama, mistral, mixtral, starcoder2, qwen2, qwen2_moe,
qwen3, qwen3_moe, granite, granitemoe, gemma, olmo, olmo2, olmoe, arcee, apertus, seed_oss). A model with a sliding
window runs within it only (`Engine.window`): there the window changes nothing, and transformers' sliding cache
layers hold what a ``DynamicLayer`` does; a sequence that passes it is refused before it does.
"""

from __future__ import annotations

import sys
import types
import weakref
from dataclasses import dataclass, field

import torch

from prunekit.errors import InputError, is_real

__all__ = ["Policy", "LayerState", "Engine", "rotate_keys", "cache_bytes", "cache_tokens", "SUPPORTED_MODEL_TYPES"]

# Model types whose attention is what `Engine._forward` recomputes: q/k/v/o projections (biases allowed), optional
# RMSNorm of q and k before RoPE (per head, or over all heads as in OLMo-2 and OLMoE), optional clamping of q, k and
# v (OLMo's clip_qkv), half-split RoPE from model.model.rotary_emb, the module's own `scaling` (Granite's attention
# multiplier), optional residual dropout after o_proj (StarCoder2, Seed-OSS), no soft-capping, no per-layer NoPE
# or sliding window. Not here: interleaved RoPE (Helium, Ernie 4.5, Cohere), q/k norms after RoPE (HunYuan),
# partial rotary (Phi, StableLM, GLM), fused projections (Phi-3), NoPE layers (SmolLM3).
SUPPORTED_MODEL_TYPES = ("llama", "mistral", "mixtral", "qwen2", "qwen2_moe", "qwen3", "qwen3_moe", "granite",
                         "granitemoe", "gemma", "olmo", "olmo2", "olmoe", "starcoder2", "arcee", "apertus", "seed_oss")
EVERY = 16  # decode steps between compressions by default (see "Compression" above; kvpress's decoding press too
# compresses periodically)
GROW_MIN, GROW_FRACTION = 128, 32  # a key/value buffer is made with room for max(128 tokens, 1/32 of what it holds)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotate_keys(keys: torch.Tensor, delta: torch.Tensor, inv_freq: torch.Tensor) -> torch.Tensor:
    """Move RoPE'd keys by ``delta`` positions: a key computed at position p becomes the key at p + delta.

    RoPE rotates each channel pair i by the angle p·θ_i, and rotations compose, so rotating by Δ·θ_i gives the
    key at p + Δ exactly (up to rounding; the angles are computed in float64). Llama's half-split layout:
    channels (j, j + d/2) form pair j.

    keys: [B, H, n, d]; delta: integer positions broadcastable to [B, H, n] (may be negative); inv_freq: [d/2].
    """
    ang = delta.to(torch.float64)[..., None] * inv_freq.to(torch.float64)  # [B, H, n, d/2]
    ang = torch.cat((ang, ang), dim=-1)  # [B, H, n, d]
    cos, sin = ang.cos().to(keys.dtype), ang.sin().to(keys.dtype)
    return keys * cos + _rotate_half(keys) * sin


def _output(module, out: torch.Tensor) -> torch.Tensor:
    """The attention's output projection of ``out`` [B, q, H, d], with the residual dropout StarCoder2 and Seed-OSS
    apply there while training."""
    out = module.o_proj(out.reshape(*out.shape[:2], -1).contiguous())
    p = getattr(module, "residual_dropout", 0.0)
    return torch.nn.functional.dropout(out, p=p, training=module.training) if p else out


def kv_layers(cache) -> list:
    """The layers of a transformers cache that hold keys and values: a Mamba-style or convolution layer of a
    recurrent or hybrid model (Mamba, Jamba, LFM2, RecurrentGemma) keeps a state instead and has no keys."""
    return [layer for layer in cache.layers if hasattr(layer, "keys")]


def cache_tokens(cache) -> list[int]:
    """Tokens held per key/value layer of a transformers cache (layers that keep a recurrent state are left out)."""
    return [0 if layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2] for layer in kv_layers(cache)]


def cache_bytes(cache) -> int:
    """Bytes of memory behind the key and value tensors a transformers cache holds (what the policies shrink).

    Counts each tensor's whole storage, so the room the engine's buffers keep for the next tokens is included.
    """
    seen, total = set(), 0
    for layer in kv_layers(cache):
        for t in (layer.keys, layer.values):
            if t is not None and t.numel():
                storage = t.untyped_storage()
                if storage.data_ptr() not in seen:
                    seen.add(storage.data_ptr())
                    total += storage.nbytes()
    return total


def _window_refusal(config, window, windowed: int, *, reached: int | None) -> str:
    """Why a sequence of `reached` tokens on a model with sliding-window layers is refused (`reached` None: layers
    marked sliding without a window size), and every key to change to turn the window off (a config.json saved by
    transformers 5 lists ``layer_types``, and a sliding entry there keeps the window, or breaks the model's own
    cache, after the window size alone is turned off)."""
    qwen = str(getattr(config, "model_type", "")).startswith("qwen")
    what = (f"a window of {window} tokens" if window else "") + (" in " if window and windowed else "")
    if windowed:
        what += f"{windowed} of {len(config.layer_types)} layers ('layer_types')"
    py, js = [], []
    if window:
        py.append("use_sliding_window=False" if qwen else "sliding_window=None")
        js.append('"use_sliding_window": false' if qwen else '"sliding_window": null')
    if windowed:
        py.append(f'layer_types=["full_attention"] * {len(config.layer_types)}')
        js.append('"layer_types" with every entry "full_attention"')
    # no ';' before the first clause ends: `generate --kv full` quotes that clause as the reason it runs unhooked
    if reached is None:
        why = (f"this model marks layers as sliding-window attention ({what}) but gives no window size, which the KV "
               "engine does not support (nor does transformers' own cache)")
    else:
        why = (f"this model uses sliding-window attention ({what}), and {reached} tokens pass it: the KV engine runs "
               f"such a model within its window only (past it the model sees the last {window} tokens, which no "
               f"policy reproduces); keep the prompt and the new tokens within {window}")
    return (f"{why}; if the model was trained without a window, turn it off: in "
            f"Python load it with {', '.join(py)}, on the command line use a copy of the model folder whose "
            f"config.json says {' and '.join(js)}")


@dataclass
class LayerState:
    """What the engine knows about one layer's cache entries (all aligned with the cache's token axis)."""

    index: int
    seen: int = 0  # tokens this layer has processed (the next token's absolute position)
    next_pos: int = 0  # RoPE position the next token gets (== seen unless a policy re-positioned entries)
    orig: torch.Tensor | None = None  # [B, Hkv, n] long: absolute position of each kept entry
    pos: torch.Tensor | None = None  # [B, Hkv, n] long: the RoPE position each kept key carries now
    extras: dict = field(default_factory=dict)  # policy tensors [B, Hkv, n], gathered with the entries
    queries: torch.Tensor | None = None  # [B, Hq, w, d]: the last w post-RoPE queries
    compressions: int = 0
    forwards: int = 0  # forwards of this layer since the cache started (``once``: only the first compresses)


@dataclass
class View:
    """What a policy sees of one layer when asked to score: tensors are read-only by convention."""

    layer: int
    keys: torch.Tensor  # [B, Hkv, n, d] (RoPE'd at `pos`)
    values: torch.Tensor  # [B, Hkv, n, d]
    state: LayerState
    groups: int  # query heads per KV head
    scaling: float  # 1/sqrt(head_dim)
    budget: int
    num_layers: int

    @property
    def n(self) -> int:
        return self.keys.shape[-2]


class Policy:
    """Base class: a policy says which cached tokens matter. Subclasses set the class attributes they need and
    override `score` (and, where the method says so, `target`, `reposition`, `observe`, `attend`).

    - ``name``: what reports call the policy; the built-in ones are known by it to `prunekit.inference.kv.policy`
      and the CLI (`POLICIES`). Your own subclass needs no registration: pass an instance,
      ``kv.policy(model, MyPolicy(budget=512))``.
    - ``compresses``: False for policies that never evict (full cache, DELTA).
    - ``query_window``: how many recent post-RoPE queries the engine buffers per layer for `score`.
    """

    name = "base"
    compresses = True
    query_window = 0

    def __init__(self, *, budget: int | None):
        self.budget = budget

    # ---- what a policy may override -----------------------------------------------------------------
    def target(self, budget: int) -> int:
        """Entries kept per KV head after a compression (default: the budget)."""
        return budget

    def score(self, view: View) -> torch.Tensor:
        """[B, Hkv, n] importance of every cached entry, higher = keep."""
        raise NotImplementedError

    def reposition(self, view: View, keep_pos: torch.Tensor) -> torch.Tensor | None:
        """New RoPE positions [B, Hkv, m] for the kept entries (whose positions are `keep_pos`), or None."""
        return None

    def observe(self, view: View, q: torch.Tensor, q_pos: torch.Tensor) -> None:
        """Called after every forward of a layer with its new queries [B, Hq, q, d] at RoPE positions q_pos [q]
        (with ``once``, only after the first forward of a cache, unless the policy overrides `attend`)."""

    def attend(self, view: View, q: torch.Tensor, attention) -> torch.Tensor | None:
        """Replace the attention of this forward: return its output [B, q, Hq, d], or None for the model's own.
        ``attention(q, keys, values)`` runs the model's attention implementation on any keys/values, unmasked."""
        return None

    def check(self, num_layers: int) -> None:
        """Refuse (InputError) a setting a model of `num_layers` attention layers cannot run; called when an engine
        is made, before any forward."""

    def reset(self) -> None:
        """A new cache started: forget per-sequence state."""

    def release(self) -> None:
        """The context manager exited: drop the tensors held for the last cache (what a report reads stays)."""

    # ---- helpers for subclasses -----------------------------------------------------------------------
    @staticmethod
    def window_probs(view: View, queries: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """Softmax attention of `queries` [B, Hq, w, d] (the last w tokens, in order) over all n cached keys,
        causal among the last w keys: [B, Hq, w, n], fp32. Computed in query chunks (no T x T at once)."""
        return torch.cat(list(Policy._prob_chunks(view, queries, chunk)), dim=2)

    @staticmethod
    def received_attention(view: View, queries: torch.Tensor, *, chunk: int = 512) -> torch.Tensor:
        """`window_probs` summed over the queries, [B, Hq, n], chunk by chunk: the whole [B, Hq, w, n] at a 4k
        prefill is 604 MB for SmolLM2 (and as much again while it was concatenated)."""
        total = None
        for probs in Policy._prob_chunks(view, queries, chunk):
            part = probs.sum(2)  # [B, Hq, n]
            total = part if total is None else total.add_(part)
        return total

    @staticmethod
    def _prob_chunks(view: View, queries: torch.Tensor, chunk: int):
        b, hq, w, d = queries.shape
        n, g = view.n, view.groups
        k = view.keys.float()  # [B, Hkv, n, d]: each KV head serves its g query heads, no copy per query head
        for s in range(0, w, chunk):
            qc = queries[:, :, s:s + chunk].float()  # [B, Hq, c, d]
            c = qc.shape[2]
            logits = (qc.reshape(b, hq // g, g * c, d) @ k.transpose(-1, -2)).view(b, hq, c, n) * view.scaling  # [B, Hq, c, n]
            qi = torch.arange(s, s + c, device=k.device) + (n - w)  # key index of each query
            future = torch.arange(n, device=k.device)[None, :] > qi[:, None]  # [c, n]
            yield logits.masked_fill(future, float("-inf")).softmax(-1)


def _eager_module(module):
    return sys.modules[type(module).__module__]


class Engine:
    """Installs a policy on a model's attention layers; use through `prunekit.inference.kv.policy`."""

    def __init__(self, model, policy: Policy, *, budget: int | None, every: int = EVERY, once: bool = False):
        self.model = model
        self.policy = policy
        self.budget = budget
        self.every = every
        self.once = once
        self.layers = self._attention_layers(model)
        policy.check(len(self.layers))
        self.sliding_window = Engine.window(model)  # a sliding window: sequences within it only
        self.rotary = self._rotary(model)
        self.states: list[LayerState] = []
        self._buffers: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}  # layer -> key/value buffers (`_append`)
        self._cache_ref = None
        self._own: dict[str, object] = {}  # instance attributes the context replaced: name -> the user's own, or None

    @staticmethod
    def _rotary(model):
        base = getattr(model, "model", model)
        rotary = getattr(base, "rotary_emb", None)
        if rotary is None or not hasattr(rotary, "inv_freq"):
            raise InputError("this model has no rotary embedding at model.model.rotary_emb; KV policies need a RoPE "
                             "model")
        rope_type = getattr(rotary, "rope_type", "default")
        if "dynamic" in str(rope_type):
            raise InputError(f"rope type {rope_type!r} changes frequencies with length; KV policies need fixed RoPE "
                             "frequencies")
        return rotary

    @staticmethod
    def window(model) -> int | None:
        """The model's sliding window (``sliding_window``, when ``use_sliding_window`` does not turn it off), or None.
        Within it a window changes nothing (every layer sees every token), so a policy runs exactly there; a
        sequence that passes it is refused (`check_window`)."""
        config = model.config
        window = getattr(config, "sliding_window", None) if getattr(config, "use_sliding_window", True) else None
        return window if isinstance(window, int) and not isinstance(window, bool) and window > 0 else None

    @staticmethod
    def check_window(model, tokens: int) -> None:
        """Refuse (InputError) `tokens` positions in one sequence when they pass the model's sliding window: past it
        the model attends to the last `window` tokens only, which no policy here reproduces."""
        window = Engine.window(model)
        if window is not None and tokens > window:
            config = model.config
            windowed = [t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"]
            raise InputError(_window_refusal(config, window, len(windowed), reached=tokens))

    @staticmethod
    def check(model) -> None:
        """Refuse (InputError) a model the engine cannot hook, as entering a policy would, without hooking it."""
        Engine._attention_layers(model)
        Engine._rotary(model)

    @staticmethod
    def _attention_layers(model) -> list:
        config = model.config
        mtype = getattr(config, "model_type", None)
        if mtype not in SUPPORTED_MODEL_TYPES:
            raise InputError(f"model type {mtype!r} is not supported by the KV engine; supported: {', '.join(SUPPORTED_MODEL_TYPES)}")
        window = Engine.window(model)
        windowed = [t for t in (getattr(config, "layer_types", None) or []) if t != "full_attention"]
        if windowed and not window:  # sliding layers without a window size: transformers' own cache breaks on it
            raise InputError(_window_refusal(config, window, len(windowed), reached=None))
        base = getattr(model, "model", model)
        layers = getattr(base, "layers", None)
        if layers is None:
            raise InputError("cannot find the decoder layers at model.model.layers")
        attns = []
        for layer in layers:
            attn = getattr(layer, "self_attn", None)
            if attn is None or not all(hasattr(attn, p) for p in ("q_proj", "k_proj", "v_proj", "o_proj", "layer_idx")):
                raise InputError("a decoder layer has no Llama-style self_attn (q_proj/k_proj/v_proj/o_proj)")
            if "forward" in attn.__dict__:
                raise InputError("an attention module's forward is already replaced (another KV policy active, or "
                                 "accelerate offloading hooks); exit that context or load the model without offloading")
            attns.append(attn)
        return attns

    # ---- install / restore ---------------------------------------------------------------------------
    @property
    def _owner(self):
        """The module that holds `generate`: a `torch.compile` wrapper forwards attributes to the model inside it
        (the wrapper was set there but looked for on the wrapper at exit, so it outlived the context)."""
        return getattr(self.model, "_orig_mod", self.model)

    def __enter__(self):
        for attn in self.layers:
            attn.forward = types.MethodType(self._make_forward(), attn)
        owner = self._owner
        replacements = {}
        if callable(getattr(owner, "generate", None)):
            replacements["generate"] = self._make_generate(owner.generate)
        if callable(getattr(owner, "_prepare_attention_mask_for_generation", None)):
            replacements["_prepare_attention_mask_for_generation"] = self._make_mask_check(
                owner._prepare_attention_mask_for_generation)
        for name, fn in replacements.items():
            self._own[name] = owner.__dict__.get(name)  # someone's instance-level wrapper, if any
            setattr(owner, name, fn)
        return self

    def __exit__(self, *exc):
        for attn in self.layers:
            attn.__dict__.pop("forward", None)
        owner = self._owner
        for name, own in self._own.items():
            if own is None:
                owner.__dict__.pop(name, None)
            else:
                setattr(owner, name, own)
        self._own = {}
        self.states = []
        self._buffers = {}
        self._cache_ref = None
        self.policy.release()
        return False

    # ---- bookkeeping ------------------------------------------------------------------------------------
    def _state(self, cache, layer_idx: int, cache_len_before: int) -> LayerState:
        if self._cache_ref is None or self._cache_ref() is not cache:
            self._cache_ref = weakref.ref(cache)
            self.states = [LayerState(i) for i in range(len(self.layers))]
            self._buffers = {}
            self.policy.reset()
        st = self.states[layer_idx]
        known = 0 if st.orig is None else st.orig.shape[-1]
        if cache_len_before != known:
            if cache_len_before == 0:  # the cache was reset or cropped to nothing: start over for this layer
                self.states[layer_idx] = st = LayerState(layer_idx)
            else:
                raise InputError(f"layer {layer_idx}'s cache holds {cache_len_before} tokens but the KV policy tracked "
                                 f"{known}: the cache was filled or cropped outside this policy (a prompt cache made "
                                 "without it, a reused StaticCache, or assisted/speculative decoding, which crops "
                                 "the cache and is not supported); generate from a fresh cache inside the context")
        return st

    def _make_forward(self):
        engine = self

        def forward(module, hidden_states, position_embeddings=None, attention_mask=None, cache=None, **kwargs):
            if cache is None:
                cache = kwargs.pop("past_key_values", None)
            return engine._forward(module, hidden_states, position_embeddings, attention_mask, cache, kwargs)

        return forward

    def _make_generate(self, generate):
        """``model.generate`` refusing what the engine cannot do right: a padded prompt (the engine keeps no
        per-token mask once it has evicted), continuing from a cache it compressed (transformers takes the
        tokens past the cache's shrunken length as new, so it would feed evicted ones again) and an explicit
        ``use_cache=False``. A model whose config says ``use_cache: false`` (what fine-tuning with gradient
        checkpointing saves) generates with a cache here: without one the policy had nothing to compress and the
        output was the full model's, silently (and `prunekit generate`'s own cache then took every step's whole
        sequence again, at ever later positions)."""
        engine = self

        def checked(*args, **kwargs):
            config = kwargs.get("generation_config", args[1] if len(args) > 1 else None)  # generate(ids, config)
            use_cache = kwargs.get("use_cache", getattr(config, "use_cache", None))
            if use_cache is not None and not use_cache:
                raise InputError("generate was asked for use_cache=False: no cache is kept, so the KV policy has "
                                 "nothing to compress and the output would be the full model's; drop use_cache=False")
            kwargs["use_cache"] = True
            mask = kwargs.get("attention_mask")
            if isinstance(mask, torch.Tensor) and mask.dim() == 2 and bool((mask == 0).any()):
                raise InputError("the prompt is padded (its attention_mask has zeros); KV policies take one "
                                 "unpadded prompt: tokenize it alone, without padding")
            ids = kwargs.get("input_ids", kwargs.get("inputs", args[0] if args else None))
            new = kwargs.get("max_new_tokens", getattr(config, "max_new_tokens", None))
            if engine.sliding_window is not None and isinstance(ids, torch.Tensor) and isinstance(new, int):
                Engine.check_window(engine.model, ids.shape[-1] + new - 1)  # up front, not after some tokens
            chunk = kwargs.get("prefill_chunk_size", getattr(config or getattr(engine.model, "generation_config", None),
                                                             "prefill_chunk_size", None))
            if engine.once and chunk:
                raise InputError(f"prefill_chunk_size={chunk} feeds the prompt in several forwards, and once=True "
                                 "compresses only the first: drop prefill_chunk_size, or once")
            cache = kwargs.get("cache", kwargs.get("past_key_values"))  # "cache" from transformers 5.24, before it
            # past_key_values (a caller's own code may still pass that name)
            if cache is not None and engine._compressed(cache):
                raise InputError("this cache was compressed by the KV policy, so generate cannot continue from it "
                                 "(it would take the tokens past the cache's shrunken length as new and feed evicted "
                                 "ones again); pass the whole text with a fresh cache")
            return generate(*args, **kwargs)

        return checked

    @staticmethod
    def _make_mask_check(prepare):
        """transformers' own mask inference (`generate` without an ``attention_mask``: pads found by the pad id
        when it differs from EOS), refused when it finds padding as an explicit mask with zeros is."""

        def checked(*args, **kwargs):
            mask = prepare(*args, **kwargs)
            if isinstance(mask, torch.Tensor) and bool((mask == 0).any()):
                raise InputError("the prompt is padded (it holds the pad token id, which generate masks out); KV "
                                 "policies take one unpadded prompt: tokenize it alone, without padding")
            return mask

        return checked

    def _compressed(self, cache) -> bool:
        """Whether `cache` is the one this engine tracks and some layer of it still holds a compressed state (a
        cache reset to nothing starts over)."""
        if self._cache_ref is None or self._cache_ref() is not cache:
            return False
        lengths = [0 if layer.keys is None or not layer.keys.numel() else layer.keys.shape[-2]
                   for layer in getattr(cache, "layers", ())]
        return any(st.orig is not None and st.orig.shape[-1] != st.seen and i < len(lengths) and lengths[i] > 0
                   for i, st in enumerate(self.states))

    def _rope(self, x: torch.Tensor, positions: torch.Tensor):
        return self.rotary(x, positions[None, :])  # cos, sin: [1, q, d]

    def _forward(self, module, hidden_states, position_embeddings, attention_mask, cache, kwargs):
        bsz, q_len, _ = hidden_states.shape
        if bsz != 1:
            raise InputError(f"KV policies run one sequence at a time (got {bsz}: several prompts, or num_beams or "
                             "num_return_sequences > 1); generate one prompt at a time, greedy or sampled")
        mod = _eager_module(module)
        hidden_shape = (bsz, q_len, -1, module.head_dim)
        q, k = module.q_proj(hidden_states), module.k_proj(hidden_states)  # [B, q, H*d]
        norms = hasattr(module, "q_norm")
        if norms and module.q_norm.weight.shape[-1] != module.head_dim:  # OLMo-2: RMSNorm over all heads at once
            q, k = module.q_norm(q), module.k_norm(k)
        q, k = q.view(hidden_shape), k.view(hidden_shape)
        if norms and module.q_norm.weight.shape[-1] == module.head_dim:  # Qwen3: RMSNorm per head
            q, k = module.q_norm(q), module.k_norm(k)
        q = q.transpose(1, 2)  # [B, Hq, q, d]
        k = k.transpose(1, 2)  # [B, Hkv, q, d]
        v = module.v_proj(hidden_states).view(hidden_shape).transpose(1, 2)  # [B, Hkv, q, d]
        clip = getattr(module.config, "clip_qkv", None)
        if clip is not None:  # OLMo, OLMoE: q, k, v clamped after the projections (and OLMoE's norms)
            q, k, v = q.clamp(-clip, clip), k.clamp(-clip, clip), v.clamp(-clip, clip)
        interface = mod.ALL_ATTENTION_FUNCTIONS.get_interface(module.config._attn_implementation, mod.eager_attention_forward)
        dropout = 0.0 if not module.training else module.attention_dropout

        if cache is None:  # no cache (plain scoring forward): nothing to keep, behave like the model
            cos, sin = position_embeddings
            q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)
            out, weights = interface(module, q, k, v, attention_mask, dropout=dropout, scaling=module.scaling, **kwargs)
            return _output(module, out), weights

        layer_idx = module.layer_idx
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        before = 0 if layer is None or layer.keys is None or layer.keys.numel() == 0 else layer.keys.shape[-2]
        st = self._state(cache, layer_idx, before)
        if self.sliding_window is not None and st.seen + q_len > self.sliding_window:
            Engine.check_window(self.model, st.seen + q_len)
        dev = hidden_states.device
        rope_pos = torch.arange(st.next_pos, st.next_pos + q_len, device=dev)  # [q]
        given = kwargs.get("position_ids")
        if (st.next_pos == st.seen and given is not None and given.shape[-1] == q_len
                and int(given[0, 0]) == st.seen and int(given[0, -1]) == st.seen + q_len - 1):
            cos, sin = position_embeddings  # the model's own, for bitwise-identical uncompressed runs
        else:
            cos, sin = self._rope(hidden_states, rope_pos)
        q, k = mod.apply_rotary_pos_emb(q, k, cos, sin)

        keys, values = self._append(cache, layer_idx, k, v)  # [B, Hkv, n, d]
        layer = cache.layers[layer_idx]
        hkv = k.shape[1]
        new_orig = torch.arange(st.seen, st.seen + q_len, device=dev).expand(bsz, hkv, q_len)
        new_pos = rope_pos.expand(bsz, hkv, q_len)
        st.orig = new_orig.clone() if st.orig is None else torch.cat([st.orig, new_orig], dim=-1)  # [B, Hkv, n]
        st.pos = new_pos.clone() if st.pos is None else torch.cat([st.pos, new_pos], dim=-1)  # [B, Hkv, n]
        for name, t in list(st.extras.items()):  # policy tensors grow with zeros for the new entries
            st.extras[name] = torch.cat([t, t.new_zeros(*t.shape[:-1], q_len)], dim=-1)
        st.seen += q_len
        st.forwards += 1
        st.next_pos += q_len
        w = self.policy.query_window
        if w:
            st.queries = q[:, :, -w:] if st.queries is None else torch.cat([st.queries, q], dim=2)[:, :, -w:]

        view = View(layer_idx, keys, values, st, module.num_key_value_groups, module.scaling, self.budget, len(self.layers))
        def attention(q_, keys_, values_):
            return interface(module, q_, keys_, values_, None, dropout=dropout, scaling=module.scaling, is_causal=False)[0]

        out = self.policy.attend(view, q, attention)
        if out is None:
            if before == st.seen - q_len:  # nothing evicted yet: the model's mask is exact
                mask = attention_mask
            elif q_len == 1:
                mask = None
            else:  # old (compressed) entries all visible, causal among the new ones
                n = keys.shape[-2]
                mask = torch.zeros(1, 1, q_len, n, dtype=q.dtype, device=dev)
                future = torch.arange(q_len, device=dev)[None, :] > torch.arange(q_len, device=dev)[:, None]
                mask[..., n - q_len:] = mask[..., n - q_len:].masked_fill(future, torch.finfo(q.dtype).min)
            extra = {k_: v_ for k_, v_ in kwargs.items() if k_ != "position_ids"}
            out, weights = interface(module, q, keys, values, mask, dropout=dropout, scaling=module.scaling, **extra)
        else:
            weights = None
        if not (self.once and st.forwards > 1 and self.policy.compresses and type(self.policy).attend is Policy.attend):
            self.policy.observe(view, q, rope_pos)  # (once: a policy's scores are never read after its first forward)
        if self.policy.compresses and self.budget is not None and (not self.once or st.forwards == 1):
            self._maybe_compress(layer, st, view, q_len)
        return _output(module, out), weights

    def _capacity(self, needed: int) -> int:
        """Tokens a layer's key/value buffer is allocated for when `needed` no longer fit."""
        room = needed + max(GROW_MIN, needed // GROW_FRACTION)
        if self.policy.compresses and self.budget is not None and not self.once:  # never more than it lets a layer hold
            room = max(needed, min(room, self.budget + self.every))
        return room

    def _append(self, cache, layer_idx: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Append this forward's keys and values to the layer's cache in place; return the whole cache's.

        The layer's ``keys``/``values`` become views of the first ``n`` tokens of a larger buffer, so a decoding
        step writes one token instead of copying the cache (`DynamicLayer.update` concatenates: as much memory
        traffic per step as attending to the cache). A buffer grows by `_capacity` when full; a compression (which
        gathers new tensors) or anything else that replaces the layer's tensors starts a new one.
        """
        layer = cache.layers[layer_idx] if layer_idx < len(cache.layers) else None
        if layer is None or not getattr(layer, "is_initialized", False):
            cache.update(k[:, :, :0], v[:, :, :0], layer_idx)  # the layer initialises itself, holding no token yet
            layer = cache.layers[layer_idx]
        if type(layer).__name__ not in ("DynamicLayer", "DynamicSlidingWindowLayer"):
            raise InputError(f"KV policies need the default DynamicCache; got a {type(layer).__name__} layer")
        keys, values = layer.keys, layer.values
        n, q = (keys.shape[-2] if keys.dim() == 4 else 0), k.shape[-2]
        held = self._buffers.get(layer_idx)
        if held is None or keys._base is not held[0] or values._base is not held[1] or held[0].shape[-2] < n + q:
            room = self._capacity(n + q)
            kbuf = k.new_empty(*k.shape[:2], room, k.shape[3])
            vbuf = v.new_empty(*v.shape[:2], room, v.shape[3])
            if n:
                kbuf[:, :, :n] = keys
                vbuf[:, :, :n] = values
            held = self._buffers[layer_idx] = (kbuf, vbuf)
        kbuf, vbuf = held
        kbuf[:, :, n:n + q] = k
        vbuf[:, :, n:n + q] = v
        _hold(layer, kbuf[:, :, :n + q], vbuf[:, :, :n + q])
        return layer.keys, layer.values

    def _maybe_compress(self, layer, st: LayerState, view: View, q_len: int) -> None:
        n, target = layer.keys.shape[-2], self.policy.target(self.budget)
        if n <= self.budget:
            return
        if q_len == 1 and target == self.budget and n < self.budget + self.every:
            return  # decoding: let the cache run `every - 1` tokens over before paying for a compression
        view = View(view.layer, layer.keys, layer.values, st, view.groups, view.scaling, self.budget, view.num_layers)
        scores = self.policy.score(view)  # [B, Hkv, n]
        if scores.shape != st.orig.shape:
            raise RuntimeError(f"policy {self.policy.name} scored {tuple(scores.shape)}, expected {tuple(st.orig.shape)}")
        nan = scores.isnan()
        if bool(nan.any()):  # top-k would pick among NaNs by no rule at all
            raise InputError(f"policy {self.policy.name} scored NaN for {int(nan.sum())} cached tokens in layer "
                             f"{view.layer}; a score must be a number for every token (+inf keeps one)")
        idx = scores.topk(target, dim=-1).indices.sort(dim=-1).values  # [B, Hkv, m], original order
        gidx = idx[..., None].expand(-1, -1, -1, layer.keys.shape[-1])  # [B, Hkv, m, d]
        keys = layer.keys.gather(2, gidx)
        values = layer.values.gather(2, gidx)
        keep_pos = st.pos.gather(2, idx)
        new_pos = self.policy.reposition(view, keep_pos)
        if new_pos is not None:
            delta = new_pos - keep_pos
            moved = delta != 0
            if bool(moved.any()):
                keys = torch.where(moved[..., None], rotate_keys(keys, delta, self.rotary.inv_freq), keys)
            keep_pos = new_pos
            st.next_pos = int(new_pos.max()) + 1
        _hold(layer, keys, values)
        self._buffers.pop(view.layer, None)  # the old buffer goes now, not when the next token needs room
        st.orig = st.orig.gather(2, idx)
        st.pos = keep_pos
        for name, t in list(st.extras.items()):
            st.extras[name] = t.gather(2, idx)
        st.compressions += 1


def _hold(layer, keys: torch.Tensor, values: torch.Tensor) -> None:
    """Make `layer` hold `keys` and `values`; a sliding-window layer (used within its window only) counts its length
    as it holds them, as a DynamicLayer does (it would count every token it was given)."""
    layer.keys, layer.values = keys, values
    if hasattr(layer, "cumulative_length"):
        layer.cumulative_length = keys.shape[-2]


def check_budget(budget, *, name: str, minimum: int = 1, why: str = "") -> int:
    if isinstance(budget, bool) or not isinstance(budget, int):
        raise InputError(f"budget must be a whole number of tokens (got {budget!r}) for policy {name}")
    if budget < minimum:
        raise InputError(f"budget {budget} is too small for policy {name}; give at least {minimum} tokens{why}")
    return budget


def check_fraction(value, *, what: str) -> float:
    """`value` as a float in [0, 1] (a Python or numpy number); else an InputError naming `what`."""
    if not is_real(value) or not 0 <= value <= 1:
        raise InputError(f"{what} must be a number in [0.0, 1.0] (got {value!r})")
    return float(value)
