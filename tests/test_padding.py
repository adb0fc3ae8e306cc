"""Padding modules (``nn.ZeroPad2d``, ``nn.ReflectionPad1d``, ...) pass channels through like ``F.pad``.

segmentation-models-pytorch's EfficientNet encoder pads every depthwise conv's input with a
``ZeroPad2d`` module: without a rule each block stayed whole. A padding module pads the last
1-3 dims; where the channel dim is one of them, it adds channels and is refused (fail closed).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn as nn

import fxprune
from fxprune.rules import PAD_MODULES
from fxprune.testing import assert_equivalent
from tests.zoo import assert_rolled_weight_fails, init_normal

pytestmark = pytest.mark.usefixtures("one_thread")

X = torch.randn(2, 3, 8, 8)


class PaddedDepthwise(nn.Module):
    def __init__(self, pad: nn.Module) -> None:
        super().__init__()
        self.expand = nn.Conv2d(3, 8, 1)
        self.bn = nn.BatchNorm2d(8)
        self.pad = pad
        self.dw = nn.Conv2d(8, 8, 3, groups=8)
        self.project = nn.Conv2d(8, 4, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.project(self.dw(self.pad(torch.relu(self.bn(self.expand(x))))))


def test_every_padding_module_has_the_rule() -> None:
    names = {cls.__name__ for cls in PAD_MODULES}
    assert {"ZeroPad2d", "ConstantPad3d", "ReflectionPad1d", "ReplicationPad2d", "CircularPad2d"} <= names


@pytest.mark.parametrize("pad", [nn.ZeroPad2d((1, 1, 0, 2)), nn.ConstantPad2d(1, 0.5), nn.ReflectionPad2d(1),
                                 nn.ReplicationPad2d((0, 1, 1, 0)), nn.CircularPad2d(1)], ids=lambda m: type(m).__name__)
def test_a_padded_depthwise_block_is_pruned_and_proven(pad: nn.Module) -> None:
    model = init_normal(PaddedDepthwise(pad))
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)
        plan = fxprune.plan(model, 0.5, example_inputs=(X,))
    pruned = fxprune.apply(model, plan, example_inputs=(X,))
    assert_equivalent(model, pruned, plan, (X,), example_inputs=(X,))
    assert pruned.get_submodule("dw").out_channels == 4
    assert_rolled_weight_fails(model, pruned, plan, (X,), "dw", 0)


def test_padding_the_channel_dim_is_refused() -> None:
    class ChannelsLast(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(6, 8)
            self.pad = nn.ZeroPad1d((0, 2))  # pads the last dim: the channels
            self.out = nn.Linear(10, 3)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.out(self.pad(self.fc(x)))

    model = init_normal(ChannelsLast())
    x = torch.randn(2, 5, 6)
    with pytest.warns(fxprune.FxPruneWarning, match="padding of the channel dim"):
        groups = {g.key: g for g in fxprune.find_groups(model, example_inputs=(x,))}
    assert not groups["fc"].prunable
    with pytest.raises(fxprune.FxPruneError):
        fxprune.find_groups(model, example_inputs=(x,), strict=True)
