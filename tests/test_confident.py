"""Confident Learning against cleanlab 2.9 itself: every filter, the matrices, the rankings, on planted noise."""

from __future__ import annotations

import warnings

import numpy as np
import pytest

from prunekit.data.methods import confident as cl
from prunekit.errors import InputError

cleanlab = pytest.importorskip("cleanlab")
from cleanlab.benchmarking.noise_generation import generate_noise_matrix_from_trace, generate_noisy_labels  # noqa: E402
from cleanlab.count import compute_confident_joint, estimate_py_and_noise_matrices_from_probabilities, num_label_issues  # noqa: E402
from cleanlab.filter import find_label_issues  # noqa: E402
from cleanlab.rank import get_label_quality_scores  # noqa: E402


def planted(n: int, k: int, seed: int, *, sharp: float = 2.5, trace: float = 0.7, dtype=np.float32, coarse: bool = False):
    """Noisy labels from cleanlab's own generator (a known noise matrix) and softmax scores of a noisy
    classifier of the true labels. `coarse` rounds the probabilities so that many values tie."""
    rng = np.random.default_rng(seed)
    true = rng.integers(0, k, n)
    prior = np.bincount(true, minlength=k) / n
    noise = generate_noise_matrix_from_trace(k, trace * k, py=prior, valid_noise_matrix=True, seed=seed)
    given = generate_noisy_labels(true, noise)
    logits = rng.normal(size=(n, k))
    logits[np.arange(n), true] += sharp
    probs = np.exp(logits)
    probs /= probs.sum(1, keepdims=True)
    if coarse:
        probs = np.round(probs, 1) + 1e-3
        probs /= probs.sum(1, keepdims=True)
    return given, probs.astype(dtype)


def cleanlab_mask(labels, probs, **kw):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return find_label_issues(labels, probs, n_jobs=1, **kw)


SETTINGS = [(n, k, seed) for seed in range(4) for n, k in ((400, 3), (1500, 6), (3000, 12))]


@pytest.mark.parametrize("n,k,seed", SETTINGS)
@pytest.mark.parametrize("coarse", [False, True], ids=["smooth", "ties"])
def test_every_filter_matches_cleanlab(n, k, seed, coarse):
    labels, probs = planted(n, k, seed, coarse=coarse, dtype=np.float64 if coarse and seed % 2 else np.float32)
    for mode in cl.FILTERS:
        ours = cl.find_label_issues(labels, probs, filter_by=mode)
        theirs = cleanlab_mask(labels, probs, filter_by=mode)
        assert ours.dtype == bool and np.array_equal(ours, theirs), (mode, int((ours != theirs).sum()))
    assert labels.sum() == planted(n, k, seed, coarse=coarse)[0].sum()  # inputs untouched


@pytest.mark.parametrize("n,k,seed", SETTINGS[::2])
def test_options_match_cleanlab(n, k, seed):
    labels, probs = planted(n, k, seed, coarse=True)
    for kw in ({"frac_noise": 0.5}, {"min_examples_per_class": 40}, {"num_to_remove_per_class": np.full(k, 3)}):
        for mode in ("prune_by_noise_rate", "prune_by_class", "both"):
            assert np.array_equal(cl.find_label_issues(labels, probs, filter_by=mode, **kw),
                                  cleanlab_mask(labels, probs, filter_by=mode, **kw)), (mode, kw)
    joint = cl.compute_confident_joint(labels, probs) + np.eye(k, dtype=int)  # a user-supplied joint
    assert np.array_equal(cl.find_label_issues(labels, probs, confident_joint=joint),
                          cleanlab_mask(labels, probs, confident_joint=joint))


@pytest.mark.parametrize("n,k,seed", SETTINGS)
def test_matrices_and_counts_match_cleanlab(n, k, seed):
    labels, probs = planted(n, k, seed)
    assert np.array_equal(cl.compute_confident_joint(labels, probs), compute_confident_joint(labels, probs))
    assert np.array_equal(cl.compute_confident_joint(labels, probs, calibrate=False),
                          compute_confident_joint(labels, probs, calibrate=False))
    py, noise, inverse, joint = estimate_py_and_noise_matrices_from_probabilities(labels, probs)
    est = cl.estimate_noise(labels, probs)
    for ours, theirs in ((est.prior, py), (est.noise_matrix, noise), (est.inverse_noise_matrix, inverse), (est.confident_joint, joint)):
        assert np.array_equal(ours, theirs)
    for method in ("off_diagonal", "off_diagonal_calibrated"):
        assert cl.num_label_issues(labels, probs, estimation_method=method) == num_label_issues(labels, probs, estimation_method=method)


@pytest.mark.parametrize("n,k,seed", SETTINGS)
def test_rankings_match_cleanlab(n, k, seed):
    labels, probs = planted(n, k, seed, coarse=seed % 2 == 1)
    for rank in cl.RANKINGS:
        assert np.array_equal(cl.label_quality_scores(labels, probs, method=rank),
                              get_label_quality_scores(labels, probs, method=rank))
        for mode in ("prune_by_noise_rate", "confident_learning"):
            assert np.array_equal(cl.find_label_issues(labels, probs, filter_by=mode, return_indices_ranked_by=rank),
                                  cleanlab_mask(labels, probs, filter_by=mode, return_indices_ranked_by=rank)), (rank, mode)


def test_planted_noise_is_found():
    labels, probs = planted(4000, 5, 0, sharp=4.0)
    rng = np.random.default_rng(0)
    true = rng.integers(0, 5, 4000)  # planted() draws the true labels first from the same seed
    wrong = labels != true
    found = cl.find_label_issues(labels, probs)
    precision = (found & wrong).sum() / found.sum()
    recall = (found & wrong).sum() / wrong.sum()
    assert precision > 0.9 and recall > 0.8, (precision, recall)


def test_memmap_input_is_read_in_place(tmp_path):
    labels, probs = planted(3000, 12, 1)
    path = tmp_path / "probs.npy"
    np.save(path, probs)
    before = path.read_bytes()
    mapped = np.load(path, mmap_mode="r")
    for mode in cl.FILTERS:
        assert np.array_equal(cl.find_label_issues(labels, mapped, filter_by=mode), cleanlab_mask(labels, probs, filter_by=mode))
    assert path.read_bytes() == before


def test_missing_class_is_an_error_unless_allowed():
    labels, probs = planted(600, 4, 2)
    labels = np.where(labels == 3, 0, labels)
    with pytest.raises(InputError, match=r"class\(es\) \[3\] have no examples"):
        cl.find_label_issues(labels, probs)
    assert np.array_equal(cl.find_label_issues(labels, probs, allow_missing_classes=True), cleanlab_mask(labels, probs))


@pytest.mark.parametrize(
    "labels,probs,match",
    [
        ([0, 1, 2], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], r"labels must lie in \[0, 2\)"),
        ([0, -1, 1], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], r"labels must lie in \[0, 2\)"),
        ([0, 1, 1], [[0.5, 0.6], [0.2, 0.8], [0.9, 0.1]], "must sum to 1"),
        ([0, 1, 1], [[np.nan, 0.5], [0.2, 0.8], [0.9, 0.1]], "NaN"),
        ([0, 1, 1], [[1.5, -0.5], [0.2, 0.8], [0.9, 0.1]], r"lie in \[0, 1\]"),
        ([0, 1], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], "2 entries but pred_probs has 3 rows"),
        ([0, 1, 1], [0.5, 0.2, 0.9], "2-D"),
        ([0.5, 1, 1], [[0.5, 0.5], [0.2, 0.8], [0.9, 0.1]], "integer class indices"),
        ([], np.zeros((0, 2)), "no rows"),
    ],
)
def test_bad_input(labels, probs, match):
    probs = np.asarray(probs, dtype=np.float64)
    with pytest.raises(InputError, match=match):
        cl.find_label_issues(np.asarray(labels), probs)


def test_bad_options():
    labels, probs = planted(300, 3, 0)
    with pytest.raises(InputError, match="unknown filter_by"):
        cl.find_label_issues(labels, probs, filter_by="prune_by_magic")
    with pytest.raises(InputError, match="unknown return_indices_ranked_by"):
        cl.find_label_issues(labels, probs, return_indices_ranked_by="loss")
    with pytest.raises(InputError, match="frac_noise"):
        cl.find_label_issues(labels, probs, frac_noise=1.5)
    with pytest.raises(InputError, match="num_to_remove_per_class works with"):
        cl.find_label_issues(labels, probs, filter_by="confident_learning", num_to_remove_per_class=[1, 1, 1])


@pytest.mark.parametrize("kw,match", [
    ({"num_to_remove_per_class": [-5, 0, 0]}, "num_to_remove_per_class must hold counts"),
    ({"num_to_remove_per_class": [np.nan, 0, 0]}, "num_to_remove_per_class must hold counts"),
    ({"num_to_remove_per_class": [1.5, 0, 0]}, "num_to_remove_per_class must hold counts"),
    ({"num_to_remove_per_class": ["a", "b", "c"]}, "num_to_remove_per_class must hold counts"),
    ({"num_to_remove_per_class": [1, 1]}, r"num_to_remove_per_class must have shape \[3\]"),
    ({"confident_joint": -np.ones((3, 3))}, "confident_joint must hold counts"),
    ({"confident_joint": np.full((3, 3), np.nan)}, "confident_joint must hold counts"),
    ({"confident_joint": np.eye(3) * 0.5}, "confident_joint must hold counts"),
    ({"confident_joint": np.eye(2)}, r"confident_joint must have shape \[3, 3\]"),
    ({"frac_noise": None}, "frac_noise"), ({"frac_noise": "abc"}, "frac_noise"), ({"frac_noise": True}, "frac_noise"),
    ({"min_examples_per_class": None}, "min_examples_per_class"),
    ({"min_examples_per_class": 1.5}, "min_examples_per_class"),
])
def test_bad_option_values(kw, match):
    labels, probs = planted(60, 3, 0)
    with pytest.raises(InputError, match=match):
        cl.find_label_issues(labels, probs, **kw)


def test_bad_thresholds_and_issues():
    labels, probs = planted(60, 3, 0)
    for thresholds in ([0.5], [np.nan] * 3, "abc"):
        with pytest.raises(InputError, match="thresholds must be 3 finite numbers"):
            cl.compute_confident_joint(labels, probs, thresholds=thresholds)
    for issues in (np.full(60, np.nan), np.array(["False"] * 60), [0, 60], np.zeros((2, 30), int)):
        with pytest.raises(InputError, match="issues"):
            cl.order_label_issues(issues, labels, probs)


def test_option_values_cleanlab_accepts():
    """numpy scalars and counts above a class's size (cleanlab removes all it can) are taken, as cleanlab does;
    integer `issues` are indices, as cleanlab reads them."""
    labels, probs = planted(60, 3, 0)
    for kw in ({"frac_noise": np.float32(0.5)}, {"min_examples_per_class": np.int64(2)},
               {"num_to_remove_per_class": [100, 100, 100]}, {"num_to_remove_per_class": np.array([2.0, 1.0, 0.0])}):
        assert np.array_equal(cl.find_label_issues(labels, probs, **kw), cleanlab_mask(labels, probs, **kw))
    thresholds = cl.confident_thresholds(labels, probs)
    assert np.array_equal(cl.compute_confident_joint(labels, probs, thresholds=list(thresholds)),
                          compute_confident_joint(labels, probs, thresholds=thresholds))
    ranked = cl.order_label_issues(cl.find_label_issues(labels, probs), labels, probs)
    assert np.array_equal(cl.order_label_issues(ranked[::-1].copy(), labels, probs), ranked)


def test_a_class_count_whose_joint_would_not_fit_is_refused_up_front():
    """40,000 columns (a 1.3 MB file) asked for a 12 GB joint, then a MemoryError traceback."""
    probs = np.full((4, cl.MAX_CLASSES + 1), 1 / (cl.MAX_CLASSES + 1), dtype=np.float32)
    with pytest.raises(InputError, match=r"pred_probs has 16,385 columns: Confident Learning counts a 16,385 x 16,385"):
        cl.find_label_issues(np.array([0, 1, 2, 3]), probs)


def test_a_min_examples_per_class_past_int64_gives_cleanlabs_answer_at_a_large_value():
    labels, probs = planted(400, 4, 0, coarse=True)
    for mode in ("prune_by_noise_rate", "prune_by_class", "both"):
        theirs = cleanlab_mask(labels, probs, filter_by=mode, min_examples_per_class=10**12)
        with warnings.catch_warnings():
            warnings.simplefilter("error")  # was an OverflowError, or a RuntimeWarning from an int64 cast
            for huge in (400 * 4, 10**12, 2**63 - 1, 10**30):
                ours = cl.find_label_issues(labels, probs, filter_by=mode, min_examples_per_class=huge)
                assert np.array_equal(ours, theirs), (mode, huge)


def test_long_double_probabilities_score_and_rank_by_entropy_as_float64():
    labels, probs = planted(300, 3, 1)
    wide = probs.astype(np.float64).astype(np.longdouble)  # scipy's xlogy has no kernel for it: was a TypeError
    ours = cl.label_quality_scores(labels, wide, method="confidence_weighted_entropy")
    assert ours.dtype == np.longdouble
    np.testing.assert_allclose(ours.astype(np.float64), cl.label_quality_scores(
        labels, probs.astype(np.float64), method="confidence_weighted_entropy"), rtol=1e-12)
    issues = cl.find_label_issues(labels, wide)
    assert np.array_equal(cl.order_label_issues(issues, labels, wide, rank_by="confidence_weighted_entropy"),
                          cl.order_label_issues(issues, labels, probs.astype(np.float64),
                                                rank_by="confidence_weighted_entropy"))
