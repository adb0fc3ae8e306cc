"""Deployment helpers: torch.compile, torch.export, ONNX, TorchScript, and exported graphs in.

A pruned model is an ordinary ``torch.fx.GraphModule`` made of ordinary ``nn.Conv2d`` /
``nn.BatchNorm2d`` / ``nn.Linear`` layers, so every PyTorch deployment path takes it as is.
This module holds the checks and the small amount of glue around them:

* :func:`graph_breaks` counts what ``torch.compile`` would split (a pruned model has none);
* :func:`export_program` / :func:`to_onnx` / :func:`to_torchscript` wrap the exporters with
  eval mode, ``no_grad`` and errors that say what to do;
* :func:`from_exported` goes the other way: the graph that ``torch.export.export(model,
  args).module()`` returns is made of ATen ops on ``get_attr`` weights (no ``call_module``
  layers), which the rule table does not speak. ``from_exported`` lifts it back to the layer
  level (``aten.conv2d`` on ``layer1.0.conv1.weight`` -> a call of an ``nn.Conv2d`` named
  ``layer1.0.conv1``; ``aten.conv_transpose2d`` -> ``nn.ConvTranspose2d`` with the
  ``output_padding`` export fixed; ``aten.relu_`` -> ``x.relu_()``; ...) so the pass can prune it, with
  the same module names, hence the same plan, as the original ``nn.Module``.

>>> import torch, torchvision, fxprune
>>> from fxprune.export import export_program, from_exported
>>> model = torchvision.models.resnet18().eval()
>>> x = torch.randn(1, 3, 32, 32)
>>> pruned = fxprune.prune(model, 0.5)
>>> ep = export_program(pruned, (x,))           # a torch.export.ExportedProgram
>>> torch.testing.assert_close(ep.module()(x), pruned(x))
>>> lifted = from_exported(torch.export.export(model, (x,)).module())
>>> lifted.get_submodule("layer1.0.conv1")
Conv2d(64, 64, kernel_size=(3, 3), stride=(1, 1), padding=(1, 1), bias=False)
>>> fxprune.prune(lifted, 0.5).get_submodule("layer1.0.conv1").out_channels
32
"""

from __future__ import annotations

import contextlib
import operator
import os
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple, Union

import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
from torch.utils import _pytree as pytree

from .errors import FxPruneError

__all__ = [
    "ExportedGraphError",
    "DeploymentError",
    "is_aten_graph",
    "from_exported",
    "is_lifted",
    "LIFTED",
    "graph_breaks",
    "export_program",
    "to_onnx",
    "to_torchscript",
]

Inputs = Union[torch.Tensor, Sequence[Any]]


class ExportedGraphError(FxPruneError):
    """An exported (ATen-level) graph that cannot be lifted back to layers for pruning."""


class DeploymentError(FxPruneError):
    """An exporter (torch.export, ONNX, TorchScript) failed on a model, or is not installed."""


def _as_tuple(example_inputs: Inputs) -> Tuple[Any, ...]:
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, (list, tuple)):
        return tuple(example_inputs)
    raise FxPruneError(f"example_inputs must be a tensor or a tuple of tensors, got {type(example_inputs).__name__}")


@contextlib.contextmanager
def _eval(model: nn.Module) -> Iterator[None]:
    """Eval mode for the duration (exporters trace BatchNorm/Dropout as they run), then restore."""
    flags = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


# =========================================================================== exported graphs in


def _is_aten(target: Any) -> bool:
    return isinstance(target, (torch._ops.OpOverload, torch._ops.OpOverloadPacket)) and \
        getattr(target, "namespace", None) == "aten"


def is_aten_graph(model: Any) -> bool:
    """True for an ``ExportedProgram`` or a GraphModule whose graph calls ATen ops directly.

    Such graphs (from ``torch.export``, ``make_fx``, AOTAutograd) hold weights as ``get_attr``
    nodes instead of layer calls; pass them through :func:`from_exported` before pruning.

    >>> import torch, torchvision
    >>> m = torchvision.models.resnet18().eval()
    >>> is_aten_graph(torch.fx.symbolic_trace(m)), is_aten_graph(torch.export.export(m, (torch.randn(1, 3, 32, 32),)))
    (False, True)
    """
    if isinstance(model, torch.export.ExportedProgram):
        return True
    if not isinstance(model, torch.fx.GraphModule):
        return False
    return any(n.op == "call_function" and _is_aten(n.target) for n in model.graph.nodes)


def _bind(node: torch.fx.Node) -> Dict[str, Any]:
    """The node's arguments by schema name, defaults filled in (aten nodes mix args and kwargs)."""
    schema = node.target._schema  # type: ignore[union-attr]
    out: Dict[str, Any] = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args):
            out[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            out[arg.name] = node.kwargs[arg.name]
        elif arg.has_default_value():
            out[arg.name] = arg.default_value
        else:
            out[arg.name] = None
    return out


def _pair(value: Any, n: int) -> Tuple[int, ...]:
    if isinstance(value, (list, tuple)):
        if len(value) == 1:
            return tuple(int(value[0]) for _ in range(n))
        return tuple(int(v) for v in value)
    return tuple(int(value) for _ in range(n))


aten = torch.ops.aten

# ATen op -> (kind, target) of the equivalent call the rule table knows. Only ops whose
# argument order is identical are listed, so args/kwargs are carried over unchanged. In-place
# ATen ops stay in place (as methods): an out-of-place rewrite would change what later readers
# of the mutated tensor see.
_FUNCTIONS: Dict[Any, Tuple[str, Any]] = {
    aten.relu.default: ("call_function", torch.relu),
    aten.relu_.default: ("call_method", "relu_"),
    aten.sigmoid.default: ("call_function", torch.sigmoid),
    aten.sigmoid_.default: ("call_method", "sigmoid_"),
    aten.tanh.default: ("call_function", torch.tanh),
    aten.tanh_.default: ("call_method", "tanh_"),
    aten.hardswish.default: ("call_function", F.hardswish),
    aten.hardsigmoid.default: ("call_function", F.hardsigmoid),
    aten.silu.default: ("call_function", F.silu),
    aten.gelu.default: ("call_function", F.gelu),
    aten.hardtanh.default: ("call_function", F.hardtanh),
    aten.hardtanh_.default: ("call_function", F.hardtanh_),
    aten.leaky_relu.default: ("call_function", F.leaky_relu),
    aten.clamp.default: ("call_function", torch.clamp),
    aten.clamp_.default: ("call_method", "clamp_"),
    aten.abs.default: ("call_function", torch.abs),
    aten.exp.default: ("call_function", torch.exp),
    aten.neg.default: ("call_function", torch.neg),
    aten.sqrt.default: ("call_function", torch.sqrt),
    aten.rsqrt.default: ("call_function", torch.rsqrt),
    aten.dropout.default: ("call_function", F.dropout),
    # nn.Dropout2d/3d: (input, p, train), F.dropout2d's (input, p, training) order.
    aten.feature_dropout.default: ("call_function", F.dropout2d),
    aten.mul.Tensor: ("call_function", torch.mul),
    aten.div.Tensor: ("call_function", torch.div),
    aten.add_.Tensor: ("call_method", "add_"),
    aten.sub_.Tensor: ("call_method", "sub_"),
    aten.mul_.Tensor: ("call_method", "mul_"),
    aten.div_.Tensor: ("call_method", "div_"),
    aten.max_pool2d.default: ("call_function", torch.max_pool2d),
    aten.avg_pool2d.default: ("call_function", F.avg_pool2d),
    aten.adaptive_avg_pool2d.default: ("call_function", F.adaptive_avg_pool2d),
    aten.adaptive_avg_pool1d.default: ("call_function", torch.adaptive_avg_pool1d),
    aten.mean.dim: ("call_function", torch.mean),
    aten.sum.dim_IntList: ("call_function", torch.sum),
    aten.amax.default: ("call_function", torch.amax),
    aten.flatten.using_ints: ("call_function", torch.flatten),
    aten.view.default: ("call_method", "view"),
    aten.reshape.default: ("call_function", torch.reshape),
    aten.cat.default: ("call_function", torch.cat),
    aten.stack.default: ("call_function", torch.stack),
    aten.softmax.int: ("call_function", torch.softmax),
    aten.contiguous.default: ("call_method", "contiguous"),
    aten.clone.default: ("call_method", "clone"),
    # Layout and shape ops whose torch function takes the same arguments in the same order.
    aten.permute.default: ("call_function", torch.permute),
    aten.roll.default: ("call_function", torch.roll),  # Swin's cyclic shift (HF Swin on the exported path)
    aten.transpose.int: ("call_function", torch.transpose),
    aten.unsqueeze.default: ("call_function", torch.unsqueeze),
    aten.squeeze.default: ("call_function", torch.squeeze),
    aten.squeeze.dim: ("call_function", torch.squeeze),
    aten.pad.default: ("call_function", F.pad),
    aten.type_as.default: ("call_method", "type_as"),
    aten.relu6.default: ("call_function", F.relu6),
    aten.hardsigmoid.default: ("call_function", F.hardsigmoid),
    aten.mul.Scalar: ("call_function", torch.mul),
    aten.div.Scalar: ("call_function", torch.div),
    aten.mul_.Scalar: ("call_method", "mul_"),
    aten.div_.Scalar: ("call_method", "div_"),
    aten.amin.default: ("call_function", torch.amin),
    aten.max_pool1d.default: ("call_function", F.max_pool1d),
    aten.avg_pool1d.default: ("call_function", F.avg_pool1d),
    aten.avg_pool3d.default: ("call_function", F.avg_pool3d),
    aten.adaptive_avg_pool3d.default: ("call_function", F.adaptive_avg_pool3d),
    aten._adaptive_avg_pool2d.default: ("call_function", F.adaptive_avg_pool2d),
    aten.maximum.default: ("call_function", torch.maximum),
    # Tensor.new_*(size, ...): the same arguments (dtype, device... by keyword in both).
    aten.new_full.default: ("call_method", "new_full"),
    aten.new_zeros.default: ("call_method", "new_zeros"),
    aten.new_ones.default: ("call_method", "new_ones"),
    aten.new_empty.default: ("call_method", "new_empty"),
    aten.minimum.default: ("call_function", torch.minimum),
}

# Channel splits and slices: the split rules follow each piece of the channel dim and rewrite
# the sizes or bounds from the kept counts. Same argument order as the torch forms.
_SPLIT_FUNCTIONS: Dict[Any, Tuple[str, Any]] = {
    aten.split.Tensor: ("call_function", torch.split),
    aten.split_with_sizes.default: ("call_function", torch.split),
    aten.chunk.default: ("call_function", torch.chunk),
    aten.tensor_split.sections: ("call_function", torch.tensor_split),
    aten.tensor_split.indices: ("call_function", torch.tensor_split),
    aten.narrow.default: ("call_function", torch.narrow),
    aten.unbind.int: ("call_function", torch.unbind),
}
_FUNCTIONS.update(_SPLIT_FUNCTIONS)


def _lift_slice(node: torch.fx.Node) -> Tuple[Any, Tuple[Any, ...]]:
    """``aten.slice.Tensor(x, dim, start, end, step)`` as ``x[..., start:end:step, ...]`` (getitem).

    Bounds stay as exported (``x[:, k:]`` ends at ``2**63 - 1``); the slice rule treats a bound
    past the channels as the end. Bounds that are graph nodes are remapped by the caller.
    """
    bound = _bind(node)
    dim, step = int(bound["dim"]), bound["step"]
    cut = slice(bound["start"], bound["end"], None if step in (None, 1) else step)
    index = (slice(None),) * dim + (cut,) if dim >= 0 else (Ellipsis, cut) + (slice(None),) * (-dim - 1)
    return bound["self"], index



def _lift_select(node: torch.fx.Node) -> Tuple[Any, Tuple[Any, ...]]:
    """``aten.select.int(x, dim, index)`` as ``x[..., index, ...]`` (getitem; the dim goes).

    Hugging Face's ViT reads its class token as ``sequence_output[:, 0, :]``, exported as a select.
    """
    bound = _bind(node)
    dim, at = int(bound["dim"]), bound["index"]
    index = (slice(None),) * dim + (at,) if dim >= 0 else (Ellipsis, at) + (slice(None),) * (-dim - 1)
    return bound["self"], index


# What an ATen call becomes when its torch spelling takes other arguments: ``(bound ATen
# arguments by schema name) -> (kind, target, args, kwargs)``, or None where the two would not
# compute the same thing (the op is then kept as it is, and freezes what it touches).
Spelling = Tuple[str, Any, Tuple[Any, ...], Dict[str, Any]]


def _with_alpha(target: Any) -> Callable[[Dict[str, Any]], Optional[Spelling]]:
    """``aten.add(self, other, alpha)``: torch.add takes ``alpha`` by keyword only."""
    def spell(a: Dict[str, Any]) -> Optional[Spelling]:
        kwargs = {} if a.get("alpha", 1) == 1 else {"alpha": a["alpha"]}
        return "call_function", target, (a["self"], a["other"]), kwargs
    return spell


def _rsub(a: Dict[str, Any]) -> Optional[Spelling]:
    # rsub(self, other) = other - self; a scalar minus a tensor is operator.sub's spelling.
    return ("call_function", operator.sub, (a["other"], a["self"]), {}) if a.get("alpha", 1) == 1 else None


def _interpolate(mode: str, corners: bool) -> Callable[[Dict[str, Any]], Optional[Spelling]]:
    """``aten.upsample_*.vec``: F.interpolate passes size and scale factors to that very op."""
    def spell(a: Dict[str, Any]) -> Optional[Spelling]:
        kwargs: Dict[str, Any] = {"size": a["output_size"], "scale_factor": a["scale_factors"], "mode": mode}
        if corners:
            kwargs["align_corners"] = a["align_corners"]
        return "call_function", F.interpolate, (a["input"],), kwargs
    return spell


def _upsample_sized(mode: str, corners: bool) -> Callable[[Dict[str, Any]], Optional[Spelling]]:
    """``aten.upsample_*.default`` with sizes only; given scales change the source index maths."""
    def spell(a: Dict[str, Any]) -> Optional[Spelling]:
        if any(a.get(k) is not None for k in ("scales_d", "scales_h", "scales_w")):
            return None
        kwargs: Dict[str, Any] = {"size": a["output_size"], "mode": mode}
        if corners:
            kwargs["align_corners"] = a["align_corners"]
        return "call_function", F.interpolate, (a["self"],), kwargs
    return spell


_SPELLED: Dict[Any, Callable[[Dict[str, Any]], Optional[Spelling]]] = {
    aten.add.Scalar: _with_alpha(torch.add),
    aten.sub.Scalar: _with_alpha(torch.sub),
    aten.add.Tensor: _with_alpha(torch.add),
    aten.sub.Tensor: _with_alpha(torch.sub),
    aten.rsub.Scalar: _rsub,
    aten.constant_pad_nd.default: lambda a: ("call_function", F.pad, (a["self"], a["pad"]),
                                             {"mode": "constant", "value": a["value"]}),
    aten.squeeze.dims: lambda a: ("call_function", torch.squeeze, (a["self"], tuple(a["dim"])), {}),
    aten.expand.default: lambda a: None if a.get("implicit") else ("call_method", "expand", (a["self"], a["size"]), {}),
    aten.mean.default: lambda a: ("call_function", torch.mean, (a["self"],),
                                  {} if a.get("dtype") is None else {"dtype": a["dtype"]}),
    aten.sum.default: lambda a: ("call_function", torch.sum, (a["self"],),
                                 {} if a.get("dtype") is None else {"dtype": a["dtype"]}),
    aten.clamp_min.default: lambda a: ("call_function", torch.clamp, (a["self"],), {"min": a["min"]}),
    aten.clamp_max.default: lambda a: ("call_function", torch.clamp, (a["self"],), {"max": a["max"]}),
    aten.pow.Tensor_Scalar: lambda a: ("call_function", torch.pow, (a["self"], a["exponent"]), {}),
    aten.layer_norm.default: lambda a: ("call_function", F.layer_norm,
                                        (a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"]), {}),
    aten.group_norm.default: lambda a: ("call_function", F.group_norm,
                                        (a["input"], a["num_groups"], a["weight"], a["bias"], a["eps"]), {}),
    aten.rms_norm.default: lambda a: ("call_function", F.rms_norm,
                                      (a["input"], a["normalized_shape"], a["weight"], a["eps"]), {}),
    aten.upsample_nearest2d.vec: _interpolate("nearest", False),
    aten.upsample_nearest1d.vec: _interpolate("nearest", False),
    aten.upsample_nearest3d.vec: _interpolate("nearest", False),
    aten.upsample_bilinear2d.vec: _interpolate("bilinear", True),
    aten.upsample_linear1d.vec: _interpolate("linear", True),
    aten.upsample_trilinear3d.vec: _interpolate("trilinear", True),
    aten.upsample_bicubic2d.vec: _interpolate("bicubic", True),
    aten.upsample_nearest2d.default: _upsample_sized("nearest", False),
    aten.upsample_bilinear2d.default: _upsample_sized("bilinear", True),
}

# Ops returning a tuple whose users read only element 0 (the other elements are statistics
# or indices for autograd): ``(bound arguments) -> the spelling of element 0``.
_FIRST_OF_TUPLE: Dict[Any, Callable[[Dict[str, Any]], Optional[Spelling]]] = {
    aten.native_layer_norm.default: lambda a: ("call_function", F.layer_norm,
                                               (a["input"], a["normalized_shape"], a["weight"], a["bias"], a["eps"]), {}),
    aten.native_group_norm.default: lambda a: ("call_function", F.group_norm,
                                               (a["input"], a["group"], a["weight"], a["bias"], a["eps"]), {}),
    aten.max_pool2d_with_indices.default: lambda a: (
        "call_function", torch.max_pool2d,
        (a["self"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]), {}),
    aten.max_pool3d_with_indices.default: lambda a: (
        "call_function", F.max_pool3d,
        (a["self"], a["kernel_size"], a["stride"], a["padding"], a["dilation"], a["ceil_mode"]), {}),
    aten.adaptive_max_pool2d.default: lambda a: ("call_function", F.adaptive_max_pool2d, (a["self"], a["output_size"]), {}),
    aten.adaptive_max_pool1d.default: lambda a: ("call_function", F.adaptive_max_pool1d, (a["self"], a["output_size"]), {}),
}


def _unary_spellings() -> Dict[Any, Tuple[str, Any]]:
    """``aten.<f>.default(Tensor self) -> Tensor`` -> ``torch.<f>`` (in place: the method ``<f>_``).

    Read from the ATen schemas: a one-tensor op whose torch function of the same name exists is,
    by how torch dispatches, that very op called with no other argument, so the spelling cannot
    change the result; the rule table then decides what it does to channels (an op without a
    rule still freezes, with a warning).
    """
    out: Dict[Any, Tuple[str, Any]] = {}
    for name in dir(aten):
        packet = getattr(aten, name, None)
        overload = getattr(packet, "default", None) if isinstance(packet, torch._ops.OpOverloadPacket) else None
        if overload is None:
            continue
        schema = overload._schema
        args, rets = schema.arguments, schema.returns
        if len(args) != 1 or str(args[0].type) != "Tensor" or len(rets) != 1 or str(rets[0].type) != "Tensor":
            continue
        if name.endswith("_") and not name.startswith("_") and hasattr(torch.Tensor, name):
            out[overload] = ("call_method", name)
        elif not name.startswith("_") and callable(getattr(torch, name, None)):
            out[overload] = ("call_function", getattr(torch, name))
    return out


_FUNCTIONS = {**_unary_spellings(), **_FUNCTIONS}

# In-place activations ATen spells with a trailing underscore but Python spells with
# ``inplace=True`` (the rule table knows the functional form).
_INPLACE_KW: Dict[Any, Callable[..., Any]] = {
    aten.hardswish_.default: F.hardswish,
    aten.hardsigmoid_.default: F.hardsigmoid,
    aten.silu_.default: F.silu,
    aten.leaky_relu_.default: F.leaky_relu,
    aten.dropout_.default: F.dropout,
    aten.feature_dropout_.default: F.dropout2d,
}

_CONVS = {
    aten.conv1d.default: nn.Conv1d, aten.conv2d.default: nn.Conv2d, aten.conv3d.default: nn.Conv3d,
    aten.conv1d.padding: nn.Conv1d, aten.conv2d.padding: nn.Conv2d, aten.conv3d.padding: nn.Conv3d,
}
_TRANSPOSED_CONVS = {
    aten.conv_transpose1d.default: nn.ConvTranspose1d, aten.conv_transpose2d.input: nn.ConvTranspose2d,
    aten.conv_transpose3d.input: nn.ConvTranspose3d,
}
_BATCHNORMS = (aten.batch_norm.default, aten._native_batch_norm_legit_no_training.default)
# Runtime checks torch.export inserts; they guard the original input spec and have no users.
_DROPPED = {"_assert_tensor_metadata", "_assert_scalar", "sym_constrain_range_for_size", "_assert_async"}


def _first_only(node: torch.fx.Node) -> bool:
    """True if the tuple ``node`` returns is read at element 0 only (export keeps unused reads of the rest)."""
    return all(u.op == "call_function" and u.target is operator.getitem and (u.args[1] == 0 or not u.users)
               for u in node.users)


class _Lifter:
    """Rebuilds an ATen graph with layer modules; see :func:`from_exported`."""

    def __init__(self, gm: torch.fx.GraphModule) -> None:
        self.gm = gm
        self.modules: Dict[str, nn.Module] = {}

    # --- weights
    def _tensor(self, arg: Any) -> Optional[torch.Tensor]:
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
            return None
        obj: Any = self.gm
        for part in str(arg.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None

    def _owner(self, arg: Any, leaf: str) -> Optional[str]:
        """``layer1.0.conv1`` for a get_attr of ``layer1.0.conv1.<leaf>`` used by one op only."""
        if not isinstance(arg, torch.fx.Node) or arg.op != "get_attr":
            return None
        target = str(arg.target)
        if not target.endswith("." + leaf) or len(arg.users) != 1:
            # A weight read by several ops (tied, or also used elsewhere) is not one layer's.
            return None
        return target[: -len(leaf) - 1]

    def _same_owner(self, parts: Sequence[Tuple[Any, str]]) -> Optional[str]:
        owners = {self._owner(arg, leaf) for arg, leaf in parts if arg is not None}
        if len(owners) != 1 or None in owners:
            return None
        owner = owners.pop()
        return None if owner in self.modules else owner

    # --- layers
    def conv(self, node: torch.fx.Node) -> Optional[str]:
        a = _bind(node)
        weight, bias = a["weight"], a["bias"]
        name = self._same_owner([(weight, "weight"), (bias, "bias")])
        w = self._tensor(weight)
        if name is None or not isinstance(w, nn.Parameter):
            return None
        b = self._tensor(bias) if bias is not None else None
        n, groups = w.dim() - 2, int(a["groups"])
        padding = a["padding"] if isinstance(a["padding"], str) else _pair(a["padding"], n)
        common = dict(stride=_pair(a["stride"], n), padding=padding, dilation=_pair(a["dilation"], n), groups=groups,
                      bias=b is not None, device="meta")
        # Built on the meta device (no init cost), then given the exported module's own tensors.
        if node.target in _TRANSPOSED_CONVS:
            # Weight [Cin, Cout/G, *k]. Export fixed output_padding (from any output_size the
            # forward was given), so calling the layer on its input alone reproduces the op.
            conv: nn.Module = _TRANSPOSED_CONVS[node.target](
                w.shape[0], w.shape[1] * groups, tuple(w.shape[2:]), output_padding=_pair(a["output_padding"], n),
                **common)
        else:
            conv = _CONVS[node.target](w.shape[1] * groups, w.shape[0], tuple(w.shape[2:]), **common)
        conv.weight = w
        if b is not None:
            conv.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        self.modules[name] = conv
        return name

    def linear(self, node: torch.fx.Node) -> Optional[str]:
        a = _bind(node)
        weight, bias = a["weight"], a["bias"]
        name = self._same_owner([(weight, "weight"), (bias, "bias")])
        w = self._tensor(weight)
        if name is None or not isinstance(w, nn.Parameter) or w.dim() != 2:
            return None
        b = self._tensor(bias) if bias is not None else None
        lin = nn.Linear(w.shape[1], w.shape[0], bias=b is not None, device="meta")
        lin.weight = w
        if b is not None:
            lin.bias = b if isinstance(b, nn.Parameter) else nn.Parameter(b, requires_grad=False)
        self.modules[name] = lin
        return name

    def batchnorm(self, node: torch.fx.Node) -> Optional[str]:
        a = _bind(node)
        training = bool(a.get("training", False))
        if training and a["running_mean"] is not None:
            raise ExportedGraphError(
                f"node {node.name} is a BatchNorm that updates its running statistics: the model was "
                "exported in training mode, where the graph mutates buffers in place. Hint: export the "
                "model in eval mode (model.eval() before torch.export.export), or prune the original "
                "nn.Module (or its torch.fx.symbolic_trace) instead")
        if training or a["running_mean"] is None:
            return None  # batch statistics only: leave the ATen op (its channels stay unpruned)
        parts = [(a["weight"], "weight"), (a["bias"], "bias"), (a["running_mean"], "running_mean"),
                 (a["running_var"], "running_var")]
        name = self._same_owner(parts)
        mean, var = self._tensor(a["running_mean"]), self._tensor(a["running_var"])
        if name is None or mean is None or var is None:
            return None
        shape = getattr(node.args[0], "meta", {}).get("tensor_meta")
        rank = len(shape.shape) if shape is not None else None
        cls = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}.get(rank or 0)
        if cls is None:
            return None
        w, b = self._tensor(a["weight"]), self._tensor(a["bias"])
        bn = cls(mean.shape[0], eps=float(a["eps"]), momentum=float(a["momentum"]), affine=w is not None,
                 device="meta")
        if w is not None:
            bn.weight, bn.bias = w, b
        bn.running_mean, bn.running_var = mean, var
        tracked = getattr(self.gm.get_submodule(name), "num_batches_tracked", None) \
            if self._has_module(name) else None
        bn.num_batches_tracked = tracked if isinstance(tracked, torch.Tensor) else torch.tensor(0, dtype=torch.long)
        bn.eval()
        self.modules[name] = bn
        return name

    def _has_module(self, name: str) -> bool:
        try:
            self.gm.get_submodule(name)
            return True
        except AttributeError:
            return False

    # --- the graph
    def run(self) -> torch.fx.GraphModule:
        gm = self.gm
        in_spec = getattr(gm, "_in_spec", None)
        out_spec = getattr(gm, "_out_spec", None)
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        if in_spec is not None:
            children = list(in_spec.children()) if in_spec.num_children == 2 else []
            args_spec, kwargs_spec = (children + [None, None])[:2]
            if args_spec is None or kwargs_spec.num_leaves != 0 or args_spec.num_leaves != args_spec.num_children \
                    or args_spec.num_leaves != len(placeholders):
                raise ExportedGraphError(
                    f"the exported model takes nested or keyword inputs ({' '.join(str(in_spec).split())}); fxprune can lift "
                    "only graphs whose inputs are plain positional tensors. Hint: prune the original "
                    "nn.Module (or its torch.fx.symbolic_trace) instead")

        graph = torch.fx.Graph()
        env: Dict[torch.fx.Node, torch.fx.Node] = {}
        lifted: Dict[torch.fx.Node, str] = {}
        bn_tuple: Dict[torch.fx.Node, torch.fx.Node] = {}
        # First pass: decide which ATen layer ops become modules (they claim their weights).
        for node in gm.graph.nodes:
            if node.op != "call_function":
                continue
            name = None
            if node.target in _CONVS or node.target in _TRANSPOSED_CONVS:
                name = self.conv(node)
            elif node.target is aten.linear.default:
                name = self.linear(node)
            elif node.target in _BATCHNORMS:
                name = self.batchnorm(node)
            if name is not None:
                lifted[node] = name
        claimed = {arg for node in lifted for arg in node.all_input_nodes if arg.op == "get_attr"}

        def remap(a: Any) -> Any:
            return torch.fx.map_arg(a, lambda n: env[n])

        outputs: List[Any] = []
        for node in gm.graph.nodes:
            meta = {k: node.meta[k] for k in ("stack_trace", "tensor_meta") if k in node.meta}
            if node.op == "placeholder":
                new = graph.node_copy(node)  # keeps a default value, if any
            elif node.op == "get_attr":
                if node in claimed or not node.users:
                    # Claimed: now read through its layer. Unused (export lists e.g. BatchNorm's
                    # num_batches_tracked): a stray second reference to a layer's own buffer
                    # would read as a tied tensor to the analysis.
                    continue
                new = graph.create_node("get_attr", str(node.target), (), {}, node.name)
            elif node.op == "call_module" and str(node.target) == "_guards_fn":
                continue  # export's input guard: checks the original input spec only
            elif node.op == "output":
                # export's output node holds the flat outputs; out_spec knows their structure.
                flat = node.args[0]
                outputs = list(flat) if isinstance(flat, (list, tuple)) else [flat]
                continue
            elif node.op == "call_function" and node in lifted:
                x = node.args[0] if node.args else node.kwargs["input"]
                new = graph.create_node("call_module", lifted[node], (env[x],), {}, node.name)
                if node.target is aten._native_batch_norm_legit_no_training.default:
                    bn_tuple[node] = new  # users read [0]; see the getitem branch
                    env[node] = new
                    continue
            elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in bn_tuple:
                if node.args[1] != 0 and not node.users:
                    continue  # an unused read of the indices or statistics: nothing to lift
                if node.args[1] != 0:
                    raise ExportedGraphError(f"node {node.name} reads batch statistics output {node.args[1]} "
                                             "of an eval-mode BatchNorm; only its result can be lifted")
                env[node] = env[node.args[0]]
                continue
            elif node.op == "call_function" and _is_aten(node.target) and \
                    node.target.__name__.split(".")[0] in _DROPPED and not node.users:
                continue
            elif node.op == "call_function" and node.target is aten.slice.Tensor:
                x, index = _lift_slice(node)
                new = graph.create_node("call_function", operator.getitem, remap((x, index)), {}, node.name)
            elif node.op == "call_function" and node.target is aten.select.int:
                x, index = _lift_select(node)
                new = graph.create_node("call_function", operator.getitem, remap((x, index)), {}, node.name)
            elif node.op == "call_function" and node.target in _FIRST_OF_TUPLE and _first_only(node) and \
                    (spelled := _FIRST_OF_TUPLE[node.target](_bind(node))) is not None:
                kind, target, args, kwargs = spelled
                new = graph.create_node(kind, target, remap(args), remap(kwargs), node.name)
                new.meta.update(meta)
                bn_tuple[node] = new  # its users read [0]: the getitem branch maps them to this node
                env[node] = new
                continue
            elif node.op == "call_function" and node.target in _SPELLED and \
                    (spelled := _SPELLED[node.target](_bind(node))) is not None:
                kind, target, args, kwargs = spelled
                new = graph.create_node(kind, target, remap(args), remap(kwargs), node.name)
            elif node.op == "call_function" and node.target in _FUNCTIONS:
                kind, target = _FUNCTIONS[node.target]
                args, kwargs = remap(node.args), remap(node.kwargs)
                new = graph.create_node(kind, target, args, kwargs, node.name)
            elif node.op == "call_function" and node.target in _INPLACE_KW:
                new = graph.create_node("call_function", _INPLACE_KW[node.target], remap(node.args),
                                        {**remap(node.kwargs), "inplace": True}, node.name)
            else:
                # Anything else is kept as it is: the analysis has no rule for it, so it freezes
                # the channels it touches and warns with the node's name (never a silent guess).
                new = graph.node_copy(node, lambda n: env[n])
            new.meta.update(meta)
            env[node] = new

        mapped = [torch.fx.map_arg(o, lambda n: env[n]) for o in outputs]
        if out_spec is not None and out_spec.num_leaves == len(mapped):
            structure = pytree.tree_unflatten(mapped, out_spec)
        else:
            structure = mapped[0] if len(mapped) == 1 else tuple(mapped)
        graph.output(structure).meta[LIFTED] = True

        root: Dict[str, Any] = dict(self.modules)
        for node in graph.nodes:
            if node.op in ("get_attr", "call_module") and str(node.target) not in root:
                # Layers the graph already calls as modules (a graph lifted before, or a traced
                # one with a few ATen calls) are carried over as they are.
                root[str(node.target)] = operator.attrgetter(str(node.target))(gm)
        new_gm = torch.fx.GraphModule(root, graph, _class_name(gm))
        # Eval: lifted BatchNorms replay eval-mode ATen calls. Only the root's flag is set;
        # modules carried over are shared with the input and keep their own flags.
        new_gm.training = False
        new_gm.graph.lint()
        return new_gm



# ``node.meta`` key on the output node of a graph :func:`from_exported` built. Node metadata
# travels with the graph through analysis and rewrite, so a pruned model still says that its
# graph came from torch.export (keep_class cannot re-trace its class, and proves it otherwise).
LIFTED = "fxprune_lifted_from_export"


def is_lifted(gm: Any) -> bool:
    """True for a GraphModule lifted from a ``torch.export`` graph, or pruned from one."""
    if not isinstance(gm, torch.fx.GraphModule):
        return False
    return any(bool(n.meta.get(LIFTED)) for n in gm.graph.find_nodes(op="output"))


def _class_name(gm: torch.fx.GraphModule) -> str:
    """The original model's class name if export recorded it (it keeps ``nn_module_stack``)."""
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack")
        if stack:
            _, (path, cls) = next(iter(stack.items()))
            if path == "":
                name = cls if isinstance(cls, str) else getattr(cls, "__name__", "")
                return name.rsplit(".", 1)[-1] or "GraphModule"
    name = type(gm).__name__
    return "GraphModule" if name in ("GraphModuleImpl", "_StatefulGraphModule") else name


def from_exported(model: Union[torch.export.ExportedProgram, torch.fx.GraphModule]) -> torch.fx.GraphModule:
    """Lift an exported (ATen-level) graph back to a layer-level GraphModule fxprune can prune.

    Accepts an ``ExportedProgram`` or the GraphModule of ``ExportedProgram.module()``.
    ``aten.conv{1,2,3}d`` / ``aten.linear`` / eval-mode ``aten.batch_norm`` reading
    ``<name>.weight`` become calls of ``nn.Conv*d`` / ``nn.Linear`` / ``nn.BatchNorm*d`` named
    ``<name>`` (so groups and plans carry the original module names), common element-wise,
    pooling, reduction and shape ops become their ``torch``/method spelling, and export's
    input guards are dropped. Any other ATen op is kept as is: the pass then leaves the
    channels it touches unpruned and warns naming it. The lifted module shares its parameters
    with ``model`` (nothing is copied; pruning never modifies its input). A GraphModule without
    ATen ops is returned unchanged.

    Raises :class:`ExportedGraphError` for graphs exported in training mode (BatchNorm
    updating its running statistics in place) and for nested or keyword inputs.

    >>> import torch, torchvision, fxprune
    >>> m = torchvision.models.resnet18().eval()
    >>> x = torch.randn(1, 3, 32, 32)
    >>> lifted = from_exported(torch.export.export(m, (x,)))
    >>> torch.testing.assert_close(lifted(x), m(x))
    >>> fxprune.plan(lifted, 0.5).keep("conv1") == fxprune.plan(m, 0.5).keep("conv1")
    True
    """
    if isinstance(model, torch.export.ExportedProgram):
        model = model.module()
    if not isinstance(model, torch.fx.GraphModule):
        raise ExportedGraphError(f"expected an ExportedProgram or a torch.fx.GraphModule, got {type(model).__name__}")
    if not is_aten_graph(model):
        return model
    return _Lifter(model).run()


# =========================================================================== deployment checks


def graph_breaks(model: nn.Module, example_inputs: Inputs) -> int:
    """How many graph breaks ``torch.compile`` (dynamo) meets in ``model`` on these inputs.

    A pruned model is a plain fx graph of standard layers: this is 0 for it, which is what
    ``torch.compile(pruned, fullgraph=True)`` needs.

    >>> import torch, torchvision, fxprune
    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5)
    >>> graph_breaks(pruned, torch.randn(1, 3, 32, 32))
    0
    """
    import torch._dynamo

    args = _as_tuple(example_inputs)
    with _eval(model), torch.no_grad():
        explanation = torch._dynamo.explain(model)(*args)
    return int(explanation.graph_break_count)


def export_program(model: nn.Module, example_inputs: Inputs, *, dynamic_batch: bool = False,
                   strict: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of ``model`` in eval mode (optionally with a dynamic batch dim).

    The result can be saved with ``torch.export.save(ep, "model.pt2")`` and read back with
    ``torch.export.load``; ``ep.module()`` runs it.

    >>> import torch, torchvision, fxprune
    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5).eval()
    >>> ep = export_program(pruned, torch.randn(2, 3, 32, 32), dynamic_batch=True)
    >>> ep.module()(torch.randn(5, 3, 32, 32)).shape
    torch.Size([5, 1000])
    """
    args = _as_tuple(example_inputs)
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim("batch", min=1, max=65536)
        dynamic_shapes = tuple({0: batch} if isinstance(a, torch.Tensor) else None for a in args)
    try:
        with _eval(model):
            return torch.export.export(model, args, dynamic_shapes=dynamic_shapes, strict=strict)
    except Exception as exc:  # export raises many types (UserError, Unsupported, ...): all mean "failed"
        raise DeploymentError(f"torch.export.export failed on {type(model).__name__}: {type(exc).__name__}: {exc}. "
                              "Hint: try dynamic_batch=False, or check the model exports before pruning") from exc


def to_onnx(model: nn.Module, example_inputs: Inputs, path: Union[str, os.PathLike], *,
            dynamic_batch: bool = True, opset_version: Optional[int] = None) -> str:
    """Write ``model`` as ONNX to ``path`` (needs the optional ``onnx`` extra); returns the path.

    Uses ``torch.onnx.export`` with the torch.export-based exporter, eval mode, input
    ``input``/output ``output`` and (by default) a dynamic batch dimension. Check it with
    onnxruntime: ``onnxruntime.InferenceSession(path).run(None, {"input": x.numpy()})``.

    >>> import torch, torchvision, fxprune, tempfile, os
    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5)
    >>> path = to_onnx(pruned, torch.randn(1, 3, 32, 32), os.path.join(tempfile.mkdtemp(), "m.onnx"))
    >>> os.path.getsize(path) > 0
    True
    """
    try:
        import onnx  # noqa: F401  (the exporter needs it; fail here with a useful message)
        import onnxscript  # noqa: F401
    except ImportError as exc:
        raise DeploymentError(f"ONNX export needs the optional packages onnx and onnxscript ({exc}). "
                              "Hint: pip install 'fxprune[onnx]'") from exc
    args = _as_tuple(example_inputs)
    names = ["input"] if len(args) == 1 else [f"input{i}" for i in range(len(args))]
    dynamic_shapes = None
    if dynamic_batch:
        dynamic_shapes = tuple({0: torch.export.Dim("batch", min=1, max=65536)} for _ in args)
    kwargs: Dict[str, Any] = {"input_names": names, "output_names": ["output"], "dynamo": True,
                              "dynamic_shapes": dynamic_shapes, "external_data": False,
                              "verbose": False}
    if opset_version is not None:
        kwargs["opset_version"] = opset_version
    try:
        with _eval(model), torch.no_grad():
            torch.onnx.export(model, args, str(path), **kwargs)
    except Exception as exc:
        raise DeploymentError(f"torch.onnx.export failed on {type(model).__name__}: {type(exc).__name__}: {exc}. "
                              "Hint: try dynamic_batch=False or another opset_version") from exc
    return str(path)


def to_torchscript(model: nn.Module, example_inputs: Optional[Inputs] = None) -> torch.jit.ScriptModule:
    """A standalone TorchScript module of ``model`` (eval mode): scripted, else traced.

    ``torch.jit.script`` keeps the control flow of the fx code; it works for pruned torchvision
    CNNs. If scripting fails and ``example_inputs`` are given, the model is traced instead
    (fine for static graphs, which a pruned fx graph is). Save with ``torch.jit.save``. Note:
    TorchScript is in maintenance in PyTorch; prefer :func:`export_program` for new work.

    >>> import torch, torchvision, fxprune
    >>> pruned = fxprune.prune(torchvision.models.resnet18(), 0.5).eval()
    >>> ts = to_torchscript(pruned)
    >>> x = torch.randn(1, 3, 32, 32)
    >>> torch.testing.assert_close(ts(x), pruned(x))
    """
    with _eval(model):
        try:
            return torch.jit.script(model)
        except Exception as script_exc:
            if example_inputs is None:
                raise DeploymentError(f"torch.jit.script failed on {type(model).__name__}: {script_exc}. "
                                      "Hint: pass example_inputs to fall back to torch.jit.trace") from script_exc
            try:
                with torch.no_grad():
                    return torch.jit.trace(model, _as_tuple(example_inputs))
            except Exception as exc:
                raise DeploymentError(f"torch.jit.script and torch.jit.trace both failed on {type(model).__name__}: "
                                      f"script: {script_exc}; trace: {exc}") from exc
