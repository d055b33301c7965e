import math

import pytest
import torch

from prunekit.errors import InputError
from prunekit.select import NM, check_ratio, keep_global, keep_n_m, keep_per_row, parse_pattern, ratio_for


@pytest.mark.parametrize("text,n,m", [("2:4", 2, 4), ("4:8", 4, 8), (" 1 : 4 ", 1, 4)])
def test_parse_pattern_counts_nonzeros_kept(text, n, m):
    nm = parse_pattern(text)
    assert (nm.n, nm.m) == (n, m)
    assert nm.zeros == m - n  # the reference repos' prune_n
    assert nm.ratio == pytest.approx((m - n) / m)


@pytest.mark.parametrize("bad", ["5:4", "2:0", "0:4", "4:4", "2-4", "a:b", "2:4:8", "", "3:999999999999999999999"])
def test_parse_pattern_rejects(bad):
    if bad == "":
        assert parse_pattern(bad) is None
        return
    with pytest.raises(InputError, match="pattern"):
        parse_pattern(bad)


@pytest.mark.parametrize("bad", [-0.1, 1.0, 1.5, math.nan, math.inf, "0.5", True, None])
def test_check_ratio_rejects(bad):
    with pytest.raises(InputError, match="ratio"):
        check_ratio(bad)


def test_ratio_for_pattern_fixes_ratio():
    assert ratio_for(None, NM(2, 4)) == 0.5
    assert ratio_for(0.5, NM(2, 4)) == 0.5
    assert ratio_for(0.3, None) == 0.3
    with pytest.raises(InputError, match="disagrees"):
        ratio_for(0.7, NM(2, 4))
    with pytest.raises(InputError):
        ratio_for(None, None)


def test_the_count_removed_is_rounded_down():
    """int(cols * ratio), as Wanda's reference: 0.7 of 64 removes 44 per row (not round(44.8) = 45), and
    keep_global likewise over the whole tensor."""
    scores = torch.rand(3, 64, generator=torch.Generator().manual_seed(0))
    assert (~keep_per_row(scores, 0.7)).sum(1).tolist() == [44, 44, 44]
    assert int((~keep_global(scores[:2], 0.7)).sum()) == 89  # int(128 * 0.7) = int(89.6)


def test_keep_per_row_exact_and_stable():
    scores = torch.rand(7, 33)
    keep = keep_per_row(scores, 0.4)
    assert (keep.sum(1) == 33 - int(33 * 0.4)).all()
    # the removed ones are the lowest of their row
    for row, k in zip(scores, keep):
        assert row[~k].max() <= row[k].min()
    # ties: stable, earlier indices go first
    assert keep_per_row(torch.ones(1, 4), 0.5).tolist() == [[False, False, True, True]]


def test_keep_global_and_n_m():
    scores = torch.rand(6, 16)
    assert int((~keep_global(scores, 0.3)).sum()) == int(96 * 0.3)
    keep = keep_n_m(scores, NM(2, 4))
    assert (keep.reshape(6, 4, 4).sum(-1) == 2).all()
    g = scores.reshape(6, 4, 4)
    k = keep.reshape(6, 4, 4)
    assert (torch.where(k, g, torch.inf).amin(-1) >= torch.where(k, -torch.inf, g).amax(-1)).all()
    with pytest.raises(InputError, match="divisible"):
        keep_n_m(torch.rand(2, 6), NM(2, 4))


def test_ties_at_the_cut_follow_the_stable_rule_and_fast_path_matches_sort():
    scores = torch.tensor([[1.0, 0.5, 0.5, 0.5, 2.0, 0.1], [3.0, 2.0, 1.0, 0.0, 5.0, 4.0]])
    keep = keep_per_row(scores, 0.5)  # row 0: 0.1 then the first two 0.5s go; row 1: no tie
    assert keep.tolist() == [[True, False, False, True, True, False], [True, False, False, False, True, True]]
    x = torch.randn(64, 96)
    x[::3, ::5] = 0.0  # many exact ties
    k = int(96 * 0.4)
    ref = torch.ones_like(x, dtype=torch.bool).scatter_(-1, torch.sort(x, dim=-1, stable=True).indices[:, :k], False)
    assert torch.equal(keep_per_row(x, 0.4), ref)
    # in N:M groups too: equal scores keep the later ones
    assert keep_n_m(torch.ones(2, 8), NM(1, 4)).tolist() == [[False, False, False, True] * 2] * 2
    # and over a whole layer (1-D), where the quantized weights of a real checkpoint tie a lot
    flat = torch.tensor([0.5, 0.1, 0.5, 0.5, 0.9, 0.5])
    assert keep_global(flat, 0.5).tolist() == [False, False, False, True, True, True]
    x = torch.randint(0, 4, (40, 30)).float()
    ref = torch.ones(1200, dtype=torch.bool).scatter_(0, torch.sort(x.flatten(), stable=True).indices[:600], False)
    assert torch.equal(keep_global(x, 0.5), ref.reshape(40, 30))


@pytest.mark.parametrize("pattern", [NM(5, 4), NM(0, 4), NM(1, 0), NM(4, 4), "5:4", "unstructured"])
def test_keep_n_m_checks_its_pattern(pattern):
    with pytest.raises(InputError, match="pattern"):
        keep_n_m(torch.tensor([[3.0, 1.0, 2.0, 0.0]]), pattern)


def test_keep_n_m_takes_a_pattern_string():
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0]])
    assert torch.equal(keep_n_m(scores, "2:4"), keep_n_m(scores, NM(2, 4)))


NAN_ROW = [[float("nan"), 1.0, 2.0, 0.0]]


@pytest.mark.parametrize("select", [keep_per_row, keep_global, lambda s, r: keep_n_m(s, NM(2, 4))])
@pytest.mark.parametrize("scores,match", [
    (torch.tensor(NAN_ROW), "NaN"), (torch.zeros(2, 0), "at least one entry"),
    (torch.tensor(1.0), "at least one entry"),
    (NAN_ROW, "torch.Tensor"), ([[3.0, 1.0, 2.0, 0.0]], "torch.Tensor"), (torch.tensor([[1 + 1j, 2, 3, 4]]), "real"),
])
def test_selectors_refuse_scores_no_mask_can_come_from(select, scores, match):
    with pytest.raises(InputError, match=match):
        select(scores, 0.5)
