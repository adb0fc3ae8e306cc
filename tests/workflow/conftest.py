"""Fixtures of the workflow tests: data sets made on the fly."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from fxprune.workflow.data import TensorImageDataset

from .helpers import synthetic_images, write_idx


@pytest.fixture(autouse=True)
def _one_thread(one_thread: None) -> None:
    """Every workflow test runs on one thread (tests/conftest.py's ``one_thread``): the tiny
    models here run fastest that way, and timings stay stable on a shared machine."""


@pytest.fixture
def synthetic_dataset() -> TensorImageDataset:
    images, labels = synthetic_images(320)
    return TensorImageDataset(images, labels, (0.3,), (0.3,))


@pytest.fixture
def fake_fmnist_dir(tmp_path: Path) -> Path:
    """A folder with the four Fashion-MNIST IDX files (small, synthetic)."""
    folder = tmp_path / "fmnist"
    folder.mkdir()
    for split, count in (("train", 200), ("t10k", 100)):
        images, labels = synthetic_images(count, seed=1 if split == "train" else 2)
        write_idx(folder / f"{split}-images-idx3-ubyte.gz", images[:, 0].numpy())
        write_idx(folder / f"{split}-labels-idx1-ubyte.gz", labels.numpy().astype(np.uint8))
    return folder
