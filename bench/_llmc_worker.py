"""Run llm-compressor 0.14 pruning on a local HF model (benchmark worker).

Executed with the python of the llm-compressor venv (see ``bench/llmc_env.py``),
never imported by prunekit itself.  Prints exactly ONE JSON line on stdout;
everything else (including llm-compressor's loguru output, which defaults to
stdout, and tqdm bars) is redirected to stderr.

Example::

    python bench/_llmc_worker.py --model DIR --calib calib.safetensors \
        --method sparsegpt --pattern 2:4 --ratio 0.5 --out OUT [--threads 2]
"""

from __future__ import annotations

import os
import sys

# --- keep stdout clean: only the final JSON line goes to the real stdout -----
_REAL_STDOUT = os.fdopen(os.dup(1), "w")
os.dup2(2, 1)  # C-level / subprocess writes to fd 1 now go to stderr
sys.stdout = sys.stderr  # python-level prints (loguru captured sys.stdout at import)

import argparse  # noqa: E402
import json  # noqa: E402
import re  # noqa: E402
import time  # noqa: E402

from _memory import peak_rss_mb  # noqa: E402  (bench/ is this script's folder)
from pathlib import Path  # noqa: E402

LAYER_TARGET = r"re:^model\.layers\.\d+$"


def log(msg: str) -> None:
    print(f"[llmc_worker] {msg}", file=sys.stderr, flush=True)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="local HF folder (config.json + safetensors)")
    p.add_argument("--calib", required=True, help="safetensors file with int64 'input_ids' [n, seqlen]")
    p.add_argument("--method", required=True, choices=["wanda", "sparsegpt"])
    p.add_argument("--pattern", default="unstructured",
                   help="'unstructured' or 'N:M' = keep N of every M (prunekit convention)")
    p.add_argument("--ratio", type=float, default=0.5, help="sparsity for unstructured")
    p.add_argument("--out", required=True, help="output folder for the pruned dense model")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32",
                   help="the dtype the model is loaded and pruned in")
    p.add_argument("--profile", choices=["uniform", "owl"], default="uniform",
                   help="owl: sparsity_profile='owl' with --owl-m / --owl-lambda (owl_m, owl_lmbda)")
    p.add_argument("--owl-m", type=float, default=5.0)
    p.add_argument("--owl-lambda", type=float, default=0.08)
    return p.parse_args(argv)


def mask_structure(pattern: str, ratio: float) -> tuple[str, float]:
    """Translate prunekit's pattern to llm-compressor's (mask_structure, sparsity).

    llm-compressor's ``mask_structure="N:M"`` marks the N *smallest* scores of every
    M consecutive input columns for pruning, i.e. it means "prune N of M".
    prunekit's "N:M" means "keep N of M", so keep N <=> prune M-N.
    For N:M llm-compressor ignores ``sparsity``; we pass the implied value.
    """
    if pattern == "unstructured":
        if not 0.0 < ratio < 1.0:
            raise SystemExit(f"--ratio must be in (0, 1), got {ratio}")
        return "0:0", ratio
    m = re.fullmatch(r"(\d+):(\d+)", pattern)
    if not m:
        raise SystemExit(f"--pattern must be 'unstructured' or 'N:M', got {pattern!r}")
    keep, group = int(m.group(1)), int(m.group(2))
    if not 0 < keep < group:
        raise SystemExit(f"--pattern N:M needs 0 < N < M, got {pattern!r}")
    implied = (group - keep) / group
    if abs(implied - ratio) > 1e-9:
        log(f"note: --ratio {ratio} ignored for {pattern}; implied sparsity {implied:.4f}")
    return f"{group - keep}:{group}", implied


def main(argv=None) -> int:
    args = parse_args(argv)
    structure, sparsity = mask_structure(args.pattern, args.ratio)

    import torch

    if args.threads:
        torch.set_num_threads(args.threads)

    import llmcompressor
    import transformers
    from datasets import Dataset
    from llmcompressor import oneshot
    from llmcompressor.modifiers.pruning import SparseGPTModifier, WandaPruningModifier
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    log(f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"transformers {transformers.__version__}, llmcompressor {llmcompressor.__version__}")

    # ---- calibration data: exactly these n sequences, in this order ----------
    input_ids = load_file(args.calib)["input_ids"]
    if input_ids.dtype != torch.int64 or input_ids.dim() != 2:
        raise SystemExit(f"'input_ids' must be int64 [n, seqlen], got {input_ids.dtype} "
                         f"{tuple(input_ids.shape)}")
    n, seqlen = input_ids.shape
    ds = Dataset.from_dict({
        "input_ids": input_ids.tolist(),
        "attention_mask": torch.ones_like(input_ids).tolist(),
    })
    log(f"calibration: {n} x {seqlen} tokens")

    # ---- model ---------------------------------------------------------------
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=getattr(torch, args.dtype),
                                                 trust_remote_code=False)
    model.eval()
    try:  # passed to oneshot so it does not load a processor inside the timed call
        tokenizer = AutoTokenizer.from_pretrained(args.model, trust_remote_code=False)
    except Exception as e:  # pragma: no cover - tokenizer is optional
        log(f"no tokenizer loaded ({e}); continuing without")
        tokenizer = None

    common = dict(sparsity=sparsity, mask_structure=structure, targets=[LAYER_TARGET])
    if args.profile == "owl":
        common.update(sparsity_profile="owl", owl_m=args.owl_m, owl_lmbda=args.owl_lambda)
    if args.method == "wanda":
        modifier = WandaPruningModifier(**common)
    else:  # defaults: block_size=128, dampening_frac=0.01
        modifier = SparseGPTModifier(**common)
    log(f"recipe: {modifier!r}")

    oneshot_kwargs = dict(
        model=model,
        recipe=modifier,
        dataset=ds,
        num_calibration_samples=n,
        max_seq_length=seqlen,
        shuffle_calibration_samples=False,  # LengthAwareSampler: all n samples, no RNG
        batch_size=1,
        pad_to_max_length=False,
        output_dir=None,  # we save ourselves, outside the timed region
    )
    if tokenizer is not None:
        oneshot_kwargs["processor"] = tokenizer

    t0 = time.perf_counter()
    model = oneshot(**oneshot_kwargs)
    seconds = time.perf_counter() - t0
    pruning_peak = peak_rss_mb()  # before saving: the pruning run's own peak
    log(f"oneshot took {seconds:.2f}s")

    # ---- save as plain dense safetensors -------------------------------------
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    cfg = model.config
    for attr in ("quantization_config", "compression_config", "sparsity_config"):
        if hasattr(cfg, attr):
            delattr(cfg, attr)
    # bypass llm-compressor's save_pretrained wrapper (it writes compression config)
    type(model).save_pretrained(model, str(out), safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(str(out))
    cfg_path = out / "config.json"
    data = json.loads(cfg_path.read_text())
    stripped = [k for k in ("quantization_config", "compression_config", "sparsity_config")
                if data.pop(k, None) is not None]
    if stripped:
        log(f"stripped {stripped} from config.json")
        cfg_path.write_text(json.dumps(data, indent=2) + "\n")
    log(f"saved to {out}")

    result = {
        "seconds": seconds,
        "peak_rss_mb": pruning_peak,
        "peak_rss_process_mb": peak_rss_mb(),
        "llmcompressor": llmcompressor.__version__,
        "transformers": transformers.__version__,
        "method": args.method,
        "pattern": args.pattern,
        "mask_structure": structure,
        "n_calib": int(n),
        "seqlen": int(seqlen),
        "threads": torch.get_num_threads(),
    }
    _REAL_STDOUT.write(json.dumps(result) + "\n")
    _REAL_STDOUT.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
