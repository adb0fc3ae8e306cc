"""Packages whose public names are imported on first use.

``fxprune`` and ``fxprune.workflow`` export functions and classes from submodules that need
torch. Importing them eagerly would make ``import fxprune.cli`` -- and so ``fxprune --help``
-- import torch (seconds, even warm). Instead each package lists its exports here and the
first access to any of them imports all of its submodules at once, in the listed order: after
that first touch the package is exactly what the eager imports made it.

This is the one deliberate exception to "no lazy imports" in the library, for the start-up
time of the command line; nothing else in the package depends on it.

Two details make it safe:

- No export shares its name with a submodule (the modules are ``planning``, ``tracing`` and
  ``workflow/job``, so ``import fxprune.planning as P`` binds the module and ``fxprune.plan``
  the function; tests/test_packaging.py keeps it so). Otherwise the import system's binding of
  a submodule on its package would shadow the export, or the export the submodule.
- Static type checkers do not see the table: each package also imports its exports under
  ``if TYPE_CHECKING:`` (tests/test_packaging.py checks the two lists agree).
"""

from __future__ import annotations

import importlib
import sys
import types
from typing import Any, Dict, List, Mapping, Sequence

__all__ = ["LazyPackage", "install"]


class LazyPackage(types.ModuleType):
    """A package module whose exports (name -> submodule) load on first access."""

    #: name -> relative submodule (".api"), in the order the submodules are imported.
    _fxprune_exports: Dict[str, str]

    def __getattr__(self, name: str) -> Any:
        # Only called when ``name`` is not (yet) in the module's namespace.
        exports = self.__dict__.get("_fxprune_exports", {})
        if name not in exports:
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        self.load_exports()
        return self.__dict__[name]

    def __dir__(self) -> List[str]:
        return sorted(set(self.__dict__) | set(self.__dict__.get("_fxprune_exports", {})))

    def load_exports(self) -> None:
        """Import every submodule the exports come from and bind the exported names."""
        exports = self.__dict__["_fxprune_exports"]
        modules: Dict[str, types.ModuleType] = {}
        for relative in dict.fromkeys(exports.values()):
            modules[relative] = importlib.import_module(relative, self.__name__)
        for name, relative in exports.items():
            self.__dict__[name] = getattr(modules[relative], name)


def install(package: str, exports: Mapping[str, Sequence[str]]) -> None:
    """Make the (already executing) package ``package`` load ``exports`` lazily.

    ``exports`` maps a relative submodule (``".api"``) to the names it provides, in import
    order. Call it from the package's ``__init__`` once its light attributes are defined.
    """
    module = sys.modules[package]
    table: Dict[str, str] = {}
    for relative, names in exports.items():
        for name in names:
            table[name] = relative
    module.__dict__["_fxprune_exports"] = table
    module.__class__ = LazyPackage
