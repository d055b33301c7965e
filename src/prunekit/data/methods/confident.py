"""Confident Learning: which given labels are wrong, from out-of-sample predicted probabilities.

Northcutt, Jiang & Chuang, "Confident Learning: Estimating Uncertainty in Dataset Labels", JAIR 2021,
https://arxiv.org/abs/1911.00068. Reference code: cleanlab 2.9 (`cleanlab/filter.py`, `count.py`, `rank.py`).

Algorithm (N examples, K classes, ``p`` = `pred_probs` [N, K], ``y`` = given labels [N]):

1. Per-class thresholds ``t_k = mean(p[y == k, k])`` (the class's average self-confidence), floored at 2e-6.
2. An example is *confidently* of class j when ``p_j >= t_j - 1e-6``; its true-label guess is its argmax
   when more than one class is confident, else the single confident class; examples with no confident class
   are left out. The confident joint ``C[given i][guess j]`` counts them, with its diagonal floored at 1.
3. Calibration rescales each row of C to the given-label count, the whole to N, and rounds each row
   preserving its total. ``P(y|s)``, ``P(s|y)`` and the prior ``P(y)`` follow from it (`estimate_noise`).
4. Label issues (`find_label_issues`, ``filter_by``):
   ``prune_by_noise_rate`` flags, for every given class k and every other class j, the ``C'[j][k]``
   examples labelled k with the largest margin ``p_j - p_k``; ``prune_by_class`` flags the
   ``n_k - C'[k][k]`` examples labelled k with the smallest ``p_k`` (C' = the prune-count matrix: C^T with
   at least `min_examples_per_class` kept per class, scaled by `frac_noise`); ``both`` = their
   intersection; ``confident_learning`` = the off-diagonal examples of step 2; ``predicted_neq_given`` =
   argmax differs from the label; ``low_self_confidence`` / ``low_normalized_margin`` = the examples with
   the lowest label-quality score, as many as `num_label_issues` counts. Every mode but the ``low_*`` ones
   then un-flags examples whose given label is the argmax once 1e-6 is added to it.
5. Ranking (`order_label_issues`): flagged examples sorted by a label-quality score, worst first:
   ``self_confidence`` = p_y; ``normalized_margin`` = ``(p_y - max_{j != y} p_j + 1) / 2``;
   ``confidence_weighted_entropy`` = ``log(H/sc + 1) / clip(H/sc)`` with H the normalised entropy.

The answers are cleanlab's, bit for bit (the tests compare every mode on random planted-noise settings),
including how ties are broken: where cleanlab takes the first c of a full ``np.argsort``, this code finds the
c-th value by partition and falls back to the same ``np.argsort`` only when equal values straddle the cut.

Departures from cleanlab, all about cost, none about answers:

- Examples are grouped by label once (one stable argsort) instead of K boolean masks over N and a dict of
  per-class copies of `pred_probs` (O(N K) time and a full copy).
- `pred_probs` is read in row chunks: no N x K temporaries (cleanlab builds an N x K boolean matrix, a full
  copy in its post-filter and an N x (K-1) copy for the normalized margin). Memory-mapped arrays
  (``np.load(path, mmap_mode="r")``) are read in place, so peak memory stays near the input's size, or far
  below it for a memory-mapped input.
- Top-c per (class, class) pair by partition (O(n)) instead of a full argsort; one Python iteration per
  class, never per example and never per (class, class) pair; no multiprocessing.
- Multi-label data is not supported; classes without examples are an error unless
  ``allow_missing_classes=True`` (then cleanlab's rule applies: their threshold is 2, nothing is confident).

>>> import numpy as np
>>> p = np.array([[.9, .1], [.8, .2], [.3, .7], [.2, .8], [.85, .15]])
>>> find_label_issues(np.array([0, 0, 1, 1, 1]), p).tolist()
[False, False, False, False, True]
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from prunekit.data.methods._checks import to_numpy
from prunekit.errors import InputError, is_real

__all__ = [
    "FILTERS", "RANKINGS", "NoiseEstimate", "confident_thresholds", "compute_confident_joint",
    "calibrate_confident_joint", "estimate_noise", "num_label_issues", "label_quality_scores",
    "order_label_issues", "find_label_issues",
]

FILTERS = ("prune_by_noise_rate", "prune_by_class", "both", "confident_learning", "predicted_neq_given",
           "low_self_confidence", "low_normalized_margin")
RANKINGS = ("self_confidence", "normalized_margin", "confidence_weighted_entropy")
MAX_CLASSES = 16_384  # a joint of int64 counts of 2 GiB

_EPS = 1e-6  # cleanlab's FLOATING_POINT_COMPARISON
_TINY = 1e-100  # cleanlab's TINY_VALUE (division guard)
_THRESHOLD_FLOOR = 2e-6  # cleanlab's CONFIDENT_THRESHOLDS_LOWER_BOUND
_CLIP_LOW = 1e-6  # cleanlab's CLIPPING_LOWER_BOUND
_MISSING_THRESHOLD = 2  # a class with no examples: nothing can be confident in it
SUM_TOLERANCE = 1e-3  # |row sum - 1| allowed in pred_probs
_CHUNK_ELEMENTS = 1 << 17  # 512 KB of float32 per row chunk: temporaries stay small next to the input; no slower


@dataclass
class _Data:
    labels: np.ndarray  # [N] int32
    probs: np.ndarray  # [N, K] float, possibly a memmap; never modified
    counts: np.ndarray  # [K] examples per given class (int64)
    order: np.ndarray  # [N] example indices grouped by class, original order within a class
    starts: np.ndarray  # [K + 1] class k is order[starts[k]:starts[k + 1]]
    checked: bool = False  # every row validated (by the first full pass over the chunks)

    @property
    def n(self) -> int:
        return self.probs.shape[0]

    @property
    def k(self) -> int:
        return self.probs.shape[1]

    def members(self, k: int) -> np.ndarray:
        return self.order[self.starts[k] : self.starts[k + 1]]

    def chunks(self, *, check: bool = True):
        """``(start, probs[start:stop] as an ndarray, labels[start:stop])`` over row chunks; the first full
        pass also validates the rows (unless the caller does, `check=False`), so validation costs no pass of
        its own."""
        rows = max(1, _CHUNK_ELEMENTS // self.k)
        for s in range(0, self.n, rows):
            p = np.asarray(self.probs[s : s + rows])
            if check and not self.checked:
                _check_rows(s, p)
            yield s, p, self.labels[s : s + rows]
        self.checked = True

    def validate(self) -> "_Data":
        if not self.checked:
            for _ in self.chunks():
                pass
        return self


def _check_rows(start: int, p: np.ndarray, row_max: np.ndarray | None = None) -> None:
    low = p.min()  # NaN propagates into min and max, failing the test below
    high = p.max() if row_max is None else row_max.max()
    if not (low >= 0 and high <= 1):
        bad = ~np.isfinite(p).all(axis=1)
        if bad.any():
            raise InputError(f"pred_probs has NaN or Inf (row {start + int(np.argmax(bad))}); recompute the probabilities")
        cols = np.flatnonzero(((p < 0) | (p > 1)).any(axis=0))
        row = start + int(np.argmax(((p < 0) | (p > 1)).any(axis=1)))
        column = (f"; only column {int(cols[0])} leaves [0, 1]: if it holds ids or a stored index, drop it"
                  if len(cols) == 1 and p.shape[1] > 2 else "")
        raise InputError(f"pred_probs must lie in [0, 1]; row {row} does not (pass softmax outputs, not logits{column})")
    err = np.abs(p.sum(axis=1) - 1.0)  # float32 pairwise sums err by ~1e-7 K, far inside the tolerance
    if (err > SUM_TOLERANCE).any():
        row = int(np.argmax(err > SUM_TOLERANCE))
        raise InputError(f"each row of pred_probs must sum to 1 (within {SUM_TOLERANCE}); row {start + row} sums to "
                         f"{float(p[row].sum(dtype=np.float64)):.6g} (apply a softmax, or divide by the row sums)")


def _prepare(labels, pred_probs, *, allow_missing_classes: bool = False) -> _Data:
    """Check shapes and labels without copying `pred_probs` (a memmap stays a memmap); group examples by
    label. The values of `pred_probs` are checked by the first pass over them (`_Data.chunks`)."""
    if isinstance(pred_probs, _Data):
        return pred_probs
    probs = pred_probs if isinstance(pred_probs, np.ndarray) else to_numpy(pred_probs, "pred_probs")  # a GPU tensor too
    if probs.ndim != 2:
        raise InputError(f"pred_probs must be a 2-D array [examples, classes], got shape {probs.shape}")
    if not np.issubdtype(probs.dtype, np.floating):
        raise InputError(f"pred_probs must hold floating-point probabilities, got dtype {probs.dtype}")
    n, k = probs.shape
    if n == 0:
        raise InputError("pred_probs has no rows; give one row of class probabilities per example")
    if k < 2:
        raise InputError(f"pred_probs has {k} column(s); Confident Learning needs at least 2 classes")
    if k > MAX_CLASSES:  # the K x K joint: 40,000 columns asked for 12 GB, then a MemoryError traceback
        raise InputError(f"pred_probs has {k:,} columns: Confident Learning counts a {k:,} x {k:,} joint "
                         f"({8 * k * k / 2**30:,.0f} GiB); at most {MAX_CLASSES:,} classes are taken")
    y = to_numpy(labels, "labels")
    if y.ndim != 1:
        raise InputError(f"labels must be a 1-D array of class indices, got shape {y.shape}")
    if len(y) != n:
        raise InputError(f"labels has {len(y)} entries but pred_probs has {n} rows; they must describe the same examples")
    if y.dtype == bool or not np.issubdtype(y.dtype, np.integer):
        if np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y)) and np.all(y == np.round(y)):
            y = y.astype(np.intp)
        else:
            raise InputError(f"labels must be integer class indices in [0, {k}), got dtype {y.dtype}")
    lo, hi = int(y.min()), int(y.max())
    if lo < 0 or hi >= k:
        bad = int(np.flatnonzero((y < 0) | (y >= k))[0])
        raise InputError(f"labels must lie in [0, {k}) (pred_probs has {k} columns); example {bad} has label {int(y[bad])}")
    y = y.astype(np.int32, copy=False)  # K < 2**31; half the memory of intp
    counts = np.bincount(y, minlength=k).astype(np.int64)
    if not allow_missing_classes and (counts == 0).any():
        # an extra column (an id, a stored index) looks like a class without examples: say what is wrong first
        _check_rows(0, np.asarray(probs[: max(1, _CHUNK_ELEMENTS // k)]))
        missing = np.flatnonzero(counts == 0)[:5].tolist()
        raise InputError(f"class(es) {missing} have no examples in labels; drop those columns of pred_probs and renormalise, "
                         "or pass allow_missing_classes=True (CLI: --allow-missing-classes)")
    small = y.astype(np.int16) if k <= np.iinfo(np.int16).max else y  # numpy radix-sorts 16-bit keys: O(N)
    return _Data(y, probs, counts, np.argsort(small, kind="stable"), np.concatenate([[0], np.cumsum(counts)]))



def _counts_array(values, name: str, shape: tuple, what: str) -> np.ndarray:
    """`values` as an array (dtype kept) of `shape` if it holds non-negative whole numbers; else `InputError`."""
    arr = np.asarray(values)
    if arr.shape != shape:
        raise InputError(f"{name} must have shape {list(shape)} ({what}), got shape {list(arr.shape)}")
    if arr.dtype == bool or arr.dtype.kind not in "iuf":
        raise InputError(f"{name} must hold counts (non-negative whole numbers), got dtype {arr.dtype}")
    if not np.isfinite(arr).all() or (arr < 0).any() or (arr != np.round(arr)).any():
        bad = arr[~(np.isfinite(arr) & (arr >= 0) & (arr == np.round(arr)))].ravel()[0].item()
        raise InputError(f"{name} must hold counts (non-negative whole numbers), got {bad!r}")
    return arr


def _first_of_argsort(values: np.ndarray, c: int) -> np.ndarray:
    """The positions ``np.argsort(values)[:c]`` picks, as a set (ascending), without sorting everything.

    Partition finds the c-th smallest value; only when equal values straddle the cut does the full argsort
    run, so ties are broken exactly as cleanlab's ``np.argsort`` breaks them.
    """
    n = values.shape[0]
    if c <= 0:
        return np.empty(0, dtype=np.intp)
    if c >= n:
        return np.arange(n)
    cut = values[np.argpartition(values, c - 1)[c - 1]]
    below = values < cut
    tied = values == cut
    if int(below.sum()) + int(tied.sum()) == c:
        return np.flatnonzero(below | tied)
    return np.sort(np.argsort(values)[:c])


def confident_thresholds(labels, pred_probs, *, allow_missing_classes: bool = False) -> np.ndarray:
    """Per-class thresholds ``t_k = mean(pred_probs[labels == k, k])``, floored at 2e-6: ``[K]``."""
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    if not isinstance(pred_probs, _Data):
        d.validate()  # inside find_label_issues the scan that follows validates
    # built like cleanlab's (a list through np.clip) so the dtype, hence every later comparison, is the same
    means = [np.mean(np.asarray(d.probs[d.members(k), k])) if d.counts[k] else _MISSING_THRESHOLD for k in range(d.k)]
    return np.clip(means, a_min=_THRESHOLD_FLOOR, a_max=None)


@dataclass
class _Scan:
    """What one streaming pass over pred_probs yields."""

    joint: np.ndarray  # [K, K] uncalibrated confident joint C[given][guess], diagonal floored at 1
    off_diagonal: np.ndarray  # example indices with a confident guess != given label
    given_is_argmax: np.ndarray  # [N] bool: the given label wins the argmax after + 1e-6 (post-filter)
    argmax: np.ndarray  # [N] predicted class


def _scan(d: _Data, thresholds: np.ndarray) -> _Scan:
    k = d.k
    lowered = np.asarray(thresholds) - 1e-06
    codes = []  # guess * K + given of the confident examples
    off, given_is_argmax, argmax = [], np.empty(d.n, dtype=bool), np.empty(d.n, dtype=np.int32)
    for s, p, y in d.chunks(check=False):
        top = p.argmax(axis=1)
        rows = np.arange(len(y))
        best = p[rows, top]
        if not d.checked:
            _check_rows(s, p, best)
        confident = p >= lowered  # [rows, K]
        n_conf = np.count_nonzero(confident, axis=1)
        guess = top.copy()  # right when several classes are confident, or when the one confident class is top
        single = np.flatnonzero((n_conf == 1) & ~confident[rows, top])
        guess[single] = confident[single].argmax(axis=1)
        kept = n_conf > 0
        codes.append(guess[kept].astype(np.int64) * k + y[kept])
        off.append(np.flatnonzero(kept & (guess != y)) + s)
        # cleanlab's post-filter adds 1e-6 to p[given] in a full copy and re-takes the argmax; the same test,
        # without the copy: the bumped label wins if it beats the first maximum (ties go to the lower index)
        bumped = p[rows, y] + _EPS  # same dtype arithmetic as cleanlab's in-place add
        given_is_argmax[s : s + len(y)] = (top == y) | ((top < y) & (bumped > best)) | ((top > y) & (bumped >= best))
        argmax[s : s + len(y)] = top
    pairs = np.bincount(np.concatenate(codes), minlength=k * k).astype(np.int64)
    # pairs[guess * K + given] is sklearn's confusion_matrix(guess, given); cleanlab transposes it. Keeping the
    # same memory layout (a transposed view) keeps every later float sum in the same order as cleanlab's.
    joint = pairs.reshape(k, k).T
    np.fill_diagonal(joint, joint.diagonal().clip(min=1))
    return _Scan(joint, np.concatenate(off), given_is_argmax, argmax)


def _round_rows(matrix: np.ndarray) -> np.ndarray:
    """Round each row to integers keeping its (rounded) total: cleanlab's ``round_preserving_row_totals``.

    Per row: round every entry; while the rounded entries miss the rounded total by d, move the |d| entries
    with the largest fractional parts up (d > 0) or the smallest down, in ``np.argsort`` order so ties match.
    All rows at once: a 2-D argsort sorts each row exactly as the 1-D one does.
    """
    rows = np.asarray(matrix, dtype=float)
    # cleanlab sums each row (a strided view when the matrix is a transpose) with numpy's pairwise sum; a
    # C-contiguous copy reduced along its last axis runs the same pairwise sum over the same sequence
    rows = np.ascontiguousarray(rows)
    ints = rows.round()
    target = np.sum(rows, axis=1).round()
    width = rows.shape[1]
    while True:
        diff = np.round(target - np.sum(ints, axis=1).round())
        todo = np.flatnonzero(np.abs(diff) > _EPS)
        if not len(todo):
            return ints.astype(int)
        step = np.where(diff[todo] < 0.0, -1, 1)
        change = np.minimum(np.abs(diff[todo]).astype(int), width)  # [t]
        order = np.argsort(rows[todo] - ints[todo], axis=1)  # [t, K] ascending fractional part
        rank = np.arange(width)[None, :]
        pick = np.where(step[:, None] > 0, rank >= width - change[:, None], rank < change[:, None])
        r, c = np.nonzero(pick)
        ints[todo[r], order[r, c]] += step[r]


def calibrate_confident_joint(joint: np.ndarray, labels) -> np.ndarray:
    """Rows rescaled to the given-label counts, the whole to N, rows rounded preserving totals: ``[K, K]``."""
    joint = np.asarray(joint)
    label_counts = np.bincount(np.asarray(labels).astype(np.intp, copy=False), minlength=len(joint))
    scaled = (joint.T / np.clip(joint.sum(axis=1), a_min=_TINY, a_max=None) * label_counts).T
    scaled = scaled / np.clip(np.sum(scaled), a_min=_TINY, a_max=None) * label_counts.sum()
    return _round_rows(scaled)


def compute_confident_joint(labels, pred_probs, *, calibrate: bool = True, thresholds=None,
                            allow_missing_classes: bool = False) -> np.ndarray:
    """The confident joint ``C[given i][true j]`` (`[K, K]` int), calibrated by default."""
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    if thresholds is None:
        thresholds = confident_thresholds(d.labels, d)
    else:
        given = np.asarray(thresholds)
        numeric = given.dtype != bool and given.dtype.kind in "iuf"
        if given.shape != (d.k,) or not numeric or not np.isfinite(given).all():
            raise InputError(f"thresholds must be {d.k} finite numbers, one per class (pred_probs has {d.k} columns), "
                             f"got {np.asarray(thresholds).tolist()!r:.80}")
        thresholds = given
    joint = _scan(d, np.asarray(thresholds)).joint
    return calibrate_confident_joint(joint, d.labels) if calibrate else np.ascontiguousarray(joint)


def _clip_noise_rates(m: np.ndarray) -> np.ndarray:
    diagonal = np.diagonal(m)
    m = np.clip(m, 0, 0.9999)
    np.fill_diagonal(m, diagonal)
    return m / np.clip(m.sum(axis=0), a_min=_TINY, a_max=None)


def _clip_prior(py: np.ndarray, low: float) -> np.ndarray:
    py = np.clip(py, low, 1.0)
    return py * 1.0 / np.clip(np.sum(py), a_min=_TINY, a_max=None)


def _prior(ps, noise, inverse):  # cleanlab's py_method="cnt"
    return _clip_prior(inverse.diagonal() / np.clip(noise.diagonal(), a_min=_TINY, a_max=None) * ps, _CLIP_LOW)


@dataclass
class NoiseEstimate:
    """The latent noise of the labels: ``noise_matrix[i][j] = P(given i | true j)``,
    ``inverse_noise_matrix[j][i] = P(true j | given i)``, ``prior[j] = P(true j)``, and the calibrated
    confident joint they come from."""

    prior: np.ndarray  # [K]
    noise_matrix: np.ndarray  # [K, K], columns sum to 1
    inverse_noise_matrix: np.ndarray  # [K, K], columns sum to 1
    confident_joint: np.ndarray  # [K, K] int, calibrated


def estimate_noise(labels, pred_probs, *, converge: bool = True, allow_missing_classes: bool = False) -> NoiseEstimate:
    """Noise matrix, inverse noise matrix and class prior from the calibrated confident joint.

    Equals cleanlab's ``estimate_py_and_noise_matrices_from_probabilities`` (``py_method="cnt"``, and with
    `converge` its 3 x 5 fixed-point iterations between the prior and the two matrices).
    """
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    cj = compute_confident_joint(d.labels, d)
    ps = d.counts / float(d.n)
    noise = cj / np.clip(cj.sum(axis=0).astype(float), a_min=_TINY, a_max=None)
    inverse = cj.T / np.clip(cj.sum(axis=1).astype(float), a_min=_TINY, a_max=None)
    py = _prior(ps, noise, inverse)
    noise, inverse = _clip_noise_rates(noise), _clip_noise_rates(inverse)
    if converge:
        for _ in range(3):
            for _ in range(5):
                joint = noise * py
                inverse = _clip_noise_rates(joint.T / np.clip(ps, a_min=_TINY, a_max=None))
                py = _prior(ps, noise, inverse)
            joint = (inverse * ps).T
            noise = _clip_noise_rates(joint / np.clip(py, a_min=_TINY, a_max=None))
        py = _clip_prior(py, 1e-05)
        noise, inverse = _clip_noise_rates(noise), _clip_noise_rates(inverse)
    return NoiseEstimate(py, noise, inverse, cj)


def _xlogx(p: np.ndarray) -> np.ndarray:
    try:  # scipy's float32 kernel is cleanlab's; numpy's log differs from it in the last bit
        from scipy.special import xlogy
    except ImportError:
        xlogy = None
    if xlogy is None or p.dtype not in (np.float16, np.float32, np.float64):  # scipy has no longdouble kernel
        with np.errstate(divide="ignore", invalid="ignore"):
            return np.where(p > 0, p * np.log(np.where(p > 0, p, 1)), 0).astype(p.dtype)
    return xlogy(p, p)


def _scores_of(p: np.ndarray, y: np.ndarray, method: str) -> np.ndarray:
    rows = np.arange(len(y))
    sc = p[rows, y]
    if method == "self_confidence":
        return sc
    if method == "normalized_margin":
        others = p.copy()
        others[rows, y] = -np.inf
        return (sc - others.max(axis=1) + 1) / 2
    sc = np.clip(sc, a_min=_CLIP_LOW, a_max=None)
    ratio = (-np.sum(_xlogx(p), axis=1) / np.log(p.shape[1])) / sc
    return np.log(ratio + 1) / np.clip(ratio, a_min=_CLIP_LOW, a_max=None)


def _check_method(method: str, allowed, what: str) -> None:
    if method not in allowed:
        raise InputError(f"unknown {what} {method!r}; choose one of {', '.join(allowed)}")


def label_quality_scores(labels, pred_probs, *, method: str = "self_confidence", allow_missing_classes: bool = True) -> np.ndarray:
    """One score per example, higher = the given label is more likely right: ``[N]``.

    `method`: ``self_confidence`` (p_y), ``normalized_margin`` ((p_y - max_{j != y} p_j + 1) / 2) or
    ``confidence_weighted_entropy``; equal to cleanlab's ``get_label_quality_scores``.
    """
    _check_method(method, RANKINGS, "label-quality method")
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    return np.concatenate([_scores_of(p, y, method) for _, p, y in d.chunks()])


def order_label_issues(issues, labels, pred_probs, *, rank_by: str = "self_confidence") -> np.ndarray:
    """Indices of the flagged examples, worst label quality first. `issues`: a bool mask [N], or the flagged
    examples' integer indices (as cleanlab reads an integer array)."""
    _check_method(rank_by, RANKINGS, "ranking")
    d = _prepare(labels, pred_probs, allow_missing_classes=True).validate()
    given = np.asarray(issues)
    if given.dtype == bool:
        if given.shape != (d.n,):
            raise InputError(f"issues must be a boolean mask of {d.n} examples, got shape {given.shape}")
        index = np.flatnonzero(given)
    elif given.dtype.kind in "iu" or given.size == 0:
        index = given.astype(np.intp).reshape(-1) if given.ndim <= 1 else None
        if index is None or (index.size and (index.min() < 0 or index.max() >= d.n)):
            raise InputError(f"issues as integer indices must be a 1-D array of indices in [0, {d.n})")
    else:
        raise InputError(f"issues must be a boolean mask of {d.n} examples or integer indices, got dtype {given.dtype}")
    scores = _scores_of(np.asarray(d.probs[index]), d.labels[index], rank_by)
    return index[np.argsort(scores)]


def num_label_issues(labels, pred_probs, *, estimation_method: str = "off_diagonal",
                     allow_missing_classes: bool = False) -> int:
    """How many labels are wrong: the off-diagonal count of the uncalibrated confident joint after the
    post-filter (``"off_diagonal"``), or ``(1 - trace(joint)) N`` of the calibrated one
    (``"off_diagonal_calibrated"``)."""
    _check_method(estimation_method, ("off_diagonal", "off_diagonal_calibrated"), "estimation method")
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    scan = _scan(d, confident_thresholds(d.labels, d))
    if estimation_method == "off_diagonal":
        return int((~scan.given_is_argmax[scan.off_diagonal]).sum())
    cj = calibrate_confident_joint(scan.joint, d.labels)
    joint = cj / np.clip(float(np.sum(cj)), a_min=_TINY, a_max=None)
    return int(np.rint((1.0 - joint.trace()) * d.n).astype(int))


def _prune_counts(joint: np.ndarray, *, n: int, frac_noise: float) -> np.ndarray:
    """cleanlab's ``_keep_at_least_n_per_class`` then ``_reduce_prune_counts``: ``[K, K]`` int, column k
    says how many examples labelled k go to each class j (diagonal: how many stay)."""
    m = joint.T
    diagonal = np.diagonal(m)
    new_diagonal = np.maximum(diagonal, n)
    per_column = np.maximum(np.count_nonzero(m, axis=0) - 1.0, 1.0)
    m = m - (new_diagonal - diagonal) / per_column
    m[m < 0] = 0
    np.fill_diagonal(m, new_diagonal)
    scaled = m * frac_noise
    np.fill_diagonal(scaled, m.diagonal())
    np.fill_diagonal(scaled, m.diagonal() + np.sum(m - scaled, axis=0))
    return _round_rows(scaled.astype(int)).astype(int)


def _by_class(d: _Data, counts: np.ndarray, min_examples: int) -> np.ndarray:
    flagged = np.zeros(d.n, dtype=bool)
    for k in range(d.k):
        members = d.members(k)
        if len(members) <= max(min_examples, 1):  # cleanlab never applies a one-example class's mask
            continue
        remove = int(len(members) - counts[k, k])
        if remove >= 1:
            flagged[members[_first_of_argsort(np.asarray(d.probs[members, k]), remove)]] = True
    return flagged


def _by_noise_rate(d: _Data, counts: np.ndarray, min_examples: int) -> np.ndarray:
    """For each class k, the examples with the largest ``p_j - p_k`` for every j with a count, all j at once."""
    flagged = np.zeros(d.n, dtype=bool)
    for k in range(d.k):
        members = d.members(k)
        n_k = len(members)
        if n_k <= max(min_examples, 1):
            continue
        take = counts[:, k].copy()
        take[k] = 0
        cols = np.flatnonzero(take > 0)
        if not len(cols):
            continue
        take = np.minimum(take[cols], n_k)  # [m]
        own = np.asarray(d.probs[members, k])  # [n_k]
        if 4 * len(cols) > d.k:  # many columns: whole rows are the cheaper gather
            others = np.take(d.probs, members, axis=0)[:, cols]
        else:
            others = np.asarray(d.probs[np.ix_(members, cols)])  # [n_k, m]
        key = np.empty((len(cols), n_k), dtype=np.result_type(own, others))  # [m, n_k]
        np.subtract(own[None, :], others.T, out=key)  # p_k - p_j == -(p_j - p_k) exactly: cleanlab's sort key
        most = int(take.max())
        if most >= n_k:
            part = np.sort(key, axis=1)
        else:
            part = np.sort(np.partition(key, most - 1, axis=1)[:, :most], axis=1)
        cut = part[np.arange(len(cols)), take - 1][:, None]  # the take_j-th smallest key of each row
        hit = key <= cut
        exact = hit.sum(axis=1) == take
        flagged[members[hit[exact].any(axis=0)]] = True
        for r in np.flatnonzero(~exact):  # equal keys straddle the cut: cleanlab's argsort decides
            flagged[members[np.argsort(key[r])[: take[r]]]] = True
    return flagged


def find_label_issues(labels, pred_probs, *, filter_by: str = "prune_by_noise_rate",
                      return_indices_ranked_by: str | None = None, frac_noise: float = 1.0,
                      num_to_remove_per_class=None, min_examples_per_class: int = 1, confident_joint=None,
                      allow_missing_classes: bool = False) -> np.ndarray:
    """The examples whose given label is probably wrong: a bool mask ``[N]`` (True = issue), or with
    `return_indices_ranked_by` their indices, worst first. Same arguments and answers as cleanlab's
    ``cleanlab.filter.find_label_issues`` for single-label data (no `n_jobs`: one process is faster).

    `labels`: [N] ints in [0, K); `pred_probs`: [N, K] out-of-sample probabilities (rows sum to 1), a numpy
    array or a memory-mapped one. `filter_by`: one of `FILTERS`.
    """
    _check_method(filter_by, FILTERS, "filter_by")
    if return_indices_ranked_by is not None:
        _check_method(return_indices_ranked_by, RANKINGS, "return_indices_ranked_by")
    if not (is_real(frac_noise) and 0.0 < frac_noise <= 1.0):
        raise InputError(f"frac_noise must be a number in (0, 1], got {frac_noise!r}")
    if not (is_real(min_examples_per_class) and min_examples_per_class == int(min_examples_per_class)
            and min_examples_per_class >= 0):
        raise InputError(f"min_examples_per_class must be a non-negative integer, got {min_examples_per_class!r}")
    rule_based = ("confident_learning", "predicted_neq_given", "low_self_confidence", "low_normalized_margin")
    if num_to_remove_per_class is not None and filter_by in rule_based:
        raise InputError(f"num_to_remove_per_class works with prune_by_noise_rate, prune_by_class or both, not {filter_by}")
    d = _prepare(labels, pred_probs, allow_missing_classes=allow_missing_classes)
    # checked before the scan; a count above a class's size removes all it can, as in cleanlab
    remove = joint = None
    if num_to_remove_per_class is not None:
        remove = _counts_array(num_to_remove_per_class, "num_to_remove_per_class", (d.k,), "one entry per class")
    if confident_joint is not None and filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):
        joint = _counts_array(confident_joint, "confident_joint", (d.k, d.k), "given class x true class")
    scan = _scan(d, confident_thresholds(d.labels, d))

    if filter_by in ("prune_by_noise_rate", "prune_by_class", "both"):  # the only modes that read the joint
        if joint is None:
            joint = calibrate_confident_joint(scan.joint, d.labels)
        # at N x K or more every off-diagonal count is pruned to 0 and nothing can be flagged, whatever the value:
        # clamped there, 10**30 gives 10**12's answer instead of an int64 overflow
        min_n = min(int(min_examples_per_class), d.n * max(d.k, 1))
        counts = _prune_counts(joint, n=min_n, frac_noise=float(frac_noise))
        if remove is not None:
            psy = counts / np.sum(counts, axis=1)
            noise_per_s = psy.sum(axis=1) - psy.diagonal()
            tmp = (psy.T * remove / noise_per_s).T
            np.fill_diagonal(tmp, d.counts - remove)
            counts = _round_rows(tmp)
        if filter_by == "prune_by_class":
            issues = _by_class(d, counts, min_n)
        elif filter_by == "prune_by_noise_rate":
            issues = _by_noise_rate(d, counts, min_n)
        else:
            issues = _by_class(d, counts, min_n) & _by_noise_rate(d, counts, min_n)
    elif filter_by == "confident_learning":
        issues = np.zeros(d.n, dtype=bool)
        issues[scan.off_diagonal] = True
    elif filter_by == "predicted_neq_given":
        issues = scan.argmax != d.labels
    else:
        method = filter_by[len("low_"):]
        scores = np.concatenate([_scores_of(p, y, method) for _, p, y in d.chunks()])
        count = int((~scan.given_is_argmax[scan.off_diagonal]).sum())  # num_label_issues, "off_diagonal"
        issues = np.zeros(d.n, dtype=bool)
        issues[_first_of_argsort(scores, count)] = True
    if filter_by not in ("low_self_confidence", "low_normalized_margin"):
        issues &= ~scan.given_is_argmax
    if return_indices_ranked_by is not None:
        return order_label_issues(issues, d.labels, d, rank_by=return_indices_ranked_by)
    return issues
