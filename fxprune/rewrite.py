"""The only place that builds layers: plan -> a NEW GraphModule with physically smaller layers.

The input GraphModule is never touched. The new one gets a copy of the graph (with
``fxprune_*`` metadata on its nodes) and its own modules: sliced copies of pruned ones, deep
copies of the rest. Afterwards the graph is compiled and linted, each rebuilt module's
shapes are checked against the plan, and (given example inputs) shapes are propagated again.

Tensors the source model shares between modules (tied weights) are shared again in the result:
the analysis made their owners keep the same channels, and the rewrite re-ties the copies.
"""

from __future__ import annotations

import copy
import operator
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.fx
import torch.nn as nn

from .adapters import adapter_for, grouped_weight
from .errors import FxPruneError, PlanMismatchError, InternalError
from .groups import Analysis, Slot, TensorSlot, check_balanced, tensor_users
from .planning import PruningPlan, resolve
from .registry import Registry
from .rules import ARG_REWRITE, CHANNELS_META, LAYOUT_META, ArgRewrite, evaluate_arg
from .tracing import propagate_shapes

__all__ = ["rewrite", "register_builder", "DEFAULT_BUILDERS", "Builder", "slot_indices", "apply_arg_rewrites", "tensor_slot_size",
           "unit_positions"]

Indices = Optional[torch.Tensor]  # None: that dimension is unchanged
Builder = Callable[[nn.Module, Dict[str, Indices]], nn.Module]
DEFAULT_BUILDERS: Registry[type, Builder] = Registry("builders")
"""Module type (exact) -> builder, the table :func:`register_builder` writes to.

It ships empty: every built-in layer is built by its adapter (:data:`fxprune.adapters.BUILTIN_LAYERS`),
and an entry here wins over a type's adapter. ``DEFAULT_BUILDERS.extended({MyLayer: build})`` is a NEW table for one
``rewrite(..., builders=)`` / ``fxprune.prune(..., builders=)`` call, the default untouched.
"""
_BUILDERS: Dict[type, Builder] = DEFAULT_BUILDERS.own  # the default table's own entries


def register_builder(*types: type) -> Callable[[Builder], Builder]:
    """Register, in :data:`DEFAULT_BUILDERS`, how to build a smaller copy of a module type from kept indices per role.

    >>> import torch.nn as nn
    >>> class Scale(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.weight = nn.Parameter(torch.ones(c))
    >>> table = DEFAULT_BUILDERS.extended()
    >>> @table.register(Scale)
    ... def _(m, idx):
    ...     new = Scale(len(idx["channelwise"]))
    ...     new.weight.data = m.weight.data[idx["channelwise"]]
    ...     return new
    >>> Scale in table, Scale in DEFAULT_BUILDERS
    (True, False)
    """
    return DEFAULT_BUILDERS.register(*types)


def slot_indices(slot: Slot, kept: Dict[int, List[int]], as_tensor: Optional[Dict[int, torch.Tensor]] = None) -> Indices:
    """Kept positions of a module dimension, or None if none of its groups changed.

    ``as_tensor`` caches each group's kept list as a tensor across calls (a group indexes
    several modules; building the tensor from a list each time was a tenth of a rewrite).
    """
    if all(len(kept[g]) == size for g, size in slot.segments):
        return None
    cache = {} if as_tensor is None else as_tensor
    parts, offset = [], 0
    for g, size in slot.segments:
        rows = cache.get(g)
        if rows is None:
            rows = cache[g] = torch.tensor(kept[g], dtype=torch.long)
        if offset == 0 and slot.block == 1:
            parts.append(rows)  # shared, read-only: callers only index with it
        else:
            shifted = (rows + offset) * slot.block
            parts.append((shifted.unsqueeze(1) + torch.arange(slot.block)).flatten())
        offset += size
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def _expected(slot: Slot, kept: Dict[int, List[int]]) -> int:
    return sum(len(kept[g]) for g, _ in slot.segments) * slot.block


def _dim_sizes(module: nn.Module) -> Dict[str, int]:
    """The size of the dimension each role indexes, read back from the built module (its adapter says how)."""
    adapter = adapter_for(module)
    return adapter.sizes(module) if adapter is not None else {}


def rewrite(analysis: Analysis, plan: PruningPlan, example_inputs: Optional[Sequence[Any]] = None, *,
            builders: Optional[Registry[type, Builder]] = None) -> torch.fx.GraphModule:
    """Build the pruned GraphModule that ``plan`` describes for the analysed model.

    ``builders``: the table of layer builders (default :data:`DEFAULT_BUILDERS`).

    >>> import torchvision, fxprune
    >>> from fxprune.groups import analyze
    >>> from fxprune.planning import make_plan
    >>> a = analyze(fxprune.trace(torchvision.models.resnet18()))
    >>> pruned = rewrite(a, make_plan(a, 0.5))
    >>> pruned.get_submodule("layer1.0.conv1").out_channels
    32
    """
    if builders is None:
        builders = DEFAULT_BUILDERS
    elif not isinstance(builders, Registry):
        raise FxPruneError("builders= must be a table like fxprune.rewrite.DEFAULT_BUILDERS (e.g. "
                           f"DEFAULT_BUILDERS.extended({{MyLayer: build}})), got {type(builders).__name__}")
    src = analysis.gm
    kept = resolve(analysis, plan)
    for group in analysis.groups:
        problem = check_balanced(group, kept[group.index])
        if problem is not None:
            raise PlanMismatchError(problem)
    by_module: Dict[str, Dict[str, Slot]] = {}
    for (module, role), slot in analysis.slots.items():
        by_module.setdefault(module, {})[role] = slot

    graph = copy.deepcopy(src.graph)
    as_tensor: Dict[int, torch.Tensor] = {}
    root: Dict[str, Any] = {}
    changed: Dict[str, Dict[str, Slot]] = {}
    for node in graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in root:
            continue
        target = str(node.target)
        original = operator.attrgetter(target)(src)
        if node.op == "get_attr" and target in analysis.tensors:
            root[target] = _sliced_tensor(original, analysis.tensors[target], kept, as_tensor)
            continue
        slots = by_module.get(target, {})
        idx = {role: slot_indices(slot, kept, as_tensor) for role, slot in slots.items()}
        if any(i is not None for i in idx.values()):
            builder = builders.get(type(original))
            adapter = adapter_for(original)
            if builder is None and adapter is not None:
                builder = adapter.build  # a built-in layer, or one taught by fxprune.register_layer
            if builder is None:
                # Every built-in layer type has an adapter, so this is a user rule for a custom
                # layer registered without one: the user's to fix, not a bug of ours.
                raise FxPruneError(
                    f"no builder for {type(original).__name__} at {target}: a channel rule is registered "
                    f"for it, but nothing says how to slice its tensors. Hint: teach fxprune the layer with "
                    f"fxprune.register_layer({type(original).__name__}, roles=...) (its tensors per role), "
                    f"register a builder with @fxprune.register_builder({type(original).__name__}), or list "
                    f"{target!r} in ignore=")
            root[target] = builder(original, idx)
            changed[target] = slots
        else:
            root[target] = copy.deepcopy(original)

    apply_arg_rewrites(graph, kept)
    for node in graph.nodes:
        # Shapes recorded before pruning are wrong now; they come back below if inputs allow.
        node.meta.pop("tensor_meta", None)
        node.meta.pop("val", None)
        layout = node.meta.get(LAYOUT_META)
        if layout is not None:
            node.meta[CHANNELS_META] = sum(len(kept[g]) for g in layout.groups)
    new = torch.fx.GraphModule(root, graph, src.__class__.__name__)  # compiles the code once
    new.graph.lint()  # now owned by ``new``, so lint also checks every target exists
    _retie(src, new)
    new.train(src.training)

    for target, slots in changed.items():
        sizes = _dim_sizes(new.get_submodule(target))
        for role, slot in slots.items():
            # A custom module's builder is trusted here; shape propagation on example_inputs
            # (below) still checks what it built.
            if role in sizes and sizes[role] != _expected(slot, kept):
                raise InternalError(f"{target} has {sizes.get(role)} {role} positions, plan needs {_expected(slot, kept)}")
    _check_tensor_sizes(analysis, new, kept)
    if example_inputs is not None:
        try:
            propagate_shapes(new, example_inputs)  # a mismatch fails here, loudly
        except FxPruneError as exc:
            # The same inputs ran through the original model during the analysis: a pruned
            # model that cannot run them is fxprune's fault, not the inputs'.
            raise InternalError(f"the pruned model does not run on example_inputs the original model runs on "
                                f"(if the model uses a rule of your own from fxprune.register_rule, check it first): "
                                f"{exc.__cause__ or exc}") from exc
        _check_channels(new)
    return new


def apply_arg_rewrites(graph: torch.fx.Graph, kept: Dict[int, List[int]]) -> None:
    """Patch the arguments of ``graph``'s nodes (a NEW graph) that follow the kept channels.

    The analysis left an :class:`fxprune.rules.ArgRewrite` in ``node.meta[ARG_REWRITE]`` of
    each node whose arguments count channels (split sizes, slice bounds, a view's literal
    channel count, a sliced parameter's ``view(1, C, 1, 1)``, a depthwise functional conv's
    ``groups``); each patch is evaluated on the kept counts and written where its path
    says. A node whose arguments do not change is left exactly as it was (target included).
    The record is then dropped: its group indices mean nothing to a later analysis.
    """
    counts = {g: len(k) for g, k in kept.items()}
    for node in graph.nodes:
        rewrite = node.meta.pop(ARG_REWRITE, None)
        if rewrite is None:
            continue
        if not isinstance(rewrite, ArgRewrite):
            raise InternalError(f"node {node.format_node()} carries {type(rewrite).__name__} under {ARG_REWRITE!r}")
        args, kwargs = node.args, dict(node.kwargs)
        changed = False
        for patch in rewrite.patches:
            new = evaluate_arg(patch.value, counts)
            old = _at(args, kwargs, patch.path, node)
            if old != new:
                args, kwargs = _put(args, kwargs, patch.path, new)
                changed = True
        if changed:
            node.args, node.kwargs = args, kwargs
            if rewrite.target is not None:
                node.target = rewrite.target


_ABSENT = object()  # a keyword the node does not pass yet (a patch may add one its new target takes)


def _at(args: Tuple[Any, ...], kwargs: Dict[str, Any], path: Tuple[Any, ...], node: torch.fx.Node) -> Any:
    if len(path) == 1 and isinstance(path[0], str) and path[0] not in kwargs:
        return _ABSENT
    try:
        value: Any = kwargs[path[0]] if isinstance(path[0], str) else args[path[0]]
        for step in path[1:]:
            value = value[step]
    except (IndexError, KeyError, TypeError) as exc:
        raise InternalError(f"argument rewrite at {path} does not fit {node.format_node()}") from exc
    return value


def _replaced(container: Any, step: Any, rest: Tuple[Any, ...], new: Any) -> Any:
    """``container`` (a list or tuple) with ``container[step]`` replaced along ``rest``."""
    items = list(container)
    items[step] = new if not rest else _replaced(items[step], rest[0], rest[1:], new)
    return type(container)(items) if isinstance(container, (list, tuple)) else items


def _put(args: Tuple[Any, ...], kwargs: Dict[str, Any], path: Tuple[Any, ...], new: Any) -> Tuple[Tuple[Any, ...], Dict[str, Any]]:
    head, rest = path[0], path[1:]
    if isinstance(head, str):
        kwargs = dict(kwargs)
        kwargs[head] = new if not rest else _replaced(kwargs[head], rest[0], rest[1:], new)
        return args, kwargs
    return tuple(_replaced(tuple(args), head, rest, new)), kwargs


# --------------------------------------------------------------------------- directly read tensors
#
# Parameters and buffers the graph reads with get_attr (a functional layer's weight, running
# statistics and bias, a per-channel operand) are sliced here, one TensorSlot per dim their
# channels index; the NEW GraphModule gets the sliced copies, the source keeps its own.


def _sliced_tensor(original: Any, slots: Sequence[TensorSlot], kept: Dict[int, List[int]],
                   as_tensor: Dict[int, torch.Tensor]) -> Any:
    """A copy of a directly read parameter/buffer keeping the planned channels along each slot's dim."""
    if not isinstance(original, torch.Tensor):
        return copy.deepcopy(original)
    t: torch.Tensor = original.detach()
    changed = False
    rest = list(slots)
    grouped_in = [s for s in slots if s.role == "in" and s.conv_groups > 1]
    if grouped_in:
        # A grouped functional conv: rows and inputs are picked together, per conv group.
        in_slot = grouped_in[0]
        out_slot = next((s for s in slots if s.role == "out" and s.dim == 0), None)
        rows = None if out_slot is None else slot_indices(out_slot.as_slot(), kept, as_tensor)
        cols = slot_indices(in_slot.as_slot(), kept, as_tensor)
        if cols is not None:
            t, changed = grouped_weight(t, in_slot.conv_groups, rows, cols), True
            rest = [s for s in slots if s is not in_slot and s is not out_slot]
    for slot in rest:
        idx = slot_indices(slot.as_slot(), kept, as_tensor)
        if idx is not None and slot.per > 1:
            idx = unit_positions(idx, slot.per, slot.target)
        if idx is not None:
            t, changed = t.index_select(slot.dim, idx.to(t.device)), True
    if not changed:
        return copy.deepcopy(original)
    return nn.Parameter(t, requires_grad=original.requires_grad) if isinstance(original, nn.Parameter) else t


def unit_positions(channels: torch.Tensor, per: int, target: str = "a tensor") -> torch.Tensor:
    """The positions of whole units of ``per`` channels, from their kept channel indices.

    >>> unit_positions(torch.tensor([4, 5, 6, 7, 12, 13, 14, 15]), 4).tolist()
    [1, 3]
    """
    units = channels.view(-1, per) if channels.numel() % per == 0 else None
    if units is None or bool((units[:, 0] % per != 0).any()) or \
            not torch.equal(units, units[:, :1] + torch.arange(per, device=channels.device)):
        # The group's WholeUnits constraint guarantees whole units: anything else is our bug.
        raise InternalError(f"{target}: one position per {per} channels, but the kept channels are not whole units")
    return units[:, 0] // per


def tensor_slot_size(slot: TensorSlot, kept: Dict[int, List[int]]) -> int:
    """How long ``slot``'s dim must be after the rewrite (a grouped conv's ``in`` dim holds Cin/G)."""
    want = _expected(slot.as_slot(), kept) // slot.per
    return want // slot.conv_groups if slot.role == "in" else want


def _check_tensor_sizes(analysis: Analysis, new: torch.fx.GraphModule, kept: Dict[int, List[int]]) -> None:
    """Read every sliced tensor back: each slot's dim must have the planned size."""
    for target, slots in analysis.tensors.items():
        tensor = operator.attrgetter(target)(new)
        for slot in slots:
            want, got = tensor_slot_size(slot, kept), tensor.shape[slot.dim]
            if got != want:
                raise InternalError(f"parameter {target} has {got} positions on dim {slot.dim} after the rewrite, plan needs {want}")


def _check_channels(gm: torch.fx.GraphModule) -> None:
    """Every tensor the analysis followed must now have the planned channel count."""
    for node in gm.graph.nodes:
        layout = node.meta.get(LAYOUT_META)
        meta = node.meta.get("tensor_meta")
        shape = getattr(meta, "shape", None)
        if layout is None or shape is None or layout.block is None or len(shape) < -layout.dim:
            continue
        want = node.meta[CHANNELS_META] * layout.block
        if shape[layout.dim] != want:
            raise InternalError(f"{node.name} has {shape[layout.dim]} channels after the rewrite, plan needs {want}")


def _retie(src: torch.fx.GraphModule, new: torch.fx.GraphModule) -> None:
    """Share again in ``new`` every tensor ``src`` shares between targets.

    Each target was copied on its own, so a tie became two tensors. The analysis made tied
    owners keep the same channels, hence equal shapes; a mismatch is a bug and raises.
    """
    for users in tensor_users(src).values():
        if len({target for target, _ in users}) < 2:
            continue
        first = _locate(new, *users[0])
        for target, attr in users[1:]:
            other = _locate(new, target, attr)
            if other[2].shape != first[2].shape:
                raise InternalError(f"tied tensors {users[0]} and {(target, attr)} differ in shape after the rewrite")
            owner, name, tensor = other
            if (name in owner._parameters) != isinstance(first[2], nn.Parameter):
                continue  # a parameter tied to a plain tensor: leave the two copies as they are
            if name in owner._parameters:
                owner._parameters[name] = first[2]
            elif name in owner._buffers:
                owner._buffers[name] = first[2]
            else:
                setattr(owner, name, first[2])


def _locate(gm: nn.Module, target: str, attr: str) -> Tuple[nn.Module, str, torch.Tensor]:
    """(owning module, attribute name, tensor) of ``target`` + ``attr`` in ``gm``."""
    path = f"{target}.{attr}" if attr else target
    owner_path, _, name = path.rpartition(".")
    owner = gm.get_submodule(owner_path) if owner_path else gm
    return owner, name, getattr(owner, name)


