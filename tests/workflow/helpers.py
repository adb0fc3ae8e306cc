"""Helpers of the workflow tests: a tiny model and data sets made on the fly."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from fxprune.workflow.data import FASHION_MNIST_ROOT

FMNIST_PRESENT = (FASHION_MNIST_ROOT / "train-images-idx3-ubyte.gz").is_file()
needs_fmnist = pytest.mark.skipif(
    not FMNIST_PRESENT,
    reason=f"Fashion-MNIST is not installed in {FASHION_MNIST_ROOT} (apt-get install dataset-fashion-mnist)")


class TinyNet(nn.Module):
    """A small conv net for 28x28 inputs, with BatchNorm and dropout (which draws from the global RNG)."""

    def __init__(self, in_channels: int = 1, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_channels, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(16)
        self.drop = nn.Dropout(0.2)
        # Flatten rather than global pooling: the synthetic classes differ by position.
        self.fc = nn.Linear(16 * 14 * 14, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn1(self.conv1(x)))
        x = torch.relu(self.bn2(self.conv2(x)))
        return self.fc(self.drop(x.flatten(1)))


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as an IDX file, gzip-compressed when the name ends in .gz."""
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(struct.pack(">I", d) for d in array.shape)
    payload = header + array.astype(np.uint8).tobytes()
    if path.suffix == ".gz":
        with gzip.open(path, "wb") as handle:
            handle.write(payload)
    else:
        path.write_bytes(payload)


def synthetic_images(count: int, channels: int = 1, size: int = 28, classes: int = 10,
                     seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Learnable uint8 images: each class is a bright bar at its own position plus noise."""
    generator = torch.Generator().manual_seed(seed)
    labels = torch.arange(count) % classes
    images = torch.randint(0, 60, (count, channels, size, size), generator=generator)
    band = max(1, size // classes)
    for index, label in enumerate(labels.tolist()):
        images[index, :, label * band:(label + 1) * band, :] += 180
    return images.clamp(0, 255).to(torch.uint8), labels
