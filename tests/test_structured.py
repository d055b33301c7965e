"""Structured width pruning: units and surgery, the local second-order pruner, Týr's search, export, refusals."""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import prunekit
from prunekit.errors import InputError
from prunekit.structured import local, tyr
from prunekit.structured.units import Widths, block_params, check_widths, layer_widths, model_dims, shrink_attention

SRC = str(Path(__file__).resolve().parents[1] / "src")


def tiny(layers: int = 3, heads: int = 4, kv: int = 2, seed: int = 0) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=128, hidden_size=16 * heads, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=kv, head_dim=16, max_position_embeddings=128)
    return LlamaForCausalLM(cfg).eval()


def calib(n: int = 8, seq: int = 32, seed: int = 1) -> torch.Tensor:
    return torch.randint(0, 128, (n, seq), generator=torch.Generator().manual_seed(seed))


TYR_FAST = {"iterations": 2, "generations": 3, "offspring": 4, "stages": "64:2,128:1", "batch_size": 8}


def kept_rows(pruned: torch.Tensor, dense: torch.Tensor, size: int) -> list[int]:
    """Which `size`-row blocks of `dense` ([n * size, in]) survive, in order, in `pruned`."""
    blocks = dense.view(-1, size, dense.shape[1])
    out = []
    for b in pruned.view(-1, size, pruned.shape[1]):
        out.append(int(next(i for i in range(blocks.shape[0]) if torch.equal(blocks[i], b))))
    return out


# ---------------------------------------------------------------- local pruner


def test_refit_equals_lstsq():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(400, 24, generator=g, dtype=torch.float64)  # [n, in]
    w = torch.randn(10, 24, generator=g, dtype=torch.float64)  # [out, in]
    keep = torch.tensor([0, 3, 4, 7, 9, 10, 15, 20, 23])
    h = x.T @ x
    ours = local.refit(h.float(), (h @ w.T).float(), keep)  # [out, k]
    ref = torch.linalg.lstsq(x[:, keep], x @ w.T).solution.T  # [out, k]
    assert torch.allclose(ours.double(), ref, atol=1e-4, rtol=1e-4)
    # and not trivially: the refit differs from merely slicing the kept columns
    assert not torch.allclose(ours.double(), w[:, keep], atol=1e-2)


def test_prune_path_keep_all_is_identity_and_levels_nest():
    g = torch.Generator().manual_seed(1)
    x = torch.randn(300, 32, generator=g)
    w = torch.randn(8, 32, generator=g)
    path = local.prune_path(w, x.T @ x, unit_size=4, levels=[8, 6, 4, 2], groups=2)
    assert torch.allclose(path[8].weight, w, atol=1e-4)
    for big, small in ((8, 6), (6, 4), (4, 2)):
        assert set(path[small].keep.tolist()) <= set(path[big].keep.tolist())
        per_group = torch.bincount(path[small].keep // 4, minlength=2)
        assert per_group[0] == per_group[1] == small // 2  # the same count in every group


def test_planted_useless_units_go_first_in_local_pruner():
    g = torch.Generator().manual_seed(2)
    x = torch.randn(500, 40, generator=g)
    w = torch.randn(12, 40, generator=g)
    w[:, [5, 17, 33]] = 0.0  # three useless neurons
    path = local.prune_path(w, x.T @ x, unit_size=1, levels=[37], step=1)
    assert set(range(40)) - set(path[37].keep.tolist()) == {5, 17, 33}
    # a head (8 columns) whose output weights are zero goes before the others, within its group
    w2 = torch.randn(12, 32, generator=g)
    w2[:, 8:16] = 0.0  # head 1 of group 0 (heads 0, 1 | 2, 3)
    path2 = local.prune_path(w2, x[:, :32].T @ x[:, :32], unit_size=8, levels=[2], groups=2)
    assert 1 not in path2[2].keep.tolist() and 0 in path2[2].keep.tolist()


# ---------------------------------------------------------------- model-level methods


@pytest.mark.parametrize("method", ["uniform-structured", "wanda-structured", "tyr"])
def test_planted_useless_heads_and_neurons_removed_first(method):
    model = tiny()
    dense_q = [b.self_attn.q_proj.weight.detach().clone() for b in model.model.layers]
    dense_gate = [b.mlp.gate_proj.weight.detach().clone() for b in model.model.layers]
    useless_heads = {0: 1, 1: 2}  # group 0 loses head 1; group 1 loses head 2 (heads 2, 3)
    useless_neurons = list(range(0, 128, 4))[:32]  # 32 of 128 neurons
    with torch.no_grad():
        for b in model.model.layers:
            for h in useless_heads.values():
                b.self_attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0.0
            b.mlp.down_proj.weight[:, useless_neurons] = 0.0
    dims = model_dims(model)
    # remove one head per group and 32 neurons per layer: exactly the planted ones
    per_layer = block_params(dims, [Widths(4, 128)])
    ratio = (2 * dims.head_params + 32 * dims.neuron_params) / per_layer
    opts = dict(TYR_FAST, iterations=1, generations=0) if method == "tyr" else {}
    res = prunekit.prune_structured(model, method=method, ratio=ratio, structure="both", calibration=calib(),
                                    progress=False, **opts)
    assert [(w.heads, w.intermediate) for w in res.widths] == [(2, 96)] * 3
    for i, b in enumerate(model.model.layers):
        assert kept_rows(b.self_attn.q_proj.weight, dense_q[i], 16) == [0, 3]
        kept = kept_rows(b.mlp.gate_proj.weight, dense_gate[i], 1)
        assert set(kept).isdisjoint(useless_neurons) and len(kept) == 96


@pytest.mark.parametrize("method,opts", [("uniform-structured", {}),
                                         ("tyr", dict(TYR_FAST, generations=0)),
                                         ("tyr", dict(TYR_FAST, generations=0, final="supernet"))])
def test_without_a_search_the_layers_are_pruned_once(monkeypatch, method, opts):
    """With no search the widths stay the centre's, so the search loop's supernet was built (the whole pruning
    work) and thrown away before the final step built it again: uniform-structured took twice its time."""
    calls = []
    real = tyr.build_supernet
    monkeypatch.setattr(tyr, "build_supernet", lambda *a, **k: calls.append(1) or real(*a, **k))
    model = tiny()
    dims = model_dims(model)
    res = prunekit.prune_structured(model, method=method, ratio=0.3, structure="both", calibration=calib(),
                                    progress=False, **opts)
    assert len(calls) == (opts.get("iterations", 1) if opts.get("final") == "supernet" else 1)
    assert res.widths == tyr.uniform_widths(dims, ratio=0.3, structure="both") == layer_widths(model)


def test_tyr_keeps_uniform_budget_and_gqa():
    model = tiny(layers=4, heads=6, kv=2)
    dims = model_dims(model)
    res = prunekit.prune_structured(model, method="tyr", ratio=0.4, structure="both", calibration=calib(),
                                    progress=False, seed=3, **TYR_FAST)
    uniform = tyr.uniform_widths(dims, ratio=0.4, structure="both")
    assert res.block_params_after == block_params(dims, uniform)
    assert abs(res.removed - 0.4) < 0.03
    for b, w in zip(model.model.layers, res.widths):
        a = b.self_attn
        assert w.heads % 2 == 0 and a.num_key_value_groups == w.heads // 2
        assert a.o_proj.in_features == w.heads * 16 and b.mlp.down_proj.in_features == w.intermediate
        assert a.k_proj.out_features == 2 * 16  # KV heads are kept
    assert len(res.info["search"]) == 6  # 2 iterations x 3 generations
    speed = prunekit.measure_speed(model, prefill=8, decode=2, repeats=1)  # prefill + cached decode run pruned
    assert speed["params"] == sum(p.numel() for p in model.parameters()) and speed["decode_s_per_token"] > 0


def test_compare_speed_alternates_the_models_and_keeps_each_ones_fastest_round(monkeypatch):
    from prunekit import speed as speed_mod

    dense, pruned = tiny(layers=2), tiny(layers=1)
    calls = []
    # prefill / decode seconds per call, in call order: the load changes between rounds
    script = iter([(4.0, 0.40), (2.0, 0.30), (9.0, 0.90), (5.0, 0.10), (3.0, 0.50), (6.0, 0.20)])

    def fake(model, **kw):
        calls.append(("dense" if model is dense else "pruned", kw["repeats"]))
        pre, dec = next(script)
        return {"prefill_s": pre, "decode_s_per_token": dec, "params": sum(p.numel() for p in model.parameters())}

    monkeypatch.setattr(speed_mod, "measure_speed", fake)
    out = speed_mod.compare_speed(dense, pruned, rounds=3)
    assert calls == [("dense", 1), ("pruned", 1)] * 3
    assert out["dense"]["prefill_s"] == 3.0 and out["dense"]["decode_s_per_token"] == 0.40
    assert out["pruned"]["prefill_s"] == 2.0 and out["pruned"]["decode_s_per_token"] == 0.10
    assert out["speedup"] == {"prefill": 1.5, "decode": 4.0}
    assert out["median_speedup"] == {"prefill": 4.0 / 5.0, "decode": 0.5 / 0.2}
    assert out["rounds"] == 3 and out["pruned"]["params"] < out["dense"]["params"]
    note = speed_mod.noise_note(out)  # 1.5x fastest against 0.8x median: the load decided it
    assert note.startswith("the speed rounds disagree (prefill 1.50x fastest vs 0.80x median; decode 4.00x")
    assert speed_mod.noise_note({**out, "median_speedup": {"prefill": 1.4, "decode": 3.6}}) is None  # within 25%
    with pytest.raises(InputError, match="rounds"):
        speed_mod.compare_speed(dense, pruned, rounds=0)


def test_mutations_conserve_parameter_count():
    model = tiny(layers=4, heads=6, kv=2)
    dims = model_dims(model)
    centre = tyr.uniform_widths(dims, ratio=0.35, structure="both")
    subs = tyr._sublayers(dims, centre, "both", mlp_step=16, spread=4)
    lo, hi = np.array([s.lo for s in subs]), np.array([s.hi for s in subs])
    kinds = np.array([s.kind == "mlp" for s in subs], dtype=int)
    budget = block_params(dims, centre)
    rng = np.random.default_rng(0)
    parent = np.zeros(len(subs), dtype=np.int64)
    changed = 0
    for _ in range(300):
        child = tyr.mutate(parent, lo, hi, kinds, rng)
        assert (child >= lo).all() and (child <= hi).all()
        widths = tyr._widths_of(dims, subs, child)
        check_widths(dims, widths)
        assert block_params(dims, widths) == budget
        changed += not np.array_equal(child, parent)
        parent = child
    assert changed > 250


def test_sparse_kl_of_model_with_itself_is_zero():
    logits = torch.randn(10, 50)
    top = torch.topk(logits, 8)
    assert float(tyr.sparse_kl(top.values, top.indices, logits)) == pytest.approx(0.0, abs=1e-6)
    assert float(tyr.sparse_kl(top.values, top.indices, torch.randn(10, 50))) > 0.01


def test_relative_error_of_hidden_states():
    t = torch.tensor([[3.0, 4.0], [1.0, 0.0]])
    assert float(tyr.relative_error(t, t)) == 0.0
    # token 1: |(3,4)-(0,4)|^2 / 25 = 9/25; token 2: |(1,0)-(1,1)|^2 / 1 = 1
    assert float(tyr.relative_error(t, torch.tensor([[0.0, 4.0], [1.0, 1.0]]))) == pytest.approx((9 / 25 + 1) / 2)


def test_fitness_hidden_term_probes_first_middle_last_blocks():
    assert tyr.probe_layers(30) == [0, 15, 29] and tyr.probe_layers(1) == [0]
    dense, pruned = tiny(layers=4), tiny(layers=4)
    ids, windows = calib(4), torch.arange(4)
    teacher = tyr._teacher(dense, ids, 16, 2, tyr.probe_layers(4))
    assert teacher.layers == [0, 2, 3] and [h.shape for h in teacher.hidden] == [(4, 32, 64)] * 3
    assert tyr._fitness(dense, ids, teacher, windows, 2, 1.0) == pytest.approx(0.0, abs=1e-3)  # itself (fp16 store)
    with torch.no_grad():
        pruned.model.layers[1].mlp.down_proj.weight[:, :64] = 0
    kl = tyr._fitness(pruned, ids, teacher, windows, 2)
    both = tyr._fitness(pruned, ids, teacher, windows, 2, 2.0)
    assert kl > 0 and both > kl  # block 1 changed: blocks 2 and 3 move, so the hidden term adds
    blocks = pruned.model.layers
    assert all(not b._forward_hooks for b in blocks) and all(not b._forward_hooks for b in dense.model.layers)
    with pytest.raises(InputError, match="hidden_weight"):
        tyr.tyr_options(hidden_weight=-1.0)
    res = prunekit.prune_structured(tiny(), method="tyr", ratio=0.35, calibration=calib(), progress=False,
                                    hidden_weight=1.0, **TYR_FAST)
    assert res.info["options"]["hidden_weight"] == 1.0 and res.info["search"]


# ---------------------------------------------------------------- export


_RELOAD = """
import json, sys, torch
sys.path.insert(0, {src!r})
import prunekit
from transformers import AutoModelForCausalLM
ids = torch.load(sys.argv[1], weights_only=True)
results = {{}}
for line in sys.argv[2:]:
    mode, folder, out = line.split("|")
    try:
        model = AutoModelForCausalLM.from_pretrained(folder).eval() if mode == "plain" else prunekit.load(folder)[0]
    except Exception as e:  # plain transformers must refuse a per-layer-width folder
        results[out] = type(e).__name__
        continue
    with torch.no_grad():
        torch.save(model(ids).logits, out)
    results[out] = "ok"
print(json.dumps(results))
"""


@pytest.mark.parametrize("method", ["uniform-structured", "tyr"])
def test_activations_that_overflow_are_refused_and_the_model_left_as_it_was(method):
    """Finite weights whose activations overflow in the last block: a raw LinAlgError from the SVD, with an
    earlier o_proj left holding its propagated (pruned) weights."""
    model = tiny()
    with torch.no_grad():
        model.model.layers[-1].mlp.up_proj.weight.mul_(1e37)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(InputError, match=r"the input of model\.layers\.2\.mlp\.down_proj is NaN/Inf or too large"):
        prunekit.prune_structured(model, method=method, ratio=0.35, structure="both", calibration=calib(),
                                  progress=False, **({} if method == "uniform-structured" else TYR_FAST))
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_export_reloads_with_identical_logits_in_fresh_process(tmp_path):
    ids = calib(2, 16, seed=9)
    torch.save(ids, tmp_path / "ids.pt")
    expected, jobs = {}, []
    for uniform in (True, False):
        model = tiny()
        method = "uniform-structured" if uniform else "tyr"
        prunekit.prune_structured(model, method=method, ratio=0.35, structure="both", calibration=calib(),
                                  progress=False, seed=5, **({} if uniform else TYR_FAST))
        if not uniform and len(set(layer_widths(model))) == 1:  # make the per-layer case certain
            from prunekit.structured.units import shrink_mlp
            mlp = model.model.layers[0].mlp
            shrink_mlp(mlp, torch.arange(mlp.gate_proj.out_features - 8))
        widths = layer_widths(model)
        assert (len(set(widths)) == 1) == uniform
        out = prunekit.save_structured(model, None, tmp_path / f"m{uniform}", metadata={})
        cfg = json.loads((out / "config.json").read_text())
        assert ("prunekit_layer_widths" in cfg) != uniform
        with torch.no_grad():
            logits = model(ids).logits
        for mode in ("plain", "prunekit"):
            target = str(tmp_path / f"{mode}-{uniform}.pt")
            expected[target] = logits if (uniform or mode == "prunekit") else None
            jobs.append(f"{mode}|{out}|{target}")
    script = tmp_path / "reload.py"
    script.write_text(_RELOAD.format(src=SRC))
    proc = subprocess.run([sys.executable, str(script), str(tmp_path / "ids.pt"), *jobs], check=True,
                          capture_output=True, text=True)
    status = json.loads(proc.stdout.strip().splitlines()[-1])
    for target, logits in expected.items():
        if logits is None:
            assert status[target] != "ok"  # refused loudly, not loaded wrong
        else:
            assert status[target] == "ok"
            assert torch.equal(torch.load(target, weights_only=True), logits)


# ---------------------------------------------------------------- refusals


def test_gqa_constraints_refused():
    model = tiny()
    dims = model_dims(model)
    with pytest.raises(InputError, match="break GQA"):
        check_widths(dims, [Widths(3, 128)] + [Widths(4, 128)] * 2)  # 3 query heads over 2 KV heads
    with pytest.raises(InputError, match="no heads|one per KV group"):
        check_widths(dims, [Widths(0, 128)] * 3)
    with pytest.raises(InputError, match="break GQA"):
        shrink_attention(copy.deepcopy(model.model.layers[0].self_attn), torch.tensor([0, 1]), kv_heads=2)  # both in group 0


def test_bad_requests_refused_with_clear_message():
    model = tiny()
    ids = calib()
    with pytest.raises(InputError, match="no query heads"):
        prunekit.prune_structured(model, method="tyr", ratio=0.5, structure="heads", calibration=ids, progress=False)
    with pytest.raises(InputError, match="structure must be"):
        prunekit.prune_structured(model, method="tyr", ratio=0.3, structure="layers", calibration=ids)
    with pytest.raises(InputError, match="unknown method"):
        prunekit.prune_structured(model, method="sparsegpt", ratio=0.3, calibration=ids)
    with pytest.raises(InputError, match="stages"):
        prunekit.prune_structured(model, method="tyr", ratio=0.3, calibration=ids, stages="many")
    # shrinking token counts were accepted; a last stage keeping 5 was quietly saved as keeping 1
    for bad, match in (("64:1,32:1", "growing token counts"), ("32:5", "must keep 1 candidate")):
        with pytest.raises(InputError, match=match):
            prunekit.prune_structured(model, method="tyr", ratio=0.3, calibration=ids, stages=bad)
    with pytest.raises(InputError, match="does not take"):
        prunekit.prune_structured(model, method="magnitude-structured", ratio=0.3, generations=3)
    with pytest.raises(InputError, match=r"ratio"):
        prunekit.prune_structured(model, method="tyr", ratio=1.2, calibration=ids)
    # nothing was pruned by the refused calls
    assert layer_widths(model) == [Widths(4, 128)] * 3


@pytest.mark.parametrize("method", ["tyr", "wanda-structured"])
@pytest.mark.parametrize("kwargs, message", [
    (dict(samples="2"), "samples must be an integer >= 1, got '2'"), (dict(samples=0), "samples must be"),
    (dict(samples=2.0), "samples must be"), (dict(seqlen=True), "seqlen must be"), (dict(seed="0"), "seed must be"),
])
def test_prune_structured_checks_samples_seqlen_and_seed_first(method, kwargs, message, tok):
    model = tiny(layers=1)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(InputError, match=message):
        prunekit.prune_structured(model, method=method, ratio=0.3, tokenizer=tok, calibration="wiki", progress=False,
                                  **kwargs)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_measure_speed_fits_a_model_with_few_learned_positions():
    """GPT-2 embeds positions from a table: the default 512 + 64 tokens ran past a 256-position table (an
    IndexError after the pruning work, in `prunekit prune` without --no-speed)."""
    from conftest import tiny_model

    from prunekit import speed

    gpt2 = tiny_model("gpt2")  # n_positions 256
    got = speed.measure_speed(gpt2, repeats=1)
    assert (got["prefill_tokens"], got["decode_tokens"]) == (224, 32)
    with pytest.raises(InputError, match="exceed the 256 positions"):
        speed.measure_speed(gpt2, prefill=250, decode=10, repeats=1)
    assert speed.measure_speed(tiny(layers=1), prefill=8, decode=2, repeats=1)["prefill_tokens"] == 8


def test_measure_speed_decodes_from_the_prefill_it_timed():
    """Each decode timing ran its own untimed prefill again (17 s of a 96 s speed report on SmolLM2)."""
    from prunekit import speed

    model = tiny(layers=1)
    lengths = []
    model.register_forward_pre_hook(lambda _m, _a, kw: lengths.append(kw["input_ids"].shape[1]), with_kwargs=True)
    speed.measure_speed(model, prefill=12, decode=3, repeats=2)
    assert lengths == [8] + [12, 1, 1, 1] * 2  # warm-up, then prefill + 3 decode steps per repeat


@pytest.mark.parametrize("vocab", [-5, 0, 129, 10**7, True, 2.5])
def test_measure_speed_takes_a_vocab_the_model_has(vocab):
    from prunekit import speed, structured

    model = tiny(layers=1)
    for measure in (speed.measure_speed, structured.measure_speed):
        with pytest.raises(InputError, match="vocab .* from 1 to the model's 128"):
            measure(model, prefill=4, decode=1, repeats=1, vocab=vocab)
    assert speed.measure_speed(model, prefill=4, decode=1, repeats=1, vocab=np.int64(128))["prefill_tokens"] == 4


@pytest.mark.parametrize("metadata, message", [
    ({"ratio": torch.tensor(0.3)}, r"metadata\['ratio'\] is of type Tensor"),
    ({"runs": [{"seed": np.int64(1)}]}, r"metadata\['runs'\]\[0\]\['seed'\] is of type int64"),
    ({"out": Path("x")}, r"metadata\['out'\] is of type PosixPath"),
])
def test_save_structured_refuses_metadata_json_cannot_hold(metadata, message, tmp_path):
    model = tiny(layers=1)
    config = model.config.to_dict()
    with pytest.raises(InputError, match=message):
        prunekit.save_structured(model, None, tmp_path / "m", metadata=metadata)
    assert list(tmp_path.iterdir()) == [] and model.config.to_dict() == config


def test_cli_refuses_bad_input_without_output(tmp_path, capsys):
    from prunekit.cli import main

    out = tmp_path / "out"
    assert main(["prune", str(tmp_path), "--method", "tyr", "--ratio", "0.3", "--pattern", "2:4", "--out", str(out)]) == 2
    assert main(["prune", str(tmp_path), "--method", "tyr", "--out", str(out)]) == 2
    assert main(["prune", str(tmp_path), "--method", "tyr", "--ratio", "0.3", "--option", "offspring=0",
                 "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "--pattern does not apply" in err and "needs --ratio" in err and "offspring must be" in err
    assert not out.exists()


@pytest.mark.integration
def test_cli_structured_on_smollm2(tmp_path):
    """The CLI end to end on the real model: data-free magnitude-structured, saved, reloaded identically."""
    from prunekit.cli import main

    out = tmp_path / "mag"
    assert main(["prune", "smollm2-135m", "--method", "wanda-structured", "--ratio", "0.9", "--structure", "heads",
                 "--out", str(out), "--quiet"]) == 2  # heads alone cannot remove 90%: refused before any work
    assert not out.exists()
    assert main(["prune", "smollm2-135m", "--method", "magnitude-structured", "--ratio", "0.3", "--no-speed",
                 "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    assert meta["widths"] == [{"heads": 6, "intermediate": 1050}] * 30 and abs(meta["removed"] - 0.3) < 0.005
    model, tok = prunekit.load(out)
    ids = tok("The quick brown fox jumps over the lazy dog.", return_tensors="pt")["input_ids"]
    dense, _ = prunekit.load_model("smollm2-135m")
    prunekit.prune_structured(dense, method="magnitude-structured", ratio=0.3, structure="both")
    with torch.no_grad():
        assert torch.equal(model(ids).logits, dense(ids).logits)


def test_cli_tyr_on_tiny_folder_writes_report_and_reloads(model_dir, text_file, tmp_path, capsys):
    from prunekit.cli import main

    out = tmp_path / "tyr"
    args = ["prune", str(model_dir), "--method", "tyr", "--ratio", "0.3", "--structure", "neurons", "--calib",
            str(text_file), "--samples", "4", "--seqlen", "32", "--option", "generations=2", "--option", "offspring=3",
            "--option", "stages=32:2,64:1", "--option", "iterations=1", "--out", str(out), "--quiet"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "measured speedup" in printed and "saved to" in printed
    meta = json.loads((out / "prunekit.json").read_text())
    per_layer = "prunekit_layer_widths" in json.loads((out / "config.json").read_text())
    assert per_layer == (len({(w["heads"], w["intermediate"]) for w in meta["widths"]}) > 1)
    assert ("load with prunekit.load: its widths differ per layer" if per_layer
            else "load with plain transformers or prunekit.load") in printed
    assert meta["method"] == "tyr" and len(meta["widths"]) == 2 and meta["speed"]["pruned"]["params"] < meta["speed"]["dense"]["params"]
    assert "Per-layer widths" in (out / "report.md").read_text() and "(widths.png)" in (out / "report.md").read_text()
    assert (out / "widths.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    model, _ = prunekit.load(out)
    assert [w.intermediate for w in layer_widths(model)] == [w["intermediate"] for w in meta["widths"]]
    assert main(args) == 2  # the folder exists now: refused without --overwrite


def test_tyr_final_sequential_keeps_the_searched_widths():
    a, b = tiny(seed=4), tiny(seed=4)
    ra = prunekit.prune_structured(a, method="tyr", ratio=0.35, calibration=calib(), progress=False, seed=2,
                                   final="supernet", **TYR_FAST)
    rb = prunekit.prune_structured(b, method="tyr", ratio=0.35, calibration=calib(), progress=False, seed=2, **TYR_FAST)
    assert ra.widths == rb.widths and ra.block_params_after == rb.block_params_after
    ids = calib(2, 16, seed=7)
    with torch.no_grad():
        assert not torch.equal(a(ids).logits, b(ids).logits)  # re-pruned on the real model, not the supernet's levels


def test_tyr_fitness_windows_are_kept_from_the_supernet(monkeypatch):
    ids = calib(10)
    seen = {"fitness": [], "supernet": []}
    real_fitness = tyr._fitness
    monkeypatch.setattr(tyr, "_fitness", lambda model, fids, *a: seen["fitness"].append(fids) or real_fitness(model, fids, *a))
    monkeypatch.setattr(tyr, "_calibration_batches",
                        lambda model, x, bs: seen["supernet"].append(x) or tyr.capture_block_inputs(model, tyr.find_blocks(model)[1], x, batch_size=bs))
    prunekit.prune_structured(tiny(), method="tyr", ratio=0.35, calibration=ids, progress=False, fitness_samples=3,
                              **TYR_FAST)
    assert seen["fitness"] and all(torch.equal(f, ids[-3:]) for f in seen["fitness"])  # only the last 3 windows
    assert seen["supernet"] and all(torch.equal(x, ids[:-3]) for x in seen["supernet"])  # never those
    with pytest.raises(InputError, match="fitness_samples"):
        prunekit.prune_structured(tiny(), method="tyr", ratio=0.35, calibration=calib(3), progress=False,
                                  fitness_samples=3, **TYR_FAST)


def test_tyr_says_when_the_text_is_too_short_for_its_fitness_windows(tok, text_file):
    from prunekit.text import _stream

    text = prunekit.load_text(str(text_file), purpose="calibration")
    ids, head = _stream(tok, text.text)
    avail = len(ids) // (32 - (head is not None))  # windows of 32 tokens the text holds
    kw = dict(method="tyr", ratio=0.35, tokenizer=tok, calibration=text, samples=avail, seqlen=32, progress=False,
              **{**TYR_FAST, "generations": 1})
    with pytest.raises(InputError, match="fitness_samples"):
        prunekit.prune_structured(tiny(), **kw)  # the default draws as many again
    res = prunekit.prune_structured(tiny(), fitness_samples=0, **kw)
    assert res.info["options"]["fitness_samples"] == 0


def test_eval_and_load_model_open_per_layer_widths(model_dir, text_file, tmp_path, capsys):
    from prunekit.cli import main
    from prunekit.structured.units import shrink_mlp

    model, tok = prunekit.load_model(model_dir)
    mlp = model.model.layers[0].mlp
    shrink_mlp(mlp, torch.arange(mlp.gate_proj.out_features - 8))  # layer 0 narrower than the others
    out = prunekit.save_structured(model, tok, tmp_path / "narrow", metadata={})
    assert "prunekit_layer_widths" in json.loads((out / "config.json").read_text())
    ids = torch.arange(12)[None] % model.config.vocab_size
    again, _ = prunekit.load_model(out)
    with torch.no_grad():
        assert torch.equal(again(ids).logits, model(ids).logits)
    capsys.readouterr()
    assert main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--json", "--quiet"]) == 0
    assert json.loads(capsys.readouterr().out)["ppl"] > 1
    # widths in range that do not match the stored weights: a RuntimeError traceback from load_state_dict
    cfg = json.loads((out / "config.json").read_text())
    cfg["prunekit_layer_widths"][0]["intermediate"] -= 4
    (out / "config.json").write_text(json.dumps(cfg))
    assert main(["eval", str(out), "--text", str(text_file), "--seqlen", "32", "--tokens", "64", "--quiet"]) == 2
    err = capsys.readouterr().err.strip()
    assert "the weights do not match prunekit_layer_widths" in err and "(3 tensors differ)" in err
    assert len(err.splitlines()) == 1


def test_structured_bench_groups_seeds_by_settings_and_pairs_tyr_with_uniform_per_seed():
    import importlib.util

    spec = importlib.util.spec_from_file_location("structured_bench", Path(__file__).parents[1] / "bench" / "structured.py")
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench._row_id("tyr", 0.5, 3, "wiki+austen", "final1k") == "tyr-0.5-wiki+austen-s3-final1k"
    assert bench._row_id("tyr", 0.2, 0) == "tyr-0.2"

    def row(method, seed, wiki, austen, tag="", stages=tuple(bench.DEFAULT_STAGES)):
        opts = {"final": "sequential", "stages": [list(s) for s in stages], "fitness_samples": 32}
        return {"id": bench._row_id(method, 0.5, seed, "wiki+austen", tag), "method": method, "ratio": 0.5,
                "seed": seed, "calibration": "wiki+austen", "ppl_wiki": wiki, "ppl_austen": austen,
                **({"options": opts} if method == "tyr" else {})}

    rows = [row("uniform-structured", 0, 10.0, 20.0), row("uniform-structured", 1, 12.0, 22.0),
            row("tyr", 0, 9.0, 21.0), row("tyr", 1, 11.5, 20.0),
            row("tyr", 0, 8.0, 19.0, "final1k", ((256, 2), (1024, 1))),
            row("tyr", 1, 9.0, 18.0, "final1k", ((256, 2), (1024, 1))),
            row("tyr", 0, 1.0, 1.0, "once", ((256, 2), (2048, 1)))]  # one seed: not in the table
    lines = bench._seed_table(rows)
    body = [line for line in lines if line.startswith("| tyr") or line.startswith("| uniform")]
    assert len(body) == 3
    default, final1k = (next(line for line in body if line.startswith("| tyr") and ("1024" in line) == small)
                        for small in (False, True))
    assert "| -1.00 / -0.50 | +1.00 / -2.00 |" in default  # same seed: Týr minus uniform
    assert "| -2.00 / -3.00 | -1.00 / -4.00 |" in final1k
    assert "| 10.25 ± 1.77 | 20.50 ± 0.71 |" in default and not any("2048" in line for line in lines)


def test_multi_head_attention_says_once_that_heads_cannot_go(tmp_path, capsys):
    """MHA (KV heads = heads): "give a larger ratio" at 0.1, "at most 0.000" at 0.3, and `both` pruned neurons only
    without a word."""
    from prunekit.cli import main

    from conftest import char_tokenizer

    model = tiny(heads=4, kv=4)
    dims = model_dims(model)
    for ratio in (0.1, 0.3):
        with pytest.raises(InputError, match=r"as many KV heads as query heads \(4: multi-head attention\), so no "
                                             r"head can go; use --structure neurons"):
            tyr.uniform_widths(dims, ratio=ratio, structure="heads")
    folder = tmp_path / "mha"
    model.save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    from conftest import TEXT

    (tmp_path / "text.txt").write_text(TEXT)
    assert main(["prune", str(folder), "--method", "magnitude-structured", "--ratio", "0.2", "--out",
                 str(tmp_path / "out"), "--no-speed", "--quiet", "--eval", str(tmp_path / "text.txt"),
                 "--eval-seqlen", "32", "--eval-tokens", "64"]) == 0
    captured = capsys.readouterr()
    assert "multi-head attention); head pruning removes query heads within a KV group" in captured.err
    assert "load with plain transformers or prunekit.load" in captured.out  # uniform widths: it named prunekit.load
    assert "| text | windows x seqlen = tokens |" in captured.out  # weight and depth pruning print this table
    # calibration it never reads: the windows were cut and recorded as if used, the weights identical
    assert main(["prune", str(folder), "--method", "magnitude-structured", "--ratio", "0.2", "--out",
                 str(tmp_path / "cal"), "--no-speed", "--quiet", "--calib", str(tmp_path / "text.txt"), "--seed",
                 "7", "--samples", "4"]) == 0
    assert "note: magnitude-structured ranks units by their weights alone; --calib, --samples, --seed unused" in \
        capsys.readouterr().err
    meta = json.loads((tmp_path / "cal" / "prunekit.json").read_text())
    assert meta["calibration"] is None and meta["samples"] == 0
    weights = [(tmp_path / run / "model.safetensors").read_bytes() for run in ("cal", "out")]
    assert weights[0] == weights[1]


def test_structured_pruning_leaves_the_callers_global_rng_alone():
    model = tiny()  # drawn before the state is taken
    torch.manual_seed(123)
    state = torch.random.get_rng_state()
    prunekit.prune_structured(model, method="magnitude-structured", ratio=0.3, structure="both", progress=False)
    assert torch.equal(torch.random.get_rng_state(), state)  # new Linears drew their unused default init from it


@pytest.mark.parametrize("method,call", [("tyr", 4), ("wanda-structured", 2), ("uniform-structured", 2)])
@pytest.mark.parametrize("stop", [KeyboardInterrupt, RuntimeError])
def test_a_failure_on_the_way_puts_the_dense_model_back(method, call, stop):
    """Ctrl-C in Týr's search left a search candidate's widths installed (another function, the dense config);
    one in wanda-structured left some blocks cut; and a model in train mode came back in eval mode."""
    model = tiny().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    widths = layer_widths(model)
    probe = calib(1, 16, seed=3)
    calls = []

    def hook(_module, _args):
        calls.append(1)
        if len(calls) == call:
            raise stop("stopped")

    handle = model.model.layers[1].mlp.register_forward_pre_hook(hook)
    with pytest.raises(stop):
        prunekit.prune_structured(model, method=method, ratio=0.35, structure="both", calibration=calib(),
                                  progress=False, **(TYR_FAST if method == "tyr" else {}))
    handle.remove()
    assert len(calls) == call and model.training and layer_widths(model) == widths
    after = model.state_dict()
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    dense = tiny()
    with torch.no_grad():
        assert torch.equal(model.eval()(probe).logits, dense(probe).logits)


def test_one_column_saliency_is_the_exact_error_of_removing_it_and_refitting():
    """OBS for one column: w_j^2 / [H^-1]_jj per row, the least-squares error of the best refit without column j
    (mutating the division into a product went unnoticed: the planted tests remove dead columns first)."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(64, 6, generator=g, dtype=torch.float64) @ torch.randn(6, 6, generator=g, dtype=torch.float64)
    w = torch.randn(3, 6, generator=g, dtype=torch.float64)
    got = local.saliency(w, torch.linalg.inv(x.T @ x), torch.arange(6), 1)
    for j in range(6):
        rest = [c for c in range(6) if c != j]
        fit = torch.linalg.lstsq(x[:, rest], x @ w.T).solution  # [5, out]
        assert float(got[j]) == pytest.approx(float(((x @ w.T - x[:, rest] @ fit) ** 2).sum()), rel=1e-6)


def test_baselines_score_heads_and_neurons_by_their_own_columns_and_inputs():
    """magnitude-structured scores a head by its q_proj rows and o_proj columns and a neuron by its gate/up rows
    and down_proj column; wanda-structured weighs down_proj by the neuron's input norm."""
    for structure in ("heads", "neurons"):
        model = tiny(layers=1)
        a, m = model.model.layers[0].self_attn, model.model.layers[0].mlp
        with torch.no_grad():
            for lin in (a.q_proj, m.gate_proj, m.up_proj):
                lin.weight.fill_(0.1)  # equal rows: the o_proj / down_proj columns decide
            a.o_proj.weight[16:32] *= 10  # rows: what a score over the wrong axis of o_proj would favour...
            a.o_proj.weight[:, 16:32] = 0.0  # ...while head 1 writes nothing
            m.down_proj.weight[:, 7] = 0.0  # neuron 7 writes nothing
        prunekit.prune_structured(model, method="magnitude-structured", ratio=0.1, structure=structure,
                                  progress=False)
        written = a.o_proj.weight.abs().sum(0).view(-1, 16).sum(1) if structure == "heads" else \
            m.down_proj.weight.abs().sum(0)
        assert len(written) < (4 if structure == "heads" else 128) and (written > 0).all()  # head 1 / neuron 7 went
    model = tiny(layers=1)
    m = model.model.layers[0].mlp
    with torch.no_grad():
        m.up_proj.weight[5] = 0.0  # neuron 5 never fires...
        m.down_proj.weight[:, 5] *= 100  # ...though its output weights are the largest
    prunekit.prune_structured(model, method="wanda-structured", ratio=0.2, structure="neurons", calibration=calib(),
                              progress=False)
    assert float(m.down_proj.weight.detach().abs().max()) < 1  # wanda-structured removed it (its column: ~4.7)


def correlated_inputs(n: int, d: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix  # [n, d]


def refit_error(w: torch.Tensor, h: torch.Tensor, keep: list[int]) -> float:
    """min over W' zero off `keep` of tr((W - W') H (W - W')^T) (the exact error of a kept set)."""
    k = torch.tensor(keep)
    wk = torch.linalg.solve(h[k][:, k], (h @ w.T)[k]).T  # [out, |k|]
    full = torch.zeros_like(w)
    full[:, k] = wk
    e = w - full
    return float((e @ h * e).sum())


class _FakeInstaller:
    def __init__(self):
        self.current = None

    def install(self, subs, offsets):
        self.current = np.array(offsets, dtype=np.int64)


def _search_with_fitness(monkeypatch, target, generations=12, stages="4:2,8:1"):
    installer = _FakeInstaller()

    def fitness(model, ids, teacher, windows, batch_size, hidden_weight=0.0):
        return float(((installer.current - target) ** 2).sum())  # deterministic: no window noise

    monkeypatch.setattr(tyr, "_fitness", fitness)
    subs = [tyr.Sublayer(layer=i, kind="mlp", centre=64, step=8, lo=-4, hi=4) for i in range(len(target))]
    opts = {"generations": generations, "offspring": 6, "stages": tyr._parse_stages(stages), "batch_size": 2,
            "hidden_weight": 0.0}
    log: list = []
    best = tyr._search(None, installer, subs, torch.zeros(4, 4, dtype=torch.long), None, opts,
                       np.random.default_rng(0), False, log, 0)
    return best, [entry.fitness for entry in log]


def test_tyr_search_is_elitist_and_keeps_the_fittest_candidate(monkeypatch):
    """(1+λ) search with elitism (the parent joins the last stage): the parent's fitness never gets worse, and a
    smooth fitness (distance to a reachable distribution) is descended."""
    target = np.array([2, -2, 1, -1])  # sums to 0: reachable by level-conserving moves
    best, fits = _search_with_fitness(monkeypatch, target)
    start = float((target ** 2).sum())  # the uniform distribution (all offsets 0)
    assert fits, "the search ran no generation"
    assert all(b <= a for a, b in zip([start] + fits, fits)), f"fitness got worse: {fits}"
    assert fits[-1] < start
    assert float(((best - target) ** 2).sum()) == fits[-1]  # the returned parent is the one scored


def test_tyr_search_selects_lowest_fitness_at_every_stage(monkeypatch):
    """One generation, one stage keeping 1: the next parent is the best of the children and the parent."""
    target = np.array([1, -1, 0, 0])
    best, fits = _search_with_fitness(monkeypatch, target, generations=1, stages="8:1")
    assert fits[0] <= float((target ** 2).sum())


def test_sparse_kl_is_kl_teacher_to_student_on_the_teacher_support():
    """Mean over tokens of KL(teacher ‖ student) with both renormalised on the teacher's top-k support."""
    g = torch.Generator().manual_seed(0)
    vocab, k, tokens = 10, 4, 3
    logits_t = torch.randn(tokens, vocab, generator=g) * 3
    logits_s = torch.randn(tokens, vocab, generator=g) * 3
    top = torch.topk(logits_t, k, dim=-1)
    got = tyr.sparse_kl(top.values, top.indices, logits_s)
    p = torch.softmax(top.values, -1)  # teacher on its support
    q = torch.softmax(logits_s.gather(-1, top.indices), -1)  # student renormalised there
    want = (p * (p.log() - q.log())).sum(-1).mean()
    reverse = (q * (q.log() - p.log())).sum(-1).mean()
    assert abs(float(want - reverse)) > 1e-3  # the case tells the two directions apart
    assert torch.allclose(got, want, atol=1e-5)
    # student mass outside the support does not count
    moved = logits_s.clone()
    outside = torch.ones_like(moved, dtype=torch.bool).scatter_(-1, top.indices, False)
    moved[outside] += 5.0
    assert torch.allclose(tyr.sparse_kl(top.values, top.indices, moved), want, atol=1e-5)


def test_propagated_weight_is_the_density_weighted_mean_of_the_levels():
    """``Σ_e d_e W_e / Σ_e d_e`` with d_e the kept fraction of level e (zero-filled pruned copies)."""
    g = torch.Generator().manual_seed(0)
    in_f, out_f = 4, 3
    levels = {}
    for k, units in zip((-1, 0, 1), (1, 2, 4)):
        keep = torch.arange(units)
        levels[k] = local.Level(units, keep, torch.randn(out_f, units, generator=g))
    sub = tyr.Sublayer(0, "mlp", centre=2, step=1, lo=-1, hi=1, levels=levels)
    filled = {k: torch.zeros(out_f, in_f).index_copy_(1, lv.keep, lv.weight) for k, lv in levels.items()}
    d = {k: lv.units / in_f for k, lv in levels.items()}
    want = sum(d[k] * filled[k] for k in levels) / sum(d.values())
    got = tyr._propagated(levels, sub, in_f, 1, "expectation")
    assert torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(tyr._propagated(levels, sub, in_f, 1, "centre"), filled[0])


def test_tyr_halves_the_mlp_step_each_iteration(monkeypatch):
    """"Each further iteration rebuilds the supernet around the best distribution with the MLP step halved"."""
    seen = []
    real = tyr.build_supernet

    def spy(model, batches, dims, subs, **kw):
        seen.append(sorted({s.step for s in subs if s.kind == "mlp"}))
        return real(model, batches, dims, subs, **kw)

    monkeypatch.setattr(tyr, "build_supernet", spy)
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, num_key_value_heads=2,
                                         max_position_embeddings=256)).eval()
    ids = torch.randint(0, 128, (2, 8), generator=torch.Generator().manual_seed(0))
    tyr.prune_tyr(model, ids, ratio=0.3, structure="neurons", progress=False, iterations=2, generations=0,
                  final="supernet", mlp_step=0.125, neuron_step=16)
    assert seen == [[8], [4]]  # 12.5% of 64 neurons, then 6.25%


def test_damping_is_relative_to_the_mean_diagonal():
    """``H + damp * mean(diag H) I``: so pruning does not depend on the scale of the calibration statistic."""
    x = correlated_inputs(64, 6, 0).float()
    h = x.T @ x
    for c in (1e-4, 1.0, 1e4):
        hd = local.damped(c * h, 0.1)
        want = c * h + 0.1 * float(torch.diagonal(c * h).mean()) * torch.eye(6)
        assert torch.allclose(hd, want, rtol=1e-5, atol=1e-5 * c)
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(1))
    small = local.prune_path(w, 1e-4 * h, unit_size=1, levels=[6, 4, 2], damp=0.05)
    big = local.prune_path(w, 1e4 * h, unit_size=1, levels=[6, 4, 2], damp=0.05)
    for k in (6, 4, 2):
        assert torch.equal(small[k].keep, big[k].keep)
        assert torch.allclose(small[k].weight, big[k].weight, rtol=1e-3, atol=1e-4)


def test_obs_removal_downdates_the_inverse_to_the_kept_columns():
    """After `_remove`: H^-1 is the inverse of H restricted to the kept columns (zero elsewhere) and W is the
    least-squares refit of the kept columns (the Schur complement / OBS update of the module docstring)."""
    x = correlated_inputs(200, 6, 2)
    h = x.T @ x
    w = torch.randn(3, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    hinv = torch.linalg.inv(h)
    cur = w.clone()
    local._remove(cur, hinv, torch.tensor([1, 4]))
    keep = torch.tensor([0, 2, 3, 5])
    want_inv = torch.zeros_like(h)
    want_inv[keep[:, None], keep[None, :]] = torch.linalg.inv(h[keep][:, keep])
    assert torch.allclose(hinv, want_inv, atol=1e-8 * float(want_inv.abs().max()))
    want_w = torch.zeros_like(w)
    want_w[:, keep] = torch.linalg.solve(h[keep][:, keep], (h @ w.T)[keep]).T
    assert torch.allclose(cur, want_w, atol=1e-8)
    # a second removal on the downdated state is again exact
    local._remove(cur, hinv, torch.tensor([2]))
    keep2 = torch.tensor([0, 3, 5])
    want_w2 = torch.zeros_like(w)
    want_w2[:, keep2] = torch.linalg.solve(h[keep2][:, keep2], (h @ w.T)[keep2]).T
    assert torch.allclose(cur, want_w2, atol=1e-8)


def test_each_greedy_round_removes_the_unit_of_least_exact_error():
    """Every round of `prune_path` (one unit per round) removes the unit whose removal, with the others refit,
    raises the error least: the saliency is exact given the earlier removals (brute force agrees)."""
    for seed in range(12):
        x = correlated_inputs(100, 7, seed)
        h = (x.T @ x).float()
        w = torch.randn(3, 7, generator=torch.Generator().manual_seed(100 + seed))
        path = local.prune_path(w, h, unit_size=1, levels=[7, 6, 5, 4], damp=0.0)
        hd = h.double()
        keep = list(range(7))
        for target in (6, 5, 4):
            errs = {u: refit_error(w.double(), hd, [j for j in keep if j != u]) for u in keep}
            gone = min(errs, key=errs.get)
            keep = [j for j in keep if j != gone]
            assert path[target].keep.tolist() == keep, f"seed {seed}, level {target}"


@pytest.mark.parametrize("uniform", [True, False])
def test_load_refuses_nan_weights_and_takes_a_folder_without_tokenizer(uniform, tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    mlp = model.model.layers[0].mlp
    if not uniform:  # layer 0 narrower than the others: the per-layer-widths path
        from prunekit.structured.units import shrink_mlp
        shrink_mlp(mlp, torch.arange(mlp.gate_proj.out_features - 8))
    out = prunekit.save_structured(model, None, tmp_path / "m", metadata={})
    assert ("prunekit_layer_widths" in json.loads((out / "config.json").read_text())) != uniform
    loaded, tok = prunekit.load(out)  # no tokenizer saved: None, not an error
    assert tok is None
    assert [w.intermediate for w in layer_widths(loaded)] == [w.intermediate for w in layer_widths(model)]
    weights = next(out.glob("*.safetensors"))
    state = load_file(str(weights))
    state[next(k for k in state if "layers.0.mlp.up_proj" in k)][0, 0] = float("nan")
    save_file(state, str(weights), metadata={"format": "pt"})
    with pytest.raises(InputError, match="NaN or Inf"):  # loaded NaN and all through either path
        prunekit.load(out)
    broken, _ = prunekit.load(out, check_finite=False)  # to inspect it, as load_model allows
    assert any(torch.isnan(p).any() for p in broken.parameters())


def test_cli_tyr_holds_out_fitness_windows_as_the_api_does(model_dir, text_file, tmp_path):
    """The CLI passed its ids with no held-out rows, so the search scored on the supernet's own windows: the same
    flags gave another model than the Python API."""
    from prunekit.cli import main

    opts = {"generations": 2, "offspring": 3, "stages": "32:2,64:1", "iterations": 1}
    out = tmp_path / "tyr"
    assert main(["prune", str(model_dir), "--method", "tyr", "--ratio", "0.3", "--structure", "neurons", "--calib",
                 str(text_file), "--samples", "4", "--seqlen", "32", *[a for k, v in opts.items()
                                                                       for a in ("--option", f"{k}={v}")],
                 "--no-speed", "--out", str(out), "--quiet"]) == 0
    meta = json.loads((out / "prunekit.json").read_text())
    model, tok = prunekit.load_model(model_dir)
    result = prunekit.prune_structured(model, method="tyr", ratio=0.3, structure="neurons", tokenizer=tok,
                                       calibration=str(text_file), samples=4, seqlen=32, progress=False, **opts)
    assert result.info["options"]["fitness_samples"] == 4 == meta["info"]["options"]["fitness_samples"]
    assert meta["widths"] == result.to_dict()["widths"]
    cli_model, _ = prunekit.load(out)
    ids = tok("the quick brown fox", return_tensors="pt")["input_ids"]
    with torch.no_grad():
        assert torch.equal(cli_model(ids).logits, model(ids).logits)


def test_cli_says_why_uniform_widths_need_prunekit_load(tmp_path, tok, capsys):
    """3 of 4 heads on hidden size 64 in every layer: saved in the per-layer format (transformers refuses a hidden
    size the head count does not divide), and the CLI said "its widths differ per layer"."""
    from prunekit.cli import main

    folder = tmp_path / "kv1"
    tiny(layers=2, heads=4, kv=1).save_pretrained(folder)
    tok.save_pretrained(folder)
    out = tmp_path / "out"
    assert main(["prune", str(folder), "--method", "magnitude-structured", "--structure", "heads", "--ratio",
                 "0.05", "--no-speed", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    meta = json.loads((out / "prunekit.json").read_text())
    heads = {w["heads"] for w in meta["widths"]}
    assert heads == {3}, meta["widths"]
    assert "load with prunekit.load: transformers refuses a hidden size its head count does not divide" in printed


def test_an_unknown_structured_option_lists_the_options_as_option_names(model_dir, tmp_path, capsys):
    """The list said batch_size, which the command line rewrote to --batch-size, a flag it refuses for these."""
    from prunekit.cli import main

    assert main(["prune", str(model_dir), "--method", "uniform-structured", "--ratio", "0.3", "--option", "foo=1",
                 "--out", str(tmp_path / "never")]) == 2
    err = capsys.readouterr().err
    assert "(its options: batch_size=, damp=, neuron_step=)" in err and "--batch-size" not in err


@pytest.mark.parametrize("kind", ["gemma2", "gemma3_text", "qwen2_swa"])
def test_calibration_batches_advance_through_blocks_with_their_own_masks_and_rope(kind):
    # Týr and the structured baselines fed every block the first block's mask and RoPE tables; on these models the
    # blocks were calibrated on activations the model never produces
    from conftest import char_tokenizer, ids_from_text, tiny_model

    model = tiny_model(kind)
    ids = ids_from_text(char_tokenizer(), 6, 32)
    batches = tyr._calibration_batches(model, ids, 4)
    with torch.no_grad():
        for block in tyr.find_blocks(model)[1]:
            tyr.advance(block, batches)
        torch.testing.assert_close(model.model.norm(torch.cat([h for h, _ in batches])),
                                   model.model(input_ids=ids, use_cache=False).last_hidden_state)


def test_a_per_head_q_norm_keeps_the_rows_of_the_kept_heads(tmp_path):
    """Cohere's qk-norm (``use_qk_norm``: one weight row per head) was refused as "normalises all heads together"
    (OLMo2's is over all heads at once). Each kept head keeps its own row: removing a head equals zeroing its
    o_proj columns, and the saved model reloads with identical logits (uniform widths in plain transformers,
    Týr's per-layer widths through prunekit.load)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model("cohere", vocab_size=128, hidden_size=64, intermediate_size=128,
                                  num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                  max_position_embeddings=128, use_qk_norm=True, eos_token_id=None)
    torch.manual_seed(0)
    dense = AutoModelForCausalLM.from_config(config).eval()
    with torch.no_grad():  # rows that differ, so a wrong row changes the output
        for layer in dense.model.layers:
            layer.self_attn.q_norm.weight.copy_(1 + torch.randn(layer.self_attn.q_norm.weight.shape))
            layer.self_attn.k_norm.weight.copy_(1 + torch.randn(layer.self_attn.k_norm.weight.shape))
    assert tuple(dense.model.layers[0].self_attn.q_norm.weight.shape) == (4, 16)
    ids = calib(2, 16, seed=3)
    model = copy.deepcopy(dense)
    prunekit.prune_structured(model, method="magnitude-structured", ratio=0.1, structure="heads", progress=False)
    zeroed = copy.deepcopy(dense)
    for block, pruned in zip(zeroed.model.layers, model.model.layers):
        attn = block.self_attn
        keep = kept_rows(pruned.self_attn.q_proj.weight, attn.q_proj.weight, 16)
        assert len(keep) == 2 and torch.equal(pruned.self_attn.q_norm.weight, attn.q_norm.weight[keep])
        with torch.no_grad():
            for h in set(range(4)) - set(keep):
                attn.o_proj.weight[:, h * 16:(h + 1) * 16] = 0
    with torch.no_grad():
        assert torch.allclose(model(ids).logits, zeroed(ids).logits, atol=1e-5)
        out = prunekit.save_structured(model, None, tmp_path / "uniform", metadata={})
        plain = AutoModelForCausalLM.from_pretrained(out).eval()
        assert torch.equal(plain(ids).logits, model(ids).logits)
    searched = copy.deepcopy(dense)
    prunekit.prune_structured(searched, method="tyr", ratio=0.3, structure="both", calibration=calib(), seed=1,
                              progress=False, **TYR_FAST)
    out = prunekit.save_structured(searched, None, tmp_path / "tyr", metadata={})
    reloaded, _ = prunekit.load(out)
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, searched(ids).logits)
    for block in searched.model.layers:  # what Týr installed is the dense row of each kept head
        heads = block.self_attn.q_proj.out_features // 16
        assert tuple(block.self_attn.q_norm.weight.shape) == (heads, 16)


def fused(kind: str, seed: int = 0):
    """A tiny Phi-3 (fused qkv_proj and gate_up_proj) or GLM (fused gate_up_proj only)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.for_model(kind, vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                  pad_token_id=0, bos_token_id=1, eos_token_id=1)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.mark.parametrize("kind", ["phi3", "glm"])
def test_fused_gate_up_projections_lose_both_rows_of_each_pruned_neuron(kind, tmp_path):
    """A fused gate_up_proj (Phi-3, GLM) was refused; neuron j is its rows j and intermediate + j. The pruned MLP is
    the dense one with the other neurons silenced; Phi-3's fused qkv_proj keeps its heads (--structure heads is
    refused, `both` prunes neurons only); outputs reload with identical logits."""
    from transformers import AutoModelForCausalLM

    model, x = fused(kind), torch.randn(3, 5, 64)
    dense = copy.deepcopy(model)
    result = prunekit.prune_structured(model, method="magnitude-structured", ratio=0.3, structure="both",
                                       progress=False)
    heads = 4 if kind == "phi3" else 2  # GLM's separate q/k/v lose a head per KV group, Phi-3's fused ones none
    assert [w.to_dict() for w in result.widths] == [{"heads": heads, "intermediate": result.widths[0].intermediate}] * 2
    assert result.widths[0].intermediate < 128 and abs(result.removed - 0.3) < 0.02
    for block, ref in zip(model.model.layers, dense.model.layers):
        keep = kept_rows(block.mlp.down_proj.weight.T.contiguous(), ref.mlp.down_proj.weight.T.contiguous(), 1)
        assert len(keep) == block.mlp.down_proj.in_features and keep == sorted(keep)
        gate, up = ref.mlp.gate_up_proj(x).chunk(2, dim=-1)  # [3, 5, 128] each
        silenced = torch.zeros(128)
        silenced[keep] = 1
        expected = ref.mlp.down_proj(up * ref.mlp.activation_fn(gate) * silenced)
        with torch.no_grad():
            assert torch.allclose(block.mlp(x), expected, atol=1e-6)
    out = prunekit.save_structured(model, None, tmp_path / "out", metadata={})
    plain = AutoModelForCausalLM.from_pretrained(out).eval()  # uniform widths: plain transformers loads it
    ids = calib(2, 16)
    with torch.no_grad():
        assert torch.equal(plain(ids).logits, model(ids).logits)
    searched = fused(kind)  # Týr's per-layer widths, installed and put back through its search, then reloaded
    prunekit.prune_structured(searched, method="tyr", ratio=0.15, structure="neurons", calibration=calib(),
                              progress=False, **TYR_FAST)
    reloaded, _ = prunekit.load(prunekit.save_structured(searched, None, tmp_path / "tyr", metadata={}))
    with torch.no_grad():
        assert torch.equal(reloaded(ids).logits, searched(ids).logits)
    if kind == "phi3":
        model = fused(kind)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        with pytest.raises(InputError, match="fuses q, k and v into one qkv_proj .* no head can go; use --structure "
                                             "neurons"):
            prunekit.prune_structured(model, method="magnitude-structured", ratio=0.1, structure="heads",
                                      progress=False)
        assert all(torch.equal(v, model.state_dict()[k]) for k, v in before.items())


def test_cli_says_a_fused_qkv_model_prunes_neurons_only(tmp_path, capsys):
    from conftest import char_tokenizer

    from prunekit.cli import main

    folder = tmp_path / "phi3"
    fused("phi3").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    assert main(["prune", str(folder), "--method", "magnitude-structured", "--ratio", "0.2", "--out",
                 str(tmp_path / "out"), "--no-speed", "--quiet"]) == 0
    assert "attention fuses q, k and v into one qkv_proj, split by the head count all layers share, so its heads " \
        "stay and only MLP neurons are pruned" in capsys.readouterr().err
    widths = json.loads((tmp_path / "out" / "prunekit.json").read_text())["widths"]
    assert {w["heads"] for w in widths} == {4} and all(w["intermediate"] < 128 for w in widths)


def test_a_model_pruned_twice_in_bfloat16_saves_the_rows_and_columns_it_kept_of_its_folder(tmp_path):
    """The save of a model computed in a narrower dtype gives back the stored values of what the pruning kept: each
    shrunk Linear names the rows and columns of the tensor it was loaded with, also after a second prune of the
    same model in memory (the indices compose; naming the first prune's rows would read other rows)."""
    from conftest import char_tokenizer, tiny_model
    from safetensors.torch import load_file

    folder = tmp_path / "fp32"
    tiny_model("llama").save_pretrained(folder)
    char_tokenizer().save_pretrained(folder)
    stored = load_file(folder / "model.safetensors")
    model, _ = prunekit.load_model(folder, dtype="bfloat16")
    for ratio in (0.2, 0.3):
        prunekit.prune_structured(model, method="magnitude-structured", ratio=ratio, progress=False)
    heads = model.model.layers[0].self_attn.q_proj.out_features // 16
    neurons = model.model.layers[0].mlp.down_proj.in_features
    assert heads == 2 and neurons < 100  # (4 heads of 16, 128 neurons dense): both prunes removed units
    out = prunekit.save_structured(model, None, tmp_path / "twice", metadata={}, dtype="float32",
                                   unchanged_from=folder)
    saved = load_file(out / "model.safetensors")
    for name, v in saved.items():
        dense = stored[name]
        if "q_proj" in name or "gate_proj" in name or "up_proj" in name:  # kept rows, in order
            index = [next(i for i in range(len(dense)) if torch.equal(row, dense[i])) for row in v]
            assert index == sorted(index) and len(index) == len(v), name
        elif "o_proj" in name or "down_proj" in name:  # kept columns
            index = [next(i for i in range(dense.shape[1]) if torch.equal(col, dense[:, i])) for col in v.T]
            assert index == sorted(index) and len(index) == v.shape[1], name
        else:
            assert torch.equal(v, dense), name
