"""Model building and weights loading: local files, torchvision cache, clear errors."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import fxprune
from fxprune.cost import count_macs, count_params
from fxprune.testing import assert_equivalent
from fxprune.workflow.errors import CheckpointError, ConfigError
from fxprune.workflow.models import build_model, load_checkpoint_file, load_weights

from .helpers import TinyNet


def test_default_model_is_resnet18_adapted_to_fashion_mnist() -> None:
    model = build_model("resnet18", num_classes=10, in_channels=1, image_size=28).eval()
    assert model.conv1.in_channels == 1 and model.conv1.kernel_size == (3, 3)
    assert model.fc.out_features == 10
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 10)
    # Only the stem and the head differ from torchvision's resnet18 (11.69 M parameters).
    assert count_params(model) == 11689512 - 3 * 64 * 49 + 1 * 64 * 9 - 512 * 990 - 990
    # The residual stages run at 7, 4, 2 and 1 pixels: ~33 MMACs per image.
    assert 30e6 < count_macs(model, torch.randn(1, 1, 28, 28)) < 36e6


def test_large_images_keep_the_imagenet_stem() -> None:
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=224)
    assert model.conv1.kernel_size == (7, 7) and model.conv1.in_channels == 3


def test_model_from_a_package_callable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "my_models.py").write_text(
        "import torch.nn as nn\n"
        "def small(num_classes=10, in_channels=3):\n"
        "    return nn.Sequential(nn.Conv2d(in_channels, 4, 3), nn.AdaptiveAvgPool2d(1),\n"
        "                         nn.Flatten(), nn.Linear(4, num_classes))\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("my_models:small", num_classes=7, in_channels=2, image_size=16)
    assert model(torch.randn(3, 2, 16, 16)).shape == (3, 7)
    sys.modules.pop("my_models", None)


def test_unknown_models_are_clear_errors() -> None:
    with pytest.raises(ConfigError, match="not a torchvision classification model"):
        build_model("resnet19")
    with pytest.raises(ConfigError, match="cannot import module"):
        build_model("no_such_package_xyz:make")


def _same_weights(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.mark.parametrize("layout", ["state_dict", "checkpoint", "ddp", "safetensors"])
def test_weights_from_a_local_file(tmp_path: Path, layout: str) -> None:
    torch.manual_seed(1)
    source = TinyNet()
    state = source.state_dict()
    path = tmp_path / "weights.pt"
    if layout == "state_dict":
        torch.save(state, path)
    elif layout == "checkpoint":
        torch.save({"model": state, "epoch": 3, "optimizer": {}}, path)
    elif layout == "ddp":
        torch.save({f"module.{k}": v for k, v in state.items()}, path)
    else:
        from safetensors.torch import save_file

        path = tmp_path / "weights.safetensors"
        save_file(state, str(path))
    torch.manual_seed(2)
    target = TinyNet()
    assert not _same_weights(source, target)
    load_weights(target, path)
    assert _same_weights(source, target)


def test_corrupt_checkpoint_is_a_clear_error(tmp_path: Path) -> None:
    good = tmp_path / "good.pt"
    torch.save(TinyNet().state_dict(), good)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    garbage = tmp_path / "garbage.pt"
    garbage.write_bytes(b"\x00\x01 this is not a checkpoint" * 10)
    for path in (truncated, garbage):
        with pytest.raises(CheckpointError) as info:
            load_weights(TinyNet(), path)
        assert str(path) in str(info.value) and "corrupt" in str(info.value)


def test_pickled_module_is_refused_not_executed(tmp_path: Path) -> None:
    # A whole pickled nn.Module needs code from the file: weights_only=True refuses it.
    path = tmp_path / "module.pt"
    torch.save(TinyNet(), path)
    with pytest.raises(CheckpointError, match="tensors-only"):
        load_checkpoint_file(path)


def test_missing_weights_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="does not exist"):
        load_weights(TinyNet(), tmp_path / "absent.pt")


def test_weights_of_another_shape_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "w.pt"
    torch.save(TinyNet(num_classes=5).state_dict(), path)
    with pytest.raises(CheckpointError, match=r"shape mismatch fc.weight: file \(5, 3136\)"):
        load_weights(TinyNet(num_classes=10), path)


def test_torchvision_weights_name_from_the_hub_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision.models as tvm

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))
    name = "ResNet18_Weights.IMAGENET1K_V1"
    model = build_model("resnet18", num_classes=1000, in_channels=3, image_size=224)
    with pytest.raises(CheckpointError, match="not in the torch hub cache"):
        load_weights(model, name)
    # Put a file where torchvision's download would have put it: it is used, nothing downloads.
    torch.manual_seed(3)
    cached_state = tvm.resnet18().state_dict()
    cached = tmp_path / "hub" / "checkpoints" / Path(tvm.ResNet18_Weights.IMAGENET1K_V1.url).name
    cached.parent.mkdir(parents=True)
    torch.save(cached_state, cached)
    load_weights(model, name)
    assert torch.equal(model.conv1.weight, cached_state["conv1.weight"])


def test_the_example_tiny_vit_is_a_model_the_job_builds_and_prunes(monkeypatch: pytest.MonkeyPatch) -> None:
    pytest.importorskip("timm")
    monkeypatch.chdir(Path(__file__).resolve().parents[2])  # the job imports from the current directory
    model = build_model("examples.tiny_vit:tiny_vit", num_classes=10, in_channels=1, image_size=28).eval()
    x = torch.randn(2, 1, 28, 28)
    assert tuple(model(x).shape) == (2, 10)
    groups = fxprune.find_groups(model, example_inputs=(x,))
    assert any(g.prunable and g.renormalising for g in groups)  # the embedding width
    assert sum(g.prunable and g.unit == 64 for g in groups) == 4  # whole heads, in every block
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    assert_equivalent(model, fxprune.apply(model, plan, example_inputs=(x,)), plan, (x,), example_inputs=(x,))
