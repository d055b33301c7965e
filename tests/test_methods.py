"""The three baselines on a planted layer whose inputs are strongly correlated (so the OBS update matters)."""

import pytest
import torch

from prunekit.select import NM
from prunekit.weights import stats
from prunekit.weights.methods import magnitude, sparsegpt, wanda


def planted(seed=0, d_in=64, d_out=32, tokens=2048):
    g = torch.Generator().manual_seed(seed)
    latent = torch.randn(tokens, 8, generator=g)
    mix = torch.randn(8, d_in, generator=g)
    scale = torch.logspace(-1, 1, d_in)  # features of very different size: |W| alone misleads
    x = (latent @ mix + 0.1 * torch.randn(tokens, d_in, generator=g)) * scale  # [tokens, d_in]
    w = torch.randn(d_out, d_in, generator=g)
    return w, x.reshape(16, tokens // 16, d_in)


def rel_error(w, w_new, x):
    x = x.reshape(-1, x.shape[-1])
    return float((x @ (w - w_new).T).norm() / (x @ w.T).norm())


def run_all(w, x, pattern, ratio=0.5):
    norms, hess = stats.ColumnNorms(w.shape[1]), stats.Hessian(w.shape[1])
    for batch in x.split(4):  # accumulate in batches: the running means must equal one big batch
        norms.add(batch)
        hess.add(batch)
    return {
        "magnitude": magnitude.prune_weight(w, None, ratio=ratio, pattern=pattern),
        "wanda": wanda.prune_weight(w, norms.value(), ratio=ratio, pattern=pattern),
        "sparsegpt": sparsegpt.prune_weight(w, hess.value(), ratio=ratio, pattern=pattern),
    }


@pytest.mark.parametrize("pattern", [None, NM(2, 4), NM(4, 8)])
def test_error_order_sparsegpt_wanda_magnitude(pattern):
    w, x = planted()
    out = run_all(w, x, pattern)
    err = {k: rel_error(w, v, x) for k, v in out.items()}
    assert err["sparsegpt"] < err["wanda"] < err["magnitude"], err


@pytest.mark.parametrize("pattern", [None, NM(2, 4), NM(1, 4)])
def test_exact_counts_and_patterns(pattern):
    w, x = planted(seed=1)
    ratio = pattern.ratio if pattern else 0.6
    out = run_all(w, x, pattern, ratio)
    rows, cols = w.shape
    for name, pruned in out.items():
        zeros = pruned == 0
        if pattern:
            nonzero = (~zeros).reshape(rows, cols // pattern.m, pattern.m).sum(-1)
            assert (nonzero <= pattern.n).all(), name
            assert int(zeros.sum()) == rows * cols * pattern.zeros // pattern.m, name
        elif name == "wanda":
            assert (zeros.sum(1) == int(cols * ratio)).all()  # per output row
        elif name == "magnitude":
            assert int(zeros.sum()) == int(rows * cols * ratio)  # per layer
        else:  # sparsegpt: per 128-column block (here one block)
            assert int(zeros.sum()) == int(rows * cols * ratio)


@pytest.mark.parametrize("blocksize", [32, 30, 8])
def test_sparsegpt_nm_does_not_depend_on_the_block_size(blocksize):
    """Lazy batch updates are exact: column i has every earlier column's update when its group is chosen, so N:M
    SparseGPT in blocks of 32 equals one 128-column block (a planted 64-input layer is one block, so the update
    between blocks went untested). 30 is rounded down to 28 so that no group of 4 straddles two blocks."""
    w, x = planted(d_in=128)
    hess = stats.Hessian(128)
    for batch in x.split(4):
        hess.add(batch)
    h = hess.value()
    one = sparsegpt.prune_weight(w, h, ratio=0.5, pattern=NM(2, 4), blocksize=128)
    blocked = sparsegpt.prune_weight(w, h, ratio=0.5, pattern=NM(2, 4), blocksize=blocksize)
    assert torch.equal(one != 0, blocked != 0)
    torch.testing.assert_close(blocked, one, rtol=1e-4, atol=1e-4)
    assert rel_error(w, blocked, x) < rel_error(w, w * (blocked != 0), x)  # the update did lower the error


def test_stats_match_direct_computation():
    w, x = planted(seed=2)
    flat = x.reshape(-1, x.shape[-1])
    norms, hess = stats.ColumnNorms(flat.shape[1]), stats.Hessian(flat.shape[1])
    for batch in x.split(3):
        norms.add(batch)
        hess.add(batch)
    n_seq = x.shape[0]
    torch.testing.assert_close(norms.value(), flat.square().sum(0) / n_seq, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(hess.value(), 2 * flat.T @ flat / n_seq, rtol=1e-4, atol=1e-3)


def test_column_norms_sum_every_row_chunk():
    g = torch.Generator().manual_seed(4)
    x = torch.randn(3, 3000, 40, generator=g) * 3 + 1  # 9000 tokens per add: two full chunks and a partial one
    acc = stats.ColumnNorms(40)
    acc.add(x)
    acc.add(x[:1])
    want = (2 * x.double().square().sum((0, 1)) - x[1:].double().square().sum((0, 1))) / 4  # mean over 4 sequences
    torch.testing.assert_close(acc.value().double(), want, rtol=1e-6, atol=0)


def test_wanda_mask_is_weight_times_input_norm():
    w, x = planted(seed=3)
    flat = x.reshape(-1, x.shape[-1])
    pruned = wanda.prune_weight(w, flat.square().sum(0), ratio=0.5, pattern=None)
    score = w.abs() * flat.norm(dim=0)
    for row_s, row_p in zip(score, pruned):
        removed, kept = row_s[row_p == 0], row_s[row_p != 0]
        assert removed.max() <= kept.min()
    assert torch.equal(pruned[pruned != 0], w[pruned != 0])  # Wanda does not update kept weights


def test_sparsegpt_update_beats_masking_and_respects_least_squares_bound():
    w, x = planted(seed=4)
    flat = x.reshape(-1, x.shape[-1]).double()
    h = stats.Hessian(flat.shape[1])
    h.add(x)
    pruned = sparsegpt.prune_weight(w, h.value(), ratio=0.5, pattern=NM(2, 4))
    keep = pruned != 0
    # least squares over each row's kept weights is the best any update could do with this mask
    target = flat @ w.double().T
    best = torch.zeros_like(w, dtype=torch.float64)
    for r in range(w.shape[0]):
        cols = keep[r].nonzero().squeeze(1)
        best[r, cols] = torch.linalg.lstsq(flat[:, cols], target[:, r:r + 1]).solution.squeeze(1)
    opt = float((flat @ (w.double() - best).T).norm() / target.norm())
    got = rel_error(w, pruned, x)
    masked_only = rel_error(w, w * keep, x)
    # the column-by-column OBS update only moves error onto later columns, so it is not the joint optimum
    # for its mask (on this low-rank input far from it), but it must beat plain masking
    assert opt <= got < masked_only, (opt, got, masked_only)


def test_sparsegpt_dead_inputs_and_singular_hessian():
    w, x = planted(seed=5)
    x = x.clone()
    x[..., 3] = 0  # an input that never fires: its column is zeroed
    h = stats.Hessian(x.shape[-1])
    h.add(x)
    hv = h.value() - 0.01 * torch.diag(h.value()).mean() * torch.eye(x.shape[-1])  # not positive definite
    hv[3, :] = 0
    hv[:, 3] = 0
    with pytest.warns(UserWarning, match="damping raised"):
        pruned = sparsegpt.prune_weight(w, hv, ratio=0.5, pattern=None, percdamp=0.001)
    assert torch.isfinite(pruned).all()
    assert (pruned[:, 3] == 0).all()


def test_wide_hessian_accumulates_the_upper_triangle_exactly():
    g = torch.Generator().manual_seed(7)
    x = torch.randn(6, 50, 1100, generator=g)  # d_in >= Hessian.WIDE: banded path
    acc = stats.Hessian(1100)
    assert acc.upper_only
    for batch in x.split(4):
        acc.add(batch)
    flat = x.reshape(-1, 1100)
    torch.testing.assert_close(acc.value(), 2 * flat.T @ flat / 6, rtol=1e-4, atol=1e-3)


def test_sparsegpt_damping_grows_from_zero_and_a_dead_hessian_is_an_input_error():
    # percdamp=0 stayed 0 through every tenfold retry, then a RuntimeError traceback
    import warnings

    from prunekit.errors import InputError
    from prunekit.weights.methods.sparsegpt import inverse_cholesky

    x = torch.randn(3, 8, dtype=torch.float64)
    h = x.T @ x  # rank 3 of 8: singular without damping
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        upper = inverse_cholesky(h, 0.0)
    assert any("damping raised to 0.1" in str(w.message) for w in caught)
    damped = h + 0.1 * torch.diag(h).mean() * torch.eye(8, dtype=torch.float64)
    assert torch.allclose(upper.T @ upper, torch.linalg.inv(damped), atol=1e-8)
    with pytest.raises(InputError, match="stays singular"):
        inverse_cholesky(torch.zeros(8, 8), 0.01)  # no signal at all: no damping helps


def test_every_modules_docstring_examples_run_or_are_marked_skipped():
    """A ">>> # doctest: +SKIP" line of its own made doctest collection raise in four modules; the examples that
    run must give what they show."""
    import doctest
    import importlib
    import pkgutil

    import prunekit

    failed = {}
    for info in pkgutil.walk_packages(prunekit.__path__, "prunekit."):
        module = importlib.import_module(info.name)
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE, report=False)
        if result.failed:
            failed[info.name] = result.failed
    assert not failed


def test_prune_takes_numpy_options_and_records_them_as_numbers(llama, tok):
    import json

    import numpy as np

    import prunekit
    from conftest import ids_from_text

    result = prunekit.prune(llama, method="sparsegpt", ratio=0.5, calibration=ids_from_text(tok, 4, 32),
                            progress=False, blocksize=np.int64(16), percdamp=np.float32(0.01))
    assert result.options["blocksize"] == 16 and type(result.options["blocksize"]) is int
    json.dumps(result.to_dict())  # np.int64 in the options made save_pruned fail after the work
