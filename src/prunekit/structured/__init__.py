"""Structured width pruning: remove attention query heads and MLP neurons so the model really shrinks.

`prune_structured` runs one of the registered structured methods (`prunekit.registry`, domain "structured"):
``tyr`` (Týr-the-Pruner: supernet + evolutionary search of per-layer widths), ``uniform-structured`` (the
same local second-order pruner at uniform widths), ``magnitude-structured`` and ``wanda-structured``.
`save_structured` / `load` write and read the result (plain transformers loads uniform widths too), and
`measure_speed` times it. ``ratio`` is the fraction of the decoder blocks' Linear weights removed.

>>> import prunekit, torch                                       # doctest: +SKIP
>>> model, tok = prunekit.load_model("smollm2-135m")             # doctest: +SKIP
>>> result = prunekit.prune_structured(model, tokenizer=tok, method="tyr", ratio=0.3, structure="both",
...                                    samples=32, seqlen=256)   # doctest: +SKIP
>>> prunekit.save_structured(model, tok, "smollm2-tyr30", metadata=result.to_dict())  # doctest: +SKIP
>>> model2, tok2 = prunekit.load("smollm2-tyr30")               # doctest: +SKIP
"""

from typing import TYPE_CHECKING

from prunekit._lazy import attach

__all__ = ["StructuredResult", "prune_structured", "check_request", "save_structured", "load", "measure_speed",
           "STRUCTURES"]

attach(__name__, {
    "prunekit.structured.core": ("StructuredResult", "prune_structured", "check_request"),
    "prunekit.structured.export": ("load", "save_structured"),
    "prunekit.speed": ("measure_speed",),
    "prunekit.structured.tyr": ("STRUCTURES",),
})

if TYPE_CHECKING:  # the same names for type checkers and editors
    from prunekit.speed import measure_speed
    from prunekit.structured.core import StructuredResult, check_request, prune_structured
    from prunekit.structured.export import load, save_structured
    from prunekit.structured.tyr import STRUCTURES
