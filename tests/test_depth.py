"""Depth pruning: planted near-identity blocks, N:M masks over layers, gating == dropping, export, determinism,
recovery and the CLI's refusals."""

from __future__ import annotations

import copy
import dataclasses
import importlib
import json
import math
import shutil
import subprocess
import sys

import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_post_hook, register_optimizer_step_pre_hook

from prunekit import depth
from prunekit.cli import main
from prunekit.depth import DepthTarget
from prunekit.errors import InputError

recovery_mod = importlib.import_module("prunekit.depth.recovery")  # prunekit.depth.tinyfusion is also a function
tinyfusion_mod = importlib.import_module("prunekit.depth.tinyfusion")


def tiny_lm(kind: str = "llama", layers: int = 4, seed: int = 0, **extra):
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256, **extra)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


def plant_identity(model, layers=(1, 2), scale=1e-3):
    """Make decoder layers near-identity: their residual branches (o_proj, down_proj) scaled to almost 0."""
    with torch.no_grad():
        for i in layers:
            model.model.layers[i].self_attn.o_proj.weight.mul_(scale)
            model.model.layers[i].mlp.down_proj.weight.mul_(scale)
    return model


def distill_target(model, ids, batch_size=4) -> DepthTarget:
    """Loss = KL(dense model || model): removing a block costs exactly what it changes."""
    dense = {}
    with torch.no_grad():
        for i in range(0, ids.shape[0], batch_size):
            dense[i] = model(input_ids=ids[i : i + batch_size]).logits.log_softmax(-1)  # [b, seq, vocab]
    batches = [(i, ids[i : i + batch_size]) for i in range(0, ids.shape[0], batch_size)]

    def loss(m, batch):
        i, x = batch
        s = m(input_ids=x, use_cache=False).logits.log_softmax(-1)
        return nn.functional.kl_div(s.flatten(0, 1), dense[i].flatten(0, 1), log_target=True, reduction="batchmean")

    return DepthTarget(model, model.model.layers, batches, loss)


def ids(n=8, seqlen=16, seed=0):
    return torch.randint(0, 128, (n, seqlen), generator=torch.Generator().manual_seed(seed))


class Block(nn.Module):
    """A DiT-like block: ``forward(x, c) -> x + W2 relu(W1 (x + c))``."""

    def __init__(self, d):
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(d, 2 * d), nn.Linear(2 * d, d)

    def forward(self, x, c):
        return x + self.fc2(torch.relu(self.fc1(x + c)))


class Stack(nn.Module):
    def __init__(self, d=16, depth=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(d) for _ in range(depth))

    def forward(self, x, c):
        for b in self.blocks:
            x = b(x, c)
        return x


def stack_target(model, planted=(), n=32, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for i in planted:
            model.blocks[i].fc2.weight.mul_(1e-3)
            model.blocks[i].fc2.bias.zero_()
    xs, cs = torch.randn(n, 4, d, generator=gen), torch.randn(n, 1, d, generator=gen)
    with torch.no_grad():
        ys = model(xs, cs)
    batches = [(xs[i : i + 8], cs[i : i + 8], ys[i : i + 8]) for i in range(0, n, 8)]
    return DepthTarget(model, model.blocks, batches, lambda m, b: ((m(b[0], b[1]) - b[2]) ** 2).mean())


# ---------------------------------------------------------------- planted near-identity blocks

@pytest.mark.parametrize("method", ["shortgpt", "sensitivity", "random", "tinyfusion"])
def test_planted_identity_blocks_are_removed_by_every_method_llama(method):
    model = plant_identity(tiny_lm())
    target = distill_target(model, ids())
    keep, _ = depth.select_blocks(target, method, kept=2, candidates=24, steps=40, seed=0,
                                  **({"groups": "1:2"} if method == "tinyfusion" else {}))
    assert keep == [True, False, False, True]


@pytest.mark.parametrize("method", ["shortgpt", "sensitivity", "tinyfusion"])
def test_planted_identity_blocks_are_removed_generic_blocks(method):
    torch.manual_seed(0)
    model = Stack()
    target = stack_target(model, planted=(1, 2, 4))
    keep, _ = depth.select_blocks(target, method, kept=3, steps=60, seed=1,
                                  **({"groups": "1:2"} if method == "tinyfusion" else {}))
    assert keep == [True, False, False, True, False, True]


def test_scores_are_computed_once_and_reported():
    """ShortGPT's block influence ran twice (once to choose, once for the report); sensitivity reported nothing."""
    import dataclasses

    model = plant_identity(tiny_lm())
    target = distill_target(model, ids())
    calls = []
    counted = dataclasses.replace(target, loss=lambda m, b: calls.append(1) or target.loss(m, b))
    keep, info = depth.select_blocks(counted, "shortgpt", kept=2)
    assert len(calls) == len(target.batches)
    assert info["block_influence"] == pytest.approx(depth.block_influence(target).tolist())
    calls.clear()
    keep, info = depth.select_blocks(counted, "sensitivity", kept=2)
    assert len(calls) == target.depth * len(target.batches)
    losses = info["loss_without_block"]
    assert len(losses) == target.depth and keep == [True, False, False, True]
    assert min(losses[0], losses[3]) > max(losses[1], losses[2])  # the planted identities cost least to remove


def test_every_other_keeps_first_and_last_evenly():
    keep = depth.every_other(30, kept=15)
    assert [i for i, k in enumerate(keep) if k] == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29]
    assert sum(depth.every_other(30, kept=20)) == 20


# ---------------------------------------------------------------- N:M masks over layers

def test_every_sampled_mask_keeps_exactly_n_of_each_m_and_passes_gradients():
    groups = [(1, 2), (2, 3), (2, 4), (3, 5)]
    options = [depth.group_options(n, m) for n, m in groups]
    assert options[1].tolist() == [[1, 1, 0], [1, 0, 1], [0, 1, 1]]
    logits = [nn.Parameter(0.01 * torch.randn(o.shape[0])) for o in options]  # scaled x100: ~N(0, 1)
    masks = depth.sample_masks(logits, options, samples=500, tau=1.0, scale=100.0,
                               generator=torch.Generator().manual_seed(0))  # [500, 14]
    assert masks.shape == (500, 14)
    assert set(masks.detach().unique().tolist()) <= {0.0, 1.0}
    start = 0
    for n, m in groups:
        assert (masks[:, start : start + m].sum(1) == n).all()
        start += m
    (masks * torch.randn(14)).sum().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in logits)


def test_tinyfusion_keeps_n_of_each_group_with_mixed_groups():
    torch.manual_seed(0)
    target = stack_target(Stack(depth=7))
    res = depth.tinyfusion(target, kept=4, groups="1:3,3:4", steps=5, seed=0)
    assert sum(res.keep[:3]) == 1 and sum(res.keep[3:]) == 3
    assert len(res.losses) == 5 and res.groups == [(1, 3), (3, 4)]


# ---------------------------------------------------------------- gating == dropping

def test_gated_model_with_hard_mask_equals_pruned_model():
    model = tiny_lm()
    x = ids(3, 12)
    keep = [True, False, True, False]
    pruned = copy.deepcopy(model)
    kept = depth.drop_layers(pruned, keep)
    assert kept == [0, 2] and pruned.config.num_hidden_layers == 2
    with torch.no_grad():
        want = pruned(input_ids=x).logits
        with depth.gates(model.model.layers) as g:
            for gate, k in zip(g, keep):  # hard float gates: skipped blocks never run
                gate.gate = None if k else 0.0
            got_float = model(input_ids=x).logits
            for gate, k in zip(g, keep):  # per-sample tensor gates (the training path)
                gate.gate = torch.full((3,), float(k))
            got_tensor = model(input_ids=x).logits
    assert torch.equal(got_float, want)
    assert torch.allclose(got_tensor, want, atol=1e-6)
    assert all(type(b).__name__ == "LlamaDecoderLayer" for b in model.model.layers)  # gates removed


def test_gates_with_extra_arguments_and_tensor_outputs():
    torch.manual_seed(0)
    model = Stack(depth=3)
    x, c = torch.randn(2, 4, 16), torch.randn(2, 1, 16)
    with torch.no_grad(), depth.gates(model.blocks) as g:
        g[0].gate = torch.tensor([1.0, 0.0])  # sample 0 runs block 0, sample 1 skips it
        out = model(x, c)
    with torch.no_grad():
        ref0 = model(x[:1], c[:1])
        ref1 = model.blocks[2](model.blocks[1](x[1:], c[1:]), c[1:])
    assert torch.allclose(out[:1], ref0, atol=1e-6) and torch.allclose(out[1:], ref1, atol=1e-6)


# ---------------------------------------------------------------- export

_RELOAD = """
import sys, torch
from transformers import AutoModelForCausalLM
m = AutoModelForCausalLM.from_pretrained(sys.argv[1]).eval()
x = torch.load(sys.argv[2], weights_only=True)
with torch.no_grad():
    logits = m(input_ids=x).logits
    gen = m.generate(x[:1], max_new_tokens=5, do_sample=False, min_new_tokens=5)
torch.save({"logits": logits, "gen": gen, "layers": m.config.num_hidden_layers,
            "idx": [l.self_attn.layer_idx for l in m.model.layers],
            "types": getattr(m.config, "layer_types", None)}, sys.argv[3])
"""


@pytest.mark.parametrize("kind", ["llama", "qwen2"])
def test_exported_model_reloads_with_identical_outputs_in_a_fresh_process(kind, tmp_path):
    extra = dict(layer_types=["full_attention", "sliding_attention", "full_attention", "sliding_attention"],
                 sliding_window=4, use_sliding_window=True) if kind == "qwen2" else {}
    model = tiny_lm(kind, layers=4, **extra)
    kept = depth.drop_layers(model, [False, True, True, False])
    x = ids(2, 10)
    with torch.no_grad():
        want = model(input_ids=x).logits
        want_gen = model.generate(x[:1], max_new_tokens=5, do_sample=False, min_new_tokens=5)
    out = depth.save_depth_pruned(model, None, tmp_path / "pruned", metadata={"kept_layers": kept})
    assert json.loads((out / "prunekit.json").read_text())["kept_layers"] == [1, 2]
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD)
    subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "x.pt"), str(tmp_path / "got.pt")],
                   check=True, capture_output=True, cwd=tmp_path)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert got["layers"] == 2 and got["idx"] == [0, 1]
    assert torch.equal(got["logits"], want)
    assert torch.equal(got["gen"], want_gen)
    if kind == "qwen2":
        assert got["types"] == ["sliding_attention", "full_attention"]


_MOE = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32)
_DENSE_FIRST = dict(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                    n_group=1, topk_group=1, head_dim=16)


@pytest.mark.parametrize("kind, extra, keep, dense_after", [
    ("qwen2_moe", dict(_MOE, shared_expert_intermediate_size=32, mlp_only_layers=[1]), [False, True, True, False],
     [0]),
    ("qwen3_moe", dict(_MOE, head_dim=16, decoder_sparse_step=2), [True, False, True, True], [0, 1]),
    ("glm4_moe", _DENSE_FIRST, [False, True, True, True], []),
    ("glm4_moe", _DENSE_FIRST, [True, True, False, True], [0]),
])
def test_moe_layer_layouts_are_rewritten_so_the_folder_reloads_the_kept_blocks(kind, extra, keep, dense_after,
                                                                                tmp_path):
    """Which layers hold a dense MLP is a rule of the config (Qwen-MoE's mlp_only_layers / decoder_sparse_step,
    GLM-4-MoE's first_k_dense_replace); after dropping blocks the saved config must describe the kept blocks."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, **extra)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg).eval()
    kept_types = [type(b.mlp).__name__ for b, k in zip(model.model.layers, keep) if k]
    kept = depth.drop_layers(model, keep)
    x = ids(2, 10)
    with torch.no_grad():
        want = model(input_ids=x).logits
    out = depth.save_depth_pruned(model, None, tmp_path / "pruned", metadata={"kept_layers": kept})
    got, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    assert [type(b.mlp).__name__ for b in got.model.layers] == kept_types
    assert [i for i, b in enumerate(got.model.layers) if not hasattr(b.mlp, "experts")] == dense_after
    with torch.no_grad():
        assert torch.equal(got.eval()(input_ids=x).logits, want)


@pytest.mark.parametrize("keep", [[True, False, False, True], [False, True, True, True], [True, True, False, False]])
def test_qwen2_max_window_layers_agrees_with_the_kept_layer_types(keep):
    """layer_types was rewritten but max_window_layers kept its old index, so the config's rule (layers from
    max_window_layers on slide) described other layers than its list."""
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("qwen2", vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                               num_attention_heads=4, num_key_value_heads=2, use_sliding_window=True,
                               sliding_window=8, max_window_layers=2)
    model = AutoModelForCausalLM.from_config(cfg)
    kept_types = [t for t, k in zip(cfg.layer_types, keep) if k]
    depth.drop_layers(model, keep)
    assert model.config.layer_types == kept_types
    rule = {k: v for k, v in model.config.to_dict().items() if k != "layer_types"}
    assert AutoConfig.for_model(**rule).layer_types == kept_types


def test_a_layout_the_rewrite_misses_is_refused_before_the_model_changes(monkeypatch):
    from prunekit.depth import export

    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("glm4_moe", vocab_size=128, hidden_size=64, intermediate_size=128,
                               num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2, **_DENSE_FIRST)
    model = AutoModelForCausalLM.from_config(cfg)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    real = export._config_updates
    monkeypatch.setattr(export, "_config_updates",  # as if prunekit did not know first_k_dense_replace
                        lambda config, kept, n: {k: v for k, v in real(config, kept, n).items()
                                                 if k != "first_k_dense_replace"})
    with pytest.raises(InputError, match="describes other weights than the kept blocks hold"):
        depth.drop_layers(model, [False, True, True, True])
    assert len(model.model.layers) == 4 and model.config.num_hidden_layers == 4
    assert model.config.first_k_dense_replace == 1
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_load_model_refuses_a_folder_whose_config_does_not_describe_its_weights(tmp_path):
    import prunekit
    from conftest import char_tokenizer

    model = tiny_lm("llama", layers=4)
    model.save_pretrained(tmp_path / "m")
    char_tokenizer().save_pretrained(tmp_path / "m")
    config = json.loads((tmp_path / "m" / "config.json").read_text())
    config["num_hidden_layers"] = 3  # layer 3's weights are left over
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="weights do not match its config.json: 9 weights in the files"):
        prunekit.load_model(tmp_path / "m")
    config["num_hidden_layers"] = 5  # layer 4's weights would be random: refused before the load builds them
    (tmp_path / "m" / "config.json").write_text(json.dumps(config))
    with pytest.raises(InputError, match="config.json describes 5 layers but the weights hold 4; fix num_hidden"):
        prunekit.load_model(tmp_path / "m")


# ---------------------------------------------------------------- determinism, recovery

def test_tinyfusion_is_deterministic_under_a_seed():
    runs = []
    for _ in range(2):
        model = tiny_lm()
        runs.append(depth.tinyfusion(distill_target(model, ids()), kept=2, groups="1:2", steps=8, seed=3))
    assert runs[0].keep == runs[1].keep
    assert runs[0].ema_logits == runs[1].ema_logits and runs[0].losses == runs[1].losses


def test_tinyfusion_leaves_the_model_as_it_found_it():
    model = tiny_lm()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    depth.tinyfusion(distill_target(model, ids()), kept=2, steps=3, seed=0)
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert all(p.requires_grad for p in model.parameters())


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_recovery_lowers_the_loss_and_leaves_a_plain_model(trainable):
    torch.manual_seed(0)
    model = Stack()
    target = stack_target(model)
    depth.drop_blocks(model.blocks, [True, False, True, True, False, True])
    before = depth.calibration_loss(target)
    res = depth.recover(target, steps=40, trainable=trainable, lr=1e-2 if trainable == "lora" else 1e-3, seed=0)
    assert depth.calibration_loss(target) < 0.8 * before
    assert res.steps == 40 and all(type(m).__name__ != "LoRALinear" for m in model.modules())


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_recovery_keeps_the_callers_modules_flags_gradients_and_teacher_mode(trainable):
    """LoRA's merge put new Linears in place of the caller's (their hooks went silent, a frozen model came back
    trainable); full recovery left the last step's gradient on every parameter (a bf16 model's were fp32, and
    the caller's next AdamW step failed); distillation left the teacher in eval mode."""
    model = tiny_lm().to(torch.bfloat16)
    teacher = copy.deepcopy(model).train()
    keep = [True, False, True, True]
    depth.drop_layers(model, keep)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    fired = []
    handle = model.model.layers[0].mlp.down_proj.register_forward_hook(lambda *_: fired.append(1))
    model.requires_grad_(False)
    model.model.norm.weight.requires_grad_(True)
    x = ids(4, 16)
    model(input_ids=x, labels=x).loss.backward()  # the caller's own gradient, on the one trainable weight
    mine = model.model.norm.weight.grad.clone()
    target = depth.causal_lm_target(model, ids(8, 16), batch_size=4)
    depth.recover(target, steps=2, trainable=trainable, lr=1e-3, teacher=(teacher, teacher.model.layers), keep=keep,
                  features=0.01)
    assert {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)} == linears
    assert teacher.training and all(not p.requires_grad for n, p in model.named_parameters() if n != "model.norm.weight")
    assert torch.equal(model.model.norm.weight.grad, mine)
    assert all(p.grad is None for n, p in model.named_parameters() if n != "model.norm.weight")
    fired.clear()
    with torch.no_grad():
        model(input_ids=x)
    assert fired == [1]
    handle.remove()


@pytest.mark.parametrize("features", [0.0, 0.01])
def test_distillation_runs_the_teacher_in_eval_mode_with_or_without_feature_matching(features):
    """Plain KD (features=0) ran a teacher the caller left in train mode with its dropout on: noisy targets."""
    model = tiny_lm()
    teacher = copy.deepcopy(model).train()
    keep = [True, False, True, True]
    depth.drop_layers(model, keep)
    modes = []
    handle = teacher.register_forward_pre_hook(lambda m, _a: modes.append(m.training))
    target = depth.causal_lm_target(model, ids(4, 16), batch_size=2)
    depth.recover(target, steps=2, trainable="lora", teacher=(teacher, teacher.model.layers), keep=keep,
                  features=features)
    handle.remove()
    assert modes == [False, False] and teacher.training  # eval for its targets, the caller's mode afterwards


def test_feature_matching_without_a_teacher_is_refused():
    model = tiny_lm()
    target = depth.causal_lm_target(model, ids(4, 16), batch_size=2)
    with pytest.raises(InputError, match=r"features=1\.0 matches the student's blocks to a teacher's"):
        depth.recover(target, steps=1, features=1.0)


def test_kd_recovery_with_feature_matching_uses_the_teacher():
    model = plant_identity(tiny_lm(), layers=(1, 3), scale=20.0)  # the dropped blocks matter
    teacher = copy.deepcopy(model)
    x = ids(8, 16)
    target = depth.causal_lm_target(model, x, batch_size=4)
    keep = [True, False, True, False]
    depth.drop_layers(model, keep)
    kd = lambda m: float(sum(target.distill(m, teacher, b) for b in target.batches))  # noqa: E731
    with torch.no_grad():
        before = kd(model)
    res = depth.recover(target, steps=15, trainable="lora", lr=3e-3, teacher=(teacher, teacher.model.layers),
                        keep=keep, features=0.01, seed=0)
    with torch.no_grad():
        assert kd(model) < before
    assert res.distilled and len(res.losses) == 15


@pytest.mark.parametrize("trainable", ["lora", "full"])
def test_half_precision_recovery_trains_in_float32_and_a_diverged_run_leaves_the_model_as_it_was(trainable):
    # fp16 recovery raised "diverged ... lower the learning rate" at any rate and left NaN weights behind
    for dtype in (torch.float16, torch.bfloat16):
        model = tiny_lm().to(dtype)
        depth.drop_layers(model, [True, False, True, True])
        target = depth.causal_lm_target(model, ids(8, 16), batch_size=4)
        before = {n: p.detach().clone() for n, p in model.named_parameters()}
        loss0 = depth.calibration_loss(target)
        depth.recover(target, steps=6, trainable=trainable, lr=1e-2 if trainable == "lora" else 1e-3)
        assert {p.dtype for p in model.parameters()} == {dtype}
        assert all(torch.isfinite(p).all() for p in model.parameters())
        assert any(not torch.equal(before[n], p) for n, p in model.named_parameters())
        assert depth.calibration_loss(target) < loss0
        trained = {n: p.detach().clone() for n, p in model.named_parameters()}
        with pytest.raises(InputError, match="left as it was before recovery"):
            depth.recover(target, steps=3, trainable=trainable, lr=1e30)
        assert all(torch.equal(trained[n], p) for n, p in model.named_parameters())
        assert {p.dtype for p in model.parameters()} == {dtype}
    model = tiny_lm().to(torch.float16)  # a refused request leaves the dtypes as they were (it left float32)
    target = depth.causal_lm_target(model, ids(8, 16), batch_size=4)
    with pytest.raises(InputError, match="smaller rank"):
        depth.recover(target, steps=1, trainable="lora", lora_rank=1000)
    assert {p.dtype for p in model.parameters()} == {torch.float16}
    model = tiny_lm()  # float32 in full: no copy to go back to, and the message says so
    target = depth.causal_lm_target(model, ids(8, 16), batch_size=4)
    if trainable == "full":
        with pytest.raises(InputError, match="keeps the diverged run's weights|left non-finite"):
            depth.recover(target, steps=3, trainable="full", lr=1e30)
    model = tiny_lm()  # float32: LoRA's diverged factors are dropped, not merged
    target = depth.causal_lm_target(model, ids(8, 16), batch_size=4)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    if trainable == "lora":
        with pytest.raises(InputError, match="left as it was before recovery"):
            depth.recover(target, steps=3, trainable="lora", lr=1e30)
        assert all(torch.equal(before[n], p) for n, p in model.named_parameters())
        assert all(type(m).__name__ != "LoRALinear" for m in model.modules())


def test_bad_api_requests_are_refused():
    target = stack_target(Stack(depth=6))
    with pytest.raises(InputError, match="keeps every block"):
        depth.shortgpt(target, kept=6)
    with pytest.raises(InputError, match="the model has 1 block; depth pruning .* needs 2 or more"):
        depth.check_kept(1, 1)  # it said "give a number below 1"
    with pytest.raises(InputError, match=">= 1"):
        depth.sensitivity(target, kept=0)
    with pytest.raises(InputError, match="does not divide"):
        depth.tinyfusion(target, kept=2, groups="1:4")
    with pytest.raises(InputError, match="keep 3 blocks but"):
        depth.tinyfusion(target, kept=2, groups="1:2")
    with pytest.raises(InputError, match="at least one calibration batch"):
        DepthTarget(target.model, target.blocks, [], target.loss)
    with pytest.raises(InputError, match="unknown tinyfusion option"):
        depth.select_blocks(target, "tinyfusion", kept=3, temperature=2)


@pytest.mark.parametrize("call, message", [
    (lambda: depth.parse_groups(None, depth=4, kept=0), "from 1 to the 4 blocks"),
    (lambda: depth.parse_groups(None, depth=4, kept=-2), "from 1 to the 4 blocks"),
    (lambda: depth.parse_groups(None, depth=4, kept=6), "from 1 to the 4 blocks"),
    (lambda: depth.parse_groups(None, depth=4, kept=True), "from 1 to the 4 blocks"),
    (lambda: depth.parse_groups(None, depth=0, kept=0), "depth"),
    (lambda: depth.group_options(3, 2), "between 1 and its M = 2"),
    (lambda: depth.group_options(0, 2), "between 1 and its M = 2"),
    (lambda: depth.group_options(1, 0), "group size M"),
])
def test_groups_without_a_pattern_are_checked_too(call, message):
    with pytest.raises(InputError, match=message):
        call()
    assert depth.parse_groups(None, depth=4, kept=2) == [(1, 2), (1, 2)]
    assert depth.group_options(1, 2).tolist() == [[1, 0], [0, 1]]


def test_default_groups_stay_enumerable():
    """13 of 30 blocks has no uniform N:M but 13:30, 120 million masks (a MemoryError after the model loaded):
    the default then takes groups of about 6 blocks; a --group that large is refused before anything is built."""
    from prunekit.depth.core import DEFAULT_GROUP_OPTIONS

    assert depth.parse_groups(None, depth=30, kept=15) == [(1, 2)] * 15  # uniform where it fits
    assert depth.parse_groups(None, depth=30, kept=20) == [(2, 3)] * 10
    assert depth.parse_groups(None, depth=30, kept=13) == [(2, 6), (3, 6), (2, 6), (3, 6), (3, 6)]
    for total in range(1, 65):
        for kept in range(1, total + 1):
            groups = depth.parse_groups(None, depth=total, kept=kept)
            assert sum(m for _, m in groups) == total and sum(n for n, _ in groups) == kept
            assert all(1 <= n <= m and math.comb(m, n) <= DEFAULT_GROUP_OPTIONS for n, m in groups), (total, kept)
    for given in ("13:30", "1:2,12:28"):
        with pytest.raises(InputError, match=r"masks to enumerate.*--group 2:6,3:6,2:6,3:6,3:6"):
            depth.parse_groups(given, depth=30, kept=13)
    with pytest.raises(InputError, match="119,759,850 masks"):
        depth.group_options(13, 30)
    with pytest.raises(InputError, match=r"masks to enumerate.*--group 2:6$"):  # uniform: the form --group takes
        depth.parse_groups("10:30", depth=30, kept=10)
    # a group that fits in memory is still learned when given (9:18, 48,620 masks, was refused at 20,000)
    assert depth.parse_groups("9:18", depth=18, kept=9) == [(9, 18)] and depth.group_options(9, 18).shape == (48620, 18)
    assert depth.parse_groups(None, depth=18, kept=9) == [(1, 2)] * 9
    with pytest.raises(InputError, match="size"):
        depth.balanced_groups(30, 13, size=0)


def test_cli_default_groups_note_and_refusal(lm_dir, calib, tmp_path, capsys, monkeypatch):
    from prunekit.depth import core

    monkeypatch.setattr(core, "DEFAULT_GROUP_OPTIONS", 3)  # the 4-block model's 3:4 (4 masks) is then too many
    monkeypatch.setattr(core, "MAX_GROUP_OPTIONS", 5)
    monkeypatch.setattr(core, "BALANCED_GROUP_SIZE", 2)
    base = ["prune", str(lm_dir), "--method", "tinyfusion", "--calib", str(calib), "--samples", "2", "--seqlen", "16",
            "--learn-steps", "2", "--no-speed", "--quiet"]
    out = tmp_path / "big"
    assert main([*base, "--layers", "2", "--group", "2:4", "--out", str(out)]) == 2  # 6 masks
    assert "group 2:4 has 6 masks to enumerate" in capsys.readouterr().err and not out.exists()
    out = tmp_path / "three"
    assert main([*base, "--layers", "3", "--out", str(out)]) == 0
    err = capsys.readouterr().err
    assert "no uniform N:M keeps 3 of 4 blocks" in err and "learns the groups 1:2,2:2" in err
    meta = json.loads((out / "prunekit.json").read_text())
    assert len(meta["kept_layers"]) == 3 and sum(meta["kept_layers"][i] < 2 for i in range(3)) == 1


def test_block_influence_is_one_minus_the_mean_cosine_over_every_token_and_the_last_block_stays():
    model, x = tiny_lm(), ids(n=6)
    target = depth.causal_lm_target(model, x, batch_size=4)  # batches of 4 and 2: a mean per token, not per batch
    bi = depth.block_influence(target)
    with torch.no_grad():
        hs = model(input_ids=x, output_hidden_states=True).hidden_states  # the last one is after the final norm
    for i in range(3):
        cos = torch.nn.functional.cosine_similarity(hs[i].flatten(0, 1), hs[i + 1].flatten(0, 1), dim=-1)
        assert float(bi[i]) == pytest.approx(1 - float(cos.mean()), abs=1e-5)
    # the causal target runs the base model only: the head's logits and the loss were computed and unused
    heads, before = [], [dict(b._forward_hooks) for b in model.model.layers]
    handle = model.lm_head.register_forward_hook(lambda *a: heads.append(1))
    assert torch.equal(depth.block_influence(target), bi) and not heads
    handle.remove()
    assert [dict(b._forward_hooks) for b in model.model.layers] == before  # its hooks are gone
    assert model(input_ids=x).logits.shape[0] == 6
    plant_identity(model, layers=(3,))  # the last block does least, and ShortGPT still keeps it
    influence = depth.block_influence(target)
    assert int(influence.argmin()) == 3
    assert depth.shortgpt(target, kept=2, influence=influence)[3]


def test_a_step_that_filled_a_tenth_of_the_zeros_is_said():
    import prunekit
    from prunekit.evaluate import zeros_kept

    model = tiny_lm()
    prunekit.prune(model, method="magnitude", ratio=0.4, progress=False)
    record, note = zeros_kept("recovery", 0.5, model)  # 0.5 sparse before, 0.4 now
    assert note is not None and "recovery filled its zeros" in note
    assert record["sparsity"] == pytest.approx(0.4, abs=0.01)
    assert zeros_kept("recovery", 0.42, model)[1] is None  # within 0.05: rounding of the kept weights


def test_distillation_is_kl_of_the_teacher_to_the_student_per_token():
    student, teacher, x = tiny_lm(seed=0), tiny_lm(seed=1), ids(n=2)
    target = depth.causal_lm_target(student, x)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(30)  # a sharp teacher: the two directions of KL differ
        lt = teacher(input_ids=x).logits.log_softmax(-1)
        ls = student(input_ids=x).logits.log_softmax(-1)
        want = float((lt.exp() * (lt - ls)).sum() / (x.shape[0] * x.shape[1]))  # KL(teacher || student) per token
        got = float(target.distill(student, teacher, x))
    assert got == pytest.approx(want, rel=1e-5)
    assert got != pytest.approx(float((ls.exp() * (ls - lt)).sum() / x.numel()), rel=1e-3)  # not the reverse KL


def test_calibration_loss_and_sensitivity_do_not_depend_on_the_batch_size():
    """6 windows in batches of 4 or 5 leave a short last batch; it counts by its samples, not as a whole batch
    (a per-batch mean gave a different loss and kept blocks [1, 2, 3] instead of [0, 2, 3])."""
    model, x = tiny_lm(), ids(n=6)
    whole = depth.causal_lm_target(model, x, batch_size=6)
    for batch_size in (1, 4, 5):
        target = depth.causal_lm_target(model, x, batch_size=batch_size)
        assert depth.calibration_loss(target) == pytest.approx(depth.calibration_loss(whole), rel=1e-5)
        assert torch.allclose(depth.removal_losses(target), depth.removal_losses(whole), rtol=1e-5)
        assert depth.sensitivity(target, kept=2) == depth.sensitivity(whole, kept=2)


@pytest.mark.parametrize("keep", [[False], [False] * 6, [True] * 6 + [False], [2] * 6])
def test_calibration_loss_refuses_a_keep_mask_that_does_not_fit(keep):
    target = stack_target(Stack(depth=6))
    with pytest.raises(InputError, match="keep-mask"):
        depth.calibration_loss(target, keep)
    assert depth.calibration_loss(target, [True] * 6) == pytest.approx(depth.calibration_loss(target))


@pytest.mark.parametrize("call, message", [
    (lambda t: depth.random_masks(t, kept=3, seed="a"), "seed"),
    (lambda t: depth.tinyfusion(t, kept=3, steps=1, seed="a", recoverability="frozen"), "seed"),
    (lambda t: depth.recover(t, steps=1, trainable="full", seed="a"), "seed"),
    (lambda t: depth.recover(t, steps=1, trainable="full", features=float("inf")), "features must be a finite"),
    (lambda t: depth.recover(t, steps=1, trainable="full", features=float("nan")), "features must be a finite"),
    (lambda t: depth.recover(t, steps=1, trainable="full", features=True), "features must be a finite"),
])
def test_bad_seeds_and_feature_weights_are_refused_before_any_work(call, message):
    target = stack_target(Stack(depth=6))
    before = copy.deepcopy(target.model.state_dict())
    with pytest.raises(InputError, match=message):
        call(target)
    assert all(torch.equal(before[n], p) for n, p in target.model.state_dict().items())


@pytest.mark.parametrize("metadata", [None, ["kept_layers"]])
def test_save_depth_pruned_refuses_metadata_that_is_not_a_dict(metadata, tmp_path):
    with pytest.raises(InputError, match="metadata must be a dict recording kept_layers"):
        depth.save_depth_pruned(tiny_lm(layers=2), None, tmp_path / "out", metadata=metadata)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("kept", [[9, 0], [1, 1], [0], [0, 1, 2], ["0", "1"], [-1, 0], 2])
def test_save_depth_pruned_refuses_kept_layers_that_do_not_describe_the_model(kept, tmp_path):
    """[9, 0, 7, 7, 3] for a 2-layer model was written into prunekit.json as given."""
    with pytest.raises(InputError, match=r"must list the 2 layers the model has by their original indices"):
        depth.save_depth_pruned(tiny_lm(layers=2), None, tmp_path / "out", metadata={"kept_layers": kept})
    assert not (tmp_path / "out").exists()
    depth.save_depth_pruned(tiny_lm(layers=2), None, tmp_path / "out", metadata={"kept_layers": [0, 3]})


# ---------------------------------------------------------------- CLI

@pytest.fixture
def lm_dir(tmp_path, tok):
    folder = tmp_path / "tiny4"
    tiny_lm().save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture
def calib(text_file):
    return text_file  # conftest's calibration text file


def test_cli_tinyfusion_with_recovery_writes_a_loadable_shallow_model(lm_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(lm_dir), "--method", "tinyfusion", "--layers", "2", "--calib", str(calib), "--samples", "8",
            "--seqlen", "32", "--learn-steps", "3", "--eval", str(calib), "--eval-tokens", "64", "--eval-seqlen", "32",
            "--quiet"]
    rc = main(args + ["--recover", "kd", "--recover-steps", "2", "--out", str(out)])
    assert rc == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert len(meta["kept_layers"]) == 2 and meta["dense_layers"] == 4 and meta["recovery"]["distilled"]
    assert meta["method_info"]["groups"] == [[1, 2], [1, 2]] and meta["recovery"]["features"] == 0.0
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(out).config.num_hidden_layers == 2
    printed = capsys.readouterr().out
    assert "4 -> 2 blocks" in printed and "measured speedup" in printed
    assert f"report: {out / 'report.md'})" in printed  # weight and width pruning named it; depth did not
    assert "| text | windows x seqlen = tokens | dense ppl | before recovery ppl | recovered ppl | ratio |" in printed
    ev = meta["evaluation"][str(calib)]  # the CLI gave dense and recovered only; the bench reports both
    assert ev["before_recovery"]["tokens"] == ev["dense"]["tokens"] == 64
    assert f"{ev['before_recovery']['ppl']:.3f} | {ev['pruned']['ppl']:.3f} |" in printed
    # "before recovery" is the pruned model as it was before recovery: the same run without it scores the same
    assert main(args + ["--recover", "none", "--out", str(tmp_path / "plain")]) == 0
    plain = json.loads((tmp_path / "plain" / "prunekit.json").read_text())
    assert plain["kept_layers"] == meta["kept_layers"]
    assert plain["evaluation"][str(calib)]["pruned"]["ppl"] == ev["before_recovery"]["ppl"] != ev["pruned"]["ppl"]
    # --kd-features adds block feature matching to the distillation (the API's recover(features=, keep=))
    feats = tmp_path / "feats"
    assert main(args + ["--recover", "kd", "--recover-steps", "2", "--kd-features", "0.5", "--out", str(feats)]) == 0
    fmeta = json.loads((feats / "prunekit.json").read_text())
    assert fmeta["recovery"]["features"] == 0.5 and fmeta["kept_layers"] == meta["kept_layers"]
    assert fmeta["recovery"]["loss_first"] > meta["recovery"]["loss_first"]  # the same first batch, plus 0.5 Rep
    capsys.readouterr()
    assert meta["speed"]["pruned"]["params"] < meta["speed"]["dense"]["params"]
    assert set(meta["speed"]["speedup"]) == {"prefill", "decode"}
    assert "measured speedup" in (out / "report.md").read_text()
    assert (out / "blocks.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "(blocks.png)" in (out / "report.md").read_text()


def test_cli_refuses_a_recovery_that_diverged_and_reports_an_overflowing_perplexity(lm_dir, calib, tmp_path,
                                                                                      capsys):
    # a diverged recovery was saved as a model of NaN weights (exit 0); exp(mean NLL) > 709 was an OverflowError
    out = tmp_path / "nan"
    base = ["prune", str(lm_dir), "--method", "shortgpt", "--layers", "2", "--calib", str(calib), "--samples", "4",
            "--seqlen", "32", "--no-speed", "--quiet"]
    assert main([*base, "--recover", "full", "--recover-steps", "3", "--recover-lr", "1e8", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "recovery diverged at learning rate 1e+08" in err and "--recover-lr" in err and not out.exists()
    from safetensors.torch import load_file, save_file

    loud = tmp_path / "loud"  # finite weights whose logits are huge: mean NLL far past 709
    shutil.copytree(lm_dir, loud)
    weights = load_file(loud / "model.safetensors")
    weights["model.norm.weight"] = weights["model.norm.weight"] * 1e5
    save_file(weights, loud / "model.safetensors", metadata={"format": "pt"})
    capsys.readouterr()
    assert main(["eval", str(loud), "--text", str(calib), "--seqlen", "32", "--tokens", "64", "--json"]) == 0
    got = json.loads(capsys.readouterr().out)
    assert got["ppl"] is None and got["nll"] > 709
    out = tmp_path / "from-loud"
    assert main(["prune", str(loud), *base[2:], "--eval", str(calib), "--eval-tokens", "64", "--eval-seqlen", "32",
                 "--out", str(out)]) == 0
    assert "inf" in capsys.readouterr().out.lower()
    meta = json.loads((out / "prunekit.json").read_text(), parse_constant=pytest.fail)  # strict JSON: no Infinity
    dense = meta["evaluation"][str(calib)]["dense"]
    assert dense["ppl"] is None and dense["nll"] > 709


@pytest.mark.parametrize("extra, message", [
    (["--layers", "4"], "keeps every block"),
    (["--layers", "7"], "keeps every block"),
    (["--layers", "0"], ">= 1"),
    ([], "needs --layers"),
    (["--layers", "2", "--group", "1:3"], "does not divide"),
    (["--layers", "2", "--group", "2:4,1:2"], "do not add up|cover|keep"),
    (["--layers", "2", "--ratio", "0.5"], "not --ratio"),
    (["--ratio", "0.5"], r"not --ratio or --pattern; \S+ has 4 blocks, so removing 0.5 of them is --layers 2$"),
    (["--layers", "2", "--calib", "/nonexistent/calib.txt"], "calib|exist|not found|No such"),
    (["--layers", "2", "--recover", "lora", "--recover-lr", "nan"], "--recover-lr must be a positive number"),
    (["--layers", "2", "--recover", "lora", "--recover-lr", "-1"], "--recover-lr must be a positive number"),
    (["--layers", "2", "--recover", "lora", "--kd-features", "0.01"], "add --recover kd \\(not lora\\)"),
    (["--layers", "2", "--kd-features", "0.01"], "add --recover kd \\(not none\\)"),
    (["--layers", "2", "--recover", "kd", "--kd-features", "nan"], "--kd-features is a feature-matching weight >= 0"),
    (["--layers", "2", "--recover", "kd", "--kd-features", "-1"], "--kd-features is a feature-matching weight >= 0"),
])
def test_cli_bad_requests_exit_2_and_write_nothing(extra, message, lm_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    args = ["prune", str(lm_dir), "--method", "tinyfusion", "--calib", str(calib), "--out", str(out), "--quiet", *extra]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error:") and len(err.strip().splitlines()) == 1
    import re

    assert re.search(message, err), err
    assert not out.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_depth_bench_reads_groups_and_steps_from_the_method_name_and_labels_longer_recovery():
    import importlib.util
    from pathlib import Path

    spec = importlib.util.spec_from_file_location("depth_bench", Path(__file__).parents[1] / "bench" / "depth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.tinyfusion_spec("tinyfusion", 100) == (None, 100)
    assert bench.tinyfusion_spec("tinyfusion-5:10", 100) == ("5:10", 100)
    assert bench.tinyfusion_spec("tinyfusion-4:6@400", 100) == ("4:6", 400)
    assert bench.tinyfusion_spec("tinyfusion@1600", 200) == (None, 1600)
    for bad in ("tinyfusion-4:6@", "tinyfusion@0", "tinyfusion@x"):
        with pytest.raises(SystemExit, match="positive whole number"):
            bench.tinyfusion_spec(bad, 100)
    default = bench.SETTINGS["recovery_steps"]
    assert bench.recovery_label("shortgpt", None) == bench.recovery_label("shortgpt", default) == "shortgpt"
    assert bench.recovery_label("tinyfusion-5:10@1600", 300) == "tinyfusion-5:10@1600+rec300"
    dit_default = bench.DIT["recovery_steps"]  # the DiT rows' own budget is the default there
    assert dit_default != default
    assert bench.recovery_label("sensitivity", dit_default, dit_default) == "sensitivity"
    assert bench.recovery_label("sensitivity", default, dit_default) == f"sensitivity+rec{default}"
    for bad in (0, -5):
        with pytest.raises(SystemExit, match="positive whole number"):
            bench.recovery_label("shortgpt", bad)
    data = {"rows": [{"kept_layers": [0, 2], "logits": [[0.02, -1e-05], [3.5]], "name": "a, b", "x": None}]}
    text = bench._compact_lists(json.dumps(data, indent=2))
    assert json.loads(text) == data
    assert '"kept_layers": [0, 2]' in text and "[0.02, -1e-05]" in text and '"name": "a, b"' in text


def test_depth_bench_out_folder_takes_the_results_and_the_report(tmp_path, monkeypatch):
    import importlib.util
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).parents[1] / "bench"))  # as when run as a script
    spec = importlib.util.spec_from_file_location("depth_bench_out", Path(__file__).parents[1] / "bench" / "depth.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    committed = bench.OUT
    bench.set_out(tmp_path / "res")
    row = {"id": "m-15-dense", "model": "m", "method": "dense", "kept": 15, "metric": "wiki_ppl",
           "before_recovery": 10.0, "after_recovery": None, "speedup": 1.0}
    bench._update(row)
    bench.report()
    assert json.loads((tmp_path / "res" / "depth.json").read_text())["rows"] == [row]
    assert "| m | 15 | dense |" in (tmp_path / "res" / "depth.md").read_text()
    assert committed.parent.name == "results" and bench.OUT == tmp_path / "res" / "depth.json"
    (tmp_path / "file").write_text("")
    with pytest.raises(SystemExit, match="is a file"):
        bench.set_out(tmp_path / "file")


@pytest.mark.integration
def test_every_other_without_recovery_reads_no_calibration(lm_dir, calib, tmp_path, capsys):
    # it loaded wiki in 512-token windows anyway: refused for a model of fewer positions; the flags changed nothing
    cfg = json.loads((lm_dir / "config.json").read_text())
    (lm_dir / "config.json").write_text(json.dumps(dict(cfg, max_position_embeddings=128)))
    out = tmp_path / "eo"
    assert main(["prune", str(lm_dir), "--method", "every-other", "--layers", "2", "--no-speed", "--quiet",
                 "--out", str(out)]) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["calibration"] is None and meta["kept_layers"] == [0, 3]
    capsys.readouterr()
    assert main(["prune", str(lm_dir), "--method", "every-other", "--layers", "2", "--calib", str(calib), "--samples",
                 "8", "--seed", "1", "--no-speed", "--quiet", "--out", str(tmp_path / "x")]) == 0
    assert ("note: every-other keeps a fixed pattern and reads no calibration without --recover; --calib, --samples, "
            "--seed unused") in capsys.readouterr().err
    assert json.loads((tmp_path / "x" / "prunekit.json").read_text())["calibration"] is None
    assert main(["prune", str(lm_dir), "--method", "every-other", "--layers", "2", "--calib", str(calib),
                 "--samples", "8", "--seqlen", "32", "--recover", "lora", "--recover-steps", "1", "--no-speed",
                 "--quiet", "--out", str(tmp_path / "rec")]) == 0  # recovery trains on the calibration text
    assert json.loads((tmp_path / "rec" / "prunekit.json").read_text())["calibration"]["samples"] == 8


def test_every_other_on_smollm2_exports_a_15_layer_model_that_reloads_identically(tmp_path):
    out = tmp_path / "d15"
    assert main(["prune", "smollm2-135m", "--method", "every-other", "--layers", "15", "--no-speed", "--out",
                 str(out), "--quiet"]) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["kept_layers"] == [0, 2, 4, 6, 8, 10, 12, 15, 17, 19, 21, 23, 25, 27, 29] and meta["speed"] is None
    assert meta["calibration"] is None  # a fixed pattern without recovery reads no text
    import prunekit

    model, tok = prunekit.load_model(out)
    x = ids(1, 32)
    with torch.no_grad():
        want = model(input_ids=x).logits
    torch.save(x, tmp_path / "x.pt")
    (tmp_path / "reload.py").write_text(_RELOAD)
    subprocess.run([sys.executable, str(tmp_path / "reload.py"), str(out), str(tmp_path / "x.pt"), str(tmp_path / "got.pt")],
                   check=True, capture_output=True, cwd=tmp_path)
    got = torch.load(tmp_path / "got.pt", weights_only=True)
    assert got["layers"] == 15 and got["idx"] == list(range(15)) and torch.equal(got["logits"], want)


def test_depth_pruning_across_architectures_saves_what_it_computes_or_refuses(tmp_path):
    """Found by a sweep of architectures: a Týr output's per-layer widths left at the old length (the folder did not
    load); GPT-Neo's cache slot (layer_id) not renumbered (IndexError in generate); GPT-2's per-index attention
    scale moved with a block (the reloaded model computed something else, silently); Gemma3n saved unloadable."""
    import transformers as T

    import prunekit
    from prunekit.errors import InputError
    from prunekit.structured.units import shrink_mlp

    torch.manual_seed(0)
    ids = torch.randint(0, 1000, (1, 8))
    llama = T.AutoModelForCausalLM.from_config(T.LlamaConfig(
        vocab_size=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2)).eval()
    for i, layer in enumerate(llama.model.layers):  # what Týr leaves: other MLP widths per layer
        shrink_mlp(layer.mlp, torch.arange(64 + 16 * i))
    prunekit.save_structured(llama, None, tmp_path / "tyr", metadata={"method": "tyr"})
    model, _ = prunekit.load(tmp_path / "tyr")
    kept = depth.drop_layers(model, [True, False, False, True])
    depth.save_depth_pruned(model, None, tmp_path / "tyr-depth", metadata={"kept_layers": kept})
    again, _ = prunekit.load(tmp_path / "tyr-depth")
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)

    neo = T.AutoModelForCausalLM.from_config(T.GPTNeoConfig(
        vocab_size=1000, hidden_size=64, num_layers=4, num_heads=4, attention_types=[[["global", "local"], 2]],
        window_size=8, max_position_embeddings=128)).eval()
    depth.drop_layers(neo, [True, False, False, True])
    assert [b.attn.attention.layer_id for b in neo.transformer.h] == [0, 1]
    with torch.no_grad():
        cached = neo.generate(ids, max_new_tokens=3, do_sample=False)
        plain = neo.generate(ids, max_new_tokens=3, do_sample=False, use_cache=False)
    assert torch.equal(cached, plain)

    gpt2 = T.AutoModelForCausalLM.from_config(T.GPT2Config(
        vocab_size=1000, n_embd=64, n_layer=4, n_head=4, scale_attn_by_inverse_layer_idx=True)).eval()
    before = {k: v.clone() for k, v in gpt2.state_dict().items()}
    with pytest.raises(InputError, match=r"scales each block's attention by 1 / \(its layer index \+ 1\)"):
        depth.drop_layers(gpt2, [True, False, False, True])
    assert len(gpt2.transformer.h) == 4 and all(torch.equal(v, gpt2.state_dict()[k]) for k, v in before.items())
    depth.drop_layers(gpt2, [True, True, False, False])  # only the last blocks go: no block moves
    depth.save_depth_pruned(gpt2, None, tmp_path / "gpt2", metadata={"kept_layers": [0, 1]})
    reloaded = T.AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2").eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(ids).logits, gpt2(ids).logits, atol=1e-6)

    gemma3n = T.AutoModelForCausalLM.from_config(T.Gemma3nTextConfig(
        vocab_size=1000, vocab_size_per_layer_input=1000, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, sliding_window=8, hidden_size_per_layer_input=8,
        num_kv_shared_layers=2, laurel_rank=4, altup_num_inputs=2,
        activation_sparsity_pattern=[0.95, 0.95, 0.0, 0.0]))
    with pytest.raises(InputError, match="leaves a config its architecture cannot be built from"):
        depth.drop_layers(gemma3n, [True, False, False, True])
    assert len(gemma3n.model.layers) == 4


def test_multimodal_models_are_refused_before_any_work():
    import transformers as T

    import prunekit
    from prunekit.errors import InputError

    config = T.Gemma3Config(text_config=dict(vocab_size=1000, hidden_size=64, intermediate_size=128,
                                             num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                             head_dim=16),
                            vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14))
    model = T.Gemma3ForConditionalGeneration(config).eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (lambda: prunekit.prune_structured(model, method="magnitude-structured", ratio=0.3),
                 lambda: depth.drop_layers(model, [True, False])):
        with pytest.raises(InputError, match="'gemma3' is a multimodal model .*text_config"):
            call()
    assert before.keys() == model.state_dict().keys()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cli_checks_gpt2_depth_and_refuses_multimodal_folders_before_loading(tmp_path, capsys, monkeypatch):
    import transformers as T

    import prunekit
    from prunekit.cli import main

    from conftest import char_tokenizer

    gpt2 = tmp_path / "gpt2"  # config.json names the depth n_layer: the --layers check was skipped
    T.GPT2LMHeadModel(T.GPT2Config(vocab_size=128, n_embd=32, n_layer=4, n_head=4)).save_pretrained(gpt2)
    char_tokenizer().save_pretrained(gpt2)
    multimodal = tmp_path / "gemma3"
    (multimodal).mkdir()
    (multimodal / "config.json").write_text(json.dumps({"model_type": "gemma3", "text_config": {"hidden_size": 64},
                                                        "vision_config": {"hidden_size": 32}}))
    (multimodal / "model.safetensors").write_bytes(b"")  # never read: refused from the config
    loads = []
    monkeypatch.setattr(prunekit, "load_model", lambda *a, **k: loads.append(a))
    for folder, said in ((gpt2, "keeps every block or more (the model has 4)"), (multimodal, "'gemma3' is a multimodal model")):
        assert main(["prune", str(folder), "--method", "shortgpt", "--layers", "4", "--out", str(tmp_path / "o"),
                     "--no-speed", "--quiet"]) == 2
        assert said in capsys.readouterr().err
    assert loads == []


def test_zeros_refilled_counts_exactly_the_input_zeros_made_nonzero():
    from conftest import tiny_model
    from prunekit.evaluate import zero_masks, zeros_refilled
    from prunekit.weights.engine import get_weight

    model = tiny_model()
    lin = model.model.layers[0].mlp.down_proj
    with torch.no_grad():
        w = get_weight(lin)
        w[:, : w.shape[1] // 2] = 0  # half of one layer, an odd count of elements per row block
        w[0, -1] = 0
    masks = zero_masks(model)
    assert list(masks) == ["model.layers.0.mlp.down_proj"]
    with torch.no_grad():
        w[3, 0], w[5, 1], w[0, -1] = 1.0, -2.0, 0.5  # three zeros refilled
        w[7, -2] = 0.0  # a new zero is not a refill
    assert zeros_refilled(masks, model) == 3


class _Add(nn.Module):
    """A block with no weights: ``x + e`` (so which blocks run is read off the output)."""

    def __init__(self, e):
        super().__init__()
        self.register_buffer("e", e)

    def forward(self, x):
        return x + self.e


class _Chain(nn.Module):
    def __init__(self, depth_):
        super().__init__()
        self.blocks = nn.ModuleList(_Add(torch.eye(depth_)[i]) for i in range(depth_))

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return x


def phased_target(phases: str, samples: int = 8) -> DepthTarget:
    """2 blocks; batch phase "A" rewards running block 0, phase "B" block 1 (the loss is minus that gate)."""
    model = _Chain(2)
    batches = [(p, torch.zeros(samples, 2)) for p in phases]

    def loss(m, batch):
        phase, x = batch
        out = m(x)  # out[:, i] = gate of block i
        return -out[:, 0 if phase == "A" else 1].mean()

    return DepthTarget(model, model.blocks, batches, loss)


def reference_masked_mse(s, t, k=2.0):
    """Masked Rep of TinyFusion's ``train_masked_kd.py``, written independently: per sample, the elements within
    k std of that sample's mean (over every token and channel) in BOTH teacher and student count."""
    total, count = 0.0, 0
    for si, ti in zip(s.detach().double(), t.detach().double()):
        si, ti = si.flatten(), ti.flatten()
        ok = ((si - si.mean()).abs() < k * si.std()) & ((ti - ti.mean()).abs() < k * ti.std())
        total += float(((si - ti) ** 2)[ok].sum())
        count += int(ok.sum())
    return total / max(count, 1)


def test_tinyfusion_temperature_goes_linearly_from_start_to_end_and_batches_cycle(monkeypatch):
    """tau goes linearly tau[0] -> tau[1] over the steps, both ends reached (4 -> 0.1 by default); batches are
    taken in order, cycling."""
    seen_tau, seen_batch = [], []
    real = tinyfusion_mod.sample_masks

    def spy(*a, **kw):
        seen_tau.append(kw["tau"])
        return real(*a, **kw)

    monkeypatch.setattr(tinyfusion_mod, "sample_masks", spy)
    target = phased_target("AB")
    counted = dataclasses.replace(target, loss=lambda m, b: seen_batch.append(b[0]) or target.loss(m, b))
    depth.tinyfusion(counted, kept=1, steps=5, seed=0, recoverability="frozen")
    assert seen_tau == pytest.approx([4.0, 3.025, 2.05, 1.075, 0.1])
    assert seen_batch == ["A", "B", "A", "B", "A"]
    seen_tau.clear()
    depth.tinyfusion(target, kept=1, steps=3, tau=(0.5, 2.0), seed=0, recoverability="frozen")
    assert seen_tau == pytest.approx([0.5, 1.25, 2.0])


def test_sampled_masks_follow_softmax_of_the_scaled_logits_for_groups_of_three_or_more_options():
    """Gumbel-max: each sample's one-hot picks option c with probability softmax(scale * g)_c (whatever tau), a
    fresh draw per sample; shown on a 1:3 group (3 options) and a 2:4 group (6 options)."""
    options = [depth.group_options(1, 3), depth.group_options(2, 4)]
    probs = [torch.tensor([0.6, 0.3, 0.1]), torch.tensor([0.4, 0.25, 0.15, 0.1, 0.06, 0.04])]
    scale = 100.0
    logits = [nn.Parameter(p.log() / scale) for p in probs]
    n = 20000
    masks = depth.sample_masks(logits, options, samples=n, tau=0.7, scale=scale,
                               generator=torch.Generator().manual_seed(0)).detach()  # [n, 7]
    start = 0
    for opts, p in zip(options, probs):
        m = masks[:, start : start + opts.shape[1]]  # [n, M]
        chosen = (m[:, None, :] == opts[None]).all(-1).float()  # [n, C]
        assert bool((chosen.sum(1) == 1).all())
        freq = chosen.mean(0)
        assert freq.tolist() == pytest.approx(p.tolist(), abs=0.015)
        start += opts.shape[1]


def test_straight_through_gradient_is_that_of_softmax_of_scaled_logits_over_tau():
    """Backward goes through soft = softmax((scale g + Gumbel) / tau): with scale * (g1 - g0) = tau the noise is
    negligible and d y1 / d g1 = (scale / tau) s1 (1 - s1) with s1 = sigmoid(1)."""
    g = nn.Parameter(torch.tensor([0.0, 1.0]))
    scale = tau = 1e4
    y = depth.sample_masks([g], [depth.group_options(1, 2)], samples=1, tau=tau, scale=scale,
                           generator=torch.Generator().manual_seed(0))  # [1, 2]
    y[0, 1].backward()
    s1 = 1 / (1 + math.exp(-1))
    expected = scale / tau * s1 * (1 - s1)
    assert g.grad.tolist() == pytest.approx([-expected, expected], rel=0.02)


def test_ema_of_the_logits_decides_and_confidence_is_the_max_scaled_softmax():
    """EMA(decay) of the logits, started at the initial logits (0.02) and updated after every optimizer step,
    decides the mask; the reported confidence is max softmax(scale * ema logits). The phases make the final
    logits prefer block 1 while their average (the EMA) still prefers block 0."""
    trajectory = []

    def record(opt, _args, _kwargs):
        trajectory.append([p.detach().clone() for p in opt.param_groups[0]["params"]])

    handle = register_optimizer_step_post_hook(record)
    try:
        res = depth.tinyfusion(phased_target("A" * 10 + "B" * 30), kept=1, steps=40, seed=0,
                               recoverability="frozen", lr_gates=0.05, scale=5.0, ema=0.95)
    finally:
        handle.remove()
    assert len(trajectory) == 40
    ema = torch.full((2,), 0.02)
    for step in trajectory:
        ema = 0.95 * ema + 0.05 * step[0]
    assert res.ema_logits[0] == pytest.approx(ema.tolist(), abs=1e-6)
    assert res.logits[0] == pytest.approx(trajectory[-1][0].tolist(), abs=1e-7)
    final, averaged = res.logits[0], res.ema_logits[0]
    assert final[1] > final[0] and averaged[0] > averaged[1]  # the scenario: they disagree
    assert res.keep == [True, False]  # the EMA decides
    assert res.confidence[0] == pytest.approx(float((torch.tensor(averaged) * 5.0).softmax(-1).max()), rel=1e-6)


def test_one_step_moves_the_logits_by_lr_gates_without_weight_decay():
    """AdamW's first step moves every logit with a gradient by exactly its learning rate (lr_gates, wd 0)."""
    res = depth.tinyfusion(phased_target("A"), kept=1, steps=1, seed=0, recoverability="frozen", lr_gates=0.05)
    moved = [abs(v - 0.02) for v in res.logits[0]]
    assert moved == pytest.approx([0.05, 0.05], abs=1e-5)
    assert res.logits[0][0] > res.logits[0][1]  # toward the option phase A rewards


def _kd_setup(layers=6, keep=(True, True, False, True, False, False)):
    teacher = tiny_lm(layers=layers)
    student = tiny_lm(layers=layers)
    student.load_state_dict(teacher.state_dict())
    depth.drop_layers(student, list(keep))
    target = depth.causal_lm_target(student, ids(2, 8), batch_size=2)
    return teacher, student, target, list(keep)


def test_feature_matching_pairs_each_student_block_with_the_teacher_block_at_the_same_point(monkeypatch):
    """Rep compares student block j's output with teacher block keep[j+1]-1's (the last student block with the
    teacher's last), with the outlier mask of TinyFusion's masked KD. keep = 0,1,3 of 6 -> teacher 0, 2, 5."""
    teacher, student, target, keep = _kd_setup()
    outs_t, outs_s, calls = {}, {}, []

    def grab(store, i):
        def fn(_m, _a, out):
            store[i] = (out[0] if isinstance(out, (tuple, list)) else out).detach().clone()
        return fn

    hs = [b.register_forward_hook(grab(outs_t, i)) for i, b in enumerate(teacher.model.layers)]
    hs += [b.register_forward_hook(grab(outs_s, i)) for i, b in enumerate(student.model.layers)]
    real = recovery_mod._masked_mse

    def spy(s, t, *a, **kw):
        value = real(s, t, *a, **kw)
        calls.append((s.detach().clone(), t.detach().clone(), dict(outs_s), dict(outs_t), float(value.detach())))
        return value

    monkeypatch.setattr(recovery_mod, "_masked_mse", spy)
    try:
        depth.recover(target, steps=1, trainable="lora", lr=1e-3, teacher=(teacher, teacher.model.layers),
                      keep=keep, features=1.0, seed=0)
    finally:
        for h in hs:
            h.remove()
    expected_teacher = [0, 2, 5]  # keep[j+1]-1 for j = 0, 1 (kept 1, 3); the last block: teacher's last (5)
    step0 = calls[: len(expected_teacher)]
    assert len(step0) == 3
    for j, (s, t, o_s, o_t, value) in enumerate(step0):
        assert torch.equal(s, o_s[j]), f"student side of pair {j} is not student block {j}'s output"
        matches = [i for i, o in o_t.items() if torch.equal(t, o)]
        assert matches == [expected_teacher[j]], f"student block {j} matched teacher block(s) {matches}"
        assert value == pytest.approx(reference_masked_mse(s, t), rel=1e-4)


def test_masked_mse_drops_elements_two_std_from_the_per_sample_mean_in_teacher_or_student():
    gen = torch.Generator().manual_seed(0)
    t = torch.randn(2, 8, 25, generator=gen) * torch.tensor([1.0, 10.0]).view(2, 1, 1) + torch.tensor(
        [0.0, 5.0]).view(2, 1, 1)  # per-sample scale and offset differ
    s = 0.5 * t + torch.randn(2, 8, 25, generator=gen) * torch.tensor([1.0, 10.0]).view(2, 1, 1)
    got = float(recovery_mod._masked_mse(s, t))
    assert got == pytest.approx(reference_masked_mse(s, t), rel=1e-5)
    assert got != pytest.approx(float(((s - t) ** 2).mean()), rel=1e-2)  # the mask does drop something


def test_kd_loss_is_point_nine_kd_plus_point_one_task_plus_beta_rep_with_beta_linear_to_zero(monkeypatch):
    """loss_step = 0.9 KD + 0.1 task + beta_step * mean-over-pairs Rep, beta = features * (1 - step / (steps - 1))."""
    teacher, student, target, keep = _kd_setup(4, (True, False, True, False))
    kd, task, reps = [], [], []
    real = recovery_mod._masked_mse

    def spy(s, t, *a, **kw):
        value = real(s, t, *a, **kw)
        reps.append((len(task) - 1, float(value.detach())))
        return value

    monkeypatch.setattr(recovery_mod, "_masked_mse", spy)
    counted = dataclasses.replace(
        target, loss=lambda m, b: task.append(float((v := target.loss(m, b)).detach())) or v,
        distill=lambda s, t, b: kd.append(float((v := target.distill(s, t, b)).detach())) or v)
    steps, features = 4, 2.0
    res = depth.recover(counted, steps=steps, trainable="lora", lr=1e-3, teacher=(teacher, teacher.model.layers),
                        keep=keep, features=features, seed=0)
    assert len(kd) == len(task) == steps
    for step in range(steps):
        beta = features * (1 - step / (steps - 1))
        rep = [r for i, r in reps if i == step]
        assert len(rep) == (2 if beta > 0 else 0)
        expected = 0.9 * kd[step] + 0.1 * task[step] + (beta * sum(rep) / len(rep) if rep else 0.0)
        assert res.losses[step] == pytest.approx(expected, rel=1e-5)


def test_learning_rate_is_cosine_decayed_from_lr_to_a_tenth():
    blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    target = DepthTarget(model, blocks, [x], lambda m, b: (m(b) ** 2).mean())
    lrs = []
    handle = register_optimizer_step_pre_hook(lambda opt, *_: lrs.append(opt.param_groups[0]["lr"]))
    try:
        depth.recover(target, steps=5, trainable="full", lr=1e-2, seed=0)
    finally:
        handle.remove()
    expected = [1e-2 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * s / 4))) for s in range(5)]
    assert lrs == pytest.approx(expected, rel=1e-9)
    assert lrs[0] == pytest.approx(1e-2) and lrs[-1] == pytest.approx(1e-3)


def _grad_norms_at_each_step():
    norms = []

    def hook(opt, *_):
        grads = [p.grad for grp in opt.param_groups for p in grp["params"] if p.grad is not None]
        norms.append(float(torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g) for g in grads]))))
    return norms, register_optimizer_step_pre_hook(hook)


def test_tinyfusion_and_recovery_clip_the_gradient_norm_to_one():
    """Both clip the gradient norm of what they train to 1.0 before each step (here it would be ~1e3)."""
    base = phased_target("AB")
    loud = dataclasses.replace(base, loss=lambda m, b: 1e4 * base.loss(m, b))
    norms, handle = _grad_norms_at_each_step()
    try:
        depth.tinyfusion(loud, kept=1, steps=3, seed=0, recoverability="frozen", scale=1.0)
    finally:
        handle.remove()
    assert len(norms) == 3 and max(norms) <= 1.0 + 1e-5 and max(norms) > 0.5
    blocks = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])
    model = nn.Sequential(*blocks)
    x = torch.randn(8, 4, generator=torch.Generator().manual_seed(0))
    target = DepthTarget(model, blocks, [x], lambda m, b: 1e4 * (m(b) - 1).pow(2).mean())
    norms, handle = _grad_norms_at_each_step()
    try:
        depth.recover(target, steps=3, trainable="full", lr=1e-4, seed=0)
    finally:
        handle.remove()
    assert len(norms) == 3 and max(norms) <= 1.0 + 1e-5 and max(norms) > 0.5


def test_the_causal_target_scores_a_wrapper_without_a_base_model_whole():
    """blocks_only runs the base model; a plain nn.Module wrapper with the Hugging Face call interface has none
    (causal_lm_target takes it): block influence runs it whole, with the same scores."""
    model, x = tiny_lm(), ids(n=4)

    class Wrapper(nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.model, self.inner = inner.model, inner

        def forward(self, **kw):
            return self.inner(**kw)

    want = depth.block_influence(depth.causal_lm_target(model, x))
    assert torch.allclose(depth.block_influence(depth.causal_lm_target(Wrapper(model), x)), want, atol=1e-6)


def test_block_influence_of_a_target_without_blocks_only_sees_every_forward_of_its_loss():
    """A loss that runs the model twice per batch (micro-batches): every token of both halves counts. (A version that
    ended the forward after the last block by an exception saw only the first half, silently.)"""
    torch.manual_seed(0)

    class Residual(nn.Module):
        def __init__(self):
            super().__init__()
            self.f = nn.Sequential(nn.Linear(8, 8), nn.Tanh())

        def forward(self, x):
            return x + self.f(x)

    blocks = nn.ModuleList(Residual() for _ in range(3))

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = blocks

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    net, x = Net(), torch.randn(4, 5, 8)
    x[2:] *= 50  # the second micro-batch differs
    target = DepthTarget(net, blocks, [x], lambda m, b: sum((m(c) ** 2).mean() for c in b.split(2)))
    hs = [x]
    with torch.no_grad():
        for b in blocks:
            hs.append(b(hs[-1]))
    want = [1 - float(nn.functional.cosine_similarity(hs[i].flatten(0, 1), hs[i + 1].flatten(0, 1), dim=-1).mean())
            for i in range(3)]
    assert depth.block_influence(target).tolist() == pytest.approx(want, abs=1e-6)


def test_keep_top_refuses_nan_scores_instead_of_misranking_every_block():
    """A NaN compares False with everything, so a sort on it misorders the other blocks too ([1, nan, 2, 3]
    kept blocks 0 and 1, dropping the two best); found by oracle fuzzing. A protected NaN is no matter."""
    from prunekit.depth.core import keep_top
    from prunekit.depth.methods import sensitivity, shortgpt

    nan = float("nan")
    with pytest.raises(InputError, match=r"block\(s\) \[1\] are NaN"):
        keep_top(torch.tensor([1.0, nan, 2.0, 3.0]), 2)
    assert keep_top(torch.tensor([1.0, 4.0, 2.0, nan]), 2, protect=(3,)) == [False, True, False, True]
    target = type("T", (), {"depth": 4})()
    with pytest.raises(InputError, match="NaN"):
        shortgpt(target, kept=2, influence=torch.tensor([0.1, nan, 0.3, 0.2]))
    with pytest.raises(InputError, match="NaN"):
        sensitivity(target, kept=2, losses=torch.tensor([nan, 1.0, 2.0, 3.0]))


def test_random_masks_ranks_a_nan_loss_last_and_refuses_when_every_loss_is_nan(monkeypatch):
    """min() over losses with a NaN first kept the NaN candidate (no comparison with NaN is True)."""
    methods = importlib.import_module("prunekit.depth.methods")
    target = type("T", (), {"depth": 6})()
    losses = iter([float("nan"), 3.0, 2.0, float("nan"), 2.5])
    monkeypatch.setattr(methods, "calibration_loss", lambda t, keep: next(losses))
    keep, tried = methods.random_masks(target, kept=3, candidates=5, seed=0)
    assert keep == [i in tried[2]["kept_layers"] for i in range(6)]
    monkeypatch.setattr(methods, "calibration_loss", lambda t, keep: float("nan"))
    with pytest.raises(InputError, match="NaN for every one of the 3 random masks"):
        methods.random_masks(target, kept=3, candidates=3)


def test_keep_top_breaks_ties_toward_the_earlier_block():
    """keep_top: 'ties: the earlier block' (equal scores, e.g. identical blocks or a flat sensitivity)."""
    from prunekit.depth.core import keep_top

    assert keep_top(torch.tensor([1.0, 1.0, 1.0, 1.0]), 2) == [True, True, False, False]
    assert keep_top(torch.tensor([0.5, 2.0, 0.5, 0.5]), 2, protect=(3,)) == [False, True, False, True]
    assert keep_top(torch.tensor([0.5, 2.0, 0.5, 0.5]), 3) == [True, True, True, False]


def test_random_masks_are_distinct_and_all_of_them_when_fewer_exist(monkeypatch):
    methods = importlib.import_module("prunekit.depth.methods")
    target = type("T", (), {"depth": 6})()
    monkeypatch.setattr(methods, "calibration_loss", lambda t, keep: 1.0)
    _, tried = methods.random_masks(target, kept=3, candidates=8, seed=0)  # 8 draws held 5 distinct masks
    assert len({tuple(t["kept_layers"]) for t in tried}) == len(tried) == 8
    _, tried = methods.random_masks(target, kept=5, candidates=8, seed=0)  # only C(6, 5) = 6 masks exist
    assert sorted(tuple(t["kept_layers"]) for t in tried) == sorted(
        tuple(i for i in range(6) if i != j) for j in range(6))


def test_ppl_table_takes_perplexity_objects_in_every_column():
    """ppl_table took Perplexity objects for dense and pruned, and raised TypeError on one before recovery."""
    from prunekit.evaluate import Perplexity
    from prunekit.report import ppl_table

    def ppl(value):
        return Perplexity(ppl=value, nll=0.0, tokens=64, seqlen=32, windows=2, text={})

    table = ppl_table({"wiki": {"dense": ppl(10.0), "pruned": ppl(12.0), "before_recovery": ppl(20.0)}})
    assert table.splitlines()[-1] == "| wiki | 2 x 32 = 64 | 10.000 | 20.000 | 12.000 | 1.200 |"
    assert ppl_table({"wiki": {"dense": ppl(10.0), "pruned": ppl(12.0)}}).splitlines()[-1] == \
        "| wiki | 2 x 32 = 64 | 10.000 | 12.000 | 1.200 |"
