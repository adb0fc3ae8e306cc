"""``--no-renormalising`` on the command line and the renormalising groups in the run's report.

A tiny patch-embedding net whose token width a LayerNorm normalises over (one renormalising
group) and an MLP hidden width (one exact group), on a few hundred synthetic 28x28 images:
seconds, like tests/workflow/test_report_content.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from fxprune import cli
from fxprune.workflow.cli_args import build_parser, config_from_args
from fxprune.workflow.report import group_summary, render_markdown
from fxprune.workflow.job import RunConfig, run

from .test_reliability import _tiny, _write_fmnist

HERE = "tests.workflow.test_renormalising_run"


class TokenNet(nn.Module):
    """Patch embedding (conv, stride 4) -> tokens -> LayerNorm -> residual MLP -> mean -> head."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(in_channels, 8, 4, stride=4)
        self.norm = nn.LayerNorm(8)
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)
        self.head = nn.Linear(8, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        t = self.stem(x).flatten(2).transpose(1, 2)
        t = t + self.fc2(torch.relu(self.fc1(self.norm(t))))
        return self.head(t.mean(1))


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _write_fmnist(tmp_path / "data")


def test_the_flag_parses_for_run_sweep_prune_and_groups() -> None:
    parser = build_parser()
    assert config_from_args(parser.parse_args(["run"])).renormalising is True
    for flag in ("--no-renormalising", "--exact-only"):
        assert config_from_args(parser.parse_args(["run", flag])).renormalising is False
        assert config_from_args(parser.parse_args(["sweep", flag])).renormalising is False
    top = cli.build_parser()
    assert top.parse_args(["prune", "--no-renormalising"]).renormalising is False
    assert top.parse_args(["prune"]).renormalising is True
    assert top.parse_args(["groups", "--exact-only"]).renormalising is False
    # The default leaves the result fingerprint as it was before the option existed.
    assert "renormalising" not in RunConfig().result_options()
    assert RunConfig(renormalising=False).result_options()["renormalising"] is False


def test_the_report_names_the_renormalising_groups_and_their_reference(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "renorm"
    report = run(_tiny(out, data, model=f"{HERE}:TokenNet", epochs=0))
    groups = json.loads((out / "report.json").read_text())["pruning"]["groups"]
    assert groups["renormalising_groups"] == [{"key": "stem", "size": 8, "kept": 4, "norms": ["LayerNorm norm"]}]
    assert report["config"]["renormalising"] is True
    md = (out / "report.md").read_text()
    assert "Renormalising groups (1): `stem` (8 -> 4 ch; LayerNorm norm)" in md
    assert "masked-norm reference" in md and "`fxprune.testing.masked_norm`" in md

    out = tmp_path / "exact"
    report = run(_tiny(out, data, model=f"{HERE}:TokenNet", epochs=0, renormalising=False))
    groups = report["pruning"]["groups"]
    assert groups["renormalising_groups"] == [] and report["config"]["renormalising"] is False
    assert {g["key"] for g in groups["frozen_groups"]} >= {"stem"}
    md = (out / "report.md").read_text()
    assert "Every pruned group is exact" in md and "Renormalising groups" not in md
    assert "allow_renormalising=False" in md  # the reason the stem's width stayed whole


def test_group_summary_lists_pruned_renormalising_groups_only() -> None:
    import fxprune

    model = TokenNet().eval()
    x = torch.randn(1, 1, 28, 28)
    analysis = fxprune.analyze_model(model, example_inputs=(x,))
    summary = group_summary(analysis.groups, fxprune.plan(model, 0.5, example_inputs=(x,)))
    assert [g["key"] for g in summary["renormalising_groups"]] == ["stem"]
    whole = group_summary(analysis.groups, fxprune.plan(model, 0.5, example_inputs=(x,), ignore=("stem",)))
    assert whole["renormalising_groups"] == []
    md = render_markdown({"baseline": {"top1": 1.0, "top5": 2.0}, "pruned": {"top1": 1.0, "top5": 2.0},
                          "pruning": {"groups": summary}})
    assert "Renormalising groups (1)" in md


def test_fxprune_prune_and_groups_honour_the_flag(capsys: pytest.CaptureFixture) -> None:
    model = f"{HERE}:TokenNet"
    assert cli.main(["prune", "--model", model, "--num-classes", "3", "--image-size", "28", "--runs", "1"]) == 0
    text = capsys.readouterr().out
    assert "(renormalising)" in text and "1 renormalising group(s)" in text
    assert cli.main(["prune", "--model", model, "--num-classes", "3", "--image-size", "28", "--runs", "1",
                     "--no-renormalising"]) == 0
    text = capsys.readouterr().out
    assert "exact rewrites only (--no-renormalising)" in text and "renormalising group" not in text
    assert cli.main(["groups", "--model", model, "--num-classes", "3", "--exact-only"]) == 0
    assert "allow_renormalising=False" in capsys.readouterr().out
