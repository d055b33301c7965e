"""JSON Lines in: one JSON object per non-blank line, with errors that name the file and the line; and strict
JSON out (`dumps`: a NaN or infinite number, which json.dumps writes as the invalid ``NaN``/``Infinity``,
becomes null).

>>> import tempfile, pathlib
>>> p = pathlib.Path(tempfile.mkdtemp()) / "a.jsonl"; _ = p.write_text('{"text": "one"}\\n\\n{"text": "two"}\\n')
>>> read_objects(p, shape='{"text": ...}')
[(1, {'text': 'one'}), (3, {'text': 'two'})]
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

from prunekit.errors import InputError

__all__ = ["read_objects", "dumps", "line", "check_metadata"]


def _finite(obj):
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def dumps(obj, **kwargs) -> str:
    """``json.dumps`` that every JSON reader accepts: non-finite floats (a diverged loss, an overflowing
    perplexity) are written as null.

    >>> dumps({"ppl": float("inf"), "loss": [1.5, float("nan")]})
    '{"ppl": null, "loss": [1.5, null]}'
    """
    return json.dumps(_finite(obj), allow_nan=False, **kwargs)


# characters str.splitlines() breaks at that JSON leaves unescaped (below U+0020 it escapes them all)
_LINE_BREAKS = str.maketrans({"\x85": "\\u0085", "\u2028": "\\u2028", "\u2029": "\\u2029"})


def line(obj) -> str:
    """One JSON Lines record (no newline): text kept as UTF-8 (not ``\\u`` escapes), except the separators
    U+0085, U+2028 and U+2029, escaped so that a reader splitting on every line break (``str.splitlines``)
    still sees one object per line; non-finite floats as null (`dumps`).

    >>> line({"text": "a\u2028b", "é": 1.0})
    '{"text": "a\\\\u2028b", "é": 1.0}'
    """
    return dumps(obj, ensure_ascii=False).translate(_LINE_BREAKS)


def check_metadata(metadata, what: str = "metadata") -> dict:
    """`metadata` (None: empty) if it is a dict `dumps` can write; else an `InputError` naming the first key
    whose value JSON cannot hold (a tensor, a numpy integer, a set, a Path, ...), before anything is written.

    >>> check_metadata({"runs": [{"loss": 1.5}]})
    {'runs': [{'loss': 1.5}]}
    """
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(f"{what} must be a dict, got {type(metadata).__name__}")

    def walk(value, where: str) -> None:
        if value is None or isinstance(value, (str, bool, int, float)):
            return
        if isinstance(value, dict):
            for k, v in value.items():
                if not (k is None or isinstance(k, (str, bool, int, float))):  # what json.dumps turns into a string
                    raise InputError(f"{where} has the key {k!r} ({type(k).__name__}); JSON keys must be strings")
                walk(v, f"{where}[{k!r}]")
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                walk(v, f"{where}[{i}]")
        else:
            raise InputError(f"{where} is of type {type(value).__name__}, which JSON cannot hold; give str, number, "
                             "bool, None, list or dict values (tensor.tolist(), int(x), str(path))")

    walk(metadata, what)
    return metadata


_SURROGATE = re.compile(r"\\u[dD][89a-fA-F][0-9a-fA-F]{2}")  # the escape, in a line as read
_LONE = re.compile("[\ud800-\udfff]")  # in decoded text: a surrogate left over (a pair is one character)


def read_objects(path: str | os.PathLike, *, shape: str) -> list[tuple[int, dict]]:
    """``[(line number, object)]`` for every non-blank line of `path`; `shape` (how one line must look, e.g.
    ``'{"role", "content"}'``) goes into the error a malformed line raises. Raises `InputError` when `path`
    is not a file, is not UTF-8, or a line is not a JSON object."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise InputError(f"{path} is not a file; give a JSONL file with one {shape} per line")
    out = []
    try:
        with open(path, encoding="utf-8-sig") as f:  # a byte-order mark (Windows editors) is dropped
            for no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    raise InputError(f"{path}:{no}: not valid JSON ({e.msg}); each line must be {shape}") from None
                except RecursionError:
                    raise InputError(f"{path}:{no}: JSON nested too deeply to read; each line must be "
                                     f"{shape}") from None
                except ValueError as e:  # an integer of more than 4300 digits (Python's conversion limit)
                    raise InputError(f"{path}:{no}: a value JSON cannot read here ({e}); each line must be "
                                     f"{shape}") from None
                if not isinstance(obj, dict):
                    raise InputError(f"{path}:{no}: not a JSON object; each line must be {shape}")
                lone = _SURROGATE.search(line) and _LONE.search(json.dumps(obj, ensure_ascii=False))
                if lone:  # an escape JSON reads as half a character: tokenizers crashed on it
                    raise InputError(f"{path}:{no}: holds a lone UTF-16 surrogate escape (\\u{ord(lone.group()):04x}), "
                                     "half of a character and not text; fix that string (it was cut inside a "
                                     "character such as an emoji)")
                out.append((no, obj))
    except UnicodeDecodeError as e:
        raise InputError(f"{path} is not UTF-8 text ({e.reason} at byte {e.start}); save it as UTF-8") from None
    return out
