"""Weight pruning of fused mixture-of-experts weights (transformers 5's 3-D ``gate_up_proj`` / ``down_proj``): one
Linear per expert calibrated on the tokens routed to it, checked against a from-scratch Wanda on the model's own
routing; experts no token reached; routers left dense; the saved folder; what is refused."""

import pytest
import torch
import torch.nn.functional as F

import prunekit
from conftest import TEXT, char_tokenizer, tiny_model
from prunekit.errors import InputError
from prunekit.weights import experts as experts_mod

CALIB = dict(tokenizer=None, samples=4, seqlen=32, progress=False)


def calib(**kw):
    return dict(CALIB, tokenizer=char_tokenizer(), calibration=prunekit.Text("t", TEXT, "license"), **kw)


def wanda_mask(w: torch.Tensor, sq_norms: torch.Tensor, ratio: float) -> torch.Tensor:
    """Wanda from its definition: per output row, keep the largest |W_ij| * ||X_j||."""
    metric = w.abs() * sq_norms.sqrt()[None, :]
    drop = metric.argsort(dim=1)[:, : int(w.shape[1] * ratio)]
    keep = torch.ones_like(w, dtype=torch.bool)
    keep.scatter_(1, drop, False)
    return keep


def test_wanda_prunes_each_expert_on_the_tokens_routed_to_it():
    model = tiny_model("mixtral")
    args = calib()
    ids = prunekit.text.calibration_ids(args["tokenizer"], args["calibration"], samples=4, seqlen=32, seed=0)
    moe = model.model.layers[0].mlp
    seen = {}

    def grab(module, inputs, output):  # the router's input and its choice, in the dense model
        seen["x"], seen["index"] = inputs[0].reshape(-1, inputs[0].shape[-1]), output[2]

    handle = moe.gate.register_forward_hook(grab)
    xs, idxs = [], []
    with torch.no_grad():
        for start in range(0, 4, 4):
            model(ids[start:start + 4])
            xs.append(seen["x"]), idxs.append(seen["index"])
    handle.remove()
    x, index = torch.cat(xs), torch.cat(idxs)
    up, down = moe.experts.gate_up_proj.detach().clone(), moe.experts.down_proj.detach().clone()
    want = {}
    for e in range(up.shape[0]):
        xe = x[(index == e).any(-1)]  # [tokens routed to e, H]
        gate, u = F.linear(xe, up[e]).chunk(2, dim=-1)
        he = F.silu(gate) * u
        want[e] = (wanda_mask(up[e], xe.square().sum(0), 0.5), wanda_mask(down[e], he.square().sum(0), 0.5))
        assert xe.shape[0] > 0
    prunekit.prune(model, method="wanda", ratio=0.5, **args)
    fused = model.model.layers[0].mlp.experts
    assert type(fused).__name__ == "MixtralExperts"  # the model's own module is back, holding the pruned weights
    for e, (keep_up, keep_down) in want.items():
        assert torch.equal(fused.gate_up_proj[e] != 0, keep_up)
        assert torch.equal(fused.down_proj[e] != 0, keep_down)


def _never_route_to(router, expert: int):
    """Make a Mixtral-style router (returns logits, weights, indices) never pick `expert`."""
    def forward(hidden_states):
        logits = F.linear(hidden_states.reshape(-1, router.hidden_dim), router.weight)
        logits[:, expert] = float("-inf")
        probs = logits.float().softmax(-1)
        top, idx = probs.topk(router.top_k, dim=-1)
        return logits, top / top.sum(-1, keepdim=True), idx

    router.forward = forward


@pytest.mark.parametrize("method, kw", [("wanda", dict(ratio=0.5)), ("sparsegpt", dict(ratio=0.5))])
def test_an_expert_no_token_reached_is_pruned_by_magnitude_and_says_so(method, kw):
    model = tiny_model("mixtral")
    _never_route_to(model.model.layers[1].mlp.gate, 2)
    w = model.model.layers[1].mlp.experts.gate_up_proj[2].detach().clone()
    result = prunekit.prune(model, method=method, **kw, **calib())
    report = {r.name: r for r in result.layers}["model.layers.1.mlp.experts.gate_up_proj.2"]
    assert report.info["calibration_tokens"] == 0 and report.rel_error is None
    got = model.model.layers[1].mlp.experts.gate_up_proj[2]
    if method == "wanda":  # equal input norms: |W| per row
        assert torch.equal(got != 0, wanda_mask(w, torch.ones(w.shape[1]), 0.5))
    else:  # identity Hessian: SparseGPT's mask is |W| over the whole 128-column block (here the whole layer)
        assert torch.equal(got != 0, w.abs() > w.abs().flatten().kthvalue(w.numel() // 2).values)
    assert torch.equal(got[got != 0], w[got != 0])  # kept weights unchanged (SparseGPT: identity Hessian)
    reached = [r for r in result.layers if "experts" in r.name and not (r.info or {}).get("calibration_tokens") == 0]
    assert reached and all(r.rel_error is not None for r in reached)


def _routed_inputs(model, layer: int, ids: torch.Tensor):
    """The dense model's input of each expert of MoE block `layer` (one forward over `ids`), gathered in the
    order the experts' eager loop takes them (by top-k slot, then token), with the sequence of each row."""
    moe = model.model.layers[layer].mlp
    seen = {}

    def grab(module, inputs, output):
        seen["x"], seen["index"] = inputs[0].reshape(-1, inputs[0].shape[-1]), output[2]

    handle = moe.gate.register_forward_hook(grab)
    with torch.no_grad():
        model(ids)
    handle.remove()
    out = {}
    for e in range(moe.experts.gate_up_proj.shape[0]):
        _, token_idx = torch.where((seen["index"] == e).T)
        out[e] = seen["x"][token_idx], token_idx // ids.shape[1]
    return out


@pytest.mark.parametrize("base, kw", [("wanda", dict(ratio=0.5)), ("sparsegpt", dict(ratio=0.5)),
                                      ("magnitude", dict(pattern="2:4"))])
def test_dsnot_refines_each_expert_on_the_tokens_routed_to_it(base, kw):
    """DSnoT on fused experts (it was refused): each expert's result equals DSnoT run by hand on the statistics
    of the tokens routed to it, the swaps really change the base mask, and the sparsity is exact."""
    from prunekit.weights import stats as stats_lib
    from prunekit.weights.methods import dsnot
    from prunekit.select import parse_pattern

    model = tiny_model("mixtral")
    args = calib()
    ids = prunekit.text.calibration_ids(args["tokenizer"], args["calibration"], samples=4, seqlen=32, seed=0)
    routed = _routed_inputs(model, 0, ids)  # block 0 sees the dense model's inputs
    moe = model.model.layers[0].mlp.experts
    up, down = moe.gate_up_proj.detach().clone(), moe.down_proj.detach().clone()
    pattern = parse_pattern(kw["pattern"]) if "pattern" in kw else None
    ratio = kw.get("ratio", 0.5)
    want, swaps = {}, 0
    for e, (xe, groups) in routed.items():
        assert xe.shape[0] > 0 and groups.unique().numel() > 1
        gate, u = F.linear(xe, up[e]).chunk(2, dim=-1)
        he = moe.act_fn(gate) * u
        for proj, w, x in (("gate_up_proj", up[e], xe), ("down_proj", down[e], he)):
            acc = stats_lib.make("hessian+moments", w.shape[1])
            acc.add(x, groups)  # DSnoT's moments per calibration sequence, as for a dense layer
            out = dsnot.prune_weight(w, acc.value(), ratio=ratio, pattern=pattern, base=base,
                                     name=f"model.layers.0.mlp.experts.{proj}.{e}")
            want[proj, e] = out.weight
            swaps += out.info["swaps"]
            base_only = dsnot.prune_weight(w, acc.value(), ratio=ratio, pattern=pattern, base=base, max_cycle_time=0)
            if out.info["swaps"]:
                assert not torch.equal(out.weight != 0, base_only.weight != 0)
    assert swaps > 0
    result = prunekit.prune(model, method="dsnot", base=base, **kw, **args, batch_size=3)  # not one batch
    moe = model.model.layers[0].mlp.experts
    assert type(moe).__name__ == "MixtralExperts"
    for (proj, e), w in want.items():
        got = getattr(moe, proj)[e]
        assert torch.equal(got != 0, w != 0), (proj, e)
        # equal up to the Hessian's summation order (batches of 3 here, one hand-made sum)
        torch.testing.assert_close(got, w.to(got.dtype), rtol=1e-4, atol=1e-5)
    reports = {r.name: r for r in result.layers}
    assert sum(reports[f"model.layers.0.mlp.experts.{p}.{e}"].info["swaps"] for p, e in want) == swaps
    assert result.total_sparsity == 0.5
    if pattern is not None:
        assert prunekit.evaluate.check_pattern(model, "2:4") == []


@pytest.mark.parametrize("sequential", ["block", "layer"])
def test_dsnot_on_experts_does_not_depend_on_the_batch_size(sequential):
    """An expert's routed tokens arrive flattened over the batch; DSnoT's moments are per calibration sequence
    (mean over sequences of the within-sequence variance), so batching 1 or 8 sequences gave 874 different mask
    entries in one block's gate_up_proj."""
    def masks(batch_size):
        model = tiny_model("mixtral")
        result = prunekit.prune(model, method="dsnot", base="wanda", ratio=0.5, batch_size=batch_size,
                                sequential=sequential, **calib(samples=8))
        assert sum(r.info["swaps"] for r in result.layers if "experts" in r.name) > 0
        return {n: p != 0 for n, p in model.named_parameters() if p.dim() == 3}

    one, eight = masks(1), masks(8)
    assert one.keys() and all(torch.equal(one[n], eight[n]) for n in one)


def test_moments_of_grouped_rows_equal_those_of_the_sequences():
    from prunekit.weights import stats as stats_lib

    torch.manual_seed(0)
    x = torch.randn(3, 5, 8) * torch.linspace(0.5, 3, 8) + torch.randn(3, 1, 8)  # [seqs, tokens, d]
    dense = stats_lib.make("moments+hessian", 8)
    dense.add(x)
    order = torch.randperm(10)  # the rows of sequences 0 and 1 shuffled together (an expert's routed tokens)
    rows, groups = x[:2].reshape(10, 8)[order], torch.arange(2).repeat_interleave(5)[order]
    grouped = stats_lib.make("moments+hessian", 8)
    grouped.add(rows, groups)  # a batch of two sequences, then one of sequence 2
    grouped.add(x[2], torch.full((5,), 7))
    a, b = dense.value(), grouped.value()
    torch.testing.assert_close(b["hessian"], a["hessian"])
    for field in ("norms", "sums", "var"):
        torch.testing.assert_close(getattr(b["moments"], field), getattr(a["moments"], field))
    assert b["moments"].tokens == a["moments"].tokens == 5
    ungrouped = stats_lib.make("moments", 8)
    ungrouped.add(rows)  # the old reading: the whole batch one sequence
    assert not torch.allclose(ungrouped.value().var, a["moments"].var)
    with pytest.raises(ValueError, match="one sequence index per row"):
        grouped.add(rows, groups[:3])


@pytest.mark.parametrize("kind", ["mixtral", "granitemoe", "qwen2_moe"])
def test_dsnot_skip_mlp_leaves_every_expert_at_its_base_mask(kind):
    """GraniteMoE keeps its experts under ``block_sparse_moe``: ``skip_mlp`` refined them all the same."""
    def run(**options):
        model = tiny_model(kind)
        result = prunekit.prune(model, method="dsnot", base="wanda", ratio=0.5, **options, **calib())
        return model, {r.name: r for r in result.layers}

    skipped, reports = run(skip_mlp=True)
    base, _ = run(max_cycle_time=0)
    experts = [n for n in reports if ".experts." in n]
    assert experts and all(reports[n].info["skipped"] and reports[n].info["swaps"] == 0 for n in experts)
    assert any(reports[n].info["swaps"] for n in reports if "self_attn" in n)
    compared = 0
    for (name, p), q in zip(skipped.named_parameters(), base.parameters()):
        if p.dim() == 3 and name.startswith("model.layers.0."):  # later blocks see the refined attention's outputs
            assert torch.equal(p != 0, q != 0), name
            compared += 1
    assert compared == 2


def test_dsnot_leaves_an_expert_no_token_reached_at_its_magnitude_mask():
    model = tiny_model("mixtral")
    _never_route_to(model.model.layers[1].mlp.gate, 2)
    w = model.model.layers[1].mlp.experts.gate_up_proj[2].detach().clone()
    result = prunekit.prune(model, method="dsnot", base="wanda", ratio=0.5, **calib())
    report = {r.name: r for r in result.layers}["model.layers.1.mlp.experts.gate_up_proj.2"]
    assert report.info["calibration_tokens"] == 0 and report.info["swaps"] == 0
    assert "error_base" not in report.info  # an identity Hessian's ||W - W'||^2 is no calibration error
    names = [r.name for r in result.layers]  # module order: the unreached expert was listed first
    assert names.index("model.layers.1.mlp.experts.gate_up_proj.1") < names.index(report.name) \
        < names.index("model.layers.1.mlp.experts.gate_up_proj.3")
    assert names.index("model.layers.1.self_attn.q_proj") < names.index(report.name)
    got = model.model.layers[1].mlp.experts.gate_up_proj[2]
    assert torch.equal(got != 0, wanda_mask(w, torch.ones(w.shape[1]), 0.5))
    assert torch.equal(got[got != 0], w[got != 0])
    reached = [r for r in result.layers if "experts" in r.name and r.info.get("calibration_tokens") != 0]
    assert reached and sum(r.info["swaps"] for r in reached) > 0


_MORE = {"olmoe": dict(num_experts=4, num_experts_per_tok=2, eos_token_id=None),
         "deepseek_v3": dict(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2,
                             moe_intermediate_size=32, n_group=1, topk_group=1, q_lora_rank=None, kv_lora_rank=16,
                             qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=16),
         "glm4_moe": dict(first_k_dense_replace=1, n_routed_experts=4, num_experts_per_tok=2, moe_intermediate_size=32,
                          n_group=1, topk_group=1, head_dim=16)}


def moe_model(kind):
    if kind not in _MORE:
        return tiny_model(kind)
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model(kind, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=3,
                               num_attention_heads=4, num_key_value_heads=2, **_MORE[kind])
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(cfg).eval()


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "qwen3_moe", "granitemoe", "olmoe", "deepseek_v3",
                                  "glm4_moe"])
def test_every_expert_pruned_routers_dense_and_the_folder_reloads(kind, tmp_path):
    from transformers import AutoModelForCausalLM

    model = moe_model(kind)
    routers = {n: p.detach().clone() for n, p in model.named_parameters()
               if n.endswith("gate.weight") or "router" in n or "shared_expert_gate" in n}
    assert routers
    result = prunekit.prune(model, method="sparsegpt", pattern="2:4", **calib())
    for name, p in model.named_parameters():
        if name in routers:
            assert torch.equal(p, routers[name]), name
        elif p.dim() == 3:  # [experts, out, in]: 2 of every 4 inputs kept per expert row
            assert bool(((p.reshape(p.shape[0], p.shape[1], -1, 4) != 0).sum(-1) <= 2).all()), name
            assert float((p == 0).float().mean()) == 0.5
    assert result.total_sparsity == 0.5 and prunekit.evaluate.sparsity(model)["total"] == 0.5
    assert prunekit.evaluate.check_pattern(model, "2:4") == []
    ids = torch.randint(3, 100, (2, 12))
    with torch.no_grad():
        want = model(ids).logits
    out = prunekit.save_pruned(model, char_tokenizer(), tmp_path / "m")
    again = AutoModelForCausalLM.from_pretrained(out).eval()
    with torch.no_grad():
        assert torch.equal(again(ids).logits, want)


def test_skip_globs_reach_experts_and_unsupported_methods_are_refused():
    model = tiny_model("qwen3_moe")
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    result = prunekit.prune(model, method="magnitude", ratio=0.5, skip=["*experts*"], progress=False)
    assert result.layers and not any("experts" in r.name for r in result.layers)
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters() if p.dim() == 3)
    for method, why in (("armor", "factorized module"), ("dpruner", "gradient")):
        fresh = tiny_model("qwen3_moe")
        kept = {n: p.detach().clone() for n, p in fresh.named_parameters()}
        for skip in ([], ["*experts.gate_up_proj.*"]):  # a skip that leaves some experts to prune changes nothing
            with pytest.raises(InputError, match=f"{why}.*the methods that prune MoE experts: magnitude, wanda, "
                                                 "sparsegpt, dsnot; or leave the experts dense with --skip"):
                prunekit.prune(fresh, method=method, pattern="2:4", skip=skip, **calib())
            assert all(torch.equal(p, kept[n]) for n, p in fresh.named_parameters())


@pytest.mark.parametrize("method, kw", [("armor", dict(pattern="2:4", iters=3)),
                                        ("dpruner", dict(ratio=0.5, domain_samples=4))])
def test_methods_that_cannot_prune_experts_prune_the_rest_when_the_experts_are_skipped(method, kw):
    """ARMOR on a MoE model's attention was refused even with ``--skip '*experts*'``."""
    model = tiny_model("qwen2_moe")
    fused = {n: p.detach().clone() for n, p in model.named_parameters()
             if p.dim() == 3 or n.endswith("gate.weight") or "shared_expert_gate" in n}  # experts and routers
    if method == "dpruner":
        kw = dict(kw, domain=prunekit.Text("d", TEXT, "license"))
    result = prunekit.prune(model, method=method, skip=["*experts*"], **kw, **calib())
    names = {r.name for r in result.layers}
    assert any("self_attn" in n for n in names) and any("shared_expert." in n for n in names)
    assert not any(".experts." in n for n in names) and result.total_sparsity == 0.5
    for n, p in model.named_parameters():
        if n in fused:
            assert torch.equal(p, fused[n]), n
    with torch.no_grad():
        assert bool(torch.isfinite(model(torch.randint(3, 100, (1, 12))).logits).all())


def test_experts_computing_something_else_are_refused_before_any_change():
    model = tiny_model("mixtral")
    fused = model.model.layers[0].mlp.experts
    own = fused.forward
    fused.forward = lambda *a: 2 * own(*a)  # not the standard gate_up/down function any more
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    with pytest.raises(InputError, match="computes its experts differently"):
        prunekit.prune(model, method="wanda", ratio=0.5, **calib())
    assert model.model.layers[0].mlp.experts is fused
    assert all(torch.equal(p, before[n]) for n, p in model.named_parameters())


def test_gpt_oss_layout_is_refused():
    from transformers import AutoConfig, AutoModelForCausalLM

    cfg = AutoConfig.for_model("gpt_oss", vocab_size=128, hidden_size=64, intermediate_size=64, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, head_dim=16, num_local_experts=4,
                               num_experts_per_tok=2)
    model = AutoModelForCausalLM.from_config(cfg)
    with pytest.raises(InputError, match="layout weight pruning does not handle"):
        prunekit.prune(model, method="wanda", ratio=0.5, **calib())
    assert prunekit.evaluate.sparsity(model)["total"] == 0.0  # reading weights still works (experts left fused)


def test_expert_linears_share_the_fused_storage():
    fused = tiny_model("qwen2_moe").model.layers[0].mlp.experts
    view = experts_mod.ExpertLinears(fused)
    view.down_proj[1].weight.data[0, 0] = 123.0
    assert fused.down_proj[1, 0, 0] == 123.0


def test_an_expert_that_does_not_fit_the_pattern_gets_a_skip_hint_that_works():
    """The hint named the expert's index (``--skip '*0'``): it matched ``down_proj.10`` but not ``down_proj.1``."""
    model = tiny_model("qwen3_moe")  # experts' down_proj: 32 inputs; every other Linear 64
    with pytest.raises(InputError, match=r"down_proj\.0 has 32; leave such layers dense with --skip "
                                         r"'\*experts\.down_proj\.\*'") as err:
        prunekit.prune(model, method="wanda", pattern="32:64", **calib())
    glob = str(err.value).split("--skip '")[1].split("'")[0]
    result = prunekit.prune(model, method="wanda", pattern="32:64", skip=[glob], **calib())
    assert result.layers and not any("down_proj" in r.name and "experts" in r.name for r in result.layers)
    assert any("gate_up_proj" in r.name for r in result.layers)


def test_the_cli_says_how_many_experts_no_calibration_token_reached(tmp_path, text_file, capsys):
    from transformers import AutoConfig, AutoModelForCausalLM

    from prunekit import cli

    cfg = AutoConfig.for_model("mixtral", vocab_size=128, hidden_size=64, intermediate_size=32, num_hidden_layers=2,
                               num_attention_heads=4, num_key_value_heads=2, num_local_experts=32,
                               num_experts_per_tok=1)
    torch.manual_seed(0)
    folder = prunekit.save_pruned(AutoModelForCausalLM.from_config(cfg).eval(), char_tokenizer(), tmp_path / "m")
    out = tmp_path / "out"
    assert cli.main(["prune", str(folder), "--method", "dsnot", "--ratio", "0.5", "--calib", str(text_file),
                     "--samples", "2", "--seqlen", "8", "--out", str(out), "--quiet"]) == 0
    said = capsys.readouterr()
    meta = __import__("json").loads((out / "prunekit.json").read_text())
    unreached = [r for r in meta["layers"] if (r["info"] or {}).get("calibration_tokens") == 0]
    measured = [r for r in meta["layers"] if r["rel_error"] is not None]
    assert 0 < len(unreached) < 128 and len(measured) + len(unreached) == len(meta["layers"])
    assert f"(over the {len(measured)} layers that have one)" in said.out
    assert f"{len(unreached)} of the {len(meta['layers'])} layers (mixture-of-experts experts) saw no" in said.err
    report = (out / "report.md").read_text()
    assert f"no calibration token reached (mixture-of-experts experts the router never picked on the calibration " \
           f"text): {len(unreached)} of {len(meta['layers'])}" in report
