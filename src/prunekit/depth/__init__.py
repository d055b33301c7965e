"""Depth pruning: drop whole blocks, chosen by importance (ShortGPT, sensitivity, a fixed pattern, the best
random mask) or learned (TinyFusion), then recover by fine-tuning or distillation and export a standard model.

>>> from prunekit import depth, load_model, load_text, calibration_ids  # doctest: +SKIP
>>> model, tok = load_model("smollm2-135m")                     # doctest: +SKIP
>>> ids = calibration_ids(tok, load_text("wiki", purpose="calibration"), samples=64, seqlen=128)  # doctest: +SKIP
>>> target = depth.causal_lm_target(model, ids, batch_size=4)   # doctest: +SKIP
>>> keep = depth.tinyfusion(target, kept=15, groups="1:2", steps=200).keep  # doctest: +SKIP
>>> kept = depth.drop_layers(model, keep)          # a plain 15-layer Llama  # doctest: +SKIP
>>> depth.recover(target, steps=100)               # LoRA fine-tuning, merged  # doctest: +SKIP
"""

from prunekit.depth.core import (DepthTarget, GatedBlock, causal_lm_target, check_keep, check_kept, drop_blocks,
                                 gates, group_options, parse_groups)
from prunekit.depth.export import drop_layers, save_depth_pruned
from prunekit.depth.methods import (block_influence, calibration_loss, every_other, random_masks, removal_losses,
                                    sensitivity, shortgpt)
from prunekit.depth.recovery import RecoveryResult, recover
from prunekit.depth.tinyfusion import TinyFusionResult, sample_masks, tinyfusion

__all__ = [
    "DepthTarget", "GatedBlock", "RecoveryResult", "TinyFusionResult", "block_influence", "calibration_loss",
    "causal_lm_target", "check_keep", "drop_blocks", "drop_layers", "every_other", "gates", "group_options",
    "parse_groups", "random_masks", "recover", "removal_losses", "sample_masks", "save_depth_pruned", "select_blocks",
    "sensitivity", "shortgpt", "tinyfusion",
]


_TINYFUSION_OPTIONS = {"tau", "scale", "lr_gates", "lr_lora", "ema", "lora_rank", "lora_alpha", "recoverability"}


def select_blocks(target: DepthTarget, method: str, *, kept: int, groups=None, steps: int = 200, candidates: int = 8,
                  seed: int = 0, progress: bool = False, **options) -> tuple[list[bool], dict]:
    """The keep-mask of registered depth method `method` over `target`, and what the method reports."""
    from prunekit.errors import InputError

    if options and method != "tinyfusion":
        raise InputError(f"{method} takes no options ({', '.join(options)} given)")
    if groups is not None and method != "tinyfusion":
        raise InputError(f"groups apply to tinyfusion only, not {method}")
    if method == "shortgpt":  # the influence once: it is a pass over the calibration data (it ran twice)
        check_kept(kept, target.depth)
        influence = block_influence(target)
        return shortgpt(target, kept=kept, influence=influence), {"block_influence": influence.tolist()}
    if method == "sensitivity":
        check_kept(kept, target.depth)
        losses = removal_losses(target, progress=progress)
        return sensitivity(target, kept=kept, losses=losses), {"loss_without_block": losses.tolist()}
    if method == "every-other":
        return every_other(target.depth, kept=kept), {}
    if method == "random":
        keep, tried = random_masks(target, kept=kept, candidates=candidates, seed=seed, progress=progress)
        return keep, {"candidates": tried}
    if method == "tinyfusion":
        unknown = set(options) - _TINYFUSION_OPTIONS
        if unknown:
            raise InputError(f"unknown tinyfusion option(s) {', '.join(sorted(unknown))}; "
                             f"known: {', '.join(sorted(_TINYFUSION_OPTIONS))}")
        res = tinyfusion(target, kept=kept, groups=groups, steps=steps, seed=seed, progress=progress, **options)
        return res.keep, res.to_dict()
    raise InputError(f"unknown depth method {method!r}; choose shortgpt, sensitivity, every-other, random or tinyfusion")
