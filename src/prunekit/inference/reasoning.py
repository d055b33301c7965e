"""Answer aggregation over sampled reasoning paths: self-consistency, Perplexity Consistency and RPC.

Paper: Zhou, Tan, Li, Yao, Guo, Li, Ma, "Bridging Internal Probability and Self-Consistency for Effective and
Efficient LLM Reasoning" (arXiv 2502.00511; NeurIPS 2025 as "A Theoretical Study on Bridging Internal
Probability and Self-Consistency for LLM Reasoning", arXiv 2510.15444). Code: github.com/WNJXYK/RPC
(`compute_sc.py`, `compute_rpc.py::wpc_evaluator`, `metrics.py`).

n paths t_1..t_n are sampled for a question; path i states answer a_i = g(t_i) and has per-token log-probs
l_i1..l_iT. Its probability is the per-token geometric mean p_i = exp(mean_t l_it) (1 / perplexity).
  - Self-consistency (SC):  s(y) = #{i : a_i = y} / n.
  - Perplexity Consistency (PC, Eq. 9):  s(y) = sum over the *distinct* paths t in {t_1..t_n} with g(t) = y of
    p(t); a path sampled twice counts once.
  - Reasoning Pruning (RP) + PC = RPC: fit f(p) = w f_W(p; k1, l1) + (1 - w) f_W(p; k2, l2), with the Weibull
    density f_W(p; k, l) = (k/l)(p/l)^(k-1) exp(-(p/l)^k), to p_1..p_n by maximum likelihood (L-BFGS-B from
    (w, k1, l1, k2, l2) = (0.5, 1, 1, 1.5, 2), w in [0.2, 0.8], k, l >= 0.01); component 1 is the one with
    the larger mean l Gamma(1 + 1/k) (the "high" component). Drop path i when its posterior under the low
    component is larger, (1-w) f_W(p_i; k2, l2) > w f_W(p_i; k1, l1), AND p_i < mean(p) (the truncated-mean
    guard against a bad fit at small n). Then vote with PC over the paths kept.
  - The chosen answer is argmax_y s(y); its confidence is s(y*) / sum_y s(y). Tied winners share the credit:
    accuracy 1/|ties| for each correct tied answer, and each enters the ECE with weight 1/|ties|.
  - ECE: confidences in B = 10 bins (b/B, (b+1)/B]; ECE = sum_b (W_b / W) |acc_b - conf_b| with W_b the
    weight in bin b and acc_b, conf_b its weighted mean correctness and confidence.
Paths whose answer could not be extracted (``None``) vote like any answer (the reference's "[Invalid]"
answer) and never match the reference.

Departures from the reference code:
  - Answers are equal when their canonical forms are: numbers by value ("18" = "18.0" = " 18"), any other
    string exactly, after stripping whitespace. The reference uses its `math_equal` (LaTeX,
    fractions, sympy); a user with such answers can normalise them in the answer extractor.
  - The Weibull density is floored at 1e-300 inside the log-likelihood, so a path whose density underflows
    gives a large finite penalty instead of -log(0) = inf (which can stop L-BFGS-B with NaN steps). That
    happens for a path far in a tail, and also at trial parameters of the optimizer's line search on ordinary
    data: where the reference's objective stays finite all along, the fit is the reference's, step for step.
    In a QA check on 120 Beta-distributed sets of 8-64 path probabilities, the reference's objective turned
    inf/NaN along the search in 20 (9 ended "ABNORMAL"); the fits differed there, ours never at a lower
    likelihood, and the pruned paths differed in 1 of the 120. Path probabilities are floored at 1e-300 for the
    same reason.
  - With fewer than 2 distinct path probabilities there is nothing to fit and no path is dropped (the
    reference would fit anyway; with all p_i equal no path is below the mean, so nothing is dropped either).
  - The n-path subsets of an evaluation are drawn independently per question (the reference shuffles one
    index list per seed and uses it for every question); both are uniform subsets.
"""

from __future__ import annotations

import math
import os
import re
from collections.abc import Mapping, Set
from dataclasses import dataclass, field
from fractions import Fraction
from numbers import Integral
from pathlib import Path
from typing import Sequence

import numpy as np

from prunekit.errors import InputError, is_real
from prunekit.jsonl import read_objects

__all__ = [
    "METHODS", "Vote", "WeibullMixture", "path_probabilities", "self_consistency", "perplexity_consistency",
    "fit_weibull_mixture", "reasoning_prune", "rpc", "vote", "expected_calibration_error", "evaluate",
    "load_paths", "canonical_answer", "has_reference", "check_n", "choose",
]

METHODS = ("sc", "pc", "rpc")
ECE_BINS = 10
_TINY = 1e-300


_NUMBER_TEXT = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE]([+-]?\d+))?", re.ASCII)
_GROUPED = re.compile(r"[+-]?\d{1,3}(?:,\d{3})+(?:\.\d*)?", re.ASCII)  # 1,200 or 12,345.5
_FRACTION_TEXT = re.compile(r"([+-]?\d{1,300})\s*/\s*(\d{1,300})", re.ASCII)  # 3/4, -1 / 2


def canonical_answer(answer) -> object:
    """The form answers are compared in: a number written in ASCII digits (sign, decimals, exponent, thousands
    separators as in ``1,200``) becomes its value, an exact ``int`` when whole (``"5"``, ``5``, ``"5.0"``,
    ``"5e0"``, ``"1,200"`` and ``1200`` agree; integers past 2**53 stay exact), else a float; a fraction of
    whole numbers is its value (``"3/4"`` and ``"0.75"`` agree, ``"6/2"`` is 3); anything else (Unicode digits,
    ``1_000``, ``"1/0"``) is the stripped string; ``None`` stays ``None`` (no answer)."""
    if answer is None:
        return None
    text = repr(answer) if isinstance(answer, float) else str(answer).strip()
    fraction = _FRACTION_TEXT.fullmatch(text)
    if fraction and int(fraction.group(2)) != 0:
        value = Fraction(int(fraction.group(1)), int(fraction.group(2)))
        return int(value) if value.denominator == 1 else float(value)
    if _GROUPED.fullmatch(text):
        text = text.replace(",", "")
    match = _NUMBER_TEXT.fullmatch(text)
    if not match or (match.group(1) is not None and abs(int(match.group(1))) > 400):  # 1e999999: text
        return text
    try:
        value = Fraction(text)
    except (ValueError, ZeroDivisionError):  # past Python's int-string digit limit
        return text
    return int(value) if value.denominator == 1 else float(value)


@dataclass
class Vote:
    """The outcome of one vote: ``scores`` (normalised to sum 1, in first-seen order of the answers),
    ``winners`` (the tied top answers, canonical), ``confidence`` (the top normalised score) and ``keep``
    (which paths took part; all True except under RPC)."""

    scores: dict
    winners: list
    confidence: float
    keep: np.ndarray = field(repr=False)

    @property
    def answer(self):
        """The chosen answer (the first of tied winners)."""
        return self.winners[0]

    def credit(self, reference) -> float:
        """Accuracy credit against the reference answer: 1/|winners| if it is among the tied winners."""
        ref = canonical_answer(reference)
        if ref is None:
            return 0.0
        return sum(1.0 for w in self.winners if w == ref) / len(self.winners)


def _is_sequence(x) -> bool:
    """A list-like with a length: not a string, a mapping or a set (their items are not one per path)."""
    return hasattr(x, "__len__") and not isinstance(x, (str, bytes, Mapping, Set))


def _answers(answers: Sequence) -> list:
    if not _is_sequence(answers):
        raise InputError(f"answers must be a list with one answer per path, got {type(answers).__name__}")
    if len(answers) == 0:
        raise InputError("no paths to vote over: give at least one path")
    return [canonical_answer(a) for a in answers]


def path_probabilities(logprobs: Sequence) -> np.ndarray:
    """p_i = exp(mean of path i's token log-probs), [n]. `logprobs`: one sequence per path (each non-empty,
    finite, <= 0), or already a [n] array of *mean* log-probs (floats)."""
    if not _is_sequence(logprobs):
        raise InputError(f"logprobs must hold one sequence of token log-probs per path, got {type(logprobs).__name__}"
                         " (sc needs none; pc and rpc do)")
    if len(logprobs) == 0:
        raise InputError("no paths: give at least one path's log-probs")
    means = []
    for i, lp in enumerate(logprobs):
        try:
            given = np.asarray(lp)
        except ValueError:  # a ragged nesting
            given = np.asarray(lp, dtype=object)
        if given.ndim > 1 or given.dtype == bool or given.dtype.kind not in "iuf":
            raise InputError(f"path {i}'s log-probs must be a flat list of real numbers (or one mean log-prob), "
                             f"got {'shape ' + str(list(given.shape)) if given.ndim > 1 else given.dtype}")
        arr = given.astype(np.float64).reshape(-1)  # [T_i], or [1] for a mean
        if arr.size == 0:
            raise InputError(f"path {i} has no token log-probs; every path needs at least one token")
        if not np.all(np.isfinite(arr)):
            raise InputError(f"path {i} has a NaN or infinite log-prob; resample it or drop the path")
        if np.any(arr > 1e-6):
            raise InputError(f"path {i} has a positive log-prob ({arr.max():g}); log-probs must be <= 0 "
                             "(did you pass probabilities or negative log-likelihoods?)")
        means.append(min(_mean_logprob(arr), 0.0))
    return np.maximum(np.exp(np.array(means)), _TINY)  # [n]


def _mean_logprob(arr: np.ndarray) -> float:
    """The mean of finite log-probs `arr`; where their sum overflows (-1e308 each), the sum of arr / size."""
    with np.errstate(over="ignore"):
        mean = float(np.mean(arr))
    return mean if math.isfinite(mean) else float(np.sum(arr / arr.size))


def _normalised(raw: dict, keep: np.ndarray) -> Vote:
    total = sum(raw.values())
    if total <= 0:  # every score zero: nothing to prefer; all answers tie
        scores = {a: 1.0 / len(raw) for a in raw}
    else:
        scores = {a: s / total for a, s in raw.items()}
    top = max(scores.values())
    winners = [a for a, s in scores.items() if s >= top * (1 - 1e-12)]
    return Vote(scores=scores, winners=winners, confidence=float(top), keep=keep)


def self_consistency(answers: Sequence) -> Vote:
    """Majority vote: s(y) = #{i : a_i = y} / n."""
    ans = _answers(answers)
    raw: dict = {}
    for a in ans:
        raw[a] = raw.get(a, 0.0) + 1.0
    return _normalised(raw, np.ones(len(ans), dtype=bool))


def _pc_scores(ans: list, probs: np.ndarray, texts, keep: np.ndarray) -> dict:
    raw: dict = {a: 0.0 for a in ans}  # every sampled answer is a candidate, pruned ones with score 0
    seen = set()
    for i, (a, p) in enumerate(zip(ans, probs)):
        if not keep[i]:
            continue
        key = (texts[i], float(p)) if texts is not None else i  # a path sampled twice counts once
        if key in seen:
            continue
        seen.add(key)
        raw[a] += float(p)
    return raw


def _texts(texts, n: int):
    if texts is None:
        return None
    if not _is_sequence(texts):
        raise InputError(f"texts must be a list with one text per path, got {type(texts).__name__}")
    if len(texts) != n:
        raise InputError(f"texts has {len(texts)} entries for {n} paths; give one text per path")
    return [str(t) for t in texts]


def perplexity_consistency(answers: Sequence, logprobs: Sequence, *, texts: Sequence | None = None) -> Vote:
    """PC: s(y) = sum of p(t) over the distinct paths t reaching y (see the module doc). Paths are distinct
    by (text, probability); without `texts` every path counts."""
    ans = _answers(answers)
    probs = path_probabilities(logprobs)
    if len(probs) != len(ans):
        raise InputError(f"{len(ans)} answers but {len(probs)} log-prob sequences; give one of each per path")
    keep = np.ones(len(ans), dtype=bool)
    return _normalised(_pc_scores(ans, probs, _texts(texts, len(ans)), keep), keep)


def _weibull_pdf(x, k, lam):
    return (k / lam) * (x / lam) ** (k - 1) * np.exp(-((x / lam) ** k))


@dataclass(frozen=True)
class WeibullMixture:
    """w f_W(x; k_high, lam_high) + (1 - w) f_W(x; k_low, lam_low), the high component having the larger
    mean lam Gamma(1 + 1/k)."""

    w: float
    k_high: float
    lam_high: float
    k_low: float
    lam_low: float

    def mean(self, which: str) -> float:
        k, lam = (self.k_high, self.lam_high) if which == "high" else (self.k_low, self.lam_low)
        return lam * math.gamma(1 + 1 / k)

    def posterior_high(self, x) -> np.ndarray:
        """P(high component | x) for each x."""
        x = np.maximum(np.asarray(x, dtype=np.float64), _TINY)
        with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
            hi = self.w * _weibull_pdf(x, self.k_high, self.lam_high)
            lo = (1 - self.w) * _weibull_pdf(x, self.k_low, self.lam_low)
            hi, lo = np.where(np.isfinite(hi), hi, 0.0), np.where(np.isfinite(lo), lo, 0.0)
            post = hi / (hi + lo)
        return np.where(np.isfinite(post), post, (hi >= lo).astype(np.float64))


def _mixture_pdf(params, x):
    """``(f1, f2, pdf)`` [n]: the two Weibull densities (non-finite values as 0) and the mixture's."""
    w, k1, l1, k2, l2 = params
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        f1, f2 = _weibull_pdf(x, k1, l1), _weibull_pdf(x, k2, l2)  # [n]
        f1, f2 = np.where(np.isfinite(f1), f1, 0.0), np.where(np.isfinite(f2), f2, 0.0)
        return f1, f2, w * f1 + (1 - w) * f2


def _mixture_value(params, x) -> float:
    """-sum log f(x), the density floored at 1e-300: what the finite-difference fit evaluates (computing the
    gradient too and discarding it was half of a fit's time)."""
    return float(-np.sum(np.log(np.maximum(_mixture_pdf(params, x)[2], _TINY))))


def _mixture_nll(params, x):
    """-sum log f(x) and its gradient in (w, k1, lam1, k2, lam2), the density floored at 1e-300."""
    w, k1, l1, k2, l2 = params
    f1, f2, pdf = _mixture_pdf(params, x)  # [n] each
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        z1, z2 = x / l1, x / l2  # [n]
        live = pdf > _TINY  # floored points contribute a constant: no gradient
        safe = np.where(live, pdf, 1.0)
        r1, r2 = np.where(live, w * f1 / safe, 0.0), np.where(live, (1 - w) * f2 / safe, 0.0)  # responsibilities
        lz1, lz2 = np.log(z1), np.log(z2)
        zk1, zk2 = z1 ** k1, z2 ** k2
        grad = -np.array([
            np.sum(np.where(live, (f1 - f2) / safe, 0.0)),
            np.sum(r1 * (1 / k1 + lz1 - zk1 * lz1)),  # d log f_W / dk = 1/k + log z - z^k log z
            np.sum(r1 * (k1 / l1) * (zk1 - 1)),  # d log f_W / dlam = (k/lam)(z^k - 1)
            np.sum(r2 * (1 / k2 + lz2 - zk2 * lz2)),
            np.sum(r2 * (k2 / l2) * (zk2 - 1)),
        ])
    value = -np.sum(np.log(np.maximum(pdf, _TINY)))
    if not np.all(np.isfinite(grad)):
        grad = np.nan_to_num(grad, nan=0.0, posinf=1e300, neginf=-1e300)
    return float(value), grad


def fit_weibull_mixture(x: Sequence, *, init=(0.5, 1.0, 1.0, 1.5, 2.0), w_bounds=(0.2, 0.8),
                        gradient: str = "numeric") -> WeibullMixture:
    """Maximum-likelihood two-component Weibull mixture of positive samples `x` [n], as the reference fits it:
    L-BFGS-B (scipy's default with bounds) on -sum log f(x) from `init` = (w, k1, lam1, k2, lam2), w within
    `w_bounds`, the rest >= 0.01; then the components are ordered by mean.

    ``gradient="numeric"`` (default) lets scipy take finite differences, as the reference does: where the
    reference's objective stays finite (see the module's departures) the fit is the reference's, step for step.
    ``"analytic"`` hands L-BFGS-B the exact gradient, with ~6x fewer likelihood evaluations; same objective,
    start and bounds, and on large samples the same optimum (tests check it), but on a few paths with several
    local optima it can stop at another one and prune other paths (on 8 paths, 4 of 55 subsets in a QA check
    against the reference).
    """
    try:
        from scipy.optimize import minimize
    except ImportError:
        raise InputError("RPC's Weibull fit needs scipy: pip install 'prunekit[data]' (or scipy>=1.10)") from None

    x = np.asarray(x, dtype=np.float64).reshape(-1)  # [n]
    if x.size < 2 or not np.all(np.isfinite(x)) or np.any(x <= 0):
        raise InputError("fit_weibull_mixture needs at least 2 finite samples, all > 0")
    if not (_is_sequence(w_bounds) and len(w_bounds) == 2 and all(is_real(v) for v in w_bounds)
            and 0 < w_bounds[0] <= w_bounds[1] < 1):
        raise InputError(f"w_bounds={w_bounds!r} must be a pair (low, high) with 0 < low <= high < 1")
    lo, hi = (float(v) for v in w_bounds)
    if not (_is_sequence(init) and len(init) == 5 and all(is_real(v) for v in init) and 0 < init[0] < 1
            and min(init[1:]) > 0):
        raise InputError(f"init={init!r} must be 5 finite numbers (w, k1, lam1, k2, lam2), 0 < w < 1, the rest > 0")
    if gradient not in ("analytic", "numeric"):
        raise InputError(f"gradient={gradient!r}: choose 'analytic' or 'numeric'")
    bounds = [(lo, hi)] + [(0.01, None)] * 4
    start = np.asarray(init, dtype=np.float64)
    with np.errstate(over="ignore", under="ignore", invalid="ignore", divide="ignore"):
        if gradient == "analytic":
            res = minimize(_mixture_nll, start, args=(x,), jac=True, bounds=bounds)
        else:
            res = minimize(_mixture_value, start, args=(x,), bounds=bounds)
    w, k1, l1, k2, l2 = (float(v) for v in res.x)
    if l1 * math.gamma(1 + 1 / k1) < l2 * math.gamma(1 + 1 / k2):
        w, k1, l1, k2, l2 = 1 - w, k2, l2, k1, l1
    return WeibullMixture(w=w, k_high=k1, lam_high=l1, k_low=k2, lam_low=l2)



def reasoning_prune(probs: Sequence) -> np.ndarray:
    """RPC's keep-mask over path probabilities p [n] (True = kept): drop path i iff the fitted low component
    explains p_i better than the high one AND p_i < mean(p). Each p_i = exp(mean log-prob) is in [0, 1]
    (`path_probabilities`); 0, an underflow, is floored at 1e-300."""
    given = np.asarray(probs)
    if given.ndim != 1 or given.size == 0 or given.dtype == bool or given.dtype.kind not in "iuf":
        raise InputError(f"probs must be a non-empty 1-D list of path probabilities, got "
                         f"{'shape ' + str(list(given.shape)) if given.ndim != 1 or not given.size else given.dtype}")
    p = given.astype(np.float64)
    if not np.all(np.isfinite(p)) or np.any(p < 0) or np.any(p > 1 + 1e-6):
        raise InputError("path probabilities must be in [0, 1] (p = exp(mean token log-prob)); "
                         "pass path_probabilities(logprobs), not log-probs or scores")
    p = np.clip(p, _TINY, 1.0)  # [n]
    keep = np.ones(p.size, dtype=bool)
    if np.unique(p).size < 2:
        return keep
    mix = fit_weibull_mixture(p)
    return ~((mix.posterior_high(p) < 0.5) & (p < p.mean()))


def rpc(answers: Sequence, logprobs: Sequence, *, texts: Sequence | None = None) -> Vote:
    """Reasoning Pruning then Perplexity Consistency over the kept paths (see the module doc).

    `answers`: one extracted answer per path (None where none was found); `logprobs`: per path its token
    log-probs (or its mean log-prob); `texts`: the paths' texts, so identical paths count once. Returns a `Vote`:
    ``.answer`` (chosen), ``.confidence`` (its normalised score), ``.scores`` (every answer's), ``.winners``
    (tied top answers) and ``.keep`` (the paths that survived the pruning)."""
    ans = _answers(answers)
    probs = path_probabilities(logprobs)
    if len(probs) != len(ans):
        raise InputError(f"{len(ans)} answers but {len(probs)} log-prob sequences; give one of each per path")
    keep = reasoning_prune(probs)
    return _normalised(_pc_scores(ans, probs, _texts(texts, len(ans)), keep), keep)


def vote(answers: Sequence, logprobs: Sequence | None = None, *, method: str = "rpc",
         texts: Sequence | None = None) -> Vote:
    """`self_consistency`, `perplexity_consistency` or `rpc` by name ("sc", "pc", "rpc")."""
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    if method == "sc":
        return self_consistency(answers)
    if logprobs is None:
        raise InputError(f"method {method!r} needs the paths' log-probs")
    return (perplexity_consistency if method == "pc" else rpc)(answers, logprobs, texts=texts)


def expected_calibration_error(confidence: Sequence, correct: Sequence, *, weights: Sequence | None = None,
                               bins: int = ECE_BINS) -> float:
    """ECE = sum_b (W_b / W) |acc_b - conf_b| over `bins` equal bins (b/B, (b+1)/B] of `confidence` [m]
    (correctness `correct` [m] in [0, 1], optional `weights` [m]); a confidence of 0 falls in no bin, as in
    the reference's `metrics.py`. NaN when no weight lands in a bin."""
    conf = np.asarray(confidence, dtype=np.float64).reshape(-1)  # [m]
    corr = np.asarray(correct, dtype=np.float64).reshape(-1)  # [m]
    wts = np.ones_like(conf) if weights is None else np.asarray(weights, dtype=np.float64).reshape(-1)
    if not (conf.shape == corr.shape == wts.shape):
        raise InputError("confidence, correct and weights must have the same length")
    if conf.size == 0:
        raise InputError("no confidences given; ECE needs at least one (confidence, correct) pair")
    if isinstance(bins, bool) or not isinstance(bins, Integral) or bins < 1:
        raise InputError(f"bins={bins!r} must be an integer >= 1")
    if np.any(~np.isfinite(conf)) or np.any((conf < 0) | (conf > 1 + 1e-9)):
        raise InputError("confidences must be in [0, 1]")
    if np.any(~np.isfinite(corr)) or np.any((corr < 0) | (corr > 1)):  # 5 gave an "ECE" of 2.65
        raise InputError("correct must hold values in [0, 1] (1 = right, 0 = wrong, or a tie's share)")
    if np.any(~np.isfinite(wts)) or np.any(wts < 0):
        raise InputError("weights must be finite and >= 0")
    idx = np.ceil(np.clip(conf, 0, 1) * bins - 1e-12).astype(int) - 1  # bin b holds (b/B, (b+1)/B]
    inside = idx >= 0
    total = wts[inside].sum()
    if total <= 0:
        return float("nan")
    ece = 0.0
    for b in range(bins):
        sel = inside & (idx == b)
        wb = wts[sel].sum()
        if wb > 0:
            ece += wb * abs((wts[sel] * corr[sel]).sum() / wb - (wts[sel] * conf[sel]).sum() / wb)
    return float(ece / total)


# ---------------------------------------------------------------- files of sampled paths and evaluation


@dataclass
class Question:
    """One question's sampled paths: reference `answer`, and per path `texts`, `answers`, `logprobs`."""

    answer: object
    texts: list
    answers: list
    logprobs: list
    question: str | None = None


def _bad(path, line_no, what) -> InputError:
    return InputError(f"{path}:{line_no}: {what}")


def _answer_type(value) -> str | None:
    """What is wrong with an answer's JSON type (None when it is a string, a number or null): a list or an object
    was compared by its Python text, so ["1"] never matched "1"."""
    if value is None or isinstance(value, str) or (isinstance(value, (int, float)) and not isinstance(value, bool)):
        return None
    got = "true/false" if isinstance(value, bool) else type(value).__name__
    return f"must be a string, a number or null (got {got})"


def _parse(obj, path, line_no) -> Question:
    if not isinstance(obj, dict):
        raise _bad(path, line_no, "expected a JSON object {\"answer\": ..., \"paths\": [...]}")
    wrong = _answer_type(obj.get("answer"))
    if wrong:
        raise _bad(path, line_no, f"the reference \"answer\" {wrong}")
    paths = obj.get("paths")
    if not isinstance(paths, list):
        raise _bad(path, line_no, "\"paths\" must be a list of {\"text\", \"answer\", \"logprobs\"}")
    if not paths:
        raise _bad(path, line_no, "\"paths\" is empty; every question needs at least one sampled path")
    texts, answers, logprobs = [], [], []
    for j, p in enumerate(paths):
        if not isinstance(p, dict):
            raise _bad(path, line_no, f"path {j} is not an object")
        text, lp = p.get("text"), p.get("logprobs")
        if not isinstance(text, str):
            raise _bad(path, line_no, f"path {j}: \"text\" must be a string")
        if "answer" not in p:
            raise _bad(path, line_no, f"path {j}: no \"answer\" (use null when none was extracted)")
        wrong = _answer_type(p["answer"])
        if wrong:
            raise _bad(path, line_no, f"path {j}: \"answer\" {wrong}")
        if lp is None:  # answers alone (an API without log-probs): self-consistency votes on them, pc and rpc refuse
            texts.append(text)
            answers.append(p["answer"])
            logprobs.append(None)
            continue
        if not isinstance(lp, list) or not lp or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                        for v in lp):
            raise _bad(path, line_no, f"path {j}: \"logprobs\" must be a non-empty list of numbers (or absent, "
                       "for --method sc)")
        try:
            arr = np.asarray(lp, dtype=np.float64)
        except OverflowError:  # an integer too large for a float
            arr = np.array([np.inf])
        if not np.all(np.isfinite(arr)):
            raise _bad(path, line_no, f"path {j}: a log-prob is NaN or infinite")
        if np.any(arr > 1e-6):
            raise _bad(path, line_no, f"path {j}: a log-prob is positive ({arr.max():g}); log-probs must be <= 0")
        texts.append(text)
        answers.append(p["answer"])
        logprobs.append(arr)
    q = obj.get("question")
    return Question(answer=obj.get("answer"), texts=texts, answers=answers, logprobs=logprobs,
                    question=q if isinstance(q, str) else None)


def load_paths(path: str | os.PathLike) -> list[Question]:
    """Read a JSONL file of sampled paths, one question a line:
    ``{"question": str (optional), "answer": reference (optional), "paths": [{"text": str, "answer": str | null,
    "logprobs": [float <= 0, ...] (optional: sc votes without them)}, ...]}``. Blank lines are skipped; anything
    else malformed raises `InputError` naming the line."""
    if not isinstance(path, (str, os.PathLike)):
        raise InputError(f"path must be a file path (str or Path), got {type(path).__name__}")
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path} is not a file; give a JSONL file of sampled paths")
    out = [_parse(obj, path, line_no) for line_no, obj in read_objects(path, shape="one question's paths object")]
    if not out:
        raise InputError(f"{path} holds no questions")
    return out


def _as_questions(records) -> list[Question]:
    if isinstance(records, (str, bytes, Mapping)) or not hasattr(records, "__iter__"):
        raise InputError(f"records must be a list of questions (load_paths(file) gives one), "
                         f"got {type(records).__name__}")
    out = []
    for i, r in enumerate(records):
        out.append(r if isinstance(r, Question) else _parse(r, "<records>", i + 1))
    return out


def _check_logprobs(qs: list, method: str) -> None:
    """pc and rpc weigh paths by their log-probs: a path without them is an InputError naming it."""
    if method == "sc":
        return
    for i, q in enumerate(qs):
        j = next((j for j, lp in enumerate(q.logprobs) if lp is None), None)
        if j is not None:
            raise InputError(f"question {i} (counting from 0), path {j} has no \"logprobs\"; method {method} weighs "
                             "paths by them: add each path's token log-probs, or use method sc (votes on answers "
                             "alone)")


def check_n(n, questions) -> int:
    """Refuse (InputError) a subset size `n` that is not an integer >= 1 (None: all paths) or is above the fewest
    paths a question has; return that fewest."""
    available = min(len(q.answers) for q in questions)
    if n is not None and (not isinstance(n, Integral) or isinstance(n, bool) or n < 1):  # numpy ints too
        raise InputError(f"n={n!r} must be an integer >= 1")
    if n is not None and n > available:
        raise InputError(f"n={n} but a question has only {available} paths; choose n <= {available}")
    return available


def has_reference(answer) -> bool:
    """Whether a question's reference `answer` is given (not null, not empty once canonical)."""
    return canonical_answer(answer) not in (None, "")


def choose(records, *, method: str) -> list[dict]:
    """Each question's chosen answer under `method`, voting over all its paths; no reference answer is needed.
    One dict per question, in order: ``{"index", "question", "answer", "confidence", "winners", "paths",
    "kept_paths", "reference", "correct"}`` (``correct``: the accuracy credit, 1/|winners| when the reference
    is among tied winners; None without a reference). ``answer``, ``winners`` and ``reference`` are in the
    form votes compare (`canonical_answer`: "1,200" and "1200.0" are 1200), so a right answer equals its
    reference."""
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    out, qs = [], _as_questions(records)
    _check_logprobs(qs, method)
    for i, q in enumerate(qs):
        v = vote(q.answers, q.logprobs, method=method, texts=q.texts)
        known = has_reference(q.answer)
        out.append({"index": i, "question": q.question, "answer": v.answer, "confidence": v.confidence,
                    "winners": v.winners, "paths": len(q.answers), "kept_paths": int(v.keep.sum()),
                    "reference": canonical_answer(q.answer), "correct": v.credit(q.answer) if known else None})
    return out


def evaluate(records, *, method: str, n: int | None = None, resamples: int = 10, seed: int = 0) -> dict:
    """Accuracy and ECE of `method` over questions (`load_paths` output or records in its format).

    With `n` below a question's path count, each of `resamples` rounds votes over a uniform random n-subset
    of every question's paths (seeded by `seed`); accuracy and ECE are computed per round and averaged, as the
    reference averages over seeds. With `n` None, or equal to every question's path count, there is one round
    over all paths; an `n` above the fewest paths a question has is refused (the result would be labelled with
    an n it did not use). Returns ``{"method", "n", "accuracy", "ece", "accuracy_std", "ece_std", "rounds",
    "questions", "pruned_fraction", "paths_per_question"}``; accuracy and ECE are fractions in [0, 1], ``n`` is
    None when every path was used and questions have different counts, ``paths_per_question`` is the
    ``[fewest, most]`` paths a question has.
    """
    if method not in METHODS:
        raise InputError(f"method={method!r}: choose one of {', '.join(METHODS)}")
    qs = _as_questions(records)
    if not qs:
        raise InputError("no questions to evaluate")
    available = check_n(n, qs)
    if isinstance(resamples, bool) or not isinstance(resamples, Integral) or resamples < 1:
        raise InputError(f"resamples={resamples!r} must be an integer >= 1")
    if not isinstance(seed, Integral) or isinstance(seed, bool) or seed < 0:
        raise InputError(f"seed={seed!r} must be an integer >= 0")
    n, resamples, seed = None if n is None else int(n), int(resamples), int(seed)  # numpy ints as Python's (JSON)
    subsample = n is not None and any(n < len(q.answers) for q in qs)
    rounds = resamples if subsample else 1
    rng = np.random.default_rng(seed)
    _check_logprobs(qs, method)
    means = [None if method == "sc" else np.array([_mean_logprob(lp) for lp in q.logprobs]) for q in qs]
    unknown = [i for i, q in enumerate(qs) if not has_reference(q.answer)]
    if unknown:  # they were scored as wrong answers
        raise InputError(f"{len(unknown)} question(s) have no reference answer (null or empty; the first is question "
                         f"{unknown[0]}, counting from 0): accuracy and ECE need one for every question; drop them or "
                         "add it (prunekit reason FILE --method M --answers OUT.jsonl writes the chosen answers alone)")
    accs, eces, pruned = [], [], []
    for _ in range(rounds):
        conf, corr, wts, credit = [], [], [], []
        dropped = total = 0
        for q, m in zip(qs, means):
            idx = rng.choice(len(q.answers), size=n, replace=False) if subsample else np.arange(len(q.answers))
            answers = [q.answers[i] for i in idx]
            v = vote(answers, None if m is None else m[idx], method=method, texts=[q.texts[i] for i in idx])
            ref = canonical_answer(q.answer)
            credit.append(v.credit(q.answer))
            for w in v.winners:
                conf.append(v.confidence)
                corr.append(1.0 if (ref is not None and w == ref) else 0.0)
                wts.append(1.0 / len(v.winners))
            dropped += int((~v.keep).sum())
            total += len(idx)
        accs.append(float(np.mean(credit)))
        eces.append(expected_calibration_error(conf, corr, weights=wts))
        pruned.append(dropped / total)
    eces = np.array(eces)
    seen = eces[~np.isnan(eces)]
    most = max(len(q.answers) for q in qs)
    used = int(n) if subsample else (available if available == most else None)
    return {"method": method, "n": used, "accuracy": float(np.mean(accs)),
            "ece": float(seen.mean()) if seen.size else float("nan"), "accuracy_std": float(np.std(accs)),
            "ece_std": float(seen.std()) if seen.size else float("nan"), "rounds": rounds, "questions": len(qs),
            "pruned_fraction": float(np.mean(pruned)), "paths_per_question": [available, most]}
