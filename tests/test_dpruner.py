"""D-Pruner on tiny models: exact ratios, refusals that leave the model untouched, and a planted domain."""

import copy
import json

import numpy as np
import pytest
import torch

from prunekit.errors import InputError
from prunekit.select import NM, keep_global
from prunekit.text import Text
from prunekit.weights.engine import prune_blocks
from prunekit.weights.methods import dpruner, wanda

from conftest import TEXT, ids_from_text, tiny_model

D = 8  # embedding dimensions only domain tokens use
GENERAL_TOKENS, DOMAIN_TOKENS = torch.arange(3, 96), torch.arange(96, 128)
FIRST_LAYER_READERS = ("q_proj", "k_proj", "v_proj")  # read the normed embeddings alone


def planted(seed=0):
    """A tiny Llama whose first-layer inputs 0..D-1 are excited only by domain tokens.

    General sequences use only general tokens, whose embeddings are zero on dims 0..D-1; domain sequences mix
    general tokens with domain tokens, whose embeddings live only on dims 0..D-1. So the first block's
    q/k/v weights on input columns 0..D-1 matter for the domain and not at all for general text.
    """
    model = tiny_model("llama", seed=seed)
    emb = model.model.embed_tokens.weight.data
    emb[GENERAL_TOKENS, :D] = 0
    emb[DOMAIN_TOKENS, D:] = 0
    emb[DOMAIN_TOKENS, :D] *= 4
    g = torch.Generator().manual_seed(seed)
    general = GENERAL_TOKENS[torch.randint(len(GENERAL_TOKENS), (16, 64), generator=g)]
    domain = GENERAL_TOKENS[torch.randint(len(GENERAL_TOKENS), (8, 64), generator=g)]
    mixed = torch.rand(8, 64, generator=g) < 0.5
    domain[mixed] = DOMAIN_TOKENS[torch.randint(len(DOMAIN_TOKENS), (int(mixed.sum()),), generator=g)]
    return model, general, domain


def domain_columns_kept(model) -> float:
    kept = [(m.weight[:, :D] != 0).float().mean() for n, m in model.model.layers[0].named_modules()
            if n.split(".")[-1] in FIRST_LAYER_READERS]
    return float(torch.stack(kept).mean())


def agreement_with_general(model, general_masks) -> float:
    modules = dict(model.named_modules())
    agree = [((modules[n].weight != 0) == keep).float().mean() for n, keep in general_masks.items()]
    return float(torch.stack(agree).mean())


def general_obs_masks(general, ratio=0.5):
    model, _, _ = planted()
    g, _ = dpruner._general_stage(model, general, skip=(), percdamp=0.01, progress=False)
    return {name: keep_global(score, ratio) for name, score in g.items()}


def test_general_importance_is_the_obs_error():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(512, 6, generator=gen) @ torch.randn(6, 6, generator=gen)
    x[:, 5] = 0  # an input general text never excites
    h = 2 * x.T @ x / 512
    w = torch.randn(3, 6, generator=gen)
    got = dpruner.general_importance(w, h)
    damped = h.clone()
    damped[5, 5] = 1
    damped += 0.01 * torch.diag(damped).mean() * torch.eye(6)
    want = w.square() / torch.diag(torch.linalg.inv(damped))[None, :]
    assert torch.allclose(got[:, :5], want[:, :5], rtol=1e-4)
    assert (got[:, 5] == 0).all()


@pytest.mark.parametrize("scope", ["layer", "row"])
def test_exact_ratio_per_layer_and_original_values_kept(tok, scope):
    model = tiny_model("llama")
    model.train()  # the caller's mode must come back
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    general = ids_from_text(tok, 8, 32)
    reports = dpruner.prune_model(model, general, ratio=0.6, domain=ids_from_text(tok, 4, 32, offset=4000),
                                  lr=0.05, lam=1.0, scope=scope, progress=False)
    assert len(reports) == 2 * 7 and model.training
    assert all(p.requires_grad and p.grad is None for p in model.parameters())
    for r in reports:
        w = model.get_submodule(r.name).weight
        rows, cols = w.shape
        if scope == "layer":
            assert int((w == 0).sum()) == int(rows * cols * 0.6)
        else:
            assert ((w == 0).sum(1) == int(cols * 0.6)).all()
        assert r.sparsity == int((w == 0).sum()) / w.numel() and r.shape == (rows, cols)
        kept = w != 0  # the mask is applied to the original weights, not to the SGD-moved ones
        assert torch.equal(w[kept], before[r.name + ".weight"][kept])
    for n, p in model.named_parameters():
        if not any(n.startswith(r.name) for r in reports):
            assert torch.equal(p, before[n]), n


def test_domain_as_text_is_windowed_with_the_tokenizer(tok):
    model = tiny_model("llama")
    domain = Text("license", TEXT, "the LICENSE file")
    reports = dpruner.prune_model(model, ids_from_text(tok, 4, 32), ratio=0.5, tokenizer=tok, domain=domain,
                                  domain_samples=4, seqlen=32, progress=False)
    assert all(r.sparsity == 0.5 for r in reports)


@pytest.mark.parametrize("bad, match", [
    (dict(pattern="2:4"), "unstructured"),
    (dict(pattern=NM(2, 4)), "unstructured"),
    (dict(ratio=1.0), "outside"),
    (dict(ratio=-0.1), "outside"),
    (dict(domain=None), "needs a domain"),
    (dict(domain="python-docs", tokenizer=None), "needs the tokenizer"),
    (dict(domain=Text("short", "too short", "nine characters")),  # it said "calibration text" and --samples
     "the domain text short holds fewer .*give more domain text"),
    (dict(domain=torch.zeros(2, 1, dtype=torch.long)), "at least 1 sequence of 2 tokens"),
    (dict(domain=torch.full((2, 8), 500)), "vocabulary"),
    (dict(domain=torch.zeros(2, 8)), "token ids"),
    (dict(scope="block"), "scope"),
    (dict(lam=-1.0), "lam"),
    (dict(general_weight=float("nan")), "general_weight"),
    (dict(steps=0), "steps"),
    (dict(lr=1e30, steps=3), r"domain SGD diverged.*lower the learning rate"),  # was a RuntimeError blaming the data
    (dict(skip=("*",)), "no Linear"),
])
def test_refusals_leave_the_model_untouched(tok, bad, match):
    model = tiny_model("llama")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    args = dict(ratio=0.5, tokenizer=tok, domain=ids_from_text(tok, 2, 16), seqlen=32, progress=False)
    args.update(bad)
    with pytest.raises(InputError, match=match):
        dpruner.prune_model(model, ids_from_text(tok, 4, 16), **args)
    assert not model.training and all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_planted_domain_weights_are_kept_and_lambda_pulls_toward_general():
    _, general, domain = planted()
    masks = general_obs_masks(general)

    wanda_model, _, _ = planted()
    prune_blocks(wanda_model, general, lambda w, s, name: wanda.prune_weight(w, s, ratio=0.5, pattern=None),
                 stat="norms", progress=False)
    obs_model, _, _ = planted()
    for name, keep in masks.items():
        obs_model.get_submodule(name).weight.data *= keep
    # general-only masks drop every weight on the inputs general text never excites
    assert domain_columns_kept(wanda_model) == 0 and domain_columns_kept(obs_model) == 0

    kept, agree = {}, {}
    for lam in (0.0, 10.0, 1000.0):
        model, _, _ = planted()
        dpruner.prune_model(model, general, ratio=0.5, domain=domain, lam=lam, general_weight=0.0, progress=False)
        kept[lam], agree[lam] = domain_columns_kept(model), agreement_with_general(model, masks)
    # the paper's form keeps most of the domain-only weights (50% of each layer is kept: they are above the
    # median) ...
    assert kept[0.0] > 0.6
    # ... and a larger lambda moves the mask back toward the general importance
    assert kept[0.0] > kept[10.0] > kept[1000.0]
    assert agree[0.0] < agree[10.0] < agree[1000.0]


def test_added_general_importance_keeps_domain_weights_and_moves_toward_general():
    _, general, domain = planted()
    masks = general_obs_masks(general)
    kept, agree = {}, {}
    for weight in (0.0, 1.0, 4.0, 100.0):
        model, _, _ = planted()
        dpruner.prune_model(model, general, ratio=0.5, domain=domain, general_weight=weight, progress=False)
        kept[weight], agree[weight] = domain_columns_kept(model), agreement_with_general(model, masks)
    model, _, _ = planted()
    dpruner.prune_model(model, general, ratio=0.5, domain=domain, progress=False)
    assert (domain_columns_kept(model), agreement_with_general(model, masks)) == (kept[1.0], agree[1.0])  # default
    # the defaults still keep about half of the weights only domain text needs (general-only masks keep none) ...
    assert kept[1.0] > 0.4
    # ... and the weight of the general importance moves the mask toward the general one, monotonically
    assert agree[0.0] < agree[1.0] < agree[4.0] < agree[100.0]
    assert kept[0.0] > kept[1.0] > kept[4.0] >= kept[100.0]


def test_final_score_normalises_the_dual_importance():
    dual, general = torch.tensor([[2.0, 6.0]]), torch.tensor([[1.5, 0.5]])
    assert torch.equal(dpruner.final_score(dual, general, 0.0), dual)
    assert torch.allclose(dpruner.final_score(dual, general, 2.0), torch.tensor([[0.5 + 3.0, 1.5 + 1.0]]))


def test_doctests():
    import doctest

    assert doctest.testmod(dpruner).failed == 0


def test_gradients_the_caller_left_neither_change_the_mask_nor_are_lost(tok):
    """A caller's earlier backward (no zero_grad) added into D-Pruner's first domain gradient, moving 6.7% of the
    mask, and every .grad was then set to None."""
    general, domain = ids_from_text(tok, 8, 32), ids_from_text(tok, 4, 32, offset=4000)
    clean, dirty = tiny_model("llama"), tiny_model("llama")
    other = ids_from_text(tok, 2, 32, offset=9000)
    dirty(input_ids=other, labels=other).loss.backward()
    left = {n: p.grad.clone() for n, p in dirty.named_parameters()}
    for model in (clean, dirty):
        dpruner.prune_model(model, general, ratio=0.5, domain=domain, lr=0.05, progress=False)
    for (n, a), b in zip(clean.named_parameters(), dirty.parameters()):
        assert torch.equal(a, b), n
        assert torch.equal(dict(dirty.named_parameters())[n].grad, left[n]), n


def test_dual_importance_is_the_documented_second_order_form():
    """``S = |g w + 1/2 (g w)^2|`` (module docstring and the research notes' pseudocode), for either sign of g w."""
    g = torch.tensor([[1.0, -1.0, 2.0, -0.5, -3.0]])
    w = torch.tensor([[1.0, 1.0, -1.0, 2.0, 1.0]])
    gw = g * w
    assert torch.allclose(dpruner.dual_importance(g, w), (gw + 0.5 * gw ** 2).abs())


def _domain_setup():
    from prunekit.weights.engine import find_blocks, target_linears

    model = tiny_model()
    prefix, blocks = find_blocks(model)
    layers = {}
    for i, block in enumerate(blocks):
        layers.update(target_linears(block, f"{prefix}.{i}"))
    for p in model.parameters():
        p.requires_grad_(False)
    for m in layers.values():
        m.weight.requires_grad_(True)
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    # the reference gradient of the NTP loss on that batch
    ref = copy.deepcopy(model)
    ref_layers = dict(ref.named_modules())
    ref(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    grads = {name: ref_layers[name].weight.grad.detach().clone() for name in layers}
    general = {name: torch.ones_like(m.weight) for name, m in layers.items()}
    return model, layers, ids, grads, general


@pytest.mark.parametrize("clip", [1e-3, 0.0, 1e9])
def test_dpruner_domain_step_is_sgd_descent_clipped_to_global_norm(clip):
    """``w' <- w' - lr * clip(g_hat)``, clipped to global norm `clip` over all pruned Linears (0: no clipping):
    the step points down the NTP gradient and its L2 norm is ``lr * min(|g|, clip)``."""
    model, layers, ids, grads, general = _domain_setup()
    before = {name: m.weight.detach().clone() for name, m in layers.items()}
    lr = 0.1
    with torch.enable_grad():
        dpruner._domain_stage(model, layers, general, ids, steps=1, lr=lr, lam=0.0, batch_size=2, clip=clip,
                              progress=False)
    delta = torch.cat([(layers[n].weight.detach() - before[n]).reshape(-1) for n in layers])
    g = torch.cat([grads[n].reshape(-1) for n in layers])
    gnorm = float(g.norm())
    assert clip == 0 or clip > 1e6 or gnorm > 10 * clip  # the case exercises clipping when it should
    want_norm = lr * (min(gnorm, clip) if clip > 0 else gnorm)
    assert float(delta.norm()) == pytest.approx(want_norm, rel=1e-3)
    cos = float(torch.dot(delta, -g) / (delta.norm() * g.norm()))
    assert cos > 0.999  # descent, along the gradient


def test_dpruner_options_take_numpy_numbers_and_refuse_bools():
    import numpy as np

    assert dpruner._positive_int(np.int64(4), "domain_samples") == 4
    assert type(dpruner._positive_int(np.int64(4), "domain_samples")) is int
    assert dpruner._non_negative(np.float32(0.5), "lr") == 0.5
    for bad in (True, 0, 2.0):
        with pytest.raises(InputError, match="domain_samples"):
            dpruner._positive_int(bad, "domain_samples")
    for bad in (True, -1.0, float("nan"), float("inf"), "1"):
        with pytest.raises(InputError, match="lr must be a finite number >= 0"):
            dpruner._non_negative(bad, "lr")



def test_a_token_id_domain_is_recorded_as_its_shape_and_numpy_ids_are_taken(tmp_path, tok):
    """prune(domain=<tensor>) then save_pruned(metadata=result) failed after the work: a tensor in the options."""
    import prunekit

    domain = ids_from_text(tok, 4, 32, offset=4000)
    results = []
    for given in (domain, domain.numpy()):
        model = tiny_model("llama")
        results.append(prunekit.prune(model, method="dpruner", ratio=0.5, calibration=ids_from_text(tok, 4, 32),
                                      domain=given, steps=2, progress=False))
    assert results[0].options["domain"] == results[1].options["domain"] == "token ids [4, 32]"
    assert [r.sparsity for r in results[0].layers] == [r.sparsity for r in results[1].layers]
    out = prunekit.save_pruned(model, tok, tmp_path / "dp", metadata=results[1])
    assert (out / "prunekit.json").is_file()


def test_a_domain_given_as_a_path_is_recorded_as_a_string(tmp_path, tok):
    """prune(domain=Path(...)) pruned, then save_pruned(metadata=result) refused the PosixPath in the options."""
    import prunekit

    text = tmp_path / "domain.txt"
    text.write_text(TEXT)
    model = tiny_model("llama")
    result = prunekit.prune(model, method="dpruner", ratio=0.5, calibration=ids_from_text(tok, 4, 32), tokenizer=tok,
                            domain=text, domain_samples=4, steps=2, progress=False)
    assert result.options["domain"] == str(text)
    out = prunekit.save_pruned(model, tok, tmp_path / "dp", metadata=result)
    assert json.loads((out / "prunekit.json").read_text())["options"]["domain"] == str(text)


def test_numpy_token_ids_that_are_unsigned_or_read_only():
    """A uint64 id past int64 was named as -1 in the vocabulary error; a read-only array (np.load(mmap_mode='r'))
    made torch warn about non-writable tensors from prunekit's text.py."""
    import warnings

    from prunekit.text import ids_from_numpy

    with pytest.raises(InputError, match="token id 18446744073709551615, beyond any vocabulary"):
        ids_from_numpy(np.array([[1, 2, 2**64 - 1]], dtype=np.uint64), "calibration")
    assert ids_from_numpy(np.array([[1, 2, 3]], dtype=np.uint64), "calibration").tolist() == [[1, 2, 3]]
    frozen = np.arange(12, dtype=np.int64).reshape(3, 4)
    frozen.flags.writeable = False
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids = ids_from_numpy(frozen, "calibration")
    assert ids.dtype == torch.int64 and ids.tolist() == frozen.tolist()
    with pytest.raises(InputError, match="calibration array must be integer token ids, got float32"):
        ids_from_numpy(np.zeros((2, 4), dtype=np.float32), "calibration")


def test_a_float16_models_domain_gradients_are_taken_in_float32(tok):
    # in float16 the domain gradients underflowed (70-100% of each layer's gradient off on a model with large MLP
    # activations; the mask 17% off float32's), without a word
    general, domain = ids_from_text(tok, 4, 32), ids_from_text(tok, 4, 32, offset=4000)
    ref = tiny_model("llama")
    with torch.no_grad():
        for layer in ref.model.layers:  # MLP activations near float16's limit, the block outputs moderate
            layer.post_attention_layernorm.weight.mul_(170)
            layer.mlp.down_proj.weight.div_(170)
    half = copy.deepcopy(ref).half()
    ref.load_state_dict({k: v.float() for k, v in half.state_dict().items()})  # the same values in float32
    seen = []
    stage = dpruner._domain_stage

    def spy(model, layers, *args, **kwargs):
        seen.append({m.weight.dtype for m in layers.values()})
        return stage(model, layers, *args, **kwargs)

    dpruner._domain_stage = spy
    try:
        for model in (ref, half):
            dpruner.prune_model(model, general, ratio=0.5, domain=domain, lr=0.0, general_weight=0.0, progress=False)
    finally:
        dpruner._domain_stage = stage
    assert seen == [{torch.float32}, {torch.float32}]
    assert all(p.dtype == torch.float16 for p in half.parameters())  # its own tensors back
    for (n, a), b in zip(ref.named_parameters(), half.parameters()):
        if n.endswith("proj.weight"):
            assert ((a != 0) != (b != 0)).float().mean() < 0.01, n
