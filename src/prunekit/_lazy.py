"""Packages whose public names load on first use, so that ``import prunekit`` and the command line's parser
(``--help``, an input error) do not wait for torch and every method module.

`attach` gives a package a module type whose attribute lookup imports the defining module of an exported name
the first time it is read (``prunekit.perplexity`` imports `prunekit.evaluate`), and imports a submodule that
is read as an attribute (``prunekit.depth``), as the eager ``from ... import`` lines did. An exported function
that shares its name with a submodule (``prunekit.depth.tinyfusion``, the function, beside the module
``prunekit/depth/tinyfusion.py``) stays the function when the submodule is imported later: Python's import
system would bind the module over it.
"""

from __future__ import annotations

import importlib
import importlib.util
import pkgutil
import sys
import types


class _LazyPackage(types.ModuleType):
    def __getattr__(self, name: str):  # only when the name is not in the module yet
        where = self.__dict__.get("_lazy_where", {})
        if name in where:
            value = getattr(importlib.import_module(where[name]), name)
        elif name.isidentifier() and not name.startswith("_") and _submodule(self, name):
            value = importlib.import_module(f"{self.__name__}.{name}")
        else:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.__dict__[name] = value
        return value

    def __setattr__(self, name: str, value) -> None:
        if (isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}"
                and name in self.__dict__.get("_lazy_where", {})):
            return  # the import system binding submodule `name` over the exported name it shares
        super().__setattr__(name, value)

    def __dir__(self) -> list[str]:  # the exports and the submodules too, loaded or not (tab completion)
        names = set(self.__dict__) | set(self.__dict__.get("_lazy_where", {})) | set(self.__dict__.get("__all__", ()))
        return sorted(names | {m.name for m in pkgutil.iter_modules(self.__dict__.get("__path__", ()))
                               if not m.name.startswith("_")})  # not __main__: reading it is an AttributeError


def _submodule(package: types.ModuleType, name: str) -> bool:
    try:
        return importlib.util.find_spec(f"{package.__name__}.{name}") is not None
    except (ImportError, ValueError):
        return False


def attach(package: str, exports: dict[str, tuple[str, ...]]) -> None:
    """Make package `package` load its public names on first use: `exports` maps each defining module to the
    names it gives the package (empty: only its submodules load on first use)."""
    module = sys.modules[package]
    module.__class__ = _LazyPackage
    module.__dict__["_lazy_where"] = {name: source for source, names in exports.items() for name in names}
