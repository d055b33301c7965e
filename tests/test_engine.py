import pytest
import torch

import prunekit
from prunekit import registry
from prunekit.errors import InputError
from prunekit.weights.engine import find_blocks, get_weight, prune_blocks, target_linears

from conftest import char_tokenizer, ids_from_text, tiny_model


def final_norm(model):
    return model.transformer.ln_f if hasattr(model, "transformer") else model.model.norm


def body(model, ids):
    base = model.transformer if hasattr(model, "transformer") else model.model
    with torch.no_grad():
        return base(input_ids=ids, use_cache=False).last_hidden_state


@pytest.mark.parametrize("kind", ["llama", "qwen2", "mistral", "gemma", "gpt2", "gemma2", "gemma3_text", "qwen2_swa"])
@pytest.mark.parametrize("sequential", ["layer", "block"])
def test_propagated_outputs_equal_running_the_pruned_model(kind, sequential):
    # the last three give their layers different masks or RoPE tables: every block was calibrated with the first
    # block's (Gemma-2/3, Qwen2 with a sliding window), on activations the model never produces
    model = tiny_model(kind)
    ids = ids_from_text(char_tokenizer(), 6, 32)
    spec = registry.get("sparsegpt")
    fn = lambda w, s, _name: spec.fn(w, s, ratio=0.5, pattern=None)  # noqa: E731
    reports, hidden = prune_blocks(model, ids, fn, stat="hessian", sequential=sequential, batch_size=4,
                                   progress=False, return_hidden=True)
    assert len(reports) == sum(len(target_linears(b, "x")) for b in find_blocks(model)[1])
    with torch.no_grad():
        torch.testing.assert_close(final_norm(model)(hidden), body(model, ids), rtol=1e-4, atol=1e-4)
    assert all(r.rel_error is not None and r.rel_error > 0 for r in reports)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_exact_ratio_per_layer(method, llama, tok):
    ids = ids_from_text(tok, 4, 32)
    result = prunekit.prune(llama, method=method, ratio=0.375, calibration=ids, progress=False)
    for r in result.layers:
        out, d_in = r.shape
        w = get_weight(llama.get_submodule(r.name))
        zeros = (w == 0).sum(1)
        if method == "wanda":
            assert (zeros == int(d_in * 0.375)).all()
        elif method == "magnitude":
            assert int(zeros.sum()) == int(out * d_in * 0.375)
        else:  # per 128-column block (all tiny layers have <= 128 inputs)
            assert int(zeros.sum()) == int(out * d_in * 0.375)
        assert r.sparsity == pytest.approx(float((w == 0).float().mean()))
    assert result.total_sparsity == pytest.approx(0.375, abs=1e-3)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
@pytest.mark.parametrize("pattern", ["2:4", "4:8"])
def test_n_m_verified(method, pattern, llama, tok):
    ids = ids_from_text(tok, 4, 32)
    prunekit.prune(llama, method=method, pattern=pattern, calibration=ids, progress=False)
    assert prunekit.check_pattern(llama, pattern) == []
    assert prunekit.sparsity(llama)["total"] == pytest.approx(0.5)


def test_check_pattern_catches_a_dense_layer(llama):
    assert prunekit.check_pattern(llama, "2:4")  # a dense model is not 2:4


def test_check_pattern_catches_one_group_that_breaks_it(llama, tok):
    prunekit.prune(llama, method="magnitude", pattern="2:4", progress=False)
    assert prunekit.check_pattern(llama, "2:4") == []
    layer = llama.model.layers[1].self_attn.k_proj
    with torch.no_grad():
        row = layer.weight[5, 8:12]
        row[row == 0] = 0.5  # one group of 4 now has 4 nonzeros, every other group still 2
    assert prunekit.check_pattern(llama, "2:4") == ["model.layers.1.self_attn.k_proj"]


def test_only_block_linears_change_and_skip_is_honoured(llama, tok):
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    prunekit.prune(llama, method="wanda", ratio=0.5, calibration=ids_from_text(tok, 4, 32),
                   skip=("*down_proj", "model.layers.1.self_attn.q_proj"), progress=False)
    changed = {k for k, v in llama.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(k.startswith("model.layers.") and k.endswith("proj.weight") for k in changed)
    assert not any("down_proj" in k for k in changed)
    assert "model.layers.1.self_attn.q_proj.weight" not in changed
    assert "model.layers.0.self_attn.q_proj.weight" in changed
    # a glob may also name a layer within its block, as the docstring says
    llama.load_state_dict(before)
    prunekit.prune(llama, method="magnitude", ratio=0.5, skip=("mlp.down_proj",), progress=False)
    assert all(torch.equal(b.mlp.down_proj.weight, before[f"model.layers.{i}.mlp.down_proj.weight"])
               for i, b in enumerate(llama.model.layers))


def test_layer_order_calibrates_later_layers_on_pruned_inputs(tok):
    ids = ids_from_text(tok, 4, 32)
    a, b = tiny_model("llama"), tiny_model("llama")
    prunekit.prune(a, method="wanda", ratio=0.5, calibration=ids, sequential="layer", progress=False)
    prunekit.prune(b, method="wanda", ratio=0.5, calibration=ids, sequential="block", progress=False)
    wa, wb = a.model.layers[0].self_attn, b.model.layers[0].self_attn
    assert torch.equal(wa.q_proj.weight, wb.q_proj.weight)  # same inputs: the first block's q/k/v agree
    assert not torch.equal(wa.o_proj.weight, wb.o_proj.weight)  # o_proj saw pruned q/k/v in "layer" order


def test_bad_inputs(llama, tok):
    ids = ids_from_text(tok, 2, 16)
    with pytest.raises(InputError, match="ratio"):
        prunekit.prune(llama, method="wanda", ratio=1.0, calibration=ids)
    with pytest.raises(InputError, match="pattern"):
        prunekit.prune(llama, method="wanda", pattern="5:4", calibration=ids)
    with pytest.raises(InputError, match="unknown method"):
        prunekit.prune(llama, method="nope", ratio=0.5, calibration=ids)
    with pytest.raises(InputError, match="needs calibration"):
        prunekit.prune(llama, method="wanda", ratio=0.5, calibration=None)
    with pytest.raises(InputError, match="takes no option"):
        prunekit.prune(llama, method="wanda", ratio=0.5, calibration=ids, blocksize=64)
    with pytest.raises(InputError, match="empty"):
        prunekit.prune(llama, method="wanda", ratio=0.5, calibration=torch.zeros(0, 16, dtype=torch.long))
    with pytest.raises(InputError, match="no Linear"):
        prunekit.prune(llama, method="wanda", ratio=0.5, calibration=ids, skip=("*",))
    before = {k: v.clone() for k, v in llama.state_dict().items()}
    with torch.no_grad():
        llama.model.layers[1].mlp.up_proj.weight[0, 0] = float("nan")
    with pytest.raises(InputError, match="NaN"):
        prunekit.prune(llama, method="magnitude", ratio=0.5, calibration=None)
    after = llama.state_dict()
    assert all(torch.equal(after[k], before[k]) for k in before if "up_proj" not in k)  # nothing pruned


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "dsnot"])
@pytest.mark.parametrize("sequential", ["block", "layer"])
def test_activations_that_overflow_are_named_and_the_earlier_blocks_said_to_be_pruned(method, sequential, tok):
    """Finite weights whose activations overflow: SparseGPT blamed the calibration text ("Hessian singular"),
    Wanda and DSnoT finished on Inf norms, and the half-pruned model was not mentioned."""
    ids = ids_from_text(tok, 2, 16)
    for block, scale in ((1, 1e37), (0, 1e37), (1, 3e38)):
        model = tiny_model("llama")
        with torch.no_grad():
            model.model.layers[block].mlp.up_proj.weight.mul_(scale)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match=r"the input of model\.layers\.\d\.mlp\.down_proj (is too large for its "
                                             r"calibration statistic|holds NaN or Inf activations)") as err:
            prunekit.prune(model, method=method, ratio=0.5, calibration=ids, sequential=sequential, progress=False)
        after = model.state_dict()
        changed = {k for k in before if not torch.equal(before[k], after[k])}
        failing = {k for k in before if f"layers.{block}." in k}
        if sequential == "block":  # the statistics pass finds it before anything in the failing block is pruned
            assert not changed & failing
        if block == 0 and sequential == "block":
            assert not changed and "changed in place" not in str(err.value)
        else:
            assert changed and "the model in memory was changed in place before this error" in str(err.value)
            assert "model.layers.0.self_attn.q_proj to" in str(err.value)


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt"])
def test_an_n_m_pattern_that_does_not_divide_a_layer_is_refused_up_front_by_name(method, tok):
    """Found mid-run (after block 0's first layers were pruned), without the layer's name or a way out."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=102, num_hidden_layers=2,
                                         num_attention_heads=4, num_key_value_heads=2))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    ids = ids_from_text(tok, 2, 16)
    with pytest.raises(InputError, match=r"pattern 2:4 needs each layer's input size to be a multiple of 4, but "
                                         r"model\.layers\.0\.mlp\.down_proj has 102; leave such layers dense with "
                                         r"--skip '\*down_proj'"):
        prunekit.prune(model, method=method, pattern="2:4", calibration=ids, progress=False)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())
    res = prunekit.prune(model, method=method, pattern="2:4", calibration=ids, skip=("*down_proj",), progress=False)
    assert prunekit.check_pattern(model, "2:4") == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert prunekit.check_pattern(model, "2:4", skip="*down_proj") == []  # left dense on purpose
    assert len(res.layers) == 12


def test_sparsegpt_options_reach_the_method(llama, tok):
    ids = ids_from_text(tok, 4, 32)
    r = prunekit.prune(llama, method="sparsegpt", ratio=0.5, calibration=ids, blocksize=32, percdamp=0.1, progress=False)
    assert r.options["blocksize"] == 32
    assert r.total_sparsity == pytest.approx(0.5)


def test_a_data_free_method_measures_its_error_when_calibration_is_given_even_the_default_text(tok):
    """calibration="wiki" given explicitly was taken for the default and ignored (no reconstruction error)."""
    default = prunekit.prune(tiny_model("llama"), method="magnitude", ratio=0.5, tokenizer=tok, progress=False)
    assert default.mean_rel_error is None and default.calibration is None  # the default: no calibration pass
    given = prunekit.prune(tiny_model("llama"), method="magnitude", ratio=0.5, calibration="wiki", tokenizer=tok,
                           samples=2, seqlen=32, progress=False)
    assert given.mean_rel_error is not None and given.mean_rel_error > 0 and given.calibration is not None


def test_what_an_error_left_pruned_is_said_without_exception_notes_too():
    """Python 3.10 (which pyproject admits) has no BaseException.add_note: the note's AttributeError hid the error."""
    from prunekit.weights.engine import LayerReport, _say_what_changed

    done = [LayerReport("model.layers.0.mlp.up_proj", (4, 4), 0.5, None, 0.0)]
    err = RuntimeError("boom")
    _say_what_changed(err, done)
    assert "1 layer(s), model.layers.0.mlp.up_proj" in err.__notes__[0]

    class NoNotes(RuntimeError):  # as on 3.10
        def __getattribute__(self, name):
            if name == "add_note":
                raise AttributeError(name)
            return super().__getattribute__(name)

    with pytest.warns(RuntimeWarning, match="were already pruned; load it again"):
        _say_what_changed(NoNotes("boom"), done)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_zeros_in_counts_exactly_the_entries_equal_to_zero(dtype):
    """zeros_in (count_nonzero, no int64 mask) counts what ``== 0`` counts: -0.0 is zero, NaN and tiny values not."""
    from prunekit.weights.engine import zeros_in

    t = torch.tensor([0.0, -0.0, float("nan"), 1e-30, float("inf"), 3.0, 0.0], dtype=torch.float64).to(dtype)
    assert zeros_in(t) == int((t == 0).sum()) == (4 if dtype == torch.float16 else 3)  # float16: 1e-30 is 0
    w = torch.randn(37, 53).to(dtype)
    w[w.abs() < 0.5] = 0
    assert zeros_in(w) == int((w == 0).sum()) and zeros_in(w.t()) == zeros_in(w) and zeros_in(torch.zeros(0)) == 0


def test_zeros_in_counts_dtypes_count_nonzero_has_no_kernel_for():
    """float8 has no CPU count_nonzero: prunekit.sparsity() on a model holding one raised NotImplementedError."""
    from prunekit.weights.engine import zeros_in

    t = torch.tensor([0.0, 1.0, 0.0, 2.0, -0.0]).to(torch.float8_e4m3fn)
    assert zeros_in(t) == 3
    model = tiny_model("llama")
    model.lm_head.weight.data = torch.zeros_like(model.lm_head.weight.data).to(torch.float8_e4m3fn)  # stored in fp8
    head, total = model.lm_head.weight.numel(), sum(p.numel() for p in model.parameters())
    assert prunekit.sparsity(model)["model_total"] == pytest.approx(head / total, abs=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_layer_handed_back_unchanged_is_not_rewritten_and_its_error_is_zero(dtype, monkeypatch):
    """D-Pruner's general stage only measures (it returns UNCHANGED). The engine wrote its weights back and
    ran two [tokens, in] x [in, out] products for an error that is always 0 (2.9 s of 92.7 on SmolLM2-135M)."""
    from prunekit.weights import engine

    model = tiny_model("llama").to(dtype)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    monkeypatch.setattr(engine, "_rel_error", lambda *a: pytest.fail("error measured for an unchanged layer"))
    monkeypatch.setattr(engine, "set_weight", lambda *a: pytest.fail("an unchanged weight was written back"))
    reports, _ = prune_blocks(model, ids_from_text(char_tokenizer(), 4, 32), lambda w, s, _name: engine.UNCHANGED,
                              stat="hessian", progress=False)
    assert reports and all(r.rel_error == 0.0 and r.sparsity == 0.0 for r in reports)
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())


def test_a_method_that_prunes_the_tensor_in_place_and_returns_it_is_written_back():
    """Found in review: taking "the tensor handed in" for "unchanged" left such a method's model dense."""
    model = tiny_model("llama")

    def in_place(w, _s, _name):
        w[w.abs() < w.abs().median()] = 0
        return w

    reports, _ = prune_blocks(model, ids_from_text(char_tokenizer(), 4, 32), in_place, stat="hessian", progress=False)
    assert all(r.sparsity >= 0.49 and r.rel_error > 0 for r in reports)  # measured against the weights it had
    assert prunekit.sparsity(model)["total"] >= 0.49


def test_block_inputs_read_each_blocks_own_arguments_without_running_the_blocks():
    from prunekit.weights.engine import capture_block_inputs, for_block

    model = tiny_model("gemma2")  # sliding, full, sliding, full: two masks
    blocks = find_blocks(model)[1]
    ids = ids_from_text(char_tokenizer(), 6, 32)
    seen = {}
    hooks = [b.register_forward_pre_hook(lambda m, a, k, i=i: seen.setdefault(i, dict(k)) and None,
                                         with_kwargs=True)
             for i, b in enumerate(blocks)]
    with torch.no_grad():
        model(input_ids=ids[:4], use_cache=False)
    for h in hooks:
        h.remove()
    wrapper = blocks[1].forward  # an instance forward of someone else's (accelerate's hooks set one) is put back
    blocks[1].forward = wrapper
    batches = capture_block_inputs(model, blocks, ids, batch_size=4)
    assert vars(blocks[1])["forward"] is wrapper and "forward" not in vars(blocks[0])
    del blocks[1].forward
    kwargs = batches[0][1]
    assert set(kwargs.by_block) == {blocks[1], blocks[3]}  # the full-attention layers differ from the first
    for i, block in enumerate(blocks):
        got = for_block(block, kwargs)
        torch.testing.assert_close(got["attention_mask"], seen[i]["attention_mask"])
    assert not torch.equal(for_block(blocks[1], kwargs)["attention_mask"], kwargs["attention_mask"])


def test_block_inputs_run_the_blocks_for_real_where_skipping_them_breaks_the_model():
    from prunekit.weights.engine import capture_block_inputs, for_block

    model = tiny_model("qwen2_swa")
    blocks = find_blocks(model)[1]
    ids = ids_from_text(char_tokenizer(), 4, 32)
    ran = []

    def needs_real_outputs(_m, args, kwargs, out):  # a loop that uses what a block returns
        if out is (args[0] if args else kwargs["hidden_states"]):
            raise ValueError("the block handed its input on")
        ran.append(1)

    hook = blocks[0].register_forward_hook(needs_real_outputs, with_kwargs=True)
    try:
        batches = capture_block_inputs(model, blocks, ids, batch_size=4)
    finally:
        hook.remove()
    assert ran == [1]  # the real forward of block 0; the last block never runs
    kwargs = batches[0][1]
    assert set(kwargs.by_block) == {blocks[1], blocks[2]}  # full attention first, then the sliding window
    assert torch.equal(for_block(blocks[1], kwargs)["attention_mask"], for_block(blocks[2], kwargs)["attention_mask"])


def test_a_half_precision_overflow_points_a_python_caller_at_loading_in_float32(tok):
    # the hint said "--dtype float32": the CLI's --dtype is the saved dtype; --compute-dtype is the one to name
    model = tiny_model("llama").half()
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight.mul_(2e5)
    with pytest.raises(InputError, match=r"\(float16 activations\); check its weights, or prune it in float32 "
                                         r"\(prune --compute-dtype float32, "
                                         r"prunekit\.load_model\(\.\.\., dtype='float32'\)\)$"):
        prunekit.prune(model, method="wanda", ratio=0.5, calibration=ids_from_text(tok, 2, 16), progress=False)


def test_block_inputs_of_a_model_that_repeats_a_block_leave_it_whole():
    # one block object at two depths was stubbed twice and put back in the wrong order: the model computed an
    # identity for it from then on (and the capture failed)
    from prunekit.weights.engine import capture_block_inputs

    model = tiny_model("llama")
    layers = model.model.layers
    model.model.layers = torch.nn.ModuleList([layers[0], layers[1], layers[0]])
    model.config.num_hidden_layers = 3
    ids = ids_from_text(char_tokenizer(), 4, 16)
    with torch.no_grad():
        before = model(input_ids=ids, use_cache=False).logits
        batches = capture_block_inputs(model, find_blocks(model)[1], ids, batch_size=2)
        after = model(input_ids=ids, use_cache=False).logits
    assert torch.equal(before, after) and not any("forward" in vars(b) for b in model.model.layers)
    assert len(batches) == 2 and all(k.by_block == {} and h.shape == (2, 16, 64) for h, k in batches)


def test_statistics_and_ids_follow_the_model_device():
    """A CUDA model failed in every method but magnitude (H200, 2026-12-04): the ids stayed on the CPU, and the
    accumulators and the statistics handed to the methods were CPU tensors. The device logic, checked on the CPU."""
    from prunekit.weights import stats
    from prunekit.weights.engine import input_device

    assert input_device(tiny_model()) == torch.device("cpu")
    assert input_device(torch.nn.Linear(2, 2)) == torch.device("cpu")  # no input embedding: its first parameter
    assert input_device(torch.nn.ReLU()) == torch.device("cpu")  # no parameter at all
    moments = stats.neutral("moments", 4)
    moments.tokens = 7.0
    # "meta" stands in for a GPU: a tensor there that stayed on the CPU is caught by its device
    moved = stats.to_device({"moments": moments, "hessian": stats.neutral("hessian", 4), "none": None}, "meta")
    assert moved["moments"].tokens == 7.0 and moved["none"] is None
    assert {t.device.type for t in (moved["moments"].norms, moved["moments"].sums, moved["moments"].var,
                                    moved["hessian"])} == {"meta"}

    def tensors(acc):
        m = acc.parts["moments"]
        return acc.parts["norms"].sq, acc.parts["hessian"].h, m.norms.sq, m.sums, m.var

    made = stats.make("norms+hessian+moments", 3, "meta")  # the engine makes them on the activations' device
    assert {t.device.type for t in tensors(made)} == {"meta"}
    moving = stats.make("norms+hessian+moments", 3)  # and one made on the CPU moves to its first input's
    moving.add(torch.ones(2, 4, 3, device="meta"))
    assert {t.device.type for t in tensors(moving)} == {"meta"}
    assert all(t.dtype == torch.float32 for t in tensors(moving))
