"""Isolated virtualenv for llm-compressor (used only by the comparison benchmark).

llm-compressor 0.14 pins ``transformers<=5.17`` which conflicts with prunekit's own
environment, so it lives in its own venv under ``$PRUNEKIT_CACHE/venvs/llmcompressor``.
Stdlib only, so it can be imported from any interpreter.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

TORCH_PIN = "torch==2.13.0"
LLMC_PIN = "llmcompressor==0.14.0.1"
# torch is pinned in the SAME pip command so the resolver never pulls a CUDA torch.
# ``datasets`` is a hard dependency of llmcompressor already; listed for clarity.
PACKAGES = (TORCH_PIN, LLMC_PIN, "safetensors", "datasets")
_MARKER = ".prunekit-installed"


def _log(msg: str) -> None:
    print(f"[llmc_env] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join("~", ".cache", "prunekit")
    return pathlib.Path(root).expanduser()


def venv_dir() -> pathlib.Path:
    return cache_dir() / "venvs" / "llmcompressor"


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    if os.name == "nt":
        return venv / "Scripts" / "python.exe"
    return venv / "bin" / "python"


def ensure_llmc_venv() -> pathlib.Path:
    """Return the python executable of the llm-compressor venv, creating it if needed.

    Idempotent: a marker file (containing the pinned requirement list) is written
    only after a successful install; if it is present and matches, nothing is done.
    """
    venv = venv_dir()
    py = _venv_python(venv)
    marker = venv / _MARKER
    want = "\n".join(PACKAGES) + "\n"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py

    if not py.exists():
        _log(f"creating venv at {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True,
                       stdout=sys.stderr, stderr=sys.stderr)
    _log(f"installing {' '.join(PACKAGES)} (this can take a few minutes)")
    subprocess.run([str(py), "-m", "pip", "install", *PACKAGES], check=True,
                   stdout=sys.stderr, stderr=sys.stderr)
    # Sanity check: the import works and torch is the CPU build we pinned.
    out = subprocess.run(
        [str(py), "-c",
         "import torch, llmcompressor, transformers;"
         "print(torch.__version__, llmcompressor.__version__, transformers.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]  # llmcompressor logs to stdout on import
    _log(f"installed: torch/llmcompressor/transformers = {out}")
    if not out.split()[0].startswith("2.13.0"):
        raise RuntimeError(f"unexpected torch in llm-compressor venv: {out}")
    marker.write_text(want)
    return py


if __name__ == "__main__":
    print(ensure_llmc_venv())
