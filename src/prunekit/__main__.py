"""``python -m prunekit ...``: the same command line as ``prunekit ...``."""

import sys

from prunekit.cli import main

sys.exit(main())
