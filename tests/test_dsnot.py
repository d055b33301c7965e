"""DSnoT on planted layers: exact ratio and N:M kept, reconstruction error never above the base's."""

import pytest
import torch

import prunekit
from prunekit.select import NM
from prunekit.weights import stats
from prunekit.weights.methods import dsnot, sparsegpt

from conftest import ids_from_text, tiny_model
from test_methods import planted, rel_error


def layer_stats(x, d_in):
    acc = stats.make("hessian+moments", d_in)
    for batch in x.split(4):
        acc.add(batch)
    return acc.value()


def biased_inputs(seed=0):
    # inputs with nonzero means, so pruning shifts each row's expected output and DSnoT has work to do
    w, x = planted(seed)
    g = torch.Generator().manual_seed(seed + 1)
    return w, x + 2.0 * torch.rand(x.shape[-1], generator=g)


def test_moments_match_reference_definitions():
    _, x = biased_inputs()
    m = layer_stats(x, x.shape[-1])["moments"]
    assert torch.allclose(m.sums, x.sum(dim=1).mean(dim=0), rtol=1e-4, atol=1e-3)
    assert torch.allclose(m.var, x.var(dim=1, unbiased=False).mean(dim=0), rtol=1e-4)
    assert torch.allclose(m.norms, x.square().sum(dim=1).mean(dim=0), rtol=1e-4)


@pytest.mark.parametrize("base", dsnot.BASES)
@pytest.mark.parametrize("pattern,ratio", [(None, 0.5), (None, 0.6), (NM(2, 4), 0.5), (NM(4, 8), 0.5)])
def test_never_worse_than_base_and_keeps_budget(base, pattern, ratio):
    w, x = biased_inputs()
    s = layer_stats(x, w.shape[1])
    base_w = dsnot._base(w, s, base, ratio, pattern, 0.01)
    out = dsnot.prune_weight(w, s, ratio=ratio, pattern=pattern, base=base, update_threshold=0.0, obs_update=False)
    assert out.info["swaps"] > 0  # it did change the mask
    assert rel_error(w, out.weight, x) <= rel_error(w, base_w, x) + 1e-6
    assert out.info["error_refined"] <= out.info["error_base"]
    # every row keeps its count of nonzeros, so the layer keeps the base's exact sparsity and pattern
    assert torch.equal((out.weight != 0).sum(1), (base_w != 0).sum(1))
    if pattern is not None:
        groups = (out.weight != 0).reshape(w.shape[0], -1, pattern.m).sum(-1)
        assert int(groups.max()) <= pattern.n
    # weights are either 0, their base value, or (regrown) their dense value
    ok = (out.weight == 0) | (out.weight == base_w) | (out.weight == w)
    assert bool(ok.all())


@pytest.mark.parametrize("base,kept", [("magnitude", [1, 3]), ("wanda", [2, 3])])
def test_nm_swap_prunes_the_kept_weight_of_lowest_base_score_in_the_group(base, kept):
    """One 2:4 group where |W| and the Wanda score disagree on the weaker kept weight: as in the reference's
    N:M branch (its ``initial_metric``), a magnitude base gives up the smallest |W|, a Wanda base the lowest
    |W| sqrt(n) (prunekit used the Wanda score for every base)."""
    w = torch.tensor([[1.0, 2.0, 3.0, 4.0]])
    norms = torch.tensor([100.0, 100.0, 100.0, 1.0])  # Wanda: 10, 20, 30, 4; magnitude: 1, 2, 3, 4
    m = stats.InputMoments(norms, torch.ones(4), torch.ones(4))
    base_kept = {"magnitude": [2, 3], "wanda": [1, 2]}[base]
    assert dsnot._base(w, {"moments": m}, base, None, NM(2, 4), 0.01).nonzero()[:, 1].tolist() == base_kept
    out = dsnot.prune_weight(w, {"moments": m}, ratio=0.5, pattern=NM(2, 4), base=base, guard=False,
                             max_cycle_time=1, update_threshold=0.0, threshold_seqlen=None)
    assert out.info["swaps"] == 1
    assert out.weight.nonzero()[:, 1].tolist() == kept


@pytest.mark.parametrize("pattern,ratio", [(None, 0.6), (NM(2, 4), 0.5)])
def test_sparsegpt_base_recomputes_the_obs_update_for_the_final_mask(pattern, ratio):
    w, x = biased_inputs()
    s = layer_stats(x, w.shape[1])
    base_w = dsnot._base(w, s, "sparsegpt", ratio, pattern, 0.01)
    # SparseGPT's sweep with its own mask fixed is SparseGPT's result, bit for bit
    assert torch.equal(sparsegpt.prune_weight(w, s["hessian"], ratio=0.0, pattern=None, mask=base_w != 0), base_w)
    kw = dict(ratio=ratio, pattern=pattern, base="sparsegpt", update_threshold=0.0)
    plain = dsnot.prune_weight(w, s, obs_update=False, **kw)
    solved = dsnot.prune_weight(w, s, obs_update=True, **kw)
    assert torch.equal(solved.weight != 0, plain.weight != 0)  # the same mask ...
    assert solved.info["rows_resolved"] > 0
    # ... with each row's error at most that of the dense-value regrowth, and of the base
    assert rel_error(w, solved.weight, x) < rel_error(w, plain.weight, x)
    assert solved.info["error_refined"] <= plain.info["error_refined"] <= plain.info["error_base"]
    redo = sparsegpt.prune_weight(w, s["hessian"], ratio=0.0, pattern=None, mask=plain.weight != 0)
    rows = [r for r in range(w.shape[0]) if not torch.equal(solved.weight[r], plain.weight[r])]
    assert rows and all(torch.equal(solved.weight[r], redo[r]) for r in rows)


def test_unguarded_reference_swaps_reduce_expected_shift():
    w, x = biased_inputs()
    s = layer_stats(x, w.shape[1])
    mu = s["moments"].sums
    base_w = dsnot._base(w, s, "wanda", 0.5, None, 0.01)
    out = dsnot.prune_weight(w, {"moments": s["moments"]}, ratio=0.5, pattern=None, guard=False, update_threshold=0.0)
    shift = lambda v: ((w - v) * mu).sum(1).abs().sum()  # noqa: E731
    assert out.info["swaps"] > 0
    assert shift(out.weight) < shift(base_w)


def test_mlp_refined_by_default_and_skipped_like_the_reference_on_request():
    w, x = biased_inputs()
    s = layer_stats(x, w.shape[1])
    base_w = dsnot._base(w, s, "wanda", 0.5, None, 0.01)
    skipped = dsnot.prune_weight(w, s, ratio=0.5, pattern=None, name="model.layers.0.mlp.up_proj", skip_mlp=True,
                                 update_threshold=0.0)
    assert torch.equal(skipped.weight, base_w) and skipped.info["skipped"]
    done = dsnot.prune_weight(w, s, ratio=0.5, pattern=None, name="model.layers.0.mlp.up_proj", update_threshold=0.0)
    assert not torch.equal(done.weight, base_w) and not done.info["skipped"]


def test_bad_options_are_refused():
    w, x = biased_inputs()
    s = layer_stats(x, w.shape[1])
    with pytest.raises(prunekit.InputError, match="base"):
        dsnot.prune_weight(w, s, ratio=0.5, pattern=None, base="obs")
    with pytest.raises(prunekit.InputError, match="max_cycle_time"):
        dsnot.prune_weight(w, s, ratio=0.5, pattern=None, max_cycle_time=-1)


@pytest.mark.parametrize("base", ["sparsegpt", "wanda"])
def test_on_a_tiny_model_through_the_api(llama, tok, base):
    ids = ids_from_text(tok, 8, 64)
    alone = prunekit.prune(tiny_model("llama"), method=base, ratio=0.6, calibration=ids, progress=False)
    res = prunekit.prune(llama, method="dsnot", ratio=0.6, calibration=ids, base=base, skip_mlp=False,
                         update_threshold=0.0, progress=False)
    assert [r.sparsity for r in res.layers] == [r.sparsity for r in alone.layers]
    assert abs(res.total_sparsity - 0.6) < 0.01
    assert sum(r.info["swaps"] for r in res.layers) > 0
    with pytest.raises(prunekit.InputError, match="no option"):
        prunekit.prune(llama, method="dsnot", ratio=0.5, calibration=ids, cycles=3, progress=False)


def test_threshold_is_rescaled_to_the_calibration_length():
    # update_threshold is in 2048-token units (the reference's sequences): with T-token sequences the rows stop at
    # update_threshold * T / 2048, exactly what threshold_seqlen=None with that smaller threshold does
    w, x = biased_inputs()
    s = layer_stats(x, x.shape[-1])
    tokens = x.shape[1]
    assert s["moments"].tokens == tokens
    scaled = dsnot.prune_weight(w, s, ratio=0.5, pattern=None, guard=False, update_threshold=3.0)
    direct = dsnot.prune_weight(w, s, ratio=0.5, pattern=None, guard=False, update_threshold=3.0 * tokens / 2048,
                                threshold_seqlen=None)
    unscaled = dsnot.prune_weight(w, s, ratio=0.5, pattern=None, guard=False, update_threshold=3.0,
                                  threshold_seqlen=None)
    assert torch.equal(scaled.weight, direct.weight)
    assert scaled.info["swaps"] > unscaled.info["swaps"]  # a lower effective threshold keeps rows swapping longer
    with pytest.raises(prunekit.InputError, match="threshold_seqlen"):
        dsnot.prune_weight(w, s, ratio=0.5, pattern=None, threshold_seqlen=0)
