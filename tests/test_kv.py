"""KV-cache policies on tiny Llama-style models (GQA: 4 query heads, 2 KV heads): exactness with a large budget,
real cache shrinkage, each policy's rule checked against an independent computation, RoPE re-rotation, and
a model left exactly as it was."""

import json
import math

import numpy as np
import pytest
import torch
from transformers import DynamicCache, LlamaConfig, LlamaForCausalLM

import prunekit.inference.kv as kv
from prunekit import cli
from prunekit.errors import InputError
from prunekit.inference.kv.engine import Engine, View, LayerState

SMALL_DELTA = {"page_size": 4, "recent_pages": 2}


def make_model(impl="sdpa", layers=4, seed=0):
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = impl
    torch.manual_seed(seed)
    return LlamaForCausalLM(cfg).eval()


def prompt(n=40, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (1, n), generator=g)


def options(name):
    return SMALL_DELTA if name == "delta" else {}


def generate(model, ids, new=16):
    cache = DynamicCache(config=model.config)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=new, do_sample=False,
                         pad_token_id=0, cache=cache)
    return out, cache


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models decode token by token: extra threads only add contention (20x slower on a busy 2-core box)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def models():
    return {impl: make_model(impl) for impl in ("sdpa", "eager")}


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", list(kv.POLICIES))
def test_budget_at_least_the_sequence_gives_the_full_cache_output(models, impl, name):
    model = models[impl]
    ids = prompt()
    ref, _ = generate(model, ids)
    with kv.policy(model, name, budget=64, **options(name)):
        out, cache = generate(model, ids)
    assert torch.equal(out, ref)
    assert kv.cache_tokens(cache) == [ids.shape[1] + 15] * 4


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "snapkv", "knorm", "deep_forcing"])
@pytest.mark.parametrize("every", [1, 4])
def test_the_cache_really_shrinks_to_the_budget(models, name, every):
    model, ids, budget = models["sdpa"], prompt(), 24
    _, full_cache = generate(model, ids)
    with kv.policy(model, name, budget=budget, every=every) as pol:
        out, cache = generate(model, ids)
    tokens = kv.cache_tokens(cache)
    assert max(tokens) <= budget + (every - 1 if pol.target(budget) == budget else 0)
    if pol.target(budget) < budget:  # deep forcing refills between compressions
        assert max(tokens) >= pol.target(budget)
    per_token = 2 * 2 * 16 * 4 * 4  # K and V x 2 KV heads x head_dim 16 x fp32 x 4 layers
    # what the layers hold, plus the room their buffers keep for the next tokens: never past budget + every
    assert sum(tokens) * per_token // 4 <= kv.cache_bytes(cache) <= (budget + every) * per_token
    assert kv.cache_bytes(cache) <= kv.cache_bytes(full_cache) * (budget + every) / (ids.shape[1] + 15)


def test_decoding_appends_to_the_cache_in_place_and_cache_bytes_counts_the_room(models):
    model, ids = models["sdpa"], prompt()
    plain = DynamicCache(config=model.config)
    cache = DynamicCache(config=model.config)
    step = ids[:, -1:]
    with torch.no_grad():
        ref = [model(input_ids=ids, cache=plain, use_cache=True).logits]
        ref += [model(input_ids=step, cache=plain, use_cache=True).logits for _ in range(6)]
        with kv.policy(model, "full"):
            out = [model(input_ids=ids, cache=cache, use_cache=True).logits]  # the prefill makes the buffers
            ptrs = [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers]
            out += [model(input_ids=step, cache=cache, use_cache=True).logits for _ in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert [(layer.keys.data_ptr(), layer.values.data_ptr()) for layer in cache.layers] == ptrs  # nothing copied
    assert kv.cache_tokens(cache) == [ids.shape[1] + 6] * 4
    room = ids.shape[1] + 128  # the buffer made at the prefill: what it needed plus 128 tokens
    assert kv.cache_bytes(cache) == 4 * 2 * (2 * room * 16 * 4)  # layers x (K, V) x (KV heads x tokens x dim x fp32)
    assert kv.cache_bytes(plain) == 4 * 2 * (2 * (ids.shape[1] + 6) * 16 * 4)


def test_a_full_buffer_is_remade_larger_with_its_tokens(models, monkeypatch):
    from prunekit.inference.kv import engine

    monkeypatch.setattr(engine, "GROW_MIN", 2)  # room for 2 more tokens: the buffers are remade every 2 steps
    model, ids = models["sdpa"], prompt()
    plain, cache = DynamicCache(config=model.config), DynamicCache(config=model.config)
    step = ids[:, -1:]
    with torch.no_grad():
        ref = [model(input_ids=ids, cache=plain, use_cache=True).logits]
        ref += [model(input_ids=step, cache=plain, use_cache=True).logits for _ in range(7)]
        with kv.policy(model, "full"):
            out = [model(input_ids=ids, cache=cache, use_cache=True).logits]
            ptrs = {cache.layers[0].keys.data_ptr()}
            for _ in range(7):
                out.append(model(input_ids=step, cache=cache, use_cache=True).logits)
                ptrs.add(cache.layers[0].keys.data_ptr())
    assert len(ptrs) >= 3  # remade at least twice
    assert all(torch.equal(a, b) for a, b in zip(out, ref))
    assert all(torch.equal(a.keys, b.keys) and torch.equal(a.values, b.values) for a, b in zip(cache.layers, plain.layers))
    assert kv.cache_bytes(cache) <= 4 * 2 * (2 * (ids.shape[1] + 7 + 2) * 16 * 4)


def test_a_compressing_policy_never_holds_room_past_its_budget(models):
    model, ids, budget, every = models["sdpa"], prompt(), 24, 4
    step = ids[:, -1:]
    cache = DynamicCache(config=model.config)
    with torch.no_grad(), kv.policy(model, "h2o", budget=budget, every=every):
        model(input_ids=ids, cache=cache, use_cache=True)
        for _ in range(9):
            model(input_ids=step, cache=cache, use_cache=True)
            for layer in cache.layers:
                assert layer.keys.untyped_storage().nbytes() <= 2 * (budget + every) * 16 * 4
            assert max(kv.cache_tokens(cache)) <= budget + every - 1


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "snapkv", "knorm", "deep_forcing"])
def test_once_compresses_the_prompt_only_and_keeps_every_generated_token(models, name):
    model, ids, budget = models["sdpa"], prompt(), 24
    with kv.policy(model, name, budget=budget, once=True) as pol:  # 24 new tokens pass budget + every (16)
        out, cache = generate(model, ids, new=24)
        again, second = generate(model, ids, new=24)  # a new cache: its prompt is compressed again
    kept = pol.target(budget)
    assert kv.cache_tokens(cache) == [kept + 23] * 4 and kv.cache_tokens(second) == [kept + 23] * 4
    assert torch.equal(again, out)
    if name in ("streaming_llm", "deep_forcing"):
        return  # they re-position what they keep; the reference below numbers tokens as the prompt did
    # the reference: the policy compresses the prompt's forward, then the plain model decodes on that cache
    ref_cache = DynamicCache(config=model.config)
    with torch.no_grad():
        with kv.policy(model, name, budget=budget):
            logits = model(input_ids=ids, cache=ref_cache, use_cache=True).logits
        tokens = [int(logits[0, -1].argmax())]
        for i in range(23):
            step = torch.tensor([[tokens[-1]]])
            logits = model(input_ids=step, cache=ref_cache, use_cache=True,
                           position_ids=torch.tensor([[ids.shape[1] + i]])).logits
            tokens.append(int(logits[0, -1].argmax()))
    assert out[0, ids.shape[1]:].tolist() == tokens
    with kv.policy(model, name, budget=budget):  # without once: compressed while decoding too
        assert max(kv.cache_tokens(generate(model, ids, new=24)[1])) < kept + 23


def test_once_keeps_a_question_fed_after_the_compressed_context():
    """kvpress's protocol: the context's forward is compressed, the question's and the answer's are appended."""
    model, ids = _boundary_model()
    for name in ("snapkv", "deep_forcing"):
        policy = kv.make_policy(name, budget=16)
        engine, cache = Engine(model, policy, budget=16, once=True), DynamicCache(config=model.config)
        with engine, torch.no_grad():
            model(input_ids=ids[:, :30], cache=cache, use_cache=True)
            kept = kv.cache_tokens(cache)
            model(input_ids=ids[:, 30:], cache=cache, use_cache=True)  # the question: 15 tokens
            for _ in range(3):
                model(input_ids=ids[:, -1:], cache=cache, use_cache=True)
            assert kept == [policy.target(16)] * 4
            assert kv.cache_tokens(cache) == [policy.target(16) + 15 + 3] * 4
            assert {s.compressions for s in engine.states} == {1} and {s.forwards for s in engine.states} == {5}
    with pytest.raises(InputError, match="once must be True or False"):
        with kv.policy(model, "h2o", budget=8, once=1):
            pass


def test_once_refuses_a_chunked_prefill_and_stops_scoring_after_the_first_forward(models, monkeypatch):
    from prunekit.inference.kv.h2o import H2O

    model, ids = models["sdpa"], prompt()
    with kv.policy(model, "h2o", budget=24, once=True), pytest.raises(InputError, match="prefill_chunk_size=16 feeds"):
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, prefill_chunk_size=16,
                       do_sample=False, pad_token_id=0)
    with kv.policy(model, "h2o", budget=24):  # without once every chunk is compressed in turn: allowed
        model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, prefill_chunk_size=16,
                       do_sample=False, pad_token_id=0)
    calls = []
    observe = H2O.observe
    monkeypatch.setattr(H2O, "observe", lambda self, view, q, pos: calls.append(view.layer) or observe(self, view, q,
                                                                                                        pos))
    with kv.policy(model, "h2o", budget=24, once=True):
        once, _ = generate(model, ids, new=6)
    assert sorted(calls) == [0, 1, 2, 3]  # the prompt's forward only: its scores are never read again
    calls.clear()
    with kv.policy(model, "h2o", budget=24, every=100):  # compresses the prompt only, as once does
        plain, _ = generate(model, ids, new=6)
    assert len(calls) == 4 * 6 and torch.equal(once, plain)


def test_model_is_restored_exactly_on_exit_even_after_an_error(models):
    model = models["sdpa"]
    ids = prompt()
    state = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        logits = model(ids).logits
    for name in kv.POLICIES:
        with pytest.raises(RuntimeError, match="boom"):
            with kv.policy(model, name, budget=24, **options(name)):
                generate(model, ids, new=4)
                raise RuntimeError("boom")
    assert model.config._attn_implementation == "sdpa"
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)
    assert "generate" not in model.__dict__
    after = model.state_dict()
    assert after.keys() == state.keys() and all(torch.equal(after[k], state[k]) for k in state)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


class _NaNScores(kv.Policy):
    name = "nan-scores"

    def score(self, view):
        s = view.keys.norm(dim=-1)  # [B, Hkv, n]
        s[..., 1] = float("nan")
        return s


def test_a_policy_that_scores_nan_is_named_and_the_model_restored(models):
    model, ids = models["sdpa"], prompt()
    with torch.no_grad():
        logits = model(ids).logits
    with pytest.raises(InputError, match=r"policy nan-scores scored NaN for 2 cached tokens in layer 0"):
        with kv.policy(model, _NaNScores(budget=8)):
            generate(model, ids, new=2)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, logits)


def test_batches_and_bad_input_are_refused(models):
    model = models["sdpa"]
    with kv.policy(model, "snapkv", budget=16), pytest.raises(InputError, match="one sequence at a time"):
        generate(model, prompt().repeat(2, 1))
    ids = prompt()
    for many in ({"num_beams": 2}, {"do_sample": True, "num_return_sequences": 2}):  # was worded as a batch
        with kv.policy(model, "snapkv", budget=16), pytest.raises(InputError, match="num_beams or num_return"):
            model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, pad_token_id=0, **many)
    with pytest.raises(InputError, match="unknown KV policy"):
        kv.make_policy("lru", budget=8)
    with pytest.raises(InputError, match="needs a budget"):
        kv.make_policy("h2o", budget=None)
    with pytest.raises(InputError, match="whole number"):
        kv.make_policy("snapkv", budget=12.5)
    with pytest.raises(InputError, match=r"snapkv takes no option\(s\) \[.sinks.\]"):
        kv.make_policy("snapkv", budget=12, sinks=3)
    with pytest.raises(InputError, match=r"give at least 144 tokens \(9 pages of 16: more than the 8 recent"):
        kv.make_policy("delta", budget=64, page_size=16, recent_pages=8)
    assert kv.make_policy("delta", budget=144, page_size=16, recent_pages=8).pages == 9  # the minimum it names works
    with pytest.raises(InputError, match="give at least 144 tokens"):
        kv.make_policy("delta", budget=143, page_size=16, recent_pages=8)
    with pytest.raises(InputError, match="leaves no room"):
        kv.make_policy("deep_forcing", budget=20, sinks=0.6, recent=0.3)
    with kv.policy(model, "h2o", budget=16), pytest.raises(InputError, match="already replaced"):
        with kv.policy(model, "h2o", budget=16):
            pass
    # a Policy object and a different budget= : the argument was silently ignored
    with pytest.raises(InputError, match="built with budget=8; give the budget to its constructor"):
        with kv.policy(model, kv.H2O(budget=8), budget=100):
            pass
    with kv.policy(model, kv.H2O(budget=8), budget=8) as pol:  # the same budget twice is fine
        assert pol.budget == 8


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "snapkv", "knorm", "deep_forcing"])
def test_generate_refuses_a_padded_prompt_and_continuing_from_a_compressed_cache(models, name):
    # a padded row's masked pads became StreamingLLM's sinks and H2O's heavy hitters once entries were evicted;
    # a compressed cache handed back to generate had already-seen tokens fed again as new text
    model = models["sdpa"]
    ids = prompt(30)
    padded = torch.cat([torch.zeros(1, 6, dtype=ids.dtype), ids], 1)
    mask = torch.cat([torch.zeros(1, 6, dtype=ids.dtype), torch.ones_like(ids)], 1)
    with kv.policy(model, name, budget=16), pytest.raises(InputError, match="prompt is padded"):
        model.generate(padded, attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    for budget, compressed in ((16, True), (200, False)):
        with kv.policy(model, name, budget=budget):
            first = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=6, do_sample=False,
                                   pad_token_id=0, return_dict_in_generate=True)
            more = torch.cat([first.sequences, prompt(5, seed=9)], 1)
            kwargs = dict(attention_mask=torch.ones_like(more), max_new_tokens=6, do_sample=False, pad_token_id=0)
            if compressed:
                with pytest.raises(InputError, match="compressed by the KV policy"):
                    model.generate(more, cache=first.cache, **kwargs)
            else:  # nothing evicted: continuing is exact
                assert torch.equal(model.generate(more, cache=first.cache, **kwargs),
                                   model.generate(more, **kwargs))
    assert "generate" not in model.__dict__


def test_padding_found_by_the_pad_id_is_refused_and_a_reset_cache_starts_over(models):
    # without an attention_mask transformers masks the pad id's tokens itself (pad != EOS); the engine masked them
    # at prefill only, so pads that survived eviction were attended while decoding
    model = models["sdpa"]
    ids = prompt(30)
    padded = torch.cat([torch.zeros(1, 6, dtype=ids.dtype), ids], 1)
    for name in ("streaming_llm", "h2o"):
        with kv.policy(model, name, budget=16), pytest.raises(InputError, match="prompt is padded"):
            model.generate(padded, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=1)
        with kv.policy(model, name, budget=16):  # the pad id equal to EOS masks nothing, so nothing is refused
            model.generate(ids, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=0)
    # a compressed cache reset to nothing is a fresh cache again: it was refused as "compressed"
    cache = DynamicCache(config=model.config)
    kwargs = dict(attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False, pad_token_id=0)
    with kv.policy(model, "h2o", budget=8, every=1):
        model.generate(ids, cache=cache, **kwargs)
        assert max(kv.cache_tokens(cache)) <= 8
        cache.reset()
        again = model.generate(ids, cache=cache, **kwargs)
        fresh = model.generate(ids, cache=DynamicCache(config=model.config), **kwargs)
    assert torch.equal(again, fresh)
    assert "generate" not in model.__dict__ and "_prepare_attention_mask_for_generation" not in model.__dict__


def test_a_compiled_model_is_restored_on_exit(models):
    # the generate wrapper set through torch.compile's wrapper lands on the model inside it; exit looked for it on
    # the wrapper, so it stayed and refused the padded batches of later plain generate calls
    model = models["sdpa"]
    compiled = torch.compile(model, backend="eager")
    with kv.policy(compiled, "h2o", budget=8):
        assert "generate" in model.__dict__
    assert "generate" not in model.__dict__ and "_prepare_attention_mask_for_generation" not in model.__dict__
    ids = torch.cat([prompt(12), torch.cat([torch.zeros(1, 4, dtype=torch.long), prompt(8, seed=2)], 1)], 0)
    mask = (ids != 0).long()
    model.generate(ids, attention_mask=mask, max_new_tokens=2, do_sample=False, pad_token_id=0)  # no policy: fine


def test_cache_filled_outside_the_policy_is_named_and_eager_attention_weights_come_back(models):
    model = models["eager"]
    ids = prompt(20)
    cache = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=cache, use_cache=True)  # a prompt cache made without the policy
    more = torch.cat([ids, prompt(4, seed=5)], 1)
    with kv.policy(model, "h2o", budget=16), pytest.raises(InputError, match="filled or cropped outside this policy"):
        model.generate(more, attention_mask=torch.ones_like(more), cache=cache, max_new_tokens=3, pad_token_id=0)
    plain = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                           pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    with kv.policy(model, "full"):  # output_attentions came back as empty tuples
        wrapped = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=3, do_sample=False,
                                 pad_token_id=0, output_attentions=True, return_dict_in_generate=True)
    assert [len(step) for step in wrapped.attentions] == [len(step) for step in plain.attentions] == [4, 4, 4]
    assert torch.allclose(wrapped.attentions[0][0], plain.attentions[0][0], atol=1e-6)


def test_delta_with_an_ample_budget_off_the_page_grid_and_small_models_default_layers():
    # budget 150 kept 9 pages (144 tokens): the sparse layers dropped a page once the cache passed 144
    model = make_model(layers=4)
    ids = prompt(100)
    ref, _ = generate(model, ids, new=40)
    with kv.policy(model, "delta", budget=150, recent_pages=2) as pol:
        out, _ = generate(model, ids, new=40)
    assert torch.equal(out, ref) and pol.attended == pol.available
    # the defaults on 2-4 layers had no sparse layer: the budget changed nothing, silently
    for layers in (2, 3, 4, 6, 30):
        chosen = kv.default_delta_layers(layers)
        assert chosen[-1] < layers - 1 and set(range(chosen[0] + 1, layers)) - set(chosen)
    assert kv.default_delta_layers(30) == [2, 15, 24]
    small = make_model(layers=3)
    with kv.policy(small, "delta", budget=48, recent_pages=1, page_size=16) as pol:
        generate(small, prompt(100), new=8)
    assert pol.attended < pol.available
    with pytest.raises(InputError, match="leave no sparse layer"):  # on entering, before any forward
        with kv.policy(small, "delta", budget=48, recent_pages=1, delta_layers=[1, 2]):
            generate(small, prompt(100), new=8)


def test_rotating_a_key_by_delta_equals_computing_it_at_the_new_position(models):
    model = models["sdpa"]
    rot, attn = model.model.rotary_emb, model.model.layers[0].self_attn
    x = torch.randn(1, 6, 64)
    k = attn.k_proj(x).view(1, 6, 2, 16).transpose(1, 2)  # [1, Hkv, 6, d]
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    def at(pos):
        cos, sin = rot(x, torch.tensor([pos]))
        return apply_rotary_pos_emb(k, k, cos, sin)[1]

    old, new = [3, 10, 200, 7, 0, 450], [0, 1, 2, 300, 5, 449]
    delta = torch.tensor(new) - torch.tensor(old)
    moved = kv.rotate_keys(at(old), delta.expand(1, 2, 6), rot.inv_freq)
    assert torch.allclose(moved, at(new), atol=1e-5)
    assert not torch.allclose(at(old), at(new), atol=1e-2)


def layer0_keys(model, ids, positions):
    """Layer 0's RoPE'd keys of tokens `ids` [n] computed afresh at `positions` [n]."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    layer = model.model.layers[0]
    h = layer.input_layernorm(model.model.embed_tokens(ids[None]))
    k = layer.self_attn.k_proj(h).view(1, len(ids), 2, 16).transpose(1, 2)
    cos, sin = model.model.rotary_emb(h, positions[None])
    return apply_rotary_pos_emb(k, k, cos, sin)[1]  # [1, Hkv, n, d]


def test_streaming_llm_keeps_sinks_and_recent_at_positions_within_the_cache(models):
    model, ids, budget = models["sdpa"], prompt(), 16
    pol = kv.StreamingLLM(budget=budget, sinks=4)
    with Engine(model, pol, budget=budget, every=1) as engine:
        out, cache = generate(model, ids, new=10)
        seq = out[0]
        st = engine.states[0]
        seen = st.seen
        kept = st.orig[0, 0].tolist()
        pos = st.pos[0, 0].tolist()
        assert kept == [0, 1, 2, 3] + list(range(seen - 12, seen))
        assert pos == list(range(16)) and st.next_pos == 16
        fresh = layer0_keys(model, seq[:seen][torch.tensor(kept)], torch.arange(16))
        assert torch.allclose(cache.layers[0].keys, fresh, atol=1e-4)


def test_h2o_keeps_the_heavy_hitters_of_the_model_own_attention(models):
    model, ids, budget = models["eager"], prompt(48), 20
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions  # per layer [1, Hq, T, T]
    with Engine(model, kv.H2O(budget=budget, recent=0.5), budget=budget) as engine:
        with torch.no_grad():
            model(ids, cache=DynamicCache(config=model.config), use_cache=True)
        for layer, a in enumerate(att):
            acc = a[0].sum(1).view(2, 2, -1).sum(1)  # [Hkv, T]: received attention, summed over queries and group
            for h in range(2):
                heavy = acc[h, :-10].topk(10).indices.sort().values.tolist()
                assert engine.states[layer].orig[0, h].tolist() == heavy + list(range(38, 48))


def test_snapkv_keeps_the_pooled_votes_of_the_window_per_kv_head(models):
    model, ids, budget, w = models["eager"], prompt(48), 20, 8
    with torch.no_grad():
        att = model(ids, output_attentions=True).attentions
    with Engine(model, kv.SnapKV(budget=budget, window=w, kernel=3), budget=budget) as engine:
        with torch.no_grad():
            model(ids, cache=DynamicCache(config=model.config), use_cache=True)
        for layer, a in enumerate(att):
            votes = a[0, :, -w:, :-w].mean(1)  # [Hq, T - w]
            votes = torch.nn.functional.avg_pool1d(votes[:, None], 3, stride=1, padding=1)[:, 0].view(2, 2, -1).mean(1)
            kept = [engine.states[layer].orig[0, h].tolist() for h in range(2)]
            for h in range(2):
                assert kept[h] == votes[h].topk(budget - w).indices.sort().values.tolist() + list(range(40, 48))
            assert kept[0] != kept[1]  # per KV head


def test_knorm_keeps_the_lowest_key_norms_per_kv_head(models):
    model, ids, budget = models["sdpa"], prompt(48), 20
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(ids, cache=plain, use_cache=True)
    with Engine(model, kv.Knorm(budget=budget), budget=budget) as engine:
        cache = DynamicCache(config=model.config)
        with torch.no_grad():
            model(ids, cache=cache, use_cache=True)
        for layer, full in enumerate(plain.layers):
            norms = full.keys[0].norm(dim=-1)  # [Hkv, T]
            kept = [engine.states[layer].orig[0, h].tolist() for h in range(2)]
            for h in range(2):
                assert kept[h] == (-norms[h]).topk(budget).indices.sort().values.tolist()
                assert torch.equal(cache.layers[layer].keys[0, h], full.keys[0, h, kept[h]])
            assert kept[0] != kept[1]  # per KV head
    keys = torch.randn(1, 2, 30, 16)
    keys[0, 1, [3, 17]] *= 1e-3  # planted: the two smallest keys of KV head 1
    top = kv.Knorm(budget=2).score(synthetic_view(keys, None, 2)).topk(2).indices.sort().values
    assert top[0, 1].tolist() == [3, 17]


def synthetic_view(keys, queries, budget, groups=2):
    b, hkv, n, d = keys.shape
    st = LayerState(0, seen=n, next_pos=n, orig=torch.arange(n).expand(b, hkv, n), pos=torch.arange(n).expand(b, hkv, n),
                    queries=queries)
    return View(0, keys, torch.zeros_like(keys), st, groups, 1 / math.sqrt(d), budget, 4)


def test_h2o_credits_each_kv_head_with_its_own_group_of_query_heads():
    """Query heads 0, 1 read KV head 0 and heads 2, 3 read KV head 1: each KV head accumulates its own group's
    attention (crediting KV head 0 with heads 0 and 2 ran without an error, as the shapes match)."""
    d, n = 16, 30
    keys = torch.randn(1, 2, n, d, generator=torch.Generator().manual_seed(0)) * 0.1
    u, v = torch.eye(d)[0], torch.eye(d)[1]
    keys[0, 0, 3], keys[0, 1, 17] = 8 * u, 8 * v  # KV head 0 has a key at 3 for u, KV head 1 at 17 for v
    q = torch.stack([8 * u, 8 * u, 8 * v, 8 * v])[None, :, None, :]  # [1, Hq, 1, d]
    view = synthetic_view(keys, None, 2)
    h2o = kv.H2O(budget=2, recent=0.0)
    h2o.observe(view, q, torch.tensor([n]))
    acc = h2o.score(view)  # [1, Hkv, n]
    assert acc[0, 0, 3] == pytest.approx(2.0, abs=1e-4) and acc[0, 1, 17] == pytest.approx(2.0, abs=1e-4)
    assert acc[0].sum(-1).tolist() == pytest.approx([2.0, 2.0])  # two query heads' attention per KV head


def test_h2o_sums_a_long_prefill_attention_chunk_by_chunk(monkeypatch):
    """H2O materialised the prefill's whole [B, Hq, T, T] probabilities (604 MB at 4k on SmolLM2, twice while
    concatenated): peak RSS 2.5 GB against 1.5 GB now for a 4k prompt at budget 1024, same tokens."""
    g = torch.Generator().manual_seed(0)
    n, d = 1300, 8  # three chunks of 512 queries
    keys, q = torch.randn(1, 2, n, d, generator=g), torch.randn(1, 4, n, d, generator=g)
    view = synthetic_view(keys, None, 64)
    want = kv.Policy.window_probs(view, q).sum(2)  # [1, Hq, n]
    torch.testing.assert_close(kv.Policy.received_attention(view, q), want, rtol=1e-5, atol=1e-5)
    monkeypatch.setattr(kv.Policy, "window_probs", lambda *a, **k: pytest.fail("the whole T x T was built"))
    h2o = kv.H2O(budget=64)
    h2o.observe(view, q, torch.arange(n))
    torch.testing.assert_close(h2o.score(view)[..., : n - 32], want.view(1, 2, 2, n).sum(2)[..., : n - 32])


def test_snapkv_and_deep_forcing_follow_planted_patterns():
    torch.manual_seed(0)
    n, d = 40, 16
    keys = torch.randn(1, 2, n, d) * 0.1
    target = torch.randn(d)
    keys[0, 0, 7] = keys[0, 0, 21] = 4 * target  # what the recent queries look for, in KV head 0 only
    queries = (target * 3).expand(1, 4, 8, d).clone()
    snap = kv.SnapKV(budget=12, window=8, kernel=1)
    top = snap.score(synthetic_view(keys, queries, 12)).topk(12).indices.sort().values
    assert {7, 21} <= set(top[0, 0].tolist()) and set(range(32, 40)) <= set(top[0, 0].tolist())
    assert not {7, 21} <= set(top[0, 1].tolist())
    df = kv.DeepForcing(budget=24, sinks=0.25, recent=0.25, topc=2 / 24)  # S = 6, R = 6, C = 2
    view = synthetic_view(keys, queries[:, :, -6:], 24)
    top = df.score(view).topk(df.target(24)).indices.sort().values
    assert top[0, 0].tolist() == list(range(6)) + [7, 21] + list(range(34, 40))
    assert torch.equal(top[0, 0], top[0, 1])  # one selection for all heads


@pytest.mark.parametrize("topc_rope", ["keep", "unify"])
def test_deep_forcing_realigns_the_sinks_before_the_tail(models, topc_rope):
    model, ids, budget = models["sdpa"], prompt(30), 24
    pol = kv.DeepForcing(budget=budget, topc_rope=topc_rope)  # S 12, R 5, C 2: compresses to 19 past 24
    with Engine(model, pol, budget=budget) as engine:
        out, cache = generate(model, ids, new=20)
        st = engine.states[0]
        seen, m = st.seen, st.orig.shape[-1]
        kept = st.orig[0, 0]
        assert kept[:12].tolist() == list(range(12))  # deep sink: the first half of the window
        last_compress_len = 19
        tail = seen - (m - last_compress_len) - 5  # the recent 5 at the last compression, then what came after
        assert kept[-(m - last_compress_len) - 5:].tolist() == list(range(tail, seen))
        pos = st.pos[0, 0].tolist()
        if topc_rope == "unify":  # the paper's text: every kept key contiguous, ending at the newest token
            assert pos == list(range(seen - m, seen))
        else:  # the released code: the sinks sit before a tail of m - 12 positions; the rest keep their phases
            at_compression = seen - (m - last_compress_len)  # tokens seen when the sinks were last moved
            assert pos[:12] == list(range(at_compression - last_compress_len, at_compression - last_compress_len + 12))
            assert pos[12:] == kept[12:].tolist()
        assert st.next_pos == seen  # queries keep their positions; only the old keys moved
        fresh = layer0_keys(model, out[0, :seen][kept], st.pos[0, 0])
        assert torch.allclose(cache.layers[0].keys, fresh, atol=1e-4)


def test_deep_forcing_picks_a_token_as_top_c_at_most_max_reuse_times():
    torch.manual_seed(0)
    n, d = 40, 16
    keys = torch.randn(1, 2, n, d) * 0.1
    target = torch.randn(d)
    keys[0, :, 7] = 4 * target  # the best candidate by far
    keys[0, :, 21] = 3 * target  # the second best
    queries = (target * 3).expand(1, 4, 6, d).clone()
    df = kv.DeepForcing(budget=24, sinks=0.25, recent=0.25, topc=1 / 24, max_reuse=2)  # S 6, R 6, C 1
    view = synthetic_view(keys, queries, 24)
    picks = [[i for i in df.score(view).topk(df.target(24)).indices[0, 0].tolist() if 6 <= i < 34] for _ in range(5)]
    assert picks[:4] == [[7], [7], [21], [21]] and picks[4][0] not in (7, 21)  # then the next best candidate
    assert view.state.extras["topc_uses"][0, :, [7, 21]].tolist() == [[2, 2], [2, 2]]
    unlimited = kv.DeepForcing(budget=24, sinks=0.25, recent=0.25, topc=1 / 24, max_reuse=0)
    view = synthetic_view(keys, queries, 24)
    picks = [[i for i in unlimited.score(view).topk(13).indices[0, 0].tolist() if 6 <= i < 34] for _ in range(5)]
    assert picks == [[7]] * 5
    # every candidate spent: the best of them fills the quota (the reference would keep fewer tokens)
    small = kv.DeepForcing(budget=8, sinks=0.25, recent=0.25, topc=1 / 8, max_reuse=1)  # S 2, R 2, C 1
    view = synthetic_view(keys[:, :, [0, 1, 7, 21, 38, 39]], queries[:, :, -2:], 8)
    picks = [[i for i in small.score(view).topk(5).indices[0, 0].tolist() if 2 <= i < 4] for _ in range(3)]
    assert picks == [[2], [3], [2]]


def test_delta_layers_the_model_lacks_are_refused_when_the_policy_is_entered(models):
    model = models["sdpa"]  # 4 layers
    for layers, message in (([9], "delta layer 9 does not exist; the model has layers 0..3"),
                            ([3], "leave no sparse layer in a 4-layer model")):
        with pytest.raises(InputError, match=message):
            with kv.policy(model, "delta", budget=16, delta_layers=layers, page_size=4, recent_pages=2):
                pytest.fail("entered")  # was refused only at the first forward
    assert "forward" not in model.model.layers[0].self_attn.__dict__  # nothing was hooked


def test_delta_pages_rule():
    pol = kv.Delta(budget=12, page_size=4, recent_pages=1)  # K = 3 pages
    probs = torch.full((4, 30), 0.001)  # [Hq, n]: 8 pages, the last one partial
    probs[2, 5] = 0.9  # page 1, via the max over heads
    probs[:, 17] = 0.3  # page 4
    idx = pol.select(probs, 30)
    assert idx.tolist() == [4, 5, 6, 7, 16, 17, 18, 19, 28, 29]
    spike = torch.full((4, 32), 0.001)
    spike[0, 5] = 0.9  # page 1: one head, strongly
    spike[1:, 13] = 0.4  # page 3: three heads, weaker (a larger mean over heads, a smaller max)
    spike[:, 20] = 0.95  # page 5: every head
    assert pol.select_pages(spike, 32).tolist() == [1, 5, 7]  # the max over heads picks page 1, not page 3
    tie = pol.select(torch.full((4, 30), 0.01), 30)  # ties go to earlier pages
    assert tie.tolist() == [0, 1, 2, 3, 4, 5, 6, 7, 28, 29]
    # also where a page's score is large enough (> ~2) for float32 to round the -1e-7 * u tie-break away
    for level, pages, k in ((4.75, 6, 2), (2.0, 8, 4), (9.0, 4, 2)):
        scores = [level + 1.0] + [level] * (pages - 1)  # page 0 best, the others tie
        big = torch.tensor([[v / 16 for v in scores for _ in range(16)]])  # [1 head, pages * 16]
        assert kv.Delta(budget=k * 16, page_size=16, recent_pages=0).select_pages(big, pages * 16).tolist() == \
            list(range(k))
    # the page-wise gather copies exactly those tokens, in order, with or without the partial last page
    torch.manual_seed(0)
    for pol, n in ((pol, 30), (pol, 32), (kv.Delta(budget=12, page_size=4, recent_pages=0), 30)):
        t = torch.randn(1, 2, n, 3)
        for pr in (probs[:, :n] if probs.shape[1] >= n else torch.rand(4, n), torch.rand(4, n)):
            pages = pol.select_pages(pr, n)
            assert torch.equal(pol.gather(t, pages, n), t[:, :, pol.select(pr, n)])


def _boundary_model():
    cfg = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    cfg._attn_implementation = "sdpa"
    torch.manual_seed(0)
    return LlamaForCausalLM(cfg).eval(), torch.randint(3, 128, (1, 45), generator=torch.Generator().manual_seed(1))


def _chunks(model, ids, name, budget, chunks, every=1, **options):
    """Forward `chunks` (lengths) through one cache under a policy: the logits, the policy and the engine."""
    from prunekit.inference.kv.engine import cache_tokens

    policy = kv.make_policy(name, budget=budget, **options)
    engine, cache = Engine(model, policy, budget=budget, every=every), DynamicCache(config=model.config)
    outs, pos = [], 0
    with engine, torch.no_grad():
        for c in chunks:
            outs.append(model(input_ids=ids[:, pos:pos + c], position_ids=torch.arange(pos, pos + c)[None],
                              cache=cache, use_cache=True).logits)
            pos += c
        return torch.cat(outs, 1), policy, cache_tokens(cache), [(int(s.pos.max()), s.next_pos, s.compressions)
                                                                 for s in engine.states]


def test_chunks_and_positions_after_a_compression_and_budgets_met_exactly():
    """What mutants of the engine and DELTA showed untested: a chunk forwarded after a compression attends
    causally, itself included, as one-token steps do; new tokens continue after StreamingLLM's re-positioned
    cache; a cache of exactly the budget is neither compressed (Deep Forcing) nor sparse (DELTA)."""
    model, ids = _boundary_model()
    chunk = _chunks(model, ids, "h2o", 16, [30, 5], every=10)[0]
    steps = _chunks(model, ids, "h2o", 16, [30, 1, 1, 1, 1, 1], every=10)[0]
    torch.testing.assert_close(chunk[:, 30:], steps[:, 30:], rtol=1e-4, atol=1e-4)
    states = _chunks(model, ids, "streaming_llm", 16, [30, 1, 1], every=4, sinks=4)[3]
    assert {s[:2] for s in states} == {(17, 18)}  # positions 0..15 after the prefill, then 16 and 17
    _, _, tokens, states = _chunks(model, ids, "deep_forcing", 16, [16])
    assert tokens[0] == 16 and {s[2] for s in states} == {0}
    full = _chunks(model, ids, "full", None, [17, 1])[0]
    sparse, delta, _, _ = _chunks(model, ids, "delta", 18, [17, 1], page_size=4, recent_pages=2, delta_layers=[1])
    torch.testing.assert_close(sparse, full, rtol=1e-5, atol=1e-5)
    assert delta.attended == delta.available


def test_delta_page_buffers_hold_the_picked_pages_step_after_step():
    # a cache growing one token per step; each step picks pages at random; the buffers of two sparse layers,
    # updated incrementally, must hold exactly the gathered tokens (in any order), rows intact
    pol = kv.Delta(budget=20, page_size=4, recent_pages=1)  # K = 5 pages
    torch.manual_seed(0)
    total = 60
    base = torch.randn(1, 2, total, 3)
    base[..., 0] = torch.arange(total, dtype=torch.float)  # channel 0 names the token
    copied = []
    for n in list(range(21, total)) + list(range(22, 30)):  # then a new, shorter sequence
        pages = pol.select_pages(torch.rand(4, n), n)
        plan = pol.plan(0, pages, n)
        copied.append(int(plan["copy_pages"].numel()))
        for layer in (1, 2):
            if layer == 2 and n % 7 == 0:
                continue  # this layer misses a step: it must rebuild next time
            keys, values = base[:, :, :n], base[:, :, :n] * 2
            kb, vb = pol.buffered(layer, (keys, values), plan)
            want = pol.gather(keys, pages, n)
            order = kb[0, 0, :, 0].argsort()
            assert torch.equal(kb[:, :, order], want) and torch.equal(vb[:, :, order], want * 2)
    assert max(copied) <= 5 and sum(copied) < 5 * len(copied)  # only the newly picked pages were copied


def test_delta_sparse_layers_attend_only_to_the_picked_pages(models):
    model, ids = models["sdpa"], prompt(40)
    full, _ = generate(model, ids, new=8)
    with kv.policy(model, "delta", budget=16, delta_layers=[1, 3], page_size=4, recent_pages=2) as pol:
        out, cache = generate(model, ids, new=8)
    assert kv.cache_tokens(cache) == [47] * 4  # nothing evicted
    # each of the 7 decode steps: layers 0, 1, 3 see the whole cache (n = 41..47); layer 2 sees 2 picked pages
    # of 4 tokens and the 2 most recent pages (the last one partial)
    ns = range(41, 48)
    recent = [n - 4 * (math.ceil(n / 4) - 2) for n in ns]
    assert pol.available == 4 * sum(ns) and pol.attended == sum(3 * n + 8 + r for n, r in zip(ns, recent))
    with kv.policy(model, "delta", budget=16, delta_layers=[0], page_size=4, recent_pages=1) as pol:
        sparse, _ = generate(model, ids, new=8)
    assert not torch.equal(sparse, full)  # the sparse path is really taken
    # page buffers never leak from one sequence to the next
    other = prompt(44, seed=5)
    with kv.policy(model, "delta", budget=16, delta_layers=[0], page_size=4, recent_pages=1):
        alone, _ = generate(model, other, new=8)
    with kv.policy(model, "delta", budget=16, delta_layers=[0], page_size=4, recent_pages=1):
        generate(model, ids, new=8)
        after, _ = generate(model, other, new=8)
    assert torch.equal(after, alone)


def _tensors_held(obj, seen=None) -> int:
    seen = set() if seen is None else seen
    if id(obj) in seen:
        return 0
    seen.add(id(obj))
    if isinstance(obj, torch.Tensor):
        return obj.numel()
    if isinstance(obj, dict):
        return sum(_tensors_held(v, seen) for v in obj.values())
    if isinstance(obj, (list, tuple, set)):
        return sum(_tensors_held(v, seen) for v in obj)
    return _tensors_held(vars(obj), seen) if hasattr(obj, "__dict__") and not isinstance(obj, type) else 0


@pytest.mark.parametrize("name", list(kv.POLICIES))
def test_a_policy_kept_after_its_block_holds_no_tensors_but_keeps_its_counts(models, name):
    """A sweep keeps each `pol` to read its counts; DELTA's kept its sparse layers' page buffers (37.5 MiB each on
    SmolLM2-135M at a 1k budget) until garbage-collected."""
    budget = 32 if name == "delta" else 24
    with kv.policy(models["sdpa"], name, budget=budget, **options(name)) as pol:
        generate(models["sdpa"], prompt(60), new=8)
        held = _tensors_held(pol)
    assert _tensors_held(pol) == 0
    if name == "delta":
        assert held > 0 and 0 < pol.attended < pol.available  # the buffers existed, and the counts survive


def test_calibration_places_delta_layers_at_the_largest_attention_shifts():
    model = make_model(layers=4)
    layers, shifts = kv.calibrate_delta_layers(model, prompt(48), count=1, initial=1, window=16)
    assert len(shifts) == 3 and all(0 <= s <= 2 for s in shifts)
    assert layers == [1 + max(range(2), key=lambda i: shifts[i])]  # never the last layer (nothing sparse after it)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("ids, message", [
    (lambda: prompt(16).float(), "integer token ids"),
    (lambda: torch.zeros(1, 0, dtype=torch.long), r"T >= 1"),
    (lambda: torch.full((1, 16), 10**6, dtype=torch.long), "outside the model's vocabulary"),
    (lambda: torch.full((1, 16), -1, dtype=torch.long), "outside the model's vocabulary"),
])
def test_calibration_refuses_ids_the_model_cannot_read(ids, message):
    model = make_model(layers=4)
    with pytest.raises(InputError, match=message):
        kv.calibrate_delta_layers(model, ids(), count=1, initial=1, window=16)
    assert all("forward" not in layer.self_attn.__dict__ for layer in model.model.layers)


@pytest.mark.parametrize("tokens", [0, -5, 63, 100.0, True, "1024"])
def test_wiki_delta_layers_refuses_too_few_tokens_before_reading_the_text(tokens):
    with pytest.raises(InputError, match="tokens must be an integer >= 64"):
        kv.wiki_delta_layers(make_model(layers=4), None, tokens=tokens)


@pytest.mark.parametrize("layers", [np.array([1, 2]), np.array([1, 2], dtype=np.int32), [np.int64(1), 2],
                                    np.int64(1)])
def test_delta_layers_take_numpy_integers(layers):
    pol = kv.make_policy("delta", budget=48, delta_layers=layers, page_size=16, recent_pages=1)
    assert pol.delta_layers == ([1] if isinstance(layers, np.integer) else [1, 2])
    with pytest.raises(InputError, match="whole layer indices"):
        kv.make_policy("delta", budget=48, delta_layers=np.array([1.5, 2.0]), page_size=16, recent_pages=1)


def test_cli_generate(model_dir, tmp_path, capsys):
    import json

    rc = cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget", "24",
                   "--max-new-tokens", "12", "--option", "window=8", "--json"])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    # between compressions the cache runs up to `every` - 1 = 15 tokens over the budget (the default, for speed)
    assert result["new_tokens"] == 12 and 24 < result["cache_tokens_max"] <= 24 + 15 and result["prompt_tokens"] == 68
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "24", "--max-new-tokens", "12", "--option", "window=8", "--every", "1", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["cache_tokens_max"] <= 24  # --every 1: the budget exactly
    # 16 cached new tokens reach budget + every = 40 and compress: the most held was 39, not the 24 left at the end
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "24", "--max-new-tokens", "17", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["cache_tokens_max"] == 39 and result["cache_tokens_end"] == 24
    # a DELTA layer the model lacks is refused before any note promises the full cache's output (one line)
    for layers in ("99", "1"):  # a 2-layer model: 1 leaves no sparse layer
        assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "delta", "--budget", "160",
                         "--option", f"delta_layers={layers}", "--max-new-tokens", "2", "--quiet"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error: delta layer") and err.count("\n") == 1, err
    # a budget that holds the whole sequence evicts nothing: the output was --kv full's, without a word
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "79", "--max-new-tokens", "12", "--json"]) == 0  # the 12th new token is never cached
    out, err = capsys.readouterr()
    assert ("--budget 79 holds the whole sequence (prompt 68 + at most 11 cached new tokens), so --kv snapkv evicts "
            "nothing" in err) and json.loads(out)["cache_tokens_max"] == 79
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "78", "--max-new-tokens", "12", "--json"]) == 0
    assert "holds the whole sequence" not in capsys.readouterr().err
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "delta", "--budget",
                     "160", "--max-new-tokens", "12", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "so --kv delta attends to every key" in err and json.loads(out)["attended_fraction"] == 1.0
    bad = [
        ["--prompt", "hi", "--kv", "lru", "--budget", "8"],
        ["--prompt", "hi", "--kv", "h2o"],
        ["--prompt-file", str(tmp_path / "missing.txt"), "--kv", "h2o", "--budget", "8"],
        ["--prompt", "  ", "--kv", "h2o", "--budget", "8"],
        ["--prompt", "hi", "--kv", "h2o", "--budget", "8", "--option", "nokey"],
        ["--prompt", "hi", "--kv", "h2o", "--budget", "8", "--max-new-tokens", "0"],
        ["--prompt", "hi", "--kv", "h2o", "--budget", "8", "--option", "delta_layers=calibrate"],
        ["--prompt", "hi", "--kv", "h2o", "--budget", "8", "--option", "recent=0.5", "--option", "recent=0.2"],
    ]
    for extra in bad:
        assert cli.main(["generate", str(model_dir), *extra]) == 2
        err = capsys.readouterr().err
        assert err.startswith("prunekit: error:") and err.count("\n") == 1
    # an unknown option was a Python TypeError ("H2O.__init__() got an unexpected keyword argument"): name the options
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "h2o", "--budget", "8", "--option",
                     "foo=1"]) == 2
    assert "h2o takes no option(s) ['foo']; its options (defaults): recent=0.5" in capsys.readouterr().err
    assert kv.policy_options("deep_forcing")["topc_rope"] == "keep" and kv.policy_options("knorm") == {}
    assert cli.main(["generate", str(tmp_path / "nope"), "--prompt", "hi", "--kv", "full"]) == 2
    capsys.readouterr()
    # --budget / --every on a policy that keeps everything were taken silently and the JSON echoed the budget
    rc = cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "full", "--budget", "16",
                   "--every", "4", "--max-new-tokens", "4", "--json"])
    captured = capsys.readouterr()
    full = json.loads(captured.out)
    assert rc == 0 and full["budget"] is None
    # the full cache's size and the prefill / decode split were not reported (tok/s mixed in the prefill)
    from transformers import AutoConfig

    cfg = AutoConfig.from_pretrained(model_dir)
    per_token = cfg.num_hidden_layers * 2 * cfg.num_key_value_heads * (cfg.hidden_size // cfg.num_attention_heads) * 4
    assert full["full_cache_bytes"] == per_token * (68 + 4 - 1) and full["cache_tokens_max"] == 68 + 4 - 1
    assert 0 < full["prefill_seconds"] < full["seconds"] and full["decode_tokens_per_s"] > 0
    assert "--every is not used by --kv full" in captured.err and "--budget is not used by --kv full" in captured.err
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "h2o", "--budget", "8", "--every", "2",
                     "--max-new-tokens", "8", "--json"]) == 0  # 2 + 8 tokens: the budget of 8 evicts
    assert "note" not in capsys.readouterr().err
    # --once: the prompt compressed to the budget, then every new token but the last cached
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "24", "--max-new-tokens", "12", "--option", "window=8", "--once", "--every", "4", "--json"]) == 0
    out, err = capsys.readouterr()
    once = json.loads(out)
    assert once["cache_tokens_max"] == 24 + 11 and once["once"] is True and once["every"] is None
    assert "--every is not used with --once" in err
    assert cli.main(["generate", str(model_dir), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                     "68", "--max-new-tokens", "12", "--once", "--json"]) == 0
    out, err = capsys.readouterr()
    assert "holds the whole prompt (68 tokens) and --once compresses nothing after it" in err
    assert json.loads(out)["cache_tokens_max"] == 68 + 11
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "delta", "--budget", "160", "--once",
                     "--max-new-tokens", "2", "--json"]) == 0
    assert "--once is not used by --kv delta" in capsys.readouterr().err


def test_a_model_saved_without_its_cache_still_generates_under_a_policy(model_dir, tmp_path, capsys):
    """Fine-tuning with gradient checkpointing saves "use_cache": false. Under a policy generate then ran without
    a cache: the budget was ignored (the full model's tokens, silently), and `prunekit generate` passing its own
    cache fed it every step's whole sequence again (other text, a "cache" of 12435 tokens for 430)."""
    import json

    model, ids = make_model(), prompt(60)
    full, _ = generate(model, ids, new=8)
    with kv.policy(model, "streaming_llm", budget=24, every=1):
        want, cache = generate(model, ids, new=8)
    assert kv.cache_tokens(cache) == [24] * model.config.num_hidden_layers and not torch.equal(want, full)
    model.config.use_cache = model.generation_config.use_cache = False
    with kv.policy(model, "streaming_llm", budget=24, every=1):
        out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=8, do_sample=False,
                             pad_token_id=0)
        assert torch.equal(out, want)  # compressed as with a cache, not the full model's output
        with pytest.raises(InputError, match="use_cache=False: no cache is kept, so the KV policy has nothing"):
            model.generate(ids, max_new_tokens=2, use_cache=False)
        from transformers import GenerationConfig

        with pytest.raises(InputError, match="use_cache=False"):  # a config given by position (found in review)
            model.generate(ids, GenerationConfig(max_new_tokens=2, use_cache=False))
    args = ["--prompt", "the licence text " * 4, "--kv", "full", "--max-new-tokens", "6", "--json"]
    assert cli.main(["generate", str(model_dir), *args]) == 0
    plain = json.loads(capsys.readouterr().out)
    for name in ("config.json", "generation_config.json"):
        config = json.loads((model_dir / name).read_text())
        (model_dir / name).write_text(json.dumps({**config, "use_cache": False}))
    assert cli.main(["generate", str(model_dir), *args]) == 0
    saved = json.loads(capsys.readouterr().out)
    assert saved["text"] == plain["text"] and saved["cache_tokens_max"] == plain["cache_tokens_max"] == 68 + 6 - 1


def test_cli_generate_samples_as_transformers_does_under_a_seed(model_dir, capsys):
    import json

    from transformers import AutoModelForCausalLM, AutoTokenizer

    text = "the licence text " * 4
    argv = ["--prompt", text, "--max-new-tokens", "12", "--temperature", "1.5", "--top-p", "0.9", "--seed", "3",
            "--json"]
    got = {}
    for policy in (["--kv", "full"], ["--kv", "snapkv", "--budget", "128"]):
        assert cli.main(["generate", str(model_dir), *policy, *argv]) == 0
        result = json.loads(capsys.readouterr().out)
        got[policy[1]] = result["text"]
        assert result["sampling"] == {"do_sample": True, "temperature": 1.5, "top_p": 0.9, "top_k": 0, "seed": 3}
    model, tok = AutoModelForCausalLM.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    ids = tok(text, return_tensors="pt")["input_ids"]
    torch.manual_seed(3)
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=12, do_sample=True, temperature=1.5,
                         top_p=0.9, top_k=0, pad_token_id=tok.pad_token_id or tok.eos_token_id)
    plain = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert got["full"] == got["snapkv"] == plain  # a budget that holds everything samples what the plain model does
    assert cli.main(["generate", str(model_dir), "--kv", "full", *argv[:-3], "--seed", "4", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] != plain
    for bad, message in ((["--temperature", "-1"], "--temperature must be 0"), (["--temperature", "nan"], "finite"),
                         (["--temperature", "1", "--top-p", "0"], "--top-p must be in (0, 1]"),
                         (["--temperature", "1", "--top-p", "1.5"], "--top-p must be in (0, 1]"),
                         (["--temperature", "1", "--top-k", "-1"], "--top-k must be at least 1"),
                         (["--temperature", "1", "--seed", str(2**64)], r"--seed must be in [0, 2**63)"),
                         (["--temperature", "1", "--seed", "-1"], r"--seed must be in [0, 2**63)")):
        assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "full", *bad]) == 2
        assert message in capsys.readouterr().err
    assert cli.main(["generate", str(model_dir), "--prompt", text, "--kv", "full", "--max-new-tokens", "2", "--seed",
                     "3", "--top-k", "5", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out)["sampling"] == {"do_sample": False}
    assert "--top-k is not used by greedy decoding" in captured.err and "--seed is not used" in captured.err


def test_cli_generate_runs_in_the_dtype_asked_and_says_when_positions_run_out(model_dir, tmp_path, capsys):
    import json

    from transformers import AutoModelForCausalLM

    half = tmp_path / "bf16"  # a bf16 folder ran (and measured its cache) in float32, twice its native size
    AutoModelForCausalLM.from_pretrained(model_dir).to(torch.bfloat16).save_pretrained(half)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        if (model_dir / name).exists():
            (half / name).write_bytes((model_dir / name).read_bytes())
    sizes = {}
    for dtype in ("float32", "auto"):
        assert cli.main(["generate", str(half), "--prompt", "the licence text " * 4, "--kv", "snapkv", "--budget",
                         "24", "--max-new-tokens", "4", "--dtype", dtype, "--json"]) == 0
        got = json.loads(capsys.readouterr().out)
        sizes[got["dtype"]] = got["cache_bytes"]
    assert sizes["float32"] == 2 * sizes["bfloat16"]
    # 256 positions: a 300-token prompt runs past them (prune and eval refuse such windows; generate said nothing)
    assert cli.main(["generate", str(model_dir), "--prompt", "x" * 300, "--kv", "knorm", "--budget", "64",
                     "--max-new-tokens", "2", "--json"]) == 0
    assert "run past the model's 256 positions; --kv knorm keeps the original positions" in capsys.readouterr().err
    assert cli.main(["generate", str(model_dir), "--prompt", "x" * 300, "--kv", "streaming_llm", "--budget", "64",
                     "--max-new-tokens", "2", "--json"]) == 0
    captured = capsys.readouterr()
    prompt = json.loads(captured.out)["prompt_tokens"]
    assert json.loads(captured.out)["every"] == 16 and prompt > 256  # the prompt itself went through at 0..prompt-1
    assert (f"--kv streaming_llm numbers positions within the cache, but the prompt's {prompt} tokens go through in "
            f"one forward: positions up to {prompt - 1} pass the model's 256") in captured.err
    # within the cache: a compressing step sees budget + every tokens, 241 + 16 = 257 positions of the 256 embedded
    short = "x" * 200
    argv = ["generate", str(model_dir), "--prompt", short, "--max-new-tokens", "80", "--json"]
    assert cli.main([*argv, "--kv", "streaming_llm", "--budget", "241"]) == 0
    assert ("a compressing step sees --budget 241 + --every 16 tokens: positions up to 256 pass the model's 256"
            in capsys.readouterr().err)
    for extra in (["--kv", "streaming_llm", "--every", "1"],  # 242
                  ["--kv", "deep_forcing", "--option", "topc_rope=unify", "--budget", "255"]):  # evicts below: 256
        assert cli.main([*argv, "--budget", "241", *extra] if "--budget" not in extra else [*argv, *extra]) == 0
        assert "note" not in capsys.readouterr().err, extra
    # Deep Forcing's default keeps its Top-C keys' original positions: past the 256, as the other policies
    assert cli.main([*argv, "--kv", "deep_forcing", "--budget", "64"]) == 0
    assert "--kv deep_forcing keeps its Top-C keys at the original positions" in capsys.readouterr().err
    assert cli.main(["generate", str(model_dir), "--prompt", "hi", "--kv", "full", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["every"] is None  # it never compresses
    # the last new token is never fed back: prompt + new - 1 positions (the note came one token early)
    assert cli.main(["generate", str(model_dir), "--prompt", short, "--kv", "full", "--max-new-tokens", "1",
                     "--json"]) == 0
    p = json.loads(capsys.readouterr().out)["prompt_tokens"]
    knorm = ["generate", str(model_dir), "--prompt", short, "--kv", "knorm", "--budget", "64", "--json"]
    assert cli.main([*knorm, "--max-new-tokens", str(257 - p)]) == 0
    assert "note" not in capsys.readouterr().err
    assert cli.main([*knorm, "--max-new-tokens", str(258 - p)]) == 0
    assert f"prompt {p} + {258 - p} new tokens run past the model's 256" in capsys.readouterr().err
    # --once: the 64 tokens kept of the prompt at 0..63, then the new tokens fed at 64, 65, ...
    once = ["generate", str(model_dir), "--prompt", short, "--kv", "streaming_llm", "--budget", "64", "--once", "--json"]
    assert cli.main([*once, "--max-new-tokens", "193"]) == 0  # fed at 64..255
    assert "note" not in capsys.readouterr().err
    assert cli.main([*once, "--max-new-tokens", "194"]) == 0
    assert ("with --once the 64 tokens kept of the prompt are followed by 193 cached new tokens: positions up to 256 "
            "pass the model's 256" in capsys.readouterr().err)


def test_cli_generate_with_calibrated_delta_layers(model_dir, capsys, monkeypatch):
    import json
    import types

    import prunekit
    from conftest import TEXT, char_tokenizer

    seen = []
    monkeypatch.setattr(prunekit, "load_text", lambda source, purpose: seen.append(source) or types.SimpleNamespace(text=TEXT))
    argv = ["--prompt", TEXT[:200], "--kv", "delta", "--budget", "32", "--max-new-tokens", "6", "--option",
            "delta_layers=calibrate", "--option", "page_size=4", "--option", "recent_pages=2", "--json"]
    # 2 layers: a delta layer after layer 0 would be the last, with no sparse layer after it
    assert cli.main(["generate", str(model_dir), *argv]) == 2 and "at least 3 layers" in capsys.readouterr().err
    deeper = model_dir.parent / "tiny-llama-4"
    make_model(layers=4).save_pretrained(deeper)
    char_tokenizer().save_pretrained(deeper)
    assert cli.main(["generate", str(deeper), *argv]) == 0 and seen == ["wiki"]
    result = json.loads(capsys.readouterr().out)
    assert result["new_tokens"] == 6 and result["options"]["delta_layers"] in ([1], [2])  # before the last layer


@pytest.mark.parametrize("name", ["streaming_llm", "h2o", "snapkv", "knorm", "deep_forcing"])
def test_policies_keep_the_model_sdpa_attention(models, name, monkeypatch):
    model, ids = models["sdpa"], prompt()
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1) or real(*a, **k))
    with kv.policy(model, name, budget=24):
        assert model.config._attn_implementation == "sdpa"
        generate(model, ids, new=6)
    assert len(calls) == 6 * 4  # every layer of every forward (prefill + 5 decode steps) ran the model's sdpa


def test_delta_layers_compute_the_same_full_attention(models):
    model, ids = models["sdpa"], prompt(40)
    full, _ = generate(model, ids, new=8)
    pol = kv.make_policy("delta", budget=16, delta_layers=[0, 1, 2, 3], page_size=4, recent_pages=2)
    pol._layers = lambda num_layers: [0, 1, 2, 3]  # users are refused this (no sparse layer): bypass the check
    with kv.policy(model, pol):
        out, _ = generate(model, ids, new=8)  # every layer a Δ-layer: selection runs, but nobody attends sparsely
    assert torch.equal(out, full) and pol.attended == pol.available


def test_other_llama_style_models_and_unsupported_ones():
    from conftest import tiny_model

    qwen = tiny_model("qwen2")
    ids = prompt(30)
    ref, _ = generate(qwen, ids, new=6)
    with kv.policy(qwen, "snapkv", budget=64):
        out, _ = generate(qwen, ids, new=6)
    assert torch.equal(out, ref)
    with kv.policy(qwen, "streaming_llm", budget=12, every=1):
        _, cache = generate(qwen, ids, new=6)
    assert max(kv.cache_tokens(cache)) <= 12
    with pytest.raises(InputError, match="not supported"):
        with kv.policy(tiny_model("gpt2"), "snapkv", budget=12):
            pass


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "granite", "granitemoe", "gemma", "olmo2",
                                  "olmo", "olmoe", "starcoder2", "arcee", "apertus", "seed_oss", "mistral_swa"])
def test_every_policy_on_the_other_supported_architectures(kind):
    """MoE blocks, biases, per-head and all-heads q/k norms, Granite's attention multiplier, Gemma's embedding
    scale, OLMo's clamped q/k/v, a sliding window the sequence stays within (transformers' sliding cache layers):
    with room for everything each policy generates what the model does alone; StreamingLLM's compressed
    cache holds, at layer 0, exactly the keys a plain forward computes for the kept tokens at their new positions."""
    from conftest import tiny_model

    model, ids = tiny_model(kind), prompt(30)
    ref, _ = generate(model, ids, new=8)
    for name in kv.POLICIES:
        with kv.policy(model, name, budget=64, **options(name)):
            out, _ = generate(model, ids, new=8)
        assert torch.equal(out, ref), name
    with Engine(model, kv.StreamingLLM(budget=16, sinks=4), budget=16, every=1) as engine:
        out, cache = generate(model, ids, new=8)
        kept = engine.states[0].orig[0, 0].tolist()
    seen = ids.shape[1] + 7  # the last generated token is never fed back
    assert kept == [0, 1, 2, 3] + list(range(seen - 12, seen)) and kv.cache_tokens(cache)[0] == 16
    plain = DynamicCache(config=model.config)
    with torch.no_grad():
        model(out[:, kept], position_ids=torch.arange(16)[None], cache=plain, use_cache=True)
    assert torch.allclose(cache.layers[0].keys, plain.layers[0].keys, atol=1e-4)
    assert torch.allclose(cache.layers[0].values, plain.layers[0].values, atol=1e-5)


def test_sliding_window_and_other_rope_layouts_are_refused():
    from conftest import tiny_model
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                               sliding_window=8, max_window_layers=1)
    assert "sliding_attention" in cfg.layer_types
    model = AutoModelForCausalLM.from_config(cfg)
    with kv.policy(model, "knorm", budget=4, every=1):  # within the window: runs, compressed
        _, cache = generate(model, prompt(4), new=4)
    assert max(kv.cache_tokens(cache)) == 4
    with kv.policy(model, "knorm", budget=12):  # past it: refused before the first forward (generate's length)
        cache = DynamicCache(config=model.config)
        with pytest.raises(InputError, match=r"window of 8 tokens in 1 of 2 layers .*, and 11 tokens pass it"):
            model.generate(prompt(4), attention_mask=torch.ones(1, 4, dtype=torch.long), max_new_tokens=8,
                           do_sample=False, pad_token_id=0, cache=cache)
        assert cache.get_seq_length() == 0
        with pytest.raises(InputError, match="and 9 tokens pass it"), torch.no_grad():  # or at the forward past it
            model(prompt(9), cache=cache, use_cache=True)
    with pytest.raises(InputError, match="'helium' is not supported"):  # interleaved RoPE: re-rotation would be wrong
        with kv.policy(tiny_model("helium"), "knorm", budget=12):
            pass


@pytest.mark.integration
def test_policies_on_smollm2():
    import prunekit

    model, tok = prunekit.load_model("smollm2-135m")  # 30 layers, 9 query heads, 3 KV heads
    text = prunekit.load_text("austen", purpose="evaluation").text[:3000]
    ids = tok(text, return_tensors="pt")["input_ids"][:, :160]
    ref, _ = generate(model, ids, new=12)
    for name in kv.POLICIES:
        with kv.policy(model, name, budget=256):
            out, cache = generate(model, ids, new=12)
        assert torch.equal(out, ref), name
    with kv.policy(model, "snapkv", budget=64, every=1):
        out, cache = generate(model, ids, new=12)
    assert max(kv.cache_tokens(cache)) == 64 and kv.cache_bytes(cache) == 30 * 2 * 3 * 64 * 64 * 4  # K+V, fp32


def test_policy_fractions_take_numpy_numbers():
    import numpy as np

    assert kv.H2O(budget=8, recent=np.float32(0.5)).recent == 0.5
    assert kv.DeepForcing(budget=20, sinks=np.float64(0.2), recent=0.2, topc=0.1).sinks == 4
    for bad in (True, 1.5, float("nan"), "0.5"):
        with pytest.raises(InputError, match=r"recent .* must be a number in \[0.0, 1.0\]"):
            kv.H2O(budget=8, recent=bad)


def test_cli_generate_refuses_an_unsupported_model_before_promising_an_output(tmp_path, capsys):
    # a budget holding the whole sequence printed "the output is --kv full's", then refused the model type
    from conftest import char_tokenizer, tiny_model

    folder = tmp_path / "gpt2"
    tiny_model("gpt2").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    capsys.readouterr()
    assert cli.main(["generate", str(folder), "--prompt", "some text", "--kv", "h2o", "--budget", "200",
                     "--max-new-tokens", "4", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("prunekit: error: model type 'gpt2' is not supported by the KV engine") and "\n" not in err
    with pytest.raises(InputError, match="'gpt2' is not supported"):
        Engine.check(tiny_model("gpt2"))
    Engine.check(tiny_model("llama"))
    # --kv full needs no engine: it runs on the model's own attention, with a note, and gives generate's output
    assert cli.main(["generate", str(folder), "--prompt", "some text", "--kv", "full", "--max-new-tokens", "4",
                     "--json"]) == 0
    out = capsys.readouterr()
    assert "note: model type 'gpt2' is not supported by the KV engine; --kv full needs no engine" in out.err
    result = json.loads(out.out)
    model, tok = tiny_model("gpt2"), char_tokenizer()
    ids = tok("some text", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=4, do_sample=False,
                             pad_token_id=tok.pad_token_id or tok.eos_token_id)
    assert result["text"] == tok.decode(ref[0, ids.shape[1]:], skip_special_tokens=True)
    assert result["cache_tokens_max"] == ids.shape[1] + 3 and result["budget"] is None


@pytest.mark.parametrize("kind", ["mistral", "qwen2"])
def test_cli_sliding_window_refusal_says_how_to_turn_the_window_off_and_that_works(kind, tmp_path, capsys):
    """A sliding-window model runs within its window (where the window changes nothing) and is refused past it, up
    front. The refusal named Python's load arguments only; a command-line user is told which config.json keys to set
    in a copy of the folder, and the copy so set generates (the original is untouched). A Qwen2 folder saved by
    transformers 5 lists `layer_types`: turning off use_sliding_window alone left sliding entries there (refused as a
    "window of None tokens", and the model's own cache breaks on them), so the message names that key too."""
    from conftest import char_tokenizer, tiny_model
    from transformers import AutoModelForCausalLM

    folder, copy = tmp_path / kind, tmp_path / f"{kind}-nowindow"
    model = tiny_model(kind)
    if kind == "mistral":
        model.config.sliding_window = 8
    else:
        model = AutoModelForCausalLM.from_config(type(model.config)(**{
            **model.config.to_dict(), "use_sliding_window": True, "sliding_window": 8, "max_window_layers": 1,
            "layer_types": None}))
        assert model.config.layer_types == ["full_attention", "sliding_attention"]
    for out in (folder, copy):
        model.save_pretrained(out)
        char_tokenizer().save_pretrained(out)
    config = (folder / "config.json").read_text()
    args = ["--prompt", "some text", "--kv", "snapkv", "--budget", "8", "--max-new-tokens", "4", "--quiet"]
    capsys.readouterr()
    within = ["--prompt", "abc", "--kv", "snapkv", "--budget", "4", "--every", "1", "--max-new-tokens", "5", "--json"]
    assert cli.main(["generate", str(folder), *within]) == 0  # 3 + 4 fed back: within the window, compressed
    assert json.loads(capsys.readouterr().out)["cache_tokens_max"] == 4
    assert cli.main(["generate", str(folder), *args]) == 2
    err = capsys.readouterr().err
    from transformers import AutoTokenizer

    fed = len(AutoTokenizer.from_pretrained(folder)("some text")["input_ids"]) + 3  # the prompt and 3 new fed back
    assert f"and {fed} tokens pass it: the KV engine runs such a model within its window only" in err
    assert (folder / "config.json").read_text() == config
    edited = json.loads((copy / "config.json").read_text())
    if kind == "mistral":
        assert "sliding-window attention (a window of 8 tokens), and" in err
        assert 'config.json says "sliding_window": null\n' in err and "layer_types" not in err
        edited["sliding_window"] = None
    else:
        assert "sliding-window attention (a window of 8 tokens in 1 of 2 layers ('layer_types')), and" in err
        assert ('load it with use_sliding_window=False, layer_types=["full_attention"] * 2, on the command line use '
                'a copy of the model folder whose config.json says "use_sliding_window": false and "layer_types" '
                'with every entry "full_attention"') in err
        edited["use_sliding_window"] = False  # the key alone: still refused, now without a window size to name
        (copy / "config.json").write_text(json.dumps(edited))
        assert cli.main(["generate", str(copy), *args]) == 2
        err = capsys.readouterr().err
        assert "marks layers as sliding-window attention (1 of 2 layers ('layer_types')) but gives no window" in err
        assert "None" not in err
        assert 'config.json says "layer_types" with every entry "full_attention"' in err
        edited["layer_types"] = ["full_attention"] * 2
        loaded = AutoModelForCausalLM.from_pretrained(folder, use_sliding_window=False,
                                                      layer_types=["full_attention"] * 2)
        Engine.check(loaded)  # the Python advice works as given
    (copy / "config.json").write_text(json.dumps(edited))
    assert cli.main(["generate", str(copy), *args]) == 0


def test_cli_generate_full_on_a_windowed_or_recurrent_model_says_what_its_own_cache_kept(tmp_path, capsys):
    """`--kv full` on a model the engine refuses ran, then crashed reading keys from a recurrent layer (Mamba,
    Jamba, LFM2, RecurrentGemma), quoted the sliding-window refusal cut inside its parenthesis, and reported the
    model's own sliding window as if it were the cache a full run holds."""
    from conftest import char_tokenizer, tiny_model
    from transformers import AutoModelForCausalLM, Lfm2Config, MambaConfig

    mistral = tiny_model("mistral")
    mistral.config.sliding_window = 6
    small = dict(vocab_size=128, hidden_size=32, num_hidden_layers=2)
    models = {"mistral": mistral,
              "mamba": AutoModelForCausalLM.from_config(MambaConfig(**small, state_size=8)),
              "lfm2": AutoModelForCausalLM.from_config(Lfm2Config(
                  **small, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                  layer_types=["conv", "full_attention"]))}
    prompt = "some text that is longer than the window"
    for name, model in models.items():
        folder = tmp_path / name
        model.save_pretrained(folder)
        char_tokenizer().save_pretrained(folder)
        capsys.readouterr()
        args = ["generate", str(folder), "--prompt", prompt, "--kv", "full", "--max-new-tokens", "5"]
        assert cli.main([*args, "--json"]) == 0, name
        out = capsys.readouterr()
        result, seen = json.loads(out.out), len(prompt) + 4
        note = out.err.split("prunekit: note: ")[1].split("; --kv full needs no engine")[0]
        assert note.count("(") == note.count(")"), note
        assert cli.main(args) == 0
        stats = capsys.readouterr().err.splitlines()[-1]
        if name == "mistral":
            assert note == (f"this model uses sliding-window attention (a window of 6 tokens), and {seen} tokens pass "
                            "it: the KV engine runs such a model within its window only (past it the model sees the "
                            "last 6 tokens, which no policy reproduces)")
            assert result["sliding_window_layers"] == 2 and "recurrent_layers" not in result
            assert result["cache_tokens_max"] == 5 < seen  # the window (minus the token being added) per layer
            assert "2 of 2 attention layers keep at most the last 6 tokens (the model's own sliding window)" in stats
        elif name == "mamba":
            assert note == "model type 'mamba' is not supported by the KV engine"
            assert result["recurrent_layers"] == 2 and result["cache_tokens_max"] is None
            assert result["cache_bytes"] == result["full_cache_bytes"] == 0
            assert "no key/value cache (its 2 layers keep a recurrent state)" in stats
        else:
            assert result["recurrent_layers"] == 1 and result["cache_tokens_max"] == seen
            layer = 2 * 2 * 8 * seen * 4  # keys and values, 2 KV heads of 8 dims, float32, in the one attention layer
            assert result["full_cache_bytes"] == layer <= result["cache_bytes"]
            assert "in its 1 attention layer (1 other layer keeps a recurrent state, not counted)" in stats
