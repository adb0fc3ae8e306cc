"""Errors of the workflow layer (data, checkpoints, weights, configuration).

They subclass :class:`fxprune.errors.FxPruneError` so a caller (the CLI) can catch every error
fxprune raises on purpose with one ``except`` and print the message without a traceback.
"""

from __future__ import annotations

from fxprune.errors import FxPruneError

from typing import Any, Optional

__all__ = ["WorkflowError", "DataError", "DataNotFoundError", "CheckpointError", "ConfigError"]


class WorkflowError(FxPruneError):
    """Base class of the errors raised by :mod:`fxprune.workflow`."""


class DataError(WorkflowError):
    """A data file that is there but cannot be used: corrupt, inconsistent, or not what it claims.

    Raised inside a DataLoader worker process (a corrupt image read by a worker), it reaches the
    main process rebuilt by torch as ``DataError(message=<the worker's whole traceback>)``;
    :meth:`__init__` keeps only our own one-line message from it, so the CLI can still print
    one line instead of a traceback.
    """

    #: Truthy, so torch's ``ExceptionWrapper.reraise`` rebuilds us with ``message=``.
    message = "data error"

    def __init__(self, text: Optional[str] = None, *args: Any, message: Optional[str] = None) -> None:
        if text is None and message is not None:
            text = _own_message(message, type(self).__name__)
        super().__init__(text if text is not None else "", *args)


def _own_message(wrapped: str, class_name: str) -> str:
    """The ``<module>.<class_name>: <message>`` line a formatted worker traceback ends with."""
    marker = f"{class_name}: "
    for line in reversed(wrapped.strip().splitlines()):
        head, sep, rest = line.partition(marker)
        if sep and (not head or head.endswith(".")):
            return rest.strip()
    return wrapped.strip().splitlines()[0] if wrapped.strip() else class_name


class DataNotFoundError(DataError):
    """A data set is not where it was looked for; the message says where and how to get it."""


class CheckpointError(WorkflowError):
    """A weights or checkpoint file that cannot be read, or that does not fit the model."""


class ConfigError(WorkflowError):
    """Options that contradict each other or name something that does not exist."""
