"""Run kvpress 0.5.5 presses on the benchmark's tasks (worker of bench/kv_vs_kvpress.py).

Executed with the python of the kvpress venv (see ``bench/kvpress_env.py``), never imported by prunekit.
Reads a JSON file of jobs (token ids included), runs them one by one on one thread, and appends one JSON line
per finished job to the --out file (so a killed run keeps what finished).

    python bench/_kvpress_worker.py --model DIR --jobs jobs.json --out rows.jsonl
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import warnings
from contextlib import nullcontext

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
warnings.filterwarnings("ignore")

import torch  # noqa: E402

import _kv_tasks as tasks  # noqa: E402


def make_press(name: str, ratio: float):
    from kvpress import ExpectedAttentionPress, KnormPress, SnapKVPress, StreamingLLMPress

    return {"snapkv": SnapKVPress, "streaming_llm": StreamingLLMPress, "knorm": KnormPress,
            "expected_attention": ExpectedAttentionPress}[name](compression_ratio=ratio)


def ratio_for(budget: int, n: int) -> float:
    """kvpress keeps int(n * (1 - ratio)) tokens: this ratio keeps exactly `budget` (0 when n <= budget)."""
    return 0.0 if n <= budget else 1.0 - (budget + 0.5) / n


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--jobs", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    from importlib.metadata import version

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # its "Loading weights" bar filled each log with ~270 redrawn lines per run
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(args.model)
    jobs = json.load(open(args.jobs))
    speed = [job for job in jobs if job["task"] == "speed"]
    if speed:  # untimed, as prunekit's side does before its speed jobs
        tasks.warm_up(model, speed[0]["sample"], new_tokens=speed[0]["new_tokens"])
    for job in jobs:
        start = time.perf_counter()
        name, budget, task = job["policy"], job["budget"], job["task"]
        if task in ("passkey", "speed"):
            n = len(job["sample"]["context_ids"])
            press = None if name == "full" else make_press(name, ratio_for(budget, n))
            pre = (lambda: press(model)) if press is not None else nullcontext
            res = tasks.passkey(model, job["sample"], prefill_ctx=pre, new_tokens=job["new_tokens"], timed=task == "speed")
            res["text"] = tok.decode(res["generated"], skip_special_tokens=True)
            res["correct"] = tasks.exact_match(res["text"], job["sample"]["answer"])
        elif task == "ppl":
            press = None if name == "full" else make_press(name, ratio_for(budget, job["context"]))
            pre = (lambda: press(model)) if press is not None else nullcontext
            res = tasks.continuation_nll(model, job["ids"], context=job["context"], prefill_ctx=pre)
        else:
            raise SystemExit(f"unknown task {task}")
        res.update(key=job["key"], seconds=time.perf_counter() - start, kvpress=version("kvpress"),
                   transformers=version("transformers"))
        with open(args.out, "a") as f:
            f.write(json.dumps(res) + "\n")
        print(f"[kvpress_worker] {job['key']} {res['seconds']:.1f}s", file=sys.stderr, flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
