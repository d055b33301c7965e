"""The one exception prunekit raises for input a user must fix.

`InputError` is a `ValueError`, so ordinary ``except ValueError`` code keeps working; the CLI maps it to a
one-line message and exit code 2. Every message says what is wrong and what to do about it.
"""

__all__ = ["InputError"]


class InputError(ValueError):
    """Bad input: a missing model folder, a ratio outside [0, 1), a malformed pattern, too little text, ..."""
