"""ARMOR: the factorized module, the fit's guarantees against SparseGPT, and the factor files."""

import json
from pathlib import Path

import pytest
import torch

from prunekit.errors import InputError
from prunekit.select import NM
from prunekit.weights.methods import armor, sparsegpt
from conftest import tiny_model

P24 = NM(2, 4)


def hessian_of(d_in, seed=0, tokens=4096):
    """``2/n X^T X`` of correlated inputs with features of very different size (full rank)."""
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    x = latent @ torch.randn(8, d_in, generator=g) + 0.3 * torch.randn(tokens, d_in, generator=g)
    x = x * torch.logspace(-0.5, 0.5, d_in)
    return 2 * x.T @ x / tokens


def block_diag(blocks, d):
    """The d x d block-diagonal matrix of `blocks` (the last block cut when it overhangs d)."""
    return torch.block_diag(*blocks)[:d, :d]


def random_factors(out, inp, bs, seed=0, pattern=P24):
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, inp // pattern.m, pattern.m, generator=g).argsort(-1) < pattern.n
    core = torch.randn(out, inp, generator=g) * keep.reshape(out, inp)
    nbo, nbi = -(-out // bs), -(-inp // bs)
    a = torch.eye(bs) + 0.2 * torch.randn(nbo, bs, bs, generator=g)
    b = torch.eye(bs) + 0.2 * torch.randn(nbi, bs, bs, generator=g)
    return core, a, b


def is_n_m(core, pattern):
    groups = (core != 0).reshape(core.shape[0], -1, pattern.m).sum(-1)
    return bool((groups <= pattern.n).all())


@pytest.mark.parametrize("shape,bs", [((64, 128), 16), ((40, 72), 16), ((24, 40), 32)])
def test_module_forward_equals_dense_weight(shape, bs):
    out, inp = shape
    core, a, b = random_factors(out, inp, bs)
    bias = torch.randn(out)
    module = armor.ArmorLinear(core, a, b, bias)
    # the dense weight is the product of the explicit block-diagonal matrices (last blocks cut when padded)
    expected = block_diag(list(a), out) @ core @ block_diag(list(b), inp)
    assert torch.allclose(module.dense_weight(), expected, atol=1e-5)
    x = torch.randn(3, 5, inp)
    assert torch.allclose(module(x), x @ expected.T + bias, atol=1e-4)  # with autograd: the einsum path
    module(x).sum().backward()
    assert module.a.grad is not None and module.core.grad is not None
    with torch.no_grad():  # the batched GEMM paths: a permuted copy (few CPU rows), strided views (many), and a
        for rows in (x, torch.randn(2, 150, inp), torch.randn(inp, 300).T):  # transposed (non-contiguous) input
            assert torch.allclose(module(rows), rows @ expected.T + bias, atol=1e-4)
    full, rest_o = divmod(out, min(bs, out))
    assert module.extra_params == sum(k * k for k in [min(bs, out)] * full + ([rest_o] if rest_o else [])) + sum(
        k * k for k in [min(bs, inp)] * (inp // min(bs, inp)) + ([inp % min(bs, inp)] if inp % min(bs, inp) else [])
    )


def planted_layer(seed=0, out=64, inp=128, bs=16):
    """``W = A0 S B0`` with a 2:4 S and block-diagonal A0, B0: exactly representable by ARMOR, not by 2:4 alone."""
    core, a, b = random_factors(out, inp, bs, seed)
    w = armor.ArmorLinear(core, a, b).dense_weight()
    return w, hessian_of(inp, seed)


def test_fit_beats_sparsegpt_on_a_planted_layer():
    w, h = planted_layer()
    r = armor.prune_weight(w, h, ratio=0.5, pattern=P24, block_size=16, iters=150)
    sgpt = armor.proxy_loss(w, sparsegpt.prune_weight(w, h, ratio=0.5, pattern=P24), h)
    ours = armor.proxy_loss(w, r.weight, h)
    assert ours < 0.5 * sgpt, (ours, sgpt)
    assert r.info["proxy_loss_sparsegpt"] == pytest.approx(sgpt, rel=1e-3)
    assert r.info["proxy_loss"] == pytest.approx(ours, rel=1e-3)
    # the module is the replacement: exact N:M core, its dense weight, the right overhead
    m = r.module
    assert is_n_m(m.core, P24) and r.sparsity >= 0.5
    assert r.sparsity == pytest.approx(float((m.core == 0).float().mean()))
    assert torch.equal(r.weight, m.dense_weight())
    x = torch.randn(7, 128)
    assert torch.allclose(m(x), x @ r.weight.T, atol=1e-4)
    assert r.extra_params == m.extra_params == 64 * 16 + 128 * 16
    assert r.info["iterations"] >= 1 and r.info["support_changes"] >= 0


@pytest.mark.parametrize("seed,lr,iters", [(1, armor.LR, 40), (2, 1.0, 30), (3, armor.LR, 0)])
def test_never_above_sparsegpt(seed, lr, iters):
    # random (not planted) layers, even a diverging learning rate: the best iterate is kept, SparseGPT's first
    g = torch.Generator().manual_seed(seed)
    w, h = torch.randn(48, 96, generator=g), hessian_of(96, seed)
    sgpt_w = sparsegpt.prune_weight(w, h, ratio=0.5, pattern=P24)
    r = armor.prune_weight(w, h, ratio=0.5, pattern=P24, block_size=32, iters=iters, lr=lr, seed=seed)
    assert armor.proxy_loss(w, r.weight, h) <= armor.proxy_loss(w, sgpt_w, h)
    assert is_n_m(r.module.core, P24)
    if iters == 0:
        assert torch.allclose(r.weight, sgpt_w) and r.info["iterations"] == 0


def test_non_divisible_shape_pads_the_last_block():
    g = torch.Generator().manual_seed(4)
    w, h = torch.randn(40, 72, generator=g), hessian_of(72, 4)
    r = armor.prune_weight(w, h, pattern=P24, block_size=32, iters=30)
    m = r.module
    assert m.a.shape == (2, 32, 32) and m.b.shape == (3, 32, 32)
    assert m.extra_params == (32 * 32 + 8 * 8) + (2 * 32 * 32 + 8 * 8)
    assert r.weight.shape == (40, 72) and is_n_m(m.core, P24)
    x = torch.randn(5, 72)
    assert torch.allclose(m(x), x @ r.weight.T, atol=1e-4)
    assert r.info["proxy_loss"] < r.info["proxy_loss_sparsegpt"]


def test_discrete_step_is_exact_and_never_raises_the_loss():
    w, h = torch.randn(40, 72), hessian_of(72, 5)
    p = armor._Problem(w, h, 16, P24)
    core, a, b = random_factors(40, 72, 16, seed=5)
    core = p.pad_core(core)
    mask = core != 0
    gen = torch.Generator().manual_seed(0)
    total_swaps = 0
    for _ in range(5):
        before, _, _, grad_core = armor._loss_grads(p, a, core, b)
        changed, predicted, swaps = armor._discrete_step(p, a, core, mask, b, grad_core, gen)
        after = armor._loss_grads(p, a, core, b)[0]
        assert predicted <= 0 and after <= before + 1e-7
        assert after - before == pytest.approx(predicted, rel=1e-3, abs=1e-7)
        assert torch.equal(mask, core != 0) and is_n_m(core[:40, :72], P24) and not core[40:].any()
        total_swaps += swaps
    assert total_swaps > 0  # random supports: the six-candidate search changes some


def test_general_n_m_pattern():
    w, h = torch.randn(32, 64), hessian_of(64, 6)
    r = armor.prune_weight(w, h, pattern=NM(4, 8), block_size=16, iters=20)
    assert is_n_m(r.module.core, NM(4, 8)) and r.module.pattern == NM(4, 8)
    assert r.info["proxy_loss"] <= r.info["proxy_loss_sparsegpt"]


def test_refuses_what_it_cannot_do():
    w, h = torch.randn(16, 32), hessian_of(32)
    with pytest.raises(InputError, match="armor needs --pattern N:M"):
        armor.prune_weight(w, h, ratio=0.5, pattern=None)
    import prunekit
    from conftest import tiny_model

    model = tiny_model("llama")  # refused before calibration (the first layer said it, once calibration had run)
    with pytest.raises(InputError, match=r"armor needs --pattern N:M \(pattern="):
        prunekit.prune(model, method="armor", ratio=0.5, calibration=torch.zeros(2, 8, dtype=torch.long))
    with pytest.raises(InputError, match="disagrees"):
        armor.prune_weight(w, h, ratio=0.3, pattern=P24)
    with pytest.raises(InputError, match="multiple of the pattern"):
        armor.prune_weight(w, h, pattern=P24, block_size=6)
    with pytest.raises(InputError, match="C\\(M, N\\)"):
        armor.prune_weight(torch.randn(16, 32), hessian_of(32), pattern=NM(8, 16))


def armored_model():
    """A tiny Qwen2 (q/k/v have biases) with two Linears replaced by fitted ArmorLinears."""
    model = tiny_model("qwen2")
    layers = model.model.layers
    for parent, attr in ((layers[0].self_attn, "q_proj"), (layers[1].mlp, "down_proj")):
        linear = getattr(parent, attr)
        w = linear.weight.detach()
        r = armor.prune_weight(w, hessian_of(w.shape[1]), pattern=P24, block_size=32, iters=10, bias=linear.bias)
        setattr(parent, attr, r.module)
    return model


def test_state_dict_is_dense_and_round_trips():
    model = armored_model()
    q = model.model.layers[0].self_attn.q_proj
    state = model.state_dict()
    assert set(k for k in state if k.startswith("model.layers.0.self_attn.q_proj.")) == {
        "model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.bias"}
    assert torch.equal(state["model.layers.0.self_attn.q_proj.weight"], q.dense_weight())
    model.load_state_dict(state)  # strict: the dense weight of the factors is accepted
    state["model.layers.0.self_attn.q_proj.weight"] = state["model.layers.0.self_attn.q_proj.weight"] + 1
    with pytest.raises(RuntimeError, match="differs from the ARMOR factors"):
        model.load_state_dict(state)


def test_save_pretrained_then_install_factors(tmp_path):
    from transformers import AutoModelForCausalLM

    model = armored_model()
    ids = torch.randint(0, 128, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    model.save_pretrained(tmp_path)
    assert armor.save_factors(model, tmp_path) == 2
    # any transformers loads the folder as a plain dense model computing the same function
    dense = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()
    assert not any(isinstance(m, armor.ArmorLinear) for m in dense.modules())
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, want, atol=1e-4)
    # prunekit puts the factors back
    assert armor.install_factors(dense, tmp_path) == 2
    q = dense.model.layers[0].self_attn.q_proj
    assert isinstance(q, armor.ArmorLinear) and q.bias is not None
    assert isinstance(dense.model.layers[1].mlp.down_proj, armor.ArmorLinear)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, want, atol=1e-4)
    for name in ("model.layers.0.self_attn.q_proj", "model.layers.1.mlp.down_proj"):
        for key, value in model.get_submodule(name).factors().items():
            assert torch.equal(dense.get_submodule(name).factors()[key], value)
    assert armor.install_factors(dense, tmp_path / "nowhere") == 0


def test_the_factor_file_is_the_same_bytes_each_save_and_an_older_file_still_installs(tmp_path):
    """Several metadata keys came out in a random order (safetensors), so two identical runs differed in bytes."""
    import subprocess
    import sys

    from safetensors.torch import load_file, save_file

    from transformers import AutoModelForCausalLM

    model = armored_model()
    model.save_pretrained(tmp_path)
    armor.save_factors(model, tmp_path)
    script = (f"import sys; sys.path.insert(0, {str(Path(__file__).parent)!r}); import test_armor as t; "
              "t.armor.save_factors(t.armored_model(), sys.argv[1])")
    digests = set()
    for i in range(3):  # fresh processes: the order was per process
        out = tmp_path / f"run{i}"
        subprocess.run([sys.executable, "-c", script, str(out)], check=True)
        digests.add((out / armor.FACTORS_FILE).read_bytes())
    assert len(digests) == 1 and digests.pop() == (tmp_path / armor.FACTORS_FILE).read_bytes()
    # a file written before: three metadata keys
    from safetensors import safe_open

    with safe_open(str(tmp_path / armor.FACTORS_FILE), framework="pt") as f:
        info = json.loads(f.metadata()["prunekit_armor"])
    save_file(load_file(tmp_path / armor.FACTORS_FILE), str(tmp_path / armor.FACTORS_FILE), metadata=info)
    assert armor.install_factors(AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32), tmp_path) == 2


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_prune_on_a_half_precision_model_keeps_its_dtype(dtype):
    # the ArmorLinear was installed in fp32 into the fp16/bf16 model, and the next block's pass failed
    import prunekit

    from conftest import TEXT, char_tokenizer

    model = tiny_model("llama").to(dtype)
    prunekit.prune(model, method="armor", pattern="2:4", tokenizer=char_tokenizer(),
                   calibration=prunekit.Text("t", TEXT, "license"), samples=4, seqlen=32, block_size=16, iters=3,
                   progress=False)
    modules = [m for m in model.modules() if isinstance(m, armor.ArmorLinear)]
    assert modules and {p.dtype for p in model.parameters()} == {dtype}
    assert all(is_n_m(m.core, P24) for m in modules)
    with torch.no_grad():
        assert torch.isfinite(model(torch.randint(3, 100, (1, 16))).logits).all()


def test_gpt2_conv1d_layers_save_in_their_own_layout_and_reload(tmp_path):
    """GPT-2's Conv1D stores its weight [in, out]: the saved dense weight must be the transpose of A core B, or
    transformers refuses the folder (c_attn, c_fc) or silently reads a transposed square matrix (c_proj)."""
    import prunekit
    from transformers import AutoModelForCausalLM

    from conftest import TEXT, char_tokenizer

    model, tok = tiny_model("gpt2"), char_tokenizer()
    prunekit.prune(model, method="armor", pattern="2:4", tokenizer=tok, calibration=prunekit.Text("t", TEXT, "license"),
                   samples=4, seqlen=32, block_size=16, iters=3, progress=False)
    proj = model.transformer.h[0].attn.c_proj
    assert isinstance(proj, armor.ArmorLinear) and proj.conv1d_layout
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    out = prunekit.save_pruned(model, tok, tmp_path / "m")
    dense = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()  # plain transformers
    assert torch.equal(dense.transformer.h[0].attn.c_proj.weight, proj.dense_weight().T)
    with torch.no_grad():
        assert torch.allclose(dense(ids).logits, want, atol=1e-4)
    again, _ = prunekit.load_model(out)  # with the factors installed again
    assert isinstance(again.transformer.h[0].mlp.c_fc, armor.ArmorLinear)
    with torch.no_grad():
        assert torch.allclose(again(ids).logits, want, atol=1e-4)


def test_install_factors_refuses_weights_from_another_run(tmp_path):
    model = armored_model()
    assert armor.save_factors(model, tmp_path) == 2
    with pytest.raises(InputError, match="disagree"):
        armor.install_factors(tiny_model("qwen2"), tmp_path)  # the dense, unpruned weights


CUDA_SM80 = torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 8


@pytest.mark.skipif(not CUDA_SM80, reason="needs a CUDA GPU of compute capability >= 8.0")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("inp", [512, 576])  # 576, SmolLM2's width: B's blocks of 128 pad it, the core takes a slice
@pytest.mark.parametrize("tokens", [1, 128])
def test_cuda_core_runs_semi_structured_and_matches_dense(dtype, inp, tokens):
    out, bs = 256, 128  # the kernels want both sides multiples of 64 (fp16/bf16)
    core, a, b = random_factors(out, inp, bs)
    module = armor.ArmorLinear(core, a, b, torch.randn(out)).to("cuda", dtype)
    x = torch.randn(tokens, inp, device="cuda", dtype=dtype) if tokens == 1 else torch.randn(4, tokens // 4, inp,
                                                                                             device="cuda", dtype=dtype)
    y = module(x)
    # the semi-structured kernel really ran: the converted core is cached and nothing fell back to dense
    assert not module._sparse_failed, "PyTorch refused the semi-structured conversion or product"
    assert module._sparse_cache is not None
    assert type(module._sparse_cache[1]).__name__.startswith("SparseSemiStructuredTensor")
    expected = x.float() @ module.dense_weight().float().T + module.bias.float()
    assert torch.allclose(y.float(), expected, rtol=2e-2, atol=5e-2 * expected.abs().max().item())
    # a changed core is re-converted, not served from the stale cache
    with torch.no_grad():
        module.core.mul_(2)
    expected2 = x.float() @ module.dense_weight().float().T + module.bias.float()
    assert torch.allclose(module(x).float(), expected2, rtol=2e-2, atol=5e-2 * expected2.abs().max().item())
    module.sparse_kernel = False  # the user's opt-out: the dense core, the same function
    assert module._sparse_core(x) is None
    assert torch.allclose(module(x).float(), expected2, rtol=2e-2, atol=5e-2 * expected2.abs().max().item())


def test_steps_that_would_train_or_reshape_armor_layers_refuse_them_and_leave_the_model(tmp_path):
    """Depth recovery in full trained the core's zeros away (the saved folder then read as damaged everywhere),
    LoRA steps blamed GPT-2's Conv1D, and structured pruning was an AttributeError traceback."""
    import prunekit
    from prunekit import depth
    from prunekit.data import sft as S

    from conftest import char_tokenizer

    model = armored_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 100, (4, 16), generator=torch.Generator().manual_seed(0))
    target = depth.causal_lm_target(model, ids, batch_size=2)
    said = r"model\.layers\.0\.self_attn\.q_proj \(and 1 more\) is ARMOR-factorized"
    for trainable in ("full", "lora"):
        with pytest.raises(InputError, match=said + r".*recovery would train the core's zeros away"):
            depth.recover(target, steps=2, trainable=trainable)
    with pytest.raises(InputError, match=said + r".*recoverability=frozen"):
        depth.tinyfusion(target, kept=1, steps=2)
    tok = char_tokenizer()
    examples = S.tokenize([{"instruction": "1+1=", "response": "2"}], tok, max_length=16)
    for rank in (None, 4):
        with pytest.raises(InputError, match=said + r".*fine-tune the dense model, then prune it with ARMOR"):
            S.sft(model, examples, pad_id=tok.eos_token_id, lora_rank=rank, progress=False)
    with pytest.raises(InputError, match=r"is already factorized \(ARMOR\); structured pruning"):
        prunekit.prune_structured(model, method="magnitude-structured", ratio=0.3, progress=False)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(type(m).__name__ != "LoRALinear" for m in model.modules())


def test_armor_learning_rate_warms_up_linearly_then_decays_on_a_cosine():
    """"linear warm-up over the first 10% of the iterations, then cosine decay to 0"."""
    lr, iters = 0.01, 100
    sched = [armor._lr_at(lr, it, iters) for it in range(iters)]
    warm = sched[:10]
    assert warm[0] == pytest.approx(lr / 10)
    assert all(b > a for a, b in zip(warm, warm[1:]))
    assert warm[-1] == pytest.approx(lr)
    assert all(b <= a for a, b in zip(sched[10:], sched[11:]))
    assert sched[10] == pytest.approx(lr) and sched[-1] < 0.01 * lr


def _armor_loop(monkeypatch, losses, *, iters, patience):
    """prune_weight with the loss sequence `losses` (one per iteration) and no real steps."""
    calls = {"i": 0}

    def fake_loss_grads(p, a, core, b):
        loss = losses[min(calls["i"], len(losses) - 1)]
        calls["i"] += 1
        return loss, torch.zeros_like(a), torch.zeros_like(b), torch.zeros_like(core)

    def fake_discrete(p, a, core, mask, b, grad_core, gen):
        return torch.zeros_like(mask), 0.0, 0

    monkeypatch.setattr(armor, "_loss_grads", fake_loss_grads)
    monkeypatch.setattr(armor, "_discrete_step", fake_discrete)
    g = torch.Generator().manual_seed(0)
    w = torch.randn(8, 8, generator=g)
    x = torch.randn(64, 8, generator=g)
    r = armor.prune_weight(w, x.T @ x / 32, pattern=NM(2, 4), block_size=4, iters=iters, patience=patience)
    return r.info


def test_armor_stops_after_patience_iterations_without_relative_improvement(monkeypatch):
    """The loop stops when the loss has not improved by a relative 1e-6 for `patience` iterations: improvements
    of 1e-8 relative do not count."""
    losses = [1.0 - 1e-8 * i for i in range(200)]
    info = _armor_loop(monkeypatch, losses, iters=100, patience=3)
    assert info["iterations"] == 3


def test_armor_runs_on_while_the_loss_improves_and_keeps_the_best_iterate(monkeypatch):
    losses = [1.0 * 0.9 ** i for i in range(200)]  # 10% better every iteration: never stale
    assert _armor_loop(monkeypatch, losses, iters=20, patience=2)["iterations"] == 20
    losses = [1.0, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0, 1.1]
    info = _armor_loop(monkeypatch, losses, iters=50, patience=3)
    assert info["iterations"] == 4  # best at 1, then 3 iterations without improvement
    assert info["proxy_loss"] == 0.5  # the best iterate, not the last
    assert info["proxy_loss_sparsegpt"] == 1.0


@pytest.mark.parametrize("wrong", [False, True])
def test_first_kernel_product_is_checked_against_the_dense_core(monkeypatch, wrong):
    """The H200's semi-structured product was wrong (relative error ~1.4) without raising: the first product after
    a conversion is compared with the dense core. A stand-in "kernel" on the CPU: right, or twice the core."""
    core, a, b = random_factors(32, 64, 16)
    module = armor.ArmorLinear(core, a, b, torch.randn(32))
    stand_in = module.core.detach() * (2.0 if wrong else 1.0)
    monkeypatch.setattr(module, "_sparse_core", lambda x: None if module._sparse_failed else stand_in)
    x = torch.randn(3, 5, 64)
    want = x @ module.dense_weight().T + module.bias
    if wrong:
        with pytest.warns(RuntimeWarning, match=r"disagreed with the dense core on a 32x64 layer"):
            got = module(x)
        assert module._sparse_failed
    else:
        got = module(x)
        assert module._sparse_checked and not module._sparse_failed
    assert torch.allclose(got, want, atol=1e-4)  # the wrong product is never returned
    assert torch.allclose(module(x), want, atol=1e-4)  # and later calls run dense
