"""The kvpress venv for `bench/kv_vs_kvpress.py` (kvpress 0.5.5 pins ``transformers<5.3``).

Stdlib only, so it can be imported from any interpreter; the mechanics are in `peer_env.py`.
"""

from __future__ import annotations

from peer_env import ensure_venv

PACKAGES = ("kvpress==0.5.5", "safetensors")


def ensure_kvpress_venv():
    """The python executable of ``$PRUNEKIT_CACHE/venvs/kvpress``, created if needed."""
    return ensure_venv("kvpress", PACKAGES, "import torch, kvpress, transformers; from importlib.metadata import version;"
                       "print(torch.__version__, version('kvpress'), transformers.__version__)")


if __name__ == "__main__":  # builds the venv (minutes) and prints its python; --help says so and builds nothing
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Builds it if needed and prints its python "
                            "executable.").parse_args()
    print(ensure_kvpress_venv())
