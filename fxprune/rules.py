"""The rule table: how each op moves channels.

A *layout* describes the channel dimension of one tensor in the graph: which channel groups it
is made of (in order: a ``cat`` concatenates them), which dimension holds them, and how many
features each channel owns along it (``block``: a flattened ``C x H x W`` map gives every
channel ``H*W`` consecutive features of the following Linear).

A *rule* is a function ``(ctx, node) -> Layout | None`` registered for a module type, a
function or a method name. It reads its inputs' layouts from ``ctx``, declares which module
parameters are indexed by which group (producer rows ``out``, consumer columns ``in``,
per-channel parameters ``channelwise``), ties groups together (``ctx.unify``) and returns the
layout of its output. An op with no rule is never guessed: the analysis freezes every group
it touches (or raises in strict mode). Extend the table with :func:`register_rule`.

Two kinds of "no" are kept apart. An op the table does not know is *unsupported*: a warning
(or :class:`fxprune.UnsupportedNodeError` in strict mode) and its groups are frozen. An op the
table knows but whose channels provably cannot be removed exactly (LayerNorm over the channel
dim, attention that mixes the embedding, a grouped conv with one channel per conv group) is
*frozen by design*: no warning, and the group lists the reason.

A third kind sits between them: an op the table knows whose rewrite it cannot express yet (a
literal channel count in ``expand``, a channel-sized parameter expression as an operand). The
rule *refuses* the node (:meth:`RuleContext.refuse`), so plan and apply always agree: its groups
are frozen, with a warning (strict mode: an error) unless they are frozen by design anyway.

*Argument rewrites*: a node whose arguments count channels (split sizes, ``chunk``, slice and
``narrow`` bounds, a view's literal channel count, the ``view(1, C, 1, 1)`` of a sliced
parameter, a depthwise functional conv's ``groups``) is rewritten, not refused. Its rule records
an :class:`ArgPatch` (:meth:`RuleContext.rewrite_args`): where the argument sits and what it is
in kept channels (:class:`ChannelCount`, :class:`Pieces`, :class:`Bounds`); the analysis
resolves the groups and leaves an :class:`ArgRewrite` in ``node.meta[ARG_REWRITE]``, and the
rewrite patches the NEW graph from the kept counts (:func:`fxprune.rewrite.apply_arg_rewrites`).

*Splits*: a split, chunk or slice of the channel dim cuts the input's groups at the piece
boundaries (:meth:`RuleContext.split`, the reverse of a ``cat``'s concatenated layout): each
piece carries its own groups, the producer's channels are their concatenation, and every
piece keeps at least one channel.
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Mapping, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

from .adapters import PLAIN_LAYER, adapter_for
from .errors import FxPruneError, InternalError
from .registry import Registry
from .layers import PrunedMultiheadAttention, window_attention

__all__ = [
    "Layout",
    "TupleLayout",
    "ARG_REWRITE",
    "ChannelCount",
    "EqualPerBlock",
    "WholeUnits",
    "Constraint",
    "Pieces",
    "Bounds",
    "ArgPatch",
    "ArgRewrite",
    "evaluate_arg",
    "RuleContext",
    "Rule",
    "register_rule",
    "lookup_rule",
    "RuleTable",
    "RULE_OPTIONS",
    "check_rule_options",
    "DEFAULT_RULES",
    "no_channels",
    "role_tensors",
    "LAYOUT_META",
    "CHANNELS_META",
    "channelwise_rule",
    "output_rank",
    "ELEMENTWISE_MODULES", "PAD_MODULES",
    "channel_operand",
    "pointwise_op_names",
    "elementwise_keys",
    "NON_ELEMENTWISE_ACTIVATIONS",
    "LAYER_NORM_MODULES",
]


@dataclass(frozen=True)
class Layout:
    """The channel dimension of one tensor.

    ``groups``/``sizes``: the channel groups it concatenates, in order, and their sizes (raw
    group ids; the analysis resolves unions). ``dim``: the channel dimension counted from the
    end (negative), so broadcasting operands align. ``rank``: the tensor's rank if known.
    ``block``: features per channel along ``dim`` (``None``: flattened, size still unknown).
    """

    groups: Tuple[int, ...]
    sizes: Tuple[int, ...]
    dim: int
    rank: Optional[int]
    block: Optional[int] = 1

    @property
    def channels(self) -> int:
        return sum(self.sizes)

    def absolute_dim(self) -> Optional[int]:
        return None if self.rank is None else self.rank + self.dim

    def with_dim(self, abs_dim: int, rank: int) -> "Layout":
        return replace(self, dim=abs_dim - rank, rank=rank)


@dataclass(frozen=True)
class TupleLayout:
    """The layouts of the elements of a tuple-valued node (``chunk``, ``split``, an attention
    module's ``(output, weights)``), read back by ``getitem``.

    ``items``: the layout of each index; ``default``: the layout of any other index (``chunk``
    into a number of pieces known only at run time gives every piece the same layout).
    """

    items: Tuple[Optional[Layout], ...] = ()
    default: Optional[Layout] = None

    def get(self, index: int) -> Optional[Layout]:
        if -len(self.items) <= index < len(self.items):
            return self.items[index]
        return self.default

    def layouts(self) -> List[Layout]:
        """Every layout the tuple carries (what must be frozen if it is consumed whole)."""
        found = [lay for lay in self.items if lay is not None]
        return found + ([self.default] if self.default is not None else [])


# --------------------------------------------------------------------------- argument rewrites

# node.meta key of the :class:`ArgRewrite` the analysis resolved for a node (final group indices).
ARG_REWRITE = "fxprune_args"
#: node.meta key of a node's :class:`Layout` (after the analysis: in final group indices, one
#: entry per segment; ``layout.groups`` is the one record of which groups a tensor holds).
LAYOUT_META = "fxprune_layout"
#: node.meta key, in a pruned graph, of the channels a node's tensor keeps (``layout.channels`` after the rewrite).
CHANNELS_META = "fxprune_channels"


@dataclass(frozen=True)
class ChannelCount:
    """An int argument that counts channels: ``block`` times the kept channels of ``groups``.

    A rule builds it from a layout (raw group ids; the analysis resolves them to final groups,
    a group cut by a split into several). Repeats count twice (``cat([a, a])``). ``per``: the
    argument counts units of that many channels instead (GroupNorm's ``num_groups``, a head
    count); the groups then keep whole units (:class:`WholeUnits`), so the division is exact.
    """

    groups: Tuple[int, ...]
    block: int = 1
    per: int = 1

    @classmethod
    def of(cls, layouts: Sequence[Layout], block: int = 1) -> "ChannelCount":
        return cls(tuple(g for lay in layouts for g in lay.groups), block)

    def evaluate(self, counts: Mapping[int, int]) -> int:
        total = self.block * sum(counts[g] for g in self.groups)
        return total if self.per == 1 else total // self.per


# --------------------------------------------------------------------------- group constraints
#
# What a rule may demand of a group's channels beyond "any subset" (RuleContext.require). The
# analysis resolves every demand on a final group into one constraint (fxprune.groups), which
# the planner and the rewrite apply along one code path.


@dataclass(frozen=True)
class EqualPerBlock:
    """The channels form ``blocks`` equal consecutive blocks that each keep the same count.

    What a grouped convolution of ``blocks`` conv groups demands of its input and output groups.
    """

    blocks: int


@dataclass(frozen=True)
class WholeUnits:
    """The channels come in consecutive units of ``size``, each kept or removed whole.

    What a GroupNorm demands of its input (a unit is one of its groups: each group's statistics
    are its own, so removing a whole group leaves the others exact) and what attention heads
    are. The kept count is a multiple of ``size``; at least one unit is kept.
    """

    size: int


Constraint = Union[EqualPerBlock, WholeUnits]


def _chunk_sizes(total: int, chunks: int) -> List[int]:
    """The piece sizes ``torch.chunk`` gives (ceil-sized pieces, possibly fewer than asked)."""
    if total <= 0 or chunks <= 0:
        return []
    each = -(-total // chunks)
    return [min(each, total - start) for start in range(0, total, each)]


def _split_sizes(total: int, size: int) -> List[int]:
    return [min(size, total - start) for start in range(0, total, size)] if size > 0 else []


def _tensor_split_sizes(total: int, sections: int) -> List[int]:
    each, extra = divmod(total, sections)
    return [each + (i < extra) for i in range(sections)] if sections > 0 else []


@dataclass(frozen=True)
class Pieces:
    """The piece-size argument of a channel ``split`` / ``chunk`` / ``tensor_split``.

    ``counts``: each piece's channels. ``original``: the argument as written; it is kept where
    it still describes the pieces (equal pieces of ``chunk(n)``), else the explicit form is
    written: split sizes (``chunk`` becomes ``split``, see :attr:`ArgRewrite.target`) or, for
    ``tensor_split``, the cut indices.
    """

    counts: Tuple[ChannelCount, ...]
    form: str  # "chunk" | "split" | "tensor_split"
    original: Any

    def evaluate(self, counts: Mapping[int, int]) -> Any:
        sizes = [c.evaluate(counts) for c in self.counts]
        total = sum(sizes)
        if isinstance(self.original, int) and not isinstance(self.original, bool):
            implied = {"chunk": _chunk_sizes, "split": _split_sizes, "tensor_split": _tensor_split_sizes}[self.form]
            if implied(total, self.original) == sizes:
                return self.original
        out = sizes
        if self.form == "tensor_split":
            out, at = [], 0
            for size in sizes[:-1]:
                at += size
                out.append(at)
        # A tuple stays a tuple: an argument that did not change is then left as written.
        return tuple(out) if isinstance(self.original, tuple) else out


@dataclass(frozen=True)
class Bounds:
    """A slice along the channel dim: each bound an int or None kept as written, or a count."""

    start: Any
    stop: Any
    step: Any = None

    def evaluate(self, counts: Mapping[int, int]) -> slice:
        return slice(evaluate_arg(self.start, counts), evaluate_arg(self.stop, counts), self.step)


def evaluate_arg(value: Any, counts: Mapping[int, int]) -> Any:
    """The argument ``value`` stands for when group ``g`` keeps ``counts[g]`` channels."""
    if isinstance(value, (ChannelCount, Pieces, Bounds)):
        return value.evaluate(counts)
    return value


def _map_value(value: Any, fn: Callable[[Tuple[int, ...]], Tuple[int, ...]]) -> Any:
    if isinstance(value, ChannelCount):
        return replace(value, groups=fn(value.groups))
    if isinstance(value, Pieces):
        return replace(value, counts=tuple(_map_value(c, fn) for c in value.counts))
    if isinstance(value, Bounds):
        return Bounds(_map_value(value.start, fn), _map_value(value.stop, fn), value.step)
    return value


@dataclass(frozen=True)
class ArgPatch:
    """One argument of a node that follows the kept channels.

    ``path``: where it sits: ``(1,)`` is ``args[1]``, ``("dim",)`` is ``kwargs["dim"]``, and
    further entries index into a list or tuple there (``(1, 2)``: ``args[1][2]``, a view size
    or the slice of one dim in an index). ``value``: a :class:`ChannelCount`, :class:`Pieces` or
    :class:`Bounds`, evaluated on the kept counts by the rewrite.
    """

    path: Tuple[Union[int, str], ...]
    value: Any


@dataclass(frozen=True)
class ArgRewrite:
    """How a node's arguments change with the kept channels; applied to the NEW graph only.

    ``target``: the node's new target if any patch changes its argument (``chunk`` whose
    pieces become unequal turns into ``split``; both take the same arguments in the same
    places). A patch whose path is one keyword the node does not pass adds it (torchvision's
    window attention becomes fxprune's, which also takes ``head_dim``). A rule that cannot express a node's rewrite this way refuses the node instead,
    so plan and apply always agree.
    """

    patches: Tuple[ArgPatch, ...]
    target: Any = None

    def map_groups(self, fn: Callable[[Tuple[int, ...]], Tuple[int, ...]]) -> "ArgRewrite":
        """The same rewrite with group ids mapped (raw ids to final groups)."""
        return replace(self, patches=tuple(ArgPatch(p.path, _map_value(p.value, fn)) for p in self.patches))


class RuleContext(Protocol):
    """What a rule may ask of the analysis (implemented in :mod:`fxprune.groups`)."""

    rules: "RuleTable"  # the table this analysis looks rules up in

    def layout(self, arg: Any) -> Optional[Layout]: ...

    def module(self, node: torch.fx.Node) -> nn.Module: ...

    def shape(self, arg: Any) -> Optional[torch.Size]: ...

    def rank(self, arg: Any) -> Optional[int]: ...

    def tensor_member(self, node: torch.fx.Node, operand: torch.fx.Node, dim: int, layout: Layout,
                      role: str = "operand", kind: str = "operand", conv_groups: int = 1,
                      via: Sequence[torch.fx.Node] = (), per: int = 1) -> None: ...

    def produce(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int], tag: str = "") -> Layout: ...

    def member(self, node: torch.fx.Node, role: str, layout: Layout) -> None: ...

    def unify(self, node: torch.fx.Node, layouts: Sequence[Layout]) -> Optional[Layout]: ...

    def freeze(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str) -> None: ...

    def unsupported(self, node: torch.fx.Node, reason: str, hint: Optional[str] = None) -> None: ...

    def warn(self, node: torch.fx.Node, reason: str) -> None: ...

    def refuse(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str,
               hint: Optional[str] = None) -> None: ...

    def opaque(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout: ...

    def elements(self, arg: Any) -> Optional[TupleLayout]: ...

    def require_blocks(self, node: torch.fx.Node, layout: Layout, blocks: int, reason: str) -> None: ...

    def require(self, node: torch.fx.Node, layout: Layout, constraint: "Constraint", reason: str) -> None: ...

    def split(self, node: torch.fx.Node, layout: Layout, sizes: Sequence[int]) -> List[Layout]: ...

    def rewrite_args(self, node: torch.fx.Node, patch: ArgPatch, target: Any = None) -> None: ...

    def renormalise(self, node: torch.fx.Node, layout: Layout, what: str) -> None: ...

    def option(self, name: str) -> str:
        """The rule table's value of the option ``name`` (:data:`RULE_OPTIONS`)."""
        ...

    def claim(self, node: torch.fx.Node, region: Sequence[torch.fx.Node], exits: Dict[str, Layout],
              ties: Optional[Dict[str, Layout]] = None) -> None: ...


RuleResult = Union[Layout, TupleLayout, None]
Rule = Callable[[RuleContext, torch.fx.Node], RuleResult]
RuleKey = Union[type, Callable[..., Any], str]

# The choices a rule table carries beside its rules (:meth:`RuleTable.with_options`), each with
# its allowed values, the default first. They change which groups an analysis finds, so a plan
# records the ones that differ from the default and apply analyses with them.
RULE_OPTIONS: Dict[str, Tuple[str, ...]] = {
    # "heads": attention blocks lose whole heads (head_dim stays); "head_dim": every head keeps
    # the same dims of q and k (and of v), the head count stays. Blocks the head_dim rules do
    # not cover prune whole heads either way.
    "attention": ("heads", "head_dim"),
}


def check_rule_options(options: Any) -> Dict[str, str]:
    """``options`` checked against :data:`RULE_OPTIONS`: known names, allowed values (else FxPruneError).

    >>> check_rule_options({"attention": "head_dim"})
    {'attention': 'head_dim'}
    >>> check_rule_options({"attention": "rows"})
    Traceback (most recent call last):
    ...
    fxprune.errors.FxPruneError: rule option attention='rows' is not one of ['heads', 'head_dim']
    """
    if not isinstance(options, Mapping):
        raise FxPruneError(f"rule_options must be an object of option names and values, got {type(options).__name__}")
    checked: Dict[str, str] = {}
    for name, value in options.items():
        if name not in RULE_OPTIONS:
            raise FxPruneError(f"unknown rule option {name!r}; the options are {sorted(RULE_OPTIONS)}")
        if value not in RULE_OPTIONS[name]:
            raise FxPruneError(f"rule option {name}={value!r} is not one of {list(RULE_OPTIONS[name])}")
        checked[name] = value
    return checked


class RuleTable:
    """The rule table as an object: module types, functions and method names -> :data:`Rule`.

    Three registries, because fx names the op differently per node kind: ``call_module`` by
    module type (exact type: a subclass may override forward), ``call_function`` by the
    function object, ``call_method`` by the method name. :data:`DEFAULT_RULES` is the table
    fxprune ships (and :func:`register_rule` writes to); :meth:`extended` layers extra or
    overriding rules over a table without touching it, for one ``analyze``/``prune`` call:

    >>> def double(x):
    ...     return 2 * x
    >>> table = DEFAULT_RULES.extended({double: lambda ctx, node: ctx.layout(node.args[0])})
    >>> double in table, double in DEFAULT_RULES
    (True, False)
    >>> torch.relu in table  # everything else falls back to the default table
    True
    """

    def __init__(self, parent: Optional["RuleTable"] = None, options: Optional[Mapping[str, str]] = None) -> None:
        self.parent = parent
        self.own_options: Dict[str, str] = check_rule_options(options or {})
        self.modules: Registry[type, Rule] = Registry("module rules", parent=parent.modules if parent else None)
        self.functions: Registry[Any, Rule] = Registry("function rules", parent=parent.functions if parent else None)
        self.methods: Registry[str, Rule] = Registry("method rules", parent=parent.methods if parent else None)

    def _registry(self, key: RuleKey) -> Registry[Any, Rule]:
        if isinstance(key, str):
            return self.methods
        if isinstance(key, type) and issubclass(key, nn.Module):
            return self.modules
        if callable(key):
            return self.functions
        raise TypeError(f"cannot register a rule for {key!r}")

    def register(self, *keys: RuleKey) -> Callable[[Rule], Rule]:
        """Decorator: register the rule for module types, functions and/or method names (strings)."""
        registries = [self._registry(key) for key in keys]  # a bad key fails before any write

        def decorate(rule: Rule) -> Rule:
            for key, registry in zip(keys, registries):
                registry.own[key] = rule
            return rule

        return decorate

    def extended(self, rules: Union[Mapping[RuleKey, Rule], Iterable[Tuple[RuleKey, Rule]], None] = None) -> "RuleTable":
        """A NEW table with ``rules`` (key -> rule) added or overriding; this one is unchanged."""
        child = RuleTable(parent=self)
        for key, rule in (rules.items() if isinstance(rules, Mapping) else (rules or ())):
            child.register(key)(rule)
        return child

    def with_options(self, **options: str) -> "RuleTable":
        """A NEW table with the same rules and these :data:`RULE_OPTIONS` set; this one is unchanged.

        >>> table = DEFAULT_RULES.with_options(attention="head_dim")
        >>> table.option("attention"), DEFAULT_RULES.option("attention")
        ('head_dim', 'heads')
        >>> table.changed_options()
        {'attention': 'head_dim'}
        >>> DEFAULT_RULES.with_options(attention="rows")
        Traceback (most recent call last):
        ...
        fxprune.errors.FxPruneError: rule option attention='rows' is not one of ['heads', 'head_dim']
        """
        return RuleTable(parent=self, options=options)

    def option(self, name: str) -> str:
        """The value of the rule option ``name`` (see :data:`RULE_OPTIONS`) in this table."""
        if name not in RULE_OPTIONS:
            raise InternalError(f"a rule asked for unknown option {name!r}")
        return self.set_options().get(name, RULE_OPTIONS[name][0])

    def set_options(self) -> Dict[str, str]:
        """The options this table or a parent sets, default values included (what it asks for)."""
        chain: List[RuleTable] = []
        table: Optional[RuleTable] = self
        while table is not None:
            chain.append(table)
            table = table.parent
        found: Dict[str, str] = {}
        for table in reversed(chain):
            found.update(table.own_options)
        return found

    def changed_options(self) -> Dict[str, str]:
        """The options whose value is not the default (what a plan records)."""
        asked = self.set_options()
        return {name: asked[name] for name in RULE_OPTIONS if asked.get(name, RULE_OPTIONS[name][0]) != RULE_OPTIONS[name][0]}

    def __contains__(self, key: Any) -> bool:
        try:
            return key in self._registry(key)
        except TypeError:
            return False

    def items(self) -> List[Tuple[RuleKey, Rule]]:
        """Every key and its rule: functions, then method names, then module types."""
        return list(self.functions.items()) + list(self.methods.items()) + list(self.modules.items())

    def lookup(self, node: torch.fx.Node, module: Optional[nn.Module]) -> Optional[Rule]:
        """The rule for ``node`` (``module``: the module a ``call_module`` node calls) or None."""
        if node.op == "call_module":
            rule = self.modules.get(type(module))
            if rule is None:
                # A layer taught by fxprune.register_layer: its adapter's rule, or the
                # pass-through rule of a layer whose only tensors are per channel.
                adapter = adapter_for(module)
                if adapter is not None:
                    derived = adapter.derives_rule and set(adapter.roles) == {"channelwise"}
                    rule = adapter.rule or (channelwise_rule if derived else None)
            return rule
        if node.op == "call_function":
            return self.functions.get(node.target)  # an unhashable target has no rule
        if node.op == "call_method":
            return self.methods.get(str(node.target))
        return None

    def __repr__(self) -> str:
        changed = "".join(f", {k}={v}" for k, v in self.changed_options().items())
        return (f"<RuleTable: {len(self.modules)} module, {len(self.functions)} function, {len(self.methods)} method "
                f"rules{', extended' if self.parent is not None else ''}{changed}>")


DEFAULT_RULES = RuleTable()
"""The table fxprune ships with; :func:`register_rule` adds to it."""

# The default table's own entries, under the names older code reads.
_MODULE_RULES: Dict[type, Rule] = DEFAULT_RULES.modules.own
_FUNCTION_RULES: Dict[Any, Rule] = DEFAULT_RULES.functions.own
_METHOD_RULES: Dict[str, Rule] = DEFAULT_RULES.methods.own


def register_rule(*keys: RuleKey) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module types, functions and/or method names (strings), in :data:`DEFAULT_RULES`.

    A rule receives the analysis context and the fx node and returns the output's layout.
    A registration here is global (every later analysis sees it); to teach fxprune an op for
    one call only, pass ``rules=DEFAULT_RULES.extended({key: rule})`` to
    :func:`fxprune.prune` / :func:`fxprune.plan` / :func:`fxprune.find_groups`.
    Example: teach fxprune that a custom leaf module is element-wise (channels pass through)::

        @fxprune.register_rule(MyScaledReLU)
        def _(ctx, node):
            return ctx.layout(node.args[0])
    """
    return DEFAULT_RULES.register(*keys)


def no_channels(rule: Rule) -> Rule:
    """Mark ``rule`` as answering with something that carries no channels (a shape, a dtype).

    The analysis treats any other rule that returns no layout for an input that has one as a
    lost track of channels and freezes that input (fail closed); marked rules are exempt.
    """
    rule.fxprune_no_channels = True  # type: ignore[attr-defined]
    return rule


def lookup_rule(node: torch.fx.Node, module: Optional[nn.Module], rules: Optional[RuleTable] = None) -> Optional[Rule]:
    """The rule for ``node`` in ``rules`` (default :data:`DEFAULT_RULES`) or None (unknown op)."""
    return (rules if rules is not None else DEFAULT_RULES).lookup(node, module)


# --------------------------------------------------------------------------- helpers


def _arg(node: torch.fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(node.args) > index:
        return node.args[index]
    return node.kwargs.get(name, default)


def _first_layout(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    return ctx.layout(node.args[0]) if node.args else ctx.layout(node.kwargs.get("input"))


def _normalize_dims(dims: Any, rank: Optional[int]) -> Optional[List[int]]:
    """Dims as negative indices, or None if they cannot be resolved without the rank."""
    if isinstance(dims, int):
        dims = [dims]
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        return None
    out = []
    for d in dims:
        if d < 0:
            out.append(d)
        elif rank is None:
            return None
        else:
            out.append(d - rank)
    return out


# --------------------------------------------------------------------------- element-wise

ELEMENTWISE_MODULES: Tuple[type, ...] = (
    nn.ReLU, nn.ReLU6, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Hardswish, nn.Hardsigmoid, nn.Tanh,
    nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout, nn.Identity,
    nn.LeakyReLU, nn.ELU, nn.CELU, nn.SELU, nn.Mish, nn.Hardtanh, nn.Softplus, nn.Softsign,
    nn.Tanhshrink, nn.LogSigmoid,
)

_ELEMENTWISE_FUNCTIONS: Tuple[Any, ...] = (
    F.relu, F.relu_, torch.relu, torch.relu_, F.relu6, F.gelu, F.silu, torch.sigmoid, F.sigmoid,
    F.hardswish, F.hardsigmoid, torch.tanh, F.tanh, F.dropout, F.dropout1d, F.dropout2d,
    F.dropout3d, F.alpha_dropout, F.leaky_relu, F.elu, F.celu, F.selu, F.mish, F.hardtanh,
    F.softplus, torch.clamp, torch.clip, torch.abs, torch.exp, torch.neg, operator.neg,
    torch.square, torch.sqrt, torch.rsqrt, torch.erf, F.logsigmoid, torch.nn.functional.hardtanh_,
)

_ELEMENTWISE_METHODS: Tuple[str, ...] = (
    "relu", "relu_", "sigmoid", "sigmoid_", "tanh", "tanh_", "clamp", "clamp_", "clip",
    "clip_", "abs", "exp", "neg", "square", "sqrt", "rsqrt", "contiguous", "clone", "detach",
    "float", "half", "bfloat16", "double", "to", "type_as", "erf",
)


# Conversions whose other arguments say only which dtype/device to take (``x.to(y)``,
# ``x.type_as(y)``): those are read, never broadcast against ``x``.
_CONVERSIONS = frozenset({"to", "type_as", "float", "half", "bfloat16", "double", "contiguous", "clone", "detach"})


@register_rule(*sorted(_CONVERSIONS))
@no_channels
def _conversion(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``x.to(y)``, ``x.type_as(y)``, ``x.float()``...: ``x``'s channels pass through untouched.

    ``y`` gives only a dtype or device, so its channels flow nowhere: an untracked ``x`` cast
    like a pruned tensor (YOLO's anchors ``type_as`` a feature map) loses no channels.
    """
    return ctx.layout(node.args[0] if node.args else node.kwargs.get("input"))


@register_rule(*ELEMENTWISE_MODULES, *_ELEMENTWISE_FUNCTIONS, *(m for m in _ELEMENTWISE_METHODS if m not in _CONVERSIONS))
def _elementwise(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # The channel passes through untouched. A tensor among the other arguments (clamp's
    # min/max, given positionally or by keyword) is a broadcast operand like a binary op's.
    first = node.args[0] if node.args else node.kwargs.get("input")
    extras = [a for a in list(node.args[1:]) + [v for k, v in node.kwargs.items() if k != "input"]
              if isinstance(a, torch.fx.Node)]
    if not extras:
        return ctx.layout(first)
    return _broadcast(ctx, node, [first] + extras)


# Shape queries read a tensor without moving its channels: after pruning they simply answer
# with the new sizes, which is what the code that asked wants.
@register_rule("size", "dim", "numel", builtins.getattr)
@no_channels
def _shape_query(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    if node.target is builtins.getattr and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
        if ctx.layout(node.args[0]) is not None:
            ctx.unsupported(node, f"attribute {node.args[1]!r} of a pruned tensor")
        return None
    return None


# ``x.new_full(size, v)`` and its siblings read only ``x``'s dtype and device: the result's size
# and values come from the other arguments, so no channel of ``x`` flows into it (YOLO's anchors).
@register_rule("new_full", "new_zeros", "new_ones", "new_empty")
@no_channels
def _new_tensor(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    return None


# --------------------------------------------------------------------------- binary


# Keyword arguments of broadcasting ops that are never a tensor operand.
_SCALAR_KWARGS = frozenset({"alpha", "out", "rounding_mode"})


def _operands(node: torch.fx.Node) -> List[Any]:
    """Every argument of an element-wise op that may be a tensor, positional or keyword."""
    return list(node.args) + [v for k, v in node.kwargs.items() if k not in _SCALAR_KWARGS]


def _parameters_only(node: torch.fx.Node) -> bool:
    """True if ``node`` is computed from parameters and constants alone (no model input)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n.name in seen:
            continue
        seen.add(n.name)
        if n.op == "placeholder":
            return False
        todo.extend(n.all_input_nodes)
    return True


def _broadcast(ctx: RuleContext, node: torch.fx.Node, operands: Sequence[Any]) -> Optional[Layout]:
    """The output layout of an element-wise op over broadcast ``operands`` (tensors or scalars).

    Operands with channels tie their groups. Every other tensor operand is checked, never
    assumed harmless: one that broadcasts along the channel dim (size 1 there, or too few
    dims to reach it) is fine; a parameter or buffer read directly (``get_attr``) with exactly
    the channels of the result is sliced with them (a per-channel scale, bias or bound); a
    parameter expression with channels of its own cannot be sliced today, so the node is
    refused (a warning, or an error in strict mode, unless the channels are frozen by design
    anyway); anything else with channels of its own (the model input, an untracked tensor)
    pins them (frozen by design).
    """
    layouts: List[Layout] = []
    unknown: List[torch.fx.Node] = []
    for op in operands:
        if isinstance(op, torch.fx.Node):
            lay = ctx.layout(op)
            if lay is None:
                unknown.append(op)
            else:
                layouts.append(lay)
    if not layouts:
        return None
    # Operands with one channel broadcast along the channel dim: they tie nothing.
    wide = [lay for lay in layouts if lay.channels > 1] or layouts[:1]
    result = ctx.unify(node, wide)
    if result is None:
        return None
    ranks: List[Optional[int]] = [lay.rank for lay in layouts]
    for op in unknown:
        shape = ctx.shape(op)
        if shape is None:
            # Its channel structure is unknown (no shapes were recorded): fail closed.
            if _parameters_only(op):
                ctx.refuse(node, [result], f"operand {op.name} is a parameter expression of unknown shape",
                           "pass example_inputs so shapes can be propagated")
            else:
                ctx.freeze(node, [result], f"operand {op.name} of unknown channel structure")
            return result
        ranks.append(len(shape))
        pos = len(shape) + result.dim
        if pos < 0 or shape[pos] == 1:
            continue  # broadcasts along the channel dim
        if op.op == "get_attr" and result.block == 1 and shape[pos] == result.channels:
            ctx.tensor_member(node, op, pos, result)
            continue
        if result.block == 1 and shape[pos] == result.channels and channel_operand(ctx, node, op, result):
            continue  # a per-channel expression of parameters (a cast or size-1 view of one, ...)
        if _parameters_only(op):
            ctx.refuse(node, [result], f"operand {op.name} of shape {tuple(shape)} is a parameter expression with "
                                       f"{shape[pos]} channels of its own, which this rule cannot slice",
                       "read the parameter directly in its broadcast shape (e.g. a 1 x C x 1 x 1 nn.Parameter) so it can be sliced")
        else:
            ctx.freeze(node, [result], f"operand {op.name} has {shape[pos]} channels of its own")
        return result
    rank = None if any(r is None for r in ranks) else max(ranks)  # type: ignore[type-var]
    return replace(result, rank=rank)


@register_rule(
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, operator.pow, operator.ipow, operator.floordiv, operator.ifloordiv,
    operator.mod, operator.imod, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum, torch.fmax, torch.fmin,
    operator.gt, operator.ge, operator.lt, operator.le, operator.eq, operator.ne,
    torch.gt, torch.ge, torch.lt, torch.le, torch.eq, torch.ne,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "maximum", "minimum",
    "gt", "ge", "lt", "le", "eq", "ne",
)
def _binary(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    return _broadcast(ctx, node, _operands(node))


@register_rule(torch.where, "where")
def _where(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # where(condition, input, other) selects element-wise between broadcast operands;
    # where(condition) alone is nonzero(): indices, not channels.
    if node.op == "call_function" and len(node.args) + len(node.kwargs) < 2:
        if any(ctx.layout(a) is not None for a in node.all_input_nodes):
            ctx.unsupported(node, "where(condition) returns indices of a channel-carrying tensor")
        return None
    return _broadcast(ctx, node, _operands(node))


# --------------------------------------------------------------------------- concat


@register_rule(torch.cat, torch.concat, torch.concatenate)
def _cat(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)):
        ctx.unsupported(node, "cat of a non-list argument")
        return None
    layouts = [ctx.layout(t) for t in tensors]
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return None
    ref = known[0]
    cat_dim = _normalize_dims(dim, ref.rank)
    if cat_dim is None:
        ctx.unsupported(node, "cat along a dimension that cannot be resolved without shapes")
        return None
    if cat_dim[0] != ref.dim:
        # Concatenating along another dim: all operands share channels.
        if len(known) != len(layouts):
            if all(lay is not None or _expanded_parameter(ctx, node, t, ref) for t, lay in zip(tensors, layouts)):
                return ctx.unify(node, known)
            ctx.freeze(node, known, "cat with an operand of unknown channel structure")
            return ref
        return ctx.unify(node, known)
    groups: List[int] = []
    sizes: List[int] = []
    for t, lay in zip(tensors, layouts):
        if lay is None:
            shape = ctx.shape(t)
            if shape is None:
                ctx.unsupported(node, f"cat with operand {getattr(t, 'name', t)} of unknown channel count")
                return None
            lay = ctx.opaque(node, int(shape[len(shape) + ref.dim]), ref.dim, ref.rank)
        # Flattened maps of one size (each channel ``block`` features: fc(cat(a.flatten(1),
        # b.flatten(1)))) concatenate channel by channel like maps do; of different sizes, one
        # layout cannot say where each channel's features sit, and the channels stay whole.
        if lay.dim != ref.dim or lay.block is None or lay.block != ref.block:
            ctx.unsupported(node, "cat of operands whose channel dims differ")
            return None
        groups.extend(lay.groups)
        sizes.extend(lay.sizes)
    return Layout(tuple(groups), tuple(sizes), ref.dim, ref.rank, ref.block)


@register_rule(torch.stack)
def _stack(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``torch.stack(tensors, dim)`` (and ``aten.stack``): same-shaped operands along a NEW dim.

    Every operand's channels sit at the same positions of every slice of the new dim, so the
    operands share channels (one group, as for a ``cat`` along another dim) and the output's
    channel dim is the input's, shifted by one where the new dim goes before it.
    """
    tensors = node.args[0] if node.args else node.kwargs.get("tensors")
    dim = _arg(node, 1, "dim", 0)
    if not isinstance(tensors, (list, tuple)) or not isinstance(dim, int):
        ctx.unsupported(node, "stack of a non-list argument or along a dim unknown before run time")
        return None
    layouts = [ctx.layout(t) for t in tensors]
    known = [lay for lay in layouts if lay is not None]
    if not known:
        return None
    if len(known) != len(layouts):
        # An untracked operand keeps its channels: the tracked ones must keep theirs too.
        ctx.freeze(node, known, "stack with an operand of unknown channel structure")
        return None
    shared = ctx.unify(node, known)
    if shared is None:
        return None
    rank = shared.rank if shared.rank is not None else ctx.rank(tensors[0])
    out_rank = None if rank is None else rank + 1
    if dim >= 0:
        if out_rank is None:
            ctx.unsupported(node, "stack along a non-negative dim of a tensor whose rank is unknown (pass example_inputs)")
            return None
        dim -= out_rank
    if not (out_rank is None or -out_rank <= dim < 0):
        ctx.unsupported(node, f"stack along dim {dim} out of range")
        return None
    # Counted from the end: dims after the new one keep their place, dims before it move one
    # further from the end.
    moved = shared.dim if shared.dim > dim else shared.dim - 1
    return replace(shared, dim=moved, rank=out_rank)
def _expanded_parameter(ctx: RuleContext, node: torch.fx.Node, arg: Any, ref: Layout) -> bool:
    """Declare ``arg`` a parameter whose channels are ``ref``'s, expanded over the other dims, if it is one.

    ViT's class token: ``cat([self.cls_token.expand(B, -1, -1), x], dim=1)`` concatenates along
    the tokens a ``[1, 1, C]`` parameter whose channel dim the expand leaves as it is (``-1``).
    It becomes a tensor slot sliced with the channels (an ``operand``: a removed channel's entry
    only ever meets removed channels). Anything else: False (the caller freezes).
    """
    if not isinstance(arg, torch.fx.Node) or arg.op != "call_method" or arg.target != "expand" or not arg.args:
        return False
    param = arg.args[0]
    sizes = list(arg.args[1] if len(arg.args) == 2 and isinstance(arg.args[1], (list, tuple)) else arg.args[1:])
    shape = ctx.shape(param) if isinstance(param, torch.fx.Node) else None
    if not isinstance(param, torch.fx.Node) or param.op != "get_attr" or shape is None or ref.rank is None \
            or len(shape) != ref.rank or len(sizes) != ref.rank or ref.block != 1:
        return False
    c = ref.rank + ref.dim
    if shape[c] != ref.channels or sizes[c] != -1 or len(param.users) != 1:
        return False
    ctx.tensor_member(node, param, c, ref, via=[arg])
    return True


# --------------------------------------------------------------------------- convolution


def _conv_rank(ctx: RuleContext, node: torch.fx.Node, spatial: int, inp: Optional[Layout]) -> Optional[int]:
    shape = ctx.shape(node)
    if shape is not None:
        return len(shape)
    if inp is not None and inp.rank is not None:
        return inp.rank
    return spatial + 2  # batched input is the norm; example_inputs let ShapeProp confirm it




def role_tensors(module: nn.Module) -> Dict[str, Tuple[Tuple[str, int], ...]]:
    """``{role: ((tensor name, dim), ...)}``: where each role's positions sit in ``module``.

    Read from the layer's adapter (a built-in layer's, or one taught by :func:`fxprune.register_layer`;
    :data:`fxprune.adapters.PLAIN_LAYER`'s conv-like weight and bias for a layer without one).
    """
    adapter = adapter_for(module) or PLAIN_LAYER
    return {role: tuple(pairs) for role, pairs in adapter.roles.items()}


def channelwise_rule(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """The rule of a layer with one tensor entry per channel (``y[c] = f(x[c], p[c])``): channels pass
    through, its tensors are ``channelwise`` members of the input's group. The derived rule of a
    :func:`fxprune.register_layer` layer whose only role is ``channelwise``.

    Its tensors must have one entry per channel position of the input, one position per channel;
    anything else is not this layer's physics, and the channels stay whole with a warning.
    """
    layout = _first_layout(ctx, node)
    if layout is None:
        return None
    module = ctx.module(node) if node.op == "call_module" else None
    adapter = adapter_for(module)
    if adapter is not None:
        sizes = adapter.counts_of(module, "channelwise")
        if layout.block != 1 or any(s != layout.channels for s in sizes):
            ctx.unsupported(node, f"{type(module).__name__}'s per-channel tensors have {sizes} entries, its input "
                                  f"{layout.channels} channels of {layout.block} positions",
                            "register the layer with rule= to say how its tensors follow the channels")
            return None
    ctx.member(node, "channelwise", layout)
    return layout


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
def _conv(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """A conv or transposed conv: reads its input's channels, produces ``out_channels``.

    The two kinds have the same channel roles; which weight dim a role indexes (a transposed
    conv stores ``[Cin, Cout/G, *k]``) is the rewrite's and the scores' business.
    """
    conv = ctx.module(node)
    assert isinstance(conv, nn.modules.conv._ConvNd)
    spatial = len(conv.kernel_size)
    inp = _first_layout(ctx, node)
    rank = _conv_rank(ctx, node, spatial, inp)
    dim = -(spatial + 1)
    if inp is not None and (inp.dim != dim or not isinstance(inp.block, int)
                            or inp.channels * inp.block != conv.in_channels):
        ctx.unsupported(node, "convolution input whose channel dim does not match the layer")
        return None
    if conv.groups == 1:
        if inp is not None:
            # Each channel of the input owns ``inp.block`` consecutive input columns (after a
            # depthwise conv with a channel multiplier): they are sliced together.
            ctx.member(node, "in", inp)
        out = ctx.produce(node, conv.out_channels, dim, rank)
        ctx.member(node, "out", out)
        return out
    multiplier = conv.out_channels // conv.in_channels
    if conv.groups == conv.in_channels and inp is not None and conv.out_channels == multiplier * conv.in_channels \
            and (multiplier == 1 or not conv.transposed):
        # Depthwise: output channels [c*k, (c+1)*k) read only input channel c (k: the channel
        # multiplier, out_channels / in_channels), so the layer is a per-channel op and its
        # channels belong to the input's groups, k output channels per input channel. Removing
        # an input channel removes its k outputs; the multiplier stays.
        out = replace(inp, rank=rank, block=inp.block * multiplier)
        ctx.member(node, "channelwise", out)
        return out
    if inp is not None and inp.block != 1:
        ctx.unsupported(node, f"grouped convolution {node.target} (groups={conv.groups}) reading channels of "
                              f"{inp.block} positions each")
        return None
    if conv.transposed:
        # Not modelled (no model we test has one): left whole, with the reason.
        out = ctx.produce(node, conv.out_channels, dim, rank)
        ctx.freeze(node, [inp, out], f"grouped transposed convolution {node.target} (groups={conv.groups})")
        return out
    return _grouped_conv(ctx, node, conv, inp, dim, rank)


def _grouped_conv(ctx: RuleContext, node: torch.fx.Node, conv: nn.modules.conv._ConvNd,
                  inp: Optional[Layout], dim: int, rank: Optional[int]) -> Layout:
    """A conv with ``groups`` G > 1 that is not a plain depthwise one.

    Conv group g maps input channels ``[g*Cin/G, (g+1)*Cin/G)`` to output channels
    ``[g*Cout/G, (g+1)*Cout/G)``. Removing channels keeps the layer a valid grouped conv only if
    every conv group loses the same number of inputs and the same number of outputs, so both
    sides become *blocked* groups: G equal blocks that must each keep the same count (the input
    and output counts stay independent). A group of one channel per block cannot shrink and is
    frozen by the analysis; that covers a depthwise conv whose input is not tracked.
    """
    what = f"grouped convolution {node.target} (groups={conv.groups})"
    out = ctx.produce(node, conv.out_channels, dim, rank)
    ctx.member(node, "out", out)
    ctx.require_blocks(node, out, conv.groups, what)
    if inp is not None:
        if len(inp.groups) == 1:
            ctx.require_blocks(node, inp, conv.groups, what)
        else:
            # Blocks spanning several groups would tie their counts together: not modelled.
            ctx.freeze(node, [inp], f"{what} reads a concatenation of {len(inp.groups)} groups")
        ctx.member(node, "in", inp)
    return out


# --------------------------------------------------------------------------- linear


@register_rule(nn.Linear)
def _linear(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    lin = ctx.module(node)
    assert isinstance(lin, nn.Linear)
    inp = _first_layout(ctx, node)
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else (inp.rank if inp is not None else None)
    if rank is None and node.args:
        # A Linear keeps its input's rank: an untracked input whose rank an op fixed (a
        # flatten, a view) still gives the output a known rank.
        rank = ctx.rank(node.args[0])
    if inp is not None:
        if inp.dim != -1:
            ctx.unsupported(node, "Linear over a dimension that is not the channel dim")
            return None
        block = inp.block
        if block is None:
            # A flattened C x H x W map: every channel owns in_features / C columns.
            if lin.in_features % inp.channels != 0:
                ctx.unsupported(node, f"Linear with {lin.in_features} inputs after a {inp.channels}-channel flatten")
                return None
            block = lin.in_features // inp.channels
        if inp.channels * block != lin.in_features:
            ctx.unsupported(node, "Linear whose in_features do not match its input channels")
            return None
        ctx.member(node, "in", replace(inp, block=block))
    out = ctx.produce(node, lin.out_features, -1, rank)
    ctx.member(node, "out", out)
    return out


# --------------------------------------------------------------------------- normalization


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def _batchnorm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    bn = ctx.module(node)
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else inp.rank
    if rank is None and isinstance(bn, nn.BatchNorm1d) and inp.dim == -1 and _is_linear_call(ctx, node.args[0]):
        # A Linear's channels are its last dim, and BatchNorm1d takes (N, C) or (N, C, L):
        # with the channels last its input is the 2-D (N, C), so dim 1 is the channel dim.
        rank = 2
    # BatchNorm normalises dim 1: it must be the channel dim of the input layout.
    # A channel may own several consecutive positions of dim 1 (``block``: a depthwise conv
    # with a channel multiplier made them): BatchNorm is per position, so they go together.
    if rank is None or inp.dim != 1 - rank or not isinstance(inp.block, int):
        ctx.unsupported(node, "BatchNorm over a dim not known to be the channel dim")
        return None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_features != inp.channels * inp.block:
        ctx.unsupported(node, "BatchNorm whose num_features do not match its input")
        return None
    ctx.member(node, "channelwise", inp)
    return replace(inp, rank=rank)


def _is_linear_call(ctx: RuleContext, arg: Any) -> bool:
    return isinstance(arg, torch.fx.Node) and arg.op == "call_module" and isinstance(ctx.module(arg), nn.Linear)


# --------------------------------------------------------------------------- pooling

_POOL_MODULES = (
    nn.MaxPool1d, nn.MaxPool2d, nn.MaxPool3d, nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d,
    nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d, nn.AdaptiveMaxPool3d, nn.Upsample, nn.UpsamplingNearest2d,
    nn.UpsamplingBilinear2d,
)
_POOL_FUNCTIONS = (
    F.max_pool1d, F.max_pool2d, F.max_pool3d, F.avg_pool1d, F.avg_pool2d, F.avg_pool3d,
    F.adaptive_avg_pool1d, F.adaptive_avg_pool2d, F.adaptive_avg_pool3d, F.adaptive_max_pool1d,
    F.adaptive_max_pool2d, F.adaptive_max_pool3d, F.interpolate, torch.max_pool2d,
    torch.avg_pool1d, torch.adaptive_avg_pool1d,
)


def _spatial_dims(node: torch.fx.Node, module: Optional[nn.Module]) -> Optional[int]:
    """How many trailing dims a pooling/resampling op works on (None: all after dim 1)."""
    name = type(module).__name__ if module is not None else getattr(node.target, "__name__", "")
    for suffix, n in (("1d", 1), ("2d", 2), ("3d", 3)):
        if name.endswith(suffix):
            return n
    return None  # interpolate / Upsample: every dim after the channel dim 1


@register_rule(*_POOL_MODULES, *_POOL_FUNCTIONS)
def _pool(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # Pooling works per channel over spatial dims; the channel dim keeps its place.
    module = ctx.module(node) if node.op == "call_module" else None
    if module is not None:
        if getattr(module, "return_indices", False):
            ctx.unsupported(node, "pooling that returns indices")
            return None
    elif node.kwargs.get("return_indices", False):
        ctx.unsupported(node, "pooling that returns indices")
        return None
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    if not isinstance(inp.block, int):
        # (A channel owning several positions of its dim, as after a flatten or a depthwise
        # conv with a channel multiplier, is fine: the window covers other dims, checked next.)
        ctx.unsupported(node, "pooling of a flattened map")
        return None
    spatial = _spatial_dims(node, module)
    # A channels-last tensor fed to a 2d pool would be pooled across channels.
    pooled_first = -spatial if spatial is not None else (None if inp.rank is None else 2 - inp.rank)
    if pooled_first is None or inp.dim >= pooled_first:
        ctx.unsupported(node, "pooling whose window would cover the channel dim")
        return None
    return inp


# --------------------------------------------------------------------------- reductions


@register_rule(torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin")
def _reduce(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dims = _arg(node, 1, "dim", None)
    keepdim = bool(_arg(node, 2, "keepdim", False))
    norm = _normalize_dims(dims, inp.rank)
    if norm is None:
        ctx.unsupported(node, "reduction over all dims or over dims that cannot be resolved")
        return None
    # Each channel's positions along its dim (``block``) stay apart when other dims are reduced.
    if inp.dim in norm or not isinstance(inp.block, int):
        ctx.unsupported(node, "reduction over the channel dim mixes channels")
        return None
    if keepdim:
        return inp
    # Dropping dims after the channel dim moves it closer to the end.
    after = sum(1 for d in norm if d > inp.dim)
    rank = None if inp.rank is None else inp.rank - len(set(norm))
    return replace(inp, dim=inp.dim + after, rank=rank)


# --------------------------------------------------------------------------- flatten / view


_MAX_FLATTEN_COPIES = 16  # channels repeated by a flatten at most this often (patch merging: 4)


def _flatten_layout(ctx: RuleContext, node: torch.fx.Node, inp: Layout, start: int, end: int) -> Optional[Layout]:
    rank = inp.rank
    if rank is None:
        ctx.unsupported(node, "flatten of a tensor of unknown rank (pass example_inputs)")
        return None
    start = start % rank if start < 0 else start
    end = end % rank if end < 0 else end
    c = rank + inp.dim
    new_rank = rank - (end - start)
    if c < start:
        return replace(inp, dim=c - new_rank, rank=new_rank)
    if c > end:
        return replace(inp, dim=c - (end - start) - new_rank, rank=new_rank)
    shape = ctx.shape(node.args[0]) if node.args else None
    if c == end and c != start and inp.block == 1 and shape is not None:
        # The channel dim is the innermost of the merged ones (Swin's patch merging: (.., 2, 2, C)
        # flattened to 4C): the merged dim holds the channels once per outer index, in order,
        # as a concatenation of that many copies would (a few copies only: each is a segment).
        copies = math.prod(int(s) for s in shape[start:end])
        if copies <= _MAX_FLATTEN_COPIES:
            return replace(inp, groups=inp.groups * copies, sizes=inp.sizes * copies, dim=start - new_rank,
                           rank=new_rank)
    if c != start:
        ctx.unsupported(node, "flatten that interleaves the channel dim with an outer dim")
        return None
    if end == start:
        return inp
    # The channel becomes the outer index of the merged dim: each owns a contiguous block.
    block: Optional[int] = None
    if shape is not None and inp.block is not None:
        block = inp.block * math.prod(int(s) for s in shape[start + 1 : end + 1])
    return replace(inp, dim=start - new_rank, rank=new_rank, block=block)


@register_rule(torch.flatten, "flatten", nn.Flatten)
def _flatten(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    if node.op == "call_module":
        mod = ctx.module(node)
        start, end = mod.start_dim, mod.end_dim  # type: ignore[union-attr]
    else:
        start, end = _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1)
    if not isinstance(start, int) or not isinstance(end, int):
        ctx.unsupported(node, "flatten with non-constant dims")
        return None
    return _flatten_layout(ctx, node, inp, start, end)


_SIZE_ARITHMETIC = frozenset({operator.add, operator.sub, operator.mul, operator.floordiv, operator.truediv,
                              operator.mod, operator.pow, operator.neg, builtins.int})


def _channel_size_reads(ctx: RuleContext, arg: Any, depth: int = 0) -> List[Layout]:
    """The layouts of tracked tensors whose channel count the size value ``arg`` is computed from.

    A direct read (``x.shape[-1]``, ``x.size(1)``, a whole ``x.shape``), or Python arithmetic on
    one (``C // heads``). After pruning such a value says the kept count: right where it sizes
    the same channels (:func:`_size_follows_channels` checks that), wrong anywhere else.
    """
    if isinstance(arg, (list, tuple)):
        return [lay for a in arg for lay in _channel_size_reads(ctx, a, depth)]
    if not isinstance(arg, torch.fx.Node) or depth > 8:
        return []
    found = _channel_size_source(ctx, arg)
    if found is not None:
        source, dim = found
        lay = ctx.layout(source)
        norm = _normalize_dims(dim, ctx.rank(source)) if lay is not None else None
        # Unknown rank: only dim 0 (the batch, in every model seen) is taken for not a channel dim.
        return [lay] if lay is not None and (norm[0] == lay.dim if norm is not None else dim != 0) else []
    whole = (arg.op == "call_method" and arg.target == "size" and len(arg.args) == 1) or \
        (arg.op == "call_function" and arg.target is builtins.getattr and arg.args[1] == "shape")
    if whole:
        lay = ctx.layout(arg.args[0])
        return [lay] if lay is not None else []
    if arg.op == "call_function" and (arg.target in _SIZE_ARITHMETIC or arg.target is operator.getitem):
        return [lay for a in arg.args for lay in _channel_size_reads(ctx, a, depth + 1)]
    return []


def _refuse_size_reads(ctx: RuleContext, node: torch.fx.Node, sizes: Any, skip: Optional[int]) -> None:
    """Refuse the channels a view's size arguments read, except at position ``skip`` (checked there).

    A size that *is* a channel count (``D`` of ``B, G, P, D = x.shape``), given to a dim that does
    not hold those channels, is rewritten as the constant it is now: a channel count does not vary
    with the input, and that dim's extent must not follow the pruning (MaxViT's
    ``out.reshape(B, G, P, D)`` sizes the heads' width with the residual width). A size computed
    from one (``C * H``) may also carry sizes that vary, so it is still refused.
    """
    items = list(sizes) if isinstance(sizes, (list, tuple)) else [sizes]
    out_shape = ctx.shape(node)
    read: List[Layout] = []
    for i, a in enumerate(items):
        if i == skip:
            continue
        found = _channel_size_reads(ctx, a)
        if found and isinstance(sizes, (list, tuple)) and out_shape is not None and len(out_shape) == len(items) \
                and isinstance(a, torch.fx.Node) and _channel_size_source(ctx, a) is not None:
            ctx.rewrite_args(node, ArgPatch(_view_size_path(node, i), int(out_shape[i])))
            continue
        read += found
    if read:
        ctx.refuse(node, read, f"{_label(node)} is given a size read from a channel dim, which pruning would change "
                               "where it does not size those channels",
                   "write the size as a constant or -1, or read it from the tensor being reshaped")


@register_rule(torch.reshape, "view", "reshape")
def _view(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if node.op == "call_function":
        sizes = _arg(node, 1, "shape", None)
    else:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    if inp is None:
        # An untracked tensor keeps its size; a size argument that reads a pruned channel count
        # (MaxViT's ``x.reshape(B, G, P, D)`` with D from its input's shape) would not.
        _refuse_size_reads(ctx, node, sizes, None)
        return None
    in_shape = ctx.shape(node.args[0])
    out_shape = ctx.shape(node)
    if in_shape is not None and out_shape is not None and inp.rank is not None:
        if _attention_heads(ctx, node, inp, tuple(in_shape), tuple(out_shape), sizes) or \
                _separate_heads(ctx, node, inp, tuple(in_shape), tuple(out_shape), sizes) or \
                _per_head_qkv(ctx, node, inp, tuple(in_shape), tuple(out_shape), sizes) or \
                _einsum_heads(ctx, node, inp, tuple(in_shape), tuple(out_shape), sizes):
            return None  # the heads of an attention block: the region is accounted for
        out = _merged_layout(inp, tuple(in_shape), tuple(out_shape))
        if out is None and _relocating_chain(ctx, node, inp, tuple(in_shape)):
            return None  # views and transposes that move the channels whole: the chain is accounted for
        if out is None:
            out = _view_from_shapes(ctx, node, inp, tuple(in_shape), tuple(out_shape))
        if out is None:
            return None
        # The shapes say where the channels go; the arguments must still say it after
        # pruning, or the rewrite cannot be built and the group must not be planned.
        j = out.rank + out.dim  # type: ignore[operator]
        tail = out_shape[j] // in_shape[len(in_shape) + inp.dim]
        # A refused node keeps its layout: its groups are frozen either way, and following
        # them on lets a later op that freezes them by design say so instead.
        if not isinstance(sizes, (list, tuple)) or len(sizes) != len(out_shape):
            ctx.refuse(node, [inp], "view/reshape whose sizes are not given one per dim")
            return out
        _size_follows_channels(ctx, node, sizes[j], inp, tail, _view_size_path(node, j))
        _refuse_size_reads(ctx, node, sizes, j)
        return out
    # Without shapes, only the classic head `x.view(x.size(0), -1)` is understood.
    if isinstance(sizes, (list, tuple)) and len(sizes) == 2 and sizes[1] == -1 and inp.rank is not None:
        return _flatten_layout(ctx, node, inp, 1, -1)
    ctx.unsupported(node, "view/reshape whose effect on channels is unknown without shapes",
                    "pass example_inputs so shapes can be propagated")
    return None


@register_rule("reshape_as", "view_as")
def _view_as(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``a.reshape_as(b)`` / ``a.view_as(b)``: a view whose sizes are ``b``'s shape at run time.

    The channels keep their meaning as for a view (the shapes say where they go); after pruning
    ``b``'s shape must still be the output's, so ``b`` must carry the same channels at the same
    dim (LeViT's ``bn(x.flatten(0, 1)).reshape_as(x)``). They are tied into one group, which
    keeps the same indices in both; anything else would reshape to a stale size.
    """
    inp = _first_layout(ctx, node)
    other = _arg(node, 1, "other", None)
    olay = ctx.layout(other) if isinstance(other, torch.fx.Node) else None
    if inp is None:
        if olay is not None:  # an untracked tensor keeps its size; the shape it is given would not
            ctx.refuse(node, [olay], f"{_label(node)} of an untracked tensor to the shape of a pruned one",
                       "reshape to constant sizes, or to the shape of a tensor with the same channels")
        return None
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    if in_shape is None or out_shape is None or inp.rank is None:
        ctx.unsupported(node, f"{_label(node)} of a channel-carrying tensor without recorded shapes",
                        "pass example_inputs so shapes can be propagated")
        return None
    out = _view_from_shapes(ctx, node, inp, tuple(in_shape), tuple(out_shape))
    if out is None:
        return None
    if olay is None or olay.rank != out.rank or olay.dim != out.dim or olay.block != out.block \
            or olay.channels != out.channels:
        ctx.refuse(node, [inp] + ([olay] if olay is not None else []),
                   f"{_label(node)} to the shape of a tensor whose channels are not the input's at the same dim",
                   "reshape with -1 for the channel dim instead")
        return out
    return ctx.unify(node, [out, olay])


# A chain of views and transposes may take the channels apart and put them back together
# somewhere else: MobileViT unfolds a feature map [B, C, H, W] into patches [B * P, N, C] by
# reshaping through [B * C * n_h, p_h, n_w, p_w] (the channels merged into the batch dim) and
# transposing, and folds it back the same way. No single view keeps the channel dim, but the
# chain moves each channel's values as a block. Rather than pattern-match every such unfold,
# the chain is checked by running it on element indices (``_probe_chain``): at the channel
# count it has and at fewer, the output must hold channel c at one dim, every other coordinate
# read from the same place in both. Each view's size that carries the channels is rewritten
# from the kept count; a size computed at run time must not read a channel count.

_MAX_PROBE = 1 << 22  # elements: a chain on a bigger tensor is not probed (left to the plain rule)


def _chain_step(node: Any) -> bool:
    return isinstance(node, torch.fx.Node) and (_is_view(node) or node.target in (
        "transpose", torch.transpose, "permute", torch.permute, "contiguous"))


def _probe_apply(t: torch.Tensor, node: torch.fx.Node, shape: Sequence[int]) -> torch.Tensor:
    if _is_view(node):
        return t.reshape(tuple(shape))
    if node.target in ("transpose", torch.transpose):
        return t.transpose(_arg(node, 1, "dim0"), _arg(node, 2, "dim1"))
    if node.target in ("permute", torch.permute):
        dims = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return t.permute(tuple(dims))
    return t


def _probe_chain(chain: Sequence[torch.fx.Node], in_shape: Tuple[int, ...], c: int, shapes: Sequence[Sequence[int]]
                 ) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    """Source element index of every output element, and the channel index tensor before and after each step."""
    t = torch.arange(math.prod(in_shape)).reshape(in_shape)
    channel = torch.arange(in_shape[c]).view([-1 if i == c else 1 for i in range(len(in_shape))]).expand(in_shape)
    channels: List[torch.Tensor] = [channel]
    for node, shape in zip(chain, shapes):
        t, channel = _probe_apply(t, node, shape), _probe_apply(channel, node, shape)
        channels.append(channel)
    return t, channels


def _channel_dim_of(channel: torch.Tensor) -> Optional[int]:
    """The one dim along which the channel index varies, if exactly one does."""
    varying = [d for d in range(channel.dim()) if channel.shape[d] > 1 and not bool((channel.diff(dim=d) == 0).all())]
    return varying[0] if len(varying) == 1 else None


def _relocating_chain(ctx: RuleContext, node: torch.fx.Node, inp: Layout, in_shape: Tuple[int, ...]) -> bool:
    """Claim the chain of views/transposes from ``node`` that moves the channels whole (see above)."""
    if inp.block != 1 or inp.rank != len(in_shape) or math.prod(in_shape) > _MAX_PROBE:
        return False
    c, count = len(in_shape) + inp.dim, inp.channels
    if in_shape[c] != count or count < 2:
        return False
    chain: List[torch.fx.Node] = []
    shapes: List[Tuple[int, ...]] = []
    src, channels = _probe_chain([], in_shape, c, [])
    step: Optional[torch.fx.Node] = node
    while True:  # one more op per round, probed on what the ops before it gave
        shape = tuple(ctx.shape(step) or ())
        if not shape:
            return False
        chain.append(step)
        shapes.append(shape)
        src, last = _probe_apply(src, step, shape), _probe_apply(channels[-1], step, shape)
        channels.append(last)
        d = _channel_dim_of(last)
        if len(chain) > 1 and d is not None and last.shape[d] == count:
            want = torch.arange(count).view([-1 if i == d else 1 for i in range(last.dim())])
            if bool((last == want).all()):
                break  # channel c sits at index c of dim d: the chain ends here
        step = _only_user(step)
        if len(chain) >= 8 or not _chain_step(step) or step.args[0] is not chain[-1]:
            return False
    channels = channels[1:]  # one per op of the chain
    # Where each view's sizes carry the channels, and what they become with fewer channels.
    fewer = max(1, count // 2)
    new_shapes: List[Tuple[int, ...]] = []
    patches: List[Tuple[torch.fx.Node, int, int]] = []  # (view, size index, size per channel)
    for node_i, shape, channel in zip(chain, shapes, channels):
        k = _channel_dim_of(channel)
        if k is None or shape[k] % count:
            return False
        new_shapes.append(tuple(s // count * fewer if j == k else s for j, s in enumerate(shape)))
        if not _is_view(node_i):
            continue
        sizes = _view_sizes(node_i)
        if not isinstance(sizes, (list, tuple)) or len(sizes) != len(shape):
            return False
        for j, size in enumerate(sizes):
            if isinstance(size, torch.fx.Node):
                if j == k or _channel_size_reads(ctx, size):
                    return False  # a computed size where the channels are: it could say anything after pruning
            elif j == k and size != -1:
                patches.append((node_i, j, shape[k] // count))
    # The same chain on fewer channels reads every kept element from the same place.
    small_in = tuple(fewer if i == c else s for i, s in enumerate(in_shape))
    small, small_channels = _probe_chain(chain, small_in, c, new_shapes)
    if _channel_dim_of(small_channels[-1]) != d:
        return False
    kept = src.narrow(d, 0, fewer)
    if tuple(kept.shape) != tuple(small.shape):
        return False
    coords = torch.stack(torch.unravel_index(kept, in_shape))
    coords_small = torch.stack(torch.unravel_index(small, small_in))
    if not torch.equal(coords, coords_small):
        return False
    for view, j, per in patches:
        ctx.rewrite_args(view, ArgPatch(_view_size_path(view, j), ChannelCount.of([inp], per)))
    rank = len(shapes[-1])
    ctx.claim(node, chain[1:], {chain[-1].name: Layout(inp.groups, inp.sizes, d - rank, rank, 1)})
    return True


def _view_size_path(node: torch.fx.Node, j: int) -> Tuple[Union[int, str], ...]:
    """Where size ``j`` of a view/reshape sits in the node's arguments (see :class:`ArgPatch`)."""
    if node.op == "call_function":
        return ((1,) if len(node.args) > 1 else ("shape",)) + (j,)
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return (1, j)
    return (1 + j,)


def _channel_size_source(ctx: RuleContext, arg: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, int]]:
    """``(tensor, dim)`` if ``arg`` reads one dim of a tensor's size: ``t.size(d)``, ``t.size()[d]``, ``t.shape[d]``."""
    if arg.op == "call_method" and arg.target == "size" and len(arg.args) == 2 and isinstance(arg.args[1], int):
        source, dim = arg.args[0], arg.args[1]
    elif arg.op == "call_function" and arg.target is operator.getitem and isinstance(arg.args[1], int) \
            and isinstance(arg.args[0], torch.fx.Node):
        whole, dim = arg.args[0], arg.args[1]
        if whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1:
            source = whole.args[0]
        elif whole.op == "call_function" and whole.target is builtins.getattr and whole.args[1] == "shape":
            source = whole.args[0]
        else:
            return None
    else:
        return None
    return (source, dim) if isinstance(source, torch.fx.Node) else None


def _size_follows_channels(ctx: RuleContext, node: torch.fx.Node, arg: Any, inp: Layout, tail: int,
                           path: Optional[Tuple[Union[int, str], ...]] = None) -> bool:
    """Whether size argument ``arg``, giving the extent of the dim that holds ``inp``'s channels
    (``tail`` features each), still gives it after pruning; if not, refuse the node.

    ``-1`` (inferred) does. So does the channel count read from a tensor whose channels are
    tied to ``inp``'s (``b, c, h, w = x.size(); y.view(b, c, 1, 1)``): the two are made one
    group, so they keep the same count. A literal (``y.view(n, 8, -1)``, ``x.view(-1, 512)``)
    would still say the old count: given ``path`` (where it sits in the node's arguments) it is
    rewritten from the kept count (a :class:`ChannelCount`); a computed size could say anything.
    """
    if arg == -1 and not isinstance(arg, bool):
        return True
    if isinstance(arg, int) and not isinstance(arg, bool) and path is not None and inp.block is not None:
        count = ChannelCount.of([inp], inp.block * tail)
        if count.evaluate({g: s for g, s in zip(inp.groups, inp.sizes)}) == arg:
            ctx.rewrite_args(node, ArgPatch(path, count))
            return True
    if isinstance(arg, torch.fx.Node) and tail == 1:
        found = _channel_size_source(ctx, arg)
        if found is not None:
            source, dim = found
            lay = ctx.layout(source)
            norm = _normalize_dims(dim, ctx.rank(source)) if lay is not None else None
            if lay is not None and norm is not None and norm[0] == lay.dim and lay.block == 1 \
                    and lay.channels == inp.channels and inp.block == 1:
                ctx.unify(node, [inp, replace(lay, dim=inp.dim, rank=inp.rank)])
                return True
    what = f"the literal size {arg}" if isinstance(arg, int) else f"size {getattr(arg, 'name', arg)!s}"
    ctx.refuse(node, [inp], f"{_label(node)} gives the channel dim {what}, which would not follow pruning",
               "write -1 (or x.size(d) of the same tensor) for the channel dim so the pruned model can run")
    return False


def _label(node: torch.fx.Node) -> str:
    return str(node.target) if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))


def _merged_layout(inp: Layout, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> Optional[Layout]:
    """The view's output layout if the channel dim survives it whole (maybe merged with later dims)."""
    c = len(in_shape) + inp.dim
    block = inp.block if inp.block is not None else in_shape[c] // max(inp.channels, 1)
    if inp.channels * block == in_shape[c]:
        before = math.prod(in_shape[:c])
        acc = 1
        # The channel keeps its meaning only if some output dim starts exactly where it starts
        # and spans it plus whole input dims after it (a merge, never a split).
        for j, size in enumerate(out_shape):
            if acc == before and size % in_shape[c] == 0:
                tail, prod_tail, k = size // in_shape[c], 1, c + 1
                while prod_tail < tail and k < len(in_shape):
                    prod_tail *= in_shape[k]
                    k += 1
                if prod_tail == tail:
                    return Layout(inp.groups, inp.sizes, j - len(out_shape), len(out_shape), block * tail)
            acc *= size
            if acc > before:
                break
    return None


def _view_from_shapes(ctx: RuleContext, node: torch.fx.Node, inp: Layout,
                      in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> Optional[Layout]:
    c = len(in_shape) + inp.dim
    merged = _merged_layout(inp, in_shape, out_shape)
    if merged is not None:
        return merged
    shuffle = _channel_shuffle(node, in_shape, out_shape, c)
    if shuffle is not None:
        # Known and deliberately not pruned: the shuffle interleaves the groups of the
        # concatenation it permutes, and keeping its period valid would tie their kept index
        # sets (and every split that follows) together. Frozen by design, no warning.
        ctx.freeze(node, [inp], shuffle)
        return None
    ctx.unsupported(node, "view/reshape that splits or interleaves the channel dim")
    return None


def _channel_shuffle(node: torch.fx.Node, in_shape: Tuple[int, ...], out_shape: Tuple[int, ...], c: int) -> Optional[str]:
    """Describe ShuffleNet's channel shuffle if ``node`` starts one, else None.

    The pattern: a view splitting the channel dim into ``(g, C/g)`` at consecutive dims,
    whose only use transposes exactly those two dims (the view back to ``C`` follows).
    """
    before = math.prod(in_shape[:c])
    for j in range(len(out_shape) - 1):
        if math.prod(out_shape[:j]) == before and out_shape[j] * out_shape[j + 1] == in_shape[c]:
            users = list(node.users)
            if len(users) != 1:
                return None
            user = users[0]
            dims = [a for a in list(user.args[1:]) + list(user.kwargs.values()) if isinstance(a, int)]
            rank = len(out_shape)
            if str(getattr(user.target, "__name__", user.target)) in ("transpose", "swapaxes", "swapdims") and \
                    sorted(d % rank for d in dims[:2]) == [j, j + 1]:
                return f"channel shuffle (view into {out_shape[j]} x {out_shape[j + 1]}, transpose) interleaves channels"
            return None
    return None


# --------------------------------------------------------------------------- softmax


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")
def _softmax(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    # Softmax2d has no dim: it normalises over dim -3, the channels of a [(N,) C, H, W] map.
    dim = getattr(ctx.module(node), "dim", -3) if node.op == "call_module" else _arg(node, 1, "dim", None)
    norm = _normalize_dims(dim, inp.rank)
    if norm is None or inp.dim in norm:
        # Softmax over channels couples every channel through its denominator.
        ctx.unsupported(node, "softmax over the channel dim")
        return None
    return inp


# --------------------------------------------------------------------------- moving the channel dim


def _dims_arg(node: torch.fx.Node, name: str) -> Any:
    """The dims of ``permute``: ``torch.permute(x, dims)``, ``x.permute(dims)`` or ``x.permute(*dims)``."""
    if node.op == "call_function":
        return _arg(node, 1, name, None)
    if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)):
        return node.args[1]
    return node.args[1:] if len(node.args) > 1 else node.kwargs.get(name)


@register_rule(torch.permute, "permute")
def _permute(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dims = _dims_arg(node, "dims")
    if not isinstance(dims, (list, tuple)) or not all(isinstance(d, int) for d in dims):
        ctx.unsupported(node, "permute with dims that are not constants")
        return None
    rank = len(dims)
    order = [d % rank for d in dims]
    if sorted(order) != list(range(rank)) or (inp.rank is not None and inp.rank != rank):
        ctx.unsupported(node, "permute whose dims do not match the tensor's rank")
        return None
    # Output dim j is input dim order[j]: the channel dim lands where its index appears.
    return replace(inp, dim=order.index(rank + inp.dim) - rank, rank=rank)


@register_rule(torch.transpose, "transpose", torch.swapaxes, "swapaxes", torch.swapdims, "swapdims")
def _transpose(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    first = _arg(node, 1, "dim0", node.kwargs.get("axis0"))
    second = _arg(node, 2, "dim1", node.kwargs.get("axis1"))
    pair = _normalize_dims([first, second], inp.rank)
    if pair is None or len(pair) != 2:
        ctx.unsupported(node, "transpose of dims that cannot be resolved without the rank")
        return None
    a, b = pair
    dim = b if inp.dim == a else a if inp.dim == b else inp.dim
    return replace(inp, dim=dim)


def _full_slice(item: Any) -> bool:
    return isinstance(item, slice) and item.start is None and item.stop is None and item.step is None


@register_rule(operator.getitem)
def _getitem(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    source, index = node.args[0], node.args[1]
    elements = ctx.elements(source)
    if elements is not None:
        if isinstance(index, int):
            return elements.get(index)
        ctx.freeze(node, elements.layouts(), "a slice of a tuple of channel-carrying tensors")
        return None
    inp = ctx.layout(source)
    if inp is None:
        return None  # indexing a shape tuple, or a tensor without tracked channels
    return _index(ctx, node, inp, index)


def _index(ctx: RuleContext, node: torch.fx.Node, inp: Layout, index: Any) -> Optional[Layout]:
    """Basic indexing (ints, slices, None, Ellipsis); a slice of the channel dim is a piece."""
    given = list(index) if isinstance(index, tuple) else [index]
    if inp.rank is None:
        ctx.unsupported(node, "indexing a tensor of unknown rank", "pass example_inputs so shapes can be propagated")
        return None
    # (position in the index as written, item): positions say where a rewrite patches.
    items: List[Tuple[Optional[int], Any]] = list(enumerate(given))
    consuming = [it for it in given if it is not None and it is not Ellipsis]
    if given.count(Ellipsis) > 1 or len(consuming) > inp.rank:
        ctx.unsupported(node, "an index this rule does not understand")
        return None
    if Ellipsis in given:
        at = given.index(Ellipsis)
        items[at : at + 1] = [(None, slice(None))] * (inp.rank - len(consuming))
    items += [(None, slice(None))] * (inp.rank - len([it for _, it in items if it is not None]))
    channel = inp.rank + inp.dim
    in_dim = out_dim = 0
    new_channel: Optional[int] = None
    piece = inp
    for pos, item in items:
        if item is None:
            out_dim += 1  # a new axis of size 1
            continue
        if isinstance(item, bool) or not isinstance(item, (int, slice)):
            ctx.unsupported(node, "advanced (tensor) indexing of a channel-carrying tensor")
            return None
        if in_dim == channel:
            if not isinstance(item, slice):
                ctx.unsupported(node, "indexing the channel dim with an int drops it")
                return None
            if not _full_slice(item):
                path: Tuple[Union[int, str], ...] = (1,) if not isinstance(index, tuple) else (1, pos)  # type: ignore[assignment]
                found = _channel_slice(ctx, node, inp, item, path if pos is not None else None)
                if found is None:
                    return None
                piece = found
            new_channel = out_dim
        in_dim += 1
        out_dim += isinstance(item, slice)
    assert new_channel is not None
    return replace(piece, dim=new_channel - out_dim, rank=out_dim)


def _channel_slice(ctx: RuleContext, node: torch.fx.Node, inp: Layout, item: slice,
                   path: Optional[Tuple[Union[int, str], ...]]) -> Optional[Layout]:
    """``x[:, a:b]``: the channels ``[a, b)`` as a piece of their own; the bounds follow pruning."""
    bounds = (item.start, item.stop, item.step)
    if any(b is not None and (isinstance(b, bool) or not isinstance(b, int)) for b in bounds) or path is None:
        ctx.unsupported(node, "a slice of the channel dim whose bounds are not constants")
        return None
    if inp.block != 1:
        ctx.unsupported(node, "a slice of a flattened channel dim")
        return None
    total = inp.channels
    start, stop, step = item.indices(total)
    if step != 1:
        ctx.unsupported(node, "a strided slice of the channel dim")
        return None
    if stop <= start:
        ctx.unsupported(node, "a slice of the channel dim with no channels")
        return None
    if start == 0 and stop == total:
        return inp
    before, middle, _ = _pieces_around(ctx, node, inp, start, stop)
    # A bound at the edge of the channels stays as written (None, 0, or past the end).
    lo = item.start if item.start is None or item.start == 0 or item.start <= -total else ChannelCount.of(before)
    hi = item.stop if item.stop is None or item.stop >= total else ChannelCount.of(before + [middle])
    ctx.rewrite_args(node, ArgPatch(path, Bounds(lo, hi, item.step)))
    return middle


def _pieces_around(ctx: RuleContext, node: torch.fx.Node, inp: Layout, start: int,
                   stop: int) -> Tuple[List[Layout], Layout, List[Layout]]:
    """Cut ``inp`` into (channels before ``start``, ``[start, stop)``, channels after ``stop``)."""
    sizes = [s for s in (start, stop - start, inp.channels - stop) if s > 0]
    pieces = ctx.split(node, inp, sizes)
    k = 1 if start > 0 else 0
    return pieces[:k], pieces[k], pieces[k + 1 :]


@register_rule(torch.roll, "roll")
def _roll(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``torch.roll`` along dims other than the channels' moves whole channel vectors: channels pass.

    Swin's cyclic window shift (``dims=(1, 2)`` of a channels-last map). Rolling the channel dim
    itself (or without ``dims``: the flattened tensor) would move channels: unsupported.
    """
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dims = _normalize_dims(_arg(node, 2, "dims", None), ctx.rank(node.args[0]))
    if not dims or inp.dim in dims:
        ctx.unsupported(node, "roll along the channel dim (or of the flattened tensor)")
        return None
    return inp


@register_rule(torch.narrow, "narrow")
def _narrow(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``x.narrow(dim, start, length)``: along the channel dim, a slice (see :func:`_channel_slice`)."""
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    norm = _normalize_dims(_arg(node, 1, "dim", None), inp.rank)
    if norm is None:
        ctx.unsupported(node, "narrow along a dim that cannot be resolved without the rank")
        return None
    if norm[0] != inp.dim:
        return inp
    start, length = _arg(node, 2, "start", None), _arg(node, 3, "length", None)
    if not all(isinstance(v, int) and not isinstance(v, bool) for v in (start, length)):
        ctx.unsupported(node, "narrow of the channel dim by bounds that are not constants")
        return None
    if inp.block != 1:
        ctx.unsupported(node, "narrow of a flattened channel dim")
        return None
    total = inp.channels
    lo = start + total if start < 0 else start
    if length <= 0 or lo < 0 or lo + length > total:
        ctx.unsupported(node, "narrow of the channel dim with no channels or out of range")
        return None
    if lo == 0 and length == total:
        return inp
    before, middle, _ = _pieces_around(ctx, node, inp, lo, lo + length)
    if lo != 0:
        ctx.rewrite_args(node, ArgPatch((2,) if len(node.args) > 2 else ("start",), ChannelCount.of(before)))
    ctx.rewrite_args(node, ArgPatch((3,) if len(node.args) > 3 else ("length",), ChannelCount.of([middle])))
    return middle


@register_rule(torch.unsqueeze, "unsqueeze")
def _unsqueeze(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dim = _arg(node, 1, "dim", None)
    if inp.rank is None or not isinstance(dim, int):
        ctx.unsupported(node, "unsqueeze of a tensor of unknown rank", "pass example_inputs so shapes can be propagated")
        return None
    rank = inp.rank + 1
    at = dim % rank
    channel = inp.rank + inp.dim
    return replace(inp, dim=(channel + (at <= channel)) - rank, rank=rank)


@register_rule(torch.squeeze, "squeeze", "expand", "expand_as")
def _by_shapes(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """Ops that keep the channel dim but drop or add size-1 dims: trust recorded shapes only.

    Without shapes ``squeeze()`` could drop a one-channel dim and ``expand`` could repeat one
    channel many times, so both need ``example_inputs``: the channel dim must keep its size and
    every other dim must be created or removed away from it.
    """
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    in_shape, out_shape = ctx.shape(node.args[0]), ctx.shape(node)
    if in_shape is None or out_shape is None:
        ctx.unsupported(node, f"{node.target} of a channel-carrying tensor without recorded shapes",
                        "pass example_inputs so shapes can be propagated")
        return None
    channel = len(in_shape) + inp.dim
    size = in_shape[channel]
    if node.target in ("expand", "expand_as"):
        # expand prepends dims and broadcasts size-1 dims: the channel dim keeps its distance
        # from the end, and must not be a single channel broadcast to many.
        if out_shape[inp.dim] != size:
            ctx.unsupported(node, "expand that repeats the channel dim")
            return None
        out = replace(inp, rank=len(out_shape))
        if node.target == "expand_as":
            # The result takes ``other``'s shape: its channels must be the same ones.
            lay = ctx.layout(_arg(node, 1, "other", None))
            if lay is None or lay.dim != inp.dim or lay.channels != inp.channels:
                ctx.refuse(node, [inp], "expand_as a tensor whose channels are not tied to the input's")
                return out
            return ctx.unify(node, [out, replace(lay, rank=out.rank)])
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node):
            # x.expand(y.shape) / x.expand(y.size()): y's channels must be the same ones.
            whole = sizes[0]
            source = whole.args[0] if (whole.op == "call_method" and whole.target == "size" and len(whole.args) == 1) or \
                (whole.op == "call_function" and whole.target is builtins.getattr and whole.args[1] == "shape") else None
            lay = ctx.layout(source)
            if lay is None or lay.dim != inp.dim or lay.channels != inp.channels:
                ctx.refuse(node, [inp], "expand to the shape of a tensor whose channels are not tied to the input's")
                return out
            return ctx.unify(node, [out, replace(lay, rank=out.rank)])
        if len(sizes) != len(out_shape):
            ctx.refuse(node, [inp], "expand whose sizes are not given one per dim")
        else:
            _size_follows_channels(ctx, node, sizes[inp.dim], inp, 1)
        return out
    dims = _arg(node, 1, "dim", None)
    candidates = range(len(in_shape)) if dims is None else _normalize_dims(dims, len(in_shape))
    if candidates is None:
        ctx.unsupported(node, "squeeze of dims that cannot be resolved")
        return None
    removed = {d % len(in_shape) for d in candidates if in_shape[d] == 1}
    if channel in removed:
        ctx.unsupported(node, "squeeze of the channel dim (a single channel)")
        return None
    new_channel = channel - sum(1 for d in removed if d < channel)
    rank = len(in_shape) - len(removed)
    if rank != len(out_shape) or out_shape[new_channel] != size:
        ctx.unsupported(node, "squeeze whose effect on the channel dim is unclear")
        return None
    return replace(inp, dim=new_channel - rank, rank=rank)


@register_rule(torch.chunk, "chunk", torch.split, "split", torch.tensor_split, "tensor_split")
def _split(ctx: RuleContext, node: torch.fx.Node) -> Union[TupleLayout, None]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dim = _arg(node, 2, "dim", 0)
    norm = _normalize_dims(dim, inp.rank)
    if norm is None:
        ctx.unsupported(node, "split along a dim that cannot be resolved without the rank")
        return None
    if norm[0] == inp.dim:
        return _channel_split(ctx, node, inp)
    return TupleLayout((), inp)  # every piece keeps the whole channel dim


# The name of the piece argument (args[1]) of each split form, when given by keyword.
_PIECE_KWARGS = ("chunks", "split_size_or_sections", "split_size", "indices_or_sections", "sections", "indices")


def _channel_split(ctx: RuleContext, node: torch.fx.Node, inp: Layout) -> Optional[TupleLayout]:
    """``chunk`` / ``split`` / ``tensor_split`` of the channel dim: each piece gets its own groups.

    The input's groups are cut at the piece boundaries (:meth:`RuleContext.split`), so every
    piece keeps its own count, and the piece argument is rewritten from the kept counts
    (:class:`Pieces`): split sizes, ``chunk`` turned into ``split`` when its pieces become
    unequal, ``tensor_split``'s cut indices. Each piece keeps at least one channel because each
    is made of whole groups; a piece of zero channels is not followed.
    """
    form = _label(node)
    if len(node.args) > 1:
        path: Tuple[Union[int, str], ...] = (1,)
        how = node.args[1]
    else:
        name = next((k for k in _PIECE_KWARGS if k in node.kwargs), None)
        if name is None:
            ctx.unsupported(node, f"{form} of the channel dim without a piece argument")
            return None
        path, how = (name,), node.kwargs[name]
    if inp.block != 1:
        ctx.unsupported(node, f"{form} of a flattened channel dim")
        return None
    total = inp.channels
    sizes: Optional[List[int]] = None
    if isinstance(how, int) and not isinstance(how, bool):
        sizes = {"chunk": _chunk_sizes, "split": _split_sizes, "tensor_split": _tensor_split_sizes}[form](total, how)
    elif isinstance(how, (list, tuple)) and all(isinstance(v, int) and not isinstance(v, bool) for v in how):
        if form == "split":
            sizes = list(how)
        elif form == "tensor_split":
            cuts = [min(max(c if c >= 0 else c + total, 0), total) for c in how]
            if cuts == sorted(cuts):
                sizes = [hi - lo for lo, hi in zip([0] + cuts, cuts + [total])]
    if sizes is None or sum(sizes) != total:
        ctx.unsupported(node, f"{form} of the channel dim by {how!r}, which does not give constant piece sizes")
        return None
    if any(size <= 0 for size in sizes):
        # A zero-width piece has no channel to keep at least one of: not followed.
        ctx.unsupported(node, f"{form} of the channel dim into a piece of zero channels")
        return None
    pieces = ctx.split(node, inp, sizes)
    value = Pieces(tuple(ChannelCount.of([lay]) for lay in pieces), form, how)
    target = None
    if form == "chunk":
        # chunk(x, n, dim) and split(x, sizes, dim) take their arguments in the same places.
        target = torch.split if node.op == "call_function" else "split"
        if path != (1,):
            ctx.refuse(node, [inp], "chunk(chunks=...) by keyword cannot become a split with unequal pieces",
                       "pass the number of chunks positionally")
    ctx.rewrite_args(node, ArgPatch(path, value), target)
    return TupleLayout(tuple(pieces))


@register_rule(torch.unbind, "unbind")
def _unbind(ctx: RuleContext, node: torch.fx.Node) -> Union[TupleLayout, None]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    norm = _normalize_dims(_arg(node, 1, "dim", 0), inp.rank)
    if norm is None:
        ctx.unsupported(node, "unbind of a dim that cannot be resolved without the rank")
        return None
    if norm[0] == inp.dim:
        # Each channel becomes a tensor of its own, without a channel dim: removing one would
        # remove an output of the unbind. Known, and frozen by design.
        ctx.freeze(node, [inp], f"{_label(node)} of the channel dim makes each channel a tensor of its own")
        return TupleLayout(())
    dim = inp.dim + (norm[0] > inp.dim)
    return TupleLayout((), replace(inp, dim=dim, rank=None if inp.rank is None else inp.rank - 1))


#: Padding modules: each pads the last 1, 2 or 3 dims by its ``padding`` (a tuple in F.pad order).
PAD_MODULES: Tuple[type, ...] = tuple(getattr(nn, f"{kind}Pad{d}d") for kind in ("Zero", "Constant", "Reflection", "Replication", "Circular")
                                      for d in (1, 2, 3) if hasattr(nn, f"{kind}Pad{d}d"))


@register_rule(F.pad, *PAD_MODULES)
def _pad(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``F.pad`` and the padding modules: the channels pass through unless the channel dim is padded."""
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    pad = tuple(ctx.module(node).padding) if node.op == "call_module" else _arg(node, 1, "pad", None)
    if not isinstance(pad, (list, tuple)):
        ctx.unsupported(node, "pad with non-constant padding")
        return None
    # pad = (last_lo, last_hi, second_last_lo, ...): the pair for dim -k is pad[2k-2 : 2k].
    k = -inp.dim
    pair = list(pad[2 * k - 2 : 2 * k])
    if any(p != 0 for p in pair):
        ctx.unsupported(node, "padding of the channel dim adds channels")
        return None
    return inp


# --------------------------------------------------------------------------- normalisation across channels


def _normalized_dims(ctx: RuleContext, node: torch.fx.Node) -> Optional[int]:
    """How many trailing dims a LayerNorm/RMSNorm normalises."""
    if node.op == "call_module":
        shape = getattr(ctx.module(node), "normalized_shape", None)
    else:
        shape = _arg(node, 1, "normalized_shape", None)
    if isinstance(shape, int):
        return 1
    if isinstance(shape, (list, tuple)):
        return len(shape)
    return None


#: The LayerNorm-like module types of this torch (RMSNorm from 2.4): one tuple that the rules,
#: builders, weight views and keep_class all read.
LAYER_NORM_MODULES: Tuple[type, ...] = (nn.LayerNorm,) + ((nn.RMSNorm,) if hasattr(nn, "RMSNorm") else ())
_LAYER_NORMS: Tuple[Any, ...] = (nn.LayerNorm, F.layer_norm) + (
    (nn.RMSNorm, F.rms_norm) if hasattr(nn, "RMSNorm") and hasattr(F, "rms_norm") else ())
_RMS_NORM: Any = getattr(F, "rms_norm", None)


@register_rule(*_LAYER_NORMS)
def _layer_norm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """LayerNorm/RMSNorm: over the channel dim it *renormalises*, elsewhere channels pass through.

    Its mean and variance (RMSNorm: mean square) run over every channel, so a removed channel,
    even zeroed, still counts in the denominators: no rewrite equals the masked reference. The
    smaller norm over the kept channels is still a well-defined function, so the last-dim case
    (``normalized_shape`` of one entry, over the channels) is prunable with its weight and bias
    as ``channelwise`` members, the ``normalized_shape`` argument of the functional form
    rewritten, and its groups marked renormalising (:meth:`RuleContext.renormalise`): they are
    proven against a reference whose norms use the kept channels only
    (:func:`fxprune.testing.masked_reference`). Any other norm over the channels (several
    normalised dims, a flattened map) stays whole (frozen by design).
    """
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    k = _normalized_dims(ctx, node)
    if k is None:
        ctx.unsupported(node, "LayerNorm with a normalized_shape that is not a constant")
        return None
    if inp.dim < -k:
        return inp  # normalises dims after the channel dim: each channel on its own
    what = _what(ctx, node)
    weight = _arg(node, 2, "weight") if node.op != "call_module" else None
    if isinstance(weight, torch.fx.Node) and weight.op == "get_attr" and str(weight.target).endswith(".weight"):
        # A norm module traced through (timm's LayerNorm, LayerNorm2d): named by its module.
        what = f"{_label(node)} of {str(weight.target)[:-len('.weight')]}"
    if k != 1 or inp.dim != -1 or inp.block != 1:
        ctx.freeze(node, [inp], f"{what} normalises over the channel dim together with other dims")
        return inp
    if node.op == "call_module":
        norm = ctx.module(node)
        if tuple(getattr(norm, "normalized_shape", ())) != (inp.channels,):
            ctx.unsupported(node, f"{what} whose normalized_shape does not match its {inp.channels} input channels")
            return None
        ctx.member(node, "channelwise", inp)
    else:
        shape_at: Tuple[Union[int, str], ...] = (1,) if len(node.args) > 1 else ("normalized_shape",)
        shape = _arg(node, 1, "normalized_shape")
        size = shape if isinstance(shape, int) else shape[0]
        if size != inp.channels:
            ctx.unsupported(node, f"{what} whose normalized_shape does not match its {inp.channels} input channels")
            return None
        names = ("weight", "eps") if node.target is _RMS_NORM else ("weight", "bias", "eps")
        for i, arg_name in enumerate(names[:-1]):
            arg = _arg(node, i + 2, arg_name)
            if arg is not None and not _layer_tensor(ctx, node, arg, 0, inp, "channelwise", arg_name):
                return inp
        ctx.rewrite_args(node, ArgPatch(shape_at if isinstance(shape, int) else shape_at + (0,), ChannelCount.of([inp])))
    ctx.renormalise(node, inp, what)
    return inp


@register_rule(nn.GroupNorm, F.group_norm)
def _group_norm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """GroupNorm: channels in ``num_groups`` consecutive groups, each normalised on its own.

    Removing a whole GroupNorm group leaves every other group's statistics as they were, so
    it is exact (the masked reference zeroes the group's input and affine tensors: its output
    is zero, the others' unchanged): the input's channels come in :class:`WholeUnits` of
    ``C // num_groups``, the affine weight/bias are per-channel members, and the rewrite
    builds the layer with ``num_groups`` = the kept units (``F.group_norm``: the argument is
    patched). ``num_groups=1`` (PoolFormer's norm) normalises each sample over every channel
    and position, like a LayerNorm over the channels: its width *renormalises* (the statistics
    run over the kept channels only; :func:`fxprune.testing.masked_group_norm` is its
    reference), so its groups are marked so and it stays one group of the kept channels.
    """
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else inp.rank
    if node.op == "call_module":
        gn = ctx.module(node)
        num_groups, channels = gn.num_groups, gn.num_channels  # type: ignore[union-attr]
    else:
        num_groups = _arg(node, 1, "num_groups", None)
        channels = inp.channels
    if rank is None or inp.dim != 1 - rank or inp.block != 1 or channels != inp.channels:
        ctx.unsupported(node, "GroupNorm over a dim not known to be the channel dim")
        return None
    if isinstance(num_groups, bool) or not isinstance(num_groups, int) or num_groups < 1 or channels % num_groups:
        ctx.unsupported(node, f"GroupNorm with num_groups {num_groups!r} that is not a constant dividing its channels")
        return None
    out = replace(inp, rank=rank)
    unit = channels // num_groups
    what = _what(ctx, node)
    single = num_groups == 1 and channels > 1
    if not single:
        ctx.require(node, inp, WholeUnits(unit), f"{what}: {num_groups} groups of {unit} channels")
    if node.op == "call_module":
        ctx.member(node, "channelwise", inp)
    else:
        if not single:  # num_groups=1 stays 1: one group of however many channels are kept
            path: Tuple[Union[int, str], ...] = (1,) if len(node.args) > 1 else ("num_groups",)
            ctx.rewrite_args(node, ArgPatch(path, ChannelCount(tuple(inp.groups), 1, unit)))
        for i, arg_name in ((2, "weight"), (3, "bias")):
            arg = _arg(node, i, arg_name)
            if arg is not None and not _layer_tensor(ctx, node, arg, 0, inp, "channelwise", arg_name):
                return out
    if single:
        # One group of every channel: dropping a channel changes the others' statistics.
        ctx.renormalise(node, inp, f"{what} (num_groups=1)")
    return out


@register_rule(nn.LocalResponseNorm, F.local_response_norm)
def _cross_channel_norm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # LocalResponseNorm's statistics run over neighbouring channels: removing one channel
    # changes the others. Frozen by design.
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    ctx.freeze(node, [inp], f"{_what(ctx, node)} normalises across channels")
    return inp


@register_rule(nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
def _instance_norm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # Statistics per sample and channel over the spatial dims: each channel is independent,
    # so it is a per-channel op like BatchNorm (affine weight/bias, optional running stats).
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else inp.rank
    mod = ctx.module(node)
    if rank is None or inp.dim != 1 - rank or inp.block != 1 or getattr(mod, "num_features", inp.channels) != inp.channels:
        ctx.unsupported(node, "InstanceNorm over a dim not known to be the channel dim")
        return None
    ctx.member(node, "channelwise", inp)
    return replace(inp, rank=rank)


def _what(ctx: RuleContext, node: torch.fx.Node) -> str:
    if node.op == "call_module":
        return f"{type(ctx.module(node)).__name__} {node.target}"
    return f"{getattr(node.target, '__name__', node.target)} at {node.name}"


# --------------------------------------------------------------------------- attention


def _freeze_all_inputs(ctx: RuleContext, node: torch.fx.Node, reason: str) -> None:
    layouts: List[Optional[Layout]] = [ctx.layout(n) for n in node.all_input_nodes]
    for n in node.all_input_nodes:
        elements = ctx.elements(n)
        if elements is not None:
            layouts.extend(elements.layouts())
    ctx.freeze(node, layouts, reason)


def _mha_unsupported(ctx: RuleContext, node: torch.fx.Node, mha: nn.Module) -> Optional[str]:
    """Why the heads of this ``nn.MultiheadAttention`` call cannot be pruned, or None."""
    names = ("query", "key", "value", "key_padding_mask", "need_weights", "attn_mask", "average_attn_weights", "is_causal")
    bound = {n: _arg(node, i, n) for i, n in enumerate(names)}
    if set(node.kwargs) - set(names) or len(node.args) > len(names):
        return "arguments this rule does not know"
    if not (isinstance(bound["query"], torch.fx.Node) and bound["query"] is bound["key"] is bound["value"]):
        return "not self-attention (query, key and value differ)"
    if isinstance(mha, nn.MultiheadAttention) and (not mha._qkv_same_embed_dim or mha.in_proj_weight is None
                                                   or mha.bias_k is not None or mha.add_zero_attn):
        return "separate q/k/v weights, bias_k/bias_v or add_zero_attn"
    if any(bound[n] not in (None, False) for n in ("key_padding_mask", "attn_mask", "is_causal")):
        return "a mask (it may index the heads)"
    if mha.num_heads < 2:  # type: ignore[operator]
        return "a single head"
    return None


def _mha_widths(mha: nn.Module) -> Tuple[int, int, int, int]:
    """``(input width, heads' width, head_dim, output width)`` of an attention module."""
    if isinstance(mha, PrunedMultiheadAttention):
        return mha.in_dim, mha.num_heads * mha.head_dim, mha.head_dim, mha.out_dim
    return mha.embed_dim, mha.embed_dim, mha.head_dim, mha.embed_dim  # type: ignore[return-value]


@register_rule(nn.MultiheadAttention, PrunedMultiheadAttention)
def _multihead_attention(ctx: RuleContext, node: torch.fx.Node) -> TupleLayout:
    """``nn.MultiheadAttention`` self-attention: three sets of channels, whole heads among them.

    Its input columns (``in``: ``in_proj_weight`` dim 1) read the input's channels, its output
    rows (``out``: ``out_proj`` rows) are a new group like a Linear's, and its heads
    (``channelwise``: ``embed_dim`` head channels, owning rows ``c``, ``E + c``, ``2E + c`` of
    the packed q/k/v projection and column ``c`` of ``out_proj``) are a group of their own in
    :class:`WholeUnits` of ``head_dim``. Removing a whole head is exact (its zeroed q and k give
    uniform weights over a zeroed v). ``nn.MultiheadAttention`` ties the heads' width to
    ``embed_dim``, so the rewrite builds :class:`fxprune.layers.PrunedMultiheadAttention`.
    Masks (which may index heads), cross-attention and separate q/k/v weights are frozen.

    With the rule option ``attention="head_dim"`` the heads' channels are one group of
    ``head_dim`` channels repeated in every head instead (each head keeps the same dims of q, k
    and v: one packed projection sizes them alike); the rebuilt layer keeps the original scale.
    """
    mha = ctx.module(node)
    width_in, width, head_dim, width_out = _mha_widths(mha)
    what = f"{type(mha).__name__} {node.target}"
    why = _mha_unsupported(ctx, node, mha)
    inp = ctx.layout(_arg(node, 0, "query"))
    if why is None and inp is not None and (inp.dim != -1 or inp.block != 1 or inp.channels != width_in):
        why = "an input whose channels are not its last dim"
    if why is not None:
        _freeze_all_inputs(ctx, node, f"{what}: {why}")
        return TupleLayout((None, None))
    rank = ctx.rank(_arg(node, 0, "query"))
    if ctx.option("attention") == "head_dim":
        dims = ctx.produce(node, head_dim, -1, rank, tag="head_dims")
        ctx.member(node, "channelwise", Layout(dims.groups * (width // head_dim), dims.sizes * (width // head_dim), -1, rank, 1))
    else:
        heads = ctx.produce(node, width, -1, rank, tag="heads")
        ctx.member(node, "channelwise", heads)
        ctx.require(node, heads, WholeUnits(head_dim), f"{what}: {width // head_dim} heads of {head_dim}")
    if inp is not None:
        ctx.member(node, "in", inp)
    out = ctx.produce(node, width_out, -1, rank)
    ctx.member(node, "out", out)
    return TupleLayout((out, None))


@register_rule(F.scaled_dot_product_attention)
def _sdpa(ctx: RuleContext, node: torch.fx.Node) -> None:
    # q @ k^T sums over the head dim, so q and k channels are coupled pairwise; not modelled.
    _freeze_all_inputs(ctx, node, "scaled_dot_product_attention couples query and key channels")
    return None


# --------------------------------------------------------------------------- attention heads
#
# timm's Attention (and code written like it) projects the tokens with one Linear to
# 3 x heads x head_dim rows, views them as (B, N, 3, H, D), permutes to (3, B, H, N, D), unbinds
# q, k and v, attends head by head (scaled_dot_product_attention, or q @ k^T, softmax, @ v),
# and merges the heads back with transpose(1, 2).reshape(B, N, H * D) before the output
# projection. Each head is computed from its own q, k and v rows and feeds its own D columns of
# the projection, so removing a whole head (its q, k and v rows and its projection columns) is
# exactly zeroing it: the masked head's logits are 0, its softmax uniform over zero values.
# The rule for the first view recognises the whole block and accounts for it as one region:
# the qkv rows are cut into q, k and v pieces tied into one group of H * D channels in whole
# units of D (the heads), the head count in the first view and the width in the merging
# reshape are rewritten from the kept heads, and the merged tensor carries the heads' group.
# Anything else in the region (a mask with a head dim, an op that is not per head) leaves the
# pattern unmatched, and the ordinary rules freeze the channels as before.


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _only_user(node: torch.fx.Node) -> Optional[torch.fx.Node]:
    users = list(node.users)
    return users[0] if len(users) == 1 else None


def _int_arg(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _dims_are(node: torch.fx.Node, rank: int, want: Sequence[int]) -> bool:
    dims = _dims_arg(node, "dims")
    return isinstance(dims, (list, tuple)) and all(_int_arg(d) for d in dims) and [d % rank for d in dims] == list(want)


def _swaps(node: torch.fx.Node, rank: int, a: int, b: int) -> bool:
    """Whether ``node`` is ``transpose(a, b)`` (either order, negative dims allowed) of a rank-``rank`` tensor."""
    if node.op == "call_method" and node.target in ("transpose", "swapaxes", "swapdims") or \
            node.op == "call_function" and node.target in (torch.transpose, torch.swapaxes, torch.swapdims):
        pair = [v for v in node.args[1:3]]
        return len(pair) == 2 and all(_int_arg(d) for d in pair) and sorted(d % rank for d in pair) == sorted((a, b))
    return False


_MATMULS: Tuple[Any, ...] = (operator.matmul, torch.matmul, "matmul", torch.ops.aten.matmul.default)
# The exported (ATen) spellings the lift leaves as they are: the block prunes alike on both paths.
_SDPAS: Tuple[Any, ...] = (F.scaled_dot_product_attention, torch.ops.aten.scaled_dot_product_attention.default)
_UNBINDS: Tuple[Any, ...] = ("unbind", torch.unbind, torch.ops.aten.unbind.int)


def _is_matmul(node: torch.fx.Node) -> bool:
    return node.op in ("call_function", "call_method") and node.target in _MATMULS and len(node.args) == 2 and not node.kwargs


def _per_head_step(ctx: RuleContext, node: torch.fx.Node, head_dim: int) -> bool:
    """Whether ``node`` maps a (B, H, N, D) tensor (its first argument) head by head, D unchanged.

    Identity and dropout; a LayerNorm/RMSNorm over the head dim alone (timm's q/k norm: its
    D-sized parameters are not touched by removing heads); scaling by a Python number.
    """
    if node.op == "call_module":
        mod = ctx.module(node)
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return len(node.args) == 1 and not node.kwargs
        return isinstance(mod, LAYER_NORM_MODULES) and tuple(mod.normalized_shape) == (head_dim,) and len(node.args) == 1
    if node.op == "call_function" and node.target in (F.dropout,):
        return True
    if node.op == "call_function" and node.target in _LAYER_NORMS:
        shape = _arg(node, 1, "normalized_shape", None)
        return isinstance(shape, (list, tuple)) and tuple(shape) == (head_dim,)
    if node.target in (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"):
        return len(node.args) == 2 and not node.kwargs and _is_number(node.args[1])
    return False


def _score_step(ctx: RuleContext, node: torch.fx.Node, rank: int = 4) -> bool:
    """Whether ``node`` maps attention scores (B, H, N, N), or (B, G, H, N, N) at ``rank`` 5, head
    by head: scaling, softmax over keys, dropout."""
    if node.op == "call_module":
        mod = ctx.module(node)
        if isinstance(mod, (nn.Identity, nn.Dropout)):
            return True
        return isinstance(mod, nn.Softmax) and mod.dim is not None and mod.dim % rank == rank - 1
    if node.target in (operator.mul, operator.truediv, torch.mul, torch.div, "mul", "div"):
        return len(node.args) == 2 and _is_number(node.args[1])
    if node.target in (F.softmax, torch.softmax, "softmax"):
        dim = _arg(node, 1, "dim", None)
        return _int_arg(dim) and dim % rank == rank - 1
    return node.target is F.dropout


def _has_softmax(ctx: RuleContext, nodes: Sequence[torch.fx.Node]) -> bool:
    """Whether one of ``nodes`` is a softmax (function, method or ``nn.Softmax``)."""
    return any(n.target in (F.softmax, torch.softmax, "softmax") or (n.op == "call_module" and isinstance(ctx.module(n), nn.Softmax))
               for n in nodes)


def _no_tensor_input(arg: Any) -> bool:
    """An sdpa argument that cannot carry heads: a constant, or an input whose default is None/a bool."""
    if not isinstance(arg, torch.fx.Node):
        return True
    return arg.op == "placeholder" and len(arg.args) == 1 and (arg.args[0] is None or isinstance(arg.args[0], bool))


def _chain(ctx: RuleContext, start: torch.fx.Node, ok: Callable[[torch.fx.Node], bool],
           region: List[torch.fx.Node]) -> torch.fx.Node:
    """Follow ``start``'s single users while ``ok`` says they are per-head steps on it (added to ``region``)."""
    node = start
    while True:
        user = _only_user(node)
        if user is None or not user.args or user.args[0] is not node or not ok(user):
            return node
        if any(isinstance(a, torch.fx.Node) and a is not node and a.op != "get_attr" for a in user.all_input_nodes):
            return node  # a per-head step reads nothing else (a norm's own weights aside)
        region.append(user)
        node = user


def _timm_function(node: torch.fx.Node, name: str) -> bool:
    target = node.target
    return node.op == "call_function" and getattr(target, "__name__", None) == name and \
        str(getattr(target, "__module__", "")).startswith("timm.")


def _timm_no_mask(scores: torch.fx.Node, region: List[torch.fx.Node]) -> Optional[torch.fx.Node]:
    """Past timm's mask helpers on ``scores``, where they add nothing per head; None if they may.

    timm's non-fused attention calls ``maybe_add_mask(attn, resolve_self_attn_mask(N, attn,
    attn_mask, is_causal))`` (wrapped functions, opaque to fx). With ``attn_mask`` None (a
    constant, or an input defaulting to None) the mask is None or causal (N x N): either way
    the same for every head. ``scores`` itself when the helpers are absent.
    """
    users = list(scores.users)
    if len(users) == 1:
        return scores
    if len(users) != 2:
        return None
    resolve = next((u for u in users if _timm_function(u, "resolve_self_attn_mask")), None)
    add = next((u for u in users if _timm_function(u, "maybe_add_mask")), None)
    if resolve is None or add is None or len(resolve.args) != 4 or resolve.kwargs or resolve.args[1] is not scores:
        return None
    mask, causal = resolve.args[2], resolve.args[3]
    no_mask = mask is None or (isinstance(mask, torch.fx.Node) and _no_tensor_input(mask) and mask.args[0] is None)
    if not no_mask or not _no_tensor_input(causal):
        return None
    if list(resolve.users) != [add] or add.args != (scores, resolve) or add.kwargs:
        return None
    region += [resolve, add]
    return add


# Swin's window attention (timm's WindowAttention, non-fused path) adds two things to the scores
# between q @ k^T and the softmax, both per head:
#
# - a relative position bias: a table parameter [(2W-1)^2, H], one column per head, gathered
#   by a constant index, viewed (N, N, H), permuted to (H, N, N) (and unsqueezed to (1, H, N, N)).
#   Removing a head removes its column: the table is an operand read one position per head
#   (TensorSlot.per = head_dim), and a literal H in the view is rewritten from the kept heads.
#   The masked reference need not zero the column: the removed head's scores only ever weigh
#   its zeroed values.
# - the shifted windows' mask: the scores viewed (B, nW, H, N, N), a constant (1, nW, 1, N, N)
#   added (the same for every head), viewed back (B * nW, H, N, N); both head counts rewritten.


@dataclass(frozen=True)
class _HeadSite:
    """Something per head on the scores' way: a view's head count, or a bias table's head column."""

    node: torch.fx.Node
    index: int  # the view's size index of the heads, or the table's head dim
    table: Optional[torch.fx.Node] = None  # the table parameter (get_attr) a gather reads


def _strip(node: Any, keep: Callable[[torch.fx.Node], bool], chain: List[torch.fx.Node]) -> Any:
    """Walk back from ``node`` through single-user nodes ``keep`` accepts (added to ``chain``)."""
    while isinstance(node, torch.fx.Node) and keep(node) and len(node.users) == 1:
        chain.append(node)
        node = node.args[0]
    return node


def _relative_bias(ctx: RuleContext, bias: Any, heads: int, n: int, sites: List[_HeadSite],
                   region: List[torch.fx.Node]) -> bool:
    """Whether ``bias`` is a relative position bias gathered from a [T, heads] table (then recorded)."""
    shape = ctx.shape(bias)
    if shape is None or tuple(shape) not in ((1, heads, n, n), (heads, n, n)) or ctx.layout(bias) is not None:
        return False
    chain: List[torch.fx.Node] = []
    squeezed = lambda x: x.target in ("contiguous",) and len(x.args) == 1 or \
        x.target in ("unsqueeze", torch.unsqueeze) and len(x.args) == 2 and x.args[1] == 0  # noqa: E731
    perm = _strip(bias, squeezed, chain)
    if not isinstance(perm, torch.fx.Node) or len(perm.users) != 1 or \
            not (perm.target in ("permute", torch.permute) and _dims_are(perm, 3, (2, 0, 1))):
        return False
    view = perm.args[0]
    if not _is_view(view) or len(view.users) != 1 or tuple(ctx.shape(view) or ()) != (n, n, heads):
        return False
    vsizes = _view_sizes(view)
    if not isinstance(vsizes, (list, tuple)) or len(vsizes) != 3 or not (_int_arg(vsizes[2]) and vsizes[2] in (-1, heads)):
        return False
    gather = view.args[0]
    if not isinstance(gather, torch.fx.Node) or len(gather.users) != 1:
        return False
    if gather.target is operator.getitem and len(gather.args) == 2:
        table, index = gather.args
    elif gather.target is torch.ops.aten.index.Tensor and len(gather.args) == 2 and \
            isinstance(gather.args[1], (list, tuple)) and len(gather.args[1]) == 1:
        table, index = gather.args[0], gather.args[1][0]  # table[index] on an exported graph
    else:
        return False
    if not isinstance(table, torch.fx.Node) or table.op != "get_attr" or tuple(ctx.shape(table) or ()) [1:] != (heads,) \
            or len(ctx.shape(table) or ()) != 2:
        return False
    # The index: a constant or buffer (maybe viewed flat), never something the input computes.
    source = _strip(index, lambda x: _is_view(x), [])
    if not isinstance(source, torch.fx.Node) or source.op != "get_attr" or ctx.layout(index) is not None:
        return False
    region += [gather, view, perm] + chain[::-1]
    sites.append(_HeadSite(gather, 1, table))
    if vsizes[2] != -1:
        sites.append(_HeadSite(view, 2))
    return True


def _bias_and_mask(ctx: RuleContext, scores: torch.fx.Node, heads: int, sites: List[_HeadSite],
                   region: List[torch.fx.Node]) -> torch.fx.Node:
    """Past Swin's relative position bias and shifted-window mask on ``scores`` (see above).

    Scores (B, H, N, N), or with more leading dims (MaxViT's (B, G, H, N, N)): a bias (1, H, N, N)
    broadcasts over them alike. The shifted-window mask is Swin's, on (B, H, N, N) scores only.
    """
    shape = ctx.shape(scores)
    if shape is None or len(shape) < 4 or shape[-3] != heads or shape[-2] != shape[-1]:
        return scores
    n = int(shape[-1])
    while True:
        user = _only_user(scores)
        if user is None or user.target not in (operator.add, torch.add, "add") or len(user.args) != 2 or user.kwargs:
            if len(shape) == 4 and _is_view(user) and tuple(ctx.shape(user) or ())[2:] == (heads, n, n):
                masked = _window_mask(ctx, scores, user, heads, n, sites, region)
                if masked is not None:
                    scores = masked
                    continue
            return scores
        other = user.args[1] if user.args[0] is scores else user.args[0]
        if other is scores or not _relative_bias(ctx, other, heads, n, sites, region):
            return scores
        region.append(user)
        scores = user


def _window_mask(ctx: RuleContext, scores: torch.fx.Node, view: torch.fx.Node, heads: int, n: int,
                 sites: List[_HeadSite], region: List[torch.fx.Node]) -> Optional[torch.fx.Node]:
    """``scores.view(B, nW, H, N, N) + mask.view(1, nW, 1, N, N)`` viewed back to (B*nW, H, N, N); None if not."""
    sizes = _view_sizes(view)
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 5 or not (isinstance(sizes[2], torch.fx.Node) or sizes[2] == heads):
        return None
    add = _only_user(view)
    if add is None or add.target not in (operator.add, torch.add, "add") or len(add.args) != 2 or add.kwargs \
            or add.args[0] is not view:
        return None
    mask = add.args[1]
    mshape = ctx.shape(mask)
    # The mask is a constant or buffer, maybe unsqueezed/viewed to (1, nW, 1, N, N): the same
    # for every head (size 1 on the head dim), whatever its values.
    shaping = lambda x: x.target in ("unsqueeze", torch.unsqueeze, "contiguous") or _is_view(x)  # noqa: E731
    source = _strip(mask, shaping, [])
    if not isinstance(mask, torch.fx.Node) or not isinstance(source, torch.fx.Node) or source.op != "get_attr" \
            or mshape is None or len(mshape) != 5 or mshape[2] != 1 or ctx.layout(mask) is not None:
        return None
    back = _only_user(add)
    if not _is_view(back) or back.args[0] is not add or tuple(ctx.shape(back) or ()) != tuple(ctx.shape(scores) or ()):
        return None
    bsizes = _view_sizes(back)
    if not isinstance(bsizes, (list, tuple)) or len(bsizes) != 4 or not (isinstance(bsizes[1], torch.fx.Node) or bsizes[1] == heads):
        return None
    region += [view, add, back]
    sites += [_HeadSite(view, 2), _HeadSite(back, 1)]
    return back


def _attention_heads(ctx: RuleContext, node: torch.fx.Node, inp: Layout, in_shape: Tuple[int, ...],
                     out_shape: Tuple[int, ...], sizes: Any) -> bool:
    """Recognise a timm-style attention block starting at the view ``node``; True if it was claimed."""
    if inp.rank != 3 or inp.dim != -1 or inp.block != 1 or len(inp.groups) != 1 or len(out_shape) != 5:
        return False
    if tuple(out_shape[:2]) != tuple(in_shape[:2]) or out_shape[2] != 3:
        return False
    heads, head_dim = int(out_shape[3]), int(out_shape[4])
    width = heads * head_dim
    if 3 * width != in_shape[2] or inp.channels != in_shape[2] or heads < 1:
        return False
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 5:
        return False
    for j in (2, 3, 4):
        # Each of 3, H, D is -1, its literal, or computed (``C // self.num_heads`` from the
        # embedding width in older timm): the shapes say what it is now, and it is rewritten
        # from the kept heads (H) or as the constant it stays (3, D), whatever it was computed from.
        if not (isinstance(sizes[j], torch.fx.Node) or _int_arg(sizes[j]) and sizes[j] in (-1, out_shape[j])):
            return False
    region: List[torch.fx.Node] = []
    perm = _only_user(node)
    if perm is None or not (perm.target in ("permute", torch.permute) and _dims_are(perm, 5, (2, 0, 3, 1, 4))):
        return False
    region.append(perm)
    # q, k, v: qkv.unbind(0), or qkv[0], qkv[1], qkv[2]
    users = list(perm.users)
    if len(users) == 1 and users[0].target in _UNBINDS:
        unbind = users[0]
        dim = _arg(unbind, 1, "dim", 0)
        if not _int_arg(dim) or dim % 5 != 0:
            return False
        region.append(unbind)
        users = list(unbind.users)
    pieces: Dict[int, torch.fx.Node] = {}
    for user in users:
        if user.target is torch.ops.aten.select.int and len(user.args) == 3 and not user.kwargs \
                and user.args[0] is perm and _int_arg(user.args[1]) and user.args[1] % 5 == 0:
            index = user.args[2]  # qkv[i] on an exported graph
        elif user.target is operator.getitem:
            index = user.args[1]
            if isinstance(index, tuple) and len(index) == 1:
                index = index[0]  # an exported select lifted to getitem: qkv[(i,)] is qkv[i]
        else:
            return False
        if not _int_arg(index) or index % 3 in pieces:
            return False
        pieces[index % 3] = user
    if sorted(pieces) != [0, 1, 2]:
        return False
    region.extend(pieces[i] for i in range(3))
    sites: List[_HeadSite] = []  # Swin's per-head bias and mask (see _bias_and_mask)
    per_head = lambda n: _per_head_step(ctx, n, head_dim)  # noqa: E731
    q, k, v = (_chain(ctx, pieces[i], per_head, region) for i in range(3))
    core = _only_user(q)
    if core is None:
        return False
    if core.op == "call_function" and core.target in _SDPAS:
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        bound = {n: _arg(core, i, n) for i, n in enumerate(names)}
        if (bound["query"], bound["key"], bound["value"]) != (q, k, v) or _only_user(k) is not core or _only_user(v) is not core:
            return False
        if bound["enable_gqa"] not in (None, False) or not all(_no_tensor_input(bound[n]) for n in names[3:]):
            return False
        if set(core.kwargs) - set(names) or len(core.args) > len(names):
            return False
        region.append(core)
        out = core
    else:
        # q @ k.transpose(-2, -1), per-head score steps, @ v
        kt = _only_user(k)
        if kt is None or not _swaps(kt, 4, 2, 3) or _only_user(kt) is not core or not _is_matmul(core) \
                or core.args[0] is not q or core.args[1] is not kt:
            return False
        region += [kt, core]
        scores = _timm_no_mask(core, region)
        if scores is None:
            return False
        scores = _bias_and_mask(ctx, scores, heads, sites, region)
        scores = _chain(ctx, scores, lambda n: _score_step(ctx, n), region)
        out = _only_user(scores)
        if out is None or not _is_matmul(out) or out.args[0] is not scores or out.args[1] is not v or _only_user(v) is not out:
            return False
        if not _has_softmax(ctx, region[region.index(core):]):
            return False  # attention without a softmax is not the pattern (nothing else is known to be per head)
        region.append(out)
    # merge: .transpose(1, 2).reshape(B, N, H * D)
    found = _merged_heads(out)
    if found is None:
        return False
    merge_t, merged = found
    merged_shape = ctx.shape(merged)
    if merged_shape is None or tuple(merged_shape) != (in_shape[0], in_shape[1], width):
        return False
    if merged.op == "call_function":
        msizes = _arg(merged, 1, "shape", None)
    else:
        msizes = merged.args[1] if len(merged.args) == 2 and isinstance(merged.args[1], (list, tuple)) else merged.args[1:]
    if not isinstance(msizes, (list, tuple)) or len(msizes) != 3 or msizes[2] == -1 and any(m == -1 for m in msizes[:2]):
        return False
    region += [merge_t, merged]
    for n in region[:-1]:
        if any(u not in region for u in n.users):
            return False  # a region tensor read elsewhere: not a self-contained attention block
    if ctx.option("attention") == "head_dim" and _head_dims_exact(ctx, region, core):
        # One view sizes q, k and v alike, so every head keeps the same dims of all three.
        cut = ctx.split(node, inp, [head_dim] * (3 * heads))
        dims = ctx.unify(node, cut)
        _patch_head_dims(ctx, node, sizes, 3, heads, dims)
        _head_dim_scale(ctx, core, head_dim)
        _head_dim_sites(ctx, sites, heads)
        if msizes[2] != -1:
            ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, 2), ChannelCount(tuple(dims.groups), heads)))
        ctx.claim(node, region, {merged.name: Layout(dims.groups * heads, dims.sizes * heads, -1, 3, 1)})
        return True
    # The pattern holds: q, k and v rows are one group of heads.
    thirds = ctx.split(node, inp, [width] * 3)
    ctx.unify(node, thirds)
    group = thirds[0]
    reason = f"attention heads at {node.name}: {heads} heads of {head_dim}"
    ctx.require(node, group, WholeUnits(head_dim), reason)
    if isinstance(sizes[3], torch.fx.Node) or sizes[3] != -1:
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, 3), ChannelCount(tuple(group.groups), 1, head_dim)))
    for j in (2, 4):
        if isinstance(sizes[j], torch.fx.Node):
            ctx.rewrite_args(node, ArgPatch(_view_size_path(node, j), int(out_shape[j])))
    if msizes[2] != -1:
        # The heads' width, whether written as a literal or read from the input's shape (older
        # timm: ``B, N, C = x.shape``, C the embedding width): the kept heads' width either way.
        ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, 2), ChannelCount.of([group])))
    _per_head_sites(ctx, sites, group, head_dim)
    ctx.claim(node, region, {merged.name: Layout(group.groups, group.sizes, -1, 3, 1)})
    return True


def _merged_heads(out: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, torch.fx.Node]]:
    """``out.transpose(1, 2)`` (or ``permute(0, 2, 1, 3)``) and the view merging the heads after it, if that follows."""
    merge_t = _only_user(out)
    if merge_t is None or merge_t.args[0] is not out or not (_swaps(merge_t, 4, 1, 2) or
                                                          (merge_t.target in ("permute", torch.permute) and _dims_are(merge_t, 4, (0, 2, 1, 3)))):
        return None
    merged = _only_user(merge_t)
    if merged is None or not _is_view(merged) or merged.args[0] is not merge_t:
        return None
    return merge_t, merged


def _view_sizes(node: torch.fx.Node) -> Any:
    if node.op == "call_function":
        return _arg(node, 1, "shape", None)
    return node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]


def _is_view(node: Optional[torch.fx.Node]) -> bool:
    return node is not None and node.target in ("view", "reshape", torch.reshape)


def _head_sizes_ok(sizes: Any, shape: Tuple[int, ...], head_at: int) -> bool:
    """Sizes of a view to ``shape`` whose dim ``head_at`` is the heads and the last dim head_dim."""
    if not isinstance(sizes, (list, tuple)) or len(sizes) != len(shape):
        return False
    for j in (head_at, len(shape) - 1):
        if not (isinstance(sizes[j], torch.fx.Node) or _int_arg(sizes[j]) and sizes[j] in (-1, shape[j])):
            return False
    return True


def _patch_heads(ctx: RuleContext, node: torch.fx.Node, sizes: Any, head_at: int, group: Layout, head_dim: int) -> None:
    """Rewrite a head count (literal or computed) from the kept heads, a computed head_dim as the constant it stays."""
    if isinstance(sizes[head_at], torch.fx.Node) or sizes[head_at] != -1:
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, head_at), ChannelCount(tuple(group.groups), 1, head_dim)))
    last = len(sizes) - 1
    if isinstance(sizes[last], torch.fx.Node):
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, last), head_dim))


# Pruning head_dim instead of heads (rule option ``attention="head_dim"``): every head keeps
# the same dims of q and k, and the same dims of v, the head count stays. Exact as whole heads
# are: a removed q/k dim adds zero to every score (the masked reference zeroes its rows), a
# removed v dim gives a zero output column that the projection's removed column would have
# read. Two things must hold beyond the heads' pattern: the scores' scale must not follow
# head_dim (a literal scale does not; ``scaled_dot_product_attention`` without ``scale=``
# takes it from q's last dim, so the rewrite passes the original one), and nothing per head
# may read head_dim (a q/k norm over it would renormalise and its weight would need slicing:
# such a block prunes whole heads instead).


def _head_dims_exact(ctx: RuleContext, region: Sequence[torch.fx.Node], core: torch.fx.Node) -> bool:
    """Whether the attention ``region`` keeps its function when each head loses the same dims."""
    for n in region:
        if n.op == "call_module" and isinstance(ctx.module(n), LAYER_NORM_MODULES) or \
                n.op == "call_function" and n.target in _LAYER_NORMS:
            return False
    if core.op == "call_function" and core.target in _SDPAS:
        scale = core.kwargs.get("scale")
        return scale is None or _is_number(scale)
    return True


def _head_dim_scale(ctx: RuleContext, core: torch.fx.Node, head_dim: int) -> None:
    """Pin ``scaled_dot_product_attention``'s default scale to the original head_dim's."""
    if core.op == "call_function" and core.target in _SDPAS and core.kwargs.get("scale") is None:
        ctx.rewrite_args(core, ArgPatch(("scale",), 1.0 / math.sqrt(head_dim)))


def _patch_head_dims(ctx: RuleContext, node: torch.fx.Node, sizes: Any, head_at: int, heads: int, dims: Layout) -> None:
    """A head view's sizes under head_dim pruning: the head count as the constant it stays, the last dim the kept dims."""
    if isinstance(sizes[head_at], torch.fx.Node):
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, head_at), heads))
    last = len(sizes) - 1
    if isinstance(sizes[last], torch.fx.Node) or sizes[last] != -1:
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, last), ChannelCount.of([dims])))


def _head_dim_sites(ctx: RuleContext, sites: Sequence[_HeadSite], heads: int) -> None:
    """Per-head bias tables stay whole (every head stays); a computed head count becomes the constant."""
    for site in sites:
        if site.table is None:
            ctx.rewrite_args(site.node, ArgPatch(_view_size_path(site.node, site.index), heads))


def _separate_heads(ctx: RuleContext, node: torch.fx.Node, inp: Layout, in_shape: Tuple[int, ...],
                    out_shape: Tuple[int, ...], sizes: Any) -> bool:
    """Hugging Face-style attention: separate q, k and v Linears, each viewed (B, N, H, D) and
    transposed to (B, H, N, D), ``scaled_dot_product_attention``, heads merged back, ``o_proj``.

    Recognised at q's view (``node``); k's and v's projections come later in the walk, so their
    views are claimed with a tie: the three projections' rows become one group in whole units
    of D. A mask must broadcast over the heads (size 1 on the head dim). Otherwise: False.
    """
    if inp.rank != 3 or inp.dim != -1 or inp.block != 1 or len(inp.groups) != 1 or len(out_shape) != 4:
        return False
    heads, head_dim = int(out_shape[2]), int(out_shape[3])
    width = heads * head_dim
    if tuple(out_shape[:2]) != tuple(in_shape[:2]) or width != in_shape[2] or heads < 1 or not _head_sizes_ok(sizes, out_shape, 2):
        return False
    tq = _only_user(node)
    if tq is None or tq.args[0] is not node or not _swaps(tq, 4, 1, 2):
        return False
    core = _only_user(tq)
    if core is None or core.op != "call_function" or core.target not in _SDPAS:
        return False
    names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
    bound = {n: _arg(core, i, n) for i, n in enumerate(names)}
    if bound["query"] is not tq or set(core.kwargs) - set(names) or len(core.args) > len(names):
        return False
    region: List[torch.fx.Node] = [tq]
    ties: Dict[str, Layout] = {}
    others: List[Tuple[torch.fx.Node, Any]] = []
    for which in ("key", "value"):
        t = bound[which]
        if not isinstance(t, torch.fx.Node) or not _swaps(t, 4, 1, 2) or _only_user(t) is not core:
            return False
        view = t.args[0]
        if not isinstance(view, torch.fx.Node) or not _is_view(view) or _only_user(view) is not t:
            return False
        vshape = ctx.shape(view)
        vsizes = _view_sizes(view)
        if vshape is None or tuple(vshape) != tuple(out_shape) or not _head_sizes_ok(vsizes, tuple(vshape), 2):
            return False
        region += [view, t]
        others.append((view, vsizes))
    mask = bound["attn_mask"]
    sites: List[_HeadSite] = []  # Hugging Face Swin's per-head relative position bias in the mask
    if isinstance(mask, torch.fx.Node) and not _no_tensor_input(mask):
        mshape = ctx.shape(mask)
        if mshape is None or ctx.layout(mask) is not None:
            return False
        if len(mshape) >= 3 and mshape[-3] != 1 and not _bias_mask(ctx, mask, heads, sites, region):
            return False  # a mask with a head dim would lose its heads' alignment
    if bound["enable_gqa"] not in (None, False) or not all(_no_tensor_input(bound[n]) for n in names[4:]):
        return False
    region.append(core)
    # Merging: [reshape to (B, H, N, D)], transpose(1, 2), reshape to (B, N, H * D).
    out = core
    step = _only_user(out)
    pre: Optional[torch.fx.Node] = None
    if _is_view(step) and step.args[0] is out and ctx.shape(step) is not None and \
            tuple(ctx.shape(step)) == tuple(ctx.shape(core) or ()) and _head_sizes_ok(_view_sizes(step), tuple(ctx.shape(step)), 1):
        pre = step
        region.append(step)
        out = step
        step = _only_user(out)
    if step is None or step.args[0] is not out or not _swaps(step, 4, 1, 2):
        return False
    merged = _only_user(step)
    if merged is not None and merged.target == "contiguous" and merged.args == (step,) and not merged.kwargs:
        region.append(step)  # (B, N, H, D) made contiguous before the merge (Hugging Face's sdpa path)
        step = merged
        merged = _only_user(step)
    if not _is_view(merged) or merged.args[0] is not step:
        return False
    mshape2 = ctx.shape(merged)
    msizes = _view_sizes(merged)
    if mshape2 is None or tuple(mshape2) != (in_shape[0], in_shape[1], width) or \
            not isinstance(msizes, (list, tuple)) or len(msizes) != 3:
        return False
    region += [step, merged]
    for n in region[:-1]:
        if any(u not in region for u in n.users):
            return False
    if ctx.option("attention") == "head_dim" and _head_dims_exact(ctx, region, core):
        # q's dims (tied to k's when the walk reaches k's view) and v's own dims, alike in every
        # head; v's group is made here and filled by the tie with v's projection.
        qk = ctx.unify(node, ctx.split(node, inp, [head_dim] * heads))
        vd = ctx.produce(node, head_dim, -1, 3, tag="head_dim_v")
        _patch_head_dims(ctx, node, sizes, 2, heads, qk)
        for (view, vsizes), dims in zip(others, (qk, vd)):
            ties[view.name] = Layout(dims.groups * heads, dims.sizes * heads, -1, 3, 1)
            _patch_head_dims(ctx, view, vsizes, 2, heads, dims)
        if pre is not None:
            _patch_head_dims(ctx, pre, _view_sizes(pre), 1, heads, vd)
        if msizes[2] != -1:
            ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, 2), ChannelCount(tuple(vd.groups), heads)))
        _head_dim_scale(ctx, core, head_dim)
        _head_dim_sites(ctx, sites, heads)
        ctx.claim(node, region, {merged.name: Layout(vd.groups * heads, vd.sizes * heads, -1, 3, 1)}, ties)
        return True
    reason = f"attention heads at {node.name}: {heads} heads of {head_dim}"
    ctx.require(node, inp, WholeUnits(head_dim), reason)
    _patch_heads(ctx, node, sizes, 2, inp, head_dim)
    for view, vsizes in others:
        ties[view.name] = inp
        _patch_heads(ctx, view, vsizes, 2, inp, head_dim)
    if pre is not None:
        _patch_heads(ctx, pre, _view_sizes(pre), 1, inp, head_dim)
    if msizes[2] != -1:
        ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, 2), ChannelCount.of([inp])))
    _per_head_sites(ctx, sites, inp, head_dim)
    ctx.claim(node, region, {merged.name: Layout(inp.groups, inp.sizes, -1, 3, 1)}, ties)
    return True


# MaxViT's attention (torchvision ``RelativePositionalMultiHeadAttention``) works on windows:
# tokens (B, G, P, D), one Linear to 3 * H * DH, ``torch.chunk(qkv, 3, -1)``, each third viewed
# (B, G, P, H, DH) and permuted to (B, G, H, P, DH), scores and mixing by ``torch.einsum``
# ("B G H I D, B G H J D -> B G H I J", then "B G H I J, B G H J D -> B G H I D"), a relative
# position bias (1, H, P, P) from a [T, H] table added before the softmax, the heads permuted
# back and merged to (B, G, P, H * DH). Every step is head by head, as in timm's block above,
# so whole heads are exact. Recognised at q's view, for any number of leading dims; k's and v's
# views (other chunk pieces, or other Linears) are tied to it when the walk reaches them.

_EINSUMS: Tuple[Any, ...] = (torch.einsum, torch.ops.aten.einsum.default)


def _einsum_operands(node: Optional[torch.fx.Node]) -> Optional[Tuple[str, List[Any]]]:
    """``(equation without spaces, operands)`` of a two-operand einsum node, else None."""
    if node is None or node.op != "call_function" or node.target not in _EINSUMS or node.kwargs or not node.args:
        return None
    eq, rest = node.args[0], list(node.args[1:])
    if len(rest) == 1 and isinstance(rest[0], (list, tuple)):
        rest = list(rest[0])
    if not isinstance(eq, str) or len(rest) != 2:
        return None
    return eq.replace(" ", ""), rest


def _einsum_is(eq: str, rank: int, first: str, second: str, out: str) -> bool:
    """Whether ``eq`` reads ``prefix + first, prefix + second -> prefix + out`` over rank-``rank`` operands.

    ``first``/``second``/``out`` name the last three dims with the letters h, i, j, d (heads,
    query tokens, key tokens, head dim); the prefix (the same leading letters, or ``...``, in all
    three) stands for the batch and window dims; the letters must be distinct.
    """
    if "->" not in eq or eq.count(",") != 1:
        return False
    ins, result = eq.split("->")
    a, b = ins.split(",")
    subs = [x.replace("...", "#") for x in (a, b, result)]
    if any(len(x) < 3 for x in subs) or len({x[:-3] for x in subs}) != 1:
        return False
    prefix = subs[0][:-3]
    if "#" in prefix and (prefix.count("#") != 1 or not prefix.startswith("#")):
        return False
    if "#" not in prefix and len(prefix) != rank - 3:
        return False
    letters = {}
    for sub, want in zip(subs, (first, second, out)):
        for got, role in zip(sub[-3:], want):
            if letters.setdefault(role, got) != got:
                return False
    return len(set(letters.values())) == len(letters) and not set(letters.values()) & set(prefix)


def _swaps_last(node: Optional[torch.fx.Node], rank: int) -> bool:
    """Whether ``node`` is a permute (or transpose) of a rank-``rank`` tensor swapping dims -3 and -2 only."""
    if node is None:
        return False
    if _swaps(node, rank, rank - 3, rank - 2):
        return True
    want = list(range(rank - 3)) + [rank - 2, rank - 3, rank - 1]
    return node.target in ("permute", torch.permute) and _dims_are(node, rank, want)


def _einsum_heads(ctx: RuleContext, node: torch.fx.Node, inp: Layout, in_shape: Tuple[int, ...],
                  out_shape: Tuple[int, ...], sizes: Any) -> bool:
    """Recognise MaxViT-style einsum attention at q's view ``node`` (see above); True if it was claimed."""
    r = len(in_shape)
    if r < 3 or inp.rank != r or inp.dim != -1 or inp.block != 1 or len(inp.groups) != 1 or len(out_shape) != r + 1:
        return False
    heads, head_dim = int(out_shape[-2]), int(out_shape[-1])
    width = heads * head_dim
    if tuple(out_shape[:-2]) != tuple(in_shape[:-1]) or width != in_shape[-1] or inp.channels != width or heads < 2 \
            or not _head_sizes_ok(sizes, out_shape, r - 1):
        return False
    if any(_channel_size_reads(ctx, a) for a in sizes[:-2]):
        return False
    rank = r + 1
    per_head = lambda n: _per_head_step(ctx, n, head_dim)  # noqa: E731
    region: List[torch.fx.Node] = []
    q = _only_user(node)
    if not _swaps_last(q, rank) or q.args[0] is not node:
        return False
    region.append(q)
    q = _chain(ctx, q, per_head, region)
    core = _only_user(q)
    found = _einsum_operands(core)
    if found is None or found[1][0] is not q or not _einsum_is(found[0], rank, "hid", "hjd", "hij"):
        return False

    def projection(operand: Any) -> Optional[Tuple[torch.fx.Node, Any]]:
        """k's or v's view, walking back from the einsum operand past per-head steps and the permute."""
        chain: List[torch.fx.Node] = []
        perm = _strip(operand, per_head, chain)
        if not isinstance(perm, torch.fx.Node) or len(perm.users) != 1 or not _swaps_last(perm, rank):
            return None
        view = perm.args[0]
        if not isinstance(view, torch.fx.Node) or not _is_view(view) or _only_user(view) is not perm or view is node:
            return None
        vshape, vsizes = ctx.shape(view), _view_sizes(view)
        if vshape is None or tuple(vshape) != tuple(out_shape) or not _head_sizes_ok(vsizes, tuple(vshape), r - 1) \
                or any(_channel_size_reads(ctx, a) for a in vsizes[:-2]):
            return None
        region.extend([view, perm] + chain[::-1])
        return view, vsizes

    k = projection(found[1][1])
    if k is None or _only_user(found[1][1]) is not core:
        return False
    region.append(core)
    sites: List[_HeadSite] = []
    sshape = ctx.shape(core)
    if sshape is None or len(sshape) != rank or sshape[-3] != heads or sshape[-2] != sshape[-1]:
        return False
    scores = _bias_and_mask(ctx, core, heads, sites, region)  # the relative position bias
    scores = _chain(ctx, scores, lambda s: _score_step(ctx, s, rank), region)
    out = _only_user(scores)
    found2 = _einsum_operands(out)
    if found2 is None or found2[1][0] is not scores or not _einsum_is(found2[0], rank, "hij", "hjd", "hid"):
        return False
    if not _has_softmax(ctx, region[region.index(core):]):
        return False  # attention without a softmax is not the pattern
    v = projection(found2[1][1])
    if v is None or _only_user(found2[1][1]) is not out:
        return False
    region.append(out)
    back = _only_user(out)
    if not _swaps_last(back, rank) or back.args[0] is not out:
        return False
    merged = _only_user(back)
    if merged is not None and merged.target == "contiguous" and merged.args == (back,) and not merged.kwargs:
        region.append(back)
        back = merged
        merged = _only_user(back)
    if not _is_view(merged) or merged.args[0] is not back or tuple(ctx.shape(merged) or ()) != tuple(in_shape):
        return False
    msizes = _view_sizes(merged)
    if not isinstance(msizes, (list, tuple)) or len(msizes) != r or \
            (msizes[-1] == -1 and any(m == -1 for m in msizes[:-1])) or any(_channel_size_reads(ctx, a) for a in msizes[:-1]):
        return False
    region += [back, merged]
    for x in region[:-1]:
        if any(u not in region for u in x.users):
            return False  # a region tensor read elsewhere: not a self-contained attention block
    order = {x: i for i, x in enumerate(node.graph.nodes)}
    if any(order[x] < order[node] for x in region):
        return False  # a region node the walk has already visited
    reason = f"attention heads at {node.name}: {heads} heads of {head_dim}"
    ctx.require(node, inp, WholeUnits(head_dim), reason)
    _patch_heads(ctx, node, sizes, r - 1, inp, head_dim)
    ties: Dict[str, Layout] = {}
    for view, vsizes in (k, v):
        ties[view.name] = inp
        _patch_heads(ctx, view, vsizes, r - 1, inp, head_dim)
    if msizes[-1] != -1:
        # The heads' width, a literal or read from the tokens' shape (MaxViT: ``B, G, P, D = x.shape``).
        ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, r - 1), ChannelCount.of([inp])))
    _per_head_sites(ctx, sites, inp, head_dim)
    ctx.claim(node, region, {merged.name: Layout(inp.groups, inp.sizes, -1, r, 1)}, ties)
    return True


# LeViT's attention (timm ``levit.Attention``) lays q, k and v out head by head: one Linear
# (+ BatchNorm) gives (B, N, H * (2 * kd + vd)), viewed (B, N, H, 2 * kd + vd) and split along
# the last dim into q and k (kd each) and v (vd). The heads stay whole here; what is pruned is
# each head's width, alike in every head: the same kd' dims of q and k (a score q . k loses
# only the removed dims' terms, which the masked reference zeroes) and the same vd' dims of v
# (each output channel of attn @ v is one v channel mixed over tokens). Everything between
# q @ k and @ v sees only the scores, which are equal in both models, and tensors computed from
# parameters alone (the per-head position bias): exact. The merged heads carry v's kept dims
# once per head into the projection.


def _head_pieces(node: torch.fx.Node) -> Optional[Tuple[torch.fx.Node, List[int], List[torch.fx.Node], List[torch.fx.Node]]]:
    """The split of a per-head projection's view ``node`` (``(B, N, H, d)``) into q, k, v or k, v.

    Two spellings: LeViT splits the view along its last dim and permutes each piece (q and v to
    ``(B, H, N, d)``, k to ``(B, H, d, N)``); EfficientFormer permutes the view to ``(B, H, N, d)``
    first, splits that, and transposes k's piece. Returns the split, its sizes, the nodes from
    the view to the pieces (the rule's region so far) and the pieces as the attention reads them
    (``[q,] k, v``), or None.
    """
    first = _only_user(node)
    pre = first if first is not None and first.args and first.args[0] is node \
        and first.target in ("permute", torch.permute) and _dims_are(first, 4, (0, 2, 1, 3)) else None
    split = _only_user(pre) if pre is not None else first
    if split is None or split.target not in ("split", torch.split) or split.args[0] is not (node if pre is None else pre):
        return None
    if len(split.args) < 2 and not {"split_size_or_sections", "split_size"} & set(split.kwargs):
        return None
    sizes = _arg(split, 1, "split_size_or_sections", split.kwargs.get("split_size"))
    dim = _arg(split, 2, "dim", 0)
    if not isinstance(sizes, (list, tuple)) or len(sizes) not in (2, 3) or not all(_int_arg(v) for v in sizes) \
            or not _int_arg(dim) or dim % 4 != 3:
        return None
    count = len(sizes)
    got: Dict[int, torch.fx.Node] = {}
    for user in split.users:
        if user.target is not operator.getitem or not _int_arg(user.args[1]) or user.args[1] % count in got:
            return None
        got[user.args[1] % count] = user
    if sorted(got) != list(range(count)):
        return None
    region: List[torch.fx.Node] = ([pre] if pre is not None else []) + [split]
    pieces: List[torch.fx.Node] = []
    for i in range(count):
        piece, is_key = got[i], i == count - 2  # k is the piece before v
        region.append(piece)
        if pre is None:
            perm = _only_user(piece)
            want = (0, 2, 3, 1) if is_key else (0, 2, 1, 3)
            if perm is None or perm.args[0] is not piece or not (perm.target in ("permute", torch.permute)
                                                                    and _dims_are(perm, 4, want)):
                return None
            region.append(perm)
            pieces.append(perm)
        elif is_key:
            swap = _only_user(piece)
            if swap is None or swap.args[0] is not piece or not (
                    _swaps(swap, 4, 2, 3) or swap.target in ("permute", torch.permute) and _dims_are(swap, 4, (0, 1, 3, 2))):
                return None
            region.append(swap)
            pieces.append(swap)
        else:
            pieces.append(piece)
    return split, [int(v) for v in sizes], region, pieces


def _scores_to_values(ctx: RuleContext, core: torch.fx.Node, v: torch.fx.Node, region: List[torch.fx.Node]
                      ) -> Optional[torch.fx.Node]:
    """``attn @ v`` after the scores ``core`` (``q @ k``), appending the nodes between to ``region``.

    Between them only ops on the scores and tensors computed from parameters alone (a position
    bias); None otherwise. (Pruning each head's q/k dims alike leaves the scores equal in both
    models, softmax or not.)
    """
    scores = core
    for _ in range(8):
        user = _only_user(scores)
        if user is None or not user.args or user.args[0] is not scores:
            return None
        if _is_matmul(user):
            break
        others = [a for a in user.all_input_nodes if a is not scores]
        if user.op == "call_module" and not isinstance(ctx.module(user), (nn.Softmax, nn.Dropout, nn.Identity)):
            return None
        if any(not _parameters_only(a) for a in others):
            return None
        region.append(user)
        scores = user
    else:
        return None
    out = _only_user(scores)
    if out is None or out.args[:2] != (scores, v) or _only_user(v) is not out:
        return None
    region.append(out)
    return out


def _values_merged(ctx: RuleContext, core: torch.fx.Node, v: torch.fx.Node, region: List[torch.fx.Node],
                   shape: Tuple[int, ...]) -> Optional[Tuple[torch.fx.Node, Any]]:
    """The view merging the heads of ``attn @ v`` back to ``shape`` (``(B, N, H * vd)``) and its sizes.

    Walks from the scores ``core`` (:func:`_scores_to_values`) through the merge
    (:func:`_merged_heads`), appending to ``region``; None unless the merged width is the
    literal ``H * vd`` (or ``-1`` beside sizes that are no channel counts).
    """
    out = _scores_to_values(ctx, core, v, region)
    merge = _merged_heads(out) if out is not None else None
    if merge is None:
        return None
    merge_t, merged = merge
    msizes = _view_sizes(merged)
    if tuple(ctx.shape(merged) or ()) != tuple(shape) or not isinstance(msizes, (list, tuple)) or len(msizes) != 3 \
            or not (msizes[2] == shape[2] or msizes[2] == -1 and all(m != -1 for m in msizes[:2])) \
            or any(_channel_size_reads(ctx, a) for a in msizes[:2]):
        return None
    region += [merge_t, merged]
    return merged, msizes


def _self_contained(node: torch.fx.Node, region: List[torch.fx.Node]) -> bool:
    """No region node but the last is read outside the region, and the walk has not reached any."""
    inside = set(region)
    if any(u not in inside for n in region[:-1] for u in n.users):
        return False  # a region tensor read elsewhere: not a self-contained attention block
    order = {x: i for i, x in enumerate(node.graph.nodes)}
    return all(order[x] > order[node] for x in region)


def _per_head_qkv(ctx: RuleContext, node: torch.fx.Node, inp: Layout, in_shape: Tuple[int, ...],
                  out_shape: Tuple[int, ...], sizes: Any) -> bool:
    """Recognise LeViT-style per-head q/k/v at the view ``node`` (see above); True if it was claimed."""
    if inp.rank != 3 or inp.dim != -1 or inp.block != 1 or len(out_shape) != 4:
        return False
    heads, per = int(out_shape[2]), int(out_shape[3])
    if tuple(out_shape[:2]) != tuple(in_shape[:2]) or heads * per != in_shape[2] or inp.channels != in_shape[2]:
        return False
    if not isinstance(sizes, (list, tuple)) or len(sizes) != 4 or not (sizes[3] == -1 or sizes[3] == per) \
            or not (isinstance(sizes[2], torch.fx.Node) or sizes[2] == heads):
        return False
    found = _head_pieces(node)
    if found is None:
        return False
    split, pieces, region, finals = found
    if len(pieces) == 2:
        return _per_head_kv(ctx, node, inp, sizes, split, pieces, region, finals, heads, per)
    kd, kd2, vd = pieces
    if kd != kd2 or kd + kd2 + vd != per or min(kd, vd) < 1:
        return False
    q, k, v = finals
    core = _only_user(q)
    if core is None or not _is_matmul(core) or core.args[:2] != (q, k) or _only_user(k) is not core:
        return False
    region.append(core)
    found = _values_merged(ctx, core, v, region, (in_shape[0], in_shape[1], heads * vd))
    if found is None:
        return False
    merged, msizes = found
    if not _self_contained(node, region):
        return False
    widths = _head_widths(ctx, node, inp, sizes, split, pieces, heads, merged, msizes)
    if widths is None:
        return False
    vv = widths[1]
    ctx.claim(node, region, {merged.name: Layout(vv.groups * heads, vv.sizes * heads, -1, 3, 1)})
    return True


def _head_widths(ctx: RuleContext, node: torch.fx.Node, inp: Layout, sizes: Any, split: torch.fx.Node,
                 pieces: Sequence[int], heads: int, merged: torch.fx.Node, msizes: Any
                 ) -> Optional[Tuple[Layout, Layout]]:
    """Tie each head's q/k dims and v dims alike in every head; the (key dims, v dims) layouts.

    ``pieces``: one head's split of the projection at the view ``node`` (``[kd, kd, vd]`` for
    q, k, v; ``[kd, vd]`` for k, v): every piece but the last holds key dims (tied together, q's
    and k's), the last v's. The view's per-head width, the split sizes and the merged width
    are rewritten from the kept dims.
    """
    n = len(pieces)
    cut = ctx.split(node, inp, list(pieces) * heads)
    kk = ctx.unify(node, [cut[n * h + j] for h in range(heads) for j in range(n - 1)])
    vv = ctx.unify(node, [cut[n * h + n - 1] for h in range(heads)])
    if kk is None or vv is None:
        return None
    k_count, v_count = ChannelCount.of([kk]), ChannelCount.of([vv])
    if sizes[3] != -1:
        ctx.rewrite_args(node, ArgPatch(_view_size_path(node, 3), ChannelCount(k_count.groups * (n - 1) + v_count.groups)))
    for j in range(n):
        ctx.rewrite_args(split, ArgPatch(_split_where(split) + (j,), k_count if j < n - 1 else v_count))
    if msizes[2] != -1:
        ctx.rewrite_args(merged, ArgPatch(_view_size_path(merged, 2), ChannelCount(v_count.groups * heads)))
    return kk, vv


def _split_where(split: torch.fx.Node) -> Tuple[Union[int, str], ...]:
    """Where a ``split``'s sizes sit in its arguments (see :class:`ArgPatch`)."""
    if len(split.args) > 1:
        return (1,)
    return (next(k for k in ("split_size_or_sections", "split_size") if k in split.kwargs),)


def _per_head_kv(ctx: RuleContext, node: torch.fx.Node, inp: Layout, sizes: Any, split: torch.fx.Node,
                 pieces: List[int], region: List[torch.fx.Node], finals: List[torch.fx.Node], heads: int,
                 per: int) -> bool:
    """LeViT's downsampling attention (timm ``levit.AttentionDownsample``) at kv's view ``node``.

    Like :func:`_per_head_qkv`, but the projection at ``node`` gives k and v only (viewed
    ``(B, N, H, kd + vd)``, split into k and v) and q comes from its own Linear on a subsampled
    input, viewed ``(B, Nq, H, kd)``. q's channels are tied head by head to k's (the walk ties
    them when it reaches q's view, or freezes both); each head keeps the same kd' dims of q and
    k and the same vd' dims of v, exact for the same reason.
    """
    kd, vd = pieces
    if kd + vd != per or min(kd, vd) < 1:
        return False
    k, v = finals
    core = _only_user(k)
    if core is None or not _is_matmul(core) or len(core.args) < 2 or core.args[1] is not k:
        return False
    q = core.args[0]
    if not isinstance(q, torch.fx.Node) or _only_user(q) is not core or not (
            q.target in ("permute", torch.permute) and _dims_are(q, 4, (0, 2, 1, 3))):
        return False
    qview = q.args[0]
    if not isinstance(qview, torch.fx.Node) or not _is_view(qview) or _only_user(qview) is not q:
        return False
    qsrc, qshape, qsizes = qview.args[0], ctx.shape(qview), _view_sizes(qview)
    src_shape = ctx.shape(qsrc) if isinstance(qsrc, torch.fx.Node) else None
    if qshape is None or src_shape is None or len(qshape) != 4 or tuple(qshape[2:]) != (heads, kd) \
            or tuple(src_shape) != (qshape[0], qshape[1], heads * kd) or not isinstance(qsizes, (list, tuple)) \
            or len(qsizes) != 4 or not (isinstance(qsizes[2], torch.fx.Node) or qsizes[2] == heads) \
            or not (qsizes[3] == kd or qsizes[3] == -1 and all(s != -1 for s in qsizes[:3])) \
            or any(_channel_size_reads(ctx, a) for a in qsizes[:2]):
        return False
    region += [qview, q, core]
    found = _values_merged(ctx, core, v, region, (qshape[0], qshape[1], heads * vd))
    if found is None:
        return False
    merged, msizes = found
    if not _self_contained(node, region):
        return False  # (q's view before kv's is a region node the walk has visited)
    widths = _head_widths(ctx, node, inp, sizes, split, pieces, heads, merged, msizes)
    if widths is None:
        return False
    kk, vv = widths
    if qsizes[3] != -1:
        ctx.rewrite_args(qview, ArgPatch(_view_size_path(qview, 3), ChannelCount.of([kk])))
    ties = {qview.name: Layout(kk.groups * heads, kk.sizes * heads, -1, 3, 1)}
    ctx.claim(node, region, {merged.name: Layout(vv.groups * heads, vv.sizes * heads, -1, 3, 1)}, ties)
    return True


def _bias_mask(ctx: RuleContext, mask: torch.fx.Node, heads: int, sites: List[_HeadSite],
               region: List[torch.fx.Node]) -> bool:
    """Whether an attention mask with a head dim is a relative position bias gathered per head,
    or one plus a mask that is the same for every head (Hugging Face's Swin: ``bias + window mask``)."""
    shape = tuple(ctx.shape(mask) or ())
    if len(shape) != 4 or shape[1] != heads or shape[2] != shape[3]:
        return False
    n = int(shape[2])
    if _relative_bias(ctx, mask, heads, n, sites, region):
        return True
    if mask.target not in (operator.add, torch.add, "add") or len(mask.args) != 2 or mask.kwargs or len(mask.users) != 1:
        return False
    for bias, other in (mask.args, mask.args[::-1]):
        oshape = ctx.shape(other)
        if isinstance(other, torch.fx.Node) and oshape is not None and len(oshape) == 4 and oshape[1] == 1 \
                and ctx.layout(other) is None and _relative_bias(ctx, bias, heads, n, sites, region):
            region.append(mask)
            return True
    return False


def _per_head_sites(ctx: RuleContext, sites: Sequence[_HeadSite], group: Layout, head_dim: int) -> None:
    """Slice each bias table's head column with its head; rewrite each literal head count."""
    for site in sites:
        if site.table is not None:
            ctx.tensor_member(site.node, site.table, site.index, Layout(group.groups, group.sizes, -1, 2, 1),
                              per=head_dim)
        else:
            ctx.rewrite_args(site.node, ArgPatch(_view_size_path(site.node, site.index),
                                                 ChannelCount(tuple(group.groups), 1, head_dim)))


# =========================================================================== functional layers
#
# Layers called as functions on tensors the graph reads directly (``get_attr``): timm's
# BatchNormAct2d calls ``F.batch_norm(x, self.running_mean, ..., self.weight, self.bias)``,
# FrozenBatchNorm computes ``x * (w * (rv + eps).rsqrt()) + (b - rm * scale)``, weight-
# standardised convs call ``F.conv2d`` on a normalised weight. Their tensors are declared as
# tensor slots (:meth:`RuleContext.tensor_member`) with the roles of the module forms, so they
# are group members: scored, sliced in the rewrite, masked in the proof. A tensor whose value is
# computed in a way these rules cannot follow channel by channel is refused (fail closed).

# Ops on a parameter that change only its dtype, device or memory layout: its channels stay put
# (the same methods as the element-wise conversions above).
_CAST_METHODS = _CONVERSIONS
_CAST_FUNCTIONS: Tuple[Any, ...] = (torch.clone, torch.detach)


def _is_cast(node: torch.fx.Node) -> bool:
    if node.op == "call_method":
        return str(node.target) in _CAST_METHODS
    return node.op == "call_function" and node.target in _CAST_FUNCTIONS


@dataclass(frozen=True)
class _Source:
    """Where a tensor argument comes from: its ``get_attr`` leaves, each with the dim that holds
    the channels, the nodes between them and the reader, and ``view`` sizes to patch."""

    leaves: Tuple[Tuple[torch.fx.Node, int], ...]
    via: Tuple[torch.fx.Node, ...]
    patches: Tuple[Tuple[torch.fx.Node, int], ...] = ()  # (view node, position of the literal count in its sizes)


def _cast_source(arg: Any) -> Optional[_Source]:
    """The ``get_attr`` node ``arg`` is, possibly through casts (``self.weight.to(x.dtype)``)."""
    via: List[torch.fx.Node] = []
    node = arg
    while isinstance(node, torch.fx.Node) and _is_cast(node) and node.args:
        via.append(node)
        node = node.args[0]
    if not isinstance(node, torch.fx.Node) or node.op != "get_attr":
        return None
    return _Source(((node, 0),), tuple(via))


def _vector_pos(shape: Optional[Sequence[int]], channels: int) -> Optional[int]:
    """The dim (from the end) of the only non-1 dim of ``shape`` if it holds ``channels``; 0 if every
    dim is 1 (a scalar-like value); None otherwise."""
    if shape is None:
        return None
    wide = [i for i, s in enumerate(shape) if s != 1]
    if not wide:
        return 0
    if len(wide) == 1 and shape[wide[0]] == channels:
        return wide[0] - len(shape)
    return None


_VECTOR_RESHAPES: Tuple[Any, ...] = ("view", "reshape", torch.reshape, "unsqueeze", torch.unsqueeze,
                                     "squeeze", torch.squeeze, "flatten", torch.flatten)


def _channel_expression(ctx: RuleContext, arg: torch.fx.Node, channels: int, depth: int = 0) -> Optional[_Source]:
    """``arg`` as a per-channel expression of parameters, or None.

    Accepted: a parameter or buffer whose only non-1 dim holds the ``channels`` (``[C]``,
    ``[1, C, 1, 1]``, ``[C, 1, 1]``), cast, reshaped to another such shape (a literal ``C`` in a
    ``view`` is patched by the rewrite), and combined element-wise with others like it or with
    scalars (FrozenBatchNorm's ``w * (rv + eps).rsqrt()``). Every such expression maps channel
    ``c`` to channel ``c``, so slicing each leaf slices the result.
    """
    if depth > 32 or _vector_pos(ctx.shape(arg), channels) is None:
        return None
    if arg.op == "get_attr":
        shape = ctx.shape(arg)
        pos = _vector_pos(shape, channels)
        if not pos:  # a scalar-like leaf needs no slicing: it is a constant of the expression
            return _Source((), ())
        return _Source(((arg, len(shape) + pos),), ())  # type: ignore[arg-type]
    if arg.op not in ("call_function", "call_method"):
        return None
    inputs = [n for n in arg.all_input_nodes]
    patches: List[Tuple[torch.fx.Node, int]] = []
    if _is_cast(arg):
        inputs = inputs[:1]
    elif arg.target in _VECTOR_RESHAPES:
        if arg.target in ("view", "reshape", torch.reshape):
            listed = len(arg.args) == 2 and isinstance(arg.args[1], (list, tuple))
            sizes = list(arg.args[1] if listed else arg.args[1:]) if arg.op == "call_method" else list(_arg(arg, 1, "shape", ()))
            if not all(isinstance(s, int) and s in (1, -1, channels) for s in sizes) or sizes.count(channels) > 1 \
                    or (channels in sizes and -1 in sizes):
                return None
            if channels in sizes:
                patches.append((arg, sizes.index(channels)))
        elif any(isinstance(a, torch.fx.Node) for a in list(arg.args[1:]) + list(arg.kwargs.values())):
            return None
        inputs = inputs[:1]
    elif arg.target is operator.getitem:
        # ``self.bias[None, :, None, None]``: new axes and full slices only, a pure reshape.
        index = arg.args[1]
        items = index if isinstance(index, tuple) else (index,)
        if not all(it is None or it is Ellipsis or _full_slice(it) for it in items):
            return None
        inputs = inputs[:1]
    elif not _is_pointwise(ctx, arg):
        return None
    leaves: List[Tuple[torch.fx.Node, int]] = []
    via: List[torch.fx.Node] = [arg]
    for n in inputs:
        found = _channel_expression(ctx, n, channels, depth + 1)
        if found is None:
            return None
        leaves.extend(found.leaves)
        via.extend(found.via)
        patches.extend(found.patches)
    return _Source(tuple(leaves), tuple(via), tuple(patches))


def _is_pointwise(ctx: RuleContext, node: torch.fx.Node) -> bool:
    """Whether ``node`` is an element-wise op of broadcast operands (the analysis' rule table says so)."""
    rule = lookup_rule(node, None, getattr(ctx, "rules", None))
    return rule is _elementwise or rule is _binary


def _rewrite_views(ctx: RuleContext, patches: Iterable[Tuple[torch.fx.Node, int]], layout: Layout) -> None:
    """Declare the literal channel count of each ``view``/``reshape`` on the way from a sliced
    tensor to its reader (``self.bias.view(1, C, 1, 1)``, a standardised weight's
    ``w.reshape(1, O, -1)``) an argument rewrite: it becomes the kept count of ``layout``."""
    count = ChannelCount.of([layout], int(layout.block or 1))
    for view, pos in patches:
        ctx.rewrite_args(view, ArgPatch(_view_size_path(view, pos), count))


def channel_operand(ctx: RuleContext, node: torch.fx.Node, operand: torch.fx.Node, layout: Layout) -> bool:
    """Declare ``operand`` of ``node`` a per-channel parameter expression sliced with ``layout``'s channels.

    True if it is one (:func:`_channel_expression`): each parameter it reads becomes a tensor
    slot (``operand`` role) sliced with the channels; False if not (the caller refuses the node).
    """
    found = _channel_expression(ctx, operand, layout.channels)
    if found is None or layout.block != 1:
        return False
    for leaf, dim in found.leaves:
        ctx.tensor_member(node, leaf, dim, layout, via=found.via)
    _rewrite_views(ctx, found.patches, layout)
    return True


def _layer_tensor(ctx: RuleContext, node: torch.fx.Node, arg: Any, dim: int, layout: Layout, role: str, kind: str,
                  conv_groups: int = 1, size: Optional[int] = None) -> bool:
    """Declare a functional layer's tensor ``arg`` (channels on ``dim``), or refuse/freeze the node.

    ``arg`` must be a parameter or buffer (possibly cast). Anything else cannot be sliced: a
    parameter expression is refused (a warning unless the group is frozen anyway), a tensor
    computed from the input freezes the channels (frozen by design).
    """
    source = _cast_source(arg)
    shape = ctx.shape(arg)
    want = layout.channels * int(layout.block or 1) if size is None else size
    if source is not None and shape is not None and len(shape) > dim and shape[dim] == want:
        ctx.tensor_member(node, source.leaves[0][0], dim, layout, role=role, kind=kind, conv_groups=conv_groups,
                          via=source.via)
        return True
    what = f"{kind} {getattr(arg, 'name', arg)} of {_label(node)} at {node.name}"
    if isinstance(arg, torch.fx.Node) and _parameters_only(arg):
        ctx.refuse(node, [layout], f"the {what} is computed from parameters in a way whose channels cannot be followed",
                   "compute it from the parameter with element-wise ops only, or register a rule for the layer")
    else:
        ctx.freeze(node, [layout], f"the {what} is not a parameter")
    return False


# Positional order of the per-channel tensors after the input. ``torch.batch_norm`` and
# ``torch.instance_norm`` are the ATen ops, which take (input, weight, bias, running_mean,
# running_var, training/use_input_stats, momentum, eps, cudnn_enabled); the ``F`` forms put the
# running statistics first. The keyword names are the same in both.
_NORM_TENSORS = ("running_mean", "running_var", "weight", "bias")
_ATEN_NORM_TENSORS = ("weight", "bias", "running_mean", "running_var")
_FUNCTIONAL_NORMS: Dict[Any, Tuple[str, ...]] = {
    F.batch_norm: _NORM_TENSORS, F.instance_norm: _NORM_TENSORS,
    torch.batch_norm: _ATEN_NORM_TENSORS, torch.instance_norm: _ATEN_NORM_TENSORS,
}


@register_rule(*_FUNCTIONAL_NORMS)
def _functional_norm(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``F.batch_norm``/``F.instance_norm`` (and ``torch.batch_norm``/``torch.instance_norm``, in
    ATen argument order) on parameters and buffers: a per-channel op like the module.

    Statistics run per channel (over the batch, or per sample over the spatial dims), so
    every channel is independent; ``running_mean``, ``running_var``, ``weight`` and ``bias``
    are indexed by the channel dim 1.
    """
    inp = _first_layout(ctx, node)
    if inp is None:
        return None  # e.g. the weight standardisation of a StdConv2d (see _standardised_weight)
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else inp.rank
    name = _label(node)
    if rank is None or inp.dim != 1 - rank or not isinstance(inp.block, int):  # per position: any block
        ctx.unsupported(node, f"{name} over a dim not known to be the channel dim")
        return None
    out = replace(inp, rank=rank)
    instance = node.target in (F.instance_norm, torch.instance_norm)
    for i, arg_name in enumerate(_FUNCTIONAL_NORMS[node.target]):
        arg = _arg(node, i + 1, arg_name)
        if arg is None:
            continue
        # InstanceNorm's scale is not scored (as for nn.InstanceNorm*d): kind "scale".
        kind = "scale" if (instance and arg_name == "weight") else arg_name
        if not _layer_tensor(ctx, node, arg, 0, inp, "channelwise", kind):
            return out
    return out


_ROW_REDUCTIONS = frozenset({"mean", "sum", "amax", "amin", "std", "var", "norm"})


@dataclass(frozen=True)
class _Filters:
    """A weight computed filter by filter from one parameter (see :func:`_filter_expression`)."""

    param: torch.fx.Node
    via: Tuple[torch.fx.Node, ...]
    patches: Tuple[Tuple[torch.fx.Node, int], ...]  # (view node, position of the literal row count)
    mixes_inputs: bool  # a reduction or reshape over the other dims: input channels cannot be removed


def _filter_expression(ctx: RuleContext, arg: Any, rows: int, depth: int = 0) -> Optional[Tuple[_Filters, int]]:
    """``(filters, row dim)`` if ``arg`` is computed from one parameter row by row (output channel
    by output channel), else None.

    Accepted, from the parameter up: casts; element-wise ops with scalars or other such
    expressions of the same parameter; reductions over dims other than the row dim with
    ``keepdim=True`` (``w - w.mean((1, 2, 3), keepdim=True)``); reshapes that keep the rows
    as one dim (``w.reshape(1, O, -1)``, ``.reshape_as(w)``: a literal ``O`` is patched);
    ``F.batch_norm`` with batch statistics and no affine or running tensors over the rows
    (timm's ``StdConv2d`` weight standardisation). Each output row then depends on its own
    parameter row only, so slicing the parameter's rows slices the result's.
    """
    if not isinstance(arg, torch.fx.Node) or depth > 32:
        return None
    shape = ctx.shape(arg)
    if shape is None:
        return None
    if arg.op == "get_attr":
        return (_Filters(arg, (), (), False), 0) if len(shape) >= 1 and shape[0] == rows else None
    if arg.op not in ("call_function", "call_method"):
        return None
    target = arg.target

    def below(n: Any) -> Optional[Tuple[_Filters, int]]:
        return _filter_expression(ctx, n, rows, depth + 1)

    def grow(found: _Filters, row: int, *, mixes: bool = False) -> Tuple[_Filters, int]:
        return _Filters(found.param, found.via + (arg,), found.patches, found.mixes_inputs or mixes), row

    if _is_cast(arg):
        inner = below(arg.args[0])
        return None if inner is None else grow(*inner)
    if target in ("reshape_as", "view_as", "reshape", "view"):
        inner = below(arg.args[0])
        if inner is None:
            return None
        found, row = inner
        in_shape = ctx.shape(arg.args[0])
        if in_shape is None or math.prod(in_shape[:row]) != 1:
            return None
        # The rows must stay one dim with nothing but size-1 dims before it.
        out_row = next((j for j, size in enumerate(shape) if size != 1), None)
        if out_row is None or shape[out_row] != rows:
            return None
        patches: List[Tuple[torch.fx.Node, int]] = []
        if target in ("reshape", "view"):
            listed = len(arg.args) == 2 and isinstance(arg.args[1], (list, tuple))
            sizes = list(arg.args[1] if listed else arg.args[1:])
            if len(sizes) != len(shape) or any(isinstance(v, torch.fx.Node) for v in sizes) \
                    or any(v not in (1, -1) for j, v in enumerate(sizes) if j != out_row):
                return None  # another literal would not follow the pruned rows
            if sizes[out_row] == rows:
                patches.append((arg, out_row))
            elif sizes[out_row] != -1:
                return None
        else:
            other = arg.args[1] if len(arg.args) > 1 else None
            if not (isinstance(other, torch.fx.Node) and other.op == "get_attr" and other is found.param):
                return None  # reshape_as the parameter itself: it is sliced alike
        return _Filters(found.param, found.via + (arg,), found.patches + tuple(patches), True), out_row
    if target is F.batch_norm:
        if any(_arg(arg, i, n) is not None for i, n in ((1, "running_mean"), (2, "running_var"), (3, "weight"), (4, "bias"))) \
                or _arg(arg, 5, "training", False) is not True:
            return None
        inner = below(arg.args[0])
        if inner is None or inner[1] != 1:
            return None  # batch statistics per dim 1: that must be the rows
        return grow(*inner, mixes=True)
    name = str(target) if arg.op == "call_method" else getattr(target, "__name__", "")
    if name in _ROW_REDUCTIONS and (arg.op == "call_method" or getattr(torch, name, None) is target):
        inner = below(arg.args[0])
        if inner is None:
            return None
        dims = _arg(arg, 1, "dim", None) if name != "norm" else arg.kwargs.get("dim", arg.args[2] if len(arg.args) > 2 else None)
        norm = _normalize_dims(dims, len(ctx.shape(arg.args[0]) or ()))
        keepdim = arg.kwargs.get("keepdim", False)
        if norm is None or keepdim is not True or (inner[1] - len(ctx.shape(arg.args[0]) or ())) in norm:
            return None
        return grow(*inner, mixes=True)
    if _is_pointwise(ctx, arg):
        found_any: Optional[Tuple[_Filters, int]] = None
        via: Tuple[torch.fx.Node, ...] = ()
        patches_all: Tuple[Tuple[torch.fx.Node, int], ...] = ()
        mixes = False
        for n in arg.all_input_nodes:
            inner = below(n)
            if inner is None or (found_any is not None and (inner[0].param is not found_any[0].param or inner[1] != found_any[1])):
                return None
            if ctx.shape(n) is None or len(ctx.shape(n)) != len(shape):  # type: ignore[arg-type]
                return None
            found_any = inner
            via += inner[0].via
            patches_all += inner[0].patches
            mixes = mixes or inner[0].mixes_inputs
        if found_any is None:
            return None
        return _Filters(found_any[0].param, tuple(dict.fromkeys(via + (arg,))), tuple(dict.fromkeys(patches_all)), mixes), found_any[1]
    return None


_FUNCTIONAL_CONVS: Dict[Any, int] = {F.conv1d: 1, F.conv2d: 2, F.conv3d: 3}


@register_rule(*_FUNCTIONAL_CONVS)
def _functional_conv(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``F.conv*d(x, weight, bias, stride, padding, dilation, groups)``: the rules of ``nn.Conv*d``
    with the weight and bias as tensor slots (a depthwise conv's ``groups`` follows the channels)."""
    spatial = _FUNCTIONAL_CONVS[node.target]
    weight, bias, groups = _arg(node, 1, "weight"), _arg(node, 2, "bias"), _arg(node, 6, "groups", 1)
    inp = _first_layout(ctx, node)
    wshape = ctx.shape(weight)
    if wshape is None or len(wshape) != spatial + 2 or isinstance(groups, bool) or not isinstance(groups, int):
        if inp is not None:
            ctx.unsupported(node, f"{_label(node)} whose weight shape or groups is unknown",
                            "pass example_inputs so shapes can be propagated")
        return None
    out_channels, in_channels = int(wshape[0]), int(wshape[1]) * groups
    rank = _conv_rank(ctx, node, spatial, inp)
    dim = -(spatial + 1)
    if inp is not None and (inp.dim != dim or inp.block != 1 or inp.channels != in_channels):
        ctx.unsupported(node, "convolution input whose channel dim does not match the layer")
        return None
    computed = _filter_expression(ctx, weight, out_channels) if _cast_source(weight) is None else None
    std = computed[0] if computed is not None and computed[1] == 0 else None
    if groups == in_channels == out_channels and groups > 1 and inp is not None and std is None:
        # Depthwise: a per-channel op; ``groups`` must follow the kept count.
        if _layer_tensor(ctx, node, weight, 0, inp, "channelwise", "weight"):
            ctx.rewrite_args(node, ArgPatch(("groups",) if "groups" in node.kwargs else (6,), ChannelCount.of([inp])))
            if bias is not None:
                _layer_tensor(ctx, node, bias, 0, inp, "channelwise", "bias")
        return replace(inp, rank=rank)
    out = ctx.produce(node, out_channels, dim, rank)
    if groups > 1:
        what = f"grouped convolution {node.name} (groups={groups})"
        ctx.require_blocks(node, out, groups, what)
        if inp is not None:
            if len(inp.groups) == 1:
                ctx.require_blocks(node, inp, groups, what)
            else:
                ctx.freeze(node, [inp], f"{what} reads a concatenation of {len(inp.groups)} groups")
    if std is not None:
        # A weight computed filter by filter (weight standardisation, centring): rows are sliced.
        ctx.tensor_member(node, std.param, 0, out, role="out", kind="weight", via=std.via)
        _rewrite_views(ctx, std.patches, out)
        if inp is None:
            pass
        elif std.mixes_inputs or groups > 1:
            ctx.freeze(node, [inp], f"the weight of {node.name} is computed from each filter as a whole "
                                    "(e.g. weight standardisation): its input channels cannot be removed")
        else:
            ctx.tensor_member(node, std.param, 1, inp, role="in", kind="weight", via=std.via)
    else:
        ok = _layer_tensor(ctx, node, weight, 0, out, "out", "weight")
        if ok and inp is not None:
            _layer_tensor(ctx, node, weight, 1, inp, "in", "weight", conv_groups=groups, size=in_channels // groups)
        elif inp is not None:
            ctx.freeze(node, [inp], f"the weight of {node.name} cannot be sliced")
    if bias is not None:
        _layer_tensor(ctx, node, bias, 0, out, "out", "bias")
    return out


@register_rule(F.linear)
def _functional_linear(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """``F.linear(x, weight, bias)``: the rules of ``nn.Linear`` with the weight and bias as tensor slots."""
    weight, bias = _arg(node, 1, "weight"), _arg(node, 2, "bias")
    inp = _first_layout(ctx, node)
    wshape = ctx.shape(weight)
    if wshape is None or len(wshape) != 2:
        if inp is not None:
            ctx.unsupported(node, "linear whose weight shape is unknown", "pass example_inputs so shapes can be propagated")
        return None
    out_features, in_features = int(wshape[0]), int(wshape[1])
    shape = ctx.shape(node)
    rank = len(shape) if shape is not None else (inp.rank if inp is not None else ctx.rank(node.args[0]) if node.args else None)
    in_layout: Optional[Layout] = None
    if inp is not None:
        block = inp.block
        if inp.dim != -1 or (block is None and in_features % max(inp.channels, 1)):
            ctx.unsupported(node, "linear over a dimension that is not the channel dim")
            return None
        block = in_features // inp.channels if block is None else block
        if inp.channels * block != in_features:
            ctx.unsupported(node, "linear whose in_features do not match its input channels")
            return None
        in_layout = replace(inp, block=block)
    out = ctx.produce(node, out_features, -1, rank)
    ok = _layer_tensor(ctx, node, weight, 0, out, "out", "weight")
    if in_layout is not None:
        if ok:
            _layer_tensor(ctx, node, weight, 1, in_layout, "in", "weight", size=in_features)
        else:
            ctx.freeze(node, [in_layout], f"the weight of {node.name} cannot be sliced")
    if bias is not None:
        _layer_tensor(ctx, node, bias, 0, out, "out", "bias")
    return out


@register_rule(nn.PReLU, F.prelu)
def _prelu(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """PReLU: one slope per channel of dim 1 (``num_parameters=C``) is sliced with the channels;
    a single shared slope (``num_parameters=1``) is an element-wise op."""
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    if node.op == "call_module":
        count = ctx.module(node).weight.numel()  # type: ignore[union-attr]
        weight = None
    else:
        weight = _arg(node, 1, "weight")
        shape = ctx.shape(weight)
        count = None if shape is None else math.prod(shape)
    if count == 1:
        return inp
    rank = inp.rank
    channel_dim = None if rank is None else (1 if rank >= 2 else 0) - rank
    if count is None or channel_dim is None or inp.dim != channel_dim or inp.block != 1 or count != inp.channels:
        ctx.unsupported(node, "PReLU whose slopes are not indexed by the channel dim")
        return None
    if weight is None:
        ctx.member(node, "channelwise", inp)
    else:
        _layer_tensor(ctx, node, weight, 0, inp, "operand", "operand")
    return inp


# =========================================================================== element-wise completeness
#
# Which ops are element-wise is PyTorch's own knowledge: ATen tags every op that computes each
# output element from the same-index elements of its (broadcast) inputs ``torch.Tag.pointwise``.
# Every op whose overloads all carry that tag (and return one tensor) is element-wise in its
# ``torch``/``torch.special``/``torch.nn.functional`` and ``Tensor`` method forms too: channel
# ``c`` maps to channel ``c`` (a tensor among the other arguments is a broadcast operand). A name
# the table already has (``add``, ``where``, ...) keeps its own rule.


def pointwise_op_names() -> List[str]:
    """The ATen op names whose every (functional) overload is tagged ``torch.Tag.pointwise``.

    >>> names = pointwise_op_names()
    >>> {"abs", "erf", "pow", "clamp", "sigmoid"} <= set(names), "max" in names, "softmax" in names
    (True, False, False)
    """
    names = []
    # Every registered ATen op by name: ``dir(torch.ops.aten)`` lists only the packets some code
    # has already touched, so the rule table would depend on what ran before the import.
    registered = {op.split("::", 1)[1].split(".", 1)[0] for op in torch._C._dispatch_get_all_op_names()
                  if op.startswith("aten::")}
    for name in sorted(registered):
        if name.startswith("_"):
            continue
        packet = getattr(torch.ops.aten, name, None)
        if not isinstance(packet, torch._ops.OpOverloadPacket):
            continue
        overloads = [getattr(packet, o) for o in packet.overloads()]
        # Out= and in-place forms aside, and the scalar-math forms (``acos.int``) that take no tensor.
        functional = [op for op in overloads if not op._schema.is_mutable
                      and any(isinstance(a.type, torch.TensorType) for a in op._schema.arguments)]
        # max(x) reduces, max(x, y) is element-wise: a name counts only if every form is.
        if functional and all(torch.Tag.pointwise in op.tags and len(op._schema.returns) == 1
                                 and isinstance(op._schema.returns[0].type, torch.TensorType) for op in functional):
            names.append(name)
    return sorted(names)


# Activations of torch.nn.modules.activation that are not element-wise, and why (each has its
# own rule, or none: an op with no rule is frozen with a warning).
NON_ELEMENTWISE_ACTIVATIONS: Dict[str, str] = {
    "Softmax": "normalises over a dim (rule: softmax)",
    "Softmin": "normalises over a dim (rule: softmax)",
    "LogSoftmax": "normalises over a dim (rule: softmax)",
    "Softmax2d": "normalises over the channel dim (rule: softmax)",
    "MultiheadAttention": "mixes the embedding (rule: multi-head attention)",
    "GLU": "halves a dim and gates one half with the other (no rule: frozen)",
    "PReLU": "one slope per channel (rule: prelu)",
}

# Functional forms of activations with no ATen pointwise op of their own name.
_FUNCTIONAL_ACTIVATIONS: Tuple[Any, ...] = (
    F.softsign, F.tanhshrink, F.rrelu, F.rrelu_, F.threshold, F.threshold_, F.elu_, F.celu_, F.selu_,
    F.leaky_relu_, F.hardshrink, F.softshrink, F.logsigmoid, F.relu6, F.hardtanh, F.hardtanh_, F.silu, F.mish,
    F.hardswish, F.hardsigmoid, F.gelu, F.elu, F.celu, F.selu, F.softplus, F.leaky_relu, F.sigmoid, F.tanh,
)


def elementwise_keys() -> List[RuleKey]:
    """Every function, method name and module type the element-wise rule is registered for."""
    return [k for k, r in list(_FUNCTION_RULES.items()) + list(_METHOD_RULES.items()) + list(_MODULE_RULES.items())
            if r is _elementwise]


def _register_pointwise() -> None:
    keys: List[RuleKey] = []
    for name in pointwise_op_names():
        candidates = [getattr(torch, name, None), getattr(F, name, None)]
        if name.startswith("special_"):
            candidates.append(getattr(torch.special, name[len("special_"):], None))
        keys += [fn for fn in candidates if callable(fn) and not isinstance(fn, type) and fn not in _FUNCTION_RULES]
        for method in (name, name + "_"):
            if hasattr(torch.Tensor, method) and method not in _METHOD_RULES:
                keys.append(method)
    keys += [fn for fn in _FUNCTIONAL_ACTIVATIONS if fn not in _FUNCTION_RULES]
    import torch.nn.modules.activation as activation
    for cls_name in activation.__all__:
        cls = getattr(activation, cls_name)
        if cls_name not in NON_ELEMENTWISE_ACTIVATIONS and cls not in _MODULE_RULES:
            keys.append(cls)
    register_rule(*keys)(_elementwise)


_register_pointwise()
register_rule(nn.Softmin, F.softmin, nn.Softmax2d)(_softmax)


# --------------------------------------------------------------------------- ranks of untracked tensors

_RANK_KEEPING_MODULES: Tuple[type, ...] = ELEMENTWISE_MODULES + _POOL_MODULES + PAD_MODULES + (
    nn.Linear, nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
_RANK_KEEPING_CALLS: Tuple[Any, ...] = _ELEMENTWISE_FUNCTIONS + _POOL_FUNCTIONS + _ELEMENTWISE_METHODS + (F.pad,)


def _flat_rank(rank: Optional[int], start: Any, end: Any) -> Optional[int]:
    if not isinstance(start, int) or not isinstance(end, int):
        return None
    if end == -1 and start >= 0:
        return start + 1  # whatever the input's rank: dims before start, then one merged dim
    if rank is None:
        return None
    return rank - ((end % rank) - (start % rank))


def output_rank(ctx: RuleContext, node: torch.fx.Node, module: Optional[nn.Module]) -> Optional[int]:
    """The rank of ``node``'s output where its op fixes it without shapes, else None.

    Used for tensors without a channel layout (downstream of an op with no rule, or of the
    model input), so that a layer after them (a Linear, then BatchNorm1d) still knows the
    rank of what it produces. Only ops whose output rank is certain are answered.
    """
    if node.op == "get_attr":
        shape = ctx.shape(node)
        return None if shape is None else len(shape)
    if node.op not in ("call_module", "call_function", "call_method") or not node.args:
        return None
    first = node.args[0]
    rank = ctx.rank(first) if isinstance(first, torch.fx.Node) else None
    if any(n is not first for n in node.all_input_nodes) and node.target not in (torch.flatten, "flatten", "view", "reshape", torch.reshape):
        return None  # another tensor operand may broadcast to a higher rank
    if node.op == "call_module":
        if isinstance(module, nn.Flatten):
            return _flat_rank(rank, module.start_dim, module.end_dim)
        return rank if type(module) in _RANK_KEEPING_MODULES or isinstance(module, nn.modules.conv._ConvNd) else None
    target = node.target
    if target in (torch.flatten, "flatten"):
        return _flat_rank(rank, _arg(node, 1, "start_dim", 0), _arg(node, 2, "end_dim", -1))
    if target in (torch.reshape, "view", "reshape"):
        if node.op == "call_function":
            sizes = _arg(node, 1, "shape", None)
        else:
            sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
        if isinstance(sizes, (list, tuple)) and sizes and all(isinstance(d, (int, torch.fx.Node)) for d in sizes):
            if not (len(sizes) == 1 and isinstance(sizes[0], torch.fx.Node)):  # one node may be a whole shape
                return len(sizes)
        return None
    if target in (torch.mean, torch.sum, torch.amax, torch.amin, "mean", "sum", "amax", "amin"):
        dims, keepdim = _arg(node, 1, "dim", None), _arg(node, 2, "keepdim", False)
        norm = _normalize_dims(dims, rank) if rank is not None else None
        if keepdim is True and rank is not None:
            return rank
        return None if norm is None or rank is None else rank - len(set(norm))
    try:
        keeps = target in _RANK_KEEPING_CALLS
    except TypeError:  # an unhashable target
        keeps = False
    return rank if keeps else None


# --------------------------------------------------------------------------- torchvision ops


def _torchvision_rules() -> None:
    """Rules for torchvision's fx-wrapped functions (registered when torchvision is present)."""
    try:
        from torchvision.ops import StochasticDepth, stochastic_depth
        from torchvision.models import swin_transformer as swin
        from torchvision.models.video import swin_transformer as swin3d
    except ImportError:  # torchvision is optional for the rule table
        return

    # Stochastic depth drops whole samples (row mode) or the whole batch: it scales every
    # channel of a sample by the same factor, and is the identity in eval mode.
    register_rule(stochastic_depth, StochasticDepth)(_elementwise)

    @register_rule(swin._patch_merging_pad)
    def _patch_merging_pad(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
        # Pads H and W of a channels-last [..., H, W, C] map, then concatenates its four 2x2
        # phases along C: the output's channels are the input's, four times over.
        inp = _first_layout(ctx, node)
        if inp is None:
            return None
        if inp.dim != -1 or inp.block != 1:
            ctx.unsupported(node, "patch-merging pad of a tensor whose channels are not last")
            return None
        return replace(inp, groups=inp.groups * 4, sizes=inp.sizes * 4)

    @register_rule(swin._get_relative_position_bias, swin3d._get_relative_position_bias)
    def _relative_position_bias(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
        # ``table[index]`` viewed (N, N, H) and permuted to (1, H, N, N): the table's columns
        # become dim 1. V1's table is a parameter (no layout: the window attention that reads
        # the bias slices its head columns, checking that nothing else reads it); V2's is the
        # output of a small MLP, one channel per head, which the columns then carry. The index
        # must be a constant buffer: it only picks rows.
        table, index = _arg(node, 0, "relative_position_bias_table"), _arg(node, 1, "relative_position_index")
        lay, shape = ctx.layout(table), ctx.shape(table)
        if lay is None:
            _freeze_all_inputs(ctx, node, "a relative position bias computed from a tracked tensor")
            return None
        if shape is None or len(shape) != 2 or lay.dim % 2 != 1 or lay.block != 1 \
                or not isinstance(index, torch.fx.Node) or index.op != "get_attr" or ctx.layout(index) is not None:
            _freeze_all_inputs(ctx, node, "a relative position bias whose table is not [T, H] with a constant index")
            return None
        return replace(lay, dim=1, rank=4)

    register_rule(swin.shifted_window_attention, swin3d.shifted_window_attention_3d, window_attention)(_window_attention)


_WINDOW_ATTENTION_ARGS = ("input", "qkv_weight", "proj_weight", "relative_position_bias", "window_size", "num_heads",
                          "shift_size", "attention_dropout", "dropout", "qkv_bias", "proj_bias", "logit_scale",
                          "training", "head_dim")


def _window_attention(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    """torchvision's Swin window attention (V1, V2 and Video Swin's 3-d windows), rewritten into
    :func:`fxprune.layers.window_attention`.

    torchvision's ``shifted_window_attention`` derives ``head_dim = C // num_heads`` from its
    input width ``C`` and merges the heads back into ``C`` channels, so neither the heads nor
    the residual width can change alone within that call. fxprune's ``window_attention`` takes
    ``head_dim`` explicitly (otherwise the same computation), so the rewrite swaps the target
    and passes ``head_dim``; then the input width (qkv's columns), the output width (proj's
    rows) and the heads (qkv's q, k and v rows, proj's columns, whole units of ``head_dim``)
    are three independent sets of channels, each exact. The heads are pruned where the
    relative position bias is V1's table gathered by a constant index (each removed head takes
    its column), or V2's bias computed by a small MLP whose output channels are the heads (each
    removed head takes its row of the MLP's last Linear: the heads' group *is* those channels,
    each owning ``head_dim`` q/k/v rows and proj columns), and V2's ``logit_scale`` is a
    ``[H, 1, 1]`` parameter (each removed head takes its entry). A removed head's q, k and v are
    zero in the masked reference, so its output is zero whatever its bias: exact.
    """
    names = _WINDOW_ATTENTION_ARGS
    if getattr(node.target, "__name__", None) == "shifted_window_attention_3d":
        # Video Swin's function has no logit_scale: its training flag sits where V2's scale does.
        names = tuple(n for n in names if n != "logit_scale")
        if len(node.args) > names.index("training"):
            _freeze_all_inputs(ctx, node, f"window attention {node.name} with its flags passed by position")
            return None
    bound = {name: _arg(node, i, name) for i, name in enumerate(names)}
    x, qkv_w, proj_w, bias = bound["input"], bound["qkv_weight"], bound["proj_weight"], bound["relative_position_bias"]
    inp = ctx.layout(x)
    heads, head_dim = bound["num_heads"], bound["head_dim"]
    in_shape, qshape, pshape = ctx.shape(x), ctx.shape(qkv_w), ctx.shape(proj_w)
    if in_shape is None or qshape is None or pshape is None or len(in_shape) not in (4, 5) or not _int_arg(heads) \
            or heads < 1 or not (head_dim is None or _int_arg(head_dim)):
        _freeze_all_inputs(ctx, node, f"window attention {node.name} whose shapes or head count are unknown")
        return None
    channels = int(in_shape[-1])
    head_dim = channels // heads if head_dim is None else int(head_dim)
    width = heads * head_dim
    if tuple(qshape) != (3 * width, channels) or len(pshape) != 2 or int(pshape[1]) != width \
            or inp is not None and (inp.dim != -1 or inp.block != 1 or inp.channels != channels):
        _freeze_all_inputs(ctx, node, f"window attention {node.name} whose weights do not match its widths")
        return None
    out = ctx.produce(node, int(pshape[0]), -1, len(in_shape))
    computed = ctx.layout(bias)  # V2: a bias computed from an MLP, one channel per head
    if computed is not None and (computed.dim % 4 != 1 or computed.rank != 4 or computed.block != 1
                                 or computed.channels != heads):
        _freeze_all_inputs(ctx, node, f"window attention {node.name} whose position bias does not carry one "
                                      "channel per head on dim 1")
        return None
    if computed is not None:
        # Each of the MLP's output channels *is* a head: the heads are its channels, each
        # owning head_dim consecutive q/k/v rows and proj columns (a block of head_dim).
        group = Layout(computed.groups, computed.sizes, -1, 2, head_dim)
    else:
        group = ctx.produce(node, width, -1, 2, tag="heads")
    rows = Layout(group.groups * 3, group.sizes * 3, -1, 2, group.block)  # q, k, v: the same heads three times
    if not _layer_tensor(ctx, node, qkv_w, 0, rows, "out", "weight"):
        if inp is not None:
            ctx.freeze(node, [inp], f"the qkv weight of {node.name} cannot be sliced")
    elif inp is not None:
        _layer_tensor(ctx, node, qkv_w, 1, inp, "in", "weight")
    if bound["qkv_bias"] is not None:
        _layer_tensor(ctx, node, bound["qkv_bias"], 0, rows, "out", "bias")
    _layer_tensor(ctx, node, proj_w, 0, out, "out", "weight")
    _layer_tensor(ctx, node, proj_w, 1, group, "in", "weight")
    if bound["proj_bias"] is not None:
        _layer_tensor(ctx, node, bound["proj_bias"], 0, out, "out", "bias")
    scale = bound.get("logit_scale")
    scale_shape = ctx.shape(scale) if scale is not None else None
    # Positions per head in the heads' group: head_dim where its channels are the q/k/v rows
    # (V1), 1 where they are the bias MLP's outputs (V2, each owning a block of head_dim rows).
    per = 1 if computed is not None else head_dim
    table = None
    if computed is None:
        reason = f"attention heads at {node.name}: {heads} heads of {head_dim}"
        ctx.require(node, group, WholeUnits(head_dim), reason)
        table = _gathered_bias_table(ctx, bias, heads)
    if computed is None and table is None:
        ctx.freeze(node, [group], f"the relative position bias of {node.name} is neither a table gathered per head "
                                  "nor computed with one channel per head: its heads stay whole")
    elif scale is not None and (tuple(scale_shape or ()) != (heads, 1, 1) or _cast_source(scale) is None):
        ctx.freeze(node, [group], f"the logit scale of {node.name} is not a [heads, 1, 1] parameter: its heads stay whole")
    else:
        if table is not None:
            _per_head_sites(ctx, [_HeadSite(bias, 1, table)], group, head_dim)
        if scale is not None:
            source = _cast_source(scale)
            ctx.tensor_member(node, source.leaves[0][0], 0, replace(group, block=1), per=per, via=source.via)
        path = (5,) if len(node.args) > 5 else ("num_heads",)
        ctx.rewrite_args(node, ArgPatch(path, ChannelCount(tuple(group.groups), 1, per)))
    # Always fxprune's function with an explicit head_dim: the residual width may change alone.
    ctx.rewrite_args(node, ArgPatch(("head_dim",), head_dim), target=window_attention)
    return out


def _gathered_bias_table(ctx: RuleContext, bias: Any, heads: int) -> Optional[torch.fx.Node]:
    """The ``[T, heads]`` table parameter of torchvision's ``_get_relative_position_bias(table, index, window)``.

    None unless ``bias`` is that call, read only here, on a table read only by it and an index
    that is a constant buffer.
    """
    if not isinstance(bias, torch.fx.Node) or bias.op != "call_function" or len(bias.users) != 1 \
            or getattr(bias.target, "__name__", None) != "_get_relative_position_bias" \
            or getattr(bias.target, "__module__", None) not in ("torchvision.models.swin_transformer",
                                                                "torchvision.models.video.swin_transformer"):
        return None
    table, index = _arg(bias, 0, "relative_position_bias_table"), _arg(bias, 1, "relative_position_index")
    shape = ctx.shape(table)
    if not isinstance(table, torch.fx.Node) or table.op != "get_attr" or len(table.users) != 1 or shape is None \
            or len(shape) != 2 or int(shape[1]) != heads:
        return None
    if not isinstance(index, torch.fx.Node) or index.op != "get_attr" or ctx.layout(index) is not None:
        return None
    return table


_torchvision_rules()
