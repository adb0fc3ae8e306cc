"""GroupNorm with one group (PoolFormer's norm): a renormalising width, proven against masked_group_norm.

``GroupNorm(1, C)`` normalises each sample over every channel and position, so removing a
channel changes the others' statistics, as for a LayerNorm over the channels. The group is
marked renormalising and proven against the reference in which each such norm computes its
statistics over the kept channels only (:func:`fxprune.testing.masked_group_norm`), built from
the original graph and the plan, never from the rewrite.
"""

from __future__ import annotations

import copy
from typing import Any, Tuple

import pytest
import torch
import torch.fx
import torch.nn as nn
import torch.nn.functional as F

import fxprune
from fxprune.testing import assert_equivalent, masked_group_norm, masked_reference, randomize_norms

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 6, 6)


class Pool(nn.Module):
    """A PoolFormer-like stream of width 8 under nn.GroupNorm(1, 8) and F.group_norm(x, 1, w, b)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.GroupNorm(1, 8)
        self.mlp = nn.Sequential(nn.Conv2d(8, 16, 1), nn.GELU(), nn.Conv2d(16, 8, 1))
        self.w = nn.Parameter(torch.rand(8) + 0.5)
        self.b = nn.Parameter(torch.randn(8))
        self.head = nn.Linear(8, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = x + self.mlp(self.norm(x))
        x = F.group_norm(x, 1, self.w, self.b)
        return self.head(x.mean((2, 3)))


def pool() -> nn.Module:
    torch.manual_seed(0)
    return randomize_norms(Pool()).eval()


def prove(model: nn.Module, ratio: float, **kw: Any) -> Tuple[torch.fx.GraphModule, fxprune.PruningPlan]:
    plan = fxprune.plan(model, ratio, example_inputs=(X,), **kw)
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    return pruned, plan


def stream_group(model: nn.Module, **kw: Any) -> fxprune.Group:
    return next(g for g in fxprune.find_groups(model, example_inputs=(X,), **kw) if "stem" in g.modules("out"))


def test_one_group_groupnorm_width_is_renormalising_and_pruned() -> None:
    model = pool()
    g = stream_group(model)
    assert g.prunable and g.renormalising and not g.exact
    assert any("num_groups=1" in n for n in g.norms)
    pruned, plan = prove(model, 0.5)
    assert pruned.get_submodule("norm").num_channels == 4 and pruned.get_submodule("norm").num_groups == 1
    assert pruned.get_submodule("stem").out_channels == 4 and plan.groups[[p.key for p in plan.groups].index(g.key)].renormalising


def test_the_reference_replaces_both_norms_by_masked_group_norm() -> None:
    model = pool()
    _, plan = prove(model, 0.5)
    ref = masked_reference(model, plan, example_inputs=(X,))
    assert sum(n.target is masked_group_norm for n in ref.graph.nodes) == 2
    assert not any(n.target is F.group_norm for n in ref.graph.nodes)


@pytest.mark.parametrize("how", ["module weight", "functional bias"])
def test_a_broken_one_group_rewrite_fails_the_proof(how: str) -> None:
    model = pool()
    pruned, plan = prove(model, 0.5)
    broken = copy.deepcopy(pruned)
    with torch.no_grad():
        t = broken.get_submodule("norm").weight if how == "module weight" else broken.get_parameter("b")
        t.copy_(t.roll(1))
    with pytest.raises(AssertionError):
        assert_equivalent(model, broken, plan, (X,), example_inputs=(X,))


def test_a_full_width_norm_over_zeroed_channels_fails_the_proof() -> None:
    """The exact contract's 'rewrite' (zero the removed channels, keep the norm at 8) is not the reference."""
    model = pool()
    _, plan = prove(model, 0.5)
    fake = fxprune.trace(copy.deepcopy(model))
    removed = [i for i in range(8) if i not in plan.keep("stem")]
    with torch.no_grad():
        for name in ("stem.weight", "stem.bias", "mlp.2.weight", "mlp.2.bias", "norm.weight", "norm.bias", "w", "b"):
            fake.get_parameter(name)[removed] = 0
        fake.get_parameter("mlp.0.weight")[:, removed] = 0
        fake.get_parameter("head.weight")[:, removed] = 0
    with pytest.raises(AssertionError):
        assert_equivalent(model, fake, plan, (X,), example_inputs=(X,))


def test_exact_only_keeps_the_one_group_width_whole() -> None:
    model = pool()
    g = stream_group(model, allow_renormalising=False)
    assert not g.prunable and "allow_renormalising=False" in "".join(g.reasons)
    pruned, _ = prove(model, 0.5, allow_renormalising=False)
    assert pruned.get_submodule("norm").num_channels == 8


def test_masked_group_norm_is_group_norm_over_the_kept_channels() -> None:
    x = torch.randn(3, 5, 4, 2, dtype=torch.float64)
    x[:, 1] = float("nan")  # a removed channel never enters the statistics
    keep = torch.tensor([True, False, True, True, False])
    w, b = torch.randn(5, dtype=torch.float64), torch.randn(5, dtype=torch.float64)
    y = masked_group_norm(x, keep, w, b, 1e-5)
    torch.testing.assert_close(y[:, keep], F.group_norm(x[:, keep], 1, w[keep], b[keep], 1e-5))
    assert bool((y[:, ~keep] == 0).all())
    assert bool((masked_group_norm(x, torch.zeros(5, dtype=torch.bool)) == 0).all())
