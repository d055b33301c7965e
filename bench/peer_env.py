"""Isolated virtualenvs for the peers a benchmark compares against (llm-compressor, kvpress).

A peer that pins a transformers range prunekit does not use lives in its own venv under
``$PRUNEKIT_CACHE/venvs/NAME``, with torch pinned in the same pip command so the resolver never pulls a CUDA
build. Stdlib only, so it can be imported from any interpreter.
"""

from __future__ import annotations

import os
import pathlib
import subprocess
import sys

TORCH_PIN = "torch==2.13.0"
_MARKER = ".prunekit-installed"


def cache_dir() -> pathlib.Path:
    root = os.environ.get("PRUNEKIT_CACHE") or os.path.join("~", ".cache", "prunekit")
    return pathlib.Path(root).expanduser()


def _venv_python(venv: pathlib.Path) -> pathlib.Path:
    return venv / ("Scripts/python.exe" if os.name == "nt" else "bin/python")


def ensure_venv(name: str, packages: tuple[str, ...], probe: str) -> pathlib.Path:
    """The python executable of the venv `name` holding `packages` (torch pinned first), made if needed.

    `probe` is Python code run in the venv after installing; its last stdout line must start with the torch
    version (a CPU 2.13.0), and is logged. Idempotent: a marker file (the requirement list) is written only
    after a successful install and probe; if it is present and matches, nothing is done.
    """
    packages = (TORCH_PIN, *packages)
    venv = cache_dir() / "venvs" / name
    py = _venv_python(venv)
    marker = venv / _MARKER
    want = "\n".join(packages) + "\n"
    if py.exists() and marker.exists() and marker.read_text() == want:
        return py
    log = lambda msg: print(f"[{name} venv] {msg}", file=sys.stderr, flush=True)  # noqa: E731
    if not py.exists():
        log(f"creating {venv}")
        venv.parent.mkdir(parents=True, exist_ok=True)
        subprocess.run(["python3", "-m", "venv", str(venv)], check=True, stdout=sys.stderr, stderr=sys.stderr)
    log(f"installing {' '.join(packages)} (this can take a few minutes)")
    subprocess.run([str(py), "-m", "pip", "install", *packages], check=True, stdout=sys.stderr, stderr=sys.stderr)
    out = subprocess.run([str(py), "-c", probe], check=True, capture_output=True, text=True)
    line = out.stdout.strip().splitlines()[-1]  # a peer may log to stdout on import
    log(f"installed: {line}")
    if not line.split()[0].startswith("2.13.0"):
        raise RuntimeError(f"unexpected torch in the {name} venv: {line}")
    marker.write_text(want)
    return py
