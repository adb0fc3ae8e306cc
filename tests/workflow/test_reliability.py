"""Issue 10 (workflow items 2, 5, 6, 16, 17): resume never mixes settings, files never choose code,
bad data and bad options are clear errors before any work, and a report says what was pruned.

Every run here uses TinyNet (tests/workflow/helpers.py) on a few hundred synthetic 28x28 images
written to tmp_path, one epoch at most: seconds each.
"""

from __future__ import annotations

import gzip
import json
import os
import pickle
import struct
import sys
from dataclasses import fields
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fxprune.workflow.data import CifarUnpickler, load_data, read_idx
from fxprune.workflow.errors import CheckpointError, ConfigError, DataError, DataNotFoundError
from fxprune.workflow.models import build_model
from fxprune.workflow.report import load_pruned, save_pruned
from fxprune.workflow.job import RESULT_OPTIONS, RunConfig, check_output_folder, run, sweep

from .helpers import TinyNet, synthetic_images, write_idx

TINY = "tests.workflow.helpers:TinyNet"


def _tiny(out: Path, data: Path, **changes) -> RunConfig:
    values = dict(model=TINY, data=str(data), baseline_epochs=1, epochs=1, batch_size=50, compile=False,
                  latency_runs=1, recalibration_batches=1, calibration_batches=1, quiet=True, out=str(out),
                  threads=1, lr=0.05, baseline_lr=0.05)
    values.update(changes)
    return RunConfig(**values)


def _write_fmnist(folder: Path, train: int = 200, test: int = 100, seed: int = 1) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", train), ("t10k", test)):
        images, labels = synthetic_images(count, seed=seed if split == "train" else seed + 1)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:, 0].numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.numpy().astype(np.uint8))
    return folder


class _Killed(Exception):
    pass


def _kill_at(call: int):
    calls: list[int] = []

    def callback(epoch: int, metrics: dict) -> None:
        calls.append(epoch)
        if len(calls) == call:
            raise _Killed()

    return callback


# --------------------------------------------------------------------------------------------
# Item 2: --resume refuses a checkpoint made with other settings; the baseline cache is keyed
# --------------------------------------------------------------------------------------------
def test_every_run_option_is_classified_for_the_resume_fingerprint() -> None:
    # A new RunConfig option must be put in RESULT_OPTIONS or, if it cannot change the result,
    # here: otherwise a resume could silently continue a checkpoint made under another value.
    # control: adds the equal-training control to the report; the pruned model is the same, and
    # the control's own cache and checkpoint are keyed by what determines it (run._control_meta).
    no_effect = {"device", "out", "resume", "quiet", "download", "threads", "workers", "compile",
                 "latency_runs", "log_level", "control"}
    names = {f.name for f in fields(RunConfig)}
    assert set(RESULT_OPTIONS) | no_effect == names
    assert not set(RESULT_OPTIONS) & no_effect


def test_resume_with_another_importance_is_refused_before_any_training(tmp_path: Path) -> None:
    data = _write_fmnist(tmp_path / "data")
    out = tmp_path / "out"
    # Killed after the first fine-tuning epoch (call 1: the baseline's epoch).
    with pytest.raises(_Killed):
        run(_tiny(out, data, epochs=2), on_epoch_end=_kill_at(2))
    assert (out / "finetune_checkpoint.pt").is_file()
    trained: list[int] = []
    with pytest.raises(CheckpointError) as info:
        run(_tiny(out, data, epochs=2, resume=True, importance="l2"),
            on_epoch_end=lambda epoch, metrics: trained.append(epoch))
    message = str(info.value)
    assert "importance: 'taylor' -> 'l2'" in message and "without --resume" in message
    assert "\n" not in message
    assert trained == []  # refused up front, not after the baseline was measured and pruned
    assert not (out / "report.json").exists()
    # The same settings resume; asking for a fresh start (no --resume) with the new ones works.
    assert run(_tiny(out, data, epochs=2, resume=True))["config"]["importance"] == "taylor"
    assert run(_tiny(out, data, epochs=2, importance="l2"))["config"]["importance"] == "l2"


def test_resume_with_another_limit_never_relabels_the_baseline_cache(tmp_path: Path) -> None:
    data = _write_fmnist(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(_Killed):  # killed after the baseline's first of two epochs
        run(_tiny(out, data, baseline_epochs=2, limit=150), on_epoch_end=_kill_at(1))
    with pytest.raises(CheckpointError, match=r"limit: 150 -> 100"):
        run(_tiny(out, data, baseline_epochs=2, limit=100, resume=True))
    assert not (out / "baseline" / "baseline_model.pt").exists()  # nothing cached under a wrong label
    # A fresh start with the new limit trains and caches under its own settings.
    report = run(_tiny(out, data, baseline_epochs=2, limit=100, epochs=0))
    assert report["baseline_source"]["source"] == "trained"
    cached = torch.load(out / "baseline" / "baseline_model.pt", weights_only=True)
    assert cached["meta"]["limit"] == 100 and cached["meta"]["train_samples"] == 100


def test_baseline_cache_is_keyed_by_the_data_content(tmp_path: Path) -> None:
    data = _write_fmnist(tmp_path / "data", seed=1)
    out = tmp_path / "out"
    first = run(_tiny(out, data, epochs=0))
    assert first["baseline_source"]["source"] == "trained"
    assert run(_tiny(out, data, epochs=0))["baseline_source"]["source"] == "cache"
    # Same folder, same sample counts, other images: the cached baseline does not belong to them.
    _write_fmnist(tmp_path / "data", seed=5)
    again = run(_tiny(out, data, epochs=0))
    assert again["baseline_source"]["source"] == "trained"
    assert again["data"]["identity"] != first["data"]["identity"]


def test_resume_with_other_weights_is_refused(tmp_path: Path) -> None:
    data = _write_fmnist(tmp_path / "data")
    out = tmp_path / "out"
    weights = tmp_path / "w.pt"
    torch.manual_seed(0)
    torch.save(TinyNet(1, 10).state_dict(), weights)
    with pytest.raises(_Killed):
        run(_tiny(out, data, weights=str(weights), epochs=2), on_epoch_end=_kill_at(1))
    torch.manual_seed(1)
    torch.save(TinyNet(1, 10).state_dict(), weights)  # same path, other content
    with pytest.raises(CheckpointError, match=r"weights: 'sha256:"):
        run(_tiny(out, data, weights=str(weights), epochs=2, resume=True))


# --------------------------------------------------------------------------------------------
# Item 5: load_pruned never imports code pruned_model.json names
# --------------------------------------------------------------------------------------------
def _saved_tiny(out: Path, name: str) -> TinyNet:
    import fxprune

    torch.manual_seed(0)
    model = TinyNet().eval()
    example = torch.randn(1, 1, 28, 28)
    pruned = fxprune.prune(model, 0.5, example_inputs=(example,))
    save_pruned(pruned, out, example_inputs=example,
                build={"name": name, "num_classes": 10, "in_channels": 1, "image_size": 28})
    return pruned


def test_load_pruned_never_imports_a_callable_named_by_the_file(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    marker = tmp_path / "imported"
    (tmp_path / "evil_models.py").write_text(
        f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n"
        "def build(**kwargs):\n    raise SystemExit('called')\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    out = tmp_path / "run"
    pruned = _saved_tiny(out, TINY)
    info = json.loads((out / "pruned_model.json").read_text())
    for name in ("evil_models:build", "os:abort", "signal:pause"):
        info["build_model"]["name"] = name
        (out / "pruned_model.json").write_text(json.dumps(info))
        with pytest.raises(CheckpointError, match="never imports code"):
            load_pruned(out)
    assert not marker.exists() and "evil_models" not in sys.modules
    # The caller's own model (a module or a callable) is how such a model loads.
    x = torch.randn(2, 1, 28, 28)
    for model in (TinyNet, TinyNet()):
        loaded = load_pruned(out, model=model)
        assert torch.equal(loaded(x), pruned(x))


@pytest.mark.parametrize("build", [{"name": "resnet18", "num_classes": "10", "in_channels": 1, "image_size": 28},
                                   {"name": "resnet18", "num_classes": 10, "in_channels": 1, "image_size": 28,
                                    "adapt_with": "os:system"},
                                   {"name": "resnet18", "num_classes": 10**9, "in_channels": 1, "image_size": 28},
                                   {"name": "resnet18"}])
def test_load_pruned_accepts_only_a_plain_torchvision_spec(tmp_path: Path, build: dict) -> None:
    out = tmp_path / "run"
    _saved_tiny(out, "resnet18")
    info = json.loads((out / "pruned_model.json").read_text())
    info["build_model"] = build
    (out / "pruned_model.json").write_text(json.dumps(info))
    with pytest.raises(CheckpointError, match="build_model"):
        load_pruned(out)


# --------------------------------------------------------------------------------------------
# Item 6: CIFAR-10 pickles are read with an allow-listing unpickler
# --------------------------------------------------------------------------------------------
class _MakesMarker:
    def __init__(self, path: Path) -> None:
        self.path = str(path)

    def __reduce__(self):
        return (os.mkdir, (self.path,))


def _cifar_folder(root: Path, payload: object = None, protocol: int = pickle.HIGHEST_PROTOCOL) -> Path:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name in ["data_batch_1", "test_batch"]:
        batch = {b"data": rng.integers(0, 256, size=(6, 3072), dtype=np.uint8),
                 b"labels": [int(v) for v in rng.integers(0, 10, size=6)], b"batch_label": name.encode(),
                 b"filenames": [b"x.png"] * 6}
        if payload is not None and name == "data_batch_1":
            batch[b"extra"] = payload
        with open(root / name, "wb") as handle:
            pickle.dump(batch, handle, protocol=protocol)
    return root


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_malicious_cifar_batch_runs_nothing(tmp_path: Path, protocol: int) -> None:
    marker = tmp_path / "pwned"
    folder = _cifar_folder(tmp_path / "cifar", _MakesMarker(marker), protocol)
    with pytest.raises(DataError, match=r"posix\.mkdir is not allowed|os\.mkdir is not allowed"):
        load_data(str(folder))
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [2, pickle.HIGHEST_PROTOCOL])
def test_a_genuine_cifar_batch_still_loads(tmp_path: Path, protocol: int) -> None:
    bundle = load_data(str(_cifar_folder(tmp_path / "cifar", protocol=protocol)))
    assert bundle.name == "cifar10" and len(bundle.train) == 6 and bundle.identity.startswith("sha256:")


def test_cifar_unpickler_refuses_every_other_global(tmp_path: Path) -> None:
    import io

    for forbidden in (("builtins", "eval"), ("os", "system"), ("numpy", "load"), ("subprocess", "Popen")):
        with pytest.raises(pickle.UnpicklingError, match="not allowed"):
            CifarUnpickler(io.BytesIO(b"")).find_class(*forbidden)


# --------------------------------------------------------------------------------------------
# Item 16 / 17: bad data files are clear errors
# --------------------------------------------------------------------------------------------
def _idx_bytes(array: np.ndarray, code: int) -> bytes:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    return header + array.tobytes()


def test_corrupt_deflate_stream_is_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "train-images-idx3-ubyte.gz"
    images = np.random.default_rng(0).integers(0, 255, size=(50, 28, 28), dtype=np.uint8)
    raw = bytearray(gzip.compress(_idx_bytes(images, 0x08)))  # no file name: a 10-byte gzip header
    raw[10] = 0xFF  # the first deflate block header (after gzip's 10-byte header): reserved block type
    path.write_bytes(bytes(raw))
    with pytest.raises(Exception) as raw_error:
        gzip.decompress(bytes(raw))
    assert not isinstance(raw_error.value, OSError)  # zlib.error: what escaped before
    with pytest.raises(DataNotFoundError, match="corrupt or truncated"):
        read_idx(path)


@pytest.mark.parametrize("labels, match", [
    (np.full(200, 12, dtype=np.uint8), r"class indices in \[0, 9\]"),
    (np.zeros((200, 2), dtype=np.uint8), "1-d array"),
    (np.arange(200, dtype=">f4") % 10 + 0.5, "integer class indices"),
])
def test_bad_fashion_mnist_labels_are_clear_errors(tmp_path: Path, labels: np.ndarray, match: str) -> None:
    folder = _write_fmnist(tmp_path / "data")
    code = 0x0D if labels.dtype.kind == "f" else 0x08
    with gzip.open(folder / "train-labels-idx1-ubyte.gz", "wb") as handle:
        handle.write(_idx_bytes(labels, code))
    with pytest.raises(DataError, match=match):
        load_data(str(folder))


def test_test_images_of_another_size_are_refused(tmp_path: Path) -> None:
    folder = _write_fmnist(tmp_path / "data")
    write_idx(folder / "t10k-images-idx3-ubyte.gz", np.zeros((100, 32, 32), dtype=np.uint8))
    with pytest.raises(DataError, match="training images are 28x28 but the test images are 32x32"):
        load_data(str(folder))


def _png_tree(root: Path, *, corrupt: str = "truncated") -> Path:
    from PIL import Image

    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((28, 28, 3), 40 + 100 * label, dtype=np.uint8)).save(root / name / f"{i}.png")
    bad = root / "a" / "1.png"
    if corrupt == "truncated":
        bad.write_bytes(bad.read_bytes()[:60])
    else:
        bad.write_bytes(b"this is not an image")
    return bad


@pytest.mark.parametrize("corrupt", ["truncated", "garbage"])
def test_a_corrupt_image_is_a_clear_error(tmp_path: Path, corrupt: str) -> None:
    _png_tree(tmp_path / "images", corrupt=corrupt)
    bundle = load_data(str(tmp_path / "images"), image_size=28)
    with pytest.raises(DataError, match="cannot read image .*1.png"):
        [bundle.train[i] for i in range(len(bundle.train))] + [bundle.test[i] for i in range(len(bundle.test))]


def _first_error(loader: DataLoader) -> str:
    # The iterator (and its worker) is gone when this returns: no traceback keeps it alive.
    try:
        for _ in loader:
            pass
    except DataError as error:
        return str(error)
    return ""


def test_a_corrupt_image_read_by_a_loader_worker_is_the_same_one_line_error(tmp_path: Path) -> None:
    bad = _png_tree(tmp_path / "images")
    full = load_data(str(tmp_path / "images"), image_size=28).train.dataset  # type: ignore[attr-defined]
    message = _first_error(DataLoader(full, batch_size=2, num_workers=1))
    assert message.startswith(f"cannot read image {bad}") and "\n" not in message


# --------------------------------------------------------------------------------------------
# Item 16: --model package.module:callable; the output folder
# --------------------------------------------------------------------------------------------
def test_torchvision_builder_given_as_a_callable_builds_like_its_name() -> None:
    by_callable = build_model("torchvision.models:resnet18", num_classes=10, in_channels=1, image_size=28)
    by_name = build_model("resnet18", num_classes=10, in_channels=1, image_size=28)
    assert str(by_callable) == str(by_name)
    assert by_callable(torch.randn(2, 1, 28, 28)).shape == (2, 10)


def test_a_callable_gets_only_the_keywords_it_declares(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "kw_models.py").write_text(
        "import torch.nn as nn\n"
        "class Net(nn.Sequential):\n"
        "    def __init__(self, num_classes=10):\n"
        "        super().__init__(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(),\n"
        "                         nn.Linear(4, num_classes))\n"
        "def build(num_classes=10, **kwargs):\n"
        "    return Net(num_classes=num_classes, **kwargs)  # like timm: forwards **kwargs to the class\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    model = build_model("kw_models:build", num_classes=7, in_channels=1, image_size=16)
    assert model(torch.randn(2, 1, 16, 16)).shape == (2, 7)  # first conv adapted to 1 channel
    sys.modules.pop("kw_models", None)


def test_output_folder_is_checked_up_front(tmp_path: Path) -> None:
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(ConfigError, match="is a file"):
        check_output_folder(a_file)
    with pytest.raises(ConfigError, match="which is a file"):
        check_output_folder(a_file / "sub")
    with pytest.raises(ConfigError, match="cannot write there"):
        check_output_folder("/proc/fxprune-cannot-write-here")
    assert check_output_folder(tmp_path / "new" / "out").is_dir()
    assert a_file.read_text() == "x"


# --------------------------------------------------------------------------------------------
# Item 17: every option checked before any work; the report says what was pruned
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("changes, match", [
    ({"weight_decay": float("nan")}, "--weight-decay must be a finite number"),
    ({"weight_decay": -1.0}, "--weight-decay must be >= 0"),
    ({"lr": 0.0}, "--lr must be > 0"),
    ({"lr": float("nan")}, "--lr must be a finite number"),
    ({"baseline_lr": float("inf")}, "--baseline-lr must be a finite number"),
    ({"label_smoothing": float("nan")}, "--label-smoothing"),
    ({"ratio": 0.3, "target_macs": 0.9}, "contradict each other"),
    ({"importance": "foo"}, "not an importance criterion; choose one of"),
    ({"workers": -1}, "--workers"),
    ({"seed": -3}, "--seed"),
])
def test_bad_options_fail_before_the_data_is_even_read(tmp_path: Path, changes: dict, match: str) -> None:
    # The data folder does not exist: an option error that came after loading would be a data error.
    config = _tiny(tmp_path / "out", tmp_path / "missing", **changes)
    with pytest.raises(ConfigError, match=match):
        run(config)


def test_sweep_checks_every_importance_before_any_work(tmp_path: Path) -> None:
    config = _tiny(tmp_path / "out", tmp_path / "missing")
    with pytest.raises(ConfigError, match="--importances 'foo'"):
        sweep(config, [0.3], ["l1", "foo"])
    with pytest.raises(ConfigError, match="--target-macs"):
        sweep(config.replace(target_macs=0.5), [0.3], ["l1"])


def test_round_to_that_can_prune_nothing_is_refused_before_training(tmp_path: Path) -> None:
    data = _write_fmnist(tmp_path / "data")
    trained: list[int] = []
    with pytest.raises(ConfigError, match="--round-to 100000 is not smaller than the widest layer"):
        run(_tiny(tmp_path / "out", data, round_to=100000), on_epoch_end=lambda e, m: trained.append(e))
    assert trained == []


def test_a_model_with_the_wrong_class_count_is_refused_before_training(tmp_path: Path,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "five_classes.py").write_text(
        "from tests.workflow.helpers import TinyNet\ndef build():\n    return TinyNet(1, 5)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    data = _write_fmnist(tmp_path / "data")
    with pytest.raises(ConfigError, match=r"returns \(1, 5\) for one image, but fashion-mnist has 10 classes"):
        run(_tiny(tmp_path / "out", data, model="five_classes:build"))
    sys.modules.pop("five_classes", None)


def test_the_report_says_loudly_when_nothing_was_pruned(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    data = _write_fmnist(tmp_path / "data")
    out = tmp_path / "out"
    report = run(_tiny(out, data, ratio=0.0, epochs=0))
    achieved = report["pruned"]["achieved"]
    assert achieved["nothing_pruned"] and achieved["channels_removed"] == 0
    assert "WARNING: nothing was pruned" in (out / "report.md").read_text()
    assert "WARNING: nothing was pruned" in (out / "run.log").read_text()
    # A real pruning states what it achieved next to what was asked.
    report = run(_tiny(out, data, ratio=0.5, epochs=0))
    achieved = report["pruned"]["achieved"]
    assert not achieved["nothing_pruned"] and achieved["channels_removed"] > 0
    md = (out / "report.md").read_text()
    assert "requested ratio 0.5" in md and f"{achieved['channels_removed']} of {achieved['channels']} channels" in md


def test_sweep_resume_never_reuses_a_point_made_from_other_data(tmp_path: Path,
                                                                caplog: pytest.LogCaptureFixture) -> None:
    data = _write_fmnist(tmp_path / "data", seed=1)
    config = _tiny(tmp_path / "out", data, epochs=0)
    first = sweep(config, [0.5], ["l1"])
    with caplog.at_level("INFO", logger="fxprune.workflow"):
        again = sweep(config.replace(resume=True), [0.5], ["l1"])
    assert "sweep: reusing" in caplog.text and again["points"] == first["points"]
    _write_fmnist(tmp_path / "data", seed=5)  # same folder and counts, other images
    with pytest.raises(CheckpointError, match="data_identity"):
        sweep(config.replace(resume=True), [0.5], ["l1"])
    assert sweep(config, [0.5], ["l1"])["points"][0]["top1"] is not None  # a fresh start works


def test_an_interrupted_checkpoint_leaves_no_debris_after_the_next_write(tmp_path):
    """Issue 10 item 3: a killed save_checkpoint leaves a model-sized temporary; the next write removes it."""
    import subprocess
    import sys as _sys

    from fxprune.workflow.finetune import save_checkpoint

    target = tmp_path / "train.ckpt"
    dead = subprocess.run([_sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)  # that process has exited: its temporary is debris
    debris = tmp_path / f".train.ckpt.tmp-{dead_pid}"
    debris.write_bytes(b"x" * 1024)
    live = tmp_path / f".train.ckpt.tmp-{os.getppid()}"  # a running writer: left alone
    live.write_bytes(b"y")
    foreign = tmp_path / ".other.ckpt.tmp-1"  # another file's temporary: not ours to judge here
    foreign.write_bytes(b"z")
    save_checkpoint({"a": 1}, target)
    assert target.exists()
    assert not debris.exists()
    assert live.exists() and foreign.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([target.name, live.name, foreign.name])


def test_a_model_that_cannot_be_saved_still_leaves_the_report(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Everything the run measured survives a failed save: report.json and report.md say why.
    from fxprune.artifact import ArtifactError
    import fxprune.workflow.job as job

    def refuse(*args, **kwargs):
        raise ArtifactError("the plan does not describe this model (simulated)")

    monkeypatch.setattr(job, "save_pruned", refuse)
    data = _write_fmnist(tmp_path / "data")
    out = tmp_path / "out"
    with pytest.raises(ArtifactError, match="simulated"):
        run(_tiny(out, data, control=False))
    report = json.loads((out / "report.json").read_text())
    assert report["artifacts"] == [] and "simulated" in report["save_error"]
    assert report["pruned"]["top1"] is not None
    md = (out / "report.md").read_text()
    assert "> **ERROR: the pruned model was not saved**" in md
