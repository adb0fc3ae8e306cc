"""Chains of views and transposes that move the channels whole (MobileViT's unfold and fold).

MobileViT turns a feature map ``[B, C, H, W]`` into patches ``[B * P, N, C]`` through
``[B * C * n_h, p_h, n_w, p_w]``: no single view keeps the channel dim, but the chain moves each
channel as a block. fxprune runs the chain on element indices at the channel count it has and at
fewer, and claims it only if channel c lands at index c of one output dim with every other
coordinate read from the same place; the sizes that carry the channels are rewritten. Proven
against the masked reference; a shuffle is still refused; a broken rewrite fails the proof.
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.testing import assert_equivalent, randomize_norms
from tests.zoo import assert_rolled_weight_fails, init_normal

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(1, 3, 8, 8)


class Unfold(nn.Module):
    """conv -> unfold to patches (literal sizes, as torch.export writes them) -> Linear -> fold -> conv."""

    def __init__(self, last: int = -1) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 3, padding=1)
        self.mix = nn.Linear(12, 12)
        self.proj = nn.Conv2d(12, 5, 1)
        self.last = last

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)  # [1, 12, 8, 8], patches of 2 x 2
        x = x.reshape(12 * 4, 2, 4, 2).transpose(1, 2)
        x = x.reshape(1, 12, 16, 4).transpose(1, 3).reshape(4, 16, self.last)
        x = torch.relu(self.mix(x))
        x = x.contiguous().view(1, 4, 16, -1).transpose(1, 3).reshape(12 * 4, 4, 2, 2)
        x = x.transpose(1, 2).reshape(1, 12, 8, 8)
        return self.proj(x).mean((2, 3))


@pytest.mark.parametrize("last", [-1, 12], ids=["inferred", "literal"])
def test_an_unfold_and_fold_chain_is_pruned_and_proven(last: int) -> None:
    model = init_normal(Unfold(last))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(X,))}
        plan = fxprune.plan(model, 0.5, example_inputs=(X,))
        pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert groups["conv"].prunable and groups["mix"].prunable
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    assert pruned.get_submodule("conv").out_channels == 6 and pruned.get_submodule("mix").in_features == 6
    sizes = [tuple(a for a in n.args[1:] if not isinstance(a, torch.fx.Node)) if n.op == "call_method" else tuple(n.args[1])
             for n in pruned.graph.nodes if n.target in ("reshape", "view", torch.reshape)]
    assert (24, 2, 4, 2) in sizes and (1, 6, 16, 4) in sizes and (1, 6, 8, 8) in sizes
    assert_rolled_weight_fails(model, pruned, plan, (X,), "mix", 1)
    assert_rolled_weight_fails(model, pruned, plan, (X,), "conv", 0)


class Shuffle(nn.Module):
    """A channel shuffle written as view -> transpose -> view: it interleaves, it does not move blocks."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 12, 1)
        self.proj = nn.Conv2d(12, 5, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x).view(1, 3, 4, 8, 8).transpose(1, 2).reshape(1, 12, 8, 8)
        return self.proj(x).mean((2, 3))


def test_a_chain_that_interleaves_channels_is_not_claimed() -> None:
    groups = {g.key: g for g in fxprune.find_groups(init_normal(Shuffle()), example_inputs=(X,))}
    assert not groups["conv"].prunable


class ComputedSize(Unfold):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv(x)
        c = x.shape[1]
        x = x.reshape(c * 4, 2, 4, 2).transpose(1, 2)  # the channel count read at run time: not followed
        x = x.reshape(1, 12, 16, 4).transpose(1, 3).reshape(4, 16, -1)
        return self.mix(x).mean((0, 1))


def test_a_computed_size_where_the_channels_are_is_refused() -> None:
    with pytest.warns(fxprune.FxPruneWarning):
        groups = {g.key: g for g in fxprune.find_groups(init_normal(ComputedSize()), example_inputs=(X,))}
    assert not groups["conv"].prunable


def test_timm_mobilevit_prunes_its_transformer_widths_and_is_proven() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    net = randomize_norms(timm.create_model("mobilevit_xxs", pretrained=False, num_classes=10).eval())
    x = torch.randn(1, 3, 64, 64)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", fxprune.FxPruneWarning)  # traced through torch.export, said so
        groups = fxprune.find_groups(net, example_inputs=(x,))
        plan = fxprune.plan(net, 0.5, example_inputs=(x,))
        pruned = fxprune.apply(net, plan, example_inputs=(x,))
        assert_equivalent(net, pruned, plan, (x,), example_inputs=(x,))
    assert [g.key for g in groups if not g.prunable] == ["head.fc"]
    assert pruned.get_submodule("stages.2.1.conv_1x1").out_channels == 32
    for name, dim in (("stages.2.1.conv_1x1", 0), ("stages.2.1.transformer.0.attn.qkv", 1)):  # before, after the unfold
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", fxprune.FxPruneWarning)
            assert_rolled_weight_fails(net, pruned, plan, (x,), name, dim)
