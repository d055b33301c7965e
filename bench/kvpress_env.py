"""Isolated virtualenv for kvpress (used only by the KV-cache comparison benchmark).

kvpress 0.5.5 pins ``transformers<5.3``, which conflicts with prunekit's own environment, so it lives in
its own venv under ``$PRUNEKIT_CACHE/venvs/kvpress``. Stdlib only, so it can be imported from any interpreter.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

TORCH_PIN = "torch==2.13.0"
KVPRESS_PIN = "kvpress==0.5.5"
# torch is pinned in the SAME pip command so the resolver never pulls a CUDA torch.
PACKAGES = (TORCH_PIN, KVPRESS_PIN, "safetensors")
_MARKER = ".prunekit-installed"


def _log(msg: str) -> None:
    print(f"[kvpress_env] {msg}", file=sys.stderr, flush=True)


def cache_dir() -> pathlib.Path:
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join("~", ".cache", "prunekit")
    return pathlib.Path(root).expanduser()


def venv_dir() -> pathlib.Path:
    return cache_dir() / "venvs" / "kvpress"


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_kvpress_venv() -> pathlib.Path:
    """Return the python executable of the kvpress venv, creating it if needed.

    Idempotent: a marker file (the pinned requirement list) is written only after a successful install
    and import check; if it is present and matches, nothing is done.
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
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, stdout=sys.stderr, stderr=sys.stderr)
    _log(f"installing {' '.join(PACKAGES)} (this can take a few minutes)")
    subprocess.run([str(py), "-m", "pip", "install", *PACKAGES], check=True, stdout=sys.stderr, stderr=sys.stderr)
    out = subprocess.run(
        [str(py), "-c", "import torch, kvpress, transformers; from importlib.metadata import version;"
         "print(torch.__version__, version('kvpress'), transformers.__version__)"],
        check=True, capture_output=True, text=True,
    ).stdout.strip().splitlines()[-1]
    _log(f"installed: torch/kvpress/transformers = {out}")
    if not out.split()[0].startswith("2.13.0"):
        raise RuntimeError(f"unexpected torch in the kvpress venv: {out}")
    marker.write_text(want)
    return py


if __name__ == "__main__":
    print(ensure_kvpress_venv())
