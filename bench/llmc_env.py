"""The llm-compressor venv for `bench/weights_vs_llmcompressor.py` (llm-compressor 0.14 pins ``transformers<=5.17``).

Stdlib only, so it can be imported from any interpreter; the mechanics are in `peer_env.py`.
"""

from __future__ import annotations

from peer_env import ensure_venv

# ``datasets`` is a hard dependency of llmcompressor already; listed for clarity.
PACKAGES = ("llmcompressor==0.14.0.1", "safetensors", "datasets")


def ensure_llmc_venv():
    """The python executable of ``$PRUNEKIT_CACHE/venvs/llmcompressor``, created if needed."""
    return ensure_venv("llmcompressor", PACKAGES, "import torch, llmcompressor, transformers;"
                       "print(torch.__version__, llmcompressor.__version__, transformers.__version__)")


if __name__ == "__main__":  # builds the venv (minutes) and prints its python; --help says so and builds nothing
    import argparse

    argparse.ArgumentParser(description=__doc__.splitlines()[0] + " Builds it if needed and prints its python "
                            "executable.").parse_args()
    print(ensure_llmc_venv())
