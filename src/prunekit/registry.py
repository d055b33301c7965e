"""Every method prunekit knows: name -> spec. One explicit table, no import magic.

>>> get("wanda").stats
'norms'
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from prunekit.errors import InputError
from prunekit.cnn import trp, udfc
from prunekit import depth
from prunekit.data.methods import confident, el2n, forgetting, grand, prototypes, qtuning
from prunekit.inference.kv import DeepForcing, Delta, H2O, Knorm, SnapKV, StreamingLLM
from prunekit.inference import memory, reasoning
from prunekit.structured import baselines as structured_baselines, tyr
from prunekit.weights.methods import armor, dpruner, dsnot, magnitude, sparsegpt, wanda

__all__ = ["MethodSpec", "METHODS", "get", "names"]


@dataclass(frozen=True)
class MethodSpec:
    """A registered method: its name, domain, entry point, paper and what it needs (see `prunekit methods`)."""
    name: str
    # "weights" | "data" | "cnn" | "kv" | "inference" (reasoning paths) | "memory" | "structured" | "depth" (whole blocks)
    domain: str
    paper: str
    url: str
    summary: str
    # weights domain: the calibration statistic the method reads ("norms", "hessian") or None (data-free),
    # and ``fn(weight[out, in] fp32, stats, *, ratio, pattern, **options) -> pruned weight``.
    # data domain: ``fn`` is the scoring function (difficulty per example, or a label-issue mask), or for
    # Q-Tuning the selection ``fn(nll, entropy, response, *, sample_ratio, token_ratio) -> Selection``.
    # kv domain: ``fn`` is the policy class (`prunekit.inference.kv.policy(model, name, budget=...)` runs it).
    # inference domain: ``fn`` is the rule over one question's sampled paths, ``fn(answers, ...) -> Vote``.
    # memory domain: ``fn`` is the conversation memory class (``Memory(path).add / .prompt / .forget``).
    # depth domain: ``fn`` returns a keep-mask over the blocks of a `prunekit.depth.DepthTarget`.
    # `stats` may also be a function of the method's options returning the statistic's name (DSnoT).
    # A method that needs the whole model (gradients, several corpora) gives `prune_model(model, ids, *,
    # ratio, pattern, tokenizer, samples, seqlen, seed, skip, progress, **options) -> [LayerReport]` instead.
    stats: str | Callable | None = None
    fn: Callable | None = None
    prune_model: Callable | None = None

    def stat_for(self, options: dict):
        """The statistic this method reads with these options (a name, a function of the layer name, or None)."""
        return self.stats(**options) if callable(self.stats) else self.stats


METHODS: dict[str, MethodSpec] = {
    spec.name: spec
    for spec in (
        MethodSpec(
            "magnitude", "weights", "Han et al. 2015, Learning both Weights and Connections",
            "https://arxiv.org/abs/1506.02626", "remove the smallest |W| per layer (data-free)",
            stats=None, fn=magnitude.prune_weight,
        ),
        MethodSpec(
            "wanda", "weights", "Sun et al. 2024, A Simple and Effective Pruning Approach for LLMs (Wanda)",
            "https://arxiv.org/abs/2306.11695", "|W| x input-feature norm, compared per output row",
            stats="norms", fn=wanda.prune_weight,
        ),
        MethodSpec(
            "sparsegpt", "weights", "Frantar & Alistarh 2023, SparseGPT",
            "https://arxiv.org/abs/2301.00774", "OBS saliency with Hessian-based update of kept weights",
            stats="hessian", fn=sparsegpt.prune_weight,
        ),
        MethodSpec(
            "dsnot", "weights", "Zhang et al. 2024, Dynamic Sparse No Training: Training-Free Fine-tuning for Sparse LLMs (DSnoT)",
            "https://arxiv.org/abs/2310.08915",
            "prune-and-grow swaps on a magnitude/Wanda/SparseGPT mask that cancel each row's expected output shift",
            stats=dsnot.stats_for, fn=dsnot.prune_weight,
        ),
        MethodSpec(
            "armor", "weights", "Liu et al. 2026, ARMOR: High-Performance Semi-Structured Pruning via Adaptive Matrix Factorization",
            "https://github.com/LawrenceRLiu/ARMOR",
            "N:M core between block-diagonal A and B, fitted by block coordinate descent from SparseGPT's solution",
            stats="hessian", fn=armor.prune_weight,
        ),
        MethodSpec(
            "dpruner", "weights", "Zhang et al. 2024, Pruning as a Domain-specific LLM Extractor (D-Pruner)",
            "https://arxiv.org/abs/2405.06275",
            "domain-gradient (Taylor) importance plus the general OBS importance, normalised per layer (unstructured)",
            stats="hessian", prune_model=dpruner.prune_model,
        ),
        MethodSpec(
            "shortgpt", "depth", "Men et al. 2024, ShortGPT: Layers in Large Language Models are More Redundant Than You Expect",
            "https://arxiv.org/abs/2403.03853", "drop the blocks of lowest Block Influence, 1 - cos(input, output)",
            fn=depth.shortgpt,
        ),
        MethodSpec(
            "sensitivity", "depth", "Fang et al. 2025, TinyFusion (sensitivity-analysis baseline)",
            "https://arxiv.org/abs/2412.01199", "drop the blocks whose removal alone raises the calibration loss least",
            fn=depth.sensitivity,
        ),
        MethodSpec(
            "every-other", "depth", "fixed pattern (TinyFusion's BK-SDM oracle for 1:2)", "https://arxiv.org/abs/2412.01199",
            "keep evenly spaced blocks, first and last included", fn=depth.every_other,
        ),
        MethodSpec(
            "random", "depth", "Fang et al. 2025, TinyFusion (loss-stratified random baseline)",
            "https://arxiv.org/abs/2412.01199", "the calibration-loss-best of a few random keep-masks",
            fn=depth.random_masks,
        ),
        MethodSpec(
            "tinyfusion", "depth", "Fang et al. 2025, TinyFusion: Diffusion Transformers Learned Shallow",
            "https://arxiv.org/abs/2412.01199", "learn an N:M mask over blocks by Gumbel-softmax, with LoRA as the "
            "recoverability estimate", fn=depth.tinyfusion,
        ),
        MethodSpec(
            "confident_learning", "data", "Northcutt et al. 2021, Confident Learning: Estimating Uncertainty in Dataset Labels",
            "https://arxiv.org/abs/1911.00068", "label issues from out-of-sample probabilities (cleanlab's answers, faster)",
            fn=confident.find_label_issues,
        ),
        MethodSpec(
            "el2n", "data", "Paul et al. 2021, Deep Learning on a Data Diet", "https://arxiv.org/abs/2107.07075",
            "||softmax(f(x)) - onehot(y)||_2 early in training, averaged over runs", fn=el2n.el2n,
        ),
        MethodSpec(
            "grand", "data", "Paul et al. 2021, Deep Learning on a Data Diet", "https://arxiv.org/abs/2107.07075",
            "expected per-example loss-gradient norm over all parameters (torch.func)", fn=grand.grand,
        ),
        MethodSpec(
            "grand_last_layer", "data", "Paul et al. 2021, Deep Learning on a Data Diet (last-layer variant, as DeepCore)",
            "https://arxiv.org/abs/2107.07075", "per-example gradient norm of the last Linear only", fn=grand.grand_last_layer,
        ),
        MethodSpec(
            "forgetting", "data", "Toneva et al. 2019, An Empirical Study of Example Forgetting during Deep Neural Network Learning",
            "https://arxiv.org/abs/1812.05159", "correct-to-incorrect transitions in training; never learned = most forgotten",
            fn=forgetting.forgetting_counts,
        ),
        MethodSpec(
            "prototypes", "data", "Sorscher et al. 2022, Beyond neural scaling laws: beating power law scaling via data pruning",
            "https://arxiv.org/abs/2206.14486", "cosine distance to the nearest k-means centroid of an embedding",
            fn=prototypes.prototype_distance,
        ),
        MethodSpec(
            "qtuning", "data", "Wang et al. 2025, Winning the Pruning Gamble: A Unified Approach to Joint Sample and "
            "Token Pruning for Efficient Supervised Fine-Tuning (Q-Tuning)", "https://arxiv.org/abs/2509.23873",
            "SFT data: keep error-uncertainty quadrants Q2 (misconception) + Q4 (calibration), drop Q2's high-PPL "
            "tokens (prunekit data qtune)", fn=qtuning.qtuning_select,
        ),
        MethodSpec(
            "streaming_llm", "kv", "Xiao et al. 2024, Efficient Streaming Language Models with Attention Sinks",
            "https://arxiv.org/abs/2309.17453", "KV cache: attention sinks + recent window, positions within the cache",
            fn=StreamingLLM,
        ),
        MethodSpec(
            "h2o", "kv", "Zhang et al. 2023, H2O: Heavy-Hitter Oracle for Efficient Generative Inference of LLMs",
            "https://arxiv.org/abs/2306.14048", "KV cache: heavy hitters by accumulated attention + recent tokens",
            fn=H2O,
        ),
        MethodSpec(
            "snapkv", "kv", "Li et al. 2024, SnapKV: LLM Knows What You are Looking for Before Generation",
            "https://arxiv.org/abs/2404.14469", "KV cache: observation-window attention votes, pooled, per KV head",
            fn=SnapKV,
        ),
        MethodSpec(
            "knorm", "kv", "Devoto et al. 2024, A Simple and Effective L2 Norm-Based Strategy for KV Cache Compression",
            "https://arxiv.org/abs/2406.11430", "KV cache: keep the keys of lowest L2 norm, per KV head (no attention "
            "weights needed)", fn=Knorm,
        ),
        MethodSpec(
            "delta", "kv", "Entezari Zarch et al. 2025, DELTA: Dynamic Layer-Aware Token Attention for Efficient "
            "Long-Context Reasoning", "https://arxiv.org/abs/2510.09883",
            "KV cache: selection layers pick 16-token pages, later layers attend only to them (cache stays full)",
            fn=Delta,
        ),
        MethodSpec(
            "deep_forcing", "kv", "Yi et al. 2025, Deep Forcing: Training-Free Long Video Generation with Deep Sink and "
            "Participative Compression", "https://arxiv.org/abs/2512.05081",
            "KV cache: deep sink re-aligned by RoPE + top-C tokens by recent queries' q.k + recent tokens",
            fn=DeepForcing,
        ),
        MethodSpec(
            "udfc", "cnn", "Bai et al. 2023, Unified Data-Free Compression: Pruning and Quantization without Fine-Tuning",
            "https://arxiv.org/abs/2308.07209", "prune conv channels / quantize, compensate the next conv in closed form "
            "from BN statistics (no data)", fn=udfc.compress,
        ),
        MethodSpec(
            "trp", "cnn", "Xu et al. 2020, Trained Rank Pruning for Efficient Deep Neural Networks",
            "https://arxiv.org/abs/1812.02402", "truncated-SVD substitution + nuclear norm every m training steps, "
            "then two thin convs per layer", fn=trp.TRP,
        ),
        # structured: ``fn(model, ids, *, ratio, structure, seed, progress, **options) -> tyr.Outcome``, in place
        MethodSpec(
            "tyr", "structured", "Li et al. 2025, Týr-the-Pruner: Structural Pruning LLMs via Global Sparsity "
            "Distribution Optimization", "https://arxiv.org/abs/2503.09657",
            "query heads + MLP neurons: supernet of second-order local prunes, evolutionary search of per-layer widths",
            fn=tyr.prune_tyr,
        ),
        MethodSpec(
            "uniform-structured", "structured", "Li et al. 2025, Týr-the-Pruner (w/o search baseline)",
            "https://arxiv.org/abs/2503.09657", "Týr's local second-order pruner at the same widths in every layer",
            fn=tyr.prune_uniform,
        ),
        MethodSpec(
            "magnitude-structured", "structured", "Li et al. 2017, Pruning Filters for Efficient ConvNets",
            "https://arxiv.org/abs/1608.08710", "uniform widths, heads/neurons kept by the L2 norm of their weights",
            fn=structured_baselines.prune_magnitude,
        ),
        MethodSpec(
            "wanda-structured", "structured", "An et al. 2024, Fluctuation-based Adaptive Structured Pruning (Wanda-sp)",
            "https://arxiv.org/abs/2312.11983", "uniform widths, heads/neurons kept by sum |W| x input norm",
            fn=structured_baselines.prune_wanda,
        ),
        MethodSpec(
            "sc", "inference", "Wang et al. 2023, Self-Consistency Improves Chain of Thought Reasoning in Language Models",
            "https://arxiv.org/abs/2203.11171", "majority vote over the sampled paths' answers (prunekit reason)",
            fn=reasoning.self_consistency,
        ),
        MethodSpec(
            "pc", "inference", "Zhou et al. 2025, Bridging Internal Probability and Self-Consistency for Effective and "
            "Efficient LLM Reasoning", "https://arxiv.org/abs/2502.00511",
            "perplexity consistency: an answer scores the summed exp(mean log-prob) of its distinct paths",
            fn=reasoning.perplexity_consistency,
        ),
        MethodSpec(
            "rpc", "inference", "Zhou et al. 2025, Bridging Internal Probability and Self-Consistency for Effective and "
            "Efficient LLM Reasoning", "https://arxiv.org/abs/2502.00511",
            "drop low-probability paths by a 2-Weibull mixture and the mean, then perplexity consistency",
            fn=reasoning.rpc,
        ),
        MethodSpec(
            "hema", "memory", "Ahn 2025, HEMA: A Hippocampus-Inspired Extended Memory Architecture for Long-Context "
            "AI Conversations", "https://arxiv.org/abs/2504.16754",
            "conversation memory: running summary + retrieved chunks + recent turns under a token budget, "
            "salience-based forgetting (prunekit memory)",
            fn=memory.Memory,
        ),
    )
}


def names(domain: str | None = None) -> list[str]:
    """The registered methods' names, in registration order; of one `domain` when given."""
    return [n for n, s in METHODS.items() if domain is None or s.domain == domain]


def get(name: str, domain: str | None = None) -> MethodSpec:
    """The method `name` (of `domain` when given); an unknown name is an InputError listing the choices."""
    spec = METHODS.get(name)
    if spec is None or (domain is not None and spec.domain != domain):
        raise InputError(f"unknown method {name!r}; choose one of: {', '.join(names(domain))}")
    return spec
