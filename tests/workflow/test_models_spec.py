"""Issue 15: the workflow's artifacts load with ``fxprune.load(path)``; timm and your own models; ``--no-adapt``.

(b) a tiny ``fxprune run`` output and (c) ``fxprune prune --num-classes 10 --save`` load with no
``model=``, bit-identically; ``--model timm:<name>``; ``package.module:callable`` from the current
directory with only its declared keywords; the small-image stem swap is logged, recorded and can be
turned off; weights that only fit the unadapted model say so.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from dataclasses import fields
from pathlib import Path

import pytest
import torch
import torchvision

import fxprune
from fxprune.artifact import read_meta
from fxprune.cli import main as fxprune_main
from fxprune.workflow.cli_args import build_parser, config_from_args
from fxprune.workflow.errors import CheckpointError, ConfigError
from fxprune.workflow.models import build_model, check_model_name, load_weights, model_spec
from fxprune.workflow.report import load_pruned
from fxprune.workflow.job import RESULT_OPTIONS, RunConfig, run


def _tiny(out: Path, data: Path, **changes: object) -> RunConfig:
    """The run tests' tiny settings, on the synthetic Fashion-MNIST folder."""
    values = dict(data=str(data), baseline_epochs=1, epochs=1, batch_size=50, compile=False,
                  latency_runs=1, recalibration_batches=1, calibration_batches=1, quiet=True,
                  out=str(out), threads=1)
    values.update(changes)
    return RunConfig(**values)  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ (b) fxprune run


def test_the_run_artifact_loads_with_fxprune_load_alone(tmp_path: Path, fake_fmnist_dir: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "out"
    with caplog.at_level(logging.INFO, logger="fxprune"):
        report = run(_tiny(out, fake_fmnist_dir))
    # The stem swap is visible: logged, and recorded in report.json under model_build.
    assert "small-image stem" in caplog.text and "--no-adapt" in caplog.text
    saved = json.loads((out / "report.json").read_text())
    assert saved["model_build"]["small_image_stem"] is True
    assert saved["model_build"]["spec"] == {"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 10},
                                            "adapt": {"in_channels": 1, "small_image_stem": True}}
    assert saved["config"]["adapt"] is True and report["model_build"] == saved["model_build"]

    path = out / "pruned_model.fxprune"
    loaded = fxprune.load(path)  # the README recipe, with no model=
    reference = fxprune.load(path, model=build_model("resnet18", num_classes=10, in_channels=1, image_size=28))
    x = torch.randn(5, 1, 28, 28)
    assert torch.equal(loaded(x), reference(x))
    assert torch.equal(load_pruned(out)(x), loaded(x))  # the workflow helper still works


# ------------------------------------------------------------------------------------------ (c) fxprune prune


def test_prune_num_classes_save_loads_with_fxprune_load_alone(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    target = tmp_path / "pruned"
    code = fxprune_main(["prune", "--model", "resnet18", "--num-classes", "10", "--image-size", "32",
                         "--ratio", "0.3", "--runs", "1", "--save", str(target)])
    assert code == 0, capsys.readouterr().err
    assert read_meta(target)["model_spec"] == {"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    loaded = fxprune.load(target)
    assert loaded.fc.out_features == 10
    reference = fxprune.load(target, model=torchvision.models.resnet18(num_classes=10))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(loaded(x), reference(x))


# ------------------------------------------------------------------------------------------ timm and callables


def test_timm_models_build_for_the_data_and_unknown_names_are_clear() -> None:
    pytest.importorskip("timm")
    model = build_model("timm:resnet10t", num_classes=7, in_channels=1, image_size=28).eval()
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 7)
    assert str(model_spec("timm:resnet10t", num_classes=7, in_channels=1, image_size=28)) == \
        "timm:resnet10t(num_classes=7, in_chans=1)"
    with pytest.raises(ConfigError, match="not a timm model name"):
        check_model_name("timm:no_such_net_xyz")


def test_a_callable_in_the_current_directory_gets_only_its_declared_keywords(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_cwd_models_xyz.py").write_text(
        "import torch\n"
        "def build(num_classes: int = 3, **kwargs):\n"
        "    assert not kwargs, kwargs  # a timm-style factory: in_channels would break it\n"
        "    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.Flatten(), torch.nn.LazyLinear(num_classes))\n")
    monkeypatch.chdir(tmp_path)
    # As under the ``fxprune`` console script: the current directory is not on sys.path.
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", ".", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "my_cwd_models_xyz", raising=False)
    check_model_name("my_cwd_models_xyz:build")
    model = build_model("my_cwd_models_xyz:build", num_classes=5, in_channels=1, image_size=8)
    assert model[0].in_channels == 1 and model_spec("my_cwd_models_xyz:build") is None


# ------------------------------------------------------------------------------------------ --no-adapt


def test_no_adapt_keeps_the_imagenet_stem_and_is_a_validated_result_option(caplog: pytest.LogCaptureFixture) -> None:
    args = build_parser().parse_args(["run", "--no-adapt"])
    config = config_from_args(args)
    assert config.adapt is False and config_from_args(build_parser().parse_args(["run"])).adapt is True
    assert "adapt" in RESULT_OPTIONS and "adapt" in {f.name for f in fields(RunConfig)}
    assert config.result_options()["adapt"] is False
    with pytest.raises(ConfigError, match="--no-adapt"):
        RunConfig(adapt="no").validate()  # type: ignore[arg-type]
    with caplog.at_level(logging.INFO, logger="fxprune"):
        model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28, adapt_small_images=False)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 1
    assert "keeps its ImageNet stem" in caplog.text
    assert model_spec("resnet18", num_classes=10, in_channels=1, image_size=28, adapt_small_images=False).adapt == \
        {"in_channels": 1}


def test_weights_that_fit_only_the_unadapted_model_say_pass_no_adapt(tmp_path: Path, fake_fmnist_dir: Path,
                                                                      capsys: pytest.CaptureFixture) -> None:
    weights = tmp_path / "imagenet_stem.pt"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=28,
                           adapt_small_images=False).state_dict(), weights)
    spec = model_spec("resnet18", num_classes=10, in_channels=1, image_size=28)
    with pytest.raises(CheckpointError, match="these weights fit resnet18 without the small-image adaptation; "
                                              "pass --no-adapt"):
        load_weights(build_model("resnet18", num_classes=10, in_channels=1, image_size=28), weights, spec=spec)
    # The whole command: one line, before any training; with --no-adapt the same weights load.
    args = ["run", "--data", str(fake_fmnist_dir), "--weights", str(weights), "--out", str(tmp_path / "o"),
            "--epochs", "0", "--no-compile", "--latency-runs", "1", "--quiet", "--threads", "1"]
    assert fxprune_main(args) == 2
    err = capsys.readouterr().err
    assert "these weights fit resnet18 without the small-image adaptation; pass --no-adapt" in err
    assert len(err.strip().splitlines()) == 1
    # And the reverse: adapted weights under --no-adapt.
    adapted = tmp_path / "small_stem.pt"
    torch.save(build_model("resnet18", num_classes=10, in_channels=1, image_size=28).state_dict(), adapted)
    with pytest.raises(CheckpointError, match="drop --no-adapt"):
        load_weights(build_model("resnet18", num_classes=10, in_channels=1, image_size=28, adapt_small_images=False),
                     adapted, spec=model_spec("resnet18", num_classes=10, in_channels=1, image_size=28,
                                              adapt_small_images=False))


def test_a_no_adapt_run_records_it_and_its_artifact_loads(tmp_path: Path, fake_fmnist_dir: Path) -> None:
    out = tmp_path / "out"
    report = run(_tiny(out, fake_fmnist_dir, adapt=False, epochs=0, limit=100))
    assert report["model_build"]["small_image_stem"] is False
    loaded = fxprune.load(out / "pruned_model.fxprune")
    assert loaded.conv1.kernel_size == (7, 7)
    reference = load_pruned(out)
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(loaded(x), reference(x))
    assert os.path.isfile(out / "report.json")
