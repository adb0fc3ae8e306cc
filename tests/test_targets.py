"""Targets and criteria as objects (fxprune.targets, fxprune.criteria): one code path with the keywords, recorded in the plan."""

from __future__ import annotations

from typing import Any, Dict

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.criteria import BN, FPGM, L1, L2, APoZ, Random, Taylor, criterion_from_dict
from fxprune.targets import Latency, MACs, Params, Ratio, target_from_dict

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.b = nn.Sequential(nn.Conv2d(16, 32, 3, padding=1), nn.BatchNorm2d(32), nn.ReLU())
        self.head = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.b(self.a(x)).mean((2, 3)))


def net() -> nn.Module:
    torch.manual_seed(0)
    return Net().eval()


def counts(model: nn.Module, *args: Any, **kw: Any) -> Dict[str, Any]:
    plan = fxprune.prune(model, *args, **kw).meta["fxprune_plan"]
    return {"counts": plan.counts(), "target": plan.policy.get("target"), "criterion": plan.policy.get("criterion")}


@pytest.mark.parametrize("obj, keywords", [
    (Ratio(0.5), {"ratio": 0.5}),
    (Ratio({"b.*": 0.75}), {"ratio": {"b.*": 0.75}}),
    (Ratio(0.5, global_ranking=True), {"ratio": 0.5, "global_ranking": True}),
    (MACs(0.4), {"target_macs": 0.4}),
    (Params(0.4, global_ranking=True), {"target_params": 0.4, "global_ranking": True}),
])
def test_a_target_object_prunes_as_its_keywords_and_both_record_it(obj: Any, keywords: Dict[str, Any]) -> None:
    model = net()
    by_object, by_keywords = counts(model, obj, example_inputs=(X,)), counts(model, example_inputs=(X,), **keywords)
    assert by_object == by_keywords
    assert by_object["target"] == obj.to_dict() and target_from_dict(by_object["target"]) == obj


@pytest.mark.parametrize("obj, keywords", [
    (L1(), {"importance": "l1"}), (L2(), {"importance": "l2"}), (FPGM(), {"importance": "fpgm"}),
    (BN(), {"importance": "bn"}), (Random(3), {"importance": "random", "seed": 3}),
])
def test_a_criterion_object_scores_as_its_keywords_and_both_record_it(obj: Any, keywords: Dict[str, Any]) -> None:
    model = net()
    by_object, by_keywords = counts(model, 0.5, importance=obj), counts(model, 0.5, **keywords)
    assert by_object == by_keywords and by_object["criterion"] == obj.to_dict()
    assert criterion_from_dict(by_object["criterion"]) == obj


def test_data_driven_criteria_carry_their_data_and_record_how_much_was_used() -> None:
    model = net()
    loader = [(torch.randn(4, 3, 8, 8), torch.randint(0, 5, (4,))) for _ in range(3)]
    for cls, name in ((Taylor, "taylor"), (APoZ, "apoz")):
        by_object = counts(model, 0.5, importance=cls(loader, batches=2))
        by_keywords = counts(model, 0.5, importance=name, calibration=loader, calibration_batches=2)
        assert by_object == by_keywords
        assert by_object["criterion"]["batches"] == 2 and by_object["criterion"]["calibration"] == "given"
        with pytest.raises(fxprune.FxPruneError, match="needs calibration data"):
            criterion_from_dict(by_object["criterion"])
    assert "tensor" not in repr(Taylor(loader))  # the data is not in the repr


@pytest.mark.parametrize("call, match", [
    (lambda m: fxprune.prune(m, MACs(0.5), target_macs=0.4, example_inputs=(X,)), "drop target_macs="),
    (lambda m: fxprune.prune(m, Ratio(0.5), global_ranking=True), "drop global_ranking="),
    (lambda m: fxprune.plan(m, 0.5, importance=Random(1), seed=2), "drop seed="),
    (lambda m: fxprune.prune(m, 0.5, importance=Taylor([]), calibration=[]), "calibration=<list> both given"),
    (lambda m: fxprune.plan(m, Latency(0.5), example_inputs=(X,)), "does not take a Latency target"),
])
def test_an_object_and_its_own_keyword_is_one_thing_given_twice(call: Any, match: str) -> None:
    with pytest.raises(fxprune.FxPruneError, match=match):
        call(net())


def test_a_latency_object_is_the_latency_keywords() -> None:
    target = Latency(0.5, batch_size=8, mode="compiled")
    assert target.keywords() == {"target_latency": 0.5, "target_latency_ms": None, "device": "cpu", "batch_size": 8,
                                 "latency_mode": "compiled"}
    with pytest.raises(fxprune.FxPruneError, match="needs example_inputs"):
        fxprune.prune(net(), target)  # the keyword path's own check, reached through the object
    assert target_from_dict(target.to_dict()) == target


@pytest.mark.parametrize("make, match", [
    (lambda: MACs(1.5), r"MACs\(fraction\) must be a fraction in \(0, 1\]"), (lambda: Params(0), "must be a fraction"),
    (lambda: Latency(1.0), r"Latency\(fraction\) must be a fraction in \(0, 1\)"),
    (lambda: Latency(), "one of fraction= .* or ms="), (lambda: Latency(0.5, ms=3.0), "one of"),
    (lambda: Latency(0.5, mode="jit"), "'eager' or 'compiled'"), (lambda: Latency(ms=-1.0), "positive number"),
    (lambda: Ratio(0.5, global_ranking=1), "True or False"), (lambda: Taylor([], batches=0), "positive integer"),
    (lambda: Random(seed=0.5), "must be an integer"),
    (lambda: target_from_dict({"version": 2, "kind": "macs", "fraction": 0.5}), "not a fxprune target of version 1"),
    (lambda: criterion_from_dict({"version": 1, "name": "mine"}), "not one fxprune ships"),
])
def test_objects_check_their_parameters(make: Any, match: str) -> None:
    with pytest.raises(fxprune.FxPruneError, match=match):
        make()


def test_a_whole_model_budget_is_a_target_like_its_keyword() -> None:
    model = net()
    assert counts(model, MACs(1.0), example_inputs=(X,)) == counts(model, target_macs=1.0, example_inputs=(X,))


def test_the_recorded_target_survives_the_plan_json_and_iterative_pruning() -> None:
    model = net()
    plan = fxprune.plan(model, Params(0.5), importance=L2())
    again = fxprune.PruningPlan.from_json(plan.to_json())
    assert target_from_dict(again.policy["target"]) == Params(0.5) and again.policy["criterion"] == L2().to_dict()
    stepped = fxprune.prune_iteratively(model, MACs(0.5), steps=2, example_inputs=(X,), importance=FPGM())
    record = stepped.meta["fxprune_plan"].policy
    assert record["target"] == MACs(0.5).to_dict() and record["criterion"] == FPGM().to_dict()
