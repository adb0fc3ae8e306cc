"""The fxprune command's data-free subcommands."""

from __future__ import annotations

import pytest

from fxprune.cli import main


def test_groups_command_prints_the_resnet18_groups(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["groups"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("13 channel groups, 12 prunable")
    assert "group layer4.0.conv2 [512 ch, prunable]" in out


def test_prune_command_prints_before_after_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--ratio", "0.5", "--image-size", "64", "--runs", "2"]) == 0
    out = capsys.readouterr().out
    lines = {line.split()[0]: line.split() for line in out.splitlines() if line.strip()}
    params = lines["parameters"]
    assert int(params[1].replace(",", "")) == 11_689_512
    assert int(params[2].replace(",", "")) < 11_689_512 / 3  # ratio 0.5 leaves about a quarter
    assert "MACs" in lines and "size" in lines and "CPU" in lines
    assert "64 -> 32    layer1.0.conv1" in out
    assert "1000 (kept)  fc" in out


def test_bad_ratio_is_one_clear_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["prune", "--ratio", "1.5", "--image-size", "32"]) == 2
    assert "ratio must be in [0, 1), got 1.5" in capsys.readouterr().err
