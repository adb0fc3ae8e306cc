"""What a layer type is physically: one adapter per module type, registered once.

A :class:`LayerAdapter` says which tensors each *role*'s channels index, and along which dim
(``roles``), and which attributes count them (``counts``). Everything fxprune does with such a
layer derives from that one description:

- its **scoring view** (:meth:`LayerAdapter.weights`: the role's tensors, positions first, for
  L1/L2/FPGM);
- its **rewrite** (:meth:`LayerAdapter.build`: a NEW smaller copy, each role's tensors indexed
  along their dims, the count attributes set; the input module is untouched);
- its **mask** for the proof (the removed positions of those tensors zeroed: ``fxprune.testing``'s
  default mask, over the tensors :func:`fxprune.rules.role_tensors` reads from the adapter);
- its **size read-back** (:meth:`LayerAdapter.sizes`: the count of each role in a built copy,
  which the rewrite checks against the plan);
- and, optionally, its **channel rule** (``rule``; without one, a layer whose only role is
  ``channelwise`` passes its input's channels through with its tensors as members).

So a custom layer is taught to fxprune by one registration::

    @fxprune.register_layer(roles={"channelwise": (("scale", 0),)})
    class ChannelScale(nn.Module): ...

Every built-in layer is an adapter too (:data:`BUILTIN_LAYERS`). BatchNorm, InstanceNorm,
LayerNorm, RMSNorm and PReLU are plain :class:`LayerAdapter` instances: their tensors are plain
indices along a dim. A layer whose physics is more than that is a subclass that overrides the
parts that differ, one class per kind of layer: :class:`ConvAdapter` (a grouped conv's input
columns, a depthwise conv's runs of filters, a transposed conv's swapped weight dims),
:class:`LinearAdapter` (its weight scored for both roles in one pass, :meth:`LayerAdapter.dense_weight`),
:class:`GroupNormAdapter` (whole groups and ``num_groups``) and :class:`MultiheadAttentionAdapter`
(the head channels' q, k and v rows; the build is a :class:`~fxprune.layers.PrunedMultiheadAttention`).
A custom layer with such physics subclasses :class:`LayerAdapter` the same way. The lower-level
tables of builders, masks and weight views (``fxprune.rewrite.DEFAULT_BUILDERS``,
``fxprune.testing.DEFAULT_MASKS``, ``fxprune.importance.DEFAULT_WEIGHTS``) ship empty: an entry
there wins over a type's adapter, for a user who needs to override one part only.
:data:`DEFAULT_LAYERS` is a :class:`~fxprune.registry.Registry`;
to teach a layer for some calls only (a test, a library that must not change global state),
extend it (``DEFAULT_LAYERS.extended({T: adapter})``, a NEW table, the default untouched) and
run those calls under :func:`using_layers`.

This module sits below the rules (it imports nothing of fxprune but the registry, errors and layers).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import FxPruneError, InternalError
from .layers import PrunedMultiheadAttention
from .registry import Registry

__all__ = ["LayerAdapter", "ConvAdapter", "LinearAdapter", "GroupNormAdapter", "MultiheadAttentionAdapter", "BUILTIN_LAYERS",
           "DEFAULT_LAYERS", "register_layer", "adapter_for", "using_layers", "ROLES", "copy_with", "resolve_attr",
           "grouped_weight", "grouped_inputs", "PLAIN_LAYER"]

#: The roles a layer's tensors can play: rows it produces, columns it consumes, per-channel parameters.
ROLES = ("out", "in", "channelwise")

RoleTensors = Tuple[Tuple[str, int], ...]


@dataclass(frozen=True)
class LayerAdapter:
    """A layer type's tensors per role; scoring, building, masking and read-back derive from it.

    ``roles``: ``{role: ((tensor attribute, dim), ...)}`` (``"out"``, ``"in"`` or
    ``"channelwise"``). A tensor that is ``None`` on a given module (an absent bias) is skipped.
    ``counts``: ``{role: (attribute, ...)}``, integer attributes that hold the role's count
    (``out_features``; a one-entry tuple such as LayerNorm's ``normalized_shape`` stays a tuple);
    :meth:`build` sets them. ``rule``: the channel rule (``fn(ctx, node) -> Layout | None``, see
    :func:`fxprune.register_rule`); None derives the pass-through rule of a ``channelwise``-only
    layer. ``scores``: ``{role: (tensor attribute, ...)}``, the tensors whose values score the
    role (default: every parameter it indexes; ``()``: none, the layer adds nothing to a score).
    ``fills``: ``{tensor attribute: value}`` a removed position takes in the proof's mask
    (default 0; BatchNorm's ``running_var`` takes 1, so a removed channel's output is exactly 0
    whatever its statistics were).

    >>> class Scale(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.c, self.scale = c, nn.Parameter(torch.arange(1.0, c + 1))
    ...     def forward(self, x):
    ...         return x * self.scale.view(1, -1, 1, 1)
    >>> adapter = LayerAdapter({"channelwise": (("scale", 0),)}, counts={"channelwise": ("c",)})
    >>> small = adapter.build(Scale(4), {"channelwise": torch.tensor([0, 3])})
    >>> small.scale.tolist(), small.c, adapter.sizes(small)
    ([1.0, 4.0], 2, {'channelwise': 2})
    """

    roles: Mapping[str, RoleTensors]
    counts: Mapping[str, Tuple[str, ...]] = field(default_factory=dict)
    rule: Optional[Callable[..., Any]] = None
    scores: Optional[Mapping[str, Tuple[str, ...]]] = None
    fills: Mapping[str, float] = field(default_factory=dict)

    #: Whether a layer whose only role is ``channelwise`` gets the pass-through rule when the rule
    #: table has none for it (a subclass whose channels are not plain pass-through says False).
    derives_rule: ClassVar[bool] = True

    def __post_init__(self) -> None:
        unknown = sorted(set(self.roles) - set(ROLES)) + sorted(set(self.counts) - set(self.roles))
        if unknown or not self.roles:
            raise FxPruneError(f"a layer adapter needs roles among {ROLES} with (tensor name, dim) pairs, and counts "
                               f"only for those roles; got roles {sorted(self.roles)}, counts {sorted(self.counts)}")
        for role, pairs in self.roles.items():
            if not pairs or not all(isinstance(n, str) and isinstance(d, int) and d >= 0 for n, d in pairs):
                raise FxPruneError(f"layer adapter role {role!r}: give ((tensor name, dim >= 0), ...), got {pairs!r}")

    def tensors(self, module: nn.Module, role: str) -> List[Tuple[str, torch.Tensor, int]]:
        """``(name, tensor, dim)`` of each tensor ``role`` indexes in ``module`` (absent ones skipped)."""
        out = []
        for name, dim in self.roles.get(role, ()):
            t = resolve_attr(module, name)
            if isinstance(t, torch.Tensor):
                out.append((name, t, dim))
        return out

    def weights(self, module: nn.Module, role: str) -> Optional[torch.Tensor]:
        """The scoring view: ``[positions, values]``, the role's parameters side by side (None: nothing to score).

        Parameters only: buffers (running statistics, constants) are not learned weights, as for
        the built-in layers, whose norms score their scale and not their statistics.
        """
        scored = None if self.scores is None else set(self.scores.get(role, ()))
        rows = [t.detach().movedim(dim, 0).reshape(t.shape[dim], -1) for name, t, dim in self.tensors(module, role)
                if isinstance(t, nn.Parameter) and (scored is None or name in scored)]
        if not rows:
            return None
        return torch.cat([r.to(rows[0].dtype) for r in rows], dim=1)

    def products(self, module: nn.Module, role: str) -> List[torch.Tensor]:
        """Taylor's view: ``weight * grad`` of each of the role's parameters that has a gradient, positions first.

        Signed and not reduced (the scorer sums each channel's entries); biases count as
        weights do, buffers have no gradient.
        """
        return [(t.detach() * t.grad.detach()).movedim(dim if t.dim() > 1 else 0, 0)
                for _, t, dim in self.tensors(module, role) if t.grad is not None]

    def dense_weight(self, module: nn.Module) -> Optional[torch.Tensor]:
        """The ``[out, in, *k]`` weight both roles index plainly (rows, columns), or None.

        The scorer reduces such a weight once for both roles (see ``fxprune.importance``);
        a layer without one is scored role by role through :meth:`weights`.
        """
        return None

    def build(self, module: nn.Module, idx: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
        """A NEW copy of ``module`` keeping positions ``idx[role]`` of each role (None: unchanged)."""
        # Each tensor sliced from the original by every role that indexes it (a weight's rows
        # and columns), then one copy that takes the sliced tensors in place of the originals.
        sliced: Dict[str, torch.Tensor] = {}
        for role, keep in idx.items():
            if keep is None:
                continue
            for name, t, dim in self.tensors(module, role):
                current = sliced.get(name, t.detach())
                sliced[name] = current.index_select(dim, keep.to(current.device))
        new = copy_with(module, sliced)
        for role, keep in idx.items():
            if keep is None:
                continue
            for attr in self.counts.get(role, ()):
                old = getattr(module, attr)
                setattr(new, attr, type(old)((int(keep.numel()),)) if isinstance(old, (tuple, list)) else int(keep.numel()))
        return new

    def mask(self, module: nn.Module, role: str, removed: torch.Tensor) -> None:
        """The proof's mask: the ``removed`` positions (a bool tensor) of each of ``role``'s tensors
        zeroed, in place (or set to their ``fills`` value)."""
        for name, t, dim in self.tensors(module, role):
            _set_along(t, dim, removed, self.fills.get(name, 0.0))

    def counts_of(self, module: nn.Module, role: str) -> List[int]:
        """The count of ``role``'s positions each of its present tensors holds (all equal in a sound layer)."""
        return [int(t.shape[dim]) for _, t, dim in self.tensors(module, role) if t.dim() > dim]

    def sizes(self, module: nn.Module) -> Dict[str, int]:
        """Each role's count in ``module``, read back from its first present tensor."""
        out: Dict[str, int] = {}
        for role in self.roles:
            found = self.counts_of(module, role)
            if found:
                out[role] = found[0]
        return out


def _set_along(t: torch.Tensor, dim: int, removed: torch.Tensor, value: float) -> None:
    """Set the ``removed`` positions (a bool tensor) of ``t`` along ``dim`` to ``value``, in place;
    a tensor whose dim is not that long is not the role's and is left as it is."""
    if t.dim() > dim and t.shape[dim] == removed.numel():
        index: List[Any] = [slice(None)] * t.dim()
        index[dim] = removed.to(t.device)
        with torch.no_grad():
            t[tuple(index)] = value


def resolve_attr(module: nn.Module, path: str) -> Any:
    """``module``'s attribute at the dotted ``path`` (``"out_proj.weight"``), or None if absent."""
    obj: Any = module
    for part in path.split("."):
        obj = getattr(obj, part, None)
        if obj is None:
            return None
    return obj


def copy_with(module: nn.Module, tensors: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
    """A deep copy of ``module`` holding ``tensors`` (attribute path -> new tensor) in place of its own.

    Pre-seeding deepcopy's memo means the large original tensors are never copied only to be
    dropped, and the copy keeps the module's class, hooks and other attributes. A parameter's
    replacement is a parameter with the same ``requires_grad``.

    >>> lin = nn.Linear(4, 3)
    >>> small = copy_with(lin, {"weight": lin.weight.detach()[:2], "bias": None})
    >>> tuple(small.weight.shape), isinstance(small.weight, nn.Parameter), small.bias is not lin.bias
    ((2, 4), True, True)
    """
    memo: Dict[int, Any] = {}
    for name, new_t in tensors.items():
        old = resolve_attr(module, name)
        if old is None or new_t is None:
            continue
        memo[id(old)] = nn.Parameter(new_t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) else new_t
    return copy.deepcopy(module, memo)


def _sliced(t: Optional[torch.Tensor], dim: int, idx: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
    """A new tensor with ``idx`` kept along ``dim`` (a copy even when nothing is removed)."""
    if t is None:
        return None
    t = t.detach()
    return t.clone() if idx is None else t.index_select(dim, idx.to(t.device))


def _sliced2(t: torch.Tensor, rows: Optional[torch.Tensor], cols: Optional[torch.Tensor]) -> torch.Tensor:
    """Keep ``rows`` on dim 0 and ``cols`` on dim 1 (two ``index_select`` calls)."""
    # Why not one advanced-indexing gather: on resnet152's convs (one thread) the gather took
    # about twice as long as the pair, the extra copy included.
    t = t.detach()
    if rows is None or cols is None:
        return _sliced(t, 0, rows) if cols is None else _sliced(t, 1, cols)  # type: ignore[return-value]
    return t.index_select(1, cols.to(t.device)).index_select(0, rows.to(t.device))


def grouped_weight(weight: torch.Tensor, groups: int, out_idx: Optional[torch.Tensor],
                   in_idx: Optional[torch.Tensor]) -> torch.Tensor:
    """A grouped conv weight ``[Cout, Cin/G, ...]`` keeping ``out_idx`` rows and ``in_idx`` (global) inputs.

    Row ``o`` belongs to conv group ``o // (Cout/G)`` and its columns are that group's inputs,
    in local numbering; kept input channel ``i`` is column ``i % (Cin/G)`` of the rows of group
    ``i // (Cin/G)``, so one gather picks, for each kept row, the kept columns of its own group.
    Every group must keep the same count of inputs and of outputs. Shared by ``nn.Conv*d``
    modules and functional convs (``F.conv2d(x, self.weight, groups=G)``).

    >>> w = torch.arange(8.0).view(4, 2, 1, 1)     # 2 groups: rows 0-1 read inputs 0-1, rows 2-3 inputs 2-3
    >>> grouped_weight(w, 2, torch.tensor([0, 3]), torch.tensor([1, 2])).flatten().tolist()
    [1.0, 6.0]
    """
    w = weight.detach()
    out_channels, in_channels = w.shape[0], w.shape[1] * groups
    cin_g, cout_g = in_channels // groups, out_channels // groups
    rows = torch.arange(out_channels) if out_idx is None else out_idx.to(torch.long)
    cols_in = torch.arange(in_channels) if in_idx is None else in_idx.to(torch.long)
    for what, kept, per in (("output", rows, cout_g), ("input", cols_in, cin_g)):
        counts = torch.bincount(kept // per, minlength=groups)
        if len(kept) % groups or not bool((counts == len(kept) // groups).all()):
            raise InternalError(f"grouped conv keeps {counts.tolist()} {what} channels per group")
    cols = (cols_in % cin_g).view(groups, -1)  # kept local columns of each conv group
    row_cols = cols[rows // cout_g]  # [kept rows, kept columns per group]
    return w[rows.to(w.device).unsqueeze(1), row_cols.to(w.device)]


def grouped_inputs(w: torch.Tensor, groups: int) -> torch.Tensor:
    """A grouped conv's ``[Cout, Cin/G, ...]`` weight as one row per input channel.

    Input channel ``i`` meets only the filters of its own conv group ``i // (Cin/G)``, at
    column ``i % (Cin/G)``; weight dim 1 is not the input channels when ``groups > 1``.

    >>> grouped_inputs(torch.arange(8.0).view(4, 2, 1, 1), 2).tolist()   # input 0 meets rows 0, 1 at column 0
    [[0.0, 2.0], [1.0, 3.0], [4.0, 6.0], [5.0, 7.0]]
    """
    rows = w.reshape(groups, w.shape[0] // groups, w.shape[1], -1).transpose(1, 2)
    return rows.reshape(groups * w.shape[1], -1)


class LinearAdapter(LayerAdapter):
    """``nn.Linear``: rows ``out``, columns ``in``, scored by the weight alone.

    Its weight is ``dense`` (:meth:`dense_weight`): both roles are scored in one pass over it.
    """

    def dense_weight(self, module: nn.Module) -> Optional[torch.Tensor]:
        return module.weight.detach()


class ConvAdapter(LayerAdapter):
    """``nn.Conv*d`` and ``nn.ConvTranspose*d``: rows ``out``, input columns ``in``, and a depthwise
    conv's filters ``channelwise`` (one run of ``out_channels // in_channels`` rows per channel).

    A conv stores ``[Cout, Cin/G, *k]``, a transposed conv ``[Cin, Cout/G, *k]`` (its ``roles``
    swap the weight dims). A grouped conv keeps the same count of inputs and outputs per conv
    group (the analysis requires it); its inputs are not weight dim 1 (:func:`grouped_inputs`,
    :func:`grouped_weight`), and that is what the scoring view, the build, the mask and the size
    read-back here add to the plain indices of :class:`LayerAdapter`.

    >>> conv = nn.Conv2d(4, 6, 3, groups=2)
    >>> small = DEFAULT_LAYERS[nn.Conv2d].build(conv, {"out": torch.tensor([0, 1, 3, 4]), "in": torch.tensor([0, 2])})
    >>> tuple(small.weight.shape), small.in_channels, DEFAULT_LAYERS[nn.Conv2d].sizes(small)
    ((4, 1, 3, 3), 2, {'out': 4, 'in': 2, 'channelwise': 4})
    """

    def dense_weight(self, module: nn.Module) -> Optional[torch.Tensor]:
        return None if module.transposed or module.groups != 1 else module.weight.detach()

    def weights(self, module: nn.Module, role: str) -> Optional[torch.Tensor]:
        # Positions on dim 0, the rest as the weight holds it (the scorer reduces the other dims).
        w = module.weight.detach()
        if module.transposed:
            # Only groups == 1 and depthwise reach here (other grouped ones are frozen); a
            # depthwise one's channels are dim 0 as well.
            return w if role == "in" or module.groups > 1 else w.transpose(0, 1)
        if role == "in":
            return grouped_inputs(w, module.groups) if module.groups > 1 else w.transpose(0, 1)
        return w  # "out" rows, or a depthwise conv's per-channel filters

    def build(self, module: nn.Module, idx: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
        conv = module
        if "channelwise" in idx:  # depthwise: weight [C*k, 1, *k] for both kinds, output channel o on row o
            keep = idx["channelwise"]  # whole runs of k rows (k: the channel multiplier) per kept input channel
            multiplier = conv.out_channels // conv.in_channels
            new = copy_with(conv, {"weight": _sliced(conv.weight, 0, keep), "bias": _sliced(conv.bias, 0, keep)})
            n = conv.out_channels if keep is None else len(keep)
            if n % multiplier:
                raise InternalError(f"depthwise {type(conv).__name__} with channel multiplier {multiplier} keeps {n} rows")
            new.out_channels = n
            new.in_channels = new.groups = n // multiplier
            return new
        out_idx, in_idx = idx.get("out"), idx.get("in")
        if conv.transposed:
            # Weight [Cin, Cout/G, *k]: inputs are rows, outputs columns (the reverse of a conv).
            if conv.groups != 1:
                raise InternalError(f"grouped transposed convolution {type(conv).__name__} is never pruned")
            w = _sliced2(conv.weight, in_idx, out_idx)
            in_channels, out_channels = w.shape[0], w.shape[1]
        else:
            w = _sliced2(conv.weight, out_idx, in_idx) if conv.groups == 1 else \
                grouped_weight(conv.weight, conv.groups, out_idx, in_idx)
            in_channels, out_channels = w.shape[1] * conv.groups, w.shape[0]
        new = copy_with(conv, {"weight": w, "bias": _sliced(conv.bias, 0, out_idx)})
        new.in_channels, new.out_channels = in_channels, out_channels
        return new

    def products(self, module: nn.Module, role: str) -> List[torch.Tensor]:
        if role == "in" and module.groups > 1:  # inputs are not weight dim 1 (grouped transposed convs are frozen)
            w = module.weight
            return [] if w.grad is None else [grouped_inputs(w.detach() * w.grad.detach(), module.groups)]
        return super().products(module, role)

    def mask(self, module: nn.Module, role: str, removed: torch.Tensor) -> None:
        if role != "in" or module.groups == 1 or module.transposed:
            super().mask(module, role, removed)
            return
        # Grouped: input channel i is column i % (Cin/G) of the rows of conv group i // (Cin/G).
        cin_g, cout_g = module.in_channels // module.groups, module.out_channels // module.groups
        with torch.no_grad():
            for i in torch.nonzero(removed).flatten().tolist():
                g = i // cin_g
                module.weight[g * cout_g : (g + 1) * cout_g, i % cin_g] = 0

    def sizes(self, module: nn.Module) -> Dict[str, int]:
        rows, cols = module.weight.shape[0], module.weight.shape[1] * module.groups
        out, inp = (cols, rows) if module.transposed else (rows, cols)
        return {"out": int(out), "in": int(inp), "channelwise": int(rows)}


class GroupNormAdapter(LayerAdapter):
    """``nn.GroupNorm``: its scale and shift are per channel; the analysis keeps whole groups of
    ``C // num_groups`` channels (or, with one group, renormalises over the kept channels), so the
    build also sets ``num_groups``. Its channel rule is the rule table's (whole groups), never
    the derived pass-through.
    """

    derives_rule: ClassVar[bool] = False

    def build(self, module: nn.Module, idx: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
        keep = idx.get("channelwise")
        new = super().build(module, idx)
        if keep is None:
            return new
        if len(keep) == 0:
            raise InternalError("GroupNorm keeps no channel")
        if module.num_groups > 1:
            unit = module.num_channels // module.num_groups
            if len(keep) % unit:
                raise InternalError(f"GroupNorm keeps {len(keep)} channels, not whole groups of {unit}")
            new.num_groups = len(keep) // unit
        return new

    def sizes(self, module: nn.Module) -> Dict[str, int]:
        return {"channelwise": int(module.num_channels)}  # an affine-free one has no tensor to read


class MultiheadAttentionAdapter(LayerAdapter):
    """``nn.MultiheadAttention`` (packed q/k/v) and the :class:`~fxprune.layers.PrunedMultiheadAttention` it becomes.

    Roles as the rule declares them: ``in`` the packed projection's columns, ``out``
    ``out_proj``'s rows, ``channelwise`` the head channels, each of which owns a q, a k and a v
    row of the packed projection and a column of ``out_proj``. PyTorch's module ties its heads'
    width to ``embed_dim``, so the build is a ``PrunedMultiheadAttention``.
    """

    derives_rule: ClassVar[bool] = False

    def weights(self, module: nn.Module, role: str) -> Optional[torch.Tensor]:
        w = module.in_proj_weight
        if w is None:
            return None
        w = w.detach()
        if role == "in":
            return w.transpose(0, 1)
        out = module.out_proj.weight.detach()
        if role == "out":
            return out
        width = out.shape[1]  # the heads' width: q, k and v rows side by side with the out_proj column
        return torch.cat([w[:width], w[width : 2 * width], w[2 * width :], out.transpose(0, 1)], dim=1)

    def products(self, module: nn.Module, role: str) -> List[torch.Tensor]:
        if role != "channelwise":
            return super().products(module, role)
        # A head channel's q, k and v rows of the packed projection side by side, and its out_proj column.
        width = module.out_proj.weight.shape[1]
        return [prod.reshape(3, width, -1).transpose(0, 1) if prod.shape[0] == 3 * width else prod
                for prod in super().products(module, role)]

    def build(self, module: nn.Module, idx: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
        return PrunedMultiheadAttention.from_module(module, idx.get("channelwise"), idx.get("in"), idx.get("out"))

    def mask(self, module: nn.Module, role: str, removed: torch.Tensor) -> None:
        if role != "channelwise":
            super().mask(module, role, removed)
            return
        # The packed projection holds each head channel's q, k and v rows a heads' width apart.
        for name, t, dim in self.tensors(module, role):
            _set_along(t, dim, removed.repeat(3) if t.shape[dim] == 3 * removed.numel() else removed,
                       self.fills.get(name, 0.0))

    def sizes(self, module: nn.Module) -> Dict[str, int]:
        out = module.out_proj.weight
        return {"channelwise": int(out.shape[1]), "in": int(module.in_proj_weight.shape[1]), "out": int(out.shape[0])}

    def projection_macs(self, module: nn.Module, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor) -> Tuple[int, int]:
        """MACs of the q/k/v projections (inputs x head channels) and of ``out_proj`` (head channels x outputs).

        The rest of the layer's MACs (scores and the weighted sum) scale with the head channels alone.
        """
        width, inputs = module.out_proj.weight.shape[1], module.in_proj_weight.shape[1]
        tokens = [t.numel() // max(1, t.shape[-1]) for t in (query, key, value)]
        return sum(tokens) * inputs * width, tokens[0] * width * module.out_proj.weight.shape[0]


_CONV_TENSORS: Dict[str, RoleTensors] = {
    "out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),), "channelwise": (("weight", 0), ("bias", 0))}
# A transposed conv stores its weight [Cin, Cout/G, *k]: "out" and "in" swap weight dims.
_TRANSPOSED_TENSORS: Dict[str, RoleTensors] = {
    "out": (("weight", 1), ("bias", 0)), "in": (("weight", 0),), "channelwise": (("weight", 0), ("bias", 0))}
_WEIGHT_SCORES = {"out": ("weight",), "in": ("weight",), "channelwise": ("weight",)}

_NORM_TENSORS: RoleTensors = (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))

PLAIN_LAYER = LayerAdapter(_CONV_TENSORS)
"""The physics assumed for a layer without an adapter (a custom layer given only a rule and a
builder): a conv-like ``weight`` (rows ``out``, columns ``in``) and ``bias``. Its role tensors,
mask and Taylor view serve the cost model, the proof and the scores of such a layer."""

BUILTIN_LAYERS: Registry[type, LayerAdapter] = Registry("built-in layer adapters", {
    # Scored by their scale alone (statistics are not learned weights); InstanceNorm and PReLU
    # add nothing to a score, as before they were adapters.
    **{t: LayerAdapter({"channelwise": _NORM_TENSORS}, {"channelwise": ("num_features",)},
                       scores={"channelwise": ("weight",)}, fills={"running_var": 1.0})
       for t in (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)},
    **{t: LayerAdapter({"channelwise": _NORM_TENSORS}, {"channelwise": ("num_features",)},
                       scores={"channelwise": ()}, fills={"running_var": 1.0})
       for t in (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)},
    # Only a one-entry normalized_shape over the channels is ever pruned (fxprune.rules): the
    # smaller norm normalises over the kept channels, a renormalising rewrite.
    **{t: LayerAdapter({"channelwise": (("weight", 0), ("bias", 0))}, {"channelwise": ("normalized_shape",)},
                       scores={"channelwise": ("weight",)})
       for t in (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())},
    nn.PReLU: LayerAdapter({"channelwise": (("weight", 0),)}, {"channelwise": ("num_parameters",)},
                           scores={"channelwise": ()}),
    **{t: ConvAdapter(_CONV_TENSORS, scores=_WEIGHT_SCORES) for t in (nn.Conv1d, nn.Conv2d, nn.Conv3d)},
    **{t: ConvAdapter(_TRANSPOSED_TENSORS, scores=_WEIGHT_SCORES)
       for t in (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)},
    nn.Linear: LinearAdapter({"out": (("weight", 0), ("bias", 0)), "in": (("weight", 1),)},
                             {"out": ("out_features",), "in": ("in_features",)}, scores=_WEIGHT_SCORES),
    # Scored by its scale, as the other norms and the functional forms' weight tensors are.
    nn.GroupNorm: GroupNormAdapter({"channelwise": (("weight", 0), ("bias", 0))}, {"channelwise": ("num_channels",)},
                                   scores={"channelwise": ("weight",)}),
    **{t: MultiheadAttentionAdapter({"in": (("in_proj_weight", 1),), "out": (("out_proj.weight", 0), ("out_proj.bias", 0)),
                                     "channelwise": (("in_proj_weight", 0), ("in_proj_bias", 0), ("out_proj.weight", 1))})
       for t in (nn.MultiheadAttention, PrunedMultiheadAttention)},
})
"""The built-in layers that are plain indices along a dim; every adapter table falls back to it."""

DEFAULT_LAYERS: Registry[type, LayerAdapter] = Registry("layer adapters", parent=BUILTIN_LAYERS)
"""Module type (exact) -> :class:`LayerAdapter`, the table :func:`register_layer` writes to
(over :data:`BUILTIN_LAYERS`)."""


def register_layer(*types: type, roles: Mapping[str, RoleTensors], counts: Optional[Mapping[str, Tuple[str, ...]]] = None,
                   rule: Optional[Callable[..., Any]] = None) -> Any:
    """Teach fxprune a layer type with one registration (in :data:`DEFAULT_LAYERS`).

    With ``types``, registers them and returns the adapter; without, it is a class decorator.
    The rule, builder, mask, weight view and size read-back all derive from ``roles``.

    >>> class Gain(nn.Module):
    ...     def __init__(self, c):
    ...         super().__init__()
    ...         self.gain = nn.Parameter(torch.ones(c))
    ...     def forward(self, x):
    ...         return x * self.gain.view(1, -1, 1, 1)
    >>> adapter = register_layer(Gain, roles={"channelwise": (("gain", 0),)})
    >>> adapter_for(Gain(3)) is adapter, adapter.sizes(Gain(3))
    (True, {'channelwise': 3})
    """
    adapter = LayerAdapter(dict(roles), dict(counts or {}), rule)
    if types:
        DEFAULT_LAYERS.update({t: adapter for t in types})
        return adapter

    def decorate(cls: type) -> type:
        DEFAULT_LAYERS.update({cls: adapter})
        return cls

    return decorate


# The table of the calls under way (using_layers sets it); None: DEFAULT_LAYERS.
_ACTIVE: contextvars.ContextVar[Optional[Registry[type, LayerAdapter]]] = contextvars.ContextVar(
    "fxprune_layers", default=None)


@contextlib.contextmanager
def using_layers(layers: Registry[type, LayerAdapter]) -> Iterator[Registry[type, LayerAdapter]]:
    """Run the calls inside with ``layers`` (e.g. ``DEFAULT_LAYERS.extended({T: adapter})``) as the adapter table.

    >>> class Gain(nn.Module):
    ...     def __init__(self):
    ...         super().__init__()
    ...         self.gain = nn.Parameter(torch.ones(4))
    >>> table = DEFAULT_LAYERS.extended({Gain: LayerAdapter({"channelwise": (("gain", 0),)})})
    >>> with using_layers(table):
    ...     adapter_for(Gain()) is table[Gain]
    True
    >>> adapter_for(Gain()) is None  # outside, the default table, which never learned it
    True
    """
    if not isinstance(layers, Registry):
        raise FxPruneError("using_layers() takes a table like fxprune.adapters.DEFAULT_LAYERS "
                           f"(e.g. DEFAULT_LAYERS.extended({{MyLayer: adapter}})), got {type(layers).__name__}")
    token = _ACTIVE.set(layers)
    try:
        yield layers
    finally:
        _ACTIVE.reset(token)


def adapter_for(module: Optional[nn.Module], layers: Optional[Registry[type, LayerAdapter]] = None) -> Optional[LayerAdapter]:
    """The adapter of ``module``'s exact type in ``layers`` (default: the :func:`using_layers` table,
    else :data:`DEFAULT_LAYERS`), or None."""
    if module is None:
        return None
    table = layers if layers is not None else (_ACTIVE.get() or DEFAULT_LAYERS)
    found = table.get(type(module))
    # A table built from scratch still knows what the built-in layers are.
    return found if found is not None else BUILTIN_LAYERS.get(type(module))
