"""fxprune.save / fxprune.load: bit-identical round trips, no unpickling, clear errors."""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import warnings
from pathlib import Path
from typing import Callable, Tuple

import pytest
import torch
import torch.nn as nn
import torchvision
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fxprune
from fxprune.artifact import ArtifactError, read_meta, read_plan

X = torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class MixNet(nn.Module):
    """A concat, a depthwise separable block and a squeeze-excite gate, then a Linear head."""

    def __init__(self, k: int = 3) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 16, k, padding=k // 2, bias=False), nn.BatchNorm2d(16), nn.ReLU())
        self.a = nn.Conv2d(16, 8, 1)
        self.b = nn.Conv2d(16, 12, 3, padding=1)
        self.dw = nn.Conv2d(20, 20, 3, padding=1, groups=20, bias=False)
        self.dw_bn = nn.BatchNorm2d(20)
        self.pw = nn.Conv2d(20, 24, 1)
        self.se_reduce = nn.Conv2d(24, 6, 1)
        self.se_expand = nn.Conv2d(6, 24, 1)
        self.fc = nn.Linear(24, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        x = torch.cat([self.a(x), self.b(x)], dim=1)
        x = torch.relu(self.dw_bn(self.dw(x)))
        x = nn.functional.hardswish(self.pw(x))
        s = x.mean((2, 3), keepdim=True)
        s = torch.sigmoid(self.se_expand(torch.relu(self.se_reduce(s))))
        x = x * s
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


class FlattenNet(nn.Module):
    """conv -> bn -> relu -> flatten -> Linear -> Linear: each channel owns 8*8 Linear columns."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, stride=2, padding=1)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 12, 3, stride=2, padding=1)
        self.fc1 = nn.Linear(12 * 8 * 8, 32)
        self.fc2 = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.conv2(x))
        return self.fc2(torch.relu(self.fc1(x.flatten(1))))


def _randomized(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics, so a wrong slice of a buffer changes the output."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.running_mean.copy_(torch.rand(m.num_features, generator=g) - 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
    return model.eval()


MODELS: dict[str, Tuple[Callable[[], nn.Module], str]] = {
    "resnet18": (lambda: torchvision.models.resnet18(), "torchvision:resnet18"),
    "mixnet": (MixNet, "tests.test_artifact:MixNet"),
    "flatten": (FlattenNet, "tests.test_artifact:FlattenNet"),
}


def _pruned(name: str, ratio: float = 0.5) -> Tuple[nn.Module, torch.fx.GraphModule, fxprune.PruningPlan]:
    torch.manual_seed(0)
    model = _randomized(MODELS[name][0]())
    plan = fxprune.plan(model, ratio)
    return model, fxprune.apply(model, plan).eval(), plan


@pytest.fixture(scope="module")
def r18() -> Tuple[nn.Module, torch.fx.GraphModule, fxprune.PruningPlan]:
    return _pruned("resnet18")


@pytest.fixture()
def r18_saved(tmp_path: Path, r18) -> Path:
    _, pruned, plan = r18
    return fxprune.save(pruned, tmp_path / "r18", plan=plan, source="torchvision:resnet18")


# --------------------------------------------------------------------------- round trips


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_identical(tmp_path: Path, name: str) -> None:
    model, pruned, plan = _pruned(name)
    assert sum(p.numel() for p in pruned.parameters()) < sum(p.numel() for p in model.parameters())
    out = fxprune.save(pruned, tmp_path / name, plan=plan, source=MODELS[name][1])
    assert sorted(os.listdir(out)) == ["meta.json", "plan.json", "weights.safetensors"]
    # A fresh, differently initialised copy of the architecture: every tensor must come from the file.
    torch.manual_seed(123)
    loaded = fxprune.load(out, model=MODELS[name][0]())
    assert not loaded.training
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    want, got = pruned.state_dict(), loaded.state_dict()
    assert list(want) == list(got)
    for key in want:
        assert got[key].dtype == want[key].dtype and torch.equal(got[key], want[key]), key
    assert loaded.meta["fxprune_plan"] == plan
    assert loaded.code == pruned.code
    assert [type(m) for m in loaded.modules()][1:] == [type(m) for m in pruned.modules()][1:]


def test_load_by_recorded_torchvision_source(r18, r18_saved: Path) -> None:
    _, pruned, plan = r18
    loaded = fxprune.load(r18_saved)  # no model=: "torchvision:resnet18" is rebuilt from the record
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    assert fxprune.load(r18_saved, model="resnet18").meta["fxprune_source"] == "torchvision:resnet18"


def test_plan_carried_by_the_pruned_model(tmp_path: Path) -> None:
    model = _randomized(FlattenNet())
    pruned = fxprune.prune(model, 0.5, example_inputs=X).eval()
    out = fxprune.save(pruned, tmp_path / "f")  # plan from pruned.meta["fxprune_plan"]
    assert read_plan(out) == pruned.meta["fxprune_plan"]
    meta = read_meta(out)
    assert meta["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"}]  # read from shape metadata
    loaded = fxprune.load(out, model=FlattenNet())
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


def test_plan_json_is_a_plain_pruning_plan(r18, r18_saved: Path) -> None:
    _, _, plan = r18
    text = (r18_saved / "plan.json").read_text()
    assert fxprune.PruningPlan.from_json(text) == plan
    data = json.loads(text)
    assert data["source"] == "torchvision:resnet18"
    assert {g["key"]: len(g["keep"]) for g in data["groups"]}["layer1.0.conv1"] == 32
    meta = read_meta(r18_saved)
    assert meta["torch_version"] == torch.__version__ and meta["fxprune_version"] == fxprune.__version__
    weights = (r18_saved / "weights.safetensors").read_bytes()
    assert meta["files"]["weights.safetensors"]["sha256"] == hashlib.sha256(weights).hexdigest()


def test_dtype_training_flag_and_example_inputs_are_kept(tmp_path: Path) -> None:
    model, pruned, plan = _pruned("flatten")
    half = fxprune.apply(model, plan).half().train()
    out = fxprune.save(half, tmp_path / "h", plan=plan, example_inputs=X)
    assert read_meta(out)["inputs"] == [{"shape": [1, 3, 32, 32], "dtype": "float32"}]
    loaded = fxprune.load(out, model=FlattenNet())
    assert loaded.training
    assert all(p.dtype == torch.float16 for p in loaded.parameters())
    for key, value in half.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


def test_tied_tensors_are_stored_once_and_tied_again(tmp_path: Path) -> None:
    model, pruned, plan = _pruned("flatten", ratio=0.0)
    pruned.bn1.bias = pruned.conv1.bias  # one tensor under two names (safetensors refuses shared memory)
    out = fxprune.save(pruned, tmp_path / "tied", plan=plan)
    assert read_meta(out)["aliases"] == {"bn1.bias": "conv1.bias"}
    assert "bn1.bias" not in st_load((out / "weights.safetensors").read_bytes())
    loaded = fxprune.load(out, model=FlattenNet())
    assert loaded.bn1.bias.data_ptr() == loaded.conv1.bias.data_ptr()
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


def test_save_is_atomic_and_replaces_an_old_artifact(tmp_path: Path, r18) -> None:
    model, pruned, plan = r18
    target = tmp_path / "a"
    fxprune.save(pruned, target, plan=plan, source="resnet18")
    small_plan = fxprune.plan(model, 0.7)
    fxprune.save(fxprune.apply(model, small_plan), target, plan=small_plan, source="resnet18")
    assert read_plan(target) == small_plan
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a"]  # no temp or old folders left behind


def test_interrupted_save_leaves_nothing(tmp_path: Path, r18, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pruned, plan = r18
    import fxprune.artifact as artifact

    real = artifact._write
    calls = []

    def failing(path: Path, data: bytes) -> None:
        calls.append(path.name)
        if path.name == "meta.json":
            raise OSError("disk full")
        real(path, data)

    monkeypatch.setattr(artifact, "_write", failing)
    # A file-system failure is an ArtifactError too (one line from the CLI), naming the cause.
    with pytest.raises(ArtifactError, match="could not write the artifact .*disk full") as info:
        fxprune.save(pruned, tmp_path / "x", plan=plan)
    assert isinstance(info.value.__cause__, OSError)
    assert calls == ["plan.json", "weights.safetensors", "meta.json"]
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_foreign_folder(tmp_path: Path, r18) -> None:
    _, pruned, plan = r18
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(fxprune.FxPruneError, match="not an fxprune artifact; refusing"):
        fxprune.save(pruned, tmp_path / "mine", plan=plan)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


# --------------------------------------------------------------------------- no unpickling


def test_load_never_unpickles(r18, r18_saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pruned, _ = r18

    def forbidden(*args, **kwargs):
        raise AssertionError("load() must not unpickle")

    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "Unpickler", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    loaded = fxprune.load(r18_saved, model=torchvision.models.resnet18())
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


class _Payload:
    def __reduce__(self):
        return (Path.write_text, (Path(os.environ["FXPRUNE_TEST_MARKER"]), "pwned"))


def test_a_pickle_in_place_of_the_weights_is_never_run(r18_saved: Path, tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "marker"
    monkeypatch.setenv("FXPRUNE_TEST_MARKER", str(marker))
    buf = io.BytesIO()
    torch.save({"conv1.weight": _Payload()}, buf)  # what a malicious "checkpoint" looks like
    _replace_file(r18_saved, "weights.safetensors", buf.getvalue())  # checksum forged too
    with pytest.raises(ArtifactError, match="not a readable safetensors file"):
        fxprune.load(r18_saved, model=torchvision.models.resnet18())
    assert not marker.exists()
    # The same bytes *do* run under pickle: the test would notice if the payload were inert.
    torch.load(io.BytesIO(buf.getvalue()), weights_only=False)
    assert marker.read_text() == "pwned"


def test_recorded_python_source_is_not_imported_on_the_files_word(tmp_path: Path) -> None:
    model, pruned, plan = _pruned("flatten")
    out = fxprune.save(pruned, tmp_path / "f", plan=plan, source="tests.test_artifact:FlattenNet")
    with pytest.raises(ArtifactError, match="never imports code named by a file"):
        fxprune.load(out)
    loaded = fxprune.load(out, model="tests.test_artifact:FlattenNet")  # the caller's own choice
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


# --------------------------------------------------------------------------- clear errors


def _replace_file(folder: Path, name: str, data: bytes) -> None:
    """Overwrite a file *and* fix its checksum in meta.json, to reach the checks behind it."""
    (folder / name).write_bytes(data)
    meta = json.loads((folder / "meta.json").read_text())
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    (folder / "meta.json").write_text(json.dumps(meta))


def test_missing_folder_and_missing_files(tmp_path: Path, r18_saved: Path) -> None:
    with pytest.raises(ArtifactError, match="not a folder"):
        fxprune.load(tmp_path / "nope", model="resnet18")
    (r18_saved / "weights.safetensors").unlink()
    with pytest.raises(ArtifactError, match="missing weights.safetensors"):
        fxprune.load(r18_saved, model="resnet18")


def test_truncated_weights(r18_saved: Path) -> None:
    path = r18_saved / "weights.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ArtifactError, match="weights.safetensors is truncated"):
        fxprune.load(r18_saved, model="resnet18")


def test_flipped_byte_in_weights(r18_saved: Path) -> None:
    path = r18_saved / "weights.safetensors"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors is corrupt: its sha256"):
        fxprune.load(r18_saved, model="resnet18")


def test_corrupt_meta_and_plan(r18_saved: Path) -> None:
    plan_text = (r18_saved / "plan.json").read_text()
    (r18_saved / "plan.json").write_text(plan_text.replace('"keep"', '"kept"', 1))
    with pytest.raises(ArtifactError, match="plan.json is (truncated or )?corrupt"):
        fxprune.load(r18_saved, model="resnet18")
    _replace_file(r18_saved, "plan.json", b'{"groups": [')  # a consistent checksum, broken JSON
    with pytest.raises(fxprune.FxPruneError, match="not a valid fxprune plan"):
        fxprune.load(r18_saved, model="resnet18")
    (r18_saved / "meta.json").write_text("{ not json")
    with pytest.raises(ArtifactError, match="meta.json is corrupt"):
        fxprune.load(r18_saved, model="resnet18")


def test_newer_format_version(r18_saved: Path) -> None:
    meta = json.loads((r18_saved / "meta.json").read_text())
    meta["format_version"] = 99
    (r18_saved / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match="format version 99.*upgrade fxprune"):
        fxprune.load(r18_saved, model="resnet18")


@pytest.mark.parametrize("other", [lambda: torchvision.models.resnet34(), MixNet])
def test_plan_for_another_architecture(r18_saved: Path, other) -> None:
    with pytest.raises(ArtifactError, match=r"saved from 'torchvision:resnet18' \(ResNet\)\) does not fit"):
        fxprune.load(r18_saved, model=other())


def test_weights_of_the_wrong_shape_from_the_model(tmp_path: Path) -> None:
    # Same groups, same plan, but 5x5 stem kernels instead of 3x3: only the weights disagree.
    model = _randomized(MixNet(k=3))
    plan = fxprune.plan(model, 0.5)
    out = fxprune.save(fxprune.apply(model, plan), tmp_path / "m", plan=plan)
    with pytest.raises(ArtifactError, match=r"1 weights of the wrong shape \(stem.0.weight: file \(8, 3, 3, 3\), "
                                            r"model \(8, 3, 5, 5\)\)"):
        fxprune.load(out, model=MixNet(k=5))


def test_weights_of_the_wrong_shape_in_the_file(r18_saved: Path) -> None:
    tensors = st_load((r18_saved / "weights.safetensors").read_bytes())
    tensors["fc.weight"] = tensors["fc.weight"][:, :100].contiguous()
    del tensors["fc.bias"]
    tensors["extra"] = torch.zeros(1)
    _replace_file(r18_saved, "weights.safetensors", st_save(tensors))
    with pytest.raises(ArtifactError, match=r"wrong shape \(fc.weight: file \(1000, 100\), model \(1000, 256\)\).*"
                                            r"1 missing \(fc.bias\).*1 unexpected \(extra\)"):
        fxprune.load(r18_saved, model="resnet18")


def test_save_errors(tmp_path: Path, r18) -> None:
    model, pruned, plan = r18
    bare = torchvision.models.resnet18()
    with pytest.raises(ArtifactError, match="needs the pruning plan"):
        fxprune.save(bare, tmp_path / "a")
    with pytest.raises(ArtifactError, match="group conv1 keeps 44 of 64 channels but this model.s group conv1 has 32"):
        fxprune.save(pruned, tmp_path / "b", plan=fxprune.plan(model, 0.3))
    with pytest.raises(ArtifactError, match="expects the pruned nn.Module"):
        fxprune.save("not a model", tmp_path / "c", plan=plan)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match="not a folder"):
        fxprune.save(pruned, tmp_path / "file", plan=plan)


def test_model_spec_errors(r18_saved: Path, tmp_path: Path) -> None:
    with pytest.raises(ArtifactError, match="'resnet_nine' is not a torchvision model name"):
        fxprune.load(r18_saved, model="resnet_nine")
    with pytest.raises(ArtifactError, match="cannot find 'tests.test_artifact:Nope'"):
        fxprune.load(r18_saved, model="tests.test_artifact:Nope")
    model, pruned, plan = _pruned("flatten")
    out = fxprune.save(pruned, tmp_path / "nosrc", plan=plan)
    with pytest.raises(ArtifactError, match="does not record its source architecture. Hint: pass model="):
        fxprune.load(out)


@pytest.mark.parametrize("v2", [False, True], ids=["swin", "swin-v2"])
def test_a_model_with_whole_heads_pruned_round_trips(tmp_path: Path, v2: bool) -> None:
    # Its q/k/v Linear holds the heads' group three times: save must not read the layer's
    # outputs as the group's size (it refused every such model before).
    from torchvision.models import swin_transformer as swin

    def build() -> nn.Module:
        block = swin.SwinTransformerBlockV2 if v2 else swin.SwinTransformerBlock
        merge = swin.PatchMergingV2 if v2 else swin.PatchMerging
        return swin.SwinTransformer([4, 4], 16, [2, 2], [2, 4], [4, 4], num_classes=10, block=block,
                                    downsample_layer=merge).eval()

    torch.manual_seed(0)
    model, x = build(), torch.randn(1, 3, 32, 32)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    pruned = fxprune.apply(model, plan, example_inputs=(x,)).eval()
    heads = next(g for g in plan.groups if g.key == ("features.3.0.attn.cpb_mlp.2" if v2 else "features.3.0.attn.qkv"))
    assert heads.pruned
    out = fxprune.save(pruned, tmp_path / "swin", plan=plan, example_inputs=(x,))
    loaded = fxprune.load(out, model=build())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
    # A plan at another ratio is still refused: the model's own groups say how many channels it keeps.
    other = fxprune.plan(model, 0.25, example_inputs=(x,))
    with pytest.raises(ArtifactError, match="does not describe this model: group .* keeps .* but this model's group"):
        fxprune.save(pruned, tmp_path / "other", plan=other, example_inputs=(x,))


def test_a_vit_pruned_to_one_head_round_trips(tmp_path: Path) -> None:
    # Global ranking may leave a block a single head: the pruned model is still analysed as
    # attention (one head of 64), so save's check reads the same group.
    timm = pytest.importorskip("timm")
    import dataclasses

    def build() -> nn.Module:
        return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=16, patch_size=8, depth=1,
                                 num_classes=5).eval()

    torch.manual_seed(0)
    model, x = build(), torch.randn(1, 3, 16, 16)
    plan = fxprune.plan(model, 0.5, example_inputs=(x,))
    plan.groups = [dataclasses.replace(g, keep=list(range(64))) if g.key == "blocks.0.attn.qkv" else g
                   for g in plan.groups]
    pruned = fxprune.apply(model, plan, example_inputs=(x,)).eval()
    assert pruned.get_submodule("blocks.0.attn.qkv").out_features == 3 * 64
    with warnings.catch_warnings():
        warnings.simplefilter("error", fxprune.FxPruneWarning)  # one head is still a known pattern
        out = fxprune.save(pruned, tmp_path / "vit", plan=plan, example_inputs=(x,))
    loaded = fxprune.load(out, model=build())
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))
