"""``fxprune run``'s global ranking: channels ranked across groups at the uniform plan's MACs.

benchmarks/ACCURACY_FULL.md measured this allocation (arm C) against uniform at the same MACs;
with Taylor scoring it was the most accurate recipe, so it is the job's default
(``--no-global-ranking`` gives the uniform one). Checked on a small CNN whose groups differ in
how much they matter.
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


def test_the_default_is_taylor_ranked_globally_and_the_uniform_fingerprint_is_kept() -> None:
    parser = build_parser()
    default = config_from_args(parser.parse_args(["run"]))
    assert default.global_ranking is True and default.importance == "taylor"
    assert config_from_args(parser.parse_args(["run", "--no-global-ranking"])).global_ranking is False
    assert config_from_args(parser.parse_args(["sweep", "--no-global-ranking"])).global_ranking is False
    assert config_from_args(parser.parse_args(["sweep"])).importance == "taylor"
    assert RunConfig().result_options()["global_ranking"] is True
    # Runs made while uniform was the only allocation keep their fingerprint (and still resume).
    assert "global_ranking" not in RunConfig(global_ranking=False).result_options()
    # A latency target allocates by measured cost: the switch cannot change its result.
    assert "global_ranking" not in RunConfig(target_latency=0.5).result_options()


def test_global_ranking_matches_the_uniform_macs_with_another_allocation() -> None:
    model = net()
    uniform = prune_model(model, RunConfig(global_ranking=False, importance="l1"), X)
    ranked = prune_model(model, RunConfig(importance="l1"), X)
    macs_u, macs_g = count_macs(uniform, (X,)), count_macs(ranked, (X,))
    assert abs(macs_g / macs_u - 1) <= 0.03  # the global search stops within a few channels of the target
    assert widths(uniform) == [32, 64, 32] and widths(ranked) != widths(uniform)


def test_the_default_taylor_scores_read_the_calibration_batches() -> None:
    model = net()
    calibration = [(torch.randn(4, 3, 16, 16), torch.randint(0, 10, (4,))) for _ in range(2)]
    pruned = prune_model(model, RunConfig(), X, calibration=calibration)
    other = prune_model(model, RunConfig(importance="l1"), X)
    assert abs(count_macs(pruned, (X,)) / count_macs(other, (X,)) - 1) <= 0.03
    assert widths(pruned) != [32, 64, 32]


def test_a_macs_target_is_ranked_globally_unless_asked_otherwise() -> None:
    model = net()
    full = count_macs(model, (X,))
    ranked = prune_model(model, RunConfig(importance="l1", target_macs=0.3), X)
    uniform = prune_model(model, RunConfig(importance="l1", target_macs=0.3, global_ranking=False), X)
    for pruned in (ranked, uniform):
        assert count_macs(pruned, (X,)) <= 0.3 * full * 1.01
    assert widths(ranked) != widths(uniform)


def test_the_switch_must_be_a_bool() -> None:
    with pytest.raises(ConfigError, match="--global-ranking"):
        RunConfig(global_ranking="yes").validate()  # type: ignore[arg-type]


def widths(model: nn.Module) -> list[int]:
    return [model.get_submodule(k).out_channels for k in ("0", "2", "4")]
