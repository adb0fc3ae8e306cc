"""fxprune's version, in a module of its own.

Modules that record or print the version (artifacts, the CLI, reports) import it from here
rather than from the package ``fxprune`` itself, which would be an import cycle (the package
lists those modules among its exports). ``pyproject.toml`` reads it from here too.

>>> from fxprune.version import __version__
>>> __version__.count(".") >= 1
True
"""

__all__ = ["__version__"]

__version__ = "0.1.0"
