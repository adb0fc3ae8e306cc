"""Element-wise op completeness and channel-sized parameter operands.

The element-wise list is PyTorch's own (ATen ops tagged ``torch.Tag.pointwise``,
:func:`fxprune.rules.pointwise_op_names`), so these tests walk it rather than a hand-made list.
"""

from __future__ import annotations

import copy
import warnings
from typing import Any, Callable, List, Tuple

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F
import torch.nn.modules.activation as activation

import fxprune
from fxprune.rules import NON_ELEMENTWISE_ACTIVATIONS, elementwise_keys, pointwise_op_names
from fxprune.testing import assert_equivalent, randomize_norms
from tests.zoo import assert_rolled_weight_fails

X = torch.randn(2, 3, 8, 8)


def _graph_with(op: Any) -> torch.fx.GraphModule:
    """conv a -> op -> conv b -> mean, built by hand (no tracing: the op's other arguments do not matter)."""
    root = nn.Module()
    root.a, root.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    a = g.call_module("a", (x,))
    y = g.call_method(op, (a,)) if isinstance(op, str) else g.call_function(op, (a,))
    g.output(g.call_method("mean", (g.call_module("b", (y,)), (2, 3))))
    return torch.fx.GraphModule(root, g)


def test_the_element_wise_list_is_derived_from_pytorch_op_tags() -> None:
    names = set(pointwise_op_names())
    named = {"pow", "abs", "exp", "log", "sqrt", "rsqrt", "square", "neg", "reciprocal", "clamp", "clip", "erf",
             "sin", "floor", "sign", "sigmoid", "tanh", "gelu", "silu", "hardsigmoid", "mish", "softplus"}
    assert named <= names, named - names
    # Reductions, normalisations over a dim and non-tensor answers are not element-wise.
    assert not names & {"max", "min", "sum", "mean", "softmax", "cumsum", "equal", "sort", "flip"}
    keys = elementwise_keys()
    for name in named:
        assert any(getattr(m, name, None) in keys for m in (torch, F)) or name in keys, name


def test_every_element_wise_function_and_method_passes_channels() -> None:
    keys = [k for k in elementwise_keys() if not isinstance(k, type)]
    assert len(keys) > 200
    stuck = []
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        for key in keys:
            groups = fxprune.find_groups(_graph_with(key))
            if not next(g for g in groups if g.key == "a").prunable:
                stuck.append(key)
    assert not stuck


def test_the_element_wise_list_does_not_depend_on_which_ops_ran_before() -> None:
    # dir(torch.ops.aten) lists only the op packets already touched: torch.rrelu had no rule
    # unless some earlier code (an export, another test) had looked the op up.
    before = set(pointwise_op_names())
    for name in {op.split("::", 1)[1].split(".", 1)[0] for op in torch._C._dispatch_get_all_op_names()
                 if op.startswith("aten::")}:
        getattr(torch.ops.aten, name, None)
    assert set(pointwise_op_names()) == before
    assert "rrelu" in before and torch.rrelu in elementwise_keys()


def _runnable_unary(name: str) -> Any:
    """``torch.<name>`` if it runs on a float tensor in (0.5, 0.9) alone and answers finite floats."""
    fn = getattr(torch, name, None) or (getattr(torch.special, name[8:], None) if name.startswith("special_") else None)
    if not callable(fn):
        return None
    try:
        out = fn(torch.linspace(0.5, 0.9, 5, dtype=torch.float64))
    except Exception:
        return None
    if not isinstance(out, torch.Tensor) or not out.is_floating_point() or not bool(torch.isfinite(out).all()):
        return None
    if out.shape != (5,) or bool((out == out[0]).all()):
        return None  # constant there (ceil, sign): the output would not depend on the channels at all
    return fn


class _Between(nn.Module):
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.fn = fn
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u = torch.sigmoid(self.a(x)) * 0.4 + 0.5  # in (0.5, 0.9): inside every op's domain
        return self.b(self.fn(u)).mean((2, 3))


def _prove(model: nn.Module, x: torch.Tensor = X, **kw: Any) -> Tuple[nn.Module, nn.Module, Any]:
    model = randomize_norms(model.eval())
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, 0.5, example_inputs=(x,), **kw)
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert plan.pruned_groups
    assert_equivalent(model, pruned, plan, [x], example_inputs=(x,))
    return model, pruned, plan


@pytest.mark.parametrize("name", ["pow", "abs", "exp", "log", "sqrt", "rsqrt", "square", "neg", "reciprocal",
                                  "erf", "sin", "floor", "sign", "clamp", "clip"])
def test_named_unary_ops_are_proven(name: str) -> None:
    fn = {"pow": lambda u: torch.pow(u, 3), "clamp": lambda u: torch.clamp(u, 0.6, 0.8),
          "clip": lambda u: u.clip(min=0.6), "floor": lambda u: torch.floor(u * 4)}.get(name, getattr(torch, name))
    _, pruned, _ = _prove(_Between(fn))
    assert pruned.get_submodule("a").out_channels == 4


@pytest.mark.parametrize("name", ["square", "cube_of_relu", "scalar_base", "floordiv", "mod"])
def test_python_operators_are_element_wise(name: str) -> None:
    # x ** 2 spelled with Python operators (timm's StarReLU: s * relu(x) ** 2 + b) is
    # _operator.pow in the graph, not torch.pow.
    fn = {"square": lambda u: u ** 2, "cube_of_relu": lambda u: 0.8 * F.relu(u - 0.6) ** 3 + 0.1,
          "scalar_base": lambda u: 2.0 ** u, "floordiv": lambda u: (u * 8) // 1.5,
          "mod": lambda u: (u * 8) % 1.5}[name]
    _, pruned, _ = _prove(_Between(fn))
    assert pruned.get_submodule("a").out_channels == 4


@pytest.mark.slow
def test_every_runnable_unary_pointwise_op_is_proven() -> None:
    proven = []
    for name in pointwise_op_names():
        fn = _runnable_unary(name)
        if fn is None:
            continue
        _, pruned, _ = _prove(_Between(fn))
        assert pruned.get_submodule("a").out_channels == 4, name
        proven.append(name)
    assert len(proven) > 50


def _activation(cls: type) -> nn.Module:
    if cls is nn.Threshold:
        return cls(0.7, 0.0)
    return cls()


@pytest.mark.parametrize("name", [n for n in activation.__all__ if n not in NON_ELEMENTWISE_ACTIVATIONS])
def test_every_element_wise_activation_module_is_proven(name: str) -> None:
    _, pruned, _ = _prove(_Between(_activation(getattr(activation, name))))
    assert pruned.get_submodule("a").out_channels == 4


def test_channel_softmax_and_glu_are_not_element_wise() -> None:
    for act in (nn.Softmax2d(), nn.GLU(dim=-1), nn.Softmin(dim=1)):
        with pytest.warns(fxprune.FxPruneWarning):
            groups = fxprune.find_groups(_Between(act).eval(), example_inputs=(X,))
        assert not next(g for g in groups if g.key == "a").prunable


# ----------------------------------------------------------------------------- PReLU


class PReLUNet(nn.Module):
    def __init__(self, slopes: int, functional: bool = False) -> None:
        super().__init__()
        self.functional = functional
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.act = nn.PReLU(slopes)
        with torch.no_grad():
            self.act.weight.uniform_(-1.0, 1.0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        y = F.prelu(y, self.act.weight) if self.functional else self.act(y)
        return self.b(y).mean((2, 3))


@pytest.mark.parametrize("functional", [False, True])
def test_prelu_slopes_are_sliced_with_their_channels(functional: bool) -> None:
    model, pruned, plan = _prove(PReLUNet(8, functional))
    keep = plan.keep("a")
    assert len(keep) == 4
    act = pruned.get_submodule("act")
    torch.testing.assert_close(act.weight.detach(), model.act.weight.detach()[keep])
    if not functional:
        assert act.num_parameters == 4
    bad = copy.deepcopy(pruned)
    bad.get_submodule("act").weight.data = act.weight.detach().roll(1)
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_a_single_prelu_slope_is_left_whole() -> None:
    model, pruned, _ = _prove(PReLUNet(1))
    assert pruned.get_submodule("act").weight.shape == (1,)
    assert pruned.get_submodule("a").out_channels == 4


# ----------------------------------------------------------------------------- channel-sized parameter operands


class Operands(nn.Module):
    """The operands Torch-Pruning prunes: a clamp floor, a viewed bias, a layer scale, a cast gain."""

    def __init__(self, kind: str) -> None:
        super().__init__()
        self.kind = kind
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.floor = nn.Parameter(torch.rand(1, 8, 1, 1) * 0.5 + 0.1)  # distinct and above the ReLU
        self.bias = nn.Parameter(torch.randn(8))
        self.gamma = nn.Parameter(torch.rand(8, 1, 1) + 0.5)
        self.gain = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.kind == "clamp":
            y = torch.clamp(y, min=self.floor)
        elif self.kind == "view":
            y = y + self.bias.view(1, 8, 1, 1)  # a literal channel count: the rewrite patches it
        elif self.kind == "layer_scale":
            y = self.gamma * y
        elif self.kind == "cast":
            y = y * self.gain.to(y.dtype).reshape(1, -1, 1, 1) + self.bias[None, :, None, None]
        return self.b(F.relu(y)).mean((2, 3))


@pytest.mark.parametrize("kind,tensor", [("clamp", "floor"), ("view", "bias"), ("layer_scale", "gamma"), ("cast", "gain")])
def test_channel_sized_parameter_operands_are_sliced(kind: str, tensor: str) -> None:
    model, pruned, plan = _prove(Operands(kind))
    keep = plan.keep("a")
    got = getattr(pruned, tensor).detach()
    want = getattr(model, tensor).detach()
    torch.testing.assert_close(got.flatten(), want.flatten()[keep])
    bad = copy.deepcopy(pruned)
    getattr(bad, tensor).data = got.roll(1, [d for d, s in enumerate(got.shape) if s == len(keep)][0])
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_a_viewed_bias_keeps_working_after_pruning_via_a_patched_view() -> None:
    _, pruned, plan = _prove(Operands("view"))
    view = next(n for n in pruned.graph.nodes if n.op == "call_method" and n.target == "view")
    assert 8 not in view.args[1:] and len(plan.keep("a")) in view.args[1:]


class CastGain(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 4, 1)
        self.gain = nn.Parameter(torch.rand(8) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.b(y * self.gain.to(y.dtype).reshape(1, -1, 1, 1)).mean((2, 3))


def test_a_cast_and_reshaped_gain_is_sliced() -> None:
    model, pruned, plan = _prove(CastGain())
    assert pruned.gain.shape == (len(plan.keep("a")),)


def test_torchvision_frozen_batch_norm_constants_are_sliced() -> None:
    from torchvision.ops.misc import FrozenBatchNorm2d

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.bn, self.b = nn.Conv2d(3, 8, 3, padding=1), FrozenBatchNorm2d(8), nn.Conv2d(8, 4, 1)
            with torch.no_grad():
                for name in ("weight", "bias", "running_mean"):
                    getattr(self.bn, name).copy_(torch.randn(8))
                self.bn.running_var.copy_(torch.rand(8) + 0.5)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(F.relu(self.bn(self.a(x)))).mean((2, 3))

    model, pruned, plan = _prove(Net())
    k = len(plan.keep("a"))
    # fx folds the buffer arithmetic into constants (scale, shift): each is a sliced [1, C, 1, 1] operand.
    constants = [str(n.target) for n in pruned.graph.nodes if n.op == "get_attr"]
    assert constants and all(getattr(pruned, c).shape == (1, k, 1, 1) for c in constants)
    bad = copy.deepcopy(pruned)
    setattr(bad, constants[-1], getattr(pruned, constants[-1]).roll(1, 1))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


class AnchorsCast(nn.Module):
    """YOLO's head casts tensors it builds itself like a feature map: ``anchors.type_as(f)``."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = torch.relu(self.a(x))
        grid = torch.arange(4.0).view(1, 4, 1, 1)
        return self.b(f) + grid.type_as(f) + grid.to(f) + torch.ones(1, 4, 1, 1).to(f.dtype)


@pytest.mark.parametrize("method", ["type_as", "to", "float", "contiguous", "clone", "detach"])
def test_conversions_pass_channels(method: str) -> None:
    root = nn.Module()
    root.a, root.b = nn.Conv2d(3, 8, 1), nn.Conv2d(8, 4, 1)
    g = torch.fx.Graph()
    x = g.placeholder("x")
    args = {"type_as": (x,), "to": (torch.float32,)}.get(method, ())
    y = g.call_method(method, (g.call_module("a", (x,)),) + args)
    g.output(g.call_method("mean", (g.call_module("b", (y,)), (2, 3))))
    gm = torch.fx.GraphModule(root, g)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        groups = {g.key: g for g in fxprune.find_groups(gm, example_inputs=(X,))}
    assert groups["a"].prunable


def test_an_untracked_tensor_cast_like_a_pruned_one_keeps_its_channels_prunable() -> None:
    torch.manual_seed(0)
    model = randomize_norms(AnchorsCast()).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(X,))}
    assert groups["a"].prunable and not groups["b"].prunable  # b: the model output
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    assert pruned.get_submodule("a").out_channels == 4
    assert_rolled_weight_fails(model, pruned, plan, (X,), "b", 1)
