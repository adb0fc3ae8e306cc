"""Plans as data: JSON round-trip, replay on a fresh model, and clear errors on a model the
plan does not fit."""

from __future__ import annotations

import copy
import functools
import json

import pytest
import torch
import torch.nn as nn
import torchvision

import fxprune
from fxprune import PlanMismatchError, PruningPlan
from fxprune.api import analyze_model
from fxprune.planning import GroupPlan, fingerprint


pytestmark = pytest.mark.usefixtures("one_thread")


X32 = torch.randn(1, 3, 32, 32)


@functools.lru_cache(maxsize=None)
def _resnet18(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return torchvision.models.resnet18(num_classes=10).eval()


def resnet18(seed: int = 0) -> nn.Module:
    """A fresh resnet18 whose weights depend only on ``seed`` (copied: building one is slow)."""
    return copy.deepcopy(_resnet18(seed))


def architecture(gm: nn.Module) -> list:
    """Every parameter and buffer's name and shape, plus the generated code."""
    shapes = [(k, tuple(v.shape)) for k, v in gm.state_dict().items()]
    return shapes + [getattr(gm, "code", "")]


def calib():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(2, 3, 32, 32, generator=g), torch.randint(0, 10, (2,), generator=g))]


@pytest.mark.parametrize("kwargs", [
    {"ratio": 0.3},
    {"ratio": {"layer4.*": 0.5, "layer[23].*": 0.25}, "default_ratio": 0.1, "round_to": 8},
    {"ratio": 0.4, "global_ranking": True, "max_group_ratio": 0.8, "importance": "fpgm"},
    {"target_macs": 0.5, "example_inputs": X32, "importance": "random", "seed": 3},
    {"target_params": 0.5, "importance": "taylor", "calibration": calib(), "loss_fn": nn.functional.cross_entropy},
])
def test_json_round_trip_and_replay_on_a_fresh_model(kwargs):
    model = resnet18()
    p = fxprune.plan(model, **kwargs)
    text = p.to_json()
    data = json.loads(text)  # plain JSON
    assert data["version"] == 2 and data["model"]["class"] == "ResNet"
    assert set(data["policy"]) >= {"ratio", "global_ranking", "round_to", "target_macs"}
    loaded = PruningPlan.from_json(text)
    assert loaded == p and loaded.to_json() == text
    assert loaded.criterion == kwargs.get("importance", "l1")
    # a fresh model of the same architecture (other weights): identical architecture
    direct = fxprune.apply(model, p)
    replayed = fxprune.apply(resnet18(seed=1), loaded)
    assert architecture(replayed) == architecture(direct)
    # the same weights: the identical model
    same = fxprune.apply(resnet18(seed=0), loaded)
    with torch.no_grad():
        assert torch.equal(same(X32), direct(X32))


def test_plan_records_criterion_policy_and_achievement():
    p = fxprune.plan(resnet18(), target_macs=0.5, example_inputs=X32, importance="l2", round_to=4)
    assert p.criterion == "l2"
    assert p.policy["round_to"] == 4 and p.policy["target_macs"] == 0.5 and p.policy["achieved_macs"] <= 0.5
    assert p.model == {"class": "ResNet", "fingerprint": fingerprint(analyze_model(resnet18()))}
    assert "layer1.0.conv1" in p.summary()


def test_callable_criterion_is_recorded_by_name():
    def my_criterion(group):
        return torch.arange(group.size, dtype=torch.float32)

    p = PruningPlan.from_json(fxprune.plan(resnet18(), 0.5, importance=my_criterion).to_json())
    assert p.criterion == "my_criterion"


def test_fingerprint_ignores_weights_frozen_state_and_example_inputs():
    a = fingerprint(analyze_model(resnet18(0)))
    assert a == fingerprint(analyze_model(resnet18(1)))
    assert a == fingerprint(analyze_model(resnet18(0), ignore=["layer4.*"], example_inputs=X32))
    assert a != fingerprint(analyze_model(torchvision.models.resnet34(num_classes=10)))


def test_a_plan_made_with_ignore_applies_without_it():
    p = fxprune.plan(resnet18(), 0.5, ignore=["layer4.*"])
    assert p.keep("layer4.0.conv1") == list(range(512))
    fxprune.apply(resnet18(1), p)


def test_version_one_plans_still_load():
    p = fxprune.plan(resnet18(), 0.3)
    data = json.loads(p.to_json())
    data["version"] = 1
    del data["model"]
    old = PruningPlan.from_json(json.dumps(data))
    assert old.model == {} and old.groups == p.groups
    assert architecture(fxprune.apply(resnet18(), old)) == architecture(fxprune.apply(resnet18(), p))


# --------------------------------------------------------------------------- mismatches


def test_plan_for_another_architecture_names_the_group_and_the_classes():
    p = fxprune.plan(resnet18(), 0.3)
    with pytest.raises(PlanMismatchError, match=r"no entry for group .*made for a ResNet, this model is a MobileNetV2"):
        fxprune.apply(torchvision.models.mobilenet_v2(num_classes=10), p)
    with pytest.raises(PlanMismatchError, match=r"group conv1: its modules differ .*'layer1.2.conv1'"):
        fxprune.apply(torchvision.models.resnet34(num_classes=10), p)
    with pytest.raises(PlanMismatchError, match="group conv1: plan says 64 channels, the model has 32"):
        fxprune.apply(_narrow_resnet18(), p)


def _narrow_resnet18() -> nn.Module:
    """resnet18 with a 32-channel stem and layer1 (same module names, other sizes)."""
    m = resnet18()
    m.conv1 = nn.Conv2d(3, 32, 7, 2, 3, bias=False)
    m.bn1 = nn.BatchNorm2d(32)
    for block in m.layer1:
        block.conv1 = nn.Conv2d(32, 64, 3, 1, 1, bias=False)
        block.conv2 = nn.Conv2d(64, 32, 3, 1, 1, bias=False)
        block.bn2 = nn.BatchNorm2d(32)
    m.layer2[0].conv1 = nn.Conv2d(32, 128, 3, 2, 1, bias=False)
    m.layer2[0].downsample[0] = nn.Conv2d(32, 128, 1, 2, bias=False)
    return m


def test_resnet50_plan_on_resnet18_lists_the_extra_groups():
    p = fxprune.plan(torchvision.models.resnet50(num_classes=10), 0.3)
    with pytest.raises(PlanMismatchError, match="plan says|no entry|groups this model does not have|modules differ"):
        fxprune.apply(resnet18(), p)


class Chain(nn.Module):
    """conv1 -> conv2 -> conv3."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 1)
        self.conv2 = nn.Conv2d(8, 8, 1)
        self.conv3 = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        return self.conv3(self.conv2(self.conv1(x)).relu())


class Fork(Chain):
    """Same modules and sizes, other wiring: a residual ties conv1's and conv2's channels."""

    def forward(self, x):
        a = self.conv1(x)
        return self.conv3(a + self.conv2(a))


def test_same_names_and_sizes_but_other_wiring():
    p = fxprune.plan(Chain(), 0.5)
    with pytest.raises(PlanMismatchError, match=r"group conv1: its modules differ .*in the model only: \['conv3'\]"):
        fxprune.apply(Fork(), p)


def test_tampered_fingerprint_is_caught():
    p = fxprune.plan(resnet18(), 0.3)
    p.model["fingerprint"] = "0" * 16
    with pytest.raises(PlanMismatchError, match="wired differently.*0000000000000000"):
        fxprune.apply(resnet18(), p)


def test_invalid_entries():
    p = fxprune.plan(resnet18(), 0.3)

    def edited(**changes):
        groups = [GroupPlan(g.key, g.size, changes.get(g.key, g.keep), g.modules) for g in p.groups]
        return PruningPlan(groups, p.criterion, p.policy, model=dict(p.model))

    with pytest.raises(PlanMismatchError, match=r"group conv1: kept indices must be distinct and in \[0, 64\)"):
        fxprune.apply(resnet18(), edited(conv1=[0, 0, 1]))
    with pytest.raises(PlanMismatchError, match="conv1: kept indices"):
        fxprune.apply(resnet18(), edited(conv1=[64]))
    with pytest.raises(PlanMismatchError, match="group fc cannot be pruned"):
        fxprune.apply(resnet18(), edited(fc=[0, 1]))
    extra = PruningPlan(p.groups + [GroupPlan("ghost", 3, [0], [])], p.criterion, p.policy, model=dict(p.model))
    with pytest.raises(PlanMismatchError, match="does not have: \\['ghost'\\]"):
        fxprune.apply(resnet18(), extra)
    with pytest.raises(fxprune.FxPruneError, match="expected a fxprune.PruningPlan"):
        fxprune.apply(resnet18(), p.to_json())


@pytest.mark.parametrize("text,error,match", [
    ("{not json", fxprune.FxPruneError, "not a valid fxprune plan"),
    ("[1, 2]", fxprune.FxPruneError, "JSON object"),
    ('{"version": 99, "groups": []}', PlanMismatchError, "version 99"),
    ('{"version": 2, "groups": [{"key": "a"}]}', fxprune.FxPruneError, "KeyError"),
])
def test_from_json_errors(text, error, match):
    with pytest.raises(error, match=match):
        PruningPlan.from_json(text)
