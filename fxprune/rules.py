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
"""

from __future__ import annotations

import builtins
import math
import operator
from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Iterable, List, Optional, Protocol, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "Layout",
    "RuleContext",
    "Rule",
    "register_rule",
    "lookup_rule",
    "ELEMENTWISE_MODULES",
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


class RuleContext(Protocol):
    """What a rule may ask of the analysis (implemented in :mod:`fxprune.groups`)."""

    def layout(self, arg: Any) -> Optional[Layout]: ...

    def module(self, node: torch.fx.Node) -> nn.Module: ...

    def shape(self, arg: Any) -> Optional[torch.Size]: ...

    def produce(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout: ...

    def member(self, node: torch.fx.Node, role: str, layout: Layout) -> None: ...

    def unify(self, node: torch.fx.Node, layouts: Sequence[Layout]) -> Optional[Layout]: ...

    def freeze(self, node: torch.fx.Node, layouts: Iterable[Optional[Layout]], reason: str) -> None: ...

    def unsupported(self, node: torch.fx.Node, reason: str, hint: Optional[str] = None) -> None: ...

    def warn(self, node: torch.fx.Node, reason: str) -> None: ...

    def opaque(self, node: torch.fx.Node, size: int, dim: int, rank: Optional[int]) -> Layout: ...


Rule = Callable[[RuleContext, torch.fx.Node], Optional[Layout]]
RuleKey = Union[type, Callable[..., Any], str]

# Three tables, because fx names the op differently per node kind: call_module by module type
# (exact type: a subclass may override forward), call_function by the function object,
# call_method by the method name.
_MODULE_RULES: Dict[type, Rule] = {}
_FUNCTION_RULES: Dict[Any, Rule] = {}
_METHOD_RULES: Dict[str, Rule] = {}


def register_rule(*keys: RuleKey) -> Callable[[Rule], Rule]:
    """Register ``rule`` for module types, functions and/or method names (strings).

    A rule receives the analysis context and the fx node and returns the output's layout.
    Example: teach fxprune that a custom leaf module is element-wise (channels pass through)::

        @fxprune.register_rule(MyScaledReLU)
        def _(ctx, node):
            return ctx.layout(node.args[0])
    """

    def decorate(rule: Rule) -> Rule:
        for key in keys:
            if isinstance(key, str):
                _METHOD_RULES[key] = rule
            elif isinstance(key, type) and issubclass(key, nn.Module):
                _MODULE_RULES[key] = rule
            elif callable(key):
                _FUNCTION_RULES[key] = rule
            else:
                raise TypeError(f"cannot register a rule for {key!r}")
        return rule

    return decorate


def lookup_rule(node: torch.fx.Node, module: Optional[nn.Module]) -> Optional[Rule]:
    """The rule for ``node`` or None (unknown op)."""
    if node.op == "call_module":
        return _MODULE_RULES.get(type(module))
    if node.op == "call_function":
        try:
            return _FUNCTION_RULES.get(node.target)
        except TypeError:  # unhashable target
            return None
    if node.op == "call_method":
        return _METHOD_RULES.get(str(node.target))
    return None


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


@register_rule(*ELEMENTWISE_MODULES, *_ELEMENTWISE_FUNCTIONS, *_ELEMENTWISE_METHODS)
def _elementwise(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # The channel passes through untouched; bounds like clamp(min, max) are scalars.
    for extra in list(node.args[1:]) + list(node.kwargs.values()):
        if isinstance(extra, torch.fx.Node) and ctx.layout(extra) is not None:
            ctx.unsupported(node, "element-wise op with a channel-carrying second operand")
            return None
    return _first_layout(ctx, node)


# Shape queries read a tensor without moving its channels: after pruning they simply answer
# with the new sizes, which is what the code that asked wants.
@register_rule("size", "dim", "numel", builtins.getattr)
def _shape_query(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    if node.target is builtins.getattr and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
        if ctx.layout(node.args[0]) is not None:
            ctx.unsupported(node, f"attribute {node.args[1]!r} of a pruned tensor")
        return None
    return None


# --------------------------------------------------------------------------- binary


def _binary_operands(node: torch.fx.Node) -> List[Any]:
    ops = list(node.args[:2])
    if "other" in node.kwargs:
        ops.append(node.kwargs["other"])
    if "alpha" in node.kwargs or len(node.args) > 2:
        pass  # alpha is a scalar multiplier: harmless
    return ops


@register_rule(
    operator.add, operator.iadd, operator.sub, operator.isub, operator.mul, operator.imul,
    operator.truediv, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
    torch.maximum, torch.minimum,
    "add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_",
)
def _binary(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    operands = _binary_operands(node)
    if node.op == "call_method":
        operands = [node.args[0]] + list(node.args[1:2]) + ([node.kwargs["other"]] if "other" in node.kwargs else [])
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
    for op in unknown:
        shape = ctx.shape(op)
        # A tensor without a layout (a parameter, an input, an unknown op's output) is safe
        # only if it provably broadcasts along the channel dim.
        if shape is None:
            ctx.freeze(node, [result], f"operand {op.name} of unknown channel structure")
            return result
        pos = len(shape) + result.dim
        if pos >= 0 and shape[pos] != 1:
            ctx.freeze(node, [result], f"operand {op.name} has {shape[pos]} channels of its own")
            return result
    ranks = [lay.rank for lay in layouts]
    rank = None if any(r is None for r in ranks) else max(ranks)  # type: ignore[type-var]
    return replace(result, rank=rank)


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
        if lay.dim != ref.dim or lay.block != 1:
            ctx.unsupported(node, "cat of operands whose channel dims differ")
            return None
        groups.extend(lay.groups)
        sizes.extend(lay.sizes)
    return Layout(tuple(groups), tuple(sizes), ref.dim, ref.rank, 1)


# --------------------------------------------------------------------------- convolution


def _conv_rank(ctx: RuleContext, node: torch.fx.Node, spatial: int, inp: Optional[Layout]) -> Optional[int]:
    shape = ctx.shape(node)
    if shape is not None:
        return len(shape)
    if inp is not None and inp.rank is not None:
        return inp.rank
    return spatial + 2  # batched input is the norm; example_inputs let ShapeProp confirm it


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def _conv(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    conv = ctx.module(node)
    assert isinstance(conv, nn.modules.conv._ConvNd)
    spatial = len(conv.kernel_size)
    inp = _first_layout(ctx, node)
    rank = _conv_rank(ctx, node, spatial, inp)
    dim = -(spatial + 1)
    if inp is not None and (inp.dim != dim or inp.block != 1 or inp.channels != conv.in_channels):
        ctx.unsupported(node, "convolution input whose channel dim does not match the layer")
        return None
    if conv.groups == 1:
        if inp is not None:
            ctx.member(node, "in", inp)
        out = ctx.produce(node, conv.out_channels, dim, rank)
        ctx.member(node, "out", out)
        return out
    if conv.groups == conv.in_channels == conv.out_channels:
        # Depthwise: channel c of the output reads only channel c of the input, so the layer
        # is a per-channel op and its channels belong to the input's groups.
        if inp is None:
            out = ctx.produce(node, conv.out_channels, dim, rank)
            ctx.member(node, "out", out)
            return out
        ctx.member(node, "channelwise", inp)
        return replace(inp, rank=rank)
    # Grouped (not depthwise): pruning must keep every group the same size; not proven yet.
    reason = f"grouped convolution (groups={conv.groups}) is not pruned"
    out = ctx.produce(node, conv.out_channels, dim, rank)
    ctx.freeze(node, [inp, out], reason)
    ctx.warn(node, reason)
    ctx.member(node, "out", out)
    if inp is not None:
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
    # BatchNorm normalises dim 1: it must be the channel dim of the input layout.
    if rank is None or inp.dim != 1 - rank or inp.block != 1:
        ctx.unsupported(node, "BatchNorm over a dim not known to be the channel dim")
        return None
    if isinstance(bn, nn.modules.batchnorm._BatchNorm) and bn.num_features != inp.channels:
        ctx.unsupported(node, "BatchNorm whose num_features do not match its input")
        return None
    ctx.member(node, "channelwise", inp)
    return replace(inp, rank=rank)


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


@register_rule(*_POOL_MODULES, *_POOL_FUNCTIONS)
def _pool(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    # Pooling works per channel over spatial dims; the channel dim keeps its place.
    if node.op == "call_module":
        if getattr(ctx.module(node), "return_indices", False):
            ctx.unsupported(node, "pooling that returns indices")
            return None
    elif node.kwargs.get("return_indices", False):
        ctx.unsupported(node, "pooling that returns indices")
        return None
    inp = _first_layout(ctx, node)
    if inp is not None and inp.block != 1:
        ctx.unsupported(node, "pooling of a flattened map")
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
    if inp.dim in norm or inp.block != 1:
        ctx.unsupported(node, "reduction over the channel dim mixes channels")
        return None
    if keepdim:
        return inp
    # Dropping dims after the channel dim moves it closer to the end.
    after = sum(1 for d in norm if d > inp.dim)
    rank = None if inp.rank is None else inp.rank - len(set(norm))
    return replace(inp, dim=inp.dim + after, rank=rank)


# --------------------------------------------------------------------------- flatten / view


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
    if c != start:
        ctx.unsupported(node, "flatten that interleaves the channel dim with an outer dim")
        return None
    if end == start:
        return inp
    # The channel becomes the outer index of the merged dim: each owns a contiguous block.
    block: Optional[int] = None
    shape = ctx.shape(node.args[0]) if node.args else None
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


@register_rule(torch.reshape, "view", "reshape")
def _view(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    if node.op == "call_function":
        sizes = _arg(node, 1, "shape", None)
    else:
        sizes = node.args[1] if len(node.args) == 2 and isinstance(node.args[1], (list, tuple)) else node.args[1:]
    in_shape = ctx.shape(node.args[0])
    out_shape = ctx.shape(node)
    if in_shape is not None and out_shape is not None and inp.rank is not None:
        return _view_from_shapes(ctx, node, inp, tuple(in_shape), tuple(out_shape))
    # Without shapes, only the classic head `x.view(x.size(0), -1)` is understood.
    if isinstance(sizes, (list, tuple)) and len(sizes) == 2 and sizes[1] == -1 and inp.rank is not None:
        return _flatten_layout(ctx, node, inp, 1, -1)
    ctx.unsupported(node, "view/reshape whose effect on channels is unknown without shapes",
                    "pass example_inputs so shapes can be propagated")
    return None


def _view_from_shapes(ctx: RuleContext, node: torch.fx.Node, inp: Layout,
                      in_shape: Tuple[int, ...], out_shape: Tuple[int, ...]) -> Optional[Layout]:
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
    ctx.unsupported(node, "view/reshape that splits or interleaves the channel dim")
    return None


# --------------------------------------------------------------------------- softmax


@register_rule(nn.Softmax, nn.LogSoftmax, F.softmax, F.log_softmax, torch.softmax, "softmax", "log_softmax")
def _softmax(ctx: RuleContext, node: torch.fx.Node) -> Optional[Layout]:
    inp = _first_layout(ctx, node)
    if inp is None:
        return None
    dim = ctx.module(node).dim if node.op == "call_module" else _arg(node, 1, "dim", None)  # type: ignore[union-attr]
    norm = _normalize_dims(dim, inp.rank)
    if norm is None or inp.dim in norm:
        # Softmax over channels couples every channel through its denominator.
        ctx.unsupported(node, "softmax over the channel dim")
        return None
    return inp
