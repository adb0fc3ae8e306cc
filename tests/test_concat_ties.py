"""Operands concatenated differently, tied: a concatenation added to one conv's output.

Inception-ResNet blocks (``conv(cat(b0, b1, b2)) + cat(...)``), CSP and NASNet cells and
GhostNet's ``cat(primary, cheap)`` added to a shortcut tie a tensor that is the concatenation of
several producers to a tensor with other group boundaries. The analysis cuts every operand's
groups at every operand's boundaries (as for a split of the channel dim), so each stretch of
channels is one group of its own and the producer spanning several stretches keeps the
concatenation of their kept channels. Each case is proven against the masked reference in
float64, and the proof is shown to fail on a broken rewrite.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.export import from_exported
from fxprune.testing import assert_equivalent
from tests.zoo import init_normal

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


def init(model: nn.Module) -> nn.Module:
    return init_normal(model)


def prove(model: nn.Module, ratio: float = 0.5) -> torch.fx.GraphModule:
    plan = fxprune.plan(model, ratio, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    return pruned


def groups(model: nn.Module) -> dict:
    return {g.key: g for g in fxprune.find_groups(model, example_inputs=(X,))}


class InceptionResidual(nn.Module):
    """``relu(up(cat(b0, b1, b2)) + cat(b0, b1, b2))``, then a plain residual on the result."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.b0 = nn.Conv2d(8, 6, 1)
        self.b1 = nn.Conv2d(8, 4, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(4)
        self.b2 = nn.Conv2d(8, 6, 1)
        self.up = nn.Conv2d(16, 16, 1)
        self.up2 = nn.Conv2d(16, 16, 1)
        self.head = nn.Conv2d(16, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        y = torch.cat([self.b0(x), self.bn1(self.b1(x)), self.b2(x)], 1)
        z = torch.relu(self.up(y) + y)
        z = self.up2(z) + z
        return self.head(z)


class TwoConcats(nn.Module):
    """``cat(a[4], b[4]) + cat(c[2], d[6])``: the cuts at 2, 4 and 8 give three groups."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 4, 3, padding=1)
        self.c, self.d = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 6, 3, padding=1)
        self.head = nn.Conv2d(8, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.cat([self.a(x), self.b(x)], 1) + torch.cat([self.c(x), self.d(x)], 1))


class Swapped(nn.Module):
    """``cat(a[4], b[2]) + cat(b[2], a[4])``: the same tensors in the other order."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 2, 3, padding=1)
        self.head = nn.Conv2d(6, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.a(x), self.b(x)
        return self.head(torch.cat([a, b], 1) + torch.cat([b, a], 1))


def test_a_concatenation_added_to_a_conv_output_is_pruned_piece_by_piece() -> None:
    model = init(InceptionResidual())
    found = groups(model)
    assert {k for k, g in found.items() if g.prunable} == {"stem", "b0", "b1", "b2"}
    up = [m.offset for m in found["b1"].members if m.module == "up" and m.role == "out"]
    assert up == [6]  # up's output rows 6..9 are b1's channels
    pruned = prove(model)
    assert [pruned.get_submodule(n).out_channels for n in ("b0", "b1", "b2", "up", "up2")] == [3, 2, 3, 8, 8]


def test_two_concatenations_with_different_pieces() -> None:
    model = init(TwoConcats())
    found = groups(model)
    assert sorted(g.size for g in found.values() if g.prunable) == [2, 2, 4]
    pruned = prove(model)
    assert pruned.get_submodule("head").in_channels == 4


def test_the_same_tensors_concatenated_in_another_order() -> None:
    model = init(Swapped())
    prunable = [g for g in fxprune.find_groups(model, example_inputs=(X,)) if g.prunable]
    # a[0:2] ~ b ~ a[2:4]: one group of 2 channels that a holds twice.
    assert [g.size for g in prunable] == [2]
    pruned = prove(model)
    assert pruned.get_submodule("a").out_channels == 2 and pruned.get_submodule("b").out_channels == 1


def test_through_torch_export_the_same_groups_are_pruned() -> None:
    model = init(InceptionResidual())
    lifted = from_exported(torch.export.export(model, (X,), strict=False))
    plan = fxprune.plan(lifted, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(lifted, plan, example_inputs=(X,))
    assert_equivalent(lifted, pruned, plan, (X,), example_inputs=(X,))
    assert sum(p.numel() for p in pruned.parameters()) == sum(p.numel() for p in prove(model).parameters())


class Flat(nn.Module):
    """``cat(a, b).flatten(1) + c.flatten(1)`` into a Linear: cut in channels, 64 features each."""

    def __init__(self) -> None:
        super().__init__()
        self.a, self.b, self.c = nn.Conv2d(3, 2, 1), nn.Conv2d(3, 2, 1), nn.Conv2d(3, 4, 1)
        self.fc = nn.Linear(4 * 64, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x), self.b(x)], 1).flatten(1) + self.c(x).flatten(1))


def test_flattened_operands_concatenated_differently_are_cut_in_channels() -> None:
    model = init(Flat())
    found = groups(model)
    assert found["a"].prunable and found["b"].prunable and found["a"].size == 2
    pruned = prove(model)
    assert pruned.get_submodule("fc").in_features == 2 * 64 and pruned.get_submodule("c").out_channels == 2


@pytest.mark.parametrize("model_cls", [InceptionResidual, TwoConcats, Swapped, Flat])
def test_the_proof_fails_when_the_tied_conv_keeps_other_rows(model_cls: type) -> None:
    model = init(model_cls())
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    broken = copy.deepcopy(pruned)
    name = {"InceptionResidual": "up", "TwoConcats": "d", "Swapped": "a", "Flat": "c"}[model_cls.__name__]
    conv = broken.get_submodule(name)
    with torch.no_grad():
        conv.weight.copy_(conv.weight.roll(1, 0))
        conv.bias.copy_(conv.bias.roll(1, 0))
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, (X,), example_inputs=(X,))


class FlatCat(nn.Module):
    """``fc(cat(a.flatten(1), b.flatten(1)))``: flattened maps of one size concatenated (``blocks`` features per channel)."""

    def __init__(self, mixed: bool = False) -> None:
        super().__init__()
        self.mixed = mixed
        self.a, self.b = nn.Conv2d(3, 4, 1), nn.Conv2d(3, 6, 3, padding=1, stride=2 if mixed else 1)
        self.fc = nn.Linear(4 * 64 + 6 * (16 if mixed else 64), 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.cat([self.a(x).flatten(1), self.b(x).flatten(1)], 1))


def test_flattened_maps_of_one_size_concatenated_into_a_linear_are_pruned() -> None:
    model = init(FlatCat())
    found = groups(model)
    assert found["a"].prunable and found["b"].prunable
    pruned = prove(model)
    assert pruned.get_submodule("a").out_channels == 2 and pruned.get_submodule("b").out_channels == 3
    assert pruned.get_submodule("fc").in_features == (2 + 3) * 64
    broken = copy.deepcopy(pruned)
    with torch.no_grad():  # the Linear's columns of b's channels, shifted by one channel
        fc = broken.get_submodule("fc").weight
        fc[:, 128:].copy_(fc[:, 128:].roll(64, 1))
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, (X,), example_inputs=(X,))


def test_flattened_maps_of_different_sizes_concatenated_stay_whole() -> None:
    # Per-channel features differ (64 and 16): one layout cannot say where each channel's
    # columns are, so both stay whole with a warning (fail closed).
    model = init(FlatCat(mixed=True))
    with pytest.warns(fxprune.FxPruneWarning, match="channel dims differ"):
        found = groups(model)
    assert not found["a"].prunable and not found["b"].prunable
    prove(model)
