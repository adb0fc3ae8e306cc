"""Registries are objects: an extended table teaches fxprune an op for one call, the default stays as it is."""

from __future__ import annotations

import copy
import warnings
from typing import Any, Optional

import pytest
import torch
import torch.fx
import torch.nn as nn

import fxprune
from fxprune.importance import DEFAULT_WEIGHTS, ScoringOptions, score_groups
from fxprune.registry import Registry
from fxprune.rewrite import DEFAULT_BUILDERS
from fxprune.rules import DEFAULT_RULES, RuleTable
from fxprune.testing import DEFAULT_MASKS, assert_equivalent, masked_reference, randomize_norms


def gated(x: torch.Tensor) -> torch.Tensor:
    """A custom element-wise op fx keeps as one call (wrapped below): no shipped rule knows it."""
    return torch.relu(x) * 1.5


torch.fx.wrap("gated")


class GatedNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(gated(self.a(x)))


class Gain(nn.Module):
    """A custom leaf with a per-channel parameter: needs a rule, a builder and a mask."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.gain = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gain.view(1, -1, 1, 1)


class GainNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8))
        self.leaf = Gain(8)
        self.b = nn.Conv2d(8, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(self.leaf(self.a(x)))


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Gain) or super().is_leaf_module(m, qualname)


def _passthrough(ctx: Any, node: torch.fx.Node) -> Optional[fxprune.Layout]:
    return ctx.layout(node.args[0])


def _gain_rule(ctx: Any, node: torch.fx.Node) -> Optional[fxprune.Layout]:
    layout = ctx.layout(node.args[0])
    if layout is not None:
        ctx.member(node, "channelwise", layout)
    return layout


def _gain_builder(module: Gain, idx: dict) -> Gain:
    new = copy.deepcopy(module)
    if idx.get("channelwise") is not None:
        new.gain = nn.Parameter(module.gain.detach()[idx["channelwise"]].clone())
    return new


def _gain_mask(module: Gain, role: str, removed: torch.Tensor) -> None:
    module.gain[removed] = 0


def _group_of(groups: Any, name: str) -> fxprune.Group:
    return next(g for g in groups if name in g.modules("out"))


def _leaf_graph() -> torch.fx.GraphModule:
    model = randomize_norms(GainNet()).eval()
    return torch.fx.GraphModule(model, LeafTracer().trace(model))


def _default_freezes(model: Any, op: str) -> None:
    """The shipped table still knows nothing of the op: the conv feeding it stays frozen, with a warning."""
    with pytest.warns(fxprune.FxPruneWarning, match=op):
        groups = fxprune.find_groups(model)
    assert _group_of(groups, "a.0").frozen


def test_extended_rule_table_prunes_a_custom_function_and_leaves_the_default_alone() -> None:
    torch.manual_seed(0)
    model = randomize_norms(GatedNet()).eval()
    x = torch.randn(2, 3, 8, 8)
    _default_freezes(model, "gated")
    table = DEFAULT_RULES.extended({gated: _passthrough})
    assert isinstance(table, RuleTable) and table is not DEFAULT_RULES
    assert gated in table and gated not in DEFAULT_RULES
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # the extended table knows every op
        groups = fxprune.find_groups(model, rules=table)
        plan = fxprune.plan(model, 0.5, rules=table)
        pruned = fxprune.prune(model, 0.5, rules=table)
    assert not _group_of(groups, "a.0").frozen
    assert pruned.get_submodule("a.0").out_channels == 4 and pruned.get_submodule("b").in_channels == 4
    assert fxprune.apply(model, plan, rules=table).get_submodule("a.0").out_channels == 4
    assert_equivalent(model, pruned, plan, (x,), rules=table)
    # The default table is unchanged afterwards.
    assert gated not in DEFAULT_RULES
    _default_freezes(model, "gated")


def test_register_rule_writes_to_the_default_table_and_an_extension_sees_it_later() -> None:
    table = DEFAULT_RULES.extended()
    key = "fxprune_test_registries_method"
    assert key not in table
    try:
        fxprune.register_rule(key)(_passthrough)
        assert key in DEFAULT_RULES and key in table  # a later default rule reaches the extension
        override = table.extended({key: _gain_rule})
        assert override.methods[key] is _gain_rule and DEFAULT_RULES.methods[key] is _passthrough
    finally:
        DEFAULT_RULES.methods.own.pop(key, None)
    assert key not in DEFAULT_RULES and key not in table


def test_extended_builder_and_mask_tables_prune_a_custom_leaf() -> None:
    torch.manual_seed(1)
    gm = _leaf_graph()
    x = torch.randn(2, 3, 8, 8)
    _default_freezes(gm, "Gain")
    rules = DEFAULT_RULES.extended({Gain: _gain_rule})
    builders = DEFAULT_BUILDERS.extended({Gain: _gain_builder})
    masks = DEFAULT_MASKS.extended({Gain: _gain_mask})
    plan = fxprune.plan(gm, 0.5, rules=rules)
    # A rule without a builder: the shipped builder table has none for Gain, and says so.
    with pytest.raises(fxprune.FxPruneError, match="no builder for Gain"):
        fxprune.apply(gm, plan, rules=rules)
    pruned = fxprune.apply(gm, plan, rules=rules, builders=builders)
    assert torch.equal(pruned.get_submodule("leaf").gain, gm.get_submodule("leaf").gain.detach()[plan.keep("a.0")])
    assert_equivalent(gm, pruned, plan, (x,), rules=rules, masks=masks)
    ref = masked_reference(gm, plan, rules=rules, masks=masks)
    removed = sorted(set(range(8)) - set(plan.keep("a.0")))
    assert torch.count_nonzero(ref.get_submodule("leaf").gain[removed]) == 0
    for table in (DEFAULT_RULES, DEFAULT_BUILDERS, DEFAULT_MASKS):
        assert Gain not in table
    _default_freezes(gm, "Gain")


def test_the_proof_with_extended_tables_fails_on_a_broken_builder() -> None:
    torch.manual_seed(2)
    gm = _leaf_graph()
    rules = DEFAULT_RULES.extended({Gain: _gain_rule})
    plan = fxprune.plan(gm, 0.5, rules=rules)
    assert plan.keep("a.0") != list(range(4))  # else the broken builder below would be right by chance

    def first_channels(module: Gain, idx: dict) -> Gain:  # slices the wrong channels
        new = copy.deepcopy(module)
        new.gain = nn.Parameter(module.gain.detach()[: len(idx["channelwise"])].clone())
        return new

    broken = fxprune.apply(gm, plan, rules=rules, builders=DEFAULT_BUILDERS.extended({Gain: first_channels}))
    with pytest.raises(AssertionError):
        assert_equivalent(gm, broken, plan, (torch.randn(2, 3, 8, 8),), rules=rules,
                          masks=DEFAULT_MASKS.extended({Gain: _gain_mask}))


def test_extended_weight_views_score_a_custom_leaf() -> None:
    torch.manual_seed(3)
    gm = _leaf_graph()
    analysis = fxprune.analyze_model(gm, rules=DEFAULT_RULES.extended({Gain: _gain_rule}))
    group = _group_of(analysis.groups, "a.0")
    plain = score_groups(analysis, "l1", [group])[group.index]
    views = DEFAULT_WEIGHTS.extended({Gain: lambda m, role: m.gain.detach().unsqueeze(1) * 1000})
    extended = score_groups(analysis, "l1", [group], ScoringOptions(weights=views))[group.index]
    gain = gm.get_submodule("leaf").gain.detach()
    assert torch.allclose(extended - plain, gain.abs() * 1000)
    assert Gain not in DEFAULT_WEIGHTS
    assert torch.equal(score_groups(analysis, "l1", [group])[group.index], plain)


def test_a_table_of_the_wrong_kind_is_bad_input() -> None:
    model = GatedNet()
    with pytest.raises(fxprune.FxPruneError, match="rules= must be a fxprune.rules.RuleTable"):
        fxprune.find_groups(model, rules={gated: _passthrough})
    gm = _leaf_graph()
    rules = DEFAULT_RULES.extended({Gain: _gain_rule})
    plan = fxprune.plan(gm, 0.5, rules=rules)
    with pytest.raises(fxprune.FxPruneError, match="builders= must be a table"):
        fxprune.apply(gm, plan, rules=rules, builders={Gain: _gain_builder})
    with pytest.raises(fxprune.FxPruneError, match="masks= must be a table"):
        masked_reference(gm, plan, rules=rules, masks={Gain: _gain_mask})


def test_registry_layers_over_its_parent() -> None:
    base: Registry[str, int] = Registry("numbers", {"one": 1})
    child = base.extended({"two": 2, "one": 11})
    assert (child["one"], child["two"], base.get("two")) == (11, 2, None)
    base.register("three")(3)
    assert child["three"] == 3 and sorted(child) == ["one", "three", "two"] and len(child) == 3
    assert "two" not in base and [] not in base  # an unhashable key names nothing
    with pytest.raises(KeyError):
        base["two"]


def test_iterative_pruning_uses_the_extended_tables_at_every_step() -> None:
    from fxprune.iterative import prune_iteratively

    torch.manual_seed(6)
    gm = _leaf_graph()
    x = torch.randn(2, 3, 8, 8)
    rules = DEFAULT_RULES.extended({Gain: _gain_rule})
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prune_iteratively(gm, 0.5, steps=2, rules=rules,
                                   builders=DEFAULT_BUILDERS.extended({Gain: _gain_builder}))
    plan = pruned.meta["fxprune_plan"]
    assert pruned.get_submodule("a.0").out_channels == 4 and pruned.get_submodule("leaf").gain.shape == (4,)
    assert_equivalent(gm, pruned, plan, (x,), rules=rules, masks=DEFAULT_MASKS.extended({Gain: _gain_mask}))
    assert Gain not in DEFAULT_RULES and Gain not in DEFAULT_BUILDERS
