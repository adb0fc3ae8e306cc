"""Functional layers on get_attr tensors: members of their groups exactly like the module forms.

Each kind is proven against the masked reference (float64), and each has a test that the proof
fails when the rewrite of that member is deliberately broken (its tensor sliced with the wrong
channels), so the proof is known to look at it.
"""

from __future__ import annotations

import copy
import operator
import warnings
from typing import Any, Callable, List, Tuple

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.importance import l1, l2, fpgm, bn as bn_criterion
from fxprune.testing import assert_equivalent, masked_reference, randomize_norms

X = torch.randn(2, 3, 12, 12)


class FunctionalBN(nn.BatchNorm2d):
    """timm's BatchNormAct2d in small: a BatchNorm subclass whose forward calls F.batch_norm."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                   self.training, self.momentum, self.eps))


class FunctionalIN(nn.InstanceNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.instance_norm(x, None, None, self.weight, self.bias, True, 0.1, self.eps)


class BNNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = FunctionalBN(8)
        self.b = nn.Conv2d(8, 6, 3, padding=1)
        self.norm = FunctionalIN(6, affine=True)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # (a ReLU after the InstanceNorm: its output's spatial mean is its bias, which a mean would read alone)
        return self.head(F.relu(self.norm(self.b(self.bn(self.a(x)))))).mean((2, 3))


class ConvParams(nn.Module):
    """Unwrapped nn.Parameter weights fed to F.conv2d / F.linear, one through a dtype cast."""

    def __init__(self, groups: int = 1) -> None:
        super().__init__()
        self.groups = groups
        self.w1 = nn.Parameter(torch.randn(8, 3, 3, 3) * 0.3)
        self.b1 = nn.Parameter(torch.randn(8))
        self.w2 = nn.Parameter(torch.randn(12, 8 // groups, 3, 3) * 0.3)
        self.b2 = nn.Parameter(torch.randn(12))
        self.w3 = nn.Parameter(torch.randn(5, 12 * 4) * 0.3)
        self.b3 = nn.Parameter(torch.randn(5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(F.conv2d(x, self.w1.to(x.dtype), self.b1, padding=1))
        y = F.relu(F.conv2d(y, self.w2, self.b2, 1, 1, 1, self.groups))
        y = F.adaptive_avg_pool2d(y, 2).flatten(1)
        return F.linear(y, self.w3, self.b3)


class DepthwiseParams(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.dw = nn.Parameter(torch.randn(8, 1, 3, 3))
        self.dwb = nn.Parameter(torch.randn(8))
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(self.a(x), self.dw, self.dwb, 1, 1, 1, 8)
        return self.b(F.relu(y)).mean((2, 3))


def _prove(model: nn.Module, ratio: float = 0.5, **kw: Any) -> Tuple[nn.Module, fxprune.PruningPlan]:
    model = randomize_norms(model.eval())
    plan = fxprune.plan(model, ratio, example_inputs=(X,), **kw)
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, [X], example_inputs=(X,))
    return model, pruned, plan  # type: ignore[return-value]


def _broken(pruned: nn.Module, target: str, how: Callable[[torch.Tensor], torch.Tensor]) -> nn.Module:
    """A copy of ``pruned`` whose tensor ``target`` is replaced by ``how(tensor)`` (a wrong slice)."""
    bad = copy.deepcopy(pruned)
    owner, _, name = target.rpartition(".")
    module = bad.get_submodule(owner) if owner else bad
    old = getattr(module, name)
    new = how(old.detach().clone())
    if isinstance(old, nn.Parameter):
        module._parameters[name] = nn.Parameter(new)
    else:
        module._buffers[name] = new
    return bad


def _roll(t: torch.Tensor, dim: int = 0) -> torch.Tensor:
    """The kept channels in the wrong order: what slicing with the wrong indices gives."""
    return t.roll(1, dim)


def _no_warnings(fn: Callable[[], Any]) -> Any:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        return fn()


# ----------------------------------------------------------------------------- F.batch_norm / F.instance_norm


def test_functional_batch_norm_and_instance_norm_are_members_and_are_proven() -> None:
    model = BNNet()
    groups = _no_warnings(lambda: fxprune.find_groups(model.eval(), example_inputs=(X,)))
    a = next(g for g in groups if g.key == "a")
    assert a.prunable
    assert {(t.target, t.role, t.kind) for t in a.tensors} == {
        ("bn.weight", "channelwise", "weight"), ("bn.bias", "channelwise", "bias"),
        ("bn.running_mean", "channelwise", "running_mean"), ("bn.running_var", "channelwise", "running_var")}
    b = next(g for g in groups if g.key == "b")
    assert b.prunable and {t.target for t in b.tensors} == {"norm.weight", "norm.bias"}
    model, pruned, plan = _prove(model)
    kept = len(plan.keep("a"))
    for name in ("weight", "bias", "running_mean", "running_var"):
        assert getattr(pruned.get_submodule("bn"), name).shape == (kept,)
    assert pruned.get_submodule("norm").weight.shape == (len(plan.keep("b")),)
    assert getattr(model.bn, "running_mean").shape == (8,)  # the input model is never touched


@pytest.mark.parametrize("tensor", ["bn.running_mean", "bn.running_var", "bn.weight", "bn.bias", "norm.bias"])
def test_the_proof_fails_when_a_functional_norm_tensor_is_sliced_wrongly(tensor: str) -> None:
    model, pruned, plan = _prove(BNNet())
    bad = _broken(pruned, tensor, _roll)
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_the_masked_reference_masks_functional_norm_tensors() -> None:
    model = randomize_norms(BNNet().eval())
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    ref = masked_reference(model, plan, example_inputs=(X,))
    removed = sorted(set(range(8)) - set(plan.keep("a")))
    bn = ref.get_submodule("bn")
    assert removed and all(float(bn.weight[i].detach()) == 0 and float(bn.bias[i].detach()) == 0 for i in removed)
    assert all(float(bn.running_mean[i]) == 0 and float(bn.running_var[i]) == 1 for i in removed)
    assert float(model.bn.running_var[removed[0]]) != 1  # on a copy


def test_cli_prints_each_warning_reason_once_with_a_count(capsys: pytest.CaptureFixture) -> None:
    from fxprune.cli import _print_warnings

    same = [f"channels left unpruned: no channel rule for call_function torch.cumsum: node %c{i} : ... at m.py:{i}" for i in range(34)]
    _print_warnings(same + same + ["ignore pattern 'x' matches no module"])  # plan and apply: each twice
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 2
    assert err[0].startswith("warning: channels left unpruned: no channel rule for call_function torch.cumsum: node %c0 ")
    assert err[0].endswith("(34 warnings in all for different nodes)") and err[1] == "warning: ignore pattern 'x' matches no module"


def test_a_run_shows_each_warning_reason_once_on_the_console_and_every_one_in_the_log(caplog: pytest.LogCaptureFixture) -> None:
    import logging
    from fxprune.workflow.report import FILE_ONLY, WarningLog, collect_warnings

    log = WarningLog()
    with caplog.at_level(logging.WARNING, logger="fxprune.workflow"):
        with collect_warnings(log):
            for i in range(5):
                warnings.warn(fxprune.FxPruneWarning(f"channels left unpruned: no rule for F.foo: node %n{i} : x"))
    console = [r.getMessage() for r in caplog.records if not getattr(r, FILE_ONLY, False)]
    logged = [r.getMessage() for r in caplog.records]
    assert len(console) == 2 and "%n0" in console[0] and "5 warnings in all" in console[1]
    assert all(any(f"%n{i}" in m for m in logged) for i in range(5))  # run.log has every node
    assert len(log) == 5 and log.reasons() == [("FxPruneWarning", "channels left unpruned: no rule for F.foo", 5)]


def test_criteria_see_functional_norm_weights() -> None:
    model = randomize_norms(BNNet().eval())
    groups = fxprune.find_groups(model, example_inputs=(X,))
    gm = fxprune.trace(model)
    a = next(g for g in groups if g.key == "a")
    w = model.a.weight.detach()
    expected = w.abs().sum((1, 2, 3)) + model.bn.weight.detach().abs() + model.b.weight.detach().abs().sum((0, 2, 3))
    torch.testing.assert_close(l1(a, gm), expected.float())
    expected2 = (w.pow(2).sum((1, 2, 3)) + model.bn.weight.detach().pow(2) + model.b.weight.detach().pow(2).sum((0, 2, 3))).sqrt()
    torch.testing.assert_close(l2(a, gm), expected2.float())
    torch.testing.assert_close(bn_criterion(a, gm), model.bn.weight.detach().abs().float())
    assert fpgm(a, gm).shape == (8,)


def test_ignore_by_the_owning_module_freezes_a_functional_layer() -> None:
    groups = _no_warnings(lambda: fxprune.find_groups(BNNet().eval(), example_inputs=(X,), ignore=["bn"]))
    a = next(g for g in groups if g.key == "a")
    assert a.frozen and any("ignored tensor bn." in r for r in a.reasons)


# ----------------------------------------------------------------------------- F.conv2d / F.linear


def test_unwrapped_parameters_of_functional_conv_and_linear_are_pruned_and_proven() -> None:
    model = ConvParams()
    groups = _no_warnings(lambda: fxprune.find_groups(model.eval(), example_inputs=(X,)))
    keys = {g.key: g for g in groups}
    assert keys["w1"].prunable and keys["w2"].prunable  # named after the weight's owner (the root: its name)
    model, pruned, plan = _prove(model)
    k1, k2 = len(plan.keep("w1")), len(plan.keep("w2"))
    assert pruned.w1.shape == (k1, 3, 3, 3) and pruned.b1.shape == (k1,)
    assert pruned.w2.shape == (k2, k1, 3, 3) and pruned.w3.shape == (5, k2 * 4)
    assert isinstance(pruned.w1, nn.Parameter) and model.w1.shape == (8, 3, 3, 3)


@pytest.mark.parametrize("tensor,dim", [("w1", 0), ("b1", 0), ("w2", 1), ("w3", 1)])
def test_the_proof_fails_when_a_functional_conv_or_linear_is_sliced_wrongly(tensor: str, dim: int) -> None:
    model, pruned, plan = _prove(ConvParams())
    bad = _broken(pruned, tensor, lambda t: t.roll(4 if tensor == "w3" else 1, dim))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_a_grouped_functional_conv_keeps_equal_counts_per_conv_group() -> None:
    model = ConvParams(groups=2)
    groups = fxprune.find_groups(model.eval(), example_inputs=(X,))
    assert {g.key: g.blocks for g in groups}["w1"] == 2
    model, pruned, plan = _prove(model)
    k1 = len(plan.keep("w1"))
    assert pruned.w2.shape[1] == k1 // 2
    bad = _broken(pruned, "w2", lambda t: t.roll(1, 1))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


def test_a_depthwise_functional_conv_is_channelwise_and_its_groups_follow() -> None:
    model, pruned, plan = _prove(DepthwiseParams())
    k = len(plan.keep("a"))
    assert k < 8 and pruned.dw.shape == (k, 1, 3, 3) and pruned.dwb.shape == (k,)
    conv = next(n for n in pruned.graph.nodes if n.target is F.conv2d)
    assert k in conv.args or conv.kwargs.get("groups") == k
    bad = _broken(pruned, "dw", _roll)
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


class StdConv(nn.Conv2d):
    """timm's StdConv2d: the weight is standardised per filter before F.conv2d."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None,
                              training=True, momentum=0., eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, weight, self.bias, self.stride, self.padding, self.dilation, self.groups)


class StdNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = StdConv(3, 8, 3, padding=1)
        self.b = StdConv(8, 6, 3, padding=1)
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.relu(self.b(F.relu(self.a(x))))).mean((2, 3))


def test_a_weight_standardised_conv_prunes_its_filters_but_not_its_inputs() -> None:
    groups = _no_warnings(lambda: fxprune.find_groups(StdNet().eval(), example_inputs=(X,)))
    keys = {g.key: g for g in groups}
    # b's filters are standardised over its inputs: a's channels stay whole, by design (no warning).
    assert keys["a"].frozen and any("weight standardisation" in r for r in keys["a"].reasons)
    assert keys["b"].prunable
    model, pruned, plan = _prove(StdNet())
    k = len(plan.keep("b"))
    assert pruned.get_submodule("b").weight.shape[0] == k < 6
    bad = _broken(pruned, "b.weight", _roll)
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


@pytest.mark.parametrize("case", ["SubclassStem", "FunctionalFirst", "LinearSubclassMLP"])
def test_layers_called_functionally_that_froze_everything_before_are_pruned_and_proven(case: str) -> None:
    # Before: "nothing could be pruned: layers called functionally are not pruned" (tests/test_api_checks.py).
    from tests import test_api_checks as before

    cls = getattr(before, case)
    x = torch.randn(2, 6) if case == "LinearSubclassMLP" else X
    model = randomize_norms(cls().eval())
    plan = _no_warnings(lambda: fxprune.plan(model, 0.5, example_inputs=(x,)))
    assert plan.pruned_groups
    assert_equivalent(model, fxprune.apply(model, plan, example_inputs=(x,)), plan, [x], example_inputs=(x,))


class ScaledWeights(nn.Module):
    """A weight computed element-wise (``w * 0.5``): rows and columns are still sliced."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.conv2d(F.relu(self.a(x)), self.w * 0.5, padding=1)
        return self.head(F.relu(y)).mean((2, 3))


def test_an_element_wise_weight_expression_slices_rows_and_columns() -> None:
    model, pruned, plan = _prove(ScaledWeights())
    assert pruned.w.shape == (len(plan.keep("w")), len(plan.keep("a")), 3, 3) == (3, 4, 3, 3)
    bad = _broken(pruned, "w", lambda t: t.roll(1, 1))
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


class CentredConv(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.w = nn.Parameter(torch.randn(6, 8, 3, 3))
        self.head = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.w - self.w.mean((1, 2, 3), keepdim=True)
        return self.head(F.relu(F.conv2d(F.relu(self.a(x)), w, padding=1))).mean((2, 3))


def test_a_weight_centred_per_filter_prunes_filters_and_keeps_inputs() -> None:
    model, pruned, plan = _prove(CentredConv())
    assert pruned.w.shape == (len(plan.keep("w")), 8, 3, 3) and len(plan.keep("w")) < 6
    assert len(plan.keep("a")) == 8  # centring runs over the inputs: frozen by design
    bad = _broken(pruned, "w", _roll)
    with pytest.raises(AssertionError):
        assert_equivalent(model, bad, plan, [X], example_inputs=(X,))


class ComputedWeight(nn.Module):
    """A weight computed across its filters (flip along dim 0): no per-channel slice exists."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(6, 8, 1, 1))
        self.b = nn.Conv2d(6, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.conv2d(self.a(x), self.w + self.w.flip(0))).mean((2, 3))


def test_a_weight_computed_across_channels_is_refused_with_a_warning() -> None:
    model = ComputedWeight().eval()
    with pytest.warns(fxprune.FxPruneWarning, match="computed from parameters"):
        pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert pruned.get_submodule("a").out_channels == 8  # its consumer's weight cannot be sliced
    with pytest.raises(fxprune.UnsupportedNodeError):
        fxprune.prune(model, 0.5, example_inputs=(X,), strict=True)


class SharedWeight(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 1)
        self.w = nn.Parameter(torch.randn(8, 8, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(self.a(x), self.w).mean((2, 3)) + self.w.sum()


def test_a_functional_weight_also_read_whole_is_not_sliced() -> None:
    model = SharedWeight().eval()
    groups = fxprune.find_groups(model, example_inputs=(X,))
    a = next(g for g in groups if g.key == "a")
    assert a.frozen and any("also read whole" in r for r in a.reasons)


# ----------------------------------------------------------------------------- timm (acceptance)

# Torch-Pruning 1.6.1's result on the same models, computed once by hand (not a test dependency):
#   m = timm.create_model(name).eval(); x = torch.randn(1, 3, 64, 64)
#   torch_pruning.pruner.MagnitudePruner(m, x, importance=torch_pruning.importance.MagnitudeImportance(p=1),
#                                        pruning_ratio=0.5, ignored_layers=[m.get_classifier()]).step()
#   sum(p.numel() for p in m.parameters())
TP_PARAMS = {"mobilenetv3_small_100": 911_224, "efficientnet_b0": 1_701_446, "regnetx_002": 769_376}


def _timm_case(name: str) -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = randomize_norms(timm.create_model(name).eval())
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert not caught, [str(w.message) for w in caught[:3]]
    assert_equivalent(model, pruned, plan, [x], example_inputs=(x,))
    params = sum(p.numel() for p in pruned.parameters())
    assert params <= 1.1 * TP_PARAMS[name], (params, TP_PARAMS[name])


def test_timm_mobilenetv3_small_prunes_as_deep_as_torch_pruning_proven() -> None:
    _timm_case("mobilenetv3_small_100")


@pytest.mark.slow
@pytest.mark.parametrize("name", ["efficientnet_b0", "regnetx_002"])
def test_timm_cnns_prune_as_deep_as_torch_pruning_proven(name: str) -> None:
    _timm_case(name)
