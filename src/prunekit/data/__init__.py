"""Pruning what a model learns from: label issues, per-example scores, and the files they come in.

See `prunekit.data.methods` for the scores, `prunekit.select.select_examples` for turning a score into a
keep-mask, and `prunekit.train` for the short training runs that produce scores and out-of-fold probabilities.
"""

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__all__ = [
    "NoiseEstimate", "compute_confident_joint", "estimate_noise", "find_label_issues", "label_quality_scores",
    "num_label_issues", "order_label_issues",
]

attach(__name__, {"prunekit.data.methods.confident": tuple(__all__)})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit.data.methods.confident import (NoiseEstimate, compute_confident_joint, estimate_noise,
                                                 find_label_issues, label_quality_scores, num_label_issues,
                                                 order_label_issues)
