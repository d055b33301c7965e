"""Voting over sampled reasoning paths (SC, PC, RPC), ECE, the Weibull mixture fit, the paths file, the CLI
and the sampler on a tiny random Llama."""

from __future__ import annotations

import json
import math
import sys
import warnings

import numpy as np
import pytest
import torch

from conftest import char_tokenizer, tiny_model
from prunekit.cli import main
from prunekit.errors import InputError
from prunekit.inference import reasoning as R
from prunekit.inference.sampling import build_prompt, extract_answer, sample_paths, sample_question


def _lp(p: float, tokens: int = 5) -> list[float]:
    """Token log-probs whose mean gives path probability p."""
    return [math.log(p)] * tokens


# ---------------------------------------------------------------- voting rules on hand-made path sets


def test_sc_and_pc_disagree():
    # three weak paths say 7, two confident ones say 9
    answers = ["7", "7", "7", "9", "9"]
    logprobs = [_lp(0.1), _lp(0.12), _lp(0.08), _lp(0.9), _lp(0.8)]
    sc = R.self_consistency(answers)
    pc = R.perplexity_consistency(answers, logprobs)
    assert sc.answer == 7.0 and sc.confidence == pytest.approx(0.6)
    assert pc.answer == 9.0 and pc.confidence == pytest.approx(1.7 / 2.0)
    assert sc.credit("7") == 1.0 and pc.credit("7") == 0.0 and pc.credit(" 9.0 ") == 1.0


def test_pc_counts_a_repeated_path_once():
    answers, texts = ["4", "4", "5"], ["2+2=4", "2+2=4", "it is 5"]
    logprobs = [_lp(0.5), _lp(0.5), _lp(0.8)]
    assert R.perplexity_consistency(answers, logprobs).answer == 4.0  # 1.0 vs 0.8 without texts
    v = R.perplexity_consistency(answers, logprobs, texts=texts)  # 0.5 vs 0.8: the copy counts once
    assert v.answer == 5.0 and v.scores[4.0] == pytest.approx(0.5 / 1.3)


def test_ties_share_credit_and_missing_answers_vote():
    v = R.self_consistency(["3", "8"])
    assert sorted(v.winners) == [3.0, 8.0] and v.credit("8") == 0.5 and v.confidence == 0.5
    v = R.self_consistency([None, None, "2"])
    assert v.answer is None and v.credit("2") == 0.0 and v.credit(None) == 0.0


def _flip_case(seed: int = 0):
    """30 low-probability paths answer 5, 8 high-probability ones answer 6: the low ones outweigh the high
    ones in PC by count, pruning removes them."""
    rng = np.random.default_rng(seed)
    low = rng.uniform(0.25, 0.35, 30)
    high = rng.uniform(0.85, 0.95, 8)
    answers = ["5"] * 30 + ["6"] * 8
    logprobs = [_lp(p) for p in np.concatenate([low, high])]
    return answers, logprobs, low, high


def test_reasoning_pruning_removes_low_paths_and_flips_the_vote():
    answers, logprobs, low, high = _flip_case()
    assert low.sum() > high.sum()
    assert R.self_consistency(answers).answer == 5.0
    assert R.perplexity_consistency(answers, logprobs).answer == 5.0
    v = R.rpc(answers, logprobs)
    assert v.answer == 6.0 and v.confidence == pytest.approx(1.0)
    assert not v.keep[:30].any() and v.keep[30:].all()  # exactly the low cluster went
    assert R.vote(answers, logprobs, method="rpc").answer == 6.0


def test_pruning_needs_both_conditions():
    # one cluster, no outliers: whatever the fit says, paths at or above the mean stay
    p = np.full(10, 0.6)
    assert R.reasoning_prune(p).all()
    p = np.array([0.9, 0.91, 0.92, 0.89, 0.9, 0.05])
    keep = R.reasoning_prune(p)
    assert keep[:5].all() and not keep[5]  # below the mean and in the low component
    assert keep[p >= p.mean()].all()
    # a path the low component explains but above the mean stays (the guard changed nothing in the case above)
    p = np.array([0.534, 0.729, 0.871, 0.532, 0.411])
    low = R.fit_weibull_mixture(p).posterior_high(p) < 0.5
    assert low[1] and p[1] > p.mean()
    assert R.reasoning_prune(p).tolist() == [False, True, True, False, False]


def test_vote_validates():
    with pytest.raises(InputError, match="method"):
        R.vote(["1"], [[-0.1]], method="majority")
    with pytest.raises(InputError, match="log-probs"):
        R.vote(["1"], None, method="pc")
    with pytest.raises(InputError, match="positive"):
        R.perplexity_consistency(["1"], [[0.5]])
    with pytest.raises(InputError, match="NaN"):
        R.rpc(["1", "2"], [[-0.1], [float("nan")]])
    with pytest.raises(InputError, match="one of each"):
        R.perplexity_consistency(["1", "2"], [[-0.1]])
    with pytest.raises(InputError, match="at least one"):
        R.self_consistency([])


@pytest.mark.parametrize("call,match", [
    (lambda: R.reasoning_prune([-5.0, 0.5, 0.6, 0.7]), r"in \[0, 1\]"),
    (lambda: R.reasoning_prune([5.0, 0.5, 0.6, 0.7]), r"in \[0, 1\]"),
    (lambda: R.reasoning_prune([float("nan"), 0.5, 0.6]), r"in \[0, 1\]"),
    (lambda: R.reasoning_prune([[0.1, 0.2], [0.3, 0.4]]), "1-D"),
    (lambda: R.reasoning_prune([]), "1-D"),
    (lambda: R.path_probabilities([[False]]), "real numbers"),
    (lambda: R.path_probabilities([[[-1.0, -2.0]], [[-1.0]]]), "flat list"),
    (lambda: R.path_probabilities([[-1 + 1j]]), "real numbers"),
    (lambda: R.path_probabilities([[-1.0, [-2.0]]]), "real numbers"),
    (lambda: R.path_probabilities({"a": [-1.0]}), "one sequence"),
    (lambda: R.fit_weibull_mixture([0.1, 0.2, 0.5, 0.9], init=(np.nan, 1, 1, 1.5, 2)), "init"),
    (lambda: R.fit_weibull_mixture([0.1, 0.2, 0.5, 0.9], init=None), "init"),
    (lambda: R.fit_weibull_mixture([0.1, 0.2, 0.5, 0.9], w_bounds=0.5), "w_bounds"),
    (lambda: R.expected_calibration_error([], []), "no confidences"),
    (lambda: R.expected_calibration_error([0.5, 0.9], [1, 0], bins=True), "bins"),
    (lambda: R.self_consistency({"a": 1}), "answers must be a list"),
    (lambda: R.self_consistency("abc"), "answers must be a list"),
    (lambda: R.perplexity_consistency(["1", "2"], [[-1.0], [-1.0]], texts=5), "texts must be a list"),
    (lambda: R.load_paths(None), "file path"),
    (lambda: R.evaluate(None, method="sc"), "records must be a list"),
    (lambda: R.evaluate("paths.jsonl", method="sc"), "records must be a list"),
])
def test_bad_values_are_refused(call, match):
    with pytest.raises(InputError, match=match):
        call()


def test_numpy_values_and_underflowed_probabilities_are_taken():
    p = np.array([0.9, 0.85, 0.88, 0.2, 0.1, 0.92])
    assert np.array_equal(R.reasoning_prune(p.astype(np.float32)), R.reasoning_prune(p))
    assert R.reasoning_prune([0.0, 0.9, 0.85, 0.88]).shape == (4,)  # exp(-1000) underflows to 0: floored
    fit = R.fit_weibull_mixture(p, init=np.array([0.5, 1.0, 1.0, 1.5, 2.0]), w_bounds=(np.float32(0.2), 0.8))
    assert 0.2 - 1e-6 <= fit.w <= 0.8 + 1e-6
    assert R.expected_calibration_error([1.0], [1], bins=np.int64(5)) == 0.0


# ---------------------------------------------------------------- ECE


def test_ece_hand_example():
    # bins (0.9, 1]: {0.95 right, 0.91 wrong} -> acc 0.5, conf 0.93; (0.2, 0.3]: {0.3 right, 0.25 right}
    # -> acc 1, conf 0.275; (0.8, 0.9]: {0.85 wrong}
    conf = [0.95, 0.91, 0.3, 0.25, 0.85]
    corr = [1, 0, 1, 1, 0]
    expect = (2 * abs(0.5 - 0.93) + 2 * abs(1 - 0.275) + 1 * 0.85) / 5
    assert R.expected_calibration_error(conf, corr) == pytest.approx(expect)
    # weights (tied winners count 1/|ties|) and a zero confidence (in no bin, as in the reference)
    assert R.expected_calibration_error([0.5, 0.5, 0.0], [1, 0, 1], weights=[0.5, 0.5, 1]) == pytest.approx(0.0)
    assert R.expected_calibration_error([0.5, 0.0], [0, 1]) == pytest.approx(0.5)  # nor in the normaliser
    assert R.expected_calibration_error([1.0], [1]) == 0.0
    with pytest.raises(InputError):
        R.expected_calibration_error([1.2], [1])


def test_evaluate_matches_hand_votes_and_resamples():
    answers, logprobs, _, _ = _flip_case()
    q1 = {"answer": "6", "paths": [{"text": f"t{i}", "answer": a, "logprobs": lp}
                                   for i, (a, lp) in enumerate(zip(answers, logprobs))]}
    q2 = {"answer": "1", "paths": [{"text": "a", "answer": "1", "logprobs": _lp(0.9)},
                                   {"text": "b", "answer": "2", "logprobs": _lp(0.3)}] * 14}
    sc = R.evaluate([q1, q2], method="sc")
    rpc = R.evaluate([q1, q2], method="rpc")
    assert sc["accuracy"] == pytest.approx(0.25) and sc["rounds"] == 1  # q1 wrong; q2 a tie (14 vs 14)
    assert rpc["accuracy"] == pytest.approx(1.0) and rpc["ece"] < sc["ece"]
    a = R.evaluate([q1, q2], method="rpc", n=8, resamples=5, seed=3)
    b = R.evaluate([q1, q2], method="rpc", n=8, resamples=5, seed=3)
    assert a == b and a["rounds"] == 5 and a["n"] == 8
    # numpy integers are integers ("n=np.int64(8) must be an integer"), and the result stays JSON
    c = R.evaluate([q1, q2], method="rpc", n=np.int64(8), resamples=np.int32(5), seed=np.uint8(3))
    assert c == a and json.loads(json.dumps(c)) == json.loads(json.dumps(a))
    with pytest.raises(InputError, match="n <= 28"):
        R.evaluate([q1, q2], method="sc", n=29)
    # finite log-probs whose sum overflows float64 (-1e308 each) average as -1e308, not as NaN or infinite
    huge = {"answer": "1", "paths": [{"text": "a", "answer": "1", "logprobs": [-1e308, -1e308]},
                                     {"text": "b", "answer": "2", "logprobs": _lp(0.5)}]}
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # was an overflow warning, then "a NaN or infinite log-prob"
        assert R.evaluate([huge], method="pc")["accuracy"] == 0.0  # the -1e308 path has probability ~0


# ---------------------------------------------------------------- the Weibull mixture fit


@pytest.mark.parametrize("planted", [(0.4, 9.0, 0.85, 4.0, 0.4), (0.65, 14.0, 0.9, 6.0, 0.55)])
def test_weibull_fit_recovers_planted_mixture(planted):
    w, k1, l1, k2, l2 = planted
    rng = np.random.default_rng(0)
    n = 4000
    high = rng.random(n) < w
    x = np.where(high, l1 * rng.weibull(k1, n), l2 * rng.weibull(k2, n))
    fit = R.fit_weibull_mixture(x)
    assert fit.w == pytest.approx(w, abs=0.04)
    assert fit.k_high == pytest.approx(k1, rel=0.12) and fit.lam_high == pytest.approx(l1, rel=0.03)
    assert fit.k_low == pytest.approx(k2, rel=0.12) and fit.lam_low == pytest.approx(l2, rel=0.03)
    assert fit.mean("high") > fit.mean("low")
    # the reference's finite-difference L-BFGS-B lands on the same optimum
    num = R.fit_weibull_mixture(x, gradient="numeric")
    assert num.w == pytest.approx(fit.w, abs=1e-3) and num.k_high == pytest.approx(fit.k_high, rel=1e-2)
    assert num.lam_low == pytest.approx(fit.lam_low, rel=1e-3)
    # posterior: the high component explains the high cluster
    post = fit.posterior_high(x)
    assert np.mean((post > 0.5) == high) > 0.95


def test_rpc_prunes_what_the_reference_fit_prunes_on_a_few_paths():
    """Eight paths whose likelihood has several local optima: the reference's procedure (scipy L-BFGS-B with
    finite differences on the plain log-likelihood, computed here without prunekit) and `reasoning_prune`
    must drop the same paths (the exact-gradient fit stops at another optimum and drops two more)."""
    from scipy.optimize import minimize
    from scipy.special import gamma

    p = np.array([0.422248, 0.426539, 0.551695, 0.70219, 0.551695, 0.70219, 0.614501, 0.485503])

    def pdf(x, k, lam):
        return (k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k))

    def nll(t):
        with np.errstate(all="ignore"):
            return -np.sum(np.log(t[0] * pdf(p, t[1], t[2]) + (1 - t[0]) * pdf(p, t[3], t[4])))

    w, k1, l1, k2, l2 = minimize(nll, [0.5, 1.0, 1.0, 1.5, 2.0], bounds=[(0.2, 0.8)] + [(0.01, None)] * 4).x
    if l1 * gamma(1 + 1 / k1) < l2 * gamma(1 + 1 / k2):
        w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
    reference = ~((w * pdf(p, k1, l1) < (1 - w) * pdf(p, k2, l2)) & (p < p.mean()))
    # [F, F, T, T, T, T, T, F] with numpy 2.4 / scipy 1.17; the optimum found depends on their versions, so only
    # "some pruned, some kept" is fixed here, and prunekit must find the reference's
    assert 0 < reference.sum() < len(p)
    assert R.reasoning_prune(p).tolist() == reference.tolist()
    vote = R.rpc(["1", "1", "2", "0", "2", "0", "2", "0"], np.log(p))
    kept = {a: p[reference & (np.array([1, 1, 2, 0, 2, 0, 2, 0]) == a)].sum() for a in (0, 1, 2)}
    best = max(kept, key=kept.get)  # 2 with the mask above
    assert vote.answer == best and vote.scores[best] == pytest.approx(kept[best] / sum(kept.values()))


def test_weibull_gradient_is_exact():
    from scipy.optimize import approx_fprime

    x = np.random.default_rng(1).uniform(0.2, 0.95, 30)
    for params in ([0.5, 1.0, 1.0, 1.5, 2.0], [0.3, 7.0, 0.8, 3.0, 0.4]):
        p = np.array(params)
        num = approx_fprime(p, lambda q: R._mixture_nll(q, x)[0], 1e-7)
        np.testing.assert_allclose(R._mixture_nll(p, x)[1], num, rtol=1e-4, atol=1e-3)


def test_the_numeric_fit_evaluates_the_likelihood_alone(monkeypatch):
    """The finite-difference fit (the default, the reference's) computed the analytic gradient at every
    evaluation and threw it away: half of RPC's time. Its value is the same number either way."""
    rng = np.random.default_rng(3)
    x = np.concatenate([rng.weibull(2.0, 40) * 0.8, rng.weibull(5.0, 24) * 0.3])
    for _ in range(200):
        p = np.concatenate([rng.uniform(0.2, 0.8, 1), rng.uniform(0.01, 30, 4)])
        assert R._mixture_value(p, x) == R._mixture_nll(p, x)[0]
    want = R.fit_weibull_mixture(x)
    monkeypatch.setattr(R, "_mixture_nll", lambda *a: pytest.fail("the gradient was computed"))
    assert R.fit_weibull_mixture(x) == want


def test_weibull_mixture_weight_is_bounded():
    x = np.random.default_rng(2).uniform(0.5, 0.6, 50)  # one cluster: the fit would like w -> 0 or 1
    fit = R.fit_weibull_mixture(x)
    assert 0.2 - 1e-9 <= fit.w <= 0.8 + 1e-9
    with pytest.raises(InputError):
        R.fit_weibull_mixture([0.5])
    with pytest.raises(InputError):
        R.fit_weibull_mixture([0.5, 0.0])


# ---------------------------------------------------------------- the paths file


def _write(tmp_path, lines, name="paths.jsonl"):
    p = tmp_path / name
    p.write_text("\n".join(lines) + "\n")
    return p


GOOD = [json.dumps({"question": "q1", "answer": "6", "paths": [
    {"text": "6", "answer": "6", "logprobs": [-0.1, -0.2]}, {"text": "5", "answer": "5", "logprobs": [-2.0]},
    {"text": "?", "answer": None, "logprobs": [-0.5]}]}),
    "",
    json.dumps({"answer": 2, "paths": [{"text": "2", "answer": "2.0", "logprobs": [-0.3]}]})]


def test_answers_compare_as_exact_numbers_written_in_ascii():
    same = ["5", 5, "5.0", " 5 ", "05", "+5", "5e0", 5.0]
    assert len({R.canonical_answer(a) for a in same}) == 1
    assert R.canonical_answer("1,200") == R.canonical_answer("1200") == R.canonical_answer(1200.0) == 1200
    assert R.canonical_answer("12,345.50") == R.canonical_answer("12345.5")
    assert R.canonical_answer(0.1) == R.canonical_answer("0.1")
    # floats made these equal: past 2**53, and Python's float() reads Unicode digits and underscores
    assert R.canonical_answer("12345678901234567890") != R.canonical_answer("12345678901234567891")
    assert R.canonical_answer("9007199254740993") != R.canonical_answer(9007199254740992)
    assert R.canonical_answer("\u0665") != R.canonical_answer("5") and R.canonical_answer("1_000") == "1_000"
    assert R.canonical_answer("1,2") == "1,2" and R.canonical_answer("1e99999") == "1e99999"
    assert R.canonical_answer("nan") == "nan" and R.canonical_answer(None) is None
    assert R.canonical_answer("3/4") == R.canonical_answer("0.75") == 0.75 and R.canonical_answer("-6 / 2") == -3
    assert R.canonical_answer("1/0") == "1/0" and R.canonical_answer("1.5/2") == "1.5/2"


def test_references_are_read_like_path_answers_and_a_missing_one_is_refused(tmp_path, capsys):
    line = {"answer": "1,200", "paths": [{"text": "so the answer is 1,200.", "answer": "1200", "logprobs": [-0.1]}]}
    assert R.evaluate(R.load_paths(_write(tmp_path, [json.dumps(line)])), method="sc")["accuracy"] == 1.0
    unknown = dict(line, answer=None)
    with pytest.raises(InputError, match="1 question.s. have no reference answer .* question 1, counting from 0"):
        R.evaluate(R.load_paths(_write(tmp_path, [json.dumps(line), json.dumps(unknown)])), method="sc")
    assert main(["reason", str(_write(tmp_path, GOOD)), "--method", "sc", "--resamples", "5"]) == 0
    assert "--resamples is used when --n is below the paths per question; ignored" in capsys.readouterr().err
    assert main(["reason", str(_write(tmp_path, GOOD)), "--method", "sc", "--seed", "7"]) == 0  # said nothing
    assert "--seed is used when --n is below the paths per question; ignored" in capsys.readouterr().err


def test_rpc_without_scipy_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    """It was an ImportError traceback from the CLI (sc, which needs no scipy, worked)."""
    monkeypatch.setitem(sys.modules, "scipy.optimize", None)
    paths = _write(tmp_path, GOOD)
    assert main(["reason", str(paths), "--method", "sc"]) == 0
    capsys.readouterr()
    assert main(["reason", str(paths), "--method", "rpc"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["prunekit: error: RPC's Weibull fit needs scipy: pip install 'prunekit[data]' (or scipy>=1.10)"]


def test_load_paths_reads_a_good_file(tmp_path):
    qs = R.load_paths(_write(tmp_path, GOOD))
    assert len(qs) == 2 and qs[0].question == "q1" and qs[0].answers == ["6", "5", None]
    assert R.evaluate(qs, method="pc")["accuracy"] == 1.0


@pytest.mark.parametrize("line, match", [
    ("{not json", "not valid JSON"),
    (json.dumps({"answer": "1", "paths": []}), "empty"),
    (json.dumps({"answer": "1", "paths": [{"text": "", "answer": "1", "logprobs": "-1"}]}),
     "or absent, for --method sc"),
    ('{"answer": "1", "paths": [{"text": "x", "answer": "1", "logprobs": [NaN]}]}', "NaN or infinite"),
    ('{"answer": "1", "paths": [{"text": "x", "answer": "1", "logprobs": [-Infinity]}]}', "NaN or infinite"),
    (json.dumps({"answer": "1", "paths": [{"text": "x", "answer": "1", "logprobs": [-0.1, 0.3]}]}), "positive"),
    (json.dumps({"answer": "1", "paths": [{"text": "x", "answer": "1", "logprobs": []}]}), "non-empty"),
    (json.dumps({"answer": "1", "paths": [{"text": "x", "logprobs": [-1]}]}), "no \"answer\""),
    (json.dumps([1, 2]), "JSON object"),
    # answers of other JSON types were compared by their Python text: ["1"] never matched "1", exit 0
    (json.dumps({"answer": "1", "paths": [{"text": "x", "answer": ["1"]}]}),
     r"path 0: \"answer\" must be a string, a number or null \(got list\)"),
    (json.dumps({"answer": "1", "paths": [{"text": "x", "answer": {"x": 1}}]}), r"\(got dict\)"),
    (json.dumps({"answer": "1", "paths": [{"text": "x", "answer": True}]}), r"\(got true/false\)"),
    (json.dumps({"answer": ["1"], "paths": [{"text": "x", "answer": "1"}]}), "the reference \"answer\" must be"),
])
def test_load_paths_rejects_malformed_lines(tmp_path, line, match):
    p = _write(tmp_path, [GOOD[0], line])
    with pytest.raises(InputError, match=match) as e:
        R.load_paths(p)
    assert ":2:" in str(e.value)  # names the line


# ---------------------------------------------------------------- CLI


def test_cli_votes_and_reports(tmp_path, capsys):
    p = _write(tmp_path, GOOD)
    assert main(["reason", str(p), "--method", "rpc"]) == 0
    assert "accuracy 100.00%" in capsys.readouterr().out
    assert main(["reason", str(p), "--method", "sc", "--n", "1", "--resamples", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["rounds"] == 4 and out["n"] == 1 and out["paths_available"] == 1 and 0 <= out["accuracy"] <= 1
    # questions with 3 and 1 paths, all used: it said "all 1 paths per question" and "n": 1
    assert main(["reason", str(p), "--method", "sc"]) == 0
    assert "all paths per question (1 to 3)" in capsys.readouterr().out
    assert main(["reason", str(p), "--method", "sc", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n"] is None and out["paths_per_question"] == [1, 3] and out["rounds"] == 1


def test_cli_refuses_the_other_modes_options(tmp_path, capsys):
    # they were taken and silently ignored (sampling: --json --n --resamples; voting: --temperature --samples ...)
    p = _write(tmp_path, GOOD)
    for extra, named in ((["--temperature", "0.1"], "--temperature is for sampling"),
                         (["--samples", "9", "--max-new-tokens", "3"], "--samples, --max-new-tokens are for sampling"),
                         (["--overwrite"], "--overwrite replaces an existing output: the --out of sampling")):
        assert main(["reason", str(p), "--method", "sc", *extra]) == 2
        err = capsys.readouterr().err
        assert named in err and len(err.strip().splitlines()) == 1, err
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "1+1"}) + "\n")
    out = tmp_path / "o.jsonl"
    assert main(["reason", "--model", "x", "--questions", str(qfile), "--out", str(out), "--n", "2",
                 "--resamples", "3"]) == 2
    assert "--n, --resamples are for voting over a paths file" in capsys.readouterr().err and not out.exists()


def test_cli_answers_writes_each_questions_choice_with_or_without_reference_answers(tmp_path, capsys):
    """Voting printed accuracy and ECE only: no command showed which answer was chosen, and a file of questions
    without reference answers (what sampling writes for new questions) was refused outright."""
    p = _write(tmp_path, GOOD)
    out = tmp_path / "picks.jsonl"
    assert main(["reason", str(p), "--method", "rpc", "--answers", str(out)]) == 0
    printed = capsys.readouterr().out
    picks = [json.loads(line) for line in out.read_text().splitlines()]
    assert "accuracy 100.00%" in printed and f"chosen answers (all paths voting): {out}" in printed
    want = [R.rpc(q.answers, q.logprobs, texts=q.texts) for q in R.load_paths(p)]
    assert [(d["index"], d["answer"], d["confidence"], d["kept_paths"]) for d in picks] == [
        (i, v.answer, v.confidence, int(v.keep.sum())) for i, v in enumerate(want)]
    assert [d["correct"] for d in picks] == [1.0] * len(picks) and picks[0]["question"] == "q1"
    lines = [line for line in GOOD if line]
    unknown = _write(tmp_path, [json.dumps({**json.loads(line), "answer": None}) for line in lines], name="new.jsonl")
    assert main(["reason", str(unknown), "--method", "sc"]) == 2  # accuracy needs references
    assert "--answers OUT.jsonl writes the chosen answers alone" in capsys.readouterr().err
    assert main(["reason", str(unknown), "--method", "sc", "--answers", str(out)]) == 2  # exists: not replaced
    assert "exists; pass --overwrite" in capsys.readouterr().err and "picks" not in out.read_text()
    assert main(["reason", str(unknown), "--method", "sc", "--answers", str(out), "--overwrite", "--json", "--n",
                 "1"]) == 0
    captured = capsys.readouterr()
    assert "--n is for the accuracy and ECE, which 2 question(s) without a reference answer rule out" in captured.err
    summary = json.loads(captured.out)
    assert summary["without_reference"] == len(lines) == 2 and summary["answers"] == str(out)
    picks = [json.loads(line) for line in out.read_text().splitlines()]
    assert all(d["correct"] is None and d["reference"] is None for d in picks) and picks[0]["answer"] == want[0].answer
    assert main(["reason", str(unknown), "--method", "sc", "--answers", str(unknown), "--overwrite"]) == 2
    assert "new.jsonl" in capsys.readouterr().err and json.loads(unknown.read_text().splitlines()[0])["paths"]


def test_cli_bad_input_exits_2(tmp_path, capsys):
    bad = _write(tmp_path, [GOOD[0], json.dumps({"answer": "1", "paths": []})], name="bad.jsonl")
    assert main(["reason", str(bad), "--method", "sc"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error:") and "bad.jsonl:2" in err
    assert main(["reason", str(tmp_path / "missing.jsonl"), "--method", "sc"]) == 2
    capsys.readouterr()
    assert main(["reason", str(_write(tmp_path, GOOD)), "--method", "pc", "--n", "5"]) == 2
    assert capsys.readouterr().err.count("\n") == 1
    # --n above the paths used to print first a note that every question votes over all its paths
    assert main(["reason", str(_write(tmp_path, GOOD)), "--method", "sc", "--n", "5", "--resamples", "3"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("prunekit: error: n=5 but a question has only 1 paths") and err.count("\n") == 1
    assert main(["reason", str(_write(tmp_path, GOOD))]) == 2  # no --method


def test_cli_samples_and_refuses_bad_questions(tmp_path, model_dir, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "1+1=", "answer": "2"}) + "\n" + json.dumps({"question": "3"}) + "\n")
    out = tmp_path / "paths.jsonl"
    args = ["reason", "--model", str(model_dir), "--questions", str(qfile), "--samples", "3",
            "--max-new-tokens", "6", "--out", str(out), "--quiet"]
    assert main(args) == 0
    recs = [json.loads(line) for line in out.read_text().splitlines()]
    assert [len(r["paths"]) for r in recs] == [3, 3] and recs[0]["answer"] == "2" and recs[1]["answer"] is None
    assert len(R.load_paths(out)) == 2  # what it writes, the voter reads
    assert [r["sampling"] for r in recs] == [{"model": str(model_dir), "n": 3, "max_new_tokens": 6,
                                              "temperature": 1.0, "seed": i} for i in range(2)]  # how it was drawn
    assert "1 question(s) have no \"answer\": written with answer null" in capsys.readouterr().err
    out_json = tmp_path / "paths2.jsonl"
    assert main([*args[:-3], "--out", str(out_json), "--quiet", "--json"]) == 0  # --json was ignored here
    assert json.loads(capsys.readouterr().out) == {"model": str(model_dir), "questions": 2, "paths": 6,
                                                   "out": str(out_json)}
    assert main(args) == 2  # exists, no --overwrite
    capsys.readouterr()
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"question": "ok"}) + "\n{broken\n")
    out2 = tmp_path / "new.jsonl"
    args2 = ["reason", "--model", str(model_dir), "--questions", str(bad), "--samples", "2", "--out", str(out2)]
    assert main(args2) == 2
    assert "bad.jsonl:2" in capsys.readouterr().err
    assert not out2.exists() and not list(tmp_path.glob(".new.jsonl*"))
    # --out QUESTIONS --overwrite sampled, then replaced the questions file with the paths
    before = qfile.read_text()
    assert main(["reason", "--model", str(model_dir), "--questions", str(qfile), "--samples", "2", "--out", str(qfile),
                 "--overwrite", "--quiet"]) == 2
    assert "would replace the input" in capsys.readouterr().err and qfile.read_text() == before


def test_cli_resume_continues_an_interrupted_sampling_run_to_the_same_paths(tmp_path, model_dir, capsys,
                                                                           monkeypatch):
    from prunekit.inference import sampling

    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(4)))
    base = ["reason", "--model", str(model_dir), "--questions", str(qfile), "--samples", "2", "--max-new-tokens",
            "5", "--seed", "3", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "plain.jsonl")]) == 0
    out = tmp_path / "paths.jsonl"
    real, calls = sampling.sample_question, []

    def interrupted(*a, **k):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(*a, **k)

    monkeypatch.setattr(sampling, "sample_question", interrupted)
    assert main([*base, "--out", str(out), "--resume"]) == 130
    partial = tmp_path / "paths.jsonl.partial"
    assert not out.exists() and len(partial.read_text().splitlines()) == 3  # settings + 2 questions
    assert "run the same command with --resume to continue" in capsys.readouterr().err
    assert main([*base[:-3], "--seed", "5", "--quiet", "--out", str(out), "--resume"]) == 2  # not what was sampled
    assert "was sampled with other settings" in capsys.readouterr().err
    monkeypatch.setattr(sampling, "sample_question", real)
    kept = partial.read_text()
    head, first, second = kept.splitlines()
    for damage, message in [(lambda r: r["paths"][0].update(logprobs="x"), "paths.jsonl.partial:3: path 0: "
                             "\"logprobs\" must be a non-empty list of numbers"),
                            (lambda r: r["paths"].pop(), "paths.jsonl.partial:3: 1 paths, not the 2 sampled ones"),
                            (lambda r: r["paths"][1].pop("logprobs"), "not the 2 sampled ones with their log-probs")]:
        record = json.loads(second)
        damage(record)  # the run copied such a record into its output, which `reason OUT` then refused
        partial.write_text(f"{head}\n{first}\n{json.dumps(record)}\n")
        assert main([*base, "--out", str(out), "--resume"]) == 2 and not out.exists()
        err = capsys.readouterr().err
        assert message in err and "the progress file is damaged: remove it to start again" in err, err
    partial.write_text(kept)
    assert main([*base, "--out", str(out), "--resume"]) == 0
    assert "resuming after 2 of 4 questions" in capsys.readouterr().err
    assert out.read_text() == (tmp_path / "plain.jsonl").read_text() and not partial.exists()
    assert main(["reason", str(out), "--method", "sc", "--resume"]) == 2
    # a run without --resume beside an interrupted run's progress: it sampled everything again, left the .partial
    # and .lock there, and the next --resume was refused as "OUT exists"
    partial.write_text(kept)
    assert main([*base, "--out", str(tmp_path / "again.jsonl")]) == 0  # another output: nothing in the way
    (tmp_path / "fresh.jsonl.partial").write_text(kept)
    assert main([*base, "--out", str(tmp_path / "fresh.jsonl")]) == 2
    err = capsys.readouterr().err
    assert "fresh.jsonl.partial holds the questions an interrupted --resume run sampled; add --resume" in err
    assert not (tmp_path / "fresh.jsonl").exists()
    assert main([*base, "--out", str(tmp_path / "fresh.jsonl"), "--resume"]) == 0
    assert (tmp_path / "fresh.jsonl").read_text() == out.read_text()


def test_cli_resume_writes_its_header_before_sampling_and_starts_over_from_an_empty_progress_file(
        tmp_path, model_dir, capsys, monkeypatch):
    from prunekit.inference import sampling

    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(2)))
    base = ["reason", "--model", str(model_dir), "--questions", str(qfile), "--samples", "2", "--max-new-tokens",
            "4", "--quiet", "--resume"]
    partial = tmp_path / "a.jsonl.partial"
    real, seen = sampling.sample_question, []

    def look(*a, **k):  # what a SIGKILL here (the out-of-memory killer) would leave on disk
        seen.append(partial.read_text())
        return real(*a, **k)

    monkeypatch.setattr(sampling, "sample_question", look)
    assert main([*base, "--out", str(tmp_path / "a.jsonl")]) == 0
    assert '"prunekit_partial": 1' in seen[0]  # was an empty file until the first question's record
    partial = tmp_path / "b.jsonl.partial"
    partial.write_text("")  # what such a kill left before: the next --resume refused it as not a progress file
    assert main([*base, "--out", str(tmp_path / "b.jsonl")]) == 0
    assert (tmp_path / "b.jsonl").read_text() == (tmp_path / "a.jsonl").read_text() and not partial.exists()


# ---------------------------------------------------------------- sampling


def test_extract_answer():
    assert extract_answer("3 x 4 = 12. 12 + 5 = 17. The answer is 17.") == "17"
    assert extract_answer("The answer is 3. Wait, I misread: the answer is 5.") == "5"  # the last one said
    assert extract_answer("The answer is 1,200.50 dollars, not 3") == "1200.5"
    assert extract_answer("so 4 - 9 = -5") == "-5"
    assert extract_answer("Answer: 8. Then 9 more") == "8"
    assert extract_answer("no number here") is None
    # every comma was dropped ("3,5" -> 35, "12,00" -> 1200) and an exponent cut off ("1e3" -> 1)
    assert extract_answer("The answer is 3,5.") == "3" and extract_answer("answer: 12,00") == "12"
    assert extract_answer("The answer is 1,2000") == "1" and extract_answer("3,4,5") == "5"
    assert extract_answer("The answer is 1e3.") == "1000" and extract_answer("so 2.5e-3") == "0.0025"
    assert extract_answer("The answer is 12,345,678.") == "12345678" and extract_answer("answer is 007") == "7"
    # words or a colon between "answer is" and the number: the number stated, not the last one in the text
    assert extract_answer("The answer is indeed 5. Check: 2 + 3 = 5, and 5 + 3 = 8.") == "5"
    assert extract_answer("The answer is: 12 apples, and 3 are left") == "12"
    assert extract_answer("So the answer is, therefore, 7 (not 9)") == "7"
    assert extract_answer("answer = 4, since 2 x 2 = 4 and 6 is wrong") == "4"
    assert extract_answer("The final answer is $\\boxed{42}$ after 3 steps") == "42"
    assert extract_answer("The answer is unclear; maybe 6 or 7") == "7"  # no number after it: the last number
    # a power, a worded result and a fraction after "answer is" (read 2, 2 and 1 before)
    assert extract_answer("The answer is 2^3 = 8.") == "8" and extract_answer("answer is 2**3 = 8") == "8"
    assert extract_answer("The answer is 2 + 3, which equals 5.") == "5"
    assert extract_answer("The answer is 5 x 2, that is 10") == "10"
    assert extract_answer("answer is 4 x 2 equals 8") == "8" and extract_answer("answer is 4 x 2 which is 8") == "8"
    assert extract_answer("answer is 5, which is odd") == "5"  # no arithmetic: nothing to take a result from
    assert extract_answer("The answer is 1/2.") == "0.5" and extract_answer("answer: 3 / 4 of the cake") == "0.75"
    assert extract_answer("answer is 6/2 = 3") == "3" and extract_answer("The answer is -3/4.") == "-0.75"
    assert extract_answer("The answer is 1/2 + 1/4 = 3/4.") == "0.75" and extract_answer("answer is 1/2 = 2/4") == "0.5"
    # words after the fraction, not arithmetic (a review found them cut to the numerator)
    assert extract_answer("The answer is 1/2, which is the probability of heads.") == "0.5"
    assert extract_answer("The answer is 1/2 - half the pie.") == "0.5"
    assert extract_answer("The answer is 3/4.5") == "3"  # not a fraction of whole numbers
    for text, number in (("The answer is 1.5/3", "1.5"), ("The answer is 1,000/4 each", "1000")):
        assert extract_answer(text) == number, text  # a numerator of decimals or groups: no fraction, the number
    # with no "answer is", the last number keeps a fraction whole (read 2 before); a date or a season is not one
    assert extract_answer("so the probability is 1/2.") == "0.5" and extract_answer("x = -1/2") == "-0.5"
    assert extract_answer("On 12/25/2024 we met") == "2024" and extract_answer("15 goals in 2023/2024") == "2024"
    assert extract_answer("so 1.5/3") == "3"
    from prunekit.inference.sampling import _ANSWER_IS

    for text in ("The answer is 5.0", "the answer is 1,200.50", "answer: -0", "The answer is 2.5E3"):  # as voted
        assert R.canonical_answer(extract_answer(text)) == R.canonical_answer(_ANSWER_IS.search(text).group(1)), text


def test_sampler_records_the_sampled_tokens_logprobs():
    model, tok = tiny_model("llama"), char_tokenizer()
    prompt = build_prompt(tok, "2+3=", instruction=None)
    n, steps, temp = 24, 30, 1.5
    paths = sample_question(model, tok, prompt, n=n, max_new_tokens=steps, temperature=temp, seed=7)
    assert len(paths) == n
    lengths = [len(p["tokens"]) for p in paths]
    assert all(1 <= m <= steps for m in lengths) and all(len(p["logprobs"]) == len(p["tokens"]) for p in paths)
    assert all(v <= 0 for p in paths for v in p["logprobs"])
    ended = [p for p in paths if p["tokens"][-1] == tok.eos_token_id]
    assert ended and all(len(p["tokens"]) == steps or p in ended for p in paths)  # stopped at EOS or the cap
    assert min(lengths) < steps  # and left the batch early
    # teacher-forced recomputation: the recorded log-probs are log softmax(z / T) of the sampled tokens,
    # also for paths that stayed in the batch after others left it (cache rows dropped)
    ids = tok(prompt, add_special_tokens=False)["input_ids"]
    for p in paths[:8]:
        full = torch.tensor([ids + p["tokens"]])  # [1, L + m]
        with torch.no_grad():
            logits = model(full).logits[0, len(ids) - 1 : -1]  # [m, V]
        ref = torch.log_softmax(logits / temp, -1).gather(1, torch.tensor(p["tokens"])[:, None])[:, 0]
        np.testing.assert_allclose(p["logprobs"], ref.numpy(), atol=1e-4)
    again = sample_question(model, tok, prompt, n=n, max_new_tokens=steps, temperature=temp, seed=7)
    assert [p["tokens"] for p in again] == [p["tokens"] for p in paths]
    other = sample_question(model, tok, prompt, n=n, max_new_tokens=steps, temperature=temp, seed=8)
    assert [p["tokens"] for p in other] != [p["tokens"] for p in paths]


def test_sample_paths_records_and_atomic_file(tmp_path):
    model, tok = tiny_model("llama"), char_tokenizer()
    qs = [{"question": "1+1", "answer": 2}, "5-3"]
    out = tmp_path / "p.jsonl"
    recs = sample_paths(model, tok, qs, n=4, max_new_tokens=5, seed=1, out=out, extractor=lambda t: len(t))
    assert [r["answer"] for r in recs] == ["2", None] and all(len(r["paths"]) == 4 for r in recs)
    assert all(p["answer"] == str(len(p["text"])) for r in recs for p in r["paths"])
    assert [json.loads(line) for line in out.read_text().splitlines()] == recs
    # question i's paths do not depend on the others sampled with it (resumable runs)
    alone = sample_paths(model, tok, qs[1:], n=4, max_new_tokens=5, seed=1, start=1, extractor=lambda t: len(t))
    assert alone[0] == recs[1]
    assert recs[1]["sampling"] == {"model": None, "n": 4, "max_new_tokens": 5, "temperature": 1.0,
                                   "seed": 1_000_003 + 1}  # question 1's own seed: sample_question redraws it
    redrawn = sample_question(model, tok, build_prompt(tok, "5-3"), n=4, max_new_tokens=5,
                              seed=recs[1]["sampling"]["seed"])
    assert [p["text"] for p in redrawn] == [p["text"] for p in recs[1]["paths"]]
    with pytest.raises(InputError, match="exists"):
        sample_paths(model, tok, qs, n=2, max_new_tokens=2, out=out)
    with pytest.raises(InputError, match="temperature"):
        sample_paths(model, tok, qs, n=2, temperature=0)
    with pytest.raises(InputError, match=r"0 paths per question \(--samples, n=\)"):  # "n=0" read as reason's --n
        sample_paths(model, tok, qs, n=0)
    with pytest.raises(InputError, match=r"seed=9223372036854775807 \(--seed\) is too large"):  # was a traceback
        sample_paths(model, tok, qs, n=1, seed=2**63 - 1)
    with pytest.raises(InputError, match="question 0"):
        sample_paths(model, tok, [3], n=1)


def test_cli_sampling_validates_before_loading(tmp_path, capsys):
    qfile = tmp_path / "q.jsonl"
    qfile.write_text(json.dumps({"question": "1+1"}) + "\n")
    out = tmp_path / "o.jsonl"
    base = ["reason", "--model", str(tmp_path / "no-such-model"), "--questions", str(qfile), "--out", str(out)]
    assert main(base + ["--temperature", "0"]) == 2
    assert "temperature" in capsys.readouterr().err
    assert main(base) == 2  # the model folder does not exist
    assert main(["reason", "--model", "x", "--questions", str(qfile)]) == 2  # no --out
    assert main(["reason", str(qfile), "--method", "sc", "--model", "x"]) == 2  # mixes voting and sampling
    assert not out.exists()
    # --out links into a missing folder: checked where it points (the sampling ran, then the save failed)
    link = tmp_path / "link.jsonl"
    link.symlink_to(tmp_path / "nowhere" / "paths.jsonl")
    capsys.readouterr()
    assert main(["reason", "--model", str(tmp_path / "no-such-model"), "--questions", str(qfile), "--out",
                 str(link)]) == 2
    assert "nowhere is not a folder; create it first" in capsys.readouterr().err


def test_a_second_resume_run_on_the_same_output_is_refused_and_no_lock_file_is_left(tmp_path, model_dir, capsys):
    """Two --resume runs appended to one .partial (9 records for 7 questions) and the next resume refused it."""
    import fcntl

    qfile = tmp_path / "q.jsonl"
    qfile.write_text("".join(json.dumps({"question": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(2)))
    out = tmp_path / "paths.jsonl"
    args = ["reason", "--model", str(model_dir), "--questions", str(qfile), "--samples", "2", "--max-new-tokens", "3",
            "--out", str(out), "--resume", "--quiet"]
    with open(tmp_path / "paths.jsonl.lock", "a") as held:  # another run holds it
        fcntl.flock(held, fcntl.LOCK_EX)
        assert main(args) == 2
        assert "another prunekit run is sampling into" in capsys.readouterr().err and not out.exists()
    assert main(args) == 0
    assert len(out.read_text().splitlines()) == 2 and not list(tmp_path.glob("paths.jsonl.*"))  # no lock, no partial


def test_an_output_file_that_appears_while_a_run_writes_is_kept_and_the_run_refused(tmp_path, monkeypatch):
    """Two runs into one file without --overwrite both said they saved it; the later one's rows replaced the
    earlier's (the existence check came long before the rename)."""
    from pathlib import Path

    from prunekit.data import io as data_io
    from prunekit.inference import sampling

    for name, write in (("t.csv", lambda p: data_io.write_table(p, {"index": np.arange(3)}, overwrite=False)),
                        ("p.jsonl", lambda p: sampling.write_jsonl(p, [{"a": 1}], overwrite=False))):
        target = tmp_path / name
        monkeypatch.setattr(data_io, "check_output_file", lambda p, overwrite: Path(p))  # the check passed earlier
        target.write_text("the other run's result\n")  # ... and then the other run finished first
        with pytest.raises(InputError, match="appeared while this ran") as refused:
            write(target)
        assert "--out" not in str(refused.value)  # reason --answers FILE was told to choose another --out
        assert target.read_text() == "the other run's result\n"
        assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temporary file left
        target.unlink()
        write(target)  # nothing there: written
        assert target.read_text() != "the other run's result\n"


def test_write_jsonl_writes_valid_json_lines(tmp_path):
    import json

    from prunekit.inference.sampling import write_jsonl

    out = write_jsonl(tmp_path / "p.jsonl", [{"text": "é\u2028ü", "logprobs": [float("nan"), -0.5]}])
    raw = out.read_bytes()
    assert b"NaN" not in raw and len(raw.decode("utf-8").splitlines()) == 1  # U+2028 escaped, NaN as null
    assert json.loads(raw) == {"text": "é\u2028ü", "logprobs": [None, -0.5]}


def test_answers_without_logprobs_or_reference_vote_with_sc_only(tmp_path, capsys):
    """An API that returns no log-probs: the paths file was refused whole, though self-consistency needs none."""
    from prunekit.cli import main

    lines = [json.dumps({"paths": [{"text": "a", "answer": "5"}, {"text": "b", "answer": "5"},
                                   {"text": "c", "answer": "7"}]}),
             json.dumps({"answer": "7", "paths": [{"text": "d", "answer": "7", "logprobs": [-0.1]},
                                                  {"text": "e", "answer": "3"}]})]
    path = _write(tmp_path, lines)
    chosen = R.choose(R.load_paths(path), method="sc")
    assert chosen[0]["answer"] == 5 and sorted(chosen[1]["winners"]) == [3, 7]  # a tie shares the credit
    assert chosen[0]["reference"] is None and chosen[0]["correct"] is None
    for method in ("pc", "rpc"):
        with pytest.raises(InputError, match=r'question 0 \(counting from 0\), path 0 has no "logprobs".*method sc'):
            R.choose(R.load_paths(path), method=method)
        with pytest.raises(InputError, match="has no \"logprobs\""):
            R.evaluate(R.load_paths(path), method=method)
    out = tmp_path / "answers.jsonl"
    assert main(["reason", str(path), "--method", "sc", "--answers", str(out)]) == 0
    assert [json.loads(x)["answer"] for x in out.read_text().splitlines()][0] == 5
    assert main(["reason", str(path), "--method", "rpc", "--answers", str(tmp_path / "b.jsonl")]) == 2
    assert "has no \"logprobs\"" in capsys.readouterr().err and not (tmp_path / "b.jsonl").exists()


def test_choose_writes_the_reference_as_the_answers_are_compared():
    """`"answer": 10` beside `"reference": "10"` made `.answer == .reference` false on a right answer."""
    rec = {"answer": "1,200", "paths": [{"text": "a", "answer": "1200.0"}, {"text": "b", "answer": "1200"}]}
    got = R.choose([rec], method="sc")[0]
    assert got["answer"] == got["reference"] == 1200 and got["correct"] == 1.0


def test_extract_answer_takes_the_result_of_arithmetic_after_answer_is_and_stays_linear():
    assert extract_answer("So the answer is simply 3 x 4 = 12.") == "12"
    assert extract_answer("The answer is then 2 + 3 = 5.") == "5"
    assert extract_answer("The answer is 12 - 4 = 8 apples") == "8"
    assert extract_answer("The answer is 2 + 3") == "2"  # no result stated: the number after "answer is"
    assert extract_answer("The answer is 12. Then 3 + 4 = 7 more") == "12"  # a new sentence is no arithmetic
    assert extract_answer("answer is 5 xylophones") == "5"
    # a run of whitespace after "answer is" (a degenerate sample): three overlapping quantifiers made this cubic
    assert extract_answer("The answer is" + " " * 2000 + "x") is None
    assert extract_answer("answer:" + "\n" * 2000 + "7") == "7"


def test_extract_answer_keeps_a_stated_number_its_justification_follows():
    assert extract_answer("The answer is 8 = 5 + 3.") == "8"
    assert extract_answer("The answer is 12 = 3 x 4") == "12"
    assert extract_answer("The answer is 7\n- 3 + 4 = 7\n- 2 x 3 = 6") == "7"  # the chain stops at the line's end
    assert extract_answer("The answer is 3 \\times 4 = 12") == "12" and extract_answer("answer is 3 X 4 = 12") == "12"
    assert extract_answer("The answer is 17 + 5 = 22 pencils") == "22"


def test_sampled_paths_end_at_every_end_token_the_model_generates_to():
    # a chat model whose end-of-turn id is only in generation_config.eos_token_id (the tokenizer's EOS is another)
    # ran every path on past the end of its reply: generate stops there, the sampler went on to --max-new-tokens
    model, tok = tiny_model("llama"), char_tokenizer()
    prompt = build_prompt(tok, "2+3=", instruction=None)
    first = sample_question(model, tok, prompt, n=16, max_new_tokens=30, temperature=1.5, seed=7)
    counts = {}
    for p in first:
        for t in p["tokens"][:-1]:
            counts[t] = counts.get(t, 0) + 1
    turn_end = max(counts, key=counts.get)  # a token the paths sample mid-way
    model.generation_config.eos_token_id = [tok.eos_token_id, turn_end]
    paths = sample_question(model, tok, prompt, n=16, max_new_tokens=30, temperature=1.5, seed=7)
    ends = {tok.eos_token_id, turn_end}
    assert all(not ends & set(p["tokens"][:-1]) for p in paths)  # no path runs past an end token
    assert sum(p["tokens"][-1] == turn_end for p in paths) > 0
    assert all(len(p["tokens"]) == 30 or p["tokens"][-1] in ends for p in paths)
    mine = sample_question(model, tok, prompt, n=16, max_new_tokens=30, temperature=1.5, seed=7,
                           eos_token_id=tok.eos_token_id)  # given ids replace the model's
    assert [p["tokens"] for p in mine] == [p["tokens"] for p in first]


def test_sampling_past_a_learned_position_table_is_refused_up_front():
    # GPT-2's 256 learned positions: an IndexError traceback mid-sampling
    model, tok = tiny_model("gpt2"), char_tokenizer()
    model.generation_config.eos_token_id = None  # no path ends early: every one uses all its positions
    tok.eos_token = None
    prompt = build_prompt(tok, "2+3=", instruction=None)
    length = len(tok(prompt, add_special_tokens=False)["input_ids"])
    fits = 256 - length + 1  # the last new token is never fed back
    with pytest.raises(InputError, match=rf"and the {fits} new tokens fed back come to 257 tokens, past the model's "
                                         r"256 learned positions; lower --max-new-tokens"):
        sample_question(model, tok, prompt, n=2, max_new_tokens=fits + 1, seed=0)
    paths = sample_question(model, tok, prompt, n=2, max_new_tokens=fits, seed=0)  # exactly the 256 positions
    assert [len(p["tokens"]) for p in paths] == [fits, fits]


def test_end_token_ids_may_be_numpy_or_torch_integers_and_nothing_else():
    import numpy as np

    from prunekit.inference.sampling import _ids

    assert _ids(np.int64(7)) == {7} and _ids(torch.tensor(7)) == {7} and _ids([np.int32(1), 2]) == {1, 2}
    assert _ids(np.array([3, 4])) == {3, 4} and _ids(None) == set()
    for bad in (1.5, "2", [True]):
        with pytest.raises(InputError, match="end token ids must be whole numbers"):
            _ids(bad)
