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

The built-in layers whose tensors are plain indices along a dim are adapters too
(:data:`BUILTIN_LAYERS`: BatchNorm, InstanceNorm, LayerNorm, RMSNorm, PReLU). The tables of
builders, masks and weight views (``fxprune.rewrite.DEFAULT_BUILDERS``,
``fxprune.testing.DEFAULT_MASKS``, ``fxprune.importance.DEFAULT_WEIGHTS``) remain for the layers
whose physics is more than that: convolutions (grouped, depthwise and transposed weights), Linear
(scored in one pass over its weight with the convs), GroupNorm (whole groups and
``num_groups``) and packed attention; each table falls back to the adapter of a type it has no
entry for. :data:`DEFAULT_LAYERS` is a :class:`~fxprune.registry.Registry`;
to teach a layer for some calls only (a test, a library that must not change global state),
extend it (``DEFAULT_LAYERS.extended({T: adapter})``, a NEW table, the default untouched) and
run those calls under :func:`using_layers`.

This module sits below the rules (it imports nothing of fxprune but the registry and errors).
"""

from __future__ import annotations

import contextlib
import contextvars
import copy
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Tuple

import torch
import torch.nn as nn

from .errors import FxPruneError
from .registry import Registry

__all__ = ["LayerAdapter", "BUILTIN_LAYERS", "DEFAULT_LAYERS", "register_layer", "adapter_for", "using_layers", "ROLES"]

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
            t = getattr(module, name, None)
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

    def build(self, module: nn.Module, idx: Mapping[str, Optional[torch.Tensor]]) -> nn.Module:
        """A NEW copy of ``module`` keeping positions ``idx[role]`` of each role (None: unchanged)."""
        # Each tensor sliced from the original by every role that indexes it (a weight's rows
        # and columns), then one deep copy that takes the sliced tensors in place of the
        # originals (deepcopy's memo): the large original tensors are never copied only to be
        # dropped, and the copy keeps the module's class, hooks and other attributes.
        sliced: Dict[str, torch.Tensor] = {}
        originals: Dict[str, torch.Tensor] = {}
        for role, keep in idx.items():
            if keep is None:
                continue
            for name, t, dim in self.tensors(module, role):
                originals[name] = t
                current = sliced.get(name, t.detach())
                sliced[name] = current.index_select(dim, keep.to(current.device))
        memo: Dict[int, Any] = {}
        for name, new_t in sliced.items():
            old = originals[name]
            memo[id(old)] = nn.Parameter(new_t, requires_grad=old.requires_grad) if isinstance(old, nn.Parameter) \
                else new_t
        new = copy.deepcopy(module, memo)
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
            if t.dim() > dim and t.shape[dim] == removed.numel():
                index: List[Any] = [slice(None)] * t.dim()
                index[dim] = removed.to(t.device)
                with torch.no_grad():
                    t[tuple(index)] = self.fills.get(name, 0.0)

    def sizes(self, module: nn.Module) -> Dict[str, int]:
        """Each role's count in ``module``, read back from its first present tensor."""
        out: Dict[str, int] = {}
        for role in self.roles:
            found = self.tensors(module, role)
            if found:
                _, t, dim = found[0]
                out[role] = int(t.shape[dim])
        return out


_NORM_TENSORS: RoleTensors = (("weight", 0), ("bias", 0), ("running_mean", 0), ("running_var", 0))

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
