"""Issue 10 items 16 and 17 at the command line: every bad input is one line on stderr, exit 2.

Each case calls ``fxprune.cli.main(argv)`` and checks: status 2, exactly one line on stderr,
starting ``fxprune: error:``, no traceback. Runs that read data use a tiny synthetic
Fashion-MNIST folder or image tree in tmp_path and the small TinyNet, or fail before reading
any data at all (``--data`` points at a folder that does not exist, so an option checked only
after loading would show up as a data error instead).
"""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from fxprune.cli import main

from .workflow.helpers import synthetic_images, write_idx

TINY = "tests.workflow.helpers:TinyNet"


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """One intra-op thread (tests/conftest.py): the tiny models run fastest that way."""


def _fmnist(folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 60), ("t10k", 30)):
        images, labels = synthetic_images(count, seed=1 if split == "train" else 2)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:, 0].numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.numpy().astype(np.uint8))
    return folder


def _idx_gz(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    path.write_bytes(gzip.compress(header + array.tobytes()))


def _run_args(out: Path, data: Path, *extra: str) -> list[str]:
    return ["run", "--model", TINY, "--data", str(data), "--out", str(out), "--baseline-epochs", "1",
            "--epochs", "0", "--batch-size", "20", "--no-compile", "--latency-runs", "1", "--threads", "1",
            "--quiet", *extra]


def _one_line_error(capsys: pytest.CaptureFixture[str], argv: list[str]) -> str:
    status = main(argv)
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert status == 2, err
    assert len(lines) == 1, err
    assert lines[0].startswith("fxprune: error: ") and "Traceback" not in err
    return lines[0]


# --------------------------------------------------------------------------------------------
# Item 16: inputs that ended in a traceback
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("size", ["-5", "0"])
def test_prune_image_size_must_be_positive(capsys: pytest.CaptureFixture[str], size: str) -> None:
    line = _one_line_error(capsys, ["prune", "--image-size", size])
    assert f"--image-size: must be >= 1, got {size}" in line


def test_out_that_is_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "report.txt"
    a_file.write_text("mine")
    line = _one_line_error(capsys, _run_args(a_file, tmp_path / "missing"))
    assert "is a file, not a folder" in line
    line = _one_line_error(capsys, _run_args(a_file / "out", tmp_path / "missing"))
    assert f"is under {a_file}, which is a file" in line
    assert a_file.read_text() == "mine"


def test_out_that_is_not_writable(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # /proc refuses new entries even to root (for whom a chmod'ed folder would still be writable).
    line = _one_line_error(capsys, _run_args(Path("/proc/fxprune-out"), tmp_path / "missing"))
    assert "cannot write there" in line


def test_prune_save_under_a_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "f"
    a_file.write_text("x")
    line = _one_line_error(capsys, ["prune", "--image-size", "32", "--save", str(a_file / "pruned")])
    assert "--save" in line and "which is a file" in line


def test_corrupt_images_in_an_image_folder(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from PIL import Image

    root = tmp_path / "images"
    for label, name in enumerate(("a", "b")):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(np.full((28, 28, 3), 50 + 100 * label, dtype=np.uint8)).save(root / name / f"{i}.png")
    bad = root / "b" / "2.png"
    bad.write_bytes(bad.read_bytes()[:50])  # truncated
    line = _one_line_error(capsys, _run_args(tmp_path / "out", root, "--image-size", "28"))
    assert f"cannot read image {bad}" in line


def test_fashion_mnist_with_a_corrupt_deflate_stream(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fmnist(tmp_path / "data")
    path = data / "train-images-idx3-ubyte.gz"
    images, _ = synthetic_images(60, seed=1)
    header = bytes([0, 0, 0x08, 3]) + b"".join(struct.pack(">I", d) for d in (60, 28, 28))
    raw = bytearray(gzip.compress(header + images[:, 0].numpy().tobytes()))
    raw[10] = 0xFF  # the first deflate block header: a reserved block type
    path.write_bytes(bytes(raw))
    line = _one_line_error(capsys, _run_args(tmp_path / "out", data))
    assert str(path) in line and "corrupt or truncated" in line


@pytest.mark.parametrize("labels, code, expected", [
    (np.full(60, 10, dtype=np.uint8), 0x08, r"class indices in [0, 9]"),
    (np.zeros((60, 1), dtype=np.uint8), 0x08, "1-d array"),
    (np.arange(60, dtype=">f4") / 7, 0x0D, "integer class indices"),  # float labels: truncated before
])
def test_fashion_mnist_bad_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str], labels: np.ndarray,
                                  code: int, expected: str) -> None:
    data = _fmnist(tmp_path / "data")
    _idx_gz(data / "train-labels-idx1-ubyte.gz", labels, code)
    line = _one_line_error(capsys, _run_args(tmp_path / "out", data))
    assert expected in line


def test_test_images_of_another_size(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = _fmnist(tmp_path / "data")
    _idx_gz(data / "t10k-images-idx3-ubyte.gz", np.zeros((30, 32, 32), dtype=np.uint8))
    line = _one_line_error(capsys, _run_args(tmp_path / "out", data))
    assert "training images are 28x28 but the test images are 32x32" in line


def test_a_torchvision_builder_named_as_package_module_callable(capsys: pytest.CaptureFixture[str]) -> None:
    # The documented form used to be called with in_channels=..., which ResNet does not take.
    assert main(["groups", "--model", "torchvision.models:resnet18"]) == 0
    assert capsys.readouterr().out.startswith("13 channel groups, 12 prunable")


def test_a_callable_that_does_not_exist(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    for model in ("torchvision.models:resnet1800", "no_such_package_xyz:build", ":foo"):
        line = _one_line_error(capsys, _run_args(tmp_path / "out", tmp_path / "missing", "--model", model))
        assert model in line


# --------------------------------------------------------------------------------------------
# Item 17: inputs that were accepted with exit 0, or failed only after the baseline trained
# --------------------------------------------------------------------------------------------
@pytest.mark.parametrize("extra, expected", [
    (["--weight-decay", "nan"], "--weight-decay: must be a finite number"),
    (["--weight-decay", "-0.1"], "--weight-decay must be >= 0"),
    (["--lr", "0"], "--lr must be > 0"),
    (["--lr", "nan"], "--lr: must be a finite number"),
    (["--lr", "-1"], "--lr must be > 0"),
    (["--baseline-lr", "inf"], "--baseline-lr: must be a finite number"),
    (["--label-smoothing", "nan"], "--label-smoothing: must be a finite number"),
    (["--ratio", "0.3", "--target-macs", "0.9"], "contradict each other"),
    (["--importance", "foo"], "--importance 'foo' is not an importance criterion; choose one of"),
    (["--round-to", "0"], "--round-to: must be >= 1"),
    (["--epochs", "-1"], "--epochs: must be >= 0"),
    (["--workers", "-2"], "--workers: must be >= 0"),
    (["--bogus-option"], "unrecognized arguments: --bogus-option"),
])
def test_bad_run_options_fail_before_any_work(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                              extra: list[str], expected: str) -> None:
    line = _one_line_error(capsys, _run_args(tmp_path / "out", tmp_path / "missing", *extra))
    assert expected in line
    assert not (tmp_path / "out" / "baseline").exists()


def test_sweep_with_an_unknown_importance_fails_before_any_work(tmp_path: Path,
                                                                capsys: pytest.CaptureFixture[str]) -> None:
    argv = ["sweep", "--importances", "l1,foo", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "o")]
    line = _one_line_error(capsys, argv)
    assert "--importances 'foo' is not an importance criterion" in line


def test_round_to_that_prunes_nothing_is_refused_before_training(tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    data = _fmnist(tmp_path / "data")
    line = _one_line_error(capsys, _run_args(tmp_path / "out", data, "--round-to", "100000"))
    assert "--round-to 100000 is not smaller than the widest layer" in line
    assert not (tmp_path / "out" / "baseline" / "baseline_model.pt").exists()


def test_prune_with_an_unknown_importance_fails_before_building_the_model(
        capsys: pytest.CaptureFixture[str]) -> None:
    line = _one_line_error(capsys, ["prune", "--importance", "foo", "--model", "no_such_package_xyz:f"])
    assert "--importance 'foo'" in line
