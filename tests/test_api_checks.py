"""The public API's input checks and its "never silent" warnings (issue 10 items 13 and 18, issue 16 item 5).

Bad arguments give one clear :class:`fxprune.FxPruneError` naming the argument and what it
accepts, before any work; a call that prunes nothing says why in an :class:`fxprune.FxPruneWarning`
(``strict=True``: raises when a layer fxprune cannot see is the reason).
"""

from __future__ import annotations

import warnings
from typing import Any, Callable, List

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.allocation import Policy, allocate
from fxprune.api import analyze_model
from fxprune.importance import MODEL_CRITERIA, register_model_criterion

X = torch.randn(2, 3, 8, 8)


class Tiny(nn.Module):
    """conv(3->8) -> relu -> conv(8->4): one prunable group of 8 channels (c1)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c2(torch.relu(self.c1(x)))


class OneLayer(nn.Module):
    """A single conv: its only group is the model's output, so nothing can be pruned."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(3, 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.c(x)


class Optional2(Tiny):
    """A forward with a second, optional input."""

    def forward(self, x: torch.Tensor, scale: float = 1.0) -> torch.Tensor:  # type: ignore[override]
        return self.c2(torch.relu(self.c1(x)) * scale)


# Subclasses of the standard layers whose forward fx traces through (timm's weight-standardised
# convs and BatchNormAct2d, torchvision's video stems): their trace shows functional calls.
class StdConv(nn.Conv2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight - self.weight.mean((1, 2, 3), keepdim=True)
        return torch.conv2d(x, w, self.bias, self.stride, self.padding)


class NormAct(nn.BatchNorm2d):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                                       False, 0.0, self.eps))


class LinearC(nn.Linear):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch._C._nn.linear(x, self.weight, self.bias)


class SubclassStem(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.stem = StdConv(3, 8, 3, padding=1)
        self.bn = NormAct(8)
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.bn(self.stem(x)))


class FunctionalFirst(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(8, 3, 3, 3))
        self.head = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(F.conv2d(x, self.w, padding=1))


class HandWrittenLinear(nn.Module):
    """A first layer written as a matmul with a parameter: no layer op at all."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.randn(6, 16))
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(torch.matmul(x, self.w)))


class LinearSubclassMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = LinearC(6, 16)
        self.fc2 = nn.Linear(16, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


def fx_warnings(fn: Callable[[], Any]) -> List[str]:
    """Run ``fn`` and return the FxPruneWarning messages it gave."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        fn()
    return [str(w.message) for w in caught if issubclass(w.category, fxprune.FxPruneWarning)]


def same_weights(a: nn.Module, b: nn.Module) -> bool:
    pa, pb = dict(a.state_dict()), dict(b.state_dict())
    return pa.keys() == pb.keys() and all(torch.equal(pa[k], pb[k]) for k in pa)


# =========================================================================== issue 10 item 13


def test_global_ranking_with_no_prunable_group_returns_an_unchanged_copy() -> None:
    # Before: InternalError "global ranking needs scores".
    model = OneLayer().eval()
    with pytest.warns(fxprune.FxPruneWarning, match="nothing could be pruned.*reaches the model output"):
        pruned = fxprune.prune(model, 0.5, global_ranking=True)
    assert pruned is not model and isinstance(pruned, torch.fx.GraphModule)
    assert same_weights(pruned, model)
    assert all(p.data_ptr() != q.data_ptr() for p, q in zip(pruned.parameters(), model.parameters()))
    with torch.no_grad():
        assert torch.equal(pruned(X), model(X))
    assert not pruned.meta["fxprune_plan"].pruned_groups
    with pytest.warns(fxprune.FxPruneWarning, match="nothing could be pruned"):
        assert not fxprune.plan(model, 0.5, global_ranking=True).pruned_groups


def test_a_target_with_no_prunable_group_names_why() -> None:
    with pytest.warns(fxprune.FxPruneWarning), \
            pytest.raises(fxprune.FxPruneError, match="target cannot be met: nothing could be pruned.*model output"):
        fxprune.prune(OneLayer(), target_params=0.5, global_ranking=True)


# =========================================================================== issue 10 item 18


def test_ignore_naming_no_module_warns() -> None:
    with pytest.warns(fxprune.FxPruneWarning, match=r"ignore pattern 'layer9\.\*' matches no module.*'c1', 'c2'"):
        fxprune.prune(Tiny(), 0.5, ignore=["layer9.*"])
    with pytest.warns(fxprune.FxPruneWarning, match="ignore pattern 'c3' matches no module"):
        fxprune.find_groups(Tiny(), ignore="c3")
    assert not any("ignore pattern" in m for m in fx_warnings(lambda: fxprune.prune(Tiny(), 0.5, ignore="c*")))


def test_ignore_naming_only_a_container_warns_with_the_glob_to_use() -> None:
    model = nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU()), nn.Conv2d(8, 4, 3))
    with pytest.warns(fxprune.FxPruneWarning, match=r"ignore pattern '0' names \['0'\], which hold no channels.*"
                                                    r"use '0\.\*'"):
        pruned = fxprune.prune(model, 0.5, ignore="0")
    assert pruned.get_submodule("0.0").out_channels == 4  # the container's conv was pruned: the pattern did nothing
    with pytest.warns(fxprune.FxPruneWarning, match=r"ignore pattern '0\.1' names \['0\.1'\], which hold no channels"):
        fxprune.prune(model, 0.5, ignore="0.1")  # the ReLU
    assert not any("ignore pattern" in m for m in fx_warnings(lambda: fxprune.prune(model, 0.5, ignore="0.*")))


@pytest.mark.parametrize("bad, what", [(123, "got 123 \\(int\\)"), ([None], "entry 0 is None"),
                                       (["c1", 2.5], "entry 1 is 2.5"), (b"c1", "bytes")])
def test_ignore_of_the_wrong_type_is_a_clear_error(bad: Any, what: str) -> None:
    # Before: TypeError ('int' object is not iterable / NoneType has no len()).
    for call in (lambda: fxprune.prune(Tiny(), 0.5, ignore=bad), lambda: fxprune.plan(Tiny(), 0.5, ignore=bad),
                 lambda: fxprune.find_groups(Tiny(), ignore=bad),
                 lambda: fxprune.prune_iteratively(Tiny(), 0.5, steps=2, ignore=bad)):
        with pytest.raises(fxprune.FxPruneError, match=f"ignore= must be a module name or glob pattern.*{what}"):
            call()


@pytest.mark.parametrize("returned, what", [(None, "returned None"), ("high", "returned str"),
                                            ({"a": 1.0}, "returned dict"), ([[1.0], [2.0, 3.0]], "returned list")])
def test_importance_callable_returning_no_scores_is_a_clear_error(returned: Any, what: str) -> None:
    # Before: RuntimeError "Could not infer dtype of NoneType" (and ValueError/TypeError for the others).
    with pytest.raises(fxprune.FxPruneError, match=f"importance callable <lambda> {what} for group c1.*8 numbers"):
        fxprune.prune(Tiny(), 0.5, importance=lambda group: returned)


def test_model_criterion_returning_no_mapping_is_a_clear_error() -> None:
    @register_model_criterion("test_api_checks_none")
    def _none(analysis: Any, groups: Any, options: Any) -> Any:
        return None

    try:
        with pytest.raises(fxprune.FxPruneError, match="'test_api_checks_none' returned NoneType"):
            fxprune.plan(Tiny(), 0.5, importance="test_api_checks_none")
    finally:
        MODEL_CRITERIA.pop("test_api_checks_none", None)


@pytest.mark.parametrize("importance, ratio", [(["l1"], 0.5), ("l3", 0.0), (7, 0.5)])
def test_importance_is_checked_before_any_work(importance: Any, ratio: float) -> None:
    # Before: TypeError (unhashable list); "l3" with nothing to score was accepted and recorded.
    with pytest.raises(fxprune.FxPruneError, match="importance"):
        fxprune.plan(Tiny(), ratio, importance=importance)


@pytest.mark.filterwarnings("ignore:nothing could be pruned:fxprune.FxPruneWarning")  # Optional2's scale freezes
def test_example_inputs_must_match_the_forward_arguments() -> None:
    # Before: (x, x) for a one-input model was accepted (the second tensor silently dropped).
    model = Tiny().eval()
    with pytest.raises(fxprune.FxPruneError, match=r"example_inputs has 2 elements, but the forward of Tiny takes 1 \(x\)"):
        fxprune.prune(model, 0.5, example_inputs=(X, X))
    for call in (lambda: fxprune.plan(model, 0.5, example_inputs=[X, X]),
                 lambda: fxprune.find_groups(model, example_inputs=(X, X)),
                 lambda: fxprune.apply(model, fxprune.plan(model, 0.5), example_inputs=(X, X, X))):
        with pytest.raises(fxprune.FxPruneError, match="example_inputs has"):
            call()
    # Arguments with defaults may be given or left out; none more.
    opt = Optional2().eval()
    fxprune.prune(opt, 0.5, example_inputs=(X,))
    fxprune.prune(opt, 0.5, example_inputs=(X, torch.tensor(2.0)))
    with pytest.raises(fxprune.FxPruneError, match="takes 1 to 2 \\(x, scale\\)"):
        fxprune.prune(opt, 0.5, example_inputs=(X, X, X))


@pytest.mark.parametrize("kwargs, match", [
    (dict(round_to=64), "nothing was pruned: round_to=64 is larger than every prunable group \\(the largest has 8"),
    (dict(min_channels=8), "nothing was pruned: min_channels=8 is at least the size of every prunable group"),
    (dict(round_to=64, global_ranking=True), "round_to=64 is larger than every prunable group"),
    (dict(global_ranking=True, max_group_ratio=0.0), "max_group_ratio=0.0 lets no group of global ranking lose"),
])
def test_round_to_or_min_channels_that_prune_nothing_warn(kwargs: Any, match: str) -> None:
    # Before: silent; the model came back unpruned.
    with pytest.warns(fxprune.FxPruneWarning, match=match):
        pruned = fxprune.prune(Tiny(), 0.5, **kwargs)
    assert pruned.get_submodule("c1").out_channels == 8
    with pytest.warns(fxprune.FxPruneWarning, match=match):
        fxprune.plan(Tiny(), 0.5, **kwargs)


def test_a_ratio_too_small_to_remove_a_channel_warns() -> None:
    # Found by tests/test_fuzz.py (ratio=5e-324): int(C * (1 - ratio)) == C.
    with pytest.warns(fxprune.FxPruneWarning, match=r"nothing was pruned: ratio=1e-20 is too small.*keeps int\(8"):
        fxprune.plan(Tiny(), 1e-20)


def test_iterative_pruning_that_prunes_nothing_warns_once() -> None:
    messages = fx_warnings(lambda: fxprune.prune_iteratively(Tiny(), 0.5, steps=3, round_to=64))
    assert [m for m in messages if m.startswith("nothing")] == [
        m for m in messages if "round_to=64 is larger than every prunable group" in m]
    assert len(messages) == 1, messages
    messages = fx_warnings(lambda: fxprune.prune_iteratively(OneLayer(), 0.5, steps=3, global_ranking=True))
    assert len(messages) == 1 and messages[0].startswith("nothing could be pruned"), messages


def test_dict_ratio_that_only_matches_frozen_groups_warns() -> None:
    with pytest.warns(fxprune.FxPruneWarning, match=r"nothing was pruned: no ratio pattern of \['c2'\].*\['c1'\]"):
        fxprune.plan(Tiny(), {"c2": 0.5})


def test_allocate_without_a_cost_model_is_a_usage_error_not_a_bug() -> None:
    # Before: InternalError ("targets need a cost model") for a caller's mistake.
    analysis = analyze_model(Tiny())
    with pytest.raises(fxprune.FxPruneError, match="needs cost=CostModel"):
        allocate(analysis, Policy(target_params=0.5).validated())
    with pytest.raises(fxprune.FxPruneError, match="global_ranking=True needs scores="):
        allocate(analysis, Policy(ratio=0.5, global_ranking=True))
    with pytest.raises(fxprune.FxPruneError, match="not a dict"):  # a hand-made Policy is validated too
        allocate(analysis, Policy(ratio={"c1": 0.5}, global_ranking=True), scores={})


# =========================================================================== issue 16 item 5 / issue 15


@pytest.mark.parametrize("api", ["prune", "plan"])
def test_every_group_frozen_warns_with_the_reasons(api: str) -> None:
    # Before: silent (every group frozen by ignore= and the model output).
    with pytest.warns(fxprune.FxPruneWarning, match="nothing could be pruned: none of the 2 channel groups of Tiny "
                                                    "is prunable. why: .*ignored module c1.*Hint: .*reduce ignore="):
        result = getattr(fxprune, api)(Tiny(), 0.5, ignore="c1")
    plan = result if api == "plan" else result.meta["fxprune_plan"]
    assert not plan.pruned_groups


def test_one_layer_model_says_nothing_can_be_pruned() -> None:
    with pytest.warns(fxprune.FxPruneWarning, match="nothing could be pruned.*reaches the model output at output "
                                                    "\\(1 group\\).*no hidden layer"):
        fxprune.prune(OneLayer(), 0.3)


# Functional conv/batch_norm/linear calls on the model's own parameters (SubclassStem,
# FunctionalFirst, LinearSubclassMLP) are pruned now: tests/test_functional_layers.py.
FUNCTIONAL_CASES = [
    (HandWrittenLinear, torch.randn(2, 6), r"torch\.matmul at .*test_api_checks\.py:\d+ in forward"),
]


@pytest.mark.parametrize("model_cls, x, where", FUNCTIONAL_CASES)
def test_layers_called_functionally_are_named_when_nothing_is_pruned(model_cls: Any, x: torch.Tensor, where: str) -> None:
    # Before: nothing pruned and no warning at all.
    model = model_cls().eval()
    for ex in (None, (x,)):
        with pytest.warns(fxprune.FxPruneWarning, match="nothing could be pruned.*layers called functionally are not "
                                                        f"pruned: .*{where}.*leaf modules"):
            pruned = fxprune.prune(model, 0.5, example_inputs=ex)
        with torch.no_grad():
            assert torch.equal(pruned(x), model(x))


@pytest.mark.parametrize("model_cls, x, where", FUNCTIONAL_CASES)
def test_layers_called_functionally_raise_in_strict_mode(model_cls: Any, x: torch.Tensor, where: str) -> None:
    # Before: strict=True returned the unpruned model without a word.
    with pytest.raises(fxprune.UnsupportedNodeError, match="nothing could be pruned and .* a layer called functionally"):
        fxprune.prune(model_cls(), 0.5, strict=True)
    with pytest.raises(fxprune.UnsupportedNodeError, match="layer called functionally"):
        fxprune.prune_iteratively(model_cls(), 0.5, steps=2, strict=True)


def test_unknown_leaf_layer_on_the_input_is_named() -> None:
    class Mystery(nn.Module):  # a leaf fxprune has no rule for, fed by the model input
        def __init__(self) -> None:
            super().__init__()
            self.weight = nn.Parameter(torch.randn(8, 3, 1, 1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return F.conv2d(x, self.weight)

    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = Mystery()
            self.head = nn.Conv2d(8, 2, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(self.m(x))

    class Leaf(torch.fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return isinstance(m, Mystery) or super().is_leaf_module(m, qualname)

    net = Net()
    gm = torch.fx.GraphModule(net, Leaf().trace(net))
    with pytest.warns(fxprune.FxPruneWarning, match=r"modules with weights but no channel rule: m \(Mystery\)"):
        fxprune.prune(gm, 0.5)
    with pytest.raises(fxprune.UnsupportedNodeError, match="module m has weights but no channel rule"):
        fxprune.plan(gm, 0.5, strict=True)


def test_a_model_that_prunes_gives_none_of_these_warnings() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = fxprune.prune(Tiny(), 0.5, example_inputs=(X,), strict=True)
        fxprune.prune(Tiny(), 0.0)  # nothing asked, something prunable: nothing to say
        fxprune.prune_iteratively(Tiny(), 0.5, steps=2, round_to=4)
    assert pruned.get_submodule("c1").out_channels == 4
