"""The workflow's optional dependencies (the ``run`` extra: ``pip install 'fxprune[run]'``).

The pruning pass needs only torch, torchvision, networkx, numpy and safetensors. The job
around it (``fxprune run`` / ``sweep``) also draws progress bars (tqdm) and plots
(matplotlib). They are imported where they are used, through :func:`require`, so that a
missing one is one clear :class:`~fxprune.workflow.errors.ConfigError` naming the extra, and
:func:`check_run_extras` lets a run refuse up front rather than after an hour of training.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType
from typing import Any, Tuple

from fxprune.workflow.errors import ConfigError

__all__ = ["RUN_EXTRA", "RUN_MODULES", "require", "check_run_extras", "tqdm"]

#: The extra that installs them.
RUN_EXTRA = "run"
#: Modules of the ``run`` extra (import names).
RUN_MODULES: Tuple[str, ...] = ("tqdm", "matplotlib")


def _missing_message(names: Tuple[str, ...]) -> str:
    listed = " and ".join(names)
    return (f"fxprune run/sweep needs {listed} ({'it is' if len(names) == 1 else 'they are'} not installed): "
            f"install the '{RUN_EXTRA}' extra, pip install 'fxprune[{RUN_EXTRA}]' (or pip install {' '.join(names)})")


def require(name: str) -> ModuleType:
    """Import the optional module ``name``, or raise :class:`ConfigError` naming the extra."""
    try:
        return importlib.import_module(name)
    except ImportError as exc:
        raise ConfigError(_missing_message((name.split(".")[0],))) from exc


def check_run_extras() -> None:
    """Raise :class:`ConfigError` unless every module of the ``run`` extra can be imported.

    Looks them up without importing them (a run imports them when it draws the first bar).
    """
    missing = tuple(name for name in RUN_MODULES if not _findable(name))
    if missing:
        raise ConfigError(_missing_message(missing))


def _findable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):  # a finder that refuses it, or a half-imported module
        return False


def tqdm(*args: Any, **kwargs: Any) -> Any:
    """``tqdm.tqdm(*args, **kwargs)``, importing tqdm on first use (see the module's docstring)."""
    return require("tqdm").tqdm(*args, **kwargs)
