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

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__all__ = [
    "DepthTarget", "GatedBlock", "RecoveryResult", "TinyFusionResult", "balanced_groups", "block_influence",
    "calibration_loss",
    "causal_lm_target", "check_keep", "check_kept", "drop_blocks", "drop_layers", "every_other", "gates",
    "group_options", "parse_groups", "random_masks", "recover", "removal_losses", "sample_masks", "save_depth_pruned",
    "select_blocks", "sensitivity", "shortgpt", "tinyfusion",
]

attach(__name__, {
    "prunekit.depth.core": ("DepthTarget", "GatedBlock", "balanced_groups", "causal_lm_target", "check_keep",
                            "check_kept", "drop_blocks", "gates", "group_options", "parse_groups"),
    "prunekit.depth.export": ("drop_layers", "save_depth_pruned"),
    "prunekit.depth.methods": ("block_influence", "calibration_loss", "every_other", "random_masks", "removal_losses",
                               "select_blocks", "sensitivity", "shortgpt"),
    "prunekit.depth.recovery": ("RecoveryResult", "recover"),
    "prunekit.depth.tinyfusion": ("TinyFusionResult", "sample_masks", "tinyfusion"),
})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit.depth.core import (DepthTarget, GatedBlock, balanced_groups, causal_lm_target, check_keep,
                                     check_kept, drop_blocks, gates, group_options, parse_groups)
    from prunekit.depth.export import drop_layers, save_depth_pruned
    from prunekit.depth.methods import (block_influence, calibration_loss, every_other, random_masks, removal_losses,
                                        select_blocks, sensitivity, shortgpt)
    from prunekit.depth.recovery import RecoveryResult, recover
    from prunekit.depth.tinyfusion import TinyFusionResult, sample_masks, tinyfusion
