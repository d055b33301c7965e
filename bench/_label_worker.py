"""One label-issue job for the benchmark, in its own process: load the arrays, run one tool's
``find_label_issues`` twice, report the faster wall time and the first call's peak extra memory.

``peak_mb`` = peak resident memory during the call minus resident memory just before it (the inputs are
already loaded), i.e. the working memory the call itself needs.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import warnings

import numpy as np

from _memory import reset_peak, peak_rss_mb, rss_mb  # noqa: E402  (bench/ is this script's folder)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--tool", choices=("cleanlab", "prunekit"), required=True)
    p.add_argument("--labels", required=True)
    p.add_argument("--probs", required=True)
    p.add_argument("--filter", required=True)
    p.add_argument("--rank-by", default=None)
    p.add_argument("--mmap", action="store_true", help="memory-map pred_probs instead of loading it")
    p.add_argument("--out", required=True)
    p.add_argument("--repeats", type=int, default=2)
    args = p.parse_args()
    labels = np.load(args.labels)
    probs = np.load(args.probs, mmap_mode="r" if args.mmap else None)
    if args.tool == "cleanlab":
        warnings.filterwarnings("ignore")
        from cleanlab.filter import find_label_issues

        def call():  # n_jobs=1: cleanlab's faster setting on 2 cores (its multiprocessing was slower here)
            return find_label_issues(labels, probs, filter_by=args.filter, return_indices_ranked_by=args.rank_by, n_jobs=1)
    else:
        from prunekit.data import find_label_issues

        def call():
            return find_label_issues(labels, probs, filter_by=args.filter, return_indices_ranked_by=args.rank_by)

    times, peak = [], None
    for i in range(args.repeats):
        before = rss_mb()
        reset_peak()
        start = time.perf_counter()
        result = call()
        times.append(time.perf_counter() - start)
        if i == 0:
            peak = peak_rss_mb() - before
            np.save(args.out, np.asarray(result))
        del result
    print(json.dumps({"seconds": min(times), "seconds_all": times, "peak_mb": peak}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
