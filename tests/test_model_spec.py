"""Issue 15: every artifact records a declarative model spec, so ``fxprune.load(path)`` needs no ``model=``.

The spec (fxprune.modelspec) is a constructor from an allow-list (torchvision, timm) plus typed,
bounded JSON arguments and fxprune's own adaptations; a spec that names code, has the wrong
types or huge numbers is an ArtifactError and nothing is imported.
"""

from __future__ import annotations

import json
import sys
import warnings
from pathlib import Path
from typing import Any, Dict, Iterator

import pytest
import torch
import torchvision

import fxprune
import fxprune.artifact as artifact
from fxprune.artifact import ArtifactError, read_meta
from fxprune.modelspec import MAX_CLASSES, ModelSpec, ModelSpecError


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> Iterator[None]:
    yield


def _prune(model: torch.nn.Module, x: torch.Tensor, ratio: float = 0.5) -> Any:
    model.eval()
    plan = fxprune.plan(model, ratio, example_inputs=(x,))
    return fxprune.apply(model, plan, example_inputs=(x,)).eval(), plan


def _randomise_bn(model: torch.nn.Module) -> None:
    """Non-trivial BatchNorm statistics, so a round trip that lost them would show."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.running_mean.copy_(torch.rand(m.running_mean.shape, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=g) + 0.5)


@pytest.fixture(scope="module")
def resnet10() -> Dict[str, Any]:
    """A 10-class torchvision resnet18, pruned and saved with its spec (built once)."""
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=10)
    _randomise_bn(model)
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = _prune(model, x)
    return {"pruned": pruned, "plan": plan, "x": x}


def _save(tmp_path: Path, case: Dict[str, Any], name: str = "a.fxprune", **kwargs: Any) -> Path:
    return Path(fxprune.save(case["pruned"], tmp_path / name, plan=case["plan"], example_inputs=(case["x"],),
                             **kwargs))


# ------------------------------------------------------------------------------------------ (a) round trips


def test_load_without_model_rebuilds_a_10_class_torchvision_model(tmp_path: Path, resnet10: Dict[str, Any]) -> None:
    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10})
    path = _save(tmp_path, resnet10, spec=spec, source="torchvision:resnet18")
    meta = read_meta(path)
    assert meta["model_spec"] == {"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 10}}
    loaded = fxprune.load(path)  # no model=: the spec says how to rebuild it
    x = torch.randn(4, 3, 32, 32)
    assert torch.equal(loaded(x), resnet10["pruned"](x))
    assert loaded.meta[artifact.SPEC_META_KEY] == spec
    # A loaded model carries its spec: saving it again records it again.
    again = Path(fxprune.save(loaded, tmp_path / "again.fxprune"))
    assert read_meta(again)["model_spec"] == meta["model_spec"]
    assert torch.equal(fxprune.load(again)(x), resnet10["pruned"](x))


def test_a_spec_given_as_a_dict_and_the_default_from_a_torchvision_source(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = torchvision.models.resnet18()
    x = torch.randn(1, 3, 32, 32)
    pruned, plan = _prune(model, x, 0.3)
    case = {"pruned": pruned, "plan": plan, "x": x}
    path = _save(tmp_path, case, source="resnet18")  # default spec: torchvision:resnet18()
    assert read_meta(path)["model_spec"] == {"constructor": "torchvision:resnet18", "kwargs": {}}
    assert torch.equal(fxprune.load(path)(x), pruned(x))
    path = _save(tmp_path, case, "b.fxprune", spec={"constructor": "torchvision:resnet18", "kwargs": {}})
    assert torch.equal(fxprune.load(path)(x), pruned(x))


def test_the_callers_model_still_wins(tmp_path: Path, resnet10: Dict[str, Any]) -> None:
    path = _save(tmp_path, resnet10, spec=ModelSpec("torchvision:resnet18", {"num_classes": 10}))
    x = torch.randn(2, 3, 32, 32)
    assert torch.equal(fxprune.load(path, model=torchvision.models.resnet18(num_classes=10))(x),
                       resnet10["pruned"](x))
    with pytest.raises(ArtifactError, match="does not fit"):
        fxprune.load(path, model="resnet18")  # 1000 classes: model= is used, not the spec
    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10})
    assert torch.equal(fxprune.load(path, model=spec)(x), resnet10["pruned"](x))


def test_a_spec_that_does_not_rebuild_the_model_is_refused_at_save(tmp_path: Path, resnet10: Dict[str, Any]) -> None:
    with pytest.raises(ArtifactError, match="does not rebuild the model being saved"):
        _save(tmp_path, resnet10, spec=ModelSpec("torchvision:resnet18"))  # 1000 classes
    assert not (tmp_path / "a.fxprune").exists()
    # Derived from source= alone: left out with a warning, the artifact is still written.
    with pytest.warns(fxprune.FxPruneWarning, match="no model spec recorded"):
        path = _save(tmp_path, resnet10, source="torchvision:resnet18")
    assert read_meta(path)["model_spec"] is None


def test_adapted_resnet_spec_round_trip(tmp_path: Path) -> None:
    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10}, {"in_channels": 1, "small_image_stem": True})
    torch.manual_seed(0)
    model = spec.build()
    assert model.conv1.kernel_size == (3, 3) and model.conv1.in_channels == 1
    _randomise_bn(model)
    x = torch.randn(1, 1, 28, 28)
    pruned, plan = _prune(model, x)
    path = _save(tmp_path, {"pruned": pruned, "plan": plan, "x": x}, spec=spec)
    xs = torch.randn(3, 1, 28, 28)
    assert torch.equal(fxprune.load(path)(xs), pruned(xs))


# ------------------------------------------------------------------------------------------ (d) timm


def test_load_without_model_rebuilds_a_timm_model(tmp_path: Path) -> None:
    pytest.importorskip("timm")
    spec = ModelSpec("timm:resnet10t", {"num_classes": 10, "in_chans": 1})
    torch.manual_seed(0)
    model = spec.build()
    _randomise_bn(model)
    x = torch.randn(1, 1, 32, 32)
    pruned, plan = _prune(model, x)
    path = _save(tmp_path, {"pruned": pruned, "plan": plan, "x": x}, spec=spec, source="timm:resnet10t")
    loaded = fxprune.load(path)
    xs = torch.randn(3, 1, 32, 32)
    assert torch.equal(loaded(xs), pruned(xs))


def test_loading_a_model_whose_graph_depends_on_its_mode_says_nothing(tmp_path: Path) -> None:
    # timm's BatchNormAct2d reads self.training in Python; the freshly built architecture the
    # plan is replayed on is in train mode, which the user never chose: no warning about it.
    pytest.importorskip("timm")
    spec = ModelSpec("timm:mobilenetv3_small_050", {"num_classes": 10, "in_chans": 1})
    torch.manual_seed(0)
    model = spec.build().eval()
    x = torch.randn(1, 1, 32, 32)
    pruned, plan = _prune(model, x)
    path = _save(tmp_path, {"pruned": pruned, "plan": plan, "x": x}, spec=spec, source="timm:mobilenetv3_small_050")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        loaded = fxprune.load(path)
    assert [str(w.message) for w in caught if issubclass(w.category, fxprune.FxPruneWarning)] == []
    xs = torch.randn(2, 1, 32, 32)
    assert torch.equal(loaded.eval()(xs), pruned.eval()(xs))


# ------------------------------------------------------------------------------------------ malicious specs


EVIL = "fxprune_evil_spec_module"


@pytest.fixture
def evil_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An importable module that leaves a marker file when imported: it must never be."""
    folder = tmp_path / "evil"
    folder.mkdir()
    marker = tmp_path / "imported"
    (folder / f"{EVIL}.py").write_text(f"open({str(marker)!r}, 'w').write('x')\nbuild = lambda **kw: None\n")
    monkeypatch.syspath_prepend(str(folder))
    return marker


BAD_SPECS = [
    ({"constructor": f"{EVIL}:build"}, "not one fxprune builds"),
    ({"constructor": f"{EVIL}.sub:build", "kwargs": {}}, "not one fxprune builds"),
    ({"constructor": "os:system"}, "not one fxprune builds"),
    ({"constructor": "torchvision.models:resnet18"}, "not one fxprune builds"),
    ({"constructor": "builtins:eval"}, "not one fxprune builds"),
    ({"constructor": "resnet18"}, "not one fxprune builds"),
    ({"constructor": f"torchvision:{EVIL}.build"}, "plain model name"),
    ({"constructor": "torchvision:resnet18(); import os"}, "plain model name"),
    ({"constructor": "timm:../../x"}, "plain model name"),
    ({"constructor": "torchvision:" + "a" * 200}, "must be a string"),
    ({"constructor": 18}, "must be a string"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": "10"}}, r"kwargs.num_classes must be an integer"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": True}}, r"kwargs.num_classes must be an integer"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 10.5}}, r"kwargs.num_classes must be an integer"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": [10]}}, r"kwargs.num_classes must be an integer"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 10 ** 12}}, r"in \[1, 100000\]"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"num_classes": 0}}, r"in \[1, 100000\]"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"weights": "IMAGENET1K_V1"}}, "not an argument"),
    ({"constructor": "torchvision:resnet18", "kwargs": {"block": f"{EVIL}:build"}}, "not an argument"),
    ({"constructor": "timm:resnet10t", "kwargs": {"pretrained": True}}, "not an argument"),
    ({"constructor": "timm:resnet10t", "kwargs": {"in_chans": 1 << 40}}, r"in_chans must be an integer"),
    ({"constructor": "torchvision:resnet18", "kwargs": []}, "kwargs must be an object"),
    ({"constructor": "torchvision:resnet18", "adapt": {"in_channels": 0}}, "adapt.in_channels"),
    ({"constructor": "torchvision:resnet18", "adapt": {"small_image_stem": 1}}, "adapt.small_image_stem"),
    ({"constructor": "torchvision:resnet18", "adapt": {"code": f"{EVIL}:build"}}, "not an adaptation"),
    ({"constructor": "torchvision:resnet18", "factory": f"{EVIL}:build"}, "unknown field"),
    (f"{EVIL}:build", "must be an object"),
    ([1, 2], "must be an object"),
]


def _forge_spec(path: Path, spec: Any) -> None:
    # meta.json is not covered by its own sha256: a forger can write any spec into it.
    meta = json.loads((path / "meta.json").read_text())
    meta["model_spec"] = spec
    (path / "meta.json").write_text(json.dumps(meta))


@pytest.mark.parametrize("spec, message", BAD_SPECS)
def test_malformed_specs_are_artifact_errors_and_import_nothing(tmp_path: Path, resnet10: Dict[str, Any],
                                                                 evil_module: Path, spec: Any, message: str,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path, resnet10, spec=ModelSpec("torchvision:resnet18", {"num_classes": 10}))
    _forge_spec(path, spec)
    import pkgutil

    def no_resolve(name: str) -> Any:
        raise AssertionError(f"resolve_name({name!r}) called")

    monkeypatch.setattr(pkgutil, "resolve_name", no_resolve)
    with pytest.raises(ArtifactError, match=message) as info:
        read_meta(path)
    assert "model_spec" in str(info.value)
    with pytest.raises(ArtifactError, match=message):
        fxprune.load(path)
    assert EVIL not in sys.modules and not evil_module.exists()


def test_a_name_not_in_the_allow_list_is_refused_at_load(tmp_path: Path, resnet10: Dict[str, Any]) -> None:
    path = _save(tmp_path, resnet10, spec=ModelSpec("torchvision:resnet18", {"num_classes": 10}))
    _forge_spec(path, {"constructor": "torchvision:resnet19", "kwargs": {"num_classes": 10}})
    read_meta(path)  # well-formed: the allow-list is checked when the spec is used
    with pytest.raises(ArtifactError, match="'resnet19' is not a torchvision model name"):
        fxprune.load(path)
    _forge_spec(path, {"constructor": "timm:no_such_model_xyz"})
    with pytest.raises(ArtifactError, match="no_such_model_xyz"):
        fxprune.load(path)


def test_a_forged_spec_for_another_architecture_fails_before_any_weight_is_read(
        tmp_path: Path, resnet10: Dict[str, Any], monkeypatch: pytest.MonkeyPatch) -> None:
    path = _save(tmp_path, resnet10, spec=ModelSpec("torchvision:resnet18", {"num_classes": 10}))
    _forge_spec(path, {"constructor": "torchvision:resnet34", "kwargs": {"num_classes": 10}})

    def no_weights(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("weights read before the plan was checked")

    monkeypatch.setattr(artifact, "_load_weights", no_weights)
    with pytest.raises(ArtifactError, match="does not fit"):
        fxprune.load(path)


def test_model_spec_validates_when_built_in_code_too() -> None:
    with pytest.raises(ModelSpecError, match="not one fxprune builds"):
        ModelSpec("mypkg.nets:build")
    with pytest.raises(ModelSpecError, match=f"in \\[1, {MAX_CLASSES}\\]"):
        ModelSpec("torchvision:resnet18", {"num_classes": MAX_CLASSES + 1})
    spec = ModelSpec("torchvision:resnet18", {"num_classes": 10}, {"small_image_stem": True})
    assert ModelSpec.from_dict(json.loads(json.dumps(spec.to_dict()))) == spec
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert spec.build().fc.out_features == 10
