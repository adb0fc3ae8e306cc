"""Defined behaviour at the edges: grouped convs, norms across channels, layout ops, attention,
unknown and custom modules, non-finite weights, zero-size groups, train mode, tied weights and
shared modules. Every pruned model here is checked against its masked reference."""

from __future__ import annotations

import copy
import json
import warnings
from typing import Any, List, Optional

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.groups import Group, check_balanced, fit_count, select_channels
from fxprune.importance import ScoringOptions, score_groups
from fxprune.rewrite import register_builder
from fxprune.testing import assert_equivalent, masked_reference, randomize_norms, register_mask

from .zoo import GroupedConvNet, SharedConvNet, TinyUNet, cbr


pytestmark = pytest.mark.usefixtures("one_thread")


def params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def prove(model: nn.Module, ratio: float, x: torch.Tensor, shapes: bool = True, **kw: Any) -> torch.fx.GraphModule:
    """Plan, apply and prove equivalence; returns the pruned model."""
    model = model.eval()
    ex = (x,) if shapes else None
    plan = fxprune.plan(model, ratio, example_inputs=ex, **kw)
    pruned = fxprune.apply(model, plan, example_inputs=ex)
    assert_equivalent(model, pruned, plan, (x,), example_inputs=ex)
    return pruned


def group_of(model: Any, module: str, role: str = "out", **kw: Any) -> fxprune.Group:
    for g in fxprune.find_groups(model, **kw):
        if module in g.modules(role):
            return g
    raise KeyError(module)


def reasons(model: Any, **kw: Any) -> str:
    return "\n".join(r for g in fxprune.find_groups(model, **kw) for r in g.reasons)


# =========================================================================== grouped convolutions


def per_group(kept: List[int], size: int, groups: int) -> List[int]:
    counts = [0] * groups
    for i in kept:
        counts[i // (size // groups)] += 1
    return counts


@pytest.mark.parametrize("ratio", [0.3, 0.5, 0.7])
def test_grouped_conv_keeps_the_same_count_in_every_conv_group(ratio: float) -> None:
    torch.manual_seed(0)
    model = randomize_norms(GroupedConvNet())  # a(3->16) -> g(16->32, groups=4) -> b(32->16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model.eval(), ratio)
    pruned = fxprune.apply(model, plan)
    assert_equivalent(model, pruned, plan, (torch.randn(2, 3, 8, 8),))
    g = pruned.get_submodule("g")
    assert g.groups == 4 and g.in_channels < 16 and g.out_channels < 32
    counts_in = per_group(plan.keep("a.0"), 16, 4)
    counts_out = per_group(plan.keep("g"), 32, 4)
    assert len(set(counts_in)) == 1 and len(set(counts_out)) == 1
    assert g.in_channels == sum(counts_in) and g.out_channels == sum(counts_out)
    groups = {grp.key: grp for grp in fxprune.find_groups(model)}
    assert groups["a.0"].blocks == 4 and groups["g"].blocks == 4
    assert "in 4 blocks" in str(groups["g"])


CALIBRATION = [(torch.randn(4, 3, 8, 8), torch.randint(0, 2, (4,)))]


@pytest.mark.parametrize("options", [
    {"global_ranking": True}, {"importance": "fpgm"}, {"importance": "l2"}, {"importance": "bn"},
    {"importance": "apoz", "calibration": CALIBRATION}, {"importance": "taylor", "calibration": CALIBRATION},
])
def test_grouped_conv_plans_stay_balanced_under_other_policies(options: dict) -> None:
    # Every criterion scores a grouped conv's input member (weight dim 1 is per conv group).
    torch.manual_seed(1)
    model = randomize_norms(GroupedConvNet()).eval()
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8), shapes=False, **options)
    assert pruned.get_submodule("g").groups == 4


class TwoGroupedConvs(nn.Module):
    """One 12-channel group read by a groups=2 conv and a groups=3 conv: blocks lcm(2, 3) = 6."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 12)
        self.g2 = nn.Conv2d(12, 8, 3, padding=1, groups=2)
        self.g3 = nn.Conv2d(12, 9, 1, groups=3)
        self.head = nn.Conv2d(17, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        return self.head(torch.cat([F.relu(self.g2(y)), F.relu(self.g3(y))], 1)).mean((2, 3))


def test_group_read_by_two_grouped_convs_uses_the_lcm_of_their_groups() -> None:
    torch.manual_seed(2)
    model = randomize_norms(TwoGroupedConvs()).eval()
    g = group_of(model, "a.0")
    assert g.blocks == 6 and g.block_size == 2 and g.prunable
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8))
    assert pruned.get_submodule("g2").in_channels == pruned.get_submodule("g3").in_channels == 6
    assert pruned.get_submodule("g2").groups == 2 and pruned.get_submodule("g3").groups == 3


class GroupedAfterConcat(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.g = nn.Conv2d(16, 16, 3, padding=1, groups=4)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.g(torch.cat([self.a(x), self.b(x)], 1)))).mean((2, 3))


def test_grouped_conv_reading_a_concatenation_freezes_its_inputs_only() -> None:
    torch.manual_seed(3)
    model = randomize_norms(GroupedAfterConcat()).eval()
    assert "reads a concatenation of 2 groups" in "".join(group_of(model, "a.0").reasons)
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8))
    assert pruned.get_submodule("g").in_channels == 16 and pruned.get_submodule("g").out_channels == 8


class DepthwiseMultiplier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)  # two filters per input channel
        self.bn = nn.BatchNorm2d(16)
        self.out = nn.Conv2d(16, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.bn(self.dw(self.a(x))))).mean((2, 3))


def test_depthwise_multiplier_follows_its_input_channels_two_outputs_each() -> None:
    # (tests/test_channel_multiplier.py covers the ties this makes with other convs.)
    torch.manual_seed(4)
    model = randomize_norms(DepthwiseMultiplier()).eval()
    group = group_of(model, "a.0")
    assert group.prunable and {m.module: m.block for m in group.members}["dw"] == 2
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8))
    dw = pruned.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 8, 4)


class DepthwiseOfUntracked(nn.Module):
    """A depthwise conv whose input went through an op without a rule (ShuffleNet's case)."""

    def __init__(self) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cumsum(self.a(x), dim=1)
        return self.out(F.relu(self.dw(y))).mean((2, 3))


def test_depthwise_conv_of_an_untracked_input_is_frozen_not_broken() -> None:
    model = randomize_norms(DepthwiseOfUntracked()).eval()
    with pytest.warns(fxprune.FxPruneWarning, match="cumsum"):
        g = group_of(model, "dw")
    assert g.frozen and "one channel per conv group" in g.reasons[-1]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8))
    assert pruned.get_submodule("dw").out_channels == 8


def test_unbalanced_plan_for_a_grouped_conv_is_rejected() -> None:
    model = GroupedConvNet().eval()
    plan = fxprune.plan(model, 0.5)
    data = json.loads(plan.to_json())
    for g in data["groups"]:
        if g["key"] == "a.0":
            g["keep"] = list(range(8))  # all of conv groups 0 and 1, none of 2 and 3
    bad = fxprune.PruningPlan.from_json(json.dumps(data))
    with pytest.raises(fxprune.PlanMismatchError, match=r"4 blocks .* same number.*\[4, 4, 0, 0\]"):
        fxprune.apply(model, bad)


def test_fit_count_and_select_channels() -> None:
    plain = Group(0, "p", 10, (), False)
    blocked = Group(1, "b", 12, (), False, (), blocks=3)
    assert [fit_count(plain, n) for n in (0, 3, 10, 12)] == [1, 3, 10, 10]
    assert [fit_count(blocked, n) for n in (1, 5, 6, 7, 11)] == [3, 6, 6, 6, 12]
    scores = torch.tensor([0.0, 5, 1, 4, 9, 8, 7, 6, 3, 2, 1, 0])
    assert select_channels(plain, scores[:10], 3) == [4, 5, 6]
    assert select_channels(blocked, scores, 6) == [1, 3, 4, 5, 8, 9]  # the best 2 of each block of 4
    assert check_balanced(blocked, [1, 3, 4, 5, 8, 9]) is None
    assert "[3, 2, 1]" in str(check_balanced(blocked, [0, 1, 2, 4, 5, 8]))
    with pytest.raises(fxprune.FxPruneError, match="multiple"):
        select_channels(blocked, scores, 5)
    # NaN scores rank lowest, in plain and blocked groups alike.
    nan = torch.tensor([1.0, float("nan"), 3, 2])
    assert select_channels(Group(2, "n", 4, (), False), nan, 3) == [0, 2, 3]
    assert select_channels(Group(3, "n", 4, (), False, (), blocks=2), nan, 2) == [0, 2]


# =========================================================================== norms across channels


class ChannelsLastMLP(nn.Module):
    """ConvNeXt's block: depthwise conv, permute to channels-last, LayerNorm over channels,
    Linear -> GELU -> Linear, permute back, layer scale, residual."""

    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, c, 3, padding=1)
        self.dw = nn.Conv2d(c, c, 7, padding=3, groups=c)
        self.norm = nn.LayerNorm(c)
        self.fc1 = nn.Linear(c, 4 * c)
        self.fc2 = nn.Linear(4 * c, c)
        self.gamma = nn.Parameter(torch.rand(c, 1, 1) + 0.5)
        self.head = nn.Linear(c, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = self.dw(x).permute(0, 2, 3, 1)
        y = self.fc2(F.gelu(self.fc1(self.norm(y)))).permute(0, 3, 1, 2)
        x = x + self.gamma * y
        return self.head(x.mean((2, 3)))


@pytest.mark.parametrize("shapes", [True, False])
def test_layernorm_over_channels_renormalises_and_the_mlp_is_pruned(shapes: bool) -> None:
    torch.manual_seed(5)
    model = ChannelsLastMLP().eval()
    x = torch.randn(2, 3, 8, 8)
    ex = (x,) if shapes else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # known rules: no warning either way
        pruned = prove(model, 0.5, x, shapes=shapes, strict=True)
        stem = group_of(model, "stem", example_inputs=ex)
        # Exact rewrites only: the LayerNorm keeps its width, frozen by design as before.
        exact = prove(model, 0.5, x, shapes=shapes, strict=True, allow_renormalising=False)
        frozen = group_of(model, "stem", example_inputs=ex, allow_renormalising=False)
    assert stem.renormalising and stem.prunable and stem.norms == ("LayerNorm norm",)
    assert pruned.get_submodule("fc1").out_features == pruned.get_submodule("fc2").in_features == 32
    assert pruned.get_submodule("stem").out_channels == pruned.get_submodule("norm").normalized_shape[0] == 8
    assert frozen.frozen and not frozen.renormalising
    assert any("LayerNorm norm normalises over the channel dim" in r for r in frozen.reasons)
    assert exact.get_submodule("stem").out_channels == 16 and exact.get_submodule("fc1").out_features == 32


class SpatialLayerNorm(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.LayerNorm([8, 8])  # over H and W: each channel normalised on its own
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(F.relu(self.norm(self.a(x)))).mean((2, 3))


def test_layernorm_over_other_dims_is_per_channel() -> None:
    torch.manual_seed(6)
    pruned = prove(SpatialLayerNorm(), 0.5, torch.randn(2, 3, 8, 8), strict=True)
    assert pruned.get_submodule("a").out_channels == 4


class Norms(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.gn = nn.GroupNorm(2, 8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.inorm = nn.InstanceNorm2d(8, affine=True, track_running_stats=True)
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.gn(self.a(x)))
        return self.c(F.relu(self.inorm(self.b(y)))).mean((2, 3))


def test_groupnorm_whole_groups_and_instancenorm_pruned() -> None:
    torch.manual_seed(7)
    model = randomize_norms(Norms())
    a = group_of(model, "a")
    assert a.prunable and a.unit == 4  # GroupNorm(2, 8): whole groups of 4 channels
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8), strict=True)
    assert pruned.get_submodule("a").out_channels == 4
    assert pruned.get_submodule("gn").num_groups == 1
    inorm = pruned.get_submodule("inorm")
    assert inorm.num_features == inorm.weight.numel() == inorm.running_var.numel() == 4


# =========================================================================== layout ops


class LayoutOps(nn.Module):
    """Channels moved, indexed around, split along other dims and padded, then consumed."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 12, 3, padding=1)
        self.fc = nn.Linear(12, 12)
        self.b = nn.Conv2d(12, 10, 1)
        self.c = nn.Conv2d(10, 6, 3)
        self.side = nn.Linear(12, 6)
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)                                   # N C H W
        t = y.permute(0, 2, 3, 1)                       # N H W C
        t = F.gelu(self.fc(t))
        t = torch.transpose(t, 1, 3).swapaxes(2, 3)     # N C H W again
        t = t.unsqueeze(0).squeeze(0)
        top, bottom = torch.chunk(t, 2, dim=2)          # split H
        t = torch.cat([bottom, top], dim=2) + y
        rows = t.unbind(3)                              # W pieces of N C H
        z = self.b(t)[:, :, 1:, ...]                    # slice H, keep all channels
        z = F.pad(z, (1, 1, 0, 2))                      # pad W and H, not channels
        z = self.c(F.relu(z))
        z = z.mean((2, 3), keepdim=True).expand(-1, -1, 2, 3) + z[:, :, :2, :3]
        return self.head(z.mean((2, 3)) + self.side(rows[0].mean(2)))


@pytest.mark.parametrize("ratio", [0.3, 0.6])
def test_layout_ops_follow_the_channel_dim(ratio: float) -> None:
    torch.manual_seed(8)
    model = LayoutOps().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(model, ratio, torch.randn(2, 3, 8, 8), strict=True)
    keep = int(12 * (1 - ratio))
    assert pruned.get_submodule("a").out_channels == pruned.get_submodule("fc").out_features == keep
    assert pruned.get_submodule("b").out_channels == int(10 * (1 - ratio))


class SqueezeExpand(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).mean(3, keepdim=True)           # N C H 1
        y = y.squeeze(3).unsqueeze(-1).expand(-1, -1, -1, 5)  # N C H 5
        y = y[None][0]
        return self.b(y).mean((2, 3))


def test_squeeze_and_expand_need_shapes() -> None:
    torch.manual_seed(9)
    x = torch.randn(2, 3, 8, 8)
    pruned = prove(SqueezeExpand(), 0.5, x, strict=True)
    assert pruned.get_submodule("a").out_channels == 4
    with pytest.warns(fxprune.FxPruneWarning, match="without recorded shapes"):
        pruned = prove(SqueezeExpand(), 0.5, x, shapes=False)
    assert pruned.get_submodule("a").out_channels == 8  # fail closed


class ChannelSplits(nn.Module):
    def __init__(self, how: str) -> None:
        super().__init__()
        self.how = how
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(4, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x)
        if self.how == "chunk":
            y = y.chunk(2, dim=1)[0]
        elif self.how == "index":
            y = y[:, :4]
        else:
            y = F.max_pool2d(y.permute(0, 2, 3, 1), 2).permute(0, 3, 1, 2)[:, :4]  # pools channels
        return self.b(y).mean((2, 3))


@pytest.mark.parametrize("how", ["chunk", "index", "pool"])
def test_ops_that_cut_the_channel_dim_fail_closed(how: str) -> None:
    model = ChannelSplits(how).eval()
    x = torch.randn(2, 3, 8, 8)
    if how != "pool":
        # A chunk or slice of the channel dim is followed now: its piece is a group of its own
        # (tests/test_split_slice.py); the channels nobody reads are pruned first.
        assert prove(model, 0.5, x, strict=True).get_submodule("a").out_channels < 8
        return
    with pytest.warns(fxprune.FxPruneWarning):
        pruned = prove(model, 0.5, x)
    assert pruned.get_submodule("a").out_channels == 8
    with pytest.raises(fxprune.UnsupportedNodeError):
        fxprune.prune(model, 0.5, strict=True, example_inputs=(x,))


class TupleWhole(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.b = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        parts = torch.chunk(self.a(x), 2, dim=2)
        return self.b(torch.stack(parts, 0).sum(0)).mean((2, 3))  # the tuple goes to an op whole


def test_tuple_consumed_whole_freezes_its_channels() -> None:
    model = TupleWhole().eval()
    with pytest.warns(fxprune.FxPruneWarning, match="stack"):
        g = group_of(model, "a", example_inputs=(torch.randn(1, 3, 8, 8),))
    assert g.frozen and any("tuple" in r for r in g.reasons)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        prove(model, 0.5, torch.randn(2, 3, 8, 8))


# =========================================================================== attention


class AttentionBlock(nn.Module):
    def __init__(self, d: int = 16) -> None:
        super().__init__()
        self.embed = nn.Linear(6, d)
        self.attn = nn.MultiheadAttention(d, 4, batch_first=True)
        self.fc1 = nn.Linear(d, 32)
        self.fc2 = nn.Linear(32, d)
        self.head = nn.Linear(d, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.embed(x)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = h + a
        h = h + self.fc2(F.gelu(self.fc1(h)))
        return self.head(h[:, 0])


def test_multihead_attention_prunes_heads_its_width_and_the_mlp() -> None:
    # No LayerNorm here: the residual width (embed, attention in/out, fc2) is an ordinary
    # group, and the heads are a group of their own in whole units of head_dim.
    torch.manual_seed(10)
    x = torch.randn(2, 5, 6)
    model = AttentionBlock().eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        pruned = prove(model, 0.5, x, strict=True)
    assert pruned.get_submodule("fc1").out_features == 16
    assert pruned.get_submodule("embed").out_features == 8
    attn = pruned.get_submodule("attn")
    assert (attn.num_heads, attn.head_dim, attn.in_dim, attn.out_dim) == (2, 4, 8, 8)


# =========================================================================== unknown and custom modules


class ChannelScale(nn.Module):
    """A custom per-channel layer: ``x * scale[c]``, traced as a leaf."""

    def __init__(self, c: int) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.rand(c) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale.view(1, -1, 1, 1)


class Opaque(nn.Module):
    """A leaf fxprune has never heard of."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flip(1)  # reverses the channels


class LeafTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, (ChannelScale, Opaque)) or super().is_leaf_module(m, qualname)


def leaf_trace(model: nn.Module) -> torch.fx.GraphModule:
    return torch.fx.GraphModule(model, LeafTracer().trace(model))


class WithLeaves(nn.Module):
    def __init__(self, leaf: nn.Module) -> None:
        super().__init__()
        self.a = cbr(3, 8)
        self.leaf = leaf
        self.b = cbr(8, 8)
        self.fc = nn.Linear(8, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.b(self.leaf(self.a(x))).mean((2, 3)))


def test_unknown_leaf_module_fails_closed_and_strict_raises() -> None:
    model = randomize_norms(WithLeaves(Opaque())).eval()
    gm = leaf_trace(model)
    with pytest.warns(fxprune.FxPruneWarning, match=r"no channel rule for module leaf \(Opaque\)"):
        groups = fxprune.find_groups(gm)
    frozen = [g for g in groups if g.frozen and "a.0" in g.modules("out")]
    assert frozen and "no channel rule for module leaf" in frozen[0].reasons[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        plan = fxprune.plan(gm, 0.5)
        pruned = fxprune.apply(gm, plan)
    assert pruned.get_submodule("a.0").out_channels == 8 and pruned.get_submodule("b.0").out_channels == 4
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)
        assert_equivalent(gm, pruned, plan, (torch.randn(2, 3, 8, 8),))
    with pytest.raises(fxprune.UnsupportedNodeError, match="Opaque"):
        fxprune.prune(gm, 0.5, strict=True)


# The documented way to teach fxprune a custom leaf: a rule (how channels pass), a builder
# (how to slice its parameters), and for the proof tools a mask (how to zero a channel).
@fxprune.register_rule(ChannelScale)
def _channel_scale_rule(ctx: Any, node: torch.fx.Node) -> Optional[fxprune.Layout]:
    layout = ctx.layout(node.args[0])
    if layout is not None:
        ctx.member(node, "channelwise", layout)  # scale[c] belongs to channel c's group
    return layout  # channels pass through in place


@register_builder(ChannelScale)
def _channel_scale_builder(module: ChannelScale, idx: dict) -> ChannelScale:
    new = copy.deepcopy(module)
    keep = idx.get("channelwise")
    if keep is not None:
        new.scale = nn.Parameter(module.scale.detach()[keep].clone())
    return new


@register_mask(ChannelScale)
def _channel_scale_mask(module: ChannelScale, role: str, removed: torch.Tensor) -> None:
    module.scale[removed] = 0


@pytest.mark.parametrize("shapes", [True, False])
def test_custom_leaf_taught_with_register_rule_and_builder(shapes: bool) -> None:
    torch.manual_seed(11)
    model = randomize_norms(WithLeaves(ChannelScale(8))).eval()
    gm = leaf_trace(model)
    x = torch.randn(2, 3, 8, 8)
    ex = (x,) if shapes else None
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(gm, 0.5, example_inputs=ex, strict=True)
        pruned = fxprune.apply(gm, plan, example_inputs=ex)
    assert pruned.get_submodule("leaf").scale.shape == (4,)
    assert torch.equal(pruned.get_submodule("leaf").scale, model.leaf.scale.detach()[plan.keep("a.0")])
    assert "leaf" in group_of(gm, "a.0").modules("channelwise")
    assert_equivalent(gm, pruned, plan, (x,), example_inputs=ex)
    ref = masked_reference(gm, plan)
    removed = sorted(set(range(8)) - set(plan.keep("a.0")))
    assert torch.count_nonzero(ref.get_submodule("leaf").scale[removed]) == 0


class Doubler(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


class DoublerTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, Doubler) or super().is_leaf_module(m, qualname)


@fxprune.register_rule(Doubler)
def _lossy_rule(ctx: Any, node: torch.fx.Node) -> None:
    return None  # a rule that forgets to say where the channels went


def test_a_rule_that_loses_the_channels_is_caught() -> None:
    model = randomize_norms(WithLeaves(Doubler())).eval()
    gm = torch.fx.GraphModule(model, DoublerTracer().trace(model))
    g = group_of(gm, "a.0")
    assert g.frozen and "gave its output no channel layout" in g.reasons[0]
    plan = fxprune.plan(gm, 0.5)
    assert_equivalent(gm, fxprune.apply(gm, plan), plan, (torch.randn(2, 3, 8, 8),))


# =========================================================================== non-finite weights


def test_nan_weights_rank_lowest_and_are_removed() -> None:
    torch.manual_seed(12)
    model = randomize_norms(GroupedConvNet()).eval()
    with torch.no_grad():
        model.b[0].weight[3, 0, 0, 0] = float("nan")  # one NaN in filter 3 of b
        model.b[0].weight[5] = float("nan")
    plan = fxprune.plan(model, 0.5)
    assert 3 not in plan.keep("b.0") and 5 not in plan.keep("b.0")
    pruned = fxprune.apply(model, plan)
    x = torch.randn(2, 3, 8, 8)
    with torch.no_grad():
        assert torch.isfinite(pruned(x)).all()
    assert_equivalent(model, pruned, plan, (x,))


def test_inf_weights_rank_highest_and_are_kept() -> None:
    model = randomize_norms(GroupedConvNet()).eval()
    with torch.no_grad():
        model.b[0].weight[6, 0, 0, 0] = float("inf")
    plan = fxprune.plan(model, 0.9)
    assert plan.keep("b.0") == [6]


# =========================================================================== zero-size and one-channel groups


class ZeroWidth(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(5, 8)
        self.empty = nn.Linear(5, 0)  # concatenated: contributes nothing
        self.b = nn.Linear(8, 6)
        self.sink = nn.Linear(8, 0)   # reads the group, produces nothing
        self.one = nn.Linear(6, 1)
        self.fc = nn.Linear(1, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([torch.relu(self.a(x)), self.empty(x)], 1)
        return self.fc(torch.relu(self.one(torch.relu(self.b(y))))) + self.sink(y).sum()


@pytest.mark.filterwarnings("ignore:Initializing zero-element tensors:UserWarning")
@pytest.mark.filterwarnings("error::fxprune.FxPruneWarning")
def test_zero_size_groups_do_not_exist_and_one_channel_groups_stay() -> None:
    torch.manual_seed(13)
    model = ZeroWidth().eval()
    x = torch.randn(3, 5)
    groups = fxprune.find_groups(model, example_inputs=(x,))
    assert all(g.size > 0 for g in groups)
    assert not any("empty" in g.modules() for g in groups)
    one = next(g for g in groups if g.key == "one")
    assert not one.prunable and "one channel" in str(one)
    pruned = prove(model, 0.5, x)
    assert pruned.get_submodule("a").out_features == 4 and pruned.get_submodule("sink").in_features == 4
    assert pruned.get_submodule("empty").out_features == 0


# =========================================================================== train mode


def test_train_mode_model_pruned_equivalent_under_batch_statistics() -> None:
    torch.manual_seed(14)
    model = randomize_norms(GroupedConvNet()).train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 3, 8, 8)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    pruned = fxprune.apply(model, plan, example_inputs=(x,))
    assert pruned.training and model.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # no stats update
    # In train mode BatchNorm uses batch statistics: a zeroed channel (scale and shift 0)
    # still yields exactly 0, so the masked reference must match in train mode too.
    ref = masked_reference(model, plan).double().train()
    cand = copy.deepcopy(pruned).double().train()
    torch.testing.assert_close(cand(x.double()), ref(x.double()))


# =========================================================================== tied weights and shared modules


class TiedConvs(nn.Module):
    """Two convs in different branches sharing one weight (and bias): their input groups and
    output groups must keep the same channels."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.p = nn.Conv2d(8, 12, 3, padding=1)
        self.q = nn.Conv2d(8, 12, 3, padding=1)
        self.q.weight = self.p.weight
        self.q.bias = self.p.bias
        self.out = nn.Conv2d(24, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.cat([F.relu(self.p(self.a(x))), F.relu(self.q(self.b(x)))], 1)
        return self.out(y).mean((2, 3))


@pytest.mark.parametrize("ratio", [0.0, 0.5])
def test_tied_weights_unify_groups_and_stay_tied(ratio: float) -> None:
    torch.manual_seed(15)
    model = randomize_norms(TiedConvs()).eval()
    groups = fxprune.find_groups(model)
    p_group = next(g for g in groups if "p" in g.modules("out"))
    assert "q" in p_group.modules("out") and not p_group.frozen
    ab = next(g for g in groups if "a.0" in g.modules("out"))
    assert "b.0" in ab.modules("out")  # the inputs the tied weight reads are unified too
    pruned = prove(model, ratio, torch.randn(2, 3, 8, 8))
    assert pruned.get_submodule("q").weight is pruned.get_submodule("p").weight
    assert pruned.get_submodule("q").bias is pruned.get_submodule("p").bias
    assert params(pruned) <= params(model)
    if ratio:
        assert pruned.get_submodule("p").weight.shape == (6, 4, 3, 3)


class TiedAcrossRoles(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.b = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.bn2.bias = self.bn1.weight  # the same tensor, different meaning
        self.c = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.relu(self.bn1(self.a(x)))
        return self.c(F.relu(self.bn2(self.b(y)))).mean((2, 3))


def test_tensor_tied_across_different_attributes_freezes_both_owners() -> None:
    model = randomize_norms(TiedAcrossRoles()).eval()
    assert "a tensor shared by bn1.weight, bn2.bias" in "".join(group_of(model, "a").reasons)
    assert group_of(model, "b").frozen
    pruned = prove(model, 0.5, torch.randn(2, 3, 8, 8))
    assert pruned.get_submodule("bn2").bias is pruned.get_submodule("bn1").weight


class DirectRead(nn.Module):
    """A Linear called as a module and also read as a raw parameter by the graph."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(6, 8)
        self.fc2 = nn.Linear(8, 8)
        self.fc3 = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.fc1(x))
        h = torch.relu(self.fc2(h)) + F.linear(h, self.fc2.weight)
        return self.fc3(h)


def test_parameter_read_directly_by_the_graph_freezes_its_module() -> None:
    model = DirectRead().eval()
    # F.linear on fc2.weight is a functional layer now; the tie with fc2 freezes both, by design.
    assert "a tensor shared by fc2.weight, get_attr fc2.weight" in "".join(group_of(model, "fc2").reasons)
    pruned = prove(model, 0.5, torch.randn(4, 6), shapes=False)
    assert pruned.get_submodule("fc2").weight.shape == (8, 8)
    assert pruned.fc2.weight is pruned.get_submodule("fc2").weight


class SharedTwoInputs(nn.Module):
    """One conv applied to two different producers: their groups become one."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = cbr(3, 8), cbr(3, 8)
        self.shared = nn.Conv2d(8, 8, 3, padding=1)
        self.out = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(F.relu(self.shared(self.a(x))) + F.relu(self.shared(self.b(x)))).mean((2, 3))


@pytest.mark.parametrize("model_cls", [SharedConvNet, SharedTwoInputs])
@pytest.mark.parametrize("ratio", [0.3, 0.7])
def test_shared_modules_keep_one_channel_set(model_cls: type, ratio: float) -> None:
    torch.manual_seed(16)
    model = randomize_norms(model_cls()).eval()
    pruned = prove(model, ratio, torch.randn(2, 3, 8, 8))
    width = 16 if model_cls is SharedConvNet else 8
    assert pruned.get_submodule("shared").out_channels == int(width * (1 - ratio))
    if model_cls is SharedTwoInputs:
        g = group_of(model, "a.0")
        assert "b.0" in g.modules("out") and "shared" in g.modules("in")


# =========================================================================== transposed convolutions


class Transposed1d3d(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv1d(2, 8, 3, padding=1)
        self.up1 = nn.ConvTranspose1d(8, 6, 2, stride=2, bias=False)
        self.b = nn.Conv1d(6, 3, 1)
        self.c = nn.Conv3d(2, 8, 1)
        self.up3 = nn.ConvTranspose3d(8, 4, 2, stride=2)
        self.d = nn.Conv3d(4, 3, 1)

    def forward(self, x: torch.Tensor, v: torch.Tensor) -> Any:
        y = self.b(torch.relu(self.up1(torch.relu(self.a(x)))))
        z = self.d(torch.relu(self.up3(torch.relu(self.c(v)))))
        return y, z


def test_transposed_convs_prune_both_sides_and_match_the_masked_reference() -> None:
    torch.manual_seed(0)
    model = randomize_norms(TinyUNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # every op here has a rule
        for ratio in (0.25, 0.5, 0.75):
            for shapes in (True, False):
                pruned = prove(model, ratio, x, shapes=shapes)
                assert params(pruned) < params(model)
    pruned = prove(model, 0.5, x)
    assert pruned.up.in_channels == 8 and pruned.up.out_channels == 6  # both weight dims shrank
    assert pruned.up.weight.shape[:2] == (8, 6) and pruned.up.bias.shape == (6,)
    assert pruned.dw_up.groups == pruned.dw_up.in_channels == pruned.dw_up.out_channels == 10  # 6 + 4 kept
    assert pruned.grouped_up.weight.shape == model.grouped_up.weight.shape  # frozen whole
    assert "grouped transposed convolution grouped_up (groups=2)" in reasons(model)
    # The group `up` produces runs through its BatchNorm and, at offset 0, into the concat.
    g = group_of(model, "up")
    assert {"up_bn", "dw_up"} <= set(g.modules("channelwise")) and "dec.0" in g.modules("in")


@pytest.mark.parametrize("importance", ["l1", "l2", "fpgm", "taylor", "apoz", "random"])
def test_transposed_convs_under_every_criterion(importance: str) -> None:
    torch.manual_seed(1)
    model = randomize_norms(TinyUNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    calib = [(torch.randn(2, 3, 16, 16), torch.randn(2, 2, 16, 16))]
    kw: dict = {"importance": importance}
    if importance in ("taylor", "apoz"):
        kw.update(calibration=calib, loss_fn=lambda out, y: F.mse_loss(out, y))
    prove(model, 0.5, x, **kw)


@pytest.mark.parametrize("importance", ["l1", "l2", "taylor"])
def test_transposed_conv_scores_read_the_right_weight_dims(importance: str) -> None:
    torch.manual_seed(2)
    model = TinyUNet().eval()
    with torch.no_grad():
        model.up.weight[:, 3] = 0  # output channel 3 of `up` is dead (dim 1 of its weight)
        model.up.bias[3] = 0
        model.up_bn.weight[3] = 0
        model.up_bn.bias[3] = 0  # so its output is exactly 0 and Taylor's w * grad is 0 too
        model.dw_up.weight[3] = 0
        model.dw_up.bias[3] = 0
        model.dec[0].weight[:, 3] = 0
    calib = [(torch.randn(2, 3, 16, 16), torch.randn(2, 2, 16, 16))]
    keep = fxprune.plan(model, 1 / 12, importance=importance, calibration=calib,
                        loss_fn=lambda out, y: F.mse_loss(out, y)).keep("up")
    assert 3 not in keep and len(keep) == 11


def test_taylor_reads_a_transposed_conv_output_on_weight_dim_1() -> None:
    torch.manual_seed(5)
    model = randomize_norms(TinyUNet()).eval()
    batches = [(torch.randn(2, 3, 16, 16), torch.randn(2, 2, 16, 16)) for _ in range(2)]
    loss_fn = lambda out, y: F.mse_loss(out, y)  # noqa: E731
    analysis = fxprune.analyze_model(model)
    group = analysis.group("up")
    got = score_groups(analysis, "taylor", [group], ScoringOptions(calibration=batches, loss_fn=loss_fn))[group.index]
    ref = copy.deepcopy(model)
    expected = torch.zeros(12, dtype=torch.float64)
    for x, y in batches:
        ref.zero_grad()
        loss_fn(ref(x), y).backward()

        def wg(t: torch.Tensor) -> torch.Tensor:
            return (t * t.grad).detach().double()

        # `up` is [16 in, 12 out, 4, 4]: its outputs are dim 1; dw_up reads them at offset 0.
        per = (wg(ref.up.weight).sum((0, 2, 3)) + wg(ref.up.bias) + wg(ref.up_bn.weight) + wg(ref.up_bn.bias)
               + wg(ref.dw_up.weight)[:12].sum((1, 2, 3)) + wg(ref.dw_up.bias)[:12] + wg(ref.dec[0].weight)[:, :12].sum((0, 2, 3)))
        expected += per.abs()
    assert torch.allclose(got.double(), expected / 2, rtol=1e-4, atol=1e-8)


def test_transposed_convs_in_1d_and_3d() -> None:
    torch.manual_seed(3)
    model = Transposed1d3d().eval()
    x, v = torch.randn(2, 2, 5), torch.randn(2, 2, 3, 3, 3)
    plan = fxprune.plan(model, 0.5)
    pruned = fxprune.apply(model, plan)
    assert pruned.up1.weight.shape == (4, 3, 2) and pruned.up3.weight.shape == (4, 2, 2, 2, 2)
    assert_equivalent(model, pruned, plan, (x, v))


def test_a_pruned_transposed_conv_saves_and_loads(tmp_path: Any) -> None:
    torch.manual_seed(4)
    model = randomize_norms(TinyUNet()).eval()
    pruned = fxprune.prune(model, 0.5)
    fxprune.save(pruned, tmp_path / "unet")
    loaded = fxprune.load(tmp_path / "unet", model=TinyUNet())
    x = torch.randn(1, 3, 16, 16)
    torch.testing.assert_close(loaded(x), pruned(x))


class ScaleWithoutBuilder(ChannelScale):
    """A custom leaf with a channel rule registered but no builder."""


@fxprune.register_rule(ScaleWithoutBuilder)
def _scale_without_builder_rule(ctx: Any, node: torch.fx.Node) -> Optional[fxprune.Layout]:
    layout = ctx.layout(node.args[0])
    if layout is not None:
        ctx.member(node, "channelwise", layout)
    return layout


class ScaleWithoutBuilderTracer(torch.fx.Tracer):
    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, ScaleWithoutBuilder) or super().is_leaf_module(m, qualname)


def test_a_rule_without_a_builder_is_the_users_error_not_a_bug() -> None:
    model = WithLeaves(ScaleWithoutBuilder(8)).eval()
    gm = torch.fx.GraphModule(model, ScaleWithoutBuilderTracer().trace(model))
    with pytest.raises(fxprune.FxPruneError, match="register_builder") as info:
        fxprune.prune(gm, 0.5)
    assert not isinstance(info.value, fxprune.InternalError)
