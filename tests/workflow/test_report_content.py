"""Issue 15, "the report": what was pruned and what was not, every warning, the equal-training
control, and where a report came from (command line, versions, run.log sections, errors).

Every run uses a tiny conv net on a few hundred synthetic 28x28 images written to tmp_path, one
epoch each: seconds, like tests/workflow/test_reliability.py.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import re
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxprune
from fxprune.errors import FxPruneWarning
from fxprune.workflow.cli_args import build_parser, config_from_args
from fxprune.workflow.cli_args import main as cli_main
from fxprune.workflow.errors import ConfigError
from fxprune.workflow.report import (WarningLog, collect_warnings, command_line, git_commit, group_summary,
                                     reason_kind, render_markdown)
from fxprune.workflow.job import RunConfig, run, sweep

from .test_reliability import _tiny, _write_fmnist

HERE = "tests.workflow.test_report_content"
# The module (fxprune.workflow re-exports the function run under the same name).
run_module = importlib.import_module("fxprune.workflow.job")


class FrozenNet(nn.Module):
    """Four channel groups: two prunable, one frozen by an op without a channel rule (cumsum over
    the channels), one frozen because it is the model's output."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.conv3 = nn.Conv2d(16, 16, 3, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(16)
        self.fc = nn.Linear(16 * 14 * 14, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        x = torch.cumsum(x, 1) / 16
        x = torch.relu(self.bn3(self.conv3(x)))
        return self.fc(x.flatten(1))


class FunctionalNet(nn.Module):
    """Layers called as functions on weights computed across channels: fxprune can prune none."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, in_channels, 3, 3) * 0.3)
        self.head = nn.Parameter(torch.randn(num_classes, 8 * 14 * 14) * 0.01)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(F.conv2d(x, self.weight + self.weight.flip(0), stride=2, padding=1))
        return F.linear(x.flatten(1), self.head)


@pytest.fixture
def data(tmp_path: Path) -> Path:
    return _write_fmnist(tmp_path / "data")


def _train_calls(monkeypatch: pytest.MonkeyPatch) -> list[tuple[str, object, bool]]:
    """Record every training the run starts: (desc, its TrainConfig, whether a teacher distils)."""
    calls: list[tuple[str, object, bool]] = []
    real = run_module.train

    def counting(model, train_set, config, **kwargs):
        calls.append((config.desc, config, kwargs.get("teacher") is not None))
        return real(model, train_set, config, **kwargs)

    monkeypatch.setattr(run_module, "train", counting)
    return calls


# --------------------------------------------------------------------------------------------
# What was pruned and what was not
# --------------------------------------------------------------------------------------------
def test_the_report_lists_pruned_and_frozen_groups_layers_and_macs(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    report = run(_tiny(out, data, model=f"{HERE}:FrozenNet", epochs=0))
    saved = json.loads((out / "report.json").read_text())
    groups = saved["pruning"]["groups"]
    assert (groups["groups"], groups["pruned"], groups["frozen"], groups["kept_whole"]) == (4, 2, 2, 0)
    reasons = {r["reason"]: r for r in groups["frozen_reasons"]}
    assert set(reasons) == {"no channel rule for call_function torch.cumsum", "reaches the model output"}
    assert reasons["no channel rule for call_function torch.cumsum"]["examples"] == ["conv2"]
    assert reasons["no channel rule for call_function torch.cumsum"]["channels"] == 16
    assert {g["key"] for g in groups["frozen_groups"]} == {"conv2", "fc"}
    layers = {r["layer"]: r for r in saved["pruning"]["layers"]}
    assert {k: (v["channels_before"], v["channels_after"]) for k, v in layers.items()} == {
        "conv1": (8, 4), "conv2": (16, 16), "conv3": (16, 8), "fc": (10, 10)}
    # conv3 lost half its outputs and conv2 kept all: conv3's MACs halve; fc reads half the features.
    assert layers["conv3"]["macs_after"] * 2 == layers["conv3"]["macs_before"]
    assert layers["fc"]["macs_after"] * 2 == layers["fc"]["macs_before"]
    # The per-layer and per-stage MACs add up to the model's.
    stages = saved["pruning"]["stages"]
    assert sum(s["macs_before"] for s in stages) == report["baseline"]["macs"]
    assert sum(s["macs_after"] for s in stages) == report["pruned"]["macs"]
    assert sum(s["share_of_cut"] for s in stages) == pytest.approx(1.0)
    md = (out / "report.md").read_text()
    assert "Channel groups: 4: 2 pruned, 2 frozen" in md
    assert "| no channel rule for call_function torch.cumsum | 1 | 16 | `conv2` |" in md
    assert "| `conv3` | 16 → 8 |" in md and "| `conv2` | 16 → 16 |" in md
    assert "Where the MACs went" in md


def test_group_summary_counts_reasons_and_groups_kept_whole() -> None:
    model = FrozenNet().eval()
    example = torch.randn(1, 1, 28, 28)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        analysis = fxprune.analyze_model(model, example_inputs=(example,), ignore=("conv3",))
        plan = fxprune.plan(model, 0.5, example_inputs=(example,), ignore=("conv3",), round_to=8)
    summary = group_summary(analysis.groups, plan)
    # conv1 (8 channels) rounded to 8 keeps all of them: prunable, kept whole.
    assert (summary["pruned"], summary["frozen"], summary["kept_whole"]) == (0, 3, 1)
    assert summary["kept_whole_groups"] == [{"key": "conv1", "size": 8}]
    kinds = [r["reason"] for r in summary["frozen_reasons"]]
    assert "ignored module (--ignore)" in kinds
    assert reason_kind("reaches the model output at output") == "reaches the model output"


def test_a_model_where_nothing_could_be_pruned_says_so_at_the_top(tmp_path: Path, data: Path) -> None:
    out = tmp_path / "out"
    report = run(_tiny(out, data, model=f"{HERE}:FunctionalNet", epochs=0))
    assert report["pruned"]["achieved"]["nothing_pruned"]
    assert any(w["message"].startswith("nothing could be pruned") for w in report["warnings"])
    md = (out / "report.md").read_text()
    top = md.split("- Date:")[0]  # what comes before the first detail of the report
    assert "WARNING: nothing was pruned" in top and "fxprune: nothing could be pruned" in top
    assert "nothing could be pruned" in (out / "run.log").read_text()


# --------------------------------------------------------------------------------------------
# Every FxPruneWarning: in run.log and the report, collapsed and counted, on stderr once
# --------------------------------------------------------------------------------------------
def test_warnings_of_a_run_reach_the_report_and_the_log_and_stderr_once(
        tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    report = run(_tiny(out, data, model=f"{HERE}:FrozenNet", epochs=0, ignore=("no_such_layer",)))
    messages = {w["message"]: w for w in report["warnings"]}
    cumsum = [m for m in messages if "no channel rule for call_function torch.cumsum" in m]
    assert len(cumsum) == 1 and messages[cumsum[0]]["count"] == 1
    assert messages[cumsum[0]]["category"] == "FxPruneWarning"
    assert any("no_such_layer" in m for m in messages)
    err = capsys.readouterr().err
    assert err.count("no channel rule for call_function torch.cumsum") == 1
    log = (out / "run.log").read_text()
    assert "WARNING" in log and "no channel rule for call_function torch.cumsum" in log
    assert re.search(r"1x FxPruneWarning: channels left unpruned: no channel rule", log)
    md = (out / "report.md").read_text()
    assert f"## Warnings ({len(messages)} raised, {len(messages)} distinct)" in md
    assert "- 1x FxPruneWarning: channels left unpruned: no channel rule for call_function torch.cumsum" in md


def test_identical_warnings_are_counted_once_and_others_pass_through(caplog: pytest.LogCaptureFixture) -> None:
    log = WarningLog()
    with caplog.at_level(logging.WARNING, logger="fxprune.workflow"):
        with pytest.warns(DeprecationWarning, match="not ours"):
            with collect_warnings(log):
                for _ in range(3):
                    warnings.warn(FxPruneWarning("channels left unpruned: the same op"))
                warnings.warn(FxPruneWarning("another one"))
                warnings.warn("not ours", DeprecationWarning)
    assert log.to_list() == [
        {"category": "FxPruneWarning", "message": "channels left unpruned: the same op", "count": 3},
        {"category": "FxPruneWarning", "message": "another one", "count": 1}]
    assert log.total == 4 and len(log) == 2
    assert caplog.text.count("the same op") == 1  # logged (stderr, run.log) once, counted thrice
    md = render_markdown({"baseline": {"top1": 1.0, "top5": 2.0}, "pruned": {"top1": 1.0, "top5": 2.0},
                          "warnings": log.to_list()})
    assert "## Warnings (4 raised, 2 distinct)" in md and "- 3x FxPruneWarning: channels left unpruned" in md


# --------------------------------------------------------------------------------------------
# Honest accuracy: before fine-tuning, and the equal-training control
# --------------------------------------------------------------------------------------------
def test_the_control_is_trained_with_the_same_recipe_reported_and_cached(
        tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _train_calls(monkeypatch)
    out = tmp_path / "out"
    report = run(_tiny(out, data, distill=True))
    assert [c[0] for c in calls] == ["baseline", "fine-tune", "control"]
    (_, tune, tune_teacher), (_, control, control_teacher) = calls[1], calls[2]
    # Exactly the fine-tuning recipe (epochs, lr schedule, seed, augmentation, distillation).
    assert dataclasses.replace(control, desc="") == dataclasses.replace(tune, desc="")
    assert tune_teacher and control_teacher
    assert report["control"]["source"] == "trained" and report["control"]["epochs"] == 1
    assert report["control"]["samples"] == report["baseline"]["samples"]
    assert report["control"]["macs"] == report["baseline"]["macs"]
    equal = report["equal_training"]
    assert equal["pruning_cost_top1"] == pytest.approx(report["pruned"]["top1"] - report["control"]["top1"])
    assert equal["pruned_vs_baseline_top1"] == pytest.approx(report["pruned"]["top1"] - report["baseline"]["top1"])
    assert (out / "control" / "control_model.pt").is_file()
    md = (out / "report.md").read_text()
    assert "| | baseline | control (baseline + 1 epoch) | pruned (+ 1 epoch fine-tuning) |" in md
    c = report["control"]
    assert f"| top-1 accuracy (%) | {report['baseline']['top1']:.2f} | {c['top1']:.2f} | " in md
    assert "**Pruning cost at equal training:" in md and "pruned − control" in md
    assert "This mixes pruning with 1 epoch of extra training" in md
    before = report["pruned"]["top1_before_finetune"]
    assert f"| top-1 before fine-tuning, after BatchNorm recalibration (%) | - | - | {before:.2f} |" in md
    # Recalibration's own gain: the accuracy right after pruning is reported apart.
    right_after = report["pruned"]["top1_right_after_pruning"]
    assert report["pruned"]["bn_recalibrated"] and right_after is not None
    assert f"| top-1 right after pruning (%) | - | - | {right_after:.2f} |" in md

    # A second run (another ratio, same baseline and recipe) reuses the control: not retrained.
    calls.clear()
    again = run(_tiny(out, data, distill=True, ratio=0.3))
    assert [c[0] for c in calls] == ["fine-tune"]
    assert again["control"]["source"] == "cache" and again["control"]["top1"] == report["control"]["top1"]
    # Another fine-tuning recipe is another control.
    calls.clear()
    other = run(_tiny(out, data, distill=True, lr=0.02))
    assert [c[0] for c in calls] == ["fine-tune", "control"] and other["control"]["source"] == "trained"


def test_no_control_skips_it(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _train_calls(monkeypatch)
    out = tmp_path / "out"
    report = run(_tiny(out, data, control=False))
    assert [c[0] for c in calls] == ["baseline", "fine-tune"]
    assert report["control"] == {"skipped": "skipped with --no-control"} and "equal_training" not in report
    assert not (out / "control").exists()
    md = (out / "report.md").read_text()
    assert "No equal-training control (skipped with --no-control)" in md
    assert "mixes pruning with 1 epoch of extra training" in md
    # The command line and its validation.
    args = build_parser().parse_args(["run", "--no-control"])
    assert config_from_args(args).control is False
    assert config_from_args(build_parser().parse_args(["run"])).control is True
    with pytest.raises(ConfigError, match="--no-control"):
        RunConfig(control="no").validate()  # type: ignore[arg-type]


def test_a_killed_control_resumes_to_the_same_model(tmp_path: Path, data: Path) -> None:
    class Killed(Exception):
        pass

    whole = run(_tiny(tmp_path / "whole", data, epochs=2))
    calls: list[int] = []

    def kill_in_the_control(epoch: int, metrics: dict) -> None:
        calls.append(epoch)
        if len(calls) == 4:  # baseline 1 epoch, fine-tuning 2, then the control's first epoch
            raise Killed()

    killed = tmp_path / "killed"
    with pytest.raises(Killed):
        run(_tiny(killed, data, epochs=2), on_epoch_end=kill_in_the_control)
    assert (killed / "control" / "checkpoint.pt").is_file() and not (killed / "report.json").exists()
    resumed = run(_tiny(killed, data, epochs=2, resume=True))
    assert resumed["control"]["top1"] == whole["control"]["top1"]
    assert resumed["control"]["loss"] == pytest.approx(whole["control"]["loss"], rel=1e-6)


def test_a_sweep_shows_one_control_for_all_points(tmp_path: Path, data: Path,
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    calls = _train_calls(monkeypatch)
    summary = sweep(_tiny(tmp_path / "out", data), [0.3, 0.6], ["l1"])
    assert [c[0] for c in calls].count("control") == 1
    assert summary["control"]["top1"] is not None and summary["control"]["source"] == "trained"
    md = (tmp_path / "out" / "sweep.md").read_text()
    assert "| control (baseline + 1 epoch, same recipe) |" in md and "Pruning cost at equal training" in md
    point = json.loads((tmp_path / "out" / "l1-r0.3" / "report.json").read_text())
    assert point["control"]["top1"] == summary["control"]["top1"]


# --------------------------------------------------------------------------------------------
# Where a report came from: command line, versions, run.log sections, errors
# --------------------------------------------------------------------------------------------
def test_the_report_records_command_line_and_versions(tmp_path: Path, data: Path,
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    out = tmp_path / "out"
    argv = ["/usr/local/bin/fxprune", "run", "--model", f"{HERE}:FrozenNet", "--data", str(data),
            "--baseline-epochs", "1", "--epochs", "0", "--batch-size", "50", "--no-compile", "--latency-runs",
            "1", "--threads", "1", "--quiet", "--out", str(out)]
    monkeypatch.setattr(sys, "argv", argv)
    assert cli_main(argv[1:]) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["command"] == "fxprune " + " ".join(argv[1:]) and report["argv"] == argv
    software = report["software"]
    assert software["fxprune"] == fxprune.__version__ and software["torch"] == torch.__version__
    import torchvision

    assert software["torchvision"] == torchvision.__version__
    md = (out / "report.md").read_text()
    assert f"- Command: `fxprune run --model {HERE}:FrozenNet" in md
    assert f"- Software: fxprune {fxprune.__version__}" in md and f"torch {torch.__version__}" in md
    # Run from this checkout: its commit.
    repo = Path(fxprune.__file__).resolve().parents[1]
    head = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True)
    if head.returncode == 0 and (repo / ".git").exists():
        assert software["git"]["commit"] == head.stdout.strip()
        assert f"(git {head.stdout.strip()[:12]}" in md


def test_git_commit_and_command_line_never_fail(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert git_commit(tmp_path) is None  # not a checkout (an installed wheel)
    (tmp_path / ".git").write_text("gitdir: /nowhere\n")
    assert git_commit(tmp_path) is None  # a broken one

    def no_git(*args, **kwargs):
        raise FileNotFoundError("git")

    monkeypatch.setattr(subprocess, "run", no_git)
    assert git_commit(Path(fxprune.__file__).resolve().parents[1]) is None  # no git installed
    assert command_line(["/x/fxprune/__main__.py", "run", "--out", "a b"]) == "python -m fxprune run --out 'a b'"
    assert command_line(["/x/bin/fxprune", "sweep"]) == "fxprune sweep"
    assert command_line(["bench.py", "--x"]) == "python bench.py --x"
    assert command_line([]) == ""


def test_run_log_has_a_dated_section_per_run_and_records_the_error_that_stopped_one(
        tmp_path: Path, data: Path, capsys: pytest.CaptureFixture) -> None:
    out = tmp_path / "out"
    run(_tiny(out, data, epochs=0))
    run(_tiny(out, data, epochs=0, ratio=0.3))
    log = (out / "run.log").read_text()
    headers = re.findall(r"^fxprune run started (\S+)\ncommand line: (.*)$", log, flags=re.M)
    assert len(headers) == 2 and all(re.match(r"\d{4}-\d\d-\d\dT", date) for date, _ in headers)
    assert all(line == command_line() for _, line in headers)
    # A run stopped by a user error (a model with the wrong class count, found after the log opened).
    (tmp_path / "five.py").write_text(f"from {HERE} import FrozenNet\ndef build():\n    return FrozenNet(1, 5)\n")
    sys.path.insert(0, str(tmp_path))
    try:
        status = cli_main(["run", "--model", "five:build", "--data", str(data), "--out", str(out), "--quiet",
                           "--no-compile", "--threads", "1"])
    finally:
        sys.path.remove(str(tmp_path))
        sys.modules.pop("five", None)
    assert status == 2
    err = capsys.readouterr().err
    assert err.count("returns (1, 5) for one image") == 1  # printed once, by the CLI, not also by the log
    sections = (out / "run.log").read_text().split("fxprune run started ")
    assert len(sections) == 4  # text before the first header, then three runs
    assert "ERROR" in sections[-1] and "run stopped by an error (ConfigError): --model five:build" in sections[-1]
    assert "returns (1, 5) for one image" in sections[-1]
