"""Channel-coupled groups, found by propagating layouts over the networkx view.

Every producer (a conv's or Linear's output rows) starts a group; the rule of each op says how
its output's channels relate to its inputs' (:mod:`fxprune.rules`); ops that tie channels
(residual adds, SE multiplies, a module called twice) merge groups in a union-find. A group is
*frozen* (never pruned) when it reaches a graph output, touches an op without a rule, or meets
a pattern of ``ignore``.
"""

from __future__ import annotations

import fnmatch
import warnings
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set, Tuple

import networkx as nx
import torch
import torch.fx
import torch.nn as nn

from .errors import FxPruneWarning, UnsupportedNodeError, describe_node, target_name
from .graph import to_networkx, walk
from .rules import Layout, lookup_rule
from .trace import node_shape

__all__ = ["Member", "Group", "Slot", "Analysis", "analyze"]

ROLES = ("out", "in", "channelwise")


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
class Group:
    """A set of channels that must be removed together, with every parameter they index."""

    index: int
    key: str
    size: int
    members: Tuple[Member, ...]
    frozen: bool
    reasons: Tuple[str, ...] = ()

    @property
    def prunable(self) -> bool:
        return not self.frozen and self.size > 1

    def modules(self, role: Optional[str] = None) -> List[str]:
        return [m.module for m in self.members if role is None or m.role == role]

    def __str__(self) -> str:
        state = "frozen: " + "; ".join(self.reasons) if self.frozen else "prunable"
        parts = []
        for role in ROLES:
            names = self.modules(role)
            if names:
                parts.append(f"{role}={','.join(names)}")
        return f"group {self.key} [{self.size} ch, {state}] " + " ".join(parts)


@dataclass(frozen=True)
class Slot:
    """The channels of one module parameter dimension: group indices and sizes, in order."""

    module: str
    role: str
    segments: Tuple[Tuple[int, int], ...]
    block: int


@dataclass
class Analysis:
    """The result of :func:`analyze`: groups and the slots the rewrite must slice."""

    gm: torch.fx.GraphModule
    groups: List[Group]
    slots: Dict[Tuple[str, str], Slot]
    warnings: List[str] = field(default_factory=list)

    def group(self, key: str) -> Group:
        for g in self.groups:
            if g.key == key:
                return g
        raise KeyError(key)

    def summary(self) -> str:
        return "\n".join(str(g) for g in self.groups)


class _Engine:
    """Implements :class:`fxprune.rules.RuleContext` over one graph."""

    def __init__(self, gm: torch.fx.GraphModule, strict: bool) -> None:
        self.gm = gm
        self.strict = strict
        self.modules: Dict[str, nn.Module] = dict(gm.named_modules())
        self.union = nx.utils.UnionFind()
        self.sizes: List[int] = []
        self.frozen: Dict[int, List[str]] = {}
        self.owner: Dict[str, int] = {}  # module name -> the group its output rows form
        self.slot_layouts: Dict[Tuple[str, str], Layout] = {}
        self.slot_order: List[Tuple[str, str]] = []
        self.layouts: Dict[str, Optional[Layout]] = {}
        self.messages: List[str] = []
        self.current: Optional[torch.fx.Node] = None

    # --- RuleContext
    def layout(self, arg: Any) -> Optional[Layout]:
        return self.layouts.get(arg.name) if isinstance(arg, torch.fx.Node) else None

    def module(self, node: torch.fx.Node) -> nn.Module:
        return self.modules[str(node.target)]

    def shape(self, arg: Any) -> Optional[torch.Size]:
        return node_shape(arg) if isinstance(arg, torch.fx.Node) else None

    def _new_group(self, size: int) -> int:
        gid = len(self.sizes)
        self.sizes.append(size)
        self.union[gid]  # registers the element
        return gid

    def produce(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout:
        # A module called twice produces the same rows both times: one group.
        name = str(node.target) if node.op == "call_module" else node.name
        if name not in self.owner:
            self.owner[name] = self._new_group(size)
        return Layout((self.owner[name],), (size,), dim, rank, 1)

    def opaque(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout:
        gid = self._new_group(size)
        self.frozen.setdefault(gid, []).append(f"channels of a non-prunable tensor at {node.name}")
        return Layout((gid,), (size,), dim, rank, 1)

    def member(self, node: torch.fx.Node, role: str, layout: Layout) -> None:
        key = (str(node.target), role)
        if key in self.slot_layouts:
            # A shared module: every call site must keep the same channels.
            self.unify(node, [self.slot_layouts[key], layout])
            return
        self.slot_layouts[key] = layout
        self.slot_order.append(key)

    def unify(self, node: torch.fx.Node, layouts: Sequence[Layout]) -> Optional[Layout]:
        first = layouts[0]
        for other in layouts[1:]:
            if other.dim != first.dim or other.channels != first.channels or other.block != first.block:
                self.freeze(node, layouts, "operands whose channels do not line up")
                return first
            if other.sizes != first.sizes:
                # Tying a concatenation to a single group would split the group: not supported.
                self.freeze(node, layouts, "operands concatenated differently")
                return first
        for other in layouts[1:]:
            for a, b in zip(first.groups, other.groups):
                self.union.union(a, b)
        return first

    def freeze(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str) -> None:
        where = f"{reason} at {node.name}"
        for lay in layouts:
            if lay is not None:
                for gid in lay.groups:
                    self.frozen.setdefault(gid, []).append(where)

    def unsupported(self, node: torch.fx.Node, reason: str, hint: Optional[str] = None) -> None:
        if self.strict:
            raise UnsupportedNodeError(node, reason, hint)
        self.warn(node, reason)
        self.freeze(node, [self.layout(n) for n in node.all_input_nodes], reason)

    def warn(self, node: torch.fx.Node, reason: str) -> None:
        message = f"channels left unpruned: {reason}: {describe_node(node)}"
        self.messages.append(message)
        warnings.warn(FxPruneWarning(message), stacklevel=2)

    # --- the walk
    def run(self, ignore: Sequence[str]) -> Analysis:
        view = to_networkx(self.gm)
        for node in walk(view):
            self.current = node
            self.layouts[node.name] = self._visit(node)
            node.meta["fxprune_layout"] = self.layouts[node.name]
        for key in self.slot_order:
            module, _ = key
            if any(fnmatch.fnmatchcase(module, pat) for pat in ignore):
                self.frozen.setdefault(self.slot_layouts[key].groups[0], [])
                for gid in self.slot_layouts[key].groups:
                    self.frozen.setdefault(gid, []).append(f"ignored module {module}")
        return self._result()

    def _visit(self, node: torch.fx.Node) -> Optional[Layout]:
        if node.op in ("placeholder", "get_attr"):
            return None  # the model's inputs and parameters are never pruned
        if node.op == "output":
            self.freeze(node, [self.layout(n) for n in node.all_input_nodes], "reaches the model output")
            return None
        module = self.modules.get(str(node.target)) if node.op == "call_module" else None
        rule = lookup_rule(node, module)
        if rule is not None:
            return rule(self, node)
        if any(self.layout(n) is not None for n in node.all_input_nodes):
            what = f"module {node.target} ({type(module).__name__})" if module is not None else f"{node.op} {target_name(node)}"
            self.unsupported(node, f"no channel rule for {what}")
        return None

    def _result(self) -> Analysis:
        roots: Dict[int, int] = {}
        for gid in range(len(self.sizes)):
            roots.setdefault(self.union[gid], len(roots))
        reasons: Dict[int, List[str]] = {}
        for gid, why in self.frozen.items():
            reasons.setdefault(roots[self.union[gid]], []).extend(why)
        members: Dict[int, List[Member]] = {i: [] for i in roots.values()}
        slots: Dict[Tuple[str, str], Slot] = {}
        for key in self.slot_order:
            lay = self.slot_layouts[key]
            segments = tuple((roots[self.union[g]], s) for g, s in zip(lay.groups, lay.sizes))
            slots[key] = Slot(key[0], key[1], segments, int(lay.block or 1))
            offset = 0
            for idx, size in segments:
                members[idx].append(Member(key[0], key[1], offset, int(lay.block or 1)))
                offset += size
        for node in self.gm.graph.nodes:
            lay = self.layouts.get(node.name)
            if lay is not None:
                node.meta["fxprune_groups"] = tuple(roots[self.union[g]] for g in lay.groups)
        sizes = {roots[self.union[g]]: s for g, s in enumerate(self.sizes)}
        groups = []
        for idx in range(len(roots)):
            mems = members[idx]
            producers = [m.module for m in mems if m.role == "out"]
            key = producers[0] if producers else (f"{mems[0].module}:{mems[0].role}" if mems else f"tensor{idx}")
            why = tuple(dict.fromkeys(reasons.get(idx, [])))  # dedupe, keep order
            groups.append(Group(idx, key, sizes[idx], tuple(mems), bool(why), why))
        return Analysis(self.gm, groups, slots, list(self.messages))


def analyze(gm: torch.fx.GraphModule, *, ignore: Sequence[str] = (), strict: bool = False) -> Analysis:
    """Find the channel-coupled groups of ``gm``.

    Writes ``node.meta['fxprune_layout']`` on ``gm``'s nodes: pass a graph you own (the public
    :func:`fxprune.find_groups` does that for you).

    >>> import torchvision, fxprune
    >>> gm = fxprune.trace(torchvision.models.resnet18())
    >>> a = analyze(gm)
    >>> len(a.groups), sum(g.prunable for g in a.groups)
    (13, 11)
    """
    return _Engine(gm, strict).run(tuple(ignore))
