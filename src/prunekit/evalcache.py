"""The dense model's perplexity, kept between prune runs: ``prune --eval`` scores the input model before pruning it,
and a sweep over methods and ratios scored the same model on the same windows every run (35 s per text for
SmolLM2-135M on 2 cores). A result is reused only when everything that decides it is unchanged:

- the model folder: its absolute path, and the name, size, modification and change times and inode of every file
  in it (weights, config, tokenizer). Saving, copying or touching a file changes its change time, so any of
  them misses the cache; the files are read before the model is loaded and again after it is scored, and a
  folder that changed in between is neither looked up nor stored;
- the text (source name, documents and sha256 of its content), the window length, the token count asked for (or
  "all the text's windows"), the batch size, the dtype the model was loaded in;
- prunekit's own source files (sha256), and the torch, transformers and tokenizers versions.

Entries are small JSON files named by a 32-digit hex hash in ``$PRUNEKIT_EVAL_CACHE`` (default
``$PRUNEKIT_CACHE/eval``); the `KEEP` most recently used are kept, and no other file there is touched.
``PRUNEKIT_EVAL_CACHE=off`` (or ``prune --no-dense-cache``) scores the dense model every time. A cache that
cannot be found, read or written is passed over: the dense model is scored as if there were none.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import re
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

__all__ = ["KEEP", "cache_folder", "folder_files", "key_for", "lookup", "store"]

KEEP = 500  # entries kept (about 1 KB each); the least recently used go first
_ENTRY = re.compile(r"[0-9a-f]{32}\.json")
_TMP = ".prunekit-eval-tmp-"


def cache_folder() -> Path | None:
    """Where entries live, or None when the cache is off (``PRUNEKIT_EVAL_CACHE=off``) or cannot be found (no home
    folder to put the default in)."""
    from prunekit import zoo

    setting = os.environ.get("PRUNEKIT_EVAL_CACHE", "").strip()
    if setting.lower() in ("off", "0", "no", "false"):
        return None
    try:
        return Path(setting).expanduser() if setting else zoo.cache_dir() / "eval"
    except (RuntimeError, OSError, KeyError):  # "Could not determine home directory", ~nosuchuser
        return None


def folder_files(model_dir) -> list:
    """``[name, size, mtime_ns, ctime_ns, inode]`` of every file directly in `model_dir` (links followed), sorted by
    name: what `key_for` compares. Take it before loading the model, so that the key describes what was loaded."""
    files = []
    for entry in sorted(Path(model_dir).resolve().iterdir(), key=lambda p: p.name):
        try:
            stat = entry.stat()
        except OSError:  # a dangling link: it cannot be loaded either, but it is part of the folder
            files.append([entry.name, None, None, None, None])
            continue
        if not entry.is_dir():
            files.append([entry.name, stat.st_size, stat.st_mtime_ns, stat.st_ctime_ns, stat.st_ino])
    return files


@functools.cache
def _source_sha256() -> str:
    """sha256 over prunekit's own source files: a change to how a model is loaded or scored misses the cache."""
    root = Path(__file__).resolve().parent
    digest = hashlib.sha256()
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode("utf-8") + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()


def key_for(model_dir, text, *, files: list, seqlen: int, tokens: int | None, fit: bool, batch_size: int,
            dtype: str = "float32") -> dict:
    """Everything the dense perplexity of the model in `model_dir` (whose `folder_files` were `files` when it was
    loaded, in `dtype`) on `text` (a `prunekit.text.Text`) depends on."""
    import tokenizers
    import torch
    import transformers

    import prunekit

    return {"model": str(Path(model_dir).resolve()), "files": files,
            "text": {"source": text.name, "documents": text.documents, "sha256": text.sha256},
            "seqlen": int(seqlen), "tokens": tokens, "fit": bool(fit), "batch_size": int(batch_size), "dtype": dtype,
            "versions": {"prunekit": prunekit.__version__, "source_sha256": _source_sha256(),
                         "torch": torch.__version__, "transformers": transformers.__version__,
                         "tokenizers": tokenizers.__version__}}


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
        if not path.is_file():  # opening a pipe put there would wait for a writer
            return None
        entry = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return None
    if (not isinstance(entry, dict) or entry.get("key") != key or not _valid(entry.get("dense"))
            or not isinstance(entry.get("computed"), str)):
        return None
    try:
        os.utime(path)  # recently used: the last to go
    except OSError:
        pass
    return {"dense": entry["dense"], "computed": entry["computed"]}


def _valid(dense) -> bool:
    from prunekit.evaluate import Perplexity

    if not isinstance(dense, dict):
        return False
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
    from prunekit.errors import apply_umask

    folder = cache_folder()
    if folder is None:
        return
    entry = {"key": key, "dense": dense, "computed": datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")}
    tmp = None
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=_TMP, suffix=".json")
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(entry, f)
        apply_umask(tmp)  # as any file the user writes (mkstemp makes it owner-only)
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
    """Remove the cache's entries beyond the `KEEP` most recently used, and its temporary files an hour old (a
    killed write). Files of other names are not the cache's and stay."""
    entries, old = [], []
    now = time.time_ns()
    for path in folder.iterdir():
        try:
            mtime = path.stat().st_mtime_ns
        except OSError:  # removed by another run meanwhile
            continue
        if _ENTRY.fullmatch(path.name):
            entries.append((mtime, path))
        elif path.name.startswith(_TMP) and now - mtime > 3600 * 10**9:
            old.append(path)
    for path in old + [path for _, path in sorted(entries, reverse=True)[KEEP:]]:
        try:
            path.unlink()
        except OSError:
            pass
