"""Tracing and shape propagation: the entry of the pipeline.

``trace`` turns an ``nn.Module`` into a ``torch.fx.GraphModule`` and records the user's source
line of every node (so errors can point at it), leaving no ``torch.fx.Proxy`` behind in the
model's attributes (:func:`stale_proxies`); ``propagate_shapes`` stores ShapeProp's
``tensor_meta`` on every node of a graph the caller owns, printing nothing, and falls back to
no shapes (with a warning) when only node-by-node execution of user code fails.

A model torch.fx cannot trace (Ultralytics' ``DetectionModel`` iterates a Proxy) is, given
example inputs, exported with ``torch.export`` instead and lifted back to layers
(:func:`as_graph_module`, :func:`export_graph`): the route is decided by the model alone, so
``plan`` and a later ``apply`` on the same model take the same one.
"""

from __future__ import annotations

import copy
import linecache
import os
import sys
import warnings
from types import FrameType
from typing import Any, Dict, Iterator, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata  # ShapeProp's own tensor_meta format

from .adapters import adapter_for
from .errors import FxPruneError, FxPruneWarning, describe_node
from .layers import PrunedMultiheadAttention

__all__ = ["trace", "as_graph_module", "export_graph", "UntraceableError", "copy_graph_module", "propagate_shapes", "node_shape", "stale_proxies",
           "check_graph", "MutableArgsInterpreter", "ShapeRecorder", "ShapePropagationError", "mutable_copy",
           "cast_model", "cast_value"]


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

    def is_leaf_module(self, m: torch.nn.Module, module_qualified_name: str) -> bool:
        # fxprune's own layers are leaves like torch.nn's, and so are the layers taught by
        # fxprune.register_layer: the rules know them whole.
        return isinstance(m, PrunedMultiheadAttention) or adapter_for(m) is not None \
            or super().is_leaf_module(m, module_qualified_name)

    def create_node(self, kind: str, target: Any, args: Any, kwargs: Any, name: Optional[str] = None,
                    type_expr: Optional[Any] = None) -> torch.fx.Node:
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind not in ("placeholder", "output") and not node.stack_trace:
            node.stack_trace = _user_frames(sys._getframe(1), self._outer) or None
        return node


# ---------------------------------------------------------------- Proxies kept in module attributes

# nn.Module's own bookkeeping (parameters, buffers, submodules, hook tables, the training
# flag) never holds a Proxy; only the attributes a module's own code sets are scanned.
_MODULE_SLOTS = frozenset(vars(torch.nn.Module()))
_SCAN_DEPTH = 4  # how deep into dicts/lists of an attribute Proxies are looked for


_ATOMS = (int, float, bool, str, type(None), torch.Tensor, torch.dtype, torch.device)


def _holds_proxy(value: Any, depth: int = _SCAN_DEPTH) -> bool:
    if isinstance(value, _ATOMS):  # most attributes (channel counts, kernel sizes): checked fast
        return False
    if isinstance(value, torch.fx.Proxy):
        return True
    if depth <= 0:
        return False
    if isinstance(value, dict):
        return any(_holds_proxy(v, depth - 1) or _holds_proxy(k, depth - 1) for k, v in value.items())
    if isinstance(value, (list, tuple, set, frozenset)):
        return any(not isinstance(v, _ATOMS) and _holds_proxy(v, depth - 1) for v in value)
    return False


def _containers_copy(value: Any, depth: int = _SCAN_DEPTH) -> Any:
    """``value`` with its dicts and lists copied (not their leaves): a snapshot to restore from."""
    if depth <= 0 or not isinstance(value, (dict, list)):
        return value
    if isinstance(value, dict):
        try:
            copied = copy.copy(value)  # keeps the dict's class (OrderedDict, defaultdict...)
        except Exception:  # a dict subclass that cannot be copied: its items are what matters
            copied = dict(value)
        for k, v in value.items():
            copied[k] = _containers_copy(v, depth - 1)
        return copied
    if isinstance(value, list):
        return [_containers_copy(v, depth - 1) for v in value]
    return value


def _attributes(model: torch.nn.Module) -> Iterator[Tuple[str, torch.nn.Module, str, Any]]:
    for name, module in model.named_modules(remove_duplicate=True):
        for attr, value in list(vars(module).items()):
            if attr not in _MODULE_SLOTS:
                yield name, module, attr, value


def stale_proxies(model: torch.nn.Module) -> List[str]:
    """``module.attribute`` names of ``model`` that hold a ``torch.fx.Proxy`` (in dicts/lists too).

    Only a trace in progress can use a Proxy; one found in a module attribute was cached by
    ``forward`` during an earlier trace (timm's ``attention_bias_cache`` does this).

    >>> import torch
    >>> class Cached(torch.nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.cache = {}
    ...     def forward(self, x):
    ...         self.cache.setdefault("k", x * 2)
    ...         return self.cache["k"]
    >>> m = Cached()
    >>> _ = torch.fx.symbolic_trace(m)
    >>> stale_proxies(m)
    ['cache']
    """
    return [f"{name}.{attr}" if name else attr for name, _, attr, value in _attributes(model) if _holds_proxy(value)]


class _ProxyGuard:
    """Makes a trace leave the model's attributes as it found them, Proxy-free.

    Before the trace, Proxies an earlier trace left in dict entries are taken out (and put
    back after: the model passed in is never modified); after it, every attribute this trace
    made hold a Proxy gets its old contents back: a cache filled while tracing is emptied again.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.saved: List[Tuple[torch.nn.Module, str, Any, Any]] = []
        self.hidden: List[Tuple[Dict[Any, Any], Any, Any]] = []
        self.unhidable: List[str] = []
        for name, module, attr, value in _attributes(model):
            where = f"{name}.{attr}" if name else attr
            if isinstance(value, dict) and _holds_proxy(value):
                for key, item in list(value.items()):
                    if _holds_proxy(item) or _holds_proxy(key, 0):
                        self.hidden.append((value, key, item))
                        del value[key]
            elif _holds_proxy(value):
                self.unhidable.append(where)
            self.saved.append((module, attr, value, _containers_copy(value)))
        self.model = model
        if self.unhidable:
            self.restore()
            raise FxPruneError(
                f"{type(model).__name__} holds torch.fx Proxies left by an earlier trace in "
                f"{', '.join(self.unhidable)}; tracing it again would read them as nodes of another graph. "
                "Hint: reset those attributes (or build a fresh instance) before pruning; a module that "
                "caches tensors computed in forward should not cache while tracing "
                "(torch.fx._symbolic_trace.is_fx_tracing())")

    def restore(self) -> List[str]:
        """Undo the trace's Proxies and put hidden entries back; returns what could not be undone."""
        before = {(id(module), attr): (value, snapshot) for module, attr, value, snapshot in self.saved}
        left: List[str] = []
        for name, module, attr, value in _attributes(self.model):
            if not _holds_proxy(value):
                continue
            where = f"{name}.{attr}" if name else attr
            old = before.get((id(module), attr))
            if old is None:
                delattr(module, attr)  # created by the trace
            elif old[0] is not value:
                setattr(module, attr, old[0])  # rebound by the trace
            elif isinstance(value, dict):
                value.clear()
                value.update(old[1])
            elif isinstance(value, list):
                value[:] = old[1]
            else:
                left.append(where)
        for container, key, item in self.hidden:
            container[key] = item
        self.hidden = []
        return left


def check_graph(graph: torch.fx.Graph, what: str) -> None:
    """Raise :class:`FxPruneError` if a node of ``graph`` reads a node of another graph.

    That is what a Proxy cached by one trace and read back by the next one becomes; the
    analysis would otherwise fail far from the cause.
    """
    for node in graph.nodes:
        for inp in node.all_input_nodes:
            if inp.graph is not graph:
                raise FxPruneError(
                    f"the graph of {what} is inconsistent: {describe_node(node)} reads "
                    f"{inp.name}, a node of another graph: a torch.fx Proxy kept from an earlier trace (e.g. a "
                    "tensor cached in a module attribute during forward). Hint: clear such caches "
                    "(fxprune.tracing.stale_proxies(model) names them) or build a fresh instance, and trace again")


def trace(model: torch.nn.Module, concrete_args: Optional[Dict[str, Any]] = None) -> torch.fx.GraphModule:
    """Symbolically trace ``model`` into a GraphModule that remembers source lines.

    Tracing leaves ``model`` as it found it: a module that caches a value computed in
    ``forward`` in an attribute (timm's attention-bias caches) would otherwise keep a
    ``torch.fx.Proxy`` of this trace, and a second trace would read that Proxy back as a node
    of another graph. Proxies left by an earlier trace (the user's own ``symbolic_trace``) are
    hidden from this one for the same reason; see :func:`stale_proxies`.

    >>> import torchvision, fxprune
    >>> gm = fxprune.trace(torchvision.models.resnet18())
    >>> gm.graph.find_nodes(op="call_module", target="conv1")[0].name
    'conv1'
    """
    if isinstance(model, torch.fx.GraphModule):
        return model
    if not isinstance(model, torch.nn.Module):
        raise FxPruneError(f"expected an nn.Module or torch.fx.GraphModule, got {type(model).__name__}")
    # Python code that reads ``self.training`` (timm's BatchNormAct2d, F.dropout(training=...),
    # stochastic depth) is baked into the graph as the constant it had while tracing. A graph
    # traced in train mode would compute batch statistics forever, also in eval mode, and fail
    # at batch 1; so trace in eval mode, the mode a pruned model is deployed in.
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        tracer, graph = _trace_once(model, concrete_args)
        if any(mode for _, mode in modes):
            _warn_if_mode_dependent(model, graph, concrete_args, modes)
    finally:
        for m, mode in modes:
            m.training = mode
    check_graph(graph, type(model).__name__)
    name = model.__class__.__name__
    return torch.fx.GraphModule(tracer.root, graph, name)


def _warn_if_mode_dependent(model: torch.nn.Module, graph: torch.fx.Graph, concrete_args: Optional[Dict[str, Any]],
                            modes: List[Tuple[torch.nn.Module, bool]]) -> None:
    """Warn when the model's forward is another graph in the train mode it was given in."""
    for m, mode in modes:
        m.training = mode
    try:
        _, train_graph = _trace_once(model, concrete_args)
    except FxPruneError:
        return  # untraceable in train mode: the eval-mode graph is all there is
    finally:
        model.eval()
    if train_graph.python_code("self").src != graph.python_code("self").src:
        warnings.warn(FxPruneWarning(
            f"{type(model).__name__} was given in train mode, and its forward reads self.training in Python "
            "code that torch.fx bakes into the graph (functional batch norm or dropout, stochastic depth): the "
            "graph was traced in eval mode, so the pruned GraphModule computes the eval-mode function in either "
            "mode. Hint: call model.eval() before pruning to silence this; to fine-tune with train-mode "
            "behaviour, fine-tune the original model class, or make those layers leaf modules"), stacklevel=3)


def _trace_once(model: torch.nn.Module, concrete_args: Optional[Dict[str, Any]]) -> Tuple["_RecordingTracer", torch.fx.Graph]:
    tracer = _RecordingTracer()
    guard = _ProxyGuard(model)
    try:
        graph = tracer.trace(model, concrete_args=concrete_args)
    except Exception as exc:  # fx raises TraceError, TypeError, NotImplementedError... all mean "untraceable"
        raise UntraceableError(
            f"torch.fx could not trace {type(model).__name__}: {type(exc).__name__}: {exc}. "
            "Hint: data-dependent control flow cannot be traced; mark the offending submodule as a "
            "leaf (a torch.fx.Tracer subclass with is_leaf_module), pass concrete_args for "
            "flag arguments, or trace the model yourself and pass the GraphModule"
        ) from exc
    finally:
        left = guard.restore()
    if left:
        raise FxPruneError(
            f"tracing {type(model).__name__} left torch.fx Proxies in module attributes that fxprune cannot "
            f"put back: {', '.join(left)}. A Proxy is only meaningful during the trace that made it, and the "
            "next trace of this instance would read it as a node of another graph. Hint: make the cache a "
            "dict or list attribute (fxprune restores those), skip caching while tracing "
            "(torch.fx._symbolic_trace.is_fx_tracing()), or trace a fresh instance")
    return tracer, graph


class UntraceableError(FxPruneError):
    """torch.fx could not trace a model (data-dependent control flow, iterating a Proxy, ...)."""


_EXPORT_HINT = ("Hint: pass example_inputs=(x,) (one forward call's positional arguments): fxprune then exports "
                "the model with torch.export (strict=False, eval mode) instead and prunes that graph")


def as_graph_module(model: torch.nn.Module, example_inputs: Optional[Sequence[Any]] = None) -> torch.fx.GraphModule:
    """Return ``model`` itself if it is a GraphModule, else its trace.

    A ``torch.export`` program (or its ``.module()``) speaks ATen ops with weights as graph
    attributes; it is lifted back to ordinary layers first so the rule table applies.

    An ``nn.Module`` torch.fx cannot trace is exported instead when ``example_inputs`` are
    given (:func:`export_graph`), with an :class:`FxPruneWarning` saying so and why fx failed;
    without them the :class:`UntraceableError` says to pass them. The route depends on the
    model only, never on earlier calls, so a plan and its ``apply`` see the same graph.
    """
    from .export import from_exported, is_aten_graph  # lazy: export imports only errors

    if is_aten_graph(model):
        return from_exported(model)
    if isinstance(model, torch.fx.GraphModule):
        check_graph(model.graph, type(model).__name__)  # a graph someone else traced
        return model
    try:
        return trace(model)
    except UntraceableError as exc:
        if not isinstance(model, torch.nn.Module):
            raise
        if example_inputs is None:
            raise UntraceableError(f"{exc}. {_EXPORT_HINT}") from exc.__cause__
        failure = exc
    warnings.warn(FxPruneWarning(
        f"{failure.args[0].split('. Hint:')[0]}; exported it with torch.export (strict=False, eval mode) instead, "
        "and analyses that graph (its layers keep the model's module names). Hint: this is expected for models "
        "such as Ultralytics YOLO; keep_class=True puts the pruned layers back into the model's own class"),
        stacklevel=4)
    return export_graph(model, example_inputs)


class _ModuleState:
    """Every module's attribute dicts as they were, to put back after ``torch.export``.

    Non-strict export runs ``forward`` on fake tensors, and a forward that caches tensors in
    attributes (Ultralytics' ``Detect.anchors``/``strides``) leaves FakeTensors there: the
    user's model would then return fake results. Pruning never modifies its input.
    """

    def __init__(self, model: torch.nn.Module) -> None:
        self.saved = [(m, dict(vars(m)), dict(m._parameters), dict(m._buffers), dict(m._modules))
                      for m in model.modules()]

    def restore(self) -> None:
        for module, attrs, params, buffers, modules in self.saved:
            for store, old in ((module._parameters, params), (module._buffers, buffers), (module._modules, modules)):
                if store != old or any(store[k] is not v for k, v in old.items()):
                    store.clear()
                    store.update(old)
            now = vars(module)
            for key in [k for k in now if k not in attrs]:
                del now[key]
            for key, value in attrs.items():
                if now.get(key, _MISSING) is not value:
                    now[key] = value


_MISSING = object()


def export_graph(model: torch.nn.Module, example_inputs: Sequence[Any]) -> torch.fx.GraphModule:
    """``torch.export.export(model, example_inputs, strict=False)`` in eval mode, lifted to layers.

    The model is left as it was found (training flags, and attributes its forward rebinds while
    exporting). The lifted graph shares the model's parameters
    (:func:`fxprune.export.is_lifted` is True for it and for graphs pruned from it). Export failures are an :class:`FxPruneError` naming both routes.
    """
    from .export import from_exported  # lazy: export imports only errors

    args = tuple(example_inputs)
    state = _ModuleState(model)
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        with warnings.catch_warnings():
            # Export's notes on attributes assigned during export: _ModuleState undoes those.
            warnings.filterwarnings("ignore", message=".*were assigned during export.*")
            program = torch.export.export(model, args, strict=False)
    except Exception as exc:  # export raises UserError, Unsupported, GuardOnDataDependent...: all mean "failed"
        raise UntraceableError(
            f"neither torch.fx nor torch.export could capture {type(model).__name__}: torch.export "
            f"(strict=False) failed with {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}. "
            "Hint: check that the model runs on example_inputs and that torch.export.export(model.eval(), "
            "example_inputs, strict=False) works; or trace it yourself and pass the GraphModule") from exc
    finally:
        state.restore()
        for m, mode in modes:
            m.training = mode
    return from_exported(program)


def copy_graph_module(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    """A deep copy that owns its parameters, buffers and graph (passes work on this)."""
    return copy.deepcopy(gm)


def mutable_copy(value: Any) -> Any:
    """``value`` with fx's immutable lists/dicts (and plain ones) replaced by fresh mutable copies.

    What the generated ``forward`` hands a call (it builds list literals afresh each run); an
    ``Interpreter`` subclass should pass its arguments through this too.
    """
    if isinstance(value, list):
        return [mutable_copy(v) for v in value]
    if isinstance(value, dict):
        return {k: mutable_copy(v) for k, v in value.items()}
    if type(value) is tuple:
        return tuple(mutable_copy(v) for v in value)
    return value


class MutableArgsInterpreter(torch.fx.Interpreter):
    """An ``Interpreter`` that hands each call fresh mutable list/dict arguments.

    fx stores list and dict arguments immutable, while the generated ``forward`` builds them
    afresh on every run; a user helper that mutates its list argument (torchvision's swin3d
    window-size helper) runs under ``forward`` but fails under a plain interpreter. Every
    interpreter fxprune runs over a user's graph (shapes, FLOPs, activation statistics) derives
    from this one so they all run the model as its own ``forward`` would.
    """

    def fetch_args_kwargs_from_env(self, n: torch.fx.Node) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
        args, kwargs = super().fetch_args_kwargs_from_env(n)
        if not any(isinstance(a, (list, dict, tuple)) for a in args) and \
                not any(isinstance(v, (list, dict, tuple)) for v in kwargs.values()):
            return args, kwargs  # most nodes: tensors and numbers only, nothing to copy
        return tuple(mutable_copy(a) for a in args), {k: mutable_copy(v) for k, v in kwargs.items()}


class ShapeRecorder(MutableArgsInterpreter):
    """Runs a GraphModule node by node and stores each result's ``tensor_meta`` (as ShapeProp does).

    Two differences from ``torch.fx.passes.shape_prop.ShapeProp``: list and dict arguments are
    handed to each call as fresh mutable copies, as the generated ``forward`` builds them (fx
    stores them immutable, and a helper that mutates its list argument, like torchvision's
    swin3d window-size helper, fails only under an interpreter); and a failing node raises
    :class:`ShapePropagationError` naming it, without printing a traceback to stderr.
    """

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        super().__init__(gm)
        self.extra_traceback = False  # the error names the node itself, in one line

    def run_node(self, n: torch.fx.Node) -> Any:
        try:
            result = super().run_node(n)
        except Exception as exc:
            raise ShapePropagationError(n, exc) from exc
        found = False

        def meta(obj: Any) -> Any:
            nonlocal found
            if isinstance(obj, torch.Tensor):
                found = True
                return _extract_tensor_metadata(obj)
            return obj

        recorded = torch.fx.node.map_aggregate(result, meta)
        if found:
            n.meta["tensor_meta"] = recorded
        n.meta["type"] = type(result)
        return result


class ShapePropagationError(FxPruneError):
    """Running a graph node by node on example inputs failed at ``node``."""

    def __init__(self, node: torch.fx.Node, error: BaseException) -> None:
        self.node = node
        self.error = error
        super().__init__(f"{describe_node(node)}: {type(error).__name__}: {error}")


def _placeholder_count(gm: torch.fx.GraphModule) -> Optional[int]:
    """How many positional inputs the graph takes at most (None: any number, it has ``*args``)."""
    targets = [str(n.target) for n in gm.graph.nodes if n.op == "placeholder"]
    return None if any(t.startswith("*") for t in targets) else len(targets)


def propagate_shapes(gm: torch.fx.GraphModule, example_inputs: Sequence[Any]) -> bool:
    """Record ``tensor_meta`` on every node of ``gm`` (which the caller owns); True if it could.

    Runs in eval mode under ``torch.no_grad`` and restores the training flags, so BatchNorm
    running statistics are not updated by the probe. Nothing is printed (torch's ShapeProp
    prints a traceback before raising); errors carry what went wrong instead.

    When a node fails, the model is run once more as a whole (its generated ``forward``) to
    tell whose fault it is:

    * if that fails too, ``example_inputs`` are wrong for this model (wrong number, shape or
      dtype): :class:`FxPruneError` naming the failing node, its source line and the error;
    * if the model runs, only node-by-node execution fails (fx hands arguments to user code
      differently from ``forward``): shapes are an optional aid, so an
      :class:`~fxprune.errors.FxPruneWarning` names the node and the error, every partial
      ``tensor_meta`` is dropped and False is returned: the analysis then runs as it does
      without example inputs (more channels may stay frozen, nothing is guessed).
    """
    inputs = tuple(example_inputs)
    most = _placeholder_count(gm)
    if most is not None and len(inputs) > most:
        raise FxPruneError(
            f"example_inputs has {len(inputs)} inputs but the model's forward takes at most {most}. "
            "Hint: pass a tuple with one tensor per forward argument, e.g. example_inputs=(x,)")
    # Modules may be shared with the caller's model: restore each one's own mode afterwards.
    modes = [(m, m.training) for m in gm.modules()]
    gm.eval()
    try:
        with torch.no_grad():
            try:
                ShapeRecorder(gm).run(*inputs)
                return True
            except ShapePropagationError as exc:
                failure = exc
            for node in gm.graph.nodes:
                node.meta.pop("tensor_meta", None)
            try:
                gm(*inputs)
            except Exception as exc:
                also = "" if str(exc) == str(failure.error) else f" (its forward: {type(exc).__name__}: {exc})"
                raise FxPruneError(
                    f"running the model on example_inputs failed at {failure}{also}. Hint: example_inputs must be "
                    "a tuple of tensors the model's forward accepts (number, shape and dtype)") from exc
    finally:
        for m, mode in modes:
            m.training = mode
    warnings.warn(
        f"shape propagation on example_inputs failed at {failure}, although the model itself runs on them; "
        "continuing without shapes (as if no example_inputs were given: channels whose structure only "
        "shapes could tell stay unpruned)", FxPruneWarning, stacklevel=3)
    return False


def node_shape(node: torch.fx.Node) -> Optional[torch.Size]:
    """The tensor shape ShapeProp recorded for ``node``, or None if unknown or not a tensor."""
    meta = node.meta.get("tensor_meta")
    shape = getattr(meta, "shape", None)
    return shape if isinstance(shape, torch.Size) else None


# ------------------------------------------------------------------------------ casting a model whole
#
# The float64 proof (fxprune.testing) and keep_class's numerical proof of lifted graphs (api)
# both cast a model with every constant it holds; it lives here, below both.

# nn.Module's own bookkeeping: parameters and buffers (Module.to casts them) and submodules.
_CAST_BY_MODULE_TO = frozenset({"_parameters", "_buffers", "_modules"})


def cast_value(value: Any, dtype: torch.dtype) -> Any:
    """``value`` with every floating tensor in it (in tuples, lists, dicts) cast to ``dtype``."""
    if isinstance(value, torch.dtype):
        # A graph's own dtype requests (x.to(torch.float32), arange(..., dtype=torch.float32)).
        return dtype if value.is_floating_point and dtype.is_floating_point else value
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() and value.dtype != dtype and not isinstance(value, nn.Parameter):
            return value.to(dtype)
        return value
    if isinstance(value, list):
        cast = [cast_value(v, dtype) for v in value]
        return value if all(a is b for a, b in zip(cast, value)) else cast
    if type(value) is tuple:
        cast_t = tuple(cast_value(v, dtype) for v in value)
        return value if all(a is b for a, b in zip(cast_t, value)) else cast_t
    if isinstance(value, dict):
        cast_d = {k: cast_value(v, dtype) for k, v in value.items()}
        return value if all(cast_d[k] is v for k, v in value.items()) else cast_d
    return value


_DTYPE_METHODS = {"half": torch.float16, "bfloat16": torch.bfloat16, "float": torch.float32, "double": torch.float64}


def cast_model(model: nn.Module, dtype: torch.dtype) -> nn.Module:
    """``model.to(dtype)``, plus every floating tensor constant and dtype request it holds, in place.

    ``Module.to`` casts parameters and buffers only; a graph can also keep tensor constants as
    plain attributes read by ``get_attr`` (export's lifted constants), modules cache tensors in
    dict attributes, a hand-built graph can hold tensors as node arguments, and a graph can ask
    for float32 itself (RAFT's ``coords.float()``, export's ``dtype=torch.float32``
    arguments). Left alone, any of them makes a float64 run fail ("expected scalar type
    Double but found Float"); so floating tensor attributes, floating tensors and floating
    ``torch.dtype`` values in node arguments, and ``x.float()``-style calls all follow ``dtype``.
    Code inside leaf modules is not rewritten.
    """
    model.to(dtype)
    for module in model.modules():
        for attr, value in list(vars(module).items()):
            if attr in _CAST_BY_MODULE_TO:
                continue
            cast = cast_value(value, dtype)
            if cast is value:
                continue
            if isinstance(value, dict):
                value.update(cast)  # in place: other code may hold the same dict (a cache)
            elif isinstance(value, list):
                value[:] = cast
            else:
                setattr(module, attr, cast)
        if isinstance(module, torch.fx.GraphModule):
            changed = False
            for node in module.graph.nodes:
                if node.op == "call_method" and node.target in _DTYPE_METHODS and dtype.is_floating_point \
                        and _DTYPE_METHODS[str(node.target)] != dtype and node.args:
                    node.target, node.args = "to", (node.args[0], dtype)  # x.float() -> x.to(dtype)
                    changed = True
                args, kwargs = cast_value(node.args, dtype), cast_value(node.kwargs, dtype)
                if args is not node.args or kwargs is not node.kwargs:
                    node.args, node.kwargs = tuple(args), dict(kwargs)
                    changed = True
            if changed:
                module.recompile()
    return model
