"""select_examples: exact budgets, which end of the difficulty each strategy keeps, CCS strata, class balance."""

import doctest
import math
import warnings

import numpy as np
import pytest
import torch

import prunekit.select as select_mod
from prunekit.errors import InputError
from prunekit.select import select_examples


def test_docstring_examples_run():
    assert doctest.testmod(select_mod, verbose=False).failed == 0


@pytest.mark.parametrize("strategy", ["hard", "easy", "random", "ccs"])
@pytest.mark.parametrize("n,keep", [(10, 0.3), (7, 0.5), (101, 0.7), (3, 0.1), (50, 1.0), (1, 0.5), (1000, 0.123)])
def test_exact_counts(strategy, n, keep):
    d = np.random.default_rng(n).random(n)
    mask = select_examples(d, keep, strategy=strategy)
    assert mask.dtype == bool and mask.shape == (n,)
    assert mask.sum() == max(1, math.floor(keep * n + 0.5))


def test_ccs_cuts_the_floor_of_its_cutoff():
    # 10% of 15 is 1.5: one hardest example goes (floor), the rest of the budget spread over the strata
    assert np.flatnonzero(select_examples(np.arange(15.0), 0.5, strategy="ccs", seed=0)).tolist() == list(range(6, 14))


def test_hard_and_easy_keep_the_two_ends_with_stable_ties():
    d = np.array([0.5, 0.9, 0.1, 0.9, 0.3, 0.1])
    assert np.flatnonzero(select_examples(d, 0.5, strategy="hard")).tolist() == [0, 1, 3]
    assert np.flatnonzero(select_examples(d, 0.5, strategy="easy")).tolist() == [2, 4, 5]
    # ties at the cut go to the lower index
    assert np.flatnonzero(select_examples(d, 1 / 6, strategy="hard")).tolist() == [1]
    assert np.flatnonzero(select_examples(d, 1 / 6, strategy="easy")).tolist() == [2]
    assert np.flatnonzero(select_examples(torch.tensor(d), 0.5)).tolist() == [0, 1, 3]


def test_infinite_difficulty_is_hardest():
    d = np.array([1.0, np.inf, 3.0, 2.0])
    assert np.flatnonzero(select_examples(d, 0.5, strategy="hard")).tolist() == [1, 2]
    assert not select_examples(d, 0.5, strategy="easy")[1]


def test_random_is_seeded():
    d = np.zeros(200)
    a = select_examples(d, 0.3, strategy="random", seed=1)
    np.testing.assert_array_equal(a, select_examples(d, 0.3, strategy="random", seed=1))
    assert (a != select_examples(d, 0.3, strategy="random", seed=2)).any()
    hard = select_examples(np.arange(200.0), 0.3, strategy="random", seed=1)
    np.testing.assert_array_equal(hard, a)  # random ignores the scores


def test_ccs_equal_strata_get_equal_shares_and_the_hardest_are_cut():
    d = np.repeat(np.arange(5.0), 20)  # five difficulty levels, 20 examples each
    mask = select_examples(d, 0.5, strategy="ccs", ccs_bins=5, ccs_cutoff=0.0)
    assert [int(mask[d == v].sum()) for v in range(5)] == [10] * 5
    # cutting 20% removes the hardest level; 50 spread over four strata of 20: 12, 12, 13, 13 (smallest first,
    # equal sizes in stratum order)
    mask = select_examples(d, 0.5, strategy="ccs", ccs_bins=5, ccs_cutoff=0.2)
    assert [int(mask[d == v].sum()) for v in range(5)] == [12, 12, 13, 13, 0]


def test_ccs_small_strata_are_taken_whole():
    d = np.concatenate([np.linspace(0.0, 0.1, 1000), np.linspace(0.9, 1.0, 10)])  # many easy, few hard
    mask = select_examples(d, 0.1, strategy="ccs", ccs_bins=10, ccs_cutoff=0.0)
    assert mask.sum() == 101
    assert mask[1000:].all()  # the rare hard stratum: all 10 kept
    hard = select_examples(d, 0.1, strategy="hard")
    assert hard[:1000].sum() == 91  # hard keeps the top 101: the 10 hard and 91 of the top easy ones
    assert not mask[:1000][:500].all() and mask[:1000][:500].any()  # CCS also covers the easiest half


def test_ccs_drops_inf_first_and_shrinks_the_cut_when_needed():
    d = np.arange(100.0)
    d[:5] = np.inf
    mask = select_examples(d, 0.5, strategy="ccs", ccs_cutoff=0.1)
    assert not mask[:5].any() and not mask[95:].any()  # the 10 hardest: five inf, then 99..95
    mask = select_examples(d, 0.95, strategy="ccs", ccs_cutoff=0.1)
    assert mask.sum() == 95 and not mask[:5].any()  # only 5 can be cut: the five inf
    kept = select_examples(d, 0.5, strategy="ccs", ccs_cutoff=0.0, seed=4)
    assert kept.sum() == 50 and kept[:5].any()  # with no cut, inf stays as the hardest stratum
    np.testing.assert_array_equal(kept, select_examples(d, 0.5, strategy="ccs", ccs_cutoff=0.0, seed=4))


def test_ccs_strata_of_scores_spanning_float64_are_those_of_the_scores_halved():
    d = np.concatenate([np.linspace(-1.7e308, 0, 20), np.linspace(1e307, 1.7e308, 20)])  # hi - lo overflows
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was: overflow, invalid cast, and 20 kept of 32
        mask = select_examples(d, 0.8, strategy="ccs", ccs_cutoff=0.0, seed=3)
    assert mask.sum() == 32
    np.testing.assert_array_equal(mask, select_examples(d / 2, 0.8, strategy="ccs", ccs_cutoff=0.0, seed=3))


def test_balanced_splits_budget_by_class_size():
    labels = np.array([0] * 5 + [1] * 3 + [2] * 2)
    d = np.arange(10.0)
    mask = select_examples(d, 0.5, labels=labels, balanced=True)
    # exact shares 2.5, 1.5, 1.0: floors 2, 1, 1, and the one left goes to the largest remainder (tie: class 0)
    assert [int(mask[labels == c].sum()) for c in range(3)] == [3, 1, 1]
    assert np.flatnonzero(mask).tolist() == [2, 3, 4, 7, 9]  # the hardest within each class
    for strategy in ("easy", "random", "ccs"):
        rng = np.random.default_rng(0)
        labels = rng.integers(0, 4, 333)
        mask = select_examples(rng.random(333), 0.3, strategy=strategy, labels=labels, balanced=True)
        assert mask.sum() == 100
        for c in range(4):
            assert abs(mask[labels == c].sum() - 0.3 * (labels == c).sum()) < 1


def test_labels_without_balanced_are_refused_not_ignored():
    labels = np.array([0, 0, 0, 1, 1, 1])
    d = np.array([5.0, 6.0, 4.0, 1.0, 2.0, 3.0])
    assert np.flatnonzero(select_examples(d, 0.5)).tolist() == [0, 1, 2]
    with pytest.raises(InputError, match="labels are used with balanced=True only"):  # the same mask, unasked
        select_examples(d, 0.5, labels=labels)
    assert np.flatnonzero(select_examples(d, 0.5, labels=labels, balanced=True)).tolist() == [0, 1, 5]


@pytest.mark.parametrize("kwargs,match", [
    ({"keep": 0.0}, "keep"),
    ({"keep": 1.5}, "keep"),
    ({"keep": float("nan")}, "keep"),
    ({"keep": True}, "keep"),
    ({"keep": "0.5"}, "keep"),
    ({"strategy": "middle"}, "strategy"),
    ({"balanced": True}, "labels"),
    ({"labels": [0, 1]}, "labels"),
    ({"labels": [0.0, 1.0, 0.0, 1.0]}, "labels"),
    ({"ccs_bins": 0}, "ccs_bins"),
    ({"ccs_cutoff": 1.0}, "ccs_cutoff"),
    ({"seed": -1}, "seed"),
    ({"difficulty": [1.0, float("nan"), 0.0, 0.0]}, "NaN"),
    ({"difficulty": [1.0, -float("inf"), 0.0, 0.0]}, "-inf"),
    ({"difficulty": []}, "non-empty"),
    ({"difficulty": [[1.0, 2.0]]}, "1-D"),
    ({"difficulty": ["a", "b"]}, "numbers"),
])
def test_bad_inputs_raise_input_error(kwargs, match):
    args = {"difficulty": [0.1, 0.2, 0.3, 0.4], "keep": 0.5, **kwargs}
    with pytest.raises(InputError, match=match):
        select_examples(args.pop("difficulty"), args.pop("keep"), **args)


def test_class_groups_are_each_class_indices_in_order():
    from prunekit.select import class_groups

    y = np.random.default_rng(0).integers(-3, 40, 5000)
    y[y == 7] = 8  # a class absent from the middle of the range
    groups = class_groups(y)
    assert len(groups) == len(np.unique(y))
    for c, g in zip(np.unique(y), groups):
        assert np.array_equal(g, np.flatnonzero(y == c))
