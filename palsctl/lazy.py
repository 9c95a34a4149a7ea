"""Lazy re-exports for package ``__init__`` files: a name is imported from its module the
first time it is used, so that importing the package stays light.

>>> import palsctl
>>> palsctl.SimPlant.__name__      # imports palsctl.plants.sim now
'SimPlant'
"""
from __future__ import annotations

import importlib
import sys
from collections.abc import Callable, Mapping
from typing import Any

__all__ = ["lazy_exports"]


def lazy_exports(package: str, exports: Mapping[str, str],
                 ) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """Make a package's module ``__getattr__`` and ``__dir__`` that re-export names lazily.

    A name, once imported, is kept in the package's namespace (the next access is a plain
    attribute lookup)::

        __getattr__, __dir__ = lazy_exports(__name__, {"SimPlant": "palsctl.plants.sim:SimPlant"})

    Parameters
    ----------
    package : str
        The package's ``__name__``.
    exports : mapping of str to str
        Public name -> ``"module:attribute"``.

    Returns
    -------
    __getattr__ : callable
        The module ``__getattr__`` (`AttributeError` for a name not in ``exports``).
    __dir__ : callable
        The module ``__dir__`` (the package's names and ``exports``).
    """
    table = dict(exports)

    def __getattr__(name: str) -> Any:
        try:
            target = table[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        module, _, attribute = target.partition(":")
        value = getattr(importlib.import_module(module), attribute)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted(set(vars(sys.modules[package])) | set(table))

    return __getattr__, __dir__
