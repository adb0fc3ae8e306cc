"""Exceptions and warnings of fxprune.

Every error a user can trigger is one of these, never a bare ``assert``: the message names the
fx node (``node.format_node()``), its target, the user's source line when the trace recorded
one, and a hint on what to do about it.
"""

from __future__ import annotations

from typing import Optional

import torch.fx

__all__ = [
    "FxPruneError",
    "UnsupportedNodeError",
    "PlanMismatchError",
    "FxPruneWarning",
    "describe_node",
]


def _source_line(node: torch.fx.Node) -> str:
    """The innermost user frame of ``node.stack_trace`` (recorded by :func:`fxprune.trace`)."""
    trace = node.stack_trace
    if not trace:
        return "source line unknown (trace with fxprune.trace(model) to record source lines)"
    lines = [ln.strip() for ln in trace.strip().splitlines() if ln.strip()]
    # fx stack traces read outermost -> innermost as 'File "...", line N, in f' followed by the
    # code line; the last two lines are the user's own statement.
    return " | ".join(lines[-2:])


def describe_node(node: torch.fx.Node) -> str:
    """A human description of an fx node: its fx form, its target and its source line."""
    target = node.target
    if callable(target) and not isinstance(target, str):
        target_name = getattr(target, "__module__", "") + "." + getattr(target, "__qualname__", repr(target))
    else:
        target_name = str(target)
    try:
        formatted = node.format_node() or node.name
    except Exception:  # format_node can fail on exotic args; the name still identifies it
        formatted = node.name
    return f"node {formatted!s} (op={node.op}, target={target_name}) at {_source_line(node)}"


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


class FxPruneWarning(UserWarning):
    """Channels left unpruned because fxprune could not prove pruning them is safe."""
