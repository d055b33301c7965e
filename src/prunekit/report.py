"""A run's record for people: ``report.md`` and ``layers.png`` (per-layer sparsity and reconstruction error)."""

from __future__ import annotations

from pathlib import Path

__all__ = ["write_report", "ppl_table"]


def ppl_table(evals: dict) -> str:
    """Markdown table of dense vs pruned perplexity: `evals` is ``{text: {"dense": Perplexity|dict, "pruned": ...}}``."""
    lines = ["| text | tokens x seqlen | dense ppl | pruned ppl | ratio |", "| --- | --- | ---: | ---: | ---: |"]
    for name, pair in evals.items():
        d, p = (x if isinstance(x, dict) else x.to_dict() for x in (pair["dense"], pair["pruned"]))
        lines.append(
            f"| {name} | {d['windows']} x {d['seqlen']} = {d['tokens']} | {d['ppl']:.3f} | {p['ppl']:.3f} | {p['ppl'] / d['ppl']:.3f} |"
        )
    return "\n".join(lines)


def _plot(path: Path, layers: list[dict], title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["name"] for r in layers]
    fig, (ax1, ax2) = plt.subplots(2, 1, figsize=(max(8, len(names) * 0.06), 6), sharex=True)
    x = range(len(names))
    ax1.bar(x, [r["sparsity"] for r in layers], width=1.0, color="tab:blue")
    ax1.set_ylabel("sparsity")
    ax1.set_ylim(0, 1)
    errs = [r["rel_error"] if r["rel_error"] is not None else float("nan") for r in layers]
    ax2.bar(x, errs, width=1.0, color="tab:red")
    ax2.set_ylabel("relative reconstruction error")
    ax2.set_xlabel("layer (block order)")
    step = max(1, len(names) // 30)
    ax2.set_xticks(list(x)[::step])
    ax2.set_xticklabels([n.split(".", 2)[-1] for n in names][::step], rotation=90, fontsize=6)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def write_report(folder: Path, meta: dict) -> None:
    """Write ``report.md`` and ``layers.png`` into `folder` from the ``prunekit.json`` record `meta`."""
    folder = Path(folder)
    layers = meta["layers"]
    shape = meta["pattern"] or "{:.0%} unstructured".format(meta["ratio"])
    title = f"{meta['method']} {shape}"
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
    if meta.get("pattern_violations") is not None:
        out.append(f"- layers breaking {meta['pattern']}: {len(meta['pattern_violations'])}")
    if meta.get("evaluation"):
        out += ["", "## Perplexity", "", ppl_table(meta["evaluation"]), "",
                "The dense baseline is the model as loaded (for the zoo model: dequantized from 4-bit GGUF, so "
                "already a little lossy)."]
    out += ["", "## Layers", "", "![per-layer sparsity and error](layers.png)", "",
            "Relative reconstruction error is ||(W - W') X||_F / ||W X||_F on up to 1,024 sampled calibration "
            "tokens of each layer's own input.", "",
            "| layer | shape | sparsity | rel. error |", "| --- | --- | ---: | ---: |"]
    for r in layers:
        err = "-" if r["rel_error"] is None else f"{r['rel_error']:.4f}"
        out.append(f"| {r['name']} | {r['shape'][0]}x{r['shape'][1]} | {r['sparsity']:.4f} | {err} |")
    (folder / "report.md").write_text("\n".join(out) + "\n")
