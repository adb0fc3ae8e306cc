"""Small core fixes, each proven: torch.stack, torch.batch_norm in ATen order, taylor/apoz on
functional layers, ratio patterns naming a functional layer by its owning module."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.export import from_exported
from fxprune.importance import ScoringOptions, score_groups
from fxprune.testing import assert_equivalent, randomize_norms


def _group(groups: Any, name: str) -> fxprune.Group:
    """The group ``name`` (a module, or a functional layer's owner) outputs."""
    for g in groups:
        if name in g.modules("out") or any(t.target == f"{name}.weight" and t.role == "out" for t in g.tensors):
            return g
    raise KeyError(name)


def _prove(model: nn.Module, ratio: Any, x: torch.Tensor) -> torch.fx.GraphModule:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # every op known: nothing frozen with a warning
        plan = fxprune.plan(model, ratio, example_inputs=(x,))
    pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    return pruned


# =========================================================================== torch.stack


class StackNet(nn.Module):
    """Two branches stacked along a new dim (before or after the channels), reduced, then consumed."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.dim = dim
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.stack([self.a(x), self.b(x)], self.dim)
        return self.c(s.amax(self.dim) + s.mean(self.dim))


@pytest.mark.parametrize("dim", [0, 1, 2, -1, -5])
@pytest.mark.parametrize("route", ["fx", "export"])
def test_stack_shares_the_channels_of_its_operands_and_shifts_their_dim(dim: int, route: str) -> None:
    torch.manual_seed(0)
    model = randomize_norms(StackNet(dim)).eval()
    x = torch.randn(2, 3, 8, 8)
    subject: nn.Module = model if route == "fx" else from_exported(torch.export.export(model, (x,)))
    if route == "export":
        assert any(n.target is torch.stack for n in subject.graph.nodes)  # aten.stack lifted onto the rule
    groups = fxprune.find_groups(subject, example_inputs=(x,))
    g = _group(groups, "a.0")
    assert g.prunable and {"a.0", "b.0"} <= set(g.modules("out")) and "c" in g.modules("in")
    pruned = _prove(subject, 0.5, x)
    assert pruned.get_submodule("a.0").out_channels == pruned.get_submodule("b.0").out_channels == 4
    assert pruned.get_submodule("c").in_channels == 4


class StackUntracked(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.c = nn.Conv2d(3, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(torch.stack([self.a(x), x], 1).sum(1))  # the model input keeps its channels


def test_stack_with_an_untracked_operand_keeps_the_channels_whole() -> None:
    model = StackUntracked().eval()
    x = torch.randn(2, 3, 8, 8)
    g = _group(fxprune.find_groups(model, example_inputs=(x,)), "a")
    assert g.frozen and any("stack with an operand of unknown channel structure" in r for r in g.reasons)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    assert_equivalent(model, fxprune.apply(model, plan), plan, (x,))


# =========================================================================== functional layers


class FuncConv(nn.Module):
    """A conv traced through: ``F.conv2d`` on its own parameters (a functional layer)."""

    def __init__(self, cin: int, cout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(cout, cin, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(cout) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, self.bias, padding=1)


class AtenBatchNorm(nn.Module):
    """``torch.batch_norm`` in ATen argument order: (input, weight, bias, running_mean, running_var, ...)."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(c) + 0.5)
        self.bias = nn.Parameter(torch.randn(c) * 0.1)
        self.register_buffer("running_mean", torch.randn(c) * 0.1)
        self.register_buffer("running_var", torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.batch_norm(x, self.weight, self.bias, self.running_mean, self.running_var,
                                False, 0.1, 1e-5, False)


class FunctionalNet(nn.Module):
    def __init__(self, functional: bool = True, act: Any = torch.tanh) -> None:
        super().__init__()
        self.act = act
        self.a = FuncConv(3, 8) if functional else nn.Conv2d(3, 8, 3, padding=1)
        self.bn = AtenBatchNorm(8) if functional else nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.head = nn.Linear(6, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.act(self.bn(self.a(x)))).mean((2, 3)))


def _twins(act: Any = torch.tanh) -> Any:
    """The functional net and its module form with the same weights (eval mode)."""
    torch.manual_seed(4)
    functional = FunctionalNet(True, act).eval()
    module = FunctionalNet(False, act).eval()
    with torch.no_grad():
        module.a.weight.copy_(functional.a.weight)
        module.a.bias.copy_(functional.a.bias)
        for name in ("weight", "bias", "running_mean", "running_var"):
            getattr(module.bn, name).copy_(getattr(functional.bn, name))
        module.b.load_state_dict(functional.b.state_dict())
        module.head.load_state_dict(functional.head.state_dict())
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.allclose(functional(x), module(x), atol=1e-6)
    return functional, module, x


def test_torch_batch_norm_in_aten_order_is_a_functional_layer() -> None:
    functional, _, x = _twins()
    g = _group(fxprune.find_groups(functional, example_inputs=(x,)), "a")
    kinds = {(t.target, t.kind) for t in g.tensors}
    assert {("bn.weight", "weight"), ("bn.bias", "bias"), ("bn.running_mean", "running_mean"),
            ("bn.running_var", "running_var")} <= kinds
    pruned = _prove(functional, 0.5, x)
    for name in ("a.weight", "a.bias", "bn.weight", "bn.bias", "bn.running_mean", "bn.running_var"):
        assert pruned.get_parameter(name).shape[0] == 4 if "running" not in name else pruned.get_buffer(name).shape[0] == 4
    assert pruned.get_submodule("b").in_channels == 4


@pytest.mark.parametrize("importance", ["taylor", "apoz"])
def test_data_driven_criteria_score_functional_layers_like_their_module_forms(importance: str) -> None:
    # tanh: no ReLU on the way, so apoz scores the producer's output (a functional conv here).
    functional, module, x = _twins()
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,))) for _ in range(2)]
    scores = []
    for model in (functional, module):
        analysis = fxprune.analyze_model(model, example_inputs=(x,))
        g = _group(analysis.groups, "a")
        scores.append(score_groups(analysis, importance, [g], ScoringOptions(calibration=batches))[g.index])
    assert not torch.allclose(scores[1], scores[1][:1].expand_as(scores[1]))  # the module form has a preference
    torch.testing.assert_close(scores[0], scores[1], rtol=1e-4, atol=1e-6)


def test_taylor_on_functional_layers_counts_their_parameters() -> None:
    # Without the functional layer's tensors, the group would be scored on b's columns only.
    functional, _, x = _twins()
    batches = [(torch.randn(4, 3, 8, 8), torch.randint(0, 4, (4,)))]
    analysis = fxprune.analyze_model(functional, example_inputs=(x,))
    g = _group(analysis.groups, "a")
    work = copy.deepcopy(functional)
    F.cross_entropy(work(batches[0][0]), batches[0][1]).backward()
    per_channel = torch.zeros(8, dtype=torch.float64)
    for p in (work.a.weight, work.a.bias, work.bn.weight, work.bn.bias):
        per_channel += (p * p.grad).detach().double().reshape(8, -1).sum(1)
    per_channel += (work.b.weight * work.b.weight.grad).detach().double().transpose(0, 1).reshape(8, -1).sum(1)
    got = score_groups(analysis, "taylor", [g], ScoringOptions(calibration=batches))[g.index]
    torch.testing.assert_close(got, per_channel.abs().float(), rtol=1e-4, atol=1e-7)


def test_ratio_patterns_match_a_functional_layer_by_its_owning_module() -> None:
    functional, module, x = _twins()
    for model in (functional, module):
        with warnings.catch_warnings():
            warnings.simplefilter("error", fxprune.FxPruneWarning)  # the pattern matches a module: no warning
            plan = fxprune.plan(model, {"a": 0.5, "b": 0.0}, example_inputs=(x,))
        by_group = {g.key: len(g.keep) for g in plan.groups}
        assert (by_group["a"], by_group["b"]) == (4, 6), (type(model.a).__name__, by_group)
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
        assert_equivalent(model, pruned, plan, (x,), example_inputs=(x,))
    # A pattern naming the functional layer's owner alone (its batch norm) prunes the group too.
    plan = fxprune.plan(functional, {"bn": 0.5}, example_inputs=(x,))
    assert (len(plan.keep("a") or []), len(plan.keep("b") or [])) == (4, 6)


# =========================================================================== one argument-rewrite path


class DepthwiseViewNet(nn.Module):
    """A depthwise functional conv (its ``groups=`` counts channels) and a viewed bias (``view(1, 8, 1, 1)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3) * 0.3)
        self.bias = nn.Parameter(torch.randn(8) * 0.1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.a(x), self.dw, None, 1, 1, 1, 8)
        return self.b(torch.relu(y + self.bias.view(1, 8, 1, 1)))


def test_parameter_views_and_depthwise_groups_are_argument_rewrites() -> None:
    from fxprune.rules import ARG_REWRITE, ArgRewrite, ChannelCount

    torch.manual_seed(5)
    model = DepthwiseViewNet().eval()
    x = torch.randn(2, 3, 8, 8)
    analysis = fxprune.analyze_model(model, example_inputs=(x,))
    nodes = {n.name: n for n in analysis.gm.graph.nodes}
    conv, view = nodes["conv2d"], nodes["view"]
    for node, path in ((conv, (6,)), (view, (2,))):
        rewrite = node.meta[ARG_REWRITE]
        assert isinstance(rewrite, ArgRewrite) and [p.path for p in rewrite.patches] == [path]
        assert isinstance(rewrite.patches[0].value, ChannelCount)
    pruned = _prove(model, 0.5, x)
    new = {n.name: n for n in pruned.graph.nodes}
    assert new["conv2d"].args[6] == 4 and new["view"].args[1:] == (1, 4, 1, 1)
    assert ARG_REWRITE not in new["view"].meta  # the record is consumed by the rewrite


# =========================================================================== torch.roll, exported


class RollNet(nn.Module):
    """Swin's cyclic shift on a channels-last map: roll along H and W, channels pass."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(3, 8), nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x.permute(0, 2, 3, 1))
        return self.b(torch.roll(h, shifts=(1, -2), dims=(1, 2)).relu()).mean((1, 2))


@pytest.mark.parametrize("route", ["fx", "export"])
def test_roll_along_spatial_dims_passes_channels_on_both_routes(route: str) -> None:
    model = RollNet().eval()
    x = torch.randn(2, 3, 6, 6)
    subject: nn.Module = model if route == "fx" else from_exported(torch.export.export(model, (x,)))
    if route == "export":
        assert any(n.target is torch.roll for n in subject.graph.nodes)  # aten.roll lifted onto the rule
    assert _group(fxprune.find_groups(subject, example_inputs=(x,)), "a").prunable
    assert _prove(subject, 0.5, x).get_submodule("a").out_features == 4
