"""Channel-coupled groups, found by propagating layouts over the networkx view.

Every producer (a conv's or Linear's output rows) starts a group; the rule of each op says how
its output's channels relate to its inputs' (:mod:`fxprune.rules`); ops that tie channels
(residual adds, SE multiplies, a module called twice) merge groups in a union-find. A group is
*frozen* (never pruned) when it reaches a graph output, touches an op without a rule, or meets
a pattern of ``ignore``.

After the walk, three more facts are checked:

- *Call sites*: a module called more than once keeps one channel set per role across its call
  sites, and a role that one call site leaves untracked (the module reads the model input
  there) keeps its channels whole at every call site: unprunable at any call site means
  unprunable.
- *Parameter operands and functional layers*: a parameter or buffer an element-wise op reads
  directly (``get_attr``, possibly through ops that only change its dtype or add size-1 dims)
  with exactly the channels of its other operand is sliced with them (:class:`TensorSlot`),
  provided every op that reads it expects it sliced; otherwise its channels stay whole. The
  tensors of a functional layer (``F.batch_norm``, ``F.conv2d``, ``F.linear``... on ``get_attr``
  tensors, as timm's ``BatchNormAct2d`` calls it) are tensor slots with the roles of the module
  form (``out``/``in``/``channelwise``): they are group members (:class:`TensorMember`), scored,
  masked in the proof and sliced like the module's tensors.
- *Tied tensors* (on the module tree): two modules sharing one parameter (or buffer) must keep
  the same channels. Same-type modules sharing it under the same name have their slots unified
  role by role (as for a module called twice); any other sharing, or a parameter the graph
  also reads directly (``get_attr``), freezes the groups of every module involved.

A split, chunk or slice of the channel dim cuts its input's groups into *parts*
(:meth:`_Engine.split`), and so does tying operands concatenated differently (a concatenation
added to one conv's output, as in Inception-ResNet, CSP and GhostNet blocks: every operand is
cut at every operand's group boundaries before the groups at the same positions are tied); at the end the cuts of tied groups are reconciled into *atoms*
(:meth:`_Engine._atoms`), and every group a split cut becomes, wherever it appears (slots,
parameter operands, node metadata, argument rewrites), the concatenation of its atoms' groups.

Channels may also be tied *in runs*: a depthwise conv with a channel multiplier k gives each
input channel k output positions (``Layout.block``), and adding its output to a plain conv's
ties each run of k of that conv's channels to one input channel (:meth:`_Engine._tie_coarser`).
The finer class then *becomes* the coarse channels, with k times the positions per channel in
every slot, tensor and node layout that holds it (:meth:`_Engine._coarser_groups`; where that
cannot be expressed, both stay whole).

Groups may also be *constrained*. Rules state a constraint as a small type
(:meth:`_Engine.require`): :class:`EqualPerBlock` (a grouped convolution needs every conv group
to keep the same number of channels: G equal blocks, the same count kept in each) and
:class:`WholeUnits` (GroupNorm groups, attention heads: channels come in consecutive units of
``size`` that are kept or removed whole). Each final group resolves its demands into one
:class:`GroupConstraint` (``Group.blocks``, ``Group.unit``); :func:`fit_count`,
:func:`select_channels` and :func:`check_balanced` are the one code path a planner and the
rewrite use to honour it.

Every group gets a key, unique within the analysis (:func:`unique_keys`): it is what a plan
names the group by.
"""

from __future__ import annotations

import fnmatch
import math
import operator
import warnings
from dataclasses import dataclass, field, replace
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from .errors import FxPruneError, FxPruneWarning, UnsupportedNodeError, describe_node, target_name, InternalError
from .graph import to_networkx, walk
from .rules import (ARG_REWRITE, LAYOUT_META, DEFAULT_RULES, ArgPatch, ArgRewrite, Constraint, EqualPerBlock, Layout, RuleTable,
                    TupleLayout, WholeUnits, output_rank)
from .tracing import node_shape

__all__ = [
    "Member", "TensorMember", "Group", "Slot", "TensorSlot", "Analysis", "analyze", "fit_count", "select_channels", "check_balanced",
    "tensor_users", "unique_keys", "tensor_owner", "RENORMALISING",
    "EqualPerBlock", "WholeUnits", "Constraint", "GroupConstraint", "resolve_constraints",
]

# node.meta key of a norm whose statistics run over a renormalising group's channels (see
# :attr:`Group.renormalising`): the ``(group index, size)`` segments of its normalised dim.
RENORMALISING = "fxprune_renormalising"

ROLES = ("out", "in", "channelwise")
_NO_VALUE = object()  # a node whose value cannot be computed without inputs


@dataclass(frozen=True)
class Member:
    """One module parameter dimension indexed by a group's channels.

    ``role``: ``out`` (producer rows), ``in`` (consumer columns) or ``channelwise`` (BatchNorm,
    depthwise conv). Channel ``c`` of the group owns positions
    ``[(offset + c) * block, (offset + c + 1) * block)`` of that dimension.
    """

    module: str
    role: str
    offset: int
    block: int


@dataclass(frozen=True)
class TensorMember:
    """One dimension of a parameter/buffer read directly (``get_attr``) that a group's channels index.

    The tensor-slot counterpart of :class:`Member`, for functional layers and parameter
    operands. ``target``: the tensor's attribute path; ``role``: ``out``/``in``/``channelwise``
    as for a module (a functional layer's tensor) or ``operand`` (a per-channel operand of an
    element-wise op); ``kind``: which tensor of the layer it is (``weight``, ``bias``,
    ``running_mean``, ``running_var``; ``operand`` for an operand); ``dim``: the tensor dim that
    holds the positions; ``conv_groups``: a grouped functional conv's ``groups`` (its ``in``
    positions are then spread over the conv groups, as in a grouped ``nn.Conv2d``). Channel ``c``
    owns positions ``[(offset + c) * block, (offset + c + 1) * block)``.
    """

    target: str
    role: str
    kind: str
    dim: int
    offset: int
    block: int = 1
    conv_groups: int = 1


# EqualPerBlock, WholeUnits and Constraint live in fxprune.rules (rules state them); re-exported here.


@dataclass(frozen=True)
class GroupConstraint:
    """What a group's demands resolve to: ``blocks`` equal blocks of whole units of ``unit`` channels.

    Units nest in blocks (``unit`` divides ``size // blocks``), so every block keeps the same
    number of whole units and the kept count is a multiple of :attr:`step`. ``(1, 1)``: none.

    >>> c = GroupConstraint(2, 4)
    >>> c.step, c.keeps([0, 1, 2, 3, 8, 9, 10, 11], 16), c.keeps([0, 1, 2, 3], 16)
    (8, True, False)
    """

    blocks: int = 1
    unit: int = 1

    @property
    def step(self) -> int:
        return self.blocks * self.unit

    def keeps(self, keep: Sequence[int], size: int) -> bool:
        """Whether ``keep`` (sorted channel indices of ``size``) satisfies the constraint."""
        return self.problem(keep, size) is None

    def problem(self, keep: Sequence[int], size: int) -> Optional[str]:
        """What ``keep`` breaks, or None."""
        if len(keep) == size:
            return None
        if self.blocks > 1:
            counts = [0] * self.blocks
            for i in keep:
                counts[i // (size // self.blocks)] += 1
            if len(set(counts)) != 1:
                return f"each of its {self.blocks} blocks of {size // self.blocks} channels must keep the same number, the plan keeps {counts}"
        if self.unit > 1:
            units: Dict[int, int] = {}
            for i in keep:
                units[i // self.unit] = units.get(i // self.unit, 0) + 1
            broken = sorted(u for u, n in units.items() if n != self.unit)
            if broken:
                return (f"its channels come in whole units of {self.unit}: units {broken[:5]} are kept only in part")
            if not units:
                return f"its channels come in whole units of {self.unit}: at least one unit must be kept"
        return None


def resolve_constraints(size: int, demands: Sequence[Constraint]) -> Tuple[GroupConstraint, Optional[str]]:
    """One group's demands as a :class:`GroupConstraint`, and why it must stay whole (None: it may shrink).

    Equal blocks of G1 and of G2 both hold with lcm(G1, G2) equal blocks (the blocks nest);
    whole units of u1 and of u2 both hold exactly for whole aligned units of lcm(u1, u2). Units
    must nest in blocks (each block an integer number of units): otherwise the two cut the
    channels across each other and the group stays whole (fail closed). A group that cannot
    lose a unit in every block (one unit per block) stays whole too.

    >>> resolve_constraints(64, [EqualPerBlock(2), WholeUnits(8), WholeUnits(4)])
    (GroupConstraint(blocks=2, unit=8), None)
    >>> resolve_constraints(12, [EqualPerBlock(4), WholeUnits(2)])[1]
    'units of 2 channels do not nest in 4 equal blocks of 3'
    """
    blocks = math.lcm(1, *(d.blocks for d in demands if isinstance(d, EqualPerBlock)))
    unit = math.lcm(1, *(d.size for d in demands if isinstance(d, WholeUnits)))
    out = GroupConstraint(blocks, unit)
    if size % blocks:
        return out, f"{size} channels do not split into {blocks} equal blocks"
    if size % unit:
        return out, f"{size} channels do not split into whole units of {unit}"
    if (size // blocks) % unit:
        return out, f"units of {unit} channels do not nest in {blocks} equal blocks of {size // blocks}"
    return out, None


@dataclass(frozen=True)
class Group:
    """A set of channels that must be removed together, with every parameter they index.

    ``blocks``: the channels form this many equal consecutive blocks that must each keep the
    same number of channels (a group read or written by a grouped convolution); 1 otherwise.

    ``renormalising``: the proof contract of its rewrite. ``False`` (*exact*): the pruned model
    equals the masked reference (removed channels zeroed). ``True``: a LayerNorm/RMSNorm
    normalises over its channels (``norms`` names them), so removing channels changes the
    statistics of the kept ones; the pruned model equals the masked reference in which each
    such norm computes its statistics over the kept channels only.
    ``unit``: the channels come in consecutive units of this many, kept or removed whole
    (GroupNorm groups, attention heads); 1 otherwise. Both together: :attr:`constraint`.
    """

    index: int
    key: str
    size: int
    members: Tuple[Member, ...]
    frozen: bool
    reasons: Tuple[str, ...] = ()
    blocks: int = 1  # equal blocks that must each keep the same count (grouped convs)
    tensors: Tuple[TensorMember, ...] = ()  # directly read tensors: functional layers, operands
    renormalising: bool = False  # the proof contract: exact (False) or renormalising (True)
    norms: Tuple[str, ...] = ()  # the norms that renormalise it
    unit: int = 1  # consecutive channels kept or removed whole (GroupNorm groups, heads)

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    @property
    def exact(self) -> bool:
        """Whether its rewrite equals the masked reference (see ``renormalising``)."""
        return not self.renormalising

    @property
    def block_size(self) -> int:
        return self.size // self.blocks

    @property
    def constraint(self) -> GroupConstraint:
        """The group's constraint as one object (what every planner path applies)."""
        return GroupConstraint(self.blocks, self.unit)

    @property
    def constraints(self) -> Tuple[Constraint, ...]:
        """The constraint as its typed parts: ``EqualPerBlock``, ``WholeUnits`` (none: ``()``)."""
        parts: List[Constraint] = []
        if self.blocks > 1:
            parts.append(EqualPerBlock(self.blocks))
        if self.unit > 1:
            parts.append(WholeUnits(self.unit))
        return tuple(parts)

    def modules(self, role: Optional[str] = None) -> List[str]:
        return [m.module for m in self.members if role is None or m.role == role]

    def __str__(self) -> str:
        state = "frozen: " + "; ".join(self.reasons) if self.frozen else "prunable" if self.prunable else "one channel"
        parts = []
        for role in ROLES:
            names = self.modules(role)
            names += [f"{t.target}" for t in self.tensors if t.role == role]
            # Once each: a layer indexed at several offsets (a head's dims in every head) is one layer.
            names = list(dict.fromkeys(names))
            if names:
                parts.append(f"{role}={','.join(names)}")
        blocks = f" in {self.blocks} blocks" if self.blocks > 1 else ""
        if self.renormalising and self.prunable:
            state += f", renormalising: {', '.join(self.norms)}"
        blocks += f" in units of {self.unit}" if self.unit > 1 else ""
        return f"group {self.key} [{self.size} ch{blocks}, {state}] " + " ".join(parts)


@dataclass(frozen=True)
class Slot:
    """The channels of one module parameter dimension: group indices and sizes, in order."""

    module: str
    role: str
    segments: Tuple[Tuple[int, int], ...]
    block: int


@dataclass(frozen=True)
class TensorSlot:
    """One dimension of a parameter or buffer the graph reads directly (``get_attr``).

    ``target``: its attribute path; ``dim``: the tensor dimension that holds the channels;
    ``segments``: group indices and sizes along it, in order. ``role``/``kind``/``block``/
    ``conv_groups``: as in :class:`TensorMember`. The rewrite slices it along ``dim``. A
    functional layer's tensors (roles ``out``/``in``/``channelwise``) are scored and masked like
    the module form's; a per-channel ``operand`` of an element-wise op is neither (a removed
    channel's entry only ever meets a removed channel, so the masked reference need not zero it,
    and zeroing a divisor would make it NaN). A literal channel count on the way from the tensor
    to its reader (``self.bias.view(1, C, 1, 1)``, a depthwise conv's ``groups=``) is an argument
    rewrite of that node (``node.meta[ARG_REWRITE]``), like any other.

    ``per``: each position along ``dim`` stands for a whole unit of that many consecutive
    channels of ``segments`` (an ``operand`` only: a relative position bias table has one
    column per attention head, the heads' group one channel per head_dim entry); the group keeps
    whole units (:class:`WholeUnits`), so the rewrite keeps the columns of the kept units.
    """

    target: str
    dim: int
    segments: Tuple[Tuple[int, int], ...]
    role: str = "operand"
    kind: str = "operand"
    block: int = 1
    conv_groups: int = 1
    per: int = 1

    def as_slot(self) -> Slot:
        return Slot(self.target, "channelwise", self.segments, self.block)


@dataclass
class Analysis:
    """The result of :func:`analyze`: groups and the slots the rewrite must slice."""

    gm: torch.fx.GraphModule
    groups: List[Group]
    slots: Dict[Tuple[str, str], Slot]
    warnings: List[str] = field(default_factory=list)
    # Directly read tensors by attribute path: one slot per dim the channels index (a functional
    # conv's weight has its ``out`` rows on dim 0 and its ``in`` columns on dim 1).
    tensors: Dict[str, Tuple[TensorSlot, ...]] = field(default_factory=dict)
    # The rule table the groups were found with (what later stages ask "is there a rule?").
    rules: RuleTable = DEFAULT_RULES

    def group(self, key: str) -> Group:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)

    def summary(self) -> str:
        return "\n".join(str(g) for g in self.groups)


def _boundaries(sizes: Iterable[int]) -> set:
    """The channel positions where consecutive runs of ``sizes`` channels end (the last included)."""
    ends, at = set(), 0
    for size in sizes:
        at += size
        ends.add(at)
    return ends


class _Engine:
    """Implements :class:`fxprune.rules.RuleContext` over one graph."""

    def __init__(self, gm: torch.fx.GraphModule, strict: bool, rules: RuleTable = DEFAULT_RULES,
                 allow_renormalising: bool = True) -> None:
        self.gm = gm
        self.strict = strict
        self.rules = rules
        self.allow_renormalising = allow_renormalising
        # Norms over the channel dim (raw group -> what renormalises it; node name -> its layout).
        self.renorm: Dict[int, List[str]] = {}
        self.renorm_nodes: Dict[str, Layout] = {}
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.union = nx.utils.UnionFind()
        self.sizes: List[int] = []
        self.frozen: Dict[int, List[str]] = {}
        self.blocks: Dict[int, List[Tuple[Constraint, str]]] = {}  # raw group -> (constraint, why)
        self.owner: Dict[str, int] = {}  # module name -> the group its output rows form
        self.slot_layouts: Dict[Tuple[str, str], Layout] = {}
        self.slot_order: List[Tuple[str, str]] = []
        self.layouts: Dict[str, Optional[Layout]] = {}
        self.tuples: Dict[str, TupleLayout] = {}
        self.messages: List[str] = []
        self.current: Optional[torch.fx.Node] = None
        self.freezes = 0  # how many freeze() calls so far: tells whether a rule froze anything
        # Which roles each call site of a module declared: a role one call site leaves
        # untracked (the model input, say) pins that role's channels at every call site.
        self.site_roles: Dict[str, Dict[str, set]] = {}
        # get_attr tensors read as per-channel operands or functional-layer tensors:
        # target -> {dim in the tensor: use}, the nodes that read them so (every other reader
        # must leave them whole) with the dims each declared, and the nodes between the get_attr
        # and its readers (dtype casts, size-1 views) that carry the tensor.
        self.tensor_layouts: Dict[str, Dict[int, _TensorUse]] = {}
        self.tensor_sites: Dict[str, Dict[str, set]] = {}
        self.tensor_via: Dict[str, set] = {}
        self.ranks: Dict[str, Optional[int]] = {}  # rank of tensors without a layout, where an op fixes it
        self.static: Dict[str, Any] = {}  # meta-device values of parameter-only expressions
        self.refusals: List[Tuple[torch.fx.Node, List[Layout], str, Optional[str]]] = []
        # Channel splits: raw group -> the raw groups it concatenates, each at its offset. A
        # group may be cut more than once (and differently); _atoms() reconciles the cuts.
        self.parts: List[Tuple[int, Tuple[Tuple[int, int], ...]]] = []
        # Argument rewrites rules declared, by node name (raw group ids until _result).
        self.arg_patches: Dict[str, List[ArgPatch]] = {}
        self.arg_targets: Dict[str, Any] = {}
        # Regions a rule accounts for as a whole (an attention block's heads): node name -> the
        # layout it was given (None inside the region); their own rules are not run.
        self.claimed: Dict[str, Optional[Layout]] = {}
        self.ties: Dict[str, Layout] = {}  # claimed node -> the layout its input must be tied to
        # Coarser ties (see _tie_coarser): (raw group, the layout whose channels own ``ratio`` of
        # its consecutive channels each, ratio, where). The group becomes those channels.
        self.coarser: List[Tuple[int, Layout, int, str]] = []

    # --- RuleContext
    def layout(self, arg: Any) -> Optional[Layout]:
        return self.layouts.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def elements(self, arg: Any) -> Optional[TupleLayout]:
        return self.tuples.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.modules[str(node.target)]

    def shape(self, arg: Any) -> Optional[torch.Size]:
        if not isinstance(arg, torch.fx.Node):
            return None
        found = node_shape(arg)
        if found is None and arg.op in ("get_attr", "call_function", "call_method"):
            # A parameter, buffer or expression of them alone has its shape without any
            # example input: evaluate it on the meta device (no memory, no compute).
            value = self._static_value(arg, 0)
            found = value.shape if isinstance(value, torch.Tensor) else None
        return found

    def _static_value(self, node: torch.fx.Node, depth: int) -> Any:
        """``node``'s value on the meta device if it depends on parameters and constants only."""
        if node.name in self.static:
            return self.static[node.name]
        value: Any = _NO_VALUE
        if node.op == "get_attr":
            tensor = self._attr(node)
            value = tensor.detach().to("meta") if isinstance(tensor, torch.Tensor) else _NO_VALUE
        elif node.op in ("call_function", "call_method") and depth < 16 and node.all_input_nodes \
                and (node.op == "call_method" or _is_torch_op(node.target)):
            # Only torch's own ops, and only on values that come from parameters: the user's
            # code is never run here, and nothing is computed or allocated (meta tensors).
            inputs = {n.name: self._static_value(n, depth + 1) for n in node.all_input_nodes}
            if all(v is not _NO_VALUE for v in inputs.values()):
                args = torch.fx.node.map_arg(node.args, lambda n: inputs[n.name])
                kwargs = torch.fx.node.map_arg(node.kwargs, lambda n: inputs[n.name])
                try:
                    with torch.no_grad():
                        if node.op == "call_function":
                            value = node.target(*args, **kwargs)  # type: ignore[operator]
                        else:
                            value = getattr(args[0], str(node.target))(*args[1:], **kwargs)
                except Exception:  # an op meta tensors do not support: the shape stays unknown
                    value = _NO_VALUE
        self.static[node.name] = value
        return value

    def rank(self, arg: Any) -> Optional[int]:
        shape = self.shape(arg)
        if shape is not None:
            return len(shape)
        lay = self.layout(arg)
        if lay is not None and lay.rank is not None:
            return lay.rank
        return self.ranks.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def tensor_member(self, node: torch.fx.Node, operand: torch.fx.Node, dim: int, layout: Layout,
                      role: str = "operand", kind: str = "operand", conv_groups: int = 1,
                      via: Sequence[torch.fx.Node] = (), per: int = 1) -> None:
        if per != 1 and role != "operand":
            raise InternalError(f"{node.name}: a tensor read one position per {per} channels must be an operand")
        target = str(operand.target)
        self.tensor_sites.setdefault(target, {}).setdefault(node.name, set()).add(dim)
        self.tensor_via.setdefault(target, set()).update(n.name for n in via)
        uses = self.tensor_layouts.setdefault(target, {})
        use = _TensorUse(layout, role, kind, int(layout.block or 1), conv_groups, per)
        if dim in uses:
            # One tensor read at several ops: every read must keep the same channels.
            old = uses[dim]
            if (old.role, old.kind, old.conv_groups, old.per) != (role, kind, conv_groups, per):
                self._freeze_at(node.name, [old.layout, layout], f"parameter {target} is read as {old.role} and as {role}")
                return
            self.unify(node, [old.layout, layout])
            return
        uses[dim] = use

    def _attr(self, node: torch.fx.Node) -> Any:
        try:
            return operator.attrgetter(str(node.target))(self.gm)
        except AttributeError:
            return None

    def _new_group(self, size: int) -> int:
        gid = len(self.sizes)
        self.sizes.append(size)
        self.union[gid]  # registers the element
        return gid

    def produce(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int], tag: str = "") -> Layout:
        # A module called twice produces the same rows both times: one group. ``tag`` names a
        # second set of channels the same layer makes (an attention module's heads).
        name = (str(node.target) if node.op == "call_module" else node.name) + (f"#{tag}" if tag else "")
        if name not in self.owner:
            self.owner[name] = self._new_group(size)
        return Layout((self.owner[name],), (size,), dim, rank, 1)

    def opaque(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout:
        gid = self._new_group(size)
        self.frozen.setdefault(gid, []).append(f"channels of a non-prunable tensor at {node.name}")
        return Layout((gid,), (size,), dim, rank, 1)

    def member(self, node: torch.fx.Node, role: str, layout: Layout) -> None:
        key = (str(node.target), role)
        self.site_roles.setdefault(key[0], {}).setdefault(node.name, set()).add(role)
        if key in self.slot_layouts:
            # A shared module: every call site must keep the same channels.
            self.unify(node, [self.slot_layouts[key], layout])
            return
        self.slot_layouts[key] = layout
        self.slot_order.append(key)

    def require_blocks(self, node: torch.fx.Node, layout: Layout, blocks: int, reason: str) -> None:
        self.require(node, layout, EqualPerBlock(blocks), reason)

    def require(self, node: torch.fx.Node, layout: Layout, constraint: Constraint, reason: str) -> None:
        """Demand ``constraint`` of ``layout``'s channels (resolved per final group at the end).

        Equal blocks are demanded of a single group (blocks spanning groups would tie their
        counts: the caller freezes that). Whole units may span a concatenation if every group
        starts and ends on a unit boundary (each group then keeps whole units of its own);
        otherwise a unit would straddle two groups and the channels stay whole.
        """
        if isinstance(constraint, EqualPerBlock):
            if len(layout.groups) != 1:
                raise InternalError(f"blocks required of a {len(layout.groups)}-group layout at {node.name}")
            if constraint.blocks > 1:
                self.blocks.setdefault(layout.groups[0], []).append((constraint, reason))
            return
        if not isinstance(constraint, WholeUnits) or constraint.size < 1:
            raise InternalError(f"unknown group constraint {constraint!r} at {node.name}")
        if constraint.size == 1:
            return
        if layout.block != 1 or any(size % constraint.size for size in layout.sizes):
            self.freeze(node, [layout], f"{reason}: its units of {constraint.size} channels straddle channel groups")
            return
        for gid, size in zip(layout.groups, layout.sizes):
            if size:
                self.blocks.setdefault(gid, []).append((constraint, reason))

    def split(self, node: torch.fx.Node, layout: Layout, sizes: Sequence[int]) -> List[Layout]:
        """The layouts of consecutive pieces of ``layout``'s channels, ``sizes`` channels each.

        A piece boundary inside a group cuts it: the group becomes the concatenation of new
        groups (its *parts*, recorded in ``self.parts``), which the pieces then carry. The
        analysis resolves every cut at the end (:meth:`_atoms`), so the producer's channels are
        the concatenation of the pieces' groups and each piece keeps its own count.
        """
        if sum(sizes) != layout.channels or any(s < 0 for s in sizes) or layout.block != 1:
            raise InternalError(f"split of {layout.channels} channels into {list(sizes)} at {node.name}")
        cut = self._cut(layout, _boundaries(sizes))
        segments, pos = [], 0  # (group, size, position)
        for gid, size in zip(cut.groups, cut.sizes):
            segments.append((gid, size, pos))
            pos += size
        pieces, start = [], 0
        for size in sizes:
            inside = [(g, s) for g, s, p in segments if start <= p < start + size]
            pieces.append(Layout(tuple(g for g, _ in inside), tuple(s for _, s in inside), layout.dim, layout.rank, 1))
            start += size
        return pieces

    def _cut(self, layout: Layout, bounds: Iterable[int]) -> Layout:
        """``layout``'s channels with every group cut at the channel positions ``bounds``.

        A group a bound falls inside becomes the concatenation of new groups (its parts,
        recorded in ``self.parts`` and resolved by :meth:`_atoms`); zero-width groups are left
        out. The result indexes the same channels as ``layout``.
        """
        bounds = set(bounds)
        groups: List[int] = []
        sizes: List[int] = []
        pos = 0
        for gid, size in zip(layout.groups, layout.sizes):
            inner = sorted(b - pos for b in bounds if pos < b < pos + size)
            if not inner:
                if size:
                    groups.append(gid)
                    sizes.append(size)
            else:
                edges = [0] + inner + [size]
                parts = []
                for lo, hi in zip(edges, edges[1:]):
                    part = self._new_group(hi - lo)
                    parts.append((part, lo))
                    groups.append(part)
                    sizes.append(hi - lo)
                self.parts.append((gid, tuple(parts)))
            pos += size
        return Layout(tuple(groups), tuple(sizes), layout.dim, layout.rank, layout.block)

    def claim(self, node: torch.fx.Node, region: Sequence[torch.fx.Node], exits: Dict[str, Layout],
              ties: Optional[Dict[str, Layout]] = None) -> None:
        """``node``'s rule accounts for ``region`` (later nodes) as a whole; ``exits`` gives layouts.

        The rule has checked that nothing outside the region reads a region node other than an
        exit, and declared every member, constraint and argument rewrite the region needs: the
        walk gives each region node its layout from here (None inside) instead of its own rule.
        ``ties``: region nodes whose first input (not visited yet: another projection) must have
        the given channels; the walk ties them when it reaches the node, or freezes both.
        """
        for n in region:
            if n.name in self.layouts or n.name in self.claimed:
                raise InternalError(f"{node.name} claims {n.name}, which the walk has already visited or another rule claimed")
        for n in region:
            self.claimed[n.name] = exits.get(n.name)
        self.claimed.setdefault(node.name, exits.get(node.name))
        self.ties.update(ties or {})

    def _tie_claimed(self, node: torch.fx.Node) -> None:
        tie = self.ties.get(node.name)
        if tie is None:
            return
        lay = self.layout(node.args[0]) if node.args else None
        if lay is None or lay.dim != tie.dim or lay.block != 1 or lay.channels != tie.channels:
            self._freeze_at(node.name, [tie, lay], "an attention projection whose channels are not tracked like the others'")
            return
        self._unify(node.name, [tie, replace(lay, rank=tie.rank)])

    def rewrite_args(self, node: torch.fx.Node, patch: ArgPatch, target: Any = None) -> None:
        self.arg_patches.setdefault(node.name, []).append(patch)
        if target is not None:
            self.arg_targets[node.name] = target

    def option(self, name: str) -> str:
        return self.rules.option(name)

    def renormalise(self, node: torch.fx.Node, layout: Layout, what: str) -> None:
        if not self.allow_renormalising:
            # The caller asked for exact rewrites only: the norm keeps its width, as it did
            # before renormalising rewrites existed (frozen by design, no warning).
            self.freeze(node, [layout], f"{what} normalises over the channel dim (renormalising; "
                                        "allow_renormalising=False)")
            return
        self.renorm_nodes[node.name] = layout
        for gid in layout.groups:
            self.renorm.setdefault(gid, []).append(what)

    def unify(self, node: torch.fx.Node, layouts: Sequence[Layout]) -> Optional[Layout]:
        return self._unify(node.name, layouts)

    def _unify(self, where: str, layouts: Sequence[Layout]) -> Layout:
        first = layouts[0]
        for other in layouts[1:]:
            if other.dim != first.dim or other.channels != first.channels or other.block != first.block:
                tied = self._tie_coarser(where, layouts)
                if tied is not None:
                    return tied
                self._freeze_at(where, layouts, "operands whose channels do not line up")
                return first
        if any(other.sizes != first.sizes for other in layouts[1:]):
            if first.block is None:
                # Flattened channels of unknown size cannot be cut at channel bounds.
                self._freeze_at(where, layouts, "operands concatenated differently")
                return first
            # Operands concatenated differently (a concatenation added to one conv's output,
            # two concatenations of different pieces): cut every operand's groups at every
            # operand's group boundaries, so channel k lies in one group of each and the
            # groups at the same positions can be tied (a group a bound falls inside becomes
            # the concatenation of its parts, as for a split of the channel dim).
            bounds = set().union(*(_boundaries(lay.sizes) for lay in layouts))
            layouts = [self._cut(lay, bounds) for lay in layouts]
            first = layouts[0]
            if any(other.sizes != first.sizes for other in layouts[1:]):
                raise InternalError(f"operands cut at the same bounds differ at {where}: "
                                    f"{[lay.sizes for lay in layouts]}")
        for other in layouts[1:]:
            for a, b in zip(first.groups, other.groups):
                self.union.union(a, b)
        return first

    def _tie_coarser(self, where: str, layouts: Sequence[Layout]) -> Optional[Layout]:
        """Tie operands whose channels own different numbers of positions; None if they cannot be.

        A depthwise conv with channel multiplier k gives every input channel k consecutive
        output positions (``block`` k); adding that to a conv's output, whose channels own one
        position each, ties each run of k of the conv's channels to one channel of the other.
        Every operand must index the same positions of the same dim in consecutive runs; a finer
        operand must be one group (its channels then *become* the coarse operand's channels,
        ``ratio`` of its channels per coarse channel: recorded in ``self.coarser`` and resolved
        by :meth:`_coarser_groups`, which fails closed on any use it cannot express). The finest
        operand's layout is returned, so that the ops downstream see one position per channel.
        """
        first = layouts[0]
        if any(lay.dim != first.dim or not isinstance(lay.block, int) or lay.block < 1
               or lay.channels * lay.block != first.channels * int(first.block or 0) for lay in layouts):
            return None
        coarse = max(lay.block for lay in layouts)
        if any(coarse % lay.block for lay in layouts):
            return None
        coarsest = [lay for lay in layouts if lay.block == coarse]
        finer = [lay for lay in layouts if lay.block != coarse]
        if any(len(lay.groups) != 1 for lay in finer):
            return None
        if len(coarsest) > 1:
            self._unify(where, coarsest)
        for lay in finer:
            self.coarser.append((lay.groups[0], coarsest[0], coarse // lay.block, where))
        return min(layouts, key=lambda lay: lay.block)

    def freeze(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str) -> None:
        self._freeze_at(node.name, layouts, reason)

    def _freeze_at(self, where: str, layouts: Iterable[Optional[Layout]], reason: str) -> None:
        self.freezes += 1
        text = f"{reason} at {where}"
        for lay in layouts:
            if lay is not None:
                for gid in lay.groups:
                    self.frozen.setdefault(gid, []).append(text)

    def unsupported(self, node: torch.fx.Node, reason: str, hint: Optional[str] = None) -> None:
        layouts = self._input_layouts(node)
        if layouts and not any(lay.channels for lay in layouts):
            return  # only zero-width tensors: no channel to protect, nothing to report
        if self.strict:
            raise UnsupportedNodeError(node, reason, hint)
        self.warn(node, reason)
        self.freeze(node, layouts, reason)

    def refuse(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str,
               hint: Optional[str] = None) -> None:
        # Decided once every group is known: a refusal warns (strict: raises) only where it is
        # what keeps channels whole, not where the group is frozen by design anyway.
        self.freezes += 1
        self.refusals.append((node, [lay for lay in layouts if lay is not None], reason, hint))

    def _settle_refusals(self) -> None:
        frozen_roots = {self.union[g] for g in self.frozen}
        for node, layouts, reason, hint in self.refusals:
            gids = [g for lay in layouts for g in lay.groups if self.sizes[g] > 0]
            if any(self.union[g] not in frozen_roots for g in gids):
                if self.strict:
                    raise UnsupportedNodeError(node, reason, hint)
                self.warn(node, reason)
            self._freeze_at(node.name, layouts, reason)

    def warn(self, node: torch.fx.Node, reason: str) -> None:
        message = f"channels left unpruned: {reason}: {describe_node(node)}"
        self.messages.append(message)
        warnings.warn(FxPruneWarning(message), stacklevel=2)

    def _input_layouts(self, node: torch.fx.Node) -> List[Layout]:
        """Every layout reaching ``node``: its inputs' and those inside tuples it receives."""
        found: List[Layout] = []
        for n in node.all_input_nodes:
            lay = self.layout(n)
            if lay is not None:
                found.append(lay)
            elements = self.elements(n)
            if elements is not None:
                found.extend(elements.layouts())
        return found

    # --- the walk
    def run(self, ignore: Sequence[str]) -> Analysis:
        view = to_networkx(self.gm)
        for node in walk(view):
            self.current = node
            self.layouts[node.name] = self._visit(node)
            node.meta[LAYOUT_META] = self.layouts[node.name]
            if self.layouts[node.name] is None and node.name not in self.tuples:
                self.ranks[node.name] = output_rank(self, node, self.modules.get(str(node.target)) if node.op == "call_module" else None)
        self._pin_call_sites()
        self._check_tensor_readers()
        self._tie_shared_tensors()
        for key in self.slot_order:
            module, _ = key
            if any(fnmatch.fnmatchcase(module, pat) for pat in ignore):
                for gid in self.slot_layouts[key].groups:
                    self.frozen.setdefault(gid, []).append(f"ignored module {module}")
        for target, uses in self.tensor_layouts.items():
            # A functional layer is ignored by the name of the module owning its tensors.
            if any(fnmatch.fnmatchcase(_owner(target), pat) or fnmatch.fnmatchcase(target, pat) for pat in ignore):
                for use in uses.values():
                    for gid in use.layout.groups:
                        self.frozen.setdefault(gid, []).append(f"ignored tensor {target}")
        self._settle_refusals()
        return self._result()

    def _visit(self, node: torch.fx.Node) -> Optional[Layout]:
        if node.op in ("placeholder", "get_attr"):
            return None  # the model's inputs and parameters are never pruned
        if node.op == "output":
            self.freeze(node, self._input_layouts(node), "reaches the model output")
            return None
        if node.name in self.claimed:
            self._tie_claimed(node)
            return self.claimed[node.name]  # inside a region a rule accounted for as a whole
        if node.target is not operator.getitem:
            # Only getitem reads a tuple element by element; anything else that receives a
            # tuple of channel tensors (a list to an unknown op) loses track of them.
            whole = [lay for n in node.all_input_nodes if n.name in self.tuples for lay in self.tuples[n.name].layouts()]
            if whole:
                self.freeze(node, whole, "a tuple of channel-carrying tensors consumed whole")
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        rule = self.rules.lookup(node, module)
        if rule is None:
            if self._input_layouts(node):
                what = f"module {node.target} ({type(module).__name__})" if module is not None else f"{node.op} {target_name(node)}"
                self.unsupported(node, f"no channel rule for {what}")
            return None
        before = self.freezes
        result = rule(self, node)
        if node.name in self.claimed:
            return self.claimed[node.name]  # the rule claimed a region starting here
        if isinstance(result, TupleLayout):
            self.tuples[node.name] = result
            return None
        if result is None and self.freezes == before and not getattr(rule, "fxprune_no_channels", False):
            # Fail closed: a rule that loses track of its input's channels without freezing
            # them (a user rule returning None, say) would let them be pruned under an op
            # that then sees a different tensor.
            lost = [self.layout(n) for n in node.all_input_nodes if self.layout(n) is not None]
            if lost:
                self.freeze(node, lost, f"the rule for {target_name(node)} gave its output no channel layout")
        return result

    # --- modules called more than once
    def _pin_call_sites(self) -> None:
        """Unprunable at any call site means unprunable.

        A module called twice has one set of weights, so every role (input columns, output
        rows, per-channel parameters) keeps one channel set across its call sites. A call site
        whose rule declared no such role for it (its input is the model input, or a tensor whose
        channels are not tracked) reads the full width there: the role's channels stay whole.
        """
        sites: Dict[str, List[torch.fx.Node]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "call_module":
                sites.setdefault(str(node.target), []).append(node)
        for (module, role), lay in list(self.slot_layouts.items()):
            calls = sites.get(module, [])
            if len(calls) < 2:
                continue
            declared = self.site_roles.get(module, {})
            for call in calls:
                if role not in declared.get(call.name, ()):
                    self._freeze_at(call.name, [lay], f"module {module} is also called here, where its {role} "
                                                      "channels are not tracked (one channel set across call sites)")
                    break

    # --- parameters read directly as operands
    def _check_tensor_readers(self) -> None:
        """A tensor sliced for one op must be read only by ops that expect it sliced, each on the same dims."""
        readers: Dict[str, List[str]] = {}
        for node in self.gm.graph.nodes:
            if node.op == "get_attr" and str(node.target) in self.tensor_layouts:
                target = str(node.target)
                via = self.tensor_via.get(target, set())
                todo, seen = list(node.users), set()
                while todo:  # through the casts and views that carry it to its readers
                    user = todo.pop()
                    if user.name in seen:
                        continue
                    seen.add(user.name)
                    if user.name in via:
                        todo.extend(user.users)
                    else:
                        readers.setdefault(target, []).append(user.name)
        for target, names in readers.items():
            sites = self.tensor_sites.get(target, {})
            layouts = [use.layout for use in self.tensor_layouts[target].values()]
            others = sorted(set(names) - sites.keys())
            if others:
                self._freeze_at(others[0], layouts, f"parameter {target} is also read whole by {', '.join(others[:3])}")
            elif len({frozenset(d) for d in sites.values()}) > 1:
                self._freeze_at(sorted(sites)[0], layouts, f"parameter {target} is read with its channels on different dims")

    # --- tied tensors
    def _tie_shared_tensors(self) -> None:
        """Unify or freeze the slots of modules that share a parameter or buffer."""
        slotted: Dict[str, Dict[str, Layout]] = {}
        for (module, role), lay in self.slot_layouts.items():
            slotted.setdefault(module, {})[role] = lay
        for users in tensor_users(self.gm).values():
            targets = {target for target, _ in users}
            if len(targets) < 2:
                continue
            for t in sorted(targets & self.tensor_layouts.keys()):
                # Slicing one owner's copy of a shared tensor would leave the other's whole.
                self._freeze_at(t, [use.layout for use in self.tensor_layouts[t].values()],
                                f"parameter {t} is shared with {', '.join(sorted(targets - {t}))}")
            if not targets & slotted.keys():
                continue
            names = sorted(targets)
            attrs = {attr for _, attr in users}
            kinds = {type(self.modules.get(t)) for t in targets}
            if all(t in slotted for t in targets) and len(attrs) == 1 and len(kinds) == 1:
                self._tie_slots(names, slotted)
            else:
                where = ", ".join(f"{t}.{a}" if a else f"get_attr {t}" for t, a in sorted(users))
                for t in names:
                    if t in slotted:
                        self._freeze_at(t, slotted[t].values(), f"a tensor shared by {where}")

    def _tie_slots(self, names: List[str], slotted: Dict[str, Dict[str, Layout]]) -> None:
        roles = sorted({role for t in names for role in slotted[t]})
        for role in roles:
            present = [slotted[t][role] for t in names if role in slotted[t]]
            if len(present) != len(names):
                missing = [t for t in names if role not in slotted[t]]
                self._freeze_at(names[0], present, f"weights tied with {', '.join(missing)}, whose {role} channels are not tracked")
            else:
                self._unify(f"tied weights of {', '.join(names)}", present)

    # --- the result
    def _atoms(self) -> Dict[int, List[Tuple[Any, int]]]:
        """Every union-find class's channels as consecutive *atoms*: ``[(atom, size), ...]``.

        Without splits a class is one atom. A split cuts a group into parts; tied groups
        (one class) must be cut at the same places, and a part's cuts are its parent's cuts
        inside it and vice versa, so the cuts are propagated to a fixed point. Then atom ``k``
        of a part is atom ``j`` of its parent at the same channels: those are united, and each
        united set of atoms is one final group.
        """
        cuts: Dict[int, set] = {}
        changed = True
        while changed:  # terminates: cuts only grow, within (0, size) of each class
            changed = False
            for parent, parts in self.parts:
                whole = cuts.setdefault(self.union[parent], set())
                size = self.sizes[parent]
                for part, offset in parts:
                    inner = cuts.setdefault(self.union[part], set())
                    width = self.sizes[part]
                    up = {c for c in {offset, offset + width} | {offset + c for c in inner} if 0 < c < size} - whole
                    if up:
                        whole |= up
                        changed = True
                    down = {c - offset for c in whole if offset < c < offset + width} - inner
                    if down:
                        inner |= down
                        changed = True
        intervals: Dict[int, List[Tuple[int, int]]] = {}
        for gid in range(len(self.sizes)):
            root = self.union[gid]
            if root not in intervals:
                edges = [0] + sorted(cuts.get(root, ())) + [self.sizes[gid]]
                intervals[root] = [(lo, hi) for lo, hi in zip(edges, edges[1:]) if hi > lo]
        atoms = nx.utils.UnionFind()
        for parent, parts in self.parts:
            whole = self.union[parent]
            starts = {lo: k for k, (lo, _) in enumerate(intervals[whole])}
            for part, offset in parts:
                root = self.union[part]
                for k, (lo, _) in enumerate(intervals[root]):
                    atoms.union((root, k), (whole, starts[offset + lo]))
        return {root: [(atoms[(root, k)], hi - lo) for k, (lo, hi) in enumerate(spans)]
                for root, spans in intervals.items()}

    # --- coarser ties
    def _coarser_groups(self) -> Dict[int, Tuple[Layout, int]]:
        """The coarser ties that hold: ``{class root: (coarse layout, ratio)}``; the rest freeze.

        A tied class (see :meth:`_tie_coarser`) becomes the coarse channels, each owning
        ``ratio`` of its consecutive channels: every layer dim and tensor that indexes it is
        re-expressed on the coarse groups with ``ratio`` times its positions per channel. That
        is expressible only where the class is the whole of a layout (not concatenated with
        other channels), no split cuts it, no norm renormalises it, no argument rewrite counts
        it, its constraints translate to the coarse channels, and it is tied to one coarse
        channel set. Otherwise the class and the coarse channels stay whole (fail closed).
        """
        records: Dict[int, List[Tuple[Layout, int, str]]] = {}
        for gid, lay, ratio, where in self.coarser:
            records.setdefault(self.union[gid], []).append((lay, ratio, where))
        if not records:
            return {}
        bad: Dict[int, str] = {}
        for root, recs in records.items():
            if len({(tuple(self.union[g] for g in lay.groups), lay.sizes, r) for lay, r, _ in recs}) > 1:
                bad[root] = "tied to two different sets of coarser channels"
        for parent, parts in self.parts:
            for g in (parent, *(part for part, _ in parts)):
                if self.union[g] in records:
                    bad.setdefault(self.union[g], "a split cuts it")

        def mark(groups: Iterable[int], what: str) -> None:
            for g in groups:
                if self.union[g] in records:
                    bad.setdefault(self.union[g], what)

        def concatenated(lay: Optional[Layout], what: str) -> None:
            if lay is not None and len(lay.groups) != 1:
                mark(lay.groups, f"{what} concatenates it with other channels")

        for lay in self.slot_layouts.values():
            concatenated(lay, "a layer dim")
        for uses in self.tensor_layouts.values():
            for use in uses.values():
                concatenated(use.layout, "a tensor")
                if use.per != 1:
                    mark(use.layout.groups, "a tensor is read one position per unit of it")
        for node_layout in self.layouts.values():
            concatenated(node_layout, "an op")
        for norm in self.renorm_nodes.values():
            mark(norm.groups, "a norm renormalises it")
        for patches in self.arg_patches.values():
            counted: List[int] = []
            ArgRewrite(tuple(patches)).map_groups(lambda gs: counted.extend(gs) or gs)  # type: ignore[func-returns-value]
            mark(counted, "an argument rewrite counts it")
        for gid, demands in self.blocks.items():
            root = self.union[gid]
            if root in records and root not in bad:
                lay, ratio, _ = records[root][0]
                problem = self._coarser_constraints(lay, ratio, [c for c, _ in demands])[1]
                if problem is not None:
                    bad[root] = problem
        # Chains (a tie to channels that are themselves tied coarser) resolve through each
        # other: a broken link, or a cycle, breaks every tie above it.
        changed = True
        while changed:
            changed = False
            for root, recs in records.items():
                if root in bad:
                    continue
                above = {self.union[g] for g in recs[0][0].groups}
                if root in above or any(r in bad for r in above) or self._cycles(root, records):
                    bad[root] = "its coarser channels cannot be resolved"
                    changed = True
        for root, why in bad.items():
            members = [g for g in range(len(self.sizes)) if self.union[g] == root]
            for lay, ratio, where in records[root]:
                self._freeze_at(where, [lay, Layout(tuple(members), tuple(self.sizes[g] for g in members), lay.dim, None)],
                                f"channels tied in runs of {ratio} to channels of another layout where {why} "
                                "(not modelled)")
        return {root: recs[0][:2] for root, recs in records.items() if root not in bad}

    def _cycles(self, root: int, records: Dict[int, List[Tuple[Layout, int, str]]]) -> bool:
        todo, seen = [root], set()
        while todo:
            at = todo.pop()
            for g in records[at][0][0].groups if at in records else ():
                up = self.union[g]
                if up == root:
                    return True
                if up not in seen:
                    seen.add(up)
                    todo.append(up)
        return False

    @staticmethod
    def _coarser_constraints(coarse: Layout, ratio: int, demands: Sequence[Constraint]
                             ) -> Tuple[List[Tuple[int, Constraint]], Optional[str]]:
        """A finer class's demands as demands on the coarse layout's groups ``[(raw group, constraint)]``.

        Equal blocks hold for the coarse channels when the coarse channels are one group that
        splits into the same blocks; whole units of ``u`` fine channels are whole units of
        ``u / ratio`` coarse channels, or always whole when ``ratio`` is a multiple of ``u``.
        """
        out: List[Tuple[int, Constraint]] = []
        for demand in demands:
            if isinstance(demand, EqualPerBlock):
                if len(coarse.groups) != 1 or coarse.channels % demand.blocks:
                    return [], f"its {demand.blocks} equal blocks do not fall on the coarser channels"
                out.append((coarse.groups[0], demand))
            elif isinstance(demand, WholeUnits):
                if ratio % demand.size == 0:
                    continue
                if demand.size % ratio or any(size % (demand.size // ratio) for size in coarse.sizes):
                    return [], f"its units of {demand.size} channels do not fall on the coarser channels"
                out.extend((g, WholeUnits(demand.size // ratio)) for g in coarse.groups)
            else:
                return [], f"its constraint {demand!r} is not modelled on coarser channels"
        return out, None

    def _result(self) -> Analysis:
        # Final group indices, in order of first appearance. A group of zero channels (a
        # layer with no outputs) has nothing to prune or keep: it forms no group, and its
        # zero-width segments are left out of slots and node metadata. A group a split cut
        # becomes the concatenation of its atoms' groups wherever it appears; a group tied to
        # coarser channels (:meth:`_coarser_groups`) becomes those channels, with ``scale``
        # times the positions per channel wherever it appears.
        coarser = self._coarser_groups()
        atoms = self._atoms()
        roots: Dict[Any, int] = {}
        for gid in range(len(self.sizes)):
            if self.union[gid] not in coarser:
                for atom, _ in atoms[self.union[gid]]:
                    roots.setdefault(atom, len(roots))
        final: Dict[int, Tuple[Tuple[int, int], ...]] = {
            gid: tuple((roots[atom], size) for atom, size in atoms[self.union[gid]])
            for gid in range(len(self.sizes)) if self.union[gid] not in coarser}
        scale: Dict[int, int] = dict.fromkeys(final, 1)

        def resolve(gid: int) -> None:
            if gid in final:
                return
            coarse, ratio = coarser[self.union[gid]]
            for g in coarse.groups:
                resolve(g)
            final[gid] = tuple(seg for g in coarse.groups for seg in final[g])
            scale[gid] = ratio * scale[coarse.groups[0]]

        for gid in range(len(self.sizes)):
            resolve(gid)

        def expand(groups: Iterable[int]) -> Tuple[Tuple[int, int], ...]:
            return tuple(seg for g in groups for seg in final[g])

        def factor(groups: Sequence[int]) -> int:
            # Positions per final channel for each raw one: a tied class is alone in its
            # layouts (checked), so only a single-group layout can be scaled.
            return scale[groups[0]] if len(groups) == 1 else 1

        def scaled(lay: Layout) -> Optional[int]:
            return None if lay.block is None else int(lay.block) * factor(lay.groups)

        reasons: Dict[int, List[str]] = {}
        for gid, why in self.frozen.items():
            for idx, _ in final[gid]:
                reasons.setdefault(idx, []).extend(why)
        sizes = {idx: s for gid in range(len(self.sizes)) for idx, s in final[gid]}
        constraints = self._resolve_blocks(final, sizes, reasons, coarser)
        members: Dict[int, List[Member]] = {i: [] for i in range(len(roots))}
        slots: Dict[Tuple[str, str], Slot] = {}
        for key in self.slot_order:
            lay = self.slot_layouts[key]
            segments = expand(lay.groups)
            block = scaled(lay) or 1
            slots[key] = Slot(key[0], key[1], segments, block)
            offset = 0
            for idx, size in segments:
                members[idx].append(Member(key[0], key[1], offset, block))
                offset += size
        tensors: Dict[str, Tuple[TensorSlot, ...]] = {}
        tensor_members: Dict[int, List[TensorMember]] = {i: [] for i in range(len(roots))}
        for target, uses in self.tensor_layouts.items():
            found = []
            for dim, use in sorted(uses.items()):
                lay = use.layout
                segments = expand(lay.groups)
                block = use.block * factor(lay.groups)
                found.append(TensorSlot(target, dim, segments, use.role, use.kind, block, use.conv_groups, use.per))
                offset = 0
                for idx, size in segments:
                    tensor_members[idx].append(TensorMember(target, use.role, use.kind, dim, offset, block, use.conv_groups))
                    offset += size
            tensors[target] = tuple(found)
        for node in self.gm.graph.nodes:
            lay = self.layouts.get(node.name)
            if lay is not None:
                # In final groups, segment by segment: a group a split cut is its atoms here too,
                # and a zero-width one is left out, so groups and sizes line up.
                segments = expand(lay.groups)
                node.meta[LAYOUT_META] = replace(lay, groups=tuple(idx for idx, _ in segments),
                                                 sizes=tuple(size for _, size in segments), block=scaled(lay))
            node.meta.pop(ARG_REWRITE, None)  # a stale one from an earlier analysis of this graph
            node.meta.pop(RENORMALISING, None)
            if node.name in self.renorm_nodes:
                node.meta[RENORMALISING] = expand(self.renorm_nodes[node.name].groups)
            if node.name in self.arg_patches:
                rewrite = ArgRewrite(tuple(self.arg_patches[node.name]), self.arg_targets.get(node.name))
                node.meta[ARG_REWRITE] = rewrite.map_groups(lambda gs: tuple(idx for idx, _ in expand(gs)))
        candidates = []
        for idx in range(len(roots)):
            mems = members[idx]
            producers = [m for m in mems if m.role == "out"]
            tensor_producers = [t for t in tensor_members[idx] if t.role == "out" and t.kind == "weight"]
            if producers:
                # A piece of a split producer is named by where it starts in the producer's rows.
                first = producers[0]
                name = first.module if first.offset == 0 else f"{first.module}@{first.offset}"
                candidates.append((name, f"{first.module}@{idx}"))
            elif tensor_producers:
                # A functional layer's output rows: named after the module owning its weight.
                owner = _owner(tensor_producers[0].target)
                name = owner if tensor_producers[0].offset == 0 else f"{owner}@{tensor_producers[0].offset}"
                candidates.append((name, f"{owner}@{idx}"))
            elif mems:
                first = mems[0]
                candidates.append((f"{first.module}:{first.role}", f"{first.module}:{first.role}@{first.offset}"))
            else:
                candidates.append((f"tensor{idx}", f"tensor{idx}"))
        keys = unique_keys(candidates)
        norms: Dict[int, List[str]] = {}
        for gid, what in self.renorm.items():
            for idx, _ in final[gid]:
                norms.setdefault(idx, []).extend(what)
        groups = []
        for idx in range(len(roots)):
            why = tuple(dict.fromkeys(reasons.get(idx, [])))  # dedupe, keep order
            renorm = tuple(dict.fromkeys(norms.get(idx, [])))
            found = constraints.get(idx, GroupConstraint())
            groups.append(Group(idx, keys[idx], sizes[idx], tuple(members[idx]), bool(why), why, found.blocks,
                                tuple(tensor_members[idx]), renormalising=bool(renorm), norms=renorm, unit=found.unit))
        return Analysis(self.gm, groups, slots, list(self.messages), tensors, self.rules)

    def _resolve_blocks(self, final: Dict[int, Tuple[Tuple[int, int], ...]], sizes: Dict[int, int],
                        reasons: Dict[int, List[str]], coarser: Optional[Dict[int, Tuple[Layout, int]]] = None
                        ) -> Dict[int, GroupConstraint]:
        """The constraint of each final group: every rule's demands on its members, resolved.

        See :func:`resolve_constraints` (blocks by lcm, units by lcm, units nested in blocks). A
        group a split cut into pieces has blocks or units across pieces: not modelled, so it
        stays whole. A group tied to coarser channels passes its demands on to them, translated
        (:meth:`_coarser_constraints`; the ties that hold were checked to translate).
        """
        pending = {gid: list(reqs) for gid, reqs in self.blocks.items()}
        translated: Dict[int, List[Tuple[Constraint, str]]] = {}
        while pending:  # up the chains of coarser ties (acyclic: checked)
            gid, reqs = pending.popitem()
            root = self.union[gid]
            if coarser and root in coarser:
                lay, ratio = coarser[root]
                moved, problem = self._coarser_constraints(lay, ratio, [c for c, _ in reqs])
                why = "; ".join(dict.fromkeys(w for _, w in reqs))
                if problem is not None:
                    # Checked for the first link of a chain; a later link can still fail: whole.
                    for g in lay.groups:
                        for idx, _ in final[g]:
                            reasons.setdefault(idx, []).append(f"channels tied in runs where {problem} ({why})")
                    continue
                for g, c in moved:
                    pending.setdefault(g, []).append((c, why))
            else:
                translated.setdefault(gid, []).extend(reqs)
        demands: Dict[int, List[Tuple[Constraint, str]]] = {}
        for gid, reqs in translated.items():
            if len(final[gid]) > 1:
                for idx, _ in final[gid]:
                    reasons.setdefault(idx, []).extend(f"{why} reads channels a split cuts" for _, why in reqs)
                continue
            for idx, _ in final[gid]:
                demands.setdefault(idx, []).extend(reqs)
        out: Dict[int, GroupConstraint] = {}
        for idx, reqs in demands.items():
            size = sizes[idx]
            what = "; ".join(dict.fromkeys(why for _, why in reqs))
            found, problem = resolve_constraints(size, [c for c, _ in reqs])
            if problem is not None:
                reasons.setdefault(idx, []).append(f"{problem} ({what})")
            elif found.step == size and size > 1:
                if found.unit == 1:
                    reasons.setdefault(idx, []).append(f"one channel per conv group ({what})")
                else:
                    reasons.setdefault(idx, []).append(f"one unit of {found.unit} channels per block ({what})")
            out[idx] = found
        return out


@dataclass(frozen=True)
class _TensorUse:
    """How one op reads one dim of a ``get_attr`` tensor (see :class:`TensorSlot`)."""

    layout: Layout
    role: str
    kind: str
    block: int
    conv_groups: int
    per: int = 1


def _owner(target: str) -> str:
    """``"blocks.0.conv"`` for ``"blocks.0.conv.weight"``: the module a functional layer's weight belongs to."""
    owner, _, name = target.rpartition(".")
    return owner if owner and name == "weight" else target


def tensor_owner(target: str) -> str:
    """The module a ``get_attr`` tensor is an attribute of (its own path for a root attribute).

    What names a functional layer for ratio patterns, as the module name names a module form:

    >>> tensor_owner("blocks.0.bn.running_var"), tensor_owner("gamma")
    ('blocks.0.bn', 'gamma')
    """
    owner = target.rpartition(".")[0]
    return owner or target


def _is_torch_op(target: Any) -> bool:
    module = getattr(target, "__module__", None) or ""
    return module == "_operator" or module == "torch" or module.startswith(("torch.", "torch._"))


def unique_keys(candidates: Sequence[Tuple[str, str]]) -> List[str]:
    """One distinct key per group from ``(preferred, alternative)`` candidates, in group order.

    A key is what a plan names a group by, so it must be unique and stable: the first group
    with a preferred key keeps it (the key every plan written so far uses); a later group with
    the same one (an untracked tensor concatenated twice gives two groups whose first member
    is the same consumer, at different offsets) takes its alternative, and ``#n`` settles
    anything still equal.

    >>> unique_keys([("head:in", "head:in@0"), ("head:in", "head:in@3"), ("conv", "conv@2")])
    ['head:in', 'head:in@3', 'conv']
    """
    preferred = {first for first, _ in candidates}
    taken: set = set()
    out: List[str] = []
    for first, second in candidates:
        if first not in taken:
            key = first
        elif second not in taken and second not in preferred:
            key = second
        else:
            n = 2
            while f"{first}#{n}" in taken or f"{first}#{n}" in preferred:
                n += 1
            key = f"{first}#{n}"
        taken.add(key)
        out.append(key)
    if len(set(out)) != len(out):
        raise InternalError(f"group keys are not unique: {out}")
    return out


def tensor_users(gm: torch.fx.GraphModule) -> Dict[int, List[Tuple[str, str]]]:
    """Every parameter/buffer the graph reaches, by identity: ``[(target, attribute path)]``.

    A ``call_module`` node reaches every tensor of its module (submodules included); a
    ``get_attr`` node the tensor (or module) it names. One tensor reached from two targets is
    shared (tied weights, or a parameter the graph reads directly as well as through its module).
    """
    users: Dict[int, List[Tuple[str, str]]] = {}
    seen = set()
    for node in gm.graph.nodes:
        if node.op not in ("call_module", "get_attr") or node.target in seen:
            continue
        seen.add(node.target)
        target = str(node.target)
        try:
            obj = gm.get_submodule(target) if node.op == "call_module" else operator.attrgetter(target)(gm)
        except AttributeError:
            continue
        if isinstance(obj, torch.Tensor):
            users.setdefault(id(obj), []).append((target, ""))
        elif isinstance(obj, nn.Module):
            named = list(obj.named_parameters(remove_duplicate=False)) + list(obj.named_buffers(remove_duplicate=False))
            for attr, t in named:
                entry = (target, attr)
                if entry not in users.setdefault(id(t), []):
                    users[id(t)].append(entry)
    return users



# --------------------------------------------------------------------------- blocked groups


def _top(scores: torch.Tensor, n: int) -> List[int]:
    # Stable descending sort: ties keep the lower index; NaN sorts last, so it ranks lowest.
    order = torch.sort(-scores, stable=True).indices[:n]
    return sorted(int(i) for i in order)


def fit_count(group: Group, n: int) -> int:
    """The keep count nearest to ``n`` that ``group`` can realise.

    For a plain group that is ``n`` itself (clamped to ``[1, size]``). A constrained group
    keeps a multiple of its :attr:`GroupConstraint.step` (the same number of whole units in
    each of its ``blocks``): the nearest one (halves round up), at least one step.

    >>> g = Group(0, "conv", 128, (), False, (), blocks=32)
    >>> fit_count(g, 64), fit_count(g, 89), fit_count(g, 3), fit_count(g, 200)
    (64, 96, 32, 128)
    >>> fit_count(Group(0, "gn", 64, (), False, unit=8), 29)
    32
    """
    n = max(1, min(group.size, int(n)))
    step = group.constraint.step
    if step <= 1 or n >= group.size:
        return n
    per = max(1, int(math.floor(n / step + 0.5)))
    return min(group.size, per * step)


def select_channels(group: Group, scores: torch.Tensor, n: int) -> List[int]:
    """The ``n`` best channels of ``group`` (sorted indices), honouring its constraint.

    A plain group keeps its ``n`` highest scores (ties: lower index first; NaN lowest). A
    blocked group keeps the ``n / blocks`` highest of every block; a group of whole units
    scores each unit by the sum of its channels' scores and keeps the best units (of every
    block). ``n`` must come from :func:`fit_count`.

    >>> g = Group(0, "heads", 6, (), False, unit=2)
    >>> select_channels(g, torch.tensor([5., 0., 1., 1., 0., 3.]), 4)
    [0, 1, 4, 5]
    """
    if n >= group.size:
        return list(range(group.size))
    constraint = group.constraint
    if constraint.step <= 1:
        return _top(scores, n)
    if n % constraint.step:
        what = (f"each of its {group.blocks} blocks" if group.blocks > 1 else "") + \
            (" and " if group.blocks > 1 and group.unit > 1 else "") + (f"whole units of {group.unit}" if group.unit > 1 else "")
        raise FxPruneError(f"group {group.key} keeps the same count in {what}: "
                           f"{n} is not a multiple of {constraint.step} (use fit_count)")
    width, per = group.block_size, n // group.blocks
    unit = constraint.unit
    keep: List[int] = []
    for b in range(group.blocks):
        block = scores[b * width : (b + 1) * width]
        if unit == 1:
            keep.extend(b * width + i for i in _top(block, per))
            continue
        # A unit's score is the sum of its channels' (NaN stays NaN: the unit ranks lowest).
        units = _top(block.reshape(-1, unit).sum(dim=1), per // unit)
        keep.extend(b * width + u * unit + i for u in units for i in range(unit))
    return keep


def check_balanced(group: Group, keep: Sequence[int]) -> Optional[str]:
    """Why ``keep`` breaks ``group``'s constraint, or None if it honours it."""
    constraint = group.constraint
    if constraint.step <= 1 or len(keep) == group.size:
        return None
    problem = constraint.problem(keep, group.size)
    if problem is None:
        return None
    if group.unit == 1:
        return f"group {group.key} feeds a grouped convolution: {problem}"
    return f"group {group.key}: {problem}"


def analyze(gm: torch.fx.GraphModule, *, ignore: Sequence[str] = (), strict: bool = False,
            rules: Optional[RuleTable] = None, allow_renormalising: bool = True) -> Analysis:
    """Find the channel-coupled groups of ``gm``.

    Writes ``node.meta[LAYOUT_META]`` (``"fxprune_layout"``, in final group indices, segment by segment) and, for nodes whose arguments count channels,
    ``node.meta[ARG_REWRITE]`` on ``gm``'s nodes, and on each norm that renormalises a group
    ``node.meta[RENORMALISING]``: pass a graph you own (the public :func:`fxprune.find_groups`
    does that for you). ``allow_renormalising=False`` keeps every LayerNorm/RMSNorm over the
    channel dim whole (frozen by design), so only exact groups are prunable.

    >>> import torchvision, fxprune
    >>> gm = fxprune.trace(torchvision.models.resnet18())
    >>> a = analyze(gm)
    >>> len(a.groups), sum(g.prunable for g in a.groups)
    (13, 12)

    ``rules``: the :class:`fxprune.rules.RuleTable` to look each op up in (default
    :data:`fxprune.rules.DEFAULT_RULES`); ``DEFAULT_RULES.extended({...})`` teaches it an op
    for this analysis only. A table that is not a RuleTable is bad input:

    >>> analyze(gm, rules={})
    Traceback (most recent call last):
    ...
    fxprune.errors.FxPruneError: rules= must be a fxprune.rules.RuleTable (e.g. fxprune.rules.DEFAULT_RULES.extended({...})), got dict
    """
    if rules is None:
        rules = DEFAULT_RULES
    elif not isinstance(rules, RuleTable):
        raise FxPruneError("rules= must be a fxprune.rules.RuleTable (e.g. fxprune.rules.DEFAULT_RULES.extended({...})), "
                           f"got {type(rules).__name__}")
    return _Engine(gm, strict, rules, allow_renormalising).run(tuple(ignore))
