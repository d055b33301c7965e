"""The one exception prunekit raises for input a user must fix.

`InputError` is a `ValueError`, so ordinary ``except ValueError`` code keeps working; the CLI maps it to a
one-line message and exit code 2. Every message says what is wrong and what to do about it.
"""

from numbers import Integral

__all__ = ["InputError", "int_at_least"]


class InputError(ValueError):
    """Bad input: a missing model folder, a ratio outside [0, 1), a malformed pattern, too little text, ..."""


def int_at_least(value, name: str, low: int, *, hint: str = "") -> int:
    """`value` as an int if it is an integer (not a bool) of at least `low`; else `InputError` naming `name`."""
    if isinstance(value, bool) or not isinstance(value, Integral) or value < low:
        raise InputError(f"{name} must be an integer >= {low}{hint}, got {value!r}")
    return int(value)
