"""prunekit: prune what a model is, what it learns from, and what it keeps while it runs."""

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

__version__ = "0.1.0"

__all__ = [
    "InputError", "NM", "LayerReport", "Perplexity", "PruneResult", "Text",
    "calibration_ids", "check_pattern", "evaluation_ids", "load_model", "load_text", "parse_pattern",
    "perplexity", "prune", "prune_options", "registry", "save_pruned", "sparsity",
    "StructuredResult", "compare_speed", "load", "measure_speed", "prune_structured", "save_structured",
]
