"""``fxprune run --global-ranking``: channels ranked across groups at the uniform plan's MACs.

benchmarks/ACCURACY_FULL.md measured this allocation (arm C) against uniform at the same MACs;
the job exposes it. Checked on a small CNN whose groups differ in how much they matter.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fxprune.cost import count_macs
from fxprune.workflow.cli_args import build_parser, config_from_args
from fxprune.workflow.errors import ConfigError
from fxprune.workflow.job import RunConfig, prune_model

X = torch.randn(2, 3, 16, 16)


def net() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 64, 3, padding=1), nn.ReLU(), nn.Conv2d(64, 128, 3, padding=1), nn.ReLU(),
                          nn.Conv2d(128, 64, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(64, 10))
    with torch.no_grad():
        model[2].weight.mul_(torch.linspace(0.01, 3.0, 128).view(128, 1, 1, 1))  # uneven channel norms
    return model.eval()


def test_the_flag_parses_and_leaves_the_default_fingerprint_alone() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["run"])).global_ranking is False
    assert config_from_args(parser.parse_args(["run", "--global-ranking"])).global_ranking is True
    assert config_from_args(parser.parse_args(["sweep", "--global-ranking"])).global_ranking is True
    assert "global_ranking" not in RunConfig().result_options()
    assert RunConfig(global_ranking=True).result_options()["global_ranking"] is True


def test_global_ranking_matches_the_uniform_macs_with_another_allocation() -> None:
    model = net()
    uniform = prune_model(model, RunConfig(), X)
    ranked = prune_model(model, RunConfig(global_ranking=True), X)
    macs_u, macs_g = count_macs(uniform, (X,)), count_macs(ranked, (X,))
    assert abs(macs_g / macs_u - 1) <= 0.03  # the global search stops within a few channels of the target
    widths = lambda m: [m.get_submodule(k).out_channels for k in ("0", "2", "4")]  # noqa: E731
    assert widths(uniform) == [32, 64, 32] and widths(ranked) != widths(uniform)


def test_global_ranking_with_a_target_is_refused() -> None:
    with pytest.raises(ConfigError, match="--global-ranking"):
        RunConfig(global_ranking=True, target_macs=0.3).validate()
