"""Issue 10 (items 1, 3, 4, 7, 8, 9): what a saved artifact, and save() itself, may and may not do.

save() never deletes a user's files and replaces an artifact atomically; a plan for another
model is refused at save time; artifact content cannot drive memory (meta-device replay,
bounded inputs, memory-mapped weights checked before reading); tampered and malformed
artifacts are clear ArtifactErrors naming the file and the field.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable, Dict, List, Tuple

import pytest
import torch
import torch.nn as nn
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

import fxprune
import fxprune.artifact as artifact
from fxprune.artifact import ArtifactError, read_meta, read_plan

X = torch.randn(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
SOURCE = "tests.test_artifact_safety:Tiny"


class Tiny(nn.Module):
    """``depth`` conv-bn-relu blocks and a Linear head: Tiny(2) and Tiny(3) are a resnet18/34 in small."""

    def __init__(self, depth: int = 2, width: int = 8) -> None:
        super().__init__()
        self.convs = nn.ModuleList(nn.Conv2d(3 if i == 0 else width, width, 3, padding=1) for i in range(depth))
        self.bns = nn.ModuleList(nn.BatchNorm2d(width) for _ in range(depth))
        self.fc = nn.Linear(width, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for conv, bn in zip(self.convs, self.bns):
            x = torch.relu(bn(conv(x)))
        return self.fc(x.mean((2, 3)))


def _pruned(depth: int = 2, ratio: float = 0.5) -> Tuple[nn.Module, torch.fx.GraphModule, fxprune.PruningPlan]:
    torch.manual_seed(depth)
    model = Tiny(depth).eval()
    with torch.no_grad():
        for bn in model.bns:
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 1.5)
    plan = fxprune.plan(model, ratio)
    return model, fxprune.apply(model, plan).eval(), plan


@pytest.fixture(scope="module")
def tiny() -> Tuple[nn.Module, torch.fx.GraphModule, fxprune.PruningPlan]:
    return _pruned()


@pytest.fixture()
def saved(tmp_path: Path, tiny) -> Path:
    _, pruned, plan = tiny
    return fxprune.save(pruned, tmp_path / "a.fxprune", plan=plan, source=SOURCE, example_inputs=X)


def _meta(folder: Path) -> Dict[str, Any]:
    return json.loads((folder / "meta.json").read_text())


def _set_meta(folder: Path, meta: Dict[str, Any]) -> None:
    (folder / "meta.json").write_text(json.dumps(meta))


def _forge(folder: Path, name: str, data: bytes) -> None:
    """Overwrite plan.json / weights.safetensors and fix its size and sha256 in meta.json."""
    (folder / name).write_bytes(data)
    meta = _meta(folder)
    meta["files"][name] = {"bytes": len(data), "sha256": hashlib.sha256(data).hexdigest()}
    _set_meta(folder, meta)


def _tree(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): (p.read_bytes() if p.is_file() else b"<dir>") for p in sorted(root.rglob("*"))}


# --------------------------------------------------------------------------- 1. never delete a user's folder


def test_save_never_replaces_a_users_folder_that_has_a_meta_json(tmp_path: Path, tiny) -> None:
    _, pruned, plan = tiny
    mine = tmp_path / "experiment"
    (mine / "notes").mkdir(parents=True)
    (mine / "meta.json").write_text('{"lr": 0.1}')
    (mine / "train.csv").write_text("epoch,loss\n1,0.5\n")
    (mine / "notes" / "todo.txt").write_text("keep me")
    before = _tree(mine)
    with pytest.raises(ArtifactError, match="not an fxprune artifact; refusing to replace it.*no fxprune format marker"):
        fxprune.save(pruned, mine, plan=plan)
    assert _tree(mine) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["experiment"]


@pytest.mark.parametrize("intruder", ["file", "folder", "link"])
def test_save_never_replaces_an_artifact_folder_that_also_holds_other_files(saved: Path, tiny, intruder: str) -> None:
    _, pruned, plan = tiny
    if intruder == "file":
        (saved / "train.csv").write_text("1,2\n")
    elif intruder == "folder":
        (saved / "notes").mkdir()
        (saved / "notes" / "todo.txt").write_text("keep me")
    else:
        (saved / "link").symlink_to(saved.parent)
    before = _tree(saved) if intruder != "link" else sorted(os.listdir(saved))
    with pytest.raises(ArtifactError, match="not an fxprune artifact; refusing.*also holds"):
        fxprune.save(pruned, saved, plan=plan)
    assert (_tree(saved) if intruder != "link" else sorted(os.listdir(saved))) == before


def test_replacing_removes_only_the_artifacts_own_files(saved: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file that appears in the old artifact after save() checked it survives: nothing is rmtree'd."""
    _, pruned, plan = tiny

    raced: List[bool] = []

    def race(fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(a: Any, b: Any, *rest: Any) -> Any:
            if saved in (Path(a), Path(b)) and not raced:
                raced.append(True)
                (saved / "results.csv").write_text("precious")  # another program writes here, just before the swap
            return fn(a, b, *rest)
        return wrapped

    monkeypatch.setattr(os, "rename", race(os.rename))
    if hasattr(artifact, "_exchange"):
        monkeypatch.setattr(artifact, "_exchange", race(artifact._exchange))
    with pytest.warns(fxprune.FxPruneWarning, match="kept there, because it now holds files fxprune did not write"):
        fxprune.save(pruned, saved, plan=plan, source=SOURCE)
    assert read_plan(saved) == plan
    survivors = [p for p in saved.parent.rglob("results.csv")]
    assert [p.read_text() for p in survivors] == ["precious"]


def test_cli_prune_save_refuses_a_users_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from fxprune.cli import main

    args = ["prune", "--model", "tests.zoo:ConcatNet", "--image-size", "16", "--runs", "1", "--save"]
    out = tmp_path / "pruned"
    assert main(args + [str(out)]) == 0
    assert isinstance(fxprune.load(out, model="tests.zoo:ConcatNet"), torch.fx.GraphModule)
    assert main(args + [str(out)]) == 0  # its own artifact is replaced
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "meta.json").write_text("{}")
    (mine / "train.csv").write_text("keep")
    capsys.readouterr()
    assert main(args + [str(mine)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not an fxprune artifact; refusing" in err[0]
    assert sorted(os.listdir(mine)) == ["meta.json", "train.csv"] and (mine / "train.csv").read_text() == "keep"


# --------------------------------------------------------------------------- 3. atomic replacement


class Crash(BaseException):
    """The process dies here: no handler of fxprune's may do anything after it."""


def _crash_at(monkeypatch: pytest.MonkeyPatch, step: int, exchange: bool) -> List[str]:
    """Make the ``step``-th file-system mutation of save() kill the 'process' (and all after it)."""
    calls: List[str] = []
    dead = [False]

    def hook(name: str, fn: Callable[..., Any]) -> Callable[..., Any]:
        def wrapped(*args: Any, **kwargs: Any) -> Any:
            calls.append(name)
            if dead[0] or len(calls) == step:
                dead[0] = True
                raise Crash(name)
            return fn(*args, **kwargs)
        return wrapped

    for name in ("mkdir", "rename", "replace", "unlink", "rmdir"):
        monkeypatch.setattr(os, name, hook(name, getattr(os, name)))
    monkeypatch.setattr(artifact, "_write", hook("write", artifact._write))
    if exchange:
        monkeypatch.setattr(artifact, "_exchange", hook("exchange", artifact._exchange))
    else:  # not Linux (or a file system without RENAME_EXCHANGE): two renames
        monkeypatch.setattr(artifact, "_exchange", lambda a, b: False, raising=False)
    return calls


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "two-renames"])
def test_a_crash_at_any_step_leaves_the_old_or_the_new_artifact(tmp_path: Path, exchange: bool) -> None:
    if exchange and not sys.platform.startswith("linux"):
        pytest.skip("renameat2 is Linux only")
    _, old_model, old_plan = _pruned(ratio=0.25)
    _, new_model, new_plan = _pruned(ratio=0.5)
    seen = set()
    for step in range(1, 40):
        parent = tmp_path / f"step{step}"
        dest = parent / "a"
        fxprune.save(old_model, dest, plan=old_plan)
        with pytest.MonkeyPatch.context() as mp:
            calls = _crash_at(mp, step, exchange)
            try:
                fxprune.save(new_model, dest, plan=new_plan)
                finished = True
            except Crash:
                finished = False
        # The machine restarts: the path holds a complete artifact, old or new.
        got = read_plan(dest)  # verifies sizes and checksums
        assert got in (old_plan, new_plan), step
        seen.add("new" if got == new_plan else "old")
        # The next save replaces it and leaves no temporaries behind.
        fxprune.save(new_model, dest, plan=new_plan)
        assert read_plan(dest) == new_plan
        assert sorted(os.listdir(parent)) == ["a"], (step, calls)
        if finished:
            break
    assert finished and step > 5 and seen == {"old", "new"}
    if exchange:
        assert "exchange" in calls and "rename" not in calls


def test_stale_temporaries_of_ours_are_cleaned_on_the_next_save(saved: Path, tiny) -> None:
    _, pruned, plan = tiny
    parent = saved.parent
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead = int(done.stdout)
    ours = parent / f".{saved.name}.{os.getpid()}-abc123.tmp"      # an interrupted save of this process
    gone = parent / f".{saved.name}.old-{dead}-0123abcd"          # a finished process's old copy
    legacy = parent / f".{saved.name}.old-89abcdef"                # older fxprune naming
    live = parent / f".{saved.name}.{os.getppid()}-zzz999.tmp"      # a save still running elsewhere
    foreign = parent / f".{saved.name}.{dead}-qqq111.tmp"          # our name, but someone else's file in it
    for folder in (ours, gone, legacy, live, foreign):
        folder.mkdir()
        (folder / "weights.safetensors").write_bytes(b"\0" * 100_000)
    (foreign / "diary.txt").write_text("mine")
    os.utime(legacy, (0, 0))
    fxprune.save(pruned, saved, plan=plan, source=SOURCE)
    assert sorted(p.name for p in parent.iterdir()) == sorted([saved.name, live.name, foreign.name])
    assert (foreign / "diary.txt").read_text() == "mine"


# --------------------------------------------------------------------------- 4. a plan for another model


@pytest.mark.parametrize("plan_depth,model_depth", [(3, 2), (2, 3)], ids=["deeper-plan", "shallower-plan"])
def test_save_refuses_a_plan_made_for_another_model(tmp_path: Path, plan_depth: int, model_depth: int) -> None:
    _, _, other_plan = _pruned(plan_depth)
    _, pruned, _ = _pruned(model_depth)
    with pytest.raises(ArtifactError, match="the plan does not describe this model.*(does not have|in no group).*"
                                            "Hint: pass the plan"):
        fxprune.save(pruned, tmp_path / "a", plan=other_plan)
    assert list(tmp_path.iterdir()) == []


def test_save_refuses_a_resnet34_plan_with_a_resnet18(tmp_path: Path) -> None:
    import torchvision

    r34_plan = fxprune.plan(torchvision.models.resnet34(), 0.5)
    r18 = torchvision.models.resnet18()
    pruned = fxprune.apply(r18, fxprune.plan(r18, 0.5))
    with pytest.raises(ArtifactError, match="names .* modules this model does not have"):
        fxprune.save(pruned, tmp_path / "a", plan=r34_plan, source="resnet18")


# --------------------------------------------------------------------------- 7. content cannot drive memory


def _only_on_meta(monkeypatch: pytest.MonkeyPatch) -> List[str]:
    """Make every torchvision constructor refuse to run unless its tensors go to the meta device."""
    import torchvision

    real = torchvision.models.get_model_builder
    built: List[str] = []

    def checked(name: str) -> Callable[..., nn.Module]:
        builder = real(name)

        def build(**kwargs: Any) -> nn.Module:
            if not nn.Linear(1, 1).weight.is_meta:
                raise AssertionError(f"{name} built with real tensors before the plan was checked")
            built.append(name)
            return builder(**kwargs)
        return build

    monkeypatch.setattr(torchvision.models, "get_model_builder", checked)
    monkeypatch.setattr(torchvision.models._api, "get_model_builder", checked)  # what get_model() calls
    return built


@pytest.mark.parametrize("source", ["vit_h_14", "regnet_y_128gf"])  # 632 M / 645 M parameters if built for real
def test_a_recorded_torchvision_source_is_checked_on_the_meta_device(tmp_path: Path, tiny, source: str,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    _, pruned, plan = tiny
    out = fxprune.save(pruned, tmp_path / "a", plan=plan, source=source)
    built = _only_on_meta(monkeypatch)
    with pytest.raises(ArtifactError, match=rf"saved from '{source}' \((Tiny|GraphModule)\).*does not fit"):
        fxprune.load(out)
    assert built  # RegNet's constructor computes on its tensors: built with parameters moved to meta


def test_a_recorded_torchvision_source_never_downloads_anything(tmp_path: Path, tiny,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    import torch.hub

    _, pruned, plan = tiny
    out = fxprune.save(pruned, tmp_path / "a", plan=plan, source="ssdlite320_mobilenet_v3_large")

    def no_download(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("an artifact made fxprune download weights")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_download)
    with pytest.raises(ArtifactError, match="ssdlite320_mobilenet_v3_large"):
        fxprune.load(out)


def test_an_architecture_built_on_meta_loads_bit_identically(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import torchvision

    model = torchvision.models.regnet_y_400mf().eval()
    plan = fxprune.plan(model, 0.5)
    pruned = fxprune.apply(model, plan).eval()
    out = fxprune.save(pruned, tmp_path / "r", plan=plan, source="regnet_y_400mf")
    _only_on_meta(monkeypatch)
    loaded = fxprune.load(out)
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(loaded(x), pruned(x))


class WithConstant(nn.Module):
    """A non-persistent buffer: only a real construction knows its value."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.fc = nn.Linear(8, 2)
        self.register_buffer("scale", torch.full((1,), 3.0), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.conv(x)).mean((2, 3))) * self.scale


def test_a_meta_skeleton_that_cannot_hold_everything_is_rebuilt_for_real(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    model = WithConstant().eval()
    plan = fxprune.plan(model, 0.5)
    pruned = fxprune.apply(model, plan).eval()
    out = fxprune.save(pruned, tmp_path / "a", plan=plan, source="withconstant")
    monkeypatch.setattr(artifact, "_torchvision_names", lambda: ["withconstant"])
    monkeypatch.setattr(artifact, "_build_torchvision", lambda name: WithConstant())
    loaded = fxprune.load(out)
    assert not any(t.is_meta for t in list(loaded.parameters()) + list(loaded.buffers()))
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))


def test_recorded_input_sizes_are_bounded(saved: Path, tiny, monkeypatch: pytest.MonkeyPatch) -> None:
    _, pruned, plan = tiny
    meta = _meta(saved)
    meta["inputs"] = [{"shape": [1, 3, 6000, 6000], "dtype": "float32"}]  # 432 MB if allocated
    _set_meta(saved, meta)
    real_zeros = torch.zeros

    def small_zeros(*size: Any, **kwargs: Any) -> torch.Tensor:
        shape = size[0] if len(size) == 1 and isinstance(size[0], (list, tuple)) else size
        assert torch.Size(shape).numel() <= 1 << 25, "allocated a huge recorded input"
        return real_zeros(*size, **kwargs)

    monkeypatch.setattr(torch, "zeros", small_zeros)
    with pytest.raises(ArtifactError, match=r"meta.json: field inputs records example inputs of 108,000,000 "
                                            r"elements.*Hint: re-save with a batch-1"):
        fxprune.load(saved, model=Tiny())
    huge = torch.zeros(1).expand(1, 3, 6000, 6000)  # no memory: save reads only its shape
    with pytest.raises(ArtifactError, match="exceed what an artifact may hold.*batch-1"):
        fxprune.save(pruned, saved.parent / "b", plan=plan, example_inputs=huge)
    assert not (saved.parent / "b").exists()


def test_weights_are_memory_mapped_and_checked_before_any_tensor_is_read(saved: Path, tiny,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    import safetensors
    import safetensors.torch

    _, pruned, _ = tiny
    reads: List[str] = []
    real_open = safetensors.safe_open

    class Spy:
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            self.inner = real_open(*args, **kwargs)

        def __enter__(self) -> "Spy":
            self.f = self.inner.__enter__()
            return self

        def __exit__(self, *exc: Any) -> Any:
            return self.inner.__exit__(*exc)

        def get_tensor(self, name: str) -> torch.Tensor:
            reads.append(name)
            return self.f.get_tensor(name)

        def __getattr__(self, name: str) -> Any:
            return getattr(self.f, name)

    def whole_file(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("the weights file was read into memory whole")

    monkeypatch.setattr(safetensors, "safe_open", Spy)
    monkeypatch.setattr(safetensors.torch, "load", whole_file)
    loaded = fxprune.load(saved, model=Tiny())
    with torch.no_grad():
        assert torch.equal(loaded(X), pruned(X))
    assert sorted(reads) == sorted(_meta(saved)["dtypes"])  # each tensor read once
    # A file whose header does not fit the model: not one tensor is read.
    monkeypatch.setattr(safetensors, "safe_open", real_open)
    tensors = st_load((saved / "weights.safetensors").read_bytes())
    tensors["fc.weight"] = torch.zeros(4, 1000)
    _forge(saved, "weights.safetensors", st_save(tensors))
    monkeypatch.setattr(safetensors, "safe_open", Spy)
    reads.clear()
    with pytest.raises(ArtifactError, match=r"wrong shape \(fc.weight: file \(4, 1000\), model \(4, 4\)\)"):
        fxprune.load(saved, model=Tiny())
    assert reads == []


# --------------------------------------------------------------------------- 8. tampered artifacts


def test_an_alias_shadowing_a_stored_tensor_is_refused(saved: Path) -> None:
    meta = _meta(saved)
    meta["aliases"] = {"bns.0.bias": "convs.0.bias"}  # same shape: it would silently change outputs
    _set_meta(saved, meta)
    with pytest.raises(ArtifactError, match=r"meta.json: field aliases.bns.0.bias names a tensor that is also stored"):
        fxprune.load(saved, model=Tiny())


@pytest.mark.parametrize("value", ["false", 0, None])
def test_the_training_flag_must_be_a_json_boolean(saved: Path, value: Any) -> None:
    meta = _meta(saved)
    meta["training"] = value
    _set_meta(saved, meta)
    with pytest.raises(ArtifactError, match=r"meta.json: field training must be true or false"):
        fxprune.load(saved, model=Tiny())


@pytest.mark.parametrize("case", ["recorded", "kind"])
def test_tensors_of_the_wrong_dtype_are_refused(saved: Path, case: str) -> None:
    tensors = st_load((saved / "weights.safetensors").read_bytes())
    if case == "recorded":  # float64 where meta.json records float32
        tensors["fc.weight"] = tensors["fc.weight"].double()
        match = r"tensor fc.weight is stored as float64 but .*meta.json records float32"
    else:  # an artifact without dtype records: a float buffer where the model counts in int64
        tensors["bns.0.num_batches_tracked"] = tensors["bns.0.num_batches_tracked"].float()
        match = r"tensor bns.0.num_batches_tracked is stored as float32, but the model's is int64"
    _forge(saved, "weights.safetensors", st_save(tensors))
    if case == "kind":
        meta = _meta(saved)
        meta.pop("dtypes", None)
        _set_meta(saved, meta)
    with pytest.raises(ArtifactError, match=match):
        fxprune.load(saved, model=Tiny())


@pytest.mark.parametrize("name", ["weights.safetensors", "plan.json", "meta.json"])
def test_a_symlinked_artifact_file_is_never_followed(saved: Path, tmp_path: Path, name: str) -> None:
    outside = tmp_path / f"outside-{name}"
    (saved / name).rename(outside)
    (saved / name).symlink_to(outside)
    with pytest.raises(ArtifactError, match=rf"{name} is a symbolic link; fxprune never follows links"):
        fxprune.load(saved, model=Tiny())


# --------------------------------------------------------------------------- 9. malformed -> ArtifactError


def _plan_text(folder: Path, edit: Callable[[Dict[str, Any]], Any], raw: Dict[str, str] = {}) -> None:
    data = json.loads((folder / "plan.json").read_text())
    edit(data)
    text = json.dumps(data)
    for placeholder, literal in raw.items():
        text = text.replace(json.dumps(placeholder), literal)
    _forge(folder, "plan.json", text.encode())


def _meta_text(folder: Path, edit: Callable[[Dict[str, Any]], Any], raw: Dict[str, str] = {}) -> None:
    data = _meta(folder)
    edit(data)
    text = json.dumps(data)
    for placeholder, literal in raw.items():
        text = text.replace(json.dumps(placeholder), literal)
    (folder / "meta.json").write_text(text)


def _set(path: str, value: Any) -> Callable[[Dict[str, Any]], None]:
    """Set a dotted path (list indices as numbers) in a JSON object."""
    def edit(data: Dict[str, Any]) -> None:
        *parents, last = [int(p) if p.isdigit() else p for p in path.split("/")]
        for p in parents:
            data = data[p]
        data[last] = value
    return edit


def _load(folder: Path) -> Any:
    return fxprune.load(folder, model=Tiny())


DEEP = "[" * 100_000 + "]" * 100_000

MALFORMED: Dict[str, Tuple[Callable[[Path], Any], str]] = {
    # plan.json (its checksum fixed: these reach the parser)
    "plan-keep-infinity": (lambda f: _plan_text(f, _set("groups/0/keep/0", "@X"), {"@X": "Infinity"}),
                           r"plan.json is not a valid fxprune plan \(not valid JSON: Infinity is not allowed"),
    "plan-size-1e400": (lambda f: _plan_text(f, _set("groups/0/size", "@X"), {"@X": "1e400"}),
                        r"plan.json is not a valid fxprune plan \(not valid JSON: number 1e400 is out of range"),
    "plan-deep-nesting": (lambda f: _forge(f, "plan.json", DEEP.encode()),
                          r"plan.json is not a valid fxprune plan: JSON nested too deeply"),
    "plan-bad-utf8": (lambda f: _forge(f, "plan.json", (f / "plan.json").read_bytes().replace(b'"l1"', b'"l\xff"')),
                      r"plan.json is not a valid fxprune plan: not UTF-8 text"),
    "plan-keep-string": (lambda f: _plan_text(f, _set("groups/0/keep", "0,1")),
                         r"plan.json: field groups\[0\].keep must be an array"),
    "plan-keep-float": (lambda f: _plan_text(f, _set("groups/0/keep/0", 1.5)),
                        r"plan.json: field groups\[0\].keep\[0\] must be an integer"),
    "plan-groups-object": (lambda f: _plan_text(f, _set("groups", {})), r"plan.json: field groups must be an array"),
    "plan-policy-array": (lambda f: _plan_text(f, _set("policy", [1])), r"plan.json: field policy must be an object"),
    "plan-model-string": (lambda f: _plan_text(f, _set("model", "Tiny")), r"plan.json: field model must be an object"),
    "plan-nan": (lambda f: _plan_text(f, _set("policy/ratio", "@X"), {"@X": "NaN"}),
                 r"plan.json is not a valid fxprune plan \(not valid JSON: NaN is not allowed"),
    # meta.json (not checksummed: it holds the checksums)
    "meta-deep-nesting": (lambda f: _meta_text(f, _set("notes", "@X"), {"@X": DEEP}),
                          r"meta.json is corrupt: JSON nested too deeply"),
    "meta-bad-utf8": (lambda f: (f / "meta.json").write_bytes((f / "meta.json").read_bytes().replace(b'"format_version"', b'"form\xe9t"')),
                      r"meta.json is corrupt: not UTF-8 text"),
    "meta-files-array": (lambda f: _meta_text(f, _set("files", ["plan.json", "weights.safetensors"])),
                         r"meta.json: field files must be an object"),
    "meta-inputs-object": (lambda f: _meta_text(f, _set("inputs", {"shape": [1, 3, 8, 8]})),
                           r"meta.json: field inputs must be an array"),
    "meta-files-entry-string": (lambda f: _meta_text(f, _set("files/plan.json", "abc")),
                                r"meta.json: field files.plan.json must be an object"),
    "meta-aliases-array": (lambda f: _meta_text(f, _set("aliases", ["fc.bias"])),
                           r"meta.json: field aliases must be an object"),
    "meta-alias-target-array": (lambda f: _meta_text(f, _set("aliases", {"fc.bias": ["fc.weight"]})),
                                r"meta.json: field aliases.fc.bias must be a string"),
    "meta-inputs-negative": (lambda f: _meta_text(f, _set("inputs/0/shape/2", -1)),
                             r"meta.json: field inputs\[0\].shape\[2\] must be an integer in \[0, "),
    "meta-inputs-shape-string": (lambda f: _meta_text(f, _set("inputs/0/shape", "1388")),
                                 r"meta.json: field inputs\[0\].shape must be an array"),
    "meta-inputs-dtype-attribute": (lambda f: _meta_text(f, _set("inputs/0/dtype", "load")),
                                    r"meta.json: field inputs\[0\].dtype must be a torch dtype name"),
    "meta-source-number": (lambda f: _meta_text(f, _set("source", 5)),
                           r"meta.json: field source must be a string or null, got a number 5"),
    "meta-format-version-boolean": (lambda f: _meta_text(f, _set("format_version", True)),
                                    r"meta.json: field format_version must be an integer"),
    "meta-infinity": (lambda f: _meta_text(f, _set("num_parameters", "@X"), {"@X": "Infinity"}),
                      r"meta.json is corrupt \(not valid JSON: Infinity is not allowed"),
    "meta-duplicate-key": (lambda f: (f / "meta.json").write_text(
        (f / "meta.json").read_text().replace('"training": false', '"training": false, "training": true')),
        r"meta.json is corrupt \(not valid JSON: duplicate key 'training'"),
}


@pytest.mark.parametrize("case", list(MALFORMED))
def test_a_malformed_artifact_is_an_artifact_error_naming_file_and_field(saved: Path, case: str) -> None:
    mutate, match = MALFORMED[case]
    mutate(saved)
    with pytest.raises(ArtifactError, match=match) as info:
        _load(saved)
    assert "Hint:" in str(info.value)


def test_a_malformed_model_spec_is_an_artifact_error(saved: Path) -> None:
    with pytest.raises(ArtifactError, match=r"model ':foo' is not of the form 'package.module:callable'"):
        fxprune.load(saved, model=":foo")


def test_save_under_a_regular_file_is_an_artifact_error(tmp_path: Path, tiny) -> None:
    _, pruned, plan = tiny
    (tmp_path / "file").write_text("x")
    with pytest.raises(ArtifactError, match=r"cannot save to .*file/sub/a.*Hint: every part of the path"):
        fxprune.save(pruned, tmp_path / "file" / "sub" / "a", plan=plan)
    assert (tmp_path / "file").read_text() == "x"


def test_read_meta_and_read_plan_validate_too(saved: Path) -> None:
    meta = _meta(saved)
    meta["training"] = "false"
    _set_meta(saved, meta)
    with pytest.raises(ArtifactError, match="field training"):
        read_meta(saved)
    meta["training"] = False
    _set_meta(saved, meta)
    _plan_text(saved, _set("groups/0/keep/0", "@X"), {"@X": "1e400"})
    with pytest.raises(ArtifactError, match="out of range"):
        read_plan(saved)
