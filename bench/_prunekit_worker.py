"""Run one prunekit pruning job for the benchmark, in its own process so its memory and time are its own.

Mirrors ``_llmc_worker.py``: the same model folder, the same calibration token ids (safetensors
``input_ids`` [n, seqlen]), one JSON line on stdout with the seconds of the pruning call alone.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

from _memory import peak_rss_mb  # noqa: E402  (bench/ is this script's folder)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--calib", required=True)
    p.add_argument("--method", required=True)
    p.add_argument("--pattern", default="unstructured")
    p.add_argument("--ratio", type=float, default=0.5)
    p.add_argument("--sequential", default="block")
    p.add_argument("--out", required=True)
    p.add_argument("--profile", choices=["uniform", "owl"], default="uniform")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the dtype the model is loaded and pruned in (prune --compute-dtype); saved as the input")
    args = p.parse_args()

    import torch
    import transformers
    from safetensors.torch import load_file

    import prunekit

    ids = load_file(args.calib)["input_ids"]
    model, tok = prunekit.load_model(args.model, dtype=args.dtype)
    pattern = None if args.pattern == "unstructured" else args.pattern
    start = time.perf_counter()
    result = prunekit.prune(model, method=args.method, ratio=None if pattern else args.ratio, pattern=pattern,
                            calibration=ids, sequential=args.sequential, progress=False, profile=args.profile,
                            **({"owl_m": args.owl_m, "owl_lambda": args.owl_lambda} if args.profile == "owl" else {}))
    seconds = time.perf_counter() - start
    pruning_peak = peak_rss_mb()  # before saving: the pruning run's own peak
    prunekit.save_pruned(model, tok, args.out, metadata=result.to_dict() | {"layers": len(result.layers)}, overwrite=True)
    print(json.dumps({"seconds": seconds, "peak_rss_mb": pruning_peak, "peak_rss_process_mb": peak_rss_mb(),
                      "prunekit": prunekit.__version__, "transformers": transformers.__version__,
                      "threads": torch.get_num_threads(), "sequential": args.sequential,
                      "block_ratios": (result.profile or {}).get("ratios")}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
