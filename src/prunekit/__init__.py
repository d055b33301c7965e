"""prunekit: prune what a model is, what it learns from, and what it keeps while it runs.

The names below load on first use (`prunekit._lazy`): ``import prunekit`` does not import torch, and
``prunekit.perplexity`` imports `prunekit.evaluate` when it is first read.
"""

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__version__ = "0.1.0"

__all__ = [
    "InputError", "NM", "LayerReport", "Perplexity", "PruneResult", "Text",
    "calibration_ids", "check_pattern", "evaluation_ids", "load_model", "load_text", "parse_pattern",
    "perplexity", "prune", "prune_options", "registry", "save_pruned", "sparsity",
    "StructuredResult", "compare_speed", "load", "measure_speed", "prune_structured", "save_structured",
]

attach(__name__, {
    "prunekit.errors": ("InputError",),
    "prunekit.evaluate": ("Perplexity", "check_pattern", "perplexity", "sparsity"),
    "prunekit.select": ("NM", "parse_pattern"),
    "prunekit.speed": ("compare_speed",),
    "prunekit.structured": ("StructuredResult", "load", "measure_speed", "prune_structured", "save_structured"),
    "prunekit.text": ("Text", "calibration_ids", "evaluation_ids", "load_text"),
    "prunekit.weights.engine": ("LayerReport",),
    "prunekit.weights.io": ("load_model", "save_pruned"),
    "prunekit.weights.prune": ("PruneResult", "prune", "prune_options"),
})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit import registry
    from prunekit.errors import InputError
    from prunekit.evaluate import Perplexity, check_pattern, perplexity, sparsity
    from prunekit.select import NM, parse_pattern
    from prunekit.speed import compare_speed
    from prunekit.structured import StructuredResult, load, measure_speed, prune_structured, save_structured
    from prunekit.text import Text, calibration_ids, evaluation_ids, load_text
    from prunekit.weights.engine import LayerReport
    from prunekit.weights.io import load_model, save_pruned
    from prunekit.weights.prune import PruneResult, prune, prune_options
