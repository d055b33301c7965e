"""A run's record for people: ``report.md`` and a figure: ``layers.png`` (per-layer sparsity and reconstruction
error), ``widths.png`` (structured: heads and neurons kept per layer) or ``blocks.png`` (depth: blocks kept)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_report", "ppl_table", "plot_widths", "plot_blocks"]


def ppl_table(evals: dict) -> str:
    """Markdown table of dense vs pruned perplexity: `evals` is ``{text: {"dense": Perplexity|dict, "pruned": ...}}``;
    a ``"before_recovery"`` entry (depth pruning with --recover) adds its column, and "pruned" is after recovery."""
    staged = any("before_recovery" in pair for pair in evals.values())
    lines = ["| text | windows x seqlen = tokens | dense ppl | " + ("before recovery ppl | recovered ppl"
                                                                   if staged else "pruned ppl") + " | ratio |",
             "| --- | --- | ---: | ---: | ---: |" + (" ---: |" if staged else "")]
    for name, pair in evals.items():
        d, p = (x if isinstance(x, dict) else x.to_dict() for x in (pair["dense"], pair["pruned"]))
        before = pair.get("before_recovery")
        before = before.to_dict() if before is not None and not isinstance(before, dict) else before
        middle = (f" {before['ppl']:.3f} |" if before else " |") if staged else ""
        lines.append(f"| {name} | {d['windows']} x {d['seqlen']} = {d['tokens']} | {d['ppl']:.3f} |{middle} "
                     f"{p['ppl']:.3f} | {p['ppl'] / d['ppl']:.3f} |")
    return "\n".join(lines)


def figure(nrows: int = 1, ncols: int = 1, **kwargs):
    """A figure and its axes without pyplot: ``matplotlib.use("Agg")`` switched the caller's backend for the rest
    of the process (an interactive or notebook session stopped showing its figures)."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=kwargs.pop("figsize", None))
    return fig, fig.subplots(nrows, ncols, **kwargs)


def _save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def plot_widths(path: Path, widths: list[tuple[int, int]], dense: tuple[int, int], title: str) -> None:
    """Structured pruning: the fraction of query heads and of MLP neurons each layer keeps."""
    fig, ax = figure(figsize=(9, 3.5))
    xs = list(range(len(widths)))
    ax.plot(xs, [h / dense[0] for h, _ in widths], marker="o", label=f"query heads (of {dense[0]})")
    ax.plot(xs, [n / dense[1] for _, n in widths], marker="s", label=f"MLP neurons (of {dense[1]})")
    ax.set_ylim(0, 1.05)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("layer")
    ax.set_ylabel("fraction kept")
    ax.legend(fontsize=8)
    ax.set_title(title)
    _save(fig, path)


def plot_blocks(path: Path, depth: int, kept: list[int], title: str, scores: list[float] | None = None,
                score_name: str = "") -> None:
    """Depth pruning: one bar per block, kept or removed; its height is the method's score when it has one."""
    fig, ax = figure(figsize=(9, 3.5))
    heights = scores if scores is not None else [1.0] * depth
    colors = ["tab:blue" if i in kept else "lightgray" for i in range(depth)]
    ax.bar(range(depth), heights, color=colors)
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_xlabel("block (blue: kept, gray: removed)")
    ax.set_ylabel(score_name if scores is not None else "")
    if scores is None:
        ax.set_yticks([])
    ax.set_title(title)
    _save(fig, path)


def _plot(path: Path, layers: list[dict], title: str) -> None:
    """One line per kind of Linear (q_proj, down_proj, ...) against its block index."""
    import re

    series: dict[str, list[tuple[int, float, float]]] = {}
    for r in layers:
        match = re.search(r"\.(\d+)\.(.+)$", r["name"])
        block, kind = (int(match.group(1)), match.group(2)) if match else (0, r["name"])
        err = r["rel_error"] if r["rel_error"] is not None else float("nan")
        series.setdefault(kind, []).append((block, r["sparsity"], err))
    fig, (ax1, ax2) = figure(2, 1, figsize=(9, 6), sharex=True)
    for kind, points in series.items():
        xs, sp, er = zip(*points)
        ax1.plot(xs, sp, marker=".", label=kind)
        ax2.plot(xs, er, marker=".", label=kind)
    ax1.set_ylabel("sparsity")
    ax1.set_ylim(0, 1)
    ax2.set_ylabel("relative reconstruction error")
    ax2.set_xlabel("block")
    ax2.legend(fontsize=7, ncol=4)
    fig.suptitle(title)
    _save(fig, path)


def unreached_layers(layers: list[dict]) -> list[str]:
    """Names of the layers of a ``prunekit.json`` record that no calibration token reached (MoE experts)."""
    return [r["name"] for r in layers if (r.get("info") or {}).get("calibration_tokens") == 0]


def write_report(folder: Path, meta: dict) -> None:
    """Write ``report.md`` and ``layers.png`` into `folder` from the ``prunekit.json`` record `meta`."""
    folder = Path(folder)
    layers = meta["layers"]
    shape = meta["pattern"] or "{:.0%} unstructured".format(meta["ratio"])
    profile = meta.get("profile")  # OWL's block ratios (None: uniform)
    title = f"{meta['method']} {shape}" + (f" ({profile['name'].upper()} block ratios)" if profile else "")
    _plot(folder / "layers.png", layers, title)
    calib = meta.get("calibration")
    out = [
        f"# prunekit: {title}",
        "",
        f"- model: `{meta['model']}`",
        f"- method: {meta['method']}, ratio {meta['ratio']:g}, pattern {meta['pattern'] or 'unstructured'}, order `{meta['sequential']}`",
        f"- calibration: {calib['samples']} x {calib['seqlen']} tokens of {calib['source']} ({calib.get('documents', '')}), "
        f"sha256 `{calib.get('sha256', '-')[:16]}`" if calib else "- calibration: none (data-free)",
        f"- measured sparsity of the pruned layers: {meta['total_sparsity']:.4f}",
        f"- pruning wall time: {meta['seconds']:.1f} s",
    ]
    if profile:
        ratios = profile["ratios"]
        out.append(f"- block ratios: OWL (M={profile['m']:g}, lambda={profile['lambda']:g}) from each block's share of "
                   f"|W| x ||X|| scores above M x its mean ({min(profile['outlier_ratios']):.2f}% to "
                   f"{max(profile['outlier_ratios']):.2f}%): {min(ratios):.4f} to {max(ratios):.4f}, mean "
                   f"{sum(ratios) / len(ratios):.4f}; by block: {', '.join(f'{r:.3f}' for r in ratios)}")
    if meta.get("compute_dtype", "float32") != "float32":  # prune --compute-dtype
        out.append(f"- computed in {meta['compute_dtype']}: the weights and activations in that dtype, the "
                   "calibration statistics and weight updates summed in float32")
    earlier = (meta.get("input") or {}).get("prunekit")
    if earlier or meta.get("input_sparsity"):  # a chain: what the input already was
        how = ", ".join(str(x) for x in (earlier.get("method"), earlier.get("pattern")) if x) if earlier else ""
        if earlier and earlier.get("compute_dtype") not in (None, "float32"):  # prune --compute-dtype
            how += f", computed in {earlier['compute_dtype']}"
        what = f"made by prunekit ({how}) from `{earlier.get('model')}`; " if earlier else ""  # depth: no pattern
        refilled = meta.get("input_zeros_refilled") or 0
        out.insert(3, f"- input: {what}sparsity of these layers before: {meta.get('input_sparsity') or 0:.4f}"
                   + (f", {refilled:,} of its zeros made nonzero again" if refilled else ""))
    opts = meta.get("options") or {}
    if opts.get("skip"):
        out.append(f"- left dense (`--skip`): {', '.join(f'`{g}`' for g in opts['skip'])}")
    other = {k: v for k, v in opts.items() if k != "skip"}
    if other:
        out.append(f"- method options: {', '.join(f'{k}={v!r}' for k, v in other.items())}")
    if meta.get("pattern_violations") is not None:
        out.append(f"- layers breaking {meta['pattern']}: {len(meta['pattern_violations'])}")
    unreached = unreached_layers(layers)
    if unreached:
        out.append(f"- layers no calibration token reached (mixture-of-experts experts the router never picked on "
                   f"the calibration text): {len(unreached)} of {len(layers)}, pruned as for white inputs (by |W|); "
                   "more or longer calibration samples reach more of them")
    if meta.get("evaluation"):
        out += ["", "## Perplexity", "", ppl_table(meta["evaluation"]), "",
                "The dense baseline is the model as loaded (for the zoo model: dequantized from 4-bit GGUF, so "
                "already a little lossy)."]
    out += ["", "## Layers", "", "![per-layer sparsity and error](layers.png)", "",
            "Relative reconstruction error is ||(W - W') X||_F / ||W X||_F on up to 512 sampled calibration "
            "tokens of each layer's own input; `-`: not measured (the method measures none, or no calibration "
            "token reached the layer).", "",
            "| layer | shape | sparsity | rel. error |", "| --- | --- | ---: | ---: |"]
    for r in layers:
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
        out.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.4f} | {err} |")
    (folder / "report.md").write_text("\n".join(out) + "\n")
