"""Errors of the workflow layer (data, checkpoints, weights, configuration).

They subclass :class:`fxprune.errors.FxPruneError` so a caller (the CLI) can catch every error
fxprune raises on purpose with one ``except`` and print the message without a traceback.
"""

from __future__ import annotations

from fxprune.errors import FxPruneError

__all__ = ["WorkflowError", "DataNotFoundError", "CheckpointError", "ConfigError"]


class WorkflowError(FxPruneError):
    """Base class of the errors raised by :mod:`fxprune.workflow`."""


class DataNotFoundError(WorkflowError):
    """A data set is not where it was looked for; the message says where and how to get it."""


class CheckpointError(WorkflowError):
    """A weights or checkpoint file that cannot be read, or that does not fit the model."""


class ConfigError(WorkflowError):
    """Options that contradict each other or name something that does not exist."""
