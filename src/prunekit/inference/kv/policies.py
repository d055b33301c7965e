"""The policy table and `policy`, the context manager that runs a model under one (see `prunekit.inference.kv`)."""

from __future__ import annotations

import inspect
from contextlib import contextmanager

from prunekit.errors import InputError, check_model, int_at_least
from prunekit.inference.kv.deep_forcing import DeepForcing
from prunekit.inference.kv.delta import Delta
from prunekit.inference.kv.engine import EVERY, Engine, Policy
from prunekit.inference.kv.full import FullCache
from prunekit.inference.kv.h2o import H2O
from prunekit.inference.kv.knorm import Knorm
from prunekit.inference.kv.snapkv import SnapKV
from prunekit.inference.kv.streaming import StreamingLLM

__all__ = ["POLICIES", "policy", "make_policy", "policy_options"]

POLICIES: dict[str, type[Policy]] = {
    cls.name: cls for cls in (FullCache, StreamingLLM, H2O, SnapKV, Knorm, Delta, DeepForcing)
}


def policy_options(name: str) -> dict:
    """The options a policy takes besides its budget, with their defaults (``{"recent": 0.5}`` for h2o)."""
    cls = POLICIES.get(name.replace("-", "_") if isinstance(name, str) else name)
    if cls is None:
        raise InputError(f"unknown KV policy {name!r}; choose one of: {', '.join(POLICIES)}")
    params = inspect.signature(cls.__init__).parameters.values()
    return {p.name: p.default for p in params if p.kind is p.KEYWORD_ONLY and p.name != "budget"}


def make_policy(name: str, *, budget: int | None, **options) -> Policy:
    """A policy object from its name, its budget and its options (validated, with messages that say what to fix)."""
    known = policy_options(name)
    cls = POLICIES[name.replace("-", "_")]
    if budget is None and cls is not FullCache:
        raise InputError(f"policy {name} needs a budget (tokens kept per layer and KV head)")
    unknown = sorted(set(options) - set(known))
    if unknown:
        takes = ", ".join(f"{k}={v!r}" for k, v in known.items()) or "none"
        raise InputError(f"KV policy {name} takes no option(s) {unknown}; its options (defaults): {takes}")
    return cls(budget=budget, **options)


@contextmanager
def policy(model, name: str | Policy, *, budget: int | None = None, every: int = EVERY, once: bool = False,
           **options):
    """Run `model` with a KV-cache policy inside the ``with`` block; the model is restored exactly on exit.

    name: a policy name (see `POLICIES`) or a `Policy` object. budget: cached tokens kept per layer and KV head
    (for ``delta``: tokens attended by its sparse layers). every: during one-token decoding, compress when the
    cache reaches ``budget + every`` (default 16, so a layer holds up to ``budget + 15`` tokens between
    compressions; 1: at every step over budget, exact but slower than keeping the full cache, see `engine`).
    once: compress only in the first forward of each new cache (the prompt under ``generate``, or a context fed
    before its question) and keep every later token (the question, the answer): kvpress's and the SnapKV paper's
    use of a budget; the cache then holds ``target(budget)`` (the budget; less for Deep Forcing) plus everything
    after the first forward, ``every`` is not used, and ``generate`` with ``prefill_chunk_size`` is refused.
    Options go to the policy (e.g. ``sinks=4`` for streaming_llm, ``window=32`` for snapkv,
    ``delta_layers=[2, 14, 22]`` for delta).
    Yields the policy object (DELTA counts the keys it attended in ``attended`` / ``available``).
    """
    check_model(model, "kv.policy")
    int_at_least(every, "every (decode steps between compressions)", 1)
    if not isinstance(once, bool):
        raise InputError(f"once must be True or False (got {once!r})")
    if isinstance(name, Policy):
        if options:
            raise InputError("pass options to the Policy object's constructor, not to policy()")
        if budget is not None and budget != name.budget:  # was silently ignored: the object's budget was used
            raise InputError(f"the {type(name).__name__} object was built with budget={name.budget}; give the budget "
                             f"to its constructor, not budget={budget!r} to policy()")
        pol = name
    else:
        pol = make_policy(name, budget=budget, **options)
    with Engine(model, pol, budget=pol.budget, every=every, once=once):
        yield pol
