"""Depthwise convs with a channel multiplier, and channels tied in runs to coarser channels.

A depthwise conv with ``groups = in_channels`` and ``out_channels = k * in_channels`` (FastViT's
and MobileOne's downsampling, a "depth multiplier") gives input channel c the output channels
``[c*k, (c+1)*k)``. Those k outputs belong to channel c: removing the input channel removes them
(the multiplier stays), so the conv and the per-position layers after it (BatchNorm, pooling,
reductions over other dims, the next conv's input columns) join the input's group with k
positions per channel. When such an output is added to a plain conv's output, each run of k of
that conv's channels is tied to one channel of the input: the conv's group *becomes* the input's
channels, with k positions each (a coarser tie). Where that cannot be expressed (the fine
channels concatenated with others, cut by a split, counted by an argument rewrite), both stay
whole. Every case is proven against the masked reference in float64, and the proofs fail on
broken rewrites.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.api import analyze_model
from fxprune.latency_model import layer_shapes
from fxprune.testing import assert_equivalent
from tests.zoo import assert_rolled_weight_fails, init_normal

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


def prove(model: nn.Module, ratio: float = 0.5, inputs: tuple = (X,)) -> torch.fx.GraphModule:
    plan = fxprune.plan(model, ratio, example_inputs=inputs)
    pruned = fxprune.apply(model, plan, example_inputs=inputs)
    assert_equivalent(model, pruned, plan, inputs, example_inputs=inputs)
    return pruned


def groups(model: nn.Module, inputs: tuple = (X,)) -> dict:
    return {g.key: g for g in fxprune.find_groups(model, example_inputs=inputs)}


class Downsample(nn.Module):
    """A stream, a multiplier-2 depthwise conv + BN added to a 1x1 conv of its output, a head."""

    def __init__(self, multiplier: int = 2) -> None:
        super().__init__()
        k = multiplier
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.bn0 = nn.BatchNorm2d(8)
        self.dw = nn.Conv2d(8, 8 * k, 3, padding=1, groups=8)  # 2 outputs per input channel
        self.bn1 = nn.BatchNorm2d(8 * k)
        self.small = nn.Conv2d(8, 8 * k, 1, groups=8, bias=False)  # a second branch, as in MobileOne
        self.pw = nn.Conv2d(8 * k, 8 * k, 1)
        self.bn2 = nn.BatchNorm2d(8 * k)
        self.block = nn.Conv2d(8 * k, 8 * k, 3, padding=1)
        self.head = nn.Conv2d(8 * k, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn0(self.stem(x)))
        y = torch.relu(self.bn1(self.dw(x)) + self.small(x))  # two multiplier branches: one channel set
        z = self.pw(y) + self.bn2(y)  # the 1x1 conv's channels: tied in pairs to the stem's
        z = z + self.block(z)  # a residual on the finer channels
        return self.head(torch.relu(z))


def test_the_multiplier_conv_joins_its_input_group_and_the_tied_convs_follow() -> None:
    model = init_normal(Downsample())
    found = groups(model)
    stem = found["stem"]
    assert stem.prunable and stem.size == 8
    blocks = {m.module: m.block for m in stem.members}
    # Each stem channel owns 2 positions of every layer after the multiplier conv.
    assert blocks == {"stem": 1, "bn0": 1, "dw": 2, "small": 2, "bn1": 2, "pw": 2, "bn2": 2, "block": 2, "head": 2}
    assert "pw" not in found and "block" not in found  # no groups of their own: they are the stem's channels
    pruned = prove(model)
    assert pruned.get_submodule("stem").out_channels == 4
    dw = pruned.get_submodule("dw")
    assert (dw.in_channels, dw.out_channels, dw.groups) == (4, 8, 4)
    assert pruned.get_submodule("pw").out_channels == 8 and pruned.get_submodule("head").in_channels == 8


@pytest.mark.parametrize("module, dim", [("dw", 0), ("small", 0), ("pw", 0), ("pw", 1), ("block", 1), ("head", 1)])
def test_the_proof_fails_on_a_broken_rewrite(module: str, dim: int) -> None:
    model = init_normal(Downsample())
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_rolled_weight_fails(model, pruned, plan, (X,), module, dim)


def test_a_multiplier_of_three_and_no_tie_down_to_a_linear_head() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 6, 3, padding=1)
            self.dw = nn.Conv2d(6, 18, 3, padding=1, groups=6)
            self.bn = nn.BatchNorm2d(18)
            self.fc = nn.Linear(18 * 4, 7)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.bn(self.dw(torch.relu(self.stem(x))))
            y = y * y.mean((2, 3), keepdim=True)  # an SE-like gate: per position of the channel dim
            return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(y, 2), 1))

    model = init_normal(Net())
    blocks = {m.module: m.block for m in groups(model)["stem"].members}
    assert blocks == {"stem": 1, "dw": 3, "bn": 3, "fc": 12}  # 3 positions x 4 pooled cells per channel
    pruned = prove(model)
    assert pruned.get_submodule("dw").out_channels == 9 and pruned.get_submodule("fc").in_features == 36


def test_chained_ties_resolve_to_the_first_channels() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 4, 3, padding=1)
            self.dw1 = nn.Conv2d(4, 8, 3, padding=1, groups=4)
            self.pw1 = nn.Conv2d(8, 8, 1)
            self.dw2 = nn.Conv2d(8, 16, 3, padding=1, groups=8)
            self.pw2 = nn.Conv2d(16, 16, 1)
            self.head = nn.Conv2d(16, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            x = torch.relu(self.stem(x))
            y = self.dw1(x)
            y = torch.relu(self.pw1(y) + y)
            z = self.dw2(y)
            return self.head(torch.relu(self.pw2(z) + z))

    model = init_normal(Net())
    found = groups(model)
    assert set(found) == {"stem", "head"}
    assert {m.module: m.block for m in found["stem"].members} == {
        "stem": 1, "dw1": 2, "pw1": 2, "dw2": 4, "pw2": 4, "head": 4}
    pruned = prove(model)
    assert pruned.get_submodule("pw2").out_channels == 8  # 2 stem channels x 4


def test_constraints_of_the_finer_channels_move_to_the_coarser_ones() -> None:
    class Net(nn.Module):
        def __init__(self, norm_groups: int, conv_groups: int) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 8, 3, padding=1)
            self.dw = nn.Conv2d(8, 16, 3, padding=1, groups=8)
            self.pw = nn.Conv2d(16, 16, 1)
            self.gn = nn.GroupNorm(norm_groups, 16)
            self.grouped = nn.Conv2d(16, 16, 3, padding=1, groups=conv_groups)
            self.head = nn.Conv2d(16, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dw(torch.relu(self.stem(x)))
            y = self.gn(self.pw(y) + y)
            return self.head(torch.relu(self.grouped(y) + y))

    # GroupNorm units of 4 fine channels are units of 2 stem channels; 2 conv groups are 2 blocks.
    model = init_normal(Net(norm_groups=4, conv_groups=2))
    stem = groups(model)["stem"]
    assert stem.prunable and (stem.unit, stem.blocks) == (2, 2)
    pruned = prove(model)
    assert pruned.get_submodule("gn").num_groups == 2 and pruned.get_submodule("grouped").groups == 2
    # Units of 2 fine channels are always whole: every stem channel owns 2 of them.
    model = init_normal(Net(norm_groups=8, conv_groups=1))
    stem = groups(model)["stem"]
    assert stem.prunable and stem.unit == 1
    prove(model)
    # One group over every channel renormalises the finer channels: not modelled, so whole.
    model = init_normal(Net(norm_groups=1, conv_groups=1))
    stem = groups(model)["stem"]
    assert stem.frozen and "a norm renormalises it" in "; ".join(stem.reasons)
    prove(model)


class Tied(nn.Module):
    """A stem of 4 channels, a multiplier-2 depthwise conv and a 1x1 conv tied to it in pairs."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1)
        self.dw = nn.Conv2d(4, 8, 3, padding=1, groups=4)
        self.pw = nn.Conv2d(8, 8, 1)

    def tied(self, x: torch.Tensor) -> torch.Tensor:
        y = self.dw(torch.relu(self.stem(x)))
        return self.pw(y) + y


def test_finer_channels_concatenated_with_others_stay_whole() -> None:
    class Net(Tied):
        def __init__(self) -> None:
            super().__init__()
            self.side = nn.Conv2d(3, 5, 1)
            self.head = nn.Conv2d(13, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head(torch.cat([self.tied(x), self.side(x)], 1))

    model = init_normal(Net())
    found = groups(model)
    assert found["stem"].frozen and "not modelled" in "; ".join(found["stem"].reasons)
    assert found["pw"].frozen and found["side"].prunable
    pruned = prove(model)
    assert pruned.get_submodule("stem").out_channels == 4 and pruned.get_submodule("side").out_channels < 5


def test_a_split_of_the_finer_channels_stays_whole() -> None:
    class Net(Tied):
        def __init__(self) -> None:
            super().__init__()
            self.a = nn.Conv2d(3, 3, 1)
            self.b = nn.Conv2d(5, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            first, second = torch.split(self.tied(x), [3, 5], 1)
            return self.a(first) + self.b(second)

    model = init_normal(Net())
    assert groups(model)["stem"].frozen
    prove(model)


def test_timm_fastvit_prunes_its_streams_through_the_downsampling() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("fastvit_t8", pretrained=False).eval()
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing left unpruned with a warning
        pruned = prove(model, 0.5, (x,))
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    assert count(pruned) / count(model) < 0.35  # 54 % while each stream stopped at its downsampling


def test_the_latency_model_sizes_a_multiplier_conv_from_its_channels() -> None:
    analysis = analyze_model(init_normal(Downsample()), example_inputs=(X,))
    stem = next(g for g in analysis.groups if g.key == "stem")
    layers = {layer.name: layer for layer in layer_shapes(analysis, 1)}
    dw, pw = layers["dw"], layers["pw"]
    assert dw.depthwise and dw.channels({}) == (8, 16)
    assert dw.channels({stem.index: 3}) == (3, 6) and dw.conv_groups(3) == 3
    assert pw.channels({stem.index: 3}) == (6, 6)  # its input and output columns are the stem's, 2 each


def test_a_constraint_that_fails_further_up_a_chain_keeps_the_channels_whole() -> None:
    class Net(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.stem = nn.Conv2d(3, 3, 3, padding=1)
            self.dw1 = nn.Conv2d(3, 6, 3, padding=1, groups=3)
            self.pw1 = nn.Conv2d(6, 6, 1)
            self.dw2 = nn.Conv2d(6, 12, 3, padding=1, groups=6)
            self.pw2 = nn.Conv2d(12, 12, 1)
            self.gn = nn.GroupNorm(2, 12)  # units of 6: 3 of pw1's channels, 1.5 of the stem's
            self.head = nn.Conv2d(12, 3, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.dw1(torch.relu(self.stem(x)))
            y = torch.relu(self.pw1(y) + y)
            z = self.dw2(y)
            return self.head(self.gn(self.pw2(z) + z))

    model = init_normal(Net())
    stem = groups(model)["stem"]
    assert stem.frozen and "units of 3 channels do not fall on the coarser channels" in "; ".join(stem.reasons)
    prove(model)
