"""``a.reshape_as(b)`` / ``a.view_as(b)``: a view to another tensor's shape, pruned when ``b`` carries the same channels.

LeViT's ``LinearNorm`` is ``bn(linear(x).flatten(0, 1)).reshape_as(linear(x))``: before the
rule existed, 58 of levit_128's 63 groups were frozen ("no rule for reshape_as").
"""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import assert_equivalent, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 5, 6)


class LinearNorm(nn.Module):
    def __init__(self, a: int, b: int) -> None:
        super().__init__()
        self.linear = nn.Linear(a, b, bias=False)
        self.bn = nn.BatchNorm1d(b)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.linear(x)
        return self.bn(x.flatten(0, 1)).reshape_as(x)


class LeViTMLP(nn.Module):
    def __init__(self, view: bool = False) -> None:
        super().__init__()
        self.up, self.down = LinearNorm(6, 12), LinearNorm(12, 6)
        self.view = view
        self.head = nn.Linear(6, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.up(x))
        if self.view:
            h = h.flatten(0, 1).view_as(h)
        return self.head((x + self.down(h)).mean(1))


class ToOtherShape(nn.Module):
    """reshape_as a buffer (its shape does not follow pruning), or a Linear of the same width (tied)."""

    def __init__(self, to_buffer: bool) -> None:
        super().__init__()
        self.a, self.b = nn.Linear(6, 8), nn.Linear(6, 8)
        self.register_buffer("template", torch.zeros(2, 5, 8))
        self.to_buffer = to_buffer
        self.head = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.a(x).flatten(0, 1).relu()
        return self.head(y.reshape_as(self.template if self.to_buffer else self.b(x)).mean(1))


@pytest.mark.parametrize("view", [False, True])
def test_reshape_as_and_view_as_to_the_same_channels_prune_and_prove(view: bool) -> None:
    torch.manual_seed(0)
    model = randomize_norms(LeViTMLP(view)).eval()
    hidden = next(g for g in fxprune.find_groups(model, example_inputs=(X,)) if "up.linear" in g.modules("out"))
    assert hidden.prunable
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert pruned.get_submodule("up.linear").out_features == 6 and pruned.get_submodule("up.bn").num_features == 6
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))


def test_reshape_as_a_tensor_whose_shape_does_not_follow_pruning_is_refused() -> None:
    model = ToOtherShape(to_buffer=True).eval()
    with pytest.warns(fxprune.FxPruneWarning, match="reshape_as to the shape of a tensor whose channels are not"):
        groups = fxprune.find_groups(model, example_inputs=(X,))
    assert not next(g for g in groups if "a" in g.modules("out")).prunable
    pruned = fxprune.prune(model, 0.5, example_inputs=(X,))
    assert pruned(X).shape == (2, 3) and pruned.get_submodule("a").out_features == 8


def test_reshape_as_a_tensor_of_the_same_width_ties_the_two() -> None:
    model = ToOtherShape(to_buffer=False).eval()
    a = next(g for g in fxprune.find_groups(model, example_inputs=(X,)) if "a" in g.modules("out"))
    assert a.prunable and "b" in a.modules("out")  # one group: both keep the same channels
    plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert pruned.get_submodule("a").out_features == pruned.get_submodule("b").out_features == 4
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
