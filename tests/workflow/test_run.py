"""The whole job end to end: run, sweep, resume, clear errors, and torchrun with 2 processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fxprune.workflow.cli_args import main as cli_main
from fxprune.workflow.data import load_data
from fxprune.workflow.errors import DataNotFoundError
from fxprune.workflow.evaluate import evaluate_accuracy
from fxprune.workflow.report import load_pruned
from fxprune.workflow.job import RunConfig, run, sweep

from .helpers import needs_fmnist

fxprune = pytest.importorskip("fxprune")
needs_prune = pytest.mark.skipif(not callable(getattr(fxprune, "prune", None)),
                                 reason="fxprune.prune (the core pass) is not available yet")

REPO = Path(__file__).resolve().parents[2]


def _tiny(out: Path, **changes) -> RunConfig:
    """A few hundred samples, one epoch each, no torch.compile: seconds, not minutes."""
    values = dict(limit=400, baseline_epochs=1, epochs=1, batch_size=50, compile=False,
                  latency_runs=2, recalibration_batches=2, calibration_batches=2, quiet=True,
                  out=str(out), threads=1)
    values.update(changes)
    return RunConfig(**values)


@needs_prune
@needs_fmnist
def test_run_end_to_end_then_reuse_and_sweep(tmp_path: Path) -> None:
    out = tmp_path / "out"
    report = run(_tiny(out))
    data = json.loads((out / "report.json").read_text())
    for side in ("baseline", "pruned"):
        assert {"top1", "top5", "params", "macs", "size_mb", "latency_ms"} <= set(data[side])
        assert data[side]["samples"] == 400 and 0 <= data[side]["top1"] <= data[side]["top5"] <= 100
        assert data[side]["latency_ms"]["cpu/eager/b1"] > 0 and data[side]["latency_ms"]["cpu/eager/b32"] > 0
    assert {"config", "machine", "date"} <= set(data)
    # Baseline and pruned timed together: speed-up with spread, threads, busy flag per setting.
    assert {"speedup", "speedup_q25", "speedup_q75", "threads", "busy"} <= set(data["latency"]["settings"]["cpu/eager/b1"])
    assert "## Latency" in (out / "report.md").read_text()
    # Ratio 0.5 removes half the channels of every group: about 4x fewer MACs on resnet18.
    assert 3.5 < data["reduction"]["macs_x"] < 4.5
    assert data["pruned"]["params"] < data["baseline"]["params"] / 3
    assert data["pruned"]["size_mb"] < data["baseline"]["size_mb"] / 3
    assert data["baseline_source"]["source"] == "trained"
    for name in ("report.md", "channels.png", "run.log", "pruned_model.json", "pruned_model.py",
                 "baseline/baseline_model.pt", "finetune_checkpoint.pt"):
        assert (out / name).is_file(), name
    assert "| top-1 accuracy (%) |" in (out / "report.md").read_text()
    # The saved pruned model is the one that was evaluated: same accuracy when loaded back.
    loaded = load_pruned(out)
    bundle = load_data("fashion-mnist", limit=400)
    reloaded = evaluate_accuracy(loaded, bundle.test, classes=bundle.classes)
    assert reloaded.top1 == pytest.approx(report["pruned"]["top1"])

    # A second run in the same folder reuses the trained baseline instead of training again.
    again = run(_tiny(out, ratio=0.3))
    assert again["baseline_source"]["source"] == "cache"
    assert again["baseline"]["top1"] == report["baseline"]["top1"]
    assert "baseline_train" not in again["timings_s"]

    summary = sweep(_tiny(out), ratios=[0.3, 0.7], importances=["l2"])
    assert [(p["importance"], p["ratio"]) for p in summary["points"]] == [("l2", 0.3), ("l2", 0.7)]
    assert all(p["latency"]["settings"]["cpu/eager/b1"]["speedup"] > 0 for p in summary["points"])
    assert summary["baseline"]["latency_ms"]["cpu/eager/b1"] > 0  # median of the points' interleaved timings
    macs = [p["macs"] for p in summary["points"]]
    assert macs[1] < macs[0] < summary["baseline"]["macs"]
    for name in ("sweep.json", "sweep.md", "accuracy_vs_macs.png", "accuracy_vs_latency.png",
                 "l2-r0.7/report.json", "l2-r0.7/pruned_model.fxprune/weights.safetensors"):
        assert (out / name).is_file(), name


@needs_prune
def test_run_on_an_image_folder(tmp_path: Path) -> None:
    from .test_data import _write_pngs

    _write_pngs(tmp_path / "images" / "train", ("red", "green", "blue"), per_class=12, size=36)
    _write_pngs(tmp_path / "images" / "val", ("red", "green", "blue"), per_class=4, size=36)
    report = run(_tiny(tmp_path / "out", data=str(tmp_path / "images"), image_size=32, batch_size=12,
                       baseline_epochs=2))
    assert report["data"]["name"] == "imagefolder" and report["data"]["num_classes"] == 3
    assert report["baseline"]["samples"] == 12
    assert set(report["pruned"]["per_class"]) == {"red", "green", "blue"}
    assert report["pruned"]["macs"] < report["baseline"]["macs"]


class _Killed(Exception):
    pass


@needs_prune
@needs_fmnist
def test_resume_a_twice_killed_run_gives_the_same_pruned_model(tmp_path: Path) -> None:
    config = dict(limit=300, baseline_epochs=2, epochs=2)
    run(_tiny(tmp_path / "whole", **config))

    def kill_at(call: int):
        calls = []

        def callback(epoch: int, metrics: dict) -> None:
            calls.append(epoch)
            if len(calls) == call:
                raise _Killed()

        return callback

    killed = tmp_path / "killed"
    # Killed after the baseline's first epoch...
    with pytest.raises(_Killed):
        run(_tiny(killed, **config), on_epoch_end=kill_at(1))
    assert not (killed / "baseline" / "baseline_model.pt").exists()
    # ...resumed, and killed again after the first fine-tuning epoch (call 1: the baseline's
    # remaining epoch, call 2: fine-tuning epoch 0)...
    with pytest.raises(_Killed):
        run(_tiny(killed, resume=True, **config), on_epoch_end=kill_at(2))
    assert not (killed / "report.json").exists()
    # ...and resumed to the end: the same model as the run that was never interrupted.
    resumed = run(_tiny(killed, resume=True, **config))
    assert resumed["baseline_source"]["source"] == "cache"
    whole = json.loads((tmp_path / "whole" / "report.json").read_text())
    assert resumed["baseline"]["top1"] == whole["baseline"]["top1"]
    assert resumed["pruned"]["top1"] == whole["pruned"]["top1"]
    a, b = load_pruned(tmp_path / "whole").state_dict(), load_pruned(killed).state_dict()
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_missing_data_is_one_clear_message(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    missing = tmp_path / "no-data"
    with pytest.raises(DataNotFoundError, match="apt-get install dataset-fashion-mnist"):
        run(_tiny(tmp_path / "out", data=str(missing)))
    status = cli_main(["run", "--data", str(missing), "--out", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err
    assert status == 2
    assert err.startswith("fxprune: error: ") and str(missing) in err and "Traceback" not in err


def test_bad_options_are_clear_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert cli_main(["run", "--ratio", "1.5", "--out", str(tmp_path)]) == 2
    assert "--ratio must be in [0, 1)" in capsys.readouterr().err
    assert cli_main(["run", "--target-macs", "3", "--out", str(tmp_path)]) == 2
    assert "fraction of the baseline's MACs" in capsys.readouterr().err


@needs_prune
@needs_fmnist
def test_torchrun_two_processes_gloo(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "fxprune.workflow.cli_args", "run", "--limit", "256", "--baseline-epochs", "1",
               "--epochs", "1", "--batch-size", "32", "--no-compile", "--latency-runs", "2",
               "--device", "cpu", "--quiet", "--out", str(out)]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((out / "report.json").read_text())
    assert report["distributed"] == {"world_size": 2, "backend": "gloo"}
    # Accuracy is all-reduced over both shards: every held-out sample counted once.
    assert report["baseline"]["samples"] == report["pruned"]["samples"] == 256
    assert report["reduction"]["macs_x"] > 3
    # Only rank 0 wrote: one log, no temp files left.
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []


def test_cli_help_and_config_mapping(capsys: pytest.CaptureFixture) -> None:
    from fxprune.workflow.cli_args import build_parser, config_from_args

    parser = build_parser()
    with pytest.raises(SystemExit):
        parser.parse_args(["run", "--help"])
    text = capsys.readouterr().out
    for flag in ("--model", "--weights", "--data", "--ratio", "--target-macs", "--importance",
                 "--round-to", "--epochs", "--lr", "--batch-size", "--distill", "--device", "--out",
                 "--resume", "--download", "--quiet", "examples:", "torchrun"):
        assert flag in text, flag
    args = parser.parse_args(["run", "--ratio", "0.3", "--round-to", "8", "--distill", "--ignore", "fc,conv1"])
    config = config_from_args(args)
    assert (config.ratio, config.round_to, config.distill, config.ignore) == (0.3, 8, True, ("fc", "conv1"))
    sweep_args = parser.parse_args(["sweep", "--ratios", "0.2,0.4", "--importances", "l1,fpgm"])
    assert sweep_args.ratios == [0.2, 0.4] and sweep_args.importances == ["l1", "fpgm"]
    assert config_from_args(sweep_args).ratio == 0.2
