"""fxprune.cost: parameters and MACs from torch.utils.flop_counter."""

from __future__ import annotations

import torch
import torchvision
from torch import nn

from fxprune.cost import count_flops, count_macs, count_params


def test_resnet18_matches_torchvision_published_numbers() -> None:
    model = torchvision.models.resnet18()
    # torchvision's model card: 11,689,512 parameters and 1.81 GFLOPS (multiply-adds).
    assert count_params(model) == 11689512
    macs = count_macs(model, torch.randn(1, 3, 224, 224))
    assert abs(macs - 1.814e9) / 1.814e9 < 0.01


def test_linear_macs_are_exact_and_scale_with_batch() -> None:
    layer = nn.Linear(20, 30)
    assert count_macs(layer, torch.randn(1, 20)) == 20 * 30
    assert count_macs(layer, (torch.randn(4, 20),)) == 4 * 20 * 30
    assert count_flops(layer, torch.randn(1, 20)) == 2 * 20 * 30


def test_counting_leaves_the_model_untouched() -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Dropout())
    model.train()
    model[2].eval()  # a deliberately mixed state must survive
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_macs(model, torch.randn(2, 3, 8, 8))
    assert model.training and model[1].training and not model[2].training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_shared_parameters_are_counted_once() -> None:
    embed = nn.Embedding(10, 4)
    head = nn.Linear(4, 10, bias=False)
    head.weight = embed.weight
    assert count_params(nn.ModuleList([embed, head])) == 40
