"""ARMOR's factorized layer on CUDA: PyTorch's semi-structured 2:4 kernel against the dense products.

`ArmorLinear` computes ``y = A (core (B x))`` with a 2:4 core. On a CUDA GPU of compute capability >= 8.0 in
fp16/bf16 the core product runs through ``torch.sparse.to_sparse_semi_structured`` (cuSPARSELt, or CUTLASS
where cuSPARSELt is missing). This bench times, per layer shape and number of token rows:

- ``dense``: ``F.linear(x, W)`` with the dense equivalent ``W = A core B`` (what a saved checkpoint runs);
- ``core_dense`` / ``core_sparse``: the core product alone, dense and through the semi-structured kernel;
- ``armor_dense`` / ``armor_sparse``: the whole `ArmorLinear` forward with the core dense or sparse;
- ``*_graph``: the same calls captured in a CUDA graph and replayed, as a compiled model would run them;
- ``core_*_host`` / ``core_*_kernel``: for the core product, the host's time to issue one call and its GPU
  kernels' time (torch.profiler), which tell a launch-bound call from a slow kernel;

and checks the sparse forward against an fp32 product of the dense equivalent. Shapes: SmolLM2-135M's block
Linears and a Llama-7B-sized attention and MLP layer; block size 128 (the paper's scripts). Timings are CUDA-event
medians after warm-up. Needs a CUDA GPU; no CPU fallback (there is nothing to measure there).

    python bench/armor_cuda.py                       # bf16 and fp16, writes bench/results/armor_cuda.{json,md}
    python bench/armor_cuda.py --dtype bf16 --out /tmp/armor_cuda

Writes ``{"rows": [{"shape", "out", "in", "tokens", "dtype", "dense_us", "core_dense_us", "core_sparse_us",
"armor_dense_us", "armor_sparse_us", "core_dense_host_us", "core_dense_kernel_us", "core_sparse_host_us",
"core_sparse_kernel_us", "dense_graph_us", "core_dense_graph_us", "core_sparse_graph_us", "armor_dense_graph_us",
"armor_sparse_graph_us", "max_rel_err", "core_mb", "sparse_core_mb"}], "meta": {...}}`` and a markdown table.
"""

from __future__ import annotations

import argparse
import copy
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.autograd import DeviceType

from prunekit.weights.methods import armor

RESULTS = Path(__file__).resolve().parent / "results"
SHAPES = {  # name: (out, in)
    "smollm2 q/o_proj": (576, 576),
    "smollm2 k/v_proj": (192, 576),
    "smollm2 gate/up_proj": (1536, 576),
    "smollm2 down_proj": (576, 1536),
    "7b q/k/v/o_proj": (4096, 4096),
    "7b gate/up_proj": (11008, 4096),
    "7b down_proj": (4096, 11008),
}
TOKENS = (1, 64, 512, 4096)
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
BLOCK = 128


def random_module(out: int, inp: int, seed: int) -> armor.ArmorLinear:
    """A 2:4 core between block-diagonal factors near the identity (as a fit leaves them)."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(out, inp // 4, 4, generator=g).argsort(-1) < 2
    core = torch.randn(out, inp, generator=g) * keep.reshape(out, inp) / inp ** 0.5
    a = torch.eye(BLOCK) + 0.05 * torch.randn(-(-out // BLOCK), BLOCK, BLOCK, generator=g)
    b = torch.eye(BLOCK) + 0.05 * torch.randn(-(-inp // BLOCK), BLOCK, BLOCK, generator=g)
    return armor.ArmorLinear(core, a, b, 0.01 * torch.randn(out, generator=g))


def time_us(fn, reps: int) -> float:
    """Median microseconds of `fn` over `reps` CUDA-event-timed calls, after warm-up."""
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) * 1000)
    return statistics.median(times)


def host_and_kernel_us(fn, reps: int = 20) -> tuple[float, float]:
    """Per call: the host's microseconds to issue `fn` (no sync inside the loop) and its GPU kernels' time.

    The kernel time sums the CUDA kernel events torch.profiler records (not the CPU ops', which repeat it). A
    call whose host time exceeds its kernel time is launch-bound: the GPU waits on the host.
    """
    for _ in range(5):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    host = (time.perf_counter() - start) / reps * 1e6
    torch.cuda.synchronize()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                            torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    kernel = sum(e.self_device_time_total for e in prof.key_averages() if e.device_type == DeviceType.CUDA)
    return host, kernel / reps


def graph_us(fn, reps: int, expected: torch.Tensor | None = None) -> float | None:
    """`time_us` of `fn` captured once in a CUDA graph and replayed (the host's per-call work is skipped, as
    under ``torch.compile(mode="reduce-overhead")``); None when the capture fails (printed). With `expected`
    (fp32), a replay whose output is off by more than 0.05 of its max raises."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(3):
                fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            out = fn()
    except RuntimeError as e:
        print(f"  CUDA graph capture failed: {type(e).__name__}: {str(e)[:200]}", flush=True)
        return None
    if expected is not None:
        graph.replay()
        torch.cuda.synchronize()
        err = float((out.float() - expected).abs().max() / expected.abs().max())
        if not err <= 0.05:
            raise RuntimeError(f"the CUDA graph's replay is off by {err:.2g} of the output's max")
    return time_us(graph.replay, reps)


def sparse_bytes(sparse) -> int:
    """Bytes the semi-structured tensor holds (values and metadata; what exists in this PyTorch version)."""
    total = 0
    for name in ("packed", "meta", "packed_t", "meta_t", "compressed_swizzled_bitmask"):
        t = getattr(sparse, name, None)
        if isinstance(t, torch.Tensor):
            total += t.numel() * t.element_size()
    return total


def measure(name: str, base: armor.ArmorLinear, tokens: int, dtype: torch.dtype, reps: int) -> dict:
    out, inp = base.out_features, base.in_features
    module = copy.deepcopy(base).to("cuda", dtype)
    x = torch.randn(tokens, inp, device="cuda", dtype=dtype)
    weight = module.dense_weight().to(dtype)
    with torch.no_grad():
        y = module(x)
        sparse = module._sparse_core(x)
        if sparse is None or module._sparse_failed:
            raise RuntimeError(f"{name}: PyTorch refused the semi-structured core ({out}x{inp}, {dtype})")
        expected = x.float() @ module.dense_weight().float().T + module.bias.float()
        err = float((y.float() - expected).abs().max() / expected.abs().max())
        core = module.core.detach()
        xb = armor._forward_blocks(x, module.b).contiguous()  # as the module hands it to the core
        row = dict(shape=name, out=out, **{"in": inp}, tokens=tokens, dtype=str(dtype).replace("torch.", ""),
                   dense_us=time_us(lambda: F.linear(x, weight, module.bias), reps),
                   core_dense_us=time_us(lambda: F.linear(xb, core), reps),
                   core_sparse_us=time_us(lambda: F.linear(xb, sparse), reps),
                   armor_sparse_us=time_us(lambda: module(x), reps))
        row["core_dense_host_us"], row["core_dense_kernel_us"] = host_and_kernel_us(lambda: F.linear(xb, core))
        row["core_sparse_host_us"], row["core_sparse_kernel_us"] = host_and_kernel_us(lambda: F.linear(xb, sparse))
        row["dense_graph_us"] = graph_us(lambda: F.linear(x, weight, module.bias), reps)
        row["core_dense_graph_us"] = graph_us(lambda: F.linear(xb, core), reps)
        row["core_sparse_graph_us"] = graph_us(lambda: F.linear(xb, sparse), reps)
        row["armor_sparse_graph_us"] = graph_us(lambda: module(x), reps, expected)
        module.sparse_kernel = False  # the same module with its core product dense
        row["armor_dense_us"] = time_us(lambda: module(x), reps)
        row["armor_dense_graph_us"] = graph_us(lambda: module(x), reps)
    row["max_rel_err"] = err
    row["core_mb"] = core.numel() * core.element_size() / 2**20
    row["sparse_core_mb"] = sparse_bytes(sparse) / 2**20
    return row


def _us(v) -> str:
    return "failed" if v is None else f"{v:.1f}"


def _ratio(num, den, suffix: str = "") -> str:
    return "-" if num is None or den is None else f"{num / den:.2f}{suffix}"


def table(rows: list[dict]) -> str:
    """Two markdown tables: eager calls, then the same calls replayed from CUDA graphs."""
    head = ("| layer | out x in | tokens | dtype | dense W (us) | core dense (us) | core 2:4 (us) | core speedup "
            "| core 2:4 host / kernel (us) | ARMOR dense core (us) | ARMOR 2:4 core (us) | ARMOR 2:4 / dense W "
            "| max rel err |")
    lines = [head, "|" + "---|" * 13]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['out']}x{r['in']} | {r['tokens']} | {r['dtype']} | {r['dense_us']:.1f} "
            f"| {r['core_dense_us']:.1f} | {r['core_sparse_us']:.1f} "
            f"| {_ratio(r['core_dense_us'], r['core_sparse_us'], 'x')} "
            f"| {r['core_sparse_host_us']:.1f} / {r['core_sparse_kernel_us']:.1f} | {r['armor_dense_us']:.1f} "
            f"| {r['armor_sparse_us']:.1f} | {_ratio(r['armor_sparse_us'], r['dense_us'])} | {r['max_rel_err']:.1e} |")
    lines += ["", "CUDA-graph replay (the host's per-call work skipped):", "",
              "| layer | out x in | tokens | dtype | dense W (us) | core dense (us) | core 2:4 (us) | core speedup "
              "| ARMOR dense core (us) | ARMOR 2:4 core (us) | ARMOR 2:4 / dense W |", "|" + "---|" * 11]
    for r in rows:
        lines.append(
            f"| {r['shape']} | {r['out']}x{r['in']} | {r['tokens']} | {r['dtype']} | {_us(r['dense_graph_us'])} "
            f"| {_us(r['core_dense_graph_us'])} | {_us(r['core_sparse_graph_us'])} "
            f"| {_ratio(r['core_dense_graph_us'], r['core_sparse_graph_us'], 'x')} | {_us(r['armor_dense_graph_us'])} "
            f"| {_us(r['armor_sparse_graph_us'])} | {_ratio(r['armor_sparse_graph_us'], r['dense_graph_us'])} |")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--dtype", choices=[*DTYPES, "both"], default="both")
    ap.add_argument("--reps", type=int, default=50, help="timed calls per measurement (median reported)")
    ap.add_argument("--out", default=str(RESULTS / "armor_cuda"), help="path stem of the .json and .md written")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available() or torch.cuda.get_device_capability()[0] < 8:
        print("armor_cuda: needs a CUDA GPU of compute capability >= 8.0", file=sys.stderr)
        return 2
    dtypes = list(DTYPES) if args.dtype == "both" else [args.dtype]
    rows, failed = [], []
    for name, (out, inp) in SHAPES.items():
        base = random_module(out, inp, seed=out * 7 + inp)
        for dt in dtypes:
            for tokens in TOKENS:
                try:
                    r = measure(name, base, tokens, DTYPES[dt], args.reps)
                except (RuntimeError, ValueError, NotImplementedError) as e:  # reported, not hidden
                    print(f"{dt} {name} {tokens} tokens: {type(e).__name__}: {e}", flush=True)
                    failed.append(dict(shape=name, out=out, **{"in": inp}, tokens=tokens, dtype=dt,
                                       error=f"{type(e).__name__}: {e}"))
                    continue
                rows.append(r)
                print(f"{dt} {name:22s} {tokens:5d} tok: dense {r['dense_us']:8.1f} us, core {r['core_dense_us']:8.1f}"
                      f" -> 2:4 {r['core_sparse_us']:8.1f} us, ARMOR {r['armor_dense_us']:8.1f} -> "
                      f"{r['armor_sparse_us']:8.1f} us, err {r['max_rel_err']:.1e}; 2:4 core host "
                      f"{r['core_sparse_host_us']:.1f} kernel {r['core_sparse_kernel_us']:.1f} us; graphed: dense "
                      f"{_us(r['dense_graph_us'])}, core 2:4 {_us(r['core_sparse_graph_us'])}, ARMOR 2:4 "
                      f"{_us(r['armor_sparse_graph_us'])} us", flush=True)
    sparse = torch.sparse.SparseSemiStructuredTensor
    cusparselt = getattr(torch.backends, "cusparselt", None)
    meta = dict(gpu=torch.cuda.get_device_name(), capability=list(torch.cuda.get_device_capability()),
                torch=torch.__version__, python=platform.python_version(), block_size=BLOCK, reps=args.reps,
                cusparselt=bool(cusparselt and cusparselt.is_available()),
                force_cutlass=bool(getattr(sparse, "_FORCE_CUTLASS", False)))
    stem = Path(args.out)
    stem.parent.mkdir(parents=True, exist_ok=True)
    stem.with_suffix(".json").write_text(json.dumps({"rows": rows, "failed": failed, "meta": meta}, indent=1) + "\n")
    note = (f"# ARMOR's factorized layer on CUDA\n\n{meta['gpu']} (compute capability "
            f"{'.'.join(map(str, meta['capability']))}), torch {meta['torch']}, cuSPARSELt available: "
            f"{meta['cusparselt']}. Block size {BLOCK}; CUDA-event medians of {args.reps} calls after warm-up. "
            "'dense W' is the dense equivalent A·core·B as one Linear; 'core' the core product alone; 'ARMOR' "
            "the whole factorized forward (B, core, A). 'host / kernel': the host's time to issue one 2:4 core product "
            "and its GPU kernels' time (torch.profiler); where host exceeds kernel the call is launch-bound. "
            "Written by `python bench/armor_cuda.py`.\n\n")
    fails = "".join(f"\n- {f['shape']} ({f['out']}x{f['in']}), {f['tokens']} tokens, {f['dtype']}: {f['error']}"
                    for f in failed)
    stem.with_suffix(".md").write_text(note + table(rows) + "\n" + (f"\nFailed:{fails}\n" if failed else ""))
    print(table(rows) + (f"\nFailed:{fails}" if failed else ""))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
