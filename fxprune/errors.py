"""Exceptions and warnings of fxprune.

Every error a user can trigger is one of these, never a bare ``assert``: the message names the
fx node (``node.format_node()``), its target, the user's source line when the trace recorded
one, and a hint on what to do about it.
"""

from __future__ import annotations

import os
import re
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    import torch.fx

__all__ = [
    "FxPruneError",
    "UnsupportedNodeError",
    "PlanMismatchError",
    "InternalError",
    "FxPruneWarning",
    "describe_node",
    "target_name",
]


_FRAME = re.compile(r'File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>\S+)')


def _torch_dir() -> str:
    # Imported here, not at the top: the command line imports these error classes before it
    # knows whether the command needs torch (``fxprune --help`` must not load it). Every
    # caller holds an fx node, so torch is loaded already and this costs nothing.
    import torch

    return os.path.dirname(torch.__file__)


def _source_line(node: torch.fx.Node) -> str:
    """The user's own frame from ``node.stack_trace`` (recorded by :func:`fxprune.trace`).

    fx appends its own frames (proxy.py, module call wrappers) after the user's; skip every
    frame that lives inside torch and report the innermost one that does not.
    """
    trace = node.stack_trace
    if not trace:
        return "source line unknown (trace with fxprune.trace(model) to record source lines)"
    lines = trace.splitlines()
    torch_dir = _torch_dir()
    found = None
    for i, line in enumerate(lines):
        m = _FRAME.search(line)
        if m and not m.group("file").startswith(torch_dir):
            code = lines[i + 1].strip() if i + 1 < len(lines) and not _FRAME.search(lines[i + 1]) else ""
            found = f'{m.group("file")}:{m.group("line")} in {m.group("func")}: {code}'
    return found or "source line unknown (only torch-internal frames were recorded)"


def target_name(node: torch.fx.Node) -> str:
    """``torch.cumsum`` rather than ``<built-in method cumsum ...>``."""
    import torch.fx  # see _torch_dir: loaded already whenever there is a node

    target = node.target
    if isinstance(target, str):
        return target
    try:
        return torch.fx.node._get_qualified_name(target)  # type: ignore[arg-type]
    except Exception:  # not every callable has a qualified name
        return getattr(target, "__name__", repr(target))


def describe_node(node: torch.fx.Node) -> str:
    """A human description of an fx node: its fx form, its target and its source line."""
    target_name_ = target_name(node)
    try:
        formatted = node.format_node() or node.name
    except Exception:  # format_node can fail on exotic args; the name still identifies it
        formatted = node.name
    return f"node {formatted!s} (op={node.op}, target={target_name_}) at {_source_line(node)}"


class FxPruneError(Exception):
    """Base class of every error fxprune raises on purpose."""


class UnsupportedNodeError(FxPruneError):
    """An fx node whose channel semantics fxprune does not know, met in ``strict`` mode."""

    def __init__(self, node: torch.fx.Node, reason: str, hint: Optional[str] = None) -> None:
        self.node_name = node.name
        self.target = node.target
        self.reason = reason
        hint = hint or (
            "teach fxprune the op with @fxprune.register_rule, list the module in ignore=, "
            "or call with strict=False to leave the channels around it unpruned"
        )
        super().__init__(f"{reason}: {describe_node(node)}. Hint: {hint}")


class PlanMismatchError(FxPruneError):
    """A pruning plan that does not fit the model it is applied to."""


class InternalError(RuntimeError):
    """An invariant of fxprune itself broke: a bug in fxprune, never the user's input.

    Deliberately *not* an :class:`FxPruneError`, so that code (and the CLI) that reports bad
    input as a one-line error does not mistake a bug for a user mistake.
    """

    def __init__(self, message: str) -> None:
        super().__init__(
            f"{message}. This is a bug in fxprune, not in your model or input: please report it "
            "with the model (or a small model that reproduces it) and the call that raised this")


class FxPruneWarning(UserWarning):
    """Channels left unpruned because fxprune could not prove pruning them is safe."""
