"""Tracing and shape propagation: the entry of the pipeline.

``trace`` turns an ``nn.Module`` into a ``torch.fx.GraphModule`` and records the user's source
line of every node (so errors can point at it); ``propagate_shapes`` stores ShapeProp's
``tensor_meta`` on every node of a graph the caller owns.
"""

from __future__ import annotations

import copy
import linecache
import os
import sys
from types import FrameType
from typing import Any, Dict, List, Optional, Sequence

import torch
import torch.fx
from torch.fx.passes.shape_prop import ShapeProp

from .errors import FxPruneError

__all__ = ["trace", "as_graph_module", "copy_graph_module", "propagate_shapes", "node_shape"]


_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep
_FRAMES_KEPT = 4  # innermost user frames per node: the op's line and the calls that led to it


def _user_frames(frame: Optional[FrameType], stop: Optional[FrameType]) -> str:
    """The innermost frames outside torch, up to ``stop``, formatted like a traceback.

    fx's own ``record_stack_traces`` captures and symbolises the whole stack for every node,
    which was a quarter of the tracing time on resnet152; errors only need the user's lines.
    """
    kept: List[str] = []
    while frame is not None and frame is not stop and len(kept) < _FRAMES_KEPT:
        code = frame.f_code
        name = code.co_filename
        if not name.startswith(_TORCH_DIR):
            line = frame.f_lineno
            text = linecache.getline(name, line).strip()
            kept.append(f'  File "{name}", line {line}, in {code.co_name}\n    {text}')
        frame = frame.f_back
    return "\n".join(reversed(kept))


class _RecordingTracer(torch.fx.Tracer):
    """A tracer that stores each node's user source lines in ``node.stack_trace``.

    Errors name the user's own source line, not fx internals. Frames outside the traced
    call (whoever called ``trace``) are left out.
    """

    _outer: Optional[FrameType] = None

    def trace(self, root: Any, concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.Graph:
        self._outer = sys._getframe()
        try:
            return super().trace(root, concrete_args)
        finally:
            self._outer = None  # a frame keeps its locals alive

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: Optional[str] = None,
                    type_expr: Optional[Any] = None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output") and not node.stack_trace:
            node.stack_trace = _user_frames(sys._getframe(1), self._outer) or None
        return node


def trace(model: torch.nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that remembers source lines.

    >>> import torchvision, fxprune
    >>> gm = fxprune.trace(torchvision.models.resnet18())
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].name
    'conv1'
    """
    if isinstance(model, torch.fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise FxPruneError(f"expected an nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    tracer = _RecordingTracer()
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... all mean "untraceable"
        raise FxPruneError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Hint: data-dependent control flow cannot be traced; mark the offending submodule as a "
            "leaf (a torch.fx.Tracer subclass with is_leaf_module), pass concrete_args for "
            "flag arguments, or trace the model yourself and pass the GraphModule"
        ) from exc
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def as_graph_module(model: torch.nn.Module) -> torch.fx.GraphModule:
    """Return ``model`` itself if it is a GraphModule, else its trace.

    A ``torch.export`` program (or its ``.module()``) speaks ATen ops with weights as graph
    attributes; it is lifted back to ordinary layers first so the rule table applies.
    """
    from .export import from_exported, is_aten_graph  # lazy: export imports only errors

    if is_aten_graph(model):
        return from_exported(model)
    return model if isinstance(model, torch.fx.GraphModule) else trace(model)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy that owns its parameters, buffers and graph (passes work on this)."""
    return copy.deepcopy(gm)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> None:
    """Run ShapeProp on ``gm`` (which the caller owns) so nodes carry ``tensor_meta``.

    Runs in eval mode under ``torch.no_grad`` and restores the training flag, so BatchNorm
    running statistics are not updated by the probe.
    """
    # Modules may be shared with the caller's model: restore each one's own mode afterwards.
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            ShapeProp(gm).propagate(*example_inputs)
    except Exception as exc:
        raise FxPruneError(
            f"running the model on example_inputs failed: {type(exc).__name__}: {exc}. "
            "Hint: example_inputs must be a tuple of tensors the model's forward accepts"
        ) from exc
    finally:
        for m, mode in modes:
            m.training = mode


def node_shape(node: torch.fx.Node) -> Optional[torch.Size]:
    """The tensor shape ShapeProp recorded for ``node``, or None if unknown or not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape if isinstance(shape, torch.Size) else None
