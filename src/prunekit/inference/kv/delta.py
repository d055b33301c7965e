"""DELTA: a few selection layers pick pages of the cache; the layers after them attend only to those pages.

Paper: Entezari Zarch, Gao, Jiang, Annavaram, "DELTA: Dynamic Layer-Aware Token Attention for Efficient
Long-Context Reasoning", arXiv 2510.09883 (ACL 2026). Code: hoenza/DELTA (``page_score.py``,
``page_selector_v2.py``, ``backend.py``, ``model.py``).

Layers fall in three groups. Layers before the first Δ-layer attend to the whole cache. A Δ-layer also runs
full attention, and from its probabilities p_h(t) (head h, cached token t) scores every 16-token page u:

    s_t = max_h p_h(t)            S_u = Σ_{t ∈ page u} s_t

and picks the top ``K = budget // page_size`` pages, the most recent ``recent_pages`` (L, default 8) always
among them (their score is +inf), ties broken towards earlier pages (−1e-7·u), sorted back into order. Every
layer after it, up to the next Δ-layer, is sparse: it attends only to the picked pages' tokens (gathered, so
the attention really runs over K·16 keys). Selection is redone at every decoding step. Nothing is evicted:
the full cache stays, the saving is attention compute and memory traffic. The sparse path switches on only
when the cache holds more than `budget` tokens (with a budget a multiple of the page size: more than K pages,
the reference's ``full_pages / subset_pages > compression_ratio`` with ratio 1; with another budget the
K·16 < budget keys picked then are fewer than the budget), so with a budget at least the sequence length the
output equals the full cache's. The prefill is
dense everywhere, as in the reference.

Which layers are Δ-layers: ``delta_layers`` (default: the reference's runners on a 28-layer model use full
layers {0, 1, 2, 14, 22}, i.e. Δ-layers 2, 14, 22; we scale 14/28 and 22/28 to the model's depth), or
`calibrate_delta_layers`, which places them where adjacent layers' attention maps differ most,
d_ℓ = 1 − cos(a_{ℓ−1}, a_ℓ) on a calibration text (a_ℓ: layer ℓ's head-averaged attention of the last 64
queries), skipping the first ``initial`` layers.

Departures: the reference fuses page scoring into a Triton kernel over FlashInfer's log-sum-exp; we compute
the Δ-layer's probabilities in fp32 from q and K (the Δ-layer's attention output then comes from the same
probabilities, so the model's attention implementation is used only in full and sparse layers). GQA: the max
is over all query heads, as the reference. The calibration rule is the paper's description (the released
code hard-codes layer lists).

Each sparse layer keeps its picked pages in a buffer of K pages that persists across decoding steps
(`plan`, `buffered`): a page picked again keeps its slot and only newly picked pages are copied in, so a step
copies 6.5-35% of the picked pages on average (measured at a 4k context) instead of all of them. The buffers
cost K pages of keys and values per sparse layer (at a 50% budget, half the cache again); nothing else
changes: attention does not depend on the order of the keys.

Speed on a CPU (`bench/kv_speed.py`: SmolLM2-135M, 4k context, one thread, the plain model, the engine's
full-cache policy and DELTA decoding alternately in one process, a one-thread job on the other core): budget
1024 (25%) 1.24-1.25x the plain model's speed, budget 2048 (50%) 1.10-1.15x (1.12-1.13x and 1.00-1.03x the
engine's full-cache policy; two runs). Most of that came with the engine's in-place cache append
(`engine.Engine._append`): DELTA keeps the whole cache, and `DynamicLayer.update` copied all of it at every
step. Run back to back under the same load, the code before it gave 1.056x and 1.021x, the code after it 1.239x
and 1.147x. Before the page buffers (a fresh gather of every picked page each step) it was 1.008x and 0.911x.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch

from prunekit.errors import InputError, int_at_least
from prunekit.inference.kv.engine import Engine, Policy, View, check_budget

__all__ = ["Delta", "calibrate_delta_layers", "default_delta_layers", "wiki_delta_layers"]


def default_delta_layers(num_layers: int) -> list[int]:
    """The reference's Δ-layers (2, 14, 22 of 28) scaled to `num_layers`, never the last layer (a Δ-layer there
    would pick pages no layer uses); a model of 4 layers or fewer gets one Δ-layer before its last."""
    top = num_layers - 1
    scaled = {min(2, top), min(round(num_layers * 14 / 28), top), min(round(num_layers * 22 / 28), top)}
    return sorted(x for x in scaled if x < top) or [max(top - 1, 0)]


def _layer_list(value) -> list[int]:
    """Sorted distinct layer indices from an int, a string like ``"2,14,22"`` or a list of ints."""
    if isinstance(value, str):
        items = value.replace(",", " ").split()
    else:  # an int, a list, or a numpy array / numpy integer
        items = [value] if isinstance(value, Integral) else value
    try:
        items = list(items)
    except TypeError:
        items = None
    if not items:
        raise InputError(f"delta_layers must name at least one layer index, e.g. 2,14,22; got {value!r}")
    out = set()
    for x in items:
        if isinstance(x, str) and x.strip().lstrip("-").isdigit():
            x = int(x)
        if isinstance(x, bool) or not isinstance(x, Integral):  # numpy integers are Integral, numpy bools not
            raise InputError(f"delta_layers must be whole layer indices, e.g. 2,14,22; got {value!r}")
        out.add(int_at_least(x, "a delta layer index", 0))
    return sorted(out)


class Delta(Policy):
    """DELTA: a few selection layers pick pages of the cache; the layers after them attend only to those pages."""
    name = "delta"
    compresses = False

    def __init__(self, *, budget: int, delta_layers=None, page_size: int = 16, recent_pages: int = 8):
        self.page_size = int_at_least(page_size, "page_size", 1)
        self.recent_pages = int_at_least(recent_pages, "recent_pages", 0)
        # K pages must hold more than the recent pages always kept (the old minimum, one page, was then refused)
        check_budget(budget, name=self.name, minimum=self.page_size * (self.recent_pages + 1),
                     why=f" ({self.recent_pages + 1} pages of {self.page_size}: more than the {self.recent_pages} "
                     "recent pages always kept; or lower recent_pages)")
        self.pages = budget // self.page_size  # K
        if delta_layers is not None:
            delta_layers = _layer_list(delta_layers)
        self.delta_layers = delta_layers
        super().__init__(budget=budget)
        self.reset()

    def reset(self) -> None:
        self.release()
        self.attended = 0  # keys attended, summed over decode steps and layers (for reports)
        self.available = 0  # keys a full cache would have attended

    def release(self) -> None:  # a kept policy held its sparse layers' page buffers: 37.5 MiB on SmolLM2 at 1k
        self._selected = None  # page indices picked by the last Δ-layer in this forward
        self._plan = None  # how the sparse layers after that Δ-layer update their page buffers this step
        self._slots: dict[int, dict] = {}  # per Δ-layer: the pages in its sparse layers' buffer slots
        self._buffers: dict[int, tuple] = {}  # per sparse layer: (keys, values, plan version they hold)

    def check(self, num_layers: int) -> None:
        self._layers(num_layers)

    def _layers(self, num_layers: int) -> list[int]:
        layers = self.delta_layers if self.delta_layers is not None else default_delta_layers(num_layers)
        if layers[-1] >= num_layers:
            raise InputError(f"delta layer {layers[-1]} does not exist; the model has layers 0..{num_layers - 1}")
        if not set(range(layers[0] + 1, num_layers)) - set(layers):
            raise InputError(f"delta layers {layers} leave no sparse layer in a {num_layers}-layer model (the layers "
                             "after a delta layer attend to its pages), so the budget would change nothing; end them "
                             f"before layer {num_layers - 1}")
        return layers

    def select_pages(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """Indices [K] (ascending) of the K best pages from probabilities [Hq, n] of the current query."""
        P = self.page_size
        pages = math.ceil(n / P)
        s = probs.max(dim=0).values  # [n]: max over heads
        s = torch.nn.functional.pad(s, (0, pages * P - n))  # [pages * P]
        page_score = s.view(pages, P).sum(-1) - 1e-7 * torch.arange(pages, device=s.device)  # [pages]
        if self.recent_pages:
            page_score[-self.recent_pages:] = float("inf")
        # a stable sort, not topk: once a page's score passes ~2 the float32 bias rounds away (its ulp is 2.4e-7),
        # and topk would pick among exact ties arbitrarily; the stable order keeps the earlier page
        order = torch.sort(page_score, descending=True, stable=True).indices  # [pages]
        return order[: self.pages].sort().values  # [K]

    def select(self, probs: torch.Tensor, n: int) -> torch.Tensor:
        """Token indices [m] of the K best pages from probabilities [Hq, n] of the current query."""
        top = self.select_pages(probs, n)
        idx = (top[:, None] * self.page_size + torch.arange(self.page_size, device=top.device)).flatten()  # [K * P]
        return idx[idx < n]

    def gather(self, t: torch.Tensor, pages: torch.Tensor, n: int) -> torch.Tensor:
        """``t[:, :, select(...)]`` for a cache tensor ``[B, H, n, d]``, copied page by page.

        Whole pages are picked from a ``[B, H, n // P, P, d]`` view (one row of P*d values per page: about 4x
        faster on a CPU than gathering K*P single tokens); a partial last page, when picked, is appended.
        """
        P = self.page_size
        full = n // P
        b, h, _, d = t.shape
        whole = pages[pages < full]  # [K'] ascending
        out = t[:, :, : full * P].reshape(b, h, full, P, d).index_select(2, whole).reshape(b, h, -1, d)
        if full * P < n and int(pages[-1]) == full:  # the partial last page (always the last index)
            out = torch.cat([out, t[:, :, full * P:]], dim=2)
        return out

    def plan(self, group: int, pages: torch.Tensor, n: int) -> dict:
        """Which buffer slots of the sparse layers after Δ-layer `group` get which whole pages this step.

        The buffers hold the picked whole pages in slots ``0..nf-1`` (any order: attention does not depend on
        the order of the keys) followed by the partial last page's rows. A page picked again keeps its slot; only
        pages newly picked are copied in (from the cache), into the slots of pages dropped; pages in slots past
        the new count move down into the holes. On SmolLM2-135M at a 4k context, 6.5-35% of the pages are new
        from one step to the next, so this copies that share instead of every picked page.
        """
        P = self.page_size
        full = n // P
        chosen = pages.tolist()
        new_full = [p for p in chosen if p < full]
        nf = len(new_full)
        st = self._slots.get(group)
        fresh = st is None or n < st["n"]
        old = [] if fresh else st["slots"]
        keep = set(new_full)
        slots = [p if p in keep else None for p in old] + [None] * max(0, nf - len(old))
        movers = [p for p in slots[nf:] if p is not None]  # kept pages sitting past the new end
        slots = slots[:nf]
        placed = set(p for p in slots if p is not None) | set(movers)
        fill = movers + [p for p in new_full if p not in placed]
        holes = [i for i, p in enumerate(slots) if p is None]
        for i, p in zip(holes, fill):
            slots[i] = p
        version = (0 if st is None else st["version"]) + 1
        self._slots[group] = {"slots": slots, "n": n, "version": version}
        return {"version": version, "fresh": fresh, "n": n, "nf": nf, "full": full,
                "partial": n > full * P and bool(chosen) and chosen[-1] == full,
                "copy_slots": torch.tensor(holes, dtype=torch.long), "copy_pages": torch.tensor(fill, dtype=torch.long),
                "slots": slots}

    def buffered(self, layer: int, t: tuple[torch.Tensor, torch.Tensor], plan: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """This sparse layer's keys and values of the picked pages, from its buffer updated by `plan`.

        Equal, up to the order of the keys, to `gather` of each; a layer that missed the previous step's
        update (or a new sequence) rebuilds its buffer from scratch.
        """
        P, K = self.page_size, self.pages
        keys, values = t
        b, h, _, d = keys.shape
        held = self._buffers.get(layer)
        if held is None or held[0].shape[:2] != (b, h) or held[0].dtype != keys.dtype or held[0].shape[3] != d:
            held = (keys.new_empty(b, h, K * P, d), values.new_empty(b, h, K * P, values.shape[3]), -1)
        kbuf, vbuf, version = held
        if plan["fresh"] or version != plan["version"] - 1:  # rebuild: every slot
            slots, pages = torch.arange(plan["nf"]), torch.tensor(plan["slots"], dtype=torch.long)
        else:
            slots, pages = plan["copy_slots"], plan["copy_pages"]
        slots, pages = slots.to(keys.device), pages.to(keys.device)  # index tensors on the cache's device (a GPU's)
        full, nf, n = plan["full"], plan["nf"], plan["n"]
        m = nf * P
        for src, buf in ((keys, kbuf), (values, vbuf)):
            if slots.numel():
                whole = src[:, :, : full * P].reshape(b, h, full, P, src.shape[3]).index_select(2, pages)
                buf.view(b, h, K, P, buf.shape[3]).index_copy_(2, slots, whole)
            if plan["partial"]:
                buf[:, :, m: m + n - full * P] = src[:, :, full * P: n]
        self._buffers[layer] = (kbuf, vbuf, plan["version"])
        end = m + (n - full * P if plan["partial"] else 0)
        return kbuf[:, :, :end], vbuf[:, :, :end]

    def attend(self, view: View, q: torch.Tensor, attention):
        if q.shape[2] != 1:
            self._slots.clear()  # prefill (or several tokens at once): dense; the page buffers start over
            return None
        n, layer = view.n, view.layer
        layers = self._layers(view.num_layers)
        self.available += n
        if n <= self.budget or layer < layers[0]:  # the cache fits the budget: full attention everywhere
            self.attended += n
            return None
        if layer in layers:
            b, hq, _, d = q.shape
            hkv = hq // view.groups
            qg = q.float().reshape(b, hkv, view.groups, d)  # [1, Hkv, g, d]: the query heads of each KV head
            probs = ((qg @ view.keys.float().transpose(-1, -2)) * view.scaling).softmax(-1)  # [1, Hkv, g, n]
            out = (probs.to(view.values.dtype) @ view.values).reshape(b, 1, hq, d)  # [1, 1, Hq, d]
            probs = probs.reshape(b, hq, 1, n)  # [1, Hq, 1, n]
            self._selected = self.select_pages(probs[0, :, 0], n)
            self._plan = self.plan(layer, self._selected, n)
            self.attended += n
            return out
        keys, values = self.buffered(layer, (view.keys, view.values), self._plan)  # [1, Hkv, m, d] each
        self.attended += keys.shape[2]
        return attention(q, keys, values)  # [1, 1, Hq, d]


class _AttentionProbe(Policy):
    """Records each layer's head-averaged attention of the last `window` prompt queries (for calibration)."""

    name = "probe"
    compresses = False

    def __init__(self, window: int):
        super().__init__(budget=None)
        self.window = window
        self.maps: dict[int, torch.Tensor] = {}

    def observe(self, view: View, q: torch.Tensor, q_pos: torch.Tensor) -> None:
        w = min(self.window, q.shape[2])
        self.maps[view.layer] = self.window_probs(view, q[:, :, -w:]).mean(1)[0]  # [w, n]


@torch.no_grad()
def calibrate_delta_layers(model, input_ids: torch.Tensor, *, count: int = 3, initial: int = 2, window: int = 64):
    """Place `count` Δ-layers where adjacent layers' attention maps shift most, on a calibration prompt.

    Returns ``(layers, shifts)``: the chosen layer indices (sorted) and d_ℓ = 1 − cos(a_{ℓ−1}, a_ℓ) for every
    layer ℓ ≥ 1 (``shifts[ℓ - 1]``), where a_ℓ is layer ℓ's attention of the last `window` queries over the
    prompt, averaged over heads. Layers below `initial` stay full attention and are never chosen.

    >>> # layers, shifts = calibrate_delta_layers(model, tok("long text ...", return_tensors="pt").input_ids)
    """
    int_at_least(count, "count", 1)
    int_at_least(initial, "initial", 1)
    int_at_least(window, "window", 1)
    if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise InputError("input_ids must be a [1, T] tensor of token ids")
    if input_ids.dtype not in (torch.long, torch.int) or input_ids.shape[1] < 1:
        raise InputError(f"input_ids must be integer token ids [1, T >= 1], got {input_ids.dtype} "
                         f"{list(input_ids.shape)}; tokenize a prompt with the model's tokenizer")
    vocab = model.get_input_embeddings().num_embeddings  # (a prompt past the model's positions is allowed)
    lo, hi = int(input_ids.min()), int(input_ids.max())
    if lo < 0 or hi >= vocab:
        raise InputError(f"the calibration prompt has token id {lo if lo < 0 else hi}, outside the model's vocabulary "
                         f"of {vocab}; use the model's own tokenizer")
    num_layers = model.config.num_hidden_layers
    if initial + count > num_layers - 1:  # a delta layer needs a sparse layer after it: never the last one
        raise InputError(f"cannot place {count} delta layers after {initial} initial layers and before the last "
                         f"layer of a {num_layers}-layer model")
    from transformers import DynamicCache

    from prunekit.weights.engine import input_device

    probe = _AttentionProbe(window)
    with Engine(model, probe, budget=None):
        model(input_ids=input_ids.to(input_device(model)), cache=DynamicCache(config=model.config), use_cache=True)
    maps = [probe.maps[i].flatten() for i in range(num_layers)]
    shifts = [1.0 - float(torch.nn.functional.cosine_similarity(maps[i - 1], maps[i], dim=0)) for i in range(1, num_layers)]
    ranked = sorted(range(initial, num_layers - 1), key=lambda layer: -shifts[layer - 1])
    return sorted(ranked[:count]), shifts


WIKI_CALIBRATION_TOKENS = 1024
WIKI_MIN_TOKENS = 64  # the query window the placement compares


def wiki_delta_layers(model, tokenizer, *, tokens: int = WIKI_CALIBRATION_TOKENS):
    """`calibrate_delta_layers` on the first `tokens` tokens of the bundled Wikipedia calibration text.

    The paper's placement (3 Δ-layers after 2 full ones, last 64 queries); a model shallower than 6 layers gets
    fewer, and one of fewer than 3 layers none (an InputError: a Δ-layer goes after layer 0 and before the last).
    Returns ``(layers, shifts)``. Needs the zoo's offline text assets.
    """
    import prunekit

    int_at_least(tokens, "tokens", WIKI_MIN_TOKENS, hint=" (the placement compares the last 64 queries' attention)")
    depth = model.config.num_hidden_layers
    if depth < 3:
        raise InputError(f"calibrating delta layers needs a model of at least 3 layers (a delta layer goes after "
                         f"layer 0 and before the last); this one has {depth}: give delta_layers yourself")
    text = prunekit.load_text("wiki", purpose="calibration").text
    ids = tokenizer(text[: 20 * tokens], return_tensors="pt")["input_ids"][:, :tokens]
    initial = min(2, depth - 2)
    return calibrate_delta_layers(model, ids, count=max(1, min(3, depth - 1 - initial)), initial=initial, window=64)
