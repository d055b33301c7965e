"""The dense model's perplexity, kept between prune runs: ``prune --eval`` scores the input model before pruning it,
and a sweep over methods and ratios scored the same model on the same windows every run (35 s per text for
SmolLM2-135M on 2 cores). A result is reused only when everything that decides it is unchanged:

- the model folder (its absolute path, and the name, size and modification time of every file in it: weights,
  config and tokenizer; rewriting any of them, ``--overwrite`` included, misses the cache);
- the text (source name, documents and sha256 of its content), the window length, the token count asked for (or
  "all the text's windows"), the batch size, the dtype the model was loaded in;
- the prunekit, torch and transformers versions, and `FORMAT` (raised when the scoring itself changes).

Entries are small JSON files in ``$PRUNEKIT_EVAL_CACHE`` (default ``$PRUNEKIT_CACHE/eval``), the newest `KEEP`
kept. ``PRUNEKIT_EVAL_CACHE=off`` (or ``prune --no-dense-cache``) scores the dense model every time. A cache
that cannot be read or written is passed over: the dense model is scored as if there were none.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["FORMAT", "KEEP", "cache_folder", "key_for", "lookup", "store"]

FORMAT = 1  # raise when perplexity's windows or arithmetic change, so that older entries are not reused
KEEP = 500  # entries kept (about 1 KB each); the least recently used go first


def cache_folder() -> Path | None:
    """Where entries live, or None when the cache is off (``PRUNEKIT_EVAL_CACHE=off``)."""
    from prunekit import zoo

    setting = os.environ.get("PRUNEKIT_EVAL_CACHE", "").strip()
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    return Path(setting).expanduser() if setting else zoo.cache_dir() / "eval"


def _folder_files(folder: Path) -> list:
    """``[name, size, mtime_ns]`` of every file directly in `folder` (links followed), sorted by name."""
    files = []
    for entry in sorted(folder.iterdir(), key=lambda p: p.name):
        try:
            stat = entry.stat()
        except OSError:  # a dangling link: it cannot be loaded either, but it is part of the folder
            files.append([entry.name, None, None])
            continue
        if not entry.is_dir():
            files.append([entry.name, stat.st_size, stat.st_mtime_ns])
    return files


def key_for(model_dir, text, *, seqlen: int, tokens: int | None, fit: bool, batch_size: int,
            dtype: str = "float32") -> dict:
    """Everything the dense perplexity of the model in `model_dir`, loaded in `dtype`, on `text` (a
    `prunekit.text.Text`) depends on."""
    import torch
    import transformers

    import prunekit

    folder = Path(model_dir).resolve()
    return {"format": FORMAT, "model": str(folder), "files": _folder_files(folder),
            "text": {"source": text.name, "documents": text.documents, "sha256": text.sha256},
            "seqlen": int(seqlen), "tokens": tokens, "fit": bool(fit), "batch_size": int(batch_size), "dtype": dtype,
            "versions": {"prunekit": prunekit.__version__, "torch": torch.__version__,
                         "transformers": transformers.__version__}}


def _path(folder: Path, key: dict) -> Path:
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode("utf-8")).hexdigest()
    return folder / f"{digest[:32]}.json"


def lookup(key: dict) -> dict | None:
    """The entry stored under `key` (``{"dense": perplexity dict, "computed": UTC time}``), or None: none stored,
    the cache off, or the file unreadable or not for this key."""
    folder = cache_folder()
    if folder is None:
        return None
    path = _path(folder, key)
    try:
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(entry, dict) or entry.get("key") != key or not _valid(entry.get("dense")):
        return None
    try:
        os.utime(path)  # recently used: the last to go
    except OSError:
        pass
    return {"dense": entry["dense"], "computed": entry.get("computed")}


def _valid(dense) -> bool:
    from prunekit.evaluate import Perplexity

    try:
        ppl = Perplexity(**dense)
    except TypeError:
        return False
    numbers = (ppl.ppl, ppl.nll, ppl.tokens, ppl.seqlen, ppl.windows)
    return (all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in numbers)
            and ppl.ppl > 0 and ppl.windows >= 1 and isinstance(ppl.text, dict))


def store(key: dict, dense: dict) -> None:
    """Keep `dense` (a perplexity dict) under `key`, written whole or not at all; then drop the least recently used
    entries beyond `KEEP`. Nothing is raised: a cache that cannot be written is not used."""
    folder = cache_folder()
    if folder is None:
        return
    entry = {"key": key, "dense": dense, "computed": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-", suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        os.replace(tmp, _path(folder, key))
        tmp = None
        _trim(folder)
    except OSError:
        pass
    finally:
        if tmp is not None:
            try:
                os.unlink(tmp)
            except OSError:
                pass


def _trim(folder: Path) -> None:
    """Remove the entries beyond the `KEEP` most recently used, and temporary files an hour old (a killed write)."""
    entries, old = [], []
    now = time.time_ns()
    for path in folder.glob("*.json"):
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:  # removed by another run meanwhile
            continue
        if not path.name.startswith("."):
            entries.append((mtime, path))
        elif path.name.startswith(".tmp-") and now - mtime > 3600 * 10**9:
            old.append(path)
    for path in old + [path for _, path in sorted(entries, reverse=True)[KEEP:]]:
        try:
            path.unlink()
        except OSError:
            pass
