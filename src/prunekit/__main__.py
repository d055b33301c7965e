"""``python -m prunekit ...``: the same command line as ``prunekit ...``."""

import sys

from prunekit.cli import main

if __name__ == "__main__":  # a tool walking the package (pydoc, doctest) imports this module too
    sys.exit(main())
