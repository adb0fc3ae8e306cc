"""Data loading: Fashion-MNIST IDX, CIFAR-10 python folders, ImageFolder, clear errors."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from fxprune.workflow.data import (FASHION_MNIST_ROOT, ShardSampler, limit_dataset, load_data,
                                   load_fashion_mnist, make_loader, read_idx)
from fxprune.workflow.errors import DataNotFoundError

from .helpers import needs_fmnist, synthetic_images, write_idx


@needs_fmnist
def test_fashion_mnist_from_the_debian_package() -> None:
    bundle = load_data("fashion-mnist")
    assert (len(bundle.train), len(bundle.test)) == (60000, 10000)
    assert bundle.num_classes == 10 and bundle.in_channels == 1 and bundle.image_size == 28
    assert bundle.source == str(FASHION_MNIST_ROOT)
    image, label = bundle.train[0]
    assert image.shape == (1, 28, 28) and image.dtype == torch.float32
    # The IDX labels are balanced: 6000 training and 1000 test images per class.
    assert torch.bincount(bundle.train.labels).tolist() == [6000] * 10
    assert torch.bincount(bundle.test.labels).tolist() == [1000] * 10
    # Normalised with the training set's statistics: mean ~0 and std ~1 over a sample.
    batch = torch.stack([bundle.train[i][0] for i in range(2000)])
    assert abs(batch.mean().item()) < 0.05 and abs(batch.std().item() - 1.0) < 0.05


def test_read_idx_round_trip(tmp_path: Path) -> None:
    array = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    for name in ("a-idx3-ubyte", "b-idx3-ubyte.gz"):
        write_idx(tmp_path / name, array)
        assert torch.equal(read_idx(tmp_path / name), torch.from_numpy(array))


def test_read_idx_rejects_truncated_and_foreign_files(tmp_path: Path) -> None:
    array = np.zeros((4, 5, 5), dtype=np.uint8)
    write_idx(tmp_path / "x-idx3-ubyte", array)
    data = (tmp_path / "x-idx3-ubyte").read_bytes()
    (tmp_path / "x-idx3-ubyte").write_bytes(data[:-7])
    with pytest.raises(DataNotFoundError, match="truncated or corrupt"):
        read_idx(tmp_path / "x-idx3-ubyte")
    (tmp_path / "y").write_bytes(b"PK\x03\x04 not an idx file")
    with pytest.raises(DataNotFoundError, match="not an IDX file"):
        read_idx(tmp_path / "y")


def test_fashion_mnist_folder_given_as_path(fake_fmnist_dir: Path) -> None:
    bundle = load_data(str(fake_fmnist_dir))
    assert bundle.name == "fashion-mnist"
    assert (len(bundle.train), len(bundle.test)) == (200, 100)
    # The pixels survive the IDX round trip: un-normalising gives back the file's bytes.
    images, _ = synthetic_images(200, seed=1)
    x, y = bundle.train[7]
    restored = (x * 0.3530 + 0.2860) * 255
    assert torch.allclose(restored, images[7].float(), atol=1e-3)
    assert int(y) == 7 % 10


def test_missing_fashion_mnist_says_where_and_how(tmp_path: Path) -> None:
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as info:
        load_fashion_mnist(missing)
    message = str(info.value)
    assert str(missing) in message
    assert "apt-get install dataset-fashion-mnist" in message
    assert "--data" in message and "--download" in message


def test_missing_data_path_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError) as info:
        load_data(str(tmp_path / "no-such-folder"))
    assert str(tmp_path / "no-such-folder") in str(info.value)
    assert "apt-get install dataset-fashion-mnist" in str(info.value)


def _write_cifar_folder(root: Path, per_batch: int = 20) -> tuple[np.ndarray, list[int]]:
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    first = None
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        data = rng.integers(0, 256, size=(per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=per_batch)]
        with open(root / name, "wb") as handle:
            pickle.dump({b"data": data, b"labels": labels, b"batch_label": name.encode()}, handle)
        if first is None:
            first = (data, labels)
    names = [b"plane", b"car", b"bird", b"cat", b"deer", b"dog", b"frog", b"horse", b"ship", b"truck"]
    with open(root / "batches.meta", "wb") as handle:
        pickle.dump({b"label_names": names, b"num_vis": 3072}, handle)
    assert first is not None
    return first


def test_cifar10_python_folder(tmp_path: Path) -> None:
    data, labels = _write_cifar_folder(tmp_path / "cifar-10-batches-py")
    bundle = load_data(str(tmp_path))  # the parent of cifar-10-batches-py works too
    assert bundle.name == "cifar10" and bundle.in_channels == 3 and bundle.image_size == 32
    assert (len(bundle.train), len(bundle.test)) == (100, 20)
    assert bundle.classes[1] == "car"  # read from batches.meta
    # Row-major 3x32x32: the first 1024 values are the red plane.
    x, y = bundle.train[0]
    red = (x[0] * 0.2470 + 0.4914) * 255
    assert torch.allclose(red.flatten(), torch.from_numpy(data[0, :1024]).float(), atol=1e-3)
    assert int(y) == labels[0]


def _write_pngs(root: Path, classes: tuple[str, ...], per_class: int, size: int = 40) -> None:
    from PIL import Image

    rng = np.random.default_rng(0)
    for index, name in enumerate(classes):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            pixels = rng.integers(0, 80, size=(size, size, 3), dtype=np.uint8)
            pixels[:, :, index % 3] += 150  # a colour per class
            Image.fromarray(pixels).save(root / name / f"{i}.png")


def test_image_folder_single_folder_is_split(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "val", ("cat", "dog"), per_class=10)
    bundle = load_data(str(tmp_path / "val"), image_size=32)
    assert bundle.name == "imagefolder" and bundle.classes == ["cat", "dog"]
    assert len(bundle.train) + len(bundle.test) == 20 and len(bundle.test) == 4
    # Held-out and training images are disjoint.
    assert not set(bundle.train.indices) & set(bundle.test.indices)
    x, y = bundle.test[0]
    assert x.shape == (3, 32, 32) and int(y) in (0, 1)


def test_image_folder_with_train_and_val(tmp_path: Path) -> None:
    _write_pngs(tmp_path / "data" / "train", ("a", "b", "c"), per_class=4)
    _write_pngs(tmp_path / "data" / "val", ("a", "b", "c"), per_class=2)
    bundle = load_data(str(tmp_path / "data"), image_size=24)
    assert (len(bundle.train), len(bundle.test)) == (12, 6)
    assert bundle.train[0][0].shape == (3, 24, 24)


def test_limit_is_a_fixed_mixed_subset(fake_fmnist_dir: Path) -> None:
    a = load_data(str(fake_fmnist_dir), limit=50)
    b = load_data(str(fake_fmnist_dir), limit=50)
    assert len(a.train) == 50 and len(a.test) == 50
    assert a.train.indices == b.train.indices
    assert a.train.indices != list(range(50))  # a permutation, not the first rows
    assert len(limit_dataset(a.test, 10_000)) == 50


def test_training_order_is_a_function_of_seed_and_epoch(synthetic_dataset) -> None:
    def order(seed: int, epoch: int) -> list[int]:
        loader = make_loader(synthetic_dataset, 32, train=True, seed=seed)
        loader.sampler.set_epoch(epoch)
        return torch.cat([y for _, y in loader]).tolist()

    assert order(0, 1) == order(0, 1)
    assert order(0, 1) != order(0, 2)
    assert order(0, 1) != order(1, 1)


def test_shard_sampler_covers_every_sample_once() -> None:
    shards = [list(ShardSampler(11, rank, 3)) for rank in range(3)]
    assert sorted(sum(shards, [])) == list(range(11))
    assert [len(ShardSampler(11, rank, 3)) for rank in range(3)] == [4, 4, 3]


def test_image_size_resizes_in_memory_images(fake_fmnist_dir: Path) -> None:
    # ConvNeXt's stride-32 stages need more than Fashion-MNIST's 28 px: --image-size 32.
    native = load_data(str(fake_fmnist_dir), limit=20)
    bundle = load_data(str(fake_fmnist_dir), limit=20, image_size=32)
    image, label = bundle.train[0]
    assert image.shape == (1, 32, 32) and bundle.image_size == 32
    assert label == native.train[0][1]
    assert bundle.identity != native.identity and "32x32" in bundle.source
    # The same picture, smoothly resized: the mean brightness barely moves.
    assert abs(float(image.mean()) - float(native.train[0][0].mean())) < 0.1
    assert load_data(str(fake_fmnist_dir), limit=20, image_size=28).identity == native.identity
